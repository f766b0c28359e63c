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
use pyo3::types::PyBytes;
use tensorplace::{
    Device, Dtype, Loader, Metadata, ReadMode, Slice, Storage, Tensor, TensorView, Tensors,
};

create_exception!(
    _tensorplace,
    Error,
    PyException,
    "A tensorplace error: args are (kind, message, file, tensor, io), io naming a missing or unreadable file's failure."
);

/// The crate's error as the module's exception, with its kind, file and tensor, and for a
/// file that is missing or may not be read, which (`"NotFound"`, `"PermissionDenied"`).
fn py_err(e: tensorplace::Error) -> PyErr {
    let io = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(|io| match io.kind() {
            std::io::ErrorKind::NotFound => Some("NotFound"),
            std::io::ErrorKind::PermissionDenied => Some("PermissionDenied"),
            _ => None,
        });
    Error::new_err((
        format!("{:?}", e.kind()),
        e.to_string(),
        e.file().map(|p| p.display().to_string()),
        e.tensor().map(str::to_owned),
        io,
    ))
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
            .tensor
            .shape()
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

fn loader<'a>(
    device: &str,
    names: Option<&'a HashSet<String>>,
    read_mode: &str,
) -> PyResult<Loader<'a>> {
    let device: Device = device.parse().map_err(py_err)?;
    let mode = match read_mode {
        "mmap" => ReadMode::Mmap,
        "pread" => ReadMode::Pread,
        "direct" => ReadMode::Direct,
        other => {
            return Err(PyValueError::new_err(format!(
                "read_mode {other:?}: expected mmap, pread or direct"
            )));
        }
    };
    let mut l = Loader::new(device).read_mode(mode);
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
/// tensor named loaded as that part of it), with the GIL released and Ctrl-C honoured.
#[pyfunction]
#[pyo3(signature = (filename, device = "cpu", names = None, read_mode = "mmap", slices = None))]
fn load_file(
    py: Python<'_>,
    filename: PathBuf,
    device: &str,
    names: Option<Vec<String>>,
    read_mode: &str,
    slices: Option<Vec<(String, String)>>,
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
        let mut l = loader(&device, names.as_ref(), &read_mode)?.interrupt(stop);
        for (name, slice) in &slices {
            l = l.slice(name.clone(), slice.clone());
        }
        l.load_file(&filename).map_err(py_err)
    })?;
    Ok(loaded(tensors))
}

/// Loads a whole file held in `data` onto `device`.
#[pyfunction]
#[pyo3(signature = (data, device = "cpu"))]
fn load(py: Python<'_>, data: &[u8], device: &str) -> PyResult<Loaded> {
    let device = device.to_owned();
    let tensors = interruptible(py, |stop| {
        loader(&device, None, "mmap")?
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
    filename: PathBuf,
) -> PyResult<(
    Vec<(String, &'static str, Vec<usize>, PathBuf)>,
    Option<HashMap<String, String>>,
)> {
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
}

impl PyReader {
    fn view(tensor: Tensor) -> PyTensor {
        PyTensor {
            tensor: Arc::new(tensor),
            carrier: false,
        }
    }

    /// Runs `read` with the GIL released; where it reads `bytes` or more, on a worker while
    /// this thread honours Ctrl-C.
    fn run<T: Send>(
        py: Python<'_>,
        bytes: usize,
        read: impl FnOnce() -> tensorplace::Result<T> + Send,
    ) -> PyResult<T> {
        if bytes < HELD {
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
    /// The tensor names in file order.
    fn keys(&self) -> Vec<String> {
        self.reader.names().map(str::to_owned).collect()
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
            None => Self::run(py, bytes, || self.reader.tensor(name))?,
            Some(text) => {
                let slice: Slice = text.parse().map_err(py_err)?;
                Self::run(py, bytes, || self.reader.slice(name, &slice))?
            }
        };
        Ok(Self::view(tensor))
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
}

/// Opens `filename` (a file, a folder of shards or its index) for lazy reads onto `device`.
#[pyfunction]
#[pyo3(signature = (filename, device = "cpu", read_mode = "mmap"))]
fn open(py: Python<'_>, filename: PathBuf, device: &str, read_mode: &str) -> PyResult<PyReader> {
    let reader = py.detach(|| {
        loader(device, None, read_mode)?
            .reader(&filename)
            .map_err(py_err)
    })?;
    Ok(PyReader { reader })
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
    let bytes = with_views(&tensors, metadata, tensorplace::save_views)?;
    Ok(PyBytes::new(py, &bytes))
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

/// The native module.
#[pymodule]
fn _tensorplace(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Error", m.py().get_type::<Error>())?;
    m.add_class::<PyTensor>()?;
    m.add_class::<PyReader>()?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(load_file, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(save, m)?)?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    Ok(())
}
