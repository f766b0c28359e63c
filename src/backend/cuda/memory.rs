//! CUDA memory that the backend owns: device allocations ([`Arena`]), from the backend's
//! stream-ordered [`Pool`] where the device has pools, and page-locked host buffers
//! ([`Pinned`]), each freed exactly once on drop, in its own context ([`Current`]).

use std::sync::Arc;

use std::marker::PhantomData;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, result};

use super::driver_err;
use crate::error::{Error, ErrorKind, Result};

/// A context made current on this thread for a scope: pushed on the thread's context stack
/// (`cuCtxPushCurrent`) and popped when dropped (`cuCtxPopCurrent`), so that whatever context
/// the caller had current (torch's or candle's, perhaps on another GPU) is current again
/// afterwards. Pushing reads no error cudarc recorded on the context, so clean-up (frees,
/// unregistering) always runs in the right context. Tied to its thread.
pub struct Current {
    _thread: PhantomData<*const ()>,
}

impl Current {
    /// Makes `ctx` current until the guard drops.
    pub fn push(ctx: &CudaContext) -> Result<Current> {
        // SAFETY: `cu_ctx` is the context `ctx` keeps alive (retained by cudarc); pushing it
        // changes only this thread's context stack, popped once by Drop.
        unsafe { sys::cuCtxPushCurrent_v2(ctx.cu_ctx()) }
            .result()
            .map_err(|e| driver_err(ctx.ordinal(), "making the context current", e))?;
        Ok(Current {
            _thread: PhantomData,
        })
    }

    /// Makes `ctx` current again, in the pushed entry's place, after code that is not ours
    /// (a progress callback) may have changed the thread's current context.
    pub fn restore(&self, ctx: &CudaContext) -> Result<()> {
        let current = result::ctx::get_current()
            .map_err(|e| driver_err(ctx.ordinal(), "reading the current context", e))?;
        if current != Some(ctx.cu_ctx()) {
            // SAFETY: as in `push`; it replaces the top of this thread's stack, which Drop pops.
            unsafe { result::ctx::set_current(ctx.cu_ctx()) }
                .map_err(|e| driver_err(ctx.ordinal(), "making the context current", e))?;
        }
        Ok(())
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the entry `push` pushed (or what replaced it), restoring the caller's.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

/// A stream-ordered memory pool of one device (`cuMemPoolCreate`), kept by the backend for
/// the process's life: a load's arena comes from it (`cuMemAllocFromPoolAsync`) and goes
/// back to it when the last tensor drops, and the pool keeps that memory (its release
/// threshold is unbounded) for the next load, which then neither asks the driver for
/// memory nor maps it anew. [`trim`](Self::trim) gives what no tensor uses back to the
/// device. The pool is ours, not the device's default one, so other libraries' pools keep
/// their own settings.
pub struct Pool {
    ctx: Arc<CudaContext>,
    pool: sys::CUmemoryPool,
    /// Where arenas are allocated and freed.
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

// SAFETY: a pool handle may be used from any thread (the driver synchronizes its pools); the
// value owns the handle, destroyed once by Drop.
unsafe impl Send for Pool {}
// SAFETY: as above; `&Pool` only allocates, frees, trims and reads attributes.
unsafe impl Sync for Pool {}

impl Pool {
    /// Creates a pool of device memory on `stream`'s device that keeps what is freed.
    pub fn create(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Pool> {
        let ordinal = ctx.ordinal();
        let _current = Current::push(ctx)?;
        let id = i32::try_from(ordinal).map_err(|_| unavailable_ordinal(ordinal))?;
        // SAFETY: the struct is plain data (integers, a null pointer and padding); every
        // field the driver reads is set below, the rest zero as the documentation asks.
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = id;
        // SAFETY: `props` is a valid, initialized description; the context is current.
        let pool = unsafe { result::mem_pool::create(&props) }
            .map_err(|e| driver_err(ordinal, "cuMemPoolCreate", e))?;
        let pool = Pool {
            ctx: ctx.clone(),
            pool,
            stream: stream.clone(),
        };
        let mut keep = u64::MAX;
        // SAFETY: the pool is valid; RELEASE_THRESHOLD takes a u64 through the pointer.
        unsafe {
            result::mem_pool::set_attribute(
                pool.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&raw mut keep).cast(),
            )
        }
        .map_err(|e| driver_err(ordinal, "setting the pool's release threshold", e))?;
        Ok(pool)
    }

    /// The bytes the pool holds that no arena uses: memory a load can take besides what
    /// `cuMemGetInfo` calls free.
    pub fn unused(&self) -> usize {
        // Arenas freed on the pool's stream count once the stream reaches their frees.
        if let Ok(_current) = Current::push(&self.ctx) {
            let _ = self.stream.synchronize();
        }
        let read = |attr| {
            let mut value = 0u64;
            // SAFETY: the pool is valid; both attributes are u64s written through the pointer.
            unsafe { result::mem_pool::get_attribute(self.pool, attr, (&raw mut value).cast()) }
                .map(|()| value)
                .unwrap_or(0)
        };
        use sys::CUmemPool_attribute as A;
        let reserved = read(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
        let used = read(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT);
        usize::try_from(reserved.saturating_sub(used)).unwrap_or(usize::MAX)
    }

    /// Gives the memory no arena uses back to the device.
    pub fn trim(&self) -> Result<()> {
        let _current = Current::push(&self.ctx)?;
        // Frees queued on the pool's stream return their memory once the stream reaches them.
        self.stream
            .synchronize()
            .map_err(|e| driver_err(self.ctx.ordinal(), "synchronizing", e))?;
        // SAFETY: the pool is valid; trimming releases only memory no allocation holds.
        unsafe { result::mem_pool::trim_to(self.pool, 0) }
            .map_err(|e| driver_err(self.ctx.ordinal(), "cuMemPoolTrimTo", e))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _current = Current::push(&self.ctx);
        let _ = self.stream.synchronize();
        // SAFETY: the pool is valid and destroyed only here; every arena from it holds an
        // `Arc` of it, so none is left.
        let _ = unsafe { result::mem_pool::destroy(self.pool) };
    }
}

fn unavailable_ordinal(ordinal: usize) -> Error {
    Error::new(
        ErrorKind::DeviceUnavailable,
        format!("cuda:{ordinal}: ordinal too large"),
    )
}

/// A device allocation, freed on drop (given back to its pool, where it came from one).
#[derive(Debug)]
pub struct Arena {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
    pool: Option<Arc<Pool>>,
}

impl Arena {
    /// Allocates `len` bytes (at least one) on the context's device.
    pub fn alloc(ctx: &Arc<CudaContext>, len: usize) -> Result<Arena> {
        let ordinal = ctx.ordinal();
        let _current = Current::push(ctx)?;
        // SAFETY: the context is current on this thread; the pointer is freed exactly once, by Drop.
        let ptr = unsafe { result::malloc_sync(len.max(1)) }.map_err(|e| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("cuda:{ordinal}: allocating {len} bytes of device memory: {e}"),
            )
            .with_source(e)
        })?;
        Ok(Arena {
            ctx: ctx.clone(),
            ptr,
            pool: None,
        })
    }

    /// Allocates `len` bytes (at least one) from `pool`, ready for use on any stream when
    /// this returns.
    pub fn alloc_from(pool: &Arc<Pool>, len: usize) -> Result<Arena> {
        let ctx = &pool.ctx;
        let ordinal = ctx.ordinal();
        let _current = Current::push(ctx)?;
        let stream = pool.stream.cu_stream();
        // SAFETY: the pool and its stream are valid and the context current; the pointer is
        // given back exactly once, by Drop.
        let ptr = unsafe { result::mem_pool::alloc_async(pool.pool, len.max(1), stream) }.map_err(
            |e| {
                Error::new(
                    ErrorKind::OutOfMemory,
                    format!("cuda:{ordinal}: allocating {len} bytes from the pool: {e}"),
                )
                .with_source(e)
            },
        )?;
        let arena = Arena {
            ctx: ctx.clone(),
            ptr,
            pool: Some(pool.clone()),
        };
        // The allocation is ordered on the pool's stream: the copies run on others.
        pool.stream
            .synchronize()
            .map_err(|e| driver_err(ordinal, "synchronizing an allocation", e))?;
        Ok(arena)
    }

    /// The device address of the first byte.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// The context that owns the allocation.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let _current = Current::push(&self.ctx);
        match &self.pool {
            Some(pool) => {
                // Work the caller queued on the tensors (on any stream) ends first, as
                // `cuMemFree` would wait for it: the pool may hand the memory to the next
                // load as soon as its stream reaches the free.
                let _ = self.ctx.synchronize();
                // SAFETY: `ptr` came from this pool and is given back only here, after
                // every use of it completed (above).
                let _ = unsafe { result::free_async(self.ptr, pool.stream.cu_stream()) };
            }
            None => {
                // SAFETY: `ptr` came from `malloc_sync` on this context and is freed only
                // here; every copy or kernel that used it was synchronized before its owner
                // dropped it (the load's stream guard, or the synchronized load that handed
                // out its tensors), and `cuMemFree` waits for the rest.
                let _ = unsafe { result::free_sync(self.ptr) };
            }
        }
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, with the event of the last copy that
/// reads it: [`host_mut`](Self::host_mut) waits for that copy before lending the bytes, as
/// cudarc's `PinnedHostSlice` does.
pub struct Pinned {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    len: usize,
    last_copy: Option<CudaEvent>,
}

// SAFETY: the buffer is plain host memory owned by this value; access goes through `&mut self`
// after the last copy that reads it has completed (see `host_mut`).
unsafe impl Send for Pinned {}

impl Pinned {
    /// Allocates `len` bytes of page-locked host memory.
    pub fn alloc(ctx: &Arc<CudaContext>, len: usize) -> Result<Pinned> {
        let ordinal = ctx.ordinal();
        let _current = Current::push(ctx)?;
        // SAFETY: the context is current; the pointer is freed exactly once, by Drop.
        let ptr = unsafe { result::malloc_host(len.max(1), 0) }.map_err(|e| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("cuda:{ordinal}: allocating {len} bytes of pinned host memory: {e}"),
            )
            .with_source(e)
        })?;
        Ok(Pinned {
            ctx: ctx.clone(),
            ptr: ptr.cast(),
            len,
            last_copy: None,
        })
    }

    /// The bytes, writable, once the last copy reading them has completed.
    pub fn host_mut(&mut self) -> Result<&mut [u8]> {
        if let Some(e) = self.last_copy.take() {
            e.synchronize().map_err(|e| {
                driver_err(
                    self.ctx.ordinal(),
                    "waiting for a copy from pinned memory",
                    e,
                )
            })?;
        }
        // SAFETY: `ptr` points to `len` bytes we own; `&mut self` makes this the only view,
        // and no copy reads them any more (waited for above).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// [`host_mut`](Self::host_mut) for writers on other threads: the bytes, once the last
    /// copy reading them has completed, as a slice of no lifetime.
    ///
    /// # Safety
    /// The caller keeps this buffer alive, queues no copy from it and takes no other view of
    /// its bytes while the slice is in use.
    pub unsafe fn host_unbound<'x>(&mut self) -> Result<&'x mut [u8]> {
        let bytes = self.host_mut()?;
        // SAFETY: the same bytes `host_mut` lends, waited for; the caller keeps the contract
        // above in place of the borrow.
        Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr(), bytes.len()) })
    }

    /// The address of byte `offset`, for a copy queued on a stream. The caller must call
    /// [`copied_on`](Self::copied_on) after queuing its copies.
    pub fn device_source(&self, offset: usize) -> *const std::ffi::c_void {
        // SAFETY: callers pass offsets inside the buffer (at most `len`).
        unsafe { self.ptr.add(offset.min(self.len)) }.cast()
    }

    /// Records that copies reading this buffer were queued on `stream`.
    pub fn copied_on(&mut self, stream: &CudaStream) -> Result<()> {
        let ordinal = self.ctx.ordinal();
        let e =
            blocking_event(&self.ctx).map_err(|e| driver_err(ordinal, "creating an event", e))?;
        e.record(stream)
            .map_err(|e| driver_err(ordinal, "recording an event", e))?;
        self.last_copy = Some(e);
        Ok(())
    }
}

/// An event the host waits on by sleeping (`CU_EVENT_BLOCKING_SYNC`), not by spinning: while
/// the load waits for a buffer's copies, every core fills the next buffers, and a spinning
/// wait would take one of them. (cudarc's flags are an enum, so timing stays enabled: one
/// timestamp per record, nothing next to a copy.)
pub(crate) fn blocking_event(
    ctx: &Arc<CudaContext>,
) -> std::result::Result<CudaEvent, DriverError> {
    ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Pushed first: cudarc's event calls make the context current themselves.
        let _current = Current::push(&self.ctx);
        // A copy still reading the buffer must finish before it is freed.
        if let Some(e) = self.last_copy.take() {
            let _ = e.synchronize();
        }
        // SAFETY: `ptr` came from `malloc_host` and is freed only here, after its last copy.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}
