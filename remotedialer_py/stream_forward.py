"""Remote forwards: a local port that reaches through a running server.

``RemoteForward(server_url, key, proto, address)`` listens locally (like
``kubectl port-forward``); each accepted connection opens
``GET /stream/{key}/{proto}/{address}`` with ``Upgrade: tcp`` on the server
and, after its ``101 Switching Protocols``, is a raw byte stream through the
agent ``key`` to ``proto``/``address``. The engine moves the bytes; Python
only starts and stops the forward. The server serves the route when its
``proxy_route`` option is on.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from . import _engine, _options
from .client import _check_headers
from .server import _Handle


_STREAM_PROTOS = ("tcp", "tcp4", "tcp6", "unix")


def check_target(key: Any, proto: Any, address: Any) -> tuple[str, str, str]:
    """(key, proto, address) as the stream route takes them, or ValueError:
    a stream protocol, and HOST:PORT for tcp."""
    key = _options.client_key(key)
    proto, address = _options.connect_target(proto, address)
    if proto not in _STREAM_PROTOS:
        raise ValueError(f"proto {proto!r}: the stream route carries {', '.join(_STREAM_PROTOS)}")
    if proto != "unix":
        try:
            _options.split_hostport(address)
        except _options.AddrError as exc:
            raise ValueError(f"address {address!r}: expected HOST:PORT "
                             f"({exc.kind.replace('_', ' ')})") from None
    return key, proto, address


class RemoteForward(_Handle):
    """``RemoteForward(server_url, key, proto, address, listen="127.0.0.1:0",
    headers=None, ca_file=None, timeout=10.0)``, listening once constructed.

    - ``server_url``: the server, ``http://host:port`` or ``https://...``
      (a path is a prefix the route sits under, for a reverse proxy).
    - ``headers``: dict or (name, value) pairs sent with every request,
      e.g. ``{"Authorization": "Bearer ..."}``.
    - ``ca_file``: https: trust these CAs instead of the system store.
    - ``timeout``: seconds for each connection's dial, TLS and answer.

    ``port`` is the bound port. A refused connection (no agent ``key``, a
    bad destination) is closed; ``stats()["last_error"]`` has the server's
    status line and text. Use as a context manager, or ``close()``.
    """

    _kind = "remote forward"

    def __init__(self, server_url: str, key: str, proto: str, address: str,
                 listen: Any = "127.0.0.1:0", headers: Any = None,
                 ca_file: Optional[str] = None, timeout: float = 10.0) -> None:
        super().__init__()
        if not isinstance(server_url, str) or not server_url.startswith(("http://", "https://")):
            raise ValueError(f"server_url must be an http:// or https:// URL, got {server_url!r}")
        self.server_url = server_url
        self.key, self.proto, self.address = check_target(key, proto, address)
        host, port = _options.parse_listen(listen)
        lines = "".join(f"{name}: {value}\r\n" for name, value in _check_headers(headers))
        if ca_file is not None:
            ca_file = os.fspath(ca_file)
        timeout_ms = int(_options.duration("timeout", timeout) * 1000)
        self._handle, self.port = _engine.stream_forward(server_url, self.key, self.proto,
                                                         self.address, host, port, lines,
                                                         ca_file, timeout_ms)
        self.host = host

    def stats(self) -> dict[str, Any]:
        """``accepted``, ``joined`` (got their 101), ``failed``, ``open``
        (local connections not yet closed) and ``last_error``."""
        return _engine.stream_forward_stats(self._live_handle())

    def __enter__(self) -> "RemoteForward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return (f"<RemoteForward {_options.format_hostport(self.host, getattr(self, 'port', 0))}"
                f" -> {self.key} {self.proto} {self.address} via {self.server_url} {state}>")
