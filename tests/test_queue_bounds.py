"""What a peer can make the engine hold, bounded.

Toward a peer: everything queued on a session (DATA, PAUSE/RESUME, ERROR
replies, Pongs, the Close frame) counts against one bound, twice the
session's write_high (4 MiB). A peer that sends Pings (or DATA for unknown
ids) and never reads its replies gets its stream left unread past that
bound, and its session ends at the read deadline ("write queue stalled").
Server and agent alike.

Toward a local end: bytes that wait (for a local dial, or for a local
socket that is not reading) are copies in blocks of their own, counted
whole in buffered_to_local. Many small DATA messages cannot pin one
session read block (1 MiB) each, so max_buffer and hard_cap limit memory
that is really held, and engine_stats shows it.
"""

import socket
import threading
import time

import pytest

import support
import wsraw
from support import TIMEOUT, check_balanced, make_client, recv_exact, wait_engine_idle, wait_for

MiB = 1 << 20
WRITE_HIGH = 4 * MiB       # the session's write_high
QUEUE_BOUND = 2 * WRITE_HIGH
# What may sit past the bound: the reply that crossed it.
SLACK = 64 * 1024
PING = 125 * b"p"          # the largest control payload: a Pong is 127 bytes


def ping_flood(megabytes, masked):
    """Back-to-back Pings (one frame repeated: a fixed mask key is allowed)."""
    frame = wsraw.encode_frame(wsraw.OP_PING, PING, mask=masked, mask_key=b"\1\2\3\4")
    return frame * (megabytes * MiB // len(frame))


def small_rcvbuf_upgrade(port, client_key):
    """A raw agent whose receive buffer is small (set before connecting, so
    the kernel cannot soak up what the server queues toward it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    request, _ = wsraw.upgrade_request(f"127.0.0.1:{port}", "/connect",
                                       {"X-Tunnel-ID": client_key})
    sock.sendall(request)
    head, rest = wsraw._read_head(sock, time.monotonic() + TIMEOUT)
    first, _ = wsraw._parse_head(head)
    assert wsraw._parse_status_line(first)[0] == 101, first
    return wsraw.WSConn(sock, client=True, leftover=rest)


@pytest.fixture
def servers(rd, tunnel_leak_check):
    """Factory: servers(**options) -> a started Server. At the end every
    session of each must have ended with its counters balanced."""
    made = []

    def start(**options):
        made.append(rd.Server(listen="127.0.0.1:0", **options).start())
        return made[-1]

    yield start
    try:
        for srv in made:
            wait_for(lambda: not srv.list_clients(), what="every session to end")
            check_balanced(srv, sessions=True)
    finally:
        for srv in made:
            srv.close()
    wait_engine_idle(rd)


class Sender(threading.Thread):
    """sendall on a thread: it blocks once the far side stops reading, and
    ends with the error the closed socket gives."""

    def __init__(self, sock, data):
        super().__init__(name="flood", daemon=True)
        self.sock, self.data, self.error = sock, data, None

    def run(self):
        try:
            self.sock.sendall(self.data)
        except OSError as e:
            self.error = e


def watch_queue(rd, until, timeout):
    """The largest buffered_to_tunnel seen while polling until until()."""
    peak = 0
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out watching the queue"
        peak = max(peak, rd.engine_stats()["buffered_to_tunnel"])
        time.sleep(0.005)
    return max(peak, rd.engine_stats()["buffered_to_tunnel"])


def test_server_bounds_replies_to_a_peer_that_never_reads(rd, servers, echo_server):
    srv = servers(read_timeout=3)
    bystander = make_client(rd, srv.url, "bystander", ping_interval=0.5)
    try:
        wait_for(lambda: srv.has_session("bystander"), what="the bystander's session")
        ws = small_rcvbuf_upgrade(srv.port, "flooder")
        wait_for(lambda: srv.has_session("flooder"), what="the flooder's session")
        heap_before = rd._engine.heap()[0]
        # About 38 MiB of Pongs if every Ping were answered.
        sender = Sender(ws.sock, ping_flood(40, masked=True))
        sender.start()
        peak = watch_queue(rd, lambda: not srv.has_session("flooder"), TIMEOUT)
        assert peak <= QUEUE_BOUND + SLACK, f"{peak} bytes queued toward a peer that never reads"
        sender.join(TIMEOUT)
        assert not sender.is_alive(), "the flood still blocks: its session was not closed"
        assert sender.error is not None, "the whole flood was read: nothing held it back"
        assert rd._engine.heap()[0] - heap_before < QUEUE_BOUND + 4 * MiB
        # The stall ended that session alone.
        assert srv.has_session("bystander")
        support.dial_round_trip(srv, "bystander", echo_server.address, b"still here")
        ws.abort()
    finally:
        bystander.close()


def test_agent_bounds_replies_to_a_server_that_never_reads(rd, tunnel_leak_check):
    with wsraw.WSListener() as listener:
        listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-q"}, read_timeout=3,
                        backoff_min=30, backoff_max=30)
        try:
            cli.start()
            ws, _ = listener.accept(timeout=TIMEOUT)
            wait_for(lambda: cli.connected, what="the agent's session")
            sender = Sender(ws.sock, ping_flood(40, masked=False))
            sender.start()
            peak = watch_queue(rd, lambda: not cli.connected, TIMEOUT)
            assert peak <= QUEUE_BOUND + SLACK, f"{peak} bytes queued toward a server that never reads"
            assert "write queue stalled" in (cli.last_error or ""), cli.last_error
            sender.join(TIMEOUT)
            assert sender.error is not None, "the whole flood was read: nothing held it back"
            ws.abort()
        finally:
            cli.close()
    wait_engine_idle(rd)


def tiny_data_between_fillers(ws, conn_id, count, size, filler=600 * 1024):
    """count DATA messages of `size` bytes for conn_id, each followed by a
    filler (DATA for an id nobody has) big enough that the next one lands in
    a fresh session read block. Sent as one write."""
    frames = []
    for i in range(count):
        frames.append(wsraw.encode_frame(wsraw.OP_BINARY, wsraw.encode_message(
            ws.next_id(), conn_id, wsraw.DATA, bytes([65 + i % 26]) * size), mask=ws.client))
        frames.append(wsraw.encode_frame(wsraw.OP_BINARY, wsraw.encode_message(
            ws.next_id(), 999_999, wsraw.DATA, bytes(filler)), mask=ws.client))
    ws.send_raw(b"".join(frames))


def wait_replies(ws, count, conn_id=999_999):
    """Reads until count ERRORs for conn_id came back: the messages before
    them were all processed."""
    got = 0
    while got < count:
        m = ws.recv_tunnel()
        if m.type == wsraw.ERROR and m.conn_id == conn_id:
            got += 1


def test_agent_pending_dial_holds_only_what_it_was_sent(rd, tunnel_leak_check, echo_server):
    release = threading.Event()

    def slow_allow(proto, address):
        release.wait(TIMEOUT)
        return True

    count = 48
    with wsraw.WSListener() as listener:
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-p"}, allow=slow_allow)
        try:
            cli.start()
            ws, _ = listener.accept(timeout=TIMEOUT)
            wait_for(lambda: cli.connected, what="the agent's session")
            heap_before = rd._engine.heap()[0]
            ws.send_msg(2, wsraw.CONNECT, f"tcp/{echo_server.address}")
            tiny_data_between_fillers(ws, 2, count, 1)
            wait_replies(ws, count)
            held = rd._engine.heap()[0] - heap_before
            buffered = rd.engine_stats()["buffered_to_local"]
            # One byte each: a read block apiece would be 48 MiB.
            assert held < 2 * MiB, f"{held} bytes held for {count} one-byte messages"
            assert 0 < buffered <= held, (buffered, held)
            release.set()
            expected = bytes(65 + i % 26 for i in range(count))
            assert ws.recv_data(2, count) == expected, "bytes held for the dial were lost"
            ws.send_msg(2, wsraw.ERROR, "EOF")
            echo_server.wait_open(0)
            check_balanced(cli)
            ws.abort()
        finally:
            release.set()
            cli.close()
    wait_engine_idle(rd)


def test_server_local_end_not_reading_holds_only_what_it_was_sent(rd, servers):
    size = 130 * 1024  # over an eighth of a read block: once kept by reference
    srv = servers()
    ws = raw_agent(srv, "agent-n")
    sock = srv.dial("agent-n", "tcp", "10.0.0.1:80")
    connect = ws.recv_tunnel()
    assert connect.type == wsraw.CONNECT
    cid = connect.conn_id
    # Fill the local socket: from here on every byte for it waits.
    fill = 2 * MiB
    ws.send_msg(cid, wsraw.DATA, bytes(fill))
    wait_for(lambda: rd.engine_stats()["buffered_to_local"] > 0,
             what="the local socket to fill")
    heap_before = rd._engine.heap()[0]
    buffered_before = rd.engine_stats()["buffered_to_local"]
    count = 16
    tiny_data_between_fillers(ws, cid, count, size)
    wait_replies(ws, count)
    held = rd._engine.heap()[0] - heap_before
    buffered = rd.engine_stats()["buffered_to_local"] - buffered_before
    # Old behaviour: each message pinned its 1 MiB read block.
    assert held <= buffered + MiB, f"{held} bytes held, {buffered} counted"
    assert buffered >= count * size
    # Nothing was lost: every byte reaches the local socket in order.
    assert recv_exact(sock, fill) == bytes(fill)
    for i in range(count):
        assert recv_exact(sock, size) == bytes([65 + i % 26]) * size
    sock.close()
    ws.abort()


def raw_agent(srv, client_key):
    ws = wsraw.WSConn.connect("127.0.0.1", srv.port, headers={"X-Tunnel-ID": client_key})
    wait_for(lambda: srv.has_session(client_key), what=f"{client_key}'s session")
    return ws


def saturate(rd, srv, client_key):
    """A raw agent that does not read, and a dialed connection pushing bytes
    toward it until the session's queue is over write_high. Returns (ws,
    the dialed socket, the sender thread)."""
    ws = small_rcvbuf_upgrade(srv.port, client_key)
    wait_for(lambda: srv.has_session(client_key), what=f"{client_key}'s session")
    sock = srv.dial(client_key, "tcp", "10.0.0.1:80")
    assert ws.recv_tunnel().type == wsraw.CONNECT
    sender = Sender(sock, bytes(32 * MiB))
    sender.start()
    wait_for(lambda: rd.engine_stats()["buffered_to_tunnel"] > WRITE_HIGH,
             what="the queue toward the agent to pass write_high")
    return ws, sock, sender


def test_dial_waits_for_room_on_a_full_session(rd, servers):
    srv = servers()
    ws, sock, sender = saturate(rd, srv, "slow")
    with pytest.raises(rd.TunnelTimeoutError, match="had no room"):
        srv.dial("slow", "tcp", "late:1", timeout=0.2)
    with pytest.raises(TimeoutError):  # the built-in catches it too
        srv.dial("slow", "tcp", "late:1", timeout=0.01)
    result = {}
    waiter = threading.Thread(
        target=lambda: result.setdefault("sock", srv.dial("slow", "tcp", "late:2",
                                                          timeout=TIMEOUT)))
    waiter.start()
    # The agent reads: the queue drains, and the waiting dial goes through.
    while True:
        m = ws.recv_tunnel()
        if m.type == wsraw.CONNECT:
            assert m.address == "late:2", "a dial that timed out was sent anyway"
            break
    waiter.join(TIMEOUT)
    assert "sock" in result, "the waiting dial did not return"
    result["sock"].close()
    sock.close()
    ws.abort()
    sender.join(TIMEOUT)


def test_dial_waiting_for_room_fails_when_the_session_ends(rd, servers):
    srv = servers()
    ws, sock, sender = saturate(rd, srv, "doomed")
    errors = []

    def dial():
        try:
            srv.dial("doomed", "tcp", "late:3", timeout=TIMEOUT).close()
        except Exception as e:  # noqa: BLE001 - checked below
            errors.append(e)

    waiter = threading.Thread(target=dial)
    waiter.start()
    ws.abort()
    waiter.join(TIMEOUT)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], rd.ClientNotFoundError), errors
    sock.close()
    sender.join(TIMEOUT)
