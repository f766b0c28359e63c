"""tensorplace: safetensors' Python API, with tensors loaded straight onto the device.

``tensorplace.numpy``, ``tensorplace.flax`` and ``tensorplace.torch`` have the signatures of
``safetensors.numpy``, ``safetensors.flax`` and ``safetensors.torch``; ``safe_open`` is
safetensors' lazy reader. Loading is done by the Rust crate (files read on every core,
copied once), and every tensor is handed to the framework through DLPack without a copy.
Errors are :class:`TensorplaceError` (a ``safetensors.SafetensorError`` where safetensors is
installed), with the error's ``kind``, ``file`` and ``tensor``; a missing file's is also a
``FileNotFoundError`` (as safetensors raises), a denied one's a ``PermissionError``.

Loads onto the CPU keep the memory of arenas freed (their tensors all gone) for later loads,
each for 10 s at most (``TENSORPLACE_HOST_CACHE``: the most kept, in bytes; ``0`` keeps
nothing): :func:`trim_host_memory` gives it back at once.
"""

from ._core import TensorplaceError, TensorplaceFileNotFoundError, TensorplacePermissionError
from ._safe_open import safe_open
from ._tensorplace import trim_host_memory

__all__ = ["TensorplaceError", "TensorplaceFileNotFoundError", "TensorplacePermissionError", "safe_open",
           "trim_host_memory"]
__version__ = "0.1.0"
