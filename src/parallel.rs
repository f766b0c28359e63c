//! Work spread over the host's cores with scoped threads (the copy loops of every backend).

use crate::error::{Error, ErrorKind, Result};

/// How many threads a piece of work may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// One per core.
    PerCore,
    /// One per core, but no more than this many.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    AtMost(usize),
}

impl Threads {
    /// The number of threads for `jobs` jobs: never more than the jobs, never fewer than one.
    fn count(self, jobs: usize) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cap = match self {
            Threads::PerCore => cores,
            Threads::AtMost(n) => cores.min(n),
        };
        cap.min(jobs).max(1)
    }
}

/// Runs `work` on every job, on the threads `threads` allows, dealing the jobs out in turn
/// so that neighbouring pieces of a file go to different threads. Each thread has its own
/// scratch buffer. Every thread is joined; the first error is returned.
pub(crate) fn for_each<J: Send>(
    jobs: Vec<J>,
    threads: Threads,
    work: impl Fn(J, &mut Vec<u8>) -> Result<()> + Sync,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let threads = threads.count(jobs.len());
    if threads == 1 {
        // Not worth a thread (small loads): run here.
        let mut scratch = Vec::new();
        return jobs.into_iter().try_for_each(|job| work(job, &mut scratch));
    }
    let mut buckets: Vec<Vec<J>> = (0..threads).map(|_| Vec::new()).collect();
    for (k, job) in jobs.into_iter().enumerate() {
        buckets[k % threads].push(job);
    }
    let work = &work;
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = buckets
            .into_iter()
            .map(|bucket| {
                s.spawn(move || {
                    let mut scratch = Vec::new();
                    bucket
                        .into_iter()
                        .try_for_each(|job| work(job, &mut scratch))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::new(ErrorKind::Backend, "a worker thread panicked"))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_and_returns_the_first_error() {
        let sum = AtomicUsize::new(0);
        for_each((1..=100).collect(), Threads::AtMost(8), |j: usize, _| {
            sum.fetch_add(j, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert_eq!(sum.into_inner(), 5050);
        let e = for_each(vec![1, 2, 3], Threads::AtMost(2), |j: i32, _| {
            if j == 2 {
                Err(Error::new(ErrorKind::Io, "two"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(for_each(Vec::<u8>::new(), Threads::PerCore, |_, _| Ok(())).is_ok());
        assert_eq!(Threads::AtMost(0).count(5), 1);
        assert_eq!(Threads::PerCore.count(1), 1);
    }
}
