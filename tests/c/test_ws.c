/* WebSocket codec: frame headers, masking, the reassembling reader (byte at
 * a time, fragmented, interleaved with control frames, oversize, failing
 * allocations) and the handshake keys. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "rd_alloc.h"
#include "rd_test.h"
#include "rd_ws.h"

/* ---- Helpers ------------------------------------------------------------ */

/* Appends one frame (header plus payload, masked when mask != NULL) to out
 * and returns its length. */
static size_t put_frame(uint8_t *out, int fin, int opcode, const void *payload, size_t len,
                        const uint8_t *mask) {
  size_t h = rd_ws_build_header(out, fin, opcode, len, mask);
  if (len > 0) {
    memcpy(out + h, payload, len);
    if (mask != NULL)
      rd_ws_mask(out + h, len, mask, 0);
  }
  return h + len;
}

/* What the reader delivered, in order. */
#define LOG_MAX 64
typedef struct msg_log {
  int count;
  int opcode[LOG_MAX];
  uint8_t *data[LOG_MAX];
  size_t len[LOG_MAX];
  int stop_after; /* return nonzero from the callback after this many (0 = never) */
} msg_log;

static int log_cb(void *ctx, int opcode, uint8_t *payload, size_t len) {
  msg_log *lg = ctx;
  CHECK(payload != NULL);
  if (lg->count < LOG_MAX) {
    lg->opcode[lg->count] = opcode;
    lg->data[lg->count] = malloc(len ? len : 1);
    if (len > 0)
      memcpy(lg->data[lg->count], payload, len);
    lg->len[lg->count] = len;
  }
  lg->count++;
  return lg->stop_after != 0 && lg->count >= lg->stop_after;
}

static void log_clear(msg_log *lg) {
  for (int i = 0; i < lg->count && i < LOG_MAX; i++)
    free(lg->data[i]);
  memset(lg, 0, sizeof *lg);
}

/* Feeds stream[0..len) to the reader in chunks of `chunk` bytes the way a
 * connection would: unconsumed bytes stay in a pending buffer and the next
 * chunk is appended. Returns the first error, or the number of bytes left
 * unconsumed at the end. */
static int64_t feed_chunks(rd_ws_reader *r, const uint8_t *stream, size_t len, size_t chunk,
                           msg_log *lg) {
  uint8_t *pending = malloc(len ? len : 1);
  size_t have = 0, pos = 0;
  int64_t result = 0;
  while (pos < len) {
    size_t take = len - pos < chunk ? len - pos : chunk;
    memcpy(pending + have, stream + pos, take);
    have += take;
    pos += take;
    int64_t n = rd_ws_reader_feed(r, pending, have, log_cb, lg);
    if (n < 0) {
      result = n;
      break;
    }
    CHECK(n <= (int64_t)have);
    memmove(pending, pending + n, have - (size_t)n);
    have -= (size_t)n;
    /* need describes the frame still pending, if its header is readable. */
    if (have > 0 && r->need > 0)
      CHECK(r->need > have);
  }
  if (result == 0)
    result = (int64_t)have;
  free(pending);
  return result;
}

static void fill_pattern(uint8_t *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)(i * 31 + seed);
}

static const uint8_t MASK[4] = {0x37, 0xfa, 0x21, 0x3d};

/* ---- Frame headers ------------------------------------------------------ */

TEST(header_lengths) {
  static const uint64_t lens[] = {0, 1, 125, 126, 127, 65535, 65536, 1u << 31,
                                  (uint64_t)1 << 32, INT64_MAX};
  static const size_t want_h[] = {2, 2, 2, 4, 4, 4, 10, 10, 10, 10};
  for (size_t i = 0; i < RD_ARRAY_SIZE(lens); i++) {
    for (int masked = 0; masked <= 1; masked++) {
      uint8_t hdr[RD_WS_HEADER_MAX];
      size_t n = rd_ws_build_header(hdr, 1, RD_WS_BINARY, lens[i], masked ? MASK : NULL);
      CHECK_EQ_INT(n, want_h[i] + (masked ? 4 : 0));
      rd_ws_frame f;
      CHECK_EQ_INT(rd_ws_parse_header(hdr, n, masked, &f), (int)n);
      CHECK_EQ_INT(f.fin, 1);
      CHECK_EQ_INT(f.opcode, RD_WS_BINARY);
      CHECK_EQ_INT(f.masked, masked);
      CHECK(f.payload_len == lens[i]);
      CHECK_EQ_INT(f.header_len, n);
      if (masked)
        CHECK(memcmp(f.mask, MASK, 4) == 0);
      /* Every strict prefix of the header is incomplete. */
      for (size_t k = 0; k < n; k++)
        CHECK_EQ_INT(rd_ws_parse_header(hdr, k, masked, &f), RD_EPARTIAL);
    }
  }
}

TEST(header_bytes) {
  /* Hand-written frames from RFC 6455 section 5.7. */
  static const uint8_t hello_unmasked[] = {0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f};
  static const uint8_t hello_masked[] = {0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d,
                                         0x7f, 0x9f, 0x4d, 0x51, 0x58};
  static const uint8_t bin256[] = {0x82, 0x7e, 0x01, 0x00};
  static const uint8_t bin64k[] = {0x82, 0x7f, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00};
  rd_ws_frame f;
  CHECK_EQ_INT(rd_ws_parse_header(hello_unmasked, sizeof hello_unmasked, 0, &f), 2);
  CHECK_EQ_INT(f.opcode, RD_WS_TEXT);
  CHECK(f.payload_len == 5);
  CHECK_EQ_INT(rd_ws_parse_header(hello_masked, sizeof hello_masked, 1, &f), 6);
  CHECK(f.payload_len == 5);
  uint8_t p[5];
  memcpy(p, hello_masked + 6, 5);
  rd_ws_mask(p, 5, f.mask, 0);
  CHECK(memcmp(p, "Hello", 5) == 0);
  CHECK_EQ_INT(rd_ws_parse_header(bin256, sizeof bin256, 0, &f), 4);
  CHECK(f.payload_len == 256);
  CHECK_EQ_INT(rd_ws_parse_header(bin64k, sizeof bin64k, 0, &f), 10);
  CHECK(f.payload_len == 65536);
  /* Fragmented text "Hel" + "lo" (section 5.7). */
  static const uint8_t frag1[] = {0x01, 0x03};
  static const uint8_t frag2[] = {0x80, 0x02};
  CHECK_EQ_INT(rd_ws_parse_header(frag1, 2, 0, &f), 2);
  CHECK_EQ_INT(f.fin, 0);
  CHECK_EQ_INT(f.opcode, RD_WS_TEXT);
  CHECK_EQ_INT(rd_ws_parse_header(frag2, 2, 0, &f), 2);
  CHECK_EQ_INT(f.fin, 1);
  CHECK_EQ_INT(f.opcode, RD_WS_CONT);
  /* Non-minimal lengths are tolerated, as the Go reader tolerates them. */
  static const uint8_t nonmin[] = {0x82, 0x7e, 0x00, 0x05};
  CHECK_EQ_INT(rd_ws_parse_header(nonmin, sizeof nonmin, 0, &f), 4);
  CHECK(f.payload_len == 5);
}

TEST(header_errors) {
  rd_ws_frame f;
  uint8_t b[14] = {0};
  /* Reserved bits. */
  static const uint8_t rsv[] = {0x40, 0x20, 0x10};
  for (size_t i = 0; i < RD_ARRAY_SIZE(rsv); i++) {
    b[0] = (uint8_t)(0x80 | rsv[i] | RD_WS_BINARY);
    b[1] = 0x00;
    CHECK_EQ_INT(rd_ws_parse_header(b, 2, 0, &f), RD_EPROTO);
  }
  /* Unknown opcodes. */
  for (int op = 0; op < 16; op++) {
    b[0] = (uint8_t)(0x80 | op);
    b[1] = 0x00;
    int known = op == 0 || op == 1 || op == 2 || op == 8 || op == 9 || op == 10;
    CHECK_EQ_INT(rd_ws_parse_header(b, 2, 0, &f), known ? 2 : RD_EPROTO);
  }
  /* Fragmented control frames. */
  static const int controls[] = {RD_WS_CLOSE, RD_WS_PING, RD_WS_PONG};
  for (size_t i = 0; i < RD_ARRAY_SIZE(controls); i++) {
    b[0] = (uint8_t)controls[i];
    b[1] = 0x00;
    CHECK_EQ_INT(rd_ws_parse_header(b, 2, 0, &f), RD_EPROTO);
    /* Over 125 bytes, in every length form. */
    b[0] = (uint8_t)(0x80 | controls[i]);
    b[1] = 125;
    CHECK_EQ_INT(rd_ws_parse_header(b, 2, 0, &f), 2);
    b[1] = 126;
    CHECK_EQ_INT(rd_ws_parse_header(b, 2, 0, &f), RD_EPROTO);
    b[1] = 127;
    CHECK_EQ_INT(rd_ws_parse_header(b, 2, 0, &f), RD_EPROTO);
  }
  /* A 64-bit length with the top bit set. */
  b[0] = 0x82;
  b[1] = 0x7f;
  memset(b + 2, 0, 8);
  b[2] = 0x80;
  CHECK_EQ_INT(rd_ws_parse_header(b, 10, 0, &f), RD_EPROTO);
  b[2] = 0x7f;
  CHECK_EQ_INT(rd_ws_parse_header(b, 10, 0, &f), 10);
  /* Wrong masking direction, both ways: detected from two bytes. */
  b[0] = 0x82;
  b[1] = 0x80;
  CHECK_EQ_INT(rd_ws_parse_header(b, 2, 0, &f), RD_EPROTO);
  b[1] = 0x00;
  CHECK_EQ_INT(rd_ws_parse_header(b, 2, 1, &f), RD_EPROTO);
  /* One byte is always partial: the mask bit lives in the second. */
  b[0] = 0xff;
  CHECK_EQ_INT(rd_ws_parse_header(b, 1, 0, &f), RD_EPARTIAL);
}

TEST(build_header_round_trip) {
  static const uint64_t lens[] = {0, 5, 125, 126, 1000, 65535, 65536, 100000, (uint64_t)1 << 40};
  static const int ops[] = {RD_WS_CONT, RD_WS_TEXT, RD_WS_BINARY};
  for (size_t i = 0; i < RD_ARRAY_SIZE(lens); i++)
    for (size_t o = 0; o < RD_ARRAY_SIZE(ops); o++)
      for (int fin = 0; fin <= 1; fin++)
        for (int masked = 0; masked <= 1; masked++) {
          uint8_t hdr[RD_WS_HEADER_MAX];
          size_t n = rd_ws_build_header(hdr, fin, ops[o], lens[i], masked ? MASK : NULL);
          CHECK(n <= RD_WS_HEADER_MAX);
          rd_ws_frame f;
          CHECK_EQ_INT(rd_ws_parse_header(hdr, n, masked, &f), (int)n);
          CHECK_EQ_INT(f.fin, fin);
          CHECK_EQ_INT(f.opcode, ops[o]);
          CHECK(f.payload_len == lens[i]);
          CHECK_EQ_INT(f.masked, masked);
        }
  /* Control frames round trip too, up to 125 bytes. */
  static const int ctl[] = {RD_WS_CLOSE, RD_WS_PING, RD_WS_PONG};
  for (size_t o = 0; o < RD_ARRAY_SIZE(ctl); o++) {
    uint8_t hdr[RD_WS_HEADER_MAX];
    size_t n = rd_ws_build_header(hdr, 1, ctl[o], 125, NULL);
    rd_ws_frame f;
    CHECK_EQ_INT(rd_ws_parse_header(hdr, n, 0, &f), 2);
    CHECK_EQ_INT(f.opcode, ctl[o]);
  }
}

/* ---- Masking ------------------------------------------------------------ */

TEST(mask_matches_naive) {
  uint8_t src[300], fast[310], slow[300];
  fill_pattern(src, sizeof src, 7);
  for (size_t n = 0; n <= 100; n++)
    for (uint64_t offset = 0; offset < 9; offset++)
      for (size_t shift = 0; shift < 8; shift++) {
        /* Start at every alignment to exercise the unaligned word path. */
        memcpy(fast + shift, src, n);
        memcpy(slow, src, n);
        rd_ws_mask(fast + shift, n, MASK, offset);
        for (size_t i = 0; i < n; i++)
          slow[i] ^= MASK[(offset + i) % 4];
        CHECK(memcmp(fast + shift, slow, n) == 0);
      }
  /* Masking in pieces at running offsets equals masking the whole. */
  uint8_t whole[300], parts[300];
  memcpy(whole, src, sizeof src);
  memcpy(parts, src, sizeof src);
  rd_ws_mask(whole, sizeof whole, MASK, 0);
  size_t cuts[] = {0, 1, 4, 7, 33, 64, 65, 199, 300};
  for (size_t i = 0; i + 1 < RD_ARRAY_SIZE(cuts); i++)
    rd_ws_mask(parts + cuts[i], cuts[i + 1] - cuts[i], MASK, cuts[i]);
  CHECK(memcmp(whole, parts, sizeof whole) == 0);
  /* Masking twice restores the input. */
  rd_ws_mask(whole, sizeof whole, MASK, 0);
  CHECK(memcmp(whole, src, sizeof src) == 0);
}

/* ---- The reader --------------------------------------------------------- */

TEST(reader_one_byte_at_a_time) {
  int64_t before = rd_alloc_bytes();
  uint8_t payload[300], stream[400];
  fill_pattern(payload, sizeof payload, 1);
  size_t n = put_frame(stream, 1, RD_WS_BINARY, payload, sizeof payload, MASK);
  n += put_frame(stream + n, 1, RD_WS_PING, "hi", 2, MASK);
  rd_ws_reader r;
  rd_ws_reader_init(&r, 1, 1 << 20);
  msg_log lg = {0};
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 1, &lg), 0);
  CHECK_EQ_INT(lg.count, 2);
  CHECK_EQ_INT(lg.opcode[0], RD_WS_BINARY);
  CHECK_EQ_INT(lg.len[0], sizeof payload);
  CHECK(memcmp(lg.data[0], payload, sizeof payload) == 0);
  CHECK_EQ_INT(lg.opcode[1], RD_WS_PING);
  CHECK(lg.len[1] == 2 && memcmp(lg.data[1], "hi", 2) == 0);
  /* An unfragmented frame never touches the allocator. */
  CHECK(r.assembly == NULL);
  CHECK_EQ_INT(rd_alloc_bytes(), before);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
}

TEST(reader_need) {
  uint8_t payload[1000], stream[1100];
  fill_pattern(payload, sizeof payload, 2);
  size_t n = put_frame(stream, 1, RD_WS_BINARY, payload, sizeof payload, NULL);
  CHECK_EQ_INT(n, 1004);
  rd_ws_reader r;
  rd_ws_reader_init(&r, 0, 1 << 20);
  msg_log lg = {0};
  uint8_t copy[1100];
  memcpy(copy, stream, n);
  /* Header not yet readable: need is 0. */
  CHECK_EQ_INT(rd_ws_reader_feed(&r, copy, 3, log_cb, &lg), 0);
  CHECK_EQ_INT(r.need, 0);
  /* Header readable: need is the whole frame. */
  CHECK_EQ_INT(rd_ws_reader_feed(&r, copy, 4, log_cb, &lg), 0);
  CHECK_EQ_INT(r.need, 1004);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, copy, 1003, log_cb, &lg), 0);
  CHECK_EQ_INT(r.need, 1004);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, copy, 1004, log_cb, &lg), 1004);
  CHECK_EQ_INT(r.need, 0);
  CHECK_EQ_INT(lg.count, 1);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, copy, 0, log_cb, &lg), 0);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
}

/* A binary message split into three fragments with control frames in
 * between, as a client sends it (masked). */
static size_t fragmented_stream(uint8_t *out, const uint8_t *payload, size_t len,
                                const uint8_t *mask) {
  size_t a = len / 3, b = 2 * len / 3;
  size_t n = 0;
  n += put_frame(out + n, 0, RD_WS_BINARY, payload, a, mask);
  n += put_frame(out + n, 1, RD_WS_PING, "p1", 2, mask);
  n += put_frame(out + n, 0, RD_WS_CONT, payload + a, b - a, mask);
  n += put_frame(out + n, 1, RD_WS_PONG, NULL, 0, mask);
  n += put_frame(out + n, 1, RD_WS_PING, "p2", 2, mask);
  n += put_frame(out + n, 1, RD_WS_CONT, payload + b, len - b, mask);
  n += put_frame(out + n, 1, RD_WS_BINARY, "tail", 4, mask);
  return n;
}

static void check_fragmented_log(const msg_log *lg, const uint8_t *payload, size_t len) {
  CHECK_EQ_INT(lg->count, 5);
  if (lg->count != 5)
    return;
  CHECK_EQ_INT(lg->opcode[0], RD_WS_PING);
  CHECK(lg->len[0] == 2 && memcmp(lg->data[0], "p1", 2) == 0);
  CHECK_EQ_INT(lg->opcode[1], RD_WS_PONG);
  CHECK_EQ_INT(lg->len[1], 0);
  CHECK_EQ_INT(lg->opcode[2], RD_WS_PING);
  CHECK(lg->len[2] == 2 && memcmp(lg->data[2], "p2", 2) == 0);
  CHECK_EQ_INT(lg->opcode[3], RD_WS_BINARY);
  CHECK_EQ_INT(lg->len[3], len);
  CHECK(lg->len[3] == len && memcmp(lg->data[3], payload, len) == 0);
  CHECK_EQ_INT(lg->opcode[4], RD_WS_BINARY);
  CHECK(lg->len[4] == 4 && memcmp(lg->data[4], "tail", 4) == 0);
}

TEST(reader_fragmented_with_control_frames) {
  int64_t before = rd_alloc_bytes();
  uint8_t payload[5000], stream[6000];
  fill_pattern(payload, sizeof payload, 3);
  size_t n = fragmented_stream(stream, payload, sizeof payload, MASK);
  static const size_t chunks[] = {1, 2, 3, 7, 100, 6000};
  for (size_t c = 0; c < RD_ARRAY_SIZE(chunks); c++) {
    rd_ws_reader r;
    rd_ws_reader_init(&r, 1, sizeof payload);
    msg_log lg = {0};
    CHECK_EQ_INT(feed_chunks(&r, stream, n, chunks[c], &lg), 0);
    check_fragmented_log(&lg, payload, sizeof payload);
    CHECK_EQ_INT(r.in_message, 0);
    /* The buffer never grows past what a legal message can fill. */
    CHECK(r.assembly_cap <= sizeof payload);
    rd_ws_reader_dispose(&r);
    CHECK_EQ_INT(rd_alloc_bytes(), before);
    log_clear(&lg);
  }
  /* Unmasked, as read by a client. */
  n = fragmented_stream(stream, payload, sizeof payload, NULL);
  rd_ws_reader r;
  rd_ws_reader_init(&r, 0, sizeof payload);
  msg_log lg = {0};
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 1, &lg), 0);
  check_fragmented_log(&lg, payload, sizeof payload);
  rd_ws_reader_dispose(&r);
  CHECK_EQ_INT(rd_alloc_bytes(), before);
  log_clear(&lg);
}

/* Split the stream at every point: the first feed sees a prefix, the second
 * the rest appended. Nothing may be lost, repeated or misread. */
TEST(reader_every_prefix) {
  int64_t before = rd_alloc_bytes();
  uint8_t payload[400], stream[600];
  fill_pattern(payload, sizeof payload, 4);
  size_t n = fragmented_stream(stream, payload, sizeof payload, MASK);
  for (size_t k = 0; k <= n; k++) {
    rd_ws_reader r;
    rd_ws_reader_init(&r, 1, 1 << 16);
    msg_log lg = {0};
    /* The prefix sits at the end of an exact-size block. */
    uint8_t *first = malloc(k ? k : 1);
    memcpy(first, stream, k);
    int64_t used = rd_ws_reader_feed(&r, first, k, log_cb, &lg);
    CHECK(used >= 0 && used <= (int64_t)k);
    if (used < 0) {
      free(first);
      rd_ws_reader_dispose(&r);
      log_clear(&lg);
      continue;
    }
    size_t rest = n - (size_t)used;
    uint8_t *second = malloc(rest ? rest : 1);
    memcpy(second, first + used, k - (size_t)used);
    memcpy(second + (k - (size_t)used), stream + k, n - k);
    CHECK_EQ_INT(rd_ws_reader_feed(&r, second, rest, log_cb, &lg), rest);
    check_fragmented_log(&lg, payload, sizeof payload);
    free(first);
    free(second);
    rd_ws_reader_dispose(&r);
    log_clear(&lg);
  }
  CHECK_EQ_INT(rd_alloc_bytes(), before);
}

TEST(reader_text) {
  rd_ws_reader r;
  msg_log lg = {0};
  uint8_t stream[64];
  /* Unfragmented. */
  size_t n = put_frame(stream, 1, RD_WS_TEXT, "hello", 5, NULL);
  rd_ws_reader_init(&r, 0, 100);
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 64, &lg), 0);
  CHECK_EQ_INT(lg.count, 1);
  CHECK_EQ_INT(lg.opcode[0], RD_WS_TEXT);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
  /* Fragmented: the message keeps the first frame's opcode. */
  n = put_frame(stream, 0, RD_WS_TEXT, "Hel", 3, MASK);
  n += put_frame(stream + n, 1, RD_WS_CONT, "lo", 2, MASK);
  rd_ws_reader_init(&r, 1, 100);
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 64, &lg), 0);
  CHECK_EQ_INT(lg.count, 1);
  CHECK_EQ_INT(lg.opcode[0], RD_WS_TEXT);
  CHECK(lg.len[0] == 5 && memcmp(lg.data[0], "Hello", 5) == 0);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
}

TEST(reader_empty_messages) {
  rd_ws_reader r;
  msg_log lg = {0};
  uint8_t stream[64];
  size_t n = put_frame(stream, 1, RD_WS_BINARY, NULL, 0, NULL);
  n += put_frame(stream + n, 0, RD_WS_BINARY, NULL, 0, NULL);
  n += put_frame(stream + n, 0, RD_WS_CONT, NULL, 0, NULL);
  n += put_frame(stream + n, 1, RD_WS_CONT, NULL, 0, NULL);
  rd_ws_reader_init(&r, 0, 0);
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 1, &lg), 0);
  CHECK_EQ_INT(lg.count, 2);
  CHECK_EQ_INT(lg.len[0], 0);
  CHECK_EQ_INT(lg.len[1], 0);
  CHECK(r.assembly == NULL);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
}

TEST(reader_protocol_errors) {
  int64_t before = rd_alloc_bytes();
  rd_ws_reader r;
  msg_log lg = {0};
  uint8_t stream[64];
  /* Continuation without a start. */
  size_t n = put_frame(stream, 1, RD_WS_CONT, "x", 1, NULL);
  rd_ws_reader_init(&r, 0, 100);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, stream, n, log_cb, &lg), RD_EPROTO);
  rd_ws_reader_dispose(&r);
  /* Only its header is needed to know. */
  n = put_frame(stream, 0, RD_WS_CONT, "xyz", 3, NULL);
  rd_ws_reader_init(&r, 0, 100);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, stream, 2, log_cb, &lg), RD_EPROTO);
  rd_ws_reader_dispose(&r);
  /* A new data frame inside a fragmented message. */
  n = put_frame(stream, 0, RD_WS_BINARY, "ab", 2, NULL);
  n += put_frame(stream + n, 1, RD_WS_BINARY, "cd", 2, NULL);
  rd_ws_reader_init(&r, 0, 100);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, stream, n, log_cb, &lg), RD_EPROTO);
  rd_ws_reader_dispose(&r);
  /* Frame-level errors surface from the reader, after good frames. */
  n = put_frame(stream, 1, RD_WS_PING, NULL, 0, NULL);
  stream[n++] = 0x82;
  stream[n++] = 0x80; /* masked frame from a server */
  rd_ws_reader_init(&r, 0, 100);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, stream, n, log_cb, &lg), RD_EPROTO);
  CHECK_EQ_INT(lg.count, 1);
  rd_ws_reader_dispose(&r);
  CHECK_EQ_INT(rd_alloc_bytes(), before);
  log_clear(&lg);
}

TEST(reader_too_large) {
  int64_t before = rd_alloc_bytes();
  rd_ws_reader r;
  msg_log lg = {0};
  uint8_t hdr[RD_WS_HEADER_MAX];
  /* One frame whose header already says too much: refused from the
   * header, before its payload arrives. */
  size_t h = rd_ws_build_header(hdr, 1, RD_WS_BINARY, 1001, NULL);
  rd_ws_reader_init(&r, 0, 1000);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, hdr, h, log_cb, &lg), RD_ETOOLARGE);
  rd_ws_reader_dispose(&r);
  /* A huge 64-bit length, too. */
  h = rd_ws_build_header(hdr, 1, RD_WS_BINARY, INT64_MAX, MASK);
  rd_ws_reader_init(&r, 1, 1000);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, hdr, h, log_cb, &lg), RD_ETOOLARGE);
  rd_ws_reader_dispose(&r);
  /* A first fragment over the limit. */
  h = rd_ws_build_header(hdr, 0, RD_WS_BINARY, 1001, NULL);
  rd_ws_reader_init(&r, 0, 1000);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, hdr, h, log_cb, &lg), RD_ETOOLARGE);
  rd_ws_reader_dispose(&r);

  /* Fragments that sum past the limit: refused at the header of the
   * fragment that crosses it. */
  static uint8_t payload[1000], stream[1100];
  fill_pattern(payload, sizeof payload, 5);
  size_t n = put_frame(stream, 0, RD_WS_BINARY, payload, 600, NULL);
  size_t first = n;
  n += put_frame(stream + n, 1, RD_WS_CONT, payload, 401, NULL);
  rd_ws_reader_init(&r, 0, 1000);
  CHECK_EQ_INT(rd_ws_reader_feed(&r, stream, first + 4, log_cb, &lg), RD_ETOOLARGE);
  rd_ws_reader_dispose(&r);
  CHECK_EQ_INT(lg.count, 0);

  /* Exactly at the limit is fine, fragmented or not. */
  n = put_frame(stream, 0, RD_WS_BINARY, payload, 600, NULL);
  n += put_frame(stream + n, 1, RD_WS_CONT, payload + 600, 400, NULL);
  rd_ws_reader_init(&r, 0, 1000);
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 13, &lg), 0);
  CHECK_EQ_INT(lg.count, 1);
  CHECK(lg.len[0] == 1000 && memcmp(lg.data[0], payload, 1000) == 0);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
  n = put_frame(stream, 1, RD_WS_BINARY, payload, 1000, NULL);
  rd_ws_reader_init(&r, 0, 1000);
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 1100, &lg), 0);
  CHECK_EQ_INT(lg.count, 1);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
  /* Control frames are not subject to max_message. */
  n = put_frame(stream, 1, RD_WS_PING, payload, 125, NULL);
  rd_ws_reader_init(&r, 0, 10);
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 1100, &lg), 0);
  CHECK_EQ_INT(lg.count, 1);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
  CHECK_EQ_INT(rd_alloc_bytes(), before);
}

TEST(reader_callback_stops) {
  uint8_t stream[64];
  size_t a = put_frame(stream, 1, RD_WS_BINARY, "one", 3, NULL);
  size_t b = put_frame(stream + a, 1, RD_WS_PING, NULL, 0, NULL);
  size_t c = put_frame(stream + a + b, 1, RD_WS_BINARY, "two", 3, NULL);
  rd_ws_reader r;
  rd_ws_reader_init(&r, 0, 100);
  msg_log lg = {0};
  lg.stop_after = 1;
  CHECK_EQ_INT(rd_ws_reader_feed(&r, stream, a + b + c, log_cb, &lg), a);
  lg.stop_after = 0;
  CHECK_EQ_INT(rd_ws_reader_feed(&r, stream + a, b + c, log_cb, &lg), b + c);
  CHECK_EQ_INT(lg.count, 3);
  rd_ws_reader_dispose(&r);
  log_clear(&lg);
}

TEST(reader_large_fragmented_releases_buffer) {
  int64_t before = rd_alloc_bytes();
  size_t len = 300000;
  uint8_t *payload = malloc(len);
  uint8_t *stream = malloc(len + 100);
  fill_pattern(payload, len, 6);
  size_t n = put_frame(stream, 0, RD_WS_BINARY, payload, 1000, MASK);
  n += put_frame(stream + n, 0, RD_WS_CONT, payload + 1000, 100000, MASK);
  n += put_frame(stream + n, 1, RD_WS_CONT, payload + 101000, len - 101000, MASK);
  rd_ws_reader r;
  rd_ws_reader_init(&r, 1, 1 << 20);
  msg_log lg = {0};
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 4096, &lg), 0);
  CHECK_EQ_INT(lg.count, 1);
  CHECK(lg.len[0] == len && memcmp(lg.data[0], payload, len) == 0);
  /* A big buffer is not kept for the rest of the session. */
  CHECK(r.assembly == NULL);
  CHECK_EQ_INT(rd_alloc_bytes(), before);
  log_clear(&lg);
  /* A small one is kept and reused. */
  n = put_frame(stream, 0, RD_WS_BINARY, payload, 10, MASK);
  n += put_frame(stream + n, 1, RD_WS_CONT, payload + 10, 10, MASK);
  CHECK_EQ_INT(feed_chunks(&r, stream, n, 4096, &lg), 0);
  CHECK(r.assembly != NULL);
  rd_ws_reader_dispose(&r);
  CHECK(r.assembly == NULL);
  CHECK_EQ_INT(rd_alloc_bytes(), before);
  log_clear(&lg);
  free(payload);
  free(stream);
}

/* Fail the i-th allocation for every i until a run succeeds: every failure
 * must come back as RD_ENOMEM with nothing leaked. */
TEST(reader_failing_allocations) {
  int64_t before = rd_alloc_bytes();
  int64_t objects = rd_alloc_objects();
  static uint8_t payload[200000], stream[200100];
  fill_pattern(payload, sizeof payload, 8);
  /* Growth past the first buffer forces several reallocations. */
  size_t n = 0, off = 0;
  static const size_t pieces[] = {100, 5000, 20000, 70000, 104900};
  for (size_t i = 0; i < RD_ARRAY_SIZE(pieces); i++) {
    int last = i + 1 == RD_ARRAY_SIZE(pieces);
    n += put_frame(stream + n, last, i == 0 ? RD_WS_BINARY : RD_WS_CONT, payload + off,
                   pieces[i], MASK);
    if (!last)
      n += put_frame(stream + n, 1, RD_WS_PING, "x", 1, MASK);
    off += pieces[i];
  }
  CHECK_EQ_INT(off, sizeof payload);
  int succeeded = 0, failures = 0;
  for (int64_t i = 0; i < 100 && !succeeded; i++) {
    rd_ws_reader r;
    rd_ws_reader_init(&r, 1, sizeof payload);
    msg_log lg = {0};
    rd_alloc_fail_nth(i);
    int64_t res = feed_chunks(&r, stream, n, 3000, &lg);
    rd_alloc_fail_nth(-1);
    if (res == 0) {
      succeeded = 1;
      /* A ping after each fragment but the last, then the message. */
      CHECK_EQ_INT(lg.count, RD_ARRAY_SIZE(pieces));
      CHECK(lg.len[lg.count - 1] == sizeof payload &&
            memcmp(lg.data[lg.count - 1], payload, sizeof payload) == 0);
    } else {
      CHECK_EQ_INT(res, RD_ENOMEM);
      failures++;
    }
    rd_ws_reader_dispose(&r);
    CHECK_EQ_INT(rd_alloc_bytes(), before);
    CHECK_EQ_INT(rd_alloc_objects(), objects);
    log_clear(&lg);
  }
  CHECK(succeeded);
  CHECK(failures >= 2); /* the loop did walk real failure points */
}

/* ---- Handshake keys ----------------------------------------------------- */

/* ---- Close frames (RFC 6455 sections 5.5.1, 7.4) ---------------------- */

TEST(close_codes) {
  static const unsigned valid[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010,
                                   1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999};
  static const unsigned invalid[] = {0,    1,    999,  1004, 1005, 1006, 1015, 1016,
                                     1100, 2000, 2999, 5000, 5001, 65535};
  for (size_t i = 0; i < RD_ARRAY_SIZE(valid); i++) {
    uint8_t p[2] = {(uint8_t)(valid[i] >> 8), (uint8_t)valid[i]};
    unsigned code = 0;
    CHECK(rd_ws_close_code_valid(valid[i]));
    CHECK_EQ_INT(rd_ws_close_check(p, 2, &code), RD_OK);
    CHECK_EQ_INT(code, valid[i]);
  }
  for (size_t i = 0; i < RD_ARRAY_SIZE(invalid); i++) {
    uint8_t p[2] = {(uint8_t)(invalid[i] >> 8), (uint8_t)invalid[i]};
    unsigned code = 0;
    CHECK(!rd_ws_close_code_valid(invalid[i]));
    CHECK_EQ_INT(rd_ws_close_check(p, 2, &code), RD_EPROTO);
    CHECK_EQ_INT(code, invalid[i]);
  }
  /* Every code, against the ranges written out. */
  for (unsigned c = 0; c < 70000; c++) {
    int want = (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014) || (c >= 3000 && c < 5000);
    CHECK_EQ_INT(rd_ws_close_code_valid(c), want);
  }
}

TEST(close_payloads) {
  unsigned code = 7;
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"", 0, &code), RD_OK);
  CHECK_EQ_INT(code, 0);
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"\x03", 1, &code), RD_EPROTO);
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"\x03\xe8", 2, NULL), RD_OK);
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"\x03\xe8" "bye", 5, NULL), RD_OK);
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"\x03\xe8h\xc3\xa9", 5, NULL), RD_OK);
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"\x03\xe8\xff", 3, NULL), RD_EPROTO);
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"\x03\xe8\xc3", 3, NULL), RD_EPROTO);
  CHECK_EQ_INT(rd_ws_close_check((const uint8_t *)"\x03\xed" "bye", 5, NULL), RD_EPROTO);
  /* The longest a control frame carries: code and 123 bytes of reason. */
  uint8_t p[125];
  p[0] = 0x0f;
  p[1] = 0xa0; /* 4000 */
  memset(p + 2, 'r', sizeof p - 2);
  CHECK_EQ_INT(rd_ws_close_check(p, sizeof p, &code), RD_OK);
  CHECK_EQ_INT(code, 4000);
  /* Only len bytes are read. */
  uint8_t *exact = malloc(3);
  memcpy(exact, "\x03\xe8\xe2", 3);
  CHECK_EQ_INT(rd_ws_close_check(exact, 3, NULL), RD_EPROTO);
  CHECK_EQ_INT(rd_ws_close_check(exact, 2, NULL), RD_OK);
  free(exact);
}

TEST(utf8) {
  static const struct {
    const char *s;
    size_t len;
    int valid;
  } cases[] = {
      {"", 0, 1},
      {"plain ascii", 11, 1},
      {"\x00", 1, 1},
      {"\x7f", 1, 1},
      {"\xc2\x80", 2, 1},                  /* U+0080 */
      {"\xdf\xbf", 2, 1},                  /* U+07FF */
      {"\xe0\xa0\x80", 3, 1},              /* U+0800 */
      {"\xed\x9f\xbf", 3, 1},              /* U+D7FF */
      {"\xee\x80\x80", 3, 1},              /* U+E000 */
      {"\xef\xbf\xbf", 3, 1},              /* U+FFFF */
      {"\xf0\x90\x80\x80", 4, 1},          /* U+10000 */
      {"\xf4\x8f\xbf\xbf", 4, 1},          /* U+10FFFF */
      {"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", 11, 1},
      {"\x80", 1, 0},                      /* lone continuation */
      {"\xbf", 1, 0},
      {"\xc0\x80", 2, 0},                  /* overlong NUL */
      {"\xc1\xbf", 2, 0},                  /* overlong */
      {"\xe0\x9f\xbf", 3, 0},              /* overlong U+07FF */
      {"\xf0\x8f\xbf\xbf", 4, 0},          /* overlong U+FFFF */
      {"\xed\xa0\x80", 3, 0},              /* U+D800, a surrogate */
      {"\xed\xbf\xbf", 3, 0},              /* U+DFFF */
      {"\xf4\x90\x80\x80", 4, 0},          /* U+110000 */
      {"\xf5\x80\x80\x80", 4, 0},
      {"\xff", 1, 0},
      {"\xfe", 1, 0},
      {"\xc2", 1, 0},                      /* truncated */
      {"\xe2\x82", 2, 0},
      {"\xf0\x9f\x98", 3, 0},
      {"\xc2\x41", 2, 0},                  /* continuation missing */
      {"\xe2\x28\xa1", 3, 0},
      {"\xe2\x82\x28", 3, 0},
      {"\xf0\x9f\x98\x28", 4, 0},
      {"ok\xc3\xa9\xf0\x9f\x98\x80ok", 10, 1},
      {"ok\xc3\xa9\xf0\x9f\x98", 8, 0},
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(cases); i++) {
    uint8_t *buf = malloc(cases[i].len ? cases[i].len : 1);
    memcpy(buf, cases[i].s, cases[i].len);
    if (rd_ws_utf8_valid(buf, cases[i].len) != cases[i].valid)
      fprintf(stderr, "utf8 case %zu: want %d\n", i, cases[i].valid);
    CHECK_EQ_INT(rd_ws_utf8_valid(buf, cases[i].len), cases[i].valid);
    free(buf);
  }
  /* Every code point encodes to what the validator accepts, and every
   * surrogate's encoding is refused. */
  for (uint32_t cp = 0; cp <= 0x10FFFF; cp += (cp < 0x10000 ? 1 : 7)) {
    uint8_t b[4];
    size_t n;
    if (cp < 0x80) {
      b[0] = (uint8_t)cp;
      n = 1;
    } else if (cp < 0x800) {
      b[0] = (uint8_t)(0xC0 | cp >> 6);
      b[1] = (uint8_t)(0x80 | (cp & 0x3F));
      n = 2;
    } else if (cp < 0x10000) {
      b[0] = (uint8_t)(0xE0 | cp >> 12);
      b[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
      b[2] = (uint8_t)(0x80 | (cp & 0x3F));
      n = 3;
    } else {
      b[0] = (uint8_t)(0xF0 | cp >> 18);
      b[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
      b[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
      b[3] = (uint8_t)(0x80 | (cp & 0x3F));
      n = 4;
    }
    int want = !(cp >= 0xD800 && cp <= 0xDFFF);
    if (rd_ws_utf8_valid(b, n) != want) {
      fprintf(stderr, "utf8 U+%04X: want %d\n", (unsigned)cp, want);
      CHECK(0);
      break;
    }
  }
}

TEST(accept_key_rfc_example) {
  char out[29];
  static const char key[] = "dGhlIHNhbXBsZSBub25jZQ==";
  CHECK_EQ_INT(rd_ws_accept_key(key, strlen(key), out), RD_OK);
  CHECK(strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") == 0);
  /* Only key_len bytes of the key are used. */
  char longer[64];
  snprintf(longer, sizeof longer, "%sJUNK", key);
  CHECK_EQ_INT(rd_ws_accept_key(longer, strlen(key), out), RD_OK);
  CHECK(strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") == 0);
}

TEST(make_key_and_mask) {
  char a[25], b[25];
  CHECK_EQ_INT(rd_ws_make_key(a), RD_OK);
  CHECK_EQ_INT(rd_ws_make_key(b), RD_OK);
  CHECK_EQ_INT(strlen(a), 24);
  CHECK(strcmp(a, b) != 0);
  unsigned char raw[32];
  CHECK_EQ_INT(EVP_DecodeBlock(raw, (const unsigned char *)a, 24), 18); /* 16 + 2 pad */
  CHECK(a[22] == '=' && a[23] == '=');
  /* Two random masks agree with probability 2^-32 per try; three tries. */
  uint8_t m1[4], m2[4];
  int differ = 0;
  for (int i = 0; i < 3 && !differ; i++) {
    rd_ws_random_mask(m1);
    rd_ws_random_mask(m2);
    differ = memcmp(m1, m2, 4) != 0;
  }
  CHECK(differ);
}

RD_TEST_MAIN(T(close_codes), T(close_payloads), T(utf8), T(header_lengths), T(header_bytes), T(header_errors), T(build_header_round_trip),
             T(mask_matches_naive), T(reader_one_byte_at_a_time), T(reader_need),
             T(reader_fragmented_with_control_frames), T(reader_every_prefix), T(reader_text),
             T(reader_empty_messages), T(reader_protocol_errors), T(reader_too_large),
             T(reader_callback_stops), T(reader_large_fragmented_releases_buffer),
             T(reader_failing_allocations), T(accept_key_rfc_example), T(make_key_and_mask))
