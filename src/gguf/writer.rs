//! In-memory GGUF v3 writer, laid out like llama.cpp's `gguf_write_to_buf` (feature
//! `test-support`: tests and benches build synthetic files with it).
//!
//! Owns: serialising metadata and tensors into GGUF bytes. Does not own: validation.
//! The writer is deliberately permissive (raw type ids, duplicate keys, offset overrides,
//! any version number) so tests can build corrupted files; run the result through
//! [`GgufFile::from_bytes`](super::GgufFile::from_bytes) to validate it.
//!
//! Layout produced: header, metadata in insertion order, tensor infos in insertion order,
//! zero padding to the alignment, then each tensor's bytes padded to the alignment
//! (tensor offsets are the running, aligned sum).

use std::path::Path;

use super::{GgmlDType, GgufError, MetaValue, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// One tensor waiting to be written.
#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    raw_type: u32,
    data: Vec<u8>,
    offset_override: Option<u64>,
}

/// Builds a GGUF file in memory.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty GGUF v3 file with the default alignment (32).
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Overrides the version number written in the header (for tests).
    pub fn set_version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets the alignment by writing (or replacing) `general.alignment` as a u32.
    /// Any value is written; a value that is not a power of two is written too (for
    /// tests) but padding then uses the default alignment.
    pub fn set_alignment(&mut self, alignment: u32) -> &mut Self {
        self.metadata.retain(|(k, _)| k != ALIGNMENT_KEY);
        self.metadata
            .push((ALIGNMENT_KEY.to_string(), MetaValue::U32(alignment)));
        self
    }

    /// The alignment used for padding: `general.alignment` if it is a valid u32 power of
    /// two, else 32.
    pub fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find_map(|(k, v)| match v {
                MetaValue::U32(a) if k == ALIGNMENT_KEY && a.is_power_of_two() => {
                    Some(u64::from(*a))
                }
                _ => None,
            })
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Appends a metadata entry (no de-duplication). Arrays are written with the type of
    /// their first element (string for an empty array); a heterogeneous array therefore
    /// produces an invalid file.
    pub fn add(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Appends a u32 entry.
    pub fn add_u32(&mut self, key: impl Into<String>, v: u32) -> &mut Self {
        self.add(key, MetaValue::U32(v))
    }

    /// Appends an f32 entry.
    pub fn add_f32(&mut self, key: impl Into<String>, v: f32) -> &mut Self {
        self.add(key, MetaValue::F32(v))
    }

    /// Appends a bool entry.
    pub fn add_bool(&mut self, key: impl Into<String>, v: bool) -> &mut Self {
        self.add(key, MetaValue::Bool(v))
    }

    /// Appends a string entry.
    pub fn add_str(&mut self, key: impl Into<String>, v: impl Into<String>) -> &mut Self {
        self.add(key, MetaValue::Str(v.into()))
    }

    /// Appends an array-of-strings entry.
    pub fn add_str_array<S: AsRef<str>>(&mut self, key: impl Into<String>, v: &[S]) -> &mut Self {
        let items = v
            .iter()
            .map(|s| MetaValue::Str(s.as_ref().to_string()))
            .collect();
        self.add(key, MetaValue::Array(items))
    }

    /// Appends an array-of-i32 entry.
    pub fn add_i32_array(&mut self, key: impl Into<String>, v: &[i32]) -> &mut Self {
        self.add(
            key,
            MetaValue::Array(v.iter().map(|&x| MetaValue::I32(x)).collect()),
        )
    }

    /// Appends an array-of-f32 entry.
    pub fn add_f32_array(&mut self, key: impl Into<String>, v: &[f32]) -> &mut Self {
        self.add(
            key,
            MetaValue::Array(v.iter().map(|&x| MetaValue::F32(x)).collect()),
        )
    }

    /// Appends a tensor with already-encoded bytes (`dims` in ggml order). The bytes are
    /// written as given; use [`quantize`](crate::quant::reference::quantize) to encode f32 values.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        dtype: GgmlDType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.add_tensor_raw(name, dims, dtype.raw(), data)
    }

    /// Appends a tensor with an arbitrary ggml type id (for tests of unknown types).
    pub fn add_tensor_raw(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        raw_type: u32,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.into(),
            dims: dims.to_vec(),
            raw_type,
            data,
            offset_override: None,
        });
        self
    }

    /// Encodes `values` as `dtype` and appends the tensor.
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        dtype: GgmlDType,
        values: &[f32],
    ) -> Result<&mut Self, crate::quant::reference::QuantizeError> {
        let data = crate::quant::reference::quantize(dtype, values)?;
        Ok(self.add_tensor(name, dims, dtype, data))
    }

    /// Writes `offset` in the info of tensor `name` instead of its real offset (data is
    /// still placed normally). Returns false if there is no such tensor.
    pub fn override_offset(&mut self, name: &str, offset: u64) -> bool {
        match self.tensors.iter_mut().find(|t| t.name == name) {
            Some(t) => {
                t.offset_override = Some(offset);
                true
            }
            None => false,
        }
    }

    /// Serialises the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.raw_type.to_le_bytes());
            out.extend_from_slice(&t.offset_override.unwrap_or(offset).to_le_bytes());
            offset += pad_len(t.data.len() as u64, align) + t.data.len() as u64;
        }
        pad(&mut out, align);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad(&mut out, align);
        }
        out
    }

    /// Serialises the file and writes it to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

fn pad_len(len: u64, align: u64) -> u64 {
    (align - len % align) % align
}

fn pad(out: &mut Vec<u8>, align: u64) {
    let n = pad_len(out.len() as u64, align);
    out.resize(out.len() + n as usize, 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes the value bytes (without its type id).
fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::Str(s) => write_string(out, s),
        MetaValue::Array(items) => {
            let elem_ty = items.first().map_or(8, MetaValue::type_id);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}
