"""``safetensors.flax``'s API, with ``load_file(filename, device)`` placing the arrays on
the device: the CPU, or a GPU (loaded by the crate's CUDA backend, handed to JAX by DLPack);
``load_file(filename, sharding=...)`` places each tensor on a sharding, each process reading
only the parts its devices hold; ``dtype=`` casts floating tensors as they load.

``device`` is a ``jax.Device`` (``jax.devices("gpu")[0]``) or a string (``"cpu"``,
``"cuda:0"``, ``"gpu"``); the default is the CPU, as safetensors. A GPU asked for and absent
is a :class:`TensorplaceError` (kind ``DeviceUnavailable``), never a silent fallback. JAX
keeps 64-bit types only with ``jax_enable_x64``; otherwise it converts them to 32 bits, as
``safetensors.flax`` does. JAX preallocates most of the GPU's memory: with large GPU loads,
set ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import _core
from . import numpy as _np


def _device(device: Any) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, str):
        return device
    platform = getattr(device, "platform", None)
    if platform == "cpu":
        return "cpu"
    if platform in ("gpu", "cuda"):
        return f"cuda:{device.local_hardware_id}"
    raise _core.TensorplaceError("InvalidDevice", f"{device!r}: not a CPU or CUDA device")


#: The float8 types, handed over as bytes and reinterpreted: older jaxlib releases refuse
#: DLPack's float8 codes.
_FLOAT8 = {
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


def to_jax(view) -> jax.Array:
    """A view as a JAX array sharing its memory (on the view's device); float8 as bytes
    reinterpreted on the device."""
    if view.dtype in ("F4", "F6_E2M3", "F6_E3M2"):
        raise _core.TensorplaceError("Unsupported", f"{view.dtype} has no JAX type here")
    target = getattr(jnp, _FLOAT8.get(view.dtype, ""), None)
    if target is not None:
        return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(view.carrier()), target)
    return jax.dlpack.from_dlpack(view)


def _spec(name: str, array: jax.Array):
    return _np.spec(name, np.asarray(array))


#: JAX for the shared loads, saves and ``safe_open``: arrays on the CPU or a GPU by DLPack.
FRAMEWORK = _core.Framework(to_array=to_jax, spec=_spec, device=_device)


def load_file(
    filename: Union[str, os.PathLike],
    device: Any = "cpu",
    *,
    sharding: Any = None,
    dtype: Any = None,
    backend: str = "mmap",
) -> Dict[str, jax.Array]:
    """Loads a safetensors file (or a sharded checkpoint: a folder or its index) as JAX
    arrays: onto ``device``, or, with ``sharding``, as global arrays on it. ``sharding``: a
    ``jax.sharding.Sharding`` for every tensor; a mapping from names to shardings or to
    ``jax.ShapeDtypeStruct``s carrying one (nested mappings: names joined with dots); or a
    callable ``(name, shape, dtype)`` returning a sharding, or ``None`` for ``device``. Each
    process reads only the parts its own devices hold, each part once. ``dtype``: floating
    tensors are cast to it as they load (such as ``jnp.bfloat16``)."""
    cast = None if dtype is None else _np.dtype_name(np.dtype(dtype))
    if sharding is None:
        return _core.load_file(FRAMEWORK, filename, device, backend, dtype=cast, narrow_64=_narrow())
    from . import _sharding

    return _sharding.load(filename, sharding, _jax_device(device), cast, backend, _narrow())


def _narrow() -> bool:
    """Whether 64-bit types load as 32-bit ones: JAX without ``jax_enable_x64`` holds them so,
    and narrowing them in the load (on the device) spares JAX a second pass over them."""
    return not jax.config.jax_enable_x64


def _jax_device(device: Any):
    """The ``jax.Device`` of ``device`` (a device, or the strings ``load_file`` takes): one of
    this process's own devices."""
    if isinstance(device, jax.Device):
        return device
    name = _device(device)
    if name == "cpu":
        return jax.local_devices(backend="cpu")[0]
    index = int(name.split(":")[1]) if ":" in name else 0
    return jax.local_devices(backend="gpu")[index]


def load(data: bytes, device: Any = "cpu") -> Dict[str, jax.Array]:
    """Loads the bytes of a safetensors file onto ``device`` as JAX arrays."""
    return _core.load(FRAMEWORK, data, device, narrow_64=_narrow())


def save(tensors: Dict[str, jax.Array], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors``."""
    return _core.save(FRAMEWORK, tensors, metadata)


def save_file(
    tensors: Dict[str, jax.Array],
    filename: Union[str, os.PathLike],
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Writes ``tensors`` to ``filename`` (atomically)."""
    _core.save_file(FRAMEWORK, tensors, filename, metadata)


def save_checkpoint(
    tensors: Dict[str, jax.Array],
    save_directory: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB",
    metadata: Optional[Dict[str, str]] = None,
) -> List[str]:
    """Writes ``tensors`` to the folder ``save_directory`` as a sharded checkpoint, split and
    named as ``huggingface_hub`` does (``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json``), atomically as a whole. Returns the paths written."""
    return _core.save_checkpoint(FRAMEWORK, tensors, save_directory, max_shard_size, metadata)
