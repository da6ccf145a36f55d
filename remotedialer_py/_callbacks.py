"""The pool of Python threads that answer the engine's questions.

The engine's loop thread never takes the GIL. When it needs a decision from
Python code (a server authorizer, a client's connect authorizer or dialer)
it queues a request; each pool thread takes requests with
``_engine.next_request`` (one queue, any number of takers), calls the
owner's hook and posts the verdict with ``_engine.answer`` (a dialer's
socket with ``_engine.answer_fd``). So one slow authorizer holds one thread, not every
other agent's handshake or every other dial. The threads start when the
first owner with a Python callable registers (``set_callback_threads`` sets
how many) and run until shutdown. In a forked child they start again for the
child's own owners: the parent's are forgotten, with the threads that served
them.

Owners are held by weak reference, so a dropped Server/Client can still be
collected (its ``__del__`` closes it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import inspect
import logging
import os
import threading
import time
import weakref
from typing import Any, Iterator

from . import _engine

log = logging.getLogger("remotedialer_py")

# Re-entrant: a Server collected by the GC while this thread (or a caller)
# holds the lock runs __del__ -> close -> unregister on the same thread.
_cond = threading.Condition(threading.RLock())
_owners: dict[int, "weakref.ref[Any]"] = {}
_pending = 0  # owners being created whose handle is not known yet
_threads: list[threading.Thread] = []
# News of sessions (events) come on a queue of their own, taken by one
# thread so that each object's callbacks see them in order.
_news_thread: threading.Thread | None = None
_size = 4  # threads in the pool
_MAX_SIZE = 256
_stopping = False

# How long a request for an unknown owner waits for a registration in flight.
_PENDING_WAIT = 10.0
_POLL = 0.5


class Verdict(enum.IntEnum):
    """An owner's answer, by the engine's names (rd_verdict). A server
    authorizer answers ACCEPT (value: the client key), UNAUTHORIZED (401) or
    ERROR (400, value: the text); a connect authorizer ALLOW or REFUSE."""

    ACCEPT = _engine.VERDICT_ACCEPT
    UNAUTHORIZED = _engine.VERDICT_UNAUTHORIZED
    ERROR = _engine.VERDICT_ERROR
    ALLOW = _engine.VERDICT_ALLOW
    REFUSE = _engine.VERDICT_REFUSE


@contextlib.contextmanager
def creating() -> Iterator[None]:
    """Wraps the creation of an engine object that will ask Python questions.

    The engine may send a request for a new handle before the call that
    creates it has returned; while a creation is in flight, requests for
    unknown owners wait for ``register`` instead of being refused.
    """
    global _pending
    with _cond:
        _pending += 1
        _ensure_threads()
    try:
        yield
    finally:
        with _cond:
            _pending -= 1
            _cond.notify_all()


def register(handle: int, owner: Any) -> None:
    """Routes requests for `handle` to ``owner._answer_request(kind, payload)``."""
    with _cond:
        _owners[handle] = weakref.ref(owner)
        _ensure_threads()
        _cond.notify_all()


def unregister(handle: int) -> None:
    with _cond:
        _owners.pop(handle, None)


def set_pool_size(threads: int) -> None:
    """How many threads answer the engine's questions (default 4): as many
    authorizer or connect-authorizer calls can be in progress at once. A
    larger pool starts its new threads now if the pool runs; a smaller one
    lets the surplus threads exit after their current call."""
    global _size
    if isinstance(threads, bool) or not isinstance(threads, int) or \
            not 1 <= threads <= _MAX_SIZE:
        raise ValueError(f"callback threads must be an int from 1 to {_MAX_SIZE}, got {threads!r}")
    with _cond:
        _size = threads
        if _threads:
            _ensure_threads()


def pool_size() -> int:
    return _size


def stop(timeout: float = 2.0) -> None:
    """Stops the threads (at shutdown); each exits within one poll interval."""
    global _stopping
    with _cond:
        _stopping = True
        threads = list(_threads) + ([_news_thread] if _news_thread is not None else [])
    deadline = time.monotonic() + timeout
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _ensure_threads() -> None:
    """Tops the pool up to its size, and starts the news thread (the caller
    holds _cond)."""
    global _news_thread
    if _stopping:
        return
    if _news_thread is None or not _news_thread.is_alive():
        _news_thread = threading.Thread(target=_run_news, name="remotedialer-events",
                                        daemon=True)
        _news_thread.start()
    _threads[:] = [t for t in _threads if t.is_alive()]
    while len(_threads) < _size:
        thread = threading.Thread(target=_run, name=f"remotedialer-callbacks-{len(_threads)}",
                                  daemon=True)
        _threads.append(thread)
        thread.start()


def _surplus() -> bool:
    """Whether this thread should leave a pool that was made smaller."""
    with _cond:
        me = threading.current_thread()
        if len(_threads) > _size and me in _threads:
            _threads.remove(me)
            return True
    return False


def _lookup(owner_handle: int) -> Any:
    deadline = time.monotonic() + _PENDING_WAIT
    with _cond:
        while True:
            ref = _owners.get(owner_handle)
            if ref is not None or _pending == 0 or _stopping:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _cond.wait(min(left, _POLL))
    return ref() if ref is not None else None


def _refusal(kind: str) -> tuple[Verdict, str]:
    if kind == "auth":
        return Verdict.UNAUTHORIZED, ""
    return Verdict.REFUSE, ""


def _handle(request: Any) -> None:
    req_id, owner_handle, kind, payload = request
    if kind == "dial":
        _handle_dial(req_id, owner_handle, payload)
        return
    try:
        owner = _lookup(owner_handle)
        if owner is None:
            verdict, value = _refusal(kind)
        else:
            verdict, value = owner._answer_request(kind, payload)
    except BaseException:  # noqa: BLE001 - a hook bug must not stop the thread
        log.exception("remotedialer-py: unexpected error answering a %s request", kind)
        verdict, value = _refusal(kind)
    try:
        _engine.answer(req_id, verdict, value)
    except Exception:  # noqa: BLE001 - the request may have expired meanwhile
        log.debug("remotedialer-py: answer to request %s not delivered", req_id, exc_info=True)


def _handle_dial(req_id: int, owner_handle: int, payload: Any) -> None:
    """Runs an agent's own dialer and hands the engine its socket's
    descriptor (the engine owns it from then on) or the error text."""
    fd, error = -1, "agent closed"
    try:
        owner = _lookup(owner_handle)
        if owner is not None:
            fd, error = owner._dial(*payload)
    except BaseException:  # noqa: BLE001 - a hook bug must not stop the thread
        log.exception("remotedialer-py: unexpected error running a dialer")
        fd, error = -1, "dialer failed"
    _engine.answer_fd(req_id, fd, error.replace("\0", " "))


def _after_fork_in_child() -> None:
    # Only the forking thread survives: the lock may be held by a thread that
    # is gone, the owners are the parent's (their handles are stale here).
    global _cond, _pending, _news_thread
    _cond = threading.Condition(threading.RLock())
    if _news_thread is not threading.current_thread():
        _news_thread = None
    _owners.clear()
    _pending = 0
    _threads[:] = [t for t in _threads if t is threading.current_thread()]


os.register_at_fork(after_in_child=_after_fork_in_child)


def _run() -> None:
    while True:
        with _cond:
            if _stopping:
                return
        if _surplus():
            return
        try:
            request = _engine.next_request(_POLL)
        except _engine.ClosedError:
            return  # the engine has shut down
        except Exception:  # noqa: BLE001
            log.exception("remotedialer-py: waiting for engine requests failed")
            time.sleep(_POLL)
            continue
        if request is not None:
            _handle(request)


def _run_news() -> None:
    while True:
        with _cond:
            if _stopping:
                return
        try:
            news = _engine.next_event(_POLL)
        except _engine.ClosedError:
            return
        except Exception:  # noqa: BLE001
            log.exception("remotedialer-py: waiting for engine news failed")
            time.sleep(_POLL)
            continue
        if news is None:
            continue
        owner_handle, payload = news
        try:
            owner = _lookup(owner_handle)
            if owner is not None:
                owner._on_event(payload)
        except BaseException:  # noqa: BLE001 - a hook bug must not stop the thread
            log.exception("remotedialer-py: unexpected error delivering news")


# How long a callback's coroutine may take before it counts as failed.
_AWAIT_LIMIT = 60.0


async def _await(awaitable: Any) -> Any:
    return await awaitable


def resolve(owner: Any, result: Any) -> Any:
    """A callback's result; an ``async def`` callback's coroutine is run to
    its end first: on the event loop the owner was started on (an aio object;
    this pool thread waits for it, the loop does not), else in a fresh loop
    on this thread. Past _AWAIT_LIMIT it is cancelled and TimeoutError is
    raised, like any failure of the callback."""
    if not inspect.isawaitable(result):
        return result
    loop = getattr(owner, "_callback_loop", None)
    if loop is None or loop.is_closed():
        return asyncio.run(asyncio.wait_for(_await(result), _AWAIT_LIMIT))
    fut = asyncio.run_coroutine_threadsafe(_await(result), loop)
    try:
        return fut.result(_AWAIT_LIMIT)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise TimeoutError(f"callback did not finish within {_AWAIT_LIMIT:g} s") from None
