"""The /client/ route as a keep-alive reverse proxy: the client's connection
serves request after request (pipelined too), tunneled connections go back
to a pool after complete responses and come out of it for the next request,
every framing the route must follow (chunked with trailers, close-delimited,
HEAD, 204, 304, 100-continue, HTTP/1.0) ends where the backend meant it to,
and ambiguous framing is refused. Each test ends with the pool drained,
balanced counters and nothing open (the route fixture and
tunnel_leak_check)."""

import http.client
import http.server
import shutil
import socket
import subprocess
import threading

import pytest

import support
from support import AGENT_KEY, TIMEOUT, check_balanced, wait_for


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.peers.append(self.client_address)
        if srv.gate is not None:
            srv.gate.wait(TIMEOUT)
        body = f"{self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Backend:
    """A ThreadingHTTPServer speaking HTTP/1.1 with keep-alive; GET answers
    its path, POST its body. `connections` counts the TCP connections it saw
    (by peer address); `gate`, when set, holds every GET until it opens."""

    def __init__(self, gate=None):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.peers = []
        self.httpd.lock = threading.Lock()
        self.httpd.gate = gate
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()

    @property
    def connections(self):
        with self.httpd.lock:
            return len(set(self.httpd.peers))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(TIMEOUT)


class RawBackend(support._ThreadedTCPServer):
    """Answers each request head (bodies by Content-Length, or small chunked
    ones) with the next of
    `answers`, in order across all connections: bytes; (bytes, "close") to
    close the connection after them; or None to close it without a word."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.heads = []
        super().__init__()

    def serve(self, conn):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return support.Finished(0, "")
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            if b"transfer-encoding: chunked" in head.lower():  # small test bodies only
                while b"0\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                buf = buf.split(b"0\r\n\r\n", 1)[1]
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
                    while len(buf) < n:
                        buf += conn.recv(65536)
                    buf = buf[n:]
            with self._cond:
                self.heads.append(head.decode())
                answer = self.answers.pop(0) if self.answers else None
            if answer is None:
                return support.Finished(0, "")
            if isinstance(answer, tuple):
                conn.sendall(answer[0])
                return support.Finished(0, "")
            conn.sendall(answer)


@pytest.fixture
def backend():
    b = Backend()
    try:
        yield b
    finally:
        b.close()


class Route:
    """A Server (options as given) with one agent; `get` runs requests on a
    kept http.client connection to the route."""

    def __init__(self, rd, **options):
        self.srv = rd.Server(listen="127.0.0.1:0", **options)
        self.srv.start()
        self.cli = support.make_client(rd, self.srv.url, AGENT_KEY)
        wait_for(lambda: self.srv.has_session(AGENT_KEY), what="the agent's session")

    def path(self, address, rest="/"):
        return f"/client/{AGENT_KEY}/http/{address}{rest}"

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=TIMEOUT)

    def states(self):
        return sorted(c["state"] for c in self.srv.connections())

    def close(self):
        try:
            self.srv.close_idle()
            wait_for(lambda: not self.srv.connections(), what="the route's connections to end")
            check_balanced(self.srv)
            check_balanced(self.cli)
        finally:
            self.cli.close()
            self.srv.close()


@pytest.fixture
def route_factory(rd, tunnel_leak_check):
    made = []

    def make(**options):
        r = Route(rd, **options)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def route(route_factory):
    return route_factory()


def _get(conn, path, method="GET", body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.read(), resp


def _read_response(f):
    """(status, headers with lower-case names, body) of a response with a
    Content-Length (or none) read from the file f, leaving f open."""
    status = int(f.readline().split(b" ")[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def _raw(route, data):
    s = socket.create_connection(("127.0.0.1", route.srv.port), timeout=TIMEOUT)
    s.sendall(data)
    return s


# ---------------------------------------------------------------------------
# Keep-alive and the pool


def test_fifty_requests_one_client_connection_one_backend_connection(route, backend):
    conn = route.conn()
    for i in range(50):
        status, body, _ = _get(conn, route.path(backend.address, f"/r/{i}"))
        assert (status, body) == (200, f"/r/{i}\n".encode())
        if i == 0:
            local = conn.sock.getsockname()
        assert conn.sock.getsockname() == local  # the client's connection was kept
    assert backend.connections == 1
    wait_for(lambda: route.states() == ["idle"], what="the one pooled connection, idle")
    conn.close()


def test_curl_reuses_its_connection_for_several_urls(route, backend):
    curl = shutil.which("curl")
    assert curl, "these tests need curl (Debian package curl)"
    base = f"http://127.0.0.1:{route.srv.port}"
    urls = [base + route.path(backend.address, f"/c/{i}") for i in range(3)]
    proc = subprocess.run([curl, "-sS", "-v", *urls], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout == b"/c/0\n/c/1\n/c/2\n"
    err = proc.stderr.decode(errors="replace")
    assert err.count("Connected to") == 1, err
    assert "using existing connection" in err, err
    assert backend.connections == 1


def test_pipelined_requests_are_answered_in_order(route, backend):
    reqs = b"".join(f"GET {route.path(backend.address, f'/p/{i}')} HTTP/1.1\r\nHost: x\r\n\r\n"
                    .encode() for i in range(5))
    s = _raw(route, reqs)
    f = s.makefile("rb")
    for i in range(5):
        assert _read_response(f)[::2] == (200, f"/p/{i}\n".encode())
    f.close()
    s.close()
    assert backend.connections == 1


def test_pool_bounds_per_target_and_in_all(route_factory):
    gate = threading.Event()
    backends = [Backend(gate), Backend(gate)]
    try:
        r = route_factory(proxy_pool_per_target=2, proxy_pool_max=3)
        results = []

        def one(b, i):
            c = r.conn()
            results.append(_get(c, r.path(b.address, f"/b/{i}"))[:2])
            c.close()

        threads = [threading.Thread(target=one, args=(b, i)) for b in backends for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(b.connections for b in backends) == 6, what="six exchanges at once")
        gate.set()
        for t in threads:
            t.join(TIMEOUT)
        assert sorted(s for s, _ in results) == [200] * 6
        # Two per target would make four; the pool holds three in all.
        wait_for(lambda: r.states() == ["idle"] * 3, what="three pooled connections")
        assert r.srv.close_idle() == 3
        wait_for(lambda: not r.srv.connections(), what="the pool drained")
    finally:
        for b in backends:
            b.close()


def test_idle_timeout_closes_pooled_connections(route_factory, backend):
    r = route_factory(proxy_pool_idle_timeout=0.3)
    conn = r.conn()
    assert _get(conn, r.path(backend.address))[0] == 200
    conn.close()
    wait_for(lambda: r.states() == ["idle"], what="the pooled connection")
    wait_for(lambda: not r.srv.connections(), what="the idle timeout to close it")


def test_pool_off_dials_per_request_but_keeps_the_client(route_factory, backend):
    r = route_factory(proxy_pool_idle_timeout=0)
    conn = r.conn()
    for i in range(3):
        assert _get(conn, r.path(backend.address, f"/o/{i}"))[:2] == (200, f"/o/{i}\n".encode())
    assert backend.connections == 3
    conn.close()


def test_session_end_drains_the_pool(route, backend):
    conn = route.conn()
    assert _get(conn, route.path(backend.address))[0] == 200
    conn.close()
    wait_for(lambda: route.states() == ["idle"], what="the pooled connection")
    assert route.srv.disconnect(AGENT_KEY) == 1
    wait_for(lambda: not route.srv.connections(), what="the pool to drain with the session")
    route.cli.wait_connected(timeout=TIMEOUT)
    wait_for(lambda: route.srv.has_session(AGENT_KEY), what="the agent back")


def test_close_idle_leaves_busy_connections(route_factory):
    gate = threading.Event()
    b = Backend(gate)
    try:
        r = route_factory()
        c1 = r.conn()
        gate.set()
        assert _get(c1, r.path(b.address, "/1"))[0] == 200
        gate.clear()
        wait_for(lambda: r.states() == ["idle"], what="the pooled connection")
        c2 = r.conn()
        c2.request("GET", r.path(b.address, "/2"))  # takes the pooled one, held at the gate
        wait_for(lambda: r.states() == ["open"], what="the connection in use")
        assert r.srv.close_idle() == 0
        gate.set()
        assert c2.getresponse().read() == b"/2\n"
        wait_for(lambda: r.states() == ["idle"], what="back in the pool")
        assert r.srv.close_idle() == 1
        c1.close()
        c2.close()
    finally:
        b.close()


def test_backend_closing_an_idle_connection_is_noticed(route):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
    raw = RawBackend([(ok, "close"), ok])
    try:
        conn = route.conn()
        assert _get(conn, route.path(raw.address))[:2] == (200, b"one")
        # The backend closed after its response: the far side's end reaches
        # the pool, which drops the connection at once.
        wait_for(lambda: not route.srv.connections(), what="the closed connection to leave the pool")
        assert _get(conn, route.path(raw.address))[:2] == (200, b"one")
        assert raw.accepted == 2
        conn.close()
    finally:
        raw.close()


def test_reused_connection_closed_before_answering_is_retried(route):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # The first connection answers once, then closes on the next request
    # without a byte (as a target whose idle timeout ran out just then).
    raw = RawBackend([ok, None, ok])
    try:
        conn = route.conn()
        assert _get(conn, route.path(raw.address))[:2] == (200, b"ok")
        wait_for(lambda: route.states() == ["idle"], what="the pooled connection")
        assert _get(conn, route.path(raw.address))[:2] == (200, b"ok")
        assert raw.accepted == 2  # the retry went on a fresh connection
        conn.close()
    finally:
        raw.close()


def test_error_mid_response_is_not_reused(route):
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    raw = RawBackend([(short, "close"), ok])
    try:
        conn = route.conn()
        conn.request("GET", route.path(raw.address))
        resp = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
        wait_for(lambda: not route.srv.connections(), what="the broken exchange to end")
        conn = route.conn()
        assert _get(conn, route.path(raw.address))[:2] == (200, b"ok")
        assert raw.accepted == 2
        conn.close()
    finally:
        raw.close()


# ---------------------------------------------------------------------------
# Framings


def test_odd_framings_on_one_connection(route):
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",  # to HEAD: no body
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length:4\n" + b"".join(b"X-%d:v\n" % i for i in range(60))
        + b"\nlast",  # bare LFs, no spaces: the rewritten head is longer
    ]
    raw = RawBackend(answers)
    try:
        conn = route.conn()
        status, body, resp = _get(conn, route.path(raw.address, "/chunked"))
        assert (status, body) == (200, b"hello world")
        local = conn.sock.getsockname()
        status, body, resp = _get(conn, route.path(raw.address, "/head"), method="HEAD")
        assert (status, body, resp.getheader("Content-Length")) == (200, b"", "11")
        assert _get(conn, route.path(raw.address, "/204"))[:2] == (204, b"")
        assert _get(conn, route.path(raw.address, "/304"))[:2] == (304, b"")
        assert _get(conn, route.path(raw.address, "/last"))[:2] == (200, b"last")
        assert conn.sock.getsockname() == local
        assert raw.accepted == 1  # every framing left the backend reusable
        conn.close()
    finally:
        raw.close()


def test_close_delimited_response_closes_the_client(route):
    raw = RawBackend([(b"HTTP/1.1 200 OK\r\n\r\nuntil close", "close")])
    try:
        s = _raw(route, f"GET {route.path(raw.address)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = support.recv_until_eof(s)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Connection: close\r\n" in data
        assert data.endswith(b"\r\n\r\nuntil close")
        s.close()
    finally:
        raw.close()


def test_expect_100_continue(route, backend):
    body = b"x" * 1000
    s = _raw(route, f"POST {route.path(backend.address, '/e')} HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
    f = s.makefile("rb")
    assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
    while f.readline() not in (b"\r\n", b""):
        pass
    s.sendall(body)
    assert _read_response(f)[::2] == (200, body)
    f.close()
    s.close()


def test_http10_client_closed_unless_it_asks_for_keep_alive(route, backend):
    s = _raw(route, f"GET {route.path(backend.address, '/a')} HTTP/1.0\r\n\r\n".encode())
    data = support.recv_until_eof(s)
    assert data.endswith(b"\r\n\r\n/a\n") and b"Connection: close\r\n" in data
    s.close()
    s = _raw(route, f"GET {route.path(backend.address, '/b')} HTTP/1.0\r\n"
                    f"Connection: keep-alive\r\n\r\n".encode())
    f = s.makefile("rb")
    for i, p in enumerate(("/b", "/c")):
        if i:
            s.sendall(f"GET {route.path(backend.address, p)} HTTP/1.0\r\n"
                      f"Connection: keep-alive\r\n\r\n".encode())
        status, headers, body = _read_response(f)
        assert headers["connection"] == "keep-alive"
        assert (status, body) == (200, f"{p}\n".encode())
    f.close()
    s.close()


@pytest.mark.parametrize("headers", [
    "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    "Content-Length: 5\r\nContent-Length: 6\r\n",
    "Content-Length: 5, 6\r\n",
    "Transfer-Encoding: gzip\r\n",
    "Transfer-Encoding: chunked, identity\r\n",
])
def test_ambiguous_request_framing_is_refused(route, backend, headers):
    s = _raw(route, f"POST {route.path(backend.address)} HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
                    f"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n".encode())
    data = support.recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
    s.close()
    assert backend.connections == 0


def test_chunked_request_body_then_next_request(route):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    raw = RawBackend([ok, ok])
    try:
        s = _raw(route, f"POST {route.path(raw.address, '/1')} HTTP/1.1\r\nHost: x\r\n"
                        f"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                        f"GET {route.path(raw.address, '/2')} HTTP/1.1\r\nHost: x\r\n\r\n"
                        .encode())
        f = s.makefile("rb")
        for _ in range(2):
            assert _read_response(f)[::2] == (200, b"ok")
        assert [h.split("\r\n")[0].split(" ")[1] for h in raw.heads] == ["/1", "/2"]
        f.close()
        s.close()
    finally:
        raw.close()


def test_pool_options_are_checked(rd):
    with pytest.raises(ValueError):
        rd.Server(listen="127.0.0.1:0", proxy_pool_per_target=0)
    with pytest.raises(ValueError):
        rd.Server(listen="127.0.0.1:0", proxy_pool_idle_timeout=-1)
