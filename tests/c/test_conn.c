/* The connection module's local ends (rd_conn_splice, rd_conn_attach_fd,
 * rd_conn_attach_io) at the session level, on the engine's loop thread.
 *
 * Each session runs over one end of an AF_UNIX socketpair, as the WebSocket
 * client (RD_ROLE_CLIENT); this thread holds the other end and plays the
 * WebSocket server with plain POSIX I/O: it sends unmasked frames and
 * unmasks what it reads. Set-up and loop-level actions run as commands on
 * the loop thread (rd_engine_call). The sessions' owner callbacks run there
 * too; they publish what they did through atomics and a notification pipe.
 *
 * Synchronisation is by real events only: frames on the far sides, bytes or
 * EOF on handed descriptors, notifications from the owner callbacks. A
 * WebSocket Ping works as a barrier: the session answers it in order, so a
 * Pong proves every frame sent before it was handled and that nothing else
 * was queued toward the far side before the Pong.
 *
 * The engine is a process-wide singleton: the tests share two sessions and
 * run in order; the last one ends them, shuts the engine down and checks
 * that every engine allocation was returned. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_conn.h"
#include "rd_loop.h"
#include "rd_metrics.h"
#include "rd_msg.h"
#include "rd_session.h"
#include "rd_test.h"
#include "rd_test_io.h"
#include "rd_ws.h"

/* Writing to a pipe the engine closed must fail, not kill the test. */
__attribute__((constructor)) static void ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

#define WAIT_MS 5000 /* the bound of every wait for something the engine does */

/* ---- time and blocking-socket helpers ---- */

/* 1 when fd reads a clean EOF (no data, no error) within WAIT_MS. */
static int reads_eof(int fd) {
  uint64_t deadline = now_ms() + WAIT_MS;
  char buf[256];
  while (wait_fd(fd, POLLIN, deadline)) {
    ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (r == 0)
      return 1;
    if (r > 0) {
      fprintf(stderr, "  expected EOF on fd %d: read %zd bytes\n", fd, r);
      return 0;
    }
    if (errno != EINTR && errno != EAGAIN) {
      fprintf(stderr, "  expected EOF on fd %d: %s\n", fd, strerror(errno));
      return 0;
    }
  }
  fprintf(stderr, "  expected EOF on fd %d: timed out\n", fd);
  return 0;
}

/* A connected loopback TCP pair (the engine's end accepted); 0 or -1. */
static int tcp_pair(int sv[2]) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int rc = -1;
  sv[0] = sv[1] = -1;
  if (lfd >= 0 && bind(lfd, (struct sockaddr *)&a, sizeof a) == 0 && listen(lfd, 1) == 0 &&
      getsockname(lfd, (struct sockaddr *)&a, &len) == 0 &&
      (sv[1] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) >= 0 &&
      connect(sv[1], (struct sockaddr *)&a, sizeof a) == 0 &&
      (sv[0] = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
    rc = 0;
  if (rc != 0 && sv[1] >= 0)
    close(sv[1]);
  if (lfd >= 0)
    close(lfd);
  return rc;
}

/* ---- the far side: a WebSocket server over plain sockets ---- */

#define FAR_QUEUE 8
#define FAR_PAYLOAD (128 * 1024)

/* One frame read from a session. For BINARY frames, the tunnel message. */
typedef struct fmsg {
  int opcode;
  int64_t conn_id;
  int type;
  uint8_t payload[FAR_PAYLOAD + 1]; /* NUL-terminated, for error texts */
  size_t len;
} fmsg;

typedef struct far_side {
  int fd;
  rd_ws_reader reader; /* expects masked frames: the session is the client */
  uint8_t buf[256 * 1024];
  size_t have;
  fmsg queue[FAR_QUEUE];
  size_t qhead, qcount;
  int64_t next_msg_id;
  int bad; /* a frame we could not parse: every later read fails */
  int pings;
} far_side;

static int far_frame_cb(void *ctx, int opcode, uint8_t *payload, size_t len) {
  far_side *f = ctx;
  fmsg *m = &f->queue[(f->qhead + f->qcount) % FAR_QUEUE];
  memset(m, 0, offsetof(fmsg, payload));
  m->opcode = opcode;
  m->conn_id = -1;
  const uint8_t *p = payload;
  if (opcode == RD_WS_BINARY) {
    rd_msg msg;
    if (rd_msg_decode(payload, len, &msg) != RD_OK) {
      f->bad = 1;
      return 1;
    }
    m->conn_id = msg.conn_id;
    m->type = (int)msg.type;
    p = msg.payload;
    len = msg.payload_len;
  }
  if (len > FAR_PAYLOAD) {
    f->bad = 1;
    return 1;
  }
  memcpy(m->payload, p, len);
  m->payload[len] = '\0';
  m->len = len;
  f->qcount++;
  return f->qcount == FAR_QUEUE; /* full: the rest waits in buf */
}

/* The next frame from the session; 0 on timeout, EOF or a bad frame. */
static int far_next(far_side *f, fmsg *out) {
  uint64_t deadline = now_ms() + WAIT_MS;
  while (!f->bad) {
    if (f->qcount == 0 && f->have > 0) {
      int64_t n = rd_ws_reader_feed(&f->reader, f->buf, f->have, far_frame_cb, f);
      if (n < 0) {
        f->bad = 1;
        break;
      }
      memmove(f->buf, f->buf + n, f->have - (size_t)n);
      f->have -= (size_t)n;
    }
    if (f->qcount > 0) {
      memcpy(out, &f->queue[f->qhead], sizeof *out);
      f->qhead = (f->qhead + 1) % FAR_QUEUE;
      f->qcount--;
      return 1;
    }
    if (!wait_fd(f->fd, POLLIN, deadline)) {
      fprintf(stderr, "  far side %d: no frame within %d ms\n", f->fd, WAIT_MS);
      return 0;
    }
    ssize_t r = recv(f->fd, f->buf + f->have, sizeof f->buf - f->have, MSG_DONTWAIT);
    if (r > 0) {
      f->have += (size_t)r;
    } else if (r == 0) {
      fprintf(stderr, "  far side %d: EOF\n", f->fd);
      return 0;
    } else if (errno != EINTR && errno != EAGAIN) {
      fprintf(stderr, "  far side %d: %s\n", f->fd, strerror(errno));
      return 0;
    }
  }
  fprintf(stderr, "  far side %d: unparsable frame\n", f->fd);
  return 0;
}

static void far_send_frame(far_side *f, int opcode, const uint8_t *head, size_t hlen,
                           const void *payload, size_t len) {
  uint8_t ws[RD_WS_HEADER_MAX];
  size_t wlen = rd_ws_build_header(ws, 1, opcode, hlen + len, NULL);
  uint8_t *frame = malloc(wlen + hlen + len);
  CHECK(frame != NULL);
  if (frame == NULL)
    return;
  memcpy(frame, ws, wlen);
  if (hlen > 0)
    memcpy(frame + wlen, head, hlen);
  if (len > 0)
    memcpy(frame + wlen + hlen, payload, len);
  CHECK_EQ_INT(write_all(f->fd, frame, wlen + hlen + len, WAIT_MS), 0);
  free(frame);
}

/* Sends one tunnel message (unmasked: we are the WebSocket server). */
static void far_send(far_side *f, int type, int64_t conn_id, const void *payload, size_t len) {
  uint8_t head[RD_MSG_HEADER_MAX];
  size_t hlen = rd_msg_encode_header(head, f->next_msg_id++, conn_id, type);
  far_send_frame(f, RD_WS_BINARY, head, hlen, payload, len);
}

static void far_send_str(far_side *f, int type, int64_t conn_id, const char *s) {
  far_send(f, type, conn_id, s, strlen(s));
}

static const char *type_name(int type) {
  static const char *names[] = {"?",          "DATA",          "CONNECT", "ERROR", "ADD_CLIENT",
                                "REMOVE_CLIENT", "PAUSE",         "RESUME",  "SYNC"};
  return type >= 1 && type <= 8 ? names[type] : "?";
}

/* Reads the next frame and checks it is tunnel message `type` for conn_id
 * (-1: any id) with this payload (NULL: any). Returns the message's
 * connection id, or -1 when it did not match. */
static int64_t far_expect(far_side *f, int type, int64_t conn_id, const void *payload,
                          size_t len, int line) {
  static fmsg m;
  if (!far_next(f, &m)) {
    fprintf(stderr, "%s:%d: expected %s for %lld, got nothing\n", __FILE__, line,
            type_name(type), (long long)conn_id);
    rd_test_failed_checks++;
    return -1;
  }
  int ok = m.opcode == RD_WS_BINARY && m.type == type && (conn_id < 0 || m.conn_id == conn_id) &&
           (payload == NULL || (m.len == len && memcmp(m.payload, payload, len) == 0));
  if (!ok) {
    fprintf(stderr,
            "%s:%d: expected %s for %lld (%zu bytes), got opcode %d %s for %lld (%zu bytes: "
            "\"%.60s\")\n",
            __FILE__, line, type_name(type), (long long)conn_id, len, m.opcode,
            type_name(m.type), (long long)m.conn_id, m.len, (const char *)m.payload);
    rd_test_failed_checks++;
    return -1;
  }
  return m.conn_id;
}

#define EXPECT(f, type, id, str) far_expect((f), (type), (id), (str), strlen(str), __LINE__)
#define EXPECT_BYTES(f, type, id, p, n) far_expect((f), (type), (id), (p), (n), __LINE__)
#define EXPECT_EMPTY(f, type, id) far_expect((f), (type), (id), "", 0, __LINE__)

/* The next frame is an ERROR for conn_id whose text starts with prefix;
 * returns the text (static) or NULL. */
static const char *far_expect_error_prefix(far_side *f, int64_t conn_id, const char *prefix,
                                           int line) {
  static fmsg m;
  if (!far_next(f, &m) || m.opcode != RD_WS_BINARY || m.type != RD_MSG_ERROR ||
      m.conn_id != conn_id || strncmp((const char *)m.payload, prefix, strlen(prefix)) != 0) {
    fprintf(stderr,
            "%s:%d: expected ERROR \"%s...\" for %lld, got opcode %d %s for %lld: \"%.60s\"\n",
            __FILE__, line, prefix, (long long)conn_id, m.opcode, type_name(m.type),
            (long long)m.conn_id, (const char *)m.payload);
    rd_test_failed_checks++;
    return NULL;
  }
  return (const char *)m.payload;
}

/* Barrier: a Ping, then the very next frame must be its Pong. Proves the
 * session handled everything sent before and sent nothing else meanwhile. */
static void far_quiet_at(far_side *f, int line) {
  char tag[32];
  snprintf(tag, sizeof tag, "barrier-%d", ++f->pings);
  far_send_frame(f, RD_WS_PING, NULL, 0, tag, strlen(tag));
  static fmsg m;
  if (!far_next(f, &m) || m.opcode != RD_WS_PONG || strcmp((const char *)m.payload, tag) != 0) {
    fprintf(stderr, "%s:%d: expected Pong \"%s\", got opcode %d %s for %lld: \"%.60s\"\n",
            __FILE__, line, tag, m.opcode, m.opcode == RD_WS_BINARY ? type_name(m.type) : "-",
            (long long)m.conn_id, (const char *)m.payload);
    rd_test_failed_checks++;
  }
}
#define FAR_QUIET(f) far_quiet_at((f), __LINE__)

/* ---- commands on the loop thread ---- */

typedef struct loop_job {
  rd_cmd cmd; /* first: the loop hands back this pointer */
  void (*fn)(void *arg);
  void *arg;
} loop_job;

static void loop_job_run(rd_cmd *cmd) {
  loop_job *j = (loop_job *)cmd;
  j->fn(j->arg);
  rd_cmd_finish(cmd, RD_OK, NULL);
}

/* Runs fn(arg) on the loop thread and waits for it. */
static void on_loop(void (*fn)(void *), void *arg) {
  loop_job j;
  memset(&j, 0, sizeof j);
  j.cmd.run = loop_job_run;
  j.fn = fn;
  j.arg = arg;
  CHECK_EQ_INT(rd_engine_call(&j.cmd), RD_OK);
}

/* ---- the sessions under test and their owner ---- */

/* What a session's on_connect does with a new connection. */
enum {
  MODE_REFUSE,        /* rd_conn_refuse */
  MODE_SPLICE,        /* open the same address on the other session, splice */
  MODE_HOLD,          /* keep it connecting for a later loop command */
  MODE_ATTACH_UNIX,   /* attach one end of a unix socketpair */
  MODE_ATTACH_TCP,    /* attach one end of a loopback TCP pair */
  MODE_ATTACH_DEVNULL, /* attach /dev/null: not a socket */
  MODE_ATTACH_PIPE,   /* attach the read end of a pipe(2): not a socket */
  MODE_ATTACH_DGRAM,  /* attach a unix datagram socket: records */
  MODE_ATTACH_SEQPACKET, /* attach a unix seqpacket socket: records with an EOF */
  MODE_ATTACH_TWICE,  /* attach a socketpair end, then another */
  MODE_ATTACH_ENDED,  /* end it, then attach a descriptor and an io */
};

typedef struct tsess {
  const char *key;
  far_side far;
  struct tsess *other; /* where MODE_SPLICE opens the second leg */
  _Atomic int mode;
  /* Counted by the owner callbacks (each followed by a notification). */
  _Atomic int connects, ends, freed;
  /* What on_connect's calls returned, and descriptors it hands us. */
  _Atomic int rc1, rc2;
  _Atomic int fd1, fd2;
  /* Loop thread only. */
  rd_session *s;
  rd_session_config cfg; /* the session keeps a pointer to it */
  rd_metrics *metrics;
  int engine_fd;
  rd_conn *held[4];
  size_t nheld;
  char end_reason[64]; /* written before ends is counted */
} tsess;

static tsess g_a = {.key = "sess-a"}, g_b = {.key = "sess-b"}, g_c = {.key = "sess-c"};
static int g_notify[2] = {-1, -1}; /* owner callbacks -> this thread */

static void notify(void) {
  ssize_t w = write(g_notify[1], "!", 1);
  (void)w; /* a full pipe already wakes the waiter */
}

/* Waits until *counter reaches want, woken by the owner callbacks. */
static int wait_count(_Atomic int *counter, int want, const char *what) {
  uint64_t deadline = now_ms() + WAIT_MS;
  while (atomic_load(counter) < want) {
    if (!wait_fd(g_notify[0], POLLIN, deadline)) {
      fprintf(stderr, "  %s: %d, want %d\n", what, atomic_load(counter), want);
      return 0;
    }
    char drain[64];
    ssize_t r = read(g_notify[0], drain, sizeof drain);
    (void)r;
  }
  return 1;
}

static void free_handle_cb(uv_handle_t *h) { rd_free(h); }

/* An io over a new unix socketpair: the engine's end wrapped (loop thread),
 * the other end in *peer. NULL on failure. */
static rd_io *socketpair_io(int *peer) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return NULL;
  uv_pipe_t *p = rd_malloc(sizeof *p);
  if (p == NULL) {
    close(sv[0]);
    close(sv[1]);
    return NULL;
  }
  uv_pipe_init(rd_loop(), p, 0);
  if (uv_pipe_open(p, sv[0]) != 0) {
    close(sv[0]);
    close(sv[1]);
    uv_close((uv_handle_t *)p, free_handle_cb);
    return NULL;
  }
  *peer = sv[1];
  return rd_io_new((uv_stream_t *)p, NULL);
}

/* A second leg on t->other for c, spliced to it; returns splice's code. */
static int splice_to_other(tsess *t, rd_conn *c) {
  int err = 0;
  rd_conn *b = rd_session_open(t->other->s, rd_conn_proto(c), rd_conn_address(c), NULL, &err);
  if (b == NULL) {
    rd_conn_refuse(c, "open failed");
    return err;
  }
  int rc = rd_conn_splice(c, b);
  if (rc != RD_OK) {
    rd_conn_close(b, NULL);
    rd_conn_refuse(c, "splice failed");
    return rc;
  }
  if (t->other->nheld < 4)
    t->other->held[t->other->nheld++] = b; /* for a close from this end later */
  return rc;
}

static void owner_on_connect(rd_session *s, void *owner, rd_conn *c) {
  (void)s;
  tsess *t = owner;
  int sv[2] = {-1, -1};
  switch (atomic_load(&t->mode)) {
  case MODE_REFUSE:
    rd_conn_refuse(c, "refused by test");
    break;
  case MODE_SPLICE:
    atomic_store(&t->rc1, splice_to_other(t, c));
    break;
  case MODE_HOLD:
    if (t->nheld < 4)
      t->held[t->nheld++] = c;
    else
      rd_conn_refuse(c, "too many held");
    break;
  case MODE_ATTACH_UNIX:
  case MODE_ATTACH_TCP:
    if (atomic_load(&t->mode) == MODE_ATTACH_UNIX
            ? socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0
            : tcp_pair(sv) != 0) {
      rd_conn_refuse(c, "no socket pair");
      break;
    }
    atomic_store(&t->fd1, sv[1]);
    atomic_store(&t->rc1, rd_conn_attach_fd(c, sv[0]));
    break;
  case MODE_ATTACH_DEVNULL:
    atomic_store(&t->rc1, rd_conn_attach_fd(c, open("/dev/null", O_RDWR | O_CLOEXEC)));
    break;
  case MODE_ATTACH_PIPE:
    if (pipe2(sv, O_CLOEXEC) != 0) {
      rd_conn_refuse(c, "no pipe");
      break;
    }
    /* The write end stays ours: writing to it tells whether the engine
     * kept the read end. */
    atomic_store(&t->fd1, sv[1]);
    atomic_store(&t->rc1, rd_conn_attach_fd(c, sv[0]));
    break;
  case MODE_ATTACH_DGRAM:
  case MODE_ATTACH_SEQPACKET:
    if (socketpair(AF_UNIX,
                   (atomic_load(&t->mode) == MODE_ATTACH_DGRAM ? SOCK_DGRAM : SOCK_SEQPACKET) |
                       SOCK_CLOEXEC,
                   0, sv) != 0) {
      rd_conn_refuse(c, "no socket pair");
      break;
    }
    atomic_store(&t->fd1, sv[1]);
    atomic_store(&t->rc1, rd_conn_attach_fd(c, sv[0]));
    break;
  case MODE_ATTACH_TWICE: {
    int sv2[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0 ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv2) != 0) {
      rd_conn_refuse(c, "no socket pair");
      break;
    }
    atomic_store(&t->fd1, sv[1]);
    atomic_store(&t->fd2, sv2[1]);
    atomic_store(&t->rc1, rd_conn_attach_fd(c, sv[0]));
    atomic_store(&t->rc2, rd_conn_attach_fd(c, sv2[0]));
    break;
  }
  case MODE_ATTACH_ENDED: {
    /* An ended connection is freed once its last reference goes; a deadline
     * timer holds one until its close callback (a later loop turn), so the
     * pointer stays good for the rest of this callback. */
    int peer = -1;
    rd_conn_set_deadline(c, 60000);
    rd_conn_refuse(c, "refused first");
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
      break;
    atomic_store(&t->fd1, sv[1]);
    atomic_store(&t->rc1, rd_conn_attach_fd(c, sv[0]));
    rd_io *io = socketpair_io(&peer);
    if (io == NULL)
      break;
    atomic_store(&t->fd2, peer);
    atomic_store(&t->rc2, rd_conn_attach_io(c, io));
    break;
  }
  }
  atomic_fetch_add(&t->connects, 1);
  notify();
}

static void owner_on_end(rd_session *s, void *owner, const char *reason) {
  (void)s;
  tsess *t = owner;
  snprintf(t->end_reason, sizeof t->end_reason, "%s", reason);
  t->s = NULL; /* the session frees itself later: never touch it again */
  atomic_fetch_add(&t->ends, 1);
  notify();
}

static void owner_on_freed(void *owner) {
  atomic_fetch_add(&((tsess *)owner)->freed, 1);
  notify();
}

static const rd_session_owner g_ops = {
    .on_end = owner_on_end,
    .on_freed = owner_on_freed,
    .on_connect = owner_on_connect,
};

/* Loop thread: a session over t->engine_fd, as the WebSocket client. */
static void session_start_fn(void *arg) {
  tsess *t = arg;
  rd_session_config_default(&t->cfg);
  t->cfg.ping_interval_ms = 0; /* only the test's own frames on the wire */
  t->cfg.sync_interval_ms = 0;
  uv_pipe_t *p = rd_malloc(sizeof *p);
  if (p == NULL)
    return;
  uv_pipe_init(rd_loop(), p, 0);
  if (uv_pipe_open(p, t->engine_fd) != 0) {
    uv_close((uv_handle_t *)p, free_handle_cb);
    return;
  }
  rd_io *io = rd_io_new((uv_stream_t *)p, NULL);
  if (io == NULL)
    return;
  t->metrics = rd_metrics_new();
  t->s = rd_session_new(io, RD_ROLE_CLIENT, t->key, NULL, RD_SESSION_AGENT, t->metrics, &t->cfg,
                        &g_ops, t, NULL, 0);
}

static int session_start(tsess *t) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return 0;
  t->engine_fd = sv[0];
  t->far.fd = sv[1];
  t->far.next_msg_id = 1000;
  rd_ws_reader_init(&t->far.reader, 1, 1u << 24);
  on_loop(session_start_fn, t);
  return t->s != NULL;
}

/* How many connections a session holds, and its open-connections gauge. */
typedef struct {
  tsess *t;
  int64_t count;
  double gauge;
} conn_query;

static void conn_query_fn(void *arg) {
  conn_query *q = arg;
  q->count = q->t->s != NULL ? (int64_t)rd_session_conn_count(q->t->s) : -1;
  const char *labels[1] = {q->t->key};
  q->gauge = rd_metrics_get(q->t->metrics, RD_M_OPEN_CONNECTIONS, labels);
}

static void check_conns_at(tsess *t, int64_t want, int line) {
  conn_query q = {t, 0, 0};
  on_loop(conn_query_fn, &q);
  if (q.count != want || q.gauge != (double)want) {
    fprintf(stderr, "%s:%d: %s holds %lld connections (gauge %g), want %lld\n", __FILE__, line,
            t->key, (long long)q.count, q.gauge, (long long)want);
    rd_test_failed_checks++;
  }
}
#define CHECK_CONNS(t, n) check_conns_at((t), (n), __LINE__)

/* Loop thread: drops the held pointers (their connections have ended). */
static void forget_held_fn(void *arg) {
  (void)arg;
  g_a.nheld = g_b.nheld = 0;
}

/* Sets up the next on_connect and clears what the last one left. */
static void expect_connect(tsess *t, int mode) {
  atomic_store(&t->mode, mode);
  atomic_store(&t->rc1, 12345);
  atomic_store(&t->rc2, 12345);
  atomic_store(&t->fd1, -1);
  atomic_store(&t->fd2, -1);
}

/* Sends CONNECT for proto/address and waits for on_connect to have run. */
static void far_connect(tsess *t, int64_t id, const char *target) {
  int before = atomic_load(&t->connects);
  far_send_str(&t->far, RD_MSG_CONNECT, id, target);
  CHECK(wait_count(&t->connects, before + 1, "on_connect calls"));
}

/* Bytes that show up corrupted or reordered, never by chance. */
static void fill_pattern(uint8_t *p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)((i * 31 + seed + i / 251) & 0xff);
}

/* ---- 0. set-up ---- */

TEST(test_start_sessions) {
  CHECK_EQ_INT(pipe2(g_notify, O_CLOEXEC | O_NONBLOCK), 0);
  g_a.other = &g_b;
  g_b.other = &g_a;
  atomic_store(&g_b.mode, MODE_REFUSE);
  CHECK(session_start(&g_a));
  CHECK(session_start(&g_b));
  /* Both read their stream: each answers a Ping and has no connection. */
  FAR_QUIET(&g_a.far);
  FAR_QUIET(&g_b.far);
  CHECK_CONNS(&g_a, 0);
  CHECK_CONNS(&g_b, 0);
}

/* ---- 1. splice: what one far side sends, the other receives ---- */

TEST(test_splice) {
  static uint8_t big[100000];
  fill_pattern(big, sizeof big, 1);
  int connects = atomic_load(&g_a.connects);
  expect_connect(&g_a, MODE_SPLICE);
  /* DATA goes out right behind CONNECT, before B's CONNECT is read: it
   * must reach B's far side after that CONNECT, in order. */
  far_send_str(&g_a.far, RD_MSG_CONNECT, 5, "tcp/example:80");
  far_send_str(&g_a.far, RD_MSG_DATA, 5, "hello");
  far_send(&g_a.far, RD_MSG_DATA, 5, big, sizeof big);
  int64_t bid = EXPECT(&g_b.far, RD_MSG_CONNECT, -1, "tcp/example:80");
  CHECK(bid > 0);
  CHECK(wait_count(&g_a.connects, connects + 1, "on_connect calls"));
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_OK);
  EXPECT(&g_b.far, RD_MSG_DATA, bid, "hello");
  EXPECT_BYTES(&g_b.far, RD_MSG_DATA, bid, big, sizeof big);
  CHECK_CONNS(&g_a, 1);
  CHECK_CONNS(&g_b, 1);

  /* The other way. */
  far_send_str(&g_b.far, RD_MSG_DATA, bid, "world");
  EXPECT(&g_a.far, RD_MSG_DATA, 5, "world");

  /* Backpressure crosses over, both ways. */
  far_send(&g_b.far, RD_MSG_PAUSE, bid, NULL, 0);
  EXPECT_EMPTY(&g_a.far, RD_MSG_PAUSE, 5);
  far_send(&g_b.far, RD_MSG_RESUME, bid, NULL, 0);
  EXPECT_EMPTY(&g_a.far, RD_MSG_RESUME, 5);
  far_send(&g_a.far, RD_MSG_PAUSE, 5, NULL, 0);
  EXPECT_EMPTY(&g_b.far, RD_MSG_PAUSE, bid);
  far_send(&g_a.far, RD_MSG_RESUME, 5, NULL, 0);
  EXPECT_EMPTY(&g_b.far, RD_MSG_RESUME, bid);

  /* A clean end crosses over as a clean end; the side that sent it hears
   * nothing back. */
  far_send_str(&g_a.far, RD_MSG_ERROR, 5, "EOF");
  EXPECT(&g_b.far, RD_MSG_ERROR, bid, "EOF");
  FAR_QUIET(&g_a.far);
  FAR_QUIET(&g_b.far);
  CHECK_CONNS(&g_a, 0);
  CHECK_CONNS(&g_b, 0);

  /* An error crosses over with its text (here from B's side to A's). */
  far_send_str(&g_a.far, RD_MSG_CONNECT, 9, "tcp/example:443");
  int64_t bid2 = EXPECT(&g_b.far, RD_MSG_CONNECT, -1, "tcp/example:443");
  CHECK(bid2 > 0 && bid2 != bid);
  far_send_str(&g_b.far, RD_MSG_ERROR, bid2, "boom");
  EXPECT(&g_a.far, RD_MSG_ERROR, 9, "boom");
  FAR_QUIET(&g_a.far);
  FAR_QUIET(&g_b.far);
  CHECK_CONNS(&g_a, 0);
  CHECK_CONNS(&g_b, 0);
  on_loop(forget_held_fn, NULL);
}

/* ---- 2. a spliced leg gets what its far side sent before the splice ---- */

/* Loop thread: splices A's held connection to a new leg on B. */
static void splice_held_fn(void *arg) {
  (void)arg;
  atomic_store(&g_a.rc1, splice_to_other(&g_a, g_a.held[--g_a.nheld]));
}

/* Loop thread: ends B's leg from this end, as an owner would. */
static void close_b_leg_fn(void *arg) {
  (void)arg;
  rd_conn_close(g_b.held[--g_b.nheld], NULL);
}

TEST(test_splice_backlog) {
  on_loop(forget_held_fn, NULL);
  expect_connect(&g_a, MODE_HOLD);
  far_connect(&g_a, 15, "tcp/late:1");
  far_send_str(&g_a.far, RD_MSG_DATA, 15, "early-1");
  far_send_str(&g_a.far, RD_MSG_DATA, 15, "early-2");
  /* The Pong proves A holds both for a local end it does not have yet. */
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 1);
  CHECK(rd_engine_counts_get().buffered_bytes > 0);
  on_loop(splice_held_fn, NULL);
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_OK);
  /* Handed over in order, and no longer held. */
  int64_t bid = EXPECT(&g_b.far, RD_MSG_CONNECT, -1, "tcp/late:1");
  EXPECT(&g_b.far, RD_MSG_DATA, bid, "early-1");
  EXPECT(&g_b.far, RD_MSG_DATA, bid, "early-2");
  CHECK_EQ_INT(rd_engine_counts_get().buffered_bytes, 0);
  far_send_str(&g_b.far, RD_MSG_DATA, bid, "late");
  EXPECT(&g_a.far, RD_MSG_DATA, 15, "late");
  /* Closing one leg on the loop ends both far sides cleanly. */
  on_loop(close_b_leg_fn, NULL);
  EXPECT(&g_b.far, RD_MSG_ERROR, bid, "EOF");
  EXPECT(&g_a.far, RD_MSG_ERROR, 15, "EOF");
  FAR_QUIET(&g_a.far);
  FAR_QUIET(&g_b.far);
  CHECK_CONNS(&g_a, 0);
  CHECK_CONNS(&g_b, 0);
}

/* ---- 3. a descriptor as the local end ---- */

/* CONNECT, on_connect attaches a descriptor of `mode`, bytes both ways,
 * then closing our end of it is a clean end on the far side. */
static void attach_roundtrip(int mode, int64_t id, const char *target) {
  static uint8_t big[100000], got[100000];
  fill_pattern(big, sizeof big, (unsigned)id);
  expect_connect(&g_a, mode);
  far_connect(&g_a, id, target);
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_OK);
  int fd = atomic_load(&g_a.fd1);
  CHECK(fd >= 0);
  if (fd < 0)
    return;
  CHECK_CONNS(&g_a, 1);
  CHECK_EQ_INT(write_all(fd, "from-local", 10, WAIT_MS), 0);
  EXPECT(&g_a.far, RD_MSG_DATA, id, "from-local");
  far_send_str(&g_a.far, RD_MSG_DATA, id, "to-local");
  char buf[8];
  CHECK_EQ_INT(read_n(fd, buf, sizeof buf, WAIT_MS), sizeof buf);
  CHECK(memcmp(buf, "to-local", sizeof buf) == 0);
  /* More than the socket takes at once: the rest waits in the engine. */
  far_send(&g_a.far, RD_MSG_DATA, id, big, sizeof big);
  CHECK_EQ_INT(read_n(fd, got, sizeof got, WAIT_MS), sizeof got);
  CHECK(memcmp(got, big, sizeof big) == 0);
  close(fd);
  EXPECT(&g_a.far, RD_MSG_ERROR, id, "EOF");
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 0);
  CHECK_EQ_INT(rd_engine_counts_get().buffered_bytes, 0);
}

TEST(test_attach_fd_unix) { attach_roundtrip(MODE_ATTACH_UNIX, 11, "tcp/local:1"); }

TEST(test_attach_fd_tcp) { attach_roundtrip(MODE_ATTACH_TCP, 13, "tcp/local:2"); }

/* Loop thread: attaches a fresh socketpair end to A's held connection. */
static void attach_held_fn(void *arg) {
  (void)arg;
  rd_conn *c = g_a.held[--g_a.nheld];
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    rd_conn_refuse(c, "no socket pair");
    return;
  }
  atomic_store(&g_a.fd1, sv[1]);
  atomic_store(&g_a.rc1, rd_conn_attach_fd(c, sv[0]));
}

/* What the far side sent before the descriptor came is written to it first. */
TEST(test_attach_fd_later) {
  on_loop(forget_held_fn, NULL);
  expect_connect(&g_a, MODE_HOLD);
  far_connect(&g_a, 17, "tcp/local:3");
  far_send_str(&g_a.far, RD_MSG_DATA, 17, "early,");
  far_send_str(&g_a.far, RD_MSG_DATA, 17, "still early");
  FAR_QUIET(&g_a.far);
  on_loop(attach_held_fn, NULL);
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_OK);
  int fd = atomic_load(&g_a.fd1);
  CHECK(fd >= 0);
  if (fd < 0)
    return;
  char buf[17];
  CHECK_EQ_INT(read_n(fd, buf, sizeof buf, WAIT_MS), sizeof buf);
  CHECK(memcmp(buf, "early,still early", sizeof buf) == 0);
  CHECK_EQ_INT(rd_engine_counts_get().buffered_bytes, 0);
  close(fd);
  EXPECT(&g_a.far, RD_MSG_ERROR, 17, "EOF");
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 0);
}

/* A descriptor that is no stream socket ends the connection with an
 * "attach: ..." error, synchronously, and the engine closes it. */
static void attach_refused(int mode, int64_t id, const char *target) {
  expect_connect(&g_a, mode);
  far_connect(&g_a, id, target);
  int rc = atomic_load(&g_a.rc1);
  CHECK_EQ_INT(rc, UV_ENOTSOCK);
  if (rc == RD_OK) {
    /* Taken as a stream: it is open now. Say so, then end it cleanly so
     * the tests after this one start from nothing. */
    fprintf(stderr, "  mode %d: a non-socket descriptor was attached as a stream\n", mode);
    FAR_QUIET(&g_a.far);
    int fd = atomic_load(&g_a.fd1);
    if (fd >= 0)
      close(fd); /* the read end sees EOF: a clean end */
    EXPECT(&g_a.far, RD_MSG_ERROR, id, "EOF");
  } else {
    far_expect_error_prefix(&g_a.far, id, "attach:", __LINE__);
  }
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 0);
}

TEST(test_attach_devnull) { attach_refused(MODE_ATTACH_DEVNULL, 19, "tcp/null:1"); }

/* One record from fd within ms: its length (cap bytes at most), or -1. */
static ssize_t recv_record(int fd, char *buf, size_t cap, int ms) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  if (poll(&p, 1, ms) != 1)
    return -1;
  return recv(fd, buf, cap, MSG_DONTWAIT);
}

/* A datagram descriptor is carried one record per DATA message both ways;
 * nothing is joined or split. SEQPACKET ends with its EOF, a datagram
 * socket (no EOF) with the far side's close. */
static void attach_records(int mode, int64_t id, const char *target) {
  expect_connect(&g_a, mode);
  far_connect(&g_a, id, target);
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_OK);
  int fd = atomic_load(&g_a.fd1);
  CHECK(fd >= 0);
  if (fd < 0)
    return;
  CHECK_CONNS(&g_a, 1);
  CHECK_EQ_INT(send(fd, "ab", 2, 0), 2);
  CHECK_EQ_INT(send(fd, "cdef", 4, 0), 4);
  EXPECT(&g_a.far, RD_MSG_DATA, id, "ab");
  EXPECT(&g_a.far, RD_MSG_DATA, id, "cdef");
  far_send_str(&g_a.far, RD_MSG_DATA, id, "x");
  far_send_str(&g_a.far, RD_MSG_DATA, id, "yz");
  char buf[16];
  CHECK_EQ_INT(recv_record(fd, buf, sizeof buf, WAIT_MS), 1);
  CHECK(buf[0] == 'x');
  CHECK_EQ_INT(recv_record(fd, buf, sizeof buf, WAIT_MS), 2);
  CHECK(memcmp(buf, "yz", 2) == 0);
  if (mode == MODE_ATTACH_SEQPACKET) {
    CHECK_EQ_INT(send(fd, "last", 4, 0), 4);
    close(fd); /* the record sent before the close still goes first */
    EXPECT(&g_a.far, RD_MSG_DATA, id, "last");
    EXPECT(&g_a.far, RD_MSG_ERROR, id, "EOF");
  } else {
    far_send_str(&g_a.far, RD_MSG_ERROR, id, "EOF");
    close(fd);
  }
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 0);
  CHECK_EQ_INT(rd_engine_counts_get().buffered_bytes, 0);
}

TEST(test_attach_dgram) { attach_records(MODE_ATTACH_DGRAM, 21, "udp/dgram:1"); }

TEST(test_attach_seqpacket) { attach_records(MODE_ATTACH_SEQPACKET, 25, "udp/seq:1"); }

/* A pipe(2) end is no socket either, though libuv guesses it a named pipe. */
TEST(test_attach_pipe) {
  attach_refused(MODE_ATTACH_PIPE, 23, "tcp/pipe:1");
  int fd = atomic_load(&g_a.fd1);
  if (atomic_load(&g_a.rc1) != RD_OK && fd >= 0) {
    /* The engine closed the read end: our write end now has no reader. */
    errno = 0;
    CHECK(write(fd, "x", 1) < 0 && errno == EPIPE);
    close(fd);
  }
}

/* ---- 4. misuse ---- */

/* Loop thread: two splices that must be refused, leaving both untouched. */
static void bad_splices_fn(void *arg) {
  (void)arg;
  atomic_store(&g_a.rc1, rd_conn_splice(g_a.held[0], g_a.held[1]));
  atomic_store(&g_a.rc2, rd_conn_splice(g_a.held[0], g_a.held[0]));
}

static void close_held_fn(void *arg) {
  (void)arg;
  rd_conn_close(g_a.held[0], NULL);
  rd_conn_close(g_a.held[1], "gone");
  g_a.nheld = 0;
}

TEST(test_splice_same_session) {
  on_loop(forget_held_fn, NULL);
  expect_connect(&g_a, MODE_HOLD);
  far_connect(&g_a, 31, "tcp/x:1");
  far_connect(&g_a, 33, "tcp/x:2");
  on_loop(bad_splices_fn, NULL);
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_EINVAL);
  CHECK_EQ_INT(atomic_load(&g_a.rc2), RD_EINVAL);
  /* Nothing was sent and both still wait for a local end. */
  FAR_QUIET(&g_a.far);
  FAR_QUIET(&g_b.far);
  CHECK_CONNS(&g_a, 2);
  CHECK_CONNS(&g_b, 0);
  on_loop(close_held_fn, NULL);
  EXPECT(&g_a.far, RD_MSG_ERROR, 31, "EOF");
  EXPECT(&g_a.far, RD_MSG_ERROR, 33, "gone");
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 0);
}

/* A second local end is refused (and closed); the first carries on. */
TEST(test_attach_twice) {
  expect_connect(&g_a, MODE_ATTACH_TWICE);
  far_connect(&g_a, 35, "tcp/x:3");
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_OK);
  CHECK_EQ_INT(atomic_load(&g_a.rc2), RD_EINVAL);
  int fd1 = atomic_load(&g_a.fd1), fd2 = atomic_load(&g_a.fd2);
  CHECK(fd1 >= 0 && fd2 >= 0);
  if (fd1 < 0 || fd2 < 0)
    return;
  CHECK(reads_eof(fd2));
  close(fd2);
  CHECK_EQ_INT(write_all(fd1, "still here", 10, WAIT_MS), 0);
  EXPECT(&g_a.far, RD_MSG_DATA, 35, "still here");
  close(fd1);
  EXPECT(&g_a.far, RD_MSG_ERROR, 35, "EOF");
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 0);
}

/* An ended connection takes no local end: RD_ECLOSED, and the descriptor
 * and the io are closed (our ends read EOF; the leak check at the end sees
 * the io freed). */
TEST(test_attach_ended) {
  expect_connect(&g_a, MODE_ATTACH_ENDED);
  far_connect(&g_a, 37, "tcp/x:4");
  EXPECT(&g_a.far, RD_MSG_ERROR, 37, "refused first");
  CHECK_EQ_INT(atomic_load(&g_a.rc1), RD_ECLOSED);
  CHECK_EQ_INT(atomic_load(&g_a.rc2), RD_ECLOSED);
  int fd1 = atomic_load(&g_a.fd1), fd2 = atomic_load(&g_a.fd2);
  CHECK(fd1 >= 0 && fd2 >= 0);
  if (fd1 >= 0) {
    CHECK(reads_eof(fd1));
    close(fd1);
  }
  if (fd2 >= 0) {
    CHECK(reads_eof(fd2));
    close(fd2);
  }
  FAR_QUIET(&g_a.far);
  CHECK_CONNS(&g_a, 0);
}

/* ---- 5. a failed write ends its session on the next loop turn ---- */

/* The far side stops reading: the Pong that answers its Ping cannot be
 * written. The send only marks the session; the session ends at the reap
 * the loop runs next, and frees itself. */
TEST(test_write_failure_ends_session) {
  atomic_store(&g_c.mode, MODE_REFUSE);
  CHECK(session_start(&g_c));
  FAR_QUIET(&g_c.far);
  CHECK_EQ_INT(shutdown(g_c.far.fd, SHUT_RD), 0);
  far_send_frame(&g_c.far, RD_WS_PING, NULL, 0, "unanswerable", 12);
  CHECK(wait_count(&g_c.ends, 1, "sessions ended (c)"));
  CHECK_STR(g_c.end_reason, "write failed");
  CHECK(wait_count(&g_c.freed, 1, "sessions freed (c)"));
  close(g_c.far.fd);
  g_c.far.fd = -1;
  rd_ws_reader_dispose(&g_c.far.reader);
}

/* ---- 6. end the sessions, shut down, nothing left ---- */

static void end_sessions_fn(void *arg) {
  (void)arg;
  g_a.nheld = g_b.nheld = 0;
  if (g_a.s != NULL)
    rd_session_end(g_a.s, RD_WS_CLOSE_NORMAL, "test over");
  if (g_b.s != NULL)
    rd_session_end(g_b.s, RD_WS_CLOSE_NORMAL, "test over");
}

static void free_metrics_fn(void *arg) {
  (void)arg;
  rd_metrics_free(g_a.metrics);
  rd_metrics_free(g_b.metrics);
  rd_metrics_free(g_c.metrics);
  g_a.metrics = g_b.metrics = g_c.metrics = NULL;
}

/* The session's Close frame (code 1000, our reason), then EOF. */
static void check_closed(tsess *t) {
  static fmsg m;
  CHECK(far_next(&t->far, &m));
  CHECK_EQ_INT(m.opcode, RD_WS_CLOSE);
  CHECK(m.len >= 2 && (m.payload[0] << 8 | m.payload[1]) == RD_WS_CLOSE_NORMAL);
  CHECK_STR((const char *)m.payload + (m.len >= 2 ? 2 : 0), "test over");
  CHECK(reads_eof(t->far.fd));
  close(t->far.fd);
  t->far.fd = -1;
  rd_ws_reader_dispose(&t->far.reader);
}

TEST(test_end_and_free) {
  on_loop(end_sessions_fn, NULL);
  CHECK(wait_count(&g_a.freed, 1, "sessions freed (a)"));
  CHECK(wait_count(&g_b.freed, 1, "sessions freed (b)"));
  CHECK_EQ_INT(atomic_load(&g_a.ends), 1);
  CHECK_EQ_INT(atomic_load(&g_b.ends), 1);
  check_closed(&g_a);
  check_closed(&g_b);
  on_loop(free_metrics_fn, NULL);
  rd_engine_shutdown();
  rd_engine_counts counts = rd_engine_counts_get();
  CHECK_EQ_INT(counts.open_sessions, 0);
  CHECK_EQ_INT(counts.open_connections, 0);
  CHECK_EQ_INT(counts.buffered_bytes, 0);
  CHECK_EQ_INT(counts.tunnel_queued_bytes, 0);
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  CHECK_EQ_INT(rd_alloc_objects(), 0);
  close(g_notify[0]);
  close(g_notify[1]);
}

RD_TEST_MAIN(T(test_start_sessions), T(test_splice), T(test_splice_backlog),
             T(test_attach_fd_unix), T(test_attach_fd_tcp), T(test_attach_fd_later),
             T(test_attach_devnull), T(test_attach_dgram), T(test_attach_seqpacket),
             T(test_attach_pipe),
             T(test_splice_same_session), T(test_attach_twice), T(test_attach_ended),
             T(test_write_failure_ends_session), T(test_end_and_free))
