//! Tool calling end to end on the real default model (SmolLM2-135M, whose own
//! template has no tools) with a tool-capable template from llama.cpp's
//! `models/templates/` as the `--chat-template` override (Qwen 2.5: the Hermes
//! `<tool_call>` family): requests are checked, the history's tool calls and
//! tool results reach the template, `required` and named `tool_choice` give
//! calls whose arguments validate against each tool's schema, and streamed
//! deltas reassemble to the non-streamed answer.
//!
//! The template comes from `$BRIGADE_LLAMACPP_DATA/models/templates` (default
//! `~/.cache/brigade/llamacpp-0.3.36`, see scripts/fetch-test-data.sh); the
//! tests skip without it or the model, and fail instead under
//! `BRIGADE_REQUIRE_MODEL=1`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use brigade::config::Config;
use brigade::engine::Engine;
use brigade::server::{serve_with, ServerConfig};
use brigade::tokenizer::Tokenizer;
use serde_json::{json, Value};

const TEMPLATE: &str = "Qwen-Qwen2.5-7B-Instruct.jinja";

/// Source of a llama.cpp template, when the test data is present.
fn template_source(name: &str) -> Option<String> {
    let root = match std::env::var_os("BRIGADE_LLAMACPP_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(&std::env::var_os("HOME")?).join(".cache/brigade/llamacpp-0.3.36"),
    };
    let path = root.join("models/templates").join(name);
    if !path.is_file() {
        if std::env::var("BRIGADE_REQUIRE_MODEL").as_deref() == Ok("1") {
            panic!(
                "BRIGADE_REQUIRE_MODEL=1 but {} is missing (run scripts/fetch-test-data.sh)",
                path.display()
            );
        }
        eprintln!(
            "note: {} not found; skipping (run scripts/fetch-test-data.sh)",
            path.display()
        );
        return None;
    }
    std::fs::read_to_string(&path).ok()
}

struct Server {
    base: String,
    client: reqwest::Client,
    tok: Arc<Tokenizer>,
}

impl Server {
    /// The real model with `template` (None: the model's own).
    async fn start(template: Option<&str>) -> Option<Server> {
        let (model, tok) = common::real_model()?;
        let tok = match template {
            Some(src) => Arc::new(tok.with_chat_template(src).expect("template compiles")),
            None => tok,
        };
        let mut cfg = Config::default();
        cfg.kv_cache.capacity_tokens = 16384;
        cfg.validate().unwrap();
        let engine = Engine::start(model, tok.clone(), cfg).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve_with(
            engine,
            ServerConfig::default(),
            listener,
            std::future::pending::<()>(),
        ));
        Some(Server {
            base,
            client: reqwest::Client::new(),
            tok,
        })
    }

    async fn qwen() -> Option<Server> {
        let src = template_source(TEMPLATE)?;
        Self::start(Some(&src)).await
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The `data:` chunks of a stream (without `[DONE]`, which must end it).
    async fn stream(&self, body: &Value) -> Vec<Value> {
        let resp = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        let frames: Vec<&str> = text
            .split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| f.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(frames.last(), Some(&"[DONE]"), "{text}");
        frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
        }, "required": ["city", "unit"], "additionalProperties": false}
    }})
}

fn booking_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "book_table",
        "description": "Book a restaurant table",
        "parameters": {"type": "object", "$defs": {"Time": {"type": "object", "properties": {
                "hour": {"type": "integer", "minimum": 11, "maximum": 22},
                "minute": {"type": "integer", "enum": [0, 15, 30, 45]}
            }, "required": ["hour", "minute"], "additionalProperties": false}},
            "properties": {
                "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                "time": {"$ref": "#/$defs/Time"},
                "notes": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3}
            }, "required": ["guests", "time"], "additionalProperties": false}
    }})
}

/// A JSON Schema validator for the keywords the schemas above use (type,
/// properties, required, additionalProperties, enum, minimum/maximum,
/// min/maxLength, items, maxItems, local $ref): the list of violations.
fn violations(root: &Value, schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let target = root
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("unresolved {r}"));
        return violations(root, target, v, path, out);
    }
    let ty_ok = match schema.get("type").and_then(Value::as_str) {
        None => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some(t) => panic!("validator does not know type {t}"),
    };
    if !ty_ok {
        out.push(format!("{path}: {v} is not of type {}", schema["type"]));
        return;
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            out.push(format!("{path}: {v} not in {e:?}"));
        }
    }
    if let (Some(min), Some(x)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < min {
            out.push(format!("{path}: {x} < {min}"));
        }
    }
    if let (Some(max), Some(x)) = (schema.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if x > max {
            out.push(format!("{path}: {x} > {max}"));
        }
    }
    if let Some(s) = v.as_str() {
        let n = s.chars().count() as u64;
        if schema
            .get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
            || schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
        {
            out.push(format!("{path}: length {n} out of bounds"));
        }
    }
    if let Some(a) = v.as_array() {
        if schema
            .get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| a.len() as u64 > m)
        {
            out.push(format!("{path}: {} items", a.len()));
        }
        if let Some(items) = schema.get("items") {
            for (i, x) in a.iter().enumerate() {
                violations(root, items, x, &format!("{path}[{i}]"), out);
            }
        }
    }
    if let Some(o) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !o.contains_key(r.as_str().unwrap_or("")) {
                out.push(format!("{path}: missing {r}"));
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => violations(root, s, x, &format!("{path}.{k}"), out),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    out.push(format!("{path}: unexpected {k}"))
                }
                None => {}
            }
        }
    }
}

/// Checks every call of a non-streamed chat answer against its tool's schema;
/// returns the calls as (name, parsed arguments).
fn check_calls(v: &Value, tools: &[Value]) -> Vec<(String, Value)> {
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {v}"));
    assert!(!calls.is_empty(), "{v}");
    calls
        .iter()
        .map(|c| {
            assert!(c["id"].as_str().unwrap().starts_with("call_"), "{c}");
            assert_eq!(c["type"], "function");
            let name = c["function"]["name"].as_str().unwrap().to_string();
            let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("arguments of {c}: {e}"));
            let tool = tools
                .iter()
                .find(|t| t["function"]["name"] == name.as_str())
                .unwrap_or_else(|| panic!("unknown tool in {c}"));
            let schema = &tool["function"]["parameters"];
            let mut bad = Vec::new();
            violations(schema, schema, &args, "arguments", &mut bad);
            assert!(
                bad.is_empty(),
                "{name} arguments {args} violate the schema: {bad:?}"
            );
            (name, args)
        })
        .collect()
}

/// Reassembles a streamed chat answer: (content, [(index, id, name, arguments)], finish_reason).
fn reassemble(
    chunks: &[Value],
) -> (
    Option<String>,
    Vec<(u64, String, String, String)>,
    Option<String>,
) {
    let mut content: Option<String> = None;
    let mut calls: Vec<(u64, String, String, String)> = Vec::new();
    let mut finish = None;
    for c in chunks {
        let Some(ch) = c["choices"].get(0) else {
            continue;
        };
        let d = &ch["delta"];
        if let Some(t) = d["content"].as_str() {
            if !t.is_empty() {
                content.get_or_insert_with(String::new).push_str(t);
            }
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let index = tc["index"].as_u64().unwrap();
            if let Some(id) = tc["id"].as_str() {
                assert_eq!(
                    index as usize,
                    calls.len(),
                    "a new call's index is the next one: {tc}"
                );
                assert_eq!(tc["type"], "function", "{tc}");
                calls.push((
                    index,
                    id.to_string(),
                    tc["function"]["name"].as_str().unwrap().to_string(),
                    String::new(),
                ));
            }
            let call = calls
                .iter_mut()
                .find(|c| c.0 == index)
                .unwrap_or_else(|| panic!("arguments before the call's first delta: {tc}"));
            call.3
                .push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (content, calls, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_requests_name_the_field() {
    let Some(s) = Server::qwen().await else {
        return;
    };
    let user = json!([{"role": "user", "content": "Weather in Paris?"}]);
    for (extra, param) in [
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "float"}}}}}]}),
            "tools[0].function.parameters.properties.x.type",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice.function.name",
        ),
        (
            json!({"tools": [weather_tool()], "tool_choice": "always"}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"functions": [{"name": "f"}]}), "functions"),
    ] {
        let mut body = json!({"messages": user, "max_tokens": 4});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {v}"
        );
    }
    // A tool message must answer a call.
    let body = json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}], "max_tokens": 1});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("messages[1].tool_call_id")),
        "{v}"
    );
}

/// SmolLM2's own template does not render tools: refused, not silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_without_tools_is_refused() {
    let Some(s) = Server::start(None).await else {
        return;
    };
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "tools": [weather_tool()], "max_tokens": 2});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "tools");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--chat-template"),
        "{v}"
    );
}

/// The history's tool calls and tool results reach the template (Qwen's
/// `<tool_call>` / `<tool_response>` blocks), and the tools are rendered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_with_tool_results_renders() {
    let Some(s) = Server::qwen().await else {
        return;
    };
    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": "18 degrees, sunny"}
    ]);
    let (st, v) = s.post("/tokenize", &json!({"messages": history})).await;
    assert_eq!(st, 200, "{v}");
    let ids: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let text = s.tok.decode(&ids, false).unwrap();
    assert!(text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call><|im_end|>"), "{text}");
    assert!(
        text.contains(
            "<|im_start|>user\n<tool_response>\n18 degrees, sunny\n</tool_response><|im_end|>"
        ),
        "{text}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");

    // With tools, the prompt is the template's rendering with them (tool_choice none:
    // rendered, not parsed).
    let tools = vec![weather_tool()];
    let body = json!({"messages": history, "tools": tools, "tool_choice": "none", "max_tokens": 1, "temperature": 0});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let template = s.tok.chat_template().unwrap();
    let api_msgs: Vec<brigade::tokenizer::ChatMessage> = serde_json::from_value(json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": "18 degrees, sunny"}
    ]))
    .unwrap();
    let rendered = template
        .render_with(&api_msgs, Some(&tools), None, true)
        .unwrap();
    assert!(
        rendered
            .contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""),
        "{rendered}"
    );
    let want = s
        .tok
        .encode_chat_with(
            template,
            &api_msgs,
            Some(&tools),
            None,
            brigade::tokenizer::ChatEncodeOptions {
                add_generation_prompt: true,
                with_bos: true,
                parse_special_in_content: false,
            },
        )
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], want.len(), "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
}

/// `required` and a named `tool_choice` give calls that parse and validate,
/// streamed or not; the stream reassembles to the non-streamed answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_calls_validate_and_stream_alike() {
    let Some(s) = Server::qwen().await else {
        return;
    };
    let tools = vec![weather_tool(), booking_tool()];
    let cases = [
        (
            json!("required"),
            json!(true),
            "What is the weather in Paris, in celsius?",
        ),
        (
            json!("required"),
            json!(false),
            "Book a table for 4 at 19:30, by the window.",
        ),
        (
            json!({"type": "function", "function": {"name": "book_table"}}),
            json!(true),
            "Weather in Oslo please",
        ),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            json!(false),
            "Hello!",
        ),
    ];
    for (choice, parallel, question) in cases {
        let body = json!({"messages": [{"role": "user", "content": question}], "tools": tools, "tool_choice": choice,
            "parallel_tool_calls": parallel, "max_tokens": 160, "temperature": 0});
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 200, "{v}");
        let calls = check_calls(&v, &tools);
        if let Some(name) = choice["function"]["name"].as_str() {
            assert_eq!(calls.len(), 1, "{v}");
            assert_eq!(calls[0].0, name, "{v}");
        }
        if parallel == json!(false) {
            assert_eq!(calls.len(), 1, "{v}");
        }
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let chunks = s.stream(&sb).await;
        let (content, streamed, finish) = reassemble(&chunks);
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        let message = &v["choices"][0]["message"];
        assert_eq!(
            content.as_deref(),
            message["content"].as_str(),
            "{chunks:?}"
        );
        let want: Vec<(String, String)> = message["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["function"]["name"].as_str().unwrap().to_string(),
                    c["function"]["arguments"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let got: Vec<(String, String)> = streamed
            .iter()
            .map(|c| (c.2.clone(), c.3.clone()))
            .collect();
        assert_eq!(got, want, "{chunks:?}");
    }
    // A well-formed schema that the grammar compiler cannot enforce (a regex
    // look-behind) is a 400 naming `tools`, not an unconstrained answer.
    let odd = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}}}]);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "tools": odd, "tool_choice": "required", "max_tokens": 8});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("tools")),
        "{v}"
    );
}

/// The override flag: a missing file and a template that does not parse are
/// clear errors before serving.
#[test]
fn chat_template_flag_errors_are_clear() {
    let bin = env!("CARGO_BIN_EXE_brigade");
    let out = std::process::Command::new(bin)
        .args([
            "serve",
            "--chat-template",
            "/nonexistent/t.jinja",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reading the chat template /nonexistent/t.jinja"),
        "{err}"
    );
    let Some(model) = common::model_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{% if messages %}unclosed").unwrap();
    let out = std::process::Command::new(bin)
        .args(["serve", "--port", "0", "--model"])
        .arg(&model)
        .arg("--chat-template")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a valid template"), "{err}");
}

/// Every family's grammar compiles and its calls parse back: `required` over the
/// Llama 3.1 (JSON `parameters`), Mistral Nemo (`[TOOL_CALLS][...]`) and Mistral
/// Small 3.2 (`[TOOL_CALLS]name[ARGS]{...}`) templates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_family_required_call_validates() {
    let tools = vec![weather_tool(), booking_tool()];
    for name in [
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    ] {
        let Some(src) = template_source(name) else {
            return;
        };
        let Some(s) = Server::start(Some(&src)).await else {
            return;
        };
        // Parallel Mistral calls are left out: the small model repeats a call
        // until max_tokens, and a cut `[TOOL_CALLS][...` array is content.
        let mistral = name.starts_with("mistralai") || name.starts_with("Mistral");
        for parallel in if mistral {
            vec![false]
        } else {
            vec![true, false]
        } {
            let body = json!({"messages": [{"role": "user", "content": "Weather in Rome in celsius, please."}], "tools": tools,
                "tool_choice": "required", "parallel_tool_calls": parallel, "max_tokens": 160, "temperature": 0});
            let (st, v) = s.post("/v1/chat/completions", &body).await;
            assert_eq!(st, 200, "{name}: {v}");
            let calls = v["choices"][0]["message"]["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // Mistral templates need 9-character ids; the others `call_…`.
            let mut fixed = v.clone();
            if mistral {
                for (i, c) in calls.iter().enumerate() {
                    assert_eq!(c["id"].as_str().map(str::len), Some(9), "{name}: {c}");
                    fixed["choices"][0]["message"]["tool_calls"][i]["id"] =
                        json!(format!("call_{}", c["id"].as_str().unwrap()));
                }
            }
            let parsed = check_calls(&fixed, &tools);
            if !parallel {
                assert_eq!(parsed.len(), 1, "{name}: {v}");
            }
        }
    }
}
