"""Agents behind an HTTP proxy, end to end through a real one: Debian's
tinyproxy, started by each test on a free loopback port with its own
configuration (which ports CONNECT may reach, Basic credentials), in the
foreground, its log read line by line.

Covered: a tunnel without and with credentials (percent-encoded), dials
through it, the proxy's log showing the CONNECT; a wrong password (407), a
port the proxy will not CONNECT to (403), a proxy that never answers
(handshake_timeout), the proxy killed under a live session (the session
ends, the agent retries and reports the refused dial to the proxy, and gets
back in once a proxy listens there again), wss:// through the tunnel, the
CLI's --proxy, and the environment: read at construction, ignored for a
loopback server (Go never proxies loopback), and followed end to end to a
server on one of this machine's own non-loopback addresses (skipped where it
has none). The environment's rules themselves are in test_proxy_env.py.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import support
from support import TIMEOUT, wait_for
from test_tls import pki  # noqa: F401 - the session's private PKI fixture

KEY = "proxied-agent"


class TinyProxy:
    """tinyproxy -d -c CONF on a free loopback port; lines of its log kept."""

    def __init__(self, directory, connect_ports, auth=None):
        self.exe = shutil.which("tinyproxy")
        if self.exe is None:
            pytest.skip("tinyproxy not installed (Debian package tinyproxy; make deps installs it)")
        self.dir = directory
        self.connect_ports = list(connect_ports)
        self.auth = auth
        self.lines = []
        self._cond = threading.Condition()
        self.proc = None
        self.port = None
        self.start()

    def start(self, port=None):
        """Starts it (on `port`, else a free one; a port another process
        took meanwhile is retried with another)."""
        for _ in range(5):
            self.port = port or support.closed_port()
            conf = self.dir / f"tinyproxy-{self.port}.conf"
            lines = [
                # As root it would switch to the user and group named here.
                *(["User root", "Group root"] if os.getuid() == 0 else []),
                f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "LogLevel Info",
                "MaxClients 64", "Allow 127.0.0.1",
                *(f"ConnectPort {p}" for p in self.connect_ports),
            ]
            if self.auth:
                lines.append(f"BasicAuth {self.auth[0]} {self.auth[1]}")
            conf.write_text("\n".join(lines) + "\n")
            with self._cond:
                self.lines = []
            self.proc = subprocess.Popen([self.exe, "-d", "-c", str(conf)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, bufsize=1,
                                         start_new_session=True)
            threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
            line = self.wait_log(r"Accepting connections|Could not create|Unable to|exit")
            if "Accepting connections" in line:
                return
            self.stop()
            if port is not None:
                raise AssertionError(f"tinyproxy could not listen on {port}: {line}")
        raise AssertionError(f"tinyproxy would not start: {self.log}")

    def _read(self, proc):
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        proc.stdout.close()
        with self._cond:
            self.lines.append("tinyproxy exit")
            self._cond.notify_all()

    @property
    def log(self):
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, pattern, timeout=TIMEOUT):
        """The first log line matching the regex (an event, waited for)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no /{pattern}/ in tinyproxy's log:\n{self.log}")
                self._cond.wait(left)

    def url(self, credentials=None):
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def kill(self):
        """SIGKILL by pid: its sockets close as a crash would close them."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.stop()

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(TIMEOUT)
        self.proc = None


@pytest.fixture
def tinyproxy(tmp_path):
    """Factory: tinyproxy(connect_ports, auth=None) -> a running TinyProxy."""
    started = []

    def start(connect_ports, auth=None):
        tp = TinyProxy(tmp_path, connect_ports, auth)
        started.append(tp)
        return tp

    yield start
    for tp in started:
        tp.stop()


def agent(rd, srv, proxy, **options):
    """A started Client of srv through `proxy`, with fast retries."""
    options.setdefault("backoff_min", 0.05)
    options.setdefault("backoff_max", 0.2)
    return rd.Client(srv.url, headers={"X-Tunnel-ID": KEY}, proxy=proxy, **options).start()


def connects_through(tp, srv, cli, echo_server):
    """The agent gets a session through the proxy and a dial works."""
    cli.wait_connected(TIMEOUT)
    assert cli.last_error is None
    wait_for(lambda: srv.has_session(KEY), TIMEOUT, "the agent's session")
    tp.wait_log(rf'CONNECT 127\.0\.0\.1:{srv.port} HTTP/1\.1')
    tp.wait_log(rf'Established connection to host "127\.0\.0\.1"')
    support.dial_round_trip(srv, KEY, echo_server.address, b"through the proxy")
    support.check_balanced(srv)
    support.check_balanced(cli)


def refused(tp, srv, status_line):
    return (f"proxyconnect tcp: proxy 127.0.0.1:{tp.port} refused CONNECT "
            f"127.0.0.1:{srv.port}: {status_line}")


def test_through_proxy_without_credentials(rd, tunnel_leak_check, tinyproxy, echo_server):
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        tp = tinyproxy([srv.port])
        with agent(rd, srv, tp.url()) as cli:
            assert cli.proxies == [tp.url()]
            connects_through(tp, srv, cli, echo_server)


def test_through_proxy_with_credentials(rd, tunnel_leak_check, tinyproxy, echo_server):
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        tp = tinyproxy([srv.port], auth=("agent", "s3cr3t"))
        # The userinfo is percent-decoded for the Basic credentials (the
        # characters that need it are ones tinyproxy's configuration does
        # not take: "%33" is a plain "3").
        with agent(rd, srv, tp.url("agent:s3cr%33t")) as cli:
            assert cli.proxies == [tp.url("agent:xxxxx")]
            connects_through(tp, srv, cli, echo_server)


@pytest.mark.parametrize("credentials", ["agent:wrong", None], ids=["wrong", "none"])
def test_proxy_wants_credentials(rd, tunnel_leak_check, tinyproxy, credentials):
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        tp = tinyproxy([srv.port], auth=("agent", "right"))
        with agent(rd, srv, tp.url(credentials)) as cli:
            error = wait_for(lambda: cli.last_error, TIMEOUT, "the agent's error")
            # Whatever status line the proxy sends is reported: 407, or 401
            # from tinyproxy before 1.11.2 (its issue #532).
            assert error in (refused(tp, srv, "HTTP/1.0 407 Proxy Authentication Required"),
                             refused(tp, srv, "HTTP/1.0 401 Unauthorized"))
            tp.wait_log(rf"Request .*: CONNECT 127\.0\.0\.1:{srv.port} HTTP/1\.1")
            assert not cli.connected and not srv.has_session(KEY)


def test_proxy_refuses_the_port(rd, tunnel_leak_check, tinyproxy):
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        tp = tinyproxy([srv.port + 1 if srv.port < 65535 else srv.port - 1])
        with agent(rd, srv, tp.url()) as cli:
            error = wait_for(lambda: cli.last_error, TIMEOUT, "the agent's error")
            assert error == refused(tp, srv, "HTTP/1.1 403 Access violation")
            assert not srv.has_session(KEY)


class FakeProxy:
    """A loopback listener that reads one request head per connection,
    keeps it, sends `answer` and closes: the proxy answers no real proxy
    gives on demand."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(TIMEOUT)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    self.requests.append(head)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        # shutdown() wakes the accept() in progress; close() alone would not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=p\r\n"
     b"Content-Length: 0\r\n\r\n", "refused CONNECT {target}: HTTP/1.1 407 Proxy Authentication Required"),
    (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "refused CONNECT {target}: HTTP/1.1 502 Bad Gateway"),
    (b"HTTP/1.1 201 Created\r\n\r\n", "refused CONNECT {target}: HTTP/1.1 201 Created"),
    (b"HTTP/1.1 407 \x1b[31mred\r\n\r\n", "malformed answer to CONNECT"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed answer to CONNECT"),
    (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 5000, "oversized answer to CONNECT"),
    (b"", "connection closed before answering CONNECT"),
], ids=["407", "502", "201", "control-chars", "not-http", "oversized", "eof"])
def test_proxy_answers(rd, tunnel_leak_check, answer, expected):
    """Each answer other than 200 fails the attempt, in words that name the
    proxy; the request carries the decoded credentials."""
    fake = FakeProxy(answer)
    try:
        with rd.Server(listen="127.0.0.1:0") as srv:
            srv.start()
            target = f"127.0.0.1:{srv.port}"
            with agent(rd, srv, f"http://us%40er:p%3Ass@127.0.0.1:{fake.port}/") as cli:
                error = wait_for(lambda: cli.last_error, TIMEOUT, "the agent's error")
                assert error == (f"proxyconnect tcp: proxy 127.0.0.1:{fake.port}"
                                 f"{'' if 'refused' in expected else ':'} "
                                 + expected.format(target=target))
                assert not srv.has_session(KEY)
            # base64("us@er:p:ss")
            assert fake.requests[0] == (f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                                        "Proxy-Authorization: Basic dXNAZXI6cDpzcw==\r\n\r\n"
                                        ).encode()
    finally:
        fake.close()


def test_user_without_password_sends_no_credentials(rd, tunnel_leak_check):
    """As Go's dialer: a user name alone is no Basic credential."""
    fake = FakeProxy(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    try:
        with rd.Server(listen="127.0.0.1:0") as srv:
            srv.start()
            with agent(rd, srv, f"http://someone@127.0.0.1:{fake.port}") as cli:
                wait_for(lambda: cli.last_error, TIMEOUT, "the agent's error")
            assert fake.requests[0] == (f"CONNECT 127.0.0.1:{srv.port} HTTP/1.1\r\n"
                                        f"Host: 127.0.0.1:{srv.port}\r\n\r\n").encode()
    finally:
        fake.close()


def test_proxy_that_never_answers(rd, tunnel_leak_check):
    """A proxy that accepts and stays silent: handshake_timeout ends the
    attempt, with the proxy named."""
    # The kernel completes the TCP handshake for the listen queue; nobody
    # ever reads or answers.
    with rd.Server(listen="127.0.0.1:0") as srv, \
            socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        srv.start()
        port = silent.getsockname()[1]
        with agent(rd, srv, f"http://127.0.0.1:{port}", handshake_timeout=0.3) as cli:
            error = wait_for(lambda: cli.last_error, TIMEOUT, "the agent's error")
            assert error == (f"proxyconnect tcp: proxy 127.0.0.1:{port} did not answer "
                             f"CONNECT in time")


def test_proxy_killed_mid_session(rd, tunnel_leak_check, tinyproxy, echo_server):
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        tp = tinyproxy([srv.port])
        with agent(rd, srv, tp.url()) as cli:
            connects_through(tp, srv, cli, echo_server)
            port = tp.port
            tp.kill()
            # The tunnel was the session's only way: it ends on both sides...
            wait_for(lambda: not srv.has_session(KEY), TIMEOUT, "the session to end")
            wait_for(lambda: not cli.connected, TIMEOUT, "the agent to notice")
            # ...and each retry is refused at the proxy's port.
            wait_for(lambda: cli.last_error == (
                f"proxyconnect tcp: dial tcp 127.0.0.1:{port}: connect: connection refused"),
                TIMEOUT, f"the refused dial to the proxy (last: {cli.last_error!r})")
            # A proxy back on that port: the agent is back without help.
            tp.start(port)
            connects_through(tp, srv, cli, echo_server)


def test_wss_through_proxy(rd, tunnel_leak_check, tinyproxy, pki, echo_server):
    with rd.Server(listen="127.0.0.1:0", tls_cert=pki.server.cert, tls_key=pki.server.key) as srv:
        srv.start()
        tp = tinyproxy([srv.port])
        with agent(rd, srv, tp.url(), ca_file=pki.root) as cli:
            connects_through(tp, srv, cli, echo_server)


def test_cli_client_proxy_flag(rd, run_cli, tinyproxy, echo_server):
    srv = run_cli("server", "--listen", "127.0.0.1:0")
    port = int(srv.wait_line(r"listening on ws://127\.0\.0\.1:(\d+)").group(1))
    tp = tinyproxy([port])
    run_cli("client", "--connect", f"ws://127.0.0.1:{port}/connect", "--id", KEY,
            "--proxy", tp.url(), ready=r"connected to ws://")
    tp.wait_log(rf"CONNECT 127\.0\.0\.1:{port} HTTP/1\.1")
    support.wait_agent(port, KEY)


def test_cli_client_bad_proxy(run_cli):
    p = run_cli("client", "--connect", "ws://127.0.0.1:1/connect", "--proxy",
                "socks5://u:pw@127.0.0.1:1080", ready=None)
    assert p.wait_exit() != 0
    assert "proxy: socks5:// proxies are not supported" in p.output
    assert "pw" not in p.output


def test_bad_proxy_argument_is_a_value_error(rd):
    with pytest.raises(ValueError, match=r"^proxy: invalid proxy URL 'http://u:xxxxx@h:70000'"):
        rd.Client("ws://127.0.0.1:1/connect", proxy="http://u:pw@h:70000")
    with pytest.raises(ValueError, match="proxy must be a str"):
        rd.Client("ws://127.0.0.1:1/connect", proxy=3128)
    with pytest.raises(TypeError, match="use the proxy= parameter"):
        rd.Client("ws://127.0.0.1:1/connect", proxies=["http://h:1"])


def test_environment_read_at_construction(rd, tunnel_leak_check, monkeypatch, tinyproxy):
    """The environment is read when the Client is made; a loopback server
    is reached directly even with a proxy set (as in Go), and proxy=
    overrides the environment either way."""
    with rd.Server(listen="127.0.0.1:0") as srv:
        srv.start()
        tp = tinyproxy([srv.port])
        monkeypatch.setenv("HTTP_PROXY", tp.url())
        monkeypatch.setenv("HTTPS_PROXY", "socks5://ignored-for-ws:1080")
        monkeypatch.delenv("REQUEST_METHOD", raising=False)
        direct = rd.Client(srv.url, headers={"X-Tunnel-ID": KEY})
        assert direct.proxies == [None]
        remote = rd.Client(["ws://tunnel.example:8123/c", "ws://10.0.0.1:8123/c"],
                           headers={"X-Tunnel-ID": KEY})
        assert remote.proxies == [tp.url(), tp.url()]
        monkeypatch.setenv("NO_PROXY", "10.0.0.0/8")
        assert rd.Client(remote.urls).proxies == [tp.url(), None]
        assert rd.Client(remote.urls, proxy="").proxies == [None, None]
        assert rd.Client(remote.urls, proxy=False).proxies == [None, None]
        with pytest.raises(ValueError, match="^HTTPS_PROXY: socks5:// proxies are not supported"):
            rd.Client("wss://tunnel.example/c")
        with direct.start():
            direct.wait_connected(TIMEOUT)
        assert not re.search(r"Request .*: CONNECT", tp.log)
        monkeypatch.setenv("REQUEST_METHOD", "GET")
        with pytest.raises(ValueError, match="refusing to use HTTP_PROXY value in CGI"):
            rd.Client(srv.url)


def own_address():
    """An IPv4 address of this machine that is not loopback, or None."""
    if shutil.which("ip") is None:
        return None
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, timeout=TIMEOUT).stdout
    found = re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out)
    return found[0] if found else None


def test_environment_proxy_end_to_end(rd, tunnel_leak_check, monkeypatch, tinyproxy, echo_server):
    """HTTP_PROXY from the environment carries an agent to a server on a
    non-loopback address of this machine; NO_PROXY naming that address
    sends it direct."""
    addr = own_address()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address on this machine (Go never proxies loopback)")
    with rd.Server(listen=f"{addr}:0") as srv:
        srv.start()
        tp = tinyproxy([srv.port])
        monkeypatch.delenv("REQUEST_METHOD", raising=False)
        monkeypatch.delenv("http_proxy", raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{tp.port}")
        monkeypatch.setenv("NO_PROXY", "")
        monkeypatch.setenv("no_proxy", "")
        with rd.Client(srv.url, headers={"X-Tunnel-ID": KEY}) as cli:
            assert cli.proxies == [tp.url()]
            cli.wait_connected(TIMEOUT)
            tp.wait_log(rf"Request .*: CONNECT {re.escape(addr)}:{srv.port} HTTP/1\.1")
            support.dial_round_trip(srv, KEY, echo_server.address, b"via the environment")
        wait_for(lambda: not srv.has_session(KEY), TIMEOUT, "the first session to end")
        monkeypatch.setenv("NO_PROXY", f"{addr}/32")
        with rd.Client(srv.url, headers={"X-Tunnel-ID": KEY}) as cli:
            assert cli.proxies == [None]
            cli.wait_connected(TIMEOUT)
        assert len(re.findall(r"Request .*: CONNECT", tp.log)) == 1
