"""What the framework modules share: errors, dtype names, and the lazy reader."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

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


def _framework(name: str):
    if name in ("np", "numpy"):
        from . import numpy as module
    elif name in ("pt", "torch", "pytorch"):
        from . import torch as module
    elif name in ("flax", "jax"):
        from . import flax as module
    else:
        raise ValueError(f"framework {name!r}: expected 'np', 'pt' or 'flax'")
    return module


class safe_open:
    """Opens a safetensors file (or a sharded checkpoint: a folder or its index) lazily, as
    ``safetensors.safe_open``: ``keys()``, ``metadata()``, ``get_tensor(name)`` and
    ``get_slice(name)[...]``; usable as a context manager. Opening reads and checks the
    headers once and keeps the files open; each ``get_tensor`` then reads that tensor alone
    (onto ``device``), each slice only its part of it, ``get_tensors(names)`` several in one
    pass. ``backend``: as :func:`load_file`'s."""

    def __init__(self, filename, framework: str, device: Any = "cpu", *, backend: str = "mmap"):
        self._filename = os.fspath(filename)
        module = _framework(framework)
        self._array = module.to_array
        # Where the framework builds arrays on host memory, small reads onto the CPU are
        # copied into shared blocks and viewed there (no DLPack exchange per tensor).
        arrays = getattr(module, "host_arrays", None)
        self._reader = _native.open(
            self._filename, module.device_name(device), backend, module.to_array, arrays() if arrays else None
        )
        # The commonest call in a loop goes straight to the native reader (no Python frame).
        self.get_tensor = self._reader.get_array

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Closes the files, as safetensors' handle does; arrays already read stay valid.
        self._reader = _Closed(self._filename)
        self.__dict__.pop("get_tensor", None)
        return False

    def keys(self) -> List[str]:
        """The tensor names (sorted, as safetensors gives them)."""
        return self._reader.keys(True)

    def offset_keys(self) -> List[str]:
        """The tensor names in file order."""
        return self._reader.keys()

    def metadata(self) -> Optional[Dict[str, str]]:
        """The file's ``__metadata__``."""
        return self._reader.metadata()

    def get_tensor(self, name: str):
        """The tensor ``name``, read alone."""
        return self._reader.get_array(name)

    def get_tensors(self, names) -> Dict[str, Any]:
        """The tensors ``names``, read in one pass over the file (neighbours in one request
        where they come from a disk), as a dict in file order."""
        pairs = self._reader.get_many(list(names))
        return {name: self._array(view) for name, view in pairs}

    def get_slice(self, name: str) -> "_Slice":
        """A lazy slice: ``get_shape()``, ``get_dtype()``, and ``[...]`` indexing."""
        if name not in self._reader:
            self._reader.info(name)  # raises the TensorNotFound error
        return _Slice(self, name)


class _Closed:
    """A handle's reader after its ``with`` block: every use is an error."""

    def __init__(self, filename: str):
        self._filename = filename

    def __getattr__(self, _name):
        raise TensorplaceError("Closed", "the file was closed (the with block ended)", self._filename)


class _Slice:
    def __init__(self, handle: safe_open, name: str):
        self._handle = handle
        self._name = name

    def get_shape(self) -> List[int]:
        return self._handle._reader.info(self._name)[1]

    def get_dtype(self) -> str:
        return self._handle._reader.info(self._name)[0]

    def __getitem__(self, index):
        handle = self._handle
        # One row (the commonest slice) without building the general text.
        text = f"[{index}]" if type(index) is int and index >= 0 else slice_text(index)
        if text is None:
            # Steps, negative bounds, arrays: numpy's indexing of the whole tensor.
            return handle.get_tensor(self._name)[index]
        return handle._reader.get_array(self._name, text)
