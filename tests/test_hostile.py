"""A server (and an agent) under hostile input: every limit, exceeded.

Each test runs a well-behaved agent ("bystander") next to the offender and
keeps traffic flowing through it from a background thread for the whole
test: the offender must get the documented answer (HTTP status, WebSocket
close code or ERROR message) and the bystander must not notice. Afterwards
the counters balance and nothing stays open.

Limits: request-head bytes and header count (431), handshake time and idle
time before the upgrade (408 or close), message size (close 1009), total
sessions (503), sessions per client key (429), connections per session
(TunnelError on the server, ERROR on the agent), local dials in flight on
the agent (ERROR). Then the built-in bearer-token authorizer: good, wrong,
missing, spoofed client keys, reloads.
"""

import socket
import threading
import time

import pytest

import support
import wsraw
from support import (ADD_SESSION, TIMEOUT, check_balanced, key, make_client, recv_exact,
                     wait_engine_idle, wait_for)

BYSTANDER = "bystander"


class Traffic:
    """Round trips through the bystander's session, back to back on a
    thread, from start to stop: every one must succeed."""

    def __init__(self, srv, echo_server, client_key=BYSTANDER):
        self.srv = srv
        self.address = echo_server.address
        self.client_key = client_key
        self.count = 0
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander-traffic", daemon=True)

    def _run(self):
        i = 0
        while not self._stop.is_set():
            payload = f"bystander round trip {i}".encode()
            i += 1
            try:
                support.dial_round_trip(self.srv, self.client_key, self.address, payload)
                self.count += 1
                # Paced: steady traffic, not a load test of its own.
                self._stop.wait(0.01)
            except Exception as e:  # noqa: BLE001 - reported by stop()
                self.errors.append(f"{type(e).__name__}: {e}")
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """Stops the thread and checks that traffic flowed without a failure."""
        if not self._thread.is_alive() and self._stop.is_set():
            return
        # At least a few round trips, so the check means something.
        wait_for(lambda: self.count >= 3 or self.errors, TIMEOUT, "bystander traffic")
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self.errors, f"the bystander was affected: {self.errors}"


@pytest.fixture
def hostile(rd, tunnel_leak_check, echo_server):
    """Factory: hostile(**server_options) -> (srv, Traffic). The server has a
    connected bystander agent whose traffic runs until the test ends; then
    the bystander must have been unaffected and everything balance."""
    made = []

    def start(**options):
        srv = rd.Server(listen="127.0.0.1:0", **options).start()
        made.append(srv)
        cli = make_client(rd, srv.url, BYSTANDER)
        made.append(cli)
        wait_for(lambda: srv.has_session(BYSTANDER), what="the bystander's session")
        traffic = Traffic(srv, echo_server).__enter__()
        made.append(traffic)
        return srv, traffic

    yield start
    try:
        for obj in made:
            if isinstance(obj, Traffic):
                obj.stop()
        for obj in made:
            if not isinstance(obj, Traffic):
                check_balanced(obj)
    finally:
        for obj in reversed(made):
            if not isinstance(obj, Traffic):
                obj.close()
    wait_engine_idle(rd)


def upgrade_bytes(port, client_key="offender", extra=(), path="/connect"):
    """An upgrade request with extra (name, value) header pairs."""
    request, _ = wsraw.upgrade_request(f"127.0.0.1:{port}", path,
                                       {"X-Tunnel-ID": client_key} if client_key else {})
    extra_lines = "".join(f"{n}: {v}\r\n" for n, v in extra).encode("latin-1")
    return request[:-2] + extra_lines + b"\r\n"


def raw_upgrade(port, request, timeout=TIMEOUT):
    """Sends an upgrade request; returns (status, body, socket). The socket
    is open (and a WSConn can take it over) when status is 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request)
    deadline = time.monotonic() + timeout
    head, rest = wsraw._read_head(sock, deadline)
    first, headers = wsraw._parse_head(head)
    status, _ = wsraw._parse_status_line(first)
    if status == 101:
        return status, b"", wsraw.WSConn(sock, client=True, leftover=rest)
    body = wsraw._read_body(sock, rest, headers, deadline)
    sock.close()
    return status, body, None


def session_alive(ws, timeout=TIMEOUT):
    """A Ping gets its Pong: the session is up and read."""
    token = f"alive {time.monotonic()}".encode()
    ws.send_ping(token)
    deadline = time.monotonic() + timeout
    while token not in ws.pongs:
        frame = ws.recv_frame(max(0.0, deadline - time.monotonic()))
        if frame.opcode == wsraw.OP_PONG:
            ws.pongs.append(frame.payload)
        elif frame.opcode == wsraw.OP_CLOSE:
            raise AssertionError(f"session closed: {wsraw.parse_close(frame.payload)}")
    return True


def close_code(ws, timeout=TIMEOUT):
    """The Close code the peer ends the session with."""
    return ws.wait_closed(timeout)


# ---------------------------------------------------------------------------
# The request head


@pytest.mark.parametrize("limit", [1024, None], ids=["max_head=1024", "default_16384"])
def test_request_head_size(hostile, limit):
    srv, traffic = hostile(**({"max_head": limit} if limit else {}))
    limit = limit or 16384

    def padded(client_key, size):
        base = len(upgrade_bytes(srv.port, client_key, [("X-Pad", "")]))
        head = upgrade_bytes(srv.port, client_key, [("X-Pad", "p" * (size - base))])
        assert len(head) == size
        return head

    # A head of exactly the limit is accepted...
    status, body, ws = raw_upgrade(srv.port, padded("fits", limit))
    assert status == 101, body
    try:
        assert session_alive(ws)
    finally:
        ws.close()
    # ...one byte more is not, and the offender is told why.
    over = padded("offender", limit + 1)
    resp = wsraw.http_exchange("127.0.0.1", srv.port, over)
    assert (resp.status, resp.body) == (431, b"request head too large\n"), resp.raw[:300]
    # Many at once, each far over the limit.
    for _ in range(20):
        resp = wsraw.http_exchange("127.0.0.1", srv.port,
                                   upgrade_bytes(srv.port, extra=[("X-Pad", "p" * 4 * limit)]))
        assert resp.status == 431, resp.raw[:300]
    assert "offender" not in srv.list_clients()


@pytest.mark.parametrize("limit", [8, None], ids=["max_headers=8", "default_64"])
def test_request_header_count(hostile, limit):
    srv, traffic = hostile(**({"max_headers": limit} if limit else {}))
    limit = limit or 64
    own = 6  # Host, Upgrade, Connection, Sec-WebSocket-Key/-Version, X-Tunnel-ID

    def with_headers(n, client_key):
        return upgrade_bytes(srv.port, client_key, [(f"X-H{i}", "v") for i in range(n - own)])

    status, body, ws = raw_upgrade(srv.port, with_headers(limit, "fits"))
    assert status == 101, body
    ws.close()
    resp = wsraw.http_exchange("127.0.0.1", srv.port, with_headers(limit + 1, "offender"))
    assert (resp.status, resp.body) == (431, b"request head too large\n"), resp.raw[:300]
    assert "offender" not in srv.list_clients()


# ---------------------------------------------------------------------------
# Time before the upgrade


def test_slowloris_gets_408_after_handshake_timeout(hostile, rd):
    timeout = 0.5
    srv, traffic = hostile(handshake_timeout=timeout)
    request = upgrade_bytes(srv.port)
    socks = []
    try:
        start = time.monotonic()
        for _ in range(30):
            socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT))
        # One byte every 50 ms from each: the timer counts from the accept,
        # not from the last byte, so dribbling does not keep a slot.
        pos = 0
        while time.monotonic() - start < timeout + 0.5 and pos < len(request) - 1:
            for s in socks:
                try:
                    s.sendall(request[pos:pos + 1])
                except OSError:
                    pass  # already answered and closed
            pos += 1
            time.sleep(0.05)
        for s in socks:
            data, _ = support.read_until_closed(s)
            assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data[:200]
            assert data.endswith(b"request head timeout\n"), data
        took = time.monotonic() - start
        assert took < timeout + 3, took
    finally:
        for s in socks:
            s.close()
    assert "offender" not in srv.list_clients()


@pytest.mark.parametrize("timeout", [0.5, None], ids=["handshake_timeout=0.5", "default_5s"])
def test_idle_before_upgrade_gets_408(hostile, timeout):
    srv, traffic = hostile(**({"handshake_timeout": timeout} if timeout else {}))
    timeout = timeout or 5.0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
        start = time.monotonic()
        data, _ = support.read_until_closed(s)
        took = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data[:200]
    assert timeout - 0.1 <= took < timeout + 2, took


def test_slow_but_complete_upgrade_within_the_limit(hostile):
    # The request takes 0.4 s in three pieces; the limit leaves a loaded
    # machine room to deliver them and answer within it.
    timeout = 2.0
    srv, traffic = hostile(handshake_timeout=timeout)
    request = upgrade_bytes(srv.port, "slow-but-fine")
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
    start = time.monotonic()
    third = len(request) // 3
    for piece in (request[:third], request[third:2 * third], request[2 * third:]):
        sock.sendall(piece)
        time.sleep(0.2)  # a slow client, on purpose
    head, rest = wsraw._read_head(sock, time.monotonic() + TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    ws = wsraw.WSConn(sock, client=True, leftover=rest)
    try:
        wait_for(lambda: srv.has_session("slow-but-fine"), what="the slow client's session")
        # The upgrade stopped the handshake timer: the session outlives it.
        time.sleep(max(0.0, start + timeout + 0.3 - time.monotonic()))
        assert session_alive(ws)
    finally:
        ws.close()


# ---------------------------------------------------------------------------
# Message size


@pytest.mark.parametrize("how", ["one_frame", "fragments", "header_only"])
def test_message_over_max_message_gets_close_1009(hostile, how):
    limit = 64 << 10
    srv, traffic = hostile(max_message=limit)
    status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, "big-talker"))
    assert status == 101, body
    try:
        # A message of exactly the limit is fine (a DATA for no connection:
        # answered with an ERROR, nothing else).
        header = len(wsraw.encode_message(1, 99, wsraw.DATA))
        fits = wsraw.encode_message(1, 99, wsraw.DATA, b"x" * (limit - header))
        assert len(fits) == limit
        ws.send_binary(fits)
        assert session_alive(ws)
        over = fits + b"x"
        try:
            if how == "one_frame":
                ws.send_binary(over)
            elif how == "fragments":
                ws.send_fragmented(over, [limit // 2, limit // 2])
            else:
                # Only the frame header, claiming a terabyte: refused at once,
                # without waiting for (or buffering) any of it.
                ws.send_raw(wsraw.encode_frame(wsraw.OP_BINARY, b"", length=1 << 40)[:14])
        except OSError:
            pass  # cut off before the last byte went out
        assert close_code(ws) == 1009
    finally:
        ws.abort()
    wait_for(lambda: not srv.has_session("big-talker"), what="the offender's session to end")


def test_default_max_message_is_16_mib(hostile):
    srv, traffic = hostile()
    status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, "big-talker"))
    assert status == 101, body
    try:
        ws.send_raw(wsraw.encode_frame(wsraw.OP_BINARY, b"", length=16 << 20)[:14])
        # Exactly 16 MiB is allowed: the server waits for the payload.
        with pytest.raises(TimeoutError):
            ws.recv_frame(timeout=0.3)
        ws.abort()
        status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, "big-talker"))
        assert status == 101, body
        ws.send_raw(wsraw.encode_frame(wsraw.OP_BINARY, b"", length=(16 << 20) + 1)[:14])
        assert close_code(ws) == 1009
    finally:
        ws.abort()


def test_agent_closes_1009_on_oversize_message_and_reconnects(rd, tunnel_leak_check):
    limit = 64 << 10
    with wsraw.WSListener() as listener:
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent"}, max_message=limit,
                        backoff_min=0.1, backoff_max=0.2).start()
        try:
            ws, _ = listener.accept()
            try:
                ws.send_binary(wsraw.encode_message(1, 7, wsraw.DATA, b"y" * (2 * limit)))
                assert close_code(ws) == 1009
            finally:
                ws.abort()
            # The agent comes back on its own.
            ws, _ = listener.accept()
            wait_for(lambda: cli.connected, what="the agent to reconnect")
            ws.close()
        finally:
            cli.close()
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Sessions


def test_max_sessions_503(hostile):
    srv, traffic = hostile(max_sessions=3)  # the bystander holds one
    held = []
    try:
        for i in range(2):
            status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, f"s{i}"))
            assert status == 101, body
            held.append(ws)
        for _ in range(5):
            status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, "one-too-many"))
            assert (status, body) == (503, b"too many sessions")
        assert "one-too-many" not in srv.list_clients()
        # A slot that frees up is available again.
        held.pop().close()
        wait_for(lambda: not srv.has_session("s1"), what="s1 to end")
        status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, "next"))
        assert status == 101, body
        held.append(ws)
        for ws in held:
            assert session_alive(ws)
    finally:
        for ws in held:
            ws.close()


def _open_sessions(srv, client_key, n, held):
    """n accepted upgrades for client_key, appended to held (closed by the caller)."""
    for _ in range(n):
        status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, client_key))
        assert status == 101, body
        held.append(ws)


def test_max_sessions_per_key_429(hostile):
    srv, traffic = hostile(max_sessions_per_key=2)
    held = []
    try:
        _open_sessions(srv, "greedy", 2, held)
        status, body, _ = raw_upgrade(srv.port, upgrade_bytes(srv.port, "greedy"))
        assert (status, body) == (429, b"too many sessions for client greedy")
        # Other keys are not affected, the bystander included.
        status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, "modest"))
        assert status == 101, body
        held.append(ws)
        status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, BYSTANDER))
        assert status == 101, body
        ws.close()
        held[0].close()
        wait_for(lambda: _sessions_of(srv, "greedy") == 1, what="one greedy session to end")
        status, body, ws = raw_upgrade(srv.port, upgrade_bytes(srv.port, "greedy"))
        assert status == 101, body
        held[0] = ws
    finally:
        for ws in held:
            ws.close()


def _sessions_of(srv, client_key):
    m = srv.metrics()
    label = key(clientkey=client_key, peer="false")
    return (support.family(m, ADD_SESSION).get(label, 0)
            - support.family(m, support.REMOVE_SESSION).get(label, 0))


def test_default_max_sessions_per_key_is_64(hostile):
    srv, traffic = hostile()
    held = []
    try:
        _open_sessions(srv, "greedy", 64, held)
        status, body, _ = raw_upgrade(srv.port, upgrade_bytes(srv.port, "greedy"))
        assert (status, body) == (429, b"too many sessions for client greedy")
    finally:
        for ws in held:
            ws.close()


# ---------------------------------------------------------------------------
# Connections per session


def test_max_connections_per_session_on_the_server(hostile, echo_server, rd):
    srv, traffic = hostile(max_connections=4)
    greedy = make_client(rd, srv.url, "greedy")
    socks = []
    try:
        wait_for(lambda: srv.has_session("greedy"), what="greedy's session")
        for _ in range(4):
            socks.append(srv.dial("greedy", "tcp", echo_server.address, timeout=TIMEOUT))
        with pytest.raises(rd.TunnelError, match="too many connections"):
            srv.dial("greedy", "tcp", echo_server.address, timeout=TIMEOUT)
        # The limit is per session: the bystander's traffic goes on, and the
        # full session's own connections still work.
        for i, s in enumerate(socks):
            s.settimeout(TIMEOUT)
            s.sendall(b"ok %d" % i)
            assert recv_exact(s, len(b"ok %d" % i)) == b"ok %d" % i
        socks.pop().close()
        wait_for(lambda: len([c for c in srv.connections() if c["clientkey"] == "greedy"]) == 3,
                 what="the closed connection to go")
        socks.append(srv.dial("greedy", "tcp", echo_server.address, timeout=TIMEOUT))
    finally:
        for s in socks:
            s.close()
        wait_for(lambda: not any(c["clientkey"] == "greedy" for c in srv.connections()),
                 what="greedy's connections to end")
        check_balanced(greedy, sessions=False)
        greedy.close()


def test_max_connections_per_session_on_the_agent(rd, tunnel_leak_check, echo_server):
    with wsraw.WSListener() as listener:
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent"}, max_connections=3).start()
        ws = None
        try:
            ws, _ = listener.accept()
            for conn_id in (1, 2, 3, 4):
                ws.send_msg(conn_id, wsraw.CONNECT, f"tcp/{echo_server.address}")
            msg = ws.recv_tunnel()
            assert (msg.type, msg.conn_id, msg.text) == (wsraw.ERROR, 4, "too many connections")
            # The three it took are unaffected.
            for conn_id in (1, 2, 3):
                ws.send_msg(conn_id, wsraw.DATA, b"hi %d" % conn_id)
                assert ws.recv_data(conn_id, 4) == b"hi %d" % conn_id
            ws.send_msg(3, wsraw.ERROR, "EOF")
            wait_for(lambda: echo_server.open_count == 2, what="the agent to close conn 3")
            ws.send_msg(5, wsraw.CONNECT, f"tcp/{echo_server.address}")
            ws.send_msg(5, wsraw.DATA, b"five")
            assert ws.recv_data(5, 4) == b"five"
            for conn_id in (1, 2, 5):
                ws.send_msg(conn_id, wsraw.ERROR, "EOF")
            wait_for(lambda: echo_server.open_count == 0, what="the agent to close them all")
            check_balanced(cli, sessions=False)
        finally:
            cli.close()
            if ws is not None:
                ws.abort()
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Dials in flight on the agent


def test_max_pending_dials_on_the_agent(rd, tunnel_leak_check, echo_server):
    # The allow callable holds each dial in flight until released.
    release = threading.Event()
    asked = []

    def allow(proto, address):
        asked.append(address)
        release.wait(TIMEOUT)
        return True

    with wsraw.WSListener() as listener:
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent"}, allow=allow,
                        max_pending_dials=2).start()
        ws = None
        try:
            ws, _ = listener.accept()
            for conn_id in (1, 2, 3, 4):
                ws.send_msg(conn_id, wsraw.CONNECT, f"tcp/{echo_server.address}")
            refused = sorted((m.conn_id, m.text) for m in (ws.recv_tunnel(), ws.recv_tunnel()))
            assert refused == [(3, "too many dials in flight"), (4, "too many dials in flight")]
            release.set()
            for conn_id in (1, 2):
                ws.send_msg(conn_id, wsraw.DATA, b"late %d" % conn_id)
                assert ws.recv_data(conn_id, 6) == b"late %d" % conn_id
            # With the two done, a new dial is taken again.
            ws.send_msg(5, wsraw.CONNECT, f"tcp/{echo_server.address}")
            ws.send_msg(5, wsraw.DATA, b"five")
            assert ws.recv_data(5, 4) == b"five"
            for conn_id in (1, 2, 5):
                ws.send_msg(conn_id, wsraw.ERROR, "EOF")
            wait_for(lambda: echo_server.open_count == 0, what="the agent to close them all")
            assert len(asked) == 3
            check_balanced(cli, sessions=False)
        finally:
            release.set()
            cli.close()
            if ws is not None:
                ws.abort()
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# The bearer-token authorizer

TOKEN_A = "tok-alpha-0123456789abcdef"
TOKEN_B = "tok-beta-0123456789abcdef0"
TOKEN_C = "tok-gamma-0123456789abcdef"


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def refused_upgrade(port, headers):
    status, body, ws = raw_upgrade(port, upgrade_bytes(port, None, list(headers.items())))
    if ws is not None:
        ws.close()
    return status, body


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# token          client key\n\n{TOKEN_A} alpha\n"
                    f"  {TOKEN_B}\tbeta  \n")
    return path


def test_token_authorizer_maps_tokens_to_keys(rd, tunnel_leak_check, token_file, echo_server):
    auth = rd.TokenAuthorizer(token_file)
    with rd.Server(listen="127.0.0.1:0", authorizer=auth) as srv:
        # The key comes from the token; a spoofed X-Tunnel-ID is ignored.
        with rd.Client(srv.url, headers={**bearer(TOKEN_A), "X-Tunnel-ID": "beta"}) as a, \
                rd.Client(srv.url, headers=bearer(TOKEN_B)) as b:
            a.wait_connected(TIMEOUT)
            b.wait_connected(TIMEOUT)
            wait_for(lambda: srv.list_clients() == ["alpha", "beta"], what="both sessions")
            for client_key in ("alpha", "beta"):
                s = srv.dial(client_key, "tcp", echo_server.address, timeout=TIMEOUT)
                s.settimeout(TIMEOUT)
                s.sendall(client_key.encode())
                assert recv_exact(s, len(client_key)) == client_key.encode()
                s.close()
            # Each agent only carries its own key's connections.
            adds = support.family(srv.metrics(), ADD_SESSION)
            assert adds == {key(clientkey="alpha", peer="false"): 1,
                            key(clientkey="beta", peer="false"): 1}
            check_balanced(srv, sessions=False)


@pytest.mark.parametrize("headers", [
    {},
    {"X-Tunnel-ID": "alpha"},
    bearer("tok-wrong-0123456789abcdef"),
    bearer(TOKEN_A[:-1]),
    bearer(TOKEN_A + "x"),
    bearer(""),
    {"Authorization": TOKEN_A},
    {"Authorization": f"Basic {TOKEN_A}"},
    {"Authorization": f"Bearer{TOKEN_A}"},
    {"X-Tunnel-ID": "alpha", "Authorization": "Bearer nope"},
], ids=["missing", "tunnel_id_only", "wrong", "prefix", "longer", "empty", "no_scheme",
        "basic", "no_space", "tunnel_id_and_wrong"])
def test_token_authorizer_refuses(rd, tunnel_leak_check, token_file, headers):
    with rd.Server(listen="127.0.0.1:0", authorizer=rd.TokenAuthorizer(token_file)) as srv:
        assert refused_upgrade(srv.port, headers) == (401, b"failed authentication")
        assert srv.list_clients() == []
        assert not support.family(srv.metrics(), ADD_SESSION)
    wait_engine_idle(rd)


def test_token_authorizer_scheme_is_case_insensitive(rd, tunnel_leak_check, token_file):
    with rd.Server(listen="127.0.0.1:0", authorizer=rd.TokenAuthorizer(token_file)) as srv:
        status, body, ws = raw_upgrade(
            srv.port, upgrade_bytes(srv.port, None, [("authorization", f"bearer {TOKEN_A}")]))
        assert status == 101, body
        try:
            wait_for(lambda: srv.list_clients() == ["alpha"], what="alpha's session")
        finally:
            ws.close()
    wait_engine_idle(rd)


def test_token_reload(rd, tunnel_leak_check, token_file):
    auth = rd.TokenAuthorizer(token_file)
    with rd.Server(listen="127.0.0.1:0", authorizer=auth) as srv:
        with rd.Client(srv.url, headers=bearer(TOKEN_A)) as a:
            a.wait_connected(TIMEOUT)
            with rd.Client(srv.url, headers=bearer(TOKEN_B)) as b:
                b.wait_connected(TIMEOUT)
                # Alpha's token is revoked, gamma's added: alpha's session
                # ends (its agent is refused from now on), beta's stays.
                token_file.write_text(f"{TOKEN_B} beta\n{TOKEN_C} gamma\n")
                assert srv.reload_tokens() == ["alpha"]
                wait_for(lambda: not srv.has_session("alpha"), what="alpha's session to end")
                wait_for(lambda: "401" in (a.last_error or ""), what="alpha's retry refused")
                assert b.connected and srv.has_session("beta")
            assert refused_upgrade(srv.port, bearer(TOKEN_A)) == (401, b"failed authentication")
            status, body, ws = raw_upgrade(srv.port,
                                           upgrade_bytes(srv.port, None, bearer(TOKEN_C).items()))
            assert status == 101, body
            ws.close()

            # A bad file changes nothing.
            token_file.write_text(f"{TOKEN_C} gamma\nshort-token delta\n")
            with pytest.raises(ValueError, match="line 2: token shorter than 16 characters"):
                srv.reload_tokens()
            token_file.write_text(f"{TOKEN_C} gamma extra\n")
            with pytest.raises(ValueError, match='line 1: expected "TOKEN CLIENT_KEY"'):
                srv.reload_tokens()
            assert refused_upgrade(srv.port, bearer(TOKEN_A)) == (401, b"failed authentication")
            status, body, ws = raw_upgrade(srv.port,
                                           upgrade_bytes(srv.port, None, bearer(TOKEN_B).items()))
            assert status == 101, body
            ws.close()
        # A revoked token cannot come back with a reconnect either.
        with rd.Client(srv.url, headers=bearer(TOKEN_A)) as again:
            with pytest.raises(TimeoutError, match="401"):
                again.wait_connected(timeout=1)
    wait_engine_idle(rd)


def test_token_table_in_code(rd, tunnel_leak_check):
    auth = rd.TokenAuthorizer(tokens={TOKEN_A: "alpha"})
    with rd.Server(listen="127.0.0.1:0", authorizer=auth) as srv:
        with rd.Client(srv.url, headers=bearer(TOKEN_A)) as a:
            a.wait_connected(TIMEOUT)
            wait_for(lambda: srv.list_clients() == ["alpha"], what="alpha's session")
        auth._tokens = {TOKEN_C: "gamma"}
        srv.reload_tokens()
        assert refused_upgrade(srv.port, bearer(TOKEN_A)) == (401, b"failed authentication")
    with pytest.raises(ValueError, match="16"):
        rd.TokenAuthorizer(tokens={"short": "alpha"})
    with pytest.raises(ValueError):
        rd.TokenAuthorizer(tokens={TOKEN_A: "two words"})
    with pytest.raises(TypeError):
        rd.TokenAuthorizer()
    with pytest.raises(ValueError, match="without a TokenAuthorizer|does not use"):
        with rd.Server(listen="127.0.0.1:0") as srv:
            srv.reload_tokens()
    wait_engine_idle(rd)


def test_token_authorizer_under_many_bad_attempts(hostile_tokens):
    srv, traffic = hostile_tokens
    for i in range(200):
        assert refused_upgrade(srv.port, bearer(f"tok-guess-{i:016d}")) == \
            (401, b"failed authentication")
    assert srv.list_clients() == [BYSTANDER]


@pytest.fixture
def hostile_tokens(rd, tunnel_leak_check, echo_server, token_file):
    """A token server whose bystander authenticates with a token."""
    with open(token_file, "a") as f:
        f.write(f"{TOKEN_C} {BYSTANDER}\n")
    srv = rd.Server(listen="127.0.0.1:0", authorizer=rd.TokenAuthorizer(token_file)).start()
    cli = rd.Client(srv.url, headers=bearer(TOKEN_C)).start()
    try:
        cli.wait_connected(TIMEOUT)
        wait_for(lambda: srv.has_session(BYSTANDER), what="the bystander's session")
        with Traffic(srv, echo_server) as traffic:
            yield srv, traffic
        check_balanced(srv)
        check_balanced(cli)
    finally:
        cli.close()
        srv.close()
    wait_engine_idle(rd)
