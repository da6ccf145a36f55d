#!/usr/bin/env python3
"""remotedialer-py benchmark, the phases at scale (run by bench.py):

(s) Sessions: --sessions agents (rd.Client), --per-process of them in each
    load process (the descriptor hard limit is per process), join one
    server (in a process of its own, so its memory starts fresh) one load
    process at a time. After each step: the server's RSS
    and live engine heap (memory against sessions, from the baseline with
    none); the time each step's agents took to connect all at once
    (handshakes per second). At the top: dials spread round-robin over
    every session at full rate (dials/s, as in (b)). Then all leave and
    the server's sessions, connections, live heap and descriptors are
    compared with the baseline.
(m) Memory against open idle tunneled connections: --idle-max connections
    through a forward of a server in its own process, opened in --steps
    steps (each step's by a helper of its own), the server's and the
    agent's RSS and live heap after each.
(w) wss: bulk through a plain ws tunnel and a wss one (a self-signed
    certificate made at run time by the openssl command line) beside raw
    loopback, one connection, over payload (write) sizes; CPU seconds per
    GiB at both ends (the server's engine: this process less its sending
    thread; the agent: its own process). TLS handshakes per second: the
    time --tls-sessions wss agents take to connect at once. Latency of a
    dial + echo + close, tunneled and direct, every sample kept for the
    distribution plot.

    python bench/bench.py --phases smw --sessions 2000 --idle-max 4000
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

import bench as B

PAYLOADS = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)


def live_heap(stats):
    # Idle pooled I/O blocks are a bounded cache, not per-session state.
    return stats["heap_bytes"] - stats["pool_bytes"]


# ---------------------------------------------------------------------------
# The load agent: many Clients in one process


def role_load(url, prefix, count, ca_file=None):
    """count Clients with keys PREFIX-0 .. PREFIX-(count-1), started on "go"
    (all at once), then "ready SECONDS" once every one is connected; stdin
    closed: all closed, then exit. Prints "booted" first."""
    B.raise_nofile()
    import remotedialer_py as rd

    opts = {"ca_file": ca_file} if ca_file else {}
    clients = [rd.Client(url, headers={"X-Tunnel-ID": f"{prefix}-{i}"}, **opts)
               for i in range(count)]
    print("booted", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go":
            t0 = time.perf_counter()
            for c in clients:
                c.start()
            for c in clients:
                c.wait_connected(timeout=300)
            print(f"ready {time.perf_counter() - t0:.3f}", flush=True)
        elif cmd == "pid":
            print(os.getpid(), flush=True)
    for c in clients:
        c.close()
    os._exit(0)


class Agents:
    """n agents in ceil(n / per_process) load processes, keys
    PREFIX-P-I; connected when the constructor returns. A context manager:
    leaving it closes them all. step() joins the next process's agents
    only (see start=False)."""

    def __init__(self, url, n, per_process=2500, env=None, prefix="load", ca_file=None,
                 start=True):
        self.env = env or dict(os.environ)
        self.sizes = sizes = [min(per_process, n - i) for i in range(0, n, per_process)]
        self.procs = []
        self.keys = []
        try:
            for p, size in enumerate(sizes):
                args = ["--role", "load", "--url", url, "--key", f"{prefix}-{p}",
                        "--count", str(size)]
                if ca_file:
                    args += ["--ca-file", ca_file]
                self.procs.append(B.Helper(args, self.env, script=__file__))
                self.keys += [f"{prefix}-{p}-{i}" for i in range(size)]
            for h in self.procs:
                if h.line() != "booted":
                    raise RuntimeError("a load process did not start")
            self.joined = 0
            if start:
                for h in self.procs:
                    h.proc.stdin.write("go\n")
                    h.proc.stdin.flush()
                for h in self.procs:
                    _ready(h)
                self.joined = len(self.procs)
        except BaseException:
            self.close()
            raise

    def step(self):
        """Joins the next load process's agents; returns (count, seconds
        from "go" to all connected as that process saw it)."""
        h = self.procs[self.joined]
        h.proc.stdin.write("go\n")
        h.proc.stdin.flush()
        secs = _ready(h)
        self.joined += 1
        return self.sizes[self.joined - 1], secs

    def pids(self):
        return [h.proc.pid for h in self.procs]

    def close(self):
        for h in self.procs:
            h.close()
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ready(h):
    line = h.line(timeout=600)
    if not line.startswith("ready "):
        raise RuntimeError(f"load process: {line}")
    return float(line.split()[1])


# ---------------------------------------------------------------------------
# A server in its own process, so that each memory figure starts fresh


def role_server():
    """A Server: prints {"url": ...}, then answers one JSON command per line
    with one JSON line, {"ok": result} or {"error": text}."""
    B.raise_nofile()
    import remotedialer_py as rd

    srv = rd.Server(listen="127.0.0.1:0")
    srv.start()
    forwards = []
    print(json.dumps({"url": srv.url}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "stats":
                out = {"stats": rd.engine_stats(), "rss": B.rss_bytes()}
            elif op == "wait_sessions":
                B.wait_until(lambda: rd.engine_stats()["open_sessions"] == cmd["n"],
                             cmd["within"], f"{cmd['n']} sessions")
                out = None
            elif op == "wait_connections":
                B.wait_until(lambda: rd.engine_stats()["open_connections"] == cmd["n"],
                             cmd["within"], f"{cmd['n']} connections")
                out = None
            elif op == "has_session":
                out = srv.has_session(cmd["key"])
            elif op == "forward":
                fwd = srv.forward(cmd["key"], "tcp", f"127.0.0.1:{cmd['port']}",
                                  listen="127.0.0.1:0")
                forwards.append(fwd)
                out = fwd.port
            elif op == "dials":
                out = B.bench_conns(round_robin_dialer(srv, cmd["keys"], cmd["port"]),
                                    cmd["seconds"], cmd["concurrency"])
            elif op == "balanced":
                out = B.counters_balance(srv)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001 - reported to the benchmark process
            print(json.dumps({"error": f"{op}: {type(e).__name__}: {e}"}), flush=True)
            continue
        print(json.dumps({"ok": out}), flush=True)
    for fwd in forwards:
        fwd.close()
    srv.close()
    os._exit(0)


def server_helper(env):
    h = B.Helper(["--role", "server"], env, script=__file__)
    return h, json.loads(h.line())["url"]


def ask(h, timeout=B.HELPER_TIMEOUT, **cmd):
    return B.peer_ask(h, timeout, **cmd)


# ---------------------------------------------------------------------------
# (s) sessions


def round_robin_dialer(srv, keys, port):
    address = f"127.0.0.1:{port}"
    it = [0]

    def dial():
        key = keys[it[0] % len(keys)]
        it[0] += 1
        return srv.dial(key, "tcp", address, timeout=30)
    return dial


def bench_sessions(ports, n, per_process, seconds, concurrency, env):
    srv, url = server_helper(env)
    try:
        base = ask(srv, op="stats")
        steps = [{"sessions": 0, "rss_bytes": base["rss"], "heap_bytes": live_heap(base["stats"]),
                  "open_fds": base["stats"]["open_fds"]}]
        handshakes = []
        with Agents(url, n, per_process, env, start=False) as agents:
            total = 0
            for _ in agents.procs:
                t0 = time.perf_counter()
                count, _ = agents.step()
                total += count
                ask(srv, 300, op="wait_sessions", n=total, within=300)
                handshakes.append({"count": count,
                                   "seconds": round(time.perf_counter() - t0, 3)})
                st = ask(srv, op="stats")
                steps.append({"sessions": total, "rss_bytes": st["rss"],
                              "heap_bytes": live_heap(st["stats"]),
                              "open_fds": st["stats"]["open_fds"]})
            dials = ask(srv, seconds + 300, op="dials", keys=agents.keys, port=ports["close"],
                        seconds=seconds, concurrency=concurrency)
            top = ask(srv, op="stats")
        t0 = time.perf_counter()
        ask(srv, 300, op="wait_sessions", n=0, within=300)
        ask(srv, 300, op="wait_connections", n=0, within=300)
        leave_s = time.perf_counter() - t0
        end = ask(srv, op="stats")
        balanced = ask(srv, op="balanced")
    finally:
        srv.close()
    top_step = steps[-1]
    return {
        "sessions": n, "per_process": per_process, "steps": steps,
        "rss_bytes_per_session": round((top_step["rss_bytes"] - base["rss"]) / n, 1),
        "heap_bytes_per_session": round((top_step["heap_bytes"] - steps[0]["heap_bytes"]) / n, 1),
        "handshakes": handshakes,
        "handshakes_per_second": round(sum(h["count"] for h in handshakes)
                                       / sum(h["seconds"] for h in handshakes)),
        "dials": dials,
        "baseline": {"heap_bytes": steps[0]["heap_bytes"], "open_fds": steps[0]["open_fds"],
                     "rss_bytes": base["rss"]},
        "top": {"heap_bytes": live_heap(top["stats"]), "open_fds": top["stats"]["open_fds"]},
        "after": {"heap_bytes": live_heap(end["stats"]), "open_fds": end["stats"]["open_fds"],
                  "pool_bytes": end["stats"]["pool_bytes"],
                  "open_sessions": end["stats"]["open_sessions"],
                  "open_connections": end["stats"]["open_connections"],
                  "rss_bytes": end["rss"], "seconds_to_leave": round(leave_s, 3)},
        "balanced": balanced,
    }


# ---------------------------------------------------------------------------
# (m) memory against open idle connections


def bench_idle_steps(far, ports, n_max, steps, env):
    key = "bench-idle-steps"
    srv, url = server_helper(env)
    agent = B.Helper(["--role", "agent", "--url", url, "--key", key], env)
    openers = []
    rows = []
    try:
        if agent.line() != "ready":
            raise RuntimeError("agent did not connect")
        B.wait_until(lambda: ask(srv, op="has_session", key=key), 60, "the idle agent's session")
        port = ask(srv, op="forward", key=key, port=ports["hold"])

        def row(count):
            st = ask(srv, op="stats")
            a = json.loads(agent.ask("stats"))
            rows.append({"connections": count, "server_rss": st["rss"],
                         "server_heap": live_heap(st["stats"]), "agent_rss": a["rss"],
                         "agent_heap": live_heap(a["stats"])})

        row(0)
        size = n_max // steps
        for k in range(1, steps + 1):
            h = B.Helper(["--role", "opener", "--port", str(port), "-n", str(size)], env)
            openers.append(h)
            line = h.line(timeout=600)
            if line != f"open {size}":
                raise RuntimeError(f"opener: {line}")
            row(k * size)
        for h in openers:
            if h.ask("close") != "closed":
                raise RuntimeError("opener did not close")
        far.ask("release")
        ask(srv, 300, op="wait_connections", n=0, within=300)
        row(0)
        limit = ask(srv, op="stats")["stats"]["nofile_soft"]
    finally:
        for h in openers:
            h.close()
        agent.close()
        srv.close()
    top, base = rows[-2], rows[0]
    n = top["connections"]
    return {"rows": rows, "limit": limit,
            "server_rss_per_conn": round((top["server_rss"] - base["server_rss"]) / n, 1),
            "server_heap_per_conn": round((top["server_heap"] - base["server_heap"]) / n, 1),
            "agent_rss_per_conn": round((top["agent_rss"] - base["agent_rss"]) / n, 1),
            "agent_heap_per_conn": round((top["agent_heap"] - base["agent_heap"]) / n, 1)}


# ---------------------------------------------------------------------------
# (w) wss against ws


def make_cert(directory):
    """A self-signed P-256 certificate for 127.0.0.1 (its own trust anchor)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                    "-subj", "/CN=bench", "-days", "2",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True)
    return cert, key


def thread_cpu(tid):
    return B.cpu_seconds(None, f"/proc/self/task/{tid}/stat")


def send_sized(port, seconds, size):
    """As bench.send_for, in writes of `size` bytes (one frame each)."""
    payload = os.urandom(size)
    frame = len(payload).to_bytes(4, "big") + payload
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=B.HELPER_TIMEOUT) as s:
        s.sendall(b"\0\0\0\0")
        B.recv_exact(s, 8)
        sent = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(max(1, (1 << 20) // size)):
                s.sendall(frame)
                sent += size
        s.sendall(b"\0\0\0\0")
        count = int.from_bytes(B.recv_exact(s, 8), "big")
        elapsed = time.perf_counter() - t0
    if count != sent:
        raise RuntimeError(f"sink counted {count} bytes, {sent} were sent")
    return sent, elapsed


def bench_wss(rd, ports, seconds, repeat, tls_sessions, env):
    """Two servers in this process, plain and TLS, each with one agent in its
    own process: bulk over payload sizes, CPU per GiB, TLS handshakes/s,
    latency samples."""
    tmp = tempfile.mkdtemp(prefix="rd-bench-")
    cert, key = make_cert(tmp)
    plain = rd.Server(listen="127.0.0.1:0").start()
    tls = rd.Server(listen="127.0.0.1:0", tls_cert=cert, tls_key=key).start()
    agents = []
    try:
        ws_agent = Agents(plain.url, 1, env=env, prefix="ws")
        agents.append(ws_agent)
        wss_agent = Agents(tls.url, 1, env=env, prefix="wss", ca_file=cert)
        agents.append(wss_agent)
        ws_key, wss_key = ws_agent.keys[0], wss_agent.keys[0]
        B.wait_until(lambda: plain.has_session(ws_key) and tls.has_session(wss_key), 60,
                     "the ws and wss agents")
        sink = f"127.0.0.1:{ports['sink']}"
        with plain.forward(ws_key, "tcp", sink, listen="127.0.0.1:0") as f_ws, \
                tls.forward(wss_key, "tcp", sink, listen="127.0.0.1:0") as f_wss:
            paths = (("raw", ports["sink"], None), ("ws", f_ws.port, ws_agent.pids()[0]),
                     ("wss", f_wss.port, wss_agent.pids()[0]))
            me = os.getpid()
            main_tid = threading.get_native_id()
            sizes = {}
            for size in PAYLOADS:
                sizes[size] = {}
                for name, port, _ in paths:
                    nbytes, secs = send_sized(port, max(0.5, seconds / 4), size)
                    sizes[size][name] = round(nbytes / secs / 1e6, 1)
            bulk = {name: [] for name, _, _ in paths}
            for _ in range(repeat):
                for name, port, agent_pid in paths:
                    c0 = (B.cpu_seconds(me) - thread_cpu(main_tid),
                          B.cpu_seconds(agent_pid) if agent_pid else 0.0)
                    nbytes, secs = B.send_for(port, seconds)
                    c1 = (B.cpu_seconds(me) - thread_cpu(main_tid),
                          B.cpu_seconds(agent_pid) if agent_pid else 0.0)
                    gib = nbytes / (1 << 30)
                    sample = {"mb_s": round(nbytes / secs / 1e6, 1)}
                    if agent_pid:
                        sample["server_cpu_s_per_gib"] = round((c1[0] - c0[0]) / gib, 3)
                        sample["agent_cpu_s_per_gib"] = round((c1[1] - c0[1]) / gib, 3)
                    bulk[name].append(sample)
        best = {name: max(xs, key=lambda x: x["mb_s"]) for name, xs in bulk.items()}
        latency = {
            "direct": B.bench_latency(B.raw_dialer(ports["echo"]), seconds / 2)["samples_us"],
            "dial": B.bench_latency(B.tunnel_dialer(plain, ws_key, ports["echo"]),
                                    seconds / 2)["samples_us"],
            "dial_wss": B.bench_latency(B.tunnel_dialer(tls, wss_key, ports["echo"]),
                                        seconds / 2)["samples_us"],
        }
        t0 = time.perf_counter()
        with Agents(tls.url, tls_sessions, env=env, prefix="tls", ca_file=cert,
                    start=False) as many:
            for _ in many.procs:
                many.step()
            B.wait_until(lambda: len([1 for k in many.keys[-1:] if tls.has_session(k)]) == 1,
                         60, "the wss agents")
            tls_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with Agents(plain.url, tls_sessions, env=env, prefix="plain", start=False) as many:
            for _ in many.procs:
                many.step()
            plain_s = time.perf_counter() - t0
    finally:
        for a in agents:
            a.close()
        plain.close()
        tls.close()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    return {"sizes": {str(k): v for k, v in sizes.items()}, "bulk": best, "samples": bulk,
            "latency_us": latency, "tls_sessions": tls_sessions,
            "tls_handshakes_per_second": round(tls_sessions / tls_s),
            "ws_handshakes_per_second": round(tls_sessions / plain_s)}


# ---------------------------------------------------------------------------
# The table


def pct(xs, q):
    xs = sorted(xs)
    return B.percentile(xs, q) if xs else math.nan


def report_lines(results):
    lines = []
    s = results.get("sessions")
    if s:
        base, after = s["baseline"], s["after"]
        lines += [
            f"(s) {s['sessions']} agent sessions on one server ({s['per_process']} Clients per "
            "load process, joining one process at a time)",
            f"    per idle session: RSS {B.kib(s['rss_bytes_per_session'])}, "
            f"engine heap {B.kib(s['heap_bytes_per_session'])}",
            f"    handshakes: {s['handshakes_per_second']} per second "
            "(" + ", ".join(f"{h['count']} in {h['seconds']:g} s" for h in s["handshakes"]) + ")",
            f"    dials spread over all sessions: {s['dials']['per_second']} per second "
            f"({s['dials']['connections']} in {s['dials']['seconds']:g} s, "
            f"{s['dials']['concurrency']} in flight, {s['dials']['errors']} errors)",
            f"    after all left ({after['seconds_to_leave']:g} s): sessions "
            f"{after['open_sessions']}, connections {after['open_connections']}, "
            f"fds {base['open_fds']} -> {s['top']['open_fds']} -> {after['open_fds']}, "
            f"counters balanced: {s['balanced']}",
            f"    live heap {base['heap_bytes']} -> {s['top']['heap_bytes']} -> "
            f"{after['heap_bytes']} bytes (what stays: the counters' series per client key, "
            "as Go's)",
        ]
    m = results.get("idle_steps")
    if m:
        top = m["rows"][-2]
        lines += [
            f"(m) memory against open idle tunneled connections (0 to {top['connections']}, "
            f"descriptor limit {m['limit']} per process)",
            f"    server: RSS {B.kib(m['server_rss_per_conn'])}, engine heap "
            f"{B.kib(m['server_heap_per_conn'])} per connection; agent: RSS "
            f"{B.kib(m['agent_rss_per_conn'])}, engine heap {B.kib(m['agent_heap_per_conn'])}",
        ]
    w = results.get("wss")
    if w:
        raw = w["bulk"]["raw"]["mb_s"]
        lines.append(f"(w) bulk, one connection, 1 MiB writes, best of {len(w['samples']['raw'])}"
                     ": MB/s, share of raw, CPU s/GiB server + agent")
        for name, label in (("raw", "raw loopback TCP"), ("ws", "tunnel over ws"),
                            ("wss", "tunnel over wss (TLS)")):
            x = w["bulk"][name]
            cpu = ""
            if "server_cpu_s_per_gib" in x:
                cpu = (f"   {x['server_cpu_s_per_gib']:.2f} + {x['agent_cpu_s_per_gib']:.2f}"
                       f" = {x['server_cpu_s_per_gib'] + x['agent_cpu_s_per_gib']:.2f}")
            lines.append(f"    {label:<28}{x['mb_s']:>9.1f} MB/s "
                         f"{x['mb_s'] / raw * 100:>6.1f}%{cpu}")
        sizes = w["sizes"]
        lines.append("    by write size (MB/s raw / ws / wss): " + ", ".join(
            f"{int(k) // 1024} KiB {v['raw']:.0f}/{v['ws']:.0f}/{v['wss']:.0f}"
            for k, v in sizes.items()))
        lines.append(f"    handshakes, {w['tls_sessions']} agents at once: wss "
                     f"{w['tls_handshakes_per_second']} per second, ws "
                     f"{w['ws_handshakes_per_second']} per second")
        lat = w["latency_us"]
        lines.append("    dial + 4-byte echo + close, p50/p99: " + ", ".join(
            f"{name} {pct(xs, 50) / 1000:.3f}/{pct(xs, 99) / 1000:.3f} ms"
            for name, xs in lat.items()))
    return lines


def main():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--role")
    p.add_argument("--url")
    p.add_argument("--key")
    p.add_argument("--count", type=int)
    p.add_argument("--ca-file")
    args = p.parse_args()
    if args.role == "load":
        return role_load(args.url, args.key, args.count, args.ca_file)
    if args.role == "server":
        return role_server()
    p.error("run bench/bench.py; this script is its helper")


if __name__ == "__main__":
    sys.exit(main())
