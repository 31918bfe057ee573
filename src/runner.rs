//! A single-sequence runner over the whole model: the direct path used by
//! `brigade perplexity` and by reference tests. Serving goes through the
//! pipelined runtime instead; both call the same [`Model`] functions.

use std::sync::Arc;

use crate::model::kv::KvStore;
use crate::model::llama::{Scratch, SeqChunk};
use crate::model::Model;

/// Runs one sequence at a time with its own contiguous block table.
#[derive(Debug)]
pub struct Runner {
    model: Arc<Model>,
    kv: KvStore,
    block_table: Vec<u32>,
    scratch: Scratch,
    head_digits: crate::kernels::Digits,
    pool: Option<rayon::ThreadPool>,
    pos: usize,
    x: Vec<f32>,
}

/// Error from the runner: the sequence does not fit its context.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// More tokens than the runner's context.
    #[error("sequence of {need} tokens exceeds the context of {max} tokens")]
    ContextFull {
        /// Tokens the sequence would hold.
        need: usize,
        /// The runner's context (`max_ctx` rounded up to whole blocks).
        max: usize,
    },
    /// Token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// Thread pool could not be built.
    #[error("thread pool: {0}")]
    Pool(String),
}

impl Runner {
    /// A runner for sequences up to `max_ctx` tokens using `threads` threads.
    pub fn new(model: Arc<Model>, max_ctx: usize, threads: usize) -> Result<Self, RunnerError> {
        Self::with_kv_dtype(model, max_ctx, threads, crate::model::kv::KvDType::F16)
    }

    /// [`Runner::new`] with K/V stored as `dtype`.
    pub fn with_kv_dtype(
        model: Arc<Model>,
        max_ctx: usize,
        threads: usize,
        dtype: crate::model::kv::KvDType,
    ) -> Result<Self, RunnerError> {
        let bs = 16;
        let nblocks = max_ctx.div_ceil(bs).max(1);
        let kv = KvStore::with_dtype(
            0,
            model.config.n_layers,
            nblocks,
            bs,
            model.config.kv_dim,
            model.config.head_dim,
            dtype,
        );
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("runner-{i}"))
                    .build()
                    .map_err(|e| RunnerError::Pool(e.to_string()))?,
            )
        } else {
            None
        };
        Ok(Self {
            model,
            kv,
            block_table: (0..nblocks as u32).collect(),
            scratch: Scratch::default(),
            head_digits: crate::config::RuntimeConfig::default().head_digits(),
            pool,
            pos: 0,
            x: Vec::new(),
        })
    }

    /// Reads `digits` of the output head's activations
    /// (`runtime.head_activation_digits`; the default config's otherwise).
    pub fn with_head_digits(mut self, digits: crate::kernels::Digits) -> Self {
        self.head_digits = digits;
        self
    }

    /// Forgets the current sequence.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Current sequence length.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Feeds `tokens` and returns logits (`vocab` each) for every fed token when
    /// `all_logits`, else only for the last one.
    pub fn feed(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RunnerError> {
        let c = &self.model.config;
        let (dim, vocab) = (c.dim, c.vocab_size);
        let max = self.block_table.len() * self.kv.block_size;
        if self.pos + tokens.len() > max {
            return Err(RunnerError::ContextFull {
                need: self.pos + tokens.len(),
                max,
            });
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(RunnerError::BadToken(t));
        }
        let n = tokens.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        self.x.resize(n * dim, 0.0);
        self.model.embed(tokens, &mut self.x);
        let chunk = SeqChunk {
            pos: self.pos,
            len: n,
            block_table: &self.block_table,
        };
        let (model, x, kv, scratch, head_digits) = (
            &self.model,
            &mut self.x,
            &mut self.kv,
            &mut self.scratch,
            self.head_digits,
        );
        let layers = 0..c.n_layers;
        let rows_from = if all_logits { 0 } else { (n - 1) * dim };
        let mut logits = vec![0.0; (n * dim - rows_from) / dim * vocab];
        // Inside the pool, nested parallel loops are cheap forks (see engine workers).
        let run = |pool: Option<&rayon::ThreadPool>| {
            model.forward_layers(layers, x, &[chunk], kv, scratch, pool);
            model.logits(&x[rows_from..], &mut logits, scratch, pool, head_digits);
        };
        match &self.pool {
            Some(p) => p.install(|| run(Some(p))),
            None => run(None),
        }
        self.pos += n;
        Ok(logits)
    }
}

/// Result of [`perplexity`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// `exp(nll / tokens)`.
    pub perplexity: f64,
    /// Number of scored tokens.
    pub tokens: usize,
    /// Total negative log-likelihood (nats).
    pub nll: f64,
}

/// Most tokens [`perplexity`] feeds at once: bounds the logits buffer to this
/// many rows of the vocabulary (feeding a window in pieces gives the same
/// logits, bit for bit, as feeding it whole).
const PERPLEXITY_FEED: usize = 128;

/// Perplexity of `ids` in consecutive windows, each evaluated alone (positions
/// from 0, an empty cache):
///
/// * `bos: None`: windows of `ctx` tokens (the last partial window included if
///   it has at least 2 tokens); within each window every token after the first
///   is scored given the preceding tokens of that window only.
/// * `bos: Some(id)`: windows of `ctx - 1` tokens, each evaluated as
///   `[id] + window`; every token is scored (the first of a window given only
///   the BOS). Models trained to always see a BOS at position 0 (Gemma) are
///   only meaningful this way.
pub fn perplexity(
    runner: &mut Runner,
    ids: &[u32],
    ctx: usize,
    bos: Option<u32>,
) -> Result<Perplexity, RunnerError> {
    let vocab = runner.model.config.vocab_size;
    let mut nll = 0.0f64;
    let mut tokens = 0usize;
    if let Some(&t) = ids
        .iter()
        .chain(bos.as_ref())
        .find(|&&t| t as usize >= vocab)
    {
        return Err(RunnerError::BadToken(t));
    }
    let (width, min_len) = match bos {
        None => (ctx.max(2), 2),
        Some(_) => (ctx.max(2) - 1, 1),
    };
    for window in ids.chunks(width) {
        if window.len() < min_len {
            continue;
        }
        // Inputs (the BOS, if any, then the window but its last token) and,
        // for each input, the token it predicts.
        let (inputs, targets): (Vec<u32>, &[u32]) = match bos {
            None => (window[..window.len() - 1].to_vec(), &window[1..]),
            Some(b) => (
                std::iter::once(b)
                    .chain(window[..window.len() - 1].iter().copied())
                    .collect(),
                window,
            ),
        };
        runner.reset();
        for (piece, next) in inputs
            .chunks(PERPLEXITY_FEED)
            .zip(targets.chunks(PERPLEXITY_FEED))
        {
            let logits = runner.feed(piece, true)?;
            for (row, &t) in logits.chunks_exact(vocab).zip(next) {
                nll -= crate::sampling::logprob(row, t) as f64;
                tokens += 1;
            }
        }
    }
    let perplexity = if tokens > 0 {
        (nll / tokens as f64).exp()
    } else {
        f64::NAN
    };
    Ok(Perplexity {
        perplexity,
        tokens,
        nll,
    })
}
