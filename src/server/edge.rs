//! The HTTP edge: the accept loop, one hyper HTTP/1.1 connection per socket,
//! and the checks that run on every request before routing.
//!
//! Owns: the connection cap (`server.max_connections`), the header-read and
//! idle keep-alive timeouts, closing connections on drain, JSON bodies for the
//! errors hyper answers by itself, and the `Host`, URI-length, `/metrics` key
//! and JSON `Content-Type` checks. Does not own: routing, handlers, tenants'
//! authentication (`routes`, `auth`), or the drain of requests (`serve_with`).
//!
//! ```text
//!  accept ──► slot free? ──no──► "503 + JSON, Connection: close", then close
//!     │yes (one permit of max_connections, held until the socket closes)
//!     ▼
//!  connection task: hyper http1 ◄── EdgeIo (tracks the phase, rewrites hyper's
//!     │                              empty 400/414/431 into JSON bodies)
//!     │  phase  Fresh ─bytes─► Head ─request─► Busy ─body ends─► Tail ─flushed─► Idle ─bytes─► Head …
//!     │  timer  header_read_timeout (Fresh/Head) · keep_alive_timeout (Idle) · none (Busy/Tail)
//!     ▼
//!  drain: Idle/Fresh close at once, Busy/Tail finish their response with
//!  `Connection: close`, Head is served once; Forced drops whatever is left.
//! ```
//!
//! Why an IO wrapper rewrites responses: on a request it cannot parse (bad
//! request line or header, bad `Content-Length`/`Transfer-Encoding` framing, a
//! head over `max_header_bytes` or 100 fields, a URI over 65534 bytes) hyper
//! writes an automatic `400`/`414`/`431` with an empty body and offers no hook
//! to change it. Such a response is the only thing hyper writes while no
//! request is in the service and the previous response is flushed, so
//! [`EdgeIo`] recognises it there and writes the JSON error instead. A head
//! that never completes (slowloris) gets no response, only a close (as hyper,
//! nginx and Go do). One case keeps hyper's empty body: a malformed request
//! pipelined behind a response whose last bytes are not yet flushed (both leave
//! in one write, which is passed through unchanged).

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::auth::KeyDirectory;
use super::config::{ServerConfig, MAX_URI_BYTES};
use super::error::ApiError;
use crate::metrics::Metrics;

/// Header fields hyper reads at most (its default); more gets 431.
const MAX_HEADER_FIELDS: usize = 100;
/// Connections over the cap being answered at once; beyond, they are closed unanswered.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long answering a connection over the cap may take.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);
/// Pause after an accept error that is not the peer's (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(250);

// ---------------------------------------------------------------- request checks

/// The checks run on every request before routing, built once from `[server]`.
#[derive(Debug)]
pub(crate) struct RequestChecks {
    hosts: HostPolicy,
    max_uri_bytes: usize,
    /// None = `/metrics` is open.
    metrics_keys: Option<KeyDirectory>,
}

impl RequestChecks {
    /// From the config and whether the listener is on a loopback address.
    pub(crate) fn new(cfg: &ServerConfig, loopback_listener: bool) -> Self {
        Self {
            hosts: HostPolicy::new(&cfg.allowed_hosts, loopback_listener),
            max_uri_bytes: cfg.max_uri_bytes,
            metrics_keys: (!cfg.metrics_api_keys.is_empty())
                .then(|| KeyDirectory::new([cfg.metrics_api_keys.as_slice()], false)),
        }
    }

    /// Host, URI length and the `/metrics` key; the error to answer instead of routing.
    pub(crate) fn check(&self, req: &Request) -> Result<(), ApiError> {
        // No Host (HTTP/1.0) passes: browsers always send one.
        let host = req
            .headers()
            .get(header::HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if let Some(host) = host {
            if !self.hosts.allows(&host) {
                return Err(ApiError::HostNotAllowed(host.chars().take(256).collect()));
            }
        }
        // The request target as sent (path and query), within hyper's own 65534.
        let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if uri_len > self.max_uri_bytes {
            return Err(ApiError::UriTooLong {
                limit: self.max_uri_bytes,
            });
        }
        if let (Some(keys), "/metrics") = (&self.metrics_keys, req.uri().path()) {
            let auth = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if keys.authenticate(auth).is_err() {
                return Err(ApiError::Unauthorized("/metrics requires `Authorization: Bearer <key>` with a key of server.metrics_api_keys".into()));
            }
        }
        Ok(())
    }
}

/// Which `Host` header values are served (DNS-rebinding protection).
#[derive(Debug, Clone, PartialEq)]
enum HostPolicy {
    /// Any host.
    Any,
    /// Names a DNS-rebinding page cannot send: `localhost`, `*.localhost` and
    /// names without a dot (never public DNS names).
    Loopback,
    /// Exact names (lower case) and `.suffix` patterns.
    List(Vec<String>),
}

impl HostPolicy {
    fn new(allowed: &[String], loopback_listener: bool) -> Self {
        if allowed.iter().any(|h| h == "*") {
            HostPolicy::Any
        } else if !allowed.is_empty() {
            HostPolicy::List(
                allowed
                    .iter()
                    .map(|h| h.strip_prefix('*').unwrap_or(h).to_ascii_lowercase())
                    .collect(),
            )
        } else if loopback_listener {
            HostPolicy::Loopback
        } else {
            HostPolicy::Any
        }
    }

    /// IP addresses always pass: a page whose origin is an IP address is
    /// same-origin with the server already (no rebinding), and probes such as
    /// Kubernetes' send the pod IP.
    fn allows(&self, host_header: &str) -> bool {
        let name = host_name(host_header);
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        match self {
            HostPolicy::Any => true,
            HostPolicy::Loopback => {
                name == "localhost"
                    || name.ends_with(".localhost")
                    || (!name.is_empty() && !name.contains('.'))
            }
            HostPolicy::List(list) => list.iter().any(|p| {
                if p.starts_with('.') {
                    name.ends_with(p.as_str())
                } else {
                    name == *p
                }
            }),
        }
    }
}

/// The host of a `Host` header value, lower case, without port or IPv6 brackets.
fn host_name(host_header: &str) -> String {
    let h = host_header.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        h.rsplit_once(':').map_or(h, |(n, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                h
            }
        })
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a `Content-Type` value is JSON: `application/json` or
/// `application/*+json`, any case, with or without parameters (`charset`).
fn is_json_content_type(value: &str) -> bool {
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Route layer of the JSON endpoints: a POST must carry a JSON `Content-Type` (415 otherwise).
///
/// A POST without `Content-Type` is parsed as JSON, as vLLM (FastAPI) does, so
/// `curl --data` with `-H` forgotten and minimal clients keep working, except
/// when it has an `Origin` header: only browsers send that, and a page's
/// `fetch()` with a typeless body needs no CORS preflight, so it could drive
/// the server. With a JSON type a browser must ask a preflight first, which
/// this server never grants.
pub(crate) async fn require_json(req: Request, next: Next) -> Response {
    if req.method() == Method::POST {
        match req.headers().get(header::CONTENT_TYPE) {
            Some(v) => {
                let value = String::from_utf8_lossy(v.as_bytes());
                if !is_json_content_type(&value) {
                    return ApiError::UnsupportedMediaType(format!(
                        "{:?}",
                        value.chars().take(128).collect::<String>()
                    ))
                    .into_response();
                }
            }
            None if req.headers().contains_key(header::ORIGIN) => {
                return ApiError::UnsupportedMediaType("no Content-Type (from a browser)".into())
                    .into_response();
            }
            None => {}
        }
    }
    next.run(req).await
}

// ---------------------------------------------------------------- the listener

/// What the connections are told, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Normal service.
    Serving,
    /// Draining: keep-alive off, idle connections close at once.
    Draining,
    /// The listener is closed; open connections finish.
    Stopped,
    /// Whatever is still open is dropped.
    Forced,
}

/// What every connection shares: settings, prepared responses, metrics.
#[derive(Debug)]
struct ConnShared {
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    max_header_bytes: usize,
    /// The JSON responses that replace hyper's automatic ones, by status.
    auto_responses: Vec<(u16, Bytes)>,
    /// Counts the errors answered here (`error_type` label), as the router does its own.
    metrics: Arc<Metrics>,
}

/// The accept loop and its connections; [`Edge::close`] ends them.
#[derive(Debug)]
pub(crate) struct Edge {
    stage: watch::Sender<Stage>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Edge {
    /// Starts accepting on `listener`, serving `router` on each connection.
    pub(crate) fn spawn(
        listener: TcpListener,
        router: Router,
        cfg: &ServerConfig,
        metrics: Arc<Metrics>,
    ) -> Edge {
        let shared = Arc::new(ConnShared {
            metrics,
            header_read_timeout: Duration::from_secs_f64(cfg.header_read_timeout_s),
            keep_alive_timeout: Duration::from_secs_f64(cfg.keep_alive_timeout_s),
            max_header_bytes: cfg.max_header_bytes,
            auto_responses: vec![
                (400, ApiError::Invalid { param: None, message: "Malformed HTTP request: the request line, a header, or the Content-Length / Transfer-Encoding framing is invalid".into() }),
                (414, ApiError::UriTooLong { limit: cfg.max_uri_bytes.min(MAX_URI_BYTES) }),
                (431, ApiError::HeadersTooLarge { limit: cfg.max_header_bytes, max_fields: MAX_HEADER_FIELDS }),
            ]
            .into_iter()
            .map(|(code, e)| (code, Bytes::from(e.http1_close_response())))
            .collect(),
        });
        let over_cap = Bytes::from(
            ApiError::Unavailable(format!(
                "the server has {} open connections, its limit (server.max_connections); retry later",
                cfg.max_connections
            ))
            .http1_close_response(),
        );
        let (stage, stage_rx) = watch::channel(Stage::Serving);
        let slots = Arc::new(Semaphore::new(cfg.max_connections));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            router,
            shared,
            slots.clone(),
            stage_rx,
            over_cap,
        ));
        Edge {
            stage,
            slots,
            max_connections: cfg.max_connections,
            accept_task,
        }
    }

    /// Drain: every connection stops keep-alive; idle ones close at once, busy
    /// ones after their response. The listener still answers (503 from the router).
    pub(crate) fn start_draining(&self) {
        self.stage.send_replace(Stage::Draining);
    }

    /// Closes the listener, waits up to `grace` for the connections to end,
    /// then drops the rest.
    pub(crate) async fn close(self, grace: Duration) {
        self.stage.send_replace(Stage::Stopped);
        let _ = self.accept_task.await; // ends at Stopped; a panic there has been reported already
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, self.slots.acquire_many(all))
            .await
            .is_err()
        {
            let open = self
                .max_connections
                .saturating_sub(self.slots.available_permits());
            tracing::warn!(
                open,
                grace_s = grace.as_secs_f64(),
                "connections still open after the drain; closing them"
            );
            self.stage.send_replace(Stage::Forced);
            // Dropping a connection is immediate; this only waits for the tasks to see it.
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.slots.acquire_many(all)).await;
        }
    }
}

/// Errors of one connection, not of the listener: go on at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    shared: Arc<ConnShared>,
    slots: Arc<Semaphore>,
    mut stage: watch::Receiver<Stage>,
    over_cap: Bytes,
) {
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stage.wait_for(|s| *s >= Stage::Stopped) => return,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // E.g. EMFILE: retrying at once would spin; the backoff lets connections close.
                tracing::warn!(error = %e, "accept failed; pausing");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    _ = stage.wait_for(|s| *s >= Stage::Stopped) => return,
                }
                continue;
            }
        };
        // Small writes (SSE tokens) go out at once.
        let _ = stream.set_nodelay(true); // best effort: only latency depends on it
        match slots.clone().try_acquire_owned() {
            Err(_) => {
                shared.metrics.on_error("service_unavailable_error");
                match refusals.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(refuse(stream, over_cap.clone(), permit));
                    }
                    // Too many being answered already: close at once, unanswered.
                    Err(_) => drop(stream),
                }
            }
            Ok(permit) => {
                let draining = *stage.borrow() >= Stage::Draining;
                tokio::spawn(serve_connection(
                    stream,
                    router.clone(),
                    shared.clone(),
                    stage.clone(),
                    permit,
                    draining,
                ));
            }
        }
    }
}

/// Answers a connection over the cap with the prepared 503 and closes it,
/// within [`REFUSAL_DEADLINE`]. Reads what the client sent until it closes, so
/// the close is a FIN after the response and not a reset that could discard it.
async fn refuse(mut stream: TcpStream, response: Bytes, _permit: OwnedSemaphorePermit) {
    let answer = async {
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, answer).await; // the client may be gone or slow: drop it either way
}

// ---------------------------------------------------------------- one connection

/// Where a connection is in its request cycle (see the module diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Accepted, nothing read yet.
    Fresh = 0,
    /// Reading a request head.
    Head = 1,
    /// A request is in the service or its response body is being produced.
    Busy = 2,
    /// The response body ended; hyper may still be writing its last bytes.
    Tail = 3,
    /// Kept alive, waiting for the next request.
    Idle = 4,
}

/// The state shared by a connection's IO, its service and its task (all on the
/// connection's task, so relaxed atomics suffice).
#[derive(Debug)]
struct ConnState {
    phase: AtomicU8,
    /// When the current phase's timer started, in ms since `epoch`.
    since_ms: AtomicU64,
    epoch: Instant,
    /// Woken on every phase change so the task re-arms its timer.
    changed: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Fresh as u8),
            since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Fresh,
            1 => Phase::Head,
            2 => Phase::Busy,
            3 => Phase::Tail,
            _ => Phase::Idle,
        }
    }

    fn set(&self, phase: Phase, restart_timer: bool) {
        if restart_timer {
            let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.since_ms.store(ms, Ordering::Relaxed);
        }
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// When the current phase times out (None: no timer while a request runs).
    fn deadline(&self, shared: &ConnShared) -> Option<Instant> {
        let timeout = match self.phase() {
            Phase::Fresh | Phase::Head => shared.header_read_timeout,
            Phase::Idle => shared.keep_alive_timeout,
            Phase::Busy | Phase::Tail => return None,
        };
        Some(self.epoch + Duration::from_millis(self.since_ms.load(Ordering::Relaxed)) + timeout)
    }

    fn on_bytes_read(&self) {
        match self.phase() {
            // The header-read timer runs from the connection's start.
            Phase::Fresh => self.set(Phase::Head, false),
            // The next request on a kept-alive connection: its own timer.
            Phase::Idle => self.set(Phase::Head, true),
            Phase::Head | Phase::Busy | Phase::Tail => {}
        }
    }

    fn on_flushed(&self) {
        if self.phase() == Phase::Tail {
            self.set(Phase::Idle, true);
        }
    }

    /// Whether a write now can only be one of hyper's automatic error responses.
    fn no_response_pending(&self) -> bool {
        matches!(self.phase(), Phase::Fresh | Phase::Head | Phase::Idle)
    }
}

/// Marks the request finished when the response body is done or dropped.
struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.set(Phase::Tail, false);
    }
}

/// The router's response body, carrying the connection's [`RequestGuard`].
struct GuardedBody {
    inner: axum::body::Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket as hyper sees it: reports reads and flushes to [`ConnState`], and
/// replaces hyper's automatic empty error responses with JSON ones.
struct EdgeIo {
    inner: TcpStream,
    state: Arc<ConnState>,
    shared: Arc<ConnShared>,
    /// Set once hyper wrote an automatic error: the JSON replacement still to
    /// send (from `.1`); every later hyper write is swallowed.
    replacement: Option<(Bytes, usize)>,
}

impl EdgeIo {
    /// Sends what is left of the replacement response.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, pos)) = &mut self.replacement {
            let Some(rest) = bytes.get(*pos..).filter(|r| !r.is_empty()) else {
                break;
            };
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *pos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The JSON response for one of hyper's automatic ones (`HTTP/1.1 NNN …`).
    fn replacement_for(&self, buf: &[u8]) -> Option<Bytes> {
        let code: u16 = std::str::from_utf8(buf.strip_prefix(b"HTTP/1.1 ")?.get(..3)?)
            .ok()?
            .parse()
            .ok()?;
        self.shared
            .auto_responses
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, b)| b.clone())
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_bytes_read();
        }
        r
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacement.is_some() {
            return Poll::Ready(Ok(buf.len()));
        }
        if self.state.no_response_pending() {
            if let Some(json) = self.replacement_for(buf) {
                self.shared.metrics.on_error("invalid_request_error");
                self.replacement = Some((json, 0));
                return Poll::Ready(Ok(buf.len())); // sent by poll_flush / poll_shutdown
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.state.on_flushed();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection until it closes, times out, or the server is forced
/// down. `draining`: accepted during the drain, so one request only.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    shared: Arc<ConnShared>,
    mut stage: watch::Receiver<Stage>,
    _slot: OwnedSemaphorePermit,
    accepted_draining: bool,
) {
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(EdgeIo {
        inner: stream,
        state: state.clone(),
        shared: shared.clone(),
        replacement: None,
    });
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        svc_state.set(Phase::Busy, false);
        let guard = RequestGuard(svc_state.clone());
        let mut router = router.clone();
        async move {
            let resp = match router.call(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(resp.map(|inner| GuardedBody {
                inner,
                _guard: guard,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our own timers (ConnState) replace hyper's, whose header timer also ends idle keep-alive.
    builder
        .header_read_timeout(None)
        .max_header_size(shared.max_header_bytes)
        .keep_alive(!accepted_draining);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = accepted_draining;
    let mut shutting_down = accepted_draining;
    loop {
        // On drain, a request whose head is arriving is still served (with
        // `Connection: close`); every other phase is shut down at once.
        if draining && !shutting_down && state.phase() != Phase::Head {
            conn.as_mut().graceful_shutdown();
            shutting_down = true;
        }
        let deadline = state.deadline(&shared);
        let timer = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = timer => {
                // Re-checked: a phase change may have moved the deadline.
                if state.deadline(&shared).is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!(phase = ?state.phase(), "connection timed out; closing");
                    return;
                }
            }
            () = state.changed.notified() => {}
            r = stage.changed() => {
                let now = if r.is_ok() { *stage.borrow_and_update() } else { Stage::Forced };
                match now {
                    Stage::Serving => {}
                    Stage::Draining | Stage::Stopped => draining = true,
                    Stage::Forced => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name("Example.COM:8000"), "example.com");
        assert_eq!(host_name("[::1]:8000"), "::1");
        assert_eq!(host_name("[::1]"), "::1");
        assert_eq!(host_name("localhost."), "localhost");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn host_policies() {
        let lo = HostPolicy::new(&[], true);
        for ok in [
            "localhost:8000",
            "127.0.0.1:1",
            "[::1]:2",
            "10.1.2.3",
            "api.localhost",
            "myhost",
        ] {
            assert!(lo.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "attacker.com:8000",
            "localhost.evil.com",
            "",
        ] {
            assert!(!lo.allows(bad), "{bad}");
        }
        assert_eq!(HostPolicy::new(&[], false), HostPolicy::Any);
        assert_eq!(
            HostPolicy::new(&["a.com".into(), "*".into()], true),
            HostPolicy::Any
        );
        let list = HostPolicy::new(&["API.example.com".into(), "*.internal".into()], true);
        for ok in [
            "api.example.com",
            "api.example.com:443",
            "x.internal",
            "a.b.internal",
        ] {
            assert!(list.allows(ok), "{ok}");
        }
        for bad in ["example.com", "internal", "xinternal", "localhost"] {
            assert!(!list.allows(bad), "{bad}");
        }
        assert!(
            list.allows("10.0.0.7:8000") && list.allows("[fe80::1]"),
            "IP addresses always pass"
        );
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.api+json",
        ] {
            assert!(is_json_content_type(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
            "json",
        ] {
            assert!(!is_json_content_type(bad), "{bad}");
        }
    }

    #[test]
    fn phases_and_deadlines() {
        let shared = ConnShared {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(30),
            max_header_bytes: 1 << 15,
            auto_responses: Vec::new(),
            metrics: Arc::new(Metrics::new("test").unwrap()),
        };
        let s = ConnState::new();
        let fresh = s.deadline(&shared).unwrap();
        s.on_bytes_read();
        assert_eq!(s.phase(), Phase::Head);
        assert_eq!(
            s.deadline(&shared),
            Some(fresh),
            "the header timer runs from the connection's start"
        );
        assert!(s.no_response_pending());
        s.set(Phase::Busy, false);
        assert_eq!(s.deadline(&shared), None);
        assert!(!s.no_response_pending());
        drop(RequestGuard(Arc::new(ConnState::new()))); // another connection's guard
        assert_eq!(s.phase(), Phase::Busy);
        s.set(Phase::Tail, false);
        s.on_bytes_read(); // pipelined bytes do not end the tail
        assert_eq!(s.phase(), Phase::Tail);
        assert!(!s.no_response_pending());
        s.on_flushed();
        assert_eq!(s.phase(), Phase::Idle);
        assert!(s.deadline(&shared).unwrap() >= fresh + Duration::from_secs(20));
        s.on_bytes_read();
        assert_eq!(s.phase(), Phase::Head);
    }
}
