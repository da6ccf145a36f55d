#!/usr/bin/env python3
"""remotedialer-py benchmark: one run, four figures.

(a) Bulk throughput, one connection, in MB/s (10^6 B/s), three ways from the
    same sender to the same TCP sink:
      raw loopback TCP (sender -> sink, one hop);
      two plain relays (sender -> relay -> relay -> sink, three loopback
        hops, each relay a process copying with blocking recv_into/sendall):
        the cost of the hops without any tunnel, the ceiling for any relay
        and the figure the tunnel's should be compared with;
      through the tunnel (sender -> Server.forward -> tunnel -> agent ->
        sink, also three hops).
    The triple runs --repeat times and the best of each is reported (all
    samples go to the JSON); the tunnel is given as a share of raw and of
    the relays.
(b) Tunneled connections opened and closed per second: a selector loop keeps
    --concurrency dials in flight through Server.dial to a far side that
    sends one byte and closes; a connection counts when its socket has read
    that byte and then EOF.
(c) Memory per idle open tunneled connection on each side: --idle
    connections through a forward to a far side that holds them open; the
    agent runs in its own process so each side's engine heap and RSS can be
    measured apart; the deltas over the baseline are divided by the count.
    The heap is the live heap: engine_stats()['heap_bytes'] less the idle
    pooled I/O blocks ('pool_bytes'), a bounded cache the count would
    otherwise share.
(d) HA peering: servers A and B, each a peer of the other and each in its
    own process, an agent connected to A. A dial on A for the agent's key is
    the local path; the same dial on B goes B -> peer session -> A -> agent.
    Three paths, alternated --repeat rounds: plain TCP (no tunnel), a dial
    on A, a dial on B, each measured in the dialing server's own process:
      dial latency: one at a time for --seconds, dial + 4-byte echo + close,
        p50/p90/p99 over all rounds;
      connections opened and closed per second as in (b), best round;
    then bulk as in (a), best of --repeat: raw, two plain relays (3 hops),
    three plain relays (4 hops, as many as the peer path), forward on A
    (3 hops) and forward on B (4 hops); for each, the CPU seconds per GiB of
    every process in between (relays; A, B, agent), read from /proc.

In (a) and (b) the agent (rd.Client) runs in its own process, as it does in
production, so the server's engine loop carries one end of the tunnel and the
agent's the other; --same-process puts the agent's Client in this process
instead (one engine loop carries both ends), for comparison.

The far side (sink, accept-and-close, hold), the relays, the agents and the
opener of the idle connections run in helper processes (this same script
with --role), so their sockets and CPU are not charged to the benchmark
process.

    python bench/bench.py                    # defaults: 5 s phases, 10,000 idle
    python bench/bench.py --seconds 2 -n 2000 --json bench.json
    python bench/bench.py --phases a --same-process
    python bench/bench.py --phases d         # HA peering only

Phases s (10,000 agent sessions), m (memory against open connections) and w
(wss against ws) are in bench_scale.py, u (the dashboard under load) in
bench_dashboard.py; --png-dir draws the figures (bench_plots.py).
"""

import argparse
import json
import os
import queue
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

CHUNK = 1 << 20
HELPER_TIMEOUT = 120.0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    interval = 0.001
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


# ---------------------------------------------------------------------------
# Helper processes


class Helper:
    """This script in another role, spoken to by lines on stdin/stdout."""

    def __init__(self, role_args, env, script=__file__):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script), *role_args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=env, cwd=tempfile.gettempdir())
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout=HELPER_TIMEOUT):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"helper {self.proc.args[2:]} silent for {timeout}s") from None
        if line is None:
            raise RuntimeError(f"helper {self.proc.args[2:]} exited ({self.proc.wait()})")
        return line

    def ask(self, command, timeout=HELPER_TIMEOUT):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line(timeout)

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def role_far():
    """Four loopback services: a framed sink, accept-send-close,
    accept-send-hold, and echo (each connection's bytes sent back, closed at
    its EOF). Commands: "held" (count), "release" (close held)."""
    raise_nofile()
    sink = socket.create_server(("127.0.0.1", 0), backlog=4096)
    closer = socket.create_server(("127.0.0.1", 0), backlog=4096)
    holder = socket.create_server(("127.0.0.1", 0), backlog=4096)
    echo = socket.create_server(("127.0.0.1", 0), backlog=4096)
    held = []
    lock = threading.Lock()

    def sink_conn(c):
        # Frames: 4-byte big-endian length, then that many bytes; a zero
        # length asks for the byte count since the last report.
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        hdr = bytearray()
        remaining = total = 0
        try:
            while True:
                n = c.recv_into(buf)
                if not n:
                    return
                pos = 0
                while pos < n:
                    if remaining:
                        take = min(remaining, n - pos)
                        remaining -= take
                        total += take
                        pos += take
                        continue
                    take = min(4 - len(hdr), n - pos)
                    hdr += mv[pos:pos + take]
                    pos += take
                    if len(hdr) == 4:
                        remaining = int.from_bytes(hdr, "big")
                        hdr.clear()
                        if remaining == 0:
                            c.sendall(total.to_bytes(8, "big"))
                            total = 0
        except OSError:
            pass
        finally:
            c.close()

    def accept_sink():
        while True:
            c, _ = sink.accept()
            threading.Thread(target=sink_conn, args=(c,), daemon=True).start()

    def accept_close():
        while True:
            c, _ = closer.accept()
            try:
                c.sendall(b"x")
            except OSError:
                pass
            c.close()

    def accept_hold():
        while True:
            c, _ = holder.accept()
            try:
                c.sendall(b"x")
            except OSError:
                c.close()
                continue
            with lock:
                held.append(c)

    def serve_echo():
        # One selector loop for every echo connection: no thread to start per
        # connection in the timed path.
        sel = selectors.DefaultSelector()
        echo.setblocking(False)
        sel.register(echo, selectors.EVENT_READ)
        while True:
            for k, _ in sel.select():
                if k.fileobj is echo:
                    try:
                        c, _ = echo.accept()
                    except BlockingIOError:
                        continue
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                    continue
                c = k.fileobj
                try:
                    data = c.recv(65536)
                    if data:
                        c.setblocking(True)
                        c.sendall(data)
                        c.setblocking(False)
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sel.unregister(c)
                c.close()

    for fn in (accept_sink, accept_close, accept_hold, serve_echo):
        threading.Thread(target=fn, daemon=True).start()
    print(json.dumps({"sink": sink.getsockname()[1], "close": closer.getsockname()[1],
                      "hold": holder.getsockname()[1], "echo": echo.getsockname()[1]}),
          flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "held":
            with lock:
                print(len(held), flush=True)
        elif cmd == "release":
            with lock:
                for c in held:
                    c.close()
                held.clear()
            print("released", flush=True)
    os._exit(0)


def role_opener(port, n, inflight=256):
    """Opens n connections to port, each confirmed by one byte from the far
    side, keeping at most `inflight` unconfirmed; then holds them until
    told "close"."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    socks = []
    started = done = 0
    pending = 0
    while done < n:
        while started < n and pending < inflight:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
            started += 1
            pending += 1
        events = sel.select(timeout=60)
        if not events:
            print(f"error: stalled at {done} of {n}", flush=True)
            return
        for key, _ in events:
            s = key.fileobj
            try:
                data = s.recv(1)
            except BlockingIOError:
                continue
            except OSError as e:
                print(f"error: {e}", flush=True)
                return
            if data != b"x":
                print(f"error: connection ended before its first byte ({done} open)", flush=True)
                return
            sel.unregister(s)
            pending -= 1
            done += 1
    print(f"open {n}", flush=True)
    for line in sys.stdin:
        if line.strip() == "close":
            for s in socks:
                s.close()
            socks.clear()
            print("closed", flush=True)


def role_agent(url, key):
    """A Client in its own process; "stats" prints its engine figures and RSS,
    "balanced" prints "true" or "false": whether its add/remove connection
    counters balance (counters_balance)."""
    raise_nofile()
    import remotedialer_py as rd

    cli = rd.Client(url, headers={"X-Tunnel-ID": key})
    cli.start()
    cli.wait_connected(timeout=60)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            print(json.dumps({"stats": rd.engine_stats(), "rss": rss_bytes()}), flush=True)
        elif cmd == "balanced":
            print("true" if counters_balance(cli) else "false", flush=True)
    cli.close()


PEER_TOKEN = "bench-peer-token"


def role_peer_server(peer_id):
    """A Server of an HA group (peer_id, PEER_TOKEN) in its own process: prints
    {"url": ...}, then answers one JSON command per line with one JSON line,
    {"ok": result} or {"error": text}. The timed commands (latency, conns)
    run here, beside this server's engine, as (b) runs beside its server."""
    raise_nofile()
    import remotedialer_py as rd

    srv = rd.Server(listen="127.0.0.1:0", peer_id=peer_id, peer_token=PEER_TOKEN)
    srv.start()
    forwards = []
    print(json.dumps({"url": srv.url}), flush=True)

    def dialer(cmd):
        if cmd.get("key") is None:  # the baseline: plain TCP, no tunnel
            return raw_dialer(cmd["port"])
        return tunnel_dialer(srv, cmd["key"], cmd["port"])

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "add_peer":
                srv.add_peer(cmd["url"], cmd["id"], PEER_TOKEN)
                out = None
            elif op == "route":
                out = srv.route(cmd["key"])
            elif op == "peers":
                out = srv.peers()
            elif op == "connections":
                out = srv.connections()
            elif op == "forward":
                fwd = srv.forward(cmd["key"], "tcp", f"127.0.0.1:{cmd['port']}",
                                  listen="127.0.0.1:0")
                forwards.append(fwd)
                out = fwd.port
            elif op == "latency":
                out = bench_latency(dialer(cmd), cmd["seconds"])
            elif op == "conns":
                out = bench_conns(dialer(cmd), cmd["seconds"], cmd["concurrency"])
            elif op == "balanced":
                out = counters_balance(srv)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001 - reported to the benchmark process
            print(json.dumps({"error": f"{op}: {type(e).__name__}: {e}"}), flush=True)
            continue
        print(json.dumps({"ok": out}), flush=True)
    for fwd in forwards:
        fwd.close()
    srv.close()


def role_relay(port):
    """A plain TCP relay to 127.0.0.1:port: prints its listening port, then
    takes connections one at a time, each copied both ways by one blocking
    thread per direction (recv_into a 1 MiB buffer, sendall), EOF passed on
    with shutdown(SHUT_WR). Exits when stdin closes, once the connection in
    hand (if any) is done."""
    lst = socket.create_server(("127.0.0.1", 0))
    print(lst.getsockname()[1], flush=True)
    idle = threading.Event()
    idle.set()

    def pipe(src, dst):
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                dst.sendall(mv[:n])
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # Pass the failure on both ways rather than leave a peer waiting.
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        while True:
            try:
                a, _ = lst.accept()
            except OSError:
                return
            idle.clear()
            try:
                b = socket.create_connection(("127.0.0.1", port), timeout=HELPER_TIMEOUT)
                b.settimeout(None)
            except OSError:
                a.close()
                idle.set()
                continue
            threads = [threading.Thread(target=pipe, args=(a, b), daemon=True),
                       threading.Thread(target=pipe, args=(b, a), daemon=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            a.close()
            b.close()
            idle.set()

    threading.Thread(target=serve, daemon=True).start()
    for _ in sys.stdin:
        pass
    idle.wait(30)
    os._exit(0)


# ---------------------------------------------------------------------------
# Phases


def send_for(port, seconds):
    """Streams CHUNK frames to the sink for `seconds`, then waits for its
    count. Returns (bytes, elapsed seconds) from the first byte to the ack."""
    payload = os.urandom(CHUNK)
    hdr = len(payload).to_bytes(4, "big")
    with socket.create_connection(("127.0.0.1", port), timeout=HELPER_TIMEOUT) as s:
        # One round trip first, so the whole path is connected before the
        # first megabytes: the figure is the steady state, not the connect.
        s.sendall(b"\0\0\0\0")
        recv_exact(s, 8)
        # A short warm-up on the same connection (buffers, TCP windows).
        for _ in range(8):
            s.sendall(hdr)
            s.sendall(payload)
        s.sendall(b"\0\0\0\0")
        recv_exact(s, 8)
        sent = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            s.sendall(hdr)
            s.sendall(payload)
            sent += CHUNK
        s.sendall(b"\0\0\0\0")
        count = int.from_bytes(recv_exact(s, 8), "big")
        elapsed = time.perf_counter() - t0
    if count != sent:
        raise RuntimeError(f"sink counted {count} bytes, {sent} were sent")
    return sent, elapsed


def start_relays(sink_port, env, count=2):
    """A chain of `count` relays in front of the sink: relay k forwards to
    relay k-1, relay 1 to the sink. Returns (ports, helpers), where ports[i]
    is the entry of the chain of i + 1 relays (sender -> relay i+1 -> ... ->
    relay 1 -> sink, i + 2 hops)."""
    relays = []
    ports = []
    try:
        port = sink_port
        for _ in range(count):
            relays.append(Helper(["--role", "relay", "--port", str(port)], env))
            port = int(relays[-1].line())
            ports.append(port)
    except BaseException:
        for h in relays:
            h.close()
        raise
    return ports, relays


def cpu_seconds(pid, stat=None):
    """User + system CPU seconds of process pid so far (all its threads), or
    of the /proc stat file given (one thread's)."""
    with open(stat or f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bulk_rounds(paths, seconds, repeat):
    """paths: (name, port, {label: pid}) triples. Streams to each port in
    turn, `repeat` rounds; each sample has MB/s and, for each labelled
    process, its CPU seconds per GiB moved during that sample."""
    samples = {name: [] for name, _, _ in paths}
    for _ in range(repeat):
        for name, port, procs in paths:
            before = {label: cpu_seconds(pid) for label, pid in procs.items()}
            try:
                nbytes, secs = send_for(port, seconds)
            except OSError as e:
                raise RuntimeError(f"bulk through {name} (port {port}): {e!r}") from e
            sample = {"mb_s": round(nbytes / secs / 1e6, 1), "bytes": nbytes,
                      "seconds": round(secs, 3)}
            if procs:
                gib = nbytes / (1 << 30)
                sample["cpu_s_per_gib"] = {
                    label: round((cpu_seconds(pid) - before[label]) / gib, 3)
                    for label, pid in procs.items()}
            samples[name].append(sample)
    best = {name: max(xs, key=lambda x: x["mb_s"]) for name, xs in samples.items()}
    return samples, best


def bench_bulk(srv, key, sink_port, seconds, repeat, env):
    """raw, two plain relays, tunnel, `repeat` times; the best of each."""
    (_, relay_port), relays = start_relays(sink_port, env)
    try:
        with srv.forward(key, "tcp", f"127.0.0.1:{sink_port}", listen="127.0.0.1:0") as fwd:
            samples, best = bulk_rounds([("raw", sink_port, {}), ("relay", relay_port, {}),
                                         ("tunnel", fwd.port, {})], seconds, repeat)
    finally:
        for h in relays:
            h.close()
    raw, relay, tun = (best[k]["mb_s"] for k in ("raw", "relay", "tunnel"))
    return {"raw_mb_s": raw, "relay_mb_s": relay, "tunnel_mb_s": tun,
            "ratio": round(tun / raw, 3), "relay_ratio": round(relay / raw, 3),
            "tunnel_vs_relay": round(tun / relay, 3), "repeat": repeat,
            "raw_bytes": best["raw"]["bytes"], "tunnel_bytes": best["tunnel"]["bytes"],
            "relay_bytes": best["relay"]["bytes"],
            "raw_seconds": best["raw"]["seconds"], "tunnel_seconds": best["tunnel"]["seconds"],
            "relay_seconds": best["relay"]["seconds"], "samples": samples}


def tunnel_dialer(srv, key, port):
    address = f"127.0.0.1:{port}"
    return lambda: srv.dial(key, "tcp", address, timeout=30)


def raw_dialer(port):
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=30)


def bench_conns(dial, seconds, concurrency):
    """Keeps `concurrency` connections from dial() in flight to the far
    side's accept-send-close service for `seconds`; a connection counts when
    it has read that byte and then EOF."""
    sel = selectors.DefaultSelector()
    got_byte = {}
    done = errors = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        if time.perf_counter() < deadline:
            while len(got_byte) < concurrency:
                s = dial()
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                got_byte[s] = False
        elif not got_byte:
            break
        events = sel.select(timeout=30)
        if not events:
            raise TimeoutError(f"{len(got_byte)} connections stalled")
        for k, _ in events:
            s = k.fileobj
            try:
                data = s.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                data = None
            if data:
                got_byte[s] = True
                continue
            ok = data == b"" and got_byte[s] and getattr(s, "tunnel_error", None) is None
            errors += not ok
            sel.unregister(s)
            del got_byte[s]
            s.close()
            done += 1
    elapsed = time.perf_counter() - t0
    sel.close()
    return {"per_second": round(done / elapsed), "connections": done, "errors": errors,
            "seconds": round(elapsed, 3), "concurrency": concurrency}


def bench_latency(dial, seconds, warmup=50):
    """One connection at a time to the far side's echo service for
    `seconds`: dial, send PING, read it back, close. Returns the times of
    the whole sequence in microseconds (after `warmup` untimed ones) and the
    count of those that failed."""
    samples = []
    errors = 0
    msg = b"ping"
    deadline = None
    i = 0
    while deadline is None or time.perf_counter() < deadline:
        if i == warmup:
            deadline = time.perf_counter() + seconds
        i += 1
        t = time.perf_counter()
        try:
            s = dial()
            try:
                s.sendall(msg)
                ok = recv_exact(s, len(msg)) == msg
            finally:
                s.close()
        except OSError:
            ok = False
        us = (time.perf_counter() - t) * 1e6
        if deadline is None:
            continue
        if ok:
            samples.append(round(us, 1))
        else:
            errors += 1
    return {"samples_us": samples, "errors": errors}


def percentile(sorted_xs, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_xs:
        return None
    return sorted_xs[min(len(sorted_xs) - 1, max(0, int(-(-q * len(sorted_xs) // 100)) - 1))]


def bench_idle(rd, srv, far, ports, n, env):
    key = "bench-idle"
    agent = Helper(["--role", "agent", "--url", srv.url, "--key", key], env)
    opener = None
    try:
        if agent.line() != "ready":
            raise RuntimeError("agent did not connect")
        wait_until(lambda: srv.has_session(key), 60, "the idle agent's session")
        with srv.forward(key, "tcp", f"127.0.0.1:{ports['hold']}", listen="127.0.0.1:0") as fwd:
            base_srv = (rd.engine_stats(), rss_bytes())
            base_agent = json.loads(agent.ask("stats"))
            opener = Helper(["--role", "opener", "--port", str(fwd.port), "-n", str(n)], env)
            t0 = time.perf_counter()
            line = opener.line(timeout=600)
            if line != f"open {n}":
                raise RuntimeError(f"opener: {line}")
            open_s = time.perf_counter() - t0
            after_srv = (rd.engine_stats(), rss_bytes())
            after_agent = json.loads(agent.ask("stats"))
            if opener.ask("close") != "closed":
                raise RuntimeError("opener did not close")
            far.ask("release")
            base_open = base_srv[0]["open_connections"]
            wait_until(lambda: rd.engine_stats()["open_connections"] <= base_open, 120,
                       "the server side to close the idle connections")
            agent_base_open = base_agent["stats"]["open_connections"]
            wait_until(lambda: json.loads(agent.ask("stats"))["stats"]["open_connections"]
                       <= agent_base_open, 120, "the agent side to close the idle connections")
            final_srv = rd.engine_stats()
            final_agent = json.loads(agent.ask("stats"))
    finally:
        if opener is not None:
            opener.close()
        agent.close()

    def live(stats):
        # Idle pooled I/O blocks are a bounded cache, not per-connection state.
        return stats["heap_bytes"] - stats["pool_bytes"]

    def side(base, after, final):
        (bs, br), (as_, ar), fs = base, after, final
        return {
            "heap_bytes_per_conn": round((live(as_) - live(bs)) / n, 1),
            "rss_bytes_per_conn": round((ar - br) / n, 1),
            "heap_objects_per_conn": round((as_["heap_objects"] - bs["heap_objects"]) / n, 2),
            "heap_bytes_baseline": live(bs),
            "heap_bytes_open": live(as_),
            "heap_bytes_after_close": live(fs),
            "pool_bytes_after_close": fs["pool_bytes"],
        }

    return {
        "connections": n,
        "open_seconds": round(open_s, 3),
        "server": side(base_srv, after_srv, final_srv),
        "agent": side((base_agent["stats"], base_agent["rss"]),
                      (after_agent["stats"], after_agent["rss"]), final_agent["stats"]),
    }


def peer_ask(helper, timeout=HELPER_TIMEOUT, **cmd):
    answer = json.loads(helper.ask(json.dumps(cmd), timeout))
    if "error" in answer:
        raise RuntimeError(f"peer server: {answer['error']}")
    return answer["ok"]


# The three ways (d) reaches the far side, in the order each round runs them:
# (name, the server whose process dials, client key or None for plain TCP).
PEER_KEY = "bench-peer"
PEER_PATHS = (("raw", "A", None), ("local", "A", PEER_KEY), ("peer", "B", PEER_KEY))


def bench_peer(ports, seconds, repeat, concurrency, env):
    """(d): servers A and B of an HA group, each in its own process, each a
    peer of the other; the agent connects to A. A dial on A for the agent's
    key is local (A -> agent); the same dial on B goes through B's peer
    session to A, then on to the agent. Each round runs every path once, in
    turn, so slow spells of the machine fall on all of them."""
    key = PEER_KEY
    a = b = agent = None
    relays = []
    try:
        a = Helper(["--role", "peer-server", "--peer-id", "A"], env)
        b = Helper(["--role", "peer-server", "--peer-id", "B"], env)
        a_url = json.loads(a.line())["url"]
        b_url = json.loads(b.line())["url"]
        peer_ask(a, op="add_peer", url=b_url, id="B")
        peer_ask(b, op="add_peer", url=a_url, id="A")
        agent = Helper(["--role", "agent", "--url", a_url, "--key", key], env)
        if agent.line() != "ready":
            raise RuntimeError("the peering agent did not connect")
        wait_until(lambda: peer_ask(a, op="route", key=key) == ""
                   and peer_ask(b, op="route", key=key) == "A", 60,
                   "B to learn the agent's key from A")
        servers = {"A": a, "B": b}
        timed = seconds + HELPER_TIMEOUT

        lat_rounds = {name: [] for name, _, _ in PEER_PATHS}
        conn_rounds = {name: [] for name, _, _ in PEER_PATHS}
        for _ in range(repeat):
            for name, where, k in PEER_PATHS:
                lat_rounds[name].append(peer_ask(servers[where], timed, op="latency", key=k,
                                                 port=ports["echo"], seconds=seconds))
        for _ in range(repeat):
            for name, where, k in PEER_PATHS:
                conn_rounds[name].append(peer_ask(servers[where], timed, op="conns", key=k,
                                                  port=ports["close"], seconds=seconds,
                                                  concurrency=concurrency))

        def lat_figures(xs):
            xs = sorted(xs)
            return {"p50_us": percentile(xs, 50), "p90_us": percentile(xs, 90),
                    "p99_us": percentile(xs, 99), "max_us": xs[-1] if xs else None,
                    "mean_us": round(sum(xs) / len(xs), 1) if xs else None, "count": len(xs)}

        latency = {}
        for name, rounds in lat_rounds.items():
            fig = lat_figures([x for r in rounds for x in r["samples_us"]])
            fig["errors"] = sum(r["errors"] for r in rounds)
            fig["rounds"] = [dict(lat_figures(r["samples_us"]), errors=r["errors"])
                             for r in rounds]
            latency[name] = fig
        conns = {name: dict(max(rounds, key=lambda r: r["per_second"]), samples=rounds)
                 for name, rounds in conn_rounds.items()}

        fwd_a = peer_ask(a, op="forward", key=key, port=ports["sink"])
        fwd_b = peer_ask(b, op="forward", key=key, port=ports["sink"])
        relay_ports, relays = start_relays(ports["sink"], env, 3)
        relay_pids = [h.proc.pid for h in relays]
        tunnel_pids = {"A": a.proc.pid, "B": b.proc.pid, "agent": agent.proc.pid}
        samples, best = bulk_rounds([
            ("raw", ports["sink"], {}),
            ("relay2", relay_ports[1], {f"relay{i + 1}": pid for i, pid in enumerate(relay_pids[:2])}),
            ("relay3", relay_ports[2], {f"relay{i + 1}": pid for i, pid in enumerate(relay_pids)}),
            ("local", fwd_a, tunnel_pids),
            ("peer", fwd_b, tunnel_pids),
        ], seconds, repeat)
        bulk = {name: dict(best[name], samples=samples[name]) for name in samples}

        try:
            wait_until(lambda: peer_ask(a, op="balanced") and peer_ask(b, op="balanced")
                       and agent.ask("balanced") == "true", 60, "balance")
            balanced = True
        except TimeoutError:
            balanced = False
    finally:
        for h in [*relays, agent, b, a]:
            if h is not None:
                h.close()

    mb = {name: bulk[name]["mb_s"] for name in bulk}

    def paired(a_rounds, b_rounds, field):
        # Ratios of the two paths within each round (measured seconds apart),
        # and their median: steadier than best over best on a busy machine.
        ratios = sorted(round(x[field] / y[field], 3) for x, y in zip(a_rounds, b_rounds))
        return {"rounds": ratios, "median": ratios[(len(ratios) - 1) // 2] if len(ratios) % 2
                else round((ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2, 3)}

    return {
        "repeat": repeat, "concurrency": concurrency,
        "latency": latency, "conns": conns, "bulk": bulk,
        "peer_vs_local_mb": round(mb["peer"] / mb["local"], 3),
        "peer_vs_relay3_mb": round(mb["peer"] / mb["relay3"], 3),
        "local_vs_relay2_mb": round(mb["local"] / mb["relay2"], 3),
        "peer_vs_local_conns": round(conns["peer"]["per_second"]
                                     / conns["local"]["per_second"], 3),
        "paired": {
            "peer_vs_local_mb": paired(samples["peer"], samples["local"], "mb_s"),
            "peer_vs_relay3_mb": paired(samples["peer"], samples["relay3"], "mb_s"),
            "local_vs_relay2_mb": paired(samples["local"], samples["relay2"], "mb_s"),
            "peer_vs_local_conns": paired(conn_rounds["peer"], conn_rounds["local"], "per_second"),
            "peer_minus_local_p50_us": sorted(
                round(x["p50_us"] - y["p50_us"], 1)
                for x, y in zip(latency["peer"]["rounds"], latency["local"]["rounds"])),
        },
        "balanced": balanced,
    }


def counters_balance(obj):
    m = obj.metrics()
    adds = m.get("session_server_total_add_connections", {})
    removes = m.get("session_server_total_remove_connections", {})
    return all(adds.get(k, 0) == removes.get(k, 0) for k in set(adds) | set(removes))


def kib(x):
    return f"{x / 1024:.2f} KiB"


def report(results, args):
    lines = ["remotedialer-py benchmark "
             f"({os.cpu_count()} cores, Python {sys.version.split()[0]}, {args.seconds:g} s phases; "
             "1-min load average {:.2f} at start, {:.2f} at end)".format(*results["loadavg"])]
    bulk = results.get("bulk")
    if bulk:
        where = ("agent in this process (one engine loop at both ends)"
                 if args.same_process else "agent in its own process")
        lines += [
            f"(a) bulk, one connection; {where}; best of {bulk['repeat']}",
            f"    raw loopback TCP            {bulk['raw_mb_s']:>9.1f} MB/s",
            f"    two plain relays (3 hops)   {bulk['relay_mb_s']:>9.1f} MB/s   "
            f"{bulk['relay_ratio'] * 100:.1f}% of raw",
            f"    through the tunnel          {bulk['tunnel_mb_s']:>9.1f} MB/s   "
            f"{bulk['ratio'] * 100:.1f}% of raw, "
            f"{bulk['tunnel_vs_relay'] * 100:.0f}% of the relays",
        ]
    conns = results.get("conns")
    if conns:
        lines += [
            "(b) tunneled connections opened and closed; agent "
            + ("in this process" if args.same_process else "in its own process"),
            f"    {conns['per_second']:>9} per second   ({conns['connections']} in "
            f"{conns['seconds']:g} s, {conns['concurrency']} in flight, {conns['errors']} errors)",
        ]
    idle = results.get("idle")
    if idle:
        lines.append(f"(c) memory per idle tunneled connection ({idle['connections']} open)")
        for name in ("server", "agent"):
            s = idle[name]
            lines.append(f"    {name:<6}  engine heap {kib(s['heap_bytes_per_conn']):>11}   "
                         f"RSS {kib(s['rss_bytes_per_conn']):>11}   "
                         f"(live heap {s['heap_bytes_baseline']} -> {s['heap_bytes_open']} -> "
                         f"{s['heap_bytes_after_close']} bytes after close)")
    peer = results.get("peer")
    if peer:
        lat, conns, bulk = peer["latency"], peer["conns"], peer["bulk"]
        rounds = f"{peer['repeat']} round" + ("s" if peer["repeat"] != 1 else "")
        label = {"raw": "plain TCP, no tunnel", "local": "local: dial on A",
                 "peer": "via the peer: dial on B"}
        lines += [
            "(d) HA peering: the agent on server A, B reaches it through its peer session to A;",
            f"    A, B and the agent each in their own process; paths alternated, {rounds}",
            f"    {'dial + 4-byte echo + close, one at a time':<42} {'p50':>10} {'p90':>10} "
            f"{'p99':>10} {'samples':>8}",
        ]
        for name in ("raw", "local", "peer"):
            x = lat[name]
            lines.append(f"      {label[name]:<40} {x['p50_us'] / 1000:>7.3f} ms "
                         f"{x['p90_us'] / 1000:>7.3f} ms {x['p99_us'] / 1000:>7.3f} ms "
                         f"{x['count']:>8}" + (f"  ({x['errors']} errors)" if x["errors"] else ""))
        lines.append(f"    connections opened and closed, {peer['concurrency']} in flight, "
                     f"best of {peer['repeat']}")
        for name in ("raw", "local", "peer"):
            x = conns[name]
            lines.append(f"      {label[name]:<40} {x['per_second']:>8} per second"
                         + (f"  ({x['errors']} errors)" if x["errors"] else ""))
        raw = bulk["raw"]["mb_s"]
        lines.append(f"    {'bulk, one connection, best of ' + str(peer['repeat']):<42} {'MB/s':>8} "
                     f"{'of raw':>7}   CPU s/GiB of the processes in between")
        names = {"raw": "raw loopback TCP (1 hop)", "relay2": "two plain relays (3 hops)",
                 "relay3": "three plain relays (4 hops)", "local": "forward on A (3 hops)",
                 "peer": "forward on B, via the peer (4 hops)"}
        for name in ("raw", "relay2", "relay3", "local", "peer"):
            x = bulk[name]
            cpu = x.get("cpu_s_per_gib") or {}
            if name == "local":  # B is idle then; its few ticks are in the JSON
                cpu = {k: v for k, v in cpu.items() if k != "B"}
            if name.startswith("relay"):
                parts = "relays " + " + ".join(f"{v:.2f}" for v in cpu.values())
            else:
                parts = " + ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            total = f" = {sum(cpu.values()):.2f}" if len(cpu) > 1 else ""
            lines.append(f"      {names[name]:<40} {x['mb_s']:>8.1f} {x['mb_s'] / raw * 100:>6.1f}%"
                         f"   {parts}{total}".rstrip())
        pr = peer["paired"]

        def pct(name):
            r = pr[name]["rounds"]
            return (f"{peer[name] * 100:.0f}% ({pr[name]['median'] * 100:.0f}%, "
                    f"{r[0] * 100:.0f}-{r[-1] * 100:.0f}%)")

        lines += [
            "    ratios: best over best (median of the per-round ratios, their range)",
            f"      via the peer / local: throughput {pct('peer_vs_local_mb')}, "
            f"connections/s {pct('peer_vs_local_conns')}",
            f"      via the peer / three relays: throughput {pct('peer_vs_relay3_mb')}",
            f"      local / two relays: throughput {pct('local_vs_relay2_mb')}",
        ]
        lines.append(f"    peering counters balanced: {peer['balanced']}")
    import bench_dashboard
    import bench_scale
    lines += bench_scale.report_lines(results)
    lines += bench_dashboard.report_lines(results)
    lines.append(f"counters balanced: {results.get('balanced')}")
    return "\n".join(lines)


def main():
    import bench_dashboard
    p = argparse.ArgumentParser(description="remotedialer-py benchmark (see the module docstring)")
    p.add_argument("--seconds", "-s", type=float, default=5.0,
                   help="duration of each timed phase (default 5)")
    p.add_argument("-n", "--idle", type=int, default=10000,
                   help="idle connections opened for the memory figure (c) and the dashboard (u) "
                        "(default 10000)")
    p.add_argument("--concurrency", "-c", type=int, default=64,
                   help="dials in flight for the open/close rate (default 64)")
    p.add_argument("--phases", default="abcdsmwur",
                   help="which of a, b, c, d, s, m, w, u, r (bench_route.py) to run "
                        "(default abcdsmwur)")
    p.add_argument("--sessions", type=int, default=10000,
                   help="agent sessions for (s) (default 10000)")
    p.add_argument("--per-process", type=int, default=2500,
                   help="agents per load process in (s), connections per opener in (u) "
                        "(default 2500)")
    p.add_argument("--idle-max", type=int, default=16000,
                   help="open idle connections at the last step of (m) (default 16000)")
    p.add_argument("--steps", type=int, default=4, help="steps of (m) (default 4)")
    p.add_argument("--tls-sessions", type=int, default=1000,
                   help="agents connecting at once for the handshake rates of (w) (default 1000)")
    bench_dashboard.add_arguments(p)
    p.add_argument("--png-dir", metavar="DIR", help="also draw the figures into DIR (matplotlib)")
    p.add_argument("--repeat", "-r", type=int, default=2,
                   help="runs of the raw/relays/tunnel triple in (a), and rounds of (d); "
                        "best reported (default 2)")
    p.add_argument("--same-process", action="store_true",
                   help="run the agent's Client for (a) and (b) in this process, as before")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peer-id", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.role == "far":
        return role_far()
    if args.role == "opener":
        return role_opener(args.port, args.idle)
    if args.role == "agent":
        return role_agent(args.url, args.key)
    if args.role == "relay":
        return role_relay(args.port)
    if args.role == "peer-server":
        return role_peer_server(args.peer_id)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    hard = raise_nofile()
    if ("c" in args.phases or "u" in args.phases) and args.idle + 1000 > hard:
        p.error(f"-n {args.idle} needs more descriptors than the hard limit {hard} allows")
    if "m" in args.phases and args.idle_max + 1000 > hard:
        p.error(f"--idle-max {args.idle_max} needs more descriptors than the hard limit "
                f"{hard} allows")
    if "s" in args.phases and args.sessions + 1000 > hard:
        p.error(f"--sessions {args.sessions} needs more descriptors than the hard limit "
                f"{hard} allows")
    import bench_scale
    import remotedialer_py as rd

    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_parent, env.get("PYTHONPATH")) if x)

    far = Helper(["--role", "far"], env)
    results = {"seconds": args.seconds, "cores": os.cpu_count(),
               "python": sys.version.split()[0], "loadavg": [os.getloadavg()[0]]}
    results["agent"] = "same process" if args.same_process else "own process"
    srv = rd.Server(listen="127.0.0.1:0")
    cli = agent = None
    try:
        ports = json.loads(far.line())
        srv.start()
        # The idle phase first, while this process's heap is still fresh, so
        # memory freed by the other phases cannot hide its growth.
        if "c" in args.phases:
            results["idle"] = bench_idle(rd, srv, far, ports, args.idle, env)
        if "s" in args.phases:
            results["sessions"] = bench_scale.bench_sessions(
                ports, args.sessions, args.per_process, args.seconds, args.concurrency, env)
        if "m" in args.phases:
            results["idle_steps"] = bench_scale.bench_idle_steps(
                far, ports, args.idle_max, args.steps, env)
        if args.same_process:
            cli = rd.Client(srv.url, headers={"X-Tunnel-ID": "bench"})
            cli.start()
            cli.wait_connected(timeout=60)

            def agent_balanced():
                return counters_balance(cli)
        else:
            agent = Helper(["--role", "agent", "--url", srv.url, "--key", "bench"], env)
            if agent.line() != "ready":
                raise RuntimeError("agent did not connect")

            def agent_balanced():
                answer = agent.ask("balanced")
                if answer not in ("true", "false"):
                    raise RuntimeError(f"agent answered {answer!r} to balanced")
                return answer == "true"
        wait_until(lambda: srv.has_session("bench"), 60, "the agent's session")
        if "a" in args.phases:
            results["bulk"] = bench_bulk(srv, "bench", ports["sink"], args.seconds,
                                         args.repeat, env)
        if "b" in args.phases:
            results["conns"] = bench_conns(tunnel_dialer(srv, "bench", ports["close"]),
                                           args.seconds, args.concurrency)
        if "d" in args.phases:
            results["peer"] = bench_peer(ports, args.seconds, args.repeat, args.concurrency, env)
        if "w" in args.phases:
            results["wss"] = bench_scale.bench_wss(rd, ports, args.seconds, args.repeat,
                                                   args.tls_sessions, env)
        if "u" in args.phases:
            results["dashboard"] = bench_dashboard.bench_dashboard(
                rd, far, ports, args.idle, args.per_process, args.seconds, args.dash_rounds,
                args.dash_requests, env)
        if "r" in args.phases:
            import bench_route
            results["route"] = bench_route.run(srv, "bench", args.seconds, args.repeat, env)
        try:
            wait_until(lambda: counters_balance(srv) and agent_balanced(), 60, "balance")
            results["balanced"] = True
        except TimeoutError:
            results["balanced"] = False
        if "peer" in results:
            results["balanced"] = results["balanced"] and results["peer"]["balanced"]
        if "sessions" in results:
            results["balanced"] = results["balanced"] and results["sessions"]["balanced"]
        results["engine_stats_end"] = rd.engine_stats()
    finally:
        if cli is not None:
            cli.close()
        if agent is not None:
            agent.close()
        srv.close()
        far.close()
    # Other work on the machine shows here: the figures share its cores.
    results["loadavg"].append(os.getloadavg()[0])
    print(report(results, args))
    if "route" in results:
        import bench_route
        print(bench_route.report(results["route"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    if args.png_dir:
        import bench_plots
        for path in bench_plots.write(results, args.png_dir):
            print(f"wrote {path}")
    return 0 if results.get("balanced") else 1


if __name__ == "__main__":
    sys.exit(main())
