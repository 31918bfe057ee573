//! Tensor element formats: the one home of ggml's dtype table and of the
//! quantized block layouts.
//!
//! Owns: [`GgmlDType`] (ggml type id, name, elements and bytes per block), the
//! `#[repr(C)]` block structs with their compile-time size checks (one file per
//! family: [`legacy`] holds Q4_0, Q4_1, Q8_0), one scalar reference dequantizer
//! per type ([`QuantBlock::dequantize`], [`dequantize_row`]) and, for tests
//! (`test-support` feature), ggml's reference quantizers ([`reference`]).
//! Does not own: reading files (`gguf` only parses and hands out bytes), fast
//! kernels and the activation format `BlockQ8` (`kernels`), or the AVX-512
//! repacked layout (`kernels::PackedMatrix`).
//!
//! Adding a format is local to this module: a block struct with its size
//! assert and a [`QuantBlock`] impl (reference dequantizer, and quantizer under
//! `test-support`) in its family's file, a [`GgmlDType`] variant with its rows
//! in the tables below, and an arm in [`dequantize_row`] (and
//! [`reference::quantize`]). Kernels then opt in by matching the new variant.
//!
//! Reference layouts: ggml's `ggml-common.h`
//! (<https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-common.h>,
//! `block_q4_0` ...) and the scalar code of `ggml-quants.c`
//! (`dequantize_row_q4_0`, `quantize_row_q4_0_ref`, ...). Block bytes are
//! little-endian; the structs are read from (possibly unaligned) tensor bytes
//! with [`blocks`], a copy per block, so no `unsafe` is needed here.

pub mod legacy;
#[cfg(any(test, feature = "test-support"))]
pub mod reference;

use half::{bf16, f16};

pub use legacy::{BlockQ4_0, BlockQ4_1, BlockQ8_0};

/// Elements per block of Q4_0, Q4_1 and Q8_0 (ggml's `QK4_0`, `QK4_1`, `QK8_0`).
pub const QK: usize = 32;

/// Tensor element types (ggml `enum ggml_type`), restricted to the ones Brigade can
/// compute with. Code elsewhere matches on the variants it supports and treats the
/// rest through [`GgmlDType::block_size`] / [`GgmlDType::type_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlDType {
    /// 32-bit float, ggml id 0.
    F32,
    /// IEEE half, ggml id 1.
    F16,
    /// bfloat16, ggml id 30.
    BF16,
    /// 4-bit symmetric ([`BlockQ4_0`]), ggml id 2.
    Q4_0,
    /// 4-bit with minimum ([`BlockQ4_1`]), ggml id 3.
    Q4_1,
    /// 8-bit symmetric ([`BlockQ8_0`]), ggml id 8.
    Q8_0,
}

impl GgmlDType {
    /// All supported dtypes.
    pub const ALL: [GgmlDType; 6] = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
    ];

    /// Maps a ggml type id to a supported dtype (`None` for unknown/unsupported ids).
    pub fn from_raw(raw: u32) -> Option<GgmlDType> {
        GgmlDType::ALL.into_iter().find(|d| d.raw() == raw)
    }

    /// The ggml type id.
    pub fn raw(self) -> u32 {
        match self {
            GgmlDType::F32 => 0,
            GgmlDType::F16 => 1,
            GgmlDType::Q4_0 => 2,
            GgmlDType::Q4_1 => 3,
            GgmlDType::Q8_0 => 8,
            GgmlDType::BF16 => 30,
        }
    }

    /// Elements per block (1 for float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => 1,
            GgmlDType::Q4_0 => BlockQ4_0::BLOCK_SIZE,
            GgmlDType::Q4_1 => BlockQ4_1::BLOCK_SIZE,
            GgmlDType::Q8_0 => BlockQ8_0::BLOCK_SIZE,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlDType::F32 => size_of::<f32>(),
            GgmlDType::F16 => size_of::<f16>(),
            GgmlDType::BF16 => size_of::<bf16>(),
            GgmlDType::Q4_0 => size_of::<BlockQ4_0>(),
            GgmlDType::Q4_1 => size_of::<BlockQ4_1>(),
            GgmlDType::Q8_0 => size_of::<BlockQ8_0>(),
        }
    }

    /// ggml's name for the type (`"Q4_0"`, `"F16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlDType::F32 => "F32",
            GgmlDType::F16 => "F16",
            GgmlDType::BF16 => "BF16",
            GgmlDType::Q4_0 => "Q4_0",
            GgmlDType::Q4_1 => "Q4_1",
            GgmlDType::Q8_0 => "Q8_0",
        }
    }

    /// Bytes taken by `n_elements` elements, or `None` if `n_elements` is not a
    /// multiple of the block size or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }

    /// The names of all supported dtypes, comma-separated (for error messages).
    pub fn supported_names() -> String {
        GgmlDType::ALL.map(GgmlDType::name).join(", ")
    }

    /// ggml's name of a type id that exists in ggml but that Brigade does not
    /// support (`None` for supported and for unknown ids).
    pub fn unsupported_name(raw: u32) -> Option<&'static str> {
        Some(match raw {
            6 => "Q5_0",
            7 => "Q5_1",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => return None,
        })
    }
}

/// One block of a quantized format, laid out exactly as ggml stores it.
pub trait QuantBlock: bytemuck::Pod {
    /// The dtype whose tensors are made of these blocks.
    const DTYPE: GgmlDType;
    /// Elements per block.
    const BLOCK_SIZE: usize;

    /// Reference dequantizer (ggml's `dequantize_row_*` for one block): writes the
    /// block's values to `out` (`BLOCK_SIZE` elements; a shorter `out` gets a prefix).
    fn dequantize(&self, out: &mut [f32]);

    /// Reference quantizer (ggml's `quantize_row_*_ref` for one block) of the first
    /// `BLOCK_SIZE` values of `x` (missing values read as 0).
    #[cfg(any(test, feature = "test-support"))]
    fn quantize(x: &[f32]) -> Self;
}

/// The blocks of `bytes` in order, each copied out of the (possibly unaligned)
/// bytes; a trailing partial block is ignored.
pub fn blocks<B: QuantBlock>(bytes: &[u8]) -> impl Iterator<Item = B> + '_ {
    bytes.chunks_exact(size_of::<B>()).map(bytemuck::pod_read_unaligned)
}

/// Dequantizes whole blocks of `bytes` into `out`, block by block.
fn dequantize_blocks<B: QuantBlock>(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in blocks::<B>(bytes).zip(out.chunks_exact_mut(B::BLOCK_SIZE)) {
        b.dequantize(o);
    }
}

/// Scalar reference dequantization of `dtype` data (`bytes`, little-endian) into
/// `out`: as many elements as both hold (whole blocks only).
pub fn dequantize_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        GgmlDType::F32 => {
            for (b, o) in bytes.chunks_exact(4).zip(out.iter_mut()) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlDType::F16 => {
            for (b, o) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlDType::BF16 => {
            for (b, o) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlDType::Q4_0 => dequantize_blocks::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => dequantize_blocks::<BlockQ4_1>(bytes, out),
        GgmlDType::Q8_0 => dequantize_blocks::<BlockQ8_0>(bytes, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_table_is_consistent() {
        for d in GgmlDType::ALL {
            assert_eq!(GgmlDType::from_raw(d.raw()), Some(d));
            assert_eq!(GgmlDType::unsupported_name(d.raw()), None, "{d:?}");
        }
        assert_eq!(GgmlDType::from_raw(12), None);
        assert_eq!(GgmlDType::unsupported_name(12), Some("Q4_K"));
        assert_eq!(GgmlDType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlDType::supported_names(), "F32, F16, BF16, Q4_0, Q4_1, Q8_0");
    }
}
