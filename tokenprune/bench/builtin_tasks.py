"""The built-in evaluation tasks, registered through the ``tokenprune`` entry point ``tasks``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field

import tokenprune
from tokenprune.bench.tasks import Example, Task, TaskParams
from tokenprune.errors import TokenpruneError
from tokenprune.plugins import TaskRegistry


class SynthVQA(Task):
    """The SynthVQA held-out split: one-word answers, six balanced question types (the groups)."""

    name = "synthvqa"
    max_new_tokens = 1  # every answer is one word, one token of the word-level tokenizer

    class Params(TaskParams):
        split: Literal["heldout", "validation"] = Field(default="heldout", description="Which fixed split.")
        per_type: int = Field(default=50, ge=1, description="Examples per question type.")
        types: list[str] | None = Field(default=None, description="Question types to include (default: all).")

    def examples(self) -> list[Example]:
        from tokenprune.synth.questions import QUESTION_TYPES, heldout_split, validation_split
        from tokenprune.synth.scenes import render

        types = tuple(self.params.types or QUESTION_TYPES)
        unknown = sorted(set(types) - set(QUESTION_TYPES))
        if unknown:
            raise TokenpruneError(f"synthvqa: unknown question types {unknown}; known: {', '.join(QUESTION_TYPES)}")
        split = heldout_split if self.params.split == "heldout" else validation_split
        out = []
        for sample in split(self.params.per_type, types):
            pixels = render(sample.scene)[0]
            out.append(
                Example(
                    id=str(sample.sample_id),
                    images=[Image.fromarray(pixels)],
                    question=sample.qa.question,
                    answers=[sample.qa.answer],
                    group=sample.qa.qtype,
                )
            )
        return out


class JsonlTask(Task):
    """Records from a local JSON-lines file with image files beside it.

    Each line: ``{"id": ..., "image": "a.png" or ["a.png", ...], "question": "...",
    "answers": ["..."] or "answer": "...", "group": "..."}``; ``id`` defaults to the line number,
    ``group`` to ``"all"``, answers may be absent (then only fidelity metrics apply). Image paths are
    relative to ``image_root`` (default: the file's folder).
    """

    name = "jsonl"

    class Params(TaskParams):
        path: Path = Field(description="The JSON-lines file.")
        image_root: Path | None = Field(default=None, description="Folder of the images (default: the file's).")
        limit: int | None = Field(default=None, ge=1, description="Use only the first N records.")
        max_new_tokens: int = Field(default=16, ge=1, description="Tokens generated per answer.")

    def generation_tokens(self) -> int:
        return self.params.max_new_tokens

    def examples(self) -> list[Example]:
        path = self.params.path
        if not path.is_file():
            raise TokenpruneError(f"jsonl task: {path} does not exist")
        root = self.params.image_root or path.parent
        out: list[Example] = []
        seen: set[str] = set()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if self.params.limit is not None and len(out) >= self.params.limit:
                break
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TokenpruneError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise TokenpruneError(f"{where}: a record needs a string field 'question'")
            images = record.get("image", record.get("images", []))
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise TokenpruneError(f"{where}: 'image' must be a file name or a list of file names")
            loaded = []
            for name in images:
                file = root / name
                if not file.is_file():
                    raise TokenpruneError(f"{where}: image {file} does not exist")
                with Image.open(file) as im:
                    loaded.append(im.convert("RGB"))
            answers = record.get("answers", record.get("answer", []))
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            example_id = str(record.get("id", number))
            if example_id in seen:
                raise TokenpruneError(f"{where}: duplicate id {example_id!r}; ids must be unique for resuming to work")
            seen.add(example_id)
            out.append(Example(example_id, loaded, record["question"], answers, str(record.get("group", "all"))))
        return out


@tokenprune.hookimpl
def tokenprune_register_tasks(registry: TaskRegistry) -> None:
    registry.add(SynthVQA)
    registry.add(JsonlTask)
