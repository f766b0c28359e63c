"""Objects in S3 as sources (``s3://bucket/key``): an S3 server on 127.0.0.1 started by the
test (moto's), credentials and endpoint passed explicitly through the environment that the
stores read (``AWS_*``), loads equal to ``safetensors``' of the same bytes, and the errors
of a missing object, a missing bucket and wrong credentials."""

import socket

import numpy as np
import pytest
import safetensors.numpy

import tensorplace.numpy
from tensorplace import TensorplaceError, safe_open

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket="models")
    yield endpoint, client
    server.stop()


@pytest.fixture
def env(s3, monkeypatch):
    endpoint, client = s3
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(key, value)
    return client


def tensors():
    rng = np.random.default_rng(7)
    out = {f"w{k}": rng.standard_normal((256, 64 + k)).astype(np.float32) for k in range(6)}
    out["ids"] = rng.integers(0, 1000, 3_000_000, dtype=np.int64)  # 24 MB: many ranged reads
    out["scalar"] = np.array(2.5, dtype=np.float16)
    return out


def test_s3_objects_load_as_files_do(env, tmp_path):
    want = tensors()
    data = safetensors.numpy.save(want, metadata={"source": "s3"})
    env.put_object(Bucket="models", Key="tiny/model.safetensors", Body=data)
    url = "s3://models/tiny/model.safetensors"
    got = tensorplace.numpy.load_file(url)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)
    with safe_open(url, "np") as f:
        assert f.metadata() == {"source": "s3"}
        np.testing.assert_array_equal(f.get_slice("w3")[10:20], want["w3"][10:20])
        np.testing.assert_array_equal(f.get_tensor("ids"), want["ids"])


def test_missing_objects_buckets_and_credentials_are_errors(env, monkeypatch):
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file("s3://models/absent.safetensors")
    assert e.value.kind == "Io" and "absent.safetensors" in str(e.value)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file("s3://no-such-bucket/x.safetensors")
    assert e.value.kind == "Io"
    # A malformed object is the format's error, naming the URL.
    env.put_object(Bucket="models", Key="bad.safetensors", Body=b"\xff" * 64)
    with pytest.raises(TensorplaceError) as e:
        tensorplace.numpy.load_file("s3://models/bad.safetensors")
    assert e.value.kind == "HeaderTooLarge" and "s3://models/bad.safetensors" in str(e.value)


def test_headers_and_torch_loads_of_objects(env):
    torch = pytest.importorskip("torch")
    import tensorplace.torch
    from tensorplace import _tensorplace as native

    want = tensors()
    env.put_object(Bucket="models", Key="t/model.safetensors", Body=safetensors.numpy.save(want))
    url = "s3://models/t/model.safetensors"
    entries, _ = native.inspect(url)
    assert {name: (dtype, tuple(shape)) for name, dtype, shape, _ in entries} == {
        k: ({"float32": "F32", "float16": "F16", "int64": "I64"}[str(v.dtype)], v.shape) for k, v in want.items()}
    got = tensorplace.torch.load_file(url)
    for name, value in want.items():
        assert torch.equal(got[name], torch.from_numpy(value)), name
