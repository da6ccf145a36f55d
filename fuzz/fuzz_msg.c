/* libFuzzer target for the tunnel message codec: decode any bytes, check
 * the result stays inside the input, and that re-encoding the header gives
 * a message that decodes to the same fields. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rd_msg.h"
#include "fuzz.h"

static void check_varint(const uint8_t *data, size_t size) {
  int64_t v;
  int n = rd_varint_get(data, size, &v);
  FUZZ_ASSERT(n == RD_EPARTIAL || n == RD_EMALFORMED || (n >= 1 && n <= 10 && (size_t)n <= size));
  if (n == RD_EPARTIAL)
    FUZZ_ASSERT(size < 10);
  if (n > 0) {
    /* The canonical encoding is never longer than what was read (which
     * may be non-minimal) and reads back to the same value. */
    uint8_t out[10];
    size_t k = rd_varint_put(out, v);
    FUZZ_ASSERT(k <= (size_t)n);
    int64_t w;
    FUZZ_ASSERT(rd_varint_get(out, k, &w) == (int)k && w == v);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  check_varint(data, size);

  rd_msg m;
  int r = rd_msg_decode(data, size, &m);
  FUZZ_ASSERT(r == RD_OK || r == RD_EMALFORMED);
  if (r != RD_OK)
    return 0;

  FUZZ_ASSERT(m.payload >= data && m.payload <= data + size);
  FUZZ_ASSERT(m.payload_len <= (size_t)(data + size - m.payload));
  size_t rest = (size_t)(data + size - m.payload);
  switch (m.type) {
  case RD_MSG_CONNECT:
    FUZZ_ASSERT(m.payload_len <= RD_MSG_CONNECT_LIMIT);
    FUZZ_ASSERT(m.proto == m.payload);
    FUZZ_ASSERT(m.proto_len + 1 + m.address_len == m.payload_len);
    FUZZ_ASSERT(m.payload[m.proto_len] == '/');
    FUZZ_ASSERT(memchr(m.proto, '/', m.proto_len) == NULL);
    FUZZ_ASSERT(m.address == m.payload + m.proto_len + 1);
    break;
  case RD_MSG_ERROR:
    FUZZ_ASSERT(m.payload_len <= RD_MSG_ERROR_LIMIT);
    break;
  case RD_MSG_ADD_CLIENT:
  case RD_MSG_REMOVE_CLIENT:
    FUZZ_ASSERT(m.payload_len <= RD_MSG_CLIENT_LIMIT);
    break;
  case RD_MSG_SYNC: {
    FUZZ_ASSERT(m.payload_len % 8 == 0);
    volatile int64_t sum = 0;
    for (size_t i = 0; i < rd_msg_sync_count(&m); i++)
      sum += rd_msg_sync_id(&m, i) & 1;
    (void)sum;
    break;
  }
  default:
    FUZZ_ASSERT(m.payload_len == rest);
    break;
  }

  /* Re-encode with the canonical header and the same rest of message. */
  if (m.type >= INT32_MIN && m.type <= INT32_MAX) {
    uint8_t *buf = malloc(RD_MSG_HEADER_MAX + rest + 1);
    if (buf == NULL)
      return 0;
    size_t h = rd_msg_encode_header(buf, m.id, m.conn_id, (int)m.type);
    FUZZ_ASSERT(h <= RD_MSG_HEADER_MAX);
    /* Canonical varints are never longer than what was read, except the
     * deadline: any value is accepted but 15000 is written (3 bytes). */
    FUZZ_ASSERT(h <= (size_t)(m.payload - data) + 2);
    if (rest > 0)
      memcpy(buf + h, m.payload, rest);
    rd_msg m2;
    FUZZ_ASSERT(rd_msg_decode(buf, h + rest, &m2) == RD_OK);
    FUZZ_ASSERT(m2.id == m.id && m2.conn_id == m.conn_id && m2.type == m.type);
    FUZZ_ASSERT(m2.payload_len == m.payload_len && m2.proto_len == m.proto_len &&
                m2.address_len == m.address_len);
    FUZZ_ASSERT(m.payload_len == 0 || memcmp(m2.payload, m.payload, m.payload_len) == 0);
    free(buf);
  }
  return 0;
}
