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

import sys
import time
from typing import Callable, Optional, TextIO

from .soak import ADD, REMOVE, Load, Service, engine_figures  # the soak's pieces

SETTLE_SECONDS = 10.0


def _mib(n: int) -> str:
    return "n/a" if n < 0 else f"{n / (1 << 20):.1f} MiB"


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


def run(n: int = 2000, concurrency: int = 8, out: TextIO = sys.stdout) -> int:
    from . import Client, Server, engine_stats

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    service = Service()  # serves on its own thread from here on
    svc_port = service.port
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

        before = engine_figures()
        tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        started = time.monotonic()
        load = Load(srv, svc_port, client_key="demo", timeout=10)
        load.start(n, concurrency)
        last_report = 0
        while load.running:
            time.sleep(0.1)
            progress = load.figures()
            count, failed = progress["done"], progress["errors"]
            if tty:
                sys.stderr.write(f"\r  {count}/{n} requests, {failed} failed ")
                sys.stderr.flush()
            elif count - last_report >= max(1, n // 4):
                last_report = count
                say(f"  {count}/{n} requests, {failed} failed")
        load.join()
        elapsed = time.monotonic() - started
        result = load.figures()
        failed = result["errors"]
        if tty:
            sys.stderr.write("\r" + " " * 60 + "\r")
        say(f"  done: {n} requests in {elapsed:.2f} s = {n / elapsed:,.0f} requests/s "
            f"({(n + 1) // 2} via dial, {n // 2} via /client/), {failed} failed")
        for text in result["error_texts"]:
            say(f"    error: {text}")

        # Connections end asynchronously after the last response: wait for the
        # engine to finish, within a bound, rather than sleeping blindly.
        settled = wait_until(lambda: engine_stats()["open_connections"] == 0, SETTLE_SECONDS)
        stats = engine_stats()
        server_metrics, agent_metrics = srv.metrics(), cli.metrics()
        added, removed = counter_sum(server_metrics, ADD), counter_sum(server_metrics, REMOVE)
        a_added, a_removed = counter_sum(agent_metrics, ADD), counter_sum(agent_metrics, REMOVE)
        say(f"  server counters: added {added}, removed {removed}")
        say(f"  agent counters:  added {a_added}, removed {a_removed}")
        say(f"  open connections: {stats['open_connections']}"
            + ("" if settled else f" (after waiting {SETTLE_SECONDS:g} s)"))
        after = engine_figures()
        say(f"  engine heap in use: before {before['heap_bytes'] / 1024:,.1f} KiB, after "
            f"{after['heap_bytes'] / 1024:,.1f} KiB (plus {after['pool_bytes'] / 1024:,.0f} KiB "
            "of idle I/O buffers kept for reuse)")
        say(f"  RSS: before {_mib(before['rss_bytes'])}, after {_mib(after['rss_bytes'])}")
    finally:
        if cli is not None:
            cli.close()
        srv.close()
        service.close()

    sessions_left = engine_stats()["open_sessions"]
    problems = []
    if failed:
        problems.append(f"{failed} of {n} requests failed")
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
