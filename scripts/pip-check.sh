#!/usr/bin/env bash
# Report the dependency conflicts of an environment (`pip check`), except the known, deliberate ones.
#
# Usage: bash scripts/pip-check.sh [VENV]      (default: $VENV, else .venv)
#
# lmms-eval is installed without its dependencies (scripts/setup.sh says why), so each of its unmet
# requirements reads as a conflict: "lmms-eval X requires Y, which is not installed." Those lines are
# left out; every other conflict (a version mismatch, lmms-eval's included, or another package's missing
# requirement) is printed on stderr after "ERROR: dependency conflicts", and the exit status is 1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
report=$("$VENV/bin/pip" check --disable-pip-version-check 2>&1) || true
conflicts=$(grep -v -E -e '^lmms-eval [^ ]+ requires [^ ,]+, which is not installed\.$' \
  -e '^No broken requirements found\.$' <<<"$report" || true)
if [ -n "$conflicts" ]; then
  echo "ERROR: dependency conflicts in $VENV (pip check):" >&2
  echo "$conflicts" >&2
  exit 1
fi
