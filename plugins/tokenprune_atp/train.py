"""Training ATP modules on a frozen (or fine-tuned) VLM with soft masks and a budget-constrained loss.

ATP-LLaVA (https://arxiv.org/abs/2412.00447) trains its thresholds with differentiable masks: the
sequence keeps its length, and each visual token ``j`` is down-weighted as a *key* in every layer
after the module that (softly) prunes it. :class:`SoftATP` does this inside a stock transformers
model with hooks only (nothing is patched or subclassed), DynamicViT-style:

* an :class:`~tokenprune.engine.probe.AttentionProbe` records, under sdpa, the attention that the visual
  rows and the text rows pay to every key at layer ``k - 1`` of each module ``k`` (exactly the
  ``visual`` and ``text`` sources the inference reducer reads; the rows of tokens that an earlier
  module's mask put below 0.5 are left out, as they are gone at inference);
* a forward pre-hook on layer ``k`` computes the scores (:mod:`tokenprune_atp.model`), the head's
  thresholds ``θ = (θ_r, θ_s)``, and the soft mask ``M = max(sigmoid(T (S_red - θ_r)), sigmoid(T (S_sp - θ_s)))``
  (protected newline tokens: ``M = 1``); masks of successive modules multiply;
* forward pre-hooks on every layer replace the attention mask by a full 4-D additive float mask:
  causal + padding, plus ``log M_j`` on the column of every visual key ``j`` except on the diagonal
  (``G_ij = 1`` if ``i = j`` else ``M_j``), so that ``softmax(P + log G) ∝ exp(P) G`` and gradients
  reach the heads.

The loss is ``L_LM + alpha Σ_m (k_m / L) · kept_m + β · |mean kept - target| / target``: the answer
tokens' cross-entropy, a penalty on the (soft) fraction kept at each module weighted by its depth
(as the unofficial re-implementation does), and the distance of the batch's average visual-token
count over all ``L`` decoder layers to the target. :func:`train_atp` runs it with a progress bar,
atomic resumable checkpoints, and writes ``atp.safetensors`` plus ``atp.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.adapters.loading import load_model
from tokenprune.engine.hooks import HookSet
from tokenprune.engine.probe import AttentionProbe, ProbeRows
from tokenprune.engine.sequence import image_layout
from tokenprune.layout import TokenLayout
from tokenprune.plugins import get_plugin_manager
from tokenprune.reducer import Selection
from tokenprune.synth.trainloop import append_log, save_atomic, smooth, training_progress
from tokenprune_atp.model import (
    ATPConfig,
    ATPWeights,
    ATPWeightsError,
    default_layers,
    pooled_states,
    redundancy_scores,
    score_statistics,
    spatial_scores,
)

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
TASKS = ("synthvqa",)
IGNORE = -100


@dataclass
class ATPTrainConfig:
    """Everything that determines an ATP training run.

    Attributes:
        model: Path or hub id of the VLM (``bundled``: the shipped mini VLM).
        task: Training data; ``synthvqa`` (SynthVQA training batches).
        target_tokens: Target average visual-token count over all decoder layers.
        layers: Module layers (default: :func:`~tokenprune_atp.model.default_layers`).
        steps: Optimiser steps.
        batch_size: Images per step.
        lr: Learning rate of the heads (AdamW; cosine decay to 0.1 of it).
        alpha: Weight of the per-module kept-fraction penalty.
        beta: Weight of the relative distance to ``target_tokens``.
        temperature_start: Soft-mask steepness ``T`` at step 0 (annealed geometrically).
        temperature_end: ``T`` at the last step.
        train_llm: Fine-tune the language model too (the paper's setting; vision tower and projector stay
            frozen); the fine-tuned model is saved to ``run_dir/model``. Default: frozen.
        llm_lr: Learning rate of the language model when ``train_llm``.
        describe_prob: SynthVQA: probability of a ``describe`` caption target in a sequence.
        first_question_only: SynthVQA: cut each training sequence after its first question, so that
            training sees the evaluation format (``<s> <image>... question``, one answer) and the
            text-attention statistics the heads read match those of evaluation prompts.
        embed_dim: Head size: pooled hidden-state summary.
        width: Head size: MLP width.
        spatial_lambda: ``λ`` of the spatial score.
        protect_newlines: Keep row-end newline tokens (match the pipeline's ``protect_newlines``).
        calibration_images: After training, shift every head's ``θ_r`` by one common offset so that
            the hard-masked average over this many unseen training images (in the evaluation format)
            is the target (bisection; 0 skips it). Training leaves a few percent of offset
            between the batch-level soft budget and the hard count on single-question prompts.
        seed: Seed of the heads' initialisation and of the batches.
        threads: torch CPU threads.
        checkpoint_every: Steps between checkpoints.
    """

    model: str
    target_tokens: float
    task: str = "synthvqa"
    layers: list[int] | None = None
    steps: int = 600
    batch_size: int = 8
    lr: float = 3e-3
    alpha: float = 0.05
    beta: float = 2.0
    temperature_start: float = 5.0
    temperature_end: float = 50.0
    train_llm: bool = False
    llm_lr: float = 2e-5
    describe_prob: float = 0.0
    first_question_only: bool = True
    calibration_images: int = 128
    embed_dim: int = 16
    width: int = 32
    spatial_lambda: float = 3.0
    protect_newlines: bool = True
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if not self.target_tokens > 0:
            raise ValueError(f"target_tokens must be > 0, got {self.target_tokens}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise ValueError("temperatures must be > 0")

    def temperature(self, step: int) -> float:
        """Soft-mask steepness at ``step`` (geometric from start to end)."""
        t = min(1.0, step / max(1, self.steps - 1))
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** t

    def lr_factor(self, step: int) -> float:
        """Cosine decay of every learning rate, from 1 to 0.1 over the run."""
        t = min(1.0, step / max(1, self.steps - 1))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


@dataclass
class SoftForward:
    """What one soft-masked forward produced.

    Attributes:
        logits: ``(B, L, V)``.
        counts: ``(B, num_layers)`` soft visual-token count each decoder layer sees (differentiable).
        kept: Per module layer ``k``: ``(B,)`` soft fraction of the visual tokens kept after it.
        thresholds: Per module layer: ``(B, 2)`` ``(θ_r, θ_s)``.
        hard_counts: ``(B, num_layers)`` counts of the tokens whose cumulative mask exceeds 0.5.
    """

    logits: Tensor
    counts: Tensor
    kept: dict[int, Tensor]
    thresholds: dict[int, Tensor]
    hard_counts: Tensor


@dataclass
class _Batch:
    visual: Tensor  # (B, L) bool
    valid: Tensor  # (B, L) bool
    cols: Tensor  # (B, N) visual columns, -1 padding
    vvalid: Tensor  # (B, N) bool
    protected: Tensor  # (B, N) bool
    logm: Tensor  # (B, N) float, cumulative log mask
    present: Tensor  # (B, N) bool, cumulative hard mask
    base: Tensor  # (B, 1, L, L) additive float mask
    offdiag: Tensor  # (L, L) float, 0 on the diagonal
    counts: list[Tensor] = field(default_factory=list)
    hard: list[Tensor] = field(default_factory=list)
    kept: dict[int, Tensor] = field(default_factory=dict)
    thresholds: dict[int, Tensor] = field(default_factory=dict)
    layout: TokenLayout | None = None
    spatial: Tensor | None = None


class SoftATP:
    """Soft-masked ATP inside a transformers VLM, for training; a context manager that removes its hooks.

    Args:
        model: The VLM (``...ForConditionalGeneration``), sdpa or eager attention.
        weights: The ATP heads (trainable).
        temperature: Soft-mask steepness ``T`` (change it between forwards with :attr:`temperature`).

    Use :meth:`forward` (not ``model(...)``) so the masks know the batch.
    """

    def __init__(self, model: nn.Module, weights: ATPWeights, temperature: float = 10.0) -> None:
        weights.check_model(model)
        self.model = model
        self.weights = weights
        self.temperature = float(temperature)
        manager = get_plugin_manager()
        self.adapter: ModelAdapter = manager.adapters.get(model.config.model_type)(model)
        self.layers = list(self.adapter.decoder_layers())
        self.num_layers = len(self.layers)
        self._state: _Batch | None = None
        self._call: ImageCall | None = None
        self._hooks = HookSet()
        self.probe = AttentionProbe(
            layers={k - 1: frozenset({"visual", "text"}) for k in weights.config.layers}, rows=self._rows
        )
        try:
            self.probe.install(self.adapter.language_model(), self.layers)
            for i, layer in enumerate(self.layers):
                self._hooks.pre(layer, self._pre(i))
            vlm = self.adapter.vlm()
            if hasattr(vlm, "get_image_features"):
                self._hooks.wrap_method(vlm, "get_image_features", self._record_image_call)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook and restore the model; safe to call twice."""
        self._hooks.remove()
        self.probe.remove()

    def __enter__(self) -> SoftATP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _record_image_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self._call = ImageCall(args, kwargs, output)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **inputs: Any) -> SoftForward:
        """Run the model with soft ATP masks on a (right- or left-) padded batch.

        Args:
            input_ids: ``(B, L)``.
            attention_mask: ``(B, L)`` 1 on real tokens (default all ones).
            **inputs: The model's image inputs (``pixel_values``, ``image_sizes``, ...).
        """
        batch, length = input_ids.shape
        device = input_ids.device
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        visual = self.adapter.visual_mask(input_ids) & valid
        sel = Selection.from_mask(visual)
        cols = sel.indices
        vvalid = cols >= 0
        dtype = next(self.model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        eye = torch.eye(length, dtype=torch.bool, device=device)[None, None]
        allowed = (causal & valid[:, None, None, :]) | eye  # padding rows see themselves (no empty row)
        base = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        n = cols.shape[1]
        self._state = _Batch(
            visual=visual,
            valid=valid,
            cols=cols,
            vvalid=vvalid,
            protected=torch.zeros(batch, n, dtype=torch.bool, device=device),
            logm=torch.zeros(batch, n, dtype=torch.float32, device=device),
            present=vvalid.clone(),
            base=base,
            offdiag=1.0 - torch.eye(length, dtype=torch.float32, device=device),
        )
        self._call = None
        self.probe.active = True
        self.probe.scores.clear()
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
            st = self._state
            full = st.vvalid.sum(1).float()
            counts = [full] * self.num_layers
            hard = [st.vvalid.sum(1)] * self.num_layers
            for k, c in zip(sorted(st.kept), st.counts, strict=True):
                for i in range(k, self.num_layers):
                    counts[i] = c
            for k, c in zip(sorted(st.kept), st.hard, strict=True):
                for i in range(k, self.num_layers):
                    hard[i] = c
            return SoftForward(
                logits=out.logits,
                counts=torch.stack(counts, 1),
                kept=dict(st.kept),
                thresholds=dict(st.thresholds),
                hard_counts=torch.stack(hard, 1),
            )
        finally:
            self.probe.active = False
            self._state = None
            self._call = None

    def _rows(self, layer: int) -> ProbeRows | None:
        st = self._state
        if st is None:
            return None
        batch, length = st.visual.shape
        gone = torch.zeros(batch, length + 1, dtype=torch.bool, device=st.visual.device)
        gone.scatter_(1, torch.where(st.vvalid, st.cols, torch.full_like(st.cols, length)), ~st.present & st.vvalid)
        gone = gone[:, :length]
        return ProbeRows(visual=st.visual & ~gone, valid=st.valid & ~gone)

    def _ensure_layout(self, st: _Batch) -> None:
        if st.spatial is not None:
            return
        layout = image_layout(self.adapter, self._call, st.visual) if self._call is not None else None
        cfg = self.weights.config
        if layout is not None:
            lay = layout.gather(st.cols)
            st.layout = lay
            st.spatial = spatial_scores(lay.row, lay.col, lay.view, lay.image, lay.newline, cfg.spatial_lambda)
            if cfg.protect_newlines:
                st.protected = lay.newline & st.vvalid
        else:
            st.spatial = torch.zeros(st.cols.shape, dtype=torch.float32, device=st.cols.device)
        st.spatial = st.spatial.masked_fill(~st.vvalid | st.protected, 0.0)

    def _module(self, k: int, hidden: Tensor, st: _Batch) -> None:
        self._ensure_layout(st)
        scores = self.probe.scores.get(k - 1)
        if scores is None:
            raise RuntimeError(f"the attention probe recorded nothing at layer {k - 1}")
        safe = st.cols.clamp(min=0)
        att_v = scores["visual"].gather(1, safe).masked_fill(~st.vvalid, 0.0)
        att_t = scores["text"].gather(1, safe).masked_fill(~st.vvalid, 0.0)
        candidates = st.present & ~st.protected
        s_red = redundancy_scores(att_v, att_t, candidates)
        s_sp = st.spatial.masked_fill(~candidates, 0.0)
        stats = score_statistics(att_v, att_t, candidates)
        tokens = hidden.gather(1, safe.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        pooled = pooled_states(tokens.detach(), candidates)
        theta = self.weights.head(k)(stats, pooled)  # (B, 2)
        t = self.temperature
        logm = torch.maximum(
            nn.functional.logsigmoid((s_red - theta[:, :1]) * t), nn.functional.logsigmoid((s_sp - theta[:, 1:]) * t)
        )
        logm = logm.masked_fill(~st.vvalid | st.protected, 0.0)
        st.logm = st.logm + logm
        st.present = st.present & ((logm > math.log(0.5)) | st.protected)
        st.counts.append((st.logm.exp() * st.vvalid).sum(1))
        st.hard.append((st.present & st.vvalid).sum(1))
        st.kept[k] = st.counts[-1] / st.vvalid.sum(1).clamp(min=1)
        st.thresholds[k] = theta

    def _pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            st = self._state
            if st is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if str(i) in self.weights.heads:
                self._module(i, hidden, st)
            mask = st.base
            if st.kept:
                batch, length = st.visual.shape
                col = torch.zeros(batch, length + 1, dtype=st.logm.dtype, device=st.logm.device)
                col.scatter_(1, torch.where(st.vvalid, st.cols, torch.full_like(st.cols, length)), st.logm)
                bias = col[:, :length, None].transpose(1, 2).unsqueeze(1) * st.offdiag  # (B, 1, L, L)
                mask = mask + bias.to(mask.dtype)
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook


# --- the loss ------------------------------------------------------------------------------------------


def atp_loss(out: SoftForward, labels: Tensor, cfg: ATPTrainConfig) -> tuple[Tensor, dict[str, float]]:
    """``L_LM + alpha Σ_m (k_m / L) kept_m + β |mean count - target| / target``; returns the loss and its parts.

    Args:
        out: A :meth:`SoftATP.forward` result.
        labels: ``(B, L)`` the id to predict at each position (already shifted), ``-100`` elsewhere.
        cfg: Provides ``alpha``, ``beta`` and ``target_tokens``.
    """
    logits = out.logits.float()
    lm = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    num_layers = out.counts.shape[1]
    kept = sum((k / num_layers) * v.mean() for k, v in out.kept.items())
    average = out.counts.mean(1).mean()
    target = (average - cfg.target_tokens).abs() / cfg.target_tokens
    loss = lm + cfg.alpha * kept + cfg.beta * target
    parts = {
        "loss": float(loss.detach()),
        "lm": float(lm.detach()),
        "tokens": float(average.detach()),
        "hard_tokens": float(out.hard_counts.float().mean()),
    }
    for k, th in out.thresholds.items():
        parts[f"theta_r{k}"] = float(th[:, 0].mean().detach())
        parts[f"theta_s{k}"] = float(th[:, 1].mean().detach())
    return loss, parts


# --- evaluation batches ------------------------------------------------------------------------------


def first_question(batch: Any) -> Any:
    """A SynthVQA training batch cut after each row's first supervised position (its first question).

    ``labels`` holds at each position the id to predict there, so a row ``<s> <image>... q1 a1 q2 ...``
    becomes ``<s> <image>... q1`` with the label ``a1`` at its last token: an evaluation prompt.
    """
    rows = []
    for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels, strict=True):
        supervised = (labels != IGNORE).nonzero()
        end = int(supervised[0]) + 1 if supervised.numel() else int(mask.sum())
        rows.append((ids[:end], labels[:end]))
    length = max(len(r[0]) for r in rows)
    from tokenprune.synth.tokenizer import PAD, vocabulary

    pad = vocabulary().index(PAD)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
        mask[i, : len(ids)] = 1
    return replace(batch, input_ids=input_ids, attention_mask=mask, labels=labels)


# --- the trainer ---------------------------------------------------------------------------------------


class ATPTrainer:
    """One ATP training run: model, heads, optimiser, step; :meth:`run` trains to the end.

    Args:
        cfg: The run's settings.
        run_dir: Where ``state.pt``, ``log.jsonl`` and the final ``atp.safetensors`` / ``atp.json`` go.
        model, processor: An already loaded model (default:
            :func:`tokenprune.adapters.loading.load_model` of ``cfg.model``).
    """

    def __init__(
        self, cfg: ATPTrainConfig, run_dir: str | Path, model: nn.Module | None = None, processor: Any = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if model is None:
            model, processor = load_model(cfg.model)
        self.model = model
        self.processor = processor
        text = model.config.get_text_config()
        num_layers = int(text.num_hidden_layers)
        layers = sorted(cfg.layers) if cfg.layers else default_layers(num_layers)
        try:
            config = ATPConfig(
                hidden_size=int(text.hidden_size),
                num_layers=num_layers,
                layers=layers,
                embed_dim=cfg.embed_dim,
                width=cfg.width,
                spatial_lambda=cfg.spatial_lambda,
                protect_newlines=cfg.protect_newlines,
                model_type=getattr(model.config, "model_type", None),
                base_model=cfg.model,
                target_tokens=cfg.target_tokens,
                train=cfg.to_json(),
            )
        except ATPWeightsError as exc:
            raise ValueError(f"--layers: {exc}") from exc
        torch.manual_seed(cfg.seed)
        self.weights = ATPWeights(config)
        for p in model.parameters():
            p.requires_grad_(cfg.train_llm)
        if cfg.train_llm:
            for name, p in model.named_parameters():  # the vision tower and projector stay frozen
                p.requires_grad_("language_model" in name or "lm_head" in name)
        groups: list[dict[str, Any]] = [{"params": list(self.weights.parameters()), "lr": cfg.lr}]
        if cfg.train_llm:
            groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.llm_lr})
        for g in groups:
            g["base_lr"] = g["lr"]
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.step = 0

    # -- data --------------------------------------------------------------------------------
    def batch(self, step: int) -> Any:
        """The training batch of ``step`` (a pure function of ``(seed, step)``)."""
        from tokenprune.synth.batches import make_batch

        batch = make_batch(
            self.processor.image_processor,
            self.cfg.seed,
            step,
            self.cfg.batch_size,
            describe_prob=self.cfg.describe_prob,
        )
        return first_question(batch) if self.cfg.first_question_only else batch

    # -- checkpoints -------------------------------------------------------------------------
    def save_state(self) -> Path:
        """Write ``state.pt`` atomically (temporary file, then ``os.replace``)."""
        state: dict[str, Any] = {
            "step": self.step,
            "config": self.cfg.to_json(),
            "weights": self.weights.state_dict(),
            "optimizer": self.opt.state_dict(),
        }
        if self.cfg.train_llm:
            state["model"] = {
                k: v for k, v in self.model.state_dict().items() if "language_model" in k or "lm_head" in k
            }
        return save_atomic(state, self.run_dir / STATE_FILE)

    def load_state(self, path: str | Path) -> None:
        """Resume from a ``state.pt``; its settings must match this run's (``steps`` may differ)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
        names = ("model", "task", "target_tokens", "layers", "batch_size", "seed", "train_llm", "first_question_only")
        for name in names:
            if saved.get(name) != getattr(self.cfg, name):
                raise ValueError(
                    f"cannot resume {path}: it was trained with {name}={saved.get(name)!r}, this run has "
                    f"{name}={getattr(self.cfg, name)!r}; use the same settings or another run directory"
                )
        self.weights.load_state_dict(state["weights"])
        self.opt.load_state_dict(state["optimizer"])
        if "model" in state:
            self.model.load_state_dict(state["model"], strict=False)
        self.step = int(state["step"])

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``log.jsonl``."""
        append_log(self.run_dir / LOG_FILE, record)

    # -- training ----------------------------------------------------------------------------
    def train_step(self, soft: SoftATP, batch: Any) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the loss parts."""
        self.weights.train()
        self.model.train(self.cfg.train_llm)
        soft.temperature = self.cfg.temperature(self.step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * self.cfg.lr_factor(self.step)
        out = soft.forward(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_sizes=batch.image_sizes,
        )
        loss, parts = atp_loss(out, batch.labels, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return parts

    @torch.no_grad()
    def hard_average(self, soft: SoftATP, images: int) -> float:
        """Average visual tokens over all layers with hard masks, on ``images`` unseen training images.

        Uses :class:`SoftATP` with ``T = 1e6``, which equals the engine's hard-pruned forward (tested).
        """
        self.weights.eval()
        self.model.eval()
        soft.temperature = 1e6
        total, count, step = 0.0, 0, 0
        while count < images:
            batch = self.batch(self.cfg.steps + 1000 + step)  # beyond every training step: unseen
            out = soft.forward(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
                image_sizes=batch.image_sizes,
            )
            per_image = out.hard_counts.float().mean(1)
            take = min(images - count, per_image.shape[0])
            total += float(per_image[:take].sum())
            count += take
            step += 1
        return total / count

    def calibrate(self, soft: SoftATP, iterations: int = 8) -> dict[str, float]:
        """Shift every head's ``θ_r`` logit by one offset so that :meth:`hard_average` hits the target."""
        images = self.cfg.calibration_images
        target = self.cfg.target_tokens
        biases = {k: h.fc2.bias.detach().clone() for k, h in self.weights.heads.items()}

        def measure(shift: float) -> float:
            with torch.no_grad():
                for k, h in self.weights.heads.items():
                    h.fc2.bias.copy_(biases[k] + torch.tensor([shift, 0.0]))
            return self.hard_average(soft, images)

        before = measure(0.0)
        lo, hi = (0.0, 4.0) if before > target else (-4.0, 0.0)  # a larger θ_r keeps fewer tokens
        best = (abs(before - target), 0.0, before)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            got = measure(mid)
            best = min(best, (abs(got - target), mid, got))
            lo, hi = (mid, hi) if got > target else (lo, mid)
        _, shift, after = best
        measure(shift)  # leave the best shift in place
        return {"before": before, "after": after, "shift": shift, "images": float(images)}

    def run(self, progress: bool = True, stop_after: int | None = None) -> Path | None:
        """Train to ``cfg.steps`` (or ``stop_after`` more steps); returns the weights file once finished."""
        torch.set_num_threads(self.cfg.threads)
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, self.step + stop_after)
        ema: dict[str, float] = {}
        t0 = time.time()
        shown = ("loss", "lm", "tokens", "hard_tokens")
        with (
            SoftATP(self.model, self.weights) as soft,
            training_progress("train-atp", self.cfg.steps, self.step, enabled=progress) as bar,
        ):
            while self.step < end:
                parts = self.train_step(soft, self.batch(self.step))
                smooth(ema, {k: parts[k] for k in shown}, 0.95)
                bar.update(
                    self.step,
                    f"loss {ema['loss']:.3f} lm {ema['lm']:.3f} kept tokens {ema['tokens']:.1f} "
                    f"(hard {ema['hard_tokens']:.1f}, target {self.cfg.target_tokens:g})",
                )
                self.log({"step": self.step, "wall_s": round(time.time() - t0, 2), **parts})
                if self.step % self.cfg.checkpoint_every == 0 or self.step == end:
                    self.save_state()
            if self.step >= self.cfg.steps and self.cfg.calibration_images > 0:
                result = self.calibrate(soft)
                self.log({"event": "calibration", **result})
                self.weights.config.train["calibration"] = result
                bar.print(
                    f"calibrated: average visual tokens {result['before']:.1f} -> {result['after']:.1f} "
                    f"(target {self.cfg.target_tokens:g}; θ_r logit shift {result['shift']:+.3f})"
                )
        if self.step >= self.cfg.steps:
            self.weights.eval()
            if self.cfg.train_llm:  # the heads were trained with this language model: ship both
                self.model.save_pretrained(self.run_dir / "model")
                if self.processor is not None:
                    self.processor.save_pretrained(self.run_dir / "model")
            return self.weights.save(self.run_dir)
        return None


def train_atp(
    cfg: ATPTrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    model: nn.Module | None = None,
    processor: Any = None,
) -> Path | None:
    """Train (or resume) ATP heads in ``run_dir``; returns ``run_dir/atp.safetensors`` when finished.

    The Python form of ``tokenprune train-atp``. ``run_dir/state.pt`` (atomic, every
    ``cfg.checkpoint_every`` steps) makes the run resumable: run it again with the same settings.
    """
    trainer = ATPTrainer(cfg, run_dir, model=model, processor=processor)
    state = Path(run_dir) / STATE_FILE
    if resume and state.exists():
        trainer.load_state(state)
    return trainer.run(progress=progress)


__all__ = [
    "ATPTrainConfig",
    "ATPTrainer",
    "SoftATP",
    "SoftForward",
    "atp_loss",
    "first_question",
    "train_atp",
]
