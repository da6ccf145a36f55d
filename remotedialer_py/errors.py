"""Exceptions raised by remotedialer-py.

All of them are defined by the C extension, so an error raised deep in the
engine and one raised by the Python wrapper are the same classes:

- ``TunnelError`` (a subclass of ``OSError``): the base of every tunnel
  failure; ``str(exc)`` is the message, worded like the Go library's where one
  exists (e.g. ``listen tcp 127.0.0.1:80: address already in use``).
- ``ClientNotFoundError(TunnelError)``: ``Server.dial``/``forward`` to a client
  key with no live session; the message is exactly
  ``failed to find Session for client KEY``.
- ``ClosedError(TunnelError)``: the Server, Client or Forward was already
  closed.
- ``TunnelTimeoutError(TunnelError, TimeoutError)``: ``Server.dial`` waited
  its ``timeout`` for room on an agent's session whose queue toward the agent
  stayed full; no connection was made.

Bad arguments raise the usual ``TypeError``/``ValueError``; a
``Client.wait_connected`` that runs out of time raises the built-in
``TimeoutError``. A dial whose far side fails does not raise: the socket reads
EOF and ``TunnelSocket.tunnel_error`` holds the far side's error text.
"""

from ._engine import ClientNotFoundError, ClosedError, TunnelError, TunnelTimeoutError

__all__ = ["TunnelError", "ClientNotFoundError", "ClosedError", "TunnelTimeoutError"]
