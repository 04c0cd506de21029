"""Inputs for the census's tiny models: ``make_inputs(specs, start=0)`` built from ``get_image_features``' arguments."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.testing.tiny_configs import SPECIAL_ID_KEYS, VOCAB

#: Layout arguments of ``get_image_features`` the builder fills, in the order a model's mode is chosen.
MODES = ("image_grid_thw", "image_sizes", "spatial_shapes", "image_grids")
#: Further arguments it fills: high-resolution twins (DeepSeek-VL-Hybrid), per-image merge sizes
#: (VideoLLaMA3), per-image crop counts (Molmo2), and the pooling map of pooled-patch tokens (Molmo2).
EXTRAS = frozenset({"high_res_pixel_values", "image_merge_sizes", "image_num_crops", "image_token_pooling"})
#: Other names for ``pixel_values`` (before 5.21: Fuyu's forward takes ``image_patches``, Video-LLaVA's forward and
#: ``get_image_features`` take ``pixel_values_images``).
ALIASES = ("image_patches", "pixel_values_images")


def _special_ids(cfg: Any) -> set[int]:
    out = set()
    for c in (cfg, getattr(cfg, "text_config", None)):
        for k, v in (vars(c) if c is not None else {}).items():
            if k.endswith(SPECIAL_ID_KEYS) and isinstance(v, int):
                out.add(v)
    return out


def _first(value: Any, default: int = 0) -> int:
    """An int config size that may be given as a list or pair (``[448, 448]``)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return int(value) if isinstance(value, int) and value else default


def _nested(cfg: Any, key: str) -> Any:
    """``cfg.<key>``, else the first sub-config's that has it (DeepSeek-OCR2's SAM tower under ``sam_config``)."""
    value = getattr(cfg, key, None)
    if value is not None:
        return value
    for sub in vars(cfg).values():
        if hasattr(sub, "to_dict") and (found := _nested(sub, key)) is not None:
            return found
    return None


def _boundaries(cfg: Any) -> tuple[int | None, int | None]:
    """The ids that open and close an image's placeholders where the config names them, as real prompts have
    them (Ovis2.5 checks them; Qwen-style ``get_rope_index`` finds images by ``vision_start_token_id``)."""
    for kind in ("image", "vision"):
        start = getattr(cfg, f"{kind}_start_token_id", None)
        end = getattr(cfg, f"{kind}_end_token_id", None)
        if isinstance(start, int) and isinstance(end, int):
            return start, end
    start, end = getattr(cfg, "image_start_id", None), getattr(cfg, "image_end_id", None)  # MiniCPM-V 4.7
    return (start, end) if isinstance(start, int) and isinstance(end, int) else (None, None)


class InputBuilder:
    """``make_inputs(specs, start=0)`` for a tiny census model: a spec is a number of images (or ``None``).

    The form follows ``get_image_features``' required arguments: fixed-size towers get ``(3, S, S)`` images
    (``S`` the vision config's ``image_size``; with ``high_res_pixel_values`` also the high-resolution tower's
    size); ``image_grid_thw`` models patch rows of a ``(1, 2m, 2mk)`` grid (``m`` the merge size), as flat rows
    ``(N, C*T*P*P)`` or as ``(N, C, P, P)`` patches, whichever the model's ``get_image_features`` takes, and
    ``image_merge_sizes`` where it asks for them; ``image_sizes`` models (Pixtral) padded ``(3, H, W)`` images
    with their sizes; ``spatial_shapes`` models (SigLIP2 NaFlex) padded patch rows with a mask and their shapes;
    ``image_grids`` models (Molmo2) one crop of patch rows per image pooled 2x2 by an ``image_token_pooling``
    map. Image ``j`` of sample ``i`` is ``k = 1 + (i + j) % 2`` units wide (fixed-size and pooled forms: the
    same size; packed slices: the same size where the tower takes no mixed sizes, MiniCPM-V 4.6 before 5.21).
    One placeholder per feature row the model's own ``get_image_features`` returns, between the image's start
    and end ids where the config names them; ``mm_token_type_ids`` where the forward takes them.
    """

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        self.model = model
        self.adapter = adapter
        self.vlm = adapter.vlm()
        params = inspect.signature(self.vlm.get_image_features).parameters
        self.params = set(params)
        required = {p for p, v in params.items() if v.default is inspect.Parameter.empty}
        self.mode = next((m for m in MODES if m in required), "fixed")
        if "image_grid_thw" in params:
            self.mode = "image_grid_thw"
        elif "image_position_ids" in params:  # Gemma 4: patch rows with their (x, y) positions
            self.mode = "image_position_ids"
        elif "target_sizes" in required:  # MiniCPM-V: NaViT-packed slices with their patch grids
            self.mode = "target_sizes"
        #: ``get_image_features``'s name for the pixels (``pixel_values``, or one of :data:`ALIASES`).
        self.pixels_in = next((a for a in ("pixel_values", *ALIASES) if a in params), "pixel_values")
        unknown = required - {"self", self.pixels_in, "kwargs", "pixel_attention_mask", self.mode} - EXTRAS
        if unknown:
            raise NotImplementedError(f"no census input builder for get_image_features({', '.join(sorted(unknown))})")
        cfg = model.config
        self.vision = getattr(cfg, "vision_config", None) or cfg  # Fuyu: the sizes on the top config
        self.patch = _first(_nested(self.vision, "patch_size"), 14)
        self.image_size = _first(_nested(self.vision, "image_size"))
        if self.mode in ("fixed", "image_grids") and not self.image_size:
            raise NotImplementedError("the vision config gives no image_size")
        taken = _special_ids(cfg)
        vocab = int(cfg.get_text_config().vocab_size)
        self.text_ids = [t for t in range(100, min(vocab, VOCAB)) if t not in taken][:200]
        self.image_token = adapter.image_token_id()
        self.open, self.close = _boundaries(cfg)
        self.pad = int(getattr(cfg.get_text_config(), "pad_token_id", None) or 0)
        forward = inspect.signature(model.forward).parameters
        self.mm_types = "mm_token_type_ids" in forward
        #: The forward's name for the pixels where it has no ``pixel_values`` (before 5.21: Fuyu's ``image_patches``,
        #: Video-LLaVA's ``pixel_values_images``).
        self.pixels_as = next((a for a in ALIASES if "pixel_values" not in forward and a in forward), None)
        self.pixel_mask = "pixel_attention_mask" in required
        self.form = "default"
        #: Whether the tower takes slices of different sizes in one call (MiniCPM-V 4.6's window merger before
        #: 5.21 views the packed slices as one uniform grid per image, and fails on mixed sizes).
        self.mixed_sizes = True
        #: Why the tower takes no mixed sizes (the stock error), ``None`` where it takes them.
        self.mixed_sizes_failure: str | None = None
        others = ("patches", "crops") if self.mode == "fixed" else ("patches",) if self.mode == "image_grid_thw" else ()
        for form in others:
            if self._runs():
                break
            self.form = form
        if self.mode == "target_sizes":
            self.mixed_sizes = self._takes_mixed_sizes()

    def _merge(self) -> int:
        for source in (self.model.config, self.vision):
            for key in ("spatial_merge_size", "downsample_factor", "merge_size", "merge_kernel_size"):
                value = _first(getattr(source, key, None))
                if value > 0:
                    return value
        return 2

    def _runs(self) -> bool:
        """Whether ``get_image_features`` takes one image in the current :attr:`form`; the forms tried in turn
        are the default, then for fixed-size towers ``(B, (S/P)^2, C*P*P)`` patch rows (Fuyu) and ``(B, 1, C, S, S)``
        crops (Idefics2), for grids ``(N, C, P, P)`` patches (Kimi-K2.5)."""
        image, size = self._image(0, 0)
        try:
            with torch.no_grad():
                self._features(self._batch([image], [size]))
        except (RuntimeError, ValueError, TypeError, IndexError):
            return False
        return True

    def _takes_mixed_sizes(self) -> bool:
        """Whether ``get_image_features`` takes two slices of different sizes packed in one call."""
        (a, size_a), (b, size_b) = self._image(0, 0), self._image(0, 1)
        try:
            with torch.no_grad():
                self._features(self._batch([a, b], [size_a, size_b]))
        except RuntimeError as exc:
            self.mixed_sizes_failure = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def _image(self, i: int, j: int) -> tuple[Tensor, tuple[int, int]]:
        """Image ``j`` of sample ``i``: pixels (or patch rows) and its ``(h, w)`` in pixels (patches)."""
        g = torch.Generator().manual_seed(100 * i + j)
        k = 1 + (i + j) % 2 if self.mixed_sizes else 1
        if self.mode == "fixed":
            return torch.randn(3, self.image_size, self.image_size, generator=g), (self.image_size, self.image_size)
        ch = int(getattr(self.vision, "in_channels", getattr(self.vision, "num_channels", 3)))
        if self.mode == "image_position_ids":
            return self._positioned_image(g, k)
        if self.mode == "target_sizes":
            return self._packed_slice(g, k)
        if self.mode == "image_grids":
            side = self.image_size // self.patch
            return torch.randn(side * side, ch * self.patch * self.patch, generator=g), (side, side)
        m = self._merge()
        if self.mode == "image_sizes":
            h, w = 2 * m * self.patch, 2 * m * self.patch * k
            return torch.randn(3, h, w, generator=g), (h, w)
        temporal = getattr(self.vision, "temporal_patch_size", None) or getattr(self.vision, "patch_temporal", 1)
        tp = int(temporal or 1) if self.mode == "image_grid_thw" else 1
        h, w = 2 * m, 2 * m * k
        return torch.randn(h * w, ch * tp * self.patch * self.patch, generator=g), (h, w)

    def _batch(self, images: list[Tensor], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """The pixel arguments of ``images`` in this model's form."""
        if self.mode == "fixed" and self.form == "crops":
            pixels = torch.stack(images)[:, None]
            mask = torch.ones(pixels.shape[:2], dtype=torch.bool)  # real tiles (Granite-Docling)
            return {"pixel_values": pixels, **({"pixel_attention_mask": mask} if self.pixel_mask else {})}
        if self.mode == "fixed" and self.form == "patches":
            p = self.patch
            rows = [im.unfold(1, p, p).unfold(2, p, p).permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p) for im in images]
            return {"pixel_values": torch.stack(rows)}
        if self.mode == "fixed":
            pixels = torch.stack(images)
            mask = {"pixel_attention_mask": torch.ones(pixels.shape[:1] + pixels.shape[2:], dtype=torch.bool)}
            return {"pixel_values": pixels, **(mask if self.pixel_mask else {}), **self._high_res(len(images))}
        if self.mode == "image_grid_thw":
            return self._grid_batch(images, sizes)
        if self.mode == "image_grids":
            return self._pooled_batch(images, sizes)
        if self.mode == "image_position_ids":
            return self._positioned_batch(images, sizes)
        if self.mode == "target_sizes":  # every slice of the batch packed along the width, as one row
            return {"pixel_values": torch.cat(images, dim=-1)[None], "target_sizes": torch.tensor(sizes)}
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

    def _high_res(self, n: int) -> dict[str, Any]:
        """``high_res_pixel_values``: ``n`` images at the high-resolution tower's size, where the model takes them."""
        if "high_res_pixel_values" not in self.params:
            return {}
        size = _first(getattr(getattr(self.model.config, "high_res_vision_config", None), "image_size", 0))
        if not size:
            raise NotImplementedError("the high-resolution vision config gives no image_size")
        g = torch.Generator().manual_seed(7)
        return {"high_res_pixel_values": torch.randn(n, 3, size, size, generator=g)}

    def _grid_batch(self, images: list[Tensor], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        pixels = torch.cat(images)
        if self.form == "patches":
            pixels = pixels.reshape(pixels.shape[0], -1, self.patch, self.patch)
        out = {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, h, w] for h, w in sizes])}
        if "image_merge_sizes" in self.params:
            out["image_merge_sizes"] = torch.full((len(images),), self._merge(), dtype=torch.long)
        return out

    def _pooled_batch(self, images: list[Tensor], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """Molmo2's form: one crop per image, its ``(S, S)`` patches pooled 2x2 into ``(S/2, S/2)`` tokens."""
        side = sizes[0][0]
        half = side // 2
        r, c = torch.meshgrid(torch.arange(half), torch.arange(half), indexing="ij")
        top = (2 * r * side + 2 * c).reshape(-1, 1)
        pooling = torch.cat([top, top + 1, top + side, top + side + 1], dim=1)
        return {
            "pixel_values": torch.stack(images),
            "image_token_pooling": pooling.repeat(len(images), 1),
            "image_grids": torch.tensor([[half, half, 0, 0]] * len(images)),
            "image_num_crops": torch.ones(len(images), dtype=torch.long),
        }

    def _positioned_image(self, g: torch.Generator, k: int) -> tuple[Tensor, tuple[int, int]]:
        """Gemma 4's form: an ``(h, w)`` grid of patches as ``(h*w, 3*P*P)`` rows, row-major (the image processor's
        order), ``h`` and ``w`` multiples of the tower's pooling kernel; the patches are the merged model patches
        where the config names a ``model_patch_size`` (Gemma 4 Unified: no tower, one token per model patch)."""
        merged = _first(getattr(self.vision, "model_patch_size", None))
        patch = merged or self.patch
        unit = 1 if merged else _first(getattr(self.vision, "pooling_kernel_size", None), 1)
        h, w = 2 * unit, 2 * unit * k
        return torch.rand(h * w, 3 * patch * patch, generator=g), (h, w)

    def _positioned_batch(self, images: list[Tensor], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """``pixel_values`` ``(N, max_patches, 3*P*P)`` zero-padded and ``image_position_ids`` ``(N, max_patches, 2)``
        holding each patch's ``(x, y)``, ``(-1, -1)`` on padding, as Gemma 4's image processor pads them."""
        most = max(im.shape[0] for im in images)
        pixels = torch.zeros(len(images), most, images[0].shape[1])
        positions = torch.full((len(images), most, 2), -1, dtype=torch.long)
        for n, (im, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            pixels[n, : im.shape[0]] = im
            positions[n, : im.shape[0]] = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)
        return {"pixel_values": pixels, "image_position_ids": positions}

    def _packed_slice(self, g: torch.Generator, k: int) -> tuple[Tensor, tuple[int, int]]:
        """MiniCPM-V's form: one slice of ``(8, 8k)`` patches (divisible by its 2x2 window merger and 2x2 merger
        in the ``16x`` mode) NaViT-packed as ``(3, P, h*w*P)``, its patches row-major along the width, as the
        image processor's ``reshape_by_patch`` packs them."""
        p = self.patch
        h, w = 8, 8 * k
        image = torch.rand(3, h * p, w * p, generator=g)
        packed = image.reshape(3, h, p, w, p).permute(0, 2, 1, 3, 4).reshape(3, p, h * w * p)
        return packed, (h, w)

    def _features(self, kw: dict[str, Any]) -> Any:
        """``get_image_features`` on a batch of :meth:`_batch`, its ``pixel_values`` under the method's own name."""
        if "pixel_values" in kw and self.pixels_in != "pixel_values":
            kw = {self.pixels_in if k == "pixel_values" else k: v for k, v in kw.items()}
        return self.vlm.get_image_features(**kw)

    def _counts(self, kw: dict[str, Any], n_images: int) -> list[int]:
        from tokenprune.adapters.base import ImageCall

        with torch.no_grad():
            out = self._features(kw)
        feats = ImageCall((), kw, out).features()
        if len(feats) != n_images:
            raise NotImplementedError(f"get_image_features gave {len(feats)} feature tensors for {n_images} images")
        return [int(f.shape[0]) for f in feats]

    def _placeholders(self, count: int) -> list[int]:
        ids = [self.image_token] * count
        return [self.open, *ids, self.close] if self.open is not None else ids

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
                ids += [*self._placeholders(counts[n]), t[(i + 50) % len(t)]]
                n += 1
            rows.append(ids + [t[(3 * i + 11 * j + 100) % len(t)] for j in range(4 + i % 2)])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :] = torch.tensor(r)
            mask[b, width - len(r) :] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, **pixels}
        if "pixel_values" in out and self.pixels_as:  # the forward names them otherwise (Fuyu, Video-LLaVA: 5.18)
            out[self.pixels_as] = out.pop("pixel_values")
        if self.mm_types:
            out["mm_token_type_ids"] = (ids == self.image_token).long()
        return out
