//! The staging rings a load streams through on adapters that do not share host memory:
//! page-locked host memory imported into the device, or buffers the driver maps. Each buffer
//! is filled on every core, copied out by one batched command buffer, and filled again once
//! its own submission is done, so that the host's writes into one buffer overlap the copies
//! out of the others. The rings are the backend's, kept between loads.

use std::sync::Arc;

use super::host_import::HostRegion;
use super::upload::{MapState, Write, fill, map_async, wait_mapped};
use super::{WgpuBackend, backend_err, pad4};
use crate::device::LoadPlan;
use crate::error::Result;
use crate::host::HostFile;
use crate::io::{self, PIECE, Piece, Span};

/// Staging buffers in the ring.
pub(crate) const RING: usize = 4;
/// Size of one staging buffer (less where the device allows less).
pub(crate) const STAGING: u64 = 64 << 20;
/// One piece of a tensor on its way through the ring: the bytes `src` of `file` into `dst`
/// at `dst_offset`.
#[derive(Clone)]
pub(super) struct Transfer<'n, 'b> {
    pub tensor: &'n str,
    pub file: &'n HostFile<'n>,
    pub src: Span<'n>,
    pub dst: &'b wgpu::Buffer,
    pub dst_offset: u64,
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
pub(super) enum Ring {
    /// Buffers the driver allocates, written mapped.
    Mapped,
    /// Host memory imported into the device.
    Imported,
}

/// Streams `transfers` through the staging ring of kind `ring`: fill one buffer (on every
/// core), copy from it into the destinations, submit, and go on with the next buffer while
/// the copies run; a buffer is filled again once its copies are done. Each buffer is filled
/// to the brim: a transfer that does not fit is cut at the room left (4-byte boundaries),
/// its rest going first into the next buffer. The ring is the backend's, kept between
/// loads; a load that finds it in use by another makes its own.
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
