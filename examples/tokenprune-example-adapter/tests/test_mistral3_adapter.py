"""The example adapter's own tests, as a third party would write them."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from tiny_mistral3 import IMG_BREAK, IMG_END, SPECS
from tokenprune_example_adapter import Mistral3Adapter

import tokenprune as tp
from tokenprune.adapters import ImageCall
from tokenprune.testing.adapters import check_adapter

DIST = "tokenprune-example-adapter"


def test_it_keeps_the_engine_invariants(tiny):
    """Every check of check_adapter, exactly as the built-in adapters are tested."""
    check_adapter(tiny.model, tiny.make_inputs, SPECS)


def test_the_layout_has_a_newline_per_row_but_the_last(tiny):
    """image_layouts, on a recorded get_image_features call: raster grids, [IMG_BREAK] as newlines."""
    inputs = tiny.make_inputs([[(56, 112), (112, 84)]])
    with torch.no_grad():
        output = tiny.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    call = ImageCall((inputs["pixel_values"], inputs["image_sizes"]), {}, output)
    wide, tall = Mistral3Adapter(tiny.model).image_layouts(call)
    assert wide.row.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]  # 2 x 4, one break after row 0
    assert wide.col.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]  # a newline's column is the grid width
    assert wide.newline.tolist() == [[False] * 4 + [True] + [False] * 4]
    assert tall.shape == (1, 4 * 3 + 3) and int(tall.newline.sum()) == 3 and int(tall.image.max()) == 1
    # The layout lines up with the prompt: newlines exactly where the processor wrote [IMG_BREAK].
    ids = inputs["input_ids"][0]
    visual = Mistral3Adapter(tiny.model).visual_mask(ids)
    assert torch.equal(ids[visual] == IMG_BREAK, torch.cat([wide.newline[0], tall.newline[0]]))
    assert not bool(visual[ids == IMG_END].any())


def test_the_engine_sees_the_layout_and_protects_the_breaks(tiny):
    """In a pruned run, every [IMG_BREAK] survives (protect_newlines) and the layout reaches the reducer."""
    inputs = tiny.make_inputs([(112, 84), (56, 112)])
    pipeline = {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.4}]}
    with tp.apply(tiny.model, pipeline) as run:
        tiny.model(**inputs)
    (stage,) = run.stats.last_prefill.stages
    assert stage.entering == [15, 9]  # 4x3 + 3 breaks, 2x4 + 1 break
    assert stage.leaving == [6, 3]  # 40 %, rounded down; the breaks count towards the budget
    layout = stage.layout
    for b, kept in enumerate(stage.kept):
        newlines = layout.newline[b, : stage.entering[b]].nonzero().squeeze(1).tolist()
        assert set(newlines) <= set(kept), f"sample {b}: a row break was pruned"


def test_it_is_discovered_through_its_entry_point():
    metadata.distribution(DIST)  # installed (pip install -e examples/tokenprune-example-adapter)
    manager = tp.get_plugin_manager()
    assert manager.adapters.get("mistral3") is Mistral3Adapter
    origin = manager.adapters.origin("mistral3")
    assert (origin.name, origin.distribution) == ("mistral3", DIST)
    assert "mistral3" in tp.list_adapters()


def test_without_it_the_generic_adapter_serves_mistral3_without_the_row_breaks(tiny):
    """Without this plugin, tokenprune's generic adapter serves Mistral3: the grid comes from ``image_sizes``,
    but the [IMG_BREAK] row ends stay text tokens (this adapter makes them visual newlines, protected)."""
    manager = tp.get_plugin_manager(disabled=["mistral3"])
    pipeline = {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]}
    with tp.apply(tiny.model, pipeline, plugins=manager) as run:
        tiny.model(**tiny.make_inputs([(112, 84)]))
    assert run.adapter.name == "generic (mistral3)"
    (stage,) = run.stats.last_prefill.stages
    assert stage.entering == [12]  # the 4x3 [IMG] tokens; the 3 breaks are not reduced
    assert stage.layout.row[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert not bool(stage.layout.newline.any())


def test_the_core_never_names_it():
    """tokenprune itself neither imports nor names the example adapter (it is found as a plugin)."""
    root = Path(tp.__file__).resolve().parent
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for name in ("tokenprune_example_adapter", "tokenprune-example-adapter", "Mistral3Adapter", "mistral3"):
            assert name not in text, f"{path} names {name!r}"


def test_the_tutorial_shows_this_code():
    """Every Python and TOML block of docs/extending/adapters.md is verbatim in this package (or, for
    the other architectures it cites, in tokenprune's built-in adapters); usage snippets that start
    with ``import tokenprune as tp`` are exempt."""
    package = Path(__file__).resolve().parents[1]
    tutorial = package.parents[1] / "docs" / "extending" / "adapters.md"
    if not tutorial.is_file():
        pytest.skip("the tutorial is not next to this package (installed outside the tokenprune repository)")
    sources = [
        *package.rglob("*.py"),
        package / "pyproject.toml",
        *(Path(tp.__file__).parent / "adapters").glob("*.py"),
    ]
    text = "\n".join(path.read_text(encoding="utf-8") for path in sources)
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", tutorial.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 8
    for block in blocks:
        if not block.startswith("import tokenprune as tp"):
            assert block in text, f"the tutorial shows code that is not in the package:\n{block}"
