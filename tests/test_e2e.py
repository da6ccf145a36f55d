"""End to end through a real Server and Client on loopback (engine on both
ends, one process). Every test ends with balanced counters, nothing open in
the engine and no descriptor leaked (the `tunnel` fixture, or
`tunnel_leak_check` plus explicit checks where a test closes the ends
itself)."""

import gc
import hashlib
import http.client
import random
import selectors
import shutil
import socket
import subprocess
import threading
import time
import warnings
import weakref

import pytest

import support
from support import AGENT_KEY, check_balanced, make_client, wait_engine_idle
from support import (ADD_CONN, ADD_SESSION, GO_FAMILIES, RECEIVE, REMOVE_CONN, REMOVE_SESSION,
                     TIMEOUT, TRANSMIT, TRANSMIT_ERROR, key, round_trip, wait_for)



def test_dial_echo_close(tunnel, echo_server):
    sock = tunnel.dial(echo_server.port)
    assert isinstance(sock, socket.socket)
    assert sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
    for size in (1, 1000, 100_000):
        round_trip(sock, random.randbytes(size))
    assert sock.tunnel_error is None
    sock.close()
    (done,) = echo_server.wait_finished(1)
    assert done.error is None and done.nbytes == 101_001
    support.wait_balanced(tunnel.srv)
    m = tunnel.srv.metrics()
    label = key(addr=echo_server.address, clientkey=AGENT_KEY, proto="tcp")
    assert m[ADD_CONN] == {label: 1}
    assert m[REMOVE_CONN] == {label: 1}
    c = support.wait_balanced(tunnel.cli)
    client_label = key(addr=echo_server.address, clientkey="client", proto="tcp")
    assert c[ADD_CONN] == {client_label: 1}


def test_http_client_over_dialed_socket(tunnel, http_service):
    sock = tunnel.dial(http_service.port)
    try:
        status, body = support.http_get_through(sock, "/large")
    finally:
        sock.close()
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == http_service.large_sha256


def test_thousand_concurrent_connections(tunnel, echo_server):
    n = 1000
    payloads = [(f"conn-{i:04d}:".encode() * 40) for i in range(n)]
    socks = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(n):
            s = tunnel.dial(echo_server.port)
            s.setblocking(False)
            socks.append(s)
        sent = [0] * n
        got = [bytearray() for _ in range(n)]
        for i, s in enumerate(socks):
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
        pending = n
        deadline = time.monotonic() + 60
        while pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pending} of {n} connections still unanswered after 60 s"
            for sk, events in sel.select(timeout=remaining):
                i = sk.data
                s = socks[i]
                if events & selectors.EVENT_WRITE and sent[i] < len(payloads[i]):
                    sent[i] += s.send(payloads[i][sent[i]:])
                    if sent[i] == len(payloads[i]):
                        sel.modify(s, selectors.EVENT_READ, i)
                if events & selectors.EVENT_READ:
                    data = s.recv(65536)
                    assert data, f"connection {i} ended early: {s.tunnel_error!r}"
                    got[i] += data
                    assert len(got[i]) <= len(payloads[i])
                    if len(got[i]) == len(payloads[i]):
                        assert bytes(got[i]) == payloads[i], f"connection {i} got foreign bytes"
                        sel.unregister(s)
                        pending -= 1
        # All of them were open at once, on both sides.
        assert echo_server.open_count == n
        m = tunnel.srv.metrics()
        assert m[ADD_CONN][key(addr=echo_server.address, clientkey=AGENT_KEY, proto="tcp")] == n
    finally:
        sel.close()
        for s in socks:
            s.close()
    echo_server.wait_open(0, timeout=60)
    m = support.wait_balanced(tunnel.srv, timeout=60)
    assert m[REMOVE_CONN][key(addr=echo_server.address, clientkey=AGENT_KEY, proto="tcp")] == n


def test_256_mib_one_connection_sha256_both_ways(tunnel, echo_server):
    total = 256 << 20
    chunk = 1 << 20
    sock = tunnel.dial(echo_server.port, timeout=120)
    sent_hash = hashlib.sha256()
    errors = []

    def writer():
        rng = random.Random(2024)
        try:
            for _ in range(total // chunk):
                block = rng.randbytes(chunk)
                sent_hash.update(block)
                sock.sendall(block)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=writer, name="256MiB-writer")
    t.start()
    recv_hash = hashlib.sha256()
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    got = 0
    deadline = time.monotonic() + 300
    try:
        while got < total:
            assert not errors, f"writer failed: {errors[0]!r}"
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            k = sock.recv_into(buf, min(len(buf), total - got))
            assert k, f"EOF after {got} bytes: {sock.tunnel_error!r}"
            recv_hash.update(mv[:k])
            got += k
    finally:
        t.join(TIMEOUT)
    assert not t.is_alive(), "writer still blocked after all echoed bytes arrived"
    assert not errors, f"writer failed: {errors[0]!r}"
    digest = sent_hash.hexdigest()
    assert recv_hash.hexdigest() == digest, "bytes changed on the way agent -> server"
    sock.close()
    (done,) = echo_server.wait_finished(1, timeout=60)
    assert done.nbytes == total
    assert done.sha256 == digest, "bytes changed on the way server -> agent"
    # receive_bytes counts payload delivered to the local reader, per side.
    s = support.wait_balanced(tunnel.srv)
    assert s[RECEIVE][key(clientkey=AGENT_KEY)] == total
    assert s[TRANSMIT][key(clientkey=AGENT_KEY)] > total
    c = support.wait_balanced(tunnel.cli)
    assert c[RECEIVE][key(clientkey="client")] == total


def test_dial_closed_port(tunnel):
    port = support.closed_port()
    sock = tunnel.dial(port)
    assert sock.recv(1) == b""
    # The text is there by the time the socket reads EOF.
    assert sock.tunnel_error == f"dial tcp 127.0.0.1:{port}: connect: connection refused"
    sock.close()
    label = key(addr=f"127.0.0.1:{port}", clientkey=AGENT_KEY, proto="tcp")
    m = support.wait_balanced(tunnel.srv)
    assert m[ADD_CONN][label] == 1 and m[REMOVE_CONN][label] == 1
    c = support.wait_balanced(tunnel.cli)
    client_label = key(addr=f"127.0.0.1:{port}", clientkey="client", proto="tcp")
    assert c[ADD_CONN][client_label] == 1 and c[REMOVE_CONN][client_label] == 1


def test_dial_unknown_client(tunnel, rd):
    started = time.monotonic()
    with pytest.raises(rd.ClientNotFoundError) as info:
        tunnel.srv.dial("nope", "tcp", "127.0.0.1:1", timeout=TIMEOUT)
    assert time.monotonic() - started < 5, "the dial waited instead of failing at once"
    assert str(info.value) == "failed to find Session for client nope"
    assert isinstance(info.value, rd.TunnelError) and isinstance(info.value, OSError)
    for fam in (ADD_CONN, REMOVE_CONN):
        assert not [k for k in support.family(tunnel.srv.metrics(), fam)
                    if ("clientkey", "nope") in k]


def test_forward(tunnel, echo_server, http_service):
    fwd = tunnel.srv.forward(AGENT_KEY, "tcp", echo_server.address, listen="127.0.0.1:0")
    try:
        assert fwd.port > 0
        conns = [socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT)
                 for _ in range(20)]
        try:
            for i, c in enumerate(conns):
                round_trip(c, f"forwarded {i} ".encode() * 100)
        finally:
            for c in conns:
                c.close()
        echo_server.wait_open(0)
        with tunnel.srv.forward(AGENT_KEY, "tcp", http_service.address) as web:
            conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=TIMEOUT)
            try:
                conn.request("GET", "/large")
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
            assert resp.status == 200
            assert hashlib.sha256(body).hexdigest() == http_service.large_sha256
    finally:
        fwd.close()
    fwd.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT).close()
    m = support.wait_balanced(tunnel.srv)
    assert m[ADD_CONN][key(addr=echo_server.address, clientkey=AGENT_KEY, proto="tcp")] == 20


def test_list_clients_and_has_session(tunnel):
    srv = tunnel.srv
    assert srv.list_clients() == [AGENT_KEY]
    assert srv.has_session(AGENT_KEY)
    assert not srv.has_session("nope")
    other = tunnel.add_client("agent-0")
    twin = tunnel.add_client(AGENT_KEY)  # a second session under the same key
    wait_for(lambda: srv.metrics()[ADD_SESSION].get(key(clientkey=AGENT_KEY, peer="false")) == 2,
             what="the second session of agent-1")
    assert srv.list_clients() == ["agent-0", AGENT_KEY]
    m = srv.metrics()
    assert m[ADD_SESSION][key(clientkey="agent-0", peer="false")] == 1
    other.close()
    wait_for(lambda: srv.list_clients() == [AGENT_KEY], what="agent-0 to be gone")
    assert not srv.has_session("agent-0")
    twin.close()
    # agent-1's first session is still there, and still carries dials.
    wait_for(lambda: srv.metrics().get(REMOVE_SESSION, {}).get(
        key(clientkey=AGENT_KEY, peer="false")) == 1, what="the twin session removed")
    assert srv.has_session(AGENT_KEY)
    assert srv.list_clients() == [AGENT_KEY]
    m = srv.metrics()
    assert m[REMOVE_SESSION][key(clientkey="agent-0", peer="false")] == 1
    assert key(clientkey=AGENT_KEY, peer="false") in m[ADD_SESSION]


def test_metrics_label_sets_and_exposition(tunnel, echo_server):
    srv = tunnel.srv
    sock = tunnel.dial(echo_server.port)
    round_trip(sock, b"x" * 100)
    sock.close()
    closed = support.closed_port()
    refused = tunnel.dial(closed)
    assert refused.recv(1) == b""
    refused.close()
    m = support.wait_balanced(srv)
    good = key(addr=echo_server.address, clientkey=AGENT_KEY, proto="tcp")
    bad = key(addr=f"127.0.0.1:{closed}", clientkey=AGENT_KEY, proto="tcp")
    assert m[ADD_SESSION] == {key(clientkey=AGENT_KEY, peer="false"): 1}
    assert not m.get(REMOVE_SESSION)
    assert m[ADD_CONN] == {good: 1, bad: 1}
    assert m[REMOVE_CONN] == {good: 1, bad: 1}
    assert m[RECEIVE] == {key(clientkey=AGENT_KEY): 100}
    # DATA messages are counted with their header (at least 6 bytes: id,
    # connID, type, and the 3-byte legacy deadline).
    assert m[TRANSMIT][key(clientkey=AGENT_KEY)] >= 106
    # Our close sent at least one ERROR "EOF" (6 bytes or more).
    assert m[TRANSMIT_ERROR][key(clientkey=AGENT_KEY)] >= 6
    for name in m:
        if name.startswith("session_server_"):
            assert name in GO_FAMILIES, f"unknown Go family {name}"

    text = srv.prometheus()
    families, order = support.parse_exposition(text)
    go_order = [n for n in order if n.startswith("session_server_")]
    assert go_order == sorted(go_order), "families not sorted by name"
    assert set(go_order) == {n for n, v in m.items() if n.startswith("session_server_") and v}
    for name in go_order:
        fam = families[name]
        assert fam.help == GO_FAMILIES[name]
        assert fam.type == "counter"
        assert fam.samples == m[name]
        for labels in fam.label_orders:
            assert labels == sorted(labels), f"{name}: labels not sorted: {labels}"
    # Families without samples are absent, as from the Go library.
    assert "session_server_total_peer_ws_attempt" not in text
    assert (f'session_server_total_add_connections{{addr="{echo_server.address}",'
            f'clientkey="{AGENT_KEY}",proto="tcp"}} 1') in text.splitlines()
    for name, fam in families.items():
        if not name.startswith("session_server_"):
            assert name.startswith(("remotedialer_", "process_")), f"unexpected family {name}"

    c = tunnel.cli.metrics()
    assert c[ADD_CONN] == {key(addr=echo_server.address, clientkey="client", proto="tcp"): 1,
                           key(addr=f"127.0.0.1:{closed}", clientkey="client", proto="tcp"): 1}
    assert c[RECEIVE] == {key(clientkey="client"): 100}


def test_promtool_check_metrics(tunnel, echo_server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    sock = tunnel.dial(echo_server.port)
    round_trip(sock)
    sock.close()
    refused = tunnel.dial(support.closed_port())
    assert refused.recv(1) == b""
    refused.close()
    support.wait_balanced(tunnel.srv)
    for text in (tunnel.srv.prometheus(), tunnel.cli.prometheus()):
        run = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=TIMEOUT)
        remarks = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        # Only the `_total` suffix remark, and only on the Go names we keep
        # for compatibility; exit 3 means "lint remarks", 1 a parse error.
        allowed = [r for r in remarks if r.startswith("session_server_")
                   and r.endswith('counter metrics should have "_total" suffix')]
        assert run.returncode in (0, 3), f"promtool failed ({run.returncode}): {remarks}\n{text}"
        assert remarks == allowed, f"unexpected promtool remarks: {set(remarks) - set(allowed)}"
        assert (run.returncode == 3) == bool(remarks)


def test_get_metrics_over_http(tunnel, echo_server):
    sock = tunnel.dial(echo_server.port)
    round_trip(sock)
    sock.close()
    support.wait_balanced(tunnel.srv)
    conn = http.client.HTTPConnection("127.0.0.1", tunnel.srv.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/plain")
    served = {n: v for n, v in support.exposition_metrics(body).items()
              if n.startswith("session_server_")}
    local = {n: v for n, v in tunnel.srv.metrics().items() if n.startswith("session_server_") and v}
    assert served == local
    conn = http.client.HTTPConnection("127.0.0.1", tunnel.srv.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/no-such-route")
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 404


def test_dropped_socket_is_collected_and_ends_connection(tunnel, echo_server):
    sock = tunnel.dial(echo_server.port)
    round_trip(sock)
    ref = weakref.ref(sock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del sock
        gc.collect()
    assert ref() is None
    (done,) = echo_server.wait_finished(1)
    assert done.error is None
    m = support.wait_balanced(tunnel.srv)
    assert m[REMOVE_CONN][key(addr=echo_server.address, clientkey=AGENT_KEY, proto="tcp")] == 1


def _closes_concurrently(close, threads=4):
    """Runs close from several threads at once; all must return."""
    barrier = threading.Barrier(threads)
    errors = []

    def run():
        try:
            barrier.wait(TIMEOUT)
            close()
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in ts), "close() hung"
    assert not errors, errors


def test_server_close_ends_sessions_and_connections(rd, tunnel_leak_check, echo_server):
    srv = rd.Server(listen="127.0.0.1:0")
    srv.start()
    cli = None
    try:
        cli = make_client(rd, srv.url, AGENT_KEY)
        wait_for(lambda: srv.has_session(AGENT_KEY), what="the agent's session")
        socks = [srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
                 for _ in range(3)]
        for s in socks:
            s.settimeout(TIMEOUT)
            round_trip(s)
        echo_server.wait_open(3)
        _closes_concurrently(srv.close)
        for s in socks:
            assert s.recv(1) == b""
            assert s.tunnel_error == "tunnel disconnect"
            s.close()
        echo_server.wait_open(0)  # the agent ended its side too
        check_balanced(cli)
        srv.close()  # idempotent
        with pytest.raises(rd.ClosedError):
            srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
    finally:
        if cli is not None:
            cli.close()
        srv.close()
    wait_engine_idle(rd)


def test_client_close_ends_its_session(rd, tunnel_leak_check, echo_server):
    srv = rd.Server(listen="127.0.0.1:0")
    srv.start()
    try:
        cli = make_client(rd, srv.url, AGENT_KEY)
        try:
            wait_for(lambda: srv.has_session(AGENT_KEY), what="the agent's session")
            socks = [srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
                     for _ in range(3)]
            for s in socks:
                s.settimeout(TIMEOUT)
                round_trip(s)
            _closes_concurrently(cli.close)
        finally:
            cli.close()
        wait_for(lambda: not srv.has_session(AGENT_KEY), what="the server to drop the session")
        assert srv.list_clients() == []
        for s in socks:
            assert s.recv(1) == b""
            assert s.tunnel_error == "tunnel disconnect"
            s.close()
        echo_server.wait_open(0)
        check_balanced(srv, sessions=True)
        m = srv.metrics()
        assert m[ADD_SESSION] == m[REMOVE_SESSION] == {key(clientkey=AGENT_KEY, peer="false"): 1}
        with pytest.raises(rd.ClientNotFoundError):
            srv.dial(AGENT_KEY, "tcp", echo_server.address, timeout=TIMEOUT)
    finally:
        srv.close()
    wait_engine_idle(rd)


def test_proxy_route_host_segment(tunnel, http_service):
    """The route's host segment is read by the engine's address parser:
    host:port passes, a bad host or port is answered 400 before any dial."""
    port = tunnel.srv.port
    status, body, _ = support.get(port, f"/client/{AGENT_KEY}/http/{http_service.address}/hello")
    assert (status, body) == (200, http_service.HELLO)
    for bad in ("u@h:80", "h:99999", "h%3A80", "h:x", "[::1:80", ":80"):
        status, body, _ = support.get(port, f"/client/{AGENT_KEY}/http/{bad}/x")
        assert status == 400, bad
        assert body.startswith(b"bad host "), body
    support.wait_balanced(tunnel.srv)


@pytest.mark.parametrize("url, message", [
    ("http://h/", "expected ws://"),
    ("ws://u@h/", "bad host"),
    ("ws://h:99999/", "port range"),
    ("ws://::1/", "too many colons"),
    ("ws://h /", "whitespace"),
])
def test_client_url_is_checked_by_the_engine_rules(rd, url, message):
    with pytest.raises(ValueError, match=message):
        rd.Client(url)
