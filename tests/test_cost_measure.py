"""Latency, memory and KV-cache measurements."""

import sys

import pytest
import tiny_models
import torch

from tokenprune.cost.measure import Timing, kv_cache_bytes, kv_cache_tokens, peak_memory_bytes, time_call


def test_time_call_runs_warmup_then_repeats():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.samples) == 3
    assert min(timing.samples) <= timing.median <= max(timing.samples)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_call(lambda: None, repeats=0)


def test_timing_statistics():
    t = Timing((1.0, 2.0, 3.0, 4.0, 100.0))
    assert t.median == 3.0
    assert t.spread == pytest.approx(52.0 - 1.5)  # exclusive quartiles: Q1 = 1.5, Q3 = 52
    assert Timing((2.0, 5.0)).spread == 3.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc is Linux-only")
def test_peak_memory_sees_a_temporary_allocation():
    size = 256 * 2**20

    def allocate():
        t = torch.ones(size // 4)  # touched, so resident
        return float(t[-1])

    peak, out = peak_memory_bytes(allocate)
    assert out == 1.0
    assert peak is not None and peak >= 0.9 * size


def test_kv_cache_bytes_and_tokens_match_the_model_shape():
    tiny = tiny_models.llava_next()
    inputs = tiny.make_inputs([(56, 56)])
    with torch.no_grad():
        out = tiny.model(**inputs, use_cache=True)
    length = inputs["input_ids"].shape[1]
    assert kv_cache_tokens(out.past_key_values) == [length] * 4
    kv_heads, head_dim = 2, 16
    assert kv_cache_bytes(out.past_key_values) == [2 * 1 * kv_heads * length * head_dim * 4] * 4


def test_kv_cache_bytes_rejects_other_objects():
    with pytest.raises(TypeError, match="not a transformers cache"):
        kv_cache_bytes(object())
