//! One error type for the whole crate: a matchable [`ErrorKind`] (the rule broken or the
//! failure met), the file and tensor it concerns, and a message with the specifics.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong: the part of an [`Error`] a caller matches on.
///
/// The first group are the format's rules, in the order the reader checks them.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The file is shorter than the 8-byte header length.
    HeaderTooSmall,
    /// The header length is over 100,000,000 bytes.
    HeaderTooLarge,
    /// The header length points past the end of the file.
    InvalidHeaderLength,
    /// The header is not UTF-8.
    HeaderNotUtf8,
    /// The header is not valid JSON.
    InvalidJson,
    /// The header is JSON but not an object of entries.
    NotAnObject,
    /// `__metadata__` is not an object of strings to strings.
    InvalidMetadata,
    /// A tensor names a dtype the format does not define.
    UnknownDtype,
    /// A tensor entry lacks `dtype`, `shape` or `data_offsets`, or one has the wrong type.
    InvalidTensorEntry,
    /// Two tensors have the same name.
    DuplicateName,
    /// The offsets, sorted, do not start at 0 and run back to back, or an end precedes its begin.
    InvalidOffsets,
    /// The number of elements or bits of a shape overflows.
    ShapeOverflow,
    /// A tensor's bits are not a whole number of bytes.
    MisalignedSize,
    /// `end - begin` differs from the bytes that shape and dtype need.
    SizeMismatch,
    /// The data does not end exactly at the end of the file (bytes missing, or trailing).
    IncompleteBuffer,
    /// Reading or writing a file failed.
    Io,
    /// A device string could not be parsed.
    InvalidDevice,
    /// The device is not compiled in, absent, or its driver cannot be used.
    DeviceUnavailable,
    /// The device (or the host) has too little free memory for the load.
    OutOfMemory,
    /// A size computed for a load or a save (the sum of the tensors' bytes, say) does not
    /// fit the address space.
    SizeOverflow,
    /// A device driver or API call failed.
    Backend,
    /// The operation is not supported (a conversion between two dtypes, say).
    Unsupported,
    /// A tensor built or saved by the caller is inconsistent (bytes and shape disagree, say).
    InvalidTensor,
    /// A tensor name was asked for that is not there.
    TensorNotFound,
    /// The load was stopped by its caller (see `Loader::interrupt`).
    Interrupted,
    /// A sharded checkpoint's index disagrees with its shards: a tensor mapped to a file
    /// that does not hold it, a missing shard, a name held by two shards, a tensor no shard
    /// has, a shard the index never mentions, or an index that is not valid JSON of the
    /// `weight_map` shape.
    InvalidIndex,
    /// A slice or a tensor-parallel split does not fit the tensor (an index out of range, a
    /// step, more indices than dimensions, a cut inside a byte of a packed dtype).
    InvalidSlice,
    /// An argument that is not valid for the call (a shard size that does not parse, a
    /// shard written past the last).
    InvalidArgument,
}

impl ErrorKind {
    /// A short description of the rule or failure.
    pub const fn describe(self) -> &'static str {
        match self {
            ErrorKind::HeaderTooSmall => "file too small for the 8-byte header length",
            ErrorKind::HeaderTooLarge => "header length over the 100,000,000-byte limit",
            ErrorKind::InvalidHeaderLength => "header length past the end of the file",
            ErrorKind::HeaderNotUtf8 => "header not UTF-8",
            ErrorKind::InvalidJson => "header not valid JSON",
            ErrorKind::NotAnObject => "header not a JSON object of entries",
            ErrorKind::InvalidMetadata => "__metadata__ not a map of strings to strings",
            ErrorKind::UnknownDtype => "unknown dtype",
            ErrorKind::InvalidTensorEntry => "invalid tensor entry",
            ErrorKind::DuplicateName => "duplicate tensor name",
            ErrorKind::InvalidOffsets => "invalid data_offsets",
            ErrorKind::ShapeOverflow => "shape size overflows",
            ErrorKind::MisalignedSize => "tensor bits not a whole number of bytes",
            ErrorKind::SizeMismatch => "data_offsets disagree with shape and dtype",
            ErrorKind::IncompleteBuffer => "data does not end at the end of the file",
            ErrorKind::Io => "I/O error",
            ErrorKind::InvalidDevice => "invalid device string",
            ErrorKind::DeviceUnavailable => "device unavailable",
            ErrorKind::OutOfMemory => "out of memory",
            ErrorKind::SizeOverflow => "size overflows the address space",
            ErrorKind::Backend => "device error",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidTensor => "invalid tensor",
            ErrorKind::TensorNotFound => "tensor not found",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::InvalidIndex => "checkpoint index inconsistent with its shards",
            ErrorKind::InvalidSlice => "invalid slice",
            ErrorKind::InvalidArgument => "invalid argument",
        }
    }

    /// Whether this kind is a violation of the file format (as opposed to I/O or device trouble).
    pub const fn is_format(self) -> bool {
        matches!(
            self,
            ErrorKind::HeaderTooSmall
                | ErrorKind::HeaderTooLarge
                | ErrorKind::InvalidHeaderLength
                | ErrorKind::HeaderNotUtf8
                | ErrorKind::InvalidJson
                | ErrorKind::NotAnObject
                | ErrorKind::InvalidMetadata
                | ErrorKind::UnknownDtype
                | ErrorKind::InvalidTensorEntry
                | ErrorKind::DuplicateName
                | ErrorKind::InvalidOffsets
                | ErrorKind::ShapeOverflow
                | ErrorKind::MisalignedSize
                | ErrorKind::SizeMismatch
                | ErrorKind::IncompleteBuffer
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The error of every fallible function in this crate.
///
/// It displays as `FILE: tensor "NAME": RULE: DETAILS`, leaving out what does not apply.
/// Cloning is cheap: the underlying cause is shared, so a clone keeps it.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    file: Option<PathBuf>,
    tensor: Option<String>,
    message: String,
    cause: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl std::error::Error for Error {
    /// The underlying error itself (an `std::io::Error`, a driver's error), so that
    /// `downcast_ref` finds it.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let cause: &(dyn std::error::Error + 'static) = self.cause.as_deref()?;
        Some(cause)
    }
}

impl Error {
    /// A new error of `kind` with a message giving the specifics.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            file: None,
            tensor: None,
            message: message.into(),
            cause: None,
        }
    }

    /// An I/O error while doing `what` (such as "reading") on `path`.
    pub fn io(what: &str, path: Option<&Path>, source: std::io::Error) -> Self {
        let mut e = Error::new(ErrorKind::Io, format!("{what}: {source}")).with_source(source);
        e.file = path.map(Path::to_path_buf);
        e
    }

    /// Sets the file this error concerns, unless one is already set.
    pub fn with_file(mut self, path: impl AsRef<Path>) -> Self {
        if self.file.is_none() {
            self.file = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Sets the file this error concerns if `path` is `Some`.
    pub fn with_opt_file(self, path: Option<&Path>) -> Self {
        match path {
            Some(p) => self.with_file(p),
            None => self,
        }
    }

    /// Sets the tensor this error concerns, unless one is already set.
    pub fn with_tensor(mut self, name: impl Into<String>) -> Self {
        if self.tensor.is_none() {
            self.tensor = Some(name.into());
        }
        self
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.cause = Some(Arc::new(source));
        self
    }

    /// What went wrong, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file concerned, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The tensor concerned, if any.
    pub fn tensor(&self) -> Option<&str> {
        self.tensor.as_deref()
    }

    /// The specifics, without file, tensor or rule.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(tensor) = &self.tensor {
            write!(f, "tensor {tensor:?}: ")?;
        }
        write!(f, "{}", self.kind)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_tensor_and_rule() {
        let e = Error::new(ErrorKind::SizeMismatch, "12 bytes, shape needs 16")
            .with_tensor("w")
            .with_file("m.safetensors")
            .with_file("ignored");
        assert_eq!(
            e.to_string(),
            "m.safetensors: tensor \"w\": data_offsets disagree with shape and dtype: 12 bytes, shape needs 16"
        );
        assert_eq!(e.kind(), ErrorKind::SizeMismatch);
        assert!(e.kind().is_format());
        assert!(!ErrorKind::Io.is_format());
    }

    #[test]
    fn clones_keep_the_cause() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = Error::io("opening", Some(Path::new("m")), io);
        let c = e.clone();
        assert_eq!(c.to_string(), e.to_string());
        assert_eq!(c.source().map(|s| s.to_string()), Some("gone".to_owned()));
        let io = c.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::NotFound)
        );
    }
}
