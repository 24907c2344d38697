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
    """Where each key path of one YAML file is (1-based lines), read from ruamel.yaml's
    node positions. Key paths are spelt as in ConfigError (`agents.bot.limits`,
    `allow[0].host`)."""

    def __init__(self, file: Path | str, text: str) -> None:
        from ruamel.yaml import YAML
        from ruamel.yaml.constructor import DuplicateKeyError
        from ruamel.yaml.error import MarkedYAMLError

        self.file = str(file)
        self.lines: dict[str, int] = {}
        try:
            root = YAML(typ="rt").load(text)
        except DuplicateKeyError as exc:
            name = re.search(r'duplicate key "(.*?)" with value', str(exc.problem))
            first = exc.context_mark.line + 1 if exc.context_mark is not None else None
            line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
            raise ConfigError(
                file,
                "",
                f"key {name.group(1) if name else '?'!r} appears twice in one mapping (this mapping starts on line "
                f"{first}); YAML would silently keep only the last",
                "keep one of them (merge their contents)",
                line=line,
            ) from None
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise ConfigError(
                file,
                "",
                f"not valid YAML ({exc.problem or exc.context})",
                "fix the YAML syntax",
                line=mark.line + 1 if mark is not None else None,
            ) from None
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
                self.lines.setdefault(child, node.lc.key(k)[0] + 1)
                self._walk(value, child)
        elif isinstance(node, CommentedSeq):
            for i, value in enumerate(node):
                child = f"{path}[{i}]"
                self.lines.setdefault(child, node.lc.item(i)[0] + 1)
                self._walk(value, child)

    def line(self, key: str) -> int:
        """The line of `key`, else of its nearest enclosing key that is in the file, else 1."""
        while key:
            if key in self.lines:
                return self.lines[key]
            shorter = _PARENT.sub("", key)
            if shorter == key:
                break
            key = shorter
        return 1

    def locate(self, err: ConfigError) -> ConfigError:
        """`err`, with its line when it is about this file and has none yet."""
        if err.line is None and err.file == self.file:
            err.line = self.line(err.at if err.at is not None else err.key)
        return err


def read_yaml(file: Path | str, text: str) -> tuple[dict[str, Any], Positions]:
    """The file's data (PyYAML, as always) and where each key is (ruamel.yaml)."""
    positions = Positions(file, text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            file, "", f"not valid YAML ({problem})", "fix the YAML syntax", line=mark.line + 1 if mark else None
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(file, "", "the file must be a YAML mapping", "start it with 'version: 1'", line=1)
    return data, positions
