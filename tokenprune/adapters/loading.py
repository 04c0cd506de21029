"""Load a VLM and its processor the way every command does: a hub id, a local folder, or the bundled one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.errors import TokenpruneError

BUNDLED = "bundled"


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """``AutoModelForImageTextToText`` and ``AutoProcessor`` via ``from_pretrained``, sdpa attention, eval mode.

    Args:
        spec: ``"bundled"`` (the shipped mini VLM), a local folder, or a hub id.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
        device: Where to put the model.

    Raises:
        TokenpruneError: the model or processor could not be loaded (the message says why).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if spec == BUNDLED:
        from tokenprune.synth import bundled_model_path

        path: str | Path = bundled_model_path()
    else:
        path = spec
        if _looks_local(spec) and not Path(spec).expanduser().is_dir():
            raise TokenpruneError(
                f"could not load model {spec!r}: no such folder (a local model is a folder written by "
                "save_pretrained; 'bundled' is the shipped mini VLM; anything else is read as a hub id)"
            )
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise TokenpruneError(f"could not load model {spec!r}: {exc}") from exc
    return model.to(device).eval(), processor


def build_inputs(
    processor: Any, image: Any, prompt: str, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Processor inputs for one PIL image and one prompt; the image placeholder is prepended if missing."""
    token = getattr(processor, "image_token", None) or "<image>"
    text = prompt if token in prompt else f"{token}\n{prompt}"
    inputs = processor(images=image, text=text, return_tensors="pt")
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id: absolute, relative to ``.``/``..``/``~``, or with backslashes."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec in (".", "..")
