"""Interoperability with an independent WebSocket implementation: the
`websockets` package plays the agent against our Server, and the tunnel
server against our Client. The tunnel messages are built and read with the
test peer's own codec (wsraw), not the engine's."""

import gc
import queue
import threading

import pytest

import support
import wsraw
from support import ADD_CONN, TIMEOUT, key, recv_exact, wait_for

websockets = pytest.importorskip("websockets", reason="the websockets package is not installed")
from websockets.sync.client import connect as ws_connect  # noqa: E402
from websockets.sync.server import serve as ws_serve  # noqa: E402


def recv_tunnel(ws, skip=(wsraw.SYNC_CONNECTIONS, wsraw.PAUSE, wsraw.RESUME)):
    while True:
        data = ws.recv(timeout=TIMEOUT)
        assert isinstance(data, bytes), f"text message from our side: {data!r}"
        msg = wsraw.decode_message(data)
        if msg.type not in skip:
            return msg


def recv_data(ws, conn_id, n):
    out = bytearray()
    while len(out) < n:
        msg = recv_tunnel(ws)
        assert msg.type == wsraw.DATA and msg.conn_id == conn_id, msg
        out += msg.payload
    assert len(out) == n
    return bytes(out)


def test_websockets_client_as_agent(tunnel):
    srv = tunnel.srv
    with ws_connect(srv.url, additional_headers={"X-Tunnel-ID": "ws-agent"}, max_size=None,
                    open_timeout=TIMEOUT, ping_interval=None, proxy=None) as ws:
        # We negotiate no extension, although the client offered deflate.
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        wait_for(lambda: srv.has_session("ws-agent"), what="the websockets agent's session")
        assert ws.ping(b"are you there").wait(TIMEOUT), "no Pong from our server"

        sock = srv.dial("ws-agent", "tcp", "192.0.2.1:443", timeout=TIMEOUT)
        sock.settimeout(TIMEOUT)
        connect = recv_tunnel(ws)
        assert connect.type == wsraw.CONNECT, connect
        assert (connect.proto, connect.address, connect.deadline) == ("tcp", "192.0.2.1:443", 15000)
        cid = connect.conn_id
        assert cid > 0

        sock.sendall(b"request bytes")
        assert recv_data(ws, cid, 13) == b"request bytes"
        ws.send(wsraw.encode_message(100, cid, wsraw.DATA, b"response bytes"))
        assert recv_exact(sock, 14) == b"response bytes"

        # 1 MiB each way, under the 2 MiB PAUSE threshold; the agent side
        # writes 32 KiB DATA messages as a Go agent does.
        down = bytes(range(256)) * 4096
        for i in range(0, len(down), 32 << 10):
            ws.send(wsraw.encode_message(101 + i, cid, wsraw.DATA, down[i:i + (32 << 10)]))
        assert recv_exact(sock, len(down)) == down
        up = down[::-1]
        sock.sendall(up)
        assert recv_data(ws, cid, len(up)) == up

        # The agent's side fails the connection: EOF plus its error text.
        sock2 = srv.dial("ws-agent", "tcp", "192.0.2.1:22", timeout=TIMEOUT)
        sock2.settimeout(TIMEOUT)
        c2 = recv_tunnel(ws)
        assert c2.type == wsraw.CONNECT and c2.conn_id != cid
        ws.send(wsraw.encode_message(200, c2.conn_id, wsraw.ERROR, b"dial tcp 192.0.2.1:22: i/o timeout"))
        assert sock2.recv(1) == b""
        assert sock2.tunnel_error == "dial tcp 192.0.2.1:22: i/o timeout"
        sock2.close()

        # Our side closes: ERROR "EOF" after all DATA; the Go-style echo of
        # that close is harmless.
        sock.close()
        closing = recv_tunnel(ws)
        assert (closing.type, closing.conn_id, closing.payload) == (wsraw.ERROR, cid, b"EOF")
        ws.send(wsraw.encode_message(300, cid, wsraw.ERROR, b"EOF"))
        support.wait_balanced(srv)
        # The session is still fine after all that.
        assert ws.ping(b"still there").wait(TIMEOUT)
        m = srv.metrics()
        assert m[ADD_CONN][key(addr="192.0.2.1:443", clientkey="ws-agent", proto="tcp")] == 1
    wait_for(lambda: not srv.has_session("ws-agent"), what="the websockets agent to leave")
    support.check_balanced(srv)


def test_client_against_websockets_server(rd, tunnel_leak_check, echo_server):
    results = queue.Queue()
    release = threading.Event()
    first = threading.Lock()
    payload = b"through a websockets server " * 2000  # 56 KB

    def handler(ws):
        if not first.acquire(blocking=False):
            release.wait(TIMEOUT * 2)  # a reconnect: nothing to script
            return
        try:
            results.put(("request", ws.request.path, dict(ws.request.headers.raw_items())))
            cid = 2
            ws.send(wsraw.encode_message(1, cid, wsraw.CONNECT, f"tcp/{echo_server.address}".encode()))
            ws.send(wsraw.encode_message(2, cid, wsraw.DATA, payload))
            echoed = recv_data(ws, cid, len(payload))
            pong = ws.ping(b"hello agent").wait(TIMEOUT)
            ws.send(wsraw.encode_message(3, cid, wsraw.ERROR, b"EOF"))
            results.put(("done", echoed, pong))
            release.wait(TIMEOUT * 2)
        except Exception as e:  # reported to the test thread
            results.put(("error", repr(e), None))

    with ws_serve(handler, "127.0.0.1", 0, max_size=None, ping_interval=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.socket.getsockname()[1]
        cli = rd.Client(f"ws://127.0.0.1:{port}/connect", headers={"X-Tunnel-ID": "agent-ws"})
        try:
            cli.start()
            cli.wait_connected(timeout=TIMEOUT)
            kind, path, headers = results.get(timeout=TIMEOUT)
            assert kind == "request" and path == "/connect"
            lowered = {k.lower(): v for k, v in headers.items()}
            assert lowered["x-tunnel-id"] == "agent-ws"
            assert "sec-websocket-extensions" not in lowered  # no deflate offered
            kind, echoed, pong = results.get(timeout=TIMEOUT * 2)
            assert kind == "done", echoed
            assert echoed == payload
            assert pong, "our Client did not answer the Ping"
            echo_server.wait_open(0)
            m = support.wait_balanced(cli)
            label = key(addr=echo_server.address, clientkey="client", proto="tcp")
            assert m[ADD_CONN][label] == m[support.REMOVE_CONN][label] == 1
            support.check_balanced(cli)
        finally:
            release.set()
            cli.close()
            server.shutdown()
            thread.join(TIMEOUT)
    gc.collect()  # serve_forever leaves its selector (an epoll fd) to the collector
    support.wait_engine_idle(rd)
