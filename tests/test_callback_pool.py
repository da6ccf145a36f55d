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
