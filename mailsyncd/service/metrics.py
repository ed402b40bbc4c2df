"""Prometheus metrics of the daemon's runs, per account, and of its share of the work, per node."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from mailsyncd.sync.effects import Counts

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)  # seconds


class Metrics:
    """Prometheus metrics in a registry of their own, served on 127.0.0.1 only if asked,
    with the process's own (memory, CPU, open files) beside them.

    The per-node series are labelled with the daemon's identity (host:node), so that the
    daemons sharing one state can be told apart, and summed, in one Prometheus.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        labels = ["account"]
        self.messages = Counter("mailsyncd_messages_synced", "Messages stored", labels, registry=self.registry)
        self.bytes = Counter("mailsyncd_bytes_synced", "Bytes of messages stored", labels, registry=self.registry)
        self.errors = Counter("mailsyncd_sync_errors", "Failed account runs and folder errors", labels,
                              registry=self.registry)
        self.last_success = Gauge("mailsyncd_last_success_timestamp_seconds",
                                  "When the account last synced without an account error", labels,
                                  registry=self.registry)
        self.duration = Histogram("mailsyncd_sync_duration_seconds", "How long the account's runs took",
                                  labels, buckets=DURATION_BUCKETS, registry=self.registry)
        self.holding = Gauge("mailsyncd_node_accounts_held", "Accounts this daemon holds (syncs) now",
                             ["node"], registry=self.registry)
        # Counters, as these only grow: rate() gives skips per second per node.
        self.skipped_busy = Counter("mailsyncd_node_runs_skipped_busy",
                                    "Runs skipped because another daemon held the account", ["node"],
                                    registry=self.registry)
        self.skipped_capped = Counter("mailsyncd_node_runs_skipped_host_cap",
                                      "Runs skipped because the server host had host_logins syncs already",
                                      ["node"], registry=self.registry)
        for metric in (self.holding, self.skipped_busy, self.skipped_capped):
            metric.labels(node)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._server: Any = None

    def serve(self, port: int) -> None:
        try:
            self._server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as error:
            log.error("metrics: cannot listen on 127.0.0.1:%d: %s; going on without metrics", port, error)
            return
        log.info("metrics: serving on http://127.0.0.1:%d/metrics", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def known(self, account: str) -> None:
        """Export the account's counters at 0 from the start: a series that appears only
        with its first error is one that rate() and alerts miss."""
        for metric in (self.messages, self.bytes, self.errors, self.duration):
            metric.labels(account)

    def forget(self, account: str) -> None:
        """The account left the config: its series end."""
        for metric in (self.messages, self.bytes, self.errors, self.duration, self.last_success):
            with contextlib.suppress(KeyError):  # last_success exists only after a success
                metric.remove(account)

    def ran(self, account: str, seconds: float) -> None:
        """A run ended, however it ended."""
        self.duration.labels(account).observe(seconds)

    def succeeded(self, account: str, counts: Counts) -> None:
        self.messages.labels(account).inc(counts.fetched)
        self.bytes.labels(account).inc(counts.fetched_bytes)
        if counts.errors:
            self.errors.labels(account).inc(len(counts.errors))
        self.last_success.labels(account).set(time.time())

    def failed(self, account: str) -> None:
        self.errors.labels(account).inc()

    def count_holding(self, held: Callable[[], int]) -> None:
        """Read the accounts held now from ``held`` at each scrape."""
        self.holding.labels(self.node).set_function(held)

    def busy(self) -> None:
        """Another daemon held the account: no run here."""
        self.skipped_busy.labels(self.node).inc()

    def capped(self) -> None:
        """The account's host had its share of logins: no run here this time."""
        self.skipped_capped.labels(self.node).inc()
