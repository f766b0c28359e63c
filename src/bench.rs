//! The benchmark harness behind `tensorplace bench` and `cargo bench --bench load`: every
//! device's load against its baselines and its ceiling, timed in the same run, alternating
//! their order, as the median of several runs (minimum and maximum shown).
//!
//! Throughput is the file's data bytes over seconds, in GB/s (10^9 bytes). Each timed run
//! ends only when the device has finished (backends synchronize before returning) and frees
//! what it placed before the next run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::{self, Device};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::host::{HostFile, ReadMode};
use crate::tensor::{CpuStorage, Storage, Tensor, Tensors};

/// Command-line arguments of the harness.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A safetensors file to load; without it a synthetic checkpoint is written.
    pub file: Option<PathBuf>,
    /// Devices to measure (repeatable); default: every one present.
    #[arg(long = "device", short = 'd')]
    pub devices: Vec<String>,
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

/// What a synthetic checkpoint holds.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// Total data bytes (approximately).
    pub size: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// The dtypes, used in turn.
    pub dtypes: Vec<Dtype>,
}

impl Synthetic {
    /// The demo checkpoint of `tensorplace load`: about 1 GiB in 300 tensors of mixed dtypes
    /// and sizes.
    pub fn demo() -> Self {
        Synthetic {
            size: 1 << 30,
            tensors: 300,
            dtypes: MIX.to_vec(),
        }
    }
}

const MIX: [Dtype; 6] = [
    Dtype::F32,
    Dtype::BF16,
    Dtype::F16,
    Dtype::I64,
    Dtype::U8,
    Dtype::F8_E4M3,
];

/// Builds the tensors of a synthetic checkpoint (pseudo-random bytes, sizes varying over a
/// range of 1 to 30, shapes 2-D where they divide by 256).
pub fn synthetic_tensors(spec: &Synthetic) -> Result<Tensors> {
    let n = spec.tensors.max(1);
    let weight = |i: usize| 1 + (i * 7919) % 30;
    let total_weight: u64 = (0..n).map(|i| weight(i) as u64).sum();
    let mut plan = Vec::with_capacity(n);
    let mut total = 0usize;
    for i in 0..n {
        let dtype = spec
            .dtypes
            .get(i % spec.dtypes.len().max(1))
            .copied()
            .unwrap_or(Dtype::F32);
        let elem = (dtype.bits() / 8).max(1);
        let bytes = (spec.size as u128 * weight(i) as u128 / total_weight as u128) as usize;
        let numel = bytes / elem;
        let shape = if numel >= 256 && numel % 256 == 0 {
            vec![numel / 256, 256]
        } else {
            vec![numel]
        };
        plan.push((
            format!("layer{:03}.{}.weight", i / 6, i % 6),
            dtype,
            shape,
            numel * elem,
        ));
        total += numel * elem;
    }
    let mut words: Vec<u64> = Vec::new();
    words.try_reserve_exact(total.div_ceil(8)).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!("cannot allocate {total} bytes"),
        )
    })?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    words.extend((0..total.div_ceil(8)).map(|_| {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }));
    let arena = Arc::new(words);
    let mut tensors = Tensors::new();
    let mut at = 0usize;
    for (name, dtype, shape, len) in plan {
        let storage = CpuStorage::owned(arena.clone(), at..at + len);
        tensors.insert(
            name,
            Tensor::from_parts(dtype, shape, Storage::Cpu(storage)),
        );
        at += len;
    }
    let mut md = crate::Metadata::new();
    md.insert("format".into(), "pt".into());
    md.insert("generator".into(), "tensorplace synthetic".into());
    tensors.set_metadata(Some(md));
    Ok(tensors)
}

/// Writes a synthetic checkpoint to `path`.
pub fn write_synthetic(path: &Path, spec: &Synthetic) -> Result<()> {
    let t = synthetic_tensors(spec)?;
    crate::save_file(&t, path, t.metadata())
}

/// What a measured path is to the others in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Our code.
    Ours,
    /// What users run today, for the ratio.
    Baseline,
    /// What the hardware allows, for the ratio.
    Ceiling,
}

/// A timed path: a closure that does the whole operation once.
pub struct BenchPath<'a> {
    /// What is measured.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The operation; it must finish (device synchronized) and free what it made.
    pub run: Box<dyn FnMut() -> Result<()> + 'a>,
}

impl<'a> BenchPath<'a> {
    /// A new path.
    pub fn new(name: &str, role: Role, run: impl FnMut() -> Result<()> + 'a) -> Self {
        BenchPath {
            name: name.to_owned(),
            role,
            run: Box::new(run),
        }
    }
}

/// One row of the results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Device or group, such as `cpu` or `cuda:0`.
    pub device: String,
    /// What was measured.
    pub path: String,
    /// `ours`, `baseline` or `ceiling`.
    pub role: String,
    /// Median throughput, GB/s.
    pub gbps_median: f64,
    /// Slowest run, GB/s.
    pub gbps_min: f64,
    /// Fastest run, GB/s.
    pub gbps_max: f64,
    /// Median seconds.
    pub seconds_median: f64,
    /// Median throughput over the group's (first) baseline's.
    pub x_baseline: Option<f64>,
    /// Median throughput over the group's ceiling's.
    pub x_ceiling: Option<f64>,
}

/// A group of paths compared with each other (one device, one operation).
pub struct Group<'a> {
    /// Device or group name.
    pub device: String,
    /// The paths.
    pub paths: Vec<BenchPath<'a>>,
    /// Pairs (ours, baseline) to compare where a group has several; by default each `Ours`
    /// is compared with the first baseline after it, else the first of the group.
    pub pairs: Vec<(usize, usize)>,
}

/// Drops `path` from the page cache. Returns whether the kernel accepted.
pub fn drop_cache(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: the descriptor is valid for the life of `f`; fdatasync and posix_fadvise
    // only read it and touch no memory of ours.
    unsafe {
        libc::fdatasync(f.as_raw_fd());
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) == 0
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times every path of `group`: one warm-up each, then `runs` rounds, each round in a
/// rotated order so that no path always runs first or last.
pub fn measure(group: &mut Group<'_>, bytes: u64, runs: usize, cold: Option<&Path>) -> Vec<Row> {
    let n = group.paths.len();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut failed: Vec<Option<String>> = vec![None; n];
    for (i, p) in group.paths.iter_mut().enumerate() {
        if let Err(e) = (p.run)() {
            failed[i] = Some(e.to_string());
        }
    }
    for round in 0..runs.max(1) {
        for k in 0..n {
            let i = if round % 2 == 0 {
                (k + round) % n
            } else {
                (n - 1 - k + round) % n
            };
            if failed[i].is_some() {
                continue;
            }
            // Start every run with no dirty pages, so that no path pays for the writeback of
            // what another path wrote (a save that does not fsync leaves its data dirty).
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            if let Some(path) = cold {
                drop_cache(path);
            }
            let t = Instant::now();
            let r = (group.paths[i].run)();
            let s = t.elapsed().as_secs_f64().max(1e-9);
            match r {
                Ok(()) => times[i].push(s),
                Err(e) => failed[i] = Some(e.to_string()),
            }
        }
    }
    let gbps = |s: f64| bytes as f64 / s / 1e9;
    let mut rows: Vec<Row> = group
        .paths
        .iter()
        .zip(times.iter_mut())
        .zip(&failed)
        .map(|((p, t), f)| {
            let role = match p.role {
                Role::Ours => "ours",
                Role::Baseline => "baseline",
                Role::Ceiling => "ceiling",
            };
            let name = match f {
                Some(e) => format!("{} (failed: {e})", p.name),
                None => p.name.clone(),
            };
            let med = median(t);
            let (mn, mx) = t
                .iter()
                .fold((f64::INFINITY, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
            Row {
                device: group.device.clone(),
                path: name,
                role: role.to_owned(),
                gbps_median: gbps(med),
                gbps_min: if t.is_empty() { f64::NAN } else { gbps(mx) },
                gbps_max: if t.is_empty() { f64::NAN } else { gbps(mn) },
                seconds_median: med,
                x_baseline: None,
                x_ceiling: None,
            }
        })
        .collect();
    let ceiling = group.paths.iter().position(|p| p.role == Role::Ceiling);
    let mut pairs = group.pairs.clone();
    if pairs.is_empty() {
        for (i, p) in group.paths.iter().enumerate() {
            if p.role != Role::Ours {
                continue;
            }
            let after = (i + 1..n).find(|&j| group.paths[j].role == Role::Baseline);
            let first = (0..n).find(|&j| group.paths[j].role == Role::Baseline);
            if let Some(j) = after.or(first) {
                pairs.push((i, j));
            }
        }
    }
    let finite = |x: f64| x.is_finite().then_some(x);
    for (i, j) in pairs {
        rows[i].x_baseline = finite(rows[i].gbps_median / rows[j].gbps_median);
    }
    if let Some(c) = ceiling {
        for i in 0..n {
            if group.paths[i].role == Role::Ours {
                rows[i].x_ceiling = finite(rows[i].gbps_median / rows[c].gbps_median);
            }
        }
    }
    rows
}

/// Formats rows as a table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<44} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "device", "path", "GB/s med", "min", "max", "x baseline", "x ceiling"
    );
    let opt = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for r in rows {
        let _ = writeln!(
            s,
            "{:<8} {:<44} {:>9.3} {:>9.3} {:>9.3} {:>10} {:>10}",
            r.device,
            r.path,
            r.gbps_median,
            r.gbps_min,
            r.gbps_max,
            opt(r.x_baseline),
            opt(r.x_ceiling)
        );
    }
    s
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
        "devices": device::list(),
    })
}

/// Which devices to measure: those asked for, or every one present.
fn devices(args: &BenchArgs) -> Result<Vec<(Device, Option<String>)>> {
    if !args.devices.is_empty() {
        return args
            .devices
            .iter()
            .map(|d| {
                let d: Device = d.parse()?;
                let skip = device::open(d).err().map(|e| e.to_string());
                Ok((d, skip))
            })
            .collect();
    }
    let mut out = vec![(Device::Cpu, None)];
    for d in [Device::Cuda(0), Device::Wgpu(None)] {
        out.push((d, device::open(d).err().map(|e| e.to_string())));
    }
    Ok(out)
}

/// A sequential read of the whole file through one reused 8 MiB buffer: with `--cold`, the
/// disk's sequential read speed, the ceiling of every cold load.
pub fn disk_read_path(path: &Path) -> BenchPath<'_> {
    BenchPath::new(
        "sequential read of the file (disk ceiling)",
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

/// With `--cold`, puts the disk's sequential read first among the ceilings of `group`.
fn with_disk_ceiling<'a>(mut group: Group<'a>, path: &'a Path, cold: bool) -> Group<'a> {
    if cold {
        group.paths.insert(0, disk_read_path(path));
    }
    group
}

/// The CPU groups: zero-copy load, owned load, save.
fn cpu_groups<'a>(path: &'a Path, out: &'a Path, cold: bool) -> Vec<Group<'a>> {
    use safetensors::SafeTensors;
    let map = |p: &Path| -> Result<memmap2::Mmap> {
        let f = std::fs::File::open(p).map_err(|e| Error::io("opening", Some(p), e))?;
        // SAFETY: a read-only shared mapping of a file this harness wrote and does not
        // change while it is mapped.
        unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io("mapping", Some(p), e))
    };
    let st_err =
        |e: safetensors::SafeTensorError| Error::new(ErrorKind::InvalidJson, e.to_string());
    let zero_copy = Group {
        device: "cpu".into(),
        paths: vec![
            BenchPath::new("tensorplace load_file zero-copy", Role::Ours, move || {
                let t = crate::load_file(path, Device::Cpu)?;
                std::hint::black_box(t.len());
                Ok(())
            }),
            BenchPath::new(
                "safetensors mmap + deserialize",
                Role::Baseline,
                move || {
                    let m = map(path)?;
                    let st = SafeTensors::deserialize(&m).map_err(st_err)?;
                    std::hint::black_box(st.iter().count());
                    Ok(())
                },
            ),
        ],
        pairs: vec![],
    };
    let owned = Group {
        device: "cpu".into(),
        paths: vec![
            BenchPath::new(
                "tensorplace load_file owned copies",
                Role::Ours,
                move || {
                    let t = crate::Loader::new(Device::Cpu)
                        .owned(true)
                        .load_file(path)?;
                    std::hint::black_box(t.len());
                    Ok(())
                },
            ),
            BenchPath::new(
                "safetensors deserialize + copy each",
                Role::Baseline,
                move || {
                    let m = map(path)?;
                    let st = SafeTensors::deserialize(&m).map_err(st_err)?;
                    let v: Vec<Vec<u8>> = st.iter().map(|(_, t)| t.data().to_vec()).collect();
                    std::hint::black_box(&v);
                    Ok(())
                },
            ),
            BenchPath::new("memcpy of the data (ceiling)", Role::Ceiling, move || {
                let m = map(path)?;
                let mut v: Vec<u8> = Vec::with_capacity(m.len());
                v.extend_from_slice(std::hint::black_box(&m[..]));
                std::hint::black_box(&v);
                Ok(())
            }),
        ],
        pairs: vec![],
    };
    let loaded = crate::load_file(path, Device::Cpu);
    // One mapping for both reference saves.
    let reference = std::rc::Rc::new(map(path));
    let reference_fsync = reference.clone();
    let save = Group {
        device: "cpu".into(),
        paths: vec![
            BenchPath::new(
                "tensorplace save_file (fsync, rename)",
                Role::Ours,
                move || {
                    let t = loaded
                        .as_ref()
                        .map_err(|e| Error::new(e.kind(), e.to_string()))?;
                    crate::save_file(t, out, t.metadata())
                },
            ),
            BenchPath::new("safetensors serialize_to_file", Role::Baseline, move || {
                reference_save(&reference, out, false)
            }),
            BenchPath::new(
                "safetensors serialize_to_file + fsync",
                Role::Baseline,
                move || reference_save(&reference_fsync, out, true),
            ),
        ],
        pairs: vec![],
    };
    vec![zero_copy, with_disk_ceiling(owned, path, cold), save]
}

/// `safetensors::serialize_to_file` of a mapped file's tensors and metadata, as a user of that
/// crate writes it (its API parses the header once for the views and once for the metadata),
/// followed by an fsync of the output where `fsync` asks for one.
fn reference_save(m: &Result<memmap2::Mmap>, out: &Path, fsync: bool) -> Result<()> {
    use safetensors::SafeTensors;
    let st_err =
        |e: safetensors::SafeTensorError| Error::new(ErrorKind::InvalidJson, e.to_string());
    let m = m
        .as_ref()
        .map_err(|e| Error::new(e.kind(), e.to_string()))?;
    let st = SafeTensors::deserialize(m).map_err(st_err)?;
    let md = SafeTensors::read_metadata(m)
        .map_err(st_err)?
        .1
        .metadata()
        .clone();
    safetensors::serialize_to_file(st.iter(), md, out).map_err(st_err)?;
    if fsync {
        std::fs::File::open(out)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("fsync", Some(out), e))?;
    }
    Ok(())
}

#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
fn device_groups<'a>(d: Device, path: &'a Path, cold: bool) -> Result<Vec<Group<'a>>> {
    match d {
        Device::Cpu | Device::Auto => Ok(vec![]),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => crate::device::cuda::bench_group(i, path)
            .map(|g| vec![with_disk_ceiling(g, path, cold)]),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(i) => crate::device::wgpu::bench_group(i, path)
            .map(|g| vec![with_disk_ceiling(g, path, cold)]),
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
    let file = HostFile::open(&path, ReadMode::Mmap)?;
    let bytes = file.header().data_len() as u64;
    println!(
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
    );
    drop(file);
    if args.cold && !drop_cache(&path) {
        println!("note: posix_fadvise(DONTNEED) was refused: the runs are not cold");
    }
    let cold = args.cold.then_some(path.as_path());
    let out = dir.path().join("saved.safetensors");
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (d, skip) in devices(args)? {
        if let Some(reason) = skip {
            println!("skipped {d}: {reason}");
            skipped.push(serde_json::json!({"device": d.to_string(), "reason": reason}));
            continue;
        }
        let groups = if d == Device::Cpu {
            Ok(cpu_groups(&path, &out, args.cold))
        } else {
            device_groups(d, &path, args.cold)
        };
        match groups {
            Ok(groups) => {
                for mut g in groups {
                    let r = measure(&mut g, bytes, args.runs, cold);
                    print!("{}", table(&r));
                    rows.extend(r);
                }
            }
            Err(e) => {
                println!("skipped {d}: {e}");
                skipped.push(serde_json::json!({"device": d.to_string(), "reason": e.to_string()}));
            }
        }
    }
    println!("\n{}", table(&rows));
    if let Some(json) = &args.json {
        let report = serde_json::json!({
            "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            "machine": machine(),
            "file": {"path": path, "data_bytes": bytes, "runs": args.runs, "cold": args.cold},
            "results": rows,
            "skipped": skipped,
        });
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        std::fs::write(json, text).map_err(|e| Error::io("writing", Some(json), e))?;
        println!("wrote {}", json.display());
    }
    Ok(())
}

/// Load time against size and against tensor count, for our load on each device.
fn sweep(args: &BenchArgs, dir: &Path) -> Result<()> {
    let devs: Vec<Device> = devices(args)?
        .into_iter()
        .filter_map(|(d, skip)| match skip {
            Some(reason) => {
                println!("skipped {d}: {reason}");
                None
            }
            None => Some(d),
        })
        .collect();
    let dtypes = args.dtype.map_or(MIX.to_vec(), |d| vec![d]);
    let time_load = |p: &Path, d: Device| -> Result<f64> {
        let mut v = Vec::new();
        for i in 0..=args.runs.max(1) {
            let t = Instant::now();
            let loaded = crate::Loader::new(d).owned(true).load_file(p)?;
            drop(loaded);
            if i > 0 {
                v.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(median(&mut v))
    };
    println!(
        "{:<8} {:>12} {:>9} {:>12} {:>9} {:>14}",
        "device", "bytes", "tensors", "ms median", "GB/s", "us per tensor"
    );
    let mut size = 16u64 << 20;
    let p = dir.join("sweep.safetensors");
    let mut cases = Vec::new();
    while size <= args.size.max(16 << 20) {
        cases.push((size, 64usize));
        size *= 2;
    }
    for n in [10usize, 100, 1_000, 10_000, 100_000] {
        cases.push((64 << 20, n));
    }
    for (size, n) in cases {
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
            let s = time_load(&p, d)?;
            println!(
                "{:<8} {:>12} {:>9} {:>12.3} {:>9.3} {:>14.3}",
                d.to_string(),
                bytes,
                n,
                s * 1e3,
                bytes as f64 / s / 1e9,
                s * 1e6 / n as f64
            );
        }
    }
    let _ = Duration::ZERO;
    Ok(())
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

    #[test]
    fn medians_and_ratios() {
        let mut g = Group {
            device: "cpu".into(),
            paths: vec![
                BenchPath::new("fast", Role::Ours, || {
                    std::thread::sleep(Duration::from_millis(2));
                    Ok(())
                }),
                BenchPath::new("slow", Role::Baseline, || {
                    std::thread::sleep(Duration::from_millis(8));
                    Ok(())
                }),
                BenchPath::new("broken", Role::Ceiling, || {
                    Err(Error::new(ErrorKind::Backend, "no"))
                }),
            ],
            pairs: vec![],
        };
        let rows = measure(&mut g, 1_000_000, 3, None);
        assert!(rows[0].x_baseline.unwrap() > 1.5);
        assert!(rows[2].path.contains("failed"));
        assert!(table(&rows).contains("fast"));
    }
}
