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
use crate::host::{Fetch, HostFile};
use crate::parallel::{self, Threads};

/// Input bytes per unit of work: big enough to amortize a thread's start, small enough that
/// every thread has work. A multiple of every element size and of 4 KiB.
pub(crate) const PIECE: usize = 4 << 20;

/// Splits `range` into consecutive ranges of at most `max` bytes (an empty range gives none).
pub(crate) fn chunks(range: Range<usize>, max: usize) -> impl Iterator<Item = Range<usize>> {
    let max = max.max(1);
    let end = range.end;
    range
        .step_by(max)
        .map(move |s| s..s.saturating_add(max).min(end))
}

/// A piece of a load: the file's bytes at `src` go to `dst`.
pub(crate) struct Piece<'n, D> {
    /// The tensor the bytes belong to, for errors.
    pub tensor: &'n str,
    /// The bytes' range in the file.
    pub src: Range<usize>,
    /// Where they go.
    pub dst: D,
}

/// Where a piece's bytes go.
pub(crate) trait Destination: Send {
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
pub(crate) struct Converted<'a> {
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
pub(crate) struct Source<'a> {
    file: &'a HostFile<'a>,
    range: Range<usize>,
    fetch: Fetch,
    scratch: &'a mut Vec<u8>,
}

impl<'a> Source<'a> {
    /// Copies (or reads) the bytes into `dst`, which must have the piece's length.
    pub(crate) fn read_into(self, dst: &mut [u8]) -> Result<()> {
        if dst.len() != self.range.len() {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "a destination of {} bytes for {} bytes of the file",
                    dst.len(),
                    self.range.len()
                ),
            ));
        }
        read(self.file, self.fetch, self.range.start, dst)
    }

    /// The bytes: borrowed from memory, or read into the thread's scratch buffer.
    pub(crate) fn bytes(self) -> Result<&'a [u8]> {
        let memory = self.file.bytes().filter(|_| self.fetch == Fetch::Memory);
        if let Some(bytes) = memory {
            return bytes.get(self.range.clone()).ok_or_else(|| {
                Error::new(
                    ErrorKind::Io,
                    format!("bytes {:?} lie past the end of the file", self.range),
                )
                .with_opt_file(self.file.path())
            });
        }
        let Source {
            file,
            range,
            fetch,
            scratch,
        } = self;
        scratch.resize(range.len(), 0);
        read(file, fetch, range.start, scratch)?;
        Ok(&scratch[..])
    }
}

/// Reads `dst.len()` bytes at `at` of `file` the way `fetch` says.
fn read(file: &HostFile<'_>, fetch: Fetch, at: usize, dst: &mut [u8]) -> Result<()> {
    match fetch {
        Fetch::Memory => file.read_at(at, dst),
        Fetch::Pread => file.pread_at(at, dst),
        Fetch::Direct => file.read_direct(at, dst),
    }
}

/// Reads every piece into its destination, calling `advance` with each piece's length once
/// it is done (and with 0 before it starts): an error from `advance` (an interrupted load)
/// stops the reading. Errors name the file and the tensor.
///
/// How is the file's [`fetch`](HostFile::fetch): copies from memory run on one thread per
/// core, reads from a disk on the reader pool's many threads.
pub(crate) fn read_pieces<D: Destination>(
    file: &HostFile<'_>,
    pieces: Vec<Piece<'_, D>>,
    advance: &(dyn Fn(u64) -> Result<()> + Sync),
) -> Result<()> {
    if pieces.is_empty() {
        return Ok(());
    }
    let fetch = file.fetch();
    let bytes: usize = pieces.iter().map(|p| p.src.len()).sum();
    let threads = match fetch {
        // Less than a piece's worth of copying: a hand-off to other threads costs more.
        Fetch::Memory if bytes <= PIECE => Threads::Caller,
        Fetch::Memory => Threads::PerCore,
        Fetch::Pread | Fetch::Direct => Threads::Io,
    };
    parallel::for_each(pieces, threads, |piece, scratch| {
        advance(0)?;
        let n = piece.src.len() as u64;
        let source = Source {
            file,
            range: piece.src,
            fetch,
            scratch,
        };
        piece
            .dst
            .write(source)
            .map_err(|e| e.with_tensor(piece.tensor).with_opt_file(file.path()))?;
        advance(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ReadMode;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn chunks_cover_the_range_in_order() {
        let c: Vec<_> = chunks(3..20, 5).collect();
        assert_eq!(c, [3..8, 8..13, 13..18, 18..20]);
        assert_eq!(chunks(4..4, 5).count(), 0);
        assert_eq!(chunks(0..3, 0).count(), 3);
    }

    #[test]
    fn every_source_fills_plain_and_converted_destinations() {
        let values = [1.5f32, -2.0, 3.25];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let json = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        let start = bytes.len();
        bytes.extend_from_slice(&data);
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
            let pieces = vec![
                Piece {
                    tensor: "a",
                    src: start..start + 5,
                    dst: first,
                },
                Piece {
                    tensor: "a",
                    src: start + 5..start + 12,
                    dst: second,
                },
            ];
            read_pieces(file, pieces, &advance).unwrap();
            assert_eq!(plain[..], data[..]);
            let convert = vec![Piece {
                tensor: "a",
                src: start..start + 12,
                dst: Converted {
                    conversion: Conversion::between(crate::Dtype::F32, crate::Dtype::F16).unwrap(),
                    dst: &mut halves,
                },
            }];
            read_pieces(file, convert, &advance).unwrap();
            let want: Vec<u8> = values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            assert_eq!(halves[..], want[..]);
            assert_eq!(done.load(Ordering::Relaxed), 24);
            // A piece past the end is an error naming the tensor, not a panic.
            let mut past = [0u8; 4];
            let bad = vec![Piece {
                tensor: "a",
                src: bytes.len() - 2..bytes.len() + 2,
                dst: &mut past[..],
            }];
            let e = read_pieces(file, bad, &advance).unwrap_err();
            assert_eq!((e.kind(), e.tensor()), (ErrorKind::Io, Some("a")));
        }
    }
}
