"""Sharded loads for JAX: every tensor of a file or checkpoint placed on a sharding, each
process reading only the parts its own devices hold, each part once.

For each tensor, ``sharding.addressable_devices_indices_map(shape)`` gives the index each of
this process's devices holds; identical indices (replicated dimensions) are read once and
copied to every device that holds them. The parts of every tensor are read by the crate in
one pass over the files (``Reader.parts``), a window of at most :data:`WINDOW` bytes at a
time, and the global arrays assembled with ``jax.make_array_from_single_device_arrays``.
A part whose first device is a GPU is read straight into that GPU's memory by the crate
(``Reader.parts_on``: no host copy, casts on the device) and handed to JAX by DLPack; the
other devices holding it get a device-to-device copy. Parts for CPU devices are read into
host memory and put on their devices.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from . import _tensorplace as _native
from ._core import TensorplaceError, slice_text
from . import numpy as _np

#: Host bytes of parts read at once: the parts of a window are placed on their devices (and
#: their host copies dropped) before the next window is read.
WINDOW = 1 << 30

#: What the 64-bit types load as when narrowed.
_NARROWED = {"I64": "I32", "U64": "U32", "F64": "F32"}

#: The dtypes a cast applies to (the crate casts floating tensors only).
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}


class _Tensor:
    """One tensor of a sharded load: its sharding, and the part each device holds."""

    def __init__(self, name: str, shape: Tuple[int, ...], dtype: Any, sharding, devices, parts: range):
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.sharding = sharding
        #: (device, index of its part in the load's parts), in the sharding's device order.
        self.devices: List[Tuple[Any, int]] = devices
        #: Its parts' indices in the load's parts (none where this process holds no part).
        self.parts = parts


def load(filename, sharding: Any, device: Any, dtype: Optional[str], backend: str,
         narrow_64: bool = False) -> Dict[str, jax.Array]:
    """The tensors of ``filename`` as global JAX arrays on ``sharding`` (a ``Sharding``, a
    mapping from names to shardings or ``ShapeDtypeStruct``s, or a callable ``(name, shape,
    dtype)`` returning a sharding or ``None``); ``device``: where a tensor without a sharding
    goes; ``dtype``: the name of the dtype floating tensors are cast to, or ``None``;
    ``narrow_64``: I64, U64 and F64 read as I32, U32 and F32."""
    filename = os.fspath(filename)
    reader = _native.open(filename, "cpu", backend, _np.to_numpy, None, dtype, narrow_64)
    rule = _rule(sharding)
    parts: List[Tuple[str, Optional[str]]] = []
    sizes: List[int] = []
    homes: List[Any] = []
    tensors: List[_Tensor] = []
    for name in reader.keys():
        stored, shape = reader.info(name)
        shape = tuple(shape)
        out = dtype if dtype is not None and stored in _FLOATS else stored
        if narrow_64 and out in _NARROWED:
            out = _NARROWED[out]
        target = rule(name, shape, stored)
        if target is None:
            target = jax.sharding.SingleDeviceSharding(device)
        tensors.append(_plan(filename, name, shape, out, target, parts, sizes, homes))
    return _place(reader, tensors, parts, sizes, homes)


def _rule(sharding: Any) -> Callable[[str, Tuple[int, ...], str], Any]:
    """The sharding of each tensor, by name, shape and stored dtype."""
    if isinstance(sharding, jax.sharding.Sharding):
        return lambda name, shape, dtype: sharding
    if isinstance(sharding, Mapping):
        flat = _flatten(sharding)

        def lookup(name, shape, dtype):
            if name not in flat:
                raise TensorplaceError("TensorNotFound", f'tensor "{name}": no sharding given for it', None, name)
            target = flat[name]
            if isinstance(target, jax.ShapeDtypeStruct):
                if tuple(target.shape) != shape:
                    raise TensorplaceError(
                        "InvalidSharding",
                        f'tensor "{name}": the abstract array has shape {tuple(target.shape)}, the file {shape}',
                        None,
                        name,
                    )
                target = target.sharding
            return target

        return lookup
    if callable(sharding):
        return sharding
    raise TypeError(f"sharding must be a jax Sharding, a mapping or a callable, not {type(sharding).__name__}")


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, Any]:
    """A nested mapping (an abstract tree) as names joined with dots."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _plan(filename, name, shape, dtype, sharding, parts, sizes, homes) -> _Tensor:
    """The tensor's parts on this process's devices, each distinct part added once to
    ``parts`` (with its size in ``sizes`` and the first device holding it in ``homes``)."""
    if not isinstance(sharding, jax.sharding.Sharding):
        raise TensorplaceError(
            "InvalidSharding", f'tensor "{name}": {sharding!r} is not a jax.sharding.Sharding', filename, name
        )
    try:
        shard_shape = sharding.shard_shape(shape)
        indices = sharding.addressable_devices_indices_map(shape)
    except Exception as e:  # JAX's own words: a shape the mesh does not divide, say.
        raise TensorplaceError("InvalidSharding", f'tensor "{name}": shape {shape}: {e}', filename, name) from e
    itemsize = np.dtype(_np._dtype_of(dtype) or np.uint8).itemsize
    first = len(parts)
    seen: Dict[Tuple, int] = {}
    devices = []
    for device, index in indices.items():
        key, text = _part(index, shape)
        if key not in seen:
            seen[key] = len(parts)
            parts.append((name, text))
            sizes.append(math.prod(shard_shape) * itemsize)
            homes.append(device)
        devices.append((device, seen[key]))
    return _Tensor(name, shape, _jax_dtype(dtype), sharding, devices, range(first, len(parts)))


def _part(index, shape) -> Tuple[Tuple, Optional[str]]:
    """A device's index as a key (its bounds) and the crate's slice text (``None``: whole)."""
    index = tuple(index) if index is not None else ()
    bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    if all(b == (0, n) for b, n in zip(bounds, shape)):
        return bounds, None
    text = slice_text(tuple(slice(a, b) for a, b in bounds), shape)
    return bounds, text


def _jax_dtype(name: str):
    """The dtype JAX gives a host array of the safetensors dtype ``name``."""
    dtype = _np._dtype_of(name)
    if dtype is None:
        raise TensorplaceError("Unsupported", f"{name} has no JAX type here")
    return jax.dtypes.canonicalize_dtype(dtype)


def _on_gpu(device) -> bool:
    return getattr(device, "platform", None) in ("gpu", "cuda")


def _read(reader, parts, homes) -> List[Any]:
    """Reads ``parts``: as host (numpy) arrays where every home is a CPU device, else each
    part onto its home (a GPU's parts straight into its memory, as JAX arrays there)."""
    if not any(_on_gpu(d) for d in homes):
        return [_np.to_numpy(v) for v in reader.get_parts(parts)]
    from .flax import to_jax

    targets = [f"cuda:{d.local_hardware_id}" if _on_gpu(d) else "cpu" for d in homes]
    views = reader.get_parts(parts, targets)
    return [to_jax(v) if _on_gpu(d) else _np.to_numpy(v) for v, d in zip(views, homes)]


def _place(reader, tensors: List[_Tensor], parts, sizes, homes) -> Dict[str, jax.Array]:
    """Reads the parts a window of whole tensors at a time (at most :data:`WINDOW` bytes, at
    least one tensor), places each part on its devices and assembles the global arrays."""
    out: Dict[str, jax.Array] = {}
    t = 0
    while t < len(tensors):
        end, nbytes = t, 0
        while end < len(tensors):
            size = sum(sizes[k] for k in tensors[end].parts)
            if end > t and nbytes + size > WINDOW:
                break
            nbytes += size
            end += 1
        lo, hi = tensors[t].parts.start, tensors[end - 1].parts.stop
        read = _read(reader, parts[lo:hi], homes[lo:hi]) if hi > lo else []
        for tensor in tensors[t:end]:
            # A GPU part is on its home already; every other placement is a copy.
            shards = [read[k - lo] if d == homes[k] and _on_gpu(d) else jax.device_put(read[k - lo], d)
                      for d, k in tensor.devices]
            out[tensor.name] = jax.make_array_from_single_device_arrays(
                tensor.shape, tensor.sharding, shards, dtype=tensor.dtype
            )
        t = end
    return out
