"""``remotedialer-py demo``: the whole tunnel in one process, on loopback.

An HTTP service, a server and an agent ("demo"). N requests go through the
tunnel, each on a fresh connection: half with ``Server.dial`` and http.client
on the returned socket, half through the server's own
``/client/demo/http/127.0.0.1:PORT/...`` route. Then it prints the rate, the
connection counters (every connection added must have been removed), what is
still open and the process's memory. Exit status 0 only when the counters
balance and nothing stays open.
"""

from __future__ import annotations

import http.client
import itertools
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from .soak import BODY, Service, engine_figures  # the same small HTTP service

SETTLE_SECONDS = 10.0
ADD = "session_server_total_add_connections"
REMOVE = "session_server_total_remove_connections"


def rss_bytes() -> Optional[int]:
    """Resident set size from /proc/self/status (None where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):.1f} MiB"


def counter_sum(metrics: dict, name: str) -> int:
    """Sum of a counter family over all its label sets."""
    return int(sum(metrics.get(name, {}).values()))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _check_response(resp: http.client.HTTPResponse, what: str) -> None:
    body = resp.read()
    if resp.status != 200 or body != BODY:
        raise RuntimeError(f"{what}: HTTP {resp.status}, body {body[:80]!r}")


def run(n: int = 2000, concurrency: int = 8, out: TextIO = sys.stdout) -> int:
    from . import Client, Server, engine_stats

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    service = Service()
    svc_port = service.server_address[1]
    svc_thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.1},
                                  name="demo-service", daemon=True)
    svc_thread.start()
    srv = Server(listen="127.0.0.1:0")
    cli: Optional[Client] = None
    try:
        srv.start()
        cli = Client(srv.url, headers={"X-Tunnel-ID": "demo"})
        cli.start()
        try:
            cli.wait_connected(timeout=10)
        except TimeoutError as exc:
            say(f"FAIL: the agent did not connect: {exc}")
            return 1
        say(f"remotedialer-py demo: {n} requests through the tunnel, {concurrency} threads")
        say(f"  service  http://127.0.0.1:{svc_port}/")
        say(f"  server   {srv.url}   agent \"demo\" connected")

        target = f"127.0.0.1:{svc_port}"

        def via_dial(i: int) -> None:
            sock = srv.dial("demo", "tcp", target, timeout=10)
            conn = http.client.HTTPConnection("127.0.0.1", svc_port, timeout=10)
            conn.sock = sock  # http.client uses a preset socket instead of connecting
            try:
                conn.request("GET", f"/dial/{i}")
                with conn.getresponse() as resp:
                    _check_response(resp, f"dial request {i}")
            except Exception as exc:
                if sock.tunnel_error:
                    raise RuntimeError(f"dial request {i}: {sock.tunnel_error}") from exc
                raise
            finally:
                conn.close()

        def via_route(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            try:
                conn.request("GET", f"/client/demo/http/{target}/route/{i}")
                with conn.getresponse() as resp:
                    _check_response(resp, f"route request {i}")
            finally:
                conn.close()

        counter = itertools.count()
        lock = threading.Lock()
        done = [0]
        errors: list[str] = []

        def worker() -> None:
            while True:
                i = next(counter)
                if i >= n:
                    return
                try:
                    (via_dial if i % 2 == 0 else via_route)(i)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                with lock:
                    done[0] += 1

        rss_before = rss_bytes()
        heap_before = engine_figures()["heap_bytes"]
        tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        started = time.monotonic()
        threads = [threading.Thread(target=worker, name=f"demo-{k}", daemon=True)
                   for k in range(min(concurrency, n))]
        for t in threads:
            t.start()
        last_report = 0
        while any(t.is_alive() for t in threads):
            time.sleep(0.1)
            with lock:
                count, failed = done[0], len(errors)
            if tty:
                sys.stderr.write(f"\r  {count}/{n} requests, {failed} failed ")
                sys.stderr.flush()
            elif count - last_report >= max(1, n // 4):
                last_report = count
                say(f"  {count}/{n} requests, {failed} failed")
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        if tty:
            sys.stderr.write("\r" + " " * 60 + "\r")
        say(f"  done: {n} requests in {elapsed:.2f} s = {n / elapsed:,.0f} requests/s "
            f"({(n + 1) // 2} via dial, {n // 2} via /client/), {len(errors)} failed")
        for text in errors[:5]:
            say(f"    error: {text}")

        # Connections end asynchronously after the last response: wait for the
        # engine to finish, within a bound, rather than sleeping blindly.
        settled = wait_until(lambda: engine_stats()["open_connections"] == 0, SETTLE_SECONDS)
        stats = engine_stats()
        server_metrics, agent_metrics = srv.metrics(), cli.metrics()
        added, removed = counter_sum(server_metrics, ADD), counter_sum(server_metrics, REMOVE)
        a_added, a_removed = counter_sum(agent_metrics, ADD), counter_sum(agent_metrics, REMOVE)
        rss_after = rss_bytes()
        say(f"  server counters: added {added}, removed {removed}")
        say(f"  agent counters:  added {a_added}, removed {a_removed}")
        say(f"  open connections: {stats['open_connections']}"
            + ("" if settled else f" (after waiting {SETTLE_SECONDS:g} s)"))
        after = engine_figures()
        say(f"  engine heap in use: before {heap_before / 1024:,.1f} KiB, after "
            f"{after['heap_bytes'] / 1024:,.1f} KiB (plus {after['pool_bytes'] / 1024:,.0f} KiB "
            "of idle I/O buffers kept for reuse)")
        say(f"  RSS: before {_mib(rss_before)}, after {_mib(rss_after)}")
    finally:
        if cli is not None:
            cli.close()
        srv.close()
        service.shutdown()
        service.server_close()

    sessions_left = engine_stats()["open_sessions"]
    problems = []
    if errors:
        problems.append(f"{len(errors)} of {n} requests failed")
    if added != removed:
        problems.append(f"server counters do not balance (added {added}, removed {removed})")
    if a_added != a_removed:
        problems.append(f"agent counters do not balance (added {a_added}, removed {a_removed})")
    if stats["open_connections"]:
        problems.append(f"{stats['open_connections']} connections still open")
    if sessions_left:
        problems.append(f"{sessions_left} sessions still open after closing")
    if problems:
        say("FAIL: " + "; ".join(problems))
        return 1
    say(f"OK: counters balance (added {added}, removed {removed}), nothing open")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
