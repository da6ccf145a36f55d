"""The pytest plugin's --tunnel-leak-check flag and tunnel_leak_check ini
setting, in inner pytest sessions (separate processes, so that what the inner
test leaks stays out of this one)."""

import os
import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INNER = '''
import socket

import pytest

from remotedialer_py import Client, Server

LEAKED = []


@pytest.fixture(scope="module")
def tunnel():
    # Module scope: set up before the leak check, so part of its baseline.
    target = socket.create_server(("127.0.0.1", 0), backlog=16)
    with target, Server("127.0.0.1:0") as srv, \\
            Client(srv.url, headers={"X-Tunnel-ID": "agent-1"}) as cli:
        cli.wait_connected(timeout=30)
        yield srv, "127.0.0.1:%d" % target.getsockname()[1]


def test_closes_its_socket(tunnel):
    srv, address = tunnel
    with srv.dial("agent-1", "tcp", address, timeout=30):
        pass


def test_leaks_its_socket(tunnel):
    srv, address = tunnel
    LEAKED.append(srv.dial("agent-1", "tcp", address, timeout=30))  # LEAK
'''


@pytest.fixture
def inner(pytester, monkeypatch):
    """Runs the inner session in a subprocess with this package's plugin."""
    import remotedialer_py

    pkg_parent = str(Path(remotedialer_py.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    # Only the plugin under test, however the packages around are installed.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    path = pytester.makepyfile(test_inner=INNER)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "# LEAK" in text)

    def run(*args):
        return pytester.runpytest_subprocess("-p", "remotedialer_py.pytest_plugin", *args,
                                             timeout=120)

    run.site = f"{path}:{line}"
    return run


def check_leak_report(result, site):
    # The leaking test's call passes; its teardown (the check) errors.
    result.assert_outcomes(passed=2, errors=1)
    out = result.stdout.str()
    # The failure names the leaked connection's target and where it was dialed.
    assert re.search(r"ERROR at teardown of test_leaks_its_socket", out), out
    assert re.search(r"open connection on <Server .*address=127\.0\.0\.1:\d+ .*clientkey=agent-1"
                     rf".*state=open.* \(dialed at {re.escape(site)}\)", out), out
    assert re.search(r"fd \d+ -> socket:\[\d+\] .*, tunnel to agent-1:tcp/127\.0\.0\.1:\d+ "
                     rf"dialed at {re.escape(site)}", out), out


def test_flag_checks_every_test(inner):
    check_leak_report(inner("--tunnel-leak-check", "-v"), inner.site)


def test_ini_setting_checks_every_test(inner, pytester):
    pytester.makefile(".ini", pytest="[pytest]\ntunnel_leak_check = true\n")
    check_leak_report(inner("-v"), inner.site)


def test_off_by_default(inner):
    result = inner("-v")
    result.assert_outcomes(passed=2)
    assert "tunnel leak check failed" not in result.stdout.str()
