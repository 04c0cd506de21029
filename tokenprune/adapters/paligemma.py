"""PaliGemma: the image tokens come first, then the prompt; prefix-LM attention.

With ``token_type_ids`` the prompt (image plus text prefix) attends bidirectionally; the engine
slices the model's own 4-D prefill mask, so the kept tokens keep that structure. Generated tokens
are the causal suffix (``generate`` extends ``token_type_ids`` with ones).
"""

from __future__ import annotations

from tokenprune.adapters.base import ModelAdapter


class PaliGemmaAdapter(ModelAdapter):
    """PaliGemma: a square grid per image, Gemma LM, prefix-LM masks sliced."""

    name = "paligemma"
    model_types = ("paligemma",)
    notes = "prefix-LM masks are sliced, so kept tokens keep bidirectional prefix attention"
