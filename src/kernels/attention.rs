//! Paged attention for many query rows at once (flash-attention style), and
//! the `q8_0` KV-cache format.
//!
//! [`attend_rows`] takes the query rows of one sequence (each with its own
//! causal or sliding-window key range, usually consecutive positions of a
//! prefill chunk) and walks the sequence's KV blocks once per tile of up to
//! [`tile_rows`] rows: each chunk of [`ATT_CHUNK`] keys is loaded (and
//! converted or dequantized to f32) once and used by every query head of
//! every row of the tile that reads it, with an online softmax per row and
//! head (running max, rescale, accumulate): no score matrix is built and K/V
//! are read once per tile instead of once per row.
//!
//! Bit-exactness: a row's output is computed with exactly the operations of
//! the one-row kernels ([`super::attend_f16_isa`] / [`super::scalar::attend`]):
//! the same chunks of keys in the same order (each row keeps its own chunk
//! grid: a sliding window's first block starts at the window), the same
//! per-lane sums over the head dimension, the same reductions, exponentials
//! and accumulation order over keys. So a row's result never depends on the
//! other rows of its tile, on the tile size or on how a prompt was chunked,
//! and equals what a decode step computes for that position.
//!
//! Element types: f16 runs the AVX-512 engine on the shapes the one-row
//! AVX-512 kernel covers (else it runs the one-row kernels row by row, which
//! keeps its per-shape choice of ISA); bf16 and f32 run the scalar engine
//! (bit-identical to [`super::attend_ref`]); `q8_0` runs the AVX-512 engine
//! when `head_dim` is a multiple of 16 and at most 256 (else the scalar
//! engine), for decode rows too, so prefill and decode agree.
//!
//! `q8_0` layout per layer (as ggml's Q8_0: groups of [`Q8_GROUP`] elements
//! of one K or V row share an f16 scale `d`, value = `d * q`, `q` in
//! -127..=127; groups run along the row of `kv_dim` elements, the last one
//! possibly shorter):
//!
//! ```text
//! k:       [block][kv_head][head_dim][block_size]   i8 (transposed per head, as f16's K)
//! k_scale: [block][groups][block_size]              f16 (groups = kv_dim.div_ceil(32))
//! v:       [block][block_size][kv_dim]              i8
//! v_scale: [block][block_size][groups]              f16
//! ```
//!
//! A row is quantized on its own when written ([`quantize_q8_group`]), so the
//! stored bytes depend only on that row. Dequantized values `d * q` are exact
//! in f32 (11 + 7 significant bits), so attention over them is the f16
//! arithmetic on other inputs.

use std::ops::Range;

use half::{bf16, f16};

use super::{AttnShape, Isa, ATT_CHUNK, MAX_GROUP};

/// Elements per `q8_0` scale group.
pub const Q8_GROUP: usize = 32;

/// Most query rows per tile.
pub const MAX_TILE_ROWS: usize = 32;

/// Most floats of per-tile accumulator state (rows x group x head_dim).
const TILE_STATE: usize = 8192;

/// Largest head size the tiled engines handle (larger heads run row by row).
const MAX_TILE_HEAD_DIM: usize = 256;

/// Most (row, query head) pairs of a tile.
const MAX_PAIRS: usize = MAX_TILE_ROWS * MAX_GROUP;

/// `q8_0` K/V arrays of one layer (layout in the module header).
#[derive(Clone, Copy, Debug)]
pub struct Q8Kv<'a> {
    /// Quantized keys, transposed per head.
    pub k: &'a [i8],
    /// Key scales, `[block][groups][block_size]`.
    pub k_scale: &'a [f16],
    /// Quantized values, row-major.
    pub v: &'a [i8],
    /// Value scales, `[block][block_size][groups]`.
    pub v_scale: &'a [f16],
}

/// The K and V arrays of one layer, in their storage type.
#[derive(Clone, Copy, Debug)]
pub enum KvView<'a> {
    /// f16 storage.
    F16(&'a [f16], &'a [f16]),
    /// bf16 storage.
    Bf16(&'a [bf16], &'a [bf16]),
    /// f32 storage.
    F32(&'a [f32], &'a [f32]),
    /// `q8_0` storage.
    Q8(Q8Kv<'a>),
}

/// Keys per attention segment (for block size 16; see [`seg_keys`]).
pub const SEG_KEYS: usize = 1024;

/// Keys of one segment for block size `bs`: whole blocks, [`SEG_KEYS`] keys
/// (rounded down to blocks, at least one block).
///
/// A row's keys are split at the multiples of this length (absolute key
/// positions, so the split never depends on the row's range, its tile or
/// the batch); each segment's softmax state (max, sum of exponentials,
/// unnormalised values) is computed from scratch by every path with the
/// same chunk grid and steps, and the segments are folded in order by
/// [`fold_part`]'s formula, then normalised. Segments can therefore run on
/// different threads ([`attend_part`], [`merge_parts`]) without changing a
/// bit.
pub fn seg_keys(bs: usize) -> usize {
    (SEG_KEYS / bs).max(1) * bs
}

/// The segments of the key range `keys` (block size `bs`): `keys` cut at the
/// multiples of [`seg_keys`], in order. Empty for an empty range.
pub fn segments(bs: usize, keys: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let sl = seg_keys(bs);
    let (first, end) = if keys.start < keys.end {
        (keys.start / sl, (keys.end - 1) / sl + 1)
    } else {
        (0, 0)
    };
    (first..end).map(move |i| keys.start.max(i * sl)..keys.end.min((i + 1) * sl))
}

/// Floats of one segment's state for shape `s` ([`attend_part`]'s output):
/// `[m; group][l; group][acc; group * head_dim]`.
pub fn part_len(s: &AttnShape) -> usize {
    s.group * (2 + s.head_dim)
}

/// Folds the softmax state of the next segment (`sm`, `sl`, `sacc`) into
/// the running state (`m`, `l`, `acc`) of `g` heads of `hd` elements:
/// `M = max(m, sm)`, `l = l * e^(m - M) + sl * e^(sm - M)`, likewise `acc`.
/// Every path merges segments with this function, in key order.
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_state(
    g: usize,
    hd: usize,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    sm: &[f32],
    sl: &[f32],
    sacc: &[f32],
) {
    for gi in 0..g {
        let mx = m[gi].max(sm[gi]);
        let (a, b) = ((m[gi] - mx).exp(), (sm[gi] - mx).exp());
        l[gi] = l[gi] * a + sl[gi] * b;
        m[gi] = mx;
        for (x, &y) in acc[gi * hd..(gi + 1) * hd]
            .iter_mut()
            .zip(&sacc[gi * hd..(gi + 1) * hd])
        {
            *x = *x * a + y * b;
        }
    }
}

/// `out = acc / l` per head (`acc * (1 / l)`, as every kernel normalises).
pub(super) fn finish_state(g: usize, hd: usize, l: &[f32], acc: &[f32], out: &mut [f32]) {
    for gi in 0..g {
        let inv = 1.0 / l[gi];
        for (o, &x) in out[gi * hd..(gi + 1) * hd]
            .iter_mut()
            .zip(&acc[gi * hd..(gi + 1) * hd])
        {
            *o = x * inv;
        }
    }
}

/// Runs a row's segments through `f(segment keys, m, l, acc)` (which must
/// write that segment's state from scratch: `m`, `l` per head, `acc`
/// `group x head_dim`), folds them in order ([`merge_state`]) with the first
/// segment's state kept in `out`, and normalises `out` in place: the
/// one-row path of every kernel.
pub(super) fn run_segments(
    s: &AttnShape,
    keys: Range<usize>,
    out: &mut [f32],
    mut f: impl FnMut(Range<usize>, &mut [f32], &mut [f32], &mut [f32]),
) {
    let (g, hd) = (s.group, s.head_dim);
    let mut ml = [0.0f32; 2 * MAX_GROUP];
    let (m, l) = ml.split_at_mut(MAX_GROUP);
    let (m, l, acc) = (&mut m[..g], &mut l[..g], &mut out[..g * hd]);
    let mut next: Vec<f32> = Vec::new();
    for (i, seg) in segments(s.block_size, keys).enumerate() {
        if i == 0 {
            f(seg, m, l, acc);
        } else {
            next.resize(part_len(s), 0.0);
            let (sm, rest) = next.split_at_mut(g);
            let (sl, sacc) = rest.split_at_mut(g);
            f(seg, sm, sl, sacc);
            merge_state(g, hd, m, l, acc, sm, sl, sacc);
        }
    }
    for gi in 0..g {
        let inv = 1.0 / l[gi];
        for o in acc[gi * hd..(gi + 1) * hd].iter_mut() {
            *o *= inv;
        }
    }
}

/// Segment bookkeeping of a tile (both tiled engines): each row's state in
/// the tile's arrays covers its current segment only; on entering the next
/// segment it is folded ([`merge_state`], the first one copied) into the
/// row's folded state here and reset, and [`Folds::finish_row`] folds the
/// last one and puts the result back. So each row goes through exactly the
/// steps of [`run_segments`].
pub(super) struct Folds {
    /// Segment index of each row's current state (`usize::MAX`: none yet).
    seg: [usize; MAX_TILE_ROWS],
    /// Whether each row has folded state.
    folded: [bool; MAX_TILE_ROWS],
    /// Folded max per (row, head).
    m: [f32; MAX_PAIRS],
    /// Folded sum per (row, head).
    l: [f32; MAX_PAIRS],
    /// Folded accumulators, `[row][head][head_dim]` (allocated on the
    /// first fold).
    acc: Vec<f32>,
}

impl Folds {
    pub(super) fn new() -> Self {
        Folds {
            seg: [usize::MAX; MAX_TILE_ROWS],
            folded: [false; MAX_TILE_ROWS],
            m: [0.0; MAX_PAIRS],
            l: [0.0; MAX_PAIRS],
            acc: Vec::new(),
        }
    }

    /// Whether row `i` reading block `bi` ends the segment it has state for
    /// (so [`Self::enter`] will fold that state and reset it).
    pub(super) fn leaves_segment(&self, s: &AttnShape, i: usize, bi: usize) -> bool {
        let sidx = bi * s.block_size / seg_keys(s.block_size);
        self.seg[i] != usize::MAX && self.seg[i] != sidx
    }

    /// Row `i` is about to read block `bi`: when that starts a new segment
    /// for it, folds and resets its state (`m`, `l`, `acc`: the tile's
    /// arrays, pairs `i * g..` and `[i * g * hd..]`).
    pub(super) fn enter(
        &mut self,
        s: &AttnShape,
        i: usize,
        bi: usize,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
    ) {
        let (g, hd) = (s.group, s.head_dim);
        let sidx = bi * s.block_size / seg_keys(s.block_size);
        if self.seg[i] == sidx {
            return;
        }
        if self.seg[i] != usize::MAX {
            let (p, a) = (i * g..(i + 1) * g, i * g * hd..(i + 1) * g * hd);
            if self.folded[i] {
                merge_state(
                    g,
                    hd,
                    &mut self.m[p.clone()],
                    &mut self.l[p.clone()],
                    &mut self.acc[a.clone()],
                    &m[p.clone()],
                    &l[p.clone()],
                    &acc[a.clone()],
                );
            } else {
                if self.acc.len() < a.end {
                    self.acc.resize(TILE_STATE.max(a.end), 0.0);
                }
                self.m[p.clone()].copy_from_slice(&m[p.clone()]);
                self.l[p.clone()].copy_from_slice(&l[p.clone()]);
                self.acc[a.clone()].copy_from_slice(&acc[a.clone()]);
                self.folded[i] = true;
            }
            m[p.clone()].fill(f32::NEG_INFINITY);
            l[p].fill(0.0);
            acc[a].fill(0.0);
        }
        self.seg[i] = sidx;
    }

    /// After the last block: row `i`'s whole state (all its segments
    /// folded in order) into the tile's arrays.
    pub(super) fn finish_row(
        &mut self,
        s: &AttnShape,
        i: usize,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
    ) {
        if !self.folded[i] {
            return;
        }
        let (g, hd) = (s.group, s.head_dim);
        let (p, a) = (i * g..(i + 1) * g, i * g * hd..(i + 1) * g * hd);
        merge_state(
            g,
            hd,
            &mut self.m[p.clone()],
            &mut self.l[p.clone()],
            &mut self.acc[a.clone()],
            &m[p.clone()],
            &l[p.clone()],
            &acc[a.clone()],
        );
        m[p.clone()].copy_from_slice(&self.m[p.clone()]);
        l[p.clone()].copy_from_slice(&self.l[p]);
        acc[a.clone()].copy_from_slice(&self.acc[a]);
    }
}

/// Folds segment state `part` (layout of [`part_len`]) into `merged`: a
/// copy when `first`, else [`merge_state`].
pub fn fold_part(s: &AttnShape, first: bool, merged: &mut [f32], part: &[f32]) {
    let (g, hd) = (s.group, s.head_dim);
    let n = part_len(s);
    if first {
        merged[..n].copy_from_slice(&part[..n]);
        return;
    }
    let (mm, rest) = merged[..n].split_at_mut(g);
    let (ml, macc) = rest.split_at_mut(g);
    merge_state(
        g,
        hd,
        mm,
        ml,
        macc,
        &part[..g],
        &part[g..2 * g],
        &part[2 * g..n],
    );
}

/// The attention output of `parts` (the states of a row's consecutive
/// segments, [`part_len`] floats each, from [`attend_part`]): folded in
/// order and normalised into `out` (`group * head_dim`). Bit-identical to
/// [`attend_rows`] on that row.
pub fn merge_parts(s: &AttnShape, parts: &[f32], out: &mut [f32]) {
    let (g, hd, n) = (s.group, s.head_dim, part_len(s));
    assert!(
        n > 0 && parts.len() >= n && parts.len().is_multiple_of(n) && out.len() >= g * hd,
        "merge_parts: bad sizes"
    );
    let mut merged = vec![0.0f32; n];
    for (i, p) in parts.chunks_exact(n).enumerate() {
        fold_part(s, i == 0, &mut merged, p);
    }
    finish_state(
        g,
        hd,
        &merged[g..2 * g],
        &merged[2 * g..],
        &mut out[..g * hd],
    );
}

/// Scale groups of one `q8_0` row of `kv_dim` elements.
pub fn q8_groups(kv_dim: usize) -> usize {
    kv_dim.div_ceil(Q8_GROUP)
}

/// Quantizes one group (at most [`Q8_GROUP`] elements) of a K or V row to
/// `q8_0`: `d = f16(max|x| / 127)`, `q = round(x / d)` (rounded against the
/// stored f16 scale, so that `d * q` is the nearest grid value); returns `d`.
/// Deterministic and independent of anything but `x`. NaN elements become 0.
pub fn quantize_q8_group(x: &[f32], out: &mut [i8]) -> f16 {
    debug_assert!(x.len() <= Q8_GROUP && out.len() == x.len());
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let df = d.to_f32();
    let id = if df > 0.0 { 1.0 / df } else { 0.0 };
    for (o, &v) in out.iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0).
        *o = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Rows per tile for shape `s`: as many as keep the tile's accumulators
/// (rows x group x head_dim floats) within 32 KiB, at most
/// [`MAX_TILE_ROWS`]; 1 for heads above 256.
pub fn tile_rows(s: &AttnShape) -> usize {
    if s.head_dim > MAX_TILE_HEAD_DIM || s.group == 0 || s.head_dim == 0 {
        return 1;
    }
    (TILE_STATE / (s.group * s.head_dim)).clamp(1, MAX_TILE_ROWS)
}

/// Shapes the one-row AVX-512 f16 kernel covers (see
/// [`super::attend_f16_isa`]); the tiled f16 engine runs on exactly these so
/// that prefill rows and decode rows use the same arithmetic.
fn avx512_f16_shape(head_dim: usize, group: usize) -> bool {
    matches!(
        (head_dim, group),
        (64, 1..=4) | (128, 1..=2) | (256, 1 | 2 | 4)
    )
}

/// Attention of the query heads of KV head `kvh` for several query rows of
/// one sequence (whose block table is `table`): row `i` has its `group x
/// head_dim` query at `q[i * q_stride..]`, attends to the positions
/// `keys[i]` (causal: `0..pos + 1`; sliding window: its last `window`) and
/// writes `out[i * out_stride..][..group * head_dim]`. Rows are processed in
/// tiles of [`tile_rows`]; each row's result is bit-identical to attending it
/// alone (module header).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows(
    s: &AttnShape,
    kv: KvView<'_>,
    kvh: usize,
    table: &[u32],
    keys: &[Range<usize>],
    q: &[f32],
    q_stride: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    attend_rows_isa(
        super::isa(),
        s,
        kv,
        kvh,
        table,
        keys,
        q,
        q_stride,
        out,
        out_stride,
    )
}

/// [`attend_rows`] with an explicit instruction set (capped at
/// [`super::detected_isa`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_isa(
    isa: Isa,
    s: &AttnShape,
    kv: KvView<'_>,
    kvh: usize,
    table: &[u32],
    keys: &[Range<usize>],
    q: &[f32],
    q_stride: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    tiles(
        isa, s, kv, kvh, table, keys, q, q_stride, out, out_stride, false,
    )
}

/// The state of one row's segment: like [`attend_rows`] on the one row
/// `keys` (which must lie inside one segment of [`segments`]), but writes
/// the softmax state (`part_len(s)` floats: max and sum of exponentials per
/// head, then the unnormalised output) into `part`. [`merge_parts`] over
/// the states of a row's segments, in order, gives exactly the bits of
/// [`attend_rows`] on that row, so segments can run on different threads.
#[allow(clippy::too_many_arguments)]
pub fn attend_part(
    s: &AttnShape,
    kv: KvView<'_>,
    kvh: usize,
    table: &[u32],
    keys: Range<usize>,
    q: &[f32],
    part: &mut [f32],
) {
    attend_part_isa(super::isa(), s, kv, kvh, table, keys, q, part)
}

/// [`attend_part`] with an explicit instruction set (capped at
/// [`super::detected_isa`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_part_isa(
    isa: Isa,
    s: &AttnShape,
    kv: KvView<'_>,
    kvh: usize,
    table: &[u32],
    keys: Range<usize>,
    q: &[f32],
    part: &mut [f32],
) {
    let n = part_len(s);
    assert!(
        part.len() >= n,
        "attend_part: state buffer shorter than part_len"
    );
    assert!(
        segments(s.block_size, keys.clone()).count() == 1,
        "attend_part: key range {keys:?} crosses a segment boundary"
    );
    let w = s.group * s.head_dim;
    tiles(
        isa,
        s,
        kv,
        kvh,
        table,
        std::slice::from_ref(&keys),
        &q[..w.min(q.len())],
        w,
        &mut part[..n],
        n,
        true,
    )
}

/// [`attend_rows_isa`], or with `raw` ([`attend_part_isa`]) each row's
/// state (`part_len` floats at `out[i * out_stride..]`; rows inside one
/// segment).
#[allow(clippy::too_many_arguments)]
fn tiles(
    isa: Isa,
    s: &AttnShape,
    kv: KvView<'_>,
    kvh: usize,
    table: &[u32],
    keys: &[Range<usize>],
    q: &[f32],
    q_stride: usize,
    out: &mut [f32],
    out_stride: usize,
    raw: bool,
) {
    let w = s.group * s.head_dim;
    // Where a row's output (or, with `raw`, its unnormalised output) is.
    let (ow, o0) = if raw {
        (part_len(s), 2 * s.group)
    } else {
        (w, 0)
    };
    let t = keys.len();
    if t == 0 {
        return;
    }
    assert!(
        q_stride >= w && out_stride >= ow,
        "attend_rows: row strides must hold group x head_dim"
    );
    assert!(
        q.len() >= (t - 1) * q_stride + w && out.len() >= (t - 1) * out_stride + ow,
        "attend_rows: q/out hold too few rows"
    );
    // Every row's own preconditions (those of the one-row kernels).
    for (i, r) in keys.iter().enumerate() {
        let (qi, oi) = (
            &q[i * q_stride..i * q_stride + w],
            &out[i * out_stride + o0..i * out_stride + o0 + w],
        );
        match kv {
            KvView::F16(k, v) => s.check(qi, kvh, k, v, table, r, oi),
            KvView::Bf16(k, v) => s.check(qi, kvh, k, v, table, r, oi),
            KvView::F32(k, v) => s.check(qi, kvh, k, v, table, r, oi),
            KvView::Q8(a) => s.check(qi, kvh, a.k, a.v, table, r, oi),
        }
    }
    if let KvView::Q8(a) = kv {
        let nblk = a.k.len().min(a.v.len()) / (s.block_size * s.kv_dim);
        let scales = nblk * s.block_size * q8_groups(s.kv_dim);
        assert!(
            a.k_scale.len() >= scales && a.v_scale.len() >= scales,
            "attend_rows: q8_0 scale arrays shorter than the blocks"
        );
    }
    let tr = tile_rows(s);
    let isa = isa.min(super::detected_isa());
    let simd_hd = s.head_dim.is_multiple_of(16) && s.head_dim <= MAX_TILE_HEAD_DIM;
    for i0 in (0..t).step_by(tr) {
        let n = tr.min(t - i0);
        let rows = &keys[i0..i0 + n];
        let (qt, ot) = (&q[i0 * q_stride..], &mut out[i0 * out_stride..]);
        match kv {
            KvView::F16(k, v) => {
                if isa >= Isa::Avx512Vnni && avx512_f16_shape(s.head_dim, s.group) && n > 1 && !raw
                {
                    #[cfg(target_arch = "x86_64")]
                    {
                        // SAFETY: AVX-512 was detected (`isa` is capped at
                        // `detected_isa`); every row passed `check` (q/out
                        // sizes, KV head, key range, table length, block
                        // ids inside `k` and `v`); the shape has head_dim a
                        // multiple of 16 and at most 256, and `n` rows of
                        // `group` heads fit the tile state (`tile_rows`);
                        // with `raw` each output row holds `part_len` floats.
                        unsafe {
                            super::avx512::attention::tile(
                                &super::avx512::attention::Src::F16 {
                                    k: k.as_ptr(),
                                    v: v.as_ptr(),
                                },
                                s,
                                kvh,
                                table,
                                rows,
                                qt.as_ptr(),
                                q_stride,
                                ot.as_mut_ptr(),
                                out_stride,
                                raw,
                            )
                        };
                        continue;
                    }
                }
                // The one-row kernels, row by row (their own ISA choice).
                for (i, r) in rows.iter().enumerate() {
                    let qi = &qt[i * q_stride..i * q_stride + w];
                    if raw {
                        let (m, rest) =
                            ot[i * out_stride..i * out_stride + ow].split_at_mut(s.group);
                        let (l, acc) = rest.split_at_mut(s.group);
                        super::attend_f16_part(isa, s, qi, kvh, k, v, table, r.clone(), m, l, acc);
                    } else {
                        super::attend_f16_isa(
                            isa,
                            s,
                            qi,
                            kvh,
                            k,
                            v,
                            table,
                            r.clone(),
                            &mut ot[i * out_stride..i * out_stride + w],
                        );
                    }
                }
            }
            KvView::Bf16(k, v) => tile_scalar(
                s,
                &Plain {
                    k,
                    v,
                    cvt: bf16::to_f32,
                },
                kvh,
                table,
                rows,
                qt,
                q_stride,
                ot,
                out_stride,
                raw,
            ),
            KvView::F32(k, v) => tile_scalar(
                s,
                &Plain {
                    k,
                    v,
                    cvt: |x: f32| x,
                },
                kvh,
                table,
                rows,
                qt,
                q_stride,
                ot,
                out_stride,
                raw,
            ),
            KvView::Q8(a) => {
                if isa >= Isa::Avx512Vnni && simd_hd {
                    #[cfg(target_arch = "x86_64")]
                    {
                        // SAFETY: as for f16 above; the scale arrays hold
                        // every block's groups (checked above).
                        unsafe {
                            super::avx512::attention::tile(
                                &super::avx512::attention::Src::Q8 {
                                    k: a.k.as_ptr(),
                                    ks: a.k_scale.as_ptr(),
                                    v: a.v.as_ptr(),
                                    vs: a.v_scale.as_ptr(),
                                },
                                s,
                                kvh,
                                table,
                                rows,
                                qt.as_ptr(),
                                q_stride,
                                ot.as_mut_ptr(),
                                out_stride,
                                raw,
                            )
                        };
                        continue;
                    }
                }
                tile_scalar(s, &a, kvh, table, rows, qt, q_stride, ot, out_stride, raw)
            }
        }
    }
}

/// Scalar reference of the tiled engine for `q8_0` (any shape): the
/// arithmetic of [`super::scalar::attend`] over dequantized keys and values.
/// For tests and comparisons; [`attend_rows`] picks it where no SIMD engine
/// applies.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_q8_ref(
    s: &AttnShape,
    kv: Q8Kv<'_>,
    kvh: usize,
    table: &[u32],
    keys: &[Range<usize>],
    q: &[f32],
    q_stride: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    attend_rows_isa(
        Isa::Scalar,
        s,
        KvView::Q8(kv),
        kvh,
        table,
        keys,
        q,
        q_stride,
        out,
        out_stride,
    )
}

/// Source of f32 key/value chunks for the scalar engine.
trait ChunkSrc {
    /// `kf[d * 16 + j]` = dimension `d` of key `c + j` of block `blk`, KV
    /// head `kvh`, for `j < n`.
    fn keys(&self, s: &AttnShape, blk: usize, kvh: usize, c: usize, n: usize, kf: &mut [f32]);
    /// `vf[j * head_dim + e]` = element `e` of value `c + j`, for `j < n`.
    fn values(&self, s: &AttnShape, blk: usize, kvh: usize, c: usize, n: usize, vf: &mut [f32]);
}

/// f16 / bf16 / f32 storage converted element by element.
struct Plain<'a, T, F> {
    k: &'a [T],
    v: &'a [T],
    cvt: F,
}

impl<T: Copy, F: Fn(T) -> f32> ChunkSrc for Plain<'_, T, F> {
    fn keys(&self, s: &AttnShape, blk: usize, kvh: usize, c: usize, n: usize, kf: &mut [f32]) {
        let (hd, bs) = (s.head_dim, s.block_size);
        let kt = blk * bs * s.kv_dim + kvh * hd * bs;
        for d in 0..hd {
            for j in 0..n {
                kf[d * ATT_CHUNK + j] = (self.cvt)(self.k[kt + d * bs + c + j]);
            }
        }
    }
    fn values(&self, s: &AttnShape, blk: usize, kvh: usize, c: usize, n: usize, vf: &mut [f32]) {
        let (hd, bs) = (s.head_dim, s.block_size);
        for j in 0..n {
            let row = (blk * bs + c + j) * s.kv_dim + kvh * hd;
            for e in 0..hd {
                vf[j * hd + e] = (self.cvt)(self.v[row + e]);
            }
        }
    }
}

impl ChunkSrc for Q8Kv<'_> {
    fn keys(&self, s: &AttnShape, blk: usize, kvh: usize, c: usize, n: usize, kf: &mut [f32]) {
        let (hd, bs, ng) = (s.head_dim, s.block_size, q8_groups(s.kv_dim));
        let kt = blk * bs * s.kv_dim + kvh * hd * bs;
        for d in 0..hd {
            let sc = blk * ng * bs + (kvh * hd + d) / Q8_GROUP * bs;
            for j in 0..n {
                kf[d * ATT_CHUNK + j] =
                    self.k_scale[sc + c + j].to_f32() * self.k[kt + d * bs + c + j] as f32;
            }
        }
    }
    fn values(&self, s: &AttnShape, blk: usize, kvh: usize, c: usize, n: usize, vf: &mut [f32]) {
        let (hd, bs, ng) = (s.head_dim, s.block_size, q8_groups(s.kv_dim));
        for j in 0..n {
            let slot = blk * bs + c + j;
            let row = slot * s.kv_dim + kvh * hd;
            for e in 0..hd {
                let d = self.v_scale[slot * ng + (kvh * hd + e) / Q8_GROUP].to_f32();
                vf[j * hd + e] = d * self.v[row + e] as f32;
            }
        }
    }
}

/// Per-row chunk grid of a tile: calls `f(block index, first key offset,
/// rows)` for each block some row reads, once for the rows whose chunks in
/// that block start at offset 0 and once for each row whose sliding window
/// starts inside it; blocks in increasing order (each row's keys in order).
pub(super) fn for_each_block(
    bs: usize,
    keys: &[Range<usize>],
    mut f: impl FnMut(usize, usize, &[usize]),
) {
    let bmin = keys.iter().map(|r| r.start / bs).min().unwrap_or(0);
    let bend = keys.iter().map(|r| r.end.div_ceil(bs)).max().unwrap_or(0);
    let mut shared = [0usize; MAX_TILE_ROWS];
    for bi in bmin..bend {
        let mut ns = 0;
        for (i, r) in keys.iter().enumerate() {
            let first = r.start / bs;
            if bi < first || bi * bs >= r.end {
                continue;
            }
            let off = if bi == first { r.start - bi * bs } else { 0 };
            if off == 0 {
                shared[ns] = i;
                ns += 1;
            } else {
                f(bi, off, &[i]);
            }
        }
        if ns > 0 {
            f(bi, 0, &shared[..ns]);
        }
    }
}

/// The scalar tiled engine: [`super::scalar::attend`]'s steps for each row
/// (segments folded as in [`run_segments`]). With `raw`, writes each row's
/// state instead ([`part_len`] floats; rows then lie in one segment).
#[allow(clippy::too_many_arguments)]
fn tile_scalar(
    s: &AttnShape,
    src: &impl ChunkSrc,
    kvh: usize,
    table: &[u32],
    keys: &[Range<usize>],
    q: &[f32],
    qs: usize,
    out: &mut [f32],
    os: usize,
    raw: bool,
) {
    const C: usize = ATT_CHUNK;
    let (hd, g, bs) = (s.head_dim, s.group, s.block_size);
    if hd > MAX_TILE_HEAD_DIM {
        // One row at a time through the one-row reference (same steps).
        for (i, r) in keys.iter().enumerate() {
            let qi = &q[i * qs..i * qs + g * hd];
            if raw {
                let (m, rest) = out[i * os..i * os + part_len(s)].split_at_mut(g);
                let (l, acc) = rest.split_at_mut(g);
                one_row_scalar(s, src, kvh, table, r.clone(), qi, m, l, acc);
            } else {
                let oi = &mut out[i * os..i * os + g * hd];
                run_segments(s, r.clone(), oi, |seg, m, l, acc| {
                    one_row_scalar(s, src, kvh, table, seg, qi, m, l, acc)
                });
            }
        }
        return;
    }
    let t = keys.len();
    debug_assert!(t * g * hd <= TILE_STATE && t <= MAX_TILE_ROWS);
    let mut m = [f32::NEG_INFINITY; MAX_PAIRS];
    let mut l = [0.0f32; MAX_PAIRS];
    let mut p = [[0.0f32; C]; MAX_PAIRS];
    let mut acc = [0.0f32; TILE_STATE];
    let mut kf = [0.0f32; MAX_TILE_HEAD_DIM * C];
    let mut vf = [0.0f32; MAX_TILE_HEAD_DIM * C];
    let mut folds = Folds::new();
    for_each_block(bs, keys, |bi, off, rows| {
        let blk = table[bi] as usize;
        for &i in rows {
            folds.enter(s, i, bi, &mut m, &mut l, &mut acc);
        }
        let cnt = |i: usize| bs.min(keys[i].end - bi * bs);
        let cmax = rows.iter().map(|&i| cnt(i)).max().unwrap_or(0);
        let mut c = off;
        while c < cmax {
            let nmax = C.min(cmax - c);
            src.keys(s, blk, kvh, c, nmax, &mut kf);
            src.values(s, blk, kvh, c, nmax, &mut vf);
            for &i in rows {
                if c >= cnt(i) {
                    continue;
                }
                let n = C.min(cnt(i) - c);
                let qi = &q[i * qs..i * qs + g * hd];
                chunk_scalar(
                    s,
                    qi,
                    &kf,
                    &vf,
                    n,
                    &mut m[i * g..],
                    &mut l[i * g..],
                    &mut p[i * g..],
                    &mut acc[i * g * hd..(i + 1) * g * hd],
                );
            }
            c += C;
        }
    });
    for i in 0..t {
        folds.finish_row(s, i, &mut m, &mut l, &mut acc);
        let (p, a) = (i * g..(i + 1) * g, i * g * hd..(i + 1) * g * hd);
        if raw {
            let o = &mut out[i * os..i * os + part_len(s)];
            o[..g].copy_from_slice(&m[p.clone()]);
            o[g..2 * g].copy_from_slice(&l[p]);
            o[2 * g..].copy_from_slice(&acc[a]);
        } else {
            finish_state(g, hd, &l[p], &acc[a], &mut out[i * os..i * os + g * hd]);
        }
    }
}

/// One chunk of `n` keys for the `g` heads of one row: scores, online
/// softmax update and value accumulation (the steps of
/// [`super::scalar::attend`] for one chunk).
#[allow(clippy::too_many_arguments)]
fn chunk_scalar(
    s: &AttnShape,
    q: &[f32],
    kf: &[f32],
    vf: &[f32],
    n: usize,
    m: &mut [f32],
    l: &mut [f32],
    p: &mut [[f32; ATT_CHUNK]],
    acc: &mut [f32],
) {
    const C: usize = ATT_CHUNK;
    let (hd, g) = (s.head_dim, s.group);
    for gi in 0..g {
        // Two partial sums per key (even / odd d).
        let mut a2 = [[0.0f32; C]; 2];
        for d in 0..hd {
            let qd = q[gi * hd + d];
            for (a, &x) in a2[d % 2].iter_mut().zip(&kf[d * C..d * C + n]) {
                *a += qd * x;
            }
        }
        let mut sc = [f32::NEG_INFINITY; C];
        for (j, scj) in sc.iter_mut().enumerate().take(n) {
            *scj = (a2[0][j] + a2[1][j]) * s.scale;
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
        for o in acc[gi * hd..(gi + 1) * hd].iter_mut() {
            *o *= corr;
        }
    }
    for j in 0..n {
        let vr = &vf[j * hd..(j + 1) * hd];
        for gi in 0..g {
            let pw = p[gi][j];
            for (o, &x) in acc[gi * hd..(gi + 1) * hd].iter_mut().zip(vr) {
                *o += pw * x;
            }
        }
    }
}

/// One segment of one row through [`chunk_scalar`] with heap state (heads
/// above 256): its max `mo`, sum `lo` per head and unnormalised output `out`.
#[allow(clippy::too_many_arguments)]
fn one_row_scalar(
    s: &AttnShape,
    src: &impl ChunkSrc,
    kvh: usize,
    table: &[u32],
    keys: Range<usize>,
    q: &[f32],
    mo: &mut [f32],
    lo: &mut [f32],
    out: &mut [f32],
) {
    const C: usize = ATT_CHUNK;
    let (hd, g, bs) = (s.head_dim, s.group, s.block_size);
    let mut m = vec![f32::NEG_INFINITY; g];
    let mut l = vec![0.0f32; g];
    let mut p = vec![[0.0f32; C]; g];
    let mut acc = vec![0.0f32; g * hd];
    let mut kf = vec![0.0f32; hd * C];
    let mut vf = vec![0.0f32; hd * C];
    let rows = [keys.clone()];
    for_each_block(bs, &rows, |bi, off, _| {
        let blk = table[bi] as usize;
        let cnt = bs.min(keys.end - bi * bs);
        for c in (off..cnt).step_by(C) {
            let n = C.min(cnt - c);
            src.keys(s, blk, kvh, c, n, &mut kf);
            src.values(s, blk, kvh, c, n, &mut vf);
            chunk_scalar(s, q, &kf, &vf, n, &mut m, &mut l, &mut p, &mut acc);
        }
    });
    mo[..g].copy_from_slice(&m);
    lo[..g].copy_from_slice(&l);
    out[..g * hd].copy_from_slice(&acc);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{attend_f16_isa, attend_ref, available_isas, scalar};
    use rand::{Rng, SeedableRng};

    /// Per position, one head's keys (or values).
    type Rows = Vec<Vec<f32>>;

    /// A random paged cache of `nblk` blocks in every storage format, with a
    /// shuffled block table covering `n_ctx` positions.
    struct Cache {
        table: Vec<u32>,
        kf16: Vec<f16>,
        vf16: Vec<f16>,
        kbf: Vec<bf16>,
        vbf: Vec<bf16>,
        k32: Vec<f32>,
        v32: Vec<f32>,
        kq: Vec<i8>,
        ks: Vec<f16>,
        vq: Vec<i8>,
        vs: Vec<f16>,
        /// Dequantized q8_0 keys / values per head and position.
        deq: Vec<(Rows, Rows)>,
    }

    impl Cache {
        fn new(rng: &mut rand::rngs::SmallRng, s: AttnShape, n_ctx: usize) -> Self {
            let (hd, bs, kd) = (s.head_dim, s.block_size, s.kv_dim);
            let nb = n_ctx.div_ceil(bs);
            let nblk = nb + 3;
            let mut table: Vec<u32> = (0..nblk as u32).collect();
            for i in (1..table.len()).rev() {
                table.swap(i, rng.gen_range(0..=i));
            }
            table.truncate(nb);
            let ng = q8_groups(kd);
            let mut c = Cache {
                table,
                kf16: vec![f16::ZERO; nblk * bs * kd],
                vf16: vec![f16::ZERO; nblk * bs * kd],
                kbf: vec![bf16::ZERO; nblk * bs * kd],
                vbf: vec![bf16::ZERO; nblk * bs * kd],
                k32: vec![0.0; nblk * bs * kd],
                v32: vec![0.0; nblk * bs * kd],
                kq: vec![0; nblk * bs * kd],
                ks: vec![f16::ZERO; nblk * bs * ng],
                vq: vec![0; nblk * bs * kd],
                vs: vec![f16::ZERO; nblk * bs * ng],
                deq: vec![(vec![vec![0.0; hd]; n_ctx], vec![vec![0.0; hd]; n_ctx]); kd / hd],
            };
            for pos in 0..n_ctx {
                let (blk, off) = (c.table[pos / bs] as usize, pos % bs);
                let slot = blk * bs + off;
                let kr: Vec<f32> = (0..kd).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
                let vr: Vec<f32> = (0..kd).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                for e in 0..kd {
                    let (h, d) = (e / hd, e % hd);
                    let ki = blk * bs * kd + h * hd * bs + d * bs + off;
                    let vi = slot * kd + e;
                    c.kf16[ki] = f16::from_f32(kr[e]);
                    c.vf16[vi] = f16::from_f32(vr[e]);
                    c.kbf[ki] = bf16::from_f32(kr[e]);
                    c.vbf[vi] = bf16::from_f32(vr[e]);
                    c.k32[ki] = kr[e];
                    c.v32[vi] = vr[e];
                }
                for gi in 0..ng {
                    let r = gi * Q8_GROUP..kd.min(gi * Q8_GROUP + Q8_GROUP);
                    let mut qk = vec![0i8; r.len()];
                    let dk = quantize_q8_group(&kr[r.clone()], &mut qk);
                    c.ks[blk * ng * bs + gi * bs + off] = dk;
                    let dv = quantize_q8_group(
                        &vr[r.clone()],
                        &mut c.vq[slot * kd + r.start..slot * kd + r.end],
                    );
                    c.vs[slot * ng + gi] = dv;
                    for (x, e) in r.enumerate() {
                        let (h, d) = (e / hd, e % hd);
                        c.kq[blk * bs * kd + h * hd * bs + d * bs + off] = qk[x];
                        c.deq[h].0[pos][d] = dk.to_f32() * qk[x] as f32;
                        c.deq[h].1[pos][d] = dv.to_f32() * c.vq[slot * kd + e] as f32;
                    }
                }
            }
            c
        }

        fn q8(&self) -> Q8Kv<'_> {
            Q8Kv {
                k: &self.kq,
                k_scale: &self.ks,
                v: &self.vq,
                v_scale: &self.vs,
            }
        }
    }

    /// Softmax attention in f64 over explicit keys / values.
    fn exact(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        scale: f32,
        cap: Option<f32>,
    ) -> Vec<f64> {
        let sc: Vec<f64> = keys
            .iter()
            .map(|k| {
                let x = q
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale as f64;
                cap.map_or(x, |c| c as f64 * (x / c as f64).tanh())
            })
            .collect();
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut out = vec![0.0f64; q.len()];
        for (p, v) in e.iter().zip(vals) {
            for (o, &x) in out.iter_mut().zip(v) {
                *o += p / sum * x as f64;
            }
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every (shape, block size, window, soft-cap, tile) combination: the
    /// tiled result of each row equals the one-row kernels bit for bit (f16
    /// per ISA, bf16 and f32 against `attend_ref`, q8_0 against the same
    /// engine on that row alone), and q8_0 is close to exact attention over
    /// its dequantized values (scalar and SIMD engines).
    #[test]
    fn tiled_rows_equal_one_row_kernels_bit_for_bit() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(14);
        let shapes = [
            (64, 1, 2),
            (64, 3, 3),
            (64, 4, 1),
            (128, 2, 2),
            (256, 4, 1),
            (256, 1, 1),
            (64, 5, 1),
            (32, 2, 2),
            (128, 3, 1),
            (16, 1, 3),
            (48, 2, 1),
        ];
        let mut cases = 0;
        for &(hd, group, kvn) in &shapes {
            for bs in [4usize, 16, 32] {
                for (window, softcap) in [
                    (None, None),
                    (Some(7), None),
                    (Some(40), None),
                    (None, Some(5.0f32)),
                ] {
                    let n_ctx = 70 + rng.gen_range(0..30);
                    let kv_dim = kvn * hd;
                    let scale = if softcap.is_some() {
                        4.0
                    } else {
                        1.0 / (hd as f32).sqrt()
                    };
                    let s = AttnShape {
                        head_dim: hd,
                        group,
                        block_size: bs,
                        kv_dim,
                        scale,
                        softcap,
                    };
                    let c = Cache::new(&mut rng, s, n_ctx);
                    let w = group * hd;
                    // Rows: positions p0..n_ctx (consecutive, as a prefill chunk).
                    let p0 = rng.gen_range(0..n_ctx - 20);
                    let t = n_ctx - p0;
                    let keys: Vec<Range<usize>> = (p0..n_ctx)
                        .map(|p| window.map_or(0, |wn| (p + 1).saturating_sub(wn))..p + 1)
                        .collect();
                    let stride = kvn * w + 3;
                    let q: Vec<f32> = (0..t * stride)
                        .map(|_| rng.gen_range(-1.0f32..1.0))
                        .collect();
                    let case = format!("hd {hd} g {group} kvh {kvn} bs {bs} window {window:?} cap {softcap:?} rows {p0}..{n_ctx}");
                    for kvh in 0..kvn {
                        let qh = &q[kvh * w..];
                        for isa in available_isas() {
                            let run = |kv: KvView<'_>| {
                                let mut out = vec![f32::NAN; t * stride];
                                attend_rows_isa(
                                    isa,
                                    &s,
                                    kv,
                                    kvh,
                                    &c.table,
                                    &keys,
                                    qh,
                                    stride,
                                    &mut out[kvh * w..],
                                    stride,
                                );
                                out
                            };
                            let row = |i: usize| &qh[i * stride..i * stride + w];
                            let (f16o, bfo, f32o, q8o) = (
                                run(KvView::F16(&c.kf16, &c.vf16)),
                                run(KvView::Bf16(&c.kbf, &c.vbf)),
                                run(KvView::F32(&c.k32, &c.v32)),
                                run(KvView::Q8(c.q8())),
                            );
                            for i in 0..t {
                                let got = |o: &[f32]| {
                                    o[kvh * w + i * stride..kvh * w + i * stride + w].to_vec()
                                };
                                let mut want = vec![0.0f32; w];
                                attend_f16_isa(
                                    isa,
                                    &s,
                                    row(i),
                                    kvh,
                                    &c.kf16,
                                    &c.vf16,
                                    &c.table,
                                    keys[i].clone(),
                                    &mut want,
                                );
                                assert_eq!(
                                    bits(&got(&f16o)),
                                    bits(&want),
                                    "f16 {isa:?} {case} row {i}"
                                );
                                attend_ref(
                                    &s,
                                    row(i),
                                    kvh,
                                    &c.kbf,
                                    &c.vbf,
                                    &c.table,
                                    keys[i].clone(),
                                    &mut want,
                                    bf16::to_f32,
                                );
                                assert_eq!(
                                    bits(&got(&bfo)),
                                    bits(&want),
                                    "bf16 {isa:?} {case} row {i}"
                                );
                                attend_ref(
                                    &s,
                                    row(i),
                                    kvh,
                                    &c.k32,
                                    &c.v32,
                                    &c.table,
                                    keys[i].clone(),
                                    &mut want,
                                    |x| x,
                                );
                                assert_eq!(
                                    bits(&got(&f32o)),
                                    bits(&want),
                                    "f32 {isa:?} {case} row {i}"
                                );
                                // q8_0: the row alone (a decode step) gives the same bits.
                                attend_rows_isa(
                                    isa,
                                    &s,
                                    KvView::Q8(c.q8()),
                                    kvh,
                                    &c.table,
                                    &keys[i..i + 1],
                                    row(i),
                                    w,
                                    &mut want,
                                    w,
                                );
                                assert_eq!(
                                    bits(&got(&q8o)),
                                    bits(&want),
                                    "q8_0 {isa:?} {case} row {i}"
                                );
                                // ... and is close to exact attention over the dequantized cache.
                                let (dk, dv) = &c.deq[kvh];
                                let tol = if softcap.is_some() { 3e-5 } else { 1e-5 };
                                for gi in 0..group {
                                    let r = keys[i].clone();
                                    let e = exact(
                                        &row(i)[gi * hd..(gi + 1) * hd],
                                        &dk[r.clone()],
                                        &dv[r],
                                        scale,
                                        softcap,
                                    );
                                    for (a, b) in got(&q8o)[gi * hd..(gi + 1) * hd].iter().zip(&e) {
                                        assert!(
                                            (*a as f64 - b).abs() < tol,
                                            "q8_0 {isa:?} {case} row {i}: {a} vs {b}"
                                        );
                                    }
                                }
                                cases += 1;
                            }
                            // Padding between rows is never written.
                            assert!(
                                f16o[kvh * w + w..kvh * w + stride]
                                    .iter()
                                    .all(|x| x.is_nan()),
                                "{case}: wrote outside the rows"
                            );
                        }
                    }
                }
            }
        }
        assert!(cases > 1000, "{cases}");
    }

    /// Rows whose keys cross several segment boundaries (windows starting
    /// inside a segment, block sizes dividing the segment or not): the tiled
    /// engines, the one-row kernels and segment states merged with
    /// [`merge_parts`] (each segment alone, as on separate threads, computed
    /// last first) give the same bits, per ISA and storage type, and stay
    /// close to exact attention.
    #[test]
    fn segmented_rows_are_bit_identical_across_paths() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
        let shapes = [(64, 3, 3), (256, 4, 1), (128, 2, 1), (64, 5, 1)];
        let (mut cases, mut crossing) = (0, 0);
        for &(hd, group, kvn) in &shapes {
            for (bs, window, softcap) in [
                (16usize, None, None),
                (16, Some(1500), None),
                (32, Some(600), Some(5.0f32)),
                (48, Some(2100), None),
                (4, None, None),
            ] {
                let n_ctx = 2 * SEG_KEYS + 300 + rng.gen_range(0..100);
                let kv_dim = kvn * hd;
                let scale = if softcap.is_some() {
                    4.0
                } else {
                    1.0 / (hd as f32).sqrt()
                };
                let s = AttnShape {
                    head_dim: hd,
                    group,
                    block_size: bs,
                    kv_dim,
                    scale,
                    softcap,
                };
                let c = Cache::new(&mut rng, s, n_ctx);
                let w = group * hd;
                let sl = seg_keys(bs);
                // Rows: a tile across the second segment boundary, and the last rows.
                let mut pos: Vec<usize> = (2 * sl - 5..2 * sl + 4).collect();
                pos.extend(n_ctx - 6..n_ctx);
                let keys: Vec<Range<usize>> = pos
                    .iter()
                    .map(|&p| window.map_or(0, |wn| (p + 1).saturating_sub(wn))..p + 1)
                    .collect();
                crossing += keys
                    .iter()
                    .filter(|r| segments(bs, (*r).clone()).count() >= 2)
                    .count();
                let t = keys.len();
                let q: Vec<f32> = (0..t * kvn * w)
                    .map(|_| rng.gen_range(-1.0f32..1.0))
                    .collect();
                let case = format!(
                    "hd {hd} g {group} kvh {kvn} bs {bs} window {window:?} cap {softcap:?}"
                );
                let kvs = [
                    ("f16", KvView::F16(&c.kf16, &c.vf16)),
                    ("bf16", KvView::Bf16(&c.kbf, &c.vbf)),
                    ("f32", KvView::F32(&c.k32, &c.v32)),
                    ("q8_0", KvView::Q8(c.q8())),
                ];
                for kvh in 0..kvn {
                    let qh = &q[kvh * w..];
                    let row = |i: usize| &qh[i * kvn * w..i * kvn * w + w];
                    // f32 keys / values of this head per position.
                    let f32kv = |p: usize| -> (Vec<f32>, Vec<f32>) {
                        let (blk, off) = (c.table[p / bs] as usize, p % bs);
                        let k = (0..hd)
                            .map(|d| c.k32[blk * bs * kv_dim + kvh * hd * bs + d * bs + off])
                            .collect();
                        let v = (0..hd)
                            .map(|d| c.v32[(blk * bs + off) * kv_dim + kvh * hd + d])
                            .collect();
                        (k, v)
                    };
                    for isa in available_isas() {
                        for (name, kv) in kvs {
                            // Tiled: consecutive rows in tiles, the two groups separately.
                            let mut tiled = vec![f32::NAN; t * w];
                            for (a, b) in [(0, 9), (9, t)] {
                                attend_rows_isa(
                                    isa,
                                    &s,
                                    kv,
                                    kvh,
                                    &c.table,
                                    &keys[a..b],
                                    &qh[a * kvn * w..],
                                    kvn * w,
                                    &mut tiled[a * w..],
                                    w,
                                );
                            }
                            for i in 0..t {
                                let got = &tiled[i * w..(i + 1) * w];
                                let mut one = vec![f32::NAN; w];
                                attend_rows_isa(
                                    isa,
                                    &s,
                                    kv,
                                    kvh,
                                    &c.table,
                                    &keys[i..i + 1],
                                    row(i),
                                    w,
                                    &mut one,
                                    w,
                                );
                                assert_eq!(
                                    bits(got),
                                    bits(&one),
                                    "{name} {isa:?} {case} row {i}: tiled vs one row"
                                );
                                // The one-row kernels themselves.
                                let mut want = vec![f32::NAN; w];
                                match kv {
                                    KvView::F16(k, v) => attend_f16_isa(
                                        isa,
                                        &s,
                                        row(i),
                                        kvh,
                                        k,
                                        v,
                                        &c.table,
                                        keys[i].clone(),
                                        &mut want,
                                    ),
                                    KvView::Bf16(k, v) => attend_ref(
                                        &s,
                                        row(i),
                                        kvh,
                                        k,
                                        v,
                                        &c.table,
                                        keys[i].clone(),
                                        &mut want,
                                        bf16::to_f32,
                                    ),
                                    KvView::F32(k, v) => attend_ref(
                                        &s,
                                        row(i),
                                        kvh,
                                        k,
                                        v,
                                        &c.table,
                                        keys[i].clone(),
                                        &mut want,
                                        |x| x,
                                    ),
                                    KvView::Q8(_) => want.copy_from_slice(&one),
                                }
                                assert_eq!(
                                    bits(got),
                                    bits(&want),
                                    "{name} {isa:?} {case} row {i}: tiled vs one-row kernel"
                                );
                                // Segment states computed separately (last first), merged in order.
                                let segs: Vec<Range<usize>> =
                                    segments(bs, keys[i].clone()).collect();
                                let pl = part_len(&s);
                                let mut parts = vec![f32::NAN; segs.len() * pl];
                                for (j, seg) in segs.iter().enumerate().rev() {
                                    attend_part_isa(
                                        isa,
                                        &s,
                                        kv,
                                        kvh,
                                        &c.table,
                                        seg.clone(),
                                        row(i),
                                        &mut parts[j * pl..(j + 1) * pl],
                                    );
                                }
                                let mut merged = vec![f32::NAN; w];
                                merge_parts(&s, &parts, &mut merged);
                                assert_eq!(
                                    bits(got),
                                    bits(&merged),
                                    "{name} {isa:?} {case} row {i}: merged segments"
                                );
                                // Close to exact attention (q8_0 over its dequantized cache).
                                if name == "q8_0" || name == "f32" {
                                    let r = keys[i].clone();
                                    let (dk, dv): (Rows, Rows) = if name == "q8_0" {
                                        (
                                            c.deq[kvh].0[r.clone()].to_vec(),
                                            c.deq[kvh].1[r.clone()].to_vec(),
                                        )
                                    } else {
                                        r.clone().map(f32kv).unzip()
                                    };
                                    let tol = if softcap.is_some() { 3e-5 } else { 1e-5 };
                                    for gi in 0..group {
                                        let e = exact(
                                            &row(i)[gi * hd..(gi + 1) * hd],
                                            &dk,
                                            &dv,
                                            scale,
                                            softcap,
                                        );
                                        for (a, b) in got[gi * hd..(gi + 1) * hd].iter().zip(&e) {
                                            assert!(
                                                (*a as f64 - b).abs() < tol,
                                                "{name} {isa:?} {case} row {i}: {a} vs {b}"
                                            );
                                        }
                                    }
                                }
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(cases > 500 && crossing > 200, "{cases} {crossing}");
    }

    #[test]
    fn segments_are_aligned_to_absolute_positions() {
        assert_eq!(seg_keys(16), SEG_KEYS);
        assert_eq!(seg_keys(48), SEG_KEYS / 48 * 48);
        assert_eq!(seg_keys(4096), 4096);
        let sl = SEG_KEYS;
        assert_eq!(segments(16, 0..5).collect::<Vec<_>>(), vec![0..5]);
        assert_eq!(segments(16, 10..sl).collect::<Vec<_>>(), vec![10..sl]);
        assert_eq!(
            segments(16, 10..sl + 1).collect::<Vec<_>>(),
            vec![10..sl, sl..sl + 1]
        );
        assert_eq!(
            segments(16, sl + 3..3 * sl + 7).collect::<Vec<_>>(),
            vec![sl + 3..2 * sl, 2 * sl..3 * sl, 3 * sl..3 * sl + 7]
        );
        assert_eq!(segments(16, 4..4).count(), 0);
    }

    /// The scalar engine on one row is the scalar one-row reference.
    #[test]
    fn scalar_engine_matches_scalar_attend() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let s = AttnShape {
            head_dim: 64,
            group: 3,
            block_size: 16,
            kv_dim: 128,
            scale: 0.125,
            softcap: None,
        };
        let c = Cache::new(&mut rng, s, 50);
        let q: Vec<f32> = (0..3 * 64).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut want = vec![0.0; 3 * 64];
        scalar::attend(
            &s,
            &q,
            1,
            &c.kf16,
            &c.vf16,
            &c.table,
            3..50,
            &mut want,
            f16::to_f32,
        );
        let mut got = vec![0.0; 3 * 64];
        attend_rows_isa(
            Isa::Scalar,
            &s,
            KvView::F16(&c.kf16, &c.vf16),
            1,
            &c.table,
            std::slice::from_ref(&(3..50)),
            &q,
            3 * 64,
            &mut got,
            3 * 64,
        );
        assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn q8_group_quantization() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect();
        let mut q = [0i8; 32];
        let d = quantize_q8_group(&x, &mut q).to_f32();
        assert!(q.iter().any(|&v| v.abs() == 127));
        for (a, &b) in x.iter().zip(&q) {
            assert!(
                (a - d * b as f32).abs() <= 0.5 * d * 1.0001,
                "{a} vs {}",
                d * b as f32
            );
        }
        let mut q = [5i8; 7];
        assert_eq!(quantize_q8_group(&[0.0; 7], &mut q).to_f32(), 0.0);
        assert_eq!(q, [0; 7]);
        let mut q = [5i8; 3];
        quantize_q8_group(&[1.0, f32::NAN, -1.0], &mut q);
        assert_eq!(q, [127, 0, -127]);
    }

    #[test]
    fn tile_rows_keep_the_state_small() {
        let s = |hd, group| AttnShape {
            head_dim: hd,
            group,
            block_size: 16,
            kv_dim: hd,
            scale: 1.0,
            softcap: None,
        };
        assert_eq!(tile_rows(&s(64, 3)), 32);
        assert_eq!(tile_rows(&s(64, 8)), 16);
        assert_eq!(tile_rows(&s(256, 4)), 8);
        assert_eq!(tile_rows(&s(256, 16)), 2);
        assert_eq!(tile_rows(&s(512, 1)), 1);
    }
}
