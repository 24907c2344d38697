"""The `egress-guard` command line: one click group, one module per command family.

Each command's docstring is its --help, with an example. Library errors become
`click.ClickException`s that name the problem and the fix; a bad config exits 2 before
anything listens. Shared options and output live in `common` and `output`.
"""

from __future__ import annotations

import click

from egress_guard.cli import (
    agent_env,
    approvals,
    audit,
    budget,
    check,
    console,
    doctor,
    keys,
    policy,
    status,
    store_copy,
    up,
)
from egress_guard.store import StoreError


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except StoreError as exc:  # the store (a PostgreSQL server) unreachable mid-command: exit 1, say which
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="egress-guard")
def main() -> None:
    """egress-guard: a default-deny, auditing TLS egress proxy for AI agents.

    \b
    Quick start:
      egress-guard up                      # creates config, CA, DB if missing; runs the proxy
      egress-guard run -- python agent.py  # runs an agent through it
      egress-guard audit --since 1h        # what did it do?
    """


main.add_command(up.init)
main.add_command(up.up)
main.add_command(agent_env.env)
main.add_command(agent_env.run)
main.add_command(audit.audit)
main.add_command(keys.keys)
main.add_command(keys.kill)
main.add_command(doctor.doctor)
main.add_command(budget.budget)
main.add_command(store_copy.store)
main.add_command(check.check)
main.add_command(check.config)
main.add_command(approvals.pending)
main.add_command(approvals.approve)
main.add_command(approvals.deny)
main.add_command(approvals.revoke_grant)
main.add_command(approvals.unfreeze)
main.add_command(policy.policy)
main.add_command(status.status)
main.add_command(console.console)
