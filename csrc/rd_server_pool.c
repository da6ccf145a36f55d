/* The proxy route's pool of idle tunneled connections. A backend is one
 * tunneled connection seen through an in-memory pair (rd_io_new_pair): the
 * connection's local end is one end, the backend's io the other. While an
 * exchange uses it the exchange reads and writes the io; once a response
 * completes on a connection that may carry another, the backend comes here,
 * keyed by "client key, proto, address", newest last. An idle backend is
 * read so that anything that arrives (the far side's close reaches us as EOF on
 * the pair, stray bytes) drops it at once. The pool is bounded per target
 * and in total, and one timer closes backends idle past
 * proxy_pool_idle_timeout. Each backend holds a server reference, dropped
 * in backend_closed_cb (its one place of freeing); the pool's timer holds one
 * while the pool exists. */
#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_server_int.h"
#include "rd_session.h"

struct rd_proxy_pool {
  rd_backend *head, *tail; /* oldest first */
  size_t count;
  uv_timer_t timer;
};

static void pool_arm(rd_proxy_pool *p, rd_server *srv);

static void backend_closed_cb(rd_io *io) {
  rd_backend *be = rd_io_data(io);
  rd_server *srv = be->srv;
  rd_dial_status_unref(be->st);
  rd_free(be->target);
  rd_free(be);
  rd_srv_unref(srv);
}

rd_backend *rd_srv_backend_dial(rd_server *srv, rd_session *s, const char *proto,
                                const char *address, const char *target, char *err,
                                size_t errlen) {
  rd_backend *be = rd_calloc(1, sizeof *be);
  size_t tlen = strlen(target);
  char *t = be != NULL ? rd_malloc(tlen + 1) : NULL;
  if (t == NULL) {
    rd_free(be);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  memcpy(t, target, tlen + 1);
  if (rd_srv_dial_io(s, proto, address, &be->io, &be->st, &be->c, err, errlen) != RD_OK) {
    rd_free(t);
    rd_free(be);
    return NULL;
  }
  be->srv = srv;
  be->target = t;
  srv->refs++;
  rd_io_set_data(be->io, be);
  return be;
}

int rd_srv_backend_alive(const rd_backend *be) { return !atomic_load(&be->st->ended); }

void rd_srv_backend_close(rd_backend *be) {
  if (rd_srv_backend_alive(be))
    rd_conn_set_pooled(be->c, 0);
  rd_io_close(be->io, backend_closed_cb); /* the connection sees EOF and ends */
}

static void pool_unlink(rd_proxy_pool *p, rd_backend *be) {
  if (be->prev != NULL)
    be->prev->next = be->next;
  else
    p->head = be->next;
  if (be->next != NULL)
    be->next->prev = be->prev;
  else
    p->tail = be->prev;
  be->prev = be->next = NULL;
  p->count--;
}

static void pool_drop(rd_server *srv, rd_backend *be) {
  pool_unlink(srv->pool, be);
  rd_io_read_stop(be->io);
  rd_srv_backend_close(be);
}

static void idle_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)io;
  (void)suggested;
  static char scratch[64]; /* an idle backend's bytes are dropped with it */
  *buf = uv_buf_init(scratch, sizeof scratch);
}

/* Anything from an idle backend ends it: EOF (the far side closed), an
 * error, or bytes no request asked for. */
static void idle_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  if (nread == 0)
    return;
  rd_backend *be = rd_io_data(io);
  pool_drop(be->srv, be);
}

static void pool_timer_closed_cb(uv_handle_t *h) {
  rd_server *srv = h->data;
  rd_free(srv->pool);
  srv->pool = NULL;
  rd_srv_unref(srv);
}

static void pool_timer_cb(uv_timer_t *t) {
  rd_server *srv = t->data;
  rd_proxy_pool *p = srv->pool;
  uint64_t now = rd_now(), ttl = srv->cfg.proxy_pool_idle_timeout_ms;
  while (p->head != NULL && now - p->head->idle_since >= ttl)
    pool_drop(srv, p->head);
  pool_arm(p, srv);
}

/* The timer fires when the oldest backend's idle time runs out. */
static void pool_arm(rd_proxy_pool *p, rd_server *srv) {
  if (p->head == NULL) {
    uv_timer_stop(&p->timer);
    return;
  }
  uint64_t due = p->head->idle_since + srv->cfg.proxy_pool_idle_timeout_ms, now = rd_now();
  uv_timer_start(&p->timer, pool_timer_cb, due > now ? due - now : 0, 0);
}

static rd_proxy_pool *pool_get(rd_server *srv) {
  if (srv->pool == NULL) {
    rd_proxy_pool *p = rd_calloc(1, sizeof *p);
    if (p == NULL)
      return NULL;
    uv_timer_init(rd_loop(), &p->timer);
    p->timer.data = srv;
    srv->pool = p;
    srv->refs++;
  }
  return srv->pool;
}

void rd_srv_pool_put(rd_backend *be) {
  rd_server *srv = be->srv;
  const rd_server_config *cfg = &srv->cfg;
  rd_proxy_pool *p = NULL;
  if (srv->closing || cfg->proxy_pool_idle_timeout_ms == 0 || !rd_srv_backend_alive(be) ||
      (p = pool_get(srv)) == NULL) {
    rd_srv_backend_close(be);
    return;
  }
  size_t same = 0;
  for (rd_backend *o = p->head; o != NULL; o = o->next)
    same += strcmp(o->target, be->target) == 0;
  if (same >= cfg->proxy_pool_per_target) {
    rd_srv_backend_close(be);
    return;
  }
  if (p->count >= cfg->proxy_pool_max) /* full: the oldest idle backend makes room */
    pool_drop(srv, p->head);
  be->idle_since = rd_now();
  be->prev = p->tail;
  be->next = NULL;
  if (p->tail != NULL)
    p->tail->next = be;
  else
    p->head = be;
  p->tail = be;
  p->count++;
  rd_conn_set_pooled(be->c, 1);
  rd_io_read_start(be->io, idle_alloc_cb, idle_read_cb);
  if (p->head == be)
    pool_arm(p, srv);
}

rd_backend *rd_srv_pool_take(rd_server *srv, const char *target) {
  rd_proxy_pool *p = srv->pool;
  if (p == NULL)
    return NULL;
  for (rd_backend *be = p->tail; be != NULL; be = be->prev) {
    if (strcmp(be->target, target) != 0)
      continue;
    int was_head = p->head == be;
    pool_unlink(p, be);
    if (was_head)
      pool_arm(p, srv);
    if (!rd_srv_backend_alive(be)) { /* ended; its EOF not read yet */
      rd_io_read_stop(be->io);
      rd_srv_backend_close(be);
      return rd_srv_pool_take(srv, target);
    }
    rd_conn_set_pooled(be->c, 0);
    be->reused = 1;
    return be; /* still reading: the taker sets its own callbacks at once */
  }
  return NULL;
}

size_t rd_srv_pool_close_idle(rd_server *srv) {
  rd_proxy_pool *p = srv->pool;
  size_t n = 0;
  while (p != NULL && p->head != NULL) {
    pool_drop(srv, p->head);
    n++;
  }
  if (p != NULL)
    pool_arm(p, srv);
  return n;
}

void rd_srv_pool_close(rd_server *srv) {
  rd_srv_pool_close_idle(srv);
  if (srv->pool != NULL && !uv_is_closing((uv_handle_t *)&srv->pool->timer))
    uv_close((uv_handle_t *)&srv->pool->timer, pool_timer_closed_cb);
}

size_t rd_server_close_idle(rd_server *srv) { return rd_srv_pool_close_idle(srv); }
