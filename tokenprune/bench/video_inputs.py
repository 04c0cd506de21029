"""Video inputs for a comparison without torchvision: frames through the project's own preprocessing.

transformers' video processors need torchvision, whose wheels on the package index need a CUDA torch;
this module builds a batch's video inputs itself, for the families whose videos are a ``(videos, frames, 3,
S, S)`` tensor of normalised square frames (``pixel_values_videos``: LLaVA-OneVision, LLaVA-NeXT-Video):

1. every frame resized to the tower's ``image_size`` (bicubic), rescaled and normalised with the image
   processor's ``rescale_factor``, ``image_mean`` and ``image_std`` (the numbers the family's video processor
   uses; LLaVA-NeXT-Video's shortest-edge resize and centre crop are a plain resize here);
2. the prompt's one video placeholder per video expanded to as many tokens as the model's own
   ``get_video_features`` returns for that video (its pooling and newline included), so the count is the
   model's whatever the family.

Families that take videos otherwise (Qwen2-VL's patch sequences and ``video_grid_thw``) are refused by name.
Where the family's transformers processor cannot even be built without torchvision (LLaVA-OneVision's and
LLaVA-NeXT-Video's construct their video processor), :func:`tokenprune.adapters.loading.load_model` falls back to
:class:`FramesProcessor`: the tokenizer and the image processor, for prompts with videos and no images, and the
family's processor built without its video processor, for prompts with images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from tokenprune.errors import TokenpruneError


class FramesProcessor:
    """The checkpoint's tokenizer and image processor, standing in for a processor that needs torchvision.

    It tokenises prompts (the ``<image>`` / ``<video>`` placeholders stay single tokens; the harness expands the
    videos' through :func:`expand_video_tokens`) and carries the image processor whose normalisation
    :func:`video_pixels` applies to the frames. Prompts with images go to ``images``, the family's own processor
    built without its video processor (:func:`tokenprune.adapters.loading.images_only`); without one they are
    refused: expanding their placeholders is the family's processor's work.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, images: Any = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.images = images
        self.image_token = getattr(images, "image_token", None) or getattr(tokenizer, "image_token", None) or "<image>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<video>"

    def __call__(self, text: Any = None, images: Any = None, **kwargs: Any) -> Any:
        """Tokenise ``text``; with ``images``, the family's processor (:attr:`images`) expands them.

        Raises:
            TokenpruneError: ``videos`` are given (this stand-in cannot expand them: the harness prepares frames
                itself, see :func:`video_pixels`), or images where the family's processor could not be built.
        """
        if kwargs.get("videos"):
            raise TokenpruneError(
                "video input needs torchvision: this checkpoint's processor builds its video processor with it, so "
                "tokenprune loaded only its tokenizer and image processor (the comparison harness prepares the frames "
                "of LLaVA-OneVision and LLaVA-NeXT-Video itself); install the torchvision release that matches your "
                "torch"
            )
        if images and self.images is None:
            raise TokenpruneError(
                "this checkpoint's processor needs torchvision (transformers builds its video processor with it), so "
                "tokenprune loaded only its tokenizer and image processor: prompts with images need the family's "
                "processor (install torchvision matching your torch)"
            )
        if images:
            return self.images(text=text, images=images, **kwargs)
        return self.tokenizer(text, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)


def video_pixels(processor: Any, model: nn.Module, videos: Sequence[Sequence[Image.Image]]) -> Tensor:
    """``(V, F, 3, S, S)`` float32 frames of ``videos`` (every video as many frames), as the model's tower takes them.

    Raises:
        TokenpruneError: the model takes no ``pixel_values_videos``, or the videos differ in frame count.
    """
    vlm = getattr(model, "model", model)
    if not hasattr(vlm, "get_video_features") or "grid" in str(_video_argument(vlm)):
        raise TokenpruneError(
            f"{type(model).__name__}: video examples are built here for models that take frames as "
            "pixel_values_videos (LLaVA-OneVision, LLaVA-NeXT-Video); this family's video input is not supported"
        )
    frames = {len(v) for v in videos}
    if len(frames) > 1:
        raise TokenpruneError(
            f"the videos of one batch hold {sorted(frames)} frames; every video of a batch must hold as many "
            "(sample them to one count, or set batch_size: 1)"
        )
    size = int(model.config.vision_config.image_size)
    ip = getattr(processor, "image_processor", processor)
    scale = float(getattr(ip, "rescale_factor", 1 / 255))
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(3, 1, 1)

    def frame(im: Image.Image) -> Tensor:
        pixels = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        return (torch.from_numpy(pixels).permute(2, 0, 1) * scale - mean) / std

    return torch.stack([torch.stack([frame(im) for im in video]) for video in videos])


def _video_argument(vlm: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(vlm.get_video_features).parameters)


def video_token_counts(model: nn.Module, pixels: Tensor) -> list[int]:
    """Tokens each video of ``pixels`` becomes in the language model's input (the model's own features)."""
    vlm = getattr(model, "model", model)
    with torch.no_grad():
        out = vlm.get_video_features(pixel_values_videos=pixels.to(model.device, model.dtype))
    feats = getattr(out, "pooler_output", out)
    return [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in feats]


def expand_video_tokens(inputs: Any, video_token: int, counts: list[int], pad: int) -> None:
    """Repeat each video placeholder of ``inputs["input_ids"]`` to its count (in place; rows left-padded again)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows, k = [], 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()].tolist()
        out: list[int] = []
        for token in row:
            if token == video_token:
                if k >= len(counts):
                    raise TokenpruneError(f"the prompts hold more video placeholders than the {len(counts)} videos")
                out += [video_token] * counts[k]
                k += 1
            else:
                out.append(token)
        rows.append(out)
    if k != len(counts):
        raise TokenpruneError(f"the prompts hold {k} video placeholders for {len(counts)} videos")
    width = max(len(r) for r in rows)
    inputs["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=ids.dtype)
    inputs["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=mask.dtype)
