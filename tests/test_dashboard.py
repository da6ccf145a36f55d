"""The probes (/healthz, /readyz), /debug/state, the dashboard's actions and
its page, against real servers and agents: connections held open through
the tunnel, counters read back from the server, HTTP from Python, curl, a
client in another network namespace and a headless Chromium driven over the
DevTools protocol."""

import asyncio
import base64
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import support
from support import (ADD_CONN, REMOVE_CONN, REMOVE_SESSION, TIMEOUT, cli_server, family, get,
                     make_client, recv_until_eof, wait_for)

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "admin", "s3cret pass:word"
TOKEN = "dashboard-token-" + secrets.token_hex(8)


def basic(user=USER, password=PASSWORD):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def state(port, query="", headers=None):
    status, body, _ = get(port, "/debug/state" + query, headers=headers)
    assert status == 200, body
    return json.loads(body)


def post(port, path, headers=None):
    status, body, _ = get(port, path, method="POST", headers=headers)
    return status, json.loads(body)


class Backlog:
    """A loopback listener that never accepts: connections to it complete in
    the kernel's accept queue and stay open, without a thread apiece."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.sock.close()


@contextmanager
def dashboard(rd, *keys, **options):
    """A started Server(dashboard=True, **options) with one connected agent
    per key. At the end: counters balanced, nothing open in the engine."""
    srv = rd.Server(listen=options.pop("listen", "127.0.0.1:0"), dashboard=True, **options)
    clients = []
    try:
        srv.start()
        for k in keys:
            clients.append(make_client(rd, srv.url.replace("0.0.0.0", "127.0.0.1"), k))
            wait_for(lambda k=k: srv.has_session(k), TIMEOUT, f"a session for {k}")
        yield srv, clients
        support.check_balanced(srv)
    finally:
        for c in clients:
            c.close()
        srv.close()
    support.wait_engine_idle(rd)


def hold(srv, key, address, n, payload=b"x"):
    """n connections through key to address, each having sent payload."""
    socks = []
    for _ in range(n):
        s = srv.dial(key, "tcp", address, timeout=TIMEOUT)
        s.settimeout(TIMEOUT)
        if payload:
            s.sendall(payload)
        socks.append(s)
    return socks


# ---------------------------------------------------------------------------
# probes


def test_healthz_and_readyz_always_served(rd, tunnel_leak_check):
    with rd.Server(listen="127.0.0.1:0", metrics_route=False, proxy_route=False) as srv:
        assert get(srv.port, "/healthz")[:2] == (200, b"ok\n")
        assert get(srv.port, "/readyz")[:2] == (200, b"ok\n")
        # The dashboard's routes are not served without it.
        assert get(srv.port, "/debug/state")[0] == 404
        assert get(srv.port, "/ui/")[0] == 404


def test_readyz_waits_for_every_peer(rd, tunnel_leak_check):
    a = rd.Server("127.0.0.1:0", peer_id="A", peer_token="token-a").start()
    b = rd.Server("127.0.0.1:0", peer_id="B", peer_token="token-b").start()
    try:
        # A links to B, but B does not know A yet: A's link is refused.
        a.add_peer(b.url, "B", "token-b")
        status, body, _ = get(a.port, "/readyz")
        assert status == 503
        assert body.startswith(b"peer B not connected ("), body
        assert get(b.port, "/readyz")[0] == 200  # B has no peer configured
        b.add_peer(a.url, "A", "token-a")
        wait_for(lambda: get(a.port, "/readyz")[0] == 200, TIMEOUT, "A ready")
        wait_for(lambda: get(b.port, "/readyz")[0] == 200, TIMEOUT, "B ready")
        assert get(a.port, "/healthz")[:2] == (200, b"ok\n")
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# /debug/state


def test_state_reports_agents_keys_and_connections(rd, tunnel_leak_check, echo_server):
    with dashboard(rd, "agent-1", "agent-2") as (srv, clients):
        one = hold(srv, "agent-1", echo_server.address, 3, b"hello")
        two = hold(srv, "agent-2", echo_server.address, 2, b"hi")
        for s in one:
            assert support.recv_exact(s, 5) == b"hello"
        for s in two:
            assert support.recv_exact(s, 2) == b"hi"
        # One more for agent-2, ended: its key's removed counts it.
        gone = hold(srv, "agent-2", echo_server.address, 1, None)[0]
        gone.close()
        wait_for(lambda: state(srv.port)["totals"]["connections"] == 5, TIMEOUT, "5 open")

        st = state(srv.port)
        assert abs(st["time"] - time.time()) < 60
        t = st["totals"]
        assert (t["sessions"], t["connections"]) == (2, 5)
        assert (t["connections_added"], t["connections_removed"]) == (6, 1)
        assert t["heap_bytes"] > 0 and t["tx_bytes"] > 0 and t["rx_bytes"] > 0
        m = srv.metrics()
        assert t["connections_added"] == sum(family(m, ADD_CONN).values())
        assert t["connections_removed"] == sum(family(m, REMOVE_CONN).values())

        agents = {a["clientkey"]: a for a in st["agents"]}
        assert set(agents) == {"agent-1", "agent-2"}
        a1, a2 = agents["agent-1"], agents["agent-2"]
        assert a1["peer"] is False and a1["remote"].startswith("127.0.0.1:")
        assert a1["session_key"].isdigit() and a1["session_key"] != a2["session_key"]
        assert 0 <= a1["connected_seconds"] < 120 and abs(a1["since"] - time.time()) < 120
        assert (a1["connections"], a1["connections_added"], a1["connections_removed"]) == (3, 3, 0)
        assert (a2["connections"], a2["connections_added"], a2["connections_removed"]) == (2, 3, 1)
        assert (a1["tx_bytes"], a1["rx_bytes"]) == (15, 15)
        assert (a2["tx_bytes"], a2["rx_bytes"]) == (4, 4)

        keys = {k["clientkey"]: k for k in st["keys"]}
        assert keys["agent-1"] == {"clientkey": "agent-1", "sessions": 1, "connections": 3,
                                   "connections_added": 3, "connections_removed": 0}
        assert keys["agent-2"]["connections_added"] - keys["agent-2"]["connections_removed"] == 2

        conns = st["connections"]
        assert (conns["total"], conns["offset"], conns["limit"], conns["sort"]) == (5, 0, 200, "age")
        row = conns["rows"][0]
        assert set(row) == {"session_key", "id", "clientkey", "proto", "address", "age", "idle",
                            "state", "tx_bytes", "rx_bytes", "paused", "buffered"}
        assert (row["proto"], row["address"], row["state"]) == ("tcp", echo_server.address, "open")
        assert {r["session_key"] for r in conns["rows"] if r["clientkey"] == "agent-1"} \
            == {a1["session_key"]}
        # Oldest first by default.
        ages = [r["age"] for r in conns["rows"]]
        assert ages == sorted(ages, reverse=True)

        by_key = state(srv.port, "?sort=key")["connections"]["rows"]
        assert [r["clientkey"] for r in by_key] == ["agent-1"] * 3 + ["agent-2"] * 2
        desc = state(srv.port, "?sort=key&order=desc")["connections"]["rows"]
        assert [r["clientkey"] for r in desc] == ["agent-2"] * 2 + ["agent-1"] * 3
        f = state(srv.port, "?filter=agent-2")["connections"]
        assert f["total"] == 2 and {r["clientkey"] for r in f["rows"]} == {"agent-2"}
        assert state(srv.port, "?filter=no-such")["connections"]["total"] == 0
        by_bytes = state(srv.port, "?sort=bytes&limit=3")["connections"]["rows"]
        assert [r["tx_bytes"] for r in by_bytes] == [5, 5, 5]
        for bad in ("?sort=size", "?limit=-1", "?offset=x", "?order=up", "?filter=%zz"):
            status, body, _ = get(srv.port, "/debug/state" + bad)
            assert status == 400 and "error" in json.loads(body), bad
        for s in one + two:
            s.close()
        # Per key, the cumulative counts stay while the key has a session.
        wait_for(lambda: state(srv.port)["totals"]["connections"] == 0, TIMEOUT, "all closed")
        keys = {k["clientkey"]: k for k in state(srv.port)["keys"]}
        assert (keys["agent-2"]["connections_added"], keys["agent-2"]["connections_removed"]) \
            == (3, 3)


def test_state_pages_2000_connections(rd, tunnel_leak_check):
    n = 2000
    # Three descriptors a connection here: the dialed pair's two ends and
    # the agent's TCP socket (conftest raises the soft limit to the hard one).
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit < 3 * n + 500:
        pytest.skip(f"needs {3 * n + 500} descriptors, the limit is {limit}")
    backlog = Backlog()
    try:
        with dashboard(rd, "agent-1") as (srv, _):
            socks = hold(srv, "agent-1", backlog.address, n, None)
            try:
                wait_for(lambda: state(srv.port, "?limit=0")["connections"]["total"] == n,
                         TIMEOUT, f"{n} open")
                seen = []
                started = time.monotonic()
                for offset in range(0, n, 700):
                    page = state(srv.port, f"?offset={offset}&limit=700&sort=key")
                    c = page["connections"]
                    assert c["total"] == n and c["offset"] == offset
                    seen += [(r["session_key"], r["id"]) for r in c["rows"]]
                elapsed = time.monotonic() - started
                assert len(seen) == n and len(set(seen)) == n
                ids = [i for _, i in seen]
                assert ids == sorted(ids)  # one key: by key, then id
                assert elapsed < 10, f"paging {n} connections took {elapsed:.1f}s"
                st = state(srv.port, "?limit=5000&sort=idle")
                assert len(st["connections"]["rows"]) == 1000  # limit caps at 1000
                idle = [r["idle"] for r in st["connections"]["rows"]]
                assert idle == sorted(idle, reverse=True)
                assert st["connections"]["rows"][0]["clientkey"] == "agent-1"
                assert state(srv.port, f"?offset={n}")["connections"]["rows"] == []
                assert st["keys"][0]["connections_added"] == n
            finally:
                for s in socks:
                    s.close()
    finally:
        backlog.close()


# ---------------------------------------------------------------------------
# actions


def test_close_one_connection(rd, tunnel_leak_check, echo_server):
    with dashboard(rd, "agent-1") as (srv, _):
        socks = hold(srv, "agent-1", echo_server.address, 3, b"ping")
        for s in socks:
            assert support.recv_exact(s, 4) == b"ping"
        rows = state(srv.port, "?sort=age")["connections"]["rows"]
        victim = next(r for r in rows if r["id"] == socks[1].conn_id)
        status, body = post(srv.port,
                            f"/debug/close?session={victim['session_key']}&id={victim['id']}")
        assert status == 200 and body == {"closed": {"session_key": victim["session_key"],
                                                     "id": victim["id"]}}
        # Its local end hears the end, with why; the others carry on.
        assert recv_until_eof(socks[1]) == b""
        assert socks[1].tunnel_error == "closed from the dashboard"
        support.round_trip(socks[0], b"still here")
        support.round_trip(socks[2], b"still here")
        wait_for(lambda: state(srv.port)["totals"]["connections"] == 2, TIMEOUT, "2 open")
        t = state(srv.port)["totals"]
        assert t["connections_added"] - t["connections_removed"] == 2
        m = srv.metrics()
        assert sum(family(m, ADD_CONN).values()) - sum(family(m, REMOVE_CONN).values()) == 2
        # The same again, or one that never was: 404 with a JSON error.
        assert post(srv.port, f"/debug/close?session={victim['session_key']}"
                              f"&id={victim['id']}") == (404, {"error": "no such connection"})
        assert post(srv.port, "/debug/close?session=1&id=1")[0] == 404
        assert post(srv.port, "/debug/close?id=1")[0] == 400
        status, body, resp = get(srv.port, "/debug/close?session=1&id=1")
        assert status == 405 and resp.getheader("Allow") == "POST"
        socks[1].close()
        for s in (socks[0], socks[2]):
            s.close()


def test_disconnect_an_agent(rd, tunnel_leak_check, echo_server):
    with dashboard(rd, "agent-1", "agent-2") as (srv, clients):
        sock = hold(srv, "agent-2", echo_server.address, 1)[0]
        assert post(srv.port, "/debug/disconnect?key=agent-2") == (200, {"disconnected": 1})
        assert recv_until_eof(sock) in (b"", b"x")
        sock.close()
        m = srv.metrics()
        removed = family(m, REMOVE_SESSION)
        assert removed.get(support.key(clientkey="agent-2", peer="false")) == 1
        assert srv.has_session("agent-1")
        assert post(srv.port, "/debug/disconnect?key=nobody") == \
            (404, {"error": "no session for that client key"})
        assert post(srv.port, "/debug/disconnect")[0] == 400
        # The agent comes back on its own (it reconnects).
        wait_for(lambda: srv.has_session("agent-2"), TIMEOUT, "agent-2 back")


# ---------------------------------------------------------------------------
# auth


def test_basic_auth(rd, tunnel_leak_check):
    with dashboard(rd, dashboard_user=USER, dashboard_password=PASSWORD) as (srv, _):
        for path in ("/ui/", "/debug/state"):
            status, _, resp = get(srv.port, path)
            assert status == 401
            assert resp.getheader("WWW-Authenticate") == 'Basic realm="remotedialer"'
            assert get(srv.port, path, headers=basic(password="wrong"))[0] == 401
            assert get(srv.port, path, headers=basic(user="root"))[0] == 401
            assert get(srv.port, path, headers={"Authorization": "Bearer " + TOKEN})[0] == 401
            assert get(srv.port, path, headers=basic())[0] == 200
        status, body, resp = get(srv.port, "/ui/", headers=basic())
        assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
        assert body == (ROOT / "remotedialer_py" / "dashboard" / "index.html").read_bytes()
        # The actions need the credential too (before anything else).
        assert post(srv.port, "/debug/disconnect?key=x")[0] == 401
        assert post(srv.port, "/debug/disconnect?key=x", headers=basic())[0] == 404
        # The probes never ask.
        assert get(srv.port, "/healthz")[0] == 200 and get(srv.port, "/readyz")[0] == 200
        status, _, resp = get(srv.port, "/ui")
        assert status == 301 and resp.getheader("Location") == "/ui/"


def test_password_file_and_bad_credentials(rd, tunnel_leak_check, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    with dashboard(rd, dashboard_user=USER, dashboard_password_file=pw) as (srv, _):
        assert get(srv.port, "/debug/state", headers=basic())[0] == 200
    with pytest.raises(ValueError, match="dashboard_user needs dashboard_password"):
        rd.Server(dashboard_user=USER)
    with pytest.raises(ValueError, match="exclude each other"):
        rd.Server(dashboard_user=USER, dashboard_password="x", dashboard_password_file=pw)
    with pytest.raises(ValueError, match="without ':'"):
        rd.Server(dashboard_user="a:b", dashboard_password="x")
    with pytest.raises(ValueError, match="dashboard_password_file"):
        rd.Server(dashboard_user=USER, dashboard_password_file=tmp_path / "missing")


def test_bearer_token_of_the_token_table(rd, tunnel_leak_check):
    auth = rd.TokenAuthorizer(tokens={TOKEN: "agent-1"})
    with dashboard(rd, authorizer=auth) as (srv, _):
        assert get(srv.port, "/debug/state")[0] == 401  # loopback is not enough now
        assert get(srv.port, "/debug/state",
                   headers={"Authorization": "Bearer " + TOKEN + "x"})[0] == 401
        st = state(srv.port, headers={"Authorization": "Bearer " + TOKEN})
        assert st["totals"]["sessions"] == 0
    with dashboard(rd, authorizer=auth, dashboard_user=USER, dashboard_password=PASSWORD) \
            as (srv, _):
        assert get(srv.port, "/ui/", headers={"Authorization": "Bearer " + TOKEN})[0] == 200
        assert get(srv.port, "/ui/", headers=basic())[0] == 200


def test_debug_route_serves_state(rd, tunnel_leak_check):
    with rd.Server(listen="127.0.0.1:0", debug_route=True) as srv:
        assert state(srv.port)["totals"]["sessions"] == 0
        assert get(srv.port, "/ui/")[0] == 404  # the page needs dashboard=True
        assert get(srv.port, "/debug/disconnect?key=x", method="POST")[0] == 404  # and actions
    with rd.Server(listen="127.0.0.1:0", debug_route=True, dashboard_user=USER,
                   dashboard_password=PASSWORD) as srv:
        assert get(srv.port, "/debug/state")[0] == 401
        assert get(srv.port, "/debug/state", headers=basic())[0] == 200


def test_no_credential_any_loopback_address(rd, tunnel_leak_check):
    with dashboard(rd, "agent-1", listen="0.0.0.0:0") as (srv, _):
        for host in ("127.0.0.1", "127.0.0.2"):
            with socket.create_connection((host, srv.port), timeout=TIMEOUT) as s:
                s.sendall(b"GET /debug/state HTTP/1.1\r\nHost: x\r\n\r\n")
                head = support.recv_until_eof(s).split(b"\r\n", 1)[0]
            assert head == b"HTTP/1.1 200 OK", (host, head)


def _netns_unavailable():
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    return None


def _ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def test_no_credential_refuses_other_addresses(rd, run_cli):
    """A CLI server in one namespace, a client in another over a veth pair:
    without a credential the dashboard refuses it (403), loopback gets 200."""
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    stem = f"rddash-{os.getpid()}-{secrets.token_hex(3)}"
    ns_srv, ns_cli = f"{stem}-s", f"{stem}-c"
    subnet = f"10.78.{secrets.randbelow(250) + 1}"
    made = []
    try:
        for ns in (ns_srv, ns_cli):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns_srv, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", ns_cli)
        for ns, host in ((ns_srv, 1), (ns_cli, 2)):
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        proc = run_cli("server", "--listen", "0.0.0.0:8123", "--dashboard",
                       prefix=("ip", "netns", "exec", ns_srv))
        proc.wait_line(r"dashboard at http://\S+/ui/")

        def fetch(ns, host):
            code = ("import urllib.request, urllib.error, sys\n"
                    "try:\n"
                    f"    r = urllib.request.urlopen('http://{host}:8123/debug/state', timeout=10)\n"
                    "    print(r.status)\n"
                    "except urllib.error.HTTPError as e:\n"
                    "    print(e.code, e.read().decode())\n")
            r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                               capture_output=True, text=True, timeout=TIMEOUT)
            return r.stdout.strip() or r.stderr

        wait_for(lambda: fetch(ns_srv, "127.0.0.1") == "200", TIMEOUT, "loopback answered")
        out = fetch(ns_cli, f"{subnet}.1")
        assert out.startswith("403 ") and "loopback clients only" in out, out
        assert fetch(ns_srv, f"{subnet}.1").startswith("403 ")  # its own non-loopback address
    finally:
        for ns in reversed(made):
            try:
                _ip("netns", "del", ns)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# the CLI, with curl


def test_cli_dashboard_with_curl(rd, run_cli, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    proc, port = cli_server(run_cli, "--dashboard", "--dashboard-user", USER,
                            "--dashboard-password-file", pw)
    proc.wait_line(rf"dashboard at http://127\.0\.0\.1:{port}/ui/")
    base = f"http://127.0.0.1:{port}"

    def run(*args):
        r = subprocess.run([curl, "-s", "-o", "-", "-w", "\\n%{http_code}", *args],
                           capture_output=True, text=True, timeout=TIMEOUT)
        body, _, code = r.stdout.rpartition("\n")
        return int(code), body

    assert run(base + "/healthz") == (200, "ok\n")
    assert run(base + "/readyz") == (200, "ok\n")
    assert run(base + "/ui/")[0] == 401
    code, page = run("-u", f"{USER}:{PASSWORD}", "-L", base + "/ui")
    assert code == 200 and "<canvas" in page and "/debug/state" in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    code, body = run("-u", f"{USER}:{PASSWORD}", base + "/debug/state?limit=1")
    assert code == 200 and json.loads(body)["connections"]["limit"] == 1
    code, body = run("-u", f"{USER}:{PASSWORD}", "-X", "POST",
                     base + "/debug/disconnect?key=nobody")
    assert code == 404 and json.loads(body)["error"]
    r = subprocess.run([sys.executable, "-m", "remotedialer_py", "server", "--dashboard-user",
                        USER], capture_output=True, text=True, timeout=TIMEOUT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "--dashboard-password-file" in r.stderr


# ---------------------------------------------------------------------------
# a real browser


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """One page of a headless Chromium over the DevTools protocol."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method, **params):
        self.next_id += 1
        mid = self.next_id
        await self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expr):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_polls(self, n):
        """Waits until the page has polled n more times (its history grew)."""
        start = await self.eval("history.length")
        await self.wait(f"history.length >= {start + n}", f"{n} polls")

    async def wait(self, expr, what):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if await self.eval(expr):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def chromium_session():
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="rd-chromium-")
    proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().count("\n") >= 1,
                 60, "chromium's DevTools port")
        port = int(port_file.read_text().split("\n")[0])
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def test_browser_shows_connections_and_closes_one(rd, tunnel_leak_check, echo_server):
    websockets = pytest.importorskip("websockets")
    import urllib.request

    with chromium_session() as devport, dashboard(rd, "agent-1") as (srv, _):
        socks = hold(srv, "agent-1", echo_server.address, 5, b"hello")
        for s in socks:
            assert support.recv_exact(s, 5) == b"hello"
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devport}/json/list",
                                                   timeout=TIMEOUT))
        page = next(t for t in targets if t["type"] == "page")

        async def drive():
            async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                dt = DevTools(ws)
                await dt.call("Page.enable")
                await dt.call("Page.navigate", url=f"http://127.0.0.1:{srv.port}/ui/")
                await dt.wait("document.querySelectorAll('#conns tbody tr').length === 5 && "
                              "[...document.querySelectorAll('#keys tbody tr')].some(tr => "
                              "tr.dataset.key === 'agent-1' && "
                              "tr.querySelector('.diff').textContent.trim() === '5')",
                              "5 connections under agent-1, difference 5")
                keys = await dt.eval("[...document.querySelectorAll('#conns tbody tr')]"
                                     ".map(tr => tr.cells[0].textContent)")
                assert keys == ["agent-1"] * 5
                # Select the key for its chart, then churn: three more
                # connections, one a poll, then closed again, one a poll.
                await dt.eval("document.querySelector('#keys tr[data-key=\"agent-1\"]').click()")
                extra = []
                for step in range(6):
                    if step < 3:
                        extra += hold(srv, "agent-1", echo_server.address, 1, None)
                    else:
                        extra.pop().close()
                    await dt.wait_polls(2)
                await dt.wait("document.querySelectorAll('#conns tbody tr').length === 5",
                              "the extra connections gone")
                shot = await dt.call("Page.captureScreenshot", format="png")
                victim = await dt.eval(
                    "(() => { const tr = document.querySelector('#conns tbody tr');"
                    " const id = tr.dataset.id; tr.querySelector('button.close').click();"
                    " return Number(id); })()")
                await dt.wait("document.querySelectorAll('#conns tbody tr').length === 4 && "
                              "document.querySelector('#keys .diff').textContent.trim() === '4'",
                              "4 connections left, difference 4")
                return base64.b64decode(shot["data"]), victim

        png, victim = asyncio.run(drive())
        closed = next(s for s in socks if s.conn_id == victim)
        assert recv_until_eof(closed) == b""
        assert closed.tunnel_error == "closed from the dashboard"
        t = state(srv.port)["totals"]
        assert (t["connections_added"], t["connections_removed"]) == (8, 4)
        assert png.startswith(b"\x89PNG")
        out = os.environ.get("RD_DASHBOARD_SCREENSHOT")
        if out:  # how docs/dashboard.png is made
            Path(out).write_bytes(png)
        for s in socks:
            s.close()
