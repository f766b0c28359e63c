"""Ranks of a torch.distributed group loading one checkpoint, run by test_ranks.py:

    python ranks_worker.py CHECKPOINT WORLD PORT MODE

spawns WORLD ranks (``torch.multiprocessing``, gloo on 127.0.0.1:PORT, a 60 s timeout on the
group). MODE ``broadcast``: each rank loads the whole checkpoint with ``process_group`` and
checks it against ``safetensors.torch`` and the bytes it read (the kernel's ``rchar``, reads
with pread) against its share; ``split``: each rank loads its part of the tensors a rule
cuts, checked against ``torch.tensor_split`` of the reference; ``fail``: rank 1 is given a
path that does not exist, and every rank must raise. Each rank prints ``rank R ok``.
"""

import glob
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same(got, want, what):
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (what, got.dtype, got.shape, want.shape)
    assert raw(got) == raw(want), what


def rule(name, shape):
    """Cut the matrices along their rows, the embedding along its columns; the rest whole."""
    if name.startswith("w."):
        return 0
    if name == "emb":
        return 1
    return None


def run(rank, world, port, path, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    import safetensors.torch

    import tensorplace._ranks
    from tensorplace import TensorplaceError
    from tensorplace.torch import load_file

    # Small buckets, so that the test sends some tensors alone and packs the others.
    tensorplace._ranks.BUCKET = 1 << 20
    reference = {}
    for shard in sorted(glob.glob(os.path.join(os.path.dirname(path), "*.safetensors"))):
        reference.update(safetensors.torch.load_file(shard))
    group = dist.group.WORLD
    if mode == "broadcast":
        before = rchar()
        got = load_file(path, backend="pread", process_group=group)
        read = rchar() - before
        assert sorted(got) == sorted(reference)
        for name, want in reference.items():
            same(got[name], want, name)
        entries = tensorplace._ranks._entries(path)
        owners = tensorplace._ranks.assign(entries, world)
        share = sum(n for name, _, _, n in entries if owners[name] == rank)
        total = sum(n for *_, n in entries)
        assert share <= total // world + max(n for *_, n in entries), (share, total)
        assert share <= read <= share + (256 << 10), (rank, read, share)
        print(f"rank {rank} read {read} bytes, its share {share} of {total}", flush=True)
    elif mode == "split":
        got = load_file(path, backend="pread", process_group=group, split=rule)
        for name, want in reference.items():
            dim = rule(name, list(want.shape))
            part = want if dim is None else torch.tensor_split(want, world, dim)[rank]
            same(got[name], part, name)
    elif mode == "fail":
        given = path if rank != 1 else os.path.join(os.path.dirname(path), "absent.safetensors.index.json")
        try:
            load_file(given, process_group=group)
        except TensorplaceError as e:
            assert (rank == 1) == isinstance(e, FileNotFoundError), (rank, e)
        else:
            raise AssertionError(f"rank {rank} loaded although rank 1 failed")
    print(f"rank {rank} ok", flush=True)
    # Every rank done with the group before any tears its connections down (gloo aborts a
    # process whose peer closes a pair it still reads).
    dist.barrier()
    dist.destroy_process_group()
    # Out at once: gloo's C++ threads have been seen to abort the interpreter's own exit
    # ("terminate called without an active exception", once in ~60 runs), after every
    # check here had passed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    path, world, port, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mp.spawn(run, args=(world, port, path, mode), nprocs=world)
