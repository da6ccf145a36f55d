"""Regression scenarios from the Go library's leak history (and its users'):
each leaked or hung in some version there. Each test ends with balanced
counters and nothing open (the `tunnel` fixture, or `tunnel_leak_check`
plus explicit checks)."""

import gc
import hashlib
import http.client
import json
import os
import random
import selectors
import signal
import socket
import struct
import threading
import time
import urllib.parse
import warnings

import pytest

import support
import wsraw
from support import (ADD_SESSION, AGENT_KEY, REMOVE_SESSION, TIMEOUT, check_balanced, key,
                     recv_exact, wait_engine_idle, wait_for)


def raw_session(srv, client_key="raw-1"):
    ws = wsraw.WSConn.connect("127.0.0.1", srv.port, headers={"X-Tunnel-ID": client_key})
    wait_for(lambda: srv.has_session(client_key), what=f"a session for {client_key}")
    return ws


def expect_end(sock, error=None, timeout=TIMEOUT):
    try:
        support.recv_until_eof(sock, timeout=timeout)
    except ConnectionResetError:
        pass
    assert sock.tunnel_error == error
    assert not sock.tunnel_open


class KeepAliveBackend(support._ThreadedTCPServer):
    """An HTTP/1.1 backend that keeps every connection open after its
    response, whatever the request's Connection header says, until the
    client goes away: the worst case for a caller that never closes."""

    BODY = b"kept alive\n"

    def __init__(self):
        self.requests = 0
        super().__init__()

    def serve(self, conn):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return support.Finished(0, "")
                buf += chunk
            _, buf = buf.split(b"\r\n\r\n", 1)
            with self._cond:
                self.requests += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY))


@pytest.fixture
def keepalive_backend():
    srv = KeepAliveBackend()
    try:
        yield srv
        wait_for(lambda: srv.open_count == 0, TIMEOUT, "every backend connection to be closed")
    finally:
        srv.close()


# ---------------------------------------------------------------------------
# Rancher v2.11.0: a new HTTP pool per request, thrown away unclosed


def _collect():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_pool_per_request_through_the_route(tunnel, keepalive_backend):
    n = 200
    for i in range(n):
        pool = http.client.HTTPConnection("127.0.0.1", tunnel.srv.port, timeout=TIMEOUT)
        pool.request("GET", f"/client/{AGENT_KEY}/http/{keepalive_backend.address}/r/{i}")
        resp = pool.getresponse()
        assert (resp.status, resp.read()) == (200, KeepAliveBackend.BODY)
        del pool, resp  # thrown away, never closed
    assert keepalive_backend.requests == n
    _collect()
    # The route's pool kept one tunneled connection for them all, idle.
    assert keepalive_backend.accepted == 1
    wait_for(lambda: [c["state"] for c in tunnel.srv.connections()] == ["idle"],
             what="the pooled connection alone, idle")
    assert tunnel.srv.close_idle() == 1
    wait_for(lambda: not tunnel.srv.connections(), what="every dropped pool's connection to end")
    keepalive_backend.wait_open(0)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_pool_per_request_via_dial_with_sockets_dropped(tunnel, keepalive_backend):
    n = 200
    for i in range(n):
        pool = http.client.HTTPConnection("backend", timeout=TIMEOUT)
        pool.sock = tunnel.dial(keepalive_backend.port)
        pool.request("GET", f"/d/{i}")  # HTTP/1.1: the pool would keep it for reuse
        resp = pool.getresponse()
        assert (resp.status, resp.read()) == (200, KeepAliveBackend.BODY)
        del pool, resp
    assert keepalive_backend.requests == n
    _collect()
    wait_for(lambda: not tunnel.srv.connections(), what="every dropped socket's connection to end")
    keepalive_backend.wait_open(0)


def test_idle_connection_is_visible_and_ended_by_idle_timeout(rd, tunnel_leak_check,
                                                              keepalive_backend):
    # The checks below run while the connection is idle (at least 0.2 s) and
    # not yet ended (2 s): room for a loaded machine to get through them.
    with rd.Server(listen="127.0.0.1:0", idle_timeout=2.0, debug_route=True) as srv, \
            support.make_client(rd, srv.url, AGENT_KEY) as cli:
        kept = http.client.HTTPConnection("backend", timeout=TIMEOUT)
        kept.sock = srv.dial(AGENT_KEY, "tcp", keepalive_backend.address, timeout=TIMEOUT)
        kept.request("GET", "/")
        resp = kept.getresponse()
        assert resp.read() == KeepAliveBackend.BODY
        sock = kept.sock
        # Kept open, idle: visible with its age and idle time.
        (c,) = wait_for(lambda: [c for c in srv.connections() if c["idle"] >= 0.2],
                        what="the connection to be idle")
        assert c["id"] == sock.conn_id and c["state"] == "open"
        assert c["address"] == keepalive_backend.address and c["clientkey"] == AGENT_KEY
        assert c["age"] >= c["idle"] and c["tx_bytes"] > 0 and c["rx_bytes"] > 0
        status, body = _http_get(srv.port, "/debug/connections")
        assert status == 200
        (listed,) = json.loads(body)["connections"]
        assert listed["id"] == sock.conn_id and listed["idle"] >= 0.2
        # Then the server's idle timeout ends it, on both sides.
        expect_end(sock, "idle timeout")
        kept.close()
        keepalive_backend.wait_open(0)
        check_balanced(srv)
        check_balanced(cli)
    wait_engine_idle(rd)


def test_idle_timeout_per_dial_and_off_by_default(tunnel, keepalive_backend):
    watch = tunnel.dial(keepalive_backend.port)  # no idle timeout: a long watch
    short = tunnel.srv.dial(AGENT_KEY, "tcp", keepalive_backend.address, timeout=TIMEOUT,
                            idle_timeout=0.3)
    short.settimeout(TIMEOUT)
    started = time.monotonic()
    expect_end(short, "idle timeout")
    assert time.monotonic() - started < 5
    short.close()
    # The other one, idle for longer than that, is still there and works.
    (c,) = tunnel.srv.connections()
    assert c["id"] == watch.conn_id and c["idle"] >= 0.3
    pool = http.client.HTTPConnection("backend", timeout=TIMEOUT)
    pool.sock = watch
    pool.request("GET", "/")
    assert pool.getresponse().read() == KeepAliveBackend.BODY
    pool.close()


def _http_get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# A close whose ERROR cannot be written at once


def test_error_is_delivered_while_the_write_queue_is_blocked(tunnel):
    """The raw peer stops reading, so the server's WebSocket write queue
    fills up behind a bulk transfer and stays blocked. Meanwhile another
    connection ends on the server (idle timeout). Once the peer reads again,
    the ERROR for it arrives: the far side never keeps a connection the
    near side has forgotten."""
    srv = tunnel.srv
    ws = raw_session(srv)
    try:
        bulk = tunnel.dial("10.9.9.9:80", key="raw-1")
        bulk_id = ws.recv_tunnel().conn_id
        # Idle long enough for the queue to fill first, on a loaded machine too.
        quiet = srv.dial("raw-1", "tcp", "10.9.9.9:81", timeout=TIMEOUT, idle_timeout=3)
        quiet_id = ws.recv_tunnel().conn_id
        total = 24 << 20
        payload = random.Random(3).randbytes(1 << 20)
        writer = threading.Thread(target=lambda: [bulk.sendall(payload) for _ in range(24)],
                                  daemon=True)
        writer.start()
        # The queue toward the peer is blocked (the engine stops reading the
        # local sockets past its high-water mark) ...
        wait_for(lambda: tunnel.rd.engine_stats()["buffered_to_tunnel"] >= 4 << 20,
                 what="the session's write queue to fill")
        assert quiet_id in [c["id"] for c in srv.connections()], "ended before the queue filled"
        # ... when the quiet connection ends on this side.
        wait_for(lambda: quiet_id not in [c["id"] for c in srv.connections()],
                 what="the idle connection to end on the server")
        assert quiet.recv(1) == b"" and quiet.tunnel_error == "idle timeout"
        quiet.close()
        # The peer reads again: everything, and the ERROR for the quiet one.
        got = 0
        errors = []
        while got < total or not errors:
            msg = ws.recv_tunnel(skip=(wsraw.SYNC_CONNECTIONS, wsraw.PAUSE, wsraw.RESUME))
            if msg.type == wsraw.DATA:
                assert msg.conn_id == bulk_id
                got += len(msg.payload)
            else:
                assert msg.type == wsraw.ERROR, msg
                errors.append((msg.conn_id, msg.text))
        assert errors == [(quiet_id, "idle timeout")]
        assert got == total
        writer.join(TIMEOUT)
        bulk.close()
        msg = ws.recv_tunnel()
        assert (msg.type, msg.conn_id, msg.text) == (wsraw.ERROR, bulk_id, "EOF")
    finally:
        ws.close()
    wait_for(lambda: not srv.has_session("raw-1"), what="the raw session to end")


# ---------------------------------------------------------------------------
# PAUSE without RESUME


def _fill(sock):
    """Writes into a non-blocking socket until it would block; returns the
    byte count."""
    sock.setblocking(False)
    n = 0
    chunk = b"p" * 65536
    try:
        while True:
            n += sock.send(chunk)
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return n


def test_pause_without_resume_then_the_session_dies(tunnel):
    ws = raw_session(tunnel.srv)
    try:
        sock = tunnel.dial("10.9.9.9:80", key="raw-1")
        cid = ws.recv_tunnel().conn_id
        ws.send_msg(cid, wsraw.PAUSE)
        wait_for(lambda: tunnel.srv.connections()[0]["paused"], what="the server to pause")
        assert _fill(sock) > 0
        blocked = threading.Event()
        outcome = []

        def write_more():
            blocked.set()
            try:
                # Far more than any read-ahead: this blocks, as nobody reads.
                block = b"q" * (1 << 20)
                for _ in range(64):
                    sock.sendall(block)
                outcome.append("sent")
            except OSError as e:
                outcome.append(type(e).__name__)

        t = threading.Thread(target=write_more, daemon=True)
        t.start()
        blocked.wait(TIMEOUT)
    finally:
        ws.abort()  # the session dies; RESUME never came
    t.join(TIMEOUT)
    assert not t.is_alive(), "a writer stayed blocked on a dead connection"
    assert outcome and outcome[0] != "sent", outcome
    expect_end(sock, "tunnel disconnect")
    sock.close()
    wait_for(lambda: not tunnel.srv.has_session("raw-1"), what="the raw session to end")



def _paused_close(rd, max_buffer, fill):
    """A raw peer pauses a connection and keeps the session alive; `fill`
    writes into the dialed socket, which is then closed (RESUME never
    comes). The connection must end, the far side told."""
    # A short read timeout makes the session's tick (which may be what
    # notices the closed end) frequent; the peer keeps the session alive
    # with a Ping on each poll.
    with rd.Server(listen="127.0.0.1:0", read_timeout=2, max_buffer=max_buffer) as srv:
        ws = raw_session(srv)
        try:
            sock = srv.dial("raw-1", "tcp", "10.9.9.9:80", timeout=TIMEOUT)
            cid = ws.recv_tunnel().conn_id
            ws.send_msg(cid, wsraw.PAUSE)
            wait_for(lambda: srv.connections()[0]["paused"], what="the server to pause")
            fill(srv, sock)
            sock.close()  # RESUME never comes; the application goes away

            def ended():
                ws.send_ping()
                return not srv.connections()

            wait_for(ended, 4, "the paused connection to end after its local end closed")
            check_balanced(srv)
            msgs = [m for m in support.ping_barrier(ws) if m.type != wsraw.PAUSE]
            assert msgs and msgs[-1].type == wsraw.ERROR and msgs[-1].conn_id == cid, msgs
        finally:
            ws.abort()
        wait_for(lambda: not srv.has_session("raw-1"), what="the raw session to end")
    wait_engine_idle(rd)


def test_pause_without_resume_then_the_local_end_closes(rd, tunnel_leak_check):
    """Closed with less unread than the read-ahead: reading ahead sees EOF."""
    def fill(srv, sock):
        sock.sendall(b"p" * (64 << 10))

    _paused_close(rd, 1 << 20, fill)


def test_pause_without_resume_then_a_full_local_end_closes(rd, tunnel_leak_check):
    """Closed with more unread than the read-ahead: the engine has stopped
    reading (max_buffer held) and the socket buffer is full when the
    application goes away; the close must still be noticed."""
    max_buffer = 64 << 10

    def fill(srv, sock):
        # Fill until the engine holds its whole read-ahead (it then stops
        # reading), and the socket buffer behind it.
        deadline = time.monotonic() + TIMEOUT
        while srv.connections()[0]["tx_bytes"] < max_buffer:
            assert time.monotonic() < deadline, "the engine read nothing ahead"
            _fill(sock)
        assert _fill(sock) >= 0

    _paused_close(rd, max_buffer, fill)


class WriteThenCloseServer(support._ThreadedTCPServer):
    """Waits for one byte, writes SIZE bytes, then closes its end."""

    SIZE = 300_000

    def serve(self, conn):
        if conn.recv(1):
            conn.sendall(b"t" * self.SIZE)
        return support.Finished(self.SIZE, "")


def test_pause_without_resume_then_the_agents_target_closes(rd, tunnel_leak_check):
    # The agent reads ahead of a PAUSE (up to max_buffer) far enough to see
    # a target that wrote its last bytes and closed; the connection then
    # ends, every byte delivered, though RESUME never comes. (A target whose
    # unread bytes exceed the read-ahead is still delivering: its FIN waits
    # behind them in TCP, so that connection rightly stays until RESUME.)
    target = WriteThenCloseServer()
    try:
        with wsraw.WSListener() as listener:
            with rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-r"}, read_timeout=2,
                           ping_interval=0.5) as cli:
                ws, _ = listener.accept(timeout=TIMEOUT)
                try:
                    ws.send_msg(2, wsraw.CONNECT, f"tcp/{target.address}")
                    ws.send_msg(2, wsraw.PAUSE)
                    support.ping_barrier(ws)
                    ws.send_msg(2, wsraw.DATA, b"g")  # exactly what the target reads
                    got = 0

                    def ended():
                        nonlocal got
                        try:
                            while True:
                                msg = ws.recv_tunnel(timeout=0.05)
                                if msg.conn_id != 2:
                                    continue
                                if msg.type == wsraw.DATA:
                                    got += len(msg.payload)
                                elif msg.type == wsraw.ERROR:
                                    assert msg.payload == b"EOF", msg.payload
                                    return True
                        except TimeoutError:
                            return False

                    wait_for(ended, 10, "the agent to end the paused connection")
                    assert got == WriteThenCloseServer.SIZE
                    check_balanced(cli)
                finally:
                    ws.abort()
    finally:
        target.close()
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# A 4 MiB burst, then drained


class BurstServer(support._ThreadedTCPServer):
    """Waits for one byte, sends SIZE deterministic bytes at once, then
    holds the connection open until the client goes away."""

    SIZE = 4 << 20
    DATA = random.Random(4).randbytes(SIZE)

    def serve(self, conn):
        if conn.recv(1):
            conn.sendall(self.DATA)
            while conn.recv(65536):
                pass
        return support.Finished(self.SIZE, "")


def heap_in_use(rd):
    """Engine heap bytes not idle in the block pool, from one snapshot taken
    after the pools were trimmed: a block released after the trim (the last
    write's, a drained read block) is back in the pool, not in use."""
    rd.engine_trim()
    stats = rd.engine_stats()
    return stats["heap_bytes"] - stats["pool_bytes"]


def test_burst_then_drained_gives_memory_back(tunnel):
    burst = BurstServer()
    try:
        sock = tunnel.dial(burst.port)
        round_trip_ready = tunnel.srv.connections()
        assert len(round_trip_ready) == 1
        heap0 = heap_in_use(tunnel.rd)
        sock.sendall(b"!")
        # Nobody reads: the burst piles up in the engine, up to PAUSE.
        (c,) = wait_for(lambda: [c for c in tunnel.srv.connections()
                                 if c["paused"] and c["buffered"] > 0],
                        what="the burst to be buffered and paused")
        peak = max(tunnel.rd.engine_stats()["heap_bytes"], heap0)
        data = recv_exact(sock, BurstServer.SIZE)
        assert hashlib.sha256(data).digest() == hashlib.sha256(BurstServer.DATA).digest()
        # Drained: nothing buffered, RESUME sent, and the memory given back.
        wait_for(lambda: [(c["buffered"], c["paused"]) for c in tunnel.srv.connections()]
                 == [(0, False)], what="the buffer to drain and the pause to lift")
        wait_for(lambda: tunnel.rd.engine_stats()["buffered_bytes"] == 0,
                 what="no byte buffered anywhere in the engine")
        heap1 = heap_in_use(tunnel.rd)
        # The burst held megabytes at its peak (2 MiB before PAUSE, plus what
        # was in flight); what stays must be far below one of those.
        assert heap1 - heap0 <= 64 << 10, (heap0, peak, heap1)
        sock.close()
    finally:
        burst.close()


def test_peer_sends_close_then_resets(rd, tunnel_leak_check, echo_server):
    """A peer that sends CLOSE and resets at once: the server's echo of the
    close fails while the session is ending (with a reset already there, at
    once). The session ends once, counted once; the server serves on."""
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        for i in range(20):
            ws = raw_session(srv, f"raw-rst-{i}")
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.send_raw(wsraw.encode_frame(wsraw.OP_CLOSE, wsraw.close_payload(1000, "bye")))
            ws.sock.close()
        wait_for(lambda: srv.list_clients() == [], what="every reset session to end")
        m = srv.metrics()
        for i in range(20):
            label = key(clientkey=f"raw-rst-{i}", peer="false")
            assert m[ADD_SESSION][label] == m[REMOVE_SESSION][label] == 1
        ws = raw_session(srv, "raw-after")
        ws.close()
    wait_engine_idle(rd)


def test_dial_into_a_session_whose_peer_just_reset(rd, tunnel_leak_check):
    """A dial races the agent's reset: the session may be gone (the dial
    raises), or its CONNECT write may fail at once and end the session inside
    the dial (the socket reads EOF with the reason). Never a crash, and
    everything balances."""
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        for i in range(30):
            ws = raw_session(srv, f"raw-gone-{i}")
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.sock.close()
            try:
                sock = srv.dial(f"raw-gone-{i}", "tcp", "127.0.0.1:9", timeout=TIMEOUT)
            except rd.TunnelError:
                continue
            sock.settimeout(TIMEOUT)
            try:
                support.recv_until_eof(sock, timeout=TIMEOUT)
            except ConnectionResetError:
                pass
            assert sock.tunnel_error is not None
            sock.close()
        wait_for(lambda: srv.list_clients() == [], what="every reset session to end")
        check_balanced(srv, sessions=True)
    wait_engine_idle(rd)


def test_idle_sessions_hold_no_read_block(tunnel, stream_server, echo_server):
    """A session reads into a 1 MiB pooled block; once its socket is drained
    and no partial frame waits, the block goes back, so a server with many
    quiet agents holds kilobytes per session, not a megabyte."""
    sock = tunnel.dial(stream_server.address)
    got = 0
    while got < 16 << 20:  # both sessions' blocks busy (DATA one way, PAUSE/RESUME back)
        chunk = sock.recv(1 << 20)
        assert chunk, sock.tunnel_error
        got += len(chunk)
    sock.close()
    wait_for(lambda: tunnel.rd.engine_stats()["open_connections"] == 0,
             what="the connection to end on both sides")
    stream_server.wait_open(0)
    # The connection has ended, but the DATA the agent framed before it saw
    # the CLOSE is still on its way through the WebSocket, megabytes of it,
    # and the server's session reads it (into its block) and drops it. A
    # later connection's echo comes back behind all of it on the same
    # ordered stream: once it is here, both sessions have read everything
    # sent to them and are idle.
    barrier = tunnel.dial(echo_server.port)
    support.round_trip(barrier, b"after the stream")
    barrier.close()
    wait_for(lambda: tunnel.rd.engine_stats()["open_connections"] == 0,
             what="the echo connection to end on both sides")
    echo_server.wait_open(0)
    assert tunnel.rd.engine_stats()["open_sessions"] == 2
    # A block a session holds is never in the pool. Two idle sessions with
    # their metrics and handles: about 12 KiB.
    in_use = heap_in_use(tunnel.rd)
    assert in_use < 64 << 10, (in_use, tunnel.rd.engine_stats())


# ---------------------------------------------------------------------------
# A local dial that completes after the server side has given up


def test_late_connect_decision_after_the_server_closed(tunnel, echo_server):
    release = threading.Event()
    held = threading.Event()
    calls = []

    def slow_allow(proto, address):
        calls.append(address)
        if len(calls) <= 2:  # the first two decisions come late
            held.set()
            release.wait(TIMEOUT)
        return True

    agent = tunnel.add_client("agent-late", allow=slow_allow)
    # One given up by the caller, one by the server's idle timeout.
    closed = tunnel.dial(echo_server.port, key="agent-late")
    timed_out = tunnel.srv.dial("agent-late", "tcp", echo_server.address, timeout=TIMEOUT,
                                idle_timeout=0.2)
    assert held.wait(TIMEOUT)
    closed.close()
    expect_end(timed_out, "idle timeout")
    timed_out.close()
    wait_for(lambda: not tunnel.srv.connections(), what="the server to end both")
    release.set()  # the agent now decides to dial them: too late
    # Decisions are made in order, so once a later dial has round-tripped,
    # the two late ones have been applied (and ignored).
    s = tunnel.dial(echo_server.port, key="agent-late")
    s.sendall(b"after")
    assert recv_exact(s, 5) == b"after"
    s.close()
    assert len(calls) == 3
    echo_server.wait_finished(1)
    assert echo_server.accepted == 1, "a dial completed for a connection already closed"
    support.wait_balanced(agent)


def test_late_tcp_connect_after_the_server_closed(tunnel):
    """The agent's TCP connect is still pending (the target drops SYNs) when
    the server side closes; the connect is abandoned at once, so when the
    target starts accepting nothing arrives."""
    target = support.NeverAccepting()
    try:
        before = target.syn_sent()
        sock = tunnel.dial(target.address)
        wait_for(lambda: target.syn_sent() > before, what="the agent's connect to be pending")
        sock.close()
        support.wait_balanced(tunnel.cli)
        wait_for(lambda: target.syn_sent() == before, what="the pending connect to be abandoned")
    finally:
        target.close()


# ---------------------------------------------------------------------------
# Closing while timers fire, from several threads at once


def test_close_while_timers_fire_from_many_threads(rd, tunnel_leak_check, echo_server):
    for _ in range(10):
        srv = rd.Server(listen="127.0.0.1:0", idle_timeout=0.004)  # a 1 ms tick
        srv.start()
        cli = support.make_client(rd, srv.url, AGENT_KEY, ping_interval=0.001,
                                  sync_interval=0.001)
        wait_for(lambda: srv.has_session(AGENT_KEY), what="the session")
        socks = []
        for _ in range(10):
            s = srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT,
                         idle_timeout=30)
            s.settimeout(TIMEOUT)
            s.sendall(b"x")
            assert recv_exact(s, 1) == b"x"
            socks.append(s)
        barrier = threading.Barrier(8)
        took = []

        def close(obj):
            barrier.wait(TIMEOUT)
            started = time.monotonic()
            obj.close()
            took.append(time.monotonic() - started)

        # The client first, from four threads: the server sees its session end.
        threads = [threading.Thread(target=close, args=(cli,)) for _ in range(4)]
        threads += [threading.Thread(target=lambda: (barrier.wait(TIMEOUT), srv.metrics()))
                    for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert len(took) == 4 and max(took) < 5, took
        for s in socks:
            expect_end(s, "tunnel disconnect")
            s.close()
        wait_for(lambda: not srv.has_session(AGENT_KEY), what="the session to end")
        check_balanced(srv, sessions=True)
        m = srv.metrics()
        label = key(clientkey=AGENT_KEY, peer="false")
        assert m[ADD_SESSION][label] == m[REMOVE_SESSION][label] == 1
        assert sum(m[support.REMOVE_CONN].values()) == 10
        # Then the server, from eight threads at once.
        barrier = threading.Barrier(8)
        took.clear()
        threads = [threading.Thread(target=close, args=(srv,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert len(took) == 8 and max(took) < 5, took
        stats = rd.engine_stats()
        assert stats["open_connections"] == 0 and stats["open_sessions"] == 0, stats
    echo_server.wait_open(0)


# ---------------------------------------------------------------------------
# A network blackhole


def test_blackhole_server_stopped_then_client_reconnects(rd, tunnel_leak_check, run_cli,
                                                         silent_backend, http_service):
    """The server process stops answering without closing (SIGSTOP): the
    client's ping deadline ends the session and its connections; once the
    server runs again, the client reconnects and both sides balance."""
    proc = run_cli("server", "--listen", "127.0.0.1:0", ready=r"listening")
    port = urllib.parse.urlsplit(proc.wait_line(r"listening on (ws://\S+)").group(1)).port
    url = f"ws://127.0.0.1:{port}/connect"
    with rd.Client(url, headers={"X-Tunnel-ID": AGENT_KEY}, ping_interval=0.2, read_timeout=1,
                   handshake_timeout=1, backoff_min=0.1, backoff_max=0.5) as cli:
        cli.wait_connected(timeout=TIMEOUT)
        # Two exchanges held open through the server's route (the silent
        # backend reads the request and never answers).
        held = []
        for i in range(2):
            c = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            c.sendall(f"GET /client/{AGENT_KEY}/http/{silent_backend.address}/{i} HTTP/1.1\r\n"
                      f"Host: x\r\n\r\n".encode())
            silent_backend.wait_accepted(i + 1)
            held.append(c)
        silent_backend.wait_open(2)
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            wait_for(lambda: not cli.connected, 10, "the client to notice the blackhole")
            assert time.monotonic() - started < 5
            silent_backend.wait_open(0)  # the client ended its side of both
            check_balanced(cli)
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        cli.wait_connected(timeout=TIMEOUT)
        for c in held:
            try:
                support.recv_until_eof(c)
            except ConnectionResetError:
                pass
            c.close()

        def served():
            _, body = _http_get(port, "/metrics")
            return support.exposition_metrics(body.decode())

        m = support.wait_balanced(served)
        label = key(clientkey=AGENT_KEY, peer="false")
        assert m[ADD_SESSION][label] == 2 and m[REMOVE_SESSION][label] == 1
        # And the new session carries requests.
        assert _http_get(port, f"/client/{AGENT_KEY}/http/{http_service.address}/hello") == \
            (200, http_service.HELLO)
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# SYNC_CONNECTIONS racing new dials


class FinServer(support._ThreadedTCPServer):
    """Sends SIZE bytes, then closes."""

    SIZE = 64 << 10
    DATA = random.Random(5).randbytes(SIZE)

    def serve(self, conn):
        conn.sendall(self.DATA)
        return support.Finished(self.SIZE, "")


def test_sync_every_millisecond_with_a_thousand_connections(tunnel, echo_server):
    """With the agent sending SYNC every 1 ms, 1,000 concurrent connections
    (dialed while the SYNCs fly) lose nothing: none is closed by mistake,
    every byte arrives, and bytes received before a clean close are read
    before EOF."""
    fin = FinServer()
    try:
        tunnel.add_client("agent-sync", sync_interval=0.001)
        n = 1000
        sel = selectors.DefaultSelector()
        state = {}
        for i in range(n):
            port = echo_server.port if i % 2 == 0 else fin.port
            s = tunnel.dial(port, key="agent-sync")
            s.setblocking(False)
            out = f"conn-{i:04d}|".encode() * 200 if i % 2 == 0 else b""
            state[s] = {"i": i, "out": out, "sent": 0, "got": bytearray()}
            sel.register(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0), s)
        deadline = time.monotonic() + 60
        pending = n
        while pending:
            assert time.monotonic() < deadline, f"{pending} connections unfinished"
            for k, ev in sel.select(1.0):
                s = k.data
                st = state[s]
                if ev & selectors.EVENT_WRITE:
                    st["sent"] += s.send(st["out"][st["sent"]:])
                    if st["sent"] == len(st["out"]):
                        sel.modify(s, selectors.EVENT_READ, s)
                if ev & selectors.EVENT_READ:
                    try:
                        chunk = s.recv(65536)
                    except BlockingIOError:
                        continue
                    st["got"] += chunk
                    done = (not chunk) if not st["out"] else len(st["got"]) == len(st["out"])
                    if not chunk and st["out"]:
                        raise AssertionError(f"connection {st['i']} ended early: "
                                             f"{s.tunnel_error!r}")
                    if done:
                        sel.unregister(s)
                        pending -= 1
        for s, st in state.items():
            if st["out"]:
                assert bytes(st["got"]) == st["out"], st["i"]
                assert s.tunnel_open, f"connection {st['i']} closed: {s.tunnel_error!r}"
            else:
                assert bytes(st["got"]) == FinServer.DATA, st["i"]
                assert s.tunnel_error is None, (st["i"], s.tunnel_error)
            s.close()
        sel.close()
    finally:
        fin.close()
