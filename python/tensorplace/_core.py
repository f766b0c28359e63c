"""What the framework modules share: errors, the slice syntax, and the loads and saves of
every framework, each described by a :class:`Framework` (its module's ``FRAMEWORK``). It
knows no framework: each framework module imports it; ``_safe_open`` picks one by name."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

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


def load_file(framework: Framework, filename, device: Any = "cpu", backend: str = "mmap",
              names: Optional[List[str]] = None, slices: Optional[List[tuple]] = None,
              dtype: Optional[str] = None) -> Dict[str, Any]:
    """The tensors of ``filename`` (a file, or a sharded checkpoint: a folder or its index)
    on ``device``, as ``framework``'s arrays in file order. ``backend``: ``"mmap"`` (the
    default), ``"pread"`` (files that may change) or ``"direct"`` (O_DIRECT, for files not in
    the page cache). ``slices``: (name, slice text) pairs, such as ``("w", "[0:128, :]")``:
    that tensor is loaded as that part of it, reading only its bytes. ``dtype``: the name of
    the dtype floating tensors are cast to on the device (such as ``"BF16"``)."""
    views, _ = _native.load_file(os.fspath(filename), framework.device(device), names, backend, slices, dtype)
    return {name: framework.to_array(v) for name, v in views}


def load(framework: Framework, data: bytes, device: Any = "cpu") -> Dict[str, Any]:
    """The tensors of a whole file held in ``data``, as :func:`load_file`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    views, _ = _native.load(bytes(data), framework.device(device))
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


def slice_text(index) -> Optional[str]:
    """The text of a Python index (ints, slices without steps and with bounds of 0 or more,
    one Ellipsis) in the crate's slice syntax, or None where the crate's rules (those of
    safetensors' get_slice, without steps) do not cover it."""
    if not isinstance(index, tuple):
        index = (index,)
    parts = []
    for i in index:
        if i is Ellipsis:
            parts.append("...")
        elif isinstance(i, slice):
            if i.step not in (None, 1):
                return None
            if any(b is not None and (not isinstance(b, int) or b < 0) for b in (i.start, i.stop)):
                return None
            start = "" if i.start is None else str(i.start)
            stop = "" if i.stop is None else str(i.stop)
            parts.append(f"{start}:{stop}")
        elif isinstance(i, int) and not isinstance(i, bool):
            parts.append(str(i))
        else:
            return None
    return "[" + ", ".join(parts) + "]"


def _metadata(metadata):
    if metadata is None:
        return None
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, got {k!r}: {v!r}")
    return list(metadata.items())
