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

use super::{BlockQ8, Q8_RESIDUAL_SCALE, QK};
use crate::quant::k_quants::scale_min_k4;
use crate::quant::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, GgmlDType,
    QK_K,
};

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

/// The little-endian f16 at `p` as f32 (one `vcvtph2ps`; exact).
///
/// # Safety
/// CPU supports f16c; `p` points at 2 readable bytes.
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_ptr(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le(bits) as i32)))
}

/// Weight format handled by the tiled quantized kernels: [`tile_q`] for the
/// first three, [`tile_qx`] for the rest.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum QKind {
    Q4_0,
    Q4_1,
    Q8_0,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl QKind {
    /// The kernel format of a dtype, if these kernels handle it.
    pub(super) fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => QKind::Q4_0,
            GgmlDType::Q4_1 => QKind::Q4_1,
            GgmlDType::Q8_0 => QKind::Q8_0,
            GgmlDType::Q5_0 => QKind::Q5_0,
            GgmlDType::Q5_1 => QKind::Q5_1,
            GgmlDType::Q4_K => QKind::Q4K,
            GgmlDType::Q5_K => QKind::Q5K,
            GgmlDType::Q6_K => QKind::Q6K,
            _ => return None,
        })
    }

    /// The kind whose discriminant is `k` (the const parameter of
    /// [`tile_qx_k`]; an unknown value is Q5_0's, never produced).
    const fn from_u8(k: u8) -> Self {
        match k {
            k if k == QKind::Q4_0 as u8 => QKind::Q4_0,
            k if k == QKind::Q4_1 as u8 => QKind::Q4_1,
            k if k == QKind::Q8_0 as u8 => QKind::Q8_0,
            k if k == QKind::Q5_1 as u8 => QKind::Q5_1,
            k if k == QKind::Q4K as u8 => QKind::Q4K,
            k if k == QKind::Q5K as u8 => QKind::Q5K,
            k if k == QKind::Q6K as u8 => QKind::Q6K,
            _ => QKind::Q5_0,
        }
    }

    /// Runs on [`tile_q`] (else [`tile_qx`]).
    pub(super) const fn legacy(self) -> bool {
        matches!(self, QKind::Q4_0 | QKind::Q4_1 | QKind::Q8_0)
    }

    /// Bytes per weight block (for `tile_q`'s kinds).
    const fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => size_of::<BlockQ4_0>(),
            QKind::Q4_1 => size_of::<BlockQ4_1>(),
            QKind::Q8_0 => size_of::<BlockQ8_0>(),
            QKind::Q5_0 => size_of::<BlockQ5_0>(),
            QKind::Q5_1 => size_of::<BlockQ5_1>(),
            QKind::Q4K => size_of::<BlockQ4K>(),
            QKind::Q5K => size_of::<BlockQ5K>(),
            QKind::Q6K => size_of::<BlockQ6K>(),
        }
    }

    /// Elements per block.
    const fn block_elems(self) -> usize {
        match self {
            QKind::Q4K | QKind::Q5K | QKind::Q6K => QK_K,
            _ => QK,
        }
    }
}

// The kernels read `d` at the start of every block but Q6_K's.
const _: () = assert!(
    offset_of!(BlockQ4_0, d) == 0
        && offset_of!(BlockQ4_1, d) == 0
        && offset_of!(BlockQ8_0, d) == 0
        && offset_of!(BlockQ5_0, d) == 0
        && offset_of!(BlockQ5_1, d) == 0
        && offset_of!(BlockQ4K, d) == 0
        && offset_of!(BlockQ5K, d) == 0
);

/// `out[r * out_stride + o] = dot(w row o, x row r)` for `r < R`, `o` in `cols`.
///
/// # Safety
/// CPU supports avx2, fma and f16c; `w` holds at least `cols.end * nb` blocks of
/// `kind`, one of Q4_0, Q4_1, Q8_0 ([`QKind::legacy`]); `x` holds at least `R * nb` blocks; `out` holds at least
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
    debug_assert!(kind.legacy(), "tile_q: Q4_0/Q4_1/Q8_0 only");
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
                    let qoff = if kind == QKind::Q4_1 {
                        offset_of!(BlockQ4_1, qs)
                    } else {
                        offset_of!(BlockQ4_0, qs)
                    };
                    let m = if kind == QKind::Q4_1 {
                        f16_ptr(bp.add(offset_of!(BlockQ4_1, m)))
                    } else {
                        -8.0 * d
                    };
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
                        acc[r] =
                            _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p), acc[r]);
                        macc[r] += m * xb.s;
                    }
                }
                // Q8_0 (only the legacy kinds come here: see the safety contract)
                _ => {
                    let wv =
                        _mm256_loadu_si256(bp.add(offset_of!(BlockQ8_0, qs)) as *const __m256i);
                    let aw = _mm256_sign_epi8(wv, wv);
                    for r in 0..R {
                        let xb = &*xp.add(r * nb + b);
                        let a1 = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        let a2 = _mm256_loadu_si256(xb.qr.as_ptr() as *const __m256i);
                        let p1 = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a1, wv)),
                            ones,
                        );
                        let p2 = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a2, wv)),
                            ones,
                        );
                        let p = _mm256_add_epi32(_mm256_slli_epi32(p1, 7), p2);
                        let scale = d * (xb.d / Q8_RESIDUAL_SCALE);
                        acc[r] =
                            _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p), acc[r]);
                    }
                }
            }
        }
        for r in 0..R {
            *out.get_unchecked_mut(r * out_stride + o) = hsum(acc[r]) + macc[r];
        }
    }
}

/// 32 bytes, one per bit of `bits` (element `k` = bit `k`): `0xFF` where set.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    // Byte k takes byte k / 8 of `bits`, then keeps its own bit k % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel)
}

/// The 32 ggml nibbles of a 16-byte block as bytes (element `k < 16`: low
/// nibble of byte `k`; else the high nibble of byte `k - 16`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nib32(q: __m128i) -> __m256i {
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(q, 4), q),
        _mm256_set1_epi8(0x0F),
    )
}

/// Block `b` of a weight row of `tile_qx`'s kinds, as 32 weight bytes
/// (element `k` in byte `k`; signed for Q5_0/Q6_K, whose offsets are folded
/// in, unsigned otherwise), the scales of elements `0..16` and `16..32`, and
/// the offset `m` (`w = d * q + m`; 0 for the signed kinds).
///
/// # Safety
/// CPU supports avx2; `wrow` points at a whole row of `kind` with more than `b` 32-element blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_qx(kind: QKind, wrow: *const u8, b: usize) -> (__m256i, [f32; 2], f32) {
    let low4 = _mm256_set1_epi8(0x0F);
    let bp = wrow.add(b / (kind.block_elems() / QK) * kind.block_bytes());
    let j = b % (kind.block_elems() / QK);
    match kind {
        QKind::Q5_0 | QKind::Q5_1 => {
            let (qh_at, qs_at) = if kind == QKind::Q5_0 {
                (offset_of!(BlockQ5_0, qh), offset_of!(BlockQ5_0, qs))
            } else {
                (offset_of!(BlockQ5_1, qh), offset_of!(BlockQ5_1, qs))
            };
            let qh = (bp.add(qh_at) as *const u32).read_unaligned();
            let hi = _mm256_and_si256(bits_to_bytes(u32::from_le(qh)), _mm256_set1_epi8(0x10));
            let q = _mm256_or_si256(nib32(_mm_loadu_si128(bp.add(qs_at) as *const __m128i)), hi);
            let d = f16_ptr(bp);
            if kind == QKind::Q5_0 {
                (_mm256_sub_epi8(q, _mm256_set1_epi8(16)), [d; 2], 0.0)
            } else {
                (q, [d; 2], f16_ptr(bp.add(offset_of!(BlockQ5_1, m))))
            }
        }
        QKind::Q4K | QKind::Q5K => {
            let (qs_at, sc_at) = if kind == QKind::Q4K {
                (offset_of!(BlockQ4K, qs), offset_of!(BlockQ4K, scales))
            } else {
                (offset_of!(BlockQ5K, qs), offset_of!(BlockQ5K, scales))
            };
            let scales: [u8; 12] = (bp.add(sc_at) as *const [u8; 12]).read_unaligned();
            let (sc, mn) = scale_min_k4(j, &scales);
            // Q4_K and Q5_K share the header fields' offsets.
            const _: () = assert!(offset_of!(BlockQ4K, dmin) == offset_of!(BlockQ5K, dmin));
            let (d, dmin) = (f16_ptr(bp), f16_ptr(bp.add(offset_of!(BlockQ4K, dmin))));
            // sub-block j: nibble j % 2 of qs[32 (j / 2) ..][..32]
            let v = _mm256_loadu_si256(bp.add(qs_at + 32 * (j / 2)) as *const __m256i);
            let mut q = _mm256_and_si256(
                _mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (j as i32 % 2))),
                low4,
            );
            if kind == QKind::Q5K {
                // fifth bit: bit j of qh[l]
                let qh = _mm256_loadu_si256(bp.add(offset_of!(BlockQ5K, qh)) as *const __m256i);
                let bit = _mm256_set1_epi8(1 << j);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            }
            (q, [d * sc as f32; 2], -(dmin * mn as f32))
        }
        QKind::Q6K => {
            // element 32 j + l: nibble (j % 4) / 2 of ql[64 (j / 4) + 32 (j % 2) + l],
            // bits 2 (j % 4) of qh[32 (j / 4) + l]
            let (h, k) = (j / 4, j % 4);
            let lo = _mm256_loadu_si256(
                bp.add(offset_of!(BlockQ6K, ql) + 64 * h + 32 * (k % 2)) as *const __m256i
            );
            let lo = _mm256_and_si256(
                _mm256_srl_epi16(lo, _mm_cvtsi32_si128(4 * (k as i32 / 2))),
                low4,
            );
            let hi =
                _mm256_loadu_si256(bp.add(offset_of!(BlockQ6K, qh) + 32 * h) as *const __m256i);
            let hi = _mm256_and_si256(
                _mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * k as i32)),
                _mm256_set1_epi8(3),
            );
            let q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
            let d = f16_ptr(bp.add(offset_of!(BlockQ6K, d)));
            let sc = bp.add(offset_of!(BlockQ6K, scales) + 2 * j) as *const i8;
            (
                _mm256_sub_epi8(q, _mm256_set1_epi8(32)),
                [d * *sc as f32, d * *sc.add(1) as f32],
                0.0,
            )
        }
        // `tile_q`'s kinds never reach here.
        QKind::Q4_0 | QKind::Q4_1 | QKind::Q8_0 => (_mm256_setzero_si256(), [0.0; 2], 0.0),
    }
}

/// `out[r * out_stride + o] = dot(w row o, x row r)` for `r < R`, `o` in
/// `cols`, for Q5_0, Q5_1, Q4_K, Q5_K and Q6_K rows of `nb` 32-element
/// blocks (raw ggml bytes): [`tile_qx_k`] specialised for `kind`.
///
/// # Safety
/// As [`tile_qx_k`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_qx<const R: usize>(
    kind: QKind,
    w: &[u8],
    nb: usize,
    x: &[BlockQ8],
    out: &mut [f32],
    out_stride: usize,
    cols: std::ops::Range<usize>,
) {
    const Q5_0: u8 = QKind::Q5_0 as u8;
    const Q5_1: u8 = QKind::Q5_1 as u8;
    const Q4K: u8 = QKind::Q4K as u8;
    const Q5K: u8 = QKind::Q5K as u8;
    const Q6K: u8 = QKind::Q6K as u8;
    match kind {
        QKind::Q5_0 => tile_qx_k::<R, Q5_0>(w, nb, x, out, out_stride, cols),
        QKind::Q5_1 => tile_qx_k::<R, Q5_1>(w, nb, x, out, out_stride, cols),
        QKind::Q4K => tile_qx_k::<R, Q4K>(w, nb, x, out, out_stride, cols),
        QKind::Q5K => tile_qx_k::<R, Q5K>(w, nb, x, out, out_stride, cols),
        QKind::Q6K => tile_qx_k::<R, Q6K>(w, nb, x, out, out_stride, cols),
        // `tile_q`'s kinds (never passed: see the safety contract).
        QKind::Q4_0 | QKind::Q4_1 | QKind::Q8_0 => {}
    }
}

/// [`tile_qx`] for the kind with discriminant `K` (so the per-block decode
/// is specialised): each block decoded once to 32 weight bytes
/// ([`decode_qx`]) for all `R` rows, then `vpmaddubsw` products with both
/// activation digits (signed weights through the sign trick; `|w| <= 32`, so
/// no pair saturates), per-half scales in one vector.
///
/// # Safety
/// CPU supports avx2, fma and f16c; `w` holds at least `cols.end` rows of
/// `nb` blocks of kind `K` (a legacy kind is not allowed); `x` holds at least
/// `R * nb` blocks; `out` holds at least `(R - 1) * out_stride + cols.end` floats.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_qx_k<const R: usize, const K: u8>(
    w: &[u8],
    nb: usize,
    x: &[BlockQ8],
    out: &mut [f32],
    out_stride: usize,
    cols: std::ops::Range<usize>,
) {
    let kind = const { QKind::from_u8(K) };
    let row_bytes = nb * QK / kind.block_elems() * kind.block_bytes();
    let signed = matches!(kind, QKind::Q5_0 | QKind::Q6K);
    let ones = _mm256_set1_epi16(1);
    let xp = x.as_ptr();
    for o in cols {
        let wrow = w.as_ptr().add(o * row_bytes);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut macc = [0.0f32; R];
        for b in 0..nb {
            let (wv, d, m) = decode_qx(kind, wrow, b);
            // (8,) lanes 0..4 are elements 0..16, lanes 4..8 elements 16..32
            let dv = _mm256_set_m128(_mm_set1_ps(d[1]), _mm_set1_ps(d[0]));
            let aw = if signed { _mm256_sign_epi8(wv, wv) } else { wv };
            for r in 0..R {
                let xb = &*xp.add(r * nb + b);
                let mut a1 = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let mut a2 = _mm256_loadu_si256(xb.qr.as_ptr() as *const __m256i);
                if signed {
                    a1 = _mm256_sign_epi8(a1, wv);
                    a2 = _mm256_sign_epi8(a2, wv);
                }
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, a1), ones);
                let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, a2), ones);
                let p = _mm256_add_epi32(_mm256_slli_epi32(p1, 7), p2);
                let scale = _mm256_mul_ps(dv, _mm256_set1_ps(xb.d / Q8_RESIDUAL_SCALE));
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r]);
                macc[r] += m * xb.s;
            }
        }
        for r in 0..R {
            *out.get_unchecked_mut(r * out_stride + o) = hsum(acc[r]) + macc[r];
        }
    }
}

/// Float weight storage handled by [`tile_f`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum FKind {
    F32,
    F16,
    BF16,
}

/// 8 weights of a float row starting at element `k`, as f32.
///
/// # Safety
/// CPU supports avx2 and f16c; `wrow` holds at least `k + 8` elements of `kind`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f8(kind: FKind, wrow: *const u8, k: usize) -> __m256 {
    match kind {
        FKind::F32 => _mm256_loadu_ps(wrow.add(4 * k) as *const f32),
        FKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(wrow.add(2 * k) as *const __m128i)),
        FKind::BF16 => {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(wrow.add(2 * k) as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
        }
    }
}

/// `out[r * out_stride + o] = dot(w row o, x row r)` for `r < R`, `o` in
/// `cols`, float weights (F32/F16/BF16 rows of `k` elements) and f32
/// activations: two 8-lane FMA accumulators per row over 16 elements at a
/// time, each weight converted once for all `R` rows; the `k % 16` tail in
/// scalar after the horizontal sum (the same operations for any `R`).
///
/// # Safety
/// CPU supports avx2, fma and f16c; `w` holds at least `cols.end` rows of `k`
/// elements of `kind`; `x` holds at least `R * k` floats; `out` holds at
/// least `(R - 1) * out_stride + cols.end` floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_f<const R: usize>(
    kind: FKind,
    w: &[u8],
    k: usize,
    x: &[f32],
    out: &mut [f32],
    out_stride: usize,
    cols: std::ops::Range<usize>,
) {
    let esize = if kind == FKind::F32 { 4 } else { 2 };
    let xp = x.as_ptr();
    let k16 = k / 16 * 16;
    for o in cols {
        let wrow = w.as_ptr().add(o * k * esize);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut i = 0;
        while i < k16 {
            let w0 = load_f8(kind, wrow, i);
            let w1 = load_f8(kind, wrow, i + 8);
            for (r, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(r * k + i)), a[0]);
                a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(r * k + i + 8)), a[1]);
            }
            i += 16;
        }
        for (r, a) in acc.iter().enumerate() {
            let mut sum = hsum(_mm256_add_ps(a[0], a[1]));
            for t in k16..k {
                let wt = match kind {
                    FKind::F32 => (wrow.add(4 * t) as *const f32).read_unaligned(),
                    FKind::F16 => f16_ptr(wrow.add(2 * t)),
                    FKind::BF16 => {
                        half::bf16::from_bits((wrow.add(2 * t) as *const u16).read_unaligned())
                            .to_f32()
                    }
                };
                sum = wt.mul_add(*xp.add(r * k + t), sum);
            }
            *out.get_unchecked_mut(r * out_stride + o) = sum;
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
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // n in [-126, 0]: 2^n is a normal float with biased exponent n + 127.
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
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
    let t = _mm256_blendv_ps(
        big,
        small,
        _mm256_cmp_ps(ax, _mm256_set1_ps(0.5), _CMP_LT_OQ),
    );
    _mm256_or_ps(t, _mm256_and_ps(sign, x))
}

/// One segment's softmax state (running max and sum per head into `m_out`
/// / `l_out`, unnormalised output into `out`; see
/// [`super::attention::segments`]) of the paged attention of `G` query
/// heads sharing KV head `kvh` (head size
/// `8 * HV`) over the keys at positions `start..n_ctx`, scores soft-capped
/// when `softcap` is given: the AVX2 counterpart of `avx512::attend_f16`, with 8 keys per
/// online-softmax step (so results agree with the scalar reference, which
/// steps by 16, to f32 rounding).
///
/// # Safety
/// CPU supports avx2, fma and f16c; `q` and `out` hold `G * 8 * HV` floats,
/// `m_out` and `l_out` `G`;
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
    m_out: *mut f32,
    l_out: *mut f32,
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
    for (bi, &blk) in table
        .iter()
        .enumerate()
        .take(n_ctx.div_ceil(bs))
        .skip(first)
    {
        let blk = blk as usize;
        let cnt = bs.min(n_ctx - bi * bs);
        let kt = k.add(blk * bs * kv_dim + kvh * hd * bs);
        let vb = v.add(blk * bs * kv_dim + kvh * hd);
        // The window's first block starts inside it.
        let mut c = if bi == first { start - bi * bs } else { 0 };
        while c < cnt {
            let n = 8.min(cnt - c);
            let valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane));
            // (G, 8) scores: lane j = key c + j; two partial sums over d
            // (even d into `s0`, odd into `s1`: two named arrays, d stepped
            // by 2, so they stay in registers). Same operations, same order.
            let key_row = |d: usize| {
                let row = kt.add(d * bs + c);
                if n == 8 {
                    _mm256_cvtph_ps(_mm_loadu_si128(row as *const __m128i))
                } else {
                    let mut tmp = [0u16; 8];
                    std::ptr::copy_nonoverlapping(row as *const u16, tmp.as_mut_ptr(), n);
                    _mm256_cvtph_ps(_mm_loadu_si128(tmp.as_ptr() as *const __m128i))
                }
            };
            let mut s0 = [_mm256_setzero_ps(); G];
            let mut s1 = [_mm256_setzero_ps(); G];
            for d in (0..hd).step_by(2) {
                let (k0, k1) = (key_row(d), key_row(d + 1));
                for g in 0..G {
                    s0[g] = _mm256_fmadd_ps(_mm256_set1_ps(*q.add(g * hd + d)), k0, s0[g]);
                    s1[g] = _mm256_fmadd_ps(_mm256_set1_ps(*q.add(g * hd + d + 1)), k1, s1[g]);
                }
            }
            let mut corr = [0.0f32; G];
            for g in 0..G {
                let mut sv = _mm256_mul_ps(_mm256_add_ps(s0[g], s1[g]), scv);
                if let Some(cap) = softcap {
                    sv = _mm256_mul_ps(
                        _mm256_set1_ps(cap),
                        tanh8(_mm256_mul_ps(sv, _mm256_set1_ps(1.0 / cap))),
                    );
                }
                let sv = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), sv, valid);
                let m_new = m[g].max(hmax(sv));
                corr[g] = _mm_cvtss_f32(_mm256_castps256_ps128(exp8_neg(_mm256_set1_ps(
                    m[g] - m_new,
                ))));
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
                    *a = _mm256_mul_ps(
                        _mm256_loadu_ps(out.add(g * hd + 8 * h)),
                        _mm256_set1_ps(corr[g]),
                    );
                }
                for j in 0..n {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(
                        vb.add((c + j) * kv_dim + 8 * h) as *const __m128i
                    ));
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
        *m_out.add(g) = m[g];
        *l_out.add(g) = l[g];
    }
}
