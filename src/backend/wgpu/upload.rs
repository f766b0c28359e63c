//! How a load's bytes reach wgpu buffers: the strategy each load takes, and the load itself.
//!
//! - **In place** (adapters that share host memory: integrated and software GPUs): the
//!   tensors' buffers are created mapped and the host I/O engine writes the file's bytes
//!   straight into them, on every core. No staging copy at all.
//! - **Staging** (discrete GPUs): through a ring of host-import or mapped staging buffers
//!   ([`ring`](super::ring)).
//!
//! Tensors to convert go through one bounded scratch buffer ([`scratch`](super::scratch)).

use std::sync::Arc;

use super::map::{BufferAt, Transfer, fill};
use super::ring::{Ring, STAGING, stream};
use super::scratch::{Convert, SCRATCH, convert_through_scratch};
use super::{Kernel, WgpuBackend, WgpuStorage, pad4};
use crate::device::Device;
use crate::error::{Error, ErrorKind, Result};
use crate::parallel::{self, Threads};
use crate::plan::{LoadPlan, PlanItem, Upload};
use crate::read::gather;

/// A buffer to create for a load.
struct BufferSpec<'n> {
    label: &'n str,
    /// The bytes it holds (padded to 4 when created).
    size: usize,
    /// Whether the file's bytes are written into it (so, in place, it is created mapped).
    written: bool,
}

/// The strategy this load takes (`Auto` resolved), or why the one asked for cannot be used.
fn resolve(backend: &WgpuBackend, upload: Upload) -> std::result::Result<Upload, &'static str> {
    let import = backend.importer.is_some();
    match upload {
        Upload::Auto if backend.in_place_supported => Ok(Upload::InPlace),
        Upload::Auto if import => Ok(Upload::HostImport),
        Upload::Auto | Upload::Staging => Ok(Upload::Staging),
        Upload::InPlace if backend.in_place_supported => Ok(Upload::InPlace),
        Upload::InPlace => Err("the adapter does not share host memory"),
        Upload::HostImport if import => Ok(Upload::HostImport),
        Upload::HostImport => Err(
            "the device cannot import host memory (not Vulkan, no VK_EXT_external_memory_host, or a copy from imported memory failed its check)",
        ),
        // Refused by `backend::place` before the plan reaches the backend.
        Upload::Register => Err("not wgpu's"),
    }
}

/// Places every tensor of `plan` in a buffer of its own: the strategy chosen, the buffers
/// created, the unconverted tensors written (in place or through a ring), the others
/// converted through the scratch buffer.
pub(super) fn upload(backend: &Arc<WgpuBackend>, plan: &LoadPlan<'_>) -> Result<Vec<WgpuStorage>> {
    let upload = resolve(backend, plan.upload())
        .map_err(|why| plan.unsupported_upload(Device::Wgpu(Some(backend.index)), why))?;
    plan.note_upload(upload);
    if let Some(what) = backend.not_a_gpu() {
        plan.note(format!("{}: {what}", backend.description()));
    }
    let ring = Ring::of(upload);
    let items = plan.items();
    let max = backend.limits.max_buffer_size;
    check_sizes(items, max)?;
    let kernels: Vec<Option<Kernel>> = items
        .iter()
        .map(|i| i.conversion.map(|c| backend.kernel_for(c)))
        .collect();
    let staging_size = STAGING.min(max) / 256 * 256;
    let scratch_size = SCRATCH.min(max) / 256 * 256;
    backend.scoped("uploading", || {
        let outs = create_buffers(backend, items, ring.is_none())?;
        write_unconverted(backend, plan, &outs, ring, staging_size)?;
        // The tensors to convert go through one bounded scratch buffer, batch after batch.
        let converts: Vec<Convert<'_, '_>> = items
            .iter()
            .zip(&outs)
            .zip(&kernels)
            .filter(|((i, _), _)| i.in_len() > 0)
            .filter_map(|((item, out), kernel)| kernel.map(|kernel| (item, out, kernel)))
            .flat_map(|(item, buffer, kernel)| {
                let out = BufferAt { buffer, offset: 0 };
                Convert::pieces(item, kernel, out, scratch_size as usize)
            })
            .collect();
        convert_through_scratch(backend, plan, &converts, ring, scratch_size, staging_size)?;
        Ok(items
            .iter()
            .zip(outs)
            .map(|(item, buffer)| WgpuStorage {
                backend: backend.clone(),
                buffer,
                len: item.out_len,
            })
            .collect())
    })
}

/// Every tensor's input and output fit one buffer of the device.
fn check_sizes(items: &[PlanItem<'_>], max: u64) -> Result<()> {
    for item in items {
        let biggest = item.in_len().max(item.out_len) as u64;
        if pad4(biggest) > max {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{biggest} bytes exceed the device's max_buffer_size of {max}"),
            )
            .with_tensor(item.name));
        }
    }
    Ok(())
}

/// The tensors' buffers, in the items' order. In place (`mapped_writes`), the buffers the
/// file's bytes go to are created mapped, on every core, the largest first: creating a buffer
/// mapped zero-fills it on the creating thread, so the fills (and page faults) run in
/// parallel. Out of memory shows here, before anything is read.
fn create_buffers(
    backend: &WgpuBackend,
    items: &[PlanItem<'_>],
    mapped_writes: bool,
) -> Result<Vec<wgpu::Buffer>> {
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let specs: Vec<BufferSpec<'_>> = items
        .iter()
        .map(|i| BufferSpec {
            label: i.name,
            size: i.out_len,
            written: i.conversion.is_none() && i.in_len() > 0,
        })
        .collect();
    let make = |spec: &BufferSpec<'_>| {
        let mapped = mapped_writes && spec.written;
        backend.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(spec.label),
            size: pad4(spec.size as u64),
            usage: if mapped {
                usage | wgpu::BufferUsages::MAP_WRITE
            } else {
                usage
            },
            mapped_at_creation: mapped,
        })
    };
    let oom = backend
        .device
        .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let outs = if mapped_writes {
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by_key(|&k| std::cmp::Reverse(specs[k].size));
        let mut made = parallel::map(order, Threads::PerCore, |k| Ok((k, make(&specs[k]))))?;
        made.sort_unstable_by_key(|&(k, _)| k);
        made.into_iter().map(|(_, buffer)| buffer).collect()
    } else {
        specs.iter().map(make).collect()
    };
    if let Some(e) = pollster::block_on(oom.pop()) {
        return Err(Error::new(
            ErrorKind::OutOfMemory,
            format!("creating the tensors' buffers: {e}"),
        ));
    }
    Ok(outs)
}

/// Writes the tensors kept as they are into their buffers `outs`: in place through their
/// mappings (`ring` is `None`), or through the staging `ring` in pieces of `staging_size`.
fn write_unconverted(
    backend: &WgpuBackend,
    plan: &LoadPlan<'_>,
    outs: &[wgpu::Buffer],
    ring: Option<Ring>,
    staging_size: u64,
) -> Result<()> {
    let writes: Vec<Transfer<'_, '_>> = plan
        .items()
        .iter()
        .zip(outs)
        .filter(|(i, _)| i.in_len() > 0 && i.conversion.is_none())
        .map(|(item, buffer)| Transfer {
            tensor: item.name,
            file: item.file,
            src: item.span(),
            dst: BufferAt { buffer, offset: 0 },
        })
        .collect();
    let Some(ring) = ring else {
        fill(&writes, true, &|n| plan.advance(n))?;
        for w in &writes {
            w.dst.buffer.unmap();
        }
        return Ok(());
    };
    let pieces: Vec<Transfer<'_, '_>> = writes
        .iter()
        .flat_map(|w| gather::chunks(0..w.src.len(), staging_size as usize).map(|r| w.part(r)))
        .collect();
    stream(backend, plan, &pieces, ring, staging_size)
}
