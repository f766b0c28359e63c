//! Where a tensor's bytes live: [`Storage`] (one variant per backend) and [`CpuStorage`]
//! (host bytes: a range of an owned buffer, of a block shared by small reads, or of a
//! mapped file).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

use crate::device::Device;
use crate::error::Result;
use crate::memory::{Block, Carved, HostBuffer};

/// Where a tensor's bytes live.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Storage {
    /// Host memory: a view into a mapped file, or an owned aligned buffer.
    Cpu(CpuStorage),
    /// A view into a CUDA device arena.
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::CudaStorage),
    /// A wgpu buffer (or a range of one).
    #[cfg(feature = "wgpu")]
    Wgpu(crate::backend::wgpu::WgpuStorage),
}

impl Storage {
    /// The number of bytes of the tensor (not of any padding).
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
            #[cfg(feature = "wgpu")]
            Storage::Wgpu(s) => s.len(),
        }
    }

    /// Whether the storage holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the bytes are on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
            #[cfg(feature = "wgpu")]
            Storage::Wgpu(s) => Device::Wgpu(Some(s.adapter_index())),
        }
    }

    /// The bytes, copied from the device where they are not on the host already.
    pub fn host_bytes(&self) -> Result<Cow<'_, [u8]>> {
        match self {
            Storage::Cpu(s) => Ok(Cow::Borrowed(s.as_bytes())),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.to_host().map(Cow::Owned),
            #[cfg(feature = "wgpu")]
            Storage::Wgpu(s) => s.to_host().map(Cow::Owned),
        }
    }
}

#[derive(Debug, Clone)]
enum CpuBuf {
    Mapped(Arc<Mmap>),
    Owned(Arc<HostBuffer>),
    /// A sealed range of a block shared with other small tensors.
    Block(Arc<Block>),
}

/// Host bytes: a range of an owned buffer (tensors of a load start on 64-byte boundaries), or a zero-copy view into a mapped file, which stays mapped while a
/// view lives (only from [`Loader::load_file_mapped`](crate::Loader::load_file_mapped)).
#[derive(Debug, Clone)]
pub struct CpuStorage {
    buf: CpuBuf,
    range: Range<usize>,
}

impl CpuStorage {
    /// A view of `range` of a mapping. The range must lie inside it.
    pub(crate) fn mapped(map: Arc<Mmap>, range: Range<usize>) -> Self {
        debug_assert!(range.end <= map.len());
        CpuStorage {
            buf: CpuBuf::Mapped(map),
            range,
        }
    }

    /// A view of `range` (in bytes) of an owned buffer. The range must lie inside it.
    pub(crate) fn owned(buf: Arc<HostBuffer>, range: Range<usize>) -> Self {
        debug_assert!(range.end <= buf.len());
        CpuStorage {
            buf: CpuBuf::Owned(buf),
            range,
        }
    }

    /// Owned bytes of a shared block, written and sealed.
    pub(crate) fn carved(carved: Carved) -> Self {
        let (block, range) = carved.seal();
        CpuStorage {
            buf: CpuBuf::Block(block),
            range,
        }
    }

    /// A new owned copy of `bytes`.
    pub(crate) fn copy_of(bytes: &[u8]) -> Result<Self> {
        let buf = HostBuffer::copy_of(bytes)?;
        Ok(CpuStorage::owned(Arc::new(buf), 0..bytes.len()))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.buf {
            CpuBuf::Mapped(m) => m,
            CpuBuf::Owned(b) => b.as_bytes(),
            // SAFETY: the range was carved for this storage and sealed (`carved`): only read.
            CpuBuf::Block(b) => return unsafe { b.bytes(self.range.clone()) },
        };
        // Ranges are checked when the storage is made.
        all.get(self.range.clone()).unwrap_or_default()
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Whether this is a zero-copy view into a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.buf, CpuBuf::Mapped(_))
    }
}
