//! # tensorplace
//!
//! Loads [safetensors](https://github.com/huggingface/safetensors) files straight into the
//! memory of the device that will use them (the CPU, a CUDA GPU through `cudarc`, any GPU
//! that `wgpu` reaches) and writes them back.
//!
//! ## Overview
//!
//! The API mirrors `safetensors.flax`: [`load_file`], [`load`], [`save_file`] and [`save`](fn@save),
//! with a `device` argument that does what it says; [`Loader`] carries every option. A load
//! validates the header by the reference implementation's rules, plans the whole file at
//! once and hands the plan to the device's backend, so that the backend can allocate one
//! arena and overlap reading with copying (`ARCHITECTURE.md` in the repository maps the
//! code). Every failure is an [`Error`] naming the file, the tensor and the rule broken,
//! with a matchable [`ErrorKind`]; no input makes the library panic.
//!
//! Loaded tensors are [`Tensor`]s in a [`Tensors`] collection; each one's [`Storage`] gives
//! the backend handle for interop (a CUDA device pointer and stream, a wgpu buffer).
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
//! tensorplace::save_file(&tensors, &path, None)?; // None: the tensors' own metadata
//!
//! let loaded = tensorplace::load_file(&path, "auto")?; // the metadata comes along
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
//! - `bench` (unstable, not part of the API): the benchmark harness behind `tensorplace bench`
//!   (the `tensorplace` tool is the workspace's `tensorplace-cli` crate).
//!
//! With `default-features = false` only the CPU path is built.
//!
//! ## Safety
//!
//! The safe functions never hand out memory that a change to the file can alter: CPU
//! tensors are owned copies, GPU tensors live in device memory. They do read the file
//! during the call, by default through a read-only shared mapping (the fastest way, and the
//! one CUDA can page-lock in place). While a load runs, the file must not be truncated: as
//! with every memory-mapped reader (safetensors, candle, memmap2), reading a page that a
//! truncation removed raises `SIGBUS`, and a concurrent rewrite can mix old and new bytes.
//! [`Loader::read_mode`]`(`[`ReadMode::Pread`]`)` maps nothing: a file truncated under
//! it is an I/O error, never a signal, and suits files that may change or live on network
//! storage. Zero-copy CPU views of the mapping, which live as long as the tensors, are the
//! explicit `unsafe` opt-in [`Loader::load_file_mapped`], whose contract is the one of
//! `memmap2::Mmap::map`. [`save_file`] never writes into an existing file: it renames a new
//! one over it, so saving over a loaded file is safe.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod atomic;
mod backend;
mod checkpoint;
mod convert;
mod device;
mod dtype;
mod error;
mod header;
mod host_cache;
pub mod hub;
mod loader;
mod memory;
mod parallel;
mod plan;
mod read;
mod reader;
#[cfg(feature = "remote")]
pub mod remote;
mod report;
mod save;
mod shards;
mod slice;
mod storage;
mod stream;
mod tensor;

use std::path::Path;

#[cfg(feature = "cuda")]
pub use backend::cuda::CudaStorage;
#[cfg(feature = "wgpu")]
pub use backend::wgpu::WgpuStorage;
pub use checkpoint::{Checkpoint, INDEX_NAME, TensorEntry, open};
pub use device::{Device, IntoDevice};
pub use dtype::Dtype;
pub use error::{Error, ErrorKind, Result};
pub use header::Metadata;
pub use loader::{Loader, Progress};
pub use plan::Upload;
pub use read::file::ReadMode;
pub use reader::{MemoryRead, Reader};
pub use report::{LoadReport, ReadPath};
pub use save::{
    Serialized, TensorView, save, save_file, save_views, save_views_file, serialize_views,
};
pub use shards::{
    CheckpointWriter, MAX_SHARD_SIZE, ShardSplit, parse_size, save_checkpoint,
    save_views_checkpoint,
};
pub use slice::{Slice, SliceIndex};
pub use storage::{CpuStorage, Storage};
pub use stream::Stream;
pub use tensor::{Element, Tensor, Tensors};

/// Not part of the API: what the command-line tool and the tests reach inside the crate, and
/// with the `unstable-internals` feature what the benchmark harness (`tensorplace-bench`)
/// does. It may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::atomic::{hold_writes, remove_temporaries, write_atomically};
    #[cfg(feature = "cuda")]
    pub use crate::backend::cuda::{CONVERT_PTX, CudaBackend};
    pub use crate::backend::list as list_devices;
    #[cfg(feature = "wgpu")]
    pub use crate::backend::wgpu::{Kernel, WgpuBackend};
    pub use crate::checkpoint::is_multi_file;
    pub use crate::convert::Conversion;
    pub use crate::header::{Header, TensorInfo};
    pub use crate::read::file::HostFile;

    /// A file to read as `mode` says, as a [`Loader`](crate::Loader) with default options
    /// opens it: an object's URL remotely (feature `remote`), else on disk.
    pub fn open_host_file(
        path: &std::path::Path,
        mode: crate::ReadMode,
    ) -> crate::Result<HostFile<'static>> {
        crate::loader::open_file(path, mode, true, &Default::default())
    }

    /// A checkpoint (a folder or an index) as a [`Loader`](crate::Loader) with default options
    /// opens it: an index's URL remotely (feature `remote`), else on disk.
    pub fn open_checkpoint(path: &std::path::Path) -> crate::Result<crate::Checkpoint> {
        crate::loader::open_checkpoint(path, &Default::default())
    }

    #[cfg(all(feature = "unstable-internals", feature = "cuda"))]
    pub use crate::backend::cuda::{Arena, Pinned, driver_err};
    #[cfg(all(feature = "unstable-internals", feature = "wgpu"))]
    pub use crate::backend::wgpu::{HostRegion, RING, STAGING};
    #[cfg(feature = "unstable-internals")]
    pub use crate::{
        memory::HostBuffer,
        parallel::{Threads, for_each},
        read::PIECE,
        read::direct::open_direct,
        read::engine::{Destination, Piece, Source, read_pieces},
        read::gather::{Gather, Span, chunks},
    };

    /// A CPU tensor of `dtype` and `shape` on bytes `range` of `buffer` (the harness builds
    /// large synthetic files without a copy); the range's length must be the tensor's.
    #[cfg(feature = "unstable-internals")]
    pub fn host_tensor(
        dtype: crate::Dtype,
        shape: Vec<usize>,
        buffer: std::sync::Arc<HostBuffer>,
        range: std::ops::Range<usize>,
    ) -> crate::Tensor {
        let storage = crate::CpuStorage::owned(buffer, range);
        crate::Tensor::from_parts(dtype, shape, crate::Storage::Cpu(storage))
    }
}

/// Loads every tensor of the file at `path` onto `device` (a [`Device`] or a device
/// string), with the file's metadata. CPU tensors are owned copies.
///
/// ```no_run
/// let tensors = tensorplace::load_file("model.safetensors", "cuda:0")?;
/// # Ok::<(), tensorplace::Error>(())
/// ```
pub fn load_file(path: impl AsRef<Path>, device: impl IntoDevice) -> Result<Tensors> {
    Loader::new(device).load_file(path)
}

/// Gives back to the system, at once, the host memory that loads onto the CPU left for later
/// ones (arenas freed with their last tensor, else kept for 10 s at most: see README.md,
/// "Devices in detail"); the bytes given back. As `torch.cuda.empty_cache()` for torch's GPU
/// memory.
pub fn trim_host_memory() -> usize {
    host_cache::HostCache::global().trim()
}

/// Loads every tensor of a whole safetensors file held in `bytes` onto `device`.
///
/// The tensors are copies: on the CPU, owned buffers; on a GPU, device memory.
pub fn load(bytes: &[u8], device: impl IntoDevice) -> Result<Tensors> {
    Loader::new(device).load(bytes)
}
