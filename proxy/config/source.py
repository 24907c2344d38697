"""Reading one YAML config or preset file: its data, and where each key of it is.

The data comes from PyYAML (as it always has: YAML 1.1 booleans and numbers); positions
come from ruamel.yaml's round-trip nodes, which also refuse duplicate keys PyYAML would
silently merge. A syntax error in either is a ConfigError on the line the parser names.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import yaml

from egress_guard.config.errors import ConfigError

_PARENT = re.compile(r"(\.[^.\[\]]*|\[\d+\])$")


class Positions:
    """Where each key path of one YAML file is (1-based line and column), read from
    ruamel.yaml's node positions: a mapping key's own position, a list item's value's.
    Key paths are spelt as in ConfigError (`agents.bot.limits`, `allow[0].host`)."""

    def __init__(self, file: Path | str, text: str) -> None:
        from ruamel.yaml import YAML
        from ruamel.yaml.constructor import DuplicateKeyError
        from ruamel.yaml.error import MarkedYAMLError

        self.file = str(file)
        self.places: dict[str, tuple[int, int]] = {}
        try:
            root = YAML(typ="rt").load(text)
        except DuplicateKeyError as exc:
            name = re.search(r'duplicate key "(.*?)" with value', str(exc.problem))
            first = exc.context_mark.line + 1 if exc.context_mark is not None else None
            mark = exc.problem_mark
            raise ConfigError(
                file,
                "",
                f"key {name.group(1) if name else '?'!r} appears twice in one mapping (this mapping starts on line "
                f"{first}); YAML would silently keep only the last",
                "keep one of them (merge their contents)",
                line=mark.line + 1 if mark is not None else None,
                column=mark.column + 1 if mark is not None else None,
            ) from None
        except MarkedYAMLError as exc:
            raise _syntax_error(file, exc.problem, exc.problem_mark, exc.context, exc.context_mark) from None
        except Exception as exc:  # ruamel's other errors (e.g. a bad tag) are still the file's fault
            raise ConfigError(file, "", f"not valid YAML ({type(exc).__name__})", "fix the YAML syntax") from None
        with contextlib.suppress(Exception):  # positions are a help: never a reason to refuse a file
            self._walk(root, "")

    def _walk(self, node: Any, path: str) -> None:
        from ruamel.yaml.comments import CommentedMap, CommentedSeq

        if isinstance(node, CommentedMap):
            for k, value in node.items():
                if k not in node.lc.data:  # merged in from an anchor (<<: *base): located there
                    continue
                child = f"{path}.{k}" if path else str(k)
                line, column = node.lc.key(k)
                self.places.setdefault(child, (line + 1, column + 1))
                self._walk(value, child)
        elif isinstance(node, CommentedSeq):
            for i, value in enumerate(node):
                child = f"{path}[{i}]"
                line, column = node.lc.item(i)
                self.places.setdefault(child, (line + 1, column + 1))
                self._walk(value, child)

    def place(self, key: str) -> tuple[int, int | None]:
        """The line and column of `key`, else of its nearest enclosing key that is in the
        file, else line 1 (a key the file does not spell, such as a missing `version`)."""
        while key:
            if key in self.places:
                return self.places[key]
            shorter = _PARENT.sub("", key)
            if shorter == key:
                break
            key = shorter
        return 1, None

    def locate(self, err: ConfigError) -> ConfigError:
        """`err`, with its line and column when it is about this file and has none yet."""
        if err.line is None and err.file == self.file:
            err.line, err.column = self.place(err.at if err.at is not None else err.key)
        return err


def read_yaml(file: Path | str, text: str) -> tuple[dict[str, Any], Positions]:
    """The file's data (PyYAML, as always) and where each key is (ruamel.yaml)."""
    positions = Positions(file, text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        mark, context, context_mark = (getattr(exc, a, None) for a in ("problem_mark", "context", "context_mark"))
        raise _syntax_error(file, problem, mark, context, context_mark) from None
    if not isinstance(data, dict):
        raise ConfigError(file, "", "the file must be a YAML mapping", "start it with 'version: 1'", line=1)
    return data, positions


def _syntax_error(file: Path | str, problem: Any, mark: Any, context: Any, context_mark: Any) -> ConfigError:
    """A parser's error (ruamel.yaml's or PyYAML's: the same marks) on the line it names.
    Where the construct it was reading began elsewhere (an unclosed quote or bracket is only
    noticed at the end), that line is named too."""
    where = mark or context_mark
    text = str(problem or context)
    if problem and context and context_mark is not None and (mark is None or context_mark.line != mark.line):
        text += f", {context} on line {context_mark.line + 1}"
    return ConfigError(
        file,
        "",
        f"not valid YAML ({text})",
        "fix the YAML syntax",
        line=where.line + 1 if where is not None else None,
        column=where.column + 1 if where is not None else None,
    )
