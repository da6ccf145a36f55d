/* Plain streams go straight to libuv. TLS streams read ciphertext into the
 * TLS layer's buffer, pump plaintext into the owner's buffers, and write
 * ciphertext blocks that the TLS layer produced; owner writes complete in
 * order once the ciphertext queued up to their end is written. Under plain
 * and TLS alike the transport is a libuv stream or an in-memory pair end
 * (rd_io_pair); the transport_* calls pick. Datagram ios go to rd_dgram. */
#define _GNU_SOURCE 1 /* POLLRDHUP */
#include "rd_io.h"

#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_dgram.h"
#include "rd_io_pair.h"

typedef struct pending_write {
  struct pending_write *next;
  uv_write_t *req;
  uv_write_cb cb;
  uint64_t until; /* complete once cipher_done reaches this */
} pending_write;

typedef struct cipher_write {
  uv_write_t req;
  rd_io *io;
  rd_block *block;
  size_t len;
} cipher_write;

struct rd_io {
  uv_stream_t *stream; /* NULL for a datagram io or a pair end */
  rd_dgram *dg;        /* a datagram io's socket */
  rd_pair_end *pe;     /* a pair end's engine */
  rd_tls *tls;
  void *data;
  rd_io_alloc_cb alloc_cb;
  rd_io_read_cb read_cb;
  rd_io_handshake_cb hs_cb;
  rd_io_shutdown_cb shutdown_cb;
  rd_io_close_cb close_cb;
  uv_timer_t *kick; /* TLS: pumps plaintext already buffered at read start */
  pending_write *pw_head, *pw_tail;
  uint64_t cipher_queued, cipher_done;
  int write_error;
  unsigned handles : 2; /* open handles: stream or pair end, kick */
  unsigned reading : 1, handshaking : 1, closing : 1, failed : 1, shutting_down : 1;
};

static void stream_free_cb(uv_handle_t *h) { rd_free(h); }

rd_io *rd_io_new(uv_stream_t *stream, rd_tls *tls) {
  rd_io *io = rd_calloc(1, sizeof *io);
  if (io == NULL) {
    if (tls != NULL)
      rd_tls_free(tls);
    uv_close((uv_handle_t *)stream, stream_free_cb);
    return NULL;
  }
  io->stream = stream;
  io->tls = tls;
  io->handles = 1;
  stream->data = io;
  return io;
}

/* The last handle closed: the io goes. */
static void io_release(rd_io *io) {
  if (--io->handles > 0)
    return;
  if (io->tls != NULL)
    rd_tls_free(io->tls);
  rd_io_close_cb cb = io->close_cb;
  if (cb != NULL)
    cb(io);
  rd_free(io);
}

/* ---- datagram ios: rd_dgram does the work ---- */

int rd_fd_is_dgram(int fd) {
  int type = 0;
  socklen_t len = sizeof type;
  return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 &&
         (type == SOCK_DGRAM || type == SOCK_SEQPACKET);
}

rd_io *rd_io_new_dgram(uv_loop_t *loop, int fd) {
  rd_io *io = rd_calloc(1, sizeof *io);
  if (io != NULL && (io->dg = rd_dgram_new(loop, fd, io)) == NULL) {
    rd_free(io);
    io = NULL;
  }
  if (io == NULL)
    close(fd);
  return io;
}

static void dgram_alloc_cb(void *ctx, uv_buf_t *buf) {
  rd_io *io = ctx;
  io->alloc_cb(io, RD_DGRAM_MAX, buf);
}

static void dgram_read_cb(void *ctx, ssize_t nread, const uv_buf_t *buf) {
  rd_io *io = ctx;
  io->read_cb(io, nread, buf);
}

/* A datagram io's drain or a pair end's shutdown is done. */
static void engine_shutdown_cb(void *ctx, int status) {
  rd_io *io = ctx;
  rd_io_shutdown_cb cb = io->shutdown_cb;
  io->shutdown_cb = NULL;
  if (cb != NULL)
    cb(io, status);
}

static void dgram_closed_cb(void *ctx) {
  rd_io *io = ctx;
  if (io->close_cb != NULL)
    io->close_cb(io);
  rd_free(io);
}

/* ---- in-memory pair ends: rd_io_pair is their transport ---- */

int rd_io_new_pair(uv_loop_t *loop, rd_io **a, rd_io **b) {
  rd_io *x = rd_calloc(1, sizeof *x);
  rd_io *y = x != NULL ? rd_calloc(1, sizeof *y) : NULL;
  if (y == NULL || rd_pair_new(loop, x, y, &x->pe, &y->pe) != RD_OK) {
    rd_free(x);
    rd_free(y);
    return RD_ENOMEM;
  }
  x->handles = y->handles = 1; /* the pair end */
  *a = x;
  *b = y;
  return RD_OK;
}

int rd_io_peer_done(const rd_io *io) {
  if (io->pe != NULL)
    return rd_pair_peer_done(io->pe);
  int fd = rd_io_fileno(io);
  if (fd < 0)
    return 0;
  /* A direct poll() with no wait does not disturb the loop's own
   * registration of the descriptor. */
  struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
  return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

int rd_io_is_dgram(const rd_io *io) { return io->dg != NULL; }

int rd_io_fileno(const rd_io *io) {
  if (io->pe != NULL)
    return -1;
  if (io->dg != NULL)
    return rd_dgram_fd(io->dg);
  uv_os_fd_t fd;
  return uv_fileno((const uv_handle_t *)io->stream, &fd) == 0 ? fd : -1;
}

void rd_io_set_data(rd_io *io, void *data) { io->data = data; }
void *rd_io_data(const rd_io *io) { return io->data; }
uv_stream_t *rd_io_stream(const rd_io *io) { return io->stream; }
rd_tls *rd_io_tls(const rd_io *io) { return io->tls; }
int rd_io_is_tls(const rd_io *io) { return io->tls != NULL; }
int rd_io_is_closing(const rd_io *io) { return io->closing; }
const char *rd_io_error(const rd_io *io) { return io->tls != NULL ? rd_tls_error(io->tls) : ""; }

int rd_io_start_tls(rd_io *io, rd_tls *tls) {
  if (io->tls != NULL || io->dg != NULL || io->reading || io->closing) {
    rd_tls_free(tls);
    return UV_EINVAL;
  }
  /* Plain writes still queued go to libuv's queue ahead of any ciphertext. */
  io->tls = tls;
  return 0;
}

/* ---- the transport: a libuv stream or a pair end ---- */

static void plain_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void plain_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void tls_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void tls_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void pair_alloc_cb(void *ctx, size_t suggested, uv_buf_t *buf);
static void pair_read_cb(void *ctx, ssize_t nread, const uv_buf_t *buf);

/* Reads the transport: into the owner's buffers when plain, into the TLS
 * layer's when TLS. */
static int transport_read_start(rd_io *io) {
  if (io->pe != NULL)
    return rd_pair_read_start(io->pe, pair_alloc_cb, pair_read_cb);
  if (io->tls != NULL)
    return uv_read_start(io->stream, tls_alloc_cb, tls_read_cb);
  return uv_read_start(io->stream, plain_alloc_cb, plain_read_cb);
}

static void transport_read_stop(rd_io *io) {
  if (io->pe != NULL)
    rd_pair_read_stop(io->pe);
  else
    uv_read_stop(io->stream);
}

static int transport_write(rd_io *io, uv_write_t *req, const uv_buf_t bufs[], unsigned nbufs,
                           uv_write_cb cb) {
  if (io->pe != NULL)
    return rd_pair_write(io->pe, req, bufs, nbufs, cb);
  return uv_write(req, io->stream, bufs, nbufs, cb);
}

/* ---- TLS writes ---- */

static void complete_writes(rd_io *io, int force_status) {
  while (io->pw_head != NULL &&
         (force_status != 0 || io->write_error != 0 || io->pw_head->until <= io->cipher_done)) {
    pending_write *pw = io->pw_head;
    io->pw_head = pw->next;
    if (io->pw_head == NULL)
      io->pw_tail = NULL;
    int status = force_status != 0 ? force_status : io->write_error;
    uv_write_t *req = pw->req;
    uv_write_cb cb = pw->cb;
    rd_free(pw);
    cb(req, status);
  }
}

static void cipher_write_cb(uv_write_t *req, int status) {
  cipher_write *w = (cipher_write *)req;
  rd_io *io = w->io;
  io->cipher_done += w->len;
  rd_block_unref(w->block);
  rd_free(w);
  if (status < 0 && io->write_error == 0)
    io->write_error = status;
  complete_writes(io, 0);
}

/* Sends every ciphertext chunk the TLS layer has ready. */
static int flush(rd_io *io) {
  while (rd_tls_output_pending(io->tls) > 0) {
    size_t len = 0;
    rd_block *b = rd_tls_take_output(io->tls, &len);
    cipher_write *w = b != NULL ? rd_malloc(sizeof *w) : NULL;
    if (w == NULL) {
      if (b != NULL)
        rd_block_unref(b);
      return RD_ENOMEM;
    }
    w->io = io;
    w->block = b;
    w->len = len;
    uv_buf_t buf = uv_buf_init((char *)rd_block_payload(b), (unsigned)len);
    int rc = transport_write(io, &w->req, &buf, 1, cipher_write_cb);
    if (rc != 0) {
      rd_block_unref(b);
      rd_free(w);
      return rc;
    }
    io->cipher_queued += len;
  }
  return 0;
}

int rd_io_write(rd_io *io, uv_write_t *req, const uv_buf_t bufs[], unsigned nbufs,
                uv_write_cb cb) {
  if (io->closing)
    return UV_EPIPE;
  if (io->dg != NULL)
    return rd_dgram_write(io->dg, req, bufs, nbufs, cb);
  if (io->tls == NULL)
    return transport_write(io, req, bufs, nbufs, cb);
  if (io->write_error != 0)
    return io->write_error;
  pending_write *pw = rd_malloc(sizeof *pw);
  if (pw == NULL)
    return RD_ENOMEM;
  for (unsigned i = 0; i < nbufs; i++) {
    int rc = rd_tls_write(io->tls, bufs[i].base, bufs[i].len);
    if (rc != 0) {
      rd_free(pw);
      return rc == RD_EPARTIAL ? UV_ENOTCONN : rc == RD_ECLOSED ? UV_EPIPE : rc;
    }
  }
  int rc = flush(io);
  if (rc != 0) {
    rd_free(pw);
    return rc;
  }
  pw->req = req;
  pw->cb = cb;
  pw->until = io->cipher_queued;
  pw->next = NULL;
  if (io->pw_tail != NULL)
    io->pw_tail->next = pw;
  else
    io->pw_head = pw;
  io->pw_tail = pw;
  return 0;
}

ssize_t rd_io_try_write(rd_io *io, const uv_buf_t bufs[], unsigned nbufs) {
  if (io->closing)
    return UV_EPIPE;
  if (io->dg != NULL)
    return rd_dgram_try_write(io->dg, bufs, nbufs);
  if (io->tls != NULL)
    return 0;
  if (io->pe != NULL)
    return rd_pair_try_write(io->pe);
  if (io->stream->write_queue_size > 0)
    return 0;
  int n = uv_try_write(io->stream, bufs, nbufs);
  return n == UV_EAGAIN ? 0 : n;
}

size_t rd_io_write_queue_size(const rd_io *io) {
  if (io->pe != NULL)
    return rd_pair_queue_size(io->pe);
  return io->dg != NULL ? rd_dgram_queue_size(io->dg) : io->stream->write_queue_size;
}

/* ---- reading ---- */

static void plain_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  rd_io *io = h->data;
  io->alloc_cb(io, suggested, buf);
}

static void plain_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  rd_io *io = s->data;
  io->read_cb(io, nread, buf);
}

/* Where the transport's next ciphertext goes: the TLS layer's buffer. */
static void tls_in_buf(rd_io *io, uv_buf_t *buf) {
  uint8_t *p;
  size_t n;
  if (rd_tls_in_buf(io->tls, &p, &n) != 0)
    *buf = uv_buf_init(NULL, 0);
  else
    *buf = uv_buf_init((char *)p, (unsigned)n);
}

static void tls_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  tls_in_buf(h->data, buf);
}

static void handshake_finish(rd_io *io, int status) {
  io->handshaking = 0;
  if (!io->reading)
    transport_read_stop(io);
  rd_io_handshake_cb cb = io->hs_cb;
  io->hs_cb = NULL;
  const char *text = rd_tls_error(io->tls);
  if (status < 0 && text[0] == '\0')
    text = status == UV_EOF ? "tls: connection closed during handshake" : rd_strerror(status);
  if (cb != NULL)
    cb(io, status, status < 0 ? text : NULL);
}

static void deliver_error(rd_io *io, ssize_t code) {
  uv_buf_t none = uv_buf_init(NULL, 0);
  if (io->handshaking) {
    handshake_finish(io, (int)code);
  } else if (io->reading) {
    io->read_cb(io, code, &none);
  }
}

/* Advances the handshake, then hands the owner all plaintext there is. */
static void pump(rd_io *io) {
  if (io->closing || io->failed)
    return;
  if (!rd_tls_handshake_done(io->tls)) {
    int rc = rd_tls_handshake(io->tls);
    flush(io);
    if (rc == RD_EPARTIAL)
      return;
    if (rc != 0) {
      io->failed = 1;
      if (io->handshaking)
        handshake_finish(io, rc == RD_ECLOSED ? UV_EOF : rc);
      else
        deliver_error(io, rc == RD_ECLOSED ? UV_EOF : rc);
      return;
    }
    if (io->handshaking) {
      handshake_finish(io, 0);
      if (io->closing)
        return;
    }
  }
  while (io->reading && !io->closing) {
    uv_buf_t buf = uv_buf_init(NULL, 0);
    io->alloc_cb(io, 65536, &buf);
    if (buf.base == NULL || buf.len == 0) {
      io->read_cb(io, UV_ENOBUFS, &buf);
      break;
    }
    int64_t n = rd_tls_read(io->tls, (uint8_t *)buf.base, buf.len);
    if (n > 0) {
      io->read_cb(io, (ssize_t)n, &buf);
      continue;
    }
    io->read_cb(io, 0, &buf);
    if (n != RD_EPARTIAL && io->reading && !io->closing) {
      io->failed = 1;
      deliver_error(io, n == RD_ECLOSED ? UV_EOF : (ssize_t)n);
    }
    break;
  }
  if (!io->closing)
    flush(io);
}

/* nread bytes of ciphertext arrived in the TLS layer's buffer, or the
 * transport failed. */
static void tls_input(rd_io *io, ssize_t nread) {
  if (nread < 0) {
    transport_read_stop(io);
    if (!io->failed) { /* a close_notify already ended the reading */
      io->failed = 1;
      deliver_error(io, nread);
    }
    return;
  }
  if (nread > 0)
    rd_tls_in_commit(io->tls, (size_t)nread);
  pump(io);
}

static void tls_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  tls_input(s->data, nread);
}

static void pair_alloc_cb(void *ctx, size_t suggested, uv_buf_t *buf) {
  rd_io *io = ctx;
  if (io->tls != NULL)
    tls_in_buf(io, buf);
  else
    io->alloc_cb(io, suggested, buf);
}

static void pair_read_cb(void *ctx, ssize_t nread, const uv_buf_t *buf) {
  rd_io *io = ctx;
  if (io->tls != NULL)
    tls_input(io, nread);
  else
    io->read_cb(io, nread, buf);
}

static void kick_cb(uv_timer_t *t) { pump(t->data); }

int rd_io_handshake(rd_io *io, rd_io_handshake_cb cb) {
  if (io->tls == NULL || io->dg != NULL || io->closing)
    return UV_EINVAL;
  io->hs_cb = cb;
  io->handshaking = 1;
  int rc = transport_read_start(io);
  if (rc != 0)
    return rc;
  /* A client's first flight goes out now; a server waits for it. */
  rd_tls_handshake(io->tls);
  return flush(io);
}

int rd_io_read_start(rd_io *io, rd_io_alloc_cb alloc_cb, rd_io_read_cb read_cb) {
  if (io->closing)
    return UV_EINVAL;
  io->alloc_cb = alloc_cb;
  io->read_cb = read_cb;
  io->reading = 1;
  if (io->dg != NULL)
    return rd_dgram_read_start(io->dg, dgram_alloc_cb, dgram_read_cb);
  if (io->tls == NULL)
    return transport_read_start(io);
  if (io->failed)
    return 0;
  int rc = transport_read_start(io);
  if (rc != 0 && rc != UV_EALREADY)
    return rc;
  /* Records already decrypted or buffered announce no socket read: pump them
   * from the loop, never inside this call. */
  if (io->kick == NULL) {
    io->kick = rd_malloc(sizeof *io->kick);
    if (io->kick == NULL)
      return RD_ENOMEM;
    uv_timer_init(io->pe != NULL ? rd_pair_loop(io->pe) : io->stream->loop, io->kick);
    io->kick->data = io;
    io->handles++;
  }
  uv_timer_start(io->kick, kick_cb, 0, 0);
  return 0;
}

void rd_io_read_stop(rd_io *io) {
  io->reading = 0;
  if (io->dg != NULL) {
    rd_dgram_read_stop(io->dg);
    return;
  }
  if (!io->handshaking && !io->closing)
    transport_read_stop(io);
  if (io->kick != NULL)
    uv_timer_stop(io->kick);
}

/* ---- shutdown, close ---- */

/* libuv runs it before the stream's close callback, also for a shutdown the
 * close cancels, so the request never outlives its io. */
static void shutdown_cb(uv_shutdown_t *req, int status) {
  rd_io *io = req->data;
  rd_free(req);
  rd_io_shutdown_cb cb = io->shutdown_cb;
  io->shutdown_cb = NULL;
  if (cb != NULL)
    cb(io, status);
}

int rd_io_shutdown(rd_io *io, rd_io_shutdown_cb cb) {
  if (io->closing || io->shutting_down)
    return UV_EINVAL;
  if (io->dg != NULL) { /* no half-close: wait for queued records only */
    io->shutdown_cb = cb;
    int rc = rd_dgram_drain(io->dg, engine_shutdown_cb);
    if (rc == 0)
      io->shutting_down = 1;
    else
      io->shutdown_cb = NULL;
    return rc;
  }
  /* A stream's request is its own allocation: most streams never shut down,
   * and an idle one should not carry the request. A pair end needs none. */
  uv_shutdown_t *req = NULL;
  if (io->pe == NULL && (req = rd_malloc(sizeof *req)) == NULL)
    return RD_ENOMEM;
  if (io->tls != NULL && rd_tls_handshake_done(io->tls)) {
    rd_tls_shutdown(io->tls);
    int rc = flush(io);
    if (rc != 0) {
      rd_free(req);
      return rc;
    }
  }
  io->shutdown_cb = cb;
  int rc;
  if (io->pe != NULL) {
    rc = rd_pair_shutdown(io->pe, engine_shutdown_cb);
  } else {
    req->data = io;
    rc = uv_shutdown(req, io->stream, shutdown_cb);
    if (rc != 0)
      rd_free(req);
  }
  if (rc == 0)
    io->shutting_down = 1;
  else
    io->shutdown_cb = NULL;
  return rc;
}

static void io_handle_closed_cb(uv_handle_t *h) {
  rd_io *io = h->data;
  if (h == (uv_handle_t *)io->stream) {
    /* libuv has run every cancelled write; owner writes still waiting for
     * ciphertext that never got queued end the same way. */
    complete_writes(io, UV_ECANCELED);
  }
  rd_free(h);
  io_release(io);
}

/* The pair end closed, its cancelled writes called back: as a stream's
 * close. */
static void pair_end_closed_cb(void *ctx) {
  rd_io *io = ctx;
  complete_writes(io, UV_ECANCELED);
  io_release(io);
}

void rd_io_close(rd_io *io, rd_io_close_cb cb) {
  if (io->closing)
    return;
  io->closing = 1;
  io->reading = 0;
  io->close_cb = cb;
  if (io->dg != NULL) {
    rd_dgram_close(io->dg, dgram_closed_cb);
    return;
  }
  if (io->kick != NULL)
    uv_close((uv_handle_t *)io->kick, io_handle_closed_cb);
  if (io->pe != NULL)
    rd_pair_close(io->pe, pair_end_closed_cb);
  else
    uv_close((uv_handle_t *)io->stream, io_handle_closed_cb);
}

typedef struct {
  uv_write_t req;
  rd_io *io;
  char data[];
} reject_write;

static void reject_write_cb(uv_write_t *req, int status) {
  (void)status;
  reject_write *w = (reject_write *)req;
  rd_io *io = w->io;
  rd_io_close_cb cb = io->close_cb;
  rd_free(w);
  io->closing = 0; /* reserved by rd_io_reject_plain; now close for real */
  rd_io_close(io, cb);
}

void rd_io_reject_plain(rd_io *io, const char *data, size_t len, rd_io_close_cb cb) {
  if (io->closing)
    return;
  if (io->dg != NULL || io->pe != NULL) {
    rd_io_close(io, cb);
    return;
  }
  reject_write *w = rd_malloc(sizeof *w + len);
  uv_read_stop(io->stream);
  io->reading = 0;
  io->handshaking = 0;
  if (w != NULL) {
    memcpy(w->data, data, len);
    w->io = io;
    uv_buf_t buf = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, io->stream, &buf, 1, reject_write_cb) == 0) {
      io->closing = 1; /* no other use from now on */
      io->close_cb = cb;
      return;
    }
    rd_free(w);
  }
  rd_io_close(io, cb);
}
