"""Run a comparison: every pipeline on every task's examples, results appended as they come.

Per task, the examples are sorted by visual-token count (``bucket``) so that batches need little
padding; the accuracy pass runs ``generate`` on every batch under every pipeline; then the cost
pass (:mod:`tokenprune.bench.timing`) measures latency and peak memory on a few fixed batches.

Single process, or several under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``): each
rank takes every ``world``-th example, results are gathered batch by batch and written once by rank
0, and the summary is written by rank 0; the cost pass runs on rank 0 while the others wait. The
same command runs either way.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

import tokenprune
from tokenprune.adapters.base import ModelAdapter
from tokenprune.adapters.generic import adapter_for
from tokenprune.adapters.loading import floats_to, load_model
from tokenprune.bench.accounting import example_costs
from tokenprune.bench.config import REFERENCE, CompareConfig, pipeline_key, resolve_pipelines, stable_digest
from tokenprune.bench.metrics import exact_match, kl_divergence, normalize_answer, vqa_score
from tokenprune.bench.records import CostRecord, ResultRecord, Summary
from tokenprune.bench.store import ReferenceLogits, ResultsStore
from tokenprune.bench.tasks import Example, Task
from tokenprune.bench.timing import measure_costs, memory_method, timing_batch_indices
from tokenprune.cost.analytic import DecoderShape
from tokenprune.engine import PreparedPipeline, apply, compat, prepare
from tokenprune.errors import TokenpruneError
from tokenprune.pipeline import Pipeline
from tokenprune.plugins import PluginManager, get_plugin_manager

Progress = Callable[[str, int, int], None]
"""``progress(description, done, total)``: called after every batch (and every cost-pass round)."""
TIMINGS = "timings.jsonl"


@dataclass
class RunOutcome:
    """What a run did."""

    folder: Path
    computed: int
    reused: int
    summary: Summary | None = None
    """What ``summary.json`` holds (rank 0; ``None`` on the other ranks)."""


def compare(
    config: CompareConfig,
    *,
    plugins: PluginManager | None = None,
    progress: Progress | None = None,
    model_and_processor: tuple[nn.Module, Any] | None = None,
) -> RunOutcome:
    """Run ``config``; append to ``<output>/results.jsonl`` and write the summary files.

    Per task: the accuracy pass (every pipeline on every example, with ``generate``), then the cost
    pass (:mod:`tokenprune.bench.timing`, rank 0 only) on a few fixed batches.

    Args:
        config: The comparison config.
        plugins: Plugin manager (default: a fresh one).
        progress: Progress callback (rank 0 only).
        model_and_processor: An already loaded model and processor (skips loading ``config.model``).
    """
    manager = plugins or get_plugin_manager()
    dist = _Distributed.from_env(config.device)
    torch.manual_seed(config.seed)
    model, processor = model_and_processor or load_model(config.model, config.dtype, config.device)
    store = ResultsStore(config.output)
    adapter = adapter_for(model, manager)
    run = _Run(
        config=config,
        model=model,
        processor=processor,
        manager=manager,
        adapter=adapter,
        pipelines=(pipelines := resolve_pipelines(config, manager)),
        prepared={name: prepare(pipe, plugins=manager, check=False) for name, pipe in pipelines},
        store=store,
        refs=ReferenceLogits(config.output),
        done=dist.broadcast(store.done() if dist.rank == 0 else None),
        shape=DecoderShape.from_model(model),
        kv_dims=_kv_dims(adapter),
        dist=dist,
        progress=progress if dist.rank == 0 else None,
    )
    computed = reused = 0
    for task_spec in config.tasks:
        task = _task(task_spec, manager)
        examples = _ordered_examples(run, task)
        c, r = _accuracy_pass(run, task, task_spec, examples)
        computed, reused = computed + c, reused + r
        dist.barrier()
        if dist.rank == 0:
            _cost_pass(run, task, task_spec, examples)
        dist.barrier()
    summary = None
    if dist.rank == 0:
        from tokenprune.bench.report import write_reports

        summary = write_reports(config, run.pipelines, store)
    return RunOutcome(config.output, dist.sum(computed), dist.sum(reused), summary)


@dataclass
class _Run:
    """What every pass of one comparison shares."""

    config: CompareConfig
    model: nn.Module
    processor: Any
    manager: PluginManager
    adapter: ModelAdapter
    pipelines: list[tuple[str, Pipeline]]
    prepared: dict[str, PreparedPipeline]  # validated once, reducers built once, applied by every pass
    store: ResultsStore
    refs: ReferenceLogits
    done: set[tuple[str, str, str]]
    shape: DecoderShape
    kv_dims: list[int]
    dist: _Distributed
    progress: Progress | None


def _ordered_examples(run: _Run, task: Task) -> list[Example]:
    """The task's examples (``meta["index"]``: the position in the task), bucketed by length if configured.

    Bucketing sorts by visual-token count, then prompt length (stable), so that a batch holds
    examples of similar length and little padding. It is a reorder: each example's result is the same.
    """
    examples = [replace(ex, meta={**ex.meta, "index": i}) for i, ex in enumerate(task.examples())]
    if not run.config.bucket:
        return examples
    lengths = []
    for ex in examples:
        ids = _encode(run.processor, task, [ex], run.config.prompt, run.model)["input_ids"]
        visual = run.adapter.visual_mask(ids) | run.adapter.video_mask(ids)
        lengths.append((int(visual.sum()), int(ids.shape[1])))
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    return [examples[i] for i in order]


def _accuracy_pass(run: _Run, task: Task, task_spec: dict[str, Any], examples: list[Example]) -> tuple[int, int]:
    """Every pipeline on this rank's share of ``examples``; returns ``(computed, reused)``."""
    config, dist = run.config, run.dist
    shard = examples[dist.rank :: dist.world]
    new_tokens = config.max_new_tokens or task.generation_tokens()
    ref_key = pipeline_key(REFERENCE, run.pipelines[0][1], config, task_spec)
    reference = _Reference(run.refs, ref_key, task.name, run.store)
    computed = reused = 0
    for name, pipe in run.pipelines:
        key = pipeline_key(name, pipe, config, task_spec)
        todo = [ex for ex in shard if (key, task.name, ex.id) not in run.done]
        reused += len(shard) - len(todo)
        steps = dist.max(math.ceil(len(todo) / config.batch_size))
        with apply(run.model, run.prepared[name], plugins=run.manager) as handle:
            for step in range(steps):
                batch = todo[step * config.batch_size : (step + 1) * config.batch_size]
                records: list[ResultRecord] = []
                logits: list[tuple[str, Tensor]] = []
                if batch:
                    records, logits = _run_batch(run, handle, task, batch, name, key, reference, new_tokens)
                    computed += len(records)
                handle.stats.clear()
                gathered = dist.gather(records)
                if name == REFERENCE:  # every rank runs the same pipeline: the collectives match
                    gathered_logits = dist.gather(logits)
                    if dist.rank == 0:  # logits first: a result line promises its logits exist
                        _persist_reference(run.refs, ref_key, task.name, gathered_logits)
                if dist.rank == 0:
                    run.store.append(gathered)
                    if run.progress is not None:
                        run.progress(f"{task.name} / {name}", step + 1, steps)
    return computed, reused


def _cost_pass(run: _Run, task: Task, task_spec: dict[str, Any], examples: list[Example]) -> None:
    """Latency and peak memory of every pipeline on the task's timing batches, unless already measured."""
    config, settings = run.config, run.config.timing
    size = config.batch_size
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    chosen = [chunks[i] for i in timing_batch_indices(len(chunks), settings.batches)]
    if not chosen:
        return
    keys = {name: pipeline_key(name, pipe, config, task_spec) for name, pipe in run.pipelines}
    digest = stable_digest(
        {"timing": settings.model_dump(), "ids": [[ex.id for ex in c] for c in chosen], "versions": _versions()}
    )
    timings = ResultsStore(config.output, TIMINGS)
    have = {(r.key, r.timing) for r in timings.costs()}
    if all((key, digest) in have for key in keys.values()):
        return
    progress = run.progress

    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress(f"{task.name} / cost pass", done, total)

    batches = [_inputs(run.processor, task, c, config, run.model) for c in chosen]
    costs = measure_costs(
        run.model,
        [(name, run.prepared[name]) for name, _ in run.pipelines],
        batches,
        warmup=settings.warmup,
        repeats=settings.repeats,
        memory=settings.memory,
        device=config.device,
        plugins=run.manager,
        progress=tick,
    )
    method = memory_method(config.device)
    timings.append(
        CostRecord(
            key=keys[name],
            pipeline=name,
            task=task.name,
            timing=digest,
            examples=cost.examples,
            prefill_seconds=list(cost.samples),
            peak_memory_bytes=cost.peak_memory_bytes,
            memory=method if cost.peak_memory_bytes is not None else None,
            device=config.device,
            versions=_versions(),
        )
        for name, cost in costs.items()
    )


# --- one batch -------------------------------------------------------------------------------------


def _run_batch(
    run: _Run,
    handle: Any,
    task: Task,
    batch: list[Example],
    name: str,
    key: str,
    reference: _Reference,
    new_tokens: int,
) -> tuple[list[ResultRecord], list[tuple[str, Tensor]]]:
    """The batch's result records, and (reference pass only) each example's first-token ``(V,)`` logits by id.

    The logits travel beside the records, never in them: they go to the reference logits store, the
    records to ``results.jsonl``.
    """
    config, shape, model = run.config, run.shape, run.model
    gen = _generate_batch(model, run.processor, task, batch, config, new_tokens)
    prefill = handle.stats.last_prefill
    ids = gen.inputs["input_ids"]
    visual_in = (handle.adapter.visual_mask(ids) | handle.adapter.video_mask(ids)).sum(1).tolist()  # images, videos
    real = gen.inputs["attention_mask"].sum(1).tolist()
    bytes_per = torch.finfo(model.dtype).bits // 8
    if prefill is not None and config.heatmaps:
        _draw_heatmaps(prefill, batch, config, name, task.name)
    records, ref_logits = [], []
    for b, ex in enumerate(batch):
        tokens = [row[b] for row in prefill.layer_tokens] if prefill is not None else None
        costs = example_costs(shape, run.kv_dims, bytes_per, tokens, real[b], visual_in[b])
        prediction = gen.texts[b].strip()
        record = ResultRecord(
            key=key,
            config=config.digest(),
            pipeline=name,
            task=task.name,
            id=ex.id,
            group=ex.group,
            question=ex.question,
            prediction=prediction,
            answers=list(ex.answers),
            first_token=int(gen.first_logits[b].argmax()),
            **costs,
            seed=config.seed,
            versions=_versions(),
        )
        if ex.answers:
            record.accuracy = exact_match(prediction, ex.answers)
            record.vqa_score = vqa_score(prediction, ex.answers)
        logits = gen.first_logits[b].float().cpu()
        if name == REFERENCE:  # the reference pass remembers its answer and logits; the others compare
            reference.remember(ex.id, prediction, logits)
            ref_logits.append((ex.id, logits))
        else:
            record.agreement, record.kl = _fidelity(ex.id, prediction, logits, reference)
        records.append(record)
    return records, ref_logits


@dataclass
class _Generated:
    """One batch's greedy generation: the inputs, the answers, the first token's logits."""

    inputs: Any
    texts: list[str]
    first_logits: Tensor


def _generate_batch(
    model: nn.Module, processor: Any, task: Task, batch: list[Example], config: CompareConfig, new_tokens: int
) -> _Generated:
    inputs = _inputs(processor, task, batch, config, model)
    tokenizer = getattr(processor, "tokenizer", processor)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return _Generated(inputs, texts, out.logits[0])


def _inputs(processor: Any, task: Task, batch: list[Example], config: CompareConfig, model: nn.Module) -> Any:
    """The processor's output for ``batch``, on the device, pixels in the model's dtype."""
    return floats_to(_encode(processor, task, batch, config.prompt, model).to(config.device), model.dtype)


def _fidelity(
    example_id: str, prediction: str, logits: Tensor, reference: _Reference
) -> tuple[float | None, float | None]:
    """``(agreement, kl)`` of a pruned pass's answer and ``(V,)`` first-token logits with the reference's."""
    ref_prediction, ref_logits = reference.lookup(example_id)
    agreement = (
        None if ref_prediction is None else float(normalize_answer(prediction) == normalize_answer(ref_prediction))
    )
    kl = None if ref_logits is None else float(kl_divergence(ref_logits, logits))
    return agreement, kl


class _Reference:
    """The unpruned model's answers and first-token logits for one task, for the fidelity metrics.

    Filled during the reference pass (each rank its own examples) and, when resuming, from the
    results and logits that an earlier run stored.
    """

    def __init__(self, logits: ReferenceLogits, key: str, task: str, store: ResultsStore) -> None:
        self._logits, self._key, self._task, self._store = logits, key, task, store
        self._predictions: dict[str, str] | None = None
        self._memory: dict[str, Tensor] = {}

    def remember(self, example_id: str, prediction: str, logits: Tensor) -> None:
        self._stored_predictions()[example_id] = prediction
        self._memory[example_id] = logits

    def lookup(self, example_id: str) -> tuple[str | None, Tensor | None]:
        logits = self._memory.get(example_id)
        if logits is None:
            logits = self._logits.get(self._key, self._task, example_id)
        return self._stored_predictions().get(example_id), logits

    def _stored_predictions(self) -> dict[str, str]:
        if self._predictions is None:
            self._predictions = {
                r["id"]: r["prediction"]
                for r in self._store.records()
                if r["key"] == self._key and r["task"] == self._task
            }  # raw lines: only two keys wanted, no typing of every stored line
        return self._predictions


def _draw_heatmaps(prefill: Any, batch: list[Example], config: CompareConfig, name: str, task: str) -> None:
    """Kept-token heatmaps of the first ``config.heatmaps`` examples (by position in the task) with one image."""
    from tokenprune.bench.heatmap import draw_heatmap, surviving_tokens

    for b, ex in enumerate(batch):
        if ex.meta.get("index", 0) >= config.heatmaps or len(ex.images) != 1:
            continue
        kept = surviving_tokens(prefill, b)
        if kept is not None:
            draw_heatmap(ex.images[0], *kept, config.output / "heatmaps" / name / f"{task}-{ex.id}.png")


def _persist_reference(refs: ReferenceLogits, key: str, task: str, logits: list[tuple[str, Tensor]]) -> None:
    """Store the reference pass's ``(example id, (V,) logits)`` pairs (nothing for another pass)."""
    if logits:
        refs.put(key, task, [i for i, _ in logits], torch.stack([t for _, t in logits]))


def _encode(processor: Any, task: Task, batch: list[Example], template: str | None, model: nn.Module) -> Any:
    image_token = getattr(processor, "image_token", "<image>")
    video_token = getattr(processor, "video_token", "<video>")
    texts = []
    for ex in batch:
        if template is None:
            texts.append(task.prompt(ex, image_token, video_token) if ex.videos else task.prompt(ex, image_token))
        else:
            media = [image_token] * len(ex.images) + [video_token] * len(ex.videos)
            texts.append(template.format(image=" ".join(media), question=ex.question))
    images = [im for ex in batch for im in ex.images]
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    inputs = processor(**kwargs)
    videos = [v for ex in batch for v in ex.videos]
    if videos:  # frames through tokenprune's own preprocessing (transformers' video processors need torchvision)
        from tokenprune.bench import video_inputs as vi

        pixels = vi.video_pixels(processor, model, videos)
        token = int(tokenizer.convert_tokens_to_ids(video_token))
        vi.expand_video_tokens(inputs, token, vi.video_token_counts(model, pixels), int(tokenizer.pad_token_id or 0))
        inputs["pixel_values_videos"] = pixels
    return inputs


def _kv_dims(adapter: ModelAdapter) -> list[int]:
    """Width of each decoder layer's cached keys (the same for its values)."""
    return [int(compat.attention_module(layer).k_proj.out_features) for layer in adapter.decoder_layers()]


def _task(spec: dict[str, Any], manager: PluginManager) -> Task:
    if "name" not in spec:
        raise TokenpruneError(f"a task entry needs a `name`; got {spec}")
    params = {k: v for k, v in spec.items() if k != "name"}
    return manager.tasks.get(spec["name"])(params)


def _versions() -> dict[str, str]:
    return {
        "tokenprune": tokenprune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# --- several processes -----------------------------------------------------------------------------


class _Distributed:
    """torch.distributed when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); no-ops otherwise."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @classmethod
    def from_env(cls, device: str) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def broadcast(self, value: Any) -> Any:
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, records: list[Any]) -> list[Any]:
        """Every rank's ``records`` on rank 0, in rank order (tensors in them: already on the CPU)."""
        if self.world == 1:
            return records
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world if self.rank == 0 else []
        dist.gather_object(records, parts if self.rank == 0 else None, dst=0)
        return [r for part in parts for r in part] if self.rank == 0 else []

    def max(self, value: int) -> int:
        return self._reduce(value, "max")

    def sum(self, value: int) -> int:
        return self._reduce(value, "sum")

    def _reduce(self, value: int, op: str) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


__all__ = ["RunOutcome", "compare"]
