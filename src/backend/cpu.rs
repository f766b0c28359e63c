//! The CPU backend: the reference every other backend is tested against.
//!
//! Every tensor goes into one owned arena (huge-page backed where large; the memory an earlier
//! arena left, where one fits: see [`HostBuffer::reusable`]), each start aligned to [`ALIGN`]
//! bytes, filled by the host I/O engine on every core, so that page faults on fresh memory
//! are taken in parallel; conversions run in the same pass.
//! Only a load that asked for views ([`Loader::load_file_mapped`](crate::Loader::load_file_mapped))
//! gets zero-copy views of the mapping instead, for the tensors it does not convert.

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, ErrorKind, Result};
use crate::memory::HostBuffer;
use crate::plan::{LoadPlan, PlanItem, View};
use crate::read::PIECE;
use crate::read::engine::{self, Converted, Piece};
use crate::storage::CpuStorage;

/// Alignment of each tensor's start in an owned arena.
pub(crate) const ALIGN: usize = 64;

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuBackend;

/// Where one tensor of a load ends up.
#[derive(Debug, Clone)]
enum Placement {
    /// A view of this range of its file's mapping.
    View(Arc<Mmap>, Range<usize>),
    /// At this offset of the arena.
    Arena(usize),
}

impl CpuBackend {
    /// A human description, such as `cpu (16 threads)`.
    pub(crate) fn description(&self) -> String {
        format!("cpu ({} threads)", crate::parallel::cores())
    }

    /// Places every tensor of the plan in one arena (or as views of the mapping, where the
    /// plan allows), returning their storages in the plan's order.
    pub(crate) fn place(&self, plan: &LoadPlan<'_>) -> Result<Vec<CpuStorage>> {
        // A view needs a mapping and the tensor's bytes, unconverted, in one run.
        let view_of = |item: &PlanItem<'_>| {
            let map = item
                .file
                .mapping()
                .filter(|_| plan.view() == View::Mapped)?;
            let range = item
                .input
                .as_range()
                .filter(|_| item.conversion.is_none())?;
            Some((map.clone(), range))
        };
        let mut placements = Vec::with_capacity(plan.items().len());
        let mut total = 0usize;
        for item in plan.items() {
            if let Some((map, range)) = view_of(item) {
                placements.push(Placement::View(map, range));
                continue;
            }
            // A long tensor read directly whose file offset is 64-aligned goes where its
            // blocks land in place (the arena is page-aligned when that large).
            let at = match item.conversion {
                None => engine::staging_offset(total, item.file, &item.span(), ALIGN),
                Some(_) => total,
            };
            placements.push(Placement::Arena(at));
            total = at
                .checked_add(item.out_len)
                .and_then(|t| t.checked_next_multiple_of(ALIGN))
                .ok_or_else(|| {
                    plan.err(Error::new(
                        ErrorKind::SizeOverflow,
                        "the tensors' total size in host memory",
                    ))
                })?;
        }
        let mut arena =
            HostBuffer::reusable(total, plan.arena_capacity()).map_err(|e| plan.err(e))?;
        fill(plan, &placements, arena.as_mut_bytes())?;
        let arena = Arc::new(arena);
        let storages = plan
            .items()
            .iter()
            .zip(&placements)
            .map(|(item, placement)| match placement {
                Placement::Arena(at) => CpuStorage::owned(arena.clone(), *at..*at + item.out_len),
                Placement::View(map, range) => CpuStorage::mapped(map.clone(), range.clone()),
            })
            .collect();
        Ok(storages)
    }
}

/// Fills the arena with every item placed in it, through the host I/O engine.
fn fill(plan: &LoadPlan<'_>, placements: &[Placement], arena: &mut [u8]) -> Result<()> {
    let mut copies = Vec::new();
    let mut conversions = Vec::new();
    let mut rest = arena;
    let mut at = 0usize;
    for (item, placement) in plan.items().iter().zip(placements) {
        let Placement::Arena(offset) = *placement else {
            continue;
        };
        // Offsets increase in plan order: skip the padding before this item.
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(offset - at);
        let (dst, tail) = tail.split_at_mut(item.out_len);
        rest = tail;
        at = offset + item.out_len;
        split(item, dst, &mut copies, &mut conversions);
    }
    let advance = |n| plan.advance(n);
    plan.advance(0)?;
    engine::read_pieces(copies, &advance)?;
    engine::read_pieces(conversions, &advance)
}

/// Cuts one item into pieces of at most [`PIECE`] input bytes, with their destinations.
fn split<'n, 'd>(
    item: &'n PlanItem<'n>,
    mut dst: &'d mut [u8],
    copies: &mut Vec<Piece<'n, &'d mut [u8]>>,
    conversions: &mut Vec<Piece<'n, Converted<'d>>>,
) {
    for src in item.span().chunks(PIECE) {
        let out_len = match item.conversion {
            Some(c) => c.output_len(src.len()).unwrap_or(0),
            None => src.len(),
        };
        let take = out_len.min(dst.len());
        let (d, tail) = std::mem::take(&mut dst).split_at_mut(take);
        dst = tail;
        match item.conversion {
            Some(conversion) => conversions.push(Piece {
                tensor: item.name,
                file: item.file,
                src,
                dst: Converted { conversion, dst: d },
            }),
            None => copies.push(Piece {
                tensor: item.name,
                file: item.file,
                src,
                dst: d,
            }),
        }
    }
}
