//! Atomic file writes: the bytes go to a temporary sibling, which is flushed to disk and
//! renamed over the target, so that the target is always either the old file or the new one.
//!
//! A temporary is named `.NAME.tmp-PID-RANDOM` (NAME the target's file name, PID the writing
//! process): recognisable, and private to its writer. A process killed while writing leaves
//! its temporary behind; the next write of the same target removes the temporaries of
//! processes that no longer run (never those of a live process, which may be writing now).

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};

/// Held while a temporary is created and while one is renamed over its target. A process
/// about to end on a signal takes it for good ([`hold_writes`]) before removing its
/// temporaries, so that no write of this process creates a temporary, or renames one, after
/// they are removed: every target is then the old file or the new one, and no temporary is
/// left.
static COMMIT: Mutex<()> = Mutex::new(());

fn commit() -> MutexGuard<'static, ()> {
    COMMIT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops this process's atomic writes at their next step that touches the folder (creating
/// the temporary, renaming it): they wait while the guard lives. For an interrupt handler
/// that removes the temporaries ([`remove_temporaries`]) and exits while holding it.
pub fn hold_writes() -> MutexGuard<'static, ()> {
    commit()
}

/// The folder and file name of `path`.
fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(ErrorKind::Io, "the path names no file"))?;
    Ok((dir, name))
}

/// The start of every temporary name of `name`.
fn prefix(name: &std::ffi::OsStr) -> OsString {
    let mut p = OsString::from(".");
    p.push(name);
    p.push(".tmp-");
    p
}

/// The temporaries of `path` in its folder, with the process id in each name.
pub(crate) fn temporaries(path: &Path) -> Result<Vec<(PathBuf, u32)>> {
    let (dir, name) = split(path)?;
    let prefix = prefix(name);
    let prefix = prefix.to_string_lossy();
    let entries = fs::read_dir(dir).map_err(|e| Error::io("listing the folder", Some(dir), e))?;
    Ok(entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name();
            let pid = file
                .to_str()?
                .strip_prefix(&*prefix)?
                .split_once('-')?
                .0
                .parse()
                .ok()?;
            Some((e.path(), pid))
        })
        .collect())
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporaries of `path` that process `pid` left (for a process that is about
/// to exit on a signal, say). Returns how many were removed.
pub fn remove_temporaries(path: &Path, pid: u32) -> usize {
    temporaries(path)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, p)| *p == pid)
        .filter(|(t, _)| fs::remove_file(t).is_ok())
        .count()
}

/// Writes `path` atomically: `write` fills a temporary sibling (buffered), which is then
/// flushed to disk and renamed over `path`. An existing file's permissions are kept; a new
/// file gets `0644`. On any error the temporary is removed and `path` is untouched.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    prepare(path, write)?.commit()
}

/// A file written in full to its temporary sibling and flushed to disk, not yet in place:
/// [`commit`](Self::commit) renames it over its target; dropped uncommitted, the temporary
/// is removed and the target never changed. Several files committed one after the other
/// once all are prepared (a sharded checkpoint's) change nothing on disk unless every one
/// of them was written.
pub(crate) struct Prepared {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

/// Writes the temporary of `path` (see [`write_atomically`]) without renaming it.
pub(crate) fn prepare(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<Prepared> {
    use std::os::unix::fs::PermissionsExt;
    let (dir, name) = split(path)?;
    let permissions = match fs::metadata(path) {
        Ok(m) if m.is_file() => m.permissions(),
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::Io,
                "the path exists and is not a file",
            ));
        }
        Err(_) => fs::Permissions::from_mode(0o644),
    };
    for (stale, pid) in temporaries(path).unwrap_or_default() {
        if !alive(pid) {
            let _ = fs::remove_file(stale);
        }
    }
    let mut prefix = prefix(name);
    prefix.push(format!("{}-", std::process::id()));
    let tmp = {
        let _commit = commit();
        tempfile::Builder::new()
            .prefix(&prefix)
            .permissions(permissions)
            .tempfile_in(dir)
            .map_err(|e| Error::io("creating a temporary file beside it", None, e))?
    };
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, WriteBehind::new(tmp.as_file()));
        write(&mut w)?;
        w.flush().map_err(|e| Error::io("writing", None, e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io("flushing to disk", None, e))?;
    Ok(Prepared {
        tmp,
        path: path.to_owned(),
    })
}

impl Prepared {
    /// Renames the temporary over the target, and makes the rename durable.
    pub(crate) fn commit(self) -> Result<()> {
        let (dir, _) = split(&self.path)?;
        let dir = dir.to_owned();
        {
            let _commit = commit();
            self.tmp
                .persist(&self.path)
                .map_err(|e| Error::io("renaming the temporary file over it", None, e.error))?;
        }
        // Make the rename itself durable; a failure here leaves a complete file either way.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// How much a [`WriteBehind`] writes before it starts that part's writeback.
const WRITE_BEHIND: u64 = 16 << 20;

/// A file written from start to end whose writeback to the disk starts behind the writes,
/// every [`WRITE_BEHIND`] bytes (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the disk
/// writes while later bytes are copied into the page cache and the closing `fsync` waits for
/// the last part alone, not for the whole file. The writeback is a hint: where the call
/// fails (or off Linux) the `fsync` still writes everything.
struct WriteBehind<'f> {
    file: &'f fs::File,
    /// Bytes written so far.
    written: u64,
    /// Bytes whose writeback has been started.
    started: u64,
}

impl<'f> WriteBehind<'f> {
    fn new(file: &'f fs::File) -> Self {
        WriteBehind {
            file,
            written: 0,
            started: 0,
        }
    }

    /// Starts the writeback of the bytes written since the last start.
    fn start_writeback(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (Ok(offset), Ok(len)) = (
                libc::off64_t::try_from(self.started),
                libc::off64_t::try_from(self.written - self.started),
            ) else {
                return;
            };
            // SAFETY: a plain system call on a descriptor this writer borrows open; it reads
            // and writes no memory of this process. Its result is a hint's: ignored.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    offset,
                    len,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.started = self.written;
    }
}

impl Write for WriteBehind<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITE_BEHIND {
            self.start_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        // A process id that does not run: past the kernel's largest.
        let dead = 4_194_304 + 17;
        let live = std::process::id();
        let stale = dir.path().join(format!(".m.safetensors.tmp-{dead}-abc"));
        let busy = dir.path().join(format!(".m.safetensors.tmp-{live}-xyz"));
        let other = dir.path().join(".n.safetensors.tmp-1-abc");
        for p in [&stale, &busy, &other] {
            fs::write(p, b"partial").unwrap();
        }
        let mut found: Vec<u32> = temporaries(&path)
            .unwrap()
            .into_iter()
            .map(|t| t.1)
            .collect();
        found.sort_unstable();
        assert_eq!(found, [live, dead]);
        write_atomically(&path, |w: &mut dyn Write| {
            w.write_all(b"new")
                .map_err(|e| Error::io("writing", None, e))
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(!stale.exists(), "a dead process's temporary is removed");
        assert!(busy.exists() && other.exists(), "others are kept");
        assert_eq!(remove_temporaries(&path, live), 1);
        assert!(!busy.exists());
        // A failed write leaves the old file and no temporary.
        let e = write_atomically(&path, |_| Err(Error::new(ErrorKind::InvalidTensor, "no")))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTensor);
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(temporaries(&path).unwrap().is_empty());
    }

    #[test]
    fn files_written_behind_hold_every_byte() {
        // Writes of odd sizes across several write-behind steps, and their starts counted.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let piece: Vec<u8> = (0..1_234_567u32).map(|i| (i % 251) as u8).collect();
        let pieces = 3 * WRITE_BEHIND as usize / piece.len() + 2;
        write_atomically(&path, |w: &mut dyn Write| {
            for _ in 0..pieces {
                w.write_all(&piece)
                    .map_err(|e| Error::io("writing", None, e))?;
            }
            Ok(())
        })
        .unwrap();
        let got = fs::read(&path).unwrap();
        assert_eq!(got.len(), pieces * piece.len());
        assert!(got.chunks(piece.len()).all(|c| c == piece));

        let file = tempfile::tempfile().unwrap();
        let mut w = WriteBehind::new(&file);
        for _ in 0..pieces {
            w.write_all(&piece).unwrap();
        }
        assert_eq!(w.written, (pieces * piece.len()) as u64);
        assert!(w.written - w.started < WRITE_BEHIND && w.started >= 3 * WRITE_BEHIND);
    }
}
