//! Test support (feature `test-support`): a tiny random Llama model in GGUF form, laid out like llama.cpp's
//! `convert_hf_to_gguf.py` output, with a small byte-level GPT-2 BPE tokenizer.
//!
//! Owns: synthetic model files for integration tests and benches. Does not own: any
//! reference outputs (golden fixtures come from llama.cpp/HF, never from here).
//!
//! ```text
//! token_embd.weight     [dim, vocab]        spec.embedding_dtype
//! blk.{i}.attn_norm     [dim]               F32 (~1.0)
//! blk.{i}.attn_q        [dim, dim]          spec.weight_dtype
//! blk.{i}.attn_k/_v     [dim, kv_dim]       spec.weight_dtype
//! blk.{i}.attn_output   [dim, dim]          spec.weight_dtype
//! blk.{i}.ffn_norm      [dim]               F32 (~1.0)
//! blk.{i}.ffn_gate/_up  [dim, ffn_dim]      spec.weight_dtype
//! blk.{i}.ffn_down      [ffn_dim, dim]      spec.weight_dtype
//! output_norm.weight    [dim]               F32 (~1.0)
//! output.weight         [dim, vocab]        spec.weight_dtype, only if spec.untied
//! ```
//!
//! Random weights come from [`crate::sampling::SplitMix64`] (no `rand` dependency).
//!
//! Submodules: [`family`] (tiny models of every architecture family) and
//! [`fixture`] (the format of their transformers reference fixtures).

pub mod family;
pub mod fixture;

pub use family::{
    tiny_family_gguf, write_all_families, write_tiny_family, TensorRole, TinyFamily, TinyFamilySpec,
};
pub use fixture::{family_fixture_path, load_family_fixture, FamilyFixture};

use std::path::Path;

use crate::gguf::{GgufError, GgufWriter, MetaValue};
use crate::quant::{reference, GgmlDType};
use crate::sampling::SplitMix64;

/// Shape and contents of a tiny random Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyLlamaSpec {
    /// `general.name`.
    pub name: String,
    /// Number of transformer blocks.
    pub n_layers: u32,
    /// Embedding width (`llama.embedding_length`).
    pub dim: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: u32,
    /// FFN hidden width.
    pub ffn_dim: u32,
    /// `llama.context_length`.
    pub context_length: u32,
    /// `llama.rope.freq_base`.
    pub rope_theta: f32,
    /// `llama.attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// dtype of the projection matrices (and `output.weight` when untied).
    pub weight_dtype: GgmlDType,
    /// dtype of `token_embd.weight`.
    pub embedding_dtype: GgmlDType,
    /// Seed of the weight generator.
    pub seed: u64,
    /// Write a separate `output.weight` instead of tying it to `token_embd.weight`.
    pub untied: bool,
}

impl Default for TinyLlamaSpec {
    fn default() -> Self {
        TinyLlamaSpec {
            name: "tiny-llama-test".to_string(),
            n_layers: 2,
            dim: 64,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 128,
            context_length: 256,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            weight_dtype: GgmlDType::Q8_0,
            embedding_dtype: GgmlDType::Q8_0,
            seed: 42,
            untied: false,
        }
    }
}

impl TinyLlamaSpec {
    /// Size of one attention head.
    pub fn head_dim(&self) -> u32 {
        self.dim / self.n_heads.max(1)
    }

    /// Width of the K and V projections (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> u32 {
        self.n_kv_heads * self.head_dim()
    }

    /// Number of tokens in the generated vocabulary.
    pub fn vocab_size(&self) -> u32 {
        tiny_vocab().tokens.len() as u32
    }
}

/// The tiny GPT-2 style tokenizer written into every tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyVocab {
    /// Token strings (GPT-2 byte-to-unicode alphabet), index = token id.
    pub tokens: Vec<String>,
    /// Token types: 1 normal, 3 control.
    pub token_types: Vec<i32>,
    /// Merges `"left right"` in priority order.
    pub merges: Vec<String>,
    /// Id of `<|endoftext|>`.
    pub endoftext_id: u32,
    /// Id of `<|im_start|>` (BOS).
    pub im_start_id: u32,
    /// Id of `<|im_end|>` (EOS).
    pub im_end_id: u32,
}

/// ChatML template, as in SmolLM2-Instruct.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Merges of the tiny vocabulary, in priority order (written with GPT-2's `Ġ` for space).
/// Every merge's parts are byte tokens or results of earlier merges.
const TINY_MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġ", "a"),
    ("i", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("Ġ", "w"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "o"),
    ("o", "u"),
    ("n", "d"),
    ("Ġ", "c"),
    ("i", "s"),
    ("e", "s"),
    ("Ġ", "b"),
    ("Ġ", "f"),
    ("o", "r"),
    ("Ġ", "m"),
    ("a", "n"),
    ("Ġ", "p"),
    ("l", "l"),
    ("Ġ", "h"),
    ("i", "t"),
    ("Ġ", "d"),
    ("in", "g"),
    ("Ġ", "i"),
    ("Ġa", "nd"),
    ("Ġo", "f"),
    ("Ġt", "o"),
    ("Ġ", "in"),
    ("e", "d"),
    ("t", "h"),
    ("Ġ", "th"),
    ("Ġth", "at"),
    ("o", "w"),
    ("Ġ", "l"),
    ("Ġ", "I"),
    ("Ġw", "h"),
    ("Ġi", "s"),
    ("a", "r"),
    ("Ġ", "n"),
    ("l", "e"),
    ("Ġ", "e"),
    ("Ġs", "t"),
    ("Ċ", "Ċ"),
];

/// GPT-2's `bytes_to_unicode` table, in GPT-2 vocabulary order: the printable bytes
/// `!`..`~`, `¡`..`¬`, `®`..`ÿ` map to themselves, the remaining 68 bytes (in byte
/// order) map to U+0100, U+0101, ... Returns `(byte, char)` pairs; index = token id.
pub fn gpt2_byte_chars() -> Vec<(u8, char)> {
    let mut printable: Vec<u8> = (b'!'..=b'~').collect();
    printable.extend(0xA1u8..=0xAC);
    printable.extend(0xAEu8..=0xFF);
    let mut out: Vec<(u8, char)> = printable.iter().map(|&b| (b, char::from(b))).collect();
    let mut n = 0u32;
    for b in 0u8..=255 {
        if !printable.contains(&b) {
            out.push((b, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

/// Builds the tiny vocabulary: 256 byte tokens, one token per merge, then the three
/// control tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
pub fn tiny_vocab() -> TinyVocab {
    let mut tokens: Vec<String> = gpt2_byte_chars()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    let mut merges = Vec::with_capacity(TINY_MERGES.len());
    for (a, b) in TINY_MERGES {
        merges.push(format!("{a} {b}"));
        let joined = format!("{a}{b}");
        if !tokens.contains(&joined) {
            tokens.push(joined);
        }
    }
    let mut token_types = vec![1i32; tokens.len()];
    let endoftext_id = tokens.len() as u32;
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(special.to_string());
        token_types.push(3);
    }
    TinyVocab {
        tokens,
        token_types,
        merges,
        endoftext_id,
        im_start_id: endoftext_id + 1,
        im_end_id: endoftext_id + 2,
    }
}

/// `n` values uniform in `center ± scale`.
fn fill(rng: &mut SplitMix64, n: usize, scale: f32, center: f32) -> Vec<f32> {
    // Top 24 bits → uniform in [-1, 1).
    let uniform =
        |rng: &mut SplitMix64| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    (0..n).map(|_| center + scale * uniform(rng)).collect()
}

/// ggml `general.file_type` (llama_ftype) for a weight dtype.
fn file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2_K => 10,
        GgmlDType::Q3_K => 12, // Q3_K_M
        GgmlDType::Q4_K => 15, // Q4_K_M
        GgmlDType::Q5_K => 17, // Q5_K_M
        GgmlDType::Q6_K => 18,
        GgmlDType::IQ4_NL => 25,
        GgmlDType::IQ4_XS => 30,
        GgmlDType::BF16 => 32,
    }
}

/// Builds the GGUF bytes of a tiny random Llama model.
///
/// # Panics
/// If the spec is inconsistent: `dim` not divisible by `n_heads`, `n_heads` not
/// divisible by `n_kv_heads`, or a row length (`dim`, `ffn_dim`) not a multiple of the
/// chosen dtypes' block size. Test-only code; the spec never comes from a file.
pub fn tiny_llama_gguf(spec: &TinyLlamaSpec) -> Vec<u8> {
    assert!(
        spec.n_heads > 0 && spec.n_kv_heads > 0,
        "head counts must be > 0"
    );
    assert!(
        spec.dim.is_multiple_of(spec.n_heads),
        "dim must be divisible by n_heads"
    );
    assert!(
        spec.n_heads.is_multiple_of(spec.n_kv_heads),
        "n_heads must be divisible by n_kv_heads"
    );
    for dt in [spec.weight_dtype, spec.embedding_dtype] {
        let bs = dt.block_size() as u32;
        assert!(
            spec.dim.is_multiple_of(bs) && spec.ffn_dim.is_multiple_of(bs),
            "dim and ffn_dim must be multiples of the {} block size {bs}",
            dt.name()
        );
    }

    let vocab = tiny_vocab();
    let n_vocab = vocab.tokens.len() as u64;
    let dim = u64::from(spec.dim);
    let kv_dim = u64::from(spec.kv_dim());
    let ffn = u64::from(spec.ffn_dim);
    let mut rng = SplitMix64::new(spec.seed);

    let mut w = GgufWriter::new();
    w.add_str("general.architecture", "llama")
        .add_str("general.name", spec.name.clone())
        .add_u32("llama.block_count", spec.n_layers)
        .add_u32("llama.context_length", spec.context_length)
        .add_u32("llama.embedding_length", spec.dim)
        .add_u32("llama.feed_forward_length", spec.ffn_dim)
        .add_u32("llama.attention.head_count", spec.n_heads)
        .add_u32("llama.attention.head_count_kv", spec.n_kv_heads)
        .add_f32("llama.rope.freq_base", spec.rope_theta)
        .add_f32("llama.attention.layer_norm_rms_epsilon", spec.rms_eps)
        .add_u32("general.file_type", file_type(spec.weight_dtype))
        .add_u32("llama.vocab_size", n_vocab as u32)
        .add_u32("llama.rope.dimension_count", spec.head_dim())
        .add_str("tokenizer.ggml.model", "gpt2")
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

    // Adds a weight matrix [rows_len, n_rows] with uniform(+-0.5/sqrt(fan_in)) values.
    let matrix = |w: &mut GgufWriter,
                  rng: &mut SplitMix64,
                  name: String,
                  dims: [u64; 2],
                  dtype: GgmlDType,
                  scale: f32| {
        let values = fill(rng, (dims[0] * dims[1]) as usize, scale, 0.0);
        let data = reference::quantize(dtype, &values).unwrap_or_default();
        w.add_tensor(name, &dims, dtype, data);
    };
    let norm = |w: &mut GgufWriter, rng: &mut SplitMix64, name: String| {
        let values = fill(rng, dim as usize, 0.1, 1.0);
        let data = reference::quantize(GgmlDType::F32, &values).unwrap_or_default();
        w.add_tensor(name, &[dim], GgmlDType::F32, data);
    };

    let proj = |fan_in: u64| 0.5 / (fan_in as f32).sqrt();
    matrix(
        &mut w,
        &mut rng,
        "token_embd.weight".into(),
        [dim, n_vocab],
        spec.embedding_dtype,
        1.0,
    );
    for i in 0..spec.n_layers {
        let wd = spec.weight_dtype;
        norm(&mut w, &mut rng, format!("blk.{i}.attn_norm.weight"));
        matrix(
            &mut w,
            &mut rng,
            format!("blk.{i}.attn_q.weight"),
            [dim, dim],
            wd,
            proj(dim),
        );
        matrix(
            &mut w,
            &mut rng,
            format!("blk.{i}.attn_k.weight"),
            [dim, kv_dim],
            wd,
            proj(dim),
        );
        matrix(
            &mut w,
            &mut rng,
            format!("blk.{i}.attn_v.weight"),
            [dim, kv_dim],
            wd,
            proj(dim),
        );
        matrix(
            &mut w,
            &mut rng,
            format!("blk.{i}.attn_output.weight"),
            [dim, dim],
            wd,
            proj(dim),
        );
        norm(&mut w, &mut rng, format!("blk.{i}.ffn_norm.weight"));
        matrix(
            &mut w,
            &mut rng,
            format!("blk.{i}.ffn_gate.weight"),
            [dim, ffn],
            wd,
            proj(dim),
        );
        matrix(
            &mut w,
            &mut rng,
            format!("blk.{i}.ffn_up.weight"),
            [dim, ffn],
            wd,
            proj(dim),
        );
        matrix(
            &mut w,
            &mut rng,
            format!("blk.{i}.ffn_down.weight"),
            [ffn, dim],
            wd,
            proj(ffn),
        );
    }
    norm(&mut w, &mut rng, "output_norm.weight".into());
    if spec.untied {
        matrix(
            &mut w,
            &mut rng,
            "output.weight".into(),
            [dim, n_vocab],
            spec.weight_dtype,
            proj(dim),
        );
    }
    w.to_bytes()
}

/// Writes [`tiny_llama_gguf`]`(spec)` to `path`.
pub fn write_tiny_llama(spec: &TinyLlamaSpec, path: impl AsRef<Path>) -> Result<(), GgufError> {
    let path = path.as_ref();
    std::fs::write(path, tiny_llama_gguf(spec)).map_err(|source| GgufError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_are_gpt2_order() {
        let t = gpt2_byte_chars();
        assert_eq!(t.len(), 256);
        assert_eq!(t[0], (b'!', '!'));
        assert_eq!(t[188], (0u8, '\u{100}'));
        assert_eq!(t[220], (b' ', 'Ġ'));
        assert_eq!(t[198], (b'\n', 'Ċ'));
        let mut bytes: Vec<u8> = t.iter().map(|p| p.0).collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
    }

    #[test]
    fn merges_build_on_existing_tokens() {
        let mut known: Vec<String> = gpt2_byte_chars()
            .into_iter()
            .map(|(_, c)| c.to_string())
            .collect();
        for (a, b) in TINY_MERGES {
            assert!(known.iter().any(|t| t == a), "merge part {a:?} unknown");
            assert!(known.iter().any(|t| t == b), "merge part {b:?} unknown");
            known.push(format!("{a}{b}"));
        }
        let v = tiny_vocab();
        assert_eq!(v.tokens.len(), v.token_types.len());
        assert_eq!(v.tokens[v.im_end_id as usize], "<|im_end|>");
    }
}
