//! Chat templates: render a conversation to prompt text with the model's Jinja template.
//!
//! Mimics the environment of Hugging Face's `apply_chat_template` (transformers 5,
//! jinja2 3.1) so that output is byte-identical for the templates shipped in GGUF files
//! (`tokenizer.chat_template`); tests/chat_templates.rs checks it on llama.cpp's 70 real
//! templates against transformers' own renderings:
//!
//! - `trim_blocks=True`, `lstrip_blocks=True`, no autoescape, trailing newline dropped;
//! - `{% break %}` / `{% continue %}` (jinja2 `loopcontrols`); transformers'
//!   `{% generation %}` blocks render their body;
//! - variables `messages`, `tools` and `documents` (Python `None` when not given),
//!   `add_generation_prompt`, `bos_token`, `eos_token` (only when the tokenizer has them);
//! - globals `raise_exception(msg)`, `strftime_now(fmt)` (UTC; pinnable with
//!   [`ChatTemplate::with_fixed_now`]), `namespace`, `dict`;
//! - Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...) via
//!   `minijinja-contrib`'s pycompat; Python's printing (`True`, `None`, `{'a': 1}`),
//!   `len()`, `tojson` (`json.dumps` with transformers' defaults), markupsafe's escaping
//!   and jinja2's tests and generators: see the `python` submodule;
//! - markupsafe's `Markup` (what `|safe` and `|escape` make): `Markup + str` escapes the str
//!   (`'a'|safe + x`), also with autoescape off, and filters and string methods keep the
//!   mark as jinja2's do: the `markup` submodule rewrites `+` and `*` into calls that do it.
//!
//! Not reproduced: indexing or slicing a `Markup` gives a plain string here (a `Markup` in
//! Python), as does `Markup % args` (minijinja has no string `%`); `~` and `+` of
//! non-strings format with minijinja's display.
//! Messages reach the template with keys in [`ChatMessage`]'s field order (transformers
//! keeps the caller's dict order).
//!
//! Owns the compiled template only; it does not tokenize the result (see
//! [`super::Tokenizer::encode_chat`]).
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
//! otherwise (slices, escapes, branches on it) yields no ranges, as does content given as a
//! list of parts.

mod markup;
mod python;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

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
///
/// Serialized for the template as transformers passes a message dict: absent optional
/// fields (and absent content) are left out, as transformers drops keys whose value is
/// `None`, so a template sees them as undefined; a `reasoning_content` is also given as
/// `thinking` (first key), as transformers aliases it for templates that read that name.
///
/// Deserializes from an OpenAI-style message object; an unknown key is an error (it
/// would otherwise be dropped silently).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// Speaker: `"system"`, `"user"`, `"assistant"`, `"tool"`, ...
    pub role: String,
    /// Message content: text, text parts, or absent (`null`).
    #[serde(default)]
    pub content: ChatContent,
    /// Author name (OpenAI `name`; on `tool` messages, the tool that answered).
    #[serde(default)]
    pub name: Option<String>,
    /// The tool calls an assistant turn made.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a `tool` message: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// An assistant turn's reasoning text (the part before its answer).
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        if let Some(reasoning) = &self.reasoning_content {
            map.serialize_entry("thinking", reasoning)?;
        }
        map.serialize_entry("role", &self.role)?;
        if !self.content.is_absent() {
            map.serialize_entry("content", &self.content)?;
        }
        if let Some(name) = &self.name {
            map.serialize_entry("name", name)?;
        }
        if let Some(tool_calls) = &self.tool_calls {
            map.serialize_entry("tool_calls", tool_calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            map.serialize_entry("tool_call_id", id)?;
        }
        if let Some(reasoning) = &self.reasoning_content {
            map.serialize_entry("reasoning_content", reasoning)?;
        }
        map.end()
    }
}

impl ChatMessage {
    /// A message with the given role and text content (no name, tool calls, call id or
    /// reasoning).
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: ChatContent::text(content),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            reasoning_content: None,
        }
    }
}

/// A message's content as the template sees it: a string, a list of typed parts, or
/// absent. Dereferences to its text (the string, the parts' texts joined, or `""`), which
/// is what control-token checks read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatContent {
    /// The text: the string, or the parts' texts concatenated.
    text: String,
    /// How the template receives it.
    form: ContentForm,
}

/// The shape of a [`ChatContent`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum ContentForm {
    /// No content (`null` or missing): undefined in the template.
    #[default]
    Absent,
    /// A string.
    Text,
    /// A list of parts (`[{"type": "text", "text": ...}, ...]`).
    Parts(Vec<ContentPart>),
}

impl ChatContent {
    /// String content.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            form: ContentForm::Text,
        }
    }

    /// Content given as a list of parts; its text is theirs concatenated.
    pub fn parts(parts: Vec<ContentPart>) -> Self {
        let text = parts.iter().map(ContentPart::text).collect();
        Self {
            text,
            form: ContentForm::Parts(parts),
        }
    }

    /// No content (an assistant turn that only calls tools).
    pub fn absent() -> Self {
        Self::default()
    }

    /// Whether there is no content.
    pub fn is_absent(&self) -> bool {
        self.form == ContentForm::Absent
    }

    /// The parts, when the content is a list of parts.
    pub fn as_parts(&self) -> Option<&[ContentPart]> {
        match &self.form {
            ContentForm::Parts(parts) => Some(parts),
            _ => None,
        }
    }

    /// The content as text (see the type's docs).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::ops::Deref for ChatContent {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl From<String> for ChatContent {
    fn from(text: String) -> Self {
        Self::text(text)
    }
}

impl From<&str> for ChatContent {
    fn from(text: &str) -> Self {
        Self::text(text)
    }
}

impl Serialize for ChatContent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.form {
            ContentForm::Absent => serializer.serialize_none(),
            ContentForm::Text => serializer.serialize_str(&self.text),
            ContentForm::Parts(parts) => parts.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ChatContent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// The JSON forms content comes in.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Parts(Vec<ContentPart>),
        }
        Ok(match Option::<Wire>::deserialize(deserializer)? {
            None => Self::absent(),
            Some(Wire::Text(text)) => Self::text(text),
            Some(Wire::Parts(parts)) => Self::parts(parts),
        })
    }
}

/// One part of a list content. Only text parts exist here (no images or audio).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`.
    Text {
        /// The text.
        text: String,
    },
}

impl ContentPart {
    /// The part's text.
    pub fn text(&self) -> &str {
        match self {
            Self::Text { text } => text,
        }
    }
}

/// A tool call an assistant made (OpenAI's `tool_calls[]` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the `tool` answer's `tool_call_id` repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Always `"function"`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function called.
    pub function: FunctionCall,
}

/// `"function"`, the only tool-call type.
fn function_type() -> String {
    "function".to_owned()
}

/// The function of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// The arguments, passed to the template as given: transformers' convention is a JSON
    /// object (templates `tojson` it or iterate its items); OpenAI's wire format is a
    /// string holding JSON, which a template then prints as a string.
    pub arguments: serde_json::Value,
}

/// What `strftime_now` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// The system clock, in UTC.
    System,
    /// A fixed instant (seconds since the Unix epoch, UTC): deterministic renderings.
    Fixed(i64),
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
    clock: Clock,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("parse_error", &self.parse_error().map(|e| format!("{e:#}")))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("clock", &self.clock)
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
        Self::compile_with_clock(source, bos_token, eos_token, Clock::System)
    }

    /// This template with `strftime_now` reading the fixed instant `unix_seconds` (UTC)
    /// instead of the system clock, so that renderings are deterministic (tests).
    pub fn with_fixed_now(self, unix_seconds: i64) -> Self {
        Self::compile_with_clock(
            &self.source,
            self.bos_token,
            self.eos_token,
            Clock::Fixed(unix_seconds),
        )
    }

    /// Builds the environment transformers renders templates in (see the module docs).
    fn compile_with_clock(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        clock: Clock,
    ) -> Self {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_name| AutoEscape::None);
        python::install(&mut env, clock);
        let rewritten = markup::rewrite_operators(&without_generation_tags(source));
        let env = match env.add_template_owned(TEMPLATE_NAME, rewritten) {
            Ok(()) => Ok(Arc::new(env)),
            Err(e) => Err(Arc::new(e)),
        };
        Self {
            env,
            source: Arc::from(source),
            bos_token,
            eos_token,
            clock,
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

    /// Renders `messages` without tools; with `add_generation_prompt` the template appends
    /// the header that opens the assistant's turn (e.g. `<|im_start|>assistant\n`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_with(messages, None, None, add_generation_prompt)
    }

    /// Renders `messages` as transformers' `apply_chat_template(messages, tools=tools,
    /// add_generation_prompt=..., **template_vars)` does:
    ///
    /// - `tools`: function specs (OpenAI's `[{"type": "function", "function": {"name",
    ///   "description", "parameters"}}]`), passed as given, key order kept; `None` is the
    ///   template's `tools = none`;
    /// - `template_vars`: extra variables (vLLM's `chat_template_kwargs`: `enable_thinking`,
    ///   `reasoning_effort`, ...); they may override `bos_token` / `eos_token`, but one
    ///   named `messages`, `tools`, `documents` or `add_generation_prompt` is an error.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        template_vars: Option<&serde_json::Map<String, serde_json::Value>>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let env = self
            .env
            .as_ref()
            .map_err(|e| TokenizerError::TemplateSyntax(e.clone()))?;
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(TokenizerError::TemplateRender)?;
        // As transformers: the special tokens, then the caller's variables over them, then
        // the named arguments, which a variable may not repeat.
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        for (name, value) in template_vars.into_iter().flatten() {
            if RESERVED_VARS.contains(&name.as_str()) {
                return Err(TokenizerError::TemplateRender(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "template variable `{name}` is set by the renderer; it cannot be passed"
                    ),
                )));
            }
            ctx.insert(name.as_str(), Value::from_serialize(value));
        }
        let tools = tools.map(Value::from_serialize);
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("tools", tools.unwrap_or_else(python::none));
        ctx.insert("documents", python::none());
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        template.render(ctx).map_err(TokenizerError::TemplateRender)
    }
}

/// The variables [`ChatTemplate::render_with`] sets itself.
const RESERVED_VARS: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// `source` with transformers' `{% generation %}` / `{% endgeneration %}` tags (which mark
/// the assistant's text and render their body unchanged) turned into `{% if true %}` /
/// `{% endif %}`, keeping their whitespace control.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        let (before, tag) = rest.split_at(at);
        out.push_str(before);
        let body = tag.strip_prefix("{%").unwrap_or(tag);
        let after_ws_control = body.strip_prefix(['-', '+']).unwrap_or(body);
        let control_len = body.len() - after_ws_control.len();
        let trimmed = after_ws_control.trim_start();
        let replaced = [("endgeneration", "endif"), ("generation", "if true")]
            .iter()
            .find_map(|(keyword, replacement)| {
                let after = trimmed.strip_prefix(keyword)?;
                let ends_word = after
                    .starts_with(|c: char| c.is_whitespace() || c == '-' || c == '+' || c == '%');
                ends_word.then_some((keyword.len(), *replacement))
            });
        match replaced {
            Some((keyword_len, replacement)) => {
                out.push_str("{%");
                out.push_str(body.get(..control_len).unwrap_or_default());
                out.push(' ');
                out.push_str(replacement);
                rest = &trimmed[keyword_len..];
            }
            None => {
                out.push_str("{%");
                rest = body;
            }
        }
    }
    out.push_str(rest);
    out
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
    /// Renders `messages` like [`render_with`](Self::render_with) and locates the message contents in
    /// the result (see the module docs).
    pub(crate) fn render_locating_content(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        template_vars: Option<&serde_json::Map<String, serde_json::Value>>,
        add_generation_prompt: bool,
    ) -> Result<RenderedChat, TokenizerError> {
        let text = self.render_with(messages, tools, template_vars, add_generation_prompt)?;
        let content_ranges =
            self.locate_content(messages, tools, template_vars, add_generation_prompt, &text);
        Ok(RenderedChat {
            text,
            content_ranges,
        })
    }

    /// The content ranges of `text` (the rendering of `messages`), or `None`.
    fn locate_content(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        template_vars: Option<&serde_json::Map<String, serde_json::Value>>,
        add_generation_prompt: bool,
        text: &str,
    ) -> Option<Vec<Range<usize>>> {
        // A sentinel character already in the text (from a content, a role or the
        // template) would make the skeleton ambiguous.
        if text.contains([SENTINEL_OPEN, SENTINEL_CLOSE]) {
            return None;
        }
        // Only string contents are located; a list of parts could be cut apart.
        if messages.iter().any(|m| m.content.as_parts().is_some()) {
            return None;
        }
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(index, m)| {
                let mut masked = m.clone();
                if !m.content.is_absent() {
                    masked.content =
                        ChatContent::text(format!("{SENTINEL_OPEN}{index}{SENTINEL_CLOSE}"));
                }
                masked
            })
            .collect();
        // A template may reject the sentinels (e.g. it validates content); then no ranges.
        let skeleton = self
            .render_with(&masked, tools, template_vars, add_generation_prompt)
            .ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// markupsafe's `Markup` as transformers' jinja2 environment (autoescape off) renders
    /// it; the expected texts are jinja2 3.1.6 / markupsafe 3.0's output for `x = '<x y="1">'`.
    #[test]
    fn markup_operators_filters_and_methods_as_jinja2() {
        let cases = [
            ("{{ 'a'|safe + '<b>' }}", "a&lt;b&gt;"),
            ("{{ '<b>' + 'a'|safe }}", "&lt;b&gt;a"),
            ("{{ 'a'|safe + x + '\"' }}", "a&lt;x y=&#34;1&#34;&gt;&#34;"),
            ("{{ ('a'|safe + x)|length }}", "24"),
            ("{{ 'a' + x }}", "a<x y=\"1\">"),
            ("{{ ('<'|safe + '<') ~ '<' }}", "<&lt;<"),
            ("{{ ('<'|safe ~ '<') + '<' }}", "<<<"),
            ("{{ '<'|e + '<' }}", "&lt;&lt;"),
            ("{{ '<'|safe|upper + '&' }}", "<&amp;"),
            ("{{ '<'|safe|trim + '&' }}", "<&amp;"),
            ("{{ '<'|safe|string + '&' }}", "<&amp;"),
            ("{{ '<'|safe|replace('x','y') + '&' }}", "<&"),
            ("{{ '<'|safe|title + '&' }}", "<&"),
            ("{{ '<'|safe|capitalize + '&' }}", "<&amp;"),
            ("{{ '<'|safe|lower + '&' }}", "<&amp;"),
            ("{{ '<'|safe|indent(2) + '&' }}", "<&amp;"),
            ("{{ '<'|safe|reverse + '&' }}", "<&amp;"),
            ("{{ '<'|safe|first + '&' }}", "<&"),
            ("{{ '<'|safe|last + '&' }}", "<&amp;"),
            ("{{ ['<'|safe, 'a']|join(',') + '&' }}", "<,a&"),
            ("{{ ('<'|safe).strip() + '&' }}", "<&amp;"),
            ("{{ ('<'|safe).upper() + '&' }}", "<&amp;"),
            ("{{ ('<x'|safe).replace('x', '&') + '&' }}", "<&amp;&amp;"),
            ("{{ ('<x'|safe).split('x')[0] + '&' }}", "<&amp;"),
            ("{{ (','|safe).join(['<', '>']) + '&' }}", "&lt;,&gt;&amp;"),
            ("{{ ('<{}'|safe).format('&') }}", "<&amp;"),
            ("{{ ('<'|safe) * 2 + '&' }}", "<<&amp;"),
            ("{{ 2 * ('<'|safe) + '&' }}", "<<&amp;"),
            ("{{ '%s<'|safe|format('&') }}", "&amp;<"),
            ("{% macro m() %}<{% endmacro %}{{ m() + '&' }}", "<&"),
            ("{% macro m() %}{{ '<'|safe }}{% endmacro %}{{ m() + '&' }}", "<&"),
            ("{% set s %}{{ '<'|safe }}{% endset %}{{ s + '&' }}", "<&"),
            ("{% set ns = namespace(a='<'|safe) %}{{ ns.a + '&' }}", "<&amp;"),
            ("{{ true|safe + '&' }}", "True&amp;"),
            ("{{ none|safe + '&' }}", "None&amp;"),
            ("{{ 1 + 2 }}{{ [1] + [2] }}{{ 'a' + 'b' }}", "3[1, 2]ab"),
            ("{{ '<'|forceescape + '&' }}", "&lt;&amp;"),
            ("{{ ('<'|safe + '&')|tojson }}", "\"<&amp;\""),
            ("{{ x|safe + '&' }}", "<x y=\"1\">&amp;"),
            ("{{ '<'|safe|default('q') + '&' }}", "<&amp;"),
            ("{{ ('<'|safe if true else 'a') + '&' }}", "<&amp;"),
            ("{{ ('<'|safe).lstrip() + '&' }}{{ ('<'|safe).title() + '&' }}{{ ('<'|safe).capitalize() + '&' }}{{ ('<'|safe).lower() + '&' }}{{ ('<'|safe).rstrip() + '&' }}", "<&amp;<&amp;<&amp;<&amp;<&amp;"),
            ("{{ ('<'|safe).splitlines()[0] + '&' }}", "<&amp;"),
            ("{{ ('a'|safe) + ('b'|e) + '<' }}", "ab&lt;"),
            ("{{ '<' + '>' + 'a'|safe + '&' }}", "&lt;&gt;a&amp;"),
        ];
        let mut vars = serde_json::Map::new();
        vars.insert("x".into(), serde_json::json!("<x y=\"1\">"));
        let mut failures = Vec::new();
        for (source, want) in cases {
            let got = ChatTemplate::new(source, None, None)
                .and_then(|t| t.render_with(&[], None, Some(&vars), false))
                .map_err(|e| format!("{e:#}"));
            if got.as_deref() != Ok(want) {
                failures.push(format!("{source}\n  want {want:?}\n  got  {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // `Markup + int` is a TypeError in Python, as `str + int` is.
        let template = ChatTemplate::new("{{ 'a'|safe + 1 }}", None, None).unwrap();
        assert!(template.render_with(&[], None, None, false).is_err());
    }

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
        let err = t
            .render(&[ChatMessage::new("user", "hi")], true)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::TemplateSyntax(_)));
        let msg = err.to_string();
        assert!(
            msg.contains("failed to parse") && msg.contains(&parse),
            "{msg}"
        );
        assert!(ChatTemplate::compile("{{ 1 }}", None, None)
            .parse_error()
            .is_none());
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
    #[test]
    fn strftime_now_reads_the_pinned_clock() {
        let template = ChatTemplate::new(
            "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%B %d, %Y') }}|{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('%-d %A %a %H:%M:%S %j %y %I%p %%') }}",
            None,
            None,
        )
        .unwrap()
        .with_fixed_now(1_707_141_789); // 2024-02-05T14:03:09Z, a Monday
        let out = template.render(&[], false).unwrap();
        assert_eq!(
            out,
            "05 Feb 2024|February 05, 2024|2024-02-05|5 Monday Mon 14:03:09 036 24 02PM %"
        );
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", None, None).unwrap();
        let err = bad.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("%Q"), "{err}");
    }

    #[test]
    fn values_print_as_python_str() {
        let source = "{{ [1, 'a', none, true, {'k': \"it's\"}, 1.5] }}|{{ none }}|{{ false }}|{{ {'a': 'b\\n'} | string }}|{{ ['x'] | trim }}";
        assert_eq!(
            render(source, &[], false),
            "[1, 'a', None, True, {'k': \"it's\"}, 1.5]|None|False|{'a': 'b\\n'}|['x']"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source = "{% for m in messages %}{%- generation -%} {{ m.content }} {% endgeneration %}{% endfor %}|{% generation %}x{% endgeneration %}";
        assert_eq!(
            render(source, &[ChatMessage::new("assistant", "a")], false),
            "a |x"
        );
    }

    #[test]
    fn absent_tools_are_python_none() {
        let msgs = [ChatMessage::new("user", "x")];
        let source = "{{ tools is none }}|{{ tools is not none }}|{{ tools | tojson }}|{{ 'y' if tools else 'n' }}|{{ tools is iterable }}";
        assert_eq!(render(source, &msgs, false), "True|False|null|n|False");
        // jinja2 raises iterating None ("'NoneType' object is not iterable").
        let template = ChatTemplate::new("{% for t in tools %}{% endfor %}", None, None).unwrap();
        assert!(template.render(&msgs, false).is_err());
        let tools = [serde_json::json!({"type": "function", "function": {"name": "f"}})];
        let out = ChatTemplate::new(
            "{% for t in tools %}{{ t | tojson }}{% endfor %}",
            None,
            None,
        )
        .unwrap()
        .render_with(&msgs, Some(&tools), None, false)
        .unwrap();
        assert_eq!(out, r#"{"type": "function", "function": {"name": "f"}}"#);
    }

    #[test]
    fn filters_give_generators_like_jinja2() {
        let msgs = [ChatMessage::new("user", "x")];
        assert_eq!(
            render("{{ [1, 2] | map('string') | list | tojson }}", &msgs, false),
            r#"["1", "2"]"#
        );
        assert_eq!(
            render("{{ none | select | list | length }}", &msgs, false),
            "0"
        );
        for source in [
            "{{ [1, 2] | map('string') | tojson }}",
            "{{ [1, 2] | select | length }}",
        ] {
            let template = ChatTemplate::new(source, None, None).unwrap();
            assert!(template.render(&msgs, false).is_err(), "{source}");
        }
        assert_eq!(
            render(
                "{{ undefined_name | length }}|{{ (messages + messages) | length }}",
                &msgs,
                false
            ),
            "0|2"
        );
    }

    #[test]
    fn tojson_options_like_json_dumps() {
        let msgs = [ChatMessage::new("user", "x")];
        let source = "{{ 'é🦀' | tojson(ensure_ascii=True) }}|{{ {'b': 1, 'a': [0.0001, 2.5]} | tojson(sort_keys=True, separators=(',', ':')) }}";
        assert_eq!(
            render(source, &msgs, false),
            r#""\u00e9\ud83e\udd80"|{"a":[0.0001,2.5],"b":1}"#
        );
    }

    #[test]
    fn escape_like_markupsafe() {
        let msgs = [ChatMessage::new("user", "x")];
        // tojson gives a plain str, which `e` escapes; `safe` text is left alone.
        let source = "{{ '<\"\\'/&' | e }}|{{ 'a\"' | tojson | e }}|{{ '<' | safe | e }}";
        assert_eq!(
            render(source, &msgs, false),
            r#"&lt;&#34;&#39;/&amp;|&#34;a\&#34;&#34;|<"#
        );
    }

    #[test]
    fn messages_carry_parts_and_tool_calls() {
        let messages: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
            ]},
            {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "ok"}
        ]))
        .unwrap();
        assert_eq!(&*messages[0].content, "ab");
        assert!(messages[1].content.is_absent());
        let source = "{% for m in messages %}{{ m.role }}:{{ m.content is defined }}:{% if m.content is not string %}{{ m.content | map(attribute='text') | join('+') }}{% else %}{{ m.content }}{% endif %}{% for c in m.tool_calls %}{{ c.id }}={{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}{{ m.tool_call_id }};{% endfor %}";
        assert_eq!(
            render(source, &messages, false),
            r#"user:True:a+b;assistant:False:c1=f{"x": 1};tool:True:okc1;"#
        );
        let unknown = serde_json::from_value::<ChatMessage>(serde_json::json!(
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ));
        assert!(unknown.is_err());
    }
    #[test]
    fn reasoning_and_template_vars() {
        let mut answer = ChatMessage::new("assistant", "51.");
        answer.reasoning_content = Some("17 * 3".into());
        let template = ChatTemplate::new(
            "{% for m in messages %}{{ m | tojson }}{% endfor %}|{{ enable_thinking }}|{{ bos_token }}",
            Some("<s>".into()),
            None,
        )
        .unwrap();
        let vars = serde_json::json!({"enable_thinking": false, "bos_token": "[B]"});
        let out = template
            .render_with(&[answer], None, vars.as_object(), false)
            .unwrap();
        assert_eq!(
            out,
            r#"{"thinking": "17 * 3", "role": "assistant", "content": "51.", "reasoning_content": "17 * 3"}|False|[B]"#
        );
        let reserved = serde_json::json!({"messages": []});
        let err = template
            .render_with(&[], None, reserved.as_object(), false)
            .unwrap_err();
        assert!(err.to_string().contains("`messages`"), "{err}");
    }
}
