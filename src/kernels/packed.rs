//! Quantized weights repacked once at load into a column-interleaved layout
//! for the AVX-512 VNNI matmul, and the scalar reference of that kernel.
//!
//! Output columns (weight rows) are taken 16 at a time ("groups"; the last
//! group is zero-padded). A group stores all its scales first, then its
//! quants, 64-byte aligned:
//!
//! ```text
//! group g:  [d: nb x 16 f16][m: nb x 16 f16, Q4_1 only][qs: nb x QS bytes]  (padded to 64 B)
//! Q4_0/Q4_1 block qs (QS = 256): 4 vectors j = 0..3 of 64 B;
//!     vector j, bytes 4c..4c+4 = ggml qs[4j..4j+4] of column c
//!     (low nibbles: weights 4j..4j+3, high nibbles: weights 16+4j..16+4j+3)
//! Q8_0 block qs (QS = 512): 8 vectors j = 0..7 of 64 B;
//!     vector j, bytes 4c..4c+4 = ggml qs[4j..4j+4] of column c, plus 128 (as u8)
//! ```
//!
//! Every weight is thus an unsigned byte `u` with `w = d * u + m` per block
//! (`m = -8d` for Q4_0, `-128d` for Q8_0), so one `vpdpbusd` form serves all
//! three dtypes and the offset is applied through the activation block sum.
//! Sizes equal the ggml sizes (plus at most 63 bytes and one group of padding).

use half::f16;

use super::{BlockQ8, KernelError, QMatrix, QK, Q8_RESIDUAL_SCALE};
use crate::quant::{blocks, BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlDType};

/// Output columns per packed group (one 512-bit register of i32 lanes).
pub const GROUP: usize = 16;

/// Packed weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PackKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl PackKind {
    /// Quant bytes of one block of one group.
    pub(crate) const fn qs_bytes(self) -> usize {
        match self {
            PackKind::Q8_0 => GROUP * QK,
            _ => GROUP * QK / 2,
        }
    }

    /// Scale bytes (d, and m for Q4_1) of one block of one group.
    const fn scale_bytes(self) -> usize {
        match self {
            PackKind::Q4_1 => 2 * GROUP * 2,
            _ => GROUP * 2,
        }
    }
}

/// One 64-byte aligned line of packed storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A quantized weight matrix repacked for the AVX-512 VNNI kernel. Build it
/// once per weight at model load ([`PackedMatrix::for_current_isa`]) and
/// multiply with [`super::matmul_packed`] (or [`super::matmul_best`]).
pub struct PackedMatrix {
    pub(crate) kind: PackKind,
    /// Output features.
    rows: usize,
    /// Input features.
    cols: usize,
    /// Blocks per column.
    pub(crate) nb: usize,
    /// Bytes per group (multiple of 64).
    pub(crate) group_bytes: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("kind", &self.kind)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.size_bytes())
            .finish()
    }
}

impl PackedMatrix {
    /// Repacks `w` when this CPU's selected ISA ([`super::isa`]) has a kernel
    /// for the packed layout (AVX-512 VNNI) and `w` is Q4_0/Q4_1/Q8_0; `None`
    /// otherwise (then use [`super::matmul`] on the raw matrix).
    pub fn for_current_isa(w: &QMatrix<'_>) -> Option<Self> {
        if super::isa() != super::Isa::Avx512Vnni {
            return None;
        }
        Self::new(w).ok()
    }

    /// Repacks a Q4_0/Q4_1/Q8_0 matrix (any ISA; on CPUs without AVX-512 VNNI
    /// [`super::matmul_packed`] runs the scalar reference).
    pub fn new(w: &QMatrix<'_>) -> Result<Self, KernelError> {
        let kind = match w.dtype {
            GgmlDType::Q4_0 => PackKind::Q4_0,
            GgmlDType::Q4_1 => PackKind::Q4_1,
            GgmlDType::Q8_0 => PackKind::Q8_0,
            other => return Err(KernelError::UnsupportedDType(other)),
        };
        let nb = w.cols / QK;
        let group_bytes = (nb * (kind.scale_bytes() + kind.qs_bytes())).next_multiple_of(64);
        let n_groups = w.rows.div_ceil(GROUP);
        let mut lines = vec![Line([0; 64]); n_groups * group_bytes / 64];
        let mut p = Self { kind, rows: w.rows, cols: w.cols, nb, group_bytes, lines: Vec::new() };
        {
            let bytes = lines_as_bytes_mut(&mut lines);
            for o in 0..w.rows {
                let (g, c) = (o / GROUP, o % GROUP);
                let gb = &mut bytes[g * group_bytes..(g + 1) * group_bytes];
                // d (and m) of column c, block b: little-endian f16 as in the ggml block.
                fn put_f16(gb: &mut [u8], at: usize, x: f16) {
                    gb[at..at + 2].copy_from_slice(&x.to_le_bytes());
                }
                let qs_base = |b: usize| nb * kind.scale_bytes() + b * kind.qs_bytes();
                match kind {
                    PackKind::Q4_1 => {
                        for (b, blk) in blocks::<BlockQ4_1>(w.row(o)).enumerate() {
                            put_f16(gb, b * 32 + 2 * c, blk.d);
                            put_f16(gb, nb * 32 + b * 32 + 2 * c, blk.m);
                            for j in 0..4 {
                                let dst = qs_base(b) + j * 64 + 4 * c;
                                gb[dst..dst + 4].copy_from_slice(&blk.qs[4 * j..4 * j + 4]);
                            }
                        }
                    }
                    PackKind::Q4_0 => {
                        for (b, blk) in blocks::<BlockQ4_0>(w.row(o)).enumerate() {
                            put_f16(gb, b * 32 + 2 * c, blk.d);
                            for j in 0..4 {
                                let dst = qs_base(b) + j * 64 + 4 * c;
                                gb[dst..dst + 4].copy_from_slice(&blk.qs[4 * j..4 * j + 4]);
                            }
                        }
                    }
                    PackKind::Q8_0 => {
                        for (b, blk) in blocks::<BlockQ8_0>(w.row(o)).enumerate() {
                            put_f16(gb, b * 32 + 2 * c, blk.d);
                            for j in 0..8 {
                                let dst = qs_base(b) + j * 64 + 4 * c;
                                for k in 0..4 {
                                    gb[dst + k] = (blk.qs[4 * j + k] as u8) ^ 0x80;
                                }
                            }
                        }
                    }
                }
            }
        }
        p.lines = lines;
        Ok(p)
    }

    /// Output features (rows of the original matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of packed storage.
    pub fn size_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Number of 16-column groups.
    pub(crate) fn n_groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Packed bytes of group `g`.
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        &lines_as_bytes(&self.lines)[g * self.group_bytes..(g + 1) * self.group_bytes]
    }

    /// Dequantizes output column `o` (row `o` of the original matrix) into
    /// `out` (`cols` floats), bit-identical to dequantizing the ggml row: the
    /// embedding lookup of a tied output head reads the packed copy, so the
    /// mapped original never has to be resident.
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        assert!(o < self.rows && out.len() == self.cols, "dequantize_row: row {o} or length out of range");
        for (b, ob) in out.chunks_exact_mut(QK).enumerate() {
            let (d, m, u) = self.block(o, b);
            for (x, &q) in ob.iter_mut().zip(&u) {
                *x = match self.kind {
                    PackKind::Q4_0 => (q as i32 - 8) as f32 * d,
                    PackKind::Q4_1 => q as f32 * d + m,
                    PackKind::Q8_0 => (q as i32 - 128) as f32 * d,
                };
            }
        }
    }

    /// Block `b` of column `o`: `(d, m, u)` with weights `w[k] = d * u[k] + m`.
    pub(crate) fn block(&self, o: usize, b: usize) -> (f32, f32, [u8; QK]) {
        let (gb, c, nb) = (self.group(o / GROUP), o % GROUP, self.nb);
        let f16_at = |i: usize| f16::from_bits(u16::from_le_bytes([gb[i], gb[i + 1]])).to_f32();
        let d = f16_at(b * 32 + 2 * c);
        let m = match self.kind {
            PackKind::Q4_1 => f16_at(nb * 32 + b * 32 + 2 * c),
            PackKind::Q4_0 => d * -8.0,
            PackKind::Q8_0 => d * -128.0,
        };
        let qs = &gb[nb * self.kind.scale_bytes() + b * self.kind.qs_bytes()..];
        let mut u = [0u8; QK];
        for (k, uk) in u.iter_mut().enumerate() {
            let (j, i) = (k / 4, k % 4);
            *uk = match self.kind {
                PackKind::Q8_0 => qs[j * 64 + 4 * c + i],
                _ if j < 4 => qs[j * 64 + 4 * c + i] & 0x0F,
                _ => qs[(j - 4) * 64 + 4 * c + i] >> 4,
            };
        }
        (d, m, u)
    }
}

fn lines_as_bytes(lines: &[Line]) -> &[u8] {
    // SAFETY: `Line` is `repr(C)` over `[u8; 64]` with no padding (size 64),
    // so `lines.len() * 64` initialized bytes start at its pointer.
    unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const u8, lines.len() * 64) }
}

fn lines_as_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: as in `lines_as_bytes`; the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) }
}

const _: () = assert!(std::mem::size_of::<Line>() == 64);

/// Scalar reference of the packed kernel for output column `o` and one Q8
/// activation row: the same operations in the same order as the AVX-512
/// kernel (exact integer block sums, then two fused multiply-adds per block),
/// so results are bit-identical.
pub(super) fn ref_dot(p: &PackedMatrix, o: usize, x: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, xb) in x.iter().enumerate().take(p.nb) {
        let (d, m, u) = p.block(o, b);
        let (mut s1, mut s2) = (0i32, 0i32);
        for k in 0..QK {
            s1 += u[k] as i32 * xb.qs[k] as i32;
            s2 += u[k] as i32 * xb.qr[k] as i32;
        }
        let isum = (s1 << 7) + s2;
        let sc = d * (xb.d * (1.0 / Q8_RESIDUAL_SCALE));
        acc = (isum as f32).mul_add(sc, acc);
        acc = m.mul_add(xb.s, acc);
    }
    acc
}
