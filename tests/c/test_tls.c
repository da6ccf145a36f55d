/* TLS over memory: a client rd_tls and a server rd_tls pumped into each
 * other with no sockets. Certificates (CA, intermediate, leaves good, wrong
 * host, expired, self-signed, client) are made with OpenSSL's C API into a
 * temporary directory, removed at exit. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_test.h"
#include "rd_tls.h"

#define DAY (24L * 3600)

/* ---- certificates ------------------------------------------------------- */

static char dir[64];
static char paths[40][128];
static int npaths;

static const char *path_of(const char *name) {
  for (int i = 0; i < npaths; i++)
    if (strcmp(strrchr(paths[i], '/') + 1, name) == 0)
      return paths[i];
  snprintf(paths[npaths], sizeof paths[npaths], "%s/%s", dir, name);
  return paths[npaths++];
}

static void remove_files(void) {
  for (int i = 0; i < npaths; i++)
    unlink(paths[i]);
  if (dir[0])
    rmdir(dir);
}

static void add_ext(X509 *x, X509V3_CTX *v, int nid, const char *value) {
  X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, v, nid, value);
  if (e == NULL) {
    fprintf(stderr, "extension %d=%s failed\n", nid, value);
    abort();
  }
  X509_add_ext(x, e, -1);
  X509_EXTENSION_free(e);
}

/* A certificate for key, signed by issuer/ikey (self-signed when NULL),
 * valid from now+from to now+to seconds. */
static X509 *make_cert(EVP_PKEY *key, const char *cn, X509 *issuer, EVP_PKEY *ikey, int ca,
                       const char *san, const char *eku, long from, long to) {
  static long serial = 1;
  X509 *x = X509_new();
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), serial++);
  X509_gmtime_adj(X509_getm_notBefore(x), from);
  X509_gmtime_adj(X509_getm_notAfter(x), to);
  X509_set_pubkey(x, key);
  X509_NAME *name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
  X509_set_issuer_name(x, issuer != NULL ? X509_get_subject_name(issuer) : name);
  X509V3_CTX v;
  X509V3_set_ctx_nodb(&v);
  X509V3_set_ctx(&v, issuer != NULL ? issuer : x, x, NULL, NULL, 0);
  add_ext(x, &v, NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
  add_ext(x, &v, NID_key_usage, ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature");
  add_ext(x, &v, NID_subject_key_identifier, "hash");
  if (issuer != NULL)
    add_ext(x, &v, NID_authority_key_identifier, "keyid:always");
  if (san != NULL)
    add_ext(x, &v, NID_subject_alt_name, san);
  if (eku != NULL)
    add_ext(x, &v, NID_ext_key_usage, eku);
  X509_sign(x, ikey != NULL ? ikey : key, EVP_sha256());
  return x;
}

/* Writes certs (in order) to <name>.pem and key to <name>.key. */
static void write_pem(const char *name, X509 **certs, int n, EVP_PKEY *key) {
  char f[64];
  snprintf(f, sizeof f, "%s.pem", name);
  FILE *fp = fopen(path_of(f), "w");
  for (int i = 0; i < n; i++)
    PEM_write_X509(fp, certs[i]);
  fclose(fp);
  if (key != NULL) {
    snprintf(f, sizeof f, "%s.key", name);
    fp = fopen(path_of(f), "w");
    PEM_write_PrivateKey(fp, key, NULL, NULL, 0, NULL, NULL);
    fclose(fp);
  }
}

static const char *P(const char *name) { return path_of(name); }

static void make_certs(void) {
  if (dir[0])
    return;
  strcpy(dir, "/tmp/rd_tls_test.XXXXXX");
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    exit(1);
  }
  atexit(remove_files);
  const char *local = "DNS:localhost,IP:127.0.0.1,IP:::1";
  EVP_PKEY *ca_key = EVP_EC_gen("P-256"), *ca2_key = EVP_EC_gen("P-256");
  EVP_PKEY *int_key = EVP_EC_gen("P-256"), *key = EVP_EC_gen("P-256");
  EVP_PKEY *other_key = EVP_EC_gen("P-256");
  X509 *ca = make_cert(ca_key, "rd test CA", NULL, NULL, 1, NULL, NULL, -DAY, 3650 * DAY);
  X509 *ca2 = make_cert(ca2_key, "rd other CA", NULL, NULL, 1, NULL, NULL, -DAY, 3650 * DAY);
  X509 *inter = make_cert(int_key, "rd intermediate", ca, ca_key, 1, NULL, NULL, -DAY, 365 * DAY);
  /* Leaves that stand alone in <name>.pem, each with its key in <name>.key;
   * a NULL issuer makes the leaf self-signed. */
  struct {
    const char *name, *cn, *san, *eku;
    EVP_PKEY *key, *ikey;
    X509 *issuer;
    long from, to;
  } leaves[] = {
      {"server", "localhost", local, "serverAuth", key, ca_key, ca, -DAY, 365 * DAY},
      {"wronghost", "example.com", "DNS:example.com,DNS:www.example.com", "serverAuth", key,
       ca_key, ca, -DAY, 365 * DAY},
      {"expired", "localhost", local, "serverAuth", key, ca_key, ca, -30 * DAY, -DAY},
      {"future", "localhost", local, "serverAuth", key, ca_key, ca, 30 * DAY, 60 * DAY},
      {"selfsigned", "localhost", local, "serverAuth", key, NULL, NULL, -DAY, 365 * DAY},
      {"server2", "localhost", local, "serverAuth", key, ca2_key, ca2, -DAY, 365 * DAY},
      {"client", "agent-1", NULL, "clientAuth", other_key, ca_key, ca, -DAY, 365 * DAY},
      {"client2", "agent-2", NULL, "clientAuth", other_key, ca2_key, ca2, -DAY, 365 * DAY},
  };
  X509 *c[2];

  write_pem("ca", &ca, 1, ca_key);
  write_pem("ca2", &ca2, 1, ca2_key);
  for (size_t i = 0; i < RD_ARRAY_SIZE(leaves); i++) {
    c[0] = make_cert(leaves[i].key, leaves[i].cn, leaves[i].issuer, leaves[i].ikey, 0,
                     leaves[i].san, leaves[i].eku, leaves[i].from, leaves[i].to);
    write_pem(leaves[i].name, c, 1, leaves[i].key);
    X509_free(c[0]);
  }
  /* The intermediate's leaf, with and without the intermediate after it. */
  c[0] = make_cert(key, "localhost", inter, int_key, 0, local, "serverAuth", -DAY, 365 * DAY);
  c[1] = inter;
  write_pem("chain", c, 2, key);
  write_pem("leafonly", c, 1, key);
  X509_free(c[0]);
  /* A key that does not match server.pem, and an encrypted one. */
  FILE *fp = fopen(P("other.key"), "w");
  PEM_write_PrivateKey(fp, other_key, NULL, NULL, 0, NULL, NULL);
  fclose(fp);
  fp = fopen(P("encrypted.key"), "w");
  PEM_write_PrivateKey(fp, key, EVP_aes_128_cbc(), (unsigned char *)"secret", 6, NULL, NULL);
  fclose(fp);
  fp = fopen(P("garbage.pem"), "w");
  fputs("this is not a certificate\n", fp);
  fclose(fp);
  X509_free(ca);
  X509_free(ca2);
  X509_free(inter);
  EVP_PKEY_free(ca_key);
  EVP_PKEY_free(ca2_key);
  EVP_PKEY_free(int_key);
  EVP_PKEY_free(key);
  EVP_PKEY_free(other_key);
}

/* ---- pumping ------------------------------------------------------------ */

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}
static size_t rand_in(size_t lo, size_t hi) { return lo + (size_t)(next_rand() % (hi - lo + 1)); }

/* What one end has received in plaintext. */
typedef struct sink {
  uint64_t hash;  /* FNV-1a over every byte */
  uint64_t bytes;
  uint8_t last[64];
  size_t last_len;
} sink;

static void sink_init(sink *k) {
  memset(k, 0, sizeof *k);
  k->hash = 1469598103934665603ull;
}

static void hash_bytes(uint64_t *h, const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    *h = (*h ^ p[i]) * 1099511628211ull;
}

typedef struct end {
  rd_tls *t;
  sink got;
  int status; /* last non-EPARTIAL result of advancing it */
  int oom;    /* an allocation failed on the way in or out */
} end;

/* Lets e make progress on what it has: handshake, then plaintext. */
static void advance(end *e) {
  if (!rd_tls_handshake_done(e->t)) {
    int rc = rd_tls_handshake(e->t);
    if (rc != RD_EPARTIAL)
      e->status = rc;
    if (rc != 0)
      return;
  }
  static uint8_t buf[100000];
  for (;;) {
    size_t cap = rand_in(1, sizeof buf);
    int64_t n = rd_tls_read(e->t, buf, cap);
    if (n <= 0) {
      if (n != RD_EPARTIAL)
        e->status = (int)n;
      return;
    }
    CHECK(n <= (int64_t)cap);
    hash_bytes(&e->got.hash, buf, (size_t)n);
    e->got.bytes += (uint64_t)n;
    size_t keep = (size_t)n < sizeof e->got.last ? (size_t)n : sizeof e->got.last;
    memcpy(e->got.last, buf + (size_t)n - keep, keep);
    e->got.last_len = keep;
  }
}

/* Moves all of from's pending ciphertext to `to`, `piece` bytes at a time
 * (0: whole chunks), advancing `to` after each piece. Alternates between
 * the zero-copy input path and rd_tls_feed. Returns the bytes moved. */
static size_t move(end *from, end *to, size_t piece) {
  size_t moved = 0;
  int via_buf = 0;
  size_t len;
  rd_block *b;
  while ((b = rd_tls_take_output(from->t, &len)) != NULL) {
    CHECK(len > 0);
    const uint8_t *p = rd_block_payload(b);
    size_t off = 0;
    while (off < len) {
      size_t n = piece ? piece : len - off;
      if (n > len - off)
        n = len - off;
      if ((via_buf ^= 1)) {
        uint8_t *dst;
        size_t room;
        if (rd_tls_in_buf(to->t, &dst, &room) != 0) {
          to->oom = 1;
          break;
        }
        CHECK(room >= 4096);
        if (n > room)
          n = room;
        memcpy(dst, p + off, n);
        rd_tls_in_commit(to->t, n);
      } else if (rd_tls_feed(to->t, p + off, n) != 0) {
        to->oom = 1;
        break;
      }
      off += n;
      advance(to);
    }
    moved += off;
    rd_block_unref(b);
    if (to->oom)
      break;
  }
  if (b == NULL && rd_tls_output_pending(from->t) > 0)
    from->oom = 1; /* take_output could not allocate */
  return moved;
}

/* Runs the handshake until neither side has anything to say. */
static void drive(end *c, end *s, size_t piece) {
  advance(c);
  for (int i = 0; i < 1000000; i++) {
    size_t n = move(c, s, piece) + move(s, c, piece);
    if (n == 0 || c->oom || s->oom)
      break;
  }
}

static rd_tls *new_tls(rd_tls_ctx *ctx, const char *name) {
  char err[256];
  rd_tls *t = rd_tls_new(ctx, name, err, sizeof err);
  if (t == NULL)
    fprintf(stderr, "rd_tls_new: %s\n", err);
  CHECK(t != NULL);
  return t;
}

static rd_tls_ctx *server_ctx(const char *cert, const char *key, const char *client_ca) {
  char err[256];
  rd_tls_ctx *ctx = rd_tls_ctx_new_server(P(cert), P(key), client_ca ? P(client_ca) : NULL, err,
                                          sizeof err);
  if (ctx == NULL)
    fprintf(stderr, "server ctx: %s\n", err);
  CHECK(ctx != NULL);
  return ctx;
}

static rd_tls_ctx *client_ctx(const char *ca, int insecure, const char *cert, const char *key) {
  char err[256];
  rd_tls_ctx *ctx = rd_tls_ctx_new_client(ca ? P(ca) : NULL, insecure, cert ? P(cert) : NULL,
                                          key ? P(key) : NULL, err, sizeof err);
  if (ctx == NULL)
    fprintf(stderr, "client ctx: %s\n", err);
  CHECK(ctx != NULL);
  return ctx;
}

typedef struct pair {
  end c, s;
} pair;

/* A client/server pair that has not started its handshake. */
static void new_pair(pair *p, rd_tls_ctx *cctx, rd_tls_ctx *sctx, const char *name) {
  memset(p, 0, sizeof *p);
  sink_init(&p->c.got);
  sink_init(&p->s.got);
  p->c.t = new_tls(cctx, name);
  p->s.t = new_tls(sctx, NULL);
}

/* A client/server pair, handshaken with `piece`-byte feeding. */
static void connect_pair(pair *p, rd_tls_ctx *cctx, rd_tls_ctx *sctx, const char *name,
                         size_t piece) {
  new_pair(p, cctx, sctx, name);
  if (p->c.t == NULL || p->s.t == NULL)
    return;
  drive(&p->c, &p->s, piece);
}

static void free_pair(pair *p) {
  rd_tls_free(p->c.t);
  rd_tls_free(p->s.t);
}

static int64_t heap_start;

/* Every test starts and ends with nothing allocated through rd_alloc. */
static void begin(void) {
  make_certs();
  rd_block_pool_trim();
  heap_start = rd_alloc_bytes();
}

/* No block in use and the heap back where it was at `start`. */
static void check_nothing_held(int64_t start) {
  CHECK_EQ_INT(rd_block_in_use(), 0);
  rd_block_pool_trim();
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

static void finish(void) {
  check_nothing_held(heap_start);
  CHECK_EQ_INT(ERR_peek_error(), 0); /* nothing left on OpenSSL's queue */
}

static int contains(const char *hay, const char *needle) {
  if (getenv("RD_TLS_TEST_VERBOSE"))
    fprintf(stderr, "text: %s\n", hay);
  if (strstr(hay, needle) != NULL)
    return 1;
  fprintf(stderr, "expected \"%s\" in \"%s\"\n", needle, hay);
  return 0;
}

/* Sends text from a to b and checks it arrives whole. */
static void say(end *a, end *b, const char *text) {
  uint64_t before = b->got.bytes;
  CHECK_EQ_INT(rd_tls_write(a->t, text, strlen(text)), 0);
  move(a, b, 0);
  CHECK_EQ_INT(b->got.bytes - before, strlen(text));
  CHECK(b->got.last_len >= strlen(text) || b->got.last_len == sizeof b->got.last);
  size_t n = strlen(text) < b->got.last_len ? strlen(text) : b->got.last_len;
  CHECK(memcmp(b->got.last + b->got.last_len - n, text + strlen(text) - n, n) == 0);
}

/* Expects a complete, verified handshake. */
static void check_ok(pair *p) {
  CHECK_EQ_INT(p->c.status, 0);
  CHECK_EQ_INT(p->s.status, 0);
  CHECK(rd_tls_handshake_done(p->c.t));
  CHECK(rd_tls_handshake_done(p->s.t));
  if (p->c.status || p->s.status)
    fprintf(stderr, "client: %s / server: %s\n", rd_tls_error(p->c.t), rd_tls_error(p->s.t));
}

/* Expects e to have stopped with `status` and an error that says `text`. */
static void check_stopped(end *e, int status, const char *text) {
  CHECK_EQ_INT(e->status, status);
  CHECK(contains(rd_tls_error(e->t), text));
}

/* A handshake to `name` that must verify; the connection is then dropped. */
static void expect_connects(rd_tls_ctx *cctx, rd_tls_ctx *sctx, const char *name) {
  pair p;
  connect_pair(&p, cctx, sctx, name, 0);
  check_ok(&p);
  free_pair(&p);
}

/* A test's contexts and the connection it works on. */
typedef struct fixture {
  rd_tls_ctx *sctx, *cctx;
  pair p;
} fixture;

/* begin(), then the usual contexts: the server presents server.pem and asks
 * for no client certificate; the client trusts ca.pem and has none. */
static void setup(fixture *f) {
  begin();
  f->sctx = server_ctx("server.pem", "server.key", NULL);
  f->cctx = client_ctx("ca.pem", 0, NULL, NULL);
}

/* setup(), then a verified handshake to localhost in f->p, returned. */
static pair *setup_connected(fixture *f) {
  setup(f);
  connect_pair(&f->p, f->cctx, f->sctx, "localhost", 0);
  check_ok(&f->p);
  return &f->p;
}

static void teardown(fixture *f) {
  free_pair(&f->p);
  rd_tls_ctx_unref(f->cctx);
  rd_tls_ctx_unref(f->sctx);
  finish();
}

/* ---- tests -------------------------------------------------------------- */

TEST(handshake_and_echo) {
  fixture f;
  pair *p = setup_connected(&f);
  CHECK(strcmp(rd_tls_version(p->c.t), "TLSv1.3") == 0);
  CHECK(strcmp(rd_tls_version(p->s.t), "TLSv1.3") == 0);
  CHECK(rd_tls_cipher(p->c.t)[0] != '\0');
  CHECK(strcmp(rd_tls_error(p->c.t), "") == 0);
  say(&p->c, &p->s, "GET / HTTP/1.1\r\n\r\n");
  say(&p->s, &p->c, "HTTP/1.1 101 Switching Protocols\r\n\r\n");
  CHECK_EQ_INT(rd_tls_write(p->c.t, "", 0), 0);
  CHECK_EQ_INT(rd_tls_read(p->c.t, (uint8_t *)"", 0), 0);
  CHECK_EQ_INT(rd_tls_read(p->c.t, (uint8_t[8]){0}, 8), RD_EPARTIAL);
  /* Idle connections hold no I/O buffers. */
  CHECK_EQ_INT(rd_block_in_use(), 0);
  teardown(&f);
}

TEST(write_before_handshake) {
  fixture f;
  setup(&f);
  pair *p = &f.p;
  new_pair(p, f.cctx, f.sctx, "localhost");
  /* Nothing written, but the ClientHello is out. */
  CHECK_EQ_INT(rd_tls_write(p->c.t, "x", 1), RD_EPARTIAL);
  CHECK(rd_tls_output_pending(p->c.t) > 0);
  CHECK(strcmp(rd_tls_version(p->c.t), "") == 0);
  CHECK(strcmp(rd_tls_cipher(p->c.t), "") == 0);
  drive(&p->c, &p->s, 0);
  check_ok(p);
  say(&p->c, &p->s, "now");
  teardown(&f);
}

TEST(handshake_one_byte_at_a_time) {
  fixture f;
  begin();
  f.sctx = server_ctx("chain.pem", "chain.key", "ca.pem");
  f.cctx = client_ctx("ca.pem", 0, "client.pem", "client.key");
  pair *p = &f.p;
  connect_pair(p, f.cctx, f.sctx, "localhost", 1);
  check_ok(p);
  say(&p->c, &p->s, "hello, one byte at a time");
  /* Application data one byte at a time too. */
  CHECK_EQ_INT(rd_tls_write(p->s.t, "0123456789", 10), 0);
  move(&p->s, &p->c, 1);
  CHECK_EQ_INT(p->c.got.bytes, 10);
  teardown(&f);
}

TEST(ip_address_names) {
  fixture f;
  setup(&f);
  const char *good[] = {"127.0.0.1", "::1", "[::1]", "LOCALHOST"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(good); i++)
    expect_connects(f.cctx, f.sctx, good[i]);
  connect_pair(&f.p, f.cctx, f.sctx, "127.0.0.2", 0);
  check_stopped(&f.p.c, RD_ETLS,
                "tls: failed to verify certificate: x509: certificate is valid for localhost, "
                "127.0.0.1, ::1, not 127.0.0.2");
  check_stopped(&f.p.s, RD_ETLS, "remote error: tls: ");
  teardown(&f);
}

TEST(bulk_8mib_each_way) {
  fixture f;
  pair *p = setup_connected(&f);
  const uint64_t total = 8u << 20;
  static uint8_t buf[200000];
  uint64_t sent[2] = {0, 0}, hash[2];
  uint64_t gen[2] = {1, 2};
  hash[0] = hash[1] = 1469598103934665603ull;
  end *from[2] = {&p->c, &p->s}, *to[2] = {&p->s, &p->c};
  int rounds = 0;
  while ((sent[0] < total || sent[1] < total) && rounds++ < 100000) {
    for (int d = 0; d < 2; d++) {
      if (sent[d] >= total)
        continue;
      size_t n = rand_in(1, sizeof buf);
      if (n > total - sent[d])
        n = (size_t)(total - sent[d]);
      for (size_t i = 0; i < n; i++) {
        gen[d] = gen[d] * 6364136223846793005ull + 1442695040888963407ull;
        buf[i] = (uint8_t)(gen[d] >> 56);
      }
      hash_bytes(&hash[d], buf, n);
      CHECK_EQ_INT(rd_tls_write(from[d]->t, buf, n), 0);
      sent[d] += n;
      /* Sometimes let ciphertext pile up before moving it. */
      if (next_rand() % 4 != 0)
        move(from[d], to[d], rand_in(0, 3) == 0 ? rand_in(1, 40000) : 0);
    }
  }
  move(&p->c, &p->s, 0);
  move(&p->s, &p->c, 0);
  CHECK_EQ_INT(p->s.got.bytes, total);
  CHECK_EQ_INT(p->c.got.bytes, total);
  CHECK(p->s.got.hash == hash[0]);
  CHECK(p->c.got.hash == hash[1]);
  CHECK_EQ_INT(p->c.status, 0);
  CHECK_EQ_INT(p->s.status, 0);
  teardown(&f);
}

TEST(output_chunks) {
  fixture f;
  pair *p = setup_connected(&f);
  /* A small record comes out in an exact-size block. */
  CHECK_EQ_INT(rd_tls_write(p->c.t, "ping", 4), 0);
  size_t pend = rd_tls_output_pending(p->c.t), len;
  CHECK(pend > 4 && pend < 100);
  rd_block *b = rd_tls_take_output(p->c.t, &len);
  CHECK(b != NULL);
  CHECK_EQ_INT(len, pend);
  CHECK_EQ_INT(rd_block_payload_cap(b), len);
  CHECK_EQ_INT(rd_tls_output_pending(p->c.t), 0);
  CHECK(rd_tls_take_output(p->c.t, &len) == NULL);
  CHECK_EQ_INT(len, 0);
  CHECK_EQ_INT(rd_tls_feed(p->s.t, rd_block_payload(b), pend), 0);
  rd_block_unref(b);
  uint8_t got[16];
  CHECK_EQ_INT(rd_tls_read(p->s.t, got, sizeof got), 4);
  CHECK(memcmp(got, "ping", 4) == 0);
  /* 1 MiB in one write: chunks fill pooled blocks and add up. */
  size_t big = 1u << 20;
  uint8_t *data = calloc(1, big);
  CHECK_EQ_INT(rd_tls_write(p->c.t, data, big), 0);
  pend = rd_tls_output_pending(p->c.t);
  CHECK(pend > big && pend < big + big / 50);
  size_t sum = 0;
  while ((b = rd_tls_take_output(p->c.t, &len)) != NULL) {
    CHECK(len <= RD_BLOCK_SIZE);
    sum += len;
    rd_block_unref(b);
  }
  CHECK_EQ_INT(sum, pend);
  free(data);
  teardown(&f);
}

TEST(input_grows_when_not_drained) {
  fixture f;
  pair *p = setup_connected(&f);
  size_t big = 300000;
  uint8_t *data = malloc(big);
  for (size_t i = 0; i < big; i++)
    data[i] = (uint8_t)(i * 7);
  CHECK_EQ_INT(rd_tls_write(p->c.t, data, big), 0);
  /* Feed everything through rd_tls_in_buf without reading any of it. */
  size_t len;
  rd_block *b;
  while ((b = rd_tls_take_output(p->c.t, &len)) != NULL) {
    size_t off = 0;
    while (off < len) {
      uint8_t *dst;
      size_t room;
      CHECK_EQ_INT(rd_tls_in_buf(p->s.t, &dst, &room), 0);
      CHECK(room >= 4096);
      size_t n = room < len - off ? room : len - off;
      memcpy(dst, rd_block_payload(b) + off, n);
      rd_tls_in_commit(p->s.t, n);
      off += n;
    }
    rd_block_unref(b);
  }
  uint8_t *out = malloc(big + 1);
  size_t got = 0;
  int64_t n;
  while ((n = rd_tls_read(p->s.t, out + got, big + 1 - got)) > 0)
    got += (size_t)n;
  CHECK_EQ_INT(n, RD_EPARTIAL);
  CHECK_EQ_INT(got, big);
  CHECK(memcmp(out, data, big) == 0);
  free(out);
  free(data);
  teardown(&f);
}

/* Handshakes a client (ca, name) against a server cert and expects the
 * client to fail with client_text and the server to see an alert. */
static void expect_verify_failure(const char *ca, const char *cert, const char *key,
                                  const char *name, const char *client_text) {
  rd_tls_ctx *sctx = server_ctx(cert, key, NULL);
  rd_tls_ctx *cctx = client_ctx(ca, 0, NULL, NULL);
  pair p;
  connect_pair(&p, cctx, sctx, name, 0);
  check_stopped(&p.c, RD_ETLS, client_text);
  check_stopped(&p.s, RD_ETLS, "remote error: tls: ");
  /* Failures are sticky. */
  CHECK_EQ_INT(rd_tls_handshake(p.c.t), RD_ETLS);
  CHECK_EQ_INT(rd_tls_read(p.c.t, (uint8_t[4]){0}, 4), RD_ETLS);
  CHECK_EQ_INT(rd_tls_write(p.c.t, "x", 1), RD_ETLS);
  CHECK_EQ_INT(rd_tls_shutdown(p.c.t), RD_ETLS);
  free_pair(&p);
  rd_tls_ctx_unref(cctx);
  rd_tls_ctx_unref(sctx);
}

TEST(wrong_host) {
  begin();
  expect_verify_failure("ca.pem", "wronghost.pem", "wronghost.key", "localhost",
                        "tls: failed to verify certificate: x509: certificate is valid for "
                        "example.com, www.example.com, not localhost");
  expect_verify_failure("ca.pem", "server.pem", "server.key", "other.example",
                        "x509: certificate is valid for localhost, 127.0.0.1, ::1, not "
                        "other.example");
  finish();
}

TEST(expired_and_not_yet_valid) {
  begin();
  expect_verify_failure("ca.pem", "expired.pem", "expired.key", "localhost",
                        "tls: failed to verify certificate: x509: certificate has expired or "
                        "is not yet valid: current time is after ");
  expect_verify_failure("ca.pem", "future.pem", "future.key", "localhost",
                        "x509: certificate has expired or is not yet valid: current time is "
                        "before ");
  finish();
}

TEST(unknown_authority) {
  begin();
  const char *text = "tls: failed to verify certificate: x509: certificate signed by unknown "
                     "authority";
  expect_verify_failure("ca2.pem", "server.pem", "server.key", "localhost", text);
  expect_verify_failure("ca.pem", "selfsigned.pem", "selfsigned.key", "localhost", text);
  expect_verify_failure("ca.pem", "server2.pem", "server2.key", "localhost", text);
  /* The chain file's intermediate is needed: its leaf alone does not verify. */
  expect_verify_failure("ca.pem", "leafonly.pem", "leafonly.key", "localhost", text);
  finish();
}

TEST(insecure_accepts_anything) {
  begin();
  rd_tls_ctx *cctx = client_ctx(NULL, 1, NULL, NULL);
  const char *certs[][2] = {{"selfsigned.pem", "selfsigned.key"},
                            {"expired.pem", "expired.key"},
                            {"wronghost.pem", "wronghost.key"}};
  for (size_t i = 0; i < RD_ARRAY_SIZE(certs); i++) {
    rd_tls_ctx *sctx = server_ctx(certs[i][0], certs[i][1], NULL);
    pair p;
    connect_pair(&p, cctx, sctx, i == 0 ? "localhost" : NULL, 0);
    check_ok(&p);
    say(&p.c, &p.s, "insecure but encrypted");
    free_pair(&p);
    rd_tls_ctx_unref(sctx);
  }
  rd_tls_ctx_unref(cctx);
  finish();
}

TEST(client_certificates) {
  begin();
  rd_tls_ctx *sctx = server_ctx("server.pem", "server.key", "ca.pem");
  /* Refused client certificates: the server says why, the client hears. */
  struct {
    const char *cert, *key, *server_text, *client_text;
  } refused[] = {
      /* Missing: both ends say so. */
      {NULL, NULL, "tls: client certificate required",
       "remote error: tls: certificate required (the server requires a client certificate)"},
      /* From a CA the server does not trust. */
      {"client2.pem", "client2.key",
       "tls: failed to verify client certificate: x509: certificate signed by unknown authority",
       "remote error: tls: "},
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(refused); i++) {
    rd_tls_ctx *cctx = client_ctx("ca.pem", 0, refused[i].cert, refused[i].key);
    pair p;
    connect_pair(&p, cctx, sctx, "localhost", 0);
    check_stopped(&p.s, RD_ETLS, refused[i].server_text);
    check_stopped(&p.c, RD_ETLS, refused[i].client_text);
    free_pair(&p);
    rd_tls_ctx_unref(cctx);
  }
  /* Good. */
  fixture f = {.sctx = sctx, .cctx = client_ctx("ca.pem", 0, "client.pem", "client.key")};
  connect_pair(&f.p, f.cctx, f.sctx, "localhost", 0);
  check_ok(&f.p);
  say(&f.p.c, &f.p.s, "with a certificate");
  say(&f.p.s, &f.p.c, "welcome");
  teardown(&f);
}

/* rd_tls_ctx_reload_server with files named as in the temporary directory. */
static int reload(rd_tls_ctx *ctx, const char *cert, const char *key, const char *client_ca,
                  char *err, size_t errlen) {
  return rd_tls_ctx_reload_server(ctx, P(cert), P(key), client_ca ? P(client_ca) : NULL, err,
                                  errlen);
}

TEST(reload_server) {
  begin();
  char err[256];
  rd_tls_ctx *sctx = server_ctx("server.pem", "server.key", NULL);
  rd_tls_ctx *ca1 = client_ctx("ca.pem", 0, NULL, NULL);
  rd_tls_ctx *ca2 = client_ctx("ca2.pem", 0, NULL, NULL);
  pair old;
  connect_pair(&old, ca1, sctx, "localhost", 0);
  check_ok(&old);
  /* A failed reload changes nothing. */
  CHECK_EQ_INT(reload(sctx, "missing.pem", "server2.key", NULL, err, sizeof err), RD_ETLS);
  CHECK(contains(err, "missing.pem"));
  CHECK_EQ_INT(reload(sctx, "server2.pem", "server.key", "ca.pem", err, sizeof err), 0);
  CHECK(strcmp(err, "") == 0);
  /* server.key happens to be server2.pem's key too; now a mismatched one. */
  CHECK_EQ_INT(reload(sctx, "server.pem", "other.key", NULL, err, sizeof err), RD_ETLS);
  CHECK(contains(err, "does not match"));
  /* The reload above (server2 + client CA) took effect for new connections. */
  rd_tls_ctx *ca2c = client_ctx("ca2.pem", 0, "client.pem", "client.key");
  expect_connects(ca2c, sctx, "localhost");
  pair p;
  connect_pair(&p, ca1, sctx, "localhost", 0);
  CHECK(contains(rd_tls_error(p.c.t), "signed by unknown authority"));
  free_pair(&p);
  CHECK_EQ_INT(reload(sctx, "server2.pem", "server2.key", NULL, err, sizeof err), 0);
  expect_connects(ca2, sctx, "localhost");
  /* The old connection keeps working on its old certificate. */
  say(&old.c, &old.s, "still here");
  say(&old.s, &old.c, "me too");
  /* It also outlives its context. */
  rd_tls_ctx_unref(sctx);
  say(&old.c, &old.s, "context gone");
  free_pair(&old);
  /* Only servers reload. */
  CHECK_EQ_INT(reload(ca1, "server.pem", "server.key", NULL, err, sizeof err), RD_ETLS);
  CHECK(contains(err, "only a server context"));
  rd_tls_ctx_unref(ca1);
  rd_tls_ctx_unref(ca2);
  rd_tls_ctx_unref(ca2c);
  finish();
}

TEST(refcounts) {
  begin();
  rd_tls_ctx *sctx = server_ctx("server.pem", "server.key", NULL);
  rd_tls_ctx_ref(sctx);
  rd_tls_ctx_unref(sctx);
  rd_tls *t = new_tls(sctx, NULL);
  rd_tls_ctx_unref(sctx);
  rd_tls_free(t);
  rd_tls_ctx_unref(NULL);
  rd_tls_free(NULL);
  finish();
}

TEST(context_errors) {
  begin();
  char err[256];
  struct {
    const char *cert, *key, *ca, *text;
  } server_cases[] = {
      {"missing.pem", "server.key", NULL, "cannot load certificate chain from"},
      {"garbage.pem", "server.key", NULL, "cannot load certificate chain from"},
      {"server.pem", "missing.key", NULL, "cannot load private key from"},
      {"server.pem", "encrypted.key", NULL, "it is encrypted (passphrases are not supported)"},
      {"server.pem", "other.key", NULL, "does not match the certificate"},
      {"server.pem", "server.key", "missing.pem", "cannot load client CA from"},
      {"server.pem", "server.key", "garbage.pem", "cannot load client CA from"},
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(server_cases); i++) {
    rd_tls_ctx *ctx =
        rd_tls_ctx_new_server(P(server_cases[i].cert), P(server_cases[i].key),
                              server_cases[i].ca ? P(server_cases[i].ca) : NULL, err, sizeof err);
    CHECK(ctx == NULL);
    CHECK(contains(err, server_cases[i].text));
  }
  CHECK(rd_tls_ctx_new_server(P("missing.pem"), NULL, NULL, err, sizeof err) == NULL);
  CHECK(contains(err, "both a certificate and a key"));
  CHECK(rd_tls_ctx_new_server(P("missing.pem"), P("server.key"), NULL, err, sizeof err) == NULL);
  CHECK(contains(err, "No such file or directory"));
  CHECK(rd_tls_ctx_new_server(P("missing.pem"), P("server.key"), NULL, NULL, 0) == NULL);
  CHECK(rd_tls_ctx_new_client(P("missing.pem"), 0, NULL, NULL, err, sizeof err) == NULL);
  CHECK(contains(err, "cannot load CA file"));
  CHECK(rd_tls_ctx_new_client(P("ca.pem"), 0, P("client.pem"), NULL, err, sizeof err) == NULL);
  CHECK(contains(err, "both a certificate and a key"));
  CHECK(rd_tls_ctx_new_client(P("ca.pem"), 0, P("client.pem"), P("server.key"), err,
                              sizeof err) == NULL);
  CHECK(contains(err, "does not match"));
  /* A verifying client needs a name to verify. */
  rd_tls_ctx *cctx = client_ctx(NULL, 0, NULL, NULL); /* the system store */
  CHECK(rd_tls_new(cctx, NULL, err, sizeof err) == NULL);
  CHECK(contains(err, "server name is needed"));
  CHECK(rd_tls_new(cctx, "", err, sizeof err) == NULL);
  rd_tls_ctx_unref(cctx);
  finish();
}

TEST(garbage_to_server) {
  begin();
  rd_tls_ctx *sctx = server_ctx("server.pem", "server.key", NULL);
  rd_tls *t = new_tls(sctx, NULL);
  const char *http = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
  CHECK_EQ_INT(rd_tls_feed(t, (const uint8_t *)http, strlen(http)), 0);
  CHECK_EQ_INT(rd_tls_handshake(t), RD_ETLS);
  CHECK(contains(rd_tls_error(t), "tls: client sent an HTTP request to an HTTPS server"));
  rd_tls_free(t);
  /* Random bytes, random lengths, random first bytes including a real
   * handshake record header: an error or a wait, never a crash. */
  int errors = 0;
  for (int i = 0; i < 2000; i++) {
    uint8_t junk[600];
    size_t n = rand_in(1, sizeof junk);
    for (size_t j = 0; j < n; j++)
      junk[j] = (uint8_t)next_rand();
    if (i % 3 == 0) {
      junk[0] = 0x16, junk[1] = 0x03, junk[2] = (uint8_t)(i % 5);
      if (n >= 6)
        junk[5] = 0x01; /* ClientHello */
    }
    t = new_tls(sctx, NULL);
    CHECK_EQ_INT(rd_tls_feed(t, junk, n), 0);
    int rc = rd_tls_handshake(t);
    CHECK(rc == RD_ETLS || rc == RD_EPARTIAL);
    if (rc == RD_ETLS) {
      errors++;
      CHECK(strncmp(rd_tls_error(t), "tls: ", 5) == 0);
      CHECK_EQ_INT(rd_tls_read(t, junk, sizeof junk), RD_ETLS);
    }
    size_t len;
    rd_block *b;
    while ((b = rd_tls_take_output(t, &len)) != NULL) /* the alert, if any */
      rd_block_unref(b);
    rd_tls_free(t);
  }
  CHECK(errors > 1000);
  rd_tls_ctx_unref(sctx);
  finish();
}

TEST(garbage_to_client) {
  begin();
  rd_tls_ctx *cctx = client_ctx("ca.pem", 0, NULL, NULL);
  rd_tls *t = new_tls(cctx, "localhost");
  CHECK_EQ_INT(rd_tls_handshake(t), RD_EPARTIAL);
  const char *reply = "HTTP/1.1 400 Bad Request\r\n\r\n";
  CHECK_EQ_INT(rd_tls_feed(t, (const uint8_t *)reply, strlen(reply)), 0);
  CHECK_EQ_INT(rd_tls_handshake(t), RD_ETLS);
  CHECK(contains(rd_tls_error(t), "tls: handshake failure: "));
  rd_tls_free(t);
  rd_tls_ctx_unref(cctx);
  finish();
}

TEST(corrupted_record) {
  fixture f;
  pair *p = setup_connected(&f);
  CHECK_EQ_INT(rd_tls_write(p->c.t, "secret", 6), 0);
  size_t len;
  rd_block *b = rd_tls_take_output(p->c.t, &len);
  CHECK(b != NULL);
  rd_block_payload(b)[len - 3] ^= 0x40;
  CHECK_EQ_INT(rd_tls_feed(p->s.t, rd_block_payload(b), len), 0);
  rd_block_unref(b);
  uint8_t buf[64];
  CHECK_EQ_INT(rd_tls_read(p->s.t, buf, sizeof buf), RD_ETLS);
  CHECK(contains(rd_tls_error(p->s.t), "tls: read failure: "));
  CHECK_EQ_INT(rd_tls_read(p->s.t, buf, sizeof buf), RD_ETLS);
  CHECK_EQ_INT(rd_tls_write(p->s.t, "x", 1), RD_ETLS);
  /* The server's alert tells the client. */
  move(&p->s, &p->c, 0);
  check_stopped(&p->c, RD_ETLS, "remote error: tls: ");
  teardown(&f);
}

TEST(close_notify) {
  fixture f;
  pair *p = setup_connected(&f);
  /* Data and close_notify in one flight: data first, then the close. */
  CHECK_EQ_INT(rd_tls_write(p->c.t, "bye", 3), 0);
  CHECK_EQ_INT(rd_tls_shutdown(p->c.t), 0);
  CHECK_EQ_INT(rd_tls_shutdown(p->c.t), 0);
  CHECK_EQ_INT(rd_tls_write(p->c.t, "more", 4), RD_ECLOSED);
  size_t len;
  rd_block *b;
  while ((b = rd_tls_take_output(p->c.t, &len)) != NULL) {
    CHECK_EQ_INT(rd_tls_feed(p->s.t, rd_block_payload(b), len), 0);
    rd_block_unref(b);
  }
  uint8_t buf[64];
  CHECK_EQ_INT(rd_tls_read(p->s.t, buf, sizeof buf), 3);
  CHECK_EQ_INT(rd_tls_read(p->s.t, buf, sizeof buf), RD_ECLOSED);
  CHECK_EQ_INT(rd_tls_read(p->s.t, buf, sizeof buf), RD_ECLOSED);
  CHECK(contains(rd_tls_error(p->s.t), "close_notify"));
  /* The server may still answer, then close its side. */
  say(&p->s, &p->c, "last words");
  CHECK_EQ_INT(rd_tls_shutdown(p->s.t), 0);
  move(&p->s, &p->c, 0);
  CHECK_EQ_INT(p->c.status, RD_ECLOSED);
  CHECK_EQ_INT(rd_tls_read(p->c.t, buf, sizeof buf), RD_ECLOSED);
  /* Shutdown before the handshake just marks the connection. */
  rd_tls *t = new_tls(f.cctx, "localhost");
  CHECK_EQ_INT(rd_tls_shutdown(t), 0);
  CHECK_EQ_INT(rd_tls_write(t, "x", 1), RD_ECLOSED);
  rd_tls_free(t);
  teardown(&f);
}

/* A plain OpenSSL peer talking through memory BIOs: it reads from rb and
 * writes to wb. */
typedef struct openssl_peer {
  SSL_CTX *ctx;
  SSL *ssl;
  BIO *rb, *wb;
} openssl_peer;

static void openssl_peer_start(openssl_peer *o, SSL_CTX *ctx) {
  o->ctx = ctx;
  o->ssl = SSL_new(ctx);
  o->rb = BIO_new(BIO_s_mem());
  o->wb = BIO_new(BIO_s_mem());
  SSL_set_bio(o->ssl, o->rb, o->wb);
}

/* Everything the peer has written, into t. */
static void openssl_to_tls(openssl_peer *o, rd_tls *t) {
  char buf[16384];
  int n;
  while ((n = BIO_read(o->wb, buf, sizeof buf)) > 0)
    rd_tls_feed(t, (uint8_t *)buf, (size_t)n);
}

/* Everything t has to send, to the peer. */
static void tls_to_openssl(rd_tls *t, openssl_peer *o) {
  size_t len;
  rd_block *b;
  while ((b = rd_tls_take_output(t, &len)) != NULL) {
    BIO_write(o->rb, rd_block_payload(b), (int)len);
    rd_block_unref(b);
  }
}

/* Copies t's error out, then frees t and the peer; OpenSSL's own errors on
 * the peer's side are expected and cleared. */
static void openssl_peer_end(openssl_peer *o, rd_tls *t, char *err, size_t errlen) {
  snprintf(err, errlen, "%s", rd_tls_error(t));
  rd_tls_free(t);
  SSL_free(o->ssl);
  SSL_CTX_free(o->ctx);
  ERR_clear_error();
}

/* A plain OpenSSL client with memory BIOs limited to one protocol version,
 * against our server. Returns the server's result. */
static int versioned_client(int version, rd_tls_ctx *sctx, char *server_err, size_t errlen) {
  SSL_CTX *c = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_security_level(c, 0);
  SSL_CTX_set_cipher_list(c, "DEFAULT:@SECLEVEL=0");
  SSL_CTX_set_min_proto_version(c, version);
  SSL_CTX_set_max_proto_version(c, version);
  SSL_CTX_set_verify(c, SSL_VERIFY_NONE, NULL);
  openssl_peer o;
  openssl_peer_start(&o, c);
  SSL_set_connect_state(o.ssl);
  rd_tls *t = new_tls(sctx, NULL);
  int rc = RD_EPARTIAL;
  for (int i = 0; i < 20; i++) {
    SSL_do_handshake(o.ssl);
    openssl_to_tls(&o, t);
    rc = rd_tls_handshake(t);
    tls_to_openssl(t, &o);
    if (rc != RD_EPARTIAL && SSL_is_init_finished(o.ssl))
      break;
    if (rc == RD_ETLS)
      break;
  }
  if (rc == 0) {
    CHECK(SSL_is_init_finished(o.ssl));
    CHECK_EQ_INT(SSL_version(o.ssl), version);
  }
  openssl_peer_end(&o, t, server_err, errlen);
  return rc;
}

/* Our client against a plain OpenSSL server limited to one version,
 * optionally requiring a client certificate from ca.pem. Returns the
 * client's result. */
static int versioned_server(int version, int want_cert, rd_tls_ctx *cctx, char *client_err,
                            size_t errlen) {
  SSL_CTX *c = SSL_CTX_new(TLS_server_method());
  SSL_CTX_set_max_proto_version(c, version);
  SSL_CTX_use_certificate_chain_file(c, P("server.pem"));
  SSL_CTX_use_PrivateKey_file(c, P("server.key"), SSL_FILETYPE_PEM);
  if (want_cert) {
    SSL_CTX_load_verify_locations(c, P("ca.pem"), NULL);
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
  }
  openssl_peer o;
  openssl_peer_start(&o, c);
  SSL_set_accept_state(o.ssl);
  rd_tls *t = new_tls(cctx, "localhost");
  int rc = RD_EPARTIAL;
  for (int i = 0; i < 20 && rc == RD_EPARTIAL; i++) {
    rc = rd_tls_handshake(t);
    tls_to_openssl(t, &o);
    SSL_do_handshake(o.ssl);
    openssl_to_tls(&o, t);
  }
  if (rc == 0) {
    uint8_t tmp[16];
    int64_t n = rd_tls_read(t, tmp, sizeof tmp);
    if (n != RD_EPARTIAL)
      rc = (int)n;
  }
  if (rc == 0) {
    CHECK(strcmp(rd_tls_version(t), version == TLS1_2_VERSION ? "TLSv1.2" : "TLSv1.3") == 0);
    CHECK_EQ_INT(rd_tls_write(t, "hi", 2), 0);
  }
  openssl_peer_end(&o, t, client_err, errlen);
  return rc;
}

TEST(protocol_versions) {
  begin();
  char err[256];
  rd_tls_ctx *sctx = server_ctx("server.pem", "server.key", NULL);
  CHECK_EQ_INT(versioned_client(TLS1_2_VERSION, sctx, err, sizeof err), 0);
  CHECK_EQ_INT(versioned_client(TLS1_3_VERSION, sctx, err, sizeof err), 0);
  CHECK_EQ_INT(versioned_client(TLS1_1_VERSION, sctx, err, sizeof err), RD_ETLS);
  CHECK(contains(err, "tls: handshake failure: "));
  CHECK_EQ_INT(versioned_client(TLS1_VERSION, sctx, err, sizeof err), RD_ETLS);
  rd_tls_ctx_unref(sctx);
  /* Our client against TLS 1.2 and 1.3 servers, with and without the client
   * certificate they ask for: TLS 1.2 says only "handshake failure". */
  rd_tls_ctx *bare = client_ctx("ca.pem", 0, NULL, NULL);
  rd_tls_ctx *withcert = client_ctx("ca.pem", 0, "client.pem", "client.key");
  int versions[] = {TLS1_2_VERSION, TLS1_3_VERSION};
  for (int i = 0; i < 2; i++) {
    CHECK_EQ_INT(versioned_server(versions[i], 0, bare, err, sizeof err), 0);
    CHECK_EQ_INT(versioned_server(versions[i], 1, withcert, err, sizeof err), 0);
    CHECK_EQ_INT(versioned_server(versions[i], 1, bare, err, sizeof err), RD_ETLS);
    CHECK(contains(err, "(the server requires a client certificate)"));
  }
  rd_tls_ctx_unref(bare);
  rd_tls_ctx_unref(withcert);
  finish();
}

/* Allocation n from now fails somewhere in a full connection's life: every
 * step must fail cleanly and free everything. */
static int injection_unused(int64_t n) {
  /* If the countdown was not reached, one of the next n + 1 allocations
   * fails. */
  void *probe[64];
  int unused = 0, k = 0;
  for (int64_t i = 0; i <= n && k < 64; i++, k++) {
    probe[k] = rd_malloc(1);
    if (probe[k] == NULL) {
      unused = 1;
      break;
    }
  }
  for (int i = 0; i < k; i++)
    rd_free(probe[i]);
  rd_alloc_fail_nth(-1);
  return unused;
}

TEST(failing_allocations) {
  begin();
  rd_tls_ctx *sctx = server_ctx("server.pem", "server.key", "ca.pem");
  rd_tls_ctx *cctx = client_ctx("ca.pem", 0, "client.pem", "client.key");
  static uint8_t data[150000];
  int64_t i;
  for (i = 0; i < 60; i++) {
    rd_block_pool_trim();
    int64_t before = rd_alloc_bytes();
    rd_alloc_fail_nth(i);
    char err[256];
    pair p;
    memset(&p, 0, sizeof p);
    sink_init(&p.c.got);
    sink_init(&p.s.got);
    p.c.t = rd_tls_new(cctx, "localhost", err, sizeof err);
    if (p.c.t == NULL)
      CHECK(contains(err, "out of memory"));
    p.s.t = rd_tls_new(sctx, NULL, err, sizeof err);
    if (p.s.t == NULL)
      CHECK(contains(err, "out of memory"));
    if (p.c.t != NULL && p.s.t != NULL) {
      drive(&p.c, &p.s, 0);
      int rc = rd_tls_write(p.c.t, data, sizeof data);
      CHECK(rc == 0 || rc == RD_ENOMEM || rc == RD_ETLS || rc == RD_EPARTIAL);
      if (rc == RD_ENOMEM)
        CHECK(contains(rd_tls_error(p.c.t), "out of memory"));
      move(&p.c, &p.s, 0);
      rc = rd_tls_write(p.s.t, data, sizeof data);
      CHECK(rc == 0 || rc == RD_ENOMEM || rc == RD_ETLS || rc == RD_EPARTIAL);
      move(&p.s, &p.c, 0);
      rd_tls_shutdown(p.c.t);
      move(&p.c, &p.s, 0);
    }
    int done = injection_unused(i);
    if (done) {
      /* No failure happened: the whole life must have worked. */
      CHECK_EQ_INT(p.c.status, 0);
      CHECK_EQ_INT(p.s.status, RD_ECLOSED);
      CHECK_EQ_INT(p.s.got.bytes, sizeof data);
      CHECK_EQ_INT(p.c.got.bytes, sizeof data);
    }
    free_pair(&p);
    check_nothing_held(before);
    ERR_clear_error();
    if (done)
      break;
  }
  /* The walk failed every allocation of a connection's life in turn, and
   * then reached a run with none left to fail. */
  CHECK(i > 10 && i < 60);
  if (getenv("RD_TLS_TEST_VERBOSE"))
    fprintf(stderr, "allocations in a connection's life: %lld\n", (long long)i);
  rd_tls_ctx_unref(cctx);
  rd_tls_ctx_unref(sctx);
  finish();
}

RD_TEST_MAIN(T(handshake_and_echo), T(write_before_handshake), T(handshake_one_byte_at_a_time),
             T(ip_address_names), T(bulk_8mib_each_way), T(output_chunks),
             T(input_grows_when_not_drained), T(wrong_host), T(expired_and_not_yet_valid),
             T(unknown_authority), T(insecure_accepts_anything), T(client_certificates),
             T(reload_server), T(refcounts), T(context_errors), T(garbage_to_server),
             T(garbage_to_client), T(corrupted_record), T(close_notify), T(protocol_versions),
             T(failing_allocations))
