//! markupsafe's `Markup` arithmetic for [`super::ChatTemplate`]: in Python jinja2 a string
//! marked safe (`'x'|safe`, `|escape`, `|forceescape`) is a `markupsafe.Markup`, and even
//! with autoescape off (as transformers renders) its operators escape the plain-str side:
//!
//! ```text
//!   "'"|safe + name + '"'      Markup("'") + "a<b" + '"'  →  'a&lt;b&#34;   (a Markup)
//!   "<"|safe * 2 + "&"         Markup("<<") + "&"         →  <<&amp;
//!   "<"|safe ~ "&"             str_join: plain str         →  <&           (no escaping)
//! ```
//!
//! minijinja's `+` and `*` have no hook (they concatenate and drop the safe mark), so the
//! template source is rewritten before it is compiled: every `a + b` becomes
//! `__brigade_markup_add(a, b)` and every `a * b` `__brigade_markup_mul(a, b)`, functions
//! that apply markupsafe's rule when an operand is a safe string and minijinja's own
//! operator otherwise (same results and errors as before for numbers, lists and plain
//! strings).
//!
//! The operands' source ranges come from the parsed template (minijinja's `machinery`
//! parser, the same one `add_template` runs): the union of the spans of an operand's nodes,
//! widened over the parentheses that enclose it. Only the bytes of `+` / `*` tokens change
//! and the call's `name(` / `)` are inserted, so every other byte (whitespace control, raw
//! text) is kept. A source that does not parse is left as is, so compiling it reports the
//! parse error at the author's line and column.
//!
//! Owns the rewrite and the two operator functions only; the filters and methods that make
//! or keep `Markup` values are in the `python` module.

use std::sync::OnceLock;

use minijinja::machinery::ast::{self, BinOpKind, CallArg, Expr, Stmt};
use minijinja::machinery::{parse, tokenize, Token, WhitespaceConfig};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, Value};

/// The function `a + b` is rewritten to.
pub(super) const ADD_FUNCTION: &str = "__brigade_markup_add";
/// The function `a * b` is rewritten to.
pub(super) const MUL_FUNCTION: &str = "__brigade_markup_mul";

/// One operator to turn into a call: the operator token's byte range and the operands'
/// outer range (parentheses included).
#[derive(Debug, Clone, Copy)]
struct Rewrite {
    function: &'static str,
    start: usize,
    op_start: usize,
    op_len: usize,
    end: usize,
}

/// `source` with every `+` and `*` operation written as a call to [`ADD_FUNCTION`] /
/// [`MUL_FUNCTION`] (see the module docs); unchanged when it does not parse, or (never
/// seen; logged) when an operator's operands are not laid out as the parser describes.
pub(super) fn rewrite_operators(source: &str) -> String {
    let whitespace = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    let Ok(template) = parse(source, "chat_template", SyntaxConfig::default(), whitespace) else {
        return source.to_owned();
    };
    let tokens: Result<Vec<Tok>, Error> =
        tokenize(source, false, SyntaxConfig::default(), whitespace)
            .map(|token| {
                token.map(|(token, span)| Tok {
                    kind: match token {
                        Token::ParenOpen => Kind::Open,
                        Token::ParenClose => Kind::Close,
                        Token::Plus => Kind::Plus,
                        Token::Mul => Kind::Mul,
                        _ => Kind::Other,
                    },
                    start: span.start_offset as usize,
                    end: span.end_offset as usize,
                })
            })
            .collect();
    let Ok(tokens) = tokens else {
        return source.to_owned();
    };
    let mut rewrites = Vec::new();
    let mut collector = Collector {
        tokens: &tokens,
        rewrites: &mut rewrites,
        failed: false,
    };
    collector.stmt(&template);
    if collector.failed {
        tracing::warn!(
            "chat template: an operator's operands could not be located; `+` and `*` \
             follow minijinja (no markupsafe escaping)"
        );
        return source.to_owned();
    }
    apply(source, &rewrites)
}

/// What [`locate`] needs to know of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Open,
    Close,
    Plus,
    Mul,
    Other,
}

/// A token of the template: its kind and byte range.
#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Writes `source` with `rewrites` applied.
fn apply(source: &str, rewrites: &[Rewrite]) -> String {
    // Edits at one offset: closers first (the innermost first), then an operator, then
    // openers (the outermost first). Nested operations share an offset only that way.
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Edit {
        Close(std::cmp::Reverse<usize>),
        Op(usize),
        Open(std::cmp::Reverse<usize>, &'static str),
    }
    let mut edits: Vec<(usize, Edit)> = Vec::with_capacity(3 * rewrites.len());
    for r in rewrites {
        edits.push((r.end, Edit::Close(std::cmp::Reverse(r.start))));
        edits.push((r.op_start, Edit::Op(r.op_len)));
        edits.push((r.start, Edit::Open(std::cmp::Reverse(r.end), r.function)));
    }
    edits.sort();
    let mut out = String::with_capacity(source.len() + 24 * rewrites.len());
    let mut at = 0;
    for (offset, edit) in edits {
        out.push_str(source.get(at..offset).unwrap_or_default());
        at = offset;
        match edit {
            Edit::Close(_) => out.push(')'),
            Edit::Op(len) => {
                out.push(',');
                at = offset + len;
            }
            Edit::Open(_, function) => {
                out.push_str(function);
                out.push('(');
            }
        }
    }
    out.push_str(source.get(at..).unwrap_or_default());
    out
}

/// Walks a parsed template and records a [`Rewrite`] for each `+` and `*`.
struct Collector<'s, 'r> {
    /// The template's tokens, in order.
    tokens: &'s [Tok],
    rewrites: &'r mut Vec<Rewrite>,
    /// An operator whose operands could not be located.
    failed: bool,
}

impl Collector<'_, '_> {
    fn stmts(&mut self, stmts: &[Stmt<'_>]) {
        for stmt in stmts {
            self.stmt(stmt);
        }
    }

    fn stmt(&mut self, stmt: &Stmt<'_>) {
        match stmt {
            Stmt::Template(t) => self.stmts(&t.children),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::ForLoop(f) => {
                self.expr(&f.target);
                self.expr(&f.iter);
                if let Some(filter) = &f.filter_expr {
                    self.expr(filter);
                }
                self.stmts(&f.body);
                self.stmts(&f.else_body);
            }
            Stmt::IfCond(i) => {
                self.expr(&i.expr);
                self.stmts(&i.true_body);
                self.stmts(&i.false_body);
            }
            Stmt::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    self.expr(target);
                    self.expr(value);
                }
                self.stmts(&w.body);
            }
            Stmt::Set(s) => {
                self.expr(&s.target);
                self.expr(&s.expr);
            }
            Stmt::SetBlock(s) => {
                self.expr(&s.target);
                if let Some(filter) = &s.filter {
                    self.expr(filter);
                }
                self.stmts(&s.body);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.stmts(&a.body);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.stmts(&f.body);
            }
            Stmt::Block(b) => self.stmts(&b.body),
            Stmt::Import(i) => {
                self.expr(&i.expr);
                self.expr(&i.name);
            }
            Stmt::FromImport(i) => {
                self.expr(&i.expr);
                for (name, alias) in &i.names {
                    self.expr(name);
                    if let Some(alias) = alias {
                        self.expr(alias);
                    }
                }
            }
            Stmt::Extends(e) => self.expr(&e.name),
            Stmt::Include(i) => self.expr(&i.name),
            Stmt::Macro(m) => self.macro_decl(m),
            Stmt::CallBlock(c) => {
                self.call(&c.call);
                self.macro_decl(&c.macro_decl);
            }
            Stmt::Do(d) => self.call(&d.call),
        }
    }

    fn macro_decl(&mut self, m: &ast::Macro<'_>) {
        for e in m.args.iter().chain(&m.defaults) {
            self.expr(e);
        }
        self.stmts(&m.body);
    }

    fn call(&mut self, call: &ast::Call<'_>) {
        self.expr(&call.expr);
        self.args(&call.args);
    }

    fn args(&mut self, args: &[CallArg<'_>]) {
        for arg in args {
            match arg {
                CallArg::Pos(e)
                | CallArg::Kwarg(_, e)
                | CallArg::PosSplat(e)
                | CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    fn expr(&mut self, expr: &Expr<'_>) {
        for child in children(expr) {
            self.expr(child);
        }
        if let Expr::BinOp(b) = expr {
            let (function, op) = match b.op {
                BinOpKind::Add => (ADD_FUNCTION, Kind::Plus),
                BinOpKind::Mul => (MUL_FUNCTION, Kind::Mul),
                _ => return,
            };
            match locate(self.tokens, &b.left, &b.right, op) {
                Some((start, op_start, end)) => self.rewrites.push(Rewrite {
                    function,
                    start,
                    op_start,
                    op_len: 1,
                    end,
                }),
                None => self.failed = true,
            }
        }
    }
}

/// The direct sub-expressions of `expr`.
fn children<'e, 'a>(expr: &'e Expr<'a>) -> Vec<&'e Expr<'a>> {
    fn arg<'e, 'a>(a: &'e CallArg<'a>) -> &'e Expr<'a> {
        match a {
            CallArg::Pos(e)
            | CallArg::Kwarg(_, e)
            | CallArg::PosSplat(e)
            | CallArg::KwargSplat(e) => e,
        }
    }
    match expr {
        Expr::Var(_) | Expr::Const(_) => Vec::new(),
        Expr::Slice(s) => std::iter::once(&s.expr)
            .chain(s.start.as_ref())
            .chain(s.stop.as_ref())
            .chain(s.step.as_ref())
            .collect(),
        Expr::UnaryOp(u) => vec![&u.expr],
        Expr::BinOp(b) => vec![&b.left, &b.right],
        Expr::Compare(c) => std::iter::once(&c.expr)
            .chain(c.ops.iter().map(|op| &op.expr))
            .collect(),
        Expr::IfExpr(i) => [&i.test_expr, &i.true_expr]
            .into_iter()
            .chain(i.false_expr.as_ref())
            .collect(),
        Expr::Filter(f) => f.expr.iter().chain(f.args.iter().map(arg)).collect(),
        Expr::Test(t) => std::iter::once(&t.expr)
            .chain(t.args.iter().map(arg))
            .collect(),
        Expr::GetAttr(g) => vec![&g.expr],
        Expr::GetItem(g) => vec![&g.expr, &g.subscript_expr],
        Expr::Call(c) => std::iter::once(&c.expr)
            .chain(c.args.iter().map(arg))
            .collect(),
        Expr::List(l) => l.items.iter().collect(),
        Expr::Map(m) => m.keys.iter().chain(&m.values).collect(),
    }
}

/// The node's own span.
fn own_span(expr: &Expr<'_>) -> minijinja::machinery::Span {
    match expr {
        Expr::Var(s) => s.span(),
        Expr::Const(s) => s.span(),
        Expr::Slice(s) => s.span(),
        Expr::UnaryOp(s) => s.span(),
        Expr::BinOp(s) => s.span(),
        Expr::Compare(s) => s.span(),
        Expr::IfExpr(s) => s.span(),
        Expr::Filter(s) => s.span(),
        Expr::Test(s) => s.span(),
        Expr::GetAttr(s) => s.span(),
        Expr::GetItem(s) => s.span(),
        Expr::Call(s) => s.span(),
        Expr::List(s) => s.span(),
        Expr::Map(s) => s.span(),
    }
}

/// The byte range of `expr`'s tokens (parentheses around it excluded): the union of its
/// nodes' spans (a filter's span starts at its name, so the union is needed).
fn extent(expr: &Expr<'_>) -> (usize, usize) {
    let span = own_span(expr);
    let (mut start, mut end) = (span.start_offset as usize, span.end_offset as usize);
    for child in children(expr) {
        let (s, e) = extent(child);
        start = start.min(s);
        end = end.max(e);
    }
    (start, end)
}

/// For `left op right`: (start of the left operand with its parentheses, offset of the
/// operator, end of the right operand with its parentheses). Between the operands' tokens
/// only the left operand's `)`, the operator and the right operand's `(` lie. An operand
/// is the shortest balanced run of tokens that covers its [`extent`] (a span may begin at
/// the `(` before its node, as an `if` expression's does).
fn locate(
    tokens: &[Tok],
    left: &Expr<'_>,
    right: &Expr<'_>,
    op: Kind,
) -> Option<(usize, usize, usize)> {
    let (left_start, left_end) = extent(left);
    let (right_start, right_end) = extent(right);
    // The operator: the first token at or after the left operand's end, past its `)`s.
    let mut at = tokens.partition_point(|t| t.start < left_end);
    while tokens.get(at)?.kind == Kind::Close {
        at += 1;
    }
    let op_token = *tokens.get(at)?;
    if op_token.kind != op || op_token.end > right_start {
        return None;
    }
    // Backwards from the operator to the left operand's first token, balancing parentheses.
    let mut depth = 0usize;
    let mut start = None;
    for t in tokens.get(..at)?.iter().rev() {
        match t.kind {
            Kind::Close => depth += 1,
            Kind::Open => depth = depth.checked_sub(1)?,
            _ => {}
        }
        if depth == 0 && t.start <= left_start {
            start = Some(t.start);
            break;
        }
    }
    // Forwards from the operator to the right operand's last token.
    let mut depth = 0usize;
    let mut end = None;
    for t in tokens.get(at + 1..)? {
        match t.kind {
            Kind::Open => depth += 1,
            Kind::Close => depth = depth.checked_sub(1)?,
            _ => {}
        }
        if depth == 0 && t.end >= right_end {
            end = Some(t.end);
            break;
        }
    }
    Some((start?, op_token.start, end?))
}

/// markupsafe's `escape` of a string operand (a safe one is kept).
fn escaped(value: &Value) -> String {
    let text = value.as_str().unwrap_or_default();
    if value.is_safe() {
        return text.to_owned();
    }
    super::python::escape_html(text)
}

/// `a + b`: markupsafe's `Markup.__add__` / `__radd__` when a string operand is safe (the
/// other string is escaped; the result is safe), else minijinja's `+`.
pub(super) fn markup_add(a: Value, b: Value) -> Result<Value, Error> {
    let is_str = |v: &Value| v.kind() == ValueKind::String;
    let (Some(left), Some(right)) = (
        a.as_str().filter(|_| is_str(&a)),
        b.as_str().filter(|_| is_str(&b)),
    ) else {
        return minijinja_op(Op::Add, a, b);
    };
    if !a.is_safe() && !b.is_safe() {
        return Ok(Value::from([left, right].concat())); // what minijinja's `+` does
    }
    let mut out = escaped(&a);
    out.push_str(&escaped(&b));
    Ok(Value::from_safe_string(out))
}

/// `a * b`: a safe string repeated stays safe (`Markup.__mul__`); otherwise minijinja's `*`.
pub(super) fn markup_mul(a: Value, b: Value) -> Result<Value, Error> {
    let safe = [&a, &b]
        .iter()
        .any(|v| v.kind() == ValueKind::String && v.is_safe());
    let product = minijinja_op(Op::Mul, a, b)?;
    Ok(match product.as_str() {
        Some(text) if safe => Value::from_safe_string(text.to_owned()),
        _ => product,
    })
}

/// The operators evaluated by minijinja itself.
#[derive(Clone, Copy)]
enum Op {
    Add,
    Mul,
}

/// minijinja's own `a + b` / `a * b` (an expression compiled once in a bare environment:
/// the operators do not depend on the environment's settings).
fn minijinja_op(op: Op, a: Value, b: Value) -> Result<Value, Error> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    static EXPRESSIONS: OnceLock<[Option<minijinja::Expression<'static, 'static>>; 2]> =
        OnceLock::new();
    let env = ENV.get_or_init(Environment::empty);
    let expressions = EXPRESSIONS.get_or_init(|| {
        [
            env.compile_expression("a + b").ok(),
            env.compile_expression("a * b").ok(),
        ]
    });
    let expression = match op {
        Op::Add => &expressions[0],
        Op::Mul => &expressions[1],
    };
    let expression = expression.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidOperation,
            "internal error: minijinja rejected the expression `a + b`",
        )
    })?;
    expression.eval(minijinja::context! { a => a, b => b })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_become_calls_and_nothing_else_changes() {
        let cases = [
            ("{{ a + b }}", "{{ __brigade_markup_add(a , b) }}"),
            (
                "{{- a + b + c -}}",
                "{{- __brigade_markup_add(__brigade_markup_add(a , b) , c) -}}",
            ),
            (
                "{{ (a + b) + (c) }}",
                "{{ __brigade_markup_add((__brigade_markup_add(a , b)) , (c)) }}",
            ),
            (
                "{{ 'x'|safe + t | tojson() }}",
                "{{ __brigade_markup_add('x'|safe , t | tojson()) }}",
            ),
            (
                "{{ a * 2 + b ~ c }}",
                "{{ __brigade_markup_add(__brigade_markup_mul(a , 2) , b ~ c) }}",
            ),
            (
                "{% set x = f(a+(b)) %}{% if a - b %}{{ a ** 2 }}{% endif %}",
                "{% set x = f(__brigade_markup_add(a,(b))) %}{% if a - b %}{{ a ** 2 }}{% endif %}",
            ),
            (
                "{{ ('<'|safe if x else 'a') + ('&' if y else z) }}",
                "{{ __brigade_markup_add(('<'|safe if x else 'a') , ('&' if y else z)) }}",
            ),
            (
                "{{ [a, (b)] + c + '(' }}",
                "{{ __brigade_markup_add(__brigade_markup_add([a, (b)] , c) , '(') }}",
            ),
            (
                "{% for m in ms + [1] if m %}\n  {{ -m + 1 if m else 2 * -m }}\n{% endfor %}",
                "{% for m in __brigade_markup_add(ms , [1]) if m %}\n  {{ __brigade_markup_add(-m , 1) if m else __brigade_markup_mul(2 , -m) }}\n{% endfor %}",
            ),
            ("{{ a + }}", "{{ a + }}"),
        ];
        for (source, want) in cases {
            assert_eq!(rewrite_operators(source), want, "{source}");
        }
    }
}
