#!/usr/bin/env bash
# One command for a GPU machine (no Rust toolchain, no network there): runs the GPU tests and the
# benchmarks from the kit that bench/prepare-gpu-kit.sh made, times diffusers on the same GPU in the
# same call, and prints one table last: benchmark, tt-scale ms, diffusers eager ms, ratio.
#
#   usage (from the checkout's root, gpu-kit/ beside bench/):  bash bench/gpu-check.sh
#   env:  OUT                where the results go (default: gpu-check-out/); the device tool sets it
#         GPU_CHECK_SECONDS  wall-time budget for the whole script (default 540); every part runs
#                            under `timeout`, capped by what is left, so the script never hangs
#         PYTHON             the Python that has PyTorch (default python3)
#
# Exits 1 when a test binary failed (or timed out), else 0; missing benchmarks show as n/a.
# Writes (9 files, what the device tool brings back): gpu-check.log (everything printed),
# tests.log (test binaries' output), tt-bench.json (tt-scale's reports per benchmark),
# tt-ops.json (the operations one by one), tt-search.json (the search end to end),
# diffusers.json, diffusers-compile.json and transformers-qwen.json ({name: median_ms}),
# table.md (the final table).
set -uo pipefail

ROOT=$(pwd)
KIT=$ROOT/gpu-kit
OUT=${OUT:-$ROOT/gpu-check-out}
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-540}
START=$(date +%s)
mkdir -p "$OUT"
W=$(mktemp -d /tmp/gpu-check.XXXXXX)

left() { echo $((START + TOTAL - $(date +%s))); }

# step CAP RESERVE CMD...: runs CMD under a timeout of CAP seconds, shortened so that RESERVE
# seconds of the budget stay for what comes after; skipped when under 10 s would be left.
step() {
  local cap=$1 reserve=$2 t
  shift 2
  t=$(($(left) - reserve))
  ((t > cap)) && t=$cap
  if ((t < 10)); then
    echo "SKIPPED (out of time): $*"
    return 124
  fi
  timeout -k 5 "$t" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "TIMED OUT after ${t}s: $*"
  return $rc
}

# What the benchmarks are called on each side. Each row: key | tt-scale --model | height=width |
# batch | tt-scale's report name | diffusers_bench.py key | target ratio (tt-scale / diffusers eager)
# [| environment for tt-scale: the *_unfused rows time candle's composition, TT_SCALE_FUSED=0].
BENCHES=(
  "flux_b1|flux|1024|1|flux.1-dev transformer step|flux_b1|0.75"
  "flux_b1_unfused|flux|1024|1|flux.1-dev transformer step|flux_b1|-|TT_SCALE_FUSED=0"
  "flux_b4|flux|1024|4|flux.1-dev transformer step|flux_b4|0.75"
  "sdxl|sdxl|1024|1|sdxl-base unet step (guided)|sdxl|1.0"
  "sd15|sd15|512|1|sd-v1.5 unet step (guided)|sd15|1.0"
  "pixart_sigma|pixart-sigma|1024|1|pixart-sigma-xl-2-1024 transformer step (guided)|pixart_sigma|1.0"
  # What each image costs after its last step: the VAE decode (convolutions on cuDNN), and the
  # same with candle's convolutions and group norms.
  "vae_sdxl|sdxl-vae|1024|1|sdxl vae decode|vae_sdxl|1.0"
  "vae_sdxl_unfused|sdxl-vae|1024|1|sdxl vae decode|vae_sdxl|-|TT_SCALE_FUSED=0"
  # The local verifiers (issue 17), fp32 whatever --dtype says: CLIP ViT-L/14 and ImageReward
  # scoring 8 images (ImageReward has no peer in diffusers_bench.py: its row shows n/a there).
  "clip_l14|clip-l14|224|8|clip-vit-l14 score b8|clip_l14|1.0"
  "image_reward|image-reward|224|8|image-reward score b8|-|-"
  # The Qwen verifier (issue 6): one `tt-scale bench --model qwen` run gives both rows; it runs
  # last, after the diffusers parts, under its own timeouts (warm-up 1, median of 3).
  "qwen_prefill|qwen|1024|1|qwen2.5-vl-7b prefill (1024x1024 image)|qwen_prefill|1.0"
  "qwen_gen|qwen|1024|1|qwen2.5-vl-7b prefill + 300 tokens|qwen_gen|1.0"
)

main() {
  echo "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${TOTAL}s, results in $OUT"
  if [ ! -f "$KIT/manifest" ]; then
    echo "error: $KIT/manifest is missing: run bench/prepare-gpu-kit.sh on the build machine and carry gpu-kit"
    return 2
  fi
  cat "$KIT/manifest"

  echo "== GPU"
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv || echo "nvidia-smi failed"
  timeout 30 "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
    || echo "PyTorch sees no GPU"

  echo "== libraries"
  # shellcheck disable=SC1091
  . "$KIT/device-env.sh"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "cuDNN for the convolutions: ${C:-not found, candle convolutions will run}"
  mkdir -p "$W/bin"
  if command -v xz >/dev/null; then
    xz -dc "$KIT/bin.tar.xz" | tar -C "$W/bin" -xf -
  else
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$KIT/bin.tar.xz" "$W/bin"
  fi
  ls "$W/bin"
  if [ ! -x "$W/bin/tt-scale" ]; then
    echo "error: could not unpack $KIT/bin.tar.xz"
    return 2
  fi
  missing=$(ldd "$W/bin/tt-scale" 2>&1 | grep 'not found')
  [ -n "$missing" ] && echo "warning: unresolved libraries: $missing"

  # The test binaries read fixtures at the checkout path baked in at build time.
  local baked
  baked=$(sed -n 's/^baked_root=//p' "$KIT/manifest")
  export TT_SCALE_REPO=$ROOT
  if [ -n "$baked" ] && [ "$baked" != "$ROOT" ]; then
    if [ -e "$baked" ] && [ "$(cd "$baked" && pwd -P)" = "$(pwd -P)" ]; then
      :
    elif [ ! -e "$baked" ] && mkdir -p "$(dirname "$baked")" 2>/dev/null && ln -s "$ROOT" "$baked" 2>/dev/null; then
      echo "linked $baked -> $ROOT (the fixture path baked into the test binaries)"
    else
      patch_baked_path "$baked"
    fi
  fi

  echo "== diffusers wheels"
  if step 90 300 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$W/site" "$KIT"/wheels/*.whl; then
    export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "warning: could not install the diffusers wheels; the diffusers benchmarks will fail"
  fi

  echo "== tests (GPU checks, and the CPU parity tests of this build, in parallel; output in tests.log)"
  local t extra pids=() names=() status=0
  for bin in "$W"/bin/*; do
    t=$(basename "$bin")
    [ "$t" = tt-scale ] && continue
    # tests/gpu prints what it measured (--nocapture: differences, whether the wgmma attention
    # tiles are bit-identical to the mma.sync ones); the others print only on failure.
    extra=()
    [ "$t" = gpu ] && extra=(--nocapture)
    step 200 300 "$bin" --test-threads=4 "${extra[@]}" >"$W/test-$t.log" 2>&1 &
    pids+=($!)
    names+=("$t")
  done
  : >"$OUT/tests.log"
  TEST_SUMMARY=""
  local i rc res
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    t=${names[$i]}
    { echo "######## $t (exit $rc)"; cat "$W/test-$t.log"; } >>"$OUT/tests.log"
    res=$(grep -E '^test result:' "$W/test-$t.log" | tail -1)
    [ -z "$res" ] && res="no result (exit $rc; see tests.log)"
    TEST_SUMMARY+=$(printf '%-14s %s' "$t" "$res")$'\n'
    if [ "$rc" -ne 0 ]; then
      status=1
      grep -E '^test .* FAILED$|^---- |panicked at|assertion' "$W/test-$t.log" | head -20
    fi
    grep -E 'on cuda' "$W/test-$t.log"
  done
  printf '%s' "$TEST_SUMMARY"

  echo "== tt-scale bench (bf16, cuda; warm-up 2, median of 5)"
  local spec key model size batch name dkey target envs
  for spec in "${BENCHES[@]}"; do
    IFS='|' read -r key model size batch name dkey target envs <<<"$spec"
    [ "$model" = qwen ] && continue
    echo "-- $key: ${envs:+$envs }--model $model --height $size --width $size --batch $batch"
    # shellcheck disable=SC2086
    step 150 170 env ${envs:-} "$W/bin/tt-scale" bench --model "$model" --height "$size" --width "$size" --batch "$batch" \
      --dtype bf16 --device cuda --warmup 2 --iters 5 --json "$W/tt-$key.json"
    echo "   (exit $?)"
  done
  merge_tt_reports

  # The hot operations one by one at the 1024x1024 shapes: each attention block tile, cuBLASLt,
  # the norm kernels, against candle's compositions (where the step's time goes).
  echo "-- ops: --model ops (warm-up 3, median of 10)"
  step 60 280 "$W/bin/tt-scale" bench --model ops --height 1024 --width 1024 --batch 1 \
    --dtype bf16 --device cuda --warmup 3 --iters 10 --json "$OUT/tt-ops.json"
  echo "   (exit $?)"

  # The default search end to end (issue 7's overlap target: wall within 5% of pure generation):
  # 30 images through the real search code, each image 10 steps of a 4-double/8-single-block
  # Flux (12 of 57 blocks), with a stand-in API verifier whose latency is 3 s scaled the same way
  # (3000 ms x 12/57 x 10/28 = 226 ms), so the latency/generation ratio is the real config's.
  echo "-- search: --model search --layers 4 --steps 10 --verifier-latency-ms 226"
  step 90 230 "$W/bin/tt-scale" bench --model search --height 1024 --width 1024 --layers 4 \
    --steps 10 --verifier-latency-ms 226 --dtype bf16 --device cuda --warmup 1 --iters 1 \
    --json "$OUT/tt-search.json"
  echo "   (exit $?)"

  echo "== diffusers (eager, bf16, same shapes)"
  step 200 220 "$PY" bench/diffusers_bench.py --device cuda --dtype bf16 --warmup 2 --iters 5 \
    --models flux_b1,flux_b4,sdxl,sd15,pixart_sigma,vae_sdxl,clip_l14 --json "$OUT/diffusers.json"
  echo "   (exit $?)"

  echo "== diffusers Flux B=1 under torch.compile (with the time left, less 200 s for the Qwen part)"
  step 240 215 "$PY" bench/diffusers_bench.py --device cuda --dtype bf16 --warmup 3 --iters 5 \
    --models flux_b1 --compile-only --json "$OUT/diffusers-compile.json"
  echo "   (exit $?)"

  echo "== Qwen2.5-VL-7B verifier, one 1024x1024 image (bf16, cuda; warm-up 1, median of 3)"
  step 120 90 "$W/bin/tt-scale" bench --model qwen --height 1024 --width 1024 --batch 1 \
    --dtype bf16 --device cuda --warmup 1 --iters 3 --json "$W/tt-qwen.json"
  echo "   (exit $?)"
  if [ -f "$W/tt-qwen.json" ]; then
    cp "$W/tt-qwen.json" "$W/tt-qwen_prefill.json"
    cp "$W/tt-qwen.json" "$W/tt-qwen_gen.json"
  fi
  merge_tt_reports
  echo "-- transformers, same shapes"
  step 120 5 "$PY" bench/diffusers_bench.py --device cuda --dtype bf16 --warmup 1 --iters 3 \
    --models qwen_prefill,qwen_gen --json "$OUT/transformers-qwen.json"
  echo "   (exit $?)"

  echo "== done in $(($(date +%s) - START))s"
  echo
  echo "tests:"
  printf '%s' "$TEST_SUMMARY"
  echo
  table
  return $status
}

# Joins the tt-scale reports written so far ($W/tt-KEY.json) into $OUT/tt-bench.json.
merge_tt_reports() {
  "$PY" - "$W" "$OUT/tt-bench.json" "${BENCHES[@]}" <<'EOF'
import json, os, sys
w, out, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
merged = {}
for spec in specs:
    key = spec.split("|")[0]
    path = os.path.join(w, f"tt-{key}.json")
    if os.path.exists(path):
        merged[key] = json.load(open(path))
json.dump(merged, open(out, "w"), indent=2)
EOF
}

# Rewrites the baked checkout path inside the test binaries to a same-length link to $ROOT, for
# when that path cannot be made a link here.
patch_baked_path() {
  local baked=$1 alias
  alias="/tmp/$(printf 'k%.0s' $(seq 1 $((${#baked} - 5))))"
  if ((${#baked} < 6)) || ! ln -sfn "$ROOT" "$alias"; then
    echo "warning: cannot make $baked reachable; the parity tests will not find their fixtures"
    return
  fi
  echo "patching $baked -> $alias (a link to $ROOT) in the test binaries"
  for bin in "$W"/bin/*; do
    [ "$(basename "$bin")" = tt-scale ] && continue
    "$PY" - "$bin" "$baked" "$alias" <<'EOF'
import sys
path, old, new = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
data = open(path, "rb").read()
open(path, "wb").write(data.replace(old, new))
EOF
  done
}

table() {
  "$PY" - "$OUT" "$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" "${BENCHES[@]}" <<'EOF'
import json, os, sys
out, gpu, specs = sys.argv[1], sys.argv[2] or "unknown GPU", sys.argv[3:]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return {}
tt, eager, comp = load("tt-bench.json"), load("diffusers.json"), load("diffusers-compile.json")
eager.update(load("transformers-qwen.json"))
def ms(v):
    return f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"
lines = [
    f"GPU check on {gpu}, bf16, random weights at real sizes (medians of 5 steps after 2 warm-up;"
    " qwen rows: of 3 after 1, against transformers)",
    "",
    "| benchmark | tt-scale ms | diffusers eager ms | ratio | diffusers compile ms | target ratio | met |",
    "|---|---|---|---|---|---|---|",
]
for spec in specs:
    key, model, size, batch, name, dkey, target = spec.split("|")[:7]
    reports = [r for r in tt.get(key, []) if r.get("name") == name]
    t = reports[0]["median_ms"] if reports else None
    e = eager.get(dkey)
    c = comp.get(dkey + "_compile")
    ratio = t / e if t and e else None
    if target == "-":
        met = "-"
    else:
        met = "n/a" if ratio is None else ("yes" if ratio <= float(target) else "no")
    label = f"{key} ({size}x{size}, batch {batch})"
    lines.append(
        f"| {label} | {ms(t)} | {ms(e)} | {'n/a' if ratio is None else f'{ratio:.2f}'} | {ms(c)} | {'-' if target == '-' else '<= ' + target} | {met} |"
    )
search = {r.get("name"): r for r in load("tt-search.json") or []} if isinstance(load("tt-search.json"), list) else {}
gen = search.get("search: generation", {}).get("median_ms")
wall = search.get("search: wall, overlapped", {}).get("median_ms")
seq = search.get("search: wall, sequential", {}).get("median_ms")
if gen and wall:
    over = 100.0 * (wall - gen) / gen
    lines += [
        "",
        "| default search, 30 images (scaled, see bench/README.md) | generation ms | wall ms, overlapped | over generation | wall ms, sequential | target | met |",
        "|---|---|---|---|---|---|---|",
        f"| search | {ms(gen)} | {ms(wall)} | {over:.1f}% | {ms(seq)} | <= 5% | {'yes' if over <= 5.0 else 'no'} |",
    ]
ops = load("tt-ops.json")
if isinstance(ops, list) and ops:
    # Each fused row against the candle composition of the same operation.
    candle = {r["name"].rsplit(" ", 1)[0]: r["median_ms"] for r in ops if r["name"].endswith(" candle")}
    lines += [
        "",
        "| operation (1024x1024 shapes, batch 1) | ms | rate | candle ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in ops:
        base = r["name"].rsplit(" ", 1)[0]
        c = candle.get(base)
        rate = (f"{r['tflop_s']:.0f} TFLOP/s" if r.get("tflop_s") is not None
                else f"{r['gb_s']:.0f} GB/s" if r.get("gb_s") is not None else "n/a")
        up = f"{c / r['median_ms']:.1f}x" if c and r["median_ms"] > 0 else "n/a"
        lines.append(f"| {r['name']} | {r['median_ms']:.3f} | {rate} | {ms(c)} | {up} |")
text = "\n".join(lines)
open(os.path.join(out, "table.md"), "w").write(text + "\n")
print(text)
EOF
}

main 2>&1 | tee "$OUT/gpu-check.log"
rc=${PIPESTATUS[0]}
rm -rf "$W"
exit "$rc"
