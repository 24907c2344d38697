"""ConfigError, and how a pydantic ValidationError becomes one.

A config problem is phrased for the person who has to fix it: the file, the line, the key
path, the problem and the fix. This module owns that phrasing; it reads no files.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel, Discriminator, Tag, ValidationError

from egress_guard.config.wire import ConfigWire


class ConfigError(Exception):
    """A config problem: the file, the line, the key path, the problem and the fix. `at` is
    the key path whose line to report when it is not `key` itself (an unknown key is
    reported on its parent, located on itself). `line` and `column` (1-based) are filled in
    by the file's `Positions` when not given; the text shows the line (`FILE:LINE: KEY: …`),
    the column is for tools."""

    def __init__(
        self,
        file: Path | str,
        key: str,
        problem: str,
        fix: str = "",
        *,
        line: int | None = None,
        column: int | None = None,
        at: str | None = None,
    ) -> None:
        self.file, self.key, self.problem, self.fix = str(file), key, problem, fix
        self.line, self.column, self.at = line, column, at
        super().__init__(file, key, problem, fix)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        text = f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


# Where a key is documented: docs/configuration.md has a section per top-level key (its
# anchor is the key); agents' limits and the spend settings have a page of their own.
CONFIG_DOC = "docs/configuration.md"
SPEND_DOC = "docs/spend.md#rate-limits-and-spend-caps"
_LIMITS = re.compile(r"^agents\..+\.limits(?:$|[.\[])")
_PRESET_SECTIONS = {"allow": "rules", "service": "services", "name": "allowlists", "description": "allowlists"}
CONFIG_SECTIONS = frozenset(ConfigWire.model_fields) | {"rules"}


def reference(key: str) -> str:
    """The docs page, and section, that documents `key` (a config's key path, or a preset
    file's: `allow[0].ports`, `service.fake_key`)."""
    top = re.split(r"[.\[]", key, maxsplit=1)[0]
    if top == "spend" or _LIMITS.match(key):
        return SPEND_DOC
    section = _PRESET_SECTIONS.get(top, top)
    return f"{CONFIG_DOC}#{section}" if section in CONFIG_SECTIONS else CONFIG_DOC


def key_path(loc: tuple[int | str, ...]) -> str:
    """`("agents", "bot", "services", 0)` -> `agents.bot.services[0]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _tagged_members(annotation: Any) -> dict[str, Any] | None:
    """A tagged union's members by tag (`Annotated[A | B, Discriminator(...)]` whose members
    are `Annotated[A, Tag("a")]`), or None if `annotation` is not one."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return None
    if not any(isinstance(m, Discriminator) for m in annotation.__metadata__):
        return None
    members = {}
    for member in typing.get_args(annotation.__origin__):
        tags = [m.tag for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)]
        if tags:
            members[tags[0]] = typing.get_args(member)[0]
    return members


def _resolve(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], Any]:
    """Walk a pydantic error location from `model`: fields, list items, the values of
    dict-valued fields (`agents: {NAME: AgentWire}`) and tagged unions (`services:`), whose
    tag pydantic puts in the location but is no key in the file. Returns the location
    without those tags and the annotation it ends at (None where no model applies)."""
    current: Any = model
    path: list[int | str] = []
    for part in loc:
        current = _without_none(current)
        members = _tagged_members(current)
        if members is not None:
            current = members.get(str(part))
            continue
        path.append(part)
        origin = typing.get_origin(current)
        if origin is list:
            current = typing.get_args(current)[0]
        elif origin is dict:
            current = typing.get_args(current)[1]
        elif isinstance(current, type) and issubclass(current, BaseModel) and str(part) in current.model_fields:
            current = current.model_fields[str(part)].annotation
        else:
            current = None
    return tuple(path), _without_none(current)


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model accepts at the mapping that holds `loc`'s last key."""
    holder = _resolve(model, loc[:-1])[1]
    return list(holder.model_fields) if isinstance(holder, type) and issubclass(holder, BaseModel) else []


def validation_failed(file: Path | str, model: type[BaseModel], err: ValidationError) -> NoReturn:
    """Raise the one ConfigError that says best what is wrong with the data `model` refused
    (a whole file's)."""
    errors = err.errors()
    # A misspelt key also makes the real key "missing": the unknown key is the better clue.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    inner = tuple(first["loc"])
    loc = _resolve(model, inner)[0]
    key = key_path(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        keys = _allowed_keys(model, inner)
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            file,
            key_path(loc[:-1]) or key,
            f"unknown key {loc[-1]!r}",
            f"{hint}remove it or use one of: {', '.join(keys) or 'none'}",
            at=key,
        )
    if kind == "missing" and loc == ("version",):
        raise ConfigError(file, "version", "missing", "add 'version: 1' as the first line", line=1)
    if kind == "literal_error" and loc == ("version",):
        raise ConfigError(file, "version", "unsupported version", "this egress-guard reads 'version: 1'")
    if kind == "missing":
        raise ConfigError(file, key, "required key is missing", f"add {loc[-1]}:")
    if kind == "service_shape":
        raise ConfigError(file, key, first["msg"], "e.g. openai, or {preset: openai, secret: …}")
    if kind == "model_type" or kind == "dict_type":
        raise ConfigError(file, key, "expected a mapping", f"see {reference(key)}")
    raise ConfigError(file, key, first["msg"].lower(), f"see {reference(key)}")


def validate[M: BaseModel](model: type[M], data: Any, file: Path | str) -> M:
    """`model` read from `data`, or the ConfigError that says what is wrong with it."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        validation_failed(file, model, err)
