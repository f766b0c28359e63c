//! Arenas freed with their last tensor, kept for later loads.
//!
//! A load onto the CPU writes every tensor into one fresh arena, and the first touch of fresh
//! memory (the kernel zeroes each page as it faults it in) costs about as much as the copy
//! itself: a warm load into fresh memory runs at half the speed of the same reads into memory
//! touched before. The heap gives that back to small allocations (glibc keeps what is freed
//! for the next `malloc`: a `clone()` of each tensor of a mapping reuses it run after run),
//! never to an arena of a mapping of its own. So the arenas freed last are kept here, for a
//! while, and the next arena that fits takes one: a process that loads checkpoints one after
//! another (an evaluation over checkpoints, weights reloaded, a stream's batches) faults its
//! memory in once.
//!
//! What is kept is bounded two ways: [`MAPPINGS`] mappings at most, of at most a quarter of
//! the machine's memory in all (`TENSORPLACE_HOST_CACHE`, in bytes: `0` keeps nothing); and
//! [`KEEP`] after its free, a thread of the cache's own gives a mapping back unused (as
//! jemalloc gives back its dirty pages). [`trim`](crate::trim_host_memory) gives them back at
//! once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

/// How long an unused mapping is kept: jemalloc's default for giving back dirty pages.
pub const KEEP: Duration = Duration::from_secs(10);

/// The most mappings kept at once: room for a whole load's arena beside a stream's batches
/// (three loaded at once and one freed meanwhile: a stream makes four) in a process that
/// does both, and for a few loads of different sizes.
pub const MAPPINGS: usize = 8;

/// An anonymous mapping and where its buffer starts in it (a huge-page boundary): the bytes
/// from `start` on are the buffer's to use.
#[derive(Debug)]
pub(crate) struct Mapping {
    pub(crate) map: MmapMut,
    pub(crate) start: usize,
}

impl Mapping {
    /// The bytes a buffer starting at `start` can use.
    pub(crate) fn capacity(&self) -> usize {
        self.map.len() - self.start
    }
}

/// The mappings kept, oldest first, each with when it was freed; and which process's thread
/// watches their age.
#[derive(Debug, Default)]
struct Kept {
    mappings: Vec<(Mapping, Instant)>,
    /// The process whose thread gives the mappings back (none in a child forked since).
    reaper: Option<u32>,
}

impl Kept {
    /// The bytes kept.
    fn bytes(&self) -> usize {
        self.mappings.iter().map(|(m, _)| m.map.len()).sum()
    }
}

/// A cache of the last freed mappings (see the module's documentation).
#[derive(Debug)]
pub(crate) struct HostCache {
    kept: Mutex<Kept>,
    /// Woken when the mappings kept change, so that the thread times the new oldest.
    changed: Condvar,
    /// The most bytes kept at once (0: none).
    limit: usize,
    keep: Duration,
}

impl HostCache {
    /// A cache keeping at most [`MAPPINGS`] mappings, `limit` bytes in all, each for `keep`.
    pub(crate) const fn new(limit: usize, keep: Duration) -> HostCache {
        HostCache {
            kept: Mutex::new(Kept {
                mappings: Vec::new(),
                reaper: None,
            }),
            changed: Condvar::new(),
            limit,
            keep,
        }
    }

    /// The process's cache: `TENSORPLACE_HOST_CACHE` bytes at most, or a quarter of the
    /// machine's memory.
    pub(crate) fn global() -> &'static Arc<HostCache> {
        static GLOBAL: std::sync::OnceLock<Arc<HostCache>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| {
            let limit = std::env::var("TENSORPLACE_HOST_CACHE")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or_else(|| physical_memory() / 4);
            Arc::new(HostCache::new(limit, KEEP))
        })
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The smallest kept mapping that holds `len` bytes and not more than twice as many (a
    /// larger one would hold memory the buffer does not use for as long as the buffer lives).
    pub(crate) fn take(&self, len: usize) -> Option<Mapping> {
        let mut kept = self.lock();
        let fits = |m: &Mapping| m.capacity() >= len && m.capacity() / 2 <= len;
        let (at, _) = kept
            .mappings
            .iter()
            .enumerate()
            .filter(|(_, (m, _))| fits(m))
            .min_by_key(|(_, (m, _))| m.capacity())?;
        let (mapping, _) = kept.mappings.remove(at);
        Some(mapping)
    }

    /// Keeps `mapping` for a later [`take`](Self::take), the oldest mappings unmapped where
    /// that makes more than [`MAPPINGS`] or the limit's bytes; one larger than the limit is
    /// unmapped at once.
    pub(crate) fn put(self: &Arc<Self>, mapping: Mapping) {
        if mapping.map.len() > self.limit {
            return;
        }
        let mut kept = self.lock();
        kept.mappings.push((mapping, Instant::now()));
        let mut evicted = Vec::new();
        while kept.mappings.len() > MAPPINGS || kept.bytes() > self.limit {
            evicted.push(kept.mappings.remove(0));
        }
        let pid = std::process::id();
        if kept.reaper != Some(pid) {
            let cache = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("tensorplace-host-cache".into())
                .spawn(move || cache.reap());
            match spawned {
                Ok(_) => kept.reaper = Some(pid),
                // No thread to give them back later: nothing is kept.
                Err(_) => evicted.append(&mut kept.mappings),
            }
        }
        self.changed.notify_all();
        // Unmapped outside the lock.
        drop(kept);
        drop(evicted);
    }

    /// Unmaps every kept mapping; their size in bytes (0 where none was kept).
    pub(crate) fn trim(&self) -> usize {
        let old = std::mem::take(&mut self.lock().mappings);
        self.changed.notify_all();
        old.iter().map(|(m, _)| m.map.len()).sum()
    }

    /// The thread's loop: gives each kept mapping back once it is `keep` old; ends when
    /// nothing is kept (the next [`put`](Self::put) starts another).
    fn reap(&self) {
        let mut kept = self.lock();
        loop {
            let Some((_, freed)) = kept.mappings.first() else {
                kept.reaper = None;
                return;
            };
            let age = freed.elapsed();
            if age >= self.keep {
                let old = kept.mappings.remove(0);
                drop(kept);
                drop(old);
                kept = self.lock();
                continue;
            }
            kept = self
                .changed
                .wait_timeout(kept, self.keep - age)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The bytes kept now.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.lock().bytes()
    }
}

/// The machine's memory in bytes (4 GiB where it cannot be told).
fn physical_memory() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: `sysconf` reads configuration values; it has no preconditions.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if let (Ok(pages), Ok(size)) = (usize::try_from(pages), usize::try_from(size)) {
            return pages.saturating_mul(size);
        }
    }
    4 << 30
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{HostBuffer, POISON};

    /// A cache of the test's own (the process's is shared by every test).
    fn cache(limit: usize, keep: Duration) -> Arc<HostCache> {
        Arc::new(HostCache::new(limit, keep))
    }

    /// Page faults this thread has taken so far.
    fn faults() -> i64 {
        // SAFETY: `getrusage` writes the struct it is given; zeroed is a valid `rusage`.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
            usage.ru_minflt + usage.ru_majflt
        }
    }

    /// A reusable buffer of `len` bytes written whole; its address and the faults it took.
    fn fill(cache: &Arc<HostCache>, len: usize, value: u8) -> (HostBuffer, usize, i64) {
        let before = faults();
        let mut b = HostBuffer::reusable_in(cache, len, len).unwrap();
        b.as_mut_bytes().fill(value);
        let at = b.as_bytes().as_ptr() as usize;
        (b, at, faults() - before)
    }

    #[test]
    fn the_last_arena_is_reused_by_the_next_that_fits() {
        let c = cache(1 << 30, Duration::from_secs(60));
        let len = 16 << 20;
        let (b, first, fresh_faults) = fill(&c, len, 1);
        drop(b);
        assert!(c.kept() >= len, "the freed arena is kept");
        let (b, again, reused_faults) = fill(&c, len - 4096, 2);
        assert_eq!(again, first, "the kept mapping is taken");
        assert_eq!(c.kept(), 0, "and is no longer kept");
        println!("page faults writing 16 MiB: fresh {fresh_faults}, reused {reused_faults}");
        assert!(
            reused_faults < fresh_faults,
            "fresh {fresh_faults}, reused {reused_faults}"
        );
        assert!(b.as_bytes().iter().all(|&x| x == 2));
        assert_eq!(b.as_bytes().as_ptr() as usize % (2 << 20), 0);
        drop(b);
        // Under half of it: a mapping of its own, kept beside it when freed.
        let (small, at, _) = fill(&c, (4 << 20) + 1, 3);
        assert_ne!(at, first);
        drop(small);
        let both = c.kept();
        assert!(both > len + (4 << 20), "{both}");
        // The smallest that fits is taken.
        let (b, at, _) = fill(&c, 5 << 20, 4);
        assert!(c.kept() >= len && c.kept() < both);
        assert_ne!(at, first);
        drop(b);
        let (b, at, _) = fill(&c, len, 5);
        assert_eq!(at, first);
        drop(b);
        // Below a huge page nothing is cached.
        drop(HostBuffer::reusable_in(&c, (2 << 20) - 1, 0).unwrap());
        assert_eq!(c.kept(), both);
    }

    #[test]
    fn the_oldest_go_first_past_the_count_or_the_limit() {
        let c = cache(64 << 20, Duration::from_secs(60));
        // One more than are kept, freed in turn: the first freed is unmapped.
        let buffers: Vec<_> = (0..=MAPPINGS).map(|_| fill(&c, 2 << 20, 1)).collect();
        let mut freed: Vec<usize> = buffers.iter().map(|(_, at, _)| *at).collect();
        drop(buffers);
        assert_eq!(
            c.kept(),
            MAPPINGS * (4 << 20),
            "2 MiB and the room to align it, each"
        );
        let taken: Vec<_> = (0..MAPPINGS).map(|_| fill(&c, 2 << 20, 2)).collect();
        let mut got: Vec<usize> = taken.iter().map(|(_, at, _)| *at).collect();
        got.sort_unstable();
        freed.remove(0);
        freed.sort_unstable();
        assert_eq!(got, freed);
        assert_eq!(c.kept(), 0);
        drop(taken);
        assert_eq!(c.trim(), MAPPINGS * (4 << 20));
        // 38 MiB and 28 MiB mappings are over 64 MiB together: the older goes.
        let (big, _, _) = fill(&c, 36 << 20, 1);
        let (other, _, _) = fill(&c, 26 << 20, 1);
        drop(big);
        drop(other);
        assert_eq!(c.kept(), 28 << 20);
    }

    #[test]
    fn reused_bytes_are_poisoned_in_debug_builds() {
        let c = cache(1 << 30, Duration::from_secs(60));
        drop(fill(&c, 4 << 20, 7).0);
        let b = HostBuffer::reusable_in(&c, 4 << 20, 0).unwrap();
        let want = if cfg!(debug_assertions) { POISON } else { 7 };
        assert!(b.as_bytes().iter().all(|&x| x == want));
    }

    #[test]
    fn the_limit_trim_and_time_bound_what_is_kept() {
        // Over the limit: unmapped at once; a limit of 0 keeps nothing.
        let c = cache(8 << 20, Duration::from_secs(60));
        drop(fill(&c, 8 << 20, 1).0);
        assert_eq!(c.kept(), 0, "8 MiB and the room to align it are over 8 MiB");
        drop(fill(&c, 4 << 20, 1).0);
        let kept = c.kept();
        assert!(kept > 0);
        assert_eq!(c.trim(), kept);
        assert_eq!(c.kept(), 0);
        let off = cache(0, Duration::from_secs(60));
        drop(fill(&off, 4 << 20, 1).0);
        assert_eq!(off.kept(), 0);
        // Given back by the cache's thread once it is `keep` old.
        let c = cache(1 << 30, Duration::from_millis(200));
        drop(fill(&c, 4 << 20, 1).0);
        assert!(c.kept() > 0);
        let start = Instant::now();
        while c.kept() > 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(c.kept(), 0, "still kept after {:?}", start.elapsed());
        assert!(start.elapsed() >= Duration::from_millis(150));
        // And the next free starts the thread again.
        drop(fill(&c, 4 << 20, 1).0);
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(c.kept(), 0);
    }
}
