//! Bounds-checked GGUF reader (v2 and v3) over `memmap2`, plus (feature
//! `test-support`) a small in-memory writer (`writer`) for tests.
//!
//! Owns: parsing and validating the file header, the metadata key/value table and the
//! tensor-info table (no two tensors' data may overlap), and handing out bounds-checked
//! byte slices of tensor data. Does not own: the dtype table and block layouts (see
//! [`crate::quant`]), interpreting tensor bytes (see `quant` and `kernels`), model
//! hyper-parameters (see `model`) or the tokenizer (see `tokenizer`).
//!
//! The agreed public API, which every other module codes against:
//!
//! ```text
//! GgmlDType (from crate::quant) { F32, F16, BF16, Q4_0, Q4_1, Q8_0 }  block_size(), type_size(), from_raw(u32), name()
//! MetaValue { U8, I8, U16, I16, U32, I32, U64, I64, F32, F64, Bool, Str(String), Array(Vec<MetaValue>) }
//! TensorInfo { name: String, dims: Vec<u64> /* ggml order: dims[0] is the contiguous row length */,
//!              dtype: GgmlDType, offset: u64 /* from start of data section */, size_bytes: u64 }
//! GgufFile::open(path) -> Result<GgufFile, GgufError>
//! GgufFile::from_bytes(Vec<u8>) -> Result<GgufFile, GgufError>
//! file.version() -> u32; file.alignment() -> u64
//! file.metadata() -> &[(String, MetaValue)]   (file order); file.get(key) -> Option<&MetaValue>
//! file.get_u32/get_u64/get_f32/get_bool/get_str(key) -> Result<_, GgufError>   (MissingKey / WrongType name the key)
//! file.get_str_array(key) -> Result<Vec<&str>, _>; file.get_i32_array(key) -> Result<Vec<i32>, _>
//! file.tensors() -> &[TensorInfo]; file.tensor_info(name) -> Result<&TensorInfo, _> (MissingTensor)
//! file.tensor_data(name) -> Result<&[u8], _>     (bounds-checked slice of the mmap)
//! file.data_bytes() -> total mapped size
//! ```
//!
//! File layout (all integers little-endian):
//!
//! ```text
//! +--------+---------+--------------+----------+
//! | "GGUF" | version | tensor_count | kv_count |   u32 magic, u32, u64, u64
//! +--------+---------+--------------+----------+
//! | kv_count x (key: string, type: u32, value)  |   string = u64 len + UTF-8 bytes
//! +---------------------------------------------+
//! | tensor_count x (name: string, n_dims: u32,  |
//! |   dims: n_dims x u64, ggml_type: u32,       |
//! |   offset: u64)                              |
//! +---------------------------------------------+
//! | zero padding up to `general.alignment`      |
//! +---------------------------------------------+  <- data section start
//! | tensor data, each at data start + offset    |
//! +---------------------------------------------+
//! ```
//!
//! Every count, length, offset and size read from the file is checked (with checked
//! arithmetic) before it is used; preallocation is capped by the bytes that remain, so
//! a hostile file gives a typed [`GgufError`], never a panic or a huge allocation.
//!
//! K-quant types (Q4_K, Q5_K, Q6_K, ...) are recognised and rejected with
//! [`GgufError::UnsupportedDType`]; any other unknown type id gives
//! [`GgufError::UnknownDType`].

#[cfg(any(test, feature = "test-support"))]
pub mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// The dtype of a [`TensorInfo`] (owned by [`crate::quant`], re-exported here).
pub use crate::quant::GgmlDType;
#[cfg(any(test, feature = "test-support"))]
pub use writer::GgufWriter;

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key holding the alignment (u32).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Largest number of dimensions a tensor may have.
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays we accept (array of array of ...).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Errors from reading (and validating) a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, stat'ed or mapped.
    #[error("cannot read GGUF file `{path}`: {source}")]
    Io {
        /// Path given to [`GgufFile::open`] (or the writer).
        path: String,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The path is a directory, not a GGUF file.
    #[error("cannot read GGUF file `{path}`: it is a directory")]
    IsDirectory {
        /// Path given to [`GgufFile::open`].
        path: String,
    },
    /// The first four bytes are not `GGUF`.
    #[error("bad magic: expected \"GGUF\", found {found:02x?}")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// Only versions 2 and 3 are supported.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// The file ends before `what` could be read.
    #[error("file truncated while reading {what} at byte offset {offset}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset at which the read started.
        offset: u64,
    },
    /// A length or element count is larger than the bytes left in the file.
    #[error("{what}: length {len} exceeds the {remaining} bytes remaining")]
    LengthOutOfBounds {
        /// What the length belongs to.
        what: String,
        /// The length (or count) read from the file.
        len: u64,
        /// Bytes remaining after the length field.
        remaining: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{what}: string is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string (key name, or "key of metadata entry #i", or tensor).
        what: String,
    },
    /// A metadata value type id outside 0..=12.
    #[error("metadata `{key}`: unknown value type {raw}")]
    UnknownMetaType {
        /// Key of the entry.
        key: String,
        /// Raw type id read.
        raw: u32,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("metadata `{key}`: arrays nested deeper than {max}")]
    NestingTooDeep {
        /// Key of the entry.
        key: String,
        /// The limit.
        max: usize,
    },
    /// The same metadata key appears twice.
    #[error("duplicate metadata key `{0}`")]
    DuplicateKey(String),
    /// `general.alignment` is zero or not a power of two.
    #[error("`general.alignment` must be a non-zero power of two, got {0}")]
    BadAlignment(u64),
    /// The same tensor name appears twice.
    #[error("duplicate tensor name `{0}`")]
    DuplicateTensor(String),
    /// A tensor has zero or more than [`MAX_DIMS`] dimensions.
    #[error("tensor `{tensor}`: n_dims must be in 1..={max}, got {n_dims}")]
    BadDims {
        /// Tensor name.
        tensor: String,
        /// n_dims read.
        n_dims: u32,
        /// The limit.
        max: u32,
    },
    /// A ggml type id we do not know.
    #[error("tensor `{tensor}`: unknown ggml type {raw}")]
    UnknownDType {
        /// Tensor name.
        tensor: String,
        /// Raw type id.
        raw: u32,
    },
    /// A known ggml type this runtime does not support (K-quants, ...).
    #[error(
        "tensor `{tensor}`: ggml type {name} ({raw}) is not supported (supported: {})",
        GgmlDType::supported_names()
    )]
    UnsupportedDType {
        /// Tensor name.
        tensor: String,
        /// ggml name of the type.
        name: &'static str,
        /// Raw type id.
        raw: u32,
    },
    /// The element count or byte size of a tensor overflows.
    #[error("tensor `{tensor}`: dims {dims:?} overflow the element count or byte size")]
    TensorTooLarge {
        /// Tensor name.
        tensor: String,
        /// Its dims.
        dims: Vec<u64>,
    },
    /// The row length (dims[0]) is not a multiple of the dtype's block size.
    #[error("tensor `{tensor}`: row length {row_len} is not a multiple of the {dtype} block size {block_size}")]
    ShapeMismatch {
        /// Tensor name.
        tensor: String,
        /// dims[0].
        row_len: u64,
        /// dtype name.
        dtype: &'static str,
        /// Elements per block.
        block_size: u64,
    },
    /// The tensor does not have the dims a caller expected.
    #[error("tensor `{tensor}`: expected dims {expected:?}, found {found:?}")]
    UnexpectedDims {
        /// Tensor name.
        tensor: String,
        /// Dims the caller asked for.
        expected: Vec<u64>,
        /// Dims in the file.
        found: Vec<u64>,
    },
    /// A tensor offset is not a multiple of the alignment.
    #[error("tensor `{tensor}`: offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// Tensor name.
        tensor: String,
        /// Offset from the start of the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// Tensor data lies (partly) outside the file.
    #[error(
        "tensor `{tensor}`: data bytes {start}..{end} lie outside the file of {file_len} bytes"
    )]
    TensorOutOfBounds {
        /// Tensor name.
        tensor: String,
        /// Absolute start offset (saturated on overflow).
        start: u64,
        /// Absolute end offset (saturated on overflow).
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// The data ranges of two tensors overlap (one tensor's bytes would be read as
    /// another's). Offsets are from the start of the data section.
    #[error(
        "tensors `{first}` (data bytes {first_start}..{first_end}) and `{second}` (data bytes {second_start}..{second_end}) overlap"
    )]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// Its start offset.
        first_start: u64,
        /// Its end offset (exclusive).
        first_end: u64,
        /// The tensor that starts inside `first`.
        second: String,
        /// Its start offset.
        second_start: u64,
        /// Its end offset (exclusive).
        second_end: u64,
    },
    /// A required metadata key is absent.
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    /// A metadata value has the wrong type.
    #[error("metadata `{key}`: expected {expected}, found {found}")]
    WrongType {
        /// Key.
        key: String,
        /// What the accessor accepts.
        expected: &'static str,
        /// The type in the file.
        found: &'static str,
    },
    /// A metadata integer does not fit the requested type.
    #[error("metadata `{key}`: value {value} does not fit in {target}")]
    OutOfRange {
        /// Key.
        key: String,
        /// The value, printed.
        value: String,
        /// The requested type.
        target: &'static str,
    },
    /// A required tensor is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
}

/// A metadata value. Arrays read from a file are homogeneous (one element type).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 6.
    F32(f32),
    /// Type 12.
    F64(f64),
    /// Type 7 (one byte, 0 or 1; any non-zero byte reads as true).
    Bool(bool),
    /// Type 8.
    Str(String),
    /// Type 9.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Short type name for error messages (`"u32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// The value as i128 if it is an integer of any width.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a string slice if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements if it is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Description of one tensor, validated against the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: GgmlDType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size_bytes: u64,
}

impl TensorInfo {
    /// Total number of elements (product of dims; saturates instead of overflowing).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Length of one row (`dims[0]`), 0 if there are no dims.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Number of rows (product of `dims[1..]`, 1 for a vector).
    pub fn n_rows(&self) -> u64 {
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes per row (`row_len / block_size * type_size`).
    pub fn row_size_bytes(&self) -> u64 {
        (self.row_len() / self.dtype.block_size() as u64)
            .saturating_mul(self.dtype.type_size() as u64)
    }
}

/// Bytes backing a [`GgufFile`].
enum Storage {
    /// A read-only memory map of the file.
    Mmap(memmap2::Mmap),
    /// An owned buffer (tests, in-memory files).
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file with its bytes (mapped or owned).
pub struct GgufFile {
    storage: Storage,
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("num_kv", &self.metadata.len())
            .field("num_tensors", &self.tensors.len())
            .field("data_start", &self.data_start)
            .field("num_bytes", &self.data_bytes())
            .finish()
    }
}

/// `madvise(MADV_DONTNEED)` on whole pages inside `range` of a read-only map.
#[allow(unsafe_code)]
fn advise_dont_need(m: &memmap2::Mmap, range: std::ops::Range<usize>) {
    const PAGE: usize = 4096;
    let start = range.start.next_multiple_of(PAGE);
    let end = range.end / PAGE * PAGE;
    if start >= end {
        return;
    }
    // SAFETY: the map is a private, read-only mapping of a file that is not
    // modified while mapped (see `map_file`). Dropping its pages cannot change
    // what any live slice reads: the next access faults the same bytes back
    // in from the file. The range lies inside the map (checked by the caller).
    let _ =
        unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and we never hand out `&mut` into it. The file must
    // not be truncated or modified by another process while it is mapped; like every
    // mmap-based model loader (llama.cpp included) we accept that model files are
    // immutable while being served. All reads go through bounds-checked slices.
    unsafe { memmap2::Mmap::map(file) }
}

impl GgufFile {
    /// Opens and memory-maps `path`, then parses and validates it.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_dir() {
            // Opening a directory succeeds on Unix; mapping it fails with ENODEV.
            return Err(GgufError::IsDirectory {
                path: path.display().to_string(),
            });
        }
        let len = meta.len();
        let storage = if len == 0 {
            // Mapping an empty file fails on some platforms; the parser reports Truncated.
            Storage::Owned(Vec::new())
        } else {
            Storage::Mmap(map_file(&file).map_err(io_err)?)
        };
        Self::from_storage(storage)
    }

    /// Parses and validates an in-memory GGUF file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<GgufFile, GgufError> {
        let parsed = parse(storage.bytes())?;
        Ok(GgufFile {
            storage,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            key_index: parsed.key_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
            data_start: parsed.data_start,
        })
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Total size of the file (mapped or owned bytes).
    pub fn data_bytes(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// The whole file's bytes (mapping or owned buffer).
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Tells the kernel the mapped pages of `range` are not needed for now
    /// (after their content was repacked elsewhere): they leave resident
    /// memory and are read again from the file if touched. No-op for owned
    /// buffers or ranges outside the file.
    pub fn release_pages(&self, range: std::ops::Range<usize>) {
        if let Storage::Mmap(m) = &self.storage {
            if range.start < range.end && range.end <= m.len() {
                advise_dont_need(m, range);
            }
        }
    }

    /// All metadata entries in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// Frees metadata arrays longer than `max_len` elements (the tokenizer's
    /// vocabulary and merges, once the tokenizer has been built from them):
    /// they are replaced by empty arrays, so the keys remain listed. Returns
    /// the number of arrays emptied.
    pub fn drop_large_arrays(&mut self, max_len: usize) -> usize {
        let mut n = 0;
        for (_, v) in self.metadata.iter_mut() {
            if let MetaValue::Array(items) = v {
                if items.len() > max_len {
                    *items = Vec::new();
                    n += 1;
                }
            }
        }
        n
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.key_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn int_as<T: TryFrom<i128>>(
        key: &str,
        v: &MetaValue,
        target: &'static str,
    ) -> Result<T, GgufError> {
        let i = v.as_int().ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected: "integer",
            found: v.type_name(),
        })?;
        T::try_from(i).map_err(|_| GgufError::OutOfRange {
            key: key.to_string(),
            value: i.to_string(),
            target,
        })
    }

    /// `key` as u32; accepts any integer type whose value fits.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        Self::int_as(key, self.require(key)?, "u32")
    }

    /// `key` as u64; accepts any integer type whose value fits.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        Self::int_as(key, self.require(key)?, "u64")
    }

    /// `key` as i64; accepts any integer type whose value fits.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        Self::int_as(key, self.require(key)?, "i64")
    }

    /// `key` as f32; accepts f32 and f64 values.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match *self.require(key)? {
            MetaValue::F32(v) => Ok(v),
            MetaValue::F64(v) => Ok(v as f32),
            ref other => Err(GgufError::WrongType {
                key: key.to_string(),
                expected: "f32 or f64",
                found: other.type_name(),
            }),
        }
    }

    /// `key` as bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match *self.require(key)? {
            MetaValue::Bool(v) => Ok(v),
            ref other => Err(GgufError::WrongType {
                key: key.to_string(),
                expected: "bool",
                found: other.type_name(),
            }),
        }
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            MetaValue::Str(s) => Ok(s),
            other => Err(GgufError::WrongType {
                key: key.to_string(),
                expected: "string",
                found: other.type_name(),
            }),
        }
    }

    fn get_array(&self, key: &str, expected: &'static str) -> Result<&[MetaValue], GgufError> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            other => Err(GgufError::WrongType {
                key: key.to_string(),
                expected,
                found: other.type_name(),
            }),
        }
    }

    /// `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self.get_array(key, "array of string")?;
        arr.iter()
            .map(|v| {
                v.as_str().ok_or_else(|| GgufError::WrongType {
                    key: key.to_string(),
                    expected: "array of string",
                    found: v.type_name(),
                })
            })
            .collect()
    }

    /// `key` as an array of i32; accepts any integer element type whose values fit.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let arr = self.get_array(key, "array of i32")?;
        arr.iter().map(|v| Self::int_as(key, v, "i32")).collect()
    }

    /// `key` as an array of f32; accepts f32 and f64 elements.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let arr = self.get_array(key, "array of f32")?;
        arr.iter()
            .map(|v| match *v {
                MetaValue::F32(x) => Ok(x),
                MetaValue::F64(x) => Ok(x as f32),
                ref other => Err(GgufError::WrongType {
                    key: key.to_string(),
                    expected: "array of f32",
                    found: other.type_name(),
                }),
            })
            .collect()
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Info for tensor `name` ([`GgufError::MissingTensor`] if absent).
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// Info for tensor `name`, checking that its dims equal `dims` (ggml order).
    pub fn tensor_with_dims(&self, name: &str, dims: &[u64]) -> Result<&TensorInfo, GgufError> {
        let info = self.tensor_info(name)?;
        if info.dims != dims {
            return Err(GgufError::UnexpectedDims {
                tensor: name.to_string(),
                expected: dims.to_vec(),
                found: info.dims.clone(),
            });
        }
        Ok(info)
    }

    /// Whether tensor `name` exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    /// The raw bytes of tensor `name` (a bounds-checked slice of the mapping).
    pub fn tensor_data(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self.tensor_info(name)?;
        self.info_data(info)
    }

    /// The raw bytes described by `info` (which must come from this file).
    pub fn info_data(&self, info: &TensorInfo) -> Result<&[u8], GgufError> {
        let bytes = self.storage.bytes();
        let range = data_range(self.data_start, info.offset, info.size_bytes);
        range
            .and_then(|(start, end)| {
                let start = usize::try_from(start).ok()?;
                let end = usize::try_from(end).ok()?;
                bytes.get(start..end)
            })
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                tensor: info.name.clone(),
                start: self.data_start.saturating_add(info.offset),
                end: self
                    .data_start
                    .saturating_add(info.offset)
                    .saturating_add(info.size_bytes),
                file_len: bytes.len() as u64,
            })
    }
}

/// Absolute `[start, end)` of a tensor's data, or `None` on overflow.
fn data_range(data_start: u64, offset: u64, size: u64) -> Option<(u64, u64)> {
    let start = data_start.checked_add(offset)?;
    let end = start.checked_add(size)?;
    Some((start, end))
}

/// Result of [`parse`].
struct Parsed {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: u64,
}

/// A forward-only, bounds-checked reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            what: what.to_string(),
            offset: self.pos as u64,
        };
        let n = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let s = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads a GGUF string (u64 length + UTF-8 bytes).
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::LengthOutOfBounds {
                what: format!("string of {what}"),
                len,
                remaining: self.remaining(),
            });
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
        })
    }
}

/// Smallest encoded size of one value of metadata type `ty` (for count checks).
fn min_value_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,     // u64 length
        9 => 4 + 8, // type + count
        10..=12 => 8,
        _ => 1,
    }
}

/// Reads one metadata value of type `ty` for `key`.
fn read_value(
    c: &mut Cursor<'_>,
    ty: u32,
    key: &str,
    depth: usize,
) -> Result<MetaValue, GgufError> {
    Ok(match ty {
        0 => MetaValue::U8(c.u8(key)?),
        1 => MetaValue::I8(c.u8(key)? as i8),
        2 => MetaValue::U16(c.u16(key)?),
        3 => MetaValue::I16(c.u16(key)? as i16),
        4 => MetaValue::U32(c.u32(key)?),
        5 => MetaValue::I32(c.u32(key)? as i32),
        6 => MetaValue::F32(f32::from_bits(c.u32(key)?)),
        7 => MetaValue::Bool(c.u8(key)? != 0),
        8 => MetaValue::Str(c.string(key)?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(GgufError::NestingTooDeep {
                    key: key.to_string(),
                    max: MAX_ARRAY_DEPTH,
                });
            }
            let elem_ty = c.u32(key)?;
            if elem_ty > 12 {
                return Err(GgufError::UnknownMetaType {
                    key: key.to_string(),
                    raw: elem_ty,
                });
            }
            let count = c.u64(key)?;
            let remaining = c.remaining();
            // Every element takes at least min_value_size bytes: reject impossible counts
            // before allocating anything.
            if count.saturating_mul(min_value_size(elem_ty)) > remaining {
                return Err(GgufError::LengthOutOfBounds {
                    what: format!("array `{key}`"),
                    len: count,
                    remaining,
                });
            }
            let cap = usize::try_from(count).unwrap_or(0);
            let mut items = Vec::with_capacity(cap);
            for _ in 0..count {
                items.push(read_value(c, elem_ty, key, depth + 1)?);
            }
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(c.u64(key)?),
        11 => MetaValue::I64(c.u64(key)? as i64),
        12 => MetaValue::F64(f64::from_bits(c.u64(key)?)),
        raw => {
            return Err(GgufError::UnknownMetaType {
                key: key.to_string(),
                raw,
            })
        }
    })
}

/// Rounds `x` up to a multiple of `align` (a power of two), `None` on overflow.
fn align_up(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    x.checked_add(mask).map(|v| v & !mask)
}

/// Parses and validates the whole file.
fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic: [u8; 4] = c.array("header magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32("header version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = c.u64("header tensor_count")?;
    let kv_count = c.u64("header kv_count")?;

    // Metadata. Each entry takes at least 8 (key len) + 4 (type) + 1 bytes, which caps
    // the preallocation; a count larger than the file ends in `Truncated`.
    let kv_cap = usize::try_from(kv_count.min(c.remaining() / 13)).unwrap_or(0);
    let mut metadata = Vec::with_capacity(kv_cap);
    let mut key_index = HashMap::with_capacity(kv_cap);
    for i in 0..kv_count {
        let key = c.string(&format!("key of metadata entry #{i}"))?;
        let ty = c.u32(&key)?;
        let value = read_value(&mut c, ty, &key, 0)?;
        if key_index.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        key_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    let alignment = match key_index.get(ALIGNMENT_KEY).and_then(|&i| metadata.get(i)) {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) => {
            let a = u64::from(*a);
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::BadAlignment(a));
            }
            a
        }
        Some((_, other)) => {
            return Err(GgufError::WrongType {
                key: ALIGNMENT_KEY.to_string(),
                expected: "u32",
                found: other.type_name(),
            })
        }
    };

    // Tensor infos. Each takes at least 8 (name len) + 4 + 8 (one dim) + 4 + 8 bytes.
    let t_cap = usize::try_from(tensor_count.min(c.remaining() / 32)).unwrap_or(0);
    let mut raw_infos = Vec::with_capacity(t_cap);
    let mut tensor_index = HashMap::with_capacity(t_cap);
    for i in 0..tensor_count {
        let name = c.string(&format!("name of tensor info #{i}"))?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadDims {
                tensor: name,
                n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let raw_type = c.u32(&name)?;
        let offset = c.u64(&name)?;
        if tensor_index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensor_index.insert(name.clone(), raw_infos.len());
        raw_infos.push((name, dims, raw_type, offset));
    }

    let data_start = align_up(c.pos as u64, alignment).ok_or_else(|| GgufError::Truncated {
        what: "data section".to_string(),
        offset: c.pos as u64,
    })?;
    let file_len = buf.len() as u64;

    let mut tensors = Vec::with_capacity(raw_infos.len());
    for (name, dims, raw_type, offset) in raw_infos {
        let dtype = match GgmlDType::from_raw(raw_type) {
            Some(d) => d,
            None => {
                return Err(match GgmlDType::unsupported_name(raw_type) {
                    Some(n) => GgufError::UnsupportedDType {
                        tensor: name,
                        name: n,
                        raw: raw_type,
                    },
                    None => GgufError::UnknownDType {
                        tensor: name,
                        raw: raw_type,
                    },
                })
            }
        };
        // Element count and byte size, with overflow checks (and each dim must fit i64,
        // as in ggml).
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| {
                if d > i64::MAX as u64 {
                    None
                } else {
                    acc.checked_mul(d)
                }
            })
            .filter(|&n| n <= i64::MAX as u64);
        let Some(n_elements) = n_elements else {
            return Err(GgufError::TensorTooLarge { tensor: name, dims });
        };
        let row_len = dims.first().copied().unwrap_or(0);
        let block_size = dtype.block_size() as u64;
        if !row_len.is_multiple_of(block_size) {
            return Err(GgufError::ShapeMismatch {
                tensor: name,
                row_len,
                dtype: dtype.name(),
                block_size,
            });
        }
        let Some(size_bytes) = dtype.bytes_for(n_elements) else {
            return Err(GgufError::TensorTooLarge { tensor: name, dims });
        };
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                tensor: name,
                offset,
                alignment,
            });
        }
        match data_range(data_start, offset, size_bytes) {
            Some((_, end)) if end <= file_len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: name,
                    start: data_start.saturating_add(offset),
                    end: data_start.saturating_add(offset).saturating_add(size_bytes),
                    file_len,
                })
            }
        }
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
            size_bytes,
        });
    }

    check_no_overlap(&tensors)?;

    Ok(Parsed {
        version,
        alignment,
        metadata,
        key_index,
        tensors,
        tensor_index,
        data_start,
    })
}

/// Rejects tensors whose data ranges (`offset..offset + size_bytes`, already
/// checked to lie inside the file) share a byte. Empty tensors overlap nothing.
fn check_no_overlap(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let end = |t: &TensorInfo| t.offset.saturating_add(t.size_bytes);
    let mut by_start: Vec<&TensorInfo> = tensors.iter().filter(|t| t.size_bytes > 0).collect();
    by_start.sort_by_key(|t| t.offset);
    // Sorted by start and disjoint so far: only the previous tensor can reach past
    // the next one's start.
    for pair in by_start.windows(2) {
        let [prev, t] = pair else { continue };
        if t.offset < end(prev) {
            return Err(GgufError::OverlappingTensors {
                first: prev.name.clone(),
                first_start: prev.offset,
                first_end: end(prev),
                second: t.name.clone(),
                second_start: t.offset,
                second_end: end(t),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_up_works() {
        assert_eq!(align_up(0, 32), Some(0));
        assert_eq!(align_up(1, 32), Some(32));
        assert_eq!(align_up(64, 32), Some(64));
        assert_eq!(align_up(u64::MAX, 32), None);
    }

    #[test]
    fn empty_input_is_truncated() {
        assert!(matches!(
            GgufFile::from_bytes(Vec::new()),
            Err(GgufError::Truncated { .. })
        ));
    }
}
