#!/usr/bin/env bash
# Checks the machine code ptxas makes of the wgmma attention kernels (kernels/attention.cu,
# sm_90a), which no emulator sees:
#   * the pipelined tiles (wg2p, wg1p) keep their overlap: in every such kernel the softmax's
#     exp2s (32 scores + 2 rescale factors) lie between the wait for S(t) (wgmma.wait_group 1)
#     and the wait for the previous P·V (wait_group 0). ptxas moves a wait to the start of its
#     basic block and may wait early where it reuses in-flight registers; either would serialise
#     the products and the softmax again without changing a result;
#   * ptxas reports no serialised wgmma ("Potential Performance Loss") and no attention kernel
#     spills registers.
# Needs nvcc (the CUDA toolchain of tools/cuda/setup-cuda-toolchain.sh on PATH); installs
# cuobjdump and nvdisasm from PyPI wheels into $TT_SASS_TOOLS (default ~/.cache/tt-scale-sass).
# Run by .ci/cuda-build; takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=${TT_SASS_TOOLS:-$HOME/.cache/tt-scale-sass}
bin=$tools/nvidia/cu13/bin
if [ ! -x "$bin/cuobjdump" ] || [ ! -x "$bin/nvdisasm" ]; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tools" \
    nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvcc -cubin -O3 -std=c++20 -arch=sm_90a -Xptxas -v -o "$work/attention.cubin" \
  kernels/attention.cu 2> "$work/ptxas.log"
PATH="$bin:$PATH" cuobjdump -sass "$work/attention.cubin" > "$work/attention.sass"
python3 - "$work/ptxas.log" "$work/attention.sass" <<'PY'
import re, sys

log, sass = (open(p).read() for p in sys.argv[1:3])
problems = []
for line in log.splitlines():
    if "Performance Loss" in line:
        problems.append(line.strip())
current = None
for line in log.splitlines():
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        current = m.group(1)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and current and (m.group(1) != "0" or m.group(2) != "0"):
        problems.append(f"{current} spills: {line.strip()}")

checked = 0
for body in re.split(r"\n\s*Function : ", sass)[1:]:
    name = body.split("\n", 1)[0].strip()
    if not re.search(r"_wg[12]p$", name):
        continue
    checked += 1
    ops = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([01])|(MUFU\.EX2)", body)
    overlapped, between = [], None
    for wait, exp in ops:
        if wait == "1":
            between = 0
        elif wait == "0":
            if between is not None:
                overlapped.append(between)
            between = None
        elif exp and between is not None:
            between += 1
    if not any(n >= 34 for n in overlapped):
        problems.append(f"{name}: no softmax between the two waits (exp2s between: {overlapped})")
if checked != 24:
    problems.append(f"expected 24 pipelined wgmma kernels, found {checked}")
for p in problems:
    print("FAIL", p)
if problems:
    sys.exit(1)
print(f"wgmma schedule: {checked} pipelined kernels overlap their softmax with P·V; "
      "no serialised wgmma, no spills")
PY
