//! Constrained decoding: what a request asks its output to match.
//!
//! The API layer (response_format, vLLM's structured_outputs / guided_*,
//! llama.cpp's grammar / json_schema, tool calling) turns a request into a
//! [`Constraint`]; the engine enforces it token by token with `llguidance`
//! (a token trie over our own vocabulary and a per-step allowed-token mask).
//!
//! ```text
//!  request fields ──request.rs──► Constraint ──Validator──► Guidance::check (compile, cache, first mask)
//!                                                    │
//!  sampler actor: per sequence a SeqGuide (state.rs) ┘  mask → sample → advance → next mask
//! ```
//!
//! - [`vocab`]: the [`toktrie::TokTrie`] of our vocabulary (raw token bytes,
//!   special tokens marked, the end-of-generation set as EOS);
//! - [`compile`]: [`Grammar`] → llguidance, [`Guidance`] (factory + bounded
//!   cache of compiled grammars by hash), [`LazyGuidance`] (built on first use);
//! - [`gbnf`]: llama.cpp GBNF → Lark;
//! - [`state`]: [`SeqGuide`], one completion's matcher, trigger and next mask;
//! - [`request`]: the API fields (`response_format`, `structured_outputs`,
//!   `guided_*`, llama.cpp's `grammar` / `json_schema`) → [`Constraint`];
//! - [`timing`]: per-token mask times (bench p50/p99, Prometheus histogram).
//!
//! Engine rules (enforced by the validator and the sampler): end-of-generation
//! and `stop_token_ids` are allowed only where the grammar accepts, and once
//! the grammar is complete only end-of-generation is (finish reason `stop`);
//! `ignore_eos` and `min_tokens` cannot be combined with a constraint (they
//! would contradict it), and are refused. Stop strings still end a
//! constrained completion where they match (the caller asked for that), and
//! `max_tokens` may cut it short (finish reason `length`).
//!
//! With a trigger, the token that completes the trigger may carry text past
//! it; that text is fed to the grammar too, and if the grammar rejects it the
//! completion ends there (only end-of-generation is allowed; logged).
//! Grammars used with triggers should accept what the model's tokens put
//! right after the trigger (e.g. start with `/\n+/` rather than `"\n"`).

pub mod compile;
mod gbnf;
pub mod request;
pub mod state;
pub mod timing;
mod vocab;

pub use compile::{check_syntax, Guidance, GuidanceError, LazyGuidance};
pub use state::{Allowed, SeqGuide};
pub use timing::{MaskTimes, MaskTimesSnapshot};

use serde::{Deserialize, Serialize};

/// The language the output must belong to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON Schema the output must validate against.
    JsonSchema(serde_json::Value),
    /// A regular expression the whole output must match.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect (may embed `%json { ... }`).
    Lark(String),
    /// A llama.cpp GBNF grammar.
    Gbnf(String),
}

/// A constraint on one completion's output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    /// What the (constrained part of the) output must match.
    pub grammar: Grammar,
    /// `None`: the whole output is constrained from its first token.
    /// `Some(t)`: generation is free until the decoded output contains `t`;
    /// from then on the output text starting at that occurrence of `t` must
    /// match `grammar` (so the grammar begins with `t`). Used by tool calling
    /// with `tool_choice: "auto"`: the grammar switches on when the tool-call
    /// opening appears.
    pub trigger: Option<String>,
}
