/* WebSocket (RFC 6455) codec: frame headers, masking, message reassembly and
 * the handshake keys. No I/O; only the reassembly buffer is allocated. */
#include "rd_ws.h"

#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "rd_alloc.h"

/* RFC 6455 section 1.3: appended to the client's key before hashing. */
static const char rd_ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* Largest control frame payload (RFC 6455 section 5.5). */
#define RD_WS_CONTROL_MAX 125
/* First reassembly allocation; grows by doubling up to max_message. */
#define RD_WS_ASSEMBLY_MIN 4096
/* A reassembly buffer up to this size is kept for the next fragmented
 * message; a bigger one is released so one huge message does not pin its
 * memory for the rest of the session. */
#define RD_WS_ASSEMBLY_KEEP (64 * 1024)

static int rd_ws_opcode_known(int op) {
  return op == RD_WS_CONT || op == RD_WS_TEXT || op == RD_WS_BINARY || op == RD_WS_CLOSE ||
         op == RD_WS_PING || op == RD_WS_PONG;
}

static int rd_ws_is_control(int op) { return (op & 0x8) != 0; }

int rd_ws_utf8_valid(const uint8_t *p, size_t len) {
  size_t i = 0;
  while (i < len) {
    uint8_t c = p[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t n;
    uint8_t lo = 0x80, hi = 0xBF; /* the range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
      n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 3;
      if (c == 0xE0)
        lo = 0xA0; /* overlong */
      else if (c == 0xED)
        hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 4;
      if (c == 0xF0)
        lo = 0x90; /* overlong */
      else if (c == 0xF4)
        hi = 0x8F; /* above U+10FFFF */
    } else {
      return 0; /* a continuation byte, C0, C1 or F5-FF */
    }
    if (len - i < n || p[i + 1] < lo || p[i + 1] > hi)
      return 0;
    for (size_t k = 2; k < n; k++)
      if ((p[i + k] & 0xC0) != 0x80)
        return 0;
    i += n;
  }
  return 1;
}

int rd_ws_close_code_valid(unsigned code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
         (code >= 3000 && code <= 4999);
}

int rd_ws_close_check(const uint8_t *payload, size_t len, unsigned *code) {
  if (code != NULL)
    *code = 0;
  if (len == 0)
    return RD_OK;
  if (len == 1)
    return RD_EPROTO;
  unsigned c = (unsigned)payload[0] << 8 | payload[1];
  if (code != NULL)
    *code = c;
  if (!rd_ws_close_code_valid(c) || !rd_ws_utf8_valid(payload + 2, len - 2))
    return RD_EPROTO;
  return RD_OK;
}

int rd_ws_parse_header(const uint8_t *buf, size_t len, int expect_masked, rd_ws_frame *f) {
  if (len < 2)
    return RD_EPARTIAL;
  uint8_t b0 = buf[0], b1 = buf[1];
  /* No extension is negotiated, so RSV1-3 must be clear. */
  if (b0 & 0x70)
    return RD_EPROTO;
  f->fin = (b0 >> 7) & 1;
  f->opcode = b0 & 0x0f;
  f->masked = (b1 >> 7) & 1;
  if (!rd_ws_opcode_known(f->opcode))
    return RD_EPROTO;
  /* Clients must mask and servers must not (RFC 6455 section 5.1). */
  if (f->masked != (expect_masked ? 1 : 0))
    return RD_EPROTO;
  unsigned len7 = b1 & 0x7f;
  if (rd_ws_is_control(f->opcode) && (!f->fin || len7 > RD_WS_CONTROL_MAX))
    return RD_EPROTO;

  size_t n = 2;
  if (len7 == 126) {
    if (len < n + 2)
      return RD_EPARTIAL;
    f->payload_len = ((uint64_t)buf[2] << 8) | buf[3];
    n += 2;
  } else if (len7 == 127) {
    if (len < n + 8)
      return RD_EPARTIAL;
    uint64_t v = 0;
    for (size_t i = 0; i < 8; i++)
      v = (v << 8) | buf[2 + i];
    if (v >> 63)
      return RD_EPROTO;
    f->payload_len = v;
    n += 8;
  } else {
    f->payload_len = len7;
  }
  /* Non-minimal length encodings are accepted, as the Go (gorilla) reader
   * accepts them; they are harmless. */
  if (f->masked) {
    if (len < n + 4)
      return RD_EPARTIAL;
    memcpy(f->mask, buf + n, 4);
    n += 4;
  } else {
    memset(f->mask, 0, 4);
  }
  f->header_len = n;
  return (int)n;
}

size_t rd_ws_build_header(uint8_t *out, int fin, int opcode, uint64_t payload_len,
                          const uint8_t *mask) {
  size_t n = 2;
  out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 0x0f));
  uint8_t mbit = mask != NULL ? 0x80 : 0;
  if (payload_len < 126) {
    out[1] = (uint8_t)(mbit | payload_len);
  } else if (payload_len <= 0xffff) {
    out[1] = (uint8_t)(mbit | 126);
    out[2] = (uint8_t)(payload_len >> 8);
    out[3] = (uint8_t)payload_len;
    n = 4;
  } else {
    out[1] = (uint8_t)(mbit | 127);
    for (size_t i = 0; i < 8; i++)
      out[2 + i] = (uint8_t)(payload_len >> (56 - 8 * i));
    n = 10;
  }
  if (mask != NULL) {
    memcpy(out + n, mask, 4);
    n += 4;
  }
  return n;
}

void rd_ws_mask(uint8_t *p, size_t n, const uint8_t mask[4], uint64_t offset) {
  /* The key rotated to this offset, twice, so one 8-byte word covers two
   * periods. Byte arrays plus memcpy keep this free of alignment and
   * aliasing UB and independent of byte order; compilers turn the memcpys
   * into plain loads and stores. */
  uint8_t k[8];
  for (size_t j = 0; j < 8; j++)
    k[j] = mask[(offset + j) & 3];
  uint64_t kw;
  memcpy(&kw, k, sizeof kw);

  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w[4];
    memcpy(w, p + i, sizeof w);
    w[0] ^= kw;
    w[1] ^= kw;
    w[2] ^= kw;
    w[3] ^= kw;
    memcpy(p + i, w, sizeof w);
  }
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, sizeof w);
    w ^= kw;
    memcpy(p + i, &w, sizeof w);
  }
  /* i is a multiple of 8 here, so the key phase is still i & 3. */
  for (; i < n; i++)
    p[i] ^= k[i & 3];
}

void rd_ws_reader_init(rd_ws_reader *r, int expect_masked, uint64_t max_message) {
  memset(r, 0, sizeof *r);
  r->expect_masked = expect_masked ? 1 : 0;
  r->max_message = max_message;
}

void rd_ws_reader_dispose(rd_ws_reader *r) {
  rd_free(r->assembly);
  r->assembly = NULL;
  r->assembly_len = 0;
  r->assembly_cap = 0;
  r->in_message = 0;
}

/* Makes room for `extra` more bytes in the reassembly buffer. The caller has
 * already checked that assembly_len + extra <= max_message. */
static int rd_ws_reserve(rd_ws_reader *r, size_t extra) {
  size_t want = r->assembly_len + extra;
  if (want <= r->assembly_cap)
    return RD_OK;
  size_t cap = r->assembly_cap ? r->assembly_cap : RD_WS_ASSEMBLY_MIN;
  while (cap < want && cap <= SIZE_MAX / 2)
    cap *= 2;
  if (cap < want)
    cap = want;
  /* Do not grow past what a legal message can use. */
  if (cap > r->max_message)
    cap = (size_t)r->max_message;
  if (cap < want)
    cap = want;
  uint8_t *p = rd_realloc(r->assembly, cap);
  if (p == NULL)
    return RD_ENOMEM;
  r->assembly = p;
  r->assembly_cap = cap;
  return RD_OK;
}

int64_t rd_ws_reader_feed(rd_ws_reader *r, uint8_t *buf, size_t len, rd_ws_message_cb cb,
                          void *ctx) {
  size_t off = 0;
  r->need = 0;

  while (off < len) {
    rd_ws_frame f;
    int h = rd_ws_parse_header(buf + off, len - off, r->expect_masked, &f);
    if (h == RD_EPARTIAL)
      break;
    if (h < 0)
      return h;

    int control = rd_ws_is_control(f.opcode);
    if (!control) {
      if (f.opcode == RD_WS_CONT && !r->in_message)
        return RD_EPROTO;
      if (f.opcode != RD_WS_CONT && r->in_message)
        return RD_EPROTO;
      /* Refuse on the header alone, before any of the payload is buffered.
       * The sum cannot overflow: assembly_len <= max_message and
       * payload_len < 2^63 are checked one at a time. */
      uint64_t have = f.opcode == RD_WS_CONT ? r->assembly_len : 0;
      if (f.payload_len > r->max_message || have > r->max_message - f.payload_len)
        return RD_ETOOLARGE;
    }

    /* payload_len < 2^63 and the header is at most 14 bytes. */
    uint64_t frame_len = (uint64_t)h + f.payload_len;
#if SIZE_MAX < UINT64_MAX
    if (frame_len > SIZE_MAX)
      return RD_ETOOLARGE;
#endif
    if (frame_len > len - off) {
      r->need = (size_t)frame_len;
      break;
    }

    uint8_t *payload = buf + off + h;
    size_t plen = (size_t)f.payload_len;
    int stop = 0;

    if (control || (f.opcode != RD_WS_CONT && f.fin)) {
      /* Delivered straight from the caller's buffer: no copy, no malloc. */
      if (f.masked)
        rd_ws_mask(payload, plen, f.mask, 0);
      off += (size_t)frame_len;
      stop = cb(ctx, f.opcode, payload, plen);
    } else {
      /* A fragment: reserve before touching anything, so a failed
       * allocation leaves the caller's bytes as they were. */
      if (rd_ws_reserve(r, plen) != RD_OK)
        return RD_ENOMEM;
      if (plen > 0) {
        uint8_t *dst = r->assembly + r->assembly_len;
        memcpy(dst, payload, plen);
        if (f.masked)
          rd_ws_mask(dst, plen, f.mask, 0);
        r->assembly_len += plen;
      }
      if (f.opcode != RD_WS_CONT) {
        r->in_message = 1;
        r->message_opcode = f.opcode;
      }
      off += (size_t)frame_len;
      if (f.fin) {
        uint8_t empty = 0;
        r->in_message = 0;
        stop = cb(ctx, r->message_opcode, r->assembly_len ? r->assembly : &empty,
                  r->assembly_len);
        r->assembly_len = 0;
        if (r->assembly_cap > RD_WS_ASSEMBLY_KEEP) {
          rd_free(r->assembly);
          r->assembly = NULL;
          r->assembly_cap = 0;
        }
      }
    }
    if (stop)
      break;
  }
  return (int64_t)off;
}

int rd_ws_accept_key(const char *key, size_t key_len, char out[29]) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  int ok = 0;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  if (ctx != NULL) {
    ok = EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) == 1 &&
         EVP_DigestUpdate(ctx, key, key_len) == 1 &&
         EVP_DigestUpdate(ctx, rd_ws_guid, sizeof rd_ws_guid - 1) == 1 &&
         EVP_DigestFinal_ex(ctx, md, &md_len) == 1 && md_len == 20;
    EVP_MD_CTX_free(ctx);
  }
  if (!ok)
    return RD_ENOMEM;
  /* 20 bytes encode to 28 characters plus the NUL EVP_EncodeBlock adds. */
  EVP_EncodeBlock((unsigned char *)out, md, 20);
  return RD_OK;
}

int rd_ws_make_key(char out[25]) {
  unsigned char raw[16];
  if (RAND_bytes(raw, sizeof raw) != 1)
    return RD_ENOMEM;
  EVP_EncodeBlock((unsigned char *)out, raw, sizeof raw);
  return RD_OK;
}

void rd_ws_random_mask(uint8_t mask[4]) {
  if (RAND_bytes(mask, 4) == 1)
    return;
  /* The mask only stops a client's bytes from being predictable to
   * intermediaries (RFC 6455 section 10.3); if the CSPRNG ever fails, a
   * varying fallback is still better than a constant key. */
  static _Thread_local uint32_t state = 0x9e3779b9u;
  uint32_t x = state ^ (uint32_t)(uintptr_t)mask;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  state = x;
  memcpy(mask, &x, 4);
}
