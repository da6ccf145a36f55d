/* End-to-end tests of the engine through its thread-safe API (rd_api.h): a
 * server and an agent in one process talking over loopback, with targets of
 * the test's own (an echo server and a tiny HTTP server, each a thread with
 * a poll loop over plain POSIX sockets). The engine is a process-wide
 * singleton, so the tests share it and run in order; the last one shuts it
 * down and checks that every engine allocation was returned. The first two
 * run in forked children, before the parent's engine starts: a shutdown
 * with everything still open must free everything too, and a process that
 * keeps SIGPIPE's default must not be killed by the engine's writes.
 *
 * Synchronisation is by bounded polling: a condition is re-checked every few
 * milliseconds until it holds or a generous deadline passes. */
#define _GNU_SOURCE
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

#define CHILD_SECONDS (4 * WAIT_MS / 1000) /* a test body in a child process */
#define WAIT_MS 5000 /* the bound of every wait for something the engine does */
#define DIAL_WAIT_MS 10000 /* a dial's wait for room on a full session */

/* ---- time and blocking-socket helpers ---- */

/* The poll interval inside deadline loops. */
static void nap(void) {
  struct timespec ts = {0, 5 * 1000000L};
  nanosleep(&ts, NULL);
}

/* Polls get() until it returns want or WAIT_MS passes; 1 if it did. */
static int wait_value(int64_t (*get)(void), int64_t want, const char *what) {
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
static ssize_t read_to_eof(int fd, char *buf, size_t cap, uint64_t timeout_ms, int *err) {
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
static int reads_eof(int fd) {
  char buf[64];
  int err;
  ssize_t n = read_to_eof(fd, buf, sizeof buf, WAIT_MS, &err);
  if (n != 0 || err != 0)
    fprintf(stderr, "  expected EOF on fd %d: read %zd bytes, errno %d (%s)\n", fd, n, err,
            err ? strerror(err) : "-");
  return n == 0 && err == 0;
}

static struct sockaddr_in loopback_addr(int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

/* A socket listening on a free loopback port (flags: extra socket type
 * flags); -1 on failure. */
static int listen_loopback(int flags, int backlog, int *port) {
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
static int tcp_connect_rcvbuf(int port, int rcvbuf) {
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

static int tcp_connect(int port) { return tcp_connect_rcvbuf(port, 0); }

/* A listener that never accepts, its queue filled: a connect to it gets no
 * answer, so an agent's local dial there stays in progress. */
typedef struct {
  int lfd;
  int fill[8];
  int nfill;
  int port;
} black_hole;

static int black_hole_open(black_hole *b) {
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

static void black_hole_close(black_hole *b) {
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
static char big_byte(size_t i) { return (char)('a' + (i * 7 + i / 4096) % 26); }

/* HTTP: answers "hello from PATH" (and " body=BODY" when the request has
 * one) once the request is complete; GET /big/N answers N pattern bytes. */
static void ts_http_answer(tserver *ts, ts_conn *c) {
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
static int ts_service(tserver *ts, ts_conn *c, short revents) {
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

static void *ts_main(void *arg) {
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

static int ts_start(tserver *ts, int mode) {
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

static void ts_stop(tserver *ts) {
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

static uint64_t g_srv, g_cli;
static int g_port;
static char g_url[64];
static tserver g_echo, g_http;
static char g_echo_addr[32];
static black_hole g_hole;
static char g_hole_addr[32];

static void client_config(rd_client_config *cfg) {
  rd_client_config_default(cfg);
  /* Retry fast so a restarted server is found again within the test's time. */
  cfg->backoff_min_ms = 50;
  cfg->backoff_max_ms = 400;
  /* Pings and SYNC_CONNECTIONS every few ticks, so both run throughout the
   * tests, next to dials, closes and bulk transfers. */
  cfg->session.ping_interval_ms = 50;
  cfg->session.sync_interval_ms = 50;
}

static int server_new(int port, const rd_server_config *cfg, uint64_t *handle, int *port_out) {
  char err[256] = "";
  int rc = rd_api_server_new("127.0.0.1", port, cfg, handle, port_out, err, sizeof err);
  if (rc != RD_OK)
    fprintf(stderr, "  server_new(port %d): %d %s\n", port, rc, err);
  return rc;
}

static int start_server_timeout(int port, uint64_t *handle, int *port_out,
                                uint64_t handshake_timeout_ms) {
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  if (handshake_timeout_ms)
    cfg.handshake_timeout_ms = handshake_timeout_ms;
  return server_new(port, &cfg, handle, port_out);
}

static int start_server(int port, uint64_t *handle, int *port_out) {
  return start_server_timeout(port, handle, port_out, 0);
}

/* A server of a test's own on a free port; url gets where agents connect. */
static int start_own_server(const rd_server_config *cfg, uint64_t *handle, char *url,
                            size_t urllen) {
  int port = 0;
  int rc = server_new(0, cfg, handle, &port);
  snprintf(url, urllen, "ws://127.0.0.1:%d/connect", port);
  return rc;
}

static int start_client_at(const char *url, const char *key, const rd_client_config *cfg,
                           uint64_t *handle) {
  char headers[128], err[256] = "";
  snprintf(headers, sizeof headers, "X-Tunnel-ID: %s\r\n", key);
  int rc = rd_api_client_new(url, headers, cfg, handle, err, sizeof err);
  if (rc != RD_OK)
    fprintf(stderr, "  client_new: %d %s\n", rc, err);
  return rc;
}

static int start_client_cfg(const char *key, const rd_client_config *cfg, uint64_t *handle) {
  return start_client_at(g_url, key, cfg, handle);
}

static int start_client(const char *key, uint64_t *handle) {
  rd_client_config cfg;
  client_config(&cfg);
  return start_client_cfg(key, &cfg, handle);
}

/* Waits for cli to connect; returns whether it did (the wait itself must
 * succeed). */
static int wait_connected(uint64_t cli) {
  int connected = 0;
  CHECK_EQ_INT(rd_api_client_wait_connected(cli, WAIT_MS, &connected), RD_OK);
  return connected;
}

/* Starts the shared server (g_srv on g_port; clients dial g_url) and agent-1
 * on it (g_cli); returns whether the agent connected. */
static int start_server_and_agent(void) {
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

static int dial(uint64_t srv, const char *key, const char *addr, tconn *c) {
  char err[256] = "";
  int rc = rd_api_server_dial(srv, key, "tcp", addr, DIAL_WAIT_MS, 0, &c->fd, &c->id, &c->st, err, sizeof err);
  if (rc != RD_OK) {
    fprintf(stderr, "  dial %s %s: %d %s\n", key, addr, rc, err);
    c->fd = -1;
    c->st = NULL;
  }
  return rc;
}

static void tconn_close(tconn *c) {
  if (c->fd >= 0)
    close(c->fd);
  rd_dial_status_unref(c->st);
  c->fd = -1;
  c->st = NULL;
}

/* Sends msg and expects it back. */
static int echo_once(int fd, const char *msg) {
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

/* Dials addr through the shared server's agent-1, which must succeed; 1
 * when c got a socket. */
static int dial_agent1(const char *addr, tconn *c) {
  CHECK_EQ_INT(dial(g_srv, "agent-1", addr, c), RD_OK);
  return c->fd >= 0;
}

/* Dials the echo server through srv's session for key, checks one echo and
 * closes. A failed dial is reported by dial() and left to later checks. */
static void echo_through(uint64_t srv, const char *key, const char *msg) {
  tconn c;
  if (dial(srv, key, g_echo_addr, &c) == RD_OK) {
    CHECK(echo_once(c.fd, msg));
    tconn_close(&c);
  }
}

static int find_sample(const rd_sample_list *l, const char *family, const rd_sample *like) {
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
static double sample_value(uint64_t h, const char *family, const char *v0, const char *v1,
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
static double conns_added(uint64_t h, const char *key, const char *addr) {
  return sample_value(h, "session_server_total_add_connections", key, "tcp", addr);
}

static double conns_removed(uint64_t h, const char *key, const char *addr) {
  return sample_value(h, "session_server_total_remove_connections", key, "tcp", addr);
}

static double sessions_added(uint64_t h, const char *key) {
  return sample_value(h, "session_server_total_add_websocket_session", key, "false", NULL);
}

static double sessions_removed(uint64_t h, const char *key) {
  return sample_value(h, "session_server_total_remove_websocket_session", key, "false", NULL);
}

/* 1 when every label set of add_connections has a remove_connections
 * sample of the same value and the other way round, and the open gauge is 0
 * everywhere. Writes the first mismatch into why. */
static int conns_balanced(uint64_t h, char *why, size_t whylen) {
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
static int wait_balanced(uint64_t h, const char *what) {
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

static int64_t open_conns(void) { return rd_engine_counts_get().open_connections; }

/* Waits until the engine counts n open connections (both sides). */
static int wait_open_conns(int64_t n) { return wait_value(open_conns, n, "open_connections"); }

static int wait_no_open_conns(void) { return wait_open_conns(0); }

/* The shared server and agent: their connection counters balance and no
 * connection is left open, as after every test that dials. */
static void check_settled(void) {
  CHECK(wait_balanced(g_srv, "server"));
  CHECK(wait_balanced(g_cli, "client"));
  CHECK(wait_no_open_conns());
}

static int wait_status_ended(rd_dial_status *st) {
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
static void check_conn_ends(tconn *c, const char *error) {
  CHECK(reads_eof(c->fd));
  CHECK(wait_status_ended(c->st));
  CHECK_STR(c->st->error, error);
  tconn_close(c);
}

/* The server's client keys, joined with ",". */
static void server_clients(uint64_t srv, char *out, size_t outlen) {
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
static int wait_clients(uint64_t srv, const char *want) {
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

static int64_t loop_handles(void) {
  rd_stats st;
  return rd_api_stats(&st) == RD_OK ? st.loop_handles : -1;
}

/* Waits until the loop holds `want` handles again (what a test opened on
 * the engine's side has closed). */
static int wait_loop_handles(int64_t want) {
  return wait_value(loop_handles, want, "loop handles");
}

/* A thread blocked in rd_api_client_wait_connected. */
typedef struct {
  uint64_t cli;
  int rc, connected;
  _Atomic int done;
  pthread_t thread;
} waiter_job;

static void *waiter_main(void *arg) {
  waiter_job *w = arg;
  w->rc = rd_api_client_wait_connected(w->cli, 60000, &w->connected);
  atomic_store(&w->done, 1);
  return NULL;
}

static void waiter_start(waiter_job *w, uint64_t cli) {
  *w = (waiter_job){.cli = cli, .rc = -1, .connected = -1};
  CHECK_EQ_INT(pthread_create(&w->thread, NULL, waiter_main, w), 0);
}

/* The waiter returns within WAIT_MS, not connected. */
static void waiter_check_released(waiter_job *w) {
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
static void check_engine_empty(void) {
  rd_engine_counts counts = rd_engine_counts_get();
  CHECK_EQ_INT(counts.open_sessions, 0);
  CHECK_EQ_INT(counts.open_connections, 0);
  CHECK_EQ_INT(counts.buffered_bytes, 0);
}

/* ---- 0. shutdown with everything open (in a child process) ---- */

/* The child's body: a server, an agent, a forward, a connection with bytes
 * in flight, a local dial in progress, a client that cannot connect and a
 * thread waiting for it, all left for rd_engine_shutdown to end. Returns
 * the number of failed checks; LeakSanitizer runs when the child exits. */
static int shutdown_child(void) {
  int before = rd_test_failed_checks;
  tserver echo;
  CHECK_EQ_INT(ts_start(&echo, TS_ECHO), 0);
  char addr[32];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", echo.port);
  CHECK(start_server_and_agent());
  uint64_t fwd = 0;
  int fport = 0;
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "agent-1", "tcp", addr, "127.0.0.1", 0, &fwd,
                                     &fport, err, sizeof err),
               RD_OK);
  tconn c = {-1, 0, NULL};
  if (dial(g_srv, "agent-1", addr, &c) == RD_OK) {
    CHECK(echo_once(c.fd, "before shutdown"));
    /* Bytes still travelling when the engine stops. */
    static char big[256 * 1024];
    CHECK_EQ_INT(write_all(c.fd, big, sizeof big, WAIT_MS), 0);
  }
  /* A local dial the agent cannot finish. */
  black_hole hole;
  CHECK_EQ_INT(black_hole_open(&hole), 0);
  char hole_addr[32];
  snprintf(hole_addr, sizeof hole_addr, "127.0.0.1:%d", hole.port);
  tconn p = {-1, 0, NULL};
  CHECK_EQ_INT(dial(g_srv, "agent-1", hole_addr, &p), RD_OK);
  /* A client that never connects: its retry timer is pending. */
  uint64_t lost = 0;
  rd_client_config cfg;
  client_config(&cfg);
  CHECK_EQ_INT(rd_api_client_new("ws://127.0.0.1:1/connect", "X-Tunnel-ID: lost\r\n", &cfg, &lost,
                                 err, sizeof err),
               RD_OK);
  /* Someone waits for it to connect: the shutdown must release them. Give
   * the waiter's timer time to appear on the loop (if it does not, the
   * waiter meets a stopped engine instead, which must release it too). */
  int64_t handles0 = loop_handles();
  waiter_job wj;
  waiter_start(&wj, lost);
  uint64_t deadline = now_ms() + 500;
  while (loop_handles() <= handles0 && now_ms() < deadline)
    nap();
  rd_engine_shutdown();
  waiter_check_released(&wj);
  check_engine_empty();
  if (c.fd >= 0) {
    char buf[4096];
    int e;
    /* The engine's end is gone: the read ends (EOF or reset), never hangs. */
    CHECK(read_to_eof(c.fd, buf, sizeof buf, WAIT_MS, &e) >= 0);
  }
  /* The status outlives the engine: it is the caller's reference. */
  if (c.st != NULL)
    CHECK(atomic_load(&c.st->ended));
  tconn_close(&c);
  tconn_close(&p);
  black_hole_close(&hole);
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  CHECK_EQ_INT(rd_alloc_objects(), 0);
  ts_stop(&echo);
  return rd_test_failed_checks - before;
}

/* Must run first: the child needs an engine not yet started, and a parent
 * with no other thread to lose across fork. */
TEST(test_shutdown_with_open_objects) {
  run_in_child(shutdown_child, "shutdown with everything open", CHILD_SECONDS);
}

/* ---- 1. connect ---- */

TEST(test_connect) {
  CHECK_EQ_INT(ts_start(&g_echo, TS_ECHO), 0);
  CHECK_EQ_INT(ts_start(&g_http, TS_HTTP), 0);
  snprintf(g_echo_addr, sizeof g_echo_addr, "127.0.0.1:%d", g_echo.port);
  CHECK_EQ_INT(black_hole_open(&g_hole), 0);
  snprintf(g_hole_addr, sizeof g_hole_addr, "127.0.0.1:%d", g_hole.port);
  CHECK(start_server_and_agent());
  char keys[256];
  server_clients(g_srv, keys, sizeof keys);
  CHECK_STR(keys, "agent-1");
  int has = 0;
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "agent-1", &has), RD_OK);
  CHECK_EQ_INT(has, 1);
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "nope", &has), RD_OK);
  CHECK_EQ_INT(has, 0);
  char last[160] = "x";
  int connected = 0;
  CHECK_EQ_INT(rd_api_client_state(g_cli, &connected, last, sizeof last), RD_OK);
  CHECK_EQ_INT(connected, 1);
  CHECK_STR(last, "");
  CHECK_EQ_INT(sessions_added(g_srv, "agent-1"), 1);
  CHECK_EQ_INT(sessions_added(g_cli, "client"), 1);
  CHECK_EQ_INT(rd_engine_counts_get().open_sessions, 2);
}

/* ---- 1b. the server's other answers, and errors the API reports ---- */


/* Sends req to the server's port and reads the whole response. */
static ssize_t http_exchange(const char *req, char *resp, size_t cap) {
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

static const char *http_body(const char *resp) {
  const char *p = strstr(resp, "\r\n\r\n");
  return p != NULL ? p + 4 : "";
}

#define WS_HEADERS                                                                          \
  "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"             \
  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"

TEST(test_http_routes) {
  static char resp[65536];
  CHECK(http_exchange("GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 404 ", 13) == 0);
  CHECK_STR(http_body(resp), "404 page not found\n");
  /* An upgrade without the tunnel id: the Go example server's answer. */
  CHECK(http_exchange("GET /connect HTTP/1.1\r\nHost: x\r\n" WS_HEADERS "\r\n", resp,
                      sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 401 ", 13) == 0);
  CHECK_STR(http_body(resp), "failed authentication");
  CHECK(http_exchange("GET /connect HTTP/1.1\r\nHost: x\r\nX-Tunnel-ID: a\r\n\r\n", resp,
                      sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 400 ", 13) == 0);
  CHECK(http_exchange("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 200 ", 13) == 0);
  CHECK(strstr(resp, "\nsession_server_total_add_websocket_session{clientkey=\"agent-1\","
                     "peer=\"false\"} 1\n") != NULL);
  CHECK(http_exchange("\x16\x03\x01 not http\r\n\r\n", resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 400 ", 13) == 0);
  /* A head past the 16 KiB limit. */
  static char big[20000];
  int n = snprintf(big, sizeof big, "GET /metrics HTTP/1.1\r\nX-Pad: ");
  memset(big + n, 'a', sizeof big - (size_t)n - 5);
  memcpy(big + sizeof big - 5, "\r\n\r\n", 5);
  CHECK(http_exchange(big, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 431 ", 13) == 0);
  /* A client that leaves mid-head: the server lets go of it. */
  int64_t handles = loop_handles();
  int fd = tcp_connect(g_port);
  CHECK(fd >= 0);
  if (fd >= 0) {
    CHECK_EQ_INT(write_all(fd, "GET /conn", 9, WAIT_MS), 0);
    CHECK(wait_loop_handles(handles + 2)); /* its socket and head timer */
    close(fd);
  }
  CHECK(wait_loop_handles(handles));
  /* None of these became a session. */
  char keys[256];
  server_clients(g_srv, keys, sizeof keys);
  CHECK_STR(keys, "agent-1");
}

/* The engine's heap without its idle pools (blocks, write requests). */
static int64_t heap_in_use(void) {
  rd_api_trim();
  return rd_alloc_bytes();
}

/* Waits until the heap in use is back to `want` (keepalives allocate and
 * free small blocks meanwhile). */
static int wait_heap(int64_t want) { return wait_value(heap_in_use, want, "heap in use"); }

TEST(test_bad_arguments) {
  int64_t heap = heap_in_use();
  char err[256] = "", want[256];
  rd_client_config ccfg;
  client_config(&ccfg);
  uint64_t h = 7;
  CHECK_EQ_INT(rd_api_client_new("http://127.0.0.1:1/connect", "", &ccfg, &h, err, sizeof err),
               RD_EMALFORMED);
  CHECK(strncmp(err, "unsupported URL scheme", 22) == 0 &&
        strstr(err, ": http://127.0.0.1:1/connect") != NULL);
  /* The server's port is taken. */
  rd_server_config scfg;
  rd_server_config_default(&scfg);
  int port = 0;
  int rc = rd_api_server_new("127.0.0.1", g_port, &scfg, &h, &port, err, sizeof err);
  CHECK_EQ_INT(rc, UV_EADDRINUSE);
  snprintf(want, sizeof want, "listen tcp 127.0.0.1:%d: ", g_port);
  CHECK(strncmp(err, want, strlen(want)) == 0 && strstr(err, "address already in use") != NULL);
  rc = rd_api_server_forward(g_srv, "agent-1", "tcp", g_echo_addr, "127.0.0.1", g_port, &h, &port,
                             err, sizeof err);
  CHECK_EQ_INT(rc, UV_EADDRINUSE);
  CHECK(strncmp(err, want, strlen(want)) == 0);
  /* Handles that name nothing, or an object of another kind. */
  tconn x;
  CHECK_EQ_INT(rd_api_server_dial(999999, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 0, &x.fd, &x.id, &x.st,
                                  err, sizeof err),
               RD_ECLOSED);
  rd_sample_list l;
  CHECK_EQ_INT(rd_api_metrics(999999, &l), RD_ECLOSED);
  int connected = 1;
  CHECK_EQ_INT(rd_api_client_wait_connected(g_srv, 10, &connected), RD_ECLOSED);
  CHECK_EQ_INT(rd_api_close(999999), RD_OK);
  /* The failed starts gave back what they took. */
  CHECK(wait_heap(heap));
}

/* Waits until the client's last error reads `want` (a prefix). */
static int wait_last_error(uint64_t cli, const char *want) {
  char last[160] = "";
  int connected = 0;
  uint64_t deadline = now_ms() + WAIT_MS;
  for (;;) {
    if (rd_api_client_state(cli, &connected, last, sizeof last) == RD_OK &&
        strncmp(last, want, strlen(want)) == 0)
      return 1;
    if (now_ms() >= deadline)
      break;
    nap();
  }
  fprintf(stderr, "  last error \"%s\", want \"%s...\"\n", last, want);
  return 0;
}

TEST(test_client_failures) {
  int64_t heap = heap_in_use();
  rd_client_config cfg;
  client_config(&cfg);
  cfg.handshake_timeout_ms = 200;
  char err[256] = "";
  /* No tunnel id: the server answers 401 and the client keeps retrying. */
  uint64_t rejected = 0;
  CHECK_EQ_INT(rd_api_client_new(g_url, "", &cfg, &rejected, err, sizeof err), RD_OK);
  CHECK(wait_last_error(rejected, "websocket: bad handshake (HTTP 401: failed authentication)"));
  int connected = 1;
  CHECK_EQ_INT(rd_api_client_wait_connected(rejected, 50, &connected), RD_OK);
  CHECK_EQ_INT(connected, 0);
  /* A listener that never answers the handshake. */
  int mute_port = 0;
  int lfd = listen_loopback(0, 64, &mute_port);
  CHECK(lfd >= 0);
  char url[64];
  snprintf(url, sizeof url, "ws://127.0.0.1:%d/connect", mute_port);
  uint64_t mute = 0;
  CHECK_EQ_INT(rd_api_client_new(url, "X-Tunnel-ID: mute\r\n", &cfg, &mute, err, sizeof err),
               RD_OK);
  CHECK(wait_last_error(mute, "websocket: handshake timeout"));
  /* A listener whose queue is full: the dial itself times out. */
  snprintf(url, sizeof url, "ws://%s/connect", g_hole_addr);
  uint64_t lost = 0;
  CHECK_EQ_INT(rd_api_client_new(url, "X-Tunnel-ID: lost\r\n", &cfg, &lost, err, sizeof err),
               RD_OK);
  char want[96];
  snprintf(want, sizeof want, "dial tcp %s: i/o timeout", g_hole_addr);
  CHECK(wait_last_error(lost, want));
  /* Closing releases whoever waits for it to connect. */
  waiter_job wj;
  waiter_start(&wj, lost);
  /* Closed in whatever state they are in: dialing, handshaking or waiting. */
  CHECK_EQ_INT(rd_api_close(rejected), RD_OK);
  CHECK_EQ_INT(rd_api_close(mute), RD_OK);
  CHECK_EQ_INT(rd_api_close(lost), RD_OK);
  waiter_check_released(&wj);
  close(lfd);
  char keys[256];
  server_clients(g_srv, keys, sizeof keys);
  CHECK_STR(keys, "agent-1");
  CHECK(wait_heap(heap));
}

/* ---- 2. one dial, echo, close ---- */

TEST(test_dial_echo) {
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

/* ---- 2b. the far side ends cleanly: everything it sent arrives first ---- */

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
  static char resp[BIG + 4096];
  char req[256];
  snprintf(req, sizeof req, "GET /big/%u HTTP/1.1\r\nHost: x\r\n\r\n", BIG);
  char addr[32];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", g_http.port);
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
   * cannot grow to swallow the response. */
  int fd = tcp_connect_rcvbuf(g_port, 32 * 1024);
  CHECK(fd >= 0);
  if (fd >= 0) {
    snprintf(req, sizeof req, "GET /client/agent-1/http/%s/big/%u HTTP/1.1\r\nHost: x\r\n\r\n",
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

/* ---- 2c. SIGPIPE left at its default (in a child process) ---- */

/* An application that restores SIGPIPE's default (a common idiom for
 * command-line tools) must survive a peer that goes away while the engine
 * still has bytes for it: the loop thread's write must fail with EPIPE and
 * end that connection, not kill the process. The engine notices a closed
 * local end by reading it, first, unless it has stopped reading: so stop it
 * (a target that takes nothing makes the agent PAUSE us), leave bytes queued
 * toward us (the target's answer, unread), then close. */
static int sigpipe_child(void) {
  int before = rd_test_failed_checks;
  signal(SIGPIPE, SIG_DFL);
  tserver http;
  CHECK_EQ_INT(ts_start(&http, TS_HTTP), 0);
  char addr[32], req[128];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", http.port);
  tconn c;
  if (start_server_and_agent() && dial(g_srv, "agent-1", addr, &c) == RD_OK) {
    /* The target answers 16 MiB and reads nothing after the head. */
    snprintf(req, sizeof req, "GET /big/%u HTTP/1.1\r\n\r\n", 16u << 20);
    CHECK_EQ_INT(write_all(c.fd, req, strlen(req), WAIT_MS), 0);
    /* Push until the engine stops taking our bytes for 300 ms. */
    static char junk[64 * 1024];
    uint64_t deadline = now_ms() + 2 * WAIT_MS, changed = now_ms();
    size_t pushed = 0;
    int stalled = 0;
    while (!stalled && now_ms() < deadline && pushed < (256u << 20)) {
      if (wait_fd(c.fd, POLLOUT, now_ms() + 50)) {
        ssize_t n = send(c.fd, junk, sizeof junk, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
          pushed += (size_t)n;
          changed = now_ms();
        }
      }
      stalled = now_ms() - changed >= 300;
    }
    CHECK(stalled);
    close(c.fd);
    c.fd = -1;
    CHECK(wait_status_ended(c.st));
    tconn_close(&c);
    CHECK(wait_balanced(g_srv, "server"));
    CHECK(wait_balanced(g_cli, "client"));
  }
  rd_engine_shutdown();
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  ts_stop(&http);
  return rd_test_failed_checks - before;
}

TEST(test_sigpipe_default) { run_in_child(sigpipe_child, "SIGPIPE at its default", CHILD_SECONDS); }

/* ---- 3. dial to a closed port ---- */

TEST(test_dial_refused) {
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

/* ---- 4. dial an unknown client ---- */

TEST(test_dial_unknown_key) {
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

/* ---- 4b. two sessions for one key; the agent's connect patterns ---- */

TEST(test_shared_key) {
  uint64_t cli3 = 0;
  CHECK_EQ_INT(start_client("agent-1", &cli3), RD_OK);
  CHECK(wait_connected(cli3));
  /* The key is listed once; dials use the oldest session. */
  CHECK(wait_clients(g_srv, "agent-1"));
  double before = conns_added(g_cli, "client", g_echo_addr);
  echo_through(g_srv, "agent-1", "oldest session");
  CHECK_EQ_INT(conns_added(g_cli, "client", g_echo_addr), before + 1);
  CHECK_EQ_INT(conns_added(cli3, "client", g_echo_addr), 0);
  CHECK_EQ_INT(rd_api_close(cli3), RD_OK);
  /* The first session still serves the key. */
  uint64_t deadline = now_ms() + WAIT_MS;
  while (sessions_removed(g_srv, "agent-1") != 1 && now_ms() < deadline)
    nap();
  CHECK_EQ_INT(sessions_removed(g_srv, "agent-1"), 1);
  int has = 0;
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "agent-1", &has), RD_OK);
  CHECK_EQ_INT(has, 1);
  echo_through(g_srv, "agent-1", "still served");
  check_settled();
}

TEST(test_connect_patterns) {
  rd_client_config cfg;
  client_config(&cfg);
  char pattern[64];
  snprintf(pattern, sizeof pattern, "tcp/%s", g_echo_addr);
  char *patterns[1] = {pattern};
  cfg.allow_mode = RD_ALLOW_PATTERNS;
  cfg.patterns = patterns;
  cfg.npatterns = 1;
  uint64_t cli3 = 0;
  CHECK_EQ_INT(start_client_cfg("agent-3", &cfg, &cli3), RD_OK);
  CHECK(wait_connected(cli3));
  tconn c;
  echo_through(g_srv, "agent-3", "allowed");
  /* Refused: that connection alone ends, the session stays. */
  if (dial(g_srv, "agent-3", g_hole_addr, &c) == RD_OK) {
    check_conn_ends(&c, "connect not allowed");
  }
  echo_through(g_srv, "agent-3", "allowed again");
  CHECK(wait_balanced(g_srv, "server"));
  CHECK(wait_balanced(cli3, "patterned client"));
  CHECK(wait_no_open_conns());
  CHECK_EQ_INT(rd_api_close(cli3), RD_OK);
  CHECK(wait_clients(g_srv, "agent-1"));
}

/* ---- 4c. abrupt ends on either side; idle timeouts ---- */

TEST(test_abrupt_closes) {
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

/* ---- 4d. connection limits on either side ---- */

TEST(test_connection_limits) {
  rd_server_config scfg;
  rd_server_config_default(&scfg);
  scfg.session.max_connections = 2;
  /* A cap below the PAUSE mark: a reader that stops hits the cap first. */
  scfg.session.max_buffer = 1 << 20;
  scfg.session.hard_cap = 256 << 10;
  uint64_t srv2 = 0, cli4 = 0, cli5 = 0;
  char err[256] = "", url[64];
  CHECK_EQ_INT(start_own_server(&scfg, &srv2, url, sizeof url), RD_OK);
  rd_client_config ccfg;
  client_config(&ccfg);
  CHECK_EQ_INT(start_client_at(url, "agent-4", &ccfg, &cli4), RD_OK);
  ccfg.session.max_connections = 1;
  CHECK_EQ_INT(start_client_at(url, "agent-5", &ccfg, &cli5), RD_OK);
  CHECK(wait_connected(cli4));
  CHECK(wait_connected(cli5));
  /* The server's limit: the third dial fails at once. */
  tconn c[3];
  for (int i = 0; i < 2; i++) {
    CHECK_EQ_INT(dial(srv2, "agent-4", g_echo_addr, &c[i]), RD_OK);
    if (c[i].fd >= 0)
      CHECK(echo_once(c[i].fd, "within the limit"));
  }
  int rc = rd_api_server_dial(srv2, "agent-4", "tcp", g_echo_addr, DIAL_WAIT_MS, 0, &c[2].fd, &c[2].id, &c[2].st,
                              err, sizeof err);
  CHECK_EQ_INT(rc, RD_ETOOMANY);
  CHECK_STR(err, "dial through session failed: too many connections");
  CHECK_EQ_INT(c[2].fd, -1);
  CHECK(c[2].st == NULL);
  /* Room again once one has ended. */
  tconn_close(&c[0]);
  uint64_t deadline = now_ms() + WAIT_MS;
  while (sample_value(srv2, "remotedialer_open_connections", "agent-4", NULL, NULL) != 1 &&
         now_ms() < deadline)
    nap();
  if (dial(srv2, "agent-4", g_echo_addr, &c[0]) == RD_OK)
    CHECK(echo_once(c[0].fd, "room again"));
  tconn_close(&c[0]);
  tconn_close(&c[1]);
  /* The agent's limit: its second CONNECT is answered with an error. */
  if (dial(srv2, "agent-5", g_echo_addr, &c[0]) == RD_OK)
    CHECK(echo_once(c[0].fd, "agent-5"));
  if (dial(srv2, "agent-5", g_echo_addr, &c[1]) == RD_OK) {
    check_conn_ends(&c[1], "too many connections");
  }
  tconn_close(&c[0]);
  tconn_close(&c[1]);
  /* The buffer cap: a 4 MiB answer we do not read ends the connection. */
  char addr[32], req[128];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", g_http.port);
  if (dial(srv2, "agent-4", addr, &c[0]) == RD_OK) {
    snprintf(req, sizeof req, "GET /big/%u HTTP/1.1\r\n\r\n", 4u << 20);
    CHECK_EQ_INT(write_all(c[0].fd, req, strlen(req), WAIT_MS), 0);
    CHECK(wait_status_ended(c[0].st));
    CHECK_STR(c[0].st->error, "buffer limit exceeded");
    static char sink[8 << 20];
    int e = 0;
    CHECK(read_to_eof(c[0].fd, sink, sizeof sink, WAIT_MS, &e) >= 0);
    tconn_close(&c[0]);
  }
  CHECK(wait_balanced(srv2, "limited server"));
  CHECK(wait_balanced(cli4, "agent-4"));
  CHECK(wait_balanced(cli5, "agent-5"));
  CHECK(wait_no_open_conns());
  CHECK_EQ_INT(rd_api_close(cli4), RD_OK);
  CHECK_EQ_INT(rd_api_close(cli5), RD_OK);
  CHECK_EQ_INT(rd_api_close(srv2), RD_OK);
}

/* ---- 4e. the server's read deadline ---- */

TEST(test_read_deadline) {
  rd_server_config scfg;
  rd_server_config_default(&scfg);
  /* The chatty client pings every 50 ms from the same loop thread: a loaded
   * machine that keeps the loop off the CPU must not pass for its silence. */
  scfg.session.read_timeout_ms = 1000;
  uint64_t srv3 = 0, chatty = 0, silent = 0;
  char url[64];
  CHECK_EQ_INT(start_own_server(&scfg, &srv3, url, sizeof url), RD_OK);
  rd_client_config ccfg;
  client_config(&ccfg);
  CHECK_EQ_INT(start_client_at(url, "chatty", &ccfg, &chatty), RD_OK);
  /* No pings or syncs: nothing reaches the server between dials. */
  ccfg.session.ping_interval_ms = 0;
  ccfg.session.sync_interval_ms = 0;
  CHECK_EQ_INT(start_client_at(url, "silent", &ccfg, &silent), RD_OK);
  CHECK(wait_connected(chatty));
  CHECK(wait_connected(silent));
  tconn c;
  CHECK_EQ_INT(dial(srv3, "silent", g_echo_addr, &c), RD_OK);
  if (c.fd >= 0) {
    CHECK(echo_once(c.fd, "soon cut off"));
    /* Silence past the deadline ends the session and its connection. */
    check_conn_ends(&c, "tunnel disconnect");
  }
  CHECK_EQ_INT(sessions_removed(srv3, "silent") >= 1, 1);
  /* Pings kept the other one alive all along. */
  CHECK_EQ_INT(sessions_removed(srv3, "chatty"), 0);
  CHECK(wait_balanced(srv3, "deadline server"));
  CHECK(wait_balanced(silent, "silent client"));
  CHECK_EQ_INT(rd_api_close(silent), RD_OK);
  CHECK_EQ_INT(rd_api_close(chatty), RD_OK);
  CHECK_EQ_INT(rd_api_close(srv3), RD_OK);
  CHECK(wait_no_open_conns());
}

/* ---- 5. a thousand connections at once ---- */

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

/* ---- 6. 64 MiB both ways ---- */

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

/* ---- 6b. a reader that stops: PAUSE holds the engine's buffers down ---- */

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

/* ---- 7. the agent closes while connections are open ---- */

/* Connections to leave open while a session goes away: three idle ones
 * (echo checked), one with bytes in flight, one whose local dial on the
 * agent's side is still in progress. */
typedef struct {
  tconn idle[3];
  tconn busy;
  tconn pending;
} open_set;

static void open_set_dial(open_set *o, uint64_t srv, const char *key) {
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
static void open_set_check_ended(open_set *o) {
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

TEST(test_client_close_with_open_conns) {
  uint64_t cli2 = 0;
  CHECK_EQ_INT(start_client("agent-2", &cli2), RD_OK);
  CHECK(wait_connected(cli2));
  CHECK(wait_clients(g_srv, "agent-1,agent-2"));
  open_set o;
  open_set_dial(&o, g_srv, "agent-2");
  /* Five on each side: the agent has taken every CONNECT. */
  CHECK(wait_open_conns(10));
  CHECK_EQ_INT(rd_api_close(cli2), RD_OK);
  open_set_check_ended(&o);
  CHECK(wait_clients(g_srv, "agent-1"));
  int has = 1;
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "agent-2", &has), RD_OK);
  CHECK_EQ_INT(has, 0);
  CHECK(wait_balanced(g_srv, "server"));
  CHECK(wait_no_open_conns());
  CHECK_EQ_INT(conns_added(g_srv, "agent-2", g_echo_addr), 4);
  CHECK_EQ_INT(sessions_removed(g_srv, "agent-2"), 1);
  /* The closed client is gone: its handle no longer answers. */
  rd_sample_list l;
  CHECK_EQ_INT(rd_api_metrics(cli2, &l), RD_ECLOSED);
  CHECK_EQ_INT(rd_api_close(cli2), RD_OK); /* idempotent */
  /* The other agent was not disturbed. */
  echo_through(g_srv, "agent-1", "agent-1 still here");
  check_settled();
}

/* ---- 8. the server closes; the agent finds a new one on the same port ---- */

TEST(test_server_restart) {
  open_set o;
  open_set_dial(&o, g_srv, "agent-1");
  CHECK(wait_open_conns(10));
  /* A request head still arriving when the server closes. */
  int half = tcp_connect(g_port);
  CHECK(half >= 0);
  CHECK_EQ_INT(write_all(half, "GET /conn", 9, WAIT_MS), 0);
  CHECK_EQ_INT(rd_api_close(g_srv), RD_OK);
  uint64_t old = g_srv;
  g_srv = 0;
  open_set_check_ended(&o);
  if (half >= 0) {
    char buf[256];
    int e = 0;
    CHECK(read_to_eof(half, buf, sizeof buf, WAIT_MS, &e) >= 0);
    close(half);
  }
  /* The closed server's handle is dead; closing again is harmless. */
  tconn x;
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_dial(old, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 0, &x.fd, &x.id, &x.st,
                                  err, sizeof err),
               RD_ECLOSED);
  CHECK_EQ_INT(rd_api_close(old), RD_OK);
  /* The agent notices, ends its side of the connections, and retries. */
  int connected = 1;
  char last[160] = "";
  uint64_t deadline = now_ms() + WAIT_MS;
  while (rd_api_client_state(g_cli, &connected, last, sizeof last) == RD_OK && connected &&
         now_ms() < deadline)
    nap();
  CHECK_EQ_INT(connected, 0);
  CHECK(last[0] != '\0');
  CHECK(wait_no_open_conns());
  CHECK(wait_balanced(g_cli, "client"));
  /* Nobody listens: a short wait times out. */
  CHECK_EQ_INT(rd_api_client_wait_connected(g_cli, 100, &connected), RD_OK);
  CHECK_EQ_INT(connected, 0);
  int port = 0;
  CHECK_EQ_INT(start_server_timeout(g_port, &g_srv, &port, 300), RD_OK);
  CHECK_EQ_INT(port, g_port);
  CHECK(wait_connected(g_cli));
  CHECK(wait_clients(g_srv, "agent-1"));
  CHECK_EQ_INT(sessions_added(g_cli, "client"), 2);
  CHECK_EQ_INT(sessions_removed(g_cli, "client"), 1);
  echo_through(g_srv, "agent-1", "after restart");
  /* This server gives a request head 300 ms. */
  half = tcp_connect(g_port);
  CHECK(half >= 0);
  if (half >= 0) {
    char buf[256];
    int e = 0;
    CHECK_EQ_INT(write_all(half, "GET /conn", 9, WAIT_MS), 0);
    CHECK(read_to_eof(half, buf, sizeof buf, WAIT_MS, &e) > 0);
    CHECK(strncmp(buf, "HTTP/1.1 408 ", 13) == 0);
    CHECK_STR(http_body(buf), "request head timeout\n");
    close(half);
  }
  CHECK(wait_balanced(g_srv, "new server"));
  CHECK(wait_balanced(g_cli, "client"));
  CHECK(wait_no_open_conns());
}

/* ---- 9. port forward ---- */

/* Connects to port and checks that the connection ends with no data;
 * returns the errno of the ending read (0 for a clean EOF). */
static int connect_expect_no_data(int port) {
  int fd = tcp_connect(port);
  CHECK(fd >= 0);
  if (fd < 0)
    return 0;
  char buf[64];
  int e = 0;
  CHECK_EQ_INT(read_to_eof(fd, buf, sizeof buf, WAIT_MS, &e), 0);
  close(fd);
  return e;
}

TEST(test_forward) {
  uint64_t fwd = 0;
  int fport = 0;
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "agent-1", "tcp", g_echo_addr, "127.0.0.1", 0, &fwd,
                                     &fport, err, sizeof err),
               RD_OK);
  CHECK(fport > 0);
  for (int round = 0; round < 2; round++) {
    int fd = tcp_connect(fport);
    CHECK(fd >= 0);
    if (fd < 0)
      break;
    CHECK(echo_once(fd, "through the forward"));
    CHECK(echo_once(fd, "twice"));
    close(fd);
  }
  check_settled();
  CHECK_EQ_INT(rd_api_close(fwd), RD_OK);
  /* The forward's port is closed with it. */
  int fd = tcp_connect(fport);
  CHECK(fd < 0);
  if (fd >= 0)
    close(fd);
  /* A forward whose target refuses: each accepted connection just ends. */
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "agent-1", "tcp", "127.0.0.1:1", "127.0.0.1", 0, &fwd,
                                     &fport, err, sizeof err),
               RD_OK);
  int e = connect_expect_no_data(fport);
  CHECK(e == 0 || e == ECONNRESET);
  /* A forward for an agent that is not there: the same. */
  uint64_t fwd2 = 0;
  int fport2 = 0;
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "nope", "tcp", g_echo_addr, "127.0.0.1", 0, &fwd2,
                                     &fport2, err, sizeof err),
               RD_OK);
  connect_expect_no_data(fport2);
  check_settled();
  CHECK_EQ_INT(rd_api_close(fwd), RD_OK);
  CHECK_EQ_INT(rd_api_close(fwd2), RD_OK);
}

/* ---- 10. the /client/... proxy route ---- */

TEST(test_proxy_route) {
  char req[512], resp[4096] = "";
  snprintf(req, sizeof req,
           "GET /client/agent-1/http/127.0.0.1:%d/hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
           "User-Agent: test-engine\r\n\r\n",
           g_http.port, g_port);
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) == 0);
  CHECK_STR(http_body(resp), "hello from /hello?x=1");
  pthread_mutex_lock(&g_http.lock);
  char head[TS_HEAD];
  snprintf(head, sizeof head, "%s", g_http.last_head);
  pthread_mutex_unlock(&g_http.lock);
  CHECK(strncmp(head, "GET /hello?x=1 HTTP/1.1\r\n", 25) == 0);
  CHECK(strstr(head, "\r\nUser-Agent: test-engine") != NULL);
  CHECK(strstr(head, "\r\nConnection: close") != NULL);

  /* A body, part of it sent after the head. */
  int fd = tcp_connect(g_port);
  CHECK(fd >= 0);
  if (fd >= 0) {
    snprintf(req, sizeof req,
             "POST /client/agent-1/http/127.0.0.1:%d/submit HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 11\r\n\r\nhello",
             g_http.port);
    CHECK_EQ_INT(write_all(fd, req, strlen(req), WAIT_MS), 0);
    CHECK_EQ_INT(write_all(fd, " world", 6, WAIT_MS), 0);
    int e = 0;
    CHECK(read_to_eof(fd, resp, sizeof resp, WAIT_MS, &e) > 0);
    CHECK_EQ_INT(e, 0);
    CHECK(strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) == 0);
    CHECK_STR(http_body(resp), "hello from /submit body=hello world");
    close(fd);
  }

  /* No path after the host: the backend is asked for "/". */
  snprintf(req, sizeof req, "GET /client/agent-1/http/127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n",
           g_http.port);
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK_STR(http_body(resp), "hello from /");
  /* Too few segments. */
  CHECK(http_exchange("GET /client/agent-1/http HTTP/1.1\r\nHost: x\r\n\r\n", resp,
                      sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 404 ", 13) == 0);

  snprintf(req, sizeof req, "GET /client/agent-1/http/127.0.0.1:1/x HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 500 ", 13) == 0);
  CHECK_STR(http_body(resp), "dial tcp 127.0.0.1:1: connect: connection refused");

  snprintf(req, sizeof req, "GET /client/nope/http/127.0.0.1:1/x HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 500 ", 13) == 0);
  CHECK_STR(http_body(resp), "failed to find Session for client nope");

  check_settled();
  /* One from test_dial_refused, one here. */
  CHECK_EQ_INT(conns_added(g_srv, "agent-1", "127.0.0.1:1"), 2);
}

/* ---- 11. close everything, shut down, nothing left ---- */

TEST(test_shutdown_frees_everything) {
  CHECK_EQ_INT(rd_api_close(g_cli), RD_OK);
  CHECK_EQ_INT(rd_api_close(g_srv), RD_OK);
  g_cli = g_srv = 0;
  /* Everything closed: only the engine's wake-up handle is left. */
  rd_stats st;
  memset(&st, 0, sizeof st);
  uint64_t deadline = now_ms() + WAIT_MS;
  while (rd_api_stats(&st) == RD_OK && st.loop_handles != 1 && now_ms() < deadline)
    nap();
  CHECK_EQ_INT(st.loop_handles, 1);
  rd_engine_shutdown();
  check_engine_empty();
  /* The engine stays down. */
  uint64_t h = 0;
  int port = 0;
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_new("127.0.0.1", 0, &cfg, &h, &port, err, sizeof err), RD_ECLOSED);
  rd_engine_shutdown();
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  ts_stop(&g_echo);
  ts_stop(&g_http);
  black_hole_close(&g_hole);
}

RD_TEST_MAIN(T(test_shutdown_with_open_objects), T(test_sigpipe_default), T(test_connect),
             T(test_http_routes), T(test_bad_arguments), T(test_client_failures),
             T(test_dial_echo), T(test_far_side_closes), T(test_dial_refused),
             T(test_dial_unknown_key), T(test_shared_key), T(test_connect_patterns),
             T(test_abrupt_closes), T(test_idle_timeout), T(test_connection_limits),
             T(test_read_deadline), T(test_concurrent_dials), T(test_bulk_64mib),
             T(test_backpressure), T(test_client_close_with_open_conns), T(test_server_restart),
             T(test_forward), T(test_proxy_route), T(test_shutdown_frees_everything))
