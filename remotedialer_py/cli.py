"""Command line: ``remotedialer-py server|client|forward|demo|soak``.

The server and client subcommands also accept the single-dash flags of the Go
library's example programs (``-listen :8123``, ``-id A -token T -peers
id:token:url,...``, ``-connect URL -id foo``), so scripts written for those keep
working.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

from . import __version__, _cliparse, _options

PROG = "remotedialer-py"
DEFAULT_CONNECT = "ws://localhost:8123/connect"


_GoBool = _cliparse.GoBool


def _listen(value: str) -> tuple[str, int]:
    try:
        return _options.parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _forward_listen(value: str) -> tuple[str, int]:
    """``[HOST:]PORT``: a bare port listens on 127.0.0.1."""
    return _listen(f"127.0.0.1:{value}" if value.isdigit() else value)


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"path must start with '/', got {value!r}")
    return value


def _pattern(value: str) -> str:
    if "/" not in value or value.startswith("/"):
        raise argparse.ArgumentTypeError(f"allow pattern {value!r} must look like 'tcp/127.0.0.1:*'")
    return value


def _header(value: str) -> tuple[str, str]:
    name, sep, val = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header {value!r} must look like 'Name: value'")
    try:
        _options.header_name("header name", name.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name.strip(), _cliparse.header_value(val.strip())


def _peer(value: str) -> tuple[str, str, str]:
    """One ``--peer ID:TOKEN:URL``: strict, unlike the items of ``-peers``."""
    try:
        peer = _options.parse_peer(value.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    _cliparse.ws_url(peer[2])
    return peer


def _client_id(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return _cliparse.header_value(value)


def _server_name(value: str) -> str:
    try:
        return _options.host_name("name", value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("name ")) from None


def _status_url(value: str) -> str:
    from . import status

    try:
        status.base_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def split_go_peers(text: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The Go example server's ``-peers id:token:url,id:token:url``.

    As in Go: split on ",", trim each item, split it in at most three parts
    at ":" and skip an item that does not have three. Returns the peers and
    the skipped (non-blank) items, which the caller warns about; blank items
    (``-peers ""``, a trailing comma) are ignored without a word. An item
    with three parts that still cannot work (an empty id or token, a URL
    that is not ``ws://`` or ``wss://``) raises ValueError: Go would retry
    it forever.
    """
    peers, skipped = [], []
    for item in text.split(","):
        item = item.strip()
        parts = item.split(":", 2)
        if len(parts) != 3:
            if item:
                skipped.append(item)
            continue
        peers.append(_options.parse_peer(tuple(parts)))
    return peers, skipped


def _client_urls(values: Optional[Sequence[str]]) -> list[str]:
    """``--connect`` values, each possibly a comma-separated list, in order."""
    urls: list[str] = []
    for value in values or [DEFAULT_CONNECT]:
        urls.extend(u.strip() for u in value.split(",") if u.strip())
    return urls


_positive_int = _cliparse.positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = _cliparse.Parser(
        prog=PROG, allow_abbrev=False,
        description="A reverse tunnel over WebSocket, wire-compatible with rancher/remotedialer.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    srv = sub.add_parser(
        "server", allow_abbrev=False, help="run a tunnel server",
        description="Accept agents on PATH and serve /metrics and /client/{id}/{scheme}/{host}/{path}.")
    srv.add_argument("--listen", "-listen", type=_listen, default=_listen(":8123"), metavar="HOST:PORT",
                     help="address to listen on (default :8123, all IPv4 interfaces)")
    srv.add_argument("--path", "-path", type=_path, default="/connect",
                     help="WebSocket path agents connect to (default /connect)")
    srv.add_argument("--debug", "-debug", action=_GoBool, help="debug logging")
    srv.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text (default) or json: one JSON object per line, for log shippers")
    srv.add_argument("--data-trace", action="store_true",
                     help="log each tunnel message sent and received (remotedialer_py.conn, "
                          "DEBUG); also on with CATTLE_TUNNEL_DATA_DEBUG=true")
    srv.add_argument("--debug-connections", action="store_true",
                     help="serve GET /debug/connections (every open session and connection) "
                          "and GET /debug/peers (each HA peer: link state, last error, "
                          "announced agents)")
    srv.add_argument("--dashboard", action="store_true",
                     help="serve the dashboard at /ui/ and GET /debug/state (open sessions "
                          "and connections, live); loopback clients only unless "
                          "--dashboard-user is set or --tokens is used")
    srv.add_argument("--dashboard-user", metavar="USER", default=None,
                     help="HTTP Basic user for the dashboard and /debug/state")
    srv.add_argument("--dashboard-password-file", metavar="FILE", default=None,
                     type=_cliparse.input_file,
                     help="the password of --dashboard-user (the file's first line)")
    srv.needs("--dashboard-user", "--dashboard-password-file")
    srv.needs("--dashboard-password-file", "--dashboard-user")
    srv.add_argument("--tls-cert", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="serve wss:// with this certificate (chain allowed)")
    srv.add_argument("--tls-key", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="private key for --tls-cert")
    srv.needs("--tls-cert", "--tls-key")
    srv.needs("--tls-key", "--tls-cert")
    srv.needs("--tls-client-ca", "--tls-cert")
    srv.add_argument("--tls-client-ca", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="require client certificates signed by this CA")
    srv.add_argument("--proxy-ca-file", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="https targets of /client/...: trust these CAs instead of the "
                          "system store")
    srv.add_argument("--proxy-insecure", action="store_true",
                     help="https targets of /client/...: skip certificate verification")
    srv.add_argument("--tokens", metavar="FILE", default=None, type=_cliparse.input_file,
                     help="authorize agents by 'Authorization: Bearer TOKEN' from FILE "
                          "(lines 'TOKEN CLIENT_KEY'; re-read on SIGHUP) instead of "
                          "trusting X-Tunnel-ID")
    group = srv.add_argument_group(
        "HA group", "Servers of a group link to each other, announce their agents and carry "
                    "each other's dials, so a dial through any server reaches an agent "
                    "connected to another.")
    group.add_argument("--id", "-id", "--peer-id", dest="id", default="", metavar="ID",
                       help="this server's id in the group (sent to peers as X-API-Tunnel-ID)")
    group.add_argument("--token", "-token", "--peer-token", dest="token", default="",
                       metavar="TOKEN",
                       help="the token this server presents to its peers "
                            "(X-API-Tunnel-Token); each peer lists it for this server's id")
    group.add_argument("--peers", "-peers", default="", metavar="ID:TOKEN:URL,...",
                       help="peers as in the Go example server: comma-separated "
                            "id:token:url items, where token is the one that peer presents "
                            "and url its connect URL; an item without three parts is "
                            "skipped with a warning, an item naming this server's own id "
                            "is skipped, so every server can get the same list")
    group.add_argument("--peer", dest="peer", action="append", type=_peer, default=[],
                       metavar="ID:TOKEN:URL", help="one peer (repeatable; strict)")
    group.add_argument("--peer-ca-file", metavar="PEM", default=None, type=_cliparse.input_file,
                       help="wss:// peers: verify their certificates against these CAs "
                            "(default, as in Go: not verified; the tokens authenticate)")

    cli = sub.add_parser(
        "client", allow_abbrev=False, help="run a tunnel agent",
        description="Connect to a server and serve the dials it sends through the tunnel.")
    cli.add_argument("--connect", "-connect", action="append", default=None, metavar="URL",
                     help="server URL (default ws://localhost:8123/connect); repeat it, or "
                          "separate URLs with commas, to fail over between the servers of "
                          "an HA group: tried in order, a lost session on its own URL first")
    cli.add_argument("--id", "-id", default="foo", type=_client_id,
                     help="client id sent as X-Tunnel-ID (default foo)")
    cli.add_argument("--allow", "-allow", action="append", type=_pattern, default=None,
                     metavar="PATTERN",
                     help="allow dials matching proto/host:port, '*' wildcards "
                          "(repeatable; default: allow everything)")
    cli.add_argument("--header", "-header", action="append", type=_header, default=[],
                     metavar="'NAME: VALUE'", help="extra handshake header (repeatable)")
    cli.add_argument("--ca-file", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="wss: trust these CAs instead of the system store")
    cli.add_argument("--insecure", action="store_true",
                     help="wss: do not verify the server's certificate")
    cli.add_argument("--client-cert", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="wss: present this client certificate")
    cli.add_argument("--client-key", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="private key for --client-cert")
    cli.needs("--client-cert", "--client-key")
    cli.needs("--client-key", "--client-cert")
    cli.add_argument("--server-name", metavar="NAME", default=None, type=_server_name,
                     help="wss: verify this name instead of the URL's host")
    cli.add_argument("--proxy", metavar="URL", default=None, type=_cliparse.proxy_url,
                     help="reach the servers through this HTTP proxy "
                          "(http://[USER:PASSWORD@]HOST[:PORT], CONNECT); '' for none; "
                          "default: HTTPS_PROXY / HTTP_PROXY / NO_PROXY as Go reads them")
    cli.add_argument("--debug", "-debug", action=_GoBool, help="debug logging")
    cli.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text (default) or json: one JSON object per line, for log shippers")
    cli.add_argument("--data-trace", action="store_true",
                     help="log each tunnel message sent and received (remotedialer_py.conn, "
                          "DEBUG); also on with CATTLE_TUNNEL_DATA_DEBUG=true")

    fwd = sub.add_parser(
        "forward", allow_abbrev=False, help="a local port through a running server's agent",
        description="Listen locally; each connection goes through the server's stream route "
                    "(GET /stream/..., Upgrade: tcp) and agent KEY to ADDRESS, like kubectl "
                    "port-forward. The server needs its proxy route on (the default).")
    fwd.add_argument("key", metavar="KEY", help="the agent's client key")
    fwd.add_argument("proto", metavar="PROTO", help="tcp, tcp4, tcp6 or unix")
    fwd.add_argument("address", metavar="ADDRESS", help="host:port, or a unix socket path")
    fwd.add_argument("--server", required=True, metavar="URL", type=_cliparse.http_url,
                     help="the server: http(s)://HOST:PORT (a path is a prefix)")
    fwd.add_argument("--listen", type=_forward_listen, default=("127.0.0.1", 0),
                     metavar="[HOST:]PORT", help="local address (default 127.0.0.1:0, any port)")
    fwd.add_argument("--header", action="append", type=_header, default=[],
                     metavar="'NAME: VALUE'", help="extra request header, e.g. Authorization "
                                                  "(repeatable)")
    fwd.add_argument("--ca-file", metavar="PEM", default=None, type=_cliparse.input_file,
                     help="https: trust these CAs instead of the system store")
    fwd.add_argument("--debug", action="store_true", help="debug logging")

    demo = sub.add_parser(
        "demo", allow_abbrev=False, help="run the loopback demo",
        description="One process: an HTTP service, a server and an agent; requests through the "
                    "tunnel, then the counters and memory.")
    demo.add_argument("-n", "--requests", dest="n", type=_positive_int, default=2000,
                      help="number of requests (default 2000)")
    demo.add_argument("-c", "--concurrency", type=_positive_int, default=8,
                      help="concurrent request threads (default 8)")

    opts = sub.add_parser(
        "options", allow_abbrev=False, help="print the Server and Client options (Markdown)",
        description="The options table and the limits table, from the engine's own table.")
    opts.add_argument("--readme", metavar="FILE", default=None, type=_cliparse.input_file,
                      help="rewrite FILE's generated tables instead of printing them")

    from . import soak as _soak  # pure Python; the engine loads when the soak runs

    soak = sub.add_parser(
        "soak", allow_abbrev=False, help="find leaks under load (loopback)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An HTTP service behind an agent; requests through the tunnel on fresh "
                    "connections (half via dial, half via the /client/ route), sampled every "
                    "second: connection counters of both sides, open connections, engine heap, "
                    "RSS, descriptors.",
        epilog="Exit status 1 when a request fails, a counter label set does not balance, a "
               "connection or descriptor stays open,\nor the engine heap / RSS does not come "
               "back to within its margin of the post-warm-up baseline.\n"
               "Long run: remotedialer-py soak -n 100000 -c 8 --csv soak.csv --plot soak.png")
    _soak.add_arguments(soak, _positive_int)

    status = sub.add_parser(
        "status", allow_abbrev=False, help="what a running server holds",
        description="Sessions, connection counters (added, removed, open, by client key) "
                    "and, with the server's --debug-connections, each session, the oldest "
                    "connections and the HA peers. Exit status 1 when added - removed is not "
                    "what is open for a key.")
    status.add_argument("url", metavar="URL", type=_status_url,
                        help="the server: http(s)://HOST:PORT or its ws(s):// connect URL")
    status.add_argument("--timeout", type=_cliparse.positive_float, default=10.0, metavar="SECONDS",
                        help="for each request (default 10)")
    # For errors found after parsing, under each subcommand's own usage.
    setattr(parser, "subcommands", {"server": srv, "client": cli, "forward": fwd})
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line. For ``server``, ``args.peer_list`` is every
    peer of ``-peers`` and ``--peer`` in order, a later item replacing an
    earlier one with the same id, ``args.peer_self`` the URL of the item
    naming this server (skipped) or None, and ``args.peer_notes`` what to
    warn about; for ``client``, ``args.connect`` is the list of server
    URLs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    subcommands: dict[str, _cliparse.Parser] = getattr(parser, "subcommands")
    args = parser.parse_args(argv)
    if args.command == "server":
        _resolve_peers(subcommands["server"], args)
    elif args.command == "forward":
        from .stream_forward import check_target
        try:
            check_target(args.key, args.proto, args.address)
        except ValueError as exc:
            subcommands["forward"].error(str(exc))
    elif args.command == "client":
        client = subcommands["client"]
        args.connect = _client_urls(args.connect)
        if not args.connect:
            client.error(f"{client.typed('--connect')}: no server URL given")
        for url in args.connect:
            try:
                _cliparse.ws_url(url)
            except argparse.ArgumentTypeError as exc:
                client.error(f"{client.typed('--connect')}: {exc}")
    return args


def _resolve_peers(parser: _cliparse.Parser, args: argparse.Namespace) -> None:
    flag = parser.typed("--peers")
    try:
        go_peers, skipped = split_go_peers(args.peers)
        for _pid, _token, url in go_peers:
            _cliparse.ws_url(url)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"{flag}: {exc}")
    notes = [f"-peers: skipping {item!r}: not id:token:url" for item in skipped]
    merged: dict = {}
    args.peer_self = None
    for pid, token, url in go_peers + list(args.peer):
        if pid == args.id:
            args.peer_self = url  # the group's list, this server included: fine
            continue
        if pid in merged:
            notes.append(f"peer {pid!r} given twice: {url} replaces {merged[pid][2]}")
        merged[pid] = (pid, token, url)
    if (merged or go_peers or args.peer) and not (args.id and args.token):
        parser.error("--peers/--peer need this server's own --id and --token "
                     "(-id ID -token TOKEN)")
    for name in ("id", "token"):
        value = getattr(args, name)
        if value:
            try:
                _options.peer_field(name, value)
            except ValueError as exc:
                parser.error(f"{parser.typed('--' + name)}: {exc}")
    args.peer_list = list(merged.values())
    args.peer_notes = notes


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the
    fields our records carry (events.FIELDS: client_key, proto, address,
    conn_id, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        from .events import FIELDS

        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            if name in record.__dict__:
                doc[name] = record.__dict__[name]
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _setup_logging(debug: bool, log_format: str = "text", data_trace: bool = False) -> None:
    """INFO by default: sessions that come and go and failed dials are
    logged by component (remotedialer_py.server, .client, .conn); the data
    trace puts remotedialer_py.conn at DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    if data_trace:
        logging.getLogger("remotedialer_py.conn").setLevel(logging.DEBUG)


def _data_trace(args: argparse.Namespace) -> bool:
    """--data-trace, or the environment's CATTLE_TUNNEL_DATA_DEBUG=true (as in Go)."""
    from . import _trace

    return bool(getattr(args, "data_trace", False)) or os.environ.get(_trace.ENV, "") == "true"


def _run_until_signal(tick: Optional[Callable[[], None]] = None, interval: float = 0.5) -> None:
    """Blocks the main thread until SIGINT or SIGTERM, calling `tick` meanwhile."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    # A bounded wait lets the handler run promptly on every Python version.
    while not stop.wait(interval):
        if tick is not None:
            tick()


def run_server(args: argparse.Namespace) -> int:
    _setup_logging(args.debug, args.log_format, _data_trace(args))
    log = logging.getLogger("remotedialer_py")
    for note in getattr(args, "peer_notes", []):
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    from .errors import TunnelError
    from .server import Server, TokenAuthorizer

    host, port = args.listen
    tls = {}
    if args.tls_cert or args.tls_key:
        tls = {"tls_cert": args.tls_cert, "tls_key": args.tls_key}
        if args.tls_client_ca:
            tls["tls_client_ca"] = args.tls_client_ca
    if args.proxy_ca_file:
        tls["proxy_ca_file"] = args.proxy_ca_file
    if args.proxy_insecure:
        tls["proxy_insecure"] = True
    group = {}
    if args.id:
        group["peer_id"] = args.id
    if args.token:
        group["peer_token"] = args.token
    if args.peer_ca_file:
        group["peer_ca_file"] = args.peer_ca_file
    peers = getattr(args, "peer_list", [])
    try:
        authorizer = TokenAuthorizer(args.tokens) if args.tokens else None
        # The Go example server's /client/... route stays on, as in Go; with
        # tokens it would bypass them, so it goes off then.
        srv = Server(listen=(host, port), path=args.path, authorizer=authorizer,
                     proxy_route=authorizer is None, debug_route=args.debug_connections,
                     peers=peers, data_trace=_data_trace(args), dashboard=args.dashboard,
                     dashboard_user=args.dashboard_user,
                     dashboard_password_file=args.dashboard_password_file, **group, **tls)
        srv.start()
    except (TunnelError, ValueError, TypeError, OSError) as exc:
        return _start_failed("server", exc, {
            "--tokens": args.tokens, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key,
            "--tls-client-ca": args.tls_client_ca, "--proxy-ca-file": args.proxy_ca_file,
            "--peer-ca-file": args.peer_ca_file,
            "--dashboard-password-file": args.dashboard_password_file})
    if authorizer is not None:
        def reload_tokens(signum: int, frame: object) -> None:
            try:
                revoked = srv.reload_tokens()
                log.info("tokens reloaded from %s%s", args.tokens,
                         f"; revoked, sessions ended: {', '.join(revoked)}" if revoked else "")
            except (OSError, ValueError) as exc:
                log.error("tokens not reloaded: %s", exc)

        signal.signal(signal.SIGHUP, reload_tokens)
    try:
        bound = _options.format_hostport(srv.host or host, srv.port or 0)
        print(f"listening on {srv.url} (bound to {bound})", flush=True)
        if args.dashboard:
            base = srv.url.replace("ws", "http", 1).rsplit(srv.path, 1)[0]
            print(f"dashboard at {base}/ui/", flush=True)
        if peers:
            own = getattr(args, "peer_self", None)
            print(f"HA group: this server is {args.id}"
                  + (f" (its own item, {own}, is skipped)" if own else ""), flush=True)
            for pid, _token, url in peers:
                print(f"added peer {pid} at {url}", flush=True)
        log.debug("agents authenticate with the X-Tunnel-ID header; metrics on /metrics")
        _run_until_signal(_peer_reporter(srv, log) if peers else None)
    finally:
        srv.close()
    return 0


def _start_failed(command: str, exc: BaseException, files: dict[str, Optional[str]]) -> int:
    """Reports a server or agent that would not start. A file given on the
    command line that the engine could not use (its message names the file;
    a token table's starts ``tokens:``) is a bad argument: exit status 2,
    naming the flag. Anything else (an address in use) is a failure to run:
    exit status 1."""
    text = str(exc)
    tokens = files.get("--tokens")
    # The flag whose file the message names first; for one file given twice
    # (a combined PEM), the one whose kind it names ("key", "cert").
    named = sorted((text.find(path), flag.rsplit("-", 1)[1] not in text, flag)
                   for flag, path in files.items() if path and path in text)
    if tokens and text.startswith("tokens: "):
        flag, text = "--tokens", f"{tokens}: {text.removeprefix('tokens: ')}"
    elif named:
        flag, text = named[0][2], text.removeprefix("tls: ")
    else:
        print(f"{PROG} {command}: {text}", file=sys.stderr)
        return 1
    print(f"{PROG} {command}: error: {flag}: {text}", file=sys.stderr)
    return 2


def _peer_reporter(srv: Any, log: logging.Logger) -> Callable[[], None]:
    """A tick that logs each peer link's transitions (the engine reconnects
    by itself): connected, or why the last attempt failed."""
    from .errors import ClosedError

    seen: dict = {}

    def tick() -> None:
        try:
            peers = srv.peers()
        except ClosedError:
            return
        for p in peers:
            up = p["state"] == "connected"
            why = p["last_error"] or ""
            before = seen.get(p["id"], (False, ""))
            if up and not before[0]:
                log.info("peer %s: connected to %s", p["id"], p["url"])
            elif not up and before[0]:
                log.info("peer %s: disconnected%s; reconnecting", p["id"],
                         f" ({why})" if why else "")
            elif not up and why and why != before[1]:
                log.info("peer %s: cannot connect to %s: %s; retrying", p["id"], p["url"], why)
            seen[p["id"]] = (up, why)

    return tick


def run_client(args: argparse.Namespace) -> int:
    _setup_logging(args.debug, args.log_format, _data_trace(args))
    log = logging.getLogger("remotedialer_py")
    from .client import Client
    from .errors import TunnelError

    urls = list(args.connect)
    headers = [("X-Tunnel-ID", args.id)] + list(args.header)
    tls: dict = {}
    if any(u.startswith("wss://") for u in urls):
        for name in ("ca_file", "client_cert", "client_key", "server_name"):
            if getattr(args, name):
                tls[name] = getattr(args, name)
        if args.insecure:
            tls["insecure"] = True
    try:
        cli = Client(urls, headers=headers, allow=args.allow, proxy=args.proxy,
                     data_trace=_data_trace(args), **tls)
        cli.start()
    except (TunnelError, ValueError, TypeError) as exc:
        return _start_failed("client", exc, {
            "--ca-file": args.ca_file, "--client-cert": args.client_cert,
            "--client-key": args.client_key})
    state: dict = {"url": None, "error": None}
    where = urls[0] if len(urls) == 1 else ", ".join(urls)

    def report() -> None:
        # The engine reconnects (and fails over) by itself; this only logs
        # the transitions. A switch between URLs faster than a tick still
        # shows, as a new URL.
        url = cli.current_url if cli.connected else None
        if url is not None and url != state["url"]:
            log.info("connected to %s as %s", url, args.id)
            state["error"] = None
        elif url is None and state["url"] is not None:
            why = cli.last_error
            log.info("disconnected from %s%s; reconnecting", state["url"],
                     f" ({why})" if why else "")
            state["error"] = why
        elif url is None:
            why = cli.last_error
            if why and why != state["error"]:
                log.info("cannot connect to %s: %s; retrying", where, why)
            state["error"] = why
        state["url"] = url

    try:
        via = {p for p in cli.proxies if p}
        log.info("connecting to %s as %s%s", where, args.id,
                 f" through proxy {', '.join(sorted(via))}" if via else "")
        _run_until_signal(report, interval=0.2)
    finally:
        cli.close()
    return 0


def run_forward(args: argparse.Namespace) -> int:
    _setup_logging(args.debug)
    log = logging.getLogger("remotedialer_py.forward")
    from .errors import TunnelError
    from .stream_forward import RemoteForward

    try:
        fwd = RemoteForward(args.server, args.key, args.proto, args.address, listen=args.listen,
                            headers=list(args.header), ca_file=args.ca_file)
    except (TunnelError, OSError) as exc:
        print(f"{PROG} forward: {exc}", file=sys.stderr)
        return 1
    seen = {"failed": 0}

    def report() -> None:
        # The engine closes a local connection that failed by itself; this
        # only logs why, once per new failure.
        st = fwd.stats()
        if st["failed"] > seen["failed"]:
            log.warning("%d connection(s) failed: %s", st["failed"] - seen["failed"],
                        st["last_error"])
            seen["failed"] = st["failed"]

    try:
        host = "127.0.0.1" if _options.is_wildcard(fwd.host) else fwd.host
        print(f"forwarding {_options.format_hostport(host, fwd.port)} -> {args.key} "
              f"{args.proto} {args.address} via {args.server}", flush=True)
        _run_until_signal(report, interval=0.2)
    finally:
        fwd.close()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(n=args.n, concurrency=args.concurrency)


def run_options(args: argparse.Namespace) -> int:
    from . import _optdoc

    if args.readme is None:
        print(_optdoc.options_table(), _optdoc.limits_table(), sep="\n\n")
        return 0
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    try:
        new = _optdoc.render_readme(text)
    except ValueError as exc:
        print(f"{PROG} options: error: --readme: {args.readme}: {exc}", file=sys.stderr)
        return 2
    if new != text:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
    return 0


def run_soak(args: argparse.Namespace) -> int:
    from . import soak

    rss = None if args.rss_margin is None else int(args.rss_margin * (1 << 20))
    return soak.run(n=args.n, concurrency=args.concurrency, processes=args.processes,
                    warmup=args.warmup, interval=args.interval, csv_path=args.csv_path,
                    plot_path=args.plot_path, heap_margin=args.heap_margin,
                    rss_margin_bytes=rss, keep_alive=args.keep_alive,
                    pool_per_target=args.pool_per_target,
                    pool_idle_timeout=args.pool_idle_timeout)


def run_status(args: argparse.Namespace) -> int:
    from . import status

    try:
        return status.report(args.url, sys.stdout, args.timeout)
    except (ValueError, OSError) as exc:
        # urlopen's "<urlopen error [Errno 111] Connection refused>" says it
        # less plainly than its reason.
        reason = getattr(exc, "reason", None)
        if reason is not None and not hasattr(exc, "code"):  # not an HTTP error status
            exc = reason
        print(f"{PROG} status: {args.url}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = {"server": run_server, "client": run_client, "forward": run_forward,
               "demo": run_demo,
               "options": run_options, "soak": run_soak, "status": run_status}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
