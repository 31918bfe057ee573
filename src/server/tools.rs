//! Tool calling on `/v1/chat/completions`: the request side (`tools`,
//! `tool_choice`, `parallel_tool_calls`, the history's `tool_calls` and `tool`
//! messages), the constraint that enforces a call, and the output side (the
//! generated text parsed into OpenAI `tool_calls`, whole or as stream deltas).
//!
//! ```text
//!  tools, tool_choice ──► ToolRequest::parse (400 naming tools[i]…, tool_choice…)
//!  chat template text ──► Family::detect ──► ToolPlan
//!      ├─ template_tools(): rendered into the prompt (every tool_choice, `none` included)
//!      ├─ constraint(): Lark grammar over the family's call format, each tool's
//!      │    parameters as `%json`; `required` / named: from the first token,
//!      │    `auto`: switched on by the family's opening (Constraint::trigger)
//!      └─ parser(): ToolParser (not for `none`) ── generated text ──► content + calls
//! ```
//!
//! Families (from the template's text, as llama.cpp and vLLM pick a parser):
//!
//! | family        | detected by                          | a call                                             |
//! |---------------|--------------------------------------|----------------------------------------------------|
//! | `Hermes`      | `<tool_call>` (Hermes 2/3, Qwen 2.5+)| `<tool_call>\n{"name": N, "arguments": A}\n</tool_call>` |
//! | `Llama3Json`  | `<|python_tag|>`, or `"parameters"` in a Llama 3 header template | `{"name": N, "parameters": A}` (`; `-separated), optional `<|python_tag|>` |
//! | `MistralJson` | `[TOOL_CALLS]` without `[ARGS]`      | `[TOOL_CALLS][{"name": N, "arguments": A}, …]`     |
//! | `MistralArgs` | `[TOOL_CALLS]` and `[ARGS]`          | `[TOOL_CALLS]N[ARGS]A` per call                    |
//!
//! Parsing is one streaming state machine ([`ToolParser`]); the non-streamed
//! answer is the same machine fed the whole text, so streamed deltas always
//! reassemble to the non-streamed message. Content is the text outside calls
//! with leading and trailing whitespace dropped (`null` when nothing is left).
//! A call whose JSON does not parse stays in the content as text. Arguments are
//! the generated JSON object re-serialized compactly; a call is streamed once
//! it is complete: a first delta with `index`, `id`, `type`, `function.name`
//! (and empty `arguments`), then its `arguments`.
//!
//! Owns: tool validation, family detection, the grammar text, call parsing.
//! Does not own: enforcing the grammar (crate::guidance and the sampler), the
//! response shapes (super::responses), template rendering (crate::tokenizer).

use serde_json::{Map, Value};

use super::error::ApiError;
use super::responses::{FunctionDelta, FunctionOut, ToolCallDelta, ToolCallOut};
use crate::guidance::{Constraint, Grammar};
use crate::sampling::SamplingParams;
use crate::tokenizer::{FunctionCall, Tokenizer, ToolCall};

/// One function tool of a request, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionTool {
    /// Function name (`[A-Za-z0-9_-]{1,64}`, unique in the request).
    pub name: String,
    /// JSON Schema of the arguments object (default: any object).
    pub parameters: Value,
    /// The tool as the template receives it: `{"type": "function", "function": {...}}`.
    pub spec: Value,
}

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call a tool (tools are still rendered into the prompt).
    None,
    /// The model decides; a call, once opened, is constrained.
    Auto,
    /// At least one call (constrained from the first token).
    Required,
    /// Exactly one call of this function.
    Named(String),
}

/// A request's tools, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    /// The tools, in request order.
    pub tools: Vec<FunctionTool>,
    /// `tool_choice` (default `auto`).
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): false allows at most one call.
    pub parallel: bool,
}

/// JSON Schema `type` names.
const SCHEMA_TYPES: [&str; 7] = [
    "string", "number", "integer", "boolean", "object", "array", "null",
];

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

impl ToolRequest {
    /// Checks `tools`, `tool_choice` and `parallel_tool_calls` (each as given in
    /// the body; `None` = absent or `null`). No tools (absent, `null` or `[]`)
    /// gives `None`; then `tool_choice` may only be `none` or `auto`.
    pub fn parse(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        let tools = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, t)| parse_tool(i, t))
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(bad("tools", "`tools` must be an array of function tools")),
        };
        for (i, t) in tools.iter().enumerate() {
            if tools[..i].iter().any(|u| u.name == t.name) {
                return Err(bad(
                    &format!("tools[{i}].function.name"),
                    format!("two tools are named `{}`", t.name),
                ));
            }
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => return Err(bad("tool_choice", format!("`tool_choice` must be `none`, `auto`, `required` or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got `{other}`"))),
            }),
            Some(Value::Object(o)) => Some(parse_named_choice(o)?),
            Some(_) => return Err(bad("tool_choice", "`tool_choice` must be a string or an object")),
        };
        if tools.is_empty() {
            return match choice {
                None | Some(ToolChoice::None | ToolChoice::Auto) => Ok(None),
                Some(_) => Err(bad(
                    "tool_choice",
                    "`tool_choice` `required` or a named function needs `tools`",
                )),
            };
        }
        if let Some(ToolChoice::Named(name)) = &choice {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(bad(
                    "tool_choice.function.name",
                    format!("`tool_choice` names `{name}`, which is not one of `tools`"),
                ));
            }
        }
        Ok(Some(Self {
            tools,
            choice: choice.unwrap_or(ToolChoice::Auto),
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// The tools as the chat template receives them (OpenAI's spec objects).
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools.iter().map(|t| t.spec.clone()).collect()
    }
}

fn parse_named_choice(o: &Map<String, Value>) -> Result<ToolChoice, ApiError> {
    for k in o.keys() {
        if k != "type" && k != "function" {
            return Err(bad(
                &format!("tool_choice.{k}"),
                format!("Unrecognized request argument supplied: tool_choice.{k}"),
            ));
        }
    }
    if o.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(
            "tool_choice.type",
            "`tool_choice.type` must be `function`",
        ));
    }
    let f = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            bad(
                "tool_choice.function",
                "`tool_choice.function` must be an object with a `name`",
            )
        })?;
    for k in f.keys() {
        if k != "name" {
            return Err(bad(
                &format!("tool_choice.function.{k}"),
                format!("Unrecognized request argument supplied: tool_choice.function.{k}"),
            ));
        }
    }
    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
        bad(
            "tool_choice.function.name",
            "`tool_choice.function.name` must be a string",
        )
    })?;
    Ok(ToolChoice::Named(name.to_string()))
}

/// Whether `name` is a valid function name (OpenAI: `[A-Za-z0-9_-]{1,64}`).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks `tools[i]`.
fn parse_tool(i: usize, t: &Value) -> Result<FunctionTool, ApiError> {
    let at = |k: &str| format!("tools[{i}].{k}");
    let o = t.as_object().ok_or_else(|| {
        bad(
            &format!("tools[{i}]"),
            "each tool must be an object `{\"type\": \"function\", \"function\": {...}}`",
        )
    })?;
    match o.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(bad(
                &at("type"),
                format!("tool type `{other}` is not supported (only `function`)"),
            ))
        }
        None => return Err(bad(&at("type"), "`type` must be `function`")),
    }
    for k in o.keys() {
        if k != "type" && k != "function" {
            return Err(bad(
                &at(k),
                format!("Unrecognized request argument supplied: tools[{i}].{k}"),
            ));
        }
    }
    let f = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            bad(
                &at("function"),
                "`function` must be an object with a `name`",
            )
        })?;
    for (k, v) in f {
        let ok = match k.as_str() {
            "name" => v.is_string(),
            "description" => v.is_string() || v.is_null(),
            "parameters" => v.is_object() || v.is_null(),
            "strict" => v.is_boolean() || v.is_null(),
            _ => {
                return Err(bad(
                    &at(&format!("function.{k}")),
                    format!("Unrecognized request argument supplied: tools[{i}].function.{k}"),
                ))
            }
        };
        if !ok {
            let want = match k.as_str() {
                "name" | "description" => "a string",
                "parameters" => "a JSON Schema object",
                _ => "a boolean",
            };
            return Err(bad(
                &at(&format!("function.{k}")),
                format!("`tools[{i}].function.{k}` must be {want}"),
            ));
        }
    }
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(&at("function.name"), "`function.name` is required"))?;
    if !valid_name(name) {
        return Err(bad(
            &at("function.name"),
            format!(
                "function name `{name}` must be 1 to 64 characters of a-z, A-Z, 0-9, `_` and `-`"
            ),
        ));
    }
    let parameters = match f.get("parameters") {
        Some(p @ Value::Object(_)) => {
            let path = at("function.parameters");
            check_schema(p, p, &path)?;
            if let Some(ty) = p.get("type") {
                if ty != "object" {
                    return Err(bad(
                        &format!("{path}.type"),
                        "function parameters must be an object schema (`\"type\": \"object\"`)",
                    ));
                }
            }
            p.clone()
        }
        _ => serde_json::json!({"type": "object", "properties": {}}),
    };
    let mut function = f.clone();
    function.insert("parameters".into(), parameters.clone());
    let spec = serde_json::json!({"type": "function", "function": Value::Object(function)});
    Ok(FunctionTool {
        name: name.to_string(),
        parameters,
        spec,
    })
}

/// Checks that `s` (found at `path` inside the document `root`) is a
/// well-formed JSON Schema: keyword values of the right JSON type, known
/// `type` names, sub-schemas where sub-schemas go, local `$ref`s that resolve,
/// and consistent bounds. (What llguidance cannot compile is refused when the
/// constraint is compiled.)
pub fn check_schema(root: &Value, s: &Value, path: &str) -> Result<(), ApiError> {
    let o = match s {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => {
            return Err(bad(
                path,
                format!("`{path}` must be a JSON Schema (an object or a boolean)"),
            ))
        }
    };
    let sub = |k: &str, v: &Value| check_schema(root, v, &format!("{path}.{k}"));
    let schema_map = |k: &str, v: &Value| -> Result<(), ApiError> {
        let m = v.as_object().ok_or_else(|| {
            bad(
                &format!("{path}.{k}"),
                format!("`{k}` must be an object of schemas"),
            )
        })?;
        m.iter()
            .try_for_each(|(name, s)| check_schema(root, s, &format!("{path}.{k}.{name}")))
    };
    let schema_list = |k: &str, v: &Value, non_empty: bool| -> Result<(), ApiError> {
        let a = v
            .as_array()
            .filter(|a| !non_empty || !a.is_empty())
            .ok_or_else(|| {
                bad(
                    &format!("{path}.{k}"),
                    format!("`{k}` must be a non-empty array of schemas"),
                )
            })?;
        a.iter()
            .enumerate()
            .try_for_each(|(j, s)| check_schema(root, s, &format!("{path}.{k}[{j}]")))
    };
    let number = |k: &str, v: &Value| -> Result<f64, ApiError> {
        v.as_f64()
            .ok_or_else(|| bad(&format!("{path}.{k}"), format!("`{k}` must be a number")))
    };
    let count = |k: &str, v: &Value| -> Result<u64, ApiError> {
        v.as_u64().ok_or_else(|| {
            bad(
                &format!("{path}.{k}"),
                format!("`{k}` must be a non-negative integer"),
            )
        })
    };
    for (k, v) in o {
        match k.as_str() {
            "type" => {
                let names: Vec<&Value> = match v {
                    Value::Array(a) if !a.is_empty() => a.iter().collect(),
                    Value::String(_) => vec![v],
                    _ => {
                        return Err(bad(
                            &format!("{path}.type"),
                            "`type` must be a type name or a non-empty array of them",
                        ))
                    }
                };
                for n in names {
                    if !n.as_str().is_some_and(|n| SCHEMA_TYPES.contains(&n)) {
                        return Err(bad(
                            &format!("{path}.type"),
                            format!(
                                "unknown JSON Schema type {n} (one of {})",
                                SCHEMA_TYPES.join(", ")
                            ),
                        ));
                    }
                }
            }
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                schema_map(k, v)?
            }
            "items" => match v {
                Value::Array(_) => schema_list(k, v, false)?,
                _ => sub(k, v)?,
            },
            "prefixItems" => schema_list(k, v, false)?,
            "anyOf" | "oneOf" | "allOf" => schema_list(k, v, true)?,
            "additionalProperties"
            | "additionalItems"
            | "unevaluatedProperties"
            | "unevaluatedItems"
            | "not"
            | "contains"
            | "propertyNames"
            | "if"
            | "then"
            | "else" => sub(k, v)?,
            "required" => {
                if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    return Err(bad(
                        &format!("{path}.required"),
                        "`required` must be an array of property names",
                    ));
                }
            }
            "enum" => {
                if !v.as_array().is_some_and(|a| !a.is_empty()) {
                    return Err(bad(
                        &format!("{path}.enum"),
                        "`enum` must be a non-empty array",
                    ));
                }
            }
            "minimum" | "maximum" => {
                number(k, v)?;
            }
            "exclusiveMinimum" | "exclusiveMaximum" => {
                if !v.is_boolean() {
                    number(k, v)?;
                }
            }
            "multipleOf" => {
                if number(k, v)? <= 0.0 {
                    return Err(bad(
                        &format!("{path}.multipleOf"),
                        "`multipleOf` must be greater than 0",
                    ));
                }
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" | "minProperties"
            | "maxProperties" | "minContains" | "maxContains" => {
                count(k, v)?;
            }
            "pattern" | "format" | "title" | "description" | "$schema" | "$id" | "$comment"
            | "$anchor" => {
                if !v.is_string() {
                    return Err(bad(
                        &format!("{path}.{k}"),
                        format!("`{k}` must be a string"),
                    ));
                }
            }
            "$ref" => {
                let r = v
                    .as_str()
                    .ok_or_else(|| bad(&format!("{path}.$ref"), "`$ref` must be a string"))?;
                if let Some(pointer) = r.strip_prefix('#') {
                    if root.pointer(pointer).is_none() {
                        return Err(bad(
                            &format!("{path}.$ref"),
                            format!("`$ref` `{r}` does not resolve inside the parameters schema"),
                        ));
                    }
                } else {
                    return Err(bad(
                        &format!("{path}.$ref"),
                        format!("only local `$ref`s (`#/...`) are supported, got `{r}`"),
                    ));
                }
            }
            _ => {} // annotations (`default`, `examples`, `const`, ...) and vocabulary extensions
        }
    }
    for (lo, hi) in [
        ("minimum", "maximum"),
        ("minLength", "maxLength"),
        ("minItems", "maxItems"),
        ("minProperties", "maxProperties"),
    ] {
        if let (Some(a), Some(b)) = (
            o.get(lo).and_then(Value::as_f64),
            o.get(hi).and_then(Value::as_f64),
        ) {
            if a > b {
                return Err(bad(
                    &format!("{path}.{lo}"),
                    format!("`{lo}` ({a}) is greater than `{hi}` ({b})"),
                ));
            }
        }
    }
    Ok(())
}

/// The tool calls of an assistant message of the history (`messages[i].tool_calls`),
/// for the template: `arguments` given as a JSON string (OpenAI's wire form) are
/// parsed into the JSON value templates `tojson` or iterate (as vLLM does).
pub fn history_tool_calls(i: usize, v: &Value) -> Result<Option<Vec<ToolCall>>, ApiError> {
    let a = match v {
        Value::Null => return Ok(None),
        Value::Array(a) if a.is_empty() => return Ok(None),
        Value::Array(a) => a,
        _ => {
            return Err(bad(
                &format!("messages[{i}].tool_calls"),
                "`tool_calls` must be an array",
            ))
        }
    };
    a.iter()
        .enumerate()
        .map(|(j, c)| {
            let at = |k: &str| format!("messages[{i}].tool_calls[{j}]{k}");
            let o = c
                .as_object()
                .ok_or_else(|| bad(&at(""), "each tool call must be an object"))?;
            for k in o.keys() {
                if !matches!(k.as_str(), "id" | "type" | "function") {
                    return Err(bad(
                        &at(&format!(".{k}")),
                        format!(
                            "Unrecognized request argument supplied: {}",
                            at(&format!(".{k}"))
                        ),
                    ));
                }
            }
            if o.get("type").is_some_and(|t| t != "function") {
                return Err(bad(&at(".type"), "tool call `type` must be `function`"));
            }
            let id = match o.get("id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(bad(&at(".id"), "tool call `id` must be a string")),
            };
            let f = o
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| bad(&at(".function"), "tool call `function` must be an object"))?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                bad(
                    &at(".function.name"),
                    "tool call `function.name` must be a string",
                )
            })?;
            let arguments = match f.get("arguments") {
                Some(Value::String(s)) => serde_json::from_str::<Value>(s).map_err(|e| {
                    bad(
                        &at(".function.arguments"),
                        format!("`arguments` is not valid JSON: {e}"),
                    )
                })?,
                Some(v @ Value::Object(_)) => v.clone(),
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(_) => {
                    return Err(bad(
                        &at(".function.arguments"),
                        "`arguments` must be a string holding a JSON object",
                    ))
                }
            };
            Ok(ToolCall {
                id,
                kind: "function".into(),
                function: FunctionCall {
                    name: name.to_string(),
                    arguments,
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A template's tool-call format (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `<tool_call>\n{"name": N, "arguments": A}\n</tool_call>`.
    Hermes,
    /// `{"name": N, "parameters": A}`, optionally after `<|python_tag|>`.
    Llama3Json,
    /// `[TOOL_CALLS][{"name": N, "arguments": A}, ...]`.
    MistralJson,
    /// `[TOOL_CALLS]N[ARGS]A`, once per call.
    MistralArgs,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const LLAMA_OPEN: &str = "{\"name\"";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const MISTRAL_CALL_ID: &str = "[CALL_ID]";

impl Family {
    /// The family of a chat template's source, if it is one of those parsed here.
    pub fn detect(template: &str) -> Option<Family> {
        if template.contains(HERMES_OPEN) {
            // Same tag, other bodies: Qwen3-Coder's `<function=…>`, GLM's `<arg_key>`.
            let xml_body = template.contains("<function=") || template.contains("<arg_key>");
            return (!xml_body).then_some(Family::Hermes);
        }
        if template.contains(MISTRAL_OPEN) {
            return Some(if template.contains(MISTRAL_ARGS) {
                Family::MistralArgs
            } else {
                Family::MistralJson
            });
        }
        if template.contains(PYTHON_TAG)
            || (template.contains("<|start_header_id|>") && template.contains("\"parameters\""))
        {
            return Some(Family::Llama3Json);
        }
        None
    }

    /// The text a call opens with: `auto`'s trigger, and the start of the grammar.
    pub fn opening(self) -> &'static str {
        match self {
            Family::Hermes => HERMES_OPEN,
            Family::Llama3Json => LLAMA_OPEN,
            Family::MistralJson | Family::MistralArgs => MISTRAL_OPEN,
        }
    }

    /// Marker strings of the format (special tokens in some vocabularies).
    fn markers(self) -> &'static [&'static str] {
        match self {
            Family::Hermes => &[HERMES_OPEN, HERMES_CLOSE],
            Family::Llama3Json => &[PYTHON_TAG],
            Family::MistralJson => &[MISTRAL_OPEN],
            Family::MistralArgs => &[MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID],
        }
    }

    /// A new call id: `call_<24 hex>`; Mistral templates require 9 alphanumerics.
    fn new_call_id(self) -> String {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        match self {
            Family::MistralJson | Family::MistralArgs => hex.chars().take(9).collect(),
            _ => format!("call_{}", hex.chars().take(24).collect::<String>()),
        }
    }
}

/// How one request uses tools: what the prompt gets, the constraint, the parser.
#[derive(Clone, Debug)]
pub struct ToolPlan {
    /// The checked request.
    pub request: ToolRequest,
    /// The template's format (`None` only with `tool_choice: none`).
    pub family: Option<Family>,
}

impl ToolPlan {
    /// Plans `request` for a model whose chat template is `template` (its source).
    /// A template that does not render `tools`, or whose call format is none of
    /// the families, is a 400 (unless `tool_choice` is `none`, which needs only
    /// the rendering): the tools would otherwise be dropped silently.
    pub fn new(request: ToolRequest, template: Option<&str>) -> Result<Self, ApiError> {
        let template = template.unwrap_or("");
        if !template.contains("tools") {
            return Err(bad(
                "tools",
                "this model's chat template does not render `tools`; start the server with `--chat-template FILE` (a template with tool support)",
            ));
        }
        let family = Family::detect(template);
        if family.is_none() && request.choice != ToolChoice::None {
            return Err(bad(
                "tools",
                "the tool-call format of this model's chat template is not supported (supported: Hermes/Qwen `<tool_call>`, Llama 3 JSON, Mistral `[TOOL_CALLS]`); start the server with `--chat-template FILE`",
            ));
        }
        Ok(Self { request, family })
    }

    /// The tools for the template.
    pub fn template_tools(&self) -> Vec<Value> {
        self.request.template_tools()
    }

    /// Sets the request's constraint (`required`, named: the calls; `auto`: the calls
    /// once the opening appears) and keeps the family's markers in the decoded text
    /// when the vocabulary has them as special tokens. A request that already has a
    /// constraint (`response_format`, ...) cannot also be constrained to tool calls.
    pub fn apply(&self, tok: &Tokenizer, params: &mut SamplingParams) -> Result<(), ApiError> {
        let Some(family) = self.family else {
            return Ok(());
        };
        if self.request.choice == ToolChoice::None {
            return Ok(());
        }
        if params.constraint.is_some() {
            return Err(bad("tool_choice", "tool calling cannot be combined with another output constraint (`response_format`, `structured_outputs`, ...); use `tool_choice: \"none\"` or drop the other"));
        }
        if family
            .markers()
            .iter()
            .any(|m| special_id(tok, m).is_some())
        {
            params.skip_special_tokens = false;
        }
        let grammar = Grammar::Lark(self.grammar(family, tok));
        let trigger =
            (self.request.choice == ToolChoice::Auto).then(|| family.opening().to_string());
        params.constraint = Some(Constraint { grammar, trigger });
        Ok(())
    }

    /// The Lark grammar of the calls this request allows (see [`grammar`]).
    fn grammar(&self, family: Family, tok: &Tokenizer) -> String {
        let (tools, parallel): (Vec<&FunctionTool>, bool) = match &self.request.choice {
            ToolChoice::Named(n) => (
                self.request.tools.iter().filter(|t| &t.name == n).collect(),
                false,
            ),
            _ => (self.request.tools.iter().collect(), self.request.parallel),
        };
        grammar(family, &tools, parallel, &|m| special_id(tok, m))
    }

    /// A parser of the output, unless `tool_choice` is `none`.
    pub fn parser(&self) -> Option<ToolParser> {
        let family = self.family?;
        (self.request.choice != ToolChoice::None).then(|| ToolParser::new(family))
    }
}

/// The id of `marker` when the vocabulary has it as a special (control) token.
fn special_id(tok: &Tokenizer, marker: &str) -> Option<u32> {
    tok.token_id(marker).filter(|&id| tok.is_special(id))
}

/// A Lark string literal of `s` (llguidance reads literals as JSON strings).
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Builds the Lark grammar of one or more (`parallel`) calls of `tools` in
/// `family`'s format. Each tool's arguments are `%json` of its own parameters
/// schema (so its `$ref`s keep their root); the wrapper is spelled literally,
/// beginning with [`Family::opening`]. A marker that is a special token
/// (`special_id` gives its id) is written `<[id]>`, which matches that token.
pub fn grammar(
    family: Family,
    tools: &[&FunctionTool],
    parallel: bool,
    special_id: &dyn Fn(&str) -> Option<u32>,
) -> String {
    let mark = |m: &str| match special_id(m) {
        Some(id) => format!("<[{id}]>"),
        None => lit(m),
    };
    let mut g = String::new();
    let key = if family == Family::Llama3Json {
        "parameters"
    } else {
        "arguments"
    };
    let mut alts = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let schema = serde_json::to_string(&t.parameters).unwrap_or_else(|_| "{}".into());
        match family {
            Family::MistralArgs => g.push_str(&format!(
                "fn_{i}: {} {} args_{i}\n",
                lit(&t.name),
                mark(MISTRAL_ARGS)
            )),
            _ => g.push_str(&format!(
                "fn_{i}: {} args_{i} \"}}\"\n",
                lit(&format!("{{\"name\": \"{}\", \"{key}\": ", t.name))
            )),
        }
        g.push_str(&format!("args_{i}: %json {schema}\n"));
        alts.push(format!("fn_{i}"));
    }
    g.push_str(&format!("body: {}\n", alts.join(" | ")));
    let (call, sep) = match family {
        Family::Hermes => (
            format!(
                "{} \"\\n\" body \"\\n\" {}",
                mark(HERMES_OPEN),
                mark(HERMES_CLOSE)
            ),
            "\"\\n\" ",
        ),
        Family::Llama3Json => ("body".to_string(), "\"; \" "),
        Family::MistralJson => ("body".to_string(), "\", \" "),
        Family::MistralArgs => (format!("{} body", mark(MISTRAL_OPEN)), ""),
    };
    g.push_str(&format!("call: {call}\n"));
    let calls = if parallel {
        format!("call ({sep}call)*")
    } else {
        "call".to_string()
    };
    let start = match family {
        Family::MistralJson => format!("start: {} \"[\" {calls} \"]\"\n", mark(MISTRAL_OPEN)),
        _ => format!("start: {calls}\n"),
    };
    format!("{start}{g}")
}

/// A parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedCall {
    /// Function name.
    pub name: String,
    /// The arguments object, compact JSON text.
    pub arguments: String,
}

/// What the parser makes of the output, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolItem {
    /// Text outside calls.
    Content(String),
    /// A complete call.
    Call(ParsedCall),
}

/// Where the parser is in the output.
#[derive(Clone, Debug, PartialEq)]
enum Mode {
    /// Text; `pending` may end in a prefix of the opening marker.
    Text,
    /// Inside a Hermes `<tool_call>` (after the tag) until `</tool_call>`.
    HermesCall,
    /// From the opening (Llama: the output's first `{` or `<|python_tag|>`;
    /// Mistral: `[TOOL_CALLS]`) to the end of the output.
    Tail,
}

/// The streaming tool-call parser of one choice (module docs).
#[derive(Clone, Debug)]
pub struct ToolParser {
    family: Family,
    mode: Mode,
    /// Text not yet classified.
    pending: String,
    /// Whether any non-whitespace content was emitted (leading whitespace is dropped).
    content_started: bool,
    /// Whitespace held back until more content follows (trailing whitespace is dropped).
    held_ws: String,
    /// Calls emitted so far.
    num_calls: usize,
}

impl ToolParser {
    /// A parser for `family`'s format.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            mode: Mode::Text,
            pending: String::new(),
            content_started: false,
            held_ws: String::new(),
            num_calls: 0,
        }
    }

    /// Parses a whole output: its content (`None` when empty) and calls.
    pub fn parse_all(family: Family, text: &str) -> (Option<String>, Vec<ParsedCall>) {
        let mut p = Self::new(family);
        let mut items = p.feed(text);
        items.extend(p.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for it in items {
            match it {
                ToolItem::Content(c) => content.push_str(&c),
                ToolItem::Call(c) => calls.push(c),
            }
        }
        ((!content.is_empty()).then_some(content), calls)
    }

    /// Number of calls parsed so far.
    pub fn num_calls(&self) -> usize {
        self.num_calls
    }

    /// The family parsed.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Feeds new output text; returns what became certain.
    pub fn feed(&mut self, text: &str) -> Vec<ToolItem> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            let before = (self.mode.clone(), self.pending.len());
            match self.mode {
                Mode::Text => self.step_text(&mut out, false),
                Mode::HermesCall => self.step_hermes_call(&mut out, false),
                Mode::Tail => {}
            }
            if (self.mode.clone(), self.pending.len()) == before {
                break;
            }
        }
        out
    }

    /// The end of the output: classifies what is left.
    pub fn finish(&mut self) -> Vec<ToolItem> {
        let mut out = Vec::new();
        loop {
            match self.mode {
                Mode::Text => {
                    self.step_text(&mut out, true);
                    if self.mode == Mode::Text {
                        break;
                    }
                }
                Mode::HermesCall => self.step_hermes_call(&mut out, true),
                Mode::Tail => {
                    let tail = std::mem::take(&mut self.pending);
                    match parse_tail(self.family, &tail) {
                        Some(calls) => {
                            self.num_calls += calls.len();
                            out.extend(calls.into_iter().map(ToolItem::Call));
                        }
                        None => self.content(&mut out, &tail),
                    }
                    self.mode = Mode::Text;
                    break;
                }
            }
        }
        out
    }

    /// Emits content, dropping leading and holding trailing whitespace.
    fn content(&mut self, out: &mut Vec<ToolItem>, text: &str) {
        if text.is_empty() {
            return;
        }
        let trimmed = text.trim_end();
        if trimmed.is_empty() {
            if self.content_started {
                self.held_ws.push_str(text);
            }
            return;
        }
        let mut s = std::mem::take(&mut self.held_ws);
        s.push_str(if self.content_started {
            trimmed
        } else {
            trimmed.trim_start()
        });
        self.content_started = true;
        self.held_ws.push_str(&text[trimmed.len()..]);
        out.push(ToolItem::Content(s));
    }

    /// In text: finds the opening; emits the text before it.
    fn step_text(&mut self, out: &mut Vec<ToolItem>, at_end: bool) {
        let open = match self.family {
            Family::Hermes => Some(HERMES_OPEN),
            Family::MistralJson | Family::MistralArgs => Some(MISTRAL_OPEN),
            Family::Llama3Json => None,
        };
        let pending = std::mem::take(&mut self.pending);
        match open {
            Some(open) => {
                if let Some(p) = pending.find(open) {
                    self.content(out, &pending[..p]);
                    if self.family == Family::Hermes {
                        self.pending = pending[p + open.len()..].to_string();
                        self.mode = Mode::HermesCall;
                    } else {
                        self.pending = pending[p..].to_string();
                        self.mode = Mode::Tail;
                    }
                    return;
                }
                let keep = if at_end {
                    0
                } else {
                    partial_suffix(&pending, open)
                };
                let cut = pending.len() - keep;
                self.content(out, &pending[..cut]);
                self.pending = pending[cut..].to_string();
            }
            None => {
                // Llama: calls only at the start of the output (after whitespace).
                if self.content_started || self.num_calls > 0 {
                    self.content(out, &pending);
                    return;
                }
                let rest = pending.trim_start();
                if rest.is_empty() {
                    self.pending = if at_end { String::new() } else { pending };
                    return;
                }
                if rest.starts_with('{') || rest.starts_with(PYTHON_TAG) {
                    self.pending = rest.to_string();
                    self.mode = Mode::Tail;
                } else if !at_end && PYTHON_TAG.starts_with(rest) {
                    self.pending = pending; // may become the tag
                } else {
                    self.content(out, &pending);
                }
            }
        }
    }

    /// Inside `<tool_call>`: at `</tool_call>` (or the end), the call or, when
    /// its JSON does not parse, its text as content.
    fn step_hermes_call(&mut self, out: &mut Vec<ToolItem>, at_end: bool) {
        let end = self.pending.find(HERMES_CLOSE);
        let (inner, rest) = match (end, at_end) {
            (Some(e), _) => (
                self.pending[..e].to_string(),
                self.pending[e + HERMES_CLOSE.len()..].to_string(),
            ),
            (None, true) => (std::mem::take(&mut self.pending), String::new()),
            (None, false) => return,
        };
        match parse_call_object(&inner, &["arguments", "parameters"]) {
            Some(call) => {
                self.num_calls += 1;
                out.push(ToolItem::Call(call));
            }
            None => {
                let raw = format!(
                    "{HERMES_OPEN}{inner}{}",
                    if end.is_some() { HERMES_CLOSE } else { "" }
                );
                self.content(out, &raw);
            }
        }
        self.pending = rest;
        self.mode = Mode::Text;
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `marker`.
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

/// `{"name": N, "<key>": A}` (one of `keys`) as a call; `A` must be an object
/// (or a string holding one).
fn call_from_value(v: &Value, keys: &[&str]) -> Option<ParsedCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_string();
    let args = keys
        .iter()
        .find_map(|k| o.get(*k))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let args = match args {
        Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
        a => a,
    };
    args.is_object().then(|| ParsedCall {
        name,
        arguments: serde_json::to_string(&args).unwrap_or_default(),
    })
}

fn parse_call_object(text: &str, keys: &[&str]) -> Option<ParsedCall> {
    call_from_value(&serde_json::from_str::<Value>(text.trim()).ok()?, keys)
}

/// JSON values one after another, separated by whitespace and `sep` (if any).
fn json_sequence(text: &str, sep: char) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = it.next()?.ok()?;
        out.push(v);
        rest = rest[it.byte_offset()..].trim_start();
        if let Some(r) = rest.strip_prefix(sep) {
            rest = r.trim_start();
        }
    }
    Some(out)
}

/// The calls of a Llama or Mistral tail (from the opening to the end); `None`
/// when it is not well-formed (then it is content).
fn parse_tail(family: Family, tail: &str) -> Option<Vec<ParsedCall>> {
    let calls = match family {
        Family::Llama3Json => {
            let body = tail.trim_start().strip_prefix(PYTHON_TAG).unwrap_or(tail);
            json_sequence(body, ';')?
                .iter()
                .map(|v| call_from_value(v, &["parameters", "arguments"]))
                .collect::<Option<Vec<_>>>()?
        }
        Family::MistralJson => {
            let mut calls = Vec::new();
            for part in tail.split(MISTRAL_OPEN).skip(1) {
                for v in json_sequence(part, ',')? {
                    match v {
                        Value::Array(a) => calls.extend(
                            a.iter()
                                .map(|c| call_from_value(c, &["arguments"]))
                                .collect::<Option<Vec<_>>>()?,
                        ),
                        v => calls.push(call_from_value(&v, &["arguments"])?),
                    }
                }
            }
            calls
        }
        Family::MistralArgs => {
            let mut calls = Vec::new();
            for part in tail.split(MISTRAL_OPEN).skip(1) {
                let (head, args) = part.split_once(MISTRAL_ARGS)?;
                let name = head.split(MISTRAL_CALL_ID).next()?.trim();
                if !valid_name(name) {
                    return None;
                }
                let v: Value = serde_json::from_str(args.trim()).ok()?;
                calls.push(call_from_value(
                    &serde_json::json!({"name": name, "arguments": v}),
                    &["arguments"],
                )?);
            }
            calls
        }
        Family::Hermes => return None,
    };
    (!calls.is_empty()).then_some(calls)
}

/// A parsed call as OpenAI's `tool_calls[]` entry, with a new id.
pub fn call_out(family: Family, call: &ParsedCall) -> ToolCallOut {
    ToolCallOut {
        id: family.new_call_id(),
        kind: "function",
        function: FunctionOut {
            name: call.name.clone(),
            arguments: call.arguments.clone(),
        },
    }
}

/// The stream deltas of call number `index`: its header (`id`, `type`, `name`,
/// empty `arguments`), then its arguments.
pub fn call_deltas(family: Family, index: usize, call: &ParsedCall) -> [ToolCallDelta; 2] {
    let out = call_out(family, call);
    [
        ToolCallDelta {
            index,
            id: Some(out.id),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some(out.function.name),
                arguments: Some(String::new()),
            },
        },
        ToolCallDelta {
            index,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: Some(out.function.arguments),
            },
        },
    ]
}

/// The finish reason of a choice that made `num_calls` calls: `tool_calls`
/// instead of `stop` when there are any.
pub fn finish_reason(reason: &'static str, num_calls: usize) -> &'static str {
    if num_calls > 0 && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}})
    }

    fn req(tools: Value, choice: Value) -> Result<Option<ToolRequest>, ApiError> {
        ToolRequest::parse(Some(&tools), Some(&choice), None)
    }

    fn param(e: ApiError) -> String {
        e.body()["error"]["param"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    #[test]
    fn requests_parse_and_bad_ones_name_the_field() {
        let r = req(json!([weather()]), json!("auto")).unwrap().unwrap();
        assert_eq!(
            (r.tools[0].name.as_str(), &r.choice, r.parallel),
            ("get_weather", &ToolChoice::Auto, true)
        );
        assert_eq!(r.template_tools()[0]["function"]["name"], "get_weather");
        let r = ToolRequest::parse(
            Some(&json!([weather()])),
            Some(&json!({"type": "function", "function": {"name": "get_weather"}})),
            Some(false),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.choice, r.parallel),
            (ToolChoice::Named("get_weather".into()), false)
        );
        // No parameters: any object.
        let r = req(
            json!([{"type": "function", "function": {"name": "now"}}]),
            json!("required"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.tools[0].parameters["type"], "object");
        assert!(req(json!([]), json!("auto")).unwrap().is_none());
        assert!(ToolRequest::parse(None, None, None).unwrap().is_none());
        for (tools, choice, p) in [
            (json!({"a": 1}), json!("auto"), "tools"),
            (
                json!([{"type": "custom", "custom": {}}]),
                json!("auto"),
                "tools[0].type",
            ),
            (
                json!([{"type": "function"}]),
                json!("auto"),
                "tools[0].function",
            ),
            (
                json!([{"type": "function", "function": {"name": "bad name"}}]),
                json!("auto"),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "extra": 1}}]),
                json!("auto"),
                "tools[0].function.extra",
            ),
            (
                json!([weather(), weather()]),
                json!("auto"),
                "tools[1].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
                json!("auto"),
                "tools[0].function.parameters.type",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}}]),
                json!("auto"),
                "tools[0].function.parameters.properties.x.type",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"$ref": "#/$defs/Y"}}}}}]),
                json!("auto"),
                "tools[0].function.parameters.properties.x.$ref",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": {"minimum": 5, "maximum": 1}}}}}]),
                json!("auto"),
                "tools[0].function.parameters.properties.n.minimum",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]),
                json!("auto"),
                "tools[0].function.parameters.required",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"anyOf": []}}}]),
                json!("auto"),
                "tools[0].function.parameters.anyOf",
            ),
            (json!([weather()]), json!("sometimes"), "tool_choice"),
            (
                json!([weather()]),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice.function.name",
            ),
            (json!([]), json!("required"), "tool_choice"),
        ] {
            let e = req(tools.clone(), choice.clone()).unwrap_err();
            assert_eq!(param(e), p, "{tools} {choice}");
        }
        // A resolving $ref and nested definitions are fine.
        let ok = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0}}}},
            "properties": {"p": {"$ref": "#/$defs/P"}, "l": {"type": "array", "items": {"type": ["string", "null"]}, "maxItems": 3}}}}}]);
        req(ok, json!("auto")).unwrap().unwrap();
    }

    #[test]
    fn history_calls_parse_string_arguments() {
        let calls = history_tool_calls(1, &json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}])).unwrap().unwrap();
        assert_eq!(calls[0].function.arguments, json!({"a": 1}));
        assert_eq!(calls[0].id.as_deref(), Some("call_1"));
        assert!(history_tool_calls(0, &json!([])).unwrap().is_none());
        let e = history_tool_calls(
            2,
            &json!([{"function": {"name": "f", "arguments": "{not json"}}]),
        )
        .unwrap_err();
        assert_eq!(param(e), "messages[2].tool_calls[0].function.arguments");
    }

    #[test]
    fn families_are_detected_from_template_text() {
        let qwen = "{%- if tools %}<tools>{{ tool | tojson }}</tools> <tool_call>\\n{\"name\": ...}</tool_call>{% endif %}";
        assert_eq!(Family::detect(qwen), Some(Family::Hermes));
        assert_eq!(
            Family::detect("{% if tools %}<tool_call>\n<function=x>{% endif %}"),
            None
        );
        let llama = "<|start_header_id|>{% if tools %}Respond in the format {\"name\": function name, \"parameters\": dictionary}{% endif %}";
        assert_eq!(Family::detect(llama), Some(Family::Llama3Json));
        assert_eq!(
            Family::detect("{% if tools %}<|python_tag|>{% endif %}"),
            Some(Family::Llama3Json)
        );
        assert_eq!(
            Family::detect("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS][{{ x }}]"),
            Some(Family::MistralJson)
        );
        assert_eq!(
            Family::detect("[TOOL_CALLS]{{ name }}[ARGS]{{ args }}"),
            Some(Family::MistralArgs)
        );
        assert_eq!(Family::detect("<|im_start|>{{ message.content }}"), None);
        let r = req(json!([weather()]), json!("auto")).unwrap().unwrap();
        assert_eq!(
            param(ToolPlan::new(r.clone(), Some("<|im_start|>{{ m }}")).unwrap_err()),
            "tools"
        );
        assert_eq!(
            param(
                ToolPlan::new(r.clone(), Some("{% for t in tools %}{{ t }}{% endfor %}"))
                    .unwrap_err()
            ),
            "tools"
        );
        let none = ToolRequest {
            choice: ToolChoice::None,
            ..r
        };
        let plan = ToolPlan::new(none, Some("{% for t in tools %}{{ t }}{% endfor %}")).unwrap();
        assert!(plan.parser().is_none());
    }

    #[test]
    fn hermes_parses_calls_and_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\", \"unit\": \"c\"}}\n</tool_call>";
        let (content, calls) = ToolParser::parse_all(Family::Hermes, text);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0],
            ParsedCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }
        );
        assert_eq!(calls[1].arguments, r#"{"city":"Rome","unit":"c"}"#);
        // Only calls: null content; a call cut short by max_tokens without its close still parses when its JSON is whole.
        let (content, calls) = ToolParser::parse_all(
            Family::Hermes,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n",
        );
        assert_eq!((content, calls.len()), (None, 1));
        // Bad JSON stays text; no calls.
        let (content, calls) = ToolParser::parse_all(
            Family::Hermes,
            "<tool_call>\n{\"name\": \"f\", \"argu\n</tool_call>",
        );
        assert_eq!(
            (content.as_deref(), calls.len()),
            (
                Some("<tool_call>\n{\"name\": \"f\", \"argu\n</tool_call>"),
                0
            )
        );
        // Plain text passes through (trimmed).
        assert_eq!(
            ToolParser::parse_all(Family::Hermes, "  Hello <tool there "),
            (Some("Hello <tool there".into()), vec![])
        );
    }

    #[test]
    fn llama_and_mistral_parse() {
        let (c, calls) = ToolParser::parse_all(Family::Llama3Json, "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}; {\"name\": \"g\", \"parameters\": {}}");
        assert_eq!(
            (c, calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()),
            (None, vec!["f", "g"])
        );
        assert_eq!(calls[0].arguments, r#"{"x":1}"#);
        let (c, calls) = ToolParser::parse_all(
            Family::Llama3Json,
            " {\"name\": \"f\", \"parameters\": {\"x\": \"y\"}}",
        );
        assert_eq!((c, calls.len()), (None, 1));
        let (c, calls) = ToolParser::parse_all(Family::Llama3Json, "The answer is {1}.");
        assert_eq!((c.as_deref(), calls.len()), (Some("The answer is {1}."), 0));
        let (c, calls) = ToolParser::parse_all(Family::MistralJson, "Sure.[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}, {\"name\": \"g\", \"arguments\": {}}]");
        assert_eq!((c.as_deref(), calls.len()), (Some("Sure."), 2));
        assert_eq!(calls[0].arguments, r#"{"a":[1,2]}"#);
        let (c, calls) = ToolParser::parse_all(
            Family::MistralArgs,
            "[TOOL_CALLS]f[ARGS]{\"a\": 1}[TOOL_CALLS]g[CALL_ID]abc123456[ARGS]{}",
        );
        assert_eq!(
            (
                c,
                calls
                    .iter()
                    .map(|c| (c.name.as_str(), c.arguments.as_str()))
                    .collect::<Vec<_>>()
            ),
            (None, vec![("f", r#"{"a":1}"#), ("g", "{}")])
        );
        let (c, calls) = ToolParser::parse_all(Family::MistralArgs, "[TOOL_CALLS]f[ARGS]{\"a\": ");
        assert_eq!(
            (c.as_deref(), calls.len()),
            (Some("[TOOL_CALLS]f[ARGS]{\"a\":"), 0)
        );
    }

    /// Feeding the text in any split gives the items of the whole (stream == non-stream).
    #[test]
    fn streaming_in_any_split_equals_whole() {
        let cases = [
            (Family::Hermes, "Hi there.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"k\": \"v<\"}}\n</tool_call>\n\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>  "),
            (Family::Hermes, " x < y <tool_ca and <tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call> tail "),
            (Family::Llama3Json, "  <|python_tag|>{\"name\": \"a\", \"parameters\": {\"n\": 2}}"),
            (Family::Llama3Json, "<|py not a tag"),
            (Family::MistralJson, "ok [TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}}]"),
            (Family::MistralArgs, "[TOOL_CALLS]a[ARGS]{\"q\": \"[TOOL\"}"),
        ];
        for (family, text) in cases {
            let whole = ToolParser::parse_all(family, text);
            let chars: Vec<(usize, char)> = text.char_indices().collect();
            for step in 1..=5 {
                let mut p = ToolParser::new(family);
                let mut items = Vec::new();
                for chunk in chars.chunks(step) {
                    let (s, e) = (
                        chunk[0].0,
                        chunk.last().map_or(0, |(i, c)| i + c.len_utf8()),
                    );
                    items.extend(p.feed(&text[s..e]));
                }
                items.extend(p.finish());
                let content: String = items
                    .iter()
                    .filter_map(|i| {
                        if let ToolItem::Content(c) = i {
                            Some(c.as_str())
                        } else {
                            None
                        }
                    })
                    .collect();
                let calls: Vec<ParsedCall> = items
                    .iter()
                    .filter_map(|i| {
                        if let ToolItem::Call(c) = i {
                            Some(c.clone())
                        } else {
                            None
                        }
                    })
                    .collect();
                assert_eq!(
                    ((!content.is_empty()).then_some(content), calls),
                    whole,
                    "{family:?} step {step}: {text:?}"
                );
            }
        }
        // The second case keeps the lone `<`s as content.
        let (c, calls) = ToolParser::parse_all(Family::Hermes, cases[1].1);
        assert_eq!(
            (c.as_deref(), calls.len()),
            (Some("x < y <tool_ca and  tail"), 1)
        );
    }

    #[test]
    fn grammars_spell_each_format() {
        let r = req(
            json!([weather(), {"type": "function", "function": {"name": "now"}}]),
            json!("required"),
        )
        .unwrap()
        .unwrap();
        let tools: Vec<&FunctionTool> = r.tools.iter().collect();
        let plain = |_: &str| None;
        let g = grammar(Family::Hermes, &tools, true, &plain);
        assert!(g.starts_with("start: call (\"\\n\" call)*\n"), "{g}");
        assert!(
            g.contains("call: \"<tool_call>\" \"\\n\" body \"\\n\" \"</tool_call>\"\n"),
            "{g}"
        );
        assert!(
            g.contains(r#"fn_0: "{\"name\": \"get_weather\", \"arguments\": " args_0 "}""#),
            "{g}"
        );
        assert!(g.contains("body: fn_0 | fn_1\n"), "{g}");
        let schema0 = g
            .lines()
            .find_map(|l| l.strip_prefix("args_0: %json "))
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(schema0).unwrap(),
            r.tools[0].parameters
        );
        // One call only; special-token markers as `<...>`.
        let special = |m: &str| match m {
            HERMES_OPEN => Some(151657),
            HERMES_CLOSE => Some(151658),
            _ => None,
        };
        let g = grammar(Family::Hermes, &tools[..1], false, &special);
        assert!(
            g.starts_with("start: call\n")
                && g.contains("call: <[151657]> \"\\n\" body \"\\n\" <[151658]>\n"),
            "{g}"
        );
        let g = grammar(Family::Llama3Json, &tools, true, &plain);
        assert!(
            g.contains(r#"fn_1: "{\"name\": \"now\", \"parameters\": " args_1 "}""#)
                && g.starts_with("start: call (\"; \" call)*"),
            "{g}"
        );
        let g = grammar(Family::MistralJson, &tools, false, &plain);
        assert!(
            g.starts_with("start: \"[TOOL_CALLS]\" \"[\" call \"]\"\n"),
            "{g}"
        );
        let g = grammar(Family::MistralArgs, &tools, true, &plain);
        assert!(
            g.contains("fn_0: \"get_weather\" \"[ARGS]\" args_0\n")
                && g.contains("call: \"[TOOL_CALLS]\" body\n"),
            "{g}"
        );
        // Each grammar's first literal starts with the family's opening (auto's trigger).
        let first = |f: Family, rule: &str| {
            let g = grammar(f, &tools, true, &plain);
            let line = g
                .lines()
                .find_map(|l| l.strip_prefix(rule))
                .unwrap_or_else(|| panic!("{rule} in {g}"))
                .to_string();
            let lit_text: String = serde_json::Deserializer::from_str(line.trim_start())
                .into_iter::<String>()
                .next()
                .unwrap()
                .unwrap();
            assert!(lit_text.starts_with(f.opening()), "{f:?}: {lit_text:?}");
        };
        first(Family::Hermes, "call: ");
        first(Family::Llama3Json, "fn_0: ");
        first(Family::MistralJson, "start: ");
        first(Family::MistralArgs, "call: ");
    }

    #[test]
    fn finish_reason_and_ids() {
        assert_eq!(finish_reason("stop", 1), "tool_calls");
        assert_eq!(finish_reason("length", 1), "length");
        assert_eq!(finish_reason("stop", 0), "stop");
        let call = ParsedCall {
            name: "f".into(),
            arguments: "{}".into(),
        };
        let out = call_out(Family::Hermes, &call);
        assert!(
            out.id.starts_with("call_") && out.id.len() == 29,
            "{}",
            out.id
        );
        assert_eq!(call_out(Family::MistralJson, &call).id.len(), 9);
        let [head, args] = call_deltas(Family::Hermes, 3, &call);
        assert_eq!(
            (
                head.index,
                head.function.name.as_deref(),
                args.function.arguments.as_deref()
            ),
            (3, Some("f"), Some("{}"))
        );
    }
}
