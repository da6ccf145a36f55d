/* libFuzzer target for the WebSocket reader and header parser. The first
 * byte picks the direction (bit 0), the message limit (bits 1-3) and whether
 * an allocation fails (bit 4); the second a chunk size; the rest is a frame
 * stream. It is read twice, whole and in chunks the way a connection
 * delivers it, and both readings must agree exactly (unless an injected
 * allocation failure cut the second one short). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_ws.h"
#include "fuzz.h"

/* A running digest of everything delivered, in order. */
typedef struct digest {
  uint64_t h;
  size_t count;
} digest;

static void mix(digest *d, const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    d->h = (d->h ^ p[i]) * 0x100000001b3ull;
}

static int digest_cb(void *ctx, int opcode, uint8_t *payload, size_t len) {
  digest *d = ctx;
  FUZZ_ASSERT(payload != NULL);
  FUZZ_ASSERT(opcode == RD_WS_TEXT || opcode == RD_WS_BINARY || opcode == RD_WS_CLOSE ||
              opcode == RD_WS_PING || opcode == RD_WS_PONG);
  if (opcode & 8)
    FUZZ_ASSERT(len <= 125);
  if (opcode == RD_WS_CLOSE) {
    /* The session's check of a received close frame: a verdict, and a
     * code it accepts is one an endpoint may send. */
    unsigned code;
    int rc = rd_ws_close_check(payload, len, &code);
    FUZZ_ASSERT(rc == RD_OK || rc == RD_EPROTO);
    FUZZ_ASSERT(rc == RD_EPROTO || len == 0 || rd_ws_close_code_valid(code));
    FUZZ_ASSERT(rc == RD_OK || len == 1 || !rd_ws_close_code_valid(code) ||
                !rd_ws_utf8_valid(payload + 2, len - 2));
  }
  uint8_t meta[9];
  meta[0] = (uint8_t)opcode;
  for (int i = 0; i < 8; i++)
    meta[1 + i] = (uint8_t)((uint64_t)len >> (8 * i));
  mix(d, meta, sizeof meta);
  mix(d, payload, len);
  d->count++;
  return 0;
}

static const uint64_t limits[8] = {0, 1, 125, 126, 1000, 65535, 65536, 1 << 20};

/* Feeds the stream in chunks through a pending buffer. Returns the first
 * error, or 0. */
static int64_t feed_chunked(rd_ws_reader *r, const uint8_t *s, size_t n, size_t chunk,
                            digest *d) {
  uint8_t *pending = malloc(n ? n : 1);
  FUZZ_ASSERT(pending != NULL);
  size_t have = 0, pos = 0;
  int64_t res = 0;
  while (pos < n) {
    size_t take = n - pos < chunk ? n - pos : chunk;
    memcpy(pending + have, s + pos, take);
    have += take;
    pos += take;
    int64_t used = rd_ws_reader_feed(r, pending, have, digest_cb, d);
    if (used < 0) {
      res = used;
      break;
    }
    FUZZ_ASSERT((size_t)used <= have);
    memmove(pending, pending + used, have - (size_t)used);
    have -= (size_t)used;
    FUZZ_ASSERT(r->need == 0 || r->need > have);
  }
  free(pending);
  return res;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2)
    return 0;
  int expect_masked = data[0] & 1;
  uint64_t max_message = limits[(data[0] >> 1) & 7];
  size_t chunk = (size_t)data[1] + 1;
  const uint8_t *s = data + 2;
  size_t n = size - 2;
  int64_t bytes_before = rd_alloc_bytes();

  /* The header parser alone. */
  rd_ws_frame f;
  int h = rd_ws_parse_header(s, n, expect_masked, &f);
  FUZZ_ASSERT(h == RD_EPARTIAL || h == RD_EPROTO || (h >= 2 && h <= RD_WS_HEADER_MAX));
  if (h > 0) {
    FUZZ_ASSERT((size_t)h == f.header_len && (size_t)h <= n);
    FUZZ_ASSERT(f.masked == expect_masked && (f.payload_len >> 63) == 0);
    /* Rebuilding the header gives the same frame (lengths re-encoded
     * minimally, so possibly shorter). */
    uint8_t hdr[RD_WS_HEADER_MAX];
    size_t k = rd_ws_build_header(hdr, f.fin, f.opcode, f.payload_len,
                                  f.masked ? f.mask : NULL);
    FUZZ_ASSERT(k <= (size_t)h);
    rd_ws_frame g;
    FUZZ_ASSERT(rd_ws_parse_header(hdr, k, expect_masked, &g) == (int)k);
    FUZZ_ASSERT(g.fin == f.fin && g.opcode == f.opcode && g.payload_len == f.payload_len &&
                memcmp(g.mask, f.mask, 4) == 0);
  }

  /* Whole: one feed over a private copy (the reader unmasks in place). */
  uint8_t *copy = malloc(n ? n : 1);
  FUZZ_ASSERT(copy != NULL);
  if (n > 0)
    memcpy(copy, s, n);
  rd_ws_reader ra;
  rd_ws_reader_init(&ra, expect_masked, max_message);
  digest da = {0xcbf29ce484222325ull, 0};
  int64_t used = rd_ws_reader_feed(&ra, copy, n, digest_cb, &da);
  FUZZ_ASSERT(used < 0 || (size_t)used <= n);
  int64_t res_a = used < 0 ? used : 0;
  FUZZ_ASSERT(res_a == 0 || res_a == RD_EPROTO || res_a == RD_ETOOLARGE ||
              res_a == RD_ENOMEM);
  rd_ws_reader_dispose(&ra);
  free(copy);

  /* Chunked: the same frames, the same verdict. */
  rd_ws_reader rb;
  rd_ws_reader_init(&rb, expect_masked, max_message);
  digest db = {0xcbf29ce484222325ull, 0};
  if (data[0] & 0x10)
    rd_alloc_fail_nth(data[1] & 3);
  int64_t res_b = feed_chunked(&rb, s, n, chunk, &db);
  rd_alloc_fail_nth(-1);
  rd_ws_reader_dispose(&rb);
  if (res_a != RD_ENOMEM && res_b != RD_ENOMEM) {
    FUZZ_ASSERT(res_a == res_b);
    FUZZ_ASSERT(da.count == db.count && da.h == db.h);
  }

  FUZZ_ASSERT(rd_alloc_bytes() == bytes_before);
  return 0;
}
