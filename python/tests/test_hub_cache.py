"""Repository ids of the Hugging Face cache (``org/name``, ``org/name@revision``) as
filenames: a cache laid out as ``huggingface_hub`` lays it out (blobs, snapshots of links,
refs; checked by its own ``scan_cache_dir`` and ``try_to_load_from_cache``), with a sharded
revision, a single-file tag, a commit by hash and a revision missing a shard."""

import hashlib
import json
import os

import numpy as np
import pytest
import safetensors.numpy

import tensorplace.numpy
from tensorplace import TensorplaceError, safe_open

hub = pytest.importorskip("huggingface_hub")

REPO = "acme/tiny-model"
MAIN, V1, BROKEN = "a" * 40, "b" * 40, "c" * 40


def tensors(seed):
    rng = np.random.default_rng(seed)
    return {f"layer.{k}.w": rng.standard_normal((8, 4 + k)).astype(np.float32) for k in range(4)}


def make_cache(root):
    """The cache folder, with the main revision (two shards and an index), the tag v1 (one
    file) and the ref 'broken' (an index whose second shard was never downloaded)."""
    folder = root / ("models--" + REPO.replace("/", "--"))

    def add(commit, name, data):
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)

    main = tensors(1)
    shards = {"model-00001-of-00002.safetensors": ["layer.0.w", "layer.1.w"],
              "model-00002-of-00002.safetensors": ["layer.2.w", "layer.3.w"]}
    index = {"metadata": {"total_size": sum(v.nbytes for v in main.values())},
             "weight_map": {n: f for f, names in shards.items() for n in names}}
    for commit in (MAIN, BROKEN):
        add(commit, "model.safetensors.index.json", json.dumps(index).encode())
        add(commit, "config.json", b"{}")
    for file, names in shards.items():
        data = safetensors.numpy.save({n: main[n] for n in names})
        add(MAIN, file, data)
        if file.startswith("model-00001"):
            add(BROKEN, file, data)
    v1 = tensors(2)
    add(V1, "model.safetensors", safetensors.numpy.save(v1))
    for ref, commit in [("main", MAIN), ("v1", V1), ("broken", BROKEN)]:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return main, v1


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    main, v1 = make_cache(root)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root, main, v1


def test_the_layout_is_huggingface_hubs(cache):
    root, _, _ = cache
    info = hub.scan_cache_dir(root)
    (repo,) = info.repos
    assert repo.repo_id == REPO and len(repo.revisions) == 3
    refs = {r for rev in repo.revisions for r in rev.refs}
    assert refs == {"main", "v1", "broken"}
    found = hub.try_to_load_from_cache(REPO, "model.safetensors", cache_dir=root, revision="v1")
    assert found and os.path.samefile(found, root / f"models--acme--tiny-model/snapshots/{V1}/model.safetensors")


def test_repository_ids_load_from_the_cache(cache):
    _, main, v1 = cache
    for name, want in [(REPO, main), (f"{REPO}@main", main), (f"{REPO}@v1", v1), (f"{REPO}@{V1}", v1)]:
        got = tensorplace.numpy.load_file(name)
        assert sorted(got) == sorted(want), name
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=name)
    with safe_open(REPO, "np") as f:
        np.testing.assert_array_equal(f.get_tensor("layer.3.w"), main["layer.3.w"])
    # A path on disk is always a path: the cache is not consulted.
    assert sorted(tensorplace.numpy.load_file(str(cache[0] / f"models--acme--tiny-model/snapshots/{V1}"))) == sorted(v1)


def test_missing_shards_revisions_and_repositories_are_errors(cache):
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file(f"{REPO}@broken")
    assert e.value.kind == "InvalidIndex", e.value
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file(f"{REPO}@v9")
    assert e.value.kind == "Io" and "refs held: broken, main, v1" in str(e.value)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file("acme/absent")
    assert e.value.kind == "Io" and "Hugging Face cache" in str(e.value)
