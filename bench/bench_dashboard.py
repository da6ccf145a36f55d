#!/usr/bin/env python3
"""remotedialer-py benchmark, the dashboard under load (phase u, run by bench.py):

(u) A Server(dashboard=True) in the benchmark process, one agent in its own
    process, -n idle tunneled connections held open through a forward of
    it (opened by helpers of --per-process connections each: the descriptor
    hard limit is per process).
    /debug/state: --dash-requests GETs one after another from this process
      (one connection each, as the server closes after an answer), for the
      page's own query (limit 100, oldest first), the page sorted by idle,
      filtered (on the held connections' address: every row matches, so
      all are still collected and sorted) and the last page; p50/p99/max
      and the size of the JSON; the server's CPU per answer (this process
      less its client thread: the engine loop that renders it).
    Bulk, one connection as in (a) (sender -> Server.forward -> agent ->
      sink, the idle connections still open), alternated over --dash-rounds
      rounds with no poller, a poller process fetching the page's query
      once a second (an open page) and ten times a second (the margin);
      median and best of each and the difference from no poller.

    python bench/bench.py --phases u                 # 10,000 idle connections
    python bench/bench.py --phases u -n 2000 --seconds 2 --dash-rounds 3
"""

import http.client
import json
import os
import statistics
import sys
import threading
import time

import bench as B

PAGE_QUERY = "offset=0&limit=100&sort=age&order=desc&filter="


def add_arguments(p):
    p.add_argument("--dash-requests", type=int, default=50,
                   help="GETs of /debug/state per query in (u) (default 50)")
    p.add_argument("--dash-rounds", type=int, default=5,
                   help="bulk rounds of (u), each without and with pollers (default 5)")


def fetch_state(port, query):
    """One GET /debug/state; (seconds, body bytes)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=B.HELPER_TIMEOUT)
    try:
        conn.request("GET", "/debug/state?" + query)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"/debug/state?{query}: HTTP {resp.status}: {body[:200]!r}")
    return time.perf_counter() - t0, body


# ---------------------------------------------------------------------------
# The poller: what an open page does, in a process of its own


def role_poller(port):
    """Commands: "poll RATE" starts fetching the page's query RATE times a
    second (answers "polling" once the first answer is in); "stop" stops and
    answers {"requests": n, "max_ms": slowest}. Exits when stdin closes."""
    stop = threading.Event()
    result = {}

    def run(rate, started):
        n, slowest = 0, 0.0
        interval = 1.0 / rate
        nxt = time.monotonic()
        while not stop.is_set():
            secs, _ = fetch_state(port, PAGE_QUERY)
            n += 1
            slowest = max(slowest, secs)
            if n == 1:
                started.set()
            nxt += interval
            stop.wait(max(0.0, nxt - time.monotonic()))
        result.update(requests=n, max_ms=round(slowest * 1000, 3))

    worker = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "poll":
            stop.clear()
            result.clear()
            started = threading.Event()
            worker = threading.Thread(target=run, args=(float(cmd[1]), started), daemon=True)
            worker.start()
            if not started.wait(B.HELPER_TIMEOUT):
                print("error: no answer to the first poll", flush=True)
                continue
            print("polling", flush=True)
        elif cmd[0] == "stop":
            stop.set()
            worker.join()
            print(json.dumps(result), flush=True)
    os._exit(0)


# ---------------------------------------------------------------------------
# (u)


def engine_cpu():
    """CPU seconds of this process's threads but the main one (the client):
    the server's engine loop, the others being idle meanwhile. From
    schedstat, in nanoseconds (the clock ticks of stat are too coarse)."""
    me, total = threading.get_native_id(), 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != me:
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
    return total / 1e9


def time_queries(port, queries, requests):
    out = {}
    for name, query in queries:
        fetch_state(port, query)  # warm-up
        times, size = [], 0
        cpu0 = engine_cpu()
        for _ in range(requests):
            secs, body = fetch_state(port, query)
            times.append(secs * 1000)
            size = len(body)
        cpu_ms = (engine_cpu() - cpu0) * 1000 / requests
        times.sort()
        out[name] = {"query": query, "p50_ms": round(B.percentile(times, 50), 3),
                     "p99_ms": round(B.percentile(times, 99), 3),
                     "max_ms": round(times[-1], 3), "server_cpu_ms": round(cpu_ms, 3), "bytes": size, "requests": requests,
                     "rows": json.loads(body)["connections"]["total"]}
    return out


def bench_dashboard(rd, far, ports, n, per_process, seconds, rounds, requests, env):
    key = "bench-dash"
    srv = rd.Server(listen="127.0.0.1:0", dashboard=True).start()
    agent = poller = None
    openers = []
    try:
        agent = B.Helper(["--role", "agent", "--url", srv.url, "--key", key], env)
        if agent.line() != "ready":
            raise RuntimeError("agent did not connect")
        B.wait_until(lambda: srv.has_session(key), 60, "the dashboard agent's session")
        hold = f"127.0.0.1:{ports['hold']}"
        with srv.forward(key, "tcp", hold, listen="127.0.0.1:0") as held, \
                srv.forward(key, "tcp", f"127.0.0.1:{ports['sink']}",
                            listen="127.0.0.1:0") as bulk:
            t0 = time.perf_counter()
            for i in range(0, n, per_process):
                size = min(per_process, n - i)
                h = B.Helper(["--role", "opener", "--port", str(held.port), "-n", str(size)],
                             env)
                openers.append(h)
                line = h.line(timeout=600)
                if line != f"open {size}":
                    raise RuntimeError(f"opener: {line}")
            open_s = time.perf_counter() - t0
            last = max(0, n - 100)
            queries = (("page", PAGE_QUERY),
                       ("idle", "offset=0&limit=100&sort=idle&order=desc"),
                       ("filter", "offset=0&limit=100&filter=" + hold),
                       ("last_page", f"offset={last}&limit=100&sort=age&order=desc"))
            state = time_queries(srv.port, queries, requests)
            if state["page"]["rows"] < n:
                raise RuntimeError(f"/debug/state shows {state['page']['rows']} of {n} "
                                   "connections")

            poller = B.Helper(["--role", "poller", "--port", str(srv.port)], env,
                              script=__file__)
            modes = (("none", 0), ("1/s", 1), ("10/s", 10))
            samples = {name: [] for name, _ in modes}
            polls = {name: [] for name, rate in modes if rate}
            for r in range(rounds):
                # Each round runs the three in turn, every other one reversed,
                # so a drift of the machine's load favours none of them.
                for name, rate in (modes if r % 2 == 0 else modes[::-1]):
                    if rate and poller.ask(f"poll {rate}") != "polling":
                        raise RuntimeError("the poller did not start")
                    nbytes, secs = B.send_for(bulk.port, seconds)
                    if rate:
                        polls[name].append(json.loads(poller.ask("stop")))
                    samples[name].append(round(nbytes / secs / 1e6, 1))
    finally:
        if poller is not None:
            poller.close()
        for h in openers:
            h.close()
        if agent is not None:
            agent.close()
        srv.close()
        far.ask("release")
    median = {name: statistics.median(xs) for name, xs in samples.items()}
    best = {name: max(xs) for name, xs in samples.items()}
    return {
        "connections": n, "open_seconds": round(open_s, 3), "state": state,
        "rounds": rounds, "seconds": seconds, "bulk_mb_s": samples,
        "median_mb_s": median, "best_mb_s": best,
        "median_change": {k: round(median[k] / median["none"] - 1, 4) for k in ("1/s", "10/s")},
        "best_change": {k: round(best[k] / best["none"] - 1, 4) for k in ("1/s", "10/s")},
        "polls": polls,
    }


def report_lines(results):
    u = results.get("dashboard")
    if not u:
        return []
    lines = [f"(u) dashboard: {u['connections']} idle tunneled connections open "
             f"(opened in {u['open_seconds']:g} s); GET /debug/state, "
             f"{u['state']['page']['requests']} each, one at a time",
             f"    {'query':<38} {'p50':>9} {'p99':>9} {'max':>9} {'server CPU':>11} "
             f"{'JSON':>10}"]
    labels = {"page": "the page's (limit 100, oldest first)", "idle": "sorted by idle",
              "filter": "filtered (every row matches)", "last_page": "the last page"}
    for name, x in u["state"].items():
        lines.append(f"    {labels[name]:<38} {x['p50_ms']:>6.2f} ms {x['p99_ms']:>6.2f} ms "
                     f"{x['max_ms']:>6.2f} ms {x['server_cpu_ms']:>8.2f} ms "
                     f"{x['bytes'] / 1024:>6.1f} KiB")
    cpu = u["state"]["page"]["server_cpu_ms"]
    lines.append(f"    an open page (1 poll/s) takes {cpu:.2f} ms of the engine loop's CPU a "
                 f"second: {cpu / 10:.2f}% of its time (10 polls/s: {cpu:.1f}%)")
    med, best = u["median_mb_s"], u["best_mb_s"]
    lines.append(f"    bulk through the tunnel beside them, {u['rounds']} rounds of "
                 f"{u['seconds']:g} s alternated: median (best) MB/s, change from no poller")
    lines.append(f"      no poller                 {med['none']:>8.1f} ({best['none']:.1f})")
    for name, what in (("1/s", "an open page (1 poll/s)"), ("10/s", "10 polls/s")):
        slowest = max(p["max_ms"] for p in u["polls"][name])
        lines.append(f"      {what:<26}{med[name]:>8.1f} ({best[name]:.1f})   "
                     f"{u['median_change'][name] * 100:+.1f}% ({u['best_change'][name] * 100:+.1f}%)"
                     f", slowest poll {slowest:.1f} ms")
    return lines


def main():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--role")
    p.add_argument("--port", type=int)
    args = p.parse_args()
    if args.role == "poller":
        return role_poller(args.port)
    p.error("run bench/bench.py; this script is its helper")


if __name__ == "__main__":
    sys.exit(main())
