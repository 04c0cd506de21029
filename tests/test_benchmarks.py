"""The benchmark scripts run in their quick mode and write their tables between their markers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune.cost.measure import Case, Timing, interleaved, paired_ratio

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == code, result.stderr[-3000:]
    return result


def _doc(tmp_path: Path, *sections: str) -> Path:
    doc = tmp_path / "benchmarks.md"
    body = "".join(f"<!-- benchmarks:{s}:begin -->\nold {s}\n<!-- benchmarks:{s}:end -->\n" for s in sections)
    doc.write_text(f"# Benchmarks\n\nbefore\n{body}after\n", encoding="utf-8")
    return doc


def _header(out: str, first: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_validation_benchmark_writes_its_table_between_the_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    begin, end = "<!-- benchmarks:validation:begin -->", "<!-- benchmarks:validation:end -->"
    doc.write_text(f"# Benchmarks\n\nbefore\n{begin}\nold numbers\n{end}\nafter\n", encoding="utf-8")
    out = _run("validation.py", "--write", str(doc)).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 4"]  # the quick batches
    text = doc.read_text(encoding="utf-8")
    assert "old numbers" not in text and rows[0] in text
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.endswith(f"{end}\nafter\n")


def test_prefill_benchmark_has_the_reference_columns_and_refuses_to_write_when_noisy(tmp_path):
    doc = _doc(tmp_path, "prefill")
    before = doc.read_text(encoding="utf-8")
    result = _run("prefill.py", "--reducers", "random,fastv", "--write", str(doc), "--max-interval", "0", code=3)
    out = result.stdout
    assert "refusing to write" in result.stderr and "--max-interval" in result.stderr
    assert doc.read_text(encoding="utf-8") == before
    columns = _header(out, "reducer")
    ratio_column = "tokenprune / reference: median [95% interval]"
    assert {"prefill s", "reference s", ratio_column, "target"} <= set(columns)
    rows = [x for x in out.splitlines() if x.startswith(("| random |", "| fastv |"))]
    assert len(rows) == 6  # random: 2 points x 2 keeps; fastv: layer 2 x 2 keeps
    for row in rows:
        median, low, high = _interval(row.strip("|").split("|")[columns.index(ratio_column)])
        assert 0 < low <= median <= high
        assert row.strip("|").split("|")[columns.index("target")].strip().split(": ")[1] in {
            "met",
            "missed",
            "undecided",
        }
    assert "| tokenprune, random keep 100% after the projector |" in out
    assert "| plain-loop reference without a cut (the layer-stage construction) |" in out
    assert "load average (1/5/15 min)" in out and "Widest guarded interval" in out and "adjacent pairs" in out
    assert [x.split("|")[2].strip() for x in out.splitlines() if x.startswith("| one batch of 8")] == ["1", "2"]
    own = columns.index("tokenprune's own time, % of the call (range)")
    shares = [float(r.strip("|").split("|")[own].split("%")[0]) for r in rows]
    assert all(0 < s < 100 for s in shares)  # measured inside each timed call: never zero, never the whole call


def _interval(cell: str) -> tuple[float, float, float]:
    """``median [low, high]`` as three numbers."""
    median, rest = cell.strip().split(" [")
    low, high = rest.rstrip("]").split(", ")
    return float(median), float(low), float(high)


def test_decode_benchmark_pairs_single_steps_of_two_copies_and_writes_its_table(tmp_path):
    doc = _doc(tmp_path, "prefill", "decode")
    out = _run("decode.py", "--write", str(doc), "--max-interval", "1e9").stdout
    assert "the sides swap copies every generation" in out
    columns = _header(out, "configuration (side A)")
    assert columns[:5] == [
        "configuration (side A)",
        "ms per step",
        "against (side B)",
        "ms per step",
        "A / B: median [95% interval]",
    ]
    rows = [x.strip("|").split("|") for x in out.splitlines() if x.startswith("| ") and "side A" not in x]
    rows = [r for r in rows if not r[0].startswith("---")]
    assert [r[0].strip() for r in rows] == [
        "tokenprune, random keep 100% after the projector",
        "tokenprune, random keep 25% after the projector",
        "stock model with no-op hooks where tokenprune hooks (PyTorch's dispatch)",
        "stock model (the pairing's null check: both sides the same)",
    ]
    assert rows[1][2].strip().startswith("reference: stock model, 22 visual tokens")
    for r in rows:
        median, low, high = _interval(r[4])
        assert 0 < low <= median <= high
    own = columns.index("tokenprune's own time per step, % of the step (range)")
    assert all(0 < float(r[own].split("%")[0]) < 100 for r in rows[:2])
    assert rows[2][own].strip() == rows[3][own].strip() == ""
    text = doc.read_text(encoding="utf-8")
    assert "old decode" not in text and "old prefill" in text and "| tokenprune, random keep 100% after" in text
    assert text.endswith("<!-- benchmarks:decode:end -->\nafter\n")


def test_gpu_script_runs_on_the_cpu_and_writes_both_sections(tmp_path):
    out_file = tmp_path / "gpu.md"
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--quick", "--out", str(out_file), "--max-interval", "1e9"]
    cmd += ["--reducers", "random"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out_file.read_text(encoding="utf-8")
    for section in ("gpu-prefill", "gpu-decode"):
        assert f"<!-- benchmarks:{section}:begin -->\n_Measured" in text
    assert "Machine: CPU" in text and "| tokenprune / reference: median [95% interval] |" in text
    assert "| A / B: median [95% interval] |" in text


def test_interleaved_runs_the_cases_round_robin_and_pairs_rounds():
    order: list[str] = []
    cases = [Case("a", lambda: order.append("a")), Case("b", lambda: order.append("b"))]
    got = interleaved(cases, rounds=3, warmup_rounds=1)
    assert order == ["a", "b"] * 4
    assert len(got["a"].samples) == len(got["b"].samples) == 3
    clock = iter([0.2, 0.4, 0.6, 0.1, 0.3, 0.2])
    timed = interleaved([Case("x", lambda: next(clock), self_timed=True)], rounds=6, warmup_rounds=0)
    assert timed["x"].samples == (0.2, 0.4, 0.6, 0.1, 0.3, 0.2)
    assert timed["x"].relative_spread == pytest.approx((0.6 - 0.1) / 0.25)
    ratio = paired_ratio(Timing((2.0, 3.0, 8.0)), Timing((1.0, 3.0, 2.0)))
    assert ratio.samples == (2.0, 1.0, 4.0) and ratio.median == 2.0
    with pytest.raises(ValueError, match="unique"):
        interleaved([Case("a", print), Case("a", print)], rounds=1)
    with pytest.raises(ValueError, match="as many samples"):
        paired_ratio(Timing((1.0,)), Timing((1.0, 2.0)))


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return _bench


def test_the_guard_reads_the_ratio_interval_not_the_spread_of_absolute_times(tmp_path):
    b = _bench()
    drift = [1.0, 1.4, 0.8, 1.9, 1.1, 0.7, 1.6, 1.2, 0.9, 1.5, 1.3]  # the host's speed wanders by 2.7x
    steady = b.PairedRatio.of([1.004 * d / d for d in drift])  # every pair: 1.004, whatever the drift
    assert Timing(tuple(drift)).relative_iqr > 0.3 and steady.median == pytest.approx(1.004)
    assert steady.low == pytest.approx(1.004) and steady.high == pytest.approx(1.004) and steady.half_width < 1e-12
    noisy = b.PairedRatio.of([1.0, 1.08, 0.93, 1.05, 0.96, 1.1, 0.9, 1.02, 0.98])
    assert noisy.low < noisy.median < noisy.high and noisy.half_width > 0.015
    assert b.PairedRatio.of(noisy.ratios) == noisy  # a fixed seed: the same interval every time
    assert b.widest([steady, noisy]) == noisy.half_width and b.widest([]) == 0.0
    doc = tmp_path / "b.md"
    doc.write_text("# B\n<!-- benchmarks:x:begin -->\nold\n<!-- benchmarks:x:end -->\n", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        b.write_or_refuse(doc, "new", b.markers("x"), b.widest([steady, noisy]), 0.015)
    assert refused.value.code == 3 and "old" in doc.read_text(encoding="utf-8")
    b.write_or_refuse(doc, "new", b.markers("x"), b.widest([steady]), 0.015)
    assert "new" in doc.read_text(encoding="utf-8") and "old" not in doc.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="at least one pair"):
        b.PairedRatio.of([])


def test_paired_calls_alternate_the_order_and_pair_adjacent_calls():
    b = _bench()
    order: list[str] = []
    clock = iter([2.0, 1.0, 1.0, 2.0, 4.0, 2.0, 3.0, 6.0])  # per call, in call order: pairs drift, ratio stays 2
    first = Case("a", lambda: order.append("a") or next(clock), self_timed=True)
    second = Case("b", lambda: order.append("b") or next(clock), self_timed=True)
    ratio, a, bt = b.paired_calls(first, second, pairs=3)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # a warm-up pair, then AB, BA, AB alternating
    assert a.samples == (2.0, 4.0, 6.0) and bt.samples == (1.0, 2.0, 3.0)
    assert ratio.ratios == (2.0, 2.0, 2.0) and ratio.cell() == "2.000 [2.000, 2.000]"


def test_own_share_divides_the_timed_rounds_by_their_own_engine_time():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _bench import own_share, share_cell
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    call = Timing((2.0, 4.0, 1.0))
    share = own_share(call, [9.0, 9.0, 0.2, 0.2, 0.1])  # a learning call and a warm-up first: left out
    assert share.samples == (0.1, 0.05, 0.1)
    assert share_cell(share) == "10.00% (5.00%-10.00%)"
    with pytest.raises(ValueError, match="2 engine times for 3 timed rounds"):
        own_share(call, [0.1, 0.1])


def test_sync_benchmark_counts_each_reducer_per_stage_and_writes_its_table(tmp_path):
    doc = _doc(tmp_path, "syncs")
    out = _run("syncs.py", "--reducers", "random,fastv", "--write", str(doc)).stdout
    columns = _header(out, "reducer")
    assert columns[2:6] == [
        "host reads in the stage",
        "in the prefill outside stages",
        "most in a layer without a stage",
        "most in a decoding step",
    ]
    rows = {tuple(c.strip() for c in x.strip("|").split("|")[:2]): x for x in out.splitlines() if x.startswith("| ")}
    assert set(rows) >= {("random", "post_projector"), ("random", "layer 2"), ("fastv", "layer 2")}
    for key in [("random", "post_projector"), ("random", "layer 2"), ("fastv", "layer 2")]:
        cells = [c.strip() for c in rows[key].strip("|").split("|")]
        assert 0 < int(cells[2]) <= 24 and int(cells[4]) == 0 and int(cells[5]) == 0  # the budget of test_host_syncs
        assert 0 < float(cells[6].rstrip("%")) < 100
    assert "| random | layer 2 |" in doc.read_text(encoding="utf-8")


def test_engine_work_counts_no_tokenprune_call_in_the_stock_model_and_writes_its_table(tmp_path):
    doc = _doc(tmp_path, "engine-work")
    out = _run("engine_work.py", "--write", str(doc)).stdout
    rows = {
        line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:]
        for line in out.splitlines()
        if line.startswith("| ")
    }
    stock, keep_all, layer = rows["stock model"], rows["keep-all after the projector"], rows["25% at layer 2"]
    assert stock[2:] == ["0", "0"]  # no tokenprune call without tokenprune
    assert int(keep_all[2]) > 0 and float(keep_all[3]) > 0
    assert float(keep_all[1]) >= float(stock[1])  # the same model: tokenprune only adds operations
    assert float(layer[3]) > float(keep_all[3])  # a layer cut has hooks on every later decoder layer
    text = doc.read_text(encoding="utf-8")
    assert "old engine-work" not in text and "| keep-all after the projector |" in text and text.endswith("after\n")


def test_fixed_cost_benchmark_separates_tokenprune_from_the_stage_and_writes_its_table(tmp_path):
    doc = _doc(tmp_path, "fixed-cost")
    out = _run("fixed_cost.py", "--write", str(doc)).stdout
    rows = [x.strip("|").split("|") for x in out.splitlines() if x.startswith("| keep ")]
    assert [r[0].strip() for r in rows] == [
        "keep 100% after the projector",
        "keep 25% after the projector",
        "keep 100% at layer 2",
        "keep 25% at layer 2",
    ]
    for r in rows:
        fixed, first, stage = (float(r[i].split()[0]) for i in (1, 2, 3))
        assert 0 < fixed and 0 < first and 0 < stage
    text = doc.read_text(encoding="utf-8")
    assert "old fixed-cost" not in text and "| keep 25% at layer 2 |" in text and text.endswith("after\n")


def test_fixed_cost_breakdown_times_the_engine_parts_inside_the_call(tmp_path):
    doc = _doc(tmp_path, "fixed-cost-breakdown")
    out = _run("fixed_cost.py", "--breakdown", "--write", str(doc)).stdout
    heads = [x for x in out.splitlines() if x.startswith("| **random keep 25%")]
    assert heads == ["| **random keep 25% after the projector** | | |", "| **random keep 25% at layer 2** | | |"]
    layer = out.split(heads[1])[1]
    cells = {
        r.strip("|").split("|")[0].strip(): r.strip("|").split("|") for r in layer.splitlines() if r.startswith("|")
    }
    stage = float(cells["the stage: run_stage (reducer included)"][1].split()[0])
    hook = float(cells["layer-stage hook (the stage at layer 2)"][1].split()[0])
    context = float(cells["- stage_context (visual columns, layout, ReduceContext)"][1].split()[0])
    cuts = float(cells["per-layer argument cuts, all layers"][1].split()[0])
    assert 0 < context <= stage <= hook and cuts > 0  # nested timers: an inner part within its outer one
    warm = [v for k, v in cells.items() if k.startswith("the stage again")]
    assert float(warm[0][2]) > 0
    text = doc.read_text(encoding="utf-8")
    assert "old fixed-cost-breakdown" not in text and text.endswith("after\n")


def test_prefill_benchmark_main_only_leaves_the_side_tables_out(tmp_path):
    out = _run("prefill.py", "--reducers", "random", "--main-only").stdout
    assert "| random | post_projector | 25% |" in out
    assert "FastV at layer 2" not in out and "8 images of" not in out and "KV bytes" not in out
