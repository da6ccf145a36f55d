"""The data trace: each tunnel message a traced object sends or receives,
logged on ``remotedialer_py.conn`` at DEBUG, as the Go library's
``CATTLE_TUNNEL_DATA_DEBUG`` prints them (``WRITE``/``REQUEST``, message
id, type, connection id, and the payload: DATA's first bytes, escaped and
bounded, or the text of CONNECT, ERROR and the client messages).

The engine writes a fixed-size record per message into a bounded ring and
never waits for Python: one thread here ("remotedialer-trace") takes them in
batches and logs them. When logging cannot keep up, the engine drops records
and counts them; the count is logged (WARNING) when the reader catches up.
Objects are traced when ``data_trace`` is on (default: the environment's
``CATTLE_TUNNEL_DATA_DEBUG=true``, as in Go) and the logger is enabled for
DEBUG when they start; otherwise the engine's cost is one untaken branch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Optional

from . import _engine
from .events import conn_log

ENV = "CATTLE_TUNNEL_DATA_DEBUG"

# rd_msg_type, named as Go's message.String() names them.
TYPES = {1: "DATA", 2: "CONNECT", 3: "ERROR", 4: "ADDCLIENT", 5: "REMOVECLIENT", 6: "PAUSE",
         7: "RESUME", 8: "SYNCCONNS", 100: "DISCONNECTCLIENT"}
# DATA bytes the engine keeps per record (RD_TRACE_DATA_HEAD).
DATA_HEAD = 64

_lock = threading.Lock()
_thread: Optional[threading.Thread] = None
_stopping = False
_POLL = 0.5

log = logging.getLogger("remotedialer_py")


def wanted(option: Optional[bool]) -> bool:
    """Whether an object starting now is traced: its ``data_trace`` option
    (None: the environment decides) and the logger's level."""
    on = os.environ.get(ENV, "") == "true" if option is None else bool(option)
    return on and conn_log.isEnabledFor(logging.DEBUG)


def ensure_reader() -> None:
    """Starts the thread that logs the trace (once; again after a fork)."""
    global _thread
    with _lock:
        if _stopping or (_thread is not None and _thread.is_alive()):
            return
        _thread = threading.Thread(target=_run, name="remotedialer-trace", daemon=True)
        _thread.start()


def stop(timeout: float = 2.0) -> None:
    """Stops the thread (at shutdown) within one poll interval."""
    global _stopping
    with _lock:
        _stopping = True
        thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


def _escape(head: bytes, length: int) -> str:
    text = repr(head)[2:-1]
    return text + "..." if length > len(head) else text


def _record(rec: tuple) -> None:
    side, key, session, sent, mtype, msg_id, conn_id, length, head = rec
    name = TYPES.get(mtype, "UNKNOWN")
    verb = "WRITE" if sent else "REQUEST"
    extra: dict[str, Any] = {"side": side, "session": session,
                             "direction": "send" if sent else "recv",
                             "msg_type": name, "msg_id": msg_id, "conn_id": conn_id,
                             "length": length}
    if side == "server":
        extra["client_key"] = key
    if mtype == 1:
        extra["data"] = _escape(head, length)
        body = f"[{conn_id}]: {length} bytes: {extra['data']}"
    elif mtype == 8:
        body = f"[{conn_id}]: {length // 8} ids"
    elif mtype in (4, 5, 100):
        extra["data"] = head.decode("utf-8", "replace")
        body = f"[{extra['data']}]"
    elif mtype in (2, 3):
        extra["data"] = head.decode("utf-8", "replace")
        body = f"[{conn_id}]: {extra['data']}"
    elif name == "UNKNOWN":
        body = f"[{conn_id}]: {mtype}"
    else:
        body = f"[{conn_id}]"
    who = f"server {key}" if side == "server" else "client"
    conn_log.debug("%s: %s %d %-12s %s", who, verb, msg_id, name, body, extra=extra)


def _run() -> None:
    while True:
        with _lock:
            if _stopping:
                return
        try:
            got = _engine.next_trace(_POLL)
        except Exception:  # noqa: BLE001
            log.exception("remotedialer-py: taking the data trace failed")
            time.sleep(_POLL)
            continue
        if got is None:
            continue
        records, dropped = got
        try:
            if conn_log.isEnabledFor(logging.DEBUG):
                for rec in records:
                    _record(rec)
            if dropped:
                conn_log.warning("data trace: %d records dropped (the log did not keep up)",
                                 dropped, extra={"dropped": dropped})
        except Exception:  # noqa: BLE001 - a handler's bug must not stop the trace
            log.exception("remotedialer-py: logging the data trace failed")


def _after_fork_in_child() -> None:
    global _lock, _thread
    _lock = threading.Lock()
    if _thread is not threading.current_thread():
        _thread = None


os.register_at_fork(after_in_child=_after_fork_in_child)
