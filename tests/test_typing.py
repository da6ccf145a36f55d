"""mypy type-checks a user's script against the package's annotations (and
the C extension's stub): correct use passes, misuse is reported."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = '''
from typing import Optional

from remotedialer_py import (Client, ClientNotFoundError, Forward, RemoteForward, Request,
                             Server, TokenAuthorizer, TunnelSocket, engine_stats)
from remotedialer_py.pytest_plugin import assert_balanced


def authorize(request: Request) -> tuple[str, bool]:
    return request.headers.get("x-tunnel-id", ""), request.method == "GET"


def run() -> Optional[str]:
    with Server("127.0.0.1:0", authorizer=authorize, read_timeout=30) as srv, \\
            Client(srv.url, headers={"X-Tunnel-ID": "a"}, allow=["tcp/127.0.0.1:*"]) as cli:
        cli.wait_connected(timeout=5)
        keys: list[str] = srv.list_clients()
        try:
            sock: TunnelSocket = srv.dial(keys[0], "tcp", "127.0.0.1:8080", timeout=5)
        except ClientNotFoundError as exc:
            return str(exc)
        fwd: Forward = srv.forward("a", "tcp", "127.0.0.1:8080")
        port: int = fwd.port
        sock.sendall(b"x")
        error: Optional[str] = sock.tunnel_error
        for name, samples in srv.metrics().items():
            for labels, value in samples.items():
                print(name, dict(labels), value + 1, port)
        assert_balanced(cli, sessions=False)
        print(engine_stats()["open_connections"])
        fwd.close()
        with RemoteForward(f"http://127.0.0.1:{srv.port}", "a", "unix", "/run/x.sock",
                           headers={"Authorization": "Bearer t"}) as remote:
            failed: int = remote.stats()["failed"]
            print(remote.port + failed)
    with Server(authorizer=TokenAuthorizer(tokens={"0123456789abcdef": "a"})):
        pass
    return error
'''

BAD = '''
from remotedialer_py import Client, Server

srv = Server("127.0.0.1:0")
srv.dial("a", "tcp", 8080)
cli = Client(srv.url)
cli.wait_connected(timeout="5")
name: int = srv.list_clients()
Server("127.0.0.1:0", read_timeout="30")
Client(srv.url, max_bufer=1)
'''


def mypy(tmp_path, source):
    pytest.importorskip("mypy", reason="mypy not installed (make testdeps)")
    script = tmp_path / "user.py"
    script.write_text(source)
    env = {"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                           "--no-error-summary", "--python-version", "3.10", str(script)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_correct_use_type_checks(tmp_path):
    res = mypy(tmp_path, GOOD)
    assert res.returncode == 0, res.stdout + res.stderr


def test_misuse_is_reported(tmp_path):
    res = mypy(tmp_path, BAD)
    errors = [line.split("user.py:", 1)[1] for line in res.stdout.splitlines()
              if ": error:" in line]
    assert len(errors) == 5, res.stdout + res.stderr
    assert errors[0].startswith("5:") and 'Argument 3 to "dial" of "Server"' in errors[0]
    assert errors[1].startswith("7:") and '"wait_connected" of "Client"' in errors[1]
    assert errors[2].startswith("8:") and 'variable has type "int"' in errors[2]
    # The engine's options, typed (remotedialer_py/option_types.py).
    assert errors[3].startswith("9:") and '"read_timeout"' in errors[3], errors[3]
    assert errors[4].startswith("10:") and '"max_bufer"' in errors[4], errors[4]
