//! Direct reads (`O_DIRECT`): the disk's blocks straight into this process's memory, past
//! the page cache. Requests must be aligned (offset, length and buffer) to the logical
//! block size; a range of the file at any offset and length is read as the aligned blocks
//! around it into a per-thread bounce buffer, then copied out.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::io::PIECE;
use crate::memory::HostBuffer;

/// The alignment of every direct request: a multiple of every disk's logical block size
/// in use (512 and 4096 bytes).
pub(crate) const BLOCK: usize = 4096;

/// The bounce buffer's size: a whole piece and the partial blocks on either side.
const BOUNCE: usize = PIECE + 2 * BLOCK;

thread_local! {
    /// This thread's bounce buffer (page-aligned), kept for the thread's life: reader
    /// threads live as long as the process.
    static BOUNCE_BUFFER: RefCell<Option<HostBuffer>> = const { RefCell::new(None) };
}

/// Opens `path` for direct reads, or says why the file system refuses.
pub(crate) fn open(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Reads `dst.len()` bytes at `offset` of `file` (opened with [`open`]) into `dst`, in
/// aligned requests of up to [`BOUNCE`] bytes.
pub(crate) fn read(file: &File, offset: usize, dst: &mut [u8]) -> Result<()> {
    BOUNCE_BUFFER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let bounce = match &mut *cell {
            Some(b) => b,
            empty => empty.insert(HostBuffer::page_aligned(BOUNCE)?),
        };
        read_via(file, offset, dst, bounce.as_mut_bytes())
    })
}

fn read_via(file: &File, offset: usize, dst: &mut [u8], bounce: &mut [u8]) -> Result<()> {
    let end = offset
        .checked_add(dst.len())
        .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "a read's end"))?;
    let mut at = offset / BLOCK * BLOCK;
    let mut done = 0usize;
    while done < dst.len() {
        let want = (end - at)
            .next_multiple_of(BLOCK)
            .min(bounce.len() / BLOCK * BLOCK);
        let n = loop {
            match file.read_at(&mut bounce[..want], at as u64) {
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

    #[test]
    fn unaligned_ranges_read_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * BLOCK as u32 + 777)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = match open(&path) {
            Ok(f) => f,
            Err(e) => {
                println!("SKIPPED direct reads: this file system refuses O_DIRECT: {e}");
                return;
            }
        };
        // Small bounce buffers force several requests per range.
        let mut small = HostBuffer::page_aligned(2 * BLOCK).unwrap();
        for (offset, len) in [
            (0, 1),
            (1, 4095),
            (4095, 2),
            (100, 3 * BLOCK),
            (4096, 4096),
            (5, data.len() - 5),
            (data.len() - 3, 3),
        ] {
            let mut got = vec![0u8; len];
            read(&file, offset, &mut got).unwrap();
            assert_eq!(got, &data[offset..offset + len], "{offset} {len}");
            let mut got = vec![0u8; len];
            read_via(&file, offset, &mut got, small.as_mut_bytes()).unwrap();
            assert_eq!(
                got,
                &data[offset..offset + len],
                "{offset} {len} (small bounce)"
            );
        }
        let mut past = vec![0u8; 10];
        let e = read(&file, data.len() - 5, &mut past).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    }
}
