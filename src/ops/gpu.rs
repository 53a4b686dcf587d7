//! What the GPU is: its compute capability, read once from the driver. A leaf of [`super`]:
//! the attention tiles ([`super::settings`]) and the launchers ([`super::cuda`]) ask it.

#[cfg(feature = "cuda")]
use std::sync::OnceLock;

#[cfg(feature = "cuda")]
use candle_core::CudaDevice;

/// The device's compute capability (major, minor); (8, 0) if the driver cannot tell.
#[cfg(feature = "cuda")]
fn compute_capability(dev: &CudaDevice) -> (i32, i32) {
    static CC: OnceLock<(i32, i32)> = OnceLock::new();
    *CC.get_or_init(|| {
        dev.cuda_stream()
            .context()
            .compute_capability()
            .unwrap_or((8, 0))
    })
}

/// Whether the device is Hopper or newer (picks the compute_90 PTX).
#[cfg(feature = "cuda")]
pub fn hopper(dev: &CudaDevice) -> bool {
    compute_capability(dev).0 >= 9
}

/// Whether the device runs compute_90a code (wgmma): compute capability 9.0 exactly.
#[cfg(feature = "cuda")]
pub fn sm90a(dev: &CudaDevice) -> bool {
    compute_capability(dev) == (9, 0)
}

/// Whether `dev` is a CUDA device of compute capability 9.0 (runs wgmma).
pub fn sm90a_device(dev: &candle_core::Device) -> bool {
    match dev {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(c) => sm90a(c),
        _ => false,
    }
}
