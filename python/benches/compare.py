"""One run comparing tensorplace's Python loaders with safetensors' own, on one file:

- numpy:  tensorplace.numpy.load_file(f)           vs safetensors.numpy.load_file(f)
- flax:   tensorplace.flax.load_file(f, device)    vs safetensors.flax.load_file(f) + jax.device_put
- flax (``--flax``): per dtype, and a checkpoint sharded over 8 CPU devices against
          safetensors.flax + device_put(sharding) and orbax-checkpoint's SAFETENSORS layout
- torch on the CPU, owned tensors: tensorplace.torch.load_file(f) and iter_tensors(f) (each
          tensor taken and dropped) vs runai-model-streamer's SafetensorsStreamer (owned),
          fastsafetensors (nogds, CPU, each tensor cloned out of its buffer) and
          safetensors.torch.load_file(f) + clone() of each tensor (a mapping's views made owned)
- torch:  tensorplace.torch.load_file(f, "cuda:0") vs safetensors.torch.load_file(f, device="cuda:0")
          (where a GPU is present)
- s3 (``--remote``): tensorplace.numpy.load_file("s3://...") from moto's S3 server on 127.0.0.1
          vs the same file read locally, runai-model-streamer's S3 path (with
          runai-model-streamer-s3) and boto3 get_object + safetensors.numpy.load

    python python/benches/compare.py [--size-gib 1] [--runs 5] [--file PATH]
    python python/benches/compare.py --lazy [--runs 3]    # safe_open loops, get_slice rows
    python python/benches/compare.py --saves [--runs 5]   # save_file / save
    python python/benches/compare.py --cold               # each run from the disk, not the page cache
    python python/benches/compare.py --flax [--size-gib 1] # flax per dtype, and sharded over 8 CPU devices
    python python/benches/compare.py --remote [--size-gib 1] # an object in a local S3 server (moto)

``--lazy``: ``with safe_open(f, "np") as h: for k in keys: h.get_tensor(k)`` (ours against
safetensors', in file order, reverse and random) on files of 2,000 x 400 KB, 20,000 x 4 KB and
50 x 16 MB f32 tensors, and one row of each of 1,000 tensors through ``get_slice``, the page
cache warm. ``--saves``: ``tensorplace.numpy.save_file`` against ``safetensors.numpy.save_file``
followed by an ``fsync`` (ours fsyncs before its rename), and ``save`` against ``save``, for 200
x 4 MB and 20,000 x 4 KB f32 tensors.

Each row is the median of the runs after a warm-up, the paths of a group alternating, every
result made ready (block_until_ready, cuda.synchronize) and freed before the next run, and
as much fresh memory as the row's data touched and freed before each run (as the Rust
harness does: on a VM, memory left free goes back to the host and costs more to touch).
Throughput is the file's data bytes over seconds, in GB/s (10^9 bytes).
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def write_file(path, size):
    rng = np.random.default_rng(0)
    tensors, total, i = {}, 0, 0
    dtypes = [np.float32, np.float16, np.int64, np.uint8]
    while total < size:
        n = int(size // 300 * (1 + (i * 7919) % 30) / 15.5) or 1
        dtype = dtypes[i % len(dtypes)]
        a = rng.integers(0, 255, size=n, dtype=np.uint8)
        a = a[: n // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize].view(dtype)
        tensors[f"layer{i:04}.weight"] = a
        total += a.nbytes
        i += 1
    import safetensors.numpy

    safetensors.numpy.save_file(tensors, path)
    return total


def prime_memory(nbytes):
    """Touches and frees ``nbytes`` of fresh memory (as the Rust harness's ``prime_memory``):
    a VM hands memory left free to its host, and the next first touch then costs the host's
    allocation too, so that without this a run's speed depends on how long ago the previous
    run freed its memory. Every path of a group gets the same."""
    if nbytes:
        np.ones(int(nbytes), np.uint8)


#: Files dropped from the page cache before each run (``--cold``).
COLD = []


def drop_cache(path):
    """Drops ``path`` from the page cache (``posix_fadvise(DONTNEED)`` after an fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rchar():
    """Bytes this process has read through read-like system calls (``/proc/self/io``'s
    ``rchar``, every thread's): what a loader read with ``pread``/``read``, its own or a
    library's. Pages of a mapping faulted in are not counted (an mmap reader shows ~0)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return 0


def timed(fn, ready, nbytes=0):
    """Seconds of one run, and the bytes read meanwhile (see ``rchar``)."""
    gc.collect()
    for path in COLD:
        drop_cache(path)
    prime_memory(nbytes)
    before = rchar()
    t = time.perf_counter()
    out = fn()
    ready(out)
    s = time.perf_counter() - t
    read = rchar() - before
    del out
    gc.collect()
    return s, read


def group(name, paths, runs, nbytes):
    """Times each path ``runs`` times (alternating order, after a warm-up) and prints a row
    each: GB/s of the median run, the ratio to the last path's, and the bytes read per run
    through read calls (``rchar``: about 0 for a path that reads through a mapping)."""
    times = {label: [] for label, _, _ in paths}
    reads = {label: [] for label, _, _ in paths}
    for label, fn, ready in paths:  # warm-up
        timed(fn, ready, nbytes)
    for r in range(runs):
        order = paths if r % 2 == 0 else list(reversed(paths))
        for label, fn, ready in order:
            s, read = timed(fn, ready, nbytes)
            times[label].append(s)
            reads[label].append(read)
    base = statistics.median(times[paths[-1][0]])
    for label, _, _ in paths:
        med = statistics.median(times[label])
        read = statistics.median(reads[label]) / 1e6
        print(f"{name:<6} {label:<58} {nbytes / med / 1e9:8.3f} GB/s  {base / med:6.2f}x  read {read:8.1f} MB")


def f32_tensors(count, nbytes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"layer{i:05}.weight": rng.standard_normal(nbytes // 4, dtype=np.float32) for i in range(count)}


def lazy(runs, tmp):
    import random

    import safetensors
    import safetensors.numpy
    from tensorplace import safe_open

    nothing = lambda out: None  # noqa: E731

    def loop(opener, path, order):
        def run():
            with opener(path, framework="np") as h:
                keys = list(h.keys())
                if order == "reverse":
                    keys.reverse()
                elif order == "random":
                    random.Random(0).shuffle(keys)
                return [h.get_tensor(k) for k in keys]
        return run

    for count, nbytes in [(2000, 400_000), (20_000, 4000), (50, 16 << 20)]:
        path = os.path.join(tmp, f"lazy-{count}.safetensors")
        safetensors.numpy.save_file(f32_tensors(count, nbytes), path)
        label = f"{count} x {nbytes // 1000} KB"
        for order in ["file order", "reverse", "random"]:
            group("lazy", [
                (f"tensorplace safe_open loop, {label}, {order}", loop(safe_open, path, order), nothing),
                (f"safetensors safe_open loop, {label}, {order}", loop(safetensors.safe_open, path, order), nothing),
            ], runs, count * nbytes)
        os.remove(path)

    path = os.path.join(tmp, "rows.safetensors")
    rng = np.random.default_rng(1)
    safetensors.numpy.save_file({f"m{i:04}": rng.standard_normal((64, 256), dtype=np.float32) for i in range(1000)}, path)

    def rows(opener):
        def run():
            with opener(path, framework="np") as h:
                return [h.get_slice(k)[3] for k in h.keys()]
        return run

    group("slice", [
        ("tensorplace get_slice(k)[3], 1,000 tensors", rows(safe_open), nothing),
        ("safetensors get_slice(k)[3], 1,000 tensors", rows(safetensors.safe_open), nothing),
    ], runs, 1000 * 256 * 4)


def saves(runs, tmp):
    import safetensors.numpy
    import tensorplace.numpy

    out = os.path.join(tmp, "out.safetensors")
    nothing = lambda out: None  # noqa: E731

    def reference_save_file(tensors):
        def run():
            safetensors.numpy.save_file(tensors, out)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return run

    for count, nbytes in [(200, 4 << 20), (20_000, 4000)]:
        tensors = f32_tensors(count, nbytes)
        label = f"{count} x {nbytes // 1000} KB"
        group("save", [
            (f"tensorplace.numpy.save_file, {label}", lambda: tensorplace.numpy.save_file(tensors, out), nothing),
            (f"safetensors.numpy.save_file + fsync, {label}", reference_save_file(tensors), nothing),
        ], runs, count * nbytes)
        group("save", [
            (f"tensorplace.numpy.save, {label}", lambda: tensorplace.numpy.save(tensors), nothing),
            (f"safetensors.numpy.save, {label}", lambda: safetensors.numpy.save(tensors), nothing),
        ], runs, count * nbytes)


def peers(where):
    """The peer loaders installed here, as (label, load(path, device)) giving owned tensors:
    runai-model-streamer's SafetensorsStreamer (owned by default) and fastsafetensors (nogds,
    each tensor cloned out of its buffer, which its close frees)."""
    out = []
    try:
        from runai_model_streamer import SafetensorsStreamer

        def runai(path, device):
            with SafetensorsStreamer() as s:
                s.stream_file(path, device=device)
                return dict(s.get_tensors())

        out.append((f"runai-model-streamer SafetensorsStreamer ({where}, owned)", runai))
    except ImportError as e:
        print(f"torch: runai-model-streamer skipped ({e})")
    try:
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        def fastsafetensors(path, device):
            loader = SafeTensorsFileLoader(SingleGroup(), device, nogds=True, framework="pytorch")
            try:
                loader.add_filenames({0: [path]})
                fb = loader.copy_files_to_device()
                try:
                    return {k: fb.get_tensor(k).clone() for k in loader.get_keys()}
                finally:
                    fb.close()
            finally:
                loader.close()

        out.append((f"fastsafetensors (nogds, {where}) + clone()", fastsafetensors))
    except ImportError as e:
        print(f"torch: fastsafetensors skipped ({e})")
    return out


def torch_cpu(path, runs, nbytes):
    """The torch group on the CPU: owned tensors from every loader (peers where installed)."""
    import safetensors.torch

    import tensorplace.torch

    def stream():
        n = 0
        for _, t in tensorplace.torch.iter_tensors(path):
            n += t.numel()
            del t
        return n

    def cloned():
        return {k: v.clone() for k, v in safetensors.torch.load_file(path).items()}

    paths = [
        ("tensorplace.torch.load_file(f)", lambda: tensorplace.torch.load_file(path), None),
        ("tensorplace.torch.iter_tensors(f), each taken and dropped", stream, None),
    ]
    for label, load in peers("CPU"):
        paths.append((label, lambda load=load: load(path, "cpu"), None))
    paths.append(("safetensors.torch.load_file(f) + clone()", cloned, None))
    nothing = lambda out: None  # noqa: E731
    group("torch", [(label, fn, nothing) for label, fn, _ in paths], runs, nbytes)


def flax(runs, tmp, size):
    """flax per dtype (one file each, ``size`` bytes of 1M-element tensors), and one mixed file
    sharded over a (2, 4) mesh of the 8 CPU devices ``main`` forced: ours against
    ``safetensors.flax.load_file`` + ``jax.device_put`` (onto the device or the sharding)."""
    import jax
    import ml_dtypes
    import safetensors.flax
    import safetensors.numpy
    from jax.sharding import NamedSharding, PartitionSpec as P

    import tensorplace.flax

    ready = lambda out: [a.block_until_ready() for a in out.values()]  # noqa: E731
    dev = jax.devices()[0]
    for dtype in [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.float64, np.uint8]:
        dtype = np.dtype(dtype)
        count = max(int(size // ((1 << 20) * dtype.itemsize)), 1)
        path = os.path.join(tmp, f"flax-{dtype.name}.safetensors")
        safetensors.numpy.save_file(
            {f"t{i:04}": (np.arange(1 << 20) % 251).astype(dtype) for i in range(count)}, path)
        group("flax", [
            (f"tensorplace.flax.load_file, {count} x 1M {dtype.name}", lambda: tensorplace.flax.load_file(path, dev), ready),
            (f"safetensors.flax.load_file + device_put, {dtype.name}",
             lambda: jax.device_put(safetensors.flax.load_file(path), dev), ready),
        ], runs, count * (1 << 20) * dtype.itemsize)
        os.remove(path)
    if len(jax.devices()) < 8:
        print("flax: sharded row skipped (fewer than 8 devices)")
        return
    path = os.path.join(tmp, "flax-sharded.safetensors")
    nbytes = write_file(path, int(size))
    sharding = NamedSharding(jax.make_mesh((2, 4), ("a", "b")), P(("a", "b")))
    # Tensors the mesh divides take the sharding, the others one device (as a rule would).
    def rule(name, shape, dtype):
        return sharding if shape and shape[0] % 8 == 0 else None
    rule_of = lambda arrays: {k: rule(k, v.shape, None) or dev for k, v in arrays.items()}  # noqa: E731

    def theirs():
        arrays = safetensors.flax.load_file(path)
        return {k: jax.device_put(v, s) for (k, v), s in zip(arrays.items(), rule_of(arrays).values())}

    paths = [("tensorplace.flax.load_file(f, sharding=rule), 8 CPU devices",
              lambda: tensorplace.flax.load_file(path, sharding=rule), ready)]
    try:
        from orbax.checkpoint import v1 as ocp

        single = jax.sharding.SingleDeviceSharding(dev)

        def orbax():
            with ocp.Context(checkpoint_layout=ocp.options.CheckpointLayout.SAFETENSORS):
                shapes = ocp.metadata(path).metadata
                abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rule(k, v.shape, None) or single)
                            for k, v in shapes.items()}
                return ocp.load(path, abstract_state=abstract)

        paths.append(("orbax-checkpoint load (SAFETENSORS layout), same shardings", orbax, ready))
    except ImportError as e:
        print(f"flax: orbax row skipped ({e})")
    paths.append(("safetensors.flax.load_file + device_put(sharding)", theirs, ready))
    group("flax", paths, runs, nbytes)


def remote(runs, tmp, size):
    """An object in an S3 server on 127.0.0.1 in its own process (s3s-fs where it is on the
    PATH, ``cargo install s3s-fs@0.14.1 --features binary``: a file-backed Rust server; else
    moto's, whose ranged reads cost in proportion to the object's size), ``size`` bytes:
    tensorplace reading it by ranges vs the same file read locally (warm), runai-model-streamer's
    S3 path against the same server (where installed), and a whole-object download (boto3
    ``get_object``) then ``safetensors.numpy.load`` (the baseline)."""
    import subprocess
    import socket

    import boto3
    import safetensors.numpy

    import tensorplace.numpy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    import shutil

    s3s = shutil.which("s3s-fs")
    if s3s:
        root = os.path.join(tmp, "s3")
        os.makedirs(root)
        command = [s3s, "--host", "127.0.0.1", "--port", str(port), "--access-key", "test",
                   "--secret-key", "test", root]
    else:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    print(f"S3 server: {os.path.basename(command[0]) if s3s else 'moto'}")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
               "AWS_EC2_METADATA_DISABLED": "true", "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
        os.environ.update(env)
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # the server is starting
                time.sleep(0.1)
        path = os.path.join(tmp, "remote.safetensors")
        nbytes = write_file(path, int(size))
        with open(path, "rb") as f:
            client.upload_fileobj(f, "bench", "remote.safetensors")
        url = "s3://bench/remote.safetensors"
        nothing = lambda out: None  # noqa: E731

        def download():
            body = client.get_object(Bucket="bench", Key="remote.safetensors")["Body"].read()
            return safetensors.numpy.load(body)

        paths = [("tensorplace.numpy.load_file(s3://...)", lambda: tensorplace.numpy.load_file(url), nothing),
                 ("tensorplace.numpy.load_file(local file, warm)", lambda: tensorplace.numpy.load_file(path), nothing)]
        try:
            from runai_model_streamer import SafetensorsStreamer

            def runai():
                with SafetensorsStreamer() as st:
                    st.stream_file(url, device="cpu")
                    return dict(st.get_tensors())

            runai()  # S3 needs the runai-model-streamer-s3 package: skipped without it
            paths.append(("runai-model-streamer SafetensorsStreamer(s3://...)", runai, nothing))
        except (ImportError, ValueError, RuntimeError) as e:
            print(f"remote: runai row skipped ({e})")
        paths.append(("boto3 get_object + safetensors.numpy.load", download, nothing))
        group("s3", paths, runs, nbytes)
    finally:
        server.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--file")
    ap.add_argument("--lazy", action="store_true", help="safe_open loops and get_slice rows instead")
    ap.add_argument("--saves", action="store_true", help="save_file and save instead")
    ap.add_argument("--cold", action="store_true", help="drop the file from the page cache before each run")
    ap.add_argument("--flax", action="store_true", help="flax per dtype and sharded (8 CPU devices) instead")
    ap.add_argument("--remote", action="store_true", help="an object in a local S3 server (moto) instead")
    ap.add_argument("--torch", action="store_true", help="the torch groups alone (CPU, and cuda:0 where present)")
    args = ap.parse_args()
    if args.remote:
        tmp = tempfile.TemporaryDirectory()
        print(f"median of {args.runs} runs; ratio: x the last row of each group")
        remote(args.runs, tmp.name, args.size_gib * (1 << 30))
        return
    if args.flax:
        # Before JAX starts: the sharded row's 8 CPU devices.
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        tmp = tempfile.TemporaryDirectory()
        print(f"median of {args.runs} runs; ratio: x the last row of each group; page cache warm")
        flax(args.runs, tmp.name, args.size_gib * (1 << 30))
        return
    if args.lazy or args.saves:
        tmp = tempfile.TemporaryDirectory()
        print(f"median of {args.runs} runs; ratio: x the last row of each group")
        if args.lazy:
            lazy(args.runs, tmp.name)
        if args.saves:
            saves(args.runs, tmp.name)
        return
    tmp = tempfile.TemporaryDirectory()
    path = args.file or os.path.join(tmp.name, "bench.safetensors")
    nbytes = write_file(path, int(args.size_gib * (1 << 30))) if not args.file else os.path.getsize(path)
    print(f"file: {path} ({nbytes} data bytes); median of {args.runs} runs; ratio: x the last row of each group"
          + ("; page cache dropped before each run" if args.cold else "; page cache warm"))
    if args.cold:
        COLD.append(path)

    if args.torch:
        torch_groups(path, args.runs, nbytes)
        return
    import safetensors.numpy
    import tensorplace.numpy

    nothing = lambda out: None  # noqa: E731
    group("numpy", [
        ("tensorplace.numpy.load_file", lambda: tensorplace.numpy.load_file(path), nothing),
        ("safetensors.numpy.load_file", lambda: safetensors.numpy.load_file(path), nothing),
    ], args.runs, nbytes)

    try:
        import jax
        import safetensors.flax
        import tensorplace.flax
    except ImportError as e:
        print(f"flax: skipped ({e})")
    else:
        dev = jax.devices()[0]
        ready = lambda out: [a.block_until_ready() for a in out.values()]  # noqa: E731
        group("flax", [
            (f"tensorplace.flax.load_file(f, {dev.platform}:{dev.id})", lambda: tensorplace.flax.load_file(path, dev), ready),
            ("safetensors.flax.load_file(f) + jax.device_put",
             lambda: jax.device_put(safetensors.flax.load_file(path), dev), ready),
        ], args.runs, nbytes)
    torch_groups(path, args.runs, nbytes)


def torch_groups(path, runs, nbytes):
    """The torch group on the CPU, then on cuda:0 where a CUDA device is present."""
    try:
        import torch
        import safetensors.torch
        import tensorplace.torch
    except ImportError as e:
        print(f"torch: skipped ({e})")
        return
    torch_cpu(path, runs, nbytes)
    if not torch.cuda.is_available():
        print("torch: skipped on cuda:0 (no CUDA device)")
        return
    sync = lambda out: torch.cuda.synchronize()  # noqa: E731
    gpu = [('tensorplace.torch.load_file(f, "cuda:0")', lambda: tensorplace.torch.load_file(path, "cuda:0"), sync)]
    for label, load in peers("cuda:0"):
        gpu.append((label, lambda load=load: load(path, "cuda:0"), sync))
    gpu.append(('safetensors.torch.load_file(f, device="cuda:0")',
                lambda: safetensors.torch.load_file(path, device="cuda:0"), sync))
    group("torch", gpu, runs, nbytes)


if __name__ == "__main__":
    main()
