"""wss:// end to end, with a private PKI made by the `openssl` command line.

Certificates (session fixture `pki`): a root CA and an intermediate that
signs the server certificates (the server sends leaf + intermediate, clients
trust only the root), a leaf for another name, an expired and a not yet
valid leaf, a self-signed leaf nobody trusts, a second server identity for
reloads, and a client CA with a client certificate next to a rogue CA with
one of its own.

Covered: verification on by default (chain, host name, dates, trust), which
check failed in `Client.last_error` and retries with backoff until the
server is fixed, `insecure=True`, client certificates (missing, unknown CA,
good), TLS 1.2 as the floor, 64 MiB each way with SHA-256, handshakes that
stall or never start (dropped after `handshake_timeout`, nothing held),
ws:// and wss:// mixed up, curl on /metrics and the /client/ proxy over
https, and `reload_tls` while sessions stay up.
"""

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import support
import wsraw
from support import TIMEOUT, recv_exact, wait_for

KEY = "tls-agent"

# ---------------------------------------------------------------------------
# A private PKI

_CA_CNF = """\
[ ca ]
default_ca = rd_ca
[ rd_ca ]
database = {db}/index.txt
new_certs_dir = {db}
serial = {db}/serial
default_md = sha256
policy = any_name
unique_subject = no
copy_extensions = none
[ any_name ]
commonName = supplied
[ v3_ca ]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ server ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $ENV::RD_SAN
[ client ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $ENV::RD_SAN
"""

LOCAL_SAN = "DNS:localhost,IP:127.0.0.1,IP:::1"


def _openssl(*args, env=None):
    try:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, env=env,
                              timeout=60)
    except FileNotFoundError:
        raise RuntimeError("the TLS tests need the `openssl` command line "
                           "(Debian package openssl)") from None
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Identity:
    """A certificate (chain file: leaf first, then intermediates) and its key."""
    cert: str
    key: str
    leaf: str  # the leaf alone
    serial: str  # hex, as ssl's getpeercert() gives it
    subject_cn: str


class PKI:
    """Certificates made with `openssl req` / `openssl ca` (P-256 keys: fast)."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def _path(self, name, ext):
        return str(self.dir / f"{name}.{ext}")

    def _ca_config(self, name, first_serial):
        db = self.dir / f"{name}.db"
        db.mkdir()
        (db / "index.txt").write_text("")
        (db / "serial").write_text(f"{first_serial:X}\n")
        Path(self._path(name, "cnf")).write_text(_CA_CNF.format(db=db))

    def root(self, name, first_serial=0x1000):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", self._path(name, "key"), "-out", self._path(name, "pem"),
                 "-subj", f"/CN={name}", "-days", "30",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self._ca_config(name, first_serial)
        return self._path(name, "pem")

    def self_signed(self, name, san=LOCAL_SAN):
        """A leaf that signs itself (not a CA): trusted by nobody."""
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", self._path(name, "key"), "-out", self._path(name, "pem"),
                 "-subj", f"/CN={name}", "-days", "30", "-addext", f"subjectAltName={san}",
                 "-addext", "basicConstraints=critical,CA:FALSE")
        return self._identity(name, self._path(name, "pem"))

    def sign(self, ca, name, profile, san=LOCAL_SAN, start=None, end=None, chain=()):
        """A certificate for `name` signed by CA `ca`. profile: v3_ca (an
        intermediate, which can then sign), server or client. chain: the
        intermediates to append to the chain file."""
        csr = self._path(name, "csr")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", self._path(name, "key"), "-out", csr,
                 "-subj", f"/CN={name}")
        dates = ["-startdate", start, "-enddate", end] if start else ["-days", "30"]
        _openssl("ca", "-config", self._path(ca, "cnf"), "-batch", "-notext",
                 "-cert", self._path(ca, "pem"), "-keyfile", self._path(ca, "key"),
                 "-in", csr, "-out", self._path(name, "pem"), "-extensions", profile, *dates,
                 env=dict(os.environ, RD_SAN=san))
        if profile == "v3_ca":
            self._ca_config(name, 0x2000)
            return self._path(name, "pem")
        chain_path = self._path(name, "chain.pem")
        with open(chain_path, "w") as out:
            for part in (self._path(name, "pem"), *chain):
                out.write(Path(part).read_text())
        return self._identity(name, chain_path)

    def _identity(self, name, chain_path):
        leaf = self._path(name, "pem")
        serial = _openssl("x509", "-in", leaf, "-noout", "-serial").strip().split("=", 1)[1]
        return Identity(chain_path, self._path(name, "key"), leaf, serial.upper(), name)


@dataclass
class Certs:
    root: str           # the CA clients trust
    server: Identity    # localhost / 127.0.0.1 / ::1, signed by the intermediate
    server2: Identity   # the same names, another key and serial (reloads)
    other: Identity     # other.example only
    expired: Identity
    future: Identity    # not valid yet
    self_signed: Identity
    client_ca: str
    client: Identity
    rogue_client: Identity  # signed by a CA the server does not know


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    p = PKI(tmp_path_factory.mktemp("pki"))
    root = p.root("root-ca")
    inter = p.sign("root-ca", "intermediate-ca", "v3_ca")
    chain = (inter,)
    certs = Certs(
        root=root,
        server=p.sign("intermediate-ca", "server-one", "server", chain=chain),
        server2=p.sign("intermediate-ca", "server-two", "server", chain=chain),
        other=p.sign("intermediate-ca", "other", "server", san="DNS:other.example", chain=chain),
        expired=p.sign("intermediate-ca", "expired", "server", chain=chain,
                       start="20200101000000Z", end="20200201000000Z"),
        future=p.sign("intermediate-ca", "future", "server", chain=chain,
                      start="20990101000000Z", end="20990201000000Z"),
        self_signed=p.self_signed("self-signed"),
        client_ca=p.root("client-ca", 0x3000),
        client=None,
        rogue_client=None,
    )
    certs.client = p.sign("client-ca", "client-one", "client",
                          san="DNS:client-one.example,IP:10.0.0.7,URI:spiffe://example/agent")
    p.root("rogue-ca", 0x4000)
    certs.rogue_client = p.sign("rogue-ca", "rogue-client", "client")
    return certs


# ---------------------------------------------------------------------------
# Helpers


def tls_server(rd, ident, **options):
    return rd.Server(listen="127.0.0.1:0", tls_cert=ident.cert, tls_key=ident.key,
                     **options).start()


def tls_client(rd, srv, key=KEY, **options):
    """A started, not yet connected Client with fast retries."""
    options.setdefault("backoff_min", 0.1)
    options.setdefault("backoff_max", 0.2)
    return rd.Client(srv.url, headers={"X-Tunnel-ID": key}, **options).start()


def wait_error(cli, timeout=TIMEOUT):
    """The client's last error, once it has one."""
    return wait_for(lambda: cli.last_error, timeout, "the client to report an error")


def assert_never_connects(cli, srv, expected_error, key=KEY):
    """The client fails with exactly `expected_error` and no session appears."""
    error = wait_error(cli)
    assert error == expected_error
    assert not cli.connected
    assert key not in srv.list_clients()


def echo_round_trip(srv, echo_server, key=KEY):
    support.dial_round_trip(srv, key, echo_server.address, b"through the encrypted tunnel")


def peer_cert(port, cafile, server_hostname="localhost", **ctx_options):
    """(decoded peer certificate, TLS version) seen by Python's ssl module."""
    ctx = ssl.create_default_context(cafile=cafile)
    for name, value in ctx_options.items():
        setattr(ctx, name, value)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
            return s.getpeercert(), s.version()


def subject_cn(cert):
    return dict(pair[0] for pair in cert["subject"])["commonName"]


def client_hello():
    """The first flight of a real TLS client (Python's), as bytes."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16" and len(data) > 100
    return data


def held_by_engine(rd):
    """What the engine holds, minus the idle block pool (a cache that a
    finished connection may leave filled): heap bytes, loop handles, fds."""
    s = rd.engine_stats()
    return {"heap_bytes": s["heap_bytes"] - s["pool_bytes"], "loop_handles": s["loop_handles"],
            "open_fds": s["open_fds"], "open_sessions": s["open_sessions"],
            "open_connections": s["open_connections"]}


def wait_back_to(rd, baseline, timeout=TIMEOUT):
    try:
        wait_for(lambda: held_by_engine(rd) == baseline, timeout, "the engine's baseline")
    except AssertionError:
        raise AssertionError(f"engine holds {held_by_engine(rd)}, baseline {baseline}") from None


# ---------------------------------------------------------------------------
# Verification


@pytest.mark.parametrize("server_name", [None, "localhost"], ids=["ip_san", "dns_san"])
def test_good_chain_with_intermediate(rd, tunnel_leak_check, pki, echo_server, server_name):
    with tls_server(rd, pki.server) as srv:
        assert srv.url.startswith("wss://127.0.0.1:")
        # The server sends the intermediate: a client that trusts only the
        # root verifies the chain.
        cert, version = peer_cert(srv.port, pki.root)
        assert subject_cn(cert) == "server-one"
        assert version in ("TLSv1.2", "TLSv1.3")
        extra = {"server_name": server_name} if server_name else {}
        with tls_client(rd, srv, ca_file=pki.root, **extra) as cli:
            cli.wait_connected(TIMEOUT)
            assert cli.last_error is None
            wait_for(lambda: srv.has_session(KEY), what="the session")
            echo_round_trip(srv, echo_server)
            support.check_balanced(srv)
            support.check_balanced(cli)


def test_wrong_host_name_fails_and_client_retries_until_fixed(rd, tunnel_leak_check, pki,
                                                              echo_server):
    with tls_server(rd, pki.server) as srv:
        with tls_client(rd, srv, ca_file=pki.root, server_name="other.example") as cli:
            assert_never_connects(
                cli, srv, "tls: failed to verify certificate: x509: certificate is valid for "
                          "localhost, 127.0.0.1, ::1, not other.example")
            # The client keeps trying with its backoff: once the server has a
            # certificate for that name, it gets in without being restarted.
            srv.reload_tls(cert=pki.other.cert, key=pki.other.key)
            cli.wait_connected(TIMEOUT)
            echo_round_trip(srv, echo_server)


def test_certificate_for_another_name(rd, tunnel_leak_check, pki):
    with tls_server(rd, pki.other) as srv, tls_client(rd, srv, ca_file=pki.root) as cli:
        assert_never_connects(
            cli, srv, "tls: failed to verify certificate: x509: certificate is valid for "
                      "other.example, not 127.0.0.1")


@pytest.mark.parametrize("which,expected", [
    ("expired", "x509: certificate has expired or is not yet valid: current time is after "
                "Feb  1 00:00:00 2020 GMT"),
    ("future", "x509: certificate has expired or is not yet valid: current time is before "
               "Jan  1 00:00:00 2099 GMT"),
])
def test_certificate_outside_its_dates(rd, tunnel_leak_check, pki, which, expected):
    with tls_server(rd, getattr(pki, which)) as srv, tls_client(rd, srv, ca_file=pki.root) as cli:
        assert_never_connects(cli, srv, "tls: failed to verify certificate: " + expected)


@pytest.mark.parametrize("trust", ["system_store", "ca_file"])
def test_self_signed_without_trust(rd, tunnel_leak_check, pki, trust):
    extra = {"ca_file": pki.root} if trust == "ca_file" else {}
    with tls_server(rd, pki.self_signed) as srv, tls_client(rd, srv, **extra) as cli:
        assert_never_connects(
            cli, srv, "tls: failed to verify certificate: x509: certificate signed by unknown "
                      "authority")


def test_insecure_accepts_self_signed(rd, tunnel_leak_check, pki, echo_server):
    with tls_server(rd, pki.self_signed) as srv:
        # Any name, no trust: insecure skips both checks.
        with tls_client(rd, srv, insecure=True, server_name="not.the.name") as cli:
            cli.wait_connected(TIMEOUT)
            echo_round_trip(srv, echo_server)


def test_tls_1_2_is_the_floor(rd, tunnel_leak_check, pki):
    with tls_server(rd, pki.server) as srv:
        _, version = peer_cert(srv.port, pki.root, maximum_version=ssl.TLSVersion.TLSv1_2)
        assert version == "TLSv1.2"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.root)
        # Offer TLS 1.0-1.1 only (lowering the client's own floor, so the
        # refusal comes from the server, as a protocol_version alert).
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.warns(DeprecationWarning):
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as raw:
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
                ctx.wrap_socket(raw, server_hostname="localhost")


# ---------------------------------------------------------------------------
# Client certificates


@pytest.mark.parametrize("which,expected", [
    ("missing", "remote error: tls: certificate required (the server requires a client "
                "certificate)"),
    ("unknown_ca", "remote error: tls: unknown certificate authority"),
])
def test_client_certificate_refused(rd, tunnel_leak_check, pki, echo_server, which, expected):
    with tls_server(rd, pki.server, tls_client_ca=pki.client_ca) as srv:
        extra = {}
        if which == "unknown_ca":
            extra = {"client_cert": pki.rogue_client.cert, "client_key": pki.rogue_client.key}
        with tls_client(rd, srv, ca_file=pki.root, **extra) as cli:
            assert_never_connects(cli, srv, expected)
        adds = support.family(srv.metrics(), support.ADD_SESSION)
        assert sum(adds.values()) == 0, adds
        # A client with a good certificate still gets in.
        with tls_client(rd, srv, key="good", ca_file=pki.root, client_cert=pki.client.cert,
                        client_key=pki.client.key) as good:
            good.wait_connected(TIMEOUT)
            wait_for(lambda: srv.has_session("good"), what="the good client's session")
            echo_round_trip(srv, echo_server, key="good")


def test_client_certificate_required_from_python_ssl(rd, tunnel_leak_check, pki):
    """Another TLS stack, without and with a certificate: the server's answer
    does not depend on our own client."""
    with tls_server(rd, pki.server, tls_client_ca=pki.client_ca, proxy_route=False) as srv:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = ssl.create_default_context(cafile=pki.root)
            ctx.minimum_version = ctx.maximum_version = version
            with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as raw:
                # TLS 1.2 fails in the handshake; TLS 1.3 reports the alert on
                # the first read, the client's handshake being done first.
                with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|CERTIFICATE_REQUIRED"):
                    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                        s.sendall(request)
                        s.recv(100)
        ctx = ssl.create_default_context(cafile=pki.root)
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(request)
                data, _ = support.read_until_closed(s, TIMEOUT)
        assert data.startswith(b"HTTP/1.1 200 "), data[:200]


# ---------------------------------------------------------------------------
# Volume


def test_64_mib_each_way_over_wss(rd, tunnel_leak_check, pki, echo_server):
    size = 64 << 20
    block = os.urandom(1 << 20)
    sent_hash = hashlib.sha256()
    # Each MiB differs (its index up front), so a reordered or repeated block
    # cannot pass the hash check.
    blocks = [i.to_bytes(8, "big") + block[8:] for i in range(size // len(block))]
    for b in blocks:
        sent_hash.update(b)
    with tls_server(rd, pki.server) as srv, tls_client(rd, srv, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        s = srv.dial(KEY, "tcp", echo_server.address, timeout=TIMEOUT)
        s.settimeout(120)
        errors = []

        # No shutdown(SHUT_WR) at the end: the protocol has no half-close
        # (EOF in one direction ends both), so the reader decides when to stop.
        def send():
            try:
                for b in blocks:
                    s.sendall(b)
            except OSError as e:
                errors.append(e)

        writer = threading.Thread(target=send)
        start = time.monotonic()
        writer.start()
        got_hash = hashlib.sha256()
        got = 0
        try:
            while got < size:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                got_hash.update(chunk)
                got += len(chunk)
        finally:
            writer.join(120)
            s.close()
        elapsed = time.monotonic() - start
        assert not errors, errors
        assert got == size
        assert got_hash.hexdigest() == sent_hash.hexdigest()
        (finished,) = echo_server.wait_finished(1)
        assert (finished.nbytes, finished.sha256) == (size, sent_hash.hexdigest())
        print(f"64 MiB each way over wss in {elapsed:.2f} s")
        support.check_balanced(srv)
        support.check_balanced(cli)


# ---------------------------------------------------------------------------
# Handshakes that stall


@pytest.mark.parametrize("sends", ["nothing", "half_client_hello", "client_hello_then_silence"])
def test_stalled_handshake_is_dropped_and_holds_nothing(rd, tunnel_leak_check, pki, echo_server,
                                                        sends):
    hello = client_hello()
    data = {"nothing": b"", "half_client_hello": hello[:len(hello) // 2],
            "client_hello_then_silence": hello}[sends]
    timeout = 0.5
    with tls_server(rd, pki.server, handshake_timeout=timeout) as srv, \
            tls_client(rd, srv, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        wait_for(lambda: srv.has_session(KEY), what="the session")
        # A first round trip creates the connection counters' label set.
        echo_round_trip(srv, echo_server)
        wait_for(lambda: rd.engine_stats()["open_connections"] == 0, what="no open connection")
        echo_server.wait_open(0)  # its socket counts among this process's fds
        baseline = held_by_engine(rd)
        stalled = []
        try:
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
                stalled.append(s)
                if data:
                    s.sendall(data)
            # Meanwhile a well-behaved client is served.
            echo_round_trip(srv, echo_server)
            for s in stalled:
                _, took = support.read_until_closed(s, TIMEOUT)
                # Each was dropped by the server's timer, not by our reads.
                assert took < timeout + 5, took
        finally:
            for s in stalled:
                s.close()
        wait_back_to(rd, baseline)
        assert srv.list_clients() == [KEY]
        echo_round_trip(srv, echo_server)


def test_stalled_handshake_takes_handshake_timeout(rd, tunnel_leak_check, pki):
    hello = client_hello()
    with tls_server(rd, pki.server, handshake_timeout=0.5) as srv:
        baseline = held_by_engine(rd)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
            start = time.monotonic()
            s.sendall(hello[:len(hello) // 2])
            data, _ = support.read_until_closed(s, TIMEOUT)
            took = time.monotonic() - start
        assert data == b""  # no HTTP answer in the middle of a TLS handshake
        assert 0.4 <= took < 3.0, took
        wait_back_to(rd, baseline)


def test_tls_done_but_no_request_gets_408(rd, tunnel_leak_check, pki):
    """One timer bounds the TLS handshake and the HTTP upgrade together."""
    # Our TLS handshake has to be done within it (the answer is then a 408,
    # not a dropped connection): room for that on a loaded machine.
    timeout = 1.5
    with tls_server(rd, pki.server, handshake_timeout=timeout) as srv:
        baseline = held_by_engine(rd)
        ctx = ssl.create_default_context(cafile=pki.root)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as raw:
            start = time.monotonic()
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                data, _ = support.read_until_closed(s, TIMEOUT)
            took = time.monotonic() - start
        assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        assert timeout - 0.1 <= took < timeout + 2.5, took
        wait_back_to(rd, baseline)


def test_client_handshake_timeout_and_retries(rd, tunnel_leak_check):
    """A server that accepts TCP and never answers the ClientHello: the
    client gives up after its handshake_timeout and tries again."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            accepted.append(conn)

    t = threading.Thread(target=accept)
    t.start()
    try:
        cli = rd.Client(f"wss://127.0.0.1:{port}/connect", insecure=True, handshake_timeout=0.3,
                        backoff_min=0.1, backoff_max=0.2).start()
        try:
            assert wait_error(cli) == "websocket: handshake timeout (TLS or HTTP)"
            wait_for(lambda: len(accepted) >= 2, what="a second attempt")
            assert not cli.connected
        finally:
            cli.close()
    finally:
        stop.set()
        t.join(TIMEOUT)
        listener.close()
        for c in accepted:
            c.close()


# ---------------------------------------------------------------------------
# ws:// and wss:// mixed up


def test_plain_ws_client_to_wss_server_is_refused(rd, tunnel_leak_check, pki):
    with tls_server(rd, pki.server) as srv:
        plain_url = srv.url.replace("wss://", "ws://")
        with rd.Client(plain_url, headers={"X-Tunnel-ID": KEY}, backoff_min=0.1,
                       backoff_max=0.2) as cli:
            assert wait_error(cli) == ("websocket: bad handshake (HTTP 400: Client sent an HTTP request "
                                       "to an HTTPS server.)")
            assert not cli.connected
            assert srv.list_clients() == []


def test_plain_http_to_wss_server_is_told_why(rd, tunnel_leak_check, pki):
    """Like Go's net/http: a plain-text 400 that says what went wrong."""
    with tls_server(rd, pki.server) as srv:
        baseline = held_by_engine(rd)
        request, _ = wsraw.upgrade_request(f"127.0.0.1:{srv.port}", headers={"X-Tunnel-ID": KEY})
        resp = wsraw.http_exchange("127.0.0.1", srv.port, request)
        assert resp.status == 400, resp.raw[:200]
        assert resp.body == b"Client sent an HTTP request to an HTTPS server.\n"
        assert srv.list_clients() == []
        wait_back_to(rd, baseline)


def test_refused_client_reports_the_servers_reason(rd, tunnel_leak_check, pki):
    with tls_server(rd, pki.server) as srv:
        plain_url = srv.url.replace("wss://", "ws://")
        with rd.Client(plain_url, headers={"X-Tunnel-ID": KEY}, backoff_min=0.1,
                       backoff_max=0.2) as cli:
            assert "HTTP request to an HTTPS server" in wait_error(cli)


def test_wss_client_to_plain_server_fails_clearly(rd, tunnel_leak_check):
    with rd.Server(listen="127.0.0.1:0") as srv:
        with rd.Client(srv.url.replace("ws://", "wss://"), headers={"X-Tunnel-ID": KEY},
                       insecure=True, backoff_min=0.1, backoff_max=0.2) as cli:
            error = wait_error(cli)
            assert error.startswith("tls: "), error
            assert not cli.connected
            assert srv.list_clients() == []


def test_bearer_tokens_over_wss(rd, tunnel_leak_check, pki, echo_server):
    token = "tok-over-tls-0123456789abcdef"
    auth = rd.TokenAuthorizer(tokens={token: "tenant-a"})
    with tls_server(rd, pki.server, authorizer=auth) as srv:
        with rd.Client(srv.url, ca_file=pki.root, headers={
                "Authorization": f"Bearer {token}", "X-Tunnel-ID": "someone-else"}) as cli:
            cli.wait_connected(TIMEOUT)
            wait_for(lambda: srv.list_clients() == ["tenant-a"], what="the token's client key")
            echo_round_trip(srv, echo_server, key="tenant-a")
        with rd.Client(srv.url, ca_file=pki.root, headers={"X-Tunnel-ID": "tenant-a"},
                       backoff_min=0.1, backoff_max=0.2) as anon:
            assert wait_error(anon) == "websocket: bad handshake (HTTP 401: failed authentication)"
            assert not anon.connected


# ---------------------------------------------------------------------------
# HTTP routes over https


def _curl(*args):
    curl = shutil.which("curl")
    assert curl, "the TLS tests need curl (Debian package curl)"
    proc = subprocess.run([curl, "-sS", "--max-time", "60", *args], capture_output=True,
                          timeout=90)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def test_curl_metrics_and_proxy_route_over_https(rd, tunnel_leak_check, pki, http_service):
    with tls_server(rd, pki.server) as srv, tls_client(rd, srv, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        wait_for(lambda: srv.has_session(KEY), what="the session")
        base = f"https://127.0.0.1:{srv.port}"
        metrics = _curl("--cacert", pki.root, f"{base}/metrics").decode()
        assert f'session_server_total_add_websocket_session{{clientkey="{KEY}",peer="false"}} 1' \
            in metrics, metrics[:2000]
        # By host name (SNI + DNS SAN) this time.
        named = f"https://localhost:{srv.port}"
        resolve = f"localhost:{srv.port}:127.0.0.1"
        hello = _curl("--cacert", pki.root, "--resolve", resolve,
                      f"{named}/client/{KEY}/http/{http_service.address}/hello")
        assert hello == http_service.HELLO
        large = _curl("--cacert", pki.root, "--resolve", resolve,
                      f"{named}/client/{KEY}/http/{http_service.address}/large")
        assert hashlib.sha256(large).hexdigest() == http_service.large_sha256
        # curl without the CA refuses the server, as it should.
        proc = subprocess.run([shutil.which("curl"), "-sS", f"{base}/metrics"],
                              capture_output=True, timeout=60)
        assert proc.returncode == 60, proc  # CURLE_PEER_FAILED_VERIFICATION
        support.check_balanced(srv)


# ---------------------------------------------------------------------------
# Reloading the certificate


def test_reload_tls_swaps_certificate_and_keeps_sessions(rd, tunnel_leak_check, pki, echo_server,
                                                         tmp_path):
    # The server reads its files from fixed paths, as a renewal job rewrites them.
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    with rd.Server(listen="127.0.0.1:0", tls_cert=str(cert), tls_key=str(key)).start() as srv, \
            tls_client(rd, srv, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        wait_for(lambda: srv.has_session(KEY), what="the session")
        seen, _ = peer_cert(srv.port, pki.root)
        assert (seen["serialNumber"], subject_cn(seen)) == (pki.server.serial, "server-one")
        # A connection open across the reload.
        kept = srv.dial(KEY, "tcp", echo_server.address, timeout=TIMEOUT)
        kept.settimeout(TIMEOUT)
        try:
            kept.sendall(b"before")
            assert recv_exact(kept, 6) == b"before"

            shutil.copy(pki.server2.cert, cert)
            shutil.copy(pki.server2.key, key)
            srv.reload_tls()  # the same paths, re-read
            seen, _ = peer_cert(srv.port, pki.root)
            assert (seen["serialNumber"], subject_cn(seen)) == (pki.server2.serial, "server-two")
            assert pki.server2.serial != pki.server.serial

            # The session and its connection did not notice.
            kept.sendall(b"after")
            assert recv_exact(kept, 5) == b"after"
            assert cli.connected and srv.list_clients() == [KEY]
            echo_round_trip(srv, echo_server)
            # New agents verify the new certificate.
            with tls_client(rd, srv, key="second", ca_file=pki.root) as second:
                second.wait_connected(TIMEOUT)

            # A reload that fails changes nothing.
            with pytest.raises(rd.TunnelError, match="cannot load certificate chain"):
                srv.reload_tls(cert=str(tmp_path / "missing.crt"))
            with pytest.raises(rd.TunnelError, match="does not match"):
                srv.reload_tls(cert=pki.server.cert, key=pki.other.key)
            seen, _ = peer_cert(srv.port, pki.root)
            assert seen["serialNumber"] == pki.server2.serial

            # Explicit paths work too.
            srv.reload_tls(cert=pki.server.cert, key=pki.server.key)
            seen, _ = peer_cert(srv.port, pki.root)
            assert seen["serialNumber"] == pki.server.serial
            kept.sendall(b"again")
            assert recv_exact(kept, 5) == b"again"
        finally:
            kept.close()
        support.check_balanced(srv)


def test_reload_tls_can_require_client_certificates(rd, tunnel_leak_check, pki):
    with tls_server(rd, pki.server) as srv, tls_client(rd, srv, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        srv.reload_tls(client_ca=pki.client_ca)
        # The open session stays; a new anonymous agent is refused.
        with tls_client(rd, srv, key="anonymous", ca_file=pki.root) as anon:
            assert_never_connects(
                anon, srv, "remote error: tls: certificate required (the server requires a "
                           "client certificate)", key="anonymous")
        assert cli.connected and srv.list_clients() == [KEY]


# ---------------------------------------------------------------------------
# https targets of the /client/ proxy route


class HttpsBackend:
    """An https service behind the agent: GET answers its path, POST echoes
    its body. Each response closes its connection."""

    def __init__(self, ident):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/big/"):
                    self._reply(b"x" * (int(self.path[5:]) << 20))
                else:
                    self._reply(f"hello over tls {self.path}".encode())

            def do_POST(self):
                self._reply(self.rfile.read(int(self.headers["Content-Length"])))

            def _reply(self, body):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ident.cert, ident.key)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def https_backend(pki):
    backend = HttpsBackend(pki.server)
    yield backend
    backend.close()


def proxy_request(port, target, method="GET", body=None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, target, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def proxy_pair(rd, **options):
    srv = rd.Server(listen="127.0.0.1:0", proxy_route=True, **options).start()
    cli = rd.Client(srv.url, headers={"X-Tunnel-ID": KEY}).start()
    cli.wait_connected(TIMEOUT)
    wait_for(lambda: srv.has_session(KEY), what="the agent's session")
    return srv, cli


def proxy_settled(srv, cli):
    wait_for(lambda: srv.connections() == [], what="the proxied connections to end")
    support.check_balanced(srv)
    support.check_balanced(cli)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_proxy_route_to_an_https_target(rd, tunnel_leak_check, pki, https_backend, host):
    srv, cli = proxy_pair(rd, proxy_ca_file=pki.root)
    try:
        base = f"/client/{KEY}/https/{host}:{https_backend.port}"
        assert proxy_request(srv.port, base + "/hello?x=1") == (200, b"hello over tls /hello?x=1")
        # A body both ways, larger than any buffer on the path.
        body = os.urandom(3 << 20)
        status, echoed = proxy_request(srv.port, base + "/echo", "POST", body)
        assert status == 200
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(body).digest()
        proxy_settled(srv, cli)
    finally:
        cli.close()
        srv.close()


@pytest.mark.parametrize("case", ["untrusted", "wrong_name", "refused"])
def test_proxy_route_https_failures_answer_500(rd, tunnel_leak_check, pki, case):
    # untrusted: the system store does not know the private CA; wrong_name:
    # a trusted certificate for other.example only; refused: a closed port.
    backend = HttpsBackend(pki.other if case == "wrong_name" else pki.server)
    options = {} if case == "untrusted" else {"proxy_ca_file": pki.root}
    srv, cli = proxy_pair(rd, **options)
    try:
        port = support.closed_port() if case == "refused" else backend.port
        status, body = proxy_request(srv.port, f"/client/{KEY}/https/127.0.0.1:{port}/x")
        text = body.decode()
        assert status == 500, text
        assert text == {
            "untrusted": "tls: failed to verify certificate: x509: certificate signed by "
                         "unknown authority",
            "wrong_name": "tls: failed to verify certificate: x509: certificate is valid for "
                          "other.example, not 127.0.0.1",
            "refused": f"dial tcp 127.0.0.1:{port}: connect: connection refused"}[case]
        proxy_settled(srv, cli)
    finally:
        cli.close()
        srv.close()
        backend.close()


def test_proxy_route_https_client_leaves_mid_response(rd, tunnel_leak_check, pki,
                                                       https_backend):
    srv, cli = proxy_pair(rd, proxy_ca_file=pki.root)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
            s.sendall(f"GET /client/{KEY}/https/127.0.0.1:{https_backend.port}/big/16 HTTP/1.1\r\n"
                      f"Host: x\r\n\r\n".encode())
            got = b""
            while len(got) < 256 << 10:
                chunk = s.recv(65536)
                assert chunk, got[:200]
                got += chunk
            assert got.startswith(b"HTTP/1.0 200 ")
        # The rest of the 16 MiB has nowhere to go: everything ends.
        proxy_settled(srv, cli)
    finally:
        cli.close()
        srv.close()


def test_proxy_route_https_slow_client_bounds_memory(rd, tunnel_leak_check, pki,
                                                     https_backend):
    """A client that stops reading a 64 MiB https response: the relay stops
    reading the TLS side, the tunnel pauses, and what the engine holds (both
    ends run here) stays at the PAUSE bounds, far below the response; then
    every byte arrives."""
    srv, cli = proxy_pair(rd, proxy_ca_file=pki.root)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            s.sendall(f"GET /client/{KEY}/https/127.0.0.1:{https_backend.port}/big/64 HTTP/1.1\r\n"
                      f"Host: x\r\n\r\n".encode())
            wait_for(lambda: any(c["paused"] for c in srv.connections()),
                     what="PAUSE on the tunneled connection")
            # Watch the engine while nobody reads: unbounded, the 64 MiB would
            # pour into the relay within this window (loopback TLS moves
            # hundreds of MB/s). The tunnel's own buffers (PAUSE, then
            # hard_cap) are counted in buffered_bytes and left out here: on a
            # loaded machine what was in flight at PAUSE varies by megabytes.
            # The rest (the relay's queue, the agent's held-back reads, read
            # blocks) stays within a few MiB.
            peak, until = 0, time.monotonic() + 2.0
            while time.monotonic() < until:
                stats = rd.engine_stats()
                peak = max(peak, stats["heap_bytes"] - stats["pool_bytes"]
                           - stats["buffered_bytes"])
                time.sleep(0.01)
            assert peak < 16 << 20, peak
            got = bytearray()
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ")
        assert body == b"x" * (64 << 20)
        proxy_settled(srv, cli)
    finally:
        cli.close()
        srv.close()


def test_proxy_route_https_insecure_accepts_self_signed(rd, tunnel_leak_check, pki):
    backend = HttpsBackend(pki.self_signed)
    srv, cli = proxy_pair(rd, proxy_insecure=True)
    try:
        status, body = proxy_request(srv.port, f"/client/{KEY}/https/127.0.0.1:{backend.port}/s")
        assert (status, body) == (200, b"hello over tls /s")
        proxy_settled(srv, cli)
    finally:
        cli.close()
        srv.close()
        backend.close()


def test_proxy_ca_file_that_does_not_load_is_refused_at_once(rd, tmp_path):
    srv = rd.Server(listen="127.0.0.1:0", proxy_ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(rd.TunnelError, match="missing.pem"):
        srv.start()
    srv.close()


def test_cli_proxy_route_to_https_with_curl(run_cli, pki, https_backend, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    _, port = support.cli_server(run_cli, "--proxy-ca-file", pki.root)
    run_cli("client", "--connect", f"ws://127.0.0.1:{port}/connect", "--id", "foo", ready=None)
    support.wait_agent(port, "foo")
    base = f"http://127.0.0.1:{port}/client/foo/https/localhost:{https_backend.port}"
    out = tmp_path / "body"
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(1 << 20))
    for args, want in ((["-G", f"{base}/hi"], b"hello over tls /hi"),
                       (["--data-binary", f"@{upload}", f"{base}/echo"], upload.read_bytes())):
        r = subprocess.run([curl, "-sS", "--max-time", str(int(TIMEOUT)), "-o", str(out),
                            "-w", "%{http_code}", *args], capture_output=True, text=True,
                           timeout=TIMEOUT + 10)
        assert r.returncode == 0, r.stderr
        assert (int(r.stdout), out.read_bytes()) == (200, want)
    support.wait_served_balanced(port)


# ---------------------------------------------------------------------------
# wss:// between the servers of an HA group


def wss_pair(rd, pki, **b_options):
    """A (wss) and B, each a peer of the other; B reaches A over wss://."""
    a = tls_server(rd, pki.server, peer_id="A", peer_token="tok")
    b = rd.Server(listen="127.0.0.1:0", peer_id="B", peer_token="tok", **b_options).start()
    a.add_peer(b.url, "B", "tok")
    b.add_peer(a.url, "A", "tok")
    return a, b


def test_wss_peer_unverified_by_default_as_in_go(rd, tunnel_leak_check, pki, echo_server):
    # Go's peers skip certificate verification; the shared token authenticates.
    a, b = wss_pair(rd, pki)
    with a, b, tls_client(rd, a, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        wait_for(lambda: b.route(KEY) == "A", what="B to learn the key from A")
        echo_round_trip(b, echo_server)
        assert [p["state"] for p in b.peers()] == ["connected"]
        support.check_balanced(b)


def test_wss_peer_verified_with_peer_ca_file(rd, tunnel_leak_check, pki, echo_server):
    a, b = wss_pair(rd, pki, peer_ca_file=pki.root)
    with a, b, tls_client(rd, a, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        wait_for(lambda: b.route(KEY) == "A", what="B to learn the key from A")
        echo_round_trip(b, echo_server)


def test_wss_peer_with_untrusted_certificate_stays_down(rd, tunnel_leak_check, pki):
    # B trusts only the client CA: A's chain does not verify, B never links
    # (A still reaches B over the link A opened: routes need one direction).
    a, b = wss_pair(rd, pki, peer_ca_file=pki.client_ca)
    with a, b, tls_client(rd, a, ca_file=pki.root) as cli:
        cli.wait_connected(TIMEOUT)
        peer = wait_for(lambda: next((p for p in b.peers() if p["attempts"] >= 2), None),
                        what="B to retry its link to A")
        assert peer["state"] != "connected"
        assert "certificate" in peer["last_error"]
        assert [p["inbound"] for p in a.peers()] == [0]


def test_authorizer_sees_the_client_certificate(rd, tunnel_leak_check, pki, echo_server):
    # The certificate names the client key: the authorizer reads its CN.
    import ssl as _ssl
    seen = []

    def authorizer(request):
        seen.append(request.client_cert)
        cert = request.client_cert
        return (cert.common_name if cert else ""), cert is not None

    with tls_server(rd, pki.server, tls_client_ca=pki.client_ca, authorizer=authorizer) as srv:
        with tls_client(rd, srv, key="ignored", ca_file=pki.root, client_cert=pki.client.cert,
                        client_key=pki.client.key) as cli:
            cli.wait_connected(TIMEOUT)
            wait_for(lambda: srv.list_clients() == ["client-one"], what="the CN as client key")
            echo_round_trip(srv, echo_server, key="client-one")
    cert = seen[0]
    assert cert.subject == "CN=client-one" and cert.common_name == "client-one"
    assert cert.sans == ("DNS:client-one.example", "IP:10.0.0.7", "URI:spiffe://example/agent")
    der = _ssl.PEM_cert_to_DER_cert(open(pki.client.leaf).read())
    assert cert.sha256 == hashlib.sha256(der).hexdigest()
    # Without mTLS (or over ws://) there is no certificate.
    seen.clear()
    with rd.Server(authorizer=authorizer) as plain:
        cli = rd.Client(plain.url, headers={"X-Tunnel-ID": "x"}, backoff_min=0.1,
                        backoff_max=0.2).start()
        try:
            wait_for(lambda: seen, what="the authorizer's call")
            assert seen[0] is None
        finally:
            cli.close()


def test_client_cert_common_name_parsing(rd):
    cc = rd.ClientCert(subject=r"O=Example\, Inc.,CN=agent\,7", sans=(), sha256="")
    assert cc.common_name == "agent,7"
    assert rd.ClientCert(subject="O=x", sans=(), sha256="").common_name is None
