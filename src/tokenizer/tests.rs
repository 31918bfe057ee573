//! Unit tests on a small hand-built byte-level vocabulary. Tests against the real SmolLM2
//! vocabulary and HF reference fixtures live in `tests/tokenizer.rs`.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::byte_level::{byte_to_char, spell};
use super::*;

const ENDOFTEXT: u32 = 0;
const IM_START: u32 = 1;
const IM_END: u32 = 2;
const TOOL: u32 = 3;
const NUM_PREFIX: u32 = 4;

/// Id of the single-byte token for `b`.
fn byte_id(b: u8) -> u32 {
    NUM_PREFIX + u32::from(b)
}

/// 3 control tokens, 1 user-defined, the 256 byte tokens, then merged tokens.
fn small_spec(pre: &str) -> TokenizerSpec {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
        .map(String::from)
        .to_vec();
    let mut token_types = vec![3, 3, 3, 4];
    for b in 0..=255u8 {
        tokens.push(byte_to_char(b).to_string());
        token_types.push(1);
    }
    let merges: Vec<String> = ["Ġ t", "h e", "Ġt he", "1 2", "i n"]
        .map(String::from)
        .to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        token_types.push(1);
    }
    TokenizerSpec {
        tokens,
        token_types,
        merges,
        model: "gpt2".into(),
        pre: pre.into(),
        bos: Some(IM_START),
        eos: Some(IM_END),
        add_bos: false,
        add_eos: false,
        chat_template: Some(
            "{% for m in messages %}{{ bos_token + m.role + '\n' + m.content + eos_token + '\n' }}{% endfor %}"
                .into(),
        ),
    }
}

fn small(pre: &str) -> Tokenizer {
    Tokenizer::from_spec(small_spec(pre)).unwrap()
}

fn id_of(tok: &Tokenizer, s: &str) -> u32 {
    tok.token_id(s).unwrap()
}

#[test]
fn tokenizer_is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Tokenizer>();
    check::<IncrementalDecoder>();
    check::<ChatTemplate>();
}

#[test]
fn merges_apply_by_rank() {
    let tok = small("gpt2");
    let ids = tok.encode("the the", false).unwrap();
    let expected = vec![byte_id(b't'), id_of(&tok, "he"), id_of(&tok, "Ġthe")];
    assert_eq!(ids, expected);
    assert_eq!(tok.decode(&ids, false).unwrap(), "the the");
}

#[test]
fn smollm_splits_digits_individually_gpt2_does_not() {
    let smollm = small("smollm");
    let gpt2 = small("gpt2");
    let twelve = id_of(&gpt2, "12");
    assert_eq!(gpt2.encode("12", false).unwrap(), vec![twelve]);
    assert_eq!(
        smollm.encode("12", false).unwrap(),
        vec![byte_id(b'1'), byte_id(b'2')]
    );
}

#[test]
fn llama3_pre_tokenizer_builds_and_round_trips() {
    let tok = small("llama-bpe");
    let text = "Hello, world! 12345 \n\n  the";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn control_tokens_parsed_only_when_asked() {
    let tok = small("smollm");
    let parsed = tok.encode("<|im_start|>in", true).unwrap();
    assert_eq!(parsed, vec![IM_START, id_of(&tok, "in")]);
    let plain = tok.encode("<|im_start|>in", false).unwrap();
    assert!(!plain.contains(&IM_START));
    assert_eq!(plain.len(), "<|im_start|>".len() + 1);
    assert_eq!(tok.decode(&plain, false).unwrap(), "<|im_start|>in");
}

#[test]
fn user_defined_tokens_always_parsed_never_skipped() {
    let tok = small("smollm");
    assert_eq!(tok.encode("<tool>", false).unwrap(), vec![TOOL]);
    assert_eq!(tok.encode("<tool>", true).unwrap(), vec![TOOL]);
    assert!(!tok.is_special(TOOL));
    assert_eq!(tok.decode(&[TOOL], true).unwrap(), "<tool>");
}

#[test]
fn skip_special_drops_control_tokens() {
    let tok = small("smollm");
    let ids = tok.encode("<|im_start|>the<|im_end|>", true).unwrap();
    assert_eq!(ids.first(), Some(&IM_START));
    assert_eq!(ids.last(), Some(&IM_END));
    assert_eq!(tok.decode(&ids, true).unwrap(), "the");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>the<|im_end|>"
    );
}

#[test]
fn encode_with_bos_follows_add_bos() {
    let tok = small("smollm");
    assert_eq!(
        tok.encode_with_bos("in", true).unwrap(),
        vec![id_of(&tok, "in")]
    );
    let mut spec = small_spec("smollm");
    spec.add_bos = true;
    let tok = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(
        tok.encode_with_bos("in", true).unwrap(),
        vec![IM_START, id_of(&tok, "in")]
    );
    assert_eq!(tok.encode("in", true).unwrap(), vec![id_of(&tok, "in")]);
}

#[test]
fn accessors() {
    let tok = small("smollm");
    assert_eq!(tok.vocab_size(), 4 + 256 + 5);
    assert_eq!(tok.bos_id(), Some(IM_START));
    assert_eq!(tok.eos_id(), Some(IM_END));
    // EOS first, then <|endoftext|>; <|im_end|> is EOS already.
    assert_eq!(tok.eog_ids(), &[IM_END, ENDOFTEXT]);
    assert!(tok.is_special(IM_START));
    assert!(!tok.is_special(byte_id(b'a')));
    assert!(!tok.is_special(u32::MAX));
    assert_eq!(tok.token_str(id_of(&tok, "Ġthe")), Some("Ġthe"));
    assert_eq!(tok.token_str(u32::MAX), None);
    assert_eq!(
        tok.token_to_piece_bytes(id_of(&tok, "Ġthe")),
        Some(b" the".to_vec())
    );
    assert_eq!(tok.token_to_piece_bytes(byte_id(0xF0)), Some(vec![0xF0]));
    assert_eq!(tok.token_to_piece_bytes(u32::MAX), None);
}

#[test]
fn chat_template_gets_bos_and_eos_strings() {
    let tok = small("smollm");
    let out = tok
        .chat_template()
        .unwrap()
        .render(&[ChatMessage::new("user", "hi")], false)
        .unwrap();
    assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n");
}

#[test]
fn broken_chat_template_is_kept_with_its_parse_error_not_fatal() {
    let mut spec = small_spec("smollm");
    spec.chat_template = Some("{% if %}".into());
    let tok = Tokenizer::from_spec(spec).unwrap();
    let tmpl = tok.chat_template().expect("a template that fails to parse is still reported");
    assert!(tmpl.parse_error().is_some());
    let err = tmpl.render(&[ChatMessage::new("user", "hi")], true).unwrap_err();
    assert!(err.to_string().contains("failed to parse"), "{err}");
    assert!(tok.encode("hi", false).is_ok());
}

#[test]
fn decode_out_of_range_is_error() {
    let tok = small("smollm");
    let err = tok.decode(&[0, 9999], false).unwrap_err();
    assert!(matches!(
        err,
        TokenizerError::TokenIdOutOfRange { id: 9999, .. }
    ));
    let mut dec = IncrementalDecoder::new(&tok, false);
    assert!(dec.push(9999).is_err());
}

/// Our byte-based decode must equal the `tokenizers` crate's ByteLevel decode (which is
/// what HF Python runs) on arbitrary id sequences, including invalid UTF-8.
#[test]
fn decode_matches_tokenizers_crate_on_random_ids() {
    let tok = small("smollm");
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..2000 {
        let len = rng.gen_range(0..12);
        let ids: Vec<u32> = (0..len)
            .map(|_| rng.gen_range(0..tok.vocab_size() as u32))
            .collect();
        for skip in [false, true] {
            let ours = tok.decode(&ids, skip).unwrap();
            let theirs = tok.inner.hf_parse_special.decode(&ids, skip).unwrap();
            assert_eq!(ours, theirs, "ids {ids:?} skip {skip}");
        }
    }
}

/// Incremental output concatenates to `decode`, for random ids (invalid UTF-8 included).
#[test]
fn incremental_concat_equals_decode_on_random_ids() {
    let tok = small("smollm");
    let mut rng = SmallRng::seed_from_u64(64);
    for _ in 0..2000 {
        let len = rng.gen_range(0..16);
        let ids: Vec<u32> = (0..len)
            .map(|_| rng.gen_range(0..tok.vocab_size() as u32))
            .collect();
        for skip in [false, true] {
            let mut dec = IncrementalDecoder::new(&tok, skip);
            let mut text = String::new();
            for &id in &ids {
                text.push_str(&dec.push(id).unwrap());
            }
            text.push_str(&dec.finish());
            assert_eq!(text, tok.decode(&ids, skip).unwrap(), "ids {ids:?}");
        }
    }
}

#[test]
fn incremental_holds_back_partial_chars() {
    let tok = small("smollm");
    let text = "a😀日";
    let ids: Vec<u32> = text.bytes().map(byte_id).collect();
    let mut dec = IncrementalDecoder::new(&tok, false);
    let chunks: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    for chunk in &chunks {
        assert!(!chunk.contains(char::REPLACEMENT_CHARACTER));
    }
    // "a" at once, the emoji after its 4th byte, the CJK char after its 3rd.
    assert_eq!(chunks[0], "a");
    assert_eq!(chunks[1..4].concat(), "");
    assert_eq!(chunks[4], "😀");
    assert_eq!(chunks[7], "日");
    assert!(!dec.has_pending());
    assert_eq!(dec.finish(), "");
}

#[test]
fn incremental_finish_flushes_dangling_bytes_lossily() {
    let tok = small("smollm");
    let mut dec = IncrementalDecoder::new(&tok, false);
    assert_eq!(dec.push(byte_id(b'x')).unwrap(), "x");
    assert_eq!(dec.push(byte_id(0xE6)).unwrap(), "");
    assert!(dec.has_pending());
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert!(!dec.has_pending());
}

#[test]
fn incremental_skips_specials_when_asked() {
    let tok = small("smollm");
    let mut dec = IncrementalDecoder::new(&tok, true);
    assert_eq!(dec.push(IM_START).unwrap(), "");
    assert_eq!(dec.push(byte_id(b'h')).unwrap(), "h");
    let mut dec = IncrementalDecoder::new(&tok, false);
    assert_eq!(dec.push(IM_START).unwrap(), "<|im_start|>");
}

#[test]
fn round_trip_random_unicode() {
    let tok = small("smollm");
    let alphabet: Vec<char> = "ab 1\n\t😀日本語é<|>ĠĊ\u{0}\u{7f}".chars().collect();
    let mut rng = SmallRng::seed_from_u64(3);
    for _ in 0..500 {
        let len = rng.gen_range(0..24);
        let s: String = (0..len)
            .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
            .collect();
        let ids = tok.encode(&s, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
}

#[test]
fn spell_matches_vocab_spelling() {
    assert_eq!(spell(" the\n"), "ĠtheĊ");
}

// ---- bad specs ----

fn build_err(spec: TokenizerSpec) -> TokenizerError {
    Tokenizer::from_spec(spec).unwrap_err()
}

#[test]
fn non_bpe_model_is_rejected() {
    for model in ["llama", "bert", "t5", ""] {
        let mut spec = small_spec("smollm");
        spec.model = model.into();
        let err = build_err(spec);
        assert!(
            matches!(&err, TokenizerError::UnsupportedModel(m) if m == model),
            "{err}"
        );
    }
}

#[test]
fn unknown_pre_is_rejected_by_name() {
    let err = build_err(small_spec("deepseek-coder"));
    assert!(matches!(&err, TokenizerError::UnsupportedPre(p) if p == "deepseek-coder"));
    assert!(err.to_string().contains("deepseek-coder"));
    assert!(matches!(
        build_err(small_spec("")),
        TokenizerError::UnsupportedPre(_)
    ));
}

#[test]
fn empty_vocab_is_rejected() {
    let mut spec = small_spec("smollm");
    spec.tokens.clear();
    spec.token_types.clear();
    spec.merges.clear();
    spec.bos = None;
    spec.eos = None;
    assert!(matches!(build_err(spec), TokenizerError::EmptyVocab));
}

#[test]
fn token_type_count_mismatch_is_rejected() {
    let mut spec = small_spec("smollm");
    spec.token_types.pop();
    assert!(matches!(
        build_err(spec),
        TokenizerError::TokenTypeCount { .. }
    ));
    // Missing token types entirely means "all normal".
    let mut spec = small_spec("smollm");
    spec.token_types.clear();
    let tok = Tokenizer::from_spec(spec).unwrap();
    assert!(!tok.is_special(IM_START));
}

#[test]
fn malformed_merges_are_rejected() {
    for bad in ["abc", "a b c", " a", "a ", ""] {
        let mut spec = small_spec("smollm");
        spec.merges.push(bad.into());
        let err = build_err(spec);
        assert!(
            matches!(err, TokenizerError::BadMerge { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn merges_with_unknown_tokens_are_rejected() {
    let mut spec = small_spec("smollm");
    spec.merges.push("Ġthe zzz".into());
    let err = build_err(spec);
    assert!(
        matches!(&err, TokenizerError::MergeUnknownToken { token, .. } if token == "zzz"),
        "{err}"
    );
    // Both parts known but the merged result is not a token.
    let mut spec = small_spec("smollm");
    spec.merges.push("a b".into());
    let err = build_err(spec);
    assert!(
        matches!(&err, TokenizerError::MergeUnknownToken { token, .. } if token == "ab"),
        "{err}"
    );
}

#[test]
fn special_ids_out_of_range_are_rejected() {
    let mut spec = small_spec("smollm");
    spec.eos = Some(100_000);
    assert!(matches!(
        build_err(spec),
        TokenizerError::SpecialIdOutOfRange {
            field: "eos_token_id",
            id: 100_000,
            ..
        }
    ));
}

#[test]
fn duplicate_tokens_keep_first_id() {
    let mut spec = small_spec("smollm");
    spec.tokens.push("Ġthe".into());
    spec.token_types.push(1);
    let tok = Tokenizer::from_spec(spec).unwrap();
    let dup_id = tok.vocab_size() as u32 - 1;
    assert_ne!(tok.token_id("Ġthe"), Some(dup_id));
    assert_eq!(tok.decode(&[dup_id], false).unwrap(), " the");
}
