//! [`LoadReport`]: how a load went, which its tensors carry afterwards.

use crate::device::Device;
use crate::plan::Upload;

/// How a load went: where the tensors are, how the file's bytes were taken, how they went
/// up to a GPU, and every fallback taken on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// The device the tensors are on (`auto` resolved).
    pub device: Device,
    /// How the file's bytes were taken.
    pub read: ReadPath,
    /// How the bytes went up to a GPU: `Register`, `Staging` or `InPlace` (`None` on the CPU).
    pub upload: Option<Upload>,
    /// Fallbacks taken, in words: direct reads refused by the file system, a registration
    /// refused by the driver, and so on.
    pub notes: Vec<String>,
}

/// How a load took the file's bytes.
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
