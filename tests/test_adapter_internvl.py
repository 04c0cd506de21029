"""InternVL's layout: each image's crops (views 1..n-1), then its thumbnail (view 0), tile-local raster grids."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from engine_fixtures import TestReducers, pipe

import tokenprune as tp
from tokenprune.testing.adapters import adapter_check_manager


@pytest.fixture(scope="module")
def tiny() -> tm.Tiny:
    return tm.internvl()


def _layout(tiny: tm.Tiny, specs: list) -> tp.layout.TokenLayout:
    plugins = adapter_check_manager(TestReducers())
    with tp.apply(tiny.model, pipe(("post_projector", "check_drop", 1.0)), plugins=plugins) as run, torch.no_grad():
        tiny.model(**tiny.make_inputs(specs))
    return run.stats.forwards[0].stages[0].layout


def test_crops_then_thumbnail_each_a_raster_grid(tiny):
    """A 112 px image: 4 crops and a thumbnail; a 56 px image: one tile, view 0. Pixel shuffle: 2 x 2 tokens."""
    lay = _layout(tiny, [[(112, 112), (56, 56)]])
    assert lay.image[0].tolist() == [0] * 20 + [1] * 4
    assert lay.view[0].tolist() == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [0] * 4 + [0] * 4
    assert lay.row[0].tolist() == [0, 0, 1, 1] * 6
    assert lay.col[0].tolist() == [0, 1, 0, 1] * 6
    assert not lay.newline.any()


def test_each_token_covers_the_2x2_patches_of_its_row_and_column(tiny):
    """The model's pixel shuffle on patch coordinates: token (r, c) holds patches 2r..2r+1 x 2c..2c+1."""
    side = 4
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).float()[None]
    shuffled = tiny.model.model.pixel_shuffle(coords, scale_factor=0.5).reshape(-1, 8)
    adapter = tp.get_plugin_manager().adapters.get("internvl")(tiny.model)
    rows, cols = adapter.tile_grid()
    for k in range(shuffled.shape[0]):
        patches = {(int(shuffled[k, 2 * j]), int(shuffled[k, 2 * j + 1])) for j in range(4)}
        r, c = int(rows[k]), int(cols[k])
        assert patches == {(2 * r + a, 2 * c + b) for a in (0, 1) for b in (0, 1)}


def test_a_spatial_reducer_plans_per_tile(tiny):
    """downsample keeps a share of every view (tile), which the layout makes possible."""
    inputs = tiny.make_inputs([(112, 112)])
    with tp.apply(tiny.model, pipe(("post_projector", "downsample", 0.25))) as run, torch.no_grad():
        tiny.model(**inputs)
    stage = run.stats.forwards[0].stages[0]
    views = stage.layout.view[0][stage.kept[0]].tolist()
    assert sorted(set(views)) == [0, 1, 2, 3, 4]


def test_a_saved_checkpoint_loads_and_gets_the_same_layout(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText

    tiny.model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    specs = [[(112, 56), (56, 56)]]
    expected = _layout(tiny, specs)
    got = _layout(tm.Tiny("internvl", loaded, tiny.make_inputs), specs)
    assert got.view.tolist() == expected.view.tolist() and got.row.tolist() == expected.row.tolist()
    assert got.view[0].tolist()[:12] == [1] * 4 + [2] * 4 + [0] * 4  # 2 crops and the thumbnail
