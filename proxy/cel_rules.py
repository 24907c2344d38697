"""CEL for `rules:`: the typed environment, compiling an expression once at load, and the
variables of one request as an expression sees them.

Expressions are compiled by cel-expr-python (Google's cel-cpp) against a declared
environment, so a misspelt variable or a type mismatch is a load-time error, never a
surprise on the hot path. An expression must return a bool. Evaluation never raises: an
error (a division by zero, a missing body) comes back as text and the caller fails closed.
"""

from __future__ import annotations

import datetime
import functools
import re
from dataclasses import dataclass, field
from typing import Any

# Every variable an expression may name and its CEL type; a value the request does not have
# is "", 0, false or [].
VARIABLES: dict[str, str] = {
    "agent": "string",
    "session": "string",
    "service": "string",
    "host": "string",
    "port": "int",
    "method": "string",
    "path": "string",
    "query": "list(string)",
    "headers": "list(string)",
    "body_size": "int",
    "model": "string",
    "max_tokens": "int",
    "stream": "bool",
    "tools": "list(string)",
    "rpc_method": "string",
    "rpc_tool": "string",
    "now": "timestamp",
}
# The variables read from the request's body: a rule naming one needs the body.
BODY_VARIABLES = frozenset({"model", "max_tokens", "stream", "tools", "rpc_method", "rpc_tool"})


@dataclass(frozen=True, slots=True)
class _Cel:
    env: Any
    BOOL: Any
    INT: Any
    ERROR: Any


@functools.cache
def _cel() -> _Cel:
    """The CEL environment, made on the first compile: a config without rules never loads
    cel-cpp (about 9 MB)."""
    from cel_expr_python import cel

    t = cel.Type
    kinds = {
        "string": t.STRING,
        "int": t.INT,
        "bool": t.BOOL,
        "timestamp": t.TIMESTAMP,
        "list(string)": t.List(t.STRING),
    }
    env = cel.NewEnv(variables={name: kinds[kind] for name, kind in VARIABLES.items()})
    return _Cel(env, t.BOOL, t.INT, t.ERROR)


# A string literal (any CEL quoting, raw or not) and an identifier: what an expression
# names, strings blanked first so that 'model' in a literal is not the variable.
_LITERAL = re.compile(
    r"""[rRbB]{0,2}(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")""",
    re.S,
)
_IDENT = re.compile(r"(?<!\w)([A-Za-z_]\w*)")  # `.model` too: CEL's root-scoped name
_COMPILER_WHERE = re.compile(r"^(?:INVALID_ARGUMENT: )?(?:ERROR: )?<input>:(\d+):(\d+): ")


class CelCompileError(ValueError):
    """An expression the compiler refused, or one that does not return a bool. `line` and
    `column` are 1-based within the expression; the text is the compiler's message."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line, self.column = line, column


@dataclass(frozen=True, slots=True)
class Compiled:
    """One compiled expression and the variables it names (the activation it needs)."""

    source: str
    program: Any = field(repr=False, compare=False)  # equal configs: the same sources
    variables: frozenset[str]

    @property
    def needs_body(self) -> bool:
        return not self.variables.isdisjoint(BODY_VARIABLES)


def compile_expression(source: str) -> Compiled:
    """`source` compiled against the request environment; CelCompileError if the compiler
    refuses it or it does not return a bool."""
    cel = _cel()
    try:
        program = cel.env.compile(source)
    except RuntimeError as exc:
        text = str(exc)
        first = text.split("\n", 1)[0]
        m = _COMPILER_WHERE.match(first)
        message = _COMPILER_WHERE.sub("", first).removesuffix(" [INVALID_ARGUMENT]").strip()
        return_line = int(m.group(1)) if m else None
        column = int(m.group(2)) if m else None
        raise CelCompileError(message or text, return_line, column) from None
    result = program.return_type()
    if result != cel.BOOL:
        raise CelCompileError(f"the expression returns {result.name().lower()}, not bool")
    return Compiled(source, program, names(source))


def names(source: str) -> frozenset[str]:
    """The request variables `source` names (an over-approximation is harmless: it only
    makes a variable computed that is not used)."""
    blanked = _LITERAL.sub('""', source)
    return frozenset(n for n in _IDENT.findall(blanked) if n in VARIABLES)


def evaluate(compiled: Compiled, data: dict[str, Any]) -> bool | str:
    """True/False, or the evaluation error's text (the caller fails closed on it)."""
    try:
        value = compiled.program.eval(data=data)
    except Exception as exc:  # the binding raises for what cel-cpp reports as a status
        return f"{type(exc).__name__}: {exc}"
    cel = _cel()
    kind = value.type()
    if kind == cel.BOOL:
        return bool(value.value())
    if kind == cel.ERROR:
        return str(value.value())
    return f"the expression returned {kind.name().lower()}, not bool"


@dataclass(frozen=True, slots=True)
class FirstMatch:
    """Many expressions as one program that returns the position of the first that holds
    (-1: none), so a request costs one evaluation, not one per rule. An error anywhere it
    looked comes back as None: the caller then judges rule by rule, which says which one
    failed and fails closed on it."""

    program: Any = field(repr=False)
    size: int

    def __call__(self, data: dict[str, Any]) -> int | None:
        try:
            value = self.program.eval(data=data)
        except Exception:
            return None
        return value.value() if value.type() == _cel().INT else None


def first_match(expressions: list[Compiled]) -> FirstMatch | None:
    """The FirstMatch of `expressions` (each compiled alone before), or None if they cannot
    be put together. Each sits on lines of its own: a `//` comment in one ends with its line."""
    text = "-1"
    for i in reversed(range(len(expressions))):
        text = f"(\n{expressions[i].source}\n) ? {i} : ({text})"
    cel = _cel()
    try:
        program = cel.env.compile(text)
    except RuntimeError:
        return None
    return FirstMatch(program, len(expressions)) if program.return_type() == cel.INT else None


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
