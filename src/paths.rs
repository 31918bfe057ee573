//! Where models live: resolution order `--model PATH` > `BRIGADE_MODEL` >
//! the config file's `model.path` > the cached default model.

use std::path::{Path, PathBuf};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The command that fetches the default model.
pub const FETCH_COMMAND: &str = "scripts/fetch-model.sh";

/// The model cache directory: `$BRIGADE_HOME`, else `~/.cache/brigade/models`.
pub fn model_cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("BRIGADE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("brigade").join("models")
}

/// Path of the cached default model (may not exist).
pub fn default_model_path() -> PathBuf {
    model_cache_dir().join(DEFAULT_MODEL_FILE)
}

/// Error: no model file where resolution pointed.
#[derive(Debug, thiserror::Error)]
#[error("model not found at {path} (from {source_name}); fetch the default model with `{FETCH_COMMAND}` or pass --model PATH")]
pub struct ModelNotFound {
    /// Where we looked.
    pub path: String,
    /// Which rule chose the path.
    pub source_name: &'static str,
}

/// Resolves the model path by precedence and checks that it exists.
pub fn resolve_model(cli: Option<&Path>, config: Option<&Path>) -> Result<PathBuf, ModelNotFound> {
    let env = std::env::var_os("BRIGADE_MODEL").filter(|v| !v.is_empty()).map(PathBuf::from);
    let (path, source_name) = if let Some(p) = cli {
        (p.to_path_buf(), "--model")
    } else if let Some(p) = env {
        (p, "BRIGADE_MODEL")
    } else if let Some(p) = config {
        (p.to_path_buf(), "config model.path")
    } else {
        (default_model_path(), "the default model cache")
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelNotFound { path: path.display().to_string(), source_name })
    }
}
