//! AVX-512 engine of the tiled attention ([`crate::kernels::attention`]):
//! the steps of the one-row kernel `avx512::attend_f16` for every (row,
//! query head) pair of a tile, with each chunk of 16 keys converted (f16) or
//! dequantized (`q8_0`) to f32 once into an L1 buffer and shared by all of
//! them. Reached only through [`crate::kernels::attention::attend_rows`],
//! which checks the CPU features and every row's sizes and block ids.
//!
//! Bit-exactness with the one-row kernel: per lane (one key) the same fused
//! multiply-adds over `d` in the same order into the same two partial sums,
//! the same masked max, `exp16` and rescale per chunk (and the same shortcut
//! when no score exceeds the running max), the sums of exponentials kept per
//! lane and reduced once per segment, and
//! the same order of value accumulation over keys; the f32 buffers hold the
//! values `cvtph` produces, so reading them instead of converting in place
//! changes nothing.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::{exp16, prefetch_kv_block, tanh16, PREFETCH_BLOCKS};
use crate::kernels::attention::{
    for_each_block, part_len, q8_groups, Folds, MAX_TILE_ROWS, Q8_GROUP,
};
use crate::kernels::{AttnShape, MAX_GROUP};

/// Largest head size (floats of one buffered key column set).
const MAX_HD: usize = 256;
/// Most (row, head) pairs of a tile.
const MAX_PAIRS: usize = MAX_TILE_ROWS * MAX_GROUP;
/// Floats of accumulator state (rows x group x head_dim).
const STATE: usize = 8192;
/// (row, head) pairs whose scores are accumulated in registers at once (two
/// accumulators each: 12 registers, few enough to stay unrolled).
const SCORE_PASS: usize = 6;

/// Where the K/V arrays of one layer are and how they are stored.
pub(in crate::kernels) enum Src {
    /// f16 K (transposed per head) and V.
    F16 { k: *const f16, v: *const f16 },
    /// `q8_0` K, K scales, V, V scales (layout in the attention module).
    Q8 {
        k: *const i8,
        ks: *const f16,
        v: *const i8,
        vs: *const f16,
    },
}

/// Per-tile state.
struct State {
    /// Running max per (row, head).
    m: [f32; MAX_PAIRS],
    /// Sum of exponentials per (row, head), once reduced from `lv` (at a
    /// segment's end).
    l: [f32; MAX_PAIRS],
    /// Running sums of exponentials per (row, head) and lane (key offset
    /// mod 16), as the one-row kernel keeps them.
    lv: [[f32; 16]; MAX_PAIRS],
    /// This chunk's rescale factor per (row, head).
    corr: [f32; MAX_PAIRS],
    /// This chunk's scores, then its probabilities, per (row, head).
    p: [[f32; 16]; MAX_PAIRS],
    /// Output accumulators, `[row][head][head_dim]`.
    acc: [f32; STATE],
    /// Keys of the chunk, `[d][16]`.
    kf: [f32; MAX_HD * 16],
    /// Values of the chunk, `[j][head_dim]`.
    vf: [f32; MAX_HD * 16],
}

thread_local! {
    /// Each thread's tile state (~134 KiB: built once, not zeroed per call).
    static TILE: std::cell::RefCell<Box<State>> = std::cell::RefCell::new(Box::new(State::new()));
}

impl State {
    fn new() -> Self {
        State {
            m: [f32::NEG_INFINITY; MAX_PAIRS],
            l: [0.0; MAX_PAIRS],
            lv: [[0.0; 16]; MAX_PAIRS],
            corr: [0.0; MAX_PAIRS],
            p: [[0.0; 16]; MAX_PAIRS],
            acc: [0.0; STATE],
            kf: [0.0; MAX_HD * 16],
            vf: [0.0; MAX_HD * 16],
        }
    }

    /// Fresh softmax state for `pairs` (row, head) pairs and `acc_len`
    /// accumulators (the rest is written before it is read: scores and
    /// probabilities per chunk, the chunk's keys and values).
    fn reset(&mut self, pairs: usize, acc_len: usize) {
        self.m[..pairs].fill(f32::NEG_INFINITY);
        self.l[..pairs].fill(0.0);
        self.lv[..pairs].fill([0.0; 16]);
        self.acc[..acc_len].fill(0.0);
    }
}

/// Tiled attention of the query heads of KV head `kvh` for the rows `keys`
/// (row `i`: query at `q + i * qs`, output at `out + i * os`), each row's
/// segments folded as in `attention::run_segments`. With `raw`, writes
/// each row's state instead (`part_len` floats: max and sum per head, then
/// the unnormalised output).
///
/// # Safety
/// CPU supports avx512f/bw/vl and f16c; `s.head_dim` is a multiple of 16 and
/// at most 256; `keys.len() * s.group * s.head_dim <= 8192`, `keys.len() <=
/// 32`, `s.group <= 16`; every row satisfies the one-row kernel's
/// preconditions (q/out hold `group * head_dim` floats at its offset, the
/// table covers its keys, every block id of its key range is inside the K/V
/// arrays, and for `q8_0` inside the scale arrays); with `raw`, `out + i *
/// os` holds `part_len(s)` floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
pub(in crate::kernels) unsafe fn tile(
    src: &Src,
    s: &AttnShape,
    kvh: usize,
    table: &[u32],
    keys: &[Range<usize>],
    q: *const f32,
    qs: usize,
    out: *mut f32,
    os: usize,
    raw: bool,
) {
    let (hd, g) = (s.head_dim, s.group);
    debug_assert!(
        hd.is_multiple_of(16)
            && hd <= MAX_HD
            && keys.len() * g * hd <= STATE
            && keys.len() <= MAX_TILE_ROWS
    );
    TILE.with(|cell| {
        let mut st = cell.borrow_mut();
        st.reset(keys.len() * g, keys.len() * g * hd);
        // SAFETY: the caller's contract.
        unsafe { tile_with(&mut st, src, s, kvh, table, keys, q, qs, out, os, raw) }
    });
}

/// [`tile`] on a reset state.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
unsafe fn tile_with(
    st: &mut State,
    src: &Src,
    s: &AttnShape,
    kvh: usize,
    table: &[u32],
    keys: &[Range<usize>],
    q: *const f32,
    qs: usize,
    out: *mut f32,
    os: usize,
    raw: bool,
) {
    let (hd, g) = (s.head_dim, s.group);
    let mut folds = Folds::new();
    // Blocks any row reads (for the prefetch).
    let nblk = keys
        .iter()
        .map(|k| k.end.div_ceil(s.block_size))
        .max()
        .unwrap_or(0);
    for_each_block(s.block_size, keys, |bi, off, rows| {
        for &i in rows {
            if folds.leaves_segment(s, i, bi) {
                // SAFETY: the CPU features of this function.
                unsafe { reduce_sums(&mut *st, i, g, true) };
            }
            folds.enter(s, i, bi, &mut st.m, &mut st.l, &mut st.acc);
        }
        if let Some(&ahead) = table[..nblk.min(table.len())].get(bi + PREFETCH_BLOCKS) {
            // SAFETY: prefetches are hints (they never fault).
            unsafe { prefetch_block(src, s, kvh, ahead as usize) };
        }
        // SAFETY: the caller's contract; `bi` is a block some row reads.
        unsafe {
            block(
                src,
                s,
                kvh,
                table[bi] as usize,
                bi,
                off,
                rows,
                keys,
                q,
                qs,
                &mut *st,
            )
        }
    });
    for i in 0..keys.len() {
        reduce_sums(&mut *st, i, g, false);
        folds.finish_row(s, i, &mut st.m, &mut st.l, &mut st.acc);
        if raw {
            let o = out.add(i * os);
            for gi in 0..g {
                *o.add(gi) = st.m[i * g + gi];
                *o.add(g + gi) = st.l[i * g + gi];
            }
            std::ptr::copy_nonoverlapping(st.acc.as_ptr().add(i * g * hd), o.add(2 * g), g * hd);
            debug_assert_eq!(part_len(s), 2 * g + g * hd);
            continue;
        }
        for gi in 0..g {
            let pi = i * g + gi;
            let inv = _mm512_set1_ps(1.0 / st.l[pi]);
            for h in 0..hd / 16 {
                let a = _mm512_loadu_ps(st.acc.as_ptr().add(pi * hd + 16 * h));
                _mm512_storeu_ps(out.add(i * os + gi * hd + 16 * h), _mm512_mul_ps(a, inv));
            }
        }
    }
}

/// Row `i`'s lane sums reduced into `st.l` (the one-row kernel's
/// `_mm512_reduce_add_ps` at a segment's end); with `reset`, the lane sums
/// start again from zero.
#[target_feature(enable = "avx512f")]
unsafe fn reduce_sums(st: &mut State, i: usize, g: usize, reset: bool) {
    for pi in i * g..(i + 1) * g {
        st.l[pi] = _mm512_reduce_add_ps(_mm512_loadu_ps(st.lv[pi].as_ptr()));
        if reset {
            st.lv[pi] = [0.0; 16];
        }
    }
}

/// The chunks of block `bi` (physical `blk`) from key offset `off` for
/// `rows`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
unsafe fn block(
    src: &Src,
    s: &AttnShape,
    kvh: usize,
    blk: usize,
    bi: usize,
    off: usize,
    rows: &[usize],
    keys: &[Range<usize>],
    q: *const f32,
    qs: usize,
    st: &mut State,
) {
    let (hd, g, bs) = (s.head_dim, s.group, s.block_size);
    let cnt = |i: usize| bs.min(keys[i].end - bi * bs);
    let cmax = rows.iter().map(|&i| cnt(i)).max().unwrap_or(0);
    let scv = _mm512_set1_ps(s.scale);
    let mut pairs = [0usize; MAX_PAIRS];
    let mut c = off;
    while c < cmax {
        let nmax = 16.min(cmax - c);
        load_chunk(src, s, kvh, blk, c, nmax, st);
        // (row, head) pairs reading this chunk.
        let mut np = 0;
        for &i in rows {
            if c < cnt(i) {
                for gi in 0..g {
                    pairs[np] = i * g + gi;
                    np += 1;
                }
            }
        }
        // Scores, SCORE_PASS pairs per pass over the chunk's keys.
        let mut done = 0;
        while done < np {
            let k = (np - done).min(SCORE_PASS);
            let ps = &pairs[done..done + k];
            macro_rules! pass {
                ($($n:literal)*) => {
                    match k {
                        $($n => scores::<$n>(ps, q, qs, g, hd, scv, st),)*
                        _ => unreachable!(),
                    }
                };
            }
            pass!(1 2 3 4 5 6);
            done += k;
        }
        // Online softmax per pair.
        for &pi in &pairs[..np] {
            let n = 16.min(cnt(pi / g) - c);
            let mask: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            let mut sv = _mm512_loadu_ps(st.p[pi].as_ptr());
            if let Some(cap) = s.softcap {
                sv = _mm512_mul_ps(
                    _mm512_set1_ps(cap),
                    tanh16(_mm512_mul_ps(sv, _mm512_set1_ps(1.0 / cap))),
                );
            }
            let mo = _mm512_set1_ps(st.m[pi]);
            if _mm512_mask_cmp_ps_mask(mask, sv, mo, _CMP_GT_OQ) == 0 {
                // No score above the running max: correction exp16(0) = 1
                // (as in the one-row kernel).
                let pv = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sv, mo)));
                let lv = st.lv[pi].as_mut_ptr();
                _mm512_storeu_ps(lv, _mm512_add_ps(_mm512_loadu_ps(lv), pv));
                _mm512_storeu_ps(st.p[pi].as_mut_ptr(), pv);
                st.corr[pi] = 1.0;
                continue;
            }
            let bm = _mm512_mask_reduce_max_ps(mask, sv);
            let m_new = st.m[pi].max(bm);
            let corr = _mm512_cvtss_f32(exp16(_mm512_set1_ps(st.m[pi] - m_new)));
            let pv = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
            let lv = st.lv[pi].as_mut_ptr();
            _mm512_storeu_ps(
                lv,
                _mm512_fmadd_ps(_mm512_loadu_ps(lv), _mm512_set1_ps(corr), pv),
            );
            st.m[pi] = m_new;
            _mm512_storeu_ps(st.p[pi].as_mut_ptr(), pv);
            st.corr[pi] = corr;
        }
        // Values: acc = corr * acc + sum_j p[j] * V[j], per row.
        let hv = hd / 16;
        let hc = if hv.is_multiple_of(4) {
            4
        } else if hv.is_multiple_of(2) {
            2
        } else {
            1
        };
        for &i in rows {
            if c >= cnt(i) {
                continue;
            }
            let n = 16.min(cnt(i) - c);
            for g0 in (0..g).step_by(4) {
                let ng = 4.min(g - g0);
                let p0 = i * g + g0;
                macro_rules! vp {
                    ($(($a:literal, $b:literal))*) => {
                        match (ng, hc) {
                            $(($a, $b) => values::<$a, $b>(p0, n, hd, st),)*
                            _ => unreachable!(),
                        }
                    };
                }
                vp!((1, 1)(1, 2)(1, 4)(2, 1)(2, 2)(2, 4)(3, 1)(3, 2)(3, 4)(4, 1)(4, 2)(4, 4));
            }
        }
        c += 16;
    }
}

/// Prefetches KV head `kvh`'s keys and values of block `blk` (see
/// [`crate::kernels::avx512::prefetch_kv_block`]).
#[target_feature(enable = "avx512f")]
unsafe fn prefetch_block(src: &Src, s: &AttnShape, kvh: usize, blk: usize) {
    let (k, v, eb) = match *src {
        Src::F16 { k, v } => (k as *const u8, v as *const u8, 2),
        Src::Q8 { k, v, .. } => (k as *const u8, v as *const u8, 1),
    };
    prefetch_kv_block(k, v, eb, blk, s.block_size, s.head_dim, s.kv_dim, kvh);
}

/// Fills `st.kf` / `st.vf` with the `n` keys / values from offset `c` of
/// block `blk` (KV head `kvh`) as f32; key lanes `n..16` are zero.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
unsafe fn load_chunk(
    src: &Src,
    s: &AttnShape,
    kvh: usize,
    blk: usize,
    c: usize,
    n: usize,
    st: &mut State,
) {
    let (hd, bs, kv_dim) = (s.head_dim, s.block_size, s.kv_dim);
    let mask: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
    let kf = st.kf.as_mut_ptr();
    let vf = st.vf.as_mut_ptr();
    match *src {
        Src::F16 { k, v } => {
            let kt = k.add(blk * bs * kv_dim + kvh * hd * bs);
            for d in 0..hd {
                let x = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    mask,
                    kt.add(d * bs + c) as *const i16,
                ));
                _mm512_storeu_ps(kf.add(d * 16), x);
            }
            for j in 0..n {
                let row = v.add((blk * bs + c + j) * kv_dim + kvh * hd) as *const __m256i;
                for h in 0..hd / 16 {
                    _mm512_storeu_ps(
                        vf.add(j * hd + 16 * h),
                        _mm512_cvtph_ps(_mm256_loadu_si256(row.add(h))),
                    );
                }
            }
        }
        Src::Q8 { k, ks, v, vs } => {
            let ng = q8_groups(kv_dim);
            let kt = k.add(blk * bs * kv_dim + kvh * hd * bs);
            let kst = ks.add(blk * ng * bs);
            let mut cur = usize::MAX;
            let mut sc = _mm512_setzero_ps();
            for d in 0..hd {
                let gi = (kvh * hd + d) / Q8_GROUP;
                if gi != cur {
                    sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        mask,
                        kst.add(gi * bs + c) as *const i16,
                    ));
                    cur = gi;
                }
                let kq = _mm_maskz_loadu_epi8(mask, kt.add(d * bs + c));
                _mm512_storeu_ps(
                    kf.add(d * 16),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(kq)), sc),
                );
            }
            // Scale groups covering this head's slice of a row.
            let g_first = kvh * hd / Q8_GROUP;
            let g_cnt = (kvh * hd + hd - 1) / Q8_GROUP - g_first + 1;
            let gmask: u16 = (1u32 << g_cnt).wrapping_sub(1) as u16;
            let mut scales = [0.0f32; 16];
            for j in 0..n {
                let slot = blk * bs + c + j;
                let row = v.add(slot * kv_dim + kvh * hd);
                let sr = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    gmask,
                    vs.add(slot * ng + g_first) as *const i16,
                ));
                _mm512_storeu_ps(scales.as_mut_ptr(), sr);
                for h in 0..hd / 16 {
                    let d = scales[(kvh * hd + 16 * h) / Q8_GROUP - g_first];
                    let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        row.add(16 * h) as *const __m128i,
                    )));
                    _mm512_storeu_ps(vf.add(j * hd + 16 * h), _mm512_mul_ps(x, _mm512_set1_ps(d)));
                }
            }
        }
    }
}

/// Scaled scores of the chunk for `NP` (row, head) pairs into `st.p`:
/// per lane, two partial sums (even / odd d) of `q[d] * k[d]`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
unsafe fn scores<const NP: usize>(
    pairs: &[usize],
    q: *const f32,
    qs: usize,
    g: usize,
    hd: usize,
    scv: __m512,
    st: &mut State,
) {
    let mut qp = [q; NP];
    for (x, &pi) in qp.iter_mut().zip(pairs) {
        *x = q.add((pi / g) * qs + (pi % g) * hd);
    }
    // Even and odd d in separate accumulators (head_dim is even), written
    // as two named arrays so they stay in registers.
    let mut a0 = [_mm512_setzero_ps(); NP];
    let mut a1 = [_mm512_setzero_ps(); NP];
    let kf = st.kf.as_ptr();
    for d in (0..hd).step_by(2) {
        let k0 = _mm512_loadu_ps(kf.add(d * 16));
        let k1 = _mm512_loadu_ps(kf.add(d * 16 + 16));
        for i in 0..NP {
            a0[i] = _mm512_fmadd_ps(_mm512_set1_ps(*qp[i].add(d)), k0, a0[i]);
            a1[i] = _mm512_fmadd_ps(_mm512_set1_ps(*qp[i].add(d + 1)), k1, a1[i]);
        }
    }
    for i in 0..NP {
        _mm512_storeu_ps(
            st.p[pairs[i]].as_mut_ptr(),
            _mm512_mul_ps(_mm512_add_ps(a0[i], a1[i]), scv),
        );
    }
}

/// `acc = corr * acc + sum_{j < n} p[j] * V[j]` for the `NG` consecutive
/// pairs from `p0` (heads of one row), `HC` vectors of the head at a time.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,f16c,fma")]
unsafe fn values<const NG: usize, const HC: usize>(p0: usize, n: usize, hd: usize, st: &mut State) {
    let acc = st.acc.as_mut_ptr();
    let vf = st.vf.as_ptr();
    for h0 in (0..hd / 16).step_by(HC) {
        let mut a = [[_mm512_setzero_ps(); HC]; NG];
        for (x, ax) in a.iter_mut().enumerate() {
            let corr = st.corr[p0 + x];
            let cv = _mm512_set1_ps(corr);
            for (h, y) in ax.iter_mut().enumerate() {
                let v = _mm512_loadu_ps(acc.add((p0 + x) * hd + 16 * (h0 + h)));
                // `acc * 1` is `acc` (the one-row kernel skips it too).
                *y = if corr == 1.0 { v } else { _mm512_mul_ps(v, cv) };
            }
        }
        for j in 0..n {
            let mut vv = [_mm512_setzero_ps(); HC];
            for (h, y) in vv.iter_mut().enumerate() {
                *y = _mm512_loadu_ps(vf.add(j * hd + 16 * (h0 + h)));
            }
            for (x, ax) in a.iter_mut().enumerate() {
                let w = _mm512_set1_ps(st.p[p0 + x][j]);
                for (y, v) in ax.iter_mut().zip(&vv) {
                    *y = _mm512_fmadd_ps(w, *v, *y);
                }
            }
        }
        for (x, ax) in a.iter().enumerate() {
            for (h, y) in ax.iter().enumerate() {
                _mm512_storeu_ps(acc.add((p0 + x) * hd + 16 * (h0 + h)), *y);
            }
        }
    }
}
