//! `brigade tokenize`: the token ids of a text.
//!
//! Reads only the tokenizer metadata of the GGUF (no tensors are loaded or needed), so it
//! works on vocab-only files such as llama.cpp's `models/ggml-vocab-*.gguf`, like
//! `llama-tokenize --vocab-only`.

use anyhow::{Context, Result};
use clap::Args;

use brigade::gguf::GgufFile;
use brigade::tokenizer::Tokenizer;

use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct TokenizeArgs {
    /// Text to tokenize.
    text: String,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
    /// Add no BOS/EOS (by default BOS is prepended iff the vocabulary's
    /// `tokenizer.ggml.add_bos_token` says so, and EOS appended iff `add_eos_token`, as
    /// llama.cpp does).
    #[arg(long)]
    no_bos: bool,
    /// Treat control-token text (`<|im_start|>`) as plain text instead of parsing it.
    #[arg(long)]
    no_parse_special: bool,
    #[command(flatten)]
    m: ModelArgs,
}

/// Prints the ids of the text: BOS/EOS as the vocabulary says, special tokens parsed.
pub(crate) fn run(a: TokenizeArgs) -> Result<()> {
    let path = super::model_path(&a.m, &super::load_config(a.m.config.as_deref())?)?;
    let file = GgufFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let tok = Tokenizer::from_gguf(&file)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    let parse_special = !a.no_parse_special;
    let ids = if a.no_bos {
        tok.encode(&a.text, parse_special)?
    } else {
        tok.encode_with_bos(&a.text, parse_special)?
    };
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        println!(
            "{}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}
