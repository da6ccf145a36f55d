/* End-to-end tests of tunneled connections through the engine's API
 * (rd_api.h): a server dials through an agent's session to the agent's
 * targets; the ways a connection ends (either side, refused, unknown key,
 * reset, idle), many at once, bulk transfer and backpressure. Each case runs
 * in a process of its own with a fresh engine (rd_test_engine.h). */
#define _GNU_SOURCE
#include "rd_test_engine.h"

/* ---- one dial, echo, close ---- */

TEST(test_dial_echo) {
  start_echo();
  CHECK(start_server_and_agent());
  tconn c;
  if (!dial_agent1(g_echo_addr, &c))
    return;
  CHECK_EQ_INT(c.id, 2); /* the Go server's first connection id */
  CHECK(c.st != NULL);
  CHECK(echo_once(c.fd, "hello through the tunnel"));
  CHECK(echo_once(c.fd, "and again"));
  rd_conn_list conns;
  CHECK_EQ_INT(rd_api_server_connections(g_srv, &conns), RD_OK);
  CHECK_EQ_INT(conns.count, 1);
  if (conns.count == 1) {
    CHECK_EQ_INT(conns.items[0].id, c.id);
    CHECK_STR(conns.items[0].client_key, "agent-1");
    CHECK_STR(conns.items[0].proto, "tcp");
    CHECK_STR(conns.items[0].address, g_echo_addr);
    CHECK_STR(conns.items[0].state, "open");
  }
  rd_conn_list_free(&conns);
  close(c.fd);
  c.fd = -1;
  check_settled();
  CHECK(wait_status_ended(c.st));
  CHECK_STR(c.st->error, ""); /* a clean close */
  CHECK_EQ_INT(conns_added(g_srv, "agent-1", g_echo_addr), 1);
  CHECK_EQ_INT(conns_added(g_cli, "client", g_echo_addr), 1);
  tconn_close(&c);
}

/* ---- the far side ends cleanly: everything it sent arrives first ---- */

/* Larger than every kernel buffer on the way can hold (loopback TCP buffers
 * autotune to several MiB), so the server must buffer and pause. */
#define BIG (16u << 20)

/* Checks a /big/N response: the head, then exactly N pattern bytes. */
static int big_response_ok(const char *resp, ssize_t len, size_t n) {
  const char *body = strstr(resp, "\r\n\r\n");
  if (len < 0 || body == NULL || strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) != 0) {
    fprintf(stderr, "  big response: bad head (%zd bytes)\n", len);
    return 0;
  }
  body += 4;
  size_t blen = (size_t)(resp + len - body);
  if (blen != n) {
    fprintf(stderr, "  big response: body %zu bytes, want %zu\n", blen, n);
    return 0;
  }
  for (size_t i = 0; i < n; i++)
    if (body[i] != big_byte(i)) {
      fprintf(stderr, "  big response: byte %zu differs\n", i);
      return 0;
    }
  return 1;
}

/* Waits until the server's only connection has paused its sender. */
static int wait_server_paused(void) {
  uint64_t deadline = now_ms() + WAIT_MS;
  for (;;) {
    rd_conn_list l;
    int paused = 0;
    if (rd_api_server_connections(g_srv, &l) == RD_OK) {
      paused = l.count == 1 && l.items[0].paused;
      rd_conn_list_free(&l);
    }
    if (paused)
      return 1;
    if (now_ms() >= deadline)
      return 0;
    nap();
  }
}

TEST(test_far_side_closes) {
  start_http();
  CHECK(start_server_and_agent());
  static char resp[BIG + 4096];
  char req[256];
  snprintf(req, sizeof req, "GET /big/%u HTTP/1.1\r\nHost: x\r\n\r\n", BIG);
  const char *addr = g_http_addr;
  /* Through a dialed socket; we read only once the server has paused the
   * agent, so the target's close waits behind a full buffer. */
  tconn c;
  if (dial(g_srv, "agent-1", addr, &c) == RD_OK) {
    CHECK_EQ_INT(write_all(c.fd, req, strlen(req), WAIT_MS), 0);
    CHECK(wait_server_paused());
    int e = 0;
    ssize_t n = read_to_eof(c.fd, resp, sizeof resp, 2 * WAIT_MS, &e);
    CHECK_EQ_INT(e, 0);
    CHECK(big_response_ok(resp, n, BIG));
    CHECK(wait_status_ended(c.st));
    CHECK_STR(c.st->error, "");
    tconn_close(&c);
  }
  /* The same through the proxy route, from a socket whose receive window
   * cannot grow to swallow the response (asking to close after it: the
   * route keeps the client's connection otherwise). */
  int fd = tcp_connect_rcvbuf(g_port, 32 * 1024);
  CHECK(fd >= 0);
  if (fd >= 0) {
    snprintf(req, sizeof req,
             "GET /client/agent-1/http/%s/big/%u HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
             addr, BIG);
    CHECK_EQ_INT(write_all(fd, req, strlen(req), WAIT_MS), 0);
    CHECK(wait_server_paused());
    int e = 0;
    ssize_t n = read_to_eof(fd, resp, sizeof resp, 2 * WAIT_MS, &e);
    CHECK_EQ_INT(e, 0);
    CHECK(big_response_ok(resp, n, BIG));
    close(fd);
  }
  check_settled();
}

/* ---- dial to a closed port ---- */

TEST(test_dial_refused) {
  CHECK(start_server_and_agent());
  tconn c;
  if (!dial_agent1("127.0.0.1:1", &c))
    return;
  check_conn_ends(&c, "dial tcp 127.0.0.1:1: connect: connection refused");
  check_settled();
  CHECK_EQ_INT(conns_removed(g_srv, "agent-1", "127.0.0.1:1"), 1);
  /* A unix socket that is not there. */
  char err[256] = "";
  int rc = rd_api_server_dial(g_srv, "agent-1", "unix", "/nonexistent/rd-test.sock", DIAL_WAIT_MS, 0, &c.fd,
                              &c.id, &c.st, err, sizeof err);
  CHECK_EQ_INT(rc, RD_OK);
  if (rc == RD_OK) {
    check_conn_ends(&c,
                    "dial unix /nonexistent/rd-test.sock: connect: no such file or directory");
  }
  check_settled();
}

/* ---- dial an unknown client ---- */

TEST(test_dial_unknown_key) {
  start_echo();
  CHECK(start_server_and_agent());
  /* Junk in the outputs, to see them reset. */
  int fd = 123;
  int64_t id = 7;
  rd_dial_status *st = (rd_dial_status *)&fd;
  char err[256] = "";
  int rc = rd_api_server_dial(g_srv, "nope", "tcp", g_echo_addr, DIAL_WAIT_MS, 0, &fd, &id, &st, err, sizeof err);
  CHECK_EQ_INT(rc, RD_ENOSESSION);
  CHECK_STR(err, "failed to find Session for client nope");
  CHECK_EQ_INT(fd, -1);
  CHECK(st == NULL);
  CHECK_EQ_INT(conns_added(g_srv, "nope", g_echo_addr), 0);
}

/* ---- abrupt ends on either side; idle timeouts ---- */

TEST(test_abrupt_closes) {
  start_echo();
  CHECK(start_server_and_agent());
  static char junk[1 << 20];
  /* We close with bytes in flight both ways and unread. */
  tconn c;
  if (dial(g_srv, "agent-1", g_echo_addr, &c) == RD_OK) {
    CHECK_EQ_INT(write_all(c.fd, junk, sizeof junk, WAIT_MS), 0);
    tconn_close(&c);
  }
  /* The target resets its end. */
  int port = 0;
  int lfd = listen_loopback(0, 4, &port);
  CHECK(lfd >= 0);
  char addr[32];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
  if (dial(g_srv, "agent-1", addr, &c) == RD_OK) {
    CHECK_EQ_INT(write_all(c.fd, "doomed", 6, WAIT_MS), 0);
    CHECK(wait_fd(lfd, POLLIN, now_ms() + WAIT_MS));
    int fd = accept(lfd, NULL, NULL);
    CHECK(fd >= 0);
    char buf[6];
    CHECK_EQ_INT(read_n(fd, buf, sizeof buf, WAIT_MS), sizeof buf);
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd); /* RST */
    CHECK(reads_eof(c.fd));
    CHECK(wait_status_ended(c.st));
    CHECK(strstr(c.st->error, "connection reset by peer") != NULL);
    if (strstr(c.st->error, "connection reset by peer") == NULL)
      fprintf(stderr, "  reset reported as \"%s\"\n", c.st->error);
    tconn_close(&c);
  }
  close(lfd);
  check_settled();
}

TEST(test_idle_timeout) {
  start_echo();
  CHECK(start_server_and_agent());
  tconn c;
  char err[256] = "";
  int rc = rd_api_server_dial(g_srv, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 300, &c.fd, &c.id, &c.st, err,
                              sizeof err);
  CHECK_EQ_INT(rc, RD_OK);
  if (rc != RD_OK)
    return;
  /* Traffic keeps it open well past its idle time... */
  uint64_t until = now_ms() + 600, t0;
  for (;;) {
    CHECK(echo_once(c.fd, "keepalive"));
    t0 = now_ms(); /* the last traffic: the idle time counts from here */
    if (t0 >= until)
      break;
    struct timespec ts = {0, 50 * 1000000L};
    nanosleep(&ts, NULL);
  }
  CHECK(!atomic_load(&c.st->ended));
  /* ...and silence ends it. */
  CHECK(reads_eof(c.fd));
  uint64_t waited = now_ms() - t0;
  CHECK(waited >= 250);
  CHECK(wait_status_ended(c.st));
  CHECK_STR(c.st->error, "idle timeout");
  tconn_close(&c);
  check_settled();
}

/* ---- a thousand connections at once ---- */

#define NCONC 1000
#define NDIALERS 4 /* threads calling rd_api_server_dial at the same time */

static tconn conc[NCONC];
static char conc_msg[NCONC][48];

typedef struct {
  int first, count;
  int failed;
} dialer_job;

static void *dialer_main(void *arg) {
  dialer_job *j = arg;
  for (int i = j->first; i < j->first + j->count; i++) {
    if (dial(g_srv, "agent-1", g_echo_addr, &conc[i]) != RD_OK) {
      j->failed = 1;
      break;
    }
    /* Written at once: the message waits in the engine until the far side connects. */
    if (write_all(conc[i].fd, conc_msg[i], strlen(conc_msg[i]), WAIT_MS) != 0)
      j->failed = 1;
  }
  return NULL;
}

TEST(test_concurrent_dials) {
  start_echo();
  CHECK(start_server_and_agent());
  tconn *c = conc;
  char(*msg)[48] = conc_msg;
  static size_t got[NCONC];
  static char buf[NCONC][48];
  int ok = 1;
  double removed = conns_removed(g_srv, "agent-1", g_echo_addr);
  for (int i = 0; i < NCONC; i++) {
    c[i] = (tconn){-1, 0, NULL};
    got[i] = 0;
    snprintf(msg[i], sizeof msg[i], "message %d of %d: %08x", i, NCONC,
             (unsigned)(i * 2654435761u));
  }
  pthread_t t[NDIALERS];
  dialer_job jobs[NDIALERS];
  for (int k = 0; k < NDIALERS; k++) {
    jobs[k] = (dialer_job){k * (NCONC / NDIALERS), NCONC / NDIALERS, 0};
    CHECK_EQ_INT(pthread_create(&t[k], NULL, dialer_main, &jobs[k]), 0);
  }
  for (int k = 0; k < NDIALERS; k++) {
    pthread_join(t[k], NULL);
    if (jobs[k].failed)
      ok = 0;
  }
  CHECK(ok);
  /* Every id is distinct. */
  int dup = 0;
  for (int i = 0; ok && i < NCONC; i++)
    for (int k = i + 1; k < NCONC; k++)
      dup += c[i].id == c[k].id;
  CHECK_EQ_INT(dup, 0);
  CHECK(rd_engine_counts_get().open_connections >= NCONC);
  /* Read every echo, whichever comes first. */
  static struct pollfd p[NCONC];
  int left = ok ? NCONC : 0;
  uint64_t deadline = now_ms() + 3 * WAIT_MS;
  while (left > 0 && now_ms() < deadline) {
    for (int i = 0; i < NCONC; i++)
      p[i] = (struct pollfd){got[i] < strlen(msg[i]) ? c[i].fd : -1, POLLIN, 0};
    if (poll(p, NCONC, 100) <= 0)
      continue;
    for (int i = 0; i < NCONC; i++) {
      if (!p[i].revents)
        continue;
      size_t want = strlen(msg[i]);
      ssize_t r = recv(c[i].fd, buf[i] + got[i], want - got[i], MSG_DONTWAIT);
      if (r <= 0 && !(r < 0 && (errno == EAGAIN || errno == EINTR))) {
        fprintf(stderr, "  connection %d ended early (%zd, %s)\n", i, r,
                r < 0 ? strerror(errno) : "EOF");
        got[i] = want;
        buf[i][0] = '\0';
        left--;
        continue;
      }
      if (r > 0) {
        got[i] += (size_t)r;
        if (got[i] == want)
          left--;
      }
    }
  }
  CHECK_EQ_INT(left, 0);
  int mismatched = 0;
  for (int i = 0; ok && i < NCONC; i++)
    if (memcmp(buf[i], msg[i], strlen(msg[i])) != 0)
      mismatched++;
  CHECK_EQ_INT(mismatched, 0);
  rd_conn_list conns;
  CHECK_EQ_INT(rd_api_server_connections(g_srv, &conns), RD_OK);
  CHECK_EQ_INT(conns.count, ok ? NCONC : conns.count);
  rd_conn_list_free(&conns);
  for (int i = 0; i < NCONC; i++)
    tconn_close(&c[i]);
  check_settled();
  CHECK_EQ_INT(conns_removed(g_srv, "agent-1", g_echo_addr), removed + NCONC);
}

/* ---- 64 MiB both ways ---- */

#define BULK (64u << 20)

/* A reproducible byte stream (xorshift64*), so the reader can check every
 * byte without keeping what was sent. */
typedef struct {
  uint64_t x;
  uint64_t fnv; /* FNV-1a 64 of the bytes produced so far */
} stream_gen;

static void gen_fill(stream_gen *g, uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i += 8) {
    g->x ^= g->x >> 12;
    g->x ^= g->x << 25;
    g->x ^= g->x >> 27;
    uint64_t v = g->x * 0x2545F4914F6CDD1DULL;
    size_t k = n - i < 8 ? n - i : 8;
    memcpy(p + i, &v, k);
  }
}

static void fnv_add(uint64_t *h, const uint8_t *p, size_t n) {
  uint64_t x = *h;
  for (size_t i = 0; i < n; i++) {
    x ^= p[i];
    x *= 1099511628211ULL;
  }
  *h = x;
}

typedef struct {
  int fd;
  uint64_t fnv;
  int failed;
} bulk_writer;

static void *bulk_writer_main(void *arg) {
  bulk_writer *w = arg;
  stream_gen g = {0x9E3779B97F4A7C15ULL, 0};
  static uint8_t chunk[256 * 1024];
  w->fnv = 1469598103934665603ULL;
  for (size_t sent = 0; sent < BULK; sent += sizeof chunk) {
    gen_fill(&g, chunk, sizeof chunk);
    fnv_add(&w->fnv, chunk, sizeof chunk);
    if (write_all(w->fd, chunk, sizeof chunk, 2 * WAIT_MS) != 0) {
      w->failed = 1;
      break;
    }
  }
  return NULL;
}

TEST(test_bulk_64mib) {
  start_echo();
  CHECK(start_server_and_agent());
  tconn c;
  if (!dial_agent1(g_echo_addr, &c))
    return;
  bulk_writer w = {c.fd, 0, 0};
  pthread_t t;
  CHECK_EQ_INT(pthread_create(&t, NULL, bulk_writer_main, &w), 0);
  stream_gen g = {0x9E3779B97F4A7C15ULL, 0};
  static uint8_t buf[256 * 1024], want[256 * 1024];
  uint64_t fnv = 1469598103934665603ULL;
  size_t total = 0;
  int mismatch = 0;
  while (total < BULK) {
    size_t n = read_n(c.fd, buf, sizeof buf, 2 * WAIT_MS);
    if (n != sizeof buf) {
      fprintf(stderr, "  bulk: stalled after %zu bytes\n", total + n);
      break;
    }
    gen_fill(&g, want, sizeof want);
    if (!mismatch && memcmp(buf, want, n) != 0) {
      fprintf(stderr, "  bulk: bytes differ in [%zu, %zu)\n", total, total + n);
      mismatch = 1;
    }
    fnv_add(&fnv, buf, n);
    total += n;
  }
  if (total < BULK)
    shutdown(c.fd, SHUT_RDWR); /* unblock the writer */
  pthread_join(t, NULL);
  CHECK_EQ_INT(w.failed, 0);
  CHECK_EQ_INT(total, BULK);
  CHECK_EQ_INT(mismatch, 0);
  CHECK(fnv == w.fnv);
  CHECK(rd_engine_counts_get().buffered_bytes >= 0);
  tconn_close(&c);
  check_settled();
  CHECK_EQ_INT(rd_engine_counts_get().buffered_bytes, 0);
  /* Both sides counted every payload byte they delivered locally. */
  CHECK(sample_value(g_srv, "session_server_total_receive_bytes", "agent-1", NULL, NULL) >= BULK);
  CHECK(sample_value(g_cli, "session_server_total_receive_bytes", "client", NULL, NULL) >= BULK);
}

/* ---- a reader that stops: PAUSE holds the engine's buffers down ---- */

/* More than every socket buffer on the way could hold (loopback TCP buffers
 * autotune up to tens of MiB here): without PAUSE the writer would never
 * stall, and the engine would end the connection at its 16 MiB cap. */
#define PUSH_MAX (512u << 20)

typedef struct {
  int fd;
  _Atomic size_t sent;
  _Atomic int stop;
  int failed;
} push_writer;

/* Writes the generated stream until told to stop; `sent` counts every byte
 * the socket took, so the reader knows exactly what to expect. */
static void *push_writer_main(void *arg) {
  push_writer *w = arg;
  stream_gen g = {0x0123456789ABCDEFULL, 0};
  static uint8_t chunk[64 * 1024];
  uint64_t deadline = now_ms() + 6 * WAIT_MS;
  while (!atomic_load(&w->stop) && atomic_load(&w->sent) < PUSH_MAX) {
    gen_fill(&g, chunk, sizeof chunk);
    size_t off = 0;
    while (off < sizeof chunk && !atomic_load(&w->stop)) {
      if (now_ms() >= deadline) {
        w->failed = 1;
        return NULL;
      }
      if (!wait_fd(w->fd, POLLOUT, now_ms() + 20))
        continue;
      ssize_t n = send(w->fd, chunk + off, sizeof chunk - off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && errno != EAGAIN && errno != EINTR) {
        w->failed = 1;
        return NULL;
      }
      if (n > 0) {
        off += (size_t)n;
        atomic_fetch_add(&w->sent, (size_t)n);
      }
    }
  }
  return NULL;
}

TEST(test_backpressure) {
  start_echo();
  CHECK(start_server_and_agent());
  tconn c;
  if (!dial_agent1(g_echo_addr, &c))
    return;
  CHECK(echo_once(c.fd, "warm up"));
  int64_t heap0 = heap_in_use(), peak = heap0;
  push_writer w = {c.fd, 0, 0, 0};
  pthread_t t;
  CHECK_EQ_INT(pthread_create(&t, NULL, push_writer_main, &w), 0);
  /* Read nothing until the writer stalls: every stage of the loop (our
   * socket, the server, the agent, the echo server) has stopped taking
   * bytes. Stalled means no progress for 300 ms, with the server's
   * connection reporting its sender paused. */
  size_t last = (size_t)-1;
  uint64_t changed = now_ms(), deadline = now_ms() + 4 * WAIT_MS;
  int stalled = 0;
  while (!stalled && !w.failed && now_ms() < deadline) {
    size_t sent = atomic_load(&w.sent);
    int64_t heap = rd_alloc_bytes();
    if (heap > peak)
      peak = heap;
    if (sent != last) {
      last = sent;
      changed = now_ms();
    } else if (now_ms() - changed >= 300) {
      stalled = wait_server_paused() && atomic_load(&w.sent) == sent;
      changed = now_ms();
    }
    nap();
  }
  atomic_store(&w.stop, 1);
  pthread_join(t, NULL);
  CHECK(stalled);
  CHECK_EQ_INT(w.failed, 0);
  size_t total = atomic_load(&w.sent);
  /* With PAUSE each direction holds about max_buffer plus what was already
   * in flight when it was sent. */
  CHECK(peak - heap0 < (16 << 20));
  if (!stalled || peak - heap0 >= (16 << 20))
    fprintf(stderr, "  backpressure: writer at %zu MiB; engine heap grew %lld KiB at most\n",
            total >> 20, (long long)(peak - heap0) >> 10);
  rd_conn_list conns;
  CHECK_EQ_INT(rd_api_server_connections(g_srv, &conns), RD_OK);
  CHECK_EQ_INT(conns.count, 1);
  if (conns.count == 1) {
    CHECK(conns.items[0].paused);
    CHECK(conns.items[0].buffered > 0);
  }
  rd_conn_list_free(&conns);
  /* Now drain: everything arrives, in order. */
  stream_gen g = {0x0123456789ABCDEFULL, 0};
  static uint8_t buf[64 * 1024], want[64 * 1024];
  size_t got = 0;
  int mismatch = 0;
  while (got < total) {
    size_t n = total - got < sizeof buf ? total - got : sizeof buf;
    if (read_n(c.fd, buf, n, 2 * WAIT_MS) != n) {
      fprintf(stderr, "  backpressure: stalled after reading %zu of %zu bytes\n", got, total);
      break;
    }
    gen_fill(&g, want, sizeof want);
    if (!mismatch && memcmp(buf, want, n) != 0)
      mismatch = 1;
    got += n;
  }
  CHECK_EQ_INT(got, total);
  CHECK_EQ_INT(mismatch, 0);
  CHECK(echo_once(c.fd, "resumed"));
  CHECK_EQ_INT(rd_api_server_connections(g_srv, &conns), RD_OK);
  if (conns.count == 1) {
    CHECK(!conns.items[0].paused);
    CHECK_EQ_INT(conns.items[0].buffered, 0);
  }
  rd_conn_list_free(&conns);
  tconn_close(&c);
  check_settled();
  CHECK_EQ_INT(rd_engine_counts_get().buffered_bytes, 0);
}

RD_ENGINE_TEST_MAIN(T(test_dial_echo), T(test_far_side_closes), T(test_dial_refused),
                    T(test_dial_unknown_key), T(test_abrupt_closes), T(test_idle_timeout),
                    T(test_concurrent_dials), T(test_bulk_64mib), T(test_backpressure))
