"""Sharded loads for JAX (``tensorplace.flax.load_file(..., sharding=...)``): a checkpoint
written by ``safetensors`` (two shards and an index) onto a (2, 4) mesh of CPU devices, in one
process of 8 devices and in 2 processes of 4 under ``jax.distributed`` (gloo on 127.0.0.1),
each global array checked against the reference (``sharded_worker.py`` runs each process);
and, in this process, the single-device forms and casts."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

import tensorplace.flax
from tensorplace import TensorplaceError

WORKER = pathlib.Path(__file__).resolve().parent / "sharded_worker.py"


def checkpoint(tmp_path) -> pathlib.Path:
    """Two shards and their index, as ``safetensors`` writes them; ``reference.npz`` beside."""
    rng = np.random.default_rng(24)
    tensors = {
        "w": rng.standard_normal((1024, 1024), dtype=np.float32),
        "rows": rng.integers(-1000, 1000, (6, 5), dtype=np.int32),
        "cols": rng.standard_normal((3, 8)).astype(np.float16),
        "norm": rng.standard_normal(16).astype(np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
    }
    shards = {"model-00001-of-00002.safetensors": ["rows", "w"],
              "model-00002-of-00002.safetensors": ["cols", "norm", "scalar"]}
    weight_map = {}
    for file, names in shards.items():
        safetensors.numpy.save_file({n: tensors[n] for n in names}, str(tmp_path / file))
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    np.savez(tmp_path / "reference.npz", **tensors)
    return tmp_path / "model.safetensors.index.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(path, processes: int, devices: int):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(path), str(pid), str(processes), str(devices), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for pid in range(processes)
    ]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append((p.returncode, out))
    for pid, (rc, out) in enumerate(outputs):
        assert rc == 0 and f"ok {pid}" in out, f"process {pid} (exit {rc}):\n{out[-6000:]}"


def test_one_process_of_eight_devices(tmp_path):
    run_workers(checkpoint(tmp_path), processes=1, devices=8)


def test_two_processes_of_four_devices(tmp_path):
    run_workers(checkpoint(tmp_path), processes=2, devices=4)


def test_one_device_forms_and_casts(tmp_path):
    path = checkpoint(tmp_path)
    reference = dict(np.load(tmp_path / "reference.npz"))
    cpu = jax.devices("cpu")[0]
    single = jax.sharding.SingleDeviceSharding(cpu)
    # A rule giving None for some names: those go to `device`.
    loaded = tensorplace.flax.load_file(path, sharding=lambda n, shape, dtype: single if n == "w" else None)
    for name, want in reference.items():
        got = loaded[name]
        assert got.devices() == {cpu}
        np.testing.assert_array_equal(np.asarray(got), want)
    # Equal to safetensors.flax's load of each shard.
    theirs = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        theirs.update(safetensors.flax.load_file(str(shard)))
    for name, want in theirs.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(want))
    # A cast without a sharding: floating tensors only, the values ml_dtypes gives.
    cast = tensorplace.flax.load_file(path, dtype=jnp.bfloat16)
    for name, want in reference.items():
        if want.dtype.kind == "f":
            assert cast[name].dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(np.asarray(cast[name]), want.astype(ml_dtypes.bfloat16))
        else:
            np.testing.assert_array_equal(np.asarray(cast[name]), want)


def test_bad_shardings_are_errors_naming_the_tensor(tmp_path):
    path = checkpoint(tmp_path)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.flax.load_file(path, sharding={"w": "not a sharding", "rows": None, "cols": None,
                                                   "norm": None, "scalar": None})
    assert e.value.kind == "InvalidSharding" and e.value.tensor == "w"
    abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    with pytest.raises(TypeError):
        tensorplace.flax.load_file(path, sharding=lambda n, s, d: None, dtype="not a dtype")
    with pytest.raises(TensorplaceError) as e:
        tensorplace.flax.load_file(path, sharding={**abstract, "rows": None, "cols": None, "norm": None,
                                                   "scalar": None})
    assert e.value.kind == "InvalidSharding" and e.value.tensor == "w"
    with pytest.raises(TypeError):
        tensorplace.flax.load_file(path, sharding=3)


def test_parts_go_to_the_devices_asked(tmp_path):
    """The crate's reader places each part on the device named for it: on the CPU, the same
    bytes as without devices; a device list of the wrong length is refused."""
    from tensorplace import _tensorplace as native
    from tensorplace import numpy as tnp

    path = checkpoint(tmp_path)
    reference = dict(np.load(tmp_path / "reference.npz"))
    reader = native.open(str(path), "cpu", "mmap", tnp.to_numpy, None, None, False)
    parts = [("w", "[0:512, :]"), ("cols", None), ("w", "[512:1024, 7:9]")]
    wants = [reference["w"][:512], reference["cols"], reference["w"][512:, 7:9]]
    for got, want in zip(reader.get_parts(parts, ["cpu"] * 3), wants):
        np.testing.assert_array_equal(tnp.to_numpy(got), want)
    with pytest.raises(ValueError):
        reader.get_parts(parts, ["cpu"])


def test_gpu_shards_load_straight_onto_the_gpus(tmp_path):
    """On a machine with JAX GPUs: a sharding over every GPU (each part read into its GPU's
    memory by the crate, cast there), tensors the rule leaves to the CPU on the CPU; values
    equal to the reference."""
    gpus = [d for d in jax.devices() if d.platform in ("gpu", "cuda")]
    if not gpus:
        pytest.skip("no JAX GPU device here")
    path = checkpoint(tmp_path)
    reference = dict(np.load(tmp_path / "reference.npz"))
    mesh = jax.sharding.Mesh(np.array(gpus), ("a",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a"))
    cpu = jax.devices("cpu")[0]

    def rule(name, shape, dtype):
        if name == "norm":
            return jax.sharding.SingleDeviceSharding(cpu)
        return rows if shape and shape[0] % len(gpus) == 0 else None

    for dtype in [None, jnp.bfloat16]:
        loaded = tensorplace.flax.load_file(path, device=gpus[0], sharding=rule, dtype=dtype)
        for name, want in reference.items():
            got = loaded[name]
            on = {cpu} if name == "norm" else set(gpus) if got.ndim and want.shape[0] % len(gpus) == 0 else {gpus[0]}
            assert got.devices() == on, name
            if dtype is not None and want.dtype.kind == "f":
                want = want.astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
