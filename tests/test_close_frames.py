"""Close frames a peer sends (RFC 6455 sections 5.5.1 and 7.4): a 1-byte
payload, a code no endpoint may send, or a reason that is not UTF-8 is
answered with 1002 (protocol error) and the session ends; a valid close
(empty, or a sendable code with a UTF-8 reason) gets the usual 1000 reply.
A raw WebSocket peer (tests/wsraw.py) plays the agent against a real Server,
and the server against a real Client."""

import struct

import pytest

import wsraw
from support import TIMEOUT, check_balanced, wait_engine_idle, wait_for

INVALID = [
    pytest.param(b"\x03", id="one-byte"),
    *[pytest.param(struct.pack("!H", c), id=f"code-{c}")
      for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)],
    pytest.param(struct.pack("!H", 1000) + b"\xff", id="reason-not-utf8"),
    pytest.param(struct.pack("!H", 1000) + b"ok \xc3", id="reason-truncated-utf8"),
    pytest.param(struct.pack("!H", 1000) + b"\xed\xa0\x80", id="reason-surrogate"),
    pytest.param(struct.pack("!H", 4000) + b"\xc0\x80", id="reason-overlong"),
]

VALID = [
    pytest.param(b"", id="empty"),
    *[pytest.param(struct.pack("!H", c), id=f"code-{c}")
      for c in (1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999)],
    pytest.param(struct.pack("!H", 1000) + "bye, h\u00e9 \U0001F600".encode(), id="utf8-reason"),
]


@pytest.fixture
def server(rd, tunnel_leak_check):
    srv = rd.Server(listen="127.0.0.1:0")
    srv.start()
    try:
        yield srv
        check_balanced(srv, sessions=True)
    finally:
        srv.close()
    wait_engine_idle(rd)


def _close_answer(ws):
    """The code of the peer's Close frame, read frame by frame (a SYNC or a
    Ping may come first); then the stream must end."""
    while True:
        frame = ws.recv_frame(TIMEOUT)
        if frame.opcode == wsraw.OP_CLOSE:
            code, _reason = wsraw.parse_close(frame.payload)
            break
    with pytest.raises(wsraw.SessionClosed):
        while True:
            ws.recv_frame(TIMEOUT)
    return code


def _agent(srv, key):
    ws = wsraw.WSConn.connect("127.0.0.1", srv.port, headers={"X-Tunnel-ID": key})
    wait_for(lambda: srv.has_session(key), what=f"a session for {key}")
    return ws


def _with_answer(params, answer, kind):
    return [pytest.param(p.values[0], answer, id=f"{kind}-{p.id}") for p in params]


@pytest.mark.parametrize("payload,answer",
                         _with_answer(INVALID, 1002, "invalid") + _with_answer(VALID, 1000, "valid"))
def test_server_answers_close(server, payload, answer):
    """An invalid close frame gets 1002, a valid one the usual 1000."""
    ws = _agent(server, "agent-close")
    try:
        ws.send_frame(wsraw.OP_CLOSE, payload)
        assert _close_answer(ws) == answer
        wait_for(lambda: not server.has_session("agent-close"), what="the session to end")
    finally:
        ws.abort()


def test_invalid_close_ends_only_its_session(server):
    """Another agent's session is untouched."""
    other = _agent(server, "agent-other")
    ws = _agent(server, "agent-close")
    try:
        ws.send_frame(wsraw.OP_CLOSE, struct.pack("!H", 1005))
        assert _close_answer(ws) == 1002
        wait_for(lambda: not server.has_session("agent-close"), what="the session to end")
        assert server.has_session("agent-other")
        other.send_ping(b"still here")
        while True:
            frame = other.recv_frame(TIMEOUT)
            if frame.opcode == wsraw.OP_PONG:
                assert frame.payload == b"still here"
                break
    finally:
        ws.abort()
        other.send_close(1000)
        assert other.wait_closed(TIMEOUT) == 1000
        other.abort()
    wait_for(lambda: not server.has_session("agent-other"), what="the other session to end")


@pytest.mark.parametrize("payload, expected", [
    pytest.param(b"\x03", 1002, id="one-byte"),
    pytest.param(struct.pack("!H", 1006), 1002, id="code-1006"),
    pytest.param(struct.pack("!H", 1000) + b"\xff", 1002, id="reason-not-utf8"),
    pytest.param(struct.pack("!H", 1001) + b"bye", 1000, id="valid"),
])
def test_client_answers_close_frames(rd, tunnel_leak_check, payload, expected):
    """The agent side checks the server's close frames the same way."""
    with wsraw.WSListener() as listener:
        cli = rd.Client(listener.url, headers={"X-Tunnel-ID": "agent-c"}, backoff_min=30,
                        backoff_max=30)
        try:
            cli.start()
            ws, _ = listener.accept(timeout=TIMEOUT)
            try:
                wait_for(lambda: cli.connected, what="the client's session")
                ws.send_frame(wsraw.OP_CLOSE, payload, mask=False)
                assert _close_answer(ws) == expected
                wait_for(lambda: not cli.connected, what="the client to end its session")
                assert cli.last_error == ("invalid close frame" if expected == 1002
                                          else "closed by peer")
            finally:
                ws.abort()
        finally:
            cli.close()
    wait_engine_idle(rd)
