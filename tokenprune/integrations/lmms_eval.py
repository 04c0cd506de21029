"""An lmms-eval model: any supported transformers VLM with a tokenprune pipeline applied.

Installed with ``pip install --no-deps lmms-eval==0.7.3`` and ``pip install "tokenprune[lmms]"``
(lmms-eval's own requirements pull torchvision, hence a CUDA torch, onto a CPU machine; the extra
holds what its command line needs); tokenprune's ``pyproject.toml`` registers the model in lmms-eval's
``lmms_eval.models`` entry-point group as ``tokenprune``, so a machine with weights and datasets runs::

    lmms-eval --model tokenprune \\
        --model_args pretrained=llava-hf/llava-v1.6-mistral-7b-hf,pipeline=fastv.yaml \\
        --tasks textvqa_val,gqa,pope --batch_size 8

``model_args``: ``pretrained`` (hub id or folder), ``pipeline`` (a pipeline YAML file; none: the
unpruned model), ``dtype`` (default ``bfloat16`` on CUDA, ``float32`` otherwise), ``device``,
``prompt`` (a template with ``{image}`` and ``{question}``; default: the processor's chat template
if it has one, else the image placeholders, a newline, the question), ``max_new_tokens`` (when a
task sets none), ``costs`` (a JSON-lines file: per generated answer its task, ``doc_id``, pipeline,
model, and the tokens each decoder layer held, visual tokens, prefill MACs and KV-cache bytes, counted
as ``tokenprune compare`` counts them; ``tokenprune report`` reads it from the run folder for matched
budgets, so put it under ``--output_path``). The batch size comes from ``--batch_size`` (a number, or ``auto``: start at
``--max_batch_size``, default 64, and halve on out-of-memory); the same value in ``model_args`` is
accepted, a different one refused. Unlike lmms-eval's own LLaVA wrappers, batches larger than one are
supported: samples of a batch keep different numbers of tokens when the pipeline says so. Requests
are batched only with requests of the same generation settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from tokenprune.adapters.loading import floats_to, load_model
from tokenprune.engine import PruningRun, apply, prepare
from tokenprune.errors import TokenpruneError
from tokenprune.pipeline import Pipeline
from tokenprune.plugins import get_plugin_manager

MODEL_ARGS = (
    "pretrained",
    "pipeline",
    "dtype",
    "device",
    "batch_size",
    "max_batch_size",
    "prompt",
    "max_new_tokens",
    "costs",
)

AUTO_START = 64  # the first batch size tried by --batch_size auto without --max_batch_size


class Loglikelihood(tuple, GenerationResult):
    """``(loss, is_greedy)`` of one loglikelihood request: a tuple, and also a ``GenerationResult``.

    lmms-eval 0.7.3 turns every model output that is neither a string nor a ``GenerationResult`` into
    its ``str()`` (``unwrap_generation_output``), so a bare tuple reaches ``loglikelihood`` and
    ``multiple_choice`` tasks as text. As a ``GenerationResult`` whose ``text`` is the plain tuple,
    it reaches them intact; everywhere else it is the tuple lmms-eval's API documents.
    """

    def __new__(cls, loss: float, is_greedy: bool) -> Loglikelihood:
        return super().__new__(cls, (loss, is_greedy))

    def __init__(self, loss: float, is_greedy: bool) -> None:
        """Nothing to set: the values are the tuple's."""

    @property
    def text(self) -> tuple[float, bool]:  # type: ignore[override]
        """The plain ``(loss, is_greedy)`` tuple lmms-eval's evaluator unwraps."""
        return (self[0], self[1])


class TokenpruneLMM(lmms):
    """lmms-eval's simple-model API (``generate_until``, ``loglikelihood``) over a pruned VLM."""

    def __init__(
        self,
        pretrained: str,
        pipeline: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,
        prompt: str | None = None,
        max_new_tokens: int | str = 64,
        costs: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TokenpruneError(
                f"tokenprune lmms-eval model: unknown model_args {sorted(kwargs)}; known: {', '.join(MODEL_ARGS)}"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        self.batch_size_per_gpu, self.auto_batch = _batch_size(batch_size, max_batch_size)
        self.model, self.processor = load_model(pretrained, dtype, device)
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        manager = get_plugin_manager()
        prepared = prepare(Path(pipeline) if pipeline else Pipeline(name="unpruned"), plugins=manager)
        self.pipeline = prepared.pipeline
        self.run: PruningRun = apply(self.model, prepared, plugins=manager)
        label = self.pipeline.name or (Path(pipeline).stem if pipeline else "unpruned")
        self.costs = _CostLog(Path(costs), self.model, self.run, label, pretrained) if costs else None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> TokenpruneLMM:
        """``--model_args`` plus the CLI's own settings; one given in both must agree (lmms-eval always passes
        ``batch_size``, so ``batch_size=8`` in ``model_args`` with ``--batch_size 8`` is fine)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        for key in sorted(set(args) & set(extra)):
            if str(args[key]) != str(extra[key]) and key == "batch_size" and str(extra[key]) == "1":
                extra.pop(key)  # lmms-eval's default --batch_size; the model_args value stands
            elif str(args[key]) != str(extra[key]):
                raise TokenpruneError(
                    f"tokenprune lmms-eval model: model_args {key}={args[key]} disagrees with --{key} {extra[key]}; "
                    f"give it once, with --{key}"
                )
            else:
                extra.pop(key)
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # --- lmms-eval API -------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers, generated in batches of requests with equal generation settings, cut at the ``until`` strings."""
        answers: dict[int, str] = {}
        for settings, indices in _group_by_settings(requests).items():
            start = 0
            while start < len(indices):
                chunk = indices[start : start + self.batch_size_per_gpu]
                try:
                    texts = self._generate([requests[i].args for i in chunk], json.loads(settings))
                except torch.OutOfMemoryError:
                    if not self.auto_batch or self.batch_size_per_gpu == 1:
                        raise
                    self.batch_size_per_gpu //= 2
                    continue
                answers.update(zip(chunk, texts, strict=True))
                start += len(chunk)
        return [answers[i] for i in range(len(requests))]

    def loglikelihood(self, requests: list[Instance]) -> list[Loglikelihood]:
        """Per request: ``(loss, is_greedy)``, as lmms-eval's own models return them.

        ``loss`` is the mean negative log-likelihood of the continuation's tokens (what lmms-eval's LLaVA
        returns as ``outputs.loss``; its ``multiple_choice`` tasks pick the choice with the *lowest*
        value), ``is_greedy`` whether greedy decoding would produce the continuation. Context and
        continuation are encoded separately and joined, as lmms-eval's own models do, so a continuation
        appended without a space is scored on its own tokens."""
        return [self._loglikelihood(*r.args) for r in requests]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tokenprune lmms-eval model answers single-round requests only")

    # --- requests ------------------------------------------------------------------------------

    def _generate(self, chunk: Sequence[tuple[Any, ...]], gen: dict[str, Any]) -> list[str]:
        texts, images, docs = [], [], []
        for context, _, doc_to_visual, doc_id, task, split in chunk:
            docs.append((task, doc_id))
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            texts.append(self._format(context, len(visuals)))
            images.extend(visuals)
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else [u for u in (until or []) if u]
        inputs = self._encode(texts, images)
        prompt = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                **_generation_kwargs(gen, self.max_new_tokens),
                stopping_criteria=StoppingCriteriaList([_StopStrings(self.tokenizer, until, prompt)] if until else []),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        if self.costs is not None:
            self.costs.write(docs, inputs)
        self.run.stats.clear()
        decoded = self.tokenizer.batch_decode(out[:, prompt:], skip_special_tokens=True)
        return [_cut(text, until) for text in decoded]

    def _loglikelihood(
        self, context: str, doc_to_target: Any, doc_to_visual: Any, doc_id: int, task: str, split: str
    ) -> Loglikelihood:
        doc = self.task_dict[task][split][doc_id]
        continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
        visuals = self._visuals(doc_to_visual, task, split, doc_id)
        inputs = self._encode([self._format(context, len(visuals))], visuals)
        cont_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if cont_ids.numel() == 0:
            raise TokenpruneError(
                f"loglikelihood: task {task!r}, doc {doc_id}: the continuation {continuation!r} is empty"
            )
        inputs = _append_tokens(inputs, cont_ids.to(inputs["input_ids"].device))
        n = int(cont_ids.shape[1])
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0, -n - 1 : -1].float()
        self.run.stats.clear()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = cont_ids[0].to(logprobs.device)
        loss = -float(logprobs.gather(-1, target[:, None]).mean())
        return Loglikelihood(loss, bool((logprobs.argmax(-1) == target).all()))

    # --- helpers -------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if any(not hasattr(v, "convert") for v in visuals):
            raise TokenpruneError(f"task {task!r}: only image visuals are supported (got {type(visuals[0]).__name__})")
        return [v.convert("RGB") for v in visuals]

    def _format(self, context: str, images: int) -> str:
        token = getattr(self.processor, "image_token", "<image>")
        placeholders = " ".join([token] * images)
        if self.prompt is not None:
            return self.prompt.format(image=placeholders, question=context)
        if images and token not in context:
            context = f"{placeholders}\n{context}"
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages = [{"role": "user", "content": [{"type": "text", "text": context}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return context

    def _encode(self, texts: list[str], images: list[Any]) -> Any:
        self.tokenizer.padding_side = "left"
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        return floats_to(self.processor(**kwargs).to(self.device), self.model.dtype)


class _CostLog:
    """Appends one JSON line per generated answer: what ``tokenprune compare`` records of its prefill cost."""

    def __init__(self, path: Path, model: Any, run: PruningRun, pipeline: str, pretrained: str) -> None:
        from tokenprune.cost.analytic import DecoderShape
        from tokenprune.engine import compat

        self.path, self.run, self.pipeline, self.pretrained = path, run, pipeline, pretrained
        self.shape = DecoderShape.from_model(model)
        self.kv_dims = [
            int(compat.attention_module(layer).k_proj.out_features) for layer in run.adapter.decoder_layers()
        ]
        self.bytes_per = torch.finfo(model.dtype).bits // 8

    def write(self, docs: Sequence[tuple[str, int]], inputs: Any) -> None:
        """Costs of the batch just generated (``docs``: its ``(task, doc_id)`` in order)."""
        from tokenprune.bench.accounting import example_costs

        prefill = self.run.stats.last_prefill
        visual = self.run.adapter.visual_mask(inputs["input_ids"]).sum(1).tolist()
        real = inputs["attention_mask"].sum(1).tolist()
        lines = []
        for b, (task, doc_id) in enumerate(docs):
            tokens = [row[b] for row in prefill.layer_tokens] if prefill is not None else None
            costs = example_costs(self.shape, self.kv_dims, self.bytes_per, tokens, real[b], visual[b])
            record = {"task": task, "doc_id": doc_id, "pipeline": self.pipeline, "model": self.pretrained, **costs}
            lines.append(json.dumps(record) + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(lines)


def _batch_size(value: int | str, max_batch_size: int | str | None) -> tuple[int, bool]:
    """``(batch size, auto)`` from ``--batch_size``: a number, ``auto`` or ``auto:N`` (N: lmms-eval's recompute
    interval, unused here; the batch only shrinks, on out-of-memory)."""
    text = str(value).strip()
    if text.startswith("auto"):
        return int(max_batch_size) if max_batch_size else AUTO_START, True
    try:
        size = int(text)
    except ValueError:
        raise TokenpruneError(f"tokenprune lmms-eval model: --batch_size {value!r} is not a number or 'auto'") from None
    if size < 1:
        raise TokenpruneError(f"tokenprune lmms-eval model: --batch_size must be at least 1, got {size}")
    return size, False


def _group_by_settings(requests: Sequence[Instance]) -> dict[str, list[int]]:
    """Request indices by their generation settings (a canonical JSON key), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        key = json.dumps(request.args[1] or {}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return groups


def _generation_kwargs(gen: dict[str, Any], default_max_new_tokens: int) -> dict[str, Any]:
    """``generate`` keyword arguments from a task's ``generation_kwargs`` (``until`` taken out).

    Greedy unless ``do_sample`` is set or ``temperature`` is positive; sampling settings are passed only
    when sampling. Every other key goes to ``generate`` as it is, which refuses the ones it does not know.
    """
    gen = {k: v for k, v in gen.items() if v is not None}
    temperature = float(gen.pop("temperature", 0.0))
    do_sample = bool(gen.pop("do_sample", temperature > 0))
    sampling = {k: gen.pop(k) for k in ("top_p", "top_k") if k in gen}
    out: dict[str, Any] = {"max_new_tokens": int(gen.pop("max_new_tokens", default_max_new_tokens)), **gen}
    out["do_sample"] = do_sample
    if do_sample:
        out.update(sampling, **({"temperature": temperature} if temperature > 0 else {}))
    return out


class _StopStrings(StoppingCriteria):
    """Stops each row once its decoded answer contains a stop string (any tokenizer: transformers' own
    ``stop_strings`` needs a vocabulary that spells arbitrary text, which word-level tokenizers lack)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` before the first occurrence of any stop string, stripped."""
    for stop in until:
        if stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def _append_tokens(inputs: Any, ids: Tensor) -> Any:
    """Append ``(1, n)`` token ``ids`` to a processor's one-sample output (masks and token-type rows extended)."""
    length = int(inputs["input_ids"].shape[1])
    for key in list(inputs.keys()):
        value = inputs[key]
        if not isinstance(value, Tensor) or value.dim() != 2 or value.shape != (1, length):
            continue
        if key == "input_ids":
            extra = ids
        elif key == "attention_mask":
            extra = torch.ones_like(ids)
        else:  # token types (mm_token_type_ids, token_type_ids): text
            extra = torch.zeros_like(ids)
        inputs[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
    return inputs


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: registers this model as ``tokenprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokenprune", simple_class_path="tokenprune.integrations.lmms_eval.TokenpruneLMM")
