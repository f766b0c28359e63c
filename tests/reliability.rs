//! Reliability: saves killed or interrupted at any moment, a full disk, two writers of one
//! file, many loads at once, and files that change under a load.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tensorplace::{Device, Dtype, ErrorKind, Loader, ReadMode, Tensor, Tensors};

use crate::cli::{exe, skip_without_cli};
use crate::common;

/// A checkpoint of `mib` MiB in 8 U8 tensors whose bytes all derive from `seed`.
fn big(mib: usize, seed: u64) -> Tensors {
    let mut t = Tensors::new();
    let each = (mib << 20) / 8;
    for i in 0..8 {
        let bytes = common::bytes(each, seed + i as u64);
        t.insert(
            format!("w{i}"),
            Tensor::from_bytes(Dtype::U8, vec![each], &bytes).unwrap(),
        );
    }
    t
}

fn convert(input: &Path, output: &Path) -> Child {
    Command::new(exe())
        .args(["convert", "--device", "cpu"])
        .arg(input)
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `convert` started with SIGINT and SIGTERM already blocked, as its `main` blocks them
/// first thing: a signal sent before the process reaches `main` (exec and dynamic loading
/// can outlast the test's first 20 ms on a busy machine) then waits for the clean-up thread
/// instead of ending a process in which no code of ours runs yet.
fn convert_interruptible(input: &Path, output: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe());
    cmd.args(["convert", "--device", "cpu"])
        .arg(input)
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions on a local signal set and the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            match libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    cmd.spawn().unwrap()
}

/// The temporaries beside `path` (named `.NAME.tmp-PID-…`).
fn temporaries(path: &Path) -> Vec<PathBuf> {
    let prefix = format!(".{}.tmp-", path.file_name().unwrap().to_str().unwrap());
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_str().unwrap().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: sends a signal to our own child process, which has not been waited for yet.
    unsafe { libc::kill(pid, sig) };
}

/// A 256 MiB save killed with SIGKILL at 24 moments spread over its run: afterwards the
/// target is always exactly the old file or exactly the new one, and the temporary a kill
/// leaves is removed by the next save.
#[test]
fn killed_saves_leave_the_old_or_the_new_file() {
    if skip_without_cli("killed_saves_leave_the_old_or_the_new_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, target) = (
        dir.path().join("new.safetensors"),
        dir.path().join("t.safetensors"),
    );
    tensorplace::save_file(&big(256, 1), &input, None).unwrap();
    tensorplace::save_file(&big(256, 2), &target, None).unwrap();
    let new = std::fs::read(&input).unwrap();
    let old = std::fs::read(&target).unwrap();
    // How long a whole save takes here (then the old file is put back).
    let t = Instant::now();
    assert!(convert(&input, &target).wait().unwrap().success());
    let full = t.elapsed();
    assert_eq!(std::fs::read(&target).unwrap(), new);
    tensorplace::save_file(&big(256, 2), &target, None).unwrap();
    let (mut olds, mut news, mut left) = (0, 0, 0);
    for k in 0..24u32 {
        let mut child = convert(&input, &target);
        std::thread::sleep(full.mul_f64(f64::from(k) / 20.0));
        signal(&child, libc::SIGKILL);
        child.wait().unwrap();
        let now = std::fs::read(&target).unwrap();
        if now == old {
            olds += 1;
        } else if now == new {
            news += 1;
            // Put the old file back for the next round.
            tensorplace::save_file(&big(256, 2), &target, None).unwrap();
        } else {
            panic!(
                "kill {k} after {:?}: the target is neither file",
                full.mul_f64(f64::from(k) / 20.0)
            );
        }
        left += temporaries(&target).len();
    }
    println!(
        "24 kills over a {full:?} save: {olds} left the old file, {news} the new one, {left} temporaries left behind"
    );
    assert!(olds > 0, "some kills land before the rename");
    // The next save removes what killed processes left.
    assert!(convert(&input, &target).wait().unwrap().success());
    assert_eq!(std::fs::read(&target).unwrap(), new);
    assert!(
        temporaries(&target).is_empty(),
        "{:?}",
        temporaries(&target)
    );
}

/// Ctrl-C during `convert`: status 130 (or 0 if it had finished), no partial output, no
/// temporary. With 130 the output is absent, or the new file whole where the signal came
/// after its rename.
#[test]
fn interrupted_convert_leaves_no_partial_output() {
    if skip_without_cli("interrupted_convert_leaves_no_partial_output") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    tensorplace::save_file(&big(128, 3), &input, None).unwrap();
    let want = std::fs::read(&input).unwrap();
    for k in 0..6u64 {
        let output = dir.path().join(format!("out{k}.safetensors"));
        let child = convert_interruptible(&input, &output);
        std::thread::sleep(Duration::from_millis(20 + 60 * k));
        signal(&child, libc::SIGINT);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(130) => assert!(
                !output.exists() || std::fs::read(&output).unwrap() == want,
                "{k}: a partial output: {err}"
            ),
            Some(0) => assert_eq!(std::fs::read(&output).unwrap(), want),
            other => panic!("{k}: status {other:?}: {err}"),
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(temporaries(&output).is_empty(), "{k}");
    }
}

/// Two processes saving one path at once leave one of the two files whole.
#[test]
fn two_writers_of_one_file_leave_one_whole_file() {
    if skip_without_cli("two_writers_of_one_file_leave_one_whole_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    tensorplace::save_file(&big(16, 4), &a, None).unwrap();
    tensorplace::save_file(&big(16, 5), &b, None).unwrap();
    let (wa, wb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let target = dir.path().join("t.safetensors");
    for round in 0..8 {
        let (ca, cb) = (convert(&a, &target), convert(&b, &target));
        for c in [ca, cb] {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let got = std::fs::read(&target).unwrap();
        assert!(
            got == wa || got == wb,
            "round {round}: a mix of the two files"
        );
        assert!(temporaries(&target).is_empty());
    }
}

/// A write that fails for want of space is an error, and the old file stays whole. On a
/// 1 MiB tmpfs where this machine lets us mount one; always under a file-size limit
/// (RLIMIT_FSIZE, the same failure through another door).
#[test]
fn a_full_disk_is_an_error_and_keeps_the_old_file() {
    if skip_without_cli("a_full_disk_is_an_error_and_keeps_the_old_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    tensorplace::save_file(&big(4, 6), &input, None).unwrap();
    let mut small = Tensors::new();
    small.insert("s", Tensor::from_slice(vec![4], &[1u32, 2, 3, 4]).unwrap());
    // Under a file-size limit of 64 KiB (SIGXFSZ ignored, so the write fails with EFBIG).
    let target = dir.path().join("t.safetensors");
    tensorplace::save_file(&small, &target, None).unwrap();
    let old = std::fs::read(&target).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64; exec \"$0\" convert --device cpu \"$1\" \"$2\"")
        .arg(exe())
        .arg(&input)
        .arg(&target)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), old);
    assert!(temporaries(&target).is_empty());
    // A real full filesystem, where mounting one is allowed.
    let Some(mnt) = common::Mount::new(dir.path(), "small", "tmpfs", &["size=1m"]) else {
        println!(
            "SKIPPED the tmpfs half of a_full_disk_is_an_error_and_keeps_the_old_file: mounting a 1 MiB tmpfs was refused here"
        );
        return;
    };
    let target = mnt.path().join("t.safetensors");
    tensorplace::save_file(&small, &target, None).unwrap();
    let result = Command::new(exe())
        .args(["convert", "--device", "cpu"])
        .arg(&input)
        .arg(&target)
        .output();
    let kept = std::fs::read(&target);
    let leftovers = temporaries(&target);
    let out = result.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(kept.unwrap(), old);
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// 8 threads loading the same file and different files at once, onto the CPU and wgpu (and
/// CUDA where present): the same bytes every time, and no leak. "No leak" means: after ten
/// rounds of warm-up, resident memory stays flat over 100 more rounds (within 24 MiB: the
/// allocator's fragmentation, measured at 1-3 MiB per 100 rounds), and the warm-up's plateau
/// is bounded by what a device keeps for the process: nothing on the CPU; on wgpu its device,
/// the driver's code (lavapipe and llvmpipe load LLVM) and compiled pipelines; on CUDA its
/// context and the pinned staging ring (4 x 64 MiB). Run in a child process, so that no other
/// test's memory counts.
#[test]
fn many_loads_at_once_give_the_same_bytes_and_free_their_memory() {
    let text = common::in_child(
        "reliability::many_loads_child",
        "TENSORPLACE_MANY_LOADS_CHILD",
    );
    for line in text
        .lines()
        .filter(|l| l.contains("resident") || l.starts_with("SKIPPED"))
    {
        println!("{line}");
    }
}

/// The child of `many_loads_at_once_give_the_same_bytes_and_free_their_memory`.
#[test]
#[ignore = "run as a child process by many_loads_at_once_give_the_same_bytes_and_free_their_memory"]
fn many_loads_child() {
    if std::env::var_os("TENSORPLACE_MANY_LOADS_CHILD").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(PathBuf, Tensors)> = (0..4)
        .map(|i| {
            let t = common::mixed_tensors(40 + i);
            let p = dir.path().join(format!("m{i}.safetensors"));
            tensorplace::save_file(&t, &p, None).unwrap();
            (p, t)
        })
        .collect();
    for device in common::devices("many_loads_at_once") {
        let round = |r: usize| {
            std::thread::scope(|s| {
                for k in 0..8 {
                    let (path, want) = if k % 2 == 0 {
                        &files[0]
                    } else {
                        &files[1 + k % 3]
                    };
                    s.spawn(move || {
                        let mode = if (r + k) % 3 == 0 {
                            ReadMode::Pread
                        } else {
                            ReadMode::Mmap
                        };
                        let got = Loader::new(device).read_mode(mode).load_file(path).unwrap();
                        assert_eq!(got.len(), want.len());
                        for (name, w) in want.iter() {
                            let g = got.tensor(name).unwrap();
                            assert_eq!(
                                g.host_bytes().unwrap(),
                                w.host_bytes().unwrap(),
                                "{device} {name}"
                            );
                        }
                    });
                }
            });
        };
        let start = rss();
        for r in 0..10 {
            round(r);
        }
        let warm = rss();
        for r in 10..110 {
            round(r);
        }
        let after = rss();
        println!(
            "{device}: resident memory {} MiB before the first load, {} MiB after 10 rounds, \
             {} MiB after 100 more",
            start >> 20,
            warm >> 20,
            after >> 20
        );
        let plateau: usize = match device {
            Device::Cpu => 64 << 20,
            Device::Wgpu(_) => 256 << 20,
            Device::Cuda(_) | Device::Auto => 1 << 30,
        };
        assert!(
            warm <= start + plateau,
            "{device}: warm-up plateau {start} -> {warm} bytes, over {plateau}"
        );
        assert!(
            after <= warm + (24 << 20),
            "{device}: {warm} -> {after} bytes over 100 rounds after the warm-up"
        );
    }
}

/// A file truncated during a `ReadMode::Pread` load is an I/O error, never a signal.
#[test]
fn pread_loads_survive_a_truncation_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    tensorplace::save_file(&big(64, 7), &path, None).unwrap();
    let header = {
        let raw = std::fs::read(&path).unwrap();
        8 + u64::from_le_bytes(raw[..8].try_into().unwrap())
    };
    let e = Loader::new(Device::Cpu)
        .read_mode(ReadMode::Pread)
        .progress(common::truncate_once(&path, header))
        .load_file(&path)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(e.file(), Some(path.as_path()));
    assert!(e.tensor().is_some(), "{e}");
}

/// The documented hazard of a mapped read (the default read mode): a file truncated while
/// it is read raises SIGBUS. Checked in a child process, which it kills.
#[test]
fn mapped_loads_of_a_truncated_file_raise_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "reliability::truncate_while_mapped_child",
            "--ignored",
            "--nocapture",
        ])
        .env("TENSORPLACE_TRUNCATE_CHILD", "1")
        .output()
        .unwrap();
    let status = out.status;
    assert_eq!(
        status.signal(),
        Some(libc::SIGBUS),
        "{status:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The child of `mapped_loads_of_a_truncated_file_raise_sigbus` (ignored unless run by it).
#[test]
#[ignore = "run as a child process by mapped_loads_of_a_truncated_file_raise_sigbus"]
fn truncate_while_mapped_child() {
    if std::env::var_os("TENSORPLACE_TRUNCATE_CHILD").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    tensorplace::save_file(&big(64, 8), &path, None).unwrap();
    let truncated = std::sync::atomic::AtomicBool::new(false);
    let result = Loader::new(Device::Cpu)
        .progress(|_| {
            if !truncated.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(4096).unwrap();
            }
        })
        .load_file(&path);
    println!("no signal: {:?}", result.map(|t| t.len()));
}

/// The address of a CPU tensor's first byte.
fn address(t: &Tensor) -> usize {
    t.host_bytes().unwrap().as_ptr() as usize
}

/// A load's memory, freed with its last tensor, is kept for the next load (in the same place,
/// and the bytes the new ones), and given back by `trim_host_memory`. Run in a child process:
/// the cache is the process's.
#[test]
fn freed_arenas_serve_the_next_loads() {
    common::in_child(
        "reliability::freed_arenas_child",
        "TENSORPLACE_FREED_ARENAS_CHILD",
    );
}

/// The child of `freed_arenas_serve_the_next_loads`.
#[test]
#[ignore = "run as a child process by freed_arenas_serve_the_next_loads"]
fn freed_arenas_child() {
    if std::env::var_os("TENSORPLACE_FREED_ARENAS_CHILD").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let (want_a, want_b) = (big(32, 1), big(30, 2));
    tensorplace::save_file(&want_a, &a, None).unwrap();
    tensorplace::save_file(&want_b, &b, None).unwrap();
    let same = |got: &Tensors, want: &Tensors| {
        for (name, w) in want.iter() {
            assert_eq!(
                got.tensor(name).unwrap().host_bytes().unwrap(),
                w.host_bytes().unwrap()
            );
        }
    };
    let first = tensorplace::load_file(&a, Device::Cpu).unwrap();
    let at = address(first.tensor("w0").unwrap());
    // A tensor that lives on keeps the arena from the cache.
    let kept = first.tensor("w7").unwrap().clone();
    drop(first);
    let second = tensorplace::load_file(&b, Device::Cpu).unwrap();
    assert_ne!(address(second.tensor("w0").unwrap()), at);
    same(&second, &want_b);
    drop(kept);
    // The other file, a little smaller, lands where the first load's tensors were, and
    // nothing else was kept.
    let third = tensorplace::load_file(&b, Device::Cpu).unwrap();
    assert_eq!(address(third.tensor("w0").unwrap()), at);
    assert_eq!(tensorplace::trim_host_memory(), 0);
    same(&third, &want_b);
    drop((second, third));
    assert!(tensorplace::trim_host_memory() >= 2 * (30 << 20));
    assert_eq!(tensorplace::trim_host_memory(), 0);
}
