//! The checkpoint groups: a checkpoint of several shard files against the same tensors in
//! one file, a tensor-parallel part against the whole checkpoint, and opening a checkpoint
//! of many shards against parsing the same headers with the `safetensors` crate.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use super::cpu::{map, reference_err};
use super::measure::{BenchPath, Group, Role};
use tensorplace::{Device, Error, ErrorKind, INDEX_NAME, Loader, Result, Tensor, Tensors};

/// The parts of the tensor-parallel row: part 0 of this many.
pub(super) const WORLD: usize = 8;

/// Writes the tensors of the file `one` into `shards` files of `dir` (tensors in file order,
/// cut into runs of about equal bytes, as `transformers` cuts), with their index.
pub(super) fn write_sharded(one: &Path, dir: &Path, shards: usize) -> Result<()> {
    let all = tensorplace::load_file(one, Device::Cpu)?;
    let total = all.total_bytes().max(1);
    let mut weight_map = serde_json::Map::new();
    let mut part = Tensors::new();
    let mut done = 0usize;
    let mut k = 0usize;
    let name = |k: usize| format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
    for (tensor_name, t) in all.iter() {
        part.insert(tensor_name, t.clone());
        weight_map.insert(tensor_name.to_owned(), name(k).into());
        done += t.len_bytes();
        if done * shards >= total * (k + 1) && k + 1 < shards {
            tensorplace::save_file(&std::mem::take(&mut part), dir.join(name(k)), None)?;
            k += 1;
        }
    }
    tensorplace::save_file(&part, dir.join(name(k)), None)?;
    let index = serde_json::json!({
        "metadata": {"total_size": all.total_bytes()},
        "weight_map": weight_map,
    });
    std::fs::write(dir.join(INDEX_NAME), index.to_string())
        .map_err(|e| Error::io("writing", Some(&dir.join(INDEX_NAME)), e))
}

/// Writes a checkpoint of `shards` files of `per_shard` small tensors each into `dir`, for
/// the opening row.
pub(super) fn write_many(dir: &Path, shards: usize, per_shard: usize) -> Result<()> {
    let mut weight_map = serde_json::Map::new();
    for k in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        let mut t = Tensors::new();
        for i in 0..per_shard {
            let name = format!("model.layers.{k}.block.{i}.weight");
            let values: Vec<f32> = (0..4).map(|v| (i * 4 + v) as f32).collect();
            t.insert(name.clone(), Tensor::from_slice(vec![2, 2], &values)?);
            weight_map.insert(name, file.clone().into());
        }
        tensorplace::save_file(&t, dir.join(&file), None)?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_NAME), index.to_string())
        .map_err(|e| Error::io("writing", Some(&dir.join(INDEX_NAME)), e))
}

/// Which dimension the tensor-parallel row splits: the first of every tensor with one, the
/// second of every other matrix (row- and column-parallel layers alike).
fn tp_dim(name: &str, shape: &[usize]) -> Option<usize> {
    let odd = name.bytes().fold(0u8, |a, b| a.wrapping_add(b)) % 2 == 1;
    match shape.len() {
        0 => None,
        1 => Some(0),
        _ => Some(usize::from(odd)),
    }
}

/// The groups of one device: the sharded checkpoint `dir` against the one file `one`, and
/// one tensor-parallel part against the whole.
pub(super) fn groups<'a>(device: Device, one: &'a Path, dir: &'a Path) -> Vec<Group<'a>> {
    let whole = move || -> Result<()> {
        let t = tensorplace::load_file(dir, device)?;
        std::hint::black_box(t.len());
        Ok(())
    };
    let sharded = Group {
        device: device.to_string(),
        paths: vec![
            BenchPath::new("tensorplace load_file(folder of shards)", Role::Ours, whole),
            BenchPath::new(
                "tensorplace load_file(the same tensors in one file)",
                Role::Baseline,
                move || {
                    let t = tensorplace::load_file(one, device)?;
                    std::hint::black_box(t.len());
                    Ok(())
                },
            ),
        ],
        pairs: vec![],
    };
    let part = Group {
        device: device.to_string(),
        paths: vec![
            BenchPath::new(
                "tensor-parallel part 0 of 8 (GB/s of the whole checkpoint)",
                Role::Ours,
                move || {
                    let t = Loader::new(device).split(0, WORLD, tp_dim).load_file(dir)?;
                    std::hint::black_box(t.len());
                    Ok(())
                },
            ),
            BenchPath::new("the whole checkpoint", Role::Baseline, whole),
        ],
        pairs: vec![],
    };
    vec![sharded, part]
}

/// Opening the checkpoint `dir` (headers only) against parsing the same headers with the
/// `safetensors` crate, file after file.
pub(super) fn open_group(dir: &Path) -> Result<Group<'_>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("listing", Some(dir), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::new(ErrorKind::Io, "no shard to open").with_file(dir));
    }
    Ok(Group {
        device: "cpu".into(),
        paths: vec![
            BenchPath::new(
                "tensorplace::open (headers, index checked)",
                Role::Ours,
                move || {
                    let c = tensorplace::open(dir)?;
                    std::hint::black_box(c.len());
                    Ok(())
                },
            ),
            BenchPath::new(
                "safetensors read_metadata of each shard",
                Role::Baseline,
                move || {
                    for f in &files {
                        let m = map(f)?;
                        let (_, md) = SafeTensors::read_metadata(&m).map_err(reference_err)?;
                        std::hint::black_box(md.tensors().len());
                    }
                    Ok(())
                },
            ),
        ],
        pairs: vec![],
    })
}
