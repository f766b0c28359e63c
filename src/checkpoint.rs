//! Checkpoints as users have them: one `.safetensors` file, a folder of shards with their
//! `model.safetensors.index.json` (as `transformers` writes them), a folder of shards
//! without an index, or the index file itself.
//!
//! [`open`] reads every shard's header and nothing else (positioned reads of the 8-byte
//! length and the JSON; no mapping, no tensor byte), on many threads, and checks the index
//! against the shards. A load ([`Loader::load_checkpoint`](crate::Loader::load_checkpoint))
//! then reads the tensors it selects from every shard at once, into one plan.
//!
//! The index rules, each an [`ErrorKind::InvalidIndex`] error naming the file and the
//! tensor: every shard it names exists; every tensor it maps is in the shard it maps it
//! to; no tensor is in two shards; every tensor of a shard is in the index; and no
//! `.safetensors` file beside the index that looks like one of its shards (named
//! `*-NNNNN-of-NNNNN.safetensors`, or holding a tensor the index names) is missing from it.
//! Other files beside it (a `consolidated.safetensors` in another naming, say) are not part
//! of the checkpoint.

use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use indexmap::IndexMap;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::{Header, Metadata};
use crate::parallel::{self, Threads};
use crate::read::file::{HostFile, ReadMode};

/// The index file `transformers` writes beside its shards.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// The largest index file read, in bytes (real ones are well under a megabyte).
const MAX_INDEX_LEN: u64 = 256 << 20;

/// A checkpoint's layout: its files, their headers, and where each tensor is. Opening one
/// reads headers only; see the [module documentation](self).
///
/// ```no_run
/// let ckpt = tensorplace::open("Llama-3.1-8B/")?;
/// for t in ckpt.iter().take(3) {
///     println!("{} {} {:?} in {}", t.name, t.dtype, t.shape, t.file.display());
/// }
/// let layer0 = tensorplace::Loader::new("cuda:0")
///     .filter(|name| name.starts_with("model.layers.0."))
///     .load_checkpoint(&ckpt)?;
/// # Ok::<(), tensorplace::Error>(())
/// ```
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
    /// Every tensor and the shard that holds it: shards in name order, tensors in file order.
    names: IndexMap<String, usize>,
    index: Option<Index>,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    header: Header,
}

#[derive(Debug)]
struct Index {
    metadata: Metadata,
    total_size: Option<u64>,
}

impl Index {
    /// The `metadata` of an index's JSON: its `total_size`, and every entry as text.
    fn of(json: &serde_json::Value) -> Index {
        let metadata = json.get("metadata").and_then(|m| m.as_object());
        Index {
            total_size: metadata
                .and_then(|m| m.get("total_size"))
                .and_then(|v| v.as_u64()),
            metadata: metadata
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| match v {
                            serde_json::Value::String(s) => (k.clone(), s.clone()),
                            other => (k.clone(), other.to_string()),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// One tensor of a [`Checkpoint`], as its shard's header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TensorEntry<'c> {
    /// Its name.
    pub name: &'c str,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'c [usize],
    /// The file that holds it.
    pub file: &'c Path,
    /// Its bytes' range in that file.
    pub range: Range<usize>,
}

/// Opens the checkpoint at `path` (a file, a folder or an index) reading headers only:
/// [`Checkpoint::open`].
pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
    Checkpoint::open(path)
}

/// Whether `path` names a checkpoint of several files: a folder, or an index (`.json`).
pub fn is_multi_file(path: &Path) -> bool {
    path.is_dir() || path.extension().is_some_and(|e| e == "json")
}

fn index_err(file: &Path, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidIndex, msg).with_file(file)
}

/// An index's text as JSON.
fn index_json(index_path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| index_err(index_path, format!("not valid JSON: {e}")))
}

/// An index's `weight_map` object.
fn weight_map_of<'j>(
    index_path: &Path,
    json: &'j serde_json::Value,
) -> Result<&'j serde_json::Map<String, serde_json::Value>> {
    json.get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| index_err(index_path, "no \"weight_map\" object"))
}

/// What an index's `weight_map` maps each tensor to, in its order, and the shards it names,
/// in name order; a file name that is not one inside the folder is an error.
fn weight_map<'j>(
    index_path: &Path,
    map: &'j serde_json::Map<String, serde_json::Value>,
) -> Result<(IndexMap<&'j str, &'j str>, Vec<&'j str>)> {
    let mut weight_map: IndexMap<&str, &str> = IndexMap::with_capacity(map.len());
    let mut files: Vec<&str> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            index_err(
                index_path,
                format!("the weight_map entry of {name:?} is not a file name"),
            )
            .with_tensor(name)
        })?;
        let relative = Path::new(file);
        if !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(index_err(
                index_path,
                format!("{file:?} is not a file name inside the checkpoint's folder"),
            )
            .with_tensor(name));
        }
        weight_map.insert(name, file);
        if !files.contains(&file) {
            files.push(file);
        }
    }
    files.sort_unstable();
    Ok((weight_map, files))
}

/// The paths of the shards `files` in `dir`; a missing one is an error naming the first
/// tensor the index maps to it.
fn shard_paths(
    dir: &Path,
    index_path: &Path,
    files: &[&str],
    weight_map: &IndexMap<&str, &str>,
) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for (file, path) in files.iter().zip(&paths) {
        if !path.is_file() {
            let first = weight_map.iter().find(|(_, f)| *f == file).map(|(n, _)| *n);
            let e = index_err(
                path,
                format!(
                    "a shard the index names is missing ({})",
                    index_path.display()
                ),
            );
            return Err(match first {
                Some(name) => e.with_tensor(name),
                None => e,
            });
        }
    }
    Ok(paths)
}

/// Every tensor the index maps is in the shard it maps it to (`shards` in the order of
/// `files`).
fn check_mapped_tensors(
    files: &[&str],
    weight_map: &IndexMap<&str, &str>,
    shards: &[Shard],
) -> Result<()> {
    for (&name, &file) in weight_map {
        let k = files.binary_search(&file).unwrap_or(0);
        if shards[k].header.tensors().contains_key(name) {
            continue;
        }
        let holder = shards
            .iter()
            .find(|s| s.header.tensors().contains_key(name));
        let msg = match holder {
            Some(other) => format!(
                "the index maps it to this file, but {} holds it",
                other.path.display()
            ),
            None => "the index maps it to this file, and no shard holds it".to_owned(),
        };
        return Err(index_err(&shards[k].path, msg).with_tensor(name));
    }
    Ok(())
}

/// Every tensor of a shard is in the index, mapped to that shard (a tensor in two shards is
/// caught here or by `Checkpoint::from_shards`).
fn check_indexed_tensors(
    dir: &Path,
    index_path: &Path,
    weight_map: &IndexMap<&str, &str>,
    shards: &[Shard],
) -> Result<()> {
    for shard in shards {
        for name in shard.header.tensors().keys() {
            match weight_map.get(name.as_str()) {
                Some(file) if dir.join(file) == shard.path => {}
                Some(file) => {
                    return Err(index_err(
                        &shard.path,
                        format!("this shard holds it too, but the index maps it to {file}"),
                    )
                    .with_tensor(name));
                }
                None => {
                    return Err(index_err(
                        &shard.path,
                        format!("the index ({}) never mentions it", index_path.display()),
                    )
                    .with_tensor(name));
                }
            }
        }
    }
    Ok(())
}

impl Checkpoint {
    /// Opens the checkpoint at `path`, reading headers only:
    ///
    /// - a `.safetensors` file: that file;
    /// - a folder: its `model.safetensors.index.json` (or its one `*.safetensors.index.json`)
    ///   with the shards it names; without an index, every `*.safetensors` in it, in name
    ///   order (a tensor in two of them is an [`ErrorKind::DuplicateName`] error);
    /// - an index file: the shards it names, beside it.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        if path.is_dir() {
            return match find_index(path)? {
                Some(index) => Checkpoint::with_index(path, &index),
                None => Checkpoint::folder(path),
            };
        }
        if path.extension().is_some_and(|e| e == "json") {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Checkpoint::with_index(dir, path);
        }
        let shard = read_headers(&[path.to_path_buf()])?.remove(0);
        Checkpoint::from_shards(path, vec![shard], None)
    }

    /// Every `*.safetensors` of `dir`, in name order.
    fn folder(dir: &Path) -> Result<Checkpoint> {
        let files = safetensors_in(dir)?;
        if files.is_empty() {
            return Err(Error::new(
                ErrorKind::Io,
                "no .safetensors file and no index in this folder",
            )
            .with_file(dir));
        }
        let shards = read_headers(&files)?;
        Checkpoint::from_shards(dir, shards, None)
    }

    /// The shards `index` names, checked against it.
    fn with_index(dir: &Path, index_path: &Path) -> Result<Checkpoint> {
        let json = index_json(index_path, &read_index(index_path)?)?;
        let (weight_map, files) = weight_map(index_path, weight_map_of(index_path, &json)?)?;
        let paths = shard_paths(dir, index_path, &files, &weight_map)?;
        let shards = read_headers(&paths)?;
        check_mapped_tensors(&files, &weight_map, &shards)?;
        check_indexed_tensors(dir, index_path, &weight_map, &shards)?;
        check_unlisted(dir, &files, &weight_map)?;
        Checkpoint::from_shards(dir, shards, Some(Index::of(&json)))
    }

    /// The checkpoint of the index at `url` (an object's URL, see [`crate::remote`]): its
    /// shards are the objects beside it that its `weight_map` names, checked against it as
    /// a local index's are (but for files the index does not list: an object store is not
    /// listed).
    #[cfg(feature = "remote")]
    pub(crate) fn open_remote(
        url: &str,
        options: &crate::remote::RemoteOptions,
    ) -> Result<Checkpoint> {
        let index_path = Path::new(url);
        let bad = |msg: String| index_err(index_path, msg);
        let bytes = crate::remote::fetch(url, options, MAX_INDEX_LEN)?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        let json = index_json(index_path, &text)?;
        let (weight_map, files) = weight_map(index_path, weight_map_of(index_path, &json)?)?;
        let dir = Path::new(url.rsplit_once('/').map_or(url, |(dir, _)| dir));
        let threads = if files.len() > 1 {
            Threads::Io
        } else {
            Threads::Caller
        };
        let shards = parallel::map(files.clone(), threads, |file: &str| {
            let path = dir.join(file);
            let shard = path.to_str().unwrap_or_default();
            let header = crate::remote::open(shard, options).map_err(|e| {
                let missing = std::error::Error::source(&e)
                    .and_then(|c| c.downcast_ref::<std::io::Error>())
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound);
                if !missing {
                    return e;
                }
                let first = weight_map
                    .iter()
                    .find(|(_, f)| **f == file)
                    .map(|(n, _)| *n);
                let e = index_err(&path, format!("a shard the index names is missing ({url})"));
                match first {
                    Some(name) => e.with_tensor(name),
                    None => e,
                }
            })?;
            Ok(Shard {
                path,
                header: header.into_header(),
            })
        })?;
        check_mapped_tensors(&files, &weight_map, &shards)?;
        check_indexed_tensors(dir, index_path, &weight_map, &shards)?;
        Checkpoint::from_shards(dir, shards, Some(Index::of(&json)))
    }

    fn from_shards(path: &Path, shards: Vec<Shard>, index: Option<Index>) -> Result<Checkpoint> {
        let count = shards.iter().map(|s| s.header.tensors().len()).sum();
        let mut names: IndexMap<String, usize> = IndexMap::with_capacity(count);
        for (k, shard) in shards.iter().enumerate() {
            for name in shard.header.tensors().keys() {
                if let Some(&other) = names.get(name) {
                    let kind = match index {
                        Some(_) => ErrorKind::InvalidIndex,
                        None => ErrorKind::DuplicateName,
                    };
                    return Err(Error::new(
                        kind,
                        format!("{} holds this tensor too", shards[other].path.display()),
                    )
                    .with_file(&shard.path)
                    .with_tensor(name));
                }
                names.insert(name.clone(), k);
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            shards,
            names,
            index,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether it holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The tensors' names: shards in name order, tensors in file order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The tensor `name`, if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<TensorEntry<'_>> {
        let (name, &k) = self.names.get_key_value(name)?;
        let shard = &self.shards[k];
        let info = shard.header.tensors().get(name)?;
        Some(TensorEntry {
            name,
            dtype: info.dtype,
            shape: &info.shape,
            file: &shard.path,
            range: shard.header.file_range(info),
        })
    }

    /// The tensor `name`, or an [`ErrorKind::TensorNotFound`] error.
    pub fn tensor(&self, name: &str) -> Result<TensorEntry<'_>> {
        self.get(name).ok_or_else(|| {
            Error::new(ErrorKind::TensorNotFound, "no tensor of this name")
                .with_tensor(name)
                .with_file(&self.path)
        })
    }

    /// Every tensor, in order.
    pub fn iter(&self) -> impl Iterator<Item = TensorEntry<'_>> {
        self.names().filter_map(|n| self.get(n))
    }

    /// Its files, in name order.
    pub fn files(&self) -> impl ExactSizeIterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// The `__metadata__` of the file `file` (one of [`files`](Self::files)).
    pub fn file_metadata(&self, file: &Path) -> Option<&Metadata> {
        self.shards
            .iter()
            .find(|s| s.path == file)
            .and_then(|s| s.header.metadata())
    }

    /// The `__metadata__` of its files where they all have the same (one file: its own;
    /// `transformers` writes `{"format": "pt"}` in every shard); otherwise `None`.
    pub fn metadata(&self) -> Option<&Metadata> {
        let first = self.shards.first()?.header.metadata();
        self.shards
            .iter()
            .all(|s| s.header.metadata() == first)
            .then_some(first)
            .flatten()
    }

    /// The index's `metadata` object (values that are not strings in their JSON text), for
    /// a checkpoint opened through an index.
    pub fn index_metadata(&self) -> Option<&Metadata> {
        self.index.as_ref().map(|i| &i.metadata)
    }

    /// The index's `metadata.total_size`, where it has one.
    pub fn total_size(&self) -> Option<u64> {
        self.index.as_ref().and_then(|i| i.total_size)
    }

    /// The bytes of all its tensors.
    pub fn data_len(&self) -> u64 {
        self.shards.iter().map(|s| s.header.data_len() as u64).sum()
    }

    /// Each file with the names of its tensors that `keep` accepts, in order; files with
    /// none are left out.
    pub(crate) fn plan_files<'c>(
        &'c self,
        keep: &dyn Fn(&str) -> bool,
    ) -> Vec<(&'c Path, &'c Header, Vec<&'c str>)> {
        self.shards
            .iter()
            .map(|s| {
                let names: Vec<&str> = s
                    .header
                    .tensors()
                    .keys()
                    .map(String::as_str)
                    .filter(|n| keep(n))
                    .collect();
                (s.path.as_path(), &s.header, names)
            })
            .filter(|(_, _, names)| !names.is_empty())
            .collect()
    }
}

/// The index of folder `dir`: `model.safetensors.index.json`, else its one
/// `*.safetensors.index.json`; several others are an error.
fn find_index(dir: &Path) -> Result<Option<PathBuf>> {
    let default = dir.join(INDEX_NAME);
    if default.is_file() {
        return Ok(Some(default));
    }
    let mut found: Vec<PathBuf> = list(dir)?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".safetensors.index.json"))
        })
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(index_err(
            dir,
            format!(
                "{} index files and none named {INDEX_NAME}: open the one you mean",
                found.len()
            ),
        )),
    }
}

/// The regular files of `dir`, in name order.
fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing", Some(dir), e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", Some(dir), e))?;
        let path = entry.path();
        if path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The `*.safetensors` files of `dir`, in name order.
fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list(dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect())
}

/// Reads an index file, bounded in size.
fn read_index(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io("reading", Some(path), e))?
        .len();
    if len > MAX_INDEX_LEN {
        return Err(index_err(
            path,
            format!("{len} bytes: over the {MAX_INDEX_LEN}-byte limit for an index"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", Some(path), e))?;
    String::from_utf8(bytes).map_err(|_| index_err(path, "not UTF-8"))
}

/// Reads the header of every file in `paths` (and nothing else), on the reader pool.
fn read_headers(paths: &[PathBuf]) -> Result<Vec<Shard>> {
    let threads = if paths.len() > 1 {
        Threads::Io
    } else {
        Threads::Caller
    };
    parallel::map(paths.iter().collect(), threads, |path: &PathBuf| {
        let header = HostFile::open(path, ReadMode::Pread)?.into_header();
        Ok(Shard {
            path: path.clone(),
            header,
        })
    })
}

/// Whether a file name looks like a shard of `transformers`: `*-NNNNN-of-NNNNN.safetensors`.
fn shard_like(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".safetensors") else {
        return false;
    };
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    matches!(parts.as_slice(), [total, "of", index, _]
        if !total.is_empty() && !index.is_empty()
            && total.bytes().all(|b| b.is_ascii_digit())
            && index.bytes().all(|b| b.is_ascii_digit()))
}

/// Fails on a `.safetensors` file beside the index that the index does not list but that
/// belongs to the checkpoint: named like a shard, or holding a tensor the index names.
fn check_unlisted(dir: &Path, listed: &[&str], weight_map: &IndexMap<&str, &str>) -> Result<()> {
    for path in safetensors_in(dir)? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if listed.contains(&name) {
            continue;
        }
        if shard_like(name) {
            return Err(index_err(
                &path,
                "a shard the index never mentions (named like its shards)",
            ));
        }
        // A file of its own name that is not a safetensors file (a partial download, say)
        // cannot be one of the index's shards: not part of the checkpoint, like the others.
        let Ok(file) = HostFile::open(&path, ReadMode::Pread) else {
            continue;
        };
        if let Some(shared) = file
            .into_header()
            .tensors()
            .keys()
            .find(|n| weight_map.contains_key(n.as_str()))
        {
            return Err(index_err(
                &path,
                "a shard the index never mentions (it holds a tensor the index names)",
            )
            .with_tensor(shared));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert!(shard_like("model-00001-of-00004.safetensors"));
        assert!(shard_like(
            "diffusion_pytorch_model-00002-of-00002.safetensors"
        ));
        assert!(!shard_like("model.safetensors"));
        assert!(!shard_like("consolidated.safetensors"));
        assert!(!shard_like("model-00001-of-x.safetensors"));
    }
}
