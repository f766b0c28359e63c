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
