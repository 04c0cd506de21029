"""The engine's modules are named after their concepts; the one old path the API reference documented warns."""

from __future__ import annotations

import importlib

import pytest

from tokenprune.engine import run_stats

RENAMED = {
    "decode": "pruned_inputs",
    "signals": "attention_signals",
    "residuals": "deepstack",
    "state": "forward_state",
    "calls": "feature_calls",
    "vision": "vision_probe",
}


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_renamed_modules_exist_under_their_new_name_only(old, new):
    importlib.import_module(f"tokenprune.engine.{new}")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"tokenprune.engine.{old}")


def test_the_documented_stats_path_warns_and_serves_the_same_classes():
    from tokenprune.engine import stats

    for name in ("RunStats", "ForwardStats", "StageStats"):
        with pytest.warns(DeprecationWarning, match="tokenprune.engine.run_stats"):
            cls = getattr(stats, name)
        assert cls is getattr(run_stats, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        stats.nope  # noqa: B018
