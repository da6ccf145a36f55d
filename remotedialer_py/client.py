"""The tunnel client (agent): connects out to a server and serves its dials."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Tuple, Union

from . import _callbacks, _engine, _options, _proxy
from . import _trace
from . import events as _events
from .server import MetricsDict, _Handle, _metrics_dict

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .option_types import ClientOptions

log = logging.getLogger("remotedialer_py")

# Started, unclosed clients: lets the pytest plugin list what stayed open.
_live: "weakref.WeakSet[Client]" = weakref.WeakSet()

Allow = Union[None, str, Iterable[str], Callable[[str, str], bool]]
Dialer = Callable[[str, str], Any]  # f(proto, address) -> socket.socket (or a coroutine of one)

# Slice long waits so that a KeyboardInterrupt reaches the main thread
# promptly: the engine waits with the GIL released and cannot see signals.
_WAIT_SLICE = 0.5


def _check_url(url: Any) -> str:
    """The URL as given, when the engine will accept it (the same rules:
    _options.parse_ws_url is its rd_addr_parse_url)."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str like 'ws://host:port/connect', not {type(url).__name__}")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ValueError(f"invalid server URL {url!r}: contains whitespace or control characters")
    try:
        _options.parse_ws_url(url)
    except _options.AddrError as exc:
        if exc.kind == "bad_scheme":
            raise ValueError(f"invalid server URL {url!r}: expected ws://HOST[:PORT]/PATH") from None
        raise ValueError(f"invalid server URL {url!r}: {exc.kind.replace('_', ' ')} "
                         f"in {exc.text!r}") from None
    return url


def _check_headers(headers: Any) -> list[Tuple[str, str]]:
    if headers is None:
        return []
    try:
        pairs = [tuple(p) for p in (headers.items() if isinstance(headers, Mapping) else headers)]
    except TypeError:
        raise TypeError("headers must be a dict or a list of (name, value) pairs") from None
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"headers must be (name, value) pairs, got {pair!r}")
        name, value = pair
        _options.header_name("header name", name)
        if not isinstance(value, str):
            raise ValueError(f"header {name!r} must have a str value, not {type(value).__name__}")
        # CR/LF would let a value inject headers into the handshake.
        if any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in value):
            raise ValueError(f"header {name!r} contains control characters")
        out.append((name, value))
    return out


def _check_allow(allow: Allow) -> Tuple[str, list[str], Optional[Callable[[str, str], bool]]]:
    """Returns the engine's (allow mode, patterns, callable)."""
    if allow is None:
        return "all", [], None
    if callable(allow):
        return "callback", [], allow
    if isinstance(allow, str):
        allow = [allow]
    try:
        patterns = list(allow)
    except TypeError:
        raise TypeError("allow must be None, a callable(proto, address) -> bool, "
                        "or a list of 'proto/host:port' patterns") from None
    for p in patterns:
        if not isinstance(p, str) or "/" not in p or p.startswith("/"):
            raise ValueError(f"allow pattern {p!r} must look like 'tcp/127.0.0.1:*' (proto/host:port)")
    return "patterns", patterns, None


def _adopt(sock: Any) -> Tuple[int, str]:
    """A dialer's result as (descriptor, "") once it is known to be a
    connected socket (detached: the engine owns it now), else (-1, why)."""
    if not isinstance(sock, socket.socket):
        return -1, f"dialer returned {type(sock).__name__}, not a connected socket.socket"
    if isinstance(sock, ssl.SSLSocket):
        sock.close()
        return -1, "dialer returned an ssl.SSLSocket; the tunnel needs the plain socket"
    if sock.fileno() < 0:
        return -1, "dialer returned a closed socket"
    try:
        sock.getpeername()
    except OSError as exc:
        sock.close()
        return -1, f"dialer returned a socket that is not connected ({exc.strerror or exc})"
    return sock.detach(), ""


class Client(_Handle):
    """A tunnel client (the agent).

    ``Client(url, headers=None, allow=None, proxy=None, **options)``

    - ``url``: the server's ``ws://host:port/path``, or a list of them for
      an HA group whose servers the agent reaches directly: a failed
      attempt moves on to the next URL at once, the backoff grows once all
      have failed, and a lost session is retried on its own URL first.
    - ``headers``: dict or list of pairs sent with the handshake, e.g.
      ``{"X-Tunnel-ID": "agent-1"}`` for a server that trusts that header.
    - ``allow``: which dials this agent serves. None allows everything; a list
      of patterns like ``"tcp/127.0.0.1:*"`` (``*`` matches any run of
      characters) allows the matching ``proto/address``; a callable
      ``f(proto, address) -> bool`` decides each one (it runs on the pool of
      callback threads, see ``set_callback_threads``; an exception counts as
      a refusal). A refused dial is
      answered with the error ``connect not allowed`` for that connection.
      A unix socket path is judged, and dialed, cleaned ("." and ".."
      resolved, "//" collapsed): ``"unix//run/ok/*"`` does not allow
      ``/run/ok/../secret.sock``, and the callable sees ``/run/secret.sock``.
    - ``dialer``: the agent's own dialer, ``f(proto, address) ->
      socket.socket`` (connected; TCP or unix stream), called for each
      allowed target in place of the engine's dial (on the callback
      threads, like ``allow``; may be ``async def``). The engine takes over
      the socket. An exception's text, or a note that the result was not a
      connected socket, is the connection's error on the server side;
      ``dial_timeout`` bounds the wait for it.
    - ``proxy``: an HTTP proxy to reach the servers through, with CONNECT:
      ``"http://[user:password@]host[:port]"`` (port 80 by default; the
      credentials, percent-encoded, go as Basic Proxy-Authorization). None
      (the default) reads the environment once, here, as Go's
      ``http.ProxyFromEnvironment`` does: ``HTTPS_PROXY`` for wss:// URLs,
      ``HTTP_PROXY`` for ws://, lower-case names too, ``NO_PROXY``
      exclusions, never for localhost or loopback addresses. ``""`` or
      False: no proxy, whatever the environment says.
    - ``options``: keywords from the engine's options table, seconds as
      int or float (``remotedialer-py options`` prints every name with its
      default and meaning).

    After ``start()`` it connects, and reconnects with backoff whenever the
    session is lost, until ``close()``.
    """

    _kind = "client"

    def __init__(self, url: Any, headers: Any = None, allow: Allow = None, proxy: Any = None,
                 *, dialer: Optional[Dialer] = None,
                 on_connect: Optional[_events.EventCallback] = None,
                 on_disconnect: Optional[_events.EventCallback] = None,
                 on_dial_failed: Optional[_events.EventCallback] = None, **options: Unpack[ClientOptions]) -> None:
        super().__init__()
        self._on_connect = _events.check_callback("on_connect", on_connect)
        self._on_disconnect = _events.check_callback("on_disconnect", on_disconnect)
        self._on_dial_failed = _events.check_callback("on_dial_failed", on_dial_failed)
        if isinstance(url, (list, tuple)):
            if not url:
                raise ValueError("url: an empty list of server URLs")
            if len(url) > 64:
                raise ValueError("url: at most 64 server URLs")
            self._urls = [_check_url(u) for u in url]
        else:
            self._urls = [_check_url(url)]
        self._url = self._urls[0]
        self._headers = _check_headers(headers)
        self._proxies = _proxy.resolve(self._urls, proxy, os.environ)
        self._allow_mode, self._patterns, self._allow_fn = _check_allow(allow)
        if dialer is not None and not callable(dialer):
            raise TypeError("dialer must be None or a callable(proto, address) -> socket.socket, "
                            f"not {type(dialer).__name__}")
        self._dialer = dialer
        self._options = _options.validate("Client", _options.CLIENT_OPTIONS, options)
        lo = self._options.get("backoff_min", _options.default("Client", "backoff_min"))
        hi = self._options.get("backoff_max", _options.default("Client", "backoff_max"))
        if lo > hi:
            raise ValueError(f"backoff_min ({lo}) must not exceed backoff_max ({hi})")

    @property
    def url(self) -> str:
        """The first server URL."""
        return self._url

    @property
    def urls(self) -> list[str]:
        """Every server URL, in the order they are tried."""
        return list(self._urls)

    @property
    def proxies(self) -> list[Optional[str]]:
        """Per server URL, the proxy it is reached through (its password
        redacted), or None for a direct connection."""
        return [_proxy.redact(p) if p else None for p in self._proxies]

    @property
    def current_url(self) -> Optional[str]:
        """The URL of the session that is up, or of the attempt in progress
        (None before start and after close)."""
        handle = self._handle
        if handle is None or self._closing:
            return None
        try:
            return _engine.client_state(handle)[2]
        except _engine.ClosedError:
            return None

    def start(self) -> "Client":
        """Starts connecting (in the background). Returns self; a second call
        does nothing. Raises TunnelError for a URL the engine cannot use."""
        with self._lock:
            if self._closing:
                raise _engine.ClosedError("client is closed")
            if self._handle is not None:
                return self
            opts = dict(self._options)
            opts["allow"] = self._allow_mode
            opts["dialer"] = self._dialer is not None
            if any(self._proxies):
                opts["proxies"] = list(self._proxies)
            if self._allow_mode == "patterns":
                opts["patterns"] = list(self._patterns)
            opts["events"] = _events.wanted(_events.client_log, self._on_connect,
                                            self._on_disconnect)
            opts["conn_events"] = _events.wanted(_events.conn_log, self._on_dial_failed)
            opts["data_trace"] = _trace.wanted(opts.get("data_trace"))
            if opts["data_trace"]:
                _trace.ensure_reader()
            if (self._allow_fn is None and self._dialer is None and not opts["events"]
                    and not opts["conn_events"]):
                handle = _engine.client_new(list(self._urls), list(self._headers), opts)
            else:
                with _callbacks.creating():
                    handle = _engine.client_new(list(self._urls), list(self._headers), opts)
                    _callbacks.register(handle, self)
            self._handle = handle
            _live.add(self)
        return self

    def _released(self) -> None:
        _live.discard(self)
        super()._released()

    def __enter__(self) -> "Client":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while a session with the server is up."""
        handle = self._handle
        if handle is None or self._closing:
            return False
        try:
            return bool(_engine.client_connected(handle))
        except _engine.ClosedError:
            return False

    @property
    def last_error(self) -> Optional[str]:
        """Why the last connection attempt or session failed (e.g. the
        server's 401), or None."""
        handle = self._handle
        if handle is None or self._closing or not hasattr(_engine, "client_state"):
            return None
        try:
            return _engine.client_state(handle)[1] or None
        except _engine.ClosedError:
            return None

    def wait_connected(self, timeout: Optional[float] = 5) -> None:
        """Waits until a session is up; raises TimeoutError after ``timeout``
        seconds (None waits forever)."""
        handle = self._live_handle()
        timeout = self._wait_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _WAIT_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
            if _engine.client_wait_connected(handle, min(left, _WAIT_SLICE)):
                return
            if self._closing:
                raise _engine.ClosedError("client is closed")
            if deadline is not None and time.monotonic() >= deadline:
                raise self._not_connected(timeout)

    def _wait_timeout(self, timeout: Optional[float]) -> Optional[float]:
        """wait_connected's timeout, checked (None: no limit)."""
        if timeout is None:
            return None
        return 0.0 if timeout == 0 else _options.duration("timeout", timeout)

    def _not_connected(self, timeout: Optional[float]) -> TimeoutError:
        why = self.last_error
        where = self._url if len(self._urls) == 1 else "any of " + ", ".join(self._urls)
        return TimeoutError(f"not connected to {where} within {timeout:g} s"
                            + (f" (last error: {why})" if why else ""))

    def metrics(self) -> MetricsDict:
        """Same shape as ``Server.metrics()``; the agent's own counters."""
        return _metrics_dict(_engine.metrics(self._live_handle()))

    def prometheus(self) -> str:
        """The agent's counters in the Prometheus text exposition (the
        server's ``GET /metrics`` format)."""
        return _engine.prometheus(self._live_handle())

    def _on_event(self, payload: Any) -> None:
        _events.deliver(self, payload, _events.client_log, self._on_connect, self._on_disconnect,
                        self._on_dial_failed)

    def _answer_request(self, kind: str, payload: Any) -> Tuple[int, str]:
        fn = self._allow_fn
        if kind != "connect" or fn is None:
            return _callbacks.Verdict.REFUSE, ""
        proto, address = payload
        try:
            allowed = bool(_callbacks.resolve(self, fn(proto, address)))
        except Exception:  # noqa: BLE001 - a failing authorizer refuses
            log.warning("remotedialer-py: connect authorizer raised for %s/%s; refusing",
                        proto, address, exc_info=True)
            return _callbacks.Verdict.REFUSE, ""
        return (_callbacks.Verdict.ALLOW if allowed else _callbacks.Verdict.REFUSE), ""

    def _dial(self, proto: str, address: str) -> Tuple[int, str]:
        """Runs the dialer: (the socket's descriptor, detached, "") or (-1,
        the error text for the server)."""
        fn = self._dialer
        if fn is None:
            return -1, "no dialer"
        try:
            sock = _callbacks.resolve(self, fn(proto, address))
        except Exception as exc:  # noqa: BLE001 - its text goes to the server
            log.info("remotedialer-py: dialer raised for %s/%s: %r", proto, address, exc)
            return -1, str(exc) or type(exc).__name__
        return _adopt(sock)

    def __repr__(self) -> str:
        if self._closing:
            state = "closed"
        elif self._handle is None:
            state = "not started"
        else:
            state = "connected" if self.connected else "connecting"
        return f"<Client {self._url} {state}>"
