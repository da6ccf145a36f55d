"""Process-wide engine lifetime: one shutdown at interpreter exit.

The engine starts its loop thread on first use. At exit we stop the Python
thread that answers engine requests first, so that nothing is waiting inside
the engine while it tears down, then ask the engine to close every handle and
join its loop thread. Registered when the first wrapper module is imported,
i.e. before user code registers its own atexit hooks, so that it runs after
them (atexit is last-in, first-out) and they can still close their objects.
"""

from __future__ import annotations

import atexit
import os
import threading

from . import _engine

_lock = threading.Lock()
_shut_down = False


def shutdown() -> None:
    """Stops the callback thread and the engine; runs once, later calls return."""
    global _shut_down
    with _lock:
        if _shut_down:
            return
        _shut_down = True
    from . import _callbacks, _trace

    _callbacks.stop(timeout=2.0)
    _trace.stop(timeout=1.0)
    try:
        _engine.shutdown()
    except Exception:  # noqa: BLE001 - nothing useful to do about it at exit
        pass


def engine_stats() -> dict:
    """Engine-wide figures: open_sessions, open_connections, heap_bytes,
    heap_objects, loop_handles, buffered_bytes (and any the engine adds)."""
    return dict(_engine.engine_stats())


def _after_fork_in_child() -> None:
    # The lock may have been held by a thread the child does not have; the
    # engine itself resets in the child (its own fork handler).
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown)
