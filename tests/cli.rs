//! The `tensorplace` command line: its outputs, exit codes and files.

use std::process::{Command, Output};
use tensorplace::internals::Conversion;

use crate::common;

/// The binary: the one `TENSORPLACE_BIN` names (set by a script that carries the tests to
/// another machine), else the one cargo built beside this test (the workspace's
/// `tensorplace-cli` crate: `cargo test` builds it with the library's tests).
pub fn exe() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TENSORPLACE_BIN") {
        return p.into();
    }
    // target/<profile>/deps/integration-HASH → target/<profile>/tensorplace
    let me = std::env::current_exe().unwrap_or_default();
    let profile = me.parent().and_then(|deps| deps.parent());
    profile.map_or_else(Default::default, |dir| {
        dir.join(format!("tensorplace{}", std::env::consts::EXE_SUFFIX))
    })
}

/// Whether the binary is missing (test binaries carried to another machine without
/// `TENSORPLACE_BIN` set): then the test says so and skips.
pub fn skip_without_cli(test: &str) -> bool {
    let missing = !exe().exists();
    if missing {
        println!(
            "SKIPPED {test}: no tensorplace binary at {} (set TENSORPLACE_BIN)",
            exe().display()
        );
    }
    missing
}

/// The command-line binary run with `args` (wgpu's runtime directory set).
pub fn run(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .env(
            "XDG_RUNTIME_DIR",
            std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()),
        )
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The keys of `inspect --json`, for a file and a checkpoint alike.
const JSON_KEYS: [&str; 8] = [
    "path",
    "metadata",
    "index_metadata",
    "total_size",
    "tensor_count",
    "data_bytes",
    "files",
    "tensors",
];

#[test]
fn inspect_json_matches_what_python_wrote() {
    if skip_without_cli("inspect_json_matches_what_python_wrote") {
        return;
    }
    let expected = crate::format::expected();
    for (name, want) in expected.as_object().unwrap() {
        let path = common::fixtures().join(name);
        let out = run(&["inspect", path.to_str().unwrap(), "--json", "--hash"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out).lines().count(), 1, "one object");
        let mut got: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(got["metadata"], want["metadata"]);
        let keys: Vec<_> = got.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, JSON_KEYS);
        assert_eq!(got["files"].as_array().unwrap().len(), 1);
        assert_eq!(got["files"][0]["file"], path.to_str().unwrap());
        assert_eq!(
            got["tensor_count"],
            want["tensors"].as_array().unwrap().len()
        );
        // Each tensor names its file; the rest is what Python wrote.
        for t in got["tensors"].as_array_mut().unwrap() {
            assert_eq!(t["file"], path.to_str().unwrap());
            t.as_object_mut().unwrap().shift_remove("file");
        }
        assert_eq!(got["tensors"], want["tensors"], "{name}");
        let plain = run(&["inspect", path.to_str().unwrap(), "--json"]);
        let plain: serde_json::Value = serde_json::from_str(&stdout(&plain)).unwrap();
        assert!(plain["tensors"][0].get("sha256").is_none());
        let text = run(&["inspect", path.to_str().unwrap()]);
        assert!(text.status.success());
        assert!(stdout(&text).contains(want["tensors"][0]["name"].as_str().unwrap()));
    }
}

#[test]
fn invalid_input_exits_2_with_one_line_naming_the_file() {
    if skip_without_cli("invalid_input_exits_2_with_one_line_naming_the_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    let json = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(&bad, bytes).unwrap();
    let out_file = dir.path().join("out.safetensors");
    let b = bad.to_str().unwrap();
    let missing = dir.path().join("missing.safetensors");
    for args in [
        vec!["inspect", b],
        vec!["inspect", b, "--json", "--hash"],
        vec!["load", b, "--device", "cpu"],
        vec!["convert", b, out_file.to_str().unwrap()],
        vec!["load", missing.to_str().unwrap(), "--device", "cpu"],
        vec!["load", b, "--device", "tpu"],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        if args[1] == b && !args.contains(&"tpu") {
            assert!(
                err.contains("bad.safetensors") && err.contains("\"w\""),
                "{err}"
            );
        }
        assert!(stdout(&out).is_empty() || args[0] == "load", "{args:?}");
    }
    assert!(!out_file.exists(), "no partial output");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn convert_round_trips_byte_identically_and_casts() {
    if skip_without_cli("convert_round_trips_byte_identically_and_casts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in ["numpy_all.safetensors", "rust_writer_all.safetensors"] {
        let input = common::fixtures().join(name);
        let output = dir.path().join(name);
        let out = run(&["convert", input.to_str().unwrap(), output.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            std::fs::read(&output).unwrap(),
            std::fs::read(&input).unwrap(),
            "{name}"
        );
    }
    let input = common::fixtures().join("numpy_all.safetensors");
    let output = dir.path().join("f16.safetensors");
    let original = tensorplace::load_file(&input, "cpu").unwrap();
    for device in common::devices("convert_round_trips_byte_identically_and_casts") {
        let dev = device.to_string();
        let convert = |dtype: &str| {
            run(&[
                "convert",
                input.to_str().unwrap(),
                output.to_str().unwrap(),
                "--dtype",
                dtype,
                "--device",
                &dev,
            ])
        };
        // Every float of numpy_all (F64, F32, F16) to F16, as the CPU reference converts.
        let out = convert("F16");
        assert!(out.status.success(), "{dev}: {}", stderr(&out));
        let back = tensorplace::load_file(&output, "cpu").unwrap();
        for (name, t) in original.iter() {
            let got = back.tensor(name).unwrap();
            if Conversion::between(t.dtype(), tensorplace::Dtype::F16).is_some() {
                assert_eq!(got.dtype(), tensorplace::Dtype::F16, "{name}");
            }
            let want = common::cast(t, tensorplace::Dtype::F16);
            assert_eq!(got.host_bytes().unwrap()[..], want[..], "{dev}: {name}");
        }
        std::fs::remove_file(&output).unwrap();
        // F64 has no conversion to F8: a clear error naming it, no file.
        let out = convert("F8_E5M2");
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains("F64"), "{}", stderr(&out));
        assert!(!output.exists());
    }
    let bf16 = dir.path().join("bf16.safetensors");
    let mut t = tensorplace::Tensors::new();
    t.insert(
        "a",
        tensorplace::Tensor::from_bytes(
            tensorplace::Dtype::BF16,
            vec![3],
            &[0x80, 0x3F, 0, 0x40, 0xC0, 0x7F],
        )
        .unwrap(),
    );
    t.insert(
        "i",
        tensorplace::Tensor::from_slice(vec![1], &[7i64]).unwrap(),
    );
    tensorplace::save_file(&t, &bf16, None).unwrap();
    let out = run(&[
        "convert",
        bf16.to_str().unwrap(),
        output.to_str().unwrap(),
        "--dtype",
        "F32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let back = tensorplace::load_file(&output, "cpu").unwrap();
    let a = back.tensor("a").unwrap();
    assert_eq!(a.dtype(), tensorplace::Dtype::F32);
    let v = a.to_vec::<f32>().unwrap();
    assert_eq!(&v[..2], &[1.0, 2.0]);
    assert!(v[2].is_nan());
    assert_eq!(back.tensor("i").unwrap().to_vec::<i64>().unwrap(), [7]);
}

#[test]
fn load_verifies_on_every_device_and_devices_lists_the_cpu() {
    if skip_without_cli("load_verifies_on_every_device_and_devices_lists_the_cpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    tensorplace::save_file(&common::mixed_tensors(4), &path, None).unwrap();
    // Only dtypes with a conversion to F32 (or none to make).
    let cast = dir.path().join("cast.safetensors");
    let mut t = tensorplace::Tensors::new();
    for (name, tensor) in common::mixed_tensors(4).iter() {
        use tensorplace::Dtype::*;
        if matches!(
            tensor.dtype(),
            BF16 | F16 | F8_E4M3 | F8_E5M2 | F32 | I32 | U8 | BOOL
        ) {
            t.insert(name, tensor.clone());
        }
    }
    tensorplace::save_file(&t, &cast, None).unwrap();
    for device in common::devices("load_verifies_on_every_device") {
        let dev = device.to_string();
        let out = run(&["load", path.to_str().unwrap(), "--device", &dev, "--verify"]);
        assert!(out.status.success(), "{dev}: {}", stderr(&out));
        let s = stdout(&out);
        assert!(s.contains("GB/s") && s.contains("verified"), "{s}");
        let out = run(&[
            "load",
            cast.to_str().unwrap(),
            "--device",
            &dev,
            "--verify",
            "--pread",
            "--dtype",
            "F32",
        ]);
        assert!(out.status.success(), "{dev}: {}", stderr(&out));
        assert!(stdout(&out).contains("verified"));
    }
    let out = run(&["devices"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("cpu:"));
}

/// A reader that goes away (`| head`) ends every printing command quietly: status 0, no
/// panic, no backtrace.
#[test]
fn a_closed_stdout_ends_quietly() {
    if skip_without_cli("a_closed_stdout_ends_quietly") {
        return;
    }
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut many = tensorplace::Tensors::new();
    for i in 0..20_000 {
        many.insert(
            format!("a.rather.long.tensor.name.to.fill.the.pipe.{i:05}"),
            tensorplace::Tensor::from_slice(vec![1], &[i as u32]).unwrap(),
        );
    }
    tensorplace::save_file(&many, &path, None).unwrap();
    let p = path.to_str().unwrap();
    for args in [
        vec!["inspect", p],
        vec!["inspect", p, "--json"],
        vec!["devices"],
    ] {
        let mut child = Command::new(exe())
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn checkpoints_inspect_load_slice_and_convert_as_folders() {
    if skip_without_cli("checkpoints_inspect_load_slice_and_convert_as_folders") {
        return;
    }
    let sharded = common::fixtures().join("sharded");
    let dir_arg = sharded.to_str().unwrap();
    // inspect: the checkpoint's summary, then each file; JSON with every file.
    let out = run(&["inspect", dir_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("4 files, 29 tensors, 180612 data bytes (index total_size 180612)"),
        "{text}"
    );
    assert!(
        text.contains("model.layers.2.extra.cube\tF64\t[4, 6, 5]"),
        "{text}"
    );
    let index = sharded.join("model.safetensors.index.json");
    let out = run(&["inspect", "--json", index.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, JSON_KEYS);
    assert_eq!(v["files"].as_array().unwrap().len(), 4);
    assert_eq!(v["tensor_count"], 29);
    assert_eq!(v["data_bytes"], 180612);
    assert_eq!(v["total_size"], 180612);
    // Every tensor, each with its shard, and the shards' counts adding up.
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 29);
    let files: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file"].as_str().unwrap())
        .collect();
    assert!(
        tensors
            .iter()
            .all(|t| files.contains(&t["file"].as_str().unwrap()))
    );
    let counted: u64 = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["tensor_count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 29);
    let cube = tensors
        .iter()
        .find(|t| t["name"] == "model.layers.2.extra.cube")
        .unwrap();
    assert_eq!(cube["dtype"], "F64");
    assert_eq!(cube["shape"], serde_json::json!([4, 6, 5]));
    // load: every device, verified; slices alone.
    for device in common::devices("checkpoints_inspect_load_slice_and_convert") {
        let dev = device.to_string();
        let out = run(&["load", dir_arg, "--device", &dev, "--verify"]);
        assert!(out.status.success(), "{dev}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("loaded 29 tensors, 180612 bytes"),
            "{}",
            stdout(&out)
        );
        let out = run(&[
            "load",
            dir_arg,
            "--device",
            &dev,
            "--slice",
            "model.embed_tokens.weight[0:16, :]",
            "--slice",
            "model.layers.1.mlp.down_proj.weight[:, 90:96]",
            "--dtype",
            "F32",
            "--verify",
        ]);
        assert!(out.status.success(), "{dev}: {}", stderr(&out));
        // 16 x 48 BF16 and 48 x 6 F32, as F32.
        let want = (16 * 48 + 48 * 6) * 4;
        assert!(
            stdout(&out).contains(&format!("loaded 2 tensors, {want} bytes")),
            "{}",
            stdout(&out)
        );
    }
    let out = run(&[
        "load",
        dir_arg,
        "--device",
        "cpu",
        "--slice",
        "model.norm.weight[48]",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("model.norm.weight"),
        "{}",
        stderr(&out)
    );
    // convert DIR OUT_DIR: the same shards, cast, and an index written last.
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("f16");
    let out = run(&[
        "convert",
        dir_arg,
        target.to_str().unwrap(),
        "--dtype",
        "F16",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = tensorplace::open(&sharded).unwrap();
    let after = tensorplace::open(&target).unwrap();
    // The same tensors in the same files (save_file orders each file's tensors its way).
    for entry in before.iter() {
        let moved = after.tensor(entry.name).unwrap();
        assert_eq!(
            moved.file.file_name(),
            entry.file.file_name(),
            "{}",
            entry.name
        );
        assert_eq!(moved.shape, entry.shape);
    }
    assert_eq!(after.len(), before.len());
    let names = |c: &tensorplace::Checkpoint| -> Vec<String> {
        c.files()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&after), names(&before));
    assert_eq!(after.total_size(), Some(after.data_len()));
    let index_time = std::fs::metadata(target.join(tensorplace::INDEX_NAME))
        .unwrap()
        .modified()
        .unwrap();
    for f in after.files() {
        assert!(std::fs::metadata(f).unwrap().modified().unwrap() <= index_time);
        assert_eq!(after.file_metadata(f).unwrap()["format"], "pt");
    }
    let original = tensorplace::load_file(&sharded, "cpu").unwrap();
    let converted = tensorplace::load_file(&target, "cpu").unwrap();
    for (name, t) in original.iter() {
        let want = common::cast(t, tensorplace::Dtype::F16);
        assert_eq!(
            converted.tensor(name).unwrap().host_bytes().unwrap()[..],
            want[..],
            "{name}"
        );
    }
}

/// `tensorplace load` of a checkpoint of 1,100 shards (no index: every `*.safetensors` of
/// the folder) under a soft limit of 1,024 open files: the tool raises its soft limit to the
/// hard one, since a load keeps a descriptor per shard open. Skips where the hard limit is too
/// low to show it.
#[test]
fn load_of_more_shards_than_the_soft_open_file_limit() {
    let test = "load_of_more_shards_than_the_soft_open_file_limit";
    if skip_without_cli(test) {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    if limit.rlim_max < 2048 {
        println!(
            "SKIPPED {test}: the hard open-file limit is {}",
            limit.rlim_max
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for k in 0..1100u64 {
        let mut t = tensorplace::Tensors::new();
        t.insert(
            format!("w{k:04}"),
            tensorplace::Tensor::from_bytes(
                tensorplace::Dtype::U8,
                vec![64],
                &common::bytes(64, k),
            )
            .unwrap(),
        );
        tensorplace::save_file(
            &t,
            dir.path().join(format!("part-{k:04}.safetensors")),
            None,
        )
        .unwrap();
    }
    let mut cmd = Command::new(exe());
    cmd.args([
        "load",
        dir.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--verify",
    ]);
    // SAFETY: setrlimit only changes the child's own limit, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
            l.rlim_cur = 1024;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1100 tensors"), "{text}");
    assert!(text.contains("verified"), "{text}");
}

/// `convert IN OUT --max-shard-size`: a file and a checkpoint written as the Hub's shards
/// (each shard at most the size, the index naming every tensor), which load back as the
/// input; a size that does not parse exits 2.
#[test]
fn convert_writes_shards_of_a_size() {
    if skip_without_cli("convert_writes_shards_of_a_size") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sharded = common::fixtures().join("sharded");
    let single = common::fixtures().join("numpy_all.safetensors");
    for (k, (input, size, max)) in [(single, "300", 300), (sharded, "20KB", 20_000)]
        .iter()
        .enumerate()
    {
        let output = dir.path().join(format!("out{k}"));
        let out = run(&[
            "convert",
            input.to_str().unwrap(),
            output.to_str().unwrap(),
            "--max-shard-size",
            size,
            "--device",
            "cpu",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let want = tensorplace::load_file(input, "cpu").unwrap();
        let ckpt = tensorplace::open(&output).unwrap();
        assert_eq!(ckpt.total_size(), Some(want.total_bytes() as u64));
        assert!(ckpt.files().len() > 1);
        for file in ckpt.files() {
            let shard = tensorplace::load_file(file, "cpu").unwrap();
            assert!(
                shard.total_bytes() <= *max || shard.len() == 1,
                "{}",
                file.display()
            );
        }
        let back = tensorplace::load_file(&output, "cpu").unwrap();
        assert_eq!(back.len(), want.len());
        for (name, t) in want.iter() {
            assert_eq!(
                back.tensor(name).unwrap().as_bytes(),
                t.as_bytes(),
                "{name}"
            );
        }
    }
    let out = run(&["convert", "a", "b", "--max-shard-size", "5XB"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// A FILE that is a repository id loads from the cache `HF_HUB_CACHE` names.
#[test]
fn files_may_be_repository_ids_of_the_hugging_face_cache() {
    if skip_without_cli("files_may_be_repository_ids_of_the_hugging_face_cache") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = crate::checkpoints::hub_cache(dir.path());
    let out = Command::new(exe())
        .args(["load", "acme/tiny@v1", "--device", "cpu", "--verify"])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("verified"), "{}", stdout(&out));
    let out = Command::new(exe())
        .args(["inspect", "acme/tiny"])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("4 files, 29 tensors"),
        "{}",
        stdout(&out)
    );
}
