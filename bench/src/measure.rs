//! Timing a group of paths in one run: warm-up, rounds in rotated order, medians, ratios
//! against the group's baseline and ceiling, and the table they print as.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use tensorplace::Result;
use tensorplace::internals::HostBuffer;

/// What a measured path is to the others in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Our code.
    Ours,
    /// What users run today, for the ratio.
    Baseline,
    /// What the hardware allows, for the ratio.
    Ceiling,
    /// One stage of our load alone (a fill without the copies, say), for diagnosis: no
    /// ratio.
    Stage,
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

/// Touches, then frees, `bytes` of fresh memory of the kind our arenas are (anonymous, huge
/// pages advised), so that the next run's fresh memory is backed by the machine already.
///
/// A virtual machine's guest hands memory it has left free for a few seconds back to its
/// host (free page reporting); the next first touch then costs the host's allocation too.
/// On the 2-core VM this project is built on, touching fresh memory ran at 0.4-0.7 GB/s
/// after a pause and at 4.7-6.3 GB/s right after a free of the same size. Without this, a
/// run's speed would depend on how long ago the previous one freed its memory rather than on
/// its own work; every path of a round gets the same. On bare metal it changes nothing.
pub fn prime_memory(bytes: u64) {
    let Some(mut buffer) = usize::try_from(bytes)
        .ok()
        .and_then(|len| HostBuffer::page_aligned(len).ok())
    else {
        return;
    };
    let b = buffer.as_mut_bytes();
    for i in (0..b.len()).step_by(4096) {
        b[i] = 1;
    }
    std::hint::black_box(buffer.as_bytes());
}

pub(super) fn median(v: &mut [f64]) -> f64 {
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
/// rotated order so that no path always runs first or last. Before each timed run: no dirty
/// pages, the file dropped from the page cache when `cold`, and [`prime_memory`].
pub fn measure(group: &mut Group<'_>, bytes: u64, runs: usize, cold: Option<&Path>) -> Vec<Row> {
    let (mut times, failed) = timings(group, bytes, runs, cold);
    let mut rows: Vec<Row> = group
        .paths
        .iter()
        .zip(times.iter_mut())
        .zip(&failed)
        .map(|((p, t), f)| row(&group.device, p, t, f.as_deref(), bytes))
        .collect();
    let n = group.paths.len();
    let finite = |x: f64| x.is_finite().then_some(x);
    for (i, j) in pairs(group) {
        rows[i].x_baseline = finite(rows[i].gbps_median / rows[j].gbps_median);
    }
    if let Some(c) = group.paths.iter().position(|p| p.role == Role::Ceiling) {
        for i in 0..n {
            if group.paths[i].role == Role::Ours {
                rows[i].x_ceiling = finite(rows[i].gbps_median / rows[c].gbps_median);
            }
        }
    }
    rows
}

/// Each path's seconds per run (one warm-up run first, not timed), and why a path failed.
/// Each round runs every path, in an order that turns from round to round, each run from
/// the same state: no dirty pages, the page cache dropped when `cold`, memory primed.
fn timings(
    group: &mut Group<'_>,
    bytes: u64,
    runs: usize,
    cold: Option<&Path>,
) -> (Vec<Vec<f64>>, Vec<Option<String>>) {
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
            prime_memory(bytes);
            let t = Instant::now();
            let r = (group.paths[i].run)();
            let s = t.elapsed().as_secs_f64().max(1e-9);
            match r {
                Ok(()) => times[i].push(s),
                Err(e) => failed[i] = Some(e.to_string()),
            }
        }
    }
    (times, failed)
}

/// The row of path `p` of a group on `device`, from its seconds per run `t`.
fn row(device: &str, p: &BenchPath<'_>, t: &mut [f64], failed: Option<&str>, bytes: u64) -> Row {
    let gbps = |s: f64| bytes as f64 / s / 1e9;
    let role = match p.role {
        Role::Ours => "ours",
        Role::Baseline => "baseline",
        Role::Ceiling => "ceiling",
        Role::Stage => "stage",
    };
    let name = match failed {
        Some(e) => format!("{} (failed: {e})", p.name),
        None => p.name.clone(),
    };
    let med = median(t);
    let (mn, mx) = t
        .iter()
        .fold((f64::INFINITY, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    Row {
        device: device.to_owned(),
        path: name,
        role: role.to_owned(),
        gbps_median: gbps(med),
        gbps_min: if t.is_empty() { f64::NAN } else { gbps(mx) },
        gbps_max: if t.is_empty() { f64::NAN } else { gbps(mn) },
        seconds_median: med,
        x_baseline: None,
        x_ceiling: None,
    }
}

/// The (ours, baseline) pairs whose ratio a group reports: its own, or each of our paths
/// with the next baseline after it (else the first).
fn pairs(group: &Group<'_>) -> Vec<(usize, usize)> {
    if !group.pairs.is_empty() {
        return group.pairs.clone();
    }
    let n = group.paths.len();
    let baseline = |j: &usize| group.paths[*j].role == Role::Baseline;
    group
        .paths
        .iter()
        .enumerate()
        .filter(|(_, p)| p.role == Role::Ours)
        .filter_map(|(i, _)| {
            let after = (i + 1..n).find(baseline);
            after.or_else(|| (0..n).find(baseline)).map(|j| (i, j))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tensorplace::{Error, ErrorKind};

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
