//! ggml's K-quant super-block formats (256 elements, 8 or 16 sub-blocks with
//! their own quantized scales): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
//!
//! ```text
//! Q2_K (84 B):  [scales: 16 x u8 (lo: scale, hi: min)][qs: 64 x u8 (2-bit)][d: f16][dmin: f16]
//!       x = d * (sc & 15) * q - dmin * (sc >> 4),   16 sub-blocks of 16
//! Q3_K (110 B): [hmask: 32 x u8][qs: 64 x u8 (2-bit low)][scales: 12 x u8 (16 x 6-bit)][d: f16]
//!       x = d * (scale - 32) * (q_lo - (hbit ? 0 : 4)),   16 sub-blocks of 16
//! Q4_K (144 B): [d: f16][dmin: f16][scales: 12 x u8 (8 x 6-bit scale, 8 x 6-bit min)][qs: 128 x u8]
//!       x = d * sc * q - dmin * m,   8 sub-blocks of 32
//! Q5_K (176 B): [d: f16][dmin: f16][scales: 12 x u8][qh: 32 x u8][qs: 128 x u8]
//!       x = d * sc * (q_lo | hbit << 4) - dmin * m
//! Q6_K (210 B): [ql: 128 x u8][qh: 64 x u8][scales: 16 x i8][d: f16]
//!       x = d * scale * ((q_lo | q_hi << 4) - 32),   16 sub-blocks of 16
//! ```
//!
//! Structs and sizes as in ggml-common.h
//! (<https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-common.h>,
//! `block_q2_K` ... `block_q6_K` and their `static_assert`s, with `QK_K = 256`); the dequantizers are
//! ggml-quants.c's `dequantize_row_q*_K` formulas, evaluated operation for
//! operation as gguf-py's `gguf.quants` does (`Q2_K.dequantize_blocks`, ...:
//! f32 products in the same order, no fused multiply-add), so they are
//! bit-identical to gguf-py (a C build that contracts to FMA may differ in the
//! last bit). Element `i`'s quant and sub-block are read by index arithmetic, one
//! element at a time: this is the reference, not a kernel.

use half::f16;

use super::{GgmlDType, QuantBlock};

/// Elements per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// Bytes of the packed 6-bit scales and mins of Q4_K / Q5_K (ggml's `K_SCALE_SIZE`).
pub const K_SCALE_SIZE: usize = 12;

/// Q2_K: 2-bit quants, 16 sub-blocks of 16 with 4-bit scale and min (ggml `block_q2_K`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ2K {
    /// Sub-block `j`: scale in the low nibble, min in the high nibble.
    pub scales: [u8; QK_K / 16],
    /// 2-bit quants: element `128 h + 32 k + l` is bits `2k..2k+2` of `qs[32 h + l]`.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the mins.
    pub dmin: f16,
}
const _: () = assert!(size_of::<BlockQ2K>() == 2 * 2 + QK_K / 16 + QK_K / 4);
const _: () = assert!(size_of::<BlockQ2K>() == 84);

/// Q3_K: 3-bit quants (2 low bits + 1 high bit), 16 sub-blocks of 16 with
/// 6-bit signed scales (ggml `block_q3_K`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ3K {
    /// High bits: element `i` is bit `i / 32` of `hmask[i % 32]`; a clear bit subtracts 4.
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits, packed as in Q2_K.
    pub qs: [u8; QK_K / 4],
    /// 16 6-bit scales (offset 32): low nibbles in bytes 0..8, high 2 bits in bytes 8..12.
    pub scales: [u8; 12],
    /// Super-block scale.
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ3K>() == 2 + QK_K / 4 + QK_K / 8 + 12);
const _: () = assert!(size_of::<BlockQ3K>() == 110);

/// Q4_K: 4-bit quants, 8 sub-blocks of 32 with 6-bit scale and min (ggml `block_q4_K`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ4K {
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the mins.
    pub dmin: f16,
    /// 8 scales and 8 mins, 6 bits each (see [`scale_min_k4`]).
    pub scales: [u8; K_SCALE_SIZE],
    /// Nibbles: element `64 j + l` is the low and `64 j + 32 + l` the high nibble of `qs[32 j + l]`.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 2 * 2 + K_SCALE_SIZE + QK_K / 2);
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// Q5_K: 5-bit quants (Q4_K's nibbles + 1 high bit), 8 sub-blocks of 32 with
/// 6-bit scale and min (ggml `block_q5_K`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ5K {
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the mins.
    pub dmin: f16,
    /// 8 scales and 8 mins, 6 bits each (see [`scale_min_k4`]).
    pub scales: [u8; K_SCALE_SIZE],
    /// High bits: element `i` is bit `i / 32` of `qh[i % 32]`.
    pub qh: [u8; QK_K / 8],
    /// Low nibbles, packed as in Q4_K.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 2 * 2 + K_SCALE_SIZE + QK_K / 2 + QK_K / 8);
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// Q6_K: 6-bit quants (4 low + 2 high bits), 16 sub-blocks of 16 with 8-bit
/// signed scales (ggml `block_q6_K`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ6K {
    /// Low nibbles: element `128 h + 64 s + l` is nibble `s` of `ql[64 h + l]`.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits: element `128 h + 32 k + l` is bits `2k..2k+2` of `qh[32 h + l]`.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ6K>() == 2 + QK_K / 16 + 3 * QK_K / 4);
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// Sub-block `j`'s 6-bit scale and min of Q4_K / Q5_K (ggml's `get_scale_min_k4`):
/// for `j < 4` the low 6 bits of bytes `j` and `j + 4`; for `j >= 4` a nibble of
/// byte `j + 4` with the top 2 bits of bytes `j - 4` and `j`.
pub fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    let j = j % 8;
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Writes `vals` to `out` (a shorter `out` gets a prefix).
fn write_prefix(out: &mut [f32], vals: &[f32; QK_K]) {
    for (o, &v) in out.iter_mut().zip(vals) {
        *o = v;
    }
}

/// 2 bits of a Q2_K/Q3_K-style `qs` for element `i`: bits `2k..2k+2` of
/// `qs[32 h + l]` with `i = 128 h + 32 k + l`.
pub(crate) fn two_bits(qs: &[u8; QK_K / 4], i: usize) -> u8 {
    let (h, k, l) = (i / 128 % 2, i % 128 / 32, i % 32);
    (qs[32 * h + l] >> (2 * k)) & 3
}

/// Nibble of a Q4_K/Q5_K-style `qs` for element `i`: nibble `s` of `qs[32 j + l]`
/// with `i = 64 j + 32 s + l`.
pub(crate) fn nibble(qs: &[u8; QK_K / 2], i: usize) -> u8 {
    let (j, s, l) = (i / 64 % 4, i % 64 / 32, i % 32);
    (qs[32 * j + l] >> (4 * s)) & 0x0F
}

impl QuantBlock for BlockQ2K {
    const DTYPE: GgmlDType = GgmlDType::Q2_K;
    const BLOCK_SIZE: usize = QK_K;

    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        let mut y = [0.0f32; QK_K];
        for (i, y) in y.iter_mut().enumerate() {
            let sc = self.scales[i / 16];
            let dl = d * (sc & 0x0F) as f32;
            let ml = dmin * (sc >> 4) as f32;
            *y = dl * two_bits(&self.qs, i) as f32 - ml;
        }
        write_prefix(out, &y);
    }
}

impl BlockQ3K {
    /// The 16 sub-block scales, unpacked to `-32..=31`.
    pub fn unpacked_scales(&self) -> [i8; 16] {
        let s = &self.scales;
        let mut out = [0i8; 16];
        for (j, o) in out.iter_mut().enumerate() {
            let lo = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
            let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
            *o = (lo | (hi << 4)) as i8 - 32;
        }
        out
    }
}

impl QuantBlock for BlockQ3K {
    const DTYPE: GgmlDType = GgmlDType::Q3_K;
    const BLOCK_SIZE: usize = QK_K;

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        let scales = self.unpacked_scales();
        let mut y = [0.0f32; QK_K];
        for (i, y) in y.iter_mut().enumerate() {
            let dl = d * scales[i / 16] as f32;
            let high = (self.hmask[i % 32] >> (i / 32)) & 1;
            let q = two_bits(&self.qs, i) as i8 - if high == 0 { 4 } else { 0 };
            *y = dl * q as f32;
        }
        write_prefix(out, &y);
    }
}

impl QuantBlock for BlockQ4K {
    const DTYPE: GgmlDType = GgmlDType::Q4_K;
    const BLOCK_SIZE: usize = QK_K;

    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        let mut y = [0.0f32; QK_K];
        for (i, y) in y.iter_mut().enumerate() {
            let (sc, m) = scale_min_k4(i / 32, &self.scales);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            *y = dl * nibble(&self.qs, i) as f32 - ml;
        }
        write_prefix(out, &y);
    }
}

impl QuantBlock for BlockQ5K {
    const DTYPE: GgmlDType = GgmlDType::Q5_K;
    const BLOCK_SIZE: usize = QK_K;

    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        let mut y = [0.0f32; QK_K];
        for (i, y) in y.iter_mut().enumerate() {
            let (sc, m) = scale_min_k4(i / 32, &self.scales);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let high = (self.qh[i % 32] >> (i / 32)) & 1;
            *y = dl * (nibble(&self.qs, i) | (high << 4)) as f32 - ml;
        }
        write_prefix(out, &y);
    }
}

impl QuantBlock for BlockQ6K {
    const DTYPE: GgmlDType = GgmlDType::Q6_K;
    const BLOCK_SIZE: usize = QK_K;

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        let mut y = [0.0f32; QK_K];
        for (i, y) in y.iter_mut().enumerate() {
            let (h, r) = (i / 128 % 2, i % 128);
            let lo = (self.ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
            let hi = (self.qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
            let q = (lo | (hi << 4)) as i8 - 32;
            let dl = d * self.scales[i / 16] as f32;
            *y = dl * q as f32;
        }
        write_prefix(out, &y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_offsets_match_ggml() {
        use std::mem::offset_of;
        assert_eq!(
            (
                offset_of!(BlockQ2K, qs),
                offset_of!(BlockQ2K, d),
                offset_of!(BlockQ2K, dmin)
            ),
            (16, 80, 82)
        );
        assert_eq!(
            (
                offset_of!(BlockQ3K, qs),
                offset_of!(BlockQ3K, scales),
                offset_of!(BlockQ3K, d)
            ),
            (32, 96, 108)
        );
        assert_eq!(
            (offset_of!(BlockQ4K, scales), offset_of!(BlockQ4K, qs)),
            (4, 16)
        );
        assert_eq!(
            (offset_of!(BlockQ5K, qh), offset_of!(BlockQ5K, qs)),
            (16, 48)
        );
        assert_eq!(
            (
                offset_of!(BlockQ6K, qh),
                offset_of!(BlockQ6K, scales),
                offset_of!(BlockQ6K, d)
            ),
            (128, 192, 208)
        );
    }

    #[test]
    fn hand_computed_q4_k_and_q6_k() {
        // Q4_K: sub-block 0 scale 2 / min 1, sub-block 5 scale 0x23 (from byte 9's
        // low nibble and byte 1's top bits) / min 0x14 (byte 9's high nibble, byte 5's top bits).
        let mut scales = [0u8; K_SCALE_SIZE];
        scales[0] = 2;
        scales[4] = 1;
        scales[1] = 0b1000_0000;
        scales[5] = 0b0100_0000;
        scales[9] = 0x43;
        assert_eq!(scale_min_k4(0, &scales), (2, 1));
        assert_eq!(scale_min_k4(5, &scales), (0x23, 0x14));
        let mut qs = [0u8; QK_K / 2];
        qs[0] = 0x5F; // element 0: 15, element 32: 5
        qs[32] = 0x70; // element 64: 0, element 96: 7
        let b = BlockQ4K {
            d: f16::from_f32(0.5),
            dmin: f16::from_f32(0.25),
            scales,
            qs,
        };
        let mut out = [f32::NAN; QK_K];
        b.dequantize(&mut out);
        assert_eq!(out[0], 0.5 * 2.0 * 15.0 - 0.25);
        assert_eq!(out[32], 0.0); // sub-block 1: scale 0, min 0
        assert_eq!(out[96], 0.0); // sub-block 3
        assert_eq!(out[160], -0.25 * 0x14 as f32); // sub-block 5, quant 0
                                                   // Q6_K: element 0 = (0xF | 3 << 4) - 32 = 31, element 255 = (0 | 0) - 32.
        let mut ql = [0u8; QK_K / 2];
        ql[0] = 0x0F;
        let mut qh = [0u8; QK_K / 4];
        qh[0] = 0x03;
        let mut sc = [1i8; 16];
        sc[15] = -2;
        let b = BlockQ6K {
            ql,
            qh,
            scales: sc,
            d: f16::from_f32(0.5),
        };
        b.dequantize(&mut out);
        assert_eq!((out[0], out[255]), (15.5, 32.0));
        // A short output gets a prefix.
        let mut short = [f32::NAN; 3];
        b.dequantize(&mut short);
        assert_eq!(short[0], 15.5);
    }
}
