"""Training the mini VLM from scratch on SynthVQA (CPU friendly, deterministic, resumable).

The recipe (docs/synth.md explains why each part is there):

* every supervised answer of several questions per image, plus a dense ``describe`` target;
* linear auxiliary heads trained on patch-level labels (:mod:`tokenprune.synth.patch_labels`):
  kind, colour and digit under each patch, read from the vision tower's output tokens, and the
  quadrant of each base-view patch, read from the projector's output;
* a grounding loss: one attention head (head 0 of LM layer ``ground_layer``) is trained to put
  its attention, at the position where an answer is predicted, on the visual tokens of the object
  the question names (the generator knows which tokens those are); for ``where is ...``
  questions, on the object's base-view tokens only, the ones that know their quadrant (optional,
  off by default: ``ground_absent`` also grounds ``is there ...`` questions answered "no" on the
  ``<s>`` token; tried once, it slowed colour and position down, docs/synth-training-log.md);
  ``exists_head`` moves every ``is there ...`` question to a head of its own instead, grounded on
  the named object when it is there and on ``<s>`` when it is not; ``extra_exists`` asks more of them;
* a question classifier (``question_weight``; 1 in the shipped recipe): a linear head reads the
  colour and the kind an ``is there <colour> <kind> ?`` question names from the grounding layer's
  input at its last token, so that the answer position knows both;
* a curriculum from one shape per scene to four;
* AdamW with linear warm-up and cosine decay over a fixed number of steps, fp32 (bf16 autocast optional).

Resumption: ``state.pt`` in the run directory (written atomically) holds the weights, the
auxiliary heads, the optimiser and the step. Batches depend only on ``(seed, step)``, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would. ``new_stage`` resumes
with a changed recipe instead (:data:`STAGE_FIELDS`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprune.synth.batches import TrainBatch, check_exists_grounding, curriculum_max_shapes, make_batch
from tokenprune.synth.model import MiniVLMSize, build_model
from tokenprune.synth.patch_labels import COLOUR_CLASSES, DIGIT_CLASSES, IGNORE, KIND_CLASSES, QUADRANT_CLASSES
from tokenprune.synth.processor import build_processor
from tokenprune.synth.scenes import SHAPE_COLOURS, SHAPE_KINDS
from tokenprune.synth.trainloop import append_log, save_atomic, smooth, training_progress

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
#: Config fields a resumed run must share with its state: the model, the data stream, the optimiser.
FIXED_FIELDS: tuple[str, ...] = ("seed", "batch_size", "lr", "size", "ground_layer")
#: Recipe fields that may change on resume with ``new_stage`` (a second stage of training).
STAGE_FIELDS: tuple[str, ...] = (
    "aux_weight",
    "describe_prob",
    "ground_weight",
    "ground_absent",
    "exists_head",
    "question_weight",
    "extra_exists",
)


@dataclass
class TrainConfig:
    """Everything that determines a training run."""

    seed: int = 0
    steps: int = 1600
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup_steps: int = 150
    min_lr_fraction: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 1.0
    ground_weight: float = 1.0
    ground_layer: int = 1
    describe_prob: float = 0.5
    ground_absent: bool = False
    exists_head: int | None = None
    question_weight: float = 0.0
    extra_exists: int = 0
    curriculum_fraction: float = 0.15
    bf16: bool = False
    threads: int = 1
    checkpoint_every: int = 100
    eval_every: int = 250
    eval_per_type: int = 30
    size: MiniVLMSize = field(default_factory=MiniVLMSize)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_json`."""
        data = dict(data)
        data["size"] = MiniVLMSize(**data["size"])
        data.setdefault("ground_absent", False)  # states written before the options trained without them
        data.setdefault("exists_head", None)
        data.setdefault("question_weight", 0.0)
        data.setdefault("extra_exists", 0)
        return cls(**data)

    def __post_init__(self) -> None:
        check_exists_grounding(self.ground_absent, self.exists_head, heads=self.size.text_heads)


class AuxHead(nn.Module):
    """Linear patch classifiers (training only).

    Kind, colour and digit are read from the vision tower's output tokens. The quadrant is read
    from the projector's output for the base view, the features the LM sees: with the quadrant
    classifier on the vision tower instead, a linear probe read left/right from an object's
    base-view tokens at 100% before the projector and at 66% after it (docs/synth-training-log.md).

    The question classifier reads, from the grounding layer's input at the last token of an
    ``is there <colour> <kind> ?`` question, the colour and the kind it names: without it that
    position knew the kind (the word just before) but not the colour (a linear probe: 14%, chance
    17%), so neither the grounding head nor the layers after it could check the colour.
    """

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.sizes = (len(KIND_CLASSES), len(COLOUR_CLASSES), len(DIGIT_CLASSES))
        self.proj = nn.Linear(vision_hidden, sum(self.sizes))
        self.quadrant = nn.Linear(text_hidden, len(QUADRANT_CLASSES))
        self.question = nn.Linear(text_hidden, len(SHAPE_COLOURS) + len(SHAPE_KINDS))

    def loss(self, tokens: torch.Tensor, projected: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the cross-entropies of the four classifiers.

        Args:
            tokens: (n_views, 64, vision_hidden) vision tower output (CLS dropped).
            projected: (n_views, 64, text_hidden) the projector's output for the same patches.
            labels: (n_views, 64, 4) kind / colour / digit / quadrant classes, ``-100`` to ignore.
        """
        logits = [*self.proj(tokens.float()).split(self.sizes, dim=-1), self.quadrant(projected.float())]
        total = tokens.new_zeros((), dtype=torch.float32)
        for j, lg in enumerate(logits):
            y = labels[..., j].reshape(-1)
            if (y != IGNORE).any():
                total = total + nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), y, ignore_index=IGNORE)
        return total

    def question_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the named colour plus that of the named kind.

        Args:
            hidden: (M, text_hidden) the grounding layer's input at each question's last token.
            labels: (M, 2) colour (index into ``SHAPE_COLOURS``) and kind (into ``SHAPE_KINDS``).
        """
        colour, kind = self.question(hidden.float()).split((len(SHAPE_COLOURS), len(SHAPE_KINDS)), dim=-1)
        return nn.functional.cross_entropy(colour, labels[:, 0]) + nn.functional.cross_entropy(kind, labels[:, 1])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine to ``min_lr_fraction * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class Trainer:
    """Holds the model, auxiliary heads and optimiser of one run; :meth:`run` trains to the end."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.processor = build_processor()
        self.model = build_model(cfg.size, seed=cfg.seed)
        torch.manual_seed(cfg.seed + 1)
        self.aux = AuxHead(cfg.size.vision_hidden, cfg.size.text_hidden)
        self.opt = self._optimizer()
        self.step = 0
        self._vision_tokens: torch.Tensor | None = None
        self._projected: torch.Tensor | None = None
        self._layer_input: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.model.model.vision_tower.register_forward_hook(self._capture_vision)
        self.model.model.multi_modal_projector.register_forward_hook(self._capture_projected)
        if cfg.ground_weight > 0 or cfg.question_weight > 0:
            layers = self.model.model.language_model.layers
            if not 0 <= cfg.ground_layer < len(layers):
                raise ValueError(f"ground_layer={cfg.ground_layer} is not a layer of the {len(layers)}-layer LM")
            layers[cfg.ground_layer].register_forward_pre_hook(self._capture_layer_input, with_kwargs=True)

    def _optimizer(self, skip: tuple[nn.Parameter, ...] = ()) -> torch.optim.AdamW:
        """AdamW over the model and the auxiliary heads (weight decay on matrices only), minus ``skip``."""
        decay, no_decay = [], []
        for mod in (self.model, self.aux):
            for p in mod.parameters():
                if not any(p is q for q in skip):
                    (decay if p.ndim >= 2 else no_decay).append(p)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr,
            betas=(0.9, 0.98),
        )

    def _capture_vision(self, module: nn.Module, args: Any, output: Any) -> None:
        """Keep the vision tower's last hidden states (n_views, 65, hidden) for the auxiliary loss."""
        self._vision_tokens = output.hidden_states[-1]

    def _capture_projected(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        """Keep the projector's output (n_views, 64, text_hidden) for the quadrant classifier."""
        self._projected = output

    def _capture_layer_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keep the grounding layer's input hidden states (B, L, d) and RoPE (cos, sin)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        self._layer_input = (hidden, kwargs["position_embeddings"])

    def grounding_loss(self, batch: TrainBatch) -> torch.Tensor:
        """-log of the grounding head's attention mass on its target tokens, averaged over questions.

        The head is 0, or ``exists_head`` for ``is there ...`` questions when that is set.

        Recomputes the attention logits of that head exactly as the layer does (input norm,
        q/k projections, RoPE, causal softmax over positions up to the query).
        """
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if self._layer_input is None:
            raise RuntimeError("the grounding layer hook did not fire")
        hidden, (cos, sin) = self._layer_input
        n = batch.ground_rows.numel()
        if n == 0:
            return hidden.new_zeros((), dtype=torch.float32)
        layer = self.model.model.language_model.layers[self.cfg.ground_layer]
        attn = layer.self_attn
        hd = attn.head_dim
        h = layer.input_layernorm(hidden[batch.ground_rows])  # (N, L, d)
        heads = batch.ground_heads[:, None, None, None].expand(-1, h.shape[1], 1, hd)
        q = attn.q_proj(h).unflatten(-1, (-1, hd)).gather(2, heads)[:, :, 0]  # each question's head: (N, L, hd)
        k = attn.k_proj(h).unflatten(-1, (-1, hd)).gather(2, heads)[:, :, 0]
        if cos.shape[0] == 1:  # positions shared by the batch
            cos, sin = cos.expand(n, -1, -1), sin.expand(n, -1, -1)
        else:
            cos, sin = cos[batch.ground_rows], sin[batch.ground_rows]
        q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
        q_at = q[:, 0, :, :].gather(1, batch.ground_query[:, None, None].expand(-1, 1, hd))  # (N, 1, hd)
        logits = (q_at.float() @ k[:, 0].float().transpose(1, 2))[:, 0] * attn.scaling  # (N, L)
        pos = torch.arange(logits.shape[1])
        logits = logits.masked_fill(pos[None, :] > batch.ground_query[:, None], float("-inf"))
        on_target = logits.masked_fill(~batch.ground_targets, float("-inf")).logsumexp(-1)
        return (logits.logsumexp(-1) - on_target).mean()

    # -- checkpoints -------------------------------------------------------------------------
    def save_state(self) -> Path:
        """Write ``state.pt`` atomically (temp file, then ``os.replace``)."""
        state = {
            "step": self.step,
            "config": self.cfg.to_json(),
            "model": self.model.state_dict(),
            "aux": self.aux.state_dict(),
            "optimizer": self.opt.state_dict(),
        }
        return save_atomic(state, self.run_dir / STATE_FILE)

    def load_state(self, path: str | Path, new_stage: bool = False) -> None:
        """Restore a ``state.pt``; its config must match this run's.

        Only the logging fields and ``steps`` may differ. A different ``steps`` shortens or
        extends the schedule from the saved step on (the cosine is recomputed for the new total),
        which is how a run is fitted into the time that is left; the result is then no longer
        equal to an uninterrupted run with either total, and the run log records the change.

        With ``new_stage`` the fields of :data:`STAGE_FIELDS` (what the losses ask for, not the
        model or the optimiser) may differ too: training goes on from the saved weights with the
        new recipe, a second stage of one run. The log records each change as a ``stage`` event.
        """
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_json(state["config"])
        at = int(state["step"])
        changed = {
            name: (getattr(saved, name), getattr(self.cfg, name))
            for name in (*FIXED_FIELDS, *STAGE_FIELDS)
            if getattr(saved, name) != getattr(self.cfg, name)
        }
        for name, (was, now) in changed.items():
            if name in FIXED_FIELDS or not new_stage:
                hint = " or start a new stage (--new-stage)" if name in STAGE_FIELDS else ""
                raise ValueError(
                    f"cannot resume {path}: it was trained with {name}={was!r}, this run has {name}={now!r}; "
                    f"use the same settings{hint} or a new run dir"
                )
        if saved.steps != self.cfg.steps:
            self.log({"event": "steps_changed", "at_step": at, "from": saved.steps, "to": self.cfg.steps})
        if changed:
            self.log({"event": "stage", "at_step": at, "changed": {k: [v[0], v[1]] for k, v in changed.items()}})
        self.model.load_state_dict(state["model"])
        if all(not k.startswith("question.") for k in state["aux"]):
            # written before the question classifier existed: it keeps its initial weights and
            # starts without optimiser state; every other parameter resumes exactly
            self.aux.load_state_dict(state["aux"], strict=False)
            legacy = self._optimizer(skip=tuple(self.aux.question.parameters()))
            legacy.load_state_dict(state["optimizer"])
            self.opt.state.update(legacy.state)
        else:
            self.aux.load_state_dict(state["aux"])
            self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def export(self, out_dir: str | Path) -> Path:
        """Save the model, tokenizer and processor with ``save_pretrained`` (safetensors).

        The new files are written next to ``out_dir`` and swapped in whole, so an interrupted export
        leaves the old checkpoint intact. Python files of an existing ``out_dir`` (the package's
        ``__init__.py`` when installing into ``tokenprune/synth/checkpoint``) are carried over; every
        other old file is replaced.
        """
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        self.model.save_pretrained(tmp)
        self.processor.save_pretrained(tmp)
        if out.exists():
            for f in out.glob("*.py"):
                shutil.copy2(f, tmp / f.name)
            old = out.with_name(out.name + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        return out

    # -- training ----------------------------------------------------------------------------
    def batch(self, step: int) -> TrainBatch:
        """The batch of ``step`` (curriculum applied)."""
        cfg = self.cfg
        return make_batch(
            self.processor.image_processor,
            cfg.seed,
            step,
            cfg.batch_size,
            max_shapes=curriculum_max_shapes(step, cfg.steps, cfg.curriculum_fraction),
            describe_prob=cfg.describe_prob,
            ground_absent=cfg.ground_absent,
            exists_head=cfg.exists_head,
            extra_exists=cfg.extra_exists,
        )

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimiser step; returns the answer loss and the auxiliary, grounding and question losses."""
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
                image_sizes=batch.image_sizes,
            )
        logits = out.logits.float()
        answer_loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE
        )
        if self._vision_tokens is None or self._projected is None:
            raise RuntimeError("the vision tower / projector hooks did not fire; is this a LlavaNext model?")
        aux_loss = self.aux.loss(self._vision_tokens[:, 1:], self._projected, batch.patch_labels)
        self._vision_tokens = self._projected = None
        loss = answer_loss + self.cfg.aux_weight * aux_loss
        ground_loss = question_loss = torch.zeros(())
        if self.cfg.ground_weight > 0:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
                ground_loss = self.grounding_loss(batch)
            loss = loss + self.cfg.ground_weight * ground_loss
        if self.cfg.question_weight > 0 and batch.question_rows.numel() > 0:
            if self._layer_input is None:
                raise RuntimeError("the grounding layer hook did not fire")
            hidden = self._layer_input[0][batch.question_rows, batch.question_query]  # (M, d)
            question_loss = self.aux.question_loss(hidden, batch.question_labels)
            loss = loss + self.cfg.question_weight * question_loss
        self._layer_input = None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([*self.model.parameters(), *self.aux.parameters()], self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return {
            "loss": float(answer_loss.detach()),
            "aux": float(aux_loss.detach()),
            "ground": float(ground_loss.detach()),
            "question": float(question_loss.detach()),
        }

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to the run's log."""
        append_log(self.run_dir / LOG_FILE, record)

    def run(self, progress: bool = True, stop_after: int | None = None) -> None:
        """Train until ``cfg.steps`` (or ``stop_after`` more steps), checkpointing and evaluating."""
        from tokenprune.synth.evaluate import evaluate
        from tokenprune.synth.questions import validation_split

        torch.set_num_threads(self.cfg.threads)
        val = validation_split(self.cfg.eval_per_type) if self.cfg.eval_every > 0 else []
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, self.step + stop_after)
        ema: dict[str, float] = {}
        t0 = time.time()
        with training_progress("synth train", self.cfg.steps, self.step, enabled=progress) as bar:
            while self.step < end:
                stats = self.train_step(self.batch(self.step))
                smooth(ema, stats, 0.98)
                bar.update(self.step, " ".join(f"{k} {v:.3f}" for k, v in ema.items()))
                record: dict[str, Any] = {"step": self.step, "wall_s": round(time.time() - t0, 1), **stats}
                if self.cfg.eval_every > 0 and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps):
                    res = evaluate(self.model, self.processor, val)
                    record["val"] = res.per_type
                    record["val_mean"] = res.overall
                    bar.print(
                        f"step {self.step}: val {res.overall:.3f} "
                        + " ".join(f"{t} {a:.2f}" for t, a in res.per_type.items())
                    )
                if self.step % 10 == 0 or "val" in record:
                    self.log(record)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == end:
                    self.save_state()
        if self.step >= self.cfg.steps:
            self.export(self.run_dir / MODEL_DIR)


def train(
    cfg: TrainConfig, run_dir: str | Path, resume: bool = True, progress: bool = True, new_stage: bool = False
) -> Trainer:
    """Train (or resume) a run in ``run_dir``; the final model is exported to ``run_dir/model``.

    ``new_stage`` lets a resumed run change the recipe fields (:meth:`Trainer.load_state`).
    """
    trainer = Trainer(cfg, run_dir)
    state = Path(run_dir) / STATE_FILE
    if resume and state.exists():
        trainer.load_state(state, new_stage=new_stage)
    trainer.run(progress=progress)
    return trainer
