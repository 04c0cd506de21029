#!/usr/bin/env bash
# The prefill and decode benchmarks on whatever this machine has, with the device's name in the tables.
#
#   CUDA (torch with CUDA already installed; this script installs nothing): LLaVA-NeXT-7B size
#     (hidden 4096, 32 layers, CLIP ViT-L/14-336 tower, random weights) in bfloat16; a few minutes on a
#     recent GPU. Default output: docs/benchmarks.md, sections gpu-prefill and gpu-decode.
#   CPU: the `small` size (hidden 256, 4 layers) in float32; prints the tables, writes only with --out.
#
# Usage: benchmarks/gpu.sh [--quick] [--out FILE] [--max-interval X] [--repeats N] [--reducers a,b]
#   --quick        the toy size and 2 pairs: the test suite's smoke run
#   --out FILE     write the tables into FILE between <!-- benchmarks:gpu-prefill:begin/end --> and
#                  <!-- benchmarks:gpu-decode:begin/end --> (refused, exit 3, when a guarded paired ratio's
#                  95% interval reaches further than --max-interval from its median, default 0.015)
#   --repeats N    pairs of prefill calls per ratio, and generations per decoding pair
#   --reducers     the prefill benchmark's reducers (default: every built-in)
# Environment: PYTHON (default: python3), the interpreter whose torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quick=0 out="" interval=0.015 repeats="" reducers=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --out) out="$2"; shift ;;
    --max-interval) interval="$2"; shift ;;
    --repeats) repeats="$2"; shift ;;
    --reducers) reducers=(--reducers "$2"); shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$device" = cuda ]; then
  size=7b dtype=bfloat16 prefill_repeats=15 decode_repeats=5
  [ -n "$out" ] || out=docs/benchmarks.md
else
  size=small dtype=float32 prefill_repeats=9 decode_repeats=3
fi
if [ "$quick" = 1 ]; then size=quick prefill_repeats=2 decode_repeats=2; fi
[ -z "$repeats" ] || prefill_repeats=$repeats decode_repeats=$repeats
echo "gpu.sh: device $device, size $size, $dtype, output ${out:-none}" >&2
common=(--size "$size" --dtype "$dtype" --device "$device" --max-interval "$interval")
write_prefill=() write_decode=()
if [ -n "$out" ]; then
  write_prefill=(--write "$out" --section gpu-prefill)
  write_decode=(--write "$out" --section gpu-decode)
fi
start=$SECONDS
"$PY" benchmarks/prefill.py "${common[@]}" --repeats "$prefill_repeats" "${reducers[@]}" "${write_prefill[@]}"
"$PY" benchmarks/decode.py "${common[@]}" --repeats "$decode_repeats" "${write_decode[@]}"
echo "gpu.sh: done in $((SECONDS - start)) s" >&2
