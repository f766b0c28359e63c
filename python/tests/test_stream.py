"""``tensorplace.torch.iter_tensors``: a checkpoint's tensors one at a time, in file order,
equal to a whole load, in bounded memory (a 1 GiB checkpoint streamed with ``max_bytes`` of
64 MiB, in a process of its own: its anonymous memory measured at every tensor)."""

import json
import os
import subprocess
import sys

import pytest

try:
    import torch
except ImportError:
    if os.environ.get("TENSORPLACE_TEST_TORCH") == "required":
        raise
    pytest.skip("torch is not installed", allow_module_level=True)

import safetensors.torch  # noqa: E402

import tensorplace.torch  # noqa: E402
from tensorplace import TensorplaceError  # noqa: E402


def sharded(tmp_path, tensors, per_shard):
    names = list(tensors)
    shards = [names[k:k + per_shard] for k in range(0, len(names), per_shard)]
    weight_map = {}
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file({n: tensors[n] for n in part}, tmp_path / file)
        weight_map.update({n: file for n in part})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_streams_equal_a_whole_load_in_file_order(tmp_path):
    g = torch.Generator().manual_seed(9)
    tensors = {f"layer.{i}.w": torch.randn(i + 1, 33, generator=g).to([torch.float32, torch.bfloat16][i % 2])
               for i in range(40)}
    tensors["scalar"] = torch.tensor(1.5)
    tensors["empty"] = torch.zeros(0, 2)
    index = sharded(tmp_path, tensors, per_shard=7)
    whole = tensorplace.torch.load_file(index)
    for max_bytes in (1, 4096, 1 << 30):
        got = list(tensorplace.torch.iter_tensors(index, max_bytes=max_bytes))
        assert [n for n, _ in got] == list(whole), max_bytes
        for name, t in got:
            assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
    with pytest.raises(TensorplaceError):
        next(tensorplace.torch.iter_tensors(tmp_path / "absent.safetensors"))
    # Stopping half-way is fine.
    stream = tensorplace.torch.iter_tensors(index, max_bytes=1)
    next(stream)
    del stream


STREAM_1GIB = r"""
import sys, torch, tensorplace.torch

def anon():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("RssAnon:")).split()[1]) << 10

base, peak, count = anon(), 0, 0
for name, t in tensorplace.torch.iter_tensors(sys.argv[1], max_bytes=64 << 20):
    i = int(name.split(".")[1])
    assert bool(torch.all(t == i)), name
    count += 1
    peak = max(peak, anon() - base)
    del t
print(count, peak >> 20)
"""


def test_streaming_a_gib_stays_within_its_bound(tmp_path):
    # 64 tensors of 16 MiB (each full of its index) in 4 shards: 1 GiB.
    tensors = {f"w.{i}": torch.full((4 << 20,), float(i)) for i in range(64)}
    index = sharded(tmp_path, tensors, per_shard=16)
    del tensors
    out = subprocess.run([sys.executable, "-c", STREAM_1GIB, str(index)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    count, peak_mib = map(int, out.stdout.split())
    assert count == 64
    # The bound, the largest tensor (16 MiB) and a fixed overhead (the stream's thread, the
    # allocator's and torch's own).
    assert peak_mib <= 64 + 16 + 48, f"{peak_mib} MiB of anonymous memory above the start"
