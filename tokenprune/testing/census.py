"""The model census: every image-text-to-text model type of the installed transformers, served or refused.

For each ``model_type`` of transformers' ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` (:func:`model_types`),
:func:`census_one` builds a tiny random model from the type's config class (the defaults shrunk by
:func:`tiny_config`: text hidden 64, 4 layers; vision hidden 32, 2 layers) and

* resolves its adapter as :func:`tokenprune.apply` does (:func:`~tokenprune.adapters.generic.adapter_for`;
  first on the meta device, so a refusal needs no weights): a model no adapter can serve must be refused with an
  :class:`~tokenprune.errors.UnsupportedModelError` that names the type and the reason (``refused``);
* for a served model, builds inputs of three samples (one image, two images, one image; or for models
  that take ``image_grid_thw``, grids of different sizes) and runs the engine's invariants
  (:func:`census_invariants`: keep-all identity, cached generation equals recomputation, batch equals one
  by one after a post-projector cut and a layer cut, ``remove()`` restores the model) (``passes``, or
  ``fails`` naming the invariant);
* where the batch check fails because the unmodified model itself is not batch-invariant (HunYuan-VL numbers
  its images across the batch), the type is ``not run`` with that reason, not ``fails`` and not ``passes``;
* where the census cannot build the tiny model or its inputs (a missing optional package such as timm or
  torchvision, a config whose defaults do not build, an input form it has no builder for) the type is
  ``not run`` with the reason: that never counts as a pass.

:func:`census` runs every type and returns the rows; ``scripts/census.py`` writes ``docs/models.md`` from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokenprune.engine import compat
from tokenprune.errors import UnsupportedModelError
from tokenprune.testing.census_inputs import InputBuilder
from tokenprune.testing.tiny_configs import build_tiny, tiny_config


@dataclasses.dataclass
class CensusRow:
    """One model type's outcome.

    Attributes:
        model_type: The type.
        status: ``passes``, ``refused``, ``fails`` or ``not run``.
        adapter: The adapter that served it (``generic (...)`` or a registered name), ``-`` if none.
        detail: The refusal's reason, the failed invariant, or why it did not run.
        seconds: Wall time of this type's census.
        layer: The layer of the invariants' layer cut (see :func:`census_one`).
    """

    model_type: str
    status: str
    adapter: str = "-"
    detail: str = ""
    seconds: float = 0.0
    layer: int = 2


def model_types() -> list[str]:
    """The installed transformers' image-text-to-text model types, sorted."""
    return compat.image_text_to_text_types()


# --- the census ------------------------------------------------------------------------------------


def census_invariants() -> list[tuple[str, Callable[..., None]]]:
    """The invariants the census runs on a served type, by name."""
    from tokenprune.testing import adapters as checks

    return [
        ("keep-all identity", checks.keep_all_is_identity),
        ("cached generation equals recomputation", checks.cached_decode_equals_recompute),
        ("batch equals one by one", checks.batch_equals_one_by_one),
        ("remove() restores the model", checks.remove_restores_model),
    ]


#: Why a package is no test dependency, where it is not (the census's row says it).
NOT_A_TEST_DEPENDENCY = {
    "timm": "timm imports torchvision, whose wheels on the index are built for a CUDA torch and do not import on "
    "the CPU torch the tests use",
}


def _needs(package: str) -> str:
    why = NOT_A_TEST_DEPENDENCY.get(package)
    return f"needs {package}, not installed" + (f" ({why})" if why else "")


def _missing_package(exc: BaseException) -> str | None:
    text = str(exc)
    for package in ("timm", "torchvision", "einops", "scipy", "librosa"):
        if package in text and ("require" in text.lower() or "No module" in text or "install" in text.lower()):
            return package
    return None


def census_one(model_type: str, invariants: bool = True, layer: int | str = 2) -> CensusRow:
    """Build ``model_type``'s tiny model and serve it (running the invariants) or expect a named refusal.

    With ``invariants=False`` a served type only builds its inputs and runs one forward under a keep-all
    pipeline (status ``served``, not ``passes``). ``layer``: the layer of the invariants' layer cut, ``2`` (the
    census's) or ``"default"``: the model's default layer for attention-reading stages
    (:func:`default_cut_layer`), where the probed stage runs too.
    """
    from tokenprune.adapters.generic import adapter_for
    from tokenprune.testing.adapters import adapter_case, adapter_check_manager

    start = time.perf_counter()
    row = CensusRow(model_type, "not run")
    try:
        row = _census(model_type, adapter_for, adapter_case, adapter_check_manager, invariants, layer)
    finally:
        row.seconds = round(time.perf_counter() - start, 2)
    return row


def _census(
    model_type: str, adapter_for: Any, adapter_case: Any, manager_of: Any, invariants: bool, layer: int | str
) -> CensusRow:
    manager = manager_of()
    try:
        with torch.device("meta"):  # the refusal needs no weights; a model too large to build is refused too
            adapter_for(build_tiny(model_type), manager)
        model = build_tiny(model_type)
    except UnsupportedModelError as exc:
        named = model_type in str(exc)
        return CensusRow(model_type, "refused" if named else "fails", detail=_one_line(_reason(str(exc))))
    except Exception as exc:
        package = _missing_package(exc)
        why = _needs(package) if package else f"tiny model not built: {type(exc).__name__}: {exc}"
        return CensusRow(model_type, "not run", detail=_one_line(why))
    adapter = adapter_for(model, manager)
    try:  # the unmodified model must run on the census's inputs, else they (not tokenprune) are at fault
        make_inputs = InputBuilder(model, adapter)
        with torch.no_grad():
            model(**make_inputs([1, None]))
    except Exception as exc:
        package = _missing_package(exc)
        why = _needs(package) if package else f"no census inputs: {type(exc).__name__}: {exc}"
        return CensusRow(model_type, "not run", adapter.name, _one_line(why))
    checks = census_invariants() if invariants else census_invariants()[:1]
    k, probe = default_cut_layer(adapter) if layer == "default" else (int(layer), int(layer) - 1)
    try:
        case = adapter_case(
            model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=make_inputs.pad, layer=k, probe_layer=probe
        )
    except ValueError as exc:  # what the kit cannot check (another attention implementation than sdpa)
        return CensusRow(model_type, "not run", adapter.name, _one_line(f"the check kit cannot run it: {exc}"))
    try:
        for name, check in checks:
            with _named(name):
                check(case)
    except _Failed as exc:
        if str(exc).startswith("batch equals one by one") and not _batch_invariant(model, make_inputs, [1, 2, 1]):
            why = "the unmodified model is not batch-invariant (a sample's outputs depend on the other samples)"
            return CensusRow(
                model_type, "not run", adapter.name, _one_line(f"{why}, so the census's batch check cannot hold")
            )
        return CensusRow(model_type, "fails", adapter.name, _one_line(str(exc)), layer=k)
    return CensusRow(model_type, "passes" if invariants else "served", adapter.name, "", layer=k)


def default_cut_layer(adapter: Any) -> tuple[int, int]:
    """``(k, probe)``: the model's default layer ``k`` for a stage that reads attention
    (:func:`tokenprune.engine.hybrid.default_layer`: 2 where layer 1 is softmax attention, else the first later layer
    after a softmax-attention layer) and the layer of a probed stage beside it (``k - 1`` where layer ``k - 2`` is
    softmax attention, else ``k``).

    Raises:
        ValueError: no layer of the model serves an attention-reading stage.
    """
    from tokenprune.engine.hybrid import SOFTMAX_KINDS, default_layer, layer_kinds

    kinds = layer_kinds(adapter.text_config(), adapter.decoder_layers())
    k = default_layer(kinds)
    if k is None:
        raise ValueError(f"no layer of {kinds} follows a softmax-attention layer")
    return k, k - 1 if kinds[k - 2] in SOFTMAX_KINDS else k


def _batch_invariant(model: Any, make_inputs: Any, specs: list[int], atol: float = 1e-4) -> bool:
    """Whether the unmodified model's last-position logits for each sample are the same in the batch and alone
    (HunYuan-VL's own positions number the images across the batch, so they are not)."""
    with torch.no_grad():
        batch = model(**make_inputs(specs)).logits[:, -1]
        for i, spec in enumerate(specs):
            alone = model(**make_inputs([spec], start=i)).logits[0, -1]
            if not torch.allclose(batch[i], alone, atol=atol, rtol=0):
                return False
    return True


class _Failed(Exception):
    pass


@contextlib.contextmanager
def _named(name: str) -> Any:
    try:
        yield
    except Exception as exc:
        raise _Failed(f"{name}: {type(exc).__name__}: {exc}") from exc


def _reason(message: str) -> str:
    marker = "cannot serve it: "
    if marker in message:
        return message.split(marker, 1)[1].split(". Registered adapters", 1)[0]
    return message


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def census(
    types: Sequence[str] | None = None,
    progress: Callable[[CensusRow], None] | None = None,
    invariants: bool = True,
) -> list[CensusRow]:
    """:func:`census_one` for every type (default: :func:`model_types`)."""
    rows = []
    for model_type in types or model_types():
        row = census_one(model_type, invariants)
        if progress is not None:
            progress(row)
        rows.append(row)
    return rows


def resolve_types(types: Sequence[str] | None = None, manager: Any = None) -> list[CensusRow]:
    """Which adapter serves each type, without running anything: tiny models built on the meta device.

    Status ``registered`` or ``generic`` (served; the invariants are the census's business), ``refused`` with
    the reason, ``not run`` where the tiny model does not build.
    """
    from tokenprune.adapters.generic import GenericAdapter, adapter_for
    from tokenprune.plugins import get_plugin_manager

    manager = manager if manager is not None else get_plugin_manager()
    rows = []
    for model_type in types or model_types():
        try:
            with torch.device("meta"):
                model = build_tiny(model_type)
        except Exception as exc:  # reported as the row's reason
            package = _missing_package(exc)
            why = _needs(package) if package else f"tiny model not built: {type(exc).__name__}"
            rows.append(CensusRow(model_type, "not run", detail=why))
            continue
        try:
            adapter = adapter_for(model, manager)
        except UnsupportedModelError as exc:
            named = repr(model_type) in str(exc)
            rows.append(CensusRow(model_type, "refused" if named else "fails", detail=_one_line(_reason(str(exc)))))
            continue
        generic = isinstance(adapter, GenericAdapter) and model_type not in list(manager.adapters)
        status = "generic" if generic else "registered"
        rows.append(CensusRow(model_type, status, adapter.name))
    return rows


__all__ = [
    "CensusRow",
    "InputBuilder",
    "build_tiny",
    "census",
    "census_invariants",
    "census_one",
    "default_cut_layer",
    "model_types",
    "resolve_types",
    "tiny_config",
]
