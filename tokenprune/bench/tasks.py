"""Evaluation tasks: where the examples of a comparison come from.

A task is a class with a registry ``name``, a pydantic ``Params`` model and one method,
:meth:`Task.examples`, returning :class:`Example` records: images, a question, the reference
answers and a ``group`` (the question type) for per-group tables. Tasks are registered through the
``tokenprune_register_tasks`` hook, so a third-party package can add one.

Built-in tasks (registered by :mod:`tokenprune.bench.builtin_tasks`):

* ``synthvqa``: the held-out SynthVQA split (:mod:`tokenprune.synth`);
* ``jsonl``: a local file of JSON records plus image files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image
from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class Example:
    """One question about zero or more images.

    Attributes:
        id: Unique within its task; results are keyed by ``(task, id)``, so ids must be stable
            across runs for resuming to work.
        images: The images, in the order of the prompt's image placeholders.
        question: The question text.
        answers: Reference answers (several for VQA-style soft scoring; empty when unlabelled).
        group: A label to break results down by (question type, category).
        videos: The videos, each its frames in order, after the images in the prompt
            (:mod:`tokenprune.bench.video_inputs` builds the model's video inputs from them).
    """

    id: str
    images: Sequence[Image.Image]
    question: str
    answers: Sequence[str] = ()
    group: str = "all"
    meta: Mapping[str, Any] = field(default_factory=dict)
    videos: Sequence[Sequence[Image.Image]] = ()


class TaskParams(BaseModel):
    """Base of every task's ``Params``: unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(ABC):
    """Base class of evaluation tasks.

    Attributes:
        name: Registry name, used as ``tasks: [{name: ...}]`` in comparison configs.
        Params: The task's parameters (validated from the config entry, minus ``name``).
        max_new_tokens: Tokens to generate per answer (a short-answer task needs few).
    """

    name: ClassVar[str]
    Params: ClassVar[type[TaskParams]] = TaskParams
    max_new_tokens: ClassVar[int] = 16

    def __init__(self, params: TaskParams | Mapping[str, Any] | None = None) -> None:
        self.params = params if isinstance(params, TaskParams) else self.Params.model_validate(dict(params or {}))

    @abstractmethod
    def examples(self) -> list[Example]:
        """Every example of the task, in a fixed order."""

    def generation_tokens(self) -> int:
        """Tokens to generate per answer; ``max_new_tokens`` unless the params say otherwise."""
        return self.max_new_tokens

    def prompt(self, example: Example, image_token: str, video_token: str = "<video>") -> str:
        """The user text for ``example``: one ``image_token`` per image, one ``video_token`` per video, then the
        question.

        Override for tasks whose model expects another layout; the harness applies the processor's
        chat template around it when the processor has one (and passes ``video_token`` only for examples
        with videos).
        """
        return " ".join([image_token] * len(example.images) + [video_token] * len(example.videos) + [example.question])
