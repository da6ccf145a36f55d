"""Helpers shared by the end-to-end tests: waits with deadlines, metrics
arithmetic, small loopback servers and socket utilities.

Every wait here is a polling loop or an event with a deadline; nothing sleeps
to let something happen."""

import gc
import hashlib
import http.client
import http.server
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

TIMEOUT = 30.0
AGENT_KEY = "agent-1"

ADD_SESSION = "session_server_total_add_websocket_session"
REMOVE_SESSION = "session_server_total_remove_websocket_session"
ADD_CONN = "session_server_total_add_connections"
REMOVE_CONN = "session_server_total_remove_connections"
TRANSMIT = "session_server_total_transmit_bytes"
TRANSMIT_ERROR = "session_server_total_transmit_error_bytes"
RECEIVE = "session_server_total_receive_bytes"
PEER_ATTEMPT = "session_server_total_peer_ws_attempt"
PEER_CONNECTED = "session_server_total_peer_ws_connected"
PEER_DISCONNECTED = "session_server_total_peer_ws_disconnected"

# PROTOCOL.md section 7, in order.
GO_FAMILIES = {
    ADD_SESSION: "Total count of added websocket sessions",
    REMOVE_SESSION: "Total count of removed websocket sessions",
    ADD_CONN: "Total count of added connections",
    REMOVE_CONN: "Total count of removed connections",
    TRANSMIT: "Total bytes transmitted",
    TRANSMIT_ERROR: "Total error bytes transmitted",
    RECEIVE: "Total bytes received",
    PEER_ATTEMPT: "Total count of attempts to establish websocket session to other rancher-server",
    PEER_CONNECTED: "Total count of connected websocket sessions to other rancher-server",
    PEER_DISCONNECTED: "Total count of disconnected websocket sessions from other rancher-server",
}


# ---------------------------------------------------------------------------
# Waiting


def wait_for(predicate, timeout=TIMEOUT, what="condition"):
    """Polls predicate until it returns a true value (which is returned) or
    the deadline passes (AssertionError naming `what`). The poll interval
    grows from 1 ms to 50 ms; it paces the polling, it synchronizes nothing."""
    deadline = time.monotonic() + timeout
    interval = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


# ---------------------------------------------------------------------------
# Sockets


def _ephemeral_ports():
    """The kernel's range for port 0 binds and outgoing connects."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def closed_port():
    """A loopback port with nothing listening on it, so a connect to it is
    refused. It lies below the ephemeral range, which no bind to port 0 and
    no outgoing connect uses: a port released from that range could be given
    to a listener of a concurrent test run (an echo server that our "refused"
    dial would then reach, or that its own client would find connected by
    us) before the dial. Free when checked (bound without listening, then
    released); the suites only ever take such ports to leave them closed."""
    low, _ = _ephemeral_ports()
    first = max(1024, min(20000, low - 1024))
    pick = random.SystemRandom()
    for _ in range(1000):
        port = pick.randrange(first, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # someone's listener or bound socket: try another
            return port
    raise AssertionError(f"no free loopback port in {first}..{low - 1}")


free_port = closed_port


def recv_exact(sock, n, timeout=TIMEOUT):
    """Reads exactly n bytes; AssertionError on EOF first."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def round_trip(sock, payload=b"round trip", timeout=TIMEOUT):
    """Sends payload on a socket to an echo service and reads it back."""
    sock.sendall(payload)
    assert recv_exact(sock, len(payload), timeout) == payload


def dial_round_trip(srv, client_key, address, payload=b"round trip"):
    """Dials address through client_key's session, echoes payload, closes."""
    s = srv.dial(client_key, "tcp", address, timeout=TIMEOUT)
    try:
        round_trip(s, payload)
    finally:
        s.close()


def recv_until_eof(sock, timeout=TIMEOUT, limit=1 << 30):
    """Reads until EOF and returns everything read; TimeoutError if the
    stream is still open at the deadline."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no EOF within {timeout}s ({len(buf)} bytes read)")
        sock.settimeout(remaining)
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise AssertionError(f"more than {limit} bytes before EOF")


def open_fds():
    """{fd: target} for this process."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd of the listdir itself, already closed
    return out


def rss_bytes(pid="self"):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------
# Metrics


def key(**labels):
    """A label-set key as metrics() uses it: ((label, value), ...) sorted."""
    return tuple(sorted(labels.items()))


def family(metrics, name):
    return metrics.get(name) or {}


def imbalance(metrics, add, remove):
    """Label sets whose add and remove counters differ, as readable lines."""
    a, r = family(metrics, add), family(metrics, remove)
    return [f"{add.rsplit('_', 1)[0]}{dict(k)}: added {a.get(k, 0)}, removed {r.get(k, 0)}"
            for k in sorted(set(a) | set(r)) if a.get(k, 0) != r.get(k, 0)]


def connection_imbalance(metrics):
    return imbalance(metrics, ADD_CONN, REMOVE_CONN)


def session_imbalance(metrics):
    return imbalance(metrics, ADD_SESSION, REMOVE_SESSION)


def wait_balanced(source, sessions=False, timeout=TIMEOUT):
    """Waits until every connection label set (and, with sessions=True, every
    session label set) has as many removals as additions. source is an
    object with metrics() or a callable returning the metrics dict.
    Returns the balanced metrics."""
    get = source if callable(source) and not hasattr(source, "metrics") else source.metrics
    last = {}

    def balanced():
        nonlocal last
        last = get()
        return not connection_imbalance(last) and not (sessions and session_imbalance(last))

    try:
        wait_for(balanced, timeout, "add == remove for every label set")
    except AssertionError:
        lines = connection_imbalance(last) + (session_imbalance(last) if sessions else [])
        raise AssertionError("counters do not balance:\n  " + "\n  ".join(lines)) from None
    return last


@dataclass
class Family:
    name: str
    help: str = None
    type: str = None
    samples: dict = None  # {label key: value}
    label_orders: list = None  # label names in the order each line wrote them


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _unescape(v):
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse_exposition(text):
    """Parses Prometheus text exposition into ({name: Family}, [family names
    in order of first appearance]). Strict enough to catch malformed lines."""
    families = {}
    order = []

    def fam(name):
        if name not in families:
            families[name] = Family(name, samples={}, label_orders=[])
            order.append(name)
        return families[name]

    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            fam(name).help = help_text
            continue
        if line.startswith("# TYPE "):
            name, _, type_text = line[7:].partition(" ")
            fam(name).type = type_text
            continue
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise AssertionError(f"malformed exposition line: {line!r}")
        name, labels_text, value = m.groups()
        labels = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                if not lm:
                    raise AssertionError(f"malformed labels in {line!r}")
                labels.append((lm.group(1), _unescape(lm.group(2))))
                pos = lm.end()
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[:-len(suffix)] in families:
                base = name[:-len(suffix)]
        f = fam(base)
        f.samples[tuple(sorted(labels))] = float(value)
        f.label_orders.append([k for k, _ in labels])
    return families, order


def exposition_metrics(text):
    """The exposition as a metrics() style dict {name: {label key: value}}."""
    families, _ = parse_exposition(text)
    return {name: dict(f.samples) for name, f in families.items() if f.samples}


# ---------------------------------------------------------------------------
# Engine objects


def engine_idle(pkg):
    """True when the engine holds no session and no connection."""
    stats = pkg.engine_stats()
    return stats["open_sessions"] == 0 and stats["open_connections"] == 0


def wait_engine_idle(pkg, timeout=TIMEOUT):
    try:
        wait_for(lambda: engine_idle(pkg), timeout, "the engine to hold nothing open")
    except AssertionError:
        raise AssertionError(f"engine still holds: {pkg.engine_stats()}") from None


def assert_no_new_fds(before, timeout=TIMEOUT):
    """Waits until the process has no more descriptors than `before`."""
    def settled():
        gc.collect()
        return len(open_fds()) <= len(before)

    try:
        wait_for(settled, timeout, "descriptors to return to the baseline")
    except AssertionError:
        now = open_fds()
        extra = {fd: t for fd, t in now.items() if before.get(fd) != t}
        raise AssertionError(f"{len(now) - len(before)} descriptors leaked: {extra}") from None


def check_balanced(obj, sessions=False):
    """Waits for the counters of a live Server or Client to balance, then
    asserts it with the plugin's helper (whose report names the label sets).
    sessions=True also requires every session to have been removed."""
    from remotedialer_py.pytest_plugin import assert_balanced

    wait_balanced(obj, sessions=sessions)
    assert_balanced(obj, sessions=sessions)


def make_client(pkg, url, key, **kwargs):
    """A started Client with X-Tunnel-ID: key, connected within TIMEOUT."""
    cli = pkg.Client(url, headers={"X-Tunnel-ID": key}, **kwargs)
    try:
        cli.start()
        cli.wait_connected(timeout=TIMEOUT)
    except BaseException:
        cli.close()
        raise
    return cli


# ---------------------------------------------------------------------------
# Loopback servers


@dataclass
class Finished:
    nbytes: int
    sha256: str
    error: str = None


class _ThreadedTCPServer:
    """Accepts on 127.0.0.1:0 and runs serve(conn) on a thread per
    connection. close() stops accepting, shuts down every open connection
    and joins the threads."""

    def __init__(self, backlog=4096):
        self.sock = self._listen(backlog)
        if self.sock.family == socket.AF_UNIX:
            self.port = None
            self.address = self.sock.getsockname()
        else:
            self.port = self.sock.getsockname()[1]
            self.address = f"127.0.0.1:{self.port}"
        self._cond = threading.Condition()
        self._conns = set()
        self._threads = []
        self.accepted = 0
        self.finished = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"{type(self).__name__}-accept")
        self._acceptor.start()

    def _listen(self, backlog):
        return socket.create_server(("127.0.0.1", 0), backlog=backlog)

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # listener shut down
            with self._cond:
                self._conns.add(conn)
                self.accepted += 1
                self._cond.notify_all()
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, conn):
        result = Finished(0, hashlib.sha256().hexdigest())
        try:
            result = self.serve(conn)
        except OSError as e:
            result = Finished(0, "", f"{type(e).__name__}: {e}")
        finally:
            conn.close()
            with self._cond:
                self._conns.discard(conn)
                self.finished.append(result)
                self._cond.notify_all()

    def serve(self, conn):
        raise NotImplementedError

    @property
    def open_count(self):
        with self._cond:
            return len(self._conns)

    def wait_accepted(self, count, timeout=TIMEOUT):
        with self._cond:
            if not self._cond.wait_for(lambda: self.accepted >= count, timeout):
                raise AssertionError(f"{self.accepted} of {count} connections accepted "
                                     f"within {timeout}s")

    def wait_open(self, count, timeout=TIMEOUT):
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._conns) == count, timeout):
                raise AssertionError(f"{len(self._conns)} connections open on "
                                     f"{type(self).__name__}, expected {count}")

    def wait_finished(self, count, timeout=TIMEOUT):
        """Waits until `count` connections have ended; returns their records."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.finished) >= count, timeout):
                raise AssertionError(f"{len(self.finished)} of {count} connections ended "
                                     f"within {timeout}s")
            return list(self.finished)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self._acceptor.join(TIMEOUT)
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(TIMEOUT)


class EchoServer(_ThreadedTCPServer):
    """Echoes every byte back. Records, per connection, the byte count and
    SHA-256 of what it received once the connection ends."""

    def serve(self, conn):
        h = hashlib.sha256()
        n = 0
        buf = bytearray(64 * 1024)
        mv = memoryview(buf)
        try:
            while True:
                k = conn.recv_into(buf)
                if not k:
                    break
                h.update(mv[:k])
                n += k
                conn.sendall(mv[:k])
        except OSError as e:
            return Finished(n, h.hexdigest(), f"{type(e).__name__}: {e}")
        return Finished(n, h.hexdigest())


class UnixEchoServer(EchoServer):
    """An EchoServer listening on the unix socket `path` (its address)."""

    def __init__(self, path, backlog=64):
        self.path = path
        super().__init__(backlog)

    def _listen(self, backlog):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(backlog)
        return sock

    def close(self):
        super().close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class StreamServer(_ThreadedTCPServer):
    """Sends pseudo-random bytes to every client until the client goes away."""

    def serve(self, conn):
        block = random.Random(7).randbytes(64 * 1024)
        n = 0
        try:
            while True:
                conn.sendall(block)
                n += len(block)
        except OSError:
            pass
        return Finished(n, "")


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so every request through the
    # tunnel is one tunneled connection that the service itself ends.
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):
        pass

    def _reply(self, code, body, ctype="application/octet-stream"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _record(self, body=b""):
        self.server.requests.append((self.command, self.path, dict(self.headers.items()), len(body)))

    def do_GET(self):
        self._record()
        path = urlsplit(self.path).path
        svc = self.server
        if path == "/hello":
            self._reply(200, HttpService.HELLO, "text/plain")
        elif path == "/large":
            self._reply(200, svc.large)
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            self._reply(code, f"status {code}\n".encode(), "text/plain")
        else:
            self._reply(404, b"not found\n", "text/plain")

    do_HEAD = do_GET

    def do_POST(self):
        body = self._body()
        self._record(body)
        if urlsplit(self.path).path == "/echo":
            self._reply(200, body)
        else:
            self._reply(404, b"not found\n", "text/plain")

    do_PUT = do_POST


class HttpService:
    """A ThreadingHTTPServer on 127.0.0.1:0 with known answers:
    GET /hello (HELLO), GET /large (LARGE_SIZE deterministic bytes),
    POST|PUT /echo (the request body), GET /status/N (status N)."""

    HELLO = b"hello from the service\n"
    LARGE_SIZE = 8 << 20

    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HttpHandler)
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.large = random.Random(42).randbytes(self.LARGE_SIZE)
        self.large = self.httpd.large
        self.large_sha256 = hashlib.sha256(self.large).hexdigest()
        self.port = self.httpd.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()

    @property
    def requests(self):
        return self.httpd.requests

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(TIMEOUT)


def http_get_through(sock, path, host="service", method="GET", body=None, timeout=TIMEOUT):
    """One HTTP request over an already connected socket (e.g. a dialed
    tunnel socket). Returns (status, body)."""
    import http.client

    conn = http.client.HTTPConnection(host, timeout=timeout)
    conn.sock = sock
    sock.settimeout(timeout)
    conn.request(method, path, body=body)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, data


# ---------------------------------------------------------------------------
# Targets that never answer, and agents in processes of their own


class NeverAccepting:
    """A loopback listener whose accept queue is full and never drained: a
    connect to it gets no answer (the SYN is dropped), as from a black hole."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._fillers = []
        # listen(0) queues one connection (two on some kernels); a few more
        # connects fill it for certain, the rest stay in SYN_SENT.
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self._fillers.append(s)
        self._filler_ports = {s.getsockname()[1] for s in self._fillers}
        # Full once a connection waits in it: the kernel then drops every
        # SYN. (On a loaded machine the fillers' handshakes may not have been
        # processed yet when connect() returns, so their own SYN_SENT states
        # say nothing about the queue.)
        wait_for(lambda: self.accept_queue() >= 1, 10, "the accept queue to be full")

    def accept_queue(self):
        """Connections waiting in the accept queue (a listener's rx_queue)."""
        return sum(rx for local, _, state, rx in tcp_sockets()
                   if local == self.port and state == "0A")

    def syn_sent(self):
        """Connects to this port still waiting for an answer (SYN_SENT), not
        counting the fillers: those of whoever dialed it."""
        return sum(1 for local, remote, state, _ in tcp_sockets()
                   if remote == self.port and state == "02" and local not in self._filler_ports)

    def close(self):
        for s in self._fillers:
            s.close()
        self.sock.close()


def tcp_sockets():
    """(local port, remote port, state hex, receive queue) of every IPv4 TCP
    socket in this network namespace (/proc/net/tcp), e.g. (40000, 8080,
    "02", 0) for a SYN_SENT one. A listener's receive queue is the number of
    connections in its accept queue."""
    out = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            out.append((int(parts[1].split(":")[1], 16), int(parts[2].split(":")[1], 16),
                        parts[3], int(parts[4].split(":")[1], 16)))
    return out


AGENT_SCRIPT = r'''
import json, os, sys
from remotedialer_py import Client, Server, engine_stats

url, key, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cli = Client(url, headers={"X-Tunnel-ID": key}, **options)
cli.start()
kept = []

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def stats(objs=(cli,)):
    out = {"engine": engine_stats(), "add": 0, "remove": 0, "unbalanced": []}
    for obj in objs:
        m = obj.metrics()
        adds = m.get("session_server_total_add_connections", {})
        removes = m.get("session_server_total_remove_connections", {})
        out["add"] += sum(adds.values())
        out["remove"] += sum(removes.values())
        out["unbalanced"] += [f"{dict(k)}: added {adds.get(k, 0)}, removed {removes.get(k, 0)}"
                              for k in set(adds) | set(removes) if adds.get(k, 0) != removes.get(k, 0)]
    out["connected"] = cli.connected
    return out

say({"pid": os.getpid()})
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "wait_connected":
        cli.wait_connected(timeout=30)
        say({"connected": True})
    elif cmd == "stats":
        say(stats())
    elif cmd == "own":
        # A server and client of its own in this process, with open dials and
        # a forward: what an interpreter exit has to end.
        srv = Server(listen="127.0.0.1:0")
        srv.start()
        inner = Client(srv.url, headers={"X-Tunnel-ID": "inner"})
        inner.start()
        inner.wait_connected(timeout=30)
        for _ in range(int(args[1])):
            s = srv.dial("inner", "tcp", args[0], timeout=30)
            s.settimeout(30)
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            kept.append(s)
        kept.extend([srv, inner, srv.forward("inner", "tcp", args[0])])
        say({"ok": True, "open": engine_stats()["open_connections"]})
    elif cmd == "exit":
        say({"exiting": True})
        sys.exit(0)  # leaves everything open: the interpreter's exit must end it
    elif cmd == "close":
        cli.close()
        say({"engine": engine_stats()})
        sys.exit(0)
'''


class AgentProcess:
    """A Client in a `python -c AGENT_SCRIPT` process, driven by one-word
    commands on stdin and answering JSON lines: wait_connected, stats,
    own ADDRESS N, exit, close. Every read has a deadline."""

    def __init__(self, url, key, **options):
        import json
        import queue
        import subprocess
        import sys
        from pathlib import Path

        import remotedialer_py

        self._json = json
        env = dict(os.environ)
        parent = str(Path(remotedialer_py.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (parent, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", AGENT_SCRIPT, url, key, json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            bufsize=1, env=env, start_new_session=True)
        self._lines = queue.Queue()
        self._empty = queue.Empty
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pid = self.reply()["pid"]

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def reply(self, timeout=TIMEOUT):
        try:
            line = self._lines.get(timeout=timeout)
        except self._empty:
            raise AssertionError(f"agent process: no answer within {timeout}s") from None
        if line is None:
            raise AssertionError(f"agent process exited ({self.proc.wait(TIMEOUT)}): "
                                 f"{self.proc.stderr.read()[-2000:]}")
        return self._json.loads(line)

    def call(self, *words, timeout=TIMEOUT):
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        return self.reply(timeout)

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait_balanced(self, timeout=TIMEOUT):
        """Waits until the agent's counters balance and it holds no connection."""
        last = {}

        def ok():
            nonlocal last
            last = self.call("stats")
            return not last["unbalanced"] and last["engine"]["open_connections"] == 0

        try:
            wait_for(ok, timeout, "the agent process's counters to balance")
        except AssertionError:
            raise AssertionError(f"agent process: {last}") from None
        return last

    def kill(self):
        import signal

        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def wait(self, timeout=TIMEOUT):
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        return rc


def ping_barrier(ws, timeout=TIMEOUT):
    """Sends a Ping on a raw WebSocket (wsraw.WSConn) and reads until its
    Pong: the peer has then handled every message sent before the Ping.
    Returns the tunnel messages read meanwhile."""
    token = os.urandom(8)
    ws.send_ping(token)
    seen = []
    deadline = time.monotonic() + timeout
    while token not in ws.pongs:
        if time.monotonic() >= deadline:
            raise AssertionError(f"no Pong within {timeout}s")
        try:
            seen.append(ws.recv_tunnel(timeout=0.05))
        except TimeoutError:
            pass
    return seen


def read_until_closed(sock, timeout=TIMEOUT):
    """Reads until EOF or reset; returns (bytes read, seconds taken)."""
    start = time.monotonic()
    data = bytearray()
    sock.settimeout(timeout)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data), time.monotonic() - start


# ---------------------------------------------------------------------------
# The command line as a subprocess (see conftest.run_cli)


def cli_server(run_cli, *extra):
    """Starts `remotedialer-py server` on a free port; returns (proc, port)."""
    proc = run_cli("server", "--listen", "127.0.0.1:0", *extra, ready=r"listening")
    m = proc.wait_line(r"listening on (ws://\S+)")
    port = urlsplit(m.group(1)).port
    assert port, m.group(0)
    return proc, port


def get(port, path, method="GET", body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


def served_metrics(port):
    status, body, _ = get(port, "/metrics")
    assert status == 200
    return exposition_metrics(body.decode())


def wait_agent(port, client_key):
    """Waits until the CLI server has a session for client_key (seen in its
    /metrics: added and not removed)."""
    label = key(clientkey=client_key, peer="false")

    def up():
        m = served_metrics(port)
        return (family(m, ADD_SESSION).get(label, 0)
                > family(m, REMOVE_SESSION).get(label, 0))

    wait_for(up, 60, f"agent {client_key} to connect to the CLI server")


def wait_served_balanced(port):
    return wait_balanced(lambda: served_metrics(port))


class StalledReader(_ThreadedTCPServer):
    """Reads nothing until `go` is set, then everything, hashing it."""

    def __init__(self):
        self.go = threading.Event()
        super().__init__()

    def serve(self, conn):
        self.go.wait(TIMEOUT)
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return Finished(n, h.hexdigest())
            h.update(chunk)
            n += len(chunk)


class Sampler:
    """Polls engine_stats() on a thread and keeps the peaks: bytes held
    toward local sockets, held in all (both directions), and live heap.
    stop() returns the peak held in all."""

    def __init__(self, rd):
        self.rd = rd
        self.peak_buffered = 0
        self.peak_held = 0
        self.peak_heap = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            s = self.rd.engine_stats()
            self.peak_buffered = max(self.peak_buffered, s["buffered_to_local"])
            self.peak_held = max(self.peak_held, s["buffered_bytes"])
            self.peak_heap = max(self.peak_heap, s["heap_bytes"] - s["pool_bytes"])

    def stop(self):
        self._stop.set()
        self._thread.join(TIMEOUT)
        return self.peak_held
