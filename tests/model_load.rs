//! Model loading on top of the GGUF reader: inconsistent model files give
//! typed errors naming the key or tensor, never a panic; the tiny model runs.

mod common;

use std::sync::Arc;

use brigade::gguf::{GgufFile, GgufWriter, MetaValue};
use brigade::model::{Model, ModelError};
use brigade::quant::GgmlDType;
use brigade::testing::{tiny_llama_gguf, TinyLlamaSpec};

/// Rebuilds the tiny model's GGUF with `edit` applied to its metadata and tensors.
fn rebuild(
    edit: impl Fn(&str, &MetaValue) -> Option<MetaValue>,
    drop_tensor: Option<&str>,
    reshape: Option<(&str, Vec<u64>)>,
) -> Vec<u8> {
    let src = GgufFile::from_bytes(tiny_llama_gguf(&TinyLlamaSpec::default())).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        if k == "general.alignment" {
            continue;
        }
        if let Some(v2) = edit(k, v) {
            w.add(k, v2);
        }
    }
    for t in src.tensors() {
        if Some(t.name.as_str()) == drop_tensor {
            continue;
        }
        let data = src.tensor_data(&t.name).unwrap().to_vec();
        let dims = match &reshape {
            Some((n, d)) if *n == t.name => d.clone(),
            _ => t.dims.clone(),
        };
        w.add_tensor(&t.name, &dims, t.dtype, data);
    }
    w.to_bytes()
}

fn load(bytes: Vec<u8>) -> Result<Model, ModelError> {
    let file = GgufFile::from_bytes(bytes)?;
    Model::from_gguf(Arc::new(file))
}

#[test]
fn tiny_model_loads_and_generates_deterministically() {
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::F16,
        GgmlDType::F32,
    ] {
        let spec = TinyLlamaSpec {
            weight_dtype: dtype,
            ..TinyLlamaSpec::default()
        };
        let (model, _) = common::tiny_model(&spec);
        let mut r = brigade::runner::Runner::new(model.clone(), 64, 1).unwrap();
        let a = r.feed(&[1, 2, 3, 4], false).unwrap();
        assert!(
            a.iter().all(|v| v.is_finite()),
            "{dtype:?}: non-finite logits"
        );
        r.reset();
        let b = r.feed(&[1, 2, 3, 4], false).unwrap();
        assert_eq!(a, b, "{dtype:?}: not deterministic");
        // Prefill in one call equals token-by-token decode, bit for bit.
        r.reset();
        let mut last = Vec::new();
        for t in [1u32, 2, 3, 4] {
            last = r.feed(&[t], false).unwrap();
        }
        assert_eq!(a, last, "{dtype:?}: prefill and decode disagree");
    }
}

#[test]
fn inconsistent_model_files_give_typed_errors() {
    let keep = |_: &str, v: &MetaValue| Some(v.clone());
    // unsupported architecture
    let e = load(rebuild(
        |k, v| {
            if k == "general.architecture" {
                Some(MetaValue::Str("gptx".into()))
            } else {
                Some(v.clone())
            }
        },
        None,
        None,
    ))
    .unwrap_err();
    assert!(
        matches!(e, ModelError::UnsupportedArch(ref a) if a == "gptx"),
        "{e}"
    );
    // missing hyper-parameter
    let e = load(rebuild(
        |k, v| {
            if k == "llama.block_count" {
                None
            } else {
                Some(v.clone())
            }
        },
        None,
        None,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("llama.block_count"), "{e}");
    // head count that does not divide the width
    let e = load(rebuild(
        |k, v| {
            if k == "llama.attention.head_count" {
                Some(MetaValue::U32(5))
            } else {
                Some(v.clone())
            }
        },
        None,
        None,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("head_count"), "{e}");
    // kv heads that do not divide heads
    let e = load(rebuild(
        |k, v| {
            if k == "llama.attention.head_count_kv" {
                Some(MetaValue::U32(3))
            } else {
                Some(v.clone())
            }
        },
        None,
        None,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("head_count_kv"), "{e}");
    // hyper-parameter of the wrong type
    let e = load(rebuild(
        |k, v| {
            if k == "llama.embedding_length" {
                Some(MetaValue::Str("64".into()))
            } else {
                Some(v.clone())
            }
        },
        None,
        None,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("llama.embedding_length"), "{e}");
    // missing tensor
    let e = load(rebuild(keep, Some("blk.1.ffn_up.weight"), None)).unwrap_err();
    assert!(e.to_string().contains("blk.1.ffn_up.weight"), "{e}");
    // wrong shape
    let e = load(rebuild(
        keep,
        None,
        Some(("blk.0.attn_q.weight", vec![64, 32])),
    ))
    .unwrap_err();
    assert!(
        matches!(e, ModelError::BadShape { ref tensor, .. } if tensor == "blk.0.attn_q.weight")
            || e.to_string().contains("attn_q"),
        "{e}"
    );
    // zero rope base
    let e = load(rebuild(
        |k, v| {
            if k == "llama.rope.freq_base" {
                Some(MetaValue::F32(0.0))
            } else {
                Some(v.clone())
            }
        },
        None,
        None,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("rope.freq_base"), "{e}");
}

#[test]
fn cli_reports_a_malformed_model_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    let mut bytes = tiny_llama_gguf(&TinyLlamaSpec::default());
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["generate", "--prompt", "hi", "--model"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error:") && !err.contains("panicked") && err.lines().count() == 1,
        "{err}"
    );
    // The cause is said once, not once by the library error and again by its source chain.
    let cause = err.rsplit(": ").next().unwrap_or_default().trim();
    assert_eq!(err.matches(cause).count(), 1, "{err}");
    let missing = dir.path().join("none.gguf");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["tokenize", "hi", "--model"])
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("scripts/fetch-model.sh") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn a_directory_as_model_is_reported_as_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    // The loader itself (serve and every command go through it).
    let e = brigade::model::load_with_tokenizer(dir.path()).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    // The CLI: one line saying what the path is, not "model not found".
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["tokenize", "hi", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("is a directory")
            && !err.contains("not found")
            && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn a_chat_template_that_fails_to_parse_is_reported_as_such() {
    // The model loads (plain completion works) and a chat request gets the
    // template's parse error, not "the model has no chat template".
    let broken = |k: &str, v: &MetaValue| {
        Some(if k == "tokenizer.chat_template" {
            MetaValue::Str("{% for %}".into())
        } else {
            v.clone()
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken-template.gguf");
    std::fs::write(&path, rebuild(broken, None, None)).unwrap();
    let (_model, tok) = brigade::model::load_with_tokenizer(&path).unwrap();
    let tmpl = tok.chat_template().expect("the broken template is kept");
    let parse = format!("{:#}", tmpl.parse_error().expect("parse error recorded"));
    let chat =
        brigade::engine::Prompt::Chat(vec![brigade::tokenizer::ChatMessage::new("user", "hi")]);
    let v = brigade::engine::Validator::new(tok.clone(), 256, 1, 4096, false);
    let err = v.encode_prompt(&chat, 1).unwrap_err().to_string();
    assert!(
        err.contains("failed to parse")
            && err.contains(&parse)
            && !err.contains("no chat template"),
        "{err}"
    );
    assert!(v
        .encode_prompt(&brigade::engine::Prompt::Text("hi".into()), 1)
        .is_ok());
}
