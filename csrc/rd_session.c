/* Sessions: reading and framing, dispatch, keepalive and sync.
 *
 * Ownership: a session owns its stream, its tick timer and its connections;
 * it is freed when both handles have closed. Its reap after a failure is an
 * entry on the loop's deferred list (rd_defer), taken off when it ends. The
 * configuration and owner callbacks are the owner's, shared by all its
 * sessions: an idle session carries only what is its own.
 *
 * Everything queued toward the peer (DATA, replies, pongs, the close frame)
 * is one write queue with one bound: over write_high the local ends stop
 * reading; over twice that the peer's own stream stops being read, since
 * what it sends makes replies. A peer that does not drain the queue before
 * the read deadline has its session ended. */
#include "rd_session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rd_alloc.h"
#include "rd_io.h"
#include "rd_loop.h"
#include "rd_session_int.h"
#include "rd_trace.h"
#include "rd_wreq.h"

void rd_session_trim_pools(void) { rd_wreq_trim(); }

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
  cfg->udp_idle_timeout_ms = 60000;
  cfg->max_connections = 65536;
  cfg->max_pending_dials = 1024;
}

/* ---- failures inside sends: marked now, ended at the next reap ---- */

static void session_reap(rd_session *s) {
  rd_conn *c;
  while ((c = s->reap_head) != NULL) {
    s->reap_head = *rd_conn_reap_link(c);
    rd_conn_reap(c);
  }
  if (s->doomed && !s->ended)
    rd_session_end(s, 0, s->doom_reason);
}

static void reap_cb(rd_defer *d) { session_reap(rd_container_of(d, rd_session, reap)); }

/* The stream failed (reason: a static text): stop using it now. */
static void session_doom(rd_session *s, const char *reason) {
  if (s->doomed || s->ended)
    return;
  s->doomed = 1;
  s->doom_reason = reason;
  rd_io_read_stop(s->io);
  rd_defer_start(&s->reap);
}

void rd_session_reap_later(rd_session *s, rd_conn *c) {
  *rd_conn_reap_link(c) = s->reap_head;
  s->reap_head = c;
  if (!s->ended)
    rd_defer_start(&s->reap);
}

int rd_session_can_send(const rd_session *s) { return !s->ended && !s->doomed; }

/* ---- the queue toward the peer ---- */

static void update_reading_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  rd_conn_update_reading((rd_conn *)n);
}

static void session_block_writes(rd_session *s, int blocked) {
  s->write_blocked = blocked;
  rd_map_foreach(&s->conns, update_reading_cb, NULL);
}

static void session_consume(rd_session *s);
static void session_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf);
static void session_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf);

/* The queue grew: past the bounds, local ends and then the peer wait. */
static void queue_grew(rd_session *s) {
  size_t q = rd_io_write_queue_size(s->io);
  if (!s->write_blocked && q > s->cfg->write_high)
    session_block_writes(s, 1);
  if (!s->peer_blocked && q > 2 * s->cfg->write_high) {
    s->peer_blocked = 1;
    rd_io_read_stop(s->io);
  }
}

/* The queue shrank: the peer is read again (what it sent meanwhile first),
 * and local ends once it is well down. */
static void queue_shrank(rd_session *s) {
  size_t q = rd_io_write_queue_size(s->io);
  if (s->peer_blocked && q <= s->cfg->write_high) {
    s->peer_blocked = 0;
    session_consume(s);
    if (!s->peer_blocked && rd_session_can_send(s))
      rd_io_read_start(s->io, session_alloc_cb, session_read_cb);
  }
  if (s->write_blocked && rd_session_can_send(s) && q <= s->cfg->write_high / 4) {
    session_block_writes(s, 0);
    if (s->ops->on_room != NULL)
      s->ops->on_room(s, s->owner);
  }
}

static void session_write_cb(uv_write_t *req, int status) {
  rd_wreq *w = (rd_wreq *)req;
  rd_session *s = w->owner;
  rd_engine_tunnel_queued_add(-(int64_t)w->len);
  rd_block_unref(w->block);
  rd_wreq_put(w);
  if (status < 0 && status != UV_ECANCELED)
    session_doom(s, "write failed");
  else if (rd_session_can_send(s))
    queue_shrank(s);
}

/* Sends one WebSocket frame whose payload sits at p[0..len) inside block b,
 * with at least RD_WS_HEADER_MAX bytes of b before p. Takes b's reference. */
static void session_write_frame(rd_session *s, int opcode, rd_block *b, uint8_t *p, size_t len) {
  if (!rd_session_can_send(s)) {
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
      session_doom(s, "write failed");
    return;
  }
  buf.base += sent;
  buf.len -= (size_t)sent;
  rd_wreq *w = rd_wreq_get();
  if (w == NULL) {
    rd_block_unref(b);
    session_doom(s, "out of memory");
    return;
  }
  w->block = b;
  w->owner = s;
  w->len = buf.len;
  if (rd_io_write(s->io, &w->req, &buf, 1, session_write_cb) != 0) {
    rd_block_unref(b);
    rd_wreq_put(w);
    session_doom(s, "write failed");
    return;
  }
  rd_engine_tunnel_queued_add((int64_t)w->len);
  queue_grew(s);
}

void rd_session_send_block(rd_session *s, int type, int64_t conn_id, rd_block *b, size_t len) {
  uint8_t hdr[RD_MSG_HEADER_MAX];
  if (s->cfg->trace && rd_session_can_send(s)) /* before a client's mask */
    rd_trace_msg(RD_TRACE_SEND, s->role, s->client_key, s->session_key, s->next_msg_id, conn_id,
                 type, rd_block_payload(b), len);
  size_t hlen = rd_msg_encode_header(hdr, s->next_msg_id++, conn_id, type);
  uint8_t *p = rd_block_payload(b) - hlen;
  memcpy(p, hdr, hlen);
  const char *labels[1] = {s->client_key};
  if (type == RD_MSG_DATA)
    s->stats.tx_bytes += len;
  if (type == RD_MSG_DATA)
    rd_metrics_add(s->metrics, RD_M_TRANSMIT_BYTES, labels, (double)(hlen + len));
  else if (type == RD_MSG_ERROR)
    rd_metrics_add(s->metrics, RD_M_TRANSMIT_ERR_BYTES, labels, (double)(hlen + len));
  session_write_frame(s, RD_WS_BINARY, b, p, hlen + len);
}

/* A copy of payload in a small block, for sending; NULL when the session
 * cannot send (it is doomed when out of memory). */
static rd_block *session_block_with(rd_session *s, const void *payload, size_t len) {
  if (!rd_session_can_send(s))
    return NULL;
  rd_block *b = rd_block_get_small(len);
  if (b == NULL)
    session_doom(s, "out of memory");
  else if (len > 0)
    memcpy(rd_block_payload(b), payload, len);
  return b;
}

void rd_session_send_msg(rd_session *s, int type, int64_t conn_id, const void *payload,
                         size_t len) {
  rd_block *b = session_block_with(s, payload, len);
  if (b != NULL)
    rd_session_send_block(s, type, conn_id, b, len);
}

static void session_send_control(rd_session *s, int opcode, const void *payload, size_t len) {
  rd_block *b = session_block_with(s, payload, len);
  if (b != NULL)
    session_write_frame(s, opcode, b, rd_block_payload(b), len);
}

void rd_session_send_text(rd_session *s, int type, const char *text) {
  rd_session_send_msg(s, type, 0, text, strlen(text));
}

static void send_error_text(rd_session *s, int64_t conn_id, const char *text) {
  size_t len = strlen(text);
  rd_session_send_msg(s, RD_MSG_ERROR, conn_id, text,
                      len > RD_MSG_ERROR_LIMIT ? RD_MSG_ERROR_LIMIT : len);
}

/* ---- opening connections ---- */

rd_conn *rd_session_open(rd_session *s, const char *proto, const char *address,
                         rd_dial_status *status, int *err) {
  if (!rd_session_can_send(s)) {
    *err = RD_ECLOSED;
    return NULL;
  }
  size_t plen = strlen(proto), alen = strlen(address);
  /* The Go server starts its counter at 1 and increments before use. */
  int64_t id = ++s->next_conn_id;
  rd_conn *c = rd_conn_new(s, id, proto, plen, address, alen);
  rd_block *b = c != NULL ? rd_block_get_small(plen + 1 + alen) : NULL;
  if (b == NULL) {
    *err = c == NULL && s->conns.count >= s->cfg->max_connections ? RD_ETOOMANY : RD_ENOMEM;
    if (c != NULL)
      rd_conn_end(c, "out of memory", 0);
    return NULL;
  }
  if (status != NULL) {
    atomic_fetch_add(&status->refs, 1);
    rd_conn_set_status(c, status);
  }
  memcpy(rd_block_payload(b), proto, plen);
  rd_block_payload(b)[plen] = '/';
  memcpy(rd_block_payload(b) + plen + 1, address, alen);
  rd_session_send_block(s, RD_MSG_CONNECT, id, b, plen + 1 + alen);
  return c;
}

rd_conn *rd_session_dial(rd_session *s, const char *proto, const char *address,
                         rd_io *local, const uint8_t *preface, size_t preface_len,
                         rd_dial_status *status, int *err) {
  rd_conn *c = rd_session_open(s, proto, address, status, err);
  if (c == NULL) {
    rd_io_close(local, NULL);
    return NULL;
  }
  if (preface_len > 0)
    rd_conn_send(c, preface, preface_len);
  rd_conn_attach_io(c, local);
  return c;
}

/* ---- incoming messages ---- */

typedef struct {
  const rd_session *s;
  const rd_msg *m;
} sync_check;

static void end_stale_cb(rd_map_node *n, void *ctx) {
  rd_conn *c = (rd_conn *)n;
  const rd_msg *m = ((sync_check *)ctx)->m;
  int64_t id = rd_conn_id(c);
  size_t count = rd_msg_sync_count(m);
  int64_t max_listed = count ? rd_msg_sync_id(m, count - 1) : 0;
  /* Binary search: the list is ascending. */
  size_t lo = 0, hi = count;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    int64_t v = rd_msg_sync_id(m, mid);
    if (v == id)
      return;
    if (v < id)
      lo = mid + 1;
    else
      hi = mid;
  }
  /* Absent. It is stale if the client must have seen its CONNECT: a later
   * id is listed (CONNECTs are processed in id order), or it is older than
   * the grace period. A newer one may still be in flight. */
  if (id < max_listed || rd_conn_age_ms(c) >= ((sync_check *)ctx)->s->cfg->sync_grace_ms)
    rd_conn_end(c, "connection closed by sync", 0);
}

static void handle_connect(rd_session *s, const rd_msg *m) {
  if (s->ops->on_connect == NULL) {
    /* Go ends the whole session here; one connection's answer suffices. */
    send_error_text(s, m->conn_id, "connect not allowed");
    return;
  }
  rd_conn *c = rd_conn_find(s, m->conn_id);
  if (c != NULL)
    rd_conn_end(c, "duplicate connection id", 0);
  if (s->connecting >= s->cfg->max_pending_dials) {
    send_error_text(s, m->conn_id, "too many dials in flight");
    return;
  }
  c = rd_conn_new(s, m->conn_id, (const char *)m->proto, m->proto_len, (const char *)m->address,
                  m->address_len);
  if (c == NULL) {
    send_error_text(s, m->conn_id, s->conns.count >= s->cfg->max_connections
                                       ? "too many connections"
                                       : "out of memory");
    return;
  }
  s->ops->on_connect(s, s->owner, c);
}

static void handle_client_change(rd_session *s, const rd_msg *m) {
  void (*cb)(rd_session *, void *, const char *) =
      m->type == RD_MSG_ADD_CLIENT      ? s->ops->on_add_client
      : m->type == RD_MSG_REMOVE_CLIENT ? s->ops->on_remove_client
                                        : s->ops->on_disconnect_client;
  if (cb == NULL)
    return;
  char *key = rd_strndup((const char *)m->payload, m->payload_len);
  if (key == NULL) {
    session_doom(s, "out of memory");
    return;
  }
  cb(s, s->owner, key);
  rd_free(key);
}

static void handle_message(rd_session *s, uint8_t *payload, size_t len) {
  rd_msg m;
  if (rd_msg_decode(payload, len, &m) != RD_OK) {
    rd_session_end(s, RD_WS_CLOSE_PROTOCOL, "malformed tunnel message");
    return;
  }
  if (s->cfg->trace)
    rd_trace_msg(RD_TRACE_RECV, s->role, s->client_key, s->session_key, m.id, m.conn_id, m.type,
                 m.payload, m.payload_len);
  rd_conn *c = m.type == RD_MSG_CONNECT || m.type == RD_MSG_SYNC ? NULL : rd_conn_find(s, m.conn_id);
  switch (m.type) {
  case RD_MSG_DATA:
    if (c != NULL) {
      rd_conn_on_data(c, m.payload, m.payload_len);
    } else {
      char text[RD_MSG_ERROR_LIMIT + 1];
      snprintf(text, sizeof text, "connection not found %s/%lld/%lld", s->client_key,
               (long long)s->session_key, (long long)m.conn_id);
      send_error_text(s, m.conn_id, text);
    }
    return;
  case RD_MSG_CONNECT:
    handle_connect(s, &m);
    return;
  case RD_MSG_ERROR:
    if (c != NULL) /* unknown ids are echoes of our own close: ignore */
      rd_conn_on_error(c, (const char *)m.payload, m.payload_len);
    return;
  case RD_MSG_PAUSE:
  case RD_MSG_RESUME:
    if (c != NULL)
      rd_conn_on_pause(c, m.type == RD_MSG_PAUSE);
    return;
  case RD_MSG_SYNC:
    if (s->role == RD_ROLE_SERVER) {
      sync_check check = {s, &m};
      rd_map_foreach(&s->conns, end_stale_cb, &check);
    }
    return;
  case RD_MSG_ADD_CLIENT:
  case RD_MSG_REMOVE_CLIENT:
  case RD_MSG_DISCONNECT_CLIENT:
    handle_client_change(s, &m);
    return;
  default: /* unknown types are ignored, as Go does */
    return;
  }
}

/* Returns nonzero to stop the reader: the session is ending, or the queue
 * toward the peer is full (the rest waits in the read block). */
static int on_ws_message(void *ctx, int opcode, uint8_t *payload, size_t len) {
  rd_session *s = ctx;
  switch (opcode) {
  case RD_WS_BINARY:
    handle_message(s, payload, len);
    break;
  case RD_WS_TEXT:
    rd_session_end(s, RD_WS_CLOSE_UNSUPPORTED, "text message");
    break;
  case RD_WS_PING:
    session_send_control(s, RD_WS_PONG, payload, len);
    break;
  case RD_WS_PONG:
    break;
  case RD_WS_CLOSE:
    if (rd_ws_close_check(payload, len, NULL) != RD_OK) { /* RFC 6455 7.4, 5.5.1 */
      rd_session_end(s, RD_WS_CLOSE_PROTOCOL, "invalid close frame");
      break;
    }
    /* fallthrough */
  default:
    rd_session_end(s, RD_WS_CLOSE_NORMAL, "closed by peer");
    break;
  }
  return !rd_session_can_send(s) || s->peer_blocked;
}

/* Feeds buffered bytes to the WebSocket reader. */
static void session_consume(rd_session *s) {
  if (s->rblock == NULL || s->rstart == s->rend)
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
  if (s->rstart == s->rend)
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
  if (s->rstart + want > cap || cap - s->rend < 4096) {
    /* Move the unconsumed tail to the front, or to a block big enough for
     * the next frame. */
    size_t size = want > RD_BLOCK_BIG ? want : RD_BLOCK_BIG;
    if (size > cap) {
      rd_block *nb = rd_block_get(size);
      if (nb == NULL) {
        *buf = uv_buf_init(NULL, 0);
        return;
      }
      memcpy(rd_block_payload(nb), rd_block_payload(s->rblock) + s->rstart, have);
      rd_block_unref(s->rblock);
      s->rblock = nb;
      cap = rd_block_payload_cap(nb);
    } else {
      memmove(rd_block_payload(s->rblock), rd_block_payload(s->rblock) + s->rstart, have);
    }
    s->rstart = 0;
    s->rend = have;
  }
  *buf = uv_buf_init((char *)rd_block_payload(s->rblock) + s->rend, (unsigned)(cap - s->rend));
}

static void session_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  rd_session *s = rd_io_data(io);
  if (!rd_session_can_send(s))
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
  if (rd_session_can_send(s) && s->rblock != NULL && s->rstart == s->rend &&
      (size_t)nread < buf->len) {
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
  int64_t id = rd_conn_id((rd_conn *)n);
  memcpy(f->out + 8 * f->n++, &id, 8);
}

static void session_send_sync(rd_session *s) {
  rd_block *b = rd_block_get(s->conns.count * 8);
  if (b == NULL) {
    session_doom(s, "out of memory");
    return;
  }
  sync_fill f = {rd_block_payload(b), 0};
  rd_map_foreach(&s->conns, collect_id_cb, &f);
  /* Ids sort as integers; the wire wants them little-endian, which is the
   * host order on every platform we build for. */
  qsort(f.out, f.n, 8, cmp_i64);
  rd_session_send_block(s, RD_MSG_SYNC, 0, b, f.n * 8);
}

static void conn_tick_cb(rd_map_node *n, void *ctx) { rd_conn_tick((rd_conn *)n, *(uint64_t *)ctx); }

static void tick_cb(uv_timer_t *t) {
  rd_session *s = t->data;
  uint64_t now = rd_now();
  if (now - s->last_rx >= s->cfg->read_timeout_ms) {
    rd_session_end(s, RD_WS_CLOSE_GOING_AWAY,
                   s->peer_blocked ? "write queue stalled" : "read deadline exceeded");
    return;
  }
  if (s->idle_watched > 0 || s->paused > 0)
    rd_map_foreach(&s->conns, conn_tick_cb, &now);
  if (s->role != RD_ROLE_CLIENT)
    return;
  if (s->cfg->ping_interval_ms && now - s->last_ping >= s->cfg->ping_interval_ms) {
    s->last_ping = now;
    session_send_control(s, RD_WS_PING, NULL, 0);
  }
  if (s->cfg->sync_interval_ms && now - s->last_sync >= s->cfg->sync_interval_ms) {
    s->last_sync = now;
    session_send_sync(s);
  }
}

static uint64_t tick_period(const rd_session *s, uint64_t idle_ms) {
  uint64_t p = s->cfg->read_timeout_ms / 4;
  /* Idle timeouts are enforced by this tick, to within a quarter. */
  if (idle_ms > 0 && idle_ms / 4 < p)
    p = idle_ms / 4;
  if (s->role == RD_ROLE_CLIENT) {
    if (s->cfg->ping_interval_ms && s->cfg->ping_interval_ms < p)
      p = s->cfg->ping_interval_ms;
    if (s->cfg->sync_interval_ms && s->cfg->sync_interval_ms < p)
      p = s->cfg->sync_interval_ms;
  }
  return p ? p : 1;
}

/* Shortens the tick so a new idle timeout is enforced in time; it never
 * lengthens it again (a faster tick serves longer timeouts too). */
void rd_session_retune_tick(rd_session *s, uint64_t idle_ms) {
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
  void (*on_freed)(void *) = s->ops->on_freed;
  void *owner = s->owner;
  rd_free(s);
  if (on_freed != NULL)
    on_freed(owner);
}

static void session_io_closed_cb(rd_io *io) { session_free_if_closed(rd_io_data(io)); }

static void session_handle_closed_cb(uv_handle_t *h) { session_free_if_closed(h->data); }

static void end_conn_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  rd_conn_end((rd_conn *)n, "tunnel disconnect", 0);
}

/* Counts the session added (delta 1) or removed (-1). */
static void session_count(rd_session *s, int delta) {
  rd_engine_counts_add(delta, 0, 0);
  if (s->kind == RD_SESSION_LINK)
    return;
  const char *labels[2] = {s->client_key, s->kind == RD_SESSION_PEER ? "true" : "false"};
  rd_metrics_add(s->metrics, delta > 0 ? RD_M_ADD_WS_SESSION : RD_M_REMOVE_WS_SESSION, labels, 1);
  rd_metrics_add(s->metrics, RD_M_OPEN_SESSIONS, labels + 1, delta);
}

void rd_session_end(rd_session *s, int close_code, const char *reason) {
  if (s->ended || s->ending)
    return;
  s->ending = 1;
  rd_map_foreach(&s->conns, end_conn_cb, NULL);
  session_reap(s); /* connections that failed before: their memory goes */
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
  session_count(s, -1);
  rd_io_read_stop(s->io);
  rd_io_close(s->io, session_io_closed_cb);
  uv_close((uv_handle_t *)&s->tick, session_handle_closed_cb);
  rd_defer_cancel(&s->reap);
  if (s->ops->on_end != NULL)
    s->ops->on_end(s, s->owner, reason);
}

rd_session *rd_session_new(rd_io *io, int role, const char *client_key, const char *remote,
                           int kind, rd_metrics *metrics, const rd_session_config *cfg,
                           const rd_session_owner *ops, void *owner, const uint8_t *leftover,
                           size_t leftover_len) {
  if (remote == NULL)
    remote = "";
  size_t klen = strlen(client_key), rlen = strlen(remote);
  rd_session *s = rd_calloc(1, offsetof(rd_session, client_key) + klen + 1 + rlen + 1);
  if (s == NULL ||
      (leftover_len > 0 &&
       (s->rblock = rd_block_get(leftover_len > RD_BLOCK_BIG ? leftover_len : RD_BLOCK_BIG)) == NULL)) {
    rd_free(s);
    rd_io_close(io, NULL);
    return NULL;
  }
  memcpy(s->client_key, client_key, klen + 1);
  memcpy(s->client_key + klen + 1, remote, rlen + 1);
  s->io = io;
  s->role = role;
  s->kind = kind;
  s->metrics = metrics;
  s->cfg = cfg;
  s->ops = ops;
  s->owner = owner;
  rd_ws_reader_init(&s->reader, role == RD_ROLE_SERVER, cfg->max_message);
  rd_map_init(&s->conns);
  uint64_t r[2] = {0, 0};
  uv_random(NULL, NULL, r, sizeof r, 0, NULL);
  s->session_key = (int64_t)(r[0] >> 1);
  s->next_msg_id = (int64_t)(r[1] >> 2);
  s->next_conn_id = 1;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  s->stats.since = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
  s->last_rx = s->last_ping = s->last_sync = rd_now();
  rd_io_set_data(io, s);
  uv_timer_init(rd_loop(), &s->tick);
  s->tick.data = s;
  rd_defer_init(&s->reap, reap_cb);
  s->handles_open = 2;
  session_count(s, 1);
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
int rd_session_kind(const rd_session *s) { return s->kind; }
const char *rd_session_remote(const rd_session *s) {
  return s->client_key + strlen(s->client_key) + 1;
}
size_t rd_session_conn_count(const rd_session *s) { return s->conns.count; }
void rd_session_get_stats(const rd_session *s, rd_session_stats *out) { *out = s->stats; }
rd_conn *rd_session_conn(rd_session *s, int64_t id) { return rd_conn_find(s, id); }
int rd_session_has_room(const rd_session *s) { return rd_session_can_send(s) && !s->write_blocked; }

typedef struct {
  rd_session *s;
  rd_conn_info_cb cb;
  void *ctx;
} info_walk;

static void info_cb(rd_map_node *n, void *ctx) {
  info_walk *w = ctx;
  rd_conn_info info;
  rd_conn_fill_info((rd_conn *)n, &info);
  info.client_key = w->s->client_key;
  w->cb(w->ctx, &info);
}

void rd_session_foreach_conn(rd_session *s, rd_conn_info_cb cb, void *ctx) {
  info_walk w = {s, cb, ctx};
  rd_map_foreach(&s->conns, info_cb, &w);
}
