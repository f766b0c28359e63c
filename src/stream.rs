//! [`Stream`]: a checkpoint's tensors one at a time, in file order (shard after shard), read
//! ahead on the I/O engine while the caller consumes them, in bounded memory.
//!
//! The tensors are cut into batches of at most a third of the bound (a larger tensor alone),
//! each read by a [`Reader`] in one pass. Two threads of the stream's own read the batches in
//! turn (the first the even ones, the second the odd ones), so that the next batch's reads
//! are under way while one batch's last reads finish: one thread at a time would leave the
//! disk idle between batches. Each thread hands its batch over only when the caller asks for
//! it, so at most three batches are loaded at once: one per thread (being read, or read and
//! waiting) and the one the caller is taking tensors from. So no more than the bound (or the
//! largest tensor, where that is more) is loaded and not yet handed out, whatever the
//! checkpoint's size, provided the caller drops the tensors it has taken (a batch's memory
//! goes with its last tensor).

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use crate::backend::cpu::ALIGN;
use crate::error::{Error, ErrorKind, Result};
use crate::reader::Reader;
use crate::tensor::Tensor;

/// The threads reading batches in turn.
const LANES: usize = 2;

/// One batch, read: its tensors in file order, or why it could not be read.
type Batch = Result<Vec<(String, Tensor)>>;

/// Tensors in file order, read ahead in bounded memory: see
/// [`Loader::stream`](crate::Loader::stream). An iterator of `(name, tensor)`; the first
/// error ends it. Dropping it stops the reading (after the batches being read).
pub struct Stream {
    /// Each thread's batches: batch `k` comes from `lanes[k % LANES]`; empty once the stream
    /// has ended.
    lanes: Vec<Receiver<Batch>>,
    /// The lane of the next batch.
    next: usize,
    current: std::vec::IntoIter<(String, Tensor)>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("in_hand", &self.current.len())
            .finish()
    }
}

impl Stream {
    /// Streams the tensors `names` (in file order) of `reader`, loading at most `max_bytes`
    /// ahead of the caller.
    pub(crate) fn new(mut reader: Reader, names: Vec<String>, max_bytes: usize) -> Result<Stream> {
        let (batches, largest) = batches(&reader, names, (max_bytes / (LANES + 1)).max(1))?;
        // Every batch's arena the size of the largest: a batch's memory, freed with its last
        // tensor, serves a later batch.
        reader.set_arena_capacity(largest);
        let reader = Arc::new(reader);
        let mut stream = Stream {
            lanes: Vec::with_capacity(LANES),
            next: 0,
            current: Vec::new().into_iter(),
            workers: Vec::with_capacity(LANES),
        };
        for lane in 0..LANES {
            // A rendezvous: the thread holds its batch until the caller takes it.
            let (send, receive) = mpsc::sync_channel(0);
            let mine: Vec<Vec<String>> =
                batches.iter().skip(lane).step_by(LANES).cloned().collect();
            let reader = Arc::clone(&reader);
            let worker = std::thread::Builder::new()
                .name("tensorplace-stream".into())
                .spawn(move || read_ahead(&reader, mine, &send))
                .map_err(|e| Error::io("starting the stream's reader thread", None, e))?;
            stream.lanes.push(receive);
            stream.workers.push(worker);
        }
        Ok(stream)
    }
}

/// The names cut into batches of at most `limit` bytes as stored (a larger tensor alone),
/// and the bytes the largest batch's arena takes (its tensors as stored, each aligned as the
/// CPU backend aligns them; a stream that widens a dtype needs more, and its batches then
/// map memory of their own).
fn batches(reader: &Reader, names: Vec<String>, limit: usize) -> Result<(Vec<Vec<String>>, usize)> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut size = 0usize;
    let (mut arena, mut largest) = (0usize, 0usize);
    for name in names {
        let (dtype, shape) = reader.info(&name)?;
        let bytes = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| dtype.bytes_for(n))
            .ok_or_else(|| {
                Error::new(ErrorKind::SizeOverflow, "the tensor's size").with_tensor(&name)
            })?;
        let aligned = bytes.saturating_add(ALIGN - 1) / ALIGN * ALIGN;
        match out.last_mut() {
            Some(batch) if size + bytes <= limit => {
                batch.push(name);
                size += bytes;
                arena = arena.saturating_add(aligned);
            }
            _ => {
                out.push(vec![name]);
                size = bytes;
                arena = aligned;
            }
        }
        largest = largest.max(arena);
    }
    Ok((out, largest))
}

/// One of the stream's threads: each of its batches read in one pass and handed over, until
/// the caller stops listening or a read fails (the error is handed over, and the stream ends
/// there).
fn read_ahead(reader: &Reader, batches: Vec<Vec<String>>, send: &SyncSender<Batch>) {
    for batch in batches {
        let read = reader
            .tensors(batch.iter().map(String::as_str))
            .map(|t| t.into_iter().collect::<Vec<_>>());
        let failed = read.is_err();
        if send.send(read).is_err() || failed {
            return;
        }
    }
}

impl Iterator for Stream {
    type Item = Result<(String, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(next) = self.current.next() {
                return Some(Ok(next));
            }
            let lane = self.lanes.get(self.next)?;
            self.next = (self.next + 1) % LANES;
            match lane.recv() {
                Ok(Ok(batch)) => self.current = batch.into_iter(),
                Ok(Err(e)) => {
                    self.lanes.clear();
                    return Some(Err(e));
                }
                // That thread has no more batches: neither has the stream.
                Err(_) => {
                    self.lanes.clear();
                    return None;
                }
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A thread's next send fails once its receiver is gone: it stops after its batch.
        self.lanes.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
