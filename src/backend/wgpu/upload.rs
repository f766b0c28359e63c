//! How a load's bytes reach wgpu buffers: the path each load takes, and the load itself.
//!
//! - **In place** (adapters that share host memory: integrated and software GPUs): the
//!   tensors' buffers are created mapped and the host I/O engine writes the file's bytes
//!   straight into them, on every core. No staging copy at all.
//! - **Staging** (discrete GPUs): through a ring of host-import or mapped staging buffers
//!   ([`ring`](super::ring)).
//!
//! Tensors to convert go through one bounded scratch buffer ([`scratch`](super::scratch)).

use std::sync::{Arc, Mutex, OnceLock};

use super::ring::{Ring, STAGING, Transfer, stream};
use super::scratch::{Convert, SCRATCH, convert_through_scratch};
use super::{Kernel, WgpuBackend, WgpuStorage, backend_err, pad4};
use crate::device::Device;
use crate::error::{Error, ErrorKind, Result};
use crate::parallel::{self, Threads};
use crate::plan::{LoadPlan, Upload};
use crate::read::PIECE;
use crate::read::engine::{self, Destination, Piece, Source};
use crate::read::file::HostFile;
use crate::read::gather::{self, Span};
use crate::tensor::{Storage, Tensor};

/// The outcome of a `map_async`, set by its callback once the device has run the work
/// queued before it.
pub(super) struct MapState(Arc<OnceLock<std::result::Result<(), wgpu::BufferAsyncError>>>);

/// Asks to map all of `buffer`; [`wait_mapped`] waits for it.
pub(super) fn map_async(buffer: &wgpu::Buffer, mode: wgpu::MapMode) -> MapState {
    let state = Arc::new(OnceLock::new());
    let done = state.clone();
    buffer.slice(..).map_async(mode, move |r| {
        let _ = done.set(r);
    });
    MapState(state)
}

/// Waits until `state`'s mapping is done: first for `after` (the last submission that used
/// the buffer, so that later submissions need not finish), then until the callback ran.
pub(super) fn wait_mapped(
    backend: &WgpuBackend,
    state: &MapState,
    after: Option<wgpu::SubmissionIndex>,
) -> Result<()> {
    if let Some(index) = after {
        backend.wait(Some(index))?;
    }
    loop {
        match state.0.get() {
            Some(Ok(())) => return Ok(()),
            Some(Err(e)) => return Err(backend_err(format!("mapping a buffer failed: {e}"))),
            None => {
                backend.check_lost()?;
                backend.wait(None)?;
            }
        }
    }
}

/// A buffer to create for a load.
struct BufferSpec<'n> {
    label: &'n str,
    /// The bytes it holds (padded to 4 when created).
    size: usize,
    /// Whether the file's bytes are written into it (so, in place, it is created mapped).
    written: bool,
}

/// `len` bytes at `offset` of a mapped buffer, zero-padded to 4 bytes.
pub(super) struct MappedRange {
    buffer: wgpu::Buffer,
    offset: u64,
    len: usize,
    /// Whether the mapping is plain host memory (an adapter that shares it): then the bytes
    /// are read straight into it. Elsewhere it may be write-combined device memory behind
    /// the bus, which is only ever copied into.
    host_memory: bool,
}

impl Destination for MappedRange {
    fn write(self, src: Source<'_>) -> Result<()> {
        let padded = pad4(self.len as u64);
        let mut view = self
            .buffer
            .get_mapped_range_mut(self.offset..self.offset + padded)
            .map_err(|e| backend_err(format!("mapping a buffer: {e}")))?;
        let whole = self.len / 4 * 4;
        if self.host_memory {
            let ptr = view.slice(..).as_raw_ptr();
            // SAFETY: the view maps `padded` bytes of host memory for writing, held until
            // the end of this scope, and no other view of them exists (each piece maps its
            // own range); the engine only writes through the slice.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<u8>(), padded as usize)
            };
            let (bytes, pad) = dst.split_at_mut(self.len);
            pad.fill(0);
            return src.read_into(bytes);
        }
        let bytes = src.bytes()?;
        view.slice(..whole).copy_from_slice(&bytes[..whole]);
        if whole < padded as usize {
            let mut tail = [0u8; 4];
            tail[..self.len - whole].copy_from_slice(&bytes[whole..]);
            view.slice(whole..).copy_from_slice(&tail);
        }
        Ok(())
    }
}

/// A write of the bytes `src` of `file` (of `tensor`) into a mapped buffer at `offset`
/// (8-aligned).
pub(super) struct Write<'n, 'b> {
    pub tensor: &'n str,
    pub file: &'n HostFile<'n>,
    pub buffer: &'b wgpu::Buffer,
    pub offset: u64,
    pub src: Span<'n>,
}

/// Writes file bytes into mapped buffers through the host I/O engine, in pieces of
/// [`PIECE`] bytes (8-aligned, wgpu's MAP_ALIGNMENT) spread over every core.
pub(super) fn fill(
    writes: &[Write<'_, '_>],
    host_memory: bool,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    engine::read_pieces(mapped_pieces(writes, host_memory), advance)
}

/// The engine's pieces of `writes`: [`PIECE`] bytes each (8-aligned, wgpu's MAP_ALIGNMENT).
pub(super) fn mapped_pieces<'n>(
    writes: &[Write<'n, '_>],
    host_memory: bool,
) -> Vec<Piece<'n, MappedRange>> {
    writes
        .iter()
        .flat_map(|w| {
            gather::chunks(0..w.src.len(), PIECE).map(move |r| Piece {
                tensor: w.tensor,
                file: w.file,
                dst: MappedRange {
                    buffer: w.buffer.clone(),
                    offset: w.offset + r.start as u64,
                    len: r.len(),
                    host_memory,
                },
                src: w.src.part(r),
            })
        })
        .collect()
}

/// How a load's bytes reach the device's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    /// Written into the tensors' own buffers, mapped.
    InPlace,
    /// Through a staging ring.
    Staged(Ring),
}

/// The path this load takes, or why the strategy asked for cannot be used.
fn path(backend: &WgpuBackend, upload: Upload) -> std::result::Result<Path, &'static str> {
    let import = backend.importer.is_some();
    match upload {
        Upload::Auto if backend.in_place_supported => Ok(Path::InPlace),
        Upload::Auto if import => Ok(Path::Staged(Ring::Imported)),
        Upload::Auto | Upload::Staging => Ok(Path::Staged(Ring::Mapped)),
        Upload::InPlace if backend.in_place_supported => Ok(Path::InPlace),
        Upload::InPlace => Err("the adapter does not share host memory"),
        Upload::HostImport if import => Ok(Path::Staged(Ring::Imported)),
        Upload::HostImport => Err(
            "the device cannot import host memory (not Vulkan, no VK_EXT_external_memory_host, or a copy from imported memory failed its check)",
        ),
        Upload::Register => Err("registering host memory is a CUDA strategy"),
    }
}

pub(super) fn upload(backend: &Arc<WgpuBackend>, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>> {
    let path = path(backend, plan.upload())
        .map_err(|why| plan.unsupported_upload(Device::Wgpu(Some(backend.index)), why))?;
    plan.note_upload(match path {
        Path::InPlace => Upload::InPlace,
        Path::Staged(Ring::Mapped) => Upload::Staging,
        Path::Staged(Ring::Imported) => Upload::HostImport,
    });
    let direct = path == Path::InPlace;
    let ring = match path {
        Path::Staged(ring) => ring,
        Path::InPlace => Ring::Mapped,
    };
    let items = plan.items();
    let max = backend.limits.max_buffer_size;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    for item in items {
        let biggest = item.in_len().max(item.out_len) as u64;
        if pad4(biggest) > max {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{biggest} bytes exceed the device's max_buffer_size of {max}"),
            )
            .with_tensor(item.name));
        }
    }
    let kernels: Vec<Option<Kernel>> = items
        .iter()
        .map(|i| i.conversion.map(|c| backend.kernel_for(c)))
        .collect();
    let staging_size = STAGING.min(max) / 256 * 256;
    let scratch_size = SCRATCH.min(max) / 256 * 256;
    backend.scoped("uploading", || {
        // The tensors' buffers. Where the adapter shares host memory, the buffers the file's
        // bytes go to are created mapped.
        let make = |spec: &BufferSpec<'_>| {
            let mapped = direct && spec.written;
            backend.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(spec.label),
                size: pad4(spec.size as u64),
                usage: if mapped {
                    usage | wgpu::BufferUsages::MAP_WRITE
                } else {
                    usage
                },
                mapped_at_creation: mapped,
            })
        };
        // Creating a buffer mapped zero-fills it on the creating thread: create them on
        // every core, the largest first, so that the fills (and page faults) run in parallel.
        let create_all = |specs: Vec<BufferSpec<'_>>| -> Result<Vec<wgpu::Buffer>> {
            if !direct {
                return Ok(specs.iter().map(make).collect());
            }
            let slots: Vec<Mutex<Option<wgpu::Buffer>>> =
                specs.iter().map(|_| Mutex::new(None)).collect();
            let mut order: Vec<usize> = (0..specs.len()).collect();
            order.sort_by_key(|&k| std::cmp::Reverse(specs[k].size));
            parallel::for_each(order, Threads::PerCore, |k, _| {
                let buffer = make(&specs[k]);
                *slots[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(buffer);
                Ok(())
            })?;
            slots
                .into_iter()
                .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| backend_err("a buffer was not created"))
        };
        // Out of memory shows at once, before anything is read.
        let oom = backend
            .device
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let outs = create_all(
            items
                .iter()
                .map(|i| BufferSpec {
                    label: i.name,
                    size: i.out_len,
                    written: i.conversion.is_none() && i.in_len() > 0,
                })
                .collect(),
        )?;
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(Error::new(
                ErrorKind::OutOfMemory,
                format!("creating the tensors' buffers: {e}"),
            ));
        }
        // The tensors kept as they are go straight into their buffers.
        let targets = items
            .iter()
            .zip(&outs)
            .filter(|(i, _)| i.in_len() > 0 && i.conversion.is_none());
        if direct {
            let writes: Vec<Write<'_, '_>> = targets
                .map(|(item, buffer)| Write {
                    tensor: item.name,
                    file: item.file,
                    buffer,
                    offset: 0,
                    src: item.span(),
                })
                .collect();
            fill(&writes, true, &|n| plan.advance(n))?;
            for w in &writes {
                w.buffer.unmap();
            }
        } else {
            let transfers: Vec<Transfer<'_, '_>> = targets
                .flat_map(|(item, dst)| {
                    let span = item.span();
                    gather::chunks(0..span.len(), staging_size as usize)
                        .map(|r| Transfer {
                            tensor: item.name,
                            file: item.file,
                            dst_offset: r.start as u64,
                            src: span.part(r),
                            dst,
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            stream(backend, plan, &transfers, ring, staging_size)?;
        }
        // The tensors to convert go through one bounded scratch buffer, batch after batch.
        let converts: Vec<Convert<'_, '_>> = items
            .iter()
            .zip(&outs)
            .zip(&kernels)
            .filter(|((i, _), _)| i.in_len() > 0)
            .filter_map(|((item, out), kernel)| kernel.map(|kernel| (item, out, kernel)))
            .flat_map(|(item, out, kernel)| Convert::chunks(item, out, kernel, scratch_size))
            .collect();
        convert_through_scratch(backend, plan, &converts, path, scratch_size, staging_size)?;
        Ok(items
            .iter()
            .zip(outs)
            .map(|(item, buffer)| {
                let storage = WgpuStorage {
                    backend: backend.clone(),
                    buffer,
                    len: item.out_len,
                };
                Tensor::from_parts(item.out_dtype, item.shape.clone(), Storage::Wgpu(storage))
            })
            .collect())
    })
}
