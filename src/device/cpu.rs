//! The CPU backend: the reference every other backend is tested against.
//!
//! From a mapped file, tensors are zero-copy views that keep the mapping alive. Otherwise
//! (pread, a caller's bytes, a conversion, or owned copies asked for) every tensor goes into
//! one owned arena, each start aligned to [`ALIGN`] bytes, filled by one thread per core
//! working on chunks, so that page faults on the fresh memory are taken in parallel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::device::{Backend, Device, LoadPlan, PlanItem};
use crate::dtype::Conversion;
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;
use crate::parallel;
use crate::tensor::{CpuStorage, Storage, Tensor};

/// Alignment of each tensor's start in an owned arena.
pub const ALIGN: usize = 64;

/// Input bytes per unit of work (a multiple of every element size).
const CHUNK: usize = 8 << 20;

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn describe(&self) -> String {
        format!(
            "cpu ({} threads)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )
    }

    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>> {
        let file = plan.file();
        let mapping = file.mapping().filter(|_| !plan.owned());
        // Items that can be views need no arena room.
        let is_view = |item: &PlanItem<'_>| mapping.is_some() && item.conversion.is_none();
        let mut offsets = Vec::with_capacity(plan.items().len());
        let mut total = 0usize;
        for item in plan.items() {
            if is_view(item) {
                offsets.push(usize::MAX);
                continue;
            }
            offsets.push(total);
            total = total
                .checked_add(item.out_len)
                .and_then(|t| t.checked_next_multiple_of(ALIGN))
                .ok_or_else(|| plan.err(Error::new(ErrorKind::OutOfMemory, "size overflows")))?;
        }
        let arena = if total > 0 {
            // ALIGN extra bytes, so that the arena can start on an ALIGN boundary.
            let words_len = (total + ALIGN) / 8;
            // Zeroed by the allocator (fresh pages from the kernel for large sizes): the
            // pages are first touched by the copy threads, so their faults run in parallel.
            let mut words: Vec<u64> =
                bytemuck::allocation::try_zeroed_vec(words_len).map_err(|()| {
                    plan.err(Error::new(
                        ErrorKind::OutOfMemory,
                        format!("cannot allocate {total} bytes of host memory"),
                    ))
                })?;
            let shift = words.as_ptr().cast::<u8>().align_offset(ALIGN).min(ALIGN);
            for off in offsets.iter_mut().filter(|o| **o != usize::MAX) {
                *off += shift;
            }
            fill(plan, &offsets, bytemuck::cast_slice_mut(&mut words))?;
            Some(Arc::new(words))
        } else {
            None
        };
        let tensors = plan
            .items()
            .iter()
            .zip(&offsets)
            .map(|(item, &off)| {
                let storage = match (mapping, &arena) {
                    (Some(map), _) if off == usize::MAX => {
                        CpuStorage::mapped(map.clone(), item.src.clone())
                    }
                    (_, Some(arena)) => CpuStorage::owned(arena.clone(), off..off + item.out_len),
                    // Only reached for an empty arena, so the tensor is empty.
                    _ => CpuStorage::copy_of(&[]),
                };
                Tensor::from_parts(
                    item.out_dtype,
                    item.info.shape.clone(),
                    Storage::Cpu(storage),
                )
            })
            .collect();
        plan.report(plan.input_bytes());
        Ok(tensors)
    }
}

/// One unit of work: input bytes at `src` of the file, into `dst`.
struct Job<'a> {
    item: usize,
    src: usize,
    src_len: usize,
    dst: &'a mut [u8],
    conversion: Option<Conversion>,
}

/// Fills the arena with every item whose offset is not `usize::MAX`, on every core.
fn fill(plan: &LoadPlan<'_>, offsets: &[usize], arena: &mut [u8]) -> Result<()> {
    let mut jobs = Vec::new();
    let mut rest = arena;
    let mut at = 0usize;
    for (index, (item, &off)) in plan.items().iter().zip(offsets).enumerate() {
        if off == usize::MAX {
            continue;
        }
        // Offsets increase in plan order: skip the padding before this item.
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
        let (mut dst, tail) = tail.split_at_mut(item.out_len);
        rest = tail;
        at = off + item.out_len;
        let mut src = item.src.start;
        let end = item.src.end;
        loop {
            let src_len = (end - src).min(CHUNK);
            let dst_len = match item.conversion {
                Some(c) => c.output_len(src_len).unwrap_or(0),
                None => src_len,
            };
            let take = dst_len.min(dst.len());
            let (d, tail) = std::mem::take(&mut dst).split_at_mut(take);
            dst = tail;
            jobs.push(Job {
                item: index,
                src,
                src_len,
                dst: d,
                conversion: item.conversion,
            });
            src += src_len;
            if src >= end {
                break;
            }
        }
    }
    let done = AtomicU64::new(0);
    let file = plan.file();
    // Cold pages: positioned reads on every thread, instead of faulting the mapping in.
    let cold = file.mapping().is_some() && file.is_cold();
    parallel::for_each(jobs, usize::MAX, |job, scratch| {
        let (item, n) = (job.item, job.src_len as u64);
        run_job(file, job, cold, scratch).map_err(|e| e.with_tensor(plan.items()[item].name))?;
        plan.report(done.fetch_add(n, Ordering::Relaxed) + n);
        Ok(())
    })
    .map_err(|e| plan.err(e))
}

fn run_job(file: &HostFile<'_>, job: Job<'_>, cold: bool, scratch: &mut Vec<u8>) -> Result<()> {
    let Some(conversion) = job.conversion else {
        return if cold {
            file.read_at_direct(job.src, job.dst)
        } else {
            file.read_at(job.src, job.dst)
        };
    };
    let src = match file.bytes().filter(|_| !cold) {
        Some(bytes) => bytes.get(job.src..job.src + job.src_len).ok_or_else(|| {
            Error::new(ErrorKind::Io, "tensor bytes lie past the end of the file")
        })?,
        None => {
            scratch.resize(job.src_len, 0);
            file.read_at_direct(job.src, scratch)?;
            &scratch[..]
        }
    };
    conversion.convert(src, job.dst);
    Ok(())
}
