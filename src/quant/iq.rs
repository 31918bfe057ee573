//! ggml's non-linear "IQ" formats; so far the two 4-bit ones, IQ4_NL and IQ4_XS.
//!
//! ```text
//! IQ4_NL (18 B / 32 elems):  [d: f16][qs: 16 x u8]
//!       x[j] = K[lo(qs[j])] * d,  x[j+16] = K[hi(qs[j])] * d,  K = KVALUES_IQ4NL
//! IQ4_XS (136 B / 256 elems): [d: f16][scales_h: u16][scales_l: 4 x u8][qs: 128 x u8]
//!       8 sub-blocks of 32, each IQ4_NL-like with scale d * (6-bit scale - 32)
//! ```
//!
//! Struct and size as in ggml-common.h
//! (<https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-common.h>,
//! `block_iq4_nl`, `QK4_NL = 32`, `block_iq4_xs`, and
//! `kvalues_iq4nl`); the dequantizers are ggml-quants.c's
//! `dequantize_row_iq4_nl` / `_iq4_xs`, evaluated as gguf-py's
//! `IQ4_NL.dequantize_blocks` / `IQ4_XS.dequantize_blocks` do, bit for bit.

use half::f16;

use super::{GgmlDType, QuantBlock, QK, QK_K};

/// IQ4_NL's 16 levels (ggml's `kvalues_iq4nl`), indexed by a nibble.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// IQ4_NL: 32 weights `K[q] * d` with 4-bit indices `q` into [`KVALUES_IQ4NL`]
/// (ggml `block_iq4_nl`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockIQ4NL {
    /// Scale.
    pub d: f16,
    /// Nibbles: `qs[j]` holds element `j` (low) and `j + 16` (high).
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockIQ4NL>() == 18);

impl QuantBlock for BlockIQ4NL {
    const DTYPE: GgmlDType = GgmlDType::IQ4_NL;
    const BLOCK_SIZE: usize = QK;

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        let (lo, hi) = out.split_at_mut(out.len().min(QK / 2));
        for (j, &q) in self.qs.iter().enumerate() {
            if let Some(o) = lo.get_mut(j) {
                *o = d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
            }
            if let Some(o) = hi.get_mut(j) {
                *o = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
            }
        }
    }
}

/// IQ4_XS: 8 sub-blocks of 32 IQ4_NL-style indices with 6-bit signed
/// sub-block scales (ggml `block_iq4_xs`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockIQ4XS {
    /// Super-block scale.
    pub d: f16,
    /// High 2 bits of the scales: sub-block `j` is bits `2j..2j+2`.
    pub scales_h: u16,
    /// Low 4 bits of the scales: sub-block `j` is nibble `j % 2` of `scales_l[j / 2]`.
    pub scales_l: [u8; QK_K / 64],
    /// Nibbles: sub-block `j`'s element `l` / `l + 16` is the low / high nibble of `qs[16 j + l]`.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockIQ4XS>() == 2 + 2 + QK_K / 64 + QK_K / 2);
const _: () = assert!(size_of::<BlockIQ4XS>() == 136);

impl QuantBlock for BlockIQ4XS {
    const DTYPE: GgmlDType = GgmlDType::IQ4_XS;
    const BLOCK_SIZE: usize = QK_K;

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (i, o) in out.iter_mut().enumerate().take(QK_K) {
            let (j, s, l) = (i / 32, i % 32 / 16, i % 16);
            let lo = (self.scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
            let hi = ((self.scales_h >> (2 * j)) & 3) as u8;
            let dl = d * ((lo | (hi << 4)) as i8 - 32) as f32;
            let q = (self.qs[16 * j + l] >> (4 * s)) & 0x0F;
            *o = dl * KVALUES_IQ4NL[q as usize] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_index_the_table() {
        let mut qs = [0x88u8; QK / 2];
        qs[0] = 0xF0; // element 0: K[0], element 16: K[15]
        let mut out = [f32::NAN; QK];
        BlockIQ4NL {
            d: f16::from_f32(0.5),
            qs,
        }
        .dequantize(&mut out);
        assert_eq!((out[0], out[16], out[1]), (-63.5, 56.5, 0.5));
    }

    #[test]
    fn iq4_xs_scales_and_nibbles() {
        assert_eq!(std::mem::offset_of!(BlockIQ4XS, qs), 8);
        // Sub-block 1: scale (0x1 | 0b10 << 4) - 32 = 1; sub-block 0: 0 - 32.
        let mut qs = [0x88u8; QK_K / 2];
        qs[16] = 0xF0; // sub-block 1, element 32: K[0], element 48: K[15]
        let b = BlockIQ4XS {
            d: f16::from_f32(0.5),
            scales_h: 0b10 << 2,
            scales_l: [0x10, 0, 0, 0],
            qs,
        };
        let mut out = [f32::NAN; QK_K];
        b.dequantize(&mut out);
        assert_eq!(
            (out[0], out[32], out[48], out[33]),
            (-16.0, -63.5, 56.5, 0.5)
        );
    }
}
