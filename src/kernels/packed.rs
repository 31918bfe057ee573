//! Quantized weights repacked once at load into a column-interleaved layout
//! for the AVX-512 VNNI matmul, and the scalar reference of that kernel.
//!
//! Output columns (weight rows) are taken 16 at a time ("groups"; the last
//! group is zero-padded). A group stores the super-block scales of the
//! K-quant kinds first, then one record per 32-element block, 64-byte
//! aligned as a whole:
//!
//! ```text
//! group g:  [super: nb/8 x SUP bytes][record b = 0..nb: scales | quants | high planes]  (padded to 64 B)
//! scales (per 16 columns):
//!   Q4_0, Q5_0, Q8_0, IQ4_NL: d: 16 x f16                     (w = d * (u - z))
//!   Q4_1, Q5_1:               d: 16 x f16, m: 16 x f16         (w = d * u + m)
//!   Q4_K, Q5_K:  sc: 16 x u8, mn: 16 x u8; super: d, dmin: 16 x f16 each
//!                (w = (d*sc) * u - dmin*mn, the two products exact in f32)
//!   Q6_K:        sc: 2 x 16 x i8 (halves 0..16, 16..32); super: d: 16 x f16
//!                (w = (d*sc_h) * (u - 32))
//!   Q3_K:        sc: 2 x 16 x i8 (6-bit scale - 32, per half); super: d: 16 x f16
//!                (w = (d*sc_h) * (u - 4))
//!   Q2_K:        sm: 2 x 16 x u8 (per half: scale | min << 4, ggml's byte);
//!                super: d, dmin: 16 x f16 each   (w = (d*sc_h) * u - dmin*mn_h)
//!   IQ4_XS:      sc: 16 x i8 (6-bit scale - 32); super: d: 16 x f16   (w = (d*sc) * K[q])
//! quants: nibbles (4-bit and wider kinds but Q8_0, 256 B): 4 vectors j = 0..3 of 64 B;
//!     vector j, bytes 4c..4c+4: weights 4j..4j+3 of column c in the low
//!     nibbles, weights 16+4j..16+4j+3 in the high nibbles (ggml's Q4_0 order)
//!   bytes (Q8_0, 512 B): 8 vectors j of 64 B, bytes 4c..4c+4 = weights
//!     4j..4j+3 of column c, plus 128 (as u8)
//!   crumbs (Q2_K, Q3_K, 128 B): 2 vectors v = 0..1 of 64 B; vector v, byte
//!     4c+i, bits 2s..2s+2: weight 4(4v+s)+i of column c
//! high planes (Q5_*: 1, Q6_K: 2, Q3_K: 1; 64 B each): plane p is 8 u64 masks,
//!   one per weight vector j = 0..7 (weights 4j..4j+3, 16 columns): bit 4c+i
//!   is bit b+p of weight 4j+i of column c, b = 4 after nibbles, 2 after
//!   crumbs (applied with a masked byte add)
//! ```
//!
//! Every weight is thus an unsigned byte `u` (IQ4: the table value plus 128,
//! looked up from the nibble in the kernel) with `w = d * u + m` per block,
//! or per 16-element half for Q6_K; one `vpdpbusd` form serves every kind and
//! the offset is applied through the activation block sum (Q6_K: half-block
//! sums, computed once per call). Q6_K, Q3_K and Q2_K accumulate their two
//! halves in separate integer sums.
//!
//! Size in bytes per weight, packed vs GGUF (the packed copy replaces the
//! mapped one in memory): Q4_0 0.5625 = 0.5625, Q4_1 0.625 = 0.625, Q5_0
//! 0.6875 = 0.6875, Q5_1 0.75 = 0.75, Q8_0 1.0625 = 1.0625, Q4_K 0.5781 vs
//! 0.5625 (+2.8%: sub-block scales and mins stored as bytes), Q5_K 0.7031 vs
//! 0.6875 (+2.3%), Q6_K 0.8203 = 0.8203, IQ4_NL 0.5625 = 0.5625,
//! IQ4_XS 0.5391 vs 0.5313 (+1.5%), Q3_K 0.4453 vs 0.4297 (+3.6%: sub-block
//! scales as bytes), Q2_K 0.3281 = 0.3281; plus at most 63 bytes per group
//! and the zero padding of the last group.

use half::f16;

use super::scalar::{half_sums, iq4_xs_scale, q6_k_quant};
use super::{BlockQ8, KernelError, QMatrix, Q8_RESIDUAL_SCALE, QK};
use crate::quant::iq::KVALUES_IQ4NL;
use crate::quant::k_quants::{nibble, scale_min_k4, two_bits};
use crate::quant::legacy::five_bit_quants;
use crate::quant::{
    blocks, BlockIQ4NL, BlockIQ4XS, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K,
    BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, GgmlDType, QK_K,
};

/// Output columns per packed group (one 512-bit register of i32 lanes).
pub const GROUP: usize = 16;

/// 32-element blocks per K-quant super-block.
const SUB: usize = QK_K / QK;

/// Packed weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum PackKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
    Q3K,
    Q2K,
}

impl PackKind {
    /// The packed kind of a dtype (`None`: no packed kernel).
    pub(crate) fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => PackKind::Q4_0,
            GgmlDType::Q4_1 => PackKind::Q4_1,
            GgmlDType::Q5_0 => PackKind::Q5_0,
            GgmlDType::Q5_1 => PackKind::Q5_1,
            GgmlDType::Q8_0 => PackKind::Q8_0,
            GgmlDType::Q4_K => PackKind::Q4K,
            GgmlDType::Q5_K => PackKind::Q5K,
            GgmlDType::Q6_K => PackKind::Q6K,
            GgmlDType::IQ4_NL => PackKind::IQ4NL,
            GgmlDType::IQ4_XS => PackKind::IQ4XS,
            GgmlDType::Q3_K => PackKind::Q3K,
            GgmlDType::Q2_K => PackKind::Q2K,
            _ => return None,
        })
    }

    /// The kind whose discriminant is `k` (the const parameter of the
    /// specialised AVX-512 kernel; an unknown value is Q4_0's, never produced).
    pub(crate) const fn from_u8(k: u8) -> Self {
        const ALL: [PackKind; 12] = [
            PackKind::Q4_0,
            PackKind::Q4_1,
            PackKind::Q5_0,
            PackKind::Q5_1,
            PackKind::Q8_0,
            PackKind::Q4K,
            PackKind::Q5K,
            PackKind::Q6K,
            PackKind::IQ4NL,
            PackKind::IQ4XS,
            PackKind::Q3K,
            PackKind::Q2K,
        ];
        let mut i = 0;
        while i < ALL.len() {
            if ALL[i] as u8 == k {
                return ALL[i];
            }
            i += 1;
        }
        PackKind::Q4_0
    }

    /// Zero point `z` of the symmetric kinds (`w = d * (u - z)`); `None` for
    /// the kinds with a stored offset.
    pub(crate) const fn zero(self) -> Option<u8> {
        match self {
            PackKind::Q4_0 => Some(8),
            PackKind::Q5_0 => Some(16),
            PackKind::Q6K => Some(32),
            PackKind::Q3K => Some(4),
            PackKind::Q8_0 | PackKind::IQ4NL | PackKind::IQ4XS => Some(128),
            PackKind::Q4_1 | PackKind::Q5_1 | PackKind::Q4K | PackKind::Q5K | PackKind::Q2K => None,
        }
    }

    /// Quants are whole bytes (else nibbles plus high planes).
    pub(crate) const fn byte_quants(self) -> bool {
        matches!(self, PackKind::Q8_0)
    }

    /// Quants are 2-bit crumbs (else nibbles or bytes).
    pub(crate) const fn crumb_quants(self) -> bool {
        matches!(self, PackKind::Q2K | PackKind::Q3K)
    }

    /// Bits of the low part (bytes, nibbles or crumbs) of each quant: the
    /// first high plane holds the next bit.
    pub(crate) const fn low_bits(self) -> u32 {
        if self.byte_quants() {
            8
        } else if self.crumb_quants() {
            2
        } else {
            4
        }
    }

    /// Bytes of the low part of the quants of one block record (16 columns).
    pub(crate) const fn low_bytes(self) -> usize {
        GROUP * QK * self.low_bits() as usize / 8
    }

    /// Number of 64-byte high-bit planes after the nibbles or crumbs.
    pub(crate) const fn high_planes(self) -> usize {
        match self {
            PackKind::Q5_0 | PackKind::Q5_1 | PackKind::Q5K | PackKind::Q3K => 1,
            PackKind::Q6K => 2,
            _ => 0,
        }
    }

    /// Nibbles index the IQ4 table.
    pub(crate) const fn table(self) -> bool {
        matches!(self, PackKind::IQ4NL | PackKind::IQ4XS)
    }

    /// Number of 16-element halves with their own scale and offset (1 or 2).
    pub(crate) const fn halves(self) -> usize {
        match self {
            PackKind::Q6K | PackKind::Q3K | PackKind::Q2K => 2,
            _ => 1,
        }
    }

    /// Scale bytes at the start of one block record.
    pub(crate) const fn scale_bytes(self) -> usize {
        match self {
            PackKind::Q4_1 | PackKind::Q5_1 => 2 * GROUP * 2,
            PackKind::IQ4XS => GROUP,
            _ => GROUP * 2,
        }
    }

    /// Quant bytes (bytes, nibbles or crumbs, then high planes) of one block record.
    pub(crate) const fn qs_bytes(self) -> usize {
        self.low_bytes() + 64 * self.high_planes()
    }

    /// Bytes of one block record (all 16 columns).
    pub(crate) const fn record_bytes(self) -> usize {
        self.scale_bytes() + self.qs_bytes()
    }

    /// Super-block scale bytes per 8 blocks (K-quant kinds; 0 otherwise).
    pub(crate) const fn super_bytes(self) -> usize {
        match self {
            PackKind::Q4K | PackKind::Q5K | PackKind::Q2K => 2 * GROUP * 2,
            PackKind::Q6K | PackKind::IQ4XS | PackKind::Q3K => GROUP * 2,
            _ => 0,
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

/// Writes a little-endian f16 at `gb[at..at + 2]`.
fn put_f16(gb: &mut [u8], at: usize, x: f16) {
    gb[at..at + 2].copy_from_slice(&x.to_le_bytes());
}

/// Writes the 32 stored quants `u` of column `c` into the quant part of a
/// block record at `gb[at..]` (layout in the module doc).
fn put_quants(kind: PackKind, gb: &mut [u8], at: usize, c: usize, u: &[u8; QK]) {
    if kind.byte_quants() {
        for j in 0..8 {
            gb[at + j * 64 + 4 * c..at + j * 64 + 4 * c + 4].copy_from_slice(&u[4 * j..4 * j + 4]);
        }
        return;
    }
    if kind.crumb_quants() {
        for v in 0..2 {
            for i in 0..4 {
                gb[at + v * 64 + 4 * c + i] = (0..4).fold(0, |byte, s| {
                    byte | ((u[4 * (4 * v + s) + i] & 3) << (2 * s))
                });
            }
        }
    } else {
        for j in 0..4 {
            for i in 0..4 {
                gb[at + j * 64 + 4 * c + i] = (u[4 * j + i] & 0x0F) | (u[16 + 4 * j + i] << 4);
            }
        }
    }
    for p in 0..kind.high_planes() {
        for j in 0..8 {
            let mask_at = at + kind.low_bytes() + 64 * p + 8 * j;
            let mut mask = u64::from_le_bytes(std::array::from_fn(|i| gb[mask_at + i]));
            for i in 0..4 {
                mask |=
                    (((u[4 * j + i] >> (kind.low_bits() as usize + p)) & 1) as u64) << (4 * c + i);
            }
            gb[mask_at..mask_at + 8].copy_from_slice(&mask.to_le_bytes());
        }
    }
}

impl PackedMatrix {
    /// The dtypes with a packed kernel (for error messages).
    pub const SUPPORTED: &'static str =
        "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS";

    /// Repacks `w` when this CPU's selected ISA ([`super::isa`]) has a kernel
    /// for the packed layout (AVX-512 VNNI) and `w`'s dtype has a packed kind
    /// ([`PackedMatrix::SUPPORTED`]); `None` otherwise (then use
    /// [`super::matmul`] on the raw matrix).
    pub fn for_current_isa(w: &QMatrix<'_>) -> Option<Self> {
        if super::isa() != super::Isa::Avx512Vnni {
            return None;
        }
        Self::new(w).ok()
    }

    /// Repacks a matrix of one of the [`PackedMatrix::SUPPORTED`] dtypes (any
    /// ISA; on CPUs without AVX-512 VNNI [`super::matmul_packed`] runs the
    /// scalar reference).
    pub fn new(w: &QMatrix<'_>) -> Result<Self, KernelError> {
        let kind = PackKind::of(w.dtype).ok_or(KernelError::UnsupportedDType(w.dtype))?;
        let nb = w.cols / QK;
        let n_super = if kind.super_bytes() > 0 { nb / SUB } else { 0 };
        let rec0 = n_super * kind.super_bytes();
        let rb = kind.record_bytes();
        let group_bytes = (rec0 + nb * rb).next_multiple_of(64);
        let n_groups = w.rows.div_ceil(GROUP);
        let mut lines = vec![Line([0; 64]); n_groups * group_bytes / 64];
        let bytes = lines_as_bytes_mut(&mut lines);
        let sb = kind.scale_bytes();
        for o in 0..w.rows {
            let (g, c) = (o / GROUP, o % GROUP);
            let gb = &mut bytes[g * group_bytes..(g + 1) * group_bytes];
            let rec = |b: usize| rec0 + b * rb;
            let sup = |s: usize| s * kind.super_bytes();
            let row = w.row(o);
            match kind {
                PackKind::Q4_0 => {
                    for (b, blk) in blocks::<BlockQ4_0>(row).enumerate() {
                        put_f16(gb, rec(b) + 2 * c, blk.d);
                        put_quants(
                            kind,
                            gb,
                            rec(b) + sb,
                            c,
                            &std::array::from_fn(|k| nib32(&blk.qs, k)),
                        );
                    }
                }
                PackKind::IQ4NL => {
                    for (b, blk) in blocks::<BlockIQ4NL>(row).enumerate() {
                        put_f16(gb, rec(b) + 2 * c, blk.d);
                        put_quants(
                            kind,
                            gb,
                            rec(b) + sb,
                            c,
                            &std::array::from_fn(|k| nib32(&blk.qs, k)),
                        );
                    }
                }
                PackKind::Q4_1 => {
                    for (b, blk) in blocks::<BlockQ4_1>(row).enumerate() {
                        put_f16(gb, rec(b) + 2 * c, blk.d);
                        put_f16(gb, rec(b) + 32 + 2 * c, blk.m);
                        put_quants(
                            kind,
                            gb,
                            rec(b) + sb,
                            c,
                            &std::array::from_fn(|k| nib32(&blk.qs, k)),
                        );
                    }
                }
                PackKind::Q5_0 => {
                    for (b, blk) in blocks::<BlockQ5_0>(row).enumerate() {
                        put_f16(gb, rec(b) + 2 * c, blk.d);
                        put_quants(kind, gb, rec(b) + sb, c, &five_bit_quants(blk.qh, &blk.qs));
                    }
                }
                PackKind::Q5_1 => {
                    for (b, blk) in blocks::<BlockQ5_1>(row).enumerate() {
                        put_f16(gb, rec(b) + 2 * c, blk.d);
                        put_f16(gb, rec(b) + 32 + 2 * c, blk.m);
                        put_quants(kind, gb, rec(b) + sb, c, &five_bit_quants(blk.qh, &blk.qs));
                    }
                }
                PackKind::Q8_0 => {
                    for (b, blk) in blocks::<BlockQ8_0>(row).enumerate() {
                        put_f16(gb, rec(b) + 2 * c, blk.d);
                        put_quants(
                            kind,
                            gb,
                            rec(b) + sb,
                            c,
                            &std::array::from_fn(|k| (blk.qs[k] as u8) ^ 0x80),
                        );
                    }
                }
                PackKind::Q4K | PackKind::Q5K => {
                    // Q4_K and Q5_K share the header (d, dmin, scales); Q5_K adds qh.
                    let (hdr, qh): (
                        Vec<(f16, f16, [u8; 12], [u8; QK_K / 2])>,
                        Vec<[u8; QK_K / 8]>,
                    ) = if kind == PackKind::Q4K {
                        blocks::<BlockQ4K>(row)
                            .map(|b| ((b.d, b.dmin, b.scales, b.qs), [0; QK_K / 8]))
                            .unzip()
                    } else {
                        blocks::<BlockQ5K>(row)
                            .map(|b| ((b.d, b.dmin, b.scales, b.qs), b.qh))
                            .unzip()
                    };
                    for (s, ((d, dmin, scales, qs), qh)) in hdr.iter().zip(&qh).enumerate() {
                        put_f16(gb, sup(s) + 2 * c, *d);
                        put_f16(gb, sup(s) + 32 + 2 * c, *dmin);
                        for j in 0..SUB {
                            let b = s * SUB + j;
                            let (sc, mn) = scale_min_k4(j, scales);
                            gb[rec(b) + c] = sc;
                            gb[rec(b) + GROUP + c] = mn;
                            let u = std::array::from_fn(|k| {
                                nibble(qs, QK * j + k) | (((qh[k] >> j) & 1) << 4)
                            });
                            put_quants(kind, gb, rec(b) + sb, c, &u);
                        }
                    }
                }
                PackKind::Q6K => {
                    for (s, blk) in blocks::<BlockQ6K>(row).enumerate() {
                        put_f16(gb, sup(s) + 2 * c, blk.d);
                        for j in 0..SUB {
                            let b = s * SUB + j;
                            gb[rec(b) + c] = blk.scales[2 * j] as u8;
                            gb[rec(b) + GROUP + c] = blk.scales[2 * j + 1] as u8;
                            put_quants(
                                kind,
                                gb,
                                rec(b) + sb,
                                c,
                                &std::array::from_fn(|k| q6_k_quant(&blk, QK * j + k)),
                            );
                        }
                    }
                }
                PackKind::Q3K => {
                    for (s, blk) in blocks::<BlockQ3K>(row).enumerate() {
                        put_f16(gb, sup(s) + 2 * c, blk.d);
                        let scales = blk.unpacked_scales();
                        for j in 0..SUB {
                            let b = s * SUB + j;
                            gb[rec(b) + c] = scales[2 * j] as u8;
                            gb[rec(b) + GROUP + c] = scales[2 * j + 1] as u8;
                            let u = std::array::from_fn(|k| {
                                let i = QK * j + k;
                                two_bits(&blk.qs, i) | (((blk.hmask[i % 32] >> (i / 32)) & 1) << 2)
                            });
                            put_quants(kind, gb, rec(b) + sb, c, &u);
                        }
                    }
                }
                PackKind::Q2K => {
                    for (s, blk) in blocks::<BlockQ2K>(row).enumerate() {
                        put_f16(gb, sup(s) + 2 * c, blk.d);
                        put_f16(gb, sup(s) + 32 + 2 * c, blk.dmin);
                        for j in 0..SUB {
                            let b = s * SUB + j;
                            gb[rec(b) + c] = blk.scales[2 * j];
                            gb[rec(b) + GROUP + c] = blk.scales[2 * j + 1];
                            put_quants(
                                kind,
                                gb,
                                rec(b) + sb,
                                c,
                                &std::array::from_fn(|k| two_bits(&blk.qs, QK * j + k)),
                            );
                        }
                    }
                }
                PackKind::IQ4XS => {
                    for (s, blk) in blocks::<BlockIQ4XS>(row).enumerate() {
                        put_f16(gb, sup(s) + 2 * c, blk.d);
                        for j in 0..SUB {
                            let b = s * SUB + j;
                            gb[rec(b) + c] = iq4_xs_scale(&blk, j) as u8;
                            let qs: [u8; QK / 2] = std::array::from_fn(|l| blk.qs[16 * j + l]);
                            put_quants(
                                kind,
                                gb,
                                rec(b) + sb,
                                c,
                                &std::array::from_fn(|k| nib32(&qs, k)),
                            );
                        }
                    }
                }
            }
        }
        Ok(Self {
            kind,
            rows: w.rows,
            cols: w.cols,
            nb,
            group_bytes,
            lines,
        })
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
        assert!(
            o < self.rows && out.len() == self.cols,
            "dequantize_row: row {o} or length out of range"
        );
        for (b, ob) in out.chunks_exact_mut(QK).enumerate() {
            let (d, m, u) = self.block(o, b);
            for (k, (x, &q)) in ob.iter_mut().zip(&u).enumerate() {
                // The reference dequantizers' own expressions (not d * u + m,
                // which rounds differently for the symmetric kinds).
                *x = match self.kind.zero() {
                    Some(z) => (q as i32 - z as i32) as f32 * d[k / 16],
                    None => q as f32 * d[k / 16] + m[k / 16],
                };
            }
        }
    }

    /// Block `b` of column `o`: `(d, m, u)` with weights `w[k] = d[k / 16] *
    /// u[k] + m[k / 16]` (IQ4 kinds: `u` is the table value plus 128), each
    /// scale computed with the kernel's operations.
    pub(crate) fn block(&self, o: usize, b: usize) -> ([f32; 2], [f32; 2], [u8; QK]) {
        let (gb, c, kind) = (self.group(o / GROUP), o % GROUP, self.kind);
        let f16_at = |i: usize| f16::from_bits(u16::from_le_bytes([gb[i], gb[i + 1]])).to_f32();
        let n_super = if kind.super_bytes() > 0 {
            self.nb / SUB
        } else {
            0
        };
        let sup = b / SUB * kind.super_bytes();
        let rec = n_super * kind.super_bytes() + b * kind.record_bytes();
        let neg_z = -(kind.zero().unwrap_or(0) as f32);
        let (d, m) = match kind {
            PackKind::Q4_0 | PackKind::Q5_0 | PackKind::Q8_0 | PackKind::IQ4NL => {
                let d = f16_at(rec + 2 * c);
                ([d; 2], [d * neg_z; 2])
            }
            PackKind::Q4_1 | PackKind::Q5_1 => {
                ([f16_at(rec + 2 * c); 2], [f16_at(rec + 32 + 2 * c); 2])
            }
            PackKind::Q4K | PackKind::Q5K => {
                let d = f16_at(sup + 2 * c) * gb[rec + c] as f32;
                let m = -(f16_at(sup + 32 + 2 * c) * gb[rec + GROUP + c] as f32);
                ([d; 2], [m; 2])
            }
            PackKind::Q6K | PackKind::Q3K => {
                let sd = f16_at(sup + 2 * c);
                let d = [
                    sd * gb[rec + c] as i8 as f32,
                    sd * gb[rec + GROUP + c] as i8 as f32,
                ];
                (d, [d[0] * neg_z, d[1] * neg_z])
            }
            PackKind::IQ4XS => {
                let d = f16_at(sup + 2 * c) * gb[rec + c] as i8 as f32;
                ([d; 2], [d * neg_z; 2])
            }
            PackKind::Q2K => {
                let (sd, sm) = (f16_at(sup + 2 * c), f16_at(sup + 32 + 2 * c));
                let (s0, s1) = (gb[rec + c], gb[rec + GROUP + c]);
                (
                    [sd * (s0 & 0x0F) as f32, sd * (s1 & 0x0F) as f32],
                    [-(sm * (s0 >> 4) as f32), -(sm * (s1 >> 4) as f32)],
                )
            }
        };
        let qs = &gb[rec + kind.scale_bytes()..];
        let mut u = [0u8; QK];
        for (k, uk) in u.iter_mut().enumerate() {
            let (j, i) = (k / 4, k % 4);
            if kind.byte_quants() {
                *uk = qs[j * 64 + 4 * c + i];
                continue;
            }
            *uk = if kind.crumb_quants() {
                (qs[j / 4 * 64 + 4 * c + i] >> (2 * (j % 4))) & 3
            } else if j < 4 {
                qs[j * 64 + 4 * c + i] & 0x0F
            } else {
                qs[(j - 4) * 64 + 4 * c + i] >> 4
            };
            for p in 0..kind.high_planes() {
                let mask = &qs[kind.low_bytes() + 64 * p + 8 * j..];
                *uk += ((mask[(4 * c + i) / 8] >> ((4 * c + i) % 8)) & 1)
                    << (kind.low_bits() as usize + p);
            }
            if kind.table() {
                *uk = (KVALUES_IQ4NL[*uk as usize] as i32 + 128) as u8;
            }
        }
        (d, m, u)
    }
}

/// Element `k` of a 32-block stored as ggml nibbles (`qs[j]`: `j` low, `j + 16` high).
fn nib32(qs: &[u8; QK / 2], k: usize) -> u8 {
    if k < QK / 2 {
        qs[k] & 0x0F
    } else {
        qs[k - QK / 2] >> 4
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
/// kernel (exact integer sums per block, or per half for the two-half kinds; then one fused
/// multiply-add per sum and one per offset), so results are bit-identical.
pub(super) fn ref_dot(p: &PackedMatrix, o: usize, x: &[BlockQ8]) -> f32 {
    let halves = p.kind.halves();
    let len = QK / halves;
    let mut acc = 0.0f32;
    for (b, xb) in x.iter().enumerate().take(p.nb) {
        let (d, m, u) = p.block(o, b);
        let sx = xb.d * (1.0 / Q8_RESIDUAL_SCALE);
        for h in 0..halves {
            let (mut s1, mut s2) = (0i32, 0i32);
            for k in h * len..(h + 1) * len {
                s1 += u[k] as i32 * xb.qs[k] as i32;
                s2 += u[k] as i32 * xb.qr[k] as i32;
            }
            let isum = (s1 << 7) + s2;
            acc = (isum as f32).mul_add(d[h] * sx, acc);
        }
        if halves == 1 {
            acc = m[0].mul_add(xb.s, acc);
        } else {
            let hs = half_sums(xb);
            acc = m[0].mul_add(hs[0], acc);
            acc = m[1].mul_add(hs[1], acc);
        }
    }
    acc
}
