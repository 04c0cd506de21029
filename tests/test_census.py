"""The model census and the generic adapter: every image-text-to-text type is served or refused by name.

The whole census with the invariants on every served type takes minutes (``scripts/census.py --invariants``
writes docs/models.md); here every type is built and resolved as ``apply()`` resolves it, and the invariants
run on a few generically served types: one with 1-D RoPE and crop tensors, one with M-RoPE and grids.
"""

from __future__ import annotations

import time

import pytest
import torch

import tokenprune as tp
from tokenprune.adapters.generic import GenericAdapter, adapter_for, grids_from_hints
from tokenprune.errors import UnsupportedModelError
from tokenprune.plugins import get_plugin_manager
from tokenprune.testing.census import build_tiny, census_one, model_types


def test_grids_from_hints_divide_by_the_factor_that_fits_every_image():
    # Qwen2-VL-like grids (patches, merge 2), one tensor per image
    assert grids_from_hints([(1, 4, 8), (2, 4, 4)], [8, 8]) == [(1, 2, 4), (2, 2, 2)]
    # one tensor for all images: split by the hints
    assert grids_from_hints([(1, 4, 8), (1, 4, 4)], [12]) == [(1, 2, 4), (1, 2, 2)]
    # image sizes in pixels over a 28-pixel patch
    assert grids_from_hints([(1, 56, 84)], [6]) == [(1, 2, 3)]
    # counts nothing explains, or per-crop tensors of another number than hints: no grid
    assert grids_from_hints([(1, 4, 4)], [5]) is None
    assert grids_from_hints([(1, 4, 4)], [4, 4]) is None


def test_every_type_resolves_to_an_adapter_or_a_named_refusal():
    manager = get_plugin_manager()
    registered = set(manager.adapters)
    outcome: dict[str, str] = {}
    start = time.perf_counter()
    for model_type in model_types():
        try:
            model = build_tiny(model_type)
        except Exception as exc:
            outcome[model_type] = f"not built ({type(exc).__name__})"
            continue
        try:
            adapter = adapter_for(model, manager)
        except UnsupportedModelError as exc:
            assert repr(model_type) in str(exc), str(exc)
            assert "cannot serve it: " in str(exc)
            outcome[model_type] = "refused"
            continue
        if model_type in registered:
            assert not isinstance(adapter, GenericAdapter), model_type  # a registered adapter wins
            outcome[model_type] = "registered"
        else:
            assert isinstance(adapter, GenericAdapter), model_type
            outcome[model_type] = "generic"
        del model
    seconds = time.perf_counter() - start
    counts = {k: sum(1 for v in outcome.values() if v.startswith(k)) for k in ("registered", "generic", "refused")}
    print(f"census resolution of {len(outcome)} types in {seconds:.0f} s: {counts}")
    assert counts["registered"] >= 10
    assert counts["generic"] >= 30
    assert counts["refused"] >= 10


@pytest.mark.parametrize("model_type", ["aya_vision", "cosmos3_edge"])
def test_generically_served_types_keep_the_engine_invariants(model_type):
    row = census_one(model_type)
    assert row.adapter == f"generic ({model_type})"
    assert row.status == "passes", row.detail


def test_apply_refuses_a_hybrid_language_model_naming_type_and_reason():
    model = build_tiny("qwen3_5")
    with pytest.raises(UnsupportedModelError, match=r"'qwen3_5'.*the engine does not serve"):
        tp.apply(model, {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]})
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_the_generic_adapter_detects_mrope():
    model = build_tiny("cosmos3_edge")
    assert GenericAdapter(model).position_scheme == "mrope"
    assert GenericAdapter(build_tiny("aya_vision")).position_scheme == "rope"
    assert torch.is_tensor(next(model.parameters()))
