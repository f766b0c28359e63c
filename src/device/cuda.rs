//! The CUDA backend (cudarc, libcuda loaded at run time).
//!
//! One device allocation (an arena) per load; each tensor a view into it, its start
//! 256-byte aligned; the arena is freed when the last tensor is dropped. Before anything is
//! copied, the free device memory is checked against what the load needs.
//!
//! Two ways up the PCIe link, chosen per load:
//! - **register** (a memory-mapped file): the read-only shared mapping is page-locked in
//!   place with `cuMemHostRegister(READ_ONLY)`, chunk by chunk, and each chunk's tensors
//!   are copied from it with asynchronous copies spread over several streams, so that
//!   registering (and paging in) the next chunk overlaps the copies of the previous one.
//!   Private (copy-on-write) mappings are never registered: the host reader only makes
//!   shared ones, and caller-owned bytes take the other way.
//! - **staging** (`load(bytes)`, `ReadMode::Pread`, or where registering is unsupported or
//!   fails): a ring of pinned buffers, allocated once per device and reused, filled by
//!   reader threads (pread or copies from the mapping) while the copies of the buffers
//!   filled before are in flight on several streams.
//!
//! The choice is automatic (register where possible, as measured in DESIGN.md) and can be
//! forced with `TENSORPLACE_CUDA_UPLOAD=register|staging`.
//!
//! Dtype conversions run as the PTX kernels of `shaders/cuda/convert.ptx`, loaded through
//! the driver (no NVRTC), bit for bit equal to the CPU reference.

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, result};

use crate::device::{Backend, Device, LoadPlan};
use crate::dtype::Conversion;
use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;
use crate::parallel;
use crate::tensor::{Storage, Tensor};

/// Alignment of each tensor's start in the arena.
pub const ALIGN: usize = 256;
/// Streams the copies are spread over.
const STREAMS: usize = 4;
/// Size of one registered chunk of the mapping.
const REGISTER_CHUNK: usize = 512 << 20;
/// Pinned staging buffers in the ring, and the size of each.
const RING: usize = 4;
const STAGING: usize = 64 << 20;
/// Threads filling one staging buffer.
const READERS: usize = 8;

/// The PTX of the conversion kernels (see `shaders/cuda/convert.cl`).
pub const CONVERT_PTX: &str = include_str!("../../shaders/cuda/convert.ptx");

/// How the tensors go up the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadPath {
    /// Page-lock the mapped file in place and copy from it.
    Register,
    /// Copy through a ring of pinned staging buffers.
    Staging,
}

fn driver_err(ordinal: usize, what: &str, e: DriverError) -> Error {
    Error::new(ErrorKind::Backend, format!("cuda:{ordinal}: {what}: {e}")).with_source(e)
}

fn unavailable(ordinal: usize, why: &str) -> Error {
    Error::new(
        ErrorKind::DeviceUnavailable,
        format!("cuda:{ordinal}: {why}"),
    )
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from an old driver, say) into an error.
fn guarded<T>(ordinal: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(unavailable(
            ordinal,
            "the CUDA driver panicked (a driver too old for CUDA 11?)",
        ))
    })
}

/// Whether libcuda can be loaded; probing never panics.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the library names and drops the
    // handles; it touches no state of ours.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// The number of CUDA devices, or why there are none.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::new(
            ErrorKind::DeviceUnavailable,
            "libcuda not found (no NVIDIA driver)",
        ));
    }
    guarded(0, || {
        let n = CudaContext::device_count().map_err(|e| {
            Error::new(
                ErrorKind::DeviceUnavailable,
                format!("cuInit or cuDeviceGetCount failed: {e}"),
            )
        })?;
        Ok(usize::try_from(n).unwrap_or(0))
    })
}

/// One line per CUDA device.
pub fn list() -> Result<Vec<String>> {
    let n = device_count()?;
    if n == 0 {
        return Err(Error::new(ErrorKind::DeviceUnavailable, "no CUDA device"));
    }
    (0..n)
        .map(|i| {
            let b = CudaBackend::open(i)?;
            let (free, total) = guarded(i, || {
                b.ctx
                    .mem_get_info()
                    .map_err(|e| driver_err(i, "cuMemGetInfo", e))
            })?;
            Ok(format!(
                "cuda:{i}: {} (driver {}), {} of {} bytes free, read-only host register {}",
                b.name,
                b.driver_version,
                free,
                total,
                if b.register_supported { "yes" } else { "no" }
            ))
        })
        .collect()
}

/// A device allocation, freed on drop.
#[derive(Debug)]
struct Arena {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
}

impl Arena {
    fn alloc(ctx: &Arc<CudaContext>, size: usize) -> Result<Arena> {
        let ordinal = ctx.ordinal();
        ctx.bind_to_thread()
            .map_err(|e| driver_err(ordinal, "binding the context", e))?;
        // SAFETY: the context is bound to this thread; the pointer is freed exactly once, by Drop.
        let ptr = unsafe { result::malloc_sync(size.max(1)) }.map_err(|e| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("cuda:{ordinal}: allocating {size} bytes: {e}"),
            )
        })?;
        Ok(Arena {
            ctx: ctx.clone(),
            ptr,
        })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `malloc_sync` on this context and is freed only here; every
        // copy or kernel that used it was synchronized before its tensors were handed out.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, freed on drop.
struct Pinned {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain host memory owned by this value; access goes through `&mut self`
// (or happens in the driver's copies, which are synchronized before the buffer is reused).
unsafe impl Send for Pinned {}

impl Pinned {
    fn alloc(ctx: &Arc<CudaContext>, len: usize) -> Result<Pinned> {
        let ordinal = ctx.ordinal();
        ctx.bind_to_thread()
            .map_err(|e| driver_err(ordinal, "binding the context", e))?;
        // SAFETY: the context is bound; the pointer is freed exactly once, by Drop.
        let ptr = unsafe { result::malloc_host(len, 0) }.map_err(|e| {
            driver_err(
                ordinal,
                &format!("allocating {len} bytes of pinned memory"),
                e,
            )
        })?;
        Ok(Pinned {
            ctx: ctx.clone(),
            ptr: ptr.cast(),
            len,
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` bytes we own; `&mut self` makes this the only view,
        // and callers synchronize the buffer's last copy before writing it again.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `malloc_host` and is freed only here.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

/// The staging ring: pinned buffers and the event of each one's last copy.
struct Ring {
    buffers: Vec<(Pinned, Option<CudaEvent>)>,
}

/// The loaded conversion kernels.
struct Kernels {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    functions: HashMap<Conversion, sys::CUfunction>,
}

// SAFETY: module and function handles are context-wide and may be used from any thread that
// binds the context, which every use here does first.
unsafe impl Send for Kernels {}
// SAFETY: as above; the handles are never mutated after loading.
unsafe impl Sync for Kernels {}

impl Drop for Kernels {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the module was loaded by `load_kernels` and is unloaded only here.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

/// Elements per unit of a kernel (see the header of `convert.cl`).
fn elements_per_unit(c: Conversion) -> u64 {
    match c {
        Conversion::F8E4m3ToF32 | Conversion::F8E5m2ToF32 => 4,
        _ => 2,
    }
}

/// A CUDA device: its context, streams, staging ring and kernels.
pub struct CudaBackend {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    name: String,
    driver_version: i32,
    register_supported: bool,
    streams: Vec<Arc<CudaStream>>,
    ring: Mutex<Option<Ring>>,
    kernels: OnceLock<std::result::Result<Kernels, String>>,
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
        static OPEN: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
        let open = OPEN.get_or_init(Default::default);
        let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = open.get(&ordinal) {
            return Ok(b.clone());
        }
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
        let b = Arc::new(guarded(ordinal, || CudaBackend::create(ordinal))?);
        open.insert(ordinal, b.clone());
        Ok(b)
    }

    fn create(ordinal: usize) -> Result<CudaBackend> {
        let mut version = 0i32;
        // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| unavailable(ordinal, &format!("cuDriverGetVersion: {e}")))?;
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
        let streams = (0..STREAMS)
            .map(|_| {
                ctx.new_stream()
                    .map_err(|e| driver_err(ordinal, "creating a stream", e))
            })
            .collect::<Result<_>>()?;
        Ok(CudaBackend {
            ordinal,
            ctx,
            name,
            driver_version: version,
            register_supported,
            streams,
            ring: Mutex::new(None),
            kernels: OnceLock::new(),
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

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err(self.ordinal, "binding the context", e))
    }

    fn sync_all(&self) -> Result<()> {
        for s in &self.streams {
            s.synchronize()
                .map_err(|e| driver_err(self.ordinal, "synchronizing a stream", e))?;
        }
        Ok(())
    }

    /// The path a load of `file` takes.
    pub fn upload_path(&self, file: &HostFile<'_>) -> UploadPath {
        match std::env::var("TENSORPLACE_CUDA_UPLOAD").as_deref() {
            Ok("staging") => return UploadPath::Staging,
            Ok("register") if file.mapping().is_some() => return UploadPath::Register,
            _ => {}
        }
        // Registering faults cold pages in one readahead at a time: cold files go through
        // the staging ring, read with pread by several threads.
        if file.mapping().is_some() && self.register_supported && !file.is_cold() {
            UploadPath::Register
        } else {
            UploadPath::Staging
        }
    }

    fn kernels(&self) -> Result<&Kernels> {
        let k = self.kernels.get_or_init(|| {
            self.bind().map_err(|e| e.to_string())?;
            let ptx = CString::new(CONVERT_PTX).map_err(|e| e.to_string())?;
            // SAFETY: `ptx` is a NUL-terminated PTX image that outlives the call.
            let module = unsafe { result::module::load_data(ptx.as_ptr().cast()) }
                .map_err(|e| format!("loading the conversion PTX: {e}"))?;
            let mut kernels = Kernels {
                ctx: self.ctx.clone(),
                module,
                functions: HashMap::new(),
            };
            for c in Conversion::ALL {
                let name = CString::new(c.kernel_name()).map_err(|e| e.to_string())?;
                // SAFETY: the module is loaded and not yet unloaded.
                let f = unsafe { result::module::get_function(module, name) }
                    .map_err(|e| format!("finding kernel {}: {e}", c.kernel_name()))?;
                kernels.functions.insert(c, f);
            }
            Ok(kernels)
        });
        k.as_ref()
            .map_err(|e| Error::new(ErrorKind::Backend, format!("cuda:{}: {e}", self.ordinal)))
    }

    /// Converts `elements` elements at device address `src` into `dst` on stream 0.
    fn launch(
        &self,
        c: Conversion,
        src: CUdeviceptr,
        dst: CUdeviceptr,
        elements: u64,
    ) -> Result<()> {
        let kernels = self.kernels()?;
        let f = *kernels
            .functions
            .get(&c)
            .ok_or_else(|| Error::new(ErrorKind::Unsupported, format!("no kernel for {c}")))?;
        let mut units = elements.div_ceil(elements_per_unit(c));
        let mut elements = elements;
        let (mut src, mut dst) = (src, dst);
        let blocks = units.div_ceil(256).clamp(1, 1 << 20) as u32;
        let mut params: [*mut c_void; 4] = [
            (&mut src as *mut CUdeviceptr).cast(),
            (&mut dst as *mut CUdeviceptr).cast(),
            (&mut units as *mut u64).cast(),
            (&mut elements as *mut u64).cast(),
        ];
        // SAFETY: the kernel takes (const uint*, uint*, ulong, ulong), which `params` points
        // to; src and dst are device allocations of this context holding `units` input words
        // and the padded output; all four values outlive the launch call, which copies them.
        unsafe {
            result::launch_kernel(
                f,
                (blocks, 1, 1),
                (256, 1, 1),
                0,
                self.streams[0].cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| driver_err(self.ordinal, &format!("launching {}", c.kernel_name()), e))
    }

    /// Converts a host buffer on the device (for tests and tools).
    pub fn convert(&self, c: Conversion, input: &[u8]) -> Result<Vec<u8>> {
        self.bind()?;
        let elements = (input.len() / (c.from().bits() / 8)) as u64;
        let out_len = c.output_len(input.len()).unwrap_or(0);
        let src = Arena::alloc(&self.ctx, input.len().next_multiple_of(4))?;
        let dst = Arena::alloc(&self.ctx, out_len.next_multiple_of(4) + 4)?;
        // SAFETY: `src` holds at least input.len() bytes; the copy is synchronous.
        unsafe { result::memcpy_htod_sync(src.ptr, input) }
            .map_err(|e| driver_err(self.ordinal, "copying", e))?;
        self.launch(c, src.ptr, dst.ptr, elements)?;
        self.sync_all()?;
        let mut out = vec![0u8; out_len];
        // SAFETY: `dst` holds at least out_len bytes, written by the synchronized kernel.
        unsafe { result::memcpy_dtoh_sync(&mut out, dst.ptr) }
            .map_err(|e| driver_err(self.ordinal, "copying back", e))?;
        Ok(out)
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
        self.arena.ptr + self.offset as u64
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
        &self.arena.ctx
    }

    /// Copies the bytes back to the host.
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        if self.len == 0 {
            return Ok(out);
        }
        self.backend.bind()?;
        // SAFETY: the arena holds offset + len bytes, written by a synchronized load.
        unsafe { result::memcpy_dtoh_sync(&mut out, self.device_ptr()) }
            .map_err(|e| driver_err(self.backend.ordinal, "copying a tensor back", e))?;
        Ok(out)
    }
}

/// One copy: file bytes `src` to device address `dst`.
#[derive(Debug, Clone)]
struct Copy {
    src: Range<usize>,
    dst: CUdeviceptr,
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.name)
    }

    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>> {
        let this = CudaBackend::open(self.ordinal)?;
        guarded(self.ordinal, || upload(&this, plan)).map_err(|e| plan.err(e))
    }
}

fn upload(backend: &Arc<CudaBackend>, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>> {
    let ordinal = backend.ordinal;
    backend.bind()?;
    let items = plan.items();
    let overflow = || Error::new(ErrorKind::OutOfMemory, "the load's size overflows");
    let (mut out_total, mut raw_total) = (0usize, 0usize);
    let mut layout = Vec::with_capacity(items.len());
    for item in items {
        let out = out_total;
        // Room for the kernels' 4-byte padding, then the next start aligned.
        out_total = out_total
            .checked_add(item.out_len + 4)
            .ok_or_else(overflow)?
            .next_multiple_of(ALIGN);
        let raw = item.conversion.map(|_| raw_total);
        if item.conversion.is_some() {
            raw_total = raw_total
                .checked_add(item.src.len() + 4)
                .ok_or_else(overflow)?
                .next_multiple_of(ALIGN);
        }
        layout.push((out, raw));
    }
    let need = out_total + raw_total;
    let (free, _) = backend
        .ctx
        .mem_get_info()
        .map_err(|e| driver_err(ordinal, "cuMemGetInfo", e))?;
    if need > free {
        return Err(Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "cuda:{ordinal}: the load needs {need} bytes of device memory, {free} are free"
            ),
        ));
    }
    let arena = Arc::new(Arena::alloc(&backend.ctx, out_total)?);
    let raw = if raw_total > 0 {
        Some(Arena::alloc(&backend.ctx, raw_total)?)
    } else {
        None
    };
    let copies: Vec<Copy> = items
        .iter()
        .zip(&layout)
        .filter(|(i, _)| !i.src.is_empty())
        .map(|(item, &(out, raw_off))| Copy {
            src: item.src.clone(),
            dst: match (raw_off, &raw) {
                (Some(r), Some(raw)) => raw.ptr + r as u64,
                _ => arena.ptr + out as u64,
            },
        })
        .collect();
    let rest = match backend.upload_path(plan.file()) {
        UploadPath::Register => register_and_copy(backend, plan, &copies)?,
        UploadPath::Staging => copies,
    };
    if !rest.is_empty() {
        stage_and_copy(backend, plan, &rest)?;
    }
    backend.sync_all()?;
    for (item, &(out, raw_off)) in items.iter().zip(&layout) {
        if let (Some(c), Some(r), Some(raw)) = (item.conversion, raw_off, &raw) {
            let elements = (item.src.len() / (item.info.dtype.bits() / 8)) as u64;
            if elements > 0 {
                backend.launch(c, raw.ptr + r as u64, arena.ptr + out as u64, elements)?;
            }
        }
    }
    backend.sync_all()?;
    drop(raw);
    plan.report(plan.input_bytes());
    Ok(items
        .iter()
        .zip(&layout)
        .map(|(item, &(out, _))| {
            let storage = CudaStorage {
                backend: backend.clone(),
                arena: arena.clone(),
                offset: out,
                len: item.out_len,
            };
            Tensor::from_parts(
                item.out_dtype,
                item.info.shape.clone(),
                Storage::Cuda(storage),
            )
        })
        .collect())
}

/// Registered chunks of the mapping; on drop, waits for every copy and unregisters them.
struct Registered<'a> {
    backend: &'a CudaBackend,
    chunks: Vec<*mut c_void>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let _ = self.backend.bind();
        // Copies from the chunks must finish before the pages are unlocked.
        let _ = self.backend.sync_all();
        for &p in &self.chunks {
            // SAFETY: `p` was registered by `cuMemHostRegister` and is unregistered once,
            // after every copy from it has completed (synchronized above).
            let _ = unsafe { sys::cuMemHostUnregister(p) }.result();
        }
    }
}

/// Registers the mapping chunk by chunk and copies each chunk's pieces from it. Returns the
/// copies it could not do (those from the first chunk whose registration failed onward).
fn register_and_copy(
    backend: &CudaBackend,
    plan: &LoadPlan<'_>,
    copies: &[Copy],
) -> Result<Vec<Copy>> {
    let Some(map) = plan.file().mapping() else {
        return Ok(copies.to_vec());
    };
    let base = map.as_ptr() as usize;
    let page = page_size();
    let mapped_len = map.len().next_multiple_of(page);
    // Split every copy at chunk boundaries (chunk k covers [k*C, (k+1)*C) of the mapping).
    let mut by_chunk: Vec<Vec<Copy>> = Vec::new();
    for c in copies {
        let mut at = c.src.start;
        while at < c.src.end {
            let k = at / REGISTER_CHUNK;
            let end = c.src.end.min((k + 1) * REGISTER_CHUNK);
            if by_chunk.len() <= k {
                by_chunk.resize(k + 1, Vec::new());
            }
            by_chunk[k].push(Copy {
                src: at..end,
                dst: c.dst + (at - c.src.start) as u64,
            });
            at = end;
        }
    }
    let mut registered = Registered {
        backend,
        chunks: Vec::new(),
    };
    let mut done = 0u64;
    for (k, chunk) in by_chunk.iter().enumerate() {
        if chunk.is_empty() {
            continue;
        }
        let start = chunk[0].src.start / page * page;
        let end = chunk
            .iter()
            .map(|c| c.src.end)
            .max()
            .unwrap_or(start)
            .next_multiple_of(page)
            .min(mapped_len);
        let ptr = (base + start) as *mut c_void;
        // SAFETY: [ptr, ptr + len) lies inside our read-only MAP_SHARED mapping (rounded to
        // whole pages, which the mapping covers), which outlives this function; READ_ONLY
        // matches its protection. It is unregistered by `registered` before returning.
        let rc = unsafe {
            sys::cuMemHostRegister_v2(ptr, end - start, sys::CU_MEMHOSTREGISTER_READ_ONLY)
        };
        if rc.result().is_err() {
            // Not supported here (or out of lockable memory): stage the rest.
            return Ok(by_chunk[k..].iter().flatten().cloned().collect());
        }
        registered.chunks.push(ptr);
        let stream = &backend.streams[k % STREAMS];
        for c in chunk {
            let src = (base + c.src.start) as *const c_void;
            // SAFETY: the source lies in the registered chunk, which stays registered and
            // mapped until every stream is synchronized (Registered's drop); the destination
            // lies inside an arena allocation of at least that size.
            unsafe { sys::cuMemcpyHtoDAsync_v2(c.dst, src, c.src.len(), stream.cu_stream()) }
                .result()
                .map_err(|e| driver_err(backend.ordinal, "copying to the device", e))?;
            done += c.src.len() as u64;
        }
        plan.report(done);
    }
    drop(registered);
    Ok(Vec::new())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Copies through the ring of pinned staging buffers, filled by reader threads.
fn stage_and_copy(backend: &CudaBackend, plan: &LoadPlan<'_>, copies: &[Copy]) -> Result<()> {
    let mut guard = backend.ring.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        let buffers = (0..RING)
            .map(|_| Ok((Pinned::alloc(&backend.ctx, STAGING)?, None)))
            .collect::<Result<_>>()?;
        *guard = Some(Ring { buffers });
    }
    let ring = guard
        .as_mut()
        .ok_or_else(|| Error::new(ErrorKind::Backend, "no staging ring"))?;
    // Pieces of at most one buffer, grouped into batches that fill one buffer each.
    let mut pieces = Vec::new();
    for c in copies {
        let mut at = c.src.start;
        while at < c.src.end {
            let end = c.src.end.min(at + STAGING);
            pieces.push(Copy {
                src: at..end,
                dst: c.dst + (at - c.src.start) as u64,
            });
            at = end;
        }
    }
    let file = plan.file();
    let cold = file.mapping().is_none() || file.is_cold();
    let mut done = 0u64;
    let mut start = 0usize;
    let mut batch_no = 0usize;
    while start < pieces.len() {
        let mut end = start;
        let mut used = 0usize;
        let mut offsets = Vec::new();
        while end < pieces.len() && (end == start || used + pieces[end].src.len() <= STAGING) {
            offsets.push(used);
            used = (used + pieces[end].src.len()).next_multiple_of(ALIGN);
            end += 1;
        }
        let slot = batch_no % RING;
        let stream = &backend.streams[slot % STREAMS];
        let (buffer, event) = &mut ring.buffers[slot];
        if let Some(e) = event.take() {
            e.synchronize()
                .map_err(|e| driver_err(backend.ordinal, "waiting for a staging copy", e))?;
        }
        fill(
            file,
            cold,
            &pieces[start..end],
            &offsets,
            buffer.as_mut_slice(),
        )?;
        for (p, &off) in pieces[start..end].iter().zip(&offsets) {
            // SAFETY: the source is `len` bytes of the pinned buffer, which is not written
            // again before this copy's event completes; the destination is inside an arena.
            let src = unsafe { buffer.ptr.add(off) } as *const c_void;
            unsafe { sys::cuMemcpyHtoDAsync_v2(p.dst, src, p.src.len(), stream.cu_stream()) }
                .result()
                .map_err(|e| driver_err(backend.ordinal, "copying to the device", e))?;
            done += p.src.len() as u64;
        }
        let e = backend
            .ctx
            .new_event(None)
            .map_err(|e| driver_err(backend.ordinal, "creating an event", e))?;
        e.record(stream)
            .map_err(|e| driver_err(backend.ordinal, "recording an event", e))?;
        *event = Some(e);
        plan.report(done);
        start = end;
        batch_no += 1;
    }
    backend.sync_all()
}

/// Reads the pieces' file bytes into `buf` at `offsets`, with up to READERS threads.
fn fill(
    file: &HostFile<'_>,
    cold: bool,
    pieces: &[Copy],
    offsets: &[usize],
    buf: &mut [u8],
) -> Result<()> {
    let mut jobs: Vec<(usize, &mut [u8])> = Vec::new();
    let mut rest = buf;
    let mut at = 0usize;
    for (p, &off) in pieces.iter().zip(offsets) {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
        let (mut dst, tail) = tail.split_at_mut(p.src.len());
        rest = tail;
        at = off + p.src.len();
        // Split big pieces so that every reader has work.
        let mut src = p.src.start;
        while !dst.is_empty() {
            let n = dst.len().min(4 << 20);
            let (d, t) = std::mem::take(&mut dst).split_at_mut(n);
            jobs.push((src, d));
            dst = t;
            src += n;
        }
    }
    parallel::for_each(jobs, READERS, |(src, dst), _| {
        if cold {
            file.read_at_direct(src, dst)
        } else {
            file.read_at(src, dst)
        }
    })
}

/// The harness's CUDA group: our load, the per-tensor path every peer uses (allocate and
/// copy each tensor from the mapping, as candle does), and one pinned-host-to-device copy of
/// the same size (the ceiling). Each run ends synchronized, its device memory freed.
#[cfg(feature = "cli")]
pub fn bench_group<'a>(
    ordinal: usize,
    path: &'a std::path::Path,
) -> Result<crate::bench::Group<'a>> {
    use crate::bench::{BenchPath, Group, Role};
    let backend = CudaBackend::open(ordinal)?;
    let file = HostFile::open(path, crate::host::ReadMode::Mmap)?;
    let bytes = file.header().data_len();
    let mut pinned = Pinned::alloc(&backend.ctx, bytes.max(1))?;
    if let Some(data) = file.data() {
        pinned.as_mut_slice()[..data.len()].copy_from_slice(data);
    }
    let device_buf = Arena::alloc(&backend.ctx, bytes.max(1))?;
    let (b1, b2) = (backend.clone(), backend.clone());
    let device = Device::Cuda(ordinal);
    Ok(Group {
        device: device.to_string(),
        paths: vec![
            BenchPath::new(
                &format!("tensorplace load_file ({:?})", backend.upload_path(&file)).to_lowercase(),
                Role::Ours,
                move || {
                    let t = crate::load_file(path, device)?;
                    drop(t);
                    Ok(())
                },
            ),
            BenchPath::new(
                "per-tensor clone_htod from the mmap",
                Role::Baseline,
                move || {
                    let stream = b1.stream().clone();
                    let mut keep = Vec::with_capacity(file.header().tensors().len());
                    for (_, info) in file.tensors() {
                        let bytes = file.tensor_bytes(info).unwrap_or_default();
                        if !bytes.is_empty() {
                            keep.push(
                                stream
                                    .clone_htod(bytes)
                                    .map_err(|e| driver_err(ordinal, "clone_htod", e))?,
                            );
                        }
                    }
                    stream
                        .synchronize()
                        .map_err(|e| driver_err(ordinal, "synchronizing", e))?;
                    drop(keep);
                    Ok(())
                },
            ),
            BenchPath::new(
                "one pinned host-to-device copy (ceiling)",
                Role::Ceiling,
                move || {
                    b2.bind()?;
                    let stream = b2.stream();
                    // SAFETY: both buffers hold `bytes` bytes and outlive the synchronized copy.
                    unsafe {
                        sys::cuMemcpyHtoDAsync_v2(
                            device_buf.ptr,
                            pinned.ptr as *const c_void,
                            bytes,
                            stream.cu_stream(),
                        )
                    }
                    .result()
                    .map_err(|e| driver_err(ordinal, "copying", e))?;
                    stream
                        .synchronize()
                        .map_err(|e| driver_err(ordinal, "synchronizing", e))
                },
            ),
        ],
        pairs: vec![],
    })
}
