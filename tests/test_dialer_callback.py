"""The agent's own dialer, Client(dialer=f): f(proto, address) returns a
connected socket the engine adopts in place of its own dial. Real sockets on
both sides of a real tunnel; the `tunnel` fixture requires balanced counters,
an idle engine and no descriptor left over after each test."""

import asyncio
import os
import shutil
import socket
import tempfile
import threading

import pytest

import support
from support import AGENT_KEY, TIMEOUT, round_trip, wait_for

AGENT = "agent-dialer"


def tcp_connect(address, source=None):
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(TIMEOUT)
        sock.connect((host, int(port)))
    except BaseException:
        sock.close()
        raise
    return sock


class Recorder:
    """A dialer that connects for real and notes every (proto, address)."""

    def __init__(self):
        self.calls = []
        self.threads = set()

    def __call__(self, proto, address):
        self.calls.append((proto, address))
        self.threads.add(threading.current_thread().name)
        if proto == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        return tcp_connect(address)


class Gate:
    """A dialer that waits for `release` before connecting (a slow one):
    `entered` is set once it has been called."""

    def __init__(self, backend=None):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.backend = backend

    def __call__(self, proto, address):
        self.entered.set()
        assert self.release.wait(TIMEOUT * 2), "the test never released the dialer"
        return tcp_connect(self.backend or address)


def dial(tunnel, address, proto="tcp"):
    sock = tunnel.srv.dial(AGENT, proto, address, timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def failed_with(sock):
    """The far side's error once the socket reads EOF."""
    assert sock.recv(1) == b""
    error = sock.tunnel_error
    sock.close()
    return error


def test_dialer_serves_every_allowed_target(tunnel, echo_server):
    dialer = Recorder()
    tunnel.add_client(AGENT, dialer=dialer)
    for _ in range(2):
        sock = dial(tunnel, echo_server.address)
        round_trip(sock, b"through the own dialer")
        sock.close()
    assert dialer.calls == [("tcp", echo_server.address)] * 2
    # Off the loop thread: on the pool of callback threads.
    assert all(name.startswith("remotedialer-callbacks-") for name in dialer.threads)
    echo_server.wait_finished(2)


def test_many_dials_at_once_balance(tunnel, echo_server):
    dialer = Recorder()
    tunnel.add_client(AGENT, dialer=dialer)
    socks = [dial(tunnel, echo_server.address) for _ in range(64)]
    for i, sock in enumerate(socks):
        round_trip(sock, b"conn %d" % i)
    for sock in socks:
        sock.close()
    assert len(dialer.calls) == 64
    echo_server.wait_finished(64)
    for obj in (tunnel.srv, tunnel.extra_clients[0]):
        support.check_balanced(obj)


def test_dialer_gets_unix_paths_cleaned(tunnel):
    base = tempfile.mkdtemp(prefix="rdd", dir="/tmp")
    backend = support.UnixEchoServer(base + "/echo.sock")
    try:
        dialer = Recorder()
        tunnel.add_client(AGENT, dialer=dialer)
        sock = dial(tunnel, base + "/x/../echo.sock", proto="unix")
        round_trip(sock)
        sock.close()
        assert dialer.calls == [("unix", base + "/echo.sock")]
        backend.wait_finished(1)
    finally:
        backend.close()
        shutil.rmtree(base, ignore_errors=True)


def test_dialer_picks_the_source_address(tunnel):
    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(TIMEOUT)
    address = f"127.0.0.1:{backend.getsockname()[1]}"
    try:
        tunnel.add_client(AGENT, dialer=lambda proto, addr: tcp_connect(addr, source="127.0.0.2"))
        sock = dial(tunnel, address)
        conn, peer = backend.accept()
        with conn:
            assert peer[0] == "127.0.0.2"
            sock.sendall(b"ping")
            assert support.recv_exact(conn, 4) == b"ping"
            conn.sendall(b"pong")
            assert support.recv_exact(sock, 4) == b"pong"
            sock.close()
            assert conn.recv(1) == b""
    finally:
        backend.close()


def test_dialer_error_text_reaches_the_server(tunnel, echo_server):
    def dialer(proto, address):
        if address != echo_server.address:
            raise OSError(f"bastion: no route to {address}")
        return tcp_connect(address)

    tunnel.add_client(AGENT, dialer=dialer)
    assert failed_with(dial(tunnel, "10.9.8.7:22")) == "bastion: no route to 10.9.8.7:22"
    # That connection only: the session lives on and the next dial works.
    assert tunnel.srv.has_session(AGENT)
    sock = dial(tunnel, echo_server.address)
    round_trip(sock)
    sock.close()


def test_dialer_exception_without_text_names_its_type(tunnel):
    def dialer(proto, address):
        raise ConnectionResetError()

    tunnel.add_client(AGENT, dialer=dialer)
    assert failed_with(dial(tunnel, "127.0.0.1:9")) == "ConnectionResetError"


def _unconnected(address):
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def _closed(address):
    sock = tcp_connect(address)
    sock.close()
    return sock


@pytest.mark.parametrize("make, error", [
    (lambda address: None, "dialer returned NoneType, not a connected socket.socket"),
    (lambda address: address, "dialer returned str, not a connected socket.socket"),
    (lambda address: tcp_connect(address).detach(),
     "dialer returned int, not a connected socket.socket"),
    (_unconnected, "dialer returned a socket that is not connected"),
    (_closed, "dialer returned a closed socket"),
], ids=["none", "str", "bare-fd", "unconnected", "closed"])
def test_dialer_returning_no_connected_socket(tunnel, echo_server, make, error):
    made = []

    def dialer(proto, address):
        result = make(address)
        made.append(result)
        return result

    tunnel.add_client(AGENT, dialer=dialer)
    assert failed_with(dial(tunnel, echo_server.address)).startswith(error)
    assert tunnel.srv.has_session(AGENT)
    for result in made:  # a bare descriptor stays the dialer's to close
        if isinstance(result, int):
            os.close(result)


def test_slow_dialer_does_not_delay_another_connection(tunnel, echo_server):
    slow_backend = support.EchoServer()
    gate = Gate()
    try:
        def dialer(proto, address):
            if address == slow_backend.address:
                return gate(proto, address)
            return tcp_connect(address)

        tunnel.add_client(AGENT, dialer=dialer)
        slow = dial(tunnel, slow_backend.address)
        slow.sendall(b"waiting")  # held by the engine until the dialer answers
        assert gate.entered.wait(TIMEOUT)
        fast = dial(tunnel, echo_server.address)
        round_trip(fast)
        fast.close()
        assert slow_backend.accepted == 0
        gate.release.set()
        assert support.recv_exact(slow, 7) == b"waiting"
        slow.close()
        slow_backend.wait_finished(1)
    finally:
        gate.release.set()
        slow_backend.close()


def _deny_port_nine(proto, address):
    return not address.endswith(":9")


@pytest.mark.parametrize("allow", ["patterns", "callback"])
def test_refused_target_never_reaches_the_dialer(tunnel, echo_server, allow):
    dialer = Recorder()
    rule = [f"tcp/{echo_server.address}"] if allow == "patterns" else _deny_port_nine
    tunnel.add_client(AGENT, allow=rule, dialer=dialer)
    assert failed_with(dial(tunnel, "127.0.0.1:9")) == "connect not allowed"
    sock = dial(tunnel, echo_server.address)
    round_trip(sock)
    sock.close()
    assert dialer.calls == [("tcp", echo_server.address)]


def test_late_answer_after_the_dial_timeout_is_closed(tunnel, echo_server):
    gate = Gate(backend=echo_server.address)
    try:
        tunnel.add_client(AGENT, dialer=gate, dial_timeout=0.3)
        fds_before = support.open_fds()  # with the agent up
        sock = dial(tunnel, "192.0.2.1:443")
        assert gate.entered.wait(TIMEOUT)
        # The engine gave up on the dialer with Go's dial timeout text.
        assert failed_with(sock) == "dial tcp 192.0.2.1:443: i/o timeout"
        assert tunnel.srv.has_session(AGENT)
    finally:
        gate.release.set()
    # The late socket was connected to the backend, then closed by the
    # engine: the backend reads EOF and nothing stays open here.
    echo_server.wait_accepted(1)
    echo_server.wait_finished(1)
    support.assert_no_new_fds(fds_before)
    sock = dial(tunnel, "192.0.2.1:443")  # this one is answered in time
    round_trip(sock)
    # Once attached, the dial timeout no longer applies: still open after it.
    # (No event marks a timer that must not fire: this waits it out.)
    threading.Event().wait(0.6)
    round_trip(sock, b"still open")
    sock.close()
    assert sock.tunnel_error is None


def test_answer_after_the_agent_closed_is_closed(tunnel, echo_server):
    gate = Gate(backend=echo_server.address)
    try:
        cli = tunnel.add_client(AGENT, dialer=gate)
        sock = dial(tunnel, "192.0.2.1:443")
        assert gate.entered.wait(TIMEOUT)
        cli.close()
        assert failed_with(sock) == "tunnel disconnect"
    finally:
        gate.release.set()
    echo_server.wait_accepted(1)
    echo_server.wait_finished(1)


def test_dialer_must_be_callable(rd):
    with pytest.raises(TypeError, match="dialer must be None or a callable"):
        rd.Client("ws://127.0.0.1:1/connect", dialer="tcp")


def test_async_dialer_with_the_aio_client(rd, echo_server, tunnel_leak_check):
    fds_before = support.open_fds()
    seen = []
    loops = {}

    async def dialer(proto, address):
        loop = asyncio.get_running_loop()
        seen.append((proto, address, loop is loops["main"]))
        if address.endswith(":9"):
            raise OSError("async dialer refused")
        host, port = address.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, int(port)))
        except BaseException:
            sock.close()
            raise
        return sock

    async def main():
        loop = loops["main"] = asyncio.get_running_loop()
        async with rd.aio.Server() as srv, \
                rd.aio.Client(srv.url, headers={"X-Tunnel-ID": AGENT_KEY},
                              dialer=dialer) as cli:
            await cli.wait_connected(TIMEOUT)
            reader, writer = await srv.open_connection(AGENT_KEY, "tcp", echo_server.address)
            writer.write(b"async dialer")
            assert await reader.readexactly(12) == b"async dialer"
            writer.close()
            await writer.wait_closed()
            sock = await srv.dial(AGENT_KEY, "tcp", "127.0.0.1:9")
            with sock:
                assert await asyncio.wait_for(loop.sock_recv(sock, 1), TIMEOUT) == b""
                assert sock.tunnel_error == "async dialer refused"

    asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
    # Both coroutines ran on the loop the aio Client was started on.
    assert seen == [("tcp", echo_server.address, True), ("tcp", "127.0.0.1:9", True)]
    echo_server.wait_finished(1)
    support.wait_engine_idle(rd)
    support.assert_no_new_fds(fds_before)


def test_bytes_sent_and_closed_before_the_dial_arrive(tunnel, echo_server):
    """The server's side writes and closes while the agent is still dialing:
    what it wrote reaches the target all the same, then the EOF (Go's agent
    delivers its buffer before the close). The dialer holds the first target
    until the agent has read the DATA and the EOF: a round trip on a second
    connection of the same session proves that, since a session's messages
    are handled in order."""
    other = support.EchoServer()
    held = threading.Event()
    release = threading.Event()

    def dialer(proto, address):
        if address == echo_server.address:
            held.set()
            assert release.wait(TIMEOUT * 2), "the test never released the dialer"
        return tcp_connect(address)

    try:
        tunnel.add_client(AGENT, dialer=dialer)
        payload = b"written before the target was reached" * 100
        sock = dial(tunnel, echo_server.address)
        sock.sendall(payload)
        sock.close()
        assert held.wait(TIMEOUT)
        probe = dial(tunnel, other.address)
        round_trip(probe, b"after the EOF")
        probe.close()
        release.set()
        [done] = echo_server.wait_finished(1)
        assert done.nbytes == len(payload), done
    finally:
        release.set()
        other.close()
