//! Conversions through one bounded scratch buffer: each batch's input bytes land in it (in
//! place where the adapter shares host memory, else through a staging ring), and the kernels
//! write the outputs from it, so that a load that converts needs its output plus the scratch
//! on the device, whatever its size.

use super::map::{MapState, Write, fill, map_async, wait_mapped};
use super::ring::{Path, Transfer, stream};
use super::{Kernel, WgpuBackend, pad4};
use crate::error::Result;
use crate::plan::{LoadPlan, PlanItem};
use crate::read::file::HostFile;
use crate::read::gather::Span;

/// Size of the scratch buffer conversions read their input from (less where the device
/// allows less): device memory for a load that converts is its output plus this.
pub(super) const SCRATCH: u64 = 256 << 20;

/// One piece of a tensor to convert: `elements` elements of its input (`src`, a whole
/// number of elements, a multiple of 256 of them but for its last piece) into its output
/// buffer at `out_offset` (a multiple of 256 bytes).
pub(super) struct Convert<'n, 'b> {
    tensor: &'n str,
    file: &'n HostFile<'n>,
    src: Span<'n>,
    elements: u64,
    out: &'b wgpu::Buffer,
    out_offset: u64,
    kernel: Kernel,
}

impl<'n, 'b> Convert<'n, 'b> {
    /// The pieces of `item` that fit a scratch buffer of `scratch` bytes (output offsets
    /// 256-aligned: the binding alignment).
    pub(super) fn chunks(
        item: &'n PlanItem<'n>,
        out: &'b wgpu::Buffer,
        kernel: Kernel,
        scratch: u64,
    ) -> Vec<Convert<'n, 'b>> {
        item.conversion_pieces(scratch as usize)
            .into_iter()
            .map(|p| Convert {
                tensor: item.name,
                file: item.file,
                src: p.src,
                elements: p.elements,
                out,
                out_offset: p.out_offset as u64,
                kernel,
            })
            .collect()
    }
}

/// Converts `converts` through one scratch buffer of `size` bytes: each batch's inputs
/// written into it (in place where the adapter shares host memory, else through the staging
/// ring), then the kernels from it into the outputs. In place, the next batch waits for the
/// kernels of the last; through the ring, the queue's order keeps the copies of the next
/// batch after them.
pub(super) fn convert_through_scratch(
    backend: &WgpuBackend,
    plan: &LoadPlan<'_>,
    converts: &[Convert<'_, '_>],
    path: Path,
    size: u64,
    staging_size: u64,
) -> Result<()> {
    if converts.is_empty() {
        return Ok(());
    }
    let direct = path == Path::InPlace;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let scratch = backend.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("tensorplace conversion scratch"),
        size,
        usage: if direct {
            usage | wgpu::BufferUsages::MAP_WRITE
        } else {
            usage
        },
        mapped_at_creation: direct,
    });
    let mut remap: Option<(MapState, wgpu::SubmissionIndex)> = None;
    let mut last = None;
    let mut start = 0;
    while start < converts.len() {
        // A batch: the pieces that fit, each at a 256-byte aligned offset.
        let mut offsets = Vec::new();
        let mut used = 0u64;
        let mut end = start;
        while let Some(c) = converts.get(end) {
            let len = pad4(c.src.len() as u64);
            if end > start && used + len > size {
                break;
            }
            offsets.push(used);
            used = (used + len).next_multiple_of(256);
            end += 1;
        }
        let batch = &converts[start..end];
        match path {
            Path::InPlace => {
                if let Some((state, after)) = remap.take() {
                    wait_mapped(backend, &state, Some(after))?;
                }
                let writes: Vec<Write<'_, '_>> = batch
                    .iter()
                    .zip(&offsets)
                    .map(|(c, &offset)| Write {
                        tensor: c.tensor,
                        file: c.file,
                        buffer: &scratch,
                        offset,
                        src: c.src.clone(),
                    })
                    .collect();
                fill(&writes, true, &|n| plan.advance(n))?;
                scratch.unmap();
            }
            Path::Staged(ring) => {
                let transfers: Vec<Transfer<'_, '_>> = batch
                    .iter()
                    .zip(&offsets)
                    .map(|(c, &offset)| Transfer {
                        tensor: c.tensor,
                        file: c.file,
                        src: c.src.clone(),
                        dst: &scratch,
                        dst_offset: offset,
                    })
                    .collect();
                stream(backend, plan, &transfers, ring, staging_size)?;
            }
        }
        let mut enc = backend.device.create_command_encoder(&Default::default());
        for (c, &offset) in batch.iter().zip(&offsets) {
            backend.dispatch(
                &mut enc,
                &c.kernel,
                (&scratch, offset),
                (c.out, c.out_offset),
                c.elements,
            )?;
        }
        let index = backend.queue.submit([enc.finish()]);
        if direct && end < converts.len() {
            remap = Some((map_async(&scratch, wgpu::MapMode::Write), index.clone()));
        }
        last = Some(index);
        start = end;
    }
    backend.wait(last)
}
