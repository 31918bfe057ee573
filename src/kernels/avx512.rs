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

use std::arch::x86_64::*;

use half::f16;

use super::packed::{PackKind, GROUP};
use super::{BlockQ8, QK};

/// Most activation rows one kernel call applies a weight block to.
pub(super) const MAX_TILE_ROWS: usize = 8;

/// `out[r * out_stride + c] = dot(column c of the group, x row r)` for
/// `r < R`, lanes `c` set in `lanes`.
///
/// `group` points at one packed column group (`nb` blocks, see
/// [`super::packed`]); `x` at block 0 of the first of `R` activation rows
/// spaced `x_stride` blocks apart.
///
/// # Safety
/// CPU supports avx512f/bw/vl/vnni and f16c; `group` spans a full packed
/// group of `kind` with `nb` blocks; `x` holds `(R - 1) * x_stride + nb`
/// blocks; `out` holds `(R - 1) * out_stride + 16` floats for every lane set
/// in `lanes` (masked lanes are not touched).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn gemm_group<const R: usize>(
    kind: PackKind,
    group: *const u8,
    nb: usize,
    x: *const BlockQ8,
    x_stride: usize,
    out: *mut f32,
    out_stride: usize,
    lanes: u16,
) {
    let dptr = group as *const __m256i;
    let (mptr, qptr) = match kind {
        PackKind::Q4_1 => (dptr.add(nb), group.add(nb * 64)),
        _ => (dptr, group.add(nb * 32)),
    };
    let qbytes = kind.qs_bytes();
    let nib = _mm512_set1_epi8(0x0F);
    let inv_r = 1.0 / super::Q8_RESIDUAL_SCALE;
    let mut accf = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        // (16,) weight scales and offsets of this block
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(dptr.add(b)));
        let mw = match kind {
            PackKind::Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(mptr.add(b))),
            PackKind::Q4_0 => _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
            PackKind::Q8_0 => _mm512_mul_ps(dw, _mm512_set1_ps(-128.0)),
        };
        // (8, 16 x 4 bytes): w[j] lane c = unsigned weights 4j..4j+3 of column c
        let qb = qptr.add(b * qbytes) as *const __m512i;
        let mut w = [_mm512_setzero_si512(); 8];
        match kind {
            PackKind::Q8_0 => {
                for (j, wj) in w.iter_mut().enumerate() {
                    *wj = _mm512_loadu_si512(qb.add(j));
                }
            }
            _ => {
                for j in 0..4 {
                    let v = _mm512_loadu_si512(qb.add(j));
                    w[j] = _mm512_and_si512(v, nib);
                    w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                }
            }
        }
        // (R, 16) integer dot products, both digits: (sum w*qs) * 128 + sum w*qr
        let mut acc = [_mm512_setzero_si512(); R];
        for (j, wj) in w.iter().enumerate() {
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = x.add(r * x_stride + b);
                let q = ((*xb).qs.as_ptr() as *const i32).add(j).read_unaligned();
                *a = _mm512_dpbusd_epi32(*a, *wj, _mm512_set1_epi32(q));
            }
        }
        for a in acc.iter_mut() {
            *a = _mm512_slli_epi32(*a, 7);
        }
        for (j, wj) in w.iter().enumerate() {
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = x.add(r * x_stride + b);
                let q = ((*xb).qr.as_ptr() as *const i32).add(j).read_unaligned();
                *a = _mm512_dpbusd_epi32(*a, *wj, _mm512_set1_epi32(q));
            }
        }
        // (R, 16): acc_f += isum * (dw * dx / 128) + mw * sx
        for (r, (f, a)) in accf.iter_mut().zip(&acc).enumerate() {
            let xb = &*x.add(r * x_stride + b);
            let sc = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d * inv_r));
            *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*a), sc, *f);
            *f = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb.s), *f);
        }
    }
    for (r, f) in accf.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(r * out_stride), lanes, *f);
    }
}

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
            let q1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, idv)), lo), hi);
            let rem = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), dv));
            let t = _mm512_mul_ps(_mm512_mul_ps(rem, idv), rs);
            let q2 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(t), lo), hi);
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_slli_epi32(q1, 7), q2));
            _mm_storeu_si128(blk.qs.as_mut_ptr().add(h * 16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
            _mm_storeu_si128(blk.qr.as_mut_ptr().add(h * 16) as *mut __m128i, _mm512_cvtepi32_epi8(q2));
        }
        blk.d = d;
        blk.s = d / super::Q8_RESIDUAL_SCALE * _mm512_reduce_add_epi32(sum) as f32;
    }
}

/// `sum_i a[i] * b[i]`, `b` in f16.
///
/// # Safety
/// CPU supports avx512f and f16c; `a.len() == b.len()`.
#[target_feature(enable = "avx512f,avx512vl,f16c,fma")]
pub(super) unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    let n = a.len();
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        let b0 = _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i));
        let b1 = _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().add(i + 16) as *const __m256i));
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), b0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i + 16)), b1, acc1);
        i += 32;
    }
    if i + 16 <= n {
        let b0 = _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i));
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), b0, acc0);
        i += 16;
    }
    if i < n {
        let m: u16 = (1u32 << (n - i)) as u16 - 1;
        let bv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, b.as_ptr().add(i) as *const i16));
        acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a.as_ptr().add(i)), bv, acc1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// `out[i] += w * v[i]`, `v` in f16.
///
/// # Safety
/// CPU supports avx512f and f16c; `out.len() == v.len()`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
pub(super) unsafe fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    let n = out.len();
    let wv = _mm512_set1_ps(w);
    let mut i = 0;
    while i + 16 <= n {
        let vv = _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(i) as *const __m256i));
        let o = _mm512_loadu_ps(out.as_ptr().add(i));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_fmadd_ps(wv, vv, o));
        i += 16;
    }
    if i < n {
        let m: u16 = (1u32 << (n - i)) as u16 - 1;
        let vv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, v.as_ptr().add(i) as *const i16));
        let o = _mm512_maskz_loadu_ps(m, out.as_ptr().add(i));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, _mm512_fmadd_ps(wv, vv, o));
    }
}

/// `out[j] = sum_i q[i] * k[j * stride + i]` for `j < out.len()`, `k` in f16.
///
/// # Safety
/// CPU supports avx512f/bw/vl and f16c; `k.len() >= (out.len() - 1) * stride
/// + q.len()` when `out` is not empty.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
pub(super) unsafe fn dot_f16_rows(q: &[f32], k: &[f16], stride: usize, out: &mut [f32]) {
    if q.len() != 64 {
        for (j, o) in out.iter_mut().enumerate() {
            *o = dot_f16(q, &k[j * stride..j * stride + q.len()]);
        }
        return;
    }
    // Head size 64 (the common case): q stays in 4 registers.
    let qv = [0, 16, 32, 48].map(|i| _mm512_loadu_ps(q.as_ptr().add(i)));
    for (j, o) in out.iter_mut().enumerate() {
        let kp = k.as_ptr().add(j * stride) as *const __m256i;
        let k0 = _mm512_cvtph_ps(_mm256_loadu_si256(kp));
        let k1 = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(1)));
        let k2 = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(2)));
        let k3 = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(3)));
        let a0 = _mm512_fmadd_ps(qv[1], k1, _mm512_mul_ps(qv[0], k0));
        let a1 = _mm512_fmadd_ps(qv[3], k3, _mm512_mul_ps(qv[2], k2));
        *o = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/// `out[i] += sum_j w[j] * v[j * stride + i]`, applied for `j = 0, 1, ...` in
/// order (one fused multiply-add per element and `j`), `v` in f16.
///
/// # Safety
/// CPU supports avx512f/bw/vl and f16c; `v.len() >= (w.len() - 1) * stride +
/// out.len()` when `w` is not empty.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
pub(super) unsafe fn axpy_f16_rows(out: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
    let n = out.len();
    let mut i = 0;
    // 64 outputs at a time in 4 registers.
    while i + 64 <= n {
        let op = out.as_mut_ptr().add(i);
        let mut acc = [0, 16, 32, 48].map(|k| _mm512_loadu_ps(op.add(k)));
        for (j, &wj) in w.iter().enumerate() {
            let wv = _mm512_set1_ps(wj);
            let vp = v.as_ptr().add(j * stride + i) as *const __m256i;
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(wv, _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(k))), *a);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(op.add(16 * k), *a);
        }
        i += 64;
    }
    if i < n {
        for (j, &wj) in w.iter().enumerate() {
            axpy_f16(&mut out[i..], wj, &v[j * stride + i..j * stride + n]);
        }
    }
}
