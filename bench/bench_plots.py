"""The benchmark's figures as PNGs (matplotlib: the `plot` extra), drawn
from the results bench.py gathers; a figure whose phase did not run is left
out. Latency distributions come from every results[phase]["latency_us"]
(name -> samples in microseconds), so a phase that keeps its samples there
joins the plot by that alone."""

import os

FILES = {
    "throughput": "bench-throughput.png",
    "latency": "bench-latency.png",
    "memory_connections": "bench-memory-connections.png",
    "memory_sessions": "bench-memory-sessions.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()


def throughput(plt, w, path):
    sizes = sorted(int(k) for k in w["sizes"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for name, label in (("raw", "raw loopback TCP"), ("ws", "tunnel over ws"),
                        ("wss", "tunnel over wss (TLS)")):
        ax.plot([s / 1024 for s in sizes], [w["sizes"][str(s)][name] for s in sizes],
                marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("write size, KiB")
    ax.set_ylabel("MB/s, one connection")
    ax.set_title("Bulk throughput against write size")
    ax.legend()
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def latency(plt, series, path):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for name, xs in series.items():
        xs = sorted(xs)
        if not xs:
            continue
        ax.plot([x / 1000 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))],
                label=f"{name} ({len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("dial + 4-byte echo + close, ms")
    ax.set_ylabel("share of samples at or below")
    ax.set_title("Latency distribution")
    ax.legend()
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def memory_connections(plt, m, path):
    rows = m["rows"][:-1]  # the last is after closing them all
    x = [r["connections"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for key, label in (("server_rss", "server RSS"), ("server_heap", "server engine heap"),
                       ("agent_rss", "agent RSS"), ("agent_heap", "agent engine heap")):
        ax.plot(x, [r[key] / (1 << 20) for r in rows], marker="o", label=label)
    ax.set_xlabel("open idle tunneled connections")
    ax.set_ylabel("MiB")
    ax.set_title("Memory against open connections")
    ax.legend()
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def memory_sessions(plt, s, path):
    rows = s["steps"]
    x = [r["sessions"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    ax.plot(x, [r["rss_bytes"] / (1 << 20) for r in rows], marker="o", label="server RSS")
    ax.plot(x, [r["heap_bytes"] / (1 << 20) for r in rows], marker="o",
            label="server engine heap")
    ax.set_xlabel("agent sessions")
    ax.set_ylabel("MiB")
    ax.set_title("Memory against sessions")
    ax.legend()
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def write(results, directory):
    """Writes the figures the results allow into directory; returns their paths."""
    plt = _plt()
    os.makedirs(directory, exist_ok=True)
    out = []

    def path(name):
        p = os.path.join(directory, FILES[name])
        out.append(p)
        return p

    if results.get("wss"):
        throughput(plt, results["wss"], path("throughput"))
    series = {}
    for phase, value in results.items():
        if isinstance(value, dict) and isinstance(value.get("latency_us"), dict):
            for name, xs in value["latency_us"].items():
                series[name if phase == "wss" else f"{phase}: {name}"] = xs
    if series:
        latency(plt, series, path("latency"))
    if results.get("idle_steps"):
        memory_connections(plt, results["idle_steps"], path("memory_connections"))
    if results.get("sessions"):
        memory_sessions(plt, results["sessions"], path("memory_sessions"))
    plt.close("all")
    return out
