//! CORS (`server.allowed_origins`, `--allowed-origins`): which browser origins
//! may call the API, the answer to preflight `OPTIONS` requests, and the
//! `Access-Control-*` headers on every other response (errors and SSE streams
//! included: the headers go out with the response head).
//!
//! ```text
//!  OPTIONS + Origin + Access-Control-Request-Method   (preflight)
//!     allowed origin  → 204, Allow-Origin / -Methods / -Headers (as requested) / Max-Age
//!     other origin    → passed on (405 from the router: the browser refuses the call)
//!  any other request with an allowed Origin → the response + Allow-Origin, Expose-Headers
//! ```
//!
//! Off (no headers at all, preflight not answered) when the list is empty.
//! `*` allows any origin and is answered as `*` (no credentials: the API uses
//! bearer keys, which browsers send as a plain header). Owns the origin check
//! and the headers only; the layer is mounted outermost by [`super::routes`].

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::App;

/// Methods the API answers (`Access-Control-Allow-Methods`).
const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";
/// Response headers scripts may read (`Access-Control-Expose-Headers`).
const EXPOSE_HEADERS: &str = "x-request-id, retry-after";
/// Headers allowed when a preflight lists none.
const DEFAULT_ALLOW_HEADERS: &str = "authorization, content-type, x-request-id";
/// Seconds a browser may cache a preflight answer.
const MAX_AGE_S: &str = "600";

/// The configured origin policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers (the default).
    Off,
    /// Any origin (`*`).
    Any,
    /// These exact origins (compared without case).
    List(Vec<String>),
}

impl Cors {
    /// The policy of `server.allowed_origins` (validated by the config).
    pub fn new(allowed_origins: &[String]) -> Self {
        if allowed_origins.is_empty() {
            Cors::Off
        } else if allowed_origins.iter().any(|o| o == "*") {
            Cors::Any
        } else {
            Cors::List(
                allowed_origins
                    .iter()
                    .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                    .collect(),
            )
        }
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, or
    /// None when that origin is not allowed.
    pub fn allow_origin(&self, origin: &str) -> Option<HeaderValue> {
        match self {
            Cors::Off => None,
            Cors::Any => Some(HeaderValue::from_static("*")),
            Cors::List(list) => {
                let o = origin.to_ascii_lowercase();
                list.contains(&o)
                    .then(|| HeaderValue::from_str(origin).ok())
                    .flatten()
            }
        }
    }

    /// The preflight answer for `headers`, when it is a preflight from an allowed origin.
    fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<Response> {
        if method != Method::OPTIONS || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
        let allow = self.allow_origin(origin)?;
        let requested = headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .filter(|v| v.to_str().is_ok_and(|s| !s.trim().is_empty()))
            .cloned()
            .unwrap_or(HeaderValue::from_static(DEFAULT_ALLOW_HEADERS));
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_S),
        );
        self.vary(h);
        Some(resp)
    }

    /// `Vary: Origin` when the answer depends on the origin (a list, not `*`).
    fn vary(&self, h: &mut HeaderMap) {
        if let Cors::List(_) = self {
            h.append(header::VARY, HeaderValue::from_static("origin"));
        }
    }
}

/// The middleware: answers preflights, adds the headers to the other responses.
pub(crate) async fn layer(State(app): State<App>, req: Request, next: Next) -> Response {
    let cors = &app.cors;
    if *cors == Cors::Off {
        return next.run(req).await;
    }
    if let Some(resp) = cors.preflight(req.method(), req.headers()) {
        return resp;
    }
    let allow = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .and_then(|o| cors.allow_origin(o));
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Some(allow) = allow {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
    cors.vary(h);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preflight_headers(origin: &str, req_headers: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        if let Some(r) = req_headers {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                HeaderValue::from_str(r).unwrap(),
            );
        }
        h
    }

    #[test]
    fn origins_match_exactly_without_case() {
        assert_eq!(Cors::new(&[]), Cors::Off);
        assert_eq!(Cors::new(&["http://a.com".into(), "*".into()]), Cors::Any);
        let c = Cors::new(&["https://App.example.com/".into()]);
        assert_eq!(
            c.allow_origin("https://app.example.com").unwrap(),
            "https://app.example.com"
        );
        assert_eq!(
            c.allow_origin("HTTPS://APP.EXAMPLE.COM").unwrap(),
            "HTTPS://APP.EXAMPLE.COM"
        );
        assert!(c.allow_origin("https://app.example.com.evil.org").is_none());
        assert!(c.allow_origin("http://app.example.com").is_none());
        assert_eq!(Cors::Any.allow_origin("null").unwrap(), "*");
        assert!(Cors::Off.allow_origin("http://a.com").is_none());
    }

    #[test]
    fn preflight_answers_allowed_origins_only() {
        let c = Cors::new(&["http://localhost:3000".into()]);
        let r = c
            .preflight(
                &Method::OPTIONS,
                &preflight_headers(
                    "http://localhost:3000",
                    Some("authorization, x-stainless-os"),
                ),
            )
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://localhost:3000"
        );
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, x-stainless-os"
        );
        assert!(r.headers()[header::ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .unwrap()
            .contains("POST"));
        assert_eq!(r.headers()[header::VARY], "origin");
        let r = c
            .preflight(
                &Method::OPTIONS,
                &preflight_headers("http://localhost:3000", None),
            )
            .unwrap();
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
            DEFAULT_ALLOW_HEADERS
        );
        assert!(c
            .preflight(
                &Method::OPTIONS,
                &preflight_headers("http://evil.com", None)
            )
            .is_none());
        // Not a preflight: a plain OPTIONS, or another method.
        let mut plain = preflight_headers("http://localhost:3000", None);
        assert!(c.preflight(&Method::POST, &plain).is_none());
        plain.remove(header::ACCESS_CONTROL_REQUEST_METHOD);
        assert!(c.preflight(&Method::OPTIONS, &plain).is_none());
    }
}
