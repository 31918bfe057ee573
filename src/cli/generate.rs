//! `brigade generate`: one request through the engine, streamed to stdout.

use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;

use brigade::engine::{Engine, Event, GenerateRequest, Prompt, SamplingParams};
use brigade::tokenizer::ChatMessage;

use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Jinja chat template file to use instead of the model's (`model.chat_template`), for `--chat`.
    #[arg(long, requires = "chat")]
    chat_template: Option<std::path::PathBuf>,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Random seed (default: drawn fresh and reported).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the k most likely tokens (-1 or 0: off).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    top_k: i32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens below min_p x the top probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Presence penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Frequency penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Stop string (repeatable); not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Return this many top alternatives per token (0..=20) in --json output.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Completions of the prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Generate at least this many tokens before end-of-generation may stop.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// Keep going past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    spec: super::SpecArgs,
}

/// Runs one request through the engine, streaming its text (or printing JSON).
pub(crate) fn run(a: GenerateArgs) -> Result<()> {
    let mut cfg = super::load_config(a.m.config.as_deref())?;
    a.spec.apply(&mut cfg)?;
    if let Some(t) = &a.chat_template {
        cfg.model.chat_template = Some(t.clone());
    }
    let (model, tok) = super::load_with(&a.m, &cfg)?;
    let prompt = if a.chat {
        Prompt::Chat(vec![ChatMessage::new("user", a.prompt.clone())])
    } else {
        Prompt::Text(a.prompt.clone())
    };
    let params = SamplingParams {
        max_tokens: a.max_tokens,
        min_tokens: a.min_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        stop: a.stop.clone(),
        seed: a.seed,
        logprobs: Some(a.logprobs.unwrap_or(0)),
        n: a.n,
        ignore_eos: a.ignore_eos,
        ..SamplingParams::default()
    };
    let engine = Engine::start(model, tok, cfg)?;
    let mut stream = engine.submit(GenerateRequest {
        prompt,
        params,
        priority: 0,
    })?;
    let mut prompt_ids = Vec::new();
    let mut seed = 0;
    #[derive(Default)]
    struct Choice {
        ids: Vec<u32>,
        logprobs: Vec<f32>,
        top: Vec<Vec<(u32, f32)>>,
        text: String,
        finish: Option<&'static str>,
    }
    let mut choices: Vec<Choice> = (0..a.n.max(1)).map(|_| Choice::default()).collect();
    let stdout = std::io::stdout();
    let stream_text = !a.json && a.n <= 1;
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Started {
                prompt_tokens,
                seed: s,
            } => {
                prompt_ids = prompt_tokens;
                seed = s;
            }
            Event::PromptLogprobs(_) => {}
            Event::Token {
                index,
                token,
                text: piece,
            } => {
                let Some(c) = choices.get_mut(index) else {
                    continue;
                };
                c.ids.push(token.token);
                c.logprobs.push(token.logprob);
                c.top.push(token.top);
                c.text.push_str(&piece);
                if stream_text {
                    let mut lock = stdout.lock();
                    write!(lock, "{piece}")?;
                    lock.flush()?;
                }
            }
            Event::Finished {
                index,
                reason,
                text: rest,
                ..
            } => {
                let Some(c) = choices.get_mut(index) else {
                    continue;
                };
                c.text.push_str(&rest);
                c.finish = Some(reason.as_str());
                if stream_text {
                    println!("{rest}");
                }
            }
            Event::Error(e) => bail!("{e}"),
        }
    }
    if !a.json && !stream_text {
        for (i, c) in choices.iter().enumerate() {
            println!("--- completion {i} ({})", c.finish.unwrap_or("abort"));
            println!("{}", c.text);
        }
    }
    if a.json {
        let choice_json = |c: &Choice| {
            let mut v = serde_json::json!({
                "token_ids": c.ids,
                "text": c.text,
                "finish_reason": c.finish.unwrap_or("abort"),
                "logprobs": c.logprobs,
            });
            if a.logprobs.unwrap_or(0) > 0 {
                v["top_logprobs"] = serde_json::json!(c.top);
            }
            v
        };
        let mut v = choices.first().map(choice_json).unwrap_or_default(); // n.max(1) choices
        v["prompt_token_ids"] = serde_json::json!(prompt_ids);
        v["seed"] = serde_json::json!(seed);
        if choices.len() > 1 {
            v["choices"] = serde_json::Value::Array(choices.iter().map(choice_json).collect());
        }
        println!("{v}");
    }
    Ok(())
}
