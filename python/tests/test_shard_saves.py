"""Sharded saves (``save_checkpoint``): the same files and the same index as
``huggingface_hub`` gives for the same tensors (its split function, and its own writer
``save_torch_state_dict``), shards that ``safetensors`` reads back, and a failure that
leaves the folder as it was."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy

import tensorplace.numpy
from tensorplace import TensorplaceError

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import split_state_dict_into_shards_factory  # noqa: E402


def tensors(seed=27):
    """Tensors of many sizes in a deliberate order: some over the 1 MB limit used below."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, n in enumerate([100_000, 50_000, 300_000, 10, 2_000_000, 120_000, 70_000, 0, 400_000, 5]):
        dtype = [np.float32, np.float16, np.int64, np.uint8][k % 4]
        out[f"layer.{k}.weight"] = (rng.standard_normal(n) * 100).astype(dtype)
    out["scalar"] = np.array(1.5, dtype=np.float32)
    return out


def listing(path):
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


@pytest.mark.parametrize("max_shard_size", ["1MB", "600KB", 2_500_000, "5GB"])
def test_split_and_index_equal_huggingface_hubs(tmp_path, max_shard_size):
    sd = tensors()
    paths = tensorplace.numpy.save_checkpoint(sd, tmp_path, max_shard_size=max_shard_size)
    split = split_state_dict_into_shards_factory(
        sd, get_storage_size=lambda t: t.nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        files.append("model.safetensors.index.json")
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index == {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    assert [os.path.basename(p) for p in paths] == files
    assert listing(tmp_path) == sorted(files)
    for file, names in split.filename_to_tensors.items():
        theirs = safetensors.numpy.load_file(str(tmp_path / file))
        assert sorted(theirs) == sorted(names), file
        for name in names:
            np.testing.assert_array_equal(theirs[name], sd[name])
    back = tensorplace.numpy.load_file(tmp_path)
    assert sorted(back) == sorted(sd)


def test_the_same_files_as_save_torch_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    import tensorplace.torch

    sd = {k: torch.from_numpy(v.copy()) for k, v in tensors(3).items()}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    tensorplace.torch.save_checkpoint(sd, ours, max_shard_size="700KB")
    theirs.mkdir()
    hub.save_torch_state_dict(sd, theirs, max_shard_size="700KB")
    assert listing(ours) == listing(theirs)
    assert json.loads((ours / "model.safetensors.index.json").read_text()) == json.loads(
        (theirs / "model.safetensors.index.json").read_text())
    for file in listing(theirs):
        if file.endswith(".safetensors"):
            a, b = safetensors.numpy.load_file(str(ours / file)), safetensors.numpy.load_file(str(theirs / file))
            assert sorted(a) == sorted(b)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path):
    sd = tensors()
    tensorplace.numpy.save_checkpoint(sd, tmp_path, max_shard_size="1MB", metadata={"format": "np"})
    before = {f: (tmp_path / f).read_bytes() for f in listing(tmp_path)}
    # The last tensor cannot be written (its name is the header's metadata key): every
    # shard before it was written to a temporary, none was put in place.
    bad = dict(sd)
    bad["__metadata__"] = np.zeros(3, dtype=np.uint8)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.save_checkpoint(bad, tmp_path, max_shard_size="600KB")
    assert e.value.kind == "InvalidTensor" and e.value.tensor == "__metadata__"
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporaries either
    assert {f: (tmp_path / f).read_bytes() for f in listing(tmp_path)} == before
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["format"] == "np"
    with pytest.raises(ValueError):
        tensorplace.numpy.save_checkpoint(sd, tmp_path, max_shard_size="5 parsecs")
