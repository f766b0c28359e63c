"""``safetensors.numpy``'s API: numpy arrays on the host, handed over without a copy.

bfloat16 and the float8 types arrive as ``ml_dtypes`` arrays (numpy has no such types);
the packed F4 and F6 types have no numpy type and raise :class:`TensorplaceError`.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Union

import numpy as np

from . import _core

_ML_DTYPES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}

_NUMPY = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "F16": np.float16,
    "U32": np.uint32,
    "I32": np.int32,
    "F32": np.float32,
    "C64": np.complex64,
    "U64": np.uint64,
    "I64": np.int64,
    "F64": np.float64,
}


def _ml_dtype(name: str):
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))


def to_numpy(view) -> np.ndarray:
    """A host view as a numpy array sharing its memory."""
    if view.device != "cpu":
        raise _core.TensorplaceError("Unsupported", f"the tensor is on {view.device}, not the host")
    dtype = view.dtype
    if dtype in _NUMPY:
        return np.from_dlpack(view)
    if dtype in _ML_DTYPES:
        return np.from_dlpack(view.carrier()).view(_ml_dtype(dtype))
    raise _core.TensorplaceError("Unsupported", f"{dtype} has no numpy type")


def new_block(nbytes: int) -> np.ndarray:
    """``nbytes`` of host memory for ``safe_open``'s small reads: numpy's (the C heap's, which
    reuses memory a process freed, and advises huge pages for large arrays)."""
    return np.empty(nbytes, np.uint8)


def _dtype_of(name: str) -> Optional[np.dtype]:
    if name in _NUMPY:
        return np.dtype(_NUMPY[name])
    if name in _ML_DTYPES:
        return _ml_dtype(name)
    return None


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy (or ml_dtypes) dtype."""
    dtype = np.dtype(dtype)
    for name, t in _NUMPY.items():
        if dtype == np.dtype(t):
            return name
    for name in _ML_DTYPES:
        try:
            if dtype == _ml_dtype(name):
                return name
        except (ImportError, AttributeError):
            continue
    raise ValueError(f"dtype {dtype} has no safetensors name")


def spec(name: str, array: np.ndarray):
    """(name, dtype, shape, little-endian row-major bytes) for the native save."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # Large arrays: their own memory where it is contiguous (no copy), viewed as bytes; small
    # ones as bytes (a copy of a few KB costs less than finding an array's memory).
    if array.nbytes < (64 << 10):
        data = array.tobytes()
    else:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return (name, dtype_name(array.dtype), list(array.shape), data)


def _device(device) -> str:
    if device in (None, "cpu"):
        return "cpu"
    raise _core.TensorplaceError("InvalidDevice", f"{device!r}: numpy arrays live on the CPU")


def _to_array(view) -> np.ndarray:
    # The commonest dtypes first, without to_numpy's checks (the load was onto the CPU).
    if view.dtype in _NUMPY:
        return np.from_dlpack(view)
    return to_numpy(view)


#: numpy for the shared loads, saves and ``safe_open``: host arrays only; ``safe_open``'s
#: small reads are copied into numpy blocks and viewed there with ``np.ndarray`` itself.
FRAMEWORK = _core.Framework(to_array=_to_array, spec=spec, device=_device,
                            host_arrays=(new_block, np.ndarray, _dtype_of))


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, np.ndarray]:
    """Loads a safetensors file into numpy arrays (owned memory, 64-byte aligned)."""
    return _core.load_file(FRAMEWORK, filename, "cpu", backend)


def load(data: bytes) -> Dict[str, np.ndarray]:
    """Loads the bytes of a safetensors file into numpy arrays."""
    return _core.load(FRAMEWORK, data)


def save(tensor_dict: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a safetensors file holding ``tensor_dict``."""
    return _core.save(FRAMEWORK, tensor_dict, metadata)


def save_file(
    tensor_dict: Dict[str, np.ndarray],
    filename: Union[str, os.PathLike],
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Writes ``tensor_dict`` to ``filename`` (atomically: a failure leaves the old file)."""
    _core.save_file(FRAMEWORK, tensor_dict, filename, metadata)


def save_checkpoint(
    tensors: Dict[str, np.ndarray],
    save_directory: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB",
    metadata: Optional[Dict[str, str]] = None,
) -> List[str]:
    """Writes ``tensors`` to the folder ``save_directory`` as a sharded checkpoint, split and
    named as ``huggingface_hub`` does (``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json``), atomically as a whole. Returns the paths written."""
    return _core.save_checkpoint(FRAMEWORK, tensors, save_directory, max_shard_size, metadata)
