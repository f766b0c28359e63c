"""What the framework modules share: errors, the slice syntax, and the loads and saves of
every framework, each described by a :class:`Framework` (its module's ``FRAMEWORK``). It
knows no framework: each framework module imports it; ``_safe_open`` picks one by name."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from . import _tensorplace as _native

try:  # Subclass safetensors' exception, so that code catching it catches ours.
    from safetensors import SafetensorError as _Base
except Exception:  # pragma: no cover - safetensors is optional
    _Base = Exception


class TensorplaceError(_Base):
    """A load or save failed. ``kind`` is the rule broken or the failure met (such as
    ``"SizeMismatch"``, ``"Io"``, ``"DeviceUnavailable"``); ``file`` and ``tensor`` name
    what it concerns, where known; ``str(e)`` says all of it."""

    def __init__(self, kind: str, message: str, file: Optional[str] = None, tensor: Optional[str] = None):
        super().__init__(message)
        self.kind = kind
        self.file = file
        self.tensor = tensor


class TensorplaceFileNotFoundError(TensorplaceError, FileNotFoundError):
    """A file to read is missing: a :class:`TensorplaceError` that is also the
    ``FileNotFoundError`` safetensors raises there, so that code catching either catches it."""


class TensorplacePermissionError(TensorplaceError, PermissionError):
    """A file may not be read (or written): a :class:`TensorplaceError` that is also a
    ``PermissionError``."""


_IO_ERRORS = {"NotFound": TensorplaceFileNotFoundError, "PermissionDenied": TensorplacePermissionError}


def _make_error(kind: str, message: str, file: Optional[str], tensor: Optional[str], io: Optional[str]):
    """The exception the native module raises for a crate error: a :class:`TensorplaceError`,
    also a ``FileNotFoundError`` or ``PermissionError`` where a file is missing or denied."""
    return _IO_ERRORS.get(io, TensorplaceError)(kind, message, file, tensor)


_native.set_error_maker(_make_error)


class Framework(NamedTuple):
    """What the package needs of one framework."""

    #: A native view (``_Tensor``) as the framework's array, sharing its memory.
    to_array: Callable[[Any], Any]
    #: ``(name, array)`` as the native save's ``(name, dtype, shape, bytes)``.
    spec: Callable[[str, Any], tuple]
    #: The framework's device (or a string) as the crate's device text (``"cpu"``,
    #: ``"cuda:0"``); a device the framework cannot hold raises ``TensorplaceError``.
    device: Callable[[Any], str]
    #: Where the framework builds arrays on host memory it is given: ``(new_block, build,
    #: dtype_of)`` (see the native ``open``); ``None`` where it does not.
    host_arrays: Optional[Tuple[Callable, Callable, Callable]] = None
    #: Whether ``get_slice`` clamps ranges to the tensor, as safetensors does for torch
    #: (where torch slices); else a range past a dimension is an ``InvalidSlice`` error, as
    #: safetensors' own slicing for numpy and JAX raises.
    clamps_slices: bool = False


def load_file(framework: Framework, filename, device: Any = "cpu", backend: str = "mmap",
              names: Optional[List[str]] = None, slices: Optional[List[tuple]] = None,
              dtype: Optional[str] = None, split: Optional[tuple] = None,
              narrow_64: bool = False) -> Dict[str, Any]:
    """The tensors of ``filename`` (a file, or a sharded checkpoint: a folder or its index)
    on ``device``, as ``framework``'s arrays in file order. ``backend``: ``"mmap"`` (the
    default), ``"pread"`` (files that may change) or ``"direct"`` (O_DIRECT, for files not in
    the page cache). ``slices``: (name, slice text) pairs, such as ``("w", "[0:128, :]")``:
    that tensor is loaded as that part of it, reading only its bytes. ``dtype``: the name of
    the dtype floating tensors are cast to on the device (such as ``"BF16"``). ``split``:
    ``(rank, world, dims)``: part ``rank`` of ``world`` of each tensor ``dims`` maps to a
    dimension, cut there as ``numpy.array_split`` cuts, reading only that part. ``narrow_64``:
    I64, U64 and F64 tensors load as I32, U32 and F32 (as JAX holds them without x64)."""
    device = framework.device(device)
    views, _ = _native.load_file(os.fspath(filename), device, names, backend, slices, dtype, split, narrow_64)
    return {name: framework.to_array(v) for name, v in views}


def load(framework: Framework, data: bytes, device: Any = "cpu", narrow_64: bool = False) -> Dict[str, Any]:
    """The tensors of a whole file held in ``data``, as :func:`load_file`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    views, _ = _native.load(bytes(data), framework.device(device), narrow_64)
    return {name: framework.to_array(v) for name, v in views}


def save(framework: Framework, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a file holding ``tensors`` (``framework``'s arrays)."""
    return _native.save([framework.spec(k, v) for k, v in tensors.items()], _metadata(metadata))


def save_file(framework: Framework, tensors: Dict[str, Any], filename,
              metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes ``tensors`` (``framework``'s arrays) to ``filename`` atomically: a failure
    leaves the file that was there."""
    specs = [framework.spec(k, v) for k, v in tensors.items()]
    _native.save_file(specs, os.fspath(filename), _metadata(metadata))


def save_checkpoint(framework: Framework, tensors: Dict[str, Any], directory,
                    max_shard_size: Union[int, str] = "5GB",
                    metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """Writes ``tensors`` to the folder ``directory`` as a checkpoint ``huggingface_hub``
    reads: shards of at most ``max_shard_size`` bytes of tensors (``"5GB"``, ``"500MB"`` or
    a number of bytes), split as its ``split_state_dict_into_shards_factory`` splits, named
    ``model-00001-of-0000N.safetensors``, and ``model.safetensors.index.json``; one shard is
    ``model.safetensors`` alone. Every shard is written before any is put in place, the
    index last: a failure leaves the folder as it was. Returns the paths written."""
    specs = [framework.spec(k, v) for k, v in tensors.items()]
    paths = _native.save_checkpoint(specs, os.fspath(directory), str(max_shard_size), _metadata(metadata))
    return [os.fspath(p) for p in paths]


def slice_text(index, shape, clamp: bool = False) -> Optional[str]:
    """The text of a Python index of a tensor of ``shape`` in the crate's slice syntax:
    negative ints and bounds count from the end; with ``clamp``, ranges are clamped to the
    dimension as Python's are (a start past the stop is empty), else left for the crate to
    refuse. ``None`` where the crate's slices (ints and ranges without steps, one Ellipsis)
    do not cover it, or (with ``clamp``) an int is out of range: the caller then indexes
    the whole tensor, which raises the framework's own error."""
    if not isinstance(index, tuple):
        index = (index,)
    ellipses = [k for k, i in enumerate(index) if i is Ellipsis]
    if len(ellipses) > 1:
        return None
    if ellipses:
        k = ellipses[0]
        index = index[:k] + (slice(None),) * max(len(shape) - (len(index) - 1), 0) + index[k + 1 :]
    if len(index) > len(shape):
        # More indices than dimensions: the crate's InvalidSlice, or the framework's error.
        return None if clamp else "[" + ", ".join(":" for _ in index) + "]"
    parts = []
    for i, n in zip(index, shape):
        if isinstance(i, slice):
            part = _range_text(i, n, clamp)
        elif isinstance(i, int) and not isinstance(i, bool):
            j = i + n if i < 0 else i
            part = str(j) if 0 <= j < n or (not clamp and j >= 0) else None
        else:
            part = None
        if part is None:
            return None
        parts.append(part)
    return "[" + ", ".join(parts) + "]"


def _range_text(s: slice, n: int, clamp: bool) -> Optional[str]:
    """A range of a dimension of size ``n`` in the crate's syntax (see :func:`slice_text`)."""
    if s.step not in (None, 1):
        return None
    if clamp:
        try:
            start, stop, _ = s.indices(n)
        except TypeError:
            return None
        # An empty range as the crate takes one wherever it falls.
        return f"{start}:{stop}" if start < stop else "0:0"
    bounds = []
    for b, default in ((s.start, 0), (s.stop, n)):
        if b is None:
            b = default
        elif not isinstance(b, int) or isinstance(b, bool):
            return None
        elif b < 0:
            b += n
            if b < 0:
                return None
        bounds.append(b)
    return f"{bounds[0]}:{bounds[1]}"


def _metadata(metadata):
    if metadata is None:
        return None
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, got {k!r}: {v!r}")
    return list(metadata.items())
