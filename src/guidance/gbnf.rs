//! llama.cpp's GBNF grammars, translated to llguidance's Lark dialect (which
//! has no `::=` rules): each rule becomes a Lark rule, string literals become
//! Lark strings, character classes and `.` become regular expressions, and
//! `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` carry over. `root` is the start rule.
//!
//! Syntax as llama.cpp's `grammars/README.md` gives it: `name ::= alternatives`
//! (names of letters, digits and `-`), `|`, `( … )`, `"literal"`, `[a-z]`,
//! `[^…]`, `.`, escapes `\n \r \t \\ \" \[ \] \- \xHH \uHHHH \UHHHHHHHH`, and
//! `#` comments. A rule's body runs until the next `name ::=`.

use std::collections::HashMap;
use std::fmt::Write;

/// A GBNF token.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Define,
    Literal(String),
    /// A regular expression (character class or `.`).
    Regex(String),
    LParen,
    RParen,
    Bar,
    /// `*`, `+`, `?` or `{m,n}`, written out in Lark.
    Postfix(String),
}

/// Translates a GBNF grammar into Lark; the error says what and where.
pub(crate) fn to_lark(src: &str) -> Result<String, String> {
    let toks = lex(src)?;
    // Split into rules: a rule starts at `Name Define`.
    let mut rules: Vec<(String, Vec<Tok>)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match (&toks[i], toks.get(i + 1)) {
            (Tok::Name(n), Some(Tok::Define)) => {
                rules.push((n.clone(), Vec::new()));
                i += 2;
            }
            (t, _) => match rules.last_mut() {
                Some((_, body)) => {
                    body.push(t.clone());
                    i += 1;
                }
                None => return Err("a GBNF grammar must start with a rule (`name ::= ...`)".into()),
            },
        }
    }
    if rules.is_empty() {
        return Err("the grammar has no rules".into());
    }
    let mut names: HashMap<String, String> = HashMap::new();
    for (k, (n, _)) in rules.iter().enumerate() {
        let clean: String = n
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        if names.insert(n.clone(), format!("r{k}_{clean}")).is_some() {
            return Err(format!("rule `{n}` is defined twice"));
        }
    }
    let root = names.get("root").ok_or("the grammar has no `root` rule")?;
    let mut out = format!("start: {root}\n");
    for (n, body) in &rules {
        if body.is_empty() {
            return Err(format!("rule `{n}` is empty"));
        }
        let _ = write!(out, "{}:", names[n]);
        let mut depth = 0usize;
        let mut prev_operand = false;
        for t in body {
            match t {
                Tok::Name(r) => {
                    let m = names
                        .get(r)
                        .ok_or_else(|| format!("rule `{n}` refers to undefined rule `{r}`"))?;
                    let _ = write!(out, " {m}");
                    prev_operand = true;
                }
                Tok::Literal(s) => {
                    if s.is_empty() {
                        out.push_str(" \"\"");
                    } else {
                        let _ = write!(
                            out,
                            " {}",
                            serde_json::to_string(s).map_err(|e| e.to_string())?
                        );
                    }
                    prev_operand = true;
                }
                Tok::Regex(r) => {
                    let _ = write!(out, " /{r}/");
                    prev_operand = true;
                }
                Tok::LParen => {
                    depth += 1;
                    out.push_str(" (");
                    prev_operand = false;
                }
                Tok::RParen => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| format!("rule `{n}`: unbalanced `)`"))?;
                    out.push_str(" )");
                    prev_operand = true;
                }
                Tok::Bar => {
                    out.push_str(" |");
                    prev_operand = false;
                }
                Tok::Postfix(p) => {
                    if !prev_operand {
                        return Err(format!("rule `{n}`: `{p}` follows nothing"));
                    }
                    out.push_str(p);
                }
                Tok::Define => return Err(format!("rule `{n}`: unexpected `::=`")),
            }
        }
        if depth != 0 {
            return Err(format!("rule `{n}`: unbalanced `(`"));
        }
        out.push('\n');
    }
    Ok(out)
}

/// One escaped character after `\` at `chars[*i]` (the backslash already taken).
fn escape(chars: &[char], i: &mut usize) -> Result<char, String> {
    let c = *chars
        .get(*i)
        .ok_or("unfinished escape at the end of the grammar")?;
    *i += 1;
    let hex = |i: &mut usize, n: usize| -> Result<char, String> {
        let s: String = chars
            .get(*i..*i + n)
            .ok_or("unfinished \\x/\\u escape")?
            .iter()
            .collect();
        *i += n;
        u32::from_str_radix(&s, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| format!("bad escape `{s}`"))
    };
    Ok(match c {
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        'x' => hex(i, 2)?,
        'u' => hex(i, 4)?,
        'U' => hex(i, 8)?,
        '\\' | '"' | '[' | ']' | '-' | '^' => c,
        other => return Err(format!("unknown escape `\\{other}`")),
    })
}

/// A character as it may appear inside a regex character class.
fn class_char(c: char) -> String {
    if c.is_ascii_alphanumeric() {
        c.to_string()
    } else {
        format!("\\x{{{:x}}}", c as u32)
    }
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ':' if chars.get(i + 1) == Some(&':') && chars.get(i + 2) == Some(&'=') => {
                out.push(Tok::Define);
                i += 3;
            }
            '|' => {
                out.push(Tok::Bar);
                i += 1;
            }
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            '*' | '+' | '?' => {
                out.push(Tok::Postfix(c.to_string()));
                i += 1;
            }
            '.' => {
                out.push(Tok::Regex("(?s:.)".into()));
                i += 1;
            }
            '{' => {
                let end = chars[i..]
                    .iter()
                    .position(|&x| x == '}')
                    .ok_or("unclosed `{` repetition")?
                    + i;
                let inner: String = chars[i + 1..end]
                    .iter()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                let num = |s: &str| {
                    s.parse::<u32>()
                        .map_err(|_| format!("bad repetition `{{{inner}}}`"))
                };
                let p = match inner.split_once(',') {
                    None => {
                        let m = num(&inner)?;
                        format!("{{{m},{m}}}")
                    }
                    Some((a, "")) => format!("{{{},}}", num(a)?),
                    Some(("", b)) => format!("{{0,{}}}", num(b)?),
                    Some((a, b)) => {
                        let (a, b) = (num(a)?, num(b)?);
                        if a > b {
                            return Err(format!("bad repetition `{{{inner}}}`"));
                        }
                        format!("{{{a},{b}}}")
                    }
                };
                out.push(Tok::Postfix(p));
                i = end + 1;
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    let c = *chars.get(i).ok_or("unterminated string literal")?;
                    i += 1;
                    match c {
                        '"' => break,
                        '\\' => s.push(escape(&chars, &mut i)?),
                        _ => s.push(c),
                    }
                }
                out.push(Tok::Literal(s));
            }
            '[' => {
                i += 1;
                let mut re = String::from("[");
                if chars.get(i) == Some(&'^') {
                    re.push('^');
                    i += 1;
                }
                let mut any = false;
                loop {
                    let c = *chars.get(i).ok_or("unterminated character class")?;
                    i += 1;
                    if c == ']' {
                        break;
                    }
                    let lo = if c == '\\' {
                        escape(&chars, &mut i)?
                    } else {
                        c
                    };
                    re.push_str(&class_char(lo));
                    any = true;
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&n| n != ']') {
                        i += 1;
                        let c2 = chars[i];
                        i += 1;
                        let hi = if c2 == '\\' {
                            escape(&chars, &mut i)?
                        } else {
                            c2
                        };
                        if hi < lo {
                            return Err(format!("empty character range `{lo}-{hi}`"));
                        }
                        re.push('-');
                        re.push_str(&class_char(hi));
                    }
                }
                if !any {
                    return Err("empty character class `[]`".into());
                }
                re.push(']');
                out.push(Tok::Regex(re));
            }
            _ if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '-' || chars[i] == '_')
                {
                    i += 1;
                }
                out.push(Tok::Name(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected character `{other}` in the grammar")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::to_lark;

    #[test]
    fn translates_rules_literals_classes_and_repetition() {
        let g = "root ::= item-list # a comment\nitem-list ::= \"[\" ( [a-z0-9] | \"\\n\" )+ \"]\" x{2,3}\nx ::= [^\"\\\\] | .";
        let l = to_lark(g).unwrap();
        assert_eq!(
            l,
            "start: r0_root\nr0_root: r1_item_list\nr1_item_list: \"[\" ( /[a-z0-9]/ | \"\\n\" )+ \"]\" r2_x{2,3}\nr2_x: /[^\\x{22}\\x{5c}]/ | /(?s:.)/\n"
        );
    }

    #[test]
    fn refuses_broken_grammars_with_a_reason() {
        for (g, want) in [
            ("root ::= foo", "undefined rule `foo`"),
            ("item ::= \"a\"", "no `root` rule"),
            ("root ::= \"a", "unterminated string"),
            ("root ::= [a-", "unterminated character class"),
            ("root ::= ( \"a\"", "unbalanced `(`"),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
            ("\"a\" root ::= \"b\"", "must start with a rule"),
            ("root ::= * \"a\"", "follows nothing"),
            ("root ::= \"a\"{3,1}", "bad repetition"),
        ] {
            let e = to_lark(g).unwrap_err();
            assert!(e.contains(want), "{g:?}: {e}");
        }
    }
}
