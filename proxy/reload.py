"""Hot reload: `ConfigWatcher` re-reads the config file on SIGHUP or when it (or a preset file
it read) changes, and swaps the running policy — nothing else.

What a reload may change is the policy: the allowlist (`allow:`, presets), `rules:`, `mode`,
`unknown_hosts`, `escalation` and `freeze`. Everything else (listen address, store, CA,
services, agents, secrets, spend, network) is bound into objects the proxy built at start
(the listener, the ledger and its budgets, the key cache, open connections): a new file that
changes any of it is refused as a whole, naming the keys and saying to restart, and the
running config stays. So budgets, keys and live streams survive a reload by construction —
the only thing that changes is `PolicyHolder.current`, which each flow reads once and keeps,
so a request in flight finishes under the policy it started with.

A file that does not load is refused with the same message `up` prints for it; the old
policy keeps serving. Both outcomes are audit rows (kind `event`, method `reload` or
`reload-rejected`, rule = the new config's digest, first 12 hex) and log lines. The file is
read and compiled in a thread, never on the event loop. Never logs a secret: a config holds
only references to them, and `ConfigError` texts name keys, not values.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from egress_guard.config import Config, ConfigError, load_config
from egress_guard.config.fleet import StoreSettings
from egress_guard.store.records import AuditRow
from egress_guard.timeutil import now_iso
from egress_guard.verdicts import CelRule

if TYPE_CHECKING:
    from egress_guard.store import AuditLog

log = logging.getLogger("egress_guard.reload")

POLL_EVERY = 1.0  # seconds between two looks at the files' mtime, size and inode
SETTLE = 0.3  # a changed file must look the same this long before it is read (an editor mid-write)

# Config fields a reload may change (the policy and what identifies the file); every other
# field must be equal, or the new file is refused.
RELOADABLE = frozenset({"policy", "rules", "presets", "digest", "files", "path"})

# The config key a Config field comes from, as the refusal names it.
KEYS = {
    "listen_host": "listen",
    "listen_port": "listen",
    "audit_path": "audit.path",
    "audit_query_strings": "audit.query_strings",
    "audit_synchronous": "audit.synchronous",
    "allow_private": "network.allow_private",
    "pinned_hosts": "network.hosts",
    "upstream_ca": "network.upstream_ca",
    "idle_timeout": "network.idle_timeout",
    "connect_timeout": "network.connect_timeout",
    "tls_timeout": "network.tls_timeout",
    "response_timeout": "network.response_timeout",
    "header_timeout": "network.header_timeout",
    "service_env_vars": "services",
    "secrets_backend": "secrets.backend",
    "vault": "secrets.vault",
    "secrets_cache_ttl": "secrets.cache_ttl",
    "metrics_listen": "metrics.listen",
}


class Holder(Protocol):
    """What the watcher needs of `verdicts.PolicyHolder`."""

    @property
    def config(self) -> Config: ...

    @property
    def loaded_at(self) -> str: ...

    def swap(self, config: Config) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """One reload attempt. `applied`: the holder now runs the new config; `changed`: the file's
    digest differs from the running one (an unchanged file is neither applied nor refused)."""

    applied: bool
    changed: bool
    digest: str | None  # the new file's (sha256 hex); None when it could not be read at all
    old_digest: str
    reason: str  # what changed, or why it was refused
    at: str = field(default_factory=now_iso)

    @property
    def rejected(self) -> bool:
        return self.changed and not self.applied


def digest_of(config: Config) -> str:
    """The config's digest (its file's and its presets' bytes); for a Config built in code
    without one, the file's."""
    return config.digest or files_digest((config.path,))


def files_of(config: Config) -> tuple[Path, ...]:
    """The files a config was read from: the config file and the preset files it names."""
    return config.files or (config.path,)


def files_digest(files: Iterable[Path]) -> str:
    """sha256 over the bytes of `files` (those that can be read): the digest a file that does
    not load is recorded with, so a refusal still says which bytes were refused."""
    h = hashlib.sha256()
    for f in files:
        with contextlib.suppress(OSError):
            h.update(Path(f).read_bytes())
    return h.hexdigest()


def fixed_keys(old: Config, new: Config) -> list[str]:
    """The config keys that differ between `old` and `new` outside what a reload may change,
    in file order, each once."""
    keys: list[str] = []
    for f in dataclasses.fields(old):
        if f.name in RELOADABLE:
            continue
        if f.name == "store" and _same_store(old.store, new.store):
            continue
        if getattr(old, f.name) != getattr(new, f.name, None):
            key = KEYS.get(f.name, f.name)
            if key not in keys:
                keys.append(key)
    # a callback server is bound at start: its address is not the policy's to change
    if old.policy.escalation.callback_listen != new.policy.escalation.callback_listen:
        keys.append("escalation.webhook.callback_listen")
    return keys


def _same_store(old: StoreSettings | None, new: StoreSettings | None) -> bool:
    """A store without `replica:` gets a random default name at each load (`default_replica`):
    such a name is not a change — the running replica keeps its own."""
    if old is None or new is None or old == new:
        return old == new
    default = re.fullmatch(re.escape(socket.gethostname()) + r"-[0-9a-f]{6}", new.replica) is not None
    return default and dataclasses.replace(new, replica=old.replica) == old


def what_changed(old: Config, new: Config) -> str:
    """A short account of the policy's changes, for the log and the audit row."""
    parts: list[str] = []
    if len(old.rules) != len(new.rules) or old.rules != new.rules:
        parts.append(f"allow rules {len(old.rules)} -> {len(new.rules)}")
    if old.presets != new.presets:
        parts.append(f"presets {','.join(old.presets) or '-'} -> {','.join(new.presets) or '-'}")
    po, pn = old.policy, new.policy
    if len(po.rules) != len(pn.rules):
        parts.append(f"rules {len(po.rules)} -> {len(pn.rules)}")
    elif [_rule_key(r) for r in po.rules] != [_rule_key(r) for r in pn.rules]:
        parts.append("rules edited")
    if po.mode != pn.mode:
        parts.append(f"mode {po.mode} -> {pn.mode}")
    if po.unknown_hosts != pn.unknown_hosts:
        parts.append(f"unknown_hosts {po.unknown_hosts} -> {pn.unknown_hosts}")
    if po.escalation != pn.escalation:
        parts.append("escalation changed")
    if po.freeze != pn.freeze:
        parts.append("freeze changed")
    return ", ".join(parts) or "the files changed, not what they allow"


def _rule_key(rule: CelRule) -> tuple[object, ...]:
    return (rule.id, rule.action, rule.expression.source, rule.hosts, rule.reason)


def _signature(files: Iterable[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    """What the poll compares: (mtime_ns, size, inode) per file, None for a missing one. An
    editor that writes a new file and renames it over the old changes the inode; one that
    rewrites in place changes mtime or size."""
    out: list[tuple[int, int, int] | None] = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class ConfigWatcher:
    """Reloads the holder's config on SIGHUP, on a change of any file it was read from (polled
    every `poll` seconds), or on `reload_now()`; one reload at a time.

    `audit`: where the `reload` / `reload-rejected` event rows go (None: log only).
    `signals`: listen for SIGHUP — only possible in the main thread (`up`); a proxy run in
    a thread (the tests) calls `reload_now()`. `listeners` are called on the event loop after
    each outcome (the status file). `loader` reads a file into a Config (`load_config`).
    """

    def __init__(
        self,
        holder: Holder,
        audit: AuditLog | None = None,
        *,
        signals: bool = True,
        poll: float | None = POLL_EVERY,
        settle: float = SETTLE,
        loader: Callable[[Path], Config] = load_config,
    ) -> None:
        self.holder = holder
        self.audit = audit
        self.signals = signals
        self.poll = poll
        self.settle = settle
        self.loader = loader
        self.listeners: list[Callable[[Outcome], None]] = []
        self.last: Outcome | None = None  # the latest attempt that changed something
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._sighup: asyncio.Task[Outcome] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_signal = False
        self._files = files_of(holder.config)
        self._seen = _signature(self._files)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start watching (call from the running loop, once the proxy listens)."""
        self._loop = loop or asyncio.get_running_loop()
        self._files = files_of(self.holder.config)
        self._seen = _signature(self._files)
        if self.signals and threading.current_thread() is threading.main_thread():
            self._loop.add_signal_handler(signal.SIGHUP, self._hangup)
            self._on_signal = True
        if self.poll:
            self._task = self._loop.create_task(self._watch(), name="egress-guard config watcher")

    async def close(self) -> None:
        """Stop watching; a reload under way is let finish (it only swaps a reference)."""
        if self._on_signal and self._loop is not None:
            # not removed: SIGHUP's default would end the process while the audit log flushes;
            # the loop's own close restores the default
            self._loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP ignored: egress-guard is stopping")
            self._on_signal = False
        for task in (self._task, self._sighup):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._task = None

    def _hangup(self) -> None:
        log.info("SIGHUP: reloading %s", self.holder.config.path)
        if self._sighup is None or self._sighup.done():  # a burst of signals: one reload
            assert self._loop is not None
            self._sighup = self._loop.create_task(self.reload_now("SIGHUP"))

    async def _watch(self) -> None:
        assert self.poll
        while True:
            await asyncio.sleep(self.poll)
            try:
                now = await asyncio.to_thread(_signature, self._files)
                if now == self._seen:
                    continue
                while True:  # debounce: read it once it has stopped changing
                    await asyncio.sleep(self.settle)
                    again = await asyncio.to_thread(_signature, self._files)
                    if again == now:
                        break
                    now = again
                if now != self._seen:  # not back as it was
                    await self.reload_now("file changed", seen=now)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the watching (nor the proxy)
                log.exception("config watcher: checking %s failed", self.holder.config.path)

    async def reload_now(self, why: str = "requested", *, seen: Any = None) -> Outcome:
        """Read the config file again and swap it in if it loads and changes only the policy.
        Never raises for a bad file: the outcome says what happened."""
        async with self._lock:
            old = self.holder.config
            old_digest = digest_of(old)
            files = files_of(old)
            before = seen if seen is not None else await asyncio.to_thread(_signature, files)
            try:
                new = await asyncio.to_thread(self.loader, old.path)
            except ConfigError as exc:
                self._seen = before  # watch for the next edit, not this broken one again
                digest = await asyncio.to_thread(files_digest, files)
                return self._done(Outcome(False, True, digest, old_digest, str(exc)), why, old)
            except Exception as exc:  # a loader bug: refuse, keep serving, say what
                self._seen = before
                return self._done(
                    Outcome(False, True, None, old_digest, f"reading {old.path} failed ({type(exc).__name__}: {exc})"),
                    why,
                    old,
                )
            digest = digest_of(new)
            new_files = files_of(new)
            self._seen = before if new_files == files else await asyncio.to_thread(_signature, new_files)
            if digest == old_digest:
                log.info("config %s: unchanged (%s, %s)", old.path, digest[:12], why)
                return Outcome(False, False, digest, old_digest, "unchanged")
            keys = fixed_keys(old, new)
            if keys:
                reason = f"{', '.join(keys)} changed: restart egress-guard to apply them; the running config stays"
                return self._done(Outcome(False, True, digest, old_digest, reason), why, old)
            self.holder.swap(new)
            self._files = new_files
            return self._done(Outcome(True, True, digest, old_digest, what_changed(old, new)), why, old)

    def _done(self, outcome: Outcome, why: str, old: Config) -> Outcome:
        self.last = outcome
        new12 = (outcome.digest or "unreadable")[:12]
        old12 = outcome.old_digest[:12]
        if outcome.applied:
            log.info("config %s reloaded (%s): %s -> %s: %s", old.path, why, old12, new12, outcome.reason)
            reason = f"{old12} -> {new12}: {outcome.reason}"
        else:
            log.error("config reload refused (%s): %s; still running %s (%s)", why, outcome.reason, old.path, old12)
            reason = f"still running {old12}: {outcome.reason}"
        if self.audit is not None:
            self.audit.record(
                AuditRow(
                    ts=now_iso(),
                    request_id=str(uuid.uuid4()),
                    kind="event",
                    decision="allow" if outcome.applied else "deny",
                    method="reload" if outcome.applied else "reload-rejected",
                    rule=new12,
                    reason=reason[:1000],
                )
            )
        for listener in self.listeners:
            try:
                listener(outcome)
            except Exception:
                log.exception("config watcher: a reload listener failed")
        return outcome
