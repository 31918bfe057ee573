//! Python semantics that jinja2 templates rely on and minijinja lacks, for
//! [`super::ChatTemplate`]'s environment: what transformers' `apply_chat_template`
//! environment adds (`raise_exception`, `strftime_now`, its `tojson`) and how Python
//! prints and tests values (`str()` / `repr()`, `None`, generators, `len()`).
//!
//! Owns value semantics only; which names the environment binds is in the parent.

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{Error, ErrorKind, Value};

use super::Clock;

/// Seconds since the Unix epoch that `strftime_now` formats.
pub(super) fn clock_now(clock: Clock) -> i64 {
    match clock {
        Clock::Fixed(seconds) => seconds,
        Clock::System => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0),
    }
}

/// English month names, January first.
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
/// English day names, Monday first.
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `strftime_now(format)`: Python's `datetime.strftime` (C locale) at `unix_seconds` UTC,
/// for the directives `%Y %y %m %d %e %B %b %h %A %a %H %I %M %S %p %j %%` and glibc's
/// `%-d`-style unpadded forms; another directive is an error naming it.
fn strftime(format: &str, unix_seconds: i64) -> Result<String, Error> {
    let days = unix_seconds.div_euclid(86_400);
    let secs_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday (Monday = 0)
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS
        .get((month - 1) as usize)
        .copied()
        .unwrap_or_default();
    let weekday_name = WEEKDAYS.get(weekday as usize).copied().unwrap_or_default();
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut directive = chars.next();
        let unpadded = directive == Some('-');
        if unpadded {
            directive = chars.next();
        }
        let number = |out: &mut String, value: i64, width: usize| {
            let _ = if unpadded {
                write!(out, "{value}")
            } else {
                write!(out, "{value:0width$}")
            }; // writing to a String cannot fail
        };
        match directive {
            Some('Y') => number(&mut out, year, 4),
            Some('y') => number(&mut out, year.rem_euclid(100), 2),
            Some('m') => number(&mut out, month, 2),
            Some('d') => number(&mut out, day, 2),
            Some('e') if !unpadded => {
                let _ = write!(out, "{day:2}");
            }
            Some('H') => number(&mut out, hour, 2),
            Some('I') => number(&mut out, hour12, 2),
            Some('M') => number(&mut out, minute, 2),
            Some('S') => number(&mut out, second, 2),
            Some('j') => number(&mut out, day_of_year, 3),
            Some('B') if !unpadded => out.push_str(month_name),
            Some('b' | 'h') if !unpadded => out.push_str(month_name.get(..3).unwrap_or_default()),
            Some('A') if !unpadded => out.push_str(weekday_name),
            Some('a') if !unpadded => out.push_str(weekday_name.get(..3).unwrap_or_default()),
            Some('p') if !unpadded => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('%') if !unpadded => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: directive %{}{} is not supported",
                        if unpadded { "-" } else { "" },
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// (year, month 1..=12, day 1..=31) of the day `days` after 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to the given date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `raise_exception(msg)`: HF's way for a template to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {message}"),
    ))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each overridable by keyword.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    // Python's defaults: `", "` / `": "`, and `","` between items when indenting.
    let (item_sep, key_sep) = match separators.filter(|v| !v.is_none()) {
        Some(pair) => {
            let parts: Vec<String> = pair
                .try_iter()?
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid("tojson: `separators` must be two strings"))?;
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => return Err(invalid("tojson: `separators` must be two strings")),
            }
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, &value, &style, 0)?;
    Ok(Value::from(out)) // a plain str, as transformers' (`| e` escapes it)
}

/// An `InvalidOperation` error with `message`.
fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// The formatting options of `json.dumps`.
struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// Writes `value` as Python's `json.dumps` would with `style`.
fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = style.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * level));
        }
    };
    if is_none(value) {
        out.push_str("null");
        return Ok(());
    }
    match value.kind() {
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_json_number(out, value),
        ValueKind::String => {
            write_json_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable if !is_generator(value) => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (k, key) in keys.iter().enumerate() {
                if k > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                match key.kind() {
                    ValueKind::String => {
                        write_json_str(out, key.as_str().unwrap_or_default(), style.ensure_ascii)
                    }
                    // Python writes number and bool keys as strings; null as "null".
                    ValueKind::None => out.push_str("\"null\""),
                    ValueKind::Bool | ValueKind::Number => {
                        out.push('"');
                        let mut scalar = String::new();
                        write_json(&mut scalar, key, style, depth + 1)?;
                        out.push_str(&scalar);
                        out.push('"');
                    }
                    other => {
                        return Err(invalid(format!(
                            "tojson: keys must be str, int, float, bool or None, not {other}"
                        )))
                    }
                }
                out.push_str(&style.key_sep);
                write_json(out, &value.get_item(key)?, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        // Undefined, iterators (jinja2's `map`/`select` give generators), bytes, plain
        // objects, invalid values: Python raises too.
        _ => {
            return Err(invalid(format!(
                "tojson: value of kind {} is not JSON serializable",
                value.kind()
            )))
        }
    }
    Ok(())
}

/// A number as Python's `json.dumps` writes it (`repr` of the int or float).
fn write_json_number(out: &mut String, value: &Value) {
    match f64::try_from(value.clone()) {
        Ok(x) if value.as_i64().is_none() && !value.is_integer() => {
            if x.is_nan() {
                out.push_str("NaN");
            } else if x.is_infinite() {
                out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
            } else {
                out.push_str(&python_float_repr(x));
            }
        }
        _ => {
            let _ = write!(out, "{value}"); // writing to a String cannot fail
        }
    }
}

/// Python's `repr(float)`: the shortest round-tripping digits, in scientific notation
/// when the exponent is < -4 or >= 16, always with a `.0` or an exponent.
fn python_float_repr(x: f64) -> String {
    let sci = format!("{x:e}"); // shortest digits: "d.ddde-5" / "1e16"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.unsigned_abs());
    }
    let plain = format!("{x}");
    if plain.contains('.') {
        plain
    } else {
        format!("{plain}.0")
    }
}

/// A JSON string literal as Python writes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`,
/// other control characters as `\u00XX`; with `ensure_ascii` every non-ASCII character as
/// `\uXXXX` (UTF-16 surrogate pairs above U+FFFF).
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}"); // writing to a String cannot fail
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Binds transformers' globals and filters and Python's value semantics into `env`:
///
/// - `raise_exception`, `strftime_now` (reading `clock`), `tojson`;
/// - output and the `string` filter write values as Python's `str()` does (`True`,
///   `None`, `{'a': [1, 'b']}`);
/// - `escape` / `e` / `forceescape` escape as markupsafe does (`&#34;`, `&#39;`; `/`
///   kept) and give safe strings, which stand for markupsafe's `Markup`; `safe` marks the
///   value's `str()`; `string` and `trim` keep the mark (jinja2's `soft_str`), as
///   minijinja's `upper`, `lower`, `capitalize`, `indent` and `reverse` do;
/// - the functions `a + b` and `a * b` are rewritten to (the `markup` module) and Python's
///   string methods with their `Markup` forms on safe strings;
/// - `length` / `count` are Python's `len()` (undefined has length 0, `None` none);
/// - tests `none`, `iterable`, `sequence` as jinja2's (`None` is not iterable; a dict is a
///   sequence; undefined is both);
/// - `map`, `select`, `reject`, `selectattr`, `rejectattr` give generators, as jinja2's
///   do: iterable, always true, without a length, not JSON serializable.
pub(super) fn install(env: &mut minijinja::Environment<'static>, clock: Clock) {
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", move |format: &str| {
        strftime(format, clock_now(clock))
    });
    env.add_filter("tojson", tojson);
    env.set_formatter(|out, _state, value| {
        let mut text = String::new();
        write_str(&mut text, value);
        out.write_str(&text)
            .map_err(|_| invalid("writing the rendered text failed"))
    });
    env.add_filter("string", |value: &Value| {
        if value.kind() == ValueKind::String && value.is_safe() {
            return value.clone(); // soft_str keeps a Markup
        }
        let mut text = String::new();
        write_str(&mut text, value);
        Value::from(text)
    });
    env.add_filter("safe", |value: &Value| {
        let mut text = String::new();
        write_str(&mut text, value);
        Value::from_safe_string(text)
    });
    env.add_filter("escape", escape);
    env.add_filter("e", escape);
    env.add_filter("forceescape", force_escape);
    env.add_function(super::markup::ADD_FUNCTION, super::markup::markup_add);
    env.add_function(super::markup::MUL_FUNCTION, super::markup::markup_mul);
    env.set_unknown_method_callback(string_method);
    env.add_filter("length", len);
    env.add_filter("count", len);
    env.add_test("none", is_none);
    env.add_test("iterable", |value: &Value| {
        !is_none(value)
            && (value.is_undefined()
                || matches!(
                    value.kind(),
                    ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
                ))
    });
    env.add_test("sequence", |value: &Value| {
        value.is_undefined()
            || matches!(
                value.kind(),
                ValueKind::String | ValueKind::Seq | ValueKind::Map
            )
            || (value.kind() == ValueKind::Iterable && !is_generator(value))
    });
    env.add_filter("trim", |value: &Value, chars: Option<&str>| {
        let mut text = String::new();
        write_str(&mut text, value);
        let trimmed = Value::from(match chars {
            Some(chars) => text.trim_matches(|c| chars.contains(c)).to_owned(),
            None => text.trim().to_owned(),
        });
        keep_safe(
            trimmed,
            value.kind() == ValueKind::String && value.is_safe(),
        )
    });
    env.add_filter(
        "map",
        |state: &minijinja::State<'_, '_>, value: Value, args: minijinja::value::Rest<Value>| {
            if !value.is_true() {
                return Ok(generator(Vec::new())); // jinja2: `if value: for item in value`
            }
            minijinja::filters::map(state, value, args).map(generator)
        },
    );
    env.add_filter("select", select);
    env.add_filter("reject", reject);
    env.add_filter("selectattr", selectattr);
    env.add_filter("rejectattr", rejectattr);
}

/// Python's `None` where transformers passes it for an argument the caller left out
/// (`tools`, `documents`): unlike minijinja's `none`, iterating it or taking its length
/// is an error (jinja2 raises `TypeError`), while `is none` holds and it is false.
pub(super) fn none() -> Value {
    Value::from_object(PyNone)
}

/// See [`none`].
#[derive(Debug)]
struct PyNone;

impl Object for PyNone {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn is_true(self: &Arc<Self>) -> bool {
        false
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("None")
    }
}

/// A jinja2 generator (the result of `map`, `select`, ...): its items, in order.
#[derive(Debug)]
struct Generator(Vec<Value>);

impl Object for Generator {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Iterable
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.clone())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        None // Python: "object of type 'generator' has no len()"
    }

    fn is_true(self: &Arc<Self>) -> bool {
        true // a generator object is always true
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<generator object>")
    }
}

/// Wraps a filter's items as a [`Generator`].
fn generator(items: Vec<Value>) -> Value {
    Value::from_object(Generator(items))
}

/// `select(test, ...)` as a generator.
fn select(
    state: &minijinja::State<'_, '_>,
    value: Value,
    test_name: Option<std::borrow::Cow<'_, str>>,
    args: minijinja::value::Rest<Value>,
) -> Result<Value, Error> {
    if !value.is_true() {
        return Ok(generator(Vec::new())); // jinja2: `if value: for item in value`
    }
    minijinja::filters::select(state, value, test_name, args).map(generator)
}

/// `reject(test, ...)` as a generator.
fn reject(
    state: &minijinja::State<'_, '_>,
    value: Value,
    test_name: Option<std::borrow::Cow<'_, str>>,
    args: minijinja::value::Rest<Value>,
) -> Result<Value, Error> {
    if !value.is_true() {
        return Ok(generator(Vec::new())); // jinja2: `if value: for item in value`
    }
    minijinja::filters::reject(state, value, test_name, args).map(generator)
}

/// `selectattr(attr, test, ...)` as a generator.
fn selectattr(
    state: &minijinja::State<'_, '_>,
    value: Value,
    attr: std::borrow::Cow<'_, str>,
    test_name: Option<std::borrow::Cow<'_, str>>,
    args: minijinja::value::Rest<Value>,
) -> Result<Value, Error> {
    if !value.is_true() {
        return Ok(generator(Vec::new())); // jinja2: `if value: for item in value`
    }
    minijinja::filters::selectattr(state, value, attr, test_name, args).map(generator)
}

/// `rejectattr(attr, test, ...)` as a generator.
fn rejectattr(
    state: &minijinja::State<'_, '_>,
    value: Value,
    attr: std::borrow::Cow<'_, str>,
    test_name: Option<std::borrow::Cow<'_, str>>,
    args: minijinja::value::Rest<Value>,
) -> Result<Value, Error> {
    if !value.is_true() {
        return Ok(generator(Vec::new())); // jinja2: `if value: for item in value`
    }
    minijinja::filters::rejectattr(state, value, attr, test_name, args).map(generator)
}

/// Whether `value` is a [`Generator`]; minijinja's other iterables (slices, `+` of
/// lists) stand for Python lists.
fn is_generator(value: &Value) -> bool {
    value.downcast_object_ref::<Generator>().is_some()
}

/// Whether `value` is Python's `None` (minijinja's or [`PyNone`]).
fn is_none(value: &Value) -> bool {
    value.is_none() || value.downcast_object_ref::<PyNone>().is_some()
}

/// Python's `len()`, with jinja2's `len(Undefined) == 0`.
fn len(value: &Value) -> Result<usize, Error> {
    if value.is_undefined() {
        return Ok(0);
    }
    let sized = matches!(
        value.kind(),
        ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
    ) && !is_generator(value);
    match value.len() {
        Some(n) if sized => Ok(n),
        _ => Err(invalid(format!(
            "object of type {} has no len()",
            python_type_name(value)
        ))),
    }
}

/// The Python type name of `value`, for error messages.
fn python_type_name(value: &Value) -> &'static str {
    if is_none(value) {
        return "'NoneType'";
    }
    match value.kind() {
        ValueKind::Bool => "'bool'",
        ValueKind::Number if value.is_integer() => "'int'",
        ValueKind::Number => "'float'",
        ValueKind::Iterable if is_generator(value) => "'generator'",
        ValueKind::Iterable => "'list'",
        ValueKind::Undefined => "'Undefined'",
        _ => "'object'",
    }
}

/// Writes Python's `str(value)`: a string as is, undefined as nothing, anything else as
/// its `repr()`.
fn write_str(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(value.as_str().unwrap_or_default()),
        _ => write_repr(out, value),
    }
}

/// Writes Python's `repr(value)` for the values a template holds.
fn write_repr(out: &mut String, value: &Value) {
    if is_none(value) {
        out.push_str("None");
        return;
    }
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => write_json_number(out, value),
        ValueKind::String => write_repr_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable if !is_generator(value) => {
            out.push('[');
            for (k, item) in value.try_iter().into_iter().flatten().enumerate() {
                if k > 0 {
                    out.push_str(", ");
                }
                write_repr(out, &item);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (k, key) in value.try_iter().into_iter().flatten().enumerate() {
                if k > 0 {
                    out.push_str(", ");
                }
                write_repr(out, &key);
                out.push_str(": ");
                write_repr(out, &value.get_item(&key).unwrap_or_default());
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}"); // writing to a String cannot fail
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`; backslash
/// escapes for the quote, `\\`, `\n`, `\r`, `\t` and non-printable characters.
fn write_repr_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !is_printable(c) => {
                let code = c as u32;
                let _ = if code < 0x100 {
                    write!(out, "\\x{code:02x}")
                } else if code < 0x10000 {
                    write!(out, "\\u{code:04x}")
                } else {
                    write!(out, "\\U{code:08x}")
                }; // writing to a String cannot fail
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable()` for one character (space counts as printable), for the
/// common non-printable classes: controls, separators other than space, format
/// characters, private use and surrogates.
fn is_printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad
        | 0x1680 | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f
        | 0x3000 | 0xd800..=0xf8ff | 0xfeff | 0xfff9..=0xfffb
        | 0xf0000..=0x10ffff)
}

/// markupsafe's `escape`: `& < > " '` as `&amp; &lt; &gt; &#34; &#39;`; text already
/// marked safe, unchanged; other values as their `str()`.
fn escape(value: &Value) -> Value {
    if value.is_safe() {
        return value.clone();
    }
    force_escape(value)
}

/// jinja2's `forceescape`: [`escape`] of the value's `str()`, even when it is marked safe.
fn force_escape(value: &Value) -> Value {
    let mut text = String::new();
    write_str(&mut text, value);
    Value::from_safe_string(escape_html(&text))
}

/// markupsafe's escaping of a plain string: `& < > " '` as `&amp; &lt; &gt; &#34; &#39;`.
pub(super) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `value` marked safe when `safe` (a string, or each string of a list), as markupsafe's
/// `Markup` methods return `Markup` values.
fn keep_safe(value: Value, safe: bool) -> Value {
    if !safe {
        return value;
    }
    match value.kind() {
        ValueKind::String => Value::from_safe_string(value.as_str().unwrap_or_default().to_owned()),
        ValueKind::Seq => value
            .try_iter()
            .into_iter()
            .flatten()
            .map(|item| keep_safe(item, true))
            .collect(),
        _ => value,
    }
}

/// Python's string methods (minijinja-contrib's pycompat), with markupsafe's `Markup`
/// versions on a safe string: `upper`, `lower`, `strip`, `lstrip`, `rstrip`, `title`,
/// `capitalize`, `split`, `splitlines` return `Markup`; `replace`, `format` and `join`
/// also escape the plain-str text they insert.
fn string_method(
    state: &minijinja::State<'_, '_>,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let call = minijinja_contrib::pycompat::unknown_method_callback;
    if value.kind() != ValueKind::String || !value.is_safe() {
        return call(state, value, method, args);
    }
    let escape_str = |v: &Value| match v.kind() {
        ValueKind::String => escape(v),
        _ => v.clone(),
    };
    match method {
        "upper" | "lower" | "strip" | "lstrip" | "rstrip" | "title" | "capitalize" | "split"
        | "splitlines" => Ok(keep_safe(call(state, value, method, args)?, true)),
        "replace" => {
            let args: Vec<Value> = (0..)
                .zip(args)
                .map(|(k, v)| if k == 1 { escape_str(v) } else { v.clone() })
                .collect();
            Ok(keep_safe(call(state, value, method, &args)?, true))
        }
        "format" => {
            let args: Vec<Value> = args.iter().map(escape_str).collect();
            Ok(keep_safe(call(state, value, method, &args)?, true))
        }
        "join" => {
            let args: Vec<Value> = args
                .iter()
                .map(|items| match items.kind() {
                    ValueKind::Seq | ValueKind::Iterable => items
                        .try_iter()
                        .into_iter()
                        .flatten()
                        .map(|item| escape_str(&item))
                        .collect(),
                    _ => items.clone(),
                })
                .collect();
            Ok(keep_safe(call(state, value, method, &args)?, true))
        }
        _ => call(state, value, method, args),
    }
}
