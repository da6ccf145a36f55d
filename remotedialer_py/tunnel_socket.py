"""The socket returned by ``Server.dial``.

The engine creates a connected AF_UNIX stream socketpair, keeps one end on its
loop and pipes it into the tunneled connection, and hands us the other end.
For udp the pair is SOCK_SEQPACKET: one send() or recv() is one datagram.
Because it is a real ``socket.socket``, http.client, ssl, selectors and
asyncio all work on it unchanged. Closing it (or dropping it: the socket's
finalizer closes the fd) ends the tunneled connection.
"""

from __future__ import annotations

import socket
from typing import Any

from . import _engine


class TunnelSocket(socket.socket):
    """A connected stream socket whose far end is ``address`` behind the agent.

    Attributes: ``conn_id`` (the tunnel connection id), ``client_key``,
    ``tunnel_proto`` and ``address`` (the dial target, e.g. ``"tcp"`` and
    ``"127.0.0.1:8080"``), ``dialed_at`` (``"file:line"`` of the dial call). ``proto`` keeps its ``socket.socket`` meaning (the
    protocol number), since ssl and others pass it back to the constructor.
    When the far side fails (refused dial, reset, session lost) the socket
    reads EOF and ``tunnel_error`` holds the error text.
    """

    # Class defaults, so that a socket made by dup() or the base constructor
    # is still a complete object.
    conn_id: int | None = None
    client_key: str | None = None
    tunnel_proto: str | None = None
    address: str | None = None
    dialed_at: str | None = None  # "file:line" of the dial() call
    _status: Any = None

    @classmethod
    def _from_dial(cls, fd: int, *, conn_id: int, client_key: str, proto: str,
                   address: str, status: Any) -> "TunnelSocket":
        sock = cls(fileno=fd)
        sock.conn_id = conn_id
        sock.client_key = client_key
        sock.tunnel_proto = proto
        sock.address = address
        sock._status = status
        # A socket made from an fd keeps that fd's blocking flag; make it match
        # what a new Python socket would be (blocking unless a default timeout
        # is set), and keep it out of child processes.
        sock.settimeout(socket.getdefaulttimeout())
        sock.set_inheritable(False)
        return sock

    def dup(self) -> "TunnelSocket":
        """A new socket on the same connection (``socket.dup``), with the
        tunnel attributes; the connection ends when every copy is closed."""
        sock = super().dup()
        sock.conn_id, sock.client_key = self.conn_id, self.client_key
        sock.tunnel_proto, sock.address = self.tunnel_proto, self.address
        sock.dialed_at = self.dialed_at
        sock._status = self._status
        return sock

    @property
    def target(self) -> str | None:
        """``proto/address`` as the CONNECT message names it."""
        if self.tunnel_proto is None:
            return None
        return f"{self.tunnel_proto}/{self.address}"

    @property
    def tunnel_error(self) -> str | None:
        """The far side's error text once the connection ended with an error
        (e.g. ``dial tcp 127.0.0.1:1: connect: connection refused``); None while
        it is open or after a clean close."""
        if self._status is None:
            return None
        return _engine.dial_status(self._status)[1]

    @property
    def tunnel_open(self) -> bool:
        """True while the tunneled connection is open on the engine's side."""
        if self._status is None:
            return False
        return bool(_engine.dial_status(self._status)[0])

    def __repr__(self) -> str:
        base = super().__repr__()
        if self.tunnel_proto is None:
            return base
        return f"{base[:-1]}, tunnel={self.client_key}:{self.target}, conn_id={self.conn_id}>"
