//! # tensorplace
//!
//! Loads [safetensors](https://github.com/huggingface/safetensors) files straight into the
//! memory of the device that will use them (the CPU, a CUDA GPU through `cudarc`, any GPU
//! that `wgpu` reaches) and writes them back.
//!
//! ## Overview
//!
//! The API mirrors `safetensors.flax`: [`load_file`], [`load`], [`save_file`] and [`save`](fn@save),
//! with a `device` argument that does what it says. A load validates the header by the
//! reference implementation's rules ([`header`]), builds one [`LoadPlan`](device::LoadPlan)
//! for the whole file and hands it to the device's [`Backend`](device::Backend) at once, so
//! that the backend can allocate one arena and overlap reading with copying. Every failure
//! is an [`Error`] naming the file, the tensor and the rule broken, with a matchable
//! [`ErrorKind`]; no input makes the library panic.
//!
//! Device strings: `cpu`, `cuda`, `cuda:N`, `gpu`, `gpu:N` (CUDA), `wgpu`, `wgpu:N`, and
//! `auto` (CUDA, else wgpu on a real GPU, else the CPU). An explicit GPU that is absent or
//! not compiled in is an error, never a silent fallback.
//!
//! ## Example
//!
//! ```
//! # fn main() -> tensorplace::Result<()> {
//! use tensorplace::{Tensor, Tensors};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("model.safetensors");
//!
//! let mut tensors = Tensors::new();
//! tensors.insert("w", Tensor::from_slice(vec![2, 2], &[1.0f32, 2.0, 3.0, 4.0])?);
//! tensorplace::save_file(&tensors, &path, None)?;
//!
//! let loaded = tensorplace::load_file(&path, "auto")?;
//! assert_eq!(loaded.tensor("w")?.to_vec::<f32>()?, [1.0, 2.0, 3.0, 4.0]);
//!
//! // Options go in a builder.
//! let halves = tensorplace::Loader::new("cpu")
//!     .dtype(tensorplace::Dtype::F16)
//!     .filter(|name| name.starts_with('w'))
//!     .load_file(&path)?;
//! assert_eq!(halves.tensor("w")?.dtype(), tensorplace::Dtype::F16);
//! # Ok(()) }
//! ```
//!
//! ## Crate features
//!
//! - `cuda` (default): the CUDA backend. libcuda is loaded at run time, so the crate builds
//!   without a CUDA toolkit; without a driver, `cuda` is an error and `auto` moves on.
//! - `wgpu` (default): the wgpu backend (Vulkan, Metal, DX12, GL) with its WGSL shaders.
//! - `cli` (default): the `tensorplace` tool and the benchmark harness ([`bench`](mod@bench)).
//!
//! With `default-features = false` only the CPU path is built.
//!
//! ## Safety
//!
//! By default a file is memory-mapped (read-only, shared), and CPU tensors are zero-copy
//! views of the mapping. As with every memory-mapped reader (safetensors, candle, memmap2),
//! the file must not be modified or truncated while it is loaded: a truncation can raise
//! `SIGBUS`, and a modification changes the tensors' bytes under them. Files that may change,
//! or that live on network storage, should be read with
//! [`Loader::read_mode`]`(`[`ReadMode::Pread`]`)`, which copies and maps nothing.
//! [`save_file`] never writes into an existing file: it renames a new one over it, so
//! saving over a loaded file is safe.

#![warn(missing_docs)]

pub mod device;
pub mod dtype;
pub mod error;
pub mod header;
pub mod host;
mod parallel;
pub mod save;
pub mod tensor;

#[cfg(feature = "cli")]
pub mod bench;

use std::path::Path;

pub use device::{Device, IntoDevice};
pub use dtype::{Conversion, Dtype};
pub use error::{Error, ErrorKind, Result};
pub use header::{Header, Metadata, TensorInfo};
pub use host::{HostFile, ReadMode};
pub use save::{save, save_file};
pub use tensor::{CpuStorage, Element, Storage, Tensor, Tensors};

/// Loads every tensor of the file at `path` onto `device` (a [`Device`] or a device string).
///
/// ```no_run
/// let tensors = tensorplace::load_file("model.safetensors", "cuda:0")?;
/// # Ok::<(), tensorplace::Error>(())
/// ```
pub fn load_file(path: impl AsRef<Path>, device: impl IntoDevice) -> Result<Tensors> {
    Loader::new(device).load_file(path)
}

/// Loads every tensor of a whole safetensors file held in `bytes` onto `device`.
///
/// The tensors are copies: on the CPU, owned buffers; on a GPU, device memory.
pub fn load(bytes: &[u8], device: impl IntoDevice) -> Result<Tensors> {
    Loader::new(device).load(bytes)
}

/// Progress of a load: input bytes done out of the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes placed so far.
    pub done: u64,
    /// Bytes to place in all.
    pub total: u64,
}

type Filter<'a> = Box<dyn Fn(&str) -> bool + 'a>;
type ProgressFn<'a> = Box<dyn Fn(Progress) + Sync + 'a>;

/// A load with options; the free functions are `Loader::new(device).load_file(path)`.
pub struct Loader<'a> {
    device: Result<Device>,
    dtype: Option<Dtype>,
    filter: Option<Filter<'a>>,
    progress: Option<ProgressFn<'a>>,
    read_mode: ReadMode,
    owned: bool,
}

impl std::fmt::Debug for Loader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("filter", &self.filter.is_some())
            .field("read_mode", &self.read_mode)
            .field("owned", &self.owned)
            .finish()
    }
}

impl<'a> Loader<'a> {
    /// A load onto `device`. An invalid device string is reported by the load.
    pub fn new(device: impl IntoDevice) -> Self {
        Loader {
            device: device.into_device(),
            dtype: None,
            filter: None,
            progress: None,
            read_mode: ReadMode::Mmap,
            owned: false,
        }
    }

    /// Casts every floating tensor to `dtype` on the device (see [`Conversion`] for the pairs
    /// supported; another pair is an [`ErrorKind::Unsupported`] error). Other tensors load
    /// as they are.
    pub fn dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Loads only the tensors whose name `keep` accepts.
    pub fn filter(mut self, keep: impl Fn(&str) -> bool + 'a) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Calls `progress` as bytes are placed (from any thread).
    pub fn progress(mut self, progress: impl Fn(Progress) + Sync + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// How the file is read (memory-mapped by default).
    pub fn read_mode(mut self, mode: ReadMode) -> Self {
        self.read_mode = mode;
        self
    }

    /// On the CPU, copies every tensor into owned memory instead of viewing the mapping.
    pub fn owned(mut self, owned: bool) -> Self {
        self.owned = owned;
        self
    }

    /// Loads the file at `path`.
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Tensors> {
        let path = path.as_ref();
        let device = self.device()?;
        let file = HostFile::open(path, self.read_mode)?;
        self.load_host(&file, device)
    }

    /// Loads a whole file held in `bytes` (copies, on every device).
    pub fn load(&self, bytes: &[u8]) -> Result<Tensors> {
        let device = self.device()?;
        let file = HostFile::from_bytes(bytes)?;
        self.load_host(&file, device)
    }

    fn device(&self) -> Result<Device> {
        match &self.device {
            Ok(d) => Ok(*d),
            Err(e) => Err(Error::new(e.kind(), e.message())),
        }
    }

    /// Loads an opened file onto `device`.
    pub fn load_host(&self, file: &HostFile<'_>, device: Device) -> Result<Tensors> {
        let backend = device::open(device)?;
        let keep_all = |_: &str| true;
        let keep: &dyn Fn(&str) -> bool = match &self.filter {
            Some(f) => f,
            None => &keep_all,
        };
        let plan = device::LoadPlan::new(file, self.dtype, keep)?.with_owned(self.owned);
        let total = plan.input_bytes();
        let progress = &self.progress;
        let report = |done: u64| {
            if let Some(p) = progress {
                p(Progress { done, total });
            }
        };
        let plan = plan.with_progress(
            self.progress
                .is_some()
                .then_some(&report as &(dyn Fn(u64) + Sync)),
        );
        let placed = backend.upload(&plan)?;
        let mut tensors: Tensors = plan
            .items()
            .iter()
            .map(|i| i.name.to_owned())
            .zip(placed)
            .collect();
        tensors.set_metadata(file.header().metadata().cloned());
        Ok(tensors)
    }
}
