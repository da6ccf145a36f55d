"""The keyword options of Server and Client as TypedDicts, for type checkers.

Generated from the engine's option table by ``make docs`` (remotedialer_py
._optdoc); tests/test_optdoc.py fails when it differs. At run time the engine
checks every value itself."""

from __future__ import annotations

import os
from typing import TypedDict, Union

__all__ = ["ServerOptions", "ClientOptions"]


class ServerOptions(TypedDict, total=False):
    """Keyword options of ``Server``: see the README's options table."""

    read_timeout: float
    """a session that receives nothing this long ends (default 60)."""
    idle_timeout: float
    """end connections idle this long (0: never) (default off)."""
    udp_idle_timeout: float
    """end udp connections idle this long (0: never) (default 60)."""
    max_connections: int
    """open connections per session (default 65536)."""
    max_message: int
    """largest WebSocket message accepted (default 16 MiB)."""
    max_buffer: int
    """bytes held for one connection above which the peer gets PAUSE (default 2 MiB)."""
    hard_cap: int
    """bytes held for one connection past which it ends (default 64 MiB)."""
    data_trace: bool
    """log each tunnel message sent and received on `remotedialer_py.conn` (DEBUG) (default False (True with `CATTLE_TUNNEL_DATA_DEBUG=true`))."""
    handshake_timeout: float
    """TLS handshake and HTTP upgrade request together (default 5)."""
    sync_grace: float
    """connections younger than this survive a SYNC_CONNECTIONS that omits them (default 60)."""
    auth_header: str
    """the header naming the client key when `authorizer` is None (default X-Tunnel-ID)."""
    proxy_route: bool
    """serve `/client/{id}/{scheme}/{host}/{path}` and `/stream/{id}/{proto}/{address}` (remote forwards) (default True with `authorizer=None`, else False)."""
    proxy_pool_per_target: int
    """the route's idle tunneled connections kept per client key and target (default 16)."""
    proxy_pool_max: int
    """the route's idle tunneled connections kept in all (past it the oldest closes) (default 256)."""
    proxy_pool_idle_timeout: float
    """close the route's idle pooled connections, and idle kept-alive clients, after this (0: no pool) (default 90)."""
    proxy_ca_file: Union[str, os.PathLike[str]]
    """https targets of the route: trust these PEM CAs (default the system store)."""
    proxy_insecure: bool
    """https targets of the route: skip certificate verification (default False)."""
    metrics_route: bool
    """serve `GET /metrics` (default True)."""
    debug_route: bool
    """serve `GET /debug/connections`, `GET /debug/peers` and `GET /debug/state` (JSON) (default False)."""
    dashboard: bool
    """serve the dashboard at `/ui/`, `GET /debug/state` and its actions (see Dashboard) (default False)."""
    tls_cert: Union[str, os.PathLike[str]]
    """PEM certificate, leaf first, then intermediates: serve `wss://` (default none (plain `ws://`))."""
    tls_key: Union[str, os.PathLike[str]]
    """unencrypted PEM private key for `tls_cert` (default none)."""
    tls_client_ca: Union[str, os.PathLike[str]]
    """require client certificates signed by these PEM CAs (default none)."""
    max_sessions: int
    """sessions in all (default 65536)."""
    max_sessions_per_key: int
    """sessions per client key (default 64)."""
    max_head: int
    """bytes in an upgrade request's head (default 16384)."""
    max_headers: int
    """header lines in an upgrade request's head (default 64)."""


class ClientOptions(TypedDict, total=False):
    """Keyword options of ``Client``: see the README's options table."""

    read_timeout: float
    """a session that receives nothing this long ends (default 60)."""
    idle_timeout: float
    """end connections idle this long (0: never) (default off)."""
    udp_idle_timeout: float
    """end udp connections idle this long (0: never) (default 60)."""
    max_connections: int
    """open connections per session (default 65536)."""
    max_message: int
    """largest WebSocket message accepted (default 16 MiB)."""
    max_buffer: int
    """bytes held for one connection above which the peer gets PAUSE (default 2 MiB)."""
    hard_cap: int
    """bytes held for one connection past which it ends (default 64 MiB)."""
    data_trace: bool
    """log each tunnel message sent and received on `remotedialer_py.conn` (DEBUG) (default False (True with `CATTLE_TUNNEL_DATA_DEBUG=true`))."""
    handshake_timeout: float
    """TLS handshake and HTTP upgrade together, per attempt (default 10)."""
    ping_interval: float
    """WebSocket Ping period (default 5)."""
    sync_interval: float
    """SYNC_CONNECTIONS period (default 60)."""
    backoff_min: float
    """first wait before reconnecting (default 0.5)."""
    backoff_max: float
    """longest wait between reconnects (default 5)."""
    dial_timeout: float
    """local dials behind the agent (default 60)."""
    max_pending_dials: int
    """local dials in flight per session (default 1024)."""
    ca_file: Union[str, os.PathLike[str]]
    """wss: trust these PEM CAs (default the system store)."""
    insecure: bool
    """wss: skip certificate verification (default False)."""
    client_cert: Union[str, os.PathLike[str]]
    """wss: present this PEM certificate (default none)."""
    client_key: Union[str, os.PathLike[str]]
    """wss: private key for `client_cert` (default none)."""
    server_name: str
    """wss: the name to verify and send as SNI (default the URL's host)."""
