"""Fixtures for the end-to-end suite.

- echo_server / stream_server / http_service: loopback services the agent
  dials (support.py).
- tunnel: a started Server and a connected Client (key "agent-1"). After the
  test it requires every connection counter label set to balance on both
  sides, nothing open in the engine and no file descriptor left behind, then
  closes both. It builds on the package's own `tunnel_leak_check` fixture,
  which then checks engine-wide figures and descriptors once more.
- run_cli: starts `python -m remotedialer_py ...` subprocesses, waits for
  their "listening" line (an event, not a sleep) and stops them afterwards.

The package is imported lazily so that the C unit tests and the codec tests
still run when the extension has not been built.
"""

import gc
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import support
from support import (AGENT_KEY, TIMEOUT, assert_no_new_fds, check_balanced, make_client,
                     wait_engine_idle, wait_for)


def pytest_configure(config):
    # 1,000 concurrent tunneled connections cost several descriptors each in
    # one process; lift the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The plugin is registered by the package's entry point once installed;
    # from a source tree it may not be, so register it here if needed.
    try:
        import remotedialer_py.pytest_plugin as plugin
    except ImportError:
        return  # the tests that need the package report the import error
    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "remotedialer_py.pytest_plugin")


def _package():
    import remotedialer_py

    return remotedialer_py


@pytest.fixture(scope="session")
def rd():
    """The remotedialer_py package, with its engine loop already running, so
    that per-test baselines (heap bytes, fds) do not count the loop's own
    one-time resources."""
    pkg = _package()
    srv = pkg.Server(listen="127.0.0.1:0")
    srv.start()
    srv.close()
    return pkg


class Tunnel:
    """A Server with one connected Client under AGENT_KEY, plus helpers."""

    key = AGENT_KEY

    def __init__(self, pkg, srv, cli):
        self.rd = pkg
        self.srv = srv
        self.cli = cli
        self.extra_clients = []

    @property
    def url(self):
        return self.srv.url

    def dial(self, port_or_address, key=None, proto="tcp", timeout=TIMEOUT):
        address = (port_or_address if isinstance(port_or_address, str)
                   else f"127.0.0.1:{port_or_address}")
        sock = self.srv.dial(key or self.key, proto, address, timeout=timeout)
        sock.settimeout(timeout)
        return sock

    def add_client(self, key, **kwargs):
        """Another connected Client of this server; checked and closed at teardown."""
        cli = make_client(self.rd, self.srv.url, key, **kwargs)
        self.extra_clients.append(cli)
        wait_for(lambda: self.srv.has_session(key), TIMEOUT, f"a session for {key}")
        return cli


@pytest.fixture
def tunnel(rd, tunnel_leak_check):
    """Server on 127.0.0.1:0 plus a Client connected as "agent-1". At the
    end: balance on both sides, nothing open, no descriptor leaked."""
    fds_before = support.open_fds()
    srv = rd.Server(listen="127.0.0.1:0")
    cli = None
    t = None
    try:
        srv.start()
        cli = make_client(rd, srv.url, AGENT_KEY)
        wait_for(lambda: srv.has_session(AGENT_KEY), TIMEOUT, "the agent's session")
        t = Tunnel(rd, srv, cli)
        yield t
        gc.collect()  # sockets a test dropped must end their connections
        for obj in (srv, cli, *t.extra_clients):
            try:
                obj.metrics()
            except rd.ClosedError:
                continue  # a test closed this extra client itself
            check_balanced(obj)
        wait_for(lambda: rd.engine_stats()["open_connections"] == 0, TIMEOUT,
                 "no open tunneled connection")
    finally:
        for c in (t.extra_clients if t else []):
            c.close()
        if cli is not None:
            cli.close()
        srv.close()
    wait_engine_idle(rd)
    assert_no_new_fds(fds_before)


@pytest.fixture
def echo_server():
    """TCP echo server on 127.0.0.1:0 (thread per connection). At the end
    every connection to it must have been closed by the agent side."""
    srv = support.EchoServer()
    try:
        yield srv
        wait_for(lambda: srv.open_count == 0, TIMEOUT,
                 "the agent side to close every echo connection")
    finally:
        srv.close()


@pytest.fixture
def silent_backend():
    """TCP server that reads everything and never answers (an HTTP backend
    that holds an exchange open). At the end every connection to it must
    have been closed by the agent side."""
    srv = support.StalledReader()
    srv.go.set()
    try:
        yield srv
        wait_for(lambda: srv.open_count == 0, TIMEOUT,
                 "the agent side to close every silent backend connection")
    finally:
        srv.close()


@pytest.fixture
def stream_server():
    """TCP server that streams bytes to each client until it goes away."""
    srv = support.StreamServer()
    try:
        yield srv
        wait_for(lambda: srv.open_count == 0, TIMEOUT,
                 "the agent side to close every stream connection")
    finally:
        srv.close()


@pytest.fixture
def http_service():
    svc = support.HttpService()
    try:
        yield svc
    finally:
        svc.close()


# ---------------------------------------------------------------------------
# CLI subprocesses


class CliProcess:
    """`python -m remotedialer_py ARGS` with its merged output collected by a
    reader thread, so a test can wait for a line (an event) instead of
    sleeping. It runs outside the source tree so that `-m` imports the same
    package as the tests (PYTHONPATH), not an unbuilt copy in the cwd."""

    def __init__(self, args, env=None, prefix=()):
        self.args = list(args)
        self.lines = []
        self._cond = threading.Condition()
        # prefix: a command that execs the rest, e.g. ("ip", "netns", "exec",
        # NAME), so that proc.pid is still the Python process.
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "remotedialer_py", *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, env=env, cwd=tempfile.gettempdir(), start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # EOF marker
            self._cond.notify_all()

    @property
    def output(self):
        with self._cond:
            return "\n".join(x for x in self.lines if x is not None)

    def wait_line(self, pattern, timeout=TIMEOUT):
        """Waits for an output line matching the regex; returns its match.
        Fails at once if the process exits first."""
        rx = re.compile(pattern, re.I)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                while seen < len(self.lines):
                    line = self.lines[seen]
                    seen += 1
                    if line is None:
                        raise AssertionError(
                            f"{self.args} exited (status {self.proc.wait(TIMEOUT)}) before "
                            f"printing /{pattern}/; output:\n{self.output}")
                    m = rx.search(line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.args} printed no /{pattern}/ within "
                                         f"{timeout}s; output:\n{self.output}")
                self._cond.wait(remaining)

    def wait_exit(self, timeout=TIMEOUT):
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        if not self._reader.is_alive():
            self.proc.stdout.close()  # the pipe would otherwise outlive the test
        return rc

    def kill(self):
        """SIGKILL, by pid."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.wait_exit()

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                return self.kill()
        return self.wait_exit(timeout)


@pytest.fixture
def run_cli(rd):
    """Factory: run_cli(*args, ready=r"listening", prefix=()) starts the CLI
    (behind prefix, a command that execs it) and, when ready is a regex,
    waits for a matching output line. Everything started
    is stopped at the end of the test."""
    pkg_parent = str(Path(rd.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    started = []

    def start(*args, ready=r"listening", timeout=60.0, prefix=()):
        p = CliProcess([str(a) for a in args], env=env, prefix=prefix)
        started.append(p)
        if ready:
            p.wait_line(ready, timeout)
        return p

    yield start
    for p in started:
        p.stop()
