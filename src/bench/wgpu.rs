//! The wgpu group: our load against a per-tensor `queue.write_buffer` loop (what burn
//! does), both ending with the device idle and the buffers freed.

use std::path::Path;

use super::measure::{BenchPath, Group, Role};
use crate::device::Device;
use crate::device::wgpu::WgpuBackend;
use crate::error::{Error, ErrorKind, Result};
use crate::host::{HostFile, ReadMode};

/// Bytes the baseline writes between submissions, so that wgpu's staging copies of the
/// writes do not pile up into a second copy of the whole file.
const SUBMIT_EVERY: usize = 256 << 20;

/// The group for adapter `index` (`None`: the first).
pub(super) fn group(index: Option<usize>, path: &Path) -> Result<Group<'_>> {
    let backend = WgpuBackend::open(index, None)?;
    let device = Device::Wgpu(Some(backend.index()));
    let label = if backend.in_place_supported() {
        "tensorplace load_file (mapped in place)"
    } else {
        "tensorplace load_file (staging ring)"
    };
    Ok(Group {
        device: device.to_string(),
        paths: vec![
            BenchPath::new(label, Role::Ours, move || {
                let t = crate::load_file(path, device)?;
                drop(t);
                Ok(())
            }),
            BenchPath::new("per-tensor queue.write_buffer", Role::Baseline, move || {
                // Mapped anew for each run, so that `--cold` can drop the pages between runs.
                let file = HostFile::open(path, ReadMode::Mmap)?;
                write_each(&backend, &file)
            }),
        ],
        pairs: vec![],
    })
}

/// One buffer per tensor, written with `queue.write_buffer` (padded to 4 bytes), submitted
/// every [`SUBMIT_EVERY`] bytes inside an error scope, then waited for.
fn write_each(backend: &WgpuBackend, file: &HostFile<'_>) -> Result<()> {
    let device = backend.device();
    let queue = backend.queue();
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let mut keep = Vec::new();
    let mut pending = 0usize;
    for (name, info) in file.tensors() {
        let bytes = file.tensor_bytes(info).unwrap_or_default();
        let buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(name),
            size: (bytes.len().div_ceil(4).max(1) * 4) as u64,
            usage,
            mapped_at_creation: false,
        });
        let n = bytes.len() / 4 * 4;
        queue.write_buffer(&buf, 0, &bytes[..n]);
        if n < bytes.len() {
            let mut tail = bytes[n..].to_vec();
            tail.resize(4, 0);
            queue.write_buffer(&buf, n as u64, &tail);
        }
        keep.push(buf);
        pending += bytes.len();
        if pending >= SUBMIT_EVERY {
            queue.submit([]);
            pending = 0;
        }
    }
    let index = queue.submit([]);
    device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
        .map_err(|e| Error::new(ErrorKind::Backend, format!("waiting for the device: {e}")))?;
    match pollster::block_on(oom.pop()) {
        Some(e) => Err(Error::new(ErrorKind::OutOfMemory, e.to_string())),
        None => Ok(()),
    }
}
