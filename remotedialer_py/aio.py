"""The asyncio API: ``aio.Server`` and ``aio.Client`` beside the blocking ones.

    from remotedialer_py import aio

    async with aio.Server() as srv, \\
            aio.Client(srv.url, headers={"X-Tunnel-ID": "agent-1"}) as cli:
        await cli.wait_connected(timeout=5)
        reader, writer = await srv.open_connection("agent-1", "tcp", "127.0.0.1:8080")

Same constructor arguments and options as the blocking classes (which they
wrap). Calls that wait on the engine (dial, close, wait_connected) are posted
to the engine's loop thread without blocking: each object owns an eventfd,
watched with ``loop.add_reader``, that the loop thread signals as calls
complete; no thread per call, no executor. The other calls are answered by
the loop thread at once and are made directly. An object belongs to the
event loop it was started on.
"""

from __future__ import annotations

import asyncio
import collections
import time
import warnings
from typing import Any, Callable, Generator, Optional, Tuple

from . import _engine
from . import client as _client
from . import server as _server
from .tunnel_socket import TunnelSocket

__all__ = ["Server", "Client", "Forward"]


class _Calls:
    """Engine calls posted from one event loop: an ``_engine.Completer`` whose
    eventfd the loop watches. A Pending stays with the completer until the
    engine is done with it; a result whose Future was cancelled is released
    (a dialed socket closed) as soon as it arrives."""

    # Futures resolved per loop turn: thousands of dials completing together
    # wake their coroutines over several turns, so other callbacks (timers,
    # I/O) get their turn in between.
    BATCH = 64

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.completer = _engine.Completer()
        self._fd = self.completer.fileno()
        self._done: collections.deque = collections.deque()  # collected, not yet resolved
        self._resolving = False
        loop.add_reader(self._fd, self._on_ready)

    def _on_ready(self) -> None:
        self._done.extend(self.completer.collect())
        if not self._resolving:
            self._resolve()

    def _resolve(self) -> None:
        self._resolving = False
        done = self._done
        for _ in range(min(len(done), self.BATCH)):
            pending = done.popleft()
            fut = pending.tag
            if fut.cancelled():
                pending.discard()
            else:
                fut.set_result(None)  # the awaiting coroutine takes the result
        if done:
            self._resolving = True
            self.loop.call_soon(self._resolve)

    async def call(self, post: Callable[..., Any], *args: Any) -> Any:
        """Posts ``post(*args, future)`` and returns the Pending's result."""
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("this object belongs to the event loop it was started on")
        fut = self.loop.create_future()
        pending = post(*args, fut)
        if not pending.done:  # else completed without being queued (e.g. engine shut down)
            try:
                await fut
            except asyncio.CancelledError:
                # Cancelled after the engine answered: release what it gave.
                if fut.done() and not fut.cancelled():
                    pending.discard()
                raise
        return pending.result()

    def close(self, resolve: bool = True) -> None:
        """Stops watching and waits for the calls still queued (the engine
        object is closed first, so they end promptly). resolve: wake their
        coroutines (only on the loop's own thread)."""
        if self._fd < 0:
            return
        self._fd = -1
        if not self.loop.is_closed():
            self.loop.remove_reader(self.completer.fileno())
        self._done.extend(self.completer.shutdown())
        while self._done:
            pending = self._done.popleft()
            fut = pending.tag
            if resolve and not fut.done() and not self.loop.is_closed():
                fut.set_result(None)
            else:
                pending.discard()


async def _aclose(obj: Any, calls: Optional[_Calls], dependents: Any = ()) -> None:
    """The blocking ``close()`` of a server, client or forward, with the
    engine's close posted instead of waited for."""
    if not obj._begin_close():
        obj._closed.wait()  # a close from another thread: it ends promptly
        return
    try:
        for dep in dependents:
            await _aclose(dep, calls)
        handle = obj._handle
        if handle is None:
            return
        try:
            if calls is not None:
                await calls.call(calls.completer.close, handle)
        except _engine.ClosedError:
            pass  # already ended by the engine's shutdown
        finally:
            obj._released()
    finally:
        obj._closed.set()


class _Object:
    """Lifecycle shared by aio.Server and aio.Client around a blocking one."""

    _sync: Any

    def _setup(self, sync: Any) -> None:
        self._sync = sync
        self._calls: Optional[_Calls] = None
        self._close_task: Optional[asyncio.Future] = None

    async def start(self) -> Any:
        """Starts the object on the running event loop (the engine answers at
        once). Returns self; a second call does nothing."""
        if self._calls is None and not self._sync.closed:
            self._calls = _Calls(asyncio.get_running_loop())
            # async def callbacks (authorizer, allow) run on this loop.
            self._sync._callback_loop = asyncio.get_running_loop()
        try:
            self._sync.start()
        except BaseException:
            # Not started, or closed again (a peer it could not add).
            if self._calls is not None and (self._sync._handle is None or self._sync.closed):
                self._calls.close()
                self._calls = None
            raise
        return self

    async def close(self) -> None:
        """Closes the object and waits (without blocking the event loop) until
        the engine has ended everything it owned. Idempotent; cancelling the
        caller does not stop the close."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    def _dependents(self) -> list:
        return []

    async def _close(self) -> None:
        try:
            await _aclose(self._sync, self._calls, self._dependents())
        finally:
            if self._calls is not None:
                self._calls.close()

    def _live(self) -> _Calls:
        self._sync._live_handle()  # ClosedError / not started
        assert self._calls is not None
        return self._calls

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called (or has begun)."""
        return self._sync.closed

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __del__(self) -> None:
        calls = getattr(self, "_calls", None)
        if calls is None:
            return
        sync = self._sync
        if not sync.closed:
            try:
                warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
        try:
            sync.close()
            calls.close(resolve=False)  # maybe not the loop's thread
        except Exception:  # noqa: BLE001
            pass


class Forward:
    """A forward made by :meth:`Server.forward`: ``host``, ``port`` (the local
    listener), ``client_key``, ``proto``, ``address``; ``await close()``."""

    def __init__(self, server: "Server", sync: _server.Forward) -> None:
        self._server = server
        self._sync = sync
        self.host, self.port = sync.host, sync.port
        self.client_key, self.proto, self.address = sync.client_key, sync.proto, sync.address

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called (or has begun)."""
        return self._sync.closed

    async def close(self) -> None:
        """Stops listening; connections already accepted are not ended."""
        await _aclose(self._sync, self._server._calls)

    async def __aenter__(self) -> "Forward":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return repr(self._sync).replace("<Forward", "<aio.Forward", 1)


class _ForwardStart:
    """What ``Server.forward()`` returns: await it for the Forward, or use it
    as ``async with srv.forward(...) as fwd:`` to close it on exit."""

    def __init__(self, server: "Server", args: Tuple[Any, ...]) -> None:
        self._server = server
        self._args = args
        self._fwd: Optional[Forward] = None

    async def _start(self) -> Forward:
        # Binding a listener is answered at once by the engine.
        self._server._live()
        return Forward(self._server, self._server._sync.forward(*self._args))

    def __await__(self) -> Generator[Any, None, Forward]:
        return self._start().__await__()

    async def __aenter__(self) -> Forward:
        self._fwd = await self._start()
        return self._fwd

    async def __aexit__(self, *exc: Any) -> None:
        if self._fwd is not None:
            await self._fwd.close()


class Server(_Object):
    """The tunnel server for asyncio; arguments as :class:`remotedialer_py.Server`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._setup(_server.Server(*args, **kwargs))

    host = property(lambda self: self._sync.host, doc="The bound address (None before start).")
    port = property(lambda self: self._sync.port, doc="The bound port (None before start).")
    path = property(lambda self: self._sync.path, doc="The WebSocket path agents connect to.")
    url = property(lambda self: self._sync.url, doc="The URL agents connect to.")
    peer_id = property(lambda self: self._sync.peer_id,
                       doc="This server's id in an HA group, or None.")

    def _dependents(self) -> list:
        return list(self._sync._forwards)

    async def dial(self, client_key: str, proto: str, address: str,
                   timeout: Optional[float] = 10,
                   idle_timeout: Optional[float] = None) -> TunnelSocket:
        """:meth:`remotedialer_py.Server.dial` as a coroutine: the connected
        socket, non-blocking (ready for ``loop.sock_*`` calls). Raises
        ClientNotFoundError, TunnelTimeoutError, ClosedError likewise.
        Cancelled in flight, the engine's socket is closed when it arrives."""
        args = self._sync._dial_args(client_key, proto, address, timeout, idle_timeout)
        calls = self._live()
        sock = _server._dialed(args, await calls.call(calls.completer.dial, *args))
        self._sync._track(sock)
        sock.setblocking(False)
        return sock

    async def open_connection(self, client_key: str, proto: str, address: str, *,
                              timeout: Optional[float] = 10,
                              idle_timeout: Optional[float] = None,
                              **kwargs: Any) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Dials and returns ``asyncio.open_connection(sock=...)``'s (reader,
        writer); ``kwargs`` go to it (e.g. ``limit``). To read the far
        side's error (``tunnel_error``), dial and open the streams on the
        socket yourself."""
        sock = await self.dial(client_key, proto, address, timeout=timeout,
                               idle_timeout=idle_timeout)
        try:
            return await asyncio.open_connection(sock=sock, **kwargs)
        except BaseException:
            sock.close()
            raise

    def forward(self, client_key: str, proto: str, address: str,
                listen: Any = "127.0.0.1:0") -> _ForwardStart:
        """``await srv.forward(...)`` for a :class:`Forward`, or ``async with
        srv.forward(...) as fwd:`` to close it on exit."""
        return _ForwardStart(self, (client_key, proto, address, listen))

    # Answered by the engine's loop thread at once.

    async def add_peer(self, url: str, id: str, token: str) -> None:
        """:meth:`remotedialer_py.Server.add_peer`."""
        self._live()
        self._sync.add_peer(url, id, token)

    async def remove_peer(self, id: str) -> bool:
        """:meth:`remotedialer_py.Server.remove_peer`."""
        self._live()
        return self._sync.remove_peer(id)

    async def peers(self) -> list[dict]:
        """:meth:`remotedialer_py.Server.peers`."""
        self._live()
        return self._sync.peers()

    async def route(self, client_key: str) -> Optional[str]:
        """:meth:`remotedialer_py.Server.route`."""
        self._live()
        return self._sync.route(client_key)

    async def disconnect(self, client_key: str) -> int:
        """:meth:`remotedialer_py.Server.disconnect`."""
        self._live()
        return self._sync.disconnect(client_key)

    def reload_tokens(self) -> None:
        """:meth:`remotedialer_py.Server.reload_tokens` (answered at once;
        not a coroutine)."""
        self._sync.reload_tokens()

    def reload_tls(self, cert: Any = None, key: Any = None, client_ca: Any = None) -> None:
        """:meth:`remotedialer_py.Server.reload_tls` (not a coroutine)."""
        self._sync.reload_tls(cert, key, client_ca)

    def list_clients(self) -> list[str]:
        """:meth:`remotedialer_py.Server.list_clients` (not a coroutine)."""
        return self._sync.list_clients()

    def has_session(self, client_key: str) -> bool:
        """:meth:`remotedialer_py.Server.has_session` (not a coroutine)."""
        return self._sync.has_session(client_key)

    def connections(self) -> list[dict]:
        """:meth:`remotedialer_py.Server.connections` (not a coroutine)."""
        return self._sync.connections()

    def metrics(self) -> _server.MetricsDict:
        """:meth:`remotedialer_py.Server.metrics` (not a coroutine)."""
        return self._sync.metrics()

    def prometheus(self) -> str:
        """:meth:`remotedialer_py.Server.prometheus` (not a coroutine)."""
        return self._sync.prometheus()

    def __repr__(self) -> str:
        return repr(self._sync).replace("<Server", "<aio.Server", 1)


class Client(_Object):
    """The agent for asyncio; arguments as :class:`remotedialer_py.Client`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._setup(_client.Client(*args, **kwargs))

    url = property(lambda self: self._sync.url, doc="The first server URL.")
    urls = property(lambda self: self._sync.urls,
                    doc="Every server URL, in the order they are tried.")
    current_url = property(lambda self: self._sync.current_url,
                           doc="The URL of the session that is up, or of the attempt in "
                               "progress (None before start and after close).")
    connected = property(lambda self: self._sync.connected,
                         doc="True while a session with the server is up.")
    last_error = property(lambda self: self._sync.last_error,
                          doc="Why the last connection attempt or session failed, or None.")

    async def wait_connected(self, timeout: Optional[float] = 5) -> None:
        """Waits until a session is up; TimeoutError after ``timeout`` seconds
        (None waits forever), ClosedError when the client is closed meanwhile."""
        sync = self._sync
        handle = sync._live_handle()
        calls = self._live()
        timeout = sync._wait_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # In slices, so that a cancelled wait leaves little behind in the engine.
            left = _client._WAIT_SLICE if deadline is None else \
                max(0.0, deadline - time.monotonic())
            if await calls.call(calls.completer.wait_connected, handle,
                                min(left, _client._WAIT_SLICE)):
                return
            if sync.closed:
                raise _engine.ClosedError("client is closed")
            if deadline is not None and time.monotonic() >= deadline:
                raise sync._not_connected(timeout)

    def metrics(self) -> _server.MetricsDict:
        """:meth:`remotedialer_py.Client.metrics` (not a coroutine)."""
        return self._sync.metrics()

    def prometheus(self) -> str:
        """:meth:`remotedialer_py.Client.prometheus` (not a coroutine)."""
        return self._sync.prometheus()

    def __repr__(self) -> str:
        return repr(self._sync).replace("<Client", "<aio.Client", 1)
