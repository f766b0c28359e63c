"""Loads across the ranks of a ``torch.distributed`` process group.

- **Read once, broadcast** (no ``split``): the checkpoint's tensors are assigned to the ranks,
  balanced by bytes (the same assignment on every rank, from the headers alone); each rank
  reads only its own, so the disk reads the checkpoint once, not once per rank; then every
  rank gets every tensor by ``broadcast`` over the group's backend (NCCL on GPUs, gloo on
  CPUs), neighbours of one owner packed in buckets of at most :data:`BUCKET` bytes, so that
  per-tensor calls do not dominate and the extra memory stays bounded.
- **Split** (``split=rule``): each rank reads only its part of each tensor the rule cuts (the
  crate's ``(rank, world, rule)`` split); no communication.

Before any broadcast, the ranks agree (one ``all_reduce``) on whether every rank could read
its part: a rank that failed makes every rank raise, none waits for it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _tensorplace as _native
from ._core import Framework, TensorplaceError, load_file as _load_file

#: The most bytes one broadcast carries (but for one tensor larger than it, sent alone).
BUCKET = 64 << 20
#: Alignment of each tensor in a bucket: every element type views its slice in place.
ALIGN = 64

#: One tensor of the checkpoint: name, safetensors dtype name, shape, bytes.
Entry = Tuple[str, str, List[int], int]


def load_file(framework: Framework, filename, device: str, backend: str, group, split,
              empty: Callable[[str, List[int], Any], torch.Tensor],
              view: Callable[[torch.Tensor, str, List[int]], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``tensorplace.torch.load_file`` over the process group ``group``; ``empty(dtype, shape,
    device)`` makes a tensor to receive into, ``view(bytes, dtype, shape)`` views bytes as
    one."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if split is not None:
        entries, _ = _native.inspect(os.fspath(filename))
        dims = {name: d for name, _, shape, _ in entries if (d := split(name, shape)) is not None}
        return _load_file(framework, filename, device, backend, split=(rank, world, dims))
    failure: Optional[BaseException] = None
    ours: Dict[str, torch.Tensor] = {}
    entries: List[Entry] = []
    owners: Dict[str, int] = {}
    try:
        entries = _entries(filename)
        owners = assign(entries, world)
        mine = [name for name, *_ in entries if owners[name] == rank]
        ours = _load_file(framework, filename, device, backend, names=mine) if mine else {}
    except Exception as e:  # told to every rank below, then raised here
        failure = e
    _agree(failure, filename, device, group)
    out: Dict[str, torch.Tensor] = {}
    for owner, bucket in buckets(entries, owners):
        received = _broadcast(bucket, owner, rank, ours, device, group, empty, view)
        out.update(received)
    return {name: out[name] for name, *_ in entries}


#: Bits an element of each dtype takes.
_BITS = {"F64": 64, "I64": 64, "U64": 64, "C64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16,
         "BF16": 16, "I16": 16, "U16": 16, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}


def _entries(filename) -> List[Entry]:
    """Every tensor of the checkpoint, in file order, with its bytes, from its headers."""
    entries, _ = _native.inspect(os.fspath(filename))
    out = []
    for name, dtype, shape, _ in entries:
        count = 1
        for d in shape:
            count *= d
        out.append((name, dtype, list(shape), count * _BITS.get(dtype, 8) // 8))
    return out


def assign(entries: List[Entry], world: int) -> Dict[str, int]:
    """Each tensor's owner: the largest first, each to the rank holding the fewest bytes so
    far (the lowest such rank): every rank computes the same assignment."""
    load = [0] * world
    owners = {}
    for name, _, _, nbytes in sorted(entries, key=lambda e: (-e[3], e[0])):
        r = min(range(world), key=lambda k: (load[k], k))
        owners[name] = r
        load[r] += nbytes
    return owners


def buckets(entries: List[Entry], owners: Dict[str, int]):
    """The broadcasts: for each owner in turn, its tensors in file order, packed into buckets
    of at most :data:`BUCKET` bytes (a larger tensor alone)."""
    world = max(owners.values(), default=-1) + 1
    for owner in range(world):
        bucket: List[Entry] = []
        size = 0
        for entry in entries:
            if owners[entry[0]] != owner:
                continue
            room = _padded(entry[3])
            if bucket and size + room > BUCKET:
                yield owner, bucket
                bucket, size = [], 0
            bucket.append(entry)
            size += room
        if bucket:
            yield owner, bucket


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _agree(failure, filename, device, group) -> None:
    """Raises on every rank where any rank failed to read its part (its own error where it
    failed)."""
    comm = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    failed = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=comm)
    dist.all_reduce(failed, group=group)
    if failure is not None:
        raise failure
    if int(failed.item()):
        raise TensorplaceError(
            "Io", f"{os.fspath(filename)}: {int(failed.item())} rank(s) of the group could not read their part",
            os.fspath(filename), None,
        )


def _broadcast(bucket: List[Entry], owner: int, rank: int, ours, device, group, empty, view):
    """One broadcast from ``owner``: its tensors of ``bucket`` on every rank."""
    src = dist.get_global_rank(group, owner) if group is not None else owner
    total = sum(_padded(e[3]) for e in bucket)
    if len(bucket) == 1:
        # One tensor (a large one): sent from its own memory, received into its own.
        name, dtype, shape, nbytes = bucket[0]
        tensor = ours[name] if rank == owner else empty(dtype, shape, device)
        if nbytes:
            dist.broadcast(_bytes(tensor), src=src, group=group)
        return {name: tensor}
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    offsets = []
    at = 0
    for name, _, _, nbytes in bucket:
        offsets.append(at)
        if rank == owner and nbytes:
            flat[at:at + nbytes].copy_(_bytes(ours[name]))
        at += _padded(nbytes)
    dist.broadcast(flat, src=src, group=group)
    if rank == owner:
        return {name: ours[name] for name, *_ in bucket}
    return {name: view(flat[at:at + nbytes], dtype, shape) for (name, dtype, shape, nbytes), at in zip(bucket, offsets)}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as bytes."""
    return t.reshape(-1).view(torch.uint8)
