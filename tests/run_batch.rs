//! `brigade run-batch` end to end, on the real default model, through the
//! built binary: bad lines become error lines, `kill -9` at random points then
//! a rerun gives every `custom_id` exactly once and the same answers as an
//! uninterrupted run, a torn last line is redone, three shards' union equals
//! one run, and the summary is printed.
//!
//! Requests are greedy or seeded, so answers are comparable across runs
//! (`id`, `created`, `request_id` and `cached_tokens` differ by design).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_brigade")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("brigade-run-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cmd(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("run-batch")
        .arg("-i")
        .arg(input)
        .arg("-o")
        .arg(output)
        .args(extra);
    c.stdin(Stdio::null());
    c
}

fn run_ok(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let out = cmd(input, output, extra).output().unwrap();
    assert!(
        out.status.success(),
        "run-batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `n` requests, alternating chat and completions, greedy or seeded.
fn requests(n: usize, max_tokens: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let body = match i % 3 {
            0 => {
                json!({"messages": [{"role": "user", "content": format!("Tell me fact number {i} about the sea.")}], "max_tokens": max_tokens, "temperature": 0})
            }
            1 => {
                json!({"prompt": format!("Item {i}: the quick brown fox"), "max_tokens": max_tokens, "temperature": 0.9, "seed": i})
            }
            _ => {
                json!({"prompt": format!("Once upon a time {i}"), "max_tokens": max_tokens, "n": 2, "temperature": 0.7, "seed": 1000 + i})
            }
        };
        let url = if i % 3 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        s.push_str(
            &json!({"custom_id": format!("req-{i}"), "method": "POST", "url": url, "body": body})
                .to_string(),
        );
        s.push('\n');
    }
    s
}

/// The results file's lines by `custom_id`; panics on a repeated id or an unparsable line.
fn results(path: &Path) -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "results file does not end with a newline"
    );
    let mut m = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}: {line}", i + 1));
        let id = v["custom_id"].as_str().unwrap().to_string();
        assert!(v["id"].as_str().unwrap().starts_with("batch_req_"), "{v}");
        assert!(
            m.insert(id.clone(), v).is_none(),
            "custom_id {id} written twice"
        );
    }
    m
}

/// What must be equal across runs: status, choices, token counts, error code.
fn answer(v: &Value) -> Value {
    let r = &v["response"];
    let b = &r["body"];
    json!({
        "status": r["status_code"],
        "object": b["object"],
        "choices": b["choices"],
        "prompt_tokens": b["usage"]["prompt_tokens"],
        "completion_tokens": b["usage"]["completion_tokens"],
        "error": v["error"]["code"],
    })
}

fn answers(m: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    m.iter().map(|(k, v)| (k.clone(), answer(v))).collect()
}

#[test]
fn bad_lines_are_error_lines_and_the_summary_is_printed() {
    let d = tmp("bad");
    let input = d.join("in.jsonl");
    let lines = [
        r#"{"custom_id":"ok-chat","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"temperature":0}}"#,
        r#"{"custom_id":"ok-cmpl","method":"POST","url":"/v1/completions","body":{"prompt":"Hello","max_tokens":4,"temperature":0}}"#,
        r#"{this is not json"#,
        r#"{"custom_id":"get","method":"GET","url":"/v1/completions","body":{"prompt":"x"}}"#,
        r#"{"custom_id":"emb","method":"POST","url":"/v1/embeddings","body":{"input":"x"}}"#,
        r#"{"custom_id":"temp","method":"POST","url":"/v1/completions","body":{"prompt":"x","temperature":-1}}"#,
        r#"{"custom_id":"field","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}],"bogus_field":1}}"#,
        r#"{"custom_id":"stream","method":"POST","url":"/v1/completions","body":{"prompt":"x","stream":true}}"#,
        r#"{"custom_id":"ok-cmpl","method":"POST","url":"/v1/completions","body":{"prompt":"dup"}}"#,
        r#"{"method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
        r#"{"custom_id":"nobody","method":"POST","url":"/v1/completions"}"#,
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = d.join("out.jsonl");
    let out = run_ok(&input, &output, &["--no-progress"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run-batch summary"), "{stderr}");
    assert!(
        stderr.contains("requests      11 (0 already done, 2 ok, 9 errors)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("invalid_json=1") && stderr.contains("duplicate_custom_id=1"),
        "{stderr}"
    );
    let m = results(&output);
    assert_eq!(m.len(), lines.len());
    let code = |id: &str| m[id]["error"]["code"].as_str().map(str::to_string);
    for id in ["ok-chat", "ok-cmpl"] {
        assert_eq!(m[id]["response"]["status_code"], 200, "{}", m[id]);
        assert!(m[id]["error"].is_null());
        assert_eq!(m[id]["response"]["body"]["usage"]["completion_tokens"], 4);
    }
    assert_eq!(
        m["ok-chat"]["response"]["body"]["object"],
        "chat.completion"
    );
    assert_eq!(
        m["ok-cmpl"]["response"]["body"]["object"],
        "text_completion"
    );
    assert_eq!(code("line-3").as_deref(), Some("invalid_json"));
    assert_eq!(code("get").as_deref(), Some("invalid_method"));
    assert_eq!(code("emb").as_deref(), Some("invalid_url"));
    assert_eq!(code("stream").as_deref(), Some("stream_not_supported"));
    assert_eq!(code("line-9").as_deref(), Some("duplicate_custom_id"));
    assert_eq!(code("line-10").as_deref(), Some("missing_custom_id"));
    assert_eq!(code("nobody").as_deref(), Some("invalid_body"));
    // Lines that never reached an endpoint have no response.
    assert!(m["line-3"]["response"].is_null() && m["stream"]["response"].is_null());
    // The endpoint's own 400s: its status and OpenAI error body, naming the field.
    for (id, field) in [("temp", "temperature"), ("field", "bogus_field")] {
        let r = &m[id]["response"];
        assert_eq!(r["status_code"], 400, "{}", m[id]);
        assert!(
            r["body"]["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{}",
            m[id]
        );
        assert_eq!(m[id]["error"]["code"], "invalid_request_error");
    }
    // A rerun has nothing left to do and writes nothing.
    let before = std::fs::read(&output).unwrap();
    let out = run_ok(&input, &output, &["--no-progress"]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("requests      11 (11 already done, 0 ok, 0 errors)"));
    assert_eq!(std::fs::read(&output).unwrap(), before);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn kill_9_at_random_points_then_rerun_answers_everything_once() {
    let d = tmp("kill");
    let input = d.join("in.jsonl");
    std::fs::write(&input, requests(30, 24)).unwrap();
    let reference = d.join("ref.jsonl");
    let t0 = Instant::now();
    run_ok(&input, &reference, &["--no-progress"]);
    let full = t0.elapsed();
    let want = answers(&results(&reference));
    assert_eq!(want.len(), 30);
    assert!(want.values().all(|a| a["status"] == 200), "{want:?}");

    let output = d.join("out.jsonl");
    // Seeded kill points spread over one uninterrupted run's duration.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut kills = 0;
    for _ in 0..6 {
        // Within the first half of an uninterrupted run (it includes the model load).
        let at = Duration::from_millis(100 + next() % (full.as_millis() as u64 / 2).max(1));
        let mut child = cmd(&input, &output, &["--no-progress"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        } else if kills == 0 {
            // It finished before any kill: start over, so the rerun below resumes a killed run.
            let _ = child.wait();
            std::fs::remove_file(&output).unwrap();
        }
        let _ = child.wait();
    }
    assert!(kills > 0, "no run was killed");
    run_ok(&input, &output, &["--no-progress"]);
    let got = answers(&results(&output));
    assert_eq!(got, want);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_torn_last_line_is_cut_and_redone() {
    let d = tmp("torn");
    let input = d.join("in.jsonl");
    std::fs::write(&input, requests(4, 6)).unwrap();
    let output = d.join("out.jsonl");
    run_ok(&input, &output, &["--no-progress"]);
    let want = answers(&results(&output));
    let text = std::fs::read_to_string(&output).unwrap();
    let last_start = text[..text.len() - 1].rfind('\n').map_or(0, |i| i + 1);
    let torn_id = results(&output)
        .into_iter()
        .find(|(_, v)| text[last_start..].contains(&v["id"].as_str().unwrap().to_string()))
        .unwrap()
        .0;
    // Cut the last line in the middle (no newline), as a crash mid-write would.
    let cut = last_start + (text.len() - last_start) / 2;
    std::fs::write(&output, &text[..cut]).unwrap();
    let out = run_ok(&input, &output, &["--no-progress"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("requests      4 (3 already done, 1 ok, 0 errors)"),
        "{stderr}"
    );
    assert!(stderr.contains("cut a torn last line"), "{stderr}");
    let m = results(&output);
    assert!(m.contains_key(&torn_id));
    assert_eq!(answers(&m), want);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn three_shards_union_equals_one_run() {
    let d = tmp("shard");
    let input = d.join("in.jsonl");
    let mut text = requests(11, 8);
    text.push_str("not json\n"); // line index 11: shard 2
    text.push_str(&json!({"custom_id": "req-0", "method": "POST", "url": "/v1/completions", "body": {"prompt": "dup"}}).to_string());
    text.push('\n'); // index 12: a duplicate of shard 0's first line, found by shard 0
    std::fs::write(&input, text).unwrap();
    let single = d.join("single.jsonl");
    run_ok(&input, &single, &["--no-progress"]);
    let want = answers(&results(&single));
    assert_eq!(want.len(), 13);
    // Three processes at once, as three pods of an Indexed Job would run.
    let children: Vec<_> = (0..3)
        .map(|i| {
            let mut c = cmd(
                &input,
                &d.join(format!("shard{i}.jsonl")),
                &["--no-progress", "--shard", &format!("{i}/3")],
            );
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let children: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for c in &children {
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    }
    let mut union = BTreeMap::new();
    for i in 0..3 {
        let m = results(&d.join(format!("shard{i}.jsonl")));
        for (k, v) in m {
            let line: usize = match k.strip_prefix("req-") {
                Some(n) => n.parse().unwrap(),
                None => k.strip_prefix("line-").unwrap().parse::<usize>().unwrap() - 1,
            };
            assert_eq!(line % 3, i, "{k} in shard {i}");
            assert!(
                union.insert(k.clone(), answer(&v)).is_none(),
                "{k} in two shards"
            );
        }
    }
    assert_eq!(union, want);
    assert_eq!(want["line-12"]["error"], "invalid_json");
    assert_eq!(want["line-13"]["error"], "duplicate_custom_id");
    let _ = std::fs::remove_dir_all(&d);
}

/// POSTs `body` to `http://{addr}{path}` (HTTP/1.1, `Connection: close`); the status and JSON body.
fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

#[test]
fn bodies_are_the_servers_bodies() {
    let d = tmp("same");
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["Red, green and", "One, two,"], "max_tokens": 5, "n": 2, "seed": 5, "temperature": 0.8, "logprobs": 1, "echo": true}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 2, "top_p": 7}),
        ),
    ];
    let mut text = String::new();
    for (i, (url, body)) in bodies.iter().enumerate() {
        text.push_str(
            &json!({"custom_id": format!("r{i}"), "method": "POST", "url": url, "body": body})
                .to_string(),
        );
        text.push('\n');
    }
    let input = d.join("in.jsonl");
    std::fs::write(&input, text).unwrap();
    let output = d.join("out.jsonl");
    run_ok(&input, &output, &["--no-progress"]);
    let m = results(&output);

    let mut server = Command::new(bin())
        .args(["serve", "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = common::wait_listening(&mut server);
    let addr = base.strip_prefix("http://").unwrap_or(&base).to_string();
    for (i, (url, body)) in bodies.iter().enumerate() {
        let (status, mut want) = post(&addr, url, body);
        let mut got = m[&format!("r{i}")]["response"].clone();
        assert_eq!(got["status_code"], status, "r{i}");
        // Ids and timestamps are per request; everything else is the same body.
        for b in [&mut want, &mut got["body"]] {
            if let Some(o) = b.as_object_mut() {
                o.remove("id");
                o.remove("created");
                if let Some(u) = o.get_mut("usage").and_then(Value::as_object_mut) {
                    u.remove("prompt_tokens_details");
                }
            }
        }
        assert_eq!(got["body"], want, "r{i}");
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&d);
}
