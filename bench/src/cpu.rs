//! The CPU groups: zero-copy load, owned load, save; each against what a user of the
//! `safetensors` crate writes, and the owned load against a copy into the same kind of
//! memory on every core (the ceiling).

use std::path::{Path, PathBuf};

use safetensors::{SafeTensorError, SafeTensors};

use super::measure::{BenchPath, Group, Role};
use tensorplace::internals::{
    Gather, HostBuffer, HostFile, PIECE, Piece, Span, Threads, chunks, for_each, read_pieces,
};
use tensorplace::{Device, Error, ErrorKind, Loader, ReadMode, Result};

/// A `safetensors` crate error as ours, keeping it as the cause.
pub(super) fn reference_err(e: SafeTensorError) -> Error {
    let kind = match &e {
        SafeTensorError::IoError(_) => ErrorKind::Io,
        SafeTensorError::HeaderTooLarge => ErrorKind::HeaderTooLarge,
        SafeTensorError::HeaderTooSmall => ErrorKind::HeaderTooSmall,
        SafeTensorError::InvalidHeaderLength => ErrorKind::InvalidHeaderLength,
        SafeTensorError::InvalidHeader(_) => ErrorKind::HeaderNotUtf8,
        SafeTensorError::InvalidHeaderDeserialization(_) | SafeTensorError::JsonError(_) => {
            ErrorKind::InvalidJson
        }
        SafeTensorError::TensorNotFound(_) => ErrorKind::TensorNotFound,
        SafeTensorError::InvalidOffset(_) => ErrorKind::InvalidOffsets,
        SafeTensorError::MetadataIncompleteBuffer => ErrorKind::IncompleteBuffer,
        SafeTensorError::ValidationOverflow => ErrorKind::ShapeOverflow,
        _ => ErrorKind::InvalidTensor,
    };
    Error::new(kind, format!("the safetensors crate: {e}")).with_source(e)
}

/// Maps `path` for the reference paths.
pub(super) fn map(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("opening", Some(path), e))?;
    // SAFETY: a read-only shared mapping of a file this harness wrote and does not change
    // while it is mapped.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io("mapping", Some(path), e))
}

/// The CPU groups: zero-copy load, owned load (with the disk's read first among its
/// ceilings when `cold`), save.
pub(super) fn groups<'a>(path: &'a Path, out: &'a Path, cold: bool) -> Vec<Group<'a>> {
    let owned = super::with_disk_ceiling(owned_group(path, cold), path, cold);
    vec![zero_copy_group(path), owned, save_group(path, out)]
}

/// Zero-copy views of the mapping against the reference crate's deserialize.
fn zero_copy_group(path: &Path) -> Group<'_> {
    Group {
        device: "cpu".into(),
        paths: vec![
            BenchPath::new(
                "tensorplace load_file_mapped (zero-copy)",
                Role::Ours,
                move || {
                    // SAFETY: the harness wrote the file (or was given it) and nothing changes it
                    // while the tensors, dropped below, live.
                    let t =
                        unsafe { tensorplace::Loader::new(Device::Cpu).load_file_mapped(path) }?;
                    std::hint::black_box(t.len());
                    Ok(())
                },
            ),
            BenchPath::new(
                "safetensors mmap + deserialize",
                Role::Baseline,
                move || {
                    let m = map(path)?;
                    let st = SafeTensors::deserialize(&m).map_err(reference_err)?;
                    std::hint::black_box(st.iter().count());
                    Ok(())
                },
            ),
        ],
        pairs: vec![],
    }
}

/// Owned copies against the reference crate's copy of each tensor and the parallel copy
/// ceiling (into memory kept from run to run, as the load's arena is: see
/// `tensorplace::trim_host_memory`); the load with a fresh arena each run, beside the copy
/// into fresh memory (what a process's first load is held to) and the read into reused
/// memory (the engine alone); when `cold`, the load and the read without the disk queue.
fn owned_group(path: &Path, cold: bool) -> Group<'_> {
    // Cold, the disk's sequential read is the ceiling (`with_disk_ceiling`): the copy a stage.
    let (copy_label, copy_role) = match cold {
        false => ("parallel copy into reused memory (ceiling)", Role::Ceiling),
        true => ("stage: parallel copy into reused memory", Role::Stage),
    };
    let mut owned = Group {
        device: "cpu".into(),
        paths: vec![
            BenchPath::new(
                "tensorplace load_file (owned copies)",
                Role::Ours,
                move || owned_load(path, true),
            ),
            BenchPath::new(
                "tensorplace load_file, fresh arena (host memory trimmed first)",
                Role::Ours,
                move || {
                    tensorplace::trim_host_memory();
                    owned_load(path, true)
                },
            ),
            BenchPath::new(
                "safetensors deserialize + copy each",
                Role::Baseline,
                move || reference_copies(path),
            ),
            BenchPath::new(copy_label, copy_role, {
                let mut reused = None;
                move || copy_ceiling(path, Some(&mut reused))
            }),
            BenchPath::new(
                "stage: parallel copy into fresh huge-page memory",
                Role::Stage,
                move || copy_ceiling(path, None),
            ),
            BenchPath::new(
                "stage: read into reused memory (no first touch)",
                Role::Stage,
                {
                    let mut reused = None;
                    move || fill_reused(path, &mut reused, true)
                },
            ),
        ],
        pairs: vec![],
    };
    if cold {
        // The same load with every reader thread making its own requests: what the disk
        // queue (for disks that serve one stream best) changes; on others, the same path.
        owned.paths.insert(
            1,
            BenchPath::new(
                "tensorplace load_file, no disk queue (many readers)",
                Role::Ours,
                move || owned_load(path, false),
            ),
        );
        owned.paths.push(BenchPath::new(
            "stage: read into reused memory, no disk queue",
            Role::Stage,
            {
                let mut reused = None;
                move || fill_reused(path, &mut reused, false)
            },
        ));
    }
    owned
}

/// Saves of one load against the reference crate's, with and without fsync.
fn save_group<'a>(path: &'a Path, out: &'a Path) -> Group<'a> {
    let loaded = tensorplace::load_file(path, Device::Cpu);
    // One mapping for both reference saves.
    let reference = std::rc::Rc::new(map(path));
    let reference_fsync = reference.clone();
    Group {
        device: "cpu".into(),
        paths: vec![
            BenchPath::new(
                "tensorplace save_file (fsync, rename)",
                Role::Ours,
                move || {
                    let t = loaded.as_ref().map_err(Error::clone)?;
                    tensorplace::save_file(t, out, None)
                },
            ),
            BenchPath::new("safetensors serialize_to_file", Role::Baseline, move || {
                reference_save(&reference, out, false)
            }),
            BenchPath::new(
                "safetensors serialize_to_file + fsync",
                Role::Baseline,
                move || reference_save(&reference_fsync, out, true),
            ),
        ],
        pairs: vec![],
    }
}

/// The cold files of many small tensors (`--cold`), written into `dir`: 20,000 of 4 KB, and
/// a mix of one 4 MiB tensor per twenty of 4 KB (as norms, biases and scales sit between a
/// model's matrices). Each with its label and data bytes.
pub(super) fn small_tensor_files(dir: &Path) -> Result<Vec<(&'static str, PathBuf, u64)>> {
    let small = vec![4000; 20_000];
    let mixed: Vec<usize> = (0..64)
        .flat_map(|i| std::iter::repeat_n(4000 + 8 * (i % 7), 20).chain([4 << 20]))
        .collect();
    let mut files = Vec::new();
    for (label, name, sizes) in [
        ("20000 x 4 KB", "small.safetensors", small),
        ("1 x 4 MiB per 20 x 4 KB", "mixed.safetensors", mixed),
    ] {
        let path = dir.join(name);
        super::synthetic::write_sized(&path, &sizes)?;
        files.push((label, path, sizes.iter().sum::<usize>() as u64));
    }
    Ok(files)
}

/// One of those files loaded by us (mapped, then with `pread`) against `safetensors`, with
/// the disk's sequential reads of the same file.
pub(super) fn small_tensor_group<'a>(label: &str, path: &'a Path) -> Group<'a> {
    let group = Group {
        device: format!("cpu, {label}"),
        paths: vec![
            BenchPath::new(
                "tensorplace load_file (owned copies)",
                Role::Ours,
                move || owned_load(path, true),
            ),
            BenchPath::new("tensorplace load_file, pread", Role::Ours, move || {
                let t = tensorplace::Loader::new(Device::Cpu)
                    .read_mode(ReadMode::Pread)
                    .load_file(path)?;
                std::hint::black_box(t.len());
                Ok(())
            }),
            BenchPath::new(
                "safetensors deserialize + copy each",
                Role::Baseline,
                move || reference_copies(path),
            ),
        ],
        pairs: vec![],
    };
    super::with_disk_ceiling(group, path, true)
}

/// `safetensors`' deserialize of the mapped file, then a copy of each tensor: what users of
/// that crate who need owned tensors run.
fn reference_copies(path: &Path) -> Result<()> {
    let m = map(path)?;
    let st = SafeTensors::deserialize(&m).map_err(reference_err)?;
    let v: Vec<Vec<u8>> = st.iter().map(|(_, t)| t.data().to_vec()).collect();
    std::hint::black_box(&v);
    Ok(())
}

/// The whole file copied by every core in pieces into memory of the kind our arena is
/// (anonymous, huge pages advised): what memory allows an owned load. Into `reused` where
/// given (kept from run to run, as the load's arena is), else into fresh memory.
fn copy_ceiling(path: &Path, reused: Option<&mut Option<HostBuffer>>) -> Result<()> {
    let m = map(path)?;
    let mut fresh = None;
    let buffer = match reused {
        Some(Some(b)) if b.len() == m.len() => b,
        Some(slot) => slot.insert(HostBuffer::zeroed(m.len())?),
        None => fresh.insert(HostBuffer::zeroed(m.len())?),
    };
    let jobs: Vec<_> = buffer
        .as_mut_bytes()
        .chunks_mut(PIECE)
        .zip(chunks(0..m.len(), PIECE))
        .collect();
    for_each(jobs, Threads::PerCore, |(dst, src), _| {
        dst.copy_from_slice(&m[src]);
        Ok(())
    })?;
    std::hint::black_box(buffer.as_bytes().last());
    Ok(())
}

/// The owned load the harness times: every tensor of the file copied into host memory.
/// `load_file` onto the CPU, its direct reads through the disk's queue where `queued` (the
/// default) or each reader thread's own.
fn owned_load(path: &Path, queued: bool) -> Result<()> {
    let t = Loader::new(Device::Cpu)
        .disk_queue(queued)
        .load_file(path)?;
    std::hint::black_box(t.len());
    Ok(())
}

/// The owned load's reading alone: the file's data section read by the host I/O engine (so,
/// with `--cold`, by direct reads on the reader pool) into memory kept from run to run, so
/// that no page of it is touched for the first time. Against the owned load, what the first
/// touch of its fresh arena costs.
fn fill_reused(path: &Path, reused: &mut Option<HostBuffer>, queued: bool) -> Result<()> {
    let mut file = HostFile::open(path, ReadMode::Mmap)?;
    file.set_disk_queue(queued);
    let start = file.header().data_start();
    let len = file.header().data_len();
    let buffer = match reused {
        Some(b) if b.len() == len => b,
        slot => slot.insert(HostBuffer::page_aligned(len)?),
    };
    let gather = Gather::contiguous(start..start + len);
    read_into(&file, Span::all(&gather), buffer.as_mut_bytes())
}

/// The bytes `data` of `file` read by the host I/O engine into `dst` (of their length), in
/// pieces of [`PIECE`] bytes: a load's reading with none of its placement.
pub(super) fn read_into(file: &HostFile<'_>, data: Span<'_>, dst: &mut [u8]) -> Result<()> {
    let pieces = data
        .chunks(PIECE)
        .zip(dst.chunks_mut(PIECE))
        .map(|(src, dst)| Piece {
            tensor: "",
            file,
            src,
            dst,
        })
        .collect();
    read_pieces(pieces, &|_| Ok(()))
}

/// `safetensors::serialize_to_file` of a mapped file's tensors and metadata, as a user of that
/// crate writes it (its API parses the header once for the views and once for the metadata),
/// followed by an fsync of the output where `fsync` asks for one.
fn reference_save(m: &Result<memmap2::Mmap>, out: &Path, fsync: bool) -> Result<()> {
    let m = m.as_ref().map_err(Error::clone)?;
    let st = SafeTensors::deserialize(m).map_err(reference_err)?;
    let md = SafeTensors::read_metadata(m)
        .map_err(reference_err)?
        .1
        .metadata()
        .clone();
    safetensors::serialize_to_file(st.iter(), md, out).map_err(reference_err)?;
    if fsync {
        std::fs::File::open(out)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("fsync", Some(out), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_errors_keep_their_kind_and_cause() {
        use std::error::Error as _;
        let e = SafeTensors::deserialize(&[1, 0, 0, 0, 0, 0, 0, 0, b'x']).unwrap_err();
        let ours = reference_err(e);
        assert_eq!(ours.kind(), ErrorKind::InvalidJson, "{ours}");
        assert!(ours.source().is_some());
        let e = SafeTensors::deserialize(&[0; 3]).unwrap_err();
        assert_eq!(reference_err(e).kind(), ErrorKind::HeaderTooSmall);
    }
}
