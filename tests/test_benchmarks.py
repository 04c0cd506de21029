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
    result = _run("prefill.py", "--reducers", "random,fastv", "--write", str(doc), "--max-spread", "0", code=3)
    out = result.stdout
    assert "refusing to write" in result.stderr and "--max-spread" in result.stderr
    assert doc.read_text(encoding="utf-8") == before
    columns = _header(out, "reducer")
    assert {"prefill s", "spread", "reference s", "tokenprune / reference", "within 3%"} <= set(columns)
    rows = [x for x in out.splitlines() if x.startswith(("| random |", "| fastv |"))]
    assert len(rows) == 6  # random: 2 points x 2 keeps; fastv: layer 2 x 2 keeps
    ratio = columns.index("tokenprune / reference")
    assert all(float(r.strip("|").split("|")[ratio]) > 0 for r in rows)
    assert "| tokenprune, random keep 100% after the projector |" in out
    assert "| plain-loop reference without a cut (the layer-stage construction) |" in out
    assert "load average (1/5/15 min)" in out and "Largest unpruned spread" in out
    assert [x.split("|")[2].strip() for x in out.splitlines() if x.startswith("| one batch of 8")] == ["1", "2"]
    own = columns.index("tokenprune's own time, % of the call (range)")
    shares = [float(r.strip("|").split("|")[own].split("%")[0]) for r in rows]
    assert all(0 < s < 100 for s in shares)  # measured inside each timed call: never zero, never the whole call


def test_decode_benchmark_writes_its_table_between_its_markers(tmp_path):
    doc = _doc(tmp_path, "prefill", "decode")
    out = _run("decode.py", "--write", str(doc), "--max-spread", "1e9").stdout
    columns = _header(out, "configuration")
    assert columns[:3] == ["configuration", "ms per token", "spread"]
    labels = [x.split("|")[1].strip() for x in out.splitlines() if x.startswith("| ") and "ms per token" not in x]
    assert labels[:3] == [
        "stock model, full prompt",
        "tokenprune, random keep 100% after the projector",
        "tokenprune, random keep 25% after the projector",
    ]
    own = columns.index("tokenprune's own time per step, % of the step (range)")
    cells = [x.strip("|").split("|")[own].strip() for x in out.splitlines() if x.startswith("| tokenprune, random")]
    assert len(cells) == 2 and all(0 < float(c.split("%")[0]) < 100 for c in cells)
    text = doc.read_text(encoding="utf-8")
    assert "old decode" not in text and "old prefill" in text and "| stock model, full prompt |" in text
    assert text.endswith("<!-- benchmarks:decode:end -->\nafter\n")


def test_gpu_script_runs_on_the_cpu_and_writes_both_sections(tmp_path):
    out_file = tmp_path / "gpu.md"
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--quick", "--out", str(out_file), "--max-spread", "1e9"]
    cmd += ["--reducers", "random"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out_file.read_text(encoding="utf-8")
    for section in ("gpu-prefill", "gpu-decode"):
        assert f"<!-- benchmarks:{section}:begin -->\n_Measured" in text
    assert "Machine: CPU" in text and "| tokenprune / reference |" in text and "| ms per token |" in text


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


def test_the_noise_guard_reads_the_range_below_five_rounds_and_the_interquartile_range_from_five():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _bench import guard_name, unpruned_spread
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    one_slow_round = Timing((1.0, 1.01, 0.99, 1.0, 1.4))  # a host hiccup: the median does not move
    assert unpruned_spread([one_slow_round]) == pytest.approx(one_slow_round.relative_iqr)
    assert unpruned_spread([one_slow_round]) < 0.25 < one_slow_round.relative_spread
    four = Timing((1.0, 1.01, 0.99, 1.4))
    assert unpruned_spread([four]) == pytest.approx(0.41 / 1.005)
    noisy_middle = Timing((1.0, 1.2, 0.8, 1.1, 0.9))
    assert unpruned_spread([one_slow_round, noisy_middle]) == pytest.approx(noisy_middle.relative_iqr)
    assert noisy_middle.relative_iqr > 0.2
    assert unpruned_spread([Timing((1.0,))]) == float("inf")
    assert guard_name(4) == "(max - min) / median" and guard_name(5) == "interquartile range / median"


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
