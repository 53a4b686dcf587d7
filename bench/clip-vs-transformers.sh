#!/usr/bin/env bash
# CLIP ViT-L/14 scoring of a batch of images (the laion_aesthetic / clip_score verifiers' work),
# tt-scale vs transformers, side by side in one run on this machine with the same threads.
#   bench/clip-vs-transformers.sh [--device cpu|cuda] [--batch 8] [--iters 5]
# Needs a release build (cargo build --release [--features cuda]) and a Python with torch and
# transformers (PY=python3 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cpu BATCH=8 ITERS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PY:-python3}
THREADS=${THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
out=$(mktemp -d)
target/release/tt-scale bench --model clip-l14 --device "$DEVICE" --batch "$BATCH" \
  --warmup 2 --iters "$ITERS" --json "$out/tt.json" >/dev/null
"$PY" bench/diffusers_bench.py --device "$DEVICE" --models clip_l14 --clip-batch "$BATCH" \
  --warmup 2 --iters "$ITERS" --json "$out/tf.json" >/dev/null
"$PY" - "$out/tt.json" "$out/tf.json" "$DEVICE" "$BATCH" "$THREADS" <<'PYEOF'
import json, sys
tt, tf = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
tt_ms = tt[0]["median_ms"] if isinstance(tt, list) else next(iter(tt.values()))["median_ms"]
tf_ms = tf["clip_l14"]
print(f"| CLIP ViT-L/14, {sys.argv[4]} images + 1 prompt, fp32, {sys.argv[3]}, {sys.argv[5]} threads "
      f"| tt-scale {tt_ms:.0f} ms | transformers {tf_ms:.0f} ms | ratio {tt_ms / tf_ms:.2f} |")
PYEOF
