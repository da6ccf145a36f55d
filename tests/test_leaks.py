"""The fault matrix: every way a tunneled connection can end, one test each,
and a churn of tunneled connections. Each test ends with add == remove for
every label set on both sides, nothing open in the engine and no descriptor
left behind (the `tunnel` fixture, or `tunnel_leak_check` plus explicit
checks where a test runs its own server or agent).

The paths, as the engine's conn_end comment lists them: clean close by
either end; dial failure (refused, unresolvable, timeout); CONNECT refused by
the agent's allow list; a reset of the local TCP end on either side; the
Python socket closed, or dropped and collected, without reading; the session
dying (agent SIGKILLed, ping timeout, protocol error); server or client
closed with connections open; SYNC finding a connection stale; the buffer
hard cap; interpreter exit."""

import csv
import gc
import os
import re
import selectors
import signal
import socket
import struct
import threading
import time
import warnings

import pytest

import support
import wsraw
from support import (ADD_CONN, ADD_SESSION, AGENT_KEY, REMOVE_CONN, REMOVE_SESSION, TIMEOUT,
                     check_balanced, key, recv_exact, round_trip, wait_engine_idle, wait_for)

LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST



def expect_end(sock, error=None, pattern=None, timeout=TIMEOUT):
    """Reads (and drops) until EOF; then checks the socket's tunnel_error."""
    try:
        support.recv_until_eof(sock, timeout=timeout)
    except ConnectionResetError:
        pass
    if pattern is not None:
        assert sock.tunnel_error and re.fullmatch(pattern, sock.tunnel_error), sock.tunnel_error
    else:
        assert sock.tunnel_error == error
    assert not sock.tunnel_open


def raw_session(srv, client_key="raw-1"):
    ws = wsraw.WSConn.connect("127.0.0.1", srv.port, headers={"X-Tunnel-ID": client_key})
    wait_for(lambda: srv.has_session(client_key), what=f"a session for {client_key}")
    return ws


def conn_ids(srv):
    return sorted(c["id"] for c in srv.connections())


def session_removed(srv, client_key, count=1):
    label = key(clientkey=client_key, peer="false")
    wait_for(lambda: support.family(srv.metrics(), REMOVE_SESSION).get(label, 0) == count,
             what=f"the {client_key} session to be removed")
    m = srv.metrics()
    assert m[ADD_SESSION][label] == m[REMOVE_SESSION][label] == count


class ResetServer(support._ThreadedTCPServer):
    """Reads one byte, then resets the connection (SO_LINGER 0 close)."""

    def serve(self, conn):
        conn.recv(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        return support.Finished(1, "")


@pytest.fixture
def reset_server():
    srv = ResetServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def never_accepting():
    target = support.NeverAccepting()
    try:
        yield target
    finally:
        target.close()


# ---------------------------------------------------------------------------
# Clean close


def test_clean_close_by_server_side(tunnel, echo_server):
    sock = tunnel.dial(echo_server.port)
    round_trip(sock, b"x" * 100_000)
    sock.close()
    (done,) = echo_server.wait_finished(1)
    assert done.error is None and done.nbytes == 100_000
    wait_for(lambda: not tunnel.srv.connections(), what="the connection to end")
    m = support.wait_balanced(tunnel.srv)
    label = key(addr=echo_server.address, clientkey=AGENT_KEY, proto="tcp")
    assert m[ADD_CONN][label] == m[REMOVE_CONN][label] == 1


def test_clean_close_by_agent_side(tunnel, http_service):
    sock = tunnel.dial(http_service.port)
    sock.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
    # The HTTP/1.0 service answers and closes: everything, then EOF, no error.
    answer = support.recv_until_eof(sock)
    assert answer.startswith(b"HTTP/1.0 200 ") and answer.endswith(http_service.HELLO)
    assert sock.tunnel_error is None and not sock.tunnel_open
    sock.close()
    c = support.wait_balanced(tunnel.cli)
    label = key(addr=http_service.address, clientkey="client", proto="tcp")
    assert c[ADD_CONN][label] == c[REMOVE_CONN][label] == 1


# ---------------------------------------------------------------------------
# Dial failures


def test_dial_refused(tunnel):
    port = support.closed_port()
    sock = tunnel.dial(port)
    expect_end(sock, f"dial tcp 127.0.0.1:{port}: connect: connection refused")
    sock.close()


def test_dial_unresolvable(tunnel):
    sock = tunnel.dial("no-such-host.invalid:80")
    expect_end(sock, pattern=r"dial tcp: lookup no-such-host\.invalid.*")
    sock.close()


def test_dial_timeout(tunnel, never_accepting):
    tunnel.add_client("agent-slow", dial_timeout=0.5)
    waiting = never_accepting.syn_sent()
    started = time.monotonic()
    sock = tunnel.dial(never_accepting.address, key="agent-slow")
    expect_end(sock, f"dial tcp {never_accepting.address}: i/o timeout")
    assert time.monotonic() - started < 10
    sock.close()
    # The timed-out connect was abandoned, not left retransmitting SYNs.
    wait_for(lambda: never_accepting.syn_sent() <= waiting, what="the abandoned connect to go")


def test_connect_refused_by_allow_list(tunnel, echo_server):
    agent = tunnel.add_client("agent-allow", allow=["tcp/127.0.0.1:*"])
    sock = tunnel.dial("127.0.0.2:9", key="agent-allow")
    expect_end(sock, "connect not allowed")
    sock.close()
    ok = tunnel.dial(echo_server.port, key="agent-allow")  # the session lives on
    round_trip(ok)
    ok.close()
    for side, client_key in ((tunnel.srv, "agent-allow"), (agent, "client")):
        m = support.wait_balanced(side)
        refused = key(addr="127.0.0.2:9", clientkey=client_key, proto="tcp")
        assert m[ADD_CONN][refused] == m[REMOVE_CONN][refused] == 1


# ---------------------------------------------------------------------------
# Resets of the local TCP end


def test_reset_by_the_agents_target(tunnel, reset_server):
    sock = tunnel.dial(reset_server.port)
    sock.sendall(b"!")
    expect_end(sock, pattern=r"read: connection reset by peer|.*reset.*")
    sock.close()
    reset_server.wait_finished(1)


def _reset_socket(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def test_reset_of_a_forwarded_connection(tunnel, echo_server):
    """The server side's local end is a TCP connection accepted by a forward;
    the application resets it."""
    with tunnel.srv.forward(AGENT_KEY, "tcp", echo_server.address) as fwd:
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT)
            round_trip(c)
            _reset_socket(c)
        echo_server.wait_finished(3)
        wait_for(lambda: not tunnel.srv.connections(), what="the forwarded connections to end")


def test_reset_of_a_proxy_route_request(tunnel, silent_backend):
    """The HTTP client of the /client/ route resets its connection while the
    backend (it reads and never answers) holds the exchange open."""
    c = socket.create_connection(("127.0.0.1", tunnel.srv.port), timeout=TIMEOUT)
    c.sendall(f"GET /client/{AGENT_KEY}/http/{silent_backend.address}/ HTTP/1.1\r\n"
              f"Host: x\r\n\r\n".encode())
    silent_backend.wait_accepted(1)  # the exchange is up
    _reset_socket(c)
    silent_backend.wait_finished(1)
    wait_for(lambda: not tunnel.srv.connections(), what="the route's connection to end")


# ---------------------------------------------------------------------------
# The Python socket


def test_socket_closed_without_reading(tunnel, stream_server):
    socks = [tunnel.dial(stream_server.port) for _ in range(5)]
    wait_for(lambda: all(c["rx_bytes"] > 0 for c in tunnel.srv.connections()),
             what="data to be flowing into every socket")
    for s in socks:
        s.close()
    stream_server.wait_finished(5)
    wait_for(lambda: not tunnel.srv.connections(), what="the connections to end")


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_socket_dropped_without_reading_is_collected(tunnel, stream_server):
    socks = [tunnel.dial(stream_server.port) for _ in range(5)]
    wait_for(lambda: all(c["rx_bytes"] > 0 for c in tunnel.srv.connections()),
             what="data to be flowing into every socket")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del socks
        gc.collect()
    stream_server.wait_finished(5)
    wait_for(lambda: not tunnel.srv.connections(), what="the connections to end")


# ---------------------------------------------------------------------------
# The session dies


@pytest.fixture
def agent_processes():
    """Factory: agent_processes(url, key, **options) -> AgentProcess; every
    one is killed at the end."""
    started = []

    def start(url, client_key, **options):
        p = support.AgentProcess(url, client_key, **options)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def live_sockets(srv, client_key, address, n):
    """n connections dialed through client_key, each proven by a round trip."""
    socks = [srv.dial(client_key, "tcp", address, timeout=TIMEOUT) for _ in range(n)]
    for s in socks:
        s.settimeout(TIMEOUT)
        round_trip(s)
    return socks


def test_agent_process_sigkilled(rd, tunnel_leak_check, echo_server, agent_processes):
    with rd.Server(listen="127.0.0.1:0") as srv:
        agent = agent_processes(srv.url, "agent-k")
        agent.call("wait_connected")
        socks = live_sockets(srv, "agent-k", echo_server.address, 4)
        agent.signal(signal.SIGKILL)
        assert agent.wait() == -signal.SIGKILL
        for s in socks:
            expect_end(s, "tunnel disconnect")
            s.close()
        session_removed(srv, "agent-k")
        check_balanced(srv, sessions=True)
        echo_server.wait_open(0)
    wait_engine_idle(rd)


def test_ping_timeout_of_a_stopped_agent(rd, tunnel_leak_check, echo_server, agent_processes):
    """The agent stops answering (SIGSTOP): the server's read deadline ends
    the session and its connections; once resumed, the agent ends its side
    of them too and reconnects."""
    with rd.Server(listen="127.0.0.1:0", read_timeout=1) as srv:
        agent = agent_processes(srv.url, "agent-p", ping_interval=0.2, backoff_min=0.1,
                                backoff_max=0.5)
        agent.call("wait_connected")
        socks = live_sockets(srv, "agent-p", echo_server.address, 3)
        agent.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            for s in socks:
                expect_end(s, "tunnel disconnect")
                s.close()
            assert time.monotonic() - started < 10
            session_removed(srv, "agent-p")
            check_balanced(srv, sessions=True)
            assert echo_server.open_count == 3  # the agent, stopped, still holds them
        finally:
            agent.signal(signal.SIGCONT)
        wait_for(lambda: srv.has_session("agent-p"), what="the agent to reconnect")
        echo_server.wait_open(0)
        assert agent.wait_balanced()["add"] == 3
        s = srv.dial("agent-p", "tcp", echo_server.address, timeout=TIMEOUT)
        s.settimeout(TIMEOUT)
        round_trip(s)
        s.close()
        check_balanced(srv)
        agent.wait_balanced()
    wait_engine_idle(rd)


def test_protocol_error_ends_the_servers_session(tunnel):
    ws = raw_session(tunnel.srv)
    try:
        socks = [tunnel.dial("10.9.9.9:80", key="raw-1") for _ in range(3)]
        for _ in socks:
            assert ws.recv_tunnel().type == wsraw.CONNECT
        ws.send_binary(b"\x02\x04")  # truncated header: no type varint
        ws.wait_closed(TIMEOUT)
    finally:
        ws.abort()
    for s in socks:
        expect_end(s, "tunnel disconnect")
        s.close()
    session_removed(tunnel.srv, "raw-1")


def test_protocol_error_ends_the_clients_session(rd, tunnel_leak_check, echo_server):
    with wsraw.WSListener() as listener:
        with rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-r"}, backoff_min=0.1,
                       backoff_max=0.5) as cli:
            ws, _ = listener.accept(timeout=TIMEOUT)
            try:
                for cid in (2, 3):
                    ws.send_msg(cid, wsraw.CONNECT, f"tcp/{echo_server.address}")
                    ws.send_msg(cid, wsraw.DATA, b"hi")
                    assert ws.recv_data(cid, 2) == b"hi"
                echo_server.wait_open(2)
                ws.send_binary(wsraw.encode_message(1, 0, wsraw.SYNC_CONNECTIONS) + b"\x01")
                ws.wait_closed(TIMEOUT)
            finally:
                ws.abort()
            echo_server.wait_open(0)
            check_balanced(cli)
            ws, _ = listener.accept(timeout=TIMEOUT)  # it reconnects by itself
            ws.abort()
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Closing the server or the client with connections open


def test_server_closed_with_connections_open(rd, tunnel_leak_check, echo_server):
    srv = rd.Server(listen="127.0.0.1:0")
    srv.start()
    cli = None
    try:
        cli = support.make_client(rd, srv.url, AGENT_KEY, backoff_min=0.1, backoff_max=0.5)
        socks = [srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
                 for _ in range(4)]
        fwd = srv.forward(AGENT_KEY, "tcp", echo_server.address)
        fwd_conns = [socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT)
                     for _ in range(2)]
        for s in socks + fwd_conns:
            s.settimeout(TIMEOUT)
            round_trip(s)
        srv.close()
        for s in socks:
            expect_end(s, "tunnel disconnect")
            s.close()
        for c in fwd_conns:
            try:
                support.recv_until_eof(c)
            except ConnectionResetError:
                pass
            c.close()
        echo_server.wait_open(0)
        check_balanced(cli)
        assert fwd.closed
    finally:
        if cli is not None:
            cli.close()
        srv.close()
    wait_engine_idle(rd)


def test_client_closed_with_connections_open(tunnel, echo_server):
    agent = tunnel.add_client("agent-c")
    socks = [tunnel.dial(echo_server.port, key="agent-c") for _ in range(4)]
    for s in socks:
        round_trip(s)
    agent.close()
    for s in socks:
        expect_end(s, "tunnel disconnect")
        s.close()
    session_removed(tunnel.srv, "agent-c")
    echo_server.wait_open(0)


# ---------------------------------------------------------------------------
# SYNC_CONNECTIONS


def test_sync_ends_connections_the_client_forgot(tunnel):
    ws = raw_session(tunnel.srv)
    try:
        socks = [tunnel.dial("10.9.9.9:80", key="raw-1") for _ in range(3)]
        ids = [ws.recv_tunnel().conn_id for _ in socks]
        assert ids == sorted(ids) and conn_ids(tunnel.srv) == ids
        ws.send_msg(0, wsraw.SYNC_CONNECTIONS, wsraw.sync_payload([ids[1]]))
        # Absent and below the highest listed id: the client has seen its
        # CONNECT and forgotten it. Absent but newer (ids[2]) may still be in
        # flight toward the client: kept.
        expect_end(socks[0], "connection closed by sync")
        assert conn_ids(tunnel.srv) == ids[1:]
        # Closed without an ERROR: the next message is the next CONNECT.
        later = tunnel.dial("10.9.9.9:81", key="raw-1")
        msg = ws.recv_tunnel()
        assert msg.type == wsraw.CONNECT and msg.address == "10.9.9.9:81", msg
        for s in socks[1:] + [later]:
            s.close()
        closing = [ws.recv_tunnel() for _ in range(3)]
        assert sorted((m.type, m.conn_id, m.text) for m in closing) == sorted(
            (wsraw.ERROR, i, "EOF") for i in (ids[1], ids[2], msg.conn_id))
    finally:
        ws.close()
    session_removed(tunnel.srv, "raw-1")


def test_sync_ends_old_absent_connections(rd, tunnel_leak_check):
    grace = 1.0  # the first SYNC must be handled within it, on a loaded machine too
    with rd.Server(listen="127.0.0.1:0", sync_grace=grace) as srv:
        ws = raw_session(srv)
        try:
            sock = srv.dial("raw-1", "tcp", "10.9.9.9:80", timeout=TIMEOUT)
            sock.settimeout(TIMEOUT)
            cid = ws.recv_tunnel().conn_id
            ws.send_msg(0, wsraw.SYNC_CONNECTIONS, b"")  # young: kept
            support.ping_barrier(ws)  # the server has handled it
            assert conn_ids(srv) == [cid]
            wait_for(lambda: srv.connections()[0]["age"] >= grace + 0.05,
                     what="the grace to pass")
            assert conn_ids(srv) == [cid]
            ws.send_msg(0, wsraw.SYNC_CONNECTIONS, b"")
            expect_end(sock, "connection closed by sync")
            sock.close()
            check_balanced(srv)
        finally:
            ws.close()
        session_removed(srv, "raw-1")
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# The hard buffer cap


def test_hard_cap_ends_a_connection_nobody_reads(rd, tunnel_leak_check):
    with rd.Server(listen="127.0.0.1:0", max_buffer=64 << 10, hard_cap=1 << 20) as srv:
        ws = raw_session(srv)
        try:
            sock = srv.dial("raw-1", "tcp", "10.9.9.9:80", timeout=TIMEOUT)
            cid = ws.recv_tunnel().conn_id
            chunk = b"f" * (64 << 10)
            seen = []
            # Flood, ignoring PAUSE, until the server gives up on it. The
            # Python socket's own buffer takes a few hundred KiB first.
            for _ in range(200):
                ws.send_msg(cid, wsraw.DATA, chunk)
                try:
                    while True:
                        seen.append(ws.recv_tunnel(timeout=0.001))
                except TimeoutError:
                    pass
                if any(m.type == wsraw.ERROR for m in seen):
                    break
            types = [(m.type, m.conn_id, m.text) for m in seen]
            assert (wsraw.PAUSE, cid, "") in types, types
            assert types[-1] == (wsraw.ERROR, cid, "buffer limit exceeded"), types
            assert types.index((wsraw.PAUSE, cid, "")) < len(types) - 1
            expect_end(sock, "buffer limit exceeded")
            sock.close()
            assert rd.engine_stats()["buffered_bytes"] == 0
            # The session survives, and the DATA that follows is answered.
            ws.send_msg(cid, wsraw.DATA, b"late")
            answer = ws.recv_tunnel()
            assert answer.type == wsraw.ERROR and answer.text.startswith("connection not found")
            check_balanced(srv)
        finally:
            ws.close()
        session_removed(srv, "raw-1")
    wait_engine_idle(rd)


def test_a_stalled_reader_does_not_pin_read_blocks(rd, tunnel_leak_check):
    """Tiny DATA for a connection nobody reads, each arriving beside a big
    DATA for one that is read: the tiny slices wait in the engine as copies,
    not as references that would each pin a 1 MiB session read block."""
    with rd.Server(listen="127.0.0.1:0") as srv:
        ws = raw_session(srv)
        try:
            stalled = srv.dial("raw-1", "tcp", "10.9.9.9:80", timeout=TIMEOUT)
            a = ws.recv_tunnel().conn_id
            busy = srv.dial("raw-1", "tcp", "10.9.9.8:80", timeout=TIMEOUT)
            busy.settimeout(TIMEOUT)
            b = ws.recv_tunnel().conn_id

            def stalled_buffered():
                return [c["buffered"] for c in srv.connections() if c["id"] == a][0]

            # Fill the stalled socket's kernel buffer so what follows queues
            # in the engine.
            while stalled_buffered() == 0:
                ws.send_msg(a, wsraw.DATA, b"f" * (64 << 10))
                wait_for(lambda: rd.engine_stats()["buffered_to_local"] == stalled_buffered(),
                         what="the chunk to be written or queued")
            rd.engine_trim()
            stats = rd.engine_stats()
            heap0 = stats["heap_bytes"] - stats["pool_bytes"]
            big = b"b" * (512 << 10)
            rounds = 64
            for _ in range(rounds):
                ws.send_msg(a, wsraw.DATA, b"t")
                ws.send_msg(b, wsraw.DATA, big)
                assert recv_exact(busy, len(big)) == big
            queued = stalled_buffered()
            wait_for(lambda: rd.engine_stats()["buffered_to_local"] == queued,
                     what="the busy connection's bytes to leave the engine")
            rd.engine_trim()
            stats = rd.engine_stats()
            growth = stats["heap_bytes"] - stats["pool_bytes"] - heap0
            # 64 one-byte slices as copies: a few dozen KiB. As references
            # they would pin tens of MiB of read blocks.
            assert growth < 1 << 20, (growth, queued)
            stalled.close()
            busy.close()
            wait_for(lambda: srv.connections() == [], what="both connections to end")
            check_balanced(srv)
        finally:
            ws.close()
        session_removed(srv, "raw-1")
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Interpreter exit


def test_interpreter_exit_with_everything_open(rd, tunnel_leak_check, echo_server,
                                               agent_processes):
    """A process with an agent (serving our dials), a server and a client of
    its own, open dialed sockets and a forward exits without closing any of
    it: status 0, promptly, and our side sees every connection end."""
    with rd.Server(listen="127.0.0.1:0") as srv:
        agent = agent_processes(srv.url, "agent-x")
        agent.call("wait_connected")
        socks = live_sockets(srv, "agent-x", echo_server.address, 3)
        assert agent.call("own", echo_server.address, 3)["open"] == 3 * 2 + 3
        echo_server.wait_open(6)
        started = time.monotonic()
        assert agent.call("exit") == {"exiting": True}
        assert agent.wait(TIMEOUT) == 0
        assert time.monotonic() - started < 10
        for s in socks:
            expect_end(s, "tunnel disconnect")
            s.close()
        session_removed(srv, "agent-x")
        check_balanced(srv, sessions=True)
        echo_server.wait_open(0)
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Churn


class _LightServer:
    """A single-threaded selector server on 127.0.0.1:0 that keeps no record
    per connection (so the test process's memory stays flat): it echoes, or,
    with reset=True, answers the first byte with a reset."""

    def __init__(self, reset=False):
        self.reset = reset
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.open = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _drop(self, conn, reset=False):
        self._sel.unregister(conn)
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        conn.close()
        self.open -= 1

    def _loop(self):
        while not self._stop:
            for k, _ in self._sel.select():
                if k.data == "wake":
                    continue
                if k.data is None:
                    try:
                        while True:
                            conn, _ = self.sock.accept()
                            conn.setblocking(False)
                            self._sel.register(conn, selectors.EVENT_READ, "conn")
                            self.open += 1
                    except BlockingIOError:
                        pass
                    continue
                conn = k.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    self._drop(conn)
                    continue
                if not data:
                    self._drop(conn)
                elif self.reset:
                    self._drop(conn, reset=True)
                else:
                    try:
                        conn.sendall(data)  # small: fits the socket buffer
                    except OSError:
                        self._drop(conn)
        for k in list(self._sel.get_map().values()):
            if k.data == "conn":
                k.fileobj.close()

    def close(self):
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(TIMEOUT)
        self._sel.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()


CHURN = int(os.environ.get("RD_CHURN", 100_000))
CHURN_THREADS = 8
# After trimming the pools, the engine heap holds only live objects: the
# sessions, the label sets (three, all created during warm-up) and tables
# already grown to this concurrency. 32 KiB allows a few table doublings,
# while any allocation leaked once per connection (16 bytes at least) over
# 100,000 connections exceeds it fifty times over.
HEAP_MARGIN = 32 << 10
# RSS also moves with Python's allocator and thread stacks; after warm-up it
# must not drift by more than 4 MiB: over 100,000 connections, a leak of 42
# bytes per connection anywhere in the process (descriptors, libuv, the C
# library) would.
RSS_MARGIN = 4 << 20


def test_churn(tunnel):
    """CHURN tunneled connections opened and closed (clean close, reset by
    the target, refused dial, in turn) from CHURN_THREADS threads; then the
    engine heap is back to its post-warm-up baseline and RSS flat."""
    echo, resetter = _LightServer(), _LightServer(reset=True)
    refused = support.closed_port()
    srv = tunnel.srv
    try:
        def one(i):
            kind = i % 3
            if kind == 2:
                s = srv.dial(AGENT_KEY, "tcp", f"127.0.0.1:{refused}", timeout=TIMEOUT)
                s.settimeout(TIMEOUT)
                assert s.recv(1) == b""
                assert "connection refused" in (s.tunnel_error or ""), s.tunnel_error
            elif kind == 1:
                s = srv.dial(AGENT_KEY, "tcp", resetter.address, timeout=TIMEOUT)
                s.settimeout(TIMEOUT)
                s.sendall(b"r")
                assert s.recv(1) == b""
                assert s.tunnel_error, "a reset must end with an error"
            else:
                s = srv.dial(AGENT_KEY, "tcp", echo.address, timeout=TIMEOUT)
                s.settimeout(TIMEOUT)
                s.sendall(b"e")
                assert s.recv(1) == b"e"
            s.close()

        failures = []

        def run(n):
            counter = iter(range(n))
            lock = threading.Lock()

            def worker():
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    try:
                        one(i)
                    except Exception as e:  # noqa: BLE001 - collected, asserted below
                        failures.append(f"{i}: {type(e).__name__}: {e}")
                        return

            threads = [threading.Thread(target=worker) for _ in range(CHURN_THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not failures, failures[:5]
            wait_for(lambda: tunnel.rd.engine_stats()["open_connections"] == 0,
                     what="every churned connection to end")
            wait_for(lambda: echo.open == 0 and resetter.open == 0,
                     what="the targets to see every connection end")

        def figures():
            tunnel.rd.engine_trim()
            stats = tunnel.rd.engine_stats()
            return stats["heap_bytes"] - stats["pool_bytes"], stats["heap_objects"], \
                support.rss_bytes()

        warmup = max(3000, CHURN // 10)
        run(warmup)
        heap0, objects0, rss0 = figures()
        started = time.monotonic()
        run(CHURN)
        elapsed = time.monotonic() - started
        heap1, objects1, rss1 = figures()
        report = (f"{CHURN} connections in {elapsed:.1f} s; heap {heap0} -> {heap1} bytes, "
                  f"objects {objects0} -> {objects1}, RSS {rss0 >> 10} -> {rss1 >> 10} KiB")
        print(report)
        assert heap1 - heap0 <= HEAP_MARGIN, report
        assert rss1 - rss0 <= RSS_MARGIN, report
        total = warmup + CHURN
        for side, client_key in ((srv, AGENT_KEY), (tunnel.cli, "client")):
            m = support.wait_balanced(side)
            assert sum(m[ADD_CONN].values()) == total
            for address in (echo.address, resetter.address, f"127.0.0.1:{refused}"):
                label = key(addr=address, clientkey=client_key, proto="tcp")
                assert m[ADD_CONN][label] == m[REMOVE_CONN][label]
    finally:
        echo.close()
        resetter.close()


# ---------------------------------------------------------------------------
# The instruments themselves: the pytest plugin's report and the soak


def test_leak_check_lists_what_stayed_open(rd, tunnel_leak_check, echo_server):
    from remotedialer_py.pytest_plugin import LeakCheck

    with rd.Server(listen="127.0.0.1:0") as srv, \
            support.make_client(rd, srv.url, AGENT_KEY) as cli:
        check = LeakCheck()
        sock = srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
        sock.settimeout(TIMEOUT)
        round_trip(sock)
        report = "\n".join(check.problems(settle=0.05, heap_margin=0))
        assert "engine figures over baseline" in report and "open_connections" in report
        assert re.search(rf"open connection on <Server .*address={re.escape(echo_server.address)}"
                         rf" .*id={sock.conn_id} .*state=open", report), report
        assert "file descriptors over baseline" in report
        assert re.search(r"fd \d+ -> socket:\[\d+\] tcp 127\.0\.0\.1:\d+ -> "
                         rf"{re.escape(echo_server.address)} ESTABLISHED", report), report
        assert re.search(r"engine heap \+[\d,]+ bytes over its baseline", report), report
        sock.close()
        wait_for(lambda: not srv.connections(), what="the connection to end")
        check_balanced(srv)
        check_balanced(cli)
    echo_server.wait_open(0)
    # Everything closed (the socket object holds its dial status until it
    # goes): the heap in use is back to the byte.
    del sock
    assert tunnel_leak_check.heap_growth() == 0
    tunnel_leak_check.heap_margin = 0


def test_leak_check_reports_unbalanced_counters():
    from remotedialer_py.pytest_plugin import assert_balanced

    add, remove = "session_server_total_add_connections", "session_server_total_remove_connections"
    label = (("addr", "127.0.0.1:80"), ("clientkey", "a"), ("proto", "tcp"))
    assert_balanced({add: {label: 3}, remove: {label: 3}})
    with pytest.raises(AssertionError, match=r'addr="127\.0\.0\.1:80".*added 3, removed 2'):
        assert_balanced({add: {label: 3}, remove: {label: 2}})


def _soak_run(capsys, **kwargs):
    from remotedialer_py import soak

    status = soak.run(**kwargs)
    return status, capsys.readouterr().out


def test_soak_in_one_process(rd, tunnel_leak_check, tmp_path, capsys):
    path = tmp_path / "soak.csv"
    status, out = _soak_run(capsys, n=400, concurrency=4, warmup=100, interval=0.2,
                            csv_path=str(path))
    assert status == 0, out
    assert "OK: counters balance on both sides" in out
    rows = path.read_text().splitlines()
    header = rows[0].split(",")
    assert header[:9] == ["time_s", "phase", "requests", "errors", "server_add", "server_remove",
                          "agent_add", "agent_remove", "open_connections"]
    assert {"heap_bytes_process", "rss_bytes_process", "open_fds_process"} <= set(header)
    last = dict(zip(header, rows[-1].split(",")))
    assert last["phase"] == "final" and last["requests"] == "400"
    assert last["server_add"] == last["server_remove"] == last["agent_add"] == \
        last["agent_remove"] == "500"
    assert last["open_connections"] == "0"


def test_soak_keep_alive_pool_stays_bounded_and_drains(rd, tunnel_leak_check, tmp_path, capsys):
    # A kept-alive service: the route's tunneled connections are pooled and
    # reused, never more than the bound are idle, and after the last request
    # the pool empties within its idle timeout (the verdict checks both).
    path = tmp_path / "soak.csv"
    n, warmup = 600, 100
    status, out = _soak_run(capsys, n=n, concurrency=8, warmup=warmup, interval=0.2,
                            csv_path=str(path), keep_alive=True, pool_per_target=3,
                            pool_idle_timeout=1.0)
    assert status == 0, out
    m = re.search(r"route pool: peak (\d+) idle connections \(bound 3\), "
                  r"0 ([0-9.]+) s after the last request", out)
    assert m and 1 <= int(m.group(1)) <= 3, out
    # Not before the idle timeout (the last backend went idle a moment
    # before its response reached the client).
    assert float(m.group(2)) >= 0.9, out
    rows = list(csv.DictReader(path.read_text().splitlines()))
    assert max(int(r["pooled_connections"]) for r in rows) == int(m.group(1))
    # Some drain row still shows the pool holding connections, the last shows none.
    assert any(r["phase"] == "drain" and int(r["pooled_connections"]) > 0 for r in rows), out
    last = rows[-1]
    assert last["phase"] == "final" and last["open_connections"] == "0"
    assert last["pooled_connections"] == "0"
    # Reuse: half the requests dial a connection each; the route's half
    # shares a few pooled ones, so far fewer connections than requests.
    assert int(last["server_add"]) == int(last["server_remove"])
    assert int(last["server_add"]) < (n + warmup) * 3 // 4, out


def test_soak_in_separate_processes(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "soak.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "remotedialer_py", "soak", "-n", "400", "-c", "4", "--warmup",
         "100", "--processes", "--keep-alive", "--pool-idle-timeout", "1", "--csv", str(path)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (os.path.dirname(os.path.dirname(support.__file__)),
                        os.environ.get("PYTHONPATH")) if p)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(per process: server/agent)" in proc.stdout
    assert re.search(r"route pool: peak [1-9]\d* idle connections \(bound 16\)", proc.stdout)
    header = path.read_text().splitlines()[0].split(",")
    assert {"heap_bytes_server", "heap_bytes_agent", "rss_bytes_agent"} <= set(header)


def test_soak_verdict_fails_past_a_margin(rd, tunnel_leak_check, capsys):
    # A margin below zero cannot be met: the verdict must say so and fail.
    status, out = _soak_run(capsys, n=100, concurrency=2, warmup=50, interval=0.2,
                            heap_margin=-1)
    assert status == 1, out
    assert "FAIL:" in out and re.search(r"engine heap -?[\d,]+ bytes over its baseline \(margin -1\)", out)


def test_soak_plot_needs_matplotlib(rd, tunnel_leak_check, capsys, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    status, out = _soak_run(capsys, n=10, plot_path=str(tmp_path / "x.png"))
    assert status == 2
    assert "--plot needs matplotlib: pip install 'remotedialer-py[plot]'" in out
    assert not (tmp_path / "x.png").exists()
