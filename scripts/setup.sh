#!/usr/bin/env bash
# Create .venv with everything tokenprune needs, on a fresh machine. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels onto a CPU machine.
# On a GPU machine, install the torch build you want before running this script.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install --quiet -e ".[dev]" -e examples/tokenprune-example-reducer -e examples/tokenprune-example-task -e examples/tokenprune-example-adapter
# lmms-eval, for the tests of the lmms-eval bridge: its API modules only need these few packages, and its
# full dependency list (torchvision among them) would pull a CUDA build of torch onto a CPU machine.
if ! .venv/bin/python -c "import lmms_eval.api.model" 2>/dev/null; then
  .venv/bin/pip install --quiet --no-deps "lmms-eval==0.7.3"
  .venv/bin/pip install --quiet pytz loguru jinja2
fi
