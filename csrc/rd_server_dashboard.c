/* The server's operational routes: /healthz and /readyz (probes: always
 * served, no auth), and the dashboard: /debug/state (JSON of what is open,
 * since when, under which key), its two actions (POST /debug/close and
 * /debug/disconnect) and the page at /ui/. Everything renders into a buffer
 * freed before returning (responses copy what they write).
 *
 * Auth of the dashboard routes: HTTP Basic with the configured user and
 * password, or a bearer token of the server's token table; with neither
 * configured only loopback clients are answered. Credentials are compared
 * as SHA-256 digests with CRYPTO_memcmp, so timing shows neither length nor
 * bytes. */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "rd_alloc.h"
#include "rd_server_int.h"
#include "rd_textbuf.h"

#define STATE_LIMIT_DEFAULT 200
#define STATE_LIMIT_MAX 1000

static void respond_json(httpconn *hc, int status, const char *reason, textbuf *b) {
  if (b->failed)
    rd_srv_respond_text(hc, 500, "Internal Server Error", "out of memory");
  else
    rd_srv_http_respond_with(hc, status, reason, "application/json",
                             "Cache-Control: no-store\r\n", b->p, b->len);
  rd_free(b->p);
}

static void respond_error(httpconn *hc, int status, const char *reason, const char *msg) {
  textbuf b = {0};
  rd_tb_printf(&b, "{\"error\": ");
  rd_tb_json_str(&b, msg);
  rd_tb_printf(&b, "}\n");
  respond_json(hc, status, reason, &b);
}

static int path_is(const rd_http_request *req, size_t plen, const char *path) {
  return plen == strlen(path) && memcmp(req->target, path, plen) == 0;
}

static int method_is(const rd_http_request *req, const char *m) {
  return req->method_len == strlen(m) && memcmp(req->method, m, req->method_len) == 0;
}

/* ---- the query string ---- */

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* The decoded value of query parameter name into out: 1, 0 when absent,
 * -1 when malformed or longer than out. */
static int query_get(const rd_http_request *req, const char *name, char *out, size_t outlen) {
  const char *q = memchr(req->target, '?', req->target_len);
  if (q == NULL)
    return 0;
  const char *end = req->target + req->target_len;
  size_t nlen = strlen(name);
  for (const char *p = q + 1; p < end;) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    const char *pend = amp != NULL ? amp : end;
    const char *eq = memchr(p, '=', (size_t)(pend - p));
    const char *kend = eq != NULL ? eq : pend;
    if ((size_t)(kend - p) == nlen && memcmp(p, name, nlen) == 0) {
      size_t n = 0;
      for (const char *v = eq != NULL ? eq + 1 : pend; v < pend; v++) {
        int ch = (unsigned char)*v;
        if (ch == '+') {
          ch = ' ';
        } else if (ch == '%') {
          int hi = v + 2 < pend ? hexval(v[1]) : -1, lo = v + 2 < pend ? hexval(v[2]) : -1;
          if (hi < 0 || lo < 0)
            return -1;
          ch = hi * 16 + lo;
          v += 2;
        }
        if (ch == 0 || n + 1 >= outlen)
          return -1;
        out[n++] = (char)ch;
      }
      out[n] = '\0';
      return 1;
    }
    p = pend + 1;
  }
  return 0;
}

/* A non-negative decimal parameter: 1 with *out, 0 when absent, -1 when bad. */
static int query_count(const rd_http_request *req, const char *name, long long max,
                       long long *out) {
  char v[24];
  int rc = query_get(req, name, v, sizeof v);
  if (rc <= 0)
    return rc;
  char *end;
  long long n = strtoll(v, &end, 10);
  if (v[0] < '0' || v[0] > '9' || *end != '\0' || n < 0)
    return -1;
  *out = n > max ? max : n;
  return 1;
}

/* ---- auth ---- */

static void digest(const void *p, size_t len, unsigned char out[SHA256_DIGEST_LENGTH]) {
  SHA256(p, len, out);
}

static int from_loopback(httpconn *hc) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  if (uv_tcp_getpeername((uv_tcp_t *)rd_io_stream(hc->io), (struct sockaddr *)&ss, &len) != 0)
    return 0;
  if (ss.ss_family == AF_INET)
    return (ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr) >> 24) == 127;
  if (ss.ss_family == AF_INET6) {
    const unsigned char *a = ((struct sockaddr_in6 *)&ss)->sin6_addr.s6_addr;
    static const unsigned char loop6[16] = {[15] = 1};
    static const unsigned char mapped[12] = {[10] = 0xff, [11] = 0xff};
    return memcmp(a, loop6, 16) == 0 || (memcmp(a, mapped, 12) == 0 && a[12] == 127);
  }
  return 0;
}

static int has_basic(const rd_server *srv) { return srv->cfg.dashboard_user[0] != '\0'; }
static int has_bearer(const rd_server *srv) {
  return srv->cfg.auth_mode == RD_AUTH_TOKEN && srv->cfg.tokens != NULL;
}

/* Whether the Basic credential b64[0..len) is the configured one. */
static int basic_matches(const rd_server *srv, const char *b64, size_t len) {
  char pair[sizeof srv->cfg.dashboard_user + sizeof srv->cfg.dashboard_password + 1];
  int n = snprintf(pair, sizeof pair, "%s:%s", srv->cfg.dashboard_user,
                   srv->cfg.dashboard_password);
  unsigned char want_b64[4 * (sizeof pair + 2) / 3 + 4];
  int wlen = EVP_EncodeBlock(want_b64, (const unsigned char *)pair, n);
  OPENSSL_cleanse(pair, sizeof pair);
  unsigned char want[SHA256_DIGEST_LENGTH], got[SHA256_DIGEST_LENGTH];
  digest(want_b64, (size_t)wlen, want);
  digest(b64, len, got);
  OPENSSL_cleanse(want_b64, sizeof want_b64);
  return CRYPTO_memcmp(want, got, sizeof want) == 0;
}

/* 1 when the request may use the dashboard routes; else answers 401 or 403
 * and returns 0. strict: the dashboard's rule (loopback only without a
 * credential); else (/debug/state under debug_route alone) open without one. */
static int authorized(httpconn *hc, const rd_http_request *req, int strict) {
  rd_server *srv = hc->srv;
  int basic = has_basic(srv), bearer = strict && has_bearer(srv);
  if (!basic && !bearer) {
    if (!strict || from_loopback(hc))
      return 1;
    respond_error(hc, 403, "Forbidden",
                  "the dashboard has no credential configured: loopback clients only");
    return 0;
  }
  const rd_http_header *h =
      rd_http_find_header(req->headers, req->num_headers, "Authorization");
  int ok = 0;
  if (h != NULL && basic && h->value_len > 6 && rd_http_ieq("Basic ", h->value, 6))
    ok = basic_matches(srv, h->value + 6, h->value_len - 6);
  else if (h != NULL && bearer && h->value_len > 7 && rd_http_ieq("Bearer ", h->value, 7))
    ok = rd_tokens_lookup(srv->cfg.tokens, h->value + 7, h->value_len - 7) != NULL;
  if (ok)
    return 1;
  textbuf b = {0};
  rd_tb_printf(&b, "{\"error\": \"unauthorized\"}\n");
  if (b.failed) {
    rd_srv_respond_text(hc, 500, "Internal Server Error", "out of memory");
  } else {
    rd_srv_http_respond_with(hc, 401, "Unauthorized", "application/json",
                             "WWW-Authenticate: Basic realm=\"remotedialer\"\r\n", b.p, b.len);
  }
  rd_free(b.p);
  return 0;
}

/* ---- probes ---- */

typedef struct {
  textbuf *b;
  int down;
} ready_walk;

static void ready_peer_cb(void *ctx, const rd_peer_info *p) {
  ready_walk *w = ctx;
  if (strcmp(p->state, "connected") == 0)
    return;
  w->down++;
  rd_tb_printf(w->b, "peer %s not connected (%s", p->id, p->state);
  if (p->last_error[0] != '\0')
    rd_tb_printf(w->b, ": %s", p->last_error);
  rd_tb_printf(w->b, ")\n");
}

/* Ready: the listener serves (we are answering), and every configured
 * peer's link is connected (a dial may need any of them). */
static void handle_readyz(httpconn *hc) {
  textbuf b = {0};
  ready_walk w = {&b, 0};
  rd_server_foreach_peer(hc->srv, ready_peer_cb, &w);
  if (b.failed)
    rd_srv_respond_text(hc, 500, "Internal Server Error", "out of memory");
  else if (w.down > 0)
    rd_srv_http_respond(hc, 503, "Service Unavailable", "text/plain; charset=utf-8", b.p, b.len);
  else
    rd_srv_respond_text(hc, 200, "OK", "ok\n");
  rd_free(b.p);
}

/* ---- /debug/state ---- */

/* Session keys are random int64s: rendered as JSON strings, since
 * JavaScript numbers hold only 53 bits. */

/* One connection row: the info's strings point into the connection, valid
 * for the whole (synchronous) rendering. */
typedef struct {
  rd_conn_info info;
  int64_t session_key;
} conn_row;

typedef struct {
  textbuf *b;
  int first;
  /* connections */
  conn_row *rows;
  size_t nrows, cap, open;
  const char *filter;
  int64_t session_key;
  /* registry sums */
  double added, removed, tx, rx;
} state_walk;

static void conn_collect_cb(void *ctx, const rd_conn_info *c) {
  state_walk *w = ctx;
  w->open++;
  if (w->filter[0] != '\0' && strstr(c->client_key, w->filter) == NULL &&
      strstr(c->address, w->filter) == NULL && strstr(c->proto, w->filter) == NULL)
    return;
  if (w->nrows == w->cap) {
    size_t cap = w->cap ? w->cap * 2 : 256;
    conn_row *r = rd_realloc(w->rows, cap * sizeof *r);
    if (r == NULL) {
      w->b->failed = 1;
      return;
    }
    w->rows = r;
    w->cap = cap;
  }
  w->rows[w->nrows++] = (conn_row){*c, w->session_key};
}

static void agent_row(state_walk *w, rd_session *s, int peer, double now) {
  rd_session_stats st;
  rd_session_get_stats(s, &st);
  rd_tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
  w->first = 0;
  rd_tb_printf(w->b, "{\"clientkey\": ");
  rd_tb_json_str(w->b, rd_session_client_key(s));
  rd_tb_printf(w->b, ", \"session_key\": \"%lld\", \"remote\": ", (long long)rd_session_key(s));
  rd_tb_json_str(w->b, rd_session_remote(s));
  rd_tb_printf(w->b,
               ", \"since\": %.3f, \"connected_seconds\": %.3f, \"peer\": %s, "
               "\"connections\": %zu, \"tx_bytes\": %llu, \"rx_bytes\": %llu, "
               "\"connections_added\": %llu, \"connections_removed\": %llu}",
               st.since, now - st.since, peer ? "true" : "false", rd_session_conn_count(s),
               (unsigned long long)st.tx_bytes, (unsigned long long)st.rx_bytes,
               (unsigned long long)st.conns_added, (unsigned long long)st.conns_removed);
}

typedef struct {
  state_walk *w;
  double now;
} agent_walk;

static void agent_entry_cb(rd_map_node *n, void *ctx) {
  agent_walk *a = ctx;
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count; i++)
    agent_row(a->w, e->sessions[i], 0, a->now);
}

static void agent_peer_cb(void *ctx, rd_session *s) {
  agent_walk *a = ctx;
  agent_row(a->w, s, 1, a->now);
}

static void key_entry_cb(rd_map_node *n, void *ctx) {
  state_walk *w = ctx;
  client_entry *e = (client_entry *)n;
  uint64_t added = e->past_added, removed = e->past_removed;
  size_t open = 0;
  for (size_t i = 0; i < e->count; i++) {
    rd_session_stats st;
    rd_session_get_stats(e->sessions[i], &st);
    added += st.conns_added;
    removed += st.conns_removed;
    open += rd_session_conn_count(e->sessions[i]);
  }
  rd_tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
  w->first = 0;
  rd_tb_printf(w->b, "{\"clientkey\": ");
  rd_tb_json_str(w->b, e->key);
  rd_tb_printf(w->b,
               ", \"sessions\": %zu, \"connections\": %zu, \"connections_added\": %llu, "
               "\"connections_removed\": %llu}",
               e->count, open, (unsigned long long)added, (unsigned long long)removed);
}

static void conn_session(state_walk *w, rd_session *s) {
  w->session_key = rd_session_key(s);
  rd_session_foreach_conn(s, conn_collect_cb, w);
}

static void conn_entry_cb(rd_map_node *n, void *ctx) {
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count; i++)
    conn_session(ctx, e->sessions[i]);
}

static void conn_peer_cb(void *ctx, rd_session *s) { conn_session(ctx, s); }

static void sum_cb(void *ctx, const rd_metric_family_info *family,
                   const char *const *label_values, double value) {
  (void)label_values;
  state_walk *w = ctx;
  if (family == rd_metrics_family(RD_M_ADD_CONNECTIONS))
    w->added += value;
  else if (family == rd_metrics_family(RD_M_REMOVE_CONNECTIONS))
    w->removed += value;
  else if (family == rd_metrics_family(RD_M_TRANSMIT_BYTES))
    w->tx += value;
  else if (family == rd_metrics_family(RD_M_RECEIVE_BYTES))
    w->rx += value;
}

/* The sort orders; each breaks ties by session key and id so pages are
 * stable between polls. */
static int cmp_tail(const conn_row *a, const conn_row *b) {
  if (a->session_key != b->session_key)
    return a->session_key < b->session_key ? -1 : 1;
  return a->info.id < b->info.id ? -1 : a->info.id > b->info.id;
}
static int cmp_age(const void *x, const void *y) {
  const conn_row *a = x, *b = y;
  if (a->info.age != b->info.age)
    return a->info.age < b->info.age ? -1 : 1;
  return cmp_tail(a, b);
}
static int cmp_idle(const void *x, const void *y) {
  const conn_row *a = x, *b = y;
  if (a->info.idle != b->info.idle)
    return a->info.idle < b->info.idle ? -1 : 1;
  return cmp_tail(a, b);
}
static int cmp_bytes(const void *x, const void *y) {
  const conn_row *a = x, *b = y;
  uint64_t na = a->info.tx_bytes + a->info.rx_bytes, nb = b->info.tx_bytes + b->info.rx_bytes;
  if (na != nb)
    return na < nb ? -1 : 1;
  return cmp_tail(a, b);
}
static int cmp_key(const void *x, const void *y) {
  const conn_row *a = x, *b = y;
  int c = strcmp(a->info.client_key, b->info.client_key);
  return c != 0 ? c : cmp_tail(a, b);
}

static void conn_row_json(textbuf *b, const conn_row *r, int first) {
  const rd_conn_info *c = &r->info;
  rd_tb_put(b, first ? "\n  " : ",\n  ", first ? 3 : 4);
  rd_tb_printf(b, "{\"session_key\": \"%lld\", \"id\": %lld, \"clientkey\": ",
               (long long)r->session_key, (long long)c->id);
  rd_tb_json_str(b, c->client_key);
  rd_tb_printf(b, ", \"proto\": ");
  rd_tb_json_str(b, c->proto);
  rd_tb_printf(b, ", \"address\": ");
  rd_tb_json_str(b, c->address);
  rd_tb_printf(b,
               ", \"age\": %.3f, \"idle\": %.3f, \"state\": \"%s\", \"tx_bytes\": %llu, "
               "\"rx_bytes\": %llu, \"paused\": %s, \"buffered\": %zu}",
               c->age, c->idle, c->state, (unsigned long long)c->tx_bytes,
               (unsigned long long)c->rx_bytes, c->paused ? "true" : "false", c->buffered);
}

static double wall_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void handle_state(httpconn *hc, const rd_http_request *req) {
  rd_server *srv = hc->srv;
  long long offset = 0, limit = STATE_LIMIT_DEFAULT;
  char sort[16] = "age", order[8] = "", filter[256] = "";
  if (query_count(req, "offset", 1LL << 40, &offset) < 0 ||
      query_count(req, "limit", STATE_LIMIT_MAX, &limit) < 0) {
    respond_error(hc, 400, "Bad Request", "offset and limit must be non-negative integers");
    return;
  }
  if (query_get(req, "sort", sort, sizeof sort) < 0 || query_get(req, "order", order, sizeof order) < 0 ||
      query_get(req, "filter", filter, sizeof filter) < 0) {
    respond_error(hc, 400, "Bad Request", "malformed query parameter");
    return;
  }
  int (*cmp)(const void *, const void *) = NULL;
  int desc = 1; /* oldest, longest idle, busiest first; keys A to Z */
  if (strcmp(sort, "age") == 0) {
    cmp = cmp_age;
  } else if (strcmp(sort, "idle") == 0) {
    cmp = cmp_idle;
  } else if (strcmp(sort, "bytes") == 0) {
    cmp = cmp_bytes;
  } else if (strcmp(sort, "key") == 0) {
    cmp = cmp_key;
    desc = 0;
  } else {
    respond_error(hc, 400, "Bad Request", "sort must be age, idle, bytes or key");
    return;
  }
  if (strcmp(order, "asc") == 0)
    desc = 0;
  else if (strcmp(order, "desc") == 0)
    desc = 1;
  else if (order[0] != '\0') {
    respond_error(hc, 400, "Bad Request", "order must be asc or desc");
    return;
  }

  textbuf b = {0};
  state_walk w = {.b = &b, .first = 1, .filter = filter};
  double now = wall_now();
  /* The heap counter alone: rd_stats_collect also counts the process's
   * descriptors by reading /proc/self/fd, which with 10,000 connections open
   * took most of the time of an answer. */
  int64_t heap = rd_alloc_bytes();
  rd_metrics_foreach(srv->metrics, sum_cb, &w);
  rd_map_foreach(&srv->clients, conn_entry_cb, &w);
  rd_srv_peers_foreach_session(srv, conn_peer_cb, &w);
  if (w.nrows > 1)
    qsort(w.rows, w.nrows, sizeof *w.rows, cmp);

  rd_tb_printf(&b, "{\"time\": %.3f,\n\"totals\": {\"sessions\": %zu, \"connections\": %zu, ", now,
               srv->sessions, w.open);
  rd_tb_printf(&b,
               "\"connections_added\": %.0f, \"connections_removed\": %.0f, "
               "\"heap_bytes\": %lld, \"tx_bytes\": %.0f, \"rx_bytes\": %.0f},\n",
               w.added, w.removed, (long long)heap, w.tx, w.rx);
  rd_tb_printf(&b, "\"agents\": [");
  agent_walk a = {&w, now};
  rd_map_foreach(&srv->clients, agent_entry_cb, &a);
  rd_srv_peers_foreach_session(srv, agent_peer_cb, &a);
  rd_tb_printf(&b, "\n],\n\"keys\": [");
  w.first = 1;
  rd_map_foreach(&srv->clients, key_entry_cb, &w);
  rd_tb_printf(&b, "\n],\n\"connections\": {\"total\": %zu, \"offset\": %lld, \"limit\": %lld, "
               "\"sort\": \"%s\", \"order\": \"%s\", \"filter\": ",
               w.nrows, offset, limit, sort, desc ? "desc" : "asc");
  rd_tb_json_str(&b, filter);
  rd_tb_printf(&b, ", \"rows\": [");
  for (long long i = 0; i < limit && (size_t)(offset + i) < w.nrows; i++) {
    size_t k = (size_t)(offset + i);
    conn_row_json(&b, &w.rows[desc ? w.nrows - 1 - k : k], i == 0);
  }
  rd_tb_printf(&b, "\n]}}\n");
  rd_free(w.rows);
  respond_json(hc, 200, "OK", &b);
}

/* ---- actions ---- */

typedef struct {
  int64_t key;
  rd_session *found;
} find_walk;

static void find_entry_cb(rd_map_node *n, void *ctx) {
  find_walk *f = ctx;
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count && f->found == NULL; i++)
    if (rd_session_key(e->sessions[i]) == f->key)
      f->found = e->sessions[i];
}

static void find_peer_cb(void *ctx, rd_session *s) {
  find_walk *f = ctx;
  if (f->found == NULL && rd_session_key(s) == f->key)
    f->found = s;
}

/* POST /debug/close?session=S&id=N: ends that connection as if its local
 * end had failed, so the far side hears why. */
static void handle_close(httpconn *hc, const rd_http_request *req) {
  char sv[24], iv[24];
  char *end1 = NULL, *end2 = NULL;
  long long skey = 0, id = 0;
  if (query_get(req, "session", sv, sizeof sv) == 1)
    skey = strtoll(sv, &end1, 10);
  if (query_get(req, "id", iv, sizeof iv) == 1)
    id = strtoll(iv, &end2, 10);
  if (end1 == NULL || end2 == NULL || end1 == sv || end2 == iv || *end1 != '\0' || *end2 != '\0') {
    respond_error(hc, 400, "Bad Request", "close needs session=SESSION_KEY and id=CONNECTION_ID");
    return;
  }
  find_walk f = {skey, NULL};
  rd_map_foreach(&hc->srv->clients, find_entry_cb, &f);
  rd_srv_peers_foreach_session(hc->srv, find_peer_cb, &f);
  rd_conn *c = f.found != NULL ? rd_session_conn(f.found, id) : NULL;
  if (c == NULL) {
    respond_error(hc, 404, "Not Found", "no such connection");
    return;
  }
  rd_conn_close(c, "closed from the dashboard");
  textbuf b = {0};
  rd_tb_printf(&b, "{\"closed\": {\"session_key\": \"%lld\", \"id\": %lld}}\n", skey, id);
  respond_json(hc, 200, "OK", &b);
}

/* POST /debug/disconnect?key=K: what Server.disconnect(K) does. */
static void handle_disconnect(httpconn *hc, const rd_http_request *req) {
  char key[256];
  if (query_get(req, "key", key, sizeof key) != 1 || key[0] == '\0') {
    respond_error(hc, 400, "Bad Request", "disconnect needs key=CLIENT_KEY");
    return;
  }
  if (!rd_server_has_session(hc->srv, key)) {
    respond_error(hc, 404, "Not Found", "no session for that client key");
    return;
  }
  size_t n = rd_server_disconnect(hc->srv, key);
  textbuf b = {0};
  rd_tb_printf(&b, "{\"disconnected\": %zu}\n", n);
  respond_json(hc, 200, "OK", &b);
}

/* ---- dispatch ---- */

int rd_srv_dashboard_route(httpconn *hc, rd_http_request *req, size_t plen) {
  rd_server *srv = hc->srv;
  int dash = srv->cfg.dashboard;
  if (path_is(req, plen, "/healthz")) {
    rd_srv_respond_text(hc, 200, "OK", "ok\n");
  } else if (path_is(req, plen, "/readyz")) {
    handle_readyz(hc);
  } else if ((dash || srv->cfg.debug_route) && path_is(req, plen, "/debug/state")) {
    if (authorized(hc, req, dash))
      handle_state(hc, req);
  } else if (dash && (path_is(req, plen, "/debug/close") || path_is(req, plen, "/debug/disconnect"))) {
    if (!authorized(hc, req, 1))
      return 1;
    if (!method_is(req, "POST"))
      rd_srv_http_respond_with(hc, 405, "Method Not Allowed", "application/json",
                               "Allow: POST\r\n", "{\"error\": \"use POST\"}\n", 22);
    else if (plen == 12)
      handle_close(hc, req);
    else
      handle_disconnect(hc, req);
  } else if (dash && path_is(req, plen, "/ui")) {
    rd_srv_http_respond_with(hc, 301, "Moved Permanently", "text/plain; charset=utf-8",
                             "Location: /ui/\r\n", "/ui/\n", 5);
  } else if (dash && path_is(req, plen, "/ui/")) {
    if (!authorized(hc, req, 1))
      return 1;
    if (srv->cfg.dashboard_html == NULL)
      rd_srv_respond_text(hc, 503, "Service Unavailable", "the dashboard page was not loaded\n");
    else
      rd_srv_http_respond_with(hc, 200, "OK", "text/html; charset=utf-8",
                               "Cache-Control: no-store\r\n", srv->cfg.dashboard_html,
                               srv->cfg.dashboard_html_len);
  } else {
    return 0;
  }
  return 1;
}
