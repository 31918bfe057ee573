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

/// Error: resolution pointed at something that is not a model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelPathError {
    /// Nothing exists at the path.
    #[error("model not found at {path} (from {source_name}); fetch the default model with `{FETCH_COMMAND}` or pass --model PATH")]
    NotFound {
        /// Where we looked.
        path: String,
        /// Which rule chose the path.
        source_name: &'static str,
    },
    /// The path is a directory, not a GGUF file.
    #[error("model path {path} (from {source_name}) is a directory; pass the .gguf file inside it")]
    IsDirectory {
        /// The directory.
        path: String,
        /// Which rule chose the path.
        source_name: &'static str,
    },
    /// The path exists but is neither a file nor a directory (socket, device, ...).
    #[error("model path {path} (from {source_name}) is not a regular file")]
    NotAFile {
        /// The path.
        path: String,
        /// Which rule chose the path.
        source_name: &'static str,
    },
}

/// Resolves the model path by precedence and checks that it is a file.
pub fn resolve_model(cli: Option<&Path>, config: Option<&Path>) -> Result<PathBuf, ModelPathError> {
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
    let shown = path.display().to_string();
    // `metadata` follows symlinks: a link to a file is a file.
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(m) if m.is_dir() => Err(ModelPathError::IsDirectory { path: shown, source_name }),
        Ok(_) => Err(ModelPathError::NotAFile { path: shown, source_name }),
        Err(_) => Err(ModelPathError::NotFound { path: shown, source_name }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_reported_as_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_model(Some(dir.path()), None).unwrap_err();
        assert!(matches!(err, ModelPathError::IsDirectory { source_name: "--model", .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("is a directory") && !msg.contains("not found"), "{msg}");
    }

    #[test]
    fn a_missing_path_is_not_found_and_a_file_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.gguf");
        let err = resolve_model(Some(&missing), None).unwrap_err();
        assert!(matches!(err, ModelPathError::NotFound { source_name: "--model", .. }), "{err:?}");
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        assert_eq!(resolve_model(Some(&file), None).unwrap(), file);
    }
}
