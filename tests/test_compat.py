"""The compatibility module: the declared transformers range, the refusal outside it, feature detection."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tiny_models as tm
from packaging.requirements import Requirement
from packaging.version import Version

import tokenprune as tp
from tokenprune.engine import compat
from tokenprune.errors import TokenpruneError, UnsupportedTransformersError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PIPE = {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]}


def _pyproject_requirement() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return next(r for r in reqs if r.name == "transformers")


def _matrix() -> list[str]:
    lines = (ROOT / "scripts" / "transformers-matrix.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize(
    "version",
    [
        "5.0.0",
        "5.17.0",
        "5.18.0",
        "5.19.0",
        "5.20.0",
        "5.20.2",
        "5.21.1",
        "5.24.0",
        "5.25.0",
        "5.25.9",
        "5.26.0",
        "6.0.0",
    ],
)
def test_pyproject_declares_exactly_the_supported_range(version):
    assert (version in _pyproject_requirement().specifier) == compat.is_supported(version)


def test_the_matrix_covers_both_ends_of_the_range():
    versions = sorted(_matrix(), key=Version)
    floor, ceiling = (Version(v) for v in compat.SUPPORTED)
    assert Version(versions[0]) == floor
    assert all(compat.is_supported(v) for v in versions)
    newest = Version(versions[-1])
    assert (newest.major, newest.minor + 1) == (ceiling.major, ceiling.minor)  # the newest minor in range


def test_the_installed_release_is_supported():
    assert compat.is_supported(), f"tests run on transformers {compat.transformers_version()}"


@pytest.mark.parametrize("installed", ["5.17.0", "5.20.2", "5.26.0"])
def test_apply_refuses_a_release_outside_the_range(monkeypatch, installed):
    monkeypatch.setattr(compat, "transformers_version", lambda: installed)
    monkeypatch.delenv(compat.OVERRIDE_VARIABLE, raising=False)
    model = tm.llava().model
    with pytest.raises(UnsupportedTransformersError) as err:
        tp.apply(model, PIPE)
    message = str(err.value)
    assert installed in message and compat.supported_range() in message and compat.OVERRIDE_VARIABLE in message
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_the_override_turns_the_refusal_into_a_warning(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.99.0")
    monkeypatch.setenv(compat.OVERRIDE_VARIABLE, "1")
    tiny = tm.llava()
    inputs = tiny.make_inputs([(56, 56)])
    with pytest.warns(UserWarning, match="5.99.0"), tp.apply(tiny.model, PIPE) as run:
        tiny.model(**inputs)
    assert run.stats.last_prefill.stages[0].leaving < run.stats.last_prefill.stages[0].entering


def test_cache_argument_is_found_by_signature():
    def old(input_ids=None, past_key_values=None): ...

    def new(input_ids=None, cache=None): ...

    def neither(input_ids=None): ...

    assert compat.cache_argument_name(old) == "past_key_values"
    assert compat.cache_argument_name(new) == "cache"
    with pytest.raises(TokenpruneError, match="no KV cache argument"):
        compat.cache_argument_name(neither)
    assert compat.cache_from_kwargs({"cache": "c"}) == "c"
    assert compat.cache_from_kwargs({"past_key_values": "p"}) == "p"
    assert compat.cache_from_kwargs({}) is None


def test_the_installed_models_take_a_cache_argument_the_engine_knows():
    tiny = tm.llava_next()
    for module in (tiny.model, tiny.model.model, tiny.model.model.language_model):
        assert compat.cache_argument_name(module.forward) in compat.CACHE_ARGUMENTS


def test_an_unrecognised_cache_is_an_error_not_a_prefill():
    assert compat.cache_length(None) == 0
    with pytest.raises(TokenpruneError, match="unrecognised KV cache of type object"):
        compat.cache_length(object())


def test_rotary_modules_are_found_by_their_inv_freq_buffer():
    decoder = tm.qwen2_vl().model.get_decoder()
    assert compat.rotary_embedding_names(decoder) == ["rotary_emb"]


def test_missing_image_processor_class_names_the_release():
    with pytest.raises(TokenpruneError, match=f"transformers {compat.transformers_version()} has no NoSuch"):
        compat.image_processor_class("NoSuch")
    assert compat.image_processor_class("LlavaNext").__name__ == "LlavaNextImageProcessorPil"


# Modules that must reach transformers' internals only through tokenprune.engine.compat.
THROUGH_COMPAT = [
    *sorted((ROOT / "tokenprune" / "engine").glob("*.py")),
    *sorted((ROOT / "tokenprune" / "cost").glob("*.py")),
    ROOT / "tokenprune" / "bench" / "runner.py",
    *sorted((ROOT / "tokenprune" / "testing").glob("*.py")),
]
INTERNALS = ("past_key_values", "_attn_implementation", "_global_mapping", "self_attn", "get_seq_length", "inv_freq")


@pytest.mark.parametrize("path", [p for p in THROUGH_COMPAT if p.name != "compat.py"], ids=lambda p: p.name)
def test_transformers_internals_are_read_only_in_compat(path):
    tree = ast.parse(path.read_text())
    imports = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [None])
    ]
    assert not [m for m in imports if m and m.startswith("transformers.")], "import transformers internals via compat"
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & set(INTERNALS), f"{path.name} reads {sorted(names & set(INTERNALS))}; go through compat"


def test_stacked_gemma4_video_positions_are_read_as_frames_of_each_video():
    """transformers 5.18's Gemma 4 ``get_video_features`` takes ``(V, F, P, 2)`` positions and no frame counts:
    they flatten to ``(V * F, P, 2)`` with ``F`` frames per video; the flat 5.21+ form passes unchanged."""
    import torch

    stacked = torch.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
    flat, frames = compat.flat_video_frames(stacked, None)
    assert torch.equal(flat, stacked.reshape(6, 4, 2)) and frames == [3, 3]
    counts = torch.tensor([2, 4])
    same, given = compat.flat_video_frames(flat, counts)
    assert same is flat and given is counts
