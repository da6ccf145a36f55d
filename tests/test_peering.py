"""HA peering (PROTOCOL.md section 6): servers in a group announce their
agents to each other and carry each other's dials.

Three Servers in this process (A, B, C, a full mesh of peers) with agents on
them, and raw peers (tests/wsraw.py) that present the peer headers and send
hand-made ADD_CLIENT / REMOVE_CLIENT messages. Every test ends with nothing
open in the engine, no descriptor left behind and, once every Server and
Client is closed, the engine heap back to its baseline to the byte (the
`mesh` fixture, or `tunnel_leak_check` with heap_margin=0)."""

import gc
import hashlib
import json
import random
import re
import socket
import threading
import time

import pytest

import support
import wsraw
from support import (ADD_CONN, ADD_SESSION, PEER_ATTEMPT, PEER_CONNECTED, PEER_DISCONNECTED,
                     REMOVE_CONN, REMOVE_SESSION, TIMEOUT, key, round_trip, wait_for)

TOKENS = {i: f"token-{i.lower()}" for i in "ABCDE"}
PEER_FIELDS = {"id", "url", "state", "since", "attempts", "last_error", "inbound", "keys"}
# Heap a live server may gain or lose between two quiet moments (a label
# set, a table resized): far below what a session or 100,000 keys hold.
LIVE_HEAP_MARGIN = 16 << 10


def peer_headers(peer_id, token):
    return {"X-API-Tunnel-ID": peer_id, "X-API-Tunnel-Token": token}


def peer_info(srv, peer_id):
    (info,) = [p for p in srv.peers() if p["id"] == peer_id]
    return info


def heap_in_use(rd):
    """Engine heap bytes in use, the idle pools returned."""
    rd.engine_trim()
    stats = rd.engine_stats()
    return stats["heap_bytes"] - stats["pool_bytes"]


def closed_url():
    """A ws:// URL nobody listens on: the link of a peer that is only ever
    played by a raw WebSocket keeps retrying it (state "waiting")."""
    return f"ws://127.0.0.1:{support.closed_port()}/connect"


def tunnel_frames(ws, mtype, payloads):
    """Client frames carrying one tunnel message each, in one buffer for one
    sendall. Masked with the all-zero key (a valid key: RFC 6455 only asks
    for one per frame; masking with it is the identity), so that 100,000 of
    them build quickly."""
    out = bytearray()
    for p in payloads:
        msg = wsraw.encode_message(ws.next_id(), 0, mtype, p.encode() if isinstance(p, str) else p)
        assert len(msg) < 126
        out += bytes((0x80 | wsraw.OP_BINARY, 0x80 | len(msg))) + b"\0\0\0\0" + msg
    return bytes(out)


def raw_peer(srv, peer_id, token, wait=True):
    """A raw WebSocket that the server takes as peer_id's session; with wait,
    returns once the server counts it (peers()["inbound"] went up)."""
    before = peer_info(srv, peer_id)["inbound"] if wait else 0
    ws = wsraw.WSConn.connect("127.0.0.1", srv.port, headers=peer_headers(peer_id, token))
    if wait:
        wait_for(lambda: peer_info(srv, peer_id)["inbound"] > before, what=f"{peer_id}'s session")
    return ws


def dial_echo(srv, client_key, address, payload=b"via a peer"):
    support.dial_round_trip(srv, client_key, address, payload)


def expect_no_session(rd, srv, client_key):
    with pytest.raises(rd.ClientNotFoundError,
                       match=f"^failed to find Session for client {re.escape(client_key)}$"):
        srv.dial(client_key, "tcp", "127.0.0.1:9", timeout=TIMEOUT)


class Mesh:
    """Servers (peer ids A, B, C, ...), each a peer of every other, plus the
    agents a test connects to them; authorizers maps a peer id to its
    server's authorizer. close() closes agents, then servers."""

    def __init__(self, rd, ids="ABC", authorizers=None, **server_options):
        self.rd = rd
        self.servers = {}
        self.agents = []
        try:
            for i in ids:
                self.servers[i] = rd.Server("127.0.0.1:0", (authorizers or {}).get(i),
                                            peer_id=i, peer_token=TOKENS[i],
                                            **server_options).start()
            for i in ids:
                for j in ids:
                    if i != j:
                        self.servers[i].add_peer(self.servers[j].url, j, TOKENS[j])
            self.wait_linked()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, peer_id):
        return self.servers[peer_id]

    def live(self):
        return [s for s in self.servers.values() if not s.closed]

    def wait_linked(self, servers=None):
        """Every link of the given (default: live) servers connected, and
        every peer that is up holding one session to each of them."""
        servers = servers or self.live()
        live_ids = {s.peer_id for s in self.live()}

        def linked():
            for s in servers:
                for p in s.peers():
                    if p["id"] in live_ids and (p["state"] != "connected" or p["inbound"] != 1):
                        return False
            return True

        try:
            wait_for(linked, TIMEOUT, "the mesh to link up")
        except AssertionError:
            raise AssertionError(f"peers: {[(s.peer_id, s.peers()) for s in servers]}") from None

    def agent(self, url, client_key, **options):
        """A connected agent; url may be a list (HA agent)."""
        cli = support.make_client(self.rd, url, client_key, **options)
        self.agents.append(cli)
        return cli

    def wait_route(self, client_key, expected, servers=None):
        """Each server's route() for client_key equals expected[peer_id] (or
        expected itself when it is not a dict)."""
        servers = servers or self.live()

        def want(s):
            return expected[s.peer_id] if isinstance(expected, dict) else expected

        def ok():
            return all(s.route(client_key) == want(s) for s in servers)

        try:
            wait_for(ok, TIMEOUT, f"routes of {client_key}")
        except AssertionError:
            raise AssertionError(f"routes of {client_key}: "
                                 f"{[(s.peer_id, s.route(client_key)) for s in servers]}, "
                                 f"expected {expected}") from None

    def close(self):
        for c in self.agents:
            c.close()
        for s in self.servers.values():
            s.close()


@pytest.fixture
def mesh(rd, tunnel_leak_check):
    """A, B and C linked in a full mesh (debug routes on). At the end:
    counters balanced on every live server and agent, everything closed,
    nothing open in the engine, no fd left, the engine heap back to its
    baseline to the byte."""
    fds_before = support.open_fds()
    m = Mesh(rd, debug_route=True)
    try:
        yield m
        gc.collect()  # sockets a test dropped end their connections
        for obj in m.live() + [a for a in m.agents if not a.closed]:
            support.check_balanced(obj)
    finally:
        m.close()
    left_clean(rd, fds_before, tunnel_leak_check)


@pytest.fixture
def raw_server(rd, tunnel_leak_check):
    """A server "S" whose peers R1 and R2 are played by raw WebSockets (their
    links point at a closed port and keep retrying). Everything is closed
    and checked as for `mesh`."""
    fds_before = support.open_fds()
    srv = rd.Server("127.0.0.1:0", peer_id="S", peer_token="token-s").start()
    try:
        srv.add_peer(closed_url(), "R1", "token-r1")
        srv.add_peer(closed_url(), "R2", "token-r2")
        yield srv
        gc.collect()
        support.check_balanced(srv)
    finally:
        srv.close()
    left_clean(rd, fds_before, tunnel_leak_check)


def left_clean(rd, fds_before, leak_check=None):
    """After everything is closed: the engine idle, no descriptor left and,
    given the leak fixture, the engine heap back to its baseline to the byte."""
    gc.collect()  # the sockets' dial records go with the socket objects
    support.wait_engine_idle(rd)
    support.assert_no_new_fds(fds_before)
    if leak_check is not None:
        leak_check.heap_margin = 0


def conn_label(client_key, proto, address):
    return key(addr=address, clientkey=client_key, proto=proto)


def counter(srv, name, label):
    return support.family(srv.metrics(), name).get(label, 0)


# ---------------------------------------------------------------------------
# 1. Dials through peers


def test_dials_through_each_peer(mesh, echo_server):
    a, b, c = mesh["A"], mesh["B"], mesh["C"]
    for srv in (a, b, c):
        peers = srv.peers()
        assert [p["id"] for p in peers] == sorted(set("ABC") - {srv.peer_id})
        for p in peers:
            assert set(p) == PEER_FIELDS
            assert p["state"] == "connected" and p["inbound"] == 1 and p["last_error"] == ""
            assert p["url"] == mesh[p["id"]].url and p["attempts"] >= 1
            assert p["keys"] == 0
    mesh.agent(a.url, "foo")
    mesh.wait_route("foo", {"A": "", "B": "A", "C": "A"})
    assert peer_info(b, "A")["keys"] == peer_info(c, "A")["keys"] == 1
    assert peer_info(b, "C")["keys"] == peer_info(a, "B")["keys"] == 0
    assert a.route("nobody") is b.route("nobody") is None
    for srv in (b, c):
        dial_echo(srv, "foo", echo_server.address, f"through {srv.peer_id}".encode() * 1000)
    dial_echo(a, "foo", echo_server.address)  # and locally
    echo_server.wait_finished(3)
    for srv in (a, b, c):
        support.check_balanced(srv)
    # Go's label sets: the dialing server counts the connection under the
    # peer it went through, with the wire proto "foo::tcp"; the server with
    # the agent counts the peer's side ("client", as a link is a client
    # session) and its own dial to the agent.
    addr = echo_server.address
    for srv in (b, c):
        m = srv.metrics()
        label = conn_label("A", "foo::tcp", addr)
        assert m[ADD_CONN] == m[REMOVE_CONN] == {label: 1}, m[ADD_CONN]
    m = a.metrics()
    assert m[ADD_CONN] == m[REMOVE_CONN] == {
        conn_label("client", "foo::tcp", addr): 2,
        conn_label("foo", "tcp", addr): 3,
    }
    # Sessions: peers' accepted sessions count, links do not.
    assert m[ADD_SESSION] == {key(clientkey="B", peer="true"): 1,
                              key(clientkey="C", peer="true"): 1,
                              key(clientkey="foo", peer="false"): 1}
    for peer in "BC":
        assert m[PEER_CONNECTED][key(peer=peer)] == 1
        assert m[PEER_ATTEMPT][key(peer=peer)] >= 1
        assert key(peer=peer) not in support.family(m, PEER_DISCONNECTED)


# ---------------------------------------------------------------------------
# 2. A server of the group dies; its agent fails over


def test_server_dies_agent_fails_over(rd, tunnel_leak_check, echo_server, tmp_path):
    fds_before = support.open_fds()
    # B takes agents by bearer token, and at first not foo's (peers are
    # checked before the authorizer): the moment where foo is nowhere is
    # then the test's to look at, not a race against the agent's reconnect.
    tokens = tmp_path / "tokens"
    tokens.write_text("someone-elses-token-0000 other\n")
    m = Mesh(rd, authorizers={"B": rd.TokenAuthorizer(tokens)})
    try:
        a, b, c = m["A"], m["B"], m["C"]
        agent = rd.Client([a.url, b.url], headers={"X-Tunnel-ID": "foo",
                                                   "Authorization": "Bearer foo-token-0123456789"},
                          backoff_min=0.05, backoff_max=0.2).start()
        m.agents.append(agent)
        agent.wait_connected(timeout=TIMEOUT)
        assert agent.urls == [a.url, b.url] and agent.current_url == a.url
        m.wait_route("foo", {"A": "", "B": "A", "C": "A"})
        for srv in (b, c):
            dial_echo(srv, "foo", echo_server.address)

        a.close()
        # B and C drop A's announcements with A's sessions, at once.
        m.wait_route("foo", None, [b, c])
        for srv in (b, c):
            expect_no_session(rd, srv, "foo")
            assert peer_info(srv, "A")["inbound"] == 0
            assert peer_info(srv, "A")["keys"] == 0
        wait_for(lambda: not agent.connected, what="the agent to see A go")

        wait_for(lambda: "HTTP 401" in (agent.last_error or ""), what="B to refuse the agent")
        tokens.write_text("foo-token-0123456789 foo\n")
        b.reload_tokens()
        agent.wait_connected(timeout=TIMEOUT)
        wait_for(lambda: agent.current_url == b.url, what="the agent on B")
        m.wait_route("foo", {"B": "", "C": "B"}, [b, c])
        dial_echo(c, "foo", echo_server.address, b"again")
        dial_echo(b, "foo", echo_server.address, b"locally")
        echo_server.wait_finished(4)
        for srv in (b, c, agent):
            support.check_balanced(srv)
        addr = echo_server.address
        mc = c.metrics()
        assert mc[ADD_CONN] == mc[REMOVE_CONN] == {conn_label("A", "foo::tcp", addr): 1,
                                                   conn_label("B", "foo::tcp", addr): 1}
        # B and C keep trying to reach A.
        for srv in (b, c):
            wait_for(lambda: peer_info(srv, "A")["state"] != "connected", what="A's link down")
            assert srv.metrics()[PEER_DISCONNECTED][key(peer="A")] == 1
    finally:
        m.close()
    left_clean(rd, fds_before, tunnel_leak_check)


# ---------------------------------------------------------------------------
# 3. A wrong token


def test_wrong_peer_token_link_waits(mesh, rd):
    a, b = mesh["A"], mesh["B"]
    mesh.agent(a.url, "foo")
    mesh.wait_route("foo", {"A": "", "B": "A", "C": "A"})
    # D presents "token-d" but B expects another token for D: B answers the
    # upgrade as it would any request without agent headers (401).
    d = rd.Server("127.0.0.1:0", peer_id="D", peer_token="token-d").start()
    mesh.servers["D"] = d
    b.add_peer(d.url, "D", "not-token-d")
    d.add_peer(b.url, "B", TOKENS["B"])
    d.add_peer(a.url, "A", TOKENS["A"])  # A does not know D at all

    def waiting():
        p = peer_info(d, "B")
        return p["state"] == "waiting" and p["attempts"] > 1 and p

    info = wait_for(waiting, what="D's link to B to be refused twice")
    assert info["last_error"] == "websocket: bad handshake (HTTP 401: failed authentication)"
    # B's own link to D is fine (once past a first 401 while D did not know B).
    wait_for(lambda: peer_info(d, "B")["inbound"] == 1, what="B's link to D")
    assert peer_info(b, "D")["inbound"] == 0
    assert peer_info(d, "A")["state"] in ("waiting", "connecting")
    assert b.route("foo") == "A" and d.route("foo") is None
    expect_no_session(rd, d, "foo")
    m = d.metrics()
    assert m[PEER_ATTEMPT][key(peer="B")] >= 2
    assert key(peer="B") not in support.family(m, PEER_CONNECTED)
    # A raw peer with the wrong token is refused the same way, and with the
    # right one accepted.
    with pytest.raises(wsraw.HandshakeError) as refused:
        wsraw.WSConn.connect("127.0.0.1", b.port, headers=peer_headers("D", "token-d"))
    assert refused.value.status == 401, refused.value
    assert refused.value.body.startswith(b"failed authentication"), refused.value.body
    with raw_peer(b, "D", "not-token-d"):
        assert peer_info(b, "D")["inbound"] == 1


# ---------------------------------------------------------------------------
# 4. A raw peer that announces 100,000 keys


def test_hundred_thousand_announced_keys(raw_server, rd):
    srv = raw_server
    n = 100_000
    keys = [f"remote-{i}" for i in range(n)]
    ws = raw_peer(srv, "R1", "token-r1")
    support.ping_barrier(ws)
    heap0 = heap_in_use(rd)
    frames = tunnel_frames(ws, wsraw.ADD_CLIENT, [f"{k}/7" for k in keys])
    started = time.monotonic()
    ws.send_raw(frames)
    support.ping_barrier(ws, timeout=60)
    took = time.monotonic() - started
    info = peer_info(srv, "R1")
    assert info["keys"] == n and info["inbound"] == 1, info
    assert heap_in_use(rd) - heap0 > n * 16  # they are held...
    for k in keys[::97] + keys[-3:]:
        assert srv.route(k) == "R1", k  # ...and routable
    assert srv.route("remote-") is None and srv.route(f"remote-{n}") is None
    assert took < 30, f"{n} announcements took {took:.1f} s"

    # Announcing a pair again changes nothing; REMOVE_CLIENT takes one pair.
    ws.send_raw(tunnel_frames(ws, wsraw.ADD_CLIENT, ["remote-5/7"]) +
                tunnel_frames(ws, wsraw.REMOVE_CLIENT, ["remote-6/7", "remote-7/8"]))
    support.ping_barrier(ws)
    assert peer_info(srv, "R1")["keys"] == n - 1
    assert srv.route("remote-5") == "R1" and srv.route("remote-6") is None
    assert srv.route("remote-7") == "R1"  # another session key: not that pair

    # The peer goes: every route with it, at once.
    ws.close()
    wait_for(lambda: srv.route("remote-0") is None, what="the routes to go")
    assert peer_info(srv, "R1")["keys"] == 0
    assert all(srv.route(k) is None for k in keys[::997] + keys[-3:])
    wait_for(lambda: peer_info(srv, "R1")["inbound"] == 0, what="the session to end")
    assert heap_in_use(rd) - heap0 <= LIVE_HEAP_MARGIN


def test_malformed_add_client_ends_that_peer_session(raw_server):
    srv = raw_server
    keep = raw_peer(srv, "R2", "token-r2")
    keep.send_raw(tunnel_frames(keep, wsraw.ADD_CLIENT, ["kept/1"]))
    support.ping_barrier(keep)
    bad = raw_peer(srv, "R1", "token-r1")
    bad.send_raw(tunnel_frames(bad, wsraw.ADD_CLIENT, ["doomed/1"]))
    support.ping_barrier(bad)
    assert srv.route("doomed") == "R1"
    # Go's parseAddress wants "clientKey/sessionKey": it ends the session.
    bad.send_raw(tunnel_frames(bad, wsraw.ADD_CLIENT, ["nokey"]))
    assert bad.wait_closed() == 1002
    bad.close()
    label = key(clientkey="R1", peer="true")
    wait_for(lambda: peer_info(srv, "R1")["inbound"] == 0
             and counter(srv, REMOVE_SESSION, label) == 1, what="R1's session to end")
    assert srv.route("doomed") is None
    assert counter(srv, ADD_SESSION, label) == 1
    # Other peers' sessions live on.
    assert srv.route("kept") == "R2" and peer_info(srv, "R2")["inbound"] == 1
    # What Go's strconv.Atoi refuses ends the session too: no digits,
    # trailing or leading junk (spaces included), out of int64 range.
    for text in ("k/", "k/x", "k/1x", "k/ 5", "k/+", "k/1/2", "k/99999999999999999999"):
        bad = raw_peer(srv, "R1", "token-r1")
        bad.send_raw(tunnel_frames(bad, wsraw.ADD_CLIENT, [text]))
        assert bad.wait_closed() == 1002, text
        bad.close()
    # ...and what it takes is a pair: a sign, the int64 bounds, an empty key.
    ok = raw_peer(srv, "R1", "token-r1")
    ok.send_raw(tunnel_frames(ok, wsraw.ADD_CLIENT, [
        "plus/+5", "minus/-5", "max/9223372036854775807", "min/-9223372036854775808", "/1"]))
    support.ping_barrier(ok)
    assert peer_info(srv, "R1")["keys"] == 5
    assert srv.route("plus") == srv.route("min") == "R1"
    ok.close()
    support.ping_barrier(keep)
    assert srv.route("kept") == "R2"
    keep.close()
    wait_for(lambda: srv.route("kept") is None, what="R2's routes to go")


# ---------------------------------------------------------------------------
# 5. A flapping peer


def test_flapping_peer_leaves_no_stale_route(raw_server, rd):
    srv = raw_server
    flaps = 1000
    label = key(clientkey="R1", peer="true")

    def one(i, previous):
        """Opens a session, announces on it, then ends the previous one:
        half with a Close frame, half by dropping the TCP connection, and the
        announcement not always handled before the end."""
        ws = raw_peer(srv, "R1", "token-r1", wait=False)
        ws.send_raw(tunnel_frames(ws, wsraw.ADD_CLIENT, [f"flap/{i}", f"flap-{i % 7}/{i}"]))
        if previous is not None:
            (previous.close if i % 2 else previous.abort)()
        return ws

    ws = one(0, None)  # warm-up: the label sets exist before the baseline
    ws.close()
    wait_for(lambda: counter(srv, REMOVE_SESSION, label) == 1, what="the first flap to end")
    heap0 = heap_in_use(rd)
    started = time.monotonic()
    ws = None
    for i in range(1, flaps + 1):
        ws = one(i, ws)
        if i % 250 == 0:
            support.ping_barrier(ws)
            assert srv.route("flap") == "R1" and srv.route(f"flap-{i % 7}") == "R1"
    ws.abort()
    took = time.monotonic() - started
    wait_for(lambda: counter(srv, REMOVE_SESSION, label) == flaps + 1
             and peer_info(srv, "R1")["inbound"] == 0, what="every flap to end")
    assert peer_info(srv, "R1")["keys"] == 0
    assert srv.route("flap") is None
    assert all(srv.route(f"flap-{j}") is None for j in range(7))
    assert counter(srv, ADD_SESSION, label) == flaps + 1
    assert heap_in_use(rd) - heap0 <= LIVE_HEAP_MARGIN
    assert took < 45, f"{flaps} flaps took {took:.1f} s"


def test_new_session_of_a_peer_replaces_its_older_one(raw_server):
    # A peer keeps one link: a second session under its id means the first
    # is dead (say a path that broke without a reset). The first goes at
    # once, with its routes, instead of holding dials until its deadline.
    srv = raw_server
    old = raw_peer(srv, "R1", "token-r1")
    old.send_raw(tunnel_frames(old, wsraw.ADD_CLIENT, ["stale/1", "both/1"]))
    support.ping_barrier(old)
    assert srv.route("stale") == srv.route("both") == "R1"
    new = raw_peer(srv, "R1", "token-r1", wait=False)  # inbound stays 1
    assert old.wait_closed() == 1001
    assert old.close_reason == "replaced by a newer session of the peer"
    old.close()
    new.send_raw(tunnel_frames(new, wsraw.ADD_CLIENT, ["both/2"]))
    support.ping_barrier(new)
    assert srv.route("stale") is None and srv.route("both") == "R1"
    info = peer_info(srv, "R1")
    assert info["inbound"] == 1 and info["keys"] == 1
    label = key(clientkey="R1", peer="true")
    assert counter(srv, ADD_SESSION, label) == 2 and counter(srv, REMOVE_SESSION, label) == 1
    new.close()
    wait_for(lambda: srv.route("both") is None, what="the last route to go")


# ---------------------------------------------------------------------------
# 6. Two peers announce the same key


def test_same_key_on_two_peers(mesh, echo_server):
    a, b, c = mesh["A"], mesh["B"], mesh["C"]
    on_b = mesh.agent(b.url, "dup")
    mesh.agent(c.url, "dup")
    wait_for(lambda: peer_info(a, "B")["keys"] == 1 and peer_info(a, "C")["keys"] == 1,
             what="both announcements on A")
    first = a.route("dup")
    assert first in ("B", "C") and b.route("dup") == c.route("dup") == ""
    dial_echo(a, "dup", echo_server.address)
    addr = echo_server.address
    wait_for(lambda: counter(a, REMOVE_CONN, conn_label(first, "dup::tcp", addr)) == 1,
             what="the dial counted under the peer it went through")
    # The one that carried it withdraws (its agent leaves: REMOVE_CLIENT).
    other = "C" if first == "B" else "B"
    leaving = on_b if first == "B" else mesh.agents[1]
    leaving.close()
    mesh.wait_route("dup", other, [a])
    assert peer_info(a, first)["keys"] == 0 and peer_info(a, first)["inbound"] == 1
    dial_echo(a, "dup", echo_server.address, b"the other one")
    echo_server.wait_finished(2)
    m = support.wait_balanced(a)
    assert m[ADD_CONN] == {conn_label(first, "dup::tcp", addr): 1,
                           conn_label(other, "dup::tcp", addr): 1}


def _answer_connect(ws, expect_proto, address):
    """Reads the CONNECT a dial sent this raw peer (the end of an earlier
    connection may come first); returns its conn id."""
    msg = ws.recv_tunnel()
    while msg.type == wsraw.ERROR:
        msg = ws.recv_tunnel()
    assert msg.type == wsraw.CONNECT, msg
    assert msg.proto == expect_proto and msg.address == address, msg
    return msg.conn_id


def test_same_key_on_two_raw_peers_oldest_session_first(raw_server):
    srv = raw_server
    r1 = raw_peer(srv, "R1", "token-r1")
    r2 = raw_peer(srv, "R2", "token-r2")
    for ws in (r2, r1):  # the newer session announces first: age decides
        ws.send_raw(tunnel_frames(ws, wsraw.ADD_CLIENT, ["dup/1"]))
        support.ping_barrier(ws)
    assert srv.route("dup") == "R1"
    target = "10.0.0.1:80"

    def dial_and_answer(ws, payload):
        sock = srv.dial("dup", "tcp", target, timeout=TIMEOUT)
        cid = _answer_connect(ws, "dup::tcp", target)
        ws.send_msg(cid, wsraw.DATA, payload)
        assert support.recv_exact(sock, len(payload)) == payload
        ws.send_msg(cid, wsraw.ERROR, b"EOF")  # Go's clean end of a connection
        assert support.recv_until_eof(sock) == b""
        sock.close()

    dial_and_answer(r1, b"from r1")
    r1.send_raw(tunnel_frames(r1, wsraw.REMOVE_CLIENT, ["dup/1"]))
    support.ping_barrier(r1)
    assert srv.route("dup") == "R2"
    dial_and_answer(r2, b"from r2")
    # R1 announces again; R2's session ends: R1 carries the key alone.
    r1.send_raw(tunnel_frames(r1, wsraw.ADD_CLIENT, ["dup/1"]))
    support.ping_barrier(r1)
    assert srv.route("dup") == "R1"
    r2.abort()
    wait_for(lambda: peer_info(srv, "R2")["inbound"] == 0, what="R2's session to end")
    assert srv.route("dup") == "R1"
    dial_and_answer(r1, b"r1 again")
    r1.close()
    wait_for(lambda: srv.route("dup") is None, what="the last route to go")
    m = support.wait_balanced(srv)
    assert m[ADD_CONN] == {conn_label("R1", "dup::tcp", target): 2,
                           conn_label("R2", "dup::tcp", target): 1}


# ---------------------------------------------------------------------------
# 7. A peer dies with connections open through it


@pytest.mark.parametrize("how", ["close_server", "remove_peer"])
def test_peer_dies_with_connections_open(mesh, echo_server, how):
    a, b = mesh["A"], mesh["B"]
    agent = mesh.agent(a.url, "foo")
    mesh.wait_route("foo", "A", [b])
    socks = [b.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) for _ in range(3)]
    for s in socks:
        s.settimeout(TIMEOUT)
        round_trip(s)
    echo_server.wait_open(3)
    if how == "close_server":
        a.close()
    else:
        assert b.remove_peer("A") is True
        assert [p["id"] for p in b.peers()] == ["C"]
    for s in socks:
        data, _ = support.read_until_closed(s)
        assert data == b""
        assert s.tunnel_error, "a connection cut by its peer's end must say why"
        assert not s.tunnel_open
        s.close()
    # The agent's side ends too: its dials to the echo server close.
    echo_server.wait_open(0)
    assert b.route("foo") is None
    expect_no_session(mesh.rd, b, "foo")
    m = support.wait_balanced(b)
    label = conn_label("A", "foo::tcp", echo_server.address)
    assert m[ADD_CONN][label] == m[REMOVE_CONN][label] == 3
    if how == "remove_peer":
        # A's link to B is now refused (B no longer knows A); A's agent and
        # the routes through C are untouched.
        wait_for(lambda: "HTTP 401" in peer_info(a, "B")["last_error"], what="A refused by B")
        assert agent.connected and mesh["C"].route("foo") == "A"
        support.check_balanced(agent)
        dial_echo(mesh["C"], "foo", echo_server.address)
        assert b.remove_peer("A") is False


# ---------------------------------------------------------------------------
# 8. disconnect() reaches the agent's server


def test_disconnect_through_peers(mesh, echo_server):
    a, b, c = mesh["A"], mesh["B"], mesh["C"]
    agent = mesh.agent(a.url, "foo")
    mesh.wait_route("foo", {"A": "", "B": "A", "C": "A"})
    label = key(clientkey="foo", peer="false")
    assert b.disconnect("foo") == 0  # no session of foo on B itself
    wait_for(lambda: counter(a, REMOVE_SESSION, label) >= 1, what="foo's session ended on A")
    # The agent reconnects as after any drop, and is announced again.
    wait_for(lambda: counter(a, ADD_SESSION, label) >= 2 and a.has_session("foo"),
             what="the agent to reconnect")
    agent.wait_connected(timeout=TIMEOUT)
    mesh.wait_route("foo", {"A": "", "B": "A", "C": "A"})
    dial_echo(c, "foo", echo_server.address)
    # On the server itself it ends the local session and counts it.
    before = counter(a, REMOVE_SESSION, label)
    assert a.disconnect("foo") == 1
    wait_for(lambda: counter(a, REMOVE_SESSION, label) == before + 1, what="the second end")
    assert a.disconnect("nobody") == 0
    agent.wait_connected(timeout=TIMEOUT)
    mesh.wait_route("foo", {"A": "", "B": "A", "C": "A"})


def test_disconnect_reaches_a_raw_peer(raw_server, rd):
    """DISCONNECT_CLIENT (type 100, payload the key) goes over the sessions
    peers opened to us as well; a peer that sends it ends our local session."""
    srv = raw_server
    ws = raw_peer(srv, "R1", "token-r1")
    assert srv.disconnect("someone") == 0
    msg = ws.recv_tunnel()
    assert (msg.type, msg.conn_id, msg.payload) == (100, 0, b"someone"), msg
    agent = support.make_client(rd, srv.url, "local-agent")
    try:
        label = key(clientkey="local-agent", peer="false")
        ws.send_raw(tunnel_frames(ws, 100, ["local-agent"]))
        wait_for(lambda: counter(srv, REMOVE_SESSION, label) == 1, what="the agent's session ended")
        agent.wait_connected(timeout=TIMEOUT)
        support.check_balanced(agent)
    finally:
        agent.close()
    ws.close()


# ---------------------------------------------------------------------------
# 9. add_peer / remove_peer


def test_add_peer_idempotent_and_restarted_on_new_token(mesh):
    a, b = mesh["A"], mesh["B"]
    before = peer_info(a, "B")
    attempts = counter(a, PEER_ATTEMPT, key(peer="B"))
    for _ in range(3):
        a.add_peer(b.url, "B", TOKENS["B"])
    assert peer_info(a, "B") == before
    assert counter(a, PEER_ATTEMPT, key(peer="B")) == attempts
    assert peer_info(b, "A")["inbound"] == 1

    # A new token: what A accepts from B changes, and A's link restarts.
    a.add_peer(b.url, "B", "rotated")
    info = peer_info(a, "B")
    assert info["since"] >= before["since"] and info["attempts"] <= 1
    wait_for(lambda: peer_info(a, "B")["state"] == "connected", what="A's new link to B")
    wait_for(lambda: peer_info(b, "A")["inbound"] == 1, what="only A's new link on B")
    assert counter(a, PEER_ATTEMPT, key(peer="B")) == attempts + 1
    # B's session to A was ended (opened under the old token) and B now
    # presents a token A no longer takes.
    wait_for(lambda: "HTTP 401" in peer_info(b, "A")["last_error"], what="B refused by A")
    assert peer_info(a, "B")["inbound"] == 0
    assert [p["id"] for p in a.peers()] == ["B", "C"]

    # A new url restarts it as well (here, to nowhere).
    a.add_peer(closed_url(), "B", "rotated")
    wait_for(lambda: peer_info(a, "B")["state"] == "waiting", what="A's link to nowhere")
    wait_for(lambda: peer_info(b, "A")["inbound"] == 0, what="A's session to B to end")

    assert a.remove_peer("nobody") is False
    assert a.remove_peer("B") is True
    assert a.remove_peer("B") is False
    assert [p["id"] for p in a.peers()] == ["C"]


def test_peer_arguments_checked(rd, tunnel_leak_check):
    with rd.Server("127.0.0.1:0") as plain:
        with pytest.raises(ValueError, match="peer_id and peer_token"):
            plain.add_peer("ws://127.0.0.1:1/connect", "B", "token")
        assert plain.peers() == []
        assert plain.remove_peer("B") is False
        assert plain.route("x") is None
    with rd.Server("127.0.0.1:0", peer_id="A") as no_token:
        with pytest.raises(ValueError, match="peer_id and peer_token"):
            no_token.add_peer("ws://127.0.0.1:1/connect", "B", "token")
    with rd.Server("127.0.0.1:0", peer_id="A", peer_token="t") as srv:
        url = closed_url()
        srv.add_peer(url, "B", "tb")
        for bad in [(url, "", "t"), (url, "B", ""), (url, "B\r\nX: y", "t"), (url, "B", "t\n"),
                    (url, " B", "t"), (url, "B" * 101, "t"), ("http://127.0.0.1:1/", "B", "t"),
                    ("127.0.0.1:1", "B", "t"), (url, 7, "t"), ("ws://", "B", "t"),
                    ("ws://:80/connect", "B", "t"), ("ws://h:99999/", "B", "t"),
                    ("ws://[::1/", "B", "t"), ("ws://a b/", "B", "t")]:
            with pytest.raises(ValueError):
                srv.add_peer(*bad)
        # The engine checks the URL itself, before it touches the peer
        # configured under that id.
        for bad in ("ws://", "ws://:80/connect", "wsx://h/"):
            with pytest.raises(rd.TunnelError, match=r"^invalid peer URL"):
                rd._engine.server_add_peer(srv._handle, bad, "B", "t2")
        assert [(p["id"], p["url"]) for p in srv.peers()] == [("B", url)]
    with pytest.raises(ValueError, match="peer_id and peer_token"):
        rd.Server("127.0.0.1:0", peers=[("B", "t", "ws://127.0.0.1:1/connect")])
    for bad in ["B:t", "B:t:http://x/", ("B", "t"), ("B", "", "ws://x/")]:
        with pytest.raises(ValueError):
            rd.Server("127.0.0.1:0", peer_id="A", peer_token="t", peers=[bad])
    for bad in [dict(peer_id=""), dict(peer_id="a\nb"), dict(peer_token="")]:
        with pytest.raises(ValueError):
            rd.Server("127.0.0.1:0", **bad)
    # The Go -peers form, at start.
    b_url, c_url = closed_url(), closed_url()
    with rd.Server("127.0.0.1:0", peer_id="A", peer_token="t",
                   peers=[f"B:tb:{b_url}", ("C", "tc", c_url)]) as srv:
        assert [(p["id"], p["url"]) for p in srv.peers()] == [("B", b_url), ("C", c_url)]
    tunnel_leak_check.heap_margin = 0


# ---------------------------------------------------------------------------
# 10. The proxy route through a peer


def test_proxy_route_through_a_peer(mesh, http_service):
    a, b = mesh["A"], mesh["B"]
    mesh.agent(a.url, "foo")
    mesh.wait_route("foo", "A", [b])
    status, body, _ = support.get(b.port, f"/client/foo/http/{http_service.address}/hello")
    assert (status, body) == (200, http_service.HELLO)
    status, body, _ = support.get(b.port, f"/client/foo/http/{http_service.address}/echo",
                                  method="POST", body=b"posted through A")
    assert (status, body) == (200, b"posted through A")
    status, body, _ = support.get(b.port, f"/client/nobody/http/{http_service.address}/hello")
    assert status == 500 and body.startswith(b"failed to find Session for client nobody")
    m = support.wait_balanced(b)
    label = conn_label("A", "foo::tcp", http_service.address)
    assert m[ADD_CONN][label] == m[REMOVE_CONN][label] == 2


# ---------------------------------------------------------------------------
# 11. /debug/peers


def test_debug_peers_json(mesh):
    a, b = mesh["A"], mesh["B"]
    mesh.agent(a.url, "foo")
    mesh.wait_route("foo", "A", [b])
    status, body, resp = support.get(b.port, "/debug/peers")
    assert status == 200 and resp.getheader("Content-Type") == "application/json"
    doc = json.loads(body)
    assert set(doc) == {"peer_id", "peers"} and doc["peer_id"] == "B"
    by_id = {p["id"]: p for p in doc["peers"]}
    assert set(by_id) == {"A", "C"}
    for p in doc["peers"]:
        assert set(p) == PEER_FIELDS
        assert isinstance(p["since"], float) and isinstance(p["attempts"], int)
        assert p["state"] == "connected" and p["inbound"] == 1 and p["last_error"] == ""
    assert by_id["A"]["keys"] == 1 and by_id["C"]["keys"] == 0
    live = {p["id"]: p for p in b.peers()}
    for pid, p in by_id.items():
        assert {k: v for k, v in p.items() if k != "since"} == \
            {k: v for k, v in live[pid].items() if k != "since"}
        assert abs(p["since"] - live[pid]["since"]) < 0.01
    # Not served without debug_route.
    with mesh.rd.Server("127.0.0.1:0", peer_id="X", peer_token="t") as plain:
        assert support.get(plain.port, "/debug/peers")[0] == 404


# ---------------------------------------------------------------------------
# An agent with several server URLs


def test_client_url_list_skips_a_dead_url(rd, tunnel_leak_check, echo_server):
    fds_before = support.open_fds()
    dead = closed_url()
    with rd.Server("127.0.0.1:0") as srv:
        with support.make_client(rd, [dead, srv.url], "multi") as cli:
            assert cli.urls == [dead, srv.url] and cli.url == dead
            assert cli.current_url == srv.url and cli.connected
            support.dial_round_trip(srv, "multi", echo_server.address)
            echo_server.wait_finished(1)
            support.check_balanced(srv)
            support.check_balanced(cli)
        assert cli.current_url is None
    left_clean(rd, fds_before, tunnel_leak_check)


# ---------------------------------------------------------------------------
# More of the same machinery


def test_dial_errors_and_second_sessions_through_a_peer(mesh, echo_server):
    """The far side's dial error reaches the socket on B unchanged; a key
    with two sessions on A is announced twice and routed while either is up."""
    a, b = mesh["A"], mesh["B"]
    first = mesh.agent(a.url, "foo")
    mesh.wait_route("foo", "A", [b])
    port = support.closed_port()
    sock = b.dial("foo", "tcp", f"127.0.0.1:{port}", timeout=TIMEOUT)
    assert support.recv_until_eof(sock) == b""
    assert sock.tunnel_error == f"dial tcp 127.0.0.1:{port}: connect: connection refused"
    sock.close()
    second = mesh.agent(a.url, "foo")
    wait_for(lambda: peer_info(b, "A")["keys"] == 2, what="the second session announced")
    first.close()
    wait_for(lambda: peer_info(b, "A")["keys"] == 1, what="the first session withdrawn")
    assert b.route("foo") == "A"
    dial_echo(b, "foo", echo_server.address)
    second.close()
    mesh.wait_route("foo", None)
    assert peer_info(b, "A")["keys"] == 0


def test_keys_a_peer_cannot_carry_are_not_announced(mesh, echo_server):
    """A key with a '/' would be split there by the receiver, and a pair over
    100 bytes cut by its reader (naming another key); both would end the
    peer session, as Go's parseAddress refuses them. Neither is announced;
    the link lives on and other keys go through."""
    a, b = mesh["A"], mesh["B"]
    long_key = "k" * 90  # with "/" and a session key, over 100 bytes
    for k in ("a/b", long_key, "fine"):
        mesh.agent(a.url, k)
    mesh.wait_route("fine", "A", [b])
    assert peer_info(b, "A")["keys"] == 1 and peer_info(b, "A")["inbound"] == 1
    for k in ("a/b", "a", long_key):
        assert b.route(k) is None
        expect_no_session(mesh.rd, b, k)
    assert a.route("a/b") == a.route(long_key) == ""
    dial_echo(b, "fine", echo_server.address)


def test_peer_removed_and_added_again(mesh, echo_server):
    """Once B takes A back, A's link (refused meanwhile) gets in on a retry
    and announces the agents A has (not only those that come later)."""
    a, b = mesh["A"], mesh["B"]
    mesh.agent(a.url, "foo")
    mesh.wait_route("foo", "A", [b])
    assert b.remove_peer("A") is True
    wait_for(lambda: "HTTP 401" in peer_info(a, "B")["last_error"], what="A refused by B")
    assert b.route("foo") is None
    b.add_peer(a.url, "A", TOKENS["A"])
    mesh.wait_linked([a, b])
    mesh.wait_route("foo", "A", [b])
    dial_echo(b, "foo", echo_server.address)
    m = a.metrics()
    assert m[PEER_DISCONNECTED][key(peer="B")] == 1 and m[PEER_CONNECTED][key(peer="B")] == 2


def _recv_for(ws, conn_id, timeout=TIMEOUT):
    """The next tunnel message for conn_id (others, e.g. the end of an
    earlier connection, are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = ws.recv_tunnel(max(0.0, deadline - time.monotonic()))
        if msg.conn_id == conn_id:
            return msg


def test_link_as_seen_by_a_raw_peer(rd, tunnel_leak_check, echo_server):
    """The raw WebSocket plays the peer our server links to: the link's
    headers, the announcements (the agents already there first), the dials
    the peer makes through it, and DISCONNECT_CLIENT."""
    fds_before = support.open_fds()
    with wsraw.WSListener() as listener, \
            rd.Server("127.0.0.1:0", peer_id="S", peer_token="token-s") as srv:
        agents = [support.make_client(rd, srv.url, "foo")]
        try:
            srv.add_peer(listener.url, "R", "token-r")
            ws, req = listener.accept()
            assert req.path == "/connect"
            assert req.headers["x-api-tunnel-id"] == "S"
            assert req.headers["x-api-tunnel-token"] == "token-s"
            msg = ws.recv_tunnel()
            assert msg.type == wsraw.ADD_CLIENT and msg.conn_id == 0, msg
            name, session_key = msg.text.split("/")
            assert name == "foo" and int(session_key) >= 0
            wait_for(lambda: peer_info(srv, "R")["state"] == "connected", what="the link up")
            info = peer_info(srv, "R")
            assert info["inbound"] == 0 and info["attempts"] == 1 and info["last_error"] == ""

            agents.append(support.make_client(rd, srv.url, "bar"))
            added = ws.recv_tunnel()
            assert added.type == wsraw.ADD_CLIENT and added.text.startswith("bar/"), added
            agents.pop().close()
            removed = ws.recv_tunnel()
            assert (removed.type, removed.text) == (wsraw.REMOVE_CLIENT, added.text)

            # The peer dials our agent: "foo::tcp" goes to foo's session.
            ws.send_msg(5, wsraw.CONNECT, f"foo::tcp/{echo_server.address}")
            ws.send_msg(5, wsraw.DATA, b"through the link")
            assert ws.recv_data(5, 16) == b"through the link"
            ws.send_msg(5, wsraw.ERROR, b"EOF")
            echo_server.wait_finished(1)
            for cid, proto, error in (
                    (6, "nobody::tcp", "failed to find Session for client nobody"),
                    (7, "tcp", "invalid clientKey/proto: tcp"),
                    (8, "::tcp", "invalid clientKey/proto: ::tcp")):
                ws.send_msg(cid, wsraw.CONNECT, f"{proto}/127.0.0.1:9")
                msg = _recv_for(ws, cid)
                assert (msg.type, msg.text) == (wsraw.ERROR, error), msg
            m = support.wait_balanced(srv)
            assert m[ADD_CONN] == {
                conn_label("client", "foo::tcp", echo_server.address): 1,
                conn_label("foo", "tcp", echo_server.address): 1,
                conn_label("client", "nobody::tcp", "127.0.0.1:9"): 1,
                conn_label("client", "tcp", "127.0.0.1:9"): 1,
                conn_label("client", "::tcp", "127.0.0.1:9"): 1,
            }, m[ADD_CONN]

            # DISCONNECT_CLIENT over the link ends foo's local session; the
            # agent comes back and is announced again under a new pair.
            ws.send_msg(0, 100, b"foo")
            msg = ws.recv_tunnel()
            assert (msg.type, msg.text) == (wsraw.REMOVE_CLIENT, f"foo/{session_key}"), msg
            msg = ws.recv_tunnel()
            assert msg.type == wsraw.ADD_CLIENT and msg.text.startswith("foo/"), msg
            assert msg.text != f"foo/{session_key}"
            agents[0].wait_connected(timeout=TIMEOUT)

            # Removing the peer closes the link.
            assert srv.remove_peer("R") is True
            assert ws.wait_closed() in (1000, 1001)
            ws.close()
            for cli in agents:
                support.check_balanced(cli)
        finally:
            for cli in agents:
                cli.close()
    left_clean(rd, fds_before, tunnel_leak_check)


# ---------------------------------------------------------------------------
# Flow control across the splice on the agent's server


class Sender(support._ThreadedTCPServer):
    """Sends `total` deterministic bytes to each client, then closes."""

    def __init__(self, total, block):
        self.total, self.block = total, block
        super().__init__()

    def serve(self, conn):
        for _ in range(self.total // len(self.block)):
            conn.sendall(self.block)
        return support.Finished(self.total, "")


# PAUSE at 256 KiB held. What is in flight when it lands (session queues,
# socket buffers) is the same few MiB with or without the splice in the
# way, well under the hard cap (64 MiB) and under half the transfer.
FLOW = dict(max_buffer=256 << 10)
FLOW_TOTAL = 64 << 20


@pytest.fixture
def flow_mesh(rd, tunnel_leak_check):
    """A and B linked, small flow-control bounds everywhere, agent foo on A
    with the same bounds."""
    fds_before = support.open_fds()
    m = Mesh(rd, ids="AB", **FLOW)
    try:
        m.agent(m["A"].url, "foo", **FLOW)
        m.wait_route("foo", "A", [m["B"]])
        yield m
        for obj in m.live() + m.agents:
            support.check_balanced(obj)
    finally:
        m.close()
    left_clean(rd, fds_before, tunnel_leak_check)


def _all_paused(srv, n):
    conns = srv.connections()
    return len(conns) == n and all(c["paused"] for c in conns)


def test_pause_crosses_the_splice_toward_the_dialer(flow_mesh, rd):
    """B writes to a reader next to the agent that reads nothing at first:
    the agent pauses A, A passes the PAUSE on to B over the link, B stops
    reading its writer; nothing hits the hard cap and every byte arrives."""
    a, b = flow_mesh["A"], flow_mesh["B"]
    reader = support.StalledReader()
    peak = support.Sampler(rd)
    try:
        sock = b.dial("foo", "tcp", reader.address, timeout=TIMEOUT)
        block = random.Random(5).randbytes(1 << 20)
        sent_hash = hashlib.sha256(block * (FLOW_TOTAL // len(block))).hexdigest()
        errors = []

        def write():
            try:
                for _ in range(FLOW_TOTAL // len(block)):
                    sock.sendall(block)
            except OSError as e:
                errors.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        # A's two ends of the splice, and B's connection, all paused.
        wait_for(lambda: _all_paused(a, 2) and _all_paused(b, 1), what="PAUSE along the chain")
        reader.go.set()
        writer.join(TIMEOUT * 2)
        assert not writer.is_alive() and not errors, errors
        sock.shutdown(socket.SHUT_WR)
        (done,) = reader.wait_finished(1)
        assert (done.nbytes, done.sha256) == (FLOW_TOTAL, sent_hash)
        assert sock.tunnel_error is None
        sock.close()
        assert peak.stop() < FLOW_TOTAL // 2, peak.peak_held
    finally:
        peak.stop()
        reader.go.set()
        reader.close()


def test_pause_crosses_the_splice_toward_the_agent(flow_mesh, rd):
    """A target next to the agent sends 64 MiB to a socket on B that is not
    read at first: B pauses A's link connection, A passes the PAUSE on to
    the agent; nothing hits the hard cap and every byte arrives."""
    a, b = flow_mesh["A"], flow_mesh["B"]
    block = random.Random(6).randbytes(1 << 20)
    sender = Sender(FLOW_TOTAL, block)
    peak = support.Sampler(rd)
    try:
        sock = b.dial("foo", "tcp", sender.address, timeout=TIMEOUT)
        wait_for(lambda: _all_paused(b, 1) and _all_paused(a, 2), what="PAUSE along the chain")
        data = support.recv_until_eof(sock, timeout=TIMEOUT * 2)
        assert sock.tunnel_error is None
        assert len(data) == FLOW_TOTAL and data == block * (FLOW_TOTAL // len(block))
        sock.close()
        sender.wait_finished(1)
        assert peak.stop() < FLOW_TOTAL // 2, peak.peak_held
    finally:
        peak.stop()
        sender.close()


def test_client_url_list_all_dead(rd, tunnel_leak_check):
    dead = [closed_url(), closed_url()]
    with rd.Client(dead, headers={"X-Tunnel-ID": "nowhere"}, backoff_min=0.05,
                   backoff_max=0.1) as cli:
        with pytest.raises(TimeoutError, match=r"^not connected to any of "
                           rf"{dead[0]}, {dead[1]} within 0\.3 s \(last error: dial tcp "):
            cli.wait_connected(timeout=0.3)
        assert cli.current_url in dead and "connection refused" in cli.last_error
    tunnel_leak_check.heap_margin = 0


def test_client_url_list_retries_its_own_url_first(rd, tunnel_leak_check, tmp_path):
    """A lost session is retried on its own URL before the others: the
    agent that went to the second server (the first refused it) goes back
    there after a drop, although the first would now take it."""
    tokens = tmp_path / "tokens"
    tokens.write_text("someone-elses-token-0000 other\n")
    with rd.Server("127.0.0.1:0", rd.TokenAuthorizer(tokens)) as first, \
            rd.Server("127.0.0.1:0") as second:
        headers = {"X-Tunnel-ID": "multi", "Authorization": "Bearer multi-token-0123456789"}
        with rd.Client([first.url, second.url], headers=headers) as cli:
            cli.wait_connected(timeout=TIMEOUT)
            assert cli.current_url == second.url
            tokens.write_text("multi-token-0123456789 multi\n")
            first.reload_tokens()
            label = key(clientkey="multi", peer="false")
            assert second.disconnect("multi") == 1
            wait_for(lambda: counter(second, ADD_SESSION, label) == 2
                     and second.has_session("multi"), what="the agent back on the second")
            assert cli.current_url == second.url
            assert counter(first, ADD_SESSION, label) == 0
            # Its server gone, it moves on to the first.
            second.close()
            wait_for(lambda: first.has_session("multi"), what="the agent on the first")
            assert cli.current_url == first.url
            support.check_balanced(cli)
    tunnel_leak_check.heap_margin = 0


# ---------------------------------------------------------------------------
# A group of five


def test_five_server_group(rd, tunnel_leak_check, echo_server):
    """Five servers in a full mesh, an HA agent on A: every server reaches it;
    A goes: the rest drop the key, the agent fails over to B, all four reach
    it again; the counters balance everywhere and nothing is left."""
    fds_before = support.open_fds()
    m = Mesh(rd, ids="ABCDE")
    try:
        s = m.servers
        m.agent([s["A"].url, s["B"].url], "foo", backoff_min=0.05, backoff_max=0.2)
        m.wait_route("foo", {"A": "", "B": "A", "C": "A", "D": "A", "E": "A"})
        for srv in s.values():
            dial_echo(srv, "foo", echo_server.address, f"via {srv.peer_id}".encode())
        s["A"].close()
        m.wait_route("foo", {"B": "", "C": "B", "D": "B", "E": "B"})
        for srv in m.live():
            dial_echo(srv, "foo", echo_server.address, f"again via {srv.peer_id}".encode())
        echo_server.wait_finished(9)
        m.wait_linked()  # the four still form a mesh
        for srv in m.live():
            support.wait_balanced(srv)
            assert [p["state"] for p in srv.peers() if p["id"] == "A"] != ["connected"]
    finally:
        m.close()
    left_clean(rd, fds_before)
