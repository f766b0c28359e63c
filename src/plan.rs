//! [`LoadPlan`]: everything one load asks of a device (every tensor to place, from one file
//! or many, at once, each with the file bytes it reads, its shape, dtype and conversion), the
//! [`Upload`] strategy asked for, and the progress and interrupt a backend reports to.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::convert::Conversion;
use crate::device::Device;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::TensorInfo;
use crate::read::file::HostFile;
use crate::read::gather::{Gather, Span};
use crate::slice::Selection;

/// How tensors go up to a GPU: a [`Loader`](crate::Loader) option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Upload {
    /// The fastest way the device allows: on CUDA, staging (registering is serial, and
    /// unsupported by some drivers: it is an explicit choice); on wgpu, in place on adapters
    /// that share host memory, else host import where the driver allows it, else staging.
    #[default]
    Auto,
    /// CUDA: page-lock the read-only mapping of the file in place and copy from it (a
    /// registration the driver refuses falls back to staging for the rest of the load).
    Register,
    /// CUDA and wgpu: copy through a ring of host staging buffers (CUDA: page-locked host
    /// memory; wgpu: buffers the driver allocates for mapping, which on a large-BAR GPU
    /// live in device memory written across the bus).
    Staging,
    /// wgpu, on adapters that share host memory (integrated and software GPUs): create the
    /// tensors' buffers mapped and write them in place.
    InPlace,
    /// wgpu on Vulkan: copy through a ring of page-locked host memory imported into the
    /// device (`VK_EXT_external_memory_host`), read by the GPU's copy engines.
    HostImport,
}

impl FromStr for Upload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Upload::Auto),
            "register" => Ok(Upload::Register),
            "staging" => Ok(Upload::Staging),
            "in-place" | "in_place" | "inplace" => Ok(Upload::InPlace),
            "host-import" | "host_import" | "hostimport" => Ok(Upload::HostImport),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("{s:?}: expected auto, register, staging, in-place or host-import"),
            )),
        }
    }
}

impl fmt::Display for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Upload::Auto => "auto",
            Upload::Register => "register",
            Upload::Staging => "staging",
            Upload::InPlace => "in-place",
            Upload::HostImport => "host-import",
        })
    }
}

/// Whether CPU tensors may be views of the file's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    /// Owned copies (the safe default).
    Copy,
    /// Zero-copy views where possible (the caller promised the file does not change).
    Mapped,
}

/// One tensor of a [`LoadPlan`].
#[derive(Debug, Clone)]
pub(crate) struct PlanItem<'f> {
    /// The tensor's name.
    pub name: &'f str,
    /// The file that holds it.
    pub file: &'f HostFile<'f>,
    /// The shape of what is loaded (the part's, for a slice or a split).
    pub shape: Vec<usize>,
    /// The file bytes to read, in order.
    pub input: Gather,
    /// The conversion to apply on the device, if any.
    pub conversion: Option<Conversion>,
    /// The dtype of the loaded tensor.
    pub out_dtype: Dtype,
    /// The size of the loaded tensor in bytes.
    pub out_len: usize,
}

impl PlanItem<'_> {
    /// All of its input bytes.
    pub fn span(&self) -> Span<'_> {
        Span::all(&self.input)
    }

    /// The number of input bytes.
    pub fn in_len(&self) -> usize {
        self.input.len()
    }

    /// Its conversion cut into pieces of at most `max` input bytes, for a bounded scratch
    /// buffer: each a whole number of elements, a multiple of 256 of them but for the last
    /// (so that kernels working on 4-byte units never share one, and output offsets stay
    /// 256-aligned for elements of 1 byte or more). Empty without a conversion.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub fn conversion_pieces(&self, max: usize) -> Vec<ConversionPiece<'_>> {
        let Some(conversion) = self.conversion else {
            return Vec::new();
        };
        let (in_size, out_size) = (conversion.from().bits() / 8, conversion.to().bits() / 8);
        let per = (max / in_size / 256 * 256).max(256);
        let span = self.span();
        let total = span.len() / in_size;
        (0..total)
            .step_by(per)
            .map(|first| {
                let n = per.min(total - first);
                ConversionPiece {
                    src: span.part(first * in_size..(first + n) * in_size),
                    elements: n as u64,
                    out_offset: first * out_size,
                }
            })
            .collect()
    }
}

/// A piece of a tensor's conversion ([`PlanItem::conversion_pieces`]).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) struct ConversionPiece<'a> {
    /// Its input bytes.
    pub src: Span<'a>,
    /// Its number of elements.
    pub elements: u64,
    /// Where its output starts in the tensor's output, in bytes.
    pub out_offset: usize,
}

/// A tensor to place: where it is, and what of it to take.
pub(crate) struct PlanEntry<'f> {
    /// Its name.
    pub name: &'f str,
    /// The file that holds it.
    pub file: &'f HostFile<'f>,
    /// Its header entry.
    pub info: &'f TensorInfo,
    /// What of it to take.
    pub selection: Selection<'f>,
}

/// Everything one load asks of a device: every tensor to place, from one file or many, in
/// file order.
pub(crate) struct LoadPlan<'f> {
    origin: Option<&'f Path>,
    items: Vec<PlanItem<'f>>,
    view: View,
    upload: Upload,
    /// The least capacity of a CPU arena (see [`with_arena_capacity`](Self::with_arena_capacity)).
    arena_capacity: usize,
    total: u64,
    done: AtomicU64,
    progress: Option<&'f (dyn Fn(u64, u64) + Sync)>,
    interrupt: Option<&'f AtomicBool>,
    report: Mutex<PlanReport>,
}

/// What a backend tells about a load as it goes: the upload path taken, and fallbacks.
#[derive(Debug, Default)]
struct PlanReport {
    upload: Option<Upload>,
    notes: Vec<String>,
}

impl fmt::Debug for LoadPlan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadPlan")
            .field("origin", &self.origin)
            .field("items", &self.items.len())
            .field("view", &self.view)
            .field("upload", &self.upload)
            .finish()
    }
}

/// What a load converts: floating tensors to one dtype, 64-bit types to 32 bits, or both (a
/// floating tensor takes the dtype where one is given).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cast {
    /// The dtype floating tensors are cast to.
    pub dtype: Option<Dtype>,
    /// Whether I64, U64 and F64 tensors load as I32, U32 and F32
    /// ([`Conversion::NARROWING`]).
    pub narrow_64: bool,
}

impl Cast {
    /// The conversion a tensor of `from` takes, if any, or why the one asked for is not in
    /// the table.
    pub fn conversion(self, from: Dtype) -> std::result::Result<Option<Conversion>, String> {
        match self.dtype {
            Some(to) if from.is_float() => match Conversion::between(from, to) {
                Some(c) => Ok(Some(c)),
                None if from == to => Ok(None),
                None => Err(format!("no conversion from {from} to {to}")),
            },
            _ if self.narrow_64 => Ok(Conversion::narrowing(from)),
            _ => Ok(None),
        }
    }
}

impl<'f> LoadPlan<'f> {
    /// A plan for `entries` (from `origin`: a file or a checkpoint's folder, for errors),
    /// each tensor converted as `cast` says (others load as they are).
    pub fn new(origin: Option<&'f Path>, entries: Vec<PlanEntry<'f>>, cast: Cast) -> Result<Self> {
        let mut items = Vec::with_capacity(entries.len());
        for PlanEntry {
            name,
            file,
            info,
            selection,
        } in entries
        {
            let tag = |e: Error| e.with_tensor(name).with_opt_file(file.path());
            let conversion = cast
                .conversion(info.dtype)
                .map_err(|why| tag(Error::new(ErrorKind::Unsupported, why)))?;
            let (shape, input) = selection
                .resolve(info, file.header().file_range(info))
                .map_err(tag)?;
            let (out_dtype, out_len) = match conversion {
                Some(c) => (
                    c.to(),
                    c.output_len(input.len()).ok_or_else(|| {
                        tag(Error::new(
                            ErrorKind::SizeOverflow,
                            format!("{} bytes converted to {}", input.len(), c.to()),
                        ))
                    })?,
                ),
                None => (info.dtype, input.len()),
            };
            items.push(PlanItem {
                name,
                file,
                shape,
                input,
                conversion,
                out_dtype,
                out_len,
            });
        }
        let total = items.iter().map(|i| i.in_len() as u64).sum();
        Ok(LoadPlan {
            origin,
            items,
            view: View::Copy,
            upload: Upload::Auto,
            arena_capacity: 0,
            total,
            done: AtomicU64::new(0),
            progress: None,
            interrupt: None,
            report: Mutex::new(PlanReport::default()),
        })
    }

    /// Whether CPU tensors may be views of the mapping.
    pub fn with_view(mut self, view: View) -> Self {
        self.view = view;
        self
    }

    /// The upload strategy asked for.
    pub fn with_upload(mut self, upload: Upload) -> Self {
        self.upload = upload;
        self
    }

    /// Asks the CPU backend for an arena of at least `capacity` bytes, whatever the tensors
    /// need: loads of varying sizes that ask the same (a stream's batches) take each other's
    /// freed memory from the host cache (see [`HostBuffer::reusable`](crate::memory::HostBuffer::reusable)).
    pub fn with_arena_capacity(mut self, capacity: usize) -> Self {
        self.arena_capacity = capacity;
        self
    }

    /// The least capacity of a CPU arena.
    pub fn arena_capacity(&self) -> usize {
        self.arena_capacity
    }

    /// Reports progress to `progress(done, total)`, in input bytes.
    pub fn with_progress(mut self, progress: &'f (dyn Fn(u64, u64) + Sync)) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The tensors, in file order.
    pub fn items(&self) -> &[PlanItem<'f>] {
        &self.items
    }

    /// Whether CPU tensors may be views of the mapping.
    pub fn view(&self) -> View {
        self.view
    }

    /// The upload strategy asked for.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn upload(&self) -> Upload {
        self.upload
    }

    /// Records `n` more input bytes placed (from any thread) and reports the new total; an
    /// [`ErrorKind::Interrupted`] error once the caller's interrupt flag is set.
    pub fn advance(&self, n: u64) -> Result<()> {
        if n > 0 {
            let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
            if let Some(p) = self.progress {
                p(done.min(self.total), self.total);
            }
        }
        match self.interrupt {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(self.err(Error::new(
                ErrorKind::Interrupted,
                "the caller stopped the load",
            ))),
            _ => Ok(()),
        }
    }

    /// Stops the load with [`ErrorKind::Interrupted`] once `flag` is set.
    pub fn with_interrupt(mut self, flag: Option<&'f AtomicBool>) -> Self {
        self.interrupt = flag;
        self
    }

    /// Reports the load complete, if the backend's reports have not reached the total.
    pub fn finish(&self) {
        let done = self.done.swap(self.total, Ordering::Relaxed);
        if let (Some(p), true) = (self.progress, done < self.total || self.total == 0) {
            p(self.total, self.total);
        }
    }

    /// Records the way up the backend took (the last one recorded wins).
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn note_upload(&self, upload: Upload) {
        self.report.lock().unwrap_or_else(|p| p.into_inner()).upload = Some(upload);
    }

    /// Records a fallback taken, in words.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn note(&self, note: String) {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notes
            .push(note);
    }

    /// The upload path and the notes recorded.
    pub fn take_report(&self) -> (Option<Upload>, Vec<String>) {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        (r.upload.take(), std::mem::take(&mut r.notes))
    }

    /// An [`ErrorKind::Unsupported`] error for an upload strategy this load cannot take.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub fn unsupported_upload(&self, device: Device, why: &str) -> Error {
        self.err(Error::new(
            ErrorKind::Unsupported,
            format!("{device}: upload {}: {why}", self.upload),
        ))
    }

    /// Tags an error with the load's file (or checkpoint folder), unless it names one.
    pub fn err(&self, e: Error) -> Error {
        e.with_opt_file(self.origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_strategies_parse() {
        for u in [
            Upload::Auto,
            Upload::Register,
            Upload::Staging,
            Upload::InPlace,
            Upload::HostImport,
        ] {
            assert_eq!(u.to_string().parse::<Upload>().unwrap(), u);
        }
        assert!("fast".parse::<Upload>().is_err());
    }
}
