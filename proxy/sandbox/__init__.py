"""Local containment for `egress-guard run --isolate` (Linux, root).

A sandbox is a private network, mount and PID namespace. Its only interface besides
loopback is a TUN device that the running `egress-guard up` holds (mitmproxy's `tun` mode)
and that the launcher moves into the sandbox's network namespace: everything the agent
sends goes to egress-guard and nowhere else. The command runs as an unprivileged user
with no_new_privs; SIGKILL of the sandbox's PID 1 ends every process in it.

`launcher` starts a sandbox (host side); `stage` is what runs inside (its own process,
`python -m egress_guard.sandbox.stage`); `control` speaks to `up`'s control socket;
`isolate` puts them together for the `run --isolate` command. No mitmproxy here.
"""

from __future__ import annotations

from egress_guard.sandbox.launcher import Sandbox, SandboxError, SandboxSpec, preflight, start

__all__ = ["Sandbox", "SandboxError", "SandboxSpec", "preflight", "start"]
