/* Tunnel message codec. The header is a run of Go zig-zag varints
 * (encoding/binary.PutVarint), so the rules below mirror binary.ReadVarint:
 * a varint is at most 10 bytes and its 10th byte may only be 0 or 1. */
#include "rd_msg.h"

#include <string.h>

#define RD_VARINT_MAX 10

size_t rd_varint_put(uint8_t *out, int64_t v) {
  /* Zig-zag maps small magnitudes of either sign to small unsigned values.
   * The shift is done on the unsigned value: left-shifting a negative
   * int64_t is undefined. */
  uint64_t u = (uint64_t)v << 1;
  if (v < 0)
    u = ~u;
  size_t n = 0;
  while (u >= 0x80) {
    out[n++] = (uint8_t)(u | 0x80);
    u >>= 7;
  }
  out[n++] = (uint8_t)u;
  return n;
}

int rd_varint_get(const uint8_t *buf, size_t len, int64_t *out) {
  uint64_t u = 0;
  unsigned shift = 0;
  for (size_t i = 0; i < RD_VARINT_MAX; i++) {
    if (i >= len)
      return RD_EPARTIAL;
    uint8_t b = buf[i];
    /* The 10th byte carries bit 63 only; anything more overflows 64 bits.
     * A 10th byte with the continuation bit set is caught here too. */
    if (i == RD_VARINT_MAX - 1 && b > 1)
      return RD_EMALFORMED;
    u |= (uint64_t)(b & 0x7f) << shift;
    if (b < 0x80) {
      /* Undo the zig-zag without signed overflow: (u >> 1) ^ -(u & 1). */
      uint64_t x = (u >> 1) ^ (~(u & 1) + 1);
      memcpy(out, &x, sizeof x);
      return (int)(i + 1);
    }
    shift += 7;
  }
  return RD_EMALFORMED; /* unreachable: the 10th byte always returns */
}

static int rd_msg_has_deadline(int64_t type) {
  return type == RD_MSG_DATA || type == RD_MSG_CONNECT;
}

size_t rd_msg_encode_header(uint8_t *out, int64_t id, int64_t conn_id, int type) {
  size_t n = rd_varint_put(out, id);
  n += rd_varint_put(out + n, conn_id);
  n += rd_varint_put(out + n, type);
  if (rd_msg_has_deadline(type))
    n += rd_varint_put(out + n, RD_MSG_LEGACY_DEADLINE);
  return n;
}

/* Reads one header varint at *off. Inside a whole message a varint that runs
 * past the end is as fatal as an over-long one. */
static int rd_msg_read_field(const uint8_t *buf, size_t len, size_t *off, int64_t *out) {
  int r = rd_varint_get(buf + *off, len - *off, out);
  if (r < 0)
    return RD_EMALFORMED;
  *off += (size_t)r;
  return RD_OK;
}

int rd_msg_decode(const uint8_t *buf, size_t len, rd_msg *out) {
  size_t off = 0;
  int64_t deadline;

  memset(out, 0, sizeof *out);
  if (rd_msg_read_field(buf, len, &off, &out->id) != RD_OK ||
      rd_msg_read_field(buf, len, &off, &out->conn_id) != RD_OK ||
      rd_msg_read_field(buf, len, &off, &out->type) != RD_OK)
    return RD_EMALFORMED;
  /* The deadline is read and ignored, as the Go receiver does. */
  if (rd_msg_has_deadline(out->type) &&
      rd_msg_read_field(buf, len, &off, &deadline) != RD_OK)
    return RD_EMALFORMED;

  out->payload = buf + off;
  out->payload_len = len - off;

  switch (out->type) {
  case RD_MSG_CONNECT: {
    /* The Go reader takes a bounded prefix and splits it at the first '/';
     * a '/' beyond the limit is as good as none. */
    if (out->payload_len > RD_MSG_CONNECT_LIMIT)
      out->payload_len = RD_MSG_CONNECT_LIMIT;
    const uint8_t *slash = out->payload_len ? memchr(out->payload, '/', out->payload_len) : NULL;
    if (slash == NULL)
      return RD_EMALFORMED;
    out->proto = out->payload;
    out->proto_len = (size_t)(slash - out->payload);
    out->address = slash + 1;
    out->address_len = out->payload_len - out->proto_len - 1;
    break;
  }
  case RD_MSG_ERROR:
    if (out->payload_len > RD_MSG_ERROR_LIMIT)
      out->payload_len = RD_MSG_ERROR_LIMIT;
    break;
  case RD_MSG_ADD_CLIENT:
  case RD_MSG_REMOVE_CLIENT:
    if (out->payload_len > RD_MSG_CLIENT_LIMIT)
      out->payload_len = RD_MSG_CLIENT_LIMIT;
    break;
  case RD_MSG_SYNC:
    if (out->payload_len % 8 != 0)
      return RD_EMALFORMED;
    break;
  default:
    /* DATA, PAUSE, RESUME and unknown types (which receivers ignore) keep
     * the whole rest of the message. */
    break;
  }
  return RD_OK;
}

size_t rd_msg_sync_count(const rd_msg *m) { return m->payload_len / 8; }

int64_t rd_msg_sync_id(const rd_msg *m, size_t i) {
  const uint8_t *p = m->payload + i * 8;
  uint64_t u = 0;
  for (int b = 7; b >= 0; b--)
    u = (u << 8) | p[b];
  int64_t v;
  memcpy(&v, &u, sizeof v); /* two's complement reinterpretation, no UB */
  return v;
}
