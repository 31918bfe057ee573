//! Scalar reference kernels: the test oracle for every SIMD kernel, and the
//! fallback on CPUs without AVX2.
//!
//! Quantized formats follow ggml (see `ggml-common.h`):
//!
//! ```text
//! Q4_0: [d: f16][qs: 16 x u8]          x[j] = (lo(qs[j]) - 8) * d, x[j+16] = (hi(qs[j]) - 8) * d
//! Q4_1: [d: f16][m: f16][qs: 16 x u8]  x[j] = lo(qs[j]) * d + m,   x[j+16] = hi(qs[j]) * d + m
//! Q8_0: [d: f16][qs: 32 x i8]          x[j] = qs[j] * d
//! ```
//!
//! Activations are quantized per 32-element block to [`BlockQ8`] (f32 scale and
//! the scaled sum, which the Q4_0/Q4_1 dot products need for their offsets).

use half::{bf16, f16};

use super::{BlockQ8, QK, Q8_RESIDUAL_SCALE};
use crate::gguf::GgmlDType;

/// Reads a little-endian f16 at `b[0..2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Quantizes one row of activations to Q8 blocks (`x.len()` is a multiple of 32).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (blk, chunk) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for ((q, qr), &v) in blk.qs.iter_mut().zip(blk.qr.iter_mut()).zip(chunk) {
            let q1 = ((v * id).round_ties_even() as i32).clamp(-127, 127);
            let rem = v - q1 as f32 * d;
            let q2 = ((rem * id * Q8_RESIDUAL_SCALE).round_ties_even() as i32).clamp(-127, 127);
            *q = q1 as i8;
            *qr = q2 as i8;
            sum += q1 * Q8_RESIDUAL_SCALE as i32 + q2;
        }
        blk.d = d;
        blk.s = d / Q8_RESIDUAL_SCALE * sum as f32;
    }
}

/// Integer dot product of 32 unsigned nibble weights (packed in 16 bytes, ggml
/// order) with both digits of a Q8 block, in units of `d / 128`.
#[inline(always)]
fn dot_nibbles(qs: &[u8], b: &BlockQ8) -> i32 {
    let (mut s1, mut s2) = (0i32, 0i32);
    for j in 0..16 {
        let (lo, hi) = ((qs[j] & 0x0F) as i32, (qs[j] >> 4) as i32);
        s1 += lo * b.qs[j] as i32 + hi * b.qs[j + 16] as i32;
        s2 += lo * b.qr[j] as i32 + hi * b.qr[j + 16] as i32;
    }
    s1 * Q8_RESIDUAL_SCALE as i32 + s2
}

/// Dot product of one quantized weight row (raw block bytes) with one Q8 row.
pub fn vec_dot_q(dtype: GgmlDType, w: &[u8], x: &[BlockQ8]) -> f32 {
    let bs = dtype.type_size();
    let mut acc = 0.0f32;
    match dtype {
        GgmlDType::Q4_0 => {
            for (b, xb) in w.chunks_exact(bs).zip(x) {
                let d = f16_at(b);
                let isum = dot_nibbles(&b[2..18], xb);
                acc += d * (xb.d / Q8_RESIDUAL_SCALE) * isum as f32 - 8.0 * d * xb.s;
            }
        }
        GgmlDType::Q4_1 => {
            for (b, xb) in w.chunks_exact(bs).zip(x) {
                let d = f16_at(b);
                let m = f16_at(&b[2..]);
                let isum = dot_nibbles(&b[4..20], xb);
                acc += d * (xb.d / Q8_RESIDUAL_SCALE) * isum as f32 + m * xb.s;
            }
        }
        GgmlDType::Q8_0 => {
            for (b, xb) in w.chunks_exact(bs).zip(x) {
                let d = f16_at(b);
                let (mut s1, mut s2) = (0i32, 0i32);
                for j in 0..QK {
                    let w = (b[2 + j] as i8) as i32;
                    s1 += w * xb.qs[j] as i32;
                    s2 += w * xb.qr[j] as i32;
                }
                let isum = s1 * Q8_RESIDUAL_SCALE as i32 + s2;
                acc += d * (xb.d / Q8_RESIDUAL_SCALE) * isum as f32;
            }
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
    acc
}

/// Dot product of one float weight row (F32/F16/BF16 raw bytes) with f32 activations.
pub fn vec_dot_f(dtype: GgmlDType, w: &[u8], x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    match dtype {
        GgmlDType::F32 => {
            for (b, &v) in w.chunks_exact(4).zip(x) {
                acc += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v;
            }
        }
        GgmlDType::F16 => {
            for (b, &v) in w.chunks_exact(2).zip(x) {
                acc += f16_at(b) * v;
            }
        }
        GgmlDType::BF16 => {
            for (b, &v) in w.chunks_exact(2).zip(x) {
                acc += bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() * v;
            }
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
    acc
}

/// Dequantizes one row of any supported dtype to f32.
pub fn dequantize_row(dtype: GgmlDType, w: &[u8], out: &mut [f32]) {
    match dtype {
        GgmlDType::F32 => {
            for (b, o) in w.chunks_exact(4).zip(out.iter_mut()) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlDType::F16 => {
            for (b, o) in w.chunks_exact(2).zip(out.iter_mut()) {
                *o = f16_at(b);
            }
        }
        GgmlDType::BF16 => {
            for (b, o) in w.chunks_exact(2).zip(out.iter_mut()) {
                *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlDType::Q4_0 => {
            for (b, o) in w.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlDType::Q4_1 => {
            for (b, o) in w.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b);
                let m = f16_at(&b[2..]);
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlDType::Q8_0 => {
            for (b, o) in w.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b);
                for j in 0..QK {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

/// `sum_i a[i] * b[i]` with `b` in f16.
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum()
}

/// `out[i] += w * v[i]` with `v` in f16.
pub fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o += w * x.to_f32();
    }
}

/// `out[j] = sum_i q[i] * k[j * stride + i]` for `j < out.len()`, `k` in f16.
pub fn dot_f16_rows(q: &[f32], k: &[f16], stride: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_f16(q, &k[j * stride..j * stride + q.len()]);
    }
}

/// `out[i] += sum_j w[j] * v[j * stride + i]`, for `j = 0, 1, ...` in order.
pub fn axpy_f16_rows(out: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
    let n = out.len();
    for (j, &wj) in w.iter().enumerate() {
        axpy_f16(out, wj, &v[j * stride..j * stride + n]);
    }
}
