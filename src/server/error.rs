//! [`ApiError`] and THE status table: every error the HTTP API returns becomes
//! an OpenAI error object here, and nowhere else.
//!
//! ```text
//!  400 invalid_request_error   bad JSON, wrong type or range (param named)
//!  400 invalid_request_error   malformed HTTP (request line, header, Content-Length framing)
//!  401 authentication_error    missing or unknown API key (tenants, /metrics)
//!  403 permission_error        `Host` not in server.allowed_hosts
//!  404 not_found_error         unknown model or route
//!  405 invalid_request_error   wrong method on a known route
//!  413 invalid_request_error   body larger than server.max_body_bytes
//!  414 invalid_request_error   URI longer than server.max_uri_bytes
//!  415 invalid_request_error   POST body that is not `application/json`
//!  429 rate_limit_error        tenant queue full, token-rate limit, engine inbox full (+ Retry-After)
//!  431 invalid_request_error   request head larger than server.max_header_bytes
//!  503 service_unavailable     not ready, draining, or over server.max_connections
//!  500 internal_error          anything else (logged with the request id)
//! ```

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; `param` names the field.
    #[error("{message}")]
    Invalid {
        /// OpenAI `param`.
        param: Option<String>,
        /// Message naming the field and the limit.
        message: String,
    },
    /// 401: no key, or a key that matches no tenant.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: unknown model.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// 404: unknown route.
    #[error("Not found: {0}")]
    RouteNotFound(String),
    /// 405.
    #[error("Method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    /// 413.
    #[error("Request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// `server.max_body_bytes`.
        limit: usize,
    },
    /// 403: the `Host` header is not in `server.allowed_hosts`.
    #[error("Host {0:?} is not allowed (server.allowed_hosts)")]
    HostNotAllowed(String),
    /// 414: the URI is longer than `server.max_uri_bytes`.
    #[error("Request URI is longer than the limit of {limit} bytes (server.max_uri_bytes)")]
    UriTooLong {
        /// `server.max_uri_bytes`.
        limit: usize,
    },
    /// 415: a JSON endpoint got another content type.
    #[error("Content-Type must be `application/json`, got {0}")]
    UnsupportedMediaType(String),
    /// 431: the request head is larger than `server.max_header_bytes`.
    #[error("Request header fields are larger than the limit of {limit} bytes (server.max_header_bytes) or more than {max_fields} fields")]
    HeadersTooLarge {
        /// `server.max_header_bytes`.
        limit: usize,
        /// Most header fields read.
        max_fields: usize,
    },
    /// 429: a limit was hit; retry after the given seconds.
    #[error("{message}")]
    RateLimited {
        /// What limit.
        message: String,
        /// Seconds for `Retry-After`.
        retry_after_s: u64,
    },
    /// 503: starting, draining or stopped.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: Some(param.to_string()),
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::HostNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `type` field; also the `error_type` metric label (bounded set).
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Invalid { .. }
            | ApiError::MethodNotAllowed(_)
            | ApiError::TooLarge { .. }
            | ApiError::UriTooLong { .. }
            | ApiError::UnsupportedMediaType(_)
            | ApiError::HeadersTooLarge { .. } => "invalid_request_error",
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::HostNotAllowed(_) => "permission_error",
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => "not_found_error",
            ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable_error",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// The OpenAI `code` field.
    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::TooLarge { .. } => Some("request_too_large"),
            ApiError::HostNotAllowed(_) => Some("host_not_allowed"),
            ApiError::UriTooLong { .. } => Some("uri_too_long"),
            ApiError::UnsupportedMediaType(_) => Some("unsupported_media_type"),
            ApiError::HeadersTooLarge { .. } => Some("request_header_fields_too_large"),
            ApiError::RateLimited { .. } => Some("rate_limit_exceeded"),
            _ => None,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { param, .. } => param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.to_string(), "type": self.error_type(), "param": self.param(), "code": self.code()}})
    }
}

impl ApiError {
    /// The whole HTTP/1.1 response as bytes, with `Connection: close`: for the
    /// connection layer, which answers outside any router (over the connection
    /// cap; in place of hyper's empty automatic error responses).
    pub(crate) fn http1_close_response(&self) -> Vec<u8> {
        let body = self.body().to_string();
        let status = self.status();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if let ApiError::Unavailable(_) = self {
            head.push_str("retry-after: 1\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid { param, message } => ApiError::Invalid { param, message },
            EngineError::Overloaded => ApiError::RateLimited {
                message: e.to_string(),
                retry_after_s: 1,
            },
            EngineError::ShuttingDown => {
                ApiError::Unavailable("the server is shutting down".into())
            }
            EngineError::Internal(m) => ApiError::Internal(m),
            EngineError::Dead(m) => ApiError::Unavailable(format!("the engine has stopped: {m}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(m) = &self {
            // The request span carries the request id.
            tracing::error!(error = %m, "internal error");
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::RateLimited { retry_after_s, .. } = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        if let ApiError::Unavailable(_) = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        resp.extensions_mut().insert(ErrorKind(self.error_type()));
        resp
    }
}

/// Marks an error response with its `error_type` for the metrics middleware.
#[derive(Clone, Copy, Debug)]
pub struct ErrorKind(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            (ApiError::invalid("n", "bad"), 400, Some("n")),
            (ApiError::Unauthorized("no".into()), 401, None),
            (ApiError::ModelNotFound("x".into()), 404, Some("model")),
            (ApiError::TooLarge { limit: 10 }, 413, None),
            (ApiError::HostNotAllowed("evil.com".into()), 403, None),
            (ApiError::UriTooLong { limit: 10 }, 414, None),
            (
                ApiError::UnsupportedMediaType("text/plain".into()),
                415,
                None,
            ),
            (
                ApiError::HeadersTooLarge {
                    limit: 10,
                    max_fields: 100,
                },
                431,
                None,
            ),
            (
                ApiError::RateLimited {
                    message: "slow".into(),
                    retry_after_s: 3,
                },
                429,
                None,
            ),
            (ApiError::Unavailable("draining".into()), 503, None),
            (ApiError::Internal("boom".into()), 500, None),
        ];
        for (e, status, param) in cases {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.body()["error"]["param"].as_str(), param);
            let r = e.clone().into_response();
            assert_eq!(r.status().as_u16(), status);
            if status == 429 {
                assert_eq!(r.headers()["retry-after"], "3");
            }
            let raw = String::from_utf8(e.http1_close_response()).unwrap();
            assert!(raw.starts_with(&format!("HTTP/1.1 {status} ")), "{raw}");
            let (head, body) = raw.split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("content-length: {}", body.len()))
                    && head.contains("connection: close"),
                "{raw}"
            );
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(body).unwrap(),
                e.body()
            );
        }
    }
}
