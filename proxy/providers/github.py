"""GitHub's REST API: nothing metered, only its error shape (`message`, `documentation_url`)."""

from __future__ import annotations

from typing import Any

from egress_guard.providers.base import BaseProvider


class GitHub(BaseProvider):
    name = "github"

    def error_body(self, ours: dict[str, Any], status: int) -> dict[str, Any]:
        return {
            "message": ours["message"],
            "documentation_url": "https://github.com/egress-guard",
            "egress_guard": ours,
        }
