"""os.fork() with a running engine.

The child has a copy of the parent's memory and descriptors but not its loop
thread. It must leave the parent's sessions alone (no byte written, no close
frame, no shutdown(2): the engine closes its inherited descriptors and
forgets its objects), close the inherited Server/Client as no-ops, run a
Server and Client of its own, and exit through its exit handlers. The
parent must not notice: same session, tunnels still carrying data.
"""

import atexit
import os
import socket
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

import pytest

import support
from support import ADD_SESSION, REMOVE_SESSION, TIMEOUT, make_client, round_trip, wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _fork():
    with warnings.catch_warnings():
        # 3.12+ warns about forking a process with threads; that is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _wait_exit(pid, timeout=TIMEOUT):
    """The child's exit status; it is killed (and the test fails) if it
    does not exit in time."""
    status = None

    def exited():
        nonlocal status
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        return done

    try:
        wait_for(exited, timeout, "the forked child to exit")
    except AssertionError:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(status)


def _socket_ports():
    """(local port, remote port or None) of every TCP socket this process
    has a descriptor of."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with s:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                continue
            local = s.getsockname()[1]
            try:
                remote = s.getpeername()[1]
            except OSError:
                remote = None
            out.append((local, remote))
    return out


def _session_figures(srv):
    m = srv.metrics()
    return (sum(m.get(ADD_SESSION, {}).values()), sum(m.get(REMOVE_SESSION, {}).values()))


def _in_child(rd, srv, cli, held, target_port):
    """The child's part. Raises AssertionError on any failure."""
    # The engine closed what it held of the parent's: the listener and both
    # ends of the session, and its end of the tunneled connection's dial.
    engine_ends = [(lp, rp) for lp, rp in _socket_ports()
                   if lp == srv.port or rp in (srv.port, target_port)]
    assert not engine_ends, f"the parent's engine sockets are still open here: {engine_ends}"
    stats = rd.engine_stats()
    assert stats["open_sessions"] == 0 and stats["open_connections"] == 0, stats
    # Closing inherited objects does not reach the parent's loop; an exit
    # handler closes one of them, as an application's would.
    held.close()
    cli.close()
    assert cli.closed and not cli.connected
    atexit.register(srv.close)
    # An engine of the child's own, with a tunnel that carries data.
    echo = support.EchoServer()
    try:
        with rd.Server(listen="127.0.0.1:0") as own:
            assert own.port != srv.port
            agent = make_client(rd, own.url, "child")
            try:
                wait_for(lambda: own.has_session("child"), TIMEOUT, "the child's session")
                support.dial_round_trip(own, "child", echo.address, b"through the child's tunnel")
                assert own.list_clients() == ["child"]
            finally:
                agent.close()
            support.check_balanced(own)
        support.wait_engine_idle(rd)
    finally:
        echo.close()


def test_fork_child_runs_its_own_engine_and_leaves_the_parents(tunnel, echo_server,
                                                                tunnel_leak_check):
    rd, srv, cli = tunnel.rd, tunnel.srv, tunnel.cli
    held = tunnel.dial(echo_server.port)
    round_trip(held, b"before the fork")
    sessions = _session_figures(srv)
    r, w = os.pipe()
    pid = _fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(r)
            _in_child(rd, srv, cli, held, echo_server.port)
            status = 0
        except BaseException:  # noqa: BLE001 - reported to the parent
            os.write(w, traceback.format_exc().encode())
        try:
            atexit._run_exitfuncs()  # the interpreter's exit handlers
        except BaseException:  # noqa: BLE001
            os.write(w, traceback.format_exc().encode())
            status = 1
        os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        code = _wait_exit(pid)
        report = f.read().decode(errors="replace")
    assert code == 0 and not report, f"child exited {code}:\n{report}"
    # The parent's session is the same one: no session added or removed,
    # and the connection opened before the fork still carries data.
    assert srv.list_clients() == [tunnel.key] and cli.connected
    assert _session_figures(srv) == sessions
    round_trip(held, b"after the fork")
    held.close()
    support.dial_round_trip(srv, tunnel.key, echo_server.address, b"a new dial after the fork")


CHILD_EXITS_SCRIPT = textwrap.dedent(
    r"""
    import os, sys, warnings
    sys.path.insert(0, sys.argv[1])
    import support
    from remotedialer_py import Server, Client

    echo = support.EchoServer()
    srv = Server(listen="127.0.0.1:0").start()
    cli = support.make_client(sys.modules["remotedialer_py"], srv.url, "parent")
    support.wait_for(lambda: srv.has_session("parent"), what="the parent's session")
    held = srv.dial("parent", "tcp", echo.address, timeout=support.TIMEOUT)
    support.round_trip(held, b"before")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        # The child leaves everything inherited open and starts its own
        # pair; the interpreter's exit (exit handlers, __del__) ends both.
        echo2 = support.EchoServer()
        own = Server(listen="127.0.0.1:0").start()
        agent = support.make_client(sys.modules["remotedialer_py"], own.url, "child")
        support.wait_for(lambda: own.has_session("child"), what="the child's session")
        support.dial_round_trip(own, "child", echo2.address, b"child")
        sys.exit(7)
    _, status = os.waitpid(pid, 0)
    support.round_trip(held, b"after")
    assert srv.list_clients() == ["parent"], srv.list_clients()
    print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
    held.close()
    cli.close()
    srv.close()
    echo.close()
    """
)


def test_forked_child_exits_through_interpreter_exit(rd):
    """A child that closes nothing itself: at interpreter exit, with the
    parent's objects and its own still open, it exits with its own status
    and the parent's tunnel lives on."""
    tests_dir = str(Path(__file__).resolve().parent)
    pkg_parent = str(Path(rd.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", CHILD_EXITS_SCRIPT, tests_dir],
                          capture_output=True, text=True, timeout=2 * TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CHILD 7" in proc.stdout.splitlines(), proc.stdout + proc.stderr
