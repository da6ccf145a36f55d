"""News of sessions, for callbacks and logs.

A Server tells ``on_connect(event)`` / ``on_disconnect(event)`` when an
agent's or a peer's session comes and goes; a Client tells them when its
session comes up or ends, and ``on_disconnect`` also when an attempt fails
(with the wait before the next one, ``retry_in``). A Server also logs each
upgrade it refuses (401, 400, 429, 503...) with the far address and why, at
WARNING.
The engine posts the news from its loop and the callback threads deliver it
(never the loop itself), in the order it happened for each object. The same
news is logged on ``remotedialer_py.server`` / ``remotedialer_py.client``
(connects and disconnects at INFO, failed attempts at WARNING): the engine
posts it only when a callback is given or that logger is enabled for INFO
when the object starts, so silent objects cost nothing.

Connections that fail before carrying any data come the same way (kind
``"dial_failed"``, ``on_dial_failed``) and are logged on
``remotedialer_py.conn`` at INFO: an agent's refused CONNECTs and failed
local dials, and on a server each connection its agent ended with an error.
INFO, not WARNING: the failure is already the dialer's answer (an exception
from ``srv.dial``, a 500 on the proxy route); it says nothing is wrong here,
and a program that never configured logging stays quiet and pays nothing.

An accept failure libuv reports to a server's listener (out of descriptors
once its reserve one is gone: "accept: too many open files (limit N)") is
logged on ``remotedialer_py.server`` at ERROR, at most once a second, and
the listener goes on.

Every record carries its fields as attributes too (``extra``: the names in
FIELDS), for structured handlers such as the CLI's ``--log-format json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from . import _callbacks

server_log = logging.getLogger("remotedialer_py.server")
client_log = logging.getLogger("remotedialer_py.client")
conn_log = logging.getLogger("remotedialer_py.conn")

# The attributes our records carry beyond logging's own, in output order.
FIELDS = ("side", "session", "client_key", "peer", "remote", "url", "proto", "address",
          "reason", "attempt", "retry_in", "direction", "msg_type", "msg_id", "conn_id", "length", "data",
          "dropped")

log = logging.getLogger("remotedialer_py")


@dataclass(frozen=True)
class Event:
    """``kind``: ``"connect"``, ``"disconnect"``, (agents) ``"fail"`` or
    ``"dial_failed"``. Server news names ``client_key`` (a peer's id for a
    peer session), ``peer`` and ``remote`` (the far address); an agent's
    names ``url`` and ``attempt`` (failed attempts in a row). ``reason``
    says why a session ended, an attempt or a dial failed; ``proto`` and
    ``address`` name a failed dial's target; ``retry_in`` (agents) is the
    wait in seconds before the next attempt. ``"refused"`` (servers, logged
    only) is an upgrade answered with an error: ``remote`` and ``reason``
    (``"HTTP 401: failed authentication"``)."""

    kind: str
    client_key: str = ""
    peer: bool = False
    remote: str = ""
    url: str = ""
    reason: str = ""
    attempt: int = 0
    proto: str = ""
    address: str = ""
    retry_in: float = 0.0


EventCallback = Callable[[Event], Any]


def check_callback(name: str, fn: Any) -> Optional[EventCallback]:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable or None, not {type(fn).__name__}")
    return fn


def wanted(logger: logging.Logger, *callbacks: Optional[EventCallback]) -> bool:
    return any(cb is not None for cb in callbacks) or logger.isEnabledFor(logging.INFO)


def _extra(e: Event) -> dict:
    """The record's fields: those the news names (empty ones left out)."""
    if e.kind == "accept_failed":
        return {"reason": e.reason}
    if e.kind == "dial_failed":
        doc: dict = {"proto": e.proto, "address": e.address, "reason": e.reason}
        doc.update({"client_key": e.client_key} if e.client_key else {"url": e.url})
        return doc
    if e.url:
        doc = {"url": e.url, "attempt": e.attempt}
        if e.kind != "connect":
            doc["retry_in"] = e.retry_in
    else:
        doc = {"client_key": e.client_key, "peer": e.peer, "remote": e.remote}
    if e.reason:
        doc["reason"] = e.reason
    return doc


def _describe(e: Event) -> str:
    if e.url:
        return e.url
    who = f"peer {e.client_key}" if e.peer else f"client {e.client_key}"
    return f"{who} from {e.remote}" if e.remote else who


def deliver(owner: Any, payload: Mapping[str, Any], logger: logging.Logger,
            on_connect: Optional[EventCallback], on_disconnect: Optional[EventCallback],
            on_dial_failed: Optional[EventCallback] = None) -> None:
    """Logs one piece of engine news and hands it to the callback for it (an
    ``async def`` one runs to its end, see _callbacks.resolve)."""
    e = Event(kind=str(payload.get("what", "")), client_key=str(payload.get("key", "")),
              peer=bool(payload.get("peer", False)), remote=str(payload.get("remote", "")),
              url=str(payload.get("url", "")), reason=str(payload.get("reason", "")),
              attempt=int(payload.get("attempt", 0)), proto=str(payload.get("proto", "")),
              address=str(payload.get("address", "")),
              retry_in=float(payload.get("retry", 0.0)))
    extra = _extra(e)
    if e.kind == "accept_failed":
        # The listener goes on; no callback is for this news.
        logger.error("%s (the listener goes on)", e.reason, extra=extra)
        return
    if e.kind == "dial_failed":
        where = f"client {e.client_key}" if e.client_key else f"agent of {e.url}"
        conn_log.info("dial %s/%s failed (%s): %s", e.proto, e.address, where, e.reason,
                      extra=extra)
        fn = on_dial_failed
    elif e.kind == "refused":
        logger.warning("upgrade refused from %s: %s", e.remote, e.reason, extra=extra)
        return
    elif e.kind == "connect":
        logger.info("connected: %s", _describe(e), extra=extra)
        fn = on_connect
    elif e.kind == "disconnect":
        again = f"; reconnecting in {e.retry_in:.1f} s" if e.url else ""
        logger.info("disconnected: %s (%s)%s", _describe(e), e.reason or "closed", again,
                    extra=extra)
        fn = on_disconnect
    else:
        logger.warning("connection attempt %d to %s failed: %s; retrying in %.1f s", e.attempt,
                       e.url, e.reason, e.retry_in, extra=extra)
        fn = on_disconnect
    if fn is None:
        return
    try:
        _callbacks.resolve(owner, fn(e))
    except Exception:  # noqa: BLE001 - a callback bug must not stop the news
        log.exception("remotedialer-py: the %s callback raised", e.kind)
