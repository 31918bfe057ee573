//! The batch input file → a plan: which lines this shard runs, and which
//! become error lines without reaching an endpoint. Pure (no I/O, no engine).
//!
//! # Keys
//!
//! Every output line has a unique `custom_id`, which is also the resume key:
//! - a line with a string `custom_id` seen for the first time in the file keeps it;
//! - a line with none (not JSON, missing, not a string, empty) or whose
//!   `custom_id` repeats an earlier line's gets `line-N` (1-based line number)
//!   and an error naming the problem (and the duplicated id).
//!
//! Duplicates are found over the whole file, whatever the shard, so a shard's
//! plan is exactly the single-run plan restricted to its lines.
//!
//! # Shards
//!
//! `--shard I/N` takes the lines whose 0-based line index `i` (blank lines
//! count, and are skipped) has `i % N == I`. The N shards partition the file.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// `--shard I/N`: this process runs lines with `index % count == index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// Number of shards (≥ 1).
    pub count: usize,
}

impl Shard {
    /// The whole file.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether 0-based line `i` belongs to this shard.
    pub fn owns(&self, i: usize) -> bool {
        i % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a shard `I/N` with 0 <= I < N (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// The endpoint of a batch line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchUrl {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl BatchUrl {
    /// The request path.
    pub fn path(&self) -> &'static str {
        match self {
            BatchUrl::Chat => "/v1/chat/completions",
            BatchUrl::Completions => "/v1/completions",
        }
    }
}

/// One line of the plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Planned {
    /// A request to run through its endpoint.
    Run {
        /// 0-based line index.
        index: usize,
        /// The line's `custom_id`.
        custom_id: String,
        /// Its endpoint.
        url: BatchUrl,
        /// Its `body`, an object, passed to the endpoint as sent.
        body: Map<String, Value>,
    },
    /// A line that is answered with an error line.
    Fail {
        /// 0-based line index.
        index: usize,
        /// Its key: `custom_id`, or `line-N`.
        custom_id: String,
        /// Error code (`invalid_json`, `missing_custom_id`, `duplicate_custom_id`, `invalid_method`,
        /// `invalid_url`, `invalid_body`, `stream_not_supported`).
        code: &'static str,
        /// What is wrong, naming the line and the field.
        message: String,
    },
}

impl Planned {
    /// The output key of this line.
    pub fn custom_id(&self) -> &str {
        match self {
            Planned::Run { custom_id, .. } | Planned::Fail { custom_id, .. } => custom_id,
        }
    }
}

/// The plan of `text` (a JSONL batch input file) for `shard`, in file order.
pub fn plan(text: &str, shard: Shard) -> Vec<Planned> {
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let n = index + 1;
        let fail = |custom_id: String, code, message: String| Planned::Fail {
            index,
            custom_id,
            code,
            message: format!("line {n}: {message}"),
        };
        let parsed: Result<Map<String, Value>, String> = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("a batch line must be a JSON object".to_string()),
            Err(e) => Err(format!("not valid JSON: {e}")),
        };
        // The key: decided on every line (duplicates are global), kept only on ours.
        let planned = match parsed {
            Err(why) => fail(format!("line-{n}"), "invalid_json", why),
            Ok(mut obj) => match obj.get("custom_id") {
                Some(Value::String(id)) if !id.is_empty() => {
                    let id = id.clone();
                    if let Some(&prev) = first_line.get(&id) {
                        fail(
                            format!("line-{n}"),
                            "duplicate_custom_id",
                            format!("`custom_id` {id:?} repeats line {}", prev + 1),
                        )
                    } else {
                        first_line.insert(id.clone(), index);
                        check_request(index, id, &mut obj)
                    }
                }
                Some(Value::String(_)) => fail(
                    format!("line-{n}"),
                    "missing_custom_id",
                    "`custom_id` must not be empty".into(),
                ),
                Some(v) => fail(
                    format!("line-{n}"),
                    "missing_custom_id",
                    format!("`custom_id` must be a string, got {v}"),
                ),
                None => fail(
                    format!("line-{n}"),
                    "missing_custom_id",
                    "`custom_id` is required".into(),
                ),
            },
        };
        if shard.owns(index) {
            out.push(planned);
        }
    }
    out
}

/// `method`, `url` and `body` of a line whose key is settled.
fn check_request(index: usize, custom_id: String, obj: &mut Map<String, Value>) -> Planned {
    let n = index + 1;
    let fail = |custom_id: String, code, message: String| Planned::Fail {
        index,
        custom_id,
        code,
        message: format!("line {n}: {message}"),
    };
    match obj.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        Some(v) => {
            return fail(
                custom_id,
                "invalid_method",
                format!("`method` must be \"POST\", got {v}"),
            )
        }
        None => {
            return fail(
                custom_id,
                "invalid_method",
                "`method` is required (\"POST\")".into(),
            )
        }
    }
    let url = match obj.get("url").and_then(Value::as_str) {
        Some("/v1/chat/completions") => BatchUrl::Chat,
        Some("/v1/completions") => BatchUrl::Completions,
        Some(u) => return fail(
            custom_id,
            "invalid_url",
            format!(
                "`url` {u:?} is not supported (\"/v1/chat/completions\" or \"/v1/completions\")"
            ),
        ),
        None => {
            return fail(
                custom_id,
                "invalid_url",
                "`url` is required (\"/v1/chat/completions\" or \"/v1/completions\")".into(),
            )
        }
    };
    let body = match obj.remove("body") {
        Some(Value::Object(b)) => b,
        Some(v) => {
            return fail(
                custom_id,
                "invalid_body",
                format!("`body` must be a JSON object, got {}", kind(&v)),
            )
        }
        None => return fail(custom_id, "invalid_body", "`body` is required".into()),
    };
    if let Some(extra) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "custom_id" | "method" | "url"))
    {
        return fail(
            custom_id,
            "invalid_body",
            format!("unrecognized batch line field `{extra}` (custom_id, method, url, body)"),
        );
    }
    match body.get("stream") {
        Some(Value::Bool(true)) => fail(
            custom_id,
            "stream_not_supported",
            "`body.stream` must be false in a batch (results are whole bodies)".into(),
        ),
        _ => Planned::Run {
            index,
            custom_id,
            url,
            body,
        },
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(p: &Planned) -> Option<&'static str> {
        match p {
            Planned::Fail { code, .. } => Some(code),
            Planned::Run { .. } => None,
        }
    }

    #[test]
    fn shard_parse_and_ownership() {
        assert_eq!("1/3".parse::<Shard>(), Ok(Shard { index: 1, count: 3 }));
        for bad in ["3/3", "0/0", "x/2", "1", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let s: Shard = "2/3".parse().unwrap();
        assert_eq!(
            (0..9).filter(|&i| s.owns(i)).collect::<Vec<_>>(),
            vec![2, 5, 8]
        );
    }

    #[test]
    fn bad_lines_get_keys_and_codes() {
        let text = [
            r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
            r#"not json"#,
            r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{}}"#,
            r#"{"method":"POST","url":"/v1/completions","body":{}}"#,
            r#"{"custom_id":"b","method":"GET","url":"/v1/completions","body":{}}"#,
            r#"{"custom_id":"c","method":"POST","url":"/v1/embeddings","body":{}}"#,
            r#"{"custom_id":"d","method":"POST","url":"/v1/chat/completions","body":[1]}"#,
            r#"{"custom_id":"e","method":"POST","url":"/v1/chat/completions","body":{"stream":true}}"#,
            "",
            r#"{"custom_id":7,"method":"POST","url":"/v1/completions","body":{}}"#,
            r#"[1,2]"#,
        ]
        .join("\n");
        let p = plan(&text, Shard::ALL);
        let got: Vec<(&str, Option<&str>)> = p.iter().map(|x| (x.custom_id(), code(x))).collect();
        assert_eq!(
            got,
            vec![
                ("a", None),
                ("line-2", Some("invalid_json")),
                ("line-3", Some("duplicate_custom_id")),
                ("line-4", Some("missing_custom_id")),
                ("b", Some("invalid_method")),
                ("c", Some("invalid_url")),
                ("d", Some("invalid_body")),
                ("e", Some("stream_not_supported")),
                ("line-10", Some("missing_custom_id")),
                ("line-11", Some("invalid_json")),
            ]
        );
        let Planned::Fail { message, .. } = &p[2] else {
            panic!()
        };
        assert!(
            message.contains("\"a\"") && message.contains("line 1"),
            "{message}"
        );
    }

    #[test]
    fn shards_partition_the_plan_and_see_global_duplicates() {
        let lines: Vec<String> = (0..10)
            .map(|i| format!(r#"{{"custom_id":"id{}","method":"POST","url":"/v1/completions","body":{{"prompt":"p"}}}}"#, i % 7))
            .collect();
        let text = lines.join("\n") + "\n";
        let whole = plan(&text, Shard::ALL);
        let mut union: Vec<Planned> = (0..3)
            .flat_map(|i| plan(&text, Shard { index: i, count: 3 }))
            .collect();
        union.sort_by_key(|p| match p {
            Planned::Run { index, .. } | Planned::Fail { index, .. } => *index,
        });
        assert_eq!(union, whole);
        assert_eq!(
            whole
                .iter()
                .filter(|p| code(p) == Some("duplicate_custom_id"))
                .count(),
            3
        );
    }
}
