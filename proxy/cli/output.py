"""How query commands print rows: --format table (columns fitted to the terminal), json,
jsonl or csv — the same for audit, keys and budget rows."""

from __future__ import annotations

import csv
import io
import json
import shutil
import textwrap
from collections.abc import Iterable
from typing import Any

import click

from egress_guard.store import COLUMNS


def emit(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "jsonl":
        for row in rows:
            click.echo(json.dumps(row))
    elif fmt == "csv":
        out = io.StringIO()
        fields = list(rows[0]) if rows else (columns or COLUMNS)
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
    else:
        click.echo(table(rows, columns or (list(rows[0]) if rows else [])), nl=False)


CELL_MAX = 80  # a column other than the last is cut here (with …)
LAST_MIN = 30  # the last column (reason) wraps beside the others if it gets this much room


def table(rows: Iterable[dict[str, Any]], columns: list[str], *, header: bool = True) -> str:
    """Columns padded to their widest cell; the last one (the reason, which says what to
    fix) is never cut: it wraps within the terminal's width, continuing under itself, or
    on indented lines below its row when the terminal is too narrow for that."""

    def cell(value: Any, last: bool) -> str:
        text = "" if value is None else " ".join(str(value).split())
        return text if last or len(text) <= CELL_MAX else text[: CELL_MAX - 1] + "…"

    cells = [[cell(r.get(c), i == len(columns) - 1) for i, c in enumerate(columns)] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    total = shutil.get_terminal_size().columns
    indent = sum(widths[:-1]) + 2 * (len(columns) - 1)
    beside = total - indent >= min(LAST_MIN, widths[-1])
    room = total - indent if beside else max(total - 4, LAST_MIN)
    if beside:
        widths[-1] = min(widths[-1], room)
    lines = [("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))).rstrip()] if header else []
    for row in cells:
        last = textwrap.wrap(row[-1], room, break_on_hyphens=False) or [""]
        if beside:
            lines.append("  ".join(v.ljust(w) for v, w in zip([*row[:-1], last[0]], widths, strict=True)).rstrip())
            lines += [" " * indent + more for more in last[1:]]
        else:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row[:-1], widths, strict=False)).rstrip())
            lines += ["    " + more for more in last if more]
    return "\n".join(lines) + ("\n" if lines else "")
