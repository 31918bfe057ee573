//! One batch through a model's layers and head, for the batch-invariance
//! tests of the tiny families (tests/families.rs, tests/kv_q8.rs).

use std::sync::Arc;

use brigade::gguf::GgufFile;
use brigade::model::kv::KvStore;
use brigade::model::llama::{Scratch, SeqChunk};
use brigade::model::Model;
use brigade::testing::{tiny_family_gguf, TinyFamily, TinyFamilySpec};

/// The standard tiny model of `family` (every tensor type of its mix).
pub fn family_model(family: TinyFamily) -> Arc<Model> {
    let bytes = tiny_family_gguf(&TinyFamilySpec::standard(family));
    let file = Arc::new(GgufFile::from_bytes(bytes).expect("tiny family gguf"));
    Arc::new(Model::from_gguf(file).unwrap_or_else(|e| panic!("{}: {e}", family.name())))
}

/// One sequence chunk of a batch: start position, tokens, block table.
pub struct Chunk<'a> {
    pub pos: usize,
    pub tokens: &'a [u32],
    pub table: &'a [u32],
}

/// Runs one batch through every layer and the head; logits of every row.
pub fn run_batch(
    m: &Model,
    kv: &mut KvStore,
    s: &mut Scratch,
    chunks: &[Chunk<'_>],
    pool: Option<&rayon::ThreadPool>,
) -> Vec<f32> {
    let (dim, vocab) = (m.config.dim, m.config.vocab_size);
    let tokens: Vec<u32> = chunks
        .iter()
        .flat_map(|c| c.tokens.iter().copied())
        .collect();
    let mut x = vec![0.0; tokens.len() * dim];
    m.embed(&tokens, &mut x);
    let seqs: Vec<SeqChunk<'_>> = chunks
        .iter()
        .map(|c| SeqChunk {
            pos: c.pos,
            len: c.tokens.len(),
            block_table: c.table,
        })
        .collect();
    m.forward_layers(0..m.config.n_layers, &mut x, &seqs, kv, s, pool);
    let mut logits = vec![0.0; tokens.len() * vocab];
    m.logits(
        &x,
        &mut logits,
        s,
        pool,
        brigade::config::RuntimeConfig::default().head_digits(),
    );
    logits
}

/// `n` deterministic pseudo-random token ids below `vocab`.
pub fn tokens(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % vocab as u32)
        .collect()
}
