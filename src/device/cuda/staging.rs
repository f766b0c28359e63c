//! The staging path: a ring of pinned host buffers, allocated once per device and reused,
//! filled by the host I/O engine (direct or positioned reads when the file is cold or not
//! mapped, copies from the mapping when warm), each copied up on a stream while the next is filled.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::memory::{Current, Pinned};
use super::{ALIGN, CudaBackend, STREAMS, Transfer, driver_err};
use crate::device::LoadPlan;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{self, PIECE, Piece};

/// Pinned staging buffers in the ring, and the size of each.
const RING: usize = 4;
const STAGING: usize = 64 << 20;

/// The staging ring of a device.
pub(crate) struct Ring {
    buffers: Vec<Pinned>,
}

/// One batch: the transfers that fill one staging buffer, each at its offset there.
struct Batch<'t, 'n> {
    transfers: &'t [Transfer<'n>],
    offsets: Vec<usize>,
}

/// Cuts `transfers` at [`STAGING`] bytes and groups them into batches of one buffer each.
fn batches<'t, 'n>(pieces: &'t [Transfer<'n>]) -> Vec<Batch<'t, 'n>> {
    let mut out = Vec::new();
    let mut start = 0usize;
    while start < pieces.len() {
        let mut end = start;
        let mut used = 0usize;
        let mut offsets = Vec::new();
        while let Some(t) = pieces.get(end) {
            let len = t.src.len();
            // Long pieces read directly go where their blocks land in place.
            let placed = io::staging_offset(used, t.file, &t.src, ALIGN);
            let at = if placed + len <= STAGING {
                placed
            } else {
                used
            };
            if end > start && at + len > STAGING {
                break;
            }
            offsets.push(at);
            used = (at + len).next_multiple_of(ALIGN);
            end += 1;
        }
        out.push(Batch {
            transfers: &pieces[start..end],
            offsets,
        });
        start = end;
    }
    out
}

/// Copies `transfers` through the device's ring of pinned staging buffers.
pub(crate) fn stage_and_copy(
    backend: &CudaBackend,
    current: &Current,
    plan: &LoadPlan<'_>,
    transfers: &[Transfer<'_>],
) -> Result<()> {
    let mut guard = backend.ring.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        let buffers = (0..RING)
            .map(|_| Pinned::alloc(&backend.ctx, STAGING))
            .collect::<Result<_>>()?;
        *guard = Some(Ring { buffers });
    }
    let ring = guard
        .as_mut()
        .ok_or_else(|| Error::new(ErrorKind::Backend, "no staging ring"))?;
    let pieces: Vec<Transfer<'_>> = transfers
        .iter()
        .flat_map(|t| io::chunks(0..t.src.len(), STAGING).map(|r| t.part(r)))
        .collect();
    for (n, batch) in batches(&pieces).into_iter().enumerate() {
        let slot = n % RING;
        let stream = &backend.streams[slot % STREAMS];
        let buffer = &mut ring.buffers[slot];
        let mut jobs = Vec::new();
        let mut rest = buffer.host_mut()?;
        let mut at = 0usize;
        for (t, &off) in batch.transfers.iter().zip(&batch.offsets) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
            let (mut dst, tail) = tail.split_at_mut(t.src.len());
            rest = tail;
            at = off + t.src.len();
            // Split big pieces so that every reader has work.
            for src in t.src.chunks(PIECE) {
                let (d, tail) = std::mem::take(&mut dst).split_at_mut(src.len());
                dst = tail;
                jobs.push(Piece {
                    tensor: t.tensor,
                    file: t.file,
                    src,
                    dst: d,
                });
            }
        }
        io::read_pieces(jobs, &|_| plan.advance(0))?;
        let mut bytes = 0u64;
        for (t, &off) in batch.transfers.iter().zip(&batch.offsets) {
            let src: *const c_void = buffer.device_source(off);
            // SAFETY: the source is `len` bytes of the pinned buffer, which is not written
            // again before this copy completes (`host_mut` waits for the event recorded
            // below); the destination is inside a device allocation that the load's stream
            // guard keeps alive until every stream is synchronized.
            unsafe { sys::cuMemcpyHtoDAsync_v2(t.dst, src, t.src.len(), stream.cu_stream()) }
                .result()
                .map_err(|e| driver_err(backend.ordinal, "copying to the device", e))?;
            bytes += t.src.len() as u64;
        }
        buffer.copied_on(stream)?;
        plan.advance(bytes)?;
        // The progress callback is the caller's code: it may have changed the context.
        current.restore(&backend.ctx)?;
    }
    backend.sync_all()
}
