//! Llama forward pass, written to be read like llama2.c.
//!
//! A batch is a list of sequence chunks; their tokens are stacked as rows:
//!
//! ```text
//! rows:  [ seq0 pos p0 .. p0+len0 | seq1 pos p1 .. p1+len1 | ... ]   n rows x dim
//! ```
//!
//! A prefill chunk is many rows of one sequence, a decode step one row. Each
//! row's K/V is written to its paged slot first, then each row attends to
//! positions `0..=pos` of its own sequence through the block table — so the
//! same code serves prefill, chunked prefill and decode, and a row's result
//! never depends on the other rows of the batch.

use std::ops::Range;

use rayon::prelude::*;

use super::kv::{KvElem, KvLayer, KvStore};
use super::Model;
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
    /// Per row: `(cos, sin)` of `pos * inv_freq[i]` for every RoPE pair.
    rope_cs: Vec<(f32, f32)>,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// `out = x / rms(x) * w`.
pub fn rms_norm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * scale * wi;
    }
}

/// `cs[i] = (cos, sin)(pos * inv_freq[i])`: computed once per row and shared
/// by every head of every layer.
pub fn rope_table(pos: usize, inv_freq: &[f32], cs: &mut [(f32, f32)]) {
    for (o, &f) in cs.iter_mut().zip(inv_freq) {
        let (s, c) = (pos as f32 * f).sin_cos();
        *o = (c, s);
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
        let (dim, kv_dim, ffn, hd) = (c.dim, c.kv_dim, c.ffn_dim, c.head_dim);
        let n: usize = seqs.iter().map(|q| q.len).sum();
        debug_assert_eq!(x.len(), n * dim);
        grow(&mut s.xb, n * dim);
        grow(&mut s.xq, n * dim / QK);
        grow(&mut s.q, n * dim);
        grow(&mut s.k, n * kv_dim);
        grow(&mut s.v, n * kv_dim);
        grow(&mut s.att, n * dim);
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
        let npairs = c.rope_dim / 2;
        s.rope_cs.clear();
        s.rope_cs.resize(n * npairs, (0.0, 0.0));
        for (r, cs) in s.rope_cs.chunks_exact_mut(npairs.max(1)).enumerate().take(n) {
            rope_table(s.row_pos[r], &self.rope_inv_freq, cs);
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
            add_norm_quant(rows_par, x, &mut s.xb[..n * dim], &mut s.xq[..n * dim / QK], pending, &lw.attn_norm, eps);
            let xa = Activations { f: &s.xb[..n * dim], q: &s.xq[..n * dim / QK], n };
            // (n, dim), (n, kv_dim), (n, kv_dim): q, k, v projections
            kernels::matmul_best(&self.mat(&lw.wq), lw.wq.packed.as_deref(), &xa, &mut s.q[..n * dim], pool);
            kernels::matmul_best(&self.mat(&lw.wk), lw.wk.packed.as_deref(), &xa, &mut s.k[..n * kv_dim], pool);
            kernels::matmul_best(&self.mat(&lw.wv), lw.wv.packed.as_deref(), &xa, &mut s.v[..n * kv_dim], pool);
            // RoPE on every q and k head, at each row's absolute position
            for_rows(rows_par, (&mut s.q[..n * dim], dim), (&mut s.k[..n * kv_dim], kv_dim), (&mut s.rope_cs[..n * npairs], npairs), |q, k, cs| {
                for h in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                    rope_apply(&mut h[..c.rope_dim], cs);
                }
            });
            // (n, kv_dim) -> paged slots: write this batch's k, v before attending
            for r in 0..n {
                let seq = &seqs[s.row_seq[r]];
                let slot = kv.slot(seq.block_table, s.row_pos[r]);
                kv.write(l, slot, &s.k[r * kv_dim..(r + 1) * kv_dim], &s.v[r * kv_dim..(r + 1) * kv_dim]);
            }
            // (n, dim): att = softmax(q k^T / sqrt(hd)) v, causal, per row and head
            {
                let q = &s.q[..n * dim];
                let att = &mut s.att[..n * dim];
                let rows = RowMap { pos: &s.row_pos, seq: &s.row_seq };
                let bs = kv.block_size;
                match kv.layer(l) {
                    KvLayer::F16(kc, vc) => attention(c, kc, vc, bs, seqs, &rows, q, att, pool),
                    KvLayer::Bf16(kc, vc) => attention(c, kc, vc, bs, seqs, &rows, q, att, pool),
                    KvLayer::F32(kc, vc) => attention(c, kc, vc, bs, seqs, &rows, q, att, pool),
                }
            }
            // (n, dim): xb = att @ wo
            quantize_rows(rows_par, &s.att[..n * dim], dim, &mut s.xq[..n * dim / QK]);
            let aa = Activations { f: &s.att[..n * dim], q: &s.xq[..n * dim / QK], n };
            kernels::matmul_best(&self.mat(&lw.wo), lw.wo.packed.as_deref(), &aa, &mut s.xb[..n * dim], pool);

            // ---- feed-forward (SwiGLU) ----
            // (n, dim): x += xb; xb = rmsnorm(x) * ffn_norm; xq = q8(xb)
            add_norm_quant(rows_par, x, &mut s.xb[..n * dim], &mut s.xq[..n * dim / QK], true, &lw.ffn_norm, eps);
            // In chunks of at most FFN_ROWS rows (bounds the rows x ffn scratch);
            // each chunk's output replaces its own, consumed, rows of xb.
            for r0 in (0..n).step_by(FFN_ROWS) {
                let m = FFN_ROWS.min(n - r0);
                let rows = r0 * dim..(r0 + m) * dim;
                let xa = Activations { f: &s.xb[rows.clone()], q: &s.xq[r0 * dim / QK..(r0 + m) * dim / QK], n: m };
                // (m, ffn): gate, up
                kernels::matmul_best(&self.mat(&lw.w_gate), lw.w_gate.packed.as_deref(), &xa, &mut s.gate[..m * ffn], pool);
                kernels::matmul_best(&self.mat(&lw.w_up), lw.w_up.packed.as_deref(), &xa, &mut s.up[..m * ffn], pool);
                // (m, ffn): h = silu(gate) * up; hq = q8(h)
                let hq = (&mut s.hq[..m * ffn / QK], ffn / QK);
                for_rows(pool.filter(|_| m >= PAR_ROWS), (&mut s.gate[..m * ffn], ffn), (&mut s.up[..m * ffn], ffn), hq, |g, u, hq| {
                    kernels::silu_mul(g, u);
                    kernels::quantize_rows_q8(g, ffn, hq);
                });
                let ha = Activations { f: &s.gate[..m * ffn], q: &s.hq[..m * ffn / QK], n: m };
                // (m, dim): xb = h @ w_down (added to x by the next norm or below)
                kernels::matmul_best(&self.mat(&lw.w_down), lw.w_down.packed.as_deref(), &ha, &mut s.xb[rows], pool);
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
    /// `logits` is `m x vocab`.
    pub fn logits(&self, x: &[f32], logits: &mut [f32], s: &mut Scratch, pool: Option<&rayon::ThreadPool>) {
        let dim = self.config.dim;
        let m = x.len() / dim;
        grow(&mut s.xb, m * dim);
        grow(&mut s.xq, m * dim / QK);
        for (o, xi) in s.xb[..m * dim].chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            rms_norm(o, xi, &self.output_norm, self.config.rms_eps);
        }
        kernels::quantize_rows_q8(&s.xb[..m * dim], dim, &mut s.xq[..m * dim / QK]);
        let xa = Activations { f: &s.xb[..m * dim], q: &s.xq[..m * dim / QK], n: m };
        kernels::matmul_best(&self.mat(&self.output), self.output.packed.as_deref(), &xa, &mut logits[..m * self.config.vocab_size], pool);
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
fn add_norm_quant(pool: Option<&rayon::ThreadPool>, x: &mut [f32], xb: &mut [f32], xq: &mut [BlockQ8], add: bool, w: &[f32], eps: f32) {
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
        None => a.chunks_mut(wa).zip(b.chunks_mut(wb)).zip(c.chunks_mut(wc)).for_each(|((a, b), c)| f(a, b, c)),
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

/// Attention for every row of the batch: one task per (row, KV head) — the
/// query heads sharing that KV head — in parallel over `pool`, so even a
/// single decode row keeps every thread busy.
#[allow(clippy::too_many_arguments)]
fn attention<T: KvElem>(
    c: &super::ModelConfig,
    kc: &[T],
    vc: &[T],
    bs: usize,
    seqs: &[SeqChunk<'_>],
    rows: &RowMap<'_>,
    q: &[f32],
    att: &mut [f32],
    pool: Option<&rayon::ThreadPool>,
) {
    let (hd, nkv) = (c.head_dim, c.n_kv_heads);
    let group = c.n_heads / nkv;
    let w = group * hd;
    let shape = AttnShape { head_dim: hd, group, block_size: bs, kv_dim: c.kv_dim, scale: 1.0 / (hd as f32).sqrt() };
    // Item i: row i / nkv, KV head i % nkv; q and att rows are nkv items of w floats.
    let item = |i: usize, out: &mut [f32]| {
        let (r, kvh) = (i / nkv, i % nkv);
        let seq = &seqs[rows.seq[r]];
        T::attend(&shape, &q[i * w..(i + 1) * w], kvh, kc, vc, seq.block_table, rows.pos[r] + 1, out);
    };
    match pool {
        Some(p) if att.len() > w => p.install(|| att.par_chunks_mut(w).enumerate().for_each(|(i, out)| item(i, out))),
        _ => att.chunks_mut(w).enumerate().for_each(|(i, out)| item(i, out)),
    }
}
