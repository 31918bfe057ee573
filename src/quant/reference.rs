//! Whole-tensor f32 <-> GGUF tensor-data encoding for tests (feature
//! `test-support`): ggml's reference quantizers per block
//! ([`QuantizeBlock::quantize`]; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 so far) and
//! its fp16/bf16 conversions (round-to-nearest-even), bit-exact with
//! `ggml-quants.c` / `ggml-impl.h`. The other types decode here (through the
//! library's dequantizers) but have no quantizer yet: [`quantize`] refuses them
//! with [`QuantizeError::NoQuantizer`].
//!
//! Owns: building tensor bytes for synthetic models and checking decoders
//! against an oracle. Does not own: the block layouts or the dequantizers
//! (see [`super`]), which the shipped library uses.

use half::f16;

use super::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, GgmlDType, QuantBlock};

/// The dtypes [`quantize`] encodes (the others give [`QuantizeError::NoQuantizer`]).
pub const QUANTIZABLE: [GgmlDType; 8] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
];

/// A block format with ggml's reference quantizer.
pub trait QuantizeBlock: QuantBlock {
    /// Reference quantizer (ggml's `quantize_row_*_ref` for one block) of the first
    /// `BLOCK_SIZE` values of `x` (missing values read as 0).
    fn quantize(x: &[f32]) -> Self;
}

/// Errors from the reference encoders/decoders.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantizeError {
    /// The element count is not a multiple of the dtype's block size.
    #[error(
        "{dtype}: element count {n_elements} is not a multiple of the block size {block_size}"
    )]
    NotBlockMultiple {
        /// dtype name.
        dtype: &'static str,
        /// Elements given.
        n_elements: usize,
        /// Elements per block.
        block_size: usize,
    },
    /// The dtype decodes but has no reference quantizer here.
    #[error("{dtype}: no reference quantizer (quantizers: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)")]
    NoQuantizer {
        /// dtype name.
        dtype: &'static str,
    },
    /// The byte buffer does not have the size the element count requires.
    #[error("{dtype}: {n_elements} elements need {expected} bytes, got {got}")]
    ByteLenMismatch {
        /// dtype name.
        dtype: &'static str,
        /// Elements requested.
        n_elements: usize,
        /// Bytes required.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}

/// f32 -> bf16 bits exactly like ggml's `ggml_compute_fp32_to_bf16` (RNE, quiet NaN).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        // NaN: keep the sign and payload top, force quiet.
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 -> f16 bits (round-to-nearest-even, like `GGML_FP32_TO_FP16`).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// f16 bits -> f32 (exact).
pub fn f16_bits_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

fn check_elems(dtype: GgmlDType, n: usize) -> Result<(), QuantizeError> {
    if !n.is_multiple_of(dtype.block_size()) {
        return Err(QuantizeError::NotBlockMultiple {
            dtype: dtype.name(),
            n_elements: n,
            block_size: dtype.block_size(),
        });
    }
    Ok(())
}

/// Number of bytes `n_elements` values of `dtype` take.
pub fn encoded_len(dtype: GgmlDType, n_elements: usize) -> Result<usize, QuantizeError> {
    check_elems(dtype, n_elements)?;
    Ok(n_elements / dtype.block_size() * dtype.type_size())
}

/// Appends the reference encoding of `x` (whole blocks) as `B` blocks.
fn quantize_blocks<B: QuantizeBlock>(x: &[f32], out: &mut Vec<u8>) {
    for chunk in x.chunks_exact(B::BLOCK_SIZE) {
        out.extend_from_slice(bytemuck::bytes_of(&B::quantize(chunk)));
    }
}

/// Encodes `x` as `dtype` tensor bytes (`x.len()` must be a multiple of the block size).
pub fn quantize(dtype: GgmlDType, x: &[f32]) -> Result<Vec<u8>, QuantizeError> {
    let mut out = Vec::with_capacity(encoded_len(dtype, x.len())?);
    match dtype {
        GgmlDType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlDType::F16 => x
            .iter()
            .for_each(|&v| out.extend_from_slice(&f32_to_f16_bits(v).to_le_bytes())),
        GgmlDType::BF16 => x
            .iter()
            .for_each(|&v| out.extend_from_slice(&f32_to_bf16_bits(v).to_le_bytes())),
        GgmlDType::Q4_0 => quantize_blocks::<BlockQ4_0>(x, &mut out),
        GgmlDType::Q4_1 => quantize_blocks::<BlockQ4_1>(x, &mut out),
        GgmlDType::Q8_0 => quantize_blocks::<BlockQ8_0>(x, &mut out),
        GgmlDType::Q5_0 => quantize_blocks::<BlockQ5_0>(x, &mut out),
        GgmlDType::Q5_1 => quantize_blocks::<BlockQ5_1>(x, &mut out),
        GgmlDType::Q2_K
        | GgmlDType::Q3_K
        | GgmlDType::Q4_K
        | GgmlDType::Q5_K
        | GgmlDType::Q6_K
        | GgmlDType::IQ4_NL
        | GgmlDType::IQ4_XS => {
            return Err(QuantizeError::NoQuantizer {
                dtype: dtype.name(),
            })
        }
    }
    Ok(out)
}

/// Checks that `bytes` is exactly the encoding of `n_elements` values of `dtype`.
fn check_bytes(dtype: GgmlDType, bytes: &[u8], n_elements: usize) -> Result<(), QuantizeError> {
    let expected = encoded_len(dtype, n_elements)?;
    if bytes.len() != expected {
        return Err(QuantizeError::ByteLenMismatch {
            dtype: dtype.name(),
            n_elements,
            expected,
            got: bytes.len(),
        });
    }
    Ok(())
}

/// Decodes `bytes` of `dtype` into `out` (`out.len()` elements; `bytes` must be exactly
/// the encoded size of that many elements).
pub fn dequantize_into(
    dtype: GgmlDType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), QuantizeError> {
    check_bytes(dtype, bytes, out.len())?;
    super::dequantize_row(dtype, bytes, out);
    Ok(())
}

/// Decodes `bytes` of `dtype` holding `n_elements` values.
pub fn dequantize(
    dtype: GgmlDType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, QuantizeError> {
    // Validate before allocating so a wrong n_elements cannot cause a huge allocation.
    check_bytes(dtype, bytes, n_elements)?;
    let mut out = vec![0.0f32; n_elements];
    super::dequantize_row(dtype, bytes, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_ggml() {
        // 1.0 + 2^-8 is exactly halfway between two bf16 values: ties to even (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1.0 + 3*2^-8 ties up to the even neighbour 0x3f82.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits_to_f32(0x3f80), 1.0);
        let nan = f32_to_bf16_bits(f32::NAN);
        assert!(bf16_bits_to_f32(nan).is_nan());
    }

    #[test]
    fn only_types_with_a_quantizer_encode() {
        for dtype in GgmlDType::ALL {
            let got = quantize(dtype, &vec![0.5; 256]);
            if QUANTIZABLE.contains(&dtype) {
                assert!(got.is_ok(), "{dtype:?}");
            } else {
                assert_eq!(
                    got,
                    Err(QuantizeError::NoQuantizer {
                        dtype: dtype.name()
                    })
                );
            }
        }
    }

    #[test]
    fn encoded_len_checks_blocks() {
        assert_eq!(encoded_len(GgmlDType::Q8_0, 64), Ok(68));
        assert!(encoded_len(GgmlDType::Q4_0, 33).is_err());
        assert_eq!(encoded_len(GgmlDType::F16, 3), Ok(6));
    }

    #[test]
    fn quantize_then_dequantize_round_trips_within_a_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
        for dtype in QUANTIZABLE {
            let y = dequantize(dtype, &quantize(dtype, &x).unwrap(), x.len()).unwrap();
            let step = match dtype {
                GgmlDType::Q4_0 | GgmlDType::Q4_1 => 4.0 / 7.0,
                GgmlDType::Q5_0 | GgmlDType::Q5_1 => 4.0 / 15.0,
                GgmlDType::Q8_0 => 4.0 / 127.0,
                _ => 0.01,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= step, "{dtype:?}: {a} vs {b}");
            }
        }
    }
}
