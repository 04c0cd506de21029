"""Tiny random checkpoints saved with a processor that works with them: what ``tokenprune run`` and ``check`` load.

:func:`save_tiny_checkpoint` writes into a folder the census's tiny random model of a model type
(:func:`~tokenprune.testing.tiny_configs.build_tiny`) and its family's processor: a word-level tokenizer built
in code (no hub) holding the family's special tokens at the config's ids (placeholders, image start and end
markers, bos/eos/pad), and the family's own torchvision-free (``...Pil``) image processor sized for the tiny
tower (patch size, merge size, image size). ``AutoModelForImageTextToText.from_pretrained(folder)`` loads the
model and :func:`tokenprune.adapters.loading.load_processor` the processor (``AutoProcessor`` itself where the
family's processor has no video processor, whose classes need torchvision).

Families (:data:`RECIPES`) are added one recipe each; :data:`NOT_BUILT` names the families whose processor
cannot be built here, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers

from tokenprune.engine import compat
from tokenprune.testing.tiny_configs import VOCAB, build_tiny

#: Words of the prompts the tests ask; every other token of the vocabulary is ``w<id>``.
WORDS = ("describe", "the", "picture", "in", "detail", "what", "is", "this", "?")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one family's processor is built.

    Attributes:
        tokens: Config attribute (on the top config, else the text config) -> the token that id stands for.
        named: Tokenizer attribute (``image_token``, ``vision_start_token``, ...) -> token, for the processor.
        image_processor: The image processor for the tiny model's config.
        processor_kwargs: Keyword arguments of the processor class for the tiny model's config.
        more: Further special tokens the processor writes (no config id names them), given free ids.
    """

    tokens: dict[str, str]
    named: dict[str, str]
    image_processor: Callable[[Any], Any]
    processor_kwargs: Callable[[Any], dict[str, Any]] = lambda cfg: {}
    more: tuple[str, ...] = ()


def _grid_processor(name: str) -> Callable[[Any], Any]:
    """A Qwen2-VL-style patch-grid image processor (``image_grid_thw``) at the tower's patch and merge sizes,
    images resized to between 2x2 and 6x6 merged patches."""

    def build(cfg: Any) -> Any:
        vision = cfg.vision_config
        patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
        unit = (patch * merge) ** 2
        return getattr(transformers, name)(
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=int(getattr(vision, "temporal_patch_size", None) or 1),
            size={"shortest_edge": 4 * unit, "longest_edge": 36 * unit},
        )

    return build


QWEN_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

GLM_TOKENS = {
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "image_start_token_id": "<|begin_of_image|>",
    "image_end_token_id": "<|end_of_image|>",
    "video_start_token_id": "<|begin_of_video|>",
    "video_end_token_id": "<|end_of_video|>",
}
ERNIE_TOKENS = {
    "image_token_id": "<|IMAGE_PLACEHOLDER|>",
    "video_token_id": "<|VIDEO_PLACEHOLDER|>",
    "image_start_token_id": "<|IMAGE_START|>",
    "image_end_token_id": "<|IMAGE_END|>",
    "video_start_token_id": "<|VIDEO_START|>",
    "video_end_token_id": "<|VIDEO_END|>",
}
PADDLE_TOKENS = {
    "image_token_id": "<|IMAGE_PLACEHOLDER|>",
    "video_token_id": "<|VIDEO_PLACEHOLDER|>",
    "vision_start_token_id": "<|IMAGE_START|>",
    "vision_end_token_id": "<|IMAGE_END|>",
}
GEMMA4_TOKENS = {
    "boi_token_id": "<|image>",
    "eoi_token_id": "<image|>",
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "audio_token_id": "<|audio|>",
    "boa_token_id": "<|audio>",
    "eoa_token_index": "<audio|>",
}


def _named(tokens: dict[str, str]) -> dict[str, str]:
    """``image_token_id`` -> ``image_token``: the tokenizer attributes the processors read."""
    return {k.removesuffix("_id"): v for k, v in tokens.items()}


def _gemma4_processor(cfg: Any) -> Any:
    """Gemma 4's aspect-preserving patcher at the tower's patch and pooling sizes, 70 soft tokens at most."""
    vision = cfg.vision_config
    return transformers.Gemma4ImageProcessorPil(
        patch_size=int(vision.patch_size), pooling_kernel_size=int(vision.pooling_kernel_size), max_soft_tokens=70
    )


def _square_processor(name: str) -> Callable[[Any], Any]:
    """A fixed-size (CLIP-style) image processor at the tower's ``image_size``."""

    def build(cfg: Any) -> Any:
        side = int(cfg.vision_config.image_size)
        square = {"height": side, "width": side}
        return getattr(transformers, name)(size={"shortest_edge": side}, crop_size=square)

    return build


def _aya_processor(cfg: Any) -> Any:
    """GOT-OCR2's tiler at the tower's ``image_size``: the global view plus up to 2 crops."""
    side = int(cfg.vision_config.image_size)
    return transformers.GotOcr2ImageProcessorPil(
        size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=2
    )


def _aya_kwargs(cfg: Any) -> dict[str, Any]:
    vision = cfg.vision_config
    return {
        "patch_size": int(vision.patch_size),
        "img_size": int(vision.image_size),
        "downsample_factor": int(cfg.downsample_factor),
    }


def _video_llava_kwargs(cfg: Any) -> dict[str, Any]:
    return {
        "patch_size": int(cfg.vision_config.patch_size),
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,
    }


RECIPES: dict[str, Recipe] = {
    "qwen3_5": Recipe(QWEN_TOKENS, _named(QWEN_TOKENS), _grid_processor("Qwen2VLImageProcessorPil")),
    "glm4v": Recipe(GLM_TOKENS, _named(GLM_TOKENS), _grid_processor("Glm4vImageProcessorPil")),
    "ernie4_5_vl_moe": Recipe(ERNIE_TOKENS, _named(ERNIE_TOKENS), _grid_processor("Ernie4_5_VLMoeImageProcessorPil")),
    "paddleocr_vl": Recipe(PADDLE_TOKENS, _named(PADDLE_TOKENS), _grid_processor("PaddleOCRVLImageProcessorPil")),
    "gemma4": Recipe(
        GEMMA4_TOKENS,
        {  # Gemma4Processor.validate_inputs wants the audio markers even for images
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
        _gemma4_processor,
    ),
    "aya_vision": Recipe(
        {"image_token_index": "<|IMG_PATCH|>"},
        {"image_token": "<image>"},
        _aya_processor,
        _aya_kwargs,
        more=("<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "TILE_1", "TILE_2", "TILE_GLOBAL"),
    ),
    "video_llava": Recipe(
        {"image_token_index": "<image>", "video_token_index": "<video>"},
        {"image_token": "<image>", "video_token": "<video>"},
        _square_processor("VideoLlavaImageProcessor"),
        _video_llava_kwargs,
    ),
}

#: Families whose processor cannot be built without torchvision (their image processor has no ``...Pil`` class).
NOT_BUILT = {
    t: f"its image processor ({c}) exists only as a torchvision class in transformers, and torchvision is no test "
    "dependency (its wheels on the index are built for a CUDA torch)"
    for t, c in {
        "lfm2_vl": "Lfm2VlImageProcessor",
        "llama4": "Llama4ImageProcessor",
        "molmo2": "Molmo2ImageProcessor",
        "cohere2_vision": "Cohere2VisionImageProcessor",
    }.items()
}


def _config_id(cfg: Any, key: str) -> int | None:
    for source in (cfg, cfg.get_text_config()):
        value = getattr(source, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _dedicated_tokenizer(model_type: str) -> type | None:
    """The family's own tokenizer class, where transformers maps the type to one (``AutoTokenizer`` then loads the
    saved tokenizer with it, rebuilding the model from the vocabulary with the class's own pre-tokenizer)."""
    name = compat.tokenizer_class_name(model_type)
    if name in (None, "TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend"):
        return None
    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) else None


def _vocabulary(cfg: Any, recipe: Recipe, words: list[str]) -> dict[str, int]:
    """The recipe's special tokens at the config's ids, ``<pad>``/``<eos>``/``<bos>``/``<unk>`` at the text config's
    ids (else the first free ones), then ``words``, then ``w<id>`` fillers up to :data:`VOCAB`."""
    vocab: dict[str, int] = {}
    for key, token in recipe.tokens.items():
        found = _config_id(cfg, key)
        if found is None:
            raise ValueError(f"{cfg.model_type}: the config has no {key} for {token}")
        vocab[token] = found
    basics = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
    for kind, token in basics.items():
        found = _config_id(cfg, f"{kind}_token_id")
        if found is not None and found not in vocab.values():
            vocab[token] = found
    taken = set(vocab.values())
    free = iter([i for i in range(VOCAB) if i not in taken])
    for token in [t for t in [*basics.values(), *recipe.more, *words] if t not in vocab]:
        vocab[token] = next(free)
    vocab.update({f"w{i}": i for i in free})
    return vocab


def build_tokenizer(cfg: Any, recipe: Recipe) -> Any:
    """A tokenizer of :data:`VOCAB` tokens holding the recipe's special tokens at the config's ids (see
    :func:`_vocabulary`): word-level (text split on whitespace) as a ``PreTrainedTokenizerFast``, or where the
    family has its own tokenizer class, that class over a merge-free BPE vocabulary holding the characters of
    :data:`WORDS` as its pre-tokenizer gives them (``Ġthe`` -> ``Ġ``, ``t``, ``h``, ``e``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    extra = {"extra_special_tokens": dict(recipe.named)}
    others = sorted({*recipe.tokens.values(), *recipe.more} - set(recipe.named.values()))
    dedicated = _dedicated_tokenizer(cfg.model_type)
    if dedicated is not None:
        probe = dedicated(vocab={"<unk>": 0}, merges=[], unk_token="<unk>")
        pieces = probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" " + " ".join(WORDS))
        chars = sorted({c for piece, _ in pieces for c in piece})
        tokenizer = dedicated(vocab=_vocabulary(cfg, recipe, chars), merges=[], **names, **extra)
    else:
        tok = Tokenizer(models.WordLevel(vocab=_vocabulary(cfg, recipe, list(WORDS)), unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names, **extra)
    if others:
        tokenizer.add_special_tokens({"additional_special_tokens": others})
    return tokenizer


def save_tiny_checkpoint(model_type: str, folder: str | Path, seed: int = 0) -> Path:
    """Save ``model_type``'s tiny random model and a processor that works with it into ``folder``.

    Raises:
        KeyError: no recipe for the type (:data:`NOT_BUILT` names why, where the processor cannot be built).
    """
    from tokenprune.adapters.loading import images_only

    if model_type not in RECIPES:
        why = NOT_BUILT.get(model_type, "no recipe for it in tokenprune.testing.tiny_checkpoints.RECIPES")
        raise KeyError(f"no tiny checkpoint of {model_type!r}: {why}")
    recipe = RECIPES[model_type]
    folder = Path(folder)
    model = build_tiny(model_type, seed=seed)
    model.save_pretrained(folder)
    tokenizer = build_tokenizer(model.config, recipe)
    image_processor = recipe.image_processor(model.config)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    cls = getattr(transformers, compat.processor_class_name(model_type))
    saved = {"processor_class": cls.__name__, **recipe.processor_kwargs(model.config)}
    (folder / "processor_config.json").write_text(json.dumps(saved, indent=2))
    if images_only(folder, tokenizer, image_processor) is None:
        raise ValueError(f"{model_type}: {cls.__name__} cannot be built from the saved tokenizer and image processor")
    return folder


__all__ = ["NOT_BUILT", "RECIPES", "Recipe", "build_tokenizer", "save_tiny_checkpoint"]
