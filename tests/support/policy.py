"""A policy for unit tests of the guards: what `PolicyHolder.current` gives them, without a
config file."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from egress_guard.policy import Rule
from egress_guard.verdicts import Policy


class FixedPolicy:
    """A holder whose policy never changes: the allowlist `rules`, and Policy's other fields."""

    def __init__(self, rules: Iterable[Rule] = (), **fields: Any) -> None:
        self.current = Policy(allowlist=tuple(rules), **fields)
