//! The model of every supported family (Llama, Qwen 2/3, Gemma 2/3, Phi-3;
//! see [`arch`]): hyper-parameters from `<arch>.*` GGUF metadata, weight views
//! into the mmapped file (never copied; quantized weights are used as they
//! are; fused tensors are split into row ranges), and the one parameterised
//! forward pass in [`llama`].
//!
//! Owns: the weights (through the shared [`GgufFile`]). Does not own: KV storage
//! ([`kv::KvStore`], one per layer-group worker) nor scheduling.

pub mod arch;
pub mod kv;
pub mod llama;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

pub use arch::{Arch, ArchSpec, FfnAct, RopeStyle, SUPPORTED_ARCHS};
use arch::{SwaPolicy, SwaRope};

use crate::gguf::{GgufError, GgufFile, MetaValue};
use crate::kernels::{KernelError, QMatrix, QK};
use crate::quant::GgmlDType;

/// Errors while building a model from a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The GGUF file itself is malformed or lacks a key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The architecture is not one Brigade runs.
    #[error("unsupported architecture `{0}` (supported: {SUPPORTED_ARCHS})")]
    UnsupportedArch(String),
    /// A layer has only some of a set of tensors that go together.
    #[error("layer {layer}: {what}")]
    MissingPart {
        /// Block index.
        layer: usize,
        /// Which tensors.
        what: &'static str,
    },
    /// A hyper-parameter is out of range or inconsistent.
    #[error("invalid model hyper-parameter `{key}`: {reason}")]
    BadHParam {
        /// Metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor has an unexpected shape.
    #[error("tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// Its shape.
        got: Vec<u64>,
        /// The shape the hyper-parameters imply.
        expected: Vec<u64>,
    },
    /// A tensor has a dtype we cannot compute with.
    #[error("tensor `{tensor}`: {source}")]
    Kernel {
        /// Tensor name.
        tensor: String,
        /// The kernel layer's error.
        source: KernelError,
    },
}

/// Errors of [`load_with_tokenizer`], naming the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or parsed.
    #[error("loading {path}: {source}")]
    Gguf {
        /// The model file.
        path: String,
        /// The reader's error.
        source: GgufError,
    },
    /// The tokenizer metadata is unusable.
    #[error("tokenizer of {path}: {source}")]
    Tokenizer {
        /// The model file.
        path: String,
        /// The tokenizer's error.
        source: crate::tokenizer::TokenizerError,
    },
    /// The model tensors or hyper-parameters are unusable.
    #[error("model {path}: {source}")]
    Model {
        /// The model file.
        path: String,
        /// The model's error.
        source: ModelError,
    },
}

/// Maps a GGUF file once and builds both the model and its tokenizer from it
/// (the one loading path of every command and the server).
pub fn load_with_tokenizer(
    path: &Path,
) -> Result<(Arc<Model>, Arc<crate::tokenizer::Tokenizer>), LoadError> {
    let p = || path.display().to_string();
    let mut file = GgufFile::open(path).map_err(|source| LoadError::Gguf { path: p(), source })?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&file)
        .map_err(|source| LoadError::Tokenizer { path: p(), source })?;
    // The vocabulary and merges now live in the tokenizer; the model never
    // reads metadata arrays (a few MiB of strings kept for nothing otherwise).
    file.drop_large_arrays(4096);
    let file = Arc::new(file);
    let model = Model::from_gguf(file).map_err(|source| LoadError::Model { path: p(), source })?;
    Ok((Arc::new(model), Arc::new(tok)))
}

/// Hyper-parameters of a model of any supported family, from `<arch>.*`
/// metadata (defaults as llama.cpp's loader where a key is optional).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// `general.name`, or the architecture name.
    pub name: String,
    /// `general.architecture`.
    pub arch: Arch,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_heads: usize,
    /// Elements per head: `<arch>.attention.key_length`, else `dim / n_heads`.
    pub head_dim: usize,
    /// `n_heads * head_dim` (width of q and of the attention output).
    pub q_dim: usize,
    /// `n_kv_heads * head_dim`.
    pub kv_dim: usize,
    /// Gated feed-forward hidden width.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the output head).
    pub vocab_size: usize,
    /// Trained context length.
    pub context_length: usize,
    /// RoPE base frequency of the global (full-attention) layers.
    pub rope_theta: f32,
    /// RoPE base frequency of the sliding-window layers.
    pub rope_theta_swa: f32,
    /// Linear RoPE frequency scale of the global layers
    /// (`1 / <arch>.rope.scaling.factor`).
    pub rope_freq_scale: f32,
    /// Number of rotated dimensions per head.
    pub rope_dim: usize,
    /// RoPE pairing of the family.
    pub rope_style: RopeStyle,
    /// Multiplier of RoPE's cos/sin (`<arch>.rope.scaling.attn_factor`, Phi-3
    /// long-rope; 1 otherwise).
    pub rope_attn_factor: f32,
    /// Tensor of per-frequency divisors applied to the global layers' RoPE:
    /// `rope_freqs.weight` (Llama 3.x) or, for long-rope models, the long
    /// factors when `context_length` exceeds
    /// `<arch>.rope.scaling.original_context_length` and the short ones
    /// otherwise (llama.cpp picks by its context size, which defaults to the
    /// trained one).
    pub rope_factors: Option<String>,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Score scale (`1 / sqrt(head_dim)`, Gemma 27B: `1 / sqrt(dim / n_heads)`).
    pub attn_scale: f32,
    /// Attention logit soft-cap (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final logit soft-cap (Gemma 2, Gemma 3 when set).
    pub final_softcap: Option<f32>,
    /// Embedding multiplier (`sqrt(dim)` for Gemma).
    pub embed_scale: Option<f32>,
    /// Feed-forward activation.
    pub ffn_act: FfnAct,
    /// Keys a sliding-window layer attends to (a row at position `p` reads
    /// positions `> p - window`).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it uses the sliding window.
    pub swa_layers: Vec<bool>,
}

impl ModelConfig {
    /// Reads `<arch>.*` hyper-parameters from GGUF metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = file.get_str("general.architecture")?;
        let arch = Arch::from_name(arch_name)
            .ok_or_else(|| ModelError::UnsupportedArch(arch_name.to_string()))?;
        let spec = arch.spec();
        let p = arch.name();
        let key = |k: &str| format!("{p}.{k}");
        let has = |k: &str| file.get(&key(k)).is_some();
        let u = |k: &str| -> Result<usize, ModelError> { Ok(file.get_u32(&key(k))? as usize) };
        let u_or = |k: &str, d: usize| -> Result<usize, ModelError> {
            if has(k) {
                u(k)
            } else {
                Ok(d)
            }
        };
        let f_opt = |k: &str| -> Result<Option<f32>, ModelError> {
            if has(k) {
                Ok(Some(file.get_f32(&key(k))?))
            } else {
                Ok(None)
            }
        };
        let bad = |k: &str, reason: String| ModelError::BadHParam {
            key: key(k),
            reason,
        };
        let n_layers = u("block_count")?;
        let dim = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = u_or("attention.head_count_kv", n_heads)?;
        let ffn_dim = u("feed_forward_length")?;
        let context_length = u("context_length")?;
        if n_layers == 0 || n_layers > 1024 {
            return Err(bad("block_count", format!("{n_layers} not in 1..=1024")));
        }
        if dim == 0 || !dim.is_multiple_of(QK) {
            return Err(bad(
                "embedding_length",
                format!("{dim} must be a positive multiple of {QK}"),
            ));
        }
        if n_heads == 0 {
            return Err(bad("attention.head_count", "must be > 0".into()));
        }
        if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(bad(
                "attention.head_count_kv",
                format!("{n_kv_heads} does not divide head_count {n_heads}"),
            ));
        }
        if n_heads / n_kv_heads > crate::kernels::MAX_GROUP {
            return Err(bad(
                "attention.head_count_kv",
                format!(
                    "{} query heads per KV head (at most {} supported)",
                    n_heads / n_kv_heads,
                    crate::kernels::MAX_GROUP
                ),
            ));
        }
        let head_dim = u_or("attention.key_length", dim / n_heads)?;
        if head_dim == 0 || !(n_heads * head_dim).is_multiple_of(QK) {
            return Err(bad(
                "attention.key_length",
                format!(
                    "head dim {head_dim} x {n_heads} heads must be a positive multiple of {QK}"
                ),
            ));
        }
        if has("attention.value_length") && u("attention.value_length")? != head_dim {
            return Err(bad(
                "attention.value_length",
                format!(
                    "{} differs from key_length {head_dim} (unsupported)",
                    u("attention.value_length")?
                ),
            ));
        }
        if ffn_dim == 0 || !ffn_dim.is_multiple_of(QK) {
            return Err(bad(
                "feed_forward_length",
                format!("{ffn_dim} must be a positive multiple of {QK}"),
            ));
        }
        if context_length == 0 {
            return Err(bad("context_length", "must be > 0".into()));
        }
        let positive = |k: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(bad(k, format!("{v} must be > 0")))
            }
        };
        let rope_theta = positive(
            "rope.freq_base",
            f_opt("rope.freq_base")?.unwrap_or(10000.0),
        )?;
        let rope_dim = u_or("rope.dimension_count", head_dim)?;
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad(
                "rope.dimension_count",
                format!("{rope_dim} must be even and <= head dim {head_dim}"),
            ));
        }
        // RoPE scaling: none or linear (a frequency scale); Llama 3's and
        // long-rope's per-frequency factors come as tensors.
        if has("rope.scaling.type") {
            let t = file.get_str(&key("rope.scaling.type"))?;
            if !matches!(t, "none" | "linear") {
                return Err(bad(
                    "rope.scaling.type",
                    format!("`{t}` is not supported (supported: none, linear)"),
                ));
            }
        }
        let rope_freq_scale = match f_opt("rope.scaling.factor")? {
            None | Some(0.0) => 1.0,
            Some(f) => 1.0 / positive("rope.scaling.factor", f)?,
        };
        let rope_attn_factor = positive(
            "rope.scaling.attn_factor",
            f_opt("rope.scaling.attn_factor")?.unwrap_or(1.0),
        )?;
        let rope_factors = if file.tensor_info("rope_freqs.weight").is_ok() {
            Some("rope_freqs.weight".to_string())
        } else if file.tensor_info("rope_factors_long.weight").is_ok() {
            let orig = u_or("rope.scaling.original_context_length", context_length)?;
            Some(
                if context_length > orig {
                    "rope_factors_long.weight"
                } else {
                    "rope_factors_short.weight"
                }
                .to_string(),
            )
        } else {
            None
        };
        let rms_eps = positive(
            "attention.layer_norm_rms_epsilon",
            f_opt("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        )?;
        // Sliding window: which layers, how wide.
        let key_window = if has("attention.sliding_window") {
            Some(u("attention.sliding_window")?)
        } else {
            None
        };
        let (sliding_window, swa_layers) = match spec.swa {
            SwaPolicy::None => (None, vec![false; n_layers]),
            SwaPolicy::AllIfKey => match key_window.filter(|&w| w > 0) {
                Some(w) => (Some(w), vec![true; n_layers]),
                None => (None, vec![false; n_layers]),
            },
            SwaPolicy::Pattern {
                pattern,
                default_window,
            } => match key_window.or(default_window).filter(|&w| w > 0) {
                None => (None, vec![false; n_layers]),
                Some(w) => (
                    Some(w),
                    swa_pattern(
                        file,
                        &key("attention.sliding_window_pattern"),
                        pattern,
                        n_layers,
                    )?,
                ),
            },
        };
        let rope_theta_swa = match (spec.swa_rope, f_opt("rope.freq_base_swa")?) {
            (_, Some(b)) => positive("rope.freq_base_swa", b)?,
            (SwaRope::Local, None) => 10000.0,
            (SwaRope::Global, None) => rope_theta,
        };
        let cap = |k: &str, default: Option<f32>| -> Result<Option<f32>, ModelError> {
            match f_opt(k)?.or(default) {
                None | Some(0.0) => Ok(None),
                Some(c) => Ok(Some(positive(k, c)?)),
            }
        };
        let attn_softcap = cap("attn_logit_softcapping", spec.attn_softcap_default)?;
        let final_softcap = cap("final_logit_softcapping", spec.final_softcap_default)?;
        let attn_scale = match spec.scale_by_dim_layers {
            Some(l) if l == n_layers => 1.0 / ((dim / n_heads) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let name = file
            .get_str("general.name")
            .map(str::to_string)
            .unwrap_or_else(|_| p.to_string());
        let embd = file.tensor_info("token_embd.weight")?;
        let vocab_size = embd.dims.get(1).copied().unwrap_or(0) as usize;
        if vocab_size == 0 {
            return Err(ModelError::BadShape {
                tensor: "token_embd.weight".into(),
                got: embd.dims.clone(),
                expected: vec![dim as u64, 0],
            });
        }
        Ok(Self {
            name,
            arch,
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            q_dim: n_heads * head_dim,
            kv_dim: n_kv_heads * head_dim,
            ffn_dim,
            vocab_size,
            context_length,
            rope_theta,
            rope_theta_swa,
            rope_freq_scale,
            rope_dim,
            rope_style: spec.rope,
            rope_attn_factor,
            rope_factors,
            rms_eps,
            attn_scale,
            attn_softcap,
            final_softcap,
            embed_scale: spec.embed_scale.then(|| (dim as f32).sqrt()),
            ffn_act: spec.ffn_act,
            sliding_window,
            swa_layers,
        })
    }
}

/// Per-layer sliding-window flags: `key` as an array of bools (one per
/// layer) or a period `n` (layer `i` slides when `i % n < n - 1`), else the
/// family's default period.
fn swa_pattern(
    file: &GgufFile,
    key: &str,
    default: usize,
    n_layers: usize,
) -> Result<Vec<bool>, ModelError> {
    let bad = |reason: String| ModelError::BadHParam {
        key: key.to_string(),
        reason,
    };
    let period = match file.get(key) {
        None => default,
        Some(v) => match v.as_array() {
            Some(a) => {
                if a.len() != n_layers {
                    return Err(bad(format!(
                        "{} entries, expected one per layer ({n_layers})",
                        a.len()
                    )));
                }
                return a
                    .iter()
                    .map(|x| match x {
                        MetaValue::Bool(b) => Ok(*b),
                        other => other
                            .as_int()
                            .map(|i| i != 0)
                            .ok_or_else(|| bad(format!("entry {other:?} is not a bool"))),
                    })
                    .collect();
            }
            None => file.get_u32(key)? as usize,
        },
    };
    Ok((0..n_layers)
        .map(|i| period == 0 || i % period < period - 1)
        .collect())
}

/// A weight matrix located in the mapped file (validated at load).
#[derive(Clone, Debug)]
pub struct WeightRef {
    /// GGUF tensor name.
    pub name: String,
    /// Storage dtype.
    pub dtype: GgmlDType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Byte range in [`GgufFile::as_bytes`].
    pub bytes: Range<usize>,
    /// Repacked copy for the AVX-512 VNNI kernel (None on other CPUs).
    pub packed: Option<Arc<crate::kernels::PackedMatrix>>,
}

/// The weights of one transformer block (optional parts by family; see
/// [`arch`]).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// RMSNorm gain before attention, `[dim]`.
    pub attn_norm: Vec<f32>,
    /// `[dim] -> [q_dim]` (rows of `attn_qkv` when fused).
    pub wq: WeightRef,
    /// `[dim] -> [kv_dim]`.
    pub wk: WeightRef,
    /// `[dim] -> [kv_dim]`.
    pub wv: WeightRef,
    /// Biases of q, k, v (`[q_dim]`, `[kv_dim]`, `[kv_dim]`; Qwen 2).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head RMSNorm gains of q and k, `[head_dim]` each (Qwen 3, Gemma 3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// `[q_dim] -> [dim]`.
    pub wo: WeightRef,
    /// RMSNorm gain of the attention output, `[dim]` (Gemma).
    pub post_attn_norm: Option<Vec<f32>>,
    /// RMSNorm gain before the feed-forward, `[dim]`.
    pub ffn_norm: Vec<f32>,
    /// `[dim] -> [ffn]` (first half of `ffn_up` when fused).
    pub w_gate: WeightRef,
    /// `[dim] -> [ffn]`.
    pub w_up: WeightRef,
    /// `[ffn] -> [dim]`.
    pub w_down: WeightRef,
    /// RMSNorm gain of the feed-forward output, `[dim]` (Gemma).
    pub post_ffn_norm: Option<Vec<f32>>,
    /// Index of this layer's RoPE frequency table in [`Model::rope_inv_freq`].
    pub rope_table: usize,
}

/// A loaded model: config, weight views, and the mapped file that backs them.
#[derive(Debug)]
pub struct Model {
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// The mapped GGUF file (shared with the tokenizer).
    pub file: Arc<GgufFile>,
    /// Token embeddings `[vocab, dim]`.
    pub tok_embd: WeightRef,
    /// Per-block weights.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm gain, `[dim]`.
    pub output_norm: Vec<f32>,
    /// Output head `[dim] -> [vocab]` (the embedding matrix when tied).
    pub output: WeightRef,
    /// Output head bias `[vocab]`, when the file has one.
    pub output_bias: Option<Vec<f32>>,
    /// RoPE inverse frequencies (scaled and divided by the frequency
    /// factors), `[rope_dim / 2]` each: table 0 for global layers, table 1
    /// (when it differs) for sliding-window layers.
    pub rope_inv_freq: Vec<Vec<f32>>,
}

impl Model {
    /// Builds a model over an opened GGUF file.
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let c = &config;
        let spec = c.arch.spec();
        let tok_embd = weight(&file, "token_embd.weight", c.vocab_size, c.dim)?;
        let output = if file.tensor_info("output.weight").is_ok() {
            weight(&file, "output.weight", c.vocab_size, c.dim)?
        } else {
            tok_embd.clone()
        };
        let output_bias = optional_vector(&file, "output.bias", c.vocab_size)?;
        // RoPE tables: global layers, and sliding-window layers when theirs differ.
        let npairs = c.rope_dim / 2;
        let factors = match &c.rope_factors {
            Some(name) => Some(vector(&file, name, npairs)?),
            None => None,
        };
        let global = rope_inv_freq(
            c.rope_theta,
            c.rope_dim,
            c.rope_freq_scale,
            factors.as_deref(),
        );
        let swa = match spec.swa_rope {
            SwaRope::Local => rope_inv_freq(c.rope_theta_swa, c.rope_dim, 1.0, None),
            SwaRope::Global => rope_inv_freq(
                c.rope_theta_swa,
                c.rope_dim,
                c.rope_freq_scale,
                factors.as_deref(),
            ),
        };
        let mut rope_tables = vec![global];
        if c.swa_layers.iter().any(|&s| s) && swa != rope_tables[0] {
            rope_tables.push(swa);
        }
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |n: &str| format!("blk.{i}.{n}");
            let w = |n: &str, rows, cols| weight(&file, &name(&format!("{n}.weight")), rows, cols);
            let v = |n: &str, len| vector(&file, &name(&format!("{n}.weight")), len);
            // q, k, v: separate tensors, or row ranges of the fused `attn_qkv`.
            let (wq, wk, wv, qkv_bias) = if file.tensor_info(&name("attn_qkv.weight")).is_ok() {
                let t = name("attn_qkv.weight");
                let rows = c.q_dim + 2 * c.kv_dim;
                let bias = optional_vector(&file, &name("attn_qkv.bias"), rows)?.map(|b| {
                    [
                        b[..c.q_dim].to_vec(),
                        b[c.q_dim..c.q_dim + c.kv_dim].to_vec(),
                        b[c.q_dim + c.kv_dim..].to_vec(),
                    ]
                });
                (
                    weight_rows(&file, &t, rows, c.dim, 0..c.q_dim)?,
                    weight_rows(&file, &t, rows, c.dim, c.q_dim..c.q_dim + c.kv_dim)?,
                    weight_rows(&file, &t, rows, c.dim, c.q_dim + c.kv_dim..rows)?,
                    bias,
                )
            } else {
                let bq = optional_vector(&file, &name("attn_q.bias"), c.q_dim)?;
                let bk = optional_vector(&file, &name("attn_k.bias"), c.kv_dim)?;
                let bv = optional_vector(&file, &name("attn_v.bias"), c.kv_dim)?;
                let bias = match (bq, bk, bv) {
                    (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                    (None, None, None) => None,
                    _ => {
                        return Err(ModelError::MissingPart {
                            layer: i,
                            what: "attn_q/k/v.bias (some but not all present)",
                        })
                    }
                };
                (
                    w("attn_q", c.q_dim, c.dim)?,
                    w("attn_k", c.kv_dim, c.dim)?,
                    w("attn_v", c.kv_dim, c.dim)?,
                    bias,
                )
            };
            let qk_norm = if spec.qk_norm {
                Some([v("attn_q_norm", c.head_dim)?, v("attn_k_norm", c.head_dim)?])
            } else {
                None
            };
            let (post_attn_norm, post_ffn_norm) = if spec.post_norms {
                (
                    Some(v("post_attention_norm", c.dim)?),
                    Some(v("post_ffw_norm", c.dim)?),
                )
            } else {
                (None, None)
            };
            // gate, up: separate tensors, or the halves of a `2 x ffn` `ffn_up`.
            let (w_gate, w_up) = if file.tensor_info(&name("ffn_gate.weight")).is_ok() {
                (
                    w("ffn_gate", c.ffn_dim, c.dim)?,
                    w("ffn_up", c.ffn_dim, c.dim)?,
                )
            } else {
                let t = name("ffn_up.weight");
                let f = c.ffn_dim;
                (
                    weight_rows(&file, &t, 2 * f, c.dim, 0..f)?,
                    weight_rows(&file, &t, 2 * f, c.dim, f..2 * f)?,
                )
            };
            let swa_layer = c.swa_layers.get(i).copied().unwrap_or(false);
            layers.push(LayerWeights {
                attn_norm: v("attn_norm", c.dim)?,
                wq,
                wk,
                wv,
                qkv_bias,
                qk_norm,
                wo: w("attn_output", c.dim, c.q_dim)?,
                post_attn_norm,
                ffn_norm: v("ffn_norm", c.dim)?,
                w_gate,
                w_up,
                w_down: w("ffn_down", c.dim, c.ffn_dim)?,
                post_ffn_norm,
                rope_table: if swa_layer { rope_tables.len() - 1 } else { 0 },
            });
        }
        let output_norm = vector(&file, "output_norm.weight", c.dim)?;
        Ok(Self {
            config,
            file,
            tok_embd,
            layers,
            output_norm,
            output,
            output_bias,
            rope_inv_freq: rope_tables,
        })
    }

    /// The matrix view of a validated weight.
    pub fn mat(&self, w: &WeightRef) -> QMatrix<'_> {
        QMatrix {
            dtype: w.dtype,
            rows: w.rows,
            cols: w.cols,
            data: &self.file.as_bytes()[w.bytes.clone()],
        }
    }

    /// Bytes of weights this model maps (all tensors).
    pub fn weight_bytes(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.size_bytes).sum()
    }
}

/// RoPE inverse frequencies `freq_scale * theta^(-2i / rope_dim) / factor_i`
/// for `i < rope_dim / 2` (llama.cpp's `ggml_rope_ext` with frequency factors).
fn rope_inv_freq(
    theta: f32,
    rope_dim: usize,
    freq_scale: f32,
    factors: Option<&[f32]>,
) -> Vec<f32> {
    (0..rope_dim / 2)
        .map(|i| {
            let f = (theta as f64).powf(-2.0 * i as f64 / rope_dim as f64) as f32 * freq_scale;
            match factors {
                Some(d) => f / d[i],
                None => f,
            }
        })
        .collect()
}

/// Looks up a 2-D weight, checks its shape `[cols, rows]` and dtype, and records its bytes.
fn weight(file: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<WeightRef, ModelError> {
    weight_rows(file, name, rows, cols, 0..rows)
}

/// Like [`weight`], for the rows `range` of a `rows x cols` tensor (a part
/// of a fused tensor; rows are whole blocks, so the part is a byte range).
fn weight_rows(
    file: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    range: Range<usize>,
) -> Result<WeightRef, ModelError> {
    let info = file.tensor_info(name)?;
    let expected = vec![cols as u64, rows as u64];
    if info.dims != expected {
        return Err(ModelError::BadShape {
            tensor: name.into(),
            got: info.dims.clone(),
            expected,
        });
    }
    let data = file.tensor_data(name)?;
    let all = QMatrix::new(info.dtype, rows, cols, data).map_err(|source| ModelError::Kernel {
        tensor: name.into(),
        source,
    })?;
    let rb = all.row_bytes();
    let data = &data[range.start * rb..range.end * rb];
    let qm = QMatrix {
        rows: range.len(),
        data,
        ..all
    };
    let packed = crate::kernels::PackedMatrix::for_current_isa(&qm).map(Arc::new);
    let base = file.as_bytes().as_ptr() as usize;
    let start = data.as_ptr() as usize - base;
    if packed.is_some() {
        // The weight now lives in its packed copy (embedding lookups read it
        // too): its mapped pages go at once, so the load never holds the
        // whole file and every packed copy together (peak RSS).
        file.release_pages(start..start + data.len());
    }
    Ok(WeightRef {
        name: name.into(),
        dtype: info.dtype,
        rows: range.len(),
        cols,
        bytes: start..start + data.len(),
        packed,
    })
}

/// Reads a 1-D tensor of length `n` (any float dtype) into f32.
fn vector(file: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let info = file.tensor_info(name)?;
    if info.dims != [n as u64] {
        return Err(ModelError::BadShape {
            tensor: name.into(),
            got: info.dims.clone(),
            expected: vec![n as u64],
        });
    }
    let data = file.tensor_data(name)?;
    let m = QMatrix::new(info.dtype, 1, n, data).map_err(|source| ModelError::Kernel {
        tensor: name.into(),
        source,
    })?;
    let mut out = vec![0.0; n];
    m.dequantize_row(0, &mut out);
    Ok(out)
}

/// [`vector`] when the file has the tensor, `None` otherwise.
fn optional_vector(file: &GgufFile, name: &str, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if file.tensor_info(name).is_err() {
        return Ok(None);
    }
    vector(file, name, n).map(Some)
}
