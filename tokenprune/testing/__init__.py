"""Test kits for plugin authors, installed as a pytest plugin (entry point ``pytest11: tokenprune``).

* :mod:`tokenprune.testing.reducers`: the reducer contract checks (:func:`check_reducer`) and the
  synthetic inputs they run on (:func:`make_reduce_inputs`);
* :mod:`tokenprune.testing.adapters`: the engine invariants as checks for adapter authors
  (:func:`~tokenprune.testing.adapters.check_adapter`; also importable as
  ``tokenprune.testing_adapters``, deprecated);
* :mod:`tokenprune.testing.video_towers`: the check of an adapter's video map
  (:func:`~tokenprune.testing.video_towers.video_patches_map_to_tokens`) on a batch with videos;
* :mod:`tokenprune.testing.syncs`: :class:`SyncCounter`, which counts host reads of tensor data
  (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, ...: syncs on a GPU) during a forward on any
  device, with the forward, phase, decoder layer and owner of each;
* :mod:`tokenprune.testing.fixtures`: the fixtures ``tokenprune_manager`` (a fresh plugin manager
  over the installed plugins) and ``make_reduce_inputs`` (the factory :func:`make_reduce_inputs`).

In any environment where tokenprune is installed a plugin's test suite can do::

    from tokenprune.testing import check_reducer

    def test_my_reducer_honours_the_contract():
        check_reducer(MyReducer)                  # or check_reducer(MyReducer, {"alpha": 0.5})
"""

from tokenprune.testing.fixtures import make_reduce_inputs_fixture, tokenprune_manager
from tokenprune.testing.reducers import (
    ReducerContractError,
    check_batch_matches_single,
    check_decode_steps,
    check_deterministic,
    check_inputs_unchanged,
    check_keep_all_is_identity,
    check_nan_input,
    check_overhead_is_counted,
    check_params_reject_unknown,
    check_random_budgets,
    check_reducer,
    check_valid_result,
    dense_context,
    make_reduce_inputs,
)
from tokenprune.testing.syncs import Sync, SyncCounter

__all__ = [
    "ReducerContractError",
    "Sync",
    "SyncCounter",
    "check_batch_matches_single",
    "check_decode_steps",
    "check_deterministic",
    "check_inputs_unchanged",
    "check_keep_all_is_identity",
    "check_nan_input",
    "check_overhead_is_counted",
    "check_params_reject_unknown",
    "check_random_budgets",
    "check_reducer",
    "check_valid_result",
    "dense_context",
    "make_reduce_inputs",
    "make_reduce_inputs_fixture",
    "tokenprune_manager",
]
