//! The results file: its line type (OpenAI's / vLLM's batch output format)
//! and its recovery before a run (which `custom_id`s are done; a torn tail is
//! cut off so it is redone).
//!
//! Crash safety rests on one rule: each result is appended with one `write`
//! of the whole line and its `\n` (and `fdatasync`ed), so a `kill -9` can only
//! leave a partial *last* line. Recovery keeps every complete line and cuts
//! a last line without `\n` or that is not a result line.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One line of the results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputLine {
    /// `batch_req_…`.
    pub id: String,
    /// The input line's `custom_id` (or `line-N`, see [`super::input`]).
    pub custom_id: String,
    /// The endpoint's answer; `null` when the line never reached one.
    pub response: Option<OutputResponse>,
    /// Why it failed; `null` on success.
    pub error: Option<OutputError>,
}

/// `response` of an output line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputResponse {
    /// The HTTP status the endpoint answered.
    pub status_code: u16,
    /// The request's id (its `x-request-id`).
    pub request_id: String,
    /// The JSON body the HTTP endpoint returns.
    pub body: Value,
}

/// `error` of an output line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputError {
    /// Machine-readable code.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

/// Errors on the results file.
#[derive(Debug, thiserror::Error)]
pub enum OutputFileError {
    /// Reading, truncating or writing it failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The `-o` file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line before the last is not a result line: not a file this command wrote.
    #[error("{}:{line}: not a batch result line ({what}); refusing to append to it", path.display())]
    Corrupt {
        /// The `-o` file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        what: String,
    },
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// `custom_id`s already answered.
    pub done: HashSet<String>,
    /// Bytes of a torn last line that were cut off (0 when none).
    pub truncated_bytes: u64,
}

/// Reads `path` (absent = empty), cuts a torn last line off, and returns the
/// answered `custom_id`s.
pub fn recover(path: &Path) -> Result<Recovered, OutputFileError> {
    let io = |source| OutputFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovered::default()),
        Err(e) => return Err(io(e)),
    }
    let (done, keep) = scan(&bytes).map_err(|(line, what)| OutputFileError::Corrupt {
        path: path.to_path_buf(),
        line,
        what,
    })?;
    let truncated_bytes = (bytes.len() - keep) as u64;
    if truncated_bytes > 0 {
        let f = OpenOptions::new().write(true).open(path).map_err(io)?;
        f.set_len(keep as u64).map_err(io)?;
        f.sync_data().map_err(io)?;
    }
    Ok(Recovered {
        done,
        truncated_bytes,
    })
}

/// The `custom_id`s of the complete lines of `bytes` and the length to keep;
/// `Err((line, why))` when a line other than the last is not a result line.
fn scan(bytes: &[u8]) -> Result<(HashSet<String>, usize), (usize, String)> {
    let mut done = HashSet::new();
    let mut start = 0usize;
    let mut line_no = 0usize;
    while start < bytes.len() {
        line_no += 1;
        let Some(nl) = bytes[start..].iter().position(|&b| b == b'\n') else {
            return Ok((done, start)); // torn: no newline
        };
        let end = start + nl;
        match serde_json::from_slice::<OutputLine>(&bytes[start..end]) {
            Ok(l) => {
                done.insert(l.custom_id);
            }
            Err(_) if end + 1 == bytes.len() => {
                return Ok((done, start)); // torn last line that happens to end in a newline byte
            }
            Err(e) => return Err((line_no, e.to_string())),
        }
        start = end + 1;
    }
    Ok((done, bytes.len()))
}

/// Appends result lines to the file, one `write` + `fdatasync` per line.
#[derive(Debug)]
pub struct Appender {
    file: File,
    path: PathBuf,
}

impl Appender {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> Result<Self, OutputFileError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| OutputFileError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Writes one line (its JSON and `\n` in one buffer) and syncs it.
    pub fn append(&mut self, line: &OutputLine) -> Result<(), OutputFileError> {
        let io = |source| OutputFileError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = serde_json::to_vec(line).map_err(|e| io(std::io::Error::other(e)))?;
        buf.push(b'\n');
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str) -> String {
        let l = OutputLine {
            id: "batch_req_1".into(),
            custom_id: id.into(),
            response: None,
            error: Some(OutputError {
                code: "c".into(),
                message: "m".into(),
            }),
        };
        serde_json::to_string(&l).unwrap() + "\n"
    }

    #[test]
    fn scan_keeps_complete_lines_and_cuts_a_torn_tail() {
        let two = line("a") + &line("b");
        let (done, keep) = scan(two.as_bytes()).unwrap();
        assert_eq!((done.len(), keep), (2, two.len()));
        // Torn without newline: any prefix of a third line.
        let third = line("c");
        for cut in 1..third.len() {
            let s = two.clone() + &third[..cut];
            let (done, keep) = scan(s.as_bytes()).unwrap();
            assert_eq!(keep, two.len(), "cut {cut}");
            assert!(!done.contains("c"));
        }
        // A last line that is not a result line but ends in a newline.
        let s = two.clone() + "{\"id\":\n";
        assert_eq!(scan(s.as_bytes()).unwrap().1, two.len());
        // Garbage before the last line: refused.
        let s = line("a") + "garbage\n" + &line("b");
        assert_eq!(scan(s.as_bytes()).unwrap_err().0, 2);
    }

    #[test]
    fn recover_truncates_the_file() {
        let dir =
            std::env::temp_dir().join(format!("brigade-batch-recover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.jsonl");
        assert!(recover(&p).unwrap().done.is_empty());
        std::fs::write(&p, line("a") + "{\"id\":\"batch_re").unwrap();
        let r = recover(&p).unwrap();
        assert!(r.done.contains("a") && r.truncated_bytes > 0);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), line("a"));
        let mut a = Appender::open(&p).unwrap();
        let l: OutputLine = serde_json::from_str(&line("b")).unwrap();
        a.append(&l).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), line("a") + &line("b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
