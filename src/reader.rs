//! [`Reader`]: lazy access to a file or a sharded checkpoint, as `safetensors.safe_open`
//! gives it. Opening reads and validates the headers once, keeps every file open (mapped,
//! or for positioned reads) and opens the device's backend; each read then costs its
//! tensor's bytes: one small plan, one copy (or upload), on the calling thread where the
//! tensor is small.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::{self, Checkpoint};
use crate::device::{self, Backend, Device, LoadPlan, PlanEntry, Upload};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::{Metadata, TensorInfo};
use crate::host::{Fetch, HostFile, ReadMode};
use crate::io::{self, Gather};
use crate::memory::HostBuffer;
use crate::slice::{Selection, Slice};
use crate::tensor::{CpuStorage, Storage, Tensor, Tensors};

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
/// readahead serve a loop over them); larger ones, and every tensor of a file opened with
/// [`ReadMode::Pread`] or [`ReadMode::Direct`], are read the way a load reads them. A mapped
/// file must not be truncated while a read runs (see the crate's Safety section); what a
/// read returns never depends on the file afterwards.
pub struct Reader {
    origin: PathBuf,
    files: Vec<HostFile<'static>>,
    /// Each tensor's file, by name.
    index: HashMap<String, usize>,
    metadata: Option<Metadata>,
    backend: Arc<dyn Backend>,
    dtype: Option<Dtype>,
    upload: Upload,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("origin", &self.origin)
            .field("files", &self.files.len())
            .field("tensors", &self.index.len())
            .field("device", &self.backend.device())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Reader {
    /// Opens `path` (a file, a folder of shards or an index) for reads onto `device`
    /// (resolved now: an absent GPU is an error here), each file read as `mode` says, floating
    /// tensors cast to `dtype` where given.
    pub(crate) fn open(
        path: &Path,
        device: Device,
        adapter: Option<&str>,
        mode: ReadMode,
        dtype: Option<Dtype>,
        upload: Upload,
    ) -> Result<Reader> {
        let backend = device::open(device, adapter)?;
        let (paths, metadata) = if checkpoint::is_multi_file(path) {
            let ckpt = Checkpoint::open(path)?;
            let paths: Vec<PathBuf> = ckpt.files().map(Path::to_path_buf).collect();
            (paths, ckpt.metadata().cloned())
        } else {
            (vec![path.to_path_buf()], None)
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (k, p) in paths.iter().enumerate() {
            let mut file = HostFile::open(p, mode)?;
            file.set_lazy();
            for (name, _) in file.tensors() {
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
        Ok(Reader {
            origin: path.to_path_buf(),
            files,
            index,
            metadata,
            backend,
            dtype,
            upload,
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
        self.index.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
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
        let (_, info) = self.locate(name)?;
        Ok((info.dtype, &info.shape))
    }

    /// The file that holds tensor `name`.
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        let (k, _) = self.locate(name)?;
        Ok(self.file_of_index(k))
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
        let mut wanted: Vec<(usize, usize, &str)> = Vec::new();
        for name in names {
            let (k, info) = self.locate(name)?;
            wanted.push((k, info.data_offsets.0, name));
        }
        wanted.sort_unstable();
        wanted.dedup();
        let entries = wanted
            .iter()
            .map(|&(k, _, name)| self.entry(k, name, Selection::Whole))
            .collect::<Result<Vec<_>>>()?;
        let placed = self.place(entries)?;
        let mut out: Tensors = wanted
            .iter()
            .map(|&(_, _, name)| name.to_owned())
            .zip(placed)
            .collect();
        out.set_metadata(self.metadata.clone());
        Ok(out)
    }

    fn read_one(&self, name: &str, selection: Selection<'_>) -> Result<Tensor> {
        let (k, info) = self.locate(name)?;
        let tag = |e: Error| e.with_tensor(name).with_file(self.file_of_index(k));
        if self.copies_from_memory(info) {
            let file = &self.files[k];
            let (shape, gather) = selection
                .resolve(info, file.header().file_range(info))
                .map_err(tag)?;
            if let Some(bytes) = file.bytes().filter(|_| self.in_memory(file, &gather)) {
                return copy_out(bytes, &gather)
                    .map(|storage| Tensor::from_parts(info.dtype, shape, Storage::Cpu(storage)))
                    .map_err(tag);
            }
        }
        let entry = self.entry(k, name, selection)?;
        self.place(vec![entry])?.pop().ok_or_else(|| {
            tag(Error::new(
                ErrorKind::Backend,
                "the backend placed no tensor",
            ))
        })
    }

    /// Whether a read of a tensor of `info` may be copied straight out of memory: onto the
    /// CPU, unconverted.
    fn copies_from_memory(&self, info: &TensorInfo) -> bool {
        let converts = self
            .dtype
            .is_some_and(|to| info.dtype.is_float() && info.dtype != to);
        self.backend.device() == Device::Cpu && !converts
    }

    /// Whether the bytes `gather` of `file` are copied out of its mapping with no plan: at
    /// most one piece (a load would copy it on the calling thread too) that the engine would
    /// take from the mapping.
    fn in_memory(&self, file: &HostFile<'_>, gather: &Gather) -> bool {
        let len = gather.len();
        file.mapping().is_some()
            && len <= io::PIECE
            && (len < io::SMALL || file.fetch() == Fetch::Memory)
    }

    fn file_of_index(&self, k: usize) -> &Path {
        self.files[k].path().unwrap_or(&self.origin)
    }

    /// Places `entries` (in file order) on the device.
    fn place(&self, entries: Vec<PlanEntry<'_>>) -> Result<Vec<Tensor>> {
        let plan = LoadPlan::new(Some(&self.origin), entries, self.dtype)?.with_upload(self.upload);
        let placed = self.backend.upload(&plan)?;
        plan.finish();
        Ok(placed)
    }

    fn entry<'s>(
        &'s self,
        k: usize,
        name: &str,
        selection: Selection<'s>,
    ) -> Result<PlanEntry<'s>> {
        let file = &self.files[k];
        let (name, info) = file
            .header()
            .tensors()
            .get_key_value(name)
            .ok_or_else(|| self.not_found(name))?;
        Ok(PlanEntry {
            name,
            file,
            info,
            selection,
        })
    }

    fn locate(&self, name: &str) -> Result<(usize, &TensorInfo)> {
        let k = *self.index.get(name).ok_or_else(|| self.not_found(name))?;
        let info = self.files[k]
            .header()
            .tensors()
            .get(name)
            .ok_or_else(|| self.not_found(name))?;
        Ok((k, info))
    }

    fn not_found(&self, name: &str) -> Error {
        Error::new(ErrorKind::TensorNotFound, "no tensor of that name")
            .with_tensor(name)
            .with_file(&self.origin)
    }
}

/// The bytes `gather` of `bytes` (a file's), copied into owned memory run by run.
fn copy_out(bytes: &[u8], gather: &Gather) -> Result<CpuStorage> {
    let mut buffer = HostBuffer::zeroed(gather.len())?;
    let out = buffer.as_mut_bytes();
    for (range, at) in gather.segments(0..gather.len()) {
        let src = bytes.get(range.clone()).ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("bytes {range:?} lie past the end of the mapping"),
            )
        })?;
        out[at..at + src.len()].copy_from_slice(src);
    }
    let len = buffer.len();
    Ok(CpuStorage::owned(Arc::new(buffer), 0..len))
}
