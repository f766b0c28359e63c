//! The benchmark harness behind `tensorplace bench` and `cargo bench --bench load`: every
//! device's load against its baselines and its ceiling, timed in the same run, alternating
//! their order, as the median of several runs (minimum and maximum shown).
//!
//! `measure` times a group; `synthetic` writes the files; `cpu`, `cuda` and
//! `wgpu` hold each device's baselines and ceilings, beside the harness and out of the
//! backends; `checkpoint` the sharded, tensor-parallel and opening groups.
//!
//! Throughput is the file's data bytes over seconds, in GB/s (10^9 bytes). Each timed run
//! ends only when the device has finished (backends synchronize before returning) and frees
//! what it placed before the next run.

mod checkpoint;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod measure;
mod synthetic;
#[cfg(feature = "wgpu")]
mod wgpu;

use std::path::{Path, PathBuf};
use std::time::Instant;

use tensorplace::internals::{HostFile, list_devices};
use tensorplace::{Device, Dtype, Error, ErrorKind, ReadMode, Result};

use measure::median;
pub use measure::{BenchPath, Group, Role, Row, drop_cache, measure, table};
use synthetic::MIX;

/// Prints to stdout; a failure (a closed pipe) is an error that keeps its cause, so that the
/// caller can end quietly.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| Error::io("writing to stdout", None, e))
    }};
}
pub use synthetic::{Synthetic, synthetic_tensors, write_synthetic};

/// Command-line arguments of the harness.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A safetensors file to load; without it a synthetic checkpoint is written.
    pub file: Option<PathBuf>,
    /// Devices to measure (repeatable); default: every one present.
    #[arg(long = "device", short = 'd')]
    pub devices: Vec<Device>,
    /// Size of the synthetic checkpoint (such as 1GiB, 512MiB, 2e9).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Number of tensors of the synthetic checkpoint.
    #[arg(long, default_value_t = 300)]
    pub tensors: usize,
    /// Dtype of the synthetic tensors; default: a mix of F32, BF16, F16, I64, U8, F8_E4M3.
    #[arg(long)]
    pub dtype: Option<Dtype>,
    /// Timed runs per path (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Drop the file from the page cache before each run (posix_fadvise DONTNEED).
    #[arg(long)]
    pub cold: bool,
    /// Also write the figures to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Instead of the comparison, sweep sizes (16 MiB up to --size) and tensor counts
    /// (10 to 100,000 at a fixed size) for our load on each device.
    #[arg(long)]
    pub sweep: bool,
    /// Instead of the single-file comparison, time checkpoints: 8 shard files against the
    /// same tensors in one file, a tensor-parallel part (1 of 8) against the whole, and
    /// opening 100 shards of 100,000 tensors against parsing their headers with the
    /// `safetensors` crate (FILE may be a checkpoint folder: then it is the sharded one).
    #[arg(long)]
    pub checkpoint: bool,
    /// Ignored: `cargo bench` passes it to every harness.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// Parses sizes such as `1GiB`, `512MiB`, `100MB`, `4096`, `2e9`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown unit {u:?} in {s:?}")),
    };
    let bytes = value * mult;
    if !(0.0..1.8e19).contains(&bytes) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// The machine, for the JSON report.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "devices": list_devices(),
    })
}

/// Which devices to measure: those asked for, or every one present.
fn devices(args: &BenchArgs) -> Result<Vec<(Device, Option<String>)>> {
    if !args.devices.is_empty() {
        return args
            .devices
            .iter()
            .map(|&d| {
                let skip = d.probe().err().map(|e| e.to_string());
                Ok((d, skip))
            })
            .collect();
    }
    let mut out = vec![(Device::Cpu, None)];
    for d in [Device::Cuda(0), Device::Wgpu(None)] {
        out.push((d, d.probe().err().map(|e| e.to_string())));
    }
    Ok(out)
}

/// A sequential read of the whole file through one reused 8 MiB buffer: with `--cold`, the
/// disk's sequential read speed, the ceiling of every cold load.
pub fn disk_read_path(path: &Path) -> BenchPath<'_> {
    BenchPath::new(
        "sequential buffered read of the file",
        Role::Ceiling,
        move || {
            use std::io::Read;
            let mut f =
                std::fs::File::open(path).map_err(|e| Error::io("opening", Some(path), e))?;
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(|e| Error::io("reading", Some(path), e))?;
                if n == 0 {
                    return Ok(());
                }
                std::hint::black_box(&buf[..n]);
            }
        },
    )
}

/// A plain sequential read of the whole file with `O_DIRECT` (8 MiB aligned requests, one
/// at a time): with `--cold`, what the disk gives a reader past the page cache, the ceiling
/// the cold loads are measured against.
pub fn direct_read_path(path: &Path) -> BenchPath<'_> {
    BenchPath::new(
        "sequential O_DIRECT read of the file (ceiling)",
        Role::Ceiling,
        move || {
            use std::os::unix::fs::FileExt;
            let f = tensorplace::internals::open_direct(path)
                .map_err(|e| Error::io("opening with O_DIRECT", Some(path), e))?;
            let mut buf = tensorplace::internals::HostBuffer::page_aligned(8 << 20)?;
            let mut at = 0u64;
            loop {
                let n = f
                    .read_at(buf.as_mut_bytes(), at)
                    .map_err(|e| Error::io("reading with O_DIRECT", Some(path), e))?;
                std::hint::black_box(&buf.as_bytes()[..n]);
                if n < buf.len() {
                    return Ok(());
                }
                at += n as u64;
            }
        },
    )
}

/// With `--cold`, puts the disk's sequential reads first in `group`: the `O_DIRECT` one (the
/// ceiling the ratios use), then the buffered one.
pub(crate) fn with_disk_ceiling<'a>(mut group: Group<'a>, path: &'a Path, cold: bool) -> Group<'a> {
    if cold {
        group.paths.insert(0, disk_read_path(path));
        group.paths.insert(0, direct_read_path(path));
    }
    group
}

#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
fn device_groups<'a>(d: Device, path: &'a Path, cold: bool) -> Result<Vec<Group<'a>>> {
    match d {
        Device::Cpu | Device::Auto => Ok(vec![]),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::group(i, path).map(|g| vec![with_disk_ceiling(g, path, cold)]),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(i) => wgpu::group(i, path).map(|g| vec![with_disk_ceiling(g, path, cold)]),
        #[allow(unreachable_patterns)]
        other => Err(Error::new(
            ErrorKind::DeviceUnavailable,
            format!("{other}: not compiled in"),
        )),
    }
}

/// Runs the harness as the command line asked; prints the table (and writes the JSON).
pub fn run(args: &BenchArgs) -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("creating a temporary folder", None, e))?;
    let path = match &args.file {
        Some(p) => p.clone(),
        None => {
            let p = dir.path().join("bench.safetensors");
            let spec = Synthetic {
                size: args.size,
                tensors: args.tensors,
                dtypes: args.dtype.map_or(MIX.to_vec(), |d| vec![d]),
            };
            write_synthetic(&p, &spec)?;
            p
        }
    };
    if args.sweep {
        return sweep(args, dir.path());
    }
    if args.checkpoint || tensorplace::internals::is_multi_file(&path) {
        return checkpoints(args, &path, dir.path());
    }
    let bytes = announce(args, &path)?;
    let cold = args.cold.then_some(path.as_path());
    let out = dir.path().join("saved.safetensors");
    let mut report = Report::default();
    for (d, skip) in devices(args)? {
        if let Some(reason) = skip {
            report.skip(d, &reason)?;
            continue;
        }
        let groups = if d == Device::Cpu {
            Ok(cpu::groups(&path, &out, args.cold))
        } else {
            device_groups(d, &path, args.cold)
        };
        match groups {
            Ok(groups) => {
                for g in groups {
                    report.measure(g, bytes, args.runs, cold)?;
                }
            }
            Err(e) => report.skip(d, &e.to_string())?,
        }
        // Cold files of many small tensors, where direct reads must not cost a request each.
        if d == Device::Cpu && args.cold {
            for (label, small, bytes) in cpu::small_tensor_files(dir.path())? {
                say!("file: {} ({label}, {bytes} data bytes)", small.display())?;
                let group = cpu::small_tensor_group(label, &small);
                report.measure(group, bytes, args.runs, Some(&small))?;
            }
        }
    }
    let input = serde_json::json!({"path": path, "data_bytes": bytes, "runs": args.runs, "cold": args.cold});
    report.finish(args, ("file", input))
}

/// Says what the single-file comparison measures (the file, its size, the runs, warm or
/// cold: a refused `posix_fadvise` said too), and returns the file's data bytes.
fn announce(args: &BenchArgs, path: &Path) -> Result<u64> {
    let file = HostFile::open(path, ReadMode::Mmap)?;
    let bytes = file.header().data_len() as u64;
    say!(
        "file: {} ({} tensors, {} data bytes); {} runs after a warm-up, page cache {}",
        path.display(),
        file.header().tensors().len(),
        bytes,
        args.runs,
        if args.cold {
            "dropped before each run (posix_fadvise DONTNEED)"
        } else {
            "warm"
        }
    )?;
    drop(file);
    if args.cold && !drop_cache(path) {
        say!("note: posix_fadvise(DONTNEED) was refused: the runs are not cold")?;
    }
    Ok(bytes)
}

/// What a harness run gathers: the rows measured, and the devices skipped with the reason.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    skipped: Vec<serde_json::Value>,
}

impl Report {
    /// Records (and prints) a device left out, and why.
    fn skip(&mut self, device: Device, reason: &str) -> Result<()> {
        self.skipped
            .push(serde_json::json!({"device": device.to_string(), "reason": reason}));
        say!("skipped {device}: {reason}")
    }

    /// Times `group` (see [`measure`]), prints its table and keeps its rows.
    fn measure(
        &mut self,
        mut group: Group<'_>,
        bytes: u64,
        runs: usize,
        cold: Option<&Path>,
    ) -> Result<()> {
        let rows = measure(&mut group, bytes, runs, cold);
        say!("{}", table(&rows).trim_end())?;
        self.rows.extend(rows);
        Ok(())
    }

    /// Prints every row in one table and, with `--json`, writes the report: the date, the
    /// machine, what was measured (`input`, under its key), the rows and the devices skipped.
    fn finish(self, args: &BenchArgs, (key, input): (&str, serde_json::Value)) -> Result<()> {
        say!("\n{}", table(&self.rows))?;
        let Some(json) = &args.json else {
            return Ok(());
        };
        let report = serde_json::json!({
            "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            "machine": machine(),
            key: input,
            "results": self.rows,
            "skipped": self.skipped,
        });
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        std::fs::write(json, text).map_err(|e| Error::io("writing", Some(json), e))?;
        say!("wrote {}", json.display())
    }
}

/// The checkpoint groups (see [`BenchArgs::checkpoint`]): `input` is the synthetic file, or
/// the user's checkpoint folder.
fn checkpoints(args: &BenchArgs, input: &Path, tmp: &Path) -> Result<()> {
    let (one, sharded) = if tensorplace::internals::is_multi_file(input) {
        let one = tmp.join("one.safetensors");
        tensorplace::save_file(&tensorplace::load_file(input, Device::Cpu)?, &one, None)?;
        (one, input.to_path_buf())
    } else {
        let sharded = tmp.join("sharded");
        std::fs::create_dir_all(&sharded).map_err(|e| Error::io("creating", Some(&sharded), e))?;
        checkpoint::write_sharded(input, &sharded, 8)?;
        (input.to_path_buf(), sharded)
    };
    let ckpt = tensorplace::open(&sharded)?;
    let bytes = ckpt.data_len();
    say!(
        "checkpoint: {} ({} files, {} tensors, {} data bytes) against {}; {} runs after a warm-up, page cache warm",
        sharded.display(),
        ckpt.files().len(),
        ckpt.len(),
        bytes,
        one.display(),
        args.runs
    )?;
    if args.cold {
        say!("note: --cold is not applied to the checkpoint groups")?;
    }
    let mut report = Report::default();
    for (d, skip) in devices(args)? {
        if let Some(reason) = skip {
            report.skip(d, &reason)?;
            continue;
        }
        for g in checkpoint::groups(d, &one, &sharded) {
            report.measure(g, bytes, args.runs, None)?;
        }
    }
    let many = tmp.join("many");
    std::fs::create_dir_all(&many).map_err(|e| Error::io("creating", Some(&many), e))?;
    checkpoint::write_many(&many, 100, 1000)?;
    let opened = tensorplace::open(&many)?;
    let header_bytes: u64 = opened
        .files()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum::<u64>()
        - opened.data_len();
    say!(
        "opening: {} files, {} tensors, {header_bytes} header bytes",
        opened.files().len(),
        opened.len()
    )?;
    report.measure(
        checkpoint::open_group(&many)?,
        header_bytes,
        args.runs,
        None,
    )?;
    let input = serde_json::json!({"path": sharded, "one_file": one, "data_bytes": bytes, "runs": args.runs});
    report.finish(args, ("checkpoint", input))
}

/// Load time against size and against tensor count, for our load on each device.
fn sweep(args: &BenchArgs, dir: &Path) -> Result<()> {
    let mut devs = Vec::new();
    for (d, skip) in devices(args)? {
        match skip {
            Some(reason) => say!("skipped {d}: {reason}")?,
            None => devs.push(d),
        }
    }
    let dtypes = args.dtype.map_or(MIX.to_vec(), |d| vec![d]);
    say!(
        "{:<8} {:>12} {:>9} {:>12} {:>9} {:>14}",
        "device",
        "bytes",
        "tensors",
        "ms median",
        "GB/s",
        "us per tensor"
    )?;
    let p = dir.join("sweep.safetensors");
    for (size, n) in sweep_cases(args.size) {
        write_synthetic(
            &p,
            &Synthetic {
                size,
                tensors: n,
                dtypes: dtypes.clone(),
            },
        )?;
        let bytes = HostFile::open(&p, ReadMode::Mmap)?.header().data_len();
        for &d in &devs {
            let s = time_load(&p, d, bytes as u64, args.runs)?;
            say!(
                "{:<8} {:>12} {:>9} {:>12.3} {:>9.3} {:>14.3}",
                d.to_string(),
                bytes,
                n,
                s * 1e3,
                bytes as f64 / s / 1e9,
                s * 1e6 / n as f64
            )?;
        }
    }
    Ok(())
}

/// The sweep's (size, tensors) cases: 64 tensors from 16 MiB doubling up to `max`, then 10
/// to 100,000 tensors of 64 MiB in all.
fn sweep_cases(max: u64) -> Vec<(u64, usize)> {
    let mut cases = Vec::new();
    let mut size = 16u64 << 20;
    while size <= max.max(16 << 20) {
        cases.push((size, 64usize));
        size *= 2;
    }
    for n in [10usize, 100, 1_000, 10_000, 100_000] {
        cases.push((64 << 20, n));
    }
    cases
}

/// The median seconds of `runs` loads of `p` onto `d` (after one warm-up), each as every
/// other timing starts: no dirty pages (the file was just written), memory primed.
fn time_load(p: &Path, d: Device, bytes: u64, runs: usize) -> Result<f64> {
    let mut v = Vec::new();
    for i in 0..=runs.max(1) {
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        measure::prime_memory(bytes);
        let t = Instant::now();
        let loaded = tensorplace::load_file(p, d)?;
        drop(loaded);
        if i > 0 {
            v.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(&mut v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("2e9").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
    }
}
