"""Which HTTP proxy an agent goes through: the ``proxy=`` argument, else the
environment, read as Go's ``http.ProxyFromEnvironment`` reads it
(golang.org/x/net/http/httpproxy), since a Go agent in the same place would
take the same way out.

- ``HTTPS_PROXY`` (else ``https_proxy``) applies to ``wss://`` URLs,
  ``HTTP_PROXY`` (else ``http_proxy``) to ``ws://`` ones; the upper-case
  name wins when both are set and non-empty.
- With ``REQUEST_METHOD`` set (a CGI script, where a request's ``Proxy:``
  header arrives as ``HTTP_PROXY``), an ``HTTP_PROXY`` that applies is an
  error, as in Go; ``HTTPS_PROXY`` still applies.
- ``localhost`` and loopback addresses are never proxied.
- ``NO_PROXY`` (else ``no_proxy``) is a comma-separated list: ``*`` (no
  proxy at all), an IP address or a CIDR range, or a domain that matches
  itself and its subdomains (``.example.com`` and ``*.example.com`` only
  the subdomains); an IP address or domain may carry a ``:port``.

Everything here is pure: the environment is a mapping passed in.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping, Optional, Tuple, Union

from . import _options

# RD_PROXY_USERINFO_MAX in csrc/rd_proxy_connect.h.
USERINFO_MAX = 512
# Go's validUserinfo set (net/url), as rd_proxy_connect.c checks it.
_USERINFO_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                            "-._:~!$&'()*+,;=%@")
_HEX = frozenset("0123456789abcdefABCDEF")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def redact(url: str) -> str:
    """The URL with its password replaced by ``xxxxx`` (Go's URL.Redacted)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    userinfo, at, _ = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return (scheme + sep if sep else "") + user + ":xxxxx@" + rest[len(userinfo) + 1:]


def parse_proxy_url(value: Any, name: str = "proxy") -> str:
    """Checks an HTTP proxy URL as the engine will read it
    (rd_proxy_parse_url) and returns it with its scheme: a bare
    ``host[:port]`` gets ``http://``, as Go gives it. ``name`` (the option
    or the environment variable) starts every error message."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str like 'http://host:3128', not {type(value).__name__}")
    shown = redact(value)
    if not value or any(c.isspace() or ord(c) < 0x20 or ord(c) >= 0x7f for c in value):
        raise ValueError(f"{name}: invalid proxy URL {shown!r}: expected http://[USER:PASSWORD@]HOST[:PORT]")
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "http", value
    scheme = scheme.lower()
    if scheme in ("https", "socks5", "socks5h"):
        raise ValueError(f"{name}: {scheme}:// proxies are not supported, only http:// "
                         f"(got {shown!r})")
    if scheme != "http":
        raise ValueError(f"{name}: invalid proxy URL {shown!r}: the scheme must be http://")
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if tail not in ("", "/"):
        raise ValueError(f"{name}: invalid proxy URL {shown!r}: nothing may follow HOST[:PORT] "
                         f"but '/'")
    userinfo, at, hostport = authority.rpartition("@")
    if at:
        if len(userinfo) > USERINFO_MAX:
            raise ValueError(f"{name}: invalid proxy URL {shown!r}: credentials longer than "
                             f"{USERINFO_MAX} bytes")
        bad = sorted(set(userinfo) - _USERINFO_CHARS)
        if bad:
            raise ValueError(f"{name}: invalid proxy URL {shown!r}: percent-encode {bad[0]!r} "
                             f"in the user name or password")
        i = userinfo.find("%")
        while i >= 0:
            escape = userinfo[i + 1:i + 3]
            if len(escape) != 2 or not all(c in _HEX for c in escape):
                raise ValueError(f"{name}: invalid proxy URL {shown!r}: bad %-escape in the "
                                 f"user name or password")
            i = userinfo.find("%", i + 3)
    try:
        _options.split_hostport(hostport, 80)
    except _options.AddrError as exc:
        raise ValueError(f"{name}: invalid proxy URL {shown!r}: "
                         f"{exc.kind.replace('_', ' ')} in {hostport!r}") from None
    return "http://" + rest


# ---------------------------------------------------------------------------
# The environment, Go's way


def _getenv_any(environ: Mapping[str, str], *names: str) -> Tuple[str, str]:
    """(name, value) of the first variable that is set and non-empty."""
    for n in names:
        v = environ.get(n, "")
        if v:
            return n, v
    return "", ""


def _go_split_hostport(s: str) -> Optional[Tuple[str, str]]:
    """Go's net.SplitHostPort; None where it fails."""
    i = s.rfind(":")
    if i < 0:
        return None
    j = k = 0
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or end + 1 != i:
            return None
        host, j, k = s[1:end], 1, end + 1
    else:
        host = s[:i]
        if ":" in host:
            return None
    if "[" in s[j:] or "]" in s[k:]:
        return None
    return host, s[i + 1:]


def _plain(ip: IPAddress) -> IPAddress:
    """The address without a zone, an IPv4-mapped IPv6 address as IPv4 (Go
    compares the 16-byte form of both)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


def _parse_ip(text: str, zone: bool) -> Optional[IPAddress]:
    """Go's net.ParseIP (zone False) or netip.ParseAddr (zone True)."""
    if not zone and "%" in text:
        return None
    try:
        return _plain(ipaddress.ip_address(text))
    except ValueError:
        return None


def _idna(host: str) -> str:
    if host.isascii():
        return host
    labels = []
    for label in host.split("."):
        try:
            labels.append(label.encode("idna").decode("ascii") if label else label)
        except UnicodeError:
            return host
    return ".".join(labels)


def _no_proxy_rules(no_proxy: str) -> Optional[list]:
    """NO_PROXY as matchers: ("cidr", network), ("ip", address, port) and
    ("domain", suffix, port, match_itself); None for "*"."""
    rules: list = []
    for p in no_proxy.split(","):
        p = p.strip().lower()
        if not p:
            continue
        if p == "*":
            return None
        if "/" in p:
            try:
                net: Optional[Network] = ipaddress.ip_network(p, strict=False)
            except ValueError:
                net = None
            if net is not None and "%" not in p:
                rules.append(("cidr", net))
                continue
        split = _go_split_hostport(p)
        if split is not None:
            host, port = split
            if not host:
                continue  # ":1" names no host
        else:
            host, port = p, ""
        ip = _parse_ip(host, zone=False)
        if ip is not None:
            rules.append(("ip", ip, port))
            continue
        if host.startswith("*."):
            host = host[1:]
        itself = not host.startswith(".")
        if itself:
            host = "." + host
        rules.append(("domain", _idna(host), port, itself))
    return rules


def use_proxy(host: str, port: str, no_proxy: str) -> bool:
    """Whether a request to host:port goes through the proxy, given
    NO_PROXY (Go's useProxy): never for localhost or a loopback address."""
    if host == "localhost":
        return False
    ip = _parse_ip(host, zone=True)
    if ip is not None and ip.is_loopback:
        return False
    rules = _no_proxy_rules(no_proxy)
    if rules is None:
        return False
    host = host.strip().lower()
    for rule in rules:
        if rule[0] == "cidr" and ip is not None and ip.version == rule[1].version and ip in rule[1]:
            return False
        if rule[0] == "ip" and ip is not None and ip == rule[1] and rule[2] in ("", port):
            return False
        if rule[0] == "domain" and ip is None:
            _, suffix, rport, itself = rule
            if (host.endswith(suffix) or (itself and host == suffix[1:])) and rport in ("", port):
                return False
    return True


def proxy_from_environment(url: str, environ: Mapping[str, str]) -> Optional[str]:
    """The proxy URL (normalized by parse_proxy_url) a Go agent would use
    for the ws:// or wss:// ``url`` in ``environ``, or None for a direct
    connection. Raises ValueError for a proxy variable that is no http://
    proxy URL (naming the variable; Go would ignore it and connect
    directly) and, as Go does, for HTTP_PROXY under CGI."""
    tls, host, port, _ = _options.parse_ws_url(url)
    if tls:
        name, value = _getenv_any(environ, "HTTPS_PROXY", "https_proxy")
    else:
        name, value = _getenv_any(environ, "HTTP_PROXY", "http_proxy")
        if value and environ.get("REQUEST_METHOD", ""):
            raise ValueError("refusing to use HTTP_PROXY value in CGI environment "
                             "(REQUEST_METHOD is set); see golang.org/s/cgihttpproxy")
    if not value:
        return None
    proxy = parse_proxy_url(value, name)
    _, no_proxy = _getenv_any(environ, "NO_PROXY", "no_proxy")
    return proxy if use_proxy(_idna(host), str(port), no_proxy) else None


def resolve(urls: list, proxy: Any, environ: Mapping[str, str]) -> list:
    """One proxy URL or "" (direct) per server URL: ``proxy`` None reads
    the environment, "" or False means direct, a str is used for every URL
    (as Go's http.ProxyURL, even for loopback servers)."""
    if proxy is None:
        return [proxy_from_environment(u, environ) or "" for u in urls]
    if proxy is False or proxy == "":
        return ["" for _ in urls]
    if proxy is True:
        raise ValueError("proxy must be a URL like 'http://host:3128', None (the environment) "
                         "or '' / False (none), not True")
    value = parse_proxy_url(proxy, "proxy")
    return [value for _ in urls]
