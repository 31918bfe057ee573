//! ggml's non-linear "IQ" formats; so far IQ4_NL.
//!
//! ```text
//! IQ4_NL (18 B / 32 elems): [d: f16][qs: 16 x u8]
//!       x[j] = K[lo(qs[j])] * d,  x[j+16] = K[hi(qs[j])] * d,  K = KVALUES_IQ4NL
//! ```
//!
//! Struct and size as in ggml-common.h
//! (<https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-common.h>,
//! `block_iq4_nl`, `QK4_NL = 32`, and
//! `kvalues_iq4nl`); the dequantizer is ggml-quants.c's `dequantize_row_iq4_nl`
//! and gguf-py's `IQ4_NL.dequantize_blocks`, bit for bit.

use half::f16;

use super::{GgmlDType, QuantBlock, QK};

/// IQ4_NL's 16 levels (ggml's `kvalues_iq4nl`), indexed by a nibble.
pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_index_the_table() {
        let mut qs = [0x88u8; QK / 2];
        qs[0] = 0xF0; // element 0: K[0], element 16: K[15]
        let mut out = [f32::NAN; QK];
        BlockIQ4NL { d: f16::from_f32(0.5), qs }.dequantize(&mut out);
        assert_eq!((out[0], out[16], out[1]), (-63.5, 56.5, 0.5));
    }
}
