#!/usr/bin/env python3
"""Golden values for `tt_scale::noise` from real PyTorch (CPU `torch.randn`, float32).

Run by hand (never in CI), from the repository root:

    /work/venv/bin/python tools/reference/make_noise_golden.py

It writes three JSON files under tests/fixtures/noise/:

* mt19937.json            raw generator outputs (as far as PyTorch exposes them)
* randn_portable.json     torch.randn with ATEN_CPU_CAPABILITY=default (scalar libm kernel)
* randn_vectorized.json   torch.randn with the machine's default capability (AVX2/AVX-512:
                          the avx_mathfun kernel that x86 diffusers users get)

Every float is stored as its float32 bit pattern (an unsigned 32-bit integer) so that Rust
can compare exactly. Small tensors are stored whole; big ones as the first and last 64
elements, 128 evenly strided elements, the float64 sum and the SHA-256 of the little-endian
float32 bytes of the whole tensor.

The CPU capability is chosen per process (PyTorch reads ATEN_CPU_CAPABILITY once), so the
script re-runs itself in a child process per capability.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

SEEDS = [0, 1, 42, 1234, 2**31 - 2, 2**32 + 5, 18446744073709551557]
# Stored whole: below 16 (serial double path), exactly 16, and not multiples of 16.
SMALL_SHAPES = [[1], [2], [7], [15], [16], [17], [33], [1, 4, 5, 7], [2, 3, 40]]
# Stored as head/tail/strided sample + sum + hash.
BIG_SHAPES = [[1, 4, 64, 64], [3, 333]]
# One Flux-sized latent for a couple of seeds (hash only; also used for speed checks).
FLUX_SHAPE = [1, 16, 128, 128]
FLUX_SEEDS = [0, 42]
EDGE = 64
STRIDED = 128

OUT_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "noise"


def bits(t):
    import torch

    return t.contiguous().view(-1).view(torch.int32).to(torch.int64).bitwise_and(0xFFFFFFFF).tolist()


def randn(seed, shape):
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def summary(t):
    import torch

    flat = t.contiguous().view(-1)
    n = flat.numel()
    idx = [(i * n) // STRIDED for i in range(STRIDED)]
    return {
        "head": bits(flat[:EDGE]),
        "tail": bits(flat[n - EDGE :]),
        "strided_index": idx,
        "strided": bits(flat[torch.tensor(idx)]),
        "sum_f64": float(flat.to(torch.float64).sum().item()),
        "sha256_f32le": hashlib.sha256(flat.numpy().astype("<f4").tobytes()).hexdigest(),
    }


def child_randn():
    import torch

    cases = []
    for seed in SEEDS:
        for shape in SMALL_SHAPES:
            cases.append({"seed": seed, "shape": shape, "bits": bits(randn(seed, shape))})
        for shape in BIG_SHAPES:
            cases.append({"seed": seed, "shape": shape, **summary(randn(seed, shape))})
    for seed in FLUX_SEEDS:
        cases.append({"seed": seed, "shape": FLUX_SHAPE, **summary(randn(seed, FLUX_SHAPE))})
    return {
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "cases": cases,
    }


def child_mt():
    import torch

    seeds = [0, 1, 42, 1994, 2**32 + 5, 18446744073709551557]
    draws = 1300
    picks = [0, 1, 2, 3, 4, 5, 6, 7, 623, 624, 625, 1247, 1248, 1299]
    out = []
    for seed in seeds:
        g = torch.Generator("cpu").manual_seed(seed)
        # int32 random_() takes one 32-bit draw per element and keeps the low 31 bits.
        low31 = torch.empty(draws, dtype=torch.int32).random_(generator=g).tolist()
        g = torch.Generator("cpu").manual_seed(seed)
        # int64 random_() takes one 64-bit draw (random64) per element, modulo 2**63.
        r64 = torch.empty(4, dtype=torch.int64).random_(generator=g).tolist()
        g = torch.Generator("cpu").manual_seed(seed)
        # float32 rand: one 32-bit draw per element, low 24 bits / 2**24.
        u = torch.rand(8, generator=g, dtype=torch.float32)
        out.append(
            {
                "seed": seed,
                "u32_low31_index": picks,
                "u32_low31": [low31[i] for i in picks],
                "u64_mod_2p63_first4": r64,
                "rand_f32_bits_first8": bits(u),
            }
        )
    return {"torch_version": torch.__version__, "seeds": out}


def run_child(mode, capability):
    env = dict(os.environ)
    if capability is None:
        env.pop("ATEN_CPU_CAPABILITY", None)
    else:
        env["ATEN_CPU_CAPABILITY"] = capability
    res = subprocess.run(
        [sys.executable, __file__, "--child", mode], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(res.stdout)


def write(name, obj):
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        obj = child_randn() if sys.argv[2] == "randn" else child_mt()
        json.dump(obj, sys.stdout)
        return

    portable = run_child("randn", "default")
    vectorized = run_child("randn", None)
    if vectorized["cpu_capability"] == "DEFAULT":
        sys.exit("this CPU has no AVX2: the vectorized golden must come from an x86-64 AVX2/AVX-512 machine")
    # The AVX-512 build registers no normal kernel of its own and falls back to AVX2; check that.
    avx2 = run_child("randn", "avx2")
    same = all(a == b for a, b in zip(avx2["cases"], vectorized["cases"]))
    print(f"machine default capability {vectorized['cpu_capability']}; equals forced AVX2: {same}")
    if not same:
        sys.exit("forced AVX2 differs from the machine default: update the Rust emulation notes")
    portable["kernel"] = "portable"
    vectorized["kernel"] = "vectorized"
    write("randn_portable.json", portable)
    write("randn_vectorized.json", vectorized)
    write("mt19937.json", run_child("mt", None))


if __name__ == "__main__":
    main()
