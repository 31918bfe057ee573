//! Configuration: `config/*.toml` → validated structs.
//!
//! Every knob has a serde default equal to `config/default.toml`; unknown keys
//! are rejected (`deny_unknown_fields`), and [`Config::validate`] names the key
//! and the allowed range of any bad value.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::model::kv::{KvDType, MAX_BLOCK_SIZE};

/// A count that may be `"auto"` (chosen from the core count) or a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
pub enum Count {
    /// Pick from the machine.
    #[default]
    Auto,
    /// Exactly this many.
    N(usize),
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(i64),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) if s == "auto" => Ok(Count::Auto),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "expected \"auto\" or a positive integer, got \"{s}\""
            ))),
            Raw::N(n) if n >= 1 => Ok(Count::N(n as usize)),
            Raw::N(n) => Err(serde::de::Error::custom(format!(
                "expected \"auto\" or a positive integer, got {n}"
            ))),
        }
    }
}

/// Where the model comes from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Path of the GGUF file (empty: `BRIGADE_MODEL` or the cached default).
    pub path: Option<PathBuf>,
    /// A Jinja chat template file used instead of the model's own
    /// (`brigade serve --chat-template`), e.g. for a model whose template lacks tools.
    pub chat_template: Option<PathBuf>,
}

/// How prompts are tokenized.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// Parse control-token text (`<|im_start|>`, ...) inside chat message content as
    /// control tokens. Off (the default): content is plain text, as OpenAI tokenizes it,
    /// so users cannot forge turns. On: the old behaviour, for trusted clients only.
    pub parse_special_in_content: bool,
}

/// The actor pipeline and batching.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Layer-group worker actors (`"auto"` or 1..=64).
    pub workers: Count,
    /// Compute threads inside each worker (`"auto"` or 1..=256).
    pub threads_per_worker: Count,
    /// Token budget of one micro-batch (decode tokens + prefill chunks).
    pub max_batched_tokens: usize,
    /// Most sequences in one micro-batch.
    pub max_seqs: usize,
    /// Micro-batches in flight at once (`"auto"` = number of workers).
    pub pipeline_depth: Count,
    /// Prompts longer than this are prefilled in chunks of at most this many tokens (0 = off).
    pub prefill_chunk: usize,
    /// Capacity of each inter-actor channel (>= pipeline depth).
    pub channel_capacity: usize,
    /// Requests that may wait in the engine's inbox before `submit` reports overload.
    pub request_queue: usize,
    /// Largest `n` (completions per request).
    pub max_n: usize,
    /// Most bytes of all stop strings of one request together.
    pub max_stop_bytes: usize,
    /// Longest prompt + completion in tokens (0 = the model's context length).
    pub max_model_len: usize,
    /// Most background sequences (the Batch API's requests) in one micro-batch
    /// while any interactive sequence is in the engine (0 = no limit): keeps
    /// interactive steps short while a batch runs; alone, a batch takes every row.
    pub background_rows: usize,
    /// Admission headroom in tokens: a waiting request is admitted only while
    /// the free KV blocks also cover the next this-many tokens (at most its
    /// `max_tokens`) of every running sequence and its own, so admitting it
    /// never preempts work already running within that horizon (0 = admit on
    /// the prompt alone and preempt when the cache runs out).
    pub admission_reserve_tokens: usize,
    /// Digits of the 8-bit activations the output head reads: 2 (the
    /// default: about 15 bits, like every other matmul) or 1 (8 bits,
    /// llama.cpp's Q8_0 activations: the head's integer work halves on
    /// AVX-512, its matmul being the largest of a big-vocabulary model).
    /// 1 costs accuracy against float32: perplexity on
    /// tests/fixtures/texts/declaration.txt moves little (SmolLM2 -0.06%,
    /// Gemma 3 +0.06%), but log-probs move by ~0.04 on the tiny-model parity
    /// fixtures (vs <= 0.03 allowed) and Gemma 3 270M's greedy continuation
    /// of "The capital of France is" leaves transformers' at step 11, so it
    /// is opt-in.
    pub head_activation_digits: u8,
}

impl RuntimeConfig {
    /// [`Self::head_activation_digits`] as the kernels take it.
    pub fn head_digits(&self) -> crate::kernels::Digits {
        if self.head_activation_digits == 2 {
            crate::kernels::Digits::Two
        } else {
            crate::kernels::Digits::One
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            workers: Count::Auto,
            threads_per_worker: Count::Auto,
            max_batched_tokens: 512,
            max_seqs: 64,
            pipeline_depth: Count::Auto,
            prefill_chunk: 256,
            channel_capacity: 8,
            request_queue: 1024,
            max_n: 16,
            max_stop_bytes: 4096,
            max_model_len: 0,
            background_rows: 8,
            admission_reserve_tokens: 256,
            head_activation_digits: 2,
        }
    }
}

/// The paged KV-cache.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KvCacheConfig {
    /// Tokens per block (1..=128).
    pub block_size: usize,
    /// Capacity in tokens (0 = use `capacity_bytes`).
    pub capacity_tokens: usize,
    /// Capacity in bytes over all layers (used when `capacity_tokens` is 0).
    pub capacity_bytes: u64,
    /// Element type of stored K/V (`f16`, `bf16`, `f32` or `q8_0`).
    pub dtype: KvDType,
    /// Reuse cached blocks of identical prefixes.
    pub prefix_caching: bool,
    /// Seconds the engine must be idle (no request at all) before it gives the
    /// KV pages and the prefix cache back to the OS (0 = never).
    pub release_idle_s: f64,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            capacity_tokens: 32768,
            capacity_bytes: 0,
            dtype: KvDType::F16,
            prefix_caching: true,
            release_idle_s: 5.0,
        }
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[model]`.
    pub model: ModelSection,
    /// `[runtime]`.
    pub runtime: RuntimeConfig,
    /// `[kv_cache]`.
    pub kv_cache: KvCacheConfig,
    /// `[server]`: the HTTP front end (`brigade serve`).
    pub server: crate::server::config::ServerConfig,
    /// `[tokenizer]`.
    pub tokenizer: TokenizerConfig,
    /// `[testing]`: fault injection for supervision tests (off by default).
    pub testing: TestingConfig,
    /// `[speculative]`: n-gram (prompt-lookup) speculative decoding.
    pub speculative: SpeculativeConfig,
}

/// The `[testing]` section: switches for tests of the runtime itself.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Fault-injection plan (parsed by the engine at start, which names this key
    /// in its error), e.g. `"worker:1:panic@step=20"`; empty = none.
    /// `BRIGADE_FAULT` overrides it.
    pub fault: String,
}

/// A configuration error naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// File could not be read.
    #[error("reading config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, unknown key or wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file (or origin) parsed.
        path: String,
        /// The parser's message (names the key).
        message: String,
    },
    /// A value out of range.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key.
        key: &'static str,
        /// What is wrong, with the allowed range.
        message: String,
    },
    /// A bad value in `[server]`.
    #[error(transparent)]
    Server(#[from] crate::server::config::ServerConfigError),
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        let r = &self.runtime;
        let inv = |key, message: String| Err(ConfigError::Invalid { key, message });
        if let Count::N(n) = r.workers {
            if n > 64 {
                return inv(
                    "runtime.workers",
                    format!("must be \"auto\" or in 1..=64, got {n}"),
                );
            }
        }
        if let Count::N(n) = r.threads_per_worker {
            if n > 256 {
                return inv(
                    "runtime.threads_per_worker",
                    format!("must be \"auto\" or in 1..=256, got {n}"),
                );
            }
        }
        if !(1..=65536).contains(&r.max_batched_tokens) {
            return inv(
                "runtime.max_batched_tokens",
                format!("must be in 1..=65536, got {}", r.max_batched_tokens),
            );
        }
        if !(1..=4096).contains(&r.max_seqs) {
            return inv(
                "runtime.max_seqs",
                format!("must be in 1..=4096, got {}", r.max_seqs),
            );
        }
        if let Count::N(n) = r.pipeline_depth {
            if n > 64 {
                return inv(
                    "runtime.pipeline_depth",
                    format!("must be \"auto\" or in 1..=64, got {n}"),
                );
            }
        }
        if !(1..=4096).contains(&r.channel_capacity) {
            return inv(
                "runtime.channel_capacity",
                format!("must be in 1..=4096, got {}", r.channel_capacity),
            );
        }
        if let Count::N(d) = r.pipeline_depth {
            if r.channel_capacity < d {
                return inv(
                    "runtime.channel_capacity",
                    format!(
                        "must be >= pipeline_depth ({d}), got {}",
                        r.channel_capacity
                    ),
                );
            }
        }
        if !(1..=1_000_000).contains(&r.request_queue) {
            return inv(
                "runtime.request_queue",
                format!("must be in 1..=1000000, got {}", r.request_queue),
            );
        }
        if !(1..=256).contains(&r.max_n) {
            return inv(
                "runtime.max_n",
                format!("must be in 1..=256, got {}", r.max_n),
            );
        }
        if !(1..=1 << 20).contains(&r.max_stop_bytes) {
            return inv(
                "runtime.max_stop_bytes",
                format!("must be in 1..=1048576, got {}", r.max_stop_bytes),
            );
        }
        if r.max_model_len > 1 << 24 {
            return inv(
                "runtime.max_model_len",
                format!("must be in 0..=16777216, got {}", r.max_model_len),
            );
        }
        if !(1..=2).contains(&r.head_activation_digits) {
            return inv(
                "runtime.head_activation_digits",
                format!("must be 1 or 2, got {}", r.head_activation_digits),
            );
        }
        if r.admission_reserve_tokens > 16 * 1024 * 1024 {
            return inv(
                "runtime.admission_reserve_tokens",
                format!("must be <= 16777216, got {}", r.admission_reserve_tokens),
            );
        }
        if r.background_rows > 4096 {
            return inv(
                "runtime.background_rows",
                format!("must be in 0..=4096, got {}", r.background_rows),
            );
        }
        let k = &self.kv_cache;
        if !(1..=MAX_BLOCK_SIZE).contains(&k.block_size) {
            return inv(
                "kv_cache.block_size",
                format!("must be in 1..={}, got {}", MAX_BLOCK_SIZE, k.block_size),
            );
        }
        if k.capacity_tokens == 0 && k.capacity_bytes == 0 {
            return inv(
                "kv_cache.capacity_tokens",
                "one of capacity_tokens or capacity_bytes must be > 0".into(),
            );
        }
        if !(k.release_idle_s.is_finite() && (0.0..=86400.0).contains(&k.release_idle_s)) {
            return inv(
                "kv_cache.release_idle_s",
                format!("must be in [0, 86400], got {}", k.release_idle_s),
            );
        }
        if k.capacity_tokens > 16 * 1024 * 1024 {
            return inv(
                "kv_cache.capacity_tokens",
                format!("must be <= 16777216, got {}", k.capacity_tokens),
            );
        }
        self.speculative.validate()?;
        Ok(())
    }

    /// Number of workers after resolving `auto` (`cores` = available cores).
    pub fn workers(&self, _cores: usize, n_layers: usize) -> usize {
        // Measured on 2 cores (closing note of the kernels issue): two pipeline
        // stages overlap micro-batches best; more add bubbles and latency.
        let w = match self.runtime.workers {
            Count::N(n) => n,
            Count::Auto => _cores.clamp(1, 2),
        };
        w.clamp(1, n_layers.max(1))
    }

    /// Threads per worker after resolving `auto`: every worker may use all
    /// cores (a stage runs alone whenever the pipeline holds one micro-batch,
    /// as in single-stream decode; idle pool threads sleep).
    pub fn threads_per_worker(&self, cores: usize, _workers: usize) -> usize {
        match self.runtime.threads_per_worker {
            Count::N(n) => n,
            Count::Auto => cores.max(1),
        }
    }

    /// Pipeline depth after resolving `auto`.
    pub fn pipeline_depth(&self, workers: usize) -> usize {
        match self.runtime.pipeline_depth {
            Count::N(n) => n,
            Count::Auto => workers.max(1),
        }
        .min(self.runtime.channel_capacity)
    }

    /// The context length in force for a model of `context_length` tokens
    /// whose KV cache holds `kv_tokens`: the smallest of the two and
    /// `runtime.max_model_len` (when set).
    pub fn max_len(&self, context_length: usize, kv_tokens: usize) -> usize {
        let len = context_length.min(kv_tokens);
        match self.runtime.max_model_len {
            0 => len,
            m => len.min(m),
        }
    }

    /// KV capacity in blocks for a model with `n_layers` layers of width `kv_dim`.
    pub fn kv_blocks(&self, n_layers: usize, kv_dim: usize) -> usize {
        let k = &self.kv_cache;
        // K and V rows of every layer, in the stored format's real bytes
        // (q8_0: about half of f16's, so the same budget holds twice the blocks).
        let row = k.dtype.row_bytes(kv_dim.max(1));
        let tokens = if k.capacity_tokens > 0 {
            k.capacity_tokens
        } else {
            (k.capacity_bytes / (2 * n_layers.max(1) * row) as u64) as usize
        };
        (tokens / k.block_size).max(1)
    }
}

/// How drafts are made (`speculative.method`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SpecMethod {
    /// Prompt lookup: the tokens that followed the last occurrence of the
    /// sequence's final n-gram in its own prompt + output.
    #[default]
    Ngram,
    /// No speculation.
    Off,
}

/// The `[speculative]` section: n-gram speculative decoding (see
/// [`crate::engine::spec`]). Greedy output is identical with and without it,
/// and seeded sampling gives the same tokens (the verify step uses the same
/// counter-based draw per position as plain decoding).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpeculativeConfig {
    /// `"ngram"` or `"off"`.
    pub method: SpecMethod,
    /// The most draft tokens proposed per step (1..=16); each step's length is
    /// the one that pays best at the sequence's acceptance and the measured
    /// price of a verify row.
    pub num_tokens: usize,
    /// Shortest suffix n-gram looked up (1..=ngram_max).
    pub ngram_min: usize,
    /// Longest suffix n-gram looked up, tried first (ngram_min..=16).
    pub ngram_max: usize,
    /// Speculate only while at most this many sequences are running (1..=4096):
    /// with a larger batch, the verify rows cost more than they save.
    pub max_running: usize,
    /// A sequence stops drafting when its acceptance rate (EWMA over verify
    /// steps, weight 1/2, from 0.5) falls below this (0..=1), or when no draft
    /// length pays, ...
    pub min_acceptance: f64,
    /// ... for this many decode steps (doubled for each pause in a row, up to
    /// 8×), then tries again (0..=100000).
    pub cooldown_steps: usize,
}

impl Default for SpeculativeConfig {
    fn default() -> Self {
        Self {
            method: SpecMethod::Ngram,
            num_tokens: 8,
            ngram_min: 2,
            ngram_max: 4,
            max_running: 4,
            min_acceptance: 0.25,
            cooldown_steps: 8,
        }
    }
}

impl SpeculativeConfig {
    /// Speculation off.
    pub fn off() -> Self {
        Self {
            method: SpecMethod::Off,
            ..Self::default()
        }
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |key, message: String| Err(ConfigError::Invalid { key, message });
        if !(1..=16).contains(&self.num_tokens) {
            return inv(
                "speculative.num_tokens",
                format!("must be in 1..=16, got {}", self.num_tokens),
            );
        }
        if !(1..=16).contains(&self.ngram_max) {
            return inv(
                "speculative.ngram_max",
                format!("must be in 1..=16, got {}", self.ngram_max),
            );
        }
        if !(1..=self.ngram_max).contains(&self.ngram_min) {
            return inv(
                "speculative.ngram_min",
                format!(
                    "must be in 1..=ngram_max ({}), got {}",
                    self.ngram_max, self.ngram_min
                ),
            );
        }
        if !(1..=4096).contains(&self.max_running) {
            return inv(
                "speculative.max_running",
                format!("must be in 1..=4096, got {}", self.max_running),
            );
        }
        if !(self.min_acceptance.is_finite() && (0.0..=1.0).contains(&self.min_acceptance)) {
            return inv(
                "speculative.min_acceptance",
                format!("must be in [0, 1], got {}", self.min_acceptance),
            );
        }
        if self.cooldown_steps > 100_000 {
            return inv(
                "speculative.cooldown_steps",
                format!("must be in 0..=100000, got {}", self.cooldown_steps),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_equals_defaults() {
        let text = include_str!("../config/default.toml");
        let cfg = Config::parse(text, "default.toml").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn tokenizer_section() {
        assert!(!Config::default().tokenizer.parse_special_in_content);
        let c = Config::parse("[tokenizer]\nparse_special_in_content = true\n", "t").unwrap();
        assert!(c.tokenizer.parse_special_in_content);
        let e = Config::parse("[tokenizer]\nparse_special = true\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("parse_special"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = Config::parse("[runtime]\nworkerz = 2\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("workerz"), "{e}");
        let e = Config::parse("[runtime]\nmax_seqs = 0\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runtime.max_seqs") && e.contains("1..=4096"),
            "{e}"
        );
        let e = Config::parse("[kv_cache]\nblock_size = 1000\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kv_cache.block_size"), "{e}");
        let e = Config::parse("[runtime]\nworkers = \"many\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auto"), "{e}");
        let e = Config::parse("[kv_cache]\ndtype = \"f8\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f8") || e.contains("dtype"), "{e}");
        let e = Config::parse("[runtime]\npipeline_depth = 8\nchannel_capacity = 4\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("runtime.channel_capacity"), "{e}");
    }

    #[test]
    fn auto_resolution() {
        let c = Config::parse(
            "[runtime]\nworkers = 2\nthreads_per_worker = \"auto\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.workers(2, 30), 2);
        assert_eq!(c.threads_per_worker(2, 2), 2);
        assert_eq!(Config::default().workers(2, 30), 2);
        assert_eq!(Config::default().workers(1, 30), 1);
        assert_eq!(c.pipeline_depth(2), 2);
        assert_eq!(c.kv_blocks(30, 192), 32768 / 16);
    }

    #[test]
    fn speculative_section() {
        let c = Config::parse("[speculative]\nmethod = \"off\"\nnum_tokens = 6\n", "t").unwrap();
        assert_eq!(
            (c.speculative.method, c.speculative.num_tokens),
            (SpecMethod::Off, 6)
        );
        let e = Config::parse("[speculative]\nmethod = \"eagle\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("eagle") || e.contains("method"), "{e}");
        let e = Config::parse("[speculative]\nngram_min = 5\nngram_max = 3\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("speculative.ngram_min"), "{e}");
        let e = Config::parse("[speculative]\nnum_tokens = 0\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("speculative.num_tokens") && e.contains("1..=16"),
            "{e}"
        );
    }
}
