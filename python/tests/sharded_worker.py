"""One JAX process of a sharded load, run by test_sharding.py:

    python sharded_worker.py CHECKPOINT PROCESS_ID PROCESSES DEVICES PORT

It loads CHECKPOINT (written by the test: its tensors are ``reference.npz`` beside it) onto a
(2, 4) mesh of the processes' CPU devices with every form of ``sharding=``, and checks each
global array against the reference: this process's shards, and a jitted reduction across
every process. With PROCESSES > 1 the processes meet through ``jax.distributed`` (gloo) on
127.0.0.1:PORT. Prints ``ok`` and exits 0 when every check passed.
"""

import os
import sys

path, pid, processes, devices, port = sys.argv[1], *map(int, sys.argv[2:6])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if processes > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=pid,
        initialization_timeout=120,
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tensorplace import TensorplaceError  # noqa: E402
from tensorplace.flax import load_file  # noqa: E402

reference = dict(np.load(os.path.join(os.path.dirname(path), "reference.npz")))
mesh = jax.make_mesh((2, 4), ("a", "b"))
assert len(jax.devices()) == 8, jax.devices()
total = jax.jit(lambda x: jnp.sum(x.astype(jnp.float32)))


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def check(loaded, specs):
    assert sorted(loaded) == sorted(reference), sorted(loaded)
    for name, want in reference.items():
        got = loaded[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.sharding.spec == specs[name], (name, got.sharding)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=name)
        # Every process's shards together: a reduction across the processes.
        whole = np.asarray(total(got).addressable_shards[0].data)
        np.testing.assert_allclose(whole, want.astype(np.float32).sum(), rtol=1e-5, err_msg=name)


specs = {"w": P("a", "b"), "rows": P("a"), "cols": P(None, "b"), "norm": P(), "scalar": P()}
shardings = {name: NamedSharding(mesh, spec) for name, spec in specs.items()}

# One sharding per name.
check(load_file(path, sharding=shardings), specs)
# Abstract arrays, nested as a tree (names joined with dots are flat here).
abstract = {n: jax.ShapeDtypeStruct(reference[n].shape, reference[n].dtype, sharding=s) for n, s in shardings.items()}
check(load_file(path, sharding=abstract), specs)
# A rule.
check(load_file(path, sharding=lambda name, shape, dtype: shardings[name]), specs)
# One sharding for all: P() replicates everything.
check(load_file(path, sharding=NamedSharding(mesh, P())), {n: P() for n in reference})

# Each process reads only its parts: "w" sharded over both mesh axes, read with pread (so the
# kernel's rchar counts it); this process holds half of it.
before = rchar()
only_w = load_file(path, sharding={"w": shardings["w"], **{n: None for n in reference if n != "w"}}, backend="pread")
read = rchar() - before
others = sum(v.nbytes for n, v in reference.items() if n != "w")
share = reference["w"].nbytes // processes
assert read <= share + others + (1 << 20), (read, share, others)
assert read >= share, (read, share)
np.testing.assert_array_equal(
    np.asarray(only_w["norm"]), reference["norm"]
)

# A cast as the arrays load.
cast = load_file(path, sharding=shardings, dtype=jnp.bfloat16)
assert cast["w"].dtype == jnp.bfloat16, cast["w"].dtype
for shard in cast["w"].addressable_shards:
    want = reference["w"][shard.index].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(shard.data), want)
assert cast["rows"].dtype == reference["rows"].dtype  # not floating: as stored

# Shapes the mesh does not divide, and names without a sharding, are errors naming them.
try:
    load_file(path, sharding=NamedSharding(mesh, P("b")))
except TensorplaceError as e:
    assert e.kind == "InvalidSharding" and e.tensor in reference, (e.kind, e.tensor, str(e))
else:
    raise AssertionError("an uneven sharding was accepted")
try:
    load_file(path, sharding={"w": shardings["w"]})
except TensorplaceError as e:
    assert e.kind == "TensorNotFound" and e.tensor != "w", (e.kind, e.tensor)
else:
    raise AssertionError("a mapping without every name was accepted")

print("ok", pid, read, share)
