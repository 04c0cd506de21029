"""Inputs for the census's tiny models: ``make_inputs(specs, start=0)`` built from ``get_image_features``' arguments."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.testing.tiny_configs import VOCAB


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
