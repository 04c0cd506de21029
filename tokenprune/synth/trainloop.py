"""What every training loop of tokenprune shares: the JSON-lines log, atomic checkpoints, the progress bar.

Used by the mini VLM's training (:mod:`tokenprune.synth.train`) and by ATP's (``tokenprune_atp.trainer``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


def append_log(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_atomic(state: Mapping[str, Any], path: Path) -> Path:
    """``torch.save`` ``state`` to ``path`` through a temporary file, so a killed run never leaves it torn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    return path


def smooth(ema: dict[str, float], values: Mapping[str, float], decay: float) -> dict[str, float]:
    """Update exponential moving averages of ``values`` in place (a new key starts at its value)."""
    for key, value in values.items():
        ema[key] = value if key not in ema else decay * ema[key] + (1 - decay) * value
    return ema


class TrainingProgress:
    """A progress bar over training steps with a free-text field (losses); disabled, it prints nothing."""

    def __init__(self, bar: Any, task: Any) -> None:
        self._bar, self._task = bar, task

    def update(self, step: int, info: str) -> None:
        """Show ``step`` steps done and ``info``."""
        self._bar.update(self._task, completed=step, info=info)

    def print(self, message: str) -> None:
        """A line above the bar."""
        self._bar.console.print(message)


@contextlib.contextmanager
def training_progress(label: str, total: int, completed: int, *, enabled: bool) -> Iterator[TrainingProgress]:
    """A :class:`TrainingProgress` titled ``label`` for ``total`` steps, ``completed`` of them already done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, disable=not enabled) as bar:
        yield TrainingProgress(bar, bar.add_task("train", total=total, completed=completed, info=""))
