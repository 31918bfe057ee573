//! API keys: SHA-256 hashing (what `brigade hash-key` prints) and key → tenant lookup.
//!
//! Only hashes are kept in the config and in memory; a presented key is hashed
//! and looked up. Keys are never logged.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// `sha256:<64 hex digits>` of `key`, the form `api_keys` entries take.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// Lower-case hex digest of a config entry (`sha256:` prefix optional), or None if malformed.
pub fn normalize_hash(entry: &str) -> Option<String> {
    let hex = entry.strip_prefix("sha256:").unwrap_or(entry);
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

/// Key hash → tenant index; open (no keys) when no tenants are configured.
#[derive(Debug, Clone)]
pub struct KeyDirectory {
    by_hash: HashMap<String, usize>,
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
    /// Builds the directory from tenants (index = position); `open` when none are configured.
    pub fn new(tenants: &[super::config::TenantConfig], open: bool) -> Self {
        let mut by_hash = HashMap::new();
        for (i, t) in tenants.iter().enumerate() {
            for h in &t.api_keys {
                if let Some(h) = normalize_hash(h) {
                    by_hash.insert(h, i);
                }
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
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(AuthFailure::Missing)?;
        let digest = hex::encode(Sha256::digest(key.as_bytes()));
        self.by_hash.get(&digest).copied().ok_or(AuthFailure::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::TenantConfig;

    #[test]
    fn hash_is_sha256_hex() {
        // sha256("abc")
        assert_eq!(hash_key("abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(normalize_hash(&hash_key("x")).is_some());
        assert!(normalize_hash("sha256:xyz").is_none());
    }

    #[test]
    fn lookup() {
        let mut a = TenantConfig::named("a");
        a.api_keys = vec![hash_key("ka")];
        let mut b = TenantConfig::named("b");
        b.api_keys = vec![hash_key("kb").trim_start_matches("sha256:").to_uppercase()];
        let d = KeyDirectory::new(&[a, b], false);
        assert_eq!(d.authenticate(Some("Bearer ka")), Ok(0));
        assert_eq!(d.authenticate(Some("Bearer kb")), Ok(1));
        assert_eq!(d.authenticate(Some("Bearer kc")), Err(AuthFailure::Unknown));
        assert_eq!(d.authenticate(None), Err(AuthFailure::Missing));
        assert_eq!(d.authenticate(Some("Basic x")), Err(AuthFailure::Missing));
    }
}
