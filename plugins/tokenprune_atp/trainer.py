"""Training ATP modules on a frozen (or fine-tuned) VLM with soft masks and a budget-constrained loss.

The loss is ``L_LM + alpha Σ_m (k_m / L) · kept_m + β · |mean kept - target| / target``: the answer
tokens' cross-entropy, a penalty on the (soft) fraction kept at each module weighted by its depth
(as the unofficial re-implementation does), and the distance of the batch's average visual-token
count over all ``L`` decoder layers to the target. :func:`train_atp` runs it with a progress bar,
atomic resumable checkpoints, and writes ``atp.safetensors`` plus ``atp.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.loading import load_model
from tokenprune.synth.trainloop import append_log, save_atomic, smooth, training_progress
from tokenprune_atp.data import IGNORE, TASKS, training_batch
from tokenprune_atp.softmask import SoftATP, SoftForward
from tokenprune_atp.weights import ATPConfig, ATPWeights, ATPWeightsError, default_layers

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


@dataclass
class ATPTrainConfig:
    """Everything that determines an ATP training run.

    Attributes:
        model: Path or hub id of the VLM (``bundled``: the shipped mini VLM).
        task: Training data; ``synthvqa`` (SynthVQA training batches).
        target_tokens: Target average visual-token count over all decoder layers.
        layers: Module layers (default: :func:`~tokenprune_atp.weights.default_layers`).
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
        cfg = self.cfg
        return training_batch(
            self.processor, cfg.seed, step, cfg.batch_size, cfg.describe_prob, cfg.first_question_only
        )

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
        """Shift every head's ``θ_r`` logit by one offset so that :meth:`hard_average` hits the target
        (:func:`bracketed_shift`)."""
        images = self.cfg.calibration_images
        target = self.cfg.target_tokens
        biases = {k: h.fc2.bias.detach().clone() for k, h in self.weights.heads.items()}

        def measure(shift: float) -> float:
            with torch.no_grad():
                for k, h in self.weights.heads.items():
                    h.fc2.bias.copy_(biases[k] + torch.tensor([shift, 0.0]))
            return self.hard_average(soft, images)

        before = measure(0.0)
        best = bracketed_shift(measure, target, before, iterations)
        shift, after = best
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


SHIFT_START, SHIFT_LIMIT = 4.0, 64.0
"""The calibration's first bracket of ``θ_r`` logit shifts, and how far it may widen."""


def bracketed_shift(
    measure: Callable[[float], float], target: float, at_zero: float, iterations: int
) -> tuple[float, float]:
    """The logit shift whose measured token count is closest to ``target``, and that count.

    A larger ``θ_r`` keeps fewer tokens, so the count falls as the shift grows. The bracket starts at
    ``±SHIFT_START`` and doubles until it holds the target (a saturated head moves only under a large
    shift) or reaches ``±SHIFT_LIMIT``; then ``iterations`` bisection steps, plus one per doubling so the
    resolution stays ``SHIFT_START / 2**iterations``. Every measured point is a candidate.
    """
    sign = 1.0 if at_zero > target else -1.0
    best = (abs(at_zero - target), 0.0, at_zero)
    edge = SHIFT_START
    got = measure(sign * edge)
    best = min(best, (abs(got - target), sign * edge, got))
    while (got - target) * sign > 0 and edge < SHIFT_LIMIT:
        edge *= 2
        iterations += 1
        got = measure(sign * edge)
        best = min(best, (abs(got - target), sign * edge, got))
    lo, hi = sorted((0.0, sign * edge))
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        got = measure(mid)
        best = min(best, (abs(got - target), mid, got))
        lo, hi = (mid, hi) if got > target else (lo, mid)
    return best[1], best[2]
