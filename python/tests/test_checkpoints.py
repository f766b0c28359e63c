"""Sharded checkpoints and slices from Python: the fixture written the way ``transformers``
writes one (tests/fixtures/make_checkpoint.py), slices compared with the real
``safetensors.safe_open(...).get_slice(...)`` on the same shards, and whole loads of the
folder compared with ``safetensors.numpy.load_file`` of each shard."""

import json
import pathlib

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open as reference_open

import tensorplace.flax
import tensorplace.numpy
from tensorplace import TensorplaceError, safe_open

SHARDED = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "sharded"
INDEX = json.loads((SHARDED / "model.safetensors.index.json").read_text())["weight_map"]

INDICES = [
    np.s_[0:3], np.s_[1], np.s_[-1], np.s_[:, 2:5], np.s_[..., 1], np.s_[2:2],
    np.s_[1, ..., 0:2], np.s_[:, :], np.s_[0:1, 0], np.s_[3:],
]


def as_bits(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


def reference_slice(name, index):
    with reference_open(str(SHARDED / INDEX[name]), "np") as f:
        return f.get_slice(name)[index]


# safetensors.numpy has no F8 type: the F8 tensor is left to the Rust tests.
NAMES = sorted(n for n in INDEX if not n.endswith((".scalar", ".empty", ".f8")))


@pytest.mark.parametrize("name", NAMES)
def test_slices_equal_safetensors_get_slice(name):
    with safe_open(SHARDED, "np") as ours:
        shape = ours.get_slice(name).get_shape()
        for index in INDICES:
            wanted = index if isinstance(index, tuple) else (index,)
            given = sum(1 for i in wanted if i is not Ellipsis)
            if given > len(shape) or (len(shape) > 0 and shape[0] == 0):
                continue
            try:
                want = reference_slice(name, index)
            except Exception:  # the reference refuses it: so must we
                with pytest.raises(Exception):
                    ours.get_slice(name)[index]
                continue
            got = ours.get_slice(name)[index]
            assert got.shape == want.shape, (name, index)
            np.testing.assert_array_equal(as_bits(got), as_bits(want), err_msg=f"{name} {index}")


def test_out_of_range_slices_raise_like_the_reference():
    name = "model.layers.2.extra.cube"
    with safe_open(SHARDED, "np") as ours:
        for index in [np.s_[4], np.s_[0:5], np.s_[:, :, :, :]]:
            with pytest.raises(Exception):
                reference_slice(name, index)
            with pytest.raises(TensorplaceError) as e:
                ours.get_slice(name)[index]
            assert e.value.kind == "InvalidSlice"


def test_folders_and_indexes_load_like_their_shards():
    want = {}
    for shard in sorted(set(INDEX.values())):
        with reference_open(str(SHARDED / shard), "np") as f:
            for name in f.keys():
                if not name.endswith(".f8"):
                    want[name] = f.get_tensor(name)
    for path in [SHARDED, SHARDED / "model.safetensors.index.json"]:
        got = tensorplace.numpy.load_file(path)
        assert sorted(got) == sorted(INDEX)
        for name, array in want.items():
            np.testing.assert_array_equal(as_bits(got[name]), as_bits(array), err_msg=name)
    with safe_open(SHARDED, "flax") as f:
        assert sorted(f.keys()) == sorted(INDEX)
        assert f.metadata() == {"format": "pt"}
        name = "model.layers.0.self_attn.o_proj.weight"  # F32: jax's default width
        part = f.get_slice(name)[1:3, 40:]
        np.testing.assert_array_equal(np.asarray(part), reference_slice(name, np.s_[1:3, 40:]))
    assert len(tensorplace.flax.load_file(SHARDED)) == len(INDEX)
