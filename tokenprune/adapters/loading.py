"""Load a VLM and its processor the way every command does: a hub id, a local folder, or the bundled one."""

from __future__ import annotations

import inspect
from collections.abc import MutableMapping, Sequence
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
        processor = _processor(AutoProcessor, path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise TokenpruneError(f"could not load model {spec!r}: {exc}") from exc
    return model.to(device).eval(), processor


def _processor(auto: Any, path: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(path)``; where it needs torchvision (a family whose processor builds a video
    processor), a :class:`~tokenprune.bench.video_inputs.FramesProcessor`: the tokenizer and image processor, and
    the family's own processor built without its video processor for prompts with images (:func:`images_only`)."""
    try:
        return auto.from_pretrained(path)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
    from transformers import AutoImageProcessor, AutoTokenizer

    from tokenprune.bench.video_inputs import FramesProcessor

    tokenizer, image_processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    return FramesProcessor(tokenizer, image_processor, images=images_only(path, tokenizer, image_processor))


def load_processor(spec: str | Path) -> Any:
    """The processor of a local folder or hub id as :func:`load_model` loads it (see :func:`_processor`)."""
    from transformers import AutoProcessor

    return _processor(AutoProcessor, spec)


def images_only(path: str | Path, tokenizer: Any, image_processor: Any) -> Any:
    """The checkpoint's own processor class built from ``tokenizer`` and ``image_processor`` alone, its other parts
    (the video processor, whose classes need torchvision; an audio feature extractor) left ``None``: prompts with
    images expand their placeholders as the full processor does. ``None`` where the class cannot be built so, or
    ``path`` is no local folder (a hub id: its processor class is not looked up).

    transformers checks every part's class against a base class that does not exist without torchvision
    (``VideoProcessorMixin``), so the check is skipped for the parts left ``None``, on this instance only.
    """
    cls = _processor_class(path)
    if cls is None:
        return None
    try:
        saved, _ = cls.get_processor_dict(path)
        params = inspect.signature(cls.__init__).parameters
        attributes = cls.get_attributes()
        parts = {
            a: tokenizer if a == "tokenizer" else image_processor if a == "image_processor" else None
            for a in attributes
        }
        kwargs = {k: v for k, v in saved.items() if k in params and k not in attributes}
        processor = cls.__new__(cls)
        check = cls.check_argument_for_proper_class
        processor.check_argument_for_proper_class = lambda name, arg: (
            None if arg is None else check(processor, name, arg)
        )
        cls.__init__(processor, **parts, **kwargs)
        del processor.check_argument_for_proper_class
    except (TypeError, ValueError, AttributeError, KeyError, OSError, ImportError):
        return None
    return processor


def _processor_class(path: str | Path) -> type | None:
    """The processor class a checkpoint names (``processor_config.json``), else its model type's in transformers'
    processor mapping; ``None`` where neither names one."""
    import json

    import transformers

    from tokenprune.engine.compat import processor_class_name

    folder = Path(path)
    name = None
    if (folder / "processor_config.json").is_file():
        name = json.loads((folder / "processor_config.json").read_text()).get("processor_class")
    if name is None and (folder / "config.json").is_file():
        name = processor_class_name(json.loads((folder / "config.json").read_text()).get("model_type"))
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else None


def build_inputs(
    processor: Any,
    image: Any,
    prompt: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    video: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Processor inputs for one prompt with one PIL image and/or one video (its frames as PIL images).

    The placeholders (``<image>``, ``<video>``: the processor's own tokens) are prepended when missing.

    Raises:
        TokenpruneError: neither an image nor a video, or a video without torchvision (transformers' video
            processors need it).
    """
    if image is None and not video:
        raise TokenpruneError("build_inputs needs an image or a video")
    text, kwargs = prompt, {}
    if video:
        text, kwargs["videos"] = _with_placeholder(processor, "video", text), [list(video)]
    if image is not None:
        text, kwargs["images"] = _with_placeholder(processor, "image", text), image
    try:
        inputs = processor(text=text, return_tensors="pt", **kwargs)
    except ImportError as exc:
        if video and "torchvision" in str(exc).lower():
            raise TokenpruneError(
                "video input needs torchvision: transformers' video processors use it; install the torchvision "
                "release that matches your torch"
            ) from None
        raise
    out = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in inputs.items()}
    return out if dtype is None else floats_to(out, dtype)


def floats_to(inputs: MutableMapping[str, Any], dtype: torch.dtype) -> MutableMapping[str, Any]:
    """``inputs`` with every floating-point tensor in ``dtype`` (in place; integer ids and masks kept).

    Every pixel input of a processor's output, whatever the family names it (``pixel_values``,
    ``pixel_values_videos``, transformers 5.18's ``pixel_values_images`` of Video-LLaVA), as
    ``BatchFeature.to(dtype)`` does.
    """
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            inputs[key] = value.to(dtype)
    return inputs


def _with_placeholder(processor: Any, kind: str, text: str) -> str:
    """``text`` with the processor's ``<image>`` / ``<video>`` token prepended, unless it holds one already (an image
    token between the image markers where the processor wants them: :func:`image_placeholder`)."""
    token = getattr(processor, f"{kind}_token", None) or f"<{kind}>"
    if token in text:
        return text
    return f"{image_placeholder(processor) if kind == 'image' else token}\n{text}"


def image_placeholder(processor: Any) -> str:
    """The text of one image in a prompt: the processor's image token, between the image start and end markers
    where the processor (or its tokenizer) names them and does not write them itself. Qwen-VL's chat template
    writes ``<|vision_start|><|image_pad|><|vision_end|>`` and the processor expands only the pad; the model
    finds each image by its start marker (two images without markers read as one)."""
    from PIL import Image

    token = getattr(processor, "image_token", None) or "<image>"
    tokenizer = getattr(processor, "tokenizer", None)
    sources = [s for s in (processor, getattr(processor, "images", None), tokenizer) if s is not None]
    for prefix in ("vision", "image"):
        start, end = (
            next((v for s in sources if isinstance(v := getattr(s, f"{prefix}_{edge}_token", None), str)), None)
            for edge in ("start", "end")
        )
        if start and end and tokenizer is not None:
            probe = processor(text=token, images=Image.new("RGB", (64, 64)), return_tensors="pt")
            written = tokenizer.convert_tokens_to_ids(start) in probe["input_ids"][0].tolist()
            return token if written else f"{start}{token}{end}"
    return token


def load_frames(path: Path) -> list[Any]:
    """The frames of a video given as a folder of images (in name order) or a multi-frame image file
    (GIF, animated WebP or PNG, multi-page TIFF), as RGB PIL images.

    Raises:
        TokenpruneError: the path does not exist, holds no image, or cannot be read as images.
    """
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
        if not files:
            raise TokenpruneError(f"video folder {str(path)!r} holds no image ({', '.join(_FRAME_SUFFIXES)})")
        frames = []
        for f in files:
            with Image.open(f) as im:
                frames.append(im.convert("RGB"))
        return frames
    if not path.is_file():
        raise TokenpruneError(f"video {str(path)!r} does not exist: give a folder of frames or a multi-frame image")
    try:
        with Image.open(path) as im:
            return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]
    except UnidentifiedImageError:
        raise TokenpruneError(
            f"video {str(path)!r} is not an image file; give a folder of frames or a GIF / animated WebP / TIFF "
            "(video containers such as MP4 are not decoded: extract the frames first)"
        ) from None


_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id: absolute, relative to ``.``/``..``/``~``, or with backslashes."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec in (".", "..")
