"""The remotedialer_py.conn logger, from real dials: failed dials on both
sides (news, logged at INFO with their fields) and the data trace (each
tunnel message at DEBUG; data_trace / CATTLE_TUNNEL_DATA_DEBUG), whose
bounded ring drops and counts what a stuck log cannot take."""
import http.client
import json
import logging
import queue
import threading
import urllib.request

import pytest

import support
from support import TIMEOUT, wait_for

CONN = "remotedialer_py.conn"
ENV = "CATTLE_TUNNEL_DATA_DEBUG"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def conn_records(caplog, level=None, **fields):
    """Our logger's records whose extra fields match (a snapshot)."""
    return [r for r in list(caplog.records) if r.name == CONN
            and (level is None or r.levelno == level)
            and all(getattr(r, k, None) == v for k, v in fields.items())]


def wait_record(caplog, what, level=None, **fields):
    wait_for(lambda: conn_records(caplog, level, **fields), what=what)
    return conn_records(caplog, level, **fields)[0]


def sessions_of(caplog, key, conn_id):
    """The session keys of a traced dial's two ends, or None before both
    logged its CONNECT: the server's (client key `key`) and its agent's (the
    session that received that CONNECT: the same message id)."""
    for w in conn_records(caplog, logging.DEBUG, client_key=key, conn_id=conn_id,
                          msg_type="CONNECT", direction="send"):
        for r in conn_records(caplog, logging.DEBUG, side="client", conn_id=conn_id,
                              msg_type="CONNECT", direction="recv", msg_id=w.msg_id):
            return {w.session, r.session}
    return None


def trace_of(caplog, key, conn_id):
    """(side, direction, type, length) of both ends' records of one dial."""
    sessions = sessions_of(caplog, key, conn_id) or ()
    return [(r.side, r.direction, r.msg_type, r.length)
            for r in conn_records(caplog, logging.DEBUG, conn_id=conn_id)
            if r.session in sessions]


# -- failed dials ------------------------------------------------------------


def test_agent_refused_target(rd, tunnel_leak_check, caplog):
    caplog.set_level(logging.INFO, logger=CONN)
    failed = queue.Queue()
    with rd.Server(on_dial_failed=failed.put) as srv:
        with support.make_client(rd, srv.url, "refuser", allow=["tcp/127.0.0.1:1"]):
            sock = srv.dial("refuser", "tcp", "127.0.0.1:2")
            assert support.recv_until_eof(sock) == b""
            assert sock.tunnel_error == "connect not allowed"
            sock.close()
            r = wait_record(caplog, "the agent's refusal", url=srv.url)
            assert r.levelno == logging.INFO
            assert (r.proto, r.address, r.reason) == ("tcp", "127.0.0.1:2", "connect not allowed")
            assert "dial tcp/127.0.0.1:2 failed" in r.getMessage()
            assert srv.url in r.getMessage() and "connect not allowed" in r.getMessage()
            # The server logs the same failure as its agent's answer, and
            # tells its hook.
            s = wait_record(caplog, "the server's record", client_key="refuser")
            assert (s.proto, s.address, s.reason) == ("tcp", "127.0.0.1:2", "connect not allowed")
            e = failed.get(timeout=TIMEOUT)
            assert (e.kind, e.client_key, e.proto, e.address, e.reason) == \
                ("dial_failed", "refuser", "tcp", "127.0.0.1:2", "connect not allowed")


def test_agent_dial_to_closed_port(rd, tunnel_leak_check, caplog):
    caplog.set_level(logging.INFO, logger=CONN)
    port = support.closed_port()
    failed = queue.Queue()
    with rd.Server() as srv:
        with support.make_client(rd, srv.url, "dialer", on_dial_failed=failed.put):
            sock = srv.dial("dialer", "tcp", f"127.0.0.1:{port}")
            assert support.recv_until_eof(sock) == b""
            sock.close()
            text = f"dial tcp 127.0.0.1:{port}: connect: connection refused"
            r = wait_record(caplog, "the agent's failed dial", url=srv.url)
            assert (r.proto, r.address, r.reason) == ("tcp", f"127.0.0.1:{port}", text)
            assert not hasattr(r, "client_key")
            e = failed.get(timeout=TIMEOUT)
            assert (e.kind, e.url, e.address, e.reason) == \
                ("dial_failed", srv.url, f"127.0.0.1:{port}", text)


def test_server_side_failure_text(rd, tunnel_leak_check, caplog, echo_server):
    caplog.set_level(logging.INFO, logger=CONN)
    port = support.closed_port()
    with rd.Server() as srv:
        with support.make_client(rd, srv.url, "far"):
            sock = srv.dial("far", "tcp", f"127.0.0.1:{port}")
            assert support.recv_until_eof(sock) == b""
            sock.close()
            r = wait_record(caplog, "the server's record", client_key="far")
            assert r.levelno == logging.INFO
            assert (r.proto, r.address) == ("tcp", f"127.0.0.1:{port}")
            assert r.reason == f"dial tcp 127.0.0.1:{port}: connect: connection refused"
            assert "client far" in r.getMessage() and r.reason in r.getMessage()
            # A connection that carried data, then ended, is no failed dial.
            ok = srv.dial("far", "tcp", echo_server.address)
            support.round_trip(ok)
            ok.close()
            echo_server.wait_finished(1)
            support.wait_balanced(srv)
            assert [x.address for x in conn_records(caplog, client_key="far")] == \
                [f"127.0.0.1:{port}"]


def test_failure_through_a_peer(rd, tunnel_leak_check):
    """B dials an agent of A's: both servers tell of the failure, B with the
    agent's key and proto (not the wire's "key::proto") and A's text."""
    qa, qb = queue.Queue(), queue.Queue()
    port = support.closed_port()
    with rd.Server(peer_id="A", peer_token="tok-a", on_dial_failed=qa.put) as a, \
            rd.Server(peer_id="B", peer_token="tok-b", on_dial_failed=qb.put) as b:
        a.add_peer(b.url, "B", "tok-b")
        b.add_peer(a.url, "A", "tok-a")
        with support.make_client(rd, a.url, "far-agent"):
            wait_for(lambda: b.route("far-agent") == "A", what="B's route through A")
            sock = b.dial("far-agent", "tcp", f"127.0.0.1:{port}")
            assert support.recv_until_eof(sock) == b""
            sock.close()
            text = f"dial tcp 127.0.0.1:{port}: connect: connection refused"
            for q in (qa, qb):
                e = q.get(timeout=TIMEOUT)
                assert (e.kind, e.client_key, e.proto, e.address, e.reason) == \
                    ("dial_failed", "far-agent", "tcp", f"127.0.0.1:{port}", text)
            support.wait_balanced(b)


def test_quiet_without_logger_or_hook(rd, tunnel_leak_check, caplog):
    caplog.set_level(logging.WARNING, logger=CONN)
    with rd.Server() as srv:
        with support.make_client(rd, srv.url, "quiet"):
            sock = srv.dial("quiet", "tcp", f"127.0.0.1:{support.closed_port()}")
            assert support.recv_until_eof(sock) == b""
            sock.close()
            support.wait_balanced(srv)
    assert conn_records(caplog) == []


def test_bad_hook(rd):
    with pytest.raises(TypeError, match="on_dial_failed must be callable"):
        rd.Server(on_dial_failed=1)
    with pytest.raises(TypeError, match="on_dial_failed must be callable"):
        rd.Client("ws://127.0.0.1:1/connect", on_dial_failed="x")


# -- the data trace ----------------------------------------------------------


def traced_dial(rd, srv, key, echo_server, payload):
    """One real dial through srv's agent `key`: payload there and back, then
    closed from the server's side after the echo. Returns its conn id."""
    sock = srv.dial(key, "tcp", echo_server.address)
    support.round_trip(sock, payload)
    conn_id = sock.conn_id
    sock.close()
    return conn_id


def expect_full_trace(caplog, key, conn_id, n):
    """Both sides' records of one dial: CONNECT, the DATA there and back
    (n bytes each way) and the ERROR "EOF" that closes it, on both ends."""
    want = {("server", "send", "CONNECT"), ("client", "recv", "CONNECT"),
            ("server", "send", "DATA"), ("client", "recv", "DATA"),
            ("client", "send", "DATA"), ("server", "recv", "DATA"),
            ("server", "send", "ERROR"), ("client", "recv", "ERROR")}
    wait_for(lambda: want <= {t[:3] for t in trace_of(caplog, key, conn_id)},
             what="the trace of the dial on both sides")
    seen = trace_of(caplog, key, conn_id)
    data = [t for t in seen if t[2] == "DATA"]
    assert sum(t[3] for t in data if t[:2] == ("server", "send")) == n
    assert sum(t[3] for t in data if t[:2] == ("client", "recv")) == n
    assert sum(t[3] for t in data if t[:2] == ("client", "send")) == n
    assert sum(t[3] for t in data if t[:2] == ("server", "recv")) == n
    return seen


def test_trace_of_a_real_dial(rd, tunnel_leak_check, caplog, echo_server):
    caplog.set_level(logging.DEBUG, logger=CONN)
    payload = b"hello\x00\xfftrace" + bytes(range(100))
    with rd.Server(data_trace=True) as srv:
        with support.make_client(rd, srv.url, "traced", data_trace=True):
            conn_id = traced_dial(rd, srv, "traced", echo_server, payload)
            expect_full_trace(caplog, "traced", conn_id, len(payload))
            recs = conn_records(caplog, logging.DEBUG, conn_id=conn_id)
            connect = [r for r in recs if r.msg_type == "CONNECT" and r.side == "server"][0]
            assert connect.data == f"tcp/{echo_server.address}"
            assert connect.client_key == "traced"
            msg = connect.getMessage()
            assert msg.startswith("server traced: WRITE ") and \
                f"CONNECT      [{conn_id}]: tcp/{echo_server.address}" in msg
            sent = [r for r in recs if r.msg_type == "DATA" and r.direction == "send"
                    and r.side == "server"][0]
            # The first 64 bytes, escaped; the rest elided.
            assert sent.data == repr(payload[:64])[2:-1] + "..."
            assert f"[{conn_id}]: {len(payload)} bytes: hello\\x00\\xfftrace" in sent.getMessage()
            close = [r for r in recs if r.msg_type == "ERROR" and r.side == "server"][0]
            assert close.data == "EOF" and close.length == 3
            # Message ids: each side's own sequence, and the receiver sees the
            # sender's.
            ids = {(r.side, r.direction, r.msg_type): r.msg_id for r in recs}
            assert ids[("server", "send", "CONNECT")] == ids[("client", "recv", "CONNECT")]
            assert ids[("server", "send", "ERROR")] > ids[("server", "send", "CONNECT")]


def test_trace_on_from_the_environment(rd, tunnel_leak_check, caplog, echo_server,
                                       monkeypatch):
    caplog.set_level(logging.DEBUG, logger=CONN)
    monkeypatch.setenv(ENV, "true")
    with rd.Server() as srv:
        with support.make_client(rd, srv.url, "env-traced"):
            conn_id = traced_dial(rd, srv, "env-traced", echo_server, b"from the environment")
            expect_full_trace(caplog, "env-traced", conn_id, 20)
    monkeypatch.setenv(ENV, "1")  # Go's test: only "true" turns it on
    with rd.Server() as srv:
        with support.make_client(rd, srv.url, "env-one"):
            traced_dial(rd, srv, "env-one", echo_server, b"x")
            barrier(rd, caplog, echo_server)
    assert conn_records(caplog, client_key="env-one") == []


def barrier(rd, caplog, echo_server):
    """Returns once a traced dial made now has been logged to its end: the
    ring is in order, so what was recorded before it has been logged by
    then, and nothing of it is left for a later test."""
    with rd.Server(data_trace=True) as srv:
        with support.make_client(rd, srv.url, "barrier", data_trace=True):
            conn_id = traced_dial(rd, srv, "barrier", echo_server, b"barrier")
            expect_full_trace(caplog, "barrier", conn_id, 7)


def test_trace_off_by_default(rd, tunnel_leak_check, caplog, echo_server):
    caplog.set_level(logging.DEBUG, logger=CONN)
    with rd.Server() as srv:
        with support.make_client(rd, srv.url, "untraced"):
            conn_id = traced_dial(rd, srv, "untraced", echo_server, b"not traced")
            barrier(rd, caplog, echo_server)
    assert conn_records(caplog, client_key="untraced") == []
    # The agent's records name no key: none but the barrier's agent's came.
    agents = {r.session for r in conn_records(caplog, logging.DEBUG, side="client")}
    assert len(agents) == 1, agents


def test_trace_needs_the_debug_level(rd, tunnel_leak_check, caplog, echo_server):
    caplog.set_level(logging.INFO, logger=CONN)
    with rd.Server(data_trace=True) as srv:
        with support.make_client(rd, srv.url, "info-only", data_trace=True):
            traced_dial(rd, srv, "info-only", echo_server, b"info")
            caplog.set_level(logging.DEBUG, logger=CONN)
            barrier(rd, caplog, echo_server)
    assert conn_records(caplog, client_key="info-only") == []


def test_bad_data_trace_value(rd):
    with pytest.raises((TypeError, ValueError), match="data_trace"):
        rd.Server(data_trace="yes")


class _Gate(logging.Handler):
    """Holds the trace's reader inside its first record until opened."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.open = threading.Event()
        self.held = threading.Event()

    def emit(self, record):
        if threading.current_thread().name == "remotedialer-trace":
            self.held.set()
            self.open.wait(TIMEOUT * 4)


def test_flood_with_a_stuck_log_drops_and_counts(rd, tunnel_leak_check, caplog, echo_server):
    """The reader is stuck in a handler while a traced dial makes thousands
    of messages: the engine keeps at most its ring (no memory grows, the
    loop never waits: the round trips go on), drops the rest and counts
    them, and the count is logged when the reader is let go. Event-driven
    throughout: the gate, not timing, makes the log fall behind."""
    caplog.set_level(logging.DEBUG, logger=CONN)
    gate = _Gate()
    logging.getLogger(CONN).addHandler(gate)
    capacity, batch = 4096, 256  # RD_TRACE_CAPACITY, one next_trace batch
    rounds = 3000  # 4 records each (DATA sent and received, both ways)
    try:
        with rd.Server(data_trace=True) as srv:
            with support.make_client(rd, srv.url, "flood", data_trace=True):
                sock = srv.dial("flood", "tcp", echo_server.address)
                conn_id = sock.conn_id
                support.round_trip(sock, b"first")
                assert gate.held.wait(TIMEOUT), "the reader never logged a record"
                rd.engine_trim()
                heap_before = rd.engine_stats()["heap_bytes"]
                for i in range(rounds):
                    support.round_trip(sock, b"%05d" % i)
                rd.engine_trim()
                grown = rd.engine_stats()["heap_bytes"] - heap_before
                # 12000 records of ~200 bytes each would be 2.4 MB.
                assert grown < 256 * 1024, grown
                gate.open.set()
                sock.close()
                warn = wait_record(caplog, "the drop count", logging.WARNING)
                assert "records dropped" in warn.getMessage()
                barrier(rd, caplog, echo_server)
    finally:
        gate.open.set()
        logging.getLogger(CONN).removeHandler(gate)
    dropped = sum(r.dropped for r in conn_records(caplog, logging.WARNING)
                  if hasattr(r, "dropped"))
    kept = len(trace_of(caplog, "flood", conn_id))
    assert dropped > 0
    assert kept + dropped >= 4 * rounds
    # While the reader was stuck: one batch in its hands and the ring full.
    assert kept <= capacity + batch + 16, kept


def test_cli_json_has_the_conn_records(run_cli, echo_server):
    srv = run_cli("server", "--listen", "127.0.0.1:0", "--log-format", "json", "--data-trace")
    url = srv.wait_line(r"listening on (ws://\S+)").group(1)
    agent = run_cli("client", "--connect", url, "-id", "json-conn", "--allow",
                    f"tcp/{echo_server.address}", "--log-format", "json", ready=None)
    agent.wait_line(r"connected to .* as json-conn")
    port = url.split(":")[2].split("/")[0]
    closed = support.closed_port()
    for target in (echo_server.address, f"127.0.0.1:{closed}"):
        try:
            urllib.request.urlopen(
                f"http://127.0.0.1:{port}/client/json-conn/http/{target}/x", timeout=TIMEOUT)
        except (OSError, http.client.HTTPException):
            pass  # the echo's answer is no HTTP, the refused dial's a 500
    m = srv.wait_line(r'^\{.*"msg_type": "CONNECT".*\}$')
    doc = json.loads(m.group(0))
    assert doc["logger"] == CONN and doc["level"] == "DEBUG"
    assert doc["client_key"] == "json-conn" and doc["direction"] == "send"
    assert doc["data"] == f"tcp/{echo_server.address}" and doc["conn_id"] >= 1
    m = srv.wait_line(r'^\{.*"reason": "connect not allowed".*\}$')
    doc = json.loads(m.group(0))
    assert doc["logger"] == CONN and doc["level"] == "INFO"
    assert (doc["client_key"], doc["proto"], doc["address"]) == \
        ("json-conn", "tcp", f"127.0.0.1:{closed}")
    m = agent.wait_line(r'^\{.*"reason": "connect not allowed".*\}$')
    doc = json.loads(m.group(0))
    assert (doc["logger"], doc["url"], doc["address"]) == (CONN, url, f"127.0.0.1:{closed}")
    assert agent.stop() == 0 and srv.stop() == 0
