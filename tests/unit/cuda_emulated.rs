//! Runs the project's CUDA kernels (`kernels/attention.cu`, `kernels/norm.cu`) on the CPU, through
//! an emulator of the CUDA features they use (`kernels/emu/cuda_emu.h`), and checks every
//! `extern "C"` kernel against a double-precision reference (`kernels/emu/emu_tests.cpp`). No GPU,
//! no CUDA toolkit: the same kernel sources are compiled by the host C++ compiler (`$CXX`, else
//! `c++`, C++20) with `TT_CUDA_EMU` defined, and each emulated CUDA thread is a cooperative
//! user-level thread. The program prints one line per case (kernel, sizes, measured error, bound).
//!
//! What it catches: indexing and stride mistakes, tiling and tail handling (odd sizes, lengths that
//! are not multiples of the tiles), masking (key ends, holes, causality, grouped heads; keys and
//! padding that must not be read are NaN, and buffers end at an inaccessible page), rows that
//! see no key, the online softmax and its rescaling, the tensor-core
//! fragment layouts of `mma.m16n8k16` (emulated lane by lane from the PTX layout), roundings to
//! 16-bit types (16-bit outputs must mostly equal the rounded reference), grid-stride loops, early
//! exits, warp shuffles, and shared-memory races that show up under some interleaving of warps
//! (the emulator varies the scheduling order from block to block; divergent barriers are reported
//! as deadlocks).
//!
//! What it cannot catch: anything about timing or performance, races that need the real GPU
//! memory model (there is no true parallelism or reordering here), shared-memory bank conflicts,
//! register or shared-memory limits, misaligned vector accesses on the device, and differences
//! between the real tensor cores' internal accumulation and the emulator's float32 sums. The CUDA
//! build itself (nvcc, PTX) is not involved.
//!
//! The emulator uses POSIX calls (mmap, ucontext), hence `cfg(unix)`.
#![cfg(unix)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Flags the emulated kernels are built with. `-fno-strict-aliasing`: the kernels reinterpret
/// 16-bit element storage as `uint4` / `uint32_t`, as CUDA code does.
const CXX_FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-pthread",
    "-DTT_CUDA_EMU",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wno-unknown-pragmas",
];

/// Generous: the program takes a few seconds on two cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

struct Output {
    status: Option<ExitStatus>, // None: killed after the timeout
    stdout: String,
    stderr: String,
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => format!("killed after {} s", RUN_TIMEOUT.as_secs()),
    }
}

/// The emulated kernels' program, compiled once for the tests of this file (they run its
/// sections side by side); the compiler's message when it cannot be built.
fn emulator() -> &'static Result<PathBuf, String> {
    static EXE: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    EXE.get_or_init(compile_emulator)
}

fn compile_emulator() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let source = kernels.join("emu").join("emu_tests.cpp");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulated");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;
    // $CXX may carry a launcher or flags ("ccache g++").
    let cxx = std::env::var("CXX")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "c++".to_string());
    // Named after what it is built from, so that test processes running side by side (nextest)
    // and later runs reuse one build; a build lands under its name only when complete.
    let exe = out_dir.join(format!("emu_tests-{}", build_key(&kernels, &cxx)?));
    if exe.is_file() {
        return Ok(exe);
    }
    let partial = out_dir.join(format!("emu_tests.{}.partial", std::process::id()));
    let mut words = cxx.split_whitespace();
    let program = words.next().unwrap_or("c++");
    let mut compile = Command::new(program);
    compile
        .args(words)
        .args(CXX_FLAGS)
        .arg("-I")
        .arg(&kernels)
        .arg(&source)
        .arg("-o")
        .arg(&partial);
    let started = Instant::now();
    let built = run_with_timeout(compile, RUN_TIMEOUT).map_err(|e| {
        format!(
            "cannot run the C++ compiler `{cxx}` ({e}). This test builds kernels/emu/emu_tests.cpp \
             with a C++20 compiler (g++ 10 or newer, or clang++); install one or point CXX at it."
        )
    })?;
    if !built.status.is_some_and(|s| s.success()) {
        return Err(format!(
            "compiling {} with `{cxx} {}` failed ({}):\n{}{}",
            source.display(),
            CXX_FLAGS.join(" "),
            describe(built.status),
            built.stdout,
            built.stderr
        ));
    }
    if !built.stderr.trim().is_empty() {
        eprintln!("compiler diagnostics:\n{}", built.stderr);
    }
    eprintln!(
        "emulated CUDA kernels: compiled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    std::fs::rename(&partial, &exe).map_err(|e| format!("place {}: {e}", exe.display()))?;
    Ok(exe)
}

/// A digest of the kernel sources (`kernels/` and `kernels/emu/`), the flags and the compiler.
fn build_key(kernels: &Path, cxx: &str) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    for dir in [kernels.to_path_buf(), kernels.join("emu")] {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(f.to_string_lossy().as_bytes());
        h.update(std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    h.update(CXX_FLAGS.join(" ").as_bytes());
    h.update(cxx.as_bytes());
    Ok(h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Runs the sections `sections` (comma-separated) of the emulated kernels' program and checks
/// that every case passed; returns its output.
fn run_sections(sections: &str) -> String {
    let exe = emulator().as_ref().unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.arg(sections);
    let ran = run_with_timeout(cmd, RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    println!("{}", ran.stdout);
    if !ran.stderr.is_empty() {
        eprintln!("{}", ran.stderr);
    }
    println!(
        "emulated CUDA kernels ({sections}): ran in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let failures: Vec<&str> = ran
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .collect();
    assert!(
        ran.status.is_some_and(|s| s.success()),
        "the emulated kernels failed ({}); {} failing case(s):\n{}\n--- stderr ---\n{}\n--- full output ---\n{}",
        describe(ran.status),
        failures.len(),
        failures.join("\n"),
        ran.stderr,
        ran.stdout
    );
    ran.stdout
}

/// The attention kernels of head sizes `sizes` (`small`: 40, 64, 72; `large`: 80, 128, 160) in
/// `dtype`, each tile, with the launch shapes the Rust launcher uses.
fn attention(dtype: &str, sizes: &str) {
    let out = run_sections(&format!("attention-{dtype}-{sizes}"));
    check_attention_launch_shapes(&out, sizes == "small");
}

#[test]
fn bf16_attention_kernels_of_head_sizes_40_64_72_match_references_on_the_cpu_emulator() {
    attention("bf16", "small");
}

#[test]
fn bf16_attention_kernels_of_head_sizes_80_128_160_match_references_on_the_cpu_emulator() {
    attention("bf16", "large");
}

#[test]
fn f16_attention_kernels_of_head_sizes_40_64_72_match_references_on_the_cpu_emulator() {
    attention("f16", "small");
}

#[test]
fn f16_attention_kernels_of_head_sizes_80_128_160_match_references_on_the_cpu_emulator() {
    attention("f16", "large");
}

#[test]
fn norm_activation_and_conversion_kernels_match_references_on_the_cpu_emulator() {
    let out = run_sections("conversions,norms");
    for family in [
        "layer_norm_mod",
        "qk_norm_rope",
        "group_norm",
        "gated_residual",
        "geglu",
    ] {
        assert!(out.contains(family), "no {family} case ran:\n{out}");
    }
}

/// The Rust launcher (`ops::AttentionTile`) must launch each attention kernel with the rows,
/// threads and dynamic shared memory the kernel source defines (`TtAttnTile`), which the program
/// prints as `tile w4r32 d=128 rows=128 threads=128 smem=69632`; and every tile the launcher
/// claims for a head size of the half run (`small`: 40, 64, 72; else 80, 128, 160) must be one
/// the program ran.
fn check_attention_launch_shapes(stdout: &str, small: bool) {
    use tt_scale::ops::{AttentionTile, ATTENTION_HEAD_DIMS};
    let mut seen = std::collections::HashSet::new();
    for line in stdout.lines().filter(|l| l.starts_with("tile ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let field = |key: &str| -> usize {
            words
                .iter()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        let tile = AttentionTile::parse(words[1]).unwrap_or_else(|| panic!("tile in {line:?}"));
        let d = field("d=");
        assert!(tile.supports(d), "{line:?}: the launcher does not know it");
        assert_eq!(field("rows="), tile.block_rows(), "{line:?}");
        assert_eq!(field("threads="), 32 * tile.warps(), "{line:?}");
        assert_eq!(field("smem="), tile.smem_bytes(d), "{line:?}");
        seen.insert((tile, d));
    }
    for tile in AttentionTile::ALL {
        for d in ATTENTION_HEAD_DIMS
            .into_iter()
            .filter(|&d| tile.supports(d) && (d <= 72) == small)
        {
            assert!(
                seen.contains(&(tile, d)),
                "the emulated tests never ran attention {} d={d}",
                tile.name()
            );
        }
    }
}
