"""The engine at scale: the open-file limit and many sessions.

- The engine raises RLIMIT_NOFILE's soft limit to the hard limit when it
  starts (as Go's runtime does) and reports both in engine_stats().
- Out of descriptors, a dial fails with "too many open files (limit N)", a
  server's listener sheds new connections and goes on, and both work again
  once descriptors are free.
- Many agents' sessions come and go and the server returns to its baseline:
  no session, no connection, its heap and descriptors back.
"""

import json
import os
import resource
import socket
import subprocess
import sys

import pytest

from support import TIMEOUT, check_balanced, open_fds, recv_exact, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SOFT, HARD = 256, 512

# A server and its agent in one process started with a low limit; the test
# exhausts its descriptors on command and frees them again.
EXHAUST_SCRIPT = r'''
import json, os, sys
import remotedialer_py as rd

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

srv = rd.Server(listen="127.0.0.1:0")
srv.start()
cli = rd.Client(srv.url, headers={"X-Tunnel-ID": "k"})
cli.start()
cli.wait_connected(timeout=30)
stats = rd.engine_stats()
say({"port": srv.port, "soft": stats["nofile_soft"], "hard": stats["nofile_hard"]})
filler = []
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "exhaust":
        try:
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            srv.dial("k", "tcp", args[0], timeout=30).close()
            say({"dial": "ok"})
        except OSError as e:
            say({"dial": str(e)})
    elif cmd == "free":
        for fd in filler:
            os.close(fd)
        filler.clear()
        s = srv.dial("k", "tcp", args[0], timeout=30)
        s.sendall(b"back")
        s.recv(2)
        s.close()
        say({"fd_exhausted": rd.engine_stats()["fd_exhausted"]})
cli.close()
srv.close()
'''


def low_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


def http_answer(port):
    """The first bytes the server answers a GET with, b"" when it closes at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return s.recv(12)
        except ConnectionResetError:
            return b""


def test_soft_limit_raised_and_exhaustion_named_then_recovered(tmp_path):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < HARD:
        pytest.skip(f"this process's hard limit is below {HARD}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(TIMEOUT)
    address = f"127.0.0.1:{target.getsockname()[1]}"
    proc = subprocess.Popen([sys.executable, "-c", EXHAUST_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
                            preexec_fn=low_limit, cwd=tmp_path)

    def ask(cmd):
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    try:
        hello = json.loads(proc.stdout.readline())
        assert (hello["soft"], hello["hard"]) == (HARD, HARD)
        port = hello["port"]

        # No descriptor for the call or the dial's socket pair: the error
        # names the limit.
        answer = ask(f"exhaust {address}")
        assert answer["dial"].endswith(f"too many open files (limit {HARD})")
        # The listener cannot take a connection: libuv sheds it at once with
        # its reserve descriptor, and the listener goes on.
        assert http_answer(port) == b""

        # Descriptors free again: the same dial and a new connection work.
        proc.stdin.write(f"free {address}\n")
        proc.stdin.flush()
        conn, _ = target.accept()
        with conn:
            assert recv_exact(conn, 4) == b"back"
            conn.sendall(b"ok")
        answer = json.loads(proc.stdout.readline())
        assert answer["fd_exhausted"] >= 1
        assert http_answer(port).startswith(b"HTTP/1.1 ")
    finally:
        target.close()
        proc.stdin.close()
        proc.wait(TIMEOUT)
    assert proc.returncode == 0


def test_many_sessions_back_to_baseline(rd, tunnel_leak_check):
    """500 agents, in two load processes of the bench, connect to one server,
    each gets a dial, and all leave: the server returns to its baseline of
    sessions, connections, descriptors and live heap."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_scale
    finally:
        sys.path.pop(0)
    n = 500
    base = rd.engine_stats()
    srv = rd.Server(listen="127.0.0.1:0")
    srv.start()
    try:
        echo = socket.create_server(("127.0.0.1", 0))
        fds0 = len(open_fds())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
        with bench_scale.Agents(srv.url, n, per_process=250, env=env) as agents:
            wait_for(lambda: rd.engine_stats()["open_sessions"] == n, 120, f"{n} sessions")
            assert rd.engine_stats()["open_fds"] >= fds0 + n
            # One dial through every session, each answered by the far end.
            for key in agents.keys:
                s = srv.dial(key, "tcp", f"127.0.0.1:{echo.getsockname()[1]}", timeout=TIMEOUT)
                c, _ = echo.accept()
                s.sendall(b"x")
                assert c.recv(1) == b"x"
                c.close()
                s.close()
        wait_for(lambda: rd.engine_stats()["open_sessions"] == 0
                 and rd.engine_stats()["open_connections"] == 0, 60, "every session to end")
        echo.close()
        wait_for(lambda: len(open_fds()) <= fds0, 60, "descriptors back to the baseline")
        check_balanced(srv, sessions=True)
    finally:
        srv.close()
    # The server's counters keep a series per client key (as Go's do) until
    # it closes; then, bounded caches (idle blocks) aside, the heap is back.
    end = rd.engine_stats()
    assert end["heap_bytes"] - end["pool_bytes"] <= base["heap_bytes"] - base["pool_bytes"] + 4096
