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

#[test]
fn cuda_kernels_match_references_on_the_cpu_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let source = kernels.join("emu").join("emu_tests.cpp");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulated");
    std::fs::create_dir_all(&out_dir).expect("create the test's output directory");
    let exe = out_dir.join("emu_tests");

    // $CXX may carry a launcher or flags ("ccache g++").
    let cxx = std::env::var("CXX")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "c++".to_string());
    let mut words = cxx.split_whitespace();
    let program = words.next().expect("non-empty compiler command");
    let mut compile = Command::new(program);
    compile
        .args(words)
        .args(CXX_FLAGS)
        .arg("-I")
        .arg(&kernels)
        .arg(&source)
        .arg("-o")
        .arg(&exe);

    let started = Instant::now();
    let built = match run_with_timeout(compile, RUN_TIMEOUT) {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run the C++ compiler `{cxx}` ({e}). This test builds kernels/emu/emu_tests.cpp \
             with a C++20 compiler (g++ 10 or newer, or clang++); install one or point CXX at it."
        ),
    };
    let compile_time = started.elapsed();
    assert!(
        built.status.is_some_and(|s| s.success()),
        "compiling {} with `{cxx} {}` failed ({}):\n{}{}",
        source.display(),
        CXX_FLAGS.join(" "),
        describe(built.status),
        built.stdout,
        built.stderr
    );
    if !built.stderr.trim().is_empty() {
        eprintln!("compiler diagnostics:\n{}", built.stderr);
    }

    let started = Instant::now();
    let ran = run_with_timeout(Command::new(&exe), RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let run_time = started.elapsed();
    println!("{}", ran.stdout);
    if !ran.stderr.is_empty() {
        eprintln!("{}", ran.stderr);
    }
    println!(
        "emulated CUDA kernels: compiled in {:.1} s, ran in {:.1} s",
        compile_time.as_secs_f64(),
        run_time.as_secs_f64()
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
    check_attention_launch_shapes(&ran.stdout);
}

/// The Rust launcher (`ops::AttentionTile`) must launch each attention kernel with the rows,
/// threads and dynamic shared memory the kernel source defines (`TtAttnTile`), which the program
/// prints as `tile w4r32 d=128 rows=128 threads=128 smem=69632`; and every tile the launcher
/// claims for a head size must be one the program ran.
fn check_attention_launch_shapes(stdout: &str) {
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
            .filter(|&d| tile.supports(d))
        {
            assert!(
                seen.contains(&(tile, d)),
                "the emulated tests never ran attention {} d={d}",
                tile.name()
            );
        }
    }
}
