//! Tokenization against llama.cpp's own vocabulary tests: every case of every
//! `models/ggml-vocab-*.gguf.inp` whose vocabulary we support must encode to exactly the
//! ids in the matching `.gguf.out`, and the vocabularies we do not support must be refused
//! with one clear line.
//!
//! The data comes from `scripts/fetch-test-data.sh` (run by `scripts/test.sh`); without it
//! these tests print a notice and pass. Format, as llama.cpp's `tests/test-tokenizer-0.cpp`
//! reads it: `.inp` holds the cases separated by the line `__ggml_vocab_test__`, `.out` one
//! line of space-separated ids per case. llama.cpp encodes them with `add_special = false`
//! (no BOS/EOS) and `parse_special = false` (control-token text is plain text), which is
//! `Tokenizer::encode(text, false)`. Each vocabulary's count of equal cases is printed
//! (`cargo test --test tokenizer_vocab -- --nocapture`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brigade::gguf::GgufFile;
use brigade::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

/// `$BRIGADE_LLAMACPP_DATA/models`, default `~/.cache/brigade/llamacpp-0.3.36/models`, or
/// `None` (with a notice) when it has not been fetched.
fn data_dir() -> Option<PathBuf> {
    let root = match std::env::var_os("BRIGADE_LLAMACPP_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/brigade/llamacpp-0.3.36"),
    };
    let dir = root.join("models");
    if dir.join("ggml-vocab-gpt-2.gguf").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIP: llama.cpp vocab test data not found in {} (run scripts/fetch-test-data.sh)",
            dir.display()
        );
        None
    }
}

/// The cases of `ggml-vocab-NAME.gguf.inp/.out`: (text, expected ids).
fn read_cases(dir: &std::path::Path, name: &str) -> Result<Vec<(String, Vec<u32>)>> {
    let base = dir.join(format!("ggml-vocab-{name}.gguf"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).context("reading .inp")?;
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).context("reading .out")?;
    // The file ends with the separator, so the split leaves one empty tail to drop.
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let lines: Vec<&str> = out.lines().collect();
    if texts.len() != lines.len() {
        bail!("{name}: {} inputs but {} outputs", texts.len(), lines.len());
    }
    texts
        .into_iter()
        .zip(lines)
        .map(|(text, line)| {
            let ids = line
                .split_whitespace()
                .map(|id| id.parse::<u32>().with_context(|| format!("{name}: id {id:?}")))
                .collect::<Result<Vec<u32>>>()?;
            Ok((text.to_owned(), ids))
        })
        .collect()
}

fn open_vocab(dir: &std::path::Path, name: &str) -> Result<Result<Tokenizer, TokenizerError>> {
    let file = GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf")))?;
    Ok(Tokenizer::from_gguf(&file))
}

/// Encodes every case of vocabulary `name` and requires all to equal llama.cpp's ids;
/// also checks that streaming decode equals `decode` on each case.
fn check_vocab(name: &str) -> Result<()> {
    let Some(dir) = data_dir() else {
        return Ok(());
    };
    let tok = open_vocab(&dir, name)?.with_context(|| format!("loading {name}"))?;
    let cases = read_cases(&dir, name)?;
    let mut failures = Vec::new();
    for (text, expected) in &cases {
        let got = tok.encode(text, false)?;
        if &got != expected {
            failures.push(format!("  {text:?}\n    want {expected:?}\n    got  {got:?}"));
        }
        let mut decoder = IncrementalDecoder::new(&tok, false);
        let mut streamed = String::new();
        for &id in &got {
            streamed.push_str(&decoder.push(id)?);
        }
        streamed.push_str(&decoder.finish());
        assert_eq!(streamed, tok.decode(&got, false)?, "{name}: streaming decode of {text:?}");
    }
    let num_equal = cases.len() - failures.len();
    println!("vocab {name}: {num_equal}/{} cases equal to llama.cpp", cases.len());
    if !failures.is_empty() {
        bail!("{name}: {} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    }
    Ok(())
}

#[test]
fn vocab_llama_bpe() -> Result<()> {
    check_vocab("llama-bpe")
}

#[test]
fn vocab_qwen2() -> Result<()> {
    check_vocab("qwen2")
}

#[test]
fn vocab_qwen35() -> Result<()> {
    check_vocab("qwen35")
}

#[test]
fn vocab_llama_spm() -> Result<()> {
    check_vocab("llama-spm")
}

#[test]
fn vocab_phi_3() -> Result<()> {
    check_vocab("phi-3")
}

#[test]
fn vocab_gemma_4() -> Result<()> {
    check_vocab("gemma-4")
}

#[test]
fn vocab_gpt_2() -> Result<()> {
    check_vocab("gpt-2")
}

#[test]
fn vocab_deepseek_llm() -> Result<()> {
    check_vocab("deepseek-llm")
}

#[test]
fn vocab_deepseek_coder() -> Result<()> {
    check_vocab("deepseek-coder")
}

#[test]
fn vocab_falcon() -> Result<()> {
    check_vocab("falcon")
}

#[test]
fn vocab_starcoder() -> Result<()> {
    check_vocab("starcoder")
}

#[test]
fn vocab_command_r() -> Result<()> {
    check_vocab("command-r")
}

#[test]
fn vocab_refact() -> Result<()> {
    check_vocab("refact")
}

#[test]
fn vocab_mpt() -> Result<()> {
    check_vocab("mpt")
}

/// BERT (WordPiece) and T5-style Unigram vocabularies, and BPE vocabularies without a
/// `tokenizer.ggml.pre` (llama.cpp guesses `default` for those), are refused with one line
/// naming the key and the value.
#[test]
fn unsupported_vocabs_are_refused_in_one_line() -> Result<()> {
    let Some(dir) = data_dir() else {
        return Ok(());
    };
    for (name, key, value) in [
        ("bert-bge", "tokenizer.ggml.model", "bert"),
        ("nomic-bert-moe", "tokenizer.ggml.model", "t5"),
        ("aquila", "tokenizer.ggml.pre", ""),
        ("gpt-neox", "tokenizer.ggml.pre", ""),
    ] {
        let Err(err) = open_vocab(&dir, name)? else {
            bail!("{name}: loaded, expected an error");
        };
        let message = err.to_string();
        assert!(
            matches!(&err, TokenizerError::UnsupportedModel(v) | TokenizerError::UnsupportedPre(v) if v == value),
            "{name}: {message}"
        );
        assert!(message.contains(key) && message.contains(&format!("{value:?}")), "{name}: {message}");
        assert!(!message.contains('\n'), "{name}: {message}");
    }
    Ok(())
}

/// Baichuan's vocabulary is SentencePiece (`llama`) without test cases: it loads, and
/// plain ASCII round-trips (with the space SentencePiece puts in front).
#[test]
fn baichuan_spm_vocab_loads() -> Result<()> {
    let Some(dir) = data_dir() else {
        return Ok(());
    };
    let tok = open_vocab(&dir, "baichuan")?.context("loading baichuan")?;
    let ids = tok.encode("Hello world", false)?;
    assert!(!ids.is_empty() && ids.len() < 6, "{ids:?}");
    assert_eq!(tok.decode(&ids, false)?, " Hello world");
    Ok(())
}
