#!/usr/bin/env bash
# Run the engine's version-sensitive tests on every transformers release of the matrix.
#
# Usage: bash scripts/test-matrix.sh [VERSION ...]      (default: the versions in scripts/transformers-matrix.txt)
#        MATRIX_TESTS="tests/test_a.py tests/test_b.py" bash scripts/test-matrix.sh ...   (only those test files)
#
# Each version gets a small environment of its own, .matrix/transformers-VERSION, that holds only that
# transformers release and layers the main .venv (torch, tokenprune, everything else) underneath it, so
# nothing large is installed twice and the wheels come from pip's cache after the first run. The releases
# of the matrix share their other requirements (huggingface-hub, tokenizers, safetensors), which the
# main .venv satisfies; a version that needs different ones would need a full environment of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -gt 0 ]; then
  versions=("$@")
else
  mapfile -t versions < <(grep -v '^\s*#' scripts/transformers-matrix.txt | sed '/^\s*$/d')
fi
base_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The tests whose outcome depends on transformers' internals: the compatibility module, the adapter
# invariants, engine behaviour and guards, FLOP counting, the reducers end to end (the attention probe
# among them), the signals read inside the model (own-layer attention, keys, text rows, the vision
# probe), the decode stage (attention calls at decoding), video heatmaps, the model census (every
# image-text-to-text type served or refused by name; the generic adapter's invariants on two types), the families of
# issue 32 (tests/test_families.py; their packed towers: tests/test_families_towers.py, PaddleOCR-VL's
# tests/test_tower_paddleocr_vl.py; the other towers: tests/test_tower_*.py) and the adapter tutorial's own test.
tests=(
  tests/test_compat.py
  tests/test_engine_invariants.py
  tests/test_engine_invariants_video.py
  tests/test_engine_invariants_video_llava.py
  tests/test_adapter_qwen3_vl.py
  tests/test_adapter_internvl.py
  tests/test_engine_behaviour.py
  tests/test_engine_guards.py
  tests/test_cost_counts.py
  tests/test_cost_flops.py
  tests/test_reducers_e2e.py
  tests/test_reducer_fastv.py
  tests/test_engine_signals.py
  tests/test_reducer_pdrop.py
  tests/test_reducer_dart.py
  tests/test_reducer_sparsevlm.py
  tests/test_vision_attention.py
  tests/test_vision_families.py
  tests/test_reducer_fastervlm.py
  tests/test_stage_budget.py
  tests/test_decode_stage.py
  tests/test_gemma4_kv_sharing.py
  tests/test_glm_video.py
  tests/test_families_towers.py
  tests/test_tower_paddleocr_vl.py
  tests/test_tower_videos.py
  tests/test_tower_omni_thinkers.py
  tests/test_tower_qwen_videos.py
  tests/test_tower_aya_cohere2.py
  tests/test_tower_lfm2_vl.py
  tests/test_tower_gemma4.py
  tests/test_tower_minicpmv.py
  tests/test_tower_molmo2.py
  tests/test_engine_chained_tower_stages.py
  tests/test_engine_channels.py
  tests/test_family_videos.py
  tests/test_heatmap_video.py
  tests/test_engine_stopwatch.py
  tests/test_census.py
  tests/test_families.py
  examples/tokenprune-example-adapter/tests
)
if [ -n "${MATRIX_TESTS:-}" ]; then
  read -r -a tests <<< "$MATRIX_TESTS"
fi
failed=()
for version in "${versions[@]}"; do
  env=".matrix/transformers-$version"
  if [ ! -x "$env/bin/python" ] || ! "$env/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
    rm -rf "$env"
    python3 -m venv --without-pip "$env"
    env_site=$("$env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # The main environment's packages (and its editable installs' finders) come after this one's.
    echo "import site; site.addsitedir('$base_site')" > "$env_site/zz_tokenprune_base.pth"
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --target "$env_site" "transformers==$version"
  fi
  echo "=== transformers $version"
  if ! "$env/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"; then
    failed+=("$version")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "matrix: failed on transformers ${failed[*]}" >&2
  exit 1
fi
echo "matrix: passed on transformers ${versions[*]}"
