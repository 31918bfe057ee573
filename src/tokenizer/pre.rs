//! The BPE pre-tokenizer for each `tokenizer.ggml.pre` name: how text is cut into words
//! before merges run.
//!
//! Owns the table `pre name → (regex list, flags)` only; it does not encode. Each entry is
//! the list of regexes llama.cpp applies for that name, in order, each one splitting every
//! piece the previous ones produced and keeping both the matches and the text between them
//! (`tokenizers`' `Split` with behavior `Isolated`), followed by the GPT-2 byte-level
//! mapping (`ByteLevel` without its own regex). Where llama.cpp rewrote a regex for C++
//! `std::regex` (case-insensitive groups spelled `'[sS]`, lookaheads emulated), the
//! original regex from the model's `tokenizer.json` is used: our `tokenizers` build runs
//! `fancy-regex`, a backtracking engine with lookahead, so `\s+(?!\S)` means what it means
//! in Python.
//!
//! ```text
//!   text ──► Split(regex 1) ──► Split(regex 2) ──► ... ──► ByteLevel ──► words for BPE
//! ```

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use super::TokenizerError;

/// GPT-2's word regex as llama.cpp writes it (no trailing `|\s+`: text no alternative
/// matches becomes its own piece anyway, so the pieces are the same).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3 (Meta's `tokenizer.json`).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2 / 2.5 / 3: Llama 3's with single digits.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 3.5: Qwen 2's with combining marks kept in words.
const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken (Mistral NeMo and later).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek LLM's letter class (Unicode letters with case, spelled out by DeepSeek).
/// Non-ASCII chars are escaped here and below: several (U+1F7D, U+212A, ...) have
/// canonical equivalents that an editor's normalization would silently change.
const DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";

/// Values of `tokenizer.ggml.pre` this module can reproduce exactly, for BPE models.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "smaug-bpe",
    "dbrx",
    "qwen2",
    "deepseek-r1-qwen",
    "stablelm2",
    "megrez",
    "qwen35",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "gpt-2",
    "gpt2",
    "phi-2",
    "mpt",
    "olmo",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "tekken",
];

/// How one `tokenizer.ggml.pre` cuts text into words.
pub(crate) struct BpePre {
    /// `Sequence[Split(regex)..., ByteLevel(use_regex = false)]`.
    pub(crate) pre_tokenizer: PreTokenizerWrapper,
    /// A word that is itself a vocabulary entry is emitted whole, without merges
    /// (llama.cpp's `ignore_merges`; Llama 3 and Tekken).
    pub(crate) ignore_merges: bool,
    /// llama.cpp's default for `add_bos_token` when the key is absent.
    pub(crate) default_add_bos: bool,
}

/// The pre-tokenizer for `pre`, or [`TokenizerError::UnsupportedPre`] (also for `""`, a
/// missing key: a guessed pre-tokenizer silently gives wrong ids).
pub(crate) fn bpe_pre(pre: &str) -> Result<BpePre, TokenizerError> {
    let (regexes, ignore_merges, default_add_bos): (&[&str], bool, bool) = match pre {
        "llama-bpe" | "llama3" | "llama-v3" => (&[LLAMA3], true, true),
        "smaug-bpe" | "dbrx" => (&[LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => (&[QWEN2], false, false),
        "qwen35" => (&[QWEN35], false, false),
        "tekken" => (&[TEKKEN], true, true),
        "deepseek-llm" => (
            &[
                r"[\r\n]",
                DEEPSEEK_LLM_LETTERS,
                "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
                r"\s+$",
                "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
                r"\p{N}+",
            ],
            false,
            false,
        ),
        "deepseek-coder" => (
            &[
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
                r"\p{N}",
            ],
            false,
            false,
        ),
        "falcon" => (
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (&[r"\p{N}", GPT2], false, false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" => (&[GPT2], false, false),
        "default" => (
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        other => return Err(TokenizerError::UnsupportedPre(other.to_owned())),
    };
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for regex in regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(TokenizerError::Build)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, true, false).into());
    Ok(BpePre {
        pre_tokenizer: Sequence::new(steps).into(),
        ignore_merges,
        default_add_bos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_pre_builds() {
        for pre in SUPPORTED_PRE {
            if let Err(err) = bpe_pre(pre) {
                panic!("{pre}: {err:?}");
            }
        }
    }

    #[test]
    fn unknown_and_missing_pre_are_refused() {
        for pre in ["", "bloom", "gpt-4o"] {
            assert!(
                matches!(bpe_pre(pre), Err(TokenizerError::UnsupportedPre(p)) if p == pre),
                "{pre}"
            );
        }
    }
}
