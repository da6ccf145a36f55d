"""A prometheus_client collector for Servers and Clients.

    from prometheus_client import REGISTRY, start_http_server
    from remotedialer_py.prometheus import Collector

    REGISTRY.register(Collector(srv, cli))
    start_http_server(9100)

It yields the families of the engine's own ``GET /metrics``, with the same
names, labels and HELP texts:

- The Go library's counters (``session_server_total_*``) are *untyped*
  families: prometheus_client appends ``_total`` to the name of every counter
  it exposes, which would rename them (``..._add_connections_total``) and
  break dashboards written for Go. Prometheus stores and queries an untyped
  series like any other (``rate()`` works).
- Our gauges (``remotedialer_*``) are gauges.
- ``process_*`` is left out unless ``process=True``: prometheus_client's
  default registry already has a process collector with those names.

One Collector covers several Servers and Clients (pass them all, or
``add()`` them later). Families they share are merged, as in a Go process
whose server and client count into the same global counters: per-object
figures are summed per label set, engine-wide ones (heap, loop handles,
buffered bytes) appear once. Registering a second Collector on the same
registry raises prometheus_client's ``Duplicated timeseries`` ValueError.
A closed Server or Client drops out (its counters with it).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterator, Union

try:
    from prometheus_client.metrics_core import Metric
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("remotedialer_py.prometheus needs prometheus_client: "
                      "pip install 'remotedialer-py[prometheus]'") from exc

if TYPE_CHECKING:
    from .client import Client
    from .server import Server

Source = Union["Server", "Client"]

# name -> (type, HELP, engine-wide), as the engine's exposition has them
# (tests/test_prometheus.py checks this table against it).
FAMILIES: dict[str, tuple[str, str, bool]] = {
    "session_server_total_add_websocket_session":
        ("counter", "Total count of added websocket sessions", False),
    "session_server_total_remove_websocket_session":
        ("counter", "Total count of removed websocket sessions", False),
    "session_server_total_add_connections":
        ("counter", "Total count of added connections", False),
    "session_server_total_remove_connections":
        ("counter", "Total count of removed connections", False),
    "session_server_total_transmit_bytes": ("counter", "Total bytes transmitted", False),
    "session_server_total_transmit_error_bytes":
        ("counter", "Total error bytes transmitted", False),
    "session_server_total_receive_bytes": ("counter", "Total bytes received", False),
    "session_server_total_peer_ws_attempt":
        ("counter", "Total count of attempts to establish websocket session to other "
         "rancher-server", False),
    "session_server_total_peer_ws_connected":
        ("counter", "Total count of connected websocket sessions to other rancher-server",
         False),
    "session_server_total_peer_ws_disconnected":
        ("counter", "Total count of disconnected websocket sessions from other "
         "rancher-server", False),
    "remotedialer_open_sessions": ("gauge", "Open tunnel sessions", False),
    "remotedialer_open_connections": ("gauge", "Open tunneled connections", False),
    "remotedialer_agent_connect_attempts_total":
        ("counter", "Connection attempts of the agent, by server URL", False),
    "remotedialer_agent_connect_failures_total":
        ("counter", "Failed connection attempts of the agent, by server URL", False),
    "remotedialer_buffered_bytes":
        ("gauge", "Bytes queued in the engine, toward local sockets or the tunnel", True),
    "remotedialer_engine_heap_bytes": ("gauge", "Bytes allocated by the engine", True),
    "remotedialer_engine_heap_objects": ("gauge", "Objects allocated by the engine", True),
    "remotedialer_engine_pool_bytes":
        ("gauge", "Bytes of the engine heap held idle in buffer pools", True),
    "remotedialer_loop_handles": ("gauge", "Handles alive on the engine's loop", True),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes.", True),
    "process_open_fds": ("gauge", "Number of open file descriptors.", True),
}


def _family(name: str) -> Metric:
    typ, doc, _ = FAMILIES.get(name, ("counter", "", False))
    # "unknown" is printed as "untyped" in the text format, keeping the name.
    return Metric(name, doc, "gauge" if typ == "gauge" else "unknown")


class Collector:
    """Collects the metrics of the given Servers and Clients for a
    prometheus_client registry; ``process=True`` adds ``process_*``."""

    def __init__(self, *sources: Source, process: bool = False) -> None:
        self.process = process
        self._lock = threading.Lock()
        self._sources: list[Source] = []
        for source in sources:
            self.add(source)

    def add(self, source: Source) -> None:
        """Includes another Server or Client from the next scrape on."""
        if not callable(getattr(source, "metrics", None)):
            raise TypeError(f"expected a Server or Client, not {type(source).__name__}")
        with self._lock:
            if not any(s is source for s in self._sources):
                self._sources.append(source)

    def remove(self, source: Source) -> None:
        """Leaves a Server or Client out from the next scrape on."""
        with self._lock:
            self._sources = [s for s in self._sources if s is not source]

    def _names(self) -> list[str]:
        return [n for n in FAMILIES if self.process or not n.startswith("process_")]

    def describe(self) -> list[Metric]:
        """Every family this collector may yield (without samples), so that a
        registry finds clashes when the collector is registered."""
        return [_family(name) for name in self._names()]

    def collect(self) -> Iterator[Metric]:
        """The families with their samples now, merged over the sources
        (called by the registry on every scrape)."""
        with self._lock:
            sources = list(self._sources)
        merged: dict[str, dict[tuple, float]] = {}
        for source in sources:
            if getattr(source, "closed", False):
                self.remove(source)
                continue
            try:
                metrics = source.metrics()
            except Exception:  # noqa: BLE001 - closed meanwhile, or not started yet
                continue
            for name, samples in metrics.items():
                if name.startswith("process_") and not self.process:
                    continue
                engine_wide = FAMILIES.get(name, ("", "", False))[2]
                into = merged.setdefault(name, {})
                if engine_wide:
                    if not into:
                        into.update(samples)
                    continue
                for labels, value in samples.items():
                    into[labels] = into.get(labels, 0) + value
        for name in sorted(merged):
            family = _family(name)
            for labels, value in sorted(merged[name].items()):
                family.add_sample(name, dict(labels), float(value))
            yield family
