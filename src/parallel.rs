//! The reader pools: work spread over the host's cores (copies, conversions, buffer
//! creation) or over many threads (blocking reads from a disk), on threads that live for
//! the whole process, so that no load and no batch of a load spawns any.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};

/// Threads kept for blocking reads: enough requests in flight to keep a fast disk busy.
const IO_THREADS: usize = 16;

/// Which pool a piece of work runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread alone: work too small to be worth handing off.
    Caller,
    /// One thread per core: memory-bound work (copies from the page cache, conversions).
    PerCore,
    /// Many threads: work that waits on a disk (positioned or direct reads).
    Io,
}

/// The cores this process may use, asked once: the standard library's answer reads the
/// process's cgroup files on every call (an open, reads and a close: more than a small
/// tensor's whole read costs).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl Threads {
    fn pool(self) -> Option<&'static rayon::ThreadPool> {
        static CORES: PerProcess<Option<rayon::ThreadPool>> = PerProcess::new();
        static IO: PerProcess<Option<rayon::ThreadPool>> = PerProcess::new();
        let (cell, threads, name) = match self {
            Threads::Caller => return None,
            Threads::PerCore => (&CORES, cores(), "tensorplace-copy"),
            Threads::Io => (&IO, cores().max(IO_THREADS), "tensorplace-read"),
        };
        cell.get(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("{name}-{i}"))
                .build()
                .ok()
        })
        .as_ref()
    }
}

/// A value made once per process and kept for its life, for values that own threads: a
/// process forked from one that made it has none of its threads (a pool there would wait
/// for ever on work no thread takes), so it makes its own (the parent's copy is left alone,
/// never dropped: its threads are not there to be joined).
pub struct PerProcess<T: 'static> {
    cell: Mutex<Option<(u32, &'static T)>>,
}

impl<T: 'static> PerProcess<T> {
    /// None made yet.
    pub const fn new() -> Self {
        PerProcess {
            cell: Mutex::new(None),
        }
    }

    /// This process's value, made by `make` on first use in it.
    pub fn get(&self, make: impl FnOnce() -> T) -> &'static T {
        let pid = std::process::id();
        let mut cell = self.cell.lock().unwrap_or_else(|p| p.into_inner());
        match *cell {
            Some((owner, value)) if owner == pid => value,
            _ => {
                let value: &'static T = Box::leak(Box::new(make()));
                *cell = Some((pid, value));
                value
            }
        }
    }
}

/// Runs `work` on every job on the pool `threads` names (or here, if that pool could not
/// be started), each worker with its own scratch buffer. Returns the first error; a panic
/// in `work` becomes an error.
pub fn for_each<J: Send>(
    jobs: Vec<J>,
    threads: Threads,
    work: impl Fn(J, &mut Vec<u8>) -> Result<()> + Sync,
) -> Result<()> {
    match threads.pool() {
        Some(pool) if jobs.len() > 1 => in_order(pool, jobs, &work),
        // One job, the caller's thread asked for, or no pool could start: run here.
        _ => {
            let mut scratch = Vec::new();
            jobs.into_iter()
                .try_for_each(|job| run_guarded(&work, job, &mut scratch))
        }
    }
}

/// Runs `work` on every job on every thread of `pool`, the jobs taken in their order (each
/// thread takes the next one left when it is free): reads of consecutive pieces of a file
/// then reach the disk as one advancing window of requests, which readahead (the kernel's,
/// a virtual disk's host's, a drive's) serves as the sequential stream it is, where an
/// order split over the threads (rayon's) would read as many streams as there are threads.
/// The first error stops the taking; it is returned once the running jobs have ended.
fn in_order<J: Send>(
    pool: &rayon::ThreadPool,
    jobs: Vec<J>,
    work: &(dyn Fn(J, &mut Vec<u8>) -> Result<()> + Sync),
) -> Result<()> {
    let workers = pool.current_num_threads().min(jobs.len());
    let queue = std::sync::Mutex::new(jobs.into_iter());
    let failure: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let stop = std::sync::atomic::AtomicBool::new(false);
    pool.in_place_scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|_| {
                let mut scratch = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some(job) = next else {
                        return;
                    };
                    if let Err(e) = run_guarded(work, job, &mut scratch) {
                        stop.store(true, std::sync::atomic::Ordering::SeqCst);
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

std::thread_local! {
    /// The scratch buffer of a pool thread running batch jobs, kept for the thread's life.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A count of a batch's jobs still to end, and its waiters.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
struct Latch {
    left: std::sync::Mutex<usize>,
    done: std::sync::Condvar,
}

#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
impl Latch {
    fn new(jobs: usize) -> Latch {
        Latch {
            left: std::sync::Mutex::new(jobs),
            done: std::sync::Condvar::new(),
        }
    }

    fn count_down(&self) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.done.notify_all();
        }
    }

    fn wait(&self) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        while *left > 0 {
            left = self.done.wait(left).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Runs batches of jobs in order on the pool `threads` names, up to `ahead` batches at once,
/// so that the pool never waits for the caller between batches: `start(k)` (on the calling
/// thread, in order) gives batch k's jobs, or `None` when there are no more; `finish(k)` (on
/// the calling thread, in order) runs once every job of batch k has ended well, while later
/// batches are still running. The first error (of a job, `start` or `finish`; a panicking job
/// is one) stops the queueing, skips the queued jobs not yet started, and is returned once
/// the running ones have ended: nothing a job writes is in use when this returns.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub fn batches<J: Send>(
    threads: Threads,
    ahead: usize,
    mut start: impl FnMut(usize) -> Result<Option<Vec<J>>>,
    mut finish: impl FnMut(usize) -> Result<()>,
    work: &(dyn Fn(J, &mut Vec<u8>) -> Result<()> + Sync),
) -> Result<()> {
    let Some(pool) = threads.pool() else {
        // No pool (the caller's thread, or none could start): each batch here, in order.
        let mut scratch = Vec::new();
        let mut k = 0;
        while let Some(jobs) = start(k)? {
            jobs.into_iter()
                .try_for_each(|job| run_guarded(work, job, &mut scratch))?;
            finish(k)?;
            k += 1;
        }
        return Ok(());
    };
    let failure = Failure::default();
    pool.in_place_scope(|scope| {
        let mut running: VecDeque<(usize, Arc<Latch>)> = VecDeque::new();
        let mut k = 0;
        let mut more = true;
        loop {
            if running.len() >= ahead.max(1) || !more {
                let Some((j, latch)) = running.pop_front() else {
                    break;
                };
                latch.wait();
                if failure.stopped() {
                    break;
                }
                if let Err(e) = finish(j) {
                    failure.fail(e);
                    break;
                }
                continue;
            }
            let jobs = match start(k) {
                Ok(Some(jobs)) => jobs,
                Ok(None) => {
                    more = false;
                    continue;
                }
                Err(e) => {
                    failure.fail(e);
                    break;
                }
            };
            let latch = Arc::new(Latch::new(jobs.len()));
            for job in jobs {
                let (latch, failure) = (latch.clone(), &failure);
                scope.spawn(move |_| {
                    if !failure.stopped() {
                        let r = SCRATCH.with(|s| run_guarded(work, job, &mut s.borrow_mut()));
                        if let Err(e) = r {
                            failure.fail(e);
                        }
                    }
                    latch.count_down();
                });
            }
            running.push_back((k, latch));
            k += 1;
        }
    });
    failure.into_result()
}

/// The first error of a run of batches, and the flag that stops it.
#[derive(Default)]
struct Failure {
    stop: AtomicBool,
    first: Mutex<Option<Error>>,
}

impl Failure {
    /// Records `e` (unless an error came first) and stops the run.
    fn fail(&self, e: Error) {
        self.stop.store(true, Ordering::SeqCst);
        self.first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    /// Whether the run has been stopped.
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The first error, if any.
    fn into_result(self) -> Result<()> {
        match self.first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Runs `work` on `job`, a panic becoming an error.
fn run_guarded<J>(
    work: &(dyn Fn(J, &mut Vec<u8>) -> Result<()> + Sync),
    job: J,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(job, scratch)))
        .unwrap_or_else(|_| Err(Error::new(ErrorKind::Backend, "a worker thread panicked")))
}

/// Runs `work` on every job and returns the results in the jobs' order (see [`for_each`]).
pub fn map<J: Send, R: Send>(
    jobs: Vec<J>,
    threads: Threads,
    work: impl Fn(J) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let numbered: Vec<(usize, J)> = jobs.into_iter().enumerate().collect();
    for_each(numbered, threads, |(k, job), _| {
        let r = work(job)?;
        *slots[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        Ok(())
    })?;
    slots
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect::<Option<Vec<R>>>()
        .ok_or_else(|| Error::new(ErrorKind::Backend, "a job left no result"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every job runs once, the jobs taken in their order: the order they start in strays from
    /// theirs by a few places at most (a thread may be preempted between taking a job and
    /// noting it: the median is asserted), where splitting the jobs over the threads would
    /// start some of the last ones among the first. Errors and panics come back as errors.
    #[test]
    fn pool_jobs_are_taken_in_their_order() {
        for threads in [Threads::PerCore, Threads::Io] {
            let started = std::sync::Mutex::new(Vec::new());
            for_each((0..1024).collect(), threads, |k: usize, _| {
                started.lock().unwrap().push(k);
                std::thread::sleep(std::time::Duration::from_micros(200));
                Ok(())
            })
            .unwrap();
            let started = started.into_inner().unwrap();
            let mut sorted = started.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..1024).collect::<Vec<_>>(), "{threads:?}");
            let mut strays: Vec<usize> = started
                .iter()
                .enumerate()
                .map(|(i, &k)| i.abs_diff(k))
                .collect();
            strays.sort_unstable();
            assert!(
                strays[512] <= 8,
                "{threads:?}: median stray {}",
                strays[512]
            );
            let e = for_each((0..64).collect(), threads, |k: usize, _| match k {
                9 => Err(Error::new(ErrorKind::Io, "nine")),
                17 => panic!("seventeen"),
                _ => Ok(()),
            })
            .unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Io | ErrorKind::Backend),
                "{e}"
            );
        }
    }

    /// Batches finish in order, each after all its jobs and while at most `ahead` run; an
    /// error from a job, from `start` or from `finish` stops the rest; a panic is an error.
    #[test]
    fn batches_run_ahead_and_finish_in_order() {
        for threads in [Threads::Caller, Threads::PerCore, Threads::Io] {
            let done: Vec<AtomicUsize> = (0..20).map(|_| AtomicUsize::new(0)).collect();
            let started = std::sync::Mutex::new(Vec::new());
            let mut finished = Vec::new();
            let max_open = AtomicUsize::new(0);
            let open = AtomicUsize::new(0);
            let mut starts = 0usize;
            batches(
                threads,
                3,
                |k| {
                    starts += 1;
                    let n = open.fetch_add(1, Ordering::SeqCst) + 1;
                    max_open.fetch_max(n, Ordering::SeqCst);
                    started.lock().unwrap().push(k);
                    Ok((k < 20).then(|| (0..k % 5 + 1).map(|_| k).collect()))
                },
                |k| {
                    assert_eq!(done[k].load(Ordering::SeqCst), k % 5 + 1, "batch {k}");
                    open.fetch_sub(1, Ordering::SeqCst);
                    finished.push(k);
                    Ok(())
                },
                &|k: usize, _| {
                    done[k].fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(finished, (0..20).collect::<Vec<_>>(), "{threads:?}");
            assert_eq!(starts, 21);
            // The call that says "no more" counts as one open batch too.
            assert!(max_open.into_inner() <= 4, "{threads:?}");
            let e = batches(
                threads,
                2,
                |k| Ok((k < 10).then(|| vec![k])),
                |_| Ok(()),
                &|k: usize, _| match k {
                    4 => Err(Error::new(ErrorKind::Io, "four")),
                    _ => Ok(()),
                },
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            let mut finished = Vec::new();
            let e = batches(
                threads,
                2,
                |k| Ok((k < 10).then(|| vec![k])),
                |k| {
                    finished.push(k);
                    match k {
                        3 => Err(Error::new(ErrorKind::Interrupted, "three")),
                        _ => Ok(()),
                    }
                },
                &|_, _| Ok(()),
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Interrupted);
            assert_eq!(finished, [0, 1, 2, 3]);
            let e = batches(
                threads,
                2,
                |k| match k {
                    2 => Err(Error::new(ErrorKind::OutOfMemory, "two")),
                    _ => Ok(Some(vec![k])),
                },
                |_| Ok(()),
                &|_, _| Ok(()),
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfMemory);
            let e = batches(
                threads,
                2,
                |k| Ok((k < 3).then(|| vec![k])),
                |_| Ok(()),
                &|_: usize, _| -> Result<()> { panic!("a bug") },
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Backend);
        }
    }

    #[test]
    fn runs_every_job_and_returns_an_error() {
        for threads in [Threads::Caller, Threads::PerCore, Threads::Io] {
            let sum = AtomicUsize::new(0);
            for_each((1..=100).collect(), threads, |j: usize, _| {
                sum.fetch_add(j, Ordering::Relaxed);
                Ok(())
            })
            .unwrap();
            assert_eq!(sum.into_inner(), 5050);
            let e = for_each(vec![1, 2, 3], threads, |j: i32, _| {
                if j == 2 {
                    Err(Error::new(ErrorKind::Io, "two"))
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            assert!(for_each(Vec::<u8>::new(), threads, |_, _| Ok(())).is_ok());
            let e = for_each(vec![1, 2], threads, |_: i32, _| -> Result<()> {
                panic!("a bug")
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Backend);
        }
    }

    #[test]
    fn the_io_pool_has_requests_in_flight_beyond_the_cores() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        for_each((0..64).collect(), Threads::Io, |_: usize, _| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert!(most.into_inner() >= IO_THREADS.min(64) / 2);
    }
}
