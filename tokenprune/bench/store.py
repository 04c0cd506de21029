"""Crash-safe results: one JSON line per (pipeline, task, example), appended as the run goes.

A run killed at any point (Ctrl-C, a crash, ``kill -9``) keeps every line it finished; a torn last
line is dropped on the next read. A rerun skips the examples whose result key is already there, so
nothing is computed twice. The cost pass's measurements go to ``timings.jsonl`` the same way. The
unpruned reference's first-token logits (for the KL metric) are kept beside the results as
safetensors shards, written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tokenprune.bench.records import CostRecord, ResultRecord


class ResultsStore:
    """``results.jsonl`` (or another JSON-lines file: ``timings.jsonl``) in a run folder."""

    def __init__(self, folder: Path, filename: str = "results.jsonl") -> None:
        self.folder = folder
        self.path = folder / filename

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record; a torn final line (from a killed run) is skipped."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn write: the run died mid-line
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError:
                    continue

    def results(self) -> Iterator[ResultRecord]:
        """Every complete line of a results file, typed (lines of any earlier version read as well)."""
        return (ResultRecord.from_json(r) for r in self.records())

    def costs(self) -> Iterator[CostRecord]:
        """Every complete line of a timings file, typed."""
        return (CostRecord.from_json(r) for r in self.records())

    def done(self) -> set[tuple[str, str, str]]:
        """``(result key, task, example id)`` of every stored result."""
        return {(r["key"], r["task"], r["id"]) for r in self.records()}

    def append(self, records: Iterable[ResultRecord | CostRecord | dict[str, Any]]) -> None:
        """Append records durably (one write, flushed and fsynced); a typed record is written as its ``to_json()``."""
        lines = b"".join(json.dumps(_line(r), sort_keys=True).encode() + b"\n" for r in records)
        if not lines:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        with self.path.open("ab") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def _drop_torn_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)


class ReferenceLogits:
    """First-answer-token logits of the unpruned model, per ``(reference key, task, example id)``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "reference"
        self._cache: dict[str, Tensor] = {}
        self._loaded = False

    def put(self, key: str, task: str, ids: list[str], logits: Tensor) -> None:
        """Store ``(B, V)`` logits for ``ids`` in one new shard (atomic)."""
        if not ids:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            _name(key, task, i): logits[j].detach().to("cpu", torch.float32).contiguous() for j, i in enumerate(ids)
        }
        shard = self.folder / f"{key}-{task}-{len(list(self.folder.glob('*.safetensors'))):06d}.safetensors"
        tmp = shard.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, shard)

    def get(self, key: str, task: str, example_id: str) -> Tensor | None:
        """Logits stored by an earlier run (read once, on first use)."""
        if not self._loaded:
            for shard in sorted(self.folder.glob("*.safetensors")):
                self._cache.update(load_file(str(shard)))
            self._loaded = True
        return self._cache.get(_name(key, task, example_id))


def _line(record: ResultRecord | CostRecord | dict[str, Any]) -> dict[str, Any]:
    return record if isinstance(record, dict) else record.to_json()


def _name(key: str, task: str, example_id: str) -> str:
    return f"{key}/{task}/{example_id}"
