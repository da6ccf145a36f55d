"""Property test: random sequences of valid and invalid frames and tunnel
messages from several raw clients at once (tests/wsraw.py) never hurt the
server or anyone else.

Each example opens two to four raw sessions on one server that also has a
well-behaved agent ("good"), then plays a random interleaving of actions:

- valid, which must leave the session up: tunnel messages of every type for
  unknown connections, a CONNECT (answered "connect not allowed"), unknown
  message types, Pings and Pongs, fragmented messages with control frames in
  between; and real connections the server dials through the raw client,
  with DATA and ERROR from the raw side and bytes and closes from the
  server's socket (a SYNC_CONNECTIONS that lists a later id ends the ones it
  omits, as the server's sync rule says, and the model follows);
- invalid, which must end that session (and only it) with the right close
  code: text messages, reserved opcodes, RSV bits, unmasked frames, bad
  control frames, orphan continuations, malformed tunnel messages, a message
  over max_message, garbage, a Close, a dropped TCP connection.

After each example: every session that only saw valid input is still up
(a Ping gets its Pong) and its connections carried exactly the bytes sent;
every other session has ended and its connections read EOF; the good agent's
long-lived connection and a fresh dial both work; once the raw clients are
gone, the counters balance and the engine holds what it held before.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import support
import wsraw
from support import recv_exact, wait_for

MAX_MESSAGE = 64 << 10
# Waits inside an example: long enough for a loaded machine, short enough
# that shrinking a failure does not take hours.
WAIT = 10.0
RAW_KEYS = [f"raw-{i}" for i in range(4)]
GOOD = "good"
# Connection ids far above anything the server hands out in a test.
UNKNOWN_IDS = st.integers(min_value=1 << 40, max_value=(1 << 62))
INVALID_VECTORS = [bytes.fromhex(v["message_hex"]) for v in json.loads(
    (Path(__file__).resolve().parent / "vectors.json").read_text())["invalid"]]

# Close codes (RFC 6455) the server ends a session with.
NORMAL, PROTOCOL, UNSUPPORTED, TOO_BIG = 1000, 1002, 1003, 1009


# ---------------------------------------------------------------------------
# Actions: (kind, params). Valid kinds keep the session; the rest end it.

small_bytes = st.binary(max_size=300)
msg_ids = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@st.composite
def unknown_message(draw):
    """A well-formed tunnel message about a connection nobody has."""
    mtype = draw(st.sampled_from([wsraw.DATA, wsraw.CONNECT, wsraw.ERROR, wsraw.ADD_CLIENT,
                                  wsraw.REMOVE_CLIENT, wsraw.PAUSE, wsraw.RESUME,
                                  wsraw.SYNC_CONNECTIONS]))
    conn_id = 0 if mtype == wsraw.SYNC_CONNECTIONS else draw(UNKNOWN_IDS)
    if mtype == wsraw.CONNECT:
        payload = draw(st.sampled_from([b"tcp/", b"unix/"])) + draw(small_bytes)
    elif mtype == wsraw.SYNC_CONNECTIONS:
        payload = wsraw.sync_payload(draw(st.lists(UNKNOWN_IDS, max_size=8)))
    elif mtype in (wsraw.PAUSE, wsraw.RESUME):
        payload = b""
    else:
        payload = draw(small_bytes)
    return wsraw.encode_message(draw(msg_ids), conn_id, mtype, payload)


@st.composite
def unknown_type_message(draw):
    mtype = draw(st.one_of(st.integers(9, 1000), st.integers(-1000, 0)))
    return wsraw.encode_message(draw(msg_ids), draw(UNKNOWN_IDS), mtype, draw(small_bytes))


@st.composite
def malformed_message(draw):
    """A binary message the tunnel decoder must refuse."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.sampled_from(INVALID_VECTORS))
    if choice == 1:
        # A strict prefix of a DATA header (its deadline is mandatory).
        header = wsraw.encode_message(draw(msg_ids), draw(UNKNOWN_IDS), wsraw.DATA)
        return header[:draw(st.integers(0, len(header) - 1))]
    if choice == 2:
        sync = wsraw.encode_message(draw(msg_ids), 0, wsraw.SYNC_CONNECTIONS)
        return sync + draw(st.binary(min_size=1, max_size=64).filter(lambda b: len(b) % 8))
    connect = wsraw.encode_message(draw(msg_ids), draw(UNKNOWN_IDS), wsraw.CONNECT)
    return connect + draw(st.binary(max_size=200).filter(lambda b: b"/" not in b))


valid_actions = st.one_of(
    st.tuples(st.just("message"), unknown_message()),
    st.tuples(st.just("message"), unknown_type_message()),
    st.tuples(st.just("ping"), st.binary(max_size=125)),
    st.tuples(st.just("pong"), st.binary(max_size=125)),
    st.tuples(st.just("fragmented"), st.tuples(unknown_message(),
                                               st.lists(st.integers(0, 40), max_size=4))),
    st.tuples(st.just("dial"), st.none()),
    st.tuples(st.just("dial_data"), st.tuples(st.integers(0, 7), st.binary(min_size=1,
                                                                            max_size=2000))),
    st.tuples(st.just("dial_error"), st.tuples(st.integers(0, 7),
                                               st.sampled_from(["EOF", "boom", "reset by peer"]))),
    st.tuples(st.just("sock_write"), st.tuples(st.integers(0, 7), st.binary(min_size=1,
                                                                             max_size=2000))),
    st.tuples(st.just("sock_close"), st.integers(0, 7)),
)

fatal_actions = st.one_of(
    st.tuples(st.just("text"), st.binary(max_size=50)),
    st.tuples(st.just("bad_opcode"), st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])),
    st.tuples(st.just("rsv"), st.integers(1, 7)),
    st.tuples(st.just("unmasked"), unknown_message()),
    st.tuples(st.just("big_control"), st.binary(min_size=126, max_size=300)),
    st.tuples(st.just("fragmented_control"), st.binary(max_size=20)),
    st.tuples(st.just("orphan_continuation"), st.binary(max_size=50)),
    st.tuples(st.just("malformed"), malformed_message()),
    st.tuples(st.just("oversize"), st.tuples(st.integers(1, 1 << 20), st.booleans())),
    st.tuples(st.just("garbage"), st.binary(min_size=2, max_size=200)),
    st.tuples(st.just("close"), st.none()),
    st.tuples(st.just("abort"), st.none()),
)

EXPECTED_CLOSE = {
    "text": UNSUPPORTED, "bad_opcode": PROTOCOL, "rsv": PROTOCOL, "unmasked": PROTOCOL,
    "big_control": PROTOCOL, "fragmented_control": PROTOCOL, "orphan_continuation": PROTOCOL,
    "malformed": PROTOCOL, "oversize": TOO_BIG, "garbage": PROTOCOL, "close": NORMAL,
    "abort": None,
}

scenario = st.tuples(
    st.integers(2, 4),  # raw clients
    st.lists(st.tuples(st.integers(0, 3),
                       st.one_of(valid_actions, valid_actions, valid_actions, fatal_actions)),
             min_size=1, max_size=30),
)


# ---------------------------------------------------------------------------
# The model of one raw client


@dataclass
class Dial:
    sock: object
    conn_id: int
    expected: bytearray = field(default_factory=bytearray)  # raw -> server socket
    sent: bytearray = field(default_factory=bytearray)      # server socket -> raw
    # "open", the raw side's ERROR text, "connection closed by sync", or
    # "server closed" (our socket closed).
    error: str = "open"


@dataclass
class Raw:
    key: str
    ws: object
    dead: str = None  # the fatal action that ended it
    dials: list = field(default_factory=list)
    log: list = field(default_factory=list)
    received: dict = field(default_factory=dict)  # conn id -> DATA bytes from the server
    connects: list = field(default_factory=list)

    def pump(self, done, what, timeout=WAIT):
        """Reads the server's messages (recording DATA and CONNECTs; Pings are
        answered, Pongs recorded) until done() is true."""
        deadline = time.monotonic() + timeout
        parts = None
        while not done():
            try:
                f = self.ws.recv_frame(max(0.0, deadline - time.monotonic()))
            except (wsraw.SessionClosed, TimeoutError) as e:
                raise AssertionError(f"{self.key}: no {what} ({e}) after {self.log}") from None
            if f.opcode == wsraw.OP_PING:
                self.ws.send_pong(f.payload)
                continue
            if f.opcode == wsraw.OP_PONG:
                self.ws.pongs.append(f.payload)
                continue
            assert f.opcode != wsraw.OP_CLOSE, \
                f"{self.key} closed {wsraw.parse_close(f.payload)} waiting for {what} " \
                f"after {self.log}"
            assert f.opcode in (wsraw.OP_BINARY, wsraw.OP_CONT), f"server sent {f}"
            parts = [f.payload] if f.opcode == wsraw.OP_BINARY else parts + [f.payload]
            if not f.fin:
                continue
            msg = wsraw.decode_message(b"".join(parts))
            if msg.type == wsraw.DATA:
                self.received.setdefault(msg.conn_id, bytearray()).extend(msg.payload)
            elif msg.type == wsraw.CONNECT:
                self.connects.append(msg)

    def barrier(self):
        """Returns once the server has read everything sent so far (it
        answers a Ping after every message before it)."""
        token = b"barrier %d" % len(self.log)
        self.ws.send_ping(token)
        self.pump(lambda: token in self.ws.pongs, "the barrier's Pong")

    def sent_message(self, message):
        """Applies a SYNC_CONNECTIONS we sent: the server ends each of our
        connections that the list omits while listing a later id (we must
        have seen its CONNECT, the server reasons). Waits until the server
        has read it, so that dials made afterwards are not affected."""
        try:
            msg = wsraw.decode_message(message)
        except wsraw.Malformed:
            return
        if msg.type != wsraw.SYNC_CONNECTIONS or not msg.payload:
            return
        listed = msg.sync_ids
        for d in self.dials:
            if d.error == "open" and d.conn_id not in listed and d.conn_id < listed[-1]:
                d.error = "connection closed by sync"
        self.barrier()

    def wait_connect(self):
        self.pump(lambda: self.connects, "the server's CONNECT")
        return self.connects.pop(0)


def frame(opcode, payload=b"", **kw):
    return wsraw.encode_frame(opcode, payload, **kw)


def play(srv, raw, kind, params):
    """Performs one action for one raw client, updating the model."""
    ws = raw.ws
    raw.log.append(kind)
    if kind == "message":
        ws.send_binary(params)
        raw.sent_message(params)
    elif kind == "ping":
        ws.send_ping(params)
    elif kind == "pong":
        ws.send_pong(params)
    elif kind == "fragmented":
        message, sizes = params
        ws.send_fragmented(message, sizes, between=[(wsraw.OP_PING, b"p"), (wsraw.OP_PONG, b"")])
        raw.sent_message(message)
    elif kind == "dial":
        sock = srv.dial(raw.key, "tcp", "192.0.2.1:80", timeout=WAIT)
        sock.settimeout(WAIT)
        connect = raw.wait_connect()
        assert (connect.proto, connect.address) == ("tcp", "192.0.2.1:80")
        raw.dials.append(Dial(sock, connect.conn_id))
    elif kind in ("dial_data", "dial_error", "sock_write", "sock_close"):
        if not raw.dials:
            return
        index, arg = params if isinstance(params, tuple) else (params, None)
        d = raw.dials[index % len(raw.dials)]
        if kind == "dial_data":
            ws.send_msg(d.conn_id, wsraw.DATA, arg)
            if d.error == "open":
                d.expected += arg
        elif kind == "dial_error":
            ws.send_msg(d.conn_id, wsraw.ERROR, arg)
            if d.error == "open":
                d.error = arg
        elif kind == "sock_write":
            if d.error == "open":
                d.sock.sendall(arg)
                d.sent += arg
        elif d.error != "server closed":
            d.sock.close()
            d.error = "server closed"
    else:
        fatal(raw, kind, params)
        raw.dead = kind


def fatal(raw, kind, params):
    ws = raw.ws
    sends = {
        "text": lambda: frame(wsraw.OP_TEXT, params),
        "bad_opcode": lambda: frame(params, b"x"),
        "rsv": lambda: frame(wsraw.OP_BINARY, wsraw.encode_message(1, 0, wsraw.SYNC_CONNECTIONS),
                             rsv=params),
        "unmasked": lambda: frame(wsraw.OP_BINARY, params, mask=False),
        "big_control": lambda: frame(wsraw.OP_PING, params),
        "fragmented_control": lambda: frame(wsraw.OP_PING, params, fin=False),
        "orphan_continuation": lambda: frame(wsraw.OP_CONT, params),
        "malformed": lambda: frame(wsraw.OP_BINARY, params),
        # Only the header: the server must refuse it without the payload.
        "oversize": lambda: frame(wsraw.OP_BINARY, b"",
                                  length=MAX_MESSAGE + params[0])[:14],
        # RSV bits in the first byte make any bytes after it a bad frame (two
        # bytes at least: a reader may wait for a whole frame header).
        "garbage": lambda: bytes([0xF0 | (params[0] & 0x0F)]) + params[1:],
        "close": lambda: frame(wsraw.OP_CLOSE, wsraw.close_payload(1000)),
    }
    if kind == "oversize" and params[1]:
        # ...or the first fragment of a message that would go over.
        data = frame(wsraw.OP_BINARY, b"", length=MAX_MESSAGE + params[0], fin=False)[:14]
    elif kind == "abort":
        ws.abort()
        return
    else:
        data = sends[kind]()
    try:
        ws.send_raw(data)
    except OSError:
        pass  # the server may already have dropped us


# ---------------------------------------------------------------------------
# The arena: one server, one good agent, one long-lived connection


class Arena:
    def __init__(self, rd):
        self.rd = rd
        self.echo = support.EchoServer()
        self.kept_echo = support.EchoServer()
        self.srv = rd.Server(listen="127.0.0.1:0", max_message=MAX_MESSAGE).start()
        self.good = support.make_client(rd, self.srv.url, GOOD)
        wait_for(lambda: self.srv.has_session(GOOD), what="the good agent's session")
        self.kept = self.srv.dial(GOOD, "tcp", self.kept_echo.address, timeout=WAIT)
        self.kept.settimeout(WAIT)
        support.round_trip(self.kept, b"first", WAIT)
        self.baseline = None
        self.examples = 0

    def unbalanced(self, source):
        """Counter label sets that do not balance, but for the good agent's
        one long-lived connection (counted added, not yet removed) and its
        session."""
        m = source.metrics()
        # The agent labels its own counters with the key "client", as Go does.
        kept = {support.key(clientkey=k, proto="tcp", addr=self.kept_echo.address): 1
                for k in (GOOD, "client")}
        kept.update({support.key(clientkey=k, peer="false"): 1 for k in (GOOD, "client")})
        out = []
        for add, remove in ((support.ADD_CONN, support.REMOVE_CONN),
                            (support.ADD_SESSION, support.REMOVE_SESSION)):
            adds, removes = support.family(m, add), support.family(m, remove)
            for label in set(adds) | set(removes):
                if adds.get(label, 0) - removes.get(label, 0) != kept.get(label, 0):
                    out.append(f"{add}{dict(label)}: +{adds.get(label, 0)} "
                               f"-{removes.get(label, 0)}")
        return out

    def figures(self):
        s = self.rd.engine_stats()
        return {"open_sessions": s["open_sessions"], "open_connections": s["open_connections"],
                "loop_handles": s["loop_handles"], "open_fds": s["open_fds"]}

    def close(self):
        self.kept.close()
        self.good.close()
        self.srv.close()
        self.echo.close()
        self.kept_echo.close()


@pytest.fixture(scope="module")
def arena(rd):
    a = Arena(rd)
    try:
        yield a
    finally:
        a.close()
    support.wait_engine_idle(rd)


def check_alive(srv, raw):
    assert srv.has_session(raw.key), f"{raw.key} lost its session after {raw.log}"
    open_dials = [d for d in raw.dials if d.error == "open"]
    for d in open_dials:
        # Still open both ways: one more byte from the server's side.
        d.sock.sendall(b"!")
        d.sent += b"!"
    # Every byte written on an open connection's socket reached the raw
    # client, in order (the Ping proves the session is read as well).
    raw.barrier()
    raw.pump(lambda: all(len(raw.received.get(d.conn_id, b"")) >= len(d.sent)
                         for d in open_dials), "the sockets' bytes")
    for d in raw.dials:
        got = bytes(raw.received.get(d.conn_id, b""))
        if d.error == "open":
            assert got == bytes(d.sent)
        else:
            assert bytes(d.sent).startswith(got)
        if d.error == "server closed":
            continue
        assert recv_exact(d.sock, len(d.expected), WAIT) == bytes(d.expected)
        if d.error != "open":
            assert read_to_eof(d.sock) == b""
            assert d.sock.tunnel_error == (None if d.error == "EOF" else d.error)


def read_to_eof(sock):
    """Everything until EOF. A reset counts as EOF: the server may close its
    end with our unread bytes in it."""
    data = bytearray()
    deadline = time.monotonic() + WAIT
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def check_dead(srv, raw):
    expected = EXPECTED_CLOSE[raw.dead]
    if expected is not None:
        code = raw.ws.wait_closed(WAIT)
        assert code == expected, f"{raw.key}: close code {code} after {raw.log}"
    raw.ws.abort()
    wait_for(lambda: not srv.has_session(raw.key), what=f"{raw.key}'s session to end")
    for d in raw.dials:
        if d.error == "server closed":
            continue
        # What the raw side sent before it broke the session is delivered
        # before the EOF, as Go's connections drain their buffer first.
        assert read_to_eof(d.sock) == bytes(d.expected)
        if d.error == "open":
            assert d.sock.tunnel_error == "tunnel disconnect"
        else:
            assert d.sock.tunnel_error == (None if d.error == "EOF" else d.error)


@settings(max_examples=200, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario)
def test_random_frames_from_several_clients(arena, rd, example):
    nclients, actions = example
    srv = arena.srv
    if arena.baseline is None:
        arena.baseline = arena.figures()
    raws = []
    try:
        for k in RAW_KEYS[:nclients]:
            raws.append(Raw(k, wsraw.WSConn.connect("127.0.0.1", srv.port,
                                                    headers={"X-Tunnel-ID": k})))
        for k in RAW_KEYS[:nclients]:
            wait_for(lambda: srv.has_session(k), what=f"{k}'s session")

        for index, (kind, params) in actions:
            raw = raws[index % nclients]
            if raw.dead is None:
                play(srv, raw, kind, params)

        for raw in raws:
            if raw.dead is None:
                check_alive(srv, raw)
            else:
                check_dead(srv, raw)
        # Nobody else noticed.
        assert srv.has_session(GOOD) and arena.good.connected
        support.round_trip(arena.kept, b"kept %d" % arena.examples, WAIT)
        fresh = srv.dial(GOOD, "tcp", arena.echo.address, timeout=WAIT)
        fresh.settimeout(WAIT)
        try:
            support.round_trip(fresh, b"fresh", WAIT)
        finally:
            fresh.close()
    finally:
        for raw in raws:
            for d in raw.dials:
                d.sock.close()
            raw.ws.close()
        arena.examples += 1

    # Everything the example opened is gone, and counted so.
    for k in RAW_KEYS:
        wait_for(lambda: not srv.has_session(k), what=f"{k}'s session to end")
    try:
        wait_for(lambda: arena.figures() == arena.baseline, WAIT, "the engine's baseline")
    except AssertionError:
        raise AssertionError(f"engine holds {arena.figures()}, baseline {arena.baseline}") \
            from None
    for source in (srv, arena.good):
        try:
            wait_for(lambda: not arena.unbalanced(source), WAIT, "balanced counters")
        except AssertionError:
            raise AssertionError(f"unbalanced: {arena.unbalanced(source)}") from None
