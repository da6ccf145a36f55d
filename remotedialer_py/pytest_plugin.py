"""pytest plugin: find tunnel leaks in your own test suite.

Registered automatically (entry point ``pytest11``) when remotedialer-py is
installed; disable with ``-p no:remotedialer_py``.

``tunnel_leak_check`` (fixture): records the engine's figures and the process's
open file descriptors before the test; after it, waits up to SETTLE_SECONDS for
open connections, open sessions and fds to come back to that baseline, and
fails the test listing what stayed open: engine figures over baseline, the open
connections of every live Server, unbalanced connection counters, and each fd
over baseline with what it points to. Fixtures of wider scope (a module-scoped
Server) are set up before it, so their sockets are part of the baseline.

The engine heap is measured after returning the engine's idle pools
(``engine_trim()``), so it counts only memory in use. Its growth over the
baseline is reported with any other problem, and fails the test on its own
when the test sets ``tunnel_leak_check.heap_margin`` (bytes) or calls
``tunnel_leak_check.check(heap_margin=...)``: useful once every Server and
Client the test made is closed, since live ones legitimately grow (label
sets, tables).

``--tunnel-leak-check`` (command line) or ``tunnel_leak_check = true``
(ini file): applies the fixture to every test.

An open connection that ``Server.dial`` made is reported with where it was
dialed (``file:line``, the nearest caller outside this package).

``assert_balanced(server_or_client)``: raises AssertionError unless every label
set of the connection counters (and, unless ``sessions=False``, of the
websocket session counters) has as many removals as additions.

Importing this module does not load the C extension; the fixture does.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from typing import Any, Iterable, Optional

import pytest

SETTLE_SECONDS = 5.0
POLL_SECONDS = 0.01

CONNECTION_FAMILIES = ("session_server_total_add_connections",
                       "session_server_total_remove_connections")
SESSION_FAMILIES = ("session_server_total_add_websocket_session",
                    "session_server_total_remove_websocket_session")

_engine_warmed = False


def _labels(key: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in key) + "}"


def unbalanced(metrics: dict, add: str, remove: str) -> list[str]:
    """Label sets of `add` whose count differs from `remove`'s, described."""
    adds, removes = metrics.get(add, {}), metrics.get(remove, {})
    out = []
    for key in sorted(set(adds) | set(removes)):
        a, r = adds.get(key, 0), removes.get(key, 0)
        if a != r:
            out.append(f"{_labels(key)}: added {a}, removed {r}")
    return out


def assert_balanced(obj: Any, *, sessions: bool = True) -> None:
    """Asserts add == remove for every label set of the connection counters
    and, with ``sessions=True``, of the websocket session counters (so call it
    once the sessions have ended, or pass ``sessions=False``).

    ``obj`` is a Server or Client (anything with ``metrics()``), or a dict as
    ``metrics()`` returns it.
    """
    metrics = obj if isinstance(obj, dict) else obj.metrics()
    problems = [f"{CONNECTION_FAMILIES[0]}{p}" for p in unbalanced(metrics, *CONNECTION_FAMILIES)]
    if sessions:
        problems += [f"{SESSION_FAMILIES[0]}{p}" for p in unbalanced(metrics, *SESSION_FAMILIES)]
    if problems:
        raise AssertionError("unbalanced tunnel counters:\n  " + "\n  ".join(problems))


def _fd_table() -> Optional[dict[int, str]]:
    """fd -> target for this process, or None where /proc is unavailable."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    table = {}
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory fd used by listdir itself, now closed
        table[int(name)] = target
    return table


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
               "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
               "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def _hex_addr(text: str) -> str:
    """Decodes /proc/net/tcp's "0100007F:1F90" (words in host byte order)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) \
        if sys.byteorder == "little" else raw
    ip = ipaddress.ip_address(words)
    from ._options import format_hostport

    return format_hostport(str(ip), int(port, 16))


def _socket_descriptions() -> dict[str, str]:
    """socket inode -> "tcp 127.0.0.1:1 -> 127.0.0.1:2 ESTABLISHED" (best effort),
    so that a leaked fd says what it is connected to."""
    out: dict[str, str] = {}
    for proto in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{proto}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            try:
                out[parts[9]] = (f"{proto} {_hex_addr(parts[1])} -> {_hex_addr(parts[2])} "
                                 f"{_TCP_STATES.get(parts[3], parts[3])}")
            except (IndexError, ValueError):
                continue
    try:
        with open("/proc/self/net/unix") as f:
            lines = f.readlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 7:
            out.setdefault(parts[6], "unix " + (parts[7] if len(parts) > 7 else "(unnamed)"))
    return out


def _describe_fd(target: str, sockets: dict[str, str]) -> str:
    if target.startswith("socket:[") and target.endswith("]"):
        info = sockets.get(target[8:-1])
        if info:
            return f"{target} {info}"
    return target


def _warm_engine() -> None:
    """Starts the engine's loop thread once, so that its own descriptors
    (epoll, eventfd) are part of the first test's baseline, not a leak."""
    global _engine_warmed
    if _engine_warmed:
        return
    from .server import Server

    with Server("127.0.0.1:0"):
        pass
    _engine_warmed = True


def _live_objects() -> tuple[list[Any], list[Any]]:
    from . import client, server

    return list(server._live), list(client._live)


def _dialed_sockets() -> dict[int, str]:
    """fd -> ", tunnel to KEY:proto/address dialed at file:line" for the
    open sockets that live Servers' dial() returned."""
    servers, _ = _live_objects()
    out = {}
    for srv in servers:
        for sock in list(srv._dialed.values()):
            fd = sock.fileno()
            if fd >= 0:
                out[fd] = (f", tunnel to {sock.client_key}:{sock.target}"
                           f" dialed at {sock.dialed_at}")
    return out


def _trimmed_stats() -> dict:
    """engine_stats() after the idle pools went back to the allocator, with
    ``heap_bytes`` not counting what a pool may still hold."""
    from . import engine_trim
    from ._runtime import engine_stats

    engine_trim()
    stats = engine_stats()
    stats["heap_bytes"] = stats.get("heap_bytes", 0) - stats.get("pool_bytes", 0)
    return stats


class LeakCheck:
    """What ``tunnel_leak_check`` yields: the baseline, ``heap_growth()``,
    and ``check()`` to run the same verification in the middle of a test.
    Set ``heap_margin`` (bytes) to fail the test when the engine heap ends
    more than that over its baseline."""

    def __init__(self) -> None:
        from ._runtime import engine_stats

        self._engine_stats = engine_stats
        self.stats: dict = _trimmed_stats()
        self.fds: Optional[dict[int, str]] = _fd_table()
        self.heap_margin: Optional[int] = None

    def heap_growth(self) -> int:
        """Engine heap bytes in use now over the baseline (pools returned)."""
        return _trimmed_stats()["heap_bytes"] - self.stats["heap_bytes"]

    def _settled(self) -> bool:
        now = self._engine_stats()
        if now["open_connections"] > self.stats["open_connections"]:
            return False
        if now["open_sessions"] > self.stats["open_sessions"]:
            return False
        if self.fds is not None:
            fds = _fd_table()
            if fds is not None and len(fds) > len(self.fds):
                return False
        return True

    def problems(self, settle: float = SETTLE_SECONDS,
                 heap_margin: Optional[int] = None) -> list[str]:
        """Waits up to `settle` seconds, then describes what stayed open (and,
        with a `heap_margin`, engine heap growth beyond it)."""
        if heap_margin is None:
            heap_margin = self.heap_margin
        deadline = time.monotonic() + settle
        while not self._settled() and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        now = _trimmed_stats()
        fds = _fd_table() if self.fds is not None else None
        out = []
        leaked = (now["open_connections"] > self.stats["open_connections"]
                  or now["open_sessions"] > self.stats["open_sessions"])
        if leaked:
            deltas = ", ".join(
                f"{k} {self.stats.get(k)} -> {v}" for k, v in sorted(now.items())
                if isinstance(v, (int, float)) and v != self.stats.get(k)
                and k not in ("rss_bytes", "open_fds", "heap_bytes"))
            out.append(f"engine figures over baseline after {settle:g} s: {deltas}")
            servers, _ = _live_objects()
            for srv in servers:
                try:
                    conns = srv.connections()
                except Exception:  # noqa: BLE001 - closed meanwhile
                    continue
                for c in conns:
                    sock = srv._dialed.get(c.get("id"))
                    where = f" (dialed at {sock.dialed_at})" if sock is not None and \
                        sock.dialed_at else ""
                    out.append(f"  open connection on {srv!r}: " +
                               " ".join(f"{k}={c[k]}" for k in sorted(c)) + where)
        if fds is not None and self.fds is not None and len(fds) > len(self.fds):
            out.append(f"{len(fds) - len(self.fds)} file descriptors over baseline "
                       f"({len(self.fds)} -> {len(fds)}):")
            sockets = _socket_descriptions()
            dialed = _dialed_sockets()
            for fd, target in sorted(fds.items()):
                if self.fds.get(fd) != target:
                    out.append(f"  fd {fd} -> {_describe_fd(target, sockets)}"
                               + dialed.get(fd, ""))
        if self.stats["open_connections"] == 0 and now["open_connections"] == 0:
            servers, clients = _live_objects()
            for obj in servers + clients:
                try:
                    metrics = obj.metrics()
                except Exception:  # noqa: BLE001 - closed meanwhile
                    continue
                for p in unbalanced(metrics, *CONNECTION_FAMILIES):
                    out.append(f"unbalanced connection counters on {obj!r}: {p}")
        growth = now["heap_bytes"] - self.stats["heap_bytes"]
        if heap_margin is not None and growth > heap_margin:
            out.append(f"engine heap {growth:+,} bytes over its baseline "
                       f"({self.stats['heap_bytes']:,} -> {now['heap_bytes']:,}; "
                       f"margin {heap_margin:,}), idle pools returned")
        elif out:
            # Context: live servers and clients legitimately grow the heap
            # (label sets, tables); pools are already returned.
            out.append(f"engine heap in use: {self.stats['heap_bytes']:,} -> "
                       f"{now['heap_bytes']:,} bytes ({growth:+,})")
        return out

    def check(self, settle: float = SETTLE_SECONDS, heap_margin: Optional[int] = None) -> None:
        """Fails the test (``pytest.fail``) listing :meth:`problems`, if any:
        what the fixture does after the test, callable in its middle."""
        problems = self.problems(settle, heap_margin)
        if problems:
            pytest.fail("tunnel leak check failed:\n" + "\n".join(problems), pytrace=False)


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("remotedialer_py")
    group.addoption("--tunnel-leak-check", action="store_true", default=False,
                    help="apply the tunnel_leak_check fixture to every test")
    parser.addini("tunnel_leak_check", type="bool", default=False,
                  help="apply the tunnel_leak_check fixture to every test")


def _check_every_test(config: Any) -> bool:
    if config.getoption("tunnel_leak_check", False):
        return True
    try:
        return bool(config.getini("tunnel_leak_check"))
    except ValueError:  # registered after option parsing: no ini setting
        return False


@pytest.fixture(autouse=True)
def _tunnel_leak_check_everywhere(request: Any) -> None:
    """``--tunnel-leak-check`` or ``tunnel_leak_check = true``: every test
    gets the fixture (set up before the test's own function fixtures, so
    their leaks count)."""
    if _check_every_test(request.config):
        request.getfixturevalue("tunnel_leak_check")


@pytest.fixture
def tunnel_leak_check() -> Any:
    """Fails the test if tunnel connections, sessions or fds outlive it."""
    _warm_engine()
    check = LeakCheck()
    yield check
    check.check()
