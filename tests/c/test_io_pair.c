/* The in-memory stream pair (rd_io_new_pair, rd_io_pair.c) through rd_io's
 * calls, on a loop of the test's own: order, partial reads into small
 * buffers, backpressure while the reader is stopped, shutdown and close as
 * the other end sees them, cancelled writes, callbacks only from the loop
 * (never inside the call that started the work), failing allocations, TLS
 * carried over a pair (as the proxy route's https leg does), and every byte
 * of the engine's heap back at the end (ASan checks the rest). */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_io.h"
#include "rd_test.h"
#include "rd_tls.h"

/* Set around every call into the io: a callback that runs while it is set
 * ran inside the call that started its work. */
static int in_call;
#define CALL(stmt)                                                                    \
  do {                                                                                \
    in_call = 1;                                                                      \
    stmt;                                                                             \
    in_call = 0;                                                                      \
  } while (0)

static int order; /* callbacks, numbered as they run */

typedef struct side {
  rd_io *io;
  char got[262144];
  size_t got_len;
  size_t buf_size; /* what alloc gives (0: 64 KiB) */
  char scratch[65536];
  int reads, eof, error, closed, close_order;
  int shutdown_status, shutdown_done;
  size_t stop_after;   /* stop reading once this many bytes arrived (0: never) */
  int close_on_read;   /* close itself inside its first read callback */
  int close_other_on_read; /* close the other end there */
  struct side *other;
} side;

typedef struct wr {
  uv_write_t req;
  int status, done, order;
} wr;

static void alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  side *s = rd_io_data(io);
  CHECK(!in_call);
  CHECK(suggested > 0);
  size_t n = s->buf_size != 0 ? s->buf_size : sizeof s->scratch;
  *buf = uv_buf_init(s->scratch, (unsigned)n);
}

static void closed_cb(rd_io *io) {
  side *s = rd_io_data(io);
  CHECK(!in_call);
  s->closed = 1;
  s->close_order = ++order;
}

static void read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  side *s = rd_io_data(io);
  CHECK(!in_call);
  if (nread > 0) {
    CHECK(buf->base == s->scratch);
    CHECK((size_t)nread <= (s->buf_size != 0 ? s->buf_size : sizeof s->scratch));
    CHECK(s->got_len + (size_t)nread <= sizeof s->got);
    memcpy(s->got + s->got_len, buf->base, (size_t)nread);
    s->got_len += (size_t)nread;
    s->reads++;
    if (s->stop_after != 0 && s->got_len >= s->stop_after)
      rd_io_read_stop(io);
    if (s->close_on_read)
      rd_io_close(io, closed_cb);
    if (s->close_other_on_read && !rd_io_is_closing(s->other->io))
      rd_io_close(s->other->io, closed_cb);
  } else if (nread == UV_EOF) {
    s->eof++;
  } else if (nread < 0) {
    s->error = (int)nread;
  }
}

static void write_cb(uv_write_t *req, int status) {
  wr *w = (wr *)req;
  CHECK(!in_call);
  CHECK(!w->done);
  w->done = 1;
  w->status = status;
  w->order = ++order;
}

static void shutdown_cb(rd_io *io, int status) {
  side *s = rd_io_data(io);
  CHECK(!in_call);
  s->shutdown_done++;
  s->shutdown_status = status;
  s->close_order = ++order;
}

static uv_loop_t loop;
static side A, B;
static int64_t heap_before;

/* A fresh loop and pair; A and B are its ends. */
static void setup(void) {
  memset(&A, 0, sizeof A);
  memset(&B, 0, sizeof B);
  order = 0;
  rd_block_pool_trim();
  heap_before = rd_alloc_bytes();
  CHECK_EQ_INT(uv_loop_init(&loop), 0);
  CHECK_EQ_INT(rd_io_new_pair(&loop, &A.io, &B.io), 0);
  rd_io_set_data(A.io, &A);
  rd_io_set_data(B.io, &B);
  A.other = &B;
  B.other = &A;
}

/* Closes what is still open, runs the loop dry and checks that the pair
 * left nothing behind: no handle, no byte of heap. */
static void teardown(void) {
  if (!A.closed && !rd_io_is_closing(A.io))
    rd_io_close(A.io, closed_cb);
  if (!B.closed && !rd_io_is_closing(B.io))
    rd_io_close(B.io, closed_cb);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(A.closed && B.closed);
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  CHECK_EQ_INT(rd_block_in_use(), 0); /* TLS output travels in blocks */
  rd_block_pool_trim();
  CHECK_EQ_INT(rd_alloc_bytes(), heap_before);
}

static int write_str(rd_io *io, wr *w, const char *text) {
  uv_buf_t buf = uv_buf_init((char *)text, (unsigned)strlen(text));
  int rc;
  CALL(rc = rd_io_write(io, &w->req, &buf, 1, write_cb));
  return rc;
}

static int read_start(side *s) {
  int rc;
  CALL(rc = rd_io_read_start(s->io, alloc_cb, read_cb));
  return rc;
}

TEST(test_facts) {
  setup();
  CHECK_EQ_INT(rd_io_fileno(A.io), -1);
  CHECK(rd_io_stream(A.io) == NULL);
  CHECK(!rd_io_is_dgram(A.io));
  CHECK(!rd_io_is_tls(A.io));
  CHECK_EQ_INT(rd_io_handshake(A.io, NULL), UV_EINVAL);
  CHECK_EQ_INT(read_start(&A), 0);
  CHECK_EQ_INT(rd_io_start_tls(A.io, NULL), UV_EINVAL); /* reading already */
  rd_io_read_stop(A.io);
  CHECK_EQ_INT(rd_io_peer_done(A.io), 0);
  CHECK_EQ_INT(rd_io_write_queue_size(A.io), 0);
  /* Nothing pending: the loop has nothing active and returns at once. */
  CHECK_EQ_INT(uv_run(&loop, UV_RUN_DEFAULT), 0);
  teardown();
}

TEST(test_order_and_deferred) {
  setup();
  wr w[4];
  memset(w, 0, sizeof w);
  CHECK_EQ_INT(read_start(&B), 0);
  CHECK_EQ_INT(write_str(A.io, &w[0], "hello"), 0);
  uv_buf_t two[3] = {uv_buf_init(" ", 1), uv_buf_init("", 0), uv_buf_init("wor", 3)};
  CALL(CHECK_EQ_INT(rd_io_write(A.io, &w[1].req, two, 3, write_cb), 0));
  CHECK_EQ_INT(write_str(A.io, &w[2], ""), 0); /* zero bytes: done in its turn */
  CHECK_EQ_INT(write_str(A.io, &w[3], "ld"), 0);
  /* Queued, nothing called back yet. */
  CHECK_EQ_INT(rd_io_write_queue_size(A.io), 11);
  CHECK(!w[0].done && !w[3].done && B.reads == 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, 11);
  CHECK(memcmp(B.got, "hello world", 11) == 0);
  CHECK_EQ_INT(B.reads, 1); /* one read took every write */
  for (int i = 0; i < 4; i++) {
    CHECK(w[i].done);
    CHECK_EQ_INT(w[i].status, 0);
    if (i > 0)
      CHECK(w[i].order > w[i - 1].order);
  }
  CHECK_EQ_INT(rd_io_write_queue_size(A.io), 0);
  /* And the other way. */
  wr back;
  memset(&back, 0, sizeof back);
  CHECK_EQ_INT(read_start(&A), 0);
  CHECK_EQ_INT(write_str(B.io, &back, "back"), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(A.got_len, 4);
  CHECK(back.done && back.status == 0);
  teardown();
}

TEST(test_partial_reads) {
  setup();
  B.buf_size = 3;
  wr w;
  memset(&w, 0, sizeof w);
  CHECK_EQ_INT(write_str(A.io, &w, "0123456789"), 0);
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, 10);
  CHECK(memcmp(B.got, "0123456789", 10) == 0);
  CHECK_EQ_INT(B.reads, 4); /* 3 + 3 + 3 + 1 */
  CHECK(w.done && w.status == 0);
  teardown();
}

/* Only once the reader took the last byte does the write call back. */
/* One turn of the loop reads at most 32 buffers into an end, as libuv
 * reads a socket: what is left waits for the next turn. */
TEST(test_reads_per_turn) {
  setup();
  B.buf_size = 1;
  wr w;
  memset(&w, 0, sizeof w);
  char data[100];
  memset(data, 'x', sizeof data);
  uv_buf_t buf = uv_buf_init(data, sizeof data);
  CALL(CHECK_EQ_INT(rd_io_write(A.io, &w.req, &buf, 1, write_cb), 0));
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK_EQ_INT(B.reads, 32);
  CHECK_EQ_INT(rd_io_write_queue_size(A.io), 68);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.reads, 100);
  CHECK(w.done && w.status == 0);
  teardown();
}

/* Work queued from a timer, before the loop polls, does not wait for the
 * poll to block: here the only other event is a timer 5 s away. */
static uv_timer_t soon, late;
static wr timer_w;
static uint64_t read_at;

static void late_cb(uv_timer_t *t) { (void)t; }

static void soon_cb(uv_timer_t *t) {
  (void)t;
  uv_buf_t buf = uv_buf_init("tick", 4);
  CHECK_EQ_INT(rd_io_write(A.io, &timer_w.req, &buf, 1, write_cb), 0);
}

static void stop_late_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  read_cb(io, nread, buf);
  read_at = uv_now(&loop);
  uv_timer_stop(&late);
}

TEST(test_work_from_a_timer_does_not_wait_for_the_poll) {
  setup();
  memset(&timer_w, 0, sizeof timer_w);
  read_at = 0;
  uv_timer_init(&loop, &soon);
  uv_timer_init(&loop, &late);
  uv_timer_start(&soon, soon_cb, 1, 0);
  uv_timer_start(&late, late_cb, 5000, 0);
  uint64_t start = uv_now(&loop);
  CALL(CHECK_EQ_INT(rd_io_read_start(B.io, alloc_cb, stop_late_read_cb), 0));
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, 4);
  CHECK(timer_w.done && timer_w.status == 0);
  CHECK(read_at != 0 && read_at - start < 1000);
  uv_close((uv_handle_t *)&soon, NULL);
  uv_close((uv_handle_t *)&late, NULL);
  teardown();
}

TEST(test_write_completes_when_read) {
  setup();
  B.buf_size = 4;
  B.stop_after = 4;
  wr w;
  memset(&w, 0, sizeof w);
  CHECK_EQ_INT(write_str(A.io, &w, "abcdefgh"), 0);
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT); /* returns: the reader stopped, nothing runs */
  CHECK_EQ_INT(B.got_len, 4);
  CHECK(!w.done);
  CHECK_EQ_INT(rd_io_write_queue_size(A.io), 4);
  B.stop_after = 0;
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, 8);
  CHECK(w.done && w.status == 0);
  teardown();
}

TEST(test_backpressure) {
  setup();
  enum { N = 200, LEN = 1000 };
  static char data[N][LEN];
  static wr w[N];
  memset(w, 0, sizeof w);
  for (int i = 0; i < N; i++) {
    memset(data[i], 'a' + i % 26, LEN);
    uv_buf_t buf = uv_buf_init(data[i], LEN);
    CALL(CHECK_EQ_INT(rd_io_write(A.io, &w[i].req, &buf, 1, write_cb), 0));
  }
  /* Nobody reads: the writes stay queued and the queue size says so. */
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(rd_io_write_queue_size(A.io), N * LEN);
  CHECK(!w[0].done);
  B.buf_size = 777; /* reads that straddle writes */
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, N * LEN);
  int same = 1;
  for (int i = 0; i < N; i++)
    same &= memcmp(B.got + (size_t)i * LEN, data[i], LEN) == 0 && w[i].done && w[i].status == 0;
  CHECK(same);
  CHECK_EQ_INT(rd_io_write_queue_size(A.io), 0);
  teardown();
}

/* Writes issued from write callbacks, few in flight at a time, read in
 * small pieces: the ring wraps many times and keeps the order. */
static int chain_next, chain_total;
static char chain_bytes[4096];
static wr chain_w[8];

static void chain_write_cb(uv_write_t *req, int status) {
  CHECK_EQ_INT(status, 0);
  if (chain_next >= chain_total)
    return;
  int i = chain_next++;
  uv_buf_t buf = uv_buf_init(&chain_bytes[i], 1);
  CHECK_EQ_INT(rd_io_write(A.io, req, &buf, 1, chain_write_cb), 0);
}

TEST(test_ring_wraps) {
  setup();
  chain_total = (int)sizeof chain_bytes;
  for (int i = 0; i < chain_total; i++)
    chain_bytes[i] = (char)(i * 7);
  chain_next = 0;
  for (int i = 0; i < 8; i++) {
    int k = chain_next++;
    uv_buf_t buf = uv_buf_init(&chain_bytes[k], 1);
    CHECK_EQ_INT(rd_io_write(A.io, &chain_w[i].req, &buf, 1, chain_write_cb), 0);
  }
  B.buf_size = 5;
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, sizeof chain_bytes);
  CHECK(memcmp(B.got, chain_bytes, sizeof chain_bytes) == 0);
  teardown();
}

TEST(test_shutdown_eof_after_data) {
  setup();
  wr w, back, late;
  memset(&w, 0, sizeof w);
  memset(&back, 0, sizeof back);
  memset(&late, 0, sizeof late);
  CHECK_EQ_INT(write_str(A.io, &w, "last words"), 0);
  CALL(CHECK_EQ_INT(rd_io_shutdown(A.io, shutdown_cb), 0));
  CHECK_EQ_INT(rd_io_shutdown(A.io, shutdown_cb), UV_EINVAL); /* once */
  CHECK_EQ_INT(write_str(A.io, &late, "more"), UV_EPIPE);     /* shut: no more writes */
  CHECK_EQ_INT(rd_io_peer_done(B.io), 1);
  CHECK_EQ_INT(rd_io_peer_done(A.io), 0);
  /* The shutdown waits for its bytes to be read. */
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(A.shutdown_done, 0);
  B.buf_size = 4;
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, 10);
  CHECK_EQ_INT(B.eof, 1); /* after the bytes, once: reading stopped */
  CHECK(w.done && w.status == 0);
  CHECK_EQ_INT(A.shutdown_done, 1);
  CHECK_EQ_INT(A.shutdown_status, 0);
  CHECK(A.close_order > w.order);
  /* Half-closed: the other way still works. */
  CHECK_EQ_INT(read_start(&A), 0);
  CHECK_EQ_INT(write_str(B.io, &back, "reply"), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(A.got_len, 5);
  CHECK(back.done && back.status == 0);
  /* A new read start reads the EOF again, as a socket's would. */
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.eof, 2);
  teardown();
}

TEST(test_close_eof_and_epipe) {
  setup();
  wr toward_a, after;
  memset(&toward_a, 0, sizeof toward_a);
  memset(&after, 0, sizeof after);
  CHECK_EQ_INT(read_start(&B), 0);
  CHECK_EQ_INT(write_str(B.io, &toward_a, "unread"), 0); /* A never reads it */
  CALL(rd_io_close(A.io, closed_cb));
  CHECK(!A.closed);
  CHECK_EQ_INT(rd_io_peer_done(B.io), 1);
  /* B's writes fail from now on, at once; the queued one in its turn. */
  CHECK_EQ_INT(write_str(B.io, &after, "x"), UV_EPIPE);
  uv_buf_t one = uv_buf_init("x", 1);
  CHECK_EQ_INT(rd_io_try_write(B.io, &one, 1), UV_EPIPE);
  CHECK_EQ_INT(rd_io_write_queue_size(B.io), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(A.closed);
  CHECK_EQ_INT(B.eof, 1);
  CHECK(toward_a.done);
  CHECK_EQ_INT(toward_a.status, UV_EPIPE);
  CHECK(!after.done);
  teardown();
}

TEST(test_close_cancels_queued) {
  setup();
  wr w1, w2;
  memset(&w1, 0, sizeof w1);
  memset(&w2, 0, sizeof w2);
  B.buf_size = 2;
  B.stop_after = 2;
  CHECK_EQ_INT(write_str(A.io, &w1, "read in part"), 0);
  CHECK_EQ_INT(write_str(A.io, &w2, "never read"), 0);
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, 2);
  CALL(CHECK_EQ_INT(rd_io_shutdown(A.io, shutdown_cb), 0));
  CALL(rd_io_close(A.io, closed_cb));
  CHECK(!w1.done && !w2.done && !A.closed && A.shutdown_done == 0);
  CHECK_EQ_INT(write_str(A.io, &w1, "closing"), UV_EPIPE);
  B.stop_after = 0;
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  /* Cancelled, in order, then the shutdown, then the close; B reads only
   * the EOF. */
  CHECK_EQ_INT(w1.status, UV_ECANCELED);
  CHECK_EQ_INT(w2.status, UV_ECANCELED);
  CHECK(w1.order < w2.order);
  CHECK_EQ_INT(A.shutdown_done, 1);
  CHECK_EQ_INT(A.shutdown_status, UV_ECANCELED);
  CHECK(A.closed);
  CHECK_EQ_INT(B.got_len, 2);
  CHECK_EQ_INT(B.eof, 1);
  teardown();
}

/* Writes the reader already took complete with 0 even when the writer
 * closes before their callbacks ran (here inside the read callback); the
 * write behind them is cancelled. */
TEST(test_close_after_read_completes_ok) {
  setup();
  wr w, w2;
  memset(&w, 0, sizeof w);
  memset(&w2, 0, sizeof w2);
  B.buf_size = 5;
  B.close_other_on_read = 1;
  CHECK_EQ_INT(write_str(A.io, &w, "taken"), 0);
  CHECK_EQ_INT(write_str(A.io, &w2, "not taken"), 0);
  CHECK_EQ_INT(read_start(&B), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(A.closed);
  CHECK_EQ_INT(B.got_len, 5);
  CHECK_EQ_INT(B.eof, 1);
  CHECK(w.done && w.status == 0);
  CHECK(w2.done && w2.status == UV_ECANCELED);
  CHECK(w.order < w2.order && w2.order < A.close_order);
  teardown();
}

/* An end that closes inside its own read callback: its peer's write, read
 * in that callback, still completes with 0; nothing runs on the closed end. */
TEST(test_close_inside_read) {
  setup();
  wr w;
  memset(&w, 0, sizeof w);
  B.close_on_read = 1;
  CHECK_EQ_INT(write_str(A.io, &w, "bye"), 0);
  CHECK_EQ_INT(read_start(&B), 0);
  CHECK_EQ_INT(read_start(&A), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(B.closed);
  CHECK_EQ_INT(B.reads, 1);
  CHECK(w.done && w.status == 0);
  CHECK_EQ_INT(A.eof, 1);
  teardown();
}

TEST(test_both_close_at_once) {
  setup();
  wr w1, w2;
  memset(&w1, 0, sizeof w1);
  memset(&w2, 0, sizeof w2);
  CHECK_EQ_INT(write_str(A.io, &w1, "a"), 0);
  CHECK_EQ_INT(write_str(B.io, &w2, "b"), 0);
  CALL(rd_io_close(A.io, closed_cb));
  CALL(rd_io_close(B.io, closed_cb));
  CALL(rd_io_close(B.io, closed_cb)); /* idempotent */
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(A.closed && B.closed);
  CHECK_EQ_INT(w1.status, UV_ECANCELED);
  CHECK_EQ_INT(w2.status, UV_EPIPE); /* A closed first */
  teardown();
}

/* Every allocation the pair makes may fail: nothing is made, or the write
 * is refused, and nothing leaks. */
TEST(test_failing_allocations) {
  int made = 0;
  for (int64_t i = 0; i < 8 && !made; i++) {
    int64_t before = rd_alloc_bytes();
    CHECK_EQ_INT(uv_loop_init(&loop), 0);
    rd_io *a = NULL, *b = NULL;
    wr w;
    memset(&w, 0, sizeof w);
    rd_alloc_fail_nth(i);
    int rc = rd_io_new_pair(&loop, &a, &b);
    if (rc == 0) {
      uv_buf_t buf = uv_buf_init("x", 1);
      rc = rd_io_write(a, &w.req, &buf, 1, write_cb);
      made = rc == 0;
      if (!made)
        CHECK_EQ_INT(rc, RD_ENOMEM);
      rd_io_close(a, NULL);
      rd_io_close(b, NULL);
    } else {
      CHECK_EQ_INT(rc, RD_ENOMEM);
    }
    rd_alloc_fail_nth(-1);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_EQ_INT(uv_loop_close(&loop), 0);
    CHECK_EQ_INT(rd_alloc_bytes(), before);
  }
  CHECK(made);
}

/* ---- TLS over a pair ---- */

static char cert_dir[64], cert_path[96], key_path[96];

static void remove_cert(void) {
  unlink(cert_path);
  unlink(key_path);
  rmdir(cert_dir);
}

/* A self-signed certificate for localhost and its key, in a temporary
 * directory removed at exit. */
static void make_cert(void) {
  strcpy(cert_dir, "/tmp/rd_io_pair_test.XXXXXX");
  if (mkdtemp(cert_dir) == NULL)
    abort();
  snprintf(cert_path, sizeof cert_path, "%s/server.pem", cert_dir);
  snprintf(key_path, sizeof key_path, "%s/server.key", cert_dir);
  atexit(remove_cert);
  EVP_PKEY *key = EVP_EC_gen("P-256");
  X509 *x = X509_new();
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
  X509_gmtime_adj(X509_getm_notBefore(x), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x), 3600);
  X509_set_pubkey(x, key);
  X509_NAME *name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1, -1,
                             0);
  X509_set_issuer_name(x, name);
  X509_sign(x, key, EVP_sha256());
  FILE *fp = fopen(cert_path, "w");
  PEM_write_X509(fp, x);
  fclose(fp);
  fp = fopen(key_path, "w");
  PEM_write_PrivateKey(fp, key, NULL, NULL, 0, NULL, NULL);
  fclose(fp);
  X509_free(x);
  EVP_PKEY_free(key);
}

static int handshakes, handshake_failures;
static char handshake_error[256];

static void handshake_cb(rd_io *io, int status, const char *error) {
  (void)io;
  CHECK(!in_call);
  if (status != 0) {
    snprintf(handshake_error, sizeof handshake_error, "%s", error != NULL ? error : "?");
    handshake_failures++;
  }
  handshakes++;
}

/* A is a TLS client, B a TLS server, over the pair: the handshake, a
 * request and a bulk answer read in small pieces, and a shutdown that B
 * reads as EOF after the last byte. */
TEST(test_tls_over_pair) {
  make_cert();
  char err[256] = "";
  rd_tls_ctx *cctx = rd_tls_ctx_new_client(NULL, 1, NULL, NULL, err, sizeof err);
  rd_tls_ctx *sctx = rd_tls_ctx_new_server(cert_path, key_path, NULL, err, sizeof err);
  CHECK(cctx != NULL && sctx != NULL);
  if (cctx == NULL || sctx == NULL) {
    fprintf(stderr, "tls contexts: %s\n", err);
    return;
  }
  setup();
  handshakes = handshake_failures = 0;
  CHECK_EQ_INT(rd_io_start_tls(A.io, rd_tls_new(cctx, "localhost", err, sizeof err)), 0);
  CHECK_EQ_INT(rd_io_start_tls(B.io, rd_tls_new(sctx, NULL, err, sizeof err)), 0);
  CHECK(rd_io_is_tls(A.io) && rd_io_is_tls(B.io));
  CALL(CHECK_EQ_INT(rd_io_handshake(A.io, handshake_cb), 0));
  CALL(CHECK_EQ_INT(rd_io_handshake(B.io, handshake_cb), 0));
  CHECK_EQ_INT(handshakes, 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(handshakes, 2);
  CHECK_EQ_INT(handshake_failures, 0);
  if (handshake_failures != 0)
    fprintf(stderr, "handshake: %s\n", handshake_error);

  wr req;
  memset(&req, 0, sizeof req);
  CHECK_EQ_INT(read_start(&B), 0);
  CHECK_EQ_INT(write_str(A.io, &req, "GET / HTTP/1.1\r\n\r\n"), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(B.got_len, 18);
  CHECK(memcmp(B.got, "GET / HTTP/1.1\r\n\r\n", 18) == 0);
  CHECK(req.done && req.status == 0);

  enum { BULK = 200000 };
  static char bulk[BULK];
  for (size_t i = 0; i < BULK; i++)
    bulk[i] = (char)(i * 31 + (i >> 9));
  static wr answer[4];
  memset(answer, 0, sizeof answer);
  for (int i = 0; i < 4; i++) {
    uv_buf_t buf = uv_buf_init(bulk + i * (BULK / 4), BULK / 4);
    CALL(CHECK_EQ_INT(rd_io_write(B.io, &answer[i].req, &buf, 1, write_cb), 0));
  }
  A.buf_size = 1000;
  CHECK_EQ_INT(read_start(&A), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(A.got_len, BULK);
  CHECK(memcmp(A.got, bulk, BULK) == 0);
  for (int i = 0; i < 4; i++)
    CHECK(answer[i].done && answer[i].status == 0);

  /* close_notify, then the pair's EOF: B reads the end once. */
  CALL(CHECK_EQ_INT(rd_io_shutdown(A.io, shutdown_cb), 0));
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(A.shutdown_done, 1);
  CHECK_EQ_INT(A.shutdown_status, 0);
  CHECK_EQ_INT(B.eof, 1);
  CHECK_EQ_INT(B.error, 0);
  teardown();
  rd_tls_ctx_unref(cctx);
  rd_tls_ctx_unref(sctx);
}

/* An end that closes mid-handshake: the other end's handshake fails, and
 * both ends' memory (TLS state included) goes. */
TEST(test_tls_peer_closes_in_handshake) {
  char err[256] = "";
  rd_tls_ctx *cctx = rd_tls_ctx_new_client(NULL, 1, NULL, NULL, err, sizeof err);
  CHECK(cctx != NULL);
  if (cctx == NULL)
    return;
  setup();
  handshakes = handshake_failures = 0;
  CHECK_EQ_INT(rd_io_start_tls(A.io, rd_tls_new(cctx, "localhost", err, sizeof err)), 0);
  CALL(CHECK_EQ_INT(rd_io_handshake(A.io, handshake_cb), 0));
  CALL(rd_io_close(B.io, closed_cb)); /* the server never answers */
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ_INT(handshakes, 1);
  CHECK_EQ_INT(handshake_failures, 1);
  CHECK_STR(handshake_error, "tls: connection closed during handshake");
  teardown();
  rd_tls_ctx_unref(cctx);
}

RD_TEST_MAIN(T(test_facts), T(test_order_and_deferred), T(test_partial_reads), T(test_reads_per_turn),
             T(test_work_from_a_timer_does_not_wait_for_the_poll),
             T(test_write_completes_when_read), T(test_backpressure), T(test_ring_wraps),
             T(test_shutdown_eof_after_data), T(test_close_eof_and_epipe),
             T(test_close_cancels_queued), T(test_close_after_read_completes_ok),
             T(test_close_inside_read), T(test_both_close_at_once), T(test_failing_allocations),
             T(test_tls_over_pair), T(test_tls_peer_closes_in_handshake))
