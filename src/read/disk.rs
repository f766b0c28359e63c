//! One stream of requests for disks that serve one stream best.
//!
//! A disk the kernel calls rotational (a hard drive, and virtual disks that say so: their host reads
//! ahead for the guest's one sequential stream) reads fastest when one request follows the
//! last in order with no gap, and slows when many threads each keep a request in flight:
//! they arrive out of order, and on a small host the many threads take the cores the copies
//! need. For such a disk a load's direct reads go through its [`Queue`]: one thread per disk,
//! for the life of the process, that issues every request to it in order while the load's
//! workers (one per core) copy what was read; more workers than cores would starve the
//! queue's thread. README's performance section has the measurements behind this. Disks that
//! take many requests at once (NVMe, SSDs) keep the many-thread reads.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Condvar, Mutex};

use crate::parallel::PerProcess;

/// A read to do: `len` bytes at `offset` of the open file `fd` into `ptr`.
struct Request {
    fd: i32,
    offset: u64,
    ptr: *mut u8,
    len: usize,
    done: SyncSender<std::io::Result<usize>>,
}

// SAFETY: `ptr` is the start of a `&mut [u8]` of `len` bytes whose borrow the submitting
// thread holds, in `Queue::read_at_while`, until `done` is answered (or dropped, the request
// undone): it waits for that before returning or unwinding; the queue's thread writes
// through it only before answering. `fd` stays
// open as long, borrowed from the submitter's `File`.
unsafe impl Send for Request {}

/// The requests of one disk, served in order by its thread.
pub struct Queue {
    pending: Mutex<Vec<Request>>,
    ready: Condvar,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    /// A queue with its thread started, for the life of the process (`None` where no
    /// thread could start).
    fn start() -> Option<&'static Queue> {
        let queue: &'static Queue = Box::leak(Box::new(Queue {
            pending: Mutex::new(Vec::new()),
            ready: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("tensorplace-disk".into())
            .spawn(move || queue.serve())
            .ok()
            .map(|_| queue)
    }

    /// A queue of its own, whatever the disk, for tests of the reads made through one.
    #[cfg(test)]
    pub fn for_tests() -> &'static Queue {
        static QUEUE: std::sync::OnceLock<&'static Queue> = std::sync::OnceLock::new();
        QUEUE.get_or_init(|| Queue::start().expect("a thread for the test queue"))
    }

    /// Reads `buf.len()` bytes at `offset` of `file` into `buf`, on the queue's thread (a
    /// `pread` there, its result here), running `meanwhile` on this thread while it waits.
    pub fn read_at_while(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
        meanwhile: impl FnOnce(),
    ) -> std::io::Result<usize> {
        let (done, answer) = sync_channel(1);
        let request = Request {
            fd: file.as_raw_fd(),
            offset,
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            done,
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request);
        self.ready.notify_one();
        /// Waits for the answer when dropped unanswered: `buf` and `file` stay borrowed
        /// until the request is done even where `meanwhile` panics.
        struct Wait(Option<Receiver<std::io::Result<usize>>>);
        impl Drop for Wait {
            fn drop(&mut self) {
                if let Some(answer) = self.0.take() {
                    let _ = answer.recv();
                }
            }
        }
        let mut wait = Wait(Some(answer));
        meanwhile();
        match wait.0.take().map(|answer| answer.recv()) {
            Some(Ok(result)) => result,
            _ => Err(std::io::Error::other("the disk queue's thread ended")),
        }
    }

    /// The queue's thread: the next request (the lowest offset of the file last read, else
    /// the oldest), one at a time, for ever.
    fn serve(&self) {
        let mut last_fd = -1;
        loop {
            let request = {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                while pending.is_empty() {
                    pending = self.ready.wait(pending).unwrap_or_else(|p| p.into_inner());
                }
                let next = pending
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.fd == last_fd)
                    .min_by_key(|(_, r)| r.offset)
                    .map_or(0, |(k, _)| k);
                pending.remove(next)
            };
            last_fd = request.fd;
            // SAFETY: see `Request`: `ptr` is valid for writes of `len` bytes and `fd` open
            // until `done` is answered, below.
            let n = unsafe {
                libc::pread(
                    request.fd,
                    request.ptr.cast(),
                    request.len,
                    request.offset as libc::off_t,
                )
            };
            let result = match n {
                n if n >= 0 => Ok(n as usize),
                _ => Err(std::io::Error::last_os_error()),
            };
            // The submitter waits for this; if it is gone, nothing is left to tell.
            let _ = request.done.send(result);
        }
    }
}

/// The queue of the disk holding `file`, where the policy gives it one (a rotational
/// disk), or `None`: its reads are then made by the reader threads themselves.
pub fn queue_for(file: &File) -> Option<&'static Queue> {
    let dev = file.metadata().ok()?.dev();
    // Per process: a forked child has none of its parent's queue threads.
    static QUEUES: PerProcess<Mutex<HashMap<u64, Option<&'static Queue>>>> = PerProcess::new();
    let mut queues = QUEUES
        .get(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    *queues
        .entry(dev)
        .or_insert_with(|| is_rotational(dev).then(Queue::start).flatten())
}

/// Whether the kernel calls the block device `dev` (or the disk holding that partition)
/// rotational; `false` where it says nothing (not Linux, no block device).
fn is_rotational(dev: u64) -> bool {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // A partition's folder has no queue of its own: its disk's is the folder above.
    [
        base.join("queue/rotational"),
        base.join("../queue/rotational"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .is_some_and(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Reads through a queue give the file's bytes, at every offset, from many threads at
    /// once; a read past the end gives what is there; a failed read is an error.
    #[test]
    fn queued_reads_give_the_files_bytes() {
        let queue = Queue::for_tests();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let (file, data) = (&file, &data);
                s.spawn(move || {
                    for k in 0..50usize {
                        let offset = (t * 7919 + k * 19_391) % data.len();
                        let mut buf = vec![0u8; 4096 + k * 31];
                        let n = queue
                            .read_at_while(file, &mut buf, offset as u64, || ())
                            .unwrap();
                        let want = (data.len() - offset).min(buf.len());
                        assert_eq!(n, want);
                        assert_eq!(buf[..n], data[offset..offset + n]);
                    }
                });
            }
        });
        let mut buf = [0u8; 8];
        assert_eq!(
            queue
                .read_at_while(&file, &mut buf, data.len() as u64, || ())
                .unwrap(),
            0
        );
        // A file opened for writing only cannot be read: the error comes back.
        let write_only = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(
            queue
                .read_at_while(&write_only, &mut buf, 0, || ())
                .is_err()
        );
        assert!(write_only.read_at(&mut buf, 0).is_err());
        // No block device is numbered 0:0: not rotational, so no queue.
        assert!(!is_rotational(libc::makedev(0, 0)));
    }
}
