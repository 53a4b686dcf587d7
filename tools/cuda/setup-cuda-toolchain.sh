#!/usr/bin/env bash
# A CUDA 13.0 build toolchain from PyPI wheels (~200 MB), so that `--features cuda` compiles and
# lints on a machine with no GPU, no NVIDIA driver and no CUDA toolkit (the development and CI
# machines). Prints, on its last line, the path of an env file to source before cargo:
#
#   env=$(tools/cuda/setup-cuda-toolchain.sh | tail -n 1) && . "$env"
#   cargo build --release --features cuda
#
# What the env file sets:
#   PATH               nvcc 13.0 (pinned: the PTX it writes must not be newer than the driver of
#                      the GPU machine that runs the binary; driver 580 = CUDA 13.0)
#   CUDA_HOME          a folder of link-time libraries: libcudart from the wheels, and stubs of
#                      libcuda, libcublas, libcublasLt, libcurand and libnvrtc that export the
#                      symbols cudarc binds, under their real sonames (candle links them
#                      dynamically; the GPU machine's real libraries load at run time)
#   CUDA_COMPUTE_CAP   90 (Hopper) unless set; there is no GPU to ask
#   NVCC_PREPEND_FLAGS the wheels' include folders (cuda_bf16.h, cccl)
#
# Downloads are cached: the toolchain goes into a folder named after everything it depends on
# (the wheels' pins and the cudarc version the crate resolves), under $TT_SCALE_CUDA_CACHE
# (default ~/.cache/tt-scale-cuda). A second run with the same pins reuses it without a
# download; new pins make a new folder and leave the old one alone. The folder is filled in a
# temporary sibling and renamed into place, so an interrupted run never leaves a half toolchain.
#
# Needs python3 with pip, gcc, and the cargo registry (cudarc's sources, fetched when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85"

cudarc_src() {
  ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/ 2>/dev/null | sort -V | tail -n 1
}
CUDARC=$(cudarc_src || true)
if [ -z "$CUDARC" ]; then
  cargo fetch -q
  CUDARC=$(cudarc_src || true)
fi
if [ -z "$CUDARC" ]; then
  echo "cudarc's sources are not in the cargo registry: run 'cargo fetch' here, then rerun" >&2
  exit 1
fi
STAMP=$(printf '%s %s v1' "$WHEELS" "$(basename "$CUDARC")" | sha256sum | cut -c1-16)
CACHE=${TT_SCALE_CUDA_CACHE:-$HOME/.cache/tt-scale-cuda}
PREFIX="$CACHE/$STAMP"
if [ -f "$PREFIX/env.sh" ]; then
  echo "CUDA toolchain: cached in $PREFIX" >&2
  echo "$PREFIX/env.sh"
  exit 0
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.building-XXXXXX")
chmod 755 "$WORK"
trap 'rm -rf "$WORK"' EXIT
echo "CUDA toolchain: installing the CUDA 13.0 compiler wheels into $PREFIX ..." >&2
# shellcheck disable=SC2086
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
  --target "$WORK/py" $WHEELS
CU="$PREFIX/py/nvidia/cu13"
[ -x "$WORK/py/nvidia/cu13/bin/nvcc" ] || { echo "the wheels hold no nvcc" >&2; exit 1; }

# Link-time libraries. Stub symbols are read from cudarc's bindings: `load::<_F>("name")`.
LINK="$WORK/link/lib"
mkdir -p "$LINK"
ln -s "$CU/lib/libcudart.so.13" "$LINK/libcudart.so"
for spec in driver:cuda:libcuda.so.1 cublas:cublas:libcublas.so.13 \
            cublaslt:cublasLt:libcublasLt.so.13 curand:curand:libcurand.so.10 \
            nvrtc:nvrtc:libnvrtc.so.13; do
  IFS=: read -r module name soname <<<"$spec"
  grep -ohE 'load::<_F>\("[A-Za-z0-9_]+"\)' "$CUDARC/src/$module/sys/mod.rs" \
    | sed -E 's/.*"([A-Za-z0-9_]+)".*/\1/' | sort -u \
    | awk '{print "int " $1 "(void){return 999;}"}' > "$WORK/link/$name-stub.c"
  gcc -shared -fPIC -Wl,-soname,"$soname" -o "$LINK/lib$name.so" "$WORK/link/$name-stub.c"
done

cat > "$WORK/env.sh" <<ENV
# Source before: cargo build --features cuda (made by tools/cuda/setup-cuda-toolchain.sh).
export PATH="$CU/bin:\$PATH"
export CUDA_HOME="$PREFIX/link"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export NVCC_PREPEND_FLAGS="-I$CU/include -I$CU/include/cccl"
ENV
if mv -T "$WORK" "$PREFIX" 2>/dev/null; then
  trap - EXIT
else
  # Another run finished first: use its folder (the trap removes this one).
  [ -f "$PREFIX/env.sh" ] || { echo "cannot place the toolchain in $PREFIX" >&2; exit 1; }
fi
echo "CUDA toolchain: ready in $PREFIX" >&2
echo "$PREFIX/env.sh"
