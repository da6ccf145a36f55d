/* WebSocket (RFC 6455) codec: frame headers, masking, message reassembly and
 * the handshake key. No I/O; the reader allocates only its reassembly buffer
 * through rd_alloc. */
#ifndef RD_WS_H
#define RD_WS_H

#include "rd_common.h"

enum rd_ws_opcode {
  RD_WS_CONT = 0x0,
  RD_WS_TEXT = 0x1,
  RD_WS_BINARY = 0x2,
  RD_WS_CLOSE = 0x8,
  RD_WS_PING = 0x9,
  RD_WS_PONG = 0xA
};

/* Close codes we send. */
enum {
  RD_WS_CLOSE_NORMAL = 1000,
  RD_WS_CLOSE_GOING_AWAY = 1001,
  RD_WS_CLOSE_PROTOCOL = 1002,
  RD_WS_CLOSE_UNSUPPORTED = 1003,
  RD_WS_CLOSE_TOO_BIG = 1009
};

/* Longest frame header: 2 + 8 (length) + 4 (mask). */
#define RD_WS_HEADER_MAX 14

typedef struct rd_ws_frame {
  int fin;
  int opcode;
  int masked;
  uint8_t mask[4];
  uint64_t payload_len;
  size_t header_len;
} rd_ws_frame;

/* Parses one frame header from buf[0..len). expect_masked: 1 when reading
 * frames from a client (server side), 0 when reading from a server.
 * Returns the header length (> 0), RD_EPARTIAL, or RD_EPROTO for: reserved
 * bits set, unknown opcode, control frame fragmented or over 125 bytes,
 * 64-bit length with the top bit set, wrong masking direction. */
int rd_ws_parse_header(const uint8_t *buf, size_t len, int expect_masked, rd_ws_frame *f);

/* Builds a frame header into out (RD_WS_HEADER_MAX bytes). mask is NULL for
 * an unmasked (server) frame, else the 4-byte key. Returns its length. */
size_t rd_ws_build_header(uint8_t *out, int fin, int opcode, uint64_t payload_len,
                          const uint8_t *mask);

/* XORs p[0..n) with mask, as if p started at byte `offset` of the payload. */
void rd_ws_mask(uint8_t *p, size_t n, const uint8_t mask[4], uint64_t offset);

/* Called by the reader for every complete message and control frame.
 * payload is unmasked and valid only during the call. Return 0 to go on,
 * nonzero to make rd_ws_reader_feed stop and return what it consumed. */
typedef int (*rd_ws_message_cb)(void *ctx, int opcode, uint8_t *payload, size_t len);

typedef struct rd_ws_reader {
  uint64_t max_message; /* data message size limit (sum of fragments) */
  /* Bit fields: every session embeds a reader. */
  unsigned expect_masked : 1;
  unsigned in_message : 1;     /* inside a fragmented data message */
  unsigned message_opcode : 4; /* TEXT or BINARY of that message */
  uint8_t *assembly;           /* rd_malloc'ed reassembly buffer */
  size_t assembly_len;
  size_t assembly_cap;
  size_t need; /* after a partial feed: total bytes the next frame needs */
} rd_ws_reader;

void rd_ws_reader_init(rd_ws_reader *r, int expect_masked, uint64_t max_message);
/* Frees the reassembly buffer. */
void rd_ws_reader_dispose(rd_ws_reader *r);

/* Consumes the complete frames at the start of buf[0..len), unmasking them in
 * place. An unfragmented data frame and every control frame (which may come
 * between fragments) go to cb pointing into buf; fragments are copied into the
 * reassembly buffer and the whole message goes to cb when the last arrives.
 * Returns bytes consumed (the caller keeps the rest and calls again with more
 * appended); r->need then holds the full size of the incomplete frame when its
 * header was readable, else 0. Errors: RD_EPROTO (bad frame, continuation
 * without a start, new data frame inside a message), RD_ETOOLARGE (message over
 * max_message), RD_ENOMEM. After an error the reader must not be fed again. */
int64_t rd_ws_reader_feed(rd_ws_reader *r, uint8_t *buf, size_t len, rd_ws_message_cb cb,
                          void *ctx);

/* 1 when p[0..len) is well-formed UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF), else 0. */
int rd_ws_utf8_valid(const uint8_t *p, size_t len);

/* 1 when a close code may be sent in a close frame (RFC 6455 section 7.4):
 * 1000-1003, 1007-1014 (defined or registered with IANA) and 3000-4999
 * (for libraries and applications); never 1004, 1005, 1006, 1015, the
 * unassigned 1016-2999, or anything below 1000 or from 5000. */
int rd_ws_close_code_valid(unsigned code);

/* Checks a received close frame's payload (RFC 6455 section 5.5.1): empty,
 * or a valid close code (rd_ws_close_code_valid) followed by a UTF-8
 * reason. Returns RD_OK, or RD_EPROTO for a 1-byte payload, a code that
 * may not be sent, or a reason that is not UTF-8; the peer is then answered
 * with RD_WS_CLOSE_PROTOCOL. When code is not NULL it receives the code
 * read (0 when the payload is empty or one byte). */
int rd_ws_close_check(const uint8_t *payload, size_t len, unsigned *code);

/* Sec-WebSocket-Accept for a key: base64(SHA-1(key + GUID)), NUL-terminated
 * in out (29 bytes). Returns RD_OK or RD_ENOMEM. */
int rd_ws_accept_key(const char *key, size_t key_len, char out[29]);

/* A fresh random Sec-WebSocket-Key (base64 of 16 bytes), NUL-terminated in
 * out (25 bytes). Returns RD_OK or RD_ENOMEM. */
int rd_ws_make_key(char out[25]);

/* Fills mask with 4 random bytes (used per client frame). */
void rd_ws_random_mask(uint8_t mask[4]);

#endif
