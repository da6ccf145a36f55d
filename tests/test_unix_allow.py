"""The agent's allow patterns for unix sockets judge the path it will dial,
cleaned lexically ("." and ".." resolved, "//" collapsed, as Go's
path.Clean): "unix/<base>/ok/*" must not let "<base>/ok/../secret.sock"
through, and a path that cleans to one inside the pattern is dialed in its
cleaned form. Real unix sockets on both sides of a real tunnel."""

import os
import shutil
import tempfile

import pytest

import support
from support import ADD_SESSION, REMOVE_SESSION, TIMEOUT, key, round_trip

AGENT = "agent-unix"


@pytest.fixture
def sockets():
    """<base>/ok/echo.sock (inside the pattern) and <base>/secret.sock
    (outside it), both echo servers; base is short enough for sun_path."""
    base = tempfile.mkdtemp(prefix="rdu", dir="/tmp") + "/run"
    os.makedirs(base + "/ok")
    inside = support.UnixEchoServer(base + "/ok/echo.sock")
    secret = support.UnixEchoServer(base + "/secret.sock")
    try:
        yield base, inside, secret
        for srv in (inside, secret):
            support.wait_for(lambda: srv.open_count == 0, TIMEOUT,
                             "the agent to close every unix connection")
    finally:
        inside.close()
        secret.close()
        shutil.rmtree(base.rpartition("/")[0], ignore_errors=True)


def _dial(tunnel, address):
    sock = tunnel.srv.dial(AGENT, "unix", address, timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def _session_up(tunnel):
    m = tunnel.srv.metrics()
    label = key(clientkey=AGENT, peer="false")
    return (tunnel.srv.has_session(AGENT) and m[ADD_SESSION][label] == 1
            and label not in support.family(m, REMOVE_SESSION))


@pytest.mark.parametrize("tail", [
    "/ok/../secret.sock",
    "/ok/./../secret.sock",
    "//ok//..//secret.sock",
    "/ok/sub/../../secret.sock",
    "/ok/../ok/../secret.sock",
    "/ok/../secret.sock/.",
])
def test_escaping_path_is_refused(tunnel, sockets, tail):
    base, inside, secret = sockets
    tunnel.add_client(AGENT, allow=[f"unix/{base}/ok/*"])
    sock = _dial(tunnel, base + tail)
    assert sock.recv(1) == b""
    assert sock.tunnel_error == "connect not allowed"
    sock.close()
    # Refused before any dial, and only that connection: the session lives on.
    assert secret.accepted == 0
    assert _session_up(tunnel)
    ok = _dial(tunnel, base + "/ok/echo.sock")
    round_trip(ok)
    ok.close()
    assert _session_up(tunnel)


@pytest.mark.parametrize("tail", [
    "/ok/echo.sock",
    "/ok/./echo.sock",
    "//ok//echo.sock",
    "/ok/nodir/../echo.sock",
    "/x/../ok/echo.sock",
])
def test_path_cleaned_inside_pattern_is_dialed(tunnel, sockets, tail):
    """Allowed and dialed as cleaned: "nodir" does not exist, so only the
    cleaned path reaches the socket."""
    base, inside, secret = sockets
    tunnel.add_client(AGENT, allow=[f"unix/{base}/ok/*"])
    sock = _dial(tunnel, base + tail)
    round_trip(sock, b"through " + tail.encode())
    assert sock.tunnel_error is None
    sock.close()
    (done,) = inside.wait_finished(1)
    assert done.error is None and done.nbytes == len(b"through " + tail.encode())
    assert secret.accepted == 0
    assert _session_up(tunnel)


def test_callable_is_asked_about_the_cleaned_path(tunnel, sockets):
    base, inside, secret = sockets
    asked = []

    def allow(proto, address):
        asked.append((proto, address))
        return address.startswith(base + "/ok/")

    tunnel.add_client(AGENT, allow=allow)
    sock = _dial(tunnel, base + "/ok/../secret.sock")
    assert sock.recv(1) == b""
    assert sock.tunnel_error == "connect not allowed"
    sock.close()
    ok = _dial(tunnel, base + "/ok//./echo.sock")
    round_trip(ok)
    ok.close()
    assert asked == [("unix", base + "/secret.sock"), ("unix", base + "/ok/echo.sock")]
    assert secret.accepted == 0
    assert _session_up(tunnel)
