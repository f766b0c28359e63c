//! The conversion kernels of `shaders/` ([`KERNELS`]), their pipelines, and dispatches
//! cut to the device's binding and workgroup limits.

use std::num::NonZeroU64;

use wgpu::util::DeviceExt;

use super::{WgpuBackend, backend_err, pad4};
use crate::dtype::Conversion;
use crate::error::{Error, ErrorKind, Result};

/// Invocations per workgroup of every kernel.
const WORKGROUP: u32 = 64;

/// The shared binding layout and scalar conversions, prepended to every kernel.
pub const COMMON_WGSL: &str = include_str!("../../../shaders/common.wgsl");

/// A WGSL kernel of `shaders/` and the shape of its work.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// The conversion it performs.
    pub conversion: Conversion,
    /// Its file name in `shaders/`.
    pub file: &'static str,
    /// Its source (without `common.wgsl`).
    pub source: &'static str,
    /// Whether it needs `enable f16;` (SHADER_F16).
    pub needs_f16: bool,
    /// Input bytes per unit of work.
    pub in_bytes: u64,
    /// Output bytes per unit of work.
    pub out_bytes: u64,
    /// Elements per unit of work.
    pub elements: u64,
}

macro_rules! kernel {
    ($conv:ident, $file:literal, $f16:expr, $in:expr, $out:expr, $el:expr) => {
        Kernel {
            conversion: Conversion::$conv,
            file: $file,
            source: include_str!(concat!("../../../shaders/", $file)),
            needs_f16: $f16,
            in_bytes: $in,
            out_bytes: $out,
            elements: $el,
        }
    };
}

/// Every kernel of `shaders/`.
pub const KERNELS: [Kernel; 9] = [
    kernel!(Bf16ToF32, "bf16_to_f32.wgsl", false, 4, 8, 2),
    kernel!(F16ToF32, "f16_to_f32.wgsl", false, 4, 8, 2),
    kernel!(F16ToF32, "f16_to_f32_native.wgsl", true, 4, 8, 2),
    kernel!(F8E4m3ToF32, "f8_e4m3_to_f32.wgsl", false, 4, 16, 4),
    kernel!(F8E5m2ToF32, "f8_e5m2_to_f32.wgsl", false, 4, 16, 4),
    kernel!(F32ToF16, "f32_to_f16.wgsl", false, 8, 4, 2),
    kernel!(F32ToBf16, "f32_to_bf16.wgsl", false, 8, 4, 2),
    kernel!(Bf16ToF16, "bf16_to_f16.wgsl", false, 4, 4, 2),
    kernel!(F16ToBf16, "f16_to_bf16.wgsl", false, 4, 4, 2),
];

impl Kernel {
    /// The complete WGSL module: `enable f16;` where needed, common.wgsl, the kernel.
    pub fn module_source(&self) -> String {
        let enable = if self.needs_f16 { "enable f16;\n" } else { "" };
        format!("{enable}{COMMON_WGSL}\n{}", self.source)
    }

    /// The kernel for `conversion`, preferring the native-f16 one where `f16` is available.
    pub fn for_conversion(conversion: Conversion, f16: bool) -> Option<&'static Kernel> {
        let mut candidates = KERNELS.iter().filter(|k| k.conversion == conversion);
        let all: Vec<_> = candidates.by_ref().collect();
        all.iter()
            .find(|k| k.needs_f16 && f16)
            .or_else(|| all.iter().find(|k| !k.needs_f16))
            .copied()
    }
}

impl WgpuBackend {
    /// Whether the native-f16 kernel may be used: the adapter has SHADER_F16 and the kernel
    /// gave the CPU reference's bits for every one of the 65,536 F16 values when first
    /// asked (some drivers convert f16 wrongly: Mesa 22.3's lavapipe does).
    pub fn native_f16_verified(&self) -> bool {
        *self.native_f16.get_or_init(|| {
            let Some(kernel) = KERNELS.iter().find(|k| k.needs_f16) else {
                return false;
            };
            if !self.f16 {
                return false;
            }
            let input: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
            let mut want = vec![0u8; input.len() * 2];
            kernel.conversion.convert(&input, &mut want);
            self.run_kernel(kernel, &input).is_ok_and(|got| got == want)
        })
    }

    pub(super) fn kernel_for(&self, conversion: Conversion) -> Option<&'static Kernel> {
        let native = conversion == Conversion::F16ToF32 && self.native_f16_verified();
        Kernel::for_conversion(conversion, native)
    }

    fn pipeline(&self, kernel: &Kernel) -> Result<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(kernel.file) {
            return Ok(p.clone());
        }
        let p = self.scoped(&format!("compiling {}", kernel.file), || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.file),
                    source: wgpu::ShaderSource::Wgsl(kernel.module_source().into()),
                });
            Ok(self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.file),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                }))
        })?;
        cache.insert(kernel.file, p.clone());
        Ok(p)
    }

    /// Runs `kernel` over `units` units from `src` into `dst`, in chunks that fit the
    /// binding and dispatch limits.
    pub(super) fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        elements: u64,
    ) -> Result<()> {
        let pipeline = self.pipeline(kernel)?;
        let layout = pipeline.get_bind_group_layout(0);
        let units = elements.div_ceil(kernel.elements);
        let max_binding = self.limits.max_storage_buffer_binding_size;
        let per_dispatch =
            u64::from(self.limits.max_compute_workgroups_per_dimension) * u64::from(WORKGROUP);
        let chunk = (max_binding / kernel.in_bytes.max(kernel.out_bytes)).min(per_dispatch)
            / u64::from(WORKGROUP)
            * u64::from(WORKGROUP);
        if chunk == 0 {
            return Err(backend_err(
                "the device's binding limits are too small for a kernel",
            ));
        }
        let mut u0 = 0u64;
        while u0 < units {
            let n = chunk.min(units - u0);
            let el = (elements - u0 * kernel.elements).min(n * kernel.elements);
            let params = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("tensorplace params"),
                    contents: bytemuck::cast_slice(&[n as u32, el as u32, 0, 0]),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let bind = |buffer, per_unit| binding(buffer, u0 * per_unit, n * per_unit);
            let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.file),
                layout: &layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: bind(src, kernel.in_bytes),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: bind(dst, kernel.out_bytes),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: params.as_entire_binding(),
                    },
                ],
            });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.file),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(n.div_ceil(u64::from(WORKGROUP)) as u32, 1, 1);
            drop(pass);
            u0 += n;
        }
        Ok(())
    }

    /// Converts the bytes of a host buffer on the device (for tests and tools): uploads
    /// `input`, runs the kernel, reads the output back.
    pub fn convert(&self, conversion: Conversion, input: &[u8]) -> Result<Vec<u8>> {
        let kernel = self.kernel_for(conversion).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("no kernel for {conversion}"),
            )
        })?;
        self.run_kernel(kernel, input)
    }

    /// Runs one given kernel over a host buffer (see [`convert`](Self::convert)).
    pub fn run_kernel(&self, kernel: &Kernel, input: &[u8]) -> Result<Vec<u8>> {
        if kernel.needs_f16 && !self.f16 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the adapter lacks SHADER_F16",
            ));
        }
        let conversion = kernel.conversion;
        let elem = (conversion.from().bits() / 8) as u64;
        let elements = input.len() as u64 / elem;
        let out_len = conversion
            .output_len(input.len())
            .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "the conversion's output size"))?;
        let out = self.scoped("converting", || {
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC;
            let src = self.new_buffer("tensorplace convert in", pad4(input.len() as u64), usage);
            let mut padded = input.to_vec();
            padded.resize(pad4(input.len() as u64) as usize, 0);
            self.queue.write_buffer(&src, 0, &padded);
            let dst = self.new_buffer("tensorplace convert out", pad4(out_len as u64), usage);
            let mut enc = self.device.create_command_encoder(&Default::default());
            self.dispatch(&mut enc, kernel, &src, &dst, elements)?;
            let idx = self.queue.submit([enc.finish()]);
            self.wait(Some(idx))?;
            Ok(dst)
        })?;
        self.download(&out, out_len)
    }
}

/// The range `offset .. offset + size` of `buffer`, cut at the buffer's end.
fn binding(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: NonZeroU64::new(size.min(buffer.size().saturating_sub(offset))),
    })
}
