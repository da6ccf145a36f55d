"""Pure-Python checks of argument parsing and input validation.

The address and command-line checks load no C extension, so they run (and
explain a failure) even when the engine does not build; the option checks
read the engine's options table, and the command's errors about files the
engine cannot use come from a server or agent that starts.
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


def test_server_gnu_peer_flags_and_aliases(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("")  # read by the engine when the server starts; here it only must exist
    args = cli.parse_args(["server", "--peer-id", "a", "--peer-token", "ta",
                           "--peer", f"b:tb:{URL_B}", "--peer", f"c:tc:{URL_C}",
                           "--peer-ca-file", str(ca)])
    assert (args.id, args.token, args.peer_ca_file) == ("a", "ta", str(ca))
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


# -- errors of the real command: the flag named, exit status 2 -------------------

def _run_cli(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "remotedialer_py", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def files(tmp_path):
    """Stand-ins for the command line's file arguments: {TEXT} a readable
    file that is not PEM, {MISSING} no file, {DIR} a directory."""
    text = tmp_path / "not.pem"
    text.write_text("not a certificate\n")
    return {"{TEXT}": str(text), "{MISSING}": str(tmp_path / "missing.pem"),
            "{DIR}": str(tmp_path), "{NODIR}": str(tmp_path / "no" / "dir")}


def _fill(items, files):
    out = []
    for item in items:
        for key, value in files.items():
            item = item.replace(key, value)
        out.append(item)
    return out


GROUP = ["-id", "a", "-token", "ta"]

PARSE_ERRORS = [
    # (argv, the error after "remotedialer-py COMMAND: error: ")
    (["server", "--bogus"], "unrecognized arguments: --bogus"),
    (["server", "-listen", ":8123", "extra"], "unrecognized arguments: extra"),
    (["server", "-listen", "8123"], "-listen: invalid listen address '8123': missing port"),
    (["server", "--listen", "127.0.0.1:99999"], "--listen: invalid listen address"),
    (["server", "--listen=[::1:80"], "--listen: invalid listen address"),
    (["server", "--listen"], "--listen: expected one argument"),
    (["server", "-path", "connect"], "-path: path must start with '/'"),
    (["server", "-debug=maybe"], "-debug: invalid boolean value 'maybe'"),
    (["server", "--log-format", "xml"], "--log-format: invalid choice: 'xml'"),
    (["server", "--tls-cert", "{TEXT}"], "--tls-cert needs --tls-key"),
    (["server", "--tls-key", "{TEXT}"], "--tls-key needs --tls-cert"),
    (["server", "--tls-client-ca", "{TEXT}"], "--tls-client-ca needs --tls-cert"),
    (["server", "--tls-cert", "{MISSING}", "--tls-key", "{TEXT}"],
     "--tls-cert: cannot read '{MISSING}': No such file or directory"),
    (["server", "--tls-cert", "{TEXT}", "--tls-key", "{DIR}"],
     "--tls-key: cannot read '{DIR}': Is a directory"),
    (["server", "--tls-cert", "{TEXT}", "--tls-key", "{TEXT}", "--tls-client-ca", "{MISSING}"],
     "--tls-client-ca: cannot read '{MISSING}'"),
    (["server", "--tokens", "{MISSING}"], "--tokens: cannot read '{MISSING}'"),
    (["server", "--tokens", ""], "--tokens: needs a file name"),
    (["server", "--proxy-ca-file", "{MISSING}"], "--proxy-ca-file: cannot read '{MISSING}'"),
    (["server", "--peer-ca-file", "{MISSING}"], "--peer-ca-file: cannot read '{MISSING}'"),
    (["server", *GROUP, "-peers", "b:tb:10.0.0.2:8123/connect"],
     "-peers: peer url must be ws:// or wss://"),
    (["server", *GROUP, "--peers", "b:tb:ws://"], "--peers: invalid server URL 'ws://'"),
    (["server", *GROUP, "--peers", "b::ws://h/c"], "--peers: token must be a non-empty"),
    (["server", *GROUP, "--peer", "b:tb"], "--peer: a peer is id:token:ws[s]://host:port/path"),
    (["server", *GROUP, "--peer", "b:tb:ws://:1/c"], "--peer: invalid server URL"),
    (["server", "-peers", "b:tb:ws://h/c"], "--peers/--peer need this server's own --id"),
    (["server", "-id", "a b\n", "-token", "ta", "--peer", "b:tb:ws://h/c"],
     "-id: id must be a non-empty single-line"),
    (["client", "--bogus"], "unrecognized arguments: --bogus"),
    (["client", "-connect", "http://h/c"],
     "-connect: invalid server URL 'http://h/c': expected ws://HOST[:PORT]/PATH"),
    (["client", "--connect", "ws://a:1/c,ws://b:x/c"],
     "--connect: invalid server URL 'ws://b:x/c'"),
    (["client", "--connect", " , "], "--connect: no server URL given"),
    (["client", "--id", ""], "--id: must not be empty"),
    (["client", "-id", "a\nb"], "-id: 'a\\nb' contains control characters"),
    (["client", "--allow", "127.0.0.1:*"], "--allow: allow pattern '127.0.0.1:*' must look like"),
    (["client", "--header", "novalue"], "--header: header 'novalue' must look like 'Name: value'"),
    (["client", "--header", "X Y: z"], "--header: header name must be an HTTP header name"),
    (["client", "--header", "X-A: a\rb"], "--header: 'a\\rb' contains control characters"),
    (["client", "--ca-file", "{MISSING}"], "--ca-file: cannot read '{MISSING}'"),
    (["client", "--client-cert", "{TEXT}"], "--client-cert needs --client-key"),
    (["client", "--client-key", "{TEXT}"], "--client-key needs --client-cert"),
    (["client", "--client-cert", "{TEXT}", "--client-key", "{MISSING}"],
     "--client-key: cannot read '{MISSING}'"),
    (["client", "--proxy", "ftp://p:1"], "--proxy: invalid proxy URL 'ftp://p:1': the scheme"),
    (["client", "--proxy", "https://p:1"], "--proxy: https:// proxies are not supported"),
    (["client", "--server-name", "a b"], "--server-name: must be a host name or address"),
    (["client", "-debug=2"], "-debug: invalid boolean value '2'"),
    (["demo", "-n", "0"], "-n: must be positive, got 0"),
    (["demo", "--concurrency", "x"], "--concurrency: 'x' is not an integer"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["options", "--readme", "{MISSING}"], "--readme: cannot read '{MISSING}'"),
    (["options", "--bogus"], "unrecognized arguments: --bogus"),
    (["soak", "-c", "0"], "-c: must be positive, got 0"),
    (["soak", "--warmup", "-1"], "--warmup: must not be negative, got -1"),
    (["soak", "--interval", "0"], "--interval: must be a positive number, got 0"),
    (["soak", "--interval", "nan"], "--interval: 'nan' is not a number"),
    (["soak", "--heap-margin", "x"], "--heap-margin: 'x' is not an integer"),
    (["soak", "--rss-margin", "-1"], "--rss-margin: must not be negative"),
    (["soak", "--csv", "{NODIR}/x.csv"], "--csv: cannot write '{NODIR}/x.csv': no directory"),
    (["soak", "--plot", "{DIR}"], "--plot: '{DIR}' is a directory"),
    (["forward", "k", "tcp", "10.0.0.1:80"], "the following arguments are required: --server"),
    (["forward", "k", "tcp", "10.0.0.1:80", "--server", "ws://h:1"],
     "--server: invalid server URL 'ws://h:1': expected http(s)://HOST[:PORT][/PREFIX]"),
    (["forward", "k", "udp", "10.0.0.1:53", "--server", "http://h:1"],
     "proto 'udp': the stream route carries tcp, tcp4, tcp6, unix"),
    (["forward", "k", "tcp", "10.0.0.1", "--server", "http://h:1"],
     "address '10.0.0.1': expected HOST:PORT (missing port)"),
    (["forward", "k", "tcp", "10.0.0.1:80", "--server", "http://h:1", "--ca-file", "{MISSING}"],
     "--ca-file: cannot read '{MISSING}'"),
    (["forward", "k", "tcp", "10.0.0.1:80", "--server", "http://h:1", "--listen", "x"],
     "--listen: "),
    (["forward", "k", "tcp", "10.0.0.1:80", "--server", "http://h:1", "--bogus"],
     "unrecognized arguments: --bogus"),
    (["status", "ftp://h"], "URL: a server URL is http(s)://HOST:PORT"),
    (["status", "--timeout", "0", "http://127.0.0.1:1"], "--timeout: must be a positive number"),
    (["status", "http://127.0.0.1:1", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, message", PARSE_ERRORS,
                         ids=[" ".join(argv) for argv, _ in PARSE_ERRORS])
def test_bad_argument_names_the_flag(argv, message, files):
    """Each bad value: the subcommand's usage, then `PROG COMMAND: error:
    FLAG: what is wrong`, exit status 2, no traceback."""
    res = _run_cli(*_fill(argv, files))
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    command = argv[0]
    assert res.stderr.startswith(f"usage: remotedialer-py {command} "), res.stderr
    last = res.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"remotedialer-py {command}: error: {_fill([message], files)[0]}"), \
        res.stderr


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "COMMAND: invalid choice: 'bogus'"),
    (["--bogus", "demo"], "unrecognized arguments: --bogus"),
])
def test_bad_top_level_arguments(argv, message):
    res = _run_cli(*argv)
    assert res.returncode == 2
    assert res.stderr.startswith("usage: remotedialer-py [-h]"), res.stderr
    assert res.stderr.rstrip("\n").splitlines()[-1].startswith(f"remotedialer-py: error: {message}")


def _tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# TOKEN CLIENT_KEY\nonly-one-field\n")
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["server", "--listen", "127.0.0.1:0", "--tls-cert", "{TEXT}", "--tls-key", "{TEXT}"],
     "--tls-cert: cannot load certificate chain from {TEXT}"),
    (["server", "--listen", "127.0.0.1:0", "--proxy-ca-file", "{TEXT}"],
     "--proxy-ca-file: cannot load CA file {TEXT}"),
    (["server", "--listen", "127.0.0.1:0", "--tokens", "{TOKENS}"],
     "--tokens: {TOKENS}: line 2: "),
    (["client", "--connect", "wss://127.0.0.1:1/connect", "--ca-file", "{TEXT}"],
     "--ca-file: cannot load CA file {TEXT}"),
    (["client", "--connect", "wss://127.0.0.1:1/connect", "--client-cert", "{TEXT}",
      "--client-key", "{TEXT}"], "--client-cert: cannot load certificate chain from {TEXT}"),
])
def test_unusable_file_names_the_flag(argv, message, files, tmp_path):
    """A file that exists but that the engine cannot use is found when the
    server or agent starts: the same form of error, naming the flag."""
    files = dict(files, **{"{TOKENS}": _tokens_file(tmp_path)})
    res = _run_cli(*_fill(argv, files))
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    assert res.stderr.rstrip("\n").splitlines()[-1].startswith(
        f"remotedialer-py {argv[0]}: error: {_fill([message], files)[0]}"), res.stderr


def test_server_that_cannot_listen_exits_1():
    """A good argument the machine refuses (the port is taken) is a failure
    to run, not a usage error."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        res = _run_cli("server", "--listen", f"127.0.0.1:{port}")
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == \
        f"remotedialer-py server: listen tcp 127.0.0.1:{port}: address already in use"


def test_status_of_nothing_says_why():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    res = _run_cli("status", f"http://127.0.0.1:{port}")
    assert res.returncode == 2
    assert res.stderr.strip() == f"remotedialer-py status: http://127.0.0.1:{port}: " \
                                 "Connection refused"


@pytest.mark.parametrize("command", ["server", "client", "demo", "options", "soak", "status"])
def test_every_subcommand_has_its_help(command):
    res = _run_cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: remotedialer-py {command} ")


def test_a_new_subcommand_gets_the_same_errors(capsys):
    """What a subcommand added later gets without asking: its own usage on an
    unknown flag, the flag as typed in an error, Go's -flag=false, needs()."""
    from remotedialer_py import _cliparse

    parser = _cliparse.Parser(prog="remotedialer-py")
    sub = parser.add_subparsers(dest="command")
    new = sub.add_parser("new")
    new.add_argument("--port", "-port", type=_cliparse.positive_int, default=1)
    new.add_argument("--debug", "-debug", action=_cliparse.GoBool)
    new.add_argument("--cert", type=_cliparse.input_file)
    new.add_argument("--key", type=_cliparse.input_file)
    new.needs("--cert", "--key")

    args = parser.parse_args(["new", "-port=5", "-debug=true"])
    assert (args.port, args.debug) == (5, True)
    assert parser.parse_args(["new", "-debug=false"]).debug is False
    for argv, message in [
        (["new", "--bogus"], "remotedialer-py new: error: unrecognized arguments: --bogus"),
        (["new", "-port", "0"], "remotedialer-py new: error: -port: must be positive, got 0"),
        (["new", "-debug=no"], "remotedialer-py new: error: -debug: invalid boolean value 'no'"),
        (["new", "--cert", __file__], "remotedialer-py new: error: --cert needs --key"),
    ]:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: remotedialer-py new ")
        assert err.splitlines()[-1].startswith(message), err
