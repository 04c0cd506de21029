#!/usr/bin/env bash
# Create .venv with everything tokenprune needs, on a fresh machine. Safe to rerun.
#
# Installs the versions in constraints.txt (what main was last tested with), so a green main stays
# green on a fresh machine. TOKENPRUNE_UNLOCKED=1 resolves the newest releases the declared ranges
# allow instead (scripts/lock.sh uses it); VENV=DIR sets up another environment than .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# --no-warn-conflicts: pip's own check would list lmms-eval's deliberately unmet requirements (see below) as
# "dependency resolver" errors on every rerun; scripts/pip-check.sh runs the check at the end instead, and
# prints every other conflict.
pip=("$VENV/bin/pip" install --quiet --disable-pip-version-check --no-warn-conflicts)
if [ "${TOKENPRUNE_UNLOCKED:-0}" != "1" ]; then
  pip+=(--constraint constraints.txt)
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels onto a CPU machine.
# On a GPU machine, install the torch build you want before running this script.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" -e ".[dev,lmms]" -e examples/tokenprune-example-reducer -e examples/tokenprune-example-task \
  -e examples/tokenprune-example-adapter
# lmms-eval itself, last and without its dependencies: their list (torchvision among them) would pull a CUDA
# build of torch onto a CPU machine; the `lmms` extra above holds what its command line needs.
if ! "$VENV/bin/python" -c "import lmms_eval.api.model" 2>/dev/null; then
  "${pip[@]}" --no-deps "lmms-eval==0.7.3"
fi
bash scripts/pip-check.sh "$VENV" || true # a conflict is reported (on stderr), as pip does, not fatal
