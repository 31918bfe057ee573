//! The HTTP server end to end: a real server on a loopback port (in-process on
//! a tokio runtime, or the built binary for SIGTERM), driven with `reqwest`.
//! Most tests use the tiny random model; the greedy-equivalence test uses the
//! real SmolLM2 model and compares with `brigade generate --json`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brigade::config::{Config, Count};
use brigade::engine::{Engine, EngineHandle};
use brigade::model::Model;
use brigade::server::{hash_key, serve_with, ServerConfig};
use brigade::testing::TinyLlamaSpec;
use brigade::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn engine_config(kv_tokens: usize) -> Config {
    let mut c = Config::default();
    c.runtime.workers = Count::N(1);
    c.runtime.threads_per_worker = Count::N(1);
    c.kv_cache.capacity_tokens = kv_tokens;
    c.validate().unwrap();
    c
}

fn tiny(context_length: u32) -> (Arc<Model>, Arc<Tokenizer>) {
    common::tiny_model(&TinyLlamaSpec {
        context_length,
        ..TinyLlamaSpec::default()
    })
}

struct Server {
    base: String,
    engine: EngineHandle,
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    task:
        std::sync::Mutex<Option<tokio::task::JoinHandle<Result<(), brigade::server::ServeError>>>>,
    client: reqwest::Client,
}

impl Server {
    async fn start(
        model: (Arc<Model>, Arc<Tokenizer>),
        econf: Config,
        server_toml: &str,
    ) -> Server {
        let engine = Engine::start(model.0, model.1, econf).unwrap();
        let cfg = ServerConfig::from_toml_str(server_toml).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(engine.clone(), cfg, listener, async move {
            let _ = rx.await;
        }));
        Server {
            base,
            engine,
            stop: std::sync::Mutex::new(Some(tx)),
            task: std::sync::Mutex::new(Some(task)),
            client: reqwest::Client::new(),
        }
    }

    async fn tiny(server_toml: &str) -> Server {
        Self::start(tiny(256), engine_config(8192), server_toml).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, v)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// SSE stream: the parsed `data:` chunks (without `[DONE]`) and whether `[DONE]` ended it.
    async fn stream(&self, path: &str, key: Option<&str>, body: &Value) -> (Vec<Value>, bool) {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.unwrap();
        let mut chunks = Vec::new();
        let mut done = false;
        for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
            let data = frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad SSE frame {frame:?}"));
            assert!(!done, "data after [DONE]");
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(data).unwrap());
            }
        }
        (chunks, done)
    }

    /// Triggers the graceful shutdown (as SIGTERM would).
    fn signal_shutdown(&self) {
        if let Some(s) = self.stop.lock().unwrap().take() {
            let _ = s.send(());
        }
    }

    async fn shutdown(&self) {
        self.signal_shutdown();
        let task = self.task.lock().unwrap().take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Waits (polling) until `f` holds; panics after 60 s (a hang, not a timing assertion).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn pool_whole(e: &EngineHandle) {
    until("engine idle with every KV block free", || {
        let s = e.stats();
        s.running == 0 && s.waiting == 0 && s.kv_blocks_free == s.kv_blocks_total
    })
    .await;
}

fn stream_text(chunks: &[Value], chat: bool) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for c in chunks {
        for ch in c["choices"].as_array().unwrap() {
            let piece = if chat {
                ch["delta"]["content"].as_str()
            } else {
                ch["text"].as_str()
            };
            text.push_str(piece.unwrap_or(""));
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}

// ---------------------------------------------------------------- API shapes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_chat_streaming_and_not() {
    let s = Server::tiny("").await;
    let (st, body) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["object"], "list");
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(name, "tiny-llama-test");

    // Completions: non-streaming and streaming give the same greedy text.
    let req = json!({"model": name, "prompt": "the cat", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (st, h, v) = s.post("/v1/completions", None, &req).await;
    assert_eq!(st, 200, "{v}");
    assert!(h.contains_key("x-request-id"));
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        prompt_tokens + 12
    );
    let text = c["text"].as_str().unwrap().to_string();

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = s.stream("/v1/completions", None, &sreq).await;
    assert!(done);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 12);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null() && c["object"] == "text_completion"));
    assert_eq!(
        stream_text(&chunks, false),
        (text.clone(), Some("length".into()))
    );

    // Token-id prompts and several prompts: choices indexed prompt-major.
    let ids = s
        .engine
        .tokenizer()
        .encode_with_bos("the cat", true)
        .unwrap();
    let (st, _, v) = s
        .post(
            "/v1/completions",
            None,
            &json!({"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), text);
    let (st, _, v) = s
        .post(
            "/v1/completions",
            None,
            &json!({"prompt": ["the cat", "a dog"], "n": 2, "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let ch = v["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 4);
    assert_eq!(
        (0..4)
            .map(|i| ch[i]["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(ch[0]["text"], ch[1]["text"], "greedy n=2 completions agree");

    // Chat.
    let creq = json!({"model": name, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello there"}]}], "max_completion_tokens": 10, "temperature": 0, "seed": 7});
    let (st, _, v) = s.post("/v1/chat/completions", None, &creq).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let chat_text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let finish = v["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(finish == "stop" || finish == "length");
    let mut screq = creq.clone();
    screq["stream"] = json!(true);
    let (chunks, done) = s.stream("/v1/chat/completions", None, &screq).await;
    assert!(done);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c.get("usage").is_none()));
    assert_eq!(stream_text(&chunks, true), (chat_text, Some(finish)));

    // A client-supplied request id comes back.
    let resp = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let (st, _) = s.get("/ready").await;
    assert_eq!(st, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_and_chat_logprobs() {
    let s = Server::tiny("").await;
    let prompt = "the cat sat";
    let ids = s.engine.tokenizer().encode_with_bos(prompt, true).unwrap();
    // max_tokens 0 + echo + logprobs: scores the prompt only.
    let (st, _, v) = s
        .post(
            "/v1/completions",
            None,
            &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["text"], prompt);
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), ids.len());
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    for i in 1..ids.len() {
        let x = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(x <= 0.0, "{x}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!((2..=3).contains(&top.len()), "{top:?}");
    }
    assert_eq!(v["usage"]["completion_tokens"], 0);

    // Echo + logprobs + generation: prompt entries then generated ones.
    let (st, _, v) = s.post("/v1/completions", None, &json!({"prompt": prompt, "max_tokens": 4, "echo": true, "logprobs": 1, "temperature": 0, "ignore_eos": true})).await;
    assert_eq!(st, 200, "{v}");
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with(prompt));
    assert_eq!(
        c["logprobs"]["tokens"].as_array().unwrap().len(),
        ids.len() + 4
    );
    let offs: Vec<u64> = c["logprobs"]["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(offs.windows(2).all(|w| w[0] <= w[1]));

    // Streaming echo: the first chunk is the prompt.
    let (chunks, _) = s.stream("/v1/completions", None, &json!({"prompt": prompt, "max_tokens": 3, "echo": true, "stream": true, "temperature": 0})).await;
    assert_eq!(chunks[0]["choices"][0]["text"], prompt);

    // Chat logprobs.
    let (st, _, v) = s
        .post("/v1/chat/completions", None, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "temperature": 0, "ignore_eos": true}))
        .await;
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for e in content {
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        assert!(e["bytes"].is_array());
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize() {
    let s = Server::tiny("").await;
    let tok = s.engine.tokenizer().clone();
    let (st, _, v) = s
        .post(
            "/tokenize",
            None,
            &json!({"prompt": "the cat sat", "return_token_strs": true}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let want = tok.encode_with_bos("the cat sat", true).unwrap();
    assert_eq!(v["tokens"], json!(want));
    assert_eq!(v["count"], want.len());
    assert_eq!(v["max_model_len"], 256);
    assert_eq!(v["token_strs"].as_array().unwrap().len(), want.len());
    let (_, _, v2) = s
        .post(
            "/tokenize",
            None,
            &json!({"prompt": "the cat sat", "add_special_tokens": false}),
        )
        .await;
    assert_eq!(
        v2["tokens"],
        json!(tok.encode("the cat sat", true).unwrap())
    );
    let (st, _, v) = s
        .post(
            "/tokenize",
            None,
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let rendered = tok
        .chat_template()
        .unwrap()
        .render(&[brigade::tokenizer::ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(v["tokens"], json!(tok.encode(&rendered, true).unwrap()));
    let (st, _, v) = s
        .post(
            "/detokenize",
            None,
            &json!({"tokens": tok.encode("the cat sat", true).unwrap()}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["prompt"], "the cat sat");
    let (st, _, v) = s
        .post("/detokenize", None, &json!({"tokens": [99999999]}))
        .await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("tokens")));
    s.shutdown().await;
}

// ---------------------------------------------------------------- errors

fn assert_error(st: u16, v: &Value, want: u16, param: Option<&str>) {
    assert_eq!(st, want, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status() {
    let toml = format!(
        "max_body_bytes = 2048\n[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n[[tenants]]\nname = \"b\"\napi_keys = [\"{}\"]\n",
        hash_key("key-a"),
        hash_key("key-b")
    );
    let s = Server::tiny(&toml).await;
    let ok = json!({"prompt": "the cat", "max_tokens": 2});
    // 401: missing and unknown keys.
    let (st, _, v) = s.post("/v1/completions", None, &ok).await;
    assert_error(st, &v, 401, None);
    let (st, _, v) = s.post("/v1/completions", Some("nope"), &ok).await;
    assert_error(st, &v, 401, None);
    let (st, _, v) = s.post("/v1/completions", Some("key-a"), &ok).await;
    assert_eq!(st, 200, "{v}");
    // 400s name the field.
    for (body, param) in [
        (json!({"prompt": "x", "max_tokens": "many"}), "max_tokens"),
        (json!({"prompt": "x", "temperature": -1}), "temperature"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "logprobs": 50}), "logprobs"),
        (json!({"prompt": "x", "top_p": 2}), "top_p"),
        (json!({"prompt": "x", "max_tokens": 100000}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "stop": [""]}), "stop"),
        (json!({"prompt": [999999]}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (
            json!({"prompt": "x", "logit_bias": {"abc": 1}}),
            "logit_bias",
        ),
    ] {
        let (st, _, v) = s.post("/v1/completions", Some("key-a"), &body).await;
        assert_error(st, &v, 400, Some(param));
    }
    let (st, _, v) = s
        .post(
            "/v1/chat/completions",
            Some("key-a"),
            &json!({"messages": []}),
        )
        .await;
    assert_error(st, &v, 400, Some("messages"));
    let (st, _, v) = s
        .post(
            "/v1/chat/completions",
            Some("key-a"),
            &json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        )
        .await;
    assert_error(st, &v, 400, Some("top_logprobs"));
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("key-a")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // 404: unknown model and route.
    let (st, _, v) = s
        .post(
            "/v1/completions",
            Some("key-a"),
            &json!({"model": "gpt-4", "prompt": "x"}),
        )
        .await;
    assert_error(st, &v, 404, Some("model"));
    let (st, body) = s.get("/v2/nothing").await;
    assert_error(st, &serde_json::from_str(&body).unwrap(), 404, None);
    // 413: body too large, declared or streamed.
    let big = json!({"prompt": "x".repeat(5000)});
    let (st, _, v) = s.post("/v1/completions", Some("key-a"), &big).await;
    assert_error(st, &v, 413, None);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"{\"prompt\": \"".to_vec()),
        Ok(vec![b'y'; 4000]),
        Ok(b"\"}".to_vec()),
    ];
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("key-a")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // The server is still healthy after all of that.
    let (st, _, v) = s.post("/v1/completions", Some("key-b"), &ok).await;
    assert_eq!(st, 200, "{v}");
    // 429 and 503 have their own tests (queue bound; draining); 500 is covered by the
    // status-table unit test in src/server/error.rs (no request can provoke one).
    let (_, metrics) = s.get("/metrics").await;
    assert!(
        metrics.contains("brigade:request_errors_total{error_type=\"authentication_error\""),
        "{metrics}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_over_queue_bound_gets_429_others_unaffected() {
    let toml = format!(
        "max_running = 1\n[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\nmax_queued = 3\n[[tenants]]\nname = \"b\"\napi_keys = [\"{}\"]\n",
        hash_key("key-a"),
        hash_key("key-b")
    );
    let s = Arc::new(Server::start(tiny(2048), engine_config(16384), &toml).await);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.post(
                "/v1/completions",
                Some("key-a"),
                &json!({"prompt": "the cat", "max_tokens": 200, "ignore_eos": true}),
            )
            .await
        }));
    }
    // While A is over its bound, B is served.
    let (st, _, v) = s
        .post(
            "/v1/completions",
            Some("key-b"),
            &json!({"prompt": "a dog", "max_tokens": 4}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let mut n429 = 0;
    let mut n200 = 0;
    for t in tasks {
        let (st, h, v) = t.await.unwrap();
        match st {
            200 => n200 += 1,
            429 => {
                n429 += 1;
                assert_error(st, &v, 429, None);
                assert!(h.contains_key("retry-after"));
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    // At most 1 running + 3 queued of A's 12 can be accepted at once.
    assert!(n429 >= 1 && n200 >= 1, "200: {n200}, 429: {n429}");
    pool_whole(&s.engine).await;
    s.shutdown().await;
}

// ---------------------------------------------------------------- admission limits

/// Issue 10, observation 1: a request of more sequences than can ever run at once
/// (prompts × `n` over `max_running`, or over the tenant's `max_concurrent`) used to
/// take the slots it could get and wait forever for the rest, starving its tenant.
/// It is refused at once with 400 naming `n` and the limit; a request that fits
/// exactly still runs, and the tenant is served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_at_once_and_block_nothing() {
    let toml = format!(
        "[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n[[tenants]]\nname = \"b\"\napi_keys = [\"{}\"]\nmax_concurrent = 8\n",
        hash_key("key-a"),
        hash_key("key-b")
    );
    let s = Server::tiny(&toml).await; // max_running = runtime.max_seqs = 64
    let bound = Duration::from_secs(60); // a hang, not a timing assertion
    let post = |key: &'static str, body: Value| {
        let s = &s;
        async move {
            tokio::time::timeout(bound, s.post("/v1/completions", Some(key), &body))
                .await
                .expect("the request hung")
        }
    };
    let small = json!({"prompt": "the cat", "max_tokens": 4});
    // 5 prompts × n=16 = 80 sequences > max_running 64.
    let (st, _, v) = post(
        "key-a",
        json!({"prompt": ["a", "b", "c", "d", "e"], "n": 16, "max_tokens": 4}),
    )
    .await;
    assert_error(st, &v, 400, Some("n"));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("80") && msg.contains("max_running") && msg.contains("64"),
        "{msg}"
    );
    let (st, _, v) = post("key-a", small.clone()).await;
    assert_eq!(st, 200, "{v}");
    // Tenant b: 2 prompts × n=8 = 16 > its max_concurrent 8.
    let (st, _, v) = post(
        "key-b",
        json!({"prompt": ["a", "b"], "n": 8, "max_tokens": 4}),
    )
    .await;
    assert_error(st, &v, 400, Some("n"));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("16") && msg.contains("max_concurrent") && msg.contains('8'),
        "{msg}"
    );
    let (st, _, v) = post("key-b", small.clone()).await;
    assert_eq!(st, 200, "{v}");
    // Exactly at the limits: served whole.
    let (st, _, v) = post(
        "key-b",
        json!({"prompt": "x", "n": 8, "max_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 8);
    let (st, _, v) = post(
        "key-a",
        json!({"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 64);
    assert_eq!(v["usage"]["completion_tokens"], 256);
    pool_whole(&s.engine).await;
    s.shutdown().await;
}

/// Issue 10, observation 7: `tokens_per_minute` was checked only for debt, so eight
/// requests arriving together all passed and 512 tokens went through a 200/min
/// budget. Each request now reserves prompt + `n` × `max_tokens` at admission
/// (unused tokens are refunded at the end), so what is served stays within the
/// budget plus its refill; a request larger than the whole budget is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_is_never_overshot() {
    let toml = format!(
        "[[tenants]]\nname = \"t\"\napi_keys = [\"{}\"]\ntokens_per_minute = 200\n",
        hash_key("key-t")
    );
    let s = Arc::new(Server::tiny(&toml).await);
    let t0 = Instant::now();
    let body = json!({"prompt": "the cat", "max_tokens": 60, "ignore_eos": true});
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, body) = (s.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            s.post("/v1/completions", Some("key-t"), &body).await
        }));
    }
    let (mut served, mut n200, mut n429) = (0u64, 0, 0);
    for t in tasks {
        let (st, h, v) = t.await.unwrap();
        match st {
            200 => {
                n200 += 1;
                served += v["usage"]["total_tokens"].as_u64().unwrap();
            }
            429 => {
                n429 += 1;
                assert_error(st, &v, 429, None);
                assert!(h.contains_key("retry-after"));
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    // The budget refills at 200/60 tokens per second while the test runs.
    let allowed = 200.0 + t0.elapsed().as_secs_f64() * 200.0 / 60.0;
    assert!(
        (served as f64) <= allowed,
        "{served} tokens served through a 200/min budget ({n200} × 200, {n429} × 429)"
    );
    assert!(n200 >= 1 && n429 >= 1, "200: {n200}, 429: {n429}");
    // More than the whole budget can never be admitted.
    let (st, _, v) = s
        .post(
            "/v1/completions",
            Some("key-t"),
            &json!({"prompt": "x", "max_tokens": 250}),
        )
        .await;
    assert_error(st, &v, 400, Some("max_tokens"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens_per_minute"),
        "{v}"
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------- request fields

fn with(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// Issue 10, observation 5: parameters that change what is generated but are
/// not implemented (structured output, tools, other servers' samplers) used to be
/// accepted and ignored, giving 200 and output of the wrong shape. They are now a
/// 400 naming the field, as are unknown fields (OpenAI's "Unrecognized request
/// argument"); bookkeeping fields and no-op values are still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_parameters_are_refused_and_no_ops_accepted() {
    let s = Server::tiny("").await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let completion = json!({"prompt": "the cat", "max_tokens": 2});
    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    // Structured output is honoured now (tests/structured.rs); only other
    // engines' backends are refused.
    let refused_on_both = [
        json!({"guided_decoding_backend": "xgrammar", "guided_json": schema}),
        json!({"best_of": 4}),
        json!({"prediction": {"type": "content", "content": "x"}}),
        json!({"audio": {"voice": "alloy", "format": "wav"}}),
        json!({"modalities": ["text", "audio"]}),
        json!({"reasoning_effort": "low"}),
        json!({"top_a": 0.5}),
        json!({"mirostat": 2}),
        json!({"typical_p": 0.9}),
        json!({"tfs_z": 0.5}),
        json!({"dynatemp_range": 0.5}),
        json!({"n_probs": 3}),
        json!({"prompt_logprobs": 2}),
        json!({"made_up_field": 1}),
    ];
    let refused_on_chat = [
        json!({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}),
        json!({"tool_choice": "required"}),
        json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}),
        json!({"functions": [{"name": "f", "parameters": {}}]}),
        json!({"function_call": {"name": "f"}}),
        json!({"echo": true}),
        json!({"suffix": "x"}),
    ];
    let cases = refused_on_both
        .iter()
        .flat_map(|e| {
            [
                ("/v1/chat/completions", with(chat.clone(), e)),
                ("/v1/completions", with(completion.clone(), e)),
            ]
        })
        .chain(
            refused_on_chat
                .iter()
                .map(|e| ("/v1/chat/completions", with(chat.clone(), e))),
        );
    for (path, body) in cases {
        let (st, _, v) = s.post(path, None, &body).await;
        let field = body
            .as_object()
            .unwrap()
            .keys()
            .find(|k| !["messages", "prompt", "max_tokens"].contains(&k.as_str()))
            .unwrap()
            .clone();
        assert_error(st, &v, 400, Some(&field));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&field), "{path} {body}: {msg}");
        if field == "made_up_field" || (field == "suffix" && path.contains("chat")) {
            assert!(
                msg.contains("Unrecognized request argument supplied"),
                "{msg}"
            );
        }
    }
    let (st, _, v) = s
        .post(
            "/tokenize",
            None,
            &json!({"prompt": "x", "tools": [{"type": "function"}]}),
        )
        .await;
    assert_error(st, &v, 400, Some("tools"));
    // Message fields the template would drop, the legacy `function` role, and
    // malformed tool-calling turns (well-formed ones reach the template: tests/tools.rs).
    let call = json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]);
    for (messages, param) in [
        (
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": call}]),
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            json!([{"role": "tool", "content": "42"}]),
            "messages[0].tool_call_id",
        ),
        (
            json!([{"role": "function", "name": "f", "content": "42"}]),
            "messages[0].role",
        ),
        (
            json!([{"role": "user", "content": "hi", "function_call": {"name": "f"}}]),
            "messages[0].function_call",
        ),
    ] {
        let (st, _, v) = s
            .post(
                "/v1/chat/completions",
                None,
                &json!({"messages": messages, "max_tokens": 2}),
            )
            .await;
        assert_error(st, &v, 400, Some(param));
    }
    let sdk_turn = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "refusal": null, "tool_calls": [], "audio": null}, {"role": "user", "content": "more"}]);
    let (st, _, v) = s
        .post(
            "/v1/chat/completions",
            None,
            &json!({"messages": sdk_turn, "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // Bookkeeping fields and no-op values of unsupported ones are accepted.
    let chat_ok = json!({
        "user": "u-1", "metadata": {"k": "v"}, "store": false, "service_tier": "auto", "parallel_tool_calls": true,
        "stream_options": null, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
        "functions": null, "modalities": ["text"], "typical_p": 1.0, "mirostat": 0, "guided_json": null,
    });
    let (st, _, v) = s
        .post("/v1/chat/completions", None, &with(chat.clone(), &chat_ok))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, _, v) = s
        .post(
            "/v1/chat/completions",
            None,
            &with(chat.clone(), &json!({"tool_choice": "auto"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for extra in [
        json!({"best_of": 1}),
        json!({"n": 2, "best_of": 2}),
        json!({"user": "u", "response_format": {"type": "text"}}),
    ] {
        let (st, _, v) = s
            .post("/v1/completions", None, &with(completion.clone(), &extra))
            .await;
        assert_eq!(st, 200, "{extra}: {v}");
    }
    pool_whole(&s.engine).await;
    s.shutdown().await;
}

/// Issue 10, observations 5 and 7: `max_tokens` = 10^9 was refused with the
/// context-length message while u64::MAX overflowed the check and was accepted.
/// Any count past the context now gets that same 400, and negative counts a 400
/// naming the field; nothing overflows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_negative_counts_follow_one_rule() {
    let s = Server::tiny("").await;
    let raw = |path: &'static str, body: String| {
        let s = &s;
        async move {
            let resp = s
                .client
                .post(s.url(path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let st = resp.status().as_u16();
            (st, resp.json::<Value>().await.unwrap())
        }
    };
    let huge = [
        "1000000000",
        "18446744073709551615",
        "18446744073709551616",
        "100000000000000000000000000000",
        "1e30",
    ];
    for h in huge {
        for (path, field, body) in [
            (
                "/v1/completions",
                "max_tokens",
                format!(r#"{{"prompt": "the cat", "max_tokens": {h}}}"#),
            ),
            (
                "/v1/chat/completions",
                "max_tokens",
                format!(
                    r#"{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": {h}}}"#
                ),
            ),
            (
                "/v1/chat/completions",
                "max_completion_tokens",
                format!(
                    r#"{{"messages": [{{"role": "user", "content": "hi"}}], "max_completion_tokens": {h}}}"#
                ),
            ),
        ] {
            let (st, v) = raw(path, body.clone()).await;
            assert_error(st, &v, 400, Some(field));
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(
                msg.starts_with("this model's maximum context length is 256 tokens"),
                "{body}: {msg}"
            );
        }
        for (field, body) in [
            (
                "min_tokens",
                format!(r#"{{"prompt": "x", "min_tokens": {h}}}"#),
            ),
            ("n", format!(r#"{{"prompt": "x", "n": {h}}}"#)),
            ("logprobs", format!(r#"{{"prompt": "x", "logprobs": {h}}}"#)),
        ] {
            let (st, v) = raw("/v1/completions", body.clone()).await;
            assert_error(st, &v, 400, Some(field));
        }
        let body = format!(
            r#"{{"messages": [{{"role": "user", "content": "hi"}}], "logprobs": true, "top_logprobs": {h}}}"#
        );
        let (st, v) = raw("/v1/chat/completions", body).await;
        assert_error(st, &v, 400, Some("top_logprobs"));
    }
    for field in ["max_tokens", "min_tokens", "n", "logprobs"] {
        let (st, _, v) = s
            .post("/v1/completions", None, &json!({"prompt": "x", field: -1}))
            .await;
        assert_error(st, &v, 400, Some(field));
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("non-negative"),
            "{v}"
        );
    }
    for field in ["max_tokens", "max_completion_tokens", "top_logprobs"] {
        let body =
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, field: -5});
        let (st, _, v) = s.post("/v1/chat/completions", None, &body).await;
        assert_error(st, &v, 400, Some(field));
    }
    let (st, _, v) = s
        .post(
            "/v1/completions",
            None,
            &json!({"prompt": "the cat", "max_tokens": 4}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    s.shutdown().await;
}

// ---------------------------------------------------------------- cancellation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_frees_the_blocks() {
    let s = Server::start(tiny(4096), engine_config(16384), "").await;
    let max_tokens = 4000;
    let body =
        json!({"prompt": "the cat", "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
    let before = s.engine.stats().decode_tokens;
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    let mut got = 0;
    while got < 3 {
        got += stream.next().await.unwrap().unwrap().len().min(1);
    }
    assert_eq!(s.engine.stats().running, 1);
    drop(stream); // client goes away
    pool_whole(&s.engine).await;
    let decoded = s.engine.stats().decode_tokens - before;
    assert!(
        decoded < max_tokens as u64,
        "the request ran to the end ({decoded} tokens) instead of being aborted"
    );

    // Non-streaming: close the socket while the request runs.
    use tokio::io::AsyncWriteExt;
    let before = s.engine.stats().decode_tokens;
    let payload =
        json!({"prompt": "a dog", "max_tokens": max_tokens, "ignore_eos": true}).to_string();
    let mut sock = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let req = format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}", payload.len());
    sock.write_all(req.as_bytes()).await.unwrap();
    let e = s.engine.clone();
    until("the request to run", || e.stats().running == 1).await;
    drop(sock);
    pool_whole(&s.engine).await;
    let decoded = s.engine.stats().decode_tokens - before;
    assert!(
        decoded < max_tokens as u64,
        "non-streaming request was not aborted ({decoded} tokens)"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_aborts_with_finish_reason_abort() {
    let s = Server::start(tiny(4096), engine_config(16384), "shutdown_timeout_s = 0.0").await;
    let s = Arc::new(s);
    let s2 = s.clone();
    let long = tokio::spawn(async move {
        s2.post(
            "/v1/completions",
            None,
            &json!({"prompt": "the cat", "max_tokens": 4000, "ignore_eos": true}),
        )
        .await
    });
    let e = s.engine.clone();
    until("the request to run", || e.stats().decode_tokens > 0).await;
    s.signal_shutdown();
    let (st, _, v) = long.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "abort", "{v}");
    s.shutdown().await;
}

/// SIGTERM to the real binary: readiness and new requests get 503, the in-flight
/// request completes normally, and the process exits 0.
#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    brigade::testing::write_tiny_llama(
        &TinyLlamaSpec {
            context_length: 4096,
            ..TinyLlamaSpec::default()
        },
        &model,
    )
    .unwrap();
    let cfg = dir.path().join("cfg.toml");
    std::fs::write(&cfg, "[runtime]\nworkers = 1\nthreads_per_worker = 1\n[kv_cache]\ncapacity_tokens = 16384\n[server]\nport = 0\nshutdown_timeout_s = 120\n").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--model")
        .arg(&model)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = common::wait_listening(&mut child);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = reqwest::Client::new();
        let body =
            json!({"prompt": "the cat", "max_tokens": 3000, "ignore_eos": true, "stream": true});
        let resp = client
            .post(format!("{base}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        use futures_util::StreamExt;
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        buf.extend_from_slice(&stream.next().await.unwrap().unwrap());
        // A kept-alive connection opened before the drain, for the probes.
        let r = client.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // SIGTERM while the request is running.
        let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let t0 = Instant::now();
        loop {
            // A kept-alive connection may be closed by the drain just as a probe
            // is sent on it (as with any server): that probe is retried.
            let r = client.get(format!("{base}/ready")).send().await;
            if let Some(r) = r.as_ref().ok().filter(|r| r.status() == 503) {
                // Answers during the drain close their connection, so the
                // next request below cannot land on one the drain closes.
                assert_eq!(r.headers()["connection"], "close");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "ready never turned 503"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["connection"], "close");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "service_unavailable_error");
        while let Some(c) = stream.next().await {
            buf.extend_from_slice(&c.unwrap());
        }
        let text = String::from_utf8(buf).unwrap();
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "{}",
            &text[text.len().saturating_sub(300)..]
        );
        assert!(text.contains("\"finish_reason\":\"length\""));
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "server did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status.code(), Some(0));
    });
}

// ---------------------------------------------------------------- fairness

/// Starts a long request of `n` sequences with `key` and waits until it runs.
async fn spawn_blocker(
    s: &Arc<Server>,
    key: &'static str,
    n: usize,
) -> tokio::task::JoinHandle<()> {
    let s2 = s.clone();
    let h = tokio::spawn(async move {
        let _ = s2
            .post(
                "/v1/completions",
                Some(key),
                &json!({"prompt": "x", "max_tokens": 1900, "ignore_eos": true, "n": n}),
            )
            .await;
    });
    let e = s.engine.clone();
    until("the blocker to run", || e.stats().running == n).await;
    h
}

/// Waits until `tenant` has `depth` requests in the fair queue.
async fn wait_queue_depth(s: &Server, tenant: &str, depth: f64) {
    let series = format!("brigade:tenant_queue_depth{{tenant=\"{tenant}\"}}");
    let t0 = Instant::now();
    loop {
        let (_, m) = s.get("/metrics").await;
        if metric_value(&m, &series).unwrap_or(0.0) >= depth {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{tenant}'s backlog never reached {depth}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The admission actor has no timer: a client that goes away while its request
/// waits in the fair queue wakes it (its reply drops), and the entry is dropped
/// at once instead of at the next poll or never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_of_gone_clients_leave_the_queue() {
    let toml = format!(
        "max_running = 1\n[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n",
        hash_key("key-a")
    );
    let s = Arc::new(Server::start(tiny(32768), engine_config(40000), &toml).await);
    // A blocker far longer than the test: only the gone clients can wake the actor.
    let s2 = s.clone();
    let blocker = tokio::spawn(async move {
        let _ = s2
            .post(
                "/v1/completions",
                Some("key-a"),
                &json!({"prompt": "x", "max_tokens": 32000, "ignore_eos": true}),
            )
            .await;
    });
    let e = s.engine.clone();
    until("the blocker to run", || e.stats().running == 1).await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let s = s.clone();
        waiting.push(tokio::spawn(async move {
            s.post(
                "/v1/completions",
                Some("key-a"),
                &json!({"prompt": "x", "max_tokens": 2}),
            )
            .await
        }));
    }
    wait_queue_depth(&s, "a", 3.0).await;
    for t in &waiting {
        t.abort(); // the clients go away
    }
    let series = "brigade:tenant_queue_depth{tenant=\"a\"}";
    let t0 = Instant::now();
    loop {
        let (_, m) = s.get("/metrics").await;
        if metric_value(&m, series) == Some(0.0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the gone clients' requests stayed queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !blocker.is_finished(),
        "the blocker ended first: the test proved nothing"
    );
    blocker.abort();
    let (st, _, v) = s
        .post(
            "/v1/completions",
            Some("key-a"),
            &json!({"prompt": "x", "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    pool_whole(&s.engine).await;
    s.shutdown().await;
}

/// Tenant A floods 200 long requests; B then sends 20. Under FCFS B would wait
/// behind all of A's backlog; under VTC B's counter is lifted to A's and the two
/// alternate, so B's requests finish within about 2·20 + max_running completions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomer_is_served_within_the_vtc_bound() {
    let toml = format!(
        "max_running = 4\n[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\nmax_queued = 300\n[[tenants]]\nname = \"b\"\napi_keys = [\"{}\"]\n",
        hash_key("key-a"),
        hash_key("key-b")
    );
    let s = Arc::new(Server::start(tiny(2048), engine_config(16384), &toml).await);
    // A blocker fills the engine so that A's whole backlog is queued before anything else runs.
    let blocker = spawn_blocker(&s, "key-a", 4).await;
    let rank = Arc::new(AtomicUsize::new(0));
    let a_done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let body = json!({"prompt": "the cat sat on the mat", "max_tokens": 48, "ignore_eos": true});
    for _ in 0..200 {
        let (s, rank, a_done, body) = (s.clone(), rank.clone(), a_done.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let (st, _, v) = s.post("/v1/completions", Some("key-a"), &body).await;
            assert_eq!(st, 200, "{v}");
            a_done.fetch_add(1, Ordering::SeqCst);
            ('a', rank.fetch_add(1, Ordering::SeqCst))
        }));
    }
    wait_queue_depth(&s, "a", 200.0).await;
    let start_rank = rank.load(Ordering::SeqCst);
    for _ in 0..20 {
        let (s, rank, body) = (s.clone(), rank.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let (st, _, v) = s.post("/v1/completions", Some("key-b"), &body).await;
            assert_eq!(st, 200, "{v}");
            ('b', rank.fetch_add(1, Ordering::SeqCst))
        }));
    }
    wait_queue_depth(&s, "b", 20.0).await;
    blocker.abort(); // client gone: the engine frees the blocker's slots
    let mut b_ranks = Vec::new();
    for t in tasks {
        let (who, r) = t.await.unwrap();
        if who == 'b' {
            b_ranks.push(r);
        }
    }
    let last_b = b_ranks.iter().max().unwrap() - start_rank;
    eprintln!("B arrived at completion {start_rank}; its last finished {last_b} completions later");
    // 20 of B alternating with A (equal weights, equal request sizes), plus what was in flight.
    assert!(
        last_b <= 2 * 20 + 2 * 4 + 8,
        "B's last request finished {last_b} completions after it arrived; ranks {b_ranks:?}"
    );
    assert!(a_done.load(Ordering::SeqCst) == 200);
    s.shutdown().await;
}

/// Two backlogged tenants with weights 3:1 and identical requests: the admission
/// order, hence the completion order, follows the weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_shares_follow_weights() {
    let toml = format!(
        "max_running = 2\n[[tenants]]\nname = \"heavy\"\nweight = 3.0\napi_keys = [\"{}\"]\n[[tenants]]\nname = \"light\"\nweight = 1.0\napi_keys = [\"{}\"]\n[[tenants]]\nname = \"blocker\"\napi_keys = [\"{}\"]\n",
        hash_key("key-h"),
        hash_key("key-l"),
        hash_key("key-x")
    );
    let s = Arc::new(Server::start(tiny(2048), engine_config(16384), &toml).await);
    // Occupy the engine so both backlogs form before anything is admitted. The
    // blocker is a third tenant: its tokens (as many as the backlogs take to form,
    // which depends on the machine's load) must not count against heavy or light.
    let blocker = spawn_blocker(&s, "key-x", 2).await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let body = json!({"prompt": "the cat sat on the mat", "max_tokens": 16, "ignore_eos": true});
    let mut tasks = Vec::new();
    for i in 0..120 {
        let key = if i % 2 == 0 { "key-h" } else { "key-l" };
        let (s, order, body) = (s.clone(), order.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let (st, _, v) = s.post("/v1/completions", Some(key), &body).await;
            assert_eq!(st, 200, "{v}");
            order.lock().unwrap().push(key);
        }));
    }
    wait_queue_depth(&s, "heavy", 60.0).await;
    wait_queue_depth(&s, "light", 60.0).await;
    blocker.abort();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    // While both were backlogged (the first 40 completions: light has 60 queued and
    // gets ~1/4), heavy's share is 3/4 within the VTC bound of a few requests.
    let heavy = order[..40].iter().filter(|k| **k == "key-h").count();
    eprintln!("heavy served {heavy} of the first 40 completions");
    assert!(
        (24..=36).contains(&heavy),
        "heavy served {heavy} of the first 40: {order:?}"
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------- metrics

/// Checks the Prometheus text format line by line; returns `series → value`.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "{line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "{line}"
                );
                typed.insert(name.to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line}");
            for pair in series[name_end + 1..series.len() - 1]
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label {pair:?} in {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                let _ = v;
            }
        }
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            typed.contains(name) || typed.contains(base),
            "series without TYPE: {line}"
        );
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        out.insert(series.to_string(), v);
    }
    out
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_under_load() {
    let s = Arc::new(Server::tiny("").await);
    let (st, before) = s.get("/metrics").await;
    assert_eq!(st, 200);
    let b = parse_prometheus(&before);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 0;
            s.client
                .post(s.url("/v1/completions"))
                .json(&json!({"prompt": "the cat sat", "max_tokens": 10, "ignore_eos": true, "stream": stream}))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }));
    }
    let mut saw_running = false;
    while !tasks.iter().all(|t| t.is_finished()) {
        saw_running |= s.engine.stats().running > 0;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, after) = s.get("/metrics").await;
    let a = parse_prometheus(&after);
    let m = "model_name=\"tiny-llama-test\"";
    let get =
        |h: &std::collections::HashMap<String, f64>, k: &str| h.get(k).copied().unwrap_or(0.0);
    let gen = format!("brigade:generation_tokens_total{{{m},tenant=\"default\"}}");
    assert_eq!(get(&a, &gen) - get(&b, &gen), 80.0);
    let prompt = format!("brigade:prompt_tokens_total{{{m},tenant=\"default\"}}");
    assert!(get(&a, &prompt) > get(&b, &prompt));
    let ok = format!(
        "brigade:request_success_total{{finished_reason=\"length\",{m},tenant=\"default\"}}"
    );
    assert_eq!(get(&a, &ok) - get(&b, &ok), 8.0);
    for h in [
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "time_per_output_token_seconds",
    ] {
        let k = format!("brigade:{h}_count{{{m},tenant=\"default\"}}");
        assert_eq!(get(&a, &k) - get(&b, &k), 8.0, "{k}");
    }
    let itl = format!("brigade:inter_token_latency_seconds_count{{{m},tenant=\"default\"}}");
    assert_eq!(get(&a, &itl) - get(&b, &itl), 72.0);
    let steps = format!("brigade:engine_steps_total{{{m}}}");
    assert!(get(&a, &steps) > get(&b, &steps));
    assert!(
        get(
            &a,
            &format!("brigade:worker_busy_seconds_total{{{m},worker=\"0\"}}")
        ) > 0.0
    );
    assert!(get(&a, "brigade:tenant_virtual_counter{tenant=\"default\"}") > 0.0);
    assert!(a.contains_key(&format!("brigade:kv_cache_usage_perc{{{m}}}")));
    assert!(a.contains_key(&format!("brigade:num_requests_running{{{m}}}")));
    assert!(a.contains_key(&format!("brigade:num_requests_waiting{{{m}}}")));
    assert!(a.contains_key(&format!("brigade:prefix_cache_queries_total{{{m}}}")));
    assert!(a.contains_key(&format!("brigade:num_preemptions_total{{{m}}}")));
    assert!(a.contains_key("brigade:pipeline_bubble_ratio"));
    assert!(a.contains_key("brigade:channel_occupancy{channel=\"admission\"}"));
    let _ = saw_running;
    s.shutdown().await;
}

// ---------------------------------------------------------------- real model

/// `brigade generate --temperature 0 --json` output for a prompt.
fn generate_cli(prompt: &str, chat: bool, max_tokens: usize) -> Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"));
    cmd.args([
        "generate",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--json",
        "--max-tokens",
        &max_tokens.to_string(),
    ]);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_same_greedy_text_as_generate() {
    let Some(model) = common::real_model() else {
        return;
    };
    let s = Server::start(model, Config::default(), "").await;
    let n = 24;
    let prompt = "The capital of France is";
    let want = generate_cli(prompt, false, n);
    let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0});
    let (st, _, v) = s.post("/v1/completions", None, &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want["text"]);
    assert_eq!(v["choices"][0]["finish_reason"], want["finish_reason"]);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (chunks, _) = s.stream("/v1/completions", None, &sb).await;
    assert_eq!(
        stream_text(&chunks, false).0,
        want["text"].as_str().unwrap()
    );

    let q = "What is the capital of France?";
    let want = generate_cli(q, true, n);
    let body =
        json!({"messages": [{"role": "user", "content": q}], "max_tokens": n, "temperature": 0});
    let (st, _, v) = s.post("/v1/chat/completions", None, &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want["text"]);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        want["prompt_token_ids"].as_array().unwrap().len()
    );
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (chunks, _) = s.stream("/v1/chat/completions", None, &sb).await;
    assert_eq!(stream_text(&chunks, true).0, want["text"].as_str().unwrap());
    s.shutdown().await;
}

// ---------------------------------------------------------------- HTTP bench

#[test]
fn http_bench_reports_latencies_and_per_tenant_tokens() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let toml = format!(
        "[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n[[tenants]]\nname = \"b\"\napi_keys = [\"{}\"]\n",
        hash_key("key-a"),
        hash_key("key-b")
    );
    let s = rt.block_on(Server::tiny(&toml));
    let args = brigade::bench::http::HttpBenchOptions {
        url: s.base.clone(),
        endpoint: brigade::bench::http::Endpoint::Completions,
        model_name: None,
        num_prompts: 12,
        concurrency: 4,
        request_rate: Some(200.0),
        api_keys: vec!["a=key-a".into(), "b=key-b".into(), "bad=nope".into()],
        input_len: 16,
        output_len: 8,
        slo_ttft_ms: Some(60_000.0),
        slo_tpot_ms: None,
        slo_e2e_ms: None,
        seed: 1,
        timeout_s: 60.0,
    };
    let r = serde_json::to_value(brigade::bench::http::run_http_bench(args).unwrap()).unwrap();
    assert_eq!(r["completed"], 8, "{r}");
    assert_eq!(r["errors_by_status"]["401"], 4, "{r}");
    assert_eq!(r["total_output_tokens"], 64, "{r}");
    assert_eq!(r["per_tenant"]["a"]["output_tokens"], 32, "{r}");
    assert_eq!(r["per_tenant"]["b"]["completed"], 4, "{r}");
    for k in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        assert!(
            r[k]["p99"].as_f64().unwrap() >= r[k]["p50"].as_f64().unwrap(),
            "{k}: {r}"
        );
    }
    assert!(r["goodput"].as_f64().unwrap() > 0.0);
    rt.block_on(s.shutdown());
}
