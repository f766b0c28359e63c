//! Host memory imported into a Vulkan device (`VK_EXT_external_memory_host`), so that the
//! staging ring is page-locked host memory the GPU's copy engines read by DMA, instead of
//! buffers the driver maps (on a large-BAR discrete GPU those live in VRAM behind the BAR,
//! and every byte crosses the link as a CPU store).
//!
//! wgpu never enables the extension itself: the device is opened through wgpu-hal with the
//! extension added ([`request_device`]), and each ring buffer is anonymous host memory imported as
//! device memory, bound to a `TRANSFER_SRC` buffer and handed to wgpu as an externally owned
//! buffer ([`Importer::import`]), freed by wgpu's drop callback once the GPU is done with it.
//! Any step a driver refuses makes the backend fall back to the mapped staging ring.
//!
//! Only anonymous memory is imported, never a file mapping: the specification promises
//! imports of host allocations only, and some drivers wrongly accept file pages.

use std::sync::Arc;

use ash::ext::external_memory_host as emh;
use ash::vk;
use wgpu::hal::api::Vulkan;
use wgpu::hal::vulkan as hv;

use crate::error::{Error, ErrorKind, Result};
use crate::memory::HostBuffer;

const HANDLE: vk::ExternalMemoryHandleTypeFlags =
    vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;

fn refused(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("importing host memory: {what}: {e}"),
    )
}

/// What importing needs from a device opened with the extension.
pub(super) struct Importer {
    instance: ash::Instance,
    physical: vk::PhysicalDevice,
    device: ash::Device,
    pointer_properties: vk::PFN_vkGetMemoryHostPointerPropertiesEXT,
    /// `minImportedHostPointerAlignment`: imported pointers and sizes are multiples of it.
    align: usize,
}

/// Whether `adapter` is a Vulkan adapter whose device lists `VK_EXT_external_memory_host`
/// (what [`request_device`] checks first; the import itself may still be refused).
pub(super) fn supported(adapter: &wgpu::Adapter) -> bool {
    // SAFETY: the hal adapter is only read (its capabilities) and released at once.
    unsafe { adapter.as_hal::<Vulkan>() }.is_some_and(|hal| {
        hal.physical_device_capabilities()
            .supports_extension(emh::NAME)
    })
}

/// Opens `adapter`'s device with `VK_EXT_external_memory_host` enabled, with `features`
/// and the adapter's own limits. `None` when the adapter is not Vulkan, the instance or
/// device predates Vulkan 1.1, the extension is missing, buffers cannot be imported for
/// copies, or opening that way fails: the caller then opens the device the usual way.
pub(super) fn request_device(
    adapter: &wgpu::Adapter,
    features: wgpu::Features,
) -> Option<(wgpu::Device, wgpu::Queue, Importer)> {
    let limits = adapter.limits();
    // SAFETY: the hal adapter is only read here (capabilities, handles) and dropped before
    // the wgpu device is created from what it opened.
    let hal = unsafe { adapter.as_hal::<Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance().clone();
    let physical = hal.raw_physical_device();
    let align = import_alignment(&hal)?;
    let callback: Box<hv::CreateDeviceCallback<'_>> =
        Box::new(|args| args.extensions.push(emh::NAME));
    // SAFETY: the features are the adapter's own, the limits its own, and the callback only
    // adds an extension the physical device supports (checked above).
    let opened = unsafe {
        hal.open_with_callback(
            features,
            &limits,
            &wgpu::MemoryHints::default(),
            Some(callback),
        )
    }
    .ok()?;
    drop(hal);
    let desc = wgpu::DeviceDescriptor {
        label: Some("tensorplace"),
        required_features: features,
        required_limits: limits,
        ..Default::default()
    };
    // SAFETY: `opened` comes from this adapter's hal, opened with features and limits the
    // adapter has (what wgpu-core would check on the usual path).
    let (device, queue) =
        unsafe { adapter.create_device_from_hal::<Vulkan>(opened, &desc) }.ok()?;
    // SAFETY: read only, to clone the handles; released at once.
    let raw = unsafe { device.as_hal::<Vulkan>() }?.raw_device().clone();
    let pointer_properties = emh::Device::new(&instance, &raw)
        .fp()
        .get_memory_host_pointer_properties_ext;
    let importer = Importer {
        instance,
        physical,
        device: raw,
        pointer_properties,
        align,
    };
    Some((device, queue, importer))
}

/// `minImportedHostPointerAlignment` of the adapter's device, where it can import host
/// memory for copies: a Vulkan 1.1 instance and device with the extension, a power-of-two
/// alignment, and host allocations importable as `TRANSFER_SRC` buffers. `None` otherwise.
fn import_alignment(hal: &hv::Adapter) -> Option<usize> {
    let caps = hal.physical_device_capabilities();
    let v11 = vk::make_api_version(0, 1, 1, 0);
    if !caps.supports_extension(emh::NAME)
        || caps.properties().api_version < v11
        || hal.shared_instance().instance_api_version() < v11
    {
        return None;
    }
    let instance = hal.shared_instance().raw_instance();
    let physical = hal.raw_physical_device();
    let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
    let mut properties = vk::PhysicalDeviceProperties2::default().push_next(&mut host);
    // SAFETY: a Vulkan 1.1 instance and device (checked above); `properties` chains only
    // the extension's structure, which the device supports.
    unsafe { instance.get_physical_device_properties2(physical, &mut properties) };
    let align = usize::try_from(host.min_imported_host_pointer_alignment).ok()?;
    if !align.is_power_of_two() {
        return None;
    }
    let info = vk::PhysicalDeviceExternalBufferInfo::default()
        .usage(vk::BufferUsageFlags::TRANSFER_SRC)
        .handle_type(HANDLE);
    let mut external = vk::ExternalBufferProperties::default();
    // SAFETY: as above (core Vulkan 1.1), plain structures.
    unsafe {
        instance.get_physical_device_external_buffer_properties(physical, &info, &mut external)
    };
    external
        .external_memory_properties
        .external_memory_features
        .contains(vk::ExternalMemoryFeatureFlags::IMPORTABLE)
        .then_some(align)
}

/// Host memory imported into the device: its bytes are written by the host through
/// [`as_ptr`](Self::as_ptr) while no submission that reads them is pending.
pub struct HostRegion {
    /// Owns the memory (an anonymous mapping); never touched through a reference once the
    /// region exists, only through `ptr`.
    _memory: HostBuffer,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory owned by `_memory` (an anonymous mapping, itself Send
// and Sync); the raw pointer is only dereferenced by its user under the rule stated on
// `HostRegion` (one writer, while the GPU does not read it).
unsafe impl Send for HostRegion {}
// SAFETY: as above: shared references only hand out the pointer.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    #[cfg_attr(not(feature = "unstable-internals"), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Importer {
    /// The device's `minImportedHostPointerAlignment`.
    pub(super) fn align(&self) -> usize {
        self.align
    }

    /// Imports `len` bytes (rounded up to the import alignment) of fresh anonymous host
    /// memory as a `COPY_SRC` wgpu buffer of `device`, the device [`open`] returned with
    /// this importer. The memory is released when wgpu frees the buffer.
    pub(super) fn import(
        &self,
        device: &wgpu::Device,
        len: usize,
    ) -> Result<(wgpu::Buffer, Arc<HostRegion>)> {
        let region = self.region(len)?;
        let (ptr, len) = (region.ptr, region.len);
        let d = &self.device;
        let mut pointer = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: the device was created with the extension (`request_device`); `ptr` is a host
        // allocation of `len` bytes aligned to the import alignment.
        unsafe { (self.pointer_properties)(d.handle(), HANDLE, ptr.cast(), &mut pointer) }
            .result()
            .map_err(|e| refused("vkGetMemoryHostPointerPropertiesEXT", e))?;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(HANDLE);
        let info = vk::BufferCreateInfo::default()
            .size(len as u64)
            .usage(vk::BufferUsageFlags::TRANSFER_SRC)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: a valid device and create info; the buffer is destroyed below on failure,
        // else by the drop callback.
        let buffer =
            unsafe { d.create_buffer(&info, None) }.map_err(|e| refused("vkCreateBuffer", e))?;
        let bound = self.bind(buffer, ptr, len, pointer.memory_type_bits);
        let memory = match bound {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: the buffer was created above and never used.
                unsafe { d.destroy_buffer(buffer, None) };
                return Err(e);
            }
        };
        Ok((self.wrap(device, buffer, memory, &region), region))
    }

    /// Fresh host memory for an import of at least `len` bytes: whole units of the import
    /// alignment, starting on one.
    fn region(&self, len: usize) -> Result<Arc<HostRegion>> {
        let len = len
            .checked_next_multiple_of(self.align)
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "an imported buffer's size"))?;
        let mut memory = HostBuffer::page_aligned(len + self.align)?;
        let base = memory.as_mut_bytes().as_mut_ptr();
        let skip = base.align_offset(self.align);
        // SAFETY: `skip` < `align`, and the mapping holds `len + align` bytes.
        let ptr = unsafe { base.add(skip) };
        Ok(Arc::new(HostRegion {
            _memory: memory,
            ptr,
            len,
        }))
    }

    /// `buffer` (bound to `memory`, which imports `region`) as a wgpu buffer that destroys
    /// both, then releases the region, once wgpu is done with it.
    fn wrap(
        &self,
        device: &wgpu::Device,
        buffer: vk::Buffer,
        memory: vk::DeviceMemory,
        region: &Arc<HostRegion>,
    ) -> wgpu::Buffer {
        let keep = (self.device.clone(), region.clone());
        let release: wgpu::hal::DropCallback = Box::new(move || {
            let (d, region) = keep;
            // SAFETY: wgpu runs this once the last reference to the buffer is gone and the
            // GPU has finished every submission that used it; the buffer and memory are
            // ours, destroyed once, then the host memory is released.
            unsafe {
                d.destroy_buffer(buffer, None);
                d.free_memory(memory, None);
            }
            drop(region);
        });
        // SAFETY: `buffer` is a valid buffer of the region's length bound to memory; wgpu will
        // not destroy it (externally owned) and will not map it (COPY_SRC only).
        let hal = unsafe { hv::Buffer::from_raw_externally_owned(buffer, release) };
        let desc = wgpu::BufferDescriptor {
            label: Some("tensorplace host-import staging"),
            size: region.len as u64,
            usage: wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        };
        // SAFETY: the hal buffer was created on this device's raw device, with the size and
        // a usage covering `desc`'s, and its bytes are initialized (host memory).
        unsafe { device.create_buffer_from_hal::<Vulkan>(hal, &desc) }
    }

    /// Imports `ptr .. ptr + len` as device memory of a host-visible, coherent type both
    /// the pointer and `buffer` accept, and binds it to `buffer`.
    fn bind(
        &self,
        buffer: vk::Buffer,
        ptr: *mut u8,
        len: usize,
        pointer_types: u32,
    ) -> Result<vk::DeviceMemory> {
        let d = &self.device;
        // SAFETY: a valid buffer of this device.
        let needs = unsafe { d.get_buffer_memory_requirements(buffer) };
        // SAFETY: a valid physical device of this instance.
        let types = unsafe {
            self.instance
                .get_physical_device_memory_properties(self.physical)
        };
        let wanted = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let allowed = needs.memory_type_bits & pointer_types;
        let index = (0..types.memory_type_count)
            .find(|&i| {
                allowed & (1 << i) != 0
                    && types.memory_types[i as usize]
                        .property_flags
                        .contains(wanted)
            })
            .ok_or_else(|| refused("memory types", "no host-visible, coherent type fits"))?;
        if needs.size > len as u64 {
            return Err(refused(
                "buffer requirements",
                format!("{} bytes needed, {len} imported", needs.size),
            ));
        }
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(HANDLE)
            .host_pointer(ptr.cast());
        let info = vk::MemoryAllocateInfo::default()
            .allocation_size(len as u64)
            .memory_type_index(index)
            .push_next(&mut import);
        // SAFETY: `ptr` is an aligned host allocation of `len` bytes (a multiple of the
        // import alignment) that outlives the memory (the drop callback frees the memory
        // before releasing the host allocation); the type was allowed for the pointer.
        let memory = unsafe { d.allocate_memory(&info, None) }
            .map_err(|e| refused("vkAllocateMemory", e))?;
        // SAFETY: fresh buffer and memory of this device, the memory large enough.
        if let Err(e) = unsafe { d.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: allocated above, never used.
            unsafe { d.free_memory(memory, None) };
            return Err(refused("vkBindBufferMemory", e));
        }
        Ok(memory)
    }
}
