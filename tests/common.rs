//! Helpers shared by the test modules.

use std::path::{Path, PathBuf};

use tensorplace::{Device, Dtype, Tensor, Tensors};

/// The project's root: where it was built, or, for test binaries carried to another
/// machine by a packing script, the current folder (the project's root there).
pub fn root() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").is_dir() {
        built.to_path_buf()
    } else {
        std::env::current_dir().unwrap()
    }
}

/// The fixtures folder.
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// Every device to test on: the CPU, and each GPU backend that is compiled in and present.
/// Those absent are reported, with the reason, on stdout (`--nocapture` shows it).
pub fn devices(test: &str) -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    for d in [Device::Cuda(0), Device::Wgpu(None)] {
        match d.probe() {
            Ok(d) => out.push(d),
            Err(e) => println!("SKIPPED {test} on {d}: {e}"),
        }
    }
    out
}

/// A file system mounted for a test (where this process may mount: root), unmounted when
/// dropped, a failed assertion included.
pub struct Mount(PathBuf);

impl Mount {
    /// Mounts a `fstype` with `options` at a new folder `name` in `parent`; `None` where
    /// mounting is refused.
    pub fn new(parent: &Path, name: &str, fstype: &str, options: &[&str]) -> Option<Mount> {
        let at = parent.join(name);
        std::fs::create_dir(&at).ok()?;
        let mut cmd = std::process::Command::new("mount");
        cmd.args(["-t", fstype]);
        if !options.is_empty() {
            cmd.args(["-o", &options.join(",")]);
        }
        let ok = cmd
            .arg(fstype)
            .arg(&at)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(Mount(at))
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The bytes of `t` as a load casting floating tensors to `to` gives them: converted by the
/// CPU reference where there is a conversion, unchanged where not.
pub fn cast(t: &Tensor, to: Dtype) -> Vec<u8> {
    let bytes = t.host_bytes().unwrap();
    match tensorplace::internals::Conversion::between(t.dtype(), to) {
        Some(c) => {
            let mut out = vec![0u8; c.output_len(bytes.len()).unwrap()];
            c.convert(&bytes, &mut out);
            out
        }
        None => bytes.into_owned(),
    }
}

/// A progress callback that truncates `path` to `len` bytes the first time it runs: a read
/// failure injected mid-load.
pub fn truncate_once(path: &Path, len: u64) -> impl Fn(tensorplace::Progress) + Sync + '_ {
    let done = std::sync::atomic::AtomicBool::new(false);
    move |_| {
        if !done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(len).unwrap();
        }
    }
}

/// Runs the ignored test `test` of this binary in a child process with `env` set (so that
/// no other test's memory or reads count), asserts that it passed, and returns its stdout.
pub fn in_child(test: &str, env: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--ignored", "--nocapture"])
        .env(env, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 passed"), "{text}");
    text
}

/// Pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// A mixed set of host tensors: every dtype, odd sizes, a scalar, empty tensors, non-ASCII names.
pub fn mixed_tensors(seed: u64) -> Tensors {
    let mut t = Tensors::new();
    for (i, d) in Dtype::ALL.into_iter().enumerate() {
        // Element counts that keep sub-byte types whole: multiples of 4 (F4 and F6).
        let shape = match i % 4 {
            0 => vec![4 * (i + 1)],
            1 => vec![3, 4, 1 + i % 3 * 4],
            2 => vec![4 * (2 * i + 1) + 4],
            _ => vec![2, 2 * (i + 3)],
        };
        let numel: usize = shape.iter().product();
        let len = d.bytes_for(numel).unwrap();
        let data = bytes(len, seed + i as u64);
        t.insert(
            format!("t{i:02}.{}", d.name().to_lowercase()),
            Tensor::from_bytes(d, shape, &data).unwrap(),
        );
    }
    t.insert(
        "scalar",
        Tensor::from_bytes(Dtype::F64, vec![], &bytes(8, seed ^ 7)).unwrap(),
    );
    t.insert(
        "empty",
        Tensor::from_bytes(Dtype::F32, vec![0, 5], &[]).unwrap(),
    );
    t.insert(
        "ünï/名前",
        Tensor::from_bytes(Dtype::BF16, vec![3], &bytes(6, seed ^ 9)).unwrap(),
    );
    t.insert(
        "big_f32",
        Tensor::from_bytes(Dtype::F32, vec![1000, 77], &bytes(308_000, seed ^ 11)).unwrap(),
    );
    t.insert(
        "odd_bf16",
        Tensor::from_bytes(Dtype::BF16, vec![1001], &bytes(2002, seed ^ 13)).unwrap(),
    );
    t.insert(
        "odd_f16",
        Tensor::from_bytes(Dtype::F16, vec![7, 11], &bytes(154, seed ^ 17)).unwrap(),
    );
    t.insert(
        "odd_f8",
        Tensor::from_bytes(Dtype::F8_E4M3, vec![1003], &bytes(1003, seed ^ 19)).unwrap(),
    );
    t.insert(
        "odd_f8b",
        Tensor::from_bytes(Dtype::F8_E5M2, vec![5], &bytes(5, seed ^ 23)).unwrap(),
    );
    t
}
