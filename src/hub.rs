//! Checkpoints in the Hugging Face cache: a repository id (`org/name`, `org/name@revision`)
//! resolved to the files `huggingface_hub` downloaded, offline (nothing is fetched).
//!
//! The cache lays a model repository out as `models--org--name/` under the cache folder
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`: the caller passes
//! it, see [`default_cache_dir`]) with `refs/REVISION` holding a commit hash,
//! `snapshots/COMMIT/FILE` links to `blobs/HASH`. The `hf-hub` crate (candle's) names the
//! folders and finds files through the refs; a revision that is a commit hash is its
//! snapshot folder. A snapshot's checkpoint is its `model.safetensors.index.json`, else its
//! `model.safetensors`, else its one `.safetensors` file, else the folder of them; a shard
//! the index names and the cache does not hold is the checkpoint's own error
//! ([`ErrorKind::InvalidIndex`](crate::ErrorKind::InvalidIndex)).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::checkpoint::INDEX_NAME;
use crate::error::{Error, Result};

/// A repository id and revision, as `org/name@revision` writes them (`main` without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    /// `org/name` (or a bare `name`).
    pub repo: String,
    /// A branch, a tag, a `refs/pr/N` or a commit hash.
    pub revision: String,
}

impl RepoId {
    /// Parses `org/name` or `org/name@revision`; `None` where `text` cannot be a repository
    /// id (an absolute path, a name with a character the Hub refuses, more than one `/`).
    pub fn parse(text: &str) -> Option<RepoId> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) if !revision.is_empty() => (repo, revision),
            Some(_) => return None,
            None => (text, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && !p.contains("--")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        // A file's name (a typo'd path) is not taken for a repository.
        let file_like = repo.ends_with(".safetensors") || repo.ends_with(".json");
        (parts.len() <= 2 && parts.iter().all(|p| valid(p)) && !file_like).then(|| RepoId {
            repo: repo.to_owned(),
            revision: revision.to_owned(),
        })
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// The cache folder `huggingface_hub` uses: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; `None` where none
/// can be named (no home).
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The checkpoint of `id` in the cache at `cache_dir` (see the module): the path to open.
/// A repository or revision the cache does not hold, or a snapshot with no `.safetensors`
/// file, is an [`ErrorKind::Io`](crate::ErrorKind::Io) error (kind `NotFound`) naming the id and the cache.
pub fn resolve(id: &RepoId, cache_dir: &Path) -> Result<PathBuf> {
    let cache = Cache::new(cache_dir.to_owned());
    let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone());
    let folder = cache_dir.join(repo.folder_name());
    let not_found = |why: String| {
        Error::io(
            &format!(
                "{id}: {why} in the Hugging Face cache at {} (nothing is downloaded: fetch it \
                 first, with `hf download {}`)",
                cache_dir.display(),
                id.repo
            ),
            None,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    };
    if !folder.is_dir() {
        return Err(not_found(
            "no such file or folder, and the repository is not".into(),
        ));
    }
    let cached = cache.repo(repo);
    for name in [INDEX_NAME, "model.safetensors"] {
        if let Some(path) = cached.get(name) {
            return Ok(path);
        }
    }
    let snapshot = snapshot_of(&folder, &id.revision).ok_or_else(|| {
        let refs = list(&folder.join("refs"));
        not_found(format!(
            "the revision is not (refs held: {})",
            refs.join(", ")
        ))
    })?;
    let mut files = list(&snapshot);
    files.retain(|f| f.ends_with(".safetensors"));
    match files.as_slice() {
        [] => Err(not_found(format!(
            "no .safetensors file is in snapshot {}",
            snapshot.display()
        ))),
        [one] => Ok(snapshot.join(one)),
        _ => Ok(snapshot),
    }
}

/// The snapshot folder of `revision`: the commit its ref names, or the revision itself where
/// it is a commit hash the cache holds.
fn snapshot_of(folder: &Path, revision: &str) -> Option<PathBuf> {
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| revision.to_owned());
    let snapshot = folder.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

/// The names in a folder, sorted (none where it cannot be read).
fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// `path` as given where it names something on disk or no cache is set; else, where it
/// reads as a repository id, its checkpoint in the cache at `cache_dir` (what
/// [`Loader::hf_cache`](crate::Loader::hf_cache) does to every path it is given).
pub fn locate<'p>(path: &'p Path, cache_dir: Option<&Path>) -> Result<std::borrow::Cow<'p, Path>> {
    let id = path.to_str().and_then(RepoId::parse);
    match (cache_dir, id) {
        (Some(cache), Some(id)) if !path.exists() => resolve(&id, cache).map(Into::into),
        _ => Ok(path.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_ids_parse_and_paths_do_not() {
        let id = RepoId::parse("meta-llama/Llama-3.1-8B@v1.0").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("meta-llama/Llama-3.1-8B", "v1.0")
        );
        assert_eq!(RepoId::parse("gpt2").unwrap().revision, "main");
        let pr = RepoId::parse("org/name@refs/pr/3").unwrap();
        assert_eq!(pr.revision, "refs/pr/3");
        for not in [
            "/abs/path",
            "a/b/c",
            "org/",
            "org/name@",
            "./x",
            "a b/c",
            "o--x/y",
            "model.safetensors",
            "ckpt/model.safetensors.index.json",
        ] {
            assert_eq!(RepoId::parse(not), None, "{not}");
        }
    }
}
