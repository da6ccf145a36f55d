"""Pure-Python checks of argument parsing and input validation.

The address and command-line checks load no C extension, so they run (and
explain a failure) even when the engine does not build; the option checks
read the engine's options table.
"""

import math
import os
import re
import subprocess
import sys

import pytest

from remotedialer_py import _options, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- listen addresses -------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("127.0.0.1:8123", ("127.0.0.1", 8123)),
    (":8123", ("0.0.0.0", 8123)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("localhost:80", ("localhost", 80)),
    ("[::1]:0", ("::1", 0)),
    ("[::]:9000", ("::", 9000)),
    ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
    (("127.0.0.1", 5), ("127.0.0.1", 5)),
    (("", 5), ("0.0.0.0", 5)),
    (("[::1]", 5), ("::1", 5)),
])
def test_parse_listen_valid(text, expected):
    assert _options.parse_listen(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "expected HOST:PORT"),
    ("8123", "missing port"),
    ("127.0.0.1", "missing port"),
    ("127.0.0.1:", "is not a number"),
    ("127.0.0.1:http", "is not a number"),
    ("127.0.0.1:-1", "is not a number"),
    ("127.0.0.1:65536", "out of range"),
    ("127.0.0.1:99999999999999999999", "out of range"),
    ("::1:80", "brackets"),
    ("[::1:80", "missing ']'"),
    ("[::1]80", "expected ':PORT'"),
    ("[not-v6]:80", "not an IPv6 address"),
    (" 127.0.0.1:80", "expected HOST:PORT"),
    ("127.0.0.1 :80", "expected HOST:PORT"),
    ("a/b:80", "not a host name"),
    ("127.0.0.1:８０", "is not a number"),  # non-ASCII digits
    (("127.0.0.1", 70000), "out of range"),
    (("127.0.0.1", "80"), "expected (host, port)"),
    (("127.0.0.1", True), "expected (host, port)"),
])
def test_parse_listen_invalid(text, message):
    with pytest.raises(ValueError) as info:
        _options.parse_listen(text)
    assert message in str(info.value)
    assert "invalid listen address" in str(info.value)


def _addr_table():
    """tests/addr_table.txt as (mode, input, expected) triples; expected is
    (host, port) or the error kind."""
    cases = []
    with open(os.path.join(ROOT, "tests", "addr_table.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            mode, raw, result = line.split(" | ", 2)
            raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                         raw.encode())
            text = raw.decode("utf-8")
            if result.startswith("! "):
                expected = result[2:]
            else:
                host, port = result.split(" ")
                expected = ("" if host == '""' else host, int(port))
            cases.append(pytest.param(mode, text, expected, id=f"{mode}:{text!r}"))
    return cases


@pytest.mark.parametrize("mode, text, expected", _addr_table())
def test_addr_table(mode, text, expected):
    """The Python reading of endpoint addresses is the engine's: the same
    table drives tests/c/test_addr.c."""
    def parse():
        if mode == "listen":
            return _options.split_hostport(text, empty_host=True)
        if mode == "proxy":
            return _options.split_hostport(text, 80, bare_ipv6=True)
        tls, host, port, _path = _options.parse_ws_url(text)
        return host, port

    if isinstance(expected, tuple):
        assert parse() == expected
    else:
        with pytest.raises(_options.AddrError) as info:
            parse()
        assert info.value.kind == expected


@pytest.mark.parametrize("url, expected", [
    ("ws://127.0.0.1:8123/connect", (False, "127.0.0.1", 8123, "/connect")),
    ("wss://[::1]/a?b=1", (True, "::1", 443, "/a?b=1")),
    ("ws://h", (False, "h", 80, "")),
])
def test_parse_ws_url_parts(url, expected):
    assert _options.parse_ws_url(url) == expected


def test_parse_listen_wrong_type():
    with pytest.raises(TypeError):
        _options.parse_listen(8123)


def test_format_hostport():
    assert _options.format_hostport("127.0.0.1", 1) == "127.0.0.1:1"
    assert _options.format_hostport("::1", 1) == "[::1]:1"


# -- options ------------------------------------------------------------------

def test_options_convert_and_check():
    out = _options.validate("Server", _options.SERVER_OPTIONS,
                            {"read_timeout": 1, "max_buffer": 1 << 21, "proxy_route": False,
                             "auth_header": "X-Agent"})
    assert out == {"read_timeout": 1.0, "max_buffer": 1 << 21, "proxy_route": False,
                   "auth_header": "X-Agent"}
    assert isinstance(out["read_timeout"], float)


def test_options_unknown_name_is_type_error():
    with pytest.raises(TypeError, match="'bogus'"):
        _options.validate("Server", _options.SERVER_OPTIONS, {"bogus": 1})
    with pytest.raises(TypeError, match="authorizer="):
        _options.validate("Server", _options.SERVER_OPTIONS, {"auth": "callback"})
    with pytest.raises(TypeError, match="allow="):
        _options.validate("Client", _options.CLIENT_OPTIONS, {"patterns": []})
    with pytest.raises(TypeError, match="'ping_interval'"):
        _options.validate("Server", _options.SERVER_OPTIONS, {"ping_interval": 1})


@pytest.mark.parametrize("name, value", [
    ("read_timeout", -1),
    ("read_timeout", 0),
    ("read_timeout", math.nan),
    ("read_timeout", "5"),
    ("read_timeout", True),
    ("max_message", 0),
    ("max_message", -5),
    ("max_message", 1.5),
    ("max_message", True),
    ("max_message", 1 << 70),
    ("proxy_route", 1),
    ("auth_header", "X Bad"),
    ("auth_header", ""),
    ("auth_header", 5),
])
def test_options_bad_values_are_value_errors(name, value):
    with pytest.raises(ValueError, match=name):
        _options.validate("Server", _options.SERVER_OPTIONS, {name: value})


def test_durations_are_clamped():
    assert _options.duration("t", math.inf) == _options.MAX_SECONDS
    assert _options.duration("t", 0.001) == 0.001


def test_connect_target():
    assert _options.connect_target("tcp", "127.0.0.1:80") == ("tcp", "127.0.0.1:80")
    assert _options.connect_target("unix", "/run/x.sock") == ("unix", "/run/x.sock")
    for proto, address in [("", "a:1"), ("t/cp", "a:1"), ("tcp", ""), ("tcp", "a\r\n:1"),
                           (None, "a:1"), ("tcp", b"a:1"), ("tcp", "a" * 300)]:
        with pytest.raises(ValueError):
            _options.connect_target(proto, address)
    # The Go agent reads 266 bytes of "proto/address": exactly that fits.
    _options.connect_target("tcp", "a" * (266 - 4))
    with pytest.raises(ValueError, match="266"):
        _options.connect_target("tcp", "a" * (266 - 3))


# -- command line -------------------------------------------------------------

def test_server_defaults_match_go_example():
    args = cli.parse_args(["server"])
    assert args.listen == ("0.0.0.0", 8123)
    assert args.path == "/connect"
    assert args.debug is False
    assert (args.id, args.token, args.peers) == ("", "", "")
    assert (args.peer_list, args.peer_notes, args.peer_self) == ([], [], None)


@pytest.mark.parametrize("argv", [
    ["server", "--listen", ":8123", "--debug"],
    ["server", "-listen", ":8123", "-debug"],
    ["server", "-listen=:8123", "-debug=true"],
    ["server", "--listen=:8123", "--debug"],
])
def test_server_go_and_gnu_flags(argv):
    args = cli.parse_args(argv)
    assert args.listen == ("0.0.0.0", 8123)
    assert args.debug is True


def test_server_go_bool_false_and_peer_flags():
    args = cli.parse_args(["server", "-debug=false", "-id", "a", "-token", "t", "--path", "/tunnel"])
    assert args.debug is False
    assert (args.id, args.token, args.path) == ("a", "t", "/tunnel")


def test_server_bad_listen_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["server", "--listen", "8123"])
    assert info.value.code == 2
    assert "missing port" in capsys.readouterr().err


def test_server_bad_path_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["server", "--path", "connect"])
    assert info.value.code == 2
    assert "must start with '/'" in capsys.readouterr().err


# -- HA group flags -------------------------------------------------------------

URL_B = "ws://10.0.0.2:8123/connect"
URL_C = "wss://c.example:8443/connect"


def test_split_go_peers_mirrors_go():
    # Split on ",", trim, SplitN(":", 3): the URL keeps its own colons.
    peers, skipped = cli.split_go_peers(f" b:tb:{URL_B} ,c:tc:{URL_C}")
    assert peers == [("b", "tb", URL_B), ("c", "tc", URL_C)]
    assert skipped == []
    # Items without three parts are skipped; blank ones without a word.
    peers, skipped = cli.split_go_peers(f"junk,,b:tb:{URL_B}, only:two ,")
    assert peers == [("b", "tb", URL_B)]
    assert skipped == ["junk", "only:two"]
    assert cli.split_go_peers("") == ([], [])


@pytest.mark.parametrize("text, message", [
    ("b:tb:10.0.0.2:8123/connect", "ws:// or wss://"),   # three parts, no scheme
    (f"b::{URL_B}", "token"),
    (f":tb:{URL_B}", "id"),
])
def test_split_go_peers_rejects_items_that_cannot_work(text, message):
    with pytest.raises(ValueError, match=message):
        cli.split_go_peers(text)


def test_server_go_peer_flags():
    args = cli.parse_args(["server", "-id", "a", "-token", "ta",
                           "-peers", f"b:tb:{URL_B}, c:tc:{URL_C}"])
    assert (args.id, args.token) == ("a", "ta")
    assert args.peer_list == [("b", "tb", URL_B), ("c", "tc", URL_C)]
    assert args.peer_notes == []


def test_server_gnu_peer_flags_and_aliases():
    args = cli.parse_args(["server", "--peer-id", "a", "--peer-token", "ta",
                           "--peer", f"b:tb:{URL_B}", "--peer", f"c:tc:{URL_C}",
                           "--peer-ca-file", "/etc/ca.pem"])
    assert (args.id, args.token, args.peer_ca_file) == ("a", "ta", "/etc/ca.pem")
    assert args.peer_list == [("b", "tb", URL_B), ("c", "tc", URL_C)]
    args = cli.parse_args(["server", "--id=a", "--token=ta", f"--peers=b:tb:{URL_B}"])
    assert args.peer_list == [("b", "tb", URL_B)]


def test_server_peers_skipped_items_are_noted():
    args = cli.parse_args(["server", "-id", "a", "-token", "ta",
                           "-peers", f"junk,b:tb:{URL_B},"])
    assert args.peer_list == [("b", "tb", URL_B)]
    assert args.peer_notes == ["-peers: skipping 'junk': not id:token:url"]


def test_server_own_id_and_duplicates():
    # The same list on every server of a group: each skips its own id.
    group = f"a:ta:ws://10.0.0.1:8123/connect,b:tb:{URL_B}"
    args = cli.parse_args(["server", "-id", "a", "-token", "ta", "-peers", group,
                           "--peer", f"b:tb2:{URL_C}"])
    assert args.peer_list == [("b", "tb2", URL_C)]  # the later item wins, as in Go's map
    assert args.peer_self == "ws://10.0.0.1:8123/connect"
    assert args.peer_notes == [f"peer 'b' given twice: {URL_C} replaces {URL_B}"]


@pytest.mark.parametrize("argv", [
    ["-peers", f"b:tb:{URL_B}"],
    ["-peers", f"b:tb:{URL_B}", "-id", "a"],
    ["--peer", f"b:tb:{URL_B}", "--token", "ta"],
])
def test_server_peers_need_id_and_token(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["server", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--id" in err and "--token" in err and "remotedialer-py server" in err


@pytest.mark.parametrize("argv, message", [
    (["--peer", "b:tb"], "id:token:ws"),
    (["--peer", "b:tb:http://h/c"], "id:token:ws"),
    (["-peers", "b:tb:h:1/c"], "ws:// or wss://"),
    (["--id", "a b\n"], "--id"),
])
def test_server_bad_peer_values_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["server", "-id", "a", "-token", "ta", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_server_blank_peers_is_no_peer():
    # Go's example server with -peers "" (or "," ) adds nothing, id or not.
    for text in ("", ",", " , "):
        args = cli.parse_args(["server", "-peers", text])
        assert (args.peer_list, args.peer_notes) == ([], [])


def test_server_help_names_debug_peers(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["server", "--help"])
    out = capsys.readouterr().out
    assert "/debug/peers" in out and "--peer-id" in out and "-peers" in out


def test_client_flags():
    args = cli.parse_args(["client", "--connect", "ws://127.0.0.1:1/connect", "--id", "bar",
                           "--allow", "tcp/127.0.0.1:*", "--allow", "unix/*",
                           "--header", "Authorization: Bearer x"])
    assert args.connect == ["ws://127.0.0.1:1/connect"]
    assert args.id == "bar"
    assert args.allow == ["tcp/127.0.0.1:*", "unix/*"]
    assert args.header == [("Authorization", "Bearer x")]


def test_client_go_flags_and_defaults():
    args = cli.parse_args(["client", "-connect", "ws://h:1/c", "-id", "x"])
    assert (args.connect, args.id, args.allow) == (["ws://h:1/c"], "x", None)
    args = cli.parse_args(["client"])
    assert (args.connect, args.id) == (["ws://localhost:8123/connect"], "foo")


def test_client_several_servers_in_order():
    args = cli.parse_args(["client", "--connect", "ws://a:1/c", "-connect", "ws://b:1/c, ws://c:1/c",
                           "--connect=ws://d:1/c,"])
    assert args.connect == ["ws://a:1/c", "ws://b:1/c", "ws://c:1/c", "ws://d:1/c"]


def test_client_empty_connect_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["client", "--connect", " , "])
    assert info.value.code == 2
    assert "no server URL" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["client", "--allow", "127.0.0.1:*"],
    ["client", "--header", "novalue"],
    ["demo", "-n", "0"],
    ["demo", "--concurrency", "x"],
    ["server", "-debug=maybe"],
    ["bogus"],
    [],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code not in (0, None)


def test_demo_flags():
    args = cli.parse_args(["demo"])
    assert (args.n, args.concurrency) == (2000, 8)
    args = cli.parse_args(["demo", "-n", "10", "--concurrency", "3"])
    assert (args.n, args.concurrency) == (10, 3)


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "remotedialer_py", "--help"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("server", "client", "demo"):
        assert command in out.stdout


def test_importing_package_does_not_load_engine():
    code = ("import sys, remotedialer_py, remotedialer_py.pytest_plugin, remotedialer_py.cli; "
            "print('remotedialer_py._engine' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_version_matches_pyproject():
    import remotedialer_py

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        match = re.search(r'^version = "([^"]+)"', f.read(), re.M)
    assert match and match.group(1) == remotedialer_py.__version__
