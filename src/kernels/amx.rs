//! Intel AMX (AMX-TILE + AMX-INT8) kernel for the packed quantized matmul:
//! the per-block integer dot products of [`super::avx512`]'s VNNI kernel
//! computed 16 activation rows x 16 output columns at a time with `tdpbsud`
//! (signed activation bytes x unsigned weight bytes), followed by exactly the
//! VNNI kernel's float epilogue, in the same order. Private `unsafe`
//! functions, reached only through the safe wrappers in [`super`].
//!
//! Tile plan (one [`Tiles`] session per thread chunk: `ldtilecfg` when it
//! starts, `tilerelease` when it ends; 8 tile registers):
//!
//! ```text
//! activations, repacked once per matmul for all threads (pack_activations): per
//!   16-row tile and block, 16 lines of qs | qr (32 + 32 B), then 16 f32 of
//!   d/128, of s and of each half-block sum (zero rows pad the last tile)
//! one-half kinds (all but Q6_K, Q3_K, Q2_K), per 16-row tile, block b:
//!   tmm0 = A qs  16 rows x 32 B   (stride 64 in the repacked lines)
//!   tmm1 = A qr  16 rows x 32 B
//!   tmm2|3 = B    8 rows x 64 B   the block's weights in VNNI order (row j:
//!                                 weights 4j..4j+3 of the 16 columns)
//!   tmm4|6 = tmm0 . B (sum w*qs), tmm5|7 = tmm1 . B (sum w*qr)  (16 x 16 i32)
//!   blocks alternate between the pairs (B in tmm2 or tmm3, sums in tmm4+5 or
//!   tmm6+7): block b + 1 is multiplied while block b's sums are stored and
//!   its epilogue runs
//! two-half kinds: the same per 16-element half h (tmm0/tmm1 16 rows x 16 B,
//!   B 4 rows x 64 B); half 0 in the first pair, half 1 in the second.
//! ```
//!
//! The C tiles are stored (1 KiB per pair) and the epilogue of the VNNI kernel
//! runs on the stored sums, per row: `isum = (s1 << 7) + s2` (the same i32
//! the VNNI kernel's `vpdpbusd` chain produces: integer sums are exact), then
//! `acc += cvt(isum) * (d_w * (d_x / 128))`, `acc += m_w * s_x` (per half for
//! the two-half kinds). Each row's float operations are therefore the VNNI
//! kernel's and the scalar reference's, bit for bit, whatever the number of
//! rows in the batch: [`super::matmul_packed`] runs a batch's 16-row tiles
//! (and a last tile of 12 rows or more, zero-padded) on AMX and the rest on
//! VNNI, and a row's output does not depend on which one ran it.
//!
//! B tiles: Q8_0's record bytes are already the B tile (loaded in place, stride
//! 64); every other kind's weights of one column group are unpacked once
//! (nibbles, crumbs, high planes, IQ4 table: [`super::avx512::block_weights`])
//! into a scratch of `nb * 512` bytes, reused by every row tile.
//!
//! Cost per 16 rows x 16 columns x 32-block: 2 `tdpbsud` (4 for the two-half
//! kinds; ~16 cycles each whatever K: the TMUL is row-bound, so K = 32 uses
//! half of it, and no exact scheme packs two blocks or both digits into one
//! product), 3 tile loads, 2 tile stores (~25 cycles each) and ~10 vector
//! operations per row of epilogue, against 16 `vpdpbusd` + 16 broadcasts per
//! row for VNNI. Tile stores and the epilogue dominate. Repacking the
//! activations (aligned 64-byte rows instead of 32 bytes at stride nb * 72)
//! took ~25% off; pipelining the pairs ~15%; a 128- or 256-row macro tile
//! measured no better than 64.
//!
//! Measured (Intel Xeon with AMX, 2 cores shared with 4 other sessions: load
//! average 7-10, so absolute times are inflated and noisy; criterion medians,
//! one thread, `cargo bench --profile dev --bench kernels -- matmul_amx`;
//! `amx` at 4 rows is VNNI, below the 5-row threshold):
//!
//! ```text
//! weight (out x in)      rows:   4        8       16       32       64      256
//! Q8_0 16384x640  VNNI       3.71 ms  8.38     16.7     32.2     74.4     297
//!   (Gemma 3 head / 16) AMX   -       3.00      2.96     5.91     15.9     64.8
//! Q4_K 576x1536   VNNI       246 us   669      1334     2470     5097     22343
//!                 AMX         -       224       214      400      793      3274
//! Q6_K 576x1536   VNNI       373 us   784      1454     2320     4567     19524
//!                 AMX         -       392       483      694     1195      5223
//! Q5_0 2048x640   VNNI       309 us   730      1436     2890     5295     31977
//!                 AMX         -       210       246      449      641      5934
//! ```
//!
//! At 4 rows a padded tile costs about what VNNI does (3.63 vs 3.71 ms for
//! Q8_0; Q6_K and Q5_0 slower), from 5 rows on AMX is ahead (this table: dev
//! profile, loaded machine). In the release (bench) profile on a quiet
//! machine VNNI is much faster at few rows and a padded tile only pays from
//! about 8 (Q8_0) to 16 (Q6_K) rows, so `AMX_MIN_ROWS` is 12 (see there). End to end
//! (`brigade bench`, dev-profile build, Gemma 3 270M Q4_K_M, 32 requests x
//! 16 + 32 tokens, concurrency 32, same loaded machine): steady decode 141
//! tok/s with AMX vs 40 with `BRIGADE_AMX=0` (load 8-10), 205 vs 88 (load
//! 5-6, activations packed once per matmul); concurrency 64: 97-111 vs 35;
//! concurrency 8: 17.6 s vs 29.5 s for the 32 requests. Two threads
//! (`BRIGADE_THREADS=2`), load ~7: Q4_K 576x1536 at 32 rows 324 us vs 1322
//! (VNNI), 256 rows 2.2 ms vs 11.7; Q5_0 2048x640 at 32 rows 355 us vs 2145.
//!
//! Availability: CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), and on
//! Linux the permission to use the tile data state, requested once per
//! process with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` and
//! checked with `ARCH_GET_XCOMP_PERM`; a refusal leaves the VNNI kernel in
//! use. Other operating systems: not used. Selected automatically
//! ([`super::amx_enabled`]); `BRIGADE_AMX=0`, or `BRIGADE_ISA` below
//! `avx512`, keeps the packed matmul on VNNI. Rust's AMX intrinsics are
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
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r != 0 {
        return false;
    }
    let mut mask: u64 = 0;
    // SAFETY: ARCH_GET_XCOMP_PERM writes one u64 at the given address.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut mask as *mut u64,
        )
    };
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
static CFG_ONE: TileConfig = TileConfig::new([
    (16, 32),
    (16, 32),
    (8, 64),
    (8, 64),
    (16, 64),
    (16, 64),
    (16, 64),
    (16, 64),
]);
/// Tiles of the two-half kinds.
static CFG_TWO: TileConfig = TileConfig::new([
    (16, 16),
    (16, 16),
    (4, 64),
    (4, 64),
    (16, 64),
    (16, 64),
    (16, 64),
    (16, 64),
]);

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
        let cfg = if kind.halves() == 2 {
            &CFG_TWO
        } else {
            &CFG_ONE
        };
        // SAFETY: AMX-TILE is present and permitted (`available`); the
        // operand is a valid 64-byte palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        Some(Self {
            halves: kind.halves(),
            _thread: std::marker::PhantomData,
        })
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

/// One 64-byte aligned line (activation tiles, unpacked B tiles).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u8; 64]);

/// The bytes of `lines`.
pub(super) fn lines_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: `Line` is `repr(C)` over `[u8; 64]` with size 64, so
    // `lines.len() * 64` initialized bytes start at its pointer; the
    // exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) }
}

/// Lines per (row tile, block) of repacked activations: 16 rows of `qs | qr`
/// (32 + 32 bytes: both A tiles, stride 64), then 16 f32 each of `d / 128`,
/// `s`, and the two half-block sums.
const ACT_LINES: usize = TILE_ROWS + 4;

/// Lines of `tiles` repacked row tiles of `nb` blocks.
pub(super) const fn act_lines(tiles: usize, nb: usize) -> usize {
    tiles * nb * ACT_LINES
}

/// Repacks activation rows `rows` (`nb` blocks each; `xh` their half-block
/// sums, or empty) into `rows.len().div_ceil(16)` AMX row tiles, the last
/// zero-padded, appended to `out`, for [`gemm_group`].
pub(super) fn pack_activations(
    x: &[BlockQ8],
    xh: &[[f32; 2]],
    nb: usize,
    rows: std::ops::Range<usize>,
    out: &mut Vec<Line>,
) {
    let tiles = rows.len().div_ceil(TILE_ROWS);
    let base = out.len();
    out.resize(base + act_lines(tiles, nb), Line([0; 64]));
    let bytes = &mut lines_bytes_mut(out)[base * 64..];
    let inv_r = 1.0 / super::Q8_RESIDUAL_SCALE;
    for (i, row) in rows.enumerate() {
        let (t, r) = (i / TILE_ROWS, i % TILE_ROWS);
        for b in 0..nb {
            let xb = &x[row * nb + b];
            let at = (t * nb + b) * ACT_LINES * 64;
            let line = &mut bytes[at + r * 64..at + (r + 1) * 64];
            line[..QK].copy_from_slice(&xb.qs.map(|v| v as u8));
            line[QK..].copy_from_slice(&xb.qr.map(|v| v as u8));
            let mut put = |l: usize, v: f32| {
                let o = at + (TILE_ROWS + l) * 64 + 4 * r;
                bytes[o..o + 4].copy_from_slice(&v.to_ne_bytes());
            };
            put(0, xb.d * inv_r);
            put(1, xb.s);
            if !xh.is_empty() {
                put(2, xh[row * nb + b][0]);
                put(3, xh[row * nb + b][1]);
            }
        }
    }
}

/// [`super::avx512::gemm_group`] for `tiles` tiles of 16 activation rows
/// repacked by [`pack_activations`] at `xa`: `out[r * out_stride + c]` for
/// `r < 16 * (tiles - 1) + last_rows`, lanes `c` set in `lanes`;
/// bit-identical to it (padding rows are computed, not stored).
///
/// `scratch` holds `nb * B_TILE_BYTES` bytes (unused for Q8_0).
///
/// # Safety
/// As [`super::avx512::gemm_group`] for `group`, `nb`, `kind` and `lanes`;
/// `xa` holds `tiles` tiles of `nb` blocks from [`pack_activations`]; `out`
/// holds `(16 * (tiles - 1) + last_rows - 1) * out_stride + 16` floats,
/// `1 <= last_rows <= 16`; `t` was configured for `kind` on this thread.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_group(
    t: &Tiles,
    kind: PackKind,
    group: *const u8,
    nb: usize,
    xa: &[Line],
    out: *mut f32,
    out_stride: usize,
    lanes: u16,
    last_rows: usize,
    scratch: &mut [u8],
) {
    let tiles = xa.len() / (nb * ACT_LINES);
    debug_assert_eq!(t.halves, kind.halves());
    debug_assert!(
        tiles > 0 && xa.len() == tiles * nb * ACT_LINES && (1..=TILE_ROWS).contains(&last_rows)
    );
    debug_assert!(kind.byte_quants() || scratch.len() >= nb * B_TILE_BYTES);
    let xa = xa.as_ptr() as *const u8;
    macro_rules! each_kind {
        ($($k:ident),*) => {
            match kind {
                $(PackKind::$k => {
                    const K: u8 = PackKind::$k as u8;
                    gemm_group_k::<K>(group, nb, xa, out, out_stride, lanes, tiles, last_rows, scratch.as_mut_ptr())
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
    xa: *const u8,
    out: *mut f32,
    out_stride: usize,
    lanes: u16,
    tiles: usize,
    last_rows: usize,
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
            prefetch_record(
                recs.wrapping_add((b + PREFETCH_BLOCKS) * rec_bytes),
                rec_bytes,
            );
            let w = block_weights::<K>(recs.add(b * rec_bytes + scale_bytes));
            for (j, wj) in w.iter().enumerate() {
                _mm512_store_si512(scratch.add(b * B_TILE_BYTES + 64 * j) as *mut __m512i, *wj);
            }
        }
        (scratch as *const u8, B_TILE_BYTES)
    };
    let a_stride = 64usize;
    let mut c = CBuf([0; 4 * TILE_ROWS * GROUP]);
    let cp = c.0.as_mut_ptr();
    // Products of step s = block * halves + half go to tile pair s % 2 (B in
    // tmm2 / tmm3, sums in tmm4+tmm5 / tmm6+tmm7, stored at cp + 512 * pair):
    // step s + 1 is issued before the sums of step s are stored and used,
    // so the TMUL works while the vector units run the epilogue.
    macro_rules! issue {
        ($tb:literal, $c0:literal, $c1:literal, $bp:expr, $qs:expr, $qr:expr) => {
            asm!(
                concat!("tileloadd ", $tb, ", [{b} + {s64}*1]"),
                "tileloadd tmm0, [{qs} + {sa}*1]",
                "tileloadd tmm1, [{qr} + {sa}*1]",
                concat!("tilezero ", $c0),
                concat!("tilezero ", $c1),
                concat!("tdpbsud ", $c0, ", tmm0, ", $tb),
                concat!("tdpbsud ", $c1, ", tmm1, ", $tb),
                b = in(reg) $bp,
                qs = in(reg) $qs,
                qr = in(reg) $qr,
                sa = in(reg) a_stride,
                s64 = in(reg) 64usize,
                options(nostack),
            )
        };
    }
    macro_rules! store {
        ($c0:literal, $c1:literal, $p:expr) => {
            asm!(
                concat!("tilestored [{c0} + {s64}*1], ", $c0),
                concat!("tilestored [{c1} + {s64}*1], ", $c1),
                c0 = in(reg) $p,
                c1 = in(reg) $p.add(TILE_ROWS * GROUP),
                s64 = in(reg) 64usize,
                options(nostack),
            )
        };
    }
    let steps = nb * halves;
    for t in 0..tiles {
        let xt = xa.add(t * nb * ACT_LINES * 64);
        let issue_step = |s: usize| {
            let (b, h) = (s / halves, s % halves);
            let bp = bt.add(b * b_step + h * (B_TILE_BYTES / 2));
            let qs = xt.add(b * ACT_LINES * 64 + h * (QK / 2));
            let qr = qs.add(QK);
            if s.is_multiple_of(2) {
                issue!("tmm2", "tmm4", "tmm5", bp, qs, qr);
            } else {
                issue!("tmm3", "tmm6", "tmm7", bp, qs, qr);
            }
        };
        let (mut sd, mut sdm) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut accf = [_mm512_setzero_ps(); TILE_ROWS];
        issue_step(0);
        for s in 0..steps {
            if kind.byte_quants() && t == 0 && s % halves == 0 {
                // Weights stream from memory once per group: fetch a few
                // records ahead of the tile loads (past the group's end: the
                // next group's first records, contiguous).
                prefetch_record(
                    recs.wrapping_add((s / halves + PREFETCH_BLOCKS) * rec_bytes),
                    rec_bytes,
                );
            }
            if s + 1 < steps {
                issue_step(s + 1);
            }
            if s.is_multiple_of(2) {
                store!("tmm4", "tmm5", cp);
            } else {
                store!("tmm6", "tmm7", cp.add(2 * TILE_ROWS * GROUP));
            }
            if s % halves != halves - 1 {
                continue;
            }
            // Block b's sums are stored: the VNNI kernel's epilogue, row by row.
            let b = s / halves;
            let rec = recs.add(b * rec_bytes);
            if sup_bytes > 0 && b % (QK_K / QK) == 0 {
                let sp = group.add(b / (QK_K / QK) * sup_bytes);
                sd = _mm512_cvtph_ps(_mm256_loadu_si256(sp as *const __m256i));
                if sup_bytes == 64 {
                    sdm = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(32) as *const __m256i));
                }
            }
            let (dw, mw) = block_scales::<K>(rec, sd, sdm);
            // (16,) per-row scalars of block b: d / 128, s, half sums
            let xs = xt.add((b * ACT_LINES + TILE_ROWS) * 64) as *const f32;
            // One row's epilogue; expanded for the 16 rows with literal
            // indices so the accumulators stay in registers (a loop over
            // `accf` kept them on the stack: a store and a reload per row and
            // block). Same operations in the same order as before.
            macro_rules! rows {
                ($($r:literal)*) => {$({
                    let f = &mut accf[$r];
                    let sx = _mm512_set1_ps(*xs.add($r));
                    for h in 0..halves {
                        // pair of half h: s % 2 for the one-half kinds, h for the others
                        let pair = if halves == 1 { s % 2 } else { h };
                        let s1 = _mm512_load_si512(
                            cp.add((2 * pair * TILE_ROWS + $r) * GROUP) as *const __m512i
                        );
                        let s2 = _mm512_load_si512(
                            cp.add(((2 * pair + 1) * TILE_ROWS + $r) * GROUP) as *const __m512i
                        );
                        let a = _mm512_add_epi32(_mm512_slli_epi32(s1, 7), s2);
                        *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(dw[h], sx), *f);
                    }
                    if halves == 1 {
                        *f = _mm512_fmadd_ps(mw[0], _mm512_set1_ps(*xs.add(TILE_ROWS + $r)), *f);
                    } else {
                        *f = _mm512_fmadd_ps(mw[0], _mm512_set1_ps(*xs.add(2 * TILE_ROWS + $r)), *f);
                        *f = _mm512_fmadd_ps(mw[1], _mm512_set1_ps(*xs.add(3 * TILE_ROWS + $r)), *f);
                    }
                })*};
            }
            rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        }
        let rows = if t + 1 == tiles { last_rows } else { TILE_ROWS };
        // Literal indices again (see `rows!`): a loop would put `accf` in memory.
        macro_rules! put {
            ($($r:literal)*) => {$(
                if $r < rows {
                    _mm512_mask_storeu_ps(out.add((t * TILE_ROWS + $r) * out_stride), lanes, accf[$r]);
                }
            )*};
        }
        put!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    }
}

/// Records fetched ahead of the first row tile's weight loads. `tileloadd`
/// from memory stalls on a cache miss (it was ~40% of Gemma 3's head matmul
/// at 32 rows, sampled with perf's cpu-clock); a prefetch ~6 records (~3 KiB)
/// ahead hides most of it.
const PREFETCH_BLOCKS: usize = 6;

/// Prefetches the cache lines of one packed record into L1 (a hint: never
/// faults, so `p` may point past the matrix).
#[inline(always)]
unsafe fn prefetch_record(p: *const u8, bytes: usize) {
    let mut o = 0;
    while o < bytes {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
        o += 64;
    }
}

const _: () = assert!(GROUP == 16 && QK == 32 && std::mem::size_of::<BlockQ8>() == 72);
