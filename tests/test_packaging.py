"""Packaging: `python -m build` makes an sdist and a wheel (the wheel from the
sdist, so the sdist must be complete); the wheel installs into a fresh venv
without network and runs a tunnel there; its type information is seen by mypy
through the installed package (PEP 561)."""

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent
# Build products and caches of the working tree stay out of the copy.
IGNORE = shutil.ignore_patterns(".git", "build", "dist", ".venv", "*.egg-info", "__pycache__",
                                "*.so", ".pytest_cache", ".hypothesis", ".benchmarks", ".mypy_cache")
BUILD_TIMEOUT = 300

ROUND_TRIP = '''
import socket, sys
import remotedialer_py
from remotedialer_py import Client, Server

assert remotedialer_py.__file__.startswith(sys.prefix), remotedialer_py.__file__
with socket.create_server(("127.0.0.1", 0)) as target, Server("127.0.0.1:0") as srv, \\
        Client(srv.url, headers={"X-Tunnel-ID": "a"}) as cli:
    cli.wait_connected(timeout=30)
    with srv.dial("a", "tcp", "127.0.0.1:%d" % target.getsockname()[1], timeout=30) as sock:
        sock.settimeout(30)
        conn, _ = target.accept()
        with conn:
            sock.sendall(b"ping")
            conn.settimeout(30)
            data = b""
            while len(data) < 4:
                data += conn.recv(4 - len(data))
            conn.sendall(data.upper())
            reply = b""
            while len(reply) < 4:
                reply += sock.recv(4 - len(reply))
    print("round trip", reply.decode())
'''

TYPED_USER = '''
from remotedialer_py import Client, Server, TunnelSocket

def open_one(srv: Server, key: str) -> TunnelSocket:
    return srv.dial(key, "tcp", "127.0.0.1:8080", timeout=5)

srv = Server("127.0.0.1:0")
port: int = srv.dial("a", "tcp", 8080)
'''


def run(cmd, **kwargs):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kwargs)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV", "LD_PRELOAD")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


# The installed package serves its dashboard page.
DASHBOARD_PAGE = """
import urllib.request
from remotedialer_py import Server
with Server("127.0.0.1:0", dashboard=True) as srv:
    r = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/ui/", timeout=30)
    print(r.status, r.read().split(b"\\n", 1)[0].decode())
"""


def test_sdist_and_wheel_install_into_a_fresh_venv(tmp_path):
    pytest.importorskip("build", reason="the build package is not installed (make testdeps)")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    dist = tmp_path / "dist"
    # Without isolation: no download; setuptools and wheel are already here.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        env=clean_env())
    sdists, wheels = list(dist.glob("*.tar.gz")), list(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(os.listdir(dist))

    with tarfile.open(sdists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("csrc/rd_pymod.c", "remotedialer_py/py.typed", "remotedialer_py/_engine.pyi",
                 "remotedialer_py/prometheus.py", "remotedialer_py/dashboard/index.html",
                 "README.md", "LICENSE", "pyproject.toml",
                 "setup.py"):
        assert name in names, f"{name} missing from the sdist"

    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(whl.read(meta_name))
    for name in ("remotedialer_py/py.typed", "remotedialer_py/_engine.pyi",
                 "remotedialer_py/prometheus.py", "remotedialer_py/pytest_plugin.py",
                 "remotedialer_py/dashboard/index.html"):
        assert name in names, f"{name} missing from the wheel"
    assert any(n.startswith("remotedialer_py/_engine.") and n.endswith(".so") for n in names)
    assert "prometheus" in meta.get_all("Provides-Extra")
    assert any(re.fullmatch(r'prometheus[-_]client; extra == "prometheus"', r)
               for r in meta.get_all("Requires-Dist")), meta.get_all("Requires-Dist")
    assert "Typing :: Typed" in meta.get_all("Classifier")
    # Apache-2.0: an SPDX License-Expression (setuptools 77 and later) or,
    # from older setuptools, the License field; the text in the dist-info.
    assert "Apache-2.0" in (meta.get("License-Expression"), meta.get("License")), meta.items()
    assert meta.get_all("License-File") == ["LICENSE"]
    assert any(re.fullmatch(r"remotedialer_py-[^/]+\.dist-info/(licenses/)?LICENSE", n)
               for n in names), sorted(names)
    assert any("github.com/rancher/remotedialer" in u for u in meta.get_all("Project-URL"))
    assert not [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r], \
        "the wheel has runtime dependencies"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], env=clean_env())
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", str(wheels[0])],
        env=clean_env())
    out = run([python, "-c", ROUND_TRIP], env=clean_env(), cwd=tmp_path).stdout
    assert out.strip() == "round trip PING"
    out = run([python, "-c", DASHBOARD_PAGE], env=clean_env(), cwd=tmp_path).stdout
    assert out.strip() == "200 <!DOCTYPE html>"
    out = run([str(venv / "bin" / "remotedialer-py"), "options"], env=clean_env(),
              cwd=tmp_path).stdout
    assert "| `read_timeout` |" in out

    # The installed package's annotations, found by mypy through py.typed.
    if shutil.which("mypy") is None and not _has_module("mypy"):
        return
    user = tmp_path / "user.py"
    user.write_text(TYPED_USER)
    res = subprocess.run([sys.executable, "-m", "mypy", "--python-executable", python,
                          "--cache-dir", str(tmp_path / "mypy-cache"), "--no-error-summary",
                          str(user)], capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                         env=clean_env(), cwd=tmp_path)
    errors = [line for line in res.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2 and all("user.py:8:" in e for e in errors), res.stdout + res.stderr
    assert 'Argument 3 to "dial" of "Server" has incompatible type "int"; expected "str"' \
        in res.stdout
    assert 'expression has type "TunnelSocket", variable has type "int"' in res.stdout


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None
