//! The reader pools: work spread over the host's cores (copies, conversions, buffer
//! creation) or over many threads (blocking reads from a disk), on threads that live for
//! the whole process, so that no load and no batch of a load spawns any.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{Error, ErrorKind, Result};

/// Threads kept for blocking reads: enough requests in flight to keep a fast disk busy.
const IO_THREADS: usize = 16;

/// Which pool a piece of work runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// The calling thread alone: work too small to be worth handing off.
    Caller,
    /// One thread per core: memory-bound work (copies from the page cache, conversions).
    PerCore,
    /// Many threads: work that waits on a disk (positioned or direct reads).
    Io,
}

impl Threads {
    fn pool(self) -> Option<&'static rayon::ThreadPool> {
        static CORES: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
        static IO: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (cell, threads, name) = match self {
            Threads::Caller => return None,
            Threads::PerCore => (&CORES, cores, "tensorplace-copy"),
            Threads::Io => (&IO, cores.max(IO_THREADS), "tensorplace-read"),
        };
        cell.get_or_init(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("{name}-{i}"))
                .build()
                .ok()
        })
        .as_ref()
    }
}

/// Runs `work` on every job on the pool `threads` names (or here, if that pool could not
/// be started), each worker with its own scratch buffer. Returns the first error; a panic
/// in `work` becomes an error.
pub(crate) fn for_each<J: Send>(
    jobs: Vec<J>,
    threads: Threads,
    work: impl Fn(J, &mut Vec<u8>) -> Result<()> + Sync,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let run = || {
        if jobs.len() == 1 || threads == Threads::Caller {
            // Not worth a hand-off (small loads): run here.
            let mut scratch = Vec::new();
            return jobs.into_iter().try_for_each(|job| work(job, &mut scratch));
        }
        let run_all = || {
            jobs.into_par_iter()
                .with_max_len(1)
                .try_for_each_init(Vec::new, |scratch, job| work(job, scratch))
        };
        match threads.pool() {
            Some(pool) => pool.install(run_all),
            None => run_all(),
        }
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(Error::new(ErrorKind::Backend, "a worker thread panicked")))
}

/// Runs `work` on every job and returns the results in the jobs' order (see [`for_each`]).
pub(crate) fn map<J: Send, R: Send>(
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
