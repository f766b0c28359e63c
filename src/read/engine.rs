//! The host side of every load: reading pieces of a file into memory on every core.
//!
//! A backend hands the engine [`Piece`]s (a tensor's name, a range of the file, and where
//! its bytes go) and the engine reads them in parallel. From a file in the page cache (or
//! caller bytes) it copies out of memory; from a cold mapped file, or one opened for
//! positioned reads, it reads with `pread`, which several threads run at the disk's speed
//! where page faults would read one readahead at a time. A [`Destination`] that is plain
//! host memory receives the bytes directly; others (a conversion, a mapped wgpu buffer)
//! get them through [`Source::bytes`].

use std::ops::Range;

use crate::convert::Conversion;
use crate::error::{Error, ErrorKind, Result};
use crate::memory::HostBuffer;
use crate::parallel::{self, Threads};
use crate::read::ReadPath;
use crate::read::file::HostFile;
use crate::read::gather::Span;
use crate::read::{LONG_RUN, PIECE, SMALL};

/// The most bytes of the file one run of small pieces spans: one request.
const RUN_SPAN: usize = PIECE;

/// The widest gap between neighbours of one run (the bytes of pieces read by others, or of
/// tensors the load leaves out): reading it costs less than another request.
const RUN_GAP: usize = 64 << 10;

/// A piece of a load: the bytes `src` of `file` go to `dst`.
#[derive(Clone)]
pub struct Piece<'n, D> {
    /// The tensor the bytes belong to, for errors.
    pub tensor: &'n str,
    /// The file they come from.
    pub file: &'n HostFile<'n>,
    /// Which bytes.
    pub src: Span<'n>,
    /// Where they go.
    pub dst: D,
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl<'n, D: At> Piece<'n, D> {
    /// The part of this piece at `range` of its bytes.
    pub fn part(&self, range: Range<usize>) -> Piece<'n, D> {
        Piece {
            tensor: self.tensor,
            file: self.file,
            dst: self.dst.at(range.start as u64),
            src: self.src.part(range),
        }
    }
}

/// A place bytes go to from which others are found by offset (a device address, a buffer
/// and an offset in it): what lets a piece be cut in parts.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub trait At: Clone {
    /// The place `offset` bytes further on.
    fn at(&self, offset: u64) -> Self;
}

/// Where a piece's bytes go.
pub trait Destination: Send {
    /// Takes the piece's bytes from `src`.
    fn write(self, src: Source<'_>) -> Result<()>;
}

/// Plain host memory of the piece's length: read straight into.
impl Destination for &mut [u8] {
    fn write(self, src: Source<'_>) -> Result<()> {
        src.read_into(self)
    }
}

/// Host memory that receives the piece converted from one dtype to another.
pub struct Converted<'a> {
    /// The conversion.
    pub conversion: Conversion,
    /// The output, `conversion.output_len(src.len())` bytes.
    pub dst: &'a mut [u8],
}

impl Destination for Converted<'_> {
    fn write(self, src: Source<'_>) -> Result<()> {
        self.conversion.convert(src.bytes()?, self.dst);
        Ok(())
    }
}

/// The bytes of one piece, on their way: in memory already, or to be read.
pub struct Source<'a> {
    file: &'a HostFile<'a>,
    span: Span<'a>,
    read_path: ReadPath,
    /// Bytes of the file read already for a run of small pieces, with the file offset of
    /// their first.
    window: Option<(usize, &'a [u8])>,
    scratch: &'a mut Vec<u8>,
}

impl<'a> Source<'a> {
    /// Copies (or reads) the bytes into `dst`, which must have the piece's length.
    pub fn read_into(self, dst: &mut [u8]) -> Result<()> {
        let memory = self.memory();
        read_span(self.file, self.read_path, memory, &self.span, dst)
    }

    /// The bytes: borrowed from memory where they are one run there, else read (or
    /// gathered) into the thread's scratch buffer.
    pub fn bytes(self) -> Result<&'a [u8]> {
        let memory = self.memory();
        let mut segments = self.span.gather.segments(self.span.dense.clone());
        if let (Some(memory), Some((range, _)), None) = (memory, segments.next(), segments.next()) {
            return in_memory(self.file, memory, range);
        }
        self.scratch.resize(self.span.len(), 0);
        read_span(self.file, self.read_path, memory, &self.span, self.scratch)?;
        Ok(&self.scratch[..])
    }

    /// Memory that holds the piece's bytes, with the file offset of its first byte: a run's
    /// window, or the file's own bytes (mapped, or the caller's) where the load copies them.
    fn memory(&self) -> Option<(usize, &'a [u8])> {
        match self.window {
            Some(window) => Some(window),
            None => self
                .file
                .bytes()
                .filter(|_| self.read_path == ReadPath::Memory)
                .map(|bytes| (0, bytes)),
        }
    }
}

/// The bytes `range` of the file, from `memory` (bytes from file offset `base` on).
fn in_memory<'m>(
    file: &HostFile<'_>,
    (base, memory): (usize, &'m [u8]),
    range: Range<usize>,
) -> Result<&'m [u8]> {
    range
        .start
        .checked_sub(base)
        .and_then(|start| memory.get(start..start + range.len()))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("bytes {range:?} lie past the end of the file"),
            )
            .with_opt_file(file.path())
        })
}

/// Reads the bytes of `span` into `dst`, which must have its length: copied from `memory`
/// where it holds them, else read the way `read_path` says.
fn read_span(
    file: &HostFile<'_>,
    read_path: ReadPath,
    memory: Option<(usize, &[u8])>,
    span: &Span<'_>,
    dst: &mut [u8],
) -> Result<()> {
    if dst.len() != span.len() {
        return Err(Error::new(
            ErrorKind::Backend,
            format!(
                "a destination of {} bytes for {} bytes of the file",
                dst.len(),
                span.len()
            ),
        ));
    }
    for (range, at) in span.gather.segments(span.dense.clone()) {
        let len = range.len();
        match memory {
            // From memory: a copy per run (runs may be a few bytes).
            Some(memory) => dst[at..at + len].copy_from_slice(in_memory(file, memory, range)?),
            None => read(file, read_path, range.start, &mut dst[at..at + len])?,
        }
    }
    Ok(())
}

/// Reads `dst.len()` bytes at `at` of `file` the way `read_path` says.
fn read(file: &HostFile<'_>, read_path: ReadPath, at: usize, dst: &mut [u8]) -> Result<()> {
    match read_path {
        // A file's own path is never `Views` (that is a whole load's, where nothing is read).
        ReadPath::Memory | ReadPath::Views => file.read_at(at, dst),
        ReadPath::Pread => file.pread_at(at, dst),
        ReadPath::Direct => file.read_direct(at, dst),
    }
}

/// Where a staging buffer (page-aligned) should take `src` of `file`, at or after `at` (a
/// multiple of `align`): where direct reads will fetch it, a long contiguous run whose file
/// offset is a multiple of `align` goes at the first offset congruent to its file offset
/// modulo the direct-read block, so that its whole blocks are read straight into the buffer
/// with no bounce copy (at most one block of the buffer left unused); anything else at `at`.
pub fn staging_offset(at: usize, file: &HostFile<'_>, src: &Span<'_>, align: usize) -> usize {
    let block = crate::read::direct::BLOCK;
    match src.as_range() {
        Some(r)
            if r.len() >= LONG_RUN
                && r.start % align == 0
                && file.read_path() == ReadPath::Direct =>
        {
            at.saturating_add((r.start % block + block - at % block) % block)
        }
        _ => at,
    }
}

/// The pool that reads pieces of `files`: the many-thread one where some are read from a
/// disk by the reader threads themselves, so that many requests are in flight; else one
/// thread per core (copies from memory, and reads that a disk's queue makes: the threads
/// copy while it reads, and more of them than cores would only take the cores it needs).
pub fn pool_for<'f>(files: impl IntoIterator<Item = &'f HostFile<'f>>) -> Threads {
    let own_reads = |f: &HostFile<'_>| f.read_path() != ReadPath::Memory && !f.is_queued();
    match files.into_iter().any(own_reads) {
        true => Threads::Io,
        false => Threads::PerCore,
    }
}

/// Reads every piece into its destination, calling `advance` with each piece's length once
/// it is done (and with 0 before it starts): an error from `advance` (an interrupted load)
/// stops the reading. Errors name the file and the tensor. Pieces may come from many files,
/// read at once.
///
/// How is each file's [`read_path`](HostFile::read_path): copies from memory run on one thread per
/// core, reads from a disk on the reader pool's many threads.
pub fn read_pieces<D: Destination>(
    pieces: Vec<Piece<'_, D>>,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    if pieces.is_empty() {
        return Ok(());
    }
    let bytes: usize = pieces.iter().map(|p| p.src.len()).sum();
    let threads = match pool_for(pieces.iter().map(|p| p.file)) {
        // Less than a piece's worth of copying: a hand-off to other threads costs more.
        Threads::PerCore if bytes <= PIECE => Threads::Caller,
        threads => threads,
    };
    parallel::for_each(jobs(pieces), threads, |job, scratch| {
        read_job(job, scratch, advance)
    })
}

/// Reads batches of pieces in order, up to `ahead` batches at once on the reader pool, so
/// that the disk (or the cores) never wait for the caller between batches: `start(k)` (on
/// the calling thread, in order) gives batch k's pieces once their destinations may be
/// written, or `None` when there are no more; `finish(k)` (on the calling thread, in order)
/// runs once batch k's bytes are all in (to queue its device copies, say) while later batches
/// are being read. `threads`: the pool, [`pool_for`] the files read. Errors as
/// [`read_pieces`]'s; the first stops the rest, and nothing is being written when this
/// returns.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn read_batches<'d, D: Destination + 'd>(
    threads: Threads,
    ahead: usize,
    mut start: impl FnMut(usize) -> Result<Option<Vec<Piece<'d, D>>>>,
    finish: impl FnMut(usize) -> Result<()>,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    let start = |k| Ok(start(k)?.map(jobs));
    parallel::batches(threads, ahead, start, finish, &|job, scratch| {
        read_job(job, scratch, advance)
    })
}

/// What one thread of the pool takes at a time.
enum Job<'n, D> {
    /// One piece.
    One(Piece<'n, D>),
    /// Small pieces of one file in file order, read from the disk with one request over
    /// `span` (their bytes and the gaps between them), then handed out from memory.
    Run {
        span: Range<usize>,
        pieces: Vec<Piece<'n, D>>,
    },
}

/// The pieces (in file order, as every backend gives them) as jobs: each small piece read
/// from a disk joins the run of its neighbour before it where the run stays within
/// [`RUN_SPAN`] bytes of the file with gaps of at most [`RUN_GAP`]; any other piece is a job
/// of its own.
fn jobs<D>(pieces: Vec<Piece<'_, D>>) -> Vec<Job<'_, D>> {
    let mut jobs: Vec<Job<'_, D>> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let small = piece
            .src
            .as_range()
            .filter(|r| r.len() < SMALL && read_path_of(&piece) != ReadPath::Memory);
        let Some(range) = small else {
            jobs.push(Job::One(piece));
            continue;
        };
        if let Some(Job::Run { span, pieces }) = jobs.last_mut() {
            let joins = std::ptr::eq(pieces[0].file, piece.file)
                && range.start >= span.end
                && range.start - span.end <= RUN_GAP
                && range.end - span.start <= RUN_SPAN;
            if joins {
                span.end = range.end;
                pieces.push(piece);
                continue;
            }
        }
        jobs.push(Job::Run {
            span: range,
            pieces: vec![piece],
        });
    }
    // A run of one piece reads it straight into its destination.
    jobs.into_iter()
        .map(|job| match job {
            Job::Run { mut pieces, .. } if pieces.len() == 1 => Job::One(pieces.remove(0)),
            job => job,
        })
        .collect()
}

thread_local! {
    /// This thread's buffer for the runs it reads (page-aligned, so that a run's whole
    /// blocks are read straight into it), kept for the thread's life.
    static RUN_BUFFER: std::cell::RefCell<Option<HostBuffer>> =
        const { std::cell::RefCell::new(None) };
}

/// Reads one job: its piece, or its run with one request and then each piece from memory.
fn read_job<D: Destination>(
    job: Job<'_, D>,
    scratch: &mut Vec<u8>,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    let (span, pieces) = match job {
        Job::One(piece) => return read_piece(piece, scratch, advance),
        Job::Run { span, pieces } => (span, pieces),
    };
    let first = &pieces[0];
    let (file, read_path) = (first.file, read_path_of(first));
    let named = |e: Error, tensor: &str| e.with_tensor(tensor).with_opt_file(file.path());
    RUN_BUFFER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let buffer = match &mut *cell {
            Some(b) => b,
            empty => {
                let len = RUN_SPAN + 2 * crate::read::direct::BLOCK;
                empty.insert(HostBuffer::page_aligned(len).map_err(|e| named(e, first.tensor))?)
            }
        };
        // Placed congruent to the file offset, so that direct reads land in place.
        let lead = span.start % crate::read::direct::BLOCK;
        let window = &mut buffer.as_mut_bytes()[lead..lead + span.len()];
        advance(0)?;
        read(file, read_path, span.start, window).map_err(|e| named(e, first.tensor))?;
        let window = Some((span.start, &*window));
        for piece in pieces {
            advance(0)?;
            let n = piece.src.len() as u64;
            let source = Source {
                file,
                span: piece.src,
                read_path,
                window,
                scratch: &mut *scratch,
            };
            piece
                .dst
                .write(source)
                .map_err(|e| named(e, piece.tensor))?;
            advance(n)?;
        }
        Ok(())
    })
}

/// How a piece's bytes are taken: its file's way, except that the long runs of a mapped
/// file the load takes a small part of are read with `pread` (see `HostFile::mark_partial`),
/// and the small pieces of a mapped file read lazily are copied out of the mapping (see
/// `HostFile::set_lazy`).
fn read_path_of<D>(piece: &Piece<'_, D>) -> ReadPath {
    let file = piece.file;
    match file.read_path() {
        ReadPath::Memory if file.is_partial() && piece.src.gather.width() >= LONG_RUN => {
            ReadPath::Pread
        }
        ReadPath::Pread | ReadPath::Direct
            if file.is_lazy() && file.mapping().is_some() && piece.src.len() < SMALL =>
        {
            ReadPath::Memory
        }
        read_path => read_path,
    }
}

/// Reads one piece into its destination: `advance(0)` before (an interrupted load stops
/// here), `advance(len)` after; errors name the file and the tensor.
fn read_piece<D: Destination>(
    piece: Piece<'_, D>,
    scratch: &mut Vec<u8>,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    advance(0)?;
    let n = piece.src.len() as u64;
    let file = piece.file;
    let source = Source {
        file,
        read_path: read_path_of(&piece),
        span: piece.src,
        window: None,
        scratch,
    };
    piece
        .dst
        .write(source)
        .map_err(|e| e.with_tensor(piece.tensor).with_opt_file(file.path()))?;
    advance(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::file::ReadMode;
    use crate::read::gather::Gather;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A file of `n` tensors of `len` bytes each (pseudo-random), its path and its bytes.
    fn small_tensors(dir: &std::path::Path, n: usize, len: usize) -> (PathBuf, Vec<u8>) {
        let mut json = String::from("{");
        for i in 0..n {
            let (b, e) = (i * len, (i + 1) * len);
            json +=
                &format!(r#""t{i}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{b},{e}]}},"#);
        }
        json.pop();
        json.push('}');
        let data: Vec<u8> = (0..n * len).map(|i| (i * 7 + i / 251) as u8).collect();
        let bytes = crate::header::test_file(&json, &data);
        let path = dir.join("small.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    #[test]
    fn small_pieces_read_from_a_disk_are_read_in_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (n, len) = (3000, 4000);
        let (path, bytes) = small_tensors(dir.path(), n, len);
        for mode in [ReadMode::Pread, ReadMode::Direct, ReadMode::Mmap] {
            let file = HostFile::open(&path, mode).unwrap();
            let start = file.header().data_start();
            let gathers: Vec<Gather> = (0..n)
                .map(|i| Gather::contiguous(start + i * len..start + (i + 1) * len))
                .collect();
            // Every other tensor: gaps of one tensor between neighbours.
            let mut out = vec![0u8; n.div_ceil(2) * len];
            let pieces: Vec<_> = gathers
                .iter()
                .step_by(2)
                .zip(out.chunks_mut(len))
                .enumerate()
                .map(|(i, (g, dst))| Piece {
                    tensor: if i == 0 { "first" } else { "other" },
                    file: &file,
                    src: Span::all(g),
                    dst,
                })
                .collect();
            let jobs = jobs(pieces);
            let runs: Vec<&Range<usize>> = jobs
                .iter()
                .filter_map(|j| match j {
                    Job::Run { span, pieces } => {
                        assert!(pieces.len() > 1);
                        Some(span)
                    }
                    Job::One(_) => None,
                })
                .collect();
            if mode == ReadMode::Mmap {
                // Copies from the page cache: nothing to gather.
                assert!(runs.is_empty(), "{mode:?}");
            } else {
                // 12 MB of the file in runs of at most RUN_SPAN bytes: a few requests, not
                // one per tensor.
                let want = (n * len).div_ceil(RUN_SPAN);
                assert!(jobs.len() <= want + 1, "{mode:?}: {} jobs", jobs.len());
                assert!(runs.iter().all(|r| r.len() <= RUN_SPAN));
            }
            let advance = |_| Ok(());
            parallel::for_each(jobs, Threads::Io, |job, scratch| {
                read_job(job, scratch, &advance)
            })
            .unwrap();
            for (k, got) in out.chunks(len).enumerate() {
                let at = start + 2 * k * len;
                assert_eq!(got, &bytes[at..at + len], "{mode:?}: tensor {}", 2 * k);
            }
        }
    }

    #[test]
    fn a_run_that_fails_names_its_first_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = small_tensors(dir.path(), 100, 4000);
        let file = HostFile::open(&path, ReadMode::Pread).unwrap();
        let start = file.header().data_start();
        // The file shrinks under the load: the run's one request comes up short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(start as u64 + 1000)
            .unwrap();
        let gathers: Vec<Gather> = (0..100)
            .map(|i| Gather::contiguous(start + i * 4000..start + (i + 1) * 4000))
            .collect();
        let mut out = vec![0u8; 100 * 4000];
        let pieces: Vec<_> = gathers
            .iter()
            .zip(out.chunks_mut(4000))
            .enumerate()
            .map(|(i, (g, dst))| Piece {
                tensor: if i == 0 { "t0" } else { "later" },
                file: &file,
                src: Span::all(g),
                dst,
            })
            .collect();
        let e = read_pieces(pieces, &|_| Ok(())).unwrap_err();
        assert_eq!((e.kind(), e.tensor()), (ErrorKind::Io, Some("t0")), "{e}");
    }

    #[test]
    fn every_source_fills_plain_and_converted_destinations() {
        let values = [1.5f32, -2.0, 3.25];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let json = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#;
        let bytes = crate::header::test_file(json, &data);
        let start = 8 + json.len();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let files = [
            HostFile::from_bytes(&bytes).unwrap(),
            HostFile::open(&path, ReadMode::Mmap).unwrap(),
            HostFile::open(&path, ReadMode::Pread).unwrap(),
            HostFile::open(&path, ReadMode::Direct).unwrap(),
        ];
        for file in &files {
            let mut plain = [0u8; 12];
            let mut halves = [0u8; 6];
            let done = AtomicU64::new(0);
            let advance = |n| {
                done.fetch_add(n, Ordering::Relaxed);
                Ok(())
            };
            let (first, second) = plain.split_at_mut(5);
            let all = Gather::contiguous(start..start + 12);
            let pieces = vec![
                Piece {
                    tensor: "a",
                    file,
                    src: Span::all(&all).part(0..5),
                    dst: first,
                },
                Piece {
                    tensor: "a",
                    file,
                    src: Span::all(&all).part(5..12),
                    dst: second,
                },
            ];
            read_pieces(pieces, &advance).unwrap();
            assert_eq!(plain[..], data[..]);
            let convert = vec![Piece {
                tensor: "a",
                file,
                src: Span::all(&all),
                dst: Converted {
                    conversion: Conversion::between(crate::Dtype::F32, crate::Dtype::F16).unwrap(),
                    dst: &mut halves,
                },
            }];
            read_pieces(convert, &advance).unwrap();
            let want: Vec<u8> = values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            assert_eq!(halves[..], want[..]);
            assert_eq!(done.load(Ordering::Relaxed), 24);
            // A gather: elements 0 and 2.
            let every_other = Gather::strided(start, 4, &[(2, 8)]);
            let mut odd = [0u8; 8];
            let gathered = vec![Piece {
                tensor: "a",
                file,
                src: Span::all(&every_other),
                dst: &mut odd[..],
            }];
            read_pieces(gathered, &advance).unwrap();
            assert_eq!(odd[..4], data[..4]);
            assert_eq!(odd[4..], data[8..12]);
            // A piece past the end is an error naming the tensor, not a panic.
            let mut past = [0u8; 4];
            let beyond = Gather::contiguous(bytes.len() - 2..bytes.len() + 2);
            let bad = vec![Piece {
                tensor: "a",
                file,
                src: Span::all(&beyond),
                dst: &mut past[..],
            }];
            let e = read_pieces(bad, &advance).unwrap_err();
            assert_eq!((e.kind(), e.tensor()), (ErrorKind::Io, Some("a")));
        }
    }
}
