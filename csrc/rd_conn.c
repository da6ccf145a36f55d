/* Tunneled connections: the state machine and the local end.
 *
 * Ownership: a connection holds references for being alive (dropped when it
 * ends), for its local stream (dropped in the stream's close callback), for
 * a local dial in flight (dropped in the dial callback), for a deadline
 * timer and for a place on its session's reap list; it is freed when the last
 * goes. It ends in exactly one function, rd_conn_end, whatever ends it.
 *
 * Memory: bytes that wait (for a local end, or for a local socket that is
 * not reading) live in blocks this connection alone owns, copied out of the
 * session's read block, and `pending` counts those blocks whole. So a far
 * side that sends many tiny messages cannot pin a session read block with
 * each, and max_buffer and hard_cap limit real memory. */
#include "rd_conn.h"

#include <sys/socket.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_dialer.h"
#include "rd_http.h"
#include "rd_loop.h"
#include "rd_session_int.h"
#include "rd_wreq.h"

enum { CONN_CONNECTING, CONN_OPEN, CONN_ENDED };

/* Bytes in a block of their own, waiting in a list. */
typedef struct slice {
  struct slice *next;
  rd_block *block;
  uint8_t *data;
  size_t len;
  size_t charge;
} slice;

typedef struct slice_list {
  slice *head, *tail;
} slice_list;

struct rd_conn {
  rd_map_node node; /* in the session's table, while registered */
  int64_t id;
  rd_session *s; /* NULL once ended */
  /* The local end, one of: a dial in flight, a stream, a splice mate (a
   * connection on another session). One slot: an idle connection is small. */
  union {
    rd_dial *dial;
    rd_io *io;
    rd_conn *mate;
  } end;
  rd_dial_status *status;
  void *owner_slot;
  char *proto; /* "proto\0address\0" in one block */
  int refs;
  unsigned state : 2, end_kind : 2;
  unsigned peer_paused : 1, we_paused : 1, http_errors : 1, got_data : 1, local_broken : 1;
  unsigned local_gone : 1; /* the local peer closed while we were paused */
  /* The far side ended cleanly (ERROR "EOF") while we were connecting, with
   * bytes in the backlog: they go to the local end once it is there, then
   * the connection ends, as Go's agent delivers its buffer before the EOF. */
  unsigned far_eof : 1;
  unsigned failed : 1;     /* the local end failed: on the session's reap list */
  unsigned dial_deadline : 1; /* `deadline` waits for a local end, not the whole life */
  unsigned pooled : 1;        /* idle in the proxy route's pool */
  size_t pending;          /* memory held toward the local end */
  slice_list backlog;      /* the far side's bytes before a local end */
  /* Read from the local end while the far side has us paused: held back so
   * reading can go on far enough to see the local end close. */
  slice_list held;
  size_t held_bytes;
  uint64_t tx_bytes, rx_bytes;
  uint64_t created;
  uint64_t last_activity;
  uv_timer_t *deadline;
  rd_conn *reap_next;
  /* Why the local end failed (a static text and a code): the message is
   * formatted only at the reap, so an idle connection carries no buffer. */
  const char *fail_what;
  int fail_status;
  uint32_t idle_ms; /* 0: none */
};

enum { END_NONE, END_DIAL, END_IO, END_MATE };

static rd_io *local_io(const rd_conn *c) { return c->end_kind == END_IO ? c->end.io : NULL; }
static rd_conn *mate_of(const rd_conn *c) { return c->end_kind == END_MATE ? c->end.mate : NULL; }
static rd_dial *dial_of(const rd_conn *c) { return c->end_kind == END_DIAL ? c->end.dial : NULL; }

/* ---- dial status ---- */

rd_dial_status *rd_dial_status_new(void) {
  rd_dial_status *st = rd_calloc(1, sizeof *st);
  if (st != NULL)
    atomic_store(&st->refs, 1);
  return st;
}

void rd_dial_status_unref(rd_dial_status *st) {
  if (st != NULL && atomic_fetch_sub(&st->refs, 1) == 1)
    rd_free(st);
}

/* ---- memory ---- */

/* A copy of data in a block sized for it (a pooled one when that wastes at
 * most half), or NULL. */
static rd_block *block_copy(const uint8_t *data, size_t len) {
  rd_block *b = len > RD_BLOCK_SIZE / 2 && len <= RD_BLOCK_SIZE ? rd_block_get(len)
                                                                 : rd_block_get_small(len);
  if (b != NULL && len > 0)
    memcpy(rd_block_payload(b), data, len);
  return b;
}

/* What a waiting block costs: all of it, and the request or list entry. */
static size_t block_charge(const rd_block *b, size_t extra) { return sizeof *b + b->cap + extra; }

static void pending_add(rd_conn *c, size_t n) {
  c->pending += n;
  rd_engine_counts_add(0, 0, (int64_t)n);
}

static void pending_sub(rd_conn *c, size_t n) {
  c->pending -= n;
  rd_engine_counts_add(0, 0, -(int64_t)n);
}

/* Appends data (b's reference passes to the list). 0 or RD_ENOMEM. */
static int slice_push(slice_list *l, rd_block *b, uint8_t *data, size_t len, size_t *charge) {
  slice *it = rd_malloc(sizeof *it);
  if (it == NULL) {
    rd_block_unref(b);
    return RD_ENOMEM;
  }
  it->next = NULL;
  it->block = b;
  it->data = data;
  it->len = len;
  it->charge = block_charge(b, sizeof *it);
  if (charge != NULL)
    *charge = it->charge;
  if (l->tail != NULL)
    l->tail->next = it;
  else
    l->head = it;
  l->tail = it;
  return RD_OK;
}

static slice *slice_pop(slice_list *l) {
  slice *it = l->head;
  if (it != NULL && (l->head = it->next) == NULL)
    l->tail = NULL;
  return it;
}

/* ---- life ---- */

static void conn_unref(rd_conn *c) {
  if (--c->refs > 0)
    return;
  rd_dial_status_unref(c->status);
  rd_free(c->proto);
  rd_free(c);
}

/* A UDP flow has no end of its own: it gets udp_idle_timeout, the rest
 * idle_timeout. */
static uint64_t default_idle_ms(const rd_conn *c) {
  return rd_proto_is_udp(c->proto) ? c->s->cfg->udp_idle_timeout_ms : c->s->cfg->idle_timeout_ms;
}

rd_conn *rd_conn_new(rd_session *s, int64_t id, const char *proto, size_t proto_len,
                     const char *address, size_t address_len) {
  if (s->conns.count >= s->cfg->max_connections)
    return NULL;
  rd_conn *c = rd_calloc(1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->proto = rd_malloc(proto_len + address_len + 2);
  if (c->proto == NULL) {
    rd_free(c);
    return NULL;
  }
  memcpy(c->proto, proto, proto_len);
  c->proto[proto_len] = '\0';
  memcpy(c->proto + proto_len + 1, address, address_len);
  c->proto[proto_len + 1 + address_len] = '\0';
  c->id = id;
  c->refs = 1;
  c->created = c->last_activity = rd_now();
  c->state = CONN_CONNECTING;
  if (rd_map_insert(&s->conns, &c->node, rd_hash_u64((uint64_t)id)) != RD_OK) {
    conn_unref(c);
    return NULL;
  }
  c->s = s;
  s->connecting++;
  const char *labels[3] = {s->client_key, c->proto, rd_conn_address(c)};
  s->stats.conns_added++;
  rd_metrics_add(s->metrics, RD_M_ADD_CONNECTIONS, labels, 1);
  rd_metrics_add(s->metrics, RD_M_OPEN_CONNECTIONS, labels, 1);
  rd_engine_counts_add(0, 1, 0);
  if (default_idle_ms(c) > 0)
    rd_conn_set_idle_timeout(c, 0);
  return c;
}

rd_conn *rd_conn_find(rd_session *s, int64_t id) {
  for (rd_map_node *n = rd_map_find(&s->conns, rd_hash_u64((uint64_t)id)); n != NULL;
       n = rd_map_next_same(n)) {
    rd_conn *c = (rd_conn *)n;
    if (c->id == id)
      return c;
  }
  return NULL;
}

/* Tells the session's owner that c failed before carrying data (see
 * rd_session_owner.on_conn_failed); c has not ended yet. */
static void conn_failed(rd_conn *c, const char *err, int far) {
  rd_session *s = c->s;
  if (s->ops->on_conn_failed != NULL && err != NULL)
    s->ops->on_conn_failed(s, s->owner, c, err, far);
}

/* The local end failed inside a send: stop using it and end at the next
 * reap, so the sender need not look back. */
static void conn_fail(rd_conn *c, const char *what, int status) {
  if (c->failed || c->state == CONN_ENDED)
    return;
  c->failed = 1;
  c->local_broken = 1;
  c->fail_what = what;
  c->fail_status = status;
  if (local_io(c) != NULL)
    rd_io_read_stop(local_io(c));
  c->refs++;
  rd_session_reap_later(c->s, c);
}

rd_conn **rd_conn_reap_link(rd_conn *c) { return &c->reap_next; }

/* "what: reason" for a failed read or write of the local end; Go's
 * "read udp 127.0.0.1:5->127.0.0.1:6: read: connection refused" for a UDP
 * socket, as the Go agent reports it. */
static void local_error_text(rd_conn *c, char *err, size_t len, const char *what, int status) {
  rd_io *io = local_io(c);
  if (io != NULL && rd_io_is_dgram(io) &&
      rd_dial_op_error(err, len, what, c->proto, rd_io_fileno(io), status))
    return;
  snprintf(err, len, "%s: %s", what, rd_strerror(status));
}

/* Ends c because its local end failed: "what: reason" (or what alone for
 * status 0) goes to the far side. */
static void end_local_failed(rd_conn *c, const char *what, int status) {
  char err[160];
  if (status != 0)
    local_error_text(c, err, sizeof err, what, status);
  else
    snprintf(err, sizeof err, "%s", what);
  c->local_broken = 1;
  rd_conn_end(c, err, 1);
}

void rd_conn_reap(rd_conn *c) {
  end_local_failed(c, c->fail_what, c->fail_status);
  conn_unref(c);
}

/* ---- toward the local end ---- */

static void local_closed_cb(rd_io *io) { conn_unref(rd_io_data(io)); }

static void local_shutdown_cb(rd_io *io, int status) {
  (void)status;
  rd_io_close(io, local_closed_cb);
}

/* After a PAUSE of ours: RESUME once what waits toward the local end is
 * under max_buffer / 8. Checked wherever that amount falls: a write that
 * completes, and the attach that hands over what came while connecting
 * (the socket may take it all at once, and then no write completes). */
static void resume_if_drained(rd_conn *c) {
  if (c->we_paused && !c->failed && c->pending < c->s->cfg->max_buffer / 8) {
    c->we_paused = 0;
    rd_session_send_msg(c->s, RD_MSG_RESUME, c->id, NULL, 0);
  }
}

static void local_write_cb(uv_write_t *req, int status) {
  rd_wreq *w = (rd_wreq *)req;
  rd_conn *c = w->owner;
  pending_sub(c, w->charge);
  rd_block_unref(w->block);
  rd_wreq_put(w);
  if (c->state == CONN_ENDED)
    return;
  if (status < 0) {
    end_local_failed(c, "write", status);
    return;
  }
  resume_if_drained(c);
}

/* Queues b (this connection's own; the reference passes) for the local
 * stream behind what is queued already. */
static void local_queue(rd_conn *c, rd_block *b, uint8_t *data, size_t len) {
  rd_wreq *w = rd_wreq_get();
  if (w == NULL) {
    rd_block_unref(b);
    conn_fail(c, "out of memory", 0);
    return;
  }
  w->block = b;
  w->owner = c;
  w->len = len;
  w->charge = block_charge(b, sizeof *w);
  pending_add(c, w->charge);
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
  int rc = rd_io_write(local_io(c), &w->req, &buf, 1, local_write_cb);
  if (rc != 0) {
    pending_sub(c, w->charge);
    rd_block_unref(b);
    rd_wreq_put(w);
    conn_fail(c, "write", rc);
  }
}

/* Writes what the local socket takes now; returns how much, or -1 after a
 * failure (then the connection is on its way to end). */
static ssize_t local_try(rd_conn *c, const uint8_t *data, size_t len) {
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
  ssize_t sent = rd_io_try_write(local_io(c), &buf, 1);
  if (sent < 0) {
    conn_fail(c, "write", (int)sent);
    return -1;
  }
  return sent;
}

/* Bytes that are not ours (inside a session read block): what the socket
 * does not take at once is copied. */
static void local_write_copy(rd_conn *c, const uint8_t *data, size_t len) {
  if (c->failed)
    return;
  ssize_t sent = local_try(c, data, len);
  if (sent < 0 || (size_t)sent == len)
    return;
  rd_block *b = block_copy(data + sent, len - (size_t)sent);
  if (b == NULL) {
    conn_fail(c, "out of memory", 0);
    return;
  }
  local_queue(c, b, rd_block_payload(b), len - (size_t)sent);
}

/* Bytes in a block of our own (the reference passes): queued as they are. */
static void local_write_owned(rd_conn *c, rd_block *b, uint8_t *data, size_t len) {
  ssize_t sent = c->failed ? -1 : local_try(c, data, len);
  if (sent < 0 || (size_t)sent == len) {
    rd_block_unref(b);
    return;
  }
  local_queue(c, b, data + sent, len - (size_t)sent);
}

/* ---- toward the far side ---- */

/* Sends what was held back while paused, as DATA, in order. */
static void held_send(rd_conn *c) {
  slice *it;
  while ((it = slice_pop(&c->held)) != NULL) {
    c->held_bytes -= it->len;
    /* Each slice fills its block from the payload start: send it in place. */
    rd_session_send_block(c->s, RD_MSG_DATA, c->id, it->block, it->len);
    rd_free(it);
  }
}

static void slices_free(rd_conn *c, slice_list *l, int charged) {
  slice *it;
  while ((it = slice_pop(l)) != NULL) {
    if (charged)
      pending_sub(c, it->charge);
    rd_block_unref(it->block);
    rd_free(it);
  }
}

static void local_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)io;
  (void)suggested;
  rd_block *b = rd_block_get(RD_BLOCK_SIZE);
  if (b == NULL) {
    *buf = uv_buf_init(NULL, 0); /* libuv reports UV_ENOBUFS */
    return;
  }
  *buf = uv_buf_init((char *)rd_block_payload(b), RD_BLOCK_SIZE);
}

static void local_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  rd_conn *c = rd_io_data(io);
  rd_block *b = buf->base != NULL ? rd_block_of_payload(buf->base) : NULL;
  if (nread > 0 && c->state == CONN_OPEN && !c->failed) {
    c->tx_bytes += (uint64_t)nread;
    c->last_activity = rd_now();
    /* A small read would pin a whole pooled block while it waits in the
     * session's write queue: copy it out and recycle the block, so queued
     * bytes never pin more than four times their size. */
    if ((size_t)nread <= RD_BLOCK_SIZE / 4) {
      rd_block *small = block_copy((uint8_t *)buf->base, (size_t)nread);
      rd_block_unref(b);
      if (small == NULL) {
        rd_conn_end(c, "out of memory", 1);
        return;
      }
      b = small;
    }
    if (c->peer_paused) {
      /* Hold it; rd_conn_update_reading stops reading at max_buffer held. */
      if (slice_push(&c->held, b, rd_block_payload(b), (size_t)nread, NULL) != RD_OK) {
        rd_conn_end(c, "out of memory", 1);
        return;
      }
      c->held_bytes += (size_t)nread;
      rd_conn_update_reading(c);
      return;
    }
    rd_session_send_block(c->s, RD_MSG_DATA, c->id, b, (size_t)nread);
    return;
  }
  if (b != NULL)
    rd_block_unref(b);
  if (nread == 0 || c->state != CONN_OPEN || c->failed)
    return;
  if (nread == UV_EOF) {
    rd_conn_end(c, NULL, 1);
  } else {
    char err[160];
    if (nread == RD_ETLS)
      snprintf(err, sizeof err, "read: %s", rd_io_error(io));
    else
      local_error_text(c, err, sizeof err, "read", (int)nread);
    c->local_broken = 1;
    rd_conn_end(c, err, 1);
  }
}

/* A splice end's "local reading" is its mate's far side: paused while this
 * side cannot take more (its far side paused it, or its session's queue is
 * full). */
static void splice_update(rd_conn *c) {
  rd_conn *m = mate_of(c);
  int stop = c->peer_paused || c->s->write_blocked;
  if (stop != (int)m->we_paused) {
    m->we_paused = (unsigned)stop;
    rd_session_send_msg(m->s, stop ? RD_MSG_PAUSE : RD_MSG_RESUME, m->id, NULL, 0);
  }
}

/* Reading goes on while paused until max_buffer bytes are held back: far
 * enough to notice a local end that closes with its socket buffers full
 * (PAUSE may never be followed by RESUME), bounded so PAUSE still bounds
 * memory. A full session write queue stops reading outright (and keeps
 * held bytes held): that queue drains or the session dies. */
void rd_conn_update_reading(rd_conn *c) {
  if (c->state != CONN_OPEN || c->failed)
    return;
  if (mate_of(c) != NULL) {
    splice_update(c);
    return;
  }
  rd_io *io = local_io(c);
  if (io == NULL)
    return;
  if (!c->peer_paused && !c->s->write_blocked && c->held.head != NULL)
    held_send(c);
  if (c->s->write_blocked ||
      (c->peer_paused && !c->local_gone && c->held_bytes >= c->s->cfg->max_buffer))
    rd_io_read_stop(io);
  else
    rd_io_read_start(io, local_alloc_cb, local_read_cb);
}

/* ---- from the far side ---- */

void rd_conn_on_data(rd_conn *c, const uint8_t *data, size_t len) {
  rd_session *s = c->s;
  c->rx_bytes += len;
  s->stats.rx_bytes += len;
  const char *labels[1] = {s->client_key};
  rd_metrics_add(s->metrics, RD_M_RECEIVE_BYTES, labels, (double)len);
  if (len == 0 || c->failed)
    return;
  c->last_activity = rd_now();
  c->got_data = 1;
  rd_conn *mate = mate_of(c);
  if (mate != NULL) {
    mate->tx_bytes += len;
    mate->last_activity = c->last_activity;
    rd_session_send_msg(mate->s, RD_MSG_DATA, mate->id, data, len);
    return;
  }
  if (c->state == CONN_OPEN) {
    local_write_copy(c, data, len);
  } else {
    rd_block *b = block_copy(data, len);
    size_t charge;
    if (b == NULL || slice_push(&c->backlog, b, rd_block_payload(b), len, &charge) != RD_OK) {
      rd_conn_end(c, "out of memory", 1);
      return;
    }
    pending_add(c, charge);
  }
  if (c->pending > s->cfg->hard_cap) {
    rd_conn_end(c, "buffer limit exceeded", 1);
    return;
  }
  if (!c->we_paused && c->pending > s->cfg->max_buffer) {
    c->we_paused = 1;
    rd_session_send_msg(s, RD_MSG_PAUSE, c->id, NULL, 0);
  }
}

void rd_conn_on_error(rd_conn *c, const char *text, size_t len) {
  char err[RD_MSG_ERROR_LIMIT + 1];
  if (len > RD_MSG_ERROR_LIMIT)
    len = RD_MSG_ERROR_LIMIT;
  memcpy(err, text, len);
  err[len] = '\0';
  int eof = strcmp(err, "EOF") == 0;
  if (eof && c->state == CONN_CONNECTING && c->backlog.head != NULL) {
    c->far_eof = 1; /* ended by the attach or splice that delivers the backlog */
    return;
  }
  if (!eof && !c->got_data)
    conn_failed(c, err, 1);
  rd_conn_end(c, eof ? NULL : err, 0);
}

void rd_conn_on_pause(rd_conn *c, int paused) {
  if ((int)c->peer_paused == paused)
    return;
  c->peer_paused = (unsigned)paused;
  if (paused)
    c->s->paused++;
  else
    c->s->paused--;
  rd_conn_update_reading(c);
}

/* ---- ending ---- */

static void deadline_closed_cb(uv_handle_t *h) {
  rd_conn *c = h->data;
  rd_free(h);
  conn_unref(c);
}

static void write_http_error(rd_conn *c, const char *err) {
  char head[160];
  size_t elen = strlen(err);
  size_t hlen = rd_http_error_head(head, sizeof head, elen);
  rd_block *b = rd_block_get_small(hlen + elen);
  if (b == NULL)
    return;
  memcpy(rd_block_payload(b), head, hlen);
  memcpy(rd_block_payload(b) + hlen, err, elen);
  local_write_owned(c, b, rd_block_payload(b), hlen + elen);
}

/* Closes the local stream: after what is queued when the end is clean, at
 * once when it is an error (the far side's bytes are as good as lost). */
static void local_close(rd_conn *c, const char *err, int was_open) {
  rd_io *local = local_io(c);
  rd_io_read_stop(local);
  int flush = !c->local_broken && was_open;
  if (flush && err != NULL && c->http_errors && !c->got_data)
    write_http_error(c, err);
  else if (err != NULL)
    flush = 0;
  if (!flush || rd_io_shutdown(local, local_shutdown_cb) != 0)
    rd_io_close(local, local_closed_cb);
}

/* The one place a connection ends. Paths that lead here: the local end's EOF,
 * read or write error (either side); ERROR from the far side (clean EOF or a
 * dial failure); a refused CONNECT; a failed or cancelled local dial; the
 * session ending (peer gone, ping deadline, protocol error, owner closed);
 * SYNC finding it stale; the buffer hard cap; a deadline timer; a duplicate
 * id; its splice mate ending. It unregisters the connection, counts it
 * removed, tells the far side when send_error is set (err NULL means a clean
 * EOF), publishes the error to a Python socket, and closes the local end (or
 * ends the mate with the same error). Idempotent. */
void rd_conn_end(rd_conn *c, const char *err, int send_error) {
  if (c->state == CONN_ENDED)
    return;
  int was_open = c->state == CONN_OPEN;
  rd_session *s = c->s;
  if (!was_open)
    s->connecting--;
  c->state = CONN_ENDED;
  rd_map_remove(&s->conns, &c->node);
  if (c->idle_ms > 0)
    s->idle_watched--;
  if (c->peer_paused)
    s->paused--;
  const char *labels[3] = {s->client_key, c->proto, rd_conn_address(c)};
  s->stats.conns_removed++;
  rd_metrics_add(s->metrics, RD_M_REMOVE_CONNECTIONS, labels, 1);
  rd_metrics_add(s->metrics, RD_M_OPEN_CONNECTIONS, labels, -1);
  rd_engine_counts_add(0, -1, 0);
  if (send_error && !c->far_eof && rd_session_can_send(s)) {
    held_send(c); /* bytes read before the end go first, PAUSE or not */
    const char *text = err != NULL ? err : "EOF";
    size_t len = strlen(text);
    rd_session_send_msg(s, RD_MSG_ERROR, c->id, text,
                        len > RD_MSG_ERROR_LIMIT ? RD_MSG_ERROR_LIMIT : len);
  }
  slices_free(c, &c->held, 0);
  c->held_bytes = 0;
  if (c->status != NULL) {
    if (err != NULL)
      snprintf(c->status->error, sizeof c->status->error, "%s", err);
    atomic_store(&c->status->ended, 1);
  }
  if (c->owner_slot != NULL) {
    ((rd_request *)c->owner_slot)->target = NULL;
    c->owner_slot = NULL;
  }
  if (dial_of(c) != NULL)
    rd_dial_cancel(dial_of(c));
  if (c->deadline != NULL) {
    uv_close((uv_handle_t *)c->deadline, deadline_closed_cb);
    c->deadline = NULL;
  }
  slices_free(c, &c->backlog, 1);
  if (local_io(c) != NULL)
    local_close(c, err, was_open);
  rd_conn *mate = mate_of(c);
  c->s = NULL;
  if (mate != NULL) {
    c->end_kind = mate->end_kind = END_NONE;
    rd_conn_end(mate, err, 1);
  }
  conn_unref(c);
}

void rd_conn_close(rd_conn *c, const char *err) { rd_conn_end(c, err, 1); }

/* ---- attaching a local end ---- */

static int attachable(rd_conn *c) {
  return c->state == CONN_CONNECTING && c->end_kind == END_NONE;
}

static void conn_open(rd_conn *c) {
  c->s->connecting--;
  c->state = CONN_OPEN;
  if (c->dial_deadline && c->deadline != NULL) {
    uv_close((uv_handle_t *)c->deadline, deadline_closed_cb);
    c->deadline = NULL;
  }
}

int rd_conn_attach_io(rd_conn *c, rd_io *io) {
  if (!attachable(c)) {
    rd_io_close(io, NULL);
    return c->state == CONN_ENDED ? RD_ECLOSED : RD_EINVAL;
  }
  c->end_kind = END_IO;
  c->end.io = io;
  rd_io_set_data(io, c);
  c->refs++;
  conn_open(c);
  slice *it;
  while ((it = slice_pop(&c->backlog)) != NULL) {
    pending_sub(c, it->charge);
    local_write_owned(c, it->block, it->data, it->len);
    rd_free(it);
  }
  if (c->far_eof) { /* the backlog was all there is: flushed, then closed */
    rd_conn_end(c, NULL, 0);
    return RD_OK;
  }
  resume_if_drained(c);
  rd_conn_update_reading(c);
  return RD_OK;
}

static void stream_free_cb(uv_handle_t *h) { rd_free(h); }

/* An initialised stream around fd (a TCP or unix stream socket), or NULL
 * with *rc set (fd is then still the caller's). */
static uv_stream_t *fd_stream(int fd, int *rc) {
  /* libuv calls a pipe(2) or FIFO a "named pipe" too: ask the kernel. */
  int type = 0;
  socklen_t len = sizeof type;
  uv_handle_type kind = uv_guess_handle(fd);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM ||
      (kind != UV_TCP && kind != UV_NAMED_PIPE)) {
    *rc = UV_ENOTSOCK;
    return NULL;
  }
  uv_stream_t *stream = rd_malloc(kind == UV_TCP ? sizeof(uv_tcp_t) : sizeof(uv_pipe_t));
  if (stream == NULL) {
    *rc = UV_ENOMEM;
    return NULL;
  }
  if (kind == UV_TCP) {
    uv_tcp_init(rd_loop(), (uv_tcp_t *)stream);
    *rc = uv_tcp_open((uv_tcp_t *)stream, fd);
  } else {
    uv_pipe_init(rd_loop(), (uv_pipe_t *)stream, 0);
    *rc = uv_pipe_open((uv_pipe_t *)stream, fd);
  }
  if (*rc != 0) {
    uv_close((uv_handle_t *)stream, stream_free_cb);
    return NULL;
  }
  return stream;
}

int rd_conn_attach_fd(rd_conn *c, int fd) {
  if (!attachable(c)) {
    close(fd);
    return c->state == CONN_ENDED ? RD_ECLOSED : RD_EINVAL;
  }
  if (rd_fd_is_dgram(fd)) { /* one record per read and per write */
    rd_io *dio = rd_io_new_dgram(rd_loop(), fd);
    if (dio == NULL) {
      rd_conn_end(c, "out of memory", 1);
      return RD_ENOMEM;
    }
    return rd_conn_attach_io(c, dio);
  }
  int rc;
  uv_stream_t *stream = fd_stream(fd, &rc);
  if (stream == NULL) {
    char err[96];
    snprintf(err, sizeof err, "attach: %s", rd_strerror(rc));
    close(fd);
    rd_conn_end(c, err, 1);
    return rc;
  }
  rd_io *io = rd_io_new(stream, NULL);
  if (io == NULL) {
    rd_conn_end(c, "out of memory", 1);
    return RD_ENOMEM;
  }
  return rd_conn_attach_io(c, io);
}

/* What one side heard before the splice goes to the other side now (each
 * backlog slice starts at its block's payload, so it goes out in place). */
static void splice_flush_backlog(rd_conn *c) {
  slice *it;
  while ((it = slice_pop(&c->backlog)) != NULL) {
    pending_sub(c, it->charge);
    rd_conn *mate = mate_of(c);
    mate->tx_bytes += it->len;
    rd_session_send_block(mate->s, RD_MSG_DATA, mate->id, it->block, it->len);
    rd_free(it);
  }
}

int rd_conn_splice(rd_conn *a, rd_conn *b) {
  if (a == b || !attachable(a) || !attachable(b) || a->s == b->s)
    return RD_EINVAL;
  a->end_kind = b->end_kind = END_MATE;
  a->end.mate = b;
  b->end.mate = a;
  conn_open(a);
  conn_open(b);
  splice_flush_backlog(a);
  splice_flush_backlog(b);
  /* A side whose far side already ended: its mate has the bytes now and
   * ends with the same clean EOF. */
  if (a->far_eof || b->far_eof) {
    rd_conn_end(a->far_eof ? a : b, NULL, 0);
    return RD_OK;
  }
  /* From here each side's PAUSE state follows the other side's room. */
  rd_conn_update_reading(a);
  rd_conn_update_reading(b);
  return RD_OK;
}

/* ---- local dials ---- */

static void conn_dial_cb(void *ctx, int status, uv_stream_t *stream, int fd,
                         const char *error) {
  rd_conn *c = ctx;
  c->end_kind = END_NONE;
  if (c->state == CONN_ENDED) {
    if (stream != NULL)
      uv_close((uv_handle_t *)stream, stream_free_cb);
    if (fd >= 0)
      close(fd);
  } else if (status < 0) {
    conn_failed(c, error, 0);
    rd_conn_end(c, error, 1);
  } else {
    rd_io *io = stream != NULL ? rd_io_new(stream, NULL) : rd_io_new_dgram(rd_loop(), fd);
    if (io == NULL)
      rd_conn_end(c, "out of memory", 1);
    else
      rd_conn_attach_io(c, io);
  }
  conn_unref(c);
}

void rd_conn_dial_local(rd_conn *c) {
  if (!attachable(c))
    return;
  int status = 0;
  char err[160];
  c->refs++;
  c->end.dial = rd_dial_start(rd_loop(), c->proto, rd_conn_address(c),
                              c->s->cfg->dial_timeout_ms, conn_dial_cb, c, &status, err, sizeof err);
  if (c->end.dial != NULL)
    c->end_kind = END_DIAL;
  else {
    c->refs--;
    conn_failed(c, err, 0);
    rd_conn_end(c, err, 1);
  }
}

void rd_conn_refuse(rd_conn *c, const char *reason) {
  if (c->state == CONN_CONNECTING) {
    conn_failed(c, reason, 0);
    rd_conn_end(c, reason, 1);
  }
}

/* ---- timers and facts ---- */

const char *rd_conn_proto(const rd_conn *c) { return c->proto; }
const char *rd_conn_address(const rd_conn *c) { return c->proto + strlen(c->proto) + 1; }
int64_t rd_conn_id(const rd_conn *c) { return c->id; }
void **rd_conn_owner_slot(rd_conn *c) { return &c->owner_slot; }
void rd_conn_set_http_errors(rd_conn *c) { c->http_errors = 1; }
void rd_conn_set_pooled(rd_conn *c, int pooled) { c->pooled = pooled != 0; }
uint64_t rd_conn_age_ms(const rd_conn *c) { return rd_now() - c->created; }

static void deadline_cb(uv_timer_t *t) {
  rd_conn *c = t->data;
  if (!c->dial_deadline) {
    rd_conn_end(c, "i/o timeout", 1);
    return;
  }
  char err[320];
  snprintf(err, sizeof err, "dial %s %s: i/o timeout", c->proto, rd_conn_address(c));
  rd_conn_end(c, err, 1);
}

int rd_conn_set_dial_deadline(rd_conn *c, uint64_t timeout_ms) {
  if (timeout_ms == 0 || c->state != CONN_CONNECTING || c->deadline != NULL)
    return RD_OK;
  c->dial_deadline = 1;
  return rd_conn_set_deadline(c, timeout_ms);
}

int rd_conn_set_deadline(rd_conn *c, uint64_t timeout_ms) {
  if (timeout_ms == 0 || c->state == CONN_ENDED || c->deadline != NULL)
    return RD_OK;
  uv_timer_t *t = rd_malloc(sizeof *t);
  if (t == NULL)
    return RD_ENOMEM;
  uv_timer_init(rd_loop(), t);
  t->data = c;
  c->refs++;
  c->deadline = t;
  uv_timer_start(t, deadline_cb, timeout_ms, 0);
  return RD_OK;
}

void rd_conn_set_idle_timeout(rd_conn *c, uint64_t timeout_ms) {
  if (c->state == CONN_ENDED)
    return;
  rd_session *s = c->s;
  if (timeout_ms == 0)
    timeout_ms = default_idle_ms(c);
  if (c->idle_ms == 0 && timeout_ms > 0)
    s->idle_watched++;
  else if (c->idle_ms > 0 && timeout_ms == 0)
    s->idle_watched--;
  c->idle_ms = timeout_ms > UINT32_MAX ? UINT32_MAX : (uint32_t)timeout_ms; /* ~49 days */
  if (timeout_ms > 0)
    rd_session_retune_tick(s, timeout_ms);
}

/* A paused connection that stopped reading cannot see its local end close
 * by reading. rd_io_peer_done tells it without a read (for a socket, the
 * kernel's RDHUP once the peer has closed or shut down its writing side,
 * even with bytes still queued). Then what is left to read is finite, so
 * reading resumes (no cap) to EOF and the connection ends with every byte
 * delivered. */
static void check_paused_local(rd_conn *c) {
  if (!c->peer_paused || c->local_gone || local_io(c) == NULL || c->state != CONN_OPEN)
    return;
  if (rd_io_peer_done(local_io(c))) {
    c->local_gone = 1;
    rd_conn_update_reading(c);
  }
}

void rd_conn_tick(rd_conn *c, uint64_t now) {
  if (c->idle_ms > 0 && now - c->last_activity >= c->idle_ms) {
    rd_conn_end(c, "idle timeout", 1);
    return;
  }
  check_paused_local(c);
}

void rd_conn_fill_info(const rd_conn *c, rd_conn_info *info) {
  uint64_t now = rd_now();
  *info = (rd_conn_info){
      .id = c->id,
      .proto = c->proto,
      .address = rd_conn_address(c),
      .age = (double)(now - c->created) / 1000.0,
      .idle = (double)(now - c->last_activity) / 1000.0,
      .state = c->state != CONN_OPEN ? "connecting" : c->pooled ? "idle" : "open",
      .tx_bytes = c->tx_bytes,
      .rx_bytes = c->rx_bytes,
      .paused = c->peer_paused || c->we_paused,
      .buffered = c->pending,
  };
}

void rd_conn_set_status(rd_conn *c, rd_dial_status *status) { c->status = status; }

void rd_conn_send(rd_conn *c, const uint8_t *data, size_t len) {
  c->tx_bytes += len;
  rd_session_send_msg(c->s, RD_MSG_DATA, c->id, data, len);
}
