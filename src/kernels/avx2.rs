//! AVX2 + FMA + F16C kernels. Private `unsafe` functions, reached only through
//! the safe wrappers in [`super`], which check CPU features and slice sizes.
//!
//! Batch invariance: every kernel computes each activation row with exactly
//! the same sequence of floating-point operations whatever the tile size `R`
//! (the per-row accumulators never mix), so a row's result does not depend on
//! which other rows share its batch.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::f16;

use super::{BlockQ8, Q8_RESIDUAL_SCALE};

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let lo = _mm256_castps256_ps128(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline]
fn f16_ptr(p: *const u8) -> f32 {
    // SAFETY: callers pass a pointer to at least 2 readable bytes inside a block.
    let bits = unsafe { u16::from_le_bytes([*p, *p.add(1)]) };
    f16::from_bits(bits).to_f32()
}

/// Weight format handled by the tiled quantized kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum QKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QKind {
    const fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q8_0 => 34,
        }
    }
}

/// `out[r * out_stride + o] = dot(w row o, x row r)` for `r < R`, `o` in `cols`.
///
/// # Safety
/// CPU supports avx2, fma and f16c; `w` holds at least `cols.end * nb` blocks of
/// `kind`; `x` holds at least `R * nb` blocks; `out` holds at least
/// `(R - 1) * out_stride + cols.end` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_q<const R: usize>(
    kind: QKind,
    w: &[u8],
    nb: usize,
    x: &[BlockQ8],
    out: &mut [f32],
    out_stride: usize,
    cols: std::ops::Range<usize>,
) {
    let bb = kind.block_bytes();
    let ones = _mm256_set1_epi16(1);
    let mask = _mm_set1_epi8(0x0F);
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    for o in cols {
        let wrow = wp.add(o * nb * bb);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut macc = [0.0f32; R];
        for b in 0..nb {
            let bp = wrow.add(b * bb);
            let d = f16_ptr(bp);
            match kind {
                QKind::Q4_0 | QKind::Q4_1 => {
                    let qoff = if kind == QKind::Q4_1 { 4 } else { 2 };
                    let m = if kind == QKind::Q4_1 { f16_ptr(bp.add(2)) } else { -8.0 * d };
                    let q = _mm_loadu_si128(bp.add(qoff) as *const __m128i);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    let wv = _mm256_set_m128i(hi, lo);
                    for r in 0..R {
                        let xb = &*xp.add(r * nb + b);
                        let a1 = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        let a2 = _mm256_loadu_si256(xb.qr.as_ptr() as *const __m256i);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, a1), ones);
                        let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, a2), ones);
                        let p = _mm256_add_epi32(_mm256_slli_epi32(p1, 7), p2);
                        let scale = d * (xb.d / Q8_RESIDUAL_SCALE);
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p), acc[r]);
                        macc[r] += m * xb.s;
                    }
                }
                QKind::Q8_0 => {
                    let wv = _mm256_loadu_si256(bp.add(2) as *const __m256i);
                    let aw = _mm256_sign_epi8(wv, wv);
                    for r in 0..R {
                        let xb = &*xp.add(r * nb + b);
                        let a1 = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        let a2 = _mm256_loadu_si256(xb.qr.as_ptr() as *const __m256i);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a1, wv)), ones);
                        let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a2, wv)), ones);
                        let p = _mm256_add_epi32(_mm256_slli_epi32(p1, 7), p2);
                        let scale = d * (xb.d / Q8_RESIDUAL_SCALE);
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p), acc[r]);
                    }
                }
            }
        }
        for r in 0..R {
            *out.get_unchecked_mut(r * out_stride + o) = hsum(acc[r]) + macc[r];
        }
    }
}

