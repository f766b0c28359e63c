//! The conversion kernels of `shaders/` ([`Kernel::all`]), their pipelines, and dispatches
//! cut to the device's binding and workgroup limits.

use std::num::NonZeroU64;

use wgpu::util::DeviceExt;

use super::{WgpuBackend, backend_err, pad4};
use crate::convert::Conversion;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};

/// Invocations per workgroup of every kernel.
const WORKGROUP: u32 = 64;

/// The shared binding layout, prepended to every kernel.
pub const COMMON_WGSL: &str = include_str!("../../../shaders/common.wgsl");
/// The scalar conversions, prepended to every kernel after [`COMMON_WGSL`].
pub const CODEC_WGSL: &str = include_str!("../../../shaders/codec.wgsl");
const CONVERT_WGSL: &str = include_str!("../../../shaders/convert.wgsl");
const NATIVE_WGSL: &str = include_str!("../../../shaders/f16_to_f32_native.wgsl");

/// A WGSL kernel of `shaders/` for one conversion, and the shape of its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The conversion it performs.
    pub conversion: Conversion,
    /// Whether it is `f16_to_f32_native.wgsl`, which needs `enable f16;` (SHADER_F16);
    /// every other kernel is `convert.wgsl`.
    pub needs_f16: bool,
}

impl Kernel {
    /// The kernels of every conversion: `convert.wgsl` for each, and the native F16 to F32.
    pub fn all() -> Vec<Kernel> {
        let mut all: Vec<Kernel> = Conversion::with_kernels()
            .map(|conversion| Kernel {
                conversion,
                needs_f16: false,
            })
            .collect();
        if let Some(conversion) = Conversion::between(Dtype::F16, Dtype::F32) {
            all.push(Kernel {
                conversion,
                needs_f16: true,
            });
        }
        all
    }

    /// The file it comes from in `shaders/`.
    pub fn file(&self) -> &'static str {
        if self.needs_f16 {
            "f16_to_f32_native.wgsl"
        } else {
            "convert.wgsl"
        }
    }

    /// A label: the file and the conversion.
    pub fn label(&self) -> String {
        format!("{} ({})", self.file(), self.conversion)
    }

    /// Input bytes per unit of work.
    pub fn in_bytes(&self) -> u64 {
        self.elements() * (self.conversion.from().bits() / 8) as u64
    }

    /// Output bytes per unit of work.
    pub fn out_bytes(&self) -> u64 {
        self.elements() * (self.conversion.to().bits() / 8) as u64
    }

    /// Elements per unit of work.
    pub fn elements(&self) -> u64 {
        self.conversion.elements_per_unit()
    }

    /// The complete WGSL module: `enable f16;` where needed, common.wgsl, codec.wgsl, the
    /// conversion's constants, the kernel.
    pub fn module_source(&self) -> String {
        if self.needs_f16 {
            return format!("enable f16;\n{COMMON_WGSL}\n{CODEC_WGSL}\n{NATIVE_WGSL}");
        }
        let (from, to) = self.conversion.codes();
        let src_bytes = self.conversion.from().bits() / 8;
        let dst_bytes = self.conversion.to().bits() / 8;
        format!(
            "{COMMON_WGSL}\n{CODEC_WGSL}\nconst SRC: u32 = {from}u;\nconst DST: u32 = {to}u;\n\
             const SRC_BYTES: u32 = {src_bytes}u;\nconst DST_BYTES: u32 = {dst_bytes}u;\n\
             const PER_UNIT: u32 = {}u;\n{CONVERT_WGSL}",
            self.elements()
        )
    }

    /// The kernel for `conversion`: the native F16 to F32 one where `f16` says it may be used.
    pub fn for_conversion(conversion: Conversion, f16: bool) -> Kernel {
        let native = f16 && Conversion::between(Dtype::F16, Dtype::F32) == Some(conversion);
        Kernel {
            conversion,
            needs_f16: native,
        }
    }
}

impl WgpuBackend {
    /// Whether the native-f16 kernel may be used: the adapter has SHADER_F16 and the kernel
    /// gave the CPU reference's bits for every one of the 65,536 F16 values when first
    /// asked (some drivers convert f16 wrongly: Mesa 22.3's lavapipe does).
    pub fn native_f16_verified(&self) -> bool {
        *self.native_f16.get_or_init(|| {
            let Some(conversion) = Conversion::between(Dtype::F16, Dtype::F32) else {
                return false;
            };
            let kernel = Kernel::for_conversion(conversion, true);
            if !self.f16 {
                return false;
            }
            let input: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
            let mut want = vec![0u8; input.len() * 2];
            kernel.conversion.convert(&input, &mut want);
            self.run_kernel(&kernel, &input)
                .is_ok_and(|got| got == want)
        })
    }

    pub(super) fn kernel_for(&self, conversion: Conversion) -> Kernel {
        let native = conversion.from() == Dtype::F16
            && conversion.to() == Dtype::F32
            && self.native_f16_verified();
        Kernel::for_conversion(conversion, native)
    }

    fn pipeline(&self, kernel: &Kernel) -> Result<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(kernel) {
            return Ok(p.clone());
        }
        let label = kernel.label();
        let p = self.scoped(&format!("compiling {label}"), || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&label),
                    source: wgpu::ShaderSource::Wgsl(kernel.module_source().into()),
                });
            Ok(self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                }))
        })?;
        cache.insert(*kernel, p.clone());
        Ok(p)
    }

    /// Runs `kernel` over `elements` elements from `src` into `dst` (each a buffer and a
    /// byte offset in it, a multiple of 256), in chunks that fit the binding and dispatch
    /// limits.
    pub(super) fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        (src, src_offset): (&wgpu::Buffer, u64),
        (dst, dst_offset): (&wgpu::Buffer, u64),
        elements: u64,
    ) -> Result<()> {
        let pipeline = self.pipeline(kernel)?;
        let units = elements.div_ceil(kernel.elements());
        let chunk = self.units_per_dispatch(kernel)?;
        let mut u0 = 0u64;
        while u0 < units {
            let n = chunk.min(units - u0);
            let el = (elements - u0 * kernel.elements()).min(n * kernel.elements());
            let (src_at, dst_at) = (
                src_offset + u0 * kernel.in_bytes(),
                dst_offset + u0 * kernel.out_bytes(),
            );
            let group = self.bind_group(&pipeline, kernel, (src, src_at), (dst, dst_at), n, el);
            let label = kernel.label();
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&label),
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

    /// The most units of `kernel` one dispatch takes: what the storage binding size and the
    /// workgroup count allow, in whole workgroups.
    fn units_per_dispatch(&self, kernel: &Kernel) -> Result<u64> {
        let max_binding = self.limits.max_storage_buffer_binding_size;
        let per_dispatch =
            u64::from(self.limits.max_compute_workgroups_per_dimension) * u64::from(WORKGROUP);
        let widest = kernel.in_bytes().max(kernel.out_bytes());
        let chunk =
            (max_binding / widest).min(per_dispatch) / u64::from(WORKGROUP) * u64::from(WORKGROUP);
        if chunk == 0 {
            return Err(backend_err(
                "the device's binding limits are too small for a kernel",
            ));
        }
        Ok(chunk)
    }

    /// The bind group of one dispatch of `kernel` over `n` units (`elements` elements): its
    /// input at `src`, its output at `dst`, and its parameters.
    fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        kernel: &Kernel,
        (src, src_at): (&wgpu::Buffer, u64),
        (dst, dst_at): (&wgpu::Buffer, u64),
        n: u64,
        elements: u64,
    ) -> wgpu::BindGroup {
        let params = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("tensorplace params"),
                contents: bytemuck::cast_slice(&[n as u32, elements as u32, 0, 0]),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.label()),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: binding(src, src_at, n * kernel.in_bytes()),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: binding(dst, dst_at, n * kernel.out_bytes()),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: params.as_entire_binding(),
                },
            ],
        })
    }

    /// Converts the bytes of a host buffer on the device (for tests and tools): uploads
    /// `input`, runs the kernel, reads the output back.
    pub fn convert(&self, conversion: Conversion, input: &[u8]) -> Result<Vec<u8>> {
        self.run_kernel(&self.kernel_for(conversion), input)
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
            self.dispatch(&mut enc, kernel, (&src, 0), (&dst, 0), elements)?;
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
