#!/usr/bin/env bash
# Prepares gpu-kit/ for bench/gpu-check.sh, on a machine with no GPU (builds nothing on the GPU
# machine): the release `tt-scale` binary and the test binaries that matter, built with
# `--features cuda` (CUDA 13.0 toolchain from tools/cuda/setup-cuda-toolchain.sh), stripped and
# packed into one xz archive (bin.tar.xz); tools/cuda/device-env.sh; diffusers' wheel (the GPU
# machine's Python has torch and transformers but no diffusers and no network); a manifest. The fixtures the tests read travel
# with the checkout (tests/fixtures/ is tracked), so they are not copied.
#
#   usage: bench/prepare-gpu-kit.sh
#   env:   TARGET_DIR  cargo target dir to build in (default: $CARGO_TARGET_DIR, else target/);
#                      reuse one where `cargo build --release --features cuda` already ran
#          KIT         output folder (default: gpu-kit/ in the checkout; keep it git-ignored)
#          KIT_BUDGET_MIB  what the device tool may carry, checkout included (default 64)
#
# Then, on a GPU machine (device tool): command `bash bench/gpu-check.sh`, carry ["gpu-kit"].
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}}
KIT=${KIT:-$ROOT/gpu-kit}
BUDGET_MIB=${KIT_BUDGET_MIB:-64}
PY=${PYTHON:-python3}

# tests/gpu (the CUDA-vs-CPU checks of the pipelines, and the fused kernels against their CPU
# implementations) and tests/parity, which runs on the CPU there (a check that the cuda build did
# not change the CPU path). Listed by priority: when the kit would not fit the device tool's limit,
# the last ones are left out (and the manifest says so).
WANT_TESTS=(gpu parity)
TESTS=()
for t in "${WANT_TESTS[@]}"; do
  [ -f "tests/$t/main.rs" ] && TESTS+=("$t")
done

echo "== CUDA toolchain"
ENV_FILE=$(bash tools/cuda/setup-cuda-toolchain.sh | tail -n 1)
# shellcheck disable=SC1090
. "$ENV_FILE"
export CARGO_TARGET_DIR=$TARGET_DIR
nvcc --version | tail -2

echo "== cargo build --release --features cuda (target dir $TARGET_DIR)"
cargo build --release --features cuda

echo "== cargo test --release --features cuda --no-run (${TESTS[*]})"
MSGS=$(mktemp)
trap 'rm -f "$MSGS"' EXIT
test_args=()
for t in "${TESTS[@]}"; do test_args+=(--test "$t"); done
cargo test --release --features cuda --no-run --message-format=json "${test_args[@]}" >"$MSGS"

# name<TAB>executable of each test binary cargo reported.
mapfile -t EXES < <("$PY" - "$MSGS" <<'EOF'
import json, sys
seen = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test"):
        seen[m["target"]["name"]] = m["executable"]
for name, exe in seen.items():
    print(f"{name}\t{exe}")
EOF
)

rm -rf "$KIT"
mkdir -p "$KIT/wheels"
STAGE=$(mktemp -d)
trap 'rm -f "$MSGS"; rm -rf "$STAGE"' EXIT

echo "== packing"
cp tools/cuda/device-env.sh "$KIT/device-env.sh"
cat >>"$KIT/device-env.sh" <<'EOF'
# cuDNN, which tt-scale's convolutions open at run time (dlopen libcudnn.so.9): the copy that
# ships with the machine's PyTorch (nvidia-cudnn-cu13), where there is one.
C=$(find /opt /usr/local /usr/lib -name 'libcudnn.so.9' 2>/dev/null | head -1)
if [ -n "$C" ]; then
  export LD_LIBRARY_PATH="$(dirname "$C"):$LD_LIBRARY_PATH"
fi
EOF
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  diffusers==0.42.1 importlib_metadata -d "$KIT/wheels"

# Stripped copies of the binaries, in one xz archive: the binaries share most of their bytes
# (candle's PTX kernels, the crate), which one solid stream with a dictionary larger than a binary
# stores once (8 binaries, 460 MB: 15 MB, against ~80 MB gzipped one by one). Unpacking needs
# 512 MiB of memory.
PACKED=(tt-scale)
LEFT_OUT=()
cp "$TARGET_DIR/release/tt-scale" "$STAGE/tt-scale"
for t in "${TESTS[@]}"; do
  exe=""
  for line in "${EXES[@]}"; do
    [ "${line%%$'\t'*}" = "$t" ] && exe=${line#*$'\t'}
  done
  if [ -z "$exe" ]; then
    echo "warning: cargo reported no test binary for $t" >&2
    LEFT_OUT+=("$t(not built)")
    continue
  fi
  cp "$exe" "$STAGE/$t"
  PACKED+=("$t")
done
strip "$STAGE"/* 2>/dev/null || true

# The checkout's own size counts against the device tool's limit too.
TREE_BYTES=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
LIMIT=$((BUDGET_MIB * 1024 * 1024 - TREE_BYTES - 2 * 1024 * 1024))
used() { du -sb "$KIT" | cut -f1; }
while :; do
  echo "compressing ${PACKED[*]} (a few minutes) ..."
  tar -C "$STAGE" -cf - "${PACKED[@]}" | xz -T1 --lzma2=preset=9,dict=512MiB -c >"$KIT/bin.tar.xz"
  if [ "$(used)" -le "$LIMIT" ] || [ "${#PACKED[@]}" -le 1 ]; then
    break
  fi
  # Over the limit: leave out the last test binary (lowest priority) and pack again.
  last=${PACKED[-1]}
  unset 'PACKED[-1]'
  LEFT_OUT+=("$last(size)")
  echo "left out $last: the kit would pass the ${BUDGET_MIB} MiB limit" >&2
done

cat >"$KIT/manifest" <<EOF
# written by bench/prepare-gpu-kit.sh; read by bench/gpu-check.sh
baked_root=$ROOT
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo "+dirty")
compute_cap=${CUDA_COMPUTE_CAP:-}
binaries=${PACKED[*]}
left_out=${LEFT_OUT[*]:-}
EOF

echo "== gpu-kit ($(($(used) / 1024 / 1024)) MiB; checkout $((TREE_BYTES / 1024 / 1024)) MiB; limit ${BUDGET_MIB} MiB together)"
ls -l "$KIT" "$KIT/wheels"
cat "$KIT/manifest"
