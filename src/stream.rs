//! [`Stream`]: a checkpoint's tensors one at a time, in file order (shard after shard), read
//! ahead on the I/O engine while the caller consumes them, in bounded memory.
//!
//! The tensors are cut into batches of at most a third of the bound (a larger tensor alone),
//! each read by a [`Reader`] in one pass on a thread of the stream's own. At most three batches
//! are loaded at once: the one being read, one read and waiting, and the one the caller is
//! taking tensors from. So no more than the bound (or the largest tensor, where that is more)
//! is loaded and not yet handed out, whatever the checkpoint's size, provided the caller drops
//! the tensors it has taken (a batch's memory goes with its last tensor).

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use crate::backend::cpu::ALIGN;
use crate::error::{Error, ErrorKind, Result};
use crate::reader::Reader;
use crate::tensor::Tensor;

/// The batches read ahead and waiting, beside the one being read and the one in hand.
const WAITING: usize = 1;

/// One batch, read: its tensors in file order, or why it could not be read.
type Batch = Result<Vec<(String, Tensor)>>;

/// Tensors in file order, read ahead in bounded memory: see
/// [`Loader::stream`](crate::Loader::stream). An iterator of `(name, tensor)`; the first
/// error ends it. Dropping it stops the reading (after the batch being read).
pub struct Stream {
    batches: Option<Receiver<Batch>>,
    current: std::vec::IntoIter<(String, Tensor)>,
    worker: Option<JoinHandle<()>>,
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
        let (batches, largest) = batches(&reader, names, (max_bytes / (WAITING + 2)).max(1))?;
        // Every batch's arena the size of the largest: a batch's memory, freed with its last
        // tensor, serves a later batch.
        reader.set_arena_capacity(largest);
        let (send, receive) = mpsc::sync_channel(WAITING);
        let worker = std::thread::Builder::new()
            .name("tensorplace-stream".into())
            .spawn(move || read_ahead(&reader, batches, &send))
            .map_err(|e| Error::io("starting the stream's reader thread", None, e))?;
        Ok(Stream {
            batches: Some(receive),
            current: Vec::new().into_iter(),
            worker: Some(worker),
        })
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

/// The stream's thread: each batch read in one pass and sent, until the caller stops
/// listening or a read fails (the error is sent, and the stream ends there).
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
            match self.batches.as_ref()?.recv() {
                Ok(Ok(batch)) => self.current = batch.into_iter(),
                Ok(Err(e)) => {
                    self.batches = None;
                    return Some(Err(e));
                }
                Err(_) => {
                    self.batches = None;
                    return None;
                }
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // The thread's next send fails once the receiver is gone: it stops after its batch.
        self.batches = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
