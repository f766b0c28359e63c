"""The Python package against the real ``safetensors`` package: the same arrays for every
dtype both support, byte-identical saves, files written by each loaded by the other,
errors by kind, arrays that outlive their file, and memory freed with the arrays."""

import gc
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.flax
import safetensors.numpy

import tensorplace
import tensorplace.flax
import tensorplace.numpy
from tensorplace import TensorplaceError, safe_open

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
RNG = np.random.default_rng(7)

# Every dtype safetensors.numpy takes.
NUMPY_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.uint64, np.int32, np.uint32,
                np.int16, np.uint16, np.int8, np.uint8, np.bool_, np.complex64]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (1, 1, 9)]


def random_array(dtype, shape):
    dtype = np.dtype(dtype)
    raw = RNG.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        return (raw[: int(np.prod(shape))] & 1).astype(np.bool_).reshape(shape)
    return raw.view(dtype).reshape(shape)


def numpy_tensors():
    out = {}
    for i, dtype in enumerate(NUMPY_DTYPES):
        for j, shape in enumerate(SHAPES):
            out[f"t{i:02}_{j}.{np.dtype(dtype).name}"] = random_array(dtype, shape)
    return out


def same(a, b):
    """Same dtype, shape and bytes (NaN payloads included)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()


def test_numpy_loads_what_safetensors_saves_and_saves_the_same_bytes(tmp_path):
    tensors = numpy_tensors()
    for metadata in [None, {"format": "np"}]:
        reference = safetensors.numpy.save(tensors, metadata=metadata)
        ours = tensorplace.numpy.save(tensors, metadata=metadata)
        assert ours == reference
        loaded = tensorplace.numpy.load(reference)
        assert set(loaded) == set(safetensors.numpy.load(reference))
        for name, array in tensors.items():
            same(loaded[name], array)
    path = tmp_path / "ours.safetensors"
    tensorplace.numpy.save_file(tensors, path, metadata={"k": "v"})
    theirs = safetensors.numpy.load_file(path)
    for name, array in tensors.items():
        same(theirs[name], array)
    path2 = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(tensors, path2)
    for name, array in tensorplace.numpy.load_file(path2).items():
        same(array, tensors[name])


def test_flax_matches_safetensors_flax(tmp_path):
    tensors = {
        "f32": jnp.asarray(random_array(np.float32, (4, 6))),
        "f16": jnp.asarray(random_array(np.float16, (5,))),
        "bf16": jnp.asarray(RNG.standard_normal((3, 7)).astype(ml_dtypes.bfloat16)),
        "i32": jnp.asarray(random_array(np.int32, (2, 2))),
        "u8": jnp.asarray(random_array(np.uint8, (9,))),
        "b": jnp.asarray(random_array(np.bool_, (4,))),
        "scalar": jnp.asarray(np.float32(3.5)),
    }
    reference = safetensors.flax.save(tensors)
    assert tensorplace.flax.save(tensors) == reference
    assert tensorplace.flax.save(tensors, {"a": "b"}) == safetensors.flax.save(tensors, {"a": "b"})
    path = tmp_path / "m.safetensors"
    safetensors.flax.save_file(tensors, path)
    theirs = safetensors.flax.load_file(path)
    for device in [None, "cpu", jax.devices("cpu")[0]]:
        ours = tensorplace.flax.load_file(path, device) if device is not None else tensorplace.flax.load_file(path)
        assert set(ours) == set(theirs)
        for name in tensors:
            assert isinstance(ours[name], jax.Array)
            assert ours[name].devices() == {jax.devices("cpu")[0]}
            same(ours[name], theirs[name])
    ours = tensorplace.flax.load(reference)
    for name in tensors:
        same(ours[name], theirs[name])


def test_the_python_fixtures_load_as_safetensors_loads_them():
    for name in ["numpy_all.safetensors", "rust_writer_all.safetensors"]:
        path = FIXTURES / name
        with safe_open(path, "np") as f:
            names = f.keys()
            dtypes = {k: f.get_slice(k).get_dtype() for k in names}
        with safetensors.safe_open(str(path), "np") as ref, safe_open(path, "np") as ours:
            assert sorted(ref.keys()) == names
            for k in names:
                if dtypes[k] in tensorplace.numpy._NUMPY:
                    same(ours.get_tensor(k), ref.get_tensor(k))
                    assert ours.get_slice(k).get_shape() == list(ref.get_slice(k).get_shape())
        if any(d in ("F4", "F6_E2M3", "F6_E3M2") for d in dtypes.values()):
            # Packed sub-byte types have no numpy type (safetensors.numpy has none either).
            with pytest.raises(TensorplaceError) as e:
                tensorplace.numpy.load_file(path)
            assert e.value.kind == "Unsupported"
        with safe_open(path, "np") as f:
            for k, dtype in dtypes.items():
                if dtype in tensorplace.numpy._ML_DTYPES:
                    a = f.get_tensor(k)
                    assert a.dtype == np.dtype(getattr(ml_dtypes, tensorplace.numpy._ML_DTYPES[dtype]))
                    assert a.shape == tuple(f.get_slice(k).get_shape())


def test_safe_open_reads_keys_metadata_tensors_and_slices(tmp_path):
    tensors = {"a": random_array(np.float32, (6, 4)), "b": random_array(np.int64, (3,))}
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "np"})
    with safe_open(path, framework="np") as f:
        assert f.keys() == ["a", "b"]
        assert f.metadata() == {"format": "np"}
        same(f.get_tensor("a"), tensors["a"])
        sl = f.get_slice("a")
        assert sl.get_shape() == [6, 4] and sl.get_dtype() == "F32"
        same(sl[1:3, :], tensors["a"][1:3, :])
        same(sl[2], tensors["a"][2])
        with pytest.raises(TensorplaceError) as e:
            f.get_tensor("missing")
        assert e.value.kind == "TensorNotFound"
    with safe_open(path, framework="flax") as f:
        same(f.get_tensor("a"), tensors["a"])


@pytest.mark.parametrize("backend", ["mmap", "pread", "direct"])
def test_safe_open_loops_give_what_safetensors_gives(tmp_path, backend):
    import random

    tensors = {f"t{i:04}": random_array(NUMPY_DTYPES[i % len(NUMPY_DTYPES)], SHAPES[i % len(SHAPES)])
               for i in range(300)}
    tensors.update({f"big{i}": random_array(np.float32, (300, 257)) for i in range(3)})
    tensors["bf"] = random_array(np.uint16, (5, 3)).view(ml_dtypes.bfloat16)
    path = tmp_path / "loop.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "np"})
    with safe_open(path, "np", backend=backend) as ours, safetensors.safe_open(str(path), "np") as ref:
        assert ours.keys() == sorted(ref.keys())
        assert ours.metadata() == ref.metadata()
        keys = ours.keys()
        for order in [keys, keys[::-1], random.Random(3).sample(keys, len(keys))]:
            for k in order:
                a, b = ours.get_tensor(k), ref.get_tensor(k)
                assert a.dtype == b.dtype and a.shape == b.shape, k
                assert a.tobytes() == b.tobytes(), k
        # One row (or element) of each tensor of rank 1 or more, as get_slice gives it.
        for k in keys:
            if ref.get_slice(k).get_shape() and ref.get_slice(k).get_shape()[0] > 0:
                assert ours.get_slice(k)[0].tobytes() == ref.get_slice(k)[0].tobytes(), k
                # Negative bounds (safetensors refuses them): numpy's answer.
                assert ours.get_slice(k)[-1:].tobytes() == ref.get_tensor(k)[-1:].tobytes(), k
        some = keys[::-7]
        got = ours.get_tensors(some + some[:1])
        assert list(got) == [k for k in ours.offset_keys() if k in some]
        for k, a in got.items():
            assert a.tobytes() == ref.get_tensor(k).tobytes(), k
        # A name that is not there: the error safetensors raises (ours is also a TensorplaceError).
        for call in [lambda: ours.get_tensor("nope"), lambda: ours.get_slice("nope"),
                     lambda: ours.get_tensors(["nope"])]:
            with pytest.raises(safetensors.SafetensorError):
                call()
            with pytest.raises(TensorplaceError) as e:
                call()
            assert e.value.kind == "TensorNotFound" and e.value.tensor == "nope"
        held = ours.get_tensor("big0")
    # Closed: every call is an error, as safetensors' handle's; arrays read stay valid.
    for call in [lambda: ours.keys(), lambda: ours.get_tensor("t0000"), lambda: ours.metadata()]:
        with pytest.raises(safetensors.SafetensorError):
            call()
    same(held, tensors["big0"])
    with safe_open(path, "flax") as f:
        for k in ["big1", "t0003", "bf"]:
            a = f.get_tensor(k)
            assert isinstance(a, jax.Array)
            assert np.asarray(a).tobytes() == np.asarray(jnp.asarray(tensors[k])).tobytes(), k
    with pytest.raises(TensorplaceError) as e:
        safe_open(path, "np", device="cuda:0")
    assert e.value.kind == "InvalidDevice"


def test_safe_open_arrays_own_their_memory(tmp_path):
    # Small reads share host blocks (several here): each array must still be its own,
    # writable, aligned, alive after the handle closes and after its neighbours are freed.
    ml = [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
    tensors = {f"s{i:04}": random_array(np.float32, (7, 1 + i % 300)) for i in range(900)}
    tensors.update({f"m{i}": random_array(np.uint8, (13, 4)).view(t) for i, t in enumerate(ml)})
    tensors.update({"empty": np.zeros((0, 4), np.float16), "scalar": np.array(-3, np.int64),
                    "large": random_array(np.float32, (512, 600))})
    path = tmp_path / "blocks.safetensors"
    safetensors.numpy.save_file(tensors, path)
    with safe_open(path, "np") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
        rows = {k: f.get_slice(k)[1:3] for k in [k for k in got if k.startswith("s0")][-50:]}
    for k, a in got.items():
        same(a, tensors[k])
        assert a.flags.writeable, k
        assert a.ctypes.data % 64 == 0 or a.nbytes == 0, k
    for k, a in rows.items():
        same(a, tensors[k][1:3])
    # Writing one array changes no other one, and not the file.
    def bytes_of(a):
        return set(a.reshape(-1).view(np.uint8).tolist())

    mark = {k: 1 + i % 250 for i, k in enumerate(got)}
    for k, a in got.items():
        a.reshape(-1).view(np.uint8)[...] = mark[k]
    for k, a in got.items():
        assert a.nbytes == 0 or bytes_of(a) == {mark[k]}, k
    for k, a in rows.items():
        same(a, tensors[k][1:3])
    # Every other array freed, fresh memory taken and written: the rest keep their bytes.
    keys = list(got)
    for k in keys[::2]:
        del got[k]
    rows.clear()
    gc.collect()
    churn = [np.full(4096, 0x5A, np.uint8) for _ in range(2000)]
    assert all(a.nbytes == 0 or bytes_of(a) == {mark[k]} for k, a in got.items())
    del churn
    with safetensors.safe_open(str(path), "np") as ref:
        same(ref.get_tensor("s0001"), tensors["s0001"])


def test_saves_write_what_safetensors_writes(tmp_path):
    tensors = {"big": random_array(np.float32, (300, 300)), "small": random_array(np.int16, (3, 4)),
               "fortran": np.asfortranarray(random_array(np.float64, (70, 130))),
               "strided": random_array(np.uint8, (400, 400))[::2, ::3],
               "empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, np.float64),
               "bf": random_array(np.uint16, (300, 200)).view(ml_dtypes.bfloat16)}
    # safetensors writes an array's memory order (strided and Fortran arrays read back wrong):
    # its file of C-ordered copies is the reference.
    want = safetensors.numpy.save({k: v if v.flags.c_contiguous else np.ascontiguousarray(v)
                                   for k, v in tensors.items()})
    assert tensorplace.numpy.save(tensors) == want
    out = tmp_path / "s.safetensors"
    tensorplace.numpy.save_file(tensors, out)
    assert out.read_bytes() == want


def write(path, data):
    path.write_bytes(data)
    return path


def test_malformed_files_raise_the_error_of_their_rule(tmp_path, malformed_files):
    ok = safetensors.numpy.save({"w": np.zeros(3, np.float32)})
    cases = malformed_files(ok)
    for kind, data in cases.items():
        path = write(tmp_path / f"{kind}.safetensors", data)
        for load in [lambda: tensorplace.numpy.load_file(path), lambda: tensorplace.numpy.load(data),
                     lambda: tensorplace.flax.load_file(path)]:
            with pytest.raises(TensorplaceError) as e:
                load()
            assert e.value.kind == kind, (kind, e.value)
            assert isinstance(e.value, safetensors.SafetensorError)
        with pytest.raises(safetensors.SafetensorError):
            safetensors.numpy.load(data)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file(tmp_path / "absent.safetensors")
    assert e.value.kind == "Io" and "absent.safetensors" in str(e.value)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.flax.load_file(write(tmp_path / "ok.safetensors", ok), "tpu:0")
    assert e.value.kind == "InvalidDevice"


def test_an_absent_gpu_is_an_error_not_a_fallback(tmp_path):
    path = write(tmp_path / "m.safetensors", safetensors.numpy.save({"w": np.ones(3, np.float32)}))
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present here")
    for device in ["cuda:0", "gpu", "cuda"]:
        with pytest.raises(TensorplaceError) as e:
            tensorplace.flax.load_file(path, device)
        assert e.value.kind == "DeviceUnavailable", e.value


def test_arrays_outlive_their_file_and_handle(tmp_path):
    tensors = numpy_tensors()
    path = tmp_path / "m.safetensors"
    tensorplace.numpy.save_file(tensors, path)
    loaded = tensorplace.numpy.load_file(path)
    with safe_open(path, "np") as f:
        one = f.get_tensor(next(iter(tensors)))
    jax_loaded = tensorplace.flax.load_file(path)
    os.remove(path)
    del f
    gc.collect()
    for name, array in tensors.items():
        same(loaded[name], array)
    same(one, tensors[next(iter(tensors))])
    for name, array in tensors.items():
        if array.dtype.itemsize < 8 and array.dtype != np.complex64:
            same(jax_loaded[name], array)
    # Views of one owned arena: no array owns its data, none is a copy.
    assert not any(a.flags.owndata for a in loaded.values())


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_freed_with_the_arrays(tmp_path):
    path = tmp_path / "big.safetensors"
    safetensors.numpy.save_file({f"w{i}": np.full(8 << 20, i, np.float32) for i in range(8)}, path)  # 256 MiB
    loaded = tensorplace.numpy.load_file(path)
    del loaded
    gc.collect()
    tensorplace.trim_host_memory()
    start = rss()
    for _ in range(6):
        arrays = tensorplace.numpy.load_file(path)
        assert float(arrays["w3"][12345]) == 3.0
        peak = rss()
        del arrays
        gc.collect()
    assert peak >= start + (200 << 20), "the arrays were resident"
    # The last arena is kept for the next load (each load after the first took it), until
    # trimmed.
    assert rss() >= start + (200 << 20), "the arena is kept for the next load"
    assert tensorplace.trim_host_memory() >= 256 << 20
    assert rss() <= start + (64 << 20), f"{start >> 20} MiB before, {rss() >> 20} MiB after"
    for _ in range(3):
        arrays = tensorplace.flax.load_file(path)
        assert float(arrays["w5"][7]) == 5.0
        del arrays
        gc.collect()
    tensorplace.trim_host_memory()
    assert rss() <= start + (64 << 20), f"{start >> 20} MiB before, {rss() >> 20} MiB after (jax)"


KEEP_NOTHING = r"""
import gc, sys, tensorplace, tensorplace.numpy
for _ in range(2):
    arrays = tensorplace.numpy.load_file(sys.argv[1])
    del arrays
    gc.collect()
print(tensorplace.trim_host_memory())
"""


def test_host_cache_can_be_turned_off(tmp_path):
    path = tmp_path / "big.safetensors"
    safetensors.numpy.save_file({f"w{i}": np.full(1 << 20, i, np.float32) for i in range(8)}, path)  # 32 MiB
    for env, kept in (("0", False), (str(1 << 30), True), (str(16 << 20), False)):
        out = subprocess.run([sys.executable, "-c", KEEP_NOTHING, str(path)], capture_output=True, text=True,
                             env={**os.environ, "TENSORPLACE_HOST_CACHE": env}, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert (int(out.stdout) >= 32 << 20) == kept, (env, out.stdout)


def test_ctrl_c_during_a_long_load_raises_keyboard_interrupt_promptly(tmp_path):
    """A child process loads a 1 GiB file dropped from the page cache with direct reads; a
    SIGINT shortly after the load starts raises KeyboardInterrupt long before the load
    could have finished."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "big.safetensors"
    safetensors.numpy.save_file({f"w{i}": np.full(32 << 20, i, np.float32) for i in range(8)}, path)
    child = r"""
import os, sys, time
import tensorplace.numpy
fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
print("start", flush=True)
t = time.perf_counter()
try:
    tensorplace.numpy.load_file(sys.argv[1], backend="direct")
    print("finished", time.perf_counter() - t, flush=True)
except KeyboardInterrupt:
    print("interrupted", time.perf_counter() - t, flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", child, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "start"
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    if out.startswith("finished"):
        pytest.skip(f"the load finished before the signal arrived ({out.strip()})")
    assert out.startswith("interrupted"), out
    # A full cold read of 1 GiB takes far longer than this on any disk here.
    assert float(out.split()[1]) < 1.0, out


def test_missing_files_raise_what_safetensors_raises(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError):
        safetensors.numpy.load_file(missing)
    for call in (lambda: tensorplace.numpy.load_file(missing),
                 lambda: safe_open(missing, framework="np").__enter__()):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert isinstance(e.value, TensorplaceError) and e.value.kind == "Io"
        assert e.value.file == str(missing) and "absent.safetensors" in str(e.value)
    # A malformed file is not a missing one.
    bad = write(tmp_path / "bad.safetensors", b"\x01\x00")
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file(bad)
    assert not isinstance(e.value, OSError)


FORKED_LOAD = """
import os, sys, numpy as np
import tensorplace.numpy as tpn
path, backend = sys.argv[1], sys.argv[2]
first = tpn.load_file(path, backend=backend)    # starts the reader threads (and a disk queue)
pid = os.fork()
if pid == 0:
    again = tpn.load_file(path, backend=backend)
    os._exit(0 if all(np.array_equal(first[k], again[k]) for k in first) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
@pytest.mark.parametrize("backend", ["mmap", "direct"])
def test_a_forked_process_loads_with_threads_of_its_own(tmp_path, backend):
    # A child forked after a load has none of its parent's threads: it must not wait for them.
    path = tmp_path / "m.safetensors"
    tensorplace.numpy.save_file({f"t{i}": np.full(1 << 20, i, np.float32) for i in range(12)}, path)
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", FORKED_LOAD, str(path), backend], timeout=120)
    assert done.returncode == 0


def test_flax_float8_arrives_as_its_jax_type(tmp_path):
    # Handed to JAX as bytes and reinterpreted (older jaxlib releases refuse DLPack's float8
    # codes): the JAX type, the bytes the file holds.
    tensors = {name: random_array(np.uint8, (5, 3)).view(t)
               for name, t in [("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)]}
    path = tmp_path / "f8.safetensors"
    safetensors.numpy.save_file(tensors, path)
    for loaded in (tensorplace.flax.load_file(path), tensorplace.flax.load(path.read_bytes())):
        for name, want in tensors.items():
            got = loaded[name]
            assert got.dtype == jnp.dtype(want.dtype) and got.shape == want.shape, name
            assert np.asarray(got).tobytes() == want.tobytes(), name


def test_flax_narrows_64_bit_types_as_jax_does(tmp_path):
    # Without jax_enable_x64 JAX holds I64, U64 and F64 as 32-bit types: the load narrows
    # them itself (on the device), to the values JAX's own conversion gives.
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(64)
    tensors = {
        "i64": rng.integers(-(1 << 62), 1 << 62, size=1000, dtype=np.int64),
        "u64": rng.integers(0, 1 << 63, size=1000, dtype=np.uint64),
        "f64": np.concatenate([rng.standard_normal(997) * 1e30, [np.inf, -0.0, 1e-310]]),
        "f32": rng.standard_normal(5).astype(np.float32),
    }
    path = tmp_path / "wide.safetensors"
    safetensors.numpy.save_file(tensors, path)
    for loaded in (tensorplace.flax.load_file(path), tensorplace.flax.load(path.read_bytes())):
        for name, want in tensors.items():
            got = loaded[name]
            theirs = jnp.asarray(want)  # JAX's own conversion
            assert got.dtype == theirs.dtype, (name, got.dtype, theirs.dtype)
            assert np.asarray(got).tobytes() == np.asarray(theirs).tobytes(), name
