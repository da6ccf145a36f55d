"""News of sessions: on_connect / on_disconnect callbacks and the
remotedialer_py.server / .client loggers, from real sessions."""
import logging
import queue

import pytest

import support
from support import TIMEOUT, wait_for


def collector():
    q = queue.Queue()
    return q, q.put


def take(q, kind):
    e = q.get(timeout=TIMEOUT)
    assert e.kind == kind, e
    return e


def test_server_tells_agent_sessions(rd, tunnel_leak_check):
    q, put = collector()
    with rd.Server(on_connect=put, on_disconnect=put) as srv:
        cli = support.make_client(rd, srv.url, "agent-e")
        e = take(q, "connect")
        assert (e.client_key, e.peer) == ("agent-e", False)
        host, port = e.remote.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        cli.close()
        e = take(q, "disconnect")
        assert (e.client_key, e.peer, e.remote) == ("agent-e", False, f"{host}:{port}")
        assert e.reason
    assert q.empty()


def test_server_tells_peer_sessions(rd, tunnel_leak_check):
    q, put = collector()
    with rd.Server(peer_id="A", peer_token="tok-a", on_connect=put,
                   on_disconnect=put) as a, \
            rd.Server(peer_id="B", peer_token="tok-b") as b:
        a.add_peer(b.url, "B", "tok-b")
        b.add_peer(a.url, "A", "tok-a")
        e = take(q, "connect")
        assert (e.client_key, e.peer) == ("B", True)
        b.close()
        e = take(q, "disconnect")
        assert (e.client_key, e.peer) == ("B", True)


def test_agent_tells_sessions_and_failed_attempts(rd, tunnel_leak_check):
    q, put = collector()
    dead = f"ws://127.0.0.1:{support.closed_port()}/connect"
    with rd.Server() as srv:
        url = srv.url
        cli = rd.Client([dead, url], headers={"X-Tunnel-ID": "agent-f"},
                        on_connect=put, on_disconnect=put, backoff_min=0.05, backoff_max=0.1)
        with cli.start():
            e = take(q, "fail")
            assert (e.url, e.attempt) == (dead, 1) and "refused" in e.reason
            e = take(q, "connect")
            assert e.url == url and e.attempt == 0
            srv.close()
            e = take(q, "disconnect")
            assert e.url == url and e.reason
            # Nothing listens any more: failed attempts (on both URLs), counted.
            attempts = [take(q, "fail").attempt for _ in range(3)]
            assert attempts == [1, 2, 3]
            # The same, counted: attempts and failures by URL.
            m = cli.metrics()
            tried = support.family(m, "remotedialer_agent_connect_attempts_total")
            failed = support.family(m, "remotedialer_agent_connect_failures_total")
            for u in (dead, url):
                label = (("url", u),)
                assert tried[label] >= failed.get(label, 0) >= 1, (u, tried, failed)
            assert sum(tried.values()) - sum(failed.values()) in (1, 2)  # one connected


def test_news_in_order_and_a_raising_callback(rd, tunnel_leak_check, caplog):
    seen = []

    def on_connect(e):
        seen.append("+")
        raise RuntimeError("a bug in the callback")

    with rd.Server(on_connect=on_connect, on_disconnect=lambda e: seen.append("-")) as srv:
        for _ in range(20):
            support.make_client(rd, srv.url, "cycle").close()
        wait_for(lambda: len(seen) == 40, what="every piece of news")
    assert seen == ["+", "-"] * 20
    assert "the connect callback raised" in caplog.text


def test_logged_on_the_component_loggers(rd, tunnel_leak_check, caplog):
    caplog.set_level(logging.INFO, logger="remotedialer_py")
    with rd.Server() as srv:
        with support.make_client(rd, srv.url, "logged"):
            wait_for(lambda: any(r.name == "remotedialer_py.server" and "connected: client logged"
                                 in r.getMessage() for r in caplog.records),
                     what="the server's log line")
            wait_for(lambda: any(r.name == "remotedialer_py.client" and
                                 f"connected: {srv.url}" in r.getMessage()
                                 for r in caplog.records), what="the agent's log line")
        wait_for(lambda: any("disconnected: client logged" in r.getMessage()
                             for r in caplog.records), what="the disconnect line")


def test_agent_news_names_the_wait(rd, tunnel_leak_check, caplog):
    """A failed attempt says how long until the next one: the backoff (with
    jitter in [0.8, 1.2)), growing per attempt up to backoff_max; the next
    URL of a round is tried at once (0)."""
    caplog.set_level(logging.INFO, logger="remotedialer_py.client")
    q, put = collector()
    dead = [f"ws://127.0.0.1:{support.closed_port()}/connect" for _ in range(2)]
    cli = rd.Client(dead, on_disconnect=put, backoff_min=0.2, backoff_max=0.4)
    with cli.start():
        waits = [take(q, "fail").retry_in for _ in range(6)]
    # Per round: the first URL fails (next URL at once), then the second (backoff).
    assert waits[0] == waits[2] == waits[4] == 0, waits
    assert 0.16 <= waits[1] < 0.24 and 0.32 <= waits[3] < 0.48 and 0.32 <= waits[5] < 0.48, waits
    lines = [r for r in caplog.records if "failed" in r.getMessage()]
    assert "; retrying in 0.0 s" in lines[0].getMessage()
    assert "; retrying in 0.2 s" in lines[1].getMessage()
    assert lines[1].retry_in == waits[1]


def test_server_logs_refused_upgrades(rd, tunnel_leak_check, caplog):
    """Each refused upgrade: the far address and why, at WARNING."""
    caplog.set_level(logging.INFO, logger="remotedialer_py.server")
    with rd.Server(authorizer=lambda req: ("", False)) as srv:
        q, put = collector()
        cli = rd.Client(srv.url, on_disconnect=put, backoff_min=5, backoff_max=5)
        with cli.start():
            assert "401" in take(q, "fail").reason
        wait_for(lambda: any(r.levelno == logging.WARNING and
                             "upgrade refused from 127.0.0.1:" in r.getMessage()
                             for r in caplog.records), what="the refusal's log line")
        rec = next(r for r in caplog.records if "upgrade refused" in r.getMessage())
        assert rec.getMessage().endswith(": HTTP 401: failed authentication")
        assert rec.reason == "HTTP 401: failed authentication"
        assert rec.remote.startswith("127.0.0.1:")


def test_bad_callbacks(rd):
    with pytest.raises(TypeError, match="on_connect must be callable"):
        rd.Server(on_connect="no")
    with pytest.raises(TypeError, match="on_disconnect must be callable"):
        rd.Client("ws://127.0.0.1:1/connect", on_disconnect=3)


def test_cli_logs_sessions_as_json(run_cli):
    import json
    srv = run_cli("server", "--listen", "127.0.0.1:0", "--log-format", "json")
    url = srv.wait_line(r"listening on (ws://\S+)").group(1)
    agent = run_cli("client", "--connect", url, "-id", "json-agent", ready=None)
    agent.wait_line(r"connected to .* as json-agent")  # its signal handlers are set by then
    m = srv.wait_line(r'^\{.*"connected: client json-agent from 127\.0\.0\.1:\d+".*\}$')
    doc = json.loads(m.group(0))
    assert doc["logger"] == "remotedialer_py.server" and doc["level"] == "INFO"
    assert agent.stop() == 0 and srv.stop() == 0
