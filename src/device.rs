//! The one parser of device names and the one place a device is opened, for the command line
//! (`--device`) and the config (`verifier_args.device`) alike.

use std::fmt;

use candle_core::Device;

/// A compute device named on the command line or in a config: `cpu`, `cuda` (also `gpu`) or
/// `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Parses `cpu`, `cuda`, `gpu`, `cuda:N` (case-insensitive, surrounding blanks ignored); `None`
/// when it is none of them.
pub fn parse_device(s: &str) -> Option<DeviceSpec> {
    let s = s.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Some(DeviceSpec::Cpu),
        "cuda" | "gpu" => Some(DeviceSpec::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda),
    }
}

/// Parses a comma-separated list of devices (`cuda:0,cuda:1`), each as [`parse_device`] does;
/// `None` when an entry is not a device or the list has fewer than two.
pub fn parse_devices(s: &str) -> Option<Vec<DeviceSpec>> {
    let list = s.split(',').map(parse_device).collect::<Option<Vec<_>>>()?;
    (list.len() >= 2).then_some(list)
}

/// Why a named device cannot be opened; the message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

/// Opens the device `spec` names; `None` is auto: the first CUDA device when this build has
/// CUDA and one is present, else the CPU. `what` names where the device was given (e.g.
/// `--device`), for the message.
pub fn select_device(spec: Option<DeviceSpec>, what: &str) -> Result<Device, DeviceError> {
    match spec {
        None => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        Some(DeviceSpec::Cpu) => Ok(Device::Cpu),
        Some(DeviceSpec::Cuda(n)) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError(format!(
                    "{what} cuda:{n}: this tt-scale was built without CUDA; rebuild with `cargo build --release --features cuda` or use cpu"
                )));
            }
            Device::new_cuda(n)
                .map_err(|e| DeviceError(format!("{what} cuda:{n}: cannot open the GPU: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively_and_gpu_is_cuda_0() {
        assert_eq!(parse_device(" CPU "), Some(DeviceSpec::Cpu));
        assert_eq!(parse_device("gpu"), Some(DeviceSpec::Cuda(0)));
        assert_eq!(parse_device("cuda"), Some(DeviceSpec::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Some(DeviceSpec::Cuda(3)));
        assert_eq!(parse_device("cuda:x"), None);
        assert_eq!(parse_device("tpu"), None);
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn device_lists_need_two_valid_entries() {
        assert_eq!(
            parse_devices("cuda:0, cuda:1"),
            Some(vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)])
        );
        assert_eq!(parse_devices("cpu,cpu").map(|l| l.len()), Some(2));
        assert_eq!(parse_devices("cuda:0"), None);
        assert_eq!(parse_devices("cuda:0,tpu"), None);
        assert_eq!(parse_devices("cuda:0,"), None);
    }

    #[test]
    fn the_cpu_always_opens_and_a_gpu_without_cuda_says_how_to_build() {
        assert!(select_device(Some(DeviceSpec::Cpu), "--device").is_ok());
        if !candle_core::utils::cuda_is_available() {
            let err = select_device(Some(DeviceSpec::Cuda(0)), "--device").unwrap_err();
            assert!(err.to_string().contains("--features cuda"), "{err}");
        }
    }
}
