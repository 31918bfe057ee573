//! Where models live: resolution order `--model PATH` > `BRIGADE_MODEL` >
//! the config file's `model.path` > the cached default model. Each of the
//! first three may also be a known model name (`KNOWN_MODELS`), resolved to
//! its file in the cache; a path that exists wins over a name.

use std::path::{Path, PathBuf};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The command that fetches the default model.
pub const FETCH_COMMAND: &str = "scripts/fetch-model.sh";

/// A model that `bash scripts/fetch-model.sh NAME` fetches into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// The name accepted by `--model`, `BRIGADE_MODEL`, `model.path` and the fetch script.
    pub name: &'static str,
    /// Its file name in the model cache directory.
    pub file: &'static str,
}

/// The models the fetch script knows, the default first (the same table as
/// in `scripts/fetch-model.sh`).
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: DEFAULT_MODEL_FILE,
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
    },
];

/// The known model called `name`, if any.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|k| k.name == name)
}

/// The known model names, `, `-separated (for messages).
fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The model cache directory: `$BRIGADE_HOME`, else `~/.cache/brigade/models`.
pub fn model_cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("BRIGADE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
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
    #[error("model not found at {path} (from {source_name}); fetch the default model with `{FETCH_COMMAND}` or pass --model PATH or a known model name ({})", known_names())]
    NotFound {
        /// Where we looked.
        path: String,
        /// Which rule chose the path.
        source_name: &'static str,
    },
    /// A known model name whose file is not in the cache.
    #[error("model {name} (from {source_name}) is not cached at {path}; fetch it with `bash {FETCH_COMMAND} {name}`")]
    NotCached {
        /// The known model name.
        name: &'static str,
        /// Where its file would be.
        path: String,
        /// Which rule chose the name.
        source_name: &'static str,
    },
    /// The path is a directory, not a GGUF file.
    #[error(
        "model path {path} (from {source_name}) is a directory; pass the .gguf file inside it"
    )]
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

/// Resolves the model path by precedence, a known model name to its cached
/// file, and checks that the result is a file.
pub fn resolve_model(cli: Option<&Path>, config: Option<&Path>) -> Result<PathBuf, ModelPathError> {
    let env = std::env::var_os("BRIGADE_MODEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    resolve_in(cli, env, config, &model_cache_dir())
}

/// `resolve_model` with the environment's `BRIGADE_MODEL` and cache directory given.
fn resolve_in(
    cli: Option<&Path>,
    env: Option<PathBuf>,
    config: Option<&Path>,
    cache_dir: &Path,
) -> Result<PathBuf, ModelPathError> {
    let (path, source_name) = if let Some(p) = cli {
        (p.to_path_buf(), "--model")
    } else if let Some(p) = env {
        (p, "BRIGADE_MODEL")
    } else if let Some(p) = config {
        (p.to_path_buf(), "config model.path")
    } else {
        (
            cache_dir.join(DEFAULT_MODEL_FILE),
            "the default model cache",
        )
    };
    let shown = path.display().to_string();
    // `metadata` follows symlinks: a link to a file is a file.
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(m) if m.is_dir() => Err(ModelPathError::IsDirectory {
            path: shown,
            source_name,
        }),
        Ok(_) => Err(ModelPathError::NotAFile {
            path: shown,
            source_name,
        }),
        Err(_) => match path.to_str().and_then(known_model) {
            Some(k) => {
                let cached = cache_dir.join(k.file);
                match std::fs::metadata(&cached) {
                    Ok(m) if m.is_file() => Ok(cached),
                    _ => Err(ModelPathError::NotCached {
                        name: k.name,
                        path: cached.display().to_string(),
                        source_name,
                    }),
                }
            }
            None => Err(ModelPathError::NotFound {
                path: shown,
                source_name,
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_reported_as_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_model(Some(dir.path()), None).unwrap_err();
        assert!(
            matches!(
                err,
                ModelPathError::IsDirectory {
                    source_name: "--model",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("is a directory") && !msg.contains("not found"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_path_is_not_found_and_a_file_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.gguf");
        let err = resolve_model(Some(&missing), None).unwrap_err();
        assert!(
            matches!(
                err,
                ModelPathError::NotFound {
                    source_name: "--model",
                    ..
                }
            ),
            "{err:?}"
        );
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        assert_eq!(resolve_model(Some(&file), None).unwrap(), file);
    }

    /// A temp dir standing for `$BRIGADE_HOME`, holding a fake cached gemma3-270m.
    fn home_with_gemma() -> (tempfile::TempDir, PathBuf) {
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join(known_model("gemma3-270m").unwrap().file);
        std::fs::write(&file, b"GGUF").unwrap();
        (home, file)
    }

    #[test]
    fn a_known_name_resolves_to_its_cached_file_from_every_source() {
        let (home, file) = home_with_gemma();
        let name = Path::new("gemma3-270m");
        assert_eq!(
            resolve_in(Some(name), None, None, home.path()).unwrap(),
            file
        );
        assert_eq!(
            resolve_in(None, Some(name.to_path_buf()), None, home.path()).unwrap(),
            file
        );
        assert_eq!(
            resolve_in(None, None, Some(name), home.path()).unwrap(),
            file
        );
        // Precedence is unchanged: --model beats BRIGADE_MODEL beats the config.
        let other = home.path().join("other.gguf");
        std::fs::write(&other, b"GGUF").unwrap();
        assert_eq!(
            resolve_in(Some(name), Some(other.clone()), None, home.path()).unwrap(),
            file
        );
        assert_eq!(
            resolve_in(None, Some(other.clone()), Some(name), home.path()).unwrap(),
            other
        );
    }

    #[test]
    fn the_default_name_is_the_default_model_file() {
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join(DEFAULT_MODEL_FILE);
        std::fs::write(&file, b"GGUF").unwrap();
        assert_eq!(
            KNOWN_MODELS.first().map(|k| k.file),
            Some(DEFAULT_MODEL_FILE)
        );
        assert_eq!(
            resolve_in(Some(Path::new("smollm2-135m")), None, None, home.path()).unwrap(),
            file
        );
        assert_eq!(resolve_in(None, None, None, home.path()).unwrap(), file);
    }

    #[test]
    fn a_known_name_not_cached_names_the_fetch_command() {
        let home = tempfile::tempdir().unwrap();
        let err = resolve_in(None, None, Some(Path::new("gemma3-270m")), home.path()).unwrap_err();
        assert!(
            matches!(
                err,
                ModelPathError::NotCached {
                    name: "gemma3-270m",
                    source_name: "config model.path",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("`bash scripts/fetch-model.sh gemma3-270m`") && msg.lines().count() == 1,
            "{msg}"
        );
        assert!(
            msg.contains(
                &home
                    .path()
                    .join("gemma-3-270m-q4_k_m.gguf")
                    .display()
                    .to_string()
            ),
            "{msg}"
        );
    }

    #[test]
    fn an_unknown_name_is_not_found_and_lists_the_known_names() {
        let (home, _) = home_with_gemma();
        let err = resolve_in(Some(Path::new("gemma3-27b")), None, None, home.path()).unwrap_err();
        assert!(
            matches!(
                err,
                ModelPathError::NotFound {
                    source_name: "--model",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("smollm2-135m, gemma3-270m") && msg.lines().count() == 1,
            "{msg}"
        );
    }

    /// Runs the fetch script with `args` under an empty temp `$BRIGADE_HOME`;
    /// returns (exit code, stdout, stderr, whether the home is still empty).
    fn fetch_script(args: &[&str]) -> (Option<i32>, String, String, bool) {
        let home = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join("fetch-model.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .env("BRIGADE_HOME", home.path())
            .output()
            .unwrap();
        let empty = std::fs::read_dir(home.path()).unwrap().next().is_none();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr),
            empty,
        )
    }

    #[test]
    fn the_fetch_script_rejects_an_unknown_name_listing_the_known_ones() {
        for args in [&["gemma3-27b"][..], &["gemma3-270m", "extra"][..]] {
            let (code, stdout, stderr, empty) = fetch_script(args);
            assert_eq!(code, Some(2), "{args:?}: {stderr}");
            assert!(
                stdout.is_empty() && empty,
                "{args:?}: nothing fetched, nothing printed: {stdout}"
            );
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            assert!(stderr.contains(&known_names()), "{args:?}: {stderr}");
        }
    }

    #[test]
    fn the_fetch_script_knows_the_same_names_and_files() {
        let script = include_str!("../scripts/fetch-model.sh");
        assert!(
            script.contains(&format!("KNOWN=\"{}\"", known_names())),
            "KNOWN line differs from KNOWN_MODELS"
        );
        for k in KNOWN_MODELS {
            assert!(
                script.contains(&format!("  {})\n", k.name)),
                "no case for {}",
                k.name
            );
            assert!(
                script.contains(&format!("FILE=\"{}\"", k.file)),
                "no FILE for {}",
                k.name
            );
        }
    }
}
