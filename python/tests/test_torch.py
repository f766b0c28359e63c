"""tensorplace.torch against safetensors.torch, on every dtype torch has and every shape (0-d
and empty included): loads, byte-identical saves, files written by each loaded by the other,
``safe_open(framework="pt")`` with slices and metadata, devices as strings and
``torch.device``s, tensors that outlive their load, and malformed files.

``tests/all.sh`` installs torch and sets ``TENSORPLACE_TEST_TORCH=required``: there a missing
torch fails the suite instead of skipping it."""

import gc
import json
import os

import numpy as np
import pytest

try:
    import torch
except ImportError:
    if os.environ.get("TENSORPLACE_TEST_TORCH") == "required":
        raise
    pytest.skip("torch is not installed", allow_module_level=True)

import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402

import tensorplace.torch  # noqa: E402
from tensorplace import TensorplaceError, safe_open  # noqa: E402

# Every dtype safetensors.torch maps, those of newer torch releases where this one has them.
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]
DTYPES += [getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
                                       "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
                                       "float4_e2m1fn_x2") if hasattr(torch, n)]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4)]
F4 = getattr(torch, "float4_e2m1fn_x2", None)


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, row-major."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype, shape, g) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    n = int(np.prod(shape))
    data = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (data & 1).to(torch.bool).reshape(shape)
    return data.view(dtype).reshape(shape)


def tensors():
    g = torch.Generator().manual_seed(3)
    out = {}
    for dtype in DTYPES:
        for shape in SHAPES:
            if dtype == F4 and not shape:
                continue  # a 0-d float4_e2m1fn_x2 would be a file's F4 of one byte and no shape
            out[f"{str(dtype).split('.')[-1]}_{'x'.join(map(str, shape)) or 'scalar'}"] = random_tensor(dtype, shape, g)
    return out


def same(got: torch.Tensor, want: torch.Tensor, name: str):
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (name, got.shape, want.shape)
    assert raw(got) == raw(want), name


def test_saves_are_byte_identical(tmp_path):
    t = tensors()
    assert tensorplace.torch.save(t) == safetensors.torch.save(t)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    tensorplace.torch.save_file(t, ours)
    safetensors.torch.save_file(t, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    # With metadata: safetensors writes its keys in a hash map's order (it varies from run to
    # run), so the headers are compared parsed, and everything else byte for byte.
    meta = {"format": "pt", "note": "x", "a": "1"}
    for mine, reference in [(tensorplace.torch.save(t, meta), safetensors.torch.save(t, meta))]:
        assert len(mine) == len(reference)
        n = int.from_bytes(mine[:8], "little")
        assert mine[:8] == reference[:8] and mine[8 + n:] == reference[8 + n:]
        assert json.loads(mine[8:8 + n]) == json.loads(reference[8:8 + n])


def test_loads_match_safetensors_torch(tmp_path):
    t = tensors()
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(t, path)
    theirs = safetensors.torch.load_file(path)
    data = path.read_bytes()
    for device in ("cpu", torch.device("cpu")):
        ours = tensorplace.torch.load_file(path, device=device)
        assert list(ours) == list(theirs)
        for name, want in theirs.items():
            same(ours[name], want, name)
            assert ours[name].device.type == "cpu"
    # `load` of bytes: every dtype (safetensors.torch.load has no F8_E8M0 or F4).
    from_bytes = tensorplace.torch.load(data)
    for name, want in theirs.items():
        same(from_bytes[name], want, name)
    # Their load of our file.
    mine = tmp_path / "mine.safetensors"
    tensorplace.torch.save_file(t, mine)
    for name, got in safetensors.torch.load_file(mine).items():
        same(got, t[name], name)


def test_safe_open_pt_reads_slices_and_metadata(tmp_path):
    t = tensors()
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(t, path, {"format": "pt"})
    with safe_open(path, framework="pt") as ours, safetensors.safe_open(str(path), framework="pt") as theirs:
        assert ours.keys() == theirs.keys()
        assert ours.metadata() == theirs.metadata()
        for name in theirs.keys():
            want = theirs.get_tensor(name)
            same(ours.get_tensor(name), want, name)
            if want.dim() == 0 or want.dtype == F4:
                continue  # safetensors' own get_slice refuses F4
            sl = ours.get_slice(name)
            assert sl.get_shape() == theirs.get_slice(name).get_shape()
            stop = max(want.shape[0] - 1, 0)
            same(sl[0:stop], theirs.get_slice(name)[0:stop], name)
            same(sl[..., :1], theirs.get_slice(name)[..., :1], name)
        if F4 is not None:
            # Rows of an F4 tensor, as safetensors.torch gives the whole one.
            name = "float4_e2m1fn_x2_2x3x4"
            same(ours.get_slice(name)[1:2], theirs.get_tensor(name)[1:2], name)


def test_devices(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.arange(6.0)}, path)
    if torch.cuda.is_available():
        on_gpu = tensorplace.torch.load_file(path, device=torch.device("cuda", 0))
        assert on_gpu["w"].device == torch.device("cuda", 0)
        assert torch.equal(on_gpu["w"].cpu(), torch.arange(6.0))
        return
    for device in ("cuda:0", "cuda", 0, torch.device("cuda:1")):
        with pytest.raises(TensorplaceError) as e:
            tensorplace.torch.load_file(path, device=device)
        assert e.value.kind == "DeviceUnavailable", (device, e.value)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.torch.load_file(path, device=torch.device("meta"))
    assert e.value.kind == "InvalidDevice"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_tensor_outlives_its_load_and_the_arena_goes_with_the_last(tmp_path):
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({f"w{i}": torch.full((8 << 20,), float(i)) for i in range(8)}, path)  # 256 MiB
    gc.collect()
    tensorplace.trim_host_memory()
    start = rss()
    loaded = tensorplace.torch.load_file(path)
    kept = loaded["w3"][:4]
    del loaded
    gc.collect()
    # The arena stays while one tensor of it lives; the file may even go.
    os.remove(path)
    assert torch.equal(kept, torch.full((4,), 3.0))
    assert rss() >= start + (200 << 20), "the arena was freed under a live tensor"
    assert tensorplace.trim_host_memory() == 0, "nothing is kept while a tensor lives"
    del kept
    gc.collect()
    # Kept for the next load, until trimmed.
    assert tensorplace.trim_host_memory() >= 256 << 20
    assert rss() <= start + (64 << 20), f"{start >> 20} MiB before, {rss() >> 20} MiB after"


def test_malformed_files_are_errors(tmp_path, malformed_files):
    cases = malformed_files(safetensors.torch.save({"w": torch.zeros(3)}))
    for kind, data in cases.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(data)
        for load in (lambda: tensorplace.torch.load_file(path), lambda: tensorplace.torch.load(data),
                     lambda: safe_open(path, framework="pt").__enter__()):
            with pytest.raises(TensorplaceError) as e:
                load()
            assert e.value.kind == kind, (kind, e.value)
            assert isinstance(e.value, safetensors.SafetensorError)
