//! How a load's bytes reach wgpu buffers.
//!
//! - **In place** (adapters that share host memory: integrated and software GPUs): the
//!   tensors' buffers are created mapped and the host I/O engine writes the file's bytes
//!   straight into them, on every core. No staging copy at all.
//! - **Staging** (discrete GPUs): a ring of staging buffers written while mapped (by every
//!   core) and copied into the tensors' buffers by one batched command buffer each, so that
//!   the host's writes into one staging buffer overlap the transfers of the others.
//!
//! Tensors to convert go through one scratch buffer of at most 256 MiB, batch after batch:
//! their input bytes land there (in place, or through the staging ring), and the kernels
//! write the outputs from it, so that a load that converts needs its output plus the scratch
//! on the device, whatever its size.

use std::sync::{Arc, Mutex, OnceLock};

use super::host_import::HostRegion;
use super::{Kernel, WgpuBackend, WgpuStorage, backend_err, pad4};
use crate::device::{Device, LoadPlan, PlanItem, Upload};
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;
use crate::io::{self, Destination, PIECE, Piece, Source, Span};
use crate::parallel::{self, Threads};
use crate::tensor::{Storage, Tensor};

/// Staging buffers in the ring.
pub(crate) const RING: usize = 4;
/// Size of one staging buffer (less where the device allows less).
pub(crate) const STAGING: u64 = 64 << 20;
/// Size of the scratch buffer conversions read their input from (less where the device
/// allows less): device memory for a load that converts is its output plus this.
const SCRATCH: u64 = 256 << 20;

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
struct MappedRange<'b> {
    buffer: &'b wgpu::Buffer,
    offset: u64,
    len: usize,
    /// Whether the mapping is plain host memory (an adapter that shares it): then the bytes
    /// are read straight into it. Elsewhere it may be write-combined device memory behind
    /// the bus, which is only ever copied into.
    host_memory: bool,
}

impl Destination for MappedRange<'_> {
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
struct Write<'n, 'b> {
    tensor: &'n str,
    file: &'n HostFile<'n>,
    buffer: &'b wgpu::Buffer,
    offset: u64,
    src: Span<'n>,
}

/// Writes file bytes into mapped buffers through the host I/O engine, in pieces of
/// [`PIECE`] bytes (8-aligned, wgpu's MAP_ALIGNMENT) spread over every core.
fn fill(
    writes: &[Write<'_, '_>],
    host_memory: bool,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    let pieces = writes
        .iter()
        .flat_map(|w| {
            io::chunks(0..w.src.len(), PIECE).map(move |r| Piece {
                tensor: w.tensor,
                file: w.file,
                dst: MappedRange {
                    buffer: w.buffer,
                    offset: w.offset + r.start as u64,
                    len: r.len(),
                    host_memory,
                },
                src: w.src.part(r),
            })
        })
        .collect();
    io::read_pieces(pieces, advance)
}

/// One piece of a tensor on its way through the ring: the bytes `src` of `file` into `dst`
/// at `dst_offset`.
#[derive(Clone)]
struct Transfer<'n, 'b> {
    tensor: &'n str,
    file: &'n HostFile<'n>,
    src: Span<'n>,
    dst: &'b wgpu::Buffer,
    dst_offset: u64,
}

impl<'n, 'b> Transfer<'n, 'b> {
    /// The transfer cut after `at` of its bytes (4-aligned).
    fn split_at(self, at: usize) -> (Self, Self) {
        let len = self.src.len();
        let head = Transfer {
            src: self.src.part(0..at),
            ..self.clone()
        };
        let tail = Transfer {
            dst_offset: self.dst_offset + at as u64,
            src: self.src.part(at..len),
            ..self
        };
        (head, tail)
    }
}

/// One buffer of the ring.
pub(super) enum Staging {
    /// A buffer the driver allocates, written while mapped, with its pending re-mapping
    /// and the submission that re-mapping waits for.
    Mapped {
        buffer: wgpu::Buffer,
        remap: Option<(MapState, wgpu::SubmissionIndex)>,
    },
    /// Host memory imported into the device, written directly once the last submission
    /// that read it is done.
    Imported {
        buffer: wgpu::Buffer,
        host: Arc<HostRegion>,
        last: Option<wgpu::SubmissionIndex>,
    },
}

impl Staging {
    /// A new buffer of `size` bytes of the ring `kind`.
    fn new(backend: &WgpuBackend, kind: Ring, size: u64) -> Result<Staging> {
        match (kind, &backend.importer) {
            (Ring::Imported, Some(importer)) => {
                let (buffer, host) = importer.import(&backend.device, size as usize)?;
                Ok(Staging::Imported {
                    buffer,
                    host,
                    last: None,
                })
            }
            (Ring::Imported, None) => Err(backend_err("the device cannot import host memory")),
            (Ring::Mapped, _) => Ok(Staging::Mapped {
                buffer: backend.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tensorplace staging"),
                    size,
                    usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                }),
                remap: None,
            }),
        }
    }

    /// The wgpu buffer copies read from.
    fn buffer(&self) -> &wgpu::Buffer {
        match self {
            Staging::Mapped { buffer, .. } | Staging::Imported { buffer, .. } => buffer,
        }
    }

    /// Its usable size in bytes.
    fn size(&self) -> u64 {
        match self {
            Staging::Mapped { buffer, .. } => buffer.size(),
            Staging::Imported { host, .. } => host.len() as u64,
        }
    }

    /// Waits until the host may write the buffer again. A mapped buffer without a pending
    /// re-mapping is mapped already: created mapped, or re-mapped by an earlier wait (one
    /// whose re-mapping failed fails its next write with an error, never a panic).
    fn ready(&mut self, backend: &WgpuBackend) -> Result<()> {
        match self {
            Staging::Mapped { remap, .. } => match remap.take() {
                Some((state, after)) => wait_mapped(backend, &state, Some(after)),
                None => Ok(()),
            },
            Staging::Imported { last, .. } => match last.take() {
                Some(index) => backend.wait(Some(index)),
                None => Ok(()),
            },
        }
    }

    /// Writes the `batch` of transfers at `offsets` (increasing, 4-aligned, each transfer
    /// padded to 4 bytes with zeros), through the host I/O engine on every core.
    fn fill(
        &mut self,
        batch: &[Transfer<'_, '_>],
        offsets: &[u64],
        plan: &LoadPlan<'_>,
    ) -> Result<()> {
        match self {
            Staging::Mapped { buffer, .. } => {
                let writes: Vec<Write<'_, '_>> = batch
                    .iter()
                    .zip(offsets)
                    .map(|(t, &offset)| Write {
                        tensor: t.tensor,
                        file: t.file,
                        buffer,
                        offset,
                        src: t.src.clone(),
                    })
                    .collect();
                fill(&writes, false, &|_| plan.advance(0))?;
                buffer.unmap();
                Ok(())
            }
            Staging::Imported { host, .. } => {
                // SAFETY: `ready` waited for the last submission that read this memory, the
                // ring is borrowed mutably (no other writer), and the drop callback that
                // also holds the region only frees it: these bytes are ours until the next
                // submission.
                let bytes = unsafe { std::slice::from_raw_parts_mut(host.as_ptr(), host.len()) };
                let mut rest = bytes;
                let mut at = 0usize;
                let mut pieces = Vec::new();
                for (t, &offset) in batch.iter().zip(offsets) {
                    let len = t.src.len();
                    let padded = pad4(len as u64) as usize;
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut(offset as usize - at);
                    let (dst, tail) = tail.split_at_mut(padded);
                    rest = tail;
                    at = offset as usize + padded;
                    let (dst, pad) = dst.split_at_mut(len);
                    pad.fill(0);
                    for (r, dst) in io::chunks(0..len, PIECE).zip(dst.chunks_mut(PIECE)) {
                        pieces.push(Piece {
                            tensor: t.tensor,
                            file: t.file,
                            src: t.src.part(r),
                            dst,
                        });
                    }
                }
                io::read_pieces(pieces, &|_| plan.advance(0))
            }
        }
    }

    /// Records `index`, the submission that copies out of the buffer, before the next fill.
    fn submitted(&mut self, index: wgpu::SubmissionIndex) {
        match self {
            Staging::Mapped { buffer, remap } => {
                *remap = Some((map_async(buffer, wgpu::MapMode::Write), index));
            }
            Staging::Imported { last, .. } => *last = Some(index),
        }
    }
}

/// The kind of staging ring a load streams through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ring {
    /// Buffers the driver allocates, written mapped.
    Mapped,
    /// Host memory imported into the device.
    Imported,
}

/// How a load's bytes reach the device's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
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
            "the device cannot import host memory (not Vulkan, or no VK_EXT_external_memory_host)",
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
                    io::chunks(0..span.len(), staging_size as usize)
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

/// Streams `transfers` through the staging ring of kind `ring`: fill one buffer (on every
/// core), copy from it into the destinations, submit, and go on with the next buffer while
/// the copies run; a buffer is filled again once its copies are done. Each buffer is filled
/// to the brim: a transfer that does not fit is cut at the room left (4-byte boundaries),
/// its rest going first into the next buffer. The ring is the backend's, kept between
/// loads; a load that finds it in use by another makes its own.
fn stream(
    backend: &WgpuBackend,
    plan: &LoadPlan<'_>,
    transfers: &[Transfer<'_, '_>],
    kind: Ring,
    size: u64,
) -> Result<()> {
    let shared = match kind {
        Ring::Mapped => &backend.ring,
        Ring::Imported => &backend.imported_ring,
    };
    let mut shared = shared.try_lock().ok();
    let mut own = Vec::new();
    let ring: &mut Vec<Staging> = match shared.as_deref_mut() {
        Some(r) if r.first().is_none_or(|s| s.size() == size) => r,
        _ => &mut own,
    };
    let mut queue: std::collections::VecDeque<Transfer<'_, '_>> =
        transfers.iter().map(Transfer::clone).collect();
    let mut next = 0usize;
    let mut last = None;
    while !queue.is_empty() {
        // Gather what fills one staging buffer, each transfer at a 256-byte aligned offset.
        let mut batch = Vec::new();
        let mut offsets = Vec::new();
        let mut used = 0u64;
        while let Some(t) = queue.pop_front() {
            let len = t.src.len() as u64;
            // Into imported memory, long pieces read directly go where their blocks land in
            // place (a mapped buffer's host address is the driver's).
            let placed = match kind {
                Ring::Imported => io::staging_offset(used as usize, t.file, &t.src, 4) as u64,
                Ring::Mapped => used,
            };
            if placed + pad4(len) <= size {
                offsets.push(placed);
                used = (placed + pad4(len)).next_multiple_of(256);
                batch.push(t);
                continue;
            }
            let room = size.saturating_sub(used) / 4 * 4;
            if room >= 4 {
                let (head, tail) = t.split_at(room as usize);
                offsets.push(used);
                batch.push(head);
                queue.push_front(tail);
            } else {
                queue.push_front(t);
            }
            break;
        }
        if ring.len() < RING {
            ring.push(Staging::new(backend, kind, size)?);
        }
        let slot = next % ring.len().max(1);
        next += 1;
        let staging = &mut ring[slot];
        staging.ready(backend)?;
        staging.fill(&batch, &offsets, plan)?;
        let mut enc = backend.device.create_command_encoder(&Default::default());
        for (t, &off) in batch.iter().zip(&offsets) {
            enc.copy_buffer_to_buffer(
                staging.buffer(),
                off,
                t.dst,
                t.dst_offset,
                pad4(t.src.len() as u64),
            );
        }
        let index = backend.queue.submit([enc.finish()]);
        staging.submitted(index.clone());
        last = Some(index);
        plan.advance(batch.iter().map(|t| t.src.len() as u64).sum())?;
    }
    backend.wait(last)?;
    Ok(())
}

/// One piece of a tensor to convert: `elements` elements of its input (`src`, a whole
/// number of elements, a multiple of 256 of them but for its last piece) into its output
/// buffer at `out_offset` (a multiple of 256 bytes).
struct Convert<'n, 'b> {
    tensor: &'n str,
    file: &'n HostFile<'n>,
    src: Span<'n>,
    elements: u64,
    out: &'b wgpu::Buffer,
    out_offset: u64,
    kernel: Kernel,
}

impl<'n, 'b> Convert<'n, 'b> {
    /// The pieces of `item` that fit a scratch buffer of `scratch` bytes (output offsets
    /// 256-aligned: the binding alignment).
    fn chunks(
        item: &'n PlanItem<'n>,
        out: &'b wgpu::Buffer,
        kernel: Kernel,
        scratch: u64,
    ) -> Vec<Convert<'n, 'b>> {
        item.conversion_pieces(scratch as usize)
            .into_iter()
            .map(|p| Convert {
                tensor: item.name,
                file: item.file,
                src: p.src,
                elements: p.elements,
                out,
                out_offset: p.out_offset as u64,
                kernel,
            })
            .collect()
    }
}

/// Converts `converts` through one scratch buffer of `size` bytes: each batch's inputs
/// written into it (in place where the adapter shares host memory, else through the staging
/// ring), then the kernels from it into the outputs. In place, the next batch waits for the
/// kernels of the last; through the ring, the queue's order keeps the copies of the next
/// batch after them.
fn convert_through_scratch(
    backend: &WgpuBackend,
    plan: &LoadPlan<'_>,
    converts: &[Convert<'_, '_>],
    path: Path,
    size: u64,
    staging_size: u64,
) -> Result<()> {
    if converts.is_empty() {
        return Ok(());
    }
    let direct = path == Path::InPlace;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let scratch = backend.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("tensorplace conversion scratch"),
        size,
        usage: if direct {
            usage | wgpu::BufferUsages::MAP_WRITE
        } else {
            usage
        },
        mapped_at_creation: direct,
    });
    let mut remap: Option<(MapState, wgpu::SubmissionIndex)> = None;
    let mut last = None;
    let mut start = 0;
    while start < converts.len() {
        // A batch: the pieces that fit, each at a 256-byte aligned offset.
        let mut offsets = Vec::new();
        let mut used = 0u64;
        let mut end = start;
        while let Some(c) = converts.get(end) {
            let len = pad4(c.src.len() as u64);
            if end > start && used + len > size {
                break;
            }
            offsets.push(used);
            used = (used + len).next_multiple_of(256);
            end += 1;
        }
        let batch = &converts[start..end];
        match path {
            Path::InPlace => {
                if let Some((state, after)) = remap.take() {
                    wait_mapped(backend, &state, Some(after))?;
                }
                let writes: Vec<Write<'_, '_>> = batch
                    .iter()
                    .zip(&offsets)
                    .map(|(c, &offset)| Write {
                        tensor: c.tensor,
                        file: c.file,
                        buffer: &scratch,
                        offset,
                        src: c.src.clone(),
                    })
                    .collect();
                fill(&writes, true, &|n| plan.advance(n))?;
                scratch.unmap();
            }
            Path::Staged(ring) => {
                let transfers: Vec<Transfer<'_, '_>> = batch
                    .iter()
                    .zip(&offsets)
                    .map(|(c, &offset)| Transfer {
                        tensor: c.tensor,
                        file: c.file,
                        src: c.src.clone(),
                        dst: &scratch,
                        dst_offset: offset,
                    })
                    .collect();
                stream(backend, plan, &transfers, ring, staging_size)?;
            }
        }
        let mut enc = backend.device.create_command_encoder(&Default::default());
        for (c, &offset) in batch.iter().zip(&offsets) {
            backend.dispatch(
                &mut enc,
                &c.kernel,
                (&scratch, offset),
                (c.out, c.out_offset),
                c.elements,
            )?;
        }
        let index = backend.queue.submit([enc.finish()]);
        if direct && end < converts.len() {
            remap = Some((map_async(&scratch, wgpu::MapMode::Write), index.clone()));
        }
        last = Some(index);
        start = end;
    }
    backend.wait(last)
}
