//! Buffers mapped for writing: asking for a mapping and waiting for it, and the file's bytes
//! written into mapped ranges through the host I/O engine.

use std::sync::{Arc, OnceLock};

use super::{WgpuBackend, backend_err, pad4};
use crate::error::Result;
use crate::read::PIECE;
use crate::read::engine::{self, At, Destination, Piece, Source};
use crate::read::gather;

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

/// A place in a wgpu buffer.
#[derive(Clone, Copy)]
pub(super) struct BufferAt<'b> {
    pub buffer: &'b wgpu::Buffer,
    pub offset: u64,
}

impl At for BufferAt<'_> {
    fn at(&self, offset: u64) -> Self {
        BufferAt {
            buffer: self.buffer,
            offset: self.offset + offset,
        }
    }
}

/// One copy of a load: bytes of a file into a buffer (mapped, to be written in place, or
/// through a staging ring).
pub(super) type Transfer<'n, 'b> = Piece<'n, BufferAt<'b>>;

/// Writes file bytes into mapped buffers through the host I/O engine, in pieces of
/// [`PIECE`] bytes (8-aligned, wgpu's MAP_ALIGNMENT) spread over every core.
pub(super) fn fill(
    writes: &[Transfer<'_, '_>],
    host_memory: bool,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    engine::read_pieces(mapped_pieces(writes, host_memory), advance)
}

/// The engine's pieces of `writes`: [`PIECE`] bytes each (8-aligned, wgpu's MAP_ALIGNMENT).
pub(super) fn mapped_pieces<'n>(
    writes: &[Transfer<'n, '_>],
    host_memory: bool,
) -> Vec<Piece<'n, MappedRange>> {
    writes
        .iter()
        .flat_map(|w| {
            gather::chunks(0..w.src.len(), PIECE).map(move |r| Piece {
                tensor: w.tensor,
                file: w.file,
                dst: MappedRange {
                    buffer: w.dst.buffer.clone(),
                    offset: w.dst.offset + r.start as u64,
                    len: r.len(),
                    host_memory,
                },
                src: w.src.part(r),
            })
        })
        .collect()
}
