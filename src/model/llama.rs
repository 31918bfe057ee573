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

use super::kv::{KvElem, KvLayer, KvStore, MAX_BLOCK_SIZE};
use super::Model;
use crate::kernels::{self, Activations, BlockQ8, QK};

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

/// Rotates pairs `(x[2i], x[2i+1])` of one head by `pos * inv_freq[i]`
/// (llama.cpp's "normal" RoPE, used for the `llama` architecture, whose GGUF
/// Q/K weights are stored permuted to match).
pub fn rope(head: &mut [f32], pos: usize, inv_freq: &[f32]) {
    for (i, &f) in inv_freq.iter().enumerate() {
        let (s, c) = (pos as f32 * f).sin_cos();
        let (a, b) = (head[2 * i], head[2 * i + 1]);
        head[2 * i] = a * c - b * s;
        head[2 * i + 1] = a * s + b * c;
    }
}

/// SiLU(x) = x * sigmoid(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Model {
    /// Looks up embeddings of `tokens` into `x` (`tokens.len() x dim`).
    /// Token ids must be `< vocab_size` (checked by the caller's validation).
    pub fn embed(&self, tokens: &[u32], x: &mut [f32]) {
        let dim = self.config.dim;
        let m = self.mat(&self.tok_embd);
        for (t, row) in tokens.iter().zip(x.chunks_exact_mut(dim)) {
            m.dequantize_row(*t as usize, row);
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
        grow(&mut s.xq, n * dim.max(ffn) / QK);
        grow(&mut s.q, n * dim);
        grow(&mut s.k, n * kv_dim);
        grow(&mut s.v, n * kv_dim);
        grow(&mut s.att, n * dim);
        grow(&mut s.gate, n * ffn);
        grow(&mut s.up, n * ffn);
        grow(&mut s.hq, n * ffn / QK);
        s.row_pos.clear();
        s.row_seq.clear();
        for (si, q) in seqs.iter().enumerate() {
            for j in 0..q.len {
                s.row_pos.push(q.pos + j);
                s.row_seq.push(si);
            }
        }

        for l in layers {
            let lw = &self.layers[l];
            // ---- attention ----
            // (n, dim): xb = rmsnorm(x) * attn_norm
            for (o, xi) in s.xb[..n * dim].chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                rms_norm(o, xi, &lw.attn_norm, c.rms_eps);
            }
            kernels::quantize_rows_q8(&s.xb[..n * dim], dim, &mut s.xq[..n * dim / QK]);
            let xa = Activations { f: &s.xb[..n * dim], q: &s.xq[..n * dim / QK], n };
            // (n, dim), (n, kv_dim), (n, kv_dim): q, k, v projections
            kernels::matmul_best(&self.mat(&lw.wq), lw.wq.packed.as_deref(), &xa, &mut s.q[..n * dim], pool);
            kernels::matmul_best(&self.mat(&lw.wk), lw.wk.packed.as_deref(), &xa, &mut s.k[..n * kv_dim], pool);
            kernels::matmul_best(&self.mat(&lw.wv), lw.wv.packed.as_deref(), &xa, &mut s.v[..n * kv_dim], pool);
            // RoPE on every q and k head, at each row's absolute position
            for r in 0..n {
                let pos = s.row_pos[r];
                for h in s.q[r * dim..(r + 1) * dim].chunks_exact_mut(hd) {
                    rope(&mut h[..c.rope_dim], pos, &self.rope_inv_freq);
                }
                for h in s.k[r * kv_dim..(r + 1) * kv_dim].chunks_exact_mut(hd) {
                    rope(&mut h[..c.rope_dim], pos, &self.rope_inv_freq);
                }
            }
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
            // (n, dim): x += att @ wo
            kernels::quantize_rows_q8(&s.att[..n * dim], dim, &mut s.xq[..n * dim / QK]);
            let aa = Activations { f: &s.att[..n * dim], q: &s.xq[..n * dim / QK], n };
            kernels::matmul_best(&self.mat(&lw.wo), lw.wo.packed.as_deref(), &aa, &mut s.xb[..n * dim], pool);
            for (xi, d) in x.iter_mut().zip(&s.xb[..n * dim]) {
                *xi += d;
            }

            // ---- feed-forward (SwiGLU) ----
            for (o, xi) in s.xb[..n * dim].chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                rms_norm(o, xi, &lw.ffn_norm, c.rms_eps);
            }
            kernels::quantize_rows_q8(&s.xb[..n * dim], dim, &mut s.xq[..n * dim / QK]);
            let xa = Activations { f: &s.xb[..n * dim], q: &s.xq[..n * dim / QK], n };
            // (n, ffn): gate, up
            kernels::matmul_best(&self.mat(&lw.w_gate), lw.w_gate.packed.as_deref(), &xa, &mut s.gate[..n * ffn], pool);
            kernels::matmul_best(&self.mat(&lw.w_up), lw.w_up.packed.as_deref(), &xa, &mut s.up[..n * ffn], pool);
            for (g, u) in s.gate[..n * ffn].iter_mut().zip(&s.up[..n * ffn]) {
                *g = silu(*g) * u;
            }
            kernels::quantize_rows_q8(&s.gate[..n * ffn], ffn, &mut s.hq[..n * ffn / QK]);
            let ha = Activations { f: &s.gate[..n * ffn], q: &s.hq[..n * ffn / QK], n };
            // (n, dim): x += h @ w_down
            kernels::matmul_best(&self.mat(&lw.w_down), lw.w_down.packed.as_deref(), &ha, &mut s.xb[..n * dim], pool);
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

/// Position and sequence index of every row of a batch.
struct RowMap<'a> {
    pos: &'a [usize],
    seq: &'a [usize],
}

/// Attention for every row of the batch (rows in parallel over `pool`).
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
    let dim = c.dim;
    let n = rows.pos.len();
    let attend_row = |r: usize, out: &mut [f32]| {
        let seq = &seqs[rows.seq[r]];
        attend(c, kc, vc, bs, seq.block_table, rows.pos[r], &q[r * dim..(r + 1) * dim], out);
    };
    match pool {
        Some(p) if n > 1 => p.install(|| att.par_chunks_mut(dim).enumerate().for_each(|(r, out)| attend_row(r, out))),
        _ => att.chunks_mut(dim).enumerate().for_each(|(r, out)| attend_row(r, out)),
    }
}

/// Attention of one query row (all heads) at position `pos` over positions
/// `0..=pos` of its sequence, read through `block_table`. Online softmax per
/// block of keys: no heap allocation, fixed operation order.
#[allow(clippy::too_many_arguments)]
fn attend<T: KvElem>(
    c: &super::ModelConfig,
    kc: &[T],
    vc: &[T],
    bs: usize,
    block_table: &[u32],
    pos: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let (hd, kv_dim) = (c.head_dim, c.kv_dim);
    let group = c.n_heads / c.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_ctx = pos + 1;
    for h in 0..c.n_heads {
        let kvh = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        let mut m = f32::NEG_INFINITY;
        let mut l = 0.0f32;
        let mut sc = [0.0f32; MAX_BLOCK_SIZE];
        for (bi, &block) in block_table.iter().enumerate().take(n_ctx.div_ceil(bs)) {
            let base = block as usize * bs;
            let cnt = bs.min(n_ctx - bi * bs);
            // (cnt,): scores of this block's keys, rows kv_dim apart
            let off = base * kv_dim + kvh * hd;
            let span = (cnt - 1) * kv_dim + hd;
            T::dot_rows(qh, &kc[off..off + span], kv_dim, &mut sc[..cnt]);
            let mut bm = f32::NEG_INFINITY;
            for v in sc[..cnt].iter_mut() {
                *v *= scale;
                bm = bm.max(*v);
            }
            if bm > m {
                let corr = (m - bm).exp();
                l *= corr;
                for v in oh.iter_mut() {
                    *v *= corr;
                }
                m = bm;
            }
            for v in sc[..cnt].iter_mut() {
                *v = (*v - m).exp();
                l += *v;
            }
            // (hd,): oh += sum_j e_j * v_j over this block's values
            T::axpy_rows(oh, &sc[..cnt], &vc[off..off + span], kv_dim);
        }
        let inv = 1.0 / l;
        for v in oh.iter_mut() {
            *v *= inv;
        }
    }
}
