//! The CUDA group: our load, the per-tensor path every peer uses (allocate and copy each
//! tensor from the mapping, as candle does), and one pinned-host-to-device copy of the same
//! size (the ceiling). Each run ends synchronized, its device memory freed. Two stage rows
//! show the fixed cost inside a load's total: allocating and freeing its arena as a load
//! does (from the backend's pool, warm after the first run) and with `cuMemAlloc`.

use std::ffi::c_void;
use std::path::Path;

use cudarc::driver::sys;

use super::measure::{BenchPath, Group, Role};
use tensorplace::internals::{Arena, CudaBackend, HostFile, Pinned, driver_err};
use tensorplace::{Device, Loader, ReadMode, Result, Upload};

/// The group for device `ordinal`.
pub(super) fn group(ordinal: usize, path: &Path) -> Result<Group<'_>> {
    let backend = CudaBackend::open(ordinal)?;
    let file = HostFile::open(path, ReadMode::Mmap)?;
    let bytes = file.header().data_len();
    let mut pinned = Pinned::alloc(backend.context(), bytes)?;
    if let Some(data) = file.data() {
        pinned.host_mut()?[..data.len()].copy_from_slice(data);
    }
    drop(file);
    let device_buf = Arena::alloc(backend.context(), bytes)?;
    let ceiling = backend.clone();
    let (pooled, unpooled) = (backend.clone(), backend.clone());
    let device = Device::Cuda(ordinal);
    Ok(Group {
        device: device.to_string(),
        paths: vec![
            BenchPath::new("tensorplace load_file", Role::Ours, move || {
                let t = tensorplace::load_file(path, device)?;
                drop(t);
                Ok(())
            }),
            // Registering the mapping in place, for the comparison with the ring that `auto`
            // takes (a row that fails where the driver cannot register read-only memory).
            BenchPath::new("load_file (register, forced)", Role::Ours, move || {
                let t = Loader::new(device)
                    .upload(Upload::Register)
                    .load_file(path)?;
                drop(t);
                Ok(())
            }),
            BenchPath::new(
                "per-tensor clone_htod from the mmap",
                Role::Baseline,
                move || per_tensor_clone(&backend, ordinal, path),
            ),
            BenchPath::new(
                if pooled.pooled() {
                    "stage: allocate + free the arena (pool)"
                } else {
                    "stage: allocate + free the arena (no pool: cuMemAlloc)"
                },
                Role::Stage,
                move || pooled.arena(bytes).map(drop),
            ),
            BenchPath::new(
                "stage: allocate + free the arena (cuMemAlloc)",
                Role::Stage,
                move || Arena::alloc(unpooled.context(), bytes).map(drop),
            ),
            BenchPath::new(
                "one pinned host-to-device copy (ceiling)",
                Role::Ceiling,
                move || one_pinned_copy(&ceiling, ordinal, &pinned, &device_buf, bytes),
            ),
        ],
        pairs: vec![],
    })
}

/// The baseline: one tensor at a time, each freed before the next (the per-copy cost is
/// measured without holding the whole file on the device twice). Mapped anew for each run,
/// so that `--cold` can drop the pages between runs.
fn per_tensor_clone(backend: &CudaBackend, ordinal: usize, path: &Path) -> Result<()> {
    let file = HostFile::open(path, ReadMode::Mmap)?;
    let stream = backend.stream().clone();
    for (_, info) in file.tensors() {
        let bytes = file.tensor_bytes(info).unwrap_or_default();
        if !bytes.is_empty() {
            let on_device = stream
                .clone_htod(bytes)
                .map_err(|e| driver_err(ordinal, "clone_htod", e))?;
            std::hint::black_box(&on_device);
        }
    }
    stream
        .synchronize()
        .map_err(|e| driver_err(ordinal, "synchronizing", e))
}

/// The ceiling: the file's data bytes in one copy from pinned memory to the device.
fn one_pinned_copy(
    backend: &CudaBackend,
    ordinal: usize,
    pinned: &Pinned,
    device_buf: &Arena,
    bytes: usize,
) -> Result<()> {
    let _current = backend.current()?;
    let stream = backend.stream();
    let src: *const c_void = pinned.device_source(0);
    // SAFETY: both buffers hold `bytes` bytes and outlive the copy, which is synchronized
    // below.
    unsafe { sys::cuMemcpyHtoDAsync_v2(device_buf.ptr(), src, bytes, stream.cu_stream()) }
        .result()
        .map_err(|e| driver_err(ordinal, "copying", e))?;
    stream
        .synchronize()
        .map_err(|e| driver_err(ordinal, "synchronizing", e))
}
