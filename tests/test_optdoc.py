"""One options table (csrc/rd_options.c) for the C parser, the Python checks
and the README: the README's tables are what the table prints, and C and
Python refuse a bad value with the same words."""

import math
import os
import subprocess
import sys

import pytest

from remotedialer_py import _engine, _optdoc, _options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_are_generated():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert _optdoc.render_readme(text) == text, \
        "README.md's option tables are stale: run `remotedialer-py options --readme README.md`"


def test_typed_options_are_generated():
    """The TypedDicts type checkers read name every option the engine takes."""
    with open(os.path.join(ROOT, _optdoc.TYPED_MODULE), encoding="utf-8") as f:
        text = f.read()
    assert _optdoc.typed_options_source() == text, \
        f"{_optdoc.TYPED_MODULE} is stale: run `make docs`"
    from remotedialer_py.option_types import ClientOptions, ServerOptions
    assert set(ServerOptions.__annotations__) == set(_options.SERVER_OPTIONS)
    assert set(ClientOptions.__annotations__) == set(_options.CLIENT_OPTIONS)


def test_options_command_prints_the_tables():
    out = subprocess.run([sys.executable, "-m", "remotedialer_py", "options"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{_optdoc.options_table()}\n\n{_optdoc.limits_table()}\n"


def test_python_tables_come_from_the_engine():
    rows = _engine.options()
    assert {r["kind"] for r in rows} <= set(_options._KINDS)
    for owner, table in (("Server", _options.SERVER_OPTIONS), ("Client", _options.CLIENT_OPTIONS)):
        assert set(table) == {r["name"] for r in rows if r[owner.lower()]}
    assert "ping_interval" not in _options.SERVER_OPTIONS
    assert "sync_grace" not in _options.CLIENT_OPTIONS
    assert _options.default("Server", "handshake_timeout") == 5.0
    assert _options.default("Client", "handshake_timeout") == 10.0


@pytest.mark.parametrize("owner, name, value", [
    ("Server", "read_timeout", -1),
    ("Server", "read_timeout", 0),
    ("Server", "read_timeout", math.nan),
    ("Server", "read_timeout", "5"),
    ("Server", "read_timeout", True),
    ("Client", "idle_timeout", -0.5),
    ("Server", "max_message", 0),
    ("Server", "max_message", -5),
    ("Server", "max_message", 1.5),
    ("Client", "max_buffer", True),
    ("Server", "max_head", (16 << 20) + 1),
    ("Server", "max_headers", 65),
    ("Server", "max_sessions", 0),
    ("Client", "max_pending_dials", "2"),
    ("Server", "proxy_route", 1),
    ("Server", "auth_header", "X Bad"),
    ("Server", "auth_header", ""),
    ("Server", "auth_header", "X" * 64),
    ("Client", "server_name", "a b"),
    ("Client", "server_name", "a" * 256),
])
def test_c_and_python_refuse_alike(owner, name, value):
    table = _options.SERVER_OPTIONS if owner == "Server" else _options.CLIENT_OPTIONS
    with pytest.raises(ValueError) as python:
        _options.validate(owner, table, {name: value})
    with pytest.raises(ValueError) as engine:
        if owner == "Server":
            _engine.server_new("127.0.0.1", 0, {name: value})
        else:
            _engine.client_new("ws://127.0.0.1:9/connect", [], {name: value})
    assert str(engine.value) == str(python.value)
