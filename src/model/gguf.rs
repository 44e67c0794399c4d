//! The GGUF file format: a validating, memory-mapped reader (header, metadata, tensor infos,
//! tensor bytes) and a writer (used for llama.cpp control vectors and for building test files).
//!
//! Layout (all little-endian): magic `GGUF`, version (2 or 3), tensor count (u64), metadata count
//! (u64), the metadata key/value pairs, the tensor infos (name, dims innermost first, ggml type,
//! offset), padding up to `general.alignment` (default 32), then the tensor data. Every length
//! and count read from a file is checked against the bytes that remain before anything is
//! allocated from it, so a corrupt file gives an [`Error::Format`] naming the file and the problem.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::quant::{self, GgmlType};

/// `GGUF` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// The version the writer produces.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of tensor data when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor dimensions.
pub const GGUF_MAX_DIMS: usize = 4;
/// How deeply arrays may nest inside metadata values (real files use at most 2).
const MAX_ARRAY_DEPTH: usize = 8;

/// Type tag of a metadata value, as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// The type with this numeric tag, if any.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Fewest bytes one value of this type occupies in a file (used to bound counts).
    fn min_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A homogeneous metadata array. Nested arrays carry their own element types.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufArray {
    /// The element type.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as i64 if this is an integer array whose values all fit.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            GgufArray::U8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect::<Option<_>>()?,
            GgufArray::I64(v) => v.clone(),
            _ => return None,
        })
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value as i128 (wide enough for u64 and i64 alike).
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v as i128,
            GgufValue::I8(v) => v as i128,
            GgufValue::U16(v) => v as i128,
            GgufValue::I16(v) => v as i128,
            GgufValue::U32(v) => v as i128,
            GgufValue::I32(v) => v as i128,
            GgufValue::U64(v) => v as i128,
            GgufValue::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// A float value (f32 or f64) as f64.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is an array value.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description of the value's type for messages ("u32", "array of string").
    pub fn type_description(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("array of {:?}", a.elem_type()).to_lowercase(),
            other => format!("{:?}", other.value_type()).to_lowercase(),
        }
    }
}

/// Where one tensor lives in a GGUF file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored (ggml `ne`, innermost first).
    pub dims: Vec<u64>,
    /// How the data is encoded.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of elements (the product of `dims`).
    pub n_elements: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Shape outermost first, as PyTorch and Hugging Face write it (the reverse of `dims`).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file whose tensor data stays memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian cursor; every failure names the file and the offset.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, msg)
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated GGUF file: {what} at offset {} needs {n} bytes but only {} remain (file size {})",
                self.pos,
                self.remaining(),
                self.bytes.len()
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what remains.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize> {
        match count.checked_mul(min_size) {
            Some(need) if need <= self.remaining() => Ok(count as usize),
            _ => Err(self.err(format!(
                "truncated or corrupt GGUF file: {what} count {count} at offset {} is impossible: the {} remaining bytes hold at most {}",
                self.pos,
                self.remaining(),
                self.remaining() / min_size.max(1)
            ))),
        }
    }

    fn raw_string(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(self.err(format!(
                "truncated or corrupt GGUF file: {what} at offset {} claims length {len} but only {} bytes remain",
                self.pos,
                self.remaining()
            )));
        }
        self.take(len, what)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let raw = self.raw_string(what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err(format!("{what} at offset {at} is not valid UTF-8")))
    }

    /// A string value; invalid UTF-8 is replaced (llama.cpp does not validate values either).
    fn value_string(&mut self, what: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(self.raw_string(what)?).into_owned())
    }

    fn value_type(&mut self, what: &str) -> Result<GgufValueType> {
        let at = self.pos;
        let id = self.u32(what)?;
        GgufValueType::from_id(id).ok_or_else(|| self.err(format!("{what} at offset {at} has unknown value type {id}")))
    }

    fn value(&mut self, ty: GgufValueType, key: &str, depth: usize) -> Result<GgufValue> {
        let what = format!("value of '{key}'");
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>(&what)?[0]),
            GgufValueType::I8 => GgufValue::I8(self.array::<1>(&what)?[0] as i8),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool(&what)?),
            GgufValueType::String => GgufValue::String(self.value_string(&what)?),
            GgufValueType::Array => GgufValue::Array(self.gguf_array(key, depth + 1)?),
        })
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        let at = self.pos;
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("{what} at offset {at} is a bool stored as {b} (expected 0 or 1)"))),
        }
    }

    fn gguf_array(&mut self, key: &str, depth: usize) -> Result<GgufArray> {
        let what = format!("array '{key}'");
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.err(format!("{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")));
        }
        let ty = self.value_type(&what)?;
        let count = self.u64(&what)?;
        let n = self.check_count(count, ty.min_size(), &what)?;
        macro_rules! fixed {
            ($variant:ident, $t:ty, $size:expr) => {{
                let bytes = self.take((n * $size) as u64, &what)?;
                GgufArray::$variant(
                    bytes.chunks_exact($size).map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default())).collect(),
                )
            }};
        }
        Ok(match ty {
            GgufValueType::U8 => GgufArray::U8(self.take(n as u64, &what)?.to_vec()),
            GgufValueType::I8 => GgufArray::I8(self.take(n as u64, &what)?.iter().map(|&b| b as i8).collect()),
            GgufValueType::U16 => fixed!(U16, u16, 2),
            GgufValueType::I16 => fixed!(I16, i16, 2),
            GgufValueType::U32 => fixed!(U32, u32, 4),
            GgufValueType::I32 => fixed!(I32, i32, 4),
            GgufValueType::F32 => fixed!(F32, f32, 4),
            GgufValueType::U64 => fixed!(U64, u64, 8),
            GgufValueType::I64 => fixed!(I64, i64, 8),
            GgufValueType::F64 => fixed!(F64, f64, 8),
            GgufValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(&what)?);
                }
                GgufArray::Bool(v)
            }
            GgufValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.value_string(&format!("element {i} of {what}"))?);
                }
                GgufArray::String(v)
            }
            GgufValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.gguf_array(key, depth + 1)?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    x.checked_add(alignment - 1).map(|v| v / alignment * alignment)
}

impl GgufFile {
    /// Opens, memory-maps and validates a GGUF file (versions 2 and 3).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::format(path, "truncated GGUF file: the file is empty"));
        }
        let mmap = super::map_file(path)?;
        Self::parse(path.to_path_buf(), Storage::Mapped(mmap))
    }

    /// Parses a GGUF image held in memory; `path` is only used in messages.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(path.as_ref().to_path_buf(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<GgufFile> {
        let bytes = storage.bytes();
        let mut c = Cursor { path: &path, bytes, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(c.err(format!(
                "not a GGUF file: bad magic {:?} (expected \"GGUF\")",
                String::from_utf8_lossy(&magic.to_le_bytes())
            )));
        }
        let version = c.u32("version")?;
        match version {
            2 | 3 => {}
            1 => return Err(c.err("unsupported GGUF version 1 (only versions 2 and 3 are read)")),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(c.err("big-endian GGUF files are not supported"));
            }
            v => return Err(c.err(format!("unsupported GGUF version {v} (only versions 2 and 3 are read)"))),
        }
        let tensor_count = c.u64("tensor count")?;
        let kv_count = c.u64("metadata count")?;
        // Each key/value needs at least 8 (key length) + 4 (type) + 1 bytes; each tensor info
        // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        let kv_n = c.check_count(kv_count, 13, "metadata")?;
        let tensor_n = c.check_count(tensor_count, 24, "tensor")?;

        let mut metadata = Vec::with_capacity(kv_n);
        let mut metadata_index = HashMap::with_capacity(kv_n);
        for i in 0..kv_n {
            let key = c.strict_string(&format!("key of metadata entry {i}"))?;
            let ty = c.value_type(&format!("type of '{key}'"))?;
            let value = c.value(ty, &key, 0)?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(format!("duplicate metadata key '{key}'")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(other) => {
                return Err(c.err(format!("general.alignment must be a u32 power of two, got {other:?}")));
            }
        };

        let mut tensors = Vec::with_capacity(tensor_n);
        let mut tensor_index = HashMap::with_capacity(tensor_n);
        for i in 0..tensor_n {
            let name = c.strict_string(&format!("name of tensor {i}"))?;
            let n_dims = c.u32(&format!("dimension count of tensor '{name}'"))?;
            if n_dims as usize > GGUF_MAX_DIMS {
                return Err(c.err(format!("tensor '{name}' has {n_dims} dimensions (at most {GGUF_MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("dimensions of tensor '{name}'"))?);
            }
            let type_id = c.u32(&format!("type of tensor '{name}'"))?;
            let offset = c.u64(&format!("offset of tensor '{name}'"))?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                Error::Unsupported(format!("{}: tensor '{name}' has unknown ggml type id {type_id}", path.display()))
            })?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| c.err(format!("tensor '{name}' has absurd dimensions {dims:?}")))?;
            let row = dims.first().copied().unwrap_or(1);
            if !row.is_multiple_of(ggml_type.block_size() as u64) {
                return Err(c.err(format!(
                    "tensor '{name}': row length {row} is not a multiple of the {} block size {}",
                    ggml_type.name(),
                    ggml_type.block_size()
                )));
            }
            let n_bytes = ggml_type
                .bytes_for(n_elements)
                .ok_or_else(|| c.err(format!("tensor '{name}' has absurd dimensions {dims:?}")))?;
            if !offset.is_multiple_of(alignment) {
                return Err(
                    c.err(format!("tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"))
                );
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.err(format!("duplicate tensor name '{name}'")));
            }
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset, n_elements, n_bytes });
        }

        let file_len = bytes.len() as u64;
        let data_offset = align_up(c.pos as u64, alignment).unwrap_or(u64::MAX);
        let data_len = file_len.saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(c.err(format!(
                    "truncated or corrupt GGUF file: tensor '{}' data ({} bytes at data offset {}, file offset {}) runs past the end of the file ({} bytes)",
                    t.name,
                    t.n_bytes,
                    t.offset,
                    data_offset.saturating_add(t.offset),
                    file_len
                )));
            }
        }
        Ok(GgufFile { path, storage, version, metadata, metadata_index, tensors, tensor_index, alignment, data_offset })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.metadata_index.contains_key(key)
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &GgufValue) -> Error {
        Error::format(&self.path, format!("metadata '{key}' should be {expected} but is {}", got.type_description()))
    }

    /// A string value; `Ok(None)` if absent, an error if present with another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    /// An integer value of any width that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_integer().map(u64::try_from) {
                Some(Ok(x)) => Ok(Some(x)),
                Some(Err(_)) => Err(Error::format(&self.path, format!("metadata '{key}' is out of range: {v:?}"))),
                None => Err(self.wrong_type(key, "an unsigned integer", v)),
            },
        }
    }

    /// An integer value of any width that fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get_u64(key)? {
            None => Ok(None),
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| Error::format(&self.path, format!("metadata '{key}' = {x} does not fit in 32 bits"))),
        }
    }

    /// A float value (f32 or f64, narrowed to f32).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_float().map(|f| Some(f as f32)).ok_or_else(|| self.wrong_type(key, "a float", v)),
        }
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    /// An array value of any element type.
    pub fn get_array(&self, key: &str) -> Result<Option<&GgufArray>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::String(v))) => Ok(Some(v)),
            Some(v) => Err(self.wrong_type(key, "an array of strings", v)),
        }
    }

    /// An array of integers (any width) as i64.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_array().and_then(|a| a.to_i64_vec()) {
                Some(ints) => Ok(Some(ints)),
                None => Err(self.wrong_type(key, "an array of integers", v)),
            },
        }
    }

    /// Like [`GgufFile::get_u32`] but the key must be present.
    pub fn require_u32(&self, key: &str) -> Result<u32> {
        self.get_u32(key)?.ok_or_else(|| Error::format(&self.path, format!("missing metadata '{key}'")))
    }

    /// Like [`GgufFile::get_str`] but the key must be present.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| Error::format(&self.path, format!("missing metadata '{key}'")))
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of one tensor by its GGUF name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| Error::InvalidInput(format!("{}: no tensor named '{name}'", self.path.display())))
    }

    /// The stored bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let t = self.require_tensor(name)?;
        let start = self.data_offset.saturating_add(t.offset);
        let end = start.saturating_add(t.n_bytes);
        self.storage
            .bytes()
            .get(usize::try_from(start).unwrap_or(usize::MAX)..usize::try_from(end).unwrap_or(usize::MAX))
            .ok_or_else(|| Error::format(&self.path, format!("tensor '{name}' data lies outside the file")))
    }

    /// Decodes a tensor to f32 values in storage order (innermost dimension fastest).
    pub fn dequantize_to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.require_tensor(name)?;
        if !t.ggml_type.can_dequantize() {
            return Err(Error::Unsupported(format!(
                "{}: tensor '{name}' has ggml type {} (id {}), which engram cannot decode yet",
                self.path.display(),
                t.ggml_type.name(),
                t.ggml_type.id()
            )));
        }
        quant::dequantize(t.ggml_type, self.tensor_data(name)?, t.n_elements as usize)
            .map_err(|e| Error::format(&self.path, format!("tensor '{name}': {e}")))
    }
}

/// A tensor to write: its name, shape (outermost first, PyTorch order), type and encoded bytes.
#[derive(Debug, Clone)]
pub struct GgufTensorToWrite<'a> {
    /// The GGUF name.
    pub name: String,
    /// Shape, outermost first (written reversed, as ggml `ne`).
    pub shape: Vec<usize>,
    /// How `data` is encoded.
    pub ggml_type: GgmlType,
    /// The encoded bytes (see [`quant::quantize`]).
    pub data: Cow<'a, [u8]>,
}

impl GgufTensorToWrite<'static> {
    /// Encodes f32 values (row-major, `shape` outermost first) as `ggml_type`.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, ggml_type: GgmlType, values: &[f32]) -> Result<Self> {
        let name = name.into();
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::Shape(format!(
                "tensor '{name}': shape {shape:?} needs {n} values, got {}",
                values.len()
            )));
        }
        let data = quant::quantize(ggml_type, values).map_err(|e| Error::Shape(format!("tensor '{name}': {e}")))?;
        Ok(GgufTensorToWrite { name, shape, ggml_type, data: Cow::Owned(data) })
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => each!(v),
        GgufArray::U16(v) => each!(v),
        GgufArray::I16(v) => each!(v),
        GgufArray::U32(v) => each!(v),
        GgufArray::I32(v) => each!(v),
        GgufArray::F32(v) => each!(v),
        GgufArray::U64(v) => each!(v),
        GgufArray::I64(v) => each!(v),
        GgufArray::F64(v) => each!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        GgufArray::String(v) => v.iter().for_each(|s| write_string(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|inner| write_array(out, inner)),
    }
}

fn write_value(out: &mut Vec<u8>, v: &GgufValue) {
    out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array(a) => write_array(out, a),
    }
}

/// Encodes a GGUF v3 image: metadata in the given order, then tensor infos and data, each
/// tensor aligned to `general.alignment` (when given as a u32 power of two) or 32 bytes.
pub fn encode_gguf(metadata: &[(String, GgufValue)], tensors: &[GgufTensorToWrite<'_>]) -> Result<Vec<u8>> {
    let mut alignment = GGUF_DEFAULT_ALIGNMENT;
    let mut keys = std::collections::HashSet::new();
    for (key, value) in metadata {
        if !keys.insert(key.as_str()) {
            return Err(Error::InvalidInput(format!("GGUF writer: duplicate metadata key '{key}'")));
        }
        if key == "general.alignment" {
            match value {
                GgufValue::U32(a) if *a > 0 && a.is_power_of_two() => alignment = *a as u64,
                other => {
                    return Err(Error::InvalidInput(format!(
                        "GGUF writer: general.alignment must be a u32 power of two, got {other:?}"
                    )))
                }
            }
        }
    }
    let mut names = std::collections::HashSet::new();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut next = 0u64;
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::InvalidInput(format!("GGUF writer: duplicate tensor name '{}'", t.name)));
        }
        if t.shape.len() > GGUF_MAX_DIMS {
            return Err(Error::Shape(format!(
                "GGUF writer: tensor '{}' has more than {GGUF_MAX_DIMS} dimensions",
                t.name
            )));
        }
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        let inner = t.shape.last().copied().unwrap_or(1) as u64;
        let expected = t.ggml_type.bytes_for(n).filter(|_| inner.is_multiple_of(t.ggml_type.block_size() as u64));
        if expected != Some(t.data.len() as u64) {
            return Err(Error::Shape(format!(
                "GGUF writer: tensor '{}' of shape {:?} and type {} needs {} bytes, got {}",
                t.name,
                t.shape,
                t.ggml_type,
                expected.map_or_else(|| "rows of whole blocks and".to_string(), |e| e.to_string()),
                t.data.len()
            )));
        }
        offsets.push(next);
        next = align_up(next + t.data.len() as u64, alignment).unwrap_or(u64::MAX);
    }

    let mut out = Vec::new();
    out.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
    out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut out, key);
        write_value(&mut out, value);
    }
    for (t, offset) in tensors.iter().zip(&offsets) {
        write_string(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    for t in tensors {
        let padded = align_up(out.len() as u64, alignment).unwrap_or(u64::MAX) as usize;
        out.resize(padded, 0);
        out.extend_from_slice(&t.data);
    }
    // Pad the end as well so that an empty tensor list still has an aligned data section.
    let padded = align_up(out.len() as u64, alignment).unwrap_or(u64::MAX) as usize;
    out.resize(padded, 0);
    Ok(out)
}

/// Writes a GGUF v3 file (see [`encode_gguf`]).
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensorToWrite<'_>],
) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_gguf(metadata, tensors)?;
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn fnv1a64(values: &[f32]) -> String {
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for v in values {
            for b in v.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
        format!("{h:016x}")
    }

    fn kv(key: &str, value: GgufValue) -> (String, GgufValue) {
        (key.to_string(), value)
    }

    fn sample_metadata() -> Vec<(String, GgufValue)> {
        vec![
            kv("general.architecture", GgufValue::String("llama".into())),
            kv("t.u8", GgufValue::U8(7)),
            kv("t.i8", GgufValue::I8(-7)),
            kv("t.u16", GgufValue::U16(65535)),
            kv("t.i16", GgufValue::I16(-300)),
            kv("t.u32", GgufValue::U32(123_456)),
            kv("t.i32", GgufValue::I32(-5)),
            kv("t.f32", GgufValue::F32(1.5)),
            kv("t.bool", GgufValue::Bool(true)),
            kv("t.str", GgufValue::String("héllo ✓".into())),
            kv("t.u64", GgufValue::U64(u64::MAX)),
            kv("t.i64", GgufValue::I64(i64::MIN)),
            kv("t.f64", GgufValue::F64(-0.25)),
            kv("t.arr_str", GgufValue::Array(GgufArray::String(vec!["a".into(), "".into(), "ü".into()]))),
            kv("t.arr_f32", GgufValue::Array(GgufArray::F32(vec![0.5, -1.0]))),
            kv("t.arr_bool", GgufValue::Array(GgufArray::Bool(vec![true, false]))),
            kv("t.arr_empty", GgufValue::Array(GgufArray::I64(vec![]))),
            kv(
                "t.nested",
                GgufValue::Array(GgufArray::Array(vec![
                    GgufArray::U8(vec![1, 2]),
                    GgufArray::String(vec!["x".into()]),
                ])),
            ),
        ]
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 250.0 - 1.9).collect()
    }

    fn sample_tensors() -> Vec<GgufTensorToWrite<'static>> {
        vec![
            GgufTensorToWrite::from_f32("a.f32", vec![3, 5], GgmlType::F32, &values(15, 1)).unwrap(),
            GgufTensorToWrite::from_f32("b.q8", vec![2, 64], GgmlType::Q8_0, &values(128, 2)).unwrap(),
            GgufTensorToWrite::from_f32("c.q4_0", vec![3, 32], GgmlType::Q4_0, &values(96, 3)).unwrap(),
            GgufTensorToWrite::from_f32("d.q4_1", vec![1, 2, 32], GgmlType::Q4_1, &values(64, 4)).unwrap(),
            GgufTensorToWrite::from_f32("e.f16", vec![7], GgmlType::F16, &values(7, 5)).unwrap(),
            GgufTensorToWrite::from_f32("f.bf16", vec![2, 3], GgmlType::BF16, &values(6, 6)).unwrap(),
        ]
    }

    fn write_sample(dir: &Path) -> PathBuf {
        let path = dir.join("sample.gguf");
        write_gguf(&path, &sample_metadata(), &sample_tensors()).unwrap();
        path
    }

    #[test]
    fn writer_and_reader_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_offset() % 32, 0);
        assert_eq!(f.metadata(), sample_metadata().as_slice());
        assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(f.get_u32("t.u16").unwrap(), Some(65535));
        assert_eq!(f.get_u64("t.u64").unwrap(), Some(u64::MAX));
        assert!(matches!(f.get_u32("t.u64"), Err(Error::Format { .. })));
        assert!(matches!(f.get_u32("t.i32"), Err(Error::Format { .. })));
        assert!(matches!(f.get_u32("t.str"), Err(Error::Format { .. })));
        assert_eq!(f.get_f32("t.f64").unwrap(), Some(-0.25));
        assert_eq!(f.get_bool("t.bool").unwrap(), Some(true));
        assert_eq!(f.get_str_array("t.arr_str").unwrap().map(|a| a.len()), Some(3));
        assert_eq!(f.get_int_array("t.nested").ok(), None);
        assert_eq!(f.get_str("missing").unwrap(), None);
        for t in sample_tensors() {
            let info = f.tensor_info(&t.name).unwrap();
            assert_eq!(info.shape(), t.shape);
            assert_eq!(info.ggml_type, t.ggml_type);
            assert_eq!(info.offset % 32, 0);
            assert_eq!(f.tensor_data(&t.name).unwrap(), &*t.data);
            let expected = quant::dequantize(t.ggml_type, &t.data, t.shape.iter().product()).unwrap();
            assert_eq!(f.dequantize_to_f32(&t.name).unwrap(), expected);
        }
        assert!(matches!(f.tensor_data("nope"), Err(Error::InvalidInput(_))));
    }

    /// llama.cpp's control-vector layout: F32 1-D `direction.{i}` tensors, layers 1-based. Set
    /// ENGRAM_KEEP_CONTROL_VECTOR=path to keep the file (e.g. to read it with gguf-py).
    #[test]
    fn control_vector_layout_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cv.gguf");
        let md = vec![
            kv("general.architecture", GgufValue::String("controlvector".into())),
            kv("controlvector.model_hint", GgufValue::String("llama".into())),
            kv("controlvector.layer_count", GgufValue::U32(3)),
        ];
        let tensors: Vec<_> = (1..=3)
            .map(|i| {
                GgufTensorToWrite::from_f32(format!("direction.{i}"), vec![10], GgmlType::F32, &values(10, i)).unwrap()
            })
            .collect();
        write_gguf(&path, &md, &tensors).unwrap();
        if let Ok(copy) = std::env::var("ENGRAM_KEEP_CONTROL_VECTOR") {
            std::fs::copy(&path, copy).unwrap();
        }
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), Some("controlvector"));
        assert_eq!(f.get_u32("controlvector.layer_count").unwrap(), Some(3));
        for i in 1..=3u32 {
            let info = f.tensor_info(&format!("direction.{i}")).unwrap();
            assert_eq!((info.dims.as_slice(), info.ggml_type), (&[10u64][..], GgmlType::F32));
            assert_eq!(f.dequantize_to_f32(&info.name).unwrap(), values(10, i));
        }
    }

    #[test]
    fn custom_alignment_and_no_tensors() {
        let mut md = sample_metadata();
        md.push(kv("general.alignment", GgufValue::U32(64)));
        let bytes = encode_gguf(&md, &sample_tensors()).unwrap();
        let f = GgufFile::from_bytes("mem.gguf", bytes).unwrap();
        assert_eq!(f.alignment(), 64);
        assert!(f.tensors().iter().all(|t| t.offset % 64 == 0));
        assert_eq!(f.dequantize_to_f32("a.f32").unwrap(), values(15, 1));

        let f = GgufFile::from_bytes("empty.gguf", encode_gguf(&[], &[]).unwrap()).unwrap();
        assert!(f.metadata().is_empty() && f.tensors().is_empty());
        md.push(kv("general.alignment", GgufValue::U32(3)));
        assert!(encode_gguf(&md, &[]).is_err());
    }

    #[test]
    fn writer_rejects_inconsistent_tensors() {
        let bad_len = GgufTensorToWrite {
            name: "x".into(),
            shape: vec![2, 32],
            ggml_type: GgmlType::Q8_0,
            data: Cow::Owned(vec![0; 34]),
        };
        assert!(matches!(encode_gguf(&[], &[bad_len]), Err(Error::Shape(_))));
        let bad_row = GgufTensorToWrite {
            name: "x".into(),
            shape: vec![32, 2],
            ggml_type: GgmlType::Q8_0,
            data: Cow::Owned(vec![0; 68]),
        };
        assert!(matches!(encode_gguf(&[], &[bad_row]), Err(Error::Shape(_))));
        let t = GgufTensorToWrite::from_f32("x", vec![4], GgmlType::F32, &[1.0; 4]).unwrap();
        assert!(matches!(encode_gguf(&[], &[t.clone(), t]), Err(Error::InvalidInput(_))));
    }

    /// A file written by gguf-py's GGUFWriter, with tensors quantized by gguf-py
    /// (tools/make_gguf_fixture.py): our reader sees the same metadata, our dequantizers give
    /// bit-identical values, and our reference quantizers give identical bytes.
    #[test]
    fn reads_gguf_py_file_bit_exactly() {
        let f = GgufFile::open(fixture("gguf_py_reference.gguf")).unwrap();
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("gguf_reference.json")).unwrap()).unwrap();
        assert_eq!(f.get_u32("test.u32").unwrap(), Some(4_000_000_000));
        assert_eq!(f.get("test.i8"), Some(&GgufValue::I8(-100)));
        assert_eq!(f.get("test.i16"), Some(&GgufValue::I16(-30000)));
        assert_eq!(f.get_u64("test.u64").unwrap(), Some((1u64 << 63) + 5));
        assert_eq!(f.get("test.i64"), Some(&GgufValue::I64(-(1i64 << 62))));
        assert_eq!(f.get("test.f32"), Some(&GgufValue::F32(0.1)));
        assert_eq!(f.get("test.f64"), Some(&GgufValue::F64(0.1)));
        assert_eq!(f.get_bool("test.bool").unwrap(), Some(true));
        assert_eq!(f.get_str("test.string").unwrap(), Some("héllo ✓"));
        assert_eq!(f.get_int_array("test.array_i32").unwrap(), Some(vec![1, -2, 3]));
        assert_eq!(f.get_str_array("test.array_str").unwrap().unwrap(), &["a", "", "ü"]);
        match f.get("test.array_nested") {
            Some(GgufValue::Array(GgufArray::Array(inner))) => {
                assert_eq!(inner.len(), 2);
                assert_eq!(inner[0].to_i64_vec(), Some(vec![1, 2]));
                assert_eq!(inner[1].to_i64_vec(), Some(vec![3]));
            }
            other => panic!("nested array read as {other:?}"),
        }
        for name in ["q8_0", "q4_0", "q4_1", "f16", "bf16"] {
            let expected = &reference[name];
            let info = f.tensor_info(name).unwrap();
            assert_eq!(info.ggml_type.name(), expected["type"].as_str().unwrap());
            let shape: Vec<usize> =
                expected["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(info.shape(), shape, "{name}");
            let values = f.dequantize_to_f32(name).unwrap();
            assert_eq!(
                fnv1a64(&values),
                expected["fnv1a64"].as_str().unwrap(),
                "{name} dequantized differently from gguf-py"
            );
            let src = f.dequantize_to_f32(&format!("{name}.src")).unwrap();
            let ours = quant::quantize(info.ggml_type, &src).unwrap();
            assert_eq!(ours.as_slice(), f.tensor_data(name).unwrap(), "{name} quantized differently from gguf-py");
        }
    }

    /// Dequantized tensors of the real model equal gguf-py's `gguf.quants.dequantize`, bit for bit.
    #[test]
    fn real_model_dequantizes_like_gguf_py() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return;
        }
        let f = GgufFile::open(&path).unwrap();
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("gguf_reference.json")).unwrap()).unwrap();
        for (gguf_name, hf_name) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
            ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
            ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
            ("output_norm.weight", "model.norm.weight"),
        ] {
            let expected = &reference[hf_name];
            let values = f.dequantize_to_f32(gguf_name).unwrap();
            assert_eq!(f.tensor_info(gguf_name).unwrap().ggml_type.name(), expected["type"].as_str().unwrap());
            assert_eq!(fnv1a64(&values), expected["fnv1a64"].as_str().unwrap(), "{gguf_name}");
        }
    }

    // ---- malformed input: every case is an Error::Format (or Unsupported) naming the file ----

    fn assert_format_error(result: Result<GgufFile>, path: &Path, needle: &str) {
        match result {
            Err(e @ Error::Format { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&path.display().to_string()), "message does not name the file: {msg}");
                assert!(msg.contains(needle), "message {msg:?} does not mention {needle:?}");
            }
            Err(other) => panic!("expected a format error mentioning {needle:?}, got {other:?}"),
            Ok(_) => panic!("expected a format error mentioning {needle:?}, the file opened"),
        }
    }

    /// Position of the tensor info of `name` (just after its name).
    fn info_pos(bytes: &[u8], name: &str) -> usize {
        let mut needle = (name.len() as u64).to_le_bytes().to_vec();
        needle.extend_from_slice(name.as_bytes());
        bytes.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() + needle.len()
    }

    #[test]
    fn truncated_files_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(write_sample(dir.path())).unwrap();
        let f = GgufFile::from_bytes("x", full.clone()).unwrap();
        let data_end = f.tensors().iter().map(|t| f.data_offset() + t.offset + t.n_bytes).max().unwrap() as usize;
        let path = dir.path().join("cut.gguf");
        // Every cut inside the header, and a spread of cuts inside the tensor data.
        let cuts: Vec<usize> =
            (0..f.data_offset() as usize).chain((f.data_offset() as usize..data_end).step_by(7)).collect();
        for cut in cuts {
            std::fs::write(&path, &full[..cut]).unwrap();
            let needle = if cut == 0 { "empty" } else { "truncated" };
            assert_format_error(GgufFile::open(&path), &path, needle);
        }
        // A cut into the data section is reported as data past the end of the file.
        std::fs::write(&path, &full[..data_end - 1]).unwrap();
        assert_format_error(GgufFile::open(&path), &path, "past the end of the file");
    }

    #[test]
    fn bad_magic_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(write_sample(dir.path())).unwrap();
        let path = dir.path().join("bad.gguf");
        let mut b = full.clone();
        b[..4].copy_from_slice(b"GGML");
        std::fs::write(&path, &b).unwrap();
        assert_format_error(GgufFile::open(&path), &path, "bad magic");
        for (version, needle) in [(1u32, "version 1"), (99, "version 99"), (3u32.swap_bytes(), "big-endian")] {
            let mut b = full.clone();
            b[4..8].copy_from_slice(&version.to_le_bytes());
            std::fs::write(&path, &b).unwrap();
            assert_format_error(GgufFile::open(&path), &path, needle);
        }
        let err = GgufFile::open(dir.path().join("absent.gguf")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("absent.gguf"));
    }

    #[test]
    fn tensor_data_past_end_and_misaligned_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(write_sample(dir.path())).unwrap();
        let path = dir.path().join("bad.gguf");
        // "b.q8" has 2 dims: name, n_dims (4), 2 dims (16), type (4), offset.
        let offset_at = info_pos(&full, "b.q8") + 4 + 16 + 4;
        for (offset, needle) in
            [(1u64 << 40, "past the end"), (u64::MAX - 31, "past the end"), (8, "not a multiple of the alignment")]
        {
            let mut b = full.clone();
            b[offset_at..offset_at + 8].copy_from_slice(&offset.to_le_bytes());
            std::fs::write(&path, &b).unwrap();
            assert_format_error(GgufFile::open(&path), &path, needle);
        }
    }

    #[test]
    fn unknown_tensor_type_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(write_sample(dir.path())).unwrap();
        let path = dir.path().join("bad.gguf");
        let type_at = info_pos(&full, "c.q4_0") + 4 + 16;
        let mut b = full.clone();
        b[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        match GgufFile::open(&path) {
            Err(Error::Unsupported(msg)) => {
                assert!(
                    msg.contains(&path.display().to_string()) && msg.contains("c.q4_0") && msg.contains("99"),
                    "{msg}"
                )
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        // A known type engram cannot decode opens fine and fails on dequantization.
        let mut b = full.clone();
        let info = info_pos(&full, "b.q8");
        // Two Q8_0 rows of 64 (272 bytes) reinterpreted as Q4_0 would not match sizes, so make it
        // F16 of the same byte size instead and check the name; then Q5_K with 256-wide rows.
        b[info + 4 + 16..info + 4 + 16 + 4].copy_from_slice(&GgmlType::Q4_K.id().to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert_format_error(GgufFile::open(&path), &path, "block size");
        let q5k = GgufTensorToWrite {
            name: "k".into(),
            shape: vec![1, 256],
            ggml_type: GgmlType::Q5_K,
            data: Cow::Owned(vec![0; 176]),
        };
        write_gguf(&path, &[], &[q5k]).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensor_data("k").unwrap().len(), 176);
        match f.dequantize_to_f32("k") {
            Err(Error::Unsupported(msg)) => {
                assert!(msg.contains("Q5_K") && msg.contains("'k'") && msg.contains("bad.gguf"), "{msg}")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn absurd_counts_and_lengths() {
        let p = Path::new("absurd.gguf");
        let header = |tensors: u64, kvs: u64| {
            let mut b = GGUF_MAGIC.to_le_bytes().to_vec();
            b.extend_from_slice(&3u32.to_le_bytes());
            b.extend_from_slice(&tensors.to_le_bytes());
            b.extend_from_slice(&kvs.to_le_bytes());
            b
        };
        let open = |b: Vec<u8>| GgufFile::from_bytes(p, b);
        assert_format_error(open(header(u64::MAX, 0)), p, "tensor count");
        assert_format_error(open(header(0, u64::MAX)), p, "metadata count");
        assert_format_error(open(header(0, 1 << 40)), p, "metadata count");

        let with_kv = |key: &str, ty: u32, payload: &[u8]| {
            let mut b = header(0, 1);
            b.extend_from_slice(&(key.len() as u64).to_le_bytes());
            b.extend_from_slice(key.as_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(payload);
            b.extend_from_slice(&[0u8; 64]);
            b
        };
        // A string whose length is larger than the file.
        assert_format_error(open(with_kv("k", 8, &(1u64 << 50).to_le_bytes())), p, "claims length");
        // An array of u64::MAX strings.
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_format_error(open(with_kv("k", 9, &arr)), p, "count");
        // Unknown value type, bad bool, bad array element type.
        assert_format_error(open(with_kv("k", 13, &[])), p, "unknown value type 13");
        assert_format_error(open(with_kv("k", 7, &[2])), p, "bool");
        let mut arr = 77u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&1u64.to_le_bytes());
        assert_format_error(open(with_kv("k", 9, &arr)), p, "unknown value type 77");
        // Arrays nested without end.
        let mut deep = Vec::new();
        for _ in 0..20 {
            deep.extend_from_slice(&9u32.to_le_bytes());
            deep.extend_from_slice(&1u64.to_le_bytes());
        }
        assert_format_error(open(with_kv("k", 9, &deep)), p, "nests arrays");
        // A key that is not UTF-8, and an invalid alignment.
        let mut b = header(0, 1);
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&[0xff, 0xfe]);
        b.extend_from_slice(&[0u8; 40]);
        assert_format_error(open(b), p, "UTF-8");
        assert_format_error(open(with_kv("general.alignment", 4, &3u32.to_le_bytes())), p, "alignment");

        let with_tensor = |n_dims: u32, dims: &[u64], ty: u32| {
            let mut b = header(1, 0);
            b.extend_from_slice(&1u64.to_le_bytes());
            b.push(b't');
            b.extend_from_slice(&n_dims.to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&[0u8; 128]);
            b
        };
        assert_format_error(open(with_tensor(5, &[1; 5], 0)), p, "5 dimensions");
        assert_format_error(open(with_tensor(2, &[u64::MAX, 3], 0)), p, "absurd dimensions");
        assert_format_error(open(with_tensor(2, &[1 << 20, 1 << 20], 0)), p, "past the end");
        assert_format_error(open(with_tensor(1, &[33], GgmlType::Q8_0.id())), p, "block size");
        assert!(open(with_tensor(2, &[4, 2], 0)).is_ok());

        let md = vec![kv("a", GgufValue::U8(1)), kv("a", GgufValue::U8(2))];
        assert!(encode_gguf(&md, &[]).is_err());
    }

    /// Random corruption of header bytes never panics: the file either opens (and every tensor
    /// then decodes or reports an error) or gives an error naming the file.
    #[test]
    fn random_corruption_never_panics() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(write_sample(dir.path())).unwrap();
        let header_len = GgufFile::from_bytes("x", full.clone()).unwrap().data_offset() as usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..3000 {
            let mut b = full.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..header_len);
                b[at] = rng.random();
            }
            match GgufFile::from_bytes("fuzz.gguf", b) {
                Ok(f) => {
                    for t in f.tensors().to_vec() {
                        let _ = f.dequantize_to_f32(&t.name);
                    }
                }
                Err(Error::Format { path, .. }) => assert_eq!(path, Path::new("fuzz.gguf")),
                Err(Error::Unsupported(msg)) => assert!(msg.contains("fuzz.gguf"), "{msg}"),
                Err(other) => panic!("unexpected error kind: {other:?}"),
            }
        }
    }

    #[test]
    fn duplicate_keys_and_tensor_names_in_files() {
        let p = Path::new("dup.gguf");
        let mut b = encode_gguf(&[kv("a", GgufValue::U8(1)), kv("b", GgufValue::U8(2))], &[]).unwrap();
        let at = info_pos(&b, "b") - 1;
        b[at] = b'a';
        assert_format_error(GgufFile::from_bytes(p, b), p, "duplicate metadata key 'a'");
        let t1 = GgufTensorToWrite::from_f32("x1", vec![2], GgmlType::F32, &[1.0, 2.0]).unwrap();
        let t2 = GgufTensorToWrite::from_f32("x2", vec![2], GgmlType::F32, &[1.0, 2.0]).unwrap();
        let mut b = encode_gguf(&[], &[t1, t2]).unwrap();
        let at = info_pos(&b, "x2") - 1;
        b[at] = b'1';
        assert_format_error(GgufFile::from_bytes(p, b), p, "duplicate tensor name 'x1'");
    }
}
