//! Parsing and validating a safetensors header, by exactly the reference implementation's
//! rules and in its order, plus one more: duplicate tensor names are rejected.
//!
//! The layout: an 8-byte little-endian length `n`, then `n` bytes of UTF-8 JSON (an object
//! whose keys are tensor names, each mapping to `{"dtype", "shape", "data_offsets"}`, and an
//! optional `"__metadata__"` map of strings to strings), then the tensors' bytes back to back.
//! Offsets are relative to the end of the header, and the data must end at the end of the file.
//!
//! Nothing here allocates in proportion to a number read from the file before checking it:
//! the header is read only once its length is known to lie inside the file, and every size
//! is computed with checked arithmetic.

use std::fmt;
use std::ops::Range;

use indexmap::IndexMap;
use indexmap::map::Entry;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};

/// The size of the header-length prefix.
pub const N_LEN: usize = 8;

/// The largest header the reference implementation accepts, in bytes.
pub const MAX_HEADER_LEN: usize = 100_000_000;

/// The key of the free-form metadata map.
pub const METADATA_KEY: &str = "__metadata__";

/// Free-form metadata: string keys to string values, in the order of the file.
pub type Metadata = IndexMap<String, String>;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The element type.
    pub dtype: Dtype,
    /// The shape, outermost dimension first (row-major); empty for a scalar.
    pub shape: Vec<usize>,
    /// `[begin, end)` of the tensor's bytes, relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// The number of bytes (validated: `end - begin`).
    pub fn len(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }

    /// Whether the tensor holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of elements (validated not to overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed and validated header.
#[derive(Debug, Clone)]
pub struct Header {
    header_len: usize,
    metadata: Option<Metadata>,
    tensors: IndexMap<String, TensorInfo>,
}

impl Header {
    /// Parses and validates the header of a whole file held in memory.
    pub fn parse(file: &[u8]) -> Result<Header> {
        let n = Header::read_len(file.get(..N_LEN).unwrap_or(file), file.len() as u64)?;
        // `read_len` checked that N_LEN + n <= file.len().
        let json = file.get(N_LEN..N_LEN + n).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidHeaderLength,
                "header past the end of the file",
            )
        })?;
        Header::parse_json(json, file.len() as u64)
    }

    /// Checks the length prefix (`prefix` holds the first up to 8 bytes of a file of
    /// `file_len` bytes) and returns the header length `n`: the first three rules.
    pub fn read_len(prefix: &[u8], file_len: u64) -> Result<usize> {
        let arr: [u8; N_LEN] = match prefix.get(..N_LEN) {
            Some(p) if file_len >= N_LEN as u64 => p.try_into().unwrap_or([0xFF; N_LEN]),
            _ => {
                return Err(Error::new(
                    ErrorKind::HeaderTooSmall,
                    format!("the file has {file_len} bytes, fewer than the 8 of the header length"),
                ));
            }
        };
        let n = u64::from_le_bytes(arr);
        if n > MAX_HEADER_LEN as u64 {
            return Err(Error::new(
                ErrorKind::HeaderTooLarge,
                format!("the header length is {n} bytes, over the limit of {MAX_HEADER_LEN}"),
            ));
        }
        let stop = n + N_LEN as u64; // n <= 10^8: cannot overflow
        if stop > file_len {
            return Err(Error::new(
                ErrorKind::InvalidHeaderLength,
                format!(
                    "8 + the header length {n} is {stop}, past the end of the {file_len}-byte file"
                ),
            ));
        }
        Ok(n as usize)
    }

    /// Parses and validates the `n` header bytes that follow the length prefix of a file of
    /// `file_len` bytes.
    pub fn parse_json(json: &[u8], file_len: u64) -> Result<Header> {
        let text = std::str::from_utf8(json).map_err(|e| {
            Error::new(
                ErrorKind::HeaderNotUtf8,
                format!("invalid UTF-8 at byte {} of the header", e.valid_up_to()),
            )
            .with_source(e)
        })?;
        let mut slot = None;
        let seed = HeaderSeed { slot: &mut slot };
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
        let (metadata, mut tensors) = match parsed {
            Ok(v) => v,
            Err(e) => return Err(classify(e, slot)),
        };
        // The reference sorts by offsets; ties (zero-size tensors) keep the header's order.
        tensors.sort_by(|_, a, _, b| a.data_offsets.cmp(&b.data_offsets));
        let header = Header {
            header_len: json.len(),
            metadata,
            tensors,
        };
        header.validate(file_len)?;
        Ok(header)
    }

    fn validate(&self, file_len: u64) -> Result<()> {
        let mut start = 0usize;
        for (name, info) in &self.tensors {
            let tagged = |e: Error| e.with_tensor(name.as_str());
            start = follows(info, start).map_err(tagged)?;
            check_size(info).map_err(tagged)?;
        }
        let end = (start as u64).saturating_add((N_LEN + self.header_len) as u64);
        if end != file_len {
            let how = if end < file_len {
                format!("{} trailing bytes", file_len - end)
            } else {
                format!("{} bytes missing", end - file_len)
            };
            return Err(Error::new(
                ErrorKind::IncompleteBuffer,
                format!("the data ends at byte {end} but the file has {file_len} ({how})"),
            ));
        }
        Ok(())
    }

    /// The length of the JSON header in bytes (`n`).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Where the data section begins in the file (`8 + n`).
    pub fn data_start(&self) -> usize {
        N_LEN + self.header_len
    }

    /// The size of the data section.
    pub fn data_len(&self) -> usize {
        self.tensors.last().map_or(0, |(_, t)| t.data_offsets.1)
    }

    /// The `__metadata__` map, if the file has one.
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }

    /// The tensors, in file order (by offset).
    pub fn tensors(&self) -> &IndexMap<String, TensorInfo> {
        &self.tensors
    }

    /// Takes the metadata and tensors out.
    pub fn into_parts(self) -> (Option<Metadata>, IndexMap<String, TensorInfo>) {
        (self.metadata, self.tensors)
    }

    /// A tensor's byte range in the file (not the data section).
    pub fn file_range(&self, info: &TensorInfo) -> Range<usize> {
        let s = self.data_start();
        s + info.data_offsets.0..s + info.data_offsets.1
    }
}

/// Turns a JSON error into the rule it broke: a syntax error is invalid JSON whatever the
/// visitor noted; a data error is what the visitor noted, or a non-object header.
fn classify(e: serde_json::Error, slot: Option<Error>) -> Error {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => {
            slot.unwrap_or_else(|| Error::new(ErrorKind::NotAnObject, e.to_string()).with_source(e))
        }
        Category::Syntax | Category::Eof | Category::Io => {
            Error::new(ErrorKind::InvalidJson, e.to_string()).with_source(e)
        }
    }
}

type Parsed = (Option<Metadata>, IndexMap<String, TensorInfo>);

/// Deserializes the top-level object, noting the precise rule broken in `slot`.
struct HeaderSeed<'s> {
    slot: &'s mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = Parsed;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = Parsed;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let slot = self.slot;
        let mut metadata = None;
        let mut seen_metadata = false;
        let mut tensors = IndexMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == METADATA_KEY {
                let value: serde_json::Value = map.next_value()?;
                if seen_metadata {
                    return Err(note(
                        slot,
                        Error::new(ErrorKind::InvalidMetadata, "__metadata__ appears twice"),
                    ));
                }
                seen_metadata = true;
                metadata = parse_metadata(value).map_err(|e| note(slot, e))?;
                continue;
            }
            let info = match map.next_value_seed(EntrySeed {
                name: &key,
                slot: &mut *slot,
            }) {
                Ok(info) => info,
                Err(e) => {
                    if slot.is_none() {
                        *slot = Some(
                            Error::new(ErrorKind::InvalidTensorEntry, e.to_string())
                                .with_tensor(key.as_str()),
                        );
                    }
                    return Err(e);
                }
            };
            match tensors.entry(key) {
                Entry::Occupied(o) => {
                    let e = Error::new(
                        ErrorKind::DuplicateName,
                        "the name appears more than once in the header",
                    )
                    .with_tensor(o.key().as_str());
                    return Err(note(slot, e));
                }
                Entry::Vacant(v) => {
                    v.insert(info);
                }
            }
        }
        Ok((metadata, tensors))
    }
}

/// The end of a tensor's bytes, where they begin where the previous tensor's end
/// (`start`: the data is packed, in offset order, from 0) and do not end before they begin.
fn follows(info: &TensorInfo, start: usize) -> Result<usize> {
    let (b, e) = info.data_offsets;
    if b != start {
        let why = if start == 0 {
            "the first tensor must begin at 0".to_owned()
        } else if b > start {
            format!("a hole: the previous tensor ends at {start}")
        } else {
            format!("an overlap: the previous tensor ends at {start}")
        };
        return Err(Error::new(
            ErrorKind::InvalidOffsets,
            format!("begins at {b}, {why}"),
        ));
    }
    if e < b {
        return Err(Error::new(
            ErrorKind::InvalidOffsets,
            format!("ends at {e}, before it begins at {b}"),
        ));
    }
    Ok(e)
}

/// Whether a tensor's bytes are what its shape and dtype need: an element count and a bit
/// count that do not overflow, whole bytes, and exactly the bytes its offsets hold.
fn check_size(info: &TensorInfo) -> Result<()> {
    let (b, e) = info.data_offsets;
    let Some(numel) = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        return Err(Error::new(
            ErrorKind::ShapeOverflow,
            format!("the element count of shape {:?} overflows", info.shape),
        ));
    };
    let Some(bits) = numel.checked_mul(info.dtype.bits()) else {
        return Err(Error::new(
            ErrorKind::ShapeOverflow,
            format!("{numel} elements of {} overflow in bits", info.dtype),
        ));
    };
    if bits % 8 != 0 {
        return Err(Error::new(
            ErrorKind::MisalignedSize,
            format!("{numel} elements of {} are {bits} bits", info.dtype),
        ));
    }
    if e - b != bits / 8 {
        return Err(Error::new(
            ErrorKind::SizeMismatch,
            format!(
                "data_offsets [{b}, {e}] hold {} bytes, shape {:?} of {} needs {}",
                e - b,
                info.shape,
                info.dtype,
                bits / 8
            ),
        ));
    }
    Ok(())
}

/// Stores `e` as the precise error and returns a serde error that aborts parsing.
fn note<E: de::Error>(slot: &mut Option<Error>, e: Error) -> E {
    let msg = e.to_string();
    *slot = Some(e);
    E::custom(msg)
}

fn parse_metadata(value: serde_json::Value) -> Result<Option<Metadata>> {
    let obj = match value {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::Object(obj) => obj,
        other => {
            return Err(Error::new(
                ErrorKind::InvalidMetadata,
                format!("__metadata__ is {}, not an object", json_kind(&other)),
            ));
        }
    };
    let mut out = Metadata::with_capacity(obj.len());
    for (k, v) in obj {
        match v {
            serde_json::Value::String(s) => {
                out.insert(k, s);
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidMetadata,
                    format!(
                        "the value of key {k:?} is {}, not a string",
                        json_kind(&other)
                    ),
                ));
            }
        }
    }
    Ok(Some(out))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The fields of a tensor entry; others are ignored, as the reference does.
#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Dtype,
    Shape,
    DataOffsets,
    #[serde(other)]
    Other,
}

/// Deserializes one tensor entry, noting the precise rule broken in `slot`.
struct EntrySeed<'a, 's> {
    name: &'a str,
    slot: &'s mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_, '_> {
    type Value = TensorInfo;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<TensorInfo, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_, '_> {
    type Value = TensorInfo;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tensor entry {\"dtype\", \"shape\", \"data_offsets\"}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TensorInfo, A::Error> {
        let name = self.name;
        let slot = self.slot;
        let bad = |slot: &mut Option<Error>, kind, msg: String| {
            note::<A::Error>(slot, Error::new(kind, msg).with_tensor(name))
        };
        let mut dtype: Option<String> = None;
        let mut shape: Option<Vec<usize>> = None;
        let mut offsets: Option<(usize, usize)> = None;
        while let Some(field) = map.next_key::<Field>()? {
            let (what, dup) = match field {
                Field::Dtype => ("dtype", dtype.is_some()),
                Field::Shape => ("shape", shape.is_some()),
                Field::DataOffsets => ("data_offsets", offsets.is_some()),
                Field::Other => {
                    // Parsed as a value, not skipped: serde_json's recursion limit (128)
                    // applies to it, as it does in the reference, which buffers every field.
                    map.next_value::<serde_json::Value>().map_err(|e| {
                        note::<A::Error>(
                            slot,
                            Error::new(ErrorKind::InvalidJson, format!("an unknown field: {e}"))
                                .with_tensor(name),
                        )
                    })?;
                    continue;
                }
            };
            if dup {
                return Err(bad(
                    slot,
                    ErrorKind::InvalidTensorEntry,
                    format!("field {what} appears twice"),
                ));
            }
            let type_error = |slot: &mut Option<Error>, e: A::Error| {
                bad(slot, ErrorKind::InvalidTensorEntry, format!("{what}: {e}"))
            };
            match field {
                Field::Dtype => dtype = Some(map.next_value().map_err(|e| type_error(slot, e))?),
                Field::Shape => shape = Some(map.next_value().map_err(|e| type_error(slot, e))?),
                Field::DataOffsets => {
                    offsets = Some(map.next_value().map_err(|e| type_error(slot, e))?)
                }
                Field::Other => {}
            }
        }
        entry(dtype, shape, offsets).map_err(|e| note(slot, e.with_tensor(name)))
    }
}

/// A tensor entry of the fields read: every one there, the dtype one of the format's.
fn entry(
    dtype: Option<String>,
    shape: Option<Vec<usize>>,
    offsets: Option<(usize, usize)>,
) -> Result<TensorInfo> {
    let missing = |what: &str| {
        Error::new(
            ErrorKind::InvalidTensorEntry,
            format!("missing field {what}"),
        )
    };
    let dtype = dtype.ok_or_else(|| missing("dtype"))?;
    let shape = shape.ok_or_else(|| missing("shape"))?;
    let data_offsets = offsets.ok_or_else(|| missing("data_offsets"))?;
    let dtype = dtype.parse::<Dtype>().map_err(|e| {
        Error::new(
            ErrorKind::UnknownDtype,
            format!("{:?} is not a dtype of the format", e.0),
        )
    })?;
    Ok(TensorInfo {
        dtype,
        shape,
        data_offsets,
    })
}

/// For tests: the bytes of a file whose header is `json` (unpadded) and whose data is `data`.
#[cfg(test)]
pub(crate) fn test_file(json: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        test_file(json, &vec![0; data])
    }

    fn kind(json: &str, data: usize) -> ErrorKind {
        Header::parse(&file(json, data)).unwrap_err().kind()
    }

    #[test]
    fn parses_and_orders_by_offset() {
        let h = Header::parse(&file(
            r#" {"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},
                "__metadata__":{"z":"1","a":"2"},
                "a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"extra":[1]}} "#,
            12,
        ))
        .unwrap();
        let names: Vec<_> = h.tensors().keys().cloned().collect();
        assert_eq!(names, ["a", "b"]);
        let md: Vec<_> = h.metadata().unwrap().keys().cloned().collect();
        assert_eq!(md, ["z", "a"]);
        assert_eq!(h.data_len(), 12);
        assert_eq!(h.file_range(&h.tensors()["b"]).len(), 8);
    }

    #[test]
    fn every_rule_has_its_kind() {
        assert_eq!(
            Header::parse(&[1, 0]).unwrap_err().kind(),
            ErrorKind::HeaderTooSmall
        );
        let mut big = (MAX_HEADER_LEN as u64 + 1).to_le_bytes().to_vec();
        big.extend_from_slice(b"{}");
        assert_eq!(
            Header::parse(&big).unwrap_err().kind(),
            ErrorKind::HeaderTooLarge
        );
        let mut past = 100u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert_eq!(
            Header::parse(&past).unwrap_err().kind(),
            ErrorKind::InvalidHeaderLength
        );
        let mut bad = 3u64.to_le_bytes().to_vec();
        bad.extend_from_slice(&[b'{', 0xFF, b'}']);
        assert_eq!(
            Header::parse(&bad).unwrap_err().kind(),
            ErrorKind::HeaderNotUtf8
        );
        assert_eq!(kind("{", 0), ErrorKind::InvalidJson);
        assert_eq!(kind("[]", 0), ErrorKind::NotAnObject);
        assert_eq!(kind("{} x", 0), ErrorKind::InvalidJson);
        assert_eq!(
            kind(r#"{"__metadata__":{"a":1}}"#, 0),
            ErrorKind::InvalidMetadata
        );
        assert_eq!(
            kind(r#"{"__metadata__":[]}"#, 0),
            ErrorKind::InvalidMetadata
        );
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"F33","shape":[],"data_offsets":[0,4]}}"#,
                4
            ),
            ErrorKind::UnknownDtype
        );
        assert_eq!(
            kind(r#"{"a":{"dtype":"F32","shape":[]}}"#, 4),
            ErrorKind::InvalidTensorEntry
        );
        assert_eq!(kind(r#"{"a":5}"#, 0), ErrorKind::InvalidTensorEntry);
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                4
            ),
            ErrorKind::InvalidTensorEntry
        );
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let e = Header::parse(&file(dup, 2)).unwrap_err();
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::DuplicateName, Some("a"))
        );
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2
            ),
            ErrorKind::InvalidOffsets
        );
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[3,2]}}"#,
                0
            ),
            ErrorKind::InvalidOffsets
        );
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
                1
            ),
            ErrorKind::ShapeOverflow
        );
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#,
                1
            ),
            ErrorKind::MisalignedSize
        );
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4
            ),
            ErrorKind::SizeMismatch
        );
        assert_eq!(
            kind(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                5
            ),
            ErrorKind::IncompleteBuffer
        );
    }
}
