"""Times and durations, one way everywhere: instants as the audit log writes them, the one
duration parser, `--since`/`--until` times, and budget days in a time zone."""

from __future__ import annotations

import datetime
import re
from zoneinfo import ZoneInfo

import pytest

from egress_guard.timeutil import DayOf, day_start, iso, now_iso, parse_duration, parse_when


def test_instants_sort_as_text() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now_iso())
    paris = datetime.datetime(2026, 11, 22, 13, 0, 0, 123456, tzinfo=ZoneInfo("Europe/Paris"))
    assert iso(paris) == "2026-11-22T12:00:00.123Z"


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("90s", "30m", "8h", "7d", "2w", " 3 d ")] == [
        90,
        1800,
        28800,
        604800,
        1209600,
        259200,
    ]
    assert parse_duration("45", bare_seconds=True) == 45
    for bad in ("45", "8 hours", "-1d", "1.5h", ""):
        with pytest.raises(ValueError, match=r"is not a duration: use e\.g\. 90s, 30m, 8h, 7d"):
            parse_duration(bad)


def test_parse_when() -> None:
    now = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
    assert parse_when("15m", now) == "2026-11-22T11:45:00.000Z"
    assert parse_when("2h", now) == "2026-11-22T10:00:00.000Z"
    assert parse_when("3d", now) == "2026-11-19T12:00:00.000Z"
    assert parse_when("2026-11-22T09:30", now) == "2026-11-22T09:30:00.000Z"
    assert parse_when("2026-11-22T09:30+01:00", now) == "2026-11-22T08:30:00.000Z"
    assert parse_when("2026-11-22T09:30:00Z", now) == "2026-11-22T09:30:00.000Z"
    with pytest.raises(ValueError, match="15m, 2h, 3d"):
        parse_when("yesterday")


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata", "Pacific/Chatham", "Europe/Paris"])
def test_day_of_agrees_with_a_time_zone_conversion_across_a_dst_change(zone: str) -> None:
    day_of = DayOf(zone)
    start = datetime.datetime(2026, 3, 7, tzinfo=datetime.UTC)  # the US and NZ change clocks in these weeks
    for minutes in range(0, 14 * 24 * 60, 17):
        when = start + datetime.timedelta(minutes=minutes)
        assert day_of(iso(when)) == when.astimezone(ZoneInfo(zone)).date().isoformat(), iso(when)
    assert day_start(datetime.date(2026, 11, 22), ZoneInfo("Asia/Tokyo")) == datetime.datetime(
        2026, 11, 21, 15, tzinfo=datetime.UTC
    )
