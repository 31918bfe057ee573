//! `brigade tokenize`: the token ids of a text.

use anyhow::Result;
use clap::Args;

use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct TokenizeArgs {
    /// Text to tokenize.
    text: String,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    m: ModelArgs,
}

/// Prints the ids of the text, special tokens parsed.
pub(crate) fn run(a: TokenizeArgs) -> Result<()> {
    let (_, tok) = super::load(&a.m)?;
    let ids = tok.encode(&a.text, true)?;
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}
