//! ggml's original 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! ```text
//! Q4_0 (18 B / 32 elems): [d: f16][qs: 16 x u8]
//!       x[j] = (lo(qs[j]) - 8) * d,  x[j+16] = (hi(qs[j]) - 8) * d
//! Q4_1 (20 B / 32 elems): [d: f16][m: f16][qs: 16 x u8]
//!       x[j] = lo(qs[j]) * d + m,    x[j+16] = hi(qs[j]) * d + m
//! Q5_0 (22 B / 32 elems): [d: f16][qh: 4 x u8 (u32 LE)][qs: 16 x u8]
//!       x[j] = (lo(qs[j]) | bit_j(qh) << 4) - 16) * d,  x[j+16] = (hi(qs[j]) | bit_{j+16}(qh) << 4) - 16) * d
//! Q5_1 (24 B / 32 elems): [d: f16][m: f16][qh: 4 x u8][qs: 16 x u8]
//!       x[j] = (lo(qs[j]) | bit_j(qh) << 4) * d + m,  likewise x[j+16]
//! Q8_0 (34 B / 32 elems): [d: f16][qs: 32 x i8]
//!       x[j] = qs[j] * d
//! ```
//!
//! (`lo`/`hi`: the low and high nibble.) Structs and sizes as in ggml-common.h
//! (`block_q4_0`, `block_q4_1`, `block_q5_0`, `block_q5_1`, `block_q8_0` and their
//! `static_assert`s); the dequantizers are ggml-quants.c's `dequantize_row_*`
//! (and gguf-py's `dequantize_blocks`), the quantizers (under `test-support`) its
//! `quantize_row_*_ref`, bit for bit.

use half::f16;

#[cfg(any(test, feature = "test-support"))]
use super::reference::QuantizeBlock;
use super::{GgmlDType, QuantBlock, QK};

/// Q4_0: 32 weights `(q - 8) * d` with 4-bit `q` (ggml `block_q4_0`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Nibbles: `qs[j]` holds element `j` (low) and `j + 16` (high).
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// Q4_1: 32 weights `q * d + m` with 4-bit `q` (ggml `block_q4_1`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset).
    pub m: f16,
    /// Nibbles: `qs[j]` holds element `j` (low) and `j + 16` (high).
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// Q5_0: 32 weights `(q - 16) * d` with 5-bit `q` (ggml `block_q5_0`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: f16,
    /// Fifth bits: bit `j` of the little-endian u32 is element `j`'s bit 4.
    pub qh: [u8; 4],
    /// Low nibbles: `qs[j]` holds element `j` (low) and `j + 16` (high).
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// Q5_1: 32 weights `q * d + m` with 5-bit `q` (ggml `block_q5_1`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset).
    pub m: f16,
    /// Fifth bits: bit `j` of the little-endian u32 is element `j`'s bit 4.
    pub qh: [u8; 4],
    /// Low nibbles: `qs[j]` holds element `j` (low) and `j + 16` (high).
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// The 32 five-bit quants of a Q5_0/Q5_1 block, in element order.
pub(crate) fn five_bit_quants(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for (j, &b) in qs.iter().enumerate() {
        q[j] = (b & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (b >> 4) | ((((qh >> (j + QK / 2)) & 1) as u8) << 4);
    }
    q
}

/// Q8_0: 32 weights `q * d` with 8-bit signed `q` (ggml `block_q8_0`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quants.
    pub qs: [i8; QK],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

impl QuantBlock for BlockQ4_0 {
    const DTYPE: GgmlDType = GgmlDType::Q4_0;
    const BLOCK_SIZE: usize = QK;

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        let (lo, hi) = out.split_at_mut(out.len().min(QK / 2));
        for (j, &q) in self.qs.iter().enumerate() {
            if let Some(o) = lo.get_mut(j) {
                *o = ((q & 0x0F) as i32 - 8) as f32 * d;
            }
            if let Some(o) = hi.get_mut(j) {
                *o = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl QuantizeBlock for BlockQ4_0 {
    fn quantize(x: &[f32]) -> Self {
        let x = block_values(x);
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in &x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            let x0 = x[j] * id;
            let x1 = x[QK / 2 + j] * id;
            // C: MIN(15, (int8_t)(x + 8.5f)); the cast truncates toward zero.
            let xi0 = ((x0 + 8.5) as i8).min(15) as u8;
            let xi1 = ((x1 + 8.5) as i8).min(15) as u8;
            *q = (xi0 & 0x0F) | (xi1 << 4);
        }
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }
}

impl QuantBlock for BlockQ4_1 {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BLOCK_SIZE: usize = QK;

    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        let (lo, hi) = out.split_at_mut(out.len().min(QK / 2));
        for (j, &q) in self.qs.iter().enumerate() {
            if let Some(o) = lo.get_mut(j) {
                *o = (q & 0x0F) as f32 * d + m;
            }
            if let Some(o) = hi.get_mut(j) {
                *o = (q >> 4) as f32 * d + m;
            }
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl QuantizeBlock for BlockQ4_1 {
    fn quantize(x: &[f32]) -> Self {
        let x = block_values(x);
        let mut min = f32::MAX;
        let mut max = -f32::MAX;
        for &v in &x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            let x0 = (x[j] - min) * id;
            let x1 = (x[QK / 2 + j] - min) * id;
            let xi0 = ((x0 + 0.5) as i8).min(15) as u8;
            let xi1 = ((x1 + 0.5) as i8).min(15) as u8;
            *q = (xi0 & 0x0F) | (xi1 << 4);
        }
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qs,
        }
    }
}

impl QuantBlock for BlockQ5_0 {
    const DTYPE: GgmlDType = GgmlDType::Q5_0;
    const BLOCK_SIZE: usize = QK;

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, q) in out.iter_mut().zip(five_bit_quants(self.qh, &self.qs)) {
            *o = d * (q as i32 - 16) as f32;
        }
    }
}

impl QuantBlock for BlockQ5_1 {
    const DTYPE: GgmlDType = GgmlDType::Q5_1;
    const BLOCK_SIZE: usize = QK;

    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (o, q) in out.iter_mut().zip(five_bit_quants(self.qh, &self.qs)) {
            *o = d * q as f32 + m;
        }
    }
}

/// Packs 32 five-bit quants into Q5_0/Q5_1's `qh` and `qs` (ggml's layout).
#[cfg(any(test, feature = "test-support"))]
fn pack_five_bit(q: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qh = 0u32;
    let mut qs = [0u8; QK / 2];
    for (j, b) in qs.iter_mut().enumerate() {
        let (x0, x1) = (q[j], q[j + QK / 2]);
        *b = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= u32::from((x0 & 0x10) >> 4) << j;
        qh |= u32::from((x1 & 0x10) >> 4) << (j + QK / 2);
    }
    (qh.to_le_bytes(), qs)
}

#[cfg(any(test, feature = "test-support"))]
impl QuantizeBlock for BlockQ5_0 {
    fn quantize(x: &[f32]) -> Self {
        let x = block_values(x);
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in &x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(&x) {
            // C: MIN(31, (int8_t)(x * id + 16.5f)); the cast truncates toward zero.
            *q = ((v * id + 16.5) as i8).min(31) as u8;
        }
        let (qh, qs) = pack_five_bit(&q);
        Self {
            d: f16::from_f32(d),
            qh,
            qs,
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl QuantizeBlock for BlockQ5_1 {
    fn quantize(x: &[f32]) -> Self {
        let x = block_values(x);
        let mut min = f32::MAX;
        let mut max = -f32::MAX;
        for &v in &x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(&x) {
            // C: (uint8_t)((x - min) * id + 0.5f)
            *q = (((v - min) * id + 0.5) as u8).min(31);
        }
        let (qh, qs) = pack_five_bit(&q);
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qh,
            qs,
        }
    }
}

impl QuantBlock for BlockQ8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BLOCK_SIZE: usize = QK;

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl QuantizeBlock for BlockQ8_0 {
    fn quantize(x: &[f32]) -> Self {
        let x = block_values(x);
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(&x) {
            // C: roundf (half away from zero), stored into int8_t.
            *q = (v * id).round() as i8;
        }
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }
}

/// The first `QK` values of `x`, zero-padded.
#[cfg(any(test, feature = "test-support"))]
fn block_values(x: &[f32]) -> [f32; QK] {
    let mut out = [0.0f32; QK];
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_ggml_byte_order() {
        // d first (little-endian f16), then m (Q4_1), then the quants.
        let b = BlockQ4_1 {
            d: f16::from_bits(0x0201),
            m: f16::from_bits(0x0403),
            qs: [0x55; 16],
        };
        let bytes = bytemuck::bytes_of(&b);
        assert_eq!(&bytes[..5], &[0x01, 0x02, 0x03, 0x04, 0x55]);
        assert_eq!(std::mem::offset_of!(BlockQ4_0, qs), 2);
        assert_eq!(std::mem::offset_of!(BlockQ8_0, qs), 2);
        assert_eq!(
            (
                std::mem::offset_of!(BlockQ5_0, qh),
                std::mem::offset_of!(BlockQ5_0, qs)
            ),
            (2, 6)
        );
        assert_eq!(
            (
                std::mem::offset_of!(BlockQ5_1, qh),
                std::mem::offset_of!(BlockQ5_1, qs)
            ),
            (4, 8)
        );
    }

    #[test]
    fn hand_computed_blocks() {
        let mut qs = [0u8; 16];
        qs[0] = 0xF0; // element 0: 0 - 8, element 16: 15 - 8
        let mut out = [f32::NAN; QK];
        BlockQ4_0 {
            d: f16::from_f32(0.5),
            qs,
        }
        .dequantize(&mut out);
        assert_eq!((out[0], out[16], out[1]), (-4.0, 3.5, -4.0));
        BlockQ4_1 {
            d: f16::from_f32(0.5),
            m: f16::from_f32(1.0),
            qs,
        }
        .dequantize(&mut out);
        assert_eq!((out[0], out[16], out[1]), (1.0, 8.5, 1.0));
        let mut q8 = [0i8; QK];
        q8[31] = -128;
        BlockQ8_0 {
            d: f16::from_f32(0.25),
            qs: q8,
        }
        .dequantize(&mut out);
        assert_eq!((out[0], out[31]), (0.0, -32.0));
        // Q5: bit 16 of qh gives element 16 its fifth bit: 15 + 16 = 31.
        let qh = [0, 0, 1, 0];
        BlockQ5_0 {
            d: f16::from_f32(0.5),
            qh,
            qs,
        }
        .dequantize(&mut out);
        assert_eq!((out[0], out[16], out[1]), (-8.0, 7.5, -8.0));
        BlockQ5_1 {
            d: f16::from_f32(0.5),
            m: f16::from_f32(1.0),
            qh,
            qs,
        }
        .dequantize(&mut out);
        assert_eq!((out[0], out[16], out[1]), (1.0, 16.5, 1.0));
    }
}
