"""The reducer tutorial (docs/extending/reducers.md) builds a package that installs next to everything else.

Its files are taken from the page as written (each code block under its file name, the complete
``pyproject.toml``), installed the way pip leaves a distribution (a ``dist-info`` folder with the
entry points the ``pyproject.toml`` declares), and then discovered, checked and run.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch

from tokenprune.plugins import get_plugin_manager

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending" / "reducers.md"
BLOCK = re.compile(r"(?:`(?P<path>[^`\n]+)`:\n\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


def _blocks() -> dict[str, str]:
    """The page's code blocks by the file name written above them (``pyproject.toml`` included)."""
    text = PAGE.read_text(encoding="utf-8")
    files = {m["path"]: m["body"] for m in BLOCK.finditer(text) if m["path"]}
    (toml,) = [m["body"] for m in BLOCK.finditer(text) if m["lang"] == "toml"]
    return {**files, "pyproject.toml": toml}


@pytest.fixture
def tutorial_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """The tutorial's package, installed from the page; returns its parsed ``pyproject.toml``."""
    blocks = _blocks()
    project = tomllib.loads(blocks["pyproject.toml"])
    assert project["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    for path, body in blocks.items():
        if path.startswith("src/"):
            target = tmp_path / path.removeprefix("src/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body, encoding="utf-8")
            (target.parent / "__init__.py").touch()
    name, version = project["project"]["name"], project["project"]["version"]
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    points = project["project"]["entry-points"]["tokenprune"]
    lines = "".join(f"{k} = {v}\n" for k, v in points.items())
    (info / "entry_points.txt").write_text(f"[tokenprune]\n{lines}", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield project
    for module in [m for m in sys.modules if m.split(".")[0] in {p.split(".")[0] for p in points.values()}]:
        sys.modules.pop(module)


def test_the_tutorial_uses_names_no_installed_package_uses():
    project = tomllib.loads(_blocks()["pyproject.toml"])
    (plugin,) = project["project"]["entry-points"]["tokenprune"]
    installed = {ep.name for ep in metadata.entry_points(group="tokenprune")}
    assert "centroid" in installed  # the example package the set-up installs (the old tutorial name)
    assert plugin not in installed
    reducer = re.search(r'name = "(\w+)"', _blocks()["src/tokenprune_outlier/reducer.py"])[1]
    assert reducer not in get_plugin_manager().reducers
    assert project["project"]["name"] not in {d.metadata["Name"] for d in metadata.distributions()}


def test_the_tutorial_package_is_discovered_without_collisions(tutorial_package):
    manager = get_plugin_manager()
    assert manager.collisions == []
    assert manager.reducers.describe("outlier") == (
        "reducer 'outlier' (plugin 'outlier', distribution tokenprune-outlier 0.1.0)"
    )
    assert {"centroid", "random"} <= set(manager.reducers)


def test_the_tutorials_contract_test_passes(tutorial_package):
    namespace: dict[str, object] = {}
    exec(_blocks()["tests/test_outlier.py"], namespace)  # the page's own test, as written
    namespace["test_contract"]()


def test_the_tutorial_reducer_is_the_example_package_under_another_name(tutorial_package, make_reduce_inputs):
    from tokenprune_example_reducer import CentroidDistance
    from tokenprune_outlier.reducer import OutlierTokens

    tokens, ctx = make_reduce_inputs(grids=[(3, 4), (2, 3)])
    tokens = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
    for params in ({}, {"metric": "l2"}, {"largest": False}):
        assert torch.equal(OutlierTokens(params).score(tokens, ctx), CentroidDistance(params).score(tokens, ctx))
