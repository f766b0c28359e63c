//! The wgpu backend: tensors in wgpu buffers on any Vulkan, Metal, DX12 or GL device, with
//! dtype conversions done on the device by the WGSL kernels in `shaders/` ([`kernels`]).
//!
//! Each tensor gets its own buffer, its size padded to 4 bytes; the true length is kept.
//! How the bytes get there is [`upload`]'s story: written in place on adapters that share
//! host memory, or through a ring of staging buffers.
//!
//! Adapters are listed in a stable order: by type (discrete, integrated, virtual, CPU,
//! other), then by backend (Vulkan, Metal, DX12), then in wgpu's enumeration order; GL
//! adapters are listed only where those backends find none.
//! `wgpu:N` is the Nth of that list; `wgpu` is the first, or the first whose name contains
//! the [`Loader::adapter`](crate::Loader::adapter) option. Every backend wgpu was built with
//! is enumerated; nothing is read from the environment.

mod host_import;
mod kernels;
mod map;
mod ring;
mod scratch;
mod upload;

#[cfg(feature = "unstable-internals")]
pub use host_import::HostRegion;
#[cfg(feature = "unstable-internals")]
pub use ring::{RING, STAGING};

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use super::common::{self, Opened};
use crate::device::Device;
use crate::error::{Error, ErrorKind, Result};
use crate::plan::LoadPlan;

pub use kernels::Kernel;
use map::{map_async, wait_mapped};

pub(super) fn backend_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Backend, msg)
}

pub(super) fn pad4(n: u64) -> u64 {
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
    in_place_supported: bool,
    native_f16: OnceLock<bool>,
    pipelines: Mutex<HashMap<Kernel, wgpu::ComputePipeline>>,
    /// Set when the device is lost: every later use fails.
    lost: Arc<Mutex<Option<String>>>,
    /// The last error reported outside any error scope (not ours), for diagnosis.
    uncaptured: Arc<Mutex<Option<String>>>,
    /// Imports host memory into the device, where the driver allows it.
    importer: Option<host_import::Importer>,
    /// The mapped staging ring, kept between loads (a load that finds it in use makes its
    /// own).
    ring: Mutex<Vec<ring::Staging>>,
    /// The ring of imported host memory, kept the same way (imported once: importing pins).
    imported_ring: Mutex<Vec<ring::Staging>>,
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

/// The process's wgpu instance: every backend wgpu was built with, and the build's default
/// flags less `VALIDATION_INDIRECT_CALL`. That flag (on by default, release builds too)
/// makes wgpu-core cap `max_buffer_size` and the storage binding size at `u32::MAX`
/// (`Instance::adjust_limits_for_indirect_validation` in wgpu-core 30), the ~4.29e9 seen
/// on NVIDIA, so that tensors over 4 GiB would not load. It validates indirect draws and
/// dispatches, which this crate never issues.
fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    INSTANCE.get_or_init(|| {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.flags
            .remove(wgpu::InstanceFlags::VALIDATION_INDIRECT_CALL);
        wgpu::Instance::new(desc)
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

/// Runs `f`, turning a panic inside wgpu or a driver while doing `what` into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    common::guarded(|| backend_err(format!("wgpu panicked while {what}")), f)
}

/// The adapters, in the stable order of `wgpu:N`, enumerated once per process (enumerating
/// creates and drops GL contexts, which some drivers do not survive from several threads).
///
/// The primary backends (Vulkan, Metal, DX12) are asked first and GL only where they find
/// nothing: GL is wgpu's fallback, it types NVIDIA's and AMD's GL adapters `Other` (after
/// software renderers), and a GL adapter listed beside a Vulkan one is the same device
/// through a slower path. So on a machine without a Vulkan driver, `wgpu` is the GL adapter
/// (Mesa's llvmpipe, say), and beside one it is never GL.
fn adapters() -> Result<&'static [wgpu::Adapter]> {
    static ADAPTERS: OnceLock<std::result::Result<Vec<wgpu::Adapter>, String>> = OnceLock::new();
    let list = ADAPTERS.get_or_init(|| {
        guarded("enumerating adapters", || {
            let enumerate = |backends| pollster::block_on(instance().enumerate_adapters(backends));
            let mut list = enumerate(wgpu::Backends::PRIMARY);
            if list.is_empty() {
                list = enumerate(wgpu::Backends::SECONDARY);
            }
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
            let yes = |b: bool| if b { "yes" } else { "no" };
            format!(
                "wgpu:{i}: {} {:?} {:?} (driver {} {}), max_buffer_size {}, \
                 max_storage_buffer_binding_size {}, shader-f16 {}, \
                 VK_EXT_external_memory_host {}",
                info.name,
                info.backend,
                info.device_type,
                info.driver,
                info.driver_info,
                l.max_buffer_size,
                l.max_storage_buffer_binding_size,
                yes(a.features().contains(wgpu::Features::SHADER_F16)),
                yes(host_import::supported(a)),
            )
        })
        .collect())
}

/// The features a device of `adapter` is opened with, whether it has `shader-f16`, and
/// whether its tensors' buffers can be written in place: on adapters that share the host's
/// memory (integrated and software GPUs) that map primary buffers, no staging copy at all.
fn features_for(adapter: &wgpu::Adapter) -> (wgpu::Features, bool, bool) {
    let f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
    let in_place = matches!(
        adapter.get_info().device_type,
        wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu
    ) && adapter
        .features()
        .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
    let mut features = wgpu::Features::empty();
    if f16 {
        features |= wgpu::Features::SHADER_F16;
    }
    if in_place {
        features |= wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
    }
    (features, f16, in_place)
}

/// The sinks of `device`'s loss and of its errors outside every error scope. Those errors
/// are not ours (each of our operations runs in scopes): a user's own use of the device,
/// say. They are kept for diagnosis and fail nothing; only the loss of the device is sticky.
#[allow(clippy::type_complexity)]
fn watch(device: &wgpu::Device) -> (Arc<Mutex<Option<String>>>, Arc<Mutex<Option<String>>>) {
    let lost = Arc::new(Mutex::new(None));
    let uncaptured = Arc::new(Mutex::new(None));
    let sink = uncaptured.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        *sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }));
    let sink = lost.clone();
    device.set_device_lost_callback(move |reason, msg| {
        let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
        s.get_or_insert_with(|| format!("device lost ({reason:?}): {msg}"));
    });
    (lost, uncaptured)
}

impl WgpuBackend {
    /// Opens adapter `index` of the list (`None`: the first, or the first whose name
    /// contains `name`, ignoring case), reusing the device if this process opened it before.
    pub fn open(index: Option<usize>, name: Option<&str>) -> Result<Arc<WgpuBackend>> {
        static OPEN: Opened<WgpuBackend> = Opened::new();
        let adapter_name = name;
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
            None => match adapter_name {
                Some(want) => {
                    let want = want.to_lowercase();
                    list.iter()
                        .position(|a| a.get_info().name.to_lowercase().contains(&want))
                        .ok_or_else(|| {
                            unavailable(name, &format!("no adapter's name contains {want:?}"))
                        })?
                }
                None => 0,
            },
        };
        OPEN.get_or_open(index, || {
            Self::create(index, &list[index]).map_err(|e| unavailable(name, &e.to_string()))
        })
    }

    /// The best adapter that is a real GPU (discrete or integrated), for `auto`.
    pub fn open_best_hardware() -> Result<Arc<WgpuBackend>> {
        let list = adapters()?;
        let first = list.first().map(|a| a.get_info().device_type);
        match first {
            Some(wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu) => {
                WgpuBackend::open(Some(0), None)
            }
            _ => Err(unavailable(Device::Wgpu(None), "no hardware GPU adapter")),
        }
    }

    fn create(index: usize, adapter: &wgpu::Adapter) -> Result<WgpuBackend> {
        guarded("creating the device", || {
            let info = adapter.get_info();
            let limits = adapter.limits();
            let (features, f16, in_place) = features_for(adapter);
            // Vulkan devices that can import host memory are opened with that extension
            // (the staging ring then lives in page-locked host memory); others as usual.
            let (device, queue, importer) = match host_import::request_device(adapter, features) {
                Some((device, queue, importer)) => (device, queue, Some(importer)),
                None => {
                    let (device, queue) =
                        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                            label: Some("tensorplace"),
                            required_features: features,
                            required_limits: limits.clone(),
                            ..Default::default()
                        }))
                        .map_err(|e| {
                            backend_err(format!("requesting a device from {}: {e}", info.name))
                        })?;
                    (device, queue, None)
                }
            };
            let (lost, uncaptured) = watch(&device);
            let mut backend = WgpuBackend {
                index,
                info,
                device,
                queue,
                limits,
                f16,
                in_place_supported: in_place,
                native_f16: OnceLock::new(),
                pipelines: Mutex::new(HashMap::new()),
                lost,
                uncaptured,
                importer,
                ring: Mutex::new(Vec::new()),
                imported_ring: Mutex::new(Vec::new()),
            };
            // A driver that accepts the import but copies wrong bytes from it must not carry
            // a load: one small copy through imported memory is checked first.
            if backend.importer.is_some() && backend.check_import().is_err() {
                backend.importer = None;
            }
            Ok(backend)
        })
    }

    /// Imports a few pages of host memory holding a pattern, copies them into a device
    /// buffer at an offset, reads that back and compares.
    fn check_import(&self) -> Result<()> {
        const LEN: usize = 1 << 16;
        let importer = self
            .importer
            .as_ref()
            .ok_or_else(|| backend_err("no importer"))?;
        let want: Vec<u8> = (0..LEN).map(|i| (i * 31 % 251) as u8).collect();
        let copied = self.scoped("checking host import", || {
            let (source, host) = importer.import(&self.device, LEN)?;
            // SAFETY: fresh memory of at least LEN bytes that no submission reads yet.
            unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), host.as_ptr(), LEN) };
            let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let dst = self.new_buffer("tensorplace import check", 2 * LEN as u64, usage);
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&source, 256, &dst, 512, (LEN - 256) as u64);
            let index = self.queue.submit([enc.finish()]);
            self.wait(Some(index))?;
            Ok(dst)
        })?;
        let got = self.download(&copied, 2 * LEN)?;
        if got[512..LEN + 256] == want[256..] {
            Ok(())
        } else {
            Err(backend_err("bytes copied from imported host memory differ"))
        }
    }

    /// The adapter's index in the order of `wgpu:N`.
    pub fn index(&self) -> usize {
        self.index
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

    /// Whether the adapter shares host memory, so that tensors' buffers can be created
    /// mapped and written in place ([`Upload::InPlace`](crate::Upload::InPlace), the
    /// automatic choice there); otherwise uploads go through the staging ring.
    pub fn in_place_supported(&self) -> bool {
        self.in_place_supported
    }

    /// Whether host memory can be imported into the device as the staging ring's memory
    /// ([`Upload::HostImport`](crate::Upload::HostImport), the automatic choice on adapters
    /// that do not share host memory), and the import alignment.
    pub fn host_import_alignment(&self) -> Option<usize> {
        self.importer.as_ref().map(|i| i.align())
    }

    /// `len` bytes of fresh host memory imported as a `COPY_SRC` buffer, as the staging
    /// ring's are (`None` where the device cannot import host memory): for the harness.
    #[cfg(feature = "unstable-internals")]
    pub fn import_host(&self, len: usize) -> Option<Result<(wgpu::Buffer, Arc<HostRegion>)>> {
        let importer = self.importer.as_ref()?;
        Some(importer.import(&self.device, len))
    }

    /// Whether SHADER_F16 is enabled.
    pub fn has_f16(&self) -> bool {
        self.f16
    }
    /// The last error wgpu reported outside any error scope (from a user's own use of the
    /// device, say): it fails no load.
    pub fn last_uncaptured_error(&self) -> Option<String> {
        self.uncaptured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fails once the device is lost.
    pub(super) fn check_lost(&self) -> Result<()> {
        let s = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        match &*s {
            Some(msg) => Err(backend_err(msg.clone())),
            None => Ok(()),
        }
    }

    /// Runs `f` inside validation and out-of-memory error scopes, turning what they catch
    /// into errors.
    pub(super) fn scoped<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
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

    /// Waits for the device: until submission `index` is done, or all queued work.
    pub fn wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map(|_| ())
            .map_err(|e| backend_err(format!("waiting for the device: {e}")))
    }

    /// A new unmapped buffer of `size` bytes and `usage`, labelled `label` (within an error
    /// scope of the caller's where a failure must be caught).
    pub fn new_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Reads `len` bytes of `buffer` back to the host.
    pub(super) fn download(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
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
            wait_mapped(self, &state, Some(idx))?;
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
}

fn unavailable(name: Device, why: &str) -> Error {
    Error::new(ErrorKind::DeviceUnavailable, format!("{name}: {why}"))
}

impl WgpuBackend {
    /// A human description, such as `wgpu:0 (NVIDIA H100, Vulkan, DiscreteGpu, host import)`.
    pub(crate) fn description(&self) -> String {
        format!(
            "wgpu:{} ({}, {:?}, {:?}{})",
            self.index,
            self.info.name,
            self.info.backend,
            self.info.device_type,
            if self.importer.is_some() {
                ", host import"
            } else {
                ""
            }
        )
    }

    /// What the adapter is where it is not a hardware GPU through a primary backend (a
    /// software renderer, or a GPU through GL, wgpu's fallback): said in every load's report,
    /// so that a run that expected a discrete Vulkan adapter shows what ran instead.
    pub(crate) fn not_a_gpu(&self) -> Option<&'static str> {
        match (self.info.device_type, self.info.backend) {
            (wgpu::DeviceType::Cpu, _) => Some("a software adapter, not a GPU"),
            (_, wgpu::Backend::Gl) => Some("reached through GL, wgpu's fallback"),
            _ => None,
        }
    }

    /// Places every tensor of the plan in a buffer of its own, returning their storages in
    /// the plan's order.
    pub(crate) fn place(&self, plan: &LoadPlan<'_>) -> Result<Vec<WgpuStorage>> {
        let this = WgpuBackend::open(Some(self.index), None)?;
        upload::upload(&this, plan).map_err(|e| plan.err(e))
    }
}
