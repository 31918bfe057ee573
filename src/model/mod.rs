//! The Llama model: hyper-parameters from GGUF metadata, weight views into the
//! mmapped file (never copied; quantized weights are used as they are), and the
//! forward pass in [`llama`].
//!
//! Owns: the weights (through the shared [`GgufFile`]). Does not own: KV storage
//! ([`kv::KvStore`], one per layer-group worker) nor scheduling.

pub mod kv;
pub mod llama;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::gguf::{GgufError, GgufFile};
use crate::quant::GgmlDType;
use crate::kernels::{KernelError, QMatrix};

/// Errors while building a model from a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The GGUF file itself is malformed or lacks a key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The architecture is not one Brigade runs.
    #[error("unsupported architecture `{0}` (supported: llama)")]
    UnsupportedArch(String),
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
pub fn load_with_tokenizer(path: &Path) -> Result<(Arc<Model>, Arc<crate::tokenizer::Tokenizer>), LoadError> {
    let p = || path.display().to_string();
    let mut file = GgufFile::open(path).map_err(|source| LoadError::Gguf { path: p(), source })?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&file).map_err(|source| LoadError::Tokenizer { path: p(), source })?;
    // The vocabulary and merges now live in the tokenizer; the model never
    // reads metadata arrays (a few MiB of strings kept for nothing otherwise).
    file.drop_large_arrays(4096);
    let file = Arc::new(file);
    let model = Model::from_gguf(file).map_err(|source| LoadError::Model { path: p(), source })?;
    Ok((Arc::new(model), Arc::new(tok)))
}

/// Hyper-parameters of a Llama-architecture model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// `general.name`, or the file stem.
    pub name: String,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_heads: usize,
    /// `dim / n_heads`.
    pub head_dim: usize,
    /// `n_kv_heads * head_dim`.
    pub kv_dim: usize,
    /// SwiGLU hidden width.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the output head).
    pub vocab_size: usize,
    /// Trained context length.
    pub context_length: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Number of rotated dimensions per head.
    pub rope_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

impl ModelConfig {
    /// Reads `llama.*` hyper-parameters from GGUF metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArch(arch.to_string()));
        }
        let u = |k: &str| -> Result<usize, ModelError> { Ok(file.get_u32(&format!("llama.{k}"))? as usize) };
        let n_layers = u("block_count")?;
        let dim = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = match file.get("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => n_heads,
        };
        let ffn_dim = u("feed_forward_length")?;
        let context_length = u("context_length")?;
        let bad = |key: &str, reason: String| ModelError::BadHParam { key: format!("llama.{key}"), reason };
        if n_layers == 0 || n_layers > 1024 {
            return Err(bad("block_count", format!("{n_layers} not in 1..=1024")));
        }
        if dim == 0 || n_heads == 0 || dim % n_heads != 0 {
            return Err(bad("attention.head_count", format!("{n_heads} does not divide embedding_length {dim}")));
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(bad("attention.head_count_kv", format!("{n_kv_heads} does not divide head_count {n_heads}")));
        }
        if n_heads / n_kv_heads > crate::kernels::MAX_GROUP {
            return Err(bad(
                "attention.head_count_kv",
                format!("{} query heads per KV head (at most {} supported)", n_heads / n_kv_heads, crate::kernels::MAX_GROUP),
            ));
        }
        let head_dim = dim / n_heads;
        if head_dim % 2 != 0 {
            return Err(bad("attention.head_count", format!("head dim {head_dim} is odd")));
        }
        if ffn_dim == 0 {
            return Err(bad("feed_forward_length", "must be > 0".into()));
        }
        if context_length == 0 {
            return Err(bad("context_length", "must be > 0".into()));
        }
        let rope_theta = match file.get("llama.rope.freq_base") {
            Some(_) => file.get_f32("llama.rope.freq_base")?,
            None => 10000.0,
        };
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(bad("rope.freq_base", format!("{rope_theta} must be > 0")));
        }
        let rope_dim = match file.get("llama.rope.dimension_count") {
            Some(_) => u("rope.dimension_count")?,
            None => head_dim,
        };
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad("rope.dimension_count", format!("{rope_dim} must be even and <= head dim {head_dim}")));
        }
        let rms_eps = match file.get("llama.attention.layer_norm_rms_epsilon") {
            Some(_) => file.get_f32("llama.attention.layer_norm_rms_epsilon")?,
            None => 1e-5,
        };
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(bad("attention.layer_norm_rms_epsilon", format!("{rms_eps} must be > 0")));
        }
        let name = file.get_str("general.name").map(str::to_string).unwrap_or_else(|_| "llama".to_string());
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
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            kv_dim: n_kv_heads * head_dim,
            ffn_dim,
            vocab_size,
            context_length,
            rope_theta,
            rope_dim,
            rms_eps,
        })
    }
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

/// The weights of one transformer block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// RMSNorm gain before attention, `[dim]`.
    pub attn_norm: Vec<f32>,
    /// `[dim] -> [dim]`.
    pub wq: WeightRef,
    /// `[dim] -> [kv_dim]`.
    pub wk: WeightRef,
    /// `[dim] -> [kv_dim]`.
    pub wv: WeightRef,
    /// `[dim] -> [dim]`.
    pub wo: WeightRef,
    /// RMSNorm gain before the feed-forward, `[dim]`.
    pub ffn_norm: Vec<f32>,
    /// `[dim] -> [ffn]`.
    pub w_gate: WeightRef,
    /// `[dim] -> [ffn]`.
    pub w_up: WeightRef,
    /// `[ffn] -> [dim]`.
    pub w_down: WeightRef,
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
    /// Inverse RoPE frequencies, `[rope_dim / 2]`.
    pub rope_inv_freq: Vec<f32>,
}

impl Model {
    /// Builds a model over an opened GGUF file.
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let c = &config;
        let tok_embd = weight(&file, "token_embd.weight", c.vocab_size, c.dim)?;
        let output = if file.tensor_info("output.weight").is_ok() {
            weight(&file, "output.weight", c.vocab_size, c.dim)?
        } else {
            tok_embd.clone()
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let w = |n: &str, rows, cols| weight(&file, &format!("blk.{i}.{n}.weight"), rows, cols);
            layers.push(LayerWeights {
                attn_norm: vector(&file, &format!("blk.{i}.attn_norm.weight"), c.dim)?,
                wq: w("attn_q", c.dim, c.dim)?,
                wk: w("attn_k", c.kv_dim, c.dim)?,
                wv: w("attn_v", c.kv_dim, c.dim)?,
                wo: w("attn_output", c.dim, c.dim)?,
                ffn_norm: vector(&file, &format!("blk.{i}.ffn_norm.weight"), c.dim)?,
                w_gate: w("ffn_gate", c.ffn_dim, c.dim)?,
                w_up: w("ffn_up", c.ffn_dim, c.dim)?,
                w_down: w("ffn_down", c.dim, c.ffn_dim)?,
            });
        }
        let output_norm = vector(&file, "output_norm.weight", c.dim)?;
        // Weights now live in their packed copies (embedding lookups read the
        // packed copy too): let their mapped pages go.
        for w in layers.iter().flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]).chain([&output, &tok_embd]) {
            if w.packed.is_some() {
                file.release_pages(w.bytes.clone());
            }
        }
        let half = c.rope_dim / 2;
        let rope_inv_freq =
            (0..half).map(|i| (c.rope_theta as f64).powf(-2.0 * i as f64 / c.rope_dim as f64) as f32).collect();
        Ok(Self { config, file, tok_embd, layers, output_norm, output, rope_inv_freq })
    }

    /// The matrix view of a validated weight.
    pub fn mat(&self, w: &WeightRef) -> QMatrix<'_> {
        QMatrix { dtype: w.dtype, rows: w.rows, cols: w.cols, data: &self.file.as_bytes()[w.bytes.clone()] }
    }

    /// Bytes of weights this model maps (all tensors).
    pub fn weight_bytes(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.size_bytes).sum()
    }
}

/// Looks up a 2-D weight, checks its shape `[cols, rows]` and dtype, and records its bytes.
fn weight(file: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<WeightRef, ModelError> {
    let info = file.tensor_info(name)?;
    let expected = vec![cols as u64, rows as u64];
    if info.dims != expected {
        return Err(ModelError::BadShape { tensor: name.into(), got: info.dims.clone(), expected });
    }
    let data = file.tensor_data(name)?;
    let qm = QMatrix::new(info.dtype, rows, cols, data).map_err(|source| ModelError::Kernel { tensor: name.into(), source })?;
    let packed = crate::kernels::PackedMatrix::for_current_isa(&qm).map(Arc::new);
    let base = file.as_bytes().as_ptr() as usize;
    let start = data.as_ptr() as usize - base;
    Ok(WeightRef { name: name.into(), dtype: info.dtype, rows, cols, bytes: start..start + data.len(), packed })
}

/// Reads a 1-D tensor of length `n` (any float dtype) into f32.
fn vector(file: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let info = file.tensor_info(name)?;
    if info.dims != [n as u64] {
        return Err(ModelError::BadShape { tensor: name.into(), got: info.dims.clone(), expected: vec![n as u64] });
    }
    let data = file.tensor_data(name)?;
    let m = QMatrix::new(info.dtype, 1, n, data).map_err(|source| ModelError::Kernel { tensor: name.into(), source })?;
    let mut out = vec![0.0; n];
    m.dequantize_row(0, &mut out);
    Ok(out)
}
