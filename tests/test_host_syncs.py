"""Host reads of tensor data (syncs on a GPU) in a pruned forward, counted on the CPU by SyncCounter.

The budget (docs/benchmarks.md, "Host syncs"): tokenprune reads nothing from the device in a decoder
layer that holds no stage and nothing in a decoding step, after a cut or keeping everything; a stage
reads at most :data:`PER_STAGE` times (engine and reducer together, whatever the batch size), the
prefill outside the stages at most :data:`PER_PREFILL` times for these two images. The reducers in
:data:`OVER_BUDGET` read more per stage today; their counts are pinned so that none grows unnoticed.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch

import tokenprune as tp
from tokenprune.adapters import llava_next
from tokenprune.testing import SyncCounter

PER_STAGE = 24
"""Most host reads one stage may make (the engine's own are about 7 of them, and 2 for a vision signal)."""
PER_PREFILL = 48
"""Most host reads of a prefill outside its stages, for the two-image batch below (the image layouts of
LLaVA-NeXT's anyres tiles are most of them: about 22 per image)."""
OVER_BUDGET = {
    # its own 3 (the spatial plan, every group's crops in one read, the selection) over the 23 of the engine
    # and its two vision signals (the features layer and the object layer)
    ("hiprune", "post_projector"): 26,
    # its budget and its reduction find each sample's video frames on the host (3 reads per sample each, and the
    # budget's frame count per sample): 29 for the batch of 2, over the engine's 15
    ("fastvid", "post_projector"): 29,
}
"""Per-stage counts of the reducers that loop over samples or picks on the host today (batch of 2)."""
LAYER = 2
NEW_TOKENS = 2


@pytest.fixture(scope="module")
def tiny() -> tiny_models.Tiny:
    return tiny_models.llava_next()


@pytest.fixture(scope="module")
def inputs(tiny: tiny_models.Tiny) -> dict:
    return tiny.make_inputs([(56, 56), (56, 112)])  # two images, padded: masks and ragged counts on the path


def _params(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if name == "hiprune":  # its default object layer (9) is deeper than the tiny tower's 2 layers
        return {"object_layer": 1}
    if name != "atp":
        return {}
    from tokenprune_atp import ATPConfig, ATPWeights

    torch.manual_seed(0)
    weights = ATPWeights(ATPConfig(hidden_size=64, num_layers=4, layers=[1, 2, 3]))
    return {"weights": str(weights.save(tmp_path_factory.mktemp("atp") / "w"))}


def _count(tiny: tiny_models.Tiny, inputs: dict, pipeline: dict) -> SyncCounter:
    """The host reads of a generation, the image layouts computed afresh (the worst case: no size seen before)."""
    llava_next.forget_layouts()
    with tp.apply(tiny.model, pipeline), SyncCounter(tiny.model) as syncs, torch.inference_mode():
        tiny.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    assert syncs.phases == ["prefill"] + ["decode"] * (NEW_TOKENS - 1)
    return syncs


def _stage(at: str, name: str, keep: float, params: dict | None = None) -> dict:
    where = "post_projector" if at == "post_projector" else {at: LAYER}
    return {"stages": [{"at": where, "reducer": name, "keep": keep, "params": params or {}}]}


@pytest.fixture(scope="module")
def fixed(tiny: tiny_models.Tiny, inputs: dict) -> int:
    """The prefill's reads outside its stages: a layer stage's run, outside the decoder layers."""
    return _count(tiny, inputs, _stage("layer", "random", 0.5)).per_layer(owner="tokenprune", phase="prefill")[None]


def _builtins() -> list[tuple[str, str]]:
    registry = tp.get_plugin_manager().reducers
    out = []
    for name in sorted(registry):
        if registry.origin(name).distribution != "tokenprune":
            continue
        points = registry.get(name).capabilities.insertion_points
        out += [(name, at) for at in ("post_projector", "layer", "decode") if at in points]
    return out


BUILTINS = _builtins()


def test_every_builtin_reducer_and_insertion_point_is_counted():
    names = {name for name, _ in BUILTINS}
    assert {"random", "fastv", "fastervlm", "vispruner", "dycoke_dp", "atp", "cdpruner"} <= names
    assert ("random", "post_projector") in BUILTINS and ("random", "layer") in BUILTINS


@pytest.mark.parametrize(("name", "at"), BUILTINS, ids=[f"{n}@{a}" for n, a in BUILTINS])
def test_no_host_read_per_layer_or_step_and_a_constant_per_stage(name, at, tiny, inputs, fixed, tmp_path_factory):
    syncs = _count(tiny, inputs, _stage(at, name, 0.5, _params(name, tmp_path_factory)))
    mine = syncs.select(owner="tokenprune")
    if at == "decode":  # a decode stage runs in every step: its budget is a stage's, per step
        steps = syncs.per_forward(owner="tokenprune", phase="decode")
        assert steps and max(steps.values()) <= OVER_BUDGET.get((name, at), PER_STAGE), syncs.report(mine)
        layers = syncs.per_layer(owner="tokenprune", phase="decode")
        assert set(layers) == {LAYER}, syncs.report(mine)  # all in the stage's layer: none in the layers after it
        return
    assert syncs.count(owner="tokenprune", phase="decode") == 0, syncs.report(mine)
    per_layer = syncs.per_layer(owner="tokenprune", phase="prefill")
    host = LAYER - 1 if at == "layer" else None  # a layer stage runs in a forward hook of layer k - 1
    strays = {layer: n for layer, n in per_layer.items() if layer not in (None, host)}
    assert not strays, syncs.report(s for s in mine if s.layer in strays)
    assert fixed <= PER_PREFILL
    stage = per_layer[host] if at == "layer" else per_layer[None] - fixed
    assert 0 < stage <= OVER_BUDGET.get((name, at), PER_STAGE), syncs.report(mine)


@pytest.mark.parametrize("at", ["post_projector", "layer"])
@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_decoding_reads_nothing_at_keep_all_and_after_a_cut(at, keep, tiny, inputs):
    """Keep-all on one unpadded sample (where the engine passes the layers no mask), a cut on a padded batch."""
    batch = tiny.make_inputs([(56, 112)]) if keep == 1.0 else inputs
    syncs = _count(tiny, batch, _stage(at, "random", keep))
    assert syncs.count(owner="tokenprune", phase="decode") == 0, syncs.report(syncs.select(owner="tokenprune"))
    assert set(syncs.per_layer(owner="tokenprune", phase="prefill")) <= {None, LAYER - 1}


def test_the_probes_read_nothing_per_layer(tiny, inputs):
    """FastV's attention probe (layer stage) and FasterVLM's vision probe (post_projector): their reads
    fall in the stage, none in another decoder layer or a decoding step."""
    for at, name in (("layer", "fastv"), ("post_projector", "fastervlm")):
        syncs = _count(tiny, inputs, _stage(at, name, 0.5))
        assert syncs.count(owner="tokenprune", phase="decode") == 0
        assert set(syncs.per_layer(owner="tokenprune", phase="prefill")) <= {None, LAYER - 1}


def test_the_counter_catches_each_kind_of_host_read():
    x = torch.arange(6.0)
    with SyncCounter() as syncs:
        x.sum().item()
        x.tolist()
        bool(x.any())
        int(x[2])
        float(x.max())
        x.numpy()
        x.cpu()
        x.nonzero()
        x.masked_select(x > 2)
        x[x > 2]
        torch.unique(x)
        x.repeat_interleave(torch.tensor([1, 0, 1, 0, 1, 0]))
        x[torch.tensor([0, 2])]  # integer indices: the shape is known, no read
        (x * 2).sum().argmax()  # stays on the device
    kinds = [s.kind for s in syncs.syncs]
    assert kinds[:7] == ["item", "tolist", "item", "item", "item", "numpy", "cpu"]
    assert kinds[7:9] == ["nonzero", "masked_select"] and kinds[9] == "bool index"
    assert len(kinds) == 12 and "unique" in kinds[10] and "repeat_interleave" in kinds[11]
    assert all(s.owner == "model" and s.phase == "outside" for s in syncs.syncs)


def test_the_counter_places_a_deliberate_read_in_its_layer_and_step(tiny, inputs):
    layers = list(tp.get_plugin_manager().adapters.get("llava_next")(tiny.model).decoder_layers())

    def read(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.abs().max().item()

    handle = layers[3].register_forward_pre_hook(read, with_kwargs=True)
    try:
        syncs = _count(tiny, inputs, _stage("layer", "random", 0.5))
    finally:
        handle.remove()
    deliberate = [s for s in syncs.select(owner="model", layer=3, kind="item")]
    assert [(s.forward, s.phase) for s in deliberate] == [(0, "prefill")] + [
        (i, "decode") for i in range(1, NEW_TOKENS)
    ]
    stage = syncs.select(owner="tokenprune", layer=LAYER - 1)
    assert stage and any("run_stage" in frame for s in stage for frame in s.where)
    assert "layer 1" in str(stage[0]) and "tokenprune" in syncs.report(stage)
