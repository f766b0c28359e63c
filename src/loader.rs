//! [`Loader`]: a load with options, and the [`Progress`] it reports while it runs (its
//! tensors carry a [`LoadReport`](crate::LoadReport) afterwards).
//!
//! Every option a load takes is here, on the builder: the library reads no environment
//! variable and keeps no process-wide switch, so two loads in one process with different
//! options never affect each other. The command-line tool maps its flags and environment
//! variables onto these options.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::backend;
use crate::checkpoint::{self, Checkpoint};
use crate::device::{Device, IntoDevice};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::{Metadata, TensorInfo};
use crate::parallel::{self, Threads};
use crate::plan::{Cast, LoadPlan, PlanEntry, Upload, View};
use crate::read::file::{HostFile, ReadMode};
use crate::reader::Reader;
use crate::report::{LoadReport, ReadPath};
use crate::slice::{Selection, Slice};
use crate::stream::Stream;
use crate::tensor::Tensors;

/// Progress of a load: input bytes done out of the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes placed so far.
    pub done: u64,
    /// Bytes to place in all.
    pub total: u64,
}

type Filter<'a> = Box<dyn Fn(&str) -> bool + 'a>;
type ProgressFn<'a> = Box<dyn Fn(Progress) + Sync + 'a>;
type SplitDim<'a> = Box<dyn Fn(&str, &[usize]) -> Option<usize> + 'a>;

/// A tensor-parallel split: part `rank` of `world`, along the dimension `dim` names.
struct Split<'a> {
    rank: usize,
    world: usize,
    dim: SplitDim<'a>,
}

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
///
/// Parts of tensors: a [`slice`](Self::slice) of one tensor, or each rank's part of a
/// tensor-parallel [`split`](Self::split); only their bytes are read.
///
/// ```no_run
/// use tensorplace::Loader;
/// // Rank 3 of 8: attention and MLP weights split as Megatron splits them, the rest whole.
/// let part = Loader::new("cuda:3")
///     .split(3, 8, |name, _shape| {
///         if name.ends_with("q_proj.weight") || name.ends_with("up_proj.weight") {
///             Some(0)
///         } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
///             Some(1)
///         } else {
///             None
///         }
///     })
///     .load_file("Llama-3.1-8B/")?;
/// // The first 128 rows of the embedding, alone.
/// let rows = Loader::new("cpu")
///     .filter(|name| name == "model.embed_tokens.weight")
///     .slice("model.embed_tokens.weight", "[0:128, :]".parse()?)
///     .load_file("Llama-3.1-8B/")?;
/// # Ok::<(), tensorplace::Error>(())
/// ```
pub struct Loader<'a> {
    device: Result<Device>,
    dtype: Option<Dtype>,
    narrow_64: bool,
    filter: Option<Filter<'a>>,
    slices: HashMap<String, Slice>,
    split: Option<Split<'a>>,
    progress: Option<ProgressFn<'a>>,
    read_mode: ReadMode,
    disk_queue: bool,
    upload: Upload,
    adapter: Option<String>,
    hf_cache: Option<PathBuf>,
    remote: Remote,
    interrupt: Option<&'a AtomicBool>,
}

impl std::fmt::Debug for Loader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("narrow_64", &self.narrow_64)
            .field("filter", &self.filter.is_some())
            .field("slices", &self.slices)
            .field("split", &self.split.as_ref().map(|s| (s.rank, s.world)))
            .field("progress", &self.progress.is_some())
            .field("read_mode", &self.read_mode)
            .field("disk_queue", &self.disk_queue)
            .field("upload", &self.upload)
            .field("adapter", &self.adapter)
            .field("hf_cache", &self.hf_cache)
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
            narrow_64: false,
            filter: None,
            slices: HashMap::new(),
            split: None,
            progress: None,
            read_mode: ReadMode::Mmap,
            disk_queue: true,
            upload: Upload::Auto,
            adapter: None,
            hf_cache: None,
            remote: Remote::default(),
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

    /// Loads I64, U64 and F64 tensors as I32, U32 and F32, on the device, as JAX holds them
    /// without `jax_enable_x64` (and as numpy's `astype` narrows): integers keep their low 32
    /// bits, F64 rounds to nearest. A floating tensor takes [`dtype`](Self::dtype) instead,
    /// where one is given.
    pub fn narrow_64bit(mut self, narrow: bool) -> Self {
        self.narrow_64 = narrow;
        self
    }

    /// Loads only the tensors whose name `keep` accepts.
    pub fn filter(mut self, keep: impl Fn(&str) -> bool + 'a) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Loads tensor `name` as its part `slice` (safetensors' `get_slice` rules), reading
    /// only that part's bytes. The other tensors load as the other options say: add a
    /// [`filter`](Self::filter) to load the slice alone. A name the file or checkpoint does
    /// not have is an [`ErrorKind::TensorNotFound`](crate::ErrorKind::TensorNotFound) error;
    /// a slice that does not fit the tensor, an
    /// [`ErrorKind::InvalidSlice`](crate::ErrorKind::InvalidSlice) error.
    pub fn slice(mut self, name: impl Into<String>, slice: Slice) -> Self {
        self.slices.insert(name.into(), slice);
        self
    }

    /// Tensor parallelism: loads part `rank` of `world` of every tensor for which
    /// `dim(name, shape)` names a dimension, cut along it as `numpy.array_split` cuts (the
    /// first `size % world` parts one longer), reading only that part's bytes; tensors for
    /// which it gives `None` load whole. A tensor given a [`slice`](Self::slice) takes the
    /// slice instead.
    pub fn split(
        mut self,
        rank: usize,
        world: usize,
        dim: impl Fn(&str, &[usize]) -> Option<usize> + 'a,
    ) -> Self {
        self.split = Some(Split {
            rank,
            world,
            dim: Box::new(dim),
        });
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

    /// Whether direct reads from a disk the kernel calls rotational go through one queue
    /// thread per disk, in order (the default: such disks, virtual ones included, serve one
    /// in-order stream best), or every reader thread makes its own requests (`false`).
    /// Disks that take many requests at once (NVMe, SSDs) never queue.
    pub fn disk_queue(mut self, queued: bool) -> Self {
        self.disk_queue = queued;
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

    /// Resolves paths that do not exist on disk and read as Hugging Face repository ids
    /// (`org/name`, `org/name@revision`) from the cache folder `dir`, offline (see
    /// [`crate::hub`]; [`hub::default_cache_dir`](crate::hub::default_cache_dir) names the
    /// folder `huggingface_hub` uses).
    pub fn hf_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hf_cache = Some(dir.into());
        self
    }

    /// How objects given by URL (`s3://`, `gs://`, `az://`, `https://`) are read: store
    /// options over the environment's (credentials, endpoints), the size of each ranged read,
    /// the reads in flight, retries and timeouts (see [`crate::remote`]).
    #[cfg(feature = "remote")]
    pub fn remote(mut self, options: crate::remote::RemoteOptions) -> Self {
        self.remote = options;
        self
    }

    /// `path`, or the checkpoint of the repository id it names (see [`hf_cache`](Self::hf_cache)).
    fn locate<'p>(&self, path: &'p Path) -> Result<std::borrow::Cow<'p, Path>> {
        crate::hub::locate(path, self.hf_cache.as_deref())
    }

    /// A human description of the device this loader's loads go to, its adapter choice
    /// included, such as `cuda:0 (NVIDIA H100 80GB HBM3)`, or the error a load would
    /// return for it (an invalid device string, an absent GPU, no adapter of that name).
    pub fn describe(&self) -> Result<String> {
        let device = self.device.clone()?;
        backend::for_device(device, self.adapter.as_deref()).map(|b| b.describe())
    }

    /// Stops the load, from another thread, once `flag` is set: the load returns an
    /// [`ErrorKind::Interrupted`](crate::ErrorKind::Interrupted) error within about one
    /// 4 MiB piece per reader, having freed what it placed (a Ctrl-C handler sets the flag).
    pub fn interrupt(mut self, flag: &'a AtomicBool) -> Self {
        self.interrupt = Some(flag);
        self
    }

    /// Loads the file at `path`, or the sharded checkpoint of a folder or an index (see
    /// [`Checkpoint::open`]). CPU tensors are owned copies: nothing the load returns depends
    /// on the files afterwards.
    ///
    /// A mapped file (the default [`ReadMode`]) is read during this call: it must not be
    /// truncated meanwhile (see the crate's Safety section).
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Tensors> {
        self.load_path(&self.locate(path.as_ref())?, View::Copy)
    }

    /// Loads the file (or checkpoint) at `path` with CPU tensors as zero-copy views of its
    /// mapping, which stays mapped while any of them lives. On other devices (and for
    /// tensors converted to another dtype, or parts of tensors that are not contiguous in
    /// the file) this is [`load_file`](Self::load_file). With [`ReadMode::Pread`] nothing is
    /// mapped and every tensor is a copy.
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
        self.load_path(&self.locate(path.as_ref())?, View::Mapped)
    }

    /// Opens the file (or checkpoint) at `path` for lazy reads with this loader's device,
    /// dtype, read mode, upload strategy and adapter: a [`Reader`], whose reads cost their
    /// tensors' bytes. Filters, slices, splits, progress and interrupts are per load: a
    /// reader ignores them.
    pub fn reader(&self, path: impl AsRef<Path>) -> Result<Reader> {
        Reader::new(
            &self.locate(path.as_ref())?,
            self.device.clone()?,
            self.adapter.as_deref(),
            &|path| self.open_file(path, self.read_mode),
            &|path| self.open_checkpoint(path),
            self.cast(),
            self.upload,
        )
    }

    /// Streams the tensors of the file or checkpoint at `path` (those the
    /// [`filter`](Self::filter) keeps) one at a time, in file order (shard after shard), read
    /// ahead on two threads of the stream's own while the caller consumes them: at most
    /// `max_bytes` (or the largest tensor, where that is more) loaded and not yet handed out,
    /// provided the caller drops the tensors it has taken. With this loader's device, dtype,
    /// read mode, upload strategy and adapter; slices, splits, progress and interrupts are a
    /// whole load's.
    ///
    /// ```no_run
    /// use tensorplace::Loader;
    /// for item in Loader::new("cuda:0").stream("checkpoint/", 256 << 20)? {
    ///     let (name, tensor) = item?;
    ///     println!("{name}: {:?}", tensor.shape()); // copy it into the model, then drop it
    /// }
    /// # Ok::<(), tensorplace::Error>(())
    /// ```
    pub fn stream(&self, path: impl AsRef<Path>, max_bytes: usize) -> Result<Stream> {
        let reader = self.reader(path)?;
        let names: Vec<String> = reader
            .names()
            .filter(|name| self.filter.as_ref().is_none_or(|keep| keep(name)))
            .map(str::to_owned)
            .collect();
        Stream::new(reader, names, max_bytes)
    }

    /// Loads a whole file held in `bytes` (copies, on every device).
    pub fn load(&self, bytes: &[u8]) -> Result<Tensors> {
        let device = self.device.clone()?;
        let file = HostFile::from_bytes(bytes)?;
        self.check_slices(|name| file.header().tensors().contains_key(name), None)?;
        let metadata = file.header().metadata().cloned();
        self.load_files(device, None, &[file], View::Copy, metadata)
    }

    /// Loads the tensors of an opened checkpoint (all of them, or those the options select),
    /// reading every file they are in at once into one plan: one device arena, progress over
    /// all their bytes. A file whose header changed since [`open`](crate::open) is an
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) error.
    pub fn load_checkpoint(&self, checkpoint: &Checkpoint) -> Result<Tensors> {
        self.load_opened(checkpoint, View::Copy)
    }

    /// What the loads convert.
    fn cast(&self) -> Cast {
        Cast {
            dtype: self.dtype,
            narrow_64: self.narrow_64,
        }
    }

    fn load_path(&self, path: &Path, view: View) -> Result<Tensors> {
        let device = self.device.clone()?;
        if checkpoint::is_multi_file(path) {
            return self.load_opened(&self.open_checkpoint(path)?, view);
        }
        let file = self.open_file(path, self.read_mode)?;
        self.check_slices(|n| file.header().tensors().contains_key(n), Some(path))?;
        let metadata = file.header().metadata().cloned();
        self.load_files(device, Some(path), &[file], view, metadata)
    }

    fn load_opened(&self, checkpoint: &Checkpoint, view: View) -> Result<Tensors> {
        let device = self.device.clone()?;
        self.check_slices(|n| checkpoint.get(n).is_some(), Some(checkpoint.path()))?;
        let keep = |name: &str| self.keeps(name);
        let chosen = checkpoint.plan_files(&keep);
        let threads = if chosen.len() > 1 {
            Threads::Io
        } else {
            Threads::Caller
        };
        let (mode, disk_queue, remote) = (self.read_mode, self.disk_queue, &self.remote);
        let files = parallel::map(chosen, threads, |(path, header, names)| {
            let file = open_file(path, mode, disk_queue, remote)?;
            // The layout the checkpoint recorded must still hold.
            for name in names {
                let now = file.header().tensors().get(name);
                let then = header.tensors().get(name);
                let same = match (now, then) {
                    (Some(a), Some(b)) => {
                        a == b && file.header().file_range(a) == header.file_range(b)
                    }
                    _ => false,
                };
                if !same {
                    return Err(Error::new(
                        ErrorKind::Io,
                        "the file changed since the checkpoint was opened",
                    )
                    .with_tensor(name)
                    .with_file(path));
                }
            }
            Ok(file)
        })?;
        let metadata = checkpoint.metadata().cloned();
        self.load_files(device, Some(checkpoint.path()), &files, view, metadata)
    }

    /// Opens the checkpoint at `path` (a folder or an index; an index's URL with this
    /// loader's remote options).
    fn open_checkpoint(&self, path: &Path) -> Result<Checkpoint> {
        open_checkpoint(path, &self.remote)
    }

    /// Opens `path` to be read as `mode` says, with this loader's disk queue choice; an
    /// object's URL with its remote options.
    fn open_file(&self, path: &Path, mode: ReadMode) -> Result<HostFile<'static>> {
        open_file(path, mode, self.disk_queue, &self.remote)
    }

    /// Whether the filter keeps `name`.
    fn keeps(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|keep| keep(name))
    }

    /// Fails on a slice of a tensor that `has` says is not there.
    fn check_slices(&self, has: impl Fn(&str) -> bool, origin: Option<&Path>) -> Result<()> {
        match self.slices.keys().find(|name| !has(name)) {
            Some(name) => Err(Error::new(
                ErrorKind::TensorNotFound,
                "a slice of a tensor that is not there",
            )
            .with_tensor(name)
            .with_opt_file(origin)),
            None => Ok(()),
        }
    }

    /// What to take of tensor `name`.
    fn selection(&self, name: &str, info: &TensorInfo) -> Selection<'_> {
        if let Some(slice) = self.slices.get(name) {
            return Selection::Slice(slice);
        }
        match &self.split {
            Some(split) => match (split.dim)(name, &info.shape) {
                Some(dim) => Selection::Part {
                    dim,
                    rank: split.rank,
                    world: split.world,
                },
                None => Selection::Whole,
            },
            None => Selection::Whole,
        }
    }

    /// Loads what the options select of `files` (from `origin`: a file or a checkpoint's
    /// folder): the device is parsed before the files are opened, so that an invalid device
    /// string is reported as such whatever the files hold.
    fn load_files(
        &self,
        device: Device,
        origin: Option<&Path>,
        files: &[HostFile<'_>],
        view: View,
        metadata: Option<Metadata>,
    ) -> Result<Tensors> {
        let backend = backend::for_device(device, self.adapter.as_deref())?;
        let progress = &self.progress;
        let report = |done: u64, total: u64| {
            if let Some(p) = progress {
                p(Progress { done, total });
            }
        };
        let plan = LoadPlan::new(origin, self.entries(files), self.cast())?
            .with_view(view)
            .with_upload(self.upload)
            .with_progress(&report)
            .with_interrupt(self.interrupt);
        mark_partial_files(&plan);
        let placed = backend::place(&*backend, &plan)?;
        plan.finish();
        let mut tensors: Tensors = plan
            .items()
            .iter()
            .map(|i| i.name.to_owned())
            .zip(placed)
            .collect();
        tensors.set_metadata(metadata);
        tensors.set_report(load_report(backend.device(), files, &plan));
        Ok(tensors)
    }

    /// What the load takes of `files`: every tensor the filter keeps, in file order, each
    /// whole or as its slice or split says.
    fn entries<'f>(&'f self, files: &'f [HostFile<'f>]) -> Vec<PlanEntry<'f>> {
        files
            .iter()
            .flat_map(|file| {
                file.tensors()
                    .filter(|(name, _)| self.keeps(name))
                    .map(move |(name, info)| PlanEntry {
                        name,
                        file,
                        info,
                        selection: self.selection(name, info),
                    })
            })
            .collect()
    }
}

/// Marks the mapped files `plan` takes less than half of, so that their long runs are read,
/// not faulted in (the items are in file order: one pass sums each file's share), and notes
/// it in the plan's report.
fn mark_partial_files(plan: &LoadPlan<'_>) {
    let (mut k, mut partial) = (0, 0);
    while let Some(first) = plan.items().get(k) {
        let (count, taken) = plan.items()[k..]
            .iter()
            .take_while(|i| std::ptr::eq(i.file, first.file))
            .fold((0, 0), |(n, b), i| (n + 1, b + i.in_len()));
        if taken < first.file.header().data_len() / 2 && first.file.mark_partial() {
            partial += 1;
        }
        k += count;
    }
    if partial > 0 {
        plan.note(format!(
            "the load takes a small part of {partial} mapped file(s): their runs of 64 KiB \
             or more were read with pread rather than through the mapping"
        ));
    }
}

/// How the load of `files` onto `device` by `plan` went: how the bytes were read, the upload
/// path, and every fallback (direct reads a file system refused first).
fn load_report(device: Device, files: &[HostFile<'_>], plan: &LoadPlan<'_>) -> LoadReport {
    let read = match files.iter().find_map(|f| f.read_path_used()) {
        Some(path) => path,
        // The engine read nothing: views on the CPU, else DMA from the mapping.
        None if device == Device::Cpu
            && files.iter().any(|f| f.mapping().is_some())
            && plan.view() == View::Mapped =>
        {
            ReadPath::Views
        }
        None => ReadPath::Memory,
    };
    let (upload, mut notes) = plan.take_report();
    for why in files.iter().filter_map(|f| f.direct_refused()) {
        if !notes.iter().any(|n| n == why) {
            notes.insert(0, why.to_owned());
        }
    }
    LoadReport {
        device,
        read,
        upload,
        notes,
    }
}

/// The options objects given by URL are read with (nothing without the `remote` feature).
#[cfg(feature = "remote")]
type Remote = crate::remote::RemoteOptions;
#[cfg(not(feature = "remote"))]
type Remote = ();

/// Opens the checkpoint at `path` (a folder or an index); an index's URL with `remote`.
pub(crate) fn open_checkpoint(path: &Path, remote: &Remote) -> Result<Checkpoint> {
    #[cfg(feature = "remote")]
    if let Some(url) = path.to_str().filter(|_| crate::remote::is_url(path)) {
        return Checkpoint::open_remote(url, remote);
    }
    #[cfg(not(feature = "remote"))]
    let () = remote;
    Checkpoint::open(path)
}

/// Opens `path` to be read as `mode` says (its direct reads through its disk's queue where
/// `disk_queue`); an object's URL with `remote`.
pub(crate) fn open_file(
    path: &Path,
    mode: ReadMode,
    disk_queue: bool,
    remote: &Remote,
) -> Result<HostFile<'static>> {
    #[cfg(feature = "remote")]
    if let Some(url) = path.to_str().filter(|_| crate::remote::is_url(path)) {
        return crate::remote::open(url, remote);
    }
    #[cfg(not(feature = "remote"))]
    let () = remote;
    let mut file = HostFile::open(path, mode)?;
    file.set_disk_queue(disk_queue);
    Ok(file)
}
