//! Tensors on any device: [`Tensor`] (dtype, shape, [`Storage`]) and [`Tensors`], the named
//! collection a load returns and a save takes, in file order.

use std::borrow::Cow;

use indexmap::IndexMap;

use crate::device::Device;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::header::Metadata;
use crate::report::LoadReport;
use crate::storage::{CpuStorage, Storage};

mod sealed {
    pub trait Sealed {}
}

/// A Rust element type that a tensor of one dtype can be read as.
pub trait Element: bytemuck::Pod + sealed::Sealed {
    /// The dtype whose elements are `Self`.
    const DTYPE: Dtype;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: Dtype = Dtype::$d;
        }
    )*};
}

element!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64,
    i64 => I64, f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16);

/// A tensor: dtype, shape and bytes on some device.
#[derive(Debug, Clone)]
pub struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A tensor made of parts whose sizes the caller has checked.
    pub(crate) fn from_parts(dtype: Dtype, shape: Vec<usize>, storage: Storage) -> Self {
        Tensor {
            dtype,
            shape,
            storage,
        }
    }

    /// A host tensor holding a copy of `bytes` (little-endian, row-major), checked against
    /// dtype and shape.
    pub fn from_bytes(dtype: Dtype, shape: impl Into<Vec<usize>>, bytes: &[u8]) -> Result<Self> {
        let shape = shape.into();
        let need = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| dtype.bytes_for(n))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidTensor,
                    format!(
                        "shape {shape:?} of {dtype} is not a whole number of bytes, or overflows"
                    ),
                )
            })?;
        if need != bytes.len() {
            return Err(Error::new(
                ErrorKind::InvalidTensor,
                format!(
                    "shape {shape:?} of {dtype} needs {need} bytes, {} given",
                    bytes.len()
                ),
            ));
        }
        Ok(Tensor::from_parts(
            dtype,
            shape,
            Storage::Cpu(CpuStorage::copy_of(bytes)?),
        ))
    }

    /// A host tensor holding a copy of `data`, of `T`'s dtype.
    pub fn from_slice<T: Element>(shape: impl Into<Vec<usize>>, data: &[T]) -> Result<Self> {
        Tensor::from_bytes(T::DTYPE, shape, bytemuck::cast_slice(data))
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The number of bytes.
    pub fn len_bytes(&self) -> usize {
        self.storage.len()
    }

    /// Where the bytes live; match on it for the backend handles (CUDA pointer and stream,
    /// wgpu buffer and range).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The device the tensor is on.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// The bytes, if the tensor is on the host.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Cpu(s) => Some(s.as_bytes()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The bytes, copied to the host where the tensor is on a device.
    pub fn host_bytes(&self) -> Result<Cow<'_, [u8]>> {
        self.storage.host_bytes()
    }

    /// A host copy of this tensor (for a host tensor, another handle to the same bytes).
    pub fn to_host(&self) -> Result<Tensor> {
        let storage = match &self.storage {
            Storage::Cpu(s) => s.clone(),
            #[allow(unreachable_patterns)]
            other => CpuStorage::copy_of(&other.host_bytes()?)?,
        };
        Ok(Tensor::from_parts(
            self.dtype,
            self.shape.clone(),
            Storage::Cpu(storage),
        ))
    }

    /// The elements of a host tensor as `T`: borrowed where the bytes are aligned for `T`,
    /// copied where not. Fails if `T` is not this tensor's dtype or the tensor is on a device.
    pub fn as_slice<T: Element>(&self) -> Result<Cow<'_, [T]>> {
        if T::DTYPE != self.dtype {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("the tensor is {}, not {}", self.dtype, T::DTYPE),
            ));
        }
        let bytes = self.as_bytes().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("the tensor is on {}: call to_host() first", self.device()),
            )
        })?;
        Ok(match bytemuck::try_cast_slice(bytes) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
        })
    }

    /// The elements as a `Vec<T>`, copied to the host if needed.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.to_host()?.as_slice::<T>().map(Cow::into_owned)
    }
}

/// Named tensors in order (file order after a load), with the file's metadata.
#[derive(Debug, Clone, Default)]
pub struct Tensors {
    tensors: IndexMap<String, Tensor>,
    metadata: Option<Metadata>,
    report: Option<LoadReport>,
}

impl Tensors {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The file's `__metadata__`, if it had one.
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }

    /// Replaces the metadata.
    pub fn set_metadata(&mut self, metadata: Option<Metadata>) {
        self.metadata = metadata;
    }

    /// How the load that made these tensors went (`None` for tensors not loaded).
    pub fn report(&self) -> Option<&LoadReport> {
        self.report.as_ref()
    }

    pub(crate) fn set_report(&mut self, report: LoadReport) {
        self.report = Some(report);
    }

    /// Adds a tensor, returning the one it replaces.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), tensor)
    }

    /// Removes a tensor, keeping the order of the others.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.shift_remove(name)
    }

    /// The tensor called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, or a [`ErrorKind::TensorNotFound`] error.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| {
            Error::new(ErrorKind::TensorNotFound, "no tensor of that name").with_tensor(name)
        })
    }

    /// The names and tensors, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The names, in order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The bytes of all tensors together.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(Tensor::len_bytes).sum()
    }

    /// Host copies of every tensor (see [`Tensor::to_host`]).
    pub fn to_host(&self) -> Result<Tensors> {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| {
                Ok((
                    k.clone(),
                    t.to_host().map_err(|e| e.with_tensor(k.as_str()))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Tensors {
            tensors,
            metadata: self.metadata.clone(),
            report: None,
        })
    }
}

impl FromIterator<(String, Tensor)> for Tensors {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        Tensors {
            tensors: iter.into_iter().collect(),
            metadata: None,
            report: None,
        }
    }
}

impl IntoIterator for Tensors {
    type Item = (String, Tensor);
    type IntoIter = indexmap::map::IntoIter<String, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

impl<'a> IntoIterator for &'a Tensors {
    type Item = (&'a String, &'a Tensor);
    type IntoIter = indexmap::map::Iter<'a, String, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memory::HostBuffer;

    #[test]
    fn from_bytes_checks_sizes_and_reads_back() {
        let t = Tensor::from_slice(vec![2, 2], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(&*t.as_slice::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            t.as_slice::<u32>().unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let e = Tensor::from_bytes(Dtype::F32, vec![3], &[0; 8]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTensor);
        let e = Tensor::from_bytes(Dtype::F4, vec![3], &[0; 2]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTensor);
        assert!(Tensor::from_bytes(Dtype::F4, vec![4], &[0; 2]).is_ok());
    }

    #[test]
    fn misaligned_views_are_copied() {
        let words = [0x0102_0304_0506_0708u64, 0x1112_1314_1516_1718];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let s = CpuStorage::owned(Arc::new(HostBuffer::copy_of(&bytes).unwrap()), 1..5);
        let t = Tensor::from_parts(Dtype::U32, vec![1], Storage::Cpu(s));
        let v = t.as_slice::<u32>().unwrap();
        assert!(matches!(v, Cow::Owned(_)));
        assert_eq!(v[0], u32::from_le_bytes([7, 6, 5, 4]));
    }
}
