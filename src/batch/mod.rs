//! `brigade run-batch`: an OpenAI batch input file (JSONL) in, a results
//! file out, through the server's own router and the engine, offline.
//!
//! ```text
//!  input.jsonl ─► input::plan (keys, duplicates, shard, method/url/body checks)
//!     ├─ bad line ───────────────────────────────────────────────┐
//!     └─ request ─► [≤ in_flight tasks] ─► server router (in-process, no TCP):
//!                     same body parsing, validation, admission, engine and
//!                     response builders as `brigade serve` ─► status + body
//!                                                                 ▼
//!                               writer thread: one write + fdatasync per line ─► results.jsonl
//! ```
//!
//! Each request is an HTTP request handed to [`crate::server::routes::router`]
//! as a tower service, so a batch line's `response.body` is byte-for-byte the
//! body `POST {url}` returns from `brigade serve` (ids and timestamps aside),
//! and every check the server makes, it makes here. Concurrency is the
//! server's: the admission actor keeps `server.max_running` (default
//! `runtime.max_seqs`) sequences in the engine; this module keeps twice that
//! many requests in flight so the fair queue never runs dry nor overflows.
//!
//! # Output lines
//!
//! `{"id": "batch_req_…", "custom_id", "response": {"status_code",
//! "request_id", "body"} | null, "error": {"code", "message"} | null}`:
//! - 200: `response` holds the endpoint's body, `error` is `null`;
//! - the endpoint answered an error (4xx/5xx, e.g. an invalid `temperature`):
//!   `response` holds its status and OpenAI error body, and `error` repeats its
//!   code (`error.code`, else `error.type`) and message (as vLLM writes them);
//! - the line never reached an endpoint (see [`input`]): `response` is `null`.
//!
//! # Resume
//!
//! Lines are appended as requests finish (completion order). A rerun of the
//! same command reads the results file ([`output::recover`]), cuts a torn last
//! line, and runs only the keys not in it, so after any number of crashes the
//! file holds every key of the input (shard) exactly once.
//!
//! The served Batch API (`/v1/files`, `/v1/batches` of `brigade serve`) runs
//! its batches with the same plan, recovery and per-request path: [`store`]
//! keeps its state, [`runner`] runs it.

pub mod input;
pub mod output;
pub mod runner;
pub mod store;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, Request};
use serde::Serialize;
use serde_json::Value;
use tower_service::Service;

pub use input::{BatchUrl, Planned, Shard};
pub use output::{OutputError, OutputFileError, OutputLine, OutputResponse};

use crate::engine::EngineHandle;
use crate::server::{routes, App, ServerConfig};

/// `brigade run-batch` options.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// The input file (`-i`).
    pub input: PathBuf,
    /// The results file (`-o`), appended to.
    pub output: PathBuf,
    /// Which lines to run.
    pub shard: Shard,
    /// Draw a progress bar when stderr is a terminal (else a plain line every `progress_interval`).
    pub progress: bool,
    /// Period of the plain progress line when stderr is not a terminal.
    pub progress_interval: Duration,
}

/// Why a batch could not run (a bad *line* is never one of these).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The input file could not be read.
    #[error("reading {}: {source}", path.display())]
    ReadInput {
        /// The `-i` file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The results file could not be recovered or written.
    #[error(transparent)]
    Output(#[from] OutputFileError),
    /// The in-process server state could not be built (e.g. its metrics registry).
    #[error("setting up the server state: {0}")]
    App(String),
    /// The writer thread could not start.
    #[error("starting the results writer: {0}")]
    Writer(std::io::Error),
}

/// The final summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BatchSummary {
    /// Lines of this shard (requests and bad lines).
    pub requests: usize,
    /// Of those, already in the results file before this run.
    pub skipped: usize,
    /// Answered in this run with status 200.
    pub succeeded: usize,
    /// Answered in this run with an error, by code.
    pub errors: BTreeMap<String, usize>,
    /// Prompt tokens of this run's successful requests.
    pub input_tokens: u64,
    /// Generated tokens of this run's successful requests.
    pub output_tokens: u64,
    /// Generated tokens per second of wall time.
    pub output_tokens_per_s: f64,
    /// Prompt + generated tokens per second of wall time.
    pub total_tokens_per_s: f64,
    /// Wall time of this run, seconds (engine already started).
    pub wall_s: f64,
    /// Bytes of a torn last line cut from the results file.
    pub truncated_bytes: u64,
}

impl BatchSummary {
    /// Errors in total.
    pub fn num_errors(&self) -> usize {
        self.errors.values().sum()
    }
}

impl std::fmt::Display for BatchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errs: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(f, "run-batch summary")?;
        writeln!(
            f,
            "  requests      {} ({} already done, {} ok, {} errors)",
            self.requests,
            self.skipped,
            self.succeeded,
            self.num_errors()
        )?;
        if !errs.is_empty() {
            writeln!(f, "  errors        {}", errs.join(" "))?;
        }
        writeln!(
            f,
            "  tokens        {} input, {} output",
            self.input_tokens, self.output_tokens
        )?;
        writeln!(
            f,
            "  throughput    {:.1} output tok/s, {:.1} total tok/s",
            self.output_tokens_per_s, self.total_tokens_per_s
        )?;
        write!(f, "  wall time     {:.2} s", self.wall_s)?;
        if self.truncated_bytes > 0 {
            write!(
                f,
                "\n  recovered     cut a torn last line of {} bytes (redone)",
                self.truncated_bytes
            )?;
        }
        Ok(())
    }
}

/// Counters shared by the tasks and the progress reporter.
#[derive(Default)]
struct Progress {
    done: AtomicUsize,
    errors: AtomicUsize,
    output_tokens: AtomicU64,
}

/// The in-process server state: the router's handlers, on an open key
/// directory (the batch's owner is the only tenant).
fn app(engine: &EngineHandle, server: &ServerConfig) -> Result<App, BatchError> {
    let mut cfg = server.clone();
    cfg.tenants.clear();
    cfg.batch_data_dir = None; // the Batch API is `brigade serve`'s
    crate::server::build_app(engine, cfg, true).map_err(|e| BatchError::App(e.to_string()))
}

/// Requests kept in flight: enough to keep the admission queue full, within its bounds.
fn in_flight(app: &App) -> usize {
    let running = if app.cfg.max_running == 0 {
        app.engine.config().runtime.max_seqs
    } else {
        app.cfg.max_running
    };
    let queued = app
        .tenants
        .first()
        .map_or(1, |t| t.max_queued)
        .min(app.cfg.admission_inbox);
    (2 * running).min(running + queued).max(1)
}

/// Runs the batch: recovers the results file, answers every line of the shard
/// not in it, and returns the summary. The engine is left running.
pub async fn run(
    engine: &EngineHandle,
    server: &ServerConfig,
    opts: &BatchOptions,
) -> Result<BatchSummary, BatchError> {
    let text = tokio::fs::read_to_string(&opts.input)
        .await
        .map_err(|source| BatchError::ReadInput {
            path: opts.input.clone(),
            source,
        })?;
    let planned = input::plan(&text, opts.shard);
    drop(text);
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| OutputFileError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let recovered = output::recover(&opts.output)?;
    let mut summary = BatchSummary {
        requests: planned.len(),
        truncated_bytes: recovered.truncated_bytes,
        ..Default::default()
    };
    let todo: Vec<Planned> = planned
        .into_iter()
        .filter(|p| !recovered.done.contains(p.custom_id()))
        .collect();
    summary.skipped = summary.requests - todo.len();
    let total = todo.len();

    // The writer: a thread that owns the file; results arrive in completion order.
    let mut appender = output::Appender::open(&opts.output)?;
    let (line_tx, line_rx) = std::sync::mpsc::channel::<OutputLine>();
    let writer = std::thread::Builder::new()
        .name("batch-writer".into())
        .spawn(move || -> Result<(), OutputFileError> {
            while let Ok(line) = line_rx.recv() {
                appender.append(&line)?;
            }
            Ok(())
        })
        .map_err(BatchError::Writer)?;

    let app = app(engine, server)?;
    let router = routes::router(app.clone());
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight(&app)));
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let reporter = spawn_reporter(progress.clone(), total, opts, start);

    let mut tasks = tokio::task::JoinSet::new();
    let mut stats: Vec<(Option<String>, u64, u64)> = Vec::with_capacity(total);
    for p in todo {
        match p {
            Planned::Fail {
                custom_id,
                code,
                message,
                ..
            } => {
                let line = OutputLine {
                    id: batch_id(),
                    custom_id,
                    response: None,
                    error: Some(OutputError {
                        code: code.to_string(),
                        message,
                    }),
                };
                progress.done.fetch_add(1, Ordering::Relaxed);
                progress.errors.fetch_add(1, Ordering::Relaxed);
                stats.push((Some(code.to_string()), 0, 0));
                if line_tx.send(line).is_err() {
                    break; // the writer failed: its error is returned below
                }
            }
            Planned::Run {
                custom_id,
                url,
                body,
                ..
            } => {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (router, line_tx, progress) =
                    (router.clone(), line_tx.clone(), progress.clone());
                tasks.spawn(async move {
                    let (line, usage) = answer(router, custom_id, url, Value::Object(body)).await;
                    drop(permit);
                    progress.done.fetch_add(1, Ordering::Relaxed);
                    let code = line.error.as_ref().map(|e| e.code.clone());
                    if code.is_some() {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    progress.output_tokens.fetch_add(usage.1, Ordering::Relaxed);
                    let _ = line_tx.send(line); // the writer failed: its error is returned below
                    (code, usage.0, usage.1)
                });
            }
        }
        while let Some(r) = tasks.try_join_next() {
            stats.extend(r.ok());
        }
        if writer.is_finished() {
            break;
        }
    }
    while let Some(r) = tasks.join_next().await {
        stats.extend(r.ok());
    }
    drop(line_tx);
    let written = tokio::task::spawn_blocking(move || writer.join()).await;
    reporter.finish();
    match written {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e.into()),
        _ => {
            return Err(BatchError::Writer(std::io::Error::other(
                "the results writer panicked",
            )))
        }
    }
    summary.wall_s = start.elapsed().as_secs_f64();
    for (code, inp, out) in stats {
        match code {
            Some(c) => *summary.errors.entry(c).or_default() += 1,
            None => summary.succeeded += 1,
        }
        summary.input_tokens += inp;
        summary.output_tokens += out;
    }
    let wall = summary.wall_s.max(1e-9);
    summary.output_tokens_per_s = summary.output_tokens as f64 / wall;
    summary.total_tokens_per_s = (summary.input_tokens + summary.output_tokens) as f64 / wall;
    Ok(summary)
}

fn batch_id() -> String {
    format!("batch_req_{}", uuid::Uuid::new_v4().simple())
}

/// One request through the router: its output line and (prompt, completion) tokens.
async fn answer(
    router: axum::Router,
    custom_id: String,
    url: BatchUrl,
    body: Value,
) -> (OutputLine, (u64, u64)) {
    answer_as(router, custom_id, url, body, None).await
}

/// [`answer`] as tenant `caller` when given (the Batch API: the batch's owner,
/// without its key); then a 429 (the tenant's own bounds) is retried for as long as it lasts.
async fn answer_as(
    mut router: axum::Router,
    custom_id: String,
    url: BatchUrl,
    body: Value,
    caller: Option<usize>,
) -> (OutputLine, (u64, u64)) {
    let request_id = format!("req_{}", uuid::Uuid::new_v4().simple());
    let fail = |code: &str, message: String| OutputLine {
        id: batch_id(),
        custom_id: custom_id.clone(),
        response: None,
        error: Some(OutputError {
            code: code.to_string(),
            message,
        }),
    };
    let bytes = match serde_json::to_vec(&body) {
        Ok(b) => b,
        Err(e) => {
            return (
                fail("internal_error", format!("serializing the body: {e}")),
                (0, 0),
            )
        }
    };
    // Overload (429) cannot happen with the in-flight bound; retried if it does.
    let mut backoff = Duration::from_millis(20);
    let (status, body) = loop {
        let req = Request::post(url.path())
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", request_id.as_str())
            .body(axum::body::Body::from(bytes.clone()));
        let req = match req {
            Ok(mut r) => {
                if let Some(tenant) = caller {
                    r.extensions_mut()
                        .insert(crate::server::routes::BatchCaller { tenant });
                }
                r
            }
            Err(e) => {
                return (
                    fail("internal_error", format!("building the request: {e}")),
                    (0, 0),
                )
            }
        };
        let resp = match std::future::poll_fn(|cx| {
            Service::<Request<axum::body::Body>>::poll_ready(&mut router, cx)
        })
        .await
        {
            Ok(()) => router.call(req).await,
            Err(e) => match e {},
        };
        let Ok(resp) = resp;
        let status = resp.status();
        let body = match axum::body::to_bytes(resp.into_body(), usize::MAX).await {
            Ok(b) => b,
            Err(e) => {
                return (
                    fail("internal_error", format!("reading the response: {e}")),
                    (0, 0),
                )
            }
        };
        if status.as_u16() == 429 && (backoff < Duration::from_secs(5) || caller.is_some()) {
            tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        break (status, body);
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return (
                fail(
                    "internal_error",
                    format!("the endpoint answered {status} with a non-JSON body: {e}"),
                ),
                (0, 0),
            )
        }
    };
    let usage = |k: &str| {
        body.get("usage")
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let tokens = if status.is_success() {
        (usage("prompt_tokens"), usage("completion_tokens"))
    } else {
        (0, 0)
    };
    let error = (!status.is_success()).then(|| {
        let e = body.get("error");
        let s = |k: &str| {
            e.and_then(|e| e.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        OutputError {
            code: s("code")
                .or_else(|| s("type"))
                .unwrap_or_else(|| format!("http_{}", status.as_u16())),
            message: s("message").unwrap_or_else(|| format!("the endpoint answered {status}")),
        }
    });
    let response = OutputResponse {
        status_code: status.as_u16(),
        request_id,
        body,
    };
    (
        OutputLine {
            id: batch_id(),
            custom_id,
            response: Some(response),
            error,
        },
        tokens,
    )
}

/// The progress display: an `indicatif` bar on a terminal, else a plain line
/// every `interval` (none when progress is off).
enum Reporter {
    Bar(indicatif::ProgressBar, tokio::task::JoinHandle<()>),
    Lines(tokio::task::JoinHandle<()>),
    Off,
}

impl Reporter {
    fn finish(self) {
        match self {
            Reporter::Bar(bar, h) => {
                h.abort();
                bar.finish_and_clear();
            }
            Reporter::Lines(h) => h.abort(),
            Reporter::Off => {}
        }
    }
}

fn spawn_reporter(p: Arc<Progress>, total: usize, opts: &BatchOptions, start: Instant) -> Reporter {
    if !opts.progress {
        return Reporter::Off;
    }
    let rate = move |p: &Progress| {
        p.output_tokens.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64().max(1e-9)
    };
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total as u64);
        let style = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} {msg} elapsed {elapsed} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        let b = bar.clone();
        let h = tokio::spawn(async move {
            loop {
                b.set_position(p.done.load(Ordering::Relaxed) as u64);
                b.set_message(format!(
                    "{:.1} tok/s, {} errors",
                    rate(&p),
                    p.errors.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Reporter::Bar(bar, h)
    } else {
        let interval = opts.progress_interval.max(Duration::from_millis(100));
        let h = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let done = p.done.load(Ordering::Relaxed);
                let r = rate(&p);
                let elapsed = start.elapsed().as_secs_f64();
                let eta = if done > 0 {
                    format!(
                        "{:.0} s",
                        elapsed * (total - done.min(total)) as f64 / done as f64
                    )
                } else {
                    "?".to_string()
                };
                eprintln!(
                    "run-batch: {done}/{total} done, {} errors, {r:.1} output tok/s (finished requests), elapsed {elapsed:.0} s, ETA {eta}",
                    p.errors.load(Ordering::Relaxed),
                );
            }
        });
        Reporter::Lines(h)
    }
}
