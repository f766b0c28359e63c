//! Writing safetensors: the same bytes as the reference writer (`safetensors::serialize`),
//! and file writes that never damage the file that was there before.

use std::borrow::Cow;
use std::path::Path;

use serde::ser::{SerializeMap, Serializer};

use crate::atomic;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::{METADATA_KEY, Metadata, N_LEN};
use crate::tensor::{Tensor, Tensors};

#[derive(serde::Serialize)]
struct EntryOut<'a> {
    dtype: &'static str,
    shape: &'a [usize],
    data_offsets: (usize, usize),
}

struct HeaderOut<'a> {
    metadata: Option<&'a Metadata>,
    entries: Vec<(&'a str, EntryOut<'a>)>,
}

impl serde::Serialize for HeaderOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let extra = usize::from(self.metadata.is_some());
        let mut map = s.serialize_map(Some(self.entries.len() + extra))?;
        if let Some(md) = self.metadata {
            map.serialize_entry(METADATA_KEY, md)?;
        }
        for (name, entry) in &self.entries {
            map.serialize_entry(name, entry)?;
        }
        map.end()
    }
}

/// A tensor to write from bytes the caller holds (an array of another library, say), for
/// [`save_views`] and [`save_views_file`]: no copy is made.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// `data` (little-endian, row-major) as a tensor of `dtype` and `shape`; a length that
    /// does not match is an [`ErrorKind::InvalidTensor`] error when it is saved.
    pub fn new(dtype: Dtype, shape: &'a [usize], data: &'a [u8]) -> Self {
        TensorView { dtype, shape, data }
    }

    /// The bytes it will write.
    pub fn len_bytes(&self) -> usize {
        self.data.len()
    }
}

/// What the writer needs of a tensor, whoever holds its bytes.
pub(crate) trait Entry {
    fn dtype(&self) -> Dtype;
    fn shape(&self) -> &[usize];
    fn len_bytes(&self) -> usize;
    /// Its bytes on the host (a copy for a GPU tensor).
    fn bytes(&self) -> Result<Cow<'_, [u8]>>;
}

impl Entry for Tensor {
    fn dtype(&self) -> Dtype {
        Tensor::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }
    fn len_bytes(&self) -> usize {
        Tensor::len_bytes(self)
    }
    fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        self.host_bytes()
    }
}

impl Entry for TensorView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn len_bytes(&self) -> usize {
        self.data.len()
    }
    fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(self.data))
    }
}

/// The reference writer's layout of a file.
struct Layout<'a, E> {
    /// The 8-byte length followed by the JSON header padded with spaces to a multiple of 8.
    head: Vec<u8>,
    /// The tensors in the order their bytes follow the header.
    order: Vec<(&'a str, &'a E)>,
}

/// Lays out `entries` (names distinct) as the reference writer does, with `metadata`.
fn layout<'a, E: Entry>(
    mut order: Vec<(&'a str, &'a E)>,
    metadata: Option<&'a Metadata>,
) -> Result<Layout<'a, E>> {
    // Descending dtype order, then name: `safetensors::serialize`'s order.
    order.sort_by(|(ln, lt), (rn, rt)| rt.dtype().cmp(&lt.dtype()).then(ln.cmp(rn)));
    if let Some(w) = order.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(
            Error::new(ErrorKind::InvalidTensor, "two tensors of one name").with_tensor(w[0].0),
        );
    }
    let mut offset = 0usize;
    let mut entries = Vec::with_capacity(order.len());
    for &(name, t) in &order {
        if name == METADATA_KEY {
            return Err(Error::new(
                ErrorKind::InvalidTensor,
                "the name is reserved for the file's metadata",
            )
            .with_tensor(name));
        }
        let need = t
            .shape()
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| t.dtype().bytes_for(n));
        if need != Some(t.len_bytes()) {
            return Err(Error::new(
                ErrorKind::InvalidTensor,
                format!(
                    "{} bytes do not match shape {:?} of {}",
                    t.len_bytes(),
                    t.shape(),
                    t.dtype()
                ),
            )
            .with_tensor(name));
        }
        let end = offset
            .checked_add(t.len_bytes())
            .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "the tensors' total size"))?;
        entries.push((
            name,
            EntryOut {
                dtype: t.dtype().name(),
                shape: t.shape(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let mut head = vec![0u8; N_LEN];
    serde_json::to_writer(&mut head, &HeaderOut { metadata, entries })
        .map_err(|e| Error::new(ErrorKind::InvalidTensor, e.to_string()).with_source(e))?;
    let n = (head.len() - N_LEN).next_multiple_of(N_LEN);
    head.resize(N_LEN + n, b' ');
    head[..N_LEN].copy_from_slice(&(n as u64).to_le_bytes());
    Ok(Layout { head, order })
}

/// The bytes of a whole file: the header, then every tensor's bytes.
fn to_bytes<E: Entry>(Layout { head, order }: Layout<'_, E>) -> Result<Vec<u8>> {
    let total = order.iter().map(|(_, t)| t.len_bytes()).sum::<usize>();
    let mut out = Vec::new();
    out.try_reserve_exact(head.len() + total).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            "cannot allocate the output in host memory",
        )
    })?;
    out.extend_from_slice(&head);
    for (name, t) in order {
        out.extend_from_slice(&t.bytes().map_err(|e| e.with_tensor(name))?);
    }
    Ok(out)
}

/// A file of tensors the caller holds, laid out as the reference writer lays it out, to be
/// written into memory the caller gives ([`serialize_views`]): a binding can fill an object
/// of its own (a Python `bytes`) with one copy, where [`save_views`] returns a `Vec`.
pub struct Serialized<'a, 'v> {
    layout: Layout<'a, TensorView<'v>>,
    len: usize,
}

impl std::fmt::Debug for Serialized<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serialized")
            .field("tensors", &self.layout.order.len())
            .field("len", &self.len)
            .finish()
    }
}

impl Serialized<'_, '_> {
    /// The file's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the file's bytes into `out`, whose length must be [`len`](Self::len) (else an
    /// [`ErrorKind::InvalidTensor`] error).
    pub fn write_into(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.len {
            return Err(Error::new(
                ErrorKind::InvalidTensor,
                format!(
                    "the destination holds {} bytes, the file {}",
                    out.len(),
                    self.len
                ),
            ));
        }
        let (head, mut rest) = out.split_at_mut(self.layout.head.len());
        head.copy_from_slice(&self.layout.head);
        for (_, view) in &self.layout.order {
            let (dst, tail) = rest.split_at_mut(view.data.len());
            dst.copy_from_slice(view.data);
            rest = tail;
        }
        Ok(())
    }
}

/// Lays out a file of `views` and `metadata` (as [`save_views`] would write it) for
/// [`Serialized::write_into`].
pub fn serialize_views<'a, 'v>(
    views: &'a [(&'a str, TensorView<'v>)],
    metadata: Option<&'a Metadata>,
) -> Result<Serialized<'a, 'v>> {
    let layout = views_layout(views, metadata)?;
    let len = layout
        .order
        .iter()
        .try_fold(layout.head.len(), |n, (_, v)| n.checked_add(v.data.len()))
        .ok_or_else(|| Error::new(ErrorKind::SizeOverflow, "the file's size overflows"))?;
    Ok(Serialized { layout, len })
}

/// Writes a whole file to `path` atomically (see [`save_file`]).
fn to_file<E: Entry>(layout: Layout<'_, E>, path: &Path) -> Result<()> {
    prepare_file(layout, path)?
        .commit()
        .map_err(|e| e.with_file(path))
}

/// The file of `layout` written beside `path`, flushed, not yet renamed over it.
fn prepare_file<E: Entry>(
    Layout { head, order }: Layout<'_, E>,
    path: &Path,
) -> Result<atomic::Prepared> {
    atomic::prepare(path, |w| {
        let io = |e| Error::io("writing", None, e);
        w.write_all(&head).map_err(io)?;
        for (name, t) in order {
            let bytes = t.bytes().map_err(|e| e.with_tensor(name))?;
            w.write_all(&bytes).map_err(io)?;
        }
        Ok(())
    })
    .map_err(|e| e.with_file(path))
}

/// The file of `entries` (names distinct) with `metadata`, written beside `path` and
/// flushed, not yet renamed over it: one shard of a checkpoint.
pub(crate) fn prepare_entries_file<E: Entry>(
    entries: Vec<(&str, &E)>,
    metadata: Option<&Metadata>,
    path: &Path,
) -> Result<atomic::Prepared> {
    let layout = layout(entries, metadata).map_err(|e| e.with_file(path))?;
    prepare_file(layout, path)
}

fn tensors_layout<'a>(
    tensors: &'a Tensors,
    metadata: Option<&'a Metadata>,
) -> Result<Layout<'a, Tensor>> {
    layout(tensors.iter().collect(), metadata.or(tensors.metadata()))
}

fn views_layout<'a, 'v>(
    views: &'a [(&'a str, TensorView<'v>)],
    metadata: Option<&'a Metadata>,
) -> Result<Layout<'a, TensorView<'v>>> {
    layout(views.iter().map(|(n, v)| (*n, v)).collect(), metadata)
}

/// Serializes `tensors` (from any device) into the bytes of a safetensors file, identical
/// to what `safetensors::serialize` writes for the same input.
///
/// The header's `__metadata__` is `metadata` where given, else the tensors' own (a loaded
/// file's; [`Tensors::set_metadata`] changes or clears it).
pub fn save(tensors: &Tensors, metadata: Option<&Metadata>) -> Result<Vec<u8>> {
    to_bytes(tensors_layout(tensors, metadata)?)
}

/// Writes `tensors` to `path`, atomically, with `metadata` where given, else the tensors'
/// own (as [`save`](fn@save)).
///
/// The bytes go to a temporary file beside `path` (`.NAME.tmp-PID-RANDOM`), which is
/// flushed to disk (`fsync`) and then renamed over `path`. A crash, a kill or an error leaves
/// the previous file whole (a temporary left by a killed process is removed by the next
/// save of the same path), two processes saving the same path at once leave one of the two
/// files whole, and saving over a file that is loaded (memory-mapped) is safe: the mapping
/// keeps the old file's data. An existing file's permissions are kept; a new file gets
/// `0644`.
pub fn save_file(
    tensors: &Tensors,
    path: impl AsRef<Path>,
    metadata: Option<&Metadata>,
) -> Result<()> {
    let path = path.as_ref();
    let layout = tensors_layout(tensors, metadata).map_err(|e| e.with_file(path))?;
    to_file(layout, path)
}

/// [`save`](fn@save) of tensors whose bytes the caller holds, written from them with no
/// copy; a name given twice is an [`ErrorKind::InvalidTensor`] error.
pub fn save_views(
    views: &[(&str, TensorView<'_>)],
    metadata: Option<&Metadata>,
) -> Result<Vec<u8>> {
    to_bytes(views_layout(views, metadata)?)
}

/// [`save_file`] of tensors whose bytes the caller holds, written from them with no copy.
pub fn save_views_file(
    views: &[(&str, TensorView<'_>)],
    path: impl AsRef<Path>,
    metadata: Option<&Metadata>,
) -> Result<()> {
    let path = path.as_ref();
    let layout = views_layout(views, metadata).map_err(|e| e.with_file(path))?;
    to_file(layout, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_save_the_bytes_tensors_save() {
        let mut t = Tensors::new();
        t.insert(
            "w",
            Tensor::from_slice(vec![2, 2], &[1.0f32, 2.0, 3.0, 4.0]).unwrap(),
        );
        t.insert("b", Tensor::from_slice(vec![3], &[7u8, 8, 9]).unwrap());
        let md: Metadata = [("format".to_owned(), "np".to_owned())]
            .into_iter()
            .collect();
        let w = t.tensor("w").unwrap().host_bytes().unwrap().into_owned();
        let views = [
            ("w", TensorView::new(Dtype::F32, &[2, 2], &w)),
            ("b", TensorView::new(Dtype::U8, &[3], &[7, 8, 9])),
        ];
        let want = save(&t, Some(&md)).unwrap();
        assert_eq!(save_views(&views, Some(&md)).unwrap(), want);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.safetensors");
        save_views_file(&views, &path, Some(&md)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // A name twice, and bytes that do not match the shape: errors naming the tensor.
        let twice = [views[0], views[0]];
        let e = save_views(&twice, None).unwrap_err();
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::InvalidTensor, Some("w"))
        );
        let short = [("s", TensorView::new(Dtype::F32, &[2], &[0; 5]))];
        let e = save_views_file(&short, &path, None).unwrap_err();
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::InvalidTensor, Some("s"))
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            want,
            "a failed save keeps the old file"
        );
    }

    #[test]
    fn serialized_views_write_the_bytes_save_views_returns() {
        let data: Vec<u8> = (0..=255).collect();
        let shapes = [vec![4, 4], vec![3], vec![], vec![0, 5]];
        let views = [
            ("b", TensorView::new(Dtype::F32, &shapes[0], &data[..64])),
            ("a", TensorView::new(Dtype::BF16, &shapes[1], &data[64..70])),
            ("c", TensorView::new(Dtype::U8, &shapes[2], &data[70..71])),
            ("d", TensorView::new(Dtype::F64, &shapes[3], &[])),
        ];
        let metadata: Metadata = [("k".to_owned(), "v".to_owned())].into_iter().collect();
        for md in [None, Some(&metadata)] {
            let want = save_views(&views, md).unwrap();
            let file = serialize_views(&views, md).unwrap();
            assert_eq!(file.len(), want.len());
            let mut out = vec![0xAA; file.len()];
            file.write_into(&mut out).unwrap();
            assert_eq!(out, want);
            let e = file.write_into(&mut out[1..]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidTensor);
        }
        // Layout errors are the save's.
        let short = [("x", TensorView::new(Dtype::F32, &shapes[0], &data[..8]))];
        assert_eq!(
            serialize_views(&short, None).unwrap_err().kind(),
            ErrorKind::InvalidTensor
        );
    }

    #[test]
    fn header_is_padded_and_sorted() {
        let mut t = Tensors::new();
        t.insert("b", Tensor::from_slice(vec![1], &[1u8]).unwrap());
        t.insert("a", Tensor::from_slice(vec![1], &[2u8]).unwrap());
        t.insert("z", Tensor::from_slice(vec![1], &[3.0f32]).unwrap());
        let mut md = Metadata::new();
        md.insert("k".into(), "v".into());
        t.set_metadata(Some(md.clone()));
        assert_eq!(save(&t, None).unwrap(), save(&t, Some(&md)).unwrap());
        let other: Metadata = [("o".to_owned(), "p".to_owned())].into_iter().collect();
        assert!(
            save(&t, Some(&other))
                .unwrap()
                .windows(3)
                .any(|w| w == b"\"o\"")
        );
        t.set_metadata(None);
        let bytes = save(&t, None).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let json = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(json.starts_with(r#"{"z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":"#));
        assert_eq!(&bytes[8 + n..], &[0, 0, 64, 64, 2, 1]);
        let bad = Tensor::from_parts(
            Dtype::F32,
            vec![2],
            crate::storage::Storage::Cpu(crate::storage::CpuStorage::copy_of(&[0; 4]).unwrap()),
        );
        t.insert("bad", bad);
        let e = save(&t, None).unwrap_err();
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::InvalidTensor, Some("bad"))
        );
    }
}
