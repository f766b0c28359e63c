//! [`LoadReport`]: how a load went, which its tensors carry afterwards.

use crate::device::Device;
use crate::plan::Upload;
pub use crate::read::ReadPath;

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
