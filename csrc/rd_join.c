#include "rd_join.h"

#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_block.h"

/* Past this many bytes queued toward one side, the other is not read. */
#define JOIN_WRITE_HIGH (1u << 20)

struct rd_join {
  rd_io *io[2];
  rd_join_end_cb cb;
  void *ctx;
  int open; /* streams not yet closed */
  unsigned eof[2];  /* io[i] read its EOF */
  unsigned shut[2]; /* io[i]'s write side is shut down */
  unsigned ended : 1;
  char err[128];
};

typedef struct {
  uv_write_t req;
  rd_block *block;
  rd_join *j;
  int dst;
} join_write;

static int side_of(const rd_join *j, const rd_io *io) { return io == j->io[0] ? 0 : 1; }

static void io_closed_cb(rd_io *io) {
  rd_join *j = rd_io_data(io);
  if (--j->open > 0)
    return;
  j->cb(j->ctx, j->err[0] != '\0' ? j->err : NULL);
  rd_free(j);
}

/* Closes both streams once; err (NULL: clean) is what cb will see. */
static void join_end(rd_join *j, const char *err) {
  if (j->ended)
    return;
  j->ended = 1;
  if (err != NULL)
    snprintf(j->err, sizeof j->err, "%s", err);
  rd_io_close(j->io[0], io_closed_cb);
  rd_io_close(j->io[1], io_closed_cb);
}

static void fail(rd_join *j, int side, const char *what, ssize_t code) {
  char err[128];
  const char *text = code == RD_ETLS && rd_io_error(j->io[side])[0] != '\0'
                         ? rd_io_error(j->io[side])
                         : rd_strerror((int)code);
  snprintf(err, sizeof err, "%s: %s", what, text);
  join_end(j, err);
}

static void alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)io;
  (void)suggested;
  rd_block *b = rd_block_get(RD_BLOCK_SIZE);
  *buf = b != NULL ? uv_buf_init((char *)rd_block_payload(b), RD_BLOCK_SIZE) : uv_buf_init(NULL, 0);
}

static void read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf);

/* Reads side src only while what waits for the other side stays under the
 * mark. */
static void update_reading(rd_join *j, int src) {
  if (j->ended || j->eof[src])
    return;
  if (rd_io_write_queue_size(j->io[!src]) > JOIN_WRITE_HIGH)
    rd_io_read_stop(j->io[src]);
  else
    rd_io_read_start(j->io[src], alloc_cb, read_cb);
}

static void write_cb(uv_write_t *req, int status) {
  join_write *w = (join_write *)req;
  rd_join *j = w->j;
  int dst = w->dst;
  rd_block_unref(w->block);
  rd_free(w);
  if (j->ended)
    return;
  if (status < 0)
    fail(j, dst, "write", status);
  else
    update_reading(j, !dst);
}

/* Sends len bytes at data (inside b, whose reference this takes) to side dst. */
static void write_to(rd_join *j, int dst, rd_block *b, const uint8_t *data, size_t len) {
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
  ssize_t sent = rd_io_try_write(j->io[dst], &buf, 1);
  if (sent >= 0 && (size_t)sent == len) {
    rd_block_unref(b);
    return;
  }
  join_write *w = sent >= 0 ? rd_malloc(sizeof *w) : NULL;
  if (w != NULL) {
    buf.base += sent;
    buf.len -= (size_t)sent;
    w->block = b;
    w->j = j;
    w->dst = dst;
    int rc = rd_io_write(j->io[dst], &w->req, &buf, 1, write_cb);
    if (rc == 0)
      return;
    rd_free(w);
    sent = rc;
  }
  rd_block_unref(b);
  fail(j, dst, "write", sent < 0 ? sent : RD_ENOMEM);
}

static void shutdown_cb(rd_io *io, int status) {
  rd_join *j = rd_io_data(io);
  if (j->ended)
    return;
  int side = side_of(j, io);
  /* The far end may have closed already: its EOF came first. */
  if (status < 0 && !j->eof[side]) {
    fail(j, side, "shutdown", status);
    return;
  }
  j->shut[side] = 1;
  if (j->shut[0] && j->shut[1])
    join_end(j, NULL);
}

static void read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  rd_join *j = rd_io_data(io);
  rd_block *b = buf != NULL && buf->base != NULL ? rd_block_of_payload(buf->base) : NULL;
  int side = side_of(j, io);
  if (nread > 0 && !j->ended) {
    write_to(j, !side, b, rd_block_payload(b), (size_t)nread);
    update_reading(j, side);
    return;
  }
  rd_block_unref(b);
  if (nread == 0 || j->ended)
    return;
  if (nread != UV_EOF) {
    fail(j, side, "read", nread);
    return;
  }
  j->eof[side] = 1;
  rd_io_read_stop(io);
  if (rd_io_shutdown(j->io[!side], shutdown_cb) != 0)
    join_end(j, NULL); /* the other side is past taking bytes: nothing is lost */
}

rd_join *rd_join_start(rd_io *a, rd_io *b, const void *to_a, size_t len, rd_join_end_cb cb,
                       void *ctx) {
  rd_join *j = rd_calloc(1, sizeof *j);
  rd_block *first = j != NULL && len > 0 ? rd_block_get_small(len) : NULL;
  if (j == NULL || (len > 0 && first == NULL)) {
    rd_free(j);
    rd_io_close(a, NULL);
    rd_io_close(b, NULL);
    return NULL;
  }
  j->io[0] = a;
  j->io[1] = b;
  j->cb = cb;
  j->ctx = ctx;
  j->open = 2;
  rd_io_set_data(a, j);
  rd_io_set_data(b, j);
  if (first != NULL) {
    memcpy(rd_block_payload(first), to_a, len);
    write_to(j, 0, first, rd_block_payload(first), len);
  }
  update_reading(j, 0);
  update_reading(j, 1);
  return j;
}

void rd_join_close(rd_join *j) { join_end(j, NULL); }
