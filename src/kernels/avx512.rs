//! AVX-512 (F/BW/VL) + VNNI kernels. Private `unsafe` functions, reached only
//! through the safe wrappers in [`super`], which check CPU features (cached
//! detection) and slice sizes.
//!
//! The quantized matmul works on [`super::PackedMatrix`]'s interleaved layout:
//! one 512-bit register holds 4 consecutive weights of 16 output columns, so a
//! `vpdpbusd` against one broadcast activation dword advances 16 dot products
//! at once (outer-product form, no horizontal sums). Each weight block is
//! loaded once per tile of up to [`MAX_TILE_ROWS`] activation rows.
//!
//! Batch invariance: every instruction is lane-wise (a lane is one output
//! column) and each row's accumulators never mix with other rows, so a row's
//! result is the same sequence of operations whatever the tile size, the
//! row's position in the batch or the column split over threads. The scalar
//! reference [`super::packed::ref_dot`] performs the same operations and
//! gives bit-identical results.
#![allow(unsafe_code)]

#[path = "attention_avx512.rs"]
pub(super) mod attention;

use std::arch::x86_64::*;

use half::f16;

use super::packed::{PackKind, GROUP};
use super::{BlockQ8, QK};
use crate::quant::QK_K;

/// Most activation rows one kernel call applies a weight block to.
pub(super) const MAX_TILE_ROWS: usize = 8;

/// `out[r * out_stride + c] = dot(column c of the group, x row r)` for
/// `r < R`, lanes `c` set in `lanes`.
///
/// `group` points at one packed column group (`nb` blocks, see
/// [`super::packed`]); `x` at block 0 of the first of `R` activation rows
/// spaced `x_stride` blocks apart; `xh` likewise at their half-block sums
/// ([`super::scalar::half_sums`]), read only by the two-half kinds (Q6_K, Q3_K, Q2_K).
///
/// `one_digit`: the activations' second digits (`qr`) are all zero (see
/// [`super::zero_second_digit`]), so their products are skipped; the result
/// is bit for bit what the full kernel gives on those activations.
///
/// # Safety
/// CPU supports avx512f/bw/vl/vnni and f16c; `group` spans a full packed
/// group of `kind` with `nb` blocks; `x` holds `(R - 1) * x_stride + nb`
/// blocks (and `xh` as many pairs when `kind.halves() == 2`); `out` holds
/// `(R - 1) * out_stride + 16` floats for every lane set in `lanes` (masked
/// lanes are not touched).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn gemm_group<const R: usize>(
    kind: PackKind,
    group: *const u8,
    nb: usize,
    x: *const BlockQ8,
    xh: *const [f32; 2],
    x_stride: usize,
    out: *mut f32,
    out_stride: usize,
    lanes: u16,
    one_digit: bool,
) {
    macro_rules! each_kind {
        ($($k:ident),*) => {
            match kind {
                $(PackKind::$k => {
                    const K: u8 = PackKind::$k as u8;
                    gemm_group_k::<R, K>(group, nb, x, xh, x_stride, out, out_stride, lanes, one_digit)
                })*
            }
        };
    }
    each_kind!(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K, IQ4NL, IQ4XS, Q3K, Q2K)
}

/// [`gemm_group`] for the kind whose discriminant is `K`: every property of
/// the kind is a constant, so the per-block decode is specialised and the
/// loops over the 8 weight vectors unroll (with a run-time kind they did
/// not, and the weight vectors lived on the stack).
///
/// # Safety
/// As [`gemm_group`], `group` being of kind `K`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn gemm_group_k<const R: usize, const K: u8>(
    group: *const u8,
    nb: usize,
    x: *const BlockQ8,
    xh: *const [f32; 2],
    x_stride: usize,
    out: *mut f32,
    out_stride: usize,
    lanes: u16,
    one_digit: bool,
) {
    let kind = const { PackKind::from_u8(K) };
    let sup_bytes = const { PackKind::from_u8(K).super_bytes() };
    let n_super = if sup_bytes > 0 { nb / (QK_K / QK) } else { 0 };
    let recs = group.add(n_super * sup_bytes);
    let (rec_bytes, scale_bytes, planes, halves) = const {
        let k = PackKind::from_u8(K);
        (
            k.record_bytes(),
            k.scale_bytes(),
            k.high_planes(),
            k.halves(),
        )
    };
    let neg_z = _mm512_set1_ps(-(kind.zero().unwrap_or(0) as f32));
    let sign = _mm512_set1_epi32(i32::MIN);
    let nib = _mm512_set1_epi8(0x0F);
    let crumb = _mm512_set1_epi8(3);
    // IQ4 table values plus 128, in every 128-bit lane (vpshufb looks up within lanes).
    let tbl = _mm512_broadcast_i32x4(_mm_loadu_si128(IQ4_TABLE_U8.as_ptr() as *const __m128i));
    let inv_r = 1.0 / super::Q8_RESIDUAL_SCALE;
    let (mut sd, mut sdm) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut accf = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let rec = recs.add(b * rec_bytes);
        if sup_bytes > 0 && b % (QK_K / QK) == 0 {
            // (16,) super-block scales of the next 8 blocks
            let sp = group.add(b / (QK_K / QK) * sup_bytes);
            sd = _mm512_cvtph_ps(_mm256_loadu_si256(sp as *const __m256i));
            if sup_bytes == 64 {
                sdm = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(32) as *const __m256i));
            }
        }
        // (16,) weight scales and offsets of this block (per half for Q6_K)
        let (dw, mw) = match kind {
            PackKind::Q4_0 | PackKind::Q5_0 | PackKind::Q8_0 | PackKind::IQ4NL => {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
                ([d; 2], [_mm512_mul_ps(d, neg_z); 2])
            }
            PackKind::Q4_1 | PackKind::Q5_1 => {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
                (
                    [d; 2],
                    [_mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i)); 2],
                )
            }
            PackKind::Q4K | PackKind::Q5K => {
                let d = _mm512_mul_ps(sd, bytes_f32(rec, false));
                let m = _mm512_mul_ps(sdm, bytes_f32(rec.add(GROUP), false));
                (
                    [d; 2],
                    [_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(m), sign)); 2],
                )
            }
            PackKind::Q6K | PackKind::Q3K => {
                let d = [
                    _mm512_mul_ps(sd, bytes_f32(rec, true)),
                    _mm512_mul_ps(sd, bytes_f32(rec.add(GROUP), true)),
                ];
                (d, [_mm512_mul_ps(d[0], neg_z), _mm512_mul_ps(d[1], neg_z)])
            }
            PackKind::IQ4XS => {
                let d = _mm512_mul_ps(sd, bytes_f32(rec, true));
                ([d; 2], [_mm512_mul_ps(d, neg_z); 2])
            }
            PackKind::Q2K => {
                // per half: scale in the low nibble, min in the high nibble
                let (mut d, mut m) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
                for h in 0..2 {
                    let v =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(rec.add(GROUP * h) as *const __m128i));
                    let sc = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
                    let mn = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                    d[h] = _mm512_mul_ps(sd, sc);
                    m[h] = _mm512_castsi512_ps(_mm512_xor_si512(
                        _mm512_castps_si512(_mm512_mul_ps(sdm, mn)),
                        sign,
                    ));
                }
                (d, m)
            }
        };
        // (8, 16 x 4 bytes): w[j] lane c = unsigned weights 4j..4j+3 of column c
        let qb = rec.add(scale_bytes);
        let mut w = [_mm512_setzero_si512(); 8];
        if kind.byte_quants() {
            for (j, wj) in w.iter_mut().enumerate() {
                *wj = _mm512_loadu_si512(qb.add(64 * j) as *const __m512i);
            }
        } else {
            if kind.crumb_quants() {
                for v in 0..2 {
                    let q = _mm512_loadu_si512(qb.add(64 * v) as *const __m512i);
                    w[4 * v] = _mm512_and_si512(q, crumb);
                    w[4 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(q, 2), crumb);
                    w[4 * v + 2] = _mm512_and_si512(_mm512_srli_epi16(q, 4), crumb);
                    w[4 * v + 3] = _mm512_and_si512(_mm512_srli_epi16(q, 6), crumb);
                }
            } else {
                for j in 0..4 {
                    let v = _mm512_loadu_si512(qb.add(64 * j) as *const __m512i);
                    w[j] = _mm512_and_si512(v, nib);
                    w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                }
            }
            let (low_bytes, low_bits) = (kind.low_bytes(), kind.low_bits());
            for p in 0..planes {
                let bit = _mm512_set1_epi8((1i32 << (low_bits as usize + p)) as i8);
                for (j, wj) in w.iter_mut().enumerate() {
                    let k = (qb.add(low_bytes + 64 * p + 8 * j) as *const u64).read_unaligned();
                    *wj = _mm512_mask_add_epi8(*wj, k, *wj, bit);
                }
            }
            if kind.table() {
                for wj in w.iter_mut() {
                    *wj = _mm512_shuffle_epi8(tbl, *wj);
                }
            }
        }
        // Per half h (the whole block when halves == 1): (R, 16) integer dot
        // products, both digits: (sum w*qs) * 128 + sum w*qr; then
        // acc_f += isum * (dw * dx / 128)
        let per = 8 / halves;
        for h in 0..halves {
            let mut acc = [_mm512_setzero_si512(); R];
            for j in h * per..(h + 1) * per {
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = x.add(r * x_stride + b);
                    let q = ((*xb).qs.as_ptr() as *const i32).add(j).read_unaligned();
                    *a = _mm512_dpbusd_epi32(*a, w[j], _mm512_set1_epi32(q));
                }
            }
            for a in acc.iter_mut() {
                *a = _mm512_slli_epi32(*a, 7);
            }
            if !one_digit {
                for j in h * per..(h + 1) * per {
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xb = x.add(r * x_stride + b);
                        let q = ((*xb).qr.as_ptr() as *const i32).add(j).read_unaligned();
                        *a = _mm512_dpbusd_epi32(*a, w[j], _mm512_set1_epi32(q));
                    }
                }
            }
            for (r, (f, a)) in accf.iter_mut().zip(&acc).enumerate() {
                let xb = &*x.add(r * x_stride + b);
                let sc = _mm512_mul_ps(dw[h], _mm512_set1_ps(xb.d * inv_r));
                *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*a), sc, *f);
            }
        }
        // (R, 16): acc_f += mw * sx (per half: mw_h * sx_h)
        for (r, f) in accf.iter_mut().enumerate() {
            if halves == 1 {
                *f = _mm512_fmadd_ps(mw[0], _mm512_set1_ps((*x.add(r * x_stride + b)).s), *f);
            } else {
                let hs = *xh.add(r * x_stride + b);
                *f = _mm512_fmadd_ps(mw[0], _mm512_set1_ps(hs[0]), *f);
                *f = _mm512_fmadd_ps(mw[1], _mm512_set1_ps(hs[1]), *f);
            }
        }
    }
    for (r, f) in accf.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(r * out_stride), lanes, *f);
    }
}

/// (16,) weight scales and offsets `(d, m)` (per half; both halves equal for
/// the one-half kinds) of the block record at `rec` of kind `K`, given the
/// (16,) super-block scales `sd`, `sdm` of its super-block (K-quant kinds).
/// The steps of [`gemm_group_k`], which keeps its own inlined copy (a call
/// per block there costs; the AMX kernel calls this once per block and
/// tile); `tests/amx.rs` checks the two kernels agree bit for bit.
///
/// # Safety
/// CPU supports avx512f/bw/vl and f16c; `rec` points at a full record of kind `K`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn block_scales<const K: u8>(
    rec: *const u8,
    sd: __m512,
    sdm: __m512,
) -> ([__m512; 2], [__m512; 2]) {
    let kind = const { PackKind::from_u8(K) };
    let neg_z = _mm512_set1_ps(-(kind.zero().unwrap_or(0) as f32));
    let sign = _mm512_set1_epi32(i32::MIN);
    match kind {
        PackKind::Q4_0 | PackKind::Q5_0 | PackKind::Q8_0 | PackKind::IQ4NL => {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
            ([d; 2], [_mm512_mul_ps(d, neg_z); 2])
        }
        PackKind::Q4_1 | PackKind::Q5_1 => {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
            (
                [d; 2],
                [_mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i)); 2],
            )
        }
        PackKind::Q4K | PackKind::Q5K => {
            let d = _mm512_mul_ps(sd, bytes_f32(rec, false));
            let m = _mm512_mul_ps(sdm, bytes_f32(rec.add(GROUP), false));
            (
                [d; 2],
                [_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(m), sign)); 2],
            )
        }
        PackKind::Q6K | PackKind::Q3K => {
            let d = [
                _mm512_mul_ps(sd, bytes_f32(rec, true)),
                _mm512_mul_ps(sd, bytes_f32(rec.add(GROUP), true)),
            ];
            (d, [_mm512_mul_ps(d[0], neg_z), _mm512_mul_ps(d[1], neg_z)])
        }
        PackKind::IQ4XS => {
            let d = _mm512_mul_ps(sd, bytes_f32(rec, true));
            ([d; 2], [_mm512_mul_ps(d, neg_z); 2])
        }
        PackKind::Q2K => {
            // per half: scale in the low nibble, min in the high nibble
            let (mut d, mut m) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
            for h in 0..2 {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(rec.add(GROUP * h) as *const __m128i));
                let sc = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
                let mn = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                d[h] = _mm512_mul_ps(sd, sc);
                m[h] = _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(_mm512_mul_ps(sdm, mn)),
                    sign,
                ));
            }
            (d, m)
        }
    }
}

/// The 32 unsigned weights of 16 columns of one block of kind `K` whose
/// quants start at `qb`, as 8 vectors: `w[j]` lane `c` = weights `4j..4j+3`
/// of column `c` (the VNNI / AMX B-tile layout; Q8_0's stored bytes as they
/// are). The steps of [`gemm_group_k`] (see [`block_scales`]).
///
/// # Safety
/// CPU supports avx512f/bw/vl; `qb` points at the quant part of a full
/// record of kind `K`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn block_weights<const K: u8>(qb: *const u8) -> [__m512i; 8] {
    let kind = const { PackKind::from_u8(K) };
    let planes = const { PackKind::from_u8(K).high_planes() };
    let nib = _mm512_set1_epi8(0x0F);
    let crumb = _mm512_set1_epi8(3);
    // IQ4 table values plus 128, in every 128-bit lane (vpshufb looks up within lanes).
    let tbl = _mm512_broadcast_i32x4(_mm_loadu_si128(IQ4_TABLE_U8.as_ptr() as *const __m128i));
    let mut w = [_mm512_setzero_si512(); 8];
    if kind.byte_quants() {
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = _mm512_loadu_si512(qb.add(64 * j) as *const __m512i);
        }
    } else {
        if kind.crumb_quants() {
            for v in 0..2 {
                let q = _mm512_loadu_si512(qb.add(64 * v) as *const __m512i);
                w[4 * v] = _mm512_and_si512(q, crumb);
                w[4 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(q, 2), crumb);
                w[4 * v + 2] = _mm512_and_si512(_mm512_srli_epi16(q, 4), crumb);
                w[4 * v + 3] = _mm512_and_si512(_mm512_srli_epi16(q, 6), crumb);
            }
        } else {
            for j in 0..4 {
                let v = _mm512_loadu_si512(qb.add(64 * j) as *const __m512i);
                w[j] = _mm512_and_si512(v, nib);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            }
        }
        let (low_bytes, low_bits) = (kind.low_bytes(), kind.low_bits());
        for p in 0..planes {
            let bit = _mm512_set1_epi8((1i32 << (low_bits as usize + p)) as i8);
            for (j, wj) in w.iter_mut().enumerate() {
                let k = (qb.add(low_bytes + 64 * p + 8 * j) as *const u64).read_unaligned();
                *wj = _mm512_mask_add_epi8(*wj, k, *wj, bit);
            }
        }
        if kind.table() {
            for wj in w.iter_mut() {
                *wj = _mm512_shuffle_epi8(tbl, *wj);
            }
        }
    }
    w
}

/// 16 bytes at `p` (signed or unsigned) as 16 f32 lanes.
///
/// # Safety
/// CPU supports avx512f; `p` points at 16 readable bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bytes_f32(p: *const u8, signed: bool) -> __m512 {
    let v = _mm_loadu_si128(p as *const __m128i);
    _mm512_cvtepi32_ps(if signed {
        _mm512_cvtepi8_epi32(v)
    } else {
        _mm512_cvtepu8_epi32(v)
    })
}

/// IQ4_NL's table values plus 128 (all in `1..=241`: unsigned bytes).
static IQ4_TABLE_U8: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (crate::quant::iq::KVALUES_IQ4NL[i] as i32 + 128) as u8;
        i += 1;
    }
    t
};

const _: () = assert!(GROUP == 16 && QK == 32);

/// Quantizes one row to two-digit Q8 blocks; bit-identical to
/// [`super::scalar::quantize_q8`] (same operations, round half to even).
///
/// # Safety
/// CPU supports avx512f/bw/vl; `x.len() == out.len() * 32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let lo = _mm512_set1_epi32(-127);
    let hi = _mm512_set1_epi32(127);
    let rs = _mm512_set1_ps(super::Q8_RESIDUAL_SCALE);
    for (bi, blk) in out.iter_mut().enumerate() {
        let p = x.as_ptr().add(bi * QK);
        let v0 = _mm512_loadu_ps(p);
        let v1 = _mm512_loadu_ps(p.add(16));
        let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), abs_mask));
        let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), abs_mask));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (dv, idv) = (_mm512_set1_ps(d), _mm512_set1_ps(id));
        let mut sum = _mm512_setzero_si512();
        for (h, v) in [v0, v1].into_iter().enumerate() {
            // q1 = clamp(round(v * id)); rem = v - q1 * d; q2 = clamp(round(rem * id * 128))
            let q1 = _mm512_min_epi32(
                _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, idv)), lo),
                hi,
            );
            let rem = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), dv));
            let t = _mm512_mul_ps(_mm512_mul_ps(rem, idv), rs);
            let q2 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(t), lo), hi);
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_slli_epi32(q1, 7), q2));
            _mm_storeu_si128(
                blk.qs.as_mut_ptr().add(h * 16) as *mut __m128i,
                _mm512_cvtepi32_epi8(q1),
            );
            _mm_storeu_si128(
                blk.qr.as_mut_ptr().add(h * 16) as *mut __m128i,
                _mm512_cvtepi32_epi8(q2),
            );
        }
        blk.d = d;
        blk.s = d / super::Q8_RESIDUAL_SCALE * _mm512_reduce_add_epi32(sum) as f32;
    }
}

/// `exp(x)` for 16 lanes, inputs clamped to [-87, 88] (so never NaN or
/// infinite for finite input): Cody-Waite reduction by ln 2, degree-6
/// polynomial, and `scalef` for the power of two. Relative error < 2e-7.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `tanh(x)` for 16 lanes: an odd Taylor polynomial (degree 15) for
/// `|x| < 0.5`, `(1 - e) / (1 + e)` with `e = exp(-2|x|)` above, sign
/// restored; absolute error below 2e-7 (no cancellation near 0).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tanh16(x: __m512) -> __m512 {
    let sign = _mm512_set1_epi32(i32::MIN);
    let ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(x)));
    // Large |x|: (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1].
    let e = exp16(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0)));
    let one = _mm512_set1_ps(1.0);
    let big = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    // Small |x|: x * P(x^2) with tanh's Taylor coefficients.
    let x2 = _mm512_mul_ps(ax, ax);
    let mut p = _mm512_set1_ps(super::scalar::TANH_TAYLOR[7]);
    for &c in super::scalar::TANH_TAYLOR[..7].iter().rev() {
        p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(c));
    }
    let small = _mm512_mul_ps(p, ax);
    let is_small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.5), _CMP_LT_OQ);
    let t = _mm512_mask_blend_ps(is_small, big, small);
    // Copy x's sign onto |tanh|.
    _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(t),
        _mm512_and_si512(sign, _mm512_castps_si512(x)),
    ))
}

/// `g[i] = gelu_tanh(g[i]) * u[i]` (see [`super::scalar::gelu_tanh_mul`]).
///
/// # Safety
/// CPU supports avx512f; `g.len() == u.len()`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    let n = g.len();
    let (half, k3, ks) = (
        _mm512_set1_ps(0.5),
        _mm512_set1_ps(0.044_715),
        _mm512_set1_ps(super::scalar::GELU_TANH_SCALE),
    );
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m: u16 = if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        };
        let x = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
        // inner = sqrt(2/pi) * (x + 0.044715 x^3)
        let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        let inner = _mm512_mul_ps(ks, _mm512_fmadd_ps(k3, x3, x));
        let y = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh16(inner))),
            uv,
        );
        _mm512_mask_storeu_ps(g.as_mut_ptr().add(i), m, y);
        i += 16;
    }
}

/// `v[i] = cap * tanh(v[i] / cap)`.
///
/// # Safety
/// CPU supports avx512f.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softcap(v: &mut [f32], cap: f32) {
    let n = v.len();
    let (c, ic) = (_mm512_set1_ps(cap), _mm512_set1_ps(1.0 / cap));
    let mut i = 0;
    while i < n {
        let m: u16 = if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        };
        let x = _mm512_maskz_loadu_ps(m, v.as_ptr().add(i));
        _mm512_mask_storeu_ps(
            v.as_mut_ptr().add(i),
            m,
            _mm512_mul_ps(c, tanh16(_mm512_mul_ps(x, ic))),
        );
        i += 16;
    }
}

/// `g[i] = silu(g[i]) * u[i]` with `silu(x) = x / (1 + exp(-x))`.
///
/// # Safety
/// CPU supports avx512f; `g.len() == u.len()`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
    let n = g.len();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m: u16 = if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        };
        let x = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        let y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), uv);
        _mm512_mask_storeu_ps(g.as_mut_ptr().add(i), m, y);
        i += 16;
    }
}

/// Largest element (`-inf` for an empty slice; NaNs are skipped).
///
/// # Safety
/// CPU supports avx512f.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn max_f32(v: &[f32]) -> f32 {
    let n = v.len();
    let mut acc = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            // max(x, a) returns `a` when x is NaN.
            *a = _mm512_max_ps(_mm512_loadu_ps(v.as_ptr().add(i + 16 * k)), *a);
        }
        i += 64;
    }
    while i < n {
        let m: u16 = if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        };
        acc[0] = _mm512_mask_max_ps(
            acc[0],
            m,
            _mm512_maskz_loadu_ps(m, v.as_ptr().add(i)),
            acc[0],
        );
        i += 16;
    }
    _mm512_reduce_max_ps(_mm512_max_ps(
        _mm512_max_ps(acc[0], acc[1]),
        _mm512_max_ps(acc[2], acc[3]),
    ))
}

/// `sum_i exp(v[i] - m)`: 4 x 16 f32 partial sums, combined in f64.
///
/// # Safety
/// CPU supports avx512f.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn sum_exp(v: &[f32], m: f32) -> f64 {
    let n = v.len();
    let mv = _mm512_set1_ps(m);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let x = _mm512_sub_ps(_mm512_loadu_ps(v.as_ptr().add(i + 16 * k)), mv);
            *a = _mm512_add_ps(*a, exp16(x));
        }
        i += 64;
    }
    while i < n {
        let k: u16 = if n - i >= 16 {
            u16::MAX
        } else {
            (1u16 << (n - i)) - 1
        };
        let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, v.as_ptr().add(i)), mv);
        acc[0] = _mm512_add_ps(acc[0], _mm512_maskz_mov_ps(k, exp16(x)));
        i += 16;
    }
    let mut lanes = [0.0f32; 64];
    for (k, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * k), *a);
    }
    lanes.iter().map(|&x| x as f64).sum()
}

/// How many KV blocks ahead the attention kernels prefetch (measured on
/// SmolLM2 decoding at 4,096 tokens of context, Zen 5: 2, 4 and 8 blocks ahead
/// took 16.3, 15.0 and 13.8 ms/token, none 15.5; medians of 4 rounds; in
/// `benches/kernels.rs` `row/9x64/ctx4096/30-layers-from-memory`, one thread:
/// 4, 8, 16 and 24 blocks 11.9, 11.1, 11.3 and 11.4 ms, `_MM_HINT_T0` instead
/// of T1 no better).
pub(super) const PREFETCH_BLOCKS: usize = 8;

/// Prefetches (into L2) KV head `kvh`'s keys and values of physical block
/// `blk` from the K/V arrays of one layer at `k` / `v`, whose elements take
/// `eb` bytes (2 for f16, 1 for `q8_0`'s quants): the head's keys are
/// contiguous (`bs * hd` elements, transposed per head), its values a slice
/// of `hd` elements of each of the block's `bs` rows of `kv_dim`. A hint only:
/// never faults, changes no result.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn prefetch_kv_block(
    k: *const u8,
    v: *const u8,
    eb: usize,
    blk: usize,
    bs: usize,
    hd: usize,
    kv_dim: usize,
    kvh: usize,
) {
    let lines = |p: *const u8, bytes: usize| {
        for o in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(o) as *const i8);
        }
    };
    lines(
        k.wrapping_add((blk * bs * kv_dim + kvh * hd * bs) * eb),
        bs * hd * eb,
    );
    let vb = v.wrapping_add((blk * bs * kv_dim + kvh * hd) * eb);
    for j in 0..bs {
        lines(vb.wrapping_add(j * kv_dim * eb), hd * eb);
    }
}

/// One segment's softmax state (running max and sum per head into `m_out`
/// / `l_out`, unnormalised output into `out`; see
/// [`super::attention::segments`]) of the paged attention of `G` query
/// heads sharing KV head `kvh` (head size
/// `16 * HV`) for one query row over the keys at positions `start..n_ctx`,
/// scores soft-capped when `softcap` is given; see
/// [`super::scalar::attend`] for the layout and the steps, which this follows
/// with 16 keys per register (scores of a chunk are one vector: no horizontal
/// sums per key; the sum of exponentials is kept per lane and reduced once at
/// the segment's end) and each K/V element converted once for all `G` heads.
/// The output is accumulated `HC` vectors of the head at a time (`HC`
/// divides `HV`; `G * HC` accumulators fit the 32 registers with the V row).
///
/// # Safety
/// CPU supports avx512f/bw/vl and f16c; `q` and `out` hold `G * 16 * HV`
/// floats, `m_out` and `l_out` `G`; `table` holds `n_ctx.div_ceil(bs)` block ids, those from
/// `start / bs` on each `< nblk` where `k` and `v` hold `nblk * bs * kv_dim`
/// elements; `(kvh + 1) * 16 * HV <= kv_dim`; `start < n_ctx`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
pub(super) unsafe fn attend_f16<const G: usize, const HV: usize, const HC: usize>(
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
    const { assert!(HC > 0 && HV % HC == 0) };
    let hd = 16 * HV;
    let mut acc = [[_mm512_setzero_ps(); HV]; G];
    let mut m = [f32::NEG_INFINITY; G];
    // Sums of exponentials per lane (key offset mod 16), reduced once at
    // the end: no horizontal sum per chunk.
    let mut lv = [_mm512_setzero_ps(); G];
    let mut p = [[0.0f32; 16]; G];
    let mut corr_v = [_mm512_setzero_ps(); G];
    let scv = _mm512_set1_ps(scale);
    let first = start / bs;
    let n_blocks = n_ctx.div_ceil(bs);
    for (bi, &blk) in table.iter().enumerate().take(n_blocks).skip(first) {
        let blk = blk as usize;
        let cnt = bs.min(n_ctx - bi * bs);
        let kt = k.add(blk * bs * kv_dim + kvh * hd * bs);
        let vb = v.add(blk * bs * kv_dim + kvh * hd);
        // A head reads a slice of each block, and a sequence's blocks need
        // not be adjacent in the pool: the hardware prefetchers do not
        // follow that, so ask for the block PREFETCH_BLOCKS ahead (at the
        // first block, for that one and the PREFETCH_BLOCKS after it).
        let hi = (bi + PREFETCH_BLOCKS + 1).min(n_blocks);
        let lo = if bi == first {
            bi
        } else {
            bi + PREFETCH_BLOCKS
        };
        for &blk_a in &table[lo.min(hi)..hi] {
            prefetch_kv_block(
                k as *const u8,
                v as *const u8,
                2,
                blk_a as usize,
                bs,
                hd,
                kv_dim,
                kvh,
            );
        }
        // The window's first block starts inside it.
        let mut c = if bi == first { start - bi * bs } else { 0 };
        while c < cnt {
            let n = 16.min(cnt - c);
            let mask: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            // (G, 16) scores: lane j = key c + j; two partial sums over d
            // (even d into `s0`, odd into `s1`), as two named arrays with
            // the d loop stepped by 2 so they stay in registers (indexing
            // one array by `d % 2` kept them on the stack: a store and a
            // reload per multiply-add). Same operations, same order.
            let mut s0 = [_mm512_setzero_ps(); G];
            let mut s1 = [_mm512_setzero_ps(); G];
            for d in (0..hd).step_by(2) {
                let k0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    mask,
                    kt.add(d * bs + c) as *const i16,
                ));
                let k1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    mask,
                    kt.add((d + 1) * bs + c) as *const i16,
                ));
                for g in 0..G {
                    s0[g] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(g * hd + d)), k0, s0[g]);
                    s1[g] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(g * hd + d + 1)), k1, s1[g]);
                }
            }
            // Whether some head's max moved (else every correction is 1).
            let mut rescale = false;
            for g in 0..G {
                let mut sv = _mm512_mul_ps(_mm512_add_ps(s0[g], s1[g]), scv);
                if let Some(cap) = softcap {
                    sv = _mm512_mul_ps(
                        _mm512_set1_ps(cap),
                        tanh16(_mm512_mul_ps(sv, _mm512_set1_ps(1.0 / cap))),
                    );
                }
                let mo = _mm512_set1_ps(m[g]);
                if _mm512_mask_cmp_ps_mask(mask, sv, mo, _CMP_GT_OQ) == 0 {
                    // No score above the running max: the max stays and the
                    // correction is exp16(0) = 1 exactly (the same bits as
                    // the general step below, without its reduction and
                    // exponential).
                    let pv = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sv, mo)));
                    lv[g] = _mm512_add_ps(lv[g], pv);
                    _mm512_storeu_ps(p[g].as_mut_ptr(), pv);
                    corr_v[g] = _mm512_set1_ps(1.0);
                    continue;
                }
                rescale = true;
                let bm = _mm512_mask_reduce_max_ps(mask, sv);
                let m_new = m[g].max(bm);
                let corr = _mm512_cvtss_f32(exp16(_mm512_set1_ps(m[g] - m_new)));
                let pv = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
                corr_v[g] = _mm512_set1_ps(corr);
                lv[g] = _mm512_fmadd_ps(lv[g], corr_v[g], pv);
                m[g] = m_new;
                _mm512_storeu_ps(p[g].as_mut_ptr(), pv);
            }
            // (G, hd) = corr * (G, hd) + sum_j p[g][j] * V row of key c + j,
            // HC vectors of the head at a time: G x HC accumulators stay in
            // registers (G x HV may exceed the 32 of the ISA).
            for h0 in (0..HV).step_by(HC) {
                let mut a = [[_mm512_setzero_ps(); HC]; G];
                for g in 0..G {
                    for (h, x) in a[g].iter_mut().enumerate() {
                        // `acc * 1` is `acc`: skip the multiply then.
                        *x = if rescale {
                            _mm512_mul_ps(acc[g][h0 + h], corr_v[g])
                        } else {
                            acc[g][h0 + h]
                        };
                    }
                }
                for j in 0..n {
                    let vp = (vb.add((c + j) * kv_dim) as *const __m256i).add(h0);
                    let mut vv = [_mm512_setzero_ps(); HC];
                    for (h, x) in vv.iter_mut().enumerate() {
                        *x = _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(h)));
                    }
                    for g in 0..G {
                        let w = _mm512_set1_ps(p[g][j]);
                        for (x, y) in a[g].iter_mut().zip(&vv) {
                            *x = _mm512_fmadd_ps(w, *y, *x);
                        }
                    }
                }
                for g in 0..G {
                    acc[g][h0..h0 + HC].copy_from_slice(&a[g]);
                }
            }
            c += 16;
        }
    }
    for g in 0..G {
        *m_out.add(g) = m[g];
        *l_out.add(g) = _mm512_reduce_add_ps(lv[g]);
        for (h, a) in acc[g].iter().enumerate() {
            _mm512_storeu_ps(out.add(g * hd + 16 * h), *a);
        }
    }
}
