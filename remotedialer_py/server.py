"""The tunnel server: accepts agents over WebSocket and dials through them."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import types
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Tuple, Union

from . import _callbacks, _engine, _options, _runtime  # noqa: F401 - _runtime registers the exit hook
from . import _trace
from . import events as _events
from .tunnel_socket import TunnelSocket

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .option_types import ServerOptions

log = logging.getLogger("remotedialer_py")

# Started, unclosed servers: lets the pytest plugin list what stayed open.
_live: "weakref.WeakSet[Server]" = weakref.WeakSet()

# {name: {((label, value), ...): int | float}}
MetricsDict = dict[str, dict[Tuple[Tuple[str, str], ...], Union[int, float]]]


class Headers(Mapping[str, str]):
    """Read-only request headers with case-insensitive names.

    ``headers["x-tunnel-id"]`` and ``headers.get("X-Tunnel-ID")`` return the
    first value; ``get_all(name)`` returns every value; ``raw`` is the list of
    ``(name, value)`` pairs as received.
    """

    __slots__ = ("_raw", "_first")
    _raw: Tuple[Tuple[str, str], ...]
    _first: dict[str, Tuple[str, str]]

    def __init__(self, pairs: Any = ()) -> None:
        raw = tuple((str(k), str(v)) for k, v in pairs)
        first: dict[str, Tuple[str, str]] = {}
        for k, v in raw:
            first.setdefault(k.lower(), (k, v))
        object.__setattr__(self, "_raw", raw)
        object.__setattr__(self, "_first", first)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Headers are read-only")

    def __getitem__(self, name: str) -> str:
        if not isinstance(name, str):
            raise KeyError(name)
        return self._first[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._first.values())

    def __len__(self) -> int:
        return len(self._first)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._raw if k.lower() == name]

    @property
    def raw(self) -> Tuple[Tuple[str, str], ...]:
        return self._raw

    def __repr__(self) -> str:
        return f"Headers({list(self._raw)!r})"


@dataclasses.dataclass(frozen=True)
class ClientCert:
    """The verified certificate an agent presented (mTLS: ``tls_client_ca``)."""

    subject: str  # RFC 2253, e.g. "CN=agent-1,O=Example"
    sans: Tuple[str, ...]  # ("DNS:agent-1.example", "IP:10.0.0.7", "URI:...", ...)
    sha256: str  # of the certificate's DER, lowercase hex

    @property
    def common_name(self) -> Optional[str]:
        """The subject's CN (the first one), or None."""
        for part in _rfc2253_parts(self.subject):
            name, _, value = part.partition("=")
            if name.strip().upper() == "CN":
                return value
        return None


def _rfc2253_parts(subject: str) -> list[str]:
    """Splits an RFC 2253 name at its unescaped commas, escapes removed."""
    parts, cur, i = [], "", 0
    while i < len(subject):
        ch = subject[i]
        if ch == "\\" and i + 1 < len(subject):
            cur += subject[i + 1]
            i += 2
            continue
        if ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


@dataclasses.dataclass(frozen=True)
class Request:
    """The upgrade request an authorizer decides on. ``headers``: read-only,
    names case-insensitive (``headers.get("x-tunnel-id")``;
    ``headers.get_all(name)`` for every value, ``headers.raw`` the pairs as
    received). ``client_cert``: the agent's verified certificate when the
    server requires one (``tls_client_ca``), so that it can name the client
    key; else None."""

    method: str
    path: str
    headers: Headers
    remote_addr: str  # "ip:port" of the peer
    client_cert: Optional[ClientCert] = None


Authorizer = Callable[[Request], Tuple[str, bool]]


def _metrics_dict(samples: Any) -> MetricsDict:
    out: MetricsDict = {}
    for name, labels, value in samples:
        key = tuple(sorted((str(k), str(v)) for k, v in labels))
        value = float(value)
        out.setdefault(name, {})[key] = int(value) if value.is_integer() else value
    return out


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller() -> Optional[str]:
    """"file:line" of the nearest frame outside this package."""
    frame: Optional[types.FrameType] = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) \
            == _PACKAGE_DIR:
        frame = frame.f_back
    return None if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _resolve_listen(host: str) -> str:
    """Turns a host name into a numeric address for the engine to bind."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return host
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return host
    except OSError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve listen host {host!r}: {exc.strerror}") from None
    # Prefer IPv4, as Go does for "localhost" on most systems.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def _url_host(host: str) -> str:
    """The host a client on this machine reaches a listener on (a wildcard
    address names loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class _Handle:
    """Shared lifecycle of engine objects: start once, close once from any
    thread, ResourceWarning (never resurrection) when dropped unclosed."""

    _kind = "object"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handle: Optional[int] = None
        self._closing = False
        self._closed = threading.Event()
        # The event loop async def callbacks run on (set by the aio classes).
        self._callback_loop: Any = None

    def _live_handle(self) -> int:
        handle = self._handle
        if self._closing:
            raise _engine.ClosedError(f"{self._kind} is closed")
        if handle is None:
            raise RuntimeError(f"{self._kind} is not started; call start() first")
        return handle

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called (or has begun)."""
        return self._closing

    def close(self) -> None:
        """Closes the object and waits until the engine has ended everything it
        owned. Idempotent; safe from any thread (a concurrent caller waits for
        the first one to finish)."""
        if not self._begin_close():
            self._closed.wait()
            return
        try:
            self._close_impl()
        finally:
            self._closed.set()

    def _begin_close(self) -> bool:
        """Marks the object closing; True for the first caller, who must
        close it and then set ``_closed``."""
        with self._lock:
            first = not self._closing
            self._closing = True
        return first

    def _close_impl(self) -> None:
        handle = self._handle
        if handle is None:
            return
        try:
            _engine.close(handle)
        except _engine.ClosedError:
            pass  # already ended by the engine's shutdown
        finally:
            self._released()

    def _released(self) -> None:
        """Bookkeeping once the engine object is closed (or failed to)."""
        if self._handle is not None:
            _callbacks.unregister(self._handle)

    def __del__(self) -> None:
        # getattr: __init__ may have failed before setting the fields.
        if getattr(self, "_handle", None) is None or getattr(self, "_closing", True):
            return
        try:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class Forward(_Handle):
    """A local TCP listener whose every accepted connection is dialed through
    the tunnel to ``proto``/``address`` behind client ``client_key``."""

    _kind = "forward"

    def __init__(self, server: "Server", handle: int, host: str, port: int,
                 client_key: str, proto: str, address: str) -> None:
        super().__init__()
        # A strong reference keeps the server (and its session routing) alive
        # for as long as the forward is in use.
        self._server: Optional["Server"] = server
        self._handle = handle
        self.host = host
        self.port = port
        self.client_key = client_key
        self.proto = proto
        self.address = address

    def _released(self) -> None:
        super()._released()
        self._server = None  # let the server be collected once unused

    def __enter__(self) -> "Forward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return (f"<Forward {_options.format_hostport(self.host, self.port)} -> "
                f"{self.client_key}:{self.proto}/{self.address} {state}>")


def _dialed(args: Tuple[int, str, str, str, float, float],
            result: Tuple[int, int, Any]) -> TunnelSocket:
    """The socket for a dial's (fd, conn_id, status); the fd is closed if that fails."""
    _, key, proto, address, _, _ = args
    fd, conn_id, status = result
    try:
        return TunnelSocket._from_dial(fd, conn_id=conn_id, client_key=key, proto=proto,
                                       address=address, status=status)
    except BaseException:
        os.close(fd)
        raise


def _client_cert(info: Any) -> Optional[ClientCert]:
    if not info:
        return None
    return ClientCert(subject=str(info["subject"]),
                      sans=tuple(line for line in str(info["sans"]).split("\n") if line),
                      sha256=str(info["sha256"]))


def _token_keys(text: str) -> set[str]:
    """The client keys a token table names ("TOKEN CLIENT_KEY" lines)."""
    keys = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not parts[0].startswith("#"):
            keys.add(parts[1])
    return keys


class TokenAuthorizer:
    """The built-in authorizer for real deployments: ``Authorization: Bearer
    TOKEN`` mapped to a client key, checked in the engine in constant time.

    ``TokenAuthorizer(path)`` reads a file of lines ``TOKEN CLIENT_KEY``
    (blank lines and ``#`` comments skipped; tokens of 16 characters or
    more); ``TokenAuthorizer(tokens={"TOKEN": "key"})`` takes them directly.
    ``Server.reload_tokens()`` re-reads the file without a restart. Headers
    such as ``X-Tunnel-ID`` are ignored: the key comes only from the token.
    """

    def __init__(self, path: Any = None, tokens: Optional[Mapping[str, str]] = None) -> None:
        if (path is None) == (tokens is None):
            raise TypeError("TokenAuthorizer takes a path or tokens=, exactly one")
        self.path = None if path is None else _options.path("path", path)
        self._tokens = None if tokens is None else dict(tokens)
        self.text()  # fail early on a bad file or table

    def text(self) -> str:
        """The table in file form (the file re-read now, when there is one)."""
        if self.path is not None:
            with open(self.path, encoding="utf-8") as f:
                return f.read()
        lines = []
        for token, key in (self._tokens or {}).items():
            if not isinstance(token, str) or not isinstance(key, str) or \
                    any(c.isspace() for c in token + key) or len(token) < 16 or not key:
                raise ValueError("tokens must map str tokens of 16+ characters without "
                                 "spaces to non-empty client keys")
            lines.append(f"{token} {key}")
        return "\n".join(lines) + "\n"


_DASHBOARD_PAGE = os.path.join(os.path.dirname(__file__), "dashboard", "index.html")


def _dashboard_credentials(user: Any, password: Any, password_file: Any) -> Optional[tuple]:
    """``(user, password)`` checked, the file's first line read, or None."""
    if password is not None and password_file is not None:
        raise ValueError("dashboard_password and dashboard_password_file exclude each other")
    if password_file is not None:
        path = _options.path("dashboard_password_file", password_file)
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"dashboard_password_file: {exc}") from None
    if user is None and password is None:
        return None
    if user is None or password is None:
        raise ValueError("dashboard_user needs dashboard_password (or dashboard_password_file)")
    if not isinstance(user, str) or not user or ":" in user or \
            any(ord(c) < 0x20 for c in user) or len(user.encode()) > 127:
        raise ValueError("dashboard_user must be a non-empty str of at most 127 bytes "
                         f"without ':' or control characters, got {user!r}")
    if not isinstance(password, str) or not password or "\0" in password or \
            "\n" in password or len(password.encode()) > 255:
        raise ValueError("dashboard_password must be a non-empty single-line str of at "
                         "most 255 bytes")
    return (user, password)


def _dashboard_options(enabled: bool, auth: Optional[tuple]) -> dict:
    """The engine options for the dashboard: its credentials, and the page
    (shipped in the package) when it is on."""
    opts: dict = {}
    if auth is not None:
        opts["dashboard_user"], opts["dashboard_password"] = auth
    if enabled:
        with open(_DASHBOARD_PAGE, "rb") as f:
            opts["dashboard_html"] = f.read()
    return opts


class Server(_Handle):
    """A tunnel server.

    ``Server(listen="127.0.0.1:0", authorizer=None, path="/connect", **options)``

    - ``listen``: ``"host:port"``, ``":port"`` (all IPv4 interfaces),
      ``"[::1]:port"`` or ``(host, port)``; port 0 picks a free port.
    - ``authorizer``: None trusts the ``X-Tunnel-ID`` request header as the
      client key (what the Go example server does: anyone who can reach the
      port can register any key). Or a callable ``f(request) -> (client_key,
      ok)`` where ``request`` is a :class:`Request`; ``ok`` false answers 401
      ``failed authentication``; an exception answers 400 with ``str(exc)``.
      It runs on the pool of callback threads (``set_callback_threads``). Or a
      :class:`TokenAuthorizer` (bearer tokens, checked in the engine).
    - ``peer_id``, ``peer_token``: this server's id in an HA group and the
      token it presents to its peers (both needed for :meth:`add_peer`).
      ``peers``: peers to add at start, as ``(id, token, url)`` tuples or
      ``"id:token:url"`` strings (the Go example server's ``-peers``).
      ``peer_ca_file``: verify ``wss://`` peers against this CA (without
      it, as in Go, a peer's certificate is not verified: the shared token
      authenticates the group).
    - ``dashboard_user`` with ``dashboard_password`` (or
      ``dashboard_password_file``, its first line): HTTP Basic credentials
      for the dashboard (option ``dashboard=True``) and ``/debug/state``.
      With a :class:`TokenAuthorizer` a bearer token of its table is also
      accepted; with no credential the dashboard answers loopback clients
      only.
    - ``options``: keywords from the engine's options table, seconds as
      int or float (``remotedialer-py options`` prints every name with its
      default and meaning). An unknown name raises TypeError, a bad value
      ValueError.
    """

    _kind = "server"

    def __init__(self, listen: Any = "127.0.0.1:0",
                 authorizer: Union[Authorizer, TokenAuthorizer, None] = None,
                 path: str = "/connect", *, peer_id: Optional[str] = None,
                 peer_token: Optional[str] = None, peers: Any = (),
                 peer_ca_file: Any = None, on_connect: Optional[_events.EventCallback] = None,
                 on_disconnect: Optional[_events.EventCallback] = None,
                 on_dial_failed: Optional[_events.EventCallback] = None,
                 dashboard_user: Optional[str] = None,
                 dashboard_password: Optional[str] = None,
                 dashboard_password_file: Any = None,
                 **options: Unpack[ServerOptions]) -> None:
        super().__init__()
        self._dashboard_auth = _dashboard_credentials(dashboard_user, dashboard_password,
                                                      dashboard_password_file)
        self._on_connect = _events.check_callback("on_connect", on_connect)
        self._on_disconnect = _events.check_callback("on_disconnect", on_disconnect)
        self._on_dial_failed = _events.check_callback("on_dial_failed", on_dial_failed)
        self._token_keys: set[str] = set()  # the keys the loaded token table names
        self._peer_id = None if peer_id is None else _options.peer_field("peer_id", peer_id)
        self._peer_token = None if peer_token is None else \
            _options.peer_field("peer_token", peer_token)
        self._initial_peers = [_options.parse_peer(p) for p in peers]
        if self._initial_peers and (self._peer_id is None or self._peer_token is None):
            raise ValueError("peers need this server's peer_id and peer_token")
        self._peer_ca_file = None if peer_ca_file is None else \
            _options.path("peer_ca_file", peer_ca_file)
        self._listen_host, self._listen_port = _options.parse_listen(listen)
        if authorizer is not None and not callable(authorizer) and \
                not isinstance(authorizer, TokenAuthorizer):
            raise TypeError("authorizer must be None, a callable or a TokenAuthorizer, "
                            f"not {type(authorizer).__name__}")
        if not isinstance(path, str) or not path.startswith("/") or \
                any(c.isspace() or ord(c) < 0x20 or c in "?#" for c in path):
            raise ValueError(f"path must be an absolute URL path such as '/connect', got {path!r}")
        self._authorizer = authorizer
        self._path = path
        self._options = _options.validate("Server", _options.SERVER_OPTIONS, options)
        self._host: Optional[str] = None
        self._port: Optional[int] = None
        self._forwards: "weakref.WeakSet[Forward]" = weakref.WeakSet()
        # conn_id -> the socket dial() returned, for the leak report.
        self._dialed: "weakref.WeakValueDictionary[int, TunnelSocket]" = \
            weakref.WeakValueDictionary()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "Server":
        """Binds the listener and starts serving. Returns self; a second call
        does nothing. Raises TunnelError when the address cannot be bound."""
        with self._lock:
            if self._closing:
                raise _engine.ClosedError("server is closed")
            if self._handle is not None:
                return self
            host = _resolve_listen(self._listen_host)
            opts = dict(self._options)
            opts["path"] = self._path
            if self._peer_id is not None:
                opts["peer_id"] = self._peer_id
            if self._peer_token is not None:
                opts["peer_token"] = self._peer_token
            if self._peer_ca_file is not None:
                opts["peer_ca_file"] = self._peer_ca_file
            opts.update(_dashboard_options(opts.get("dashboard", False), self._dashboard_auth))
            # The /client/... route dials through agents for anyone who can
            # reach the port: on by default only in the trust-a-header mode
            # (the Go example server's), off when real authorization is set.
            opts.setdefault("proxy_route", self._authorizer is None)
            opts["auth"] = "header" if self._authorizer is None else "callback"
            if isinstance(self._authorizer, TokenAuthorizer):
                opts["auth"] = "token"
                opts["tokens"] = self._authorizer.text()
                self._token_keys = _token_keys(opts["tokens"])
            opts["events"] = _events.wanted(_events.server_log, self._on_connect,
                                            self._on_disconnect)
            opts["conn_events"] = _events.wanted(_events.conn_log, self._on_dial_failed)
            opts["data_trace"] = _trace.wanted(opts.get("data_trace"))
            if opts["data_trace"]:
                _trace.ensure_reader()
            if (self._authorizer is None or isinstance(self._authorizer, TokenAuthorizer)) \
                    and not opts["events"] and not opts["conn_events"]:
                handle, port = _engine.server_new(host, self._listen_port, opts)
            else:
                with _callbacks.creating():
                    handle, port = _engine.server_new(host, self._listen_port, opts)
                    _callbacks.register(handle, self)
            self._handle, self._host, self._port = handle, host, port
            _live.add(self)
        try:
            for pid, token, url in self._initial_peers:
                self.add_peer(url, pid, token)
        except BaseException:
            self.close()
            raise
        return self

    def _close_impl(self) -> None:
        for fwd in list(self._forwards):
            fwd.close()
        super()._close_impl()

    def _released(self) -> None:
        _live.discard(self)
        super()._released()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- addresses ---------------------------------------------------------

    @property
    def host(self) -> Optional[str]:
        """The bound address (None before start)."""
        return self._host

    @property
    def port(self) -> Optional[int]:
        """The bound port (None before start)."""
        return self._port

    @property
    def path(self) -> str:
        """The WebSocket path agents connect to (``/connect`` by default)."""
        return self._path

    @property
    def url(self) -> str:
        """The URL agents connect to, e.g. ``ws://127.0.0.1:8123/connect``.
        A wildcard bind (0.0.0.0 or ::) is given as the loopback address."""
        self._live_handle()
        scheme = "wss" if "tls_cert" in self._options else "ws"
        hostport = _options.format_hostport(_url_host(self._host or ""), self._port or 0)
        return f"{scheme}://{hostport}{self._path}"

    def reload_tokens(self) -> list[str]:
        """Re-reads the TokenAuthorizer's file (or table); new handshakes use
        it. A client key that no token names any more is revoked: its open
        sessions end, here and on every peer (:meth:`disconnect`), and are
        returned (sorted). Other sessions stay. A bad file raises ValueError
        and changes nothing."""
        if not isinstance(self._authorizer, TokenAuthorizer):
            raise ValueError("the server does not use a TokenAuthorizer")
        handle = self._live_handle()
        text = self._authorizer.text()
        _engine.server_set_tokens(handle, text)
        old, self._token_keys = self._token_keys, _token_keys(text)
        revoked = sorted(old - self._token_keys)
        for key in revoked:
            self.disconnect(key)
        return revoked

    def reload_tls(self, cert: Any = None, key: Any = None, client_ca: Any = None) -> None:
        """Loads a new certificate and key (default: the same paths again, for
        renewed files) for connections accepted from now on; open sessions keep
        theirs. On error (TunnelError) the old certificate stays in use."""
        cert = _options.path("cert", cert if cert is not None else self._options.get("tls_cert"))
        key = _options.path("key", key if key is not None else self._options.get("tls_key"))
        if client_ca is None:
            client_ca = self._options.get("tls_client_ca")
        ca = None if client_ca is None else _options.path("client_ca", client_ca)
        _engine.server_reload_tls(self._live_handle(), cert, key, ca)
        self._options.update(tls_cert=cert, tls_key=key)
        if ca is not None:
            self._options["tls_client_ca"] = ca

    # -- sessions and connections -----------------------------------------

    def list_clients(self) -> list[str]:
        """Sorted client keys that have a live session."""
        return list(_engine.server_clients(self._live_handle()))

    def has_session(self, client_key: str) -> bool:
        """True while ``client_key`` has a live session on this server."""
        return bool(_engine.server_has_session(self._live_handle(), _options.client_key(client_key)))

    def dial(self, client_key: str, proto: str, address: str, timeout: Optional[float] = 10,
             idle_timeout: Optional[float] = None) -> TunnelSocket:
        """Opens a connection to ``address`` through the agent ``client_key``.

        Returns a connected socket as soon as the CONNECT message is sent. A
        failure on the far side (refused, unreachable, not allowed) shows up
        as EOF on the socket, with the text in ``sock.tunnel_error``. Raises
        ClientNotFoundError at once when the key has no session (or when it
        ends while the dial waits).
        ``timeout`` (seconds; None: no limit) bounds the wait for room on a
        session whose queue toward the agent is full (the agent is not
        keeping up): past it, TunnelTimeoutError (also a TimeoutError) and no
        connection. Go's server bounds the write of CONNECT the same way.
        ``idle_timeout`` ends this connection after that many idle seconds
        (None: the server's ``idle_timeout`` option, off by default; for udp
        its ``udp_idle_timeout``, 60 s).
        For proto ``udp`` (``udp4``, ``udp6``) the socket is SOCK_SEQPACKET:
        each send() is one datagram at ``address``, each recv() one from it.
        """
        args = self._dial_args(client_key, proto, address, timeout, idle_timeout)
        sock = _dialed(args, _engine.server_dial(*args))
        self._track(sock)
        return sock

    def _track(self, sock: TunnelSocket) -> None:
        """Notes where a dial came from and keeps it findable for the leak
        report (sync and asyncio dials alike)."""
        sock.dialed_at = _caller()
        if sock.conn_id is not None:
            self._dialed[sock.conn_id] = sock

    def _dial_args(self, client_key: str, proto: str, address: str, timeout: Optional[float],
                   idle_timeout: Optional[float]) -> Tuple[int, str, str, str, float, float]:
        """The engine's dial arguments: (handle, key, proto, address, timeout,
        idle_timeout), idle_timeout 0 for the server's option."""
        handle = self._live_handle()
        key = _options.client_key(client_key)
        proto, address = _options.connect_target(proto, address)
        wait = _options.MAX_SECONDS if timeout is None else _options.duration("timeout", timeout)
        idle = 0.0 if idle_timeout is None else _options.duration("idle_timeout", idle_timeout)
        return handle, key, proto, address, wait, idle

    def forward(self, client_key: str, proto: str, address: str,
                listen: Any = "127.0.0.1:0") -> Forward:
        """Listens on ``listen`` and dials every accepted TCP connection through
        the agent ``client_key`` to ``proto``/``address``. Close the returned
        Forward (or the server) to stop listening. Streams only: a udp
        target raises ValueError (``dial`` carries datagrams)."""
        handle = self._live_handle()
        key = _options.client_key(client_key)
        proto, address = _options.connect_target(proto, address)
        if proto in ("udp", "udp4", "udp6"):
            raise ValueError(f"forward carries streams only: {proto} is a datagram protocol "
                             "(dial it with Server.dial)")
        host, port = _options.parse_listen(listen)
        host = _resolve_listen(host)
        fhandle, bound = _engine.server_forward(handle, key, proto, address, host, port)
        fwd = Forward(self, fhandle, host, bound, key, proto, address)
        with self._lock:
            closing = self._closing
            if not closing:
                self._forwards.add(fwd)
        if closing:  # the server closed while we were creating it
            fwd.close()
            raise _engine.ClosedError("server is closed")
        return fwd

    def disconnect(self, client_key: str) -> int:
        """Ends ``client_key``'s sessions here and asks every peer to end its
        own (a Go peer ignores the request). Returns how many sessions ended
        on this server; the agents reconnect as they would after any drop."""
        return _engine.server_disconnect(self._live_handle(), _options.client_key(client_key))

    def close_idle(self) -> int:
        """Closes the proxy route's idle pooled connections (their agents
        close the target connections) and returns how many; connections in
        use are left alone."""
        return _engine.server_close_idle(self._live_handle())

    # -- HA peering ---------------------------------------------------------

    @property
    def peer_id(self) -> Optional[str]:
        """This server's id in an HA group (``peer_id=``), or None."""
        return self._peer_id

    def add_peer(self, url: str, id: str, token: str) -> None:
        """Adds a peer of the HA group: this server keeps a session open to
        ``url`` (``ws://`` or ``wss://``, the peer's connect path), presenting
        its own ``peer_id``/``peer_token``, announces its agents there and
        takes the peer's dials for them; and it accepts the peer's session
        when that presents ``id`` and ``token``. Adding the same peer again
        does nothing; a new url or token restarts it."""
        # A bad configuration, as Server(peers=...) without them says: a
        # ValueError here rather than the engine's TunnelError (an OSError).
        if self._peer_id is None or self._peer_token is None:
            raise ValueError("add_peer needs this server's peer_id and peer_token")
        pid = _options.peer_field("id", id)
        tok = _options.peer_field("token", token)
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValueError(f"peer url must be ws:// or wss://, got {url!r}")
        # The agent's URL rules (the engine's own): a URL it would refuse is
        # a ValueError, as for Client(url), not a TunnelError.
        from .client import _check_url  # here: client imports this module

        _engine.server_add_peer(self._live_handle(), _check_url(url), pid, tok)

    def remove_peer(self, id: str) -> bool:
        """Removes a peer: closes our session to it and ends the sessions it
        opened to us (its routes go with them). False for an unknown id."""
        return bool(_engine.server_remove_peer(self._live_handle(), _options.peer_field("id", id)))

    def peers(self) -> list[dict]:
        """The configured peers: dicts with id, url, state (``connecting``,
        ``connected`` or ``waiting`` to retry), since (time.time() of the
        last change), attempts, last_error, inbound (sessions the peer has
        open to us) and keys (agent sessions it announced), sorted by id."""
        return sorted((dict(p) for p in _engine.server_peers(self._live_handle())),
                      key=lambda p: p["id"])

    def route(self, client_key: str) -> Optional[str]:
        """Where a dial for ``client_key`` would go now: ``""`` for a local
        session, the id of a peer that announced it, or None."""
        return _engine.server_route(self._live_handle(), _options.client_key(client_key))

    def connections(self) -> list[dict]:
        """Open connections: dicts with id, clientkey, proto, address, age and
        idle (seconds), state, tx_bytes, rx_bytes, paused, buffered."""
        return [dict(c) for c in _engine.server_connections(self._live_handle())]

    # -- metrics ------------------------------------------------------------

    def metrics(self) -> MetricsDict:
        """``{name: {((label, value), ...): number}}``, label pairs sorted by
        label name; numbers are ints when integral."""
        return _metrics_dict(_engine.metrics(self._live_handle()))

    def prometheus(self) -> str:
        """The Prometheus text exposition, as served on ``GET /metrics``."""
        return _engine.prometheus(self._live_handle())

    # -- engine requests ----------------------------------------------------

    def _on_event(self, payload: Any) -> None:
        _events.deliver(self, payload, _events.server_log, self._on_connect, self._on_disconnect,
                        self._on_dial_failed)

    def _answer_request(self, kind: str, payload: Any) -> Tuple[int, str]:
        authorizer = self._authorizer
        if kind != "auth" or authorizer is None or isinstance(authorizer, TokenAuthorizer):
            return _callbacks.Verdict.UNAUTHORIZED, ""
        request = Request(
            method=str(payload.get("method", "")),
            path=str(payload.get("path", "")),
            headers=Headers(payload.get("headers", ())),
            remote_addr=str(payload.get("remote", "")),
            client_cert=_client_cert(payload.get("client_cert")),
        )
        try:
            result = _callbacks.resolve(self, authorizer(request))
        except Exception as exc:  # noqa: BLE001 - the authorizer's way to answer 400
            log.debug("remotedialer-py: authorizer raised for %s", request.remote_addr, exc_info=True)
            text = str(exc) or type(exc).__name__
            return _callbacks.Verdict.ERROR, text[:4096]
        try:
            client_key, ok = result
        except (TypeError, ValueError):
            log.error("remotedialer-py: authorizer returned %r, expected (client_key, ok)", result)
            return _callbacks.Verdict.ERROR, "authorizer error"
        if not ok:
            return _callbacks.Verdict.UNAUTHORIZED, ""
        if not isinstance(client_key, str) or not client_key:
            log.error("remotedialer-py: authorizer accepted with client key %r; expected a non-empty str",
                      client_key)
            return _callbacks.Verdict.ERROR, "authorizer error"
        return _callbacks.Verdict.ACCEPT, client_key

    def __repr__(self) -> str:
        if self._closing:
            state = "closed"
        elif self._handle is None:
            state = "not started"
        else:
            state = f"listening on {_options.format_hostport(self._host or '', self._port or 0)}"
        return f"<Server {state}>"
