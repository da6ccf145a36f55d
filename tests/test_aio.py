"""remotedialer_py.aio end to end: real servers, agents and targets in this
process, driven from one asyncio event loop per test (asyncio.run)."""

import asyncio
import contextlib
import gc
import os
import resource
import select
import subprocess
import sys
import time

import pytest

import support
from support import AGENT_KEY, TIMEOUT, closed_port, connection_imbalance


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


async def until(predicate, what, timeout=TIMEOUT):
    """support.wait_for for coroutines: polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    interval = 0.001
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
        interval = min(interval * 2, 0.05)


def balanced(*objs):
    return all(not connection_imbalance(o.metrics()) for o in objs)


@contextlib.asynccontextmanager
async def aio_tunnel(rd, key=AGENT_KEY, server_options=None, **client_options):
    """A started aio.Server and an aio.Client connected to it as `key`;
    connection counters must balance on both before they close."""
    async with rd.aio.Server(**(server_options or {})) as srv, \
            rd.aio.Client(srv.url, headers={"X-Tunnel-ID": key}, **client_options) as cli:
        await cli.wait_connected(TIMEOUT)
        await until(lambda: srv.has_session(key), "the agent's session")
        yield srv, cli
        await until(lambda: balanced(srv, cli), "balanced connection counters")


class Ticker:
    """Counts turns of the event loop at a fixed interval and records the
    longest gap between two: what a blocked loop would show. ``max_gap``
    leaves out the time the interpreter's garbage collector took meanwhile
    (with thousands of coroutines alive, a full collection alone can take a
    good part of a second on a busy machine); ``max_gap_gc`` includes it."""

    def __init__(self, interval=0.01):
        self.interval = interval
        self.ticks = 0
        self.max_gap = self.max_gap_gc = 0.0
        self._gc_total = 0.0
        self._gc_start = None
        self._task = None

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_start = time.monotonic()
        elif self._gc_start is not None:
            self._gc_total += time.monotonic() - self._gc_start

    async def _run(self):
        last, last_gc = time.monotonic(), self._gc_total
        while True:
            await asyncio.sleep(self.interval)
            now, now_gc = time.monotonic(), self._gc_total
            self.max_gap_gc = max(self.max_gap_gc, now - last)
            self.max_gap = max(self.max_gap, (now - last) - (now_gc - last_gc))
            self.ticks += 1
            last, last_gc = now, now_gc

    def __enter__(self):
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc):
        self._task.cancel()
        gc.callbacks.remove(self._on_gc)


def test_open_connection_and_dial_round_trip(rd, echo_server, tunnel_leak_check):
    payload = os.urandom(256 * 1024)

    async def main():
        async with aio_tunnel(rd) as (srv, cli):
            reader, writer = await srv.open_connection(AGENT_KEY, "tcp", echo_server.address)
            sock = writer.get_extra_info("socket")
            assert writer.transport.get_extra_info("socket").fileno() == sock.fileno()
            conn = next(c for c in srv.connections())
            assert conn["clientkey"] == AGENT_KEY and conn["address"] == echo_server.address
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
            await writer.wait_closed()

            s = await srv.dial(AGENT_KEY, "tcp", echo_server.address)
            assert isinstance(s, rd.TunnelSocket) and s.gettimeout() == 0
            assert (s.client_key, s.target) == (AGENT_KEY, f"tcp/{echo_server.address}")
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(s, b"ping")
            assert await loop.sock_recv(s, 4) == b"ping"
            s.close()

    run(main())
    echo_server.wait_finished(2)


def test_refused_target_reads_eof_with_the_error(rd, tunnel_leak_check):
    async def main():
        async with aio_tunnel(rd) as (srv, cli):
            # dial, then streams on its socket: the socket keeps tunnel_error.
            sock = await srv.dial(AGENT_KEY, "tcp", f"127.0.0.1:{closed_port()}")
            reader, writer = await asyncio.open_connection(sock=sock)
            assert await reader.read() == b""
            assert "refused" in sock.tunnel_error
            writer.close()
            await writer.wait_closed()

    run(main())


def test_forward_is_an_async_context_manager(rd, echo_server, tunnel_leak_check):
    async def round_trip(fwd, data):
        reader, writer = await asyncio.open_connection(fwd.host, fwd.port)
        writer.write(data)
        got = await reader.readexactly(len(data))
        writer.close()
        await writer.wait_closed()
        return got

    async def main():
        async with aio_tunnel(rd) as (srv, cli):
            async with srv.forward(AGENT_KEY, "tcp", echo_server.address) as fwd:
                assert await round_trip(fwd, b"through the forward") == b"through the forward"
            assert fwd.closed
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(fwd.host, fwd.port)
            # Awaited instead: open until the server closes it.
            kept = await srv.forward(AGENT_KEY, "tcp", echo_server.address)
            assert await round_trip(kept, b"again") == b"again"
        assert kept.closed and srv.closed

    run(main())


def test_errors_are_raised_from_the_coroutines(rd, tunnel_leak_check):
    async def main():
        srv = rd.aio.Server()
        with pytest.raises(RuntimeError, match="not started"):
            await srv.dial(AGENT_KEY, "tcp", "127.0.0.1:1")
        async with aio_tunnel(rd) as (srv, cli):
            with pytest.raises(rd.ClientNotFoundError, match="nobody"):
                await srv.dial("nobody", "tcp", "127.0.0.1:1")
            with pytest.raises(rd.ClientNotFoundError):
                await srv.open_connection("nobody", "tcp", "127.0.0.1:1")
            with pytest.raises(ValueError):
                await srv.dial(AGENT_KEY, "tcp", "127.0.0.1:1", timeout=-1)
        for call in (srv.dial(AGENT_KEY, "tcp", "127.0.0.1:1"),
                     srv.open_connection(AGENT_KEY, "tcp", "127.0.0.1:1"),
                     srv.forward(AGENT_KEY, "tcp", "127.0.0.1:1"), srv.peers(),
                     srv.route(AGENT_KEY), cli.wait_connected(1)):
            with pytest.raises(rd.ClosedError):
                await call
        await srv.close()  # again: nothing to do

    run(main())


def test_waits_do_not_block_the_event_loop(rd, tunnel_leak_check):
    url = f"ws://127.0.0.1:{closed_port()}/connect"

    async def main():
        async with rd.aio.Client(url, headers={"X-Tunnel-ID": AGENT_KEY}) as cli:
            with Ticker(0.01) as ticker:
                start = time.monotonic()
                with pytest.raises(TimeoutError, match="not connected"):
                    await cli.wait_connected(timeout=1.0)
                assert time.monotonic() - start >= 1.0
            # A blocking wait would leave the ticker one turn at most.
            assert ticker.ticks >= 10, ticker.ticks
            # Closed while waiting: the waiter hears it, without a timeout.
            waiter = asyncio.ensure_future(cli.wait_connected(timeout=None))
            await asyncio.sleep(0)
            await cli.close()
            with pytest.raises(rd.ClosedError):
                await waiter

    run(main())


def test_cancelled_dials_leak_nothing(rd, echo_server, tunnel_leak_check):
    fds_before = support.open_fds()

    async def main():
        async with aio_tunnel(rd) as (srv, cli):
            fd = srv._calls.completer.fileno()
            base = support.open_fds()  # with the tunnel and this loop up

            # Cancelled before the engine's answer is read: the answer's
            # socket is closed when it arrives.
            task = asyncio.ensure_future(srv.dial(AGENT_KEY, "tcp", echo_server.address))
            await asyncio.sleep(0)  # the task posts its dial
            assert srv._calls.completer.in_flight == 1
            task.cancel()
            await until(lambda: srv._calls.completer.in_flight == 0, "the answer collected")
            # Cancelled after the answer resolved its Future, before the task
            # resumed: the task releases the socket itself.
            task2 = asyncio.ensure_future(srv.dial(AGENT_KEY, "tcp", echo_server.address))
            await asyncio.sleep(0)  # the task posts its dial
            select.select([fd], [], [], TIMEOUT)  # the engine has answered
            await asyncio.sleep(0)  # the next turn runs us, then the reader...
            await asyncio.sleep(0)  # ...which resolved the Future: the task resumes after us
            task2.cancel()
            # Many at once, cancelled in the turn they were posted.
            many = [asyncio.ensure_future(srv.open_connection(AGENT_KEY, "tcp",
                                                              echo_server.address))
                    for _ in range(200)]
            await asyncio.sleep(0)
            for t in many:
                t.cancel()
            results = await asyncio.gather(task, task2, *many, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results
            await until(lambda: srv._calls.completer.in_flight == 0, "every answer collected")
            await until(lambda: rd.engine_stats()["open_connections"] == 0,
                        "no open tunneled connection")
            await until(lambda: len(support.open_fds()) <= len(base),
                        "descriptors back to the baseline")
            # The tunnel still works.
            reader, writer = await srv.open_connection(AGENT_KEY, "tcp", echo_server.address)
            writer.write(b"after")
            assert await reader.readexactly(5) == b"after"
            writer.close()
            await writer.wait_closed()

    run(main())
    support.assert_no_new_fds(fds_before)


def test_cancelled_close_still_closes(rd, tunnel_leak_check):
    async def main():
        srv = await rd.aio.Server().start()
        closer = asyncio.ensure_future(srv.close())
        await asyncio.sleep(0)
        closer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closer
        await srv.close()  # waits for the close that went on
        assert srv.closed
        with pytest.raises(rd.ClosedError):
            await srv.dial(AGENT_KEY, "tcp", "127.0.0.1:1")

    run(main())


def test_objects_dropped_unclosed_are_closed(rd, echo_server, tunnel_leak_check):
    async def main():
        srv = await rd.aio.Server().start()
        cli = await rd.aio.Client(srv.url, headers={"X-Tunnel-ID": AGENT_KEY}).start()
        await cli.wait_connected(TIMEOUT)
        await until(lambda: srv.has_session(AGENT_KEY), "the agent's session")
        reader, writer = await srv.open_connection(AGENT_KEY, "tcp", echo_server.address)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        writer.close()
        await writer.wait_closed()
        with pytest.warns(ResourceWarning, match="unclosed <aio"):
            del srv, cli
            gc.collect()

    run(main())


def test_peering_calls(rd, echo_server, tunnel_leak_check):
    async def main():
        async with rd.aio.Server(peer_id="A", peer_token="token-a") as a, \
                rd.aio.Server(peer_id="B", peer_token="token-b") as b:
            await a.add_peer(b.url, "B", "token-b")
            await b.add_peer(a.url, "A", "token-a")
            async with rd.aio.Client(b.url, headers={"X-Tunnel-ID": AGENT_KEY}) as cli:
                await cli.wait_connected(TIMEOUT)
                assert [p["id"] for p in await a.peers()] == ["B"]
                route = None
                while route != "B":  # B announces the agent to A
                    route = await a.route(AGENT_KEY)
                    await asyncio.sleep(0.01)
                assert await b.route(AGENT_KEY) == ""
                reader, writer = await a.open_connection(AGENT_KEY, "tcp", echo_server.address)
                writer.write(b"via B")
                assert await reader.readexactly(5) == b"via B"
                writer.close()
                await writer.wait_closed()
                assert await b.disconnect(AGENT_KEY) == 1
                assert await a.remove_peer("B") is True
                assert await a.remove_peer("nobody") is False
                await until(lambda: balanced(a, b), "balanced connection counters")

    run(main())


# The target of the 10,000 dials: an asyncio echo server in a process of its
# own, so that this event loop runs only the dials (and the machine's other
# core serves the target). It prints its port and runs until stdin closes.
ECHO_PROCESS = """
import asyncio, sys

async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()

async def main():
    srv = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(srv.sockets[0].getsockname()[1], flush=True)
    stdin_closed = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stdin_closed.set)
    await stdin_closed.wait()

asyncio.run(main())
"""


def test_ten_thousand_concurrent_dials(rd, tunnel_leak_check):
    """10,000 dials with one round trip each, gathered at once on one event
    loop. Each open connection costs three descriptors in this process (ours,
    the engine's end and the agent's), and the last ones close a moment after
    ours, so at most as many are open at a time as the descriptor limit
    allows with room for those (the rest wait their turn on a semaphore,
    already started)."""
    n = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    budget = min(n, (soft - len(support.open_fds()) - 500) // 4)
    assert budget >= 1000, f"descriptor limit {soft} is too low for this test"
    target = subprocess.Popen([sys.executable, "-c", ECHO_PROCESS], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    async def main():
        address = f"127.0.0.1:{int(target.stdout.readline())}"
        room = asyncio.Semaphore(budget)
        async with aio_tunnel(rd, max_pending_dials=n, max_connections=n) as (srv, cli):
            async def one(i):
                data = b"%d" % i
                async with room:
                    reader, writer = await srv.open_connection(AGENT_KEY, "tcp", address)
                    writer.write(data)
                    got = await reader.readexactly(len(data))
                    writer.close()
                    await writer.wait_closed()
                return got == data

            start = time.monotonic()
            dials = asyncio.gather(*(one(i) for i in range(n)))
            # The ticker starts once every coroutine has started (one turn of
            # the loop that gather's 10,000 first steps take by themselves).
            await asyncio.sleep(0)
            with Ticker(0.01) as ticker:
                results = await dials
            elapsed = time.monotonic() - start
            assert results.count(True) == n
            print(f"\n{n} dials + round trips, {budget} open at most: {elapsed:.2f} s; "
                  f"longest event loop gap {ticker.max_gap * 1000:.0f} ms "
                  f"({ticker.max_gap_gc * 1000:.0f} ms with garbage collection), "
                  f"{ticker.ticks} ticks")
            # The loop keeps turning: a blocking dial would hold it for the
            # whole run. A turn may still be long: thousands of sockets become
            # ready together (about 0.4 s here alone; several times that on a
            # loaded machine).
            assert ticker.ticks >= 20 and ticker.max_gap < 3.0, \
                (ticker.ticks, ticker.max_gap, ticker.max_gap_gc)
            assert srv._calls.completer.in_flight == 0

    try:
        run(main())
    finally:
        target.stdin.close()
        target.wait(TIMEOUT)
        target.stdout.close()
