"""The built-in evaluation tasks, registered through the ``tokenprune`` entry point ``tasks``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import Field

import tokenprune
from tokenprune.bench.tasks import Example, Task, TaskParams
from tokenprune.errors import TokenpruneError
from tokenprune.plugins import TaskRegistry


class SynthVQA(Task):
    """The SynthVQA held-out split: short answers ended by ``</s>``, six balanced question types (the groups)."""

    name = "synthvqa"
    max_new_tokens = 6  # a cap: answers are one or two words, then the model's </s> ends generation

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


class _OpenEndedParams(TaskParams):
    """What every task over a file of open-ended questions takes: a cap on examples and on answer tokens."""

    limit: int | None = Field(default=None, ge=1, description="Use only the first N examples.")
    max_new_tokens: int = Field(default=16, ge=1, description="Tokens generated per answer.")


class _OpenEndedTask(Task):
    """A task whose answers are generated up to ``max_new_tokens`` (its ``Params`` extend :class:`_OpenEndedParams`)."""

    def generation_tokens(self) -> int:
        return self.params.max_new_tokens


class JsonlTask(_OpenEndedTask):
    """Records from a local JSON-lines file with image files beside it.

    Each line: ``{"id": ..., "image": "a.png" or ["a.png", ...], "question": "...",
    "answers": ["..."] or "answer": "...", "group": "..."}``; ``id`` defaults to the line number,
    ``group`` to ``"all"``, answers may be absent (then only fidelity metrics apply). A video task gives
    ``"video": ["f0.png", "f1.png", ...]`` (one video's frames in order) or ``"videos": [[...], ...]``.
    Image paths are relative to ``image_root`` (default: the file's folder).
    """

    name = "jsonl"

    class Params(_OpenEndedParams):
        path: Path = Field(description="The JSON-lines file.")
        image_root: Path | None = Field(default=None, description="Folder of the images (default: the file's).")

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
            loaded = _load_images(root, images, where)
            videos = _videos_of(record, where)
            answers = record.get("answers", record.get("answer", []))
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            example_id = str(record.get("id", number))
            if example_id in seen:
                raise TokenpruneError(f"{where}: duplicate id {example_id!r}; ids must be unique for resuming to work")
            seen.add(example_id)
            group = str(record.get("group", "all"))
            clips = [_load_images(root, v, where) for v in videos]
            out.append(Example(example_id, loaded, record["question"], answers, group, videos=clips))
        return out


def _load_images(root: Path, names: list[str], where: str) -> list[Image.Image]:
    loaded = []
    for name in names:
        file = root / name
        if not file.is_file():
            raise TokenpruneError(f"{where}: image {file} does not exist")
        with Image.open(file) as im:
            loaded.append(im.convert("RGB"))
    return loaded


def _videos_of(record: dict[str, Any], where: str) -> list[list[str]]:
    """A record's videos as lists of frame files (``video``: one video, ``videos``: several)."""
    videos = [record["video"]] if "video" in record else record.get("videos", [])
    if not isinstance(videos, list) or not all(
        isinstance(v, list) and v and all(isinstance(f, str) for f in v) for v in videos
    ):
        raise TokenpruneError(f"{where}: 'video' must be a list of frame files ('videos': a list of such lists)")
    return videos


class DiskDataset(_OpenEndedTask):
    """A Hugging Face dataset saved with ``datasets.Dataset.save_to_disk`` (needs ``pip install datasets``).

    Columns are named by the params; the image column holds images (the ``Image`` feature: PIL
    images) or lists of them; the answers column a string or a list of strings.
    """

    name = "hf_disk"

    class Params(_OpenEndedParams):
        path: Path = Field(description="The folder written by save_to_disk (a Dataset, or a DatasetDict with split).")
        split: str | None = Field(default=None, description="Split of a saved DatasetDict.")
        image_column: str = Field(default="image", description="Column of images (or lists of images).")
        question_column: str = Field(default="question", description="Column of questions.")
        answers_column: str | None = Field(default="answers", description="Column of answers (None: unlabelled).")
        id_column: str | None = Field(default=None, description="Column of unique ids (default: row number).")
        group_column: str | None = Field(default=None, description="Column to break results down by.")

    def examples(self) -> list[Example]:
        try:
            import datasets
        except ImportError:
            raise TokenpruneError("the hf_disk task needs the `datasets` package: pip install datasets") from None
        p = self.params
        if not p.path.exists():
            raise TokenpruneError(f"hf_disk task: {p.path} does not exist")
        data = datasets.load_from_disk(str(p.path))
        if isinstance(data, datasets.DatasetDict):
            if p.split is None or p.split not in data:
                raise TokenpruneError(f"hf_disk task: {p.path} holds splits {sorted(data)}; choose one with `split:`")
            data = data[p.split]
        needed = [c for c in (p.image_column, p.question_column, p.answers_column, p.id_column, p.group_column) if c]
        missing = [c for c in needed if c not in data.column_names]
        if missing:
            raise TokenpruneError(f"hf_disk task: columns {missing} are not in {p.path} (columns: {data.column_names})")
        if p.limit is not None:
            data = data.select(range(min(p.limit, len(data))))
        out = []
        for i, row in enumerate(data):
            images = row[p.image_column]
            images = [] if images is None else images if isinstance(images, list) else [images]
            answers = row[p.answers_column] if p.answers_column else []
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers or []]
            out.append(
                Example(
                    id=str(row[p.id_column]) if p.id_column else str(i),
                    images=[im.convert("RGB") for im in images],
                    question=row[p.question_column],
                    answers=answers,
                    group=str(row[p.group_column]) if p.group_column else "all",
                )
            )
        return out


@tokenprune.hookimpl
def tokenprune_register_tasks(registry: TaskRegistry) -> None:
    registry.add(SynthVQA)
    registry.add(JsonlTask)
    registry.add(DiskDataset)
