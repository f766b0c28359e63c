//! What the GPU backends share: a driver's panic turned into an error, the cache of the
//! devices a process opened, the pieces of a load's conversions ([`Convert`]), and the
//! batching of those pieces through one bounded scratch buffer on the device
//! ([`scratch_batches`]). Each backend brings its own places on the device (an address, a
//! buffer and an offset: [`At`]) and its own kernels; its copies are the engine's
//! [`Piece`]s to those places.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::plan::PlanItem;
use crate::read::engine::{At, Piece};
use crate::read::file::HostFile;
use crate::read::gather::Span;

/// Alignment of each input in a conversion's scratch buffer (and of each output's start):
/// the binding alignment wgpu asks and the one CUDA's arena keeps.
pub(crate) const SCRATCH_ALIGN: u64 = 256;

/// Runs `f`, turning a panic inside a driver or a GPU crate (a symbol missing from an old
/// driver, say) into the error `on_panic` makes.
pub(crate) fn guarded<T>(
    on_panic: impl FnOnce() -> Error,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err(on_panic()))
}

/// The backends a process opened, one per device index, kept for the life of the process
/// (contexts and devices are costly to create, and their rings and kernels are reused).
pub(crate) struct Opened<B>(OnceLock<Mutex<HashMap<usize, Arc<B>>>>);

impl<B> Opened<B> {
    /// An empty cache, for a `static`.
    pub(crate) const fn new() -> Self {
        Opened(OnceLock::new())
    }

    /// The backend of device `index`: the one opened before, else the one `open` makes,
    /// kept when it opens (a failure is tried again by the next call). The cache stays
    /// locked while `open` runs, so that two threads never open one device twice.
    pub(crate) fn get_or_open(
        &self,
        index: usize,
        open: impl FnOnce() -> Result<B>,
    ) -> Result<Arc<B>> {
        let map = self.0.get_or_init(Default::default);
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(&index) {
            return Ok(b.clone());
        }
        let b = Arc::new(open()?);
        map.insert(index, b.clone());
        Ok(b)
    }
}

/// A piece of a tensor to convert: `elements` elements of its input (`src`, a multiple of
/// 256 elements but for its last piece) through `kernel` into `out`.
pub(crate) struct Convert<'n, K, D> {
    /// The tensor (for errors).
    pub tensor: &'n str,
    /// The file its input is read from.
    pub file: &'n HostFile<'n>,
    /// Its input bytes.
    pub src: Span<'n>,
    /// Its number of elements.
    pub elements: u64,
    /// The kernel that converts it.
    pub kernel: K,
    /// Where its output goes.
    pub out: D,
}

impl<'n, K: Copy, D: At> Convert<'n, K, D> {
    /// The pieces of `item`, whose output starts at `out`, each with at most `max_input`
    /// input bytes (outputs at 256-byte aligned offsets).
    pub(crate) fn pieces(
        item: &'n PlanItem<'n>,
        kernel: K,
        out: D,
        max_input: usize,
    ) -> Vec<Convert<'n, K, D>> {
        item.conversion_pieces(max_input)
            .into_iter()
            .map(|p| Convert {
                tensor: item.name,
                file: item.file,
                src: p.src,
                elements: p.elements,
                kernel,
                out: out.at(p.out_offset as u64),
            })
            .collect()
    }

    /// The copy of its input to `dst` (a place in the scratch buffer).
    pub(crate) fn input<S>(&self, dst: S) -> Piece<'n, S> {
        Piece {
            tensor: self.tensor,
            file: self.file,
            src: self.src.clone(),
            dst,
        }
    }
}

/// `pieces` in batches whose inputs fit a scratch buffer of `capacity` bytes together: each
/// batch with the offset of each input in the scratch, each input at a
/// [`SCRATCH_ALIGN`]ed offset and taking `room(piece)` bytes (its length and the padding
/// its kernel reads). A piece larger than the scratch is a batch of its own.
pub(crate) fn scratch_batches<T>(
    pieces: &[T],
    capacity: u64,
    room: impl Fn(&T) -> u64,
) -> impl Iterator<Item = (&[T], Vec<u64>)> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= pieces.len() {
            return None;
        }
        let mut offsets = Vec::new();
        let mut used = 0u64;
        for piece in &pieces[start..] {
            let len = room(piece);
            if !offsets.is_empty() && used + len > capacity {
                break;
            }
            offsets.push(used);
            used = (used + len).next_multiple_of(SCRATCH_ALIGN);
        }
        let batch = &pieces[start..start + offsets.len()];
        start += offsets.len();
        Some((batch, offsets))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fit_the_scratch_at_aligned_offsets() {
        let rooms = [100u64, 200, 50, 600, 10, 250, 300];
        let got: Vec<(Vec<u64>, Vec<u64>)> = scratch_batches(&rooms, 512, |&r| r)
            .map(|(batch, offsets)| (batch.to_vec(), offsets))
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![100, 200], vec![0, 256]),
                (vec![50], vec![0]),
                (vec![600], vec![0]),
                (vec![10, 250], vec![0, 256]),
                (vec![300], vec![0]),
            ]
        );
        for (batch, offsets) in scratch_batches(&rooms, 512, |&r| r) {
            if batch.len() > 1 {
                let last = batch.len() - 1;
                assert!(offsets[last] + batch[last] <= 512);
            }
            assert!(offsets.iter().all(|o| o % SCRATCH_ALIGN == 0));
        }
        assert_eq!(scratch_batches(&[] as &[u64], 512, |&r| r).count(), 0);
    }

    #[test]
    fn a_panic_becomes_the_error() {
        let e = guarded::<()>(
            || Error::new(crate::ErrorKind::Backend, "driver panicked"),
            || panic!("inside a driver"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Backend);
        assert_eq!(guarded(|| unreachable!(), || Ok(3)).unwrap(), 3);
    }

    #[test]
    fn the_cache_opens_once_and_retries_a_failure() {
        static OPENED: Opened<usize> = Opened::new();
        let fail = OPENED.get_or_open(1, || {
            Err(Error::new(crate::ErrorKind::DeviceUnavailable, "not yet"))
        });
        assert!(fail.is_err());
        let a = OPENED.get_or_open(1, || Ok(7)).unwrap();
        let b = OPENED.get_or_open(1, || Ok(8)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(*b, 7);
    }
}
