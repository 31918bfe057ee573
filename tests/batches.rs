//! The served Batch API (`/v1/files`, `/v1/batches`) end to end, on the real
//! default model, through the built binary: uploads and their limits, a batch
//! round trip with bad lines split into the output and error files, tenant
//! isolation (two API keys), cancel, and `kill -9` of the server mid-batch
//! then a restart on the same `--data-dir`: every `custom_id` answered exactly
//! once, with the answers `brigade run-batch` gives for the same file.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const KEY_A: &str = "key-tenant-a";
const KEY_B: &str = "key-tenant-b";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("brigade-batches-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A config with tenants `a` and `b` and `extra` `[server]` keys.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "[server]\n{extra}\n[[server.tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n[[server.tenants]]\nname = \"b\"\napi_keys = [\"{}\"]\n",
        brigade::server::hash_key(KEY_A),
        brigade::server::hash_key(KEY_B)
    );
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

struct Server {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_brigade"))
            .arg("serve")
            .arg(model)
            .args(args)
            .args(["--port", "0", "--log-format", "json"])
            .env("RUST_LOG", "warn")
            .env_remove("BRIGADE_API_KEY")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let base = common::wait_listening(&mut child);
        Server {
            child,
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder, key: &str) -> (u16, Value, Vec<u8>) {
        let resp = r.bearer_auth(key).send().await.unwrap();
        let st = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap().to_vec();
        (
            st,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            bytes,
        )
    }

    async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        let (st, v, _) = self
            .send(self.http.get(format!("{}{path}", self.base)), key)
            .await;
        (st, v)
    }

    async fn content(&self, id: &str, key: &str) -> (u16, Vec<u8>) {
        let (st, _, b) = self
            .send(
                self.http
                    .get(format!("{}/v1/files/{id}/content", self.base)),
                key,
            )
            .await;
        (st, b)
    }

    async fn post(&self, path: &str, body: &Value, key: &str) -> (u16, Value) {
        let (st, v, _) = self
            .send(
                self.http.post(format!("{}{path}", self.base)).json(body),
                key,
            )
            .await;
        (st, v)
    }

    async fn delete(&self, path: &str, key: &str) -> (u16, Value) {
        let (st, v, _) = self
            .send(self.http.delete(format!("{}{path}", self.base)), key)
            .await;
        (st, v)
    }

    /// `POST /v1/files` with a hand-built multipart body (`fields`: name, file name, bytes).
    async fn upload_fields(
        &self,
        fields: &[(&str, Option<&str>, &[u8])],
        key: &str,
    ) -> (u16, Value) {
        let boundary = "----brigade-test-boundary-7d1c";
        let mut body = Vec::new();
        for (name, filename, data) in fields {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"")
                    .as_bytes(),
            );
            if let Some(f) = filename {
                body.extend_from_slice(
                    format!("; filename=\"{f}\"\r\nContent-Type: application/jsonl").as_bytes(),
                );
            }
            body.extend_from_slice(b"\r\n\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let r = self
            .http
            .post(format!("{}/v1/files", self.base))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        let (st, v, _) = self.send(r, key).await;
        (st, v)
    }

    async fn upload(&self, text: &str, key: &str) -> Value {
        let (st, v) = self
            .upload_fields(
                &[
                    ("purpose", None, b"batch"),
                    ("file", Some("in.jsonl"), text.as_bytes()),
                ],
                key,
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v
    }

    /// Polls batch `id` until `done(batch)` holds; returns it.
    async fn wait_batch(&self, id: &str, key: &str, done: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let (st, b) = self.get(&format!("/v1/batches/{id}"), key).await;
            assert_eq!(st, 200, "{b}");
            if done(&b) {
                return b;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "batch {id} never got there: {b}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(mut self) {
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let st = self.child.wait().unwrap();
        assert_eq!(st.code(), Some(0));
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        let _ = self.child.wait();
    }
}

fn ended(b: &Value) -> bool {
    matches!(
        b["status"].as_str(),
        Some("completed" | "failed" | "cancelled" | "expired")
    )
}

/// Result lines of a file's content, by `custom_id`; panics on a repeated id.
fn lines_by_id(bytes: &[u8]) -> BTreeMap<String, Value> {
    let text = std::str::from_utf8(bytes).unwrap();
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("bad result line {l:?}: {e}"));
        let id = v["custom_id"].as_str().unwrap().to_string();
        assert!(
            out.insert(id.clone(), v).is_none(),
            "custom_id {id} answered twice"
        );
    }
    out
}

/// What must not depend on the run: status, texts and finish reasons.
fn answer(v: &Value) -> Value {
    let body = &v["response"]["body"];
    let choices: Vec<Value> = body["choices"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| {
                    json!([
                        c.get("text").or_else(|| c["message"].get("content")),
                        c["finish_reason"]
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"status": v["response"]["status_code"], "choices": choices, "error": v["error"]})
}

/// `n` greedy or seeded requests to `url`.
fn requests(n: usize, url: &str, max_tokens: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let body = if url == "/v1/chat/completions" {
            json!({"messages": [{"role": "user", "content": format!("Name a colour, number {i}.")}], "max_tokens": max_tokens, "temperature": 0})
        } else {
            json!({"prompt": format!("Item {i}: the quick brown fox"), "max_tokens": max_tokens, "temperature": 0.8, "seed": i})
        };
        s.push_str(
            &json!({"custom_id": format!("req-{i}"), "method": "POST", "url": url, "body": body})
                .to_string(),
        );
        s.push('\n');
    }
    s
}

fn assert_error(st: u16, v: &Value, want: u16, needle: &str) {
    assert_eq!(st, want, "{v}");
    let m = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {v}"));
    assert!(m.contains(needle), "{m:?} does not mention {needle:?}");
    assert!(v["error"]["type"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_limits_tenants_and_the_api_off() {
    let Some(model) = common::model_path() else {
        return;
    };
    let d = tmp("files");
    let cfg = config(&d, "batch_max_file_bytes = 4096\nbatch_max_requests = 5");
    let data = d.join("data");
    let s = Server::start(
        &model,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );

    let text = requests(3, "/v1/completions", 4);
    let f = s.upload(&text, KEY_A).await;
    let id = f["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("file-"), "{f}");
    assert_eq!(
        (
            f["object"].as_str(),
            f["purpose"].as_str(),
            f["filename"].as_str()
        ),
        (Some("file"), Some("batch"), Some("in.jsonl"))
    );
    assert_eq!(f["bytes"].as_u64(), Some(text.len() as u64));
    assert!(f["created_at"].as_u64().unwrap() > 0);

    // Retrieve, content, list: the owner sees it; the other tenant gets 404 and an empty list.
    let (st, got) = s.get(&format!("/v1/files/{id}"), KEY_A).await;
    assert_eq!((st, &got), (200, &f));
    assert_eq!(s.content(&id, KEY_A).await, (200, text.as_bytes().to_vec()));
    let (st, list) = s.get("/v1/files", KEY_A).await;
    assert_eq!(st, 200);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["has_more"], false);
    let (_, list) = s.get("/v1/files?purpose=batch_output", KEY_A).await;
    assert!(list["data"].as_array().unwrap().is_empty());
    let (st, list) = s.get("/v1/files", KEY_B).await;
    assert_eq!(st, 200);
    assert!(list["data"].as_array().unwrap().is_empty(), "{list}");
    let (st, v) = s.get(&format!("/v1/files/{id}"), KEY_B).await;
    assert_error(st, &v, 404, &id);
    assert_eq!(s.content(&id, KEY_B).await.0, 404);
    let (st, v) = s.delete(&format!("/v1/files/{id}"), KEY_B).await;
    assert_error(st, &v, 404, &id);
    let (st, v) = s.post("/v1/batches", &json!({"input_file_id": id, "endpoint": "/v1/completions", "completion_window": "24h"}), KEY_B).await;
    assert_error(st, &v, 404, &id);
    // No key at all: 401.
    assert_eq!(s.get("/v1/files", "wrong-key").await.0, 401);

    // Pages: two more files, newest first, `after` continues.
    let f2 = s.upload(&text, KEY_A).await;
    let f3 = s.upload(&text, KEY_A).await;
    let (_, p1) = s.get("/v1/files?limit=2", KEY_A).await;
    let ids: Vec<&str> = p1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [f3["id"].as_str().unwrap(), f2["id"].as_str().unwrap()]
    );
    assert_eq!(p1["has_more"], true);
    let (_, p2) = s
        .get(
            &format!(
                "/v1/files?limit=2&after={}",
                p1["last_id"].as_str().unwrap()
            ),
            KEY_A,
        )
        .await;
    assert_eq!(p2["data"][0]["id"], f["id"]);
    assert_eq!(p2["has_more"], false);
    let (st, v) = s.get("/v1/files?limit=0", KEY_A).await;
    assert_error(st, &v, 400, "limit");
    let (st, v) = s.get("/v1/files?colour=red", KEY_A).await;
    assert_error(st, &v, 400, "colour");

    // Limits and bad uploads.
    let big = "x".repeat(5000);
    let (st, v) = s
        .upload_fields(
            &[
                ("purpose", None, b"batch"),
                ("file", Some("big.jsonl"), big.as_bytes()),
            ],
            KEY_A,
        )
        .await;
    assert_error(st, &v, 413, "batch_max_file_bytes");
    assert_eq!(v["error"]["code"], "file_too_large");
    let (st, v) = s
        .upload_fields(
            &[
                ("purpose", None, b"fine-tune"),
                ("file", Some("a.jsonl"), text.as_bytes()),
            ],
            KEY_A,
        )
        .await;
    assert_error(st, &v, 400, "fine-tune");
    let (st, v) = s
        .upload_fields(&[("file", Some("a.jsonl"), text.as_bytes())], KEY_A)
        .await;
    assert_error(st, &v, 400, "purpose");
    let (st, v) = s.upload_fields(&[("purpose", None, b"batch")], KEY_A).await;
    assert_error(st, &v, 400, "file");
    let (st, v) = s
        .upload_fields(
            &[
                ("purpose", None, b"batch"),
                ("file", Some("a.jsonl"), text.as_bytes()),
                ("colour", None, b"red"),
            ],
            KEY_A,
        )
        .await;
    assert_error(st, &v, 400, "colour");
    let (st, v, _) = s
        .send(
            s.http
                .post(format!("{}/v1/files", s.base))
                .json(&json!({"purpose": "batch"})),
            KEY_A,
        )
        .await;
    assert_error(st, &v, 415, "multipart/form-data");
    let six = s.upload(&requests(6, "/v1/completions", 4), KEY_A).await;
    let (st, v) = s.post("/v1/batches", &json!({"input_file_id": six["id"], "endpoint": "/v1/completions", "completion_window": "24h"}), KEY_A).await;
    assert_error(st, &v, 400, "batch_max_requests");
    // Bad batch parameters name the field.
    for (body, needle) in [
        (
            json!({"input_file_id": id, "endpoint": "/v1/embeddings", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": id, "endpoint": "/v1/completions", "completion_window": "48h"}),
            "completion_window",
        ),
        (
            json!({"input_file_id": id, "endpoint": "/v1/completions"}),
            "completion_window",
        ),
        (
            json!({"endpoint": "/v1/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": id, "endpoint": "/v1/completions", "completion_window": "24h", "metadata": {"k": 1}}),
            "metadata",
        ),
        (
            json!({"input_file_id": id, "endpoint": "/v1/completions", "completion_window": "24h", "priority": 1}),
            "priority",
        ),
    ] {
        let (st, v) = s.post("/v1/batches", &body, KEY_A).await;
        assert_error(st, &v, 400, needle);
    }
    let (st, v) = s.get("/v1/batches/batch_nope", KEY_A).await;
    assert_error(st, &v, 404, "batch_nope");

    // Delete: gone for good.
    let (st, v) = s.delete(&format!("/v1/files/{id}"), KEY_A).await;
    assert_eq!(
        (st, v),
        (200, json!({"id": id, "object": "file", "deleted": true}))
    );
    assert_eq!(s.get(&format!("/v1/files/{id}"), KEY_A).await.0, 404);
    assert_eq!(s.delete(&format!("/v1/files/{id}"), KEY_A).await.0, 404);
    s.stop();

    // Without a data directory the routes say how to turn the API on.
    let off = Server::start(&model, &["--config", cfg.to_str().unwrap()]);
    let (st, v) = off.get("/v1/files", KEY_A).await;
    assert_error(st, &v, 404, "--data-dir");
    assert_eq!(v["error"]["code"], "batch_api_disabled");
    let (st, v) = off.get("/v1/batches", KEY_A).await;
    assert_error(st, &v, 404, "--data-dir");
    off.stop();
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_round_trip_splits_errors_and_stays_with_its_tenant() {
    let Some(model) = common::model_path() else {
        return;
    };
    let d = tmp("round-trip");
    let cfg = config(&d, "");
    let data = d.join("data");
    let s = Server::start(
        &model,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );

    let mut text = requests(3, "/v1/chat/completions", 6);
    text.push_str("this line is not JSON\n");
    text.push_str(&json!({"custom_id": "bad-temp", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "temperature": -1}}).to_string());
    text.push('\n');
    text.push_str(&json!({"custom_id": "other-url", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 2}}).to_string());
    text.push('\n');
    let f = s.upload(&text, KEY_A).await;
    let (st, b) = s
        .post("/v1/batches", &json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"job": "nightly"}}), KEY_A)
        .await;
    assert_eq!(st, 200, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("batch_"), "{b}");
    assert_eq!(b["object"], "batch");
    assert!(
        matches!(b["status"].as_str(), Some("validating" | "in_progress")),
        "{b}"
    );
    assert_eq!(b["metadata"], json!({"job": "nightly"}));
    assert_eq!(
        b["expires_at"].as_u64().unwrap(),
        b["created_at"].as_u64().unwrap() + 86400
    );

    // The other tenant: 404 on retrieve and cancel, nothing listed.
    let (st, v) = s.get(&format!("/v1/batches/{id}"), KEY_B).await;
    assert_error(st, &v, 404, &id);
    let (st, v) = s
        .post(&format!("/v1/batches/{id}/cancel"), &json!({}), KEY_B)
        .await;
    assert_error(st, &v, 404, &id);
    let (_, list) = s.get("/v1/batches", KEY_B).await;
    assert!(list["data"].as_array().unwrap().is_empty(), "{list}");

    let b = s.wait_batch(&id, KEY_A, ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 6, "completed": 3, "failed": 3}),
        "{b}"
    );
    for k in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(b[k].as_u64().is_some(), "{k} not set: {b}");
    }
    assert!(
        b["cancelled_at"].is_null() && b["failed_at"].is_null() && b["errors"].is_null(),
        "{b}"
    );
    let out_id = b["output_file_id"].as_str().unwrap();
    let err_id = b["error_file_id"].as_str().unwrap();
    let (st, out) = s.content(out_id, KEY_A).await;
    assert_eq!(st, 200);
    let out = lines_by_id(&out);
    assert_eq!(out.keys().collect::<Vec<_>>(), ["req-0", "req-1", "req-2"]);
    for v in out.values() {
        assert_eq!(v["response"]["status_code"], 200, "{v}");
        assert!(v["error"].is_null());
        assert_eq!(v["response"]["body"]["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("batch_req_"));
    }
    let (_, errs) = s.content(err_id, KEY_A).await;
    let errs = lines_by_id(&errs);
    assert_eq!(
        errs.keys().collect::<Vec<_>>(),
        ["bad-temp", "line-4", "other-url"]
    );
    assert_eq!(errs["line-4"]["error"]["code"], "invalid_json");
    assert!(errs["line-4"]["response"].is_null());
    assert_eq!(errs["bad-temp"]["response"]["status_code"], 400);
    assert_eq!(errs["other-url"]["error"]["code"], "mismatched_endpoint");
    // Result files are the tenant's files (purpose batch_output); not the other's.
    let (_, of) = s.get(&format!("/v1/files/{out_id}"), KEY_A).await;
    assert_eq!(of["purpose"], "batch_output");
    assert_eq!(s.content(out_id, KEY_B).await.0, 404);
    let (_, list) = s.get("/v1/batches", KEY_A).await;
    assert_eq!(list["data"][0]["id"], id.as_str());
    // A finished batch cannot be cancelled.
    let (st, v) = s
        .post(&format!("/v1/batches/{id}/cancel"), &json!({}), KEY_A)
        .await;
    assert_error(st, &v, 400, "completed");

    // Cancel: stops taking requests; what finished is kept, each id at most once.
    let f = s.upload(&requests(40, "/v1/completions", 24), KEY_B).await;
    let (_, b) = s.post("/v1/batches", &json!({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"}), KEY_B).await;
    let id = b["id"].as_str().unwrap().to_string();
    let (st, c) = s
        .post(&format!("/v1/batches/{id}/cancel"), &json!({}), KEY_B)
        .await;
    assert_eq!(st, 200, "{c}");
    assert!(
        matches!(c["status"].as_str(), Some("cancelling" | "cancelled")),
        "{c}"
    );
    assert!(c["cancelling_at"].as_u64().is_some(), "{c}");
    let b = s.wait_batch(&id, KEY_B, ended).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    assert!(
        b["cancelled_at"].as_u64().is_some() && b["completed_at"].is_null(),
        "{b}"
    );
    let done = b["request_counts"]["completed"].as_u64().unwrap();
    assert_eq!(b["request_counts"]["total"], 40);
    match b["output_file_id"].as_str() {
        Some(out) => assert_eq!(
            lines_by_id(&s.content(out, KEY_B).await.1).len() as u64,
            done
        ),
        None => assert_eq!(done, 0),
    }
    s.stop();
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_batch_resumes_and_answers_each_id_once() {
    let Some(model) = common::model_path() else {
        return;
    };
    let d = tmp("kill9");
    // Two requests at a time, so a kill lands between answers.
    let cfg = config(&d, "batch_max_in_flight = 2");
    let data = d.join("data");
    let n = 24;
    let text = requests(n, "/v1/completions", 16);
    // The reference: `brigade run-batch` on the same file (same engine, same answers).
    let input = d.join("in.jsonl");
    std::fs::write(&input, &text).unwrap();
    let reference = d.join("ref.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["run-batch", "--no-progress", "--model"])
        .arg(&model)
        .arg("-i")
        .arg(&input)
        .arg("-o")
        .arg(&reference)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: BTreeMap<String, Value> = lines_by_id(&std::fs::read(&reference).unwrap())
        .iter()
        .map(|(k, v)| (k.clone(), answer(v)))
        .collect();
    assert_eq!(want.len(), n);

    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut killed_mid_batch = false;
    let mut id = String::new();
    for _attempt in 0..3 {
        let s = Server::start(&model, &args);
        let f = s.upload(&text, KEY_A).await;
        let (st, b) = s.post("/v1/batches", &json!({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"}), KEY_A).await;
        assert_eq!(st, 200, "{b}");
        id = b["id"].as_str().unwrap().to_string();
        // Kill as soon as some, not all, requests are answered.
        let b = s
            .wait_batch(&id, KEY_A, |b| {
                ended(b) || b["request_counts"]["completed"].as_u64().unwrap_or(0) >= 2
            })
            .await;
        s.kill9();
        if !ended(&b) {
            killed_mid_batch = true;
            break;
        }
        // It finished first: start over with a fresh batch.
    }
    assert!(killed_mid_batch, "every batch finished before the kill");
    let s = Server::start(&model, &args);
    let (_, before) = s.get(&format!("/v1/batches/{id}"), KEY_A).await;
    assert!(
        matches!(
            before["status"].as_str(),
            Some("in_progress" | "finalizing" | "completed")
        ),
        "{before}"
    );
    let b = s.wait_batch(&id, KEY_A, ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": n, "completed": n, "failed": 0}),
        "{b}"
    );
    assert!(b["error_file_id"].is_null(), "{b}");
    let (_, bytes) = s
        .content(b["output_file_id"].as_str().unwrap(), KEY_A)
        .await;
    let got: BTreeMap<String, Value> = lines_by_id(&bytes)
        .iter()
        .map(|(k, v)| (k.clone(), answer(v)))
        .collect();
    assert_eq!(got, want);
    s.stop();
    let _ = std::fs::remove_dir_all(&d);
}
