//! Readers of the reference fixtures that `tests/reference/make_family_fixtures.py`
//! writes (`tests/fixtures/families/<family>.json`, Hugging Face transformers in
//! float32 on the tiny family models of [`super::family`]).
//!
//! Owns: the JSON format (one documented struct per level) and loading it. Does
//! not own: the comparison policy (tolerances, near-tie rules), which belongs to
//! the tests.
//!
//! ```text
//! FamilyFixture
//!   family, hf_class, gguf_sha256, hf_config (as given to transformers),
//!   tensor_types, gguf_loader_check, versions, top_k
//!   cases[]: FamilyCase
//!     name, prompt_ids[T]
//!     positions[T]: PositionLogits   (position i predicts prompt_ids[i + 1])
//!       top_ids[top_k], top_logprobs[top_k] (descending), logsumexp
//!     greedy_ids[G], greedy_margins[G]  (continuation after the whole prompt;
//!                                        margin = logit(top1) - logit(top2))
//! ```

use std::path::Path;

use serde::Deserialize;

/// Errors reading a fixture file.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not a fixture of this format.
    #[error("{path}: {source}")]
    Json {
        /// File path.
        path: String,
        /// Underlying error.
        source: serde_json::Error,
    },
}

/// Reference outputs of one tiny family model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyFixture {
    /// [`super::TinyFamily::name`] of the model.
    pub family: String,
    /// transformers class that produced the outputs (e.g. `Gemma3ForCausalLM`).
    pub hf_class: String,
    /// sha256 (hex) of the GGUF bytes the script read; equal to the sha256 of
    /// [`super::tiny_family_gguf`]`(&TinyFamilySpec::standard(family))` when the
    /// generator still makes the same model.
    pub gguf_sha256: String,
    /// The transformers config (`config.to_dict()` subset) used, for reference.
    pub hf_config: serde_json::Value,
    /// The tensor dtypes of the GGUF, name → ggml type name (for the report).
    pub tensor_types: std::collections::BTreeMap<String, String>,
    /// Result of comparing with transformers' own GGUF loader (free text).
    pub gguf_loader_check: String,
    /// Entries per position in [`PositionLogits`].
    pub top_k: usize,
    /// Prompts and their outputs.
    pub cases: Vec<FamilyCase>,
    /// Package versions that made the file (`transformers`, `torch`).
    pub versions: std::collections::BTreeMap<String, String>,
}

/// One prompt: teacher-forced logits and a greedy continuation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyCase {
    /// Case name.
    pub name: String,
    /// Prompt token ids (no BOS added; positions start at 0).
    pub prompt_ids: Vec<u32>,
    /// One entry per prompt position.
    pub positions: Vec<PositionLogits>,
    /// Greedy continuation (argmax, no stop at EOS) after the whole prompt; each
    /// step is a full forward of prompt + previous continuation tokens.
    pub greedy_ids: Vec<u32>,
    /// Per greedy step, logit(top-1) - logit(top-2): small values are near-ties.
    pub greedy_margins: Vec<f32>,
}

/// Teacher-forced output at one position.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PositionLogits {
    /// The `top_k` most likely next tokens, most likely first.
    pub top_ids: Vec<u32>,
    /// Their log-probabilities (log_softmax, float32).
    pub top_logprobs: Vec<f32>,
    /// logsumexp of the raw (post soft-cap) logits.
    pub logsumexp: f32,
}

impl PositionLogits {
    /// top-1 minus top-2 log-probability (= logit margin); infinite with one entry.
    pub fn margin(&self) -> f32 {
        match (self.top_logprobs.first(), self.top_logprobs.get(1)) {
            (Some(a), Some(b)) => a - b,
            _ => f32::INFINITY,
        }
    }
}

/// Reads a [`FamilyFixture`] JSON file.
pub fn load_family_fixture(path: impl AsRef<Path>) -> Result<FamilyFixture, FixtureError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| FixtureError::Json {
        path: path.display().to_string(),
        source,
    })
}

/// Hex sha256 of `bytes` (to compare with [`FamilyFixture::gguf_sha256`]).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// `tests/fixtures/families/<family>.json` of this checkout.
pub fn family_fixture_path(family: super::TinyFamily) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(format!("{}.json", family.name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_family_gguf, TinyFamily, TinyFamilySpec};

    /// Every fixture was made from exactly the model the generator makes today
    /// (else regenerate: see tests/reference/make_family_fixtures.py), and is
    /// well-formed.
    #[test]
    fn fixtures_match_the_generated_models() {
        for fam in TinyFamily::ALL {
            let fx =
                load_family_fixture(family_fixture_path(fam)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(fx.family, fam.name());
            let bytes = tiny_family_gguf(&TinyFamilySpec::standard(fam));
            assert_eq!(
                fx.gguf_sha256,
                sha256_hex(&bytes),
                "{}: the generator no longer makes the model of the fixture",
                fam.name()
            );
            assert!(!fx.cases.is_empty());
            for c in &fx.cases {
                assert_eq!(
                    c.positions.len(),
                    c.prompt_ids.len(),
                    "{}/{}",
                    fam.name(),
                    c.name
                );
                assert_eq!(c.greedy_ids.len(), c.greedy_margins.len());
                for p in &c.positions {
                    assert_eq!(p.top_ids.len(), fx.top_k);
                    assert_eq!(p.top_logprobs.len(), fx.top_k);
                    assert!(p.margin() >= 0.0);
                }
            }
        }
    }
}
