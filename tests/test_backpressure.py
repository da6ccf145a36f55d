"""Flow control and hostile peers: PAUSE/RESUME between a fast writer and a
stalled reader, the hard cap for a peer that ignores PAUSE, and a raw peer
sending DATA for unknown ids, ERROR twice, bogus SYNC lists, or vanishing in
the middle of a message. Nothing leaks, nothing crashes, and the other
connections of the session live on."""

import hashlib
import random
import re
import socket
import threading

import pytest

import support
import wsraw
from support import (TIMEOUT, check_balanced, key, recv_exact, round_trip, wait_engine_idle,
                     wait_for)


def raw_session(srv, client_key="raw-1"):
    ws = wsraw.WSConn.connect("127.0.0.1", srv.port, headers={"X-Tunnel-ID": client_key})
    wait_for(lambda: srv.has_session(client_key), what=f"a session for {client_key}")
    return ws


def expect_end(sock, error):
    try:
        support.recv_until_eof(sock)
    except ConnectionResetError:
        pass
    assert sock.tunnel_error == error
    assert not sock.tunnel_open



def session_gone(srv, client_key="raw-1"):
    wait_for(lambda: not srv.has_session(client_key), what=f"the {client_key} session to end")


def test_stalled_reader_and_fast_writer(tunnel):
    """48 MiB from a fast writer to a reader behind the agent that reads
    nothing at first: the agent sends PAUSE (the server stops reading the
    writer), its buffer stays far below the transfer and under the hard cap,
    RESUME follows once the reader drains, and every byte arrives intact."""
    rd = tunnel.rd
    max_buffer, hard_cap = 256 << 10, 16 << 20
    tunnel.add_client("agent-bp", max_buffer=max_buffer, hard_cap=hard_cap)
    reader = support.StalledReader()
    sampler = support.Sampler(rd)
    try:
        sock = tunnel.dial(reader.port, key="agent-bp")
        total = 48 << 20
        block = random.Random(11).randbytes(1 << 20)
        sent_hash = hashlib.sha256(block * (total // len(block))).hexdigest()
        writer = threading.Thread(target=lambda: [sock.sendall(block)
                                                  for _ in range(total // len(block))],
                                  daemon=True)
        writer.start()
        # PAUSE: the server's side of the connection is paused by the agent.
        wait_for(lambda: [c["paused"] for c in tunnel.srv.connections()] == [True],
                 what="the agent's PAUSE")
        assert writer.is_alive(), "the whole transfer went through a stalled reader"
        reader.go.set()
        writer.join(TIMEOUT * 2)
        assert not writer.is_alive()
        sock.shutdown(socket.SHUT_WR)  # no half-close in the protocol: this ends it
        (done,) = reader.wait_finished(1)
        assert (done.nbytes, done.sha256) == (total, sent_hash)
        sampler.stop()
        assert sampler.peak_buffered < hard_cap, sampler.peak_buffered
        assert sampler.peak_buffered < total // 2
        assert sampler.peak_heap < total // 2, sampler.peak_heap
        sock.close()
        m = support.wait_balanced(tunnel.srv)
        label = key(addr=reader.address, clientkey="agent-bp", proto="tcp")
        assert m[support.REMOVE_CONN][label] == 1
    finally:
        sampler.stop()
        reader.go.set()
        reader.close()


def test_resume_follows_pause(tunnel):
    """The same, watched from the wire: a raw agent paces a slow reader; the
    server stops sending after PAUSE and starts again after RESUME."""
    ws = raw_session(tunnel.srv)
    try:
        sock = tunnel.dial("10.9.9.9:80", key="raw-1")
        cid = ws.recv_tunnel().conn_id
        # More than can be in flight when the PAUSE lands (the server's
        # write queue, both kernels' socket buffers, the read-ahead).
        data = random.Random(12).randbytes(32 << 20)
        writer = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        writer.start()
        got = bytearray(ws.recv_data(cid, 1 << 20))
        ws.send_msg(cid, wsraw.PAUSE)
        wait_for(lambda: tunnel.srv.connections()[0]["paused"], what="the server to pause")
        # What was sent before the PAUSE may still arrive (ahead of the Pong
        # to a Ping sent after it); then nothing more, however long we wait
        # (the server may read ahead from the socket, but holds it back).
        for msg in support.ping_barrier(ws):
            assert msg.type == wsraw.DATA and msg.conn_id == cid, msg
            got += msg.payload
        assert len(got) < len(data) and writer.is_alive()
        for _ in range(3):
            assert support.ping_barrier(ws) == [], "DATA after PAUSE"
        assert [c["paused"] for c in tunnel.srv.connections()] == [True]
        ws.send_msg(cid, wsraw.RESUME)
        got += ws.recv_data(cid, len(data) - len(got))
        assert bytes(got) == data
        writer.join(TIMEOUT)
        assert [c["paused"] for c in tunnel.srv.connections()] == [False]
        sock.close()
        msg = ws.recv_tunnel()
        assert (msg.type, msg.conn_id, msg.text) == (wsraw.ERROR, cid, "EOF")
    finally:
        ws.close()
    session_gone(tunnel.srv)


# ---------------------------------------------------------------------------
# A peer that ignores PAUSE


def _flood_until_error(ws, cid, limit_chunks=400):
    """Sends 64 KiB DATA messages for cid, ignoring PAUSE, until an ERROR
    for cid comes back. Returns the (type, conn_id, text) seen."""
    chunk = b"f" * (64 << 10)
    seen = []
    for _ in range(limit_chunks):
        ws.send_msg(cid, wsraw.DATA, chunk)
        try:
            while True:
                m = ws.recv_tunnel(timeout=0.001)
                seen.append((m.type, m.conn_id, m.text))
        except TimeoutError:
            pass
        if any(t == wsraw.ERROR and c == cid for t, c, _ in seen):
            return seen
    raise AssertionError(f"no ERROR after {limit_chunks} chunks: {seen[:20]}")


def _flood_until_cut(ws, cid):
    """Floods cid (_flood_until_error) until the peer cuts it, then reads up
    to the Pong of a Ping sent after the last DATA: the peer has then answered
    every DATA we sent, including those still on their way when it cut.
    Asserts that it said PAUSE first, cut with "buffer limit exceeded", and
    after that only answered the late DATA: "connection not found" each."""
    seen = _flood_until_error(ws, cid)
    seen += [(m.type, m.conn_id, m.text) for m in support.ping_barrier(ws)]
    cut = next(i for i, (t, c, _) in enumerate(seen) if t == wsraw.ERROR and c == cid)
    assert (wsraw.PAUSE, cid, "") in seen[:cut], seen
    assert seen[cut] == (wsraw.ERROR, cid, "buffer limit exceeded"), seen
    late = seen[cut + 1:]
    assert all(t == wsraw.ERROR and c == cid and text.startswith("connection not found ")
               for t, c, text in late), late
    return seen


def test_server_cuts_a_peer_that_ignores_pause_others_live_on(rd, tunnel_leak_check):
    with rd.Server(listen="127.0.0.1:0", max_buffer=64 << 10, hard_cap=1 << 20) as srv:
        ws = raw_session(srv)
        try:
            flooded = srv.dial("raw-1", "tcp", "10.9.9.9:80", timeout=TIMEOUT)
            fid = ws.recv_tunnel().conn_id
            other = srv.dial("raw-1", "tcp", "10.9.9.9:81", timeout=TIMEOUT)
            other.settimeout(TIMEOUT)
            oid = ws.recv_tunnel().conn_id
            _flood_until_cut(ws, fid)
            expect_end(flooded, "buffer limit exceeded")
            flooded.close()
            # The other connection carries data both ways.
            ws.send_msg(oid, wsraw.DATA, b"down")
            assert recv_exact(other, 4) == b"down"
            other.sendall(b"up")
            assert ws.recv_data(oid, 2) == b"up"
            assert [c["id"] for c in srv.connections()] == [oid]
            other.close()
            assert ws.recv_tunnel().text == "EOF"
            check_balanced(srv)
        finally:
            ws.close()
        session_gone(srv)
    wait_engine_idle(rd)


class Unread(support._ThreadedTCPServer):
    """Accepts and reads nothing until `release` is set; then reads until
    the client's EOF (a FIN queued behind unread data arrives only then)."""

    def __init__(self):
        self.release = threading.Event()
        super().__init__()

    def serve(self, conn):
        self.release.wait(TIMEOUT)
        n = 0
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return support.Finished(n, "")
            n += len(chunk)


def test_agent_cuts_a_server_that_ignores_pause_others_live_on(rd, tunnel_leak_check,
                                                               echo_server):
    sink = Unread()
    try:
        with wsraw.WSListener() as listener:
            with rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-r"},
                           max_buffer=64 << 10, hard_cap=1 << 20) as cli:
                ws, _ = listener.accept(timeout=TIMEOUT)
                try:
                    ws.send_msg(2, wsraw.CONNECT, f"tcp/{sink.address}")
                    ws.send_msg(3, wsraw.CONNECT, f"tcp/{echo_server.address}")
                    sink.wait_accepted(1)
                    _flood_until_cut(ws, 2)
                    ws.send_msg(3, wsraw.DATA, b"echo me")
                    assert ws.recv_data(3, 7) == b"echo me"
                    sink.release.set()
                    (done,) = sink.wait_finished(1)  # the agent closed it
                    assert done.error is None
                    ws.send_msg(3, wsraw.ERROR, "EOF")
                    echo_server.wait_open(0)
                    m = support.wait_balanced(cli)
                    label = key(addr=sink.address, clientkey="client", proto="tcp")
                    assert m[support.ADD_CONN][label] == m[support.REMOVE_CONN][label] == 1
                    assert rd.engine_stats()["buffered_bytes"] == 0
                finally:
                    ws.close()
    finally:
        sink.release.set()
        sink.close()
    wait_engine_idle(rd)


# ---------------------------------------------------------------------------
# Unknown ids, ERROR twice, bogus SYNC lists


def test_data_for_unknown_ids_is_answered(tunnel, echo_server):
    ws = raw_session(tunnel.srv)
    try:
        ids = [0, 1, 999_999, -5, 1 << 62, -(1 << 63)]
        for cid in ids:
            ws.send_msg(cid, wsraw.DATA, b"who?")
        for cid in ids:
            answer = ws.recv_tunnel()
            assert answer.type == wsraw.ERROR and answer.conn_id == cid, answer
            assert re.fullmatch(rf"connection not found raw-1/-?\d+/{cid}", answer.text), \
                answer.text
        assert not support.family(tunnel.srv.metrics(), support.ADD_CONN).get(
            key(addr="", clientkey="raw-1", proto=""))
        assert tunnel.srv.connections() == []
        # Nothing was created for them, and the session still serves.
        sock = tunnel.dial("10.9.9.9:80", key="raw-1")
        cid = ws.recv_tunnel().conn_id
        ws.send_msg(cid, wsraw.DATA, b"ok")
        assert recv_exact(sock, 2) == b"ok"
        ws.send_msg(cid, wsraw.ERROR, "EOF")
        expect_end(sock, None)
        sock.close()
    finally:
        ws.close()
    session_gone(tunnel.srv)


def test_error_twice_counts_once(tunnel):
    ws = raw_session(tunnel.srv)
    try:
        sock = tunnel.dial("10.9.9.9:80", key="raw-1")
        cid = ws.recv_tunnel().conn_id
        ws.send_msg(cid, wsraw.ERROR, "boom")
        ws.send_msg(cid, wsraw.ERROR, "boom again")
        ws.send_msg(cid, wsraw.ERROR, "EOF")
        expect_end(sock, "boom")
        sock.close()
        m = support.wait_balanced(tunnel.srv)
        label = key(addr="10.9.9.9:80", clientkey="raw-1", proto="tcp")
        assert m[support.ADD_CONN][label] == m[support.REMOVE_CONN][label] == 1
        # No answer to the echoes; the next message is the next CONNECT.
        later = tunnel.dial("10.9.9.9:81", key="raw-1")
        msg = ws.recv_tunnel()
        assert msg.type == wsraw.CONNECT and msg.address == "10.9.9.9:81", msg
        later.close()
        assert ws.recv_tunnel().text == "EOF"
    finally:
        ws.close()
    session_gone(tunnel.srv)


def test_agent_counts_error_twice_once(rd, tunnel_leak_check, echo_server):
    with wsraw.WSListener() as listener:
        with rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-r"}) as cli:
            ws, _ = listener.accept(timeout=TIMEOUT)
            try:
                ws.send_msg(2, wsraw.CONNECT, f"tcp/{echo_server.address}")
                ws.send_msg(2, wsraw.DATA, b"x")
                assert ws.recv_data(2, 1) == b"x"
                for text in ("boom", "boom", "EOF"):
                    ws.send_msg(2, wsraw.ERROR, text)
                echo_server.wait_open(0)
                m = support.wait_balanced(cli)
                label = key(addr=echo_server.address, clientkey="client", proto="tcp")
                assert m[support.ADD_CONN][label] == m[support.REMOVE_CONN][label] == 1
                # Still serving.
                ws.send_msg(4, wsraw.CONNECT, f"tcp/{echo_server.address}")
                ws.send_msg(4, wsraw.DATA, b"y")
                assert ws.recv_data(4, 1) == b"y"
                ws.send_msg(4, wsraw.ERROR, "EOF")
                echo_server.wait_open(0)
                support.wait_balanced(cli)
            finally:
                ws.close()
    wait_engine_idle(rd)


def test_bogus_sync_lists(tunnel):
    srv = tunnel.srv
    ws = raw_session(srv)
    try:
        socks = [tunnel.dial("10.9.9.9:80", key="raw-1") for _ in range(3)]
        ids = [ws.recv_tunnel().conn_id for _ in socks]

        def sync(listed):
            ws.send_raw(wsraw.encode_frame(wsraw.OP_BINARY, wsraw.encode_message(
                ws.next_id(), 0, wsraw.SYNC_CONNECTIONS,
                b"".join(i.to_bytes(8, "little", signed=True) for i in listed))))

        # Every listed id survives, whatever else the list holds: ids that
        # never existed (below ours), duplicates, the wrong order.
        for listed in ([-7, 0, 1] + ids, [i for i in ids for _ in (0, 1)], ids[::-1], ids):
            sync(listed)
        # Each SYNC is handled before the next message: a Ping's Pong after
        # them means they all were.
        assert support.ping_barrier(ws) == []
        assert sorted(c["id"] for c in srv.connections()) == ids
        # An id far above ours says the peer has seen (and dropped) ours.
        sync([(1 << 63) - 1])
        for s in socks:
            expect_end(s, "connection closed by sync")
            s.close()
        assert srv.connections() == []
        check_balanced(srv)
        # A SYNC whose length is not a multiple of 8 is a protocol error.
        ws.send_binary(wsraw.encode_message(ws.next_id(), 0, wsraw.SYNC_CONNECTIONS) + b"\x01")
        ws.wait_closed(TIMEOUT)
    finally:
        ws.abort()
    session_gone(srv)


# ---------------------------------------------------------------------------
# A peer that disappears in the middle of a message


_MESSAGE = wsraw.encode_message(7, 2, wsraw.DATA, b"d" * 1000)
CUTS = {
    "frame_header": wsraw.encode_frame(wsraw.OP_BINARY, _MESSAGE)[:3],
    "frame_payload": wsraw.encode_frame(wsraw.OP_BINARY, _MESSAGE)[:200],
    "between_fragments": wsraw.encode_frame(wsraw.OP_BINARY, _MESSAGE[:100], fin=False),
    "tunnel_header": wsraw.encode_frame(wsraw.OP_BINARY, _MESSAGE[:2], fin=False),
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_server_peer_disappears_mid_message(tunnel, echo_server, cut):
    ws = raw_session(tunnel.srv)
    socks = [tunnel.dial("10.9.9.9:80", key="raw-1") for _ in range(2)]
    ids = [ws.recv_tunnel().conn_id for _ in socks]
    ws.send_msg(ids[0], wsraw.DATA, b"before")
    assert recv_exact(socks[0], 6) == b"before"
    ws.send_raw(CUTS[cut])
    ws.abort()
    for s in socks:
        expect_end(s, "tunnel disconnect")
        s.close()
    session_gone(tunnel.srv)
    s = tunnel.dial(echo_server.port)  # the server serves on
    round_trip(s)
    s.close()


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_client_peer_disappears_mid_message(rd, tunnel_leak_check, echo_server, cut):
    with wsraw.WSListener() as listener:
        with rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-r"}, backoff_min=0.1,
                       backoff_max=0.5) as cli:
            ws, _ = listener.accept(timeout=TIMEOUT)
            ws.send_msg(2, wsraw.CONNECT, f"tcp/{echo_server.address}")
            ws.send_msg(2, wsraw.DATA, b"x")
            assert ws.recv_data(2, 1) == b"x"
            ws.send_raw(CUTS[cut])
            ws.abort()
            echo_server.wait_open(0)
            check_balanced(cli)
            ws, _ = listener.accept(timeout=TIMEOUT)  # it reconnects
            ws.close()
    wait_engine_idle(rd)


def test_pause_while_connecting_is_lifted_when_the_backlog_drains(rd, tunnel_leak_check,
                                                                  echo_server):
    # More than max_buffer arrives before the agent's local dial completes:
    # the agent pauses the server. The dial completes and the socket takes
    # the whole backlog at once (no write is left to complete): the agent
    # must still RESUME, or the connection stays frozen.
    chunk = bytes(range(256)) * 16  # 4 KiB
    with wsraw.WSListener() as listener:
        with rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-r"},
                       max_buffer=16 << 10) as cli:
            ws, _ = listener.accept(timeout=TIMEOUT)
            try:
                # One write: CONNECT and 32 KiB of DATA reach the agent in
                # one read, before its dial can complete.
                burst = wsraw.encode_frame(wsraw.OP_BINARY, wsraw.encode_message(
                    ws.next_id(), 2, wsraw.CONNECT, f"tcp/{echo_server.address}".encode()),
                    mask=False)
                for _ in range(8):
                    burst += wsraw.encode_frame(wsraw.OP_BINARY, wsraw.encode_message(
                        ws.next_id(), 2, wsraw.DATA, chunk), mask=False)
                ws.send_raw(burst)
                seen, echoed = [], 0
                while wsraw.RESUME not in seen:
                    msg = ws.recv_tunnel()
                    assert msg.conn_id == 2 and msg.type != wsraw.ERROR, msg
                    seen.append(msg.type)
                    if msg.type == wsraw.DATA:
                        echoed += len(msg.payload)
                assert seen.index(wsraw.PAUSE) < seen.index(wsraw.RESUME)
                ws.send_msg(2, wsraw.DATA, b"after resume")
                rest = 8 * len(chunk) + len(b"after resume") - echoed
                assert len(ws.recv_data(2, rest)) == rest
                ws.send_msg(2, wsraw.ERROR, "EOF")
                echo_server.wait_open(0)
                support.wait_balanced(cli)
            finally:
                ws.close()
    wait_engine_idle(rd)
