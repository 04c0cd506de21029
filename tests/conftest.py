"""Shared fixtures: fake installed distributions for plugin-discovery tests."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Install a throwaway distribution with a ``tokenprune`` entry point onto ``sys.path``.

    ``fake_distribution(dist, module, source, entry_point=None, version="1.0")`` writes ``module`` with
    ``source`` and a ``dist-info`` folder declaring ``entry_point = module`` in the ``tokenprune``
    group, exactly what ``pip install`` leaves behind. Returns the module name.
    """
    created: list[str] = []

    def make(dist: str, module: str, source: str, entry_point: str | None = None, version: str = "1.0") -> str:
        root = tmp_path / dist
        root.mkdir()
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[tokenprune]\n{entry_point or module} = {module}\n", encoding="utf-8")
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        created.append(module)
        return module

    yield make
    for module in created:
        sys.modules.pop(module, None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, untrained mini VLM saved with its processor, to load back with ``from_pretrained``."""
    from tokenprune.synth.model import TINY, build_model
    from tokenprune.synth.processor import build_processor

    path = tmp_path_factory.mktemp("tiny-mini-vlm")
    build_model(TINY, seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nxt():
    """A tiny LLaVA-NeXT with its input builder (``tests/tiny_models.py``), one per test module."""
    import tiny_models

    return tiny_models.llava_next()


@pytest.fixture(scope="module")
def plugins():
    """The installed plugins plus the engine tests' reducers (``tests/engine_fixtures.py``)."""
    from engine_fixtures import manager

    return manager()
