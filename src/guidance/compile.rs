//! Grammars → llguidance parsers: [`Guidance`] holds the token trie of our
//! vocabulary and a [`ParserFactory`], compiles each [`Grammar`] once and keeps
//! the fresh parser in a bounded cache keyed by the grammar's hash, and
//! starts a per-sequence [`SeqGuide`] from a cached parser (a deep clone, so
//! sequences never share mutable lexer state).
//!
//! Errors are [`GuidanceError`]s with llguidance's reason: an invalid schema,
//! regex or grammar, or a JSON-Schema feature llguidance does not implement
//! (it refuses unknown keywords and formats instead of ignoring them), so no
//! constraint is silently dropped.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::{GrammarInit, ParserLimits, TopLevelGrammar};
use llguidance::earley::SlicedBiasComputer;
use llguidance::{ParserFactory, TokenParser};
use serde_json::{json, Value};
use toktrie::{InferenceCapabilities, TokEnv};

use super::state::SeqGuide;
use super::timing::MaskTimes;
use super::{gbnf, Constraint, Grammar};
use crate::tokenizer::Tokenizer;

/// Compiled grammars kept (least recently used dropped first).
const CACHE_CAPACITY: usize = 256;

/// Whitespace JSON output may have between tokens when the request does not
/// say (`guided_whitespace_pattern`, or the schema's own `x-guidance`):
/// bounded, so a model cannot loop on whitespace until `max_tokens`.
pub const DEFAULT_JSON_WHITESPACE: &str = r"[ \t\n\r]{0,8}";

/// Why a constraint cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GuidanceError(pub String);

/// A grammar as llguidance takes it.
pub fn to_llguidance(g: &Grammar) -> Result<TopLevelGrammar, GuidanceError> {
    let json = |mut schema: Value| {
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance")
                .or_insert_with(|| json!({ "whitespace_pattern": DEFAULT_JSON_WHITESPACE }));
        }
        TopLevelGrammar::from_json_schema(schema)
    };
    Ok(match g {
        Grammar::JsonObject => json(json!({ "type": "object" })),
        Grammar::JsonSchema(s) => {
            if !(s.is_object() || s.is_boolean()) {
                return Err(GuidanceError(
                    "a JSON schema must be an object (or a boolean)".into(),
                ));
            }
            json(s.clone())
        }
        Grammar::Regex(r) => {
            regex_syntax::Parser::new()
                .parse(r)
                .map_err(|e| GuidanceError(format!("invalid regular expression: {e}")))?;
            TopLevelGrammar::from_regex(r)
        }
        Grammar::Choice(choices) => {
            if choices.is_empty() {
                return Err(GuidanceError("the choice list is empty".into()));
            }
            let alts: Vec<String> = choices
                .iter()
                .map(|c| serde_json::to_string(c).unwrap_or_default())
                .collect();
            if choices.iter().any(String::is_empty) {
                return Err(GuidanceError("a choice is the empty string".into()));
            }
            TopLevelGrammar::from_lark(format!("start: {}\n", alts.join(" | ")))
        }
        Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        Grammar::Gbnf(g) => TopLevelGrammar::from_lark(
            gbnf::to_lark(g).map_err(|e| GuidanceError(format!("invalid GBNF grammar: {e}")))?,
        ),
    })
}

fn limits() -> ParserLimits {
    // Errors go back to API clients: no grammar dumps in them.
    ParserLimits {
        verbose_errors: false,
        ..ParserLimits::default()
    }
}

/// Checks a grammar without a vocabulary (schema, regex and grammar syntax):
/// what the API layer runs while it still knows which field the grammar came from.
pub fn check_syntax(g: &Grammar) -> Result<(), GuidanceError> {
    let tlg = to_llguidance(g)?;
    match GrammarInit::Serialized(tlg)
        .validate(None, limits())
        .into_error()
    {
        Some(e) => Err(GuidanceError(e)),
        None => Ok(()),
    }
}

/// The cache key of a grammar (its serialized form; hashed for the map).
fn key(g: &Grammar) -> (u64, String) {
    let s = serde_json::to_string(g).unwrap_or_default();
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    (h.finish(), s)
}

struct Cached {
    text: String,
    parser: TokenParser,
    used: u64,
}

#[derive(Default)]
struct Cache {
    map: HashMap<u64, Cached>,
    clock: u64,
}

/// Compiles and caches grammars over one vocabulary; starts sequences.
pub struct Guidance {
    factory: ParserFactory,
    cache: Mutex<Cache>,
    /// Per-token mask times (also observed into the Prometheus histogram).
    pub(crate) times: Arc<MaskTimes>,
    /// End-of-generation ids (the trie's EOS set).
    pub(crate) eog: Vec<u32>,
}

impl std::fmt::Debug for Guidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guidance")
            .field("vocab", &self.vocab_size())
            .field("eog", &self.eog)
            .finish()
    }
}

impl Guidance {
    /// Guidance over `env`.
    pub(crate) fn new(env: TokEnv) -> Result<Self, GuidanceError> {
        let eog = env.tok_trie().eos_tokens().to_vec();
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| GuidanceError(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(Self {
            factory,
            cache: Mutex::new(Cache::default()),
            times: Arc::new(MaskTimes::default()),
            eog,
        })
    }

    /// Tokens the trie knows (the tokenizer's vocabulary).
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// The raw bytes of a token as text (a special token's name, without llguidance's marker).
    pub(crate) fn token_text(&self, t: u32) -> &[u8] {
        let trie = self.factory.tok_env().tok_trie();
        if (t as usize) >= trie.vocab_size() {
            return &[];
        }
        let b = trie.token(t);
        if trie.is_special_token(t) {
            &b[1..]
        } else {
            b
        }
    }

    /// Greedy tokenization of bytes over the trie (for re-feeding text after a trigger).
    pub(crate) fn greedy_tokenize(&self, bytes: &[u8]) -> Vec<u32> {
        self.factory.tok_env().tok_trie().greedy_tokenize(bytes)
    }

    /// Per-token mask times measured so far.
    pub fn mask_times(&self) -> &Arc<MaskTimes> {
        &self.times
    }

    /// A fresh parser for `g`, compiled once and cached.
    pub(crate) fn parser(&self, g: &Grammar) -> Result<TokenParser, GuidanceError> {
        let (h, text) = key(g);
        if let Ok(mut c) = self.cache.lock() {
            c.clock += 1;
            let now = c.clock;
            if let Some(e) = c.map.get_mut(&h).filter(|e| e.text == text) {
                e.used = now;
                return Ok(e.parser.deep_clone());
            }
        }
        let tlg = to_llguidance(g)?;
        let parser = self
            .factory
            .create_parser(tlg)
            .map_err(|e| GuidanceError(e.to_string()))?;
        if let Ok(mut c) = self.cache.lock() {
            if c.map.len() >= CACHE_CAPACITY {
                if let Some(old) = c.map.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| *k) {
                    c.map.remove(&old);
                }
            }
            let used = c.clock;
            c.map.insert(
                h,
                Cached {
                    text,
                    parser: parser.deep_clone(),
                    used,
                },
            );
        }
        Ok(parser)
    }

    /// Checks that `c` can be enforced: compiles its grammar (cached) and
    /// computes the first mask, so that an error shows now, not mid-generation.
    pub fn check(&self, c: &Constraint) -> Result<(), GuidanceError> {
        if c.trigger.as_deref() == Some("") {
            return Err(GuidanceError("the trigger must not be empty".into()));
        }
        let mut g = SeqGuide::active(self.parser(&c.grammar)?);
        g.first_mask_check(self)
    }

    /// Per-sequence state for a completion under `c`.
    pub fn start(&self, c: &Constraint) -> Result<SeqGuide, GuidanceError> {
        let parser = self.parser(&c.grammar)?;
        Ok(match &c.trigger {
            None => SeqGuide::active(parser),
            Some(t) => SeqGuide::waiting(t.as_bytes().to_vec(), parser),
        })
    }
}

/// [`Guidance`] for a tokenizer, built on first use (a vocabulary's trie and
/// slices take a moment; engines that never see a constraint skip it) and
/// shared by the validator and the sampler.
pub struct LazyGuidance {
    tok: Arc<Tokenizer>,
    cell: OnceLock<Result<Arc<Guidance>, GuidanceError>>,
}

impl std::fmt::Debug for LazyGuidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyGuidance")
            .field("built", &self.cell.get().is_some())
            .finish()
    }
}

impl LazyGuidance {
    /// Not built yet.
    pub fn new(tok: Arc<Tokenizer>) -> Self {
        Self {
            tok,
            cell: OnceLock::new(),
        }
    }

    /// The guidance (built now if needed); an error when this model cannot be constrained.
    pub fn get(&self) -> Result<&Arc<Guidance>, GuidanceError> {
        self.cell
            .get_or_init(|| {
                let env = super::vocab::Vocab::env(self.tok.clone())
                    .ok_or_else(|| GuidanceError("this model has no end-of-generation token: constrained output could not end".into()))?;
                Guidance::new(env).map(Arc::new)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The guidance if it was built.
    pub fn built(&self) -> Option<&Arc<Guidance>> {
        self.cell.get().and_then(|r| r.as_ref().ok())
    }
}
