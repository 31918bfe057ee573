//! The Batch API's durable state: an SQLite database (`rusqlite`, bundled
//! build) in the data directory, and the files beside it.
//!
//! ```text
//!  DATA_DIR/brigade-batches.sqlite3   tables `files`, `batches` (WAL journal)
//!  DATA_DIR/files/file-….jsonl        uploaded files and finished result files
//!  DATA_DIR/files/file-….jsonl        result files being written (not yet in `files`)
//! ```
//!
//! Every row names its tenant (by name, so a restart with the same tenant list
//! finds its work); every lookup takes the caller's tenant, so another
//! tenant's file or batch is simply not found. A batch's result files get
//! their ids at creation and are appended to while it runs (see
//! [`super::runner`]); they enter `files` (and become readable) when it ends.
//!
//! All calls are short, synchronous statements on one connection behind a
//! mutex: fine from async code (they never wait on anything but the disk).
//! Owns: the schema, ids, rows. Does not own: HTTP, running batches.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;
use serde_json::Value;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("batch database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A file or directory of the data directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A stored JSON column does not parse (the database was edited by hand).
    #[error("batch database: corrupt {what}: {why}")]
    Corrupt {
        /// The column.
        what: &'static str,
        /// The parse error.
        why: String,
    },
}

/// Status of a batch (OpenAI's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created; the input file is being checked.
    Validating,
    /// The input failed the checks (`errors` says why).
    Failed,
    /// Requests are running.
    InProgress,
    /// Every request answered; the result files are being registered.
    Finalizing,
    /// Done: results in `output_file_id` / `error_file_id`.
    Completed,
    /// Not finished by `expires_at`; the rest got `batch_expired` error lines.
    Expired,
    /// Cancel requested; in-flight requests are finishing.
    Cancelling,
    /// Cancelled; what finished is in the result files.
    Cancelled,
}

impl Status {
    /// The stored (and API) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Status::Validating,
            Status::Failed,
            Status::InProgress,
            Status::Finalizing,
            Status::Completed,
            Status::Expired,
            Status::Cancelling,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether the runner still has work on it.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Status::Validating | Status::InProgress | Status::Finalizing | Status::Cancelling
        )
    }
}

/// A file (OpenAI's File object, plus its owner).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileRecord {
    /// `file-…`.
    pub id: String,
    /// Always `"file"`.
    pub object: &'static str,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// The uploaded name (results: `batch_…_output.jsonl` / `…_error.jsonl`).
    pub filename: String,
    /// `batch` (uploads) or `batch_output` (results).
    pub purpose: String,
    /// Always `"processed"` (deprecated OpenAI field, still sent).
    pub status: &'static str,
    /// No expiry: `null`.
    pub expires_at: Option<u64>,
    /// Always `null`.
    pub status_details: Option<String>,
    /// The owner.
    #[serde(skip)]
    pub tenant: String,
    /// Non-empty lines (requests of a `batch` file).
    #[serde(skip)]
    pub lines: u64,
}

/// `request_counts` of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    /// Requests (lines) in the input.
    pub total: u64,
    /// Answered successfully (lines of the output file).
    pub completed: u64,
    /// Answered with an error (lines of the error file).
    pub failed: u64,
}

/// A batch (OpenAI's Batch object, plus its owner and internal file ids).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchRecord {
    /// `batch_…`.
    pub id: String,
    /// Always `"batch"`.
    pub object: &'static str,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub endpoint: String,
    /// `{"object": "list", "data": [{code, message, param, line}]}` or `null`.
    pub errors: Option<Value>,
    /// The input file.
    pub input_file_id: String,
    /// Always `"24h"`.
    pub completion_window: String,
    /// Where it is.
    pub status: Status,
    /// The results of successful requests (set when it ends with at least one).
    pub output_file_id: Option<String>,
    /// The results of failed requests (set when it ends with at least one).
    pub error_file_id: Option<String>,
    /// Unix seconds of each transition.
    pub created_at: u64,
    /// When requests started.
    pub in_progress_at: Option<u64>,
    /// `created_at` + 24 h.
    pub expires_at: u64,
    /// When the last request was answered.
    pub finalizing_at: Option<u64>,
    /// When it completed.
    pub completed_at: Option<u64>,
    /// When validation failed.
    pub failed_at: Option<u64>,
    /// When it expired.
    pub expired_at: Option<u64>,
    /// When a cancel was asked.
    pub cancelling_at: Option<u64>,
    /// When the cancel finished.
    pub cancelled_at: Option<u64>,
    /// Requests in all, answered, failed.
    pub request_counts: RequestCounts,
    /// Up to 16 string pairs given at creation, or `null`.
    pub metadata: Option<Value>,
    /// The owner.
    #[serde(skip)]
    pub tenant: String,
    /// Id the output file gets (its path while running).
    #[serde(skip)]
    pub out_id: String,
    /// Id the error file gets.
    #[serde(skip)]
    pub err_id: String,
}

/// A page of a list: rows and whether more follow.
#[derive(Debug)]
pub struct Page<T> {
    /// The rows, in the order asked.
    pub data: Vec<T>,
    /// Whether rows follow the last one.
    pub has_more: bool,
}

/// The store: one connection, the files directory.
pub struct Store {
    conn: Mutex<Connection>,
    files_dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("files_dir", &self.files_dir)
            .finish_non_exhaustive()
    }
}

/// A new id `{prefix}{32 hex}`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    out_id TEXT NOT NULL,
    err_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    expires_at INTEGER NOT NULL,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    metadata TEXT
);
";

const BATCH_COLUMNS: &str = "id, tenant, endpoint, input_file_id, completion_window, status, errors, output_file_id, error_file_id, out_id, err_id, \
     created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at, total, completed, failed, metadata";

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(to_i64)
}

fn json_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<Value>> {
    let s: Option<String> = row.get(i)?;
    s.map(|s| {
        serde_json::from_str(&s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

fn u64_col(row: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(i)?.max(0) as u64)
}

fn opt_u64_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    Ok(row.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
}

fn batch_row(row: &Row<'_>) -> rusqlite::Result<BatchRecord> {
    let status: String = row.get(5)?;
    let status = Status::parse(&status).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            5,
            rusqlite::types::Type::Text,
            format!("unknown batch status {status:?}").into(),
        )
    })?;
    Ok(BatchRecord {
        id: row.get(0)?,
        object: "batch",
        tenant: row.get(1)?,
        endpoint: row.get(2)?,
        input_file_id: row.get(3)?,
        completion_window: row.get(4)?,
        status,
        errors: json_col(row, 6)?,
        output_file_id: row.get(7)?,
        error_file_id: row.get(8)?,
        out_id: row.get(9)?,
        err_id: row.get(10)?,
        created_at: u64_col(row, 11)?,
        in_progress_at: opt_u64_col(row, 12)?,
        expires_at: u64_col(row, 13)?,
        finalizing_at: opt_u64_col(row, 14)?,
        completed_at: opt_u64_col(row, 15)?,
        failed_at: opt_u64_col(row, 16)?,
        expired_at: opt_u64_col(row, 17)?,
        cancelling_at: opt_u64_col(row, 18)?,
        cancelled_at: opt_u64_col(row, 19)?,
        request_counts: RequestCounts {
            total: u64_col(row, 20)?,
            completed: u64_col(row, 21)?,
            failed: u64_col(row, 22)?,
        },
        metadata: json_col(row, 23)?,
    })
}

fn file_row(row: &Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: row.get(0)?,
        object: "file",
        tenant: row.get(1)?,
        bytes: u64_col(row, 2)?,
        lines: u64_col(row, 3)?,
        created_at: u64_col(row, 4)?,
        filename: row.get(5)?,
        purpose: row.get(6)?,
        status: "processed",
        expires_at: None,
        status_details: None,
    })
}

const FILE_COLUMNS: &str = "id, tenant, bytes, lines, created_at, filename, purpose";

impl Store {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let files_dir = dir.join("files");
        std::fs::create_dir_all(&files_dir).map_err(|source| StoreError::Io {
            path: files_dir.clone(),
            source,
        })?;
        let conn = Connection::open(dir.join("brigade-batches.sqlite3"))?;
        // WAL + NORMAL: a commit survives a process crash (kill -9); result
        // lines themselves are fsynced by their writer.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            files_dir,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a statement half-applied: keep going.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where file `id`'s bytes are (uploads, and result files while and after they are written).
    pub fn file_path(&self, id: &str) -> PathBuf {
        self.files_dir.join(format!("{id}.jsonl"))
    }

    /// The directory of the files (uploads are written to a temporary name there first).
    pub fn files_dir(&self) -> &Path {
        &self.files_dir
    }

    /// Registers a file whose bytes are at [`Store::file_path`].
    pub fn insert_file(&self, f: &FileRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO files (id, tenant, bytes, lines, created_at, filename, purpose) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![f.id, f.tenant, to_i64(f.bytes), to_i64(f.lines), to_i64(f.created_at), f.filename, f.purpose],
        )?;
        Ok(())
    }

    /// Tenant `tenant`'s file `id`.
    pub fn get_file(&self, tenant: &str, id: &str) -> Result<Option<FileRecord>, StoreError> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND tenant = ?2");
        Ok(self
            .conn()
            .query_row(&sql, params![id, tenant], file_row)
            .optional()?)
    }

    /// Tenant `tenant`'s files, newest first (`ascending`: oldest first), after
    /// the file `after` in that order, at most `limit`, of `purpose` if given.
    pub fn list_files(
        &self,
        tenant: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Page<FileRecord>, StoreError> {
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE tenant = ?1 AND (?2 IS NULL OR purpose = ?2) \
             AND (?3 IS NULL OR seq {cmp} (SELECT seq FROM files WHERE id = ?3 AND tenant = ?1)) ORDER BY seq {order} LIMIT ?4"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let want = to_i64(limit as u64 + 1);
        let mut data = stmt
            .query_map(params![tenant, purpose, after, want], file_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let has_more = data.len() > limit;
        data.truncate(limit);
        Ok(Page { data, has_more })
    }

    /// Deletes tenant `tenant`'s file `id` (row, then bytes); false when there is none.
    /// The bytes of an input file stay while an active batch reads it (removed when it ends).
    pub fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let in_use = {
            let conn = self.conn();
            let n = conn.execute(
                "DELETE FROM files WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
            )?;
            if n == 0 {
                return Ok(false);
            }
            let active: i64 = conn.query_row(
                "SELECT COUNT(*) FROM batches WHERE input_file_id = ?1 AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')",
                params![id],
                |r| r.get(0),
            )?;
            active > 0
        };
        if !in_use {
            self.remove_bytes(id)?;
        }
        Ok(true)
    }

    /// Removes file `id`'s bytes if no row names it any more (an input file deleted while its batch ran).
    pub fn drop_orphan(&self, id: &str) -> Result<(), StoreError> {
        let exists: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM files WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )?;
        if exists == 0 {
            self.remove_bytes(id)?;
        }
        Ok(())
    }

    fn remove_bytes(&self, id: &str) -> Result<(), StoreError> {
        let path = self.file_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Stores a new batch.
    pub fn insert_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        let json = |v: &Option<Value>| v.as_ref().map(Value::to_string);
        self.conn().execute(
            &format!("INSERT INTO batches ({BATCH_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)"),
            params![
                b.id,
                b.tenant,
                b.endpoint,
                b.input_file_id,
                b.completion_window,
                b.status.as_str(),
                json(&b.errors),
                b.output_file_id,
                b.error_file_id,
                b.out_id,
                b.err_id,
                to_i64(b.created_at),
                opt_i64(b.in_progress_at),
                to_i64(b.expires_at),
                opt_i64(b.finalizing_at),
                opt_i64(b.completed_at),
                opt_i64(b.failed_at),
                opt_i64(b.expired_at),
                opt_i64(b.cancelling_at),
                opt_i64(b.cancelled_at),
                to_i64(b.request_counts.total),
                to_i64(b.request_counts.completed),
                to_i64(b.request_counts.failed),
                json(&b.metadata),
            ],
        )?;
        Ok(())
    }

    /// Batch `id`, of `tenant` when given (else any: the runner).
    pub fn get_batch(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)"
        );
        Ok(self
            .conn()
            .query_row(&sql, params![id, tenant], batch_row)
            .optional()?)
    }

    /// Tenant `tenant`'s batches, newest first, after batch `after`, at most `limit`.
    pub fn list_batches(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<BatchRecord>, StoreError> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant = ?1 \
             AND (?2 IS NULL OR seq < (SELECT seq FROM batches WHERE id = ?2 AND tenant = ?1)) ORDER BY seq DESC LIMIT ?3"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let mut data = stmt
            .query_map(params![tenant, after, to_i64(limit as u64 + 1)], batch_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let has_more = data.len() > limit;
        data.truncate(limit);
        Ok(Page { data, has_more })
    }

    /// Ids of the batches the runner still has work on, oldest first.
    pub fn active_batches(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY seq ASC")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// Moves batch `id` from one of `from` to `to`, stamping `to`'s timestamp
    /// with `now`; false (nothing changed) when its status is none of `from`.
    pub fn transition(
        &self,
        id: &str,
        from: &[Status],
        to: Status,
        now: u64,
    ) -> Result<bool, StoreError> {
        let column = match to {
            Status::Validating => None,
            Status::Failed => Some("failed_at"),
            Status::InProgress => Some("in_progress_at"),
            Status::Finalizing => Some("finalizing_at"),
            Status::Completed => Some("completed_at"),
            Status::Expired => Some("expired_at"),
            Status::Cancelling => Some("cancelling_at"),
            Status::Cancelled => Some("cancelled_at"),
        };
        let from: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let stamp = column
            .map(|c| format!(", {c} = COALESCE({c}, ?3)"))
            .unwrap_or_default();
        let sql = format!(
            "UPDATE batches SET status = ?2{stamp} WHERE id = ?1 AND status IN ({})",
            from.join(", ")
        );
        let n = if column.is_some() {
            self.conn()
                .execute(&sql, params![id, to.as_str(), to_i64(now)])?
        } else {
            self.conn().execute(&sql, params![id, to.as_str()])?
        };
        Ok(n == 1)
    }

    /// Sets batch `id`'s request counts.
    pub fn set_counts(&self, id: &str, c: RequestCounts) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE batches SET total = ?2, completed = ?3, failed = ?4 WHERE id = ?1",
            params![id, to_i64(c.total), to_i64(c.completed), to_i64(c.failed)],
        )?;
        Ok(())
    }

    /// Sets batch `id`'s `errors` and marks it failed, if it is still validating
    /// (false otherwise: a cancel came first).
    pub fn fail(&self, id: &str, errors: &Value, now: u64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE batches SET status = 'failed', failed_at = ?3, errors = ?2 WHERE id = ?1 AND status = 'validating'",
            params![id, errors.to_string(), to_i64(now)],
        )?;
        Ok(n == 1)
    }

    /// Sets batch `id`'s result file ids (`None` = no such file).
    pub fn set_result_files(
        &self,
        id: &str,
        output: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE batches SET output_file_id = ?2, error_file_id = ?3 WHERE id = ?1",
            params![id, output, error],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, tenant: &str, purpose: &str) -> FileRecord {
        FileRecord {
            id: id.into(),
            object: "file",
            bytes: 10,
            created_at: 1,
            filename: "in.jsonl".into(),
            purpose: purpose.into(),
            status: "processed",
            expires_at: None,
            status_details: None,
            tenant: tenant.into(),
            lines: 2,
        }
    }

    fn batch(id: &str, tenant: &str, input: &str) -> BatchRecord {
        BatchRecord {
            id: id.into(),
            object: "batch",
            endpoint: "/v1/completions".into(),
            errors: None,
            input_file_id: input.into(),
            completion_window: "24h".into(),
            status: Status::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at: 5,
            in_progress_at: None,
            expires_at: 5 + 86400,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata: Some(serde_json::json!({"k": "v"})),
            tenant: tenant.into(),
            out_id: new_id("file-"),
            err_id: new_id("file-"),
        }
    }

    #[test]
    fn files_and_batches_belong_to_their_tenant_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            s.insert_file(&file(&format!("file-{i}"), "a", "batch"))
                .unwrap();
        }
        s.insert_file(&file("file-b", "b", "batch")).unwrap();
        std::fs::write(s.file_path("file-0"), "x").unwrap();
        assert!(s.get_file("a", "file-b").unwrap().is_none());
        assert_eq!(s.get_file("b", "file-b").unwrap().unwrap().lines, 2);
        // Pages, newest first, then oldest first.
        let p = s.list_files("a", None, None, 2, false).unwrap();
        assert_eq!(
            p.data.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["file-4", "file-3"]
        );
        assert!(p.has_more);
        let p = s.list_files("a", None, Some("file-1"), 10, false).unwrap();
        assert_eq!(
            p.data.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["file-0"]
        );
        assert!(!p.has_more);
        let p = s
            .list_files("a", Some("batch"), Some("file-2"), 10, true)
            .unwrap();
        assert_eq!(p.data.len(), 2);
        assert!(s
            .list_files("a", Some("batch_output"), None, 10, false)
            .unwrap()
            .data
            .is_empty());
        // Delete: another tenant's is not found; the bytes go with the row.
        assert!(!s.delete_file("b", "file-0").unwrap());
        assert!(s.delete_file("a", "file-0").unwrap());
        assert!(!s.file_path("file-0").exists());
        assert!(!s.delete_file("a", "file-0").unwrap());

        s.insert_batch(&batch("batch_1", "a", "file-1")).unwrap();
        s.insert_batch(&batch("batch_2", "b", "file-b")).unwrap();
        assert!(s.get_batch(Some("b"), "batch_1").unwrap().is_none());
        assert_eq!(s.active_batches().unwrap(), ["batch_1", "batch_2"]);
        assert!(s
            .transition("batch_1", &[Status::Validating], Status::InProgress, 7)
            .unwrap());
        assert!(!s
            .transition("batch_1", &[Status::Validating], Status::InProgress, 8)
            .unwrap());
        s.set_counts(
            "batch_1",
            RequestCounts {
                total: 3,
                completed: 2,
                failed: 1,
            },
        )
        .unwrap();
        // An input file deleted while its batch is active keeps its bytes until then.
        std::fs::write(s.file_path("file-1"), "x").unwrap();
        assert!(s.delete_file("a", "file-1").unwrap());
        assert!(s.file_path("file-1").exists());
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let b = s.get_batch(Some("a"), "batch_1").unwrap().unwrap();
        assert_eq!(
            (b.status, b.in_progress_at, b.request_counts.completed),
            (Status::InProgress, Some(7), 2)
        );
        assert_eq!(b.metadata, Some(serde_json::json!({"k": "v"})));
        s.drop_orphan("file-1").unwrap();
        assert!(!s.file_path("file-1").exists());
        assert_eq!(s.list_batches("a", None, 10).unwrap().data.len(), 1);
        let v = serde_json::to_value(&b).unwrap();
        for k in [
            "id",
            "object",
            "endpoint",
            "errors",
            "input_file_id",
            "completion_window",
            "status",
            "output_file_id",
            "error_file_id",
            "created_at",
            "in_progress_at",
            "expires_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
            "request_counts",
            "metadata",
        ] {
            assert!(v.get(k).is_some(), "batch object lacks {k}");
        }
        assert!(v.get("tenant").is_none() && v.get("out_id").is_none());
        assert_eq!(v["status"], "in_progress");
    }
}
