"""remotedialer-py: a reverse tunnel wire-compatible with rancher/remotedialer.

    from remotedialer_py import Server, Client

    with Server(listen="127.0.0.1:0") as srv, \\
            Client(srv.url, headers={"X-Tunnel-ID": "agent-1"}) as cli:
        cli.wait_connected(timeout=5)
        sock = srv.dial("agent-1", "tcp", "127.0.0.1:8080")

The names below are imported on first use, so importing the package (as the
pytest plugin does in every test session) does not load the C extension.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Server",
    "Client",
    "Request",
    "ClientCert",
    "Forward",
    "RemoteForward",
    "TokenAuthorizer",
    "TunnelSocket",
    "TunnelError",
    "ClientNotFoundError",
    "ClosedError",
    "TunnelTimeoutError",
    "errors",
    "aio",
    "engine_stats",
    "engine_trim",
    "set_callback_threads",
    "__version__",
]

# name -> (submodule, attribute or None for the module itself)
_LAZY = {
    "Server": ("server", "Server"),
    "Request": ("server", "Request"),
    "ClientCert": ("server", "ClientCert"),
    "Forward": ("server", "Forward"),
    "RemoteForward": ("stream_forward", "RemoteForward"),
    "TokenAuthorizer": ("server", "TokenAuthorizer"),
    "Client": ("client", "Client"),
    "TunnelSocket": ("tunnel_socket", "TunnelSocket"),
    "TunnelError": ("errors", "TunnelError"),
    "ClientNotFoundError": ("errors", "ClientNotFoundError"),
    "ClosedError": ("errors", "ClosedError"),
    "TunnelTimeoutError": ("errors", "TunnelTimeoutError"),
    "errors": ("errors", None),
    "aio": ("aio", None),
    "engine_stats": ("_runtime", "engine_stats"),
    "set_callback_threads": ("_callbacks", "set_pool_size"),
}

if TYPE_CHECKING:  # pragma: no cover - static analysers see plain imports
    from . import aio, errors
    from ._callbacks import set_pool_size as set_callback_threads
    from ._runtime import engine_stats
    from .client import Client
    from .errors import ClientNotFoundError, ClosedError, TunnelError, TunnelTimeoutError
    from .server import ClientCert, Forward, Request, Server, TokenAuthorizer
    from .stream_forward import RemoteForward
    from .tunnel_socket import TunnelSocket


def engine_trim() -> None:
    """Returns the engine's idle pools (I/O buffers, write requests) to the
    allocator, so that ``engine_stats()["heap_bytes"]`` counts only memory in
    use: call it before comparing heap figures with a baseline."""
    from . import _engine

    trim = getattr(_engine, "trim", None)
    if trim is not None:
        trim()


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
