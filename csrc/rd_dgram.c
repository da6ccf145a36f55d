/* Datagram local ends on a uv_poll_t: the poll watches for reading while the
 * owner reads and for writing while records are queued. */
#define _GNU_SOURCE 1 /* POLLRDHUP */
#include "rd_dgram.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rd_alloc.h"

/* Records read per readiness event, so one busy socket cannot starve the
 * loop (libuv's streams read 32 times too). */
#define READS_PER_EVENT 32

typedef struct dgram_write {
  struct dgram_write *next;
  uv_write_t *req;
  uv_write_cb cb;
  unsigned nbufs;
  uv_buf_t bufs[];
} dgram_write;

struct rd_dgram {
  uv_poll_t poll;
  int fd;
  int seqpacket; /* a unix SEQPACKET socket: has an EOF; UDP has none */
  void *ctx;
  rd_dgram_alloc_cb alloc_cb;
  rd_dgram_read_cb read_cb;
  rd_dgram_drain_cb drain_cb;
  rd_dgram_close_cb close_cb;
  dgram_write *head, *tail;
  size_t queued; /* bytes in queued records */
  int error;     /* the socket failed: every later read and write gets it */
  int events;    /* what the poll watches now */
  unsigned reading : 1, closing : 1, eof : 1;
};

rd_dgram *rd_dgram_new(uv_loop_t *loop, int fd, void *ctx) {
  rd_dgram *d = rd_calloc(1, sizeof *d);
  if (d == NULL)
    return NULL;
  int type = 0;
  socklen_t len = sizeof type;
  getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len);
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0 && (fl & O_NONBLOCK) == 0)
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  d->fd = fd;
  d->seqpacket = type == SOCK_SEQPACKET;
  d->ctx = ctx;
  int rc = uv_poll_init_socket(loop, &d->poll, fd);
  if (rc != 0) {
    rd_free(d);
    return NULL;
  }
  d->poll.data = d;
  return d;
}

int rd_dgram_fd(const rd_dgram *d) { return d->fd; }

static void poll_cb(uv_poll_t *h, int status, int events);

/* Watches for what is wanted now: reading while the owner reads, writing
 * while records wait. */
static void update_poll(rd_dgram *d) {
  if (d->closing)
    return;
  int want = 0;
  if (d->error == 0) {
    if (d->reading && !d->eof)
      want |= UV_READABLE;
    if (d->head != NULL)
      want |= UV_WRITABLE;
  }
  if (want == d->events)
    return;
  d->events = want;
  if (want == 0)
    uv_poll_stop(&d->poll);
  else
    uv_poll_start(&d->poll, want, poll_cb);
}

static size_t bufs_len(const uv_buf_t bufs[], unsigned nbufs) {
  size_t n = 0;
  for (unsigned i = 0; i < nbufs; i++)
    n += bufs[i].len;
  return n;
}

/* One record out: its length, UV_EAGAIN, or another negative code. */
static ssize_t send_record(rd_dgram *d, const uv_buf_t bufs[], unsigned nbufs) {
  struct msghdr m;
  memset(&m, 0, sizeof m);
  m.msg_iov = (struct iovec *)bufs; /* uv_buf_t is laid out as struct iovec */
  m.msg_iovlen = nbufs;
  ssize_t n;
  do
    n = sendmsg(d->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n >= 0)
    return n;
  return errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS ? UV_EAGAIN : -errno;
}

static void write_done(rd_dgram *d, int status) {
  dgram_write *w = d->head;
  d->head = w->next;
  if (d->head == NULL)
    d->tail = NULL;
  d->queued -= bufs_len(w->bufs, w->nbufs);
  uv_write_t *req = w->req;
  uv_write_cb cb = w->cb;
  rd_free(w);
  cb(req, status);
}

static void maybe_drained(rd_dgram *d) {
  if (d->head == NULL && d->drain_cb != NULL && !d->closing) {
    rd_dgram_drain_cb cb = d->drain_cb;
    d->drain_cb = NULL;
    cb(d->ctx, d->error);
  }
}

/* Sends queued records while the socket takes them; a failure fails every
 * queued write with it. */
static void flush(rd_dgram *d) {
  while (d->head != NULL && !d->closing) {
    ssize_t n = d->error != 0 ? d->error : send_record(d, d->head->bufs, d->head->nbufs);
    if (n == UV_EAGAIN)
      break;
    if (n < 0 && d->error == 0)
      d->error = (int)n;
    write_done(d, n < 0 ? (int)n : 0);
  }
  maybe_drained(d);
  update_poll(d);
}

/* A zero-length read on SEQPACKET is the end when the peer has hung up and
 * no byte is left queued; otherwise it was an empty record (which carries
 * nothing and is skipped, as UDP's are). */
static int seqpacket_eof(rd_dgram *d) {
  struct pollfd p = {.fd = d->fd, .events = POLLIN | POLLRDHUP};
  if (poll(&p, 1, 0) != 1 || (p.revents & (POLLRDHUP | POLLHUP)) == 0)
    return 0;
  int queued = 0;
  return ioctl(d->fd, FIONREAD, &queued) != 0 || queued == 0;
}

static void deliver(rd_dgram *d, ssize_t nread, uv_buf_t *buf) { d->read_cb(d->ctx, nread, buf); }

static void read_some(rd_dgram *d) {
  for (int i = 0; i < READS_PER_EVENT && d->reading && !d->closing; i++) {
    uv_buf_t buf = uv_buf_init(NULL, 0);
    d->alloc_cb(d->ctx, &buf);
    if (buf.base == NULL || buf.len == 0) {
      deliver(d, UV_ENOBUFS, &buf);
      return;
    }
    ssize_t n;
    do
      n = recv(d->fd, buf.base, buf.len, MSG_DONTWAIT | MSG_TRUNC);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      deliver(d, 0, &buf);
      return;
    }
    if (n < 0) {
      d->error = -errno;
      deliver(d, d->error, &buf);
      return;
    }
    if ((size_t)n > buf.len) { /* MSG_TRUNC: the record did not fit */
      d->error = UV_EMSGSIZE;
      deliver(d, d->error, &buf);
      return;
    }
    if (n == 0 && d->seqpacket && seqpacket_eof(d)) {
      d->eof = 1;
      deliver(d, UV_EOF, &buf);
      return;
    }
    deliver(d, n, &buf); /* 0: an empty record, skipped */
  }
}

static void poll_cb(uv_poll_t *h, int status, int events) {
  rd_dgram *d = h->data;
  if (status < 0) {
    /* libuv stopped the poll on POLLERR: the socket's pending error (an
     * ICMP port unreachable on UDP) says what failed. */
    int e = 0;
    socklen_t len = sizeof e;
    if (getsockopt(d->fd, SOL_SOCKET, SO_ERROR, &e, &len) == 0 && e != 0)
      status = -e;
    d->events = 0;
    d->error = status;
    if (d->reading) {
      uv_buf_t none = uv_buf_init(NULL, 0);
      deliver(d, status, &none);
    }
    flush(d); /* fails what is queued */
    return;
  }
  if (events & UV_WRITABLE)
    flush(d);
  if ((events & UV_READABLE) && !d->closing)
    read_some(d);
  update_poll(d);
}

int rd_dgram_read_start(rd_dgram *d, rd_dgram_alloc_cb alloc_cb, rd_dgram_read_cb read_cb) {
  if (d->closing)
    return UV_EINVAL;
  d->alloc_cb = alloc_cb;
  d->read_cb = read_cb;
  d->reading = 1;
  update_poll(d);
  return 0;
}

void rd_dgram_read_stop(rd_dgram *d) {
  d->reading = 0;
  update_poll(d);
}

int rd_dgram_write(rd_dgram *d, uv_write_t *req, const uv_buf_t bufs[], unsigned nbufs,
                   uv_write_cb cb) {
  if (d->closing)
    return UV_EPIPE;
  if (d->error != 0)
    return d->error;
  dgram_write *w = rd_malloc(sizeof *w + nbufs * sizeof(uv_buf_t));
  if (w == NULL)
    return RD_ENOMEM;
  w->next = NULL;
  w->req = req;
  w->cb = cb;
  w->nbufs = nbufs;
  memcpy(w->bufs, bufs, nbufs * sizeof(uv_buf_t));
  if (d->tail != NULL)
    d->tail->next = w;
  else
    d->head = w;
  d->tail = w;
  d->queued += bufs_len(bufs, nbufs);
  update_poll(d); /* sent once writable: never inside this call */
  return 0;
}

ssize_t rd_dgram_try_write(rd_dgram *d, const uv_buf_t bufs[], unsigned nbufs) {
  if (d->closing)
    return UV_EPIPE;
  if (d->error != 0)
    return d->error;
  if (d->head != NULL)
    return 0;
  ssize_t n = send_record(d, bufs, nbufs);
  if (n == UV_EAGAIN)
    return 0;
  if (n < 0)
    d->error = (int)n;
  /* A record goes whole; a 0-length one reports its (0) length as sent. */
  return n < 0 ? n : (ssize_t)bufs_len(bufs, nbufs);
}

size_t rd_dgram_queue_size(const rd_dgram *d) { return d->queued; }

int rd_dgram_drain(rd_dgram *d, rd_dgram_drain_cb cb) {
  if (d->closing || d->drain_cb != NULL)
    return UV_EINVAL;
  if (d->head == NULL)
    return UV_EALREADY;
  d->drain_cb = cb;
  return 0;
}

static void poll_closed_cb(uv_handle_t *h) {
  rd_dgram *d = h->data;
  while (d->head != NULL)
    write_done(d, UV_ECANCELED);
  close(d->fd);
  rd_dgram_close_cb cb = d->close_cb;
  void *ctx = d->ctx;
  rd_free(d);
  if (cb != NULL)
    cb(ctx);
}

void rd_dgram_close(rd_dgram *d, rd_dgram_close_cb cb) {
  if (d->closing)
    return;
  d->closing = 1;
  d->reading = 0;
  d->drain_cb = NULL;
  d->close_cb = cb;
  uv_close((uv_handle_t *)&d->poll, poll_closed_cb);
}
