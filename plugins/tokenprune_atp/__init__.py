"""The ``atp`` reducer: ATP-LLaVA's learned, instance-adaptive pruning, with hard masks at inference.

ATP-LLaVA (Ye, Gan, Ge, Zhang, Tang; CVPR 2025; https://arxiv.org/abs/2412.00447). There is no
official code; this is the project's reading of the paper, documented in ``docs/reducers/atp.md``.
The weights come from ``tokenprune train-atp`` (:mod:`tokenprune_atp.trainer`).

A pipeline runs one stage per ATP module; every stage points at the same weights file, and each
picks the module trained for its own layer::

    stages:
      - {at: {layer: 1}, reducer: atp, keep: 1.0, params: {weights: runs/atp/atp.safetensors}}
      - {at: {layer: 2}, reducer: atp, keep: 1.0, params: {weights: runs/atp/atp.safetensors}}
      - {at: {layer: 3}, reducer: atp, keep: 1.0, params: {weights: runs/atp/atp.safetensors}}

(:func:`atp_pipeline` writes this for a weights file.) ``keep`` is a cap: ATP keeps what its
thresholds pass, never more than the stage's budget. Packaged exactly as a third-party plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer
from pydantic import Field, field_validator
from torch import Tensor

import tokenprune
from tokenprune import (
    Capabilities,
    InsertionPoint,
    ReduceContext,
    ReducerInputError,
    ReducerParams,
    Selection,
    TokenReducer,
)
from tokenprune.engine.soft import SoftKeep
from tokenprune.reducer import top_k_selection
from tokenprune.validation import check_finite_tokens, required_attention
from tokenprune_atp.scores import pooled_states, redundancy_scores, score_statistics, spatial_scores
from tokenprune_atp.weights import (
    WEIGHTS_FILE,
    ATPConfig,
    ATPHead,
    ATPWeights,
    ATPWeightsError,
    default_layers,
    load_atp,
    weights_file,
)


class ATP(TokenReducer):
    """Keep the visual tokens whose redundancy or spatial score clears a per-instance learned threshold.

    At ``{layer: k}``, with the probe's attention of layer ``k - 1``:

    1. ``S_red``: the percentile rank, among the unprotected tokens, of the mean of the attention
       each token receives from the visual tokens and from the text tokens
       (:func:`~tokenprune_atp.scores.redundancy_scores`);
    2. ``S_sp``: ``1 - λ / s²`` for the coarsest uniform sampling grid (stride ``s``) the token lies
       on in its view (:func:`~tokenprune_atp.scores.spatial_scores`; 0 without a layout);
    3. the module's head maps score statistics and the pooled hidden states to ``(θ_r, θ_s)``;
    4. keep ``(S_red > θ_r) or (S_sp > θ_s)``, plus every protected token. If more than the stage's
       budget pass, the budget keeps the largest margins ``max(S_red - θ_r, S_sp - θ_s)``.

    The count differs per sample (``deterministic_count=False``); the engine's ragged path runs
    such batches. Each sample's result depends only on that sample (the head runs per sample).
    Cost: the head's matrix products (``D·e + (9 + e)·w + 2w`` MACs per sample) plus sorting.
    """

    name = "atp"
    capabilities = Capabilities(
        insertion_points=frozenset({"layer"}),
        attention=frozenset({"visual", "text"}),
        trainable=True,
        deterministic_count=False,
    )

    class Params(ReducerParams):
        weights: str = Field(
            description=(
                "ATP weights from `tokenprune train-atp`: the atp.safetensors file or its directory. One file holds "
                "every module; each stage uses the module trained for its layer."
            )
        )

        @field_validator("weights")
        @classmethod
        def _weights_exist(cls, value: str) -> str:
            """A missing weights path is a pipeline problem, found when the pipeline is validated."""
            if not weights_file(value).is_file():
                raise ValueError(
                    f"no ATP weights at {value} (expected a directory holding {WEIGHTS_FILE}, or the file itself); "
                    "train them with `tokenprune train-atp`"
                )
            return value

    def __init__(self, params: ReducerParams | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self._weights: ATPWeights | None = None

    @classmethod
    def from_weights(cls, weights: ATPWeights) -> ATP:
        """A reducer on modules held in memory (training), not read from a file."""
        reducer = cls(cls.Params.model_construct(weights="<in memory>"))
        reducer._weights = weights
        return reducer

    @property
    def weights(self) -> ATPWeights:
        """The trained modules, read from ``params.weights`` on first use (in :meth:`bind`), once."""
        if self._weights is None:
            self._weights = load_atp(self.params.weights)
        return self._weights

    def bind(self, model: torch.nn.Module, at: InsertionPoint) -> None:
        """Read the weights, and refuse, before anything is installed, a model or layer they were not trained
        for."""
        cfg = self.weights.config
        text = model.config.get_text_config()
        hidden, layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
        if (hidden, layers) != (cfg.hidden_size, cfg.num_layers):
            raise ReducerInputError(
                f"reducer {self.name!r}: the weights {self.params.weights} were trained for a language model with "
                f"hidden size {cfg.hidden_size} and {cfg.num_layers} decoder layers (base model {cfg.base_model!r}), "
                f"but this model has hidden size {hidden} and {layers} layers; train ATP for it with "
                "`tokenprune train-atp --model ...`"
            )
        self._module_at(at)

    def _module_at(self, at: InsertionPoint) -> ATPHead:
        """The trained module for a stage at ``at``; a clear error off a layer or without one."""
        if at.kind != "layer" or at.layer is None:
            raise ReducerInputError(f"reducer {self.name!r} runs between decoder layers only, not at {at}")
        try:
            return self.weights.head(int(at.layer))
        except ATPWeightsError as exc:
            raise ReducerInputError(f"reducer {self.name!r}: {exc}") from exc

    def _head(self, tokens: Tensor, ctx: ReduceContext) -> ATPHead:
        head = self._module_at(ctx.at)
        cfg = self.weights.config
        if int(tokens.shape[-1]) != cfg.hidden_size:
            raise ReducerInputError(
                f"reducer {self.name!r}: the weights {self.params.weights} were trained for hidden size "
                f"{cfg.hidden_size} ({cfg.num_layers} decoder layers, base model {cfg.base_model!r}), but the tokens "
                f"at {ctx.at} have size {int(tokens.shape[-1])}"
            )
        return head

    def _attention(self, ctx: ReduceContext) -> tuple[Tensor, Tensor]:
        out = []
        for source in ("visual", "text"):
            hint = "ATP runs at a layer stage through tokenprune.apply"
            out.append(required_attention(ctx, source, self.name, hint))
        return out[0], out[1]

    def _scores(self, tokens: Tensor, ctx: ReduceContext) -> tuple[ATPHead, Tensor, Tensor, Tensor, Tensor]:
        """The module's head, ``S_red`` and ``S_sp`` ``(B, N)``, and the head's inputs (statistics, pooled states)."""
        head = self._head(tokens, ctx)
        check_finite_tokens(tokens, ctx, self.name)
        att_v, att_t = self._attention(ctx)
        candidates = ctx.valid & ~ctx.protected
        s_red = redundancy_scores(att_v, att_t, candidates)
        if ctx.layout is not None:
            lay = ctx.layout
            lam = self.weights.config.spatial_lambda
            s_sp = spatial_scores(lay.row, lay.col, lay.view, lay.image, lay.newline, lam)
            s_sp = s_sp.masked_fill(~candidates, 0.0)
        else:
            s_sp = torch.zeros_like(s_red)
        stats = score_statistics(att_v, att_t, candidates)
        pooled = pooled_states(tokens.detach(), candidates)
        return head, s_red, s_sp, stats, pooled

    def thresholds(self, tokens: Tensor, ctx: ReduceContext) -> tuple[Tensor, Tensor, Tensor]:
        """``(S_red, S_sp, θ)``: ``(B, N)``, ``(B, N)`` and ``(B, 2)`` float32 (``θ = (θ_r, θ_s)``)."""
        head, s_red, s_sp, stats, pooled = self._scores(tokens, ctx)
        with torch.no_grad():
            # One sample at a time: a sample's thresholds must not depend on the rest of the batch.
            theta = torch.cat([head(stats[b : b + 1], pooled[b : b + 1]) for b in range(ctx.batch_size)])
        return s_red, s_sp, theta

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Hard ATP masks; see the class docstring. ``tokens`` is ``(B, N, D)``."""
        s_red, s_sp, theta = self.thresholds(tokens, ctx)
        margin = _margin(s_red, s_sp, theta)
        passed = ctx.valid & ~ctx.protected & (margin > 0)
        return top_k_selection(margin, ctx, eligible=passed, reducer_name=self.name)

    def soft_keep(self, tokens: Tensor, ctx: ReduceContext) -> SoftKeep:
        """Training (:class:`tokenprune.SoftMaskRun`): the keep logits ``max(S_red - θ_r, S_sp - θ_s)`` ``(B, N)``,
        differentiable in the head (run on the whole batch), with ``θ`` ``(B, 2)`` as ``aux["thresholds"]``.

        ``sigmoid(T · max(a, b)) = max(sigmoid(T a), sigmoid(T b))``: the paper's soft mask."""
        head, s_red, s_sp, stats, pooled = self._scores(tokens, ctx)
        theta = head(stats, pooled)
        return SoftKeep(_margin(s_red, s_sp, theta), {"thresholds": theta})

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """The head's matrix products, one row per sample (scores and statistics are element-wise)."""
        return self._head(tokens, ctx).macs(ctx.batch_size)


def _margin(s_red: Tensor, s_sp: Tensor, theta: Tensor) -> Tensor:
    """``(B, N)`` ``max(S_red - θ_r, S_sp - θ_s)``: a token passes where it is ``> 0``."""
    return torch.maximum(s_red - theta[:, :1], s_sp - theta[:, 1:])


def atp_pipeline(weights: str | Path, keep: float | int = 1.0, name: str | None = "atp") -> dict[str, Any]:
    """A pipeline mapping with one ``atp`` stage per module of ``weights`` (``keep``: each stage's cap)."""
    config = ATPWeights.load(weights).config
    return {
        "name": name,
        "stages": [
            {"at": {"layer": k}, "reducer": "atp", "keep": keep, "params": {"weights": str(weights)}}
            for k in config.layers
        ],
    }


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(ATP)


@tokenprune.hookimpl
def tokenprune_add_commands(app: typer.Typer) -> None:
    from tokenprune_atp.cli import train_atp

    app.command("train-atp")(train_atp)


__all__ = ["ATP", "ATPConfig", "ATPWeights", "ATPWeightsError", "atp_pipeline", "default_layers", "load_atp"]
