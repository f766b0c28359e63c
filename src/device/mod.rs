//! Devices: parsing device strings, the upload strategies, the [`Backend`] trait every
//! device implements, the [`LoadPlan`] a backend receives (every tensor of a load, from one
//! file or many, at once), and
//! `auto` selection.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::convert::Conversion;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::TensorInfo;
use crate::read::file::HostFile;
use crate::read::gather::{Gather, Span};
use crate::slice::Selection;
use crate::tensor::Tensor;

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

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

/// How tensors go up to a GPU: a [`Loader`](crate::Loader) option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Upload {
    /// The fastest way the device and the file allow: on CUDA, register a mapped file in
    /// the page cache, else staging; on wgpu, in place on adapters that share host memory,
    /// else host import where the driver allows it, else staging.
    #[default]
    Auto,
    /// CUDA: page-lock the read-only mapping of the file in place and copy from it (a
    /// registration the driver refuses falls back to staging for the rest of the load).
    Register,
    /// CUDA and wgpu: copy through a ring of host staging buffers (CUDA: page-locked host
    /// memory; wgpu: buffers the driver allocates for mapping, which on a large-BAR GPU
    /// live in device memory written across the bus).
    Staging,
    /// wgpu, on adapters that share host memory (integrated and software GPUs): create the
    /// tensors' buffers mapped and write them in place.
    InPlace,
    /// wgpu on Vulkan: copy through a ring of page-locked host memory imported into the
    /// device (`VK_EXT_external_memory_host`), read by the GPU's copy engines.
    HostImport,
}

impl FromStr for Upload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Upload::Auto),
            "register" => Ok(Upload::Register),
            "staging" => Ok(Upload::Staging),
            "in-place" | "in_place" | "inplace" => Ok(Upload::InPlace),
            "host-import" | "host_import" | "hostimport" => Ok(Upload::HostImport),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("{s:?}: expected auto, register, staging, in-place or host-import"),
            )),
        }
    }
}

impl fmt::Display for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Upload::Auto => "auto",
            Upload::Register => "register",
            Upload::Staging => "staging",
            Upload::InPlace => "in-place",
            Upload::HostImport => "host-import",
        })
    }
}

/// Whether CPU tensors may be views of the file's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    /// Owned copies (the safe default).
    Copy,
    /// Zero-copy views where possible (the caller promised the file does not change).
    Mapped,
}

/// One tensor of a [`LoadPlan`].
#[derive(Debug, Clone)]
pub(crate) struct PlanItem<'f> {
    /// The tensor's name.
    pub name: &'f str,
    /// The file that holds it.
    pub file: &'f HostFile<'f>,
    /// The shape of what is loaded (the part's, for a slice or a split).
    pub shape: Vec<usize>,
    /// The file bytes to read, in order.
    pub input: Gather,
    /// The conversion to apply on the device, if any.
    pub conversion: Option<Conversion>,
    /// The dtype of the loaded tensor.
    pub out_dtype: Dtype,
    /// The size of the loaded tensor in bytes.
    pub out_len: usize,
}

impl PlanItem<'_> {
    /// All of its input bytes.
    pub fn span(&self) -> Span<'_> {
        Span::all(&self.input)
    }

    /// The number of input bytes.
    pub fn in_len(&self) -> usize {
        self.input.len()
    }

    /// Its conversion cut into pieces of at most `max` input bytes, for a bounded scratch
    /// buffer: each a whole number of elements, a multiple of 256 of them but for the last
    /// (so that kernels working on 4-byte units never share one, and output offsets stay
    /// 256-aligned for elements of 1 byte or more). Empty without a conversion.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub fn conversion_pieces(&self, max: usize) -> Vec<ConversionPiece<'_>> {
        let Some(conversion) = self.conversion else {
            return Vec::new();
        };
        let (in_size, out_size) = (conversion.from().bits() / 8, conversion.to().bits() / 8);
        let per = (max / in_size / 256 * 256).max(256);
        let span = self.span();
        let total = span.len() / in_size;
        (0..total)
            .step_by(per)
            .map(|first| {
                let n = per.min(total - first);
                ConversionPiece {
                    src: span.part(first * in_size..(first + n) * in_size),
                    elements: n as u64,
                    out_offset: first * out_size,
                }
            })
            .collect()
    }
}

/// A piece of a tensor's conversion ([`PlanItem::conversion_pieces`]).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) struct ConversionPiece<'a> {
    /// Its input bytes.
    pub src: Span<'a>,
    /// Its number of elements.
    pub elements: u64,
    /// Where its output starts in the tensor's output, in bytes.
    pub out_offset: usize,
}

/// A tensor to place: where it is, and what of it to take.
pub(crate) struct PlanEntry<'f> {
    /// Its name.
    pub name: &'f str,
    /// The file that holds it.
    pub file: &'f HostFile<'f>,
    /// Its header entry.
    pub info: &'f TensorInfo,
    /// What of it to take.
    pub selection: Selection<'f>,
}

/// Everything one load asks of a device: every tensor to place, from one file or many, in
/// file order.
pub(crate) struct LoadPlan<'f> {
    origin: Option<&'f Path>,
    items: Vec<PlanItem<'f>>,
    view: View,
    upload: Upload,
    total: u64,
    done: AtomicU64,
    progress: Option<&'f (dyn Fn(u64, u64) + Sync)>,
    interrupt: Option<&'f AtomicBool>,
    report: Mutex<PlanReport>,
}

/// What a backend tells about a load as it goes: the upload path taken, and fallbacks.
#[derive(Debug, Default)]
struct PlanReport {
    upload: Option<Upload>,
    notes: Vec<String>,
}

impl fmt::Debug for LoadPlan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadPlan")
            .field("origin", &self.origin)
            .field("items", &self.items.len())
            .field("view", &self.view)
            .field("upload", &self.upload)
            .finish()
    }
}

impl<'f> LoadPlan<'f> {
    /// A plan for `entries` (from `origin`: a file or a checkpoint's folder, for errors),
    /// floating tensors cast to `dtype` where given (others load as they are).
    pub fn new(
        origin: Option<&'f Path>,
        entries: Vec<PlanEntry<'f>>,
        dtype: Option<Dtype>,
    ) -> Result<Self> {
        let mut items = Vec::with_capacity(entries.len());
        for PlanEntry {
            name,
            file,
            info,
            selection,
        } in entries
        {
            let tag = |e: Error| e.with_tensor(name).with_opt_file(file.path());
            let conversion = match dtype {
                Some(to) if info.dtype.is_float() && info.dtype != to => {
                    Some(Conversion::between(info.dtype, to).ok_or_else(|| {
                        tag(Error::new(
                            ErrorKind::Unsupported,
                            format!("no conversion from {} to {to}", info.dtype),
                        ))
                    })?)
                }
                _ => None,
            };
            let (shape, input) = selection
                .resolve(info, file.header().file_range(info))
                .map_err(tag)?;
            let (out_dtype, out_len) = match conversion {
                Some(c) => (
                    c.to(),
                    c.output_len(input.len()).ok_or_else(|| {
                        tag(Error::new(
                            ErrorKind::SizeOverflow,
                            format!("{} bytes converted to {}", input.len(), c.to()),
                        ))
                    })?,
                ),
                None => (info.dtype, input.len()),
            };
            items.push(PlanItem {
                name,
                file,
                shape,
                input,
                conversion,
                out_dtype,
                out_len,
            });
        }
        let total = items.iter().map(|i| i.in_len() as u64).sum();
        Ok(LoadPlan {
            origin,
            items,
            view: View::Copy,
            upload: Upload::Auto,
            total,
            done: AtomicU64::new(0),
            progress: None,
            interrupt: None,
            report: Mutex::new(PlanReport::default()),
        })
    }

    /// Whether CPU tensors may be views of the mapping.
    pub fn with_view(mut self, view: View) -> Self {
        self.view = view;
        self
    }

    /// The upload strategy asked for.
    pub fn with_upload(mut self, upload: Upload) -> Self {
        self.upload = upload;
        self
    }

    /// Reports progress to `progress(done, total)`, in input bytes.
    pub fn with_progress(mut self, progress: &'f (dyn Fn(u64, u64) + Sync)) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The tensors, in file order.
    pub fn items(&self) -> &[PlanItem<'f>] {
        &self.items
    }

    /// Whether CPU tensors may be views of the mapping.
    pub fn view(&self) -> View {
        self.view
    }

    /// The upload strategy asked for.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn upload(&self) -> Upload {
        self.upload
    }

    /// Records `n` more input bytes placed (from any thread) and reports the new total; an
    /// [`ErrorKind::Interrupted`] error once the caller's interrupt flag is set.
    pub fn advance(&self, n: u64) -> Result<()> {
        if n > 0 {
            let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
            if let Some(p) = self.progress {
                p(done.min(self.total), self.total);
            }
        }
        match self.interrupt {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(self.err(Error::new(
                ErrorKind::Interrupted,
                "the caller stopped the load",
            ))),
            _ => Ok(()),
        }
    }

    /// Stops the load with [`ErrorKind::Interrupted`] once `flag` is set.
    pub fn with_interrupt(mut self, flag: Option<&'f AtomicBool>) -> Self {
        self.interrupt = flag;
        self
    }

    /// Reports the load complete, if the backend's reports have not reached the total.
    pub fn finish(&self) {
        let done = self.done.swap(self.total, Ordering::Relaxed);
        if let (Some(p), true) = (self.progress, done < self.total || self.total == 0) {
            p(self.total, self.total);
        }
    }

    /// Records the way up the backend took (the last one recorded wins).
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn note_upload(&self, upload: Upload) {
        self.report.lock().unwrap_or_else(|p| p.into_inner()).upload = Some(upload);
    }

    /// Records a fallback taken, in words.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn note(&self, note: String) {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notes
            .push(note);
    }

    /// The upload path and the notes recorded.
    pub fn take_report(&self) -> (Option<Upload>, Vec<String>) {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        (r.upload.take(), std::mem::take(&mut r.notes))
    }

    /// An [`ErrorKind::Unsupported`] error for an upload strategy this load cannot take.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn unsupported_upload(&self, device: Device, why: &str) -> Error {
        self.err(Error::new(
            ErrorKind::Unsupported,
            format!("{device}: upload {}: {why}", self.upload),
        ))
    }

    /// Tags an error with the load's file (or checkpoint folder), unless it names one.
    pub fn err(&self, e: Error) -> Error {
        e.with_opt_file(self.origin)
    }
}

/// A device that can receive a whole [`LoadPlan`].
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// The device this backend places tensors on.
    fn device(&self) -> Device;
    /// A human description, such as `cuda:0 (NVIDIA H100 80GB HBM3)`.
    fn describe(&self) -> String;
    /// Places every tensor of the plan, returning them in the plan's order.
    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>>;
}

/// Opens the backend for `device`, resolving `auto`; `adapter` picks the wgpu adapter of
/// the device `wgpu` by name.
///
/// An explicit GPU that is not compiled in, absent, or whose driver fails is an
/// [`ErrorKind::DeviceUnavailable`] error, never a fallback; `auto` falls back to the CPU.
pub(crate) fn open(device: Device, adapter: Option<&str>) -> Result<Arc<dyn Backend>> {
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
        open(self, None).map(|b| b.device())
    }

    /// A human description of the device a load onto `self` would use, such as
    /// `cuda:0 (NVIDIA H100 80GB HBM3)`, or why it is unavailable. A loader that picks a
    /// wgpu adapter by name says which with [`Loader::describe`](crate::Loader::describe).
    pub fn describe(self) -> Result<String> {
        open(self, None).map(|b| b.describe())
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
fn open_wgpu(index: Option<usize>, adapter: Option<&str>) -> Result<Arc<dyn Backend>> {
    wgpu::WgpuBackend::open(index, adapter).map(|b| b as Arc<dyn Backend>)
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu(index: Option<usize>, _adapter: Option<&str>) -> Result<Arc<dyn Backend>> {
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
        let b = open(Device::Auto, None).unwrap();
        assert!(!b.describe().is_empty());
        assert_ne!(Device::Auto.probe().unwrap(), Device::Auto);
        assert_eq!(Device::Cpu.probe().unwrap(), Device::Cpu);
    }

    #[test]
    fn upload_strategies_parse() {
        for u in [
            Upload::Auto,
            Upload::Register,
            Upload::Staging,
            Upload::InPlace,
            Upload::HostImport,
        ] {
            assert_eq!(u.to_string().parse::<Upload>().unwrap(), u);
        }
        assert!("fast".parse::<Upload>().is_err());
    }
}
