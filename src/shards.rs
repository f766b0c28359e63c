//! Sharded saves: tensors written to a folder as a checkpoint that `huggingface_hub` (and so
//! `transformers`, vLLM and every loader of the Hub's layout) reads, split as its
//! `split_state_dict_into_shards_factory` splits a state dict.
//!
//! The split ([`ShardSplit`]) walks the tensors in order, adding each to the current shard
//! until the next would take it past the limit; a tensor larger than the limit gets a shard
//! of its own, placed where it comes. One shard is `model.safetensors` with no index; more
//! are `model-00001-of-0000N.safetensors` and `model.safetensors.index.json` (`metadata`:
//! `total_size`, then the caller's entries; `weight_map`: each tensor's file).
//!
//! Nothing on disk changes until every file is written ([`CheckpointWriter`]): each shard
//! goes to a temporary sibling, flushed; once all are, they are renamed over their targets
//! in order, the index last, and files of an earlier save that the new checkpoint does not
//! have (`model-0000K-of-0000M.safetensors`, a `model.safetensors` or an index) are removed.
//! An error while writing (a full disk, a bad tensor) leaves the folder as it was.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use crate::atomic::{self, Prepared};
use crate::checkpoint::INDEX_NAME;
use crate::error::{Error, ErrorKind, Result};
use crate::header::Metadata;
use crate::save::{self, TensorView};
use crate::tensor::Tensors;

/// The largest shard `huggingface_hub` writes unless told: 5 GB.
pub const MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// The file of a checkpoint of one shard.
const SINGLE: &str = "model.safetensors";

/// Parses a shard size as `huggingface_hub`'s `parse_size_to_int` does: a number (decimals
/// allowed) and a unit of `KB`, `MB`, `GB` or `TB` (powers of ten, any case), such as `5GB`
/// or `1.5 gb`; or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let bad = |why: &str| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("shard size {text:?}: {why} (such as 5GB, 500MB or 1000000)"),
        )
    };
    if let Ok(bytes) = text.parse::<u64>() {
        return Ok(bytes);
    }
    let split = text
        .len()
        .checked_sub(2)
        .filter(|&k| text.is_char_boundary(k));
    let (number, unit) = text.split_at(split.ok_or_else(|| bad("no unit"))?);
    let multiplier: u64 = match unit.to_ascii_uppercase().as_str() {
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad("the unit is not KB, MB, GB or TB")),
    };
    let number = number.trim();
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| bad("too large"));
    }
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let bytes = value * multiplier as f64;
    if !(0.0..1.8e19).contains(&bytes) {
        return Err(bad("out of range"));
    }
    // Truncated, as Python's int() does.
    Ok(bytes as u64)
}

/// How tensors are split into the files of a checkpoint (see the module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSplit {
    /// Each file's name and its tensors' names, in order.
    pub shards: Vec<(String, Vec<String>)>,
    /// The tensors' bytes in all: the index's `metadata.total_size`.
    pub total_size: u64,
}

impl ShardSplit {
    /// Splits `tensors` (each name and its size in bytes, in the order to write them) into
    /// shards of at most `max_shard_size` bytes of tensor data, as `huggingface_hub` does.
    pub fn new<'a>(tensors: impl IntoIterator<Item = (&'a str, u64)>, max_shard_size: u64) -> Self {
        let mut shards: Vec<Vec<String>> = Vec::new();
        let mut current: Vec<String> = Vec::new();
        let (mut current_size, mut total_size) = (0u64, 0u64);
        for (name, size) in tensors {
            total_size = total_size.saturating_add(size);
            if size > max_shard_size {
                shards.push(vec![name.to_owned()]);
                continue;
            }
            if current_size.saturating_add(size) > max_shard_size {
                shards.push(std::mem::take(&mut current));
                current_size = 0;
            }
            current.push(name.to_owned());
            current_size += size;
        }
        if !current.is_empty() || shards.is_empty() {
            shards.push(current);
        }
        let n = shards.len();
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(k, names)| {
                let file = match n {
                    1 => SINGLE.to_owned(),
                    n => format!("model-{:05}-of-{n:05}.safetensors", k + 1),
                };
                (file, names)
            })
            .collect();
        ShardSplit { shards, total_size }
    }

    /// Whether the checkpoint has several files (and so an index).
    pub fn is_sharded(&self) -> bool {
        self.shards.len() > 1
    }

    /// Each tensor's file, as the index's `weight_map` lists them.
    pub fn weight_map(&self) -> IndexMap<&str, &str> {
        self.shards
            .iter()
            .flat_map(|(file, names)| names.iter().map(move |n| (n.as_str(), file.as_str())))
            .collect()
    }
}

/// A checkpoint being written to a folder: its shards written one after the other (so that
/// a caller may hold one shard's tensors at a time), each to a temporary file, and put in
/// place together by [`finish`](Self::finish). Dropped unfinished, it removes what it wrote.
pub struct CheckpointWriter {
    dir: PathBuf,
    split: ShardSplit,
    metadata: Option<Metadata>,
    prepared: Vec<Prepared>,
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("dir", &self.dir)
            .field("shards", &self.split.shards.len())
            .field("written", &self.prepared.len())
            .finish()
    }
}

impl CheckpointWriter {
    /// A writer of the checkpoint `split` describes into the folder `dir` (created where
    /// missing), each shard's header holding `metadata`, the index holding it too.
    pub fn new(
        dir: impl AsRef<Path>,
        split: ShardSplit,
        metadata: Option<Metadata>,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io("creating the checkpoint's folder", Some(&dir), e))?;
        Ok(CheckpointWriter {
            dir,
            split,
            metadata,
            prepared: Vec::new(),
        })
    }

    /// The split being written.
    pub fn split(&self) -> &ShardSplit {
        &self.split
    }

    /// The next shard to write: its file's path and its tensors' names, or `None` once
    /// every shard is written.
    pub fn next_shard(&self) -> Option<(PathBuf, &[String])> {
        let (file, names) = self.split.shards.get(self.prepared.len())?;
        Some((self.dir.join(file), names))
    }

    /// The paths the checkpoint's files will have, the index last where there is one.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self
            .split
            .shards
            .iter()
            .map(|(f, _)| self.dir.join(f))
            .collect();
        if self.split.is_sharded() {
            out.push(self.dir.join(INDEX_NAME));
        }
        out
    }

    /// Writes the next shard from `tensors`, which must hold its tensors (others are
    /// ignored: the whole collection may be passed each time).
    pub fn write_shard(&mut self, tensors: &Tensors) -> Result<()> {
        self.write_with(|name| tensors.get(name))
    }

    /// [`write_shard`](Self::write_shard) from tensors whose bytes the caller holds.
    pub fn write_shard_views(&mut self, views: &[(&str, TensorView<'_>)]) -> Result<()> {
        let by_name: std::collections::HashMap<&str, &TensorView<'_>> =
            views.iter().map(|(n, v)| (*n, v)).collect();
        self.write_with(|name| by_name.get(name).copied())
    }

    /// Writes the next shard, each of its tensors taken from `get` by name.
    fn write_with<'t, E: save::Entry + 't>(
        &mut self,
        get: impl Fn(&str) -> Option<&'t E>,
    ) -> Result<()> {
        let (path, names) = self.next_or_done()?;
        let entries = names
            .iter()
            .map(|n| Ok((n.as_str(), get(n).ok_or_else(|| missing(n, &path))?)))
            .collect::<Result<Vec<_>>>()?;
        let prepared = save::prepare_entries_file(entries, self.metadata.as_ref(), &path)?;
        self.prepared.push(prepared);
        Ok(())
    }

    fn next_or_done(&self) -> Result<(PathBuf, Vec<String>)> {
        self.next_shard()
            .map(|(path, names)| (path, names.to_vec()))
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "every shard is written already"))
    }

    /// Puts the checkpoint in place once every shard is written: the shards renamed over
    /// their targets in order, the index last, then the files of an earlier save that this
    /// checkpoint does not have removed. Returns the checkpoint's paths (as [`paths`](Self::paths)).
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if let Some((path, _)) = self.next_shard() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the checkpoint's shards are not all written",
            )
            .with_file(&path));
        }
        let index = match self.split.is_sharded() {
            true => Some(self.prepare_index()?),
            false => None,
        };
        for (prepared, (file, _)) in std::mem::take(&mut self.prepared)
            .into_iter()
            .zip(&self.split.shards)
        {
            prepared
                .commit()
                .map_err(|e| e.with_file(self.dir.join(file)))?;
        }
        if let Some(index) = index {
            index
                .commit()
                .map_err(|e| e.with_file(self.dir.join(INDEX_NAME)))?;
        }
        let paths = self.paths();
        self.remove_earlier(&paths);
        Ok(paths)
    }

    /// The index, written beside its target and flushed.
    fn prepare_index(&self) -> Result<Prepared> {
        let mut metadata = serde_json::Map::new();
        metadata.insert("total_size".into(), self.split.total_size.into());
        for (k, v) in self.metadata.iter().flatten() {
            metadata.insert(k.clone(), v.clone().into());
        }
        let weight_map: serde_json::Map<String, serde_json::Value> = self
            .split
            .weight_map()
            .into_iter()
            .map(|(n, f)| (n.to_owned(), f.into()))
            .collect();
        let index = serde_json::json!({"metadata": metadata, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::new(ErrorKind::InvalidMetadata, e.to_string()))?;
        let path = self.dir.join(INDEX_NAME);
        atomic::prepare(&path, |w| {
            w.write_all(text.as_bytes())
                .and_then(|()| w.write_all(b"\n"))
                .map_err(|e| Error::io("writing", None, e))
        })
        .map_err(|e| e.with_file(&path))
    }

    /// Removes the checkpoint files of an earlier save (named as this module names them)
    /// that are not among `keep`. A file that cannot be removed stays (it is not part of the
    /// new checkpoint: its index does not name it).
    fn remove_earlier(&self, keep: &[PathBuf]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let ours = entry.file_name().to_str().is_some_and(is_checkpoint_file);
            if ours && !keep.contains(&path) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Whether `name` is a file of a checkpoint as `huggingface_hub` names them: `model.safetensors`,
/// `model-DDDDD-of-DDDDD.safetensors`, or either followed by `.index.json`.
fn is_checkpoint_file(name: &str) -> bool {
    let name = name.strip_suffix(".index.json").unwrap_or(name);
    let Some(stem) = name
        .strip_prefix("model")
        .and_then(|s| s.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    stem.is_empty()
        || stem
            .strip_prefix('-')
            .and_then(|s| s.split_once("-of-"))
            .is_some_and(|(k, n)| digits(k) && digits(n))
}

fn missing(name: &str, path: &Path) -> Error {
    Error::new(
        ErrorKind::TensorNotFound,
        "the shard's tensor was not given",
    )
    .with_file(path)
    .with_tensor(name)
}

/// Writes `tensors` to the folder `dir` as a checkpoint of shards of at most
/// `max_shard_size` bytes of tensor data (see the module; [`MAX_SHARD_SIZE`] is
/// `huggingface_hub`'s default), in the tensors' order, each shard's header and the index
/// holding `metadata` where given (else the tensors' own). Nothing in `dir` changes unless
/// every file was written. Returns the checkpoint's paths, the index last.
pub fn save_checkpoint(
    tensors: &Tensors,
    dir: impl AsRef<Path>,
    max_shard_size: u64,
    metadata: Option<&Metadata>,
) -> Result<Vec<PathBuf>> {
    let split = ShardSplit::new(
        tensors.iter().map(|(n, t)| (n, t.len_bytes() as u64)),
        max_shard_size,
    );
    let metadata = metadata.or(tensors.metadata()).cloned();
    let mut writer = CheckpointWriter::new(dir, split, metadata)?;
    while writer.next_shard().is_some() {
        writer.write_shard(tensors)?;
    }
    writer.finish()
}

/// [`save_checkpoint`] of tensors whose bytes the caller holds, written from them with no copy.
pub fn save_views_checkpoint(
    views: &[(&str, TensorView<'_>)],
    dir: impl AsRef<Path>,
    max_shard_size: u64,
    metadata: Option<&Metadata>,
) -> Result<Vec<PathBuf>> {
    let split = ShardSplit::new(
        views.iter().map(|(n, v)| (*n, v.len_bytes() as u64)),
        max_shard_size,
    );
    let mut writer = CheckpointWriter::new(dir, split, metadata.cloned())?;
    while writer.next_shard().is_some() {
        writer.write_shard_views(views)?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_huggingface_hub_parses_them() {
        for (text, want) in [
            ("5GB", 5_000_000_000),
            ("5gb", 5_000_000_000),
            (" 500MB ", 500_000_000),
            ("1.5GB", 1_500_000_000),
            ("10 KB", 10_000),
            ("2TB", 2_000_000_000_000),
            ("4096", 4096),
            ("0.0001KB", 0),
        ] {
            assert_eq!(parse_size(text).unwrap(), want, "{text}");
        }
        for bad in ["", "GB", "5XB", "five GB", "-1GB", "99999999999TB"] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn splits_follow_huggingface_hubs_rule() {
        // The example of `split_state_dict_into_shards_factory`'s documentation, limit 10:
        // [6, 6, 2, 6, 2, 2] becomes [6], [6 + 2], [6 + 2 + 2].
        let sizes = [("a", 6), ("b", 6), ("c", 2), ("d", 6), ("e", 2), ("f", 2)];
        let split = ShardSplit::new(sizes, 10);
        let names: Vec<Vec<&str>> = split
            .shards
            .iter()
            .map(|(_, n)| n.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(names, [vec!["a"], vec!["b", "c"], vec!["d", "e", "f"]]);
        assert_eq!(split.shards[0].0, "model-00001-of-00003.safetensors");
        assert_eq!(split.total_size, 24);
        // A tensor over the limit has a shard of its own, where it comes.
        let split = ShardSplit::new([("a", 3), ("big", 50), ("b", 3), ("c", 5)], 10);
        let names: Vec<Vec<&str>> = split
            .shards
            .iter()
            .map(|(_, n)| n.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(names, [vec!["big"], vec!["a", "b"], vec!["c"]]);
        // One shard: model.safetensors, no index; nothing at all: one empty file.
        let one = ShardSplit::new([("a", 3), ("b", 3)], 10);
        assert_eq!(
            (one.shards[0].0.as_str(), one.is_sharded()),
            (SINGLE, false)
        );
        assert_eq!(
            ShardSplit::new([], 10).shards,
            [(SINGLE.to_owned(), vec![])]
        );
    }

    #[test]
    fn earlier_checkpoint_files_are_recognised() {
        for name in [
            "model.safetensors",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors.index.json",
        ] {
            assert!(is_checkpoint_file(name), "{name}");
        }
        for name in [
            "model.safetensors.backup",
            "model-1-of-2.safetensors",
            "other.safetensors",
            "model-00001-of-00002.bin",
            "config.json",
        ] {
            assert!(!is_checkpoint_file(name), "{name}");
        }
    }
}
