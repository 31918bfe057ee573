//! Brigade: a throughput-oriented LLM inference and serving runtime for CPUs.
//!
//! An answer is made in three steps, each its own stage:
//!
//! ```text
//!   text ──► tokenizer ──► predict (layer-group workers) ──► select (sampler) ──► tokens
//!                                 ▲                                   │
//!                                 └──────── chosen token fed back ────┘
//! ```
//!
//! Modules:
//! - [`quant`]: ggml dtypes and quantized block layouts, reference dequantizers.
//! - [`gguf`]: bounds-checked GGUF reader on `memmap2` (and, with the `test-support`
//!   feature, a small writer for tests).
//! - [`tokenizer`]: byte-level BPE from GGUF metadata, chat templates, incremental detokenizer.
//! - [`kernels`]: the only home of `unsafe` and SIMD, safe wrappers + scalar references.
//! - [`model`]: Llama forward pass over quantized weights, paged KV access.
//! - [`sampling`]: logits → token.
//! - [`guidance`]: constrained decoding (grammars, JSON Schema) through llguidance.
//! - [`batch`]: `brigade run-batch`, OpenAI batch files through the server's router, resumable.
//! - [`bench`]: the engine and HTTP benchmarks behind `brigade bench` and `brigade bench-serve`.
//!
//! The `brigade` command line (argument parsing, one-line error reports) is the binary's `cli`
//! module, not part of this library.
#![deny(unsafe_code)]
#![warn(
    rust_2018_idioms,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub
)]
#![deny(unused_must_use)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod batch;
pub mod bench;
pub mod config;
pub mod engine;
pub mod gguf;
pub mod guidance;
pub mod kernels;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod paths;
pub mod quant;
pub mod runner;
pub mod sampling;
pub mod server;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tokenizer;
