"""The benchmark scripts run in their quick mode and write their tables between their markers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_validation_benchmark_writes_its_table_between_the_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    begin, end = "<!-- benchmarks:validation:begin -->", "<!-- benchmarks:validation:end -->"
    doc.write_text(f"# Benchmarks\n\nbefore\n{begin}\nold numbers\n{end}\nafter\n", encoding="utf-8")
    out = _run("validation.py", "--write", str(doc))
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 4"]  # the quick batches
    text = doc.read_text(encoding="utf-8")
    assert "old numbers" not in text and rows[0] in text
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.endswith(f"{end}\nafter\n")
