//! Tiny random models of every architecture family Brigade runs (llama, Llama 3,
//! Mistral, Qwen 2, Qwen 3, Gemma 2, Gemma 3, Phi-3), in GGUF form exactly as
//! llama.cpp's `convert_hf_to_gguf.py` lays them out, with the tiny byte-level
//! GPT-2 tokenizer of [`super::tiny_vocab`].
//!
//! Owns: the standard spec of each family ([`TinyFamilySpec::standard`]), the
//! GGUF bytes ([`tiny_family_gguf`]) and writing all families to a directory
//! ([`write_all_families`], for `tests/reference/make_family_fixtures.py`).
//! Does not own: reference outputs. Those come from Hugging Face transformers
//! (float32, same dequantized weights) through the committed Python script, and
//! are read with [`super::fixture`].
//!
//! GGUF conventions written here (the reader must undo exactly these):
//! ```text
//! llama, llama3, mistral  arch "llama"; attn_q/attn_k rows in llama.cpp's permuted
//!                         (interleaved-pair RoPE) order; llama3 adds `rope_freqs.weight`
//!                         [head_dim/2] F32 (divisors of the RoPE frequencies);
//!                         mistral adds `llama.attention.sliding_window` (llama.cpp's
//!                         converter writes no window for this arch; the key follows
//!                         the `{arch}.attention.sliding_window` pattern).
//! qwen2                   NEOX RoPE order; F32 biases `blk.N.attn_{q,k,v}.bias`.
//! qwen3                   NEOX; `blk.N.attn_{q,k}_norm.weight` [head_dim] RMSNorm;
//!                         head_dim from `qwen3.attention.key_length`.
//! gemma2, gemma3          NEOX; every `*norm.weight` is stored as (1 + w); no
//!                         `output.weight` (tied); embeddings scaled by sqrt(dim) at
//!                         run time; head_dim from `attention.key_length`.
//!                         gemma2: sliding window on even layers, soft-capping keys,
//!                         no `rope.freq_base` (llama.cpp's default 10000).
//!                         gemma3: no sliding_window_pattern key (llama.cpp default 6:
//!                         layer il is local iff il % 6 < 5), `rope.freq_base` for the
//!                         global layers and `rope.freq_base_swa` for the local ones.
//! phi3                    NEOX; `blk.N.attn_qkv.weight` rows = q | k | v;
//!                         `blk.N.ffn_up.weight` rows = gate | up (2 * ffn);
//!                         `rope_factors_long/short.weight` [head_dim/2] F32,
//!                         `phi3.rope.scaling.attn_factor`,
//!                         `phi3.rope.scaling.original_context_length`,
//!                         `phi3.attention.sliding_window` = 0 (no window).
//! ```
//! Only llama and phi3 write `rope.dimension_count` (as the converter does); the
//! others rotate the whole head.
//!
//! Quantized weights: F32/F16/BF16 and the legacy 32-element types go through
//! ggml's reference quantizer ([`crate::quant::reference::quantize`]) from uniform
//! values; the K-quants (no quantizer here) are random valid blocks: random bytes
//! with `d` (and `dmin`) chosen so the block's values have the requested RMS.

use std::path::{Path, PathBuf};

use half::f16;

use super::{file_type, tiny_vocab, CHATML_TEMPLATE};
use crate::gguf::{GgufError, GgufWriter, MetaValue};
use crate::quant::{
    reference, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlDType, QuantBlock,
};
use crate::sampling::SplitMix64;

/// The architecture families of the tiny models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TinyFamily {
    /// Llama 2 style (`llama` arch, no RoPE scaling).
    Llama,
    /// Llama 3.x: `llama` arch with `rope_freqs.weight` (rope_scaling "llama3").
    Llama3,
    /// Mistral: `llama` arch with a sliding window on every layer.
    Mistral,
    /// Qwen 2 / 2.5: Q/K/V biases.
    Qwen2,
    /// Qwen 3: per-head Q/K RMSNorm.
    Qwen3,
    /// Gemma 2: pre+post norms, GeGLU, soft-capping, alternating sliding window.
    Gemma2,
    /// Gemma 3: Q/K norm, 5 local : 1 global layers, two RoPE bases.
    Gemma3,
    /// Phi-3: fused QKV and gate|up, long-rope factors.
    Phi3,
}

impl TinyFamily {
    /// Every family, in fixture order.
    pub const ALL: [TinyFamily; 8] = [
        TinyFamily::Llama,
        TinyFamily::Llama3,
        TinyFamily::Mistral,
        TinyFamily::Qwen2,
        TinyFamily::Qwen3,
        TinyFamily::Gemma2,
        TinyFamily::Gemma3,
        TinyFamily::Phi3,
    ];

    /// File stem of the model and its fixture (`tests/fixtures/families/<name>.json`).
    pub fn name(self) -> &'static str {
        match self {
            TinyFamily::Llama => "llama",
            TinyFamily::Llama3 => "llama3",
            TinyFamily::Mistral => "mistral",
            TinyFamily::Qwen2 => "qwen2",
            TinyFamily::Qwen3 => "qwen3",
            TinyFamily::Gemma2 => "gemma2",
            TinyFamily::Gemma3 => "gemma3",
            TinyFamily::Phi3 => "phi3",
        }
    }

    /// The family named `name` ([`TinyFamily::name`]).
    pub fn from_name(name: &str) -> Option<TinyFamily> {
        TinyFamily::ALL.into_iter().find(|f| f.name() == name)
    }

    /// `general.architecture` (the prefix of the hyper-parameter keys).
    pub fn arch(self) -> &'static str {
        match self {
            TinyFamily::Llama | TinyFamily::Llama3 | TinyFamily::Mistral => "llama",
            TinyFamily::Qwen2 => "qwen2",
            TinyFamily::Qwen3 => "qwen3",
            TinyFamily::Gemma2 => "gemma2",
            TinyFamily::Gemma3 => "gemma3",
            TinyFamily::Phi3 => "phi3",
        }
    }

    /// The weight roles this family's tensors have (fused roles for phi3 only).
    pub fn roles(self) -> &'static [TensorRole] {
        use TensorRole::*;
        match self {
            TinyFamily::Phi3 => &[Embedding, Output, AttnQkv, AttnOutput, FfnGateUp, FfnDown],
            _ => &[
                Embedding, Output, AttnQ, AttnK, AttnV, AttnOutput, FfnGate, FfnUp, FfnDown,
            ],
        }
    }

    /// Whether norm weights are stored as (1 + w) (Gemma's RMSNorm convention).
    pub fn norm_plus_one(self) -> bool {
        matches!(self, TinyFamily::Gemma2 | TinyFamily::Gemma3)
    }
}

/// The weight matrices of a block (and the embedding/output), for choosing dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorRole {
    /// `token_embd.weight` [dim, vocab].
    Embedding,
    /// `output.weight` [dim, vocab]; absent from [`TinyFamilySpec::dtypes`] = tied.
    Output,
    /// `blk.N.attn_q.weight` [dim, n_heads * head_dim].
    AttnQ,
    /// `blk.N.attn_k.weight` [dim, n_kv_heads * head_dim].
    AttnK,
    /// `blk.N.attn_v.weight` [dim, n_kv_heads * head_dim].
    AttnV,
    /// phi3 `blk.N.attn_qkv.weight` [dim, (n_heads + 2 n_kv_heads) * head_dim].
    AttnQkv,
    /// `blk.N.attn_output.weight` [n_heads * head_dim, dim].
    AttnOutput,
    /// `blk.N.ffn_gate.weight` [dim, ffn].
    FfnGate,
    /// `blk.N.ffn_up.weight` [dim, ffn].
    FfnUp,
    /// phi3 `blk.N.ffn_up.weight` [dim, 2 ffn] (gate rows, then up rows).
    FfnGateUp,
    /// `blk.N.ffn_down.weight` [ffn, dim].
    FfnDown,
}

/// Shape, hyper-parameters and tensor types of one tiny family model.
///
/// All fields are written to the GGUF under the family's keys; an option that
/// does not apply to the family must be `None` (checked by [`tiny_family_gguf`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TinyFamilySpec {
    /// The architecture.
    pub family: TinyFamily,
    /// Number of transformer blocks.
    pub n_layers: u32,
    /// Embedding width.
    pub dim: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads.
    pub n_kv_heads: u32,
    /// Per-head width (may differ from `dim / n_heads`; written as
    /// `attention.key_length`/`value_length` where it does or where the family's
    /// converter writes it).
    pub head_dim: u32,
    /// FFN hidden width.
    pub ffn_dim: u32,
    /// `context_length`.
    pub context_length: u32,
    /// `rope.freq_base` (global layers for gemma3); gemma2 writes none and must
    /// use 10000.
    pub rope_theta: f32,
    /// gemma3 `rope.freq_base_swa` (local layers).
    pub rope_theta_swa: Option<f32>,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// `attention.sliding_window` (mistral, gemma2, gemma3).
    pub sliding_window: Option<u32>,
    /// gemma2 `attn_logit_softcapping`.
    pub attn_softcap: Option<f32>,
    /// gemma2 `final_logit_softcapping`.
    pub final_softcap: Option<f32>,
    /// llama3 rope_scaling "llama3" parameters (give `rope_freqs.weight`).
    pub llama3_rope: Option<Llama3Rope>,
    /// phi3 long-rope parameters (give `rope_factors_long/short.weight`).
    pub long_rope: Option<LongRope>,
    /// dtype per weight role; [`TensorRole::Output`] absent = tied output.
    pub dtypes: Vec<(TensorRole, GgmlDType)>,
    /// Seed of the weight generator.
    pub seed: u64,
}

/// Llama 3 `rope_scaling` ("llama3"), as in HF `config.json`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    /// `factor`.
    pub factor: f32,
    /// `low_freq_factor`.
    pub low_freq_factor: f32,
    /// `high_freq_factor`.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings`.
    pub original_context_length: u32,
}

/// Phi-3 long-rope: the factors are random in `[1, max_factor]` (seeded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongRope {
    /// `original_max_position_embeddings` (`phi3.rope.scaling.original_context_length`).
    pub original_context_length: u32,
    /// Largest generated factor.
    pub max_factor: f32,
}

impl TinyFamilySpec {
    /// The standard tiny model of `family` (the one the fixtures were made from).
    ///
    /// All use dim 256 so K-quants apply to every tensor whose input width is
    /// 256 or 512, a window of 8 tokens where the family has one, and together
    /// use every dtype F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
    /// Q4_K, Q5_K, Q6_K.
    pub fn standard(family: TinyFamily) -> TinyFamilySpec {
        use GgmlDType::*;
        use TensorRole::*;
        let base = TinyFamilySpec {
            family,
            n_layers: 2,
            dim: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ffn_dim: 512,
            context_length: 256,
            rope_theta: 10_000.0,
            rope_theta_swa: None,
            rms_eps: 1e-5,
            sliding_window: None,
            attn_softcap: None,
            final_softcap: None,
            llama3_rope: None,
            long_rope: None,
            dtypes: Vec::new(),
            seed: 0xB51_0000 + family as u64,
        };
        match family {
            TinyFamily::Llama => TinyFamilySpec {
                dtypes: vec![
                    (Embedding, Q8_0),
                    (AttnQ, Q4_0),
                    (AttnK, Q4_0),
                    (AttnV, Q4_1),
                    (AttnOutput, Q5_0),
                    (FfnGate, Q4_K),
                    (FfnUp, Q4_K),
                    (FfnDown, Q6_K),
                ],
                ..base
            },
            TinyFamily::Llama3 => TinyFamilySpec {
                n_heads: 8,
                head_dim: 32,
                llama3_rope: Some(Llama3Rope {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_context_length: 64,
                }),
                dtypes: vec![
                    (Embedding, Q2_K),
                    (Output, Q6_K),
                    (AttnQ, Q3_K),
                    (AttnK, Q3_K),
                    (AttnV, Q5_K),
                    (AttnOutput, Q5_K),
                    (FfnGate, Q2_K),
                    (FfnUp, Q3_K),
                    (FfnDown, Q5_K),
                ],
                ..base
            },
            TinyFamily::Mistral => TinyFamilySpec {
                n_kv_heads: 1,
                sliding_window: Some(8),
                dtypes: vec![
                    (Embedding, BF16),
                    (Output, F16),
                    (AttnQ, Q5_1),
                    (AttnK, Q5_1),
                    (AttnV, Q8_0),
                    (AttnOutput, Q4_1),
                    (FfnGate, Q5_0),
                    (FfnUp, Q5_0),
                    (FfnDown, Q8_0),
                ],
                ..base
            },
            TinyFamily::Qwen2 => TinyFamilySpec {
                rope_theta: 1_000_000.0,
                rms_eps: 1e-6,
                dtypes: vec![
                    (Embedding, F16),
                    (AttnQ, Q8_0),
                    (AttnK, Q8_0),
                    (AttnV, Q8_0),
                    (AttnOutput, Q6_K),
                    (FfnGate, Q4_K),
                    (FfnUp, Q4_K),
                    (FfnDown, Q5_K),
                ],
                ..base
            },
            TinyFamily::Qwen3 => TinyFamilySpec {
                head_dim: 96,
                rope_theta: 1_000_000.0,
                rms_eps: 1e-6,
                dtypes: vec![
                    (Embedding, Q5_K),
                    (Output, Q8_0),
                    (AttnQ, BF16),
                    (AttnK, BF16),
                    (AttnV, F16),
                    (AttnOutput, Q5_1),
                    (FfnGate, Q3_K),
                    (FfnUp, Q2_K),
                    (FfnDown, Q4_0),
                ],
                ..base
            },
            TinyFamily::Gemma2 => TinyFamilySpec {
                n_layers: 4,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 64,
                rms_eps: 1e-6,
                sliding_window: Some(8),
                attn_softcap: Some(10.0),
                final_softcap: Some(15.0),
                dtypes: vec![
                    (Embedding, Q6_K),
                    (AttnQ, Q5_0),
                    (AttnK, Q5_0),
                    (AttnV, Q4_0),
                    (AttnOutput, F32),
                    (FfnGate, Q4_1),
                    (FfnUp, Q4_1),
                    (FfnDown, Q8_0),
                ],
                ..base
            },
            TinyFamily::Gemma3 => TinyFamilySpec {
                n_layers: 7,
                n_heads: 4,
                n_kv_heads: 1,
                head_dim: 32,
                rope_theta: 1_000_000.0,
                rope_theta_swa: Some(20_000.0),
                rms_eps: 1e-6,
                sliding_window: Some(8),
                dtypes: vec![
                    (Embedding, Q8_0),
                    (AttnQ, Q5_0),
                    (AttnK, Q5_0),
                    (AttnV, Q8_0),
                    (AttnOutput, Q4_0),
                    (FfnGate, Q4_K),
                    (FfnUp, Q4_K),
                    (FfnDown, Q6_K),
                ],
                ..base
            },
            TinyFamily::Phi3 => TinyFamilySpec {
                ffn_dim: 256,
                long_rope: Some(LongRope {
                    original_context_length: 16,
                    max_factor: 4.0,
                }),
                dtypes: vec![
                    (Embedding, F16),
                    (Output, BF16),
                    (AttnQkv, Q4_K),
                    (AttnOutput, Q5_K),
                    (FfnGateUp, Q6_K),
                    (FfnDown, Q3_K),
                ],
                ..base
            },
        }
    }

    /// The dtype of `role`, `None` when the spec has none (only allowed for
    /// [`TensorRole::Output`]: tied).
    pub fn dtype(&self, role: TensorRole) -> Option<GgmlDType> {
        self.dtypes
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, d)| *d)
    }

    /// Width of the query projection (`n_heads * head_dim`).
    pub fn q_dim(&self) -> u32 {
        self.n_heads * self.head_dim
    }

    /// Width of the K and V projections (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> u32 {
        self.n_kv_heads * self.head_dim
    }

    /// Number of tokens in the vocabulary ([`super::tiny_vocab`]).
    pub fn vocab_size(&self) -> u32 {
        tiny_vocab().tokens.len() as u32
    }

    /// Whether layer `il` is a sliding-window layer, by llama.cpp's defaults:
    /// mistral every layer, gemma2 `il % 2 < 1`, gemma3 `il % 6 < 5`.
    pub fn is_sliding_layer(&self, il: u32) -> bool {
        match (self.family, self.sliding_window) {
            (_, None) => false,
            (TinyFamily::Gemma2, Some(_)) => il % 2 < 1,
            (TinyFamily::Gemma3, Some(_)) => il % 6 < 5,
            (_, Some(_)) => true,
        }
    }
}

/// `n` values uniform with RMS `rms` around `center`.
fn uniform_values(rng: &mut SplitMix64, n: usize, rms: f32, center: f32) -> Vec<f32> {
    // Uniform in [-a, a) has RMS a / sqrt(3).
    let a = rms * 3f32.sqrt();
    (0..n)
        .map(|_| {
            // Top 24 bits → uniform in [-1, 1).
            let u = ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            center + a * u
        })
        .collect()
}

/// A K-quant block of random bytes whose scale fields are then set by `set_scale`
/// so its dequantized values have RMS `rms`.
fn random_k_block<B: QuantBlock>(rng: &mut SplitMix64, rms: f32, set_scale: fn(&mut B, f32)) -> B {
    let mut bytes = vec![0u8; size_of::<B>()];
    for b in bytes.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    let mut block: B = bytemuck::pod_read_unaligned(&bytes);
    // Unit scale first, measure, then rescale (d and dmin scale all values linearly).
    set_scale(&mut block, 1.0);
    let mut vals = vec![0.0f32; B::BLOCK_SIZE];
    block.dequantize(&mut vals);
    let unit_rms = (vals.iter().map(|v| v * v).sum::<f32>() / vals.len() as f32).sqrt();
    set_scale(
        &mut block,
        if unit_rms > 0.0 { rms / unit_rms } else { 0.0 },
    );
    block
}

/// Tensor bytes of `n` values of `dtype` with RMS `rms` (random K-quant blocks for
/// the K types, reference-quantized uniform values for the others).
fn random_tensor(rng: &mut SplitMix64, dtype: GgmlDType, n: usize, rms: f32) -> Vec<u8> {
    fn blocks_of<B: QuantBlock>(
        rng: &mut SplitMix64,
        n: usize,
        rms: f32,
        set_scale: fn(&mut B, f32),
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(n / B::BLOCK_SIZE * size_of::<B>());
        for _ in 0..n / B::BLOCK_SIZE {
            let b = random_k_block::<B>(rng, rms, set_scale);
            out.extend_from_slice(bytemuck::bytes_of(&b));
        }
        out
    }
    // dmin relative to d: keeps the block's values roughly centred on 0.
    match dtype {
        GgmlDType::Q2_K => blocks_of::<BlockQ2K>(rng, n, rms, |b, s| {
            b.d = f16::from_f32(s);
            b.dmin = f16::from_f32(1.5 * s);
        }),
        GgmlDType::Q3_K => blocks_of::<BlockQ3K>(rng, n, rms, |b, s| b.d = f16::from_f32(s)),
        GgmlDType::Q4_K => blocks_of::<BlockQ4K>(rng, n, rms, |b, s| {
            b.d = f16::from_f32(s);
            b.dmin = f16::from_f32(7.5 * s);
        }),
        GgmlDType::Q5_K => blocks_of::<BlockQ5K>(rng, n, rms, |b, s| {
            b.d = f16::from_f32(s);
            b.dmin = f16::from_f32(15.5 * s);
        }),
        GgmlDType::Q6_K => blocks_of::<BlockQ6K>(rng, n, rms, |b, s| b.d = f16::from_f32(s)),
        other => {
            let values = uniform_values(rng, n, rms, 0.0);
            reference::quantize(other, &values).unwrap_or_default()
        }
    }
}

/// Builds the GGUF bytes of the tiny model `spec` describes.
///
/// # Panics
/// If the spec is inconsistent: a role of the family without a dtype (other than
/// the output), a dtype for a role the family does not have, an option that does
/// not apply to the family, or a row length not a multiple of its dtype's block
/// size. Test-only code; the spec never comes from a file.
pub fn tiny_family_gguf(spec: &TinyFamilySpec) -> Vec<u8> {
    let fam = spec.family;
    let roles = fam.roles();
    for (role, _) in &spec.dtypes {
        assert!(
            roles.contains(role),
            "{}: no tensor has role {role:?}",
            fam.name()
        );
    }
    for role in roles {
        assert!(
            *role == TensorRole::Output || spec.dtype(*role).is_some(),
            "{}: no dtype for {role:?}",
            fam.name()
        );
    }
    assert!(
        spec.n_kv_heads > 0 && spec.n_heads.is_multiple_of(spec.n_kv_heads),
        "n_heads must be a multiple of n_kv_heads > 0"
    );
    let is = |f: &[TinyFamily]| f.contains(&fam);
    use TinyFamily as F;
    assert!(spec.sliding_window.is_none() || is(&[F::Mistral, F::Gemma2, F::Gemma3]));
    assert!(spec.rope_theta_swa.is_none() || is(&[F::Gemma3]));
    assert!(spec.attn_softcap.is_none() || is(&[F::Gemma2]));
    assert!(spec.final_softcap.is_none() || is(&[F::Gemma2]));
    assert!(spec.llama3_rope.is_none() || is(&[F::Llama3]));
    assert!(spec.long_rope.is_none() || is(&[F::Phi3]));
    assert!(
        is(&[F::Gemma2, F::Gemma3, F::Qwen3]) || spec.q_dim() == spec.dim,
        "{}: head_dim * n_heads must equal dim (no key_length key)",
        fam.name()
    );

    let vocab = tiny_vocab();
    let n_vocab = vocab.tokens.len() as u64;
    let (dim, q_dim, kv_dim, ffn) = (
        u64::from(spec.dim),
        u64::from(spec.q_dim()),
        u64::from(spec.kv_dim()),
        u64::from(spec.ffn_dim),
    );
    let arch = fam.arch();
    let key = |k: &str| format!("{arch}.{k}");
    let mut rng = SplitMix64::new(spec.seed);

    let main_dtype = spec
        .dtype(TensorRole::AttnQ)
        .or(spec.dtype(TensorRole::AttnQkv))
        .unwrap_or(GgmlDType::F32);
    let mut w = GgufWriter::new();
    w.add_str("general.architecture", arch)
        .add_str("general.name", format!("tiny-{}-test", fam.name()))
        .add_u32(key("block_count"), spec.n_layers)
        .add_u32(key("context_length"), spec.context_length)
        .add_u32(key("embedding_length"), spec.dim)
        .add_u32(key("feed_forward_length"), spec.ffn_dim)
        .add_u32(key("attention.head_count"), spec.n_heads)
        .add_u32(key("attention.head_count_kv"), spec.n_kv_heads)
        .add_f32(key("attention.layer_norm_rms_epsilon"), spec.rms_eps)
        .add_u32("general.file_type", file_type(main_dtype));
    if fam != F::Gemma2 {
        w.add_f32(key("rope.freq_base"), spec.rope_theta);
    }
    if let Some(theta) = spec.rope_theta_swa {
        w.add_f32(key("rope.freq_base_swa"), theta);
    }
    if is(&[F::Gemma2, F::Gemma3, F::Qwen3]) {
        w.add_u32(key("attention.key_length"), spec.head_dim)
            .add_u32(key("attention.value_length"), spec.head_dim);
    }
    if is(&[F::Llama, F::Llama3, F::Mistral]) {
        w.add_u32(key("vocab_size"), n_vocab as u32);
    }
    if is(&[F::Llama, F::Llama3, F::Mistral, F::Phi3]) {
        w.add_u32(key("rope.dimension_count"), spec.head_dim);
    }
    if let Some(window) = spec.sliding_window {
        w.add_u32(key("attention.sliding_window"), window);
    }
    if let Some(cap) = spec.attn_softcap {
        w.add_f32(key("attn_logit_softcapping"), cap);
    }
    if let Some(cap) = spec.final_softcap {
        w.add_f32(key("final_logit_softcapping"), cap);
    }
    if let Some(lr) = spec.long_rope {
        // HF/converter: scale = max_pos / original, attn_factor = sqrt(1 + ln(scale) / ln(original)).
        let scale = f64::from(spec.context_length) / f64::from(lr.original_context_length);
        let attn_factor = if scale > 1.0 {
            (1.0 + scale.ln() / f64::from(lr.original_context_length).ln()).sqrt()
        } else {
            1.0
        };
        w.add_u32(
            key("rope.scaling.original_context_length"),
            lr.original_context_length,
        )
        .add_f32(key("rope.scaling.attn_factor"), attn_factor as f32)
        // Phi-3's converter writes 0 when HF has no window; llama.cpp ignores it anyway.
        .add_u32(key("attention.sliding_window"), 0);
    }
    w.add_str("tokenizer.ggml.model", "gpt2")
        .add_str("tokenizer.ggml.pre", "smollm")
        .add_str_array("tokenizer.ggml.tokens", &vocab.tokens)
        .add_i32_array("tokenizer.ggml.token_type", &vocab.token_types)
        .add_str_array("tokenizer.ggml.merges", &vocab.merges)
        .add_u32("tokenizer.ggml.bos_token_id", vocab.im_start_id)
        .add_u32("tokenizer.ggml.eos_token_id", vocab.im_end_id)
        .add_u32("tokenizer.ggml.unknown_token_id", vocab.endoftext_id)
        .add_u32("tokenizer.ggml.padding_token_id", vocab.im_end_id)
        .add_bool("tokenizer.ggml.add_bos_token", false)
        .add_str("tokenizer.chat_template", CHATML_TEMPLATE)
        .add("general.quantization_version", MetaValue::U32(2));

    // A matrix [fan_in, n_out] (ggml order: rows of fan_in) of `role`'s dtype.
    let matrix = |w: &mut GgufWriter,
                  rng: &mut SplitMix64,
                  name: String,
                  role: TensorRole,
                  fan_in: u64,
                  n_out: u64,
                  rms: f32| {
        let dtype = spec.dtype(role).unwrap_or(GgmlDType::F32);
        assert!(
            fan_in.is_multiple_of(dtype.block_size() as u64),
            "{name}: row length {fan_in} is not a multiple of the {} block size {}",
            dtype.name(),
            dtype.block_size()
        );
        let data = random_tensor(rng, dtype, (fan_in * n_out) as usize, rms);
        w.add_tensor(name, &[fan_in, n_out], dtype, data);
    };
    // An F32 vector around `center` (norm weights ~1, stored as given).
    let vector =
        |w: &mut GgufWriter, rng: &mut SplitMix64, name: String, n: u64, rms: f32, center: f32| {
            let values = uniform_values(rng, n as usize, rms, center);
            let data = reference::quantize(GgmlDType::F32, &values).unwrap_or_default();
            w.add_tensor(name, &[n], GgmlDType::F32, data);
        };
    // Norm weights: uniform in center * (1 +- 0.17) as stored (HF's w is stored - 1
    // for Gemma).
    let norm = |w: &mut GgufWriter, rng: &mut SplitMix64, name: String, n: u64, center: f32| {
        vector(w, rng, name, n, 0.1 * center, center);
    };
    let proj = |fan_in: u64| 1.0 / (fan_in as f32).sqrt();
    // Logit scale: logits with std ~4 (top-1 rarely a near-tie). Untied: output rows
    // with RMS 0.25 at dim 256 after a unit final norm. Tied: small embeddings (so
    // the current token's own embedding in the residual does not make every
    // prediction "repeat the input") and a final norm of ~8 instead.
    let tied = spec.dtype(TensorRole::Output).is_none();
    let output_rms = 4.0 / (dim as f32).sqrt();
    let (embd_rms, output_norm_center) = if tied { (0.03, 8.0) } else { (1.0, 1.0) };
    // Gemma's post-norms (x sqrt(dim) embeddings): block outputs must outweigh the
    // scaled embedding in the residual for the same reason.
    let post_norm_center = 2.0;

    use TensorRole::*;
    matrix(
        &mut w,
        &mut rng,
        "token_embd.weight".into(),
        Embedding,
        dim,
        n_vocab,
        embd_rms,
    );
    if let Some(l3) = spec.llama3_rope {
        let factors = llama3_rope_factors(spec.rope_theta, spec.head_dim, l3);
        let data = reference::quantize(GgmlDType::F32, &factors).unwrap_or_default();
        w.add_tensor(
            "rope_freqs.weight",
            &[factors.len() as u64],
            GgmlDType::F32,
            data,
        );
    }
    if let Some(lr) = spec.long_rope {
        let half = u64::from(spec.head_dim / 2);
        for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            let spread = (lr.max_factor - 1.0) / 2.0;
            // Uniform in [1, max_factor]: centre (1 + max) / 2, half-width spread.
            let values =
                uniform_values(&mut rng, half as usize, spread / 3f32.sqrt(), 1.0 + spread);
            let data = reference::quantize(GgmlDType::F32, &values).unwrap_or_default();
            w.add_tensor(name, &[half], GgmlDType::F32, data);
        }
    }
    let qk_rms = 1.5 / (dim as f32).sqrt();
    for i in 0..spec.n_layers {
        let blk = |s: &str| format!("blk.{i}.{s}");
        norm(&mut w, &mut rng, blk("attn_norm.weight"), dim, 1.0);
        if fam == F::Phi3 {
            matrix(
                &mut w,
                &mut rng,
                blk("attn_qkv.weight"),
                AttnQkv,
                dim,
                q_dim + 2 * kv_dim,
                qk_rms,
            );
        } else {
            matrix(
                &mut w,
                &mut rng,
                blk("attn_q.weight"),
                AttnQ,
                dim,
                q_dim,
                qk_rms,
            );
            matrix(
                &mut w,
                &mut rng,
                blk("attn_k.weight"),
                AttnK,
                dim,
                kv_dim,
                qk_rms,
            );
            matrix(
                &mut w,
                &mut rng,
                blk("attn_v.weight"),
                AttnV,
                dim,
                kv_dim,
                proj(dim),
            );
        }
        if fam == F::Qwen2 {
            vector(&mut w, &mut rng, blk("attn_q.bias"), q_dim, 0.1, 0.0);
            vector(&mut w, &mut rng, blk("attn_k.bias"), kv_dim, 0.1, 0.0);
            vector(&mut w, &mut rng, blk("attn_v.bias"), kv_dim, 0.1, 0.0);
        }
        if is(&[F::Qwen3, F::Gemma3]) {
            norm(
                &mut w,
                &mut rng,
                blk("attn_q_norm.weight"),
                u64::from(spec.head_dim),
                1.0,
            );
            norm(
                &mut w,
                &mut rng,
                blk("attn_k_norm.weight"),
                u64::from(spec.head_dim),
                1.0,
            );
        }
        matrix(
            &mut w,
            &mut rng,
            blk("attn_output.weight"),
            AttnOutput,
            q_dim,
            dim,
            proj(q_dim),
        );
        if fam.norm_plus_one() {
            norm(
                &mut w,
                &mut rng,
                blk("post_attention_norm.weight"),
                dim,
                post_norm_center,
            );
        }
        norm(&mut w, &mut rng, blk("ffn_norm.weight"), dim, 1.0);
        if fam == F::Phi3 {
            matrix(
                &mut w,
                &mut rng,
                blk("ffn_up.weight"),
                FfnGateUp,
                dim,
                2 * ffn,
                proj(dim),
            );
        } else {
            matrix(
                &mut w,
                &mut rng,
                blk("ffn_gate.weight"),
                FfnGate,
                dim,
                ffn,
                proj(dim),
            );
            matrix(
                &mut w,
                &mut rng,
                blk("ffn_up.weight"),
                FfnUp,
                dim,
                ffn,
                proj(dim),
            );
        }
        matrix(
            &mut w,
            &mut rng,
            blk("ffn_down.weight"),
            FfnDown,
            ffn,
            dim,
            proj(ffn),
        );
        if fam.norm_plus_one() {
            norm(
                &mut w,
                &mut rng,
                blk("post_ffw_norm.weight"),
                dim,
                post_norm_center,
            );
        }
    }
    norm(
        &mut w,
        &mut rng,
        "output_norm.weight".into(),
        dim,
        output_norm_center,
    );
    if !tied {
        matrix(
            &mut w,
            &mut rng,
            "output.weight".into(),
            Output,
            dim,
            n_vocab,
            output_rms,
        );
    }
    w.to_bytes()
}

/// The `rope_freqs.weight` divisors of Llama 3's rope_scaling, computed as
/// llama.cpp's converter does (f32 frequencies, f64 wavelength arithmetic).
pub fn llama3_rope_factors(theta: f32, head_dim: u32, p: Llama3Rope) -> Vec<f32> {
    let old_ctx = f64::from(p.original_context_length);
    let low_freq_wavelen = old_ctx / f64::from(p.low_freq_factor);
    let high_freq_wavelen = old_ctx / f64::from(p.high_freq_factor);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                p.factor
            } else {
                let smooth = (old_ctx / wavelen - f64::from(p.low_freq_factor))
                    / f64::from(p.high_freq_factor - p.low_freq_factor);
                (1.0 / ((1.0 - smooth) / f64::from(p.factor) + smooth)) as f32
            }
        })
        .collect()
}

/// Writes [`tiny_family_gguf`]`(spec)` to `path`.
pub fn write_tiny_family(spec: &TinyFamilySpec, path: impl AsRef<Path>) -> Result<(), GgufError> {
    let path = path.as_ref();
    std::fs::write(path, tiny_family_gguf(spec)).map_err(|source| GgufError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes the standard model of every family to `dir/<family>.gguf` (creating
/// `dir`); returns the paths in [`TinyFamily::ALL`] order.
pub fn write_all_families(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>, GgufError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| GgufError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut paths = Vec::new();
    for fam in TinyFamily::ALL {
        let path = dir.join(format!("{}.gguf", fam.name()));
        write_tiny_family(&TinyFamilySpec::standard(fam), &path)?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn every_family_parses_and_all_types_are_used() {
        let mut used = HashSet::new();
        for fam in TinyFamily::ALL {
            let spec = TinyFamilySpec::standard(fam);
            let bytes = tiny_family_gguf(&spec);
            let file =
                GgufFile::from_bytes(bytes).unwrap_or_else(|e| panic!("{}: {e}", fam.name()));
            for t in file.tensors() {
                used.insert(t.dtype);
            }
        }
        for dt in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2_K,
            GgmlDType::Q3_K,
            GgmlDType::Q4_K,
            GgmlDType::Q5_K,
            GgmlDType::Q6_K,
        ] {
            assert!(used.contains(&dt), "no family uses {}", dt.name());
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let spec = TinyFamilySpec::standard(TinyFamily::Phi3);
        assert_eq!(tiny_family_gguf(&spec), tiny_family_gguf(&spec));
    }

    #[test]
    fn random_k_blocks_have_the_requested_rms() {
        let mut rng = SplitMix64::new(7);
        for dt in [
            GgmlDType::Q2_K,
            GgmlDType::Q3_K,
            GgmlDType::Q4_K,
            GgmlDType::Q5_K,
            GgmlDType::Q6_K,
        ] {
            let n = 256 * 64;
            let bytes = random_tensor(&mut rng, dt, n, 0.05);
            let vals = reference::dequantize(dt, &bytes, n).unwrap_or_default();
            let rms = (vals.iter().map(|v| v * v).sum::<f32>() / n as f32).sqrt();
            assert!((rms - 0.05).abs() < 0.005, "{}: rms {rms}", dt.name());
        }
    }

    #[test]
    fn llama3_factors_cover_all_three_bands() {
        let spec = TinyFamilySpec::standard(TinyFamily::Llama3);
        let f = llama3_rope_factors(
            spec.rope_theta,
            spec.head_dim,
            spec.llama3_rope.unwrap_or(Llama3Rope {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context_length: 64,
            }),
        );
        assert_eq!(f.len(), 16);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[15], 8.0);
        assert!(f.iter().any(|&x| x > 1.0 && x < 8.0));
    }

    #[test]
    fn sliding_layers_follow_llama_cpp_defaults() {
        let g3 = TinyFamilySpec::standard(TinyFamily::Gemma3);
        let local: Vec<bool> = (0..g3.n_layers).map(|il| g3.is_sliding_layer(il)).collect();
        assert_eq!(local, [true, true, true, true, true, false, true]);
        let g2 = TinyFamilySpec::standard(TinyFamily::Gemma2);
        assert!(g2.is_sliding_layer(0) && !g2.is_sliding_layer(1));
    }

    /// Writes every family's model to `$BRIGADE_FAMILY_DIR` (default
    /// `target/tiny-families`) for `tests/reference/make_family_fixtures.py`:
    /// `cargo test --lib testing::family::tests::write_family_models -- --ignored`.
    #[test]
    #[ignore = "writes files for the reference script"]
    fn write_family_models() {
        let dir =
            std::env::var("BRIGADE_FAMILY_DIR").unwrap_or_else(|_| "target/tiny-families".into());
        let paths = write_all_families(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        for p in paths {
            println!("wrote {}", p.display());
        }
    }
}
