//! [`Device`]: where tensors go, parsed from the strings of the `device` parameter.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};

/// Where tensors go.
///
/// Parsed from the strings of the `device` parameter: `cpu`; `cuda`, `cuda:N`, `gpu`,
/// `gpu:N` (JAX's name, meaning CUDA); `wgpu` (the best adapter), `wgpu:N` (the Nth adapter
/// in the order `tensorplace devices` lists); `auto` (CUDA, else wgpu on a real GPU, else
/// the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
    /// A wgpu adapter: `None` for the best one, `Some(n)` for the nth.
    Wgpu(Option<usize>),
    /// The best device present: CUDA, then wgpu on a real GPU, then the CPU.
    #[default]
    Auto,
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let (kind, index) = match lower.split_once(':') {
            Some((k, i)) => {
                let i = i.parse::<usize>().map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidDevice,
                        format!("{s:?}: the part after ':' must be a device number"),
                    )
                })?;
                (k, Some(i))
            }
            None => (lower.as_str(), None),
        };
        Ok(match (kind, index) {
            ("cpu", None) => Device::Cpu,
            ("auto", None) => Device::Auto,
            ("cuda" | "gpu", i) => Device::Cuda(i.unwrap_or(0)),
            ("wgpu", i) => Device::Wgpu(i),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidDevice,
                    format!("{s:?}: expected cpu, cuda, cuda:N, gpu, gpu:N, wgpu, wgpu:N or auto"),
                ));
            }
        })
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(None) => f.write_str("wgpu"),
            Device::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
            Device::Auto => f.write_str("auto"),
        }
    }
}

/// Anything that names a device: a [`Device`] or a device string.
pub trait IntoDevice {
    /// The device, or an [`ErrorKind::InvalidDevice`] error.
    fn into_device(self) -> Result<Device>;
}

impl IntoDevice for Device {
    fn into_device(self) -> Result<Device> {
        Ok(self)
    }
}

impl IntoDevice for &Device {
    fn into_device(self) -> Result<Device> {
        Ok(*self)
    }
}

impl IntoDevice for &str {
    fn into_device(self) -> Result<Device> {
        self.parse()
    }
}

impl IntoDevice for String {
    fn into_device(self) -> Result<Device> {
        self.parse()
    }
}

impl IntoDevice for &String {
    fn into_device(self) -> Result<Device> {
        self.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("CUDA:1".parse::<Device>().unwrap(), Device::Cuda(1));
        assert_eq!("gpu:2".parse::<Device>().unwrap(), Device::Cuda(2));
        assert_eq!("gpu".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("wgpu".parse::<Device>().unwrap(), Device::Wgpu(None));
        assert_eq!("wgpu:3".parse::<Device>().unwrap(), Device::Wgpu(Some(3)));
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        for bad in ["", "tpu", "cuda:", "cuda:x", "cpu:0", "cuda:-1", "auto:1"] {
            let e = bad.parse::<Device>().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidDevice, "{bad}");
        }
        for d in [
            Device::Cpu,
            Device::Cuda(1),
            Device::Wgpu(None),
            Device::Wgpu(Some(0)),
        ] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
    }
}
