//! Per-architecture descriptions: how each supported `general.architecture`
//! differs from the Llama block, as data the one forward pass
//! ([`super::llama`]) reads, never as a copy of it per family.
//!
//! Owns: the table of families and their defaults (taken from llama.cpp's
//! hyper-parameter loading, `src/models/<arch>.cpp`). Does not own: reading
//! the metadata ([`super::ModelConfig::from_gguf`]) nor the weights.
//!
//! ```text
//!            rope  ffn       q/k norm  post norms  emb*sqrt(d)  sliding window          soft-caps
//! llama      norm  SwiGLU    -         -           -            all layers if key set   -
//! qwen2      neox  SwiGLU    -         -           -            (ignored, as llama.cpp) -
//! qwen3      neox  SwiGLU    yes       -           -            (ignored, as llama.cpp) -
//! gemma2     neox  GeGLU     -         yes         yes          every 2nd (pattern 2)   attn 50, final 30
//! gemma3     neox  GeGLU     yes       yes         yes          5 of 6 (pattern 6)      final if key set
//! phi3       neox  SwiGLU    -         -           -            all layers if key > 0   -
//! ```
//!
//! Fused tensors (`attn_qkv`, a `2 x ffn` `ffn_up` without `ffn_gate`) and
//! Q/K/V biases are taken wherever the file has them.
//!
//! Differences from llama.cpp, on purpose: Phi-3's `attention.sliding_window`
//! (when > 0) is applied on every layer as transformers does (llama.cpp
//! currently disables Phi SWA); a `llama` file with `attention.sliding_window`
//! (Mistral) slides on every layer (llama.cpp's `llama` loader ignores the
//! key). Both equal the transformers reference.

/// A supported `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 1-3, SmolLM, Mistral.
    Llama,
    /// Qwen 2 / 2.5.
    Qwen2,
    /// Qwen 3 (dense).
    Qwen3,
    /// Gemma 2.
    Gemma2,
    /// Gemma 3 (text).
    Gemma3,
    /// Phi-3 / Phi-3.5 / Phi-4 (mini).
    Phi3,
}

/// The `general.architecture` names Brigade runs, for error messages.
pub const SUPPORTED_ARCHS: &str = "llama, qwen2, qwen3, gemma2, gemma3, phi3";

/// How RoPE pairs the elements of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)` (llama.cpp's NORM; the `llama` GGUF stores Q/K rows
    /// permuted to match).
    Norm,
    /// Pairs `(i, i + rope_dim / 2)` (llama.cpp's NEOX, Hugging Face's
    /// `rotate_half`).
    Neox,
}

/// The gated feed-forward's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnAct {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU).
    GeluTanh,
}

/// Which layers use the sliding window, and where its size comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwaPolicy {
    /// No sliding window (the key, if any, is ignored as llama.cpp does).
    None,
    /// Every layer, when `<arch>.attention.sliding_window` is present and > 0.
    AllIfKey,
    /// Layer `i` slides when `i % pattern < pattern - 1` (llama.cpp's
    /// `set_swa_pattern`; `<arch>.attention.sliding_window_pattern` overrides
    /// it), with the window from the key or `default_window`; without either
    /// there is no sliding window.
    Pattern {
        /// Period of the local/global layer pattern.
        pattern: usize,
        /// Window when the key is absent.
        default_window: Option<usize>,
    },
}

/// RoPE of the sliding-window layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwaRope {
    /// The global layers' RoPE (base may be overridden by `rope.freq_base_swa`).
    Global,
    /// Its own base (`rope.freq_base_swa`, default 10000), unscaled and
    /// without frequency factors (Gemma 3's local layers).
    Local,
}

/// What distinguishes one family's block from the Llama block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArchSpec {
    /// RoPE pairing.
    pub rope: RopeStyle,
    /// Feed-forward activation.
    pub ffn_act: FfnAct,
    /// Per-head RMSNorm of q and k before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm of the attention and feed-forward outputs before they are
    /// added to the residual (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// Embeddings are scaled by `sqrt(dim)`.
    pub embed_scale: bool,
    /// Sliding-window layers.
    pub swa: SwaPolicy,
    /// RoPE of the sliding-window layers.
    pub swa_rope: SwaRope,
    /// Attention soft-cap when `<arch>.attn_logit_softcapping` is absent.
    pub attn_softcap_default: Option<f32>,
    /// Final-logit soft-cap when `<arch>.final_logit_softcapping` is absent.
    pub final_softcap_default: Option<f32>,
    /// Layer count of the one size whose attention scale is
    /// `1 / sqrt(dim / n_heads)` instead of `1 / sqrt(head_dim)` (Gemma's
    /// 27B models, as llama.cpp decides by layer count; GGUF has no
    /// `query_pre_attn_scalar`).
    pub scale_by_dim_layers: Option<usize>,
}

impl Arch {
    /// Parses `general.architecture`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            _ => return None,
        })
    }

    /// The GGUF name, also the prefix of its metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// The family's description.
    pub fn spec(self) -> ArchSpec {
        let llama = ArchSpec {
            rope: RopeStyle::Norm,
            ffn_act: FfnAct::Silu,
            qk_norm: false,
            post_norms: false,
            embed_scale: false,
            swa: SwaPolicy::AllIfKey,
            swa_rope: SwaRope::Global,
            attn_softcap_default: None,
            final_softcap_default: None,
            scale_by_dim_layers: None,
        };
        let gemma = ArchSpec {
            rope: RopeStyle::Neox,
            ffn_act: FfnAct::GeluTanh,
            post_norms: true,
            embed_scale: true,
            ..llama
        };
        match self {
            Arch::Llama => llama,
            Arch::Qwen2 => ArchSpec {
                rope: RopeStyle::Neox,
                swa: SwaPolicy::None,
                ..llama
            },
            Arch::Qwen3 => ArchSpec {
                rope: RopeStyle::Neox,
                swa: SwaPolicy::None,
                qk_norm: true,
                ..llama
            },
            Arch::Phi3 => ArchSpec {
                rope: RopeStyle::Neox,
                ..llama
            },
            Arch::Gemma2 => ArchSpec {
                swa: SwaPolicy::Pattern {
                    pattern: 2,
                    default_window: Some(4096),
                },
                attn_softcap_default: Some(50.0),
                final_softcap_default: Some(30.0),
                scale_by_dim_layers: Some(46),
                ..gemma
            },
            Arch::Gemma3 => ArchSpec {
                qk_norm: true,
                swa: SwaPolicy::Pattern {
                    pattern: 6,
                    default_window: None,
                },
                swa_rope: SwaRope::Local,
                scale_by_dim_layers: Some(62),
                ..gemma
            },
        }
    }
}
