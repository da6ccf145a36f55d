#!/usr/bin/env python3
"""Phase (r) of bench/bench.py: small GETs through the server's /client/
route against the same GETs made straight to the backend, both kept alive.

The backend is a helper process answering every GET with a 2-byte body,
kept alive: a single-threaded epoll loop (the default, fast enough that the
tunnel is what is measured) or, with backend="threading", Python's
ThreadingHTTPServer (HTTP/1.1), a typical slow target. The load comes from
another helper process, so neither shares this process's GIL with the
server's engine:
  requests/s: 16 kept-alive connections, one request in flight on each, for
    --seconds, direct and through the route, best of --repeat rounds;
  latency: one kept-alive connection, one request at a time, p50/p99 over
    all rounds.
The route's figure is given as a share of direct (throughput) and a multiple
of it (latency). Where socat is installed, the same GETs also go through two
plain relays in a chain (client -> socat -> socat -> backend, each relay C,
a process per connection), as many loopback hops as the route's client ->
server -> agent -> backend: what a general-purpose relay makes of those hops
with no tunnel and no HTTP parsing, a reference for the route's figures.

    python bench/bench.py --phases r --seconds 3
    python bench/bench_route.py --seconds 3      # the same, on its own
    python bench/bench_route.py --backend threading
"""

import argparse
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
CONNS = 16


def role_backend():
    """Prints its port, then answers GETs until stdin closes."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print(lsock.getsockname()[1], flush=True)
    bufs = {}
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not sys.stdin.readline():
                    return
                continue
            if key.fileobj is lsock:
                try:
                    c, _ = lsock.accept()
                except BlockingIOError:
                    continue
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.setblocking(False)
                bufs[c] = b""
                sel.register(c, selectors.EVENT_READ, "conn")
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                sel.unregister(c)
                bufs.pop(c, None)
                c.close()
                continue
            buf = bufs[c] + data
            n = buf.count(b"\r\n\r\n")  # GETs without bodies
            bufs[c] = buf[buf.rfind(b"\r\n\r\n") + 4:] if n else buf
            if n:
                c.sendall(RESPONSE * n)


def role_backend_threading():
    """The same answers from a ThreadingHTTPServer speaking HTTP/1.1."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = -1  # one write per response (flushed after each)
        disable_nagle_algorithm = True

        def log_message(self, fmt, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, address: None  # loads end mid-request
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(httpd.server_address[1], flush=True)
    sys.stdin.read()
    httpd.shutdown()


def _request(host_port, path):
    return f"GET {path} HTTP/1.1\r\nHost: {host_port}\r\n\r\n".encode()


def role_load(port, path, conns, seconds):
    """conns kept-alive connections, one GET in flight on each, for
    seconds; prints {"requests": N, "seconds": S}."""
    req = _request(f"127.0.0.1:{port}", path)
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [b""])
        socks.append(s)
    done = 0
    start = time.perf_counter()
    end = start + seconds
    for s in socks:
        s.send(req)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        for key, _ in sel.select(end - now):
            s, st = key.fileobj, key.data
            data = s.recv(65536)
            if not data:
                raise RuntimeError("the connection closed")
            st[0] += data
            n = st[0].count(b"\r\n\r\nok")
            if n:
                st[0] = st[0][st[0].rfind(b"\r\n\r\nok") + 6:]
                done += n
                s.send(req)
    elapsed = time.perf_counter() - start
    for s in socks:
        s.close()
    print(json.dumps({"requests": done, "seconds": elapsed}), flush=True)


def latency(port, path, seconds, warmup=200):
    """Sequential GETs on one kept-alive connection; the sorted times in s."""
    req = _request(f"127.0.0.1:{port}", path)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    end = None
    i = 0
    buf = b""
    while end is None or time.perf_counter() < end:
        t0 = time.perf_counter()
        s.sendall(req)
        while not buf.endswith(b"\r\n\r\nok"):
            data = s.recv(65536)
            if not data:
                raise RuntimeError("the connection closed")
            buf += data
        buf = b""
        i += 1
        if end is not None:
            times.append(time.perf_counter() - t0)
        elif i == warmup:
            end = time.perf_counter() + seconds
    s.close()
    return sorted(times)


def _pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _helper(args, env):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _free_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def _wait_listening(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(f"socat did not listen on {port}")
            time.sleep(0.02)


def start_socat_relays(bport, count=2):
    """A chain of count socat relays in front of 127.0.0.1:bport; returns
    (entry port, processes), or (None, []) when socat is not installed."""
    socat = shutil.which("socat")
    if socat is None:
        return None, []
    procs = []
    port = bport
    try:
        for _ in range(count):
            listen = _free_port()
            procs.append(subprocess.Popen(
                [socat, f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,nodelay,backlog=256",
                 f"TCP:127.0.0.1:{port},nodelay"], stdin=subprocess.DEVNULL))
            _wait_listening(listen, procs[-1])
            port = listen
    except BaseException:
        stop_socat_relays(procs)
        raise
    return port, procs


def stop_socat_relays(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(10)


def run(srv, key, seconds, repeat, env, target="epoll"):
    """The phase: srv is a started Server with key's agent connected;
    target names the backend ("epoll" or "threading")."""
    backend = _helper(["--role", "backend" if target == "epoll" else "backend-threading"], env)
    relays = []
    try:
        bport = int(backend.stdout.readline())
        paths = {"direct": (bport, "/small"),
                 "route": (srv.port, f"/client/{key}/http/127.0.0.1:{bport}/small")}
        rport, relays = start_socat_relays(bport)
        if rport is not None:
            paths["relays"] = (rport, "/small")
        out = {"conns": CONNS, "rps": {k: [] for k in paths}, "lat": {k: [] for k in paths}}
        for _ in range(repeat):
            for name, (port, path) in paths.items():
                load = _helper(["--role", "load", "--port", str(port), "--path", path,
                                "--conns", str(CONNS), "--seconds", str(seconds)], env)
                r = json.loads(load.stdout.readline())
                load.wait()
                out["rps"][name].append(r["requests"] / r["seconds"])
                out["lat"][name].extend(latency(port, path, seconds / 2))
        res = {"conns": CONNS, "backend": target}
        for name in paths:
            lat = sorted(out["lat"][name])
            res[name] = {"rps": max(out["rps"][name]), "rps_rounds": out["rps"][name],
                         "p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3,
                         "samples": len(lat)}
        res["rps_share"] = res["route"]["rps"] / res["direct"]["rps"]
        res["p50_ratio"] = res["route"]["p50_ms"] / res["direct"]["p50_ms"]
        if "relays" in res:
            res["relays_rps_share"] = res["relays"]["rps"] / res["direct"]["rps"]
            res["relays_p50_ratio"] = res["relays"]["p50_ms"] / res["direct"]["p50_ms"]
            res["route_vs_relays_rps"] = res["route"]["rps"] / res["relays"]["rps"]
            res["route_vs_relays_p50"] = res["route"]["p50_ms"] / res["relays"]["p50_ms"]
        return res
    finally:
        stop_socat_relays(relays)
        backend.stdin.close()
        backend.wait(30)


def report(r):
    d, t = r["direct"], r["route"]
    lines = [
        f"(r) small GETs, kept alive: direct vs through /client/ ({r['conns']} connections; "
        f"1 for latency; {r['backend']} backend)",
        f"    direct:  {d['rps']:9.0f} req/s   p50 {d['p50_ms']:.3f} ms   p99 {d['p99_ms']:.3f} ms",
        f"    route:   {t['rps']:9.0f} req/s   p50 {t['p50_ms']:.3f} ms   p99 {t['p99_ms']:.3f} ms",
    ]
    if "relays" in r:
        x = r["relays"]
        lines.append(f"    relays:  {x['rps']:9.0f} req/s   p50 {x['p50_ms']:.3f} ms   "
                     f"p99 {x['p99_ms']:.3f} ms   (two socat relays, the same hops)")
    lines.append(f"    route/direct: {r['rps_share'] * 100:.0f}% of the requests/s, "
                 f"{r['p50_ratio']:.2f}x the p50")
    if "relays" in r:
        lines.append(f"    relays/direct: {r['relays_rps_share'] * 100:.0f}% of the requests/s, "
                     f"{r['relays_p50_ratio']:.2f}x the p50; route/relays: "
                     f"{r['route_vs_relays_rps'] * 100:.0f}%, {r['route_vs_relays_p50']:.2f}x")
    else:
        lines.append("    relays: skipped (socat not installed: apt-get install socat)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="bench phase (r): the /client/ route kept alive")
    p.add_argument("--seconds", "-s", type=float, default=5.0)
    p.add_argument("--repeat", "-r", type=int, default=2)
    p.add_argument("--backend", choices=("epoll", "threading"), default="epoll",
                   help="the target: an epoll loop (default) or Python's ThreadingHTTPServer")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--conns", type=int, default=CONNS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "backend":
        return role_backend()
    if args.role == "backend-threading":
        return role_backend_threading()
    if args.role == "load":
        return role_load(args.port, args.path, args.conns, args.seconds)
    import remotedialer_py as rd

    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_parent, env.get("PYTHONPATH")) if x)
    with rd.Server(listen="127.0.0.1:0") as srv:
        agent = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(
            os.path.abspath(__file__)), "bench.py"), "--role", "agent", "--url", srv.url,
            "--key", "bench"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            if agent.stdout.readline().strip() != "ready":
                raise RuntimeError("agent did not connect")
            r = run(srv, "bench", args.seconds, args.repeat, env, args.backend)
        finally:
            agent.stdin.close()
            agent.wait(30)
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
