"""tensorplace.torch against safetensors.torch (skipped where torch is not installed)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402

import tensorplace.torch  # noqa: E402
from tensorplace import TensorplaceError  # noqa: E402


def tensors():
    g = torch.Generator().manual_seed(3)
    out = {
        "f32": torch.randn(4, 5, generator=g),
        "bf16": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "i64": torch.arange(5),
        "b": torch.tensor([True, False, True]),
        "u8": torch.arange(9, dtype=torch.uint8),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8"] = torch.randn(6, generator=g).to(torch.float8_e4m3fn)
    return out


def test_torch_matches_safetensors_torch(tmp_path):
    t = tensors()
    assert tensorplace.torch.save(t) == safetensors.torch.save(t)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(t, path)
    theirs = safetensors.torch.load_file(path)
    ours = tensorplace.torch.load_file(path, device="cpu")
    for name in t:
        assert ours[name].dtype == theirs[name].dtype
        assert torch.equal(ours[name].view(torch.uint8) if ours[name].element_size() == 1 else ours[name],
                           theirs[name].view(torch.uint8) if theirs[name].element_size() == 1 else theirs[name])
    if torch.cuda.is_available():
        on_gpu = tensorplace.torch.load_file(path, device="cuda:0")
        for name in t:
            assert on_gpu[name].device.type == "cuda"
            assert torch.equal(on_gpu[name].cpu().view(torch.uint8), theirs[name].contiguous().view(torch.uint8))
    else:
        with pytest.raises(TensorplaceError) as e:
            tensorplace.torch.load_file(path, device="cuda:0")
        assert e.value.kind == "DeviceUnavailable"


def test_safe_open_pt_reads_what_safetensors_reads(tmp_path):
    from tensorplace import safe_open

    g = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]
    dtypes += [getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
               if hasattr(torch, n)]
    shapes = [(), (0,), (3,), (2, 5), (4, 0, 2), (3, 7, 11)]
    t = {}
    for i, dtype in enumerate(dtypes):
        for j, shape in enumerate(shapes):
            raw = torch.randint(0, 256, (int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(),),
                                dtype=torch.uint8, generator=g)
            t[f"t{i:02}_{j}"] = (raw != 0) .reshape(shape) if dtype == torch.bool else raw.view(dtype).reshape(shape)
    t["large"] = torch.randn(400, 700, generator=g)
    path = tmp_path / "pt.safetensors"
    safetensors.torch.save_file(t, path)

    def raw(x):
        return x.contiguous().reshape(-1).view(torch.uint8) if x.dtype != torch.bool else x.reshape(-1).to(torch.uint8)

    with safe_open(path, "pt") as ours, safetensors.safe_open(str(path), "pt") as ref:
        assert ours.keys() == sorted(ref.keys())
        got = {k: ours.get_tensor(k) for k in ours.keys()}
        for k, a in got.items():
            b = ref.get_tensor(k)
            assert (a.dtype, a.shape, a.device.type) == (b.dtype, b.shape, "cpu"), k
            assert torch.equal(raw(a), raw(b)), k
            if a.dim() and a.shape[0] > 1:
                assert torch.equal(raw(ours.get_slice(k)[1:2]), raw(ref.get_slice(k)[1:2])), k
    # Each tensor is its own: writing one changes no other.
    for i, (k, a) in enumerate(got.items()):
        if a.numel() and a.dtype != torch.bool:
            a.reshape(-1).view(torch.uint8).fill_(1 + i % 250)
    for i, (k, a) in enumerate(got.items()):
        if a.numel() and a.dtype != torch.bool:
            assert set(a.reshape(-1).view(torch.uint8).tolist()) == {1 + i % 250}, k
