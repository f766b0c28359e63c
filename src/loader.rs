//! [`Loader`]: a load with options, the [`Progress`] it reports while it runs, and the
//! [`LoadReport`] its tensors carry afterwards.
//!
//! Every option a load takes is here, on the builder: the library reads no environment
//! variable and keeps no process-wide switch, so two loads in one process with different
//! options never affect each other. The command-line tool maps its flags and environment
//! variables onto these options.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::device::{self, Device, IntoDevice, LoadPlan, Upload, View};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::host::{Fetch, HostFile, ReadMode};
use crate::tensor::Tensors;

/// Progress of a load: input bytes done out of the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes placed so far.
    pub done: u64,
    /// Bytes to place in all.
    pub total: u64,
}

/// How a load went: where the tensors are, how the file's bytes were taken, how they went
/// up to a GPU, and every fallback taken on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// The device the tensors are on (`auto` resolved).
    pub device: Device,
    /// How the file's bytes were taken.
    pub read: ReadPath,
    /// How the bytes went up to a GPU: `Register`, `Staging` or `InPlace` (`None` on the CPU).
    pub upload: Option<Upload>,
    /// Fallbacks taken, in words: direct reads refused by the file system, a registration
    /// refused by the driver, and so on.
    pub notes: Vec<String>,
}

/// How a load took the file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReadPath {
    /// Nothing was copied: CPU tensors view the mapping.
    Views,
    /// Copies from memory: the page cache through the mapping, or the caller's bytes.
    Memory,
    /// Positioned reads (`pread`) on many threads.
    Pread,
    /// Direct reads (`O_DIRECT`) on many threads, past the page cache.
    Direct,
}

impl std::fmt::Display for ReadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadPath::Views => "zero-copy views of the mapping, nothing copied",
            ReadPath::Memory => "copies from memory (the page cache or the caller's bytes)",
            ReadPath::Pread => "positioned reads (pread)",
            ReadPath::Direct => "direct reads (O_DIRECT)",
        })
    }
}

type Filter<'a> = Box<dyn Fn(&str) -> bool + 'a>;
type ProgressFn<'a> = Box<dyn Fn(Progress) + Sync + 'a>;

/// A load with options; the free functions are `Loader::new(device).load_file(path)`.
///
/// ```no_run
/// use tensorplace::{Dtype, Loader, Upload};
/// let layer0 = Loader::new("cuda:0")
///     .dtype(Dtype::BF16)
///     .filter(|name| name.starts_with("model.layers.0."))
///     .upload(Upload::Staging)
///     .progress(|p| eprintln!("{}/{}", p.done, p.total))
///     .load_file("model.safetensors")?;
/// # Ok::<(), tensorplace::Error>(())
/// ```
pub struct Loader<'a> {
    device: Result<Device>,
    dtype: Option<Dtype>,
    filter: Option<Filter<'a>>,
    progress: Option<ProgressFn<'a>>,
    read_mode: ReadMode,
    upload: Upload,
    adapter: Option<String>,
    interrupt: Option<&'a AtomicBool>,
}

impl std::fmt::Debug for Loader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("filter", &self.filter.is_some())
            .field("progress", &self.progress.is_some())
            .field("read_mode", &self.read_mode)
            .field("upload", &self.upload)
            .field("adapter", &self.adapter)
            .field("interrupt", &self.interrupt.is_some())
            .finish()
    }
}

impl<'a> Loader<'a> {
    /// A load onto `device` (a [`Device`] or a device string). An invalid device string is
    /// reported by the load, with its cause.
    pub fn new(device: impl IntoDevice) -> Self {
        Loader {
            device: device.into_device(),
            dtype: None,
            filter: None,
            progress: None,
            read_mode: ReadMode::Mmap,
            upload: Upload::Auto,
            adapter: None,
            interrupt: None,
        }
    }

    /// Casts every floating tensor to `dtype` on the device. A pair without a conversion is
    /// an [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) error naming the tensor;
    /// other tensors load as they are.
    pub fn dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Loads only the tensors whose name `keep` accepts.
    pub fn filter(mut self, keep: impl Fn(&str) -> bool + 'a) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Calls `progress` as bytes are placed (from any thread; `done` never goes back).
    pub fn progress(mut self, progress: impl Fn(Progress) + Sync + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// How the file is read: mapped (the default) or with positioned reads.
    pub fn read_mode(mut self, mode: ReadMode) -> Self {
        self.read_mode = mode;
        self
    }

    /// How tensors go up to a GPU (automatic by default). A strategy the device or the
    /// file cannot take is an [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported)
    /// error; CPU loads have no upload and ignore it.
    pub fn upload(mut self, upload: Upload) -> Self {
        self.upload = upload;
        self
    }

    /// For the device `wgpu`: the first adapter (in the order of `wgpu:N`) whose name
    /// contains `name`, ignoring case. No match is an
    /// [`ErrorKind::DeviceUnavailable`](crate::ErrorKind::DeviceUnavailable) error.
    pub fn adapter(mut self, name: impl Into<String>) -> Self {
        self.adapter = Some(name.into());
        self
    }

    /// Stops the load, from another thread, once `flag` is set: the load returns an
    /// [`ErrorKind::Interrupted`](crate::ErrorKind::Interrupted) error within about one
    /// 4 MiB piece per reader, having freed what it placed (a Ctrl-C handler sets the flag).
    pub fn interrupt(mut self, flag: &'a AtomicBool) -> Self {
        self.interrupt = Some(flag);
        self
    }

    /// Loads the file at `path`. CPU tensors are owned copies: nothing the load returns
    /// depends on the file afterwards.
    ///
    /// A mapped file (the default [`ReadMode`]) is read during this call: it must not be
    /// truncated meanwhile (see the crate's Safety section).
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Tensors> {
        let device = self.device.clone()?;
        let file = HostFile::open(path.as_ref(), self.read_mode)?;
        self.load_host(device, &file, View::Copy)
    }

    /// Loads the file at `path` with CPU tensors as zero-copy views of its mapping, which
    /// stays mapped while any of them lives. On other devices (and for tensors converted to
    /// another dtype) this is [`load_file`](Self::load_file). With [`ReadMode::Pread`]
    /// nothing is mapped and every tensor is a copy.
    ///
    /// # Safety
    ///
    /// The views read the file's pages directly, as `memmap2::Mmap::map` does. The caller
    /// must ensure that the file is neither modified nor truncated, by this process or
    /// another, while any tensor of the result lives: a modification changes the tensors'
    /// bytes under them (undefined behaviour for `&[u8]`), and a truncation makes reading
    /// them raise `SIGBUS`. Replacing the file by renaming another over it (as
    /// [`save_file`](crate::save_file) does) is safe.
    pub unsafe fn load_file_mapped(&self, path: impl AsRef<Path>) -> Result<Tensors> {
        let device = self.device.clone()?;
        let file = HostFile::open(path.as_ref(), self.read_mode)?;
        self.load_host(device, &file, View::Mapped)
    }

    /// Loads a whole file held in `bytes` (copies, on every device).
    pub fn load(&self, bytes: &[u8]) -> Result<Tensors> {
        let device = self.device.clone()?;
        let file = HostFile::from_bytes(bytes)?;
        self.load_host(device, &file, View::Copy)
    }

    /// Loads an opened file: the device is parsed before the file is opened, so that an
    /// invalid device string is reported as such whatever the file holds.
    fn load_host(&self, device: Device, file: &HostFile<'_>, view: View) -> Result<Tensors> {
        let backend = device::open(device, self.adapter.as_deref())?;
        let keep_all = |_: &str| true;
        let keep: &dyn Fn(&str) -> bool = self.filter.as_deref().unwrap_or(&keep_all);
        let progress = &self.progress;
        let report = |done: u64, total: u64| {
            if let Some(p) = progress {
                p(Progress { done, total });
            }
        };
        let plan = LoadPlan::new(file, self.dtype, keep)?
            .with_view(view)
            .with_upload(self.upload)
            .with_progress(&report)
            .with_interrupt(self.interrupt);
        let placed = backend.upload(&plan)?;
        plan.finish();
        let read = match file.fetch_used() {
            Some(Fetch::Memory) => ReadPath::Memory,
            Some(Fetch::Pread) => ReadPath::Pread,
            Some(Fetch::Direct) => ReadPath::Direct,
            // The engine read nothing: views on the CPU, else DMA from the mapping.
            None if backend.device() == Device::Cpu
                && file.mapping().is_some()
                && view == View::Mapped =>
            {
                ReadPath::Views
            }
            None => ReadPath::Memory,
        };
        let (upload, mut notes) = plan.take_report();
        if let Some(why) = file.direct_refused() {
            notes.insert(0, why.to_owned());
        }
        let mut tensors: Tensors = plan
            .items()
            .iter()
            .map(|i| i.name.to_owned())
            .zip(placed)
            .collect();
        tensors.set_metadata(file.header().metadata().cloned());
        tensors.set_report(LoadReport {
            device: backend.device(),
            read,
            upload,
            notes,
        });
        Ok(tensors)
    }
}
