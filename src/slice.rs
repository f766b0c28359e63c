//! Parts of tensors: a [`Slice`] with the index rules of safetensors' `get_slice`, the
//! tensor-parallel part of a split, and the file bytes ([`Gather`]) either one reads.
//!
//! A part that is not contiguous in the file is read as runs (one per row of the part, rows
//! that follow each other merged), never as the whole tensor.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};
use crate::header::TensorInfo;
use crate::read::gather::Gather;

/// One index of a [`Slice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SliceIndex {
    /// `start:stop`, either end open (`None`): keeps the dimension. Bounds are not
    /// negative; `stop` may not pass the dimension's size, nor `start` pass `stop`.
    Range(Option<usize>, Option<usize>),
    /// A single index, negative counting from the end: drops the dimension.
    At(i64),
    /// `...`: as many whole dimensions as the other indices leave (at most one per slice).
    Ellipsis,
}

/// A slice of a tensor, as safetensors' `get_slice(name)[...]` takes it: per-dimension
/// ranges with open ends, single indices that drop their dimension, and one ellipsis.
/// Dimensions left out at the end are whole. Steps are not supported.
///
/// Parsed from the text of a Python index: `"[0:128, :]"`, `"[..., -1]"`, `"2, 1:"`.
///
/// ```
/// use tensorplace::{Slice, SliceIndex};
/// let s: Slice = "[0:128, ..., 3]".parse()?;
/// assert_eq!(
///     s.indices(),
///     [SliceIndex::Range(Some(0), Some(128)), SliceIndex::Ellipsis, SliceIndex::At(3)]
/// );
/// # Ok::<(), tensorplace::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Slice(Vec<SliceIndex>);

impl Slice {
    /// A slice of these indices.
    pub fn new(indices: impl Into<Vec<SliceIndex>>) -> Slice {
        Slice(indices.into())
    }

    /// Its indices.
    pub fn indices(&self) -> &[SliceIndex] {
        &self.0
    }

    /// The per-dimension ranges it selects from `shape`, and which dimensions it keeps.
    fn ranges(&self, shape: &[usize]) -> Result<Vec<(Range<usize>, bool)>> {
        let invalid = |msg: String| {
            Error::new(
                ErrorKind::InvalidSlice,
                format!("{self} of shape {shape:?}: {msg}"),
            )
        };
        let ellipses = self
            .0
            .iter()
            .filter(|i| **i == SliceIndex::Ellipsis)
            .count();
        if ellipses > 1 {
            return Err(invalid("more than one ellipsis".into()));
        }
        let given = self.0.len() - ellipses;
        if given > shape.len() {
            return Err(invalid(format!(
                "{given} indices for {} dimensions",
                shape.len()
            )));
        }
        let mut out = Vec::with_capacity(shape.len());
        for index in &self.0 {
            let dim = out.len();
            match *index {
                SliceIndex::Ellipsis => {
                    for _ in 0..shape.len() - given {
                        let n = shape[out.len()];
                        out.push((0..n, true));
                    }
                }
                SliceIndex::At(i) => {
                    let n = shape[dim];
                    let at = if i < 0 {
                        n.checked_sub(i.unsigned_abs() as usize)
                    } else {
                        usize::try_from(i).ok().filter(|&i| i < n)
                    };
                    let at = at.ok_or_else(|| {
                        invalid(format!(
                            "index {i} out of range for dimension {dim} of size {n}"
                        ))
                    })?;
                    out.push((at..at + 1, false));
                }
                SliceIndex::Range(start, stop) => {
                    let n = shape[dim];
                    let (a, b) = (start.unwrap_or(0), stop.unwrap_or(n));
                    if b > n || a > b || (a >= n && n > 0) {
                        return Err(invalid(format!(
                            "range {a}:{b} out of range for dimension {dim} of size {n}"
                        )));
                    }
                    out.push((a..b, true));
                }
            }
        }
        while out.len() < shape.len() {
            out.push((0..shape[out.len()], true));
        }
        Ok(out)
    }
}

impl fmt::Display for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (k, index) in self.0.iter().enumerate() {
            if k > 0 {
                f.write_str(", ")?;
            }
            match index {
                SliceIndex::Range(a, b) => {
                    if let Some(a) = a {
                        write!(f, "{a}")?;
                    }
                    f.write_str(":")?;
                    if let Some(b) = b {
                        write!(f, "{b}")?;
                    }
                }
                SliceIndex::At(i) => write!(f, "{i}")?,
                SliceIndex::Ellipsis => f.write_str("...")?,
            }
        }
        f.write_str("]")
    }
}

impl FromStr for Slice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Slice> {
        let invalid = |msg: &str| Error::new(ErrorKind::InvalidSlice, format!("{s:?}: {msg}"));
        let body = s.trim();
        let body = match body.strip_prefix('[') {
            Some(rest) => rest
                .strip_suffix(']')
                .ok_or_else(|| invalid("a '[' without its ']'"))?,
            None => body,
        };
        if body.trim().is_empty() {
            return Ok(Slice::default());
        }
        let bound = |t: &str| -> Result<Option<usize>> {
            let t = t.trim();
            if t.is_empty() {
                return Ok(None);
            }
            t.parse::<usize>().map(Some).map_err(|_| {
                invalid(&format!(
                    "{t:?} is not a range bound (a number of 0 or more)"
                ))
            })
        };
        let indices = body
            .split(',')
            .map(|part| {
                let part = part.trim();
                if part == "..." {
                    return Ok(SliceIndex::Ellipsis);
                }
                let pieces: Vec<&str> = part.split(':').collect();
                match pieces.as_slice() {
                    [one] => one
                        .parse::<i64>()
                        .map(SliceIndex::At)
                        .map_err(|_| invalid(&format!("{one:?} is not an index"))),
                    [a, b] => Ok(SliceIndex::Range(bound(a)?, bound(b)?)),
                    _ => Err(invalid("steps are not supported")),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Slice(indices))
    }
}

/// What a load takes of one tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Selection<'s> {
    /// All of it.
    Whole,
    /// A slice.
    Slice(&'s Slice),
    /// Part `rank` of `world` along `dim`, as `numpy.array_split` cuts.
    Part {
        dim: usize,
        rank: usize,
        world: usize,
    },
}

/// The range of part `rank` of `world` of `n` items, as `numpy.array_split` cuts them: the
/// first `n % world` parts have one more.
pub(crate) fn part_range(n: usize, rank: usize, world: usize) -> Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

impl Selection<'_> {
    /// The shape of the selected part and the file bytes it reads, for a tensor whose bytes
    /// lie at `data` of its file.
    pub fn resolve(&self, info: &TensorInfo, data: Range<usize>) -> Result<(Vec<usize>, Gather)> {
        let shape = &info.shape;
        let ranges: Vec<(Range<usize>, bool)> = match *self {
            Selection::Whole => return Ok((shape.clone(), Gather::contiguous(data))),
            Selection::Slice(slice) => slice.ranges(shape)?,
            Selection::Part { dim, rank, world } => {
                if world == 0 || rank >= world {
                    return Err(Error::new(
                        ErrorKind::InvalidSlice,
                        format!("part {rank} of {world}: the rank must be below the world size"),
                    ));
                }
                if dim >= shape.len() {
                    return Err(Error::new(
                        ErrorKind::InvalidSlice,
                        format!("a split along dimension {dim} of a tensor of shape {shape:?}"),
                    ));
                }
                shape
                    .iter()
                    .enumerate()
                    .map(|(d, &n)| match d == dim {
                        true => (part_range(n, rank, world), true),
                        false => (0..n, true),
                    })
                    .collect()
            }
        };
        let out_shape = ranges
            .iter()
            .filter(|(_, keep)| *keep)
            .map(|(r, _)| r.len())
            .collect();
        Ok((out_shape, gather(info, data, &ranges)?))
    }
}

/// The file bytes of the part `ranges` of a tensor whose bytes lie at `data`.
fn gather(
    info: &TensorInfo,
    data: Range<usize>,
    ranges: &[(Range<usize>, bool)],
) -> Result<Gather> {
    let shape = &info.shape;
    // Strides in bits (packed dtypes have elements smaller than a byte). They cannot
    // overflow: the header check bounds the tensor's bits.
    let bits = info.dtype.bits();
    let mut strides = vec![bits; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    if ranges.iter().any(|(r, _)| r.is_empty()) {
        return Ok(Gather::contiguous(data.start..data.start));
    }
    // The innermost dimension not taken whole: the runs are its range times its stride.
    let Some(k) = (0..shape.len())
        .rev()
        .find(|&d| ranges[d].0 != (0..shape[d]))
    else {
        return Ok(Gather::contiguous(data));
    };
    let to_bytes = |b: usize| {
        (b % 8 == 0).then_some(b / 8).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidSlice,
                format!("the part cuts inside a byte of {} elements", info.dtype),
            )
        })
    };
    let start_bits: usize = (0..=k).map(|d| ranges[d].0.start * strides[d]).sum();
    let width = to_bytes(ranges[k].0.len() * strides[k])?;
    let outer = (0..k)
        .map(|d| Ok((ranges[d].0.len(), to_bytes(strides[d])?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Gather::strided(
        data.start + to_bytes(start_bits)?,
        width,
        &outer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;

    #[test]
    fn slices_parse_and_print() {
        let s: Slice = "[0:128, :, ..., -1]".parse().unwrap();
        assert_eq!(
            s.indices(),
            [
                SliceIndex::Range(Some(0), Some(128)),
                SliceIndex::Range(None, None),
                SliceIndex::Ellipsis,
                SliceIndex::At(-1)
            ]
        );
        assert_eq!(s.to_string(), "[0:128, :, ..., -1]");
        assert_eq!("2".parse::<Slice>().unwrap().indices(), [SliceIndex::At(2)]);
        for bad in ["[::2]", "[1:2:1]", "[a]", "[-1:]", "[0:3"] {
            let e = bad.parse::<Slice>().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidSlice, "{bad}");
        }
    }

    #[test]
    fn parts_cut_like_array_split() {
        // numpy.array_split(range(10), 4) sizes: 3, 3, 2, 2.
        let parts: Vec<_> = (0..4).map(|r| part_range(10, r, 4)).collect();
        assert_eq!(parts, [0..3, 3..6, 6..8, 8..10]);
        assert_eq!(part_range(2, 3, 4), 2..2);
    }

    fn info(dtype: Dtype, shape: &[usize]) -> TensorInfo {
        let n: usize = shape.iter().product();
        TensorInfo {
            dtype,
            shape: shape.to_vec(),
            data_offsets: (0, n * dtype.bits() / 8),
        }
    }

    #[test]
    fn gathers_are_runs_of_the_part() {
        let t = info(Dtype::F32, &[4, 6, 5]);
        let data = 100..100 + 480;
        let resolve = |s: &str| {
            let slice: Slice = s.parse().unwrap();
            Selection::Slice(&slice).resolve(&t, data.clone())
        };
        // Leading rows: one run.
        let (shape, g) = resolve("[1:3]").unwrap();
        assert_eq!((shape, g.as_range()), (vec![2, 6, 5], Some(220..460)));
        // Columns of the last dimension: 24 runs of 8 bytes, merged into one dimension.
        let (shape, g) = resolve("[:, :, 1:3]").unwrap();
        assert_eq!(shape, vec![4, 6, 2]);
        assert_eq!(g.len(), 4 * 6 * 2 * 4);
        let segs: Vec<_> = g.segments(0..g.len()).collect();
        assert_eq!(segs.len(), 24);
        assert_eq!(segs[1], (124..132, 8));
        // A dropped dimension and an ellipsis.
        let (shape, g) = resolve("[..., 2]").unwrap();
        assert_eq!((shape, g.len()), (vec![4, 6], 96));
        let e = resolve("[4]").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSlice);
        assert!(resolve("[0:5]").is_err());
        assert!(resolve("[1, 2, 3, 4]").is_err());
        assert!(resolve("[..., ...]").is_err());
        assert_eq!(resolve("[2:2]").unwrap().0, vec![0, 6, 5]);
        // Packed dtypes: a cut inside a byte is an error.
        let f4 = info(Dtype::F4, &[4, 3]);
        let slice: Slice = "[:, 1:2]".parse().unwrap();
        let e = Selection::Slice(&slice).resolve(&f4, 0..6).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSlice);
    }
}
