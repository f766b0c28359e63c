//! [`Reader`]: lazy access to a file or a sharded checkpoint, as `safetensors.safe_open`
//! gives it. Opening reads and validates the headers once, keeps every file open (mapped,
//! or for positioned reads) and opens the device's backend; each read then costs its
//! tensor's bytes: one small plan, one copy (or upload), on the calling thread where the
//! tensor is small.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, Mmap};

use crate::backend::{self, Backend};
use crate::checkpoint::{self, Checkpoint};
use crate::device::Device;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::{Metadata, TensorInfo};
use crate::memory::{BLOCK_PIECE, Carver, HostBuffer};
use crate::plan::{Cast, LoadPlan, PlanEntry, Upload};
use crate::read;
use crate::read::file::HostFile;
use crate::read::gather::Gather;
use crate::slice::{Selection, Slice};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::{Tensor, Tensors};

/// A file or checkpoint opened for lazy reads: [`tensor`](Self::tensor),
/// [`slice`](Self::slice) and [`tensors`](Self::tensors) read only what they return. `Sync`:
/// many threads may read through one reader at once.
///
/// ```no_run
/// use tensorplace::Loader;
/// let reader = Loader::new("cpu").reader("model.safetensors")?;
/// for name in reader.names() {
///     let t = reader.tensor(name)?;
///     println!("{name}: {} {:?}", t.dtype(), t.shape());
/// }
/// let rows = reader.slice("lm_head.weight", &"[0:128, :]".parse()?)?;
/// # Ok::<(), tensorplace::Error>(())
/// ```
///
/// Small tensors of a mapped file are copied out of the mapping (the page cache and its
/// readahead serve a loop over them, the mapping's pages mapped 2 MiB at a time), into 2 MiB
/// blocks that small reads share (one page fault for many tensors; a block is freed with the
/// last tensor in it); larger ones, and every tensor of a file opened with
/// [`ReadMode::Pread`] or [`ReadMode::Direct`], are read the way a load reads them. A mapped
/// file must not be truncated while a read runs (see the crate's Safety section); what a
/// read returns never depends on the file afterwards.
pub struct Reader {
    origin: PathBuf,
    files: Vec<HostFile<'static>>,
    /// Each tensor's file, by name, for a checkpoint of several files (one file's header is
    /// its own index).
    index: HashMap<String, usize>,
    metadata: Option<Metadata>,
    backend: Arc<dyn Backend>,
    cast: Cast,
    upload: Upload,
    /// The least capacity of the CPU arena of each read (see [`LoadPlan::with_arena_capacity`]).
    arena_capacity: usize,
    /// Memory for small reads: shared blocks, one page fault for many tensors.
    blocks: Carver,
    /// Per file, which windows of its mapping have their pages mapped (see `populate`).
    populated: Vec<Windows>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("origin", &self.origin)
            .field("files", &self.files.len())
            .field("tensors", &self.len())
            .field("device", &self.backend.device())
            .field("cast", &self.cast)
            .finish()
    }
}

impl Reader {
    /// Opens `path` (a file, a folder of shards or an index) for reads onto `device`
    /// (resolved now: an absent GPU is an error here), each file opened by `open` (the
    /// loader's read mode, disk queue and remote options) and a checkpoint by
    /// `open_checkpoint`, tensors converted as `cast` says.
    pub(crate) fn new(
        path: &Path,
        device: Device,
        adapter: Option<&str>,
        open: &dyn Fn(&Path) -> Result<HostFile<'static>>,
        open_checkpoint: &dyn Fn(&Path) -> Result<Checkpoint>,
        cast: Cast,
        upload: Upload,
    ) -> Result<Reader> {
        let backend = backend::for_device(device, adapter)?;
        let (paths, metadata) = if checkpoint::is_multi_file(path) {
            let ckpt = open_checkpoint(path)?;
            let paths: Vec<PathBuf> = ckpt.files().map(Path::to_path_buf).collect();
            (paths, ckpt.metadata().cloned())
        } else {
            (vec![path.to_path_buf()], None)
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (k, p) in paths.iter().enumerate() {
            let mut file = open(p)?;
            file.set_lazy();
            // One file's header is its own index.
            for (name, _) in file.tensors().filter(|_| paths.len() > 1) {
                if index.insert(name.to_owned(), k).is_some() {
                    return Err(Error::new(
                        ErrorKind::InvalidIndex,
                        "the tensor is in two files of the checkpoint",
                    )
                    .with_tensor(name)
                    .with_file(p));
                }
            }
            files.push(file);
        }
        let metadata = match (files.as_slice(), metadata) {
            ([one], None) => one.header().metadata().cloned(),
            (_, metadata) => metadata,
        };
        let populated = files
            .iter()
            .map(|f| Windows::new(usize::try_from(f.len()).unwrap_or(usize::MAX)))
            .collect();
        Ok(Reader {
            origin: path.to_path_buf(),
            files,
            index,
            metadata,
            backend,
            cast,
            upload,
            arena_capacity: 0,
            blocks: Carver::default(),
            populated,
        })
    }

    /// The tensors' names in file order (file after file, for a checkpoint).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files
            .iter()
            .flat_map(|f| f.tensors().map(|(name, _)| name))
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.files.iter().map(|f| f.header().tensors().len()).sum()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `__metadata__` (a checkpoint's where all its files agree).
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }

    /// The device reads go to (`auto` resolved).
    pub fn device(&self) -> Device {
        self.backend.device()
    }

    /// The dtype and shape of tensor `name` as stored, reading nothing.
    pub fn info(&self, name: &str) -> Result<(Dtype, &[usize])> {
        let at = self.locate(name)?;
        Ok((at.info.dtype, &at.info.shape))
    }

    /// The file that holds tensor `name`.
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        Ok(self.file_of_index(self.locate(name)?.file))
    }

    /// Reads tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.read_one(name, Selection::Whole)
    }

    /// Reads part `slice` of tensor `name` (safetensors' `get_slice` rules): only its bytes.
    pub fn slice(&self, name: &str, slice: &Slice) -> Result<Tensor> {
        self.read_one(name, Selection::Slice(slice))
    }

    /// Reads the tensors `names` in one pass over the files (neighbours in one request where
    /// they are read from a disk), in file order; a name given twice is read once.
    pub fn tensors<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Result<Tensors> {
        let mut wanted: Vec<Located<'_>> = names
            .into_iter()
            .map(|name| self.locate(name))
            .collect::<Result<_>>()?;
        // File order (empty tensors may share an offset: then name order); a name given
        // twice is read once.
        let key = |at: &Located<'_>| (at.file, at.info.data_offsets.0);
        wanted.sort_unstable_by(|a, b| key(a).cmp(&key(b)).then(a.name.cmp(b.name)));
        wanted.dedup_by(|a, b| a.file == b.file && a.name == b.name);
        let entries = wanted
            .iter()
            .map(|&at| self.entry(at, Selection::Whole))
            .collect();
        let placed = self.place(entries)?;
        let mut out: Tensors = wanted
            .iter()
            .map(|at| at.name.to_owned())
            .zip(placed)
            .collect();
        out.set_metadata(self.metadata.clone());
        Ok(out)
    }

    /// Reads `parts` (each a tensor's name and the part of it to take: whole, or a slice) in
    /// one pass over the files, returned in the order given: the shards of a sharded load,
    /// several parts of one tensor among them. A part asked twice is read twice.
    pub fn parts(&self, parts: &[(&str, Option<&Slice>)]) -> Result<Vec<Tensor>> {
        self.parts_with(&*self.backend, parts)
    }

    /// [`parts`](Self::parts), each part onto a device of its own (`(name, slice, device)`):
    /// the shards of a load over several devices, such as the eight GPUs of a mesh, in one
    /// call. The parts of each device are read in one pass over the files, straight into
    /// that device's memory (no host copy where the device is a GPU), device after device;
    /// the reader's own device, dtype, narrowing and upload strategy otherwise.
    pub fn parts_on(&self, parts: &[(&str, Option<&Slice>, Device)]) -> Result<Vec<Tensor>> {
        let mut groups: Vec<(Device, Vec<usize>)> = Vec::new();
        for (k, (_, _, device)) in parts.iter().enumerate() {
            match groups.iter_mut().find(|(d, _)| d == device) {
                Some((_, members)) => members.push(k),
                None => groups.push((*device, vec![k])),
            }
        }
        let mut placed = Vec::with_capacity(parts.len());
        for (device, members) in groups {
            let backend = match device == self.backend.device() {
                true => self.backend.clone(),
                false => backend::for_device(device, None)?,
            };
            let asked: Vec<(&str, Option<&Slice>)> =
                members.iter().map(|&k| (parts[k].0, parts[k].1)).collect();
            placed.extend(members.into_iter().zip(self.parts_with(&*backend, &asked)?));
        }
        in_asked_order(parts.len(), placed)
    }

    fn parts_with(
        &self,
        backend: &dyn Backend,
        parts: &[(&str, Option<&Slice>)],
    ) -> Result<Vec<Tensor>> {
        let mut wanted: Vec<(usize, Located<'_>, Selection<'_>)> = parts
            .iter()
            .enumerate()
            .map(|(k, &(name, slice))| {
                let selection = slice.map_or(Selection::Whole, Selection::Slice);
                Ok((k, self.locate(name)?, selection))
            })
            .collect::<Result<_>>()?;
        // File order, so that the pass reads each file front to back.
        wanted.sort_by_key(|(k, at, _)| (at.file, at.info.data_offsets.0, *k));
        let order: Vec<usize> = wanted.iter().map(|(k, _, _)| *k).collect();
        let entries = wanted
            .into_iter()
            .map(|(_, at, selection)| self.entry(at, selection))
            .collect();
        in_asked_order(
            parts.len(),
            order.into_iter().zip(self.place_on(backend, entries)?),
        )
    }

    /// The read of tensor `name` (or of part `slice` of it) where it is one copy straight
    /// out of a mapped file's memory: onto the CPU, unconverted, small (or already in the page
    /// cache), nothing to plan. `None` where the read needs a load
    /// ([`tensor`](Self::tensor) and [`slice`](Self::slice) do both). The caller gives the
    /// memory ([`MemoryRead::copy_to`]): a binding can copy into an object of its own.
    pub fn memory_read(&self, name: &str, slice: Option<&Slice>) -> Result<Option<MemoryRead<'_>>> {
        let selection = slice.map_or(Selection::Whole, Selection::Slice);
        self.memory_read_at(self.locate(name)?, selection)
    }

    fn memory_read_at<'r>(
        &'r self,
        at: Located<'r>,
        selection: Selection<'_>,
    ) -> Result<Option<MemoryRead<'r>>> {
        let Located {
            file: k,
            name,
            info,
        } = at;
        if !self.copies_from_memory(info) {
            return Ok(None);
        }
        let file = &self.files[k];
        let (shape, gather) = selection
            .resolve(info, file.header().file_range(info))
            .map_err(|e| e.with_tensor(name).with_file(self.file_of_index(k)))?;
        let Some(bytes) = file.bytes().filter(|_| self.in_memory(file, &gather)) else {
            return Ok(None);
        };
        // (A slice's rows may lie far apart: only spans a small read would touch anyway.)
        let span = gather.bounds();
        if let Some(map) = file.mapping().filter(|_| span.len() <= read::PIECE) {
            self.populated[k].populate(map, span);
        }
        Ok(Some(MemoryRead {
            dtype: info.dtype,
            shape,
            gather,
            bytes,
            name,
            file: self.file_of_index(k),
        }))
    }

    fn read_one(&self, name: &str, selection: Selection<'_>) -> Result<Tensor> {
        let at = self.locate(name)?;
        if let Some(read) = self.memory_read_at(at, selection)? {
            let storage = if read.len() <= BLOCK_PIECE {
                let mut carved = self.blocks.carve(read.len()).map_err(|e| read.tag(e))?;
                read.copy_to(carved.as_mut_bytes())?;
                CpuStorage::carved(carved)
            } else {
                let mut buffer = HostBuffer::reusable(read.len(), 0).map_err(|e| read.tag(e))?;
                read.copy_to(buffer.as_mut_bytes())?;
                let len = buffer.len();
                CpuStorage::owned(Arc::new(buffer), 0..len)
            };
            return Ok(Tensor::from_parts(
                read.dtype,
                read.shape,
                Storage::Cpu(storage),
            ));
        }
        let k = at.file;
        let entry = self.entry(at, selection);
        self.place(vec![entry])?.pop().ok_or_else(|| {
            Error::new(ErrorKind::Backend, "the backend placed no tensor")
                .with_tensor(name)
                .with_file(self.file_of_index(k))
        })
    }

    /// Whether a read of a tensor of `info` may be copied straight out of memory: onto the
    /// CPU, unconverted.
    fn copies_from_memory(&self, info: &TensorInfo) -> bool {
        let converts = !matches!(self.cast.conversion(info.dtype), Ok(None));
        self.backend.device() == Device::Cpu && !converts
    }

    /// Whether the bytes `gather` of `file` are copied out of its mapping with no plan: at
    /// most one piece (a load would copy it on the calling thread too) that the engine would
    /// take from the mapping.
    fn in_memory(&self, file: &HostFile<'_>, gather: &Gather) -> bool {
        let len = gather.len();
        file.mapping().is_some()
            && len <= read::PIECE
            && (len < read::SMALL || file.read_path() == read::ReadPath::Memory)
    }

    fn file_of_index(&self, k: usize) -> &Path {
        self.files[k].path().unwrap_or(&self.origin)
    }

    /// Gives the CPU arena of each read a capacity of at least `capacity` bytes, so that
    /// reads of varying sizes (a stream's batches) take each other's memory when freed.
    pub(crate) fn set_arena_capacity(&mut self, capacity: usize) {
        self.arena_capacity = capacity;
    }

    /// Places `entries` (in file order) on the device.
    fn place(&self, entries: Vec<PlanEntry<'_>>) -> Result<Vec<Tensor>> {
        self.place_on(&*self.backend, entries)
    }

    fn place_on(&self, backend: &dyn Backend, entries: Vec<PlanEntry<'_>>) -> Result<Vec<Tensor>> {
        let plan = LoadPlan::new(Some(&self.origin), entries, self.cast)?
            .with_upload(self.upload)
            .with_arena_capacity(self.arena_capacity);
        let placed = backend::place(backend, &plan)?;
        plan.finish();
        Ok(placed)
    }

    /// The plan entry of a located tensor: what of it to take.
    fn entry<'s>(&'s self, at: Located<'s>, selection: Selection<'s>) -> PlanEntry<'s> {
        PlanEntry {
            name: at.name,
            file: &self.files[at.file],
            info: at.info,
            selection,
        }
    }

    /// Tensor `name`: its file, its name as the header holds it, and its entry.
    fn locate(&self, name: &str) -> Result<Located<'_>> {
        let k = match self.files.len() {
            1 => 0,
            _ => *self.index.get(name).ok_or_else(|| self.not_found(name))?,
        };
        let (name, info) = self.files[k]
            .header()
            .tensors()
            .get_key_value(name)
            .ok_or_else(|| self.not_found(name))?;
        Ok(Located {
            file: k,
            name,
            info,
        })
    }

    fn not_found(&self, name: &str) -> Error {
        Error::new(ErrorKind::TensorNotFound, "no tensor of that name")
            .with_tensor(name)
            .with_file(&self.origin)
    }
}

/// A tensor found in a [`Reader`]: its file's index, its name as the header holds it, and
/// its header entry.
#[derive(Debug, Clone, Copy)]
struct Located<'r> {
    file: usize,
    name: &'r str,
    info: &'r TensorInfo,
}

/// A read served by one copy out of a mapped file ([`Reader::memory_read`]): the tensor's
/// dtype and shape (a slice's shape, for a slice), its length in bytes, and the copy.
#[derive(Debug)]
pub struct MemoryRead<'r> {
    dtype: Dtype,
    shape: Vec<usize>,
    gather: Gather,
    /// The whole file's bytes (its mapping).
    bytes: &'r [u8],
    name: &'r str,
    file: &'r Path,
}

impl MemoryRead<'_> {
    /// The dtype of the bytes read (the stored one: such a read converts nothing).
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape of what is read.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The length in bytes of what is read.
    pub fn len(&self) -> usize {
        self.gather.len()
    }

    /// Whether nothing is read (an empty tensor or slice).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the bytes into `out`, whose length must be [`len`](Self::len) (else an
    /// [`ErrorKind::InvalidTensor`] error), run by run for a slice.
    pub fn copy_to(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.len() {
            return Err(self.tag(Error::new(
                ErrorKind::InvalidTensor,
                format!(
                    "the destination holds {} bytes, the read {}",
                    out.len(),
                    self.len()
                ),
            )));
        }
        for (range, at) in self.gather.segments(0..self.len()) {
            let src = self.bytes.get(range.clone()).ok_or_else(|| {
                self.tag(Error::new(
                    ErrorKind::Io,
                    format!("bytes {range:?} lie past the end of the mapping"),
                ))
            })?;
            out[at..at + src.len()].copy_from_slice(src);
        }
        Ok(())
    }

    fn tag(&self, e: Error) -> Error {
        e.with_tensor(self.name).with_file(self.file)
    }
}

/// The windows of a file's mapping whose pages a reader has had mapped in one call: a loop
/// of small reads would otherwise take a page fault every few tensors (the kernel maps 16
/// pages around a faulting one), each costing about as much as a small tensor's copy.
#[derive(Debug)]
struct Windows(Vec<AtomicU64>);

/// The size of a [`Windows`] window.
const WINDOW: usize = 2 << 20;

impl Windows {
    fn new(file_len: usize) -> Windows {
        let windows = file_len.div_ceil(WINDOW);
        Windows(
            (0..windows.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    /// Maps the pages of every window of `map` that `span` (bytes of the file) touches and no
    /// earlier read did (`MADV_POPULATE_READ`: the page cache's pages, reading what is not
    /// there yet as a fault would). A hint: where the kernel refuses, faults do the work.
    fn populate(&self, map: &Mmap, span: Range<usize>) {
        if span.is_empty() {
            return;
        }
        for w in span.start / WINDOW..=(span.end - 1) / WINDOW {
            let Some(word) = self.0.get(w / 64) else {
                return;
            };
            let bit = 1u64 << (w % 64);
            if word.load(Ordering::Relaxed) & bit == 0
                && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
            {
                let start = w * WINDOW;
                let len = WINDOW.min(map.len().saturating_sub(start));
                let _ = map.advise_range(Advice::PopulateRead, start, len);
            }
        }
    }
}

/// The `count` parts asked, each given with its place in the asking: in that order, an error
/// where the backend placed none.
fn in_asked_order(
    count: usize,
    placed: impl IntoIterator<Item = (usize, Tensor)>,
) -> Result<Vec<Tensor>> {
    let mut ordered: Vec<Option<Tensor>> = vec![None; count];
    for (k, t) in placed {
        ordered[k] = Some(t);
    }
    ordered
        .into_iter()
        .map(|t| t.ok_or_else(|| Error::new(ErrorKind::Backend, "the backend placed no part")))
        .collect()
}
