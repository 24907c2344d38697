"""The audit log's hash chain: what makes an edited, inserted or deleted row visible. Pure:
no SQL, no I/O; both engines and `audit verify` use it.

Each writer keeps one chain (SQLite: `local`; a PostgreSQL replica: its `replica` name). Row
n of a chain stores `chain`, `chain_seq` = n and

    hash = sha256(prev + "\\n" + json([chain, chain_seq, <the row's fields in COLUMNS order, no id>]))

where prev is row n-1's hash ("" for the first row; after a prune, the last pruned row's).
JSON here is `json.dumps(..., separators=(",", ":"))`: ASCII only, Python's float repr (exact).
The chain has no key: anyone who can write the DB can recompute it. What it proves is that the
rows are the ones the writer wrote, in its order, none missing — as far back as an anchor
(`audit anchor: ...` log lines, kept outside the DB) vouches for the head.

An amendment (a response cut after its row was committed) changes decision and reason only,
and keeps the original pair in `amended_from`; verification hashes the original and accepts
exactly that change: decision -> error, reason extended by "; <note>".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from egress_guard.store.records import COLUMNS, AuditRow

LOCAL = "local"  # the SQLite store's one chain
FIELDS = COLUMNS[1:]  # what a row's hash covers, in this order (after chain and chain_seq)
CHAIN_COLUMNS = ["chain", "chain_seq", "hash", "amended_from"]
CHAIN_SELECT = ["id", *CHAIN_COLUMNS, *FIELDS]  # the order of `Store.audit_chain()`'s tuples
_DECISION, _REASON = FIELDS.index("decision"), FIELDS.index("reason")
_INTS = frozenset(f.name for f in dataclasses.fields(AuditRow) if str(f.type).startswith("int"))
_FLOATS = frozenset(f.name for f in dataclasses.fields(AuditRow) if str(f.type).startswith("float"))
_field_values = operator.attrgetter(*FIELDS)
_json = json.JSONEncoder(
    separators=(",", ":")
).encode  # = json.dumps(v, separators=...), without a new encoder each call
ANCHOR = re.compile(r"audit anchor: chain=(?P<chain>\S+) seq=(?P<seq>\d+) hash=(?P<hash>[0-9a-f]{64})")

Head = tuple[int, str]  # (chain_seq, hash) of a chain's last row; (0, "") before its first
Link = tuple[str, int, str]  # (chain, chain_seq, hash): the chain columns of one row


def select_sql(table: str = "audit") -> str:
    return f"SELECT {', '.join(CHAIN_SELECT)} FROM {table} ORDER BY id"  # noqa: S608 -- constant names


def _text(value: str) -> str:
    """Text any engine stores and returns unchanged: valid UTF-8 (mitmproxy decodes wire bytes
    with surrogateescape), no NUL (PostgreSQL's TEXT refuses it)."""
    if not value.isascii():
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def normalize(row: AuditRow) -> tuple[Any, ...]:
    """Make `row` (in place) what the DB will give back, so the hash computed now is the one
    recomputed from the stored row: text storable, a REAL column's value a float (finite,
    else none: SQLite stores NaN as NULL), an INTEGER column's an int. Returns its FIELDS values."""
    values = _field_values(row)
    changed = False
    for name, value in zip(FIELDS, values, strict=True):
        kind = type(value)
        if kind is str:
            if value.isascii() and "\x00" not in value:
                continue  # nearly every value: one cheap check
            fixed: Any = _text(value)
        elif value is None or (kind is int and name not in _FLOATS):
            continue
        elif name in _FLOATS:
            if kind is float and math.isfinite(value):
                continue
            fixed = float(value) if math.isfinite(value) else None
        elif isinstance(value, str):
            fixed = _text(str(value))
        elif name in _INTS and isinstance(value, float | bool) and float(value).is_integer():
            fixed = int(value)
        else:
            continue
        setattr(row, name, fixed)
        changed = True
    return _field_values(row) if changed else values


def digest(prev: str, chain: str, seq: int, values: Sequence[Any]) -> str:
    """A row's hash from its predecessor's, its chain and seq, and its FIELDS values."""
    body = _json([chain, seq, *values])
    return hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()


def link(chain: str, head: Head, rows: Iterable[AuditRow]) -> tuple[list[Link], Head]:
    """Chain `rows` (normalized in place) after `head`: their links, in order, and the new head."""
    seq, prev = head
    links: list[Link] = []
    for row in rows:
        values = normalize(row)
        seq += 1
        prev = digest(prev, chain, seq, values)
        links.append((chain, seq, prev))
    return links, (seq, prev)


def anchor_line(chain: str, head: Head, ts: str) -> str:
    return f"audit anchor: chain={chain} seq={head[0]} hash={head[1]} ts={ts}"


def parse_anchors(lines: Iterable[str]) -> list[tuple[int, str, int, str]]:
    """(line number, chain, seq, hash) of every anchor found in a log's lines."""
    found = []
    for number, line in enumerate(lines, 1):
        if (m := ANCHOR.search(line)) is not None:
            found.append((number, m["chain"], int(m["seq"]), m["hash"]))
    return found


# --- verification ------------------------------------------------------------------------


@dataclass
class ChainState:
    start: int = 0  # the seq the chain starts after (a prune's last row), 0 if never pruned
    seq: int = 0
    hash: str = ""
    rows: int = 0
    amended: int = 0
    first_id: int | None = None


@dataclass
class Verifier:
    """Feed it every row (`CHAIN_SELECT` tuples) by id; `problems` names each row found wrong.
    Memory stays flat: per chain a few numbers, and the first `keep` problems and amended ids."""

    starts: dict[str, Head] = field(default_factory=dict)  # chain -> where it starts (audit_pruned)
    # the highest id of a row written before the chain existed (audit_chain_floor, migration
    # 0009); an unchained row above it, or with an id below 1, was inserted. None: unknown
    floor: int | None = None
    anchors: list[tuple[int, str, int, str]] = field(default_factory=list)  # parse_anchors' output
    keep: int = 100
    chains: dict[str, ChainState] = field(default_factory=dict)
    unchained: int = 0  # rows from before the chain (migration 0007): unverifiable
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    amended_ids: list[int] = field(default_factory=list)
    anchors_checked: int = 0
    anchors_pruned: int = 0
    _anchor_at: dict[tuple[str, int], list[tuple[int, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for line, chain, seq, digest_ in self.anchors:
            self._anchor_at.setdefault((chain, seq), []).append((line, digest_))

    def _problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.keep:
            self.problems.append(text)

    def feed(self, record: Sequence[Any]) -> None:
        row_id, chain, seq, stored, amended_from = record[:5]
        values = list(record[5:])
        self.rows += 1
        if chain is None:
            if self.floor is not None and not 0 < row_id <= self.floor and not self.chains:
                self._problem(
                    f"row id {row_id}: has no chain, and every row after id {self.floor} is chained "
                    "(inserted by hand, not by the proxy?)"
                )
            elif self.chains:
                self._problem(
                    f"row id {row_id}: has no chain, after chained rows (inserted by hand, not by the proxy?)"
                )
            else:
                self.unchained += 1
            return
        state = self.chains.get(chain)
        if state is None:
            start = self.starts.get(chain, (0, ""))
            state = self.chains[chain] = ChainState(start=start[0], seq=start[0], hash=start[1], first_id=row_id)
        state.rows += 1
        if not isinstance(seq, int) or not isinstance(stored, str):
            self._problem(f"row id {row_id}: chain {chain} with no valid chain_seq or hash (inserted?)")
            return
        if seq <= state.seq:
            self._problem(
                f"row id {row_id}: chain {chain} seq {seq} after seq {state.seq}: "
                "a duplicate or out-of-order row (inserted?)"
            )
            return
        if seq > state.seq + 1:
            missing = f"seq {state.seq + 1}" if seq == state.seq + 2 else f"seqs {state.seq + 1}..{seq - 1}"
            self._problem(
                f"row id {row_id}: chain {chain} seq {seq} follows seq {state.seq}: {missing} missing (deleted?)"
            )
            prev = None  # its predecessor is gone: its hash cannot be checked; resume from it
        else:
            prev = state.hash
        if amended_from is not None:
            original = self._original(row_id, chain, amended_from, values)
            if original is None:
                prev = None
            else:
                values = original
                state.amended += 1
                if len(self.amended_ids) < self.keep:
                    self.amended_ids.append(row_id)
        if prev is not None:
            try:
                expected = digest(prev, chain, seq, values)
            except (TypeError, ValueError):
                expected = ""
            if expected != stored:
                self._problem(
                    f"row id {row_id}: chain {chain} seq {seq}: hash mismatch "
                    "(the row was edited, or its predecessor's hash was)"
                )
        state.seq, state.hash = seq, stored
        for line, anchored in self._anchor_at.get((chain, seq), ()):
            self.anchors_checked += 1
            if anchored != stored:
                self._problem(
                    f"row id {row_id}: chain {chain} seq {seq} has hash {stored[:16]}..., the anchor on log "
                    f"line {line} says {anchored[:16]}... (the table was rewritten?)"
                )

    def _original(self, row_id: int, chain: str, amended_from: Any, values: list[Any]) -> list[Any] | None:
        """The row as first written, if its amendment is one the proxy makes; else None (reported)."""
        try:
            was = json.loads(amended_from)
            decision, reason = was["decision"], was["reason"]
        except (TypeError, ValueError, KeyError):
            self._problem(f"row id {row_id}: chain {chain}: amended_from is not the proxy's (edited?)")
            return None
        now_decision, now_reason = values[_DECISION], values[_REASON]
        extended = isinstance(now_reason, str) and (
            now_reason.startswith(f"{reason}; ") and len(now_reason) > len(reason) + 2
            if isinstance(reason, str)
            else reason is None and now_reason != ""
        )
        if now_decision != "error" or not extended:
            self._problem(
                f"row id {row_id}: chain {chain}: amended to decision {now_decision!r} reason {now_reason!r}: "
                "an amendment only turns a row into an error and adds a note (edited?)"
            )
            return None
        original = list(values)
        original[_DECISION], original[_REASON] = decision, reason
        return original

    def finish(self) -> None:
        """After the last row: anchors the rows never reached (the tail deleted, or pruned)."""
        for (chain, seq), found in self._anchor_at.items():
            state = self.chains.get(chain)
            start = state.start if state is not None else self.starts.get(chain, (0, ""))[0]
            head = state.seq if state is not None else start
            if seq <= start:
                self.anchors_pruned += len(found)  # pruned since: nothing left to check it against
            elif seq > head:
                for line, _ in found:
                    self._problem(
                        f"anchor on log line {line}: chain {chain} seq {seq} is not in the DB (its head is "
                        f"seq {head}): rows were deleted from the chain's end"
                    )

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def report(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "unchained_rows": self.unchained,
            "chains": {
                name: {
                    "rows": s.rows,
                    "starts_after_seq": s.start,
                    "head_seq": s.seq,
                    "head_hash": s.hash,
                    "amended": s.amended,
                }
                for name, s in sorted(self.chains.items())
            },
            "amended_ids": self.amended_ids,
            "anchors": {"found": len(self.anchors), "checked": self.anchors_checked, "pruned": self.anchors_pruned},
            "problems": self.problem_count,
            "first_problems": self.problems,
        }
