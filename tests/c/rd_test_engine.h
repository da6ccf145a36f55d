/* Set-up shared by the end-to-end tests of the engine through its
 * thread-safe API (rd_api.h): test_server.c, test_client.c, test_tunnel.c
 * and test_proxy.c. A server and an agent in one process talk over
 * loopback, with targets of the test's own (an echo server and a tiny HTTP
 * server, each a thread with a poll loop over plain POSIX sockets).
 *
 * The engine is a process-wide singleton that cannot restart once shut
 * down, so every case runs in a child process of its own, forked from a
 * parent that never starts it (RD_ENGINE_TEST_MAIN): a case starts the
 * targets, server and agent it needs with the start_* helpers below, and
 * after it the child shuts the engine down and checks that every engine
 * allocation was returned; LeakSanitizer checks the child at exit. No case
 * depends on another, and any one can run alone.
 *
 * Synchronisation is by bounded polling: a condition is re-checked every few
 * milliseconds until it holds or a generous deadline passes.
 *
 * Everything here is static and included by several programs, so functions
 * are static inline (no warning for the ones a program does not use). */
#ifndef RD_TEST_ENGINE_H
#define RD_TEST_ENGINE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_api.h"
#include "rd_loop.h"
#include "rd_test.h"
#include "rd_test_io.h"

/* Our own writes use MSG_NOSIGNAL; this keeps the main run alive whatever
 * the engine does (test_sigpipe_default checks the engine on its own). */
__attribute__((constructor)) static void ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

#define WAIT_MS 5000 /* the bound of every wait for something the engine does */
#define DIAL_WAIT_MS 10000 /* a dial's wait for room on a full session */
/* A case's whole run in its child, set-up and shutdown included: well past
 * the sum of the waits the slowest case can make in a row. */
#define CASE_SECONDS (12 * WAIT_MS / 1000)

/* ---- time and blocking-socket helpers ---- */

/* The poll interval inside deadline loops. */
static inline void nap(void) {
  struct timespec ts = {0, 5 * 1000000L};
  nanosleep(&ts, NULL);
}

/* Polls get() until it returns want or WAIT_MS passes; 1 if it did. */
static inline int wait_value(int64_t (*get)(void), int64_t want, const char *what) {
  uint64_t deadline = now_ms() + WAIT_MS;
  int64_t got;
  while ((got = get()) != want) {
    if (now_ms() >= deadline) {
      fprintf(stderr, "  %s %lld, want %lld\n", what, (long long)got, (long long)want);
      return 0;
    }
    nap();
  }
  return 1;
}

/* Reads until EOF into buf (NUL-terminated, excess dropped). Returns the
 * byte count, or -1 on timeout; *err gets the errno of a failed read. */
static inline ssize_t read_to_eof(int fd, char *buf, size_t cap, uint64_t timeout_ms, int *err) {
  uint64_t deadline = now_ms() + timeout_ms;
  size_t got = 0;
  char scratch[4096];
  *err = 0;
  for (;;) {
    if (!wait_fd(fd, POLLIN, deadline)) {
      buf[got < cap ? got : cap - 1] = '\0';
      return -1;
    }
    ssize_t r = recv(fd, scratch, sizeof scratch, MSG_DONTWAIT);
    if (r > 0) {
      size_t room = cap - 1 - got;
      size_t take = (size_t)r < room ? (size_t)r : room;
      memcpy(buf + got, scratch, take);
      got += take;
      continue;
    }
    if (r < 0 && (errno == EINTR || errno == EAGAIN))
      continue;
    if (r < 0)
      *err = errno;
    buf[got] = '\0';
    return (ssize_t)got;
  }
}

/* 1 when fd reads a clean EOF (no data, no error) within WAIT_MS. */
static inline int reads_eof(int fd) {
  char buf[64];
  int err;
  ssize_t n = read_to_eof(fd, buf, sizeof buf, WAIT_MS, &err);
  if (n != 0 || err != 0)
    fprintf(stderr, "  expected EOF on fd %d: read %zd bytes, errno %d (%s)\n", fd, n, err,
            err ? strerror(err) : "-");
  return n == 0 && err == 0;
}

static inline struct sockaddr_in loopback_addr(int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

/* A socket listening on a free loopback port (flags: extra socket type
 * flags); -1 on failure. */
static inline int listen_loopback(int flags, int backlog, int *port) {
  struct sockaddr_in a = loopback_addr(0);
  socklen_t len = sizeof a;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
  if (fd < 0)
    return -1;
  if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, backlog) != 0 ||
      getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
    close(fd);
    return -1;
  }
  *port = ntohs(a.sin_port);
  return fd;
}

/* A loopback connection; rcvbuf > 0 fixes the receive buffer (set before
 * connecting, so the window never autotunes past it). */
static inline int tcp_connect_rcvbuf(int port, int rcvbuf) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0 && rcvbuf > 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  struct sockaddr_in a = loopback_addr(port);
  if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static inline int tcp_connect(int port) { return tcp_connect_rcvbuf(port, 0); }

/* A listener that never accepts, its queue filled: a connect to it gets no
 * answer, so an agent's local dial there stays in progress. */
typedef struct {
  int lfd;
  int fill[8];
  int nfill;
  int port;
} black_hole;

static inline int black_hole_open(black_hole *b) {
  memset(b, 0, sizeof *b);
  b->lfd = listen_loopback(0, 0, &b->port);
  if (b->lfd < 0)
    return -1;
  struct sockaddr_in a = loopback_addr(b->port);
  /* Connect until one connect is left hanging: the queue is then full. */
  while (b->nfill < (int)RD_ARRAY_SIZE(b->fill)) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    b->fill[b->nfill++] = fd;
    if (fd < 0 || (connect(fd, (struct sockaddr *)&a, sizeof a) != 0 && errno != EINPROGRESS))
      return -1;
    if (!wait_fd(fd, POLLOUT, now_ms() + 100))
      return 0;
  }
  return -1;
}

static inline void black_hole_close(black_hole *b) {
  for (int i = 0; i < b->nfill; i++)
    if (b->fill[i] >= 0)
      close(b->fill[i]);
  if (b->lfd >= 0)
    close(b->lfd);
}

/* ---- the targets: an echo server and an HTTP/1.1 server in one poll loop ---- */

enum { TS_ECHO, TS_HTTP };
#define TS_BUF (64 * 1024)
#define TS_HEAD 4096 /* HTTP: request head room; the response goes after it */

typedef struct {
  int fd;
  char *buf;
  size_t in_len;            /* HTTP: request bytes so far */
  size_t out_off, out_len;  /* bytes at out[out_off..out_len) still to send */
  char *out;
  char *big;                /* HTTP: a large response's own buffer */
  int close_after;          /* HTTP: close once the response is out */
} ts_conn;

typedef struct {
  int mode;
  int lfd, port;
  int wake[2];
  pthread_t thread;
  int running;
  pthread_mutex_t lock;
  char last_head[TS_HEAD]; /* HTTP: the last request head received */
} tserver;

/* The body of GET /big/N: N bytes of a pattern the reader can check. */
static inline char big_byte(size_t i) { return (char)('a' + (i * 7 + i / 4096) % 26); }

/* HTTP: answers "hello from PATH" (and " body=BODY" when the request has
 * one) once the request is complete; GET /big/N answers N pattern bytes. */
static inline void ts_http_answer(tserver *ts, ts_conn *c) {
  char *end = memmem(c->buf, c->in_len, "\r\n\r\n", 4);
  if (end == NULL)
    return;
  size_t head_len = (size_t)(end - c->buf) + 4, body_len = 0;
  *end = '\0';
  const char *cl = strcasestr(c->buf, "\r\nContent-Length:");
  if (cl != NULL)
    body_len = strtoul(cl + 17, NULL, 10);
  if (c->in_len < head_len + body_len) {
    *end = '\r';
    return;
  }
  pthread_mutex_lock(&ts->lock);
  snprintf(ts->last_head, sizeof ts->last_head, "%s", c->buf);
  pthread_mutex_unlock(&ts->lock);
  char path[512] = "?";
  const char *sp = strchr(c->buf, ' ');
  if (sp != NULL) {
    const char *sp2 = strchr(sp + 1, ' ');
    size_t len = sp2 != NULL ? (size_t)(sp2 - sp - 1) : 0;
    if (len < sizeof path) {
      memcpy(path, sp + 1, len);
      path[len] = '\0';
    }
  }
  if (strncmp(path, "/big/", 5) == 0) {
    size_t n = strtoul(path + 5, NULL, 10);
    c->big = malloc(n + 256);
    if (c->big == NULL)
      abort();
    int h = snprintf(c->big, 256,
                     "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", n);
    for (size_t i = 0; i < n; i++)
      c->big[h + i] = big_byte(i);
    c->out = c->big;
    c->out_off = 0;
    c->out_len = (size_t)h + n;
    c->close_after = 1;
    return;
  }
  char body[1200];
  int blen = snprintf(body, sizeof body, "hello from %s", path);
  if (body_len > 0)
    blen += snprintf(body + blen, sizeof body - (size_t)blen, " body=%.*s", (int)body_len,
                     c->buf + head_len);
  c->out = c->buf + TS_HEAD;
  c->out_off = 0;
  c->out_len = (size_t)snprintf(c->out, TS_BUF - TS_HEAD,
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                                blen, body);
  c->close_after = 1;
}

/* Serves one ready connection; returns -1 when it should be closed. */
static inline int ts_service(tserver *ts, ts_conn *c, short revents) {
  if (c->out_off < c->out_len) {
    if (!(revents & (POLLOUT | POLLERR | POLLHUP)))
      return 0;
    ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
    if (w < 0)
      return errno == EAGAIN || errno == EINTR ? 0 : -1;
    c->out_off += (size_t)w;
    if (c->out_off < c->out_len)
      return 0;
    c->out_off = c->out_len = 0;
    return c->close_after ? -1 : 0;
  }
  if (!(revents & (POLLIN | POLLERR | POLLHUP)))
    return 0;
  if (ts->mode == TS_ECHO) {
    ssize_t r = recv(c->fd, c->buf, TS_BUF, 0);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
      return -1;
    if (r < 0)
      return 0;
    c->out = c->buf;
    c->out_off = 0;
    c->out_len = (size_t)r;
    /* Most writes complete at once; the rest wait for POLLOUT. */
    return ts_service(ts, c, POLLOUT);
  }
  ssize_t r = recv(c->fd, c->buf + c->in_len, TS_HEAD - 1 - c->in_len, 0);
  if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
    return -1;
  if (r < 0)
    return 0;
  c->in_len += (size_t)r;
  ts_http_answer(ts, c);
  if (c->out_len == 0 && c->in_len == TS_HEAD - 1)
    return -1; /* a head that does not fit: not ours */
  return c->out_len ? ts_service(ts, c, POLLOUT) : 0;
}

static inline void *ts_main(void *arg) {
  tserver *ts = arg;
  ts_conn *conns = NULL;
  struct pollfd *pfds = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (n + 2 > cap) {
      cap = (n + 2) * 2;
      conns = realloc(conns, cap * sizeof *conns);
      pfds = realloc(pfds, cap * sizeof *pfds);
      if (conns == NULL || pfds == NULL)
        abort();
    }
    pfds[0] = (struct pollfd){ts->wake[0], POLLIN, 0};
    pfds[1] = (struct pollfd){ts->lfd, POLLIN, 0};
    for (size_t i = 0; i < n; i++)
      pfds[2 + i] = (struct pollfd){conns[i].fd,
                                    conns[i].out_off < conns[i].out_len ? POLLOUT : POLLIN, 0};
    if (poll(pfds, n + 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      break;
    }
    if (pfds[0].revents)
      break;
    size_t keep = 0;
    for (size_t i = 0; i < n; i++) {
      if (pfds[2 + i].revents && ts_service(ts, &conns[i], pfds[2 + i].revents) < 0) {
        close(conns[i].fd);
        free(conns[i].buf);
        free(conns[i].big);
        continue;
      }
      conns[keep++] = conns[i];
    }
    n = keep;
    if (pfds[1].revents & POLLIN) {
      int fd;
      while (n + 2 <= cap &&
             (fd = accept4(ts->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[n] = (ts_conn){.fd = fd, .buf = malloc(TS_BUF)};
        if (conns[n].buf == NULL)
          abort();
        n++;
      }
    }
  }
  for (size_t i = 0; i < n; i++) {
    close(conns[i].fd);
    free(conns[i].buf);
    free(conns[i].big);
  }
  free(conns);
  free(pfds);
  return NULL;
}

static inline int ts_start(tserver *ts, int mode) {
  memset(ts, 0, sizeof *ts);
  ts->mode = mode;
  pthread_mutex_init(&ts->lock, NULL);
  ts->lfd = listen_loopback(SOCK_NONBLOCK, 1024, &ts->port);
  if (ts->lfd < 0 || pipe2(ts->wake, O_CLOEXEC) != 0)
    return -1;
  if (pthread_create(&ts->thread, NULL, ts_main, ts) != 0)
    return -1;
  ts->running = 1;
  return 0;
}

static inline void ts_stop(tserver *ts) {
  if (!ts->running)
    return;
  ssize_t w = write(ts->wake[1], "x", 1);
  (void)w;
  pthread_join(ts->thread, NULL);
  close(ts->wake[0]);
  close(ts->wake[1]);
  close(ts->lfd);
  pthread_mutex_destroy(&ts->lock);
  ts->running = 0;
}

/* ---- engine helpers ---- */

/* The case's own server (g_srv on g_port; agents dial g_url), agent
 * (agent-1, g_cli) and targets, set by the start_* helpers the case calls.
 * Each case runs in a fresh process, so they start empty. */
static uint64_t g_srv, g_cli;
static int g_port;
static char g_url[64];
static tserver g_echo, g_http;
static char g_echo_addr[32], g_http_addr[32];
static black_hole g_hole;
static int g_hole_opened;
static char g_hole_addr[32];

static inline void client_config(rd_client_config *cfg) {
  rd_client_config_default(cfg);
  /* Retry fast so a restarted server is found again within the test's time. */
  cfg->backoff_min_ms = 50;
  cfg->backoff_max_ms = 400;
  /* Pings and SYNC_CONNECTIONS every few ticks, so both run throughout the
   * tests, next to dials, closes and bulk transfers. */
  cfg->session.ping_interval_ms = 50;
  cfg->session.sync_interval_ms = 50;
}

static inline int server_new(int port, const rd_server_config *cfg, uint64_t *handle,
                             int *port_out) {
  char err[256] = "";
  int rc = rd_api_server_new("127.0.0.1", port, cfg, handle, port_out, err, sizeof err);
  if (rc != RD_OK)
    fprintf(stderr, "  server_new(port %d): %d %s\n", port, rc, err);
  return rc;
}

static inline int start_server_timeout(int port, uint64_t *handle, int *port_out,
                                       uint64_t handshake_timeout_ms) {
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  if (handshake_timeout_ms)
    cfg.handshake_timeout_ms = handshake_timeout_ms;
  return server_new(port, &cfg, handle, port_out);
}

static inline int start_server(int port, uint64_t *handle, int *port_out) {
  return start_server_timeout(port, handle, port_out, 0);
}

/* A server of a test's own on a free port; url gets where agents connect. */
static inline int start_own_server(const rd_server_config *cfg, uint64_t *handle, char *url,
                                   size_t urllen) {
  int port = 0;
  int rc = server_new(0, cfg, handle, &port);
  snprintf(url, urllen, "ws://127.0.0.1:%d/connect", port);
  return rc;
}

static inline int start_client_at(const char *url, const char *key, const rd_client_config *cfg,
                                  uint64_t *handle) {
  char headers[128], err[256] = "";
  snprintf(headers, sizeof headers, "X-Tunnel-ID: %s\r\n", key);
  int rc = rd_api_client_new(url, headers, cfg, handle, err, sizeof err);
  if (rc != RD_OK)
    fprintf(stderr, "  client_new: %d %s\n", rc, err);
  return rc;
}

static inline int start_client_cfg(const char *key, const rd_client_config *cfg, uint64_t *handle) {
  return start_client_at(g_url, key, cfg, handle);
}

static inline int start_client(const char *key, uint64_t *handle) {
  rd_client_config cfg;
  client_config(&cfg);
  return start_client_cfg(key, &cfg, handle);
}

/* Waits for cli to connect; returns whether it did (the wait itself must
 * succeed). */
static inline int wait_connected(uint64_t cli) {
  int connected = 0;
  CHECK_EQ_INT(rd_api_client_wait_connected(cli, WAIT_MS, &connected), RD_OK);
  return connected;
}

/* Starts the case's server (g_srv on g_port; clients dial g_url) and agent-1
 * on it (g_cli); returns whether the agent connected. */
static inline int start_server_and_agent(void) {
  CHECK_EQ_INT(start_server(0, &g_srv, &g_port), RD_OK);
  CHECK(g_port > 0);
  snprintf(g_url, sizeof g_url, "ws://127.0.0.1:%d/connect", g_port);
  CHECK_EQ_INT(start_client("agent-1", &g_cli), RD_OK);
  return wait_connected(g_cli);
}

/* A connection dialed through the server. */
typedef struct {
  int fd;
  int64_t id;
  rd_dial_status *st;
} tconn;

static inline int dial(uint64_t srv, const char *key, const char *addr, tconn *c) {
  char err[256] = "";
  int rc = rd_api_server_dial(srv, key, "tcp", addr, DIAL_WAIT_MS, 0, &c->fd, &c->id, &c->st, err, sizeof err);
  if (rc != RD_OK) {
    fprintf(stderr, "  dial %s %s: %d %s\n", key, addr, rc, err);
    c->fd = -1;
    c->st = NULL;
  }
  return rc;
}

static inline void tconn_close(tconn *c) {
  if (c->fd >= 0)
    close(c->fd);
  rd_dial_status_unref(c->st);
  c->fd = -1;
  c->st = NULL;
}

/* Sends msg and expects it back. */
static inline int echo_once(int fd, const char *msg) {
  size_t len = strlen(msg);
  char buf[256];
  if (len >= sizeof buf || write_all(fd, msg, len, WAIT_MS) != 0)
    return 0;
  size_t got = read_n(fd, buf, len, WAIT_MS);
  buf[got] = '\0';
  if (got != len || memcmp(buf, msg, len) != 0) {
    fprintf(stderr, "  echo: sent \"%s\", got \"%s\"\n", msg, buf);
    return 0;
  }
  return 1;
}

/* Dials addr through the case's server's agent-1, which must succeed; 1
 * when c got a socket. */
static inline int dial_agent1(const char *addr, tconn *c) {
  CHECK_EQ_INT(dial(g_srv, "agent-1", addr, c), RD_OK);
  return c->fd >= 0;
}

/* Dials the echo server through srv's session for key, checks one echo and
 * closes. A failed dial is reported by dial() and left to later checks. */
static inline void echo_through(uint64_t srv, const char *key, const char *msg) {
  tconn c;
  if (dial(srv, key, g_echo_addr, &c) == RD_OK) {
    CHECK(echo_once(c.fd, msg));
    tconn_close(&c);
  }
}

static inline int find_sample(const rd_sample_list *l, const char *family, const rd_sample *like) {
  for (size_t i = 0; i < l->count; i++) {
    const rd_sample *s = &l->items[i];
    if (strcmp(s->family->name, family) != 0)
      continue;
    size_t j = 0;
    while (j < s->family->num_labels && strcmp(s->values[j], like->values[j]) == 0)
      j++;
    if (j == s->family->num_labels)
      return (int)i;
  }
  return -1;
}

/* A sample's value by family name and label values (in the family's label
 * order); 0 when absent, -1 when the registry cannot be read. */
static inline double sample_value(uint64_t h, const char *family, const char *v0, const char *v1,
                                  const char *v2) {
  rd_sample_list l;
  if (rd_api_metrics(h, &l) != RD_OK)
    return -1;
  rd_sample like = {.values = {(char *)v0, (char *)v1, (char *)v2}};
  int i = find_sample(&l, family, &like);
  double v = i >= 0 ? l.items[i].value : 0;
  rd_sample_list_free(&l);
  return v;
}

/* The per-key counters the tests read most (Go's metric names). */
static inline double conns_added(uint64_t h, const char *key, const char *addr) {
  return sample_value(h, "session_server_total_add_connections", key, "tcp", addr);
}

static inline double conns_removed(uint64_t h, const char *key, const char *addr) {
  return sample_value(h, "session_server_total_remove_connections", key, "tcp", addr);
}

static inline double sessions_added(uint64_t h, const char *key) {
  return sample_value(h, "session_server_total_add_websocket_session", key, "false", NULL);
}

static inline double sessions_removed(uint64_t h, const char *key) {
  return sample_value(h, "session_server_total_remove_websocket_session", key, "false", NULL);
}

/* 1 when every label set of add_connections has a remove_connections
 * sample of the same value and the other way round, and the open gauge is 0
 * everywhere. Writes the first mismatch into why. */
static inline int conns_balanced(uint64_t h, char *why, size_t whylen) {
  static const char add[] = "session_server_total_add_connections";
  static const char rem[] = "session_server_total_remove_connections";
  rd_sample_list l;
  int rc = rd_api_metrics(h, &l);
  if (rc != RD_OK) {
    snprintf(why, whylen, "metrics: %d", rc);
    return 0;
  }
  int ok = 1;
  for (size_t i = 0; ok && i < l.count; i++) {
    const rd_sample *s = &l.items[i];
    const char *name = s->family->name;
    if (strcmp(name, add) == 0 || strcmp(name, rem) == 0) {
      int j = find_sample(&l, strcmp(name, add) == 0 ? rem : add, s);
      double other = j >= 0 ? l.items[j].value : 0;
      if (other != s->value) {
        snprintf(why, whylen, "%s{%s,%s,%s} = %g, other side %g", name, s->values[0],
                 s->values[1], s->values[2], s->value, other);
        ok = 0;
      }
    } else if (strcmp(name, "remotedialer_open_connections") == 0 && s->value != 0) {
      snprintf(why, whylen, "%s{%s} = %g", name, s->values[0], s->value);
      ok = 0;
    }
  }
  rd_sample_list_free(&l);
  return ok;
}

/* Waits until the registry of h balances; reports the mismatch if not. */
static inline int wait_balanced(uint64_t h, const char *what) {
  char why[512] = "";
  uint64_t deadline = now_ms() + WAIT_MS;
  for (;;) {
    if (conns_balanced(h, why, sizeof why))
      return 1;
    if (now_ms() >= deadline)
      break;
    nap();
  }
  fprintf(stderr, "  %s: connection counters do not balance: %s\n", what, why);
  char *text;
  size_t len;
  if (rd_api_prometheus(h, &text, &len) == RD_OK) {
    fprintf(stderr, "%s", text);
    rd_free(text);
  }
  return 0;
}

static inline int64_t open_conns(void) { return rd_engine_counts_get().open_connections; }

/* Waits until the engine counts n open connections (both sides). */
static inline int wait_open_conns(int64_t n) {
  return wait_value(open_conns, n, "open_connections");
}

static inline int wait_no_open_conns(void) { return wait_open_conns(0); }

/* The case's server and agent: their connection counters balance and no
 * connection is left open, as after every test that dials. */
static inline void check_settled(void) {
  CHECK(wait_balanced(g_srv, "server"));
  CHECK(wait_balanced(g_cli, "client"));
  CHECK(wait_no_open_conns());
}

static inline int wait_status_ended(rd_dial_status *st) {
  uint64_t deadline = now_ms() + WAIT_MS;
  while (!atomic_load(&st->ended)) {
    if (now_ms() >= deadline)
      return 0;
    nap();
  }
  return 1;
}

/* c's connection ends from the far side: its fd reads EOF and its status
 * ends with error. Closes c. */
static inline void check_conn_ends(tconn *c, const char *error) {
  CHECK(reads_eof(c->fd));
  CHECK(wait_status_ended(c->st));
  CHECK_STR(c->st->error, error);
  tconn_close(c);
}

/* The server's client keys, joined with ",". */
static inline void server_clients(uint64_t srv, char *out, size_t outlen) {
  rd_string_list l;
  out[0] = '\0';
  if (rd_api_server_clients(srv, &l) != RD_OK) {
    snprintf(out, outlen, "(error)");
    return;
  }
  size_t used = 0;
  for (size_t i = 0; i < l.count; i++)
    used += (size_t)snprintf(out + used, outlen - used, "%s%s", i ? "," : "", l.items[i]);
  rd_string_list_free(&l);
}

/* Waits until the server's client list reads `want`. */
static inline int wait_clients(uint64_t srv, const char *want) {
  char got[256];
  uint64_t deadline = now_ms() + WAIT_MS;
  for (;;) {
    server_clients(srv, got, sizeof got);
    if (strcmp(got, want) == 0)
      return 1;
    if (now_ms() >= deadline)
      break;
    nap();
  }
  fprintf(stderr, "  clients: got \"%s\", want \"%s\"\n", got, want);
  return 0;
}

static inline int64_t loop_handles(void) {
  rd_stats st;
  return rd_api_stats(&st) == RD_OK ? st.loop_handles : -1;
}

/* Waits until the loop holds `want` handles again (what a test opened on
 * the engine's side has closed). */
static inline int wait_loop_handles(int64_t want) {
  return wait_value(loop_handles, want, "loop handles");
}

/* A thread blocked in rd_api_client_wait_connected. */
typedef struct {
  uint64_t cli;
  int rc, connected;
  _Atomic int done;
  pthread_t thread;
} waiter_job;

static inline void *waiter_main(void *arg) {
  waiter_job *w = arg;
  w->rc = rd_api_client_wait_connected(w->cli, 60000, &w->connected);
  atomic_store(&w->done, 1);
  return NULL;
}

static inline void waiter_start(waiter_job *w, uint64_t cli) {
  *w = (waiter_job){.cli = cli, .rc = -1, .connected = -1};
  CHECK_EQ_INT(pthread_create(&w->thread, NULL, waiter_main, w), 0);
}

/* The waiter returns within WAIT_MS, not connected. */
static inline void waiter_check_released(waiter_job *w) {
  uint64_t deadline = now_ms() + WAIT_MS;
  while (!atomic_load(&w->done) && now_ms() < deadline)
    nap();
  CHECK(atomic_load(&w->done));
  if (atomic_load(&w->done)) {
    pthread_join(w->thread, NULL);
    CHECK_EQ_INT(w->connected, 0);
  }
}

/* After a shutdown: no session, connection or buffered byte is left. */
static inline void check_engine_empty(void) {
  rd_engine_counts counts = rd_engine_counts_get();
  CHECK_EQ_INT(counts.open_sessions, 0);
  CHECK_EQ_INT(counts.open_connections, 0);
  CHECK_EQ_INT(counts.buffered_bytes, 0);
}

/* ---- requests to the server's own port ---- */

/* Sends req to the server's port and reads the whole response. */
static inline ssize_t http_exchange(const char *req, char *resp, size_t cap) {
  int fd = tcp_connect(g_port);
  if (fd < 0)
    return -1;
  int e = 0;
  ssize_t n = -1;
  if (write_all(fd, req, strlen(req), WAIT_MS) == 0)
    n = read_to_eof(fd, resp, cap, WAIT_MS, &e);
  close(fd);
  if (n < 0 || e != 0)
    fprintf(stderr, "  http: n=%zd errno=%d response so far: \"%s\"\n", n, e, resp);
  return e != 0 ? -1 : n;
}

static inline const char *http_body(const char *resp) {
  const char *p = strstr(resp, "\r\n\r\n");
  return p != NULL ? p + 4 : "";
}

/* ---- the engine's heap ---- */

/* The engine's heap without its idle pools (blocks, write requests). */
static inline int64_t heap_in_use(void) {
  rd_api_trim();
  return rd_alloc_bytes();
}

/* Waits until the heap in use is back to `want` (keepalives allocate and
 * free small blocks meanwhile). */
static inline int wait_heap(int64_t want) { return wait_value(heap_in_use, want, "heap in use"); }

/* ---- connections left open while their session goes away ---- */

/* Connections to leave open while a session goes away: three idle ones
 * (echo checked), one with bytes in flight, one whose local dial on the
 * agent's side is still in progress. */
typedef struct {
  tconn idle[3];
  tconn busy;
  tconn pending;
} open_set;

static inline void open_set_dial(open_set *o, uint64_t srv, const char *key) {
  static char junk[1 << 20];
  for (int i = 0; i < 3; i++) {
    CHECK_EQ_INT(dial(srv, key, g_echo_addr, &o->idle[i]), RD_OK);
    if (o->idle[i].fd >= 0)
      CHECK(echo_once(o->idle[i].fd, "idle connection"));
  }
  CHECK_EQ_INT(dial(srv, key, g_echo_addr, &o->busy), RD_OK);
  if (o->busy.fd >= 0)
    CHECK_EQ_INT(write_all(o->busy.fd, junk, sizeof junk, WAIT_MS), 0);
  CHECK_EQ_INT(dial(srv, key, g_hole_addr, &o->pending), RD_OK);
}

/* Each of the set's connections ends with "tunnel disconnect" and its fd
 * reads to the end without hanging (the busy one may have echoed bytes
 * waiting, and may be reset since the engine's end had unread input). */
static inline void open_set_check_ended(open_set *o) {
  tconn *all[5] = {&o->idle[0], &o->idle[1], &o->idle[2], &o->busy, &o->pending};
  for (int i = 0; i < 5; i++) {
    tconn *c = all[i];
    if (c->fd < 0)
      continue;
    if (c == &o->busy) {
      static char sink[4 << 20];
      int e = 0;
      CHECK(read_to_eof(c->fd, sink, sizeof sink, WAIT_MS, &e) >= 0);
      CHECK(e == 0 || e == ECONNRESET);
    } else {
      CHECK(reads_eof(c->fd));
    }
    CHECK(wait_status_ended(c->st));
    CHECK_STR(c->st->error, "tunnel disconnect");
    tconn_close(c);
  }
}

/* ---- a case's own targets, server and agent ---- */

/* Starts the echo target (g_echo, dialed at g_echo_addr). */
static inline void start_echo(void) {
  CHECK_EQ_INT(ts_start(&g_echo, TS_ECHO), 0);
  snprintf(g_echo_addr, sizeof g_echo_addr, "127.0.0.1:%d", g_echo.port);
}

/* Starts the HTTP target (g_http, dialed at g_http_addr). */
static inline void start_http(void) {
  CHECK_EQ_INT(ts_start(&g_http, TS_HTTP), 0);
  snprintf(g_http_addr, sizeof g_http_addr, "127.0.0.1:%d", g_http.port);
}

/* Opens the black hole (g_hole at g_hole_addr): a local dial there stays in
 * progress. */
static inline void start_hole(void) {
  CHECK_EQ_INT(black_hole_open(&g_hole), 0);
  g_hole_opened = 1;
  snprintf(g_hole_addr, sizeof g_hole_addr, "127.0.0.1:%d", g_hole.port);
}

/* ---- the end of every case ---- */

/* Runs in each case's child after its body: shuts the engine down (whatever
 * the case left open, and a second shutdown is harmless), checks that no
 * session, connection, buffered byte or engine allocation is left, then
 * stops the targets the case started. */
static inline void end_case(void) {
  rd_engine_shutdown();
  check_engine_empty();
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  CHECK_EQ_INT(rd_alloc_objects(), 0);
  ts_stop(&g_echo);
  ts_stop(&g_http);
  if (g_hole_opened)
    black_hole_close(&g_hole);
  g_hole_opened = 0;
}

/* main() for a program of engine cases, each in a process of its own. */
#define RD_ENGINE_TEST_MAIN(...) RD_TEST_MAIN_ISOLATED(CASE_SECONDS, end_case, __VA_ARGS__)

#endif
