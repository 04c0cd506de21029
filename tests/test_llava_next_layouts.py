"""LLaVA-NeXT's image layouts are packed once per image size and model, then read back.

The adapter lays an image out by running the model's ``pack_image_features`` on coordinates (about 2 ms
of host time at 2928 tokens); a size seen before costs no such call, and the layouts read back are those
a fresh packing gives.
"""

import pytest
import tiny_models
import torch

import tokenprune as tp
from tokenprune.adapters import llava_next

LAYOUT_READER = {"stages": [{"at": "post_projector", "reducer": "downsample", "keep": 0.5}]}


@pytest.fixture
def tiny() -> tiny_models.Tiny:
    return tiny_models.llava_next()


def _kept_and_packs(tiny: tiny_models.Tiny, inputs: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[list, int]:
    """The kept tokens of a layout-reading stage, and how often ``pack_image_features`` ran (the model's own
    call included)."""
    vlm, calls = tiny.model.model, []
    real = vlm.pack_image_features
    monkeypatch.setattr(vlm, "pack_image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    with tp.apply(tiny.model, LAYOUT_READER) as run, torch.inference_mode():
        tiny.model(**inputs)
    monkeypatch.undo()
    return run.stats.last_prefill.stages[0].kept, len(calls)


def test_a_size_seen_before_is_not_packed_again_and_lays_out_the_same(tiny, monkeypatch):
    llava_next.forget_layouts()
    inputs = tiny.make_inputs([(56, 112), (112, 112)])
    fresh, packs = _kept_and_packs(tiny, inputs, monkeypatch)
    assert packs == 2  # the model's call and the adapter's
    again, packs = _kept_and_packs(tiny, inputs, monkeypatch)
    assert packs == 1 and again == fresh
    llava_next.forget_layouts()
    assert _kept_and_packs(tiny, inputs, monkeypatch)[0] == fresh


def test_a_new_size_is_packed_and_a_layout_read_back_is_a_copy(tiny, monkeypatch):
    llava_next.forget_layouts()
    _kept_and_packs(tiny, tiny.make_inputs([(56, 112)]), monkeypatch)
    _, packs = _kept_and_packs(tiny, tiny.make_inputs([(112, 112)]), monkeypatch)
    assert packs == 2
    (fields,) = [f for k, f in llava_next._SEEN[tiny.model.model].items() if k[0] == (112, 112)]
    layout = llava_next._layout(0, fields)
    layout.row.add_(100)
    assert int(fields[1].max()) < 100


def test_the_layouts_of_a_model_are_bounded_and_dropped_with_it(monkeypatch):
    monkeypatch.setattr(llava_next, "_SEEN_SIZES", 1)
    model = tiny_models.llava_next()
    llava_next.forget_layouts()
    for size in ((56, 112), (112, 112)):
        with tp.apply(model.model, LAYOUT_READER), torch.inference_mode():
            model.model(**model.make_inputs([size]))
    assert [k[0] for k in llava_next._SEEN[model.model.model]] == [(112, 112)]
    del model
    import gc

    gc.collect()
    assert len(llava_next._SEEN) == 0
