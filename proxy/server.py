"""The embedded proxy: a lean mitmproxy master with only the addons egress-guard needs.

Not `mitmdump`: that would add ~30 addons every hook walks through, install its own signal
handlers and logging, and run a second process. `EgressProxy.start()` opens the audit log
(failing if it cannot be written), brings the listener up and returns the bound address,
or raises `StartupError` with the reason; `stop()` closes the listener and flushes every
pending audit row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from mitmproxy import options
from mitmproxy.addons import next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from egress_guard import addons
from egress_guard.addons import _mitm
from egress_guard.addons.budget_follower import BudgetFollower
from egress_guard.addons.killswitch import KillSwitch
from egress_guard.addons.timeouts import Timeouts
from egress_guard.ca import CAFiles, upstream_trust_file
from egress_guard.config import Config
from egress_guard.escalation import Escalations
from egress_guard.fakekeys import load_or_create_hmac_key
from egress_guard.keycache import KeyCache
from egress_guard.ledger import Ledger
from egress_guard.logscrub import LOG_SCRUBBER
from egress_guard.metrics import Metrics, MetricsServer
from egress_guard.reload import ConfigWatcher
from egress_guard.resolve import Resolver
from egress_guard.secrets import SecretStore, make_backend
from egress_guard.shared_ledger import SharedLedger
from egress_guard.store import AuditLog, open_engine
from egress_guard.unix_relay import UnixRelay, UnixRelayError
from egress_guard.verdicts import PolicyHolder

log = logging.getLogger("egress_guard")


class StartupError(Exception):
    """The proxy could not start; the message says why and what to do."""


class _Ready:
    """Tells `start()` that mitmproxy finished bringing its servers up."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def running(self) -> None:
        self.event.set()


class _ErrorCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class EgressProxy:
    def __init__(
        self,
        config: Config,
        *,
        listen: tuple[str, int] | None = None,
        timeouts: Timeouts | None = None,
        listen_unix: Path | None = None,
    ) -> None:
        self.config = config
        self.listen = listen or (config.listen_host, config.listen_port)
        self.listen_unix = listen_unix  # a Unix-socket entrance, relayed (network-less containers)
        self.relay: UnixRelay | None = None
        self.timeouts = timeouts or Timeouts.from_config(config)
        self.store = open_engine(config)  # opened and closed by the audit log, its one writer
        self.audit = AuditLog(self.store)
        self.resolver = Resolver(pinned=dict(config.pinned_hosts), allow_private=config.allow_private)
        # C2: on a shared store the key cache hears revocations (LISTEN/NOTIFY, started by the
        # kill switch) and refuses keys while it cannot confirm they are current
        listener = None
        if config.store is not None:  # psycopg is imported only for a PostgreSQL store
            from egress_guard.store.postgres.listen import Listener

            listener = Listener.for_store(config.store)
        self.keys = KeyCache(self.store, listener)
        self.secrets = SecretStore(make_backend(config.vault), ttl=config.secrets_cache_ttl)
        # C1: a fleet (store: PostgreSQL) admits calls in the store, shared by every replica
        self.ledger = SharedLedger(config.spend, self.store) if config.store is not None else Ledger(config.spend)
        self.budgets = BudgetFollower(self.store, self.audit, self.ledger)
        # the policy in force (a reload swaps it: proxy/reload.py), and the escalations it asks
        self.holder = PolicyHolder(config)
        self.escalations = Escalations(
            self.store, self.audit, self.holder, replica=config.store.replica if config.store is not None else None
        )
        self.watcher = ConfigWatcher(self.holder, self.audit)  # SIGHUP (main thread only: up) + a 1 s poll
        # Prometheus metrics (proxy/metrics.py), served by start() when the config asks
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        if config.metrics_listen is not None:
            self.metrics = Metrics(
                config.agents, (s.name for s in config.services), ledger=self.ledger, engine=self.store
            )
            self.metrics.follow(self.audit)
        self.master: Master | None = None
        self._scrubbing = False  # LOG_SCRUBBER installed by start()
        self._proxyserver: proxyserver.Proxyserver | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: list[Any] = []
        self.address: tuple[str, int] | None = None

    def options(self) -> dict[str, Any]:
        host, port = self.listen
        upstream_ca = upstream_trust_file(self.config.ca_dir, self.config.upstream_ca)
        return {
            "mode": [f"regular@{host}:{port}"],
            "confdir": str(self.config.ca_dir),
            # No upstream connection before the request is checked and its address vetted.
            "connection_strategy": "lazy",
            "upstream_cert": False,
            # Non-HTTP bytes inside a tunnel are parsed as HTTP and refused, never relayed raw.
            "rawtcp": False,
            "http3": False,
            "ssl_insecure": False,
            "ssl_verify_upstream_trusted_ca": str(upstream_ca) if upstream_ca else None,
            "tcp_timeout": self.config.idle_timeout,
            "websocket": True,
        }

    async def start(self) -> tuple[str, int]:
        LOG_SCRUBBER.install()  # before anything can log a secret; undone by stop()
        self._scrubbing = True
        if not CAFiles(self.config.ca_dir).exists():
            raise StartupError(f"no CA in {self.config.ca_dir}: run 'egress-guard init'")
        try:
            await self.audit.open()
        except Exception as exc:
            fix = (
                "fix its path or permissions in the config's audit.path"
                if self.config.store is None
                else "check that the server is up and store: in the config (URL, password_file or PGPASSWORD)"
            )
            what = (
                f"audit log {self.config.audit_path}"
                if self.config.store is None
                else f"store {self.config.store_name}"
            )
            raise StartupError(f"{what} cannot be opened for writing ({exc}); {fix}") from None
        if isinstance(self.ledger, SharedLedger):  # C1: before the first call is admitted
            try:
                await self.ledger.open(self.audit)
            except Exception as exc:
                await self.audit.close()
                raise StartupError(f"store {self.store.name}: the shared budgets cannot be read ({exc})") from None
        await self.keys.open()
        await self.budgets.load_spent()  # spend so far: budgets survive restarts
        hmac_key = load_or_create_hmac_key(self.config.ca_dir)
        try:
            _mitm.install()  # egress-guard answers failed flows, and records parser refusals
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        capture = _ErrorCapture()
        mitm_log = logging.getLogger("mitmproxy")
        mitm_log.addHandler(capture)
        try:
            self.master = Master(options.Options())
            ready = _Ready()
            self._proxyserver = proxyserver.Proxyserver()
            runtime = addons.Runtime(
                self.config,
                self.audit,
                self.resolver,
                self.keys,
                self.secrets,
                hmac_key,
                self._proxyserver,
                self.ledger,
                self.budgets,
                self.holder,
                self.escalations,
                self.timeouts,
                metrics=self.metrics,
            )
            flow_addons, self._background = addons.chain(runtime)
            if self.metrics is not None:  # revocation lag
                self.metrics.follow_revocations(next((t for t in self._background if isinstance(t, KillSwitch)), None))
            # The chain before NextLayer: its next_layer hook (a sandbox's explicit proxy
            # address, addons/sandboxes.py) must choose before mitmproxy's default does.
            self.master.addons.add(
                self._proxyserver,
                addons.Chain(flow_addons),
                next_layer.NextLayer(),
                tlsconfig.TlsConfig(),
                ready,
            )
            self.master.options.update(**self.options())
            self._task = asyncio.create_task(self.master.run(), name="egress-guard master")
            waiter = asyncio.create_task(ready.event.wait())
            await asyncio.wait([waiter, self._task], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            addrs = self._proxyserver.listen_addrs()
            if self._task.done() or not addrs:
                why = "; ".join(capture.messages) or "mitmproxy did not start a listener"
                await self.stop()
                raise StartupError(f"cannot listen on {self.listen[0]}:{self.listen[1]}: {why}")
        except StartupError:
            raise
        except Exception as exc:
            await self.stop()
            raise StartupError(f"proxy failed to start: {exc}") from exc
        finally:
            mitm_log.removeHandler(capture)
        self.master.addons.remove(ready)  # only needed for startup; every hook walks every addon
        for task in self._background:
            task.running()
        self.address = (str(addrs[0][0]), int(addrs[0][1]))
        if self.listen_unix is not None:
            self.relay = UnixRelay(self.listen_unix, self.address)
            try:
                await self.relay.start()
            except UnixRelayError as exc:
                await self.stop()
                raise StartupError(str(exc)) from None
        if self.metrics is not None and self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            try:
                self.metrics_server = self.metrics.serve(host, port)
            except OSError as exc:
                await self.stop()
                raise StartupError(
                    f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                    "change metrics.listen in the config"
                ) from None
        self.watcher.start()  # the proxy listens: a reload now has something to swap into
        return self.address

    def open_connections(self) -> int:
        """Agent connections open now (for the status file)."""
        return len(self._proxyserver.connections) if self._proxyserver is not None else 0

    @property
    def used_tun(self) -> bool:
        """A TUN device (a `run --isolate` sandbox) existed in this process: mitmproxy_rs's
        threads may then crash at interpreter exit, so `up` leaves with os._exit."""
        return any(getattr(task, "used_tun", False) for task in self._background)

    async def stop(self) -> int:
        """Close the listener, stop mitmproxy, flush the audit log. Returns rows lost (0)."""
        await self.watcher.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
            self.metrics_server = None
        if self.relay is not None:
            await self.relay.stop()
        for task in self._background:
            try:
                await task.done()
            except Exception as exc:  # the audit log is flushed whatever a background task does
                log.error("stopping %s failed: %r", getattr(task, "name", task), exc)
        if self._proxyserver is not None:
            with contextlib.suppress(Exception):
                await self._proxyserver.servers.update([])
        if self.master is not None and self._task is not None:
            self.master.shutdown()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        self.master = None
        await self.secrets.close()
        if self._scrubbing:
            LOG_SCRUBBER.uninstall()
            self._scrubbing = False
        return await self.audit.close()
