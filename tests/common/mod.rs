//! Shared helpers for integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use brigade::gguf::GgufFile;
use brigade::model::Model;
use brigade::tokenizer::Tokenizer;

/// Path of the real default model, if present. When `BRIGADE_REQUIRE_MODEL=1`
/// (set by `.ci/run`), a missing model is a test failure rather than a skip.
pub fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("BRIGADE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(brigade::paths::default_model_path);
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("BRIGADE_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!("model not found at {} (run scripts/fetch-model.sh)", p.display());
    }
    eprintln!("note: model not found at {}; skipping (run scripts/fetch-model.sh)", p.display());
    None
}

/// Loads the real model and tokenizer once per test binary.
pub fn real_model() -> Option<(Arc<Model>, Arc<Tokenizer>)> {
    use std::sync::OnceLock;
    static M: OnceLock<Option<(Arc<Model>, Arc<Tokenizer>)>> = OnceLock::new();
    M.get_or_init(|| {
        let p = model_path()?;
        let file = Arc::new(GgufFile::open(&p).expect("open model"));
        let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
        let model = Model::from_gguf(file).expect("model");
        Some((Arc::new(model), Arc::new(tok)))
    })
    .clone()
}

/// A tiny random model (and its tokenizer) built in memory.
pub fn tiny_model(spec: &brigade::testing::TinyLlamaSpec) -> (Arc<Model>, Arc<Tokenizer>) {
    let bytes = brigade::testing::tiny_llama_gguf(spec);
    let file = Arc::new(GgufFile::from_bytes(bytes).expect("tiny gguf"));
    let tok = Tokenizer::from_gguf(&file).expect("tiny tokenizer");
    let model = Model::from_gguf(file).expect("tiny model");
    (Arc::new(model), Arc::new(tok))
}

/// Reads a golden fixture file.
pub fn golden(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/smollm2").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).expect("fixture json")
}

/// Token ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}
