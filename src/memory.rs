//! Owned host memory for tensors: large buffers are anonymous mappings advised for
//! transparent huge pages (a fresh buffer is filled once, and its page faults, not the copy,
//! bound the fill: 2 MiB pages take 512 times fewer), small ones come from the heap.

use memmap2::{Advice, MmapMut};

use crate::error::{Error, ErrorKind, Result};

/// Buffers at least this large are anonymous mappings with huge pages advised.
const HUGE: usize = 2 << 20;

/// Buffers at least this large are anonymous mappings: the kernel hands them out zeroed
/// page by page as they are first written, where the heap would write every zero first (an
/// aligned allocation is zeroed by hand), and gives them back when they are freed.
const MAPPED: usize = 256 << 10;

/// A cache line: the heap's unit, so that a heap buffer starts on a 64-byte boundary.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u8; 64]);

// SAFETY: `Line` is 64 bytes with alignment 64: no padding, and every bit pattern (all zeros
// included) is a valid `[u8; 64]`.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; it is `Copy`, `repr(C)` and holds only bytes.
unsafe impl bytemuck::Pod for Line {}

/// Zeroed host memory of a fixed length, aligned to 64 bytes at least (a page for large ones).
#[derive(Debug)]
pub(crate) enum HostBuffer {
    /// From the heap, in cache lines.
    Heap { lines: Vec<Line>, len: usize },
    /// `len` bytes at `start` of an anonymous private mapping.
    Mapped {
        map: MmapMut,
        start: usize,
        len: usize,
    },
}

impl HostBuffer {
    /// A zeroed buffer of `len` bytes, or an [`ErrorKind::OutOfMemory`] error.
    pub(crate) fn zeroed(len: usize) -> Result<HostBuffer> {
        let oom = |why: String| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("cannot allocate {len} bytes of host memory{why}"),
            )
        };
        if len >= MAPPED {
            return HostBuffer::page_aligned(len);
        }
        let lines = bytemuck::allocation::try_zeroed_vec(len.div_ceil(64))
            .map_err(|()| oom(String::new()))?;
        Ok(HostBuffer::Heap { lines, len })
    }

    /// A zeroed anonymous mapping of `len` bytes (at least one page), page-aligned whatever
    /// its size (as direct reads need), with huge pages advised. One of at least [`HUGE`]
    /// bytes starts on a huge-page boundary, so that all of it may be huge pages: a direct
    /// read into huge pages reaches the disk in requests of megabytes, where small pages cut
    /// it at the few hundred pages a request may list (a sequential `O_DIRECT` read of a
    /// cold file on this project's VM: 2.3 GB/s into huge pages, 1.0 GB/s into small ones).
    pub(crate) fn page_aligned(len: usize) -> Result<HostBuffer> {
        let oom = |why: String| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("cannot map {len} bytes of host memory{why}"),
            )
        };
        // Room to start on a huge-page boundary wherever the kernel puts the mapping; the
        // pages past the buffer are never touched, so they cost address space only.
        let map_len = match len {
            0..HUGE => len.max(1),
            _ => len
                .checked_next_multiple_of(HUGE)
                .and_then(|l| l.checked_add(HUGE))
                .ok_or_else(|| oom(String::new()))?,
        };
        let map = MmapMut::map_anon(map_len).map_err(|e| oom(format!(": {e}")).with_source(e))?;
        // Where the kernel does not allow huge pages (THP off, or not Linux), the buffer
        // works with small pages: the advice is only advice.
        let _ = map.advise(Advice::HugePage);
        let start = match len {
            0..HUGE => 0,
            _ => (map.as_ptr() as usize).next_multiple_of(HUGE) - map.as_ptr() as usize,
        };
        Ok(HostBuffer::Mapped { map, start, len })
    }

    /// A buffer holding a copy of `bytes`.
    pub(crate) fn copy_of(bytes: &[u8]) -> Result<HostBuffer> {
        let mut b = HostBuffer::zeroed(bytes.len())?;
        b.as_mut_bytes().copy_from_slice(bytes);
        Ok(b)
    }

    /// The bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            HostBuffer::Heap { lines, len } => &bytemuck::cast_slice(lines)[..*len],
            HostBuffer::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }

    /// The bytes, writable.
    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8] {
        match self {
            HostBuffer::Heap { lines, len } => &mut bytemuck::cast_slice_mut(lines)[..*len],
            HostBuffer::Mapped { map, start, len } => &mut map[*start..*start + *len],
        }
    }

    /// The number of bytes.
    pub(crate) fn len(&self) -> usize {
        self.as_bytes().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_buffers_are_zeroed_aligned_and_writable() {
        for len in [0, 1, 13, MAPPED - 1, MAPPED, HUGE - 1, HUGE, HUGE * 3 + 5] {
            let mut b = HostBuffer::zeroed(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.as_bytes().iter().all(|&x| x == 0));
            assert_eq!(b.as_bytes().as_ptr() as usize % 64, 0);
            assert_eq!(matches!(b, HostBuffer::Mapped { .. }), len >= MAPPED);
            // Large ones start on a huge-page boundary, so that huge pages can back all of it.
            if len >= HUGE {
                assert_eq!(b.as_bytes().as_ptr() as usize % HUGE, 0, "{len}");
            }
            if len > 0 {
                b.as_mut_bytes()[len - 1] = 7;
                assert_eq!(b.as_bytes()[len - 1], 7);
            }
        }
        assert_eq!(
            HostBuffer::copy_of(&[1, 2, 3]).unwrap().as_bytes(),
            [1, 2, 3]
        );
    }

    #[test]
    fn huge_pages_are_used_where_the_kernel_allows_them() {
        // Transparent huge pages: "always" or "madvise" mode lets the advice take effect.
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        let Ok(mode) = mode else {
            println!("SKIPPED huge page check: no transparent huge pages here");
            return;
        };
        let mut b = HostBuffer::zeroed(64 << 20).unwrap();
        for at in (0..b.len()).step_by(4096) {
            b.as_mut_bytes()[at] = 1;
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let huge: usize = smaps
            .lines()
            .filter_map(|l| l.strip_prefix("AnonHugePages:"))
            .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .sum();
        println!(
            "transparent huge pages: {}; AnonHugePages {huge} kB",
            mode.trim()
        );
        if mode.contains("[never]") {
            assert!(b.as_bytes().iter().step_by(4096).all(|&x| x == 1));
        } else {
            assert!(
                huge > 0,
                "no huge pages were used although THP is {}",
                mode.trim()
            );
        }
    }
}
