//! Which bytes of a file a load takes for one tensor: [`Gather`] (one run, or the runs of a
//! slice or a tensor-parallel part), walked run by run ([`Segments`]), and [`Span`] (a part
//! of a gather, as the engine and the backends cut it).

use std::ops::Range;

/// Splits `range` into consecutive ranges of at most `max` bytes (an empty range gives none).
pub fn chunks(range: Range<usize>, max: usize) -> impl Iterator<Item = Range<usize>> {
    let max = max.max(1);
    let end = range.end;
    range
        .step_by(max)
        .map(move |s| s..s.saturating_add(max).min(end))
}

/// Where a tensor's input bytes lie in its file: `width` bytes at `start`, or, for a part of
/// a tensor that is not contiguous in the file, runs of `width` bytes repeated over `outer`
/// dimensions (`(count, stride)` pairs, the last varying fastest), concatenated in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gather {
    start: usize,
    width: usize,
    outer: Vec<(usize, usize)>,
}

impl Gather {
    /// The bytes of `range`, in one run.
    pub fn contiguous(range: Range<usize>) -> Gather {
        Gather {
            start: range.start,
            width: range.len(),
            outer: Vec::new(),
        }
    }

    /// Runs of `width` bytes from `start`, repeated over `outer` (`(count, stride)`, the
    /// last varying fastest). Counts of 1 are dropped and dimensions whose runs follow each
    /// other merged, so that a part contiguous in the file is one run.
    pub fn strided(start: usize, width: usize, outer: &[(usize, usize)]) -> Gather {
        if width == 0 || outer.iter().any(|&(count, _)| count == 0) {
            return Gather::contiguous(start..start);
        }
        let mut width = width;
        let mut dims: Vec<(usize, usize)> = Vec::new();
        for &(count, stride) in outer.iter().rev() {
            if count == 1 {
                continue;
            }
            match dims.first_mut() {
                // Runs of this dimension follow each other: one longer run.
                None if stride == width => width *= count,
                // Steps that tile the next dimension's: one dimension of more steps.
                Some((inner_count, inner_stride)) if stride == *inner_count * *inner_stride => {
                    *inner_count *= count;
                }
                _ => dims.insert(0, (count, stride)),
            }
        }
        Gather {
            start,
            width,
            outer: dims,
        }
    }

    /// The number of bytes gathered.
    pub fn len(&self) -> usize {
        self.outer
            .iter()
            .map(|&(count, _)| count)
            .product::<usize>()
            * self.width
    }

    /// Whether no byte is gathered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The length of each run.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The file range from the first byte gathered to the last (empty where none is).
    pub fn bounds(&self) -> Range<usize> {
        if self.is_empty() {
            return self.start..self.start;
        }
        // Strides are positive: the last run starts furthest into the file.
        let runs = self
            .outer
            .iter()
            .map(|&(count, _)| count)
            .product::<usize>();
        let last = self.run_start_outer(&self.outer, runs - 1);
        self.start..last + self.width
    }

    /// The file range, when the bytes are one run.
    pub fn as_range(&self) -> Option<Range<usize>> {
        self.outer
            .is_empty()
            .then(|| self.start..self.start + self.width)
    }

    /// The file offset of run `k` of the runs over `outer` (the last varying fastest).
    fn run_start_outer(&self, outer: &[(usize, usize)], mut k: usize) -> usize {
        let mut at = self.start;
        for &(count, stride) in outer.iter().rev() {
            at += (k % count) * stride;
            k /= count;
        }
        at
    }

    /// The pieces of `dense` (a range of the gathered bytes, in order) as file ranges, each
    /// with its offset in `dense`.
    pub fn segments(&self, dense: Range<usize>) -> Segments<'_> {
        let width = self.width.max(1);
        let first = dense.start / width;
        // The odometer's digits for run `first` (the last dimension varying fastest).
        let mut digits = vec![0; self.outer.len()];
        let mut k = first;
        for (d, &(count, _)) in self.outer.iter().enumerate().rev() {
            digits[d] = k % count;
            k /= count;
        }
        Segments {
            gather: self,
            run_start: self.run_start_outer(&self.outer, first),
            digits,
            k: first,
            dense,
        }
    }
}

/// The file ranges of part of a [`Gather`], run after run: an odometer over the outer
/// dimensions, so that each step costs an addition.
pub struct Segments<'g> {
    gather: &'g Gather,
    digits: Vec<usize>,
    run_start: usize,
    k: usize,
    dense: Range<usize>,
}

impl Iterator for Segments<'_> {
    type Item = (Range<usize>, usize);

    fn next(&mut self) -> Option<Self::Item> {
        let width = self.gather.width;
        let (lo, hi) = (self.k * width, (self.k + 1) * width);
        if self.dense.is_empty() || lo >= self.dense.end {
            return None;
        }
        let (lo, hi) = (lo.max(self.dense.start), hi.min(self.dense.end));
        let at = self.run_start + (lo - self.k * width);
        let item = (at..at + (hi - lo), lo - self.dense.start);
        self.k += 1;
        for (d, &(count, stride)) in self.gather.outer.iter().enumerate().rev() {
            self.digits[d] += 1;
            self.run_start += stride;
            if self.digits[d] < count {
                break;
            }
            self.digits[d] = 0;
            self.run_start -= count * stride;
        }
        Some(item)
    }
}

/// Input bytes of a piece: the range `dense` of a gather's bytes.
#[derive(Debug, Clone)]
pub struct Span<'g> {
    /// The tensor's gather.
    pub gather: &'g Gather,
    /// The bytes of it, in gathered order.
    pub dense: Range<usize>,
}

impl<'g> Span<'g> {
    /// All of `gather`.
    pub fn all(gather: &'g Gather) -> Span<'g> {
        Span {
            gather,
            dense: 0..gather.len(),
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.dense.len()
    }

    /// Whether it has no bytes.
    #[cfg_attr(not(feature = "unstable-internals"), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.dense.is_empty()
    }

    /// The part of it at `range` (relative to its start).
    pub fn part(&self, range: Range<usize>) -> Span<'g> {
        Span {
            gather: self.gather,
            dense: self.dense.start + range.start..self.dense.start + range.end,
        }
    }

    /// The file range of its bytes, when they are one run there.
    pub fn as_range(&self) -> Option<Range<usize>> {
        let mut segments = self.gather.segments(self.dense.clone());
        match (segments.next(), segments.next()) {
            (Some((range, _)), None) => Some(range),
            _ => None,
        }
    }

    /// Consecutive parts of at most `max` bytes.
    pub fn chunks(&self, max: usize) -> impl Iterator<Item = Span<'g>> + '_ {
        chunks(0..self.len(), max).map(|r| self.part(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_merge_runs_that_follow_each_other() {
        // Rows of 8 bytes, 4 of them at a stride of 8: one run of 32.
        assert_eq!(Gather::strided(10, 8, &[(4, 8)]).as_range(), Some(10..42));
        // 3 blocks of 2 rows: rows 8 apart, blocks 16 apart: one dimension of 6 rows.
        let g = Gather::strided(0, 4, &[(3, 16), (2, 8)]);
        assert_eq!(g.outer, [(6, 8)]);
        let runs: Vec<_> = g.segments(0..g.len()).map(|(r, _)| r.start).collect();
        assert_eq!(runs, [0, 8, 16, 24, 32, 40]);
        // A cut inside runs.
        let parts: Vec<_> = g.segments(2..9).collect();
        assert_eq!(parts, [(2..4, 0), (8..12, 2), (16..17, 6)]);
        assert_eq!(Gather::strided(5, 4, &[(0, 8)]).len(), 0);
    }

    #[test]
    fn chunks_cover_the_range_in_order() {
        let c: Vec<_> = chunks(3..20, 5).collect();
        assert_eq!(c, [3..8, 8..13, 13..18, 18..20]);
        assert_eq!(chunks(4..4, 5).count(), 0);
        assert_eq!(chunks(0..3, 0).count(), 3);
    }
}
