//! The host side of every load, importing downward only: [`direct`] (`O_DIRECT` reads,
//! through [`disk`]'s queue where the disk is rotational), [`file`] (`HostFile`: a file
//! mapped, read with `pread` or directly, or caller bytes; its header; warm or cold),
//! [`gather`] (which bytes of a file a tensor or a slice takes) and [`engine`] (pieces of
//! many files read into their destinations on every core). [`ReadPath`] names how a file's
//! bytes are taken.

pub mod direct;
pub mod disk;
pub mod engine;
pub mod file;
pub mod gather;

/// Input bytes per unit of work: big enough to amortize a thread's start, small enough that
/// every thread has work. A multiple of every element size and of 4 KiB.
pub const PIECE: usize = 4 << 20;

/// Runs at least this long of a file a load takes a small part of are read with `pread`
/// rather than copied out of the mapping (see `HostFile::mark_partial`).
pub const LONG_RUN: usize = 64 << 10;

/// Pieces shorter than this that are read from a disk (directly or with `pread`) are read
/// together with their neighbours in the file: one request for a run of them, so that a file
/// of many small tensors (norms, biases, scales) costs a few large requests, not one each.
pub const SMALL: usize = 256 << 10;

/// How a file's bytes are taken: what each opened file decides once (never `Views`), and
/// what a load's [`LoadReport`](crate::LoadReport) tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReadPath {
    /// Nothing was copied: CPU tensors view the mapping.
    Views,
    /// Copies from memory: the page cache through the mapping, or the caller's bytes.
    Memory,
    /// Positioned reads (`pread`) on many threads.
    Pread,
    /// Direct reads (`O_DIRECT`) on many threads, past the page cache.
    Direct,
}

impl std::fmt::Display for ReadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadPath::Views => "zero-copy views of the mapping, nothing copied",
            ReadPath::Memory => "copies from memory (the page cache or the caller's bytes)",
            ReadPath::Pread => "positioned reads (pread)",
            ReadPath::Direct => "direct reads (O_DIRECT)",
        })
    }
}
