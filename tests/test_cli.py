"""The command line: server and client as subprocesses, and requests through
the server's /client/{id}/{scheme}/{host}/{path} route with curl and
http.client. The server's /metrics must balance at the end of each test."""

import hashlib
import json
import shutil
import socket
import subprocess
import urllib.parse

import pytest

import support
from support import (ADD_CONN, AGENT_KEY, REMOVE_CONN, TIMEOUT, cli_server, get, key,
                     recv_exact, served_metrics, wait_agent, wait_for, wait_served_balanced)


@pytest.fixture
def cli_pair(run_cli):
    """A CLI server and a CLI client (id "foo") connected to it."""
    server, port = cli_server(run_cli)
    client = run_cli("client", "--connect", f"ws://127.0.0.1:{port}/connect", "--id", "foo",
                     ready=None)
    wait_agent(port, "foo")
    yield port
    wait_served_balanced(port)
    assert server.proc.poll() is None and client.proc.poll() is None, "a CLI process died"


def test_route_with_http_client(cli_pair, http_service):
    port = cli_pair
    base = f"/client/foo/http/127.0.0.1:{http_service.port}"
    status, body, _ = get(port, f"{base}/hello")
    assert (status, body) == (200, http_service.HELLO)
    status, body, _ = get(port, f"{base}/large")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == http_service.large_sha256
    status, body, _ = get(port, f"{base}/hello?timeout=15")
    assert (status, body) == (200, http_service.HELLO)
    status, body, _ = get(port, f"{base}/status/404")
    assert status == 404
    payload = bytes(range(256)) * 4096  # 1 MiB
    status, body, _ = get(port, f"{base}/echo", method="POST", body=payload,
                          headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and body == payload
    m = wait_served_balanced(port)
    label = key(addr=http_service.address, clientkey="foo", proto="tcp")
    # One tunneled connection per request: the service closes each one.
    assert m[ADD_CONN][label] == m[REMOVE_CONN][label] == 5
    # The route forwards the path; ?timeout= is the route's own parameter.
    assert [(r[0], urllib.parse.urlsplit(r[1]).path) for r in http_service.requests] == [
        ("GET", "/hello"), ("GET", "/large"), ("GET", "/hello"), ("GET", "/status/404"),
        ("POST", "/echo")]
    assert http_service.requests[-1][3] == len(payload)


def test_route_with_curl(cli_pair, http_service, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    port = cli_pair
    base = f"http://127.0.0.1:{port}/client/foo/http/127.0.0.1:{http_service.port}"

    def run(*args):
        out = tmp_path / "body"
        r = subprocess.run([curl, "-sS", "--max-time", str(int(TIMEOUT)), "-o", str(out),
                            "-w", "%{http_code}", *args], capture_output=True, text=True,
                           timeout=TIMEOUT + 10)
        assert r.returncode == 0, r.stderr
        return int(r.stdout), out.read_bytes()

    assert run(f"{base}/hello") == (200, http_service.HELLO)
    assert run(f"{base}/hello?timeout=5") == (200, http_service.HELLO)
    status, body = run(f"{base}/large")
    assert status == 200 and hashlib.sha256(body).hexdigest() == http_service.large_sha256
    upload = tmp_path / "upload"
    upload.write_bytes(b"posted by curl\n" * 1000)
    assert run("--data-binary", f"@{upload}", f"{base}/echo") == (200, upload.read_bytes())
    m = wait_served_balanced(port)
    label = key(addr=http_service.address, clientkey="foo", proto="tcp")
    assert m[ADD_CONN][label] == 4


def test_route_unknown_client(cli_pair, http_service):
    port = cli_pair
    status, body, _ = get(port, f"/client/nope/http/127.0.0.1:{http_service.port}/hello")
    assert status == 500
    assert b"failed to find Session for client nope" in body
    m = served_metrics(port)
    assert not [k for k in support.family(m, ADD_CONN) if ("clientkey", "nope") in k]


def test_route_refused_dial(cli_pair):
    port = cli_pair
    closed = support.closed_port()
    status, body, _ = get(port, f"/client/foo/http/127.0.0.1:{closed}/x")
    assert status == 500
    assert f"dial tcp 127.0.0.1:{closed}: connect: connection refused".encode() in body
    m = wait_served_balanced(port)
    label = key(addr=f"127.0.0.1:{closed}", clientkey="foo", proto="tcp")
    assert m[ADD_CONN][label] == m[REMOVE_CONN][label] == 1


def test_cli_client_with_in_process_server(rd, tunnel_leak_check, run_cli, echo_server):
    with rd.Server(listen="127.0.0.1:0") as srv:
        agent = run_cli("client", "-connect", srv.url, "-id", AGENT_KEY, ready=None)
        wait_for(lambda: srv.has_session(AGENT_KEY), 60, "the CLI agent's session")
        s = srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
        s.settimeout(TIMEOUT)
        s.sendall(b"through the CLI agent")
        assert recv_exact(s, 21) == b"through the CLI agent"
        s.close()
        support.check_balanced(srv)
        assert agent.stop() == 0, agent.output
        wait_for(lambda: not srv.has_session(AGENT_KEY), TIMEOUT, "the agent to leave")
        support.check_balanced(srv, sessions=True)
    support.wait_engine_idle(rd)


def test_in_process_client_with_cli_server(rd, tunnel_leak_check, run_cli, http_service):
    server, port = cli_server(run_cli, "-debug")
    with rd.Client(f"ws://127.0.0.1:{port}/connect", headers={"X-Tunnel-ID": "inproc"}) as cli:
        cli.wait_connected(timeout=TIMEOUT)
        wait_agent(port, "inproc")
        status, body, _ = get(port, f"/client/inproc/http/127.0.0.1:{http_service.port}/hello")
        assert (status, body) == (200, http_service.HELLO)
        wait_served_balanced(port)
        support.check_balanced(cli)
    assert server.stop() == 0, server.output
    support.wait_engine_idle(rd)


def test_go_style_flags(run_cli):
    server = run_cli("server", "-listen", "127.0.0.1:0", "-id", "one", "-token", "secret",
                     "-debug=false", ready=r"listening")
    m = server.wait_line(r"listening on (ws://\S+)")
    port = urllib.parse.urlsplit(m.group(1)).port
    assert served_metrics(port) is not None
    assert server.stop() == 0, server.output


def test_server_port_in_use(run_cli):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = run_cli("server", "--listen", f"127.0.0.1:{port}", ready=None)
        rc = proc.wait_exit(TIMEOUT)
    assert rc != 0
    assert "address already in use" in proc.output


def test_help_names_the_subcommands(run_cli):
    proc = run_cli("--help", ready=None)
    assert proc.wait_exit(TIMEOUT) == 0, proc.output
    for word in ("server", "client", "demo"):
        assert word in proc.output


def test_server_prints_its_peers_and_warns_about_skipped_items(run_cli):
    closed = support.closed_port()
    url = f"ws://127.0.0.1:{closed}/connect"
    server = run_cli("server", "-listen", "127.0.0.1:0", "-id", "a", "-token", "ta",
                     "-peers", f"junk, b:tb:{url},", "--debug-connections", ready=r"listening")
    server.wait_line(rf"added peer b at {url}")
    assert "warning: -peers: skipping 'junk'" in server.output
    assert "HA group: this server is a" in server.output
    # The link to b is refused; the reason shows in the log and /debug/peers.
    server.wait_line(r"peer b: cannot connect to .*connection refused")
    port = urllib.parse.urlsplit(server.wait_line(r"listening on (ws://\S+)").group(1)).port
    status, body, _ = get(port, "/debug/peers")
    assert status == 200
    doc = json.loads(body)
    assert doc["peer_id"] == "a"
    assert [(p["id"], p["url"]) for p in doc["peers"]] == [("b", url)]
    assert server.stop() == 0, server.output


def test_server_peers_without_id_exits_2(run_cli):
    proc = run_cli("server", "-peers", "b:tb:ws://127.0.0.1:1/connect", ready=None)
    assert proc.wait_exit(TIMEOUT) == 2
    assert "--id" in proc.output and "--token" in proc.output


def test_status_of_a_running_server(run_cli, silent_backend):
    srv = run_cli("server", "--listen", "127.0.0.1:0", "--debug-connections")
    url = srv.wait_line(r"listening on (ws://\S+)").group(1)
    agent = run_cli("client", "--connect", url, "-id", "status-agent", ready=None)
    agent.wait_line(r"connected to .* as status-agent")
    import subprocess
    import sys

    def status(*args):
        return subprocess.run([sys.executable, "-m", "remotedialer_py", "status", *args],
                              capture_output=True, text=True, timeout=60)

    with socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0]))) as s:
        s.sendall(f"GET /client/status-agent/http/{silent_backend.address}/x HTTP/1.1\r\n"
                  "Host: x\r\n\r\n".encode())
        silent_backend.wait_accepted(1)  # the request reached it; it never answers
        r = status(url)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "status-agent: 1, 0, 1" in r.stdout  # the request's connection, open
        assert "sessions open: 1 agent, 0 peer" in r.stdout
        assert "session status-agent #" in r.stdout
        assert f"tcp/{silent_backend.address}" in r.stdout
    support.wait_for(lambda: "status-agent: 1, 1, 0" in status(url).stdout,
                     what="the connection to end")
    r = status(url.replace("ws://", "http://").rsplit("/", 1)[0])
    assert r.returncode == 0 and "status-agent: 1, 1, 0" in r.stdout, r.stdout
    assert status("ftp://x").returncode == 2
    assert agent.stop() == 0 and srv.stop() == 0


def test_status_without_the_debug_route(run_cli):
    import subprocess
    import sys
    srv = run_cli("server", "--listen", "127.0.0.1:0")
    url = srv.wait_line(r"listening on (ws://\S+)").group(1)
    r = subprocess.run([sys.executable, "-m", "remotedialer_py", "status", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "start the server with --debug-connections" in r.stdout
    assert srv.stop() == 0


def test_status_flags_counters_that_do_not_balance(capsys):
    # A scrape where added - removed is not what is open for a key: the
    # Rancher v2.11.0 pattern. status marks it and exits 1.
    import http.server
    import threading
    from remotedialer_py import status as status_mod

    text = ('session_server_total_add_connections{addr="a",clientkey="leaky",proto="tcp"} 3\n'
            'session_server_total_remove_connections{addr="a",clientkey="leaky",proto="tcp"} 1\n'
            'remotedialer_open_connections{clientkey="leaky"} 1\n'
            'remotedialer_open_sessions{peer="false"} 1\n')

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = text.encode() if self.path == "/metrics" else b"404 page not found\n"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        import io
        out = io.StringIO()
        assert status_mod.report(f"http://127.0.0.1:{httpd.server_port}", out) == 1
        assert "leaky: 3, 1, 1  <- added - removed != open" in out.getvalue()
    finally:
        httpd.shutdown()
        httpd.server_close()
