"""The C unit tests (built and run from here, under ASan and UBSan), and the
test peer's own codec checked against vectors.json and RFC 6455, so that the
end-to-end tests that use it rest on a verified helper."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import wsraw

REPO = Path(__file__).resolve().parent.parent
VECTORS = json.loads((REPO / "tests" / "vectors.json").read_text())
C_TESTS = sorted((REPO / "tests" / "c").glob("test_*.c"))
# One C unit test program per parser, at least (ISSUE: "All three parsers
# are pure functions over buffers with their own C unit tests").
REQUIRED_C_TESTS = ("test_msg", "test_ws", "test_http")


def _compiler():
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand.split()[0]):
            return cand.split()
    return None


@pytest.fixture(scope="module")
def cc():
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH")
    return compiler


def test_required_c_unit_tests_exist():
    names = {p.stem for p in C_TESTS}
    missing = [n for n in REQUIRED_C_TESTS if n not in names]
    assert not missing, f"missing C unit tests: {missing}"


def _up_to_date(binary, source, engine_sources):
    """Like make: the binary is newer than everything it is built from (so
    the binaries `make ctest` just built are reused, not rebuilt)."""
    if not binary.exists():
        return False
    inputs = [source, REPO / "tests" / "c" / "rd_test.h", *engine_sources,
              *(REPO / "csrc").glob("*.h")]
    return binary.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


@pytest.mark.parametrize("source", C_TESTS, ids=lambda p: p.stem)
def test_c_unit(source, cc):
    """Builds tests/c/test_X.c with every engine source but the binding,
    exactly as `make ctest` does (build/ctest/test_X), and runs it from the
    repo root under ASan (leak detection on) and UBSan."""
    out_dir = REPO / "build" / "ctest"
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / source.stem
    engine_sources = [p for p in sorted((REPO / "csrc").glob("*.c")) if p.name != "rd_pymod.c"]
    if not _up_to_date(binary, source, engine_sources):
        # Built under a private name and renamed into place, so a concurrent
        # `make ctest` never runs a half-written binary.
        tmp = out_dir / f".{source.stem}.{os.getpid()}"
        cmd = [*cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-O1",
               "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-Icsrc",
               str(source.relative_to(REPO)), *(str(p.relative_to(REPO)) for p in engine_sources),
               "-luv", "-lssl", "-lcrypto", "-lpthread", "-o", str(tmp)]
        build = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        if build.returncode != 0:
            tmp.unlink(missing_ok=True)
        assert build.returncode == 0, f"build failed: {' '.join(cmd)}\n{build.stderr[-8000:]}"
        os.replace(tmp, binary)

    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:" + env.get("ASAN_OPTIONS", "")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:" + env.get("UBSAN_OPTIONS", "")
    run = subprocess.run([str(binary)], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=env)
    summary = re.search(r"^(\d+) passed, (\d+) failed$", run.stdout, re.M)
    report = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-8000:]}"
    assert summary, f"no 'N passed, N failed' line\n{report}"
    assert summary.group(2) == "0", report
    assert int(summary.group(1)) > 0, report
    assert run.returncode == 0, f"exit status {run.returncode}\n{report}"
    assert "ERROR: AddressSanitizer" not in run.stderr, report
    assert "ERROR: LeakSanitizer" not in run.stderr, report
    assert "runtime error:" not in run.stderr, report


# ---------------------------------------------------------------------------
# The test peer's codec


@pytest.mark.parametrize("ex", VECTORS["varint_examples"], ids=lambda e: str(e["value"]))
def test_varint_examples(ex):
    raw = bytes.fromhex(ex["hex"])
    assert wsraw.put_varint(ex["value"]) == raw
    assert wsraw.get_varint(raw) == (ex["value"], len(raw))
    for cut in range(len(raw)):
        with pytest.raises(wsraw.Partial):
            wsraw.get_varint(raw[:cut])


def test_varint_overflow_and_range():
    with pytest.raises(wsraw.Malformed):
        wsraw.get_varint(b"\xff" * 10 + b"\x01")
    with pytest.raises(wsraw.Malformed):
        wsraw.get_varint(b"\x80" * 9 + b"\x02")
    with pytest.raises(OverflowError):
        wsraw.put_varint(1 << 63)
    for v in (0, 1, -1, 127, -128, 300, -300, 1 << 40, -(1 << 62), (1 << 63) - 1, -(1 << 63)):
        raw = wsraw.put_varint(v)
        assert wsraw.get_varint(b"\xaa" + raw + b"\xbb", 1) == (v, 1 + len(raw))


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vectors(vec):
    payload = bytes.fromhex(vec["payload_hex"])
    raw = bytes.fromhex(vec["message_hex"])
    assert wsraw.TYPE_NAMES[vec["type_code"]] == vec["type"]
    assert wsraw.encode_message(vec["id"], vec["conn_id"], vec["type_code"], payload) == raw
    msg = wsraw.decode_message(raw)
    assert (msg.id, msg.conn_id, msg.type, msg.payload) == (
        vec["id"], vec["conn_id"], vec["type_code"], payload)
    if msg.type in (wsraw.DATA, wsraw.CONNECT):
        assert msg.deadline == wsraw.LEGACY_DEADLINE
    else:
        assert msg.deadline is None
    # Every cut inside the header is a truncated (malformed) message.
    for cut in range(msg.header_len):
        with pytest.raises(wsraw.Malformed):
            wsraw.decode_message(raw[:cut])


def test_valid_vector_fields():
    by_name = {v["name"]: wsraw.decode_message(bytes.fromhex(v["message_hex"]))
               for v in VECTORS["valid"]}
    assert by_name["connect_tcp"].proto == "tcp"
    assert by_name["connect_tcp"].address == "127.0.0.1:8080"
    assert by_name["connect_peer_routed"].proto == "foo::tcp"
    assert by_name["error_text"].text == "dial tcp 127.0.0.1:1: connect: connection refused"
    assert by_name["sync_connections"].sync_ids == [2, 3, 10]
    assert by_name["sync_connections_empty"].sync_ids == []
    assert wsraw.sync_payload([10, 2, 3]) == by_name["sync_connections"].payload


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors(vec):
    with pytest.raises(wsraw.Malformed):
        wsraw.decode_message(bytes.fromhex(vec["message_hex"]))


def test_unknown_type_decodes():
    raw = wsraw.put_varint(5) + wsraw.put_varint(0) + wsraw.put_varint(42) + b"xyz"
    msg = wsraw.decode_message(raw)
    assert (msg.type, msg.payload) == (42, b"xyz")


# RFC 6455 section 5.7 and section 1.3.
def test_rfc6455_examples():
    assert wsraw.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert wsraw.encode_frame(wsraw.OP_TEXT, b"Hello", mask=False) == bytes.fromhex("810548656c6c6f")
    masked = bytes.fromhex("818537fa213d7f9f4d5158")
    assert wsraw.encode_frame(wsraw.OP_TEXT, b"Hello", mask_key=bytes.fromhex("37fa213d")) == masked
    frame, end = wsraw.parse_frame(masked)
    assert (frame.fin, frame.opcode, frame.payload, frame.masked, end) == (
        True, wsraw.OP_TEXT, b"Hello", True, len(masked))
    first = bytes.fromhex("010348656c")
    last = bytes.fromhex("80026c6f")
    f1, _ = wsraw.parse_frame(first)
    f2, _ = wsraw.parse_frame(last)
    assert (f1.fin, f1.opcode, f1.payload, f2.fin, f2.opcode, f2.payload) == (
        False, wsraw.OP_TEXT, b"Hel", True, wsraw.OP_CONT, b"lo")
    ping = bytes.fromhex("890548656c6c6f")
    assert wsraw.encode_frame(wsraw.OP_PING, b"Hello", mask=False) == ping
    assert wsraw.encode_frame(wsraw.OP_BINARY, bytes(256), mask=False)[:4] == bytes.fromhex("827e0100")
    big = wsraw.encode_frame(wsraw.OP_BINARY, bytes(65536), mask=False)
    assert big[:10] == bytes.fromhex("827f0000000000010000")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200000])
@pytest.mark.parametrize("mask", [False, True])
def test_frame_round_trip_and_prefixes(size, mask):
    payload = os.urandom(size)
    raw = wsraw.encode_frame(wsraw.OP_BINARY, payload, mask=mask)
    frame, end = wsraw.parse_frame(raw + b"tail")
    assert (frame.payload, frame.masked, end) == (payload, mask, len(raw))
    header_len = len(raw) - size
    cuts = list(range(header_len))
    if size:
        cuts += [header_len, len(raw) - 1]  # header only; one byte short
    for cut in cuts:
        with pytest.raises(wsraw.Partial):
            wsraw.parse_frame(raw[:cut])


def test_lying_length_and_flags():
    raw = wsraw.encode_frame(wsraw.OP_BINARY, b"", mask=True, length=1 << 40, rsv=4, fin=False)
    assert raw[0] == 0x40 | wsraw.OP_BINARY
    assert raw[1] == 0x80 | 127
    assert int.from_bytes(raw[2:10], "big") == 1 << 40
    with pytest.raises(wsraw.Partial):
        wsraw.parse_frame(raw)


def test_mask_bytes_is_an_involution():
    key = b"\x01\x02\x03\x04"
    data = os.urandom(1001)
    once = wsraw.mask_bytes(data, key)
    assert once != data
    assert wsraw.mask_bytes(once, key) == data
    assert wsraw.mask_bytes(b"\x00\x00\x00\x00\x00", key) == b"\x01\x02\x03\x04\x01"


def test_close_payload():
    assert wsraw.parse_close(wsraw.close_payload(1002, "bad")) == (1002, "bad")
    assert wsraw.parse_close(b"") == (None, "")
