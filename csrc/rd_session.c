/* Sessions and the connections inside them.
 *
 * Ownership: a session owns its stream, its timer and its connections; it is
 * freed when both handles have closed. A connection holds references for
 * being alive (dropped when it ends), for its local stream (dropped in the
 * stream's close callback) and for a local dial in flight (dropped in the
 * dial callback); it is freed when the last goes. It ends in exactly one
 * function, conn_end, whatever ends it. */
#define _GNU_SOURCE 1 /* POLLRDHUP */
#include "rd_session.h"

#include <fnmatch.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_dialer.h"
#include "rd_http.h"
#include "rd_io.h"
#include "rd_loop.h"
#include "rd_map.h"
#include "rd_msg.h"
#include "rd_ws.h"

enum { CONN_CONNECTING, CONN_OPEN, CONN_ENDED };

typedef struct backlog_item {
  struct backlog_item *next;
  rd_block *block;
  uint8_t *data;
  size_t len;
} backlog_item;

struct rd_conn {
  rd_map_node node; /* in the session's table, while registered */
  int64_t id;
  rd_session *s; /* NULL once ended */
  rd_io *local;
  rd_dial *dial;
  rd_dial_status *status;
  void *owner_slot;
  char *proto; /* "proto\0address\0" in one block */
  char *address;
  int state;
  int refs;
  unsigned peer_paused : 1, we_paused : 1, http_errors : 1, got_data : 1, local_broken : 1;
  unsigned local_gone : 1; /* the local peer closed while we were paused */
  size_t pending; /* bytes queued toward the local end */
  backlog_item *bl_head, *bl_tail;
  /* Read from the local end while the far side has us paused: held back so
   * reading can go on far enough to see the local end close. */
  backlog_item *held_head, *held_tail;
  size_t held;
  uint64_t tx_bytes, rx_bytes;
  uint64_t created;
  uint64_t last_activity;
  uint64_t idle_ms; /* 0: none */
  uv_timer_t *deadline;
};

struct rd_session {
  rd_io *io;
  uv_timer_t tick;
  int role;
  int peer;
  char *client_key;
  int64_t session_key;
  rd_metrics *metrics;
  rd_session_config cfg;
  rd_session_owner ops;
  void *owner;
  rd_ws_reader reader;
  rd_block *rblock;
  size_t rstart, rend;
  rd_map conns;
  int64_t next_conn_id;
  int64_t next_msg_id;
  uint64_t last_rx, last_ping, last_sync;
  int ended;
  int ending; /* inside rd_session_end: a failed write there must not re-enter */
  int handles_open;
  int write_blocked;
  uint64_t tick_ms;     /* current tick period */
  size_t connecting;    /* connections not yet attached to a local end */
  size_t paused;        /* connections the far side has paused */
  size_t idle_watched;  /* connections with an idle timeout */
};

/* Write requests come from a free list: one per frame or local write. */
typedef struct wreq {
  uv_write_t req;
  struct wreq *next_free;
  rd_block *block;
  rd_conn *conn; /* local writes */
  size_t len;
} wreq;

static wreq *wreq_free_list;
static int wreq_free_count;

static wreq *wreq_get(void) {
  wreq *w = wreq_free_list;
  if (w != NULL) {
    wreq_free_list = w->next_free;
    wreq_free_count--;
    return w;
  }
  return rd_malloc(sizeof *w);
}

static void wreq_put(wreq *w) {
  if (wreq_free_count >= 1024) {
    rd_free(w);
    return;
  }
  w->next_free = wreq_free_list;
  wreq_free_list = w;
  wreq_free_count++;
}

void rd_session_trim_pools(void) {
  while (wreq_free_list != NULL) {
    wreq *w = wreq_free_list;
    wreq_free_list = w->next_free;
    rd_free(w);
  }
  wreq_free_count = 0;
}

void rd_session_config_default(rd_session_config *cfg) {
  cfg->read_timeout_ms = 60000;
  cfg->ping_interval_ms = 5000;
  cfg->sync_interval_ms = 60000;
  cfg->sync_grace_ms = 60000;
  cfg->max_message = 1u << 24;
  cfg->max_buffer = 1u << 21;
  cfg->hard_cap = 1u << 26;
  cfg->write_high = 1u << 22;
  cfg->dial_timeout_ms = 60000;
  cfg->idle_timeout_ms = 0;
  cfg->max_connections = 65536;
  cfg->max_pending_dials = 1024;
}

static void conn_end(rd_conn *c, const char *err, int send_error);
static void conn_update_reading(rd_conn *c);
static void session_send_msg(rd_session *s, int type, int64_t conn_id, const void *payload,
                             size_t len);

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

/* ---- writing frames ---- */

static void session_block_writes(rd_session *s, int blocked);

static void session_write_cb(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  rd_session *s = req->data;
  rd_engine_tunnel_queued_add(-(int64_t)w->len);
  rd_block_unref(w->block);
  wreq_put(w);
  if (status < 0 && status != UV_ECANCELED) {
    rd_session_end(s, 0, "write failed");
    return;
  }
  if (s->write_blocked && !s->ended && rd_io_write_queue_size(s->io) <= s->cfg.write_high / 4)
    session_block_writes(s, 0);
}

/* Sends one WebSocket frame whose payload sits at p[0..len) inside block b,
 * with at least RD_WS_HEADER_MAX bytes of b before p. Takes b's reference. */
static void session_write_frame(rd_session *s, int opcode, rd_block *b, uint8_t *p, size_t len) {
  if (s->ended) {
    rd_block_unref(b);
    return;
  }
  uint8_t hdr[RD_WS_HEADER_MAX];
  uint8_t mask[4];
  size_t hlen;
  if (s->role == RD_ROLE_CLIENT) {
    rd_ws_random_mask(mask);
    rd_ws_mask(p, len, mask, 0);
    hlen = rd_ws_build_header(hdr, 1, opcode, len, mask);
  } else {
    hlen = rd_ws_build_header(hdr, 1, opcode, len, NULL);
  }
  memcpy(p - hlen, hdr, hlen);
  /* What the socket takes at once needs no request and frees b now. */
  uv_buf_t buf = uv_buf_init((char *)(p - hlen), (unsigned)(hlen + len));
  ssize_t sent = rd_io_try_write(s->io, &buf, 1);
  if (sent < 0 || (size_t)sent == buf.len) {
    rd_block_unref(b);
    if (sent < 0)
      rd_session_end(s, 0, "write failed");
    return;
  }
  buf.base += sent;
  buf.len -= (size_t)sent;
  wreq *w = wreq_get();
  if (w == NULL) {
    rd_block_unref(b);
    rd_session_end(s, 0, "out of memory");
    return;
  }
  w->block = b;
  w->conn = NULL;
  w->len = buf.len;
  w->req.data = s;
  int rc = rd_io_write(s->io, &w->req, &buf, 1, session_write_cb);
  if (rc != 0) {
    rd_block_unref(b);
    wreq_put(w);
    rd_session_end(s, 0, "write failed");
    return;
  }
  rd_engine_tunnel_queued_add((int64_t)w->len);
  if (!s->write_blocked && rd_io_write_queue_size(s->io) > s->cfg.write_high)
    session_block_writes(s, 1);
}

/* Sends a tunnel message whose payload is at rd_block_payload(b). */
static void session_send_block(rd_session *s, int type, int64_t conn_id, rd_block *b,
                               size_t len) {
  uint8_t hdr[RD_MSG_HEADER_MAX];
  size_t hlen = rd_msg_encode_header(hdr, s->next_msg_id++, conn_id, type);
  uint8_t *p = rd_block_payload(b) - hlen;
  memcpy(p, hdr, hlen);
  const char *labels[1] = {s->client_key};
  if (type == RD_MSG_DATA)
    rd_metrics_add(s->metrics, RD_M_TRANSMIT_BYTES, labels, (double)(hlen + len));
  else if (type == RD_MSG_ERROR)
    rd_metrics_add(s->metrics, RD_M_TRANSMIT_ERR_BYTES, labels, (double)(hlen + len));
  session_write_frame(s, RD_WS_BINARY, b, p, hlen + len);
}

static rd_block *block_with(const void *payload, size_t len) {
  rd_block *b = rd_block_get_small(len);
  if (b != NULL && len > 0)
    memcpy(rd_block_payload(b), payload, len);
  return b;
}

/* A copy of payload in a small block, for sending; NULL (and the session
 * ended) when out of memory or the session has ended. */
static rd_block *session_block_with(rd_session *s, const void *payload, size_t len) {
  if (s->ended)
    return NULL;
  rd_block *b = block_with(payload, len);
  if (b == NULL)
    rd_session_end(s, 0, "out of memory");
  return b;
}

static void session_send_msg(rd_session *s, int type, int64_t conn_id, const void *payload,
                             size_t len) {
  rd_block *b = session_block_with(s, payload, len);
  if (b != NULL)
    session_send_block(s, type, conn_id, b, len);
}

static void session_send_control(rd_session *s, int opcode, const void *payload, size_t len) {
  rd_block *b = session_block_with(s, payload, len);
  if (b != NULL)
    session_write_frame(s, opcode, b, rd_block_payload(b), len);
}

/* ---- connections ---- */

static void conn_unref(rd_conn *c) {
  if (--c->refs > 0)
    return;
  rd_dial_status_unref(c->status);
  rd_free(c->proto);
  rd_free(c);
}

static void conn_deadline_closed_cb(uv_handle_t *h) {
  rd_conn *c = h->data;
  rd_free(h);
  conn_unref(c);
}

static rd_conn *conn_new(rd_session *s, int64_t id, const char *proto, size_t proto_len,
                         const char *address, size_t address_len) {
  if (s->conns.count >= s->cfg.max_connections)
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
  c->address = c->proto + proto_len + 1;
  memcpy(c->address, address, address_len);
  c->address[address_len] = '\0';
  c->id = id;
  c->s = s;
  c->refs = 1;
  c->created = c->last_activity = rd_now();
  c->state = CONN_CONNECTING;
  s->connecting++;
  if (rd_map_insert(&s->conns, &c->node, rd_hash_u64((uint64_t)id)) != RD_OK) {
    conn_unref(c);
    return NULL;
  }
  const char *labels[3] = {s->client_key, c->proto, c->address};
  rd_metrics_add(s->metrics, RD_M_ADD_CONNECTIONS, labels, 1);
  rd_metrics_add(s->metrics, RD_M_OPEN_CONNECTIONS, labels, 1);
  rd_engine_counts_add(0, 1, 0);
  return c;
}

static rd_conn *conn_find(rd_session *s, int64_t id) {
  for (rd_map_node *n = rd_map_find(&s->conns, rd_hash_u64((uint64_t)id)); n != NULL;
       n = rd_map_next_same(n)) {
    rd_conn *c = (rd_conn *)n;
    if (c->id == id)
      return c;
  }
  return NULL;
}

static void local_closed_cb(rd_io *io) { conn_unref(rd_io_data(io)); }

static void local_shutdown_cb(rd_io *io, int status) {
  (void)status;
  rd_io_close(io, local_closed_cb);
}

static void buffered_add(rd_conn *c, size_t len) {
  c->pending += len;
  rd_engine_counts_add(0, 0, (int64_t)len);
}

static void buffered_sub(rd_conn *c, size_t len) {
  c->pending -= len;
  rd_engine_counts_add(0, 0, -(int64_t)len);
}

/* The local end failed to take bytes: the connection ends with the error. */
static void conn_local_write_failed(rd_conn *c, int status) {
  char err[96];
  snprintf(err, sizeof err, "write: %s", rd_strerror(status));
  c->local_broken = 1;
  conn_end(c, err, 1);
}

static void local_write_cb(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  rd_conn *c = w->conn;
  buffered_sub(c, w->len);
  rd_block_unref(w->block);
  wreq_put(w);
  if (c->state == CONN_ENDED)
    return;
  if (status < 0) {
    conn_local_write_failed(c, status);
    return;
  }
  if (c->we_paused && c->pending < c->s->cfg.max_buffer / 8) {
    c->we_paused = 0;
    session_send_msg(c->s, RD_MSG_RESUME, c->id, NULL, 0);
  }
}

/* Sends len bytes at data (inside block b) toward the local end: what the
 * socket takes at once costs nothing more; the rest is queued holding a
 * reference to b, or, when it is small beside b, a copy, so a slow reader
 * never pins a whole read block for a few bytes. */
static void conn_write_local(rd_conn *c, rd_block *b, uint8_t *data, size_t len) {
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
  ssize_t sent = rd_io_try_write(c->local, &buf, 1);
  if (sent < 0) {
    conn_local_write_failed(c, (int)sent);
    return;
  }
  if ((size_t)sent == len)
    return;
  data += sent;
  len -= (size_t)sent;
  rd_block *keep = b;
  if (len <= rd_block_payload_cap(b) / 8) {
    if ((keep = block_with(data, len)) == NULL) {
      conn_end(c, "out of memory", 1);
      return;
    }
    data = rd_block_payload(keep);
  } else {
    rd_block_ref(b);
  }
  wreq *w = wreq_get();
  if (w == NULL) {
    rd_block_unref(keep);
    conn_end(c, "out of memory", 1);
    return;
  }
  w->block = keep;
  w->conn = c;
  w->len = len;
  buffered_add(c, len);
  buf = uv_buf_init((char *)data, (unsigned)len);
  int rc = rd_io_write(c->local, &w->req, &buf, 1, local_write_cb);
  if (rc != 0) {
    buffered_sub(c, len);
    rd_block_unref(keep);
    wreq_put(w);
    conn_local_write_failed(c, rc);
  }
}

/* Appends a slice (b gains a reference) to a list. 0 or RD_ENOMEM. */
static int slice_append(backlog_item **head, backlog_item **tail, rd_block *b, uint8_t *data,
                        size_t len) {
  backlog_item *it = rd_malloc(sizeof *it);
  if (it == NULL)
    return RD_ENOMEM;
  rd_block_ref(b);
  it->next = NULL;
  it->block = b;
  it->data = data;
  it->len = len;
  if (*tail != NULL)
    (*tail)->next = it;
  else
    *head = it;
  *tail = it;
  return RD_OK;
}

/* Sends what was held back while paused, as DATA, in order. */
static void held_send(rd_conn *c) {
  while (c->held_head != NULL) {
    backlog_item *it = c->held_head;
    c->held_head = it->next;
    c->held -= it->len;
    /* Each slice fills its block from the payload start: send it in place. */
    if (!c->s->ended)
      session_send_block(c->s, RD_MSG_DATA, c->id, it->block, it->len);
    else
      rd_block_unref(it->block);
    rd_free(it);
  }
  c->held_tail = NULL;
}

static void backlog_free(rd_conn *c) {
  while (c->bl_head != NULL) {
    backlog_item *it = c->bl_head;
    c->bl_head = it->next;
    buffered_sub(c, it->len);
    rd_block_unref(it->block);
    rd_free(it);
  }
  c->bl_tail = NULL;
}

/* DATA from the far side for c: the bytes at data[0..len) inside b. */
static void conn_on_data(rd_conn *c, rd_block *b, uint8_t *data, size_t len) {
  rd_session *s = c->s;
  c->rx_bytes += len;
  const char *labels[1] = {s->client_key};
  rd_metrics_add(s->metrics, RD_M_RECEIVE_BYTES, labels, (double)len);
  if (len == 0)
    return;
  c->last_activity = rd_now();
  c->got_data = 1;
  if (c->state == CONN_OPEN) {
    conn_write_local(c, b, data, len);
  } else {
    if (slice_append(&c->bl_head, &c->bl_tail, b, data, len) != RD_OK) {
      conn_end(c, "out of memory", 1);
      return;
    }
    buffered_add(c, len);
  }
  if (c->state == CONN_ENDED)
    return;
  if (c->pending > s->cfg.hard_cap) {
    conn_end(c, "buffer limit exceeded", 1);
    return;
  }
  if (!c->we_paused && c->pending > s->cfg.max_buffer) {
    c->we_paused = 1;
    session_send_msg(s, RD_MSG_PAUSE, c->id, NULL, 0);
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
  if (nread > 0 && c->state == CONN_OPEN) {
    rd_session *s = c->s;
    c->tx_bytes += (uint64_t)nread;
    c->last_activity = rd_now();
    /* A small read would pin a whole pooled block while it waits in the
     * session's write queue: copy it out and recycle the block, so queued
     * bytes never pin more than four times their size. */
    if ((size_t)nread <= RD_BLOCK_SIZE / 4) {
      rd_block *small = block_with(buf->base, (size_t)nread);
      rd_block_unref(b);
      if (small == NULL) {
        conn_end(c, "out of memory", 1);
        return;
      }
      b = small;
    }
    if (c->peer_paused) {
      /* Hold it; conn_update_reading stops reading at max_buffer held. */
      int rc = slice_append(&c->held_head, &c->held_tail, b, rd_block_payload(b), (size_t)nread);
      rd_block_unref(b);
      if (rc != RD_OK) {
        conn_end(c, "out of memory", 1);
        return;
      }
      c->held += (size_t)nread;
      conn_update_reading(c);
      return;
    }
    session_send_block(s, RD_MSG_DATA, c->id, b, (size_t)nread);
    return;
  }
  if (b != NULL)
    rd_block_unref(b);
  if (nread == 0 || c->state != CONN_OPEN)
    return;
  if (nread == UV_EOF) {
    conn_end(c, NULL, 1);
  } else {
    char err[160];
    snprintf(err, sizeof err, "read: %s",
             nread == RD_ETLS ? rd_io_error(io) : rd_strerror((int)nread));
    c->local_broken = 1;
    conn_end(c, err, 1);
  }
}

/* Reading goes on while paused until max_buffer bytes are held back: far
 * enough to notice a local end that closes with its socket buffers full
 * (PAUSE may never be followed by RESUME), bounded so PAUSE still bounds
 * memory. A full session write queue stops reading outright: that queue
 * drains or the session dies. */
static void conn_update_reading(rd_conn *c) {
  if (c->local == NULL || c->state != CONN_OPEN)
    return;
  if (!c->peer_paused && c->held_head != NULL) {
    held_send(c);
    if (c->state != CONN_OPEN)
      return;
  }
  if (c->s->write_blocked ||
      (c->peer_paused && !c->local_gone && c->held >= c->s->cfg.max_buffer))
    rd_io_read_stop(c->local);
  else
    rd_io_read_start(c->local, local_alloc_cb, local_read_cb);
}

static void conn_attach_local(rd_conn *c, rd_io *local) {
  c->local = local;
  rd_io_set_data(local, c);
  c->refs++;
  c->s->connecting--;
  c->state = CONN_OPEN;
  backlog_item *it = c->bl_head;
  c->bl_head = c->bl_tail = NULL;
  while (it != NULL) {
    backlog_item *next = it->next;
    buffered_sub(c, it->len);
    if (c->state == CONN_OPEN)
      conn_write_local(c, it->block, it->data, it->len);
    rd_block_unref(it->block);
    rd_free(it);
    it = next;
  }
  conn_update_reading(c);
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
  conn_write_local(c, b, rd_block_payload(b), hlen + elen);
  rd_block_unref(b);
}

/* The one place a connection ends. Paths that lead here: the local end's EOF,
 * read or write error (either side); ERROR from the far side (clean EOF or a
 * dial failure); a refused CONNECT; a failed or cancelled local dial; the
 * session ending (peer gone, ping deadline, protocol error, owner closed);
 * SYNC finding it stale; the buffer hard cap; a deadline timer; a duplicate
 * id. It unregisters the connection, counts it removed, tells the far side
 * when send_error is set (err NULL means a clean EOF), publishes the error to
 * a Python socket, and closes the local end (after flushing what is queued
 * when the end is clean). Idempotent. */
static void conn_end(rd_conn *c, const char *err, int send_error) {
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
  const char *labels[3] = {s->client_key, c->proto, c->address};
  rd_metrics_add(s->metrics, RD_M_REMOVE_CONNECTIONS, labels, 1);
  rd_metrics_add(s->metrics, RD_M_OPEN_CONNECTIONS, labels, -1);
  rd_engine_counts_add(0, -1, 0);
  if (send_error && !s->ended)
    held_send(c); /* bytes read before the end go first, PAUSE or not */
  else
    while (c->held_head != NULL) {
      backlog_item *it = c->held_head;
      c->held_head = it->next;
      rd_block_unref(it->block);
      rd_free(it);
    }
  c->held_tail = NULL;
  c->held = 0;
  if (send_error && !s->ended) {
    const char *text = err != NULL ? err : "EOF";
    size_t len = strlen(text);
    session_send_msg(s, RD_MSG_ERROR, c->id, text, len > RD_MSG_ERROR_LIMIT ? RD_MSG_ERROR_LIMIT : len);
  }
  if (c->status != NULL) {
    if (err != NULL)
      snprintf(c->status->error, sizeof c->status->error, "%s", err);
    atomic_store(&c->status->ended, 1);
  }
  if (c->owner_slot != NULL) {
    ((rd_request *)c->owner_slot)->target = NULL;
    c->owner_slot = NULL;
  }
  if (c->dial != NULL)
    rd_dial_cancel(c->dial);
  if (c->deadline != NULL) {
    uv_close((uv_handle_t *)c->deadline, conn_deadline_closed_cb);
    c->deadline = NULL;
  }
  backlog_free(c);
  if (c->local != NULL) {
    rd_io *local = c->local;
    rd_io_read_stop(local);
    int flush = !c->local_broken && was_open;
    if (flush && err != NULL && c->http_errors && !c->got_data)
      write_http_error(c, err);
    else if (err != NULL)
      flush = 0; /* an error end: the far side's bytes are as good as lost */
    if (!flush || rd_io_shutdown(local, local_shutdown_cb) != 0)
      rd_io_close(local, local_closed_cb);
  }
  c->s = NULL;
  conn_unref(c);
}

/* ---- client side local dials ---- */

static void stream_free_cb(uv_handle_t *h) { rd_free(h); }

static void conn_dial_cb(void *ctx, int status, uv_stream_t *stream, const char *error) {
  rd_conn *c = ctx;
  c->dial = NULL;
  if (c->state == CONN_ENDED) {
    if (stream != NULL)
      uv_close((uv_handle_t *)stream, stream_free_cb);
  } else if (status < 0) {
    conn_end(c, error, 1);
  } else {
    rd_io *io = rd_io_new(stream, NULL);
    if (io == NULL)
      conn_end(c, "out of memory", 1);
    else
      conn_attach_local(c, io);
  }
  conn_unref(c);
}

void rd_conn_dial_local(rd_conn *c) {
  if (c->state != CONN_CONNECTING)
    return;
  int status = 0;
  char err[160];
  c->refs++;
  c->dial = rd_dial_start(rd_loop(), c->proto, c->address, c->s->cfg.dial_timeout_ms,
                          conn_dial_cb, c, &status, err, sizeof err);
  if (c->dial == NULL) {
    c->refs--;
    conn_end(c, err, 1);
  }
}

void rd_conn_refuse(rd_conn *c, const char *reason) {
  if (c->state == CONN_CONNECTING)
    conn_end(c, reason, 1);
}

const char *rd_conn_proto(const rd_conn *c) { return c->proto; }
const char *rd_conn_address(const rd_conn *c) { return c->address; }
int64_t rd_conn_id(const rd_conn *c) { return c->id; }
void **rd_conn_owner_slot(rd_conn *c) { return &c->owner_slot; }
void rd_conn_set_http_errors(rd_conn *c) { c->http_errors = 1; }

static void conn_deadline_cb(uv_timer_t *t) {
  rd_conn *c = t->data;
  conn_end(c, "i/o timeout", 1);
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
  uv_timer_start(t, conn_deadline_cb, timeout_ms, 0);
  return RD_OK;
}

static void session_retune_tick(rd_session *s, uint64_t idle_ms);

void rd_conn_set_idle_timeout(rd_conn *c, uint64_t timeout_ms) {
  if (c->state == CONN_ENDED)
    return;
  rd_session *s = c->s;
  if (timeout_ms == 0)
    timeout_ms = s->cfg.idle_timeout_ms;
  if (c->idle_ms == 0 && timeout_ms > 0)
    s->idle_watched++;
  else if (c->idle_ms > 0 && timeout_ms == 0)
    s->idle_watched--;
  c->idle_ms = timeout_ms;
  if (timeout_ms > 0)
    session_retune_tick(s, timeout_ms);
}

/* ---- server side dials ---- */

rd_conn *rd_session_dial(rd_session *s, const char *proto, const char *address,
                         rd_io *local, const uint8_t *preface, size_t preface_len,
                         rd_dial_status *status, int *err) {
  if (s->ended) {
    *err = RD_ECLOSED;
    rd_io_close(local, NULL);
    return NULL;
  }
  /* The Go server starts its counter at 1 and increments before use. */
  int64_t id = ++s->next_conn_id;
  rd_conn *c = conn_new(s, id, proto, strlen(proto), address, strlen(address));
  if (c == NULL) {
    *err = s->conns.count >= s->cfg.max_connections ? RD_ETOOMANY : RD_ENOMEM;
    rd_io_close(local, NULL);
    return NULL;
  }
  if (s->cfg.idle_timeout_ms > 0)
    rd_conn_set_idle_timeout(c, 0);
  if (status != NULL) {
    atomic_fetch_add(&status->refs, 1);
    c->status = status;
  }
  size_t plen = strlen(proto), alen = strlen(address);
  rd_block *b = rd_block_get_small(plen + 1 + alen);
  if (b == NULL) {
    rd_io_close(local, NULL);
    conn_end(c, "out of memory", 0);
    *err = RD_ENOMEM;
    return NULL;
  }
  memcpy(rd_block_payload(b), proto, plen);
  rd_block_payload(b)[plen] = '/';
  memcpy(rd_block_payload(b) + plen + 1, address, alen);
  /* A write that fails at once ends the session, and c with it: hold c. */
  c->refs++;
  session_send_block(s, RD_MSG_CONNECT, id, b, plen + 1 + alen);
  if (preface_len > 0 && c->state != CONN_ENDED) {
    c->tx_bytes += preface_len;
    session_send_msg(s, RD_MSG_DATA, id, preface, preface_len);
  }
  int ended = c->state == CONN_ENDED;
  conn_unref(c);
  if (ended) { /* the session died while writing */
    rd_io_close(local, NULL);
    *err = RD_ECLOSED;
    return NULL;
  }
  conn_attach_local(c, local);
  return c;
}

/* ---- incoming messages ---- */

static void end_stale_cb(rd_map_node *n, void *ctx) {
  rd_conn *c = (rd_conn *)n;
  rd_msg *m = ctx;
  size_t count = rd_msg_sync_count(m);
  int64_t max_listed = count ? rd_msg_sync_id(m, count - 1) : 0;
  /* Binary search: the list is ascending. */
  size_t lo = 0, hi = count;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    int64_t v = rd_msg_sync_id(m, mid);
    if (v == c->id)
      return;
    if (v < c->id)
      lo = mid + 1;
    else
      hi = mid;
  }
  /* Absent. It is stale if the client must have seen its CONNECT: a later
   * id is listed (CONNECTs are processed in id order), or it is older than
   * the grace period. A newer one may still be in flight. */
  rd_session *s = c->s;
  if (c->id < max_listed || rd_now() - c->created >= s->cfg.sync_grace_ms)
    conn_end(c, "connection closed by sync", 0);
}

static int handle_message(rd_session *s, uint8_t *payload, size_t len) {
  rd_msg m;
  if (rd_msg_decode(payload, len, &m) != RD_OK) {
    rd_session_end(s, RD_WS_CLOSE_PROTOCOL, "malformed tunnel message");
    return 1;
  }
  rd_conn *c = NULL;
  switch (m.type) {
  case RD_MSG_DATA:
    c = conn_find(s, m.conn_id);
    if (c == NULL) {
      char text[RD_MSG_ERROR_LIMIT + 1];
      int n = snprintf(text, sizeof text, "connection not found %s/%lld/%lld", s->client_key,
                       (long long)s->session_key, (long long)m.conn_id);
      session_send_msg(s, RD_MSG_ERROR, m.conn_id, text,
                       (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
      return 0;
    }
    {
      /* Payloads inside the read block are written out by reference; a
       * reassembled one is copied once. */
      uint8_t *base = rd_block_payload(s->rblock);
      if ((uint8_t *)m.payload >= base && (uint8_t *)m.payload < base + rd_block_payload_cap(s->rblock)) {
        conn_on_data(c, s->rblock, (uint8_t *)m.payload, m.payload_len);
      } else {
        rd_block *b = block_with(m.payload, m.payload_len);
        if (b == NULL) {
          conn_end(c, "out of memory", 1);
          return 0;
        }
        conn_on_data(c, b, rd_block_payload(b), m.payload_len);
        rd_block_unref(b);
      }
    }
    return 0;
  case RD_MSG_CONNECT:
    if (s->role != RD_ROLE_CLIENT || s->ops.on_connect == NULL) {
      /* Go ends the whole session here; one connection's answer suffices. */
      static const char refused[] = "connect not allowed";
      session_send_msg(s, RD_MSG_ERROR, m.conn_id, refused, sizeof refused - 1);
      return 0;
    }
    c = conn_find(s, m.conn_id);
    if (c != NULL)
      conn_end(c, "duplicate connection id", 0);
    if (s->connecting >= s->cfg.max_pending_dials) {
      static const char busy[] = "too many dials in flight";
      session_send_msg(s, RD_MSG_ERROR, m.conn_id, busy, sizeof busy - 1);
      return 0;
    }
    c = conn_new(s, m.conn_id, (const char *)m.proto, m.proto_len, (const char *)m.address,
                 m.address_len);
    if (c == NULL) {
      const char *why = s->conns.count >= s->cfg.max_connections ? "too many connections"
                                                                  : "out of memory";
      session_send_msg(s, RD_MSG_ERROR, m.conn_id, why, strlen(why));
      return 0;
    }
    if (s->cfg.idle_timeout_ms > 0)
      rd_conn_set_idle_timeout(c, 0);
    s->ops.on_connect(s, s->owner, c);
    return s->ended;
  case RD_MSG_ERROR:
    c = conn_find(s, m.conn_id);
    if (c != NULL) { /* unknown ids are echoes of our own close: ignore */
      char text[RD_MSG_ERROR_LIMIT + 1];
      memcpy(text, m.payload, m.payload_len);
      text[m.payload_len] = '\0';
      conn_end(c, strcmp(text, "EOF") == 0 ? NULL : text, 0);
    }
    return 0;
  case RD_MSG_PAUSE:
  case RD_MSG_RESUME:
    c = conn_find(s, m.conn_id);
    if (c != NULL && c->peer_paused != (m.type == RD_MSG_PAUSE)) {
      c->peer_paused = m.type == RD_MSG_PAUSE;
      if (c->peer_paused)
        s->paused++;
      else
        s->paused--;
      conn_update_reading(c);
    }
    return 0;
  case RD_MSG_SYNC:
    if (s->role == RD_ROLE_SERVER)
      rd_map_foreach(&s->conns, end_stale_cb, &m);
    return 0;
  default: /* ADD/REMOVE_CLIENT belong to peer sessions; others are ignored */
    return 0;
  }
}

static int on_ws_message(void *ctx, int opcode, uint8_t *payload, size_t len) {
  rd_session *s = ctx;
  switch (opcode) {
  case RD_WS_BINARY:
    return handle_message(s, payload, len);
  case RD_WS_TEXT:
    rd_session_end(s, RD_WS_CLOSE_UNSUPPORTED, "text message");
    return 1;
  case RD_WS_PING:
    session_send_control(s, RD_WS_PONG, payload, len);
    return 0;
  case RD_WS_PONG:
    return 0;
  case RD_WS_CLOSE:
  default:
    rd_session_end(s, RD_WS_CLOSE_NORMAL, "closed by peer");
    return 1;
  }
}

/* Feeds buffered bytes to the WebSocket reader. */
static void session_consume(rd_session *s) {
  if (s->rblock == NULL)
    return;
  uint8_t *base = rd_block_payload(s->rblock);
  int64_t n = rd_ws_reader_feed(&s->reader, base + s->rstart, s->rend - s->rstart, on_ws_message, s);
  if (s->ended)
    return;
  if (n < 0) {
    rd_session_end(s, n == RD_ETOOLARGE ? RD_WS_CLOSE_TOO_BIG : RD_WS_CLOSE_PROTOCOL,
                   n == RD_ETOOLARGE ? "message too big" : "websocket protocol error");
    return;
  }
  s->rstart += (size_t)n;
  if (s->rstart == s->rend && s->rblock->refs == 1)
    s->rstart = s->rend = 0; /* nothing refers into the block: reuse it whole */
}

static void session_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  rd_session *s = rd_io_data(io);
  size_t have = s->rend - s->rstart;
  size_t want = s->reader.need > have ? s->reader.need : have + 4096;
  if (s->rblock == NULL) {
    if ((s->rblock = rd_block_get(want > RD_BLOCK_BIG ? want : RD_BLOCK_BIG)) == NULL) {
      *buf = uv_buf_init(NULL, 0);
      return;
    }
    s->rstart = s->rend = 0;
  }
  size_t cap = rd_block_payload_cap(s->rblock);
  if (cap - s->rend < 4096 || s->rstart + want > cap) {
    /* Move the unconsumed tail to a block big enough for the next frame. */
    size_t size = want > RD_BLOCK_BIG ? want : RD_BLOCK_BIG;
    rd_block *nb = rd_block_get(size);
    if (nb == NULL) {
      *buf = uv_buf_init(NULL, 0);
      return;
    }
    memcpy(rd_block_payload(nb), rd_block_payload(s->rblock) + s->rstart, have);
    rd_block_unref(s->rblock);
    s->rblock = nb;
    s->rstart = 0;
    s->rend = have;
    cap = rd_block_payload_cap(nb);
  }
  *buf = uv_buf_init((char *)rd_block_payload(s->rblock) + s->rend, (unsigned)(cap - s->rend));
}

static void session_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  rd_session *s = rd_io_data(io);
  if (s->ended)
    return;
  if (nread < 0) {
    rd_session_end(s, 0,
                   nread == UV_EOF   ? "EOF"
                   : nread == RD_ETLS ? rd_io_error(io)
                                      : rd_strerror((int)nread));
    return;
  }
  if (nread > 0) {
    s->last_rx = rd_now();
    s->rend += (size_t)nread;
    session_consume(s);
  }
  /* The socket is drained (a short read or none): a block that holds no
   * partial frame goes back to the pool, so an idle session holds none. */
  if (!s->ended && s->rblock != NULL && s->rstart == s->rend && (size_t)nread < buf->len) {
    rd_block_unref(s->rblock);
    s->rblock = NULL;
  }
}

/* ---- keepalive, sync ---- */

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

typedef struct {
  uint8_t *out;
  size_t n;
} sync_fill;

static void collect_id_cb(rd_map_node *n, void *ctx) {
  sync_fill *f = ctx;
  int64_t id = ((rd_conn *)n)->id;
  memcpy(f->out + 8 * f->n++, &id, 8);
}

static void session_send_sync(rd_session *s) {
  size_t count = s->conns.count;
  rd_block *b = rd_block_get(count * 8);
  if (b == NULL) {
    rd_session_end(s, 0, "out of memory");
    return;
  }
  sync_fill f = {rd_block_payload(b), 0};
  rd_map_foreach(&s->conns, collect_id_cb, &f);
  /* Ids sort as integers; the wire wants them little-endian, which is the
   * host order on every platform we build for. */
  qsort(f.out, f.n, 8, cmp_i64);
  session_send_block(s, RD_MSG_SYNC, 0, b, f.n * 8);
}

static void end_idle_cb(rd_map_node *n, void *ctx) {
  rd_conn *c = (rd_conn *)n;
  uint64_t now = *(uint64_t *)ctx;
  if (c->idle_ms > 0 && now - c->last_activity >= c->idle_ms)
    conn_end(c, "idle timeout", 1);
}

/* A paused connection that stopped reading cannot see its local end close
 * by reading. The kernel tells it without a read: poll() reports RDHUP once
 * the peer has closed or shut down its writing side (a TCP FIN, or a unix
 * socket's peer closing), even with bytes still queued. Then what is left to
 * read is finite, so reading resumes (no cap) to EOF and the connection ends
 * with every byte delivered. (A direct poll() with no wait does not disturb
 * the loop's own registration of the descriptor.) */
static void check_paused_local_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  rd_conn *c = (rd_conn *)n;
  if (!c->peer_paused || c->local_gone || c->local == NULL || c->state != CONN_OPEN)
    return;
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)rd_io_stream(c->local), &fd) != 0)
    return;
  struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
  if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) {
    c->local_gone = 1;
    conn_update_reading(c);
  }
}

static void tick_cb(uv_timer_t *t) {
  rd_session *s = t->data;
  uint64_t now = rd_now();
  if (now - s->last_rx >= s->cfg.read_timeout_ms) {
    rd_session_end(s, RD_WS_CLOSE_GOING_AWAY, "read deadline exceeded");
    return;
  }
  if (s->idle_watched > 0)
    rd_map_foreach(&s->conns, end_idle_cb, &now);
  if (s->paused > 0)
    rd_map_foreach(&s->conns, check_paused_local_cb, NULL);
  if (s->role != RD_ROLE_CLIENT)
    return;
  if (s->cfg.ping_interval_ms && now - s->last_ping >= s->cfg.ping_interval_ms) {
    s->last_ping = now;
    session_send_control(s, RD_WS_PING, NULL, 0);
  }
  if (s->cfg.sync_interval_ms && now - s->last_sync >= s->cfg.sync_interval_ms) {
    s->last_sync = now;
    session_send_sync(s);
  }
}

static uint64_t tick_period(const rd_session *s, uint64_t idle_ms) {
  uint64_t p = s->cfg.read_timeout_ms / 4;
  /* Idle timeouts are enforced by this tick, to within a quarter. */
  if (idle_ms > 0 && idle_ms / 4 < p)
    p = idle_ms / 4;
  if (s->role == RD_ROLE_CLIENT) {
    if (s->cfg.ping_interval_ms && s->cfg.ping_interval_ms < p)
      p = s->cfg.ping_interval_ms;
    if (s->cfg.sync_interval_ms && s->cfg.sync_interval_ms < p)
      p = s->cfg.sync_interval_ms;
  }
  return p ? p : 1;
}

/* Shortens the tick so a new idle timeout is enforced in time; it never
 * lengthens it again (a faster tick serves longer timeouts too). */
static void session_retune_tick(rd_session *s, uint64_t idle_ms) {
  uint64_t p = tick_period(s, idle_ms);
  if (p < s->tick_ms && !s->ended) {
    s->tick_ms = p;
    uv_timer_start(&s->tick, tick_cb, p, p);
  }
}

/* ---- lifecycle ---- */

static void session_free_if_closed(rd_session *s) {
  if (--s->handles_open > 0)
    return;
  rd_ws_reader_dispose(&s->reader);
  rd_block_unref(s->rblock);
  rd_map_dispose(&s->conns);
  rd_free(s->client_key);
  void (*on_freed)(void *) = s->ops.on_freed;
  void *owner = s->owner;
  rd_free(s);
  if (on_freed != NULL)
    on_freed(owner);
}

static void session_io_closed_cb(rd_io *io) { session_free_if_closed(rd_io_data(io)); }

static void session_tick_closed_cb(uv_handle_t *h) { session_free_if_closed(h->data); }

static void end_conn_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  conn_end((rd_conn *)n, "tunnel disconnect", 0);
}

static void session_block_writes(rd_session *s, int blocked);

static void update_reading_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  conn_update_reading((rd_conn *)n);
}

static void session_block_writes(rd_session *s, int blocked) {
  s->write_blocked = blocked;
  rd_map_foreach(&s->conns, update_reading_cb, NULL);
}

void rd_session_end(rd_session *s, int close_code, const char *reason) {
  if (s->ended || s->ending)
    return;
  s->ending = 1;
  rd_map_foreach(&s->conns, end_conn_cb, NULL);
  if (close_code != 0) {
    uint8_t payload[2 + 64];
    size_t rlen = strlen(reason);
    if (rlen > 64)
      rlen = 64;
    payload[0] = (uint8_t)(close_code >> 8);
    payload[1] = (uint8_t)close_code;
    memcpy(payload + 2, reason, rlen);
    session_send_control(s, RD_WS_CLOSE, payload, 2 + rlen);
  }
  s->ended = 1;
  const char *labels[2] = {s->client_key, s->peer ? "true" : "false"};
  rd_metrics_add(s->metrics, RD_M_REMOVE_WS_SESSION, labels, 1);
  rd_metrics_add(s->metrics, RD_M_OPEN_SESSIONS, labels + 1, -1);
  rd_engine_counts_add(-1, 0, 0);
  rd_io_read_stop(s->io);
  rd_io_close(s->io, session_io_closed_cb);
  uv_close((uv_handle_t *)&s->tick, session_tick_closed_cb);
  if (s->ops.on_end != NULL)
    s->ops.on_end(s, s->owner, reason);
}

rd_session *rd_session_new(rd_io *io, int role, const char *client_key, int peer,
                           rd_metrics *metrics, const rd_session_config *cfg,
                           const rd_session_owner *ops, void *owner, const uint8_t *leftover,
                           size_t leftover_len) {
  rd_session *s = rd_calloc(1, sizeof *s);
  if (s == NULL || (s->client_key = rd_strndup(client_key, strlen(client_key))) == NULL ||
      (leftover_len > 0 &&
       (s->rblock = rd_block_get(leftover_len > RD_BLOCK_BIG ? leftover_len : RD_BLOCK_BIG)) == NULL)) {
    if (s != NULL)
      rd_free(s->client_key);
    rd_free(s);
    rd_io_close(io, NULL);
    return NULL;
  }
  s->io = io;
  s->role = role;
  s->peer = peer;
  s->metrics = metrics;
  s->cfg = *cfg;
  s->ops = *ops;
  s->owner = owner;
  rd_ws_reader_init(&s->reader, role == RD_ROLE_SERVER, cfg->max_message);
  rd_map_init(&s->conns);
  uint64_t r[2] = {0, 0};
  uv_random(NULL, NULL, r, sizeof r, 0, NULL);
  s->session_key = (int64_t)(r[0] >> 1);
  s->next_msg_id = (int64_t)(r[1] >> 2);
  s->next_conn_id = 1;
  s->last_rx = s->last_ping = s->last_sync = rd_now();
  rd_io_set_data(io, s);
  uv_timer_init(rd_loop(), &s->tick);
  s->tick.data = s;
  s->handles_open = 2;
  const char *labels[2] = {s->client_key, peer ? "true" : "false"};
  rd_metrics_add(metrics, RD_M_ADD_WS_SESSION, labels, 1);
  rd_metrics_add(metrics, RD_M_OPEN_SESSIONS, labels + 1, 1);
  rd_engine_counts_add(1, 0, 0);
  s->tick_ms = tick_period(s, cfg->idle_timeout_ms);
  uv_timer_start(&s->tick, tick_cb, s->tick_ms, s->tick_ms);
  rd_io_read_start(io, session_alloc_cb, session_read_cb);
  if (leftover_len > 0) {
    memcpy(rd_block_payload(s->rblock), leftover, leftover_len);
    s->rend = leftover_len;
    session_consume(s);
  }
  return s;
}

const char *rd_session_client_key(const rd_session *s) { return s->client_key; }
int64_t rd_session_key(const rd_session *s) { return s->session_key; }
int rd_session_is_ended(const rd_session *s) { return s->ended; }
size_t rd_session_conn_count(const rd_session *s) { return s->conns.count; }

typedef struct {
  rd_session *s;
  rd_conn_info_cb cb;
  void *ctx;
} info_walk;

static void info_cb(rd_map_node *n, void *ctx) {
  info_walk *w = ctx;
  rd_conn *c = (rd_conn *)n;
  rd_conn_info info = {
      .id = c->id,
      .client_key = w->s->client_key,
      .proto = c->proto,
      .address = c->address,
      .age = (double)(rd_now() - c->created) / 1000.0,
      .idle = (double)(rd_now() - c->last_activity) / 1000.0,
      .state = c->state == CONN_OPEN ? "open" : "connecting",
      .tx_bytes = c->tx_bytes,
      .rx_bytes = c->rx_bytes,
      .paused = c->peer_paused || c->we_paused,
      .buffered = c->pending,
  };
  w->cb(w->ctx, &info);
}

void rd_session_foreach_conn(rd_session *s, rd_conn_info_cb cb, void *ctx) {
  info_walk w = {s, cb, ctx};
  rd_map_foreach(&s->conns, info_cb, &w);
}
