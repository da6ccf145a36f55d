"""`remotedialer-py status URL`: what a running server holds, read from its
HTTP routes: /metrics (always served) and, when the server serves them
(`--debug-connections`), /debug/connections and /debug/peers."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, TextIO

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def base_url(url: str) -> str:
    """http(s)://host:port from a server URL: http(s):// or ws(s):// (the
    connect URL agents use), path ignored."""
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    if scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"a server URL is http(s)://HOST:PORT or ws(s)://HOST:PORT/..., "
                         f"got {url!r}")
    return f"{scheme}://{u.netloc}"


def parse_metrics(text: str) -> dict[str, dict[tuple, float]]:
    """{family: {((label, value), ...): value}} from a text exposition."""
    out: dict[str, dict[tuple, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m is None or line.startswith("#"):
            continue
        labels = tuple(sorted((k, bytes(v, "utf-8").decode("unicode_escape"))
                              for k, v in _LABEL.findall(m.group(2) or "")))
        out.setdefault(m.group(1), {})[labels] = float(m.group(3))
    return out


def _get(base: str, path: str, timeout: float) -> Optional[bytes]:
    """The body of GET base+path; None when the server does not serve it."""
    try:
        with urllib.request.urlopen(base + path, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _by_key(family: dict[tuple, float]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in family.items():
        key = dict(labels).get("clientkey", "")
        totals[key] = totals.get(key, 0) + value
    return totals


def report(url: str, out: TextIO, timeout: float = 10.0) -> int:
    """Prints the server's state; returns 0, or 1 when connection counters
    do not balance against what is open (a leak, or connections in flight)."""
    base = base_url(url)
    metrics = parse_metrics((_get(base, "/metrics", timeout) or b"").decode())
    added = _by_key(metrics.get("session_server_total_add_connections", {}))
    removed = _by_key(metrics.get("session_server_total_remove_connections", {}))
    open_now = _by_key(metrics.get("remotedialer_open_connections", {}))
    sessions = {dict(k).get("peer", ""): v
                for k, v in metrics.get("remotedialer_open_sessions", {}).items()}
    print(f"server {base}", file=out)
    print(f"  sessions open: {sessions.get('false', 0):g} agent, {sessions.get('true', 0):g} peer",
          file=out)
    unbalanced = 0
    print("  connections by client key: added, removed, open", file=out)
    for key in sorted(set(added) | set(removed) | set(open_now)):
        a, r, o = added.get(key, 0), removed.get(key, 0), open_now.get(key, 0)
        mark = "" if a - r == o else "  <- added - removed != open"
        unbalanced += bool(mark)
        print(f"    {key or '(none)'}: {a:g}, {r:g}, {o:g}{mark}", file=out)
    debug = _get(base, "/debug/connections", timeout)
    if debug is None:
        print("  (per-session detail: start the server with --debug-connections)", file=out)
    else:
        doc: Any = json.loads(debug)
        for s in doc.get("sessions", []):
            print(f"  session {s['clientkey']} #{s['session_key']}: "
                  f"{s['connections']} connections", file=out)
        conns = doc.get("connections", [])
        for c in sorted(conns, key=lambda c: -c["age"])[:20]:
            print(f"    conn {c['id']} {c['clientkey']} {c['proto']}/{c['address']} "
                  f"{c['state']} age {c['age']:.1f}s idle {c['idle']:.1f}s", file=out)
        if len(conns) > 20:
            print(f"    ... {len(conns) - 20} more", file=out)
        peers = _get(base, "/debug/peers", timeout)
        if peers is not None:
            pdoc: Any = json.loads(peers)
            if pdoc.get("peer_id"):
                print(f"  HA group: this server is {pdoc['peer_id']}", file=out)
            for p in pdoc.get("peers", []):
                err = f" ({p['last_error']})" if p["last_error"] else ""
                print(f"    peer {p['id']} {p['state']}{err}: {p['inbound']} inbound, "
                      f"{p['keys']} keys", file=out)
    return 1 if unbalanced else 0
