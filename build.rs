//! Compiles the project's CUDA kernels (`kernels/*.cu`) to PTX with nvcc when the `cuda` feature
//! is on: one PTX per kernel file for compute capability 8.0 (Ampere, also JIT-compiled by newer
//! drivers) and one for 9.0 (Hopper), and for attention one for 9.0a (Hopper's wgmma).
//! `src/ops/cuda.rs` embeds them and picks one at run time.
//! nvcc comes from `$NVCC`, else `$CUDA_HOME/bin/nvcc` when that exists, else `PATH`
//! (`tools/cuda/setup-cuda-toolchain.sh` sets a CUDA 13.0 toolchain up without a GPU).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Each kernel file and the virtual architectures it is compiled for: 8.0 and 9.0, and for
/// attention also 9.0a (Hopper's arch-specific features, wgmma: runs on compute capability 9.0
/// exactly).
const KERNELS: [(&str, &[&str]); 2] =
    [("attention", &["80", "90", "90a"]), ("norm", &["80", "90"])];

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    for (kernel, archs) in KERNELS {
        let source = Path::new("kernels").join(format!("{kernel}.cu"));
        for &arch in archs {
            let ptx = out_dir.join(format!("{kernel}_sm{arch}.ptx"));
            let output = Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++20"])
                .arg(format!("-arch=compute_{arch}"))
                .arg("-o")
                .arg(&ptx)
                .arg(&source)
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run nvcc ({}): {e}; the cuda feature needs the CUDA toolkit \
                         (tools/cuda/setup-cuda-toolchain.sh installs one without a GPU; see README.md)",
                        nvcc.display()
                    )
                });
            if !output.status.success() {
                panic!(
                    "nvcc failed on {} for compute_{arch}:\n{}{}",
                    source.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

fn nvcc() -> PathBuf {
    if let Some(path) = std::env::var_os("NVCC") {
        return PathBuf::from(path);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let candidate = Path::new(&home).join("bin").join("nvcc");
        if candidate.exists() {
            return candidate;
        }
    }
    PathBuf::from("nvcc")
}
