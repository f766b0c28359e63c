//! The staging path: a ring of pinned host buffers, allocated once per device and reused,
//! filled by the host I/O engine (direct or positioned reads when the file is cold or not
//! mapped, copies from the mapping when warm), each copied up on a stream while the next is filled.

use std::cell::RefCell;
use std::ffi::c_void;

use cudarc::driver::CudaStream;
use cudarc::driver::sys::{self, CUdeviceptr};

use super::memory::{Current, Pinned};
use super::{ALIGN, CudaBackend, STREAMS, Transfer, driver_err};
use crate::error::{Error, ErrorKind, Result};
use crate::plan::LoadPlan;
use crate::read::engine::{self, Piece};
use crate::read::gather;
use crate::read::{LONG_RUN, PIECE};

/// Pinned staging buffers in the ring, and the size of each.
const RING: usize = 4;
const STAGING: usize = 64 << 20;

/// The staging ring of a device.
pub(crate) struct Ring {
    buffers: Vec<Pinned>,
}

/// One batch: the transfers that fill one staging buffer, each at its offset there, and the
/// copies that take them up.
struct Batch<'t, 'n> {
    transfers: &'t [Transfer<'n>],
    offsets: Vec<usize>,
    copies: Vec<HostToDevice>,
}

/// One host-to-device copy of a batch: `len` bytes at `offset` of the staging buffer to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostToDevice {
    offset: usize,
    dst: CUdeviceptr,
    len: usize,
}

/// Cuts `transfers` at [`STAGING`] bytes and groups them into batches of one buffer each.
///
/// Neighbouring tensors become one copy: a short transfer whose destination follows the last
/// one's end by less than one slot's padding (the arena packs tensors in plan order, each
/// start [`ALIGN`]ed, so no other tensor's bytes can lie in such a gap) is staged at the same
/// distance from it, and the copy grows over both (the padding between them carries whatever
/// the staging buffer held: nobody reads it). Long transfers read directly go where their
/// blocks land in place.
fn batches<'t, 'n>(pieces: &'t [Transfer<'n>]) -> Vec<Batch<'t, 'n>> {
    let mut out = Vec::new();
    let mut start = 0usize;
    while start < pieces.len() {
        let mut used = 0usize;
        let mut offsets = Vec::new();
        let mut copies: Vec<HostToDevice> = Vec::new();
        for t in &pieces[start..] {
            let Some(at) = place(&mut copies, t, used, offsets.is_empty()) else {
                break;
            };
            offsets.push(at);
            used = used.max((at + t.src.len()).next_multiple_of(ALIGN));
        }
        let end = start + offsets.len();
        out.push(Batch {
            transfers: &pieces[start..end],
            offsets,
            copies,
        });
        start = end;
    }
    out
}

/// Where `t` goes in a staging buffer whose first `used` bytes are taken and whose copies so
/// far are `copies`: beside the last copy's bytes where it follows them on the device (that
/// copy grown over it), else at the next free offset (where direct reads land its blocks in
/// place, if that fits) as a copy of its own. `None` where it does not fit, but for the
/// `first` of a batch (cut to [`STAGING`] bytes, it always fits at offset 0).
fn place(
    copies: &mut Vec<HostToDevice>,
    t: &Transfer<'_>,
    used: usize,
    first: bool,
) -> Option<usize> {
    let len = t.src.len();
    if let Some(last) = copies.last_mut()
        && let Some(at) = beside(last, t)
    {
        last.len = at + len - last.offset;
        return Some(at);
    }
    let placed = engine::staging_offset(used, t.file, &t.src, ALIGN);
    let at = if placed + len <= STAGING {
        placed
    } else {
        used
    };
    if !first && at + len > STAGING {
        return None;
    }
    copies.push(HostToDevice {
        offset: at,
        dst: t.dst,
        len,
    });
    Some(at)
}

/// Where `t` goes in the staging buffer to join the copy `c`: at the distance from c's start
/// its destination has from c's, where it is short, follows c's end on the device by less
/// than one slot's padding, and fits the buffer.
fn beside(c: &HostToDevice, t: &Transfer<'_>) -> Option<usize> {
    let len = t.src.len();
    let gap = t.dst.checked_sub(c.dst + c.len as u64)?;
    let at = c.offset + usize::try_from(t.dst - c.dst).ok()?;
    (len < LONG_RUN && gap < (ALIGN + 4) as u64 && at + len <= STAGING).then_some(at)
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
        let alloc = || {
            let _current = Current::push(&backend.ctx)?;
            (0..RING)
                .map(|_| Pinned::alloc(&backend.ctx, STAGING))
                .collect::<Result<_>>()
        };
        // On the GPU's NUMA node where sysfs names one: allocated (and so first touched) by
        // a thread bound to that node's CPUs.
        let buffers = match backend.node_cpus() {
            Some(cpus) => super::numa::on_cpus(&cpus, alloc)?,
            None => alloc()?,
        };
        *guard = Some(Ring { buffers });
    }
    let ring = guard
        .as_mut()
        .ok_or_else(|| Error::new(ErrorKind::Backend, "no staging ring"))?;
    let pieces: Vec<Transfer<'_>> = transfers
        .iter()
        .flat_map(|t| gather::chunks(0..t.src.len(), STAGING).map(|r| t.part(r)))
        .collect();
    let batches = batches(&pieces);
    let threads = engine::pool_for(pieces.iter().map(|t| t.file));
    let ring = RefCell::new(ring);
    // Up to three buffers are read at once while the fourth's copies run: the readers never
    // wait for the copies to be queued.
    let start = |n: usize| {
        let Some(batch) = batches.get(n) else {
            return Ok(None);
        };
        // SAFETY: the buffer stays in the ring, which outlives this function; its copies are
        // queued only in `finish(n)`, after the engine has written (or dropped) every piece,
        // and it is written again only for batch n + RING, after `read_batches` has finished
        // batch n (it runs at most RING - 1 batches at once).
        let buffer = unsafe { ring.borrow_mut().buffers[n % RING].host_unbound()? };
        Ok(Some(batch.pieces(buffer)))
    };
    let finish = |n: usize| {
        let Some(batch) = batches.get(n) else {
            return Ok(());
        };
        let mut ring = ring.borrow_mut();
        let stream = &backend.streams[n % RING % STREAMS];
        batch.copy_up(backend, &mut ring.buffers[n % RING], stream)?;
        plan.advance(batch.transfers.iter().map(|t| t.src.len() as u64).sum())?;
        // The progress callback is the caller's code: it may have changed the context.
        current.restore(&backend.ctx)
    };
    engine::read_batches(threads, RING - 1, start, finish, &|_| plan.advance(0))?;
    backend.sync_all()
}

impl<'n> Batch<'_, 'n> {
    /// The engine's pieces that fill `buffer` (the staging buffer's host memory) with this
    /// batch's transfers, each at its offset, big ones split so that every reader has work.
    fn pieces<'b>(&self, buffer: &'b mut [u8]) -> Vec<Piece<'n, &'b mut [u8]>> {
        let mut rest = buffer;
        let mut jobs = Vec::new();
        let mut at = 0usize;
        for (t, &off) in self.transfers.iter().zip(&self.offsets) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
            let (mut dst, tail) = tail.split_at_mut(t.src.len());
            rest = tail;
            at = off + t.src.len();
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
        jobs
    }

    /// Queues this batch's copies out of `buffer` (filled) on `stream`, and the event after
    /// them that the buffer's next fill waits for.
    fn copy_up(
        &self,
        backend: &CudaBackend,
        buffer: &mut Pinned,
        stream: &CudaStream,
    ) -> Result<()> {
        for c in &self.copies {
            let src: *const c_void = buffer.device_source(c.offset);
            // SAFETY: the source is `len` bytes of the pinned buffer, which is not written
            // again before this copy completes (`host_unbound` waits for the event recorded
            // below); the destination is inside a device allocation that the load's stream
            // guard keeps alive until every stream is synchronized (a grown copy ends at its
            // last transfer's end, inside the same allocation).
            unsafe { sys::cuMemcpyHtoDAsync_v2(c.dst, src, c.len, stream.cu_stream()) }
                .result()
                .map_err(|e| driver_err(backend.ordinal, "copying to the device", e))?;
        }
        buffer.copied_on(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::file::HostFile;
    use crate::read::gather::{Gather, Span};

    /// Neighbouring short transfers become one copy staged at the same distances as their
    /// destinations; a gap that could hold another tensor, a long transfer, a destination
    /// that goes back, or a full buffer starts a new copy.
    #[test]
    fn neighbouring_tensors_share_one_copy() {
        let json = r#"{"a":{"dtype":"U8","shape":[200000],"data_offsets":[0,200000]}}"#;
        let bytes = crate::header::test_file(json, &[7; 200_000]);
        let file = HostFile::from_bytes(&bytes).unwrap();
        let runs: Vec<Gather> = [
            (0, 100),
            (100, 100),
            (200, 10),
            (210, 100_000),
            (100_210, 50),
        ]
        .iter()
        .map(|&(at, len)| Gather::contiguous(at..at + len))
        .collect();
        let base: CUdeviceptr = 1 << 40;
        // a; b one slot after a; c past a gap holding a slot; d long; e before d.
        let dsts = [base, base + 256, base + 1024, base + 4096, base + 2048];
        let transfers: Vec<Transfer<'_>> = runs
            .iter()
            .zip(dsts)
            .map(|(g, dst)| Transfer {
                tensor: "a",
                file: &file,
                src: Span::all(g),
                dst,
            })
            .collect();
        let b = batches(&transfers);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].offsets, [0, 256, 512, 768, 100_864]);
        let copy = |offset, dst, len| HostToDevice { offset, dst, len };
        assert_eq!(
            b[0].copies,
            [
                copy(0, base, 356),
                copy(512, base + 1024, 10),
                copy(768, base + 4096, 100_000),
                copy(100_864, base + 2048, 50),
            ]
        );
        // A buffer's worth of neighbours: the next one starts a new batch.
        let g = Gather::contiguous(0..60_000);
        let many: Vec<Transfer<'_>> = (0..STAGING / 60_000 + 2)
            .map(|k| Transfer {
                tensor: "a",
                file: &file,
                src: Span::all(&g),
                dst: base + (k * 60_160) as u64,
            })
            .collect();
        let b = batches(&many);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].copies.len(), 1);
        assert_eq!(
            b[0].copies[0].len,
            (b[0].transfers.len() - 1) * 60_160 + 60_000
        );
        assert!(b[0].copies[0].len <= STAGING);
    }
}
