"""A raw WebSocket and tunnel-protocol peer for tests, over plain sockets.

Everything here is written from RFC 6455 and PROTOCOL.md alone and shares no
code with the engine, so a test can check the engine against an independent
reading of the wire format, and can misbehave on purpose: unmasked or
oversized frames, bad opcodes, fragments with control frames between them,
text messages, malformed tunnel headers, half-sent handshakes.

Pieces:
- zig-zag varints and tunnel messages: put_varint, get_varint,
  encode_message, decode_message;
- frames: encode_frame, parse_frame, mask_bytes, accept_key;
- WSConn: one WebSocket, either as a client (WSConn.connect does the upgrade
  itself) or as a server (WSListener.accept answers the upgrade itself);
- http_exchange: send arbitrary bytes to an HTTP port and read the answer.
"""

import base64
import hashlib
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# WebSocket opcodes (RFC 6455 section 5.2).
OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Tunnel message types (PROTOCOL.md section 3).
DATA = 1
CONNECT = 2
ERROR = 3
ADD_CLIENT = 4
REMOVE_CLIENT = 5
PAUSE = 6
RESUME = 7
SYNC_CONNECTIONS = 8

TYPE_NAMES = {
    DATA: "DATA",
    CONNECT: "CONNECT",
    ERROR: "ERROR",
    ADD_CLIENT: "ADD_CLIENT",
    REMOVE_CLIENT: "REMOVE_CLIENT",
    PAUSE: "PAUSE",
    RESUME: "RESUME",
    SYNC_CONNECTIONS: "SYNC_CONNECTIONS",
}

LEGACY_DEADLINE = 15000
CONNECT_LIMIT = 266
ERROR_LIMIT = 100
DEFAULT_TIMEOUT = 30.0

_U64 = (1 << 64) - 1


class Partial(ValueError):
    """The buffer ends before the item does."""


class Malformed(ValueError):
    """The bytes violate the format."""


class HandshakeError(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status, reason, headers, body):
        super().__init__(f"upgrade refused: {status} {reason}: {body[:200]!r}")
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


class SessionClosed(Exception):
    """The peer ended the WebSocket (Close frame or TCP EOF)."""

    def __init__(self, code=None, reason=""):
        super().__init__(f"session closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


class ProtocolError(Exception):
    """The peer sent something the tunnel protocol does not allow here."""


# ---------------------------------------------------------------------------
# Varints and tunnel messages


def put_varint(value):
    """Go's binary.PutVarint: zig-zag, then 7 bits per byte, low group first."""
    if not -(1 << 63) <= value < (1 << 63):
        raise OverflowError(f"{value} does not fit in an int64")
    u = ((value << 1) ^ (value >> 63)) & _U64
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def get_varint(buf, pos=0):
    """Reads a varint at buf[pos:]. Returns (value, position after it).

    Raises Partial when the buffer ends inside the varint and Malformed when
    it runs past 64 bits (Go's binary.ReadVarint errOverflow)."""
    u = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise Partial("varint runs past the end")
        b = buf[pos + i]
        if i == 9 and b > 1:
            raise Malformed("varint overflows 64 bits")
        u |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            value = u >> 1
            if u & 1:
                value = ~value
            return value, pos + i + 1
    raise Malformed("varint longer than 10 bytes")  # unreachable, kept for clarity


def encode_message(msg_id, conn_id, mtype, payload=b"", deadline=LEGACY_DEADLINE):
    """One tunnel message. DATA and CONNECT carry the legacy deadline varint."""
    head = put_varint(msg_id) + put_varint(conn_id) + put_varint(mtype)
    if mtype in (DATA, CONNECT):
        head += put_varint(deadline)
    return head + bytes(payload)


@dataclass
class Message:
    id: int
    conn_id: int
    type: int
    payload: bytes
    deadline: int = None
    header_len: int = 0

    @property
    def type_name(self):
        return TYPE_NAMES.get(self.type, f"UNKNOWN({self.type})")

    @property
    def text(self):
        """The payload as the Go reader sees it (ERROR texts cut at 100 bytes)."""
        data = self.payload
        if self.type == ERROR:
            data = data[:ERROR_LIMIT]
        elif self.type in (ADD_CLIENT, REMOVE_CLIENT):
            data = data[:ERROR_LIMIT]
        return data.decode("utf-8", "replace")

    @property
    def proto(self):
        return self.payload[:CONNECT_LIMIT].split(b"/", 1)[0].decode()

    @property
    def address(self):
        return self.payload[:CONNECT_LIMIT].split(b"/", 1)[1].decode()

    @property
    def sync_ids(self):
        p = self.payload
        return [struct.unpack_from("<q", p, i)[0] for i in range(0, len(p), 8)]

    def __repr__(self):
        return (f"Message(id={self.id}, conn_id={self.conn_id}, type={self.type_name}, "
                f"payload={self.payload[:64]!r}{'...' if len(self.payload) > 64 else ''})")


def decode_message(buf):
    """Decodes one whole tunnel message; raises Malformed like the Go reader
    ends a session: truncated or over-long varint, DATA/CONNECT without the
    deadline, CONNECT without '/', SYNC payload not a multiple of 8."""
    buf = bytes(buf)
    try:
        msg_id, pos = get_varint(buf, 0)
        conn_id, pos = get_varint(buf, pos)
        mtype, pos = get_varint(buf, pos)
        deadline = None
        if mtype in (DATA, CONNECT):
            deadline, pos = get_varint(buf, pos)
    except Partial as e:
        raise Malformed(f"truncated header: {e}") from None
    payload = buf[pos:]
    if mtype == CONNECT and b"/" not in payload[:CONNECT_LIMIT]:
        raise Malformed("CONNECT payload has no '/'")
    if mtype == SYNC_CONNECTIONS and len(payload) % 8:
        raise Malformed("SYNC_CONNECTIONS payload length not a multiple of 8")
    return Message(msg_id, conn_id, mtype, payload, deadline, pos)


def sync_payload(ids):
    return b"".join(struct.pack("<q", i) for i in sorted(ids))


# ---------------------------------------------------------------------------
# Frames


def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    digest = hashlib.sha1((key + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def make_key():
    return base64.b64encode(os.urandom(16)).decode("ascii")


def mask_bytes(data, key):
    """XORs data with the repeating 4-byte key. Big-integer XOR keeps this
    fast enough for megabyte payloads in pure Python."""
    n = len(data)
    if n == 0:
        return b""
    stream = (bytes(key) * (n // 4 + 1))[:n]
    x = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return x.to_bytes(n, "big")


def encode_frame(opcode, payload=b"", *, fin=True, mask=True, mask_key=None, rsv=0, length=None):
    """One frame. length overrides the length field (for oversize/lying
    headers); the payload is then written as given."""
    payload = bytes(payload)
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n < 65536:
        head = bytes([b0, mbit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, mbit | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4) if mask_key is None else bytes(mask_key)
        return head + key + mask_bytes(payload, key)
    return head + payload


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    masked: bool


def parse_frame(buf, pos=0):
    """Parses one frame at buf[pos:]. Returns (Frame, position after it);
    raises Partial when more bytes are needed. The payload is unmasked."""
    avail = len(buf) - pos
    if avail < 2:
        raise Partial("frame header")
    b0, b1 = buf[pos], buf[pos + 1]
    fin = bool(b0 & 0x80)
    rsv = (b0 >> 4) & 7
    opcode = b0 & 0xF
    masked = bool(b1 & 0x80)
    n = b1 & 0x7F
    hlen = 2
    if n == 126:
        if avail < 4:
            raise Partial("16-bit length")
        n = struct.unpack_from("!H", buf, pos + 2)[0]
        hlen = 4
    elif n == 127:
        if avail < 10:
            raise Partial("64-bit length")
        n = struct.unpack_from("!Q", buf, pos + 2)[0]
        hlen = 10
    key = None
    if masked:
        if avail < hlen + 4:
            raise Partial("mask key")
        key = bytes(buf[pos + hlen:pos + hlen + 4])
        hlen += 4
    if avail < hlen + n:
        raise Partial("payload")
    payload = bytes(buf[pos + hlen:pos + hlen + n])
    if masked:
        payload = mask_bytes(payload, key)
    return Frame(fin, rsv, opcode, payload, masked), pos + hlen + n


def close_payload(code=None, reason=""):
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode()


def parse_close(payload):
    """(code, reason) of a Close frame payload; code None when it is empty."""
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# HTTP heads


@dataclass
class RawResponse:
    status: int = None
    reason: str = ""
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""
    reset: bool = False  # the connection was reset while reading


def _parse_head(head):
    """Splits an HTTP head into (first line, {lowercased name: value})."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _parse_status_line(line):
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {line!r}")
    return int(parts[1]), (parts[2] if len(parts) > 2 else "")


def parse_response(raw):
    """Parses a whole HTTP response (head and body) received until EOF."""
    resp = RawResponse(raw=raw)
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return resp
    first, headers = _parse_head(raw[:end])
    resp.status, resp.reason = _parse_status_line(first)
    resp.headers = headers
    body = raw[end + 4:]
    if "content-length" in headers:
        body = body[:int(headers["content-length"])]
    resp.body = body
    return resp


def http_exchange(host, port, data, timeout=DEFAULT_TIMEOUT, read=True):
    """Sends data (any bytes) to host:port and reads until the server closes
    or the response's Content-Length is satisfied. Send errors are tolerated
    (a server may answer and close before reading everything)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        if not read:
            return None
        raw = bytearray()
        reset = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete response within {timeout}s: {bytes(raw[:200])!r}")
            s.settimeout(remaining)
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                break
            raw += chunk
            end = raw.find(b"\r\n\r\n")
            if end >= 0:
                _, headers = _parse_head(bytes(raw[:end]))
                cl = headers.get("content-length")
                if cl is not None and len(raw) >= end + 4 + int(cl):
                    break
        resp = parse_response(bytes(raw))
        resp.reset = reset
        return resp


def upgrade_request(host_header, path="/connect", headers=None, key=None):
    """The bytes of a WebSocket upgrade request."""
    key = key or make_key()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), key


# ---------------------------------------------------------------------------
# Connections


class WSConn:
    """One WebSocket over a plain socket. As a client its frames are masked;
    as a server they are not. Every read takes an explicit timeout."""

    def __init__(self, sock, *, client=True, leftover=b"", response_headers=None):
        self.sock = sock
        self.client = client
        self.response_headers = response_headers or {}
        self._buf = bytearray(leftover)
        self._next_id = random.randrange(1, 1 << 31)
        self.pongs = []
        self.pings = []
        self.unmasked_seen = False  # server role: a client frame arrived unmasked
        self.close_code = None
        self.close_reason = ""
        self.closed = False

    # -- opening --------------------------------------------------------

    @classmethod
    def connect(cls, host, port, path="/connect", headers=None, timeout=DEFAULT_TIMEOUT):
        """Opens a TCP connection and performs the upgrade. Raises
        HandshakeError for any answer but a valid 101."""
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            request, key = upgrade_request(f"{host}:{port}", path, headers)
            sock.sendall(request)
            head, rest = _read_head(sock, deadline)
            first, resp_headers = _parse_head(head)
            status, reason = _parse_status_line(first)
            if status != 101:
                body = _read_body(sock, rest, resp_headers, deadline)
                raise HandshakeError(status, reason, resp_headers, body)
            if resp_headers.get("upgrade", "").lower() != "websocket":
                raise ProtocolError(f"101 without Upgrade: websocket: {resp_headers}")
            if "upgrade" not in resp_headers.get("connection", "").lower():
                raise ProtocolError(f"101 without Connection: Upgrade: {resp_headers}")
            if resp_headers.get("sec-websocket-accept") != accept_key(key):
                raise ProtocolError(f"bad Sec-WebSocket-Accept: {resp_headers}")
            return cls(sock, client=True, leftover=rest, response_headers=resp_headers)
        except BaseException:
            sock.close()
            raise

    # -- writing --------------------------------------------------------

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, opcode, payload=b"", *, fin=True, rsv=0, length=None, mask=None):
        if mask is None:
            mask = self.client
        self.sock.sendall(encode_frame(opcode, payload, fin=fin, mask=mask, rsv=rsv, length=length))

    def send_binary(self, payload):
        self.send_frame(OP_BINARY, payload)

    def send_text(self, text):
        self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    def send_ping(self, payload=b""):
        self.send_frame(OP_PING, payload)

    def send_pong(self, payload=b""):
        self.send_frame(OP_PONG, payload)

    def send_close(self, code=1000, reason=""):
        self.send_frame(OP_CLOSE, close_payload(code, reason))

    def next_id(self):
        self._next_id += 1
        return self._next_id

    def send_msg(self, conn_id, mtype, payload=b"", msg_id=None):
        """Sends one tunnel message as one binary WebSocket message."""
        if isinstance(payload, str):
            payload = payload.encode()
        self.send_binary(encode_message(self.next_id() if msg_id is None else msg_id,
                                        conn_id, mtype, payload))

    def send_fragmented(self, message, sizes, between=()):
        """Sends one binary message split into frames of the given sizes (the
        rest goes in the last frame); `between` holds (opcode, payload)
        control frames sent after each non-final fragment."""
        pieces = []
        pos = 0
        for n in sizes:
            pieces.append(message[pos:pos + n])
            pos += n
        pieces.append(message[pos:])
        out = bytearray()
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            out += encode_frame(OP_BINARY if i == 0 else OP_CONT, piece, fin=last, mask=self.client)
            if not last:
                for op, payload in between:
                    out += encode_frame(op, payload, mask=self.client)
        self.sock.sendall(bytes(out))

    # -- reading --------------------------------------------------------

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except socket.timeout:
            raise TimeoutError("no frame before the deadline") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            raise SessionClosed(None, "EOF")
        self._buf += chunk

    def recv_frame(self, timeout=DEFAULT_TIMEOUT):
        """The next frame, as sent (no reassembly, no automatic answers).
        Raises SessionClosed on EOF and TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame, end = parse_frame(self._buf)
            except Partial:
                self._fill(deadline)
                continue
            del self._buf[:end]
            if not self.client and not frame.masked:
                self.unmasked_seen = True
            return frame

    def recv_message(self, timeout=DEFAULT_TIMEOUT, auto_pong=True):
        """The next whole message as (opcode, payload). Fragments are joined;
        Pings are answered (when auto_pong) and recorded, Pongs recorded;
        a Close frame is answered and raises SessionClosed."""
        deadline = time.monotonic() + timeout
        opcode = None
        parts = []
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if frame.opcode == OP_PING:
                self.pings.append(frame.payload)
                if auto_pong:
                    self.send_pong(frame.payload)
                continue
            if frame.opcode == OP_PONG:
                self.pongs.append(frame.payload)
                continue
            if frame.opcode == OP_CLOSE:
                self.close_code, self.close_reason = parse_close(frame.payload)
                try:
                    self.send_frame(OP_CLOSE, frame.payload[:2])
                except OSError:
                    pass
                self.closed = True
                raise SessionClosed(self.close_code, self.close_reason)
            if frame.opcode in (OP_TEXT, OP_BINARY):
                if opcode is not None:
                    raise ProtocolError("new data frame inside a fragmented message")
                opcode = frame.opcode
                parts = [frame.payload]
            elif frame.opcode == OP_CONT:
                if opcode is None:
                    raise ProtocolError("continuation without a start")
                parts.append(frame.payload)
            else:
                raise ProtocolError(f"unknown opcode {frame.opcode:#x}")
            if frame.fin:
                return opcode, b"".join(parts)

    def recv_tunnel(self, timeout=DEFAULT_TIMEOUT, skip=(SYNC_CONNECTIONS,)):
        """The next tunnel message whose type is not in skip."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.recv_message(max(0.0, deadline - time.monotonic()))
            if opcode != OP_BINARY:
                raise ProtocolError(f"text message from the peer: {payload[:100]!r}")
            msg = decode_message(payload)
            if msg.type in skip:
                continue
            return msg

    def recv_data(self, conn_id, nbytes, timeout=DEFAULT_TIMEOUT):
        """Collects DATA payloads for conn_id until nbytes have arrived.
        PAUSE/RESUME/SYNC are skipped; anything else is an error."""
        deadline = time.monotonic() + timeout
        out = bytearray()
        while len(out) < nbytes:
            msg = self.recv_tunnel(max(0.0, deadline - time.monotonic()),
                                   skip=(SYNC_CONNECTIONS, PAUSE, RESUME))
            if msg.type != DATA or msg.conn_id != conn_id:
                raise ProtocolError(f"expected DATA for {conn_id}, got {msg!r}")
            out += msg.payload
        return bytes(out)

    def wait_closed(self, timeout=DEFAULT_TIMEOUT):
        """Reads and drops everything until the peer ends the session.
        Returns the Close code (None when the TCP stream simply ended).
        Raises TimeoutError if the session is still up at the deadline."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.recv_message(max(0.0, deadline - time.monotonic()))
        except SessionClosed as e:
            return e.code
        except ProtocolError:
            # A peer that ends with a broken frame has still ended; drain.
            while True:
                try:
                    self.recv_frame(max(0.0, deadline - time.monotonic()))
                except SessionClosed:
                    return None

    def close(self):
        if not self.closed:
            try:
                self.sock.settimeout(1.0)
                self.send_close(1000)
            except OSError:
                pass
            self.closed = True
        self.sock.close()

    def abort(self):
        """Drops the TCP connection without a Close frame."""
        self.closed = True
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_head(sock, deadline, limit=65536):
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buf[:end]), bytes(buf[end + 4:])
        if len(buf) > limit:
            raise ProtocolError("HTTP head too long")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no HTTP head before the deadline: {bytes(buf[:200])!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise SessionClosed(None, f"EOF inside the HTTP head: {bytes(buf[:200])!r}")
        buf += chunk


def _read_body(sock, rest, headers, deadline):
    body = bytearray(rest)
    want = int(headers["content-length"]) if "content-length" in headers else None
    while want is None or len(body) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        body += chunk
    return bytes(body if want is None else body[:want])


@dataclass
class Request:
    method: str
    path: str
    headers: dict


class WSListener:
    """A raw WebSocket server on loopback: accepts one upgrade at a time and
    answers it itself, so a test can play the tunnel server byte by byte."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"ws://{host}:{self.port}/connect"

    def accept(self, timeout=DEFAULT_TIMEOUT, then=b""):
        """Waits for a client, reads its upgrade request and answers 101
        (with `then` in the same write: bytes that arrive with the upgrade).
        Returns (WSConn in the server role, Request)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        try:
            head, rest = _read_head(conn, deadline)
            first, headers = _parse_head(head)
            method, path, _version = first.split(" ", 2)
            key = headers.get("sec-websocket-key")
            if (method != "GET" or not key or headers.get("upgrade", "").lower() != "websocket"
                    or headers.get("sec-websocket-version") != "13"):
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                raise ProtocolError(f"bad upgrade request: {first!r} {headers}")
            conn.sendall((
                "HTTP/1.1 101 Switching Protocols\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode() + then)
            return WSConn(conn, client=False, leftover=rest), Request(method, path, headers)
        except BaseException:
            conn.close()
            raise

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
