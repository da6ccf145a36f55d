"""The engine frees everything it allocated: after shutdown its own allocator
counts zero bytes and zero objects, whatever was open at the time. This is the
leak check that needs no sanitizer: every engine allocation is counted."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WORKLOAD = textwrap.dedent(
    """
    import socket, threading
    from remotedialer_py import Server, Client, _engine
    from remotedialer_py._runtime import shutdown

    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(64)
    accepted = []
    def accept():
        while True:
            try:
                conn, _ = target.accept()
            except OSError:
                return
            accepted.append(conn)
    threading.Thread(target=accept, daemon=True).start()
    addr = "127.0.0.1:%d" % target.getsockname()[1]

    srv = Server(debug_route=True).start()
    cli = Client(srv.url, headers={"X-Tunnel-ID": "exit"})
    cli.start()
    cli.wait_connected(timeout=10)
    fwd = srv.forward("exit", "tcp", addr)
    socks = [srv.dial("exit", "tcp", addr) for _ in range(50)]
    for s in socks[:25]:
        s.sendall(b"x" * 100000)          # bytes in flight at shutdown
    refused = srv.dial("exit", "tcp", "127.0.0.1:1")
    local = socket.create_connection(("127.0.0.1", fwd.port))
    # Everything stays open: shutdown must end and free it all.
    shutdown()
    # The sockets' status records are shared with Python and go with them.
    import gc
    del socks, refused, s
    gc.collect()
    print("HEAP", *_engine.heap())
    """
)


def test_engine_heap_is_empty_after_shutdown_with_everything_open():
    proc = subprocess.run([sys.executable, "-c", WORKLOAD], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAP ")]
    assert line, proc.stdout + proc.stderr
    assert line[-1] == "HEAP 0 0", f"engine memory left after shutdown: {line[-1]}"
