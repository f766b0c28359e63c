//! The dtype conversion kernels: the PTX of `shaders/cuda/convert.ptx` (compiled from
//! `convert.cl`, see `build.sh` there), loaded through the driver (no NVRTC) and launched on
//! the stream that holds their input, bit for bit equal to the CPU reference.

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaStream, result};

use super::driver_err;
use super::memory::{Arena, Current};
use crate::convert::Conversion;
use crate::error::{Error, ErrorKind, Result};

/// The PTX of the conversion kernels (see `shaders/cuda/convert.cl`).
pub const CONVERT_PTX: &str = include_str!("../../../shaders/cuda/convert.ptx");

/// Bytes of the JIT compiler's error log kept for an error message.
const JIT_LOG: usize = 16 << 10;

/// The loaded module and its functions, one per conversion.
pub(crate) struct Kernels {
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
        let _current = Current::push(&self.ctx);
        // SAFETY: the module was loaded by `Kernels::load` and is unloaded only here.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

impl Kernels {
    /// Loads the PTX on `ctx` with `cuModuleLoadDataEx`; a failure carries the JIT log.
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let ordinal = ctx.ordinal();
        let fail = |what: String| Error::new(ErrorKind::Backend, format!("cuda:{ordinal}: {what}"));
        let _current = Current::push(ctx)?;
        let ptx = CString::new(CONVERT_PTX).map_err(|e| fail(e.to_string()))?;
        let mut log = vec![0u8; JIT_LOG];
        let mut options = [
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        ];
        let mut values: [*mut c_void; 2] = [log.as_mut_ptr().cast(), JIT_LOG as *mut c_void];
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: `ptx` is a NUL-terminated PTX image; the options name a log buffer of
        // JIT_LOG bytes (passed by value as the driver expects) that outlives the call;
        // `module` receives the handle.
        let rc = unsafe {
            sys::cuModuleLoadDataEx(
                &mut module,
                ptx.as_ptr().cast(),
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if let Err(e) = rc.result() {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let log = String::from_utf8_lossy(&log[..end]);
            return Err(fail(format!(
                "loading the conversion PTX: {e}; JIT log: {}",
                log.trim()
            ))
            .with_source(e));
        }
        let mut kernels = Kernels {
            ctx: ctx.clone(),
            module,
            functions: HashMap::new(),
        };
        for c in Conversion::with_kernels() {
            let name = CString::new(c.kernel_name()).map_err(|e| fail(e.to_string()))?;
            // SAFETY: the module is loaded and not yet unloaded (it is owned by `kernels`).
            let f = unsafe { result::module::get_function(module, name) }.map_err(|e| {
                driver_err(ordinal, &format!("finding kernel {}", c.kernel_name()), e)
            })?;
            kernels.functions.insert(c, f);
        }
        Ok(kernels)
    }

    /// Queues the conversion of `elements` elements at `src` into `dst` on `stream`.
    ///
    /// `src` must hold the input padded to 4 bytes and `dst` the output padded to 4 bytes,
    /// both allocations of this context that live until the stream has run the kernel.
    pub(crate) fn launch(
        &self,
        c: Conversion,
        src: CUdeviceptr,
        dst: CUdeviceptr,
        elements: u64,
        stream: &CudaStream,
    ) -> Result<()> {
        let ordinal = self.ctx.ordinal();
        let f = *self
            .functions
            .get(&c)
            .ok_or_else(|| Error::new(ErrorKind::Unsupported, format!("no kernel for {c}")))?;
        let mut units = elements.div_ceil(c.elements_per_unit());
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
        // and the padded output (the caller's contract); all four values outlive the launch
        // call, which copies them.
        unsafe {
            result::launch_kernel(
                f,
                (blocks, 1, 1),
                (256, 1, 1),
                0,
                stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| driver_err(ordinal, &format!("launching {}", c.kernel_name()), e))
    }

    /// Converts a host buffer on the device: the input copied, converted and copied back on
    /// `stream`, in order (for tests and tools).
    pub(crate) fn convert(
        &self,
        c: Conversion,
        input: &[u8],
        stream: &CudaStream,
    ) -> Result<Vec<u8>> {
        let ordinal = self.ctx.ordinal();
        let elements = (input.len() / (c.from().bits() / 8)) as u64;
        let out_len = c
            .output_len(input.len())
            .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "the conversion's output size"))?;
        let src = Arena::alloc(&self.ctx, input.len().next_multiple_of(4))?;
        let dst = Arena::alloc(&self.ctx, out_len.next_multiple_of(4) + 4)?;
        // SAFETY: `src` holds at least input.len() bytes; `input` outlives the copy, which is
        // synchronized below before returning.
        unsafe { result::memcpy_htod_async(src.ptr(), input, stream.cu_stream()) }
            .map_err(|e| driver_err(ordinal, "copying to the device", e))?;
        self.launch(c, src.ptr(), dst.ptr(), elements, stream)?;
        let mut out = vec![0u8; out_len];
        // SAFETY: `dst` holds at least out_len bytes, written by the kernel queued before on
        // the same stream; `out` outlives the copy, synchronized below.
        unsafe { result::memcpy_dtoh_async(&mut out, dst.ptr(), stream.cu_stream()) }
            .map_err(|e| driver_err(ordinal, "copying back", e))?;
        stream
            .synchronize()
            .map_err(|e| driver_err(ordinal, "synchronizing", e))?;
        Ok(out)
    }
}
