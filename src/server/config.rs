//! The `[server]` section of the configuration file: listen address, limits,
//! tenants and fair-queuing weights.
//!
//! Owns parsing and range checks of `[server]` only; the rest of the file is
//! [`crate::config::Config`]. Unknown keys fail at start naming the key
//! (`deny_unknown_fields`); command-line flags override the file.

use serde::{Deserialize, Serialize};

use super::auth::KeyHash;

/// Errors in the `[server]` section.
#[derive(Debug, thiserror::Error)]
pub enum ServerConfigError {
    /// Unknown key, wrong type or TOML syntax.
    #[error("config [server]: {0}")]
    Parse(String),
    /// A value out of range.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// What is wrong, with the allowed range.
        message: String,
    },
}

/// Upper bound of `max_header_bytes` (below hyper's ~400 KB read buffer, so
/// hyper's own limit answers first and the response is rewritten to JSON).
pub const MAX_HEADER_BYTES: usize = 256 << 10;
/// Upper bound of `max_uri_bytes`: hyper refuses longer URIs itself (414).
pub const MAX_URI_BYTES: usize = 65534;

/// One tenant: who it is, how its keys hash, and its share and limits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant name (metric label `tenant`, log field); `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// SHA-256 hashes of the tenant's API keys (`brigade hash-key`), hex, optionally `sha256:`-prefixed.
    #[serde(default)]
    pub api_keys: Vec<KeyHash>,
    /// Fair-share weight (> 0); served tokens over a backlogged period follow the weights.
    #[serde(default = "one")]
    pub weight: f64,
    /// Most of this tenant's sequences in the engine at once (0 = no limit).
    #[serde(default)]
    pub max_concurrent: usize,
    /// Most requests of this tenant waiting for admission; more get 429 at once.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// Token-rate limit in prompt + generated tokens per minute (0 = no limit).
    #[serde(default)]
    pub tokens_per_minute: u64,
}

fn one() -> f64 {
    1.0
}
fn default_max_queued() -> usize {
    256
}

impl TenantConfig {
    /// An open tenant with default limits.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            api_keys: Vec::new(),
            weight: 1.0,
            max_concurrent: 0,
            max_queued: default_max_queued(),
            tokens_per_minute: 0,
        }
    }
}

/// The `[server]` section.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address.
    pub host: String,
    /// Listen port (0 = any free port).
    pub port: u16,
    /// Names served in `/v1/models` and accepted in the `model` field; the
    /// first is the primary name echoed in responses (empty = the model file's
    /// stem, or the model's own name). A string or a list in the file.
    #[serde(deserialize_with = "one_or_many")]
    pub served_model_name: Vec<String>,
    /// Largest request body in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT before they are aborted.
    pub shutdown_timeout_s: f64,
    /// Sequences admitted into the engine at once (0 = `runtime.max_seqs`). The fair
    /// queue holds the rest, so this bounds how long a newly arriving tenant waits.
    pub max_running: usize,
    /// Capacity of the admission actor's inbox (requests arriving at the same moment).
    pub admission_inbox: usize,
    /// `Retry-After` seconds sent with 429 for a full queue.
    pub retry_after_s: u64,
    /// Virtual Token Counter cost of one prompt token.
    pub vtc_input_weight: f64,
    /// Virtual Token Counter cost of one generated token.
    pub vtc_output_weight: f64,
    /// Tenants; empty = open server with one tenant `default` and no API keys.
    pub tenants: Vec<TenantConfig>,
    /// Limits of the `default` tenant when no tenants are configured.
    pub default_max_queued: usize,
    /// Most open client connections; one more is answered 503 and closed at once.
    pub max_connections: usize,
    /// Seconds a client has to send a whole request head, from its connection
    /// (or its first byte on a kept-alive connection); then it is closed.
    pub header_read_timeout_s: f64,
    /// Seconds a kept-alive connection may sit idle between requests.
    pub keep_alive_timeout_s: f64,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Longest request URI (path and query) in bytes; longer gets 414.
    pub max_uri_bytes: usize,
    /// Accepted `Host` header names (DNS-rebinding protection): exact names,
    /// `*.suffix` for subdomains, `*` for any; IP addresses always pass. Empty =
    /// automatic: on a loopback listener only `localhost`, `*.localhost` and
    /// names without a dot, else any.
    pub allowed_hosts: Vec<String>,
    /// Key hashes allowed to read `/metrics` (`Authorization: Bearer`); empty = open.
    /// Tenants' keys do not open it.
    pub metrics_api_keys: Vec<KeyHash>,
    /// Browser origins allowed by CORS (`Access-Control-Allow-Origin`): exact
    /// origins (`https://app.example.com`), or `*` for any. Empty = CORS off
    /// (no CORS headers; preflight `OPTIONS` is not answered).
    pub allowed_origins: Vec<String>,
    /// Most responses of `POST /v1/responses` kept in memory for
    /// `GET /v1/responses/{id}` and `previous_response_id` (oldest evicted first).
    pub responses_store_max: usize,
    /// Prefix of the engine and request metric names: `brigade` (`brigade:…`) or
    /// `vllm` (`vllm:…`, so vLLM dashboards and autoscaling rules read them unchanged).
    pub metrics_prefix: String,
    /// Directory of the Batch API's state (`/v1/files`, `/v1/batches`): an SQLite
    /// database and the uploaded and result files beside it (`--data-dir`).
    /// None (the default) = the Batch API is off and its routes answer 404 saying so.
    pub batch_data_dir: Option<std::path::PathBuf>,
    /// Largest file `POST /v1/files` takes, in bytes; larger gets 413.
    pub batch_max_file_bytes: u64,
    /// Most requests (non-empty lines) in one batch's input file; more gets 400 at `POST /v1/batches`.
    pub batch_max_requests: usize,
    /// Batch requests in flight at once over all batches while no interactive
    /// request is about (0 = three quarters of `max_running`, at least 1).
    pub batch_max_in_flight: usize,
    /// Batch requests started while interactive requests are queued or running
    /// (or were in the last 2 s): fewer batch sequences keep engine steps short.
    pub batch_busy_in_flight: usize,
    /// Anti-starvation of batch requests: while interactive requests keep
    /// waiting, one waiting batch request is admitted after this many interactive
    /// admissions (else batch requests go only when no interactive one can).
    pub batch_background_every: usize,
}

/// A string (one name; `""` = none) or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) if s.is_empty() => Vec::new(),
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

/// Whether `name` can be served as a model name: 1..=256 printable ASCII
/// characters without spaces (clients put it in URLs: `/v1/models/{name}`).
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `origin` is a valid entry of `allowed_origins`: `*`, or
/// `scheme://host[:port]` without a path.
fn valid_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            served_model_name: Vec::new(),
            max_body_bytes: 4 << 20,
            shutdown_timeout_s: 30.0,
            max_running: 0,
            admission_inbox: 1024,
            retry_after_s: 1,
            vtc_input_weight: 1.0,
            vtc_output_weight: 2.0,
            tenants: Vec::new(),
            default_max_queued: 1024,
            max_connections: 1024,
            header_read_timeout_s: 10.0,
            keep_alive_timeout_s: 30.0,
            max_header_bytes: 32 << 10,
            max_uri_bytes: 8 << 10,
            allowed_hosts: Vec::new(),
            metrics_api_keys: Vec::new(),
            allowed_origins: Vec::new(),
            responses_store_max: 1024,
            metrics_prefix: "brigade".into(),
            batch_data_dir: None,
            batch_max_file_bytes: 200 << 20,
            batch_max_requests: 50_000,
            batch_max_in_flight: 0,
            batch_busy_in_flight: 2,
            batch_background_every: 16,
        }
    }
}

impl ServerConfig {
    /// Parses the `[server]` table of the config file (None = defaults) and validates it.
    pub fn from_table(table: Option<&toml::Table>) -> Result<Self, ServerConfigError> {
        let cfg = match table {
            // The path names the entry (`tenants[0].api_keys[1]`) when a value is wrong.
            Some(t) => {
                serde_path_to_error::deserialize(toml::Value::Table(t.clone())).map_err(|e| {
                    let path = e.path().to_string();
                    let inner = e.into_inner().to_string();
                    let inner = inner.trim();
                    ServerConfigError::Parse(if path == "." {
                        inner.to_string()
                    } else {
                        format!("`{path}`: {inner}")
                    })
                })?
            }
            None => ServerConfig::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses the body of a `[server]` section given as TOML text (for tests and tools).
    pub fn from_toml_str(text: &str) -> Result<Self, ServerConfigError> {
        let t: toml::Table = toml::from_str(text)
            .map_err(|e| ServerConfigError::Parse(e.to_string().trim().to_string()))?;
        Self::from_table(Some(&t))
    }

    /// Range checks naming the key.
    pub fn validate(&self) -> Result<(), ServerConfigError> {
        let inv = |key: &str, message: String| {
            Err(ServerConfigError::Invalid {
                key: format!("server.{key}"),
                message,
            })
        };
        if !(1024..=1 << 30).contains(&self.max_body_bytes) {
            return inv(
                "max_body_bytes",
                format!("must be in 1024..=1073741824, got {}", self.max_body_bytes),
            );
        }
        if !(self.shutdown_timeout_s.is_finite()
            && (0.0..=3600.0).contains(&self.shutdown_timeout_s))
        {
            return inv(
                "shutdown_timeout_s",
                format!("must be in [0, 3600], got {}", self.shutdown_timeout_s),
            );
        }
        if self.max_running > 65536 {
            return inv(
                "max_running",
                format!("must be in 0..=65536, got {}", self.max_running),
            );
        }
        if !(1..=1_000_000).contains(&self.admission_inbox) {
            return inv(
                "admission_inbox",
                format!("must be in 1..=1000000, got {}", self.admission_inbox),
            );
        }
        if !(1..=1_000_000).contains(&self.default_max_queued) {
            return inv(
                "default_max_queued",
                format!("must be in 1..=1000000, got {}", self.default_max_queued),
            );
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return inv(
                "max_connections",
                format!("must be in 1..=1000000, got {}", self.max_connections),
            );
        }
        for (k, v) in [
            ("header_read_timeout_s", self.header_read_timeout_s),
            ("keep_alive_timeout_s", self.keep_alive_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
                return inv(k, format!("must be in (0, 3600], got {v}"));
            }
        }
        if !(1024..=MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return inv(
                "max_header_bytes",
                format!(
                    "must be in 1024..={MAX_HEADER_BYTES}, got {}",
                    self.max_header_bytes
                ),
            );
        }
        if !(256..=MAX_URI_BYTES).contains(&self.max_uri_bytes) {
            return inv(
                "max_uri_bytes",
                format!(
                    "must be in 256..={MAX_URI_BYTES}, got {}",
                    self.max_uri_bytes
                ),
            );
        }
        for (i, h) in self.allowed_hosts.iter().enumerate() {
            let name = h.strip_prefix("*.").unwrap_or(h);
            let ok = h == "*"
                || (!name.is_empty()
                    && name.len() <= 253
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)));
            if !ok {
                return inv(
                    &format!("allowed_hosts[{i}]"),
                    format!("must be a host name or IP address, `*.domain` or `*`, got {h:?}"),
                );
            }
        }
        let mut served = std::collections::HashSet::new();
        for (i, n) in self.served_model_name.iter().enumerate() {
            if !valid_model_name(n) {
                return inv(
                    &format!("served_model_name[{i}]"),
                    format!("must be 1..=256 printable characters without spaces, got {n:?}"),
                );
            }
            if !served.insert(n.as_str()) {
                return inv(
                    &format!("served_model_name[{i}]"),
                    format!("duplicate name {n:?}"),
                );
            }
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if !valid_origin(o) {
                return inv(
                    &format!("allowed_origins[{i}]"),
                    format!("must be `*` or an origin `scheme://host[:port]` (no path), got {o:?}"),
                );
            }
        }
        if !(1..=1_000_000).contains(&self.responses_store_max) {
            return inv(
                "responses_store_max",
                format!("must be in 1..=1000000, got {}", self.responses_store_max),
            );
        }
        if !(1..=1 << 40).contains(&self.batch_max_file_bytes) {
            return inv(
                "batch_max_file_bytes",
                format!(
                    "must be in 1..=1099511627776, got {}",
                    self.batch_max_file_bytes
                ),
            );
        }
        if !(1..=10_000_000).contains(&self.batch_max_requests) {
            return inv(
                "batch_max_requests",
                format!("must be in 1..=10000000, got {}", self.batch_max_requests),
            );
        }
        if self.batch_max_in_flight > 100_000 {
            return inv(
                "batch_max_in_flight",
                format!("must be in 0..=100000, got {}", self.batch_max_in_flight),
            );
        }
        if !(1..=100_000).contains(&self.batch_busy_in_flight) {
            return inv(
                "batch_busy_in_flight",
                format!("must be in 1..=100000, got {}", self.batch_busy_in_flight),
            );
        }
        if !(1..=1_000_000).contains(&self.batch_background_every) {
            return inv(
                "batch_background_every",
                format!(
                    "must be in 1..=1000000, got {}",
                    self.batch_background_every
                ),
            );
        }
        if self
            .batch_data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return inv(
                "batch_data_dir",
                "must not be empty (leave it out to turn the Batch API off)".into(),
            );
        }
        if !matches!(self.metrics_prefix.as_str(), "brigade" | "vllm") {
            return inv(
                "metrics_prefix",
                format!(
                    "must be \"brigade\" or \"vllm\", got {:?}",
                    self.metrics_prefix
                ),
            );
        }
        for (k, v) in [
            ("vtc_input_weight", self.vtc_input_weight),
            ("vtc_output_weight", self.vtc_output_weight),
        ] {
            if !(v.is_finite() && (0.0..=1000.0).contains(&v)) {
                return inv(k, format!("must be in [0, 1000], got {v}"));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let key = |f: &str| format!("tenants[{i}].{f}");
            let ok_name = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok_name {
                return inv(
                    &key("name"),
                    format!("must match [A-Za-z0-9_.-]{{1,64}}, got {:?}", t.name),
                );
            }
            if !names.insert(t.name.clone()) {
                return inv(&key("name"), format!("duplicate tenant name {:?}", t.name));
            }
            if !(t.weight.is_finite() && t.weight > 0.0 && t.weight <= 1e6) {
                return inv(
                    &key("weight"),
                    format!("must be in (0, 1e6], got {}", t.weight),
                );
            }
            if !(1..=1_000_000).contains(&t.max_queued) {
                return inv(
                    &key("max_queued"),
                    format!("must be in 1..=1000000, got {}", t.max_queued),
                );
            }
            if t.api_keys.is_empty() {
                return inv(
                    &key("api_keys"),
                    "a configured tenant needs at least one API key hash (`brigade hash-key`)"
                        .into(),
                );
            }
            for h in &t.api_keys {
                if !keys.insert(*h) {
                    return inv(&key("api_keys"), "the same key hash is listed twice".into());
                }
            }
        }
        Ok(())
    }

    /// The tenants in force: the configured ones, or one open `default` tenant.
    pub fn effective_tenants(&self) -> Vec<TenantConfig> {
        if self.tenants.is_empty() {
            let mut t = TenantConfig::named("default");
            t.max_queued = self.default_max_queued;
            vec![t]
        } else {
            self.tenants.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let e = ServerConfig::from_toml_str("hots = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hots"), "{e}");
        let e =
            ServerConfig::from_toml_str("[[tenants]]\nname = \"a\"\napi_keys = []\nwieght = 2\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let h = super::super::auth::hash_key("k");
        let e = ServerConfig::from_toml_str(&format!(
            "[[tenants]]\nname = \"a\"\napi_keys = [\"{h}\", \"nope\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tenants[0].api_keys[1]") && e.contains("brigade hash-key"),
            "{e}"
        );
        let e = ServerConfig::from_toml_str("metrics_api_keys = [\"secret\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics_api_keys[0]") && !e.contains("secret"),
            "{e}"
        );
        for (text, key) in [
            ("max_connections = 0", "server.max_connections"),
            ("header_read_timeout_s = 0", "server.header_read_timeout_s"),
            ("keep_alive_timeout_s = -1", "server.keep_alive_timeout_s"),
            ("max_header_bytes = 10", "server.max_header_bytes"),
            ("max_uri_bytes = 100000", "server.max_uri_bytes"),
            ("allowed_hosts = [\"a b\"]", "server.allowed_hosts[0]"),
            (
                "allowed_origins = [\"https://a.com/path\"]",
                "server.allowed_origins[0]",
            ),
            (
                "served_model_name = [\"a\", \"b c\"]",
                "server.served_model_name[1]",
            ),
            (
                "served_model_name = [\"a\", \"a\"]",
                "server.served_model_name[1]",
            ),
            ("responses_store_max = 0", "server.responses_store_max"),
            ("metrics_prefix = \"tgi\"", "server.metrics_prefix"),
            ("batch_max_requests = 0", "server.batch_max_requests"),
            (
                "batch_background_every = 0",
                "server.batch_background_every",
            ),
            ("batch_max_file_bytes = 0", "server.batch_max_file_bytes"),
            ("batch_data_dir = \"\"", "server.batch_data_dir"),
        ] {
            let e = ServerConfig::from_toml_str(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = ServerConfig::from_toml_str(&format!(
            "[[tenants]]\nname = \"a\"\napi_keys = [\"{h}\"]\nweight = 0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("server.tenants[0].weight"), "{e}");
        let e =
            ServerConfig::from_toml_str("[[tenants]]\nname = \"a\"\napi_keys = [\"plain-key\"]\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("api_keys"), "{e}");
        let ok = ServerConfig::from_toml_str(&format!(
            "port = 0\n[[tenants]]\nname = \"a\"\napi_keys = [\"{h}\"]\n"
        ))
        .unwrap();
        assert_eq!(ok.tenants[0].max_queued, 256);
    }

    #[test]
    fn served_names_and_origins() {
        assert_eq!(
            ServerConfig::from_toml_str("served_model_name = \"m\"")
                .unwrap()
                .served_model_name,
            ["m"]
        );
        assert!(ServerConfig::from_toml_str("served_model_name = \"\"")
            .unwrap()
            .served_model_name
            .is_empty());
        let c = ServerConfig::from_toml_str("served_model_name = [\"a\", \"b\"]\nallowed_origins = [\"*\", \"http://localhost:3000\"]").unwrap();
        assert_eq!(c.served_model_name, ["a", "b"]);
        assert_eq!(c.allowed_origins.len(), 2);
    }

    #[test]
    fn default_file_matches_the_serde_defaults() {
        // Every [server] key, commented out, with its default value.
        let text = include_str!("../../config/default.toml");
        let section = text
            .split("\n[server]\n")
            .nth(1)
            .expect("a [server] section in default.toml");
        let body: String = section
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                })
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let parsed = ServerConfig::from_toml_str(&body).unwrap();
        assert_eq!(parsed, ServerConfig::default());
        let table: toml::Table = toml::from_str(&body).unwrap();
        let all = toml::Table::try_from(ServerConfig::default()).unwrap();
        for k in all.keys() {
            assert!(
                table.contains_key(k) || k == "tenants",
                "config/default.toml does not document server.{k}"
            );
        }
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../config/tenants.example.toml");
        let cfg = crate::config::Config::parse(text, "tenants.example.toml").unwrap();
        let s = cfg.server.clone();
        assert!(s.tenants.len() >= 2);
    }
}
