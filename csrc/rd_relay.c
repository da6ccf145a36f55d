#include "rd_relay.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_http.h"

/* Past this many bytes queued toward one end, the other end is not read. */
#define RELAY_WRITE_HIGH (1u << 20)

typedef struct rd_relay {
  rd_io *user;    /* the HTTP client's connection */
  rd_io *backend; /* TLS client; its ciphertext goes through the tunnel */
  rd_dial_status *status;
  uint8_t *request;
  size_t request_len;
  int ios_open; /* freed when both ios have closed */
  unsigned ended : 1, responded : 1;
} rd_relay;

typedef struct {
  uv_write_t req;
  rd_block *block;
  rd_relay *relay;
} relay_write;

static void relay_end(rd_relay *r, const char *err, int user_alive);
static const char *backend_error(const rd_relay *r, ssize_t code);

static rd_io *other_end(const rd_relay *r, const rd_io *io) {
  return io == r->user ? r->backend : r->user;
}

static void io_closed_cb(rd_io *io) {
  rd_relay *r = rd_io_data(io);
  if (--r->ios_open > 0)
    return;
  rd_dial_status_unref(r->status);
  rd_free(r->request);
  rd_free(r);
}

static void user_shutdown_cb(rd_io *io, int status) {
  (void)status;
  rd_io_close(io, io_closed_cb);
}

static void alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)io;
  (void)suggested;
  rd_block *b = rd_block_get(RD_BLOCK_SIZE);
  *buf = b != NULL ? uv_buf_init((char *)rd_block_payload(b), RD_BLOCK_SIZE) : uv_buf_init(NULL, 0);
}

static void read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf);

/* Reads src only while what waits for its destination stays under the mark. */
static void update_reading(rd_relay *r, rd_io *src) {
  if (r->ended)
    return;
  if (rd_io_write_queue_size(other_end(r, src)) > RELAY_WRITE_HIGH)
    rd_io_read_stop(src);
  else
    rd_io_read_start(src, alloc_cb, read_cb);
}

static void write_cb(uv_write_t *req, int status) {
  relay_write *w = (relay_write *)req;
  rd_relay *r = w->relay;
  rd_io *dst = req->data;
  rd_block_unref(w->block);
  rd_free(w);
  if (r->ended)
    return;
  if (status < 0) {
    if (dst == r->user)
      relay_end(r, NULL, 0); /* the client went away */
    else
      relay_end(r, backend_error(r, status), 1);
    return;
  }
  update_reading(r, other_end(r, dst));
}

/* Sends len bytes at data (inside b, whose reference this takes) to dst. */
static void write_to(rd_relay *r, rd_io *dst, rd_block *b, const uint8_t *data, size_t len) {
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
  ssize_t sent = rd_io_try_write(dst, &buf, 1);
  if (sent >= 0 && (size_t)sent == len) {
    rd_block_unref(b);
    return;
  }
  relay_write *w = sent >= 0 ? rd_malloc(sizeof *w) : NULL;
  if (w != NULL) {
    buf.base += sent;
    buf.len -= (size_t)sent;
    w->block = b;
    w->relay = r;
    w->req.data = dst;
    if (rd_io_write(dst, &w->req, &buf, 1, write_cb) == 0)
      return;
    rd_free(w);
  }
  rd_block_unref(b);
  if (dst == r->user)
    relay_end(r, NULL, 0);
  else
    relay_end(r, backend_error(r, sent < 0 ? sent : UV_EPIPE), 1);
}

/* The tunnel's reason for ending the connection, or NULL. */
static const char *tunnel_error(const rd_relay *r) {
  if (r->status != NULL && atomic_load(&r->status->ended) && r->status->error[0] != '\0')
    return r->status->error;
  return NULL;
}

/* Why the backend ended: the tunnel's reason when it gave one. */
static const char *backend_error(const rd_relay *r, ssize_t code) {
  const char *why = tunnel_error(r);
  if (why != NULL)
    return why;
  if (code == RD_ETLS && rd_io_error(r->backend)[0] != '\0')
    return rd_io_error(r->backend);
  return code == UV_EOF ? "EOF" : rd_strerror((int)code);
}

static void read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  rd_relay *r = rd_io_data(io);
  rd_block *b = buf->base != NULL ? rd_block_of_payload(buf->base) : NULL;
  if (nread > 0 && !r->ended) {
    if (io == r->backend)
      r->responded = 1;
    write_to(r, other_end(r, io), b, rd_block_payload(b), (size_t)nread);
    update_reading(r, io);
    return;
  }
  rd_block_unref(b);
  if (nread == 0 || r->ended)
    return;
  if (io == r->user)
    relay_end(r, NULL, 0); /* the client went away (no half-close, as on the http leg) */
  else
    relay_end(r, backend_error(r, nread), 1);
}

static void handshake_cb(rd_io *io, int status, const char *error) {
  rd_relay *r = rd_io_data(io);
  if (r->ended)
    return;
  if (status < 0) {
    const char *why = tunnel_error(r);
    if (why == NULL && error != NULL && error[0] != '\0')
      why = error;
    relay_end(r, why != NULL ? why : backend_error(r, status), 1);
    return;
  }
  rd_block *b = rd_block_get_small(r->request_len);
  if (b == NULL) {
    relay_end(r, "out of memory", 1);
    return;
  }
  memcpy(rd_block_payload(b), r->request, r->request_len);
  rd_free(r->request);
  r->request = NULL;
  write_to(r, r->backend, b, rd_block_payload(b), r->request_len);
  update_reading(r, r->backend);
  update_reading(r, r->user);
}

/* Ends both sides once: the client gets the 500 answer when nothing of the
 * response reached it yet, then what is queued for it, then its close. */
static void relay_end(rd_relay *r, const char *err, int user_alive) {
  if (r->ended)
    return;
  r->ended = 1;
  rd_io_read_stop(r->user);
  rd_io_read_stop(r->backend);
  if (user_alive && err != NULL && !r->responded) {
    char head[160];
    size_t elen = strlen(err);
    size_t hlen = rd_http_error_head(head, sizeof head, elen);
    rd_block *b = rd_block_get_small(hlen + elen);
    if (b != NULL) {
      memcpy(rd_block_payload(b), head, hlen);
      memcpy(rd_block_payload(b) + hlen, err, elen);
      write_to(r, r->user, b, rd_block_payload(b), hlen + elen);
    }
  }
  rd_io_close(r->backend, io_closed_cb); /* after err is used: it may live in the backend */
  if (!user_alive || rd_io_shutdown(r->user, user_shutdown_cb) != 0)
    rd_io_close(r->user, io_closed_cb);
}

void rd_relay_start(rd_io *user, rd_io *backend, rd_dial_status *status, const void *request,
                    size_t len) {
  rd_relay *r = rd_calloc(1, sizeof *r);
  uint8_t *copy = r != NULL ? rd_malloc(len > 0 ? len : 1) : NULL;
  if (copy == NULL) {
    rd_free(r);
    rd_dial_status_unref(status);
    rd_io_close(user, NULL);
    rd_io_close(backend, NULL);
    return;
  }
  memcpy(copy, request, len);
  r->user = user;
  r->backend = backend;
  r->status = status;
  r->request = copy;
  r->request_len = len;
  r->ios_open = 2;
  rd_io_set_data(user, r);
  rd_io_set_data(backend, r);
  if (rd_io_handshake(backend, handshake_cb) != 0)
    relay_end(r, "tls: handshake could not start", 1);
}
