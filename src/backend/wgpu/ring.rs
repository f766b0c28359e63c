//! The staging rings a load streams through on adapters that do not share host memory:
//! page-locked host memory imported into the device, or buffers the driver maps. Each buffer
//! is filled on every core, copied out by one batched command buffer, and filled again once
//! its own submission is done, so that the host's writes into one buffer overlap the copies
//! out of the others. The rings are the backend's, kept between loads.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use super::host_import::HostRegion;
use super::map::{
    BufferAt, MapState, MappedRange, Transfer, map_async, mapped_pieces, wait_mapped,
};
use super::{WgpuBackend, backend_err, pad4};
use crate::error::Result;
use crate::plan::{LoadPlan, Upload};
use crate::read::PIECE;
use crate::read::engine::{self, Destination, Piece, Source};
use crate::read::gather;

/// Staging buffers in the ring.
pub const RING: usize = 4;
/// Size of one staging buffer (less where the device allows less).
pub const STAGING: u64 = 64 << 20;
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

    /// The engine's pieces that write the `batch` of transfers at `offsets` (increasing,
    /// 4-aligned, each transfer padded to 4 bytes with zeros) into the buffer, once
    /// [`ready`](Self::ready).
    ///
    /// # Safety
    /// For the imported kind the pieces write the host memory through slices of no lifetime:
    /// the caller keeps this buffer, and lets no submission read it, until every piece has
    /// been written or dropped.
    unsafe fn pieces<'n, 'h>(
        &mut self,
        batch: &[Transfer<'n, '_>],
        offsets: &[u64],
    ) -> Vec<Piece<'n, Slot<'h>>> {
        match self {
            Staging::Mapped { buffer, .. } => {
                let writes: Vec<Transfer<'n, '_>> = batch
                    .iter()
                    .zip(offsets)
                    .map(|(t, &offset)| Transfer {
                        tensor: t.tensor,
                        file: t.file,
                        src: t.src.clone(),
                        dst: BufferAt { buffer, offset },
                    })
                    .collect();
                mapped_pieces(&writes, false)
                    .into_iter()
                    .map(|p| Piece {
                        tensor: p.tensor,
                        file: p.file,
                        src: p.src,
                        dst: Slot::Mapped(p.dst),
                    })
                    .collect()
            }
            Staging::Imported { host, .. } => {
                // SAFETY: `ready` waited for the last submission that read this memory, and
                // the caller lets none read it while the pieces live (this function's
                // contract); the ring is borrowed mutably (no other writer), and the drop
                // callback that also holds the region only frees it.
                let bytes: &'h mut [u8] =
                    unsafe { std::slice::from_raw_parts_mut(host.as_ptr(), host.len()) };
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
                    for (r, dst) in gather::chunks(0..len, PIECE).zip(dst.chunks_mut(PIECE)) {
                        pieces.push(Piece {
                            tensor: t.tensor,
                            file: t.file,
                            src: t.src.part(r),
                            dst: Slot::Host(dst),
                        });
                    }
                }
                pieces
            }
        }
    }

    /// Ends the host's writes (a mapped buffer is unmapped) before its copies are encoded.
    fn filled(&self) {
        if let Staging::Mapped { buffer, .. } = self {
            buffer.unmap();
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

/// Where a piece of a staging batch goes: a range of a mapped buffer, or of imported host
/// memory.
enum Slot<'h> {
    Mapped(MappedRange),
    Host(&'h mut [u8]),
}

impl Destination for Slot<'_> {
    fn write(self, src: Source<'_>) -> Result<()> {
        match self {
            Slot::Mapped(range) => range.write(src),
            Slot::Host(bytes) => bytes.write(src),
        }
    }
}

/// The kind of staging ring a load streams through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ring {
    /// Buffers the driver allocates, written mapped ([`Upload::Staging`]).
    Mapped,
    /// Host memory imported into the device ([`Upload::HostImport`]).
    Imported,
}

impl Ring {
    /// The ring a load taking `upload` (resolved: not `Auto`) streams through; `None` where
    /// it writes the tensors' buffers in place.
    pub(super) fn of(upload: Upload) -> Option<Ring> {
        match upload {
            Upload::InPlace => None,
            Upload::HostImport => Some(Ring::Imported),
            _ => Some(Ring::Mapped),
        }
    }
}

/// Streams `transfers` through the staging ring of kind `ring`: each buffer filled by the
/// host I/O engine (up to three at once, so that the readers never wait between buffers),
/// then its copies into the destinations encoded and submitted while later buffers are still
/// being read; a buffer is filled again once its own copies are done. Each buffer is filled
/// to the brim: a transfer that does not fit is cut at the room left (4-byte boundaries),
/// its rest going first into the next buffer.
///
/// The ring of `size`-byte buffers is the backend's, kept between loads and grown only to
/// the buffers a load's batches use (a load of one batch adds none after the first). A
/// load that finds it in use by another, or a load smaller than one buffer while the kept
/// ring has none yet, streams through buffers of its own, sized to it and freed after: a
/// process that only ever loads small files holds no staging memory between loads (the
/// driver backs, and wgpu zero-fills, every byte of a mapped staging buffer).
pub(super) fn stream(
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
    let small = own_size(transfers, size);
    let (ring, size): (&mut Vec<Staging>, u64) = match shared.as_deref_mut() {
        Some(r) if r.first().is_some_and(|s| s.size() == size) => (r, size),
        Some(r) if r.is_empty() && small.is_none() => (r, size),
        _ => (&mut own, small.unwrap_or(size)),
    };
    let threads = engine::pool_for(transfers.iter().map(|t| t.file));
    let queue: VecDeque<Transfer<'_, '_>> = transfers.iter().map(Transfer::clone).collect();
    let state = RefCell::new(Stream {
        ring,
        queue,
        filling: VecDeque::new(),
        next: 0,
        last: None,
    });
    let start = |_| state.borrow_mut().start(backend, kind, size);
    let finish = |_| {
        let copied = state.borrow_mut().submit(backend);
        plan.advance(copied)
    };
    engine::read_batches(threads, RING - 1, start, finish, &|_| plan.advance(0))?;
    let last = state.into_inner().last;
    backend.wait(last)
}

/// The size of buffers of a load's own to stream `transfers` through, where that is less
/// than `size`: their padded bytes with room for each one's alignment in the buffer, in
/// whole MiB. `None` where they need a whole buffer or more.
fn own_size(transfers: &[Transfer<'_, '_>], size: u64) -> Option<u64> {
    let need = transfers.iter().try_fold(0u64, |n, t| {
        n.checked_add(pad4(t.src.len() as u64))?
            .checked_add(crate::read::direct::BLOCK as u64 + 256)
    })?;
    let need = need.checked_next_multiple_of(1 << 20)?;
    (need < size).then_some(need)
}

/// A stream's state between its batches.
struct Stream<'r, 'n, 'b> {
    ring: &'r mut Vec<Staging>,
    /// Transfers not yet in a batch.
    queue: VecDeque<Transfer<'n, 'b>>,
    /// Batches being read: their slot, transfers and offsets there.
    filling: VecDeque<(usize, Vec<Transfer<'n, 'b>>, Vec<u64>)>,
    /// Batches started.
    next: usize,
    /// The last submission.
    last: Option<wgpu::SubmissionIndex>,
}

impl<'n, 'b> Stream<'_, 'n, 'b> {
    /// The engine's pieces of the next batch, in the next buffer of the ring (added to it
    /// while it has fewer than [`RING`]) once that buffer's last copies are done; `None`
    /// once every transfer is in a batch.
    fn start<'h>(
        &mut self,
        backend: &WgpuBackend,
        kind: Ring,
        size: u64,
    ) -> Result<Option<Vec<Piece<'n, Slot<'h>>>>> {
        let Some((batch, offsets)) = next_batch(&mut self.queue, kind, size) else {
            return Ok(None);
        };
        let slot = self.next % RING;
        if slot == self.ring.len() {
            self.ring.push(Staging::new(backend, kind, size)?);
        }
        self.next += 1;
        let staging = &mut self.ring[slot];
        staging.ready(backend)?;
        // SAFETY: the buffer stays in the ring (which outlives the stream) and is submitted
        // only in `submit`, after the engine has written (or dropped) every piece.
        let pieces = unsafe { staging.pieces(&batch, &offsets) };
        self.filling.push_back((slot, batch, offsets));
        Ok(Some(pieces))
    }

    /// Submits the copies of the oldest batch being filled (now filled) out of its buffer
    /// into their destinations; the bytes copied.
    fn submit(&mut self, backend: &WgpuBackend) -> u64 {
        let Some((slot, batch, offsets)) = self.filling.pop_front() else {
            return 0;
        };
        let staging = &mut self.ring[slot];
        staging.filled();
        let mut enc = backend.device.create_command_encoder(&Default::default());
        for (t, &off) in batch.iter().zip(&offsets) {
            let len = pad4(t.src.len() as u64);
            enc.copy_buffer_to_buffer(staging.buffer(), off, t.dst.buffer, t.dst.offset, len);
        }
        let index = backend.queue.submit([enc.finish()]);
        staging.submitted(index.clone());
        self.last = Some(index);
        batch.iter().map(|t| t.src.len() as u64).sum()
    }
}

/// The next batch from `queue`: what fills one staging buffer of `size` bytes, each transfer
/// at a 256-byte aligned offset (into imported memory, long pieces read directly where their
/// blocks land in place: a mapped buffer's host address is the driver's), a transfer that
/// does not fit cut at the room left. `None` once the queue is empty.
#[allow(clippy::type_complexity)]
fn next_batch<'n, 'b>(
    queue: &mut VecDeque<Transfer<'n, 'b>>,
    kind: Ring,
    size: u64,
) -> Option<(Vec<Transfer<'n, 'b>>, Vec<u64>)> {
    if queue.is_empty() {
        return None;
    }
    let mut batch = Vec::new();
    let mut offsets = Vec::new();
    let mut used = 0u64;
    while let Some(t) = queue.pop_front() {
        let len = t.src.len() as u64;
        let placed = match kind {
            Ring::Imported => engine::staging_offset(used as usize, t.file, &t.src, 4) as u64,
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
            let (head, tail) = (t.part(0..room as usize), t.part(room as usize..t.src.len()));
            offsets.push(used);
            batch.push(head);
            queue.push_front(tail);
        } else {
            queue.push_front(t);
        }
        break;
    }
    Some((batch, offsets))
}
