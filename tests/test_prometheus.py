"""remotedialer_py.prometheus.Collector: a Server and a Client in one
prometheus_client registry, served over HTTP and scraped like Prometheus."""

import os
import shutil
import subprocess
import urllib.request

import pytest

import support
from support import ADD_CONN, AGENT_KEY, TIMEOUT, key, round_trip

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus_client not installed (the prometheus extra)")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def merged(*objs):
    """metrics() of several objects summed per label set (engine-wide gauges
    and process_* left out: they move between two reads)."""
    from remotedialer_py.prometheus import FAMILIES

    out = {}
    for obj in objs:
        for name, samples in obj.metrics().items():
            if FAMILIES[name][2]:
                continue
            into = out.setdefault(name, {})
            for labels, value in samples.items():
                into[labels] = into.get(labels, 0) + value
    return out


def serve(registry):
    """prometheus_client's own HTTP server on a free loopback port."""
    httpd, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    return httpd, thread


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_families_match_the_engine(tunnel, echo_server):
    """The collector's table of names, types and HELP texts is the engine's."""
    from remotedialer_py.prometheus import FAMILIES

    sock = tunnel.dial(echo_server.port)
    round_trip(sock)
    sock.close()
    support.wait_balanced(tunnel.srv)
    for obj in (tunnel.srv, tunnel.cli):
        families, _ = support.parse_exposition(obj.prometheus())
        assert families, "empty exposition"
        for name, fam in families.items():
            assert name in FAMILIES, f"engine family {name} missing from the collector's table"
            assert FAMILIES[name][:2] == (fam.type, fam.help), name


def test_server_and_client_scraped_over_http(tunnel, echo_server):
    from remotedialer_py.prometheus import Collector

    srv, cli = tunnel.srv, tunnel.cli
    sock = tunnel.dial(echo_server.port)
    round_trip(sock, b"x" * 1000)
    sock.close()
    support.wait_balanced(srv)
    support.wait_balanced(cli)

    registry = prometheus_client.CollectorRegistry()
    registry.register(Collector(srv, cli))
    httpd, thread = serve(registry)
    try:
        # A scrape taken while nothing moved (the session's own traffic,
        # such as a SYNC_CONNECTIONS, may land in between: then again).
        for _ in range(10):
            before = merged(srv, cli)
            text = scrape(httpd.server_port)
            expected = merged(srv, cli)
            if before == expected:
                break
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert not [n for n in families if n.startswith("process_")], "process_* is off by default"
    for name, want in expected.items():
        fam = families[name]
        got = {tuple(sorted(s.labels.items())): s.value for s in fam.samples}
        assert got == want, name
        assert all(s.name == name for s in fam.samples), f"{name}: samples renamed"
        if name.startswith("session_server_") or name.endswith("_total"):
            # Counters keep their names exactly: untyped, so no `_total` is
            # appended (to the Go names) or doubled (to ours).
            assert fam.type == "unknown"
            assert f"# TYPE {name} untyped" in text.splitlines()
        else:
            assert fam.type == "gauge"
    # Both sides' connection counters, each under its own client key label.
    assert families[ADD_CONN].samples
    labels = {s.labels["clientkey"] for s in families[ADD_CONN].samples}
    assert labels == {AGENT_KEY, "client"}
    # A server session and an agent session in this process: summed.
    sessions = {tuple(sorted(s.labels.items())): s.value
                for s in families["remotedialer_open_sessions"].samples}
    assert sessions[key(peer="false")] == 2
    for name in ("remotedialer_engine_heap_bytes", "remotedialer_loop_handles",
                 "remotedialer_buffered_bytes"):
        assert families[name].type == "gauge" and families[name].samples

    promtool = shutil.which("promtool")
    if promtool is not None:
        # Not under `make asan-test`'s preloaded sanitizer runtime.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        run = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=TIMEOUT, env=env)
        assert run.returncode == 0, f"promtool: {run.stdout}{run.stderr}\n{text}"


def test_default_registry_and_clashes(tunnel):
    from remotedialer_py.prometheus import Collector

    registry = prometheus_client.REGISTRY
    collector = Collector(tunnel.srv)
    # The default registry's process collector already has process_*.
    registry.register(collector)
    try:
        text = prometheus_client.generate_latest(registry).decode()
        types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
        names = [line.split()[2] for line in types]
        assert len(names) == len(set(names)), f"duplicate families: {types}"
        assert "# TYPE session_server_total_add_websocket_session untyped" in types
        # A second collector for the same registry is refused at once.
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(Collector(tunnel.cli))
        # process=True clashes with that process collector.
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(Collector(process=True))
    finally:
        registry.unregister(collector)

    own = prometheus_client.CollectorRegistry()
    own.register(Collector(tunnel.srv, process=True))
    families = {f.name for f in text_string_to_metric_families(
        prometheus_client.generate_latest(own).decode())}
    assert {"process_open_fds", "process_resident_memory_bytes"} <= families

    with pytest.raises(TypeError, match="expected a Server or Client"):
        Collector("not a server")


def test_closed_objects_drop_out(rd):
    from remotedialer_py.prometheus import Collector

    srv = rd.Server(listen="127.0.0.1:0")
    collector = Collector(srv)
    assert list(collector.collect()) == []  # not started yet
    with srv:
        names = {f.name for f in collector.collect()}
        assert "remotedialer_loop_handles" in names
    assert list(collector.collect()) == []
