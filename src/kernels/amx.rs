//! Intel AMX (AMX-TILE + AMX-INT8) kernel for the packed quantized matmul:
//! the per-block integer dot products of [`super::avx512`]'s VNNI kernel
//! computed 16 activation rows x 16 output columns at a time with `tdpbsud`
//! (signed activation bytes x unsigned weight bytes), followed by exactly the
//! VNNI kernel's float epilogue, in the same order. Private `unsafe`
//! functions, reached only through the safe wrappers in [`super`].
//!
//! Tile plan (one [`Tiles`] session per thread chunk: `ldtilecfg` when it
//! starts, `tilerelease` when it ends):
//!
//! ```text
//! one-half kinds (all but Q6_K, Q3_K, Q2_K), per 16-row tile t, block b:
//!   tmm0 = A qs  16 rows x 32 B   rows of x[t*16 + r][b].qs, stride nb*72 B
//!   tmm1 = A qr  16 rows x 32 B   likewise .qr (offset 40 in the block)
//!   tmm2 = B      8 rows x 64 B   the block's weights, VNNI order (row j:
//!                                 weights 4j..4j+3 of the 16 columns)
//!   tmm4 = tmm0 . tmm2 (sum w*qs), tmm5 = tmm1 . tmm2 (sum w*qr)  (16 x 16 i32)
//! two-half kinds: the same per 16-element half h, with tmm0/tmm1 16 rows x
//!   16 B (qs/qr[16h..16h+16]) and B = 4 rows of 64 B (tmm2: h = 0, tmm3: h = 1);
//!   C: tmm4/tmm5 (half 0), tmm6/tmm7 (half 1).
//! ```
//!
//! The C tiles are stored (1 KiB per pair) and the epilogue of the VNNI kernel
//! runs on the stored sums, per row: `isum = (s1 << 7) + s2` (the same i32
//! the VNNI kernel's `vpdpbusd` chain produces: integer sums are exact), then
//! `acc += cvt(isum) * (d_w * (d_x / 128))`, `acc += m_w * s_x` (per half for
//! the two-half kinds). Each row's float operations are therefore the VNNI
//! kernel's and the scalar reference's, bit for bit, whatever the number of
//! rows in the batch: AMX is used for the full 16-row tiles of a batch and VNNI
//! for the rest, and a row's output does not depend on which one ran it.
//!
//! B tiles: Q8_0's record bytes are already the B tile (loaded in place, stride
//! 64); every other kind's weights of one column group are unpacked once
//! (nibbles, crumbs, high planes, IQ4 table: [`super::avx512::block_weights`])
//! into a scratch of `nb * 512` bytes, reused by every row tile.
//!
//! Cost per 16 rows x 16 columns x 32-block: 2 `tdpbsud` (4 for the two-half
//! kinds; each ~16 cycles whatever K: the TMUL is row-bound, so K = 32 uses
//! half of it), 2 tile stores and ~8 vector operations per row of epilogue,
//! against 16 `vpdpbusd` + 16 broadcasts per row for VNNI. The epilogue and
//! the activation tile loads (from L2 for a 64-row macro tile) dominate.
//!
//! Measured (Xeon with AMX, 2 cores shared with 4 other sessions, so noisy;
//! criterion medians, one thread; see `benches/kernels.rs`, ids
//! `matmul/<dtype>/<shape>/rows<n>/avx512` and `.../amx`): see the table in
//! [`super`]'s `matmul_packed_groups` notes and the module header of the bench.
//!
//! Availability: CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), and on
//! Linux the permission to use the tile data state, requested once per
//! process with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` and
//! checked with `ARCH_GET_XCOMP_PERM`; a refusal leaves the VNNI kernel in
//! use. Other operating systems: not used. Rust's AMX intrinsics are
//! unstable, so the tile instructions are `asm!`.
#![allow(unsafe_code)]

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::avx512::{block_scales, block_weights};
use super::packed::{PackKind, GROUP};
use super::{BlockQ8, QK};
use crate::quant::QK_K;

/// Activation rows per tile (the rows of an A and of a C tile).
pub(super) const TILE_ROWS: usize = 16;

/// Bytes of one unpacked B tile (32 weights x 16 columns).
pub(super) const B_TILE_BYTES: usize = QK * GROUP;

/// Whether this CPU has AMX-TILE and AMX-INT8 and the OS let this process use
/// the tile state (checked and requested once, cached).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx_int8() && request_permission())
}

fn cpu_has_amx_int8() -> bool {
    #[allow(unused_unsafe)]
    // SAFETY: cpuid is available on every x86-64 CPU; leaf 7 is only read
    // when leaf 0 reports it.
    let (max, edx7) = unsafe {
        let max = __cpuid(0).eax;
        (max, if max >= 7 { __cpuid_count(7, 0).edx } else { 0 })
    };
    max >= 7 && (edx7 >> 24) & 1 == 1 && (edx7 >> 25) & 1 == 1
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, feature) takes an integer and
    // touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if r != 0 {
        return false;
    }
    let mut mask: u64 = 0;
    // SAFETY: ARCH_GET_XCOMP_PERM writes one u64 at the given address.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut mask as *mut u64) };
    r == 0 && (mask >> XFEATURE_XTILEDATA) & 1 == 1
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// A 64-byte `ldtilecfg` operand.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// Palette 1 with tile `t` of `shape[t] = (rows, bytes per row)`.
    const fn new(shape: [(u8, u16); 8]) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            let (rows, colsb) = shape[t];
            c[16 + 2 * t] = colsb as u8;
            c[17 + 2 * t] = (colsb >> 8) as u8;
            c[48 + t] = rows;
            t += 1;
        }
        Self(c)
    }
}

/// Tiles of the one-half kinds (see the module doc).
static CFG_ONE: TileConfig = TileConfig::new([(16, 32), (16, 32), (8, 64), (8, 64), (16, 64), (16, 64), (16, 64), (16, 64)]);
/// Tiles of the two-half kinds.
static CFG_TWO: TileConfig = TileConfig::new([(16, 16), (16, 16), (4, 64), (4, 64), (16, 64), (16, 64), (16, 64), (16, 64)]);

/// The tile registers configured on this thread for one packed kind, for as
/// long as the value lives (released on drop). Create one per thread chunk,
/// never two at once on a thread, and do not move it to another thread.
pub(super) struct Tiles {
    halves: usize,
    /// Not `Send`: the configuration belongs to the creating thread.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Tiles {
    /// Configures the tiles for `kind`; `None` when AMX is not [`available`].
    pub(super) fn new(kind: PackKind) -> Option<Self> {
        if !available() {
            return None;
        }
        let cfg = if kind.halves() == 2 { &CFG_TWO } else { &CFG_ONE };
        // SAFETY: AMX-TILE is present and permitted (`available`); the
        // operand is a valid 64-byte palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        Some(Self { halves: kind.halves(), _thread: std::marker::PhantomData })
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread (the
        // value is not `Send`); tilerelease returns them to the init state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// 64-byte aligned storage of the four C tiles (16 x 16 i32 each).
#[repr(C, align(64))]
struct CBuf([i32; 4 * TILE_ROWS * GROUP]);

/// [`super::avx512::gemm_group`] for `tiles` full tiles of 16 activation rows:
/// `out[r * out_stride + c]` for `r < 16 * tiles`, lanes `c` set in `lanes`;
/// bit-identical to it.
///
/// `scratch` holds `nb * B_TILE_BYTES` bytes (unused for Q8_0).
///
/// # Safety
/// As [`super::avx512::gemm_group`] with `R = 16 * tiles` rows, and `t` was
/// configured for `kind` on this thread.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_group(
    t: &Tiles,
    kind: PackKind,
    group: *const u8,
    nb: usize,
    x: *const BlockQ8,
    xh: *const [f32; 2],
    x_stride: usize,
    out: *mut f32,
    out_stride: usize,
    lanes: u16,
    tiles: usize,
    scratch: &mut [u8],
) {
    debug_assert_eq!(t.halves, kind.halves());
    debug_assert!(kind.byte_quants() || scratch.len() >= nb * B_TILE_BYTES);
    macro_rules! each_kind {
        ($($k:ident),*) => {
            match kind {
                $(PackKind::$k => {
                    const K: u8 = PackKind::$k as u8;
                    gemm_group_k::<K>(group, nb, x, xh, x_stride, out, out_stride, lanes, tiles, scratch.as_mut_ptr())
                })*
            }
        };
    }
    each_kind!(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K, IQ4NL, IQ4XS, Q3K, Q2K)
}

/// [`gemm_group`] for the kind whose discriminant is `K`.
///
/// # Safety
/// As [`gemm_group`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn gemm_group_k<const K: u8>(
    group: *const u8,
    nb: usize,
    x: *const BlockQ8,
    xh: *const [f32; 2],
    x_stride: usize,
    out: *mut f32,
    out_stride: usize,
    lanes: u16,
    tiles: usize,
    scratch: *mut u8,
) {
    let kind = const { PackKind::from_u8(K) };
    let sup_bytes = const { PackKind::from_u8(K).super_bytes() };
    let n_super = if sup_bytes > 0 { nb / (QK_K / QK) } else { 0 };
    let recs = group.add(n_super * sup_bytes);
    let (rec_bytes, scale_bytes, halves) = const {
        let k = PackKind::from_u8(K);
        (k.record_bytes(), k.scale_bytes(), k.halves())
    };
    // B tiles: Q8_0's stored bytes in place, else unpacked once for all row tiles.
    let (bt, b_step) = if kind.byte_quants() {
        (recs.add(scale_bytes), rec_bytes)
    } else {
        for b in 0..nb {
            let w = block_weights::<K>(recs.add(b * rec_bytes + scale_bytes));
            for (j, wj) in w.iter().enumerate() {
                _mm512_store_si512(scratch.add(b * B_TILE_BYTES + 64 * j) as *mut __m512i, *wj);
            }
        }
        (scratch as *const u8, B_TILE_BYTES)
    };
    let a_stride = x_stride * std::mem::size_of::<BlockQ8>();
    let inv_r = 1.0 / super::Q8_RESIDUAL_SCALE;
    let mut c = CBuf([0; 4 * TILE_ROWS * GROUP]);
    let cp = c.0.as_mut_ptr();
    for t in 0..tiles {
        let xt = x.add(t * TILE_ROWS * x_stride);
        let ht = if halves == 2 { xh.add(t * TILE_ROWS * x_stride) } else { xh };
        let (mut sd, mut sdm) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut accf = [_mm512_setzero_ps(); TILE_ROWS];
        for b in 0..nb {
            let rec = recs.add(b * rec_bytes);
            if sup_bytes > 0 && b % (QK_K / QK) == 0 {
                let sp = group.add(b / (QK_K / QK) * sup_bytes);
                sd = _mm512_cvtph_ps(_mm256_loadu_si256(sp as *const __m256i));
                if sup_bytes == 64 {
                    sdm = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(32) as *const __m256i));
                }
            }
            let (dw, mw) = block_scales::<K>(rec, sd, sdm);
            let qs = (*xt.add(b)).qs.as_ptr() as *const u8;
            let qr = (*xt.add(b)).qr.as_ptr() as *const u8;
            let bp = bt.add(b * b_step);
            if halves == 1 {
                asm!(
                    "tileloadd tmm2, [{b} + {s64}*1]",
                    "tileloadd tmm0, [{qs} + {sa}*1]",
                    "tileloadd tmm1, [{qr} + {sa}*1]",
                    "tilezero tmm4",
                    "tilezero tmm5",
                    "tdpbsud tmm4, tmm0, tmm2",
                    "tdpbsud tmm5, tmm1, tmm2",
                    "tilestored [{c0} + {s64}*1], tmm4",
                    "tilestored [{c1} + {s64}*1], tmm5",
                    b = in(reg) bp,
                    qs = in(reg) qs,
                    qr = in(reg) qr,
                    sa = in(reg) a_stride,
                    s64 = in(reg) 64usize,
                    c0 = in(reg) cp,
                    c1 = in(reg) cp.add(TILE_ROWS * GROUP),
                    options(nostack),
                );
            } else {
                asm!(
                    "tileloadd tmm2, [{b} + {s64}*1]",
                    "tileloadd tmm3, [{b1} + {s64}*1]",
                    "tileloadd tmm0, [{qs} + {sa}*1]",
                    "tileloadd tmm1, [{qr} + {sa}*1]",
                    "tilezero tmm4",
                    "tilezero tmm5",
                    "tdpbsud tmm4, tmm0, tmm2",
                    "tdpbsud tmm5, tmm1, tmm2",
                    "tileloadd tmm0, [{qs1} + {sa}*1]",
                    "tileloadd tmm1, [{qr1} + {sa}*1]",
                    "tilezero tmm6",
                    "tilezero tmm7",
                    "tdpbsud tmm6, tmm0, tmm3",
                    "tdpbsud tmm7, tmm1, tmm3",
                    "tilestored [{c0} + {s64}*1], tmm4",
                    "tilestored [{c1} + {s64}*1], tmm5",
                    "tilestored [{c2} + {s64}*1], tmm6",
                    "tilestored [{c3} + {s64}*1], tmm7",
                    b = in(reg) bp,
                    b1 = in(reg) bp.add(B_TILE_BYTES / 2),
                    qs = in(reg) qs,
                    qr = in(reg) qr,
                    qs1 = in(reg) qs.add(QK / 2),
                    qr1 = in(reg) qr.add(QK / 2),
                    sa = in(reg) a_stride,
                    s64 = in(reg) 64usize,
                    c0 = in(reg) cp,
                    c1 = in(reg) cp.add(TILE_ROWS * GROUP),
                    c2 = in(reg) cp.add(2 * TILE_ROWS * GROUP),
                    c3 = in(reg) cp.add(3 * TILE_ROWS * GROUP),
                    options(nostack),
                );
            }
            // The VNNI kernel's epilogue, row by row.
            for (r, f) in accf.iter_mut().enumerate() {
                let xb = &*xt.add(r * x_stride + b);
                let sx = _mm512_set1_ps(xb.d * inv_r);
                for h in 0..halves {
                    let s1 = _mm512_load_si512(cp.add((2 * h * TILE_ROWS + r) * GROUP) as *const __m512i);
                    let s2 = _mm512_load_si512(cp.add(((2 * h + 1) * TILE_ROWS + r) * GROUP) as *const __m512i);
                    let a = _mm512_add_epi32(_mm512_slli_epi32(s1, 7), s2);
                    *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(dw[h], sx), *f);
                }
                if halves == 1 {
                    *f = _mm512_fmadd_ps(mw[0], _mm512_set1_ps(xb.s), *f);
                } else {
                    let hs = *ht.add(r * x_stride + b);
                    *f = _mm512_fmadd_ps(mw[0], _mm512_set1_ps(hs[0]), *f);
                    *f = _mm512_fmadd_ps(mw[1], _mm512_set1_ps(hs[1]), *f);
                }
            }
        }
        for (r, f) in accf.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add((t * TILE_ROWS + r) * out_stride), lanes, *f);
        }
    }
}

const _: () = assert!(GROUP == 16 && QK == 32 && std::mem::size_of::<BlockQ8>() == 72);
