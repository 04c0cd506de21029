"""fastervlm, vispruner and visionzip end to end on every built-in adapter family: a padded batch of different image
sizes (and a text-only sample) keeps the same tokens and gives the same logits as one by one.

Towers without a CLS token (SigLIP, Qwen2-VL) rank by the ``mean`` vision attention. The manager is built
from the plugin modules (their entry points reach the shared venv only when it is reinstalled).
"""

from __future__ import annotations

import pytest
import tiny_models
import tokenprune_fastervlm
import tokenprune_visionzip
import tokenprune_vispruner
import torch
from engine_fixtures import ADAPTERS, BATCH_SPECS, forward, manager_with

import tokenprune as tp
from tokenprune.errors import TokenpruneError


def _manager() -> tp.plugins.PluginManager:
    return manager_with(tokenprune_fastervlm, tokenprune_vispruner, tokenprune_visionzip)


@pytest.fixture(scope="module", params=ADAPTERS)
def tiny(request):
    return getattr(tiny_models, request.param)()


NO_VISION_ATTENTION: set[str] = set()
"""Families whose adapters serve no vision attention yet (docs/status.md): vision stages are refused there.
Every built-in family serves it now."""


@pytest.mark.parametrize("reducer", ["fastervlm", "vispruner", "visionzip"])
def test_batched_equals_one_by_one(tiny, reducer):
    manager = _manager()
    adapter = manager.adapters.get(tiny.model.config.model_type)(tiny.model)
    tower = adapter.vision_tower()
    if tiny.name in NO_VISION_ATTENTION:
        assert tower is None
        pipe = {"stages": [{"at": "post_projector", "reducer": reducer, "keep": 0.5, "params": {"attention": "mean"}}]}
        with pytest.raises(TokenpruneError, match=f"the {adapter.name!r} adapter does not describe its vision tower"):
            tp.apply(tiny.model, pipe, plugins=manager)
        return
    assert tower is not None, f"the {tiny.name} adapter describes no vision tower"
    attention = "cls" if tower.has_cls else "mean"
    specs = [*BATCH_SPECS[tiny.name], None]
    pipe = {"stages": [{"at": "post_projector", "reducer": reducer, "keep": 0.5, "params": {"attention": attention}}]}
    with tp.apply(tiny.model, pipe, plugins=manager) as run:
        batched = forward(tiny.model, tiny.make_inputs(specs), tiny.name)
        stage = run.stats.last_prefill.stages[0]
        kept, before = stage.kept, stage.entering
        for i, spec in enumerate(specs):
            alone = forward(tiny.model, tiny.make_inputs([spec], start=i), tiny.name)
            if spec is not None:
                assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            torch.testing.assert_close(alone.logits[0, -1], batched.logits[i, -1], rtol=1e-4, atol=1e-5)
    assert kept[-1] == []
    assert all(0 < len(k) < n for k, n in zip(kept[:-1], before[:-1], strict=True))
