"""An lmms-eval model: any supported transformers VLM with a tokenprune pipeline applied.

Installed with ``pip install "tokenprune[lmms]"``; tokenprune's ``pyproject.toml`` registers it in
lmms-eval's ``lmms_eval.models`` entry-point group as ``tokenprune``, so a machine with weights and
datasets runs::

    lmms-eval --model tokenprune \\
        --model_args pretrained=llava-hf/llava-v1.6-mistral-7b-hf,pipeline=fastv.yaml,batch_size=8 \\
        --tasks textvqa_val,gqa,pope --batch_size 8

``model_args``: ``pretrained`` (hub id or folder), ``pipeline`` (a pipeline YAML file; none: the
unpruned model), ``dtype`` (default ``bfloat16`` on CUDA, ``float32`` otherwise), ``device``,
``batch_size``, ``prompt`` (a template with ``{image}`` and ``{question}``; default: the
processor's chat template if it has one, else the image placeholders, a newline, the question).
Unlike lmms-eval's own LLaVA wrappers, batches larger than one are supported: samples of a batch
keep different numbers of tokens when the pipeline says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from tokenprune.engine import PruningRun, apply
from tokenprune.errors import TokenpruneError
from tokenprune.loading import load_model
from tokenprune.pipeline import Pipeline, load_pipeline


class TokenpruneLMM(lmms):
    """lmms-eval's simple-model API (``generate_until``, ``loglikelihood``) over a pruned VLM."""

    def __init__(
        self,
        pretrained: str,
        pipeline: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        prompt: str | None = None,
        max_new_tokens: int | str = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TokenpruneError(
                f"tokenprune lmms-eval model: unknown model_args {sorted(kwargs)}; known: pretrained, pipeline, "
                "dtype, device, batch_size, prompt, max_new_tokens"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        self.model, self.processor = load_model(pretrained, dtype, device)
        self.device = device
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self.pipeline = load_pipeline(Path(pipeline)) if pipeline else Pipeline(name="unpruned")
        self.run: PruningRun = apply(self.model, self.pipeline)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # --- lmms-eval API -------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, if ``gen_kwargs`` say so) answers, cut at the ``until`` strings."""
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = [r.args for r in requests[start : start + self.batch_size_per_gpu]]
            texts, images = [], []
            for context, _, doc_to_visual, doc_id, task, split in chunk:
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                texts.append(self._format(context, len(visuals)))
                images.extend(visuals)
            gen = dict(chunk[0][1])
            until = gen.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(gen.pop("max_new_tokens", self.max_new_tokens))
            temperature = float(gen.pop("temperature", 0.0) or 0.0)
            inputs = self._encode(texts, images)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new,
                    do_sample=temperature > 0,
                    **({"temperature": temperature} if temperature > 0 else {}),
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            decoded = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for text in decoded:
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                answers.append(text.strip())
            self.run.stats.clear()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities, and whether greedy decoding would produce it."""
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._format(context, len(visuals))
            cont_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            inputs = self._encode([prompt + continuation], visuals)
            n = int(cont_ids.numel())
            if n == 0 or not torch.equal(inputs["input_ids"][0, -n:].cpu(), cont_ids):
                raise TokenpruneError(
                    "loglikelihood: the continuation does not tokenize to the end of the prompt; check the prompt "
                    "template (a continuation should start a new token)"
                )
            with torch.inference_mode():
                logits = self.model(**inputs).logits[0, -n - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            target = cont_ids.to(logprobs.device)
            total = float(logprobs.gather(-1, target[:, None]).sum())
            results.append((total, bool((logprobs.argmax(-1) == target).all())))
            self.run.stats.clear()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tokenprune lmms-eval model answers single-round requests only")

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
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: registers this model as ``tokenprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokenprune", simple_class_path="tokenprune.integrations.lmms_eval.TokenpruneLMM")
