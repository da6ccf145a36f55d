"""Validation of user input before it reaches the engine.

Everything here is pure Python, so argument parsing can be tested and
reported without a built extension; only the option tables come from the
engine, loaded on first use. The engine trusts what it gets:
a negative timeout or a huge size would turn into undefined behaviour in C, so
every value is checked here and converted to the exact type the engine reads.
"""

from __future__ import annotations

import math
import re
import socket
from typing import Any, Callable, Mapping, Optional

# Durations longer than this are clamped: the engine converts seconds to
# 64-bit milliseconds, and no tunnel deadline needs to exceed ~31 years.
MAX_SECONDS = 1e9
# Sizes beyond this cannot be meant and would overflow size arithmetic in C.
MAX_SIZE = 1 << 62

# RFC 7230 token characters: what an HTTP header name may contain.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def duration(name: str, value: Any) -> float:
    """Returns `value` as positive seconds (float), clamped to MAX_SECONDS."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return min(seconds, MAX_SECONDS)


def size(name: str, value: Any, hi: int = MAX_SIZE) -> int:
    """Returns `value` as an int of bytes between 1 and `hi`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int (bytes), not {type(value).__name__}")
    if value <= 0 or value > hi:
        raise ValueError(f"{name} must be between 1 and {hi} bytes, got {value}")
    return value


def count(name: str, value: Any, hi: int = MAX_SIZE) -> int:
    """Returns `value` as an int between 1 and `hi` (connections, sessions)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0 or value > hi:
        raise ValueError(f"{name} must be between 1 and {hi}, got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def _longest(name: str, value: str, longest: Optional[int]) -> str:
    if longest is not None and len(value.encode()) > longest:
        raise ValueError(f"{name} must be at most {longest} bytes, got {len(value.encode())}")
    return value


def header_name(name: str, value: Any, longest: Optional[int] = None) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise ValueError(f"{name} must be an HTTP header name, got {value!r}")
    return _longest(name, value, longest)


def path(name: str, value: Any) -> str:
    """A file path (str or os.PathLike) as str; the engine reports unreadable files."""
    import os

    try:
        text = os.fspath(value)
    except TypeError:
        raise ValueError(f"{name} must be a file path, not {type(value).__name__}") from None
    if not isinstance(text, str) or not text or "\0" in text:
        raise ValueError(f"{name} must be a non-empty str path, got {value!r}")
    return text


def host_name(name: str, value: Any, longest: Optional[int] = 255) -> str:
    if not isinstance(value, str) or not value or \
            any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError(f"{name} must be a host name or address, got {value!r}")
    return _longest(name, value, longest)


def duration_or_off(name: str, value: Any) -> float:
    """Like duration(), but 0 or None turns the feature off (sent as 0)."""
    if value is None:
        return 0.0
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0:
        return 0.0
    return duration(name, value)


# The engine's table (csrc/rd_options.c, via _engine.options()) names every
# option, which objects take it, its kind and range; a kind maps to its
# validator here. There are no Python-only options. SERVER_OPTIONS and
# CLIENT_OPTIONS (name -> validator) are built on first use, so importing this
# module does not load the extension.
_KINDS: dict[str, Callable[..., Any]] = {
    "seconds": duration,
    "seconds_or_off": duration_or_off,
    "size": size,
    "count": count,
    "bool": boolean,
    "header": header_name,
    "host": host_name,
    "path": path,
}

_rows: Optional[tuple[dict[str, Any], ...]] = None


def rows() -> tuple[dict[str, Any], ...]:
    """The engine's options table, in documentation order (one dict a row:
    name, kind, server, client, default, default_text, max, meaning, limit)."""
    global _rows
    if _rows is None:
        from . import _engine
        _rows = _engine.options()
    return _rows


def _validator(row: Mapping[str, Any]) -> Callable[[str, Any], Any]:
    check, hi = _KINDS[row["kind"]], row["max"]
    if hi is None:
        return check
    return lambda name, value: check(name, value, hi)


def table(owner: str) -> dict[str, Callable[[str, Any], Any]]:
    """name -> validator for "Server" or "Client"."""
    return {row["name"]: _validator(row) for row in rows() if row[owner.lower()]}


def default(owner: str, name: str) -> Any:
    """The engine's default for an option of "Server" or "Client"."""
    return next(row["default"] for row in rows() if row[owner.lower()] and row["name"] == name)


def __getattr__(name: str) -> Any:
    tables = {"SERVER_OPTIONS": "Server", "CLIENT_OPTIONS": "Client"}
    if name not in tables:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = table(tables[name])
    return value


# Engine options that the classes set from their own parameters; passing them
# as keywords would contradict those parameters.
_RESERVED = {
    "Server": {"auth": "authorizer", "path": "path"},
    "Client": {"allow": "allow", "patterns": "allow", "proxies": "proxy"},
}


def validate(owner: str, table: Mapping[str, Callable[[str, Any], Any]],
             options: Mapping[str, Any]) -> dict[str, Any]:
    """Checks keyword options against `table` and returns them converted.

    Raises TypeError for an unknown name (like a Python call would) and
    ValueError for a value of the wrong type or range.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        check = table.get(key)
        if check is None:
            hint = _RESERVED.get(owner, {}).get(key)
            if hint is not None:
                raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}"
                                f" (use the {hint}= parameter)")
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r};"
                            f" valid options: {', '.join(sorted(table))}")
        out[key] = check(key, value)
    return out


# -- addresses -----------------------------------------------------------------
#
# split_hostport and parse_ws_url are the engine's rd_addr_parse and
# rd_addr_parse_url (csrc/rd_addr.c) written again in Python, rule for rule
# and in the same order, so that what the user is told here is what the
# engine would decide. They stay in Python because this module must work
# (and explain itself) without a built engine; tests/addr_table.txt holds
# the cases both are tested against (tests/c/test_addr.c, test_cli_args.py).

HOST_MAX = 255  # RD_ADDR_HOST_MAX
_NAME_RE = re.compile(rb"[A-Za-z0-9._-]*")
_IPV6_CHARS_RE = re.compile(rb"[0-9A-Fa-f:.]+")


class AddrError(ValueError):
    """An address the engine would refuse; ``kind`` names the reason as the
    engine's RD_ADDR_E* code does (``"missing_port"`` for
    RD_ADDR_EMISSING_PORT)."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(f"{text!r}: {kind.replace('_', ' ')}")
        self.kind = kind
        self.text = text


def _is_ipv6(text: bytes) -> bool:
    addr, pct, zone = text.partition(b"%")
    if pct and not (zone and _NAME_RE.fullmatch(zone)):
        return False
    if not 0 < len(addr) < 64 or not _IPV6_CHARS_RE.fullmatch(addr):
        return False
    try:
        socket.inet_pton(socket.AF_INET6, addr.decode("ascii"))
    except OSError:
        return False
    return True


def split_hostport(text: str, default_port: "int | None" = None, bare_ipv6: bool = False,
                   empty_host: bool = False) -> tuple[str, int]:
    """Splits an endpoint "host:port", "[v6]:port" into (host, port), the
    host without brackets; raises AddrError.

    ``default_port`` (None: the port is required) is used when none is
    written ("host", "[v6]"); ``bare_ipv6`` reads an unbracketed address
    with several colons as an IPv6 address with the default port;
    ``empty_host`` accepts ":port". A host is an IPv6 address (with an
    optional %zone) in brackets, else [A-Za-z0-9._-] up to HOST_MAX bytes;
    the port ASCII digits with a value in 0-65535.
    """
    s = text.encode("utf-8", "surrogatepass")
    if not s:
        raise AddrError("empty", text)
    port = None
    bracketed = False
    if s.startswith(b"["):
        end = s.find(b"]")
        if end < 0:
            raise AddrError("missing_bracket", text)
        host, rest, bracketed = s[1:end], s[end + 1:], True
        if rest:
            if not rest.startswith(b":"):
                raise AddrError("missing_port", text)
            port = rest[1:]
        if len(host) > HOST_MAX:
            raise AddrError("host_too_long", text)
        if not _is_ipv6(host):
            raise AddrError("bad_ipv6", text)
    elif s.count(b":") >= 2:
        if not bare_ipv6 or default_port is None:
            raise AddrError("too_many_colons", text)
        if len(s) > HOST_MAX:
            raise AddrError("host_too_long", text)
        if not _is_ipv6(s):
            raise AddrError("bad_ipv6", text)
        host = s
    else:
        host, sep, rest = s.partition(b":")
        if sep:
            port = rest
        if len(host) > HOST_MAX:
            raise AddrError("host_too_long", text)
        if not _NAME_RE.fullmatch(host):
            raise AddrError("bad_host", text)
    if not host and not bracketed and not empty_host:
        raise AddrError("missing_host", text)
    if port is None:
        if default_port is None:
            raise AddrError("missing_port", text)
        return host.decode("ascii"), default_port
    if not port or not port.isdigit():  # bytes.isdigit: ASCII digits only
        raise AddrError("bad_port", text)
    if int(port) > 65535:
        raise AddrError("port_range", text)
    return host.decode("ascii"), int(port)


def parse_ws_url(url: str) -> tuple[bool, str, int, str]:
    """Splits "ws://" or "wss://" + authority + path into (tls, host, port,
    path); the port defaults to 80 or 443, the path may be "". Raises
    AddrError (kind "bad_scheme" for another scheme)."""
    for scheme, tls in (("ws://", False), ("wss://", True)):
        if url.startswith(scheme):
            authority, slash, path = url[len(scheme):].partition("/")
            host, port = split_hostport(authority, 443 if tls else 80)
            return tls, host, port, slash + path
    raise AddrError("bad_scheme", url)


def _listen_error(original: Any, err: AddrError) -> ValueError:
    text = err.text
    kind = err.kind
    if kind == "missing_port" and text.startswith("["):
        why = "expected ':PORT' after ']'"
    elif kind == "missing_port":
        example = f"':{text}' or '127.0.0.1:{text}'" if text.isdigit() else "'127.0.0.1:0'"
        why = f"missing port; expected HOST:PORT, e.g. {example}"
    elif kind == "missing_bracket":
        why = "missing ']' after the IPv6 address"
    elif kind == "too_many_colons":
        why = "write IPv6 addresses in brackets, e.g. '[::1]:0'"
    elif kind == "bad_ipv6":
        why = f"{text[1:].partition(']')[0]!r} is not an IPv6 address"
    elif kind in ("bad_host", "host_too_long"):
        why = f"{text.partition(':')[0]!r} is not a host name or address"
    elif kind == "bad_port":
        why = f"port {text.rpartition(':')[2]!r} is not a number"
    elif kind == "port_range":
        why = f"port {int(text.rpartition(':')[2])} is out of range 0-65535"
    else:
        why = "expected HOST:PORT, e.g. '127.0.0.1:0' or ':8123'"
    return ValueError(f"invalid listen address {original!r}: {why}")


def parse_listen(listen: Any) -> tuple[str, int]:
    """Splits a listen address into (host, port).

    Accepts "host:port", ":port" (all IPv4 interfaces, as Go's net.Listen
    reads it), "[v6addr]:port", or a (host, port) tuple. Port 0 picks a free
    port. Host names are kept as given; they are resolved when binding.
    """
    if isinstance(listen, tuple):
        if len(listen) != 2 or not isinstance(listen[0], str) or \
                isinstance(listen[1], bool) or not isinstance(listen[1], int):
            raise ValueError(f"invalid listen address {listen!r}: expected (host, port)")
        host, port = listen
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid listen address {listen!r}: port {port} is out of range 0-65535")
        host = host.strip("[]") if host.startswith("[") else host
        return (host or "0.0.0.0"), port
    if not isinstance(listen, str):
        raise TypeError(f"listen must be a str like '127.0.0.1:0', not {type(listen).__name__}")
    if not listen or any(c.isspace() for c in listen):
        raise ValueError(f"invalid listen address {listen!r}: expected HOST:PORT, e.g. '127.0.0.1:0' or ':8123'")
    try:
        host, port = split_hostport(listen, empty_host=True)
    except AddrError as err:
        raise _listen_error(listen, err) from None
    return (host or "0.0.0.0"), port


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def format_hostport(host: str, port: int) -> str:
    """Joins host and port the way URLs and Go's net.JoinHostPort do (the
    engine's rd_addr_join)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_target(proto: Any, address: Any) -> tuple[str, str]:
    """Validates a dial target (proto, address)."""
    if not isinstance(proto, str) or not proto:
        raise ValueError(f"proto must be a non-empty str such as 'tcp', got {proto!r}")
    if "/" in proto or any(c.isspace() or ord(c) < 0x20 for c in proto):
        raise ValueError(f"invalid proto {proto!r}")
    if not isinstance(address, str) or not address:
        raise ValueError(f"address must be a non-empty str such as '127.0.0.1:8080', got {address!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in address):
        raise ValueError(f"invalid address {address!r}: control characters")
    # A Go agent reads at most 266 bytes of the CONNECT payload "proto/address"
    # and would silently dial a truncated address.
    if len(f"{proto}/{address}".encode()) > 266:
        raise ValueError(f"proto/address is longer than the protocol's 266 bytes: {proto}/{address[:40]}...")
    return proto, address


def client_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"client key must be a non-empty str, got {key!r}")
    return key


def peer_field(name: str, value: Any) -> str:
    """A peer id or token: sent as a header value, so one line of text."""
    if not isinstance(value, str) or not value or any(c in value for c in "\r\n\0") \
            or value != value.strip():
        raise ValueError(f"{name} must be a non-empty single-line str without "
                         f"surrounding spaces, got {value!r}")
    if name in ("id", "peer_id") and len(value.encode()) > 100:
        raise ValueError(f"{name} is longer than 100 bytes: {value[:40]!r}...")
    return value


def parse_peer(peer: Any) -> tuple:
    """``(id, token, url)`` from a tuple or from ``"id:token:url"`` (the Go
    example server's -peers item)."""
    if isinstance(peer, str):
        parts = peer.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith(("ws://", "wss://")):
            raise ValueError(f"a peer is id:token:ws[s]://host:port/path, got {peer!r}")
        peer = tuple(parts)
    if not isinstance(peer, (tuple, list)) or len(peer) != 3:
        raise ValueError(f"a peer is (id, token, url) or 'id:token:url', got {peer!r}")
    pid, token, url = peer
    if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
        raise ValueError(f"peer url must be ws:// or wss://, got {url!r}")
    return peer_field("id", pid), peer_field("token", token), url
