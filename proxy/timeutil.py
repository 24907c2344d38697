"""Times and durations, written one way everywhere.

An instant is UTC ISO 8601 text with milliseconds and Z (2026-11-22T09:30:00.000Z): the
audit log's format, which sorts as text. A duration is a count and a unit (90s, 30m, 8h,
7d, 2w). A budget day is a date in the configured time zone. Pure: no I/O.
"""

from __future__ import annotations

import datetime
import re
import time
from zoneinfo import ZoneInfo

_DURATION = re.compile(r"^(\d+)\s*([smhdw]?)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def iso(when: datetime.datetime) -> str:
    """`when` (aware) as 2026-01-31T12:00:00.123Z."""
    return when.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime.datetime:
    """An ISO time as an aware datetime (Z or an offset; naive = UTC). Raises ValueError."""
    when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


_second: tuple[int, str] = (0, "")


def now_iso() -> str:
    """Now, as `iso` writes it; cheap enough for every request."""
    global _second
    t = time.time()
    sec = int(t)
    if sec != _second[0]:  # formatting is most of the cost: once a second
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_second[1]}.{int((t - sec) * 1000):03d}Z"


def parse_duration(text: str, *, bare_seconds: bool = False) -> int:
    """`90s`, `30m`, `8h`, `7d`, `2w` in seconds (a bare number too, if `bare_seconds`).
    Raises ValueError naming the forms."""
    m = _DURATION.match(text.strip())
    if not m or (not m.group(2) and not bare_seconds):
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 30m, 8h, 7d")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_when(text: str, now: datetime.datetime | None = None) -> str:
    """`15m`, `2h`, `3d` (ago) or an ISO time (naive = UTC), as an instant."""
    try:
        ago = parse_duration(text)
    except ValueError:
        try:
            return iso(parse_iso(text))
        except ValueError:
            raise ValueError(f"{text!r} is not a time: use an ISO time (2026-11-22T09:30) or 15m, 2h, 3d") from None
    return iso((now or utcnow()) - datetime.timedelta(seconds=ago))


def day_start(day: datetime.date, zone: ZoneInfo) -> datetime.datetime:
    """When the budget day `day` begins, in UTC."""
    return datetime.datetime.combine(day, datetime.time(), zone).astimezone(datetime.UTC)


class DayOf:
    """The budget day (a date in `zone`, as text) of instants. Instants come mostly in
    order: the bounds of the last day seen are kept as text, so an instant in that day
    costs two string comparisons, not a parse and a time-zone conversion."""

    def __init__(self, zone: ZoneInfo | str) -> None:
        self.zone = ZoneInfo(zone) if isinstance(zone, str) else zone
        self._bounds = ("", "", "")  # first instant, first instant of the next day, the day

    def __call__(self, instant: str) -> str:
        first, end, day = self._bounds
        if first <= instant < end and len(instant) == 24:
            return day
        date = parse_iso(instant).astimezone(self.zone).date()
        self._bounds = (
            iso(day_start(date, self.zone)),
            iso(day_start(date + datetime.timedelta(days=1), self.zone)),
            date.isoformat(),
        )
        return self._bounds[2]
