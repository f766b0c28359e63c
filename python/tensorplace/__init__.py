"""tensorplace: safetensors' Python API, with tensors loaded straight onto the device.

``tensorplace.numpy``, ``tensorplace.flax`` and ``tensorplace.torch`` have the signatures of
``safetensors.numpy``, ``safetensors.flax`` and ``safetensors.torch``; ``safe_open`` is
safetensors' lazy reader. Loading is done by the Rust crate (files read on every core,
copied once), and every tensor is handed to the framework through DLPack without a copy.
Errors are :class:`TensorplaceError` (a ``safetensors.SafetensorError`` where safetensors is
installed), with the error's ``kind``, ``file`` and ``tensor``; a missing file's is also a
``FileNotFoundError`` (as safetensors raises), a denied one's a ``PermissionError``.
"""

from ._core import TensorplaceError, TensorplaceFileNotFoundError, TensorplacePermissionError
from ._safe_open import safe_open

__all__ = ["TensorplaceError", "TensorplaceFileNotFoundError", "TensorplacePermissionError", "safe_open"]
__version__ = "0.1.0"
