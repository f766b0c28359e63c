"""What the framework modules share: the native calls, errors, and the slice syntax. It
knows no framework (each framework module imports it; ``_safe_open`` picks one)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

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


def load_file(filename, device: str = "cpu", names: Optional[List[str]] = None, backend: str = "mmap",
              slices: Optional[List[tuple]] = None):
    """The tensors of ``filename`` (a file, or a sharded checkpoint: a folder or its index)
    as native views (name, view) in file order, and the metadata. ``backend``: ``"mmap"``
    (the default), ``"pread"`` (files that may change) or ``"direct"`` (O_DIRECT, for files
    not in the page cache). ``slices``: (name, slice text) pairs, such as
    ``("w", "[0:128, :]")``: that tensor is loaded as that part of it, reading only its
    bytes."""
    return _native.load_file(os.fspath(filename), device, names, backend, slices)


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


def load(data: bytes, device: str = "cpu"):
    """The tensors of a whole file held in ``data``, as :func:`load_file`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    return _native.load(bytes(data), device)


def save(specs, metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a file holding ``specs`` [(name, dtype, shape, bytes)]."""
    return _native.save(specs, _metadata(metadata))


def save_file(specs, filename, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes ``specs`` to ``filename`` atomically."""
    _native.save_file(specs, os.fspath(filename), _metadata(metadata))


def _metadata(metadata):
    if metadata is None:
        return None
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, got {k!r}: {v!r}")
    return list(metadata.items())
