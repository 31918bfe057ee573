//! Reference f32 <-> GGUF tensor-data encoders, bit-exact with ggml's
//! `quantize_row_*_ref` / `dequantize_row_*` (ggml-quants.c) and its fp16/bf16
//! conversions (round-to-nearest-even).
//!
//! Owns: turning f32 slices into GGUF tensor bytes and back, for writing test models and
//! as an oracle. Does not own: fast kernels (see `kernels`), K-quants.
//!
//! Block layouts (little-endian, `d`/`m` are IEEE f16):
//!
//! ```text
//! Q4_0 (18 B / 32 elems): [d: f16][qs: 16 x u8]
//!       x[j] = (lo(qs[j]) - 8) * d,  x[j+16] = (hi(qs[j]) - 8) * d
//! Q4_1 (20 B / 32 elems): [d: f16][m: f16][qs: 16 x u8]
//!       x[j] = lo(qs[j]) * d + m,    x[j+16] = hi(qs[j]) * d + m
//! Q8_0 (34 B / 32 elems): [d: f16][qs: 32 x i8]
//!       x[j] = qs[j] * d
//! ```

use half::f16;

use super::GgmlDType;

/// Elements per block of Q4_0, Q4_1 and Q8_0.
pub const QK: usize = 32;
/// Bytes per Q4_0 block.
pub const Q4_0_BLOCK_BYTES: usize = 2 + QK / 2;
/// Bytes per Q4_1 block.
pub const Q4_1_BLOCK_BYTES: usize = 2 + 2 + QK / 2;
/// Bytes per Q8_0 block.
pub const Q8_0_BLOCK_BYTES: usize = 2 + QK;

// Layouts agree with ggml-common.h (static_assert(sizeof(block_q4_0) == ...)) and with GgmlDType.
const _: () = assert!(Q4_0_BLOCK_BYTES == 18);
const _: () = assert!(Q4_1_BLOCK_BYTES == 20);
const _: () = assert!(Q8_0_BLOCK_BYTES == 34);

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

fn read_f16(b: &[u8], at: usize) -> f32 {
    match b.get(at..at + 2) {
        Some(s) => f16_bits_to_f32(u16::from_le_bytes([s[0], s[1]])),
        None => 0.0,
    }
}

/// Encodes one block of 32 values as Q4_0 (ggml `quantize_row_q4_0_ref`).
pub fn quantize_block_q4_0(x: &[f32; QK]) -> [u8; Q4_0_BLOCK_BYTES] {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; Q4_0_BLOCK_BYTES];
    out[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    for j in 0..QK / 2 {
        let x0 = x[j] * id;
        let x1 = x[QK / 2 + j] * id;
        // C: MIN(15, (int8_t)(x + 8.5f)); the cast truncates toward zero.
        let xi0 = ((x0 + 8.5) as i8).min(15) as u8;
        let xi1 = ((x1 + 8.5) as i8).min(15) as u8;
        out[2 + j] = (xi0 & 0x0F) | (xi1 << 4);
    }
    out
}

/// Decodes one Q4_0 block (ggml `dequantize_row_q4_0`).
pub fn dequantize_block_q4_0(b: &[u8; Q4_0_BLOCK_BYTES]) -> [f32; QK] {
    let d = read_f16(b, 0);
    let mut out = [0.0f32; QK];
    for j in 0..QK / 2 {
        let q = b[2 + j];
        out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        out[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
    }
    out
}

/// Encodes one block of 32 values as Q4_1 (ggml `quantize_row_q4_1_ref`).
pub fn quantize_block_q4_1(x: &[f32; QK]) -> [u8; Q4_1_BLOCK_BYTES] {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; Q4_1_BLOCK_BYTES];
    out[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    out[2..4].copy_from_slice(&f32_to_f16_bits(min).to_le_bytes());
    for j in 0..QK / 2 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[QK / 2 + j] - min) * id;
        let xi0 = ((x0 + 0.5) as i8).min(15) as u8;
        let xi1 = ((x1 + 0.5) as i8).min(15) as u8;
        out[4 + j] = (xi0 & 0x0F) | (xi1 << 4);
    }
    out
}

/// Decodes one Q4_1 block (ggml `dequantize_row_q4_1`).
pub fn dequantize_block_q4_1(b: &[u8; Q4_1_BLOCK_BYTES]) -> [f32; QK] {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    let mut out = [0.0f32; QK];
    for j in 0..QK / 2 {
        let q = b[4 + j];
        out[j] = (q & 0x0F) as f32 * d + m;
        out[j + QK / 2] = (q >> 4) as f32 * d + m;
    }
    out
}

/// Encodes one block of 32 values as Q8_0 (ggml `quantize_row_q8_0_ref`).
pub fn quantize_block_q8_0(x: &[f32; QK]) -> [u8; Q8_0_BLOCK_BYTES] {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; Q8_0_BLOCK_BYTES];
    out[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    for j in 0..QK {
        // C: roundf (half away from zero), stored into int8_t.
        out[2 + j] = ((x[j] * id).round() as i8) as u8;
    }
    out
}

/// Decodes one Q8_0 block (ggml `dequantize_row_q8_0`).
pub fn dequantize_block_q8_0(b: &[u8; Q8_0_BLOCK_BYTES]) -> [f32; QK] {
    let d = read_f16(b, 0);
    let mut out = [0.0f32; QK];
    for j in 0..QK {
        out[j] = (b[2 + j] as i8) as f32 * d;
    }
    out
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
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 => {
            for chunk in x.chunks_exact(QK) {
                let mut blk = [0.0f32; QK];
                blk.copy_from_slice(chunk);
                match dtype {
                    GgmlDType::Q4_0 => out.extend_from_slice(&quantize_block_q4_0(&blk)),
                    GgmlDType::Q4_1 => out.extend_from_slice(&quantize_block_q4_1(&blk)),
                    _ => out.extend_from_slice(&quantize_block_q8_0(&blk)),
                }
            }
        }
    }
    Ok(out)
}

/// Decodes `bytes` of `dtype` into `out` (`out.len()` elements; `bytes` must be exactly
/// the encoded size of that many elements).
pub fn dequantize_into(
    dtype: GgmlDType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), QuantizeError> {
    let expected = encoded_len(dtype, out.len())?;
    if bytes.len() != expected {
        return Err(QuantizeError::ByteLenMismatch {
            dtype: dtype.name(),
            n_elements: out.len(),
            expected,
            got: bytes.len(),
        });
    }
    match dtype {
        GgmlDType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlDType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlDType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlDType::Q4_0 => {
            for (o, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(Q4_0_BLOCK_BYTES))
            {
                let mut blk = [0u8; Q4_0_BLOCK_BYTES];
                blk.copy_from_slice(b);
                o.copy_from_slice(&dequantize_block_q4_0(&blk));
            }
        }
        GgmlDType::Q4_1 => {
            for (o, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(Q4_1_BLOCK_BYTES))
            {
                let mut blk = [0u8; Q4_1_BLOCK_BYTES];
                blk.copy_from_slice(b);
                o.copy_from_slice(&dequantize_block_q4_1(&blk));
            }
        }
        GgmlDType::Q8_0 => {
            for (o, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(Q8_0_BLOCK_BYTES))
            {
                let mut blk = [0u8; Q8_0_BLOCK_BYTES];
                blk.copy_from_slice(b);
                o.copy_from_slice(&dequantize_block_q8_0(&blk));
            }
        }
    }
    Ok(())
}

/// Decodes `bytes` of `dtype` holding `n_elements` values.
pub fn dequantize(
    dtype: GgmlDType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, QuantizeError> {
    // Validate before allocating so a wrong n_elements cannot cause a huge allocation.
    let expected = encoded_len(dtype, n_elements)?;
    if bytes.len() != expected {
        return Err(QuantizeError::ByteLenMismatch {
            dtype: dtype.name(),
            n_elements,
            expected,
            got: bytes.len(),
        });
    }
    let mut out = vec![0.0f32; n_elements];
    dequantize_into(dtype, bytes, &mut out)?;
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
    fn encoded_len_checks_blocks() {
        assert_eq!(encoded_len(GgmlDType::Q8_0, 64), Ok(68));
        assert!(encoded_len(GgmlDType::Q4_0, 33).is_err());
        assert_eq!(encoded_len(GgmlDType::F16, 3), Ok(6));
    }
}
