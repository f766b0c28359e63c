"""``safetensors.torch``'s API: ``load_file(filename, device="cpu")`` places the tensors on
the device (the CPU, or ``cuda``/``cuda:N``, loaded by the crate's CUDA backend) and hands
them to torch by DLPack, without a copy.

float8 tensors are exported as bytes and viewed with torch's float8 type (older torch
releases refuse float8 over DLPack); F4 tensors, as ``safetensors.torch`` gives them, as
``torch.float4_e2m1fn_x2``, two elements a byte: the last dimension halved (and doubled again
in a save). CUDA tensors live in one device allocation per load,
freed when the last of its tensors is; torch's allocator does not see it
(``torch.cuda.memory_allocated()`` does not count it).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from . import _core
from . import _tensorplace as _native
from . import numpy as _np

#: The types carried as bytes and viewed as torch's own.
_CARRIED = {
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",
}

_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.float64: "F64",
}
for _name, _attr in [("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")] + [
    (k, v) for k, v in _CARRIED.items()
]:
    if hasattr(torch, _attr):
        _NAMES[getattr(torch, _attr)] = _name


def _device(device: Any) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        # "cuda" is the current device, as torch reads it (0 where torch sees no GPU: the load
        # then says the device is unavailable).
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = device.index if device.index is not None else current
        return f"cuda:{index}"
    raise _core.TensorplaceError("InvalidDevice", f"{device}: not a CPU or CUDA device")


def to_torch(view) -> torch.Tensor:
    """A view as a torch tensor sharing its memory (on the view's device)."""
    if view.dtype in _CARRIED:
        # An F4 carrier's last dimension is halved already (two elements a byte).
        return torch.from_dlpack(view.carrier()).view(getattr(torch, _CARRIED[view.dtype]))
    return torch.from_dlpack(view)


def _build(shape, dtype: torch.dtype, block, offset: int) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(block, dtype=dtype, count=count, offset=offset).view(shape)


_ALL = {name: t for t, name in _NAMES.items()}

#: The types ``safe_open`` builds on host blocks (F4's packed shape is left to ``to_torch``).
_DTYPES = {name: t for t, name in _NAMES.items() if name != "F4"}


def _spec(name: str, t: torch.Tensor):
    if t.dtype not in _NAMES:
        raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    shape = list(t.shape)
    if _NAMES[t.dtype] == "F4":
        if not shape:
            raise ValueError(f"{name}: a 0-d float4_e2m1fn_x2 holds two elements: give it a dimension")
        shape[-1] *= 2  # two elements a byte
    return (name, _NAMES[t.dtype], shape, data)


#: torch for the shared loads, saves and ``safe_open``: CPU and CUDA tensors by DLPack;
#: ``safe_open``'s small reads onto the CPU are tensors viewing (and keeping) numpy blocks.
FRAMEWORK = _core.Framework(to_array=to_torch, spec=_spec, device=_device,
                            host_arrays=(_np.new_block, _build, _DTYPES.get), clamps_slices=True)


def load_file(
    filename: Union[str, os.PathLike],
    device: Union[str, int] = "cpu",
    *,
    backend: str = "mmap",
    process_group: Any = None,
    split: Optional[Callable[[str, List[int]], Optional[int]]] = None,
) -> Dict[str, torch.Tensor]:
    """Loads a safetensors file (or a sharded checkpoint: a folder or its index) onto
    ``device`` as torch tensors.

    With ``process_group`` (a ``torch.distributed`` group; every rank of it calls this), and
    no ``split``: each rank reads only its share of the tensors (balanced by bytes) and every
    rank ends with every tensor, by broadcasts over the group. With ``split(name, shape)``
    giving a dimension (or ``None``: whole), each rank reads only its part of each tensor cut
    along that dimension (part ``rank`` of ``world``, as ``numpy.array_split`` cuts)."""
    if process_group is None and split is None:
        return _core.load_file(FRAMEWORK, filename, device, backend)
    import torch.distributed as dist

    if process_group is None and not dist.is_initialized():
        raise ValueError("split needs a process group (torch.distributed is not initialized)")
    from . import _ranks

    group = process_group if process_group is not None else dist.group.WORLD
    return _ranks.load_file(FRAMEWORK, filename, _device(device), backend, group, split, _empty, _view)


#: What ``iter_tensors`` loads ahead of the caller by default.
STREAM_AHEAD = 256 << 20


def iter_tensors(
    filename: Union[str, os.PathLike],
    device: Union[str, int] = "cpu",
    *,
    max_bytes: int = STREAM_AHEAD,
    backend: str = "mmap",
) -> Iterator[Tuple[str, torch.Tensor]]:
    """The tensors of a file or sharded checkpoint one at a time, ``(name, tensor)`` in file
    order (shard after shard), as vLLM's loaders consume them: read ahead on the crate's I/O
    engine while the caller consumes, never more than ``max_bytes`` (or the largest tensor,
    where that is more) loaded and not yet handed out, provided the caller drops the tensors
    it has taken."""
    stream = _native.stream(os.fspath(filename), _device(device), backend, max_bytes)
    for name, view in stream:
        yield name, to_torch(view)


def _torch_shape(dtype: str, shape: List[int]) -> List[int]:
    """The torch shape of a tensor of ``dtype`` and ``shape`` (F4: two elements a byte)."""
    if dtype == "F4":
        return [*shape[:-1], shape[-1] // 2]
    return list(shape)


def _empty(dtype: str, shape: List[int], device: str) -> torch.Tensor:
    return torch.empty(_torch_shape(dtype, shape), dtype=_ALL[dtype], device=device)


def _view(data: torch.Tensor, dtype: str, shape: List[int]) -> torch.Tensor:
    """Bytes (a 1-d ``uint8`` tensor) viewed as a tensor of ``dtype`` and ``shape``."""
    return data.view(_ALL[dtype]).reshape(_torch_shape(dtype, shape))


def load(data: bytes) -> Dict[str, torch.Tensor]:
    """Loads the bytes of a safetensors file into CPU torch tensors."""
    return _core.load(FRAMEWORK, data)


def save(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors``."""
    return _core.save(FRAMEWORK, tensors, metadata)


def save_file(
    tensors: Dict[str, torch.Tensor],
    filename: Union[str, os.PathLike],
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Writes ``tensors`` to ``filename`` (atomically)."""
    _core.save_file(FRAMEWORK, tensors, filename, metadata)


def save_checkpoint(
    tensors: Dict[str, torch.Tensor],
    save_directory: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB",
    metadata: Optional[Dict[str, str]] = None,
) -> List[str]:
    """Writes ``tensors`` to the folder ``save_directory`` as a sharded checkpoint, split and
    named as ``huggingface_hub`` does (``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json``), atomically as a whole. Returns the paths written."""
    return _core.save_checkpoint(FRAMEWORK, tensors, save_directory, max_shard_size, metadata)
