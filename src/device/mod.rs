//! Devices: parsing device strings, the [`Backend`] trait every device implements, the
//! [`LoadPlan`] a backend receives (the whole file at once), and `auto` selection.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use crate::dtype::{Conversion, Dtype};
use crate::error::{Error, ErrorKind, Result};
use crate::header::TensorInfo;
use crate::host::HostFile;
use crate::tensor::Tensor;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

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

/// One tensor of a [`LoadPlan`].
#[derive(Debug, Clone)]
pub struct PlanItem<'f> {
    /// The tensor's name.
    pub name: &'f str,
    /// Its header entry.
    pub info: &'f TensorInfo,
    /// Its bytes' range in the file.
    pub src: Range<usize>,
    /// The conversion to apply on the device, if any.
    pub conversion: Option<Conversion>,
    /// The dtype of the loaded tensor.
    pub out_dtype: Dtype,
    /// The size of the loaded tensor in bytes.
    pub out_len: usize,
}

/// Everything one load asks of a device: the file and every tensor to place, in file order.
pub struct LoadPlan<'f> {
    file: &'f HostFile<'f>,
    items: Vec<PlanItem<'f>>,
    owned: bool,
    progress: Option<&'f (dyn Fn(u64) + Sync)>,
}

impl fmt::Debug for LoadPlan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadPlan")
            .field("file", &self.file)
            .field("items", &self.items.len())
            .field("owned", &self.owned)
            .finish()
    }
}

impl<'f> LoadPlan<'f> {
    /// A plan for the tensors of `file` that `keep` accepts, cast to `dtype` where given
    /// (floating tensors only; others load as they are).
    pub fn new(
        file: &'f HostFile<'f>,
        dtype: Option<Dtype>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let header = file.header();
        let mut items = Vec::with_capacity(header.tensors().len());
        for (name, info) in file.tensors() {
            if !keep(name) {
                continue;
            }
            let conversion = match dtype {
                Some(to) if info.dtype.is_float() && info.dtype != to => {
                    Some(Conversion::between(info.dtype, to).ok_or_else(|| {
                        Error::new(
                            ErrorKind::Unsupported,
                            format!("no conversion from {} to {to}", info.dtype),
                        )
                        .with_tensor(name)
                        .with_opt_file(file.path())
                    })?)
                }
                _ => None,
            };
            let (out_dtype, out_len) = match conversion {
                // Validated sizes are whole elements; output sizes are no larger than 2x.
                Some(c) => (c.to(), c.output_len(info.len()).unwrap_or(0)),
                None => (info.dtype, info.len()),
            };
            items.push(PlanItem {
                name,
                info,
                src: header.file_range(info),
                conversion,
                out_dtype,
                out_len,
            });
        }
        Ok(LoadPlan {
            file,
            items,
            owned: false,
            progress: None,
        })
    }

    /// Asks for owned copies even where zero-copy views are possible (CPU only).
    pub fn with_owned(mut self, owned: bool) -> Self {
        self.owned = owned;
        self
    }

    /// Reports progress: the callback gets the input bytes done so far.
    pub fn with_progress(mut self, progress: Option<&'f (dyn Fn(u64) + Sync)>) -> Self {
        self.progress = progress;
        self
    }

    /// The file.
    pub fn file(&self) -> &'f HostFile<'f> {
        self.file
    }

    /// The tensors, in file order.
    pub fn items(&self) -> &[PlanItem<'f>] {
        &self.items
    }

    /// Whether owned copies were asked for.
    pub fn owned(&self) -> bool {
        self.owned
    }

    /// The input bytes of all items.
    pub fn input_bytes(&self) -> u64 {
        self.items.iter().map(|i| i.src.len() as u64).sum()
    }

    /// Reports `done` input bytes, if a progress callback was given.
    pub fn report(&self, done: u64) {
        if let Some(p) = self.progress {
            p(done);
        }
    }

    /// Tags an error with the file's path.
    pub fn err(&self, e: Error) -> Error {
        e.with_opt_file(self.file.path())
    }
}

/// A device that can receive a whole [`LoadPlan`].
pub trait Backend: Send + Sync + fmt::Debug {
    /// The device this backend places tensors on.
    fn device(&self) -> Device;
    /// A human description, such as `cuda:0 (NVIDIA H100 80GB HBM3)`.
    fn describe(&self) -> String;
    /// Places every tensor of the plan, returning them in the plan's order.
    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>>;
}

/// Opens the backend for `device`, resolving `auto`.
///
/// An explicit GPU that is not compiled in, absent, or whose driver fails is an
/// [`ErrorKind::DeviceUnavailable`] error, never a fallback; `auto` falls back to the CPU.
pub fn open(device: Device) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(cpu::CpuBackend)),
        Device::Cuda(ordinal) => open_cuda(ordinal),
        Device::Wgpu(index) => open_wgpu(index),
        Device::Auto => Ok(open_auto()),
    }
}

fn open_auto() -> Arc<dyn Backend> {
    if let Ok(b) = open_cuda(0) {
        return b;
    }
    #[cfg(feature = "wgpu")]
    if let Ok(b) = wgpu::WgpuBackend::open_best_hardware() {
        return b;
    }
    Arc::new(cpu::CpuBackend)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Arc<dyn Backend>> {
    cuda::CudaBackend::open(ordinal).map(|b| b as Arc<dyn Backend>)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Arc<dyn Backend>> {
    Err(Error::new(
        ErrorKind::DeviceUnavailable,
        format!("cuda:{ordinal}: the CUDA backend is not compiled in (enable the `cuda` feature)"),
    ))
}

#[cfg(feature = "wgpu")]
fn open_wgpu(index: Option<usize>) -> Result<Arc<dyn Backend>> {
    wgpu::WgpuBackend::open(index).map(|b| b as Arc<dyn Backend>)
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu(index: Option<usize>) -> Result<Arc<dyn Backend>> {
    let name = Device::Wgpu(index);
    Err(Error::new(
        ErrorKind::DeviceUnavailable,
        format!("{name}: the wgpu backend is not compiled in (enable the `wgpu` feature)"),
    ))
}

/// One line per device present: CUDA devices, then wgpu adapters, then the CPU. Devices
/// whose backend is not compiled in or whose driver is missing are listed with the reason.
pub fn list() -> Vec<String> {
    let mut out = Vec::new();
    #[cfg(feature = "cuda")]
    match cuda::list() {
        Ok(v) => out.extend(v),
        Err(e) => out.push(format!("cuda: none ({e})")),
    }
    #[cfg(not(feature = "cuda"))]
    out.push("cuda: not compiled in".to_owned());
    #[cfg(feature = "wgpu")]
    match wgpu::list() {
        Ok(v) if !v.is_empty() => out.extend(v),
        Ok(_) => out.push("wgpu: no adapter".to_owned()),
        Err(e) => out.push(format!("wgpu: none ({e})")),
    }
    #[cfg(not(feature = "wgpu"))]
    out.push("wgpu: not compiled in".to_owned());
    out.push(format!(
        "cpu: {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));
    out
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

    #[test]
    fn auto_never_fails_and_cpu_is_there() {
        let b = open(Device::Auto).unwrap();
        assert!(!b.describe().is_empty());
        assert_eq!(open(Device::Cpu).unwrap().device(), Device::Cpu);
    }
}
