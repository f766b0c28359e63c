//! Sharded checkpoints, slices and tensor-parallel parts: the fixture written the way
//! `transformers` writes one (`tests/fixtures/make_checkpoint.py`: huggingface_hub's shard
//! splitting, `safetensors.numpy.save_file`, the index JSON), the parts numpy computed from
//! the same arrays (`sharded_expected.safetensors`), every index inconsistency, and the bytes
//! an open and a tensor-parallel load read (counted by the kernel, in a child process).

use std::path::{Path, PathBuf};

use tensorplace::{Device, Dtype, ErrorKind, Loader, ReadMode, Slice, Tensor, Tensors};

use crate::common;

fn sharded() -> PathBuf {
    common::fixtures().join("sharded")
}

/// numpy's parts: `slice|NAME|SLICE` and `part|NAME|DIM|RANK|WORLD`.
fn expected() -> Tensors {
    tensorplace::load_file(
        common::fixtures().join("sharded_expected.safetensors"),
        "cpu",
    )
    .unwrap()
}

fn host(t: &Tensor) -> Vec<u8> {
    t.host_bytes().unwrap().into_owned()
}

/// A copy of the fixture in a temporary folder, to break.
fn copy_of_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(sharded()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn index_of(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(tensorplace::INDEX_NAME)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn write_index(dir: &Path, index: &serde_json::Value) {
    std::fs::write(
        dir.join(tensorplace::INDEX_NAME),
        serde_json::to_string(index).unwrap(),
    )
    .unwrap();
}

#[test]
fn open_lists_every_tensor_with_its_file_and_range() {
    let ckpt = tensorplace::open(sharded()).unwrap();
    assert_eq!(ckpt.files().len(), 4);
    assert_eq!(ckpt.len(), 4 * 5 + 9);
    assert_eq!(ckpt.total_size(), Some(ckpt.data_len()));
    assert_eq!(
        ckpt.index_metadata().unwrap()["total_size"],
        ckpt.data_len().to_string()
    );
    assert_eq!(ckpt.metadata().unwrap()["format"], "pt");
    // Each tensor where its shard's own header says, bytes and all.
    for entry in ckpt.iter() {
        let shard = tensorplace::load_file(entry.file, "cpu").unwrap();
        let t = shard.tensor(entry.name).unwrap();
        assert_eq!((t.dtype(), t.shape()), (entry.dtype, entry.shape));
        let raw = std::fs::read(entry.file).unwrap();
        assert_eq!(raw[entry.range.clone()], host(t)[..], "{}", entry.name);
    }
    let e = ckpt.tensor("nope").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TensorNotFound);
    // The index itself, and one shard alone.
    let by_index = tensorplace::open(sharded().join(tensorplace::INDEX_NAME)).unwrap();
    assert!(by_index.names().eq(ckpt.names()));
    let one = tensorplace::open(ckpt.files().next().unwrap()).unwrap();
    assert_eq!(one.files().len(), 1);
    assert!(one.total_size().is_none());
}

#[test]
fn whole_checkpoints_load_like_their_shards_on_every_device() {
    let shards: Vec<Tensors> = tensorplace::open(sharded())
        .unwrap()
        .files()
        .map(|f| tensorplace::load_file(f, "cpu").unwrap())
        .collect();
    for device in common::devices("whole_checkpoints_load_like_their_shards") {
        for mode in [ReadMode::Mmap, ReadMode::Pread] {
            let done = std::sync::atomic::AtomicU64::new(0);
            let all = Loader::new(device)
                .read_mode(mode)
                .progress(|p| done.store(p.done.max(p.total), std::sync::atomic::Ordering::Relaxed))
                .load_file(sharded())
                .unwrap();
            assert_eq!(all.len(), 29);
            assert_eq!(all.metadata().unwrap()["format"], "pt");
            for shard in &shards {
                for (name, want) in shard.iter() {
                    let got = all.tensor(name).unwrap();
                    assert_eq!(got.device(), device.probe().unwrap());
                    assert_eq!((got.dtype(), got.shape()), (want.dtype(), want.shape()));
                    assert_eq!(host(got), host(want), "{device} {mode:?} {name}");
                }
            }
            let total: u64 = shards.iter().map(|s| s.total_bytes() as u64).sum();
            assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), total);
        }
    }
}

/// The slice `text` means, which prints back as written.
fn slice(text: &str) -> Slice {
    let s: Slice = text.parse().unwrap();
    assert_eq!(s.to_string(), text);
    s
}

#[test]
fn slices_equal_numpy_on_every_device() {
    let expected = expected();
    for device in common::devices("slices_equal_numpy") {
        for (key, want) in expected.iter().filter(|(k, _)| k.starts_with("slice|")) {
            let mut parts = key.splitn(3, '|').skip(1);
            let (name, text) = (parts.next().unwrap(), parts.next().unwrap());
            for mode in [ReadMode::Mmap, ReadMode::Pread] {
                let got = Loader::new(device)
                    .read_mode(mode)
                    .filter(|n| n == name)
                    .slice(name, slice(text))
                    .load_file(sharded())
                    .unwrap();
                assert_eq!(got.len(), 1);
                let t = got.tensor(name).unwrap();
                assert_eq!(t.shape(), want.shape(), "{device} {key}");
                assert_eq!(host(t), host(want), "{device} {mode:?} {key}");
            }
        }
    }
}

#[test]
fn tensor_parallel_parts_equal_array_split_on_every_device() {
    let expected = expected();
    for device in common::devices("tensor_parallel_parts") {
        for (key, want) in expected.iter().filter(|(k, _)| k.starts_with("part|")) {
            let f: Vec<&str> = key.split('|').collect();
            let (name, dim, rank, world): (&str, usize, usize, usize) = (
                f[1],
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            );
            let got = Loader::new(device)
                .split(rank, world, |n, _| (n == name).then_some(dim))
                .load_file(sharded())
                .unwrap();
            let t = got.tensor(name).unwrap();
            assert_eq!(t.shape(), want.shape(), "{device} {key}");
            assert_eq!(host(t), host(want), "{device} {key}");
            // The other tensors whole.
            assert_eq!(got.len(), 29);
        }
    }
}

#[test]
fn parts_of_many_tensors_in_one_load_with_a_conversion() {
    let expected = expected();
    let ckpt = tensorplace::open(sharded()).unwrap();
    // Rank 1 of 3, along dimension 0 for everything with 2 dimensions or more, cast to F32.
    for device in common::devices("parts_of_many_tensors_in_one_load") {
        let got = Loader::new(device)
            .dtype(Dtype::F32)
            .split(1, 3, |_, shape| (shape.len() >= 2).then_some(0))
            .load_checkpoint(&ckpt)
            .unwrap();
        let cpu = Loader::new("cpu")
            .split(1, 3, |_, shape| (shape.len() >= 2).then_some(0))
            .load_checkpoint(&ckpt)
            .unwrap();
        for (name, part) in cpu.iter() {
            let t = got.tensor(name).unwrap();
            assert_eq!(t.shape(), part.shape(), "{name}");
            assert_eq!(host(t), common::cast(part, Dtype::F32), "{device} {name}");
        }
        // The CPU's parts are numpy's.
        let q = "model.layers.0.self_attn.q_proj.weight";
        let want = expected.tensor(&format!("part|{q}|0|1|3")).unwrap();
        assert_eq!(host(cpu.tensor(q).unwrap()), host(want));
    }
    let name = "model.embed_tokens.weight";
    let want = expected.tensor(&format!("part|{name}|1|5|8")).unwrap();
    let got = Loader::new("cpu")
        .split(5, 8, |n, _| (n == name).then_some(1))
        .load_checkpoint(&ckpt)
        .unwrap();
    assert_eq!(host(got.tensor(name).unwrap()), host(want));
}

#[test]
fn bad_slices_and_splits_are_errors_by_kind() {
    let name = "model.layers.2.extra.cube"; // [4, 6, 5]
    let load = |text: &str| {
        Loader::new("cpu")
            .filter(|n| n == name)
            .slice(name, text.parse()?)
            .load_file(sharded())
    };
    for bad in [
        "[4]",
        "[-5]",
        "[0:5]",
        "[3:2]",
        "[4:]",
        "[1, 2, 3, 4]",
        "[..., ...]",
        "[::2]",
        "[x]",
    ] {
        let e = load(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSlice, "{bad}: {e}");
    }
    let e = load("[0]").map(|t| t.tensor(name).unwrap().shape().to_vec());
    assert_eq!(e.unwrap(), [6, 5]);
    let e = Loader::new("cpu")
        .slice("ghost", "[0]".parse().unwrap())
        .load_file(sharded())
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.tensor()),
        (ErrorKind::TensorNotFound, Some("ghost"))
    );
    for (rank, world, dim) in [(3, 3, 0), (0, 0, 0), (0, 2, 3)] {
        let e = Loader::new("cpu")
            .split(rank, world, |n, _| (n == name).then_some(dim))
            .load_file(sharded())
            .unwrap_err();
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::InvalidSlice, Some(name))
        );
    }
}

/// Asserts that opening `dir` fails with an index error naming `file` (a name in `dir`) and
/// `tensor`.
fn assert_index_error(dir: &Path, file: &str, tensor: Option<&str>) {
    let e = tensorplace::open(dir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIndex, "{e}");
    assert_eq!(e.file(), Some(dir.join(file).as_path()), "{e}");
    assert_eq!(e.tensor(), tensor, "{e}");
    // Loading fails the same way.
    let e = tensorplace::load_file(dir, "cpu").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIndex, "{e}");
}

#[test]
fn every_index_inconsistency_is_an_error_naming_file_and_tensor() {
    let shard = |k: usize| format!("model-0000{k}-of-00004.safetensors");
    // A tensor mapped to a file that does not hold it.
    let dir = copy_of_fixture();
    let mut index = index_of(dir.path());
    index["weight_map"]["lm_head.weight"] = shard(1).into();
    write_index(dir.path(), &index);
    assert_index_error(dir.path(), &shard(1), Some("lm_head.weight"));
    // A missing shard.
    let dir = copy_of_fixture();
    std::fs::remove_file(dir.path().join(shard(2))).unwrap();
    let e = tensorplace::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIndex);
    assert_eq!(e.file(), Some(dir.path().join(shard(2)).as_path()));
    assert!(e.tensor().is_some());
    // A name held by two shards: shard 4 rewritten with a tensor of shard 1 added.
    let dir = copy_of_fixture();
    let mut four = tensorplace::load_file(dir.path().join(shard(4)), "cpu").unwrap();
    let one = tensorplace::load_file(dir.path().join(shard(1)), "cpu").unwrap();
    let stolen = "model.embed_tokens.weight";
    four.insert(stolen, one.tensor(stolen).unwrap().clone());
    tensorplace::save_file(&four, dir.path().join(shard(4)), None).unwrap();
    assert_index_error(dir.path(), &shard(4), Some(stolen));
    // A tensor no shard has.
    let dir = copy_of_fixture();
    let mut index = index_of(dir.path());
    index["weight_map"]["ghost.weight"] = shard(3).into();
    write_index(dir.path(), &index);
    assert_index_error(dir.path(), &shard(3), Some("ghost.weight"));
    // A tensor of a shard the index never mentions.
    let dir = copy_of_fixture();
    let mut index = index_of(dir.path());
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight");
    write_index(dir.path(), &index);
    let holder = tensorplace::open(sharded())
        .unwrap()
        .tensor("model.norm.weight")
        .unwrap()
        .file
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_index_error(dir.path(), &holder, Some("model.norm.weight"));
    // A whole shard the index never mentions: named like the others, or holding its names.
    let dir = copy_of_fixture();
    std::fs::copy(
        dir.path().join(shard(4)),
        dir.path().join("model-00005-of-00005.safetensors"),
    )
    .unwrap();
    assert_index_error(dir.path(), "model-00005-of-00005.safetensors", None);
    let dir = copy_of_fixture();
    std::fs::copy(
        dir.path().join(shard(4)),
        dir.path().join("extra.safetensors"),
    )
    .unwrap();
    let e = tensorplace::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIndex);
    assert_eq!(
        e.file(),
        Some(dir.path().join("extra.safetensors").as_path())
    );
    // Files beside the index with names of their own are not part of it.
    let dir = copy_of_fixture();
    tensorplace::save_file(
        &common::mixed_tensors(1),
        dir.path().join("consolidated.safetensors"),
        None,
    )
    .unwrap();
    assert_eq!(tensorplace::open(dir.path()).unwrap().len(), 29);
    // Even one that is not a safetensors file at all (a partial download, say).
    std::fs::write(dir.path().join("notes.safetensors"), b"not one").unwrap();
    assert_eq!(tensorplace::open(dir.path()).unwrap().len(), 29);
    // An index that is not one.
    for text in [
        "{",
        "[]",
        r#"{"weight_map": 3}"#,
        r#"{"weight_map": {"a": 1}}"#,
    ] {
        let dir = copy_of_fixture();
        std::fs::write(dir.path().join(tensorplace::INDEX_NAME), text).unwrap();
        let e = tensorplace::open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidIndex, "{text}");
        assert_eq!(
            e.file(),
            Some(dir.path().join(tensorplace::INDEX_NAME).as_path())
        );
    }
    // A shard outside the folder.
    let dir = copy_of_fixture();
    let mut index = index_of(dir.path());
    index["weight_map"]["lm_head.weight"] = "../model-00004-of-00004.safetensors".into();
    write_index(dir.path(), &index);
    let e = tensorplace::open(dir.path()).unwrap_err();
    assert_eq!(
        (e.kind(), e.tensor()),
        (ErrorKind::InvalidIndex, Some("lm_head.weight"))
    );
    // A truncated shard: the format error, naming it.
    let dir = copy_of_fixture();
    let path = dir.path().join(shard(3));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let e = tensorplace::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::IncompleteBuffer);
    assert_eq!(e.file(), Some(path.as_path()));
}

#[test]
fn folders_without_an_index_and_files_that_change() {
    // Without the index: every shard, in name order.
    let dir = copy_of_fixture();
    std::fs::remove_file(dir.path().join(tensorplace::INDEX_NAME)).unwrap();
    let ckpt = tensorplace::open(dir.path()).unwrap();
    assert_eq!(ckpt.len(), 29);
    assert!(ckpt.total_size().is_none());
    let all = tensorplace::load_file(dir.path(), "cpu").unwrap();
    assert_eq!(all.len(), 29);
    // A name in two files.
    let t =
        tensorplace::load_file(dir.path().join("model-00004-of-00004.safetensors"), "cpu").unwrap();
    tensorplace::save_file(&t, dir.path().join("zz.safetensors"), None).unwrap();
    let e = tensorplace::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DuplicateName);
    assert_eq!(e.file(), Some(dir.path().join("zz.safetensors").as_path()));
    // A shard rewritten between open and load.
    let dir = copy_of_fixture();
    let ckpt = tensorplace::open(dir.path()).unwrap();
    let path = dir.path().join("model-00004-of-00004.safetensors");
    let mut t = tensorplace::load_file(&path, "cpu").unwrap();
    let name = t.names().next().unwrap().to_owned();
    let first = t.remove(&name).unwrap();
    t.insert(name.clone(), first);
    tensorplace::save_file(&t, &path, None).unwrap();
    match tensorplace::Loader::new(Device::Cpu).load_checkpoint(&ckpt) {
        Ok(loaded) => assert_eq!(loaded.len(), 29), // the layout happened to stay the same
        Err(e) => assert_eq!(e.kind(), ErrorKind::Io),
    }
    std::fs::write(&path, b"garbage").unwrap();
    let e = tensorplace::Loader::new(Device::Cpu)
        .load_checkpoint(&ckpt)
        .unwrap_err();
    assert_eq!(e.file(), Some(path.as_path()));
}

/// Bytes this process has read through system calls (`rchar` of /proc/self/io).
fn bytes_read() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `test` (an ignored test of this module) in a child process, so that no other
/// test's reads count, and prints its report lines.
fn in_child(test: &str) {
    let text = common::in_child(test, "TENSORPLACE_CHECKPOINT_CHILD");
    for line in text
        .lines()
        .filter(|l| l.starts_with("read ") || l.starts_with("SKIPPED"))
    {
        println!("{line}");
    }
}

#[test]
fn opening_a_thousand_shards_reads_no_tensor_bytes() {
    in_child("checkpoints::open_child");
}

/// The child of `opening_a_thousand_shards_reads_no_tensor_bytes`.
#[test]
#[ignore = "run as a child process by opening_a_thousand_shards_reads_no_tensor_bytes"]
fn open_child() {
    if std::env::var_os("TENSORPLACE_CHECKPOINT_CHILD").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut weight_map = serde_json::Map::new();
    let mut headers = 0u64;
    for k in 0..1000 {
        let mut t = Tensors::new();
        let name = format!("layer.{k}.weight");
        t.insert(
            name.clone(),
            Tensor::from_bytes(Dtype::F32, vec![16, 256], &common::bytes(16 << 10, k)).unwrap(),
        );
        let file = format!("model-{:05}-of-01000.safetensors", k + 1);
        let path = dir.path().join(&file);
        tensorplace::save_file(&t, &path, None).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        headers += len - (16 << 10);
        weight_map.insert(name, file.into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 1000 * (16 << 10)}, "weight_map": weight_map});
    let index_len = index.to_string().len() as u64;
    write_index(dir.path(), &index);
    let Some(before) = bytes_read() else {
        println!("SKIPPED open_child: no /proc/self/io");
        return;
    };
    let ckpt = tensorplace::open(dir.path()).unwrap();
    let read = bytes_read().unwrap() - before;
    println!(
        "read {read} bytes to open 1000 shards ({headers} bytes of headers, {index_len} of index, {} of tensors)",
        ckpt.data_len()
    );
    assert_eq!(ckpt.len(), 1000);
    // Headers, the index and /proc/self/io itself: no tensor byte.
    assert!(read <= headers + index_len + 8192, "{read}");
}

#[test]
fn one_of_eight_parts_reads_an_eighth_of_the_bytes() {
    in_child("checkpoints::part_child");
}

/// The child of `one_of_eight_parts_reads_an_eighth_of_the_bytes`.
#[test]
#[ignore = "run as a child process by one_of_eight_parts_reads_an_eighth_of_the_bytes"]
fn part_child() {
    if std::env::var_os("TENSORPLACE_CHECKPOINT_CHILD").is_none() {
        return;
    }
    // 4 shards of column- and row-parallel matrices (split along 0 and 1), and some that stay
    // whole (norms, a bias), as Megatron splits a transformer.
    let dir = tempfile::tempdir().unwrap();
    let mut whole = 0u64;
    for k in 0..4u64 {
        let mut t = Tensors::new();
        t.insert(
            format!("l{k}.up.weight"),
            Tensor::from_bytes(Dtype::BF16, vec![1024, 512], &common::bytes(1 << 20, k)).unwrap(),
        );
        t.insert(
            format!("l{k}.down.weight"),
            Tensor::from_bytes(Dtype::BF16, vec![512, 1024], &common::bytes(1 << 20, k + 9))
                .unwrap(),
        );
        t.insert(
            format!("l{k}.norm.weight"),
            Tensor::from_bytes(Dtype::F32, vec![512], &common::bytes(2048, k + 99)).unwrap(),
        );
        whole += 2048;
        tensorplace::save_file(&t, dir.path().join(format!("m-{k}.safetensors")), None).unwrap();
    }
    let ckpt = tensorplace::open(dir.path()).unwrap();
    let dim = |name: &str, _: &[usize]| {
        if name.ends_with("up.weight") {
            Some(0)
        } else if name.ends_with("down.weight") {
            Some(1)
        } else {
            None
        }
    };
    for device in common::devices("part_child") {
        let Some(before) = bytes_read() else {
            println!("SKIPPED part_child: no /proc/self/io");
            return;
        };
        let part = Loader::new(device)
            .read_mode(ReadMode::Pread)
            .split(3, 8, dim)
            .load_checkpoint(&ckpt)
            .unwrap();
        let read = bytes_read().unwrap() - before;
        let split_bytes = ckpt.data_len() - whole;
        println!(
            "read {read} bytes for part 3 of 8 on {device}: {:.4} of the {} bytes of the tensors split",
            (read - whole) as f64 / split_bytes as f64,
            split_bytes
        );
        // An eighth of the split tensors, the whole ones, and the headers opened again.
        assert!(read <= split_bytes / 8 + whole + 4 * 4096, "{read}");
        assert_eq!(part.tensor("l0.up.weight").unwrap().shape(), [128, 512]);
        assert_eq!(part.tensor("l0.down.weight").unwrap().shape(), [512, 128]);
        // The part's bytes are the rows (and columns) of the whole.
        let all = Loader::new("cpu").load_checkpoint(&ckpt).unwrap();
        let full = host(all.tensor("l2.down.weight").unwrap());
        let got = host(part.tensor("l2.down.weight").unwrap());
        for row in 0..512 {
            let at = row * 2048 + 3 * 256;
            assert_eq!(got[row * 256..][..256], full[at..at + 256], "row {row}");
        }
    }
}

/// A [`tensorplace::Stream`] gives every tensor of the sharded fixture in file order, shard
/// after shard, equal to a whole load, on every device, whatever its bound (a bound smaller
/// than a tensor reads that tensor alone); a filter keeps its names; a stream dropped half-way
/// stops; an absent checkpoint fails when the stream opens.
#[test]
fn streams_give_every_tensor_in_file_order() {
    let whole = tensorplace::load_file(sharded(), "cpu").unwrap();
    let ckpt = tensorplace::open(sharded()).unwrap();
    let order: Vec<&str> = ckpt.names().collect();
    for device in common::devices("streams_give_every_tensor_in_file_order") {
        for bound in [1, 4 << 10, 1 << 30] {
            let mut names = Vec::new();
            for item in Loader::new(device).stream(sharded(), bound).unwrap() {
                let (name, got) = item.unwrap();
                let want = whole.tensor(&name).unwrap();
                assert_eq!(got.device(), device.probe().unwrap());
                assert_eq!((got.dtype(), got.shape()), (want.dtype(), want.shape()));
                assert_eq!(host(&got), host(want), "{device} {bound} {name}");
                names.push(name);
            }
            assert_eq!(names, order, "{device} {bound}");
        }
        let kept: Vec<String> = Loader::new(device)
            .filter(|n| n.ends_with("weight"))
            .stream(sharded(), 4 << 10)
            .unwrap()
            .map(|item| item.unwrap().0)
            .collect();
        let want: Vec<&str> = order
            .iter()
            .copied()
            .filter(|n| n.ends_with("weight"))
            .collect();
        assert!(!want.is_empty());
        assert_eq!(kept, want);
        let mut half = Loader::new(device).stream(sharded(), 1).unwrap();
        assert!(half.next().unwrap().is_ok());
        drop(half);
    }
    let e = Loader::new("cpu")
        .stream("no/such/checkpoint", 1 << 20)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
}

/// A [`tensorplace::Reader`] over the sharded fixture, on every device and in every read
/// mode: each tensor read alone (in file order, in reverse, from four threads at once), each
/// slice numpy computed, several at once, and a cast, all equal to what whole loads give.
#[test]
fn readers_read_what_loads_load_on_every_device() {
    let expected = expected();
    let ckpt = tensorplace::open(sharded()).unwrap();
    let whole = tensorplace::load_file(sharded(), "cpu").unwrap();
    for device in common::devices("readers_read_what_loads_load") {
        for mode in [ReadMode::Mmap, ReadMode::Pread, ReadMode::Direct] {
            let reader = Loader::new(device)
                .read_mode(mode)
                .reader(sharded())
                .unwrap();
            assert!(reader.names().eq(ckpt.names()), "file order");
            assert_eq!(
                (reader.len(), reader.device()),
                (29, device.probe().unwrap())
            );
            assert_eq!(reader.metadata().unwrap()["format"], "pt");
            let names: Vec<&str> = reader.names().collect();
            for &name in names.iter().chain(names.iter().rev()) {
                let got = reader.tensor(name).unwrap();
                let want = whole.tensor(name).unwrap();
                assert_eq!(got.device(), device.probe().unwrap());
                assert_eq!((got.dtype(), got.shape()), (want.dtype(), want.shape()));
                assert_eq!(host(&got), host(want), "{device} {mode:?} {name}");
                assert_eq!(reader.info(name).unwrap(), (want.dtype(), want.shape()));
                assert_eq!(
                    reader.file_of(name).unwrap(),
                    ckpt.tensor(name).unwrap().file
                );
            }
            std::thread::scope(|s| {
                for k in 0..4 {
                    let (reader, whole, names) = (&reader, &whole, &names);
                    s.spawn(move || {
                        for name in names.iter().skip(k).step_by(2) {
                            let got = reader.tensor(name).unwrap();
                            assert_eq!(host(&got), host(whole.tensor(name).unwrap()));
                        }
                    });
                }
            });
            for (key, want) in expected.iter().filter(|(k, _)| k.starts_with("slice|")) {
                let mut parts = key.splitn(3, '|').skip(1);
                let (name, text) = (parts.next().unwrap(), parts.next().unwrap());
                let got = reader.slice(name, &slice(text)).unwrap();
                assert_eq!(got.shape(), want.shape(), "{device} {key}");
                assert_eq!(host(&got), host(want), "{device} {mode:?} {key}");
            }
            // One copy out of the mapping where the reader can (a mapped file's small reads onto
            // the CPU, unconverted): the same bytes, into memory the caller gives.
            let copies = mode == ReadMode::Mmap && device.probe().unwrap() == Device::Cpu;
            for &name in &names {
                let want = host(whole.tensor(name).unwrap());
                let Some(read) = reader.memory_read(name, None).unwrap() else {
                    assert!(
                        !copies || want.len() >= 256 << 10,
                        "{device} {mode:?} {name}"
                    );
                    continue;
                };
                assert!(copies, "{device} {mode:?} {name}");
                assert_eq!((read.dtype(), read.shape()), reader.info(name).unwrap());
                let mut out = vec![7u8; read.len() + 1];
                read.copy_to(&mut out[..read.len()]).unwrap();
                assert_eq!(out[..read.len()], want[..], "{name}");
                let e = read.copy_to(&mut out).unwrap_err();
                assert_eq!(
                    (e.kind(), e.tensor()),
                    (ErrorKind::InvalidTensor, Some(name))
                );
            }
            for (key, want) in expected.iter().filter(|(k, _)| k.starts_with("slice|")) {
                let mut parts = key.splitn(3, '|').skip(1);
                let (name, text) = (parts.next().unwrap(), parts.next().unwrap());
                if let Some(read) = reader.memory_read(name, Some(&slice(text))).unwrap() {
                    assert_eq!(read.shape(), want.shape(), "{key}");
                    let mut out = vec![0u8; read.len()];
                    read.copy_to(&mut out).unwrap();
                    assert_eq!(out, host(want), "{key}");
                } else {
                    assert!(!copies || host(want).len() >= 256 << 10, "{key}");
                }
            }
            assert_eq!(
                reader.memory_read("nope", None).unwrap_err().kind(),
                ErrorKind::TensorNotFound
            );
            // Several at once: in file order, each once.
            let some: Vec<&str> = names.iter().rev().step_by(3).copied().collect();
            let many = reader
                .tensors(some.iter().copied().chain(some.first().copied()))
                .unwrap();
            assert_eq!(many.len(), some.len());
            let order: Vec<&str> = names.iter().filter(|n| some.contains(n)).copied().collect();
            assert!(many.names().eq(order.iter().copied()));
            for (name, got) in many.iter() {
                assert_eq!(
                    host(got),
                    host(whole.tensor(name).unwrap()),
                    "{device} {name}"
                );
            }
            // Parts (a sharded load's shards), in the order given, in one pass: every slice
            // numpy computed, last first, each after a whole tensor; one asked twice.
            let sliced: Vec<(&str, Slice, &Tensor)> = expected
                .iter()
                .filter(|(k, _)| k.starts_with("slice|"))
                .map(|(key, want)| {
                    let mut parts = key.splitn(3, '|').skip(1);
                    let (name, text) = (parts.next().unwrap(), parts.next().unwrap());
                    (name, slice(text), want)
                })
                .collect();
            let mut asked: Vec<(&str, Option<&Slice>)> = Vec::new();
            let mut wants: Vec<Vec<u8>> = Vec::new();
            for (k, (name, part, want)) in sliced.iter().rev().enumerate() {
                let other = names[k * 7 % names.len()];
                asked.extend([(other, None), (*name, Some(part))]);
                wants.extend([host(whole.tensor(other).unwrap()), host(want)]);
            }
            asked.push(asked[1]);
            wants.push(wants[1].clone());
            let got = reader.parts(&asked).unwrap();
            assert_eq!(got.len(), asked.len());
            for ((got, want), (name, _)) in got.iter().zip(&wants).zip(&asked) {
                assert_eq!(&host(got), want, "{device} {mode:?} part of {name}");
            }
            // The same parts, each onto a device of its own (the CPU and this loop's device
            // in turn, as a mesh's shards go to their devices): the same bytes, where asked.
            let on: Vec<(&str, Option<&Slice>, Device)> = asked
                .iter()
                .enumerate()
                .map(|(k, &(name, part))| (name, part, [Device::Cpu, device][k % 2]))
                .collect();
            let got = reader.parts_on(&on).unwrap();
            for ((got, want), (name, _, on)) in got.iter().zip(&wants).zip(&on) {
                assert_eq!(got.device(), on.probe().unwrap(), "{device} part of {name}");
                assert_eq!(&host(got), want, "{device} {mode:?} part of {name} on {on}");
            }
            let e = reader
                .parts(&[(names[0], None), ("nope", None)])
                .unwrap_err();
            assert_eq!(
                (e.kind(), e.tensor()),
                (ErrorKind::TensorNotFound, Some("nope"))
            );
            let beyond = slice("[0:999999999]");
            let e = reader.parts(&[(names[0], Some(&beyond))]).unwrap_err();
            assert_eq!(
                (e.kind(), e.tensor()),
                (ErrorKind::InvalidSlice, Some(names[0]))
            );
            let e = reader.tensor("nope").unwrap_err();
            assert_eq!(
                (e.kind(), e.tensor()),
                (ErrorKind::TensorNotFound, Some("nope"))
            );
            let e = reader.tensors(["nope"]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TensorNotFound);
        }
        // A cast, and one file alone.
        let cast = Loader::new(device)
            .dtype(Dtype::F32)
            .reader(sharded())
            .unwrap();
        for (name, want) in whole.iter() {
            let got = cast.tensor(name).unwrap();
            assert_eq!(
                host(&got),
                common::cast(want, Dtype::F32),
                "{device} {name}"
            );
        }
        let file = ckpt.files().next().unwrap();
        let one = Loader::new(device).reader(file).unwrap();
        let shard = tensorplace::load_file(file, "cpu").unwrap();
        assert!(one.names().eq(shard.names()));
        assert_eq!((one.len(), one.metadata()), (shard.len(), shard.metadata()));
        for (name, want) in shard.iter() {
            assert_eq!(
                host(&one.tensor(name).unwrap()),
                host(want),
                "{device} {name}"
            );
        }
        let e = one.tensor("nope").unwrap_err();
        assert_eq!(
            (e.kind(), e.file()),
            (ErrorKind::TensorNotFound, Some(file))
        );
    }
    // A device that is not there fails when the reader opens, not later.
    let e = Loader::new("cuda:7").reader(sharded()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DeviceUnavailable);
}

/// The files of `dir`, sorted by name.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// `save_checkpoint` writes the Hub's layout (its split, names and index), which loads back
/// as the tensors saved; a later save with fewer shards replaces the files of the first;
/// a save that fails on its last shard (a reserved name) leaves the folder as it was, with
/// no temporary behind.
#[test]
fn sharded_saves_write_the_hubs_layout_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Tensors::new();
    for (k, n) in [3000usize, 5000, 2000, 9000, 100, 40_000, 7]
        .into_iter()
        .enumerate()
    {
        let t = Tensor::from_bytes(Dtype::U8, vec![n], &common::bytes(n, k as u64)).unwrap();
        tensors.insert(format!("t{k}"), t);
    }
    let mut metadata = tensorplace::Metadata::new();
    metadata.insert("format".into(), "np".into());
    let paths =
        tensorplace::save_checkpoint(&tensors, dir.path(), 10_000, Some(&metadata)).unwrap();
    // [3000 + 5000 + 2000], then 40000 alone (where it comes), then [9000 + 100 + 7]:
    // huggingface_hub's rule.
    let files = |n: usize| (1..=n).map(move |k| format!("model-{k:05}-of-{n:05}.safetensors"));
    let mut want: Vec<String> = files(3)
        .chain(["model.safetensors.index.json".into()])
        .collect();
    assert_eq!(
        paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        want
    );
    want.sort();
    assert_eq!(listing(dir.path()), want);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(tensorplace::INDEX_NAME)).unwrap())
            .unwrap();
    assert_eq!(index["metadata"]["total_size"], 59_107);
    assert_eq!(index["metadata"]["format"], "np");
    for (name, file) in [("t2", 1), ("t5", 2), ("t6", 3)] {
        let want = format!("model-{file:05}-of-00003.safetensors");
        assert_eq!(index["weight_map"][name], want.as_str(), "{name}");
    }
    let back = tensorplace::load_file(dir.path(), "cpu").unwrap();
    assert_eq!(back.len(), tensors.len());
    for (name, t) in tensors.iter() {
        assert_eq!(
            back.tensor(name).unwrap().as_bytes(),
            t.as_bytes(),
            "{name}"
        );
    }
    // Fewer shards: the first save's other files go.
    let paths = tensorplace::save_checkpoint(&tensors, dir.path(), 30_000, None).unwrap();
    assert_eq!(paths.len(), 3);
    assert_eq!(listing(dir.path()).len(), 3, "{:?}", listing(dir.path()));
    // One shard: model.safetensors alone.
    tensorplace::save_checkpoint(&tensors, dir.path(), tensorplace::MAX_SHARD_SIZE, None).unwrap();
    assert_eq!(listing(dir.path()), ["model.safetensors"]);
    // A failure on the last shard: nothing changed, nothing left behind.
    tensorplace::save_checkpoint(&tensors, dir.path(), 10_000, None).unwrap();
    let before: Vec<(String, Vec<u8>)> = listing(dir.path())
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(dir.path().join(&n)).unwrap()))
        .collect();
    let mut bad = tensors.clone();
    bad.insert(
        "__metadata__",
        Tensor::from_bytes(Dtype::U8, vec![1], &[1]).unwrap(),
    );
    let e = tensorplace::save_checkpoint(&bad, dir.path(), 20_000, None).unwrap_err();
    assert_eq!(
        (e.kind(), e.tensor()),
        (ErrorKind::InvalidTensor, Some("__metadata__"))
    );
    let after: Vec<(String, Vec<u8>)> = listing(dir.path())
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(dir.path().join(&n)).unwrap()))
        .collect();
    assert!(
        before == after,
        "the folder changed: {:?}",
        listing(dir.path())
    );
}

/// A Hugging Face cache of one repository as `huggingface_hub` lays it out: `main` the
/// sharded fixture (links into `blobs/`), the tag `v1` one file, a ref `broken` whose index
/// names a shard never downloaded. Returns the cache folder.
pub fn hub_cache(root: &Path) -> PathBuf {
    let folder = root.join("models--acme--tiny");
    let add = |commit: &str, name: &str, source: &Path| {
        let blob = folder.join("blobs").join(format!("{commit}-{name}"));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(source, &blob).unwrap();
        let link = folder.join("snapshots").join(commit).join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
    };
    for entry in std::fs::read_dir(sharded()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        add(&"a".repeat(40), &name, &path);
        if !name.starts_with("model-00002") {
            add(&"c".repeat(40), &name, &path);
        }
    }
    add(
        &"b".repeat(40),
        "model.safetensors",
        &common::fixtures().join("numpy_all.safetensors"),
    );
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    for (r, c) in [("main", "a"), ("v1", "b"), ("broken", "c")] {
        std::fs::write(folder.join("refs").join(r), c.repeat(40)).unwrap();
    }
    root.to_owned()
}

/// Repository ids resolve through the cache (`Loader::hf_cache`): a branch, a tag, a commit
/// hash; a missing shard, revision or repository is an error naming it; without a cache, or
/// for a path on disk, nothing changes.
#[test]
fn repository_ids_load_from_the_hugging_face_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = hub_cache(dir.path());
    let loader = Loader::new("cpu").hf_cache(&cache);
    let main = tensorplace::load_file(sharded(), "cpu").unwrap();
    let v1 =
        tensorplace::load_file(common::fixtures().join("numpy_all.safetensors"), "cpu").unwrap();
    let commit = format!("acme/tiny@{}", "b".repeat(40));
    for (id, want) in [
        ("acme/tiny", &main),
        ("acme/tiny@v1", &v1),
        (commit.as_str(), &v1),
    ] {
        let got = loader.load_file(id).unwrap();
        assert_eq!(got.len(), want.len(), "{id}");
        for (name, t) in want.iter() {
            assert_eq!(
                got.tensor(name).unwrap().as_bytes(),
                t.as_bytes(),
                "{id} {name}"
            );
        }
    }
    let reader = loader.reader("acme/tiny").unwrap();
    assert_eq!(reader.names().count(), main.len());
    let e = loader.load_file("acme/tiny@broken").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIndex, "{e}");
    for absent in ["acme/tiny@v9", "acme/other"] {
        let e = loader.load_file(absent).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().contains("Hugging Face cache"), "{e}");
    }
    assert_eq!(
        Loader::new("cpu")
            .load_file("acme/tiny")
            .unwrap_err()
            .kind(),
        ErrorKind::Io
    );
}
