//! Owned host memory for tensors: large buffers are anonymous mappings advised for
//! transparent huge pages (a fresh buffer is filled once, and its page faults, not the copy,
//! bound the fill: 2 MiB pages take 512 times fewer), small ones come from the heap. An
//! arena ([`HostBuffer::reusable`]) takes a mapping an earlier one left, where one fits
//! (see [`host_cache`](crate::host_cache)).

use std::sync::Arc;

use memmap2::{Advice, MmapMut};

use crate::error::{Error, ErrorKind, Result};
use crate::host_cache::{HostCache, Mapping};

/// Buffers at least this large are anonymous mappings with huge pages advised.
const HUGE: usize = 2 << 20;

/// Buffers at least this large are anonymous mappings: the kernel hands them out zeroed
/// page by page as they are first written, where the heap would write every zero first (an
/// aligned allocation is zeroed by hand), and gives them back when they are freed.
const MAPPED: usize = 256 << 10;

/// What a reused arena holds in debug builds before its owner writes it.
pub const POISON: u8 = 0xA5;

/// A cache line: the heap's unit, so that a heap buffer starts on a 64-byte boundary.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Line([u8; 64]);

// SAFETY: `Line` is 64 bytes with alignment 64: no padding, and every bit pattern (all zeros
// included) is a valid `[u8; 64]`.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; it is `Copy`, `repr(C)` and holds only bytes.
unsafe impl bytemuck::Pod for Line {}

/// Host memory of a fixed length, aligned to 64 bytes at least (a page for large ones):
/// zeroed, or for an arena ([`reusable`](Self::reusable)) holding what it held before.
#[derive(Debug)]
pub struct HostBuffer {
    memory: Memory,
    /// Where the mapping goes when the buffer is dropped (a reusable buffer's), rather than
    /// being unmapped.
    cache: Option<Arc<HostCache>>,
}

/// Where a [`HostBuffer`]'s bytes are.
#[derive(Debug)]
enum Memory {
    /// From the heap, in cache lines.
    Heap { lines: Vec<Line>, len: usize },
    /// The first `len` bytes of an anonymous private mapping's buffer.
    Mapped { mapping: Mapping, len: usize },
}

impl HostBuffer {
    /// A zeroed buffer of `len` bytes, or an [`ErrorKind::OutOfMemory`] error.
    pub fn zeroed(len: usize) -> Result<HostBuffer> {
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
        Ok(HostBuffer {
            memory: Memory::Heap { lines, len },
            cache: None,
        })
    }

    /// A zeroed anonymous mapping of `len` bytes (at least one page), page-aligned whatever
    /// its size (as direct reads need), with huge pages advised. One of at least [`HUGE`]
    /// bytes starts on a huge-page boundary, so that all of it may be huge pages: a direct
    /// read into huge pages reaches the disk in requests of megabytes, where small pages cut
    /// it at the few hundred pages a request may list (README's performance section has the
    /// figures).
    pub fn page_aligned(len: usize) -> Result<HostBuffer> {
        HostBuffer::mapped(len, len)
    }

    /// [`page_aligned`](Self::page_aligned), its mapping room for `capacity` bytes (at least
    /// `len`): the pages past `len` cost address space until written.
    fn mapped(len: usize, capacity: usize) -> Result<HostBuffer> {
        let oom = |why: String| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("cannot map {capacity} bytes of host memory{why}"),
            )
        };
        // Room to start on a huge-page boundary wherever the kernel puts the mapping; the
        // pages past the buffer are never touched, so they cost address space only.
        let map_len = match capacity {
            0..HUGE => capacity.max(1),
            _ => capacity
                .checked_next_multiple_of(HUGE)
                .and_then(|l| l.checked_add(HUGE))
                .ok_or_else(|| oom(String::new()))?,
        };
        let map = MmapMut::map_anon(map_len).map_err(|e| oom(format!(": {e}")).with_source(e))?;
        // Where the kernel does not allow huge pages (THP off, or not Linux), the buffer
        // works with small pages: the advice is only advice.
        let _ = map.advise(Advice::HugePage);
        let start = match capacity {
            0..HUGE => 0,
            _ => (map.as_ptr() as usize).next_multiple_of(HUGE) - map.as_ptr() as usize,
        };
        Ok(HostBuffer {
            memory: Memory::Mapped {
                mapping: Mapping { map, start },
                len,
            },
            cache: None,
        })
    }

    /// Memory for an arena of `len` bytes, which its owner writes before reading any of it:
    /// laid out as [`page_aligned`](Self::page_aligned) (or [`zeroed`](Self::zeroed) for a
    /// `capacity` under a huge page). Of at least a huge page, it goes to the process's
    /// [`HostCache`] when dropped, and comes from it where a mapping kept there holds
    /// `capacity` bytes (and not twice as many): then without a page to fault in, holding an
    /// earlier buffer's bytes ([`POISON`] in debug builds, so that tests catch a byte read
    /// before it is written). Callers whose arenas vary in size ask one `capacity` for all of
    /// them (it counts where it is more than `len`), so that each fits in what another freed.
    pub fn reusable(len: usize, capacity: usize) -> Result<HostBuffer> {
        HostBuffer::reusable_in(HostCache::global(), len, capacity)
    }

    /// [`reusable`](Self::reusable) with `cache`.
    pub(crate) fn reusable_in(
        cache: &Arc<HostCache>,
        len: usize,
        capacity: usize,
    ) -> Result<HostBuffer> {
        let capacity = capacity.max(len);
        if capacity < HUGE {
            return HostBuffer::zeroed(len);
        }
        let mut buffer = match cache.take(capacity) {
            Some(mapping) => {
                let mut buffer = HostBuffer {
                    memory: Memory::Mapped { mapping, len },
                    cache: None,
                };
                if cfg!(debug_assertions) {
                    buffer.as_mut_bytes().fill(POISON);
                }
                buffer
            }
            None => HostBuffer::mapped(len, capacity)?,
        };
        buffer.cache = Some(Arc::clone(cache));
        Ok(buffer)
    }

    /// A buffer holding a copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> Result<HostBuffer> {
        let mut b = HostBuffer::zeroed(bytes.len())?;
        b.as_mut_bytes().copy_from_slice(bytes);
        Ok(b)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.memory {
            Memory::Heap { lines, len } => &bytemuck::cast_slice(lines)[..*len],
            Memory::Mapped { mapping, len } => &mapping.map[mapping.start..mapping.start + *len],
        }
    }

    /// The bytes, writable.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        match &mut self.memory {
            Memory::Heap { lines, len } => &mut bytemuck::cast_slice_mut(lines)[..*len],
            Memory::Mapped { mapping, len } => {
                &mut mapping.map[mapping.start..mapping.start + *len]
            }
        }
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether there are no bytes.
    #[cfg_attr(not(feature = "unstable-internals"), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        let Some(cache) = self.cache.take() else {
            return;
        };
        let empty = Memory::Heap {
            lines: Vec::new(),
            len: 0,
        };
        if let Memory::Mapped { mapping, .. } = std::mem::replace(&mut self.memory, empty) {
            cache.put(mapping);
        }
    }
}

/// The size of a [`Block`]: one huge page.
pub const BLOCK: usize = HUGE;

/// Reads at most this large are carved from shared [`Block`]s (at least 32 per block).
pub const BLOCK_PIECE: usize = BLOCK / 32;

/// One huge page of host memory that many small tensors read one at a time share, each its
/// own range of it, written once ([`Carved`]) and then only read. Without it each small read
/// has memory of its own, whose first touch costs a page fault (about as long as the copy of
/// a few KB itself); a block costs one fault for all of its tensors. Freed when the last of
/// them is.
#[derive(Debug)]
pub struct Block {
    /// Owns the memory; never borrowed as a whole once the block is made (writers and readers
    /// each touch their own range, through `base`).
    _memory: HostBuffer,
    base: *mut u8,
    len: usize,
}

// SAFETY: the block's memory is owned (an anonymous mapping), and every access goes through
// `Carved` (one writer per range, while no one reads it) or `Block::bytes` (ranges written
// and sealed: read only), so sharing it between threads races on no byte.
unsafe impl Send for Block {}
// SAFETY: as above.
unsafe impl Sync for Block {}

impl Block {
    /// The bytes `range` of the block.
    ///
    /// # Safety
    ///
    /// `range` must lie inside the block and be one a [`Carved`] was given and has finished
    /// writing (sealed): nothing writes those bytes any more.
    pub unsafe fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        debug_assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: inside the block (the caller's contract), written once and now only read.
        unsafe { std::slice::from_raw_parts(self.base.add(range.start), range.len()) }
    }
}

/// Hands out ranges of shared [`Block`]s to small reads, 64-byte aligned, a new block when the
/// current one is full (the full one lives on while its tensors do).
#[derive(Debug, Default)]
pub struct Carver {
    /// The block being carved and the bytes of it given out.
    current: std::sync::Mutex<Option<(std::sync::Arc<Block>, usize)>>,
}

impl Carver {
    /// A range of `len` bytes (at most [`BLOCK_PIECE`]) of a shared block, for the caller alone
    /// to write.
    pub fn carve(&self, len: usize) -> Result<Carved> {
        debug_assert!(len <= BLOCK_PIECE);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let fits = |used: usize| used.checked_add(len).is_some_and(|end| end <= BLOCK);
        let (block, used) = match current.as_mut() {
            Some((block, used)) if fits(*used) => (block, used),
            _ => {
                let mut memory = HostBuffer::page_aligned(BLOCK)?;
                let base = memory.as_mut_bytes().as_mut_ptr();
                let block = Block {
                    _memory: memory,
                    base,
                    len: BLOCK,
                };
                let (block, used) = current.insert((std::sync::Arc::new(block), 0));
                (&mut *block, used)
            }
        };
        let start = *used;
        *used = (start + len).next_multiple_of(64).min(BLOCK);
        Ok(Carved {
            block: std::sync::Arc::clone(block),
            range: start..start + len,
        })
    }
}

/// A range of a [`Block`] that its holder alone may write; [`seal`](Self::seal) ends the
/// writing and shares it.
#[derive(Debug)]
pub struct Carved {
    block: std::sync::Arc<Block>,
    range: std::ops::Range<usize>,
}

impl Carved {
    /// The range's bytes (zeroed at first), writable.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: the carver gave this range to this `Carved` alone (ranges never overlap,
        // and it is not `Clone`), inside the block; nobody reads it before it is sealed.
        unsafe {
            std::slice::from_raw_parts_mut(self.block.base.add(self.range.start), self.range.len())
        }
    }

    /// The block and the range, written: from now on only read.
    pub fn seal(self) -> (std::sync::Arc<Block>, std::ops::Range<usize>) {
        (self.block, self.range)
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
            assert_eq!(matches!(b.memory, Memory::Mapped { .. }), len >= MAPPED);
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

    #[test]
    fn carved_ranges_are_aligned_disjoint_and_keep_their_block() {
        let carver = Carver::default();
        let mut sealed = Vec::new();
        for (k, len) in [0, 1, 100, 4000, BLOCK_PIECE, 64, BLOCK_PIECE]
            .into_iter()
            .cycle()
            .take(200)
            .enumerate()
        {
            let mut c = carver.carve(len).unwrap();
            c.as_mut_bytes().fill(k as u8);
            sealed.push((k as u8, c.seal()));
        }
        let blocks: std::collections::HashSet<usize> = sealed
            .iter()
            .map(|(_, (b, _))| std::sync::Arc::as_ptr(b) as usize)
            .collect();
        assert!(blocks.len() > 1, "the carver moved on to new blocks");
        for (k, (block, range)) in &sealed {
            assert_eq!(range.start % 64, 0);
            // SAFETY: each range was carved once and sealed.
            let bytes = unsafe { block.bytes(range.clone()) };
            assert!(
                bytes.iter().all(|b| b == k),
                "range {range:?} was overwritten"
            );
        }
    }
}
