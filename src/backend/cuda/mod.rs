//! The CUDA backend (cudarc, libcuda loaded at run time).
//!
//! One device allocation (an arena) per load; each tensor a view into it, its start
//! 256-byte aligned; the arena is freed when the last tensor is dropped. Arenas come from
//! the backend's stream-ordered [`Pool`] where the device has memory pools: freed, they
//! stay in it for the next load (no `cuMemAlloc` of gigabytes, no fresh mapping, in the
//! timed window of a repeated load) until [`CudaBackend::trim`]; `TENSORPLACE_CUDA_POOL=0`
//! allocates each with `cuMemAlloc` instead. Before anything is copied, the free device
//! memory (and the pool's unused memory) is checked against what the load needs.
//!
//! Two ways up the PCIe link, chosen per load ([`Upload`]):
//! - **staging** ([`staging`], the automatic choice): a ring of pinned buffers filled by the
//!   host I/O engine on every core, each copied up while the next are filled.
//! - **register** ([`register`], asked for): a mapped file in the page cache is page-locked
//!   in place, a few chunks at a time, and copied from directly; what registering refuses
//!   goes through the ring.
//!
//! Dtype conversions run as the PTX kernels of [`kernels`]. Memory the backend owns is in
//! [`memory`]. Every exit from a load, an error included, first waits for every stream
//! ([`StreamGuard`]), so no copy outlives the memory it reads or writes.

mod kernels;
mod memory;
mod numa;
mod register;
mod staging;

use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaStream, DriverError, result};

use super::common::{self, Opened, guarded, scratch_batches};
use crate::convert::Conversion;
use crate::device::Device;
use crate::error::{Error, ErrorKind, Result};
use crate::plan::{LoadPlan, PlanItem, Upload};
use crate::read::LONG_RUN;
use crate::read::engine::{At, Piece};
use crate::read::file::HostFile;

pub use kernels::CONVERT_PTX;
use kernels::Kernels;
#[cfg(feature = "unstable-internals")]
pub use memory::Pinned;
pub use memory::{Arena, Current, Pool};

/// Alignment of each tensor's start in the arena.
pub(crate) const ALIGN: usize = 256;
/// Streams the copies are spread over.
const STREAMS: usize = 4;
/// Device memory a load's conversions read their inputs from, at most: a load that converts
/// needs its output plus this.
const SCRATCH: usize = 512 << 20;
/// The first driver whose READ_ONLY registrations leave the page cache clean (R570, CUDA
/// 12.8): older ones mark every unregistered page dirty, a write-back of the whole file.
const CLEAN_REGISTER_DRIVER: i32 = 12080;

/// A driver call's failure as a [`ErrorKind::Backend`] error naming the device and the step.
pub fn driver_err(ordinal: usize, what: &str, e: DriverError) -> Error {
    Error::new(ErrorKind::Backend, format!("cuda:{ordinal}: {what}: {e}")).with_source(e)
}

fn unavailable(ordinal: usize, why: &str) -> Error {
    Error::new(
        ErrorKind::DeviceUnavailable,
        format!("cuda:{ordinal}: {why}"),
    )
}

/// The error of a panic inside cudarc (a symbol missing from an old driver, say), for
/// [`guarded`].
fn panicked(ordinal: usize) -> Error {
    unavailable(
        ordinal,
        "the CUDA driver panicked (a driver too old for CUDA 11?)",
    )
}

/// Whether libcuda can be loaded; probing never panics.
pub(crate) fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the library names and drops the
    // handles; it touches no state of ours.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// The number of CUDA devices, or why there are none.
pub(crate) fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::new(
            ErrorKind::DeviceUnavailable,
            "libcuda not found (no NVIDIA driver)",
        ));
    }
    guarded(
        || panicked(0),
        || {
            let n = CudaContext::device_count().map_err(|e| {
                Error::new(
                    ErrorKind::DeviceUnavailable,
                    format!("cuInit or cuDeviceGetCount failed: {e}"),
                )
                .with_source(e)
            })?;
            Ok(usize::try_from(n).unwrap_or(0))
        },
    )
}

/// One line per CUDA device, from the device's attributes alone: listing creates no context
/// (which would take memory on every GPU of a node).
pub(crate) fn list() -> Result<Vec<String>> {
    let n = device_count()?;
    if n == 0 {
        return Err(Error::new(ErrorKind::DeviceUnavailable, "no CUDA device"));
    }
    let version = guarded(|| panicked(0), || driver_version(0))?;
    (0..n)
        .map(|i| {
            guarded(|| panicked(i), || {
                let ordinal = i32::try_from(i).map_err(|_| unavailable(i, "ordinal too large"))?;
                let dev = result::device::get(ordinal)
                    .map_err(|e| driver_err(i, "cuDeviceGet", e))?;
                let name = result::device::get_name(dev)
                    .map_err(|e| driver_err(i, "cuDeviceGetName", e))?;
                // SAFETY: `dev` was returned by cuDeviceGet above.
                let total = unsafe { result::device::total_mem(dev) }
                    .map_err(|e| driver_err(i, "cuDeviceTotalMem", e))?;
                let attr =
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED;
                // SAFETY: as above.
                let register = unsafe { result::device::get_attribute(dev, attr) }
                    .is_ok_and(|v| v != 0);
                // SAFETY: as above.
                let node = pci_address(|a| unsafe { result::device::get_attribute(dev, a) }.ok())
                    .and_then(|address| numa::node_of(Path::new(numa::SYSFS), &address))
                    .map_or("unknown".to_owned(), |n| n.to_string());
                Ok(format!(
                    "cuda:{i}: {name} (driver {version}), {total} bytes, read-only host register {}, NUMA node {node}",
                    if register { "yes" } else { "no" }
                ))
            })
        })
        .collect()
}

/// The device's PCI address as sysfs names it, from its attributes (`attribute` asks one).
fn pci_address(attribute: impl Fn(sys::CUdevice_attribute) -> Option<i32>) -> Option<String> {
    use sys::CUdevice_attribute as A;
    let number = |a| attribute(a).and_then(|v| u32::try_from(v).ok());
    Some(numa::pci_address(
        number(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
        number(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
        number(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?,
    ))
}

/// The CUDA version the driver supports (`cuDriverGetVersion`, such as 12080).
fn driver_version(ordinal: usize) -> Result<i32> {
    let mut version = 0i32;
    // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| unavailable(ordinal, &format!("cuDriverGetVersion: {e}")))?;
    Ok(version)
}

/// A CUDA device: its context, streams, staging ring and kernels.
pub struct CudaBackend {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    name: String,
    driver_version: i32,
    register_supported: bool,
    /// The NUMA node the GPU hangs off, where sysfs says (the staging ring is placed there).
    numa_node: Option<usize>,
    streams: Vec<Arc<CudaStream>>,
    ring: Mutex<Option<staging::Ring>>,
    /// Where arenas come from, where the device has memory pools (see the module).
    pool: Option<Arc<Pool>>,
    /// Loaded on first use; a failure is reported to that load and tried again by the next.
    kernels: Mutex<Option<Arc<Kernels>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, reusing it if this process opened it before. No driver, no
    /// device, a wrong ordinal or a driver too old are each a [`ErrorKind::DeviceUnavailable`].
    pub fn open(ordinal: usize) -> Result<Arc<CudaBackend>> {
        static OPEN: Opened<CudaBackend> = Opened::new();
        OPEN.get_or_open(ordinal, || {
            let count = device_count().map_err(|e| unavailable(ordinal, e.message()))?;
            if count == 0 {
                return Err(unavailable(ordinal, "no CUDA device"));
            }
            if ordinal >= count {
                return Err(unavailable(
                    ordinal,
                    &format!("there are {count} CUDA devices, numbered from 0"),
                ));
            }
            // cudarc makes a new context current (cuCtxSetCurrent): the caller's is put back.
            let before = result::ctx::get_current().ok().flatten();
            let created = guarded(|| panicked(ordinal), || CudaBackend::create(ordinal));
            // SAFETY: `before` was current on this thread a moment ago (or none was); setting
            // it back only changes this thread's current context.
            let _ = unsafe { result::ctx::set_current(before.unwrap_or(std::ptr::null_mut())) };
            created
        })
    }

    fn create(ordinal: usize) -> Result<CudaBackend> {
        let version = driver_version(ordinal)?;
        if version < 11000 {
            return Err(unavailable(
                ordinal,
                &format!(
                    "the driver supports CUDA {}.{}, 11.0 or later is needed",
                    version / 1000,
                    version % 1000 / 10
                ),
            ));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(ordinal, &format!("creating a context: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".to_owned());
        let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED;
        let register_supported = ctx.attribute(attr).is_ok_and(|v| v != 0);
        let numa_node = pci_address(|a| ctx.attribute(a).ok())
            .and_then(|address| numa::node_of(Path::new(numa::SYSFS), &address));
        let streams = (0..STREAMS)
            .map(|_| {
                ctx.new_stream()
                    .map_err(|e| driver_err(ordinal, "creating a stream", e))
            })
            .collect::<Result<Vec<Arc<CudaStream>>>>()?;
        let pool = (ctx.has_async_alloc()
            && std::env::var_os("TENSORPLACE_CUDA_POOL").is_none_or(|v| v != "0"))
        .then(|| Pool::create(&ctx, &streams[0]).ok().map(Arc::new))
        .flatten();
        Ok(CudaBackend {
            ordinal,
            ctx,
            name,
            driver_version: version,
            register_supported,
            numa_node,
            streams,
            ring: Mutex::new(None),
            pool,
            kernels: Mutex::new(None),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream on which loaded tensors are ready (every load synchronizes before returning).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.streams[0]
    }

    /// Makes the device's context current on this thread until the guard drops, when the
    /// caller's is restored.
    pub fn current(&self) -> Result<Current> {
        Current::push(&self.ctx)
    }

    /// Waits for every stream, each on its own; the first error is returned.
    pub(crate) fn sync_all(&self) -> Result<()> {
        let mut first = Ok(());
        for s in &self.streams {
            let r = s
                .synchronize()
                .map_err(|e| driver_err(self.ordinal, "synchronizing a stream", e));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// The strategy a load of `file` takes under `upload` (`Register` or `Staging`: `Auto`
    /// resolved), or why `upload` cannot be honoured.
    fn file_upload(
        &self,
        file: &HostFile<'_>,
        upload: Upload,
    ) -> std::result::Result<Upload, String> {
        let can_register = if file.mapping().is_none() {
            Err("the file is not mapped (caller bytes, or ReadMode::Pread)".to_owned())
        } else if !self.register_supported {
            Err(
                "CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED is 0 on this device \
                 (read-only host memory cannot be registered): use staging"
                    .to_owned(),
            )
        } else if self.driver_version < CLEAN_REGISTER_DRIVER {
            Err(format!(
                "driver {} would dirty the page cache on unregistering (12.8 or later needed)",
                self.driver_version
            ))
        } else {
            Ok(())
        };
        match upload {
            // `Auto` stages: registering is serial (a chunk at a time, at 10-25 GB/s on the
            // calling thread), while the ring is filled on every core; and x86 drivers of the
            // newest GPUs report no read-only registration at all. Registering stays an
            // explicit choice, for the bench to compare on each machine.
            Upload::Auto | Upload::Staging => Ok(Upload::Staging),
            Upload::Register => can_register.map(|()| Upload::Register),
            // Refused by `backend::place` before the plan reaches the backend.
            Upload::InPlace | Upload::HostImport => Err(format!("{upload} is not CUDA's")),
        }
    }

    /// The strategy of each file of `plan`, decided (and refused) before anything is placed.
    fn file_uploads<'p>(&self, plan: &LoadPlan<'p>) -> Result<Vec<(&'p HostFile<'p>, Upload)>> {
        let mut uploads: Vec<(&HostFile<'_>, Upload)> = Vec::new();
        for item in plan.items() {
            if !uploads.iter().any(|(f, _)| std::ptr::eq(*f, item.file)) {
                let upload = self
                    .file_upload(item.file, plan.upload())
                    .map_err(|why| plan.unsupported_upload(Device::Cuda(self.ordinal), &why))?;
                uploads.push((item.file, upload));
            }
        }
        Ok(uploads)
    }

    /// An [`ErrorKind::OutOfMemory`] error unless `need` bytes of device memory are free
    /// (or held unused by the pool).
    fn check_free(&self, need: usize) -> Result<()> {
        let (free, _) = self
            .ctx
            .mem_get_info()
            .map_err(|e| driver_err(self.ordinal, "cuMemGetInfo", e))?;
        let cached = self.pool.as_ref().map_or(0, |p| p.unused());
        if need > free.saturating_add(cached) {
            return Err(Error::new(
                ErrorKind::OutOfMemory,
                format!(
                    "cuda:{}: the load needs {need} bytes of device memory, {free} are free \
                     and {cached} held unused by tensorplace's pool",
                    self.ordinal
                ),
            ));
        }
        Ok(())
    }

    /// An arena of `len` bytes, as a load takes it: from the pool where there is one
    /// (trimmed and tried again once where the pool's free memory is in pieces too small),
    /// else from `cuMemAlloc`.
    pub fn arena(&self, len: usize) -> Result<Arena> {
        let Some(pool) = &self.pool else {
            return Arena::alloc(&self.ctx, len);
        };
        Arena::alloc_from(pool, len).or_else(|_| {
            pool.trim()?;
            Arena::alloc_from(pool, len)
        })
    }

    /// Gives the device memory that loads' freed arenas left in the backend's pool back to
    /// the device (as `torch.cuda.empty_cache()` does for torch's), so that other libraries
    /// can allocate it. Memory of tensors still alive stays theirs.
    pub fn trim(&self) -> Result<()> {
        match &self.pool {
            Some(pool) => pool.trim(),
            None => Ok(()),
        }
    }

    /// Whether arenas come from the backend's memory pool (see the module).
    pub fn pooled(&self) -> bool {
        self.pool.is_some()
    }

    /// The device memory the pool holds that no tensor uses (0 without a pool).
    pub fn cached(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.unused())
    }

    /// The CPUs of the GPU's NUMA node, where sysfs says.
    fn node_cpus(&self) -> Option<Vec<usize>> {
        numa::cpus_of(Path::new(numa::SYSFS), self.numa_node?)
    }

    /// The conversion kernels, loaded on first use.
    fn kernels(&self) -> Result<Arc<Kernels>> {
        let mut k = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = &*k {
            return Ok(k.clone());
        }
        let loaded = Arc::new(Kernels::load(&self.ctx)?);
        *k = Some(loaded.clone());
        Ok(loaded)
    }

    /// Converts a host buffer on the device (for tests and tools).
    pub fn convert(&self, c: Conversion, input: &[u8]) -> Result<Vec<u8>> {
        let _current = self.current()?;
        self.kernels()?.convert(c, input, self.stream())
    }
}

/// Waits for every stream of the backend when dropped: created after a load's allocations,
/// it is dropped before them on every exit, so no queued copy or kernel outlives its memory.
struct StreamGuard<'a>(&'a CudaBackend);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        let _current = self.0.current();
        // On success the load has synchronized (and reported errors) already; on an error
        // path the load's own error is the one returned.
        let _ = self.0.sync_all();
    }
}

/// A tensor's bytes in a CUDA arena.
#[derive(Debug, Clone)]
pub struct CudaStorage {
    backend: Arc<CudaBackend>,
    arena: Arc<Arena>,
    offset: usize,
    len: usize,
}

impl CudaStorage {
    /// The device address of the tensor's first byte (256-byte aligned).
    pub fn device_ptr(&self) -> u64 {
        self.arena.ptr() + self.offset as u64
    }

    /// The tensor's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tensor has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.backend.ordinal
    }

    /// The stream on which the bytes are ready.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.backend.stream()
    }

    /// The context that owns the memory.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.arena.context()
    }

    /// Copies the bytes back to the host, after the work queued on [`stream`](Self::stream).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        if self.len == 0 {
            return Ok(out);
        }
        let ordinal = self.backend.ordinal;
        let _current = self.backend.current()?;
        let stream = self.stream();
        // SAFETY: the arena holds offset + len bytes; the copy is ordered after the work on
        // the tensors' stream and synchronized below, before `out` is read or dropped.
        unsafe { result::memcpy_dtoh_async(&mut out, self.device_ptr(), stream.cu_stream()) }
            .map_err(|e| driver_err(ordinal, "copying a tensor back", e))?;
        stream
            .synchronize()
            .map_err(|e| driver_err(ordinal, "synchronizing", e))?;
        Ok(out)
    }
}

/// One copy of a load: bytes of a file to a device address.
pub(crate) type Transfer<'n> = Piece<'n, CUdeviceptr>;

/// A piece of a tensor to convert, its output at an offset in the load's arena.
type Convert<'n> = common::Convert<'n, Conversion, u64>;

impl At for CUdeviceptr {
    fn at(&self, offset: u64) -> Self {
        self + offset
    }
}

impl CudaBackend {
    /// The device's ordinal.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// A human description, such as `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub(crate) fn description(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.name)
    }

    /// Places every tensor of the plan in one device arena, returning their storages in the
    /// plan's order.
    pub(crate) fn place(&self, plan: &LoadPlan<'_>) -> Result<Vec<CudaStorage>> {
        let this = CudaBackend::open(self.ordinal)?;
        guarded(|| panicked(self.ordinal), || upload(&this, plan)).map_err(|e| plan.err(e))
    }
}

/// A load's place in device memory: each tensor's offset in the arena, the arena's size,
/// the pieces to convert and the scratch buffer their inputs go through.
struct Layout<'n> {
    slots: Vec<usize>,
    out_total: usize,
    converts: Vec<Convert<'n>>,
    scratch_len: usize,
}

impl<'n> Layout<'n> {
    fn of(items: &'n [PlanItem<'n>]) -> Result<Layout<'n>> {
        let overflow = || Error::new(ErrorKind::SizeOverflow, "the load's size in device memory");
        let mut out_total = 0usize;
        let mut slots = Vec::with_capacity(items.len());
        for item in items {
            slots.push(out_total);
            // Room for the kernels' 4-byte padding, then the next start aligned.
            out_total = out_total
                .checked_add(item.out_len + 4)
                .and_then(|t| t.checked_next_multiple_of(ALIGN))
                .ok_or_else(overflow)?;
        }
        // Conversions read their inputs from one bounded scratch buffer, batch after batch:
        // a load needs its output plus at most SCRATCH bytes of device memory.
        let converts: Vec<Convert<'_>> = items
            .iter()
            .zip(&slots)
            .filter(|(item, _)| item.in_len() > 0)
            .filter_map(|(item, &out)| item.conversion.map(|c| (item, c, out)))
            .flat_map(|(item, c, out)| Convert::pieces(item, c, out as u64, SCRATCH - ALIGN))
            .collect();
        let scratch_len = converts
            .iter()
            .try_fold(0usize, |sum, c| sum.checked_add(input_room(c)))
            .ok_or_else(overflow)?
            .min(SCRATCH);
        Ok(Layout {
            slots,
            out_total,
            converts,
            scratch_len,
        })
    }

    /// The device memory the load needs.
    fn need(&self) -> Result<usize> {
        self.out_total
            .checked_add(self.scratch_len)
            .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "the load's size in device memory"))
    }
}

/// The room of a conversion's input in the scratch buffer: its bytes, the 4 bytes of
/// padding the kernels may read, and the next start aligned.
fn input_room(c: &Convert<'_>) -> usize {
    (c.src.len() + 4).next_multiple_of(ALIGN)
}

/// Places every tensor of `plan` in one arena: each file's path chosen, the free memory
/// checked, the tensors kept as they are copied up, then the others converted.
fn upload(backend: &Arc<CudaBackend>, plan: &LoadPlan<'_>) -> Result<Vec<CudaStorage>> {
    let uploads = backend.file_uploads(plan)?;
    // The device's context is current for the load; the caller's again when it returns.
    let current = backend.current()?;
    let items = plan.items();
    let layout = Layout::of(items)?;
    backend.check_free(layout.need()?)?;
    let arena = Arc::new(backend.arena(layout.out_total)?);
    let scratch = match layout.scratch_len {
        0 => None,
        n => Some(backend.arena(n)?),
    };
    // Dropped before the arenas on every exit.
    let guard = StreamGuard(backend);
    let transfers: Vec<Transfer<'_>> = items
        .iter()
        .zip(&layout.slots)
        .filter(|(i, _)| i.in_len() > 0 && i.conversion.is_none())
        .map(|(item, &out)| Transfer {
            tensor: item.name,
            file: item.file,
            src: item.span(),
            dst: arena.ptr() + out as u64,
        })
        .collect();
    copy_up(backend, &current, plan, &uploads, &transfers)?;
    if let Some(scratch) = &scratch {
        let batches = scratch_batches(&layout.converts, layout.scratch_len as u64, |c| {
            c.src.len() as u64 + 4
        });
        let kernels = backend.kernels()?;
        for (batch, offsets) in batches {
            let inputs: Vec<Transfer<'_>> = batch
                .iter()
                .zip(&offsets)
                .map(|(c, &at)| c.input(scratch.ptr() + at))
                .collect();
            copy_up(backend, &current, plan, &uploads, &inputs)?;
            backend.sync_all()?;
            for (c, t) in batch.iter().zip(&inputs) {
                let dst = arena.ptr() + c.out;
                kernels.launch(c.kernel, t.dst, dst, c.elements, backend.stream())?;
            }
            // The next batch's copies overwrite the scratch the kernels read.
            backend.sync_all()?;
        }
    }
    backend.sync_all()?;
    drop(guard);
    drop(scratch);
    Ok(items
        .iter()
        .zip(&layout.slots)
        .map(|(item, &out)| CudaStorage {
            backend: backend.clone(),
            arena: arena.clone(),
            offset: out,
            len: item.out_len,
        })
        .collect())
}

/// Copies `transfers` up, each file the way `uploads` says: long contiguous ones of registered
/// files from the registered mapping; short ones (which the staging ring coalesces into one
/// copy per run of neighbours, where each would be a copy of its own from the mapping), parts
/// of tensors (slices, splits), files that stage, and what registering refused through the
/// staging ring.
fn copy_up(
    backend: &CudaBackend,
    current: &Current,
    plan: &LoadPlan<'_>,
    uploads: &[(&HostFile<'_>, Upload)],
    transfers: &[Transfer<'_>],
) -> Result<()> {
    let mut rest = Vec::new();
    let mut registered = false;
    for (file, upload) in uploads {
        let (contiguous, staged): (Vec<Transfer<'_>>, Vec<Transfer<'_>>) = transfers
            .iter()
            .filter(|t| std::ptr::eq(t.file, *file))
            .cloned()
            .partition(|t| t.src.as_range().is_some_and(|r| r.len() >= LONG_RUN));
        match upload {
            Upload::Register if !contiguous.is_empty() => {
                let refused =
                    register::register_and_copy(backend, current, plan, file, &contiguous)?;
                registered |= refused.len() < contiguous.len();
                rest.extend(refused);
            }
            _ => rest.extend(contiguous),
        }
        rest.extend(staged);
    }
    // The report names the register path where any bytes took it.
    if registered {
        plan.note_upload(Upload::Register);
    } else if !rest.is_empty() {
        plan.note_upload(Upload::Staging);
    }
    if !rest.is_empty() {
        staging::stage_and_copy(backend, current, plan, &rest)?;
    }
    Ok(())
}
