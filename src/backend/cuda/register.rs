//! The register path: the read-only shared mapping of a file in the page cache is
//! page-locked in place (`cuMemHostRegister(READ_ONLY)`) chunk by chunk, and each chunk's
//! pieces are copied from it on one of the backend's streams, so that registering the next
//! chunk overlaps the copies of the ones before. At most [`IN_FLIGHT`] chunks are registered
//! at once: pinned memory stays bounded whatever the file's size.

use std::collections::VecDeque;
use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{CudaEvent, CudaStream};

use super::memory::blocking_event;
use super::{CudaBackend, Current, STREAMS, Transfer, driver_err};
use crate::error::Result;
use crate::plan::LoadPlan;
use crate::read::file::HostFile;
use crate::read::file::page_size;

/// Size of one registered chunk of the mapping.
const CHUNK: usize = 512 << 20;
/// Chunks registered at once (pinned memory at most `IN_FLIGHT * CHUNK`).
const IN_FLIGHT: usize = 3;

/// One registered chunk and the event after its last copy.
struct Chunk {
    ptr: *mut c_void,
    copied: CudaEvent,
}

/// The chunks registered now. Dropping it waits for every stream, then unregisters them.
struct Registered<'a> {
    backend: &'a CudaBackend,
    chunks: VecDeque<Chunk>,
}

impl Registered<'_> {
    /// Tracks the chunk registered at `ptr`, whose copies were queued on `stream`: an event
    /// recorded after them. Where the event cannot be recorded, every stream is waited for
    /// and the chunk unregistered at once.
    fn track(&mut self, ptr: *mut c_void, stream: &CudaStream) -> Result<()> {
        let backend = self.backend;
        let copied = blocking_event(&backend.ctx)
            .and_then(|e| e.record(stream).map(|()| e))
            .map_err(|e| driver_err(backend.ordinal, "recording an event", e));
        match copied {
            Ok(copied) => {
                self.chunks.push_back(Chunk { ptr, copied });
                Ok(())
            }
            Err(e) => {
                let _ = backend.sync_all();
                // SAFETY: registered by the caller; every stream is synchronized, so no copy
                // reads it any more.
                let _ = unsafe { sys::cuMemHostUnregister(ptr) }.result();
                Err(e)
            }
        }
    }

    /// Waits for the oldest chunk's copies and unregisters it.
    fn retire_oldest(&mut self) -> Result<()> {
        let Some(chunk) = self.chunks.pop_front() else {
            return Ok(());
        };
        let waited = chunk
            .copied
            .synchronize()
            .map_err(|e| driver_err(self.backend.ordinal, "waiting for a chunk's copies", e));
        if waited.is_ok() {
            // SAFETY: `ptr` was registered by `cuMemHostRegister` and is unregistered once,
            // after every copy from it has completed (its event, recorded after them, is done).
            let _ = unsafe { sys::cuMemHostUnregister(chunk.ptr) }.result();
        } else {
            // Keep it for Drop, which waits for every stream before unregistering.
            self.chunks.push_front(chunk);
        }
        waited
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let _current = self.backend.current();
        // Copies from the chunks must finish before the pages are unlocked.
        let _ = self.backend.sync_all();
        for chunk in self.chunks.drain(..) {
            // SAFETY: registered by `cuMemHostRegister`, unregistered once, after every copy
            // from it has completed (every stream synchronized above).
            let _ = unsafe { sys::cuMemHostUnregister(chunk.ptr) }.result();
        }
    }
}

/// Registers the mapping chunk by chunk and copies each chunk's pieces from it. Returns the
/// transfers it could not do (those from the first chunk whose registration the driver
/// refused onward), for the staging path.
pub(crate) fn register_and_copy<'n>(
    backend: &CudaBackend,
    current: &Current,
    plan: &LoadPlan<'_>,
    file: &HostFile<'_>,
    transfers: &[Transfer<'n>],
) -> Result<Vec<Transfer<'n>>> {
    let Some(map) = file.mapping() else {
        return Ok(transfers.to_vec());
    };
    let base = map.as_ptr() as usize;
    let page = page_size();
    let mapped_len = map.len().next_multiple_of(page);
    let by_chunk = by_chunk(transfers);
    // The whole pages of the mapping a chunk's transfers cover.
    let pages = |chunk: &[Transfer<'n>]| {
        let start = file_range(chunk.first()?).start / page * page;
        let end = chunk
            .iter()
            .map(|t| file_range(t).end)
            .max()
            .unwrap_or(start)
            .next_multiple_of(page)
            .min(mapped_len);
        Some((start, end))
    };
    let mut registered = Registered {
        backend,
        chunks: VecDeque::new(),
    };
    for (k, chunk) in by_chunk.iter().enumerate() {
        let Some((start, end)) = pages(chunk) else {
            continue;
        };
        if registered.chunks.len() >= IN_FLIGHT {
            registered.retire_oldest()?;
        }
        // Pages of the next chunk missing from the page cache are read ahead while this one
        // registers (the kernel reads them in the background): advice only, so ignored
        // where refused.
        if let Some((next, next_end)) = by_chunk.get(k + 1).and_then(|c| pages(c)) {
            let _ = map.advise_range(memmap2::Advice::WillNeed, next, next_end - next);
        }
        let ptr = (base + start) as *mut c_void;
        // SAFETY: [ptr, ptr + len) lies inside our read-only MAP_SHARED mapping (rounded to
        // whole pages, which the mapping covers), which outlives this function; READ_ONLY
        // matches its protection. It is unregistered by `registered` before returning.
        let rc = unsafe {
            sys::cuMemHostRegister_v2(ptr, end - start, sys::CU_MEMHOSTREGISTER_READ_ONLY)
        };
        if let Err(e) = rc.result() {
            // Out of lockable memory, say: stage the rest.
            plan.note(format!(
                "cuMemHostRegister refused chunk {k} ({e}): the rest went through staging"
            ));
            return Ok(by_chunk[k..].iter().flatten().cloned().collect());
        }
        let stream = &backend.streams[k % STREAMS];
        // SAFETY: every transfer of the chunk lies in the pages just registered, which
        // `registered` keeps registered (and the mapping mapped) until their event is done.
        let queued = unsafe { copy_from(backend, stream, base, chunk) };
        // Tracked even after a failed copy, so that the chunk is unregistered.
        registered.track(ptr, stream)?;
        plan.advance(queued?)?;
        // The progress callback is the caller's code: it may have changed the context.
        current.restore(&backend.ctx)?;
    }
    drop(registered);
    Ok(Vec::new())
}

/// The transfers split at chunk boundaries, by chunk (chunk k covers `[k*C, (k+1)*C)` of the
/// mapping).
fn by_chunk<'n>(transfers: &[Transfer<'n>]) -> Vec<Vec<Transfer<'n>>> {
    let mut by_chunk: Vec<Vec<Transfer<'n>>> = Vec::new();
    for t in transfers {
        let Some(range) = t.src.as_range() else {
            continue;
        };
        let mut at = range.start;
        while at < range.end {
            let k = at / CHUNK;
            let end = range.end.min((k + 1) * CHUNK);
            if by_chunk.len() <= k {
                by_chunk.resize(k + 1, Vec::new());
            }
            by_chunk[k].push(t.part(at - range.start..end - range.start));
            at = end;
        }
    }
    by_chunk
}

/// Queues the copies of `chunk` from the mapping at `base` on `stream`: the bytes queued, or
/// the first copy's error.
///
/// # Safety
/// Every transfer's bytes must lie in registered pages of the mapping at `base`, which must
/// stay registered and mapped until the copies are done (an event recorded after them).
unsafe fn copy_from(
    backend: &CudaBackend,
    stream: &CudaStream,
    base: usize,
    chunk: &[Transfer<'_>],
) -> Result<u64> {
    let mut queued = 0u64;
    for t in chunk {
        let src = (base + file_range(t).start) as *const c_void;
        // SAFETY: the source lies in registered pages that outlive the copy (the caller's
        // contract); the destination lies inside a device allocation of at least that size
        // that the load's stream guard keeps alive until every stream is synchronized.
        unsafe { sys::cuMemcpyHtoDAsync_v2(t.dst, src, t.src.len(), stream.cu_stream()) }
            .result()
            .map_err(|e| driver_err(backend.ordinal, "copying to the device", e))?;
        queued += t.src.len() as u64;
    }
    Ok(queued)
}

/// The file range of a transfer's bytes (on the register path, one run).
fn file_range(t: &Transfer<'_>) -> std::ops::Range<usize> {
    t.src.as_range().unwrap_or(0..0)
}
