"""`status`: what the running proxy runs (from the status file `up` keeps) and the state of
the store it shares with this command (pending approvals, a quick query).

The running proxy is only reachable through its status file: this command never connects to
the proxy, so it works as any user who can read the file and the store. It never prints a
secret: the store is named as `Config.store_name` names it (no password).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import click

from egress_guard import status as status_mod
from egress_guard import store
from egress_guard.cli.common import config_option, format_option
from egress_guard.config import DEFAULT_CONFIG_NAME, Config, ConfigError, load_config
from egress_guard.reload import digest_of, files_digest

NOT_RUNNING = 3  # the LSB exit status of `status` for "not running"
PENDING_LIMIT = 1000


@click.command()
@config_option
@format_option("text", "json")
def status(config_path: Path | None, fmt: str) -> None:
    """Show the running proxy: config digest and load time, rules, services and agents,
    open connections, the last reload, pending approvals and the store's health.

    Reads the status file `up` keeps next to the audit DB; says so plainly when no proxy
    runs for this config. While the file on disk does not load (a reload was refused) it
    still shows what runs, and the error. Exit status: 0 running and the store answers,
    1 the store does not answer, 2 the config on disk does not load, 3 no proxy running.

    \b
    Example:
      egress-guard status
      egress-guard status --format json | jq .digest
    """
    path = config_path or Path(DEFAULT_CONFIG_NAME)
    try:
        config: Config | None = load_config(path)
        broken = None
    except ConfigError as exc:  # what runs is still worth showing: that is when one asks
        config, broken = None, str(exc)
    report = gather(config, path, broken)
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render(report), nl=False)
    if broken is not None:
        raise SystemExit(2)
    if not report["running"]:
        raise SystemExit(NOT_RUNNING)
    if not report["store"]["ok"]:
        raise SystemExit(1)


def gather(config: Config | None, path: Path, broken: str | None = None) -> dict[str, Any]:
    """Everything `status` reports, as the JSON it prints. `config` None: the file at `path`
    does not load (`broken` says why); the running proxy is then found beside it."""
    file = path.resolve()
    running = status_mod.read(config) if config is not None else status_mod.find(file)
    on_disk = digest_of(config) if config is not None else files_digest((file,))
    status_file = status_mod.status_path(config) if config is not None else None
    out: dict[str, Any] = {"running": running is not None, "config": str(file), "config_error": broken}
    if running is None:
        if status_file is None:
            out["why"] = "no status file beside it names it"
        elif not status_file.exists():
            out["why"] = f"no status file at {status_file}"
        else:
            out["why"] = f"{status_file} is stale (its process is gone) or names another config"
        out["config_digest"] = on_disk
    else:
        out |= {
            "pid": running.pid,
            "listen": running.listen,
            "started_at": running.started_at,
            "digest": running.digest,
            "loaded_at": running.loaded_at,
            "config_digest": on_disk,
            "mode": running.mode,
            "unknown_hosts": running.unknown_hosts,
            "counts": running.counts,
            "connections": running.connections,
            "updated_at": running.updated_at,
            "last_reload": running.last_reload,
            "secrets_unresolved": sorted(n for n, s in running.services.items() if not s.resolves),
        }
    if config is None:
        out["store"], out["pending_approvals"] = {"name": None, "ok": None, "error": "the config does not load"}, None
    else:
        out["store"], out["pending_approvals"] = _store(config)
    return out


def _store(config: Config) -> tuple[dict[str, Any], int | None]:
    """The store's health (a quick query, timed) and the count of pending approvals."""
    name = config.store_name
    if config.store is None and not config.audit_path.exists():
        return {"name": name, "ok": False, "error": "no audit DB there (run 'egress-guard init')"}, None
    started = time.monotonic()
    try:
        with store.open_store(config) as db:
            db.last_id()
            ms = round((time.monotonic() - started) * 1000, 1)
            pending = len(db.approvals(status="pending", limit=PENDING_LIMIT))
    except store.StoreError as exc:
        return {"name": name, "ok": False, "error": str(exc)}, None
    except Exception as exc:  # a driver's message may name more than it should: the type only
        return {"name": name, "ok": False, "error": f"query failed ({type(exc).__name__})"}, None
    return {"name": name, "ok": True, "ms": ms}, pending


def render(r: dict[str, Any]) -> str:
    lines: list[str] = []
    if not r["running"]:
        default = Path(DEFAULT_CONFIG_NAME).resolve() == Path(r["config"])
        lines += [
            f"egress-guard: not running for {r['config']} ({r['why']})",
            "  start it:    egress-guard up" + ("" if default else f" --config {shlex.quote(r['config'])}"),
            f"  config:      {r['config']} (digest {r['config_digest'][:12]} on disk)",
        ]
    else:
        lines.append(f"egress-guard: running, pid {r['pid']}, listening on {r['listen']} since {r['started_at']}")
        digest = (r["digest"] or "")[:12] or "unknown (a proxy older than hot reload)"
        lines.append(f"  config:      {r['config']}")
        lines.append(f"  digest:      {digest}" + (f", loaded {r['loaded_at']}" if r["loaded_at"] else ""))
        if r["digest"] and r["config_digest"] != r["digest"] and not r["config_error"]:
            lines.append(
                f"               the file on disk differs ({r['config_digest'][:12]}): "
                f"not reloaded yet, or refused (see the last reload); reload: kill -HUP {r['pid']}"
            )
        last = r.get("last_reload")
        if last:
            verb = "applied" if last["applied"] else "REFUSED"
            lines.append(f"  last reload: {verb} at {last['at']}: {last['reason']}")
        if r["mode"]:
            lines.append(f"  policy:      mode {r['mode']}, unknown hosts {r['unknown_hosts']}")
        c = r["counts"]
        if c:
            lines.append(f"  rules:       {c.get('allow_rules', 0)} allow rules, {c.get('rules', 0)} rules")
            unresolved = r["secrets_unresolved"]
            lines.append(
                f"  services:    {c.get('services', 0)}"
                + (f" ({len(unresolved)} without a secret: {', '.join(unresolved)})" if unresolved else "")
            )
            lines.append(f"  agents:      {c.get('agents', 0)}")
        if r["connections"] is not None:
            lines.append(f"  connections: {r['connections']} open (at {r['updated_at']})")
    if r["config_error"]:
        lines.append(f"  ON DISK:     {r['config_error']}")
    pending = r["pending_approvals"]
    if pending is not None:
        more = "+" if pending >= PENDING_LIMIT else ""
        lines.append(f"  approvals:   {pending}{more} pending" + (" (egress-guard pending)" if pending else ""))
    s = r["store"]
    if s["ok"] is None:
        lines.append(f"  store:       unknown ({s['error']})")
    else:
        lines.append(f"  store:       {s['name']}: " + (f"ok ({s['ms']:g} ms)" if s["ok"] else f"NOT OK: {s['error']}"))
    return "\n".join(lines) + "\n"
