//! The native half of the `tensorplace` Python package: loads and saves through the
//! `tensorplace` crate, and hands every tensor to numpy, JAX or torch through DLPack
//! without a copy (each capsule keeps the tensor's memory alive until the framework frees
//! the array).
//!
//! The Python modules (`tensorplace.numpy`, `.flax`, `.torch`, `safe_open`) are thin: they
//! call the functions here and wrap the `_Tensor` views with their framework's
//! `from_dlpack`.

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dlpark::ffi::{
    DLDataType, DLDataTypeCode, DLDevice, DLManagedTensor, DLManagedTensorVersioned,
};
use dlpark::metadata::Dynamic;
use dlpark::python::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyTuple};
use tensorplace::{
    Device, Dtype, Loader, MemoryRead, Metadata, ReadMode, Slice, Storage, Stream, Tensor,
    TensorView, Tensors,
};

create_exception!(
    _tensorplace,
    Error,
    PyException,
    "A tensorplace error: args are (kind, message, file, tensor, io), io naming a missing or unreadable file's failure."
);

/// The maker of the package's exceptions (`tensorplace._core` registers it on import:
/// `TensorplaceError`, or its file-not-found and permission subclasses), called with
/// `(kind, message, file, tensor, io)`; until it is registered, `Error` is raised.
static RAISE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Registers the maker of the package's exceptions (see `RAISE`); once per process.
#[pyfunction]
fn set_error_maker(py: Python<'_>, make: Py<PyAny>) {
    let _ = RAISE.set(py, make);
}

/// The crate's error as the package's exception, with its kind, file and tensor, and for a
/// file that is missing or may not be read, which (`"NotFound"`, `"PermissionDenied"`).
fn py_err(e: tensorplace::Error) -> PyErr {
    let io = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(|io| match io.kind() {
            std::io::ErrorKind::NotFound => Some("NotFound"),
            std::io::ErrorKind::PermissionDenied => Some("PermissionDenied"),
            _ => None,
        });
    let args = (
        format!("{:?}", e.kind()),
        e.to_string(),
        e.file().map(|p| p.display().to_string()),
        e.tensor().map(str::to_owned),
        io,
    );
    // Errors also arise where the GIL was released: the exception is made with it held.
    Python::attach(|py| match RAISE.get(py) {
        Some(make) => match make.bind(py).call1(args) {
            Ok(exception) => PyErr::from_value(exception),
            Err(failed) => failed,
        },
        None => Error::new_err(args),
    })
}

/// A loaded tensor, exported by DLPack. `carrier` exports its bytes as unsigned integers of
/// the same width (for numpy, which takes no bfloat16 or float8: the Python side views the
/// result with the `ml_dtypes` type).
#[pyclass(frozen, name = "_Tensor", module = "tensorplace._tensorplace")]
struct PyTensor {
    tensor: Arc<Tensor>,
    carrier: bool,
}

/// The DLPack type of `dtype`, or why it has none.
fn dlpack_dtype(dtype: Dtype, carrier: bool) -> PyResult<DLDataType> {
    use DLDataTypeCode as C;
    let bits = u8::try_from(dtype.bits()).unwrap_or(0);
    if carrier && bits % 8 == 0 {
        return Ok(DLDataType::scalar(C::UINT, bits));
    }
    if carrier && dtype == Dtype::F4 {
        // Two elements a byte: see `exported_shape`.
        return Ok(DLDataType::scalar(C::UINT, 8));
    }
    let code = match dtype {
        Dtype::BOOL => C::BOOL,
        Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => C::UINT,
        Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => C::INT,
        Dtype::F16 | Dtype::F32 | Dtype::F64 => C::FLOAT,
        Dtype::BF16 => C::BFLOAT,
        Dtype::C64 => C::COMPLEX,
        Dtype::F8_E4M3 => C::FLOAT8_E4M3FN,
        Dtype::F8_E5M2 => C::FLOAT8_E5M2,
        Dtype::F8_E8M0 => C::FLOAT8_E8M0FNU,
        Dtype::F8_E4M3FNUZ => C::FLOAT8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ => C::FLOAT8_E5M2FNUZ,
        Dtype::F4 | Dtype::F6_E2M3 | Dtype::F6_E3M2 => {
            return Err(PyValueError::new_err(format!(
                "{dtype} packs several elements in a byte: it has no DLPack export (read its bytes with tobytes())"
            )));
        }
    };
    Ok(DLDataType::scalar(code, bits))
}

impl PyTensor {
    /// The shape exported: the tensor's, but for an F4 carrier, whose bytes each hold two
    /// elements of the last dimension (torch's `float4_e2m1fn_x2`): that dimension halved.
    fn exported_shape(&self) -> PyResult<Vec<usize>> {
        let mut shape = self.tensor.shape().to_vec();
        if self.carrier && self.tensor.dtype() == Dtype::F4 {
            match shape.last_mut() {
                Some(last) if *last % 2 == 0 => *last /= 2,
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "F4 of shape {shape:?}: its bytes are pairs of the last dimension, which must be even"
                    )));
                }
            }
        }
        Ok(shape)
    }

    fn managed<M: ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let dtype = dlpack_dtype(self.tensor.dtype(), self.carrier)?;
        let (data, device) = match self.tensor.storage() {
            Storage::Cpu(s) => (s.as_bytes().as_ptr() as *mut c_void, DLDevice::CPU),
            Storage::Cuda(s) => (
                s.device_ptr() as usize as *mut c_void,
                DLDevice::cuda(i32::try_from(s.ordinal()).unwrap_or(i32::MAX)),
            ),
            _ => return Err(PyValueError::new_err("this storage has no DLPack export")),
        };
        let shape: Vec<i64> = self
            .exported_shape()?
            .iter()
            .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
            .collect();
        let mut init = Dynamic::compact(shape)
            .initialize_as::<M>(self.tensor.clone())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        init.set_data(data).set_device(device).set_dtype(dtype);
        // SAFETY: `data` points to the tensor's bytes (host memory or a CUDA arena), which the
        // `Arc<Tensor>` installed as the capsule's context keeps alive until the consumer
        // calls the deleter; shape and compact strides describe exactly those bytes (the
        // header was validated); no flags are set: the memory is owned and writable.
        Ok(unsafe { init.finish() })
    }
}

impl DlpackExporter for PyTensor {
    fn device(&self) -> DLDevice {
        match self.tensor.storage() {
            Storage::Cuda(s) => DLDevice::cuda(i32::try_from(s.ordinal()).unwrap_or(i32::MAX)),
            _ => DLDevice::CPU,
        }
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, request: &ExportRequest<'_>) -> PyResult<()> {
        // Every load synchronizes its copies before returning: any consumer stream may read
        // at once. Stream 0 is forbidden by the protocol.
        if matches!(self.tensor.storage(), Storage::Cuda(_))
            && let Some(s) = request.stream()
            && s.extract::<isize>().is_ok_and(|v| v == 0)
        {
            return Err(PyValueError::new_err(
                "stream 0 is not a valid DLPack stream",
            ));
        }
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.managed()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.managed()
    }
}

#[pymethods]
impl PyTensor {
    /// The safetensors dtype name, such as `"BF16"`.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.tensor.dtype().name()
    }

    /// The shape.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.tensor.shape().to_vec()
    }

    /// The device, such as `"cpu"` or `"cuda:0"`.
    #[getter]
    fn device(&self) -> String {
        self.tensor.device().to_string()
    }

    /// The same memory, exported as unsigned integers of the element's width.
    fn carrier(&self) -> PyTensor {
        PyTensor {
            tensor: self.tensor.clone(),
            carrier: true,
        }
    }

    /// A copy of the bytes on the host (little-endian, row-major).
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.tensor.host_bytes().map_err(py_err)?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        let d = DlpackExporter::device(self);
        (d.device_type.0 as i32, d.device_id)
    }

    #[pyo3(signature = (*, stream = None, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }
}

/// The loaded tensors in file order, and the file's metadata.
type Loaded = (Vec<(String, PyTensor)>, Option<HashMap<String, String>>);

fn loaded(tensors: Tensors) -> Loaded {
    let metadata = tensors
        .metadata()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let list = tensors
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                PyTensor {
                    tensor: Arc::new(t),
                    carrier: false,
                },
            )
        })
        .collect();
    (list, metadata)
}

/// A loader onto `device` reading as `read_mode` says, of the tensors `names` (or all), its
/// floating tensors cast to `dtype` (a dtype's name, such as `"BF16"`) where given, its 64-bit
/// ones narrowed to 32 bits where `narrow_64` (as JAX holds them without x64).
fn loader<'a>(
    device: &str,
    names: Option<&'a HashSet<String>>,
    read_mode: &str,
    dtype: Option<&str>,
    narrow_64: bool,
) -> PyResult<Loader<'a>> {
    let device: Device = device.parse().map_err(py_err)?;
    // The crate's names (safetensors' `backend=` values); a bad one is a ValueError.
    let mode: ReadMode = read_mode
        .parse()
        .map_err(|e: tensorplace::Error| PyValueError::new_err(e.to_string()))?;
    let mut l = Loader::new(device).read_mode(mode).narrow_64bit(narrow_64);
    // A filename not on disk may be a repository id of the Hugging Face cache (HF_HUB_CACHE,
    // HF_HOME or the default folder, read at each call).
    if let Some(dir) = tensorplace::hub::default_cache_dir() {
        l = l.hf_cache(dir);
    }
    if let Some(name) = dtype {
        let dtype: Dtype = name.parse().map_err(|_| {
            PyValueError::new_err(format!("dtype {name:?}: not a dtype of the format"))
        })?;
        l = l.dtype(dtype);
    }
    if let Some(names) = names {
        l = l.filter(move |n| names.contains(n));
    }
    Ok(l)
}

/// Runs `load` on another thread while this one watches for signals (between waits without
/// the GIL): a Ctrl-C sets the load's interrupt flag, waits for it to stop (having freed
/// what it placed) and raises `KeyboardInterrupt` at once.
fn interruptible<T: Send>(
    py: Python<'_>,
    load: impl FnOnce(&AtomicBool) -> PyResult<T> + Send,
) -> PyResult<T> {
    let stop = AtomicBool::new(false);
    let finished = (Mutex::new(false), Condvar::new());
    std::thread::scope(|s| {
        let (stop, finished) = (&stop, &finished);
        let worker = s.spawn(move || {
            let r = load(stop);
            *finished.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            finished.1.notify_all();
            r
        });
        loop {
            let done = py.detach(|| {
                let guard = finished.0.lock().unwrap_or_else(|p| p.into_inner());
                let (guard, _) = finished
                    .1
                    .wait_timeout_while(guard, Duration::from_millis(50), |done| !*done)
                    .unwrap_or_else(|p| p.into_inner());
                *guard
            });
            if done {
                break;
            }
            if let Err(e) = py.check_signals() {
                stop.store(true, Ordering::Relaxed);
                let _ = py.detach(|| worker.join());
                return Err(e);
            }
        }
        worker
            .join()
            .unwrap_or_else(|_| Err(PyException::new_err("a load panicked")))
    })
}

/// Loads the file (or sharded checkpoint: a folder or its index) at `filename` onto
/// `device` (the tensors named in `names`, or all; `slices`: (name, slice text) pairs, each
/// tensor named loaded as that part of it; `dtype`: floating tensors cast to it; `split`:
/// `(rank, world, dims)`, part `rank` of `world` of each tensor `dims` names, cut along the
/// dimension it gives), with the GIL released and Ctrl-C honoured.
#[pyfunction]
#[pyo3(signature = (filename, device = "cpu", names = None, read_mode = "mmap", slices = None, dtype = None, split = None, narrow_64 = false))]
#[allow(clippy::too_many_arguments)]
fn load_file(
    py: Python<'_>,
    filename: PathBuf,
    device: &str,
    names: Option<Vec<String>>,
    read_mode: &str,
    slices: Option<Vec<(String, String)>>,
    dtype: Option<String>,
    split: Option<(usize, usize, HashMap<String, usize>)>,
    narrow_64: bool,
) -> PyResult<Loaded> {
    let names: Option<HashSet<String>> = names.map(|v| v.into_iter().collect());
    let device = device.to_owned();
    let read_mode = read_mode.to_owned();
    let slices = slices
        .unwrap_or_default()
        .into_iter()
        .map(|(name, text)| Ok((name, text.parse::<Slice>().map_err(py_err)?)))
        .collect::<PyResult<Vec<_>>>()?;
    let tensors = interruptible(py, |stop| {
        let mut l = loader(
            &device,
            names.as_ref(),
            &read_mode,
            dtype.as_deref(),
            narrow_64,
        )?
        .interrupt(stop);
        for (name, slice) in &slices {
            l = l.slice(name.clone(), slice.clone());
        }
        if let Some((rank, world, dims)) = &split {
            l = l.split(*rank, *world, |name, _| dims.get(name).copied());
        }
        l.load_file(&filename).map_err(py_err)
    })?;
    Ok(loaded(tensors))
}

/// Loads a whole file held in `data` onto `device`.
#[pyfunction]
#[pyo3(signature = (data, device = "cpu", narrow_64 = false))]
fn load(py: Python<'_>, data: &[u8], device: &str, narrow_64: bool) -> PyResult<Loaded> {
    let device = device.to_owned();
    let tensors = interruptible(py, |stop| {
        loader(&device, None, "mmap", None, narrow_64)?
            .interrupt(stop)
            .load(data)
            .map_err(py_err)
    })?;
    Ok(loaded(tensors))
}

/// The names, dtypes, shapes and files of the tensors of a file or sharded checkpoint (a
/// folder or its index) in order, and its metadata, reading headers only.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn inspect(
    py: Python<'_>,
    filename: PathBuf,
) -> PyResult<(
    Vec<(String, &'static str, Vec<usize>, PathBuf)>,
    Option<HashMap<String, String>>,
)> {
    if tensorplace::remote::is_url(&filename) {
        // An object's headers, through a reader (which reads nothing else until asked),
        // the GIL released while the network answers.
        let reader = py.detach(|| {
            loader("cpu", None, "mmap", None, false)?
                .reader(&filename)
                .map_err(py_err)
        })?;
        let tensors = reader
            .names()
            .map(|name| {
                let (dtype, shape) = reader.info(name)?;
                let file = reader.file_of(name)?.to_path_buf();
                Ok((name.to_owned(), dtype.name(), shape.to_vec(), file))
            })
            .collect::<tensorplace::Result<_>>()
            .map_err(py_err)?;
        let metadata = reader
            .metadata()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        return Ok((tensors, metadata));
    }
    let cache = tensorplace::hub::default_cache_dir();
    let filename = tensorplace::hub::locate(&filename, cache.as_deref()).map_err(py_err)?;
    let checkpoint = tensorplace::open(&filename).map_err(py_err)?;
    let tensors = checkpoint
        .iter()
        .map(|t| {
            let file = t.file.to_path_buf();
            (t.name.to_owned(), t.dtype.name(), t.shape.to_vec(), file)
        })
        .collect();
    let metadata = checkpoint
        .metadata()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    Ok((tensors, metadata))
}

/// Tensors smaller than this are read with the GIL held: releasing and taking it back costs
/// more than their copy.
const HELD: usize = 256 << 10;

/// Tensors smaller than this are read with the GIL released but without the interrupt
/// watcher's thread (its start costs more than their read).
const WATCHED: usize = 64 << 20;

/// A file or sharded checkpoint opened for lazy reads (`safe_open`): its headers read once,
/// its files kept open, each read costing its tensor's bytes.
#[pyclass(frozen, name = "_Reader", module = "tensorplace._tensorplace")]
struct PyReader {
    reader: tensorplace::Reader,
    /// The framework's `to_array` (a `_Tensor` to its array).
    to_array: Py<PyAny>,
    /// Where the framework builds arrays on host blocks (the CPU frameworks).
    arrays: Option<Arrays>,
    /// Whether reads go over the network (an object's URL): the GIL is then released for
    /// every read, small ones included.
    remote: bool,
}

/// Reads at most this large, copied out of a mapping, go into a shared [`Arrays`] block.
const BLOCK_PIECE: usize = 512 << 10;

/// The size of an [`Arrays`] block: numpy advises huge pages for its arrays from 4 MiB.
const BLOCK: usize = 4 << 20;

/// How a framework builds arrays on host memory that the reader fills, so that a small read
/// costs one copy and one array object: no DLPack exchange, and no memory of its own (whose
/// first touch would cost a page fault per tensor). Small reads are copied into ranges of one
/// shared block (a numpy `uint8` array), which the arrays view and keep alive.
struct Arrays {
    /// `new_block(nbytes)`: a new contiguous, writable numpy `uint8` array.
    new_block: Py<PyAny>,
    /// `build(shape, dtype, block, offset)`: the framework's array of `dtype` and `shape`
    /// viewing `block` from byte `offset` (numpy's `ndarray`).
    build: Py<PyAny>,
    /// `dtype_of(name)`: the framework's dtype object for a dtype name, or `None` where it has
    /// none; asked once per dtype, when a read first meets it (so that a module such as
    /// `ml_dtypes` is imported only where a file needs it).
    dtype_of: Py<PyAny>,
    /// What `dtype_of` answered so far.
    dtypes: Mutex<Vec<(Dtype, Option<Py<PyAny>>)>>,
    /// The block being filled: the array, its address, and the bytes of it given out.
    current: Mutex<Option<(Py<PyAny>, usize, usize)>>,
}

impl Arrays {
    /// The framework's dtype object for `dtype`, if it has one.
    fn dtype(&self, py: Python<'_>, dtype: Dtype) -> PyResult<Option<Py<PyAny>>> {
        let mut known = self.dtypes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, object)) = known.iter().find(|(d, _)| *d == dtype) {
            return Ok(object.as_ref().map(|o| o.clone_ref(py)));
        }
        let object = self.dtype_of.bind(py).call1((dtype.name(),))?;
        let object = (!object.is_none()).then(|| object.unbind());
        known.push((dtype, object.as_ref().map(|o| o.clone_ref(py))));
        Ok(object)
    }

    /// `read` as an array on a block range, or `None` where it goes another way (too large,
    /// or a dtype the framework's table lacks: its `to_array` then says why).
    fn build<'py>(
        &self,
        py: Python<'py>,
        read: &MemoryRead<'_>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(dtype) = self.dtype(py, read.dtype())? else {
            return Ok(None);
        };
        if read.len() > BLOCK_PIECE {
            return Ok(None);
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        // Each tensor starts on a 64-byte boundary of memory.
        let room = |&(_, address, used): &(Py<PyAny>, usize, usize)| {
            let start = (address + used).next_multiple_of(64) - address;
            (start + read.len() <= BLOCK).then_some(start)
        };
        if current.as_ref().and_then(room).is_none() {
            *current = None;
        }
        let entry = match &mut *current {
            Some(entry) => entry,
            empty => {
                let block = self.new_block.bind(py).call1((BLOCK,))?;
                let address = host_address(&block, BLOCK)?;
                empty.insert((block.unbind(), address, 0))
            }
        };
        let start =
            room(entry).ok_or_else(|| PyValueError::new_err("a read larger than a block"))?;
        let (block, address, used) = entry;
        // SAFETY: `address` is the start of `block`'s BLOCK writable bytes (checked by
        // `host_address`), which `current` keeps alive; `start + len <= BLOCK`. The range
        // was given to no earlier read (`used` only grows), no array views it yet, and the GIL
        // is held: nothing else reads or writes it meanwhile.
        let out =
            unsafe { std::slice::from_raw_parts_mut((*address + start) as *mut u8, read.len()) };
        if read.len() < HELD {
            read.copy_to(out)
        } else {
            py.detach(|| read.copy_to(out))
        }
        .map_err(py_err)?;
        *used = start + read.len();
        let shape = PyTuple::new(py, read.shape())?;
        self.build
            .bind(py)
            .call1((shape, dtype, block.bind(py), start))
            .map(Some)
    }
}

/// The address of a contiguous, writable numpy `uint8` array of `len` bytes.
fn host_address(array: &Bound<'_, PyAny>, len: usize) -> PyResult<usize> {
    let interface = array.getattr("__array_interface__")?;
    let typestr: String = interface.get_item("typestr")?.extract()?;
    let (address, readonly): (usize, bool) = interface.get_item("data")?.extract()?;
    let nbytes: usize = array.getattr("nbytes")?.extract()?;
    if typestr != "|u1" || readonly || !interface.get_item("strides")?.is_none() || nbytes != len {
        return Err(PyValueError::new_err(format!(
            "new_block gave no contiguous writable uint8 array of {len} bytes"
        )));
    }
    Ok(address)
}

impl PyReader {
    fn view(tensor: Tensor) -> PyTensor {
        PyTensor {
            tensor: Arc::new(tensor),
            carrier: false,
        }
    }

    /// Runs `read` with the GIL released (but for small reads of local files); where it
    /// reads `bytes` or more, on a worker while this thread honours Ctrl-C.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        bytes: usize,
        read: impl FnOnce() -> tensorplace::Result<T> + Send,
    ) -> PyResult<T> {
        if bytes < HELD && !self.remote {
            return read().map_err(py_err);
        }
        if bytes < WATCHED {
            return py.detach(read).map_err(py_err);
        }
        interruptible(py, |_| read().map_err(py_err))
    }
}

#[pymethods]
impl PyReader {
    /// The tensor names in file order, or sorted (as safetensors' `keys()` gives them).
    #[pyo3(signature = (sorted = false))]
    fn keys(&self, sorted: bool) -> Vec<&str> {
        let mut names: Vec<&str> = self.reader.names().collect();
        if sorted {
            names.sort_unstable();
        }
        names
    }

    /// The metadata.
    fn metadata(&self) -> Option<HashMap<String, String>> {
        self.reader
            .metadata()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    /// Whether a tensor of that name is there.
    fn __contains__(&self, name: &str) -> bool {
        self.reader.info(name).is_ok()
    }

    /// (dtype name, shape) of a tensor, reading nothing.
    fn info(&self, name: &str) -> PyResult<(&'static str, Vec<usize>)> {
        let (dtype, shape) = self.reader.info(name).map_err(py_err)?;
        Ok((dtype.name(), shape.to_vec()))
    }

    /// Reads one tensor, or the part `slice` (text such as `"[0:4, :]"`) of it.
    #[pyo3(signature = (name, slice = None))]
    fn get(&self, py: Python<'_>, name: &str, slice: Option<&str>) -> PyResult<PyTensor> {
        // The whole tensor's size (a slice reads no more), to choose how to wait.
        let (dtype, shape) = self.reader.info(name).map_err(py_err)?;
        let bytes = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| dtype.bytes_for(n))
            .unwrap_or(usize::MAX);
        let tensor = match slice {
            None => self.run(py, bytes, || self.reader.tensor(name))?,
            Some(text) => {
                let slice: Slice = text.parse().map_err(py_err)?;
                self.run(py, bytes, || self.reader.slice(name, &slice))?
            }
        };
        Ok(Self::view(tensor))
    }

    /// Reads one tensor (or the part `slice` of it) as the framework's array: a small one
    /// copied out of a mapped file into a shared host block and viewed there (see `Arrays`),
    /// any other read as `get` reads it, handed to the framework's `to_array`.
    #[pyo3(signature = (name, slice = None))]
    fn get_array<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        slice: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Some(arrays) = &self.arrays {
            let parsed: Option<Slice> = slice.map(str::parse).transpose().map_err(py_err)?;
            if let Some(read) = self
                .reader
                .memory_read(name, parsed.as_ref())
                .map_err(py_err)?
                && let Some(array) = arrays.build(py, &read)?
            {
                return Ok(array);
            }
        }
        let view = self.get(py, name, slice)?;
        self.to_array.bind(py).call1((view,))
    }

    /// Reads several tensors in one pass, returned in file order as (name, view) pairs.
    fn get_many(&self, py: Python<'_>, names: Vec<String>) -> PyResult<Vec<(String, PyTensor)>> {
        let tensors = interruptible(py, |_| {
            self.reader
                .tensors(names.iter().map(String::as_str))
                .map_err(py_err)
        })?;
        Ok(tensors
            .into_iter()
            .map(|(name, t)| (name, Self::view(t)))
            .collect())
    }

    /// Reads `parts` ((name, slice text or `None`) pairs: a sharded load's shards) in one
    /// pass over the files, returned as views in the order given; `devices` (one device
    /// string per part), each part straight onto its own device.
    #[pyo3(signature = (parts, devices = None))]
    fn get_parts(
        &self,
        py: Python<'_>,
        parts: Vec<(String, Option<String>)>,
        devices: Option<Vec<String>>,
    ) -> PyResult<Vec<PyTensor>> {
        let slices: Vec<Option<Slice>> = parts
            .iter()
            .map(|(name, text)| {
                let parsed = text.as_deref().map(str::parse::<Slice>).transpose();
                parsed.map_err(|e| py_err(e.with_tensor(name.as_str())))
            })
            .collect::<PyResult<_>>()?;
        let asked: Vec<(&str, Option<&Slice>)> = parts
            .iter()
            .zip(&slices)
            .map(|((name, _), slice)| (name.as_str(), slice.as_ref()))
            .collect();
        let tensors = match devices {
            None => interruptible(py, |_| self.reader.parts(&asked).map_err(py_err))?,
            Some(devices) => {
                if devices.len() != asked.len() {
                    return Err(PyValueError::new_err(format!(
                        "{} devices for {} parts",
                        devices.len(),
                        asked.len()
                    )));
                }
                let devices: Vec<Device> = devices
                    .iter()
                    .map(|d| d.parse().map_err(py_err))
                    .collect::<PyResult<_>>()?;
                let on: Vec<(&str, Option<&Slice>, Device)> = asked
                    .iter()
                    .zip(devices)
                    .map(|(&(name, slice), device)| (name, slice, device))
                    .collect();
                interruptible(py, |_| self.reader.parts_on(&on).map_err(py_err))?
            }
        };
        Ok(tensors.into_iter().map(Self::view).collect())
    }
}

/// Opens `filename` (a file, a folder of shards or its index) for lazy reads onto `device`
/// (floating tensors cast to `dtype` where given). `to_array` makes the framework's array of a `_Tensor`; `arrays`, where the framework
/// builds arrays on host memory, is `(new_block, build, dtype_of)` (see `Arrays`).
#[pyfunction]
#[pyo3(signature = (filename, device, read_mode, to_array, arrays = None, dtype = None, narrow_64 = false))]
#[allow(clippy::too_many_arguments)]
fn open(
    py: Python<'_>,
    filename: PathBuf,
    device: &str,
    read_mode: &str,
    to_array: Py<PyAny>,
    arrays: Option<(Py<PyAny>, Py<PyAny>, Py<PyAny>)>,
    dtype: Option<&str>,
    narrow_64: bool,
) -> PyResult<PyReader> {
    let reader = py.detach(|| {
        loader(device, None, read_mode, dtype, narrow_64)?
            .reader(&filename)
            .map_err(py_err)
    })?;
    let arrays = arrays.map(|(new_block, build, dtype_of)| Arrays {
        new_block,
        build,
        dtype_of,
        dtypes: Mutex::new(Vec::new()),
        current: Mutex::new(None),
    });
    let remote = tensorplace::remote::is_url(&filename);
    Ok(PyReader {
        reader,
        to_array,
        arrays,
        remote,
    })
}

/// A checkpoint's tensors one at a time, in file order, read ahead in bounded memory
/// (`tensorplace::Stream`): an iterator of (name, view).
#[pyclass(frozen, name = "_Stream", module = "tensorplace._tensorplace")]
struct PyStream {
    stream: Mutex<Stream>,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next tensor, waiting (the GIL released) for its batch where it is not read yet.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(String, PyTensor)>> {
        let next = py.detach(|| self.stream.lock().unwrap_or_else(|p| p.into_inner()).next());
        match next {
            None => Ok(None),
            Some(Ok((name, tensor))) => Ok(Some((name, PyReader::view(tensor)))),
            Some(Err(e)) => Err(py_err(e)),
        }
    }
}

/// Streams the tensors of `filename` (a file, a folder of shards or its index) onto `device`
/// in file order, at most `max_bytes` loaded ahead of the caller.
#[pyfunction]
#[pyo3(signature = (filename, device, read_mode, max_bytes))]
fn stream(
    py: Python<'_>,
    filename: PathBuf,
    device: &str,
    read_mode: &str,
    max_bytes: usize,
) -> PyResult<PyStream> {
    let stream = py.detach(|| {
        loader(device, None, read_mode, None, false)?
            .stream(&filename, max_bytes)
            .map_err(py_err)
    })?;
    Ok(PyStream {
        stream: Mutex::new(stream),
    })
}

/// The bytes of `data` (a `bytes` object, or a C-contiguous numpy array of `uint8`),
/// borrowed, not copied. (The limited API of Python 3.9, which the abi3 wheel targets, has
/// no buffer protocol: an array's memory is found through its `__array_interface__`.)
fn bytes_of<'a>(data: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return Ok(bytes.as_bytes());
    }
    let interface = data.getattr("__array_interface__")?;
    let typestr: String = interface.get_item("typestr")?.extract()?;
    let strides = interface.get_item("strides")?;
    let (ptr, _readonly): (usize, bool) = interface.get_item("data")?.extract()?;
    let len: usize = data.getattr("nbytes")?.extract()?;
    if !matches!(typestr.as_str(), "|u1" | "|i1" | "|b1") || !strides.is_none() {
        return Err(PyValueError::new_err(format!(
            "expected contiguous bytes, got an array of type {typestr} and strides {strides}"
        )));
    }
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: numpy's array interface says the array's `nbytes` bytes of one-byte items lie
    // contiguously from `ptr` (strides None: C-contiguous). `data`, borrowed for 'a, holds
    // the array and so that memory alive; the callers hold the GIL and run no Python code
    // while they read it, so nothing changes or frees it meanwhile.
    Ok(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
}

/// A tensor to save: name, safetensors dtype name, shape, and its bytes (`bytes`, or a
/// contiguous numpy array of `uint8`: see `bytes_of`), borrowed, not copied.
type Spec<'py> = (String, String, Vec<usize>, Bound<'py, PyAny>);

/// Runs `save` on views of `specs` (their bytes borrowed) and the metadata.
fn with_views<T>(
    specs: &[Spec<'_>],
    metadata: Option<Vec<(String, String)>>,
    save: impl FnOnce(&[(&str, TensorView<'_>)], Option<&Metadata>) -> tensorplace::Result<T>,
) -> PyResult<T> {
    let mut dtypes = Vec::with_capacity(specs.len());
    for (name, dtype, _, _) in specs {
        let d: Dtype = dtype
            .parse()
            .map_err(|_| PyValueError::new_err(format!("{name}: unknown dtype {dtype:?}")))?;
        dtypes.push(d);
    }
    let mut views = Vec::with_capacity(specs.len());
    for ((name, _, shape, data), &dtype) in specs.iter().zip(&dtypes) {
        let bytes = bytes_of(data).map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        views.push((name.as_str(), TensorView::new(dtype, shape, bytes)));
    }
    // In the caller's order (a Python dict's).
    let metadata = metadata.map(|m| m.into_iter().collect::<Metadata>());
    save(&views, metadata.as_ref()).map_err(py_err)
}

/// The bytes of a safetensors file holding `tensors` and `metadata`.
#[pyfunction]
#[pyo3(signature = (tensors, metadata = None))]
fn save<'py>(
    py: Python<'py>,
    tensors: Vec<Spec<'py>>,
    metadata: Option<Vec<(String, String)>>,
) -> PyResult<Bound<'py, PyBytes>> {
    // The file's bytes written straight into the `bytes` object: one copy of each array.
    with_views(&tensors, metadata, |views, md| {
        let file = tensorplace::serialize_views(views, md)?;
        Ok(PyBytes::new_with(py, file.len(), |out| {
            file.write_into(out).map_err(py_err)
        }))
    })?
}

/// Writes `tensors` and `metadata` to `filename`, atomically. The GIL stays held: the
/// bytes are read from the arrays themselves, which no other thread may change meanwhile.
#[pyfunction]
#[pyo3(signature = (tensors, filename, metadata = None))]
fn save_file(
    tensors: Vec<Spec<'_>>,
    filename: PathBuf,
    metadata: Option<Vec<(String, String)>>,
) -> PyResult<()> {
    with_views(&tensors, metadata, |views, md| {
        tensorplace::save_views_file(views, &filename, md)
    })
}

/// Writes `tensors` to the folder `directory` as a checkpoint of shards of at most
/// `max_shard_size` (a size such as "5GB", or a number of bytes) split as huggingface_hub
/// splits, and returns the paths written (the index last). Nothing in the folder changes
/// unless every file was written.
#[pyfunction]
#[pyo3(signature = (tensors, directory, max_shard_size, metadata = None))]
fn save_checkpoint(
    tensors: Vec<Spec<'_>>,
    directory: PathBuf,
    max_shard_size: &str,
    metadata: Option<Vec<(String, String)>>,
) -> PyResult<Vec<PathBuf>> {
    let max = tensorplace::parse_size(max_shard_size)
        .map_err(|e| PyValueError::new_err(e.message().to_owned()))?;
    with_views(&tensors, metadata, |views, md| {
        tensorplace::save_views_checkpoint(views, &directory, max, md)
    })
}

/// Gives back at once the host memory loads onto the CPU left for later ones (arenas freed
/// with their last tensor, else kept for 10 s at most); the bytes given back.
#[pyfunction]
fn trim_host_memory() -> usize {
    tensorplace::trim_host_memory()
}

/// The native module.
#[pymodule]
fn _tensorplace(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Error", m.py().get_type::<Error>())?;
    m.add_class::<PyTensor>()?;
    m.add_class::<PyReader>()?;
    m.add_function(wrap_pyfunction!(set_error_maker, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(load_file, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(stream, m)?)?;
    m.add_function(wrap_pyfunction!(save, m)?)?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    m.add_function(wrap_pyfunction!(save_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(trim_host_memory, m)?)?;
    Ok(())
}
