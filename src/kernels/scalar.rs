//! Scalar reference kernels: the test oracle for every SIMD kernel, the
//! fallback on CPUs without AVX2, and the kernel of the types without a SIMD
//! one (Q2_K, Q3_K, and IQ4_NL/IQ4_XS on raw blocks).
//!
//! Weight blocks are the `#[repr(C)]` structs of [`crate::quant`] (their layouts
//! and reference dequantizers live there). Activations are quantized per
//! 32-element block to [`BlockQ8`] (f32 scale and the scaled sum, which the
//! formats with offsets need). Every quantized type has an integer form
//! ([`IntBlock`], [`for_each_int_block`]): per 32 elements, signed 8-bit
//! quants with one scale and offset per 16-element half, bit-exact with the
//! reference dequantizer, so one integer dot ([`vec_dot_int`]) serves all
//! types.

use half::{bf16, f16};

use super::{BlockQ8, Q8_RESIDUAL_SCALE, QK};
use crate::quant::iq::KVALUES_IQ4NL;
use crate::quant::k_quants::{nibble, scale_min_k4, two_bits};
use crate::quant::legacy::five_bit_quants;
use crate::quant::{
    blocks, BlockIQ4NL, BlockIQ4XS, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K,
    BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, GgmlDType, QK_K,
};

/// Reads a little-endian f16 at `b[0..2]` as f32.
#[inline(always)]
fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
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
    let mut acc = 0.0f32;
    match dtype {
        GgmlDType::Q4_0 => {
            for (b, xb) in blocks::<BlockQ4_0>(w).zip(x) {
                let d = b.d.to_f32();
                let isum = dot_nibbles(&b.qs, xb);
                acc += d * (xb.d / Q8_RESIDUAL_SCALE) * isum as f32 - 8.0 * d * xb.s;
            }
        }
        GgmlDType::Q4_1 => {
            for (b, xb) in blocks::<BlockQ4_1>(w).zip(x) {
                let d = b.d.to_f32();
                let m = b.m.to_f32();
                let isum = dot_nibbles(&b.qs, xb);
                acc += d * (xb.d / Q8_RESIDUAL_SCALE) * isum as f32 + m * xb.s;
            }
        }
        GgmlDType::Q8_0 => {
            for (b, xb) in blocks::<BlockQ8_0>(w).zip(x) {
                let d = b.d.to_f32();
                let (mut s1, mut s2) = (0i32, 0i32);
                for j in 0..QK {
                    let w = b.qs[j] as i32;
                    s1 += w * xb.qs[j] as i32;
                    s2 += w * xb.qr[j] as i32;
                }
                let isum = s1 * Q8_RESIDUAL_SCALE as i32 + s2;
                acc += d * (xb.d / Q8_RESIDUAL_SCALE) * isum as f32;
            }
        }
        // Float types use vec_dot_f.
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {}
        _ => {
            for_each_int_block(dtype, w, |b, ib| {
                if let Some(xb) = x.get(b) {
                    acc = dot_int_block(ib, xb, acc);
                }
            });
        }
    }
    acc
}

/// Dot product of a weight row in integer form (from [`for_each_int_block`])
/// with one Q8 row: the operations of [`vec_dot_q`] for the types other
/// than Q4_0/Q4_1/Q8_0, bit for bit.
pub fn vec_dot_int(w: &[IntBlock], x: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(x)
        .fold(0.0, |acc, (ib, xb)| dot_int_block(ib, xb, acc))
}

/// One 32-element block of a quantized weight row in integer form:
/// `w[k] = d[k / 16] * q[k] + m[k / 16]` (the halves differ only in the
/// formats with 16-element sub-blocks: Q2_K, Q3_K, Q6_K). Evaluated in f32 as
/// written (`m = -0.0` for formats without an offset, so `+ m` changes no
/// bit), this is bit-identical to the reference dequantizer of every type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IntBlock {
    /// Integer quants (offsets folded in: Q4_0's `q - 8`, Q6_K's `q - 32`, IQ4's table values).
    pub q: [i8; QK],
    /// Scale of elements `0..16` and `16..32`.
    pub d: [f32; 2],
    /// Offset of elements `0..16` and `16..32`.
    pub m: [f32; 2],
}

impl IntBlock {
    /// Dequantized values (bit-identical to [`crate::quant::dequantize_row`]).
    pub fn dequantize(&self, out: &mut [f32; QK]) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.d[k / 16] * self.q[k] as f32 + self.m[k / 16];
        }
    }
}

/// Integer sums of the activation digits over elements `0..16` and `16..32`,
/// in units of `d / 128` (`128 * qs + qr`).
#[inline(always)]
pub(crate) fn half_isums(xb: &BlockQ8) -> [i32; 2] {
    let mut s = [0i32; 2];
    for k in 0..QK {
        s[k / 16] += xb.qs[k] as i32 * Q8_RESIDUAL_SCALE as i32 + xb.qr[k] as i32;
    }
    s
}

/// Activation sums of the two 16-element halves, `d / 128 * isum` (as `s`
/// is for the whole block).
#[inline(always)]
pub(crate) fn half_sums(xb: &BlockQ8) -> [f32; 2] {
    let s = half_isums(xb);
    [
        xb.d / Q8_RESIDUAL_SCALE * s[0] as f32,
        xb.d / Q8_RESIDUAL_SCALE * s[1] as f32,
    ]
}

/// Dot product of one integer-form weight block with one Q8 block, added to `acc`.
#[inline(always)]
fn dot_int_block(ib: &IntBlock, xb: &BlockQ8, acc: f32) -> f32 {
    let mut isum = [0i32; 2];
    for k in 0..QK {
        isum[k / 16] +=
            ib.q[k] as i32 * (xb.qs[k] as i32 * Q8_RESIDUAL_SCALE as i32 + xb.qr[k] as i32);
    }
    let sx = xb.d / Q8_RESIDUAL_SCALE;
    let mut acc = acc + ib.d[0] * sx * isum[0] as f32 + ib.d[1] * sx * isum[1] as f32;
    if ib.m[0] == ib.m[1] {
        acc += ib.m[0] * xb.s;
    } else {
        let hs = half_sums(xb);
        acc += ib.m[0] * hs[0] + ib.m[1] * hs[1];
    }
    acc
}

/// Calls `f(b, block)` for every 32-element block `b` of one quantized
/// weight row (raw ggml bytes of `dtype`, whole blocks), in order. Float
/// dtypes yield nothing.
pub fn for_each_int_block(dtype: GgmlDType, row: &[u8], mut f: impl FnMut(usize, &IntBlock)) {
    const Z: f32 = -0.0;
    let mut ib = IntBlock {
        q: [0; QK],
        d: [0.0; 2],
        m: [Z; 2],
    };
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {}
        GgmlDType::Q4_0 => {
            for (b, blk) in blocks::<BlockQ4_0>(row).enumerate() {
                let d = blk.d.to_f32();
                for j in 0..QK / 2 {
                    ib.q[j] = (blk.qs[j] & 0x0F) as i8 - 8;
                    ib.q[j + 16] = (blk.qs[j] >> 4) as i8 - 8;
                }
                (ib.d, ib.m) = ([d; 2], [Z; 2]);
                f(b, &ib);
            }
        }
        GgmlDType::Q4_1 => {
            for (b, blk) in blocks::<BlockQ4_1>(row).enumerate() {
                for j in 0..QK / 2 {
                    ib.q[j] = (blk.qs[j] & 0x0F) as i8;
                    ib.q[j + 16] = (blk.qs[j] >> 4) as i8;
                }
                (ib.d, ib.m) = ([blk.d.to_f32(); 2], [blk.m.to_f32(); 2]);
                f(b, &ib);
            }
        }
        GgmlDType::Q5_0 => {
            for (b, blk) in blocks::<BlockQ5_0>(row).enumerate() {
                for (q, u) in ib.q.iter_mut().zip(five_bit_quants(blk.qh, &blk.qs)) {
                    *q = u as i8 - 16;
                }
                (ib.d, ib.m) = ([blk.d.to_f32(); 2], [Z; 2]);
                f(b, &ib);
            }
        }
        GgmlDType::Q5_1 => {
            for (b, blk) in blocks::<BlockQ5_1>(row).enumerate() {
                for (q, u) in ib.q.iter_mut().zip(five_bit_quants(blk.qh, &blk.qs)) {
                    *q = u as i8;
                }
                (ib.d, ib.m) = ([blk.d.to_f32(); 2], [blk.m.to_f32(); 2]);
                f(b, &ib);
            }
        }
        GgmlDType::Q8_0 => {
            for (b, blk) in blocks::<BlockQ8_0>(row).enumerate() {
                (ib.q, ib.d, ib.m) = (blk.qs, [blk.d.to_f32(); 2], [Z; 2]);
                f(b, &ib);
            }
        }
        GgmlDType::Q2_K => {
            for (sb, blk) in blocks::<BlockQ2K>(row).enumerate() {
                let (d, dmin) = (blk.d.to_f32(), blk.dmin.to_f32());
                for j in 0..QK_K / QK {
                    for h in 0..2 {
                        let sc = blk.scales[2 * j + h];
                        ib.d[h] = d * (sc & 0x0F) as f32;
                        ib.m[h] = -(dmin * (sc >> 4) as f32);
                    }
                    for (k, q) in ib.q.iter_mut().enumerate() {
                        *q = two_bits(&blk.qs, QK * j + k) as i8;
                    }
                    f(sb * 8 + j, &ib);
                }
            }
        }
        GgmlDType::Q3_K => {
            for (sb, blk) in blocks::<BlockQ3K>(row).enumerate() {
                let d = blk.d.to_f32();
                let scales = blk.unpacked_scales();
                for j in 0..QK_K / QK {
                    ib.d = [d * scales[2 * j] as f32, d * scales[2 * j + 1] as f32];
                    ib.m = [Z; 2];
                    for (k, q) in ib.q.iter_mut().enumerate() {
                        let i = QK * j + k;
                        let high = (blk.hmask[i % 32] >> (i / 32)) & 1;
                        *q = two_bits(&blk.qs, i) as i8 - if high == 0 { 4 } else { 0 };
                    }
                    f(sb * 8 + j, &ib);
                }
            }
        }
        GgmlDType::Q4_K => {
            for (sb, blk) in blocks::<BlockQ4K>(row).enumerate() {
                let (d, dmin) = (blk.d.to_f32(), blk.dmin.to_f32());
                for j in 0..QK_K / QK {
                    let (sc, m) = scale_min_k4(j, &blk.scales);
                    (ib.d, ib.m) = ([d * sc as f32; 2], [-(dmin * m as f32); 2]);
                    for (k, q) in ib.q.iter_mut().enumerate() {
                        *q = nibble(&blk.qs, QK * j + k) as i8;
                    }
                    f(sb * 8 + j, &ib);
                }
            }
        }
        GgmlDType::Q5_K => {
            for (sb, blk) in blocks::<BlockQ5K>(row).enumerate() {
                let (d, dmin) = (blk.d.to_f32(), blk.dmin.to_f32());
                for j in 0..QK_K / QK {
                    let (sc, m) = scale_min_k4(j, &blk.scales);
                    (ib.d, ib.m) = ([d * sc as f32; 2], [-(dmin * m as f32); 2]);
                    for (k, q) in ib.q.iter_mut().enumerate() {
                        let high = (blk.qh[k] >> j) & 1;
                        *q = (nibble(&blk.qs, QK * j + k) | (high << 4)) as i8;
                    }
                    f(sb * 8 + j, &ib);
                }
            }
        }
        GgmlDType::Q6_K => {
            for (sb, blk) in blocks::<BlockQ6K>(row).enumerate() {
                let d = blk.d.to_f32();
                for j in 0..QK_K / QK {
                    ib.d = [
                        d * blk.scales[2 * j] as f32,
                        d * blk.scales[2 * j + 1] as f32,
                    ];
                    ib.m = [Z; 2];
                    for (k, q) in ib.q.iter_mut().enumerate() {
                        *q = q6_k_quant(&blk, QK * j + k) as i8 - 32;
                    }
                    f(sb * 8 + j, &ib);
                }
            }
        }
        GgmlDType::IQ4_NL => {
            for (b, blk) in blocks::<BlockIQ4NL>(row).enumerate() {
                for j in 0..QK / 2 {
                    ib.q[j] = KVALUES_IQ4NL[(blk.qs[j] & 0x0F) as usize];
                    ib.q[j + 16] = KVALUES_IQ4NL[(blk.qs[j] >> 4) as usize];
                }
                (ib.d, ib.m) = ([blk.d.to_f32(); 2], [Z; 2]);
                f(b, &ib);
            }
        }
        GgmlDType::IQ4_XS => {
            for (sb, blk) in blocks::<BlockIQ4XS>(row).enumerate() {
                let d = blk.d.to_f32();
                for j in 0..QK_K / QK {
                    ib.d = [d * iq4_xs_scale(&blk, j) as f32; 2];
                    ib.m = [Z; 2];
                    for l in 0..QK / 2 {
                        let byte = blk.qs[16 * j + l];
                        ib.q[l] = KVALUES_IQ4NL[(byte & 0x0F) as usize];
                        ib.q[l + 16] = KVALUES_IQ4NL[(byte >> 4) as usize];
                    }
                    f(sb * 8 + j, &ib);
                }
            }
        }
    }
}

/// Q6_K's unsigned 6-bit quant of element `i` (`0..64`; the weight is `d * sc * (q - 32)`).
#[inline(always)]
pub(crate) fn q6_k_quant(blk: &BlockQ6K, i: usize) -> u8 {
    let (h, r) = (i / 128 % 2, i % 128);
    let lo = (blk.ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
    let hi = (blk.qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
    lo | (hi << 4)
}

/// IQ4_XS's signed scale of sub-block `j` (`-32..32`).
#[inline(always)]
pub(crate) fn iq4_xs_scale(blk: &BlockIQ4XS, j: usize) -> i8 {
    let lo = (blk.scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
    let hi = ((blk.scales_h >> (2 * j)) & 3) as u8;
    (lo | (hi << 4)) as i8 - 32
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

/// Largest element (`-inf` for an empty slice; NaNs are skipped).
pub fn max_f32(v: &[f32]) -> f32 {
    v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `sum_i exp(v[i] - m)`, accumulated in f64.
pub fn sum_exp(v: &[f32], m: f32) -> f64 {
    v.iter().map(|&x| ((x - m) as f64).exp()).sum()
}

/// `g[i] = silu(g[i]) * u[i]` with `silu(x) = x / (1 + exp(-x))`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (x, &y) in g.iter_mut().zip(u) {
        *x = *x / (1.0 + (-*x).exp()) * y;
    }
}

/// Coefficients of `tanh(x) / x` in powers of `x^2` (1, -1/3, 2/15, ...): the
/// SIMD `tanh` below |x| = 0.5.
pub(super) const TANH_TAYLOR: [f32; 8] = [
    1.0,
    -1.0 / 3.0,
    2.0 / 15.0,
    -17.0 / 315.0,
    62.0 / 2835.0,
    -1382.0 / 155_925.0,
    21844.0 / 6_081_075.0,
    -929_569.0 / 638_512_875.0,
];

/// `sqrt(2 / pi)`, the inner scale of the tanh approximation of GELU.
pub const GELU_TANH_SCALE: f32 = 0.797_884_6;

/// GeGLU gate: `g[i] = gelu_tanh(g[i]) * u[i]` with
/// `gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`
/// (PyTorch's `gelu(approximate="tanh")`, Gemma's activation).
pub fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    for (x, &y) in g.iter_mut().zip(u) {
        let v = *x;
        *x = 0.5 * v * (1.0 + (GELU_TANH_SCALE * (v + 0.044_715 * v * v * v)).tanh()) * y;
    }
}

/// `v[i] = cap * tanh(v[i] / cap)` (Gemma 2's final-logit soft-capping).
pub fn softcap(v: &mut [f32], cap: f32) {
    for x in v.iter_mut() {
        *x = cap * (*x * (1.0 / cap)).tanh();
    }
}

/// Paged attention of the `group` query heads that share KV head `kvh`, for
/// one query row at position `keys.end - 1`, over the keys at positions
/// `keys` (a sliding window starts after 0; scalar reference, generic over
/// the stored element type through `cvt`). With `s.softcap = Some(cap)` each
/// score becomes `cap * tanh(score / cap)` before the softmax.
///
/// Layout (see [`super::AttnShape`]): block `b` of K holds, for each KV head,
/// a `[head_dim][block_size]` (transposed) slab; V holds `[block_size][kv_dim]`
/// rows. `q` and `out` are `group x head_dim`. Softmax is computed online over
/// chunks of [`super::ATT_CHUNK`] keys (max, rescale, accumulate), the same
/// steps as the SIMD kernels; results agree with them to f32 rounding.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: Copy>(
    s: &super::AttnShape,
    q: &[f32],
    kvh: usize,
    k: &[T],
    v: &[T],
    table: &[u32],
    keys: std::ops::Range<usize>,
    out: &mut [f32],
    cvt: impl Fn(T) -> f32,
) {
    super::attention::run_segments(s, keys, out, |seg, m, l, acc| {
        attend_part(s, q, kvh, k, v, table, seg, m, l, acc, &cvt)
    });
}

/// One segment of [`attend`] (keys `keys`, inside one segment of
/// [`super::attention::segments`]): its softmax state from scratch, the
/// running max `m` and sum `l` per head and the unnormalised output `acc`
/// (`group x head_dim`).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_part<T: Copy>(
    s: &super::AttnShape,
    q: &[f32],
    kvh: usize,
    k: &[T],
    v: &[T],
    table: &[u32],
    keys: std::ops::Range<usize>,
    m_out: &mut [f32],
    l_out: &mut [f32],
    out: &mut [f32],
    cvt: impl Fn(T) -> f32,
) {
    const C: usize = super::ATT_CHUNK;
    let (start, n_ctx) = (keys.start, keys.end);
    let (hd, g, bs, kv_dim) = (s.head_dim, s.group, s.block_size, s.kv_dim);
    let mut m = [f32::NEG_INFINITY; super::MAX_GROUP];
    let mut l = [0.0f32; super::MAX_GROUP];
    let mut p = [[0.0f32; C]; super::MAX_GROUP];
    out.fill(0.0);
    let first = start / bs;
    for (bi, &blk) in table
        .iter()
        .enumerate()
        .take(n_ctx.div_ceil(bs))
        .skip(first)
    {
        let blk = blk as usize;
        let cnt = bs.min(n_ctx - bi * bs);
        let kt = blk * bs * kv_dim + kvh * hd * bs;
        let vb = blk * bs * kv_dim + kvh * hd;
        // The window's first block starts inside it.
        let lo = if bi == first { start - bi * bs } else { 0 };
        for c in (lo..cnt).step_by(C) {
            let n = C.min(cnt - c);
            // (g, n) scores: two partial sums per key (even / odd d), each K
            // row of the chunk converted once for all g heads.
            let mut acc = [[[0.0f32; C]; 2]; super::MAX_GROUP];
            let mut kf = [0.0f32; C];
            for d in 0..hd {
                for (f, &x) in kf.iter_mut().zip(&k[kt + d * bs + c..kt + d * bs + c + n]) {
                    *f = cvt(x);
                }
                for (gi, ag) in acc.iter_mut().enumerate().take(g) {
                    let qd = q[gi * hd + d];
                    for (a, &x) in ag[d % 2].iter_mut().zip(&kf[..n]) {
                        *a += qd * x;
                    }
                }
            }
            for gi in 0..g {
                let mut sc = [f32::NEG_INFINITY; C];
                for (j, scj) in sc.iter_mut().enumerate().take(n) {
                    *scj = (acc[gi][0][j] + acc[gi][1][j]) * s.scale;
                    if let Some(cap) = s.softcap {
                        *scj = cap * (*scj * (1.0 / cap)).tanh();
                    }
                }
                let m_new = sc[..n].iter().fold(m[gi], |a, &b| a.max(b));
                let corr = (m[gi] - m_new).exp();
                let mut sum = 0.0f32;
                for j in 0..C {
                    p[gi][j] = if j < n { (sc[j] - m_new).exp() } else { 0.0 };
                    sum += p[gi][j];
                }
                l[gi] = l[gi] * corr + sum;
                m[gi] = m_new;
                for o in out[gi * hd..(gi + 1) * hd].iter_mut() {
                    *o *= corr;
                }
            }
            // (g, hd) += p[g][j] * V row of key c + j, converted once per
            // piece of up to 64 elements for all g heads.
            let mut vf = [0.0f32; 64];
            for j in 0..n {
                let row = vb + (c + j) * kv_dim;
                for d0 in (0..hd).step_by(64) {
                    let w = 64.min(hd - d0);
                    for (f, &x) in vf.iter_mut().zip(&v[row + d0..row + d0 + w]) {
                        *f = cvt(x);
                    }
                    for gi in 0..g {
                        let pw = p[gi][j];
                        for (o, &x) in out[gi * hd + d0..gi * hd + d0 + w].iter_mut().zip(&vf[..w])
                        {
                            *o += pw * x;
                        }
                    }
                }
            }
        }
    }
    m_out[..g].copy_from_slice(&m[..g]);
    l_out[..g].copy_from_slice(&l[..g]);
}
