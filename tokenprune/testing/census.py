"""The model census: every image-text-to-text model type of the installed transformers, served or refused.

For each ``model_type`` of transformers' ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` (:func:`model_types`),
:func:`census_one` builds a tiny random model from the type's config class (the defaults shrunk by
:func:`tiny_config`: text hidden 64, 4 layers; vision hidden 32, 2 layers) and

* resolves its adapter as :func:`tokenprune.apply` does (:func:`~tokenprune.adapters.generic.adapter_for`):
  a model no adapter can serve must be refused with an
  :class:`~tokenprune.errors.UnsupportedModelError` that names the type and the reason (``refused``);
* for a served model, builds inputs of three samples (one image, two images, one image; or for models
  that take ``image_grid_thw``, grids of different sizes) and runs the engine's invariants
  (:data:`CENSUS_INVARIANTS`: keep-all identity, cached generation equals recomputation, batch equals one
  by one after a post-projector cut and a layer cut, ``remove()`` restores the model) (``passes``, or
  ``fails`` naming the invariant);
* where the census cannot build the tiny model or its inputs (a missing optional package such as timm or
  torchvision, a config whose defaults do not build, an input form it has no builder for) the type is
  ``not run`` with the reason: that never counts as a pass.

:func:`census` runs every type and returns the rows; ``scripts/census.py`` writes ``docs/models.md`` from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.engine import compat
from tokenprune.errors import UnsupportedModelError

#: Sizes every tiny text config gets (keys the config does not have are skipped).
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "sliding_window": 1024,
    "out_hidden_size": 64,
}
#: Sizes every tiny vision config gets.
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 4,
    "head_dim": 8,
    "out_hidden_size": 64,
}
#: Patches per side of a tiny fixed-size tower's image (divisible by the usual 2x2 and 4x4 merges).
PATCHES_PER_SIDE = 8
#: Tiny models above this many parameters are not built (see :func:`build_tiny`).
MAX_PARAMETERS = 20_000_000
#: The tiny vocabulary; special token ids outside it are moved to 10..99.
VOCAB = 512


@dataclasses.dataclass
class CensusRow:
    """One model type's outcome.

    Attributes:
        model_type: The type.
        status: ``passes``, ``refused``, ``fails`` or ``not run``.
        adapter: The adapter that served it (``generic (...)`` or a registered name), ``-`` if none.
        detail: The refusal's reason, the failed invariant, or why it did not run.
        seconds: Wall time of this type's census.
    """

    model_type: str
    status: str
    adapter: str = "-"
    detail: str = ""
    seconds: float = 0.0


def model_types() -> list[str]:
    """The installed transformers' image-text-to-text model types, sorted."""
    return compat.image_text_to_text_types()


def _shrink(d: dict[str, Any], sizes: dict[str, Any]) -> None:
    """``sizes`` into ``d`` where it has the key; per-layer lists and ``per_layer_config`` cut to the new depth,
    an ``mrope_section`` rescaled to the new rotary width."""
    old_depth = d.get("num_hidden_layers")
    for key, value in sizes.items():
        if key in d and isinstance(d[key], int) and not isinstance(d[key], bool):
            d[key] = value
    n = d.get("num_hidden_layers")
    if isinstance(old_depth, int) and isinstance(n, int) and old_depth > n:
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_depth:
                d[key] = value[:n]
            elif key == "per_layer_config" and isinstance(value, dict):
                d[key] = {k: v for k, v in value.items() if str(k).isdigit() and int(k) < n}
    if d.get("sliding_window", 0) is None and "sliding_attention" in (d.get("layer_types") or []):
        d["sliding_window"] = TEXT["sliding_window"]
    if "text_hidden_size" in d:
        d["text_hidden_size"] = TEXT["hidden_size"]
    _rescale_mrope(d)


def _rescale_mrope(d: dict[str, Any]) -> None:
    rope = d.get("rope_parameters")
    if not (isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list)):
        return
    if isinstance(d.get("qk_rope_head_dim"), int):
        half = d["qk_rope_head_dim"] // 2
    elif isinstance(d.get("head_dim"), int) or isinstance(d.get("num_attention_heads"), int):
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        factor = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
        half = int(head_dim * factor) // 2
    else:
        return
    section = rope["mrope_section"]
    scaled = [max(1, round(half * x / sum(section))) for x in section]
    scaled[0] += half - sum(scaled)
    d["rope_parameters"] = {**rope, "mrope_section": scaled}


def _vision_sizes(d: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    """:data:`VISION`, deep enough for the feature layers the top config reads, images of
    :data:`PATCHES_PER_SIDE` patches a side."""
    sizes = dict(VISION)
    layers: list[Any] = []
    for sub in (d, *[v for v in d.values() if isinstance(v, dict)]):
        found = sub.get("vision_feature_layers") or sub.get("vision_feature_layer")
        layers += found if isinstance(found, list) else [found] if isinstance(found, int) else []
    deepest = max([abs(x) + (x >= 0) for x in layers if isinstance(x, int)], default=0)
    sizes["num_hidden_layers"] = sizes["depth"] = max(2, deepest)
    patch = vision.get("patch_size")
    if isinstance(patch, int) and isinstance(vision.get("image_size"), int):
        sizes["image_size"] = patch * PATCHES_PER_SIDE
    return sizes


def _move_special_ids(d: dict[str, Any], moved: dict[int, int]) -> None:
    """Special token ids of ``d`` at or above :data:`VOCAB` moved to ``10 + k`` (the same old id, the same new one)."""
    for key, value in d.items():
        if key.endswith(("token_id", "token_index")) and isinstance(value, int) and value >= VOCAB:
            d[key] = moved.setdefault(value, 10 + len(moved))
        elif key.endswith("token_id") and isinstance(value, list):
            d[key] = [moved.setdefault(v, 10 + len(moved)) if isinstance(v, int) and v >= VOCAB else v for v in value]
    if "vocab_size" in d:
        d["vocab_size"] = VOCAB


def _shrink_tree(top: dict[str, Any], d: dict[str, Any], moved: dict[int, int], vision: bool) -> None:
    """Shrink every sub-config below ``d`` (a dict with a ``model_type``): vision sizes under a key that names
    vision, text sizes elsewhere."""
    for key, value in list(d.items()):
        if isinstance(value, dict) and "model_type" in value:
            sub_vision = vision or "vision" in key or "visual" in key
            _shrink(value, _vision_sizes(top, value) if sub_vision else TEXT)
            if not sub_vision:
                _move_special_ids(value, moved)
            _shrink_tree(top, value, moved, sub_vision)


def _mentions_mrope(cls: type) -> bool:
    """The config's module names ``mrope_section`` (a default the modeling code fills in when a config has none)."""
    module = sys.modules.get(cls.__module__)
    try:
        return module is not None and "mrope_section" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def _needs_mrope_section(cls: type, text: dict[str, Any]) -> bool:
    """The text config has no ``mrope_section`` of its own, but its or the top config's module names one."""
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and ("mrope_section" in rope or any(isinstance(v, dict) for v in rope.values())):
        return False
    classes = [cls]
    if isinstance(text.get("model_type"), str):
        with contextlib.suppress(KeyError):
            classes.append(compat.config_class(text["model_type"]))
    return any(_mentions_mrope(c) for c in classes)


def tiny_config(model_type: str) -> Any:
    """The type's default config with every text and vision sub-config shrunk."""
    cls = compat.config_class(model_type)
    d = cls().to_dict()
    text = d.get("text_config")
    if isinstance(text, dict) and _needs_mrope_section(cls, text):  # explicit, so that it is rescaled below
        rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
        text["rope_parameters"] = {"mrope_section": [8, 12, 12], **rope}
    if isinstance(d.get("mm_tokens_per_image"), int):  # a pooled grid must fit the tiny tower's patches
        d["mm_tokens_per_image"] = (PATCHES_PER_SIDE // 2) ** 2
    moved: dict[int, int] = {}
    _move_special_ids(d, moved)
    _shrink_tree(d, d, moved, False)
    _shrink(d, TEXT if "text_config" not in d else {})
    return cls.from_dict(d)


def build_tiny(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random model of ``model_type`` from its config class (eval mode, sdpa where the model has it).

    The model is first built on the meta device: one that still has more than :data:`MAX_PARAMETERS`
    parameters (a sub-config the shrinking does not reach) is not built for real.

    Raises:
        ValueError: the shrunk config still describes a large model.
    """
    cfg = tiny_config(model_type)
    if torch.empty(0).device.type != "meta":
        with torch.device("meta"):
            size = sum(p.numel() for p in _from_config(cfg).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters (a sub-config not shrunk)")
    torch.manual_seed(seed)
    return _from_config(cfg).eval()


def _from_config(cfg: Any) -> nn.Module:
    try:
        return compat.model_from_config(cfg)
    except ValueError as exc:  # a top-level class that declares no sdpa: built on eager, its language model
        if "attention implementation" not in str(exc):  # then switched to sdpa (transformers 5's decoders have it)
            raise
        model = compat.model_from_config(cfg, "eager")
        compat.swap_attention_implementation(model.config.get_text_config(), "sdpa")
        return model


# --- inputs ----------------------------------------------------------------------------------------


def _special_ids(cfg: Any) -> set[int]:
    out = set()
    for c in (cfg, getattr(cfg, "text_config", None)):
        for k, v in (vars(c) if c is not None else {}).items():
            if k.endswith(("token_id", "token_index")) and isinstance(v, int):
                out.add(v)
    return out


class InputBuilder:
    """``make_inputs(specs, start=0)`` for a tiny census model: a spec is a number of images (or ``None``).

    The form follows ``get_image_features``' required arguments: fixed-size towers get ``(3, S, S)`` images
    (``S`` the vision config's ``image_size``); ``image_grid_thw`` models patch rows of a ``(1, 2m, 2mk)``
    grid (``m`` the merge size); ``image_sizes`` models (Pixtral) padded ``(3, H, W)`` images with their
    sizes; ``spatial_shapes`` models (SigLIP2 NaFlex) padded patch rows with a mask and their shapes. Image
    ``j`` of sample ``i`` is ``k = 1 + (i + j) % 2`` units wide. One placeholder per feature row the model's
    own ``get_image_features`` returns; ``mm_token_type_ids`` where the forward takes them.
    """

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        self.model = model
        self.adapter = adapter
        self.vlm = adapter.vlm()
        params = inspect.signature(self.vlm.get_image_features).parameters
        required = {p for p, v in params.items() if v.default is inspect.Parameter.empty}
        self.mode = next((m for m in ("image_grid_thw", "image_sizes", "spatial_shapes") if m in required), "fixed")
        if "image_grid_thw" in params:
            self.mode = "image_grid_thw"
        unknown = required - {"self", "pixel_values", "kwargs", "pixel_attention_mask", self.mode}
        if unknown:
            raise NotImplementedError(f"no census input builder for get_image_features({', '.join(sorted(unknown))})")
        cfg = model.config
        self.vision = getattr(cfg, "vision_config", None)
        self.patch = int(getattr(self.vision, "patch_size", 14) or 14)
        self.image_size = int(getattr(self.vision, "image_size", 0) or 0)
        if self.mode == "fixed" and not self.image_size:
            raise NotImplementedError("the vision config gives no image_size")
        taken = _special_ids(cfg)
        vocab = int(cfg.get_text_config().vocab_size)
        self.text_ids = [t for t in range(100, min(vocab, VOCAB)) if t not in taken][:200]
        self.image_token = adapter.image_token_id()
        self.pad = int(getattr(cfg.get_text_config(), "pad_token_id", None) or 0)
        self.mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    def _merge(self) -> int:
        for source in (self.model.config, self.vision):
            for key in ("spatial_merge_size", "downsample_factor", "merge_size"):
                value = getattr(source, key, None)
                if isinstance(value, int) and value > 0:
                    return value
        return 2

    def _image(self, i: int, j: int) -> tuple[Tensor, tuple[int, int]]:
        """Image ``j`` of sample ``i``: pixels (or patch rows) and its ``(h, w)`` in pixels (patches)."""
        g = torch.Generator().manual_seed(100 * i + j)
        k = 1 + (i + j) % 2
        if self.mode == "fixed":
            return torch.randn(3, self.image_size, self.image_size, generator=g), (self.image_size, self.image_size)
        m = self._merge()
        if self.mode == "image_sizes":
            h, w = 2 * m * self.patch, 2 * m * self.patch * k
            return torch.randn(3, h, w, generator=g), (h, w)
        ch = int(getattr(self.vision, "in_channels", getattr(self.vision, "num_channels", 3)))
        tp = int(getattr(self.vision, "temporal_patch_size", 1) or 1) if self.mode == "image_grid_thw" else 1
        h, w = 2 * m, 2 * m * k
        return torch.randn(h * w, ch * tp * self.patch * self.patch, generator=g), (h, w)

    def _batch(self, images: list[Tensor], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """The pixel arguments of ``images`` in this model's form."""
        if self.mode == "fixed":
            return {"pixel_values": torch.stack(images)}
        if self.mode == "image_grid_thw":
            return {"pixel_values": torch.cat(images), "image_grid_thw": torch.tensor([[1, h, w] for h, w in sizes])}
        if self.mode == "image_sizes":
            height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
            pixels = torch.zeros(len(images), 3, height, width)
            for n, im in enumerate(images):
                pixels[n, :, : im.shape[1], : im.shape[2]] = im
            return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}
        most = max(im.shape[0] for im in images)
        pixels = torch.zeros(len(images), most, images[0].shape[1])
        mask = torch.zeros(len(images), most, dtype=torch.bool)
        for n, im in enumerate(images):
            pixels[n, : im.shape[0]] = im
            mask[n, : im.shape[0]] = True
        return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(sizes)}

    def _counts(self, kw: dict[str, Any], n_images: int) -> list[int]:
        from tokenprune.adapters.base import ImageCall

        with torch.no_grad():
            out = self.vlm.get_image_features(**kw)
        feats = ImageCall((), kw, out).features()
        if len(feats) != n_images:
            raise NotImplementedError(f"get_image_features gave {len(feats)} feature tensors for {n_images} images")
        return [int(f.shape[0]) for f in feats]

    def __call__(self, specs: Sequence[Any], start: int = 0) -> dict[str, Any]:
        images, sizes = [], []
        for i, spec in enumerate(specs, start):
            for j in range(spec or 0):
                image, size = self._image(i, j)
                images.append(image)
                sizes.append(size)
        pixels = self._batch(images, sizes) if images else {}
        counts = self._counts(pixels, len(images)) if images else []
        rows, n = [], 0
        t = self.text_ids
        for i, spec in enumerate(specs, start):
            ids = [t[(7 * i + j) % len(t)] for j in range(3)]
            for _ in range(spec or 0):
                ids += [self.image_token] * counts[n] + [t[(i + 50) % len(t)]]
                n += 1
            rows.append(ids + [t[(3 * i + 11 * j + 100) % len(t)] for j in range(4 + i % 2)])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :] = torch.tensor(r)
            mask[b, width - len(r) :] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, **pixels}
        if self.mm_types:
            out["mm_token_type_ids"] = (ids == self.image_token).long()
        return out


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


def _missing_package(exc: BaseException) -> str | None:
    text = str(exc)
    for package in ("timm", "torchvision", "einops", "scipy", "librosa"):
        if package in text and ("require" in text.lower() or "No module" in text or "install" in text.lower()):
            return package
    return None


def census_one(model_type: str, invariants: bool = True) -> CensusRow:
    """Build ``model_type``'s tiny model and serve it (running the invariants) or expect a named refusal.

    With ``invariants=False`` a served type only builds its inputs and runs one forward under a keep-all
    pipeline (status ``served``, not ``passes``).
    """
    from tokenprune.adapters.generic import adapter_for
    from tokenprune.testing.adapters import adapter_case, adapter_check_manager

    start = time.perf_counter()
    row = CensusRow(model_type, "not run")
    try:
        row = _census(model_type, adapter_for, adapter_case, adapter_check_manager, invariants)
    finally:
        row.seconds = round(time.perf_counter() - start, 2)
    return row


def _census(model_type: str, adapter_for: Any, adapter_case: Any, manager_of: Any, invariants: bool) -> CensusRow:
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
        why = f"needs {package}, not installed" if package else f"tiny model not built: {type(exc).__name__}: {exc}"
        return CensusRow(model_type, "not run", detail=_one_line(why))
    adapter = adapter_for(model, manager)
    try:  # the unmodified model must run on the census's inputs, else they (not tokenprune) are at fault
        make_inputs = InputBuilder(model, adapter)
        with torch.no_grad():
            model(**make_inputs([1, None]))
    except Exception as exc:
        package = _missing_package(exc)
        why = f"needs {package}, not installed" if package else f"no census inputs: {type(exc).__name__}: {exc}"
        return CensusRow(model_type, "not run", adapter.name, _one_line(why))
    checks = census_invariants() if invariants else census_invariants()[:1]
    try:
        case = adapter_case(model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=make_inputs.pad)
    except ValueError as exc:  # what the kit cannot check (another attention implementation than sdpa)
        return CensusRow(model_type, "not run", adapter.name, _one_line(f"the check kit cannot run it: {exc}"))
    try:
        for name, check in checks:
            with _named(name):
                check(case)
    except _Failed as exc:
        return CensusRow(model_type, "fails", adapter.name, _one_line(str(exc)))
    return CensusRow(model_type, "passes" if invariants else "served", adapter.name, "")


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
            why = f"needs {package}, not installed" if package else f"tiny model not built: {type(exc).__name__}"
            rows.append(CensusRow(model_type, "not run", detail=why))
            continue
        try:
            adapter = adapter_for(model, manager)
        except UnsupportedModelError as exc:
            named = repr(model_type) in str(exc)
            rows.append(CensusRow(model_type, "refused" if named else "fails", detail=_one_line(_reason(str(exc)))))
            continue
        status = "generic" if isinstance(adapter, GenericAdapter) else "registered"
        rows.append(CensusRow(model_type, status, adapter.name))
    return rows
