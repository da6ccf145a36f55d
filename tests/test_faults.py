"""Faults: a killed agent process, a restarted server, refused and failing
authorizers, garbage on the server port, a raw peer that breaks the
WebSocket or tunnel protocol, and a refused CONNECT. Each ends with balanced
counters and nothing open."""

import http.client
import json
import re
import socket
import threading
from pathlib import Path

import pytest

import support
import wsraw
from support import (ADD_SESSION, AGENT_KEY, REMOVE_SESSION, TIMEOUT, check_balanced, key,
                     make_client, recv_exact, round_trip, wait_engine_idle, wait_for)

VECTORS = json.loads((Path(__file__).resolve().parent / "vectors.json").read_text())



def still_serving(tunnel, echo_server, n=3):
    """The agent-1 session carries fresh connections."""
    for i in range(n):
        s = tunnel.dial(echo_server.port)
        try:
            round_trip(s, f"still serving {i}".encode())
        finally:
            s.close()


def raw_session(srv, client_key="raw-1"):
    """A raw WebSocket peer registered as client_key."""
    ws = wsraw.WSConn.connect("127.0.0.1", srv.port, headers={"X-Tunnel-ID": client_key})
    wait_for(lambda: srv.has_session(client_key), what=f"a session for {client_key}")
    return ws


def session_gone(srv, client_key):
    wait_for(lambda: not srv.has_session(client_key), what=f"the {client_key} session to end")
    m = srv.metrics()
    label = key(clientkey=client_key, peer="false")
    assert m[ADD_SESSION][label] == m[REMOVE_SESSION][label] == 1


def upgrade(port, headers=None, path="/connect"):
    """An upgrade request through http.client; returns (status, body) of a
    refused upgrade."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": wsraw.make_key(), **(headers or {})})
        resp = conn.getresponse()
        assert resp.status != 101, "upgrade unexpectedly accepted"
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Processes and restarts


def test_client_process_sigkill_mid_transfer(rd, tunnel_leak_check, run_cli, stream_server,
                                             echo_server):
    srv = rd.Server(listen="127.0.0.1:0")
    srv.start()
    try:
        agent = run_cli("client", "--connect", srv.url, "--id", "agent-k", ready=None)
        wait_for(lambda: srv.has_session("agent-k"), 60, "the agent process's session")
        down = srv.dial("agent-k", "tcp", stream_server.address, timeout=TIMEOUT)
        down.settimeout(TIMEOUT)
        up = srv.dial("agent-k", "tcp", echo_server.address, timeout=TIMEOUT)
        up.settimeout(TIMEOUT)
        got = 0
        while got < 4 << 20:  # well into the download
            chunk = down.recv(1 << 20)
            assert chunk, f"download ended early: {down.tunnel_error!r}"
            got += len(chunk)
        block = b"u" * (256 << 10)
        up.sendall(block)
        assert recv_exact(up, len(block)) == block
        writer_done = threading.Event()

        def flood():
            try:
                while True:
                    up.sendall(block)
            except OSError:
                pass  # the engine closed its end: expected
            finally:
                writer_done.set()

        threading.Thread(target=flood, daemon=True).start()
        assert agent.kill() == -9

        # In-flight bytes may still arrive; then EOF, not an error.
        support.recv_until_eof(down, timeout=TIMEOUT)
        assert down.tunnel_error == "tunnel disconnect"
        try:
            support.recv_until_eof(up, timeout=TIMEOUT)
        except ConnectionResetError:
            pass  # we were writing into it: a reset is a fine way to end
        assert writer_done.wait(TIMEOUT), "writer still blocked on a dead connection"
        assert up.tunnel_error == "tunnel disconnect"
        down.close()
        up.close()
        session_gone(srv, "agent-k")
        check_balanced(srv, sessions=True)
        stream_server.wait_open(0)
        echo_server.wait_open(0)
    finally:
        srv.close()
    wait_engine_idle(rd)


def _start_server_on(rd, port):
    """A Server on a port that was just released; retries only "address in
    use" until the deadline."""
    def attempt():
        s = rd.Server(listen=f"127.0.0.1:{port}")
        try:
            s.start()
            return s
        except rd.TunnelError as e:
            s.close()
            assert "address already in use" in str(e), e
            return None

    return wait_for(attempt, TIMEOUT, f"port {port} to be free again")


def test_server_restart_client_reconnects(rd, tunnel_leak_check, echo_server):
    srv1 = rd.Server(listen="127.0.0.1:0")
    srv1.start()
    srv2 = None
    cli = None
    try:
        port = srv1.port
        cli = make_client(rd, srv1.url, AGENT_KEY)
        s = srv1.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
        s.settimeout(TIMEOUT)
        round_trip(s)
        srv1.close()
        assert s.recv(1) == b""
        s.close()
        echo_server.wait_open(0)
        srv2 = _start_server_on(rd, port)
        # Backoff near the Go library's 5 s, with jitter: allow a few rounds.
        wait_for(lambda: srv2.has_session(AGENT_KEY), 60, "the client to reconnect by itself")
        cli.wait_connected(timeout=TIMEOUT)
        s = srv2.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
        s.settimeout(TIMEOUT)
        round_trip(s)
        s.close()
        check_balanced(srv2)
        check_balanced(cli)
        assert cli.metrics()[support.ADD_CONN][
            key(addr=echo_server.address, clientkey="client", proto="tcp")] == 2
    finally:
        if cli is not None:
            cli.close()
        srv1.close()
        if srv2 is not None:
            srv2.close()
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Authorization


def test_authorizer_rejects_with_401(rd, tunnel_leak_check):
    calls = []

    def deny(request):
        calls.append(request)
        return "", False

    with rd.Server(listen="127.0.0.1:0", authorizer=deny) as srv:
        status, body = upgrade(srv.port, {"X-Tunnel-ID": "agent-1"})
        assert (status, body) == (401, b"failed authentication")
        assert len(calls) == 1
        assert srv.list_clients() == []
        assert not support.family(srv.metrics(), ADD_SESSION)
        # A real client keeps being refused and never gets a session.
        with rd.Client(srv.url, headers={"X-Tunnel-ID": "agent-1"}) as cli:
            with pytest.raises(TimeoutError):
                cli.wait_connected(timeout=1)
        assert srv.list_clients() == []
    wait_engine_idle(rd)


def test_default_authorizer_requires_tunnel_id(rd, tunnel_leak_check):
    with rd.Server(listen="127.0.0.1:0") as srv:
        assert upgrade(srv.port) == (401, b"failed authentication")
        assert upgrade(srv.port, {"X-Tunnel-ID": ""}) == (401, b"failed authentication")
        assert srv.list_clients() == []
    wait_engine_idle(rd)


def test_authorizer_error_answers_400(rd, tunnel_leak_check):
    def broken(request):
        raise ValueError("token expired at 12:00")

    with rd.Server(listen="127.0.0.1:0", authorizer=broken) as srv:
        assert upgrade(srv.port, {"X-Tunnel-ID": "a"}) == (400, b"token expired at 12:00")
        assert srv.list_clients() == []
    wait_engine_idle(rd)


def test_authorizer_picks_the_client_key(rd, tunnel_leak_check, echo_server):
    seen = []

    def by_token(request):
        seen.append((request.method, request.path, request.headers.get("X-Token"),
                     request.remote_addr))
        token = request.headers.get("X-Token")
        return (f"tenant-{token}", True) if token else ("", False)

    with rd.Server(listen="127.0.0.1:0", authorizer=by_token) as srv:
        cli = rd.Client(srv.url, headers={"X-Token": "42"})
        try:
            cli.start()
            cli.wait_connected(timeout=TIMEOUT)
            wait_for(lambda: srv.list_clients() == ["tenant-42"], what="the authorizer's key")
            method, path, token, remote = seen[0]
            assert (method, path, token) == ("GET", "/connect", "42")
            assert remote.startswith("127.0.0.1:")
            s = srv.dial("tenant-42", "tcp", echo_server.address, timeout=TIMEOUT)
            s.settimeout(TIMEOUT)
            round_trip(s)
            s.close()
            check_balanced(srv)
            check_balanced(cli)
        finally:
            cli.close()
        assert upgrade(srv.port, {"X-Tunnel-ID": "x"}) == (401, b"failed authentication")
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Garbage on the server port


def test_garbage_and_half_sent_handshake(tunnel, echo_server):
    port = tunnel.srv.port
    held = []
    try:
        half = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        held.append(half)
        half.sendall(b"GET /connect HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConn")
        request, _ = wsraw.upgrade_request("127.0.0.1", headers={"X-Tunnel-ID": "half"})
        cut = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        held.append(cut)
        cut.sendall(request[:len(request) - 3])
        for _ in range(10):
            g = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            held.append(g)
            g.sendall(bytes(range(256)) * 16)
        # A session stuck in the middle of a frame.
        mid = raw_session(tunnel.srv, "mid-frame")
        mid.send_raw(wsraw.encode_frame(wsraw.OP_BINARY, b"0123456789" * 10)[:7])

        still_serving(tunnel, echo_server, n=5)
        tunnel.add_client("agent-2")
        s = tunnel.dial(echo_server.port, key="agent-2")
        round_trip(s)
        s.close()
        assert "half" not in tunnel.srv.list_clients()
        mid.abort()
        session_gone(tunnel.srv, "mid-frame")
    finally:
        for s in held:
            s.close()
    still_serving(tunnel, echo_server)


@pytest.mark.parametrize("request_bytes,status", [
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /connect HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET /connect HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET /connect HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
     431),
], ids=["not_http", "bad_version", "bad_header_name", "too_many_headers"])
def test_bad_request_heads_answered(tunnel, echo_server, request_bytes, status):
    resp = wsraw.http_exchange("127.0.0.1", tunnel.srv.port, request_bytes)
    assert resp.status == status, resp.raw[:300]
    still_serving(tunnel, echo_server, n=1)


def test_oversize_head(tunnel, echo_server):
    head = (b"GET /connect HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * ((1 << 20) + (64 << 10))
            + b"\r\n\r\n")
    # The server stops reading at its head limit; its 431 must still reach
    # us (a close with unread input must not turn into a reset first).
    resp = wsraw.http_exchange("127.0.0.1", tunnel.srv.port, head)
    assert resp.status == 431, (resp.reset, resp.raw[:300])
    still_serving(tunnel, echo_server, n=1)


def test_plain_get_on_connect_path(tunnel):
    resp = wsraw.http_exchange(
        "127.0.0.1", tunnel.srv.port,
        b"GET /connect HTTP/1.1\r\nHost: x\r\nX-Tunnel-ID: plain\r\nConnection: close\r\n\r\n")
    assert resp.status in (400, 426), resp.raw[:300]
    assert "plain" not in tunnel.srv.list_clients()


# ---------------------------------------------------------------------------
# A raw peer that breaks the WebSocket or tunnel protocol


def test_text_message_ends_that_session_only(tunnel, echo_server):
    ws = raw_session(tunnel.srv)
    try:
        ws.send_text("hello")
        ws.wait_closed(TIMEOUT)
    finally:
        ws.abort()
    session_gone(tunnel.srv, "raw-1")
    still_serving(tunnel, echo_server)


_VALID = wsraw.encode_message(1, 0, wsraw.SYNC_CONNECTIONS)
BAD_FRAMES = {
    "unmasked_client_frame": wsraw.encode_frame(wsraw.OP_BINARY, _VALID, mask=False),
    "reserved_data_opcode": wsraw.encode_frame(0x3, _VALID),
    "reserved_control_opcode": wsraw.encode_frame(0xB, b""),
    "rsv_bits": wsraw.encode_frame(wsraw.OP_BINARY, _VALID, rsv=4),
    "length_over_limit": wsraw.encode_frame(wsraw.OP_BINARY, b"", length=1 << 40),
    "length_top_bit": wsraw.encode_frame(wsraw.OP_BINARY, b"", length=1 << 63),
    "control_over_125": wsraw.encode_frame(wsraw.OP_PING, b"p" * 126),
    "fragmented_control": wsraw.encode_frame(wsraw.OP_PING, b"p", fin=False),
    "continuation_without_start": wsraw.encode_frame(wsraw.OP_CONT, _VALID),
    "data_inside_fragmented": (wsraw.encode_frame(wsraw.OP_BINARY, _VALID[:1], fin=False)
                               + wsraw.encode_frame(wsraw.OP_BINARY, _VALID[1:])),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_frame_ends_that_session_only(tunnel, echo_server, name):
    ws = raw_session(tunnel.srv)
    try:
        ws.send_raw(BAD_FRAMES[name])
        ws.wait_closed(TIMEOUT)
    finally:
        ws.abort()
    session_gone(tunnel.srv, "raw-1")
    still_serving(tunnel, echo_server)


def test_oversize_fragmented_message_ends_that_session_only(tunnel, echo_server):
    # Default limit: 16 MiB per message, the sum of its fragments.
    ws = raw_session(tunnel.srv)
    piece = b"\0" * (1 << 20)
    try:
        try:
            ws.send_frame(wsraw.OP_BINARY, _VALID, fin=False)
            for _ in range(17):
                ws.send_frame(wsraw.OP_CONT, piece, fin=False)
        except OSError:
            pass  # the server may cut us off before the last fragment
        ws.wait_closed(TIMEOUT)
    finally:
        ws.abort()
    session_gone(tunnel.srv, "raw-1")
    still_serving(tunnel, echo_server)


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_malformed_tunnel_message_ends_that_session_only(tunnel, echo_server, vec):
    ws = raw_session(tunnel.srv)
    try:
        ws.send_binary(bytes.fromhex(vec["message_hex"]))
        ws.wait_closed(TIMEOUT)
    finally:
        ws.abort()
    session_gone(tunnel.srv, "raw-1")
    still_serving(tunnel, echo_server)


def test_fragments_with_control_frames_between(tunnel):
    """One DATA message in five fragments with a Ping and a Pong between
    them arrives whole; the Ping is answered; the session lives on."""
    ws = raw_session(tunnel.srv)
    try:
        sock = tunnel.srv.dial("raw-1", "tcp", "10.0.0.1:80", timeout=TIMEOUT)
        sock.settimeout(TIMEOUT)
        connect = ws.recv_tunnel()
        assert connect.type == wsraw.CONNECT
        assert (connect.proto, connect.address, connect.deadline) == ("tcp", "10.0.0.1:80", 15000)
        payload = bytes(range(256)) * 40
        msg = wsraw.encode_message(ws.next_id(), connect.conn_id, wsraw.DATA, payload)
        ws.send_fragmented(msg, [3, 1000, 1, 4000],
                           between=[(wsraw.OP_PING, b"between"), (wsraw.OP_PONG, b"unsolicited")])
        assert recv_exact(sock, len(payload)) == payload
        # And the other way: bytes from the socket arrive as DATA. The server
        # answered each Ping before the message completed, so by the time
        # this DATA arrives every Pong has been read (and recorded) before it.
        sock.sendall(b"upstream")
        assert ws.recv_data(connect.conn_id, 8) == b"upstream"
        assert ws.pongs == [b"between"] * 4
        # A clean close from the agent's side: EOF, no error text.
        ws.send_msg(connect.conn_id, wsraw.ERROR, "EOF")
        assert sock.recv(1) == b""
        assert sock.tunnel_error is None
        sock.close()
    finally:
        ws.close()
    session_gone(tunnel.srv, "raw-1")


def test_data_for_unknown_connection_is_answered(tunnel):
    ws = raw_session(tunnel.srv)
    try:
        # ERROR for an unknown id is ignored (the close echo must be harmless);
        # DATA for an unknown id is answered. Messages are handled in order,
        # so the first answer must be the one about 12345.
        ws.send_msg(999, wsraw.ERROR, "EOF")
        ws.send_msg(12345, wsraw.DATA, b"who?")
        answer = ws.recv_tunnel()
        assert answer.type == wsraw.ERROR and answer.conn_id == 12345, answer
        assert re.fullmatch(r"connection not found raw-1/-?\d+/12345", answer.text), answer.text
        # The session lives on: a dial through it still arrives.
        sock = tunnel.srv.dial("raw-1", "tcp", "127.0.0.1:9", timeout=TIMEOUT)
        connect = ws.recv_tunnel()
        assert connect.type == wsraw.CONNECT and connect.address == "127.0.0.1:9"
        ws.send_msg(connect.conn_id, wsraw.ERROR, "nothing here")
        sock.settimeout(TIMEOUT)
        assert sock.recv(1) == b""
        assert sock.tunnel_error == "nothing here"
        sock.close()
    finally:
        ws.close()
    session_gone(tunnel.srv, "raw-1")


# ---------------------------------------------------------------------------
# The agent's connect authorizer


def test_connect_refused_by_allow_list(tunnel, echo_server, http_service):
    agent = tunnel.add_client("agent-allow", allow=["tcp/127.0.0.1:*"])
    for address, proto in ((f"127.0.0.2:{http_service.port}", "tcp"),
                           ("/tmp/remotedialer-test.sock", "unix")):
        sock = tunnel.srv.dial("agent-allow", proto, address, timeout=TIMEOUT)
        sock.settimeout(TIMEOUT)
        assert sock.recv(1) == b""
        assert sock.tunnel_error == "connect not allowed"
        sock.close()
    # Only that connection was refused; the session lives on.
    ok = tunnel.dial(echo_server.port, key="agent-allow")
    round_trip(ok)
    ok.close()
    m = tunnel.srv.metrics()
    assert m[ADD_SESSION][key(clientkey="agent-allow", peer="false")] == 1
    assert key(clientkey="agent-allow", peer="false") not in support.family(m, REMOVE_SESSION)
    c = support.wait_balanced(agent)
    refused = key(addr=f"127.0.0.2:{http_service.port}", clientkey="client", proto="tcp")
    assert c[support.ADD_CONN][refused] == c[support.REMOVE_CONN][refused] == 1


def test_connect_refused_by_callable(tunnel, echo_server, http_service):
    asked = []

    def only_echo(proto, address):
        asked.append((proto, address))
        return proto == "tcp" and address == echo_server.address

    tunnel.add_client("agent-fn", allow=only_echo)
    sock = tunnel.dial(http_service.port, key="agent-fn")
    assert sock.recv(1) == b""
    assert sock.tunnel_error == "connect not allowed"
    sock.close()
    ok = tunnel.dial(echo_server.port, key="agent-fn")
    round_trip(ok)
    ok.close()
    assert asked == [("tcp", http_service.address), ("tcp", echo_server.address)]
    assert tunnel.srv.has_session("agent-fn")


# ---------------------------------------------------------------------------
# Our Client against a raw server


@pytest.mark.parametrize("then", ["text", "close"])
def test_client_session_ended_by_bytes_that_came_with_the_upgrade(rd, tunnel_leak_check, then):
    """The 101 and a message that ends the session arrive in one segment: the
    session ends while it is being made. The client must not keep it (a
    dangling pointer that its close would use), and retries as usual."""
    frame = (wsraw.encode_frame(wsraw.OP_TEXT, b"not a tunnel message", mask=False)
             if then == "text" else
             wsraw.encode_frame(wsraw.OP_CLOSE, wsraw.close_payload(1001, "bye"), mask=False))
    with wsraw.WSListener() as listener:
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-u"}, backoff_min=30,
                        backoff_max=30)
        try:
            cli.start()
            ws, _ = listener.accept(timeout=TIMEOUT, then=frame)
            wait_for(lambda: cli.last_error, what="the client to give up on that session")
            assert not cli.connected
            assert rd.engine_stats()["open_sessions"] == 0
            ws.abort()
        finally:
            cli.close()  # with the session gone, while the retry waits
    wait_engine_idle(rd)


def test_client_drops_session_on_text_message_and_reconnects(rd, tunnel_leak_check, echo_server):
    with wsraw.WSListener() as listener:
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-r"})
        try:
            cli.start()
            ws, req = listener.accept(timeout=TIMEOUT)
            assert req.path == "/connect" and req.headers["x-tunnel-id"] == "agent-r"
            ws.send_text("not a tunnel message")
            ws.wait_closed(TIMEOUT)
            ws.abort()
            # It reconnects by itself (backoff starts near 0.5 s).
            ws, req = listener.accept(timeout=TIMEOUT)
            try:
                cid = 2
                ws.send_msg(cid, wsraw.CONNECT, f"tcp/{echo_server.address}")
                ws.send_msg(cid, wsraw.DATA, b"hello agent")  # may arrive before the dial ends
                assert ws.recv_data(cid, 11) == b"hello agent"
                assert not ws.unmasked_seen, "client frames must be masked"
                ws.send_msg(cid, wsraw.ERROR, "EOF")
                echo_server.wait_open(0)
                check_balanced(cli)
                # Refused locally: DATA for an id the client does not know.
                ws.send_msg(77, wsraw.DATA, b"?")
                answer = ws.recv_tunnel()
                while answer.type == wsraw.ERROR and answer.conn_id == cid:
                    answer = ws.recv_tunnel()  # the echo of our close, if it sends one
                assert answer.type == wsraw.ERROR and answer.conn_id == 77, answer
                assert answer.text.startswith("connection not found "), answer.text
            finally:
                cli.close()
                ws.wait_closed(TIMEOUT)
                ws.abort()
        finally:
            cli.close()
    wait_engine_idle(rd)
