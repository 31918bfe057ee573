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
        if std::env::var("BRIGADE_REQUIRE_MODEL").as_deref() == Ok("1") {
            panic!("BRIGADE_REQUIRE_MODEL=1 but llama.cpp's vocab test data is not in {} (run scripts/fetch-test-data.sh)", dir.display());
        }
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
                .map(|id| {
                    id.parse::<u32>()
                        .with_context(|| format!("{name}: id {id:?}"))
                })
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
            failures.push(format!(
                "  {text:?}\n    want {expected:?}\n    got  {got:?}"
            ));
        }
        let mut decoder = IncrementalDecoder::new(&tok, false);
        let mut streamed = String::new();
        for &id in &got {
            streamed.push_str(&decoder.push(id)?);
        }
        streamed.push_str(&decoder.finish());
        assert_eq!(
            streamed,
            tok.decode(&got, false)?,
            "{name}: streaming decode of {text:?}"
        );
    }
    let num_equal = cases.len() - failures.len();
    println!(
        "vocab {name}: {num_equal}/{} cases equal to llama.cpp",
        cases.len()
    );
    if !failures.is_empty() {
        bail!(
            "{name}: {} of {} cases differ:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
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
        assert!(
            message.contains(key) && message.contains(&format!("{value:?}")),
            "{name}: {message}"
        );
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

/// `brigade tokenize` reads only the tokenizer, so it works on vocab-only GGUFs (no
/// tensors), prepends BOS as the vocabulary says (Llama 2: yes; GPT-2: no) and reports an
/// unsupported tokenizer in one line.
#[test]
fn cli_tokenize_works_on_vocab_only_files() -> Result<()> {
    let Some(dir) = data_dir() else {
        return Ok(());
    };
    let run = |name: &str, args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
            .arg("tokenize")
            .args(args)
            .arg("--model")
            .arg(dir.join(format!("ggml-vocab-{name}.gguf")))
            .output()?)
    };
    let stdout_ids = |out: &std::process::Output| -> Result<Vec<u32>> {
        if !out.status.success() {
            bail!(
                "brigade tokenize failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let text = "Hello world <s>";
    for (name, bos) in [
        ("llama-spm", Some(1)),
        ("gpt-2", None),
        ("llama-bpe", Some(128000)),
    ] {
        let tok = open_vocab(&dir, name)?.with_context(|| format!("loading {name}"))?;
        let plain = tok.encode(text, true)?;
        let with_bos: Vec<u32> = bos.into_iter().chain(plain.iter().copied()).collect();
        assert_eq!(
            stdout_ids(&run(name, &[text, "--json"])?)?,
            with_bos,
            "{name}"
        );
        assert_eq!(
            stdout_ids(&run(name, &[text, "--json", "--no-bos"])?)?,
            plain,
            "{name}"
        );
        let unparsed = tok.encode(text, false)?;
        let out = run(name, &[text, "--json", "--no-bos", "--no-parse-special"])?;
        assert_eq!(stdout_ids(&out)?, unparsed, "{name}");
    }
    let out = run("bert-bge", &["x"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("`tokenizer.ggml.model` = \"bert\" is not supported")
            && err.lines().count() == 1,
        "{err}"
    );
    Ok(())
}

// ---- Hugging Face ids (tests/fixtures/vocab/*.json, tests/reference/make_vocab_fixtures.py) ----

/// Compares `encode(text, false)` with the HF ids recorded for vocabulary `name`, whose
/// GGUF is `gguf`. `known_differences`: texts where HF's GGUF conversion and llama.cpp
/// disagree and we follow llama.cpp (each one explained at the call).
fn check_hf_fixture(name: &str, gguf: &std::path::Path, known_differences: &[&str]) -> Result<()> {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vocab")
        .join(format!("{name}.json"));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&fixture)?)?;
    let file = GgufFile::open(gguf)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let cases = doc["cases"].as_array().context("fixture without cases")?;
    let mut failures = Vec::new();
    let mut num_known = 0usize;
    for case in cases {
        let text = case["text"].as_str().context("case without text")?;
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let got = tok.encode(text, false)?;
        if known_differences.contains(&text) {
            assert_ne!(
                got, expected,
                "{name}: {text:?} is listed as a known difference but is equal"
            );
            num_known += 1;
        } else if got != expected {
            failures.push(format!(
                "  {text:?}\n    hf   {expected:?}\n    ours {got:?}"
            ));
        }
    }
    println!(
        "hf {name}: {}/{} cases equal to transformers ({num_known} known differences)",
        cases.len() - failures.len() - num_known,
        cases.len()
    );
    if !failures.is_empty() {
        bail!(
            "{name}: {} cases differ from HF:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

#[test]
fn hf_fixtures_of_llama_cpp_vocabs() -> Result<()> {
    let Some(dir) = data_dir() else {
        return Ok(());
    };
    let vocab = |name: &str| dir.join(format!("ggml-vocab-{name}.gguf"));
    let mut errors = Vec::new();
    // Falcon: transformers' GGUF conversion drops Falcon's pre-tokenizer steps (split at
    // punctuation first, then runs of 3 digits), so "1234567890" and the "  " before "#"
    // differ; llama.cpp (and Falcon's own tokenizer.json) apply them, and so do we.
    let falcon_differences = [
        "1234567890 3.14159 -42 1,000,000 0x1F 12e-3",
        "def f(x):\n    return x ** 2  # square\n",
    ];
    // Llama 2 (SentencePiece): llama.cpp always puts "▁" in front of the text; the
    // transformers conversion does not when the text already starts with a space.
    // llama.cpp's own cases (" Hello world" → 29871 15043 ...) pin its behaviour.
    let llama_spm_differences = [" leading space and trailing space ", "   \n   "];
    for (name, known) in [
        ("llama-bpe", &[][..]),
        ("qwen2", &[]),
        ("gpt-2", &[]),
        ("falcon", &falcon_differences[..]),
        ("starcoder", &[]),
        ("llama-spm", &llama_spm_differences[..]),
        ("phi-3", &[]),
    ] {
        if let Err(err) = check_hf_fixture(name, &vocab(name), known) {
            errors.push(format!("{err:#}"));
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}

/// The Gemma 3 270M model's 262,144-token SentencePiece vocabulary: loads fast (the time
/// is printed, not asserted), has llama.cpp's flags, and encodes as HF does.
#[test]
fn gemma3_vocab_from_the_model_file() -> Result<()> {
    let dir = std::env::var_os("BRIGADE_HOME")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache/brigade/models")));
    let Some(path) = dir
        .map(|d| d.join("gemma-3-270m-q4_k_m.gguf"))
        .filter(|p| p.is_file())
    else {
        eprintln!(
            "SKIP: gemma-3-270m-q4_k_m.gguf not cached (bash scripts/fetch-model.sh gemma3-270m)"
        );
        return Ok(());
    };
    let start = std::time::Instant::now();
    let file = GgufFile::open(&path)?;
    let opened = start.elapsed();
    let spec = brigade::tokenizer::TokenizerSpec::from_gguf(&file)?;
    let read = start.elapsed();
    let tok = Tokenizer::from_spec(spec)?;
    println!(
        "gemma3: GGUF open {opened:?}, spec read {:?}, 262k-token tokenizer built {:?}",
        read - opened,
        start.elapsed() - read
    );
    assert_eq!(tok.vocab_size(), 262_144);
    assert!(tok.add_bos_token());
    assert_eq!(tok.bos_id(), Some(2));
    let end_of_turn = tok.token_id("<end_of_turn>").context("<end_of_turn>")?;
    assert!(tok.eog_ids().contains(&end_of_turn));
    // add_space_prefix is false: no ▁ in front of the text.
    let ids = tok.encode("Hello", false)?;
    assert_eq!(tok.decode(&ids, false)?, "Hello");
    // Control-token text stays plain text without parse_special, and is one id with it.
    let start_of_turn = tok.token_id("<start_of_turn>").context("<start_of_turn>")?;
    assert!(!tok
        .encode("<start_of_turn>user", false)?
        .contains(&start_of_turn));
    assert_eq!(
        tok.encode("<start_of_turn>user", true)?.first(),
        Some(&start_of_turn)
    );
    // Streaming decode is byte-exact on text that needs byte fallback and multi-byte chars.
    let text = "emoji 😀🎉 日本語 \u{10FFFF}\u{E000} done";
    let ids = tok.encode(text, false)?;
    let mut decoder = IncrementalDecoder::new(&tok, false);
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&decoder.push(id)?);
    }
    streamed.push_str(&decoder.finish());
    assert_eq!(streamed, text);
    if std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vocab/gemma-3-270m.json")
        .is_file()
    {
        check_hf_fixture("gemma-3-270m", &path, &[])?;
    }
    Ok(())
}
