#!/usr/bin/env bash
# Set up (if needed) and run the main job: list the installed reducers and validate the example pipelines.
# (The offline comparison `tokenprune compare` joins here once the harness lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tokenprune plugins
for pipeline in examples/pipelines/*.yaml; do
  .venv/bin/tokenprune validate "$pipeline"
done
