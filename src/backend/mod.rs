//! The backends: the [`Backend`] trait every device implements (it receives a whole
//! [`LoadPlan`] at once), opening one for a [`Device`] (`auto` resolved), and listing the
//! devices present.

use std::fmt;
use std::sync::Arc;

use crate::device::Device;
use crate::error::Result;
use crate::plan::{LoadPlan, Upload};
use crate::storage::Storage;
use crate::tensor::Tensor;

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod common;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

/// A device that can receive a whole [`LoadPlan`].
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// The device this backend places tensors on.
    fn device(&self) -> Device;
    /// A human description, such as `cuda:0 (NVIDIA H100 80GB HBM3)`.
    fn describe(&self) -> String;
    /// The upload strategies the device takes (any other is refused before the plan
    /// reaches it). The CPU has no upload and takes every one.
    fn uploads(&self) -> &'static [Upload] {
        &[
            Upload::Auto,
            Upload::Register,
            Upload::Staging,
            Upload::InPlace,
            Upload::HostImport,
        ]
    }
    /// Places every tensor of the plan, returning their storages in the plan's order.
    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Storage>>;
}

impl Backend for cpu::CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn describe(&self) -> String {
        self.description()
    }
    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Storage>> {
        Ok(self.place(plan)?.into_iter().map(Storage::Cpu).collect())
    }
}

#[cfg(feature = "cuda")]
impl Backend for cuda::CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal())
    }
    fn describe(&self) -> String {
        self.description()
    }
    fn uploads(&self) -> &'static [Upload] {
        &[Upload::Auto, Upload::Register, Upload::Staging]
    }
    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Storage>> {
        Ok(self.place(plan)?.into_iter().map(Storage::Cuda).collect())
    }
}

#[cfg(feature = "wgpu")]
impl Backend for wgpu::WgpuBackend {
    fn device(&self) -> Device {
        Device::Wgpu(Some(self.index()))
    }
    fn describe(&self) -> String {
        self.description()
    }
    fn uploads(&self) -> &'static [Upload] {
        &[
            Upload::Auto,
            Upload::Staging,
            Upload::InPlace,
            Upload::HostImport,
        ]
    }
    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Storage>> {
        Ok(self.place(plan)?.into_iter().map(Storage::Wgpu).collect())
    }
}

/// Places every tensor of `plan` on `backend`'s device: the one place a load's [`Tensor`]s
/// are made, each of its plan item's output dtype and shape. An upload strategy the device
/// does not take is refused here, before anything is read.
pub(crate) fn place(backend: &dyn Backend, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>> {
    let takes = backend.uploads();
    if !takes.contains(&plan.upload()) {
        let names: Vec<String> = takes.iter().map(Upload::to_string).collect();
        let why = format!(
            "not a strategy of this device (it takes {})",
            names.join(", ")
        );
        return Err(plan.unsupported_upload(backend.device(), &why));
    }
    let storages = backend.upload(plan)?;
    Ok(plan
        .items()
        .iter()
        .zip(storages)
        .map(|(item, storage)| Tensor::from_parts(item.out_dtype, item.shape.clone(), storage))
        .collect())
}

/// Opens the backend for `device`, resolving `auto`; `adapter` picks the wgpu adapter of
/// the device `wgpu` by name.
///
/// An explicit GPU that is not compiled in, absent, or whose driver fails is an
/// [`ErrorKind::DeviceUnavailable`] error, never a fallback; `auto` falls back to the CPU.
pub(crate) fn for_device(device: Device, adapter: Option<&str>) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(cpu::CpuBackend)),
        Device::Cuda(ordinal) => open_cuda(ordinal),
        Device::Wgpu(index) => open_wgpu(index, adapter),
        Device::Auto => Ok(open_auto()),
    }
}

impl Device {
    /// The device a load onto `self` would use: `auto` resolved to the device present, an
    /// explicit device checked. An absent GPU is an [`ErrorKind::DeviceUnavailable`] error.
    pub fn probe(self) -> Result<Device> {
        for_device(self, None).map(|b| b.device())
    }

    /// A human description of the device a load onto `self` would use, such as
    /// `cuda:0 (NVIDIA H100 80GB HBM3)`, or why it is unavailable. A loader that picks a
    /// wgpu adapter by name says which with [`Loader::describe`](crate::Loader::describe).
    pub fn describe(self) -> Result<String> {
        for_device(self, None).map(|b| b.describe())
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
    use crate::error::{Error, ErrorKind};
    Err(Error::new(
        ErrorKind::DeviceUnavailable,
        format!("cuda:{ordinal}: the CUDA backend is not compiled in (enable the `cuda` feature)"),
    ))
}

#[cfg(feature = "wgpu")]
fn open_wgpu(index: Option<usize>, adapter: Option<&str>) -> Result<Arc<dyn Backend>> {
    wgpu::WgpuBackend::open(index, adapter).map(|b| b as Arc<dyn Backend>)
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu(index: Option<usize>, _adapter: Option<&str>) -> Result<Arc<dyn Backend>> {
    use crate::error::{Error, ErrorKind};
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
    out.push(format!("cpu: {} threads", crate::parallel::cores()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_never_fails_and_cpu_is_there() {
        let b = for_device(Device::Auto, None).unwrap();
        assert!(!b.describe().is_empty());
        assert_ne!(Device::Auto.probe().unwrap(), Device::Auto);
        assert_eq!(Device::Cpu.probe().unwrap(), Device::Cpu);
    }
}
