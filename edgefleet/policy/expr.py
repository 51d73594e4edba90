"""The rule expression language: a tokenizer, a Pratt parser, and closures compiled once.

Nothing here calls eval, exec or the `ast` module, and nothing resolves a name to a Python
object: a name is a metric or one of a fixed set of functions, and evaluation only ever
sees floats, booleans and None.

Grammar, loosest binding first (every binary operator is left-associative):

    expr     := expr "or" expr | expr "and" expr | "not" expr
              | sum (CMP sum)?                  -- CMP: < <= > >= == != ; never chained
    sum      := sum ("+" | "-") sum | sum ("*" | "/") sum | "-" sum | primary
    primary  := NUMBER | METRIC | call | "(" expr ")"
    call     := ("avg" | "min" | "max" | "count" | "delta") "(" METRIC "," DURATION ")"
              | ("last" | "age") "(" METRIC ")"
              | "abs" "(" sum ")"

Tokens: NUMBER is `[0-9]+(.[0-9]+)?([eE][+-]?[0-9]+)?`; DURATION is a policy's duration
(edgefleet.runtime.durations: ms, s, m or h, as in 500ms, 30s, 5m, 1h) and is only allowed
as a window argument.
METRIC is `[A-Za-z_][A-Za-z0-9_.]*`: dots belong to the name (`disk.root`), '-' is always
the minus operator (`a-b` is a minus b), '__' and Python keywords are refused, and the
function names are reserved. A bare metric means its latest value.

Missing data: a metric never read, an empty window, or division by zero gives None. None
in arithmetic, a comparison, `abs`, unary minus or `not` gives None. `and` is True only
when both sides are True and `or` when either is; None counts as false there, so both
always give a bool. `count` of an empty window is 0. `delta` is last minus first value in
the window (0 with one reading). The engine treats a None condition as "does not hold".
"""

from __future__ import annotations

import difflib
import keyword
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from edgefleet.errors import EdgefleetError
from edgefleet.runtime.durations import DURATION_UNITS, POLICY_UNITS, unit_names

MAX_EXPR_CHARS: Final = 1000  # a condition is a sentence, not a program; bounds parse time
MAX_NESTING: Final = 32  # parser recursion and closure call depth stay far below Python's limit
MAX_WINDOW_S: Final = 86400.0  # the engine keeps every reading of a window in memory
WINDOW_FUNCTIONS: Final = frozenset({"avg", "min", "max", "count", "delta"})
LATEST_FUNCTIONS: Final = frozenset({"last", "age"})
FUNCTIONS: Final = WINDOW_FUNCTIONS | LATEST_FUNCTIONS | {"abs"}

Value = float | bool | None
Kind = Literal["number", "condition", "duration"]


class ExprError(EdgefleetError, ValueError):
    """An expression that does not parse; `line` and `col` are 1-based, in the policy file."""

    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(f"line {line}, column {col}: {message}")
        self.message = message
        self.line = line
        self.col = col


class Env(Protocol):
    """What an expression reads: the engine's recent readings and its clock."""

    def latest(self, metric: str) -> tuple[float, float] | None:
        """(ts, value) of the newest reading, or None if there is none."""

    def window(self, metric: str, seconds: float) -> Sequence[tuple[float, float]]:
        """(ts, value) readings with ts in [now - seconds, now], oldest first."""

    def now(self) -> float: ...


# --- syntax tree ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Num:
    value: float
    pos: int


@dataclass(frozen=True, slots=True)
class Duration:
    seconds: float
    text: str
    pos: int


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    pos: int


@dataclass(frozen=True, slots=True)
class Call:
    fn: str
    args: tuple[Node, ...]
    pos: int
    depth: int


@dataclass(frozen=True, slots=True)
class Unary:
    op: str
    operand: Node
    pos: int
    depth: int


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    left: Node
    right: Node
    pos: int
    depth: int


Node = Num | Duration | Metric | Call | Unary | Binary
Fn = Callable[[Env], Value]


@dataclass(frozen=True, slots=True)
class Expr:
    """A parsed expression; `evaluate` never raises on data (it gives None instead)."""

    source: str
    kind: Literal["number", "condition"]
    metrics: frozenset[str]
    windows: frozenset[tuple[str, float]]  # (metric, seconds) the engine must keep
    longest_window: float
    tree: Node = field(repr=False, compare=False)
    _fn: Fn = field(repr=False, compare=False)

    @property
    def is_condition(self) -> bool:
        return self.kind == "condition"

    def evaluate(self, env: Env) -> Value:
        try:
            return self._fn(env)
        except (ArithmeticError, TypeError, ValueError, IndexError):
            return None  # an Env handing over odd values (a str, an int overflow) is data, not a bug here


def parse(source: str, *, metrics: Iterable[str] | None = None, line: int = 1, col: int = 1) -> Expr:
    """Parse and type-check `source`; `line`/`col` is where it starts in the policy file."""
    parser = _Parser(source, None if metrics is None else frozenset(metrics), line, col)
    tree = parser.parse()
    kind = _kind(tree)
    assert kind != "duration"  # the parser refuses a bare duration
    found: set[str] = set()
    windows: set[tuple[str, float]] = set()
    _collect(tree, found, windows)
    return Expr(
        source=source, kind=kind, metrics=frozenset(found), windows=frozenset(windows),
        longest_window=max((s for _, s in windows), default=0.0), tree=tree, _fn=_compile(tree),
    )


# --- tokenizer -----------------------------------------------------------------------------

_SPACE: Final = re.compile(r"\s*")
_NUMBER: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_UNIT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_OPS: Final = frozenset({"and", "or", "not"})
_OPS: Final = ("<=", ">=", "==", "!=", "<", ">", "+", "-", "*", "/", "(", ")", ",")
_NO_PYTHON: Final = "an expression cannot reach Python"
# Checked before _OPS, so '**' is refused rather than read as two '*'.
_REFUSED: Final = {
    "**": "'**' is not allowed: the rule language has no power operator",
    "&&": "'&&' is not allowed: use 'and'",
    "||": "'||' is not allowed: use 'or'",
    "[": "'[' is not allowed: the rule language has no lists or indexing",
    "]": "']' is not allowed: the rule language has no lists or indexing",
    "'": "strings are not allowed in an expression",
    '"': "strings are not allowed in an expression",
    ".": "'.' is not allowed here: there is no attribute access ('.' only appears inside a metric name)",
    "=": "'=' is not allowed: compare with '=='",
    "!": "'!' is not allowed: use 'not' or '!='",
    ":": "':' is not allowed: the rule language has no lambdas, slices or dicts",
    "{": "'{' is not allowed: the rule language has no dicts or sets",
    "}": "'}' is not allowed: the rule language has no dicts or sets",
    "&": "'&' is not allowed: use 'and'",
    "|": "'|' is not allowed: use 'or'",
}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["num", "dur", "name", "op", "end"]
    text: str
    pos: int
    value: float = 0.0


def _tokens(src: str, error: Callable[[str, int], ExprError]) -> Iterator[_Token]:
    pos = 0
    while True:
        pos = _SPACE.match(src, pos).end()  # type: ignore[union-attr]  # `\s*` always matches
        if pos >= len(src):
            yield _Token("end", "end of expression", pos)
            return
        if number := _NUMBER.match(src, pos):
            unit = _UNIT.match(src, number.end())
            if unit is None:
                yield _Token("num", number[0], pos, float(number[0]))
            elif unit[0] in POLICY_UNITS:
                text = number[0] + unit[0]
                yield _Token("dur", text, pos, float(number[0]) * DURATION_UNITS[unit[0]])
            else:
                raise error(f"{number[0] + unit[0]!r} is not a number or a duration: durations end in "
                            f"{unit_names(POLICY_UNITS)}", pos)
            pos = (unit or number).end()
        elif word := _WORD.match(src, pos):
            yield _word_token(word[0], pos, error)
            pos = word.end()
        else:
            two = src[pos:pos + 2]
            if two in _REFUSED:
                raise error(_REFUSED[two], pos)
            op = next((op for op in _OPS if src.startswith(op, pos)), None)
            if op is None:
                raise error(_REFUSED.get(src[pos], f"unexpected character {src[pos]!r}"), pos)
            yield _Token("op", op, pos)
            pos += len(op)


def _word_token(text: str, pos: int, error: Callable[[str, int], ExprError]) -> _Token:
    if "__" in text:
        raise error(f"'__' is not allowed in a name: {_NO_PYTHON}", pos + text.index("__"))
    if text in _WORD_OPS:
        return _Token("op", text, pos)
    if keyword.iskeyword(text):
        raise error(f"{text!r} is a Python keyword, not part of the rule language: {_NO_PYTHON}", pos)
    if text.endswith(".") or ".." in text:
        bad = text.index("..") if ".." in text else len(text) - 1
        raise error(f"a metric name cannot end with '.' or contain '..': {text!r}", pos + bad)
    return _Token("name", text, pos)


# --- parser --------------------------------------------------------------------------------

_COMPARISONS: Final = frozenset({"<", "<=", ">", ">=", "==", "!="})
_ARITHMETIC: Final = frozenset({"+", "-", "*", "/"})
_INFIX_BP: Final = {"or": 10, "and": 20, **{op: 40 for op in _COMPARISONS}, "+": 50, "-": 50, "*": 60, "/": 60}
_NOT_BP: Final = 30  # `not a > b` is not (a > b); `not a and b` is (not a) and b
_NEG_BP: Final = 70  # `-a * b` is (-a) * b
_USAGE: Final = {
    **{fn: f"{fn}(metric, window), e.g. {fn}(cpu_temp, 30s)" for fn in WINDOW_FUNCTIONS},
    **{fn: f"{fn}(metric), e.g. {fn}(cpu_temp)" for fn in LATEST_FUNCTIONS},
    "abs": "abs(number), e.g. abs(delta(cpu_temp, 1m))",
}
_DURATION_HINT: Final = "a duration like 30s is only allowed as a window argument, e.g. avg(cpu_temp, 30s)"


class _Parser:
    def __init__(self, src: str, metrics: frozenset[str] | None, line: int, col: int) -> None:
        self.src = src
        self.metrics = metrics
        self.line = line
        self.col = col
        self.nesting = 0
        self.tokens = _tokens(src, self.error)
        self.tok = _Token("end", "", 0)  # replaced by the first real token in parse()

    def error(self, message: str, pos: int) -> ExprError:
        newlines = self.src.count("\n", 0, pos)
        if not newlines:
            return ExprError(message, self.line, self.col + pos)
        return ExprError(message, self.line + newlines, pos - self.src.rindex("\n", 0, pos))

    def parse(self) -> Node:
        if len(self.src) > MAX_EXPR_CHARS:
            raise self.error(f"expression is {len(self.src)} characters long; the limit is {MAX_EXPR_CHARS}", 0)
        if not self.src.strip():
            raise self.error("empty expression", 0)
        self.tok = next(self.tokens)
        tree = self.expression(0)
        if self.tok.kind != "end":
            raise self.unexpected("an operator or the end of the expression")
        if isinstance(tree, Duration):
            raise self.error(_DURATION_HINT, tree.pos)
        return tree

    def advance(self) -> _Token:
        tok = self.tok
        if tok.kind != "end":
            self.tok = next(self.tokens)
        return tok

    def unexpected(self, wanted: str) -> ExprError:
        tok = self.tok
        if tok.text == "(":
            return self.error(f"only a function name can be called: {', '.join(sorted(FUNCTIONS))}", tok.pos)
        if tok.text == ",":
            return self.error("',' is only allowed between a function's arguments", tok.pos)
        if tok.text == ")" and wanted.startswith("an operator"):
            return self.error("unmatched ')'", tok.pos)
        if tok.kind == "end":
            return self.error(f"the expression ends too early: expected {wanted}", tok.pos)
        return self.error(f"unexpected {tok.text!r}: expected {wanted}", tok.pos)

    def expression(self, rbp: int) -> Node:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise self.error(f"expression nests deeper than {MAX_NESTING} levels; split it", self.tok.pos)
        left = self.prefix(self.advance())
        while self.tok.kind == "op" and _INFIX_BP.get(self.tok.text, 0) > rbp:
            left = self.infix(self.advance(), left)
        self.nesting -= 1
        return left

    def prefix(self, tok: _Token) -> Node:
        if tok.kind == "num":
            return Num(tok.value, tok.pos)
        if tok.kind == "dur":
            return Duration(tok.value, tok.text, tok.pos)
        if tok.kind == "name":
            return self.name(tok)
        if tok.text == "(":
            inner = self.expression(0)
            if self.tok.text != ")":
                raise self.unexpected("')'")
            self.advance()
            return inner
        if tok.text == "-":
            operand = self.need(self.expression(_NEG_BP), "number", "'-'")
            if isinstance(operand, Num):
                return Num(-operand.value, tok.pos)
            return self.deep(Unary("-", operand, tok.pos, _depth(operand) + 1))
        if tok.text == "not":
            operand = self.need(self.expression(_NOT_BP), "condition", "'not'")
            return self.deep(Unary("not", operand, tok.pos, _depth(operand) + 1))
        self.tok = tok  # report the offending token itself
        raise self.unexpected("a number, a metric, a function call or '('")

    def infix(self, tok: _Token, left: Node) -> Node:
        op = tok.text
        right = self.expression(_INFIX_BP[op])
        if op in _ARITHMETIC:
            self.need(left, "number", f"'{op}'")
            self.need(right, "number", f"'{op}'")
        elif op in ("and", "or"):
            self.need(left, "condition", f"'{op}'")
            self.need(right, "condition", f"'{op}'")
        else:
            want: Kind = _kind(left) if op in ("==", "!=") and _kind(left) == "condition" else "number"
            self.need(left, want, f"'{op}'")
            self.need(right, want, f"'{op}'")
            if self.tok.text in _COMPARISONS:
                raise self.error(f"comparisons cannot be chained: write 'a {op} b and b {self.tok.text} c'",
                                 self.tok.pos)
        return self.deep(Binary(op, left, right, tok.pos, max(_depth(left), _depth(right)) + 1))

    def name(self, tok: _Token) -> Node:
        called = self.tok.text == "("
        if tok.text in FUNCTIONS:
            if not called:
                raise self.error(f"{tok.text!r} is a function: call it as {_USAGE[tok.text]}", tok.pos)
            self.advance()
            return self.call(tok)
        if called:
            raise self.error(f"unknown function {tok.text!r}: the functions are {', '.join(sorted(FUNCTIONS))}",
                             tok.pos)
        if self.metrics is not None and tok.text not in self.metrics:
            close = difflib.get_close_matches(tok.text, self.metrics, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.error(f"unknown metric {tok.text!r}{hint}", tok.pos)
        return Metric(tok.text, tok.pos)

    def call(self, fn: _Token) -> Node:
        args: list[Node] = []
        if self.tok.text != ")":
            args.append(self.expression(0))
            while self.tok.text == ",":
                self.advance()
                args.append(self.expression(0))
            if self.tok.text != ")":
                raise self.unexpected("',' or ')'")
        self.advance()
        return self.check_call(fn, args)

    def check_call(self, fn: _Token, args: list[Node]) -> Node:
        usage = _USAGE[fn.text]
        want = 2 if fn.text in WINDOW_FUNCTIONS else 1
        if len(args) != want:
            raise self.error(f"{fn.text}() takes {want} argument{'s' * (want > 1)}, got {len(args)}: use {usage}",
                             fn.pos)
        if fn.text == "abs":
            self.need(args[0], "number", "abs()")
        elif not isinstance(args[0], Metric):
            raise self.error(f"{fn.text}()'s first argument must be a metric name: use {usage}", _pos(args[0]))
        if want == 2:
            window = args[1]
            if not isinstance(window, Duration):
                raise self.error(f"{fn.text}()'s window must be a duration like 30s or 5m, not a {_kind(window)}",
                                 _pos(window))
            if not 0 < window.seconds <= MAX_WINDOW_S:
                raise self.error(f"window {window.text} must be longer than 0 and at most {MAX_WINDOW_S / 3600:g}h",
                                 window.pos)
        return self.deep(Call(fn.text, tuple(args), fn.pos, max(_depth(a) for a in args) + 1))

    def need(self, node: Node, kind: Kind, where: str) -> Node:
        got = _kind(node)
        if got == kind:
            return node
        if got == "duration":
            raise self.error(_DURATION_HINT, _pos(node))
        article = "a condition (a comparison, and, or, not)" if kind == "condition" else "a number"
        raise self.error(f"{where} needs {article} here, not a {got}", _pos(node))

    def deep(self, node: Call | Unary | Binary) -> Node:
        if node.depth > MAX_NESTING:
            raise self.error(f"expression nests deeper than {MAX_NESTING} levels; split it", node.pos)
        return node


def _kind(node: Node) -> Kind:
    if isinstance(node, Duration):
        return "duration"
    if isinstance(node, Unary):
        return "condition" if node.op == "not" else "number"
    if isinstance(node, Binary):
        return "number" if node.op in _ARITHMETIC else "condition"
    return "number"


def _depth(node: Node) -> int:
    return node.depth if isinstance(node, Call | Unary | Binary) else 1


def _pos(node: Node) -> int:
    if isinstance(node, Binary):
        return _pos(node.left)
    return node.pos


def _collect(node: Node, metrics: set[str], windows: set[tuple[str, float]]) -> None:
    if isinstance(node, Metric):
        metrics.add(node.name)
    elif isinstance(node, Call):
        if node.fn in WINDOW_FUNCTIONS:
            metric, window = node.args
            assert isinstance(metric, Metric)
            assert isinstance(window, Duration)
            windows.add((metric.name, window.seconds))
        for arg in node.args:
            _collect(arg, metrics, windows)
    elif isinstance(node, Unary):
        _collect(node.operand, metrics, windows)
    elif isinstance(node, Binary):
        _collect(node.left, metrics, windows)
        _collect(node.right, metrics, windows)


# --- compiler: the tree becomes nested closures once, at parse time --------------------------

_PY_OPS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


def _compile(node: Node) -> Fn:
    if isinstance(node, Num):
        const = node.value
        return lambda env: const
    if isinstance(node, Metric):
        return _latest_value(node.name)
    if isinstance(node, Call):
        return _compile_call(node)
    if isinstance(node, Unary):
        return _compile_unary(node.op, _compile(node.operand))
    if isinstance(node, Binary):
        return _compile_binary(node)
    raise AssertionError(f"a duration outside a call reached the compiler: {node!r}")


def _latest_value(metric: str) -> Fn:
    def latest(env: Env) -> Value:
        reading = env.latest(metric)
        return None if reading is None else reading[1]
    return latest


def _compile_unary(op: str, operand: Fn) -> Fn:
    if op == "-":
        def negate(env: Env) -> Value:
            value = operand(env)
            return None if value is None else -value
        return negate

    def not_(env: Env) -> Value:
        value = operand(env)
        return None if value is None else not value
    return not_


def _compile_binary(node: Binary) -> Fn:
    left, right = _compile(node.left), _compile(node.right)
    if node.op == "and":
        return lambda env: left(env) is True and right(env) is True
    if node.op == "or":
        return lambda env: left(env) is True or right(env) is True
    if node.op == "/":
        def divide(env: Env) -> Value:
            a = left(env)
            b = None if a is None else right(env)
            return None if a is None or b is None or b == 0 else a / b
        return divide
    py_op = _PY_OPS[node.op]
    if isinstance(node.right, Num):  # the common `avg(m, 30s) > 75`: skip a call
        const = node.right.value

        def with_const(env: Env) -> Value:
            a = left(env)
            return None if a is None else py_op(a, const)
        return with_const

    def both(env: Env) -> Value:
        a = left(env)
        if a is None:
            return None
        b = right(env)
        return None if b is None else py_op(a, b)
    return both


def _compile_call(node: Call) -> Fn:
    if node.fn == "abs":
        inner = _compile(node.args[0])

        def absolute(env: Env) -> Value:
            value = inner(env)
            return None if value is None else abs(value)
        return absolute
    metric_node = node.args[0]
    assert isinstance(metric_node, Metric)
    metric = metric_node.name
    if node.fn == "last":
        return _latest_value(metric)
    if node.fn == "age":
        def age(env: Env) -> Value:
            reading = env.latest(metric)
            return None if reading is None else env.now() - reading[0]
        return age
    window_node = node.args[1]
    assert isinstance(window_node, Duration)
    return _WINDOW_COMPILERS[node.fn](metric, window_node.seconds)


def _avg(metric: str, seconds: float) -> Fn:
    def avg(env: Env) -> Value:
        readings = env.window(metric, seconds)
        return sum([r[1] for r in readings]) / len(readings) if readings else None
    return avg


def _min(metric: str, seconds: float) -> Fn:
    def min_(env: Env) -> Value:
        readings = env.window(metric, seconds)
        return min([r[1] for r in readings]) if readings else None
    return min_


def _max(metric: str, seconds: float) -> Fn:
    def max_(env: Env) -> Value:
        readings = env.window(metric, seconds)
        return max([r[1] for r in readings]) if readings else None
    return max_


def _count(metric: str, seconds: float) -> Fn:
    return lambda env: float(len(env.window(metric, seconds)))


def _delta(metric: str, seconds: float) -> Fn:
    def delta(env: Env) -> Value:
        readings = env.window(metric, seconds)
        return readings[-1][1] - readings[0][1] if readings else None
    return delta


_WINDOW_COMPILERS: Final[dict[str, Callable[[str, float], Fn]]] = {
    "avg": _avg, "min": _min, "max": _max, "count": _count, "delta": _delta,
}
