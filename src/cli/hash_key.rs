//! `brigade hash-key`: the `api_keys` entry for an API key.

use std::io::BufRead;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub(crate) struct HashKeyArgs {
    /// The API key; read from the first line of stdin when absent (keeps it out of shell history).
    key: Option<String>,
}

/// Prints `sha256:<hex>` of the key.
pub(crate) fn run(a: HashKeyArgs) -> Result<()> {
    let key = match a.key {
        Some(k) => k,
        None => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    if key.is_empty() {
        bail!("the API key must not be empty");
    }
    println!("{}", brigade::server::hash_key(&key));
    Ok(())
}
