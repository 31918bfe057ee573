//! The HTTP edge end to end (issue 10, observation 4 and the HTTP items of 7):
//! connection cap, header-read and keep-alive timeouts, prompt shutdown with
//! idle connections, JSON bodies for errors raised before routing, JSON content
//! types, the Host check, the `Authorization` scheme's case and `/metrics`
//! protection. A real server on a loopback port with the tiny random model,
//! driven with raw sockets where the bytes on the wire matter.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use brigade::config::{Config, Count};
use brigade::engine::{Engine, EngineHandle};
use brigade::model::Model;
use brigade::server::{hash_key, serve_with, ServerConfig};
use brigade::testing::TinyLlamaSpec;
use brigade::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bound for "eventually" (a hang, not a timing assertion).
const EVENTUALLY: Duration = Duration::from_secs(30);

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
    addr: String,
    engine: EngineHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), brigade::server::ServeError>>,
    client: reqwest::Client,
}

impl Server {
    async fn start(server_toml: &str) -> Server {
        Self::start_with(256, 8192, server_toml).await
    }

    async fn start_with(context_length: u32, kv_tokens: usize, server_toml: &str) -> Server {
        let (model, tok) = tiny(context_length);
        let engine = Engine::start(model, tok, engine_config(kv_tokens)).unwrap();
        let cfg = ServerConfig::from_toml_str(server_toml).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(engine.clone(), cfg, listener, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            engine,
            stop: Some(tx),
            task,
            client: reqwest::Client::new(),
        }
    }

    fn signal_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits (bounded) for `serve_with` to return; the time it took.
    async fn shutdown(mut self) -> Duration {
        let t0 = Instant::now();
        self.signal_shutdown();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("serve_with did not return")
            .unwrap()
            .unwrap();
        t0.elapsed()
    }
}

/// A raw HTTP/1.1 response: status, lower-cased header block, body.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: String,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

fn parse_response(bytes: &[u8]) -> RawResponse {
    let text = String::from_utf8_lossy(bytes).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {text:?}"));
    RawResponse {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// Reads until the server closes the connection (bounded); Err if it stays open.
async fn read_to_close(sock: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let t0 = Instant::now();
    loop {
        let left = EVENTUALLY.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "still open after {EVENTUALLY:?}; read {} bytes",
                    out.len()
                ))
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `request` on a fresh connection and reads the response up to the close.
async fn raw(addr: &str, request: &[u8]) -> RawResponse {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(request).await.unwrap();
    let bytes = read_to_close(&mut sock).await.unwrap();
    parse_response(&bytes)
}

fn assert_error(r: &RawResponse, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert!(r.head.contains("content-type: application/json"), "{r:?}");
    let v = r.json();
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{r:?}"
    );
    assert!(e["type"].is_string(), "{r:?}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{r:?}");
}

/// A kept-alive connection read one response at a time (bytes past a response are kept).
struct KeptAlive {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl KeptAlive {
    async fn connect(addr: &str) -> KeptAlive {
        KeptAlive {
            sock: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.unwrap();
    }

    /// The next response (it must have a `content-length`).
    async fn response(&mut self) -> RawResponse {
        let mut chunk = [0u8; 4096];
        let t0 = Instant::now();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if self.buf.len() >= end + 4 + len {
                    let r = parse_response(&self.buf[..end + 4 + len]);
                    self.buf.drain(..end + 4 + len);
                    return r;
                }
            }
            assert!(t0.elapsed() < EVENTUALLY, "no complete response");
            let n = tokio::time::timeout(EVENTUALLY, self.sock.read(&mut chunk))
                .await
                .expect("read timed out")
                .unwrap();
            assert!(n > 0, "closed before a complete response");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// What is left up to the server's close; Err if it stays open.
    async fn rest_to_close(&mut self) -> Result<Vec<u8>, String> {
        let mut rest = std::mem::take(&mut self.buf);
        rest.extend(read_to_close(&mut self.sock).await?);
        Ok(rest)
    }
}

// ---------------------------------------------------------------- connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_quickly_and_the_server_recovers() {
    let s = Server::start(
        "max_connections = 4\nheader_read_timeout_s = 60\nkeep_alive_timeout_s = 60\n",
    )
    .await;
    // Four idle connections hold every slot (the listener accepts in order, so
    // every later connection is over the cap).
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(&s.addr).await.unwrap());
    }
    let mut over = Vec::new();
    for _ in 0..50 {
        over.push(TcpStream::connect(&s.addr).await.unwrap());
    }
    // Each one over the cap gets a 503 with a JSON body and is closed, without
    // waiting for any timeout (60 s here).
    for sock in &mut over {
        let bytes = read_to_close(sock)
            .await
            .expect("a connection over the cap was held open");
        let r = parse_response(&bytes);
        assert_error(&r, 503);
        assert!(r.head.contains("connection: close"), "{r:?}");
    }
    // Once the idle clients go away, a normal request is served.
    drop(idle);
    let t0 = Instant::now();
    loop {
        if let Ok(r) = s.client.get(s.url("/health")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            t0.elapsed() < EVENTUALLY,
            "the server did not recover its connection slots"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_disconnected_after_the_header_read_timeout() {
    let s = Server::start("header_read_timeout_s = 1\nkeep_alive_timeout_s = 60\n").await;
    // A client that connects and sends nothing.
    let mut silent = TcpStream::connect(&s.addr).await.unwrap();
    // A client that dribbles its headers a byte every 100 ms and never ends them.
    let sock = TcpStream::connect(&s.addr).await.unwrap();
    let (mut rd, mut wr) = sock.into_split();
    let dribble = tokio::spawn(async move {
        let head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            .iter()
            .chain(b"x-slow: ".iter())
            .copied()
            .collect::<Vec<u8>>();
        let t0 = Instant::now();
        let mut i = 0usize;
        while t0.elapsed() < EVENTUALLY {
            let byte = head.get(i).copied().unwrap_or(b'a');
            if wr.write_all(&[byte]).await.is_err() {
                return;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Well past the 1 s configured, well short of hyper's own 30 s default.
    let bound = Duration::from_secs(15);
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(bound, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the slowloris connection was held open for {bound:?}"
    );
    dribble.abort();
    read_to_close(&mut silent)
        .await
        .expect("a silent connection was held open past the header-read timeout");
    // The server still serves.
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed() {
    let s = Server::start("keep_alive_timeout_s = 1\nheader_read_timeout_s = 60\n").await;
    let mut conn = KeptAlive::connect(&s.addr).await;
    let req = format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr);
    // Two requests on the kept-alive connection, then silence.
    for _ in 0..2 {
        conn.send(req.as_bytes()).await;
        let r = conn.response().await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(!r.head.contains("connection: close"), "{r:?}");
    }
    // Pipelined requests in one write are all answered, in order.
    let three = format!("GET /health HTTP/1.1\r\nHost: {0}\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: {0}\r\n\r\nGET /health HTTP/1.1\r\nHost: {0}\r\n\r\n", s.addr);
    conn.send(three.as_bytes()).await;
    for want in ["status", "data", "status"] {
        let r = conn.response().await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.json().get(want).is_some(), "{r:?}");
    }
    let rest = conn
        .rest_to_close()
        .await
        .expect("an idle keep-alive connection was held open");
    assert!(
        rest.is_empty(),
        "unexpected bytes on an idle connection: {:?}",
        String::from_utf8_lossy(&rest)
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_idle_connections_open_is_prompt() {
    let s = Server::start("shutdown_timeout_s = 1").await;
    // Connections that sent nothing, and kept-alive ones after a request.
    let mut socks = Vec::new();
    for _ in 0..3 {
        socks.push(TcpStream::connect(&s.addr).await.unwrap());
    }
    for _ in 0..3 {
        let mut conn = KeptAlive::connect(&s.addr).await;
        conn.send(format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr).as_bytes())
            .await;
        assert_eq!(conn.response().await.status, 200);
        socks.push(conn.sock);
    }
    // And one that stalls in the middle of its headers.
    let mut stalled = TcpStream::connect(&s.addr).await.unwrap();
    stalled
        .write_all(format!("GET /health HTTP/1.1\r\nHost: {}\r\n", s.addr).as_bytes())
        .await
        .unwrap();
    socks.push(stalled);
    tokio::time::sleep(Duration::from_millis(200)).await; // let the server read what was sent
                                                          // Nothing is in flight: the drain ends at once, and idle or stalled
                                                          // connections do not hold the shutdown (they used to add 10 s past the drain timeout).
    let took = s.shutdown().await;
    assert!(
        took < Duration::from_secs(8),
        "shutdown with idle connections took {took:?}"
    );
    for sock in &mut socks {
        read_to_close(sock)
            .await
            .expect("an idle connection outlived the server");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_connections_at_once_and_lets_a_busy_one_finish() {
    let mut s = Server::start_with(4096, 16384, "shutdown_timeout_s = 120").await;
    let mut idle = KeptAlive::connect(&s.addr).await;
    idle.send(format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr).as_bytes())
        .await;
    assert_eq!(idle.response().await.status, 200);
    let body = json!({"prompt": "the cat", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let t0 = Instant::now();
    while s.engine.stats().running != 1 {
        assert!(t0.elapsed() < EVENTUALLY, "the stream never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.signal_shutdown();
    // The idle connection closes while the stream still runs.
    idle.rest_to_close()
        .await
        .expect("an idle connection stayed open during the drain");
    let running = s.engine.stats().running;
    let text = tokio::time::timeout(Duration::from_secs(120), resp.text())
        .await
        .expect("the stream did not end")
        .unwrap();
    assert_eq!(
        running, 1,
        "the stream had ended before the idle connection closed; the test proves nothing"
    );
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(
        text.contains("\"finish_reason\":\"length\""),
        "the busy request did not finish normally"
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------- errors before routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_before_routing_have_json_bodies() {
    let s = Server::start("").await;
    let host = &s.addr;
    // 431: a header section over server.max_header_bytes (default 32 KiB).
    let big = "a".repeat(64 * 1024);
    let r = raw(
        &s.addr,
        format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_error(&r, 431);
    // 431: more header fields than are read (100).
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = raw(
        &s.addr,
        format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_error(&r, 431);
    // 414: a URI over server.max_uri_bytes (default 8 KiB).
    let long = "q".repeat(12 * 1024);
    let r = raw(
        &s.addr,
        format!("GET /v1/models?x={long} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_error(&r, 414);
    // 400: a Content-Length that is not a number, and two that disagree.
    for cl in [
        "Content-Length: abc\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
    ] {
        let req = format!("POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{cl}\r\n{{}}");
        let r = raw(&s.addr, req.as_bytes()).await;
        assert_error(&r, 400);
    }
    // 400: not HTTP at all.
    let r = raw(&s.addr, b"GARBAGE\r\n\r\n").await;
    assert_error(&r, 400);
    // A kept-alive connection: a good request, then a malformed one.
    let mut conn = KeptAlive::connect(&s.addr).await;
    conn.send(format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(conn.response().await.status, 200);
    conn.send(
        format!("POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: x\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let r = parse_response(&conn.rest_to_close().await.unwrap());
    assert_error(&r, 400);
    // The server is still healthy.
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_without_a_json_content_type_is_415() {
    let s = Server::start("").await;
    let body = json!({"prompt": "the cat", "max_tokens": 2}).to_string();
    for ct in [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .header("content-type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{ct}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{v}"
        );
    }
    // JSON with parameters is accepted, in any case.
    for ct in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
    ] {
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .header("content-type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{ct}");
    }
    // No Content-Type: parsed as JSON (as vLLM does), unless a browser sent it
    // (an `Origin` header): a page's fetch() with a typeless body needs no preflight.
    let r = s
        .client
        .post(s.url("/tokenize"))
        .body(json!({"prompt": "x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .post(s.url("/tokenize"))
        .header("origin", "http://evil.example")
        .body(json!({"prompt": "x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // GET routes take no body and need no Content-Type.
    assert_eq!(
        s.client
            .get(s.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_is_checked() {
    // Default, listening on loopback: loopback names (and IP addresses) only.
    let s = Server::start("").await;
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    for (host, want) in [
        ("evil.example.com".to_string(), 403),
        (format!("attacker.example:{port}"), 403),
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        ("[::1]".to_string(), 200),
        ("api.localhost".to_string(), 200),
    ] {
        let r = raw(
            &s.addr,
            format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        if want == 200 {
            assert_eq!(r.status, 200, "{host}: {r:?}");
        } else {
            assert_error(&r, want);
            assert_eq!(r.json()["error"]["code"], "host_not_allowed", "{r:?}");
        }
    }
    // /metrics is behind the same check (it names tenants).
    let r = raw(
        &s.addr,
        b"GET /metrics HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_error(&r, 403);
    s.shutdown().await;
    // An explicit list.
    let s = Server::start("allowed_hosts = [\"api.example.com\", \"*.internal.example\"]\n").await;
    for (host, want) in [
        ("api.example.com", 200),
        ("API.example.com:443", 200),
        ("x.internal.example", 200),
        ("evil.com", 403),
        ("localhost", 403),
        ("10.0.0.7:8000", 200),
    ] {
        let r = raw(
            &s.addr,
            format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, want, "{host}: {r:?}");
    }
    s.shutdown().await;
    // Any host.
    let s = Server::start("allowed_hosts = [\"*\"]\n").await;
    let r = raw(
        &s.addr,
        b"GET /health HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    s.shutdown().await;
}

// ---------------------------------------------------------------- authorization

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_is_case_insensitive() {
    let s = Server::start(&format!(
        "[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n",
        hash_key("key-a")
    ))
    .await;
    for value in [
        "Bearer key-a",
        "BEARER key-a",
        "bearer key-a",
        "bEaReR   key-a",
    ] {
        let r = s
            .client
            .get(s.url("/v1/models"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{value}");
    }
    for value in ["Basic key-a", "Bearerkey-a", "Bearer key-b"] {
        let r = s
            .client
            .get(s.url("/v1/models"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{value}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_key() {
    // Open by default.
    let s = Server::start("").await;
    assert_eq!(
        s.client
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.shutdown().await;
    // With metrics_api_keys, only those keys (not the tenants') may scrape.
    let toml = format!(
        "metrics_api_keys = [\"{}\"]\n[[tenants]]\nname = \"secret-team\"\napi_keys = [\"{}\"]\n",
        hash_key("scrape-key"),
        hash_key("key-a")
    );
    let s = Server::start(&toml).await;
    for auth in [None, Some("Bearer nope"), Some("Bearer key-a")] {
        let mut r = s.client.get(s.url("/metrics"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let text = r.text().await.unwrap();
        assert!(!text.contains("secret-team"), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    }
    let r = s
        .client
        .get(s.url("/metrics"))
        .bearer_auth("scrape-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("brigade"));
    // The probes stay open.
    assert_eq!(
        s.client
            .get(s.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.shutdown().await;
}
