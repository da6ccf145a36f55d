"""The stream route and remote forwards.

`GET /stream/{key}/{proto}/{address}` with `Upgrade: tcp` answers 101 and
the connection becomes a raw byte stream through agent `key` (checked with
a raw socket: bytes both ways, bytes sent right behind the head, the
errors before the 101, the route off). `RemoteForward` and the CLI's
`forward` subcommand listen locally and reach the destination through that
route (http.client through the port, many sequential and concurrent
connections, a unix target, an https server, a killed CLI). The `tunnel`
fixture checks counters, open connections and descriptors afterwards.
"""

import hashlib
import http.client
import os
import socket
import subprocess
import threading
import urllib.parse

import pytest

import support
from support import AGENT_KEY, TIMEOUT, recv_exact, recv_until_eof, wait_for


def server_port(srv):
    return urllib.parse.urlsplit(srv.url).port


def http_base(srv, scheme="http"):
    return f"{scheme}://127.0.0.1:{server_port(srv)}"


def stream_request(key, proto, address, extra=b"", upgrade=True):
    seg = "/".join(urllib.parse.quote(s, safe="") for s in (key, proto, address))
    head = f"GET /stream/{seg} HTTP/1.1\r\nHost: test\r\n"
    if upgrade:
        head += "Connection: Upgrade\r\nUpgrade: tcp\r\n"
    return (head + "\r\n").encode() + extra


def read_head(sock):
    """The answer head (through the blank line) and any bytes already past it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed inside the answer head: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def open_stream(srv, key, proto, address, extra=b""):
    sock = socket.create_connection(("127.0.0.1", server_port(srv)), timeout=TIMEOUT)
    sock.sendall(stream_request(key, proto, address, extra))
    head, rest = read_head(sock)
    return sock, head, rest


def refusal(srv, request):
    """Status line and body of a refused request (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", server_port(srv)), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = recv_until_eof(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body.decode()


# ---------------------------------------------------------------------------
# The route, raw


def test_route_upgrades_to_a_raw_stream(tunnel, echo_server):
    address = f"127.0.0.1:{echo_server.port}"
    sock, head, rest = open_stream(tunnel.srv, AGENT_KEY, "tcp", address, extra=b"early bytes")
    with sock:
        lines = head.split("\r\n")
        assert lines[0] == "HTTP/1.1 101 Switching Protocols"
        assert "Upgrade: tcp" in lines and "Connection: Upgrade" in lines
        # The bytes sent behind the head reached the echo server first.
        got = rest + recv_exact(sock, len(b"early bytes") - len(rest))
        assert got == b"early bytes"
        payload = os.urandom(1 << 20)
        threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
        assert hashlib.sha256(recv_exact(sock, len(payload))).digest() == \
            hashlib.sha256(payload).digest()
        conns = tunnel.srv.connections()
        assert [(c["clientkey"], c["proto"], c["address"]) for c in conns] == \
            [(AGENT_KEY, "tcp", address)]
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""  # our EOF ends the connection, and it ends ours
    echo_server.wait_finished(1)
    wait_for(lambda: not tunnel.srv.connections(), TIMEOUT, "the stream's connection to end")


def test_route_backend_end_reaches_the_client(tunnel, http_service):
    sock, head, rest = open_stream(tunnel.srv, AGENT_KEY, "tcp", http_service.address,
                                   extra=b"GET /hello HTTP/1.0\r\n\r\n")
    with sock:
        assert head.startswith("HTTP/1.1 101 ")
        answer = rest + recv_until_eof(sock)
    assert answer.startswith(b"HTTP/1.0 200 ") and answer.endswith(http_service.HELLO)


def test_route_errors_before_the_upgrade(tunnel, echo_server):
    srv = tunnel.srv
    address = f"127.0.0.1:{echo_server.port}"
    assert refusal(srv, stream_request("nope", "tcp", address)) == \
        ("HTTP/1.1 500 Internal Server Error", "failed to find Session for client nope")
    status, body = refusal(srv, stream_request(AGENT_KEY, "tcp", address, upgrade=False))
    assert status == "HTTP/1.1 400 Bad Request" and "Upgrade: tcp" in body
    status, body = refusal(srv, stream_request(AGENT_KEY, "udp", address))
    assert status == "HTTP/1.1 400 Bad Request" and "unsupported proto udp" in body
    status, body = refusal(srv, stream_request(AGENT_KEY, "tcp", "no-port"))
    assert status == "HTTP/1.1 400 Bad Request" and "bad address no-port" in body
    status, body = refusal(srv, b"GET /stream/a/tcp HTTP/1.1\r\nConnection: Upgrade\r\n"
                                b"Upgrade: tcp\r\n\r\n")
    assert status == "HTTP/1.1 400 Bad Request" and "/stream/{key}/{proto}/{address}" in body
    status, body = refusal(srv, b"GET /stream/a/tcp/h%zz:1 HTTP/1.1\r\nConnection: Upgrade\r\n"
                                b"Upgrade: tcp\r\n\r\n")
    assert status == "HTTP/1.1 400 Bad Request" and "percent" in body
    assert not srv.connections()


def test_route_session_full_is_answered(rd, tunnel_leak_check, echo_server):
    """A session at its connection limit cannot open the stream: 503 with the
    reason, before any 101, and the stream already open carries on."""
    fds = support.open_fds()
    address = f"127.0.0.1:{echo_server.port}"
    with rd.Server(listen="127.0.0.1:0", max_connections=1).start() as srv:
        with support.make_client(rd, srv.url, AGENT_KEY):
            wait_for(lambda: srv.has_session(AGENT_KEY), TIMEOUT, "the agent's session")
            sock, head, _ = open_stream(srv, AGENT_KEY, "tcp", address)
            with sock:
                assert head.startswith("HTTP/1.1 101 ")
                assert refusal(srv, stream_request(AGENT_KEY, "tcp", address)) == \
                    ("HTTP/1.1 503 Service Unavailable",
                     "dial through session failed: too many connections")
                support.round_trip(sock)
            wait_for(lambda: not srv.connections(), TIMEOUT, "the connection to end")
            support.check_balanced(srv)
    support.wait_engine_idle(rd)
    support.assert_no_new_fds(fds)


def test_route_off_with_the_proxy_route(rd, tunnel_leak_check, echo_server):
    with rd.Server(listen="127.0.0.1:0", proxy_route=False).start() as srv:
        status, body = refusal(srv, stream_request("a", "tcp", f"127.0.0.1:{echo_server.port}"))
    assert status == "HTTP/1.1 404 Not Found"


def test_route_through_a_peer(rd, tunnel_leak_check, echo_server):
    """B has no session for the key but A announced it: B's route dials
    through its link to A (CONNECT key::tcp/address), as B's dials do."""
    fds = support.open_fds()
    a = rd.Server("127.0.0.1:0", peer_id="A", peer_token="token-a").start()
    b = rd.Server("127.0.0.1:0", peer_id="B", peer_token="token-b").start()
    agent = None
    try:
        a.add_peer(b.url, "B", "token-b")
        b.add_peer(a.url, "A", "token-a")
        agent = support.make_client(rd, a.url, "foo")
        wait_for(lambda: b.route("foo") == "A", TIMEOUT, "B to learn A's key")
        address = f"127.0.0.1:{echo_server.port}"
        with rd.RemoteForward(http_base(b), "foo", "tcp", address) as fwd:
            with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as sock:
                support.round_trip(sock, b"via a peer")
        echo_server.wait_finished(1)
        m = support.wait_balanced(b)
        label = support.key(addr=address, clientkey="A", proto="foo::tcp")
        assert m[support.ADD_CONN][label] == m[support.REMOVE_CONN][label] == 1
    finally:
        if agent is not None:
            agent.close()
        b.close()
        a.close()
    support.wait_engine_idle(rd)
    support.assert_no_new_fds(fds)


# ---------------------------------------------------------------------------
# RemoteForward


def test_remote_forward_http_client(rd, tunnel, http_service):
    with rd.RemoteForward(http_base(tunnel.srv), AGENT_KEY, "tcp", http_service.address) as fwd:
        for path, want in (("/hello", http_service.HELLO), ("/large", http_service.large)):
            conn = http.client.HTTPConnection("127.0.0.1", fwd.port, timeout=TIMEOUT)
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == want
            conn.close()
        wait_for(lambda: fwd.stats()["open"] == 0, TIMEOUT, "the forward's links to close")
        st = fwd.stats()
        assert (st["accepted"], st["joined"], st["failed"], st["last_error"]) == (2, 2, 0, "")
    assert fwd.closed
    with pytest.raises(rd.ClosedError):
        fwd.stats()


def test_remote_forward_server_speaks_first(rd, tunnel):
    """A backend that greets before reading: the greeting may come in the
    same read as the 101, and still reaches the local client, first."""
    lsock = socket.create_server(("127.0.0.1", 0))
    greeting = b"220 greetings from the backend\r\n"

    def serve():
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(greeting)
            conn.sendall(conn.recv(100).upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        address = f"127.0.0.1:{lsock.getsockname()[1]}"
        with rd.RemoteForward(http_base(tunnel.srv), AGENT_KEY, "tcp", address) as fwd:
            with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as sock:
                assert recv_exact(sock, len(greeting)) == greeting
                sock.sendall(b"helo")
                assert recv_until_eof(sock) == b"HELO"
    finally:
        t.join(TIMEOUT)
        lsock.close()


def test_remote_forward_refused_reports_the_answer(rd, tunnel, echo_server):
    address = f"127.0.0.1:{echo_server.port}"
    with rd.RemoteForward(http_base(tunnel.srv), "nope", "tcp", address) as fwd:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as sock:
            assert recv_until_eof(sock) == b""
        wait_for(lambda: fwd.stats()["failed"] == 1, TIMEOUT, "the refusal")
        assert fwd.stats()["last_error"] == \
            "HTTP/1.1 500 Internal Server Error: failed to find Session for client nope"
        assert fwd.stats()["open"] == 0


def test_remote_forward_headers_reach_the_server(rd, tunnel_leak_check, echo_server):
    # A plain listener stands in for the server, to see the request as sent:
    # the URL's path as a prefix, each segment percent-encoded, the headers.
    seen = []
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = lsock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            seen.append(data.decode())
            conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nno way")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{lsock.getsockname()[1]}/prefix/"
    try:
        with rd.RemoteForward(url, "k/1", "unix", "/run/x y.sock",
                              headers={"Authorization": "Bearer abc"}) as fwd:
            with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as sock:
                assert recv_until_eof(sock) == b""
            wait_for(lambda: fwd.stats()["failed"] == 1, TIMEOUT, "the refusal")
            assert fwd.stats()["last_error"] == "HTTP/1.1 401 Unauthorized: no way"
    finally:
        t.join(TIMEOUT)
        lsock.close()
    lines = seen[0].split("\r\n")
    assert lines[0] == "GET /prefix/stream/k%2F1/unix/%2Frun%2Fx%20y.sock HTTP/1.1"
    assert "Authorization: Bearer abc" in lines and "Upgrade: tcp" in lines


def test_remote_forward_bytes_behind_the_101(rd, tunnel_leak_check):
    """A stand-in server sends the 101 and the first bytes in one write: the
    forward passes those bytes on before the rest of the stream."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = lsock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: tcp\r\n\r\nfirst bytes;")
            conn.sendall(conn.recv(100))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{lsock.getsockname()[1]}"
        with rd.RemoteForward(url, "k", "tcp", "h:1") as fwd:
            with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as sock:
                assert recv_exact(sock, 12) == b"first bytes;"
                sock.sendall(b"echoed")
                assert recv_until_eof(sock) == b"echoed"
            wait_for(lambda: fwd.stats()["open"] == 0, TIMEOUT, "the link to close")
            assert fwd.stats()["joined"] == 1
    finally:
        t.join(TIMEOUT)
        lsock.close()


def test_remote_forward_unix_target(rd, tunnel, tmp_path):
    echo = support.UnixEchoServer(str(tmp_path / "echo.sock"))
    try:
        with rd.RemoteForward(http_base(tunnel.srv), AGENT_KEY, "unix", echo.path) as fwd:
            with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as sock:
                support.round_trip(sock, b"through a unix socket")
        echo.wait_finished(1)
    finally:
        echo.close()


def test_remote_forward_bad_arguments(rd):
    with pytest.raises(ValueError, match="http:// or https://"):
        rd.RemoteForward("ws://127.0.0.1:1", "k", "tcp", "h:1")
    with pytest.raises(ValueError, match="proto 'sctp': the stream route carries tcp"):
        rd.RemoteForward("http://127.0.0.1:1", "k", "sctp", "h:1")
    with pytest.raises(ValueError, match="address 'h': expected HOST:PORT"):
        rd.RemoteForward("http://127.0.0.1:1", "k", "tcp", "h")
    with pytest.raises(ValueError, match="header"):
        rd.RemoteForward("http://127.0.0.1:1", "k", "tcp", "h:1", headers={"X": "a\r\nY: b"})
    busy = socket.create_server(("127.0.0.1", 0))
    with busy, pytest.raises(rd.TunnelError, match="listen tcp"):
        rd.RemoteForward("http://127.0.0.1:1", "k", "tcp", "h:1",
                         listen=f"127.0.0.1:{busy.getsockname()[1]}")


def test_remote_forward_close_ends_open_streams(rd, tunnel, echo_server):
    fwd = rd.RemoteForward(http_base(tunnel.srv), AGENT_KEY, "tcp",
                           f"127.0.0.1:{echo_server.port}")
    socks = [socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) for _ in range(5)]
    try:
        for s in socks:
            support.round_trip(s)
        assert len(tunnel.srv.connections()) == 5
        fwd.close()
        for s in socks:
            assert recv_until_eof(s) == b""
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: not tunnel.srv.connections(), TIMEOUT, "the server's connections to end")


def test_remote_forward_backpressure(rd, tunnel, stream_server):
    """A backend that sends without end to a local reader that reads nothing:
    the forward stops reading the server's stream, so the server's side of
    the connection fills and the agent is PAUSEd, instead of the bytes piling
    up in the forward. Reading again resumes the flow."""
    with rd.RemoteForward(http_base(tunnel.srv), AGENT_KEY, "tcp",
                          f"127.0.0.1:{stream_server.port}") as fwd:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            wait_for(lambda: [c["paused"] for c in tunnel.srv.connections()] == [True],
                     TIMEOUT, "the agent's PAUSE")
            # Then nothing moves: the bytes stop at a bound, far from what an
            # unbounded reader would have taken by then.
            seen = []

            def settled():
                (conn,) = tunnel.srv.connections()
                seen.append(conn["tx_bytes"] + conn["rx_bytes"])
                assert seen[-1] < 256 << 20, "the forward kept reading"
                return len(seen) > 5 and len(set(seen[-5:])) == 1 and conn["paused"]

            wait_for(settled, TIMEOUT, "the flow to stop")
            assert rd.engine_stats()["heap_bytes"] < 48 << 20
            got = 0
            while got < 32 << 20:
                chunk = sock.recv(1 << 20)
                assert chunk
                got += len(chunk)
    stream_server.wait_finished(1)


# ---------------------------------------------------------------------------
# The CLI


def start_forward(run_cli, url, address, *extra, key=AGENT_KEY, proto="tcp"):
    p = run_cli("forward", key, proto, address, "--server", url, *extra, ready=None)
    m = p.wait_line(r"^forwarding 127\.0\.0\.1:(\d+) -> (\S+) (\S+) (\S+) via (\S+)$")
    assert m.group(2, 3, 4, 5) == (key, proto, address, url)
    return p, int(m.group(1))


def test_cli_forward_sequential_and_concurrent(tunnel, run_cli, http_service, echo_server):
    p, port = start_forward(run_cli, http_base(tunnel.srv), http_service.address)
    for _ in range(50):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("GET", "/hello")
        assert conn.getresponse().read() == http_service.HELLO
        conn.close()
    assert len(http_service.requests) == 50
    p2, port2 = start_forward(run_cli, http_base(tunnel.srv), f"127.0.0.1:{echo_server.port}",
                              "--listen", "0")
    errors = []

    def one(i):
        try:
            with socket.create_connection(("127.0.0.1", port2), timeout=TIMEOUT) as s:
                payload = os.urandom(64 * 1024 + i)
                threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
                assert recv_exact(s, len(payload)) == payload
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    echo_server.wait_finished(20)
    assert p.stop() == 0 and p2.stop() == 0


def test_cli_forward_reports_refusals(tunnel, run_cli):
    p, port = start_forward(run_cli, http_base(tunnel.srv), "127.0.0.1:9", key="nope")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        assert recv_until_eof(sock) == b""
    p.wait_line(r"failed: HTTP/1.1 500 Internal Server Error: "
                r"failed to find Session for client nope")


def test_cli_forward_killed_leaves_nothing_open(tunnel, run_cli, echo_server):
    p, port = start_forward(run_cli, http_base(tunnel.srv), f"127.0.0.1:{echo_server.port}")
    socks = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(4)]
    try:
        for s in socks:
            support.round_trip(s)
        wait_for(lambda: len(tunnel.srv.connections()) == 4, TIMEOUT, "four connections")
        p.kill()
        for s in socks:
            assert recv_until_eof(s) == b""
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: not tunnel.srv.connections(), TIMEOUT, "the server's connections to end")
    echo_server.wait_finished(4)
    support.check_balanced(tunnel.srv)


def test_cli_forward_bad_server_url(run_cli):
    p = run_cli("forward", "k", "tcp", "h:1", "--server", "ftp://x", ready=None)
    assert p.wait_exit() == 2
    assert "--server: invalid server URL 'ftp://x'" in p.output


# ---------------------------------------------------------------------------
# https


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream-tls")
    crt, key = d / "server.pem", d / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(crt)], check=True, capture_output=True)
    return str(crt), str(key)


def test_cli_forward_https(rd, tunnel_leak_check, run_cli, cert, http_service):
    crt, key = cert
    fds = support.open_fds()
    with rd.Server(listen="127.0.0.1:0", tls_cert=crt, tls_key=key).start() as srv:
        cli = rd.Client(srv.url, headers={"X-Tunnel-ID": AGENT_KEY}, ca_file=crt).start()
        try:
            cli.wait_connected(timeout=TIMEOUT)
            url = http_base(srv, "https")
            p, port = start_forward(run_cli, url, http_service.address, "--ca-file", crt)
            for _ in range(5):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                conn.request("GET", "/large")
                assert conn.getresponse().read() == http_service.large
                conn.close()
            # Without the CA the certificate is not trusted: refused, and said so.
            p2, port2 = start_forward(run_cli, url, http_service.address)
            with socket.create_connection(("127.0.0.1", port2), timeout=TIMEOUT) as sock:
                assert recv_until_eof(sock) == b""
            p2.wait_line(r"failed: tls: .*certificate")
            assert p.stop() == 0 and p2.stop() == 0
            wait_for(lambda: not srv.connections(), TIMEOUT, "no connection left")
            support.check_balanced(srv)
        finally:
            cli.close()
    support.wait_engine_idle(rd)
    support.assert_no_new_fds(fds)
