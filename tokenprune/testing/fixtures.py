"""The pytest fixtures of tokenprune's pytest plugin (entry point ``pytest11: tokenprune``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import Tensor

from tokenprune.plugins import PluginManager, get_plugin_manager
from tokenprune.reducer import ReduceContext
from tokenprune.testing.reducers import make_reduce_inputs


@pytest.fixture
def tokenprune_manager() -> PluginManager:
    """A fresh plugin manager over the installed plugins."""
    return get_plugin_manager()


@pytest.fixture(name="make_reduce_inputs")
def make_reduce_inputs_fixture() -> Callable[..., tuple[Tensor, ReduceContext]]:
    """The :func:`make_reduce_inputs` factory."""
    return make_reduce_inputs
