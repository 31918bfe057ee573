//! The rest of the surface clients probe, over HTTP with the real default
//! model (SmolLM2): `/v1/responses` (create streaming and not, retrieve,
//! delete, input items, `previous_response_id`, errors naming the Responses
//! field), `/v1/models/{id}` and aliases, `/tokenizer_info`, `/version`, CORS,
//! the vLLM metric rows (and the `vllm:` prefix), and `brigade serve MODEL`
//! with the flags users bring from vLLM and llama-server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use brigade::config::{Config, Count};
use brigade::engine::Engine;
use brigade::model::Model;
use brigade::server::{serve_with, ServerConfig};
use brigade::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn engine_config() -> Config {
    let mut c = Config::default();
    c.runtime.workers = Count::N(1);
    c.runtime.threads_per_worker = Count::N(1);
    c.kv_cache.capacity_tokens = 8192;
    c.validate().unwrap();
    c
}

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), brigade::server::ServeError>>>,
    client: reqwest::Client,
}

impl Server {
    async fn start(model: (Arc<Model>, Arc<Tokenizer>), server_toml: &str) -> Server {
        let engine = Engine::start(model.0, model.1, engine_config()).unwrap();
        let cfg = ServerConfig::from_toml_str(server_toml).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(engine, cfg, listener, async move {
            let _ = rx.await;
        }));
        Server {
            base,
            stop: Some(tx),
            task: Some(task),
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, _, v) = self.send(self.client.post(self.url(path)).json(body)).await;
        (s, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, _, v) = self.send(self.client.get(self.url(path))).await;
        (s, v)
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        let (s, _, v) = self.send(self.client.delete(self.url(path))).await;
        (s, v)
    }

    /// A streamed `/v1/responses`: the `(event name, data)` pairs, checked to agree.
    async fn events(&self, body: &Value) -> Vec<(String, Value)> {
        let resp = self
            .client
            .post(self.url("/v1/responses"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.unwrap();
        let mut out = Vec::new();
        for frame in text.split("\n\n").filter(|f| !f.trim().is_empty()) {
            let mut lines = frame.lines();
            let event = lines
                .next()
                .and_then(|l| l.strip_prefix("event: "))
                .unwrap_or_else(|| panic!("no event line in {frame:?}"));
            let data = lines
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("no data line in {frame:?}"));
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["type"], event, "{frame}");
            out.push((event.to_string(), v));
        }
        out
    }

    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn assert_error(st: u16, v: &Value, want: u16, param: Option<&str>) {
    assert_eq!(st, want, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    if let Some(p) = param {
        assert_eq!(v["error"]["param"], p, "{v}");
    }
}

/// The text of a response object's message items.
fn output_text(r: &Value) -> String {
    let mut s = String::new();
    for item in r["output"].as_array().unwrap() {
        if item["type"] == "message" {
            for part in item["content"].as_array().unwrap() {
                assert_eq!(part["type"], "output_text", "{part}");
                s.push_str(part["text"].as_str().unwrap());
            }
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_create_stream_and_not_match_chat() {
    let Some(model) = common::real_model() else {
        return;
    };
    let s = Server::start(model, "").await;
    let q = "What is the capital of France?";
    let body = json!({"input": q, "max_output_tokens": 12, "temperature": 0, "metadata": {"run": "t1"}, "user": "u1"});
    let (st, r) = s.post("/v1/responses", &body).await;
    assert_eq!(st, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"), "{r}");
    assert_eq!(r["object"], "response");
    assert!(
        matches!(r["status"].as_str(), Some("completed" | "incomplete")),
        "{r}"
    );
    assert_eq!(r["metadata"], json!({"run": "t1"}));
    assert_eq!(
        (
            r["user"].as_str(),
            r["max_output_tokens"].as_u64(),
            r["store"].as_bool()
        ),
        (Some("u1"), Some(12), Some(true))
    );
    assert_eq!(r["text"]["format"], json!({"type": "text"}));
    let item = &r["output"][0];
    assert_eq!(
        (item["type"].as_str(), item["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert!(item["id"].as_str().unwrap().starts_with("msg_"));
    let u = &r["usage"];
    let (inp, out) = (
        u["input_tokens"].as_u64().unwrap(),
        u["output_tokens"].as_u64().unwrap(),
    );
    assert!(inp > 0 && (1..=12).contains(&out), "{u}");
    assert_eq!(u["total_tokens"].as_u64(), Some(inp + out));
    if out == 12 {
        assert_eq!(
            (
                r["status"].as_str(),
                r["incomplete_details"]["reason"].as_str()
            ),
            (Some("incomplete"), Some("max_output_tokens")),
            "{r}"
        );
    }

    // The same request through chat: the same greedy text and prompt.
    let chat =
        json!({"messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0});
    let (st, c) = s.post("/v1/chat/completions", &chat).await;
    assert_eq!(st, 200, "{c}");
    let text = output_text(&r);
    assert_eq!(
        text,
        c["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(!text.is_empty());
    assert_eq!(u["input_tokens"], c["usage"]["prompt_tokens"]);

    // Streamed: typed events in order, numbered from 0; the deltas make the same text.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let ev = s.events(&sb).await;
    let names: Vec<&str> = ev.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ],
        "{names:?}"
    );
    let last = names.len() - 1;
    assert_eq!(
        &names[last - 3..last],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done"
        ],
        "{names:?}"
    );
    assert!(
        matches!(names[last], "response.completed" | "response.incomplete"),
        "{names:?}"
    );
    assert!(
        names[4..last - 3]
            .iter()
            .all(|n| *n == "response.output_text.delta"),
        "{names:?}"
    );
    for (i, (_, v)) in ev.iter().enumerate() {
        assert_eq!(v["sequence_number"].as_u64(), Some(i as u64), "{v}");
    }
    assert_eq!(ev[0].1["response"]["status"], "in_progress");
    let deltas: String = ev
        .iter()
        .filter(|(e, _)| e == "response.output_text.delta")
        .map(|(_, v)| v["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    assert_eq!(ev[last - 3].1["text"], text.as_str());
    let fin = &ev[last].1["response"];
    assert_eq!(output_text(fin), text);
    for k in ["input_tokens", "output_tokens", "total_tokens"] {
        assert_eq!(fin["usage"][k], r["usage"][k], "{k}");
    }
    // The same prompt again: served from the prefix cache, and reported so.
    assert!(
        fin["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{}",
        fin["usage"]
    );
    assert_eq!(ev[2].1["item"]["id"], fin["output"][0]["id"]);
    // A streamed response is stored once it ends, as its last event shows it.
    let (st, got) = s
        .get(&format!("/v1/responses/{}", fin["id"].as_str().unwrap()))
        .await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(&got, fin);

    // Instructions are a system turn before the input (the prompt grows by their tokens).
    let (st, ri) = s.post("/v1/responses", &json!({"input": q, "instructions": "Answer in one word.", "max_output_tokens": 4, "temperature": 0})).await;
    assert_eq!(st, 200, "{ri}");
    let (_, tk) = s
        .post("/tokenize", &json!({"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": q}], "add_generation_prompt": true}))
        .await;
    assert_eq!(ri["usage"]["input_tokens"], tk["count"], "{ri} {tk}");
    assert_eq!(ri["instructions"], "Answer in one word.");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_store_retrieve_delete_and_continue() {
    let Some(model) = common::real_model() else {
        return;
    };
    let s = Server::start(model, "responses_store_max = 2").await;
    let (st, a) = s
        .post(
            "/v1/responses",
            &json!({"input": "Name a fruit.", "max_output_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{a}");
    let id = a["id"].as_str().unwrap();
    let (st, got) = s.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got, a, "retrieve returns the stored response");
    let (st, items) = s
        .get(&format!("/v1/responses/{id}/input_items?order=asc"))
        .await;
    assert_eq!(st, 200, "{items}");
    assert_eq!(items["object"], "list");
    assert_eq!(
        items["data"][0]["content"][0],
        json!({"type": "input_text", "text": "Name a fruit."})
    );

    // previous_response_id: the stored conversation, then the new input.
    let (st, b) = s.post("/v1/responses", &json!({"input": "Another one.", "previous_response_id": id, "max_output_tokens": 6, "temperature": 0})).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["previous_response_id"], id);
    let conv = json!([
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": output_text(&a)},
        {"role": "user", "content": "Another one."},
    ]);
    let (_, tk) = s
        .post(
            "/tokenize",
            &json!({"messages": conv, "add_generation_prompt": true}),
        )
        .await;
    assert_eq!(b["usage"]["input_tokens"], tk["count"], "{b} {tk}");
    let (_, c) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": conv, "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(
        output_text(&b),
        c["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // store: false is not retrievable; unknown ids are 404 / 400 naming the field.
    let (st, n) = s
        .post(
            "/v1/responses",
            &json!({"input": "x", "max_output_tokens": 2, "store": false}),
        )
        .await;
    assert_eq!(st, 200, "{n}");
    assert_eq!(n["store"], false);
    let (st, v) = s
        .get(&format!("/v1/responses/{}", n["id"].as_str().unwrap()))
        .await;
    assert_error(st, &v, 404, None);
    let (st, v) = s
        .post(
            "/v1/responses",
            &json!({"input": "x", "previous_response_id": "resp_nope"}),
        )
        .await;
    assert_error(st, &v, 400, Some("previous_response_id"));

    // Bounded: the store holds 2, so the first is evicted by a third stored one.
    let (st, _) = s
        .post(
            "/v1/responses",
            &json!({"input": "y", "max_output_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = s.get(&format!("/v1/responses/{id}")).await;
    assert_error(st, &v, 404, None);
    let bid = b["id"].as_str().unwrap();
    let (st, d) = s.delete(&format!("/v1/responses/{bid}")).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d, json!({"id": bid, "object": "response", "deleted": true}));
    let (st, v) = s.delete(&format!("/v1/responses/{bid}")).await;
    assert_error(st, &v, 404, None);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_errors_name_the_responses_field() {
    let Some(model) = common::real_model() else {
        return;
    };
    let s = Server::start(model, "").await;
    for (body, param) in [
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (json!({"input": "x", "temperature": "hot"}), "temperature"),
        (json!({"input": "x", "top_p": 7}), "top_p"),
        (json!({"input": "x", "frobnicate": true}), "frobnicate"),
        (json!({"input": "x", "background": true}), "background"),
        (json!({"input": []}), "input"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}),
            "input[0].content[0].type",
        ),
        (json!({"input": "x", "model": "other-model"}), "model"),
        (
            json!({"input": "x", "tools": [{"type": "web_search_preview"}]}),
            "tools[0].type",
        ),
    ] {
        let (st, v) = s.post("/v1/responses", &body).await;
        let want = if param == "model" { 404 } else { 400 };
        assert_error(st, &v, want, Some(param));
    }
    // Structured output and tools go through the chat path unchanged: honoured
    // there (output valid against the schema; a call of the named function) or
    // refused naming the Responses field.
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
    let body = json!({"input": "Which city is the capital of France? Answer in JSON.", "max_output_tokens": 40, "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": true}}});
    let (st, v) = s.post("/v1/responses", &body).await;
    if st == 200 {
        assert_eq!(v["text"]["format"]["type"], "json_schema");
        if v["status"] == "completed" {
            let parsed: Value = serde_json::from_str(&output_text(&v))
                .unwrap_or_else(|e| panic!("not JSON ({e}): {v}"));
            assert!(parsed["city"].is_string(), "{parsed}");
        }
    } else {
        assert_error(st, &v, 400, Some("text.format"));
    }
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let body = json!({"input": "Weather in Paris?", "tools": tools, "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 40, "temperature": 0});
    let (st, v) = s.post("/v1/responses", &body).await;
    if st == 200 {
        let call = v["output"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "function_call")
            .unwrap_or_else(|| panic!("no function_call: {v}"));
        assert_eq!(call["name"], "get_weather");
        assert!(
            call["call_id"].as_str().is_some_and(|c| !c.is_empty()),
            "{call}"
        );
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert!(args["city"].is_string(), "{args}");
    } else {
        assert_eq!(st, 400, "{v}");
        assert!(
            matches!(v["error"]["param"].as_str(), Some("tools" | "tool_choice")),
            "{v}"
        );
    }
    // Function-call items in the input become assistant tool calls + tool messages.
    let body = json!({"input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ], "tools": tools, "max_output_tokens": 8, "temperature": 0});
    let (st, v) = s.post("/v1/responses", &body).await;
    if st != 200 {
        assert_eq!(st, 400, "{v}");
        assert!(
            v["error"]["param"]
                .as_str()
                .is_some_and(|p| p.starts_with("input[") || p == "tools"),
            "{v}"
        );
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_by_id_aliases_tokenizer_info_and_version() {
    let Some(model) = common::real_model() else {
        return;
    };
    let s = Server::start(
        model.clone(),
        "served_model_name = [\"smol\", \"gpt-4o-mini\"]",
    )
    .await;
    let (st, list) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smol", "gpt-4o-mini"]);
    for id in ids {
        let (st, m) = s.get(&format!("/v1/models/{id}")).await;
        assert_eq!(st, 200, "{m}");
        assert_eq!(
            (m["id"].as_str(), m["object"].as_str()),
            (Some(id), Some("model"))
        );
        let (st, c) = s.post("/v1/chat/completions", &json!({"model": id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await;
        assert_eq!(st, 200, "an alias is accepted in `model`: {c}");
    }
    let (st, v) = s.get("/v1/models/nope").await;
    assert_error(st, &v, 404, Some("model"));
    assert_eq!(v["error"]["code"], "model_not_found");
    let (st, ti) = s.get("/tokenizer_info").await;
    assert_eq!(st, 200, "{ti}");
    assert_eq!(ti["vocab_size"].as_u64(), Some(model.1.vocab_size() as u64));
    assert!(
        ti["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("im_start")),
        "{ti}"
    );
    assert_eq!(
        ti["eos_token"].as_str(),
        model.1.eos_id().and_then(|i| model.1.token_str(i))
    );
    let (st, ver) = s.get("/version").await;
    assert_eq!(st, 200);
    assert_eq!(ver["version"], env!("CARGO_PKG_VERSION"));
    s.shutdown().await;

    // Without a configured name: the model's own, without spaces.
    let s = Server::start(model, "").await;
    let (_, list) = s.get("/v1/models").await;
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    assert!(!id.is_empty() && !id.contains(' '), "{id}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_headers() {
    let Some(model) = common::real_model() else {
        return;
    };
    let key = "k-cors";
    let toml = format!(
        "allowed_origins = [\"http://app.test\"]\n[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n",
        brigade::server::hash_key(key)
    );
    let s = Server::start(model.clone(), &toml).await;
    fn pre(s: &Server, origin: &str) -> reqwest::RequestBuilder {
        s.client
            .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, x-stainless-lang",
            )
    }
    let (st, h, _) = s.send(pre(&s, "http://app.test")).await;
    assert_eq!(st, 204);
    assert_eq!(h["access-control-allow-origin"], "http://app.test");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type, x-stainless-lang"
    );
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let (st, h, _) = s.send(pre(&s, "http://evil.test")).await;
    assert_ne!(st, 204);
    assert!(h.get("access-control-allow-origin").is_none());
    // Simple and streamed responses, and errors, carry the header for an allowed origin.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (st, h, _) = s
        .send(
            s.client
                .post(s.url("/v1/chat/completions"))
                .header("origin", "http://app.test")
                .bearer_auth(key)
                .json(&body),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(h["access-control-allow-origin"], "http://app.test");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (st, h, _) = s
        .send(
            s.client
                .post(s.url("/v1/chat/completions"))
                .header("origin", "http://app.test")
                .bearer_auth(key)
                .json(&sb),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["access-control-allow-origin"], "http://app.test");
    let (st, h, _) = s
        .send(
            s.client
                .post(s.url("/v1/chat/completions"))
                .header("origin", "http://app.test")
                .json(&body),
        )
        .await;
    assert_eq!(st, 401);
    assert_eq!(h["access-control-allow-origin"], "http://app.test");
    let (_, h, _) = s
        .send(
            s.client
                .post(s.url("/v1/chat/completions"))
                .header("origin", "http://evil.test")
                .bearer_auth(key)
                .json(&body),
        )
        .await;
    assert!(h.get("access-control-allow-origin").is_none());
    s.shutdown().await;

    // Default: CORS off (no headers, the preflight is not answered).
    let s = Server::start(model, "").await;
    let (st, h, _) = s.send(pre(&s, "http://app.test")).await;
    assert_eq!(st, 405);
    assert!(h.get("access-control-allow-origin").is_none());
    s.shutdown().await;
}

/// The value of one series (`name{labels}` exactly as rendered, or a bare name).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Sum of every series of `name` whose labels contain all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_metric_rows_and_prefix() {
    let Some(model) = common::real_model() else {
        return;
    };
    for prefix in ["brigade", "vllm"] {
        let s = Server::start(model.clone(), &format!("metrics_prefix = \"{prefix}\"")).await;
        let (st, _) = s
            .post(
                "/v1/completions",
                &json!({"prompt": "one two", "max_tokens": 5, "n": 2, "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200);
        let (st, _) = s
            .post(
                "/v1/responses",
                &json!({"input": "hi", "max_output_tokens": 3}),
            )
            .await;
        assert_eq!(st, 200);
        let (st, _) = s
            .post(
                "/v1/responses",
                &json!({"input": "hi", "max_output_tokens": -3}),
            )
            .await;
        assert_eq!(st, 400);
        let (st, text) = s.get("/metrics").await;
        assert_eq!(st, 200);
        let text = text.as_str().unwrap().to_string();
        let p = |n: &str| format!("{prefix}:{n}");
        assert_eq!(
            metric_sum(&text, &p("request_inference_time_seconds_count"), &[]),
            3.0,
            "two completions + one response\n{text}"
        );
        assert_eq!(
            metric_sum(&text, &p("request_params_n_count"), &[]),
            2.0,
            "{text}"
        );
        assert_eq!(
            metric_sum(&text, &p("request_params_n_sum"), &[]),
            3.0,
            "n=2 and n=1\n{text}"
        );
        assert_eq!(
            metric_sum(&text, &p("request_params_max_tokens_sum"), &[]),
            8.0,
            "{text}"
        );
        let steps = metric_sum(&text, &p("iteration_tokens_total_count"), &[]);
        let step_tokens = metric_sum(&text, &p("iteration_tokens_total_sum"), &[]);
        assert!(
            steps >= 5.0 && step_tokens >= steps,
            "{steps} steps, {step_tokens} tokens\n{text}"
        );
        assert_eq!(
            metric_sum(&text, &p("iteration_tokens_total_bucket"), &["le=\"+Inf\""]),
            steps,
            "{text}"
        );
        assert_eq!(
            metric_sum(
                &text,
                &p("cache_config_info"),
                &[
                    "block_size=\"16\"",
                    "enable_prefix_caching=\"true\"",
                    "num_gpu_blocks=\"512\""
                ]
            ),
            1.0,
            "{text}"
        );
        assert!(
            metric(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6),
            "{text}"
        );
        assert!(
            metric(&text, "process_cpu_seconds_total").is_some_and(|v| v > 0.0),
            "{text}"
        );
        assert!(
            metric(&text, "process_open_fds").is_some_and(|v| v >= 3.0),
            "{text}"
        );
        assert!(
            metric(&text, "process_start_time_seconds").is_some_and(|v| v > 1.6e9),
            "{text}"
        );
        assert_eq!(
            metric_sum(
                &text,
                "http_requests_total",
                &[
                    "handler=\"/v1/responses\"",
                    "method=\"POST\"",
                    "status=\"2xx\""
                ]
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            metric_sum(
                &text,
                "http_requests_total",
                &["handler=\"/v1/responses\"", "status=\"4xx\""]
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            metric_sum(
                &text,
                "http_requests_total",
                &["handler=\"/v1/completions\"", "status=\"2xx\""]
            ),
            1.0,
            "{text}"
        );
        // vLLM's rows are published under the chosen prefix only.
        let other = if prefix == "vllm" { "brigade" } else { "vllm" };
        for row in [
            "num_requests_running",
            "num_requests_waiting",
            "kv_cache_usage_perc",
            "prompt_tokens_total",
            "generation_tokens_total",
            "request_success_total",
            "time_to_first_token_seconds",
            "e2e_request_latency_seconds",
            "request_inference_time_seconds",
            "iteration_tokens_total",
            "request_params_n",
            "cache_config_info",
            "num_preemptions_total",
            "prefix_cache_queries_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {prefix}:{row} ")),
                "{prefix}:{row} missing\n{text}"
            );
            assert!(
                !text.contains(&format!("{other}:{row}")),
                "{other}:{row} published with prefix {prefix}\n{text}"
            );
        }
        assert!(
            metric_sum(&text, &p("generation_tokens_total"), &[]) >= 11.0,
            "{text}"
        );
        s.shutdown().await;
    }
}

/// Starts the built binary with `args`; returns it and its base URL.
fn spawn_serve(args: &[&str]) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .arg("serve")
        .args(args)
        .args(["--port", "0", "--log-format", "json"])
        .env("RUST_LOG", "warn")
        .env_remove("BRIGADE_API_KEY")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = common::wait_listening(&mut child);
    (child, base)
}

fn stop(mut child: std::process::Child) {
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn serve_takes_vllm_and_llama_server_flags() {
    let Some(path) = common::model_path() else {
        return;
    };
    let path_s = path.to_str().unwrap();
    let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();

    // vLLM style: positional MODEL, --api-key, --max-model-len, aliases.
    let (child, base) = spawn_serve(&[
        path_s,
        "--api-key",
        "sekret",
        "--max-model-len",
        "384",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "256",
        "--served-model-name",
        "smol",
        "smol-alias",
    ]);
    rt.block_on(async {
        let r = client
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "the shared key is required");
        let r = client
            .get(format!("{base}/v1/models"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = client
            .get(format!("{base}/v1/models"))
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["smol", "smol-alias"]);
        assert_eq!(v["data"][0]["max_model_len"], 384);
        let body = json!({"model": "smol-alias", "prompt": "x", "max_tokens": 400});
        let r = client
            .post(format!("{base}/v1/completions"))
            .bearer_auth("sekret")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            400,
            "--max-model-len bounds prompt + completion"
        );
    });
    stop(child);

    // llama-server style: -m FILE; the default name is the file's stem.
    let (child, base) = spawn_serve(&["-m", path_s, "--host", "127.0.0.1"]);
    rt.block_on(async {
        let v: Value = client
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["data"][0]["id"], stem.as_str());
        let r = client
            .get(format!("{base}/v1/models/{stem}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    stop(child);

    // Conflicts fail at start, naming what conflicts.
    for (args, needle) in [
        (vec![path_s, "--model", "/elsewhere.gguf"], "given twice"),
        (
            vec![path_s, "--max-model-len", "100000000"],
            "max_model_len",
        ),
        (
            vec![path_s, "--served-model-name", "has space"],
            "served_model_name",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
            .arg("serve")
            .args(&args)
            .args(["--port", "0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
