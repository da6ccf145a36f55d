"""The pool of threads that runs Python authorizers: a slow one holds one
thread, not every other agent's handshake or every other dial's decision."""
import threading

import pytest

import support
from support import TIMEOUT, wait_for


def test_slow_authorizer_does_not_hold_up_other_agents(rd, tunnel_leak_check):
    release = threading.Event()
    entered = threading.Event()

    def authorizer(request):
        key = request.headers.get("X-Tunnel-ID", "")
        if key == "slow":
            entered.set()
            release.wait(TIMEOUT)
        return key, bool(key)

    with rd.Server(authorizer=authorizer) as srv:
        slow = rd.Client(srv.url, headers={"X-Tunnel-ID": "slow"}).start()
        try:
            assert entered.wait(TIMEOUT)
            # The slow decision is in progress on one pool thread: the next
            # agent is decided on another.
            with support.make_client(rd, srv.url, "fast"):
                assert srv.has_session("fast") and not slow.connected
            release.set()
            slow.wait_connected(TIMEOUT)
        finally:
            release.set()
            slow.close()


def test_slow_connect_authorizer_does_not_hold_up_other_agents(rd, tunnel_leak_check,
                                                               echo_server):
    release = threading.Event()
    entered = threading.Event()

    def held(proto, address):
        entered.set()
        release.wait(TIMEOUT)
        return True

    with rd.Server() as srv, \
            support.make_client(rd, srv.url, "held", allow=held), \
            support.make_client(rd, srv.url, "quick", allow=lambda proto, address: True):
        stuck = srv.dial("held", "tcp", echo_server.address)
        try:
            assert entered.wait(TIMEOUT)
            support.dial_round_trip(srv, "quick", echo_server.address, b"not held up")
        finally:
            release.set()
        support.round_trip(stuck, b"then the held one")
        stuck.close()
        echo_server.wait_open(0)


def test_pool_size(rd):
    from remotedialer_py import _callbacks
    before = _callbacks.pool_size()
    for bad in (0, -1, 257, 2.0, True, "4"):
        with pytest.raises(ValueError, match="callback threads"):
            rd.set_callback_threads(bad)
    try:
        rd.set_callback_threads(1)
        # One thread: a decision waits for the one before it, and still comes.
        with rd.Server(authorizer=lambda r: (r.headers.get("X-Tunnel-ID", ""), True)) as srv:
            with support.make_client(rd, srv.url, "one"):
                wait_for(lambda: srv.has_session("one"))
        rd.set_callback_threads(6)
        assert sum(t.name.startswith("remotedialer-callbacks")
                   for t in threading.enumerate()) >= 6
    finally:
        rd.set_callback_threads(before)


def test_async_callbacks_without_a_loop(rd, tunnel_leak_check, echo_server):
    # async def callbacks on the blocking classes: each runs to its end in a
    # loop of its own on the callback thread.
    import asyncio

    async def authorizer(request):
        await asyncio.sleep(0)
        key = request.headers.get("X-Tunnel-ID", "")
        return key, key != "refused"

    async def allow(proto, address):
        await asyncio.sleep(0)
        return address == echo_server.address

    with rd.Server(authorizer=authorizer) as srv:
        with support.make_client(rd, srv.url, "async-ok", allow=allow):
            support.dial_round_trip(srv, "async-ok", echo_server.address, b"allowed")
            sock = srv.dial("async-ok", "tcp", "127.0.0.1:9")
            assert support.recv_until_eof(sock) == b""
            assert sock.tunnel_error == "connect not allowed"
            sock.close()
        refused = rd.Client(srv.url, headers={"X-Tunnel-ID": "refused"}).start()
        try:
            wait_for(lambda: "401" in (refused.last_error or ""), what="the refusal")
        finally:
            refused.close()
        echo_server.wait_open(0)


def test_async_callbacks_on_the_aio_loop(rd, tunnel_leak_check, echo_server):
    # With the aio classes, async def callbacks run on the event loop the
    # object was started on (they may use its objects); the loop is never
    # blocked while they wait.
    import asyncio
    from remotedialer_py import aio

    async def main():
        loop = asyncio.get_running_loop()
        seen_loops = []

        async def authorizer(request):
            seen_loops.append(asyncio.get_running_loop())
            await asyncio.sleep(0.01)
            return request.headers.get("X-Tunnel-ID", ""), True

        async def allow(proto, address):
            seen_loops.append(asyncio.get_running_loop())
            return True

        async with aio.Server(authorizer=authorizer) as srv, \
                aio.Client(srv.url, headers={"X-Tunnel-ID": "aio-async"}, allow=allow) as cli:
            await cli.wait_connected(TIMEOUT)
            reader, writer = await srv.open_connection("aio-async", "tcp", echo_server.address)
            writer.write(b"on the loop")
            assert await reader.readexactly(11) == b"on the loop"
            writer.close()
            await writer.wait_closed()
        assert seen_loops and all(lp is loop for lp in seen_loops)

    asyncio.run(main())
    echo_server.wait_open(0)
