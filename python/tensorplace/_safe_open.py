"""``safe_open``: safetensors' lazy reader, for every framework (its module picked by name)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from . import _tensorplace as _native
from ._core import Framework, TensorplaceError, slice_text


def _framework(name: str) -> Framework:
    """The :class:`Framework` a ``framework=`` name picks (its module imported then)."""
    if name in ("np", "numpy"):
        from . import numpy as module
    elif name in ("pt", "torch", "pytorch"):
        from . import torch as module
    elif name in ("flax", "jax"):
        from . import flax as module
    else:
        raise ValueError(f"framework {name!r}: expected 'np', 'pt' or 'flax'")
    return module.FRAMEWORK


class safe_open:
    """Opens a safetensors file (or a sharded checkpoint: a folder or its index) lazily, as
    ``safetensors.safe_open``: ``keys()``, ``metadata()``, ``get_tensor(name)`` and
    ``get_slice(name)[...]``; usable as a context manager. Opening reads and checks the
    headers once and keeps the files open; each ``get_tensor`` then reads that tensor alone
    (onto ``device``), each slice only its part of it, ``get_tensors(names)`` several in one
    pass. ``backend``: as :func:`load_file`'s."""

    def __init__(self, filename, framework: str, device: Any = "cpu", *, backend: str = "mmap"):
        self._filename = os.fspath(filename)
        fw = _framework(framework)
        self._array = fw.to_array
        self._clamps = fw.clamps_slices
        # Where the framework builds arrays on host memory, small reads onto the CPU are
        # copied into shared blocks and viewed there (no DLPack exchange per tensor).
        self._reader = _native.open(self._filename, fw.device(device), backend, fw.to_array, fw.host_arrays)
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
    def __init__(self, handle: "safe_open", name: str):
        self._handle = handle
        self._name = name

    def get_shape(self) -> List[int]:
        return self._handle._reader.info(self._name)[1]

    def get_dtype(self) -> str:
        return self._handle._reader.info(self._name)[0]

    def __getitem__(self, index):
        handle = self._handle
        # One row (the commonest slice) without building the general text.
        if type(index) is int and index >= 0:
            text = f"[{index}]"
        else:
            text = slice_text(index, self.get_shape(), handle._clamps)
        if text is None:
            # Steps, arrays, ints out of range: the framework's indexing of the whole tensor.
            return handle.get_tensor(self._name)[index]
        return handle._reader.get_array(self._name, text)
