"""udp tunneled connections, end to end on real sockets: the server's socket
is a SOCK_SEQPACKET one whose every send() is one datagram at the agent's
connected UDP socket and every recv() one datagram back; the agent ends a
flow on its idle timeout, on an ICMP port unreachable (Go's "read udp
...: connection refused") and on the far side's close. The `tunnel` fixture
checks at the end that counters balance, nothing stays open and no
descriptor leaked."""

import random
import re
import socket
import threading

import pytest

import support
from support import ADD_CONN, REMOVE_CONN, TIMEOUT, wait_for


class UdpEcho:
    """A UDP echo server on a loopback address (a thread): each datagram goes
    back as it came; `sizes` records what arrived, in order."""

    def __init__(self, host="127.0.0.1", family=socket.AF_INET):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.sizes = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            if peer is None:  # shut down
                return
            self.sizes.append(len(data))
            self.sock.sendto(data, peer)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes recvfrom (ENOTCONN all the same)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(TIMEOUT)


@pytest.fixture
def udp_echo():
    srv = UdpEcho()
    try:
        yield srv
    finally:
        srv.close()


def closed_udp_port():
    """A loopback UDP port with nothing bound, below the ephemeral range (as
    support.closed_port, which no bind to port 0 takes)."""
    low, _ = support._ephemeral_ports()
    first = max(1024, min(20000, low - 1024))
    pick = random.SystemRandom()
    for _ in range(1000):
        port = pick.randrange(first, low)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback UDP port")


def _dial(tunnel, address, key=None):
    return tunnel.dial(address, key=key, proto="udp")


def test_socket_is_seqpacket(tunnel, udp_echo):
    with _dial(tunnel, f"127.0.0.1:{udp_echo.port}") as sock:
        assert sock.type == socket.SOCK_SEQPACKET
        assert sock.target == f"udp/127.0.0.1:{udp_echo.port}"
        sock.send(b"ping")
        assert sock.recv(100) == b"ping"
        conns = tunnel.srv.connections()
        assert [(c["proto"], c["address"]) for c in conns] == [
            ("udp", f"127.0.0.1:{udp_echo.port}")]


def test_boundaries_kept_both_ways(tunnel, udp_echo):
    sizes = [1, 1400, 60000, 1, 60000, 1400]
    with _dial(tunnel, f"127.0.0.1:{udp_echo.port}") as sock:
        # All sent before any is read: nothing may join or split them.
        for i, n in enumerate(sizes):
            sock.send(bytes([i]) * n)
        for i, n in enumerate(sizes):
            data = sock.recv(65536)
            assert data == bytes([i]) * n
    assert udp_echo.sizes == sizes


def test_thousand_in_order(tunnel, udp_echo):
    """1000 datagrams with at most 16 unanswered, so no buffer on the way
    can overflow (UDP may drop; loopback under this window does not)."""
    window = 16
    with _dial(tunnel, f"127.0.0.1:{udp_echo.port}") as sock:
        got = []
        sent = 0
        while len(got) < 1000:
            while sent < 1000 and sent - len(got) < window:
                sock.send(b"%d" % sent)
                sent += 1
            got.append(int(sock.recv(100)))
        assert got == list(range(1000))
    assert len(udp_echo.sizes) == 1000


def test_idle_timeout_ends_the_flow(tunnel, udp_echo, echo_server):
    """The agent's udp_idle_timeout ends an idle udp connection (the server's
    socket reads EOF); a tcp connection idle longer is untouched."""
    cli = tunnel.add_client("agent-udp", udp_idle_timeout=0.3)
    with tunnel.dial(echo_server.port, key="agent-udp") as tcp:
        with _dial(tunnel, f"127.0.0.1:{udp_echo.port}", key="agent-udp") as sock:
            sock.send(b"x")
            assert sock.recv(10) == b"x"
            assert sock.recv(10) == b""  # the idle timeout's EOF
            assert sock.tunnel_error == "idle timeout"
        support.round_trip(tcp)
    support.check_balanced(cli)
    m = cli.metrics()
    for name in (ADD_CONN, REMOVE_CONN):  # counted like tcp, under proto udp
        udp = [(dict(k)["addr"], v) for k, v in support.family(m, name).items()
               if dict(k)["proto"] == "udp"]
        assert udp == [(f"127.0.0.1:{udp_echo.port}", 1)]


def test_server_side_idle_timeout(rd, tunnel_leak_check, udp_echo):
    srv = rd.Server(listen="127.0.0.1:0", udp_idle_timeout=0.3)
    cli = None
    try:
        srv.start()
        cli = support.make_client(rd, srv.url, "agent-s")
        wait_for(lambda: srv.has_session("agent-s"), TIMEOUT, "the agent's session")
        sock = srv.dial("agent-s", "udp", f"127.0.0.1:{udp_echo.port}", timeout=TIMEOUT)
        with sock:
            sock.settimeout(TIMEOUT)
            sock.send(b"y")
            assert sock.recv(10) == b"y"
            assert sock.recv(10) == b""
            assert sock.tunnel_error == "idle timeout"
        support.check_balanced(srv)
        support.check_balanced(cli)
    finally:
        if cli is not None:
            cli.close()
        srv.close()
    support.wait_engine_idle(rd)


def test_idle_timeout_option_checked(rd):
    with pytest.raises(ValueError, match="udp_idle_timeout"):
        rd.Server(listen="127.0.0.1:0", udp_idle_timeout=-1)
    with pytest.raises(ValueError, match="udp_idle_timeout"):
        rd.Client("ws://127.0.0.1:1/connect", udp_idle_timeout="soon")


def test_no_listener_refused(tunnel):
    port = closed_udp_port()
    with _dial(tunnel, f"127.0.0.1:{port}") as sock:
        sock.send(b"anyone?")
        assert sock.recv(10) == b""
        assert re.fullmatch(
            rf"(read|write) udp 127\.0\.0\.1:\d+->127\.0\.0\.1:{port}: \1: connection refused",
            sock.tunnel_error), sock.tunnel_error


def test_lookup_failure(tunnel):
    with _dial(tunnel, "nonexistent.invalid:53") as sock:
        assert sock.recv(10) == b""
        assert sock.tunnel_error.startswith("dial udp: lookup nonexistent.invalid: ")


def test_bad_address(tunnel):
    with _dial(tunnel, "127.0.0.1") as sock:
        assert sock.recv(10) == b""
        assert sock.tunnel_error == "dial udp: address 127.0.0.1: missing port in address"


def test_by_name(tunnel):
    """localhost resolves as the agent's resolver orders it; the echo listens
    on the first address, the one a Go agent dials too."""
    family, _, _, _, addr = socket.getaddrinfo("localhost", 0, socket.AF_UNSPEC,
                                               socket.SOCK_DGRAM)[0]
    echo = UdpEcho(addr[0], family)
    try:
        with _dial(tunnel, f"localhost:{echo.port}") as sock:
            sock.send(b"by name")
            assert sock.recv(100) == b"by name"
    finally:
        echo.close()


def test_udp4_udp6(tunnel, udp_echo):
    with tunnel.dial(f"127.0.0.1:{udp_echo.port}", proto="udp4") as sock:
        sock.send(b"four")
        assert sock.recv(10) == b"four"
    with tunnel.dial(f"127.0.0.1:{udp_echo.port}", proto="udp6") as sock:
        assert sock.recv(10) == b""
        assert sock.tunnel_error == "dial udp6: address 127.0.0.1: no suitable address found"


def test_allow_patterns(tunnel, udp_echo):
    other = UdpEcho()
    try:
        tunnel.add_client("agent-allow", allow=[f"udp/127.0.0.*:{udp_echo.port}"])
        with _dial(tunnel, f"127.0.0.1:{udp_echo.port}", key="agent-allow") as sock:
            sock.send(b"ok")
            assert sock.recv(10) == b"ok"
        for proto, port in (("udp", other.port), ("tcp", udp_echo.port)):
            with tunnel.dial(f"127.0.0.1:{port}", key="agent-allow", proto=proto) as sock:
                assert sock.recv(10) == b""
                assert sock.tunnel_error == "connect not allowed"
        assert other.sizes == []
    finally:
        other.close()


def test_server_side_close_ends_agent_side(tunnel, udp_echo):
    sock = _dial(tunnel, f"127.0.0.1:{udp_echo.port}")
    sock.send(b"a")
    assert sock.recv(10) == b"a"
    sock.send(b"last")  # sent before the close: still delivered
    sock.close()
    wait_for(lambda: tunnel.rd.engine_stats()["open_connections"] == 0, TIMEOUT,
             "both ends of the udp connection to end")
    wait_for(lambda: udp_echo.sizes == [1, 4], TIMEOUT, "the last datagram")
    support.check_balanced(tunnel.cli)


def test_agent_side_end_reads_eof(tunnel, udp_echo):
    """The agent going away ends the server's socket with EOF."""
    cli = tunnel.add_client("agent-gone")
    sock = _dial(tunnel, f"127.0.0.1:{udp_echo.port}", key="agent-gone")
    with sock:
        sock.send(b"b")
        assert sock.recv(10) == b"b"
        cli.close()
        assert sock.recv(10) == b""
        assert sock.tunnel_error


def test_empty_datagram_is_not_carried(tunnel, udp_echo):
    """An empty record is nothing to carry (Go's agent writes nothing for
    it either): it neither ends the connection nor reaches the service."""
    with _dial(tunnel, f"127.0.0.1:{udp_echo.port}") as sock:
        sock.send(b"")
        sock.send(b"after")
        assert sock.recv(10) == b"after"
    assert udp_echo.sizes == [5]


def test_forward_refuses_udp(tunnel, udp_echo):
    with pytest.raises(ValueError, match="streams only"):
        tunnel.srv.forward(tunnel.key, "udp", f"127.0.0.1:{udp_echo.port}")


def test_through_a_peer(rd, tunnel_leak_check, udp_echo):
    """A dial on B for an agent of its peer A: the datagrams keep their
    boundaries across both hops (the peer link splices DATA one for one)."""
    fds_before = support.open_fds()
    a = rd.Server("127.0.0.1:0", peer_id="A", peer_token="token-a").start()
    b = rd.Server("127.0.0.1:0", peer_id="B", peer_token="token-b").start()
    cli = None
    try:
        a.add_peer(b.url, "B", "token-b")
        b.add_peer(a.url, "A", "token-a")
        cli = support.make_client(rd, a.url, "far")
        wait_for(lambda: b.route("far") == "A", TIMEOUT, "B's route to the agent via A")
        with b.dial("far", "udp", f"127.0.0.1:{udp_echo.port}", timeout=TIMEOUT) as sock:
            sock.settimeout(TIMEOUT)
            assert sock.type == socket.SOCK_SEQPACKET
            for n in (1, 60000, 1400):
                sock.send(b"p" * n)
            assert [len(sock.recv(65536)) for _ in range(3)] == [1, 60000, 1400]
        for obj in (a, b, cli):
            support.check_balanced(obj)
    finally:
        if cli is not None:
            cli.close()
        b.close()
        a.close()
    support.wait_engine_idle(rd)
    support.assert_no_new_fds(fds_before)


def test_own_dialer_returns_a_udp_socket(tunnel, udp_echo):
    """Client(dialer=f) may hand back a connected UDP socket: the engine sees
    its type and carries it datagram by datagram, as its own udp dial."""
    calls = []

    def dialer(proto, address):
        calls.append((proto, address))
        host, port = address.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((host, int(port)))
        return sock

    tunnel.add_client("agent-udp-dialer", dialer=dialer)
    address = f"127.0.0.1:{udp_echo.port}"
    with _dial(tunnel, address, key="agent-udp-dialer") as sock:
        for n in (1, 1400, 60000):
            sock.send(b"u" * n)
        assert [len(sock.recv(65536)) for _ in range(3)] == [1, 1400, 60000]
    assert calls == [("udp", address)]
    assert udp_echo.sizes == [1, 1400, 60000]
