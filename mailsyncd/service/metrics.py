"""Prometheus metrics of the daemon's runs, per account."""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from mailsyncd.sync.run import Counts

log = logging.getLogger(__name__)


class Metrics:
    """Prometheus metrics in a registry of their own, served on 127.0.0.1 only if asked."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["account"]
        self.messages = Counter("mailsyncd_messages_synced", "Messages stored", labels, registry=self.registry)
        self.bytes = Counter("mailsyncd_bytes_synced", "Bytes of messages stored", labels, registry=self.registry)
        self.errors = Counter("mailsyncd_sync_errors", "Failed account runs and folder errors", labels,
                              registry=self.registry)
        self.last_success = Gauge("mailsyncd_last_success_timestamp_seconds",
                                  "When the account last synced without an account error", labels,
                                  registry=self.registry)
        self.duration = Gauge("mailsyncd_sync_duration_seconds", "How long the account's last run took",
                              labels, registry=self.registry)
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

    def ran(self, account: str, seconds: float) -> None:
        """A run ended, however it ended."""
        self.duration.labels(account).set(seconds)

    def succeeded(self, account: str, counts: Counts) -> None:
        self.messages.labels(account).inc(counts.fetched)
        self.bytes.labels(account).inc(counts.fetched_bytes)
        if counts.errors:
            self.errors.labels(account).inc(len(counts.errors))
        self.last_success.labels(account).set(time.time())

    def failed(self, account: str) -> None:
        self.errors.labels(account).inc()
