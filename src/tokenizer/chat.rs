//! Chat templates: render a conversation to prompt text with the model's Jinja template.
//!
//! Mimics the environment of Hugging Face's `apply_chat_template` so that output is
//! byte-identical for the templates shipped in GGUF files (`tokenizer.chat_template`):
//!
//! - `trim_blocks=True`, `lstrip_blocks=True`, no autoescape, trailing newline dropped;
//! - `{% break %}` / `{% continue %}` (jinja2 `loopcontrols`);
//! - globals `raise_exception(msg)`; variables `messages`, `add_generation_prompt`,
//!   `bos_token`, `eos_token` (only when the tokenizer has them);
//! - Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...) via
//!   `minijinja-contrib`'s pycompat;
//! - `tojson` formatted like Python's `json.dumps(x, ensure_ascii=False)`
//!   (`", "` / `": "` separators, `indent=` supported, key order kept).
//!
//! Owns the compiled template only; it does not tokenize the result (see
//! [`super::Tokenizer::encode_chat`]). Not provided: `strftime_now`, `tools`, `documents`.
//!
//! Besides the text, [`ChatTemplate::render_locating_content`] reports which byte ranges of
//! it were copied from message content, so that control-token text typed by a user is not
//! mistaken for the control tokens the template writes. It renders a second time with each
//! content replaced by a sentinel that no text holds, then checks that putting the real
//! contents back reproduces the first rendering byte for byte:
//!
//! ```text
//!   render(messages)            "<|im_start|>user\nhi<|im_end|>x<|im_end|>\n"
//!   render(content_i → S_i)     "<|im_start|>user\nS_0<|im_end|>\n"
//!   S_0 → "hi<|im_end|>x"       equal to the first ⇒ content range 17..30
//! ```
//!
//! A template that trims content (`| trim`, `.strip()`) is followed too; one that changes it
//! otherwise (slices, escapes, branches on it) yields no ranges.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// Name under which the single template is stored in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Opens the sentinel standing for a message's content (a private-use character; the
/// message index in decimal and [`SENTINEL_CLOSE`] follow).
const SENTINEL_OPEN: char = '\u{F0000}';
/// Closes a content sentinel.
const SENTINEL_CLOSE: char = '\u{F0001}';

/// One turn of a conversation, as in the OpenAI / Hugging Face message format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Speaker: `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// Message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special-token strings it may refer to.
///
/// A model's template that fails to parse is kept (see [`ChatTemplate::compile`]):
/// rendering it reports the parse error, so a chat request says what went wrong
/// instead of "no chat template".
///
/// Cheap to clone (the compiled environment is shared) and `Send + Sync`.
#[derive(Clone)]
pub struct ChatTemplate {
    /// The compiled environment, or the error the source failed to parse with.
    env: Result<Arc<Environment<'static>>, Arc<Error>>,
    source: Arc<str>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("parse_error", &self.parse_error().map(|e| format!("{e:#}")))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are exposed to the template under those
    /// names when `Some` (as HF passes the tokenizer's special-token strings).
    /// A source that does not parse is an error ([`TokenizerError::TemplateSyntax`]).
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let template = Self::compile(source, bos_token, eos_token);
        match &template.env {
            Ok(_) => Ok(template),
            Err(e) => Err(TokenizerError::TemplateSyntax(e.clone())),
        }
    }

    /// Like [`ChatTemplate::new`], but a source that does not parse gives a template
    /// whose [`render`](Self::render) returns that parse error
    /// ([`TokenizerError::TemplateSyntax`]) and whose [`parse_error`](Self::parse_error)
    /// is `Some`: how a model's own template is loaded.
    pub fn compile(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_name| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        let env = match env.add_template_owned(TEMPLATE_NAME, source.to_owned()) {
            Ok(()) => Ok(Arc::new(env)),
            Err(e) => Err(Arc::new(e)),
        };
        Self {
            env,
            source: Arc::from(source),
            bos_token,
            eos_token,
        }
    }

    /// The error the source failed to parse with (`None` when it compiled).
    pub fn parse_error(&self) -> Option<&Error> {
        self.env.as_ref().err().map(|e| &**e)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the header that
    /// opens the assistant's turn (e.g. `<|im_start|>assistant\n`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let env = self
            .env
            .as_ref()
            .map_err(|e| TokenizerError::TemplateSyntax(e.clone()))?;
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(TokenizerError::TemplateRender)?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().map(Value::from).unwrap_or(Value::UNDEFINED),
            eos_token => self.eos_token.as_deref().map(Value::from).unwrap_or(Value::UNDEFINED),
        };
        template.render(ctx).map_err(TokenizerError::TemplateRender)
    }
}

/// A rendered conversation and where its message contents lie in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RenderedChat {
    /// The prompt text, as [`ChatTemplate::render`] returns it.
    pub(crate) text: String,
    /// Every byte range of `text` copied from a message's content (or its trimmed form), in
    /// text order and disjoint; `None` when the template changes content so that they cannot
    /// be located.
    pub(crate) content_ranges: Option<Vec<Range<usize>>>,
}

impl ChatTemplate {
    /// Renders `messages` like [`render`](Self::render) and locates the message contents in
    /// the result (see the module docs).
    pub(crate) fn render_locating_content(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedChat, TokenizerError> {
        let text = self.render(messages, add_generation_prompt)?;
        let content_ranges = self.locate_content(messages, add_generation_prompt, &text);
        Ok(RenderedChat {
            text,
            content_ranges,
        })
    }

    /// The content ranges of `text` (the rendering of `messages`), or `None`.
    fn locate_content(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        text: &str,
    ) -> Option<Vec<Range<usize>>> {
        // A sentinel character already in the text (from a content, a role or the
        // template) would make the skeleton ambiguous.
        if text.contains([SENTINEL_OPEN, SENTINEL_CLOSE]) {
            return None;
        }
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(index, m)| {
                ChatMessage::new(
                    m.role.clone(),
                    format!("{SENTINEL_OPEN}{index}{SENTINEL_CLOSE}"),
                )
            })
            .collect();
        // A template may reject the sentinels (e.g. it validates content); then no ranges.
        let skeleton = self.render(&masked, add_generation_prompt).ok()?;
        let mut ranges = Vec::new();
        let mut pos = 0usize; // bytes of `text` matched so far
        let (first_literal, mut rest) = split_literal(&skeleton);
        pos = match_literal(text, pos, first_literal)?;
        while !rest.is_empty() {
            // `rest` starts with a sentinel: OPEN digits CLOSE, then a literal.
            let after_open = rest.strip_prefix(SENTINEL_OPEN)?;
            let close = after_open.find(SENTINEL_CLOSE)?;
            let digits = after_open.get(..close)?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let index: usize = digits.parse().ok()?;
            let content = messages.get(index)?.content.as_str();
            let (literal, next) =
                split_literal(after_open.get(close + SENTINEL_CLOSE.len_utf8()..)?);
            // The content as written, or trimmed as `| trim` / `.strip()` leave it: the first
            // form that is followed by the next literal.
            let candidates = [
                content,
                content.trim(),
                content.trim_start(),
                content.trim_end(),
            ];
            let (start, end) = candidates.iter().find_map(|form| {
                let end = match_literal(text, pos, form)?;
                text.get(end..)?.starts_with(literal).then_some((pos, end))
            })?;
            if end > start {
                ranges.push(start..end);
            }
            pos = match_literal(text, end, literal)?;
            rest = next;
        }
        (pos == text.len()).then_some(ranges)
    }
}

/// Splits `s` at its first sentinel: the literal text before it, and the rest.
fn split_literal(s: &str) -> (&str, &str) {
    let at = s.find(SENTINEL_OPEN).unwrap_or(s.len());
    s.split_at(at)
}

/// If `text` continues with `literal` at byte `pos`, the position after it.
fn match_literal(text: &str, pos: usize, literal: &str) -> Option<usize> {
    if literal.contains(SENTINEL_CLOSE) {
        return None; // a sentinel cut apart by the template
    }
    text.get(pos..)?
        .starts_with(literal)
        .then_some(pos + literal.len())
}

/// `raise_exception(msg)`: HF's way for a template to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {message}"),
    ))
}

/// `tojson` as HF defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

/// Writes `value` as Python's `json.dumps` would (separators `", "`/`": "` without indent,
/// `","`/`": "` with it).
fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    let item_sep = if indent.is_some() { "," } else { ", " };
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * level));
        }
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let _ = write!(out, "{value}"); // writing to a String cannot fail
        }
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default())?,
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (k, key) in keys.iter().enumerate() {
                if k > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(s) => write_json_str(out, s)?,
                    None => write_json_str(out, &key.to_string())?,
                }
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        // Undefined, bytes, plain objects, invalid values: Python would raise too.
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: value of kind {} is not JSON serializable",
                    value.kind()
                ),
            ))
        }
    }
    Ok(())
}

/// A JSON string literal; escaping matches Python's `ensure_ascii=False`.
fn write_json_str(out: &mut String, s: &str) -> Result<(), Error> {
    let quoted = serde_json::to_string(s)
        .map_err(|err| Error::new(ErrorKind::InvalidOperation, format!("tojson: {err}")))?;
    out.push_str(&quoted);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage], gen: bool) -> String {
        ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))
            .unwrap()
            .render(messages, gen)
            .unwrap()
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let out = render(source, &[ChatMessage::new("user", "hi")], false);
        assert_eq!(out, "U:hi\n");
    }

    #[test]
    fn bos_eos_and_generation_prompt() {
        let source = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let msgs = [ChatMessage::new("user", "x")];
        assert_eq!(render(source, &msgs, true), "<s>x</s>A:");
        assert_eq!(render(source, &msgs, false), "<s>x</s>");
    }

    #[test]
    fn python_string_methods() {
        let source = "{{ messages[0].content.strip() }}|{{ messages[0].role.upper() }}|{{ messages[0].content.startswith(' a') }}";
        let out = render(source, &[ChatMessage::new("user", " a b ")], false);
        assert_eq!(out, "a b|USER|True"); // Python prints booleans capitalized
    }

    #[test]
    fn raise_exception_is_an_error() {
        let template = ChatTemplate::new(
            "{% if messages[0].role != 'system' %}{{ raise_exception('need system') }}{% endif %}",
            None,
            None,
        )
        .unwrap();
        let err = template
            .render(&[ChatMessage::new("user", "x")], false)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::TemplateRender(_)));
        assert!(err.to_string().contains("need system"), "{err}");
    }

    #[test]
    fn syntax_error_is_typed() {
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(err, TokenizerError::TemplateSyntax(_)));
    }

    #[test]
    fn a_template_that_fails_to_parse_renders_its_parse_error() {
        let t = ChatTemplate::compile("{% for %}", None, None);
        let parse = format!("{:#}", t.parse_error().unwrap());
        let err = t.render(&[ChatMessage::new("user", "hi")], true).unwrap_err();
        assert!(matches!(err, TokenizerError::TemplateSyntax(_)));
        let msg = err.to_string();
        assert!(msg.contains("failed to parse") && msg.contains(&parse), "{msg}");
        assert!(ChatTemplate::compile("{{ 1 }}", None, None).parse_error().is_none());
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let source = "{{ messages[0] | tojson }}|{{ [1, 2.5, none, true, 'é\"\n'] | tojson }}|{{ {} | tojson }}";
        let out = render(source, &[ChatMessage::new("user", "x<y")], false);
        assert_eq!(
            out,
            r#"{"role": "user", "content": "x<y"}|[1, 2.5, null, true, "é\"\n"]|{}"#
        );
        let indented = render(
            "{{ messages[0] | tojson(indent=2) }}",
            &[ChatMessage::new("a", "b")],
            false,
        );
        assert_eq!(indented, "{\n  \"role\": \"a\",\n  \"content\": \"b\"\n}");
    }

    #[test]
    fn loop_controls() {
        let source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}";
        let msgs = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        assert_eq!(render(source, &msgs, false), "a");
    }
}
