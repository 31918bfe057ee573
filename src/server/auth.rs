//! API keys: the [`KeyHash`] type (owner of the key-hash format, used by
//! `server::config`), `Authorization: Bearer` parsing, and key → tenant lookup.
//!
//! Only hashes are kept in the config and in memory; a presented key is hashed
//! and looked up. Keys are never logged. Does not own which routes need a key
//! (the extractors in `routes` and the `/metrics` check in `edge`).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// The SHA-256 hash of an API key: the only form in which keys are configured
/// (`api_keys`, `metrics_api_keys`) and kept in memory. Written `sha256:<64 hex>`;
/// parsing also takes the bare hex digits, in either case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyHash([u8; 32]);

/// A configured key hash that is not `sha256:` + 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an API key hash must be 64 hex digits, optionally prefixed `sha256:` (make one with `brigade hash-key`); plain keys are not accepted")]
pub struct KeyHashError;

impl KeyHash {
    /// The hash of a presented key.
    pub fn of_key(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses a config entry: `sha256:<64 hex>` or the bare hex digits.
    pub fn parse(entry: &str) -> Result<Self, KeyHashError> {
        let hex_digits = entry.strip_prefix("sha256:").unwrap_or(entry);
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut out).map_err(|_| KeyHashError)?;
        Ok(KeyHash(out))
    }
}

impl std::fmt::Display for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

impl TryFrom<String> for KeyHash {
    type Error = KeyHashError;

    fn try_from(s: String) -> Result<Self, KeyHashError> {
        KeyHash::parse(&s)
    }
}

impl From<KeyHash> for String {
    fn from(h: KeyHash) -> String {
        h.to_string()
    }
}

/// `sha256:<64 hex digits>` of `key`, the form `api_keys` entries take.
pub fn hash_key(key: &str) -> String {
    KeyHash::of_key(key).to_string()
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 7235 section 2.1), separated from the token by spaces.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.trim_start().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Key hash → tenant index; open (no keys) when no tenants are configured.
#[derive(Debug, Clone)]
pub struct KeyDirectory {
    by_hash: HashMap<KeyHash, usize>,
    open: bool,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// The key matches no tenant.
    Unknown,
}

impl KeyDirectory {
    /// Builds the directory from each tenant's key hashes (index = position);
    /// `open` accepts every request as tenant 0.
    pub fn new<'a>(tenant_keys: impl IntoIterator<Item = &'a [KeyHash]>, open: bool) -> Self {
        let mut by_hash = HashMap::new();
        for (i, keys) in tenant_keys.into_iter().enumerate() {
            for h in keys {
                by_hash.insert(*h, i);
            }
        }
        Self { by_hash, open }
    }

    /// Tenant index for an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<usize, AuthFailure> {
        if self.open {
            return Ok(0);
        }
        let key = authorization
            .and_then(bearer_token)
            .ok_or(AuthFailure::Missing)?;
        self.by_hash
            .get(&KeyHash::of_key(key))
            .copied()
            .ok_or(AuthFailure::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        // sha256("abc")
        assert_eq!(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let h = KeyHash::parse(&hash_key("x")).unwrap();
        assert_eq!(h, KeyHash::of_key("x"));
        assert_eq!(
            KeyHash::parse(&hash_key("x").trim_start_matches("sha256:").to_uppercase()),
            Ok(h)
        );
        assert_eq!(KeyHash::parse("sha256:xyz"), Err(KeyHashError));
        assert_eq!(KeyHash::parse("plain-key"), Err(KeyHashError));
        assert_eq!(String::from(h), hash_key("x"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in [
            "Bearer k",
            "BEARER k",
            "bearer k",
            "bEaReR    k ",
            " Bearer k",
        ] {
            assert_eq!(bearer_token(v), Some("k"), "{v:?}");
        }
        for v in ["Basic k", "Bearer", "Bearer ", "Bearerk", "k"] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    #[test]
    fn lookup() {
        let a = [KeyHash::of_key("ka")];
        let b = [
            KeyHash::parse(&hash_key("kb").trim_start_matches("sha256:").to_uppercase()).unwrap(),
        ];
        let d = KeyDirectory::new([&a[..], &b[..]], false);
        assert_eq!(d.authenticate(Some("Bearer ka")), Ok(0));
        assert_eq!(d.authenticate(Some("BEARER kb")), Ok(1));
        assert_eq!(d.authenticate(Some("Bearer kc")), Err(AuthFailure::Unknown));
        assert_eq!(d.authenticate(None), Err(AuthFailure::Missing));
        assert_eq!(d.authenticate(Some("Basic x")), Err(AuthFailure::Missing));
        assert_eq!(KeyDirectory::new([&a[..]], true).authenticate(None), Ok(0));
    }
}
