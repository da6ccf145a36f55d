/* Tunnel message codec: byte-exact against tests/vectors.json, every prefix
 * of every valid message, and the readers' payload limits. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_msg.h"
#include "rd_test.h"

#define VECTORS_PATH "tests/vectors.json"

/* ---- A tiny scanner for vectors.json -----------------------------------
 * The file is a fixed shape: three arrays of flat objects whose values are
 * integers or escape-free strings. This reads exactly that shape and fails
 * loudly on anything else, so no JSON library is needed. */

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  char *data = NULL;
  size_t cap = 0, n = 0;
  for (;;) {
    if (n == cap) {
      cap = cap ? cap * 2 : 8192;
      char *p = realloc(data, cap + 1);
      if (p == NULL) {
        free(data);
        fclose(f);
        return NULL;
      }
      data = p;
    }
    size_t got = fread(data + n, 1, cap - n, f);
    if (got == 0)
      break;
    n += got;
  }
  fclose(f);
  data[n] = '\0';
  *len = n;
  return data;
}

/* The body of the array named `key`: [*begin, *end) spans its objects. */
static int json_array(const char *doc, const char *key, const char **begin, const char **end) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char *p = strstr(doc, pat);
  if (p == NULL)
    return -1;
  p = strchr(p + strlen(pat), '[');
  if (p == NULL)
    return -1;
  const char *q = strchr(p, ']'); /* the arrays hold no nested arrays */
  if (q == NULL)
    return -1;
  *begin = p + 1;
  *end = q;
  return 0;
}

/* The next flat object in [*cur, end); advances *cur past it. */
static int json_next_object(const char **cur, const char *end, const char **ob, const char **oe) {
  const char *p = *cur;
  while (p < end && *p != '{')
    p++;
  if (p >= end)
    return 0;
  const char *q = p;
  while (q < end && *q != '}')
    q++;
  if (q >= end)
    return 0;
  *ob = p;
  *oe = q;
  *cur = q + 1;
  return 1;
}

/* The raw text of `key`'s value inside object [ob, oe): a string's
 * contents (without quotes) or a number's digits. */
static int json_field(const char *ob, const char *oe, const char *key, const char **vb,
                      const char **ve) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  size_t pl = strlen(pat);
  for (const char *p = ob; p + pl <= oe; p++) {
    if (memcmp(p, pat, pl) != 0)
      continue;
    p += pl;
    while (p < oe && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
      p++;
    if (p >= oe || *p != ':')
      return -1;
    p++;
    while (p < oe && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
      p++;
    if (p < oe && *p == '"') {
      const char *q = memchr(p + 1, '"', (size_t)(oe - p - 1));
      if (q == NULL || memchr(p + 1, '\\', (size_t)(q - p - 1)) != NULL)
        return -1;
      *vb = p + 1;
      *ve = q;
      return 0;
    }
    const char *q = p;
    while (q < oe && (*q == '-' || (*q >= '0' && *q <= '9')))
      q++;
    if (q == p)
      return -1;
    *vb = p;
    *ve = q;
    return 0;
  }
  return -1;
}

static int json_int(const char *ob, const char *oe, const char *key, int64_t *out) {
  const char *vb, *ve;
  if (json_field(ob, oe, key, &vb, &ve) != 0 || ve - vb >= 32)
    return -1;
  char tmp[32];
  memcpy(tmp, vb, (size_t)(ve - vb));
  tmp[ve - vb] = '\0';
  char *endp;
  long long v = strtoll(tmp, &endp, 10);
  if (*endp != '\0')
    return -1;
  *out = (int64_t)v;
  return 0;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Decodes `key`'s hex string into a new malloc block (never NULL on
 * success, even when empty). */
static int json_hex(const char *ob, const char *oe, const char *key, uint8_t **out, size_t *len) {
  const char *vb, *ve;
  if (json_field(ob, oe, key, &vb, &ve) != 0 || (ve - vb) % 2 != 0)
    return -1;
  size_t n = (size_t)(ve - vb) / 2;
  uint8_t *b = malloc(n ? n : 1);
  if (b == NULL)
    return -1;
  for (size_t i = 0; i < n; i++) {
    int hi = hexval(vb[2 * i]), lo = hexval(vb[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      free(b);
      return -1;
    }
    b[i] = (uint8_t)(hi << 4 | lo);
  }
  *out = b;
  *len = n;
  return 0;
}

static int json_str(const char *ob, const char *oe, const char *key, char *out, size_t cap) {
  const char *vb, *ve;
  if (json_field(ob, oe, key, &vb, &ve) != 0 || (size_t)(ve - vb) >= cap)
    return -1;
  memcpy(out, vb, (size_t)(ve - vb));
  out[ve - vb] = '\0';
  return 0;
}

/* The whole file, loaded once. */
static char *vectors;

static const char *load_vectors(void) {
  if (vectors == NULL) {
    size_t n;
    vectors = read_file(VECTORS_PATH, &n);
  }
  return vectors;
}

/* A copy of b placed in an exact-size block, so ASan flags any read past
 * the end. */
static uint8_t *exact_copy(const uint8_t *b, size_t n) {
  uint8_t *p = calloc(n ? n : 1, 1);
  if (p != NULL && n > 0)
    memcpy(p, b, n);
  return p == NULL ? NULL : (n ? p : p + 1);
}

static void exact_free(uint8_t *p, size_t n) { free(n ? p : p - 1); }

/* ---- Varints ----------------------------------------------------------- */

TEST(varint_examples) {
  const char *doc = load_vectors();
  CHECK(doc != NULL);
  if (doc == NULL)
    return;
  const char *cur = NULL, *end = NULL, *ob, *oe;
  CHECK(json_array(doc, "varint_examples", &cur, &end) == 0);
  int count = 0;
  while (cur != NULL && json_next_object(&cur, end, &ob, &oe)) {
    int64_t value = 0;
    uint8_t *want;
    size_t want_len;
    CHECK(json_int(ob, oe, "value", &value) == 0);
    if (json_hex(ob, oe, "hex", &want, &want_len) != 0) {
      CHECK(!"bad hex in varint example");
      continue;
    }
    uint8_t out[10];
    size_t n = rd_varint_put(out, value);
    CHECK_EQ_INT(n, want_len);
    CHECK(n == want_len && memcmp(out, want, n) == 0);

    uint8_t *exact = exact_copy(want, want_len);
    int64_t got = 0;
    CHECK_EQ_INT(rd_varint_get(exact, want_len, &got), (int)want_len);
    CHECK_EQ_INT(got, value);
    /* Every strict prefix is incomplete, never malformed or misread. */
    for (size_t k = 0; k < want_len; k++)
      CHECK_EQ_INT(rd_varint_get(exact, k, &got), RD_EPARTIAL);
    exact_free(exact, want_len);
    free(want);
    count++;
  }
  CHECK(count >= 10);
}

TEST(varint_round_trip) {
  int64_t values[200];
  size_t nv = 0;
  values[nv++] = 0;
  values[nv++] = INT64_MAX;
  values[nv++] = INT64_MIN;
  for (int s = 0; s < 63; s++) {
    int64_t p = (int64_t)1 << s;
    values[nv++] = p;
    values[nv++] = p - 1;
    values[nv++] = -p;
  }
  for (size_t i = 0; i < nv; i++) {
    uint8_t out[10];
    size_t n = rd_varint_put(out, values[i]);
    CHECK(n >= 1 && n <= 10);
    int64_t got = 0;
    CHECK_EQ_INT(rd_varint_get(out, n, &got), (int)n);
    CHECK_EQ_INT(got, values[i]);
    /* Trailing bytes are not read. */
    uint8_t longer[11];
    memcpy(longer, out, n);
    longer[n] = 0xff;
    CHECK_EQ_INT(rd_varint_get(longer, n + 1, &got), (int)n);
    CHECK_EQ_INT(got, values[i]);
  }
}

TEST(varint_malformed) {
  int64_t v = 0;
  /* Eleven bytes: the 10th has the continuation bit, so it is over-long. */
  static const uint8_t eleven[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                   0xff, 0xff, 0xff, 0xff, 0x01};
  CHECK_EQ_INT(rd_varint_get(eleven, sizeof eleven, &v), RD_EMALFORMED);
  /* Ten bytes whose last is 2: bit 64 would be set. */
  static const uint8_t ten2[] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02};
  CHECK_EQ_INT(rd_varint_get(ten2, sizeof ten2, &v), RD_EMALFORMED);
  /* Ten continuation bytes and nothing more: over-long already. */
  static const uint8_t ten80[] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80};
  CHECK_EQ_INT(rd_varint_get(ten80, sizeof ten80, &v), RD_EMALFORMED);
  /* Nine continuation bytes: could still end well. */
  CHECK_EQ_INT(rd_varint_get(ten80, 9, &v), RD_EPARTIAL);
  /* A 10th byte of 1 is the largest legal one. */
  static const uint8_t ten1[] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01};
  CHECK_EQ_INT(rd_varint_get(ten1, sizeof ten1, &v), 10);
  CHECK_EQ_INT(v, (int64_t)1 << 62); /* u = 2^63, un-zig-zagged */
  CHECK_EQ_INT(rd_varint_get(ten1, 0, &v), RD_EPARTIAL);
  /* Go accepts non-minimal encodings; so do we. */
  static const uint8_t nonmin[] = {0x80, 0x00};
  CHECK_EQ_INT(rd_varint_get(nonmin, sizeof nonmin, &v), 2);
  CHECK_EQ_INT(v, 0);
}

/* ---- Messages from vectors.json ---------------------------------------- */

typedef struct vec_msg {
  char name[64];
  int64_t id, conn_id, type;
  uint8_t *payload;
  size_t payload_len;
  uint8_t *message;
  size_t message_len;
} vec_msg;

static int load_valid(vec_msg *out, int cap) {
  const char *doc = load_vectors();
  const char *cur, *end, *ob, *oe;
  if (doc == NULL || json_array(doc, "valid", &cur, &end) != 0)
    return -1;
  int n = 0;
  while (n < cap && json_next_object(&cur, end, &ob, &oe)) {
    vec_msg *m = &out[n];
    memset(m, 0, sizeof *m);
    if (json_str(ob, oe, "name", m->name, sizeof m->name) != 0 ||
        json_int(ob, oe, "id", &m->id) != 0 || json_int(ob, oe, "conn_id", &m->conn_id) != 0 ||
        json_int(ob, oe, "type_code", &m->type) != 0 ||
        json_hex(ob, oe, "payload_hex", &m->payload, &m->payload_len) != 0)
      return -1;
    if (json_hex(ob, oe, "message_hex", &m->message, &m->message_len) != 0) {
      free(m->payload);
      return -1;
    }
    n++;
  }
  return n;
}

static void free_valid(vec_msg *v, int n) {
  for (int i = 0; i < n; i++) {
    free(v[i].payload);
    free(v[i].message);
  }
}

TEST(valid_vectors_encode) {
  vec_msg v[64];
  int n = load_valid(v, 64);
  CHECK(n >= 14);
  for (int i = 0; i < n; i++) {
    uint8_t buf[RD_MSG_HEADER_MAX + 512];
    size_t h = rd_msg_encode_header(buf, v[i].id, v[i].conn_id, (int)v[i].type);
    CHECK(h <= RD_MSG_HEADER_MAX);
    CHECK(h + v[i].payload_len <= sizeof buf);
    if (h + v[i].payload_len > sizeof buf)
      continue;
    memcpy(buf + h, v[i].payload, v[i].payload_len);
    if (h + v[i].payload_len != v[i].message_len ||
        memcmp(buf, v[i].message, v[i].message_len) != 0) {
      fprintf(stderr, "encode mismatch: %s\n", v[i].name);
      CHECK(0);
    }
  }
  free_valid(v, n);
}

TEST(valid_vectors_decode) {
  vec_msg v[64];
  int n = load_valid(v, 64);
  CHECK(n >= 14);
  int64_t before = rd_alloc_bytes();
  for (int i = 0; i < n; i++) {
    uint8_t *exact = exact_copy(v[i].message, v[i].message_len);
    rd_msg m;
    int r = rd_msg_decode(exact, v[i].message_len, &m);
    if (r != RD_OK) {
      fprintf(stderr, "decode failed: %s\n", v[i].name);
      CHECK(0);
      exact_free(exact, v[i].message_len);
      continue;
    }
    CHECK_EQ_INT(m.id, v[i].id);
    CHECK_EQ_INT(m.conn_id, v[i].conn_id);
    CHECK_EQ_INT(m.type, v[i].type);
    CHECK_EQ_INT(m.payload_len, v[i].payload_len);
    CHECK(m.payload_len == v[i].payload_len &&
          (m.payload_len == 0 || memcmp(m.payload, v[i].payload, m.payload_len) == 0));
    CHECK(m.payload + m.payload_len == exact + v[i].message_len);
    if (m.type == RD_MSG_CONNECT) {
      const uint8_t *slash = memchr(v[i].payload, '/', v[i].payload_len);
      CHECK(slash != NULL);
      if (slash != NULL) {
        size_t pl = (size_t)(slash - v[i].payload);
        CHECK_EQ_INT(m.proto_len, pl);
        CHECK(m.proto == m.payload);
        CHECK(m.address == m.payload + pl + 1);
        CHECK_EQ_INT(m.address_len, v[i].payload_len - pl - 1);
      }
    }
    if (m.type == RD_MSG_SYNC) {
      CHECK_EQ_INT(rd_msg_sync_count(&m), v[i].payload_len / 8);
    }
    exact_free(exact, v[i].message_len);
  }
  CHECK_EQ_INT(rd_alloc_bytes(), before);
  free_valid(v, n);
}

TEST(sync_vector_ids) {
  /* sync_connections carries ids 2, 3 and 10. */
  vec_msg v[64];
  int n = load_valid(v, 64);
  int seen = 0;
  for (int i = 0; i < n; i++) {
    if (strcmp(v[i].name, "sync_connections") != 0)
      continue;
    rd_msg m;
    CHECK_EQ_INT(rd_msg_decode(v[i].message, v[i].message_len, &m), RD_OK);
    CHECK_EQ_INT(rd_msg_sync_count(&m), 3);
    CHECK_EQ_INT(rd_msg_sync_id(&m, 0), 2);
    CHECK_EQ_INT(rd_msg_sync_id(&m, 1), 3);
    CHECK_EQ_INT(rd_msg_sync_id(&m, 2), 10);
    seen = 1;
  }
  CHECK(seen);
  free_valid(v, n);
}

TEST(invalid_vectors) {
  const char *doc = load_vectors();
  const char *cur = NULL, *end = NULL, *ob, *oe;
  CHECK(doc != NULL && json_array(doc, "invalid", &cur, &end) == 0);
  if (cur == NULL)
    return;
  int count = 0;
  while (json_next_object(&cur, end, &ob, &oe)) {
    char name[64];
    uint8_t *msg;
    size_t len;
    CHECK(json_str(ob, oe, "name", name, sizeof name) == 0);
    if (json_hex(ob, oe, "message_hex", &msg, &len) != 0) {
      CHECK(!"bad hex in invalid vector");
      continue;
    }
    uint8_t *exact = exact_copy(msg, len);
    rd_msg m;
    int r = rd_msg_decode(exact, len, &m);
    if (r != RD_EMALFORMED) {
      fprintf(stderr, "invalid vector accepted: %s (%d)\n", name, r);
      CHECK(0);
    }
    exact_free(exact, len);
    free(msg);
    count++;
  }
  CHECK(count >= 5);
}

/* A prefix of a valid message is either rejected or decodes as the same
 * header with a shorter payload; it is read in place, never past its end. */
TEST(valid_vector_prefixes) {
  vec_msg v[64];
  int n = load_valid(v, 64);
  CHECK(n >= 14);
  for (int i = 0; i < n; i++) {
    rd_msg full;
    CHECK_EQ_INT(rd_msg_decode(v[i].message, v[i].message_len, &full), RD_OK);
    size_t header_len = v[i].message_len - v[i].payload_len;
    for (size_t k = 0; k < v[i].message_len; k++) {
      uint8_t *exact = exact_copy(v[i].message, k);
      rd_msg m;
      int r = rd_msg_decode(exact, k, &m);
      CHECK(r == RD_OK || r == RD_EMALFORMED);
      if (k < header_len)
        CHECK_EQ_INT(r, RD_EMALFORMED);
      if (r == RD_OK) {
        CHECK_EQ_INT(m.id, v[i].id);
        CHECK_EQ_INT(m.conn_id, v[i].conn_id);
        CHECK_EQ_INT(m.type, v[i].type);
        CHECK(m.payload_len < v[i].payload_len);
        CHECK(m.payload_len == 0 || memcmp(m.payload, v[i].payload, m.payload_len) == 0);
      }
      exact_free(exact, k);
    }
  }
  free_valid(v, n);
}

/* Guards the scanner itself: the entries it finds must be the ones in the
 * file, and the file must still hold the names the tests rely on. */
TEST(vectors_file_shape) {
  const char *doc = load_vectors();
  CHECK(doc != NULL);
  if (doc == NULL)
    return;
  static const char *names[] = {"data_hello",       "data_empty",   "connect_tcp",
                                "connect_peer_routed", "error_eof", "error_text",
                                "add_client",       "remove_client", "pause",
                                "resume",           "sync_connections", "sync_connections_empty",
                                "big_ids",          "negative_id",  "truncated_varint",
                                "varint_overflow",  "connect_without_slash",
                                "sync_not_multiple_of_8", "data_missing_deadline"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(names); i++) {
    char pat[80];
    snprintf(pat, sizeof pat, "\"%s\"", names[i]);
    CHECK(strstr(doc, pat) != NULL);
  }
  /* Every message_hex in the file was seen by one of the two loaders. */
  vec_msg v[64];
  int n = load_valid(v, 64);
  int occurrences = 0;
  for (const char *p = doc; (p = strstr(p, "\"message_hex\"")) != NULL; p++)
    occurrences++;
  const char *cur, *end, *ob, *oe;
  int invalid = 0;
  if (json_array(doc, "invalid", &cur, &end) == 0)
    while (json_next_object(&cur, end, &ob, &oe))
      invalid++;
  CHECK_EQ_INT(occurrences, n + invalid);
  free_valid(v, n);
}

/* ---- Limits and edge cases --------------------------------------------- */

static size_t build(uint8_t *out, int64_t id, int64_t conn, int type, const void *payload,
                    size_t len) {
  size_t h = rd_msg_encode_header(out, id, conn, type);
  if (len > 0)
    memcpy(out + h, payload, len);
  return h + len;
}

TEST(connect_limit) {
  uint8_t payload[400], msg[RD_MSG_HEADER_MAX + 400];
  rd_msg m;
  memset(payload, 'a', sizeof payload);
  memcpy(payload, "tcp/", 4);

  /* A long address is cut to the reader's 266 bytes. */
  size_t n = build(msg, 1, 2, RD_MSG_CONNECT, payload, 300);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_OK);
  CHECK_EQ_INT(m.payload_len, RD_MSG_CONNECT_LIMIT);
  CHECK_EQ_INT(m.proto_len, 3);
  CHECK(memcmp(m.proto, "tcp", 3) == 0);
  CHECK_EQ_INT(m.address_len, RD_MSG_CONNECT_LIMIT - 4);

  /* A '/' as the last byte inside the limit: empty address, still valid. */
  memset(payload, 'a', sizeof payload);
  payload[RD_MSG_CONNECT_LIMIT - 1] = '/';
  n = build(msg, 1, 2, RD_MSG_CONNECT, payload, 300);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_OK);
  CHECK_EQ_INT(m.proto_len, RD_MSG_CONNECT_LIMIT - 1);
  CHECK_EQ_INT(m.address_len, 0);

  /* A '/' just past the limit does not count. */
  memset(payload, 'a', sizeof payload);
  payload[RD_MSG_CONNECT_LIMIT] = '/';
  n = build(msg, 1, 2, RD_MSG_CONNECT, payload, 300);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_EMALFORMED);

  /* Only the first '/' splits. */
  n = build(msg, 1, 2, RD_MSG_CONNECT, "foo::tcp/a/b", 12);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_OK);
  CHECK_EQ_INT(m.proto_len, 8);
  CHECK_EQ_INT(m.address_len, 3);
  CHECK(memcmp(m.address, "a/b", 3) == 0);

  /* Empty CONNECT payload and a lone '/'. */
  n = build(msg, 1, 2, RD_MSG_CONNECT, NULL, 0);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_EMALFORMED);
  n = build(msg, 1, 2, RD_MSG_CONNECT, "/", 1);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_OK);
  CHECK_EQ_INT(m.proto_len, 0);
  CHECK_EQ_INT(m.address_len, 0);
}

TEST(error_and_client_limits) {
  uint8_t payload[300], msg[RD_MSG_HEADER_MAX + 300];
  rd_msg m;
  memset(payload, 'e', sizeof payload);
  static const int types[] = {RD_MSG_ERROR, RD_MSG_ADD_CLIENT, RD_MSG_REMOVE_CLIENT};
  static const size_t limits[] = {RD_MSG_ERROR_LIMIT, RD_MSG_CLIENT_LIMIT, RD_MSG_CLIENT_LIMIT};
  for (size_t t = 0; t < RD_ARRAY_SIZE(types); t++) {
    size_t sizes[] = {0, 1, limits[t] - 1, limits[t], limits[t] + 1, 300};
    for (size_t s = 0; s < RD_ARRAY_SIZE(sizes); s++) {
      size_t n = build(msg, 5, 0, types[t], payload, sizes[s]);
      CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_OK);
      CHECK_EQ_INT(m.type, types[t]);
      CHECK_EQ_INT(m.payload_len, sizes[s] < limits[t] ? sizes[s] : limits[t]);
      CHECK(m.proto == NULL && m.address == NULL);
    }
  }
  /* DATA is never cut. */
  static uint8_t big[RD_MSG_HEADER_MAX + 70000];
  static uint8_t data[70000];
  memset(data, 'd', sizeof data);
  size_t n = build(big, 1, 9, RD_MSG_DATA, data, sizeof data);
  CHECK_EQ_INT(rd_msg_decode(big, n, &m), RD_OK);
  CHECK_EQ_INT(m.payload_len, sizeof data);
}

TEST(sync_payloads) {
  uint8_t msg[RD_MSG_HEADER_MAX + 64];
  rd_msg m;
  uint8_t ids[24];
  int64_t want[3] = {1, INT64_MAX, -2};
  for (int i = 0; i < 3; i++) {
    uint64_t u = (uint64_t)want[i];
    for (int b = 0; b < 8; b++)
      ids[i * 8 + b] = (uint8_t)(u >> (8 * b));
  }
  size_t n = build(msg, 1, 0, RD_MSG_SYNC, ids, 24);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_OK);
  CHECK_EQ_INT(rd_msg_sync_count(&m), 3);
  for (size_t i = 0; i < 3; i++)
    CHECK_EQ_INT(rd_msg_sync_id(&m, i), want[i]);
  for (size_t len = 1; len < 24; len++) {
    n = build(msg, 1, 0, RD_MSG_SYNC, ids, len);
    CHECK_EQ_INT(rd_msg_decode(msg, n, &m), len % 8 == 0 ? RD_OK : RD_EMALFORMED);
  }
}

TEST(other_types) {
  uint8_t msg[RD_MSG_HEADER_MAX + 16];
  rd_msg m;
  /* Unknown types (and 0 and negatives) decode with the whole rest as
   * payload and no deadline: receivers ignore them. */
  static const int64_t unknown[] = {0, 9, 99, -1, INT64_MAX};
  for (size_t i = 0; i < RD_ARRAY_SIZE(unknown); i++) {
    size_t h = rd_varint_put(msg, 3);
    h += rd_varint_put(msg + h, 4);
    h += rd_varint_put(msg + h, unknown[i]);
    memcpy(msg + h, "xyz", 3);
    CHECK_EQ_INT(rd_msg_decode(msg, h + 3, &m), RD_OK);
    CHECK_EQ_INT(m.type, unknown[i]);
    CHECK_EQ_INT(m.payload_len, 3);
    /* rd_msg_encode_header writes no deadline for them either. */
    uint8_t hdr[RD_MSG_HEADER_MAX];
    if (unknown[i] >= INT32_MIN && unknown[i] <= INT32_MAX) {
      CHECK_EQ_INT(rd_msg_encode_header(hdr, 3, 4, (int)unknown[i]), h);
      CHECK(memcmp(hdr, msg, h) == 0);
    }
  }
  /* PAUSE and RESUME keep any stray payload rather than failing. */
  size_t n = build(msg, 1, 5, RD_MSG_PAUSE, "zz", 2);
  CHECK_EQ_INT(rd_msg_decode(msg, n, &m), RD_OK);
  CHECK_EQ_INT(m.payload_len, 2);
  /* An empty message has no header at all. */
  CHECK_EQ_INT(rd_msg_decode(msg, 0, &m), RD_EMALFORMED);
  /* An over-long varint anywhere in the header is fatal. */
  static const uint8_t bad_conn[] = {0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                     0xff, 0xff, 0xff, 0x7f, 0x02, 0xb0, 0xea, 0x01};
  CHECK_EQ_INT(rd_msg_decode(bad_conn, sizeof bad_conn, &m), RD_EMALFORMED);
  static const uint8_t bad_deadline[] = {0x02, 0x04, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff,
                                         0xff, 0xff, 0xff, 0xff, 0x02};
  CHECK_EQ_INT(rd_msg_decode(bad_deadline, sizeof bad_deadline, &m), RD_EMALFORMED);
  /* The deadline's value is ignored. */
  static const uint8_t other_deadline[] = {0x02, 0x04, 0x02, 0x00, 'h', 'i'};
  CHECK_EQ_INT(rd_msg_decode(other_deadline, sizeof other_deadline, &m), RD_OK);
  CHECK_EQ_INT(m.payload_len, 2);
}

TEST(header_max) {
  uint8_t out[RD_MSG_HEADER_MAX];
  size_t n = rd_msg_encode_header(out, INT64_MIN, INT64_MIN, RD_MSG_DATA);
  CHECK(n <= RD_MSG_HEADER_MAX);
  CHECK_EQ_INT(n, 10 + 10 + 1 + 3);
  rd_msg m;
  CHECK_EQ_INT(rd_msg_decode(out, n, &m), RD_OK);
  CHECK_EQ_INT(m.id, INT64_MIN);
  CHECK_EQ_INT(m.conn_id, INT64_MIN);
  CHECK_EQ_INT(m.payload_len, 0);
}

TEST(cleanup) {
  free(vectors);
  vectors = NULL;
}

RD_TEST_MAIN(T(varint_examples), T(varint_round_trip), T(varint_malformed),
             T(valid_vectors_encode), T(valid_vectors_decode), T(sync_vector_ids),
             T(invalid_vectors), T(valid_vector_prefixes), T(vectors_file_shape),
             T(connect_limit), T(error_and_client_limits), T(sync_payloads), T(other_types),
             T(header_max), T(cleanup))
