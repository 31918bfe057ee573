//! Every chat template of llama.cpp's `models/templates/` renders with Brigade's
//! [`ChatTemplate`] (minijinja) byte for byte as transformers' `apply_chat_template`
//! (Python jinja2) renders it.
//!
//! Expected renderings: `tests/fixtures/templates/<template>.json`, made by
//! `tests/reference/render_templates.py` from the conversations in
//! `tests/fixtures/templates/conversations.json` (read its docstring for the conventions:
//! bos/eos table, fixed clock, tool-call arguments as objects). A case where Python raised
//! must fail here too (the messages are not compared).
//!
//! The template texts are read from the llama.cpp data dir that scripts/fetch-test-data.sh fills:
//! `$BRIGADE_LLAMACPP_DATA/models/templates`, else `~/.cache/brigade/llamacpp-0.3.36/models/templates`
//! Without it the test prints a notice and passes (fails under `BRIGADE_REQUIRE_MODEL=1`, as CI runs it);
//! a template whose sha256 differs from the fixture's is a failure (regenerate the fixtures).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use brigade::tokenizer::{ChatMessage, ChatTemplate};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The instant `strftime_now` reads, as the Python script pins it (naive 2024-02-05T14:03:09,
/// which Brigade reads as UTC).
const FIXED_NOW_ISO: &str = "2024-02-05T14:03:09";
/// [`FIXED_NOW_ISO`] in seconds since the Unix epoch.
const FIXED_NOW_UNIX_SECONDS: i64 = 1_707_141_789;

/// Templates whose renderings are allowed to differ, with the reason (a Python-only
/// feature minijinja cannot reproduce). They count as not passing in the printed counts;
/// one that starts matching fails the test, so the list stays exact. Empty: markupsafe's
/// `Markup + str` (functionary v3.1's tool list) is reproduced now.
const ALLOWED_DIFFERENCES: &[(&str, &str)] = &[];

/// `conversations.json`.
#[derive(Deserialize)]
struct Conversations {
    fixed_now: String,
    cases: BTreeMap<String, Case>,
}

/// One conversation to render.
#[derive(Deserialize)]
struct Case {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    add_generation_prompt: bool,
}

/// `<template>.json`.
#[derive(Deserialize)]
struct Fixture {
    template: String,
    sha256: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    cases: BTreeMap<String, Expected>,
}

/// What transformers produced for a case.
#[derive(Deserialize)]
#[serde(untagged)]
enum Expected {
    Text { text: String },
    Error { error: String },
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

/// llama.cpp's `models/templates` dir, when present.
fn templates_dir() -> Option<PathBuf> {
    // The layout of scripts/fetch-test-data.sh (as tests/tokenizer_vocab.rs reads it).
    let root = match std::env::var_os("BRIGADE_LLAMACPP_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(&std::env::var_os("HOME")?).join(".cache/brigade/llamacpp-0.3.36"),
    };
    let dir = root.join("models").join("templates");
    if !dir.is_dir() && std::env::var("BRIGADE_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!("BRIGADE_REQUIRE_MODEL=1 but llama.cpp's templates are not in {} (run scripts/fetch-test-data.sh)", dir.display());
    }
    dir.is_dir().then_some(dir)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The first line where `got` and `want` differ, for the failure report.
fn first_difference(got: &str, want: &str) -> String {
    let at = got
        .char_indices()
        .zip(want.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(got.len().min(want.len()));
    let from = got
        .get(..at)
        .and_then(|s| s.rfind('\n'))
        .map_or(0, |i| i + 1);
    let context = |s: &str| {
        s.get(from..)
            .unwrap_or_default()
            .chars()
            .take(160)
            .collect::<String>()
    };
    format!(
        "at byte {at}:\n      got:  {:?}\n      want: {:?}",
        context(got),
        context(want)
    )
}

#[test]
fn every_template_renders_as_transformers_does() -> Result<()> {
    let Some(templates) = templates_dir() else {
        println!(
            "NOTE: llama.cpp templates not found (set BRIGADE_LLAMACPP_DATA or run \
             scripts/fetch-test-data.sh); skipping"
        );
        return Ok(());
    };
    let conversations: Conversations = read_json(&fixtures_dir().join("conversations.json"))?;
    assert_eq!(
        conversations.fixed_now, FIXED_NOW_ISO,
        "the Python script's clock moved"
    );

    let mut fixture_paths: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    fixture_paths.retain(|p| {
        p.extension().is_some_and(|e| e == "json") && !p.ends_with("conversations.json")
    });
    fixture_paths.sort();
    if fixture_paths.is_empty() {
        bail!("no template fixtures under {}", fixtures_dir().display());
    }

    let (mut num_templates_equal, mut num_cases, mut num_cases_equal) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for path in &fixture_paths {
        let fixture: Fixture = read_json(path)?;
        let source_path = templates.join(&fixture.template);
        let bytes = std::fs::read(&source_path)
            .with_context(|| format!("reading {}", source_path.display()))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if sha256 != fixture.sha256 {
            bail!(
                "{}: sha256 {sha256} differs from the fixture's {} (regenerate with \
                 tests/reference/render_templates.py)",
                fixture.template,
                fixture.sha256
            );
        }
        let source = String::from_utf8(bytes).with_context(|| fixture.template.clone())?;
        let template = ChatTemplate::compile(&source, fixture.bos_token, fixture.eos_token)
            .with_fixed_now(FIXED_NOW_UNIX_SECONDS);
        let mut all_equal = true;
        for (name, expected) in &fixture.cases {
            let case = conversations.cases.get(name).with_context(|| {
                format!(
                    "{}: case {name} not in conversations.json",
                    fixture.template
                )
            })?;
            num_cases += 1;
            let got = template.render_with(
                &case.messages,
                case.tools.as_deref(),
                case.kwargs.as_ref(),
                case.add_generation_prompt,
            );
            let outcome = match (expected, &got) {
                (Expected::Text { text }, Ok(rendered)) if rendered == text => None,
                (Expected::Error { .. }, Err(_)) => None,
                (Expected::Text { text }, Ok(rendered)) => Some(first_difference(rendered, text)),
                (Expected::Text { .. }, Err(e)) => Some(format!("failed: {e}")),
                (Expected::Error { error }, Ok(_)) => {
                    Some(format!("rendered, but transformers raised {error:?}"))
                }
            };
            match outcome {
                None => num_cases_equal += 1,
                Some(why) => {
                    all_equal = false;
                    failures.push(format!("{} / {name}: {why}", fixture.template));
                }
            }
        }
        // A template on the allow-list counts as not equal; it only does not fail the test.
        if all_equal {
            num_templates_equal += 1;
            if ALLOWED_DIFFERENCES
                .iter()
                .any(|(t, _)| *t == fixture.template)
            {
                failures.push(format!(
                    "{} / *: matches now: remove it from ALLOWED_DIFFERENCES",
                    fixture.template
                ));
            }
        }
    }
    println!(
        "chat templates equal to transformers: {num_templates_equal}/{} templates, \
         {num_cases_equal}/{num_cases} cases",
        fixture_paths.len()
    );
    for (template, why) in ALLOWED_DIFFERENCES {
        println!("  allowed to differ: {template}: {why}");
    }
    let is_allowed = |failure: &str| {
        ALLOWED_DIFFERENCES
            .iter()
            .any(|(t, _)| failure.starts_with(&format!("{t} / ")) && !failure.contains(" / *: "))
    };
    let (allowed, unexpected): (Vec<&String>, Vec<&String>) =
        failures.iter().partition(|f| is_allowed(f));
    for failure in &allowed {
        println!(
            "  differs (allowed): {}",
            failure.lines().next().unwrap_or_default()
        );
    }
    for failure in &unexpected {
        println!("  DIFFERS: {failure}");
    }
    assert!(
        unexpected.is_empty(),
        "{} cases differ from transformers",
        unexpected.len()
    );
    Ok(())
}
