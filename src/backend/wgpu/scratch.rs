//! Conversions through one bounded scratch buffer: each batch's input bytes land in it (in
//! place where the adapter shares host memory, else through a staging ring), and the kernels
//! write the outputs from it, so that a load that converts needs its output plus the scratch
//! on the device, whatever its size.

use super::map::{BufferAt, MapState, Transfer, fill, map_async, wait_mapped};
use super::ring::{Ring, stream};
use super::{Kernel, WgpuBackend, pad4};
use crate::backend::common::{self, scratch_batches};
use crate::error::Result;
use crate::plan::LoadPlan;

/// Size of the scratch buffer conversions read their input from (less where the device
/// allows less): device memory for a load that converts is its output plus this.
pub(super) const SCRATCH: u64 = 256 << 20;

/// One piece of a tensor to convert, its output in its buffer at a 256-byte aligned offset
/// (the binding alignment).
pub(super) type Convert<'n, 'b> = common::Convert<'n, Kernel, BufferAt<'b>>;

/// Converts `converts` through one scratch buffer of `size` bytes: each batch's inputs
/// written into it (in place where the adapter shares host memory, else through the staging
/// ring), then the kernels from it into the outputs. In place, the next batch waits for the
/// kernels of the last; through the ring, the queue's order keeps the copies of the next
/// batch after them.
pub(super) fn convert_through_scratch(
    backend: &WgpuBackend,
    plan: &LoadPlan<'_>,
    converts: &[Convert<'_, '_>],
    ring: Option<Ring>,
    size: u64,
    staging_size: u64,
) -> Result<()> {
    if converts.is_empty() {
        return Ok(());
    }
    let direct = ring.is_none();
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
    let mut batches = scratch_batches(converts, size, |c| pad4(c.src.len() as u64)).peekable();
    while let Some((batch, offsets)) = batches.next() {
        let inputs: Vec<Transfer<'_, '_>> = batch
            .iter()
            .zip(&offsets)
            .map(|(c, &offset)| {
                c.input(BufferAt {
                    buffer: &scratch,
                    offset,
                })
            })
            .collect();
        match ring {
            None => {
                if let Some((state, after)) = remap.take() {
                    wait_mapped(backend, &state, Some(after))?;
                }
                fill(&inputs, true, &|n| plan.advance(n))?;
                scratch.unmap();
            }
            Some(ring) => stream(backend, plan, &inputs, ring, staging_size)?,
        }
        let mut enc = backend.device.create_command_encoder(&Default::default());
        for (c, &offset) in batch.iter().zip(&offsets) {
            let out = (c.out.buffer, c.out.offset);
            backend.dispatch(&mut enc, &c.kernel, (&scratch, offset), out, c.elements)?;
        }
        let index = backend.queue.submit([enc.finish()]);
        if direct && batches.peek().is_some() {
            remap = Some((map_async(&scratch, wgpu::MapMode::Write), index.clone()));
        }
        last = Some(index);
    }
    backend.wait(last)
}
