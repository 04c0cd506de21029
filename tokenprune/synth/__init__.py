"""SynthVQA and the bundled mini VLM: offline quality measurement for token reduction.

``bundled_model_path()`` is the directory of the shipped checkpoint (a stock
``LlavaNextForConditionalGeneration`` with its processor); ``load_bundled()`` loads both.
Importing this package imports nothing heavy; torch and transformers load on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

__all__ = ["bundled_model_path", "load_bundled", "load_model"]


def bundled_model_path() -> Path:
    """Directory of the shipped mini VLM checkpoint (config, safetensors, tokenizer, processor)."""
    path = Path(__file__).resolve().parent / "checkpoint"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the bundled mini VLM is missing from {path}; reinstall tokenprune, or train one with "
            "`tokenprune synth train RUN_DIR --install <that directory>`"
        )
    return path


def load_model(path: str | Path) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Load a saved mini VLM and its processor from ``path`` (eval mode, sdpa attention)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    processor = LlavaNextProcessor.from_pretrained(path)
    return model, processor


def load_bundled() -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """The shipped mini VLM and its processor."""
    return load_model(bundled_model_path())
