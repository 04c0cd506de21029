"""The ``fastervlm`` reducer: keep the visual tokens the vision tower's [CLS] token attends to most.

FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
https://arxiv.org/abs/2412.01818; official code github.com/Theia-4869/FasterVLM,
``clip_encoder.py`` ``feature_select`` and ``llava_arch.py`` ``encode_images``): the attention of the
[CLS] query row inside the vision layer that produces the image features, averaged over heads,
re-ranks the patches; the top ones survive, before the language model sees any of them.
"""

from __future__ import annotations

from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ScoringReducer
from tokenprune.errors import ReducerInputError
from tokenprune.reducer import VisionAttentionParams


class FasterVLM(ScoringReducer):
    """Keep the ``budget`` tokens with the highest vision-encoder [CLS] attention (``ctx.vision_attention``).

    The score is computed by the engine's vision probe at the layer the model takes its features from
    (LLaVA's ``vision_feature_layer``, ``-2``), the [CLS] query's row averaged over heads; a token built
    from several patches (Qwen2-VL's 2x2 merge) holds the mean of their scores. ``attention: mean``
    ranks by the attention each patch receives instead, for towers without a CLS token (SigLIP,
    Qwen2-VL). Tokens built from no patch (newlines) rank last; protected ones are kept anyway.
    """

    name = "fastervlm"
    capabilities = Capabilities(
        insertion_points=frozenset({"post_projector"}), vision_attention=frozenset({"cls", "mean"})
    )

    class Params(VisionAttentionParams):
        """The vision attention and its layer (paper defaults: ``cls`` at the features layer)."""

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)``: ``ctx.vision_attention`` (``-inf`` at tokens with no patch)."""
        if ctx.vision_attention is None:
            raise ReducerInputError(
                f"reducer {self.name!r} needs ctx.vision_attention; run it at post_projector through tokenprune.apply"
            )
        return ctx.vision_attention


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(FasterVLM)
