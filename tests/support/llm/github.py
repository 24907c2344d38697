"""The fake GitHub REST API: any path answers who the token belongs to."""

from __future__ import annotations

from support.llm.common import REAL, Fake, FakeAPI, Request


def user(api: FakeAPI, req: Request) -> None:
    api._json(200, {"login": "octocat"})


FAKE = Fake(
    hosts=("api.github.com",),
    authorized=lambda req: req.auth in (f"Bearer {REAL['github']}", f"token {REAL['github']}"),
    unauthorized={"message": "Bad credentials"},
    routes=[("*", "*", user)],
)
