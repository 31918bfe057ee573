//! The Batch API's runner: a tokio task of `brigade serve` that takes the
//! store's active batches and answers their requests through the server's own
//! router, as background work of the batch's tenant.
//!
//! ```text
//!  store: validating ─► in_progress ─────────────► finalizing ─► completed
//!            │              │  (every line answered)
//!            └► failed      ├─ cancel ─► cancelling ─(in-flight done)─► cancelled
//!                           └─ expires_at passed ─(rest: batch_expired lines)─► expired
//!
//!  per batch: input::plan ─► skip ids already in the result files (output::recover)
//!     ─► [in-flight bound, all batches: batch_max_in_flight, or batch_busy_in_flight
//!         while interactive requests run] ─► router (in-process, as the
//!        tenant, admission class Background) ─► writer thread: line + fdatasync
//!        into the output file (success) or the error file (error), counts → store
//! ```
//!
//! Restart safety is `brigade run-batch`'s: result lines are appended whole
//! and synced, so after a `kill -9` the next start recovers both files (a torn
//! last line is cut and redone) and runs only the `custom_id`s in neither:
//! every one is answered exactly once. A request the server refused because it
//! was shutting down (503) is not written: it runs again after the restart.
//!
//! Interactive latency: batch requests queue in the admission's background
//! class (admitted after interactive ones), and while any interactive request
//! is queued or running, or was within the last [`BUSY_WINDOW`], at most
//! `server.batch_busy_in_flight` batch requests are started (those already
//! running finish), so the engine's steps stay short for interactive traffic;
//! when it is idle, batches use up to `server.batch_max_in_flight`.
//!
//! Owns: batch progress. Does not own: rows and paths ([`super::store`]), line
//! formats ([`super::output`]), HTTP ([`crate::server::openai_batches`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Notify;

use super::input::{self, Planned, Shard};
use super::output::{self, Appender, OutputError, OutputFileError, OutputLine};
use super::store::{BatchRecord, FileRecord, RequestCounts, Status, Store, StoreError};
use crate::server::admission::{with_class, Class};
use crate::server::{routes, unix_now, App};

/// The Batch API's shared state: the store and the runner's wake-up and cancel flags.
pub struct BatchApi {
    /// Files and batches.
    pub store: Store,
    wake: Notify,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

impl std::fmt::Debug for BatchApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchApi")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Why a batch's run stopped before it ended (it is retried later).
#[derive(Debug, thiserror::Error)]
enum DriveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Output(#[from] OutputFileError),
    #[error("the result writer stopped")]
    Writer,
}

/// How the requests phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Cancelled,
    Expired,
    /// The server is shutting down: resume after the restart.
    Interrupted,
}

impl BatchApi {
    /// Opens the store in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self {
            store: Store::open(dir)?,
            wake: Notify::new(),
            cancels: Mutex::new(HashMap::new()),
        })
    }

    /// Tells the runner to look for new work (a batch was created).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Tells a running batch to stop taking requests (its row says `cancelling` already).
    pub fn cancel(&self, id: &str) {
        if let Some(f) = self.lock_cancels().get(id) {
            f.store(true, Ordering::SeqCst);
        }
        self.wake();
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How long after the last interactive request batches stay at `batch_busy_in_flight`.
pub const BUSY_WINDOW: Duration = Duration::from_secs(2);

/// The bound on batch requests in flight over all batches (module docs).
struct Limiter {
    in_flight: std::sync::atomic::AtomicUsize,
    freed: Notify,
    /// When no interactive request is about: `server.batch_max_in_flight` (0 = ¾ of `max_running`).
    idle_limit: usize,
    /// While interactive requests are about: `server.batch_busy_in_flight`.
    busy_limit: usize,
}

/// One batch request's place under the [`Limiter`].
struct Slot(Arc<Limiter>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.freed.notify_waiters();
    }
}

impl Limiter {
    fn new(app: &App) -> Self {
        let running = if app.cfg.max_running == 0 {
            app.engine.config().runtime.max_seqs
        } else {
            app.cfg.max_running
        };
        let idle_limit = match app.cfg.batch_max_in_flight {
            0 => (running * 3 / 4).max(1),
            n => n,
        };
        let busy_limit = app.cfg.batch_busy_in_flight.min(idle_limit);
        Self {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            freed: Notify::new(),
            idle_limit,
            busy_limit,
        }
    }

    /// Waits for room under the bound in force (rechecked as slots free and every 50 ms).
    async fn acquire(self: &Arc<Self>, app: &App) -> Slot {
        loop {
            let limit = if app.admission.interactive_busy(BUSY_WINDOW) {
                self.busy_limit
            } else {
                self.idle_limit
            };
            let n = self.in_flight.load(Ordering::SeqCst);
            if n < limit
                && self
                    .in_flight
                    .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                return Slot(self.clone());
            }
            if n < limit {
                continue; // lost a race with another batch: look again
            }
            tokio::select! {
                _ = self.freed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// Spawns the runner on the current runtime (when the Batch API is on); it
/// ends when the server drains (what is running then resumes at the next start).
pub fn spawn(app: App) -> Option<tokio::task::JoinHandle<()>> {
    let api = app.batches.clone()?;
    Some(tokio::spawn(run(app, api)))
}

async fn run(app: App, api: Arc<BatchApi>) {
    let permits = Arc::new(Limiter::new(&app));
    let router = routes::router(app.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    // A batch whose run failed (e.g. the disk): retried after a pause, not in a loop.
    let mut retry_at: HashMap<String, Instant> = HashMap::new();
    loop {
        let draining = app.draining.load(Ordering::Relaxed);
        if draining && tasks.is_empty() {
            return;
        }
        if !draining {
            match api.store.active_batches() {
                Ok(ids) => {
                    for id in ids {
                        if running.values().any(|r| *r == id)
                            || retry_at.get(&id).is_some_and(|t| Instant::now() < *t)
                        {
                            continue;
                        }
                        let flag = Arc::new(AtomicBool::new(false));
                        api.lock_cancels().insert(id.clone(), flag.clone());
                        let ctx = Ctx {
                            app: app.clone(),
                            api: api.clone(),
                            permits: permits.clone(),
                            router: router.clone(),
                            cancel: flag,
                        };
                        let batch = id.clone();
                        let handle = tasks.spawn(async move { ctx.drive(&batch).await });
                        running.insert(handle.id(), id);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "batch runner: reading the active batches failed")
                }
            }
        }
        tokio::select! {
            _ = api.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            Some(r) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let (task, result) = match r {
                    Ok((task, result)) => (task, result),
                    Err(e) => (e.id(), Err(DriveError::Writer)),
                };
                if let Some(id) = running.remove(&task) {
                    api.lock_cancels().remove(&id);
                    if let Err(e) = result {
                        tracing::warn!(batch = %id, error = %e, "batch run stopped; retrying in 30 s");
                        retry_at.insert(id, Instant::now() + Duration::from_secs(30));
                    }
                }
            }
        }
    }
}

/// What one batch's run needs.
struct Ctx {
    app: App,
    api: Arc<BatchApi>,
    permits: Arc<Limiter>,
    router: axum::Router,
    cancel: Arc<AtomicBool>,
}

/// The OpenAI `errors` object with one entry.
fn errors_list(code: &str, message: String, line: Option<usize>) -> Value {
    json!({"object": "list", "data": [{"code": code, "message": message, "param": null, "line": line}]})
}

impl Ctx {
    fn store(&self) -> &Store {
        &self.api.store
    }

    fn get(&self, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        self.store().get_batch(None, id)
    }

    /// Takes batch `id` from wherever it is to its end (or to a stop to resume later).
    async fn drive(self, id: &str) -> Result<(), DriveError> {
        let Some(mut b) = self.get(id)? else {
            return Ok(());
        };
        if b.status == Status::Validating {
            match self.validate(&b) {
                Err(errors) => {
                    self.store().fail(id, &errors, unix_now())?;
                }
                Ok(total) => {
                    self.store().set_counts(
                        id,
                        RequestCounts {
                            total,
                            completed: 0,
                            failed: 0,
                        },
                    )?;
                    self.store().transition(
                        id,
                        &[Status::Validating],
                        Status::InProgress,
                        unix_now(),
                    )?;
                }
            }
            let Some(again) = self.get(id)? else {
                return Ok(());
            };
            b = again;
        }
        if b.status == Status::InProgress {
            match self.run_requests(&b).await? {
                Outcome::Interrupted => return Ok(()),
                Outcome::Done => {
                    self.store().transition(
                        id,
                        &[Status::InProgress],
                        Status::Finalizing,
                        unix_now(),
                    )?;
                }
                Outcome::Cancelled => {}
                Outcome::Expired => {
                    self.register_results(&b)?;
                    self.store().transition(
                        id,
                        &[Status::InProgress],
                        Status::Expired,
                        unix_now(),
                    )?;
                }
            }
            let Some(again) = self.get(id)? else {
                return Ok(());
            };
            b = again;
        }
        match b.status {
            Status::Finalizing => {
                self.register_results(&b)?;
                self.store().transition(
                    id,
                    &[Status::Finalizing],
                    Status::Completed,
                    unix_now(),
                )?;
            }
            Status::Cancelling => {
                self.register_results(&b)?;
                self.store().transition(
                    id,
                    &[Status::Cancelling],
                    Status::Cancelled,
                    unix_now(),
                )?;
            }
            _ => {}
        }
        if self.get(id)?.is_some_and(|b| !b.status.is_active()) {
            self.store().drop_orphan(&b.input_file_id)?;
        }
        Ok(())
    }

    /// The input file's text, or the batch-level error (`errors`) that fails it.
    fn input_text(&self, b: &BatchRecord) -> Result<String, Value> {
        let path = self.store().file_path(&b.input_file_id);
        std::fs::read_to_string(&path).map_err(|e| {
            errors_list(
                "invalid_file",
                format!("reading the input file {}: {e}", b.input_file_id),
                None,
            )
        })
    }

    /// Checks the input file as a whole; `Ok(requests)` or the `errors` object.
    /// Bad lines are not a batch error: each gets an error line (as in `brigade run-batch`).
    fn validate(&self, b: &BatchRecord) -> Result<u64, Value> {
        let text = self.input_text(b)?;
        let plan = input::plan(&text, Shard::ALL);
        if plan.is_empty() {
            return Err(errors_list(
                "empty_file",
                format!("the input file {} has no requests", b.input_file_id),
                None,
            ));
        }
        let max = self.app.cfg.batch_max_requests;
        if plan.len() > max {
            return Err(errors_list(
                "too_many_requests",
                format!(
                    "the input file has {} requests, more than server.batch_max_requests = {max}",
                    plan.len()
                ),
                None,
            ));
        }
        Ok(plan.len() as u64)
    }

    /// Registers the result files that have lines as the batch's output / error files.
    fn register_results(&self, b: &BatchRecord) -> Result<(), StoreError> {
        let mut ids = [None, None];
        for (i, (file, suffix)) in [(&b.out_id, "output"), (&b.err_id, "error")]
            .into_iter()
            .enumerate()
        {
            let path = self.store().file_path(file);
            let text = match std::fs::read(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Io { path, source }),
            };
            let lines = text
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .count() as u64;
            if lines == 0 {
                continue;
            }
            self.store().insert_file(&FileRecord {
                id: file.clone(),
                object: "file",
                bytes: text.len() as u64,
                created_at: unix_now(),
                filename: format!("{}_{suffix}.jsonl", b.id),
                purpose: "batch_output".into(),
                status: "processed",
                expires_at: None,
                status_details: None,
                tenant: b.tenant.clone(),
                lines,
            })?;
            ids[i] = Some(file.as_str());
        }
        self.store().set_result_files(&b.id, ids[0], ids[1])
    }

    /// Answers every request not yet in the result files.
    async fn run_requests(&self, b: &BatchRecord) -> Result<Outcome, DriveError> {
        let text = match self.input_text(b) {
            Ok(t) => t,
            Err(e) => {
                return Err(StoreError::Corrupt {
                    what: "input file",
                    why: e.to_string(),
                }
                .into())
            }
        };
        let plan = input::plan(&text, Shard::ALL);
        drop(text);
        let Some(tenant) = self.app.tenants.iter().position(|t| t.name == b.tenant) else {
            // The tenant left the configuration: its batch waits (it may come back).
            return Err(StoreError::Corrupt {
                what: "tenant",
                why: format!("tenant {:?} is not configured", b.tenant),
            }
            .into());
        };
        let out_path = self.store().file_path(&b.out_id);
        let err_path = self.store().file_path(&b.err_id);
        let ok = output::recover(&out_path)?;
        let bad = output::recover(&err_path)?;
        let mut counts = RequestCounts {
            total: plan.len() as u64,
            completed: ok.done.len() as u64,
            failed: bad.done.len() as u64,
        };
        self.store().set_counts(&b.id, counts)?;
        let done: HashSet<String> = ok.done.into_iter().chain(bad.done).collect();
        let todo: Vec<Planned> = plan
            .into_iter()
            .filter(|p| !done.contains(p.custom_id()))
            .collect();
        let remaining: Vec<String> = todo.iter().map(|p| p.custom_id().to_string()).collect();

        // The writer: one thread owns both files; each line is synced, then counted.
        let (mut out, mut err) = (Appender::open(&out_path)?, Appender::open(&err_path)?);
        let (line_tx, line_rx) = std::sync::mpsc::channel::<OutputLine>();
        let api = self.api.clone();
        let batch_id = b.id.clone();
        let writer = std::thread::Builder::new()
            .name("batch-api-writer".into())
            .spawn(move || -> Result<(), DriveError> {
                while let Ok(line) = line_rx.recv() {
                    if line.error.is_some() {
                        err.append(&line)?;
                        counts.failed += 1;
                    } else {
                        out.append(&line)?;
                        counts.completed += 1;
                    }
                    api.store.set_counts(&batch_id, counts)?;
                }
                Ok(())
            })
            .map_err(|_| DriveError::Writer)?;

        let interrupted = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        let mut outcome = Outcome::Done;
        for p in todo {
            if let Some(stop) = self.stop(b, &interrupted) {
                outcome = stop;
                break;
            }
            if writer.is_finished() {
                break;
            }
            match p {
                Planned::Fail {
                    custom_id,
                    code,
                    message,
                    ..
                } => {
                    let line = OutputLine {
                        id: super::batch_id(),
                        custom_id,
                        response: None,
                        error: Some(OutputError {
                            code: code.to_string(),
                            message,
                        }),
                    };
                    if line_tx.send(line).is_err() {
                        break;
                    }
                }
                Planned::Run { custom_id, url, .. } if url.path() != b.endpoint => {
                    let message = format!(
                        "the line's `url` {:?} is not the batch's endpoint {:?}",
                        url.path(),
                        b.endpoint
                    );
                    let line = OutputLine {
                        id: super::batch_id(),
                        custom_id,
                        response: None,
                        error: Some(OutputError {
                            code: "mismatched_endpoint".into(),
                            message,
                        }),
                    };
                    if line_tx.send(line).is_err() {
                        break;
                    }
                }
                Planned::Run {
                    custom_id,
                    url,
                    body,
                    ..
                } => {
                    let permit = self.permits.acquire(&self.app).await;
                    if let Some(stop) = self.stop(b, &interrupted) {
                        outcome = stop;
                        break;
                    }
                    let (router, line_tx, interrupted) =
                        (self.router.clone(), line_tx.clone(), interrupted.clone());
                    tasks.spawn(async move {
                        let (line, _) = with_class(
                            Class::Background,
                            super::answer_as(
                                router,
                                custom_id,
                                url,
                                Value::Object(body),
                                Some(tenant),
                            ),
                        )
                        .await;
                        drop(permit);
                        if line.response.as_ref().is_some_and(|r| r.status_code == 503) {
                            // Shutting down (or the engine stopped): not an answer; redone after a restart.
                            interrupted.store(true, Ordering::SeqCst);
                            return;
                        }
                        let _ = line_tx.send(line); // the writer failed: its error is returned below
                    });
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        drop(line_tx);
        let written = tokio::task::spawn_blocking(move || writer.join()).await;
        match written {
            Ok(Ok(r)) => r?,
            _ => return Err(DriveError::Writer),
        }
        if interrupted.load(Ordering::SeqCst) || self.app.draining.load(Ordering::Relaxed) {
            return Ok(Outcome::Interrupted);
        }
        if outcome == Outcome::Expired {
            self.write_expired(b, &remaining)?;
        }
        Ok(outcome)
    }

    /// Why to stop taking requests now, if any.
    fn stop(&self, b: &BatchRecord, interrupted: &AtomicBool) -> Option<Outcome> {
        if interrupted.load(Ordering::SeqCst) || self.app.draining.load(Ordering::Relaxed) {
            Some(Outcome::Interrupted)
        } else if self.cancel.load(Ordering::SeqCst) {
            Some(Outcome::Cancelled)
        } else if unix_now() >= b.expires_at {
            Some(Outcome::Expired)
        } else {
            None
        }
    }

    /// A `batch_expired` error line for every id of `remaining` not answered.
    fn write_expired(&self, b: &BatchRecord, remaining: &[String]) -> Result<(), DriveError> {
        let out_path = self.store().file_path(&b.out_id);
        let err_path = self.store().file_path(&b.err_id);
        let ok = output::recover(&out_path)?;
        let bad = output::recover(&err_path)?;
        let mut counts = RequestCounts {
            total: b.request_counts.total.max(remaining.len() as u64),
            completed: ok.done.len() as u64,
            failed: bad.done.len() as u64,
        };
        let mut err = Appender::open(&err_path)?;
        for id in remaining
            .iter()
            .filter(|id| !ok.done.contains(*id) && !bad.done.contains(*id))
        {
            let message =
                "this request was not run before the batch expired (completion_window 24h)"
                    .to_string();
            err.append(&OutputLine {
                id: super::batch_id(),
                custom_id: id.clone(),
                response: None,
                error: Some(OutputError {
                    code: "batch_expired".into(),
                    message,
                }),
            })?;
            counts.failed += 1;
        }
        self.store().set_counts(&b.id, counts)?;
        Ok(())
    }
}
