"""``tensorplace.torch.load_file`` across the ranks of a ``torch.distributed`` group (gloo on
the CPU, 2 and 4 ranks; ``ranks_worker.py`` runs them): read once and broadcast, each rank
its part with ``split``, and a rank that cannot read making every rank raise."""

import json
import os
import socket
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

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ranks_worker.py")


def checkpoint(tmp_path):
    """Two shards and an index, written by safetensors.torch: tensors of every size class
    (several above the worker's 1 MiB bucket), 0-d and empty ones, bool and float8."""
    g = torch.Generator().manual_seed(25)
    tensors = {
        "w.big": torch.randn(512, 1024, generator=g),
        "w.mid": torch.randn(300, 700, generator=g).to(torch.bfloat16),
        "w.odd": torch.randn(7, 5, generator=g),
        "emb": torch.randn(1000, 63, generator=g).to(torch.float16),
        "norm": torch.randn(5, generator=g),
        "scale": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "mask": torch.rand(13, generator=g) > 0.5,
        "f8": torch.randn(64, generator=g).to(torch.float8_e4m3fn),
        "big.2": torch.randint(-100, 100, (400, 1000), generator=g, dtype=torch.int32),
    }
    shards = {"model-00001-of-00002.safetensors": ["w.big", "w.mid", "w.odd", "emb", "norm"],
              "model-00002-of-00002.safetensors": ["scale", "empty", "mask", "f8", "big.2"]}
    weight_map = {}
    for file, names in shards.items():
        safetensors.torch.save_file({n: tensors[n] for n in names}, tmp_path / file)
        weight_map.update({n: file for n in names})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(path, world, mode):
    p = subprocess.run([sys.executable, WORKER, str(path), str(world), str(free_port()), mode],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    for rank in range(world):
        assert f"rank {rank} ok" in out, out[-6000:]


@pytest.mark.parametrize("world", [2, 4])
def test_read_once_and_broadcast(tmp_path, world):
    run(checkpoint(tmp_path), world, "broadcast")


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_its_split(tmp_path, world):
    run(checkpoint(tmp_path), world, "split")


def test_a_rank_that_cannot_read_makes_every_rank_raise(tmp_path):
    run(checkpoint(tmp_path), 2, "fail")
