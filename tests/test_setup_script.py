"""scripts/setup.sh prints no resolver errors: pip's own check is off, scripts/pip-check.sh reports instead.

lmms-eval is installed with ``--no-deps``, so ``pip check`` always lists its unmet requirements; the
check leaves exactly those lines out and prints every other conflict.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KNOWN = [
    "lmms-eval 0.7.3 requires av, which is not installed.",
    "lmms-eval 0.7.3 requires torchvision, which is not installed.",
]


def _check(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "pip-check.sh"), str(venv)], capture_output=True, text=True, check=False
    )


def _venv_with_pip_check_saying(tmp_path: Path, lines: list[str]) -> Path:
    """A stand-in environment whose ``pip check`` prints ``lines`` (and fails when there are any)."""
    pip = tmp_path / "venv" / "bin" / "pip"
    pip.parent.mkdir(parents=True)
    text = "\n".join(lines) or "No broken requirements found."
    pip.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}\nEOF\nexit {1 if lines else 0}\n", encoding="utf-8")
    pip.chmod(0o755)
    return pip.parent.parent


def test_lmms_evals_unmet_requirements_are_not_reported(tmp_path):
    result = _check(_venv_with_pip_check_saying(tmp_path, KNOWN))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_every_other_conflict_is_reported(tmp_path):
    real = [
        "lmms-eval 0.7.3 has requirement accelerate>=0.29.1, but you have accelerate 0.1.0.",
        "tokenprune 0.1.0 requires typer, which is not installed.",
    ]
    result = _check(_venv_with_pip_check_saying(tmp_path, [*KNOWN, *real]))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"ERROR: dependency conflicts in {tmp_path / 'venv'} (pip check):", *real]


def test_this_environment_has_no_other_conflicts():
    """The environment the tests run in (set up by scripts/setup.sh): nothing to report."""
    if not (Path(sys.prefix) / "bin" / "pip").is_file():
        pytest.skip("this environment has no pip")
    result = _check(Path(sys.prefix))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_setup_turns_pips_own_check_off_and_runs_this_one():
    text = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    (pip_line,) = [line for line in text.splitlines() if line.startswith("pip=(")]
    assert "--no-warn-conflicts" in pip_line
    assert text.rstrip().splitlines()[-1].startswith('bash scripts/pip-check.sh "$VENV"')
