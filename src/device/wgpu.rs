//! The wgpu backend: tensors in wgpu buffers on any Vulkan, Metal, DX12 or GL device, with
//! dtype conversions done on the device by the WGSL kernels in `shaders/`.
//!
//! Uploads stream through a ring of staging buffers that are written while mapped (by one
//! thread per core) and copied into the tensors' buffers by few, batched command buffers,
//! so that the host's copies into one staging buffer overlap the transfers of the others.
//! Each tensor gets its own buffer, its size padded to 4 bytes; the true length is kept.
//!
//! Adapters are listed in a stable order: by type (discrete, integrated, virtual, CPU,
//! other), then by backend (Vulkan, Metal, DX12, GL), then in wgpu's enumeration order.
//! `wgpu:N` is the Nth of that list; `wgpu` is the first, or the adapter that
//! `WGPU_ADAPTER_NAME` names. `WGPU_BACKEND` and the other variables of
//! `wgpu::InstanceDescriptor::from_env` are honoured.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use wgpu::util::DeviceExt;

use crate::device::{Backend, Device, LoadPlan};
use crate::dtype::Conversion;
use crate::error::{Error, ErrorKind, Result};
use crate::parallel;
use crate::tensor::{Storage, Tensor};

/// Staging buffers in the ring.
const RING: usize = 3;
/// Size of one staging buffer (less where the device allows less).
const STAGING: u64 = 64 << 20;
/// Invocations per workgroup of every kernel.
const WORKGROUP: u32 = 64;

/// The shared binding layout and scalar conversions, prepended to every kernel.
pub const COMMON_WGSL: &str = include_str!("../../shaders/common.wgsl");

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
            source: include_str!(concat!("../../shaders/", $file)),
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

fn backend_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Backend, msg)
}

fn pad4(n: u64) -> u64 {
    n.div_ceil(4).max(1) * 4
}

/// A tensor's wgpu buffer. The buffer may be longer than the tensor (padding to 4 bytes).
#[derive(Debug, Clone)]
pub struct WgpuStorage {
    backend: Arc<WgpuBackend>,
    buffer: wgpu::Buffer,
    len: usize,
}

impl WgpuStorage {
    /// The buffer (usage `STORAGE | COPY_SRC | COPY_DST`).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The tensor's byte range in the buffer.
    pub fn range(&self) -> Range<u64> {
        0..self.len as u64
    }

    /// The tensor's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tensor has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wgpu device that owns the buffer.
    pub fn device(&self) -> &wgpu::Device {
        &self.backend.device
    }

    /// The queue of that device.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.backend.queue
    }

    /// The adapter's index in the order of `wgpu:N`.
    pub fn adapter_index(&self) -> usize {
        self.backend.index
    }

    /// Copies the bytes back to the host.
    pub fn to_host(&self) -> Result<Vec<u8>> {
        self.backend.download(&self.buffer, self.len)
    }
}

/// A wgpu device with its queue, its limits and its compiled kernels.
pub struct WgpuBackend {
    index: usize,
    info: wgpu::AdapterInfo,
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    f16: bool,
    direct_supported: bool,
    direct: AtomicBool,
    native_f16: OnceLock<bool>,
    pipelines: Mutex<HashMap<&'static str, wgpu::ComputePipeline>>,
    lost: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("index", &self.index)
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    INSTANCE.get_or_init(|| {
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
    })
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan => 0,
        wgpu::Backend::Metal => 1,
        wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 3,
        _ => 4,
    }
}

/// Runs `f`, turning a panic inside wgpu or a driver into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(backend_err(format!("wgpu panicked while {what}"))))
}

/// The adapters, in the stable order of `wgpu:N`, enumerated once per process (enumerating
/// creates and drops GL contexts, which some drivers do not survive from several threads).
fn adapters() -> Result<&'static [wgpu::Adapter]> {
    static ADAPTERS: OnceLock<std::result::Result<Vec<wgpu::Adapter>, String>> = OnceLock::new();
    let list = ADAPTERS.get_or_init(|| {
        guarded("enumerating adapters", || {
            let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
            let mut list = pollster::block_on(instance().enumerate_adapters(backends));
            list.sort_by_key(|a| {
                let i = a.get_info();
                (type_rank(i.device_type), backend_rank(i.backend))
            });
            Ok(list)
        })
        .map_err(|e| e.message().to_owned())
    });
    list.as_deref().map_err(|e| backend_err(e.clone()))
}

/// One line per adapter, in the order of `wgpu:N`, with the limits that matter.
pub fn list() -> Result<Vec<String>> {
    Ok(adapters()?
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            let l = a.limits();
            format!(
                "wgpu:{i}: {} {:?} {:?} (driver {} {}), max_buffer_size {}, \
                 max_storage_buffer_binding_size {}, shader-f16 {}",
                info.name,
                info.backend,
                info.device_type,
                info.driver,
                info.driver_info,
                l.max_buffer_size,
                l.max_storage_buffer_binding_size,
                if a.features().contains(wgpu::Features::SHADER_F16) {
                    "yes"
                } else {
                    "no"
                }
            )
        })
        .collect())
}

impl WgpuBackend {
    /// Opens adapter `index` of the list (`None`: the best, or `WGPU_ADAPTER_NAME`'s),
    /// reusing the device if this process opened it before.
    pub fn open(index: Option<usize>) -> Result<Arc<WgpuBackend>> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Arc<WgpuBackend>>>> = OnceLock::new();
        let name = Device::Wgpu(index);
        let list = adapters().map_err(|e| unavailable(name, &e.to_string()))?;
        if list.is_empty() {
            return Err(unavailable(
                name,
                "no adapter found (no Vulkan, Metal, DX12 or GL driver)",
            ));
        }
        let index = match index {
            Some(i) if i < list.len() => i,
            Some(i) => {
                return Err(unavailable(
                    name,
                    &format!(
                        "there are {} adapters, numbered from 0 (asked for {i})",
                        list.len()
                    ),
                ));
            }
            None => match std::env::var("WGPU_ADAPTER_NAME") {
                Ok(want) => {
                    let want = want.to_lowercase();
                    list.iter()
                        .position(|a| a.get_info().name.to_lowercase().contains(&want))
                        .ok_or_else(|| {
                            unavailable(
                                name,
                                &format!("no adapter matches WGPU_ADAPTER_NAME={want:?}"),
                            )
                        })?
                }
                Err(_) => 0,
            },
        };
        let open = OPEN.get_or_init(Default::default);
        let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = open.get(&index) {
            return Ok(b.clone());
        }
        let adapter = &list[index];
        let backend =
            Arc::new(Self::create(index, adapter).map_err(|e| unavailable(name, &e.to_string()))?);
        open.insert(index, backend.clone());
        Ok(backend)
    }

    /// The best adapter that is a real GPU (discrete or integrated), for `auto`.
    pub fn open_best_hardware() -> Result<Arc<WgpuBackend>> {
        let list = adapters()?;
        let first = list.first().map(|a| a.get_info().device_type);
        match first {
            Some(wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu) => {
                WgpuBackend::open(Some(0))
            }
            _ => Err(unavailable(Device::Wgpu(None), "no hardware GPU adapter")),
        }
    }

    fn create(index: usize, adapter: &wgpu::Adapter) -> Result<WgpuBackend> {
        guarded("creating the device", || {
            let info = adapter.get_info();
            let limits = adapter.limits();
            let f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
            // On adapters that share the host's memory (integrated and software GPUs),
            // tensor buffers are mapped and written in place: no staging copy at all.
            let direct = matches!(
                info.device_type,
                wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu
            ) && adapter
                .features()
                .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
            let mut features = wgpu::Features::empty();
            if f16 {
                features |= wgpu::Features::SHADER_F16;
            }
            if direct {
                features |= wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
            }
            let (device, queue) =
                pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                    label: Some("tensorplace"),
                    required_features: features,
                    required_limits: limits.clone(),
                    ..Default::default()
                }))
                .map_err(|e| backend_err(format!("requesting a device from {}: {e}", info.name)))?;
            let lost = Arc::new(Mutex::new(None));
            let sink = lost.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.get_or_insert_with(|| e.to_string());
            }));
            let sink = lost.clone();
            device.set_device_lost_callback(move |reason, msg| {
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.get_or_insert_with(|| format!("device lost ({reason:?}): {msg}"));
            });
            Ok(WgpuBackend {
                index,
                info,
                device,
                queue,
                limits,
                f16,
                direct_supported: direct,
                direct: AtomicBool::new(
                    direct && std::env::var("TENSORPLACE_WGPU_UPLOAD").as_deref() != Ok("staging"),
                ),
                native_f16: OnceLock::new(),
                pipelines: Mutex::new(HashMap::new()),
                lost,
            })
        })
    }

    /// The adapter's information.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device's limits (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Whether uploads write the tensors' buffers in place (mapped), as they do on adapters
    /// that share host memory; otherwise they go through the staging ring.
    pub fn direct_writes(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }

    /// Chooses between writing in place (where the adapter allows it) and the staging ring;
    /// returns the choice in force. `TENSORPLACE_WGPU_UPLOAD=staging` sets the default.
    pub fn set_direct_writes(&self, on: bool) -> bool {
        let on = on && self.direct_supported;
        self.direct.store(on, Ordering::Relaxed);
        on
    }

    /// Whether SHADER_F16 is enabled.
    pub fn has_f16(&self) -> bool {
        self.f16
    }

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

    fn kernel_for(&self, conversion: Conversion) -> Option<&'static Kernel> {
        let native = conversion == Conversion::F16ToF32 && self.native_f16_verified();
        Kernel::for_conversion(conversion, native)
    }

    /// Fails with the first uncaptured error or loss the device reported.
    fn check_lost(&self) -> Result<()> {
        let s = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        match &*s {
            Some(msg) => Err(backend_err(msg.clone())),
            None => Ok(()),
        }
    }

    /// Runs `f` inside validation and out-of-memory error scopes, turning what they catch
    /// into errors.
    fn scoped<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_lost()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = guarded(what, f);
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            return Err(Error::new(ErrorKind::OutOfMemory, format!("{what}: {e}")));
        }
        if let Some(e) = v {
            return Err(backend_err(format!("{what}: {e}")));
        }
        let out = out?;
        self.check_lost()?;
        Ok(out)
    }

    fn wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map(|_| ())
            .map_err(|e| backend_err(format!("waiting for the device: {e}")))
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

    fn new_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Reads `len` bytes of `buffer` back to the host.
    fn download(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
        let size = pad4(len as u64);
        let read = self.scoped("reading a buffer back", || {
            let read = self.new_buffer(
                "tensorplace readback",
                size,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(buffer, 0, &read, 0, size);
            let idx = self.queue.submit([enc.finish()]);
            let state = map_async(&read, wgpu::MapMode::Read);
            self.wait(Some(idx))?;
            wait_mapped(self, &state)?;
            Ok(read)
        })?;
        let mut out = read
            .get_mapped_range(..)
            .map_err(|e| backend_err(e.to_string()))?
            .to_vec();
        read.unmap();
        out.truncate(len);
        Ok(out)
    }

    /// Runs `kernel` over `units` units from `src` into `dst`, in chunks that fit the
    /// binding and dispatch limits.
    fn dispatch(
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
            .ok_or_else(|| Error::new(ErrorKind::InvalidTensor, "size overflows"))?;
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

fn unavailable(name: Device, why: &str) -> Error {
    Error::new(ErrorKind::DeviceUnavailable, format!("{name}: {why}"))
}

const PENDING: u8 = 0;
const MAPPED: u8 = 1;
const FAILED: u8 = 2;

fn map_async(buffer: &wgpu::Buffer, mode: wgpu::MapMode) -> Arc<AtomicU8> {
    let state = Arc::new(AtomicU8::new(PENDING));
    let s = state.clone();
    buffer.slice(..).map_async(mode, move |r| {
        s.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Release);
    });
    state
}

fn wait_mapped(backend: &WgpuBackend, state: &AtomicU8) -> Result<()> {
    loop {
        match state.load(Ordering::Acquire) {
            MAPPED => return Ok(()),
            FAILED => return Err(backend_err("mapping a staging buffer failed")),
            _ => {
                backend.check_lost()?;
                backend.wait(None)?;
            }
        }
    }
}

/// One piece of a tensor on its way: file bytes `src` into `dst` at `dst_offset`.
struct Piece<'b> {
    src: Range<usize>,
    dst: &'b wgpu::Buffer,
    dst_offset: u64,
}

struct Staging {
    buffer: wgpu::Buffer,
    state: Option<Arc<AtomicU8>>,
}

impl Backend for WgpuBackend {
    fn device(&self) -> Device {
        Device::Wgpu(Some(self.index))
    }

    fn describe(&self) -> String {
        format!(
            "wgpu:{} ({}, {:?}, {:?})",
            self.index, self.info.name, self.info.backend, self.info.device_type
        )
    }

    fn upload(&self, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>> {
        let this = WgpuBackend::open(Some(self.index))?;
        upload(&this, plan).map_err(|e| plan.err(e))
    }
}

fn upload(backend: &Arc<WgpuBackend>, plan: &LoadPlan<'_>) -> Result<Vec<Tensor>> {
    let items = plan.items();
    let max = backend.limits.max_buffer_size;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    for item in items {
        let biggest = item.src.len().max(item.out_len) as u64;
        if pad4(biggest) > max {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{biggest} bytes exceed the device's max_buffer_size of {max}"),
            )
            .with_tensor(item.name));
        }
    }
    let kernels: Vec<Option<&Kernel>> = items
        .iter()
        .map(|i| match i.conversion {
            Some(c) => backend.kernel_for(c).map(Some).ok_or_else(|| {
                Error::new(ErrorKind::Unsupported, format!("no kernel for {c}")).with_tensor(i.name)
            }),
            None => Ok(None),
        })
        .collect::<Result<_>>()?;
    backend.scoped("uploading", || {
        // Destination buffers, and raw input buffers for the tensors to convert. Where the
        // adapter shares host memory, the buffers the file's bytes go to are created mapped.
        let direct = backend.direct_writes();
        let make = |label: &str, size: usize, written: bool| {
            let mapped = direct && written;
            backend.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: pad4(size as u64),
                usage: if mapped {
                    usage | wgpu::BufferUsages::MAP_WRITE
                } else {
                    usage
                },
                mapped_at_creation: mapped,
            })
        };
        // Creating a buffer mapped zero-fills it on the creating thread: create them on
        // every core, the largest first, so that the fills (and page faults) run in parallel.
        let create_all = |specs: Vec<(&str, usize, bool)>| -> Result<Vec<wgpu::Buffer>> {
            if !direct {
                return Ok(specs.into_iter().map(|(l, n, w)| make(l, n, w)).collect());
            }
            let slots: Vec<Mutex<Option<wgpu::Buffer>>> =
                specs.iter().map(|_| Mutex::new(None)).collect();
            let mut order: Vec<usize> = (0..specs.len()).collect();
            order.sort_by_key(|&k| std::cmp::Reverse(specs[k].1));
            parallel::for_each(order, usize::MAX, |k, _| {
                let (label, n, written) = specs[k];
                let buffer = make(label, n, written);
                *slots[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(buffer);
                Ok(())
            })?;
            slots
                .into_iter()
                .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| backend_err("a buffer was not created"))
        };
        let outs = create_all(
            items
                .iter()
                .map(|i| {
                    (
                        i.name,
                        i.out_len,
                        i.conversion.is_none() && !i.src.is_empty(),
                    )
                })
                .collect(),
        )?;
        let converted: Vec<usize> = (0..items.len())
            .filter(|&k| items[k].conversion.is_some())
            .collect();
        let mut raw_buffers = create_all(
            converted
                .iter()
                .map(|&k| {
                    (
                        "tensorplace raw input",
                        items[k].src.len(),
                        !items[k].src.is_empty(),
                    )
                })
                .collect(),
        )?
        .into_iter();
        let mut raws: Vec<Option<wgpu::Buffer>> = (0..items.len()).map(|_| None).collect();
        for &k in &converted {
            raws[k] = raw_buffers.next();
        }
        let targets = items
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.src.is_empty())
            .map(|(k, i)| (raws[k].as_ref().unwrap_or(&outs[k]), i.src.clone()));
        if direct {
            let writes: Vec<_> = targets.map(|(b, src)| (b, 0u64, src)).collect();
            fill(plan.file(), &writes)?;
            for (b, _, _) in &writes {
                b.unmap();
            }
            plan.report(plan.input_bytes());
        } else {
            let staging_size = STAGING.min(max) / 256 * 256;
            let mut pieces = Vec::new();
            for (dst, src) in targets {
                let mut at = src.start;
                while at < src.end {
                    let end = (at + staging_size as usize).min(src.end);
                    pieces.push(Piece {
                        src: at..end,
                        dst,
                        dst_offset: (at - src.start) as u64,
                    });
                    at = end;
                }
            }
            stream(backend, plan, &pieces, staging_size)?;
        }
        let mut enc = backend.device.create_command_encoder(&Default::default());
        let mut any = false;
        for (k, item) in items.iter().enumerate() {
            if let (Some(kernel), Some(raw)) = (kernels[k], &raws[k]) {
                let elements = (item.src.len() / (item.info.dtype.bits() / 8)) as u64;
                backend.dispatch(&mut enc, kernel, raw, &outs[k], elements)?;
                any = true;
            }
        }
        let idx = any.then(|| backend.queue.submit([enc.finish()]));
        backend.wait(idx)?;
        Ok(items
            .iter()
            .zip(outs)
            .map(|(item, buffer)| {
                let storage = WgpuStorage {
                    backend: backend.clone(),
                    buffer,
                    len: item.out_len,
                };
                Tensor::from_parts(
                    item.out_dtype,
                    item.info.shape.clone(),
                    Storage::Wgpu(storage),
                )
            })
            .collect())
    })
}

/// Streams `pieces` through the staging ring: fill one buffer while mapped (on every core),
/// unmap, copy into the destinations, submit, map it again for reuse.
fn stream(
    backend: &WgpuBackend,
    plan: &LoadPlan<'_>,
    pieces: &[Piece<'_>],
    size: u64,
) -> Result<()> {
    let file = plan.file();
    let mut ring: Vec<Staging> = Vec::new();
    let mut next = 0usize;
    let mut done = 0u64;
    let mut start = 0usize;
    let mut last = None;
    while start < pieces.len() {
        // Gather the pieces that fit one staging buffer, each at a 256-byte aligned offset.
        let mut end = start;
        let mut used = 0u64;
        let mut offsets = Vec::new();
        while end < pieces.len() {
            let len = pad4(pieces[end].src.len() as u64);
            if used + len > size && end > start {
                break;
            }
            offsets.push(used);
            used = (used + len).next_multiple_of(256);
            end += 1;
        }
        let batch = &pieces[start..end];
        if ring.len() < RING {
            ring.push(Staging {
                buffer: backend.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tensorplace staging"),
                    size,
                    usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                }),
                state: None,
            });
        }
        let slot = next % ring.len().max(1);
        next += 1;
        let staging = &mut ring[slot];
        if let Some(state) = staging.state.take() {
            wait_mapped(backend, &state)?;
        }
        let writes: Vec<_> = batch
            .iter()
            .zip(&offsets)
            .map(|(p, &off)| (&staging.buffer, off, p.src.clone()))
            .collect();
        fill(file, &writes)?;
        staging.buffer.unmap();
        let mut enc = backend.device.create_command_encoder(&Default::default());
        for (p, &off) in batch.iter().zip(&offsets) {
            enc.copy_buffer_to_buffer(
                &staging.buffer,
                off,
                p.dst,
                p.dst_offset,
                pad4(p.src.len() as u64),
            );
        }
        last = Some(backend.queue.submit([enc.finish()]));
        staging.state = Some(map_async(&staging.buffer, wgpu::MapMode::Write));
        done += batch.iter().map(|p| p.src.len() as u64).sum::<u64>();
        plan.report(done);
        start = end;
    }
    backend.wait(last)?;
    Ok(())
}

/// Copies file bytes into mapped buffers: each write is (buffer, offset, file range), the
/// offset 8-aligned; each write is zero-padded to 4 bytes. Writes are cut into 4 MiB pieces
/// (8-aligned, wgpu's MAP_ALIGNMENT) spread over one thread per core.
fn fill(
    file: &crate::host::HostFile<'_>,
    writes: &[(&wgpu::Buffer, u64, Range<usize>)],
) -> Result<()> {
    const PIECE: usize = 4 << 20;
    let mut jobs = Vec::new();
    for (buffer, off, src) in writes {
        for at in src.clone().step_by(PIECE) {
            let end = (at + PIECE).min(src.end);
            jobs.push((*buffer, off + (at - src.start) as u64, at..end));
        }
    }
    parallel::for_each(jobs, usize::MAX, |(buffer, off, src), scratch| {
        let len = src.len();
        let padded = pad4(len as u64);
        let mut view = buffer
            .get_mapped_range_mut(off..off + padded)
            .map_err(|e| backend_err(format!("mapping a buffer: {e}")))?;
        let bytes: &[u8] = match file.bytes() {
            Some(b) => b
                .get(src.clone())
                .ok_or_else(|| backend_err("range past the file"))?,
            None => {
                scratch.resize(len, 0);
                file.read_at(src.start, scratch)?;
                scratch
            }
        };
        let whole = len / 4 * 4;
        view.slice(..whole).copy_from_slice(&bytes[..whole]);
        if whole < padded as usize {
            let mut tail = [0u8; 4];
            tail[..len - whole].copy_from_slice(&bytes[whole..]);
            view.slice(whole..).copy_from_slice(&tail);
        }
        Ok(())
    })
}

/// The harness's wgpu group: our load against a per-tensor `queue.write_buffer` loop (what
/// burn does), both ending with the device idle and the buffers freed.
#[cfg(feature = "cli")]
pub fn bench_group<'a>(
    index: Option<usize>,
    path: &'a std::path::Path,
) -> Result<crate::bench::Group<'a>> {
    use crate::bench::{BenchPath, Group, Role};
    let backend = WgpuBackend::open(index)?;
    let device = Device::Wgpu(Some(backend.index));
    let file = crate::host::HostFile::open(path, crate::host::ReadMode::Mmap)?;
    let b2 = backend.clone();
    let label = if backend.direct_writes() {
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
                let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
                let mut keep = Vec::new();
                for (name, info) in file.tensors() {
                    let bytes = file.tensor_bytes(info).unwrap_or_default();
                    let buf = b2.new_buffer(name, pad4(bytes.len() as u64), usage);
                    let n = bytes.len() / 4 * 4;
                    b2.queue.write_buffer(&buf, 0, &bytes[..n]);
                    if n < bytes.len() {
                        let mut tail = bytes[n..].to_vec();
                        tail.resize(4, 0);
                        b2.queue.write_buffer(&buf, n as u64, &tail);
                    }
                    keep.push(buf);
                }
                let idx = b2.queue.submit([]);
                b2.wait(Some(idx))?;
                Ok(())
            }),
        ],
        pairs: vec![],
    })
}
