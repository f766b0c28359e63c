//! The host side of a load: a file (memory-mapped, read with `pread`, or a caller's bytes)
//! together with its validated [`Header`], yielding each tensor's bytes in file order.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;

use crate::error::{Error, ErrorKind, Result};
use crate::header::{Header, N_LEN, TensorInfo};
use crate::read::ReadPath;
use crate::read::direct::DirectFile;

/// How a file's bytes are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// Map the file read-only and shared (`PROT_READ`, `MAP_SHARED`). The fastest way, and
    /// the only one that allows zero-copy CPU tensors and registering the pages with CUDA.
    /// The file must not be truncated or modified while the load, or a tensor viewing the
    /// mapping, lives (see the crate's Safety section).
    #[default]
    Mmap,
    /// Read with positioned reads (`pread`), for files that may change under us or live on
    /// network storage. Nothing is mapped and every tensor is a copy, so a change to the
    /// file cannot reach the process as a signal: a file truncated during the load is an
    /// [`ErrorKind::Io`] error, and bytes rewritten during it may be old or new.
    Pread,
    /// Read with `O_DIRECT`, past the page cache: for files that are not in it, on a local
    /// disk. Large aligned requests, many in flight (or, on a disk the kernel calls
    /// rotational, one after the other in order from one thread), read at the disk's speed
    /// and leave the page cache to others. Where the file system refuses `O_DIRECT`,
    /// positioned reads instead (the load's [`LoadReport`](crate::LoadReport) says so).
    /// Nothing is mapped, and a change to the file is an error or old and new bytes, never a
    /// signal.
    Direct,
}

impl std::str::FromStr for ReadMode {
    type Err = Error;

    /// `mmap`, `pread` (or `read`), `direct`: the names of safetensors' `backend=` keyword and
    /// of the command line's flags, ignoring case.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mmap" => Ok(ReadMode::Mmap),
            "pread" | "read" => Ok(ReadMode::Pread),
            "direct" => Ok(ReadMode::Direct),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("read mode {s:?}: expected mmap, pread or direct"),
            )),
        }
    }
}

impl std::fmt::Display for ReadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadMode::Mmap => "mmap",
            ReadMode::Pread => "pread",
            ReadMode::Direct => "direct",
        })
    }
}

/// Bytes read by ranges from elsewhere than a local file (an object in object storage).
pub(crate) trait RangeSource: Send + Sync {
    /// Fills `buf` with the bytes at `offset`, or says what failed.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// What a [`HostFile`]'s bytes are read from.
enum Backing<'a> {
    // The file stays open beside its mapping, for positioned reads of cold pages.
    Mapped(Arc<Mmap>, File),
    Borrowed(&'a [u8]),
    File(File),
    /// Read by ranges (positioned reads, as a file's).
    #[cfg_attr(not(feature = "remote"), allow(dead_code))]
    Remote(Box<dyn RangeSource>),
}

/// A safetensors file ready to load: its bytes and its validated header.
pub struct HostFile<'a> {
    path: Option<PathBuf>,
    len: u64,
    header: Header,
    backing: Backing<'a>,
    mode: ReadMode,
    /// The file opened again with O_DIRECT, on first use, or why that was refused.
    direct: OnceLock<std::result::Result<DirectFile, String>>,
    read_path: OnceLock<ReadPath>,
    /// Whether a load takes only a small part of it (see `mark_partial`).
    partial: std::sync::atomic::AtomicBool,
    /// Whether it serves lazy reads of one tensor at a time (see `set_lazy`).
    lazy: bool,
    /// Whether its direct reads may go through its disk's queue (see `set_disk_queue`).
    disk_queue: bool,
}

impl std::fmt::Debug for HostFile<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backing = match self.backing {
            Backing::Mapped(..) => "mmap",
            Backing::Borrowed(_) => "bytes",
            Backing::File(_) => "pread",
            Backing::Remote(_) => "remote",
        };
        f.debug_struct("HostFile")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("len", &self.len)
            .field("backing", &backing)
            .field("tensors", &self.header.tensors().len())
            .finish()
    }
}

impl HostFile<'static> {
    /// Opens `path` and validates its header. Every error names the file.
    pub fn open(path: impl AsRef<Path>, mode: ReadMode) -> Result<Self> {
        let path = path.as_ref();
        Self::open_inner(path, mode).map_err(|e| e.with_file(path))
    }

    fn open_inner(path: &Path, mode: ReadMode) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening", None, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("reading the size", None, e))?;
        if !meta.is_file() {
            return Err(Error::new(ErrorKind::Io, "not a regular file"));
        }
        let len = meta.len();
        let path = Some(path.to_path_buf());
        if len < N_LEN as u64 {
            // Fails with HeaderTooSmall; there is nothing to map.
            Header::read_len(&[], len)?;
        }
        // The header is read with positioned reads in every mode, mapped files included: a
        // page fault on a cold mapping reads the whole readahead window around it (the disk's
        // `read_ahead_kb`, often megabytes) where a small read starts with a small window, so
        // that opening a cold file reads little more than its header.
        let mut prefix = [0u8; N_LEN];
        read_exact_at(&file, &mut prefix, 0)?;
        let n = Header::read_len(&prefix, len)?;
        // `read_len` bounds n by the file size and by MAX_HEADER_LEN.
        let mut json = vec![0u8; n];
        read_exact_at(&file, &mut json, N_LEN as u64)?;
        let header = Header::parse_json(&json, len)?;
        let backing = match mode {
            ReadMode::Mmap => {
                // SAFETY: the mapping is read-only and shared, so we never write through it and
                // no other mapping aliases it mutably within this process. memmap2's contract
                // is that the file is not modified or truncated while mapped: that is the
                // documented contract of `load_file` (the crate's Safety section), the same
                // one safetensors, candle and memmap2's users accept; `ReadMode::Pread` is the
                // way out for files that may change.
                let map = unsafe { Mmap::map(&file) }
                    .map_err(|e| Error::io("memory-mapping", None, e))?;
                // The header's ranges were checked against `len`: the mapping must hold them.
                if map.len() as u64 != len {
                    return Err(Error::new(
                        ErrorKind::Io,
                        "the file changed size while it was being opened",
                    ));
                }
                Backing::Mapped(Arc::new(map), file)
            }
            ReadMode::Pread | ReadMode::Direct => Backing::File(file),
        };
        Ok(HostFile::new(path, len, header, backing, mode))
    }
}

impl<'a> HostFile<'a> {
    /// Validates the header of a whole file held in `bytes`.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self> {
        let header = Header::parse(bytes)?;
        let len = bytes.len() as u64;
        Ok(HostFile::new(
            None,
            len,
            header,
            Backing::Borrowed(bytes),
            ReadMode::Mmap,
        ))
    }

    /// A file read by ranges from `source` (an object at the URL `name`), `len` bytes long,
    /// whose validated header is `header`.
    #[cfg(feature = "remote")]
    pub(crate) fn from_source(
        name: String,
        len: u64,
        header: Header,
        source: Box<dyn RangeSource>,
    ) -> HostFile<'static> {
        HostFile::new(
            Some(PathBuf::from(name)),
            len,
            header,
            Backing::Remote(source),
            ReadMode::Pread,
        )
    }

    fn new(
        path: Option<PathBuf>,
        len: u64,
        header: Header,
        backing: Backing<'a>,
        mode: ReadMode,
    ) -> Self {
        HostFile {
            path,
            len,
            header,
            backing,
            mode,
            direct: OnceLock::new(),
            read_path: OnceLock::new(),
            partial: std::sync::atomic::AtomicBool::new(false),
            lazy: false,
            disk_queue: true,
        }
    }

    /// How a load takes this file's bytes, decided on first call: from memory (caller
    /// bytes, or a mapped file mostly in the page cache); with direct reads (asked for, or
    /// a cold mapped file) where the file system allows them; else with positioned reads.
    pub(crate) fn read_path(&self) -> ReadPath {
        *self
            .read_path
            .get_or_init(|| match (&self.backing, self.mode) {
                (Backing::Borrowed(_), _) => ReadPath::Memory,
                (Backing::Mapped(..), _) if !self.is_cold() => ReadPath::Memory,
                (Backing::File(_), ReadMode::Pread) | (Backing::Remote(_), _) => ReadPath::Pread,
                _ if self.direct_file().is_ok() => ReadPath::Direct,
                _ => ReadPath::Pread,
            })
    }

    /// Marks a mapped file as one the load takes a small part of (a slice, a tensor-parallel
    /// part): the engine then reads its long runs with `pread` even where the file is in the
    /// page cache, which beats faulting the mapping's pages in for a few scattered regions
    /// (README's performance section has the figures). Returns whether it was marked (caller
    /// bytes and unmapped files are not).
    pub(crate) fn mark_partial(&self) -> bool {
        let mapped = matches!(self.backing, Backing::Mapped(..));
        if mapped {
            self.partial
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        mapped
    }

    /// Whether [`mark_partial`](Self::mark_partial) marked it.
    pub(crate) fn is_partial(&self) -> bool {
        self.partial.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Marks the file as one a [`Reader`](crate::Reader) reads a tensor at a time: the
    /// engine then copies its small pieces out of the mapping, cold or warm (the page cache
    /// and its readahead serve a loop over small tensors; a direct read each would not).
    pub(crate) fn set_lazy(&mut self) {
        self.lazy = true;
    }

    /// Whether its direct reads go through its disk's queue where the disk has one (the
    /// default: see [`crate::read::disk`]), or each reader thread makes its own requests.
    /// Takes effect before the file's first direct read.
    pub fn set_disk_queue(&mut self, queued: bool) {
        self.disk_queue = queued;
    }

    /// Whether the file serves lazy reads (see `set_lazy`).
    pub(crate) fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// How the file's bytes were taken, if a load read any through the engine.
    pub(crate) fn read_path_used(&self) -> Option<ReadPath> {
        self.read_path.get().copied()
    }

    /// Why direct reads were asked for or wanted (a cold file) and not used, or not
    /// straight into their destinations, if they were not.
    pub(crate) fn direct_refused(&self) -> Option<&str> {
        match self.direct.get() {
            Some(Err(why)) => Some(why),
            Some(Ok(file)) => file.in_place_refused(),
            None => None,
        }
    }

    /// Whether its direct reads go through its disk's queue (see [`crate::disk`]): then the
    /// threads reading it need not be many.
    pub(crate) fn is_queued(&self) -> bool {
        self.read_path() == ReadPath::Direct && self.direct_file().is_ok_and(DirectFile::is_queued)
    }

    fn direct_file(&self) -> std::result::Result<&DirectFile, &str> {
        self.direct
            .get_or_init(|| match (&self.path, &self.backing) {
                (_, Backing::Remote(_)) => {
                    Err("a remote object cannot be read directly".to_owned())
                }
                (Some(p), _) => DirectFile::open(p, self.disk_queue).map_err(|e| {
                    format!("the file system refuses O_DIRECT ({e}): positioned reads instead")
                }),
                (None, _) => Err("caller bytes cannot be read directly".to_owned()),
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// Reads `buf.len()` bytes at `offset` with direct reads, where the file was opened for
    /// them, else with a positioned read.
    pub(crate) fn read_direct(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        match self.direct_file() {
            Ok(file) => crate::read::direct::read(file, offset, buf)
                .map_err(|e| e.with_opt_file(self.path())),
            Err(_) => self.pread_at(offset, buf),
        }
    }

    /// The path, for a file opened from disk.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The file's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (never true of a valid file).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The validated header, the file closed.
    pub fn into_header(self) -> Header {
        self.header
    }

    /// The tensors in file order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = (&str, &TensorInfo)> {
        self.header.tensors().iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The mapping, when the file is memory-mapped.
    pub fn mapping(&self) -> Option<&Arc<Mmap>> {
        match &self.backing {
            Backing::Mapped(m, _) => Some(m),
            _ => None,
        }
    }

    /// The whole file, when it is in memory (mapped or borrowed).
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.backing {
            Backing::Mapped(m, _) => Some(m),
            Backing::Borrowed(b) => Some(b),
            Backing::File(_) | Backing::Remote(_) => None,
        }
    }

    /// A tensor's bytes, when the file is in memory.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Option<&[u8]> {
        self.bytes()?.get(self.header.file_range(info))
    }

    /// The file's data section (all tensors back to back), when the file is in memory.
    pub fn data(&self) -> Option<&[u8]> {
        let start = self.header.data_start();
        self.bytes()?.get(start..start + self.header.data_len())
    }

    /// The fraction of the data section's pages that are in the page cache (for a mapped
    /// file; 1 for bytes in memory, 0 for a file read with pread), from `mincore` over every
    /// page of a file of up to 4,096 pages, and over 256 runs of 16 pages spread evenly
    /// beyond: `mincore` costs a little per page, and over a whole large file it would cost a
    /// load of a small part of it more than the reading.
    pub fn resident_fraction(&self) -> f64 {
        let map = match &self.backing {
            Backing::Mapped(m, _) => m,
            Backing::Borrowed(_) => return 1.0,
            Backing::File(_) | Backing::Remote(_) => return 0.0,
        };
        let page = page_size();
        let start = self.header.data_start() / page * page;
        let end = (self.header.data_start() + self.header.data_len()).min(map.len());
        if end <= start {
            return 1.0;
        }
        let pages = (end - start).div_ceil(page);
        const SAMPLES: usize = 256;
        const RUN: usize = 16;
        let (runs, run) = if pages <= SAMPLES * RUN {
            (1, pages)
        } else {
            (SAMPLES, RUN)
        };
        let mut resident = 0usize;
        let mut v = vec![0u8; run];
        for k in 0..runs {
            // Evenly spread: the first run at the start, the last ending at the end.
            let first = if runs == 1 {
                0
            } else {
                k * (pages - run) / (runs - 1)
            };
            let p = start + first * page;
            let len = (run * page).min(end - p);
            // SAFETY: `p` is page-aligned and [p, p + len) lies inside the mapping, which
            // covers whole pages; mincore writes one byte per page of that range into `v`,
            // which holds `run` bytes, at least len / page rounded up.
            let rc = unsafe {
                libc::mincore(
                    map.as_ptr().add(p) as *mut libc::c_void,
                    len,
                    v.as_mut_ptr(),
                )
            };
            if rc != 0 {
                return 1.0;
            }
            resident += v[..len.div_ceil(page)]
                .iter()
                .filter(|&&b| b & 1 == 1)
                .count();
        }
        resident as f64 / (runs * run).min(pages) as f64
    }

    /// Whether most of the data is not in the page cache: then reads on many threads (see
    /// [`read_path`](Self::read_path)) beat faulting the mapping in.
    pub fn is_cold(&self) -> bool {
        self.resident_fraction() < 0.5
    }

    /// Whether nearly all of the file (90%) is in the page cache: then registering its
    /// mapping with CUDA faults in few pages (registration faults them one at a time).
    pub fn is_warm(&self) -> bool {
        self.resident_fraction() >= 0.9
    }

    /// Like [`read_at`](Self::read_at), but with a positioned read (`pread`) wherever a file
    /// descriptor is open, even for a mapped file: for cold pages, several of these in
    /// parallel read at the disk's speed, where page faults read one readahead at a time.
    pub fn pread_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            Backing::Mapped(_, file) | Backing::File(file) => {
                read_exact_at(file, buf, offset as u64).map_err(|e| e.with_opt_file(self.path()))
            }
            Backing::Borrowed(_) | Backing::Remote(_) => self.read_at(offset, buf),
        }
    }

    /// Copies `buf.len()` bytes at `offset` of the file into `buf`, whatever the source.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        let range: Range<usize> = offset..offset.saturating_add(buf.len());
        match &self.backing {
            Backing::Mapped(..) | Backing::Borrowed(_) => {
                let src = self
                    .bytes()
                    .and_then(|b| b.get(range.clone()))
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Io, format!("bytes {range:?} lie past the end"))
                    })?;
                buf.copy_from_slice(src);
                Ok(())
            }
            Backing::File(file) => read_exact_at(file, buf, offset as u64),
            Backing::Remote(source) => source.read_exact_at(buf, offset as u64),
        }
        .map_err(|e| e.with_opt_file(self.path()))
    }
}

/// The host's page size (4 KiB where it cannot be read).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
        .map_err(|e| Error::io(&format!("reading {} bytes at {offset}", buf.len()), None, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_modes_parse_and_print() {
        for mode in [ReadMode::Mmap, ReadMode::Pread, ReadMode::Direct] {
            assert_eq!(mode.to_string().parse::<ReadMode>().unwrap(), mode);
        }
        assert_eq!(" READ ".parse::<ReadMode>().unwrap(), ReadMode::Pread);
        let e = "fast".parse::<ReadMode>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn every_source_reads_the_same_bytes() {
        let json = r#"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#;
        let bytes = crate::header::test_file(json, &[7, 8, 9]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let mem = HostFile::from_bytes(&bytes).unwrap();
        for f in [
            HostFile::open(&path, ReadMode::Mmap).unwrap(),
            HostFile::open(&path, ReadMode::Pread).unwrap(),
        ] {
            let (_, info) = f.tensors().next().unwrap();
            let mut buf = [0u8; 3];
            f.read_at(f.header().file_range(info).start, &mut buf)
                .unwrap();
            assert_eq!(buf, [7, 8, 9]);
            assert_eq!(mem.tensor_bytes(info).unwrap(), &buf);
            let mut pread = [0u8; 3];
            f.pread_at(f.header().file_range(info).start, &mut pread)
                .unwrap();
            assert_eq!(pread, buf);
            let mut direct = [0u8; 3];
            f.read_direct(f.header().file_range(info).start, &mut direct)
                .unwrap();
            assert_eq!(direct, buf);
            let r = f.resident_fraction();
            assert!((0.0..=1.0).contains(&r));
        }
        // Just written, so in the page cache: not cold.
        assert!(!HostFile::open(&path, ReadMode::Mmap).unwrap().is_cold());
        assert!(HostFile::open(&path, ReadMode::Mmap).unwrap().is_warm());
        assert!(!mem.is_cold());
        std::fs::write(&path, [1u8, 2]).unwrap();
        let e = HostFile::open(&path, ReadMode::Pread).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::HeaderTooSmall);
        assert_eq!(e.file(), Some(path.as_path()));
    }
}
