"""PaddleOCR-VL's packed tower (``tokenprune/adapters/paddleocr_vl.py``): each frame's patches in raster order, the
projector regrouping every 2x2 unit from them; vision attention, ``pre_projector`` and ``vision_layer: k`` stages on
whole units, on the census's tiny model and inputs.

The unit bookkeeping against the projector's own regrouping (gathered for the reducer, put back for the tower); the
adapter; each token the mean of its 2x2 block of raster patches; the check kit's invariants (keep-all identity, cached
generation == recomputation, batch == one by one with images one and two units wide, ``remove()`` restores) with the
first stage at ``pre_projector`` and at ``vision_layer: 1``; a ``pre_projector`` cut equal to the stock tokens at the
kept units and a ``vision_layer`` cut equal to the encoder's last layer run frame by frame on the kept patches alone
(their rotary positions; the position embeddings were added before layer 0) through the model's own projector;
VisionZip on the tower's attention before and after the projector; FLOPs three ways.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import pytest
import torch
from test_engine_packed_tower import UnitDrop
from test_families import _skip_unless
from test_families_towers import BEFORE, _built, _case, _manager, flops_before_the_merger_agree_three_ways
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.adapters.packed import PackedTower
from tokenprune.errors import TokenpruneError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny, default_cut_layer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TYPE = "paddleocr_vl"


class RowsSeen(UnitDrop):
    """``unit_drop`` that records the rows it reduces."""

    name = "rows_seen"
    seen: ClassVar[list[Tensor]] = []

    def score(self, tokens: Tensor, ctx: tp.ReduceContext) -> Tensor:
        RowsSeen.seen.append(tokens.detach().clone())
        return super().score(tokens, ctx)


class _RowsPlugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(RowsSeen)


def _units(grid: list[list[int]]) -> Any:
    return PackedTower(torch.nn.Identity(), 2, raster=True).units(torch.tensor(grid))


def _projector_order(x: Tensor, grid: list[list[int]]) -> Tensor:
    """The projector's regrouping (``PaddleOCRProjector.forward``): ``(N, D)`` raster patches to ``(U, 4 D)``."""
    out, start = [], 0
    for t, h, w in grid:
        frame = x[start : start + t * h * w].reshape(t, h // 2, 2, w // 2, 2, -1).transpose(2, 3)
        out.append(frame.reshape(t * (h // 2) * (w // 2), -1))
        start += t * h * w
    return torch.cat(out)


def test_the_units_are_gathered_from_raster_patches_as_the_projector_regroups_them():
    """Frames of 4 x 8, 2 x 2 and 4 x 4 patches (one image of two frames): the rows hold each unit's 4 patches side by
    side as the projector reads them, frames in order; a removed unit's row place is zero and invalid; the rows go
    back to the tower's raster order; the patch mask marks the raster places of the alive units' patches."""
    grid = [[1, 4, 8], [1, 2, 2], [2, 4, 4]]
    units = _units(grid)
    x = torch.randn(32 + 4 + 32, 3, generator=torch.Generator().manual_seed(0))
    alive = torch.ones(8 + 1 + 8, dtype=torch.bool)
    rows, valid = units.to_rows(x, alive)
    expected = _projector_order(x, grid)
    assert rows.shape == (4, 8, 12) and valid.sum(1).tolist() == [8, 1, 4, 4]
    torch.testing.assert_close(rows[valid], expected, rtol=0, atol=0)
    torch.testing.assert_close(units.from_rows(rows), x, rtol=0, atol=0)
    alive[[1, 6, 8, 12]] = False
    mask = units.patch_mask(alive)
    assert mask.sum() == 4 * 13
    for u in (1, 6, 8, 12):
        assert not mask[units.patch_index[4 * u : 4 * u + 4]].any()
    rows, valid = units.to_rows(x[mask], alive)
    assert valid.sum(1).tolist() == [6, 0, 3, 4] and not rows[~valid].any()
    torch.testing.assert_close(rows[valid], expected[alive], rtol=0, atol=0)
    torch.testing.assert_close(units.from_rows(rows), x * mask[:, None], rtol=0, atol=0)
    cu, longest = units.seqlens(alive, False)
    assert cu.tolist() == [0, 24, 36, 52] and longest == 24  # the frame left empty is dropped


def test_paddleocr_vl_is_served_by_its_adapter_with_the_raster_packed_tower():
    """The encoder's layers (probed at the last), no CLS; the packed tower is ``visual`` in raster order with 2x2
    units, the projector the model's; the default layer 2."""
    _skip_unless(TYPE)
    with torch.device("meta"):
        model = build_tiny(TYPE)
    adapter = adapter_for(model, _manager())
    tower, packed = adapter.vision_tower(), adapter.packed_tower()
    layers = model.model.visual.vision_model.encoder.layers
    assert adapter.name == TYPE and type(adapter).__module__ == "tokenprune.adapters.paddleocr_vl"
    assert tower.layers == tuple(layers) and tower.feature_layer == len(layers) - 1
    assert not tower.has_cls and not tower.videos
    assert packed.module is model.model.visual and packed.merge == 2 and packed.raster and packed.window is None
    assert adapter.projector() is model.model.projector
    assert adapter.position_scheme == "mrope"
    assert default_cut_layer(adapter)[0] == 2


def test_paddleocr_vl_token_is_the_mean_of_its_two_by_two_block_of_raster_patches():
    """Computed directly: a frame of 4 x 8 patches in raster order (patch ``(r, c)`` at row ``8 r + c``) gives 2 x 4
    tokens, token ``(i, j)`` the mean of patches ``(2i + a, 2j + b)``; a two-frame image its frames one after the
    other."""
    _skip_unless(TYPE)
    with torch.device("meta"):
        model = build_tiny(TYPE)
    adapter = adapter_for(model, _manager())
    grid = torch.tensor([[1, 4, 8], [2, 4, 4]])
    values = [torch.randn(n, 3, generator=torch.Generator().manual_seed(n + i)) for i, n in enumerate((32, 16, 16))]
    mapped = adapter.map_vision_patches(ImageCall((None, grid), {}, None), values)

    def block(v: Tensor, w: int, i: int, j: int) -> Tensor:
        return torch.stack([v[(2 * i + a) * w + 2 * j + b] for a in (0, 1) for b in (0, 1)]).mean(0)

    expected = [
        torch.stack([block(values[0], 8, i, j) for i in range(2) for j in range(4)]),
        torch.stack([block(values[f], 4, i, j) for f in (1, 2) for i in range(2) for j in range(2)]),
    ]
    assert len(mapped) == 2
    for got, want in zip(mapped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("at", BEFORE, ids=str)
def test_stages_before_the_projector_keep_the_invariants(at):
    """The check kit's invariants with its first stage before the projector (whole units), its layer stage at layer 2:
    keep-all identity, cached generation == recomputation (original and compact positions), batch == one by one
    (images one and two units wide) and ``remove()``."""
    case = _case(TYPE, at)
    checks.keep_all_is_identity(case)
    checks.cached_decode_equals_recompute(case)
    checks.cached_decode_equals_recompute(case, positions="compact")
    checks.batch_equals_one_by_one(case)
    checks.remove_restores_model(case)


@pytest.mark.parametrize("at", BEFORE, ids=str)
def test_the_reducer_reads_each_unit_as_the_projector_regroups_its_raster_patches(at):
    """Images of 4 x 4 and (beside a 4 x 4 one) 4 x 8 patches: the rows a stage reduces hold, at each frame's units in raster order, the
    4 patches of the unit side by side as the projector reads them, from the projector's input (``pre_projector``) or
    from the hidden states entering the encoder's layer 1 (``vision_layer: 1``) of the stock model."""
    model, _, make_inputs, manager = _built(TYPE)
    manager.register(_RowsPlugin())
    inputs = make_inputs([1, 2])
    grid = inputs["image_grid_thw"].tolist()
    assert grid == [[1, 4, 4], [1, 4, 8], [1, 4, 4]]
    layer = model.model.visual.vision_model.encoder.layers[1]
    module = model.model.projector if at == "pre_projector" else layer
    stock: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, a: stock.append(a[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    RowsSeen.seen.clear()
    with tp.apply(model, {"stages": [{"at": at, "reducer": "rows_seen", "keep": 2}]}, plugins=manager):
        with torch.no_grad():
            model(**inputs)
    (rows,) = RowsSeen.seen
    expected = _projector_order(stock[0], grid)
    assert rows.shape == (3, 8, 4 * stock[0].shape[-1])
    torch.testing.assert_close(torch.cat([rows[0, :4], rows[1], rows[2, :4]]), expected, rtol=0, atol=0)
    assert not rows[0::2, 4:].any()  # the 4 x 4 frames' rows padded to the 4 x 8 frame's 8 units


def _features(model: Any, pixels: Tensor, grid: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat(list(model.model.get_image_features(pixels, grid).pooler_output))


def _reference_tokens(model: Any, pixels: Tensor, grid: Tensor, keep: Tensor) -> Tensor:
    """The tower by hand: its last encoder layer run frame by frame on the kept units' raster patches with their own
    rotary embeddings (the rest of the tower as the model runs it), then the model's own ``post_layernorm`` and
    projector (its output for the unit's patches only); the kept units' tokens."""
    captured: dict[str, Any] = {}
    last = model.model.visual.vision_model.encoder.layers[-1]

    def grab(m: torch.nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> None:
        captured.update(hidden=a[0], **k)

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    _features(model, pixels, grid)
    handle.remove()
    hidden, (cos, sin) = captured["hidden"], captured["position_embeddings"]
    out, first_unit = torch.zeros_like(hidden), 0
    frames = itertools.pairwise(captured["cu_seqlens"].tolist())
    for (a, b), (t, h, w) in zip(frames, grid.tolist(), strict=True):
        assert t == 1 and b - a == h * w  # one frame per image here
        units = [(u // (w // 2), u % (w // 2)) for u in range(h * w // 4) if keep[first_unit + u]]
        rows = sorted(a + (2 * r + i) * w + 2 * c + j for r, c in units for i in (0, 1) for j in (0, 1))
        first_unit += h * w // 4
        if rows:
            rows_t = torch.tensor(rows)
            cu = torch.tensor([0, len(rows)], dtype=torch.int32)
            embeddings = (cos[rows_t], sin[rows_t])
            with torch.no_grad():
                out[rows_t] = last(hidden[rows_t], cu_seqlens=cu, max_seqlen=len(rows), position_embeddings=embeddings)
    handle = last.register_forward_hook(lambda m, a, o: out)  # the model's own tail (post_layernorm, projector)
    merged = _features(model, pixels, grid)
    handle.remove()
    return merged[keep]


@pytest.mark.parametrize("at", BEFORE, ids=str)
def test_a_cut_before_the_projector_gives_the_tokens_of_the_kept_patches(at):
    """An image 4 x 8 patches (8 units, its units' patches not consecutive in the tower), 3 units kept: the language
    model receives, at the kept units, the stock tokens (``pre_projector``: the projector's MLP reads each unit's own
    patches) or the tokens of the encoder's last layer run on the kept patches alone (``vision_layer: 1``: per frame,
    with their rotary positions; the position embeddings were added before layer 0), through the model's projector."""
    model, adapter, make_inputs, manager = _built(TYPE)
    inputs = make_inputs([1], start=1)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
    seen: list[Tensor] = []
    pipeline = {"stages": [{"at": at, "reducer": "unit_drop", "keep": 3}]}
    with tp.apply(model, pipeline, plugins=manager) as run:
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True
        )
        with torch.no_grad():
            model(**inputs)
        handle.remove()
        (stage,) = run.stats.last_prefill.stages
    kept = torch.tensor(stage.kept[0])
    keep = torch.zeros(8, dtype=torch.bool)
    keep[kept] = True
    assert len(kept) == 3 and stage.entering == [8] and stage.leaving == [3]
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    if at == "pre_projector":
        ref = _features(model, pixels, grid)[keep]
    else:
        ref = _reference_tokens(model, pixels, grid, keep)
        assert (ref - _features(model, pixels, grid)[keep]).abs().max() > 1e-4  # the cut changes them
    image = (inputs["input_ids"][0] == adapter.image_token_id()).nonzero()[:, 0]
    assert seen[0].shape[1] == inputs["input_ids"].shape[1] - 8 + 3
    start = int(image[0])
    torch.testing.assert_close(seen[0][0, start : start + 3], ref, atol=1e-5, rtol=0)


def test_visionzip_ranks_by_the_towers_attention_before_and_after_the_projector():
    """VisionZip (dominant tokens only, ``attention: mean``): a padded batch of different image sizes keeps, per
    sample, the tokens it keeps alone; before the projector (its budget per frame) a one-image sample keeps the same
    units as after it (both rank by the probe's per-patch scores averaged over each unit's raster 2x2 block)."""
    case = _case(TYPE)
    params = {"contextual_ratio": 0.0, "attention": "mean"}
    batch = case.make_inputs([1, 2, 1])
    kept: dict[str, Any] = {}
    for at in ("post_projector", "pre_projector"):
        pipeline = {"stages": [{"at": at, "reducer": "visionzip", "keep": 3, "params": params}]}
        with tp.apply(case.model, pipeline, plugins=case.manager) as run:
            out = case.forward(batch).logits
            (stage,) = run.stats.last_prefill.stages
            kept[at] = stage.kept
            assert stage.entering == [4, 12, 4]
            assert stage.leaving == ([3, 6, 3] if at == "pre_projector" else [3, 3, 3])
            for i in range(3):
                alone = case.forward(case.make_inputs([[1, 2, 1][i]], start=i)).logits
                torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
                assert run.stats.last_prefill.stages[0].kept[0] == kept[at][i]
    assert kept["pre_projector"][0::2] == kept["post_projector"][0::2]


def test_flops_of_stages_before_the_projector_agree_three_ways():
    """With a ``pre_projector`` and a ``vision_layer: 1`` stage, analytic == torch == fvcore on every decoder layer and
    the language model, which runs on the kept units' tokens; the tower does the same work before the projector and
    less after a cut between layers."""
    flops_before_the_merger_agree_three_ways(*_built(TYPE))


def test_a_merge_between_encoder_layers_is_refused_and_a_merge_before_the_projector_runs():
    """ToMe at ``vision_layer: 1`` is refused naming the tower's attention (no mask for proportional attention);
    VisionZip with its contextual tokens (a merge) at ``pre_projector`` merges whole units, per frame: batch == one by
    one."""
    model, _, make_inputs, manager = _built(TYPE)
    inputs = make_inputs([1, 2])
    tome = {"at": {"vision_layer": 1}, "reducer": "tome", "keep": 0.5}
    with tp.apply(model, {"stages": [tome]}, plugins=manager), torch.no_grad():
        with pytest.raises(TokenpruneError, match=r"merges tokens at vision layer 1, but the PaddleOCRVisionModel"):
            model(**inputs)
    zip_ = {"at": "pre_projector", "reducer": "visionzip", "keep": 3, "params": {"attention": "mean"}}
    with tp.apply(model, {"stages": [zip_]}, plugins=manager) as run, torch.no_grad():
        out = model(**inputs).logits
        (s,) = run.stats.last_prefill.stages
        assert s.entering == [4, 12] and s.leaving == [3, 6]
        for i in range(2):
            alone = model(**make_inputs([[1, 2][i]], start=i)).logits
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
