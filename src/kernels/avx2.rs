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

use std::mem::offset_of;

use super::{BlockQ8, Q8_RESIDUAL_SCALE};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0};

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
    /// Bytes per weight block.
    const fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => size_of::<BlockQ4_0>(),
            QKind::Q4_1 => size_of::<BlockQ4_1>(),
            QKind::Q8_0 => size_of::<BlockQ8_0>(),
        }
    }
}

// The kernel reads `d` at the start of every block.
const _: () = assert!(offset_of!(BlockQ4_0, d) == 0 && offset_of!(BlockQ4_1, d) == 0 && offset_of!(BlockQ8_0, d) == 0);

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
                    let qoff = if kind == QKind::Q4_1 { offset_of!(BlockQ4_1, qs) } else { offset_of!(BlockQ4_0, qs) };
                    let m = if kind == QKind::Q4_1 { f16_ptr(bp.add(offset_of!(BlockQ4_1, m))) } else { -8.0 * d };
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
                    let wv = _mm256_loadu_si256(bp.add(offset_of!(BlockQ8_0, qs)) as *const __m256i);
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


#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `exp(x)` for 8 lanes with `x <= 0` (inputs below -87 clamp there): the
/// same reduction and polynomial as the AVX-512 `exp16`, with the power of
/// two built in the exponent bits.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8_neg(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_setzero_ps());
    let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // n in [-126, 0]: 2^n is a normal float with biased exponent n + 127.
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    _mm256_mul_ps(p, pow2)
}

/// `tanh(x)` for 8 lanes: the same split as the AVX-512 `tanh16` (odd
/// Taylor polynomial below |x| = 0.5, `(1 - e) / (1 + e)` with
/// `e = exp(-2|x|)` above, sign restored).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh8(x: __m256) -> __m256 {
    let sign = _mm256_set1_ps(-0.0);
    let ax = _mm256_andnot_ps(sign, x);
    let e = exp8_neg(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0)));
    let one = _mm256_set1_ps(1.0);
    let big = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    let x2 = _mm256_mul_ps(ax, ax);
    let mut p = _mm256_set1_ps(super::scalar::TANH_TAYLOR[7]);
    for &c in super::scalar::TANH_TAYLOR[..7].iter().rev() {
        p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(c));
    }
    let small = _mm256_mul_ps(p, ax);
    let t = _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.5), _CMP_LT_OQ));
    _mm256_or_ps(t, _mm256_and_ps(sign, x))
}

/// Paged attention of `G` query heads sharing KV head `kvh` (head size
/// `8 * HV`) over the keys at positions `start..n_ctx`, scores soft-capped
/// when `softcap` is given: the AVX2 counterpart of `avx512::attend_f16`, with 8 keys per
/// online-softmax step (so results agree with the scalar reference, which
/// steps by 16, to f32 rounding).
///
/// # Safety
/// CPU supports avx2, fma and f16c; `q` and `out` hold `G * 8 * HV` floats;
/// `table` holds `n_ctx.div_ceil(bs)` block ids, those from `start / bs` on
/// each `< nblk` where `k` and `v` hold `nblk * bs * kv_dim` elements;
/// `(kvh + 1) * 8 * HV <= kv_dim`; `start < n_ctx`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_f16<const G: usize, const HV: usize>(
    q: *const f32,
    kvh: usize,
    k: *const f16,
    v: *const f16,
    bs: usize,
    kv_dim: usize,
    table: &[u32],
    start: usize,
    n_ctx: usize,
    scale: f32,
    softcap: Option<f32>,
    out: *mut f32,
) {
    let hd = 8 * HV;
    for i in 0..G * hd {
        *out.add(i) = 0.0;
    }
    let mut m = [f32::NEG_INFINITY; G];
    let mut l = [0.0f32; G];
    let mut p = [[0.0f32; 8]; G];
    let scv = _mm256_set1_ps(scale);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let first = start / bs;
    for (bi, &blk) in table.iter().enumerate().take(n_ctx.div_ceil(bs)).skip(first) {
        let blk = blk as usize;
        let cnt = bs.min(n_ctx - bi * bs);
        let kt = k.add(blk * bs * kv_dim + kvh * hd * bs);
        let vb = v.add(blk * bs * kv_dim + kvh * hd);
        // The window's first block starts inside it.
        let mut c = if bi == first { start - bi * bs } else { 0 };
        while c < cnt {
            let n = 8.min(cnt - c);
            let valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane));
            // (G, 8) scores: lane j = key c + j; two partial sums over d.
            let mut s = [[_mm256_setzero_ps(); 2]; G];
            for d in 0..hd {
                let row = kt.add(d * bs + c);
                let kd = if n == 8 {
                    _mm256_cvtph_ps(_mm_loadu_si128(row as *const __m128i))
                } else {
                    let mut tmp = [0u16; 8];
                    std::ptr::copy_nonoverlapping(row as *const u16, tmp.as_mut_ptr(), n);
                    _mm256_cvtph_ps(_mm_loadu_si128(tmp.as_ptr() as *const __m128i))
                };
                for (g, sg) in s.iter_mut().enumerate() {
                    sg[d % 2] = _mm256_fmadd_ps(_mm256_set1_ps(*q.add(g * hd + d)), kd, sg[d % 2]);
                }
            }
            let mut corr = [0.0f32; G];
            for g in 0..G {
                let mut sv = _mm256_mul_ps(_mm256_add_ps(s[g][0], s[g][1]), scv);
                if let Some(cap) = softcap {
                    sv = _mm256_mul_ps(_mm256_set1_ps(cap), tanh8(_mm256_mul_ps(sv, _mm256_set1_ps(1.0 / cap))));
                }
                let sv = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), sv, valid);
                let m_new = m[g].max(hmax(sv));
                corr[g] = _mm_cvtss_f32(_mm256_castps256_ps128(exp8_neg(_mm256_set1_ps(m[g] - m_new))));
                let pv = _mm256_and_ps(exp8_neg(_mm256_sub_ps(sv, _mm256_set1_ps(m_new))), valid);
                l[g] = l[g] * corr[g] + hsum(pv);
                m[g] = m_new;
                _mm256_storeu_ps(p[g].as_mut_ptr(), pv);
            }
            // (G, hd) = corr * (G, hd) + sum_j p[g][j] * V row of key c + j,
            // 8 output lanes at a time (accumulators of all G heads in registers).
            for h in 0..HV {
                let mut acc = [_mm256_setzero_ps(); G];
                for (g, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_mul_ps(_mm256_loadu_ps(out.add(g * hd + 8 * h)), _mm256_set1_ps(corr[g]));
                }
                for j in 0..n {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(vb.add((c + j) * kv_dim + 8 * h) as *const __m128i));
                    for (g, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(p[g][j]), x, *a);
                    }
                }
                for (g, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add(g * hd + 8 * h), *a);
                }
            }
            c += 8;
        }
    }
    for g in 0..G {
        let inv = _mm256_set1_ps(1.0 / l[g]);
        for h in 0..HV {
            let o = out.add(g * hd + 8 * h);
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), inv));
        }
    }
}
