//! Direct reads (`O_DIRECT`): the disk's blocks straight into this process's memory, past
//! the page cache. Requests must be aligned (offset, length and buffer) to the logical
//! block size. Where the destination's address is congruent to the file offset modulo
//! [`BLOCK`] (staging buffers place large pieces so), the whole blocks inside the range are
//! read straight into it and only its unaligned edges go through a per-thread bounce
//! buffer; any other range is read as the aligned blocks around it into the bounce buffer,
//! then copied out. Where the kernel refuses a destination for direct reads (`EFAULT` or
//! `EINVAL`: memory it cannot pin for the device's DMA, such as some drivers' pinned
//! mappings), the file's reads go through the bounce buffer from then on, and the load's
//! report says so.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;

use crate::error::{Error, ErrorKind, Result};
use crate::memory::HostBuffer;
use crate::read::PIECE;
use crate::read::disk::Queue;

/// The alignment of every direct request: a multiple of every disk's logical block size
/// in use (512 and 4096 bytes).
pub const BLOCK: usize = 4096;

/// The bounce buffer's size: a whole piece and the partial blocks on either side.
const BOUNCE: usize = PIECE + 2 * BLOCK;

thread_local! {
    /// This thread's bounce buffer (page-aligned), kept for the thread's life: reader
    /// threads live as long as the process.
    static BOUNCE_BUFFER: RefCell<Option<HostBuffer>> = const { RefCell::new(None) };
}

/// Opens `path` for direct reads, or says why the file system refuses.
pub fn open_direct(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// A file opened for direct reads, with the queue of its disk where that disk has one (see
/// [`crate::disk`]): every request then goes through the queue.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    queue: Option<&'static Queue>,
    /// Why the kernel refused a destination for reads in place, once it has: the file's
    /// reads go through the bounce buffer since.
    in_place_refused: OnceLock<String>,
}

impl DirectFile {
    /// Opens `path` for direct reads, or says why the file system refuses; `queued`: its
    /// requests go through its disk's queue where the disk has one.
    pub fn open(path: &Path, queued: bool) -> std::io::Result<DirectFile> {
        let file = open_direct(path)?;
        let queue = if queued {
            crate::read::disk::queue_for(&file)
        } else {
            None
        };
        Ok(DirectFile {
            file,
            queue,
            in_place_refused: OnceLock::new(),
        })
    }

    /// Why reads straight into the destination were refused by the kernel, if they were.
    pub fn in_place_refused(&self) -> Option<&str> {
        self.in_place_refused.get().map(String::as_str)
    }

    /// Whether its requests go through its disk's queue (so that the threads reading it
    /// need not be many).
    pub fn is_queued(&self) -> bool {
        self.queue.is_some()
    }

    /// One request: `buf.len()` bytes at `at`, through the queue where there is one, with
    /// `meanwhile` run while the queue reads (before the read where there is none).
    fn read_at(&self, buf: &mut [u8], at: u64, meanwhile: impl FnOnce()) -> std::io::Result<usize> {
        match self.queue {
            Some(queue) => queue.read_at_while(&self.file, buf, at, meanwhile),
            None => {
                meanwhile();
                self.file.read_at(buf, at)
            }
        }
    }
}

/// Reads `dst.len()` bytes at `offset` of `file` into `dst`: the whole blocks straight into
/// `dst` where its address allows (see the module), the rest in aligned requests of up to
/// [`BOUNCE`] bytes through the bounce buffer.
pub fn read(file: &DirectFile, offset: usize, dst: &mut [u8]) -> Result<()> {
    BOUNCE_BUFFER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let bounce = match &mut *cell {
            Some(b) => b,
            empty => empty.insert(HostBuffer::page_aligned(BOUNCE)?),
        };
        let bounce = bounce.as_mut_bytes();
        let (head, middle) = in_place_blocks(offset, dst);
        if middle == 0 || file.in_place_refused().is_some() {
            return read_via(file, offset, dst, bounce);
        }
        let (edge, rest) = dst.split_at_mut(head);
        let (blocks, tail) = rest.split_at_mut(middle);
        read_via(file, offset, edge, bounce)?;
        let done = read_blocks(file, offset + head, blocks)?;
        // What the kernel refused to read in place goes through the bounce buffer.
        read_via(file, offset + head + done, &mut blocks[done..], bounce)?;
        read_via(file, offset + head + middle, tail, bounce)
    })
}

/// Writes a zero to a byte of every 4 KiB of `dst`, whose bytes are about to be replaced:
/// memory never written yet is faulted in (and zeroed by the kernel) now, by this thread.
fn touch(dst: &mut [u8]) {
    let last = dst.len().checked_sub(1);
    for at in (0..dst.len()).step_by(4096).chain(last) {
        // SAFETY: `at < dst.len()`: a byte of `dst`, valid and ours to write; volatile so that
        // the write, which the coming copy overwrites, is not left out.
        unsafe { std::ptr::write_volatile(dst.as_mut_ptr().add(at), 0) };
    }
}

/// Where a read of `dst.len()` bytes at `offset` into `dst` can take whole blocks straight
/// into `dst`: `(head, middle)`, the bytes before the first whole block and the bytes of
/// whole blocks after them; `middle` is 0 where `dst`'s address is not congruent to
/// `offset` modulo [`BLOCK`] or the range holds no whole block.
fn in_place_blocks(offset: usize, dst: &[u8]) -> (usize, usize) {
    let head = offset.next_multiple_of(BLOCK) - offset;
    let congruent = (dst.as_ptr() as usize).wrapping_add(head) % BLOCK == 0;
    match dst.len().checked_sub(head) {
        Some(rest) if congruent => (head, rest / BLOCK * BLOCK),
        _ => (0, 0),
    }
}

/// Whether an error of a direct read into memory that is not ours (the bounce buffer is)
/// means the kernel refuses that memory or its alignment for direct reads, rather than a
/// failing disk.
fn refuses_destination(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL))
}

/// Reads `dst.len()` bytes (whole blocks) at `offset` (block-aligned) into `dst` (block-
/// aligned), with no bounce buffer, in requests of at most [`BOUNCE`] bytes. Returns the
/// bytes read: all of them, or those before a request the kernel refused for its
/// destination (see [`refuses_destination`]; `file` then remembers why).
fn read_blocks(file: &DirectFile, offset: usize, dst: &mut [u8]) -> Result<usize> {
    // Fresh memory is faulted in here, before the disk writes it: the queue's thread (where
    // there is one) then spends its time reading, not zeroing pages.
    touch(dst);
    let mut done = 0usize;
    while done < dst.len() {
        let want = (dst.len() - done).min(BOUNCE / BLOCK * BLOCK);
        let at = offset + done;
        match read_in_place(file, &mut dst[done..done + want], at as u64) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if refuses_destination(&e) => {
                let _ = file.in_place_refused.set(format!(
                    "direct reads straight into the destination were refused ({e}): \
                     read through a bounce buffer"
                ));
                return Ok(done);
            }
            Err(e) => {
                return Err(Error::io(
                    &format!("reading {want} bytes at {at} directly (O_DIRECT)"),
                    None,
                    e,
                ));
            }
            // A short read of whole blocks goes on; none at all is the end of the file.
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "the file ends at byte {at}, before byte {}",
                        offset + dst.len()
                    ),
                ));
            }
            Ok(n) if n % BLOCK != 0 && done + n < dst.len() => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "the file ends at byte {}, before byte {}",
                        at + n,
                        offset + dst.len()
                    ),
                ));
            }
            Ok(n) => done += n,
        }
    }
    Ok(done)
}

/// One request of [`read_blocks`]. Tests make it fail as a kernel refusing the memory does.
fn read_in_place(file: &DirectFile, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    #[cfg(test)]
    if tests::REFUSE_IN_PLACE.get() {
        return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
    }
    file.read_at(buf, at, || ())
}

fn read_via(file: &DirectFile, offset: usize, dst: &mut [u8], bounce: &mut [u8]) -> Result<()> {
    let end = offset
        .checked_add(dst.len())
        .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "a read's end"))?;
    let mut at = offset / BLOCK * BLOCK;
    let mut done = 0usize;
    // Fresh memory is faulted in while the disk's queue reads the first request.
    let mut untouched = true;
    while done < dst.len() {
        let want = (end - at)
            .next_multiple_of(BLOCK)
            .min(bounce.len() / BLOCK * BLOCK);
        let n = loop {
            let meanwhile = || {
                if std::mem::take(&mut untouched) {
                    touch(dst);
                }
            };
            match file.read_at(&mut bounce[..want], at as u64, meanwhile) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::io(
                        &format!("reading {want} bytes at {at} directly (O_DIRECT)"),
                        None,
                        e,
                    ));
                }
                Ok(n) => break n,
            }
        };
        // Bytes [at, at + n) of the file are in the bounce buffer.
        let from = offset + done;
        let stop = (at + n).min(end);
        if stop <= from {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the file ends before byte {end} (read {n} bytes at {at})"),
            ));
        }
        dst[done..done + (stop - from)].copy_from_slice(&bounce[from - at..stop - at]);
        done += stop - from;
        at += n;
        if n % BLOCK != 0 && done < dst.len() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the file ends at byte {at}, before byte {end}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Makes this thread's reads in place fail with `EFAULT`.
        pub(super) static REFUSE_IN_PLACE: Cell<bool> = const { Cell::new(false) };
    }

    /// A file of `len` patterned bytes opened for direct reads twice, read by the reader
    /// threads and through a disk queue (with its folder and bytes), or `None`, said, where
    /// the file system refuses `O_DIRECT`.
    fn patterned(len: usize, test: &str) -> Option<(tempfile::TempDir, Vec<u8>, [DirectFile; 2])> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..len as u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let opened = |queue| {
            open_direct(&path).map(|file| DirectFile {
                file,
                queue,
                in_place_refused: OnceLock::new(),
            })
        };
        match (opened(None), opened(Some(Queue::for_tests()))) {
            (Ok(own), Ok(queued)) => Some((dir, data, [own, queued])),
            (Err(e), _) | (_, Err(e)) => {
                println!("SKIPPED {test}: this file system refuses O_DIRECT: {e}");
                None
            }
        }
    }

    #[test]
    fn unaligned_ranges_read_the_same_bytes() {
        let Some((_dir, data, files)) = patterned(3 * BLOCK + 777, "direct reads") else {
            return;
        };
        // Small bounce buffers force several requests per range.
        let mut small = HostBuffer::page_aligned(2 * BLOCK).unwrap();
        for (file, (offset, len)) in files.iter().flat_map(|f| {
            [
                (0, 1),
                (1, 4095),
                (4095, 2),
                (100, 3 * BLOCK),
                (4096, 4096),
                (5, data.len() - 5),
                (data.len() - 3, 3),
            ]
            .map(|r| (f, r))
        }) {
            let mut got = vec![0u8; len];
            read(file, offset, &mut got).unwrap();
            assert_eq!(got, &data[offset..offset + len], "{offset} {len}");
            let mut got = vec![0u8; len];
            read_via(file, offset, &mut got, small.as_mut_bytes()).unwrap();
            assert_eq!(
                got,
                &data[offset..offset + len],
                "{offset} {len} (small bounce)"
            );
        }
        for file in &files {
            let mut past = vec![0u8; 10];
            let e = read(file, data.len() - 5, &mut past).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        }
    }

    /// Destinations congruent to the file offset take whole blocks in place, at every
    /// offset and length (edges before, after, both, none), and the bytes are the file's;
    /// a file shorter than the range is an error.
    #[test]
    fn congruent_destinations_take_whole_blocks_in_place() {
        let Some((_dir, data, files)) = patterned(40 * BLOCK + 333, "direct reads in place") else {
            return;
        };
        let mut arena = HostBuffer::page_aligned(48 * BLOCK).unwrap();
        for (file, (offset, len)) in files.iter().flat_map(|f| {
            [
                (0, BLOCK),
                (0, 3 * BLOCK + 1),
                (7, 5 * BLOCK),
                (BLOCK - 1, 2 * BLOCK + 2),
                (3 * BLOCK + 100, 33 * BLOCK + 5),
                (13, BLOCK - 20),
                (100, data.len() - 100),
            ]
            .map(|r| (f, r))
        }) {
            let at = offset % BLOCK;
            let dst = &mut arena.as_mut_bytes()[at..at + len];
            dst.fill(0);
            let (head, middle) = in_place_blocks(offset, dst);
            let first_block = offset.next_multiple_of(BLOCK) - offset;
            assert_eq!(middle > 0, len >= first_block + BLOCK, "{offset} {len}");
            if middle > 0 {
                assert_eq!((head, (head + middle + offset) % BLOCK), (first_block, 0));
            }
            read(file, offset, dst).unwrap();
            assert!(dst == &data[offset..offset + len], "{offset} {len}");
            // One byte off: not congruent, read through the bounce buffer, same bytes.
            let dst = &mut arena.as_mut_bytes()[at + 1..at + 1 + len];
            assert_eq!(in_place_blocks(offset, dst).1, 0);
            read(file, offset, dst).unwrap();
            assert!(dst == &data[offset..offset + len], "{offset} {len} (moved)");
        }
        for file in &files {
            let dst = &mut arena.as_mut_bytes()[5..5 + 42 * BLOCK];
            let e = read(file, 5, dst).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        }
    }

    /// A kernel that refuses the destination of reads in place (`EFAULT`, as for memory it
    /// cannot pin) costs nothing but speed: the same bytes arrive through the bounce buffer,
    /// the file remembers why (for the load's report) and reads through it from then on.
    #[test]
    fn refused_destinations_fall_back_to_the_bounce_buffer() {
        let Some((_dir, data, files)) = patterned(40 * BLOCK + 333, "refused reads in place")
        else {
            return;
        };
        let mut arena = HostBuffer::page_aligned(48 * BLOCK).unwrap();
        REFUSE_IN_PLACE.set(true);
        for file in &files {
            for (offset, len) in [(7, 20 * BLOCK), (3 * BLOCK, 30 * BLOCK + 9)] {
                let at = offset % BLOCK;
                let dst = &mut arena.as_mut_bytes()[at..at + len];
                dst.fill(0);
                assert!(in_place_blocks(offset, dst).1 > 0);
                read(file, offset, dst).unwrap();
                assert!(dst == &data[offset..offset + len], "{offset} {len}");
                let why = file.in_place_refused().expect("the refusal is remembered");
                assert!(why.contains("bounce buffer"), "{why}");
            }
        }
        REFUSE_IN_PLACE.set(false);
    }
}
