//! The forward pass of every supported family, written to be read like
//! llama2.c: the Llama block, with the family's differences (see
//! [`super::arch`]) as optional steps — Q/K/V biases, per-head Q/K RMSNorm,
//! NORM or NEOX RoPE with per-layer frequency tables, sliding-window and
//! soft-capped attention, post-attention / post-feed-forward norms, SwiGLU
//! or GeGLU, embedding scale and final-logit soft-cap.
//!
//! A batch is a list of sequence chunks; their tokens are stacked as rows:
//!
//! ```text
//! rows:  [ seq0 pos p0 .. p0+len0 | seq1 pos p1 .. p1+len1 | ... ]   n rows x dim
//! ```
//!
//! A prefill chunk is many rows of one sequence, a decode step one row. Each
//! row's K/V is written to its paged slot first, then each row attends to
//! positions `0..=pos` of its own sequence through the block table (the last
//! `window` of them on a sliding-window layer: earlier blocks are not read,
//! though they stay allocated) — so the same code serves prefill, chunked
//! prefill and decode, and a row's result never depends on the other rows of
//! the batch.

use std::ops::Range;

use rayon::prelude::*;

use super::kv::{KvLayer, KvStore};
use super::{FfnAct, Model, RopeStyle};
use crate::kernels::{self, Activations, AttnShape, BlockQ8, QK};

/// One sequence's slice of a batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// Absolute position of the chunk's first token.
    pub pos: usize,
    /// Number of tokens (rows) in this chunk.
    pub len: usize,
    /// Block table of the sequence, covering positions `0..pos + len`.
    pub block_table: &'a [u32],
}

/// Reusable buffers for one forward pass; grown to the largest batch seen, so
/// steady-state steps do not allocate.
#[derive(Debug, Default)]
pub struct Scratch {
    xb: Vec<f32>,
    xq: Vec<BlockQ8>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    hq: Vec<BlockQ8>,
    row_pos: Vec<usize>,
    row_seq: Vec<usize>,
    /// Per RoPE table, per row: `(cos, sin)` of `pos * inv_freq[i]` (times
    /// the attention factor) for every RoPE pair.
    rope_cs: Vec<(f32, f32)>,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// `1 / rms(x)` with `eps` inside the root.
#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ss + eps).sqrt()
}

/// `out = x / rms(x) * w`.
pub fn rms_norm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let scale = inv_rms(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * scale * wi;
    }
}

/// `x = x / rms(x) * w` in place (per-head Q/K norms, post-norms).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let scale = inv_rms(x, eps);
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi = *xi * scale * wi;
    }
}

/// `cs[i] = mscale * (cos, sin)(pos * inv_freq[i])`: computed once per row
/// and shared by every head of every layer using the table (`mscale` is the
/// long-rope attention factor, 1 otherwise).
pub fn rope_table(pos: usize, inv_freq: &[f32], mscale: f32, cs: &mut [(f32, f32)]) {
    for (o, &f) in cs.iter_mut().zip(inv_freq) {
        let (s, c) = (pos as f32 * f).sin_cos();
        *o = (c * mscale, s * mscale);
    }
}

/// Rotates pairs `(x[2i], x[2i+1])` of one head by the angles of `cs`
/// (llama.cpp's "normal" RoPE, used for the `llama` architecture, whose GGUF
/// Q/K weights are stored permuted to match).
#[inline]
pub fn rope_apply(head: &mut [f32], cs: &[(f32, f32)]) {
    for (p, &(c, s)) in head.chunks_exact_mut(2).zip(cs) {
        let (a, b) = (p[0], p[1]);
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
    }
}

/// Rotates pairs `(x[i], x[i + half])`, `half = cs.len()`, of the rotated
/// part of one head (llama.cpp's NEOX RoPE, Hugging Face's `rotate_half`:
/// Qwen, Gemma, Phi-3).
#[inline]
pub fn rope_apply_neox(head: &mut [f32], cs: &[(f32, f32)]) {
    let (lo, hi) = head.split_at_mut(cs.len());
    for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs) {
        let (x, y) = (*a, *b);
        *a = x * c - y * s;
        *b = x * s + y * c;
    }
}

impl Model {
    /// Looks up embeddings of `tokens` into `x` (`tokens.len() x dim`).
    /// Token ids must be `< vocab_size` (checked by the caller's validation).
    pub fn embed(&self, tokens: &[u32], x: &mut [f32]) {
        let dim = self.config.dim;
        let m = self.mat(&self.tok_embd);
        for (t, row) in tokens.iter().zip(x.chunks_exact_mut(dim)) {
            // The packed copy when there is one (the mapped pages are released).
            match &self.tok_embd.packed {
                Some(p) => p.dequantize_row(*t as usize, row),
                None => m.dequantize_row(*t as usize, row),
            }
            // Gemma: x *= sqrt(dim)
            if let Some(e) = self.config.embed_scale {
                row.iter_mut().for_each(|v| *v *= e);
            }
        }
    }

    /// Runs transformer blocks `layers` over the batch `seqs`, updating the
    /// residual stream `x` (`n x dim`, `n` = total chunk length) in place and
    /// writing K/V into `kv`.
    pub fn forward_layers(
        &self,
        layers: Range<usize>,
        x: &mut [f32],
        seqs: &[SeqChunk<'_>],
        kv: &mut KvStore,
        s: &mut Scratch,
        pool: Option<&rayon::ThreadPool>,
    ) {
        let c = &self.config;
        let (dim, qd, kv_dim, ffn, hd) = (c.dim, c.q_dim, c.kv_dim, c.ffn_dim, c.head_dim);
        let n: usize = seqs.iter().map(|q| q.len).sum();
        debug_assert_eq!(x.len(), n * dim);
        grow(&mut s.xb, n * dim);
        grow(&mut s.xq, n * dim.max(qd) / QK);
        grow(&mut s.q, n * qd);
        grow(&mut s.k, n * kv_dim);
        grow(&mut s.v, n * kv_dim);
        grow(&mut s.att, n * qd);
        let nf = n.min(FFN_ROWS);
        grow(&mut s.gate, nf * ffn);
        grow(&mut s.up, nf * ffn);
        grow(&mut s.hq, nf * ffn / QK);
        s.row_pos.clear();
        s.row_seq.clear();
        for (si, q) in seqs.iter().enumerate() {
            for j in 0..q.len {
                s.row_pos.push(q.pos + j);
                s.row_seq.push(si);
            }
        }
        // (tables, n, npairs): cos/sin of every row for every RoPE table
        let npairs = c.rope_dim / 2;
        let ntab = self.rope_inv_freq.len();
        s.rope_cs.clear();
        s.rope_cs.resize(ntab * n * npairs, (0.0, 0.0));
        for (t, inv_freq) in self.rope_inv_freq.iter().enumerate() {
            let tab = &mut s.rope_cs[t * n * npairs..(t + 1) * n * npairs];
            for (r, cs) in tab.chunks_exact_mut(npairs.max(1)).enumerate().take(n) {
                rope_table(s.row_pos[r], inv_freq, c.rope_attn_factor, cs);
            }
        }

        // Row-wise passes run in parallel over rows on the worker's pool
        // (each row's arithmetic is the same wherever it runs).
        let rows_par = pool.filter(|_| n >= PAR_ROWS);
        let eps = c.rms_eps;
        let mut pending = false; // x += s.xb still to be applied (fused into the next norm)
        for l in layers {
            let lw = &self.layers[l];
            // ---- attention ----
            // (n, dim): [x += xb]; xb = rmsnorm(x) * attn_norm; xq = q8(xb)
            add_norm_quant(
                rows_par,
                x,
                &mut s.xb[..n * dim],
                &mut s.xq[..n * dim / QK],
                pending,
                &lw.attn_norm,
                eps,
            );
            let xa = Activations {
                f: &s.xb[..n * dim],
                q: &s.xq[..n * dim / QK],
                n,
            };
            // (n, q_dim), (n, kv_dim), (n, kv_dim): q, k, v projections
            kernels::matmul_best(
                &self.mat(&lw.wq),
                lw.wq.packed.as_deref(),
                &xa,
                &mut s.q[..n * qd],
                pool,
            );
            kernels::matmul_best(
                &self.mat(&lw.wk),
                lw.wk.packed.as_deref(),
                &xa,
                &mut s.k[..n * kv_dim],
                pool,
            );
            kernels::matmul_best(
                &self.mat(&lw.wv),
                lw.wv.packed.as_deref(),
                &xa,
                &mut s.v[..n * kv_dim],
                pool,
            );
            // Per row: [q, k, v += biases]; [per-head rmsnorm of q, k]; RoPE
            // on every q and k head at the row's absolute position
            let rope = &mut s.rope_cs[lw.rope_table * n * npairs..(lw.rope_table + 1) * n * npairs];
            let v_bias = lw.qkv_bias.as_ref().map(|[_, _, bv]| bv.as_slice());
            for_rows(
                rows_par,
                (&mut s.q[..n * qd], qd),
                (&mut s.k[..n * kv_dim], kv_dim),
                (rope, npairs),
                |q, k, cs| {
                    if let Some([bq, bk, _]) = &lw.qkv_bias {
                        add_in_place(q, bq);
                        add_in_place(k, bk);
                    }
                    for (h, norm) in q
                        .chunks_exact_mut(hd)
                        .map(|h| (h, 0))
                        .chain(k.chunks_exact_mut(hd).map(|h| (h, 1)))
                    {
                        if let Some(w) = &lw.qk_norm {
                            rms_norm_in_place(h, &w[norm], eps);
                        }
                        match c.rope_style {
                            RopeStyle::Norm => rope_apply(&mut h[..c.rope_dim], cs),
                            RopeStyle::Neox => rope_apply_neox(&mut h[..c.rope_dim], cs),
                        }
                    }
                },
            );
            if let Some(bv) = v_bias {
                s.v[..n * kv_dim]
                    .chunks_exact_mut(kv_dim)
                    .for_each(|v| add_in_place(v, bv));
            }
            // (n, kv_dim) -> paged slots: write this batch's k, v before attending
            for r in 0..n {
                let seq = &seqs[s.row_seq[r]];
                let slot = kv.slot(seq.block_table, s.row_pos[r]);
                kv.write(
                    l,
                    slot,
                    &s.k[r * kv_dim..(r + 1) * kv_dim],
                    &s.v[r * kv_dim..(r + 1) * kv_dim],
                );
            }
            // (n, q_dim): att = softmax([softcap](q k^T * scale)) v, causal
            // (over the window on sliding layers), per row and head
            {
                let q = &s.q[..n * qd];
                let att = &mut s.att[..n * qd];
                let rows = RowMap {
                    pos: &s.row_pos,
                    seq: &s.row_seq,
                };
                let bs = kv.block_size;
                let window = if c.swa_layers[l] {
                    c.sliding_window
                } else {
                    None
                };
                attention(c, kv.layer(l), bs, seqs, &rows, window, q, att, pool);
            }
            // (n, dim): xb = att @ wo; [xb = rmsnorm(xb) * post_attn_norm]
            quantize_rows(rows_par, &s.att[..n * qd], qd, &mut s.xq[..n * qd / QK]);
            let aa = Activations {
                f: &s.att[..n * qd],
                q: &s.xq[..n * qd / QK],
                n,
            };
            kernels::matmul_best(
                &self.mat(&lw.wo),
                lw.wo.packed.as_deref(),
                &aa,
                &mut s.xb[..n * dim],
                pool,
            );
            if let Some(w) = &lw.post_attn_norm {
                norm_rows(rows_par, &mut s.xb[..n * dim], w, eps);
            }

            // ---- feed-forward (SwiGLU / GeGLU) ----
            // (n, dim): x += xb; xb = rmsnorm(x) * ffn_norm; xq = q8(xb)
            add_norm_quant(
                rows_par,
                x,
                &mut s.xb[..n * dim],
                &mut s.xq[..n * dim / QK],
                true,
                &lw.ffn_norm,
                eps,
            );
            // In chunks of at most FFN_ROWS rows (bounds the rows x ffn scratch);
            // each chunk's output replaces its own, consumed, rows of xb.
            for r0 in (0..n).step_by(FFN_ROWS) {
                let m = FFN_ROWS.min(n - r0);
                let rows = r0 * dim..(r0 + m) * dim;
                let xa = Activations {
                    f: &s.xb[rows.clone()],
                    q: &s.xq[r0 * dim / QK..(r0 + m) * dim / QK],
                    n: m,
                };
                // (m, ffn): gate, up
                kernels::matmul_best(
                    &self.mat(&lw.w_gate),
                    lw.w_gate.packed.as_deref(),
                    &xa,
                    &mut s.gate[..m * ffn],
                    pool,
                );
                kernels::matmul_best(
                    &self.mat(&lw.w_up),
                    lw.w_up.packed.as_deref(),
                    &xa,
                    &mut s.up[..m * ffn],
                    pool,
                );
                // (m, ffn): h = act(gate) * up; hq = q8(h)
                let hq = (&mut s.hq[..m * ffn / QK], ffn / QK);
                for_rows(
                    pool.filter(|_| m >= PAR_ROWS),
                    (&mut s.gate[..m * ffn], ffn),
                    (&mut s.up[..m * ffn], ffn),
                    hq,
                    |g, u, hq| {
                        match c.ffn_act {
                            FfnAct::Silu => kernels::silu_mul(g, u),
                            FfnAct::GeluTanh => kernels::gelu_tanh_mul(g, u),
                        }
                        kernels::quantize_rows_q8(g, ffn, hq);
                    },
                );
                let ha = Activations {
                    f: &s.gate[..m * ffn],
                    q: &s.hq[..m * ffn / QK],
                    n: m,
                };
                // (m, dim): xb = h @ w_down (added to x by the next norm or below)
                kernels::matmul_best(
                    &self.mat(&lw.w_down),
                    lw.w_down.packed.as_deref(),
                    &ha,
                    &mut s.xb[rows],
                    pool,
                );
            }
            // (n, dim): [xb = rmsnorm(xb) * post_ffn_norm]
            if let Some(w) = &lw.post_ffn_norm {
                norm_rows(rows_par, &mut s.xb[..n * dim], w, eps);
            }
            pending = true;
        }
        if pending {
            for (xi, d) in x.iter_mut().zip(&s.xb[..n * dim]) {
                *xi += d;
            }
        }
    }

    /// Final norm + output head for `m` rows of the residual stream:
    /// `logits` is `m x vocab`. `digits`: the activation digits the head's
    /// matmul reads (`runtime.head_activation_digits`; [`kernels::Digits`]).
    pub fn logits(
        &self,
        x: &[f32],
        logits: &mut [f32],
        s: &mut Scratch,
        pool: Option<&rayon::ThreadPool>,
        digits: kernels::Digits,
    ) {
        let dim = self.config.dim;
        let m = x.len() / dim;
        grow(&mut s.xb, m * dim);
        grow(&mut s.xq, m * dim / QK);
        for (o, xi) in s.xb[..m * dim]
            .chunks_exact_mut(dim)
            .zip(x.chunks_exact(dim))
        {
            rms_norm(o, xi, &self.output_norm, self.config.rms_eps);
        }
        kernels::quantize_rows_q8(&s.xb[..m * dim], dim, &mut s.xq[..m * dim / QK]);
        if digits == kernels::Digits::One {
            kernels::zero_second_digit(&mut s.xq[..m * dim / QK]);
        }
        let xa = Activations {
            f: &s.xb[..m * dim],
            q: &s.xq[..m * dim / QK],
            n: m,
        };
        let vocab = self.config.vocab_size;
        let logits = &mut logits[..m * vocab];
        kernels::matmul_best_digits(
            &self.mat(&self.output),
            self.output.packed.as_deref(),
            digits,
            &xa,
            logits,
            pool,
        );
        // (m, vocab): [+ bias]; [cap * tanh(logits / cap)]
        for row in logits.chunks_exact_mut(vocab) {
            if let Some(b) = &self.output_bias {
                row.iter_mut().zip(b).for_each(|(l, b)| *l += b);
            }
            if let Some(cap) = self.config.final_softcap {
                kernels::softcap(row, cap);
            }
        }
    }
}

/// Batches of at least this many rows run their row-wise passes in parallel.
const PAR_ROWS: usize = 8;
/// Most rows the feed-forward block processes at once (its scratch is
/// `FFN_ROWS x ffn_dim`; weights stay cache-resident across chunks).
const FFN_ROWS: usize = 128;
/// Rows per parallel task in row-wise passes.
const MIN_ROWS_PER_TASK: usize = 4;

/// Per row: `x += delta` (when `add`, `delta` being `xb`'s old contents), then
/// `xb = rmsnorm(x) * w` and `xq = q8(xb)`.
fn add_norm_quant(
    pool: Option<&rayon::ThreadPool>,
    x: &mut [f32],
    xb: &mut [f32],
    xq: &mut [BlockQ8],
    add: bool,
    w: &[f32],
    eps: f32,
) {
    let dim = w.len();
    for_rows(pool, (x, dim), (xb, dim), (xq, dim / QK), |x, xb, xq| {
        if add {
            for (xi, d) in x.iter_mut().zip(xb.iter()) {
                *xi += d;
            }
        }
        rms_norm(xb, x, w, eps);
        kernels::quantize_rows_q8(xb, dim, xq);
    });
}

/// Runs `f` on row `r` of three row-major buffers (`(buffer, row width)`),
/// for every row: in parallel on `pool` (a few rows per task) or serially.
fn for_rows<A: Send, B: Send, C: Send>(
    pool: Option<&rayon::ThreadPool>,
    (a, wa): (&mut [A], usize),
    (b, wb): (&mut [B], usize),
    (c, wc): (&mut [C], usize),
    f: impl Fn(&mut [A], &mut [B], &mut [C]) + Sync,
) {
    match pool {
        Some(p) => p.install(|| {
            a.par_chunks_mut(wa)
                .zip(b.par_chunks_mut(wb))
                .zip(c.par_chunks_mut(wc))
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(|((a, b), c)| f(a, b, c))
        }),
        None => a
            .chunks_mut(wa)
            .zip(b.chunks_mut(wb))
            .zip(c.chunks_mut(wc))
            .for_each(|((a, b), c)| f(a, b, c)),
    }
}

/// `out = q8(x)` row by row (`cols` per row), in parallel when `pool` is given.
fn quantize_rows(pool: Option<&rayon::ThreadPool>, x: &[f32], cols: usize, out: &mut [BlockQ8]) {
    match pool {
        Some(p) => p.install(|| {
            x.par_chunks(cols)
                .zip(out.par_chunks_mut(cols / QK))
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(|(x, o)| kernels::quantize_rows_q8(x, cols, o))
        }),
        None => kernels::quantize_rows_q8(x, cols, out),
    }
}

/// Position and sequence index of every row of a batch.
struct RowMap<'a> {
    pos: &'a [usize],
    seq: &'a [usize],
}

/// One task of [`attention`].
enum AttnWork<'a> {
    /// Rows `r0..r0 + t` of one sequence, every KV head, into `out`.
    Tile {
        r0: usize,
        t: usize,
        out: &'a mut [f32],
    },
    /// Row `r0`, KV head `kvh`, into `out`.
    Head {
        r0: usize,
        kvh: usize,
        out: &'a mut [f32],
    },
    /// The state of one segment `keys` of row `r0`, KV head `kvh`
    /// ([`kernels::attention::attend_part`]).
    Seg {
        r0: usize,
        kvh: usize,
        keys: Range<usize>,
        part: &'a mut [f32],
    },
}

/// Attention for every row of the batch (over the last `window` positions
/// when given), in parallel over `pool`: consecutive rows of one sequence (a
/// prefill chunk) in tiles of [`kernels::attention::tile_rows`] rows, each
/// tile reading its KV blocks once per KV head
/// ([`kernels::attention::attend_rows`]); a lone row (a decode step) as one
/// task per KV head — the query heads sharing it — or, when its keys span
/// several segments ([`kernels::attention::segments`]) and a pool is given,
/// one task per KV head and segment, whose states are merged in order
/// ([`kernels::attention::merge_parts`]), so even a single decode row of a
/// one-KV-head model keeps every thread busy. A row's result is the same
/// whatever tile it lands in and however its segments are run (bit for
/// bit), so it never depends on the rest of the batch or on the threads.
#[allow(clippy::too_many_arguments)]
fn attention(
    c: &super::ModelConfig,
    kv: KvLayer<'_>,
    bs: usize,
    seqs: &[SeqChunk<'_>],
    rows: &RowMap<'_>,
    window: Option<usize>,
    q: &[f32],
    att: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    use kernels::attention::{
        attend_part, attend_rows, merge_parts, part_len, segments, tile_rows,
    };
    let (hd, nkv) = (c.head_dim, c.n_kv_heads);
    let group = c.n_heads / nkv;
    let w = group * hd;
    let qd = nkv * w;
    let n = att.len() / qd;
    let shape = AttnShape {
        head_dim: hd,
        group,
        block_size: bs,
        kv_dim: c.kv_dim,
        scale: c.attn_scale,
        softcap: c.attn_softcap,
    };
    let tr = tile_rows(&shape);
    let pl = part_len(&shape);
    // A sliding-window row reads positions > pos - window only.
    let row_keys = |r: usize| {
        let end = rows.pos[r] + 1;
        window.map_or(0, |w| end.saturating_sub(w))..end
    };
    // Rows (first row, rows) of the work items.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut r = 0;
    while r < n {
        let mut e = r + 1;
        while e < n && e - r < tr && rows.seq[e] == rows.seq[r] {
            e += 1;
        }
        spans.push((r, e - r));
        r = e;
    }
    // Lone rows whose segments run as separate tasks.
    let split = |r0: usize, t: usize| {
        pool.is_some() && t == 1 && segments(bs, row_keys(r0)).nth(1).is_some()
    };
    let nparts: usize = spans
        .iter()
        .filter(|&&(r0, t)| split(r0, t))
        .map(|&(r0, _)| nkv * segments(bs, row_keys(r0)).count())
        .sum();
    let mut pbuf = vec![0.0f32; nparts * pl];
    // Work items, and (first part, parts, output) of each split row and KV head.
    let mut items: Vec<AttnWork<'_>> = Vec::new();
    let mut merges: Vec<(usize, usize, &mut [f32])> = Vec::new();
    let mut rest = att;
    let mut prest = &mut pbuf[..];
    let mut np = 0;
    for &(r0, t) in &spans {
        if split(r0, t) {
            for kvh in 0..nkv {
                let (a, b) = std::mem::take(&mut rest).split_at_mut(w);
                rest = b;
                let p0 = np;
                for seg in segments(bs, row_keys(r0)) {
                    let (pa, pb) = std::mem::take(&mut prest).split_at_mut(pl);
                    prest = pb;
                    items.push(AttnWork::Seg {
                        r0,
                        kvh,
                        keys: seg,
                        part: pa,
                    });
                    np += 1;
                }
                merges.push((p0, np - p0, a));
            }
        } else if t == 1 {
            for kvh in 0..nkv {
                let (a, b) = std::mem::take(&mut rest).split_at_mut(w);
                items.push(AttnWork::Head { r0, kvh, out: a });
                rest = b;
            }
        } else {
            let (a, b) = std::mem::take(&mut rest).split_at_mut(t * qd);
            items.push(AttnWork::Tile { r0, t, out: a });
            rest = b;
        }
    }
    let run = |item: &mut AttnWork<'_>| match item {
        AttnWork::Tile { r0, t, out } => {
            let (r0, t) = (*r0, *t);
            let table = seqs[rows.seq[r0]].block_table;
            let mut keys: [Range<usize>; kernels::attention::MAX_TILE_ROWS] = Default::default();
            for (i, k) in keys.iter_mut().enumerate().take(t) {
                *k = row_keys(r0 + i);
            }
            for h in 0..nkv {
                attend_rows(
                    &shape,
                    kv,
                    h,
                    table,
                    &keys[..t],
                    &q[r0 * qd + h * w..],
                    qd,
                    &mut out[h * w..],
                    qd,
                );
            }
        }
        AttnWork::Head { r0, kvh, out } => {
            let table = seqs[rows.seq[*r0]].block_table;
            attend_rows(
                &shape,
                kv,
                *kvh,
                table,
                std::slice::from_ref(&row_keys(*r0)),
                &q[*r0 * qd + *kvh * w..],
                qd,
                out,
                w,
            );
        }
        AttnWork::Seg {
            r0,
            kvh,
            keys,
            part,
        } => {
            let table = seqs[rows.seq[*r0]].block_table;
            let qh = &q[*r0 * qd + *kvh * w..*r0 * qd + (*kvh + 1) * w];
            attend_part(&shape, kv, *kvh, table, keys.clone(), qh, part);
        }
    };
    match pool {
        Some(p) if items.len() > 1 => p.install(|| items.par_iter_mut().for_each(run)),
        _ => items.iter_mut().for_each(run),
    }
    drop(items);
    for (p0, cnt, out) in merges {
        merge_parts(&shape, &pbuf[p0 * pl..(p0 + cnt) * pl], out);
    }
}

/// `x += b` elementwise.
#[inline]
fn add_in_place(x: &mut [f32], b: &[f32]) {
    x.iter_mut().zip(b).for_each(|(xi, bi)| *xi += bi);
}

/// `x = rmsnorm(x) * w` for every row of `x` (row width `w.len()`), in
/// parallel over rows on `pool` when given.
fn norm_rows(pool: Option<&rayon::ThreadPool>, x: &mut [f32], w: &[f32], eps: f32) {
    match pool {
        Some(p) => p.install(|| {
            x.par_chunks_mut(w.len())
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(|r| rms_norm_in_place(r, w, eps))
        }),
        None => x
            .chunks_mut(w.len())
            .for_each(|r| rms_norm_in_place(r, w, eps)),
    }
}
