#!/usr/bin/env bash
# Set up (if needed) and run the main job: the offline comparison, the bundled mini VLM on SynthVQA,
# unpruned and every built-in reducer at three budgets. Extra arguments go to `tokenprune compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tokenprune compare "$@"
