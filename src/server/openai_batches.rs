//! The OpenAI Batch API over HTTP: `/v1/files` (upload, list, retrieve,
//! content, delete) and `/v1/batches` (create, retrieve, list, cancel), as the
//! official SDKs call them. State is [`crate::batch::store`]; batches run in
//! [`crate::batch::runner`].
//!
//! ```text
//!  POST   /v1/files                 multipart: file (JSONL), purpose = "batch"  → File
//!  GET    /v1/files                 ?purpose ?limit (1..=10000) ?after ?order   → list of File
//!  GET    /v1/files/{id}            → File          GET /v1/files/{id}/content → the bytes
//!  DELETE /v1/files/{id}            → {"id", "object": "file", "deleted": true}
//!  POST   /v1/batches               {input_file_id, endpoint, completion_window: "24h", metadata?} → Batch
//!  GET    /v1/batches               ?limit (1..=100) ?after → list of Batch
//!  GET    /v1/batches/{id}          → Batch         POST /v1/batches/{id}/cancel → Batch
//! ```
//!
//! Files and batches belong to the tenant whose key made them: another
//! tenant's id is answered 404, as an id that does not exist, and lists show
//! only the caller's. Without `server.batch_data_dir` (`--data-dir`) every
//! route answers 404 `batch_api_disabled` saying how to turn it on.
//! Result files (`purpose: "batch_output"`) are readable once their batch has
//! ended; `request_counts` move while it runs.

use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::routes::Tenant;
use super::{unix_now, App};
use crate::batch::runner::BatchApi;
use crate::batch::store::{new_id, BatchRecord, FileRecord, RequestCounts, Status, StoreError};

/// The routes (merged into [`super::routes::router`]). `POST /v1/files` takes
/// multipart bodies up to `server.batch_max_file_bytes` (checked here, not by
/// `server.max_body_bytes`); the others are JSON routes.
pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(retrieve_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route("/v1/files/{id}", get(retrieve_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route_layer(axum::middleware::from_fn(super::edge::require_json))
        .route(
            "/v1/files",
            post(upload)
                .get(list_files)
                .layer(DefaultBodyLimit::disable()),
        )
}

/// An error of these routes: the server's [`ApiError`]s, and the few that are the Batch API's own.
#[derive(Debug)]
enum Error {
    Api(ApiError),
    /// The Batch API is off.
    Off,
    /// No such object for this tenant.
    NotFound {
        what: &'static str,
        id: String,
    },
    /// An upload over `server.batch_max_file_bytes`.
    FileTooLarge {
        limit: u64,
    },
    /// `POST /v1/files` without a multipart body.
    NotMultipart(String),
    /// The store failed.
    Store(StoreError),
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        Error::Api(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

fn invalid(param: &str, message: impl Into<String>) -> Error {
    Error::Api(ApiError::invalid(param, message))
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, kind, code, param, message) = match self {
            Error::Api(e) => return e.into_response(),
            Error::Store(e) => return ApiError::Internal(e.to_string()).into_response(),
            Error::Off => (
                StatusCode::NOT_FOUND,
                "not_found_error",
                Some("batch_api_disabled"),
                None,
                "The Batch API is off on this server: start it with `--data-dir DIR` (or set server.batch_data_dir) to keep files and batches".to_string(),
            ),
            Error::NotFound { what, id } => (StatusCode::NOT_FOUND, "invalid_request_error", None, Some("id"), format!("No such {what}: {id}")),
            Error::FileTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("file_too_large"),
                Some("file"),
                format!("The file is larger than this server's limit of {limit} bytes (server.batch_max_file_bytes)"),
            ),
            Error::NotMultipart(got) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
                format!("POST /v1/files takes a `multipart/form-data` body (fields `file` and `purpose`), got {got}"),
            ),
        };
        let body =
            json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
        (status, Json(body)).into_response()
    }
}

fn api(app: &App) -> Result<&BatchApi, Error> {
    app.batches.as_deref().ok_or(Error::Off)
}

fn tenant_name(app: &App, t: Tenant) -> String {
    app.tenants
        .get(t.0)
        .map_or_else(|| "default".to_string(), |t| t.name.clone())
}

/// A list page as OpenAI writes it.
#[derive(Serialize)]
struct ListPage<T: Serialize> {
    object: &'static str,
    data: Vec<T>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

fn page<T: Serialize>(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> &str) -> ListPage<T> {
    let first_id = data.first().map(|x| id(x).to_string());
    let last_id = data.last().map(|x| id(x).to_string());
    ListPage {
        object: "list",
        data,
        first_id,
        last_id,
        has_more,
    }
}

/// Query parameters of a list route: only `allowed`, each parsed.
struct ListQuery {
    limit: usize,
    after: Option<String>,
    order_ascending: bool,
    purpose: Option<String>,
}

fn list_query(
    q: &std::collections::HashMap<String, String>,
    allowed: &[&str],
    max_limit: usize,
    default_limit: usize,
) -> Result<ListQuery, Error> {
    if let Some(k) = q.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(
            k,
            format!(
                "unknown query parameter `{k}` (accepted: {})",
                allowed.join(", ")
            ),
        ));
    }
    let limit = match q.get("limit") {
        None => default_limit,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=max_limit).contains(&n) => n,
            _ => {
                return Err(invalid(
                    "limit",
                    format!("`limit` must be an integer in 1..={max_limit}, got {s:?}"),
                ))
            }
        },
    };
    let order_ascending = match q.get("order").map(String::as_str) {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return Err(invalid(
                "order",
                format!("`order` must be \"asc\" or \"desc\", got {o:?}"),
            ))
        }
    };
    Ok(ListQuery {
        limit,
        after: q.get("after").cloned(),
        order_ascending,
        purpose: q.get("purpose").cloned(),
    })
}

// ------------------------------------------------------------------ files

/// What multipart parsing failed on, as a client error.
fn multipart_error(e: MultipartError) -> Error {
    invalid(
        "file",
        format!("the multipart body could not be read: {}", e.body_text()),
    )
}

/// `POST /v1/files`.
async fn upload(
    State(app): State<App>,
    tenant: Tenant,
    headers: HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileRecord>, Error> {
    let api = api(&app)?;
    let limit = app.cfg.batch_max_file_bytes;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if !ct.as_deref().is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
    }) {
        return Err(Error::NotMultipart(ct.map_or_else(
            || "no Content-Type".to_string(),
            |c| format!("{:?}", c.chars().take(128).collect::<String>()),
        )));
    }
    // The body is the file plus a little framing: refuse at once what cannot fit.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(64 << 10)) {
        return Err(Error::FileTooLarge { limit });
    }
    let mut mp = mp.map_err(|e| {
        invalid(
            "file",
            format!("the multipart body could not be read: {}", e.body_text()),
        )
    })?;
    let mut purpose: Option<String> = None;
    let mut file: Option<(String, Vec<u8>)> = None;
    while let Some(mut field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "purpose" => purpose = Some(field.text().await.map_err(multipart_error)?),
            "file" => {
                if file.is_some() {
                    return Err(invalid(
                        "file",
                        "`file` is given twice; upload one file per request",
                    ));
                }
                let filename = field
                    .file_name()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("upload.jsonl")
                    .chars()
                    .take(256)
                    .collect();
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    if bytes.len() as u64 + chunk.len() as u64 > limit {
                        return Err(Error::FileTooLarge { limit });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                file = Some((filename, bytes));
            }
            other => {
                return Err(invalid(
                    other,
                    format!("unknown form field `{other}` (accepted: file, purpose)"),
                ))
            }
        }
    }
    match purpose.as_deref() {
        Some("batch") => {}
        Some(p) => return Err(invalid("purpose", format!("`purpose` {p:?} is not supported: this server keeps files for the Batch API only (\"batch\")"))),
        None => return Err(invalid("purpose", "`purpose` is required (\"batch\")")),
    }
    let Some((filename, bytes)) = file else {
        return Err(invalid(
            "file",
            "`file` is required (a JSONL batch input file)",
        ));
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| invalid("file", format!("the file is not UTF-8 text: {e}")))?;
    let lines = text.split('\n').filter(|l| !l.trim().is_empty()).count() as u64;
    let record = FileRecord {
        id: new_id("file-"),
        object: "file",
        bytes: bytes.len() as u64,
        created_at: unix_now(),
        filename,
        purpose: "batch".into(),
        status: "processed",
        expires_at: None,
        status_details: None,
        tenant: tenant_name(&app, tenant),
        lines,
    };
    // Written under a temporary name, synced, renamed: a crash leaves no half file under an id.
    let (path, tmp) = (
        api.store.file_path(&record.id),
        api.store.files_dir().join(format!(".upload-{}", record.id)),
    );
    let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })
    .await;
    match write {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Error::Api(ApiError::Internal(format!(
                "storing the upload: {e}"
            ))))
        }
        Err(e) => {
            return Err(Error::Api(ApiError::Internal(format!(
                "storing the upload: {e}"
            ))))
        }
    }
    api.store.insert_file(&record)?;
    Ok(Json(record))
}

/// `GET /v1/files`.
async fn list_files(
    State(app): State<App>,
    tenant: Tenant,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<ListPage<FileRecord>>, Error> {
    let api = api(&app)?;
    let q = list_query(&q, &["purpose", "limit", "after", "order"], 10_000, 10_000)?;
    let p = api.store.list_files(
        &tenant_name(&app, tenant),
        q.purpose.as_deref(),
        q.after.as_deref(),
        q.limit,
        q.order_ascending,
    )?;
    Ok(Json(page(p.data, p.has_more, |f| &f.id)))
}

fn find_file(app: &App, tenant: Tenant, id: &str) -> Result<FileRecord, Error> {
    api(app)?
        .store
        .get_file(&tenant_name(app, tenant), id)?
        .ok_or_else(|| Error::NotFound {
            what: "File object",
            id: id.to_string(),
        })
}

/// `GET /v1/files/{id}`.
async fn retrieve_file(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<FileRecord>, Error> {
    Ok(Json(find_file(&app, tenant, &id)?))
}

/// `GET /v1/files/{id}/content`.
async fn file_content(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let f = find_file(&app, tenant, &id)?;
    let path = api(&app)?.store.file_path(&f.id);
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .map_err(|e| Error::Api(ApiError::Internal(format!("reading file {id}: {e}"))))?
        .map_err(|e| Error::Api(ApiError::Internal(format!("reading file {id}: {e}"))))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `DELETE /v1/files/{id}`.
async fn delete_file(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let api = api(&app)?;
    if !api.store.delete_file(&tenant_name(&app, tenant), &id)? {
        return Err(Error::NotFound {
            what: "File object",
            id,
        });
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

// ------------------------------------------------------------------ batches

/// Endpoints a batch may target.
const ENDPOINTS: &[&str] = &["/v1/chat/completions", "/v1/completions"];

/// `metadata`: at most 16 pairs, keys ≤ 64 characters, string values ≤ 512.
fn check_metadata(v: &Value) -> Result<Option<Value>, Error> {
    let m = match v {
        Value::Null => return Ok(None),
        Value::Object(m) => m,
        _ => {
            return Err(invalid(
                "metadata",
                "`metadata` must be an object of string values",
            ))
        }
    };
    if m.len() > 16 {
        return Err(invalid(
            "metadata",
            format!("`metadata` may have at most 16 keys, got {}", m.len()),
        ));
    }
    for (k, v) in m {
        if k.chars().count() > 64 {
            return Err(invalid(
                "metadata",
                format!("`metadata` keys may be at most 64 characters, {k:?} is longer"),
            ));
        }
        match v {
            Value::String(s) if s.chars().count() <= 512 => {}
            Value::String(_) => {
                return Err(invalid(
                    "metadata",
                    format!("`metadata.{k}` is longer than 512 characters"),
                ))
            }
            _ => {
                return Err(invalid(
                    "metadata",
                    format!("`metadata.{k}` must be a string"),
                ))
            }
        }
    }
    Ok(Some(v.clone()))
}

fn string_field<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a str, Error> {
    match body.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(invalid(key, format!("`{key}` must be a string, got {v}"))),
        None => Err(invalid(key, format!("`{key}` is required"))),
    }
}

/// `POST /v1/batches`.
async fn create_batch(
    State(app): State<App>,
    tenant: Tenant,
    body: axum::body::Bytes,
) -> Result<Json<BatchRecord>, Error> {
    let api = api(&app)?;
    if body.len() > app.cfg.max_body_bytes {
        return Err(Error::Api(ApiError::TooLarge {
            limit: app.cfg.max_body_bytes,
        }));
    }
    let body: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(Error::Api(ApiError::Invalid {
                param: None,
                message: "invalid request body: expected a JSON object".into(),
            }))
        }
        Err(e) => {
            return Err(Error::Api(ApiError::Invalid {
                param: None,
                message: format!("the body is not valid JSON: {e}"),
            }))
        }
    };
    const FIELDS: &[&str] = &["input_file_id", "endpoint", "completion_window", "metadata"];
    if let Some(k) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            k,
            format!(
                "unknown or unsupported field `{k}` (accepted: {})",
                FIELDS.join(", ")
            ),
        ));
    }
    let input_file_id = string_field(&body, "input_file_id")?;
    let endpoint = string_field(&body, "endpoint")?;
    if !ENDPOINTS.contains(&endpoint) {
        return Err(invalid(
            "endpoint",
            format!(
                "`endpoint` {endpoint:?} is not supported; this server batches {}",
                ENDPOINTS.join(" and ")
            ),
        ));
    }
    let window = string_field(&body, "completion_window")?;
    if window != "24h" {
        return Err(invalid(
            "completion_window",
            format!("`completion_window` must be \"24h\", got {window:?}"),
        ));
    }
    let metadata = check_metadata(body.get("metadata").unwrap_or(&Value::Null))?;
    let tenant = tenant_name(&app, tenant);
    let file = api
        .store
        .get_file(&tenant, input_file_id)?
        .ok_or_else(|| Error::NotFound {
            what: "File object",
            id: input_file_id.to_string(),
        })?;
    if file.purpose != "batch" {
        return Err(invalid("input_file_id", format!("file {input_file_id} has purpose {:?}; a batch's input must be uploaded with purpose \"batch\"", file.purpose)));
    }
    if file.lines == 0 {
        return Err(invalid(
            "input_file_id",
            format!("file {input_file_id} has no requests"),
        ));
    }
    let max = app.cfg.batch_max_requests;
    if file.lines > max as u64 {
        return Err(invalid("input_file_id", format!("file {input_file_id} has {} requests, more than this server's limit of {max} per batch (server.batch_max_requests)", file.lines)));
    }
    let now = unix_now();
    let record = BatchRecord {
        id: new_id("batch_"),
        object: "batch",
        endpoint: endpoint.to_string(),
        errors: None,
        input_file_id: input_file_id.to_string(),
        completion_window: "24h".into(),
        status: Status::Validating,
        output_file_id: None,
        error_file_id: None,
        created_at: now,
        in_progress_at: None,
        expires_at: now + 24 * 3600,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts {
            total: file.lines,
            completed: 0,
            failed: 0,
        },
        metadata,
        tenant,
        out_id: new_id("file-"),
        err_id: new_id("file-"),
    };
    api.store.insert_batch(&record)?;
    api.wake();
    Ok(Json(record))
}

fn find_batch(app: &App, tenant: Tenant, id: &str) -> Result<BatchRecord, Error> {
    api(app)?
        .store
        .get_batch(Some(&tenant_name(app, tenant)), id)?
        .ok_or_else(|| Error::NotFound {
            what: "Batch object",
            id: id.to_string(),
        })
}

/// `GET /v1/batches/{id}`.
async fn retrieve_batch(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<BatchRecord>, Error> {
    Ok(Json(find_batch(&app, tenant, &id)?))
}

/// `GET /v1/batches`.
async fn list_batches(
    State(app): State<App>,
    tenant: Tenant,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<ListPage<BatchRecord>>, Error> {
    let api = api(&app)?;
    let q = list_query(&q, &["limit", "after"], 100, 20)?;
    let p = api
        .store
        .list_batches(&tenant_name(&app, tenant), q.after.as_deref(), q.limit)?;
    Ok(Json(page(p.data, p.has_more, |b| &b.id)))
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` at once, `cancelled` when its in-flight requests end.
async fn cancel_batch(
    State(app): State<App>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<BatchRecord>, Error> {
    let api = api(&app)?;
    let b = find_batch(&app, tenant, &id)?;
    match b.status {
        Status::Cancelling | Status::Cancelled => return Ok(Json(b)),
        Status::Validating | Status::InProgress => {
            if api.store.transition(
                &id,
                &[Status::Validating, Status::InProgress],
                Status::Cancelling,
                unix_now(),
            )? {
                api.cancel(&id);
            }
        }
        s => {
            return Err(invalid(
                "id",
                format!(
                    "batch {id} is {}: only a validating or in-progress batch can be cancelled",
                    s.as_str()
                ),
            ))
        }
    }
    Ok(Json(find_batch(&app, tenant, &id)?))
}
