"""``remotedialer-py soak``: the Rancher v2.11.0 leak scenario, as a tool.

An HTTP service sits behind an agent ("soak"); N requests go through the
tunnel at concurrency C, each on a fresh connection: even ones with
``Server.dial`` and http.client on the returned socket, odd ones through the
server's ``/client/soak/http/127.0.0.1:PORT/...`` route. Every second it
samples the connection counters of both sides, the open connections, the
engine heap (excluding idle pooled buffers), the resident memory and the
open descriptors, and prints them. At the end it prints a verdict and exits
non-zero when:

- a request failed;
- a connection counter label set does not balance (added != removed) on the
  server or on the agent;
- a connection, or a descriptor over the baseline, is still open after the
  settle time;
- the engine heap, after returning idle pools (``engine_trim()``), is more
  than HEAP_MARGIN bytes over its post-warm-up baseline: once pools are
  returned the heap holds only live objects (sessions, label sets, tables
  that warm-up already grew to the run's concurrency), so it must come back
  to the baseline; 64 KiB shows a leak of 16 bytes per request within 4,096
  requests;
- the resident memory is more than the larger of 8 MiB and 10% over its
  post-warm-up baseline: RSS also moves with the Python allocator, thread
  stacks and the C library's arenas, so it is the coarse check that catches
  what the engine's own counter cannot see (descriptors, libuv, OpenSSL).

The warm-up (by default a tenth of N, between 200 and 2,000 requests, at the
same concurrency) is what the baselines are taken after: first-use
allocations (pools, thread stacks, label sets, table sizes) are not leaks.

With ``--keep-alive`` the service speaks HTTP/1.1 and keeps its connections
alive, so the route's tunneled connections go back to the server's pool
after each response (the part of the scenario Rancher v2.11.0 got wrong: a
pool per request, never drained). The requests still come on fresh client
connections. The run then also shows the pool: the idle pooled connections
every second, which must stay within ``--pool-per-target`` and fall to zero
``--pool-idle-timeout`` seconds after the last request; the verdict fails
when they pass the bound, never appear, or outlive the timeout.

With ``--processes`` the service, the server and the agent each run in a
process of their own (``python -m remotedialer_py.soak --child ROLE``, driven
over stdin/stdout with one JSON object per line); the requests are made in
the server's process, since ``dial`` returns a socket there. Loopback only.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import http.server
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO

CLIENT_KEY = "soak"
BODY = b"soak: hello through the tunnel\n"
ADD = "session_server_total_add_connections"
REMOVE = "session_server_total_remove_connections"
SETTLE_SECONDS = 15.0
# The pool's bound per target as the server's default has it; a short idle
# timeout so that a run shows the pool draining without waiting 90 s.
POOL_PER_TARGET = 16
POOL_IDLE_TIMEOUT = 5.0
HEAP_MARGIN = 64 << 10
RSS_MARGIN_MIN = 8 << 20
RSS_MARGIN_FRACTION = 0.10
REQUEST_TIMEOUT = 30.0
CHILD_TIMEOUT = 60.0


@dataclass(frozen=True)
class SoakConfig:
    """How the service and the server are set up for a run."""

    keep_alive: bool = False
    pool_per_target: int = POOL_PER_TARGET
    pool_idle_timeout: float = POOL_IDLE_TIMEOUT


# ---------------------------------------------------------------------------
# The pieces, usable in this process or in a child


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: the service ends every connection after its response, so a
    # request is one tunneled connection opened and closed.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _KeepAliveHandler(_Handler):
    # HTTP/1.1: the connection stays open for the next request, so the
    # route can pool the tunneled connection it came through.
    protocol_version = "HTTP/1.1"


class Service(http.server.ThreadingHTTPServer):
    """The HTTP service behind the agent, on 127.0.0.1:0."""

    daemon_threads = True
    # The default backlog of 5 overflows under concurrent fresh connections
    # and turns into one-second SYN retransmits.
    request_queue_size = 1024

    def __init__(self, keep_alive: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler if keep_alive else _Handler)
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="soak-service", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(10)


def _counter_sums(metrics: dict) -> dict:
    adds, removes = metrics.get(ADD, {}), metrics.get(REMOVE, {})
    unbalanced = []
    for key in sorted(set(adds) | set(removes)):
        a, r = adds.get(key, 0), removes.get(key, 0)
        if a != r:
            labels = ",".join(f'{k}="{v}"' for k, v in key)
            unbalanced.append(f"{{{labels}}}: added {a}, removed {r}")
    return {"add": int(sum(adds.values())), "remove": int(sum(removes.values())),
            "unbalanced": unbalanced}


def engine_figures() -> dict:
    from ._runtime import engine_stats

    s = engine_stats()
    return {
        "heap_bytes": int(s.get("heap_bytes", 0)) - int(s.get("pool_bytes", 0)),
        "pool_bytes": int(s.get("pool_bytes", 0)),
        "heap_objects": int(s.get("heap_objects", 0)),
        "open_connections": int(s.get("open_connections", 0)),
        "open_sessions": int(s.get("open_sessions", 0)),
        "rss_bytes": int(s.get("rss_bytes", -1)),
        "open_fds": int(s.get("open_fds", -1)),
    }


def trim() -> None:
    """Returns the engine's idle pools to the allocator."""
    from . import engine_trim

    engine_trim()


class Load:
    """N requests at concurrency C through a server in this process."""

    def __init__(self, srv: Any, service_port: int, client_key: str = CLIENT_KEY,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.srv = srv
        self.target = f"127.0.0.1:{service_port}"
        self.client_key = client_key
        self.timeout = timeout
        self._lock = threading.Lock()
        self.done = 0
        self.errors = 0
        self.last_done_at = 0.0
        self.error_texts: list[str] = []
        self._threads: list[threading.Thread] = []

    def _dial(self, i: int) -> None:
        sock = self.srv.dial(self.client_key, "tcp", self.target, timeout=self.timeout)
        conn = http.client.HTTPConnection("127.0.0.1", timeout=self.timeout)
        sock.settimeout(self.timeout)
        conn.sock = sock  # http.client uses a preset socket instead of connecting
        try:
            conn.request("GET", f"/dial/{i}")
            with conn.getresponse() as resp:
                body = resp.read()
                if resp.status != 200 or body != BODY:
                    raise RuntimeError(f"dial: HTTP {resp.status}, body {body[:80]!r}")
        except Exception as exc:
            why = sock.tunnel_error
            if why:
                raise RuntimeError(f"dial: {why}") from exc
            raise
        finally:
            conn.close()

    def _route(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=self.timeout)
        try:
            conn.request("GET", f"/client/{self.client_key}/http/{self.target}/route/{i}")
            with conn.getresponse() as resp:
                body = resp.read()
                if resp.status != 200 or body != BODY:
                    raise RuntimeError(f"route: HTTP {resp.status}, body {body[:80]!r}")
        finally:
            conn.close()

    def start(self, n: int, concurrency: int) -> None:
        counter = itertools.count()

        def worker() -> None:
            while True:
                i = next(counter)
                if i >= n:
                    return
                try:
                    (self._dial if i % 2 == 0 else self._route)(i)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with self._lock:
                        self.errors += 1
                        if len(self.error_texts) < 5:
                            self.error_texts.append(f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.done += 1
                    # CLOCK_MONOTONIC is one clock for every process on the
                    # machine, so the parent can compare it with its own.
                    self.last_done_at = time.monotonic()

        self._threads = [threading.Thread(target=worker, name=f"soak-{k}", daemon=True)
                         for k in range(max(1, min(concurrency, n)))]
        for t in self._threads:
            t.start()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: Optional[float] = None) -> None:
        for t in self._threads:
            t.join(timeout)

    def figures(self) -> dict:
        with self._lock:
            return {"done": self.done, "errors": self.errors,
                    "error_texts": list(self.error_texts), "running": self.running,
                    "last_done_at": self.last_done_at}


class Roles:
    """Whichever of service, server and agent live in this process."""

    def __init__(self) -> None:
        self.service: Optional[Service] = None
        self.srv: Any = None
        self.cli: Any = None
        self.load: Optional[Load] = None

    def start_service(self, keep_alive: bool = False) -> int:
        self.service = Service(keep_alive)
        return self.service.port

    def start_server(self, pool_per_target: int = POOL_PER_TARGET,
                     pool_idle_timeout: float = POOL_IDLE_TIMEOUT) -> int:
        from .server import Server

        self.srv = Server(listen="127.0.0.1:0", debug_route=True,
                          proxy_pool_per_target=pool_per_target,
                          proxy_pool_idle_timeout=pool_idle_timeout)
        self.srv.start()
        return self.srv.port

    def close_idle(self) -> None:
        if self.srv is not None:
            self.srv.close_idle()

    def start_agent(self, url: str) -> None:
        from .client import Client

        self.cli = Client(url, headers={"X-Tunnel-ID": CLIENT_KEY})
        self.cli.start()
        self.cli.wait_connected(timeout=CHILD_TIMEOUT)

    def wait_session(self, timeout: float = CHILD_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not self.srv.has_session(CLIENT_KEY):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def run(self, n: int, concurrency: int, service_port: int) -> None:
        if self.load is not None and self.load.running:
            raise RuntimeError("a load is already running")
        self.load = Load(self.srv, service_port)
        self.load.start(n, concurrency)

    def stats(self, details: bool = False) -> dict:
        out: dict = {"pid": os.getpid()}
        if self.srv is not None or self.cli is not None:
            out["engine"] = engine_figures()
        if self.srv is not None:
            out["server"] = _counter_sums(self.srv.metrics())
            conns = self.srv.connections()
            out["server"]["pooled"] = sum(1 for c in conns if c["state"] == "idle")
            if details:
                out["server"]["connections"] = conns
        if self.cli is not None:
            out["agent"] = _counter_sums(self.cli.metrics())
        if self.load is not None:
            out["load"] = self.load.figures()
        return out

    def close(self) -> dict:
        if self.load is not None:
            self.load.join(REQUEST_TIMEOUT)
        for obj in (self.cli, self.srv):
            if obj is not None:
                obj.close()
        if self.service is not None:
            self.service.close()
        out: dict[str, Any] = {"pid": os.getpid()}
        if self.srv is not None or self.cli is not None:
            out["engine"] = engine_figures()
        return out


# ---------------------------------------------------------------------------
# Where the roles run


class _LocalProcesses:
    """Service, server, agent and requests, all in this process."""

    names = ("process",)

    def __init__(self, config: "SoakConfig") -> None:
        self.roles = Roles()
        self.config = config

    def start(self) -> str:
        self.service_port = self.roles.start_service(self.config.keep_alive)
        self.roles.start_server(self.config.pool_per_target, self.config.pool_idle_timeout)
        self.roles.start_agent(self.roles.srv.url)
        if not self.roles.wait_session():
            raise RuntimeError("the agent did not get a session")
        return self.roles.srv.url

    def run(self, n: int, concurrency: int) -> None:
        self.roles.run(n, concurrency, self.service_port)

    def trim(self) -> None:
        trim()

    def close_idle(self) -> None:
        self.roles.close_idle()

    def stats(self, details: bool = False) -> dict:
        s = self.roles.stats(details)
        return {"process": s}

    def close(self) -> dict:
        return {"process": self.roles.close()}


class _Child:
    """A `python -m remotedialer_py.soak --child ROLE` process, spoken to in
    JSON lines; a reader thread feeds a queue so every wait has a deadline."""

    def __init__(self, role: str, *args: str) -> None:
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "remotedialer_py.soak", "--child", role, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"soak-{role}-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def reply(self, timeout: float = CHILD_TIMEOUT) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the {self.role} process did not answer within {timeout:g} s") from None
        if line is None:
            raise RuntimeError(f"the {self.role} process exited (status {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.role} process: {answer['error']}")
        return answer

    def call(self, cmd: str, **args: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> dict:
        try:
            answer = self.call("quit")
        except (RuntimeError, OSError, ValueError):
            answer = {}
        try:
            self.proc.wait(CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return answer


class _ChildProcesses:
    """Service, server (which also makes the requests) and agent, each in a
    process of its own."""

    names = ("server", "agent")

    def __init__(self, config: "SoakConfig") -> None:
        self.children: dict[str, _Child] = {}
        self.config = config

    def start(self) -> str:
        c = self.config
        service = self.children["service"] = _Child(
            "service", *(["keep-alive"] if c.keep_alive else []))
        self.service_port = service.reply()["port"]
        server = self.children["server"] = _Child("server", str(c.pool_per_target),
                                                  repr(c.pool_idle_timeout))
        url = server.reply()["url"]
        agent = self.children["agent"] = _Child("agent", url)
        agent.reply()
        server.call("wait_session")
        return url

    def run(self, n: int, concurrency: int) -> None:
        self.children["server"].call("run", n=n, concurrency=concurrency,
                                     service_port=self.service_port)

    def trim(self) -> None:
        for name in self.names:
            self.children[name].call("trim")

    def close_idle(self) -> None:
        self.children["server"].call("close_idle")

    def stats(self, details: bool = False) -> dict:
        return {name: self.children[name].call("stats", details=details) for name in self.names}

    def close(self) -> dict:
        out = {}
        for name in ("agent", "server", "service"):
            child = self.children.pop(name, None)
            if child is not None:
                out[name] = child.close()
        return out


def child_main(role: str, args: list[str]) -> int:
    """A child process: starts its role (service [keep-alive]; server
    POOL_PER_TARGET POOL_IDLE_TIMEOUT; agent URL), then answers JSON commands
    on stdin (stats, trim, close_idle, run, wait_session, quit), one JSON
    object per line."""
    roles = Roles()

    def say(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        if role == "service":
            say({"port": roles.start_service(args[:1] == ["keep-alive"])})
        elif role == "server":
            roles.start_server(int(args[0]), float(args[1]))
            say({"url": roles.srv.url})
        elif role == "agent":
            roles.start_agent(args[0])
            say({"connected": True})
        else:
            say({"error": f"unknown role {role!r}"})
            return 2
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        say({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    for line in sys.stdin:
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "stats":
                say(roles.stats(bool(req.get("details"))))
            elif cmd == "trim":
                trim()
                say({"ok": True})
            elif cmd == "close_idle":
                roles.close_idle()
                say({"ok": True})
            elif cmd == "run":
                roles.run(int(req["n"]), int(req["concurrency"]), int(req["service_port"]))
                say({"ok": True})
            elif cmd == "wait_session":
                say({"ok": roles.wait_session()})
            elif cmd == "quit":
                say(roles.close())
                return 0
            else:
                say({"error": f"unknown command {cmd!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            say({"error": f"{type(exc).__name__}: {exc}"})
    roles.close()  # stdin closed: the parent is gone
    return 0


# ---------------------------------------------------------------------------
# Sampling, verdict, output


def _sum(stats: dict, side: str, key: str) -> int:
    return sum(int(s.get(side, {}).get(key, 0)) for s in stats.values())


def _load(stats: dict) -> dict:
    for s in stats.values():
        if "load" in s:
            return s["load"]
    return {"done": 0, "errors": 0, "error_texts": [], "running": False}


def _row(t: float, phase: str, stats: dict, names: tuple) -> dict:
    load = _load(stats)
    row: dict = {
        "time_s": round(t, 3), "phase": phase,
        "requests": load["done"], "errors": load["errors"],
        "server_add": _sum(stats, "server", "add"), "server_remove": _sum(stats, "server", "remove"),
        "agent_add": _sum(stats, "agent", "add"), "agent_remove": _sum(stats, "agent", "remove"),
        "open_connections": sum(s.get("engine", {}).get("open_connections", 0)
                                for s in stats.values()),
        "pooled_connections": _sum(stats, "server", "pooled"),
    }
    for name in names:
        e = stats.get(name, {}).get("engine", {})
        row[f"heap_bytes_{name}"] = e.get("heap_bytes", -1)
        row[f"rss_bytes_{name}"] = e.get("rss_bytes", -1)
        row[f"open_fds_{name}"] = e.get("open_fds", -1)
    return row


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f}"


def _format_row(row: dict, names: tuple, rate: float) -> str:
    def per(key: str, fmt: Callable[[int], str]) -> str:
        return "/".join(fmt(row[f"{key}_{n}"]) for n in names)

    return (f"{row['time_s']:7.1f} {row['phase']:>7} {row['requests']:>9} {rate:>7.0f} "
            f"{row['server_add']:>9}/{row['server_remove']:<9} "
            f"{row['agent_add']:>9}/{row['agent_remove']:<9} {row['open_connections']:>5} "
            f"{row['pooled_connections']:>6} "
            f"{per('heap_bytes', _kib):>12} {per('rss_bytes', _mib):>12} "
            f"{per('open_fds', str):>9}")


def _header(names: tuple) -> str:
    who = "/".join(names)
    return (f"{'t(s)':>7} {'phase':>7} {'requests':>9} {'req/s':>7} "
            f"{'server add/remove':>19} {'agent add/remove':>19} {'open':>5} {'pooled':>6} "
            f"{'heap KiB':>12} {'RSS MiB':>12} {'fds':>9}"
            + (f"   (per process: {who})" if len(names) > 1 else ""))


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: str, rows: list[dict], names: tuple, title: str,
         pool_bound: Optional[int] = None) -> None:
    """Draws the series into a PNG (needs matplotlib: the `plot` extra)."""
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    t = [r["time_s"] for r in rows]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(8, 8), dpi=80)
    ax = axes[0]
    ax.plot(t, [r["server_add"] for r in rows], label="server added", color="tab:blue")
    ax.plot(t, [r["server_remove"] for r in rows], label="server removed", color="tab:orange",
            linestyle="--")
    ax.plot(t, [r["agent_add"] for r in rows], label="agent added", color="tab:green", linestyle=":")
    ax.plot(t, [r["agent_remove"] for r in rows], label="agent removed", color="tab:red",
            linestyle="-.")
    ax.set_ylabel("connections")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title, fontsize="medium")
    ax = axes[1]
    ax.plot(t, [r["open_connections"] for r in rows], color="tab:purple", label="open")
    if pool_bound is not None:
        ax.plot(t, [r["pooled_connections"] for r in rows], color="tab:cyan", linestyle="--",
                label="idle in the route's pool")
        ax.axhline(pool_bound, color="tab:gray", linestyle=":", label=f"pool bound ({pool_bound})")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_ylabel("open\nconnections")
    ax = axes[2]
    for name in names:
        ax.plot(t, [r[f"heap_bytes_{name}"] / 1024 for r in rows], label=f"engine heap ({name})")
    ax.set_ylabel("engine heap\nKiB")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize="small")
    ax = axes[3]
    for name in names:
        ax.plot(t, [r[f"rss_bytes_{name}"] / (1 << 20) for r in rows], label=f"RSS ({name})")
    ax.set_ylabel("RSS MiB")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds")
    twin = ax.twinx()
    for name in names:
        twin.plot(t, [r[f"open_fds_{name}"] for r in rows], linestyle=":", label=f"fds ({name})")
    twin.set_ylabel("open fds")
    twin.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize="small")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rss_margin(baseline: int) -> int:
    return max(RSS_MARGIN_MIN, int(baseline * RSS_MARGIN_FRACTION))


def run(n: int = 5000, concurrency: int = 8, processes: bool = False,
        warmup: Optional[int] = None, interval: float = 1.0, csv_path: Optional[str] = None,
        plot_path: Optional[str] = None, heap_margin: int = HEAP_MARGIN,
        rss_margin_bytes: Optional[int] = None, out: Optional[TextIO] = None,
        keep_alive: bool = False, pool_per_target: int = POOL_PER_TARGET,
        pool_idle_timeout: float = POOL_IDLE_TIMEOUT) -> int:
    """Runs the soak; returns the exit status (0 only on a clean verdict)."""
    def say(text: str = "") -> None:
        print(text, file=sys.stdout if out is None else out, flush=True)

    if plot_path is not None:
        # Looked up, not imported: importing it now would weigh on the RSS
        # baseline.
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            say("remotedialer-py soak: --plot needs matplotlib: "
                "pip install 'remotedialer-py[plot]' (or: pip install matplotlib)")
            return 2
    if warmup is None:
        warmup = max(200, min(2000, n // 10))
    config = SoakConfig(keep_alive, pool_per_target, pool_idle_timeout)
    procs: Any = _ChildProcesses(config) if processes else _LocalProcesses(config)
    names = procs.names
    rows: list[dict] = []
    problems: list[str] = []
    started = time.monotonic()

    def sample(phase: str, details: bool = False) -> dict:
        stats = procs.stats(details)
        rows.append(_row(time.monotonic() - started, phase, stats, names))
        return stats

    # With keep-alive the pool holds connections for its idle timeout after
    # the last request: the wait for them to end includes it.
    settle_seconds = SETTLE_SECONDS + (pool_idle_timeout if keep_alive else 0.0)

    def settle(baseline_fds: Optional[dict] = None, record: bool = False) -> dict:
        """Waits (bounded) for every connection to end and the descriptors to
        return to the baseline; returns the last stats. With record, a row
        is sampled and printed every `interval` meanwhile (the pool
        draining)."""
        now = time.monotonic()
        deadline = now + settle_seconds
        next_row = now + interval
        while True:
            stats = procs.stats()
            now = time.monotonic()
            if record and now >= next_row:
                next_row += interval
                rows.append(_row(now - started, "drain", stats, names))
                say(_format_row(rows[-1], names, 0.0))
            open_conns = sum(s.get("engine", {}).get("open_connections", 0) for s in stats.values())
            fds_ok = baseline_fds is None or all(
                stats[k]["engine"]["open_fds"] <= baseline_fds[k] for k in names)
            if (open_conns == 0 and fds_ok) or now >= deadline:
                return stats
            time.sleep(0.05)

    try:
        url = procs.start()
        where = ("service, server and agent in separate processes" if processes
                 else "service, server and agent in this process")
        say(f"remotedialer-py soak: {n:,} requests (+{warmup:,} warm-up), concurrency "
            f"{concurrency}, {where}")
        say(f"  server {url}; half the requests through dial, half through /client/")
        if keep_alive:
            say(f"  keep-alive service: the route pools its tunneled connections (at most "
                f"{pool_per_target}, idle timeout {pool_idle_timeout:g} s)")

        # Warm-up, then the baselines.
        sample("start")
        procs.run(warmup, concurrency)
        while _load(procs.stats())["running"]:
            time.sleep(0.05)
        procs.close_idle()  # the warm-up's pooled connections end now, not in a timeout
        stats = settle()
        procs.trim()
        stats = sample("warm")
        warm_load = _load(stats)
        if warm_load["errors"]:
            problems.append(f"{warm_load['errors']} of {warmup} warm-up requests failed: "
                            + "; ".join(warm_load["error_texts"]))
        base = {k: dict(stats[k]["engine"]) for k in names}
        base_fds = {k: base[k]["open_fds"] for k in names}
        say("  baseline after warm-up: " + ", ".join(
            f"{k}: heap {_kib(base[k]['heap_bytes'])} KiB, RSS {_mib(base[k]['rss_bytes'])} MiB, "
            f"{base[k]['open_fds']} fds" for k in names))
        say()
        say(_header(names))
        say(_format_row(rows[-1], names, 0.0))

        # The run, sampled every `interval` seconds.
        procs.run(n, concurrency)
        run_started = time.monotonic()
        last_t, last_done = run_started, 0
        next_tick = run_started + interval
        while True:
            time.sleep(max(0.0, next_tick - time.monotonic()))
            next_tick += interval
            stats = sample("run")
            now = time.monotonic()
            load = _load(stats)
            rate = (load["done"] - last_done) / max(1e-9, now - last_t)
            last_t, last_done = now, load["done"]
            say(_format_row(rows[-1], names, rate))
            if not load["running"]:
                break
        elapsed = time.monotonic() - run_started
        last_request = _load(stats).get("last_done_at") or time.monotonic()

        # Settle (the route's pool drains), return the pools, and the final
        # figures.
        settle(base_fds, record=True)
        drained_after = time.monotonic() - last_request
        procs.trim()
        stats = sample("final", details=True)
        say(_format_row(rows[-1], names, 0.0))
        final = rows[-1]
        load = _load(stats)
        say()
        say(f"  {load['done']:,} requests in {elapsed:.1f} s = {load['done'] / elapsed:,.0f} "
            f"requests/s, {load['errors']} failed")

        if load["errors"]:
            problems.append(f"{load['errors']} of {n} requests failed: "
                            + "; ".join(load["error_texts"]))
        for side in ("server", "agent"):
            for name, s in stats.items():
                for line in s.get(side, {}).get("unbalanced", []):
                    problems.append(f"{side} counters do not balance: {line}")
            say(f"  {side} counters: added {final[f'{side}_add']:,}, "
                f"removed {final[f'{side}_remove']:,}")
        if keep_alive:
            peak_pooled = max(r["pooled_connections"] for r in rows)
            say(f"  route pool: peak {peak_pooled} idle connections (bound {pool_per_target}), "
                f"{final['pooled_connections']} {drained_after:.1f} s after the last request "
                f"(idle timeout {pool_idle_timeout:g} s)")
            if peak_pooled > pool_per_target:
                problems.append(f"the route's pool held {peak_pooled} idle connections, over "
                                f"its bound of {pool_per_target}")
            if peak_pooled == 0:
                problems.append("the route never pooled a connection: keep-alive did not work")
        if final["open_connections"]:
            problems.append(f"{final['open_connections']} connections still open "
                            f"after {settle_seconds:g} s")
            for s in stats.values():
                for c in s.get("server", {}).get("connections", []):
                    problems.append("  open: " + " ".join(f"{k}={c[k]}" for k in sorted(c)))
        for k in names:
            e = stats[k]["engine"]
            label = "" if len(names) == 1 else f" ({k})"
            heap_growth = e["heap_bytes"] - base[k]["heap_bytes"]
            rss_growth = e["rss_bytes"] - base[k]["rss_bytes"]
            margin = rss_margin(base[k]["rss_bytes"]) if rss_margin_bytes is None else rss_margin_bytes
            say(f"  engine heap{label}: baseline {_kib(base[k]['heap_bytes'])} KiB, final "
                f"{_kib(e['heap_bytes'])} KiB ({heap_growth:+,} bytes; margin {heap_margin:,}), "
                f"peak {_kib(max(r[f'heap_bytes_{k}'] for r in rows))} KiB")
            say(f"  RSS{label}: baseline {_mib(base[k]['rss_bytes'])} MiB, final "
                f"{_mib(e['rss_bytes'])} MiB ({rss_growth / (1 << 20):+.1f} MiB; margin "
                f"{_mib(margin)} MiB), peak {_mib(max(r[f'rss_bytes_{k}'] for r in rows))} MiB")
            say(f"  open fds{label}: baseline {base_fds[k]}, final {e['open_fds']}")
            if heap_growth > heap_margin:
                problems.append(f"engine heap{label} {heap_growth:,} bytes over its baseline "
                                f"(margin {heap_margin:,})")
            if e["rss_bytes"] >= 0 and rss_growth > margin:
                problems.append(f"RSS{label} {rss_growth / (1 << 20):.1f} MiB over its baseline "
                                f"(margin {_mib(margin)} MiB)")
            if e["open_fds"] > base_fds[k]:
                problems.append(f"{e['open_fds'] - base_fds[k]} descriptors{label} over the "
                                f"baseline after {settle_seconds:g} s")
    except Exception as exc:  # noqa: BLE001 - a failed soak is a verdict too
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        closed = procs.close()
    for name, s in closed.items():
        sessions = s.get("engine", {}).get("open_sessions", 0)
        if sessions:
            problems.append(f"{sessions} sessions still open in {name} after closing")

    if rows and csv_path:
        write_csv(csv_path, rows)
        say(f"  series written to {csv_path}")
    if rows and plot_path:
        verdict = "FAIL" if problems else "OK"
        plot(plot_path, rows, names,
             f"remotedialer-py soak: {n:,} requests, concurrency {concurrency}"
             f"{', keep-alive' if keep_alive else ''}: {verdict}",
             pool_bound=pool_per_target if keep_alive else None)
        say(f"  plot written to {plot_path}")
    if problems:
        say("FAIL:")
        for p in problems:
            say(f"  {p}")
        return 1
    say("OK: counters balance on both sides, nothing open, heap and RSS back to their baselines")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        if len(argv) < 2:
            print("usage: python -m remotedialer_py.soak --child ROLE [ARGS]", file=sys.stderr)
            return 2
        return child_main(argv[1], argv[2:])
    from .cli import main as cli_main

    return cli_main(["soak", *argv])


def add_arguments(parser: argparse.ArgumentParser, positive_int: Callable[[str], int]) -> None:
    """The soak subcommand's options (cli.py builds the parser)."""
    from . import _cliparse

    parser.add_argument("-n", "--requests", dest="n", type=positive_int, default=5000,
                        help="requests to make after the warm-up (default 5000; the long run "
                             "documented in the README uses 100000)")
    parser.add_argument("-c", "--concurrency", type=positive_int, default=8,
                        help="concurrent request threads (default 8)")
    parser.add_argument("--processes", action="store_true",
                        help="run the service, the server (which makes the requests) and the "
                             "agent as separate processes")
    parser.add_argument("--warmup", type=_cliparse.non_negative_int, default=None, metavar="N",
                        help="warm-up requests before the baselines are taken (default: a tenth "
                             "of -n, between 200 and 2000)")
    parser.add_argument("--interval", type=_cliparse.positive_float, default=1.0, metavar="SECONDS",
                        help="sampling interval (default 1)")
    parser.add_argument("--csv", dest="csv_path", metavar="FILE", type=_cliparse.output_file,
                        help="write the series as CSV")
    parser.add_argument("--plot", dest="plot_path", metavar="FILE.png", type=_cliparse.output_file,
                        help="draw the series (needs matplotlib: pip install "
                             "'remotedialer-py[plot]')")
    parser.add_argument("--heap-margin", type=_cliparse.non_negative_int, default=HEAP_MARGIN,
                        metavar="BYTES",
                        help="allowed engine heap growth over the post-warm-up baseline, after "
                             "idle pools are returned (default 65536: the heap then holds only "
                             "live objects, so it must come back; 64 KiB shows a 16-byte leak "
                             "per request within 4096 requests)")
    parser.add_argument("--rss-margin", type=_cliparse.non_negative_float, default=None, metavar="MIB",
                        help="allowed RSS growth over the post-warm-up baseline (default: the "
                             "larger of 8 MiB and 10%%, since RSS also moves with the Python "
                             "allocator, thread stacks and C library arenas; the heap check is "
                             "the precise one)")
    parser.add_argument("--keep-alive", action="store_true",
                        help="the service keeps its connections alive (HTTP/1.1), so the "
                             "/client/ route pools its tunneled connections; the run shows the "
                             "pool staying within --pool-per-target and draining after "
                             "--pool-idle-timeout")
    parser.add_argument("--pool-per-target", type=positive_int, default=POOL_PER_TARGET,
                        metavar="N", help="the server's proxy_pool_per_target (default 16)")
    parser.add_argument("--pool-idle-timeout", type=_cliparse.positive_float,
                        default=POOL_IDLE_TIMEOUT, metavar="SECONDS",
                        help="the server's proxy_pool_idle_timeout (default 5, so a run shows "
                             "the pool draining without waiting the server's usual 90 s)")


if __name__ == "__main__":
    sys.exit(main())
