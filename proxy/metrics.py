"""Prometheus metrics: every metric egress-guard exports, its own registry, and the
`/metrics` server (prometheus-client's, in a thread of its own). Off unless the config has
`metrics: {listen: …}`.

What is counted comes from three places:
- the audit log's commits (`AuditLog.listeners`): requests and USD spent are counted from
  the rows as committed, so they match the audit log row for row;
- addons/metrics.py: latencies and upstream failures, from each flow's timestamps;
- read at scrape time, on the proxy's event loop (never from the server's thread, so no
  half-updated state is read): the audit backlog, budgets remaining, revocation lag, store
  errors.

Pure: no mitmproxy. Never a secret, and never an unbounded label: label values are names
from the config (agent, service; anything else reads "other"), fixed words (kind,
decision, scope, reason) and status classes — never a host, path, session, key id, store
URL or anything an agent chose.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from egress_guard.credentials import Agent
from egress_guard.ledger import Ledger
from egress_guard.store import AuditLog, Engine
from egress_guard.store.interface import Batch

log = logging.getLogger("egress_guard")

PREFIX = "egress_guard"
OTHER = "other"  # a label value for a name the config does not hold
FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
UPSTREAM_REASONS = ("connect_timeout", "tls_timeout", "response_timeout", "failed", "status_5xx")
SCRAPE_TIMEOUT = 2.0  # seconds the scrape waits for the event loop's snapshot


def status_class(status: int | None) -> str:
    """The status class, 2xx … 5xx; none when the agent got no status (the connection ended)."""
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


class Metrics:
    """The registry and the metrics; `committed` is an `AuditLog` listener, `response` and
    `upstream_error` are called by addons/metrics.py, the rest is read at scrape time."""

    def __init__(
        self,
        agents: dict[str, Agent],
        services: Iterable[str],
        *,
        audit: AuditLog | None = None,
        ledger: Ledger | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.agents = agents
        self.services = frozenset(services)
        self.audit = audit
        self.ledger = ledger
        self.engine = engine
        self.revocations: Any = None  # the KillSwitch (addons): last_lag, applied, current
        self.loop: asyncio.AbstractEventLoop | None = None  # where scrape-time values are read
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Audit rows committed (one per decision: request, CONNECT, WebSocket), by what was decided",
            ["kind", "decision", "service", "agent", "code"],
            registry=r,
        )
        self.spent = Counter(
            f"{PREFIX}_spent_usd",
            "USD spent, from the committed audit rows' cost_usd",
            ["agent", "service"],
            registry=r,
        )
        self.amended = Counter(
            f"{PREFIX}_audit_rows_amended",
            "Rows turned into errors after their commit (a response cut because its row was late); "
            "requests_total keeps their first decision",
            registry=r,
        )
        self.commit_seconds = Histogram(
            f"{PREFIX}_audit_commit_seconds", "Time one audit commit took (a batch of rows)", buckets=FAST, registry=r
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Forwarded requests: from the request's first byte to the response's end, as the agent saw it",
            ["service"],
            buckets=SLOW,
            registry=r,
        )
        self.upstream = Histogram(
            f"{PREFIX}_upstream_seconds",
            "Forwarded requests: from forwarding to the upstream's response headers (connect and TLS included)",
            ["service"],
            buckets=SLOW,
            registry=r,
        )
        self.overhead = Histogram(
            f"{PREFIX}_overhead_seconds",
            "Forwarded requests: egress-guard's own time (checks before forwarding, and after the "
            "response until it is released, its audit row committed)",
            ["service"],
            buckets=FAST,
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Forwarded requests the upstream failed: timeouts, unreachable/TLS/hang-up, 5xx answers",
            ["service", "reason"],
            registry=r,
        )
        for service in ("", *sorted(self.services)):  # zeros from the start: rate() needs a first sample
            for reason in UPSTREAM_REASONS:
                self.upstream_errors.labels(service, reason)
        self.revocation_lag = Histogram(
            f"{PREFIX}_revocation_apply_seconds",
            "Each applied revocation: from its time (the kill that wrote it) to when this replica applied it",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        r.register(_Live(self))
        ProcessCollector(registry=r)  # memory, CPU, open files of this replica

    # --- labels -----------------------------------------------------------------------------

    def agent(self, name: str | None) -> str:
        return "" if name is None else name if name in self.agents else OTHER

    def service(self, name: str | None) -> str:
        return "" if name is None else name if name in self.services else OTHER

    # --- from the audit log -------------------------------------------------------------------

    def follow(self, audit: AuditLog) -> None:
        self.audit = audit
        audit.listeners.append(self.committed)

    def committed(self, batch: Batch, seconds: float) -> None:
        """An `AuditLog` listener: count what one commit wrote (on the event loop)."""
        self.commit_seconds.observe(seconds)
        counts: collections.Counter[tuple[str, str, str, str, str]] = collections.Counter()
        usd: dict[tuple[str, str], Decimal] = collections.defaultdict(Decimal)
        for row in batch.rows:
            agent, service = self.agent(row.agent), self.service(row.service)
            counts[(row.kind, row.decision, service, agent, status_class(row.status))] += 1
            if row.cost_usd:
                with contextlib.suppress(InvalidOperation):  # the writer stores what pricing gave
                    usd[(agent, service)] += Decimal(row.cost_usd)
        for labels, n in counts.items():
            self.requests.labels(*labels).inc(n)
        for (agent, service), amount in usd.items():
            if amount > 0:
                self.spent.labels(agent, service).inc(float(amount))
        if batch.amends:
            self.amended.inc(len(batch.amends))

    # --- from the kill switch ----------------------------------------------------------------------

    def follow_revocations(self, follower: Any) -> None:
        """The KillSwitch (addons): its `last_lag`, `applied`, `current` are read at scrape, and
        each lag it reports (`on_lag`) is observed."""
        self.revocations = follower
        callbacks = getattr(follower, "on_lag", None)
        if isinstance(callbacks, list):
            callbacks.append(lambda lag: self.revocation_lag.observe(max(0.0, lag)))

    # --- from flows (addons/metrics.py) ---------------------------------------------------------

    def response(self, service: str | None, duration: float, upstream: float | None, overhead: float) -> None:
        label = self.service(service)
        self.duration.labels(label).observe(max(0.0, duration))
        if upstream is not None:
            self.upstream.labels(label).observe(max(0.0, upstream))
        self.overhead.labels(label).observe(max(0.0, overhead))

    def upstream_error(self, service: str | None, reason: str) -> None:
        self.upstream_errors.labels(self.service(service), reason).inc()

    # --- read at scrape time ----------------------------------------------------------------------

    def snapshot(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        """The values read at scrape time. Runs on the event loop (`_Live.collect`)."""
        out: list[GaugeMetricFamily | CounterMetricFamily] = []
        audit = self.audit
        if audit is not None:
            backlog = audit.backlog
            out.append(GaugeMetricFamily(f"{PREFIX}_audit_backlog", "Audit items queued, not yet committed", backlog))
            out.append(
                GaugeMetricFamily(
                    f"{PREFIX}_audit_healthy", "1 while the audit log accepts requests, else 0", int(audit.healthy)
                )
            )
        errors = CounterMetricFamily(
            f"{PREFIX}_store_errors", "Store operations that failed: audit commits (write), reads", labels=["op"]
        )
        if audit is not None:
            errors.add_metric(["write"], audit.failures)
        reads = getattr(self.engine, "read_failures", None)
        if isinstance(reads, int):
            errors.add_metric(["read"], reads)
        out.append(errors)
        if self.ledger is not None:
            out.extend(self._budgets(self.ledger))
        out.extend(self._revocations())
        return out

    def _budgets(self, ledger: Ledger) -> list[GaugeMetricFamily]:
        limit = GaugeMetricFamily(
            f"{PREFIX}_budget_limit_usd", "The budget in force (config or budget set)", labels=["agent", "scope"]
        )
        remaining = GaugeMetricFamily(
            f"{PREFIX}_budget_remaining_usd",
            "Budget left: limit - spent - reserved (negative: overshot by the last call)",
            labels=["agent", "scope"],
        )
        day = ledger.day()
        for name, agent in self.agents.items():
            keys = dict(ledger.keys(name, "", day))
            for scope in ("day", "total"):  # a session budget has one series per session: not here
                cap = ledger.limit(agent.limits, name, scope, "")
                if cap is None:
                    continue
                key = keys[scope]
                left = cap - ledger.spent.get(key, Decimal(0)) - ledger.reserved.get(key, Decimal(0))
                limit.add_metric([name, scope], float(cap))
                remaining.add_metric([name, scope], float(left))
        return [limit, remaining]

    def _revocations(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        follower = self.revocations
        if follower is None:
            return []
        out: list[GaugeMetricFamily | CounterMetricFamily] = []
        lag = getattr(follower, "last_lag", None)
        if isinstance(lag, int | float):
            out.append(
                GaugeMetricFamily(
                    f"{PREFIX}_revocation_lag_seconds",
                    "From the newest revocation's time to when this replica applied it",
                    float(lag),
                )
            )
        applied = getattr(follower, "applied", None)
        if isinstance(applied, int):
            out.append(CounterMetricFamily(f"{PREFIX}_revocations_applied", "Revocations applied here", applied))
        current = getattr(follower, "current", None)
        if isinstance(current, bool):
            out.append(
                GaugeMetricFamily(
                    f"{PREFIX}_revocations_current",
                    "1 while this replica can confirm its revocations are current (else it refuses keys)",
                    int(current),
                )
            )
        return out

    # --- the server ---------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics on host:port (call on the event loop). Raises OSError if it cannot listen."""
        self.loop = asyncio.get_running_loop()
        server = MetricsServer(self.registry, host, port)
        log.info("metrics served at %s", server.url)
        if not _loopback(host):
            log.warning(
                "metrics served on %s:%d, beyond loopback: whoever reaches it reads agent names and spend",
                host,
                server.address[1],
            )
        return server


class _Live(Collector):
    """The scrape-time values, read on the event loop: the proxy changes them there, and a
    scrape runs in the server's thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._stuck = False

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        loop, ok = self.metrics.loop, True
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        try:
            families = _on_loop(loop, self.metrics.snapshot) if loop is not None else self.metrics.snapshot()
        except Exception as exc:
            ok = False
            if not self._stuck:  # once per episode: a scrape every few seconds would flood the log
                log.warning("metrics: the proxy's state could not be read (%r); scraping counters only", exc)
            self._stuck = True
        else:
            self._stuck = False
        yield from families
        yield GaugeMetricFamily(
            f"{PREFIX}_event_loop_responsive",
            f"1 if the proxy's event loop answered the scrape within {SCRAPE_TIMEOUT:g} s",
            int(ok),
        )


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    if loop.is_closed():
        raise RuntimeError("the proxy's event loop is closed")
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:  # already on it (a test calling the registry directly)
        return fn()
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done.result(timeout=SCRAPE_TIMEOUT)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class MetricsServer:
    """prometheus-client's HTTP server on host:port (port 0: any free one), in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.httpd, self.thread = start_http_server(port, host, registry=registry)
        bound = self.httpd.server_address
        self.address: tuple[str, int] = (str(bound[0]), int(bound[1]))
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"http://{host}:{self.address[1]}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket (blocks up to half a second: call off the loop)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
