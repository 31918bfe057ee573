//! Tensor element formats: the one home of ggml's dtype table and of the
//! quantized block layouts.
//!
//! Owns: [`GgmlDType`] (ggml type id, name, elements and bytes per block), the
//! `#[repr(C)]` block structs with their compile-time size checks (one file per
//! family: [`legacy`] holds Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; [`k_quants`] Q2_K ...
//! Q6_K; [`iq`] IQ4_NL, IQ4_XS), one scalar reference dequantizer per type
//! ([`QuantBlock::dequantize`], [`dequantize_row`]; bit-identical to gguf-py's
//! `gguf.quants.dequantize`, checked on the fixtures of `tests/quant.rs`) and,
//! for tests (`test-support` feature), ggml's reference quantizers where
//! Brigade has them ([`reference`]: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0).
//! Does not own: reading files (`gguf` only parses and hands out bytes), fast
//! kernels and the activation format `BlockQ8` (`kernels`), or the AVX-512
//! repacked layout (`kernels::PackedMatrix`).
//!
//! Every type listed in [`GgmlDType`] parses, dequantizes and multiplies;
//! how is the kernels' business (`kernels`: SIMD kernels for the common
//! types, a scalar integer-form dot for the rest).
//!
//! Adding a format is local to this module: a block struct with its size
//! assert and a [`QuantBlock`] impl (reference dequantizer; a
//! `reference::QuantizeBlock` impl under `test-support` if it has a
//! quantizer) in its family's file, a [`GgmlDType`] variant with its rows in
//! the tables below, an arm in [`dequantize_row`] (and [`reference::quantize`]),
//! and a fixture from `tests/reference/make_quant_fixtures.py`. The kernels
//! then need its integer form (an arm in `kernels::scalar::for_each_int_block`,
//! which makes it multiply everywhere) and may add SIMD kernels.
//!
//! Reference layouts: ggml's `ggml-common.h`
//! (<https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-common.h>,
//! `block_q4_0` ...) and the scalar code of `ggml-quants.c`
//! (`dequantize_row_q4_0`, `quantize_row_q4_0_ref`, ...). Block bytes are
//! little-endian; the structs are read from (possibly unaligned) tensor bytes
//! with [`blocks`], a copy per block, so no `unsafe` is needed here.

pub mod iq;
pub mod k_quants;
pub mod legacy;
#[cfg(any(test, feature = "test-support"))]
pub mod reference;

use half::{bf16, f16};

pub use iq::{BlockIQ4NL, BlockIQ4XS};
pub use k_quants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
pub use legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0};

/// Elements per block of the 32-element formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
/// and IQ4_NL (ggml's `QK4_0`, `QK4_1`, `QK5_0`, `QK5_1`, `QK8_0`, `QK4_NL`).
pub const QK: usize = 32;

/// Tensor element types (ggml `enum ggml_type`), restricted to the ones Brigade can
/// parse and dequantize. Code elsewhere matches on the variants it supports and
/// treats the rest through [`GgmlDType::block_size`] / [`GgmlDType::type_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's names: Q4_K, IQ4_NL, ...
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
    /// 5-bit symmetric ([`BlockQ5_0`]), ggml id 6.
    Q5_0,
    /// 5-bit with minimum ([`BlockQ5_1`]), ggml id 7.
    Q5_1,
    /// 8-bit symmetric ([`BlockQ8_0`]), ggml id 8.
    Q8_0,
    /// 2-bit K-quant ([`BlockQ2K`]), ggml id 10.
    Q2_K,
    /// 3-bit K-quant ([`BlockQ3K`]), ggml id 11.
    Q3_K,
    /// 4-bit K-quant ([`BlockQ4K`]), ggml id 12.
    Q4_K,
    /// 5-bit K-quant ([`BlockQ5K`]), ggml id 13.
    Q5_K,
    /// 6-bit K-quant ([`BlockQ6K`]), ggml id 14.
    Q6_K,
    /// 4-bit non-linear ([`BlockIQ4NL`]), ggml id 20.
    IQ4_NL,
    /// 4-bit non-linear with 6-bit sub-block scales ([`BlockIQ4XS`]), ggml id 23.
    IQ4_XS,
}

impl GgmlDType {
    /// All supported dtypes.
    pub const ALL: [GgmlDType; 15] = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2_K,
        GgmlDType::Q3_K,
        GgmlDType::Q4_K,
        GgmlDType::Q5_K,
        GgmlDType::Q6_K,
        GgmlDType::IQ4_NL,
        GgmlDType::IQ4_XS,
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
            GgmlDType::Q5_0 => 6,
            GgmlDType::Q5_1 => 7,
            GgmlDType::Q8_0 => 8,
            GgmlDType::Q2_K => 10,
            GgmlDType::Q3_K => 11,
            GgmlDType::Q4_K => 12,
            GgmlDType::Q5_K => 13,
            GgmlDType::Q6_K => 14,
            GgmlDType::IQ4_NL => 20,
            GgmlDType::IQ4_XS => 23,
            GgmlDType::BF16 => 30,
        }
    }

    /// Elements per block (1 for float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => 1,
            GgmlDType::Q4_0 => BlockQ4_0::BLOCK_SIZE,
            GgmlDType::Q4_1 => BlockQ4_1::BLOCK_SIZE,
            GgmlDType::Q5_0 => BlockQ5_0::BLOCK_SIZE,
            GgmlDType::Q5_1 => BlockQ5_1::BLOCK_SIZE,
            GgmlDType::Q8_0 => BlockQ8_0::BLOCK_SIZE,
            GgmlDType::Q2_K => BlockQ2K::BLOCK_SIZE,
            GgmlDType::Q3_K => BlockQ3K::BLOCK_SIZE,
            GgmlDType::Q4_K => BlockQ4K::BLOCK_SIZE,
            GgmlDType::Q5_K => BlockQ5K::BLOCK_SIZE,
            GgmlDType::Q6_K => BlockQ6K::BLOCK_SIZE,
            GgmlDType::IQ4_NL => BlockIQ4NL::BLOCK_SIZE,
            GgmlDType::IQ4_XS => BlockIQ4XS::BLOCK_SIZE,
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
            GgmlDType::Q5_0 => size_of::<BlockQ5_0>(),
            GgmlDType::Q5_1 => size_of::<BlockQ5_1>(),
            GgmlDType::Q8_0 => size_of::<BlockQ8_0>(),
            GgmlDType::Q2_K => size_of::<BlockQ2K>(),
            GgmlDType::Q3_K => size_of::<BlockQ3K>(),
            GgmlDType::Q4_K => size_of::<BlockQ4K>(),
            GgmlDType::Q5_K => size_of::<BlockQ5K>(),
            GgmlDType::Q6_K => size_of::<BlockQ6K>(),
            GgmlDType::IQ4_NL => size_of::<BlockIQ4NL>(),
            GgmlDType::IQ4_XS => size_of::<BlockIQ4XS>(),
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
            GgmlDType::Q5_0 => "Q5_0",
            GgmlDType::Q5_1 => "Q5_1",
            GgmlDType::Q8_0 => "Q8_0",
            GgmlDType::Q2_K => "Q2_K",
            GgmlDType::Q3_K => "Q3_K",
            GgmlDType::Q4_K => "Q4_K",
            GgmlDType::Q5_K => "Q5_K",
            GgmlDType::Q6_K => "Q6_K",
            GgmlDType::IQ4_NL => "IQ4_NL",
            GgmlDType::IQ4_XS => "IQ4_XS",
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
            9 => "Q8_1",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            21 => "IQ3_S",
            22 => "IQ2_S",
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
}

/// The blocks of `bytes` in order, each copied out of the (possibly unaligned)
/// bytes; a trailing partial block is ignored.
pub fn blocks<B: QuantBlock>(bytes: &[u8]) -> impl Iterator<Item = B> + '_ {
    bytes
        .chunks_exact(size_of::<B>())
        .map(bytemuck::pod_read_unaligned)
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
        GgmlDType::Q5_0 => dequantize_blocks::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => dequantize_blocks::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => dequantize_blocks::<BlockQ8_0>(bytes, out),
        GgmlDType::Q2_K => dequantize_blocks::<BlockQ2K>(bytes, out),
        GgmlDType::Q3_K => dequantize_blocks::<BlockQ3K>(bytes, out),
        GgmlDType::Q4_K => dequantize_blocks::<BlockQ4K>(bytes, out),
        GgmlDType::Q5_K => dequantize_blocks::<BlockQ5K>(bytes, out),
        GgmlDType::Q6_K => dequantize_blocks::<BlockQ6K>(bytes, out),
        GgmlDType::IQ4_NL => dequantize_blocks::<BlockIQ4NL>(bytes, out),
        GgmlDType::IQ4_XS => dequantize_blocks::<BlockIQ4XS>(bytes, out),
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
        assert_eq!(GgmlDType::from_raw(12), Some(GgmlDType::Q4_K));
        assert_eq!(GgmlDType::from_raw(16), None);
        assert_eq!(GgmlDType::unsupported_name(16), Some("IQ2_XXS"));
        assert_eq!(GgmlDType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlDType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlDType::Q6_K.bytes_for(255), None);
        assert_eq!(
            GgmlDType::supported_names(),
            "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS"
        );
        // (block size, type size) as in gguf-py's GGML_QUANT_SIZES.
        let sizes: Vec<(usize, usize)> = GgmlDType::ALL
            .map(|d| (d.block_size(), d.type_size()))
            .to_vec();
        assert_eq!(
            sizes,
            [
                (1, 4),
                (1, 2),
                (1, 2),
                (32, 18),
                (32, 20),
                (32, 22),
                (32, 24),
                (32, 34),
                (256, 84),
                (256, 110),
                (256, 144),
                (256, 176),
                (256, 210),
                (32, 18),
                (256, 136)
            ]
        );
    }
}
