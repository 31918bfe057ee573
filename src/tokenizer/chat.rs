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
//! Owns the compiled template only; it does not tokenize the result (callers encode it with
//! `parse_special = true`). Not provided: `strftime_now`, `tools`, `documents`.

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// Name under which the single template is stored in its environment.
const TEMPLATE_NAME: &str = "chat_template";

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
