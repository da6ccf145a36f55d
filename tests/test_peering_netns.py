"""An HA group from the command line: `remotedialer-py server` processes that
peer with each other, CLI agents, and requests through the /client/ route of
every server.

- Three servers, each in its own network namespace (10.77.0.1-3 on a bridge),
  and an agent namespace holding two agents and the HTTP target they reach on
  their own loopback. Agent foo fails over between A and B, agent bar knows
  only A. `kill -9` of A: B and C drop A's keys at once (/debug/peers, and a
  dial for bar fails with the Go library's message), foo reconnects to B and
  dials through C reach it again. The same scenario also runs on loopback
  (three processes on 127.0.0.1), which is all there is where network
  namespaces cannot be made (not root, no CAP_NET_ADMIN): the netns case then
  skips, saying why.
- Five servers on loopback, full mesh from one shared -peers list, one agent:
  a request through each server reaches the target.
- The failures the README describes, in process: a dial for a key whose peer
  is down, a connection through a peer that dies, a peer with a wrong token.

Every server's connection counters must balance once idle, and its open
descriptors (process_open_fds in /metrics) come back to what they were. All
waits are conditions with deadlines; namespaces and ports are unique per run,
so two runs of the suite can share the machine.
"""

import base64
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import support
from support import (ADD_SESSION, PEER_CONNECTED, PEER_DISCONNECTED, REMOVE_SESSION, TIMEOUT,
                     connection_imbalance, exposition_metrics, family, key, recv_exact,
                     wait_for)

# One token for the whole group (each server presents it), unique per run so
# that a loopback port reused by a concurrent run cannot join the two groups.
TOKEN = f"group-{secrets.token_hex(8)}"
SUBNET = "10.77.0"
SERVER_ADDR = {"A": f"{SUBNET}.1", "B": f"{SUBNET}.2", "C": f"{SUBNET}.3"}
AGENT_ADDR = f"{SUBNET}.4"
USER_ADDR = f"{SUBNET}.254"  # the bridge's own address: where requests come from
PROMPT = 5.0  # seconds: "at once" for a peer whose process died (the kernel sends FIN)

HELLO = b"hello from behind the agent\n"

# The HTTP target next to the agents: GET /hello, POST /echo; one request per
# connection, so each request through the tunnel is one tunneled connection.
TARGET_SCRIPT = r"""
import http.server, sys

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *a):
        pass
    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self._send(HELLO)
    def do_POST(self):
        self._send(self.rfile.read(int(self.headers["Content-Length"])))

HELLO = sys.argv[1].encode() + b"\n"
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("target listening on", srv.server_address[1], flush=True)
srv.serve_forever()
"""

# Makes HTTP requests from where it runs (a namespace): one JSON line in
# (method, url, body as base64), one JSON line out (status and body, or the
# connection error). A fresh connection per request.
REQUESTER_SCRIPT = r"""
import base64, http.client, io, json, socket, sys, urllib.parse

class Received:  # the whole answer, for http.client to parse
    def __init__(self, data):
        self.data = data
    def makefile(self, *args, **kwargs):
        return io.BytesIO(self.data)

for line in sys.stdin:
    req = json.loads(line)
    u = urllib.parse.urlsplit(req["url"])
    body = base64.b64decode(req["body"]) if req["body"] else b""
    path = u.path + ("?" + u.query if u.query else "")
    try:
        # Read to EOF: the server has closed its descriptor by then, so a
        # count of its descriptors taken next does not see this request.
        with socket.create_connection((u.hostname, u.port), timeout=req["timeout"]) as s:
            s.sendall(f"{req['method']} {path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                      f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                      + body)
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        resp = http.client.HTTPResponse(Received(data), method=req["method"])
        resp.begin()
        out = {"status": resp.status, "body": base64.b64encode(resp.read()).decode()}
    except (OSError, http.client.HTTPException) as e:
        out = {"status": None, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


# ---------------------------------------------------------------------------
# Helper processes


class LineProcess:
    """A Python script in a subprocess (behind `prefix`, a command that execs
    it), its stdout read line by line on a thread so that every read has a
    deadline."""

    def __init__(self, script, *args, prefix=(), stdin=subprocess.DEVNULL):
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", script, *map(str, args)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, start_new_session=True)
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout=TIMEOUT):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s from {self.proc.args}") from None
        if line is None:
            raise AssertionError(f"{self.proc.args} exited with {self.proc.wait(TIMEOUT)}")
        return line

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class Requester(LineProcess):
    def __init__(self, prefix=()):
        super().__init__(REQUESTER_SCRIPT, prefix=prefix, stdin=subprocess.PIPE)
        self._lock = threading.Lock()

    def request(self, url, method="GET", body=None, timeout=TIMEOUT):
        """(status, body); status None (and the error as body) when the
        server could not be reached."""
        req = {"method": method, "url": url, "timeout": timeout,
               "body": base64.b64encode(body).decode() if body else ""}
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            out = json.loads(self.line(timeout + 10))
        if out["status"] is None:
            return None, out["error"].encode()
        return out["status"], base64.b64decode(out["body"])


# ---------------------------------------------------------------------------
# Where the processes run


def _ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def netns_unavailable():
    """Why network namespaces cannot be used here, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    probe = f"rdprobe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except OSError as exc:
        return f"ip netns add failed: {exc}"
    try:
        _ip("netns", "del", probe)
    except OSError:
        pass
    return None


class Netns:
    """Namespaces A, B, C (servers), agent, and user (holding the bridge).
    Each node's veth end is eth0 inside its namespace; the bridge side is
    v<node> in the user namespace. Nothing is created in the namespace the
    tests run in, so names only have to be unique among namespaces."""

    name = "netns"
    NODES = ("A", "B", "C", "agent")

    def __init__(self):
        stem = f"rdpeer-{os.getpid()}-{secrets.token_hex(3)}"
        self.ns = {n: f"{stem}-{n}" for n in (*self.NODES, "user")}
        self.addr = dict(SERVER_ADDR, agent=AGENT_ADDR, user=USER_ADDR)
        self.made = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            self.made.append(ns)
        user = self.ns["user"]
        _ip("-n", user, "link", "add", "br0", "type", "bridge")
        _ip("-n", user, "link", "set", "br0", "up")
        _ip("-n", user, "addr", "add", f"{USER_ADDR}/24", "dev", "br0")
        _ip("-n", user, "link", "set", "lo", "up")
        for node in self.NODES:
            ns, veth = self.ns[node], f"v{node}"
            _ip("-n", user, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", user, "link", "set", veth, "master", "br0")
            _ip("-n", user, "link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def prefix(self, node):
        return ("ip", "netns", "exec", self.ns[node])

    def host(self, node):
        return self.addr[node]

    def ports(self, nodes):
        return {n: 8123 for n in nodes}  # each server has its namespace to itself

    def close(self):
        """Deletes the namespaces (their veths and the bridge go with them).
        Call it once the processes inside are gone."""
        for ns in reversed(self.made):
            try:
                _ip("netns", "del", ns)
            except OSError:
                pass
        self.made = []


class Loopback:
    name = "loopback"

    def prefix(self, node):
        return ()

    def host(self, node):
        return "127.0.0.1"

    def ports(self, nodes):
        """Ports the kernel picks (bound at once, so all differ), released for
        the servers to take; start_servers retries if another process took
        one meanwhile."""
        socks = [socket.create_server(("127.0.0.1", 0)) for _ in nodes]
        try:
            return {n: s.getsockname()[1] for n, s in zip(nodes, socks)}
        finally:
            for s in socks:
                s.close()

    def close(self):
        pass


@pytest.fixture(params=["netns", "loopback"])
def place(request):
    if request.param == "loopback":
        yield Loopback()
        return
    why = netns_unavailable()
    if why:
        pytest.skip(f"netns variant skipped ({why}); the loopback variant covers the same "
                    "scenario")
    lab = Netns()
    try:
        yield lab
    finally:
        # After the processes inside are gone: the fixtures that started
        # them (run_cli, helpers) were set up later, so they tear down first.
        lab.close()


@pytest.fixture
def helpers():
    """LineProcess factory; everything it started is killed at the end."""
    made = []

    def start(cls, *args, **kwargs):
        p = cls(*args, **kwargs)
        made.append(p)
        return p

    yield start
    for p in made:
        p.close()


# ---------------------------------------------------------------------------
# The group


class Group:
    """Server processes of one group and the requester that talks to them."""

    def __init__(self, place, user, servers, urls):
        self.place = place
        self.user = user
        self.servers = servers  # name -> CliProcess
        self.urls = urls  # name -> connect URL

    def http(self, name, path):
        return self.urls[name].replace("ws://", "http://", 1).rsplit("/connect", 1)[0] + path

    def get(self, name, path, **kw):
        return self.user.request(self.http(name, path), **kw)

    def peers(self, name):
        status, body = self.get(name, "/debug/peers")
        assert status == 200, body
        doc = json.loads(body)
        assert doc["peer_id"] == name
        return {p["id"]: p for p in doc["peers"]}

    def metrics(self, name):
        status, body = self.get(name, "/metrics")
        assert status == 200, body
        return exposition_metrics(body.decode())

    def fds(self, name):
        return self.metrics(name)["process_open_fds"][()]

    def meshed(self, names):
        """Every link of `names` to the others up, in both directions."""
        for n in names:
            peers = self.peers(n)
            for other in names:
                if other == n:
                    continue
                p = peers.get(other)
                if p is None or p["state"] != "connected" or p["inbound"] != 1:
                    return False
        return True

    def wait_balanced(self, name):
        last = {}

        def balanced():
            last["m"] = self.metrics(name)
            return not connection_imbalance(last["m"])

        try:
            wait_for(balanced, TIMEOUT, f"server {name}'s connection counters to balance")
        except AssertionError:
            raise AssertionError(f"server {name}: counters do not balance:\n  "
                                 + "\n  ".join(connection_imbalance(last["m"]))) from None
        return last["m"]

    def wait_fds(self, name, expected):
        try:
            wait_for(lambda: self.fds(name) == expected, TIMEOUT,
                     f"server {name}'s open descriptors to come back to {expected}")
        except AssertionError:
            raise AssertionError(f"server {name} has {self.fds(name)} descriptors open, "
                                 f"expected {expected}") from None


def start_servers(place, run_cli, names, peer_args):
    """Starts one `remotedialer-py server` per name with its peer flags
    (peer_args(name, urls) -> list) and waits for its "listening" line.
    On loopback a port another process took in the meantime makes the whole
    group start again on new ports."""
    for attempt in range(5):
        ports = place.ports(names)
        urls = {n: f"ws://{place.host(n)}:{ports[n]}/connect" for n in names}
        procs = {n: run_cli("server", "--listen", f"{place.host(n)}:{ports[n]}",
                            "--debug-connections", *peer_args(n, urls),
                            ready=None, prefix=place.prefix(n))
                 for n in names}
        try:
            for n, p in procs.items():
                p.wait_line(r"listening on ws://")
                for other in names:
                    if other != n:
                        p.wait_line(rf"added peer {other} at {urls[other]}")
            return procs, urls
        except AssertionError:
            if not any("address already in use" in p.output for p in procs.values()) \
                    or attempt == 4:
                raise
            for p in procs.values():
                p.stop()
    raise AssertionError("unreachable")


def dials_counted(metrics, client_key, address):
    """Connections to address for client_key counted by one server: on the
    agent's own session (clientkey=key, proto=tcp) or through a peer
    (clientkey=peer id, proto=key::tcp)."""
    return sum(v for k, v in family(metrics, support.ADD_CONN).items()
               if dict(k)["addr"] == address
               and (dict(k)["proto"] == f"{client_key}::tcp"
                    or (dict(k)["clientkey"], dict(k)["proto"]) == (client_key, "tcp")))


def route(group, via, client_key, target_port, path="/hello", **kw):
    return group.get(via, f"/client/{client_key}/http/127.0.0.1:{target_port}{path}", **kw)


def assert_reaches(group, via, client_key, target_port):
    status, body = route(group, via, client_key, target_port)
    assert (status, body) == (200, HELLO + client_key.encode() + b"\n"), \
        f"via {via} for {client_key}: {status} {body[:300]!r}"


def assert_not_found(group, via, client_key, target_port):
    status, body = route(group, via, client_key, target_port)
    assert status == 500 and f"failed to find Session for client {client_key}".encode() in body, \
        f"via {via} for {client_key}: {status} {body[:300]!r}"


# ---------------------------------------------------------------------------
# Three servers, kill -9 of one


def test_three_servers_failover(place, run_cli, helpers):
    user = helpers(Requester, prefix=place.prefix("user"))
    names = ["A", "B", "C"]

    def peer_args(n, urls):
        others = [o for o in names if o != n]
        if n == "A":  # the Go example server's flags
            return ["-id", n, "-token", TOKEN,
                    "-peers", ",".join(f"{o}:{TOKEN}:{urls[o]}" for o in others)]
        if n == "B":  # our spellings
            return ["--peer-id", n, "--peer-token", TOKEN,
                    *[a for o in others for a in ("--peer", f"{o}:{TOKEN}:{urls[o]}")]]
        # C gets the whole group's list, itself included, as every server could
        return ["--id", n, "--token", TOKEN,
                "--peers", ", ".join(f"{o}:{TOKEN}:{urls[o]}" for o in names)]

    servers, urls = start_servers(place, run_cli, names, peer_args)
    assert f"this server is C (its own item, {urls['C']}, is skipped)" in servers["C"].output
    group = Group(place, user, servers, urls)

    # The target answers with the agent's name so that each reply shows
    # which agent carried it; one target per agent, both on the agent side.
    targets = {}
    for agent in ("foo", "bar"):
        t = helpers(LineProcess, TARGET_SCRIPT, HELLO.decode() + agent,
                    prefix=place.prefix("agent"))
        targets[agent] = int(t.line().split()[-1])

    foo = run_cli("client", "--connect", urls["A"], "--connect", urls["B"], "-id", "foo",
                  ready=None, prefix=place.prefix("agent"))
    bar = run_cli("client", "-connect", urls["A"], "-id", "bar", ready=None,
                  prefix=place.prefix("agent"))
    foo.wait_line(rf"connected to {urls['A']} as foo")
    bar.wait_line(rf"connected to {urls['A']} as bar")

    wait_for(lambda: group.meshed(names), TIMEOUT, "the full mesh A, B, C")
    for n in ("B", "C"):
        wait_for(lambda: group.peers(n)["A"]["keys"] == 2, TIMEOUT,
                 f"{n} to learn foo and bar from A")
    base = {n: group.fds(n) for n in names}

    # Through every server to both agents; a larger body through the two hops.
    for via in names:
        for agent, port in targets.items():
            assert_reaches(group, via, agent, port)
    payload = os.urandom(256 << 10)
    status, body = route(group, "C", "foo", targets["foo"], "/echo", method="POST",
                         body=payload)
    assert status == 200 and body == payload
    for n in names:
        m = group.wait_balanced(n)
        # Each request is a tunneled connection on the server it entered:
        # on the agent's session, or (as in Go) on the peer's, with the
        # peer's id as client key and "key::proto".
        for agent, port in targets.items():
            assert dials_counted(m, agent, f"127.0.0.1:{port}") >= 1, (n, agent)
        group.wait_fds(n, base[n])

    # kill -9 A: its sockets close with the process, so B and C see the ends.
    killed = time.monotonic()
    servers["A"].kill()
    for n in ("B", "C"):
        def dropped(n=n):
            a = group.peers(n)["A"]
            return a["state"] != "connected" and a["keys"] == 0 and a["inbound"] == 0
        wait_for(dropped, PROMPT, f"{n} to drop A and the keys it announced")
    took = time.monotonic() - killed
    assert took < PROMPT, took
    # bar knew only A: it is gone from the group, with Go's message.
    for via in ("B", "C"):
        assert_not_found(group, via, "bar", targets["bar"])
    status, _ = route(group, "A", "foo", targets["foo"])
    assert status is None  # A itself is gone

    # foo fails over to B; C learns it from B and carries dials there.
    foo.wait_line(rf"connected to {urls['B']} as foo")
    wait_for(lambda: group.peers("C")["B"]["keys"] == 1, TIMEOUT, "C to learn foo from B")
    for via in ("B", "C"):
        assert_reaches(group, via, "foo", targets["foo"])
    assert bar.proc.poll() is None  # still retrying A

    for n in ("B", "C"):
        m = group.wait_balanced(n)
        # A's session to n ended and was counted; n's link to A is down.
        a_session = key(clientkey="A", peer="true")
        assert family(m, ADD_SESSION)[a_session] == family(m, REMOVE_SESSION)[a_session] >= 1
        assert family(m, PEER_CONNECTED)[key(peer="A")] == \
            family(m, PEER_DISCONNECTED)[key(peer="A")] >= 1
    # Descriptors: B lost its link to A and A's session, and gained foo's
    # session; C lost its link to A and A's session.
    group.wait_fds("B", base["B"] - 1)
    group.wait_fds("C", base["C"] - 2)

    for p in (foo, bar, servers["B"], servers["C"]):
        assert p.stop() == 0, p.output


# ---------------------------------------------------------------------------
# Five servers, full mesh


def test_five_servers_full_mesh(run_cli, helpers, http_service):
    place = Loopback()
    user = helpers(Requester)
    names = ["s1", "s2", "s3", "s4", "s5"]

    def peer_args(n, urls):  # the same -peers on every server
        return ["-id", n, "-token", TOKEN,
                "-peers", ",".join(f"{o}:{TOKEN}:{urls[o]}" for o in names)]

    servers, urls = start_servers(place, run_cli, names, peer_args)
    group = Group(place, user, servers, urls)
    agent = run_cli("client", "--connect", urls["s3"], "--id", "foo", ready=None)
    agent.wait_line(rf"connected to {urls['s3']} as foo")
    wait_for(lambda: group.meshed(names), TIMEOUT, "the full mesh of five")
    for n in names:
        if n != "s3":
            wait_for(lambda n=n: group.peers(n)["s3"]["keys"] == 1, TIMEOUT,
                     f"{n} to learn foo from s3")
    base = {n: group.fds(n) for n in names}

    for via in names:
        status, body = group.get(via, f"/client/foo/http/127.0.0.1:{http_service.port}/hello")
        assert (status, body) == (200, http_service.HELLO), (via, status, body[:300])
    assert len(http_service.requests) == 5
    for n in names:
        m = group.wait_balanced(n)
        assert dials_counted(m, "foo", http_service.address) >= 1, n
        group.wait_fds(n, base[n])
    for p in (agent, *servers.values()):
        assert p.stop() == 0, p.output


# ---------------------------------------------------------------------------
# The failures the README describes, in process


def test_failures_as_documented(rd, tunnel_leak_check, echo_server):
    a = rd.Server(peer_id="A", peer_token="ta").start()
    b = rd.Server(peer_id="B", peer_token="tb").start()
    c = rd.Server(peer_id="C", peer_token="tc").start()
    cli = None
    try:
        a.add_peer(b.url, "B", "tb")
        b.add_peer(a.url, "A", "ta")
        cli = support.make_client(rd, a.url, "foo")
        wait_for(lambda: b.route("foo") == "A", TIMEOUT, "B to learn foo from A")

        # A connection through a peer that goes away: EOF, "tunnel disconnect".
        sock = b.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
        sock.settimeout(TIMEOUT)
        sock.sendall(b"via A")
        assert recv_exact(sock, 5) == b"via A"
        a.close()
        assert sock.recv(1) == b""
        assert sock.tunnel_error == "tunnel disconnect"
        sock.close()

        # The peer down: the key is gone, and a dial says so at once.
        wait_for(lambda: b.route("foo") is None, TIMEOUT, "B to drop foo")
        with pytest.raises(rd.ClientNotFoundError, match="failed to find Session for client foo"):
            b.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)

        # A wrong token: C's link to B is refused, and says why.
        b.add_peer(c.url, "C", "not-tc")
        c.add_peer(b.url, "B", "tb")
        wait_for(lambda: c.peers()[0]["last_error"], TIMEOUT, "C's first attempt")
        p = c.peers()[0]
        assert (p["id"], p["state"]) == ("B", "waiting")
        assert p["last_error"] == "websocket: bad handshake (HTTP 401: failed authentication)"
        support.check_balanced(b)
    finally:
        if cli is not None:
            cli.close()
        for s in (a, b, c):
            s.close()
    support.wait_engine_idle(rd)
