"""The mini VLM: a stock ``LlavaNextForConditionalGeneration`` sized for CPU training.

Nothing here subclasses or patches transformers: :func:`build_config` returns a plain
``LlavaNextConfig`` (CLIP vision tower, 2-layer GELU projector, Llama LM) and the saved checkpoint
loads with ``LlavaNextForConditionalGeneration.from_pretrained(path)`` anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from tokenprune.synth.processor import GRID_PINPOINTS, PATCH, TILE
from tokenprune.synth.tokenizer import IMAGE_TOKEN_ID, SPECIAL_TOKENS, vocabulary


@dataclass(frozen=True)
class MiniVLMSize:
    """The size knobs of the mini VLM (the defaults are the shipped model's)."""

    vision_hidden: int = 128
    """Width of the CLIP tower's hidden states (also its ``projection_dim``)."""
    vision_layers: int = 3
    """Encoder layers of the CLIP tower."""
    vision_heads: int = 4
    """Attention heads of each tower layer."""
    vision_ffn: int = 384
    """Intermediate width of each tower layer's MLP."""
    text_hidden: int = 128
    """Width of the Llama language model's hidden states."""
    text_layers: int = 4
    """Decoder layers of the language model."""
    text_heads: int = 4
    """Attention heads (and key/value heads) of each decoder layer."""
    text_ffn: int = 384
    """Intermediate width of each decoder layer's MLP."""
    vocab_size: int = 64
    """Rows of the embedding table: at least the SynthVQA vocabulary."""


#: A model small enough for unit tests (a training step takes milliseconds).
TINY = MiniVLMSize(
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_ffn=64,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    text_ffn=64,
)


def build_config(size: MiniVLMSize | None = None) -> LlavaNextConfig:
    """The ``LlavaNextConfig`` of a mini VLM of the given size (default: the shipped size)."""
    s = size or MiniVLMSize()
    n_vocab = len(vocabulary())
    if s.vocab_size < n_vocab:
        raise ValueError(f"vocab_size={s.vocab_size} is smaller than the SynthVQA vocabulary ({n_vocab})")
    cfg = LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": s.vision_hidden,
            "intermediate_size": s.vision_ffn,
            "num_hidden_layers": s.vision_layers,
            "num_attention_heads": s.vision_heads,
            "image_size": TILE,
            "patch_size": PATCH,
            "hidden_act": "quick_gelu",
            "projection_dim": s.vision_hidden,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": s.text_hidden,
            "intermediate_size": s.text_ffn,
            "num_hidden_layers": s.text_layers,
            "num_attention_heads": s.text_heads,
            "num_key_value_heads": s.text_heads,
            "vocab_size": s.vocab_size,
            "max_position_embeddings": 1024,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "pad_token_id": SPECIAL_TOKENS.index("<pad>"),
            "bos_token_id": SPECIAL_TOKENS.index("<s>"),
            "eos_token_id": SPECIAL_TOKENS.index("</s>"),
        },
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    cfg.synth_size = asdict(s)
    return cfg


def build_model(size: MiniVLMSize | None = None, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """A randomly initialised mini VLM (sdpa attention); ``seed`` fixes the initial weights."""
    import torch

    torch.manual_seed(seed)
    cfg = build_config(size)
    cfg._attn_implementation = "sdpa"
    return LlavaNextForConditionalGeneration(cfg)
