//! Synthetic checkpoints: the demo of `tensorplace load` and the files the harness times.

use std::path::Path;
use std::sync::Arc;

use tensorplace::internals::{HostBuffer, host_tensor};
use tensorplace::{Dtype, Result, Tensors};

/// What a synthetic checkpoint holds.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// Total data bytes (approximately).
    pub size: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// The dtypes, used in turn.
    pub dtypes: Vec<Dtype>,
}

impl Synthetic {
    /// The demo checkpoint of `tensorplace load`: about 1 GiB in 300 tensors of mixed dtypes
    /// and sizes.
    pub fn demo() -> Self {
        Synthetic {
            size: 1 << 30,
            tensors: 300,
            dtypes: MIX.to_vec(),
        }
    }
}

pub(crate) const MIX: [Dtype; 6] = [
    Dtype::F32,
    Dtype::BF16,
    Dtype::F16,
    Dtype::I64,
    Dtype::U8,
    Dtype::F8_E4M3,
];

/// The row length of the synthetic matrices: a transformer's hidden size.
const HIDDEN: usize = 4096;

/// Builds the tensors of a synthetic checkpoint (pseudo-random bytes, sizes varying over a
/// range of 1 to 30, shapes `[n, 4096]` where they divide by 4096).
pub fn synthetic_tensors(spec: &Synthetic) -> Result<Tensors> {
    let n = spec.tensors.max(1);
    let weight = |i: usize| 1 + (i * 7919) % 30;
    let total_weight: u64 = (0..n).map(|i| weight(i) as u64).sum();
    let mut plan = Vec::with_capacity(n);
    let mut total = 0usize;
    for i in 0..n {
        let dtype = spec
            .dtypes
            .get(i % spec.dtypes.len().max(1))
            .copied()
            .unwrap_or(Dtype::F32);
        let elem = (dtype.bits() / 8).max(1);
        let bytes = (spec.size as u128 * weight(i) as u128 / total_weight as u128) as usize;
        let numel = bytes / elem;
        let shape = if numel >= HIDDEN && numel % HIDDEN == 0 {
            vec![numel / HIDDEN, HIDDEN]
        } else {
            vec![numel]
        };
        plan.push((
            format!("layer{:03}.{}.weight", i / 6, i % 6),
            dtype,
            shape,
            numel * elem,
        ));
        total += numel * elem;
    }
    let arena = Arc::new(random_bytes(total)?);
    let mut tensors = Tensors::new();
    let mut at = 0usize;
    for (name, dtype, shape, len) in plan {
        tensors.insert(name, host_tensor(dtype, shape, arena.clone(), at..at + len));
        at += len;
    }
    let mut md = tensorplace::Metadata::new();
    md.insert("format".into(), "pt".into());
    md.insert("generator".into(), "tensorplace synthetic".into());
    tensors.set_metadata(Some(md));
    Ok(tensors)
}

/// Writes a synthetic checkpoint to `path`.
pub fn write_synthetic(path: &Path, spec: &Synthetic) -> Result<()> {
    let t = synthetic_tensors(spec)?;
    tensorplace::save_file(&t, path, None)
}

/// `len` pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize) -> Result<HostBuffer> {
    let mut buffer = HostBuffer::zeroed(len)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in buffer.as_mut_bytes().chunks_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    Ok(buffer)
}

/// Writes a file of U8 tensors of `sizes` bytes (pseudo-random), in that order.
pub(crate) fn write_sized(path: &Path, sizes: &[usize]) -> Result<()> {
    let arena = Arc::new(random_bytes(sizes.iter().sum())?);
    let mut tensors = Tensors::new();
    let mut at = 0usize;
    for (i, &len) in sizes.iter().enumerate() {
        let t = host_tensor(Dtype::U8, vec![len], arena.clone(), at..at + len);
        tensors.insert(format!("t{i:05}"), t);
        at += len;
    }
    tensorplace::save_file(&tensors, path, None)
}
