//! The request fields that ask for structured output, as the clients in use
//! send them, → one [`Constraint`]:
//!
//! - OpenAI `response_format`: `{"type": "text"}` (none), `{"type":
//!   "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
//!   "schema", "strict", "description"}}` (`strict: false` is still enforced);
//!   llama.cpp's `{"type": "json_object", "schema": {...}}` too;
//! - vLLM `structured_outputs`: `{json | regex | choice | grammar |
//!   json_object}` plus `whitespace_pattern`, `disable_any_whitespace`,
//!   `disable_fallback` (there is no fallback: any value), and
//!   `disable_additional_properties` (only `false`); `structural_tag` is refused;
//! - vLLM's older aliases `guided_json`, `guided_regex`, `guided_choice`,
//!   `guided_grammar`, with `guided_whitespace_pattern` (honoured, JSON only)
//!   and `guided_decoding_backend` (`auto`, `guidance`, `llguidance`; the
//!   others name engines this server does not have: refused);
//! - llama.cpp `grammar` (GBNF) and `json_schema`.
//!
//! A `grammar` / `guided_grammar` / `structured_outputs.grammar` containing
//! `::=` is GBNF, otherwise llguidance's Lark. More than one constraint in
//! one request is a 400. Every grammar is syntax-checked here
//! ([`check_syntax`]), so its error names the field it came from.

use serde_json::{json, Map, Value};

use super::{check_syntax, Constraint, Grammar};

/// Top-level request fields this module reads (honoured on completions and chat).
pub const FIELDS: &[&str] = &[
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "grammar",
    "json_schema",
];

/// A refused field: its JSON path and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// The field (e.g. `response_format.json_schema.schema`).
    pub param: String,
    /// What is wrong.
    pub message: String,
}

fn err(param: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        param: param.to_string(),
        message: message.into(),
    }
}

/// A JSON schema given inline or as a JSON string.
fn schema_value(param: &str, v: &Value) -> Result<Value, FieldError> {
    match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| err(param, format!("`{param}` is not valid JSON: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(err(
            param,
            format!("`{param}` must be a JSON schema (an object)"),
        )),
    }
}

fn string(param: &str, v: &Value) -> Result<String, FieldError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| err(param, format!("`{param}` must be a string")))
}

fn choices(param: &str, v: &Value) -> Result<Vec<String>, FieldError> {
    let bad = || {
        err(
            param,
            format!("`{param}` must be a non-empty list of strings"),
        )
    };
    let a = v.as_array().filter(|a| !a.is_empty()).ok_or_else(bad)?;
    a.iter()
        .map(|c| c.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}

fn grammar_text(param: &str, v: &Value) -> Result<Grammar, FieldError> {
    let g = string(param, v)?;
    if g.trim().is_empty() {
        return Err(err(param, format!("`{param}` is empty")));
    }
    Ok(if g.contains("::=") {
        Grammar::Gbnf(g)
    } else {
        Grammar::Lark(g)
    })
}

fn response_format(v: &Value) -> Result<Option<Grammar>, FieldError> {
    let p = "response_format";
    let o = v
        .as_object()
        .ok_or_else(|| err(p, "`response_format` must be an object with a `type`"))?;
    let kind = o.get("type").and_then(Value::as_str).ok_or_else(|| {
        err(
            "response_format.type",
            "`response_format.type` must be a string",
        )
    })?;
    let allow = |keys: &[&str]| -> Result<(), FieldError> {
        match o
            .keys()
            .find(|k| k.as_str() != "type" && !keys.contains(&k.as_str()))
        {
            Some(k) => Err(err(
                &format!("{p}.{k}"),
                format!("Unrecognized request argument supplied: {p}.{k}"),
            )),
            None => Ok(()),
        }
    };
    match kind {
        "text" => {
            allow(&[])?;
            Ok(None)
        }
        "json_object" => {
            allow(&["schema"])?;
            match o.get("schema").filter(|s| !s.is_null()) {
                Some(s) => Ok(Some(Grammar::JsonSchema(schema_value("response_format.schema", s)?))),
                None => Ok(Some(Grammar::JsonObject)),
            }
        }
        "json_schema" => {
            allow(&["json_schema"])?;
            let js = o
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| err("response_format.json_schema", "`response_format.json_schema` must be an object with `name` and `schema`"))?;
            for (k, v) in js {
                let param = format!("response_format.json_schema.{k}");
                match k.as_str() {
                    "name" | "description" if v.is_string() || v.is_null() => {}
                    "strict" if v.is_boolean() || v.is_null() => {}
                    "schema" => {}
                    "name" | "description" => return Err(err(&param, format!("`{param}` must be a string"))),
                    "strict" => return Err(err(&param, format!("`{param}` must be a boolean"))),
                    _ => return Err(err(&param, format!("Unrecognized request argument supplied: {param}"))),
                }
            }
            match js.get("schema").filter(|s| !s.is_null()) {
                Some(s) => Ok(Some(Grammar::JsonSchema(schema_value("response_format.json_schema.schema", s)?))),
                None => Ok(Some(Grammar::JsonObject)),
            }
        }
        other => Err(err("response_format.type", format!("`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`"))),
    }
}

/// vLLM's `structured_outputs`: the grammar and its whitespace option.
fn structured_outputs(
    v: &Value,
) -> Result<(Option<(String, Grammar)>, Option<String>), FieldError> {
    let p = "structured_outputs";
    let o = v
        .as_object()
        .ok_or_else(|| err(p, "`structured_outputs` must be an object"))?;
    let mut found: Option<(String, Grammar)> = None;
    let mut ws = None;
    for (k, v) in o {
        let param = format!("{p}.{k}");
        if v.is_null() {
            continue;
        }
        let g = match k.as_str() {
            "json" => Some(Grammar::JsonSchema(schema_value(&param, v)?)),
            "regex" => Some(Grammar::Regex(string(&param, v)?)),
            "choice" => Some(Grammar::Choice(choices(&param, v)?)),
            "grammar" => Some(grammar_text(&param, v)?),
            "json_object" => match v.as_bool() {
                Some(true) => Some(Grammar::JsonObject),
                Some(false) => None,
                None => return Err(err(&param, format!("`{param}` must be a boolean"))),
            },
            "whitespace_pattern" => {
                ws = Some(string(&param, v)?);
                None
            }
            "disable_any_whitespace" => match v.as_bool() {
                Some(true) => {
                    ws.get_or_insert_with(String::new);
                    None
                }
                Some(false) => None,
                None => return Err(err(&param, format!("`{param}` must be a boolean"))),
            },
            "disable_fallback" if v.is_boolean() => None,
            "disable_additional_properties" if v == &Value::Bool(false) => None,
            "disable_additional_properties" => {
                return Err(err(&param, format!("`{param}` is not supported (schemas are enforced as given); remove it or set it to false")))
            }
            "structural_tag" => return Err(err(&param, format!("`{param}` is not supported by this server; remove it"))),
            _ => return Err(err(&param, format!("Unrecognized request argument supplied: {param}"))),
        };
        if let Some(g) = g {
            if let Some((first, _)) = &found {
                return Err(err(
                    &param,
                    format!("only one constraint may be given, got `{first}` and `{param}`"),
                ));
            }
            found = Some((param, g));
        }
    }
    Ok((found, ws))
}

/// The constraint a request body asks for (`None`: free text), or the field that is wrong.
pub fn parse(body: &Map<String, Value>) -> Result<Option<Constraint>, FieldError> {
    let mut found: Option<(String, Grammar)> = None;
    let mut ws: Option<(String, String)> = None;
    let mut put = |param: String, g: Grammar| -> Result<(), FieldError> {
        if let Some((first, _)) = &found {
            return Err(err(
                &param,
                format!("only one constraint may be given, got `{first}` and `{param}`"),
            ));
        }
        found = Some((param, g));
        Ok(())
    };
    for (k, v) in body {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "response_format" => {
                if let Some(g) = response_format(v)? {
                    put(k.clone(), g)?;
                }
            }
            "structured_outputs" => {
                let (g, w) = structured_outputs(v)?;
                if let Some((param, g)) = g {
                    put(param, g)?;
                }
                if let Some(w) = w {
                    ws = Some(("structured_outputs.whitespace_pattern".into(), w));
                }
            }
            "guided_json" | "json_schema" => {
                put(k.clone(), Grammar::JsonSchema(schema_value(k, v)?))?
            }
            "guided_regex" => put(k.clone(), Grammar::Regex(string(k, v)?))?,
            "guided_choice" => put(k.clone(), Grammar::Choice(choices(k, v)?))?,
            "guided_grammar" | "grammar" => {
                // llama.cpp sends `"grammar": ""` for none.
                if k == "grammar" && v.as_str() == Some("") {
                    continue;
                }
                put(k.clone(), grammar_text(k, v)?)?
            }
            "guided_whitespace_pattern" => ws = Some((k.clone(), string(k, v)?)),
            "guided_decoding_backend" => {
                let b = string(k, v)?;
                if !matches!(b.as_str(), "" | "auto" | "guidance" | "llguidance") {
                    return Err(err(k, format!("`guided_decoding_backend` `{b}` is not available: this server uses llguidance (`auto`, `guidance` or `llguidance`)")));
                }
            }
            _ => {}
        }
    }
    let Some((param, mut grammar)) = found else {
        if let Some((wp, _)) = ws {
            return Err(err(
                &wp,
                format!("`{wp}` applies only to a JSON constraint, and the request has none"),
            ));
        }
        return Ok(None);
    };
    if let Some((wp, pattern)) = ws {
        grammar = match grammar {
            Grammar::JsonObject => Grammar::JsonSchema(
                json!({ "type": "object", "x-guidance": { "whitespace_pattern": pattern } }),
            ),
            Grammar::JsonSchema(mut s) => match s.as_object_mut() {
                Some(o) => {
                    let xg = o.entry("x-guidance").or_insert_with(|| json!({}));
                    match xg.as_object_mut() {
                        Some(x) => {
                            x.insert("whitespace_pattern".into(), Value::String(pattern));
                        }
                        None => {
                            return Err(err(&param, "`x-guidance` in the schema must be an object"))
                        }
                    }
                    Grammar::JsonSchema(s)
                }
                None => return Err(err(&wp, format!("`{wp}` needs an object schema"))),
            },
            _ => {
                return Err(err(
                    &wp,
                    format!("`{wp}` applies only to a JSON constraint, not to `{param}`"),
                ))
            }
        };
    }
    check_syntax(&grammar).map_err(|e| err(&param, format!("invalid `{param}`: {e}")))?;
    Ok(Some(Constraint {
        grammar,
        trigger: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    fn grammar(s: &str) -> Option<Grammar> {
        parse(&body(s))
            .unwrap_or_else(|e| panic!("{s}: {e:?}"))
            .map(|c| c.grammar)
    }

    #[test]
    fn every_dialect_becomes_its_grammar() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(grammar(r#"{"response_format":{"type":"text"}}"#), None);
        assert_eq!(
            grammar(r#"{"response_format":{"type":"json_object"}}"#),
            Some(Grammar::JsonObject)
        );
        let rf = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}});
        assert_eq!(
            grammar(&rf.to_string()),
            Some(Grammar::JsonSchema(schema.clone()))
        );
        assert_eq!(
            grammar(&json!({"guided_json": schema}).to_string()),
            Some(Grammar::JsonSchema(schema.clone()))
        );
        assert_eq!(
            grammar(&json!({"guided_json": schema.to_string()}).to_string()),
            Some(Grammar::JsonSchema(schema.clone()))
        );
        assert_eq!(
            grammar(&json!({"json_schema": schema}).to_string()),
            Some(Grammar::JsonSchema(schema.clone()))
        );
        assert_eq!(
            grammar(&json!({"structured_outputs": {"json": schema}}).to_string()),
            Some(Grammar::JsonSchema(schema))
        );
        assert_eq!(
            grammar(r#"{"guided_regex":"[0-9]{3}"}"#),
            Some(Grammar::Regex("[0-9]{3}".into()))
        );
        assert_eq!(
            grammar(r#"{"structured_outputs":{"choice":["a","b"]}}"#),
            Some(Grammar::Choice(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            grammar(r#"{"guided_choice":["yes","no"]}"#),
            Some(Grammar::Choice(vec!["yes".into(), "no".into()]))
        );
        assert_eq!(
            grammar(r#"{"grammar":"root ::= \"a\" | \"b\""}"#),
            Some(Grammar::Gbnf("root ::= \"a\" | \"b\"".into()))
        );
        assert_eq!(
            grammar(r#"{"guided_grammar":"start: \"a\"+"}"#),
            Some(Grammar::Lark("start: \"a\"+".into()))
        );
        assert_eq!(
            grammar(r#"{"grammar":"","guided_decoding_backend":"auto"}"#),
            None
        );
        let ws = grammar(r#"{"guided_json":{"type":"object"},"guided_whitespace_pattern":" ?"}"#);
        assert_eq!(
            ws,
            Some(Grammar::JsonSchema(
                json!({"type": "object", "x-guidance": {"whitespace_pattern": " ?"}})
            ))
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (s, param) in [
            (
                r#"{"response_format":{"type":"json_object"},"guided_regex":"a"}"#,
                "guided_regex",
            ),
            (
                r#"{"structured_outputs":{"regex":"a","choice":["b"]}}"#,
                "structured_outputs.choice",
            ),
            (
                r#"{"response_format":{"type":"yaml"}}"#,
                "response_format.type",
            ),
            (
                r#"{"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"objekt"}}}}"#,
                "response_format",
            ),
            (r#"{"guided_json":"{not json"}"#, "guided_json"),
            (
                r#"{"guided_json":{"type":"string","format":"no-such-format"}}"#,
                "guided_json",
            ),
            (r#"{"guided_regex":"(unclosed"}"#, "guided_regex"),
            (r#"{"guided_choice":[]}"#, "guided_choice"),
            (r#"{"guided_choice":[1,2]}"#, "guided_choice"),
            (r#"{"grammar":"root ::= undefined-rule"}"#, "grammar"),
            (r#"{"guided_grammar":"start: ( "}"#, "guided_grammar"),
            (
                r#"{"guided_regex":"a","guided_whitespace_pattern":" "}"#,
                "guided_whitespace_pattern",
            ),
            (
                r#"{"guided_whitespace_pattern":" "}"#,
                "guided_whitespace_pattern",
            ),
            (
                r#"{"guided_json":{},"guided_decoding_backend":"xgrammar"}"#,
                "guided_decoding_backend",
            ),
            (
                r#"{"structured_outputs":{"structural_tag":"{}"}}"#,
                "structured_outputs.structural_tag",
            ),
            (
                r#"{"structured_outputs":{"jsonn":{}}}"#,
                "structured_outputs.jsonn",
            ),
            (
                r#"{"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{},"extra":1}}}"#,
                "response_format.json_schema.extra",
            ),
        ] {
            let e = parse(&body(s)).expect_err(s);
            assert_eq!(e.param, param, "{s}: {e:?}");
        }
    }
}
