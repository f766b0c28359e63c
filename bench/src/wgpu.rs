//! The wgpu group: our load against a per-tensor `queue.write_buffer` loop (what burn
//! does), both ending with the device idle and the buffers freed; each staging ring forced
//! (the mapped ring, and host memory imported into the device where the driver can), and the
//! two stages of the imported ring alone: the host filling it from the file, and the GPU
//! copying out of it into the tensors' buffers.

use std::path::Path;
use std::sync::Arc;

use super::measure::{BenchPath, Group, Role};
use tensorplace::internals::{
    Gather, HostFile, HostRegion, RING, STAGING, Span, WgpuBackend, chunks,
};
use tensorplace::{Device, Error, ErrorKind, Loader, ReadMode, Result, Upload};

/// Bytes the baseline writes between submissions, so that wgpu's staging copies of the
/// writes do not pile up into a second copy of the whole file.
const SUBMIT_EVERY: usize = 256 << 20;

/// The group for adapter `index` (`None`: the first).
pub(super) fn group(index: Option<usize>, path: &Path) -> Result<Group<'_>> {
    let backend = WgpuBackend::open(index, None)?;
    let device = Device::Wgpu(Some(backend.index()));
    let label = if backend.in_place_supported() {
        "tensorplace load_file (mapped in place)"
    } else if backend.host_import_alignment().is_some() {
        "tensorplace load_file (host-import ring)"
    } else {
        "tensorplace load_file (staging ring)"
    };
    let forced = |name: &str, upload: Upload| {
        BenchPath::new(name, Role::Ours, move || {
            let t = Loader::new(device).upload(upload).load_file(path)?;
            drop(t);
            Ok(())
        })
    };
    let baseline = backend.clone();
    let mut paths = vec![
        BenchPath::new(label, Role::Ours, move || {
            let t = tensorplace::load_file(path, device)?;
            drop(t);
            Ok(())
        }),
        BenchPath::new("per-tensor queue.write_buffer", Role::Baseline, move || {
            // Mapped anew for each run, so that `--cold` can drop the pages between runs.
            let file = HostFile::open(path, ReadMode::Mmap)?;
            write_each(&baseline, &file)
        }),
    ];
    if backend.in_place_supported() || backend.host_import_alignment().is_some() {
        paths.push(forced(
            "load_file (mapped staging, forced)",
            Upload::Staging,
        ));
    }
    if backend.in_place_supported() && backend.host_import_alignment().is_some() {
        paths.push(forced(
            "load_file (host import, forced)",
            Upload::HostImport,
        ));
    }
    if let Some(ring) = imported_ring(&backend) {
        let ring = Arc::new(ring?);
        let fill_ring = ring.clone();
        paths.push(BenchPath::new(
            "stage: fill the host-import ring",
            Role::Stage,
            move || fill_alone(path, &fill_ring),
        ));
        let copier = backend.clone();
        paths.push(BenchPath::new(
            "stage: copy from the host-import ring",
            Role::Stage,
            move || copy_alone(&copier, path, &ring),
        ));
    }
    Ok(Group {
        device: device.to_string(),
        paths,
        pairs: vec![],
    })
}

/// Imported staging buffers, each with its host memory.
type Ring = Vec<(wgpu::Buffer, Arc<HostRegion>)>;

/// A ring like the load's: [`RING`] buffers of [`STAGING`] bytes of imported host memory.
fn imported_ring(backend: &WgpuBackend) -> Option<Result<Ring>> {
    let size = STAGING.min(backend.limits().max_buffer_size) / 256 * 256;
    (0..RING)
        .map(|_| backend.import_host(size as usize))
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().collect())
}

/// The host's half of a load through the ring: the file's data section read by the host
/// I/O engine into the ring's memory, buffer after buffer, with no GPU copy to wait for.
fn fill_alone(path: &Path, ring: &[(wgpu::Buffer, Arc<HostRegion>)]) -> Result<()> {
    let file = HostFile::open(path, ReadMode::Mmap)?;
    let start = file.header().data_start();
    let gather = Gather::contiguous(start..start + file.header().data_len());
    let data = Span::all(&gather);
    let size = ring.first().map_or(0, |(_, host)| host.len());
    for (k, r) in chunks(0..data.len(), size).enumerate() {
        let host = &ring[k % ring.len()].1;
        // SAFETY: no GPU work reads this memory (this stage submits none), and this run is
        // its only writer.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host.as_ptr(), r.len()) };
        super::cpu::read_into(&file, data.part(r), bytes)?;
    }
    Ok(())
}

/// The GPU's half: a buffer per tensor, each filled by a copy out of the ring (whatever it
/// holds) at the offsets a load would use, one submission per ring buffer, then waited for.
fn copy_alone(
    backend: &WgpuBackend,
    path: &Path,
    ring: &[(wgpu::Buffer, Arc<HostRegion>)],
) -> Result<()> {
    let file = HostFile::open(path, ReadMode::Mmap)?;
    let device = backend.device();
    let size = ring.first().map_or(0, |(b, _)| b.size());
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let mut keep = Vec::new();
    let mut slot = 0usize;
    let mut used = 0u64;
    let mut enc = device.create_command_encoder(&Default::default());
    for (name, info) in file.tensors() {
        let len = info.len() as u64;
        let padded = len.div_ceil(4).max(1) * 4;
        let dst = backend.new_buffer(name, padded, usage);
        let mut at = 0u64;
        while at < padded {
            if used + 4 > size {
                backend.queue().submit([enc.finish()]);
                enc = device.create_command_encoder(&Default::default());
                slot += 1;
                used = 0;
            }
            let n = (padded - at).min((size - used) / 4 * 4);
            enc.copy_buffer_to_buffer(&ring[slot % ring.len()].0, used, &dst, at, n);
            at += n;
            used = (used + n).next_multiple_of(256);
        }
        keep.push(dst);
    }
    let index = backend.queue().submit([enc.finish()]);
    backend.wait(Some(index))?;
    match pollster::block_on(oom.pop()) {
        Some(e) => Err(Error::new(ErrorKind::OutOfMemory, e.to_string())),
        None => Ok(()),
    }
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
