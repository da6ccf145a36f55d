/* The server. It owns its listener, the HTTP connections not yet upgraded,
 * its sessions (through the client table) and its forwards; it is freed when
 * the last of them is gone, and only then does its close command finish. */
#include "rd_server.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_http.h"
#include "rd_io.h"
#include "rd_relay.h"
#include "rd_stats.h"
#include "rd_ws.h"

typedef struct httpconn httpconn;
typedef struct client_entry client_entry;
typedef struct rd_forward rd_forward;

struct client_entry {
  rd_map_node node;
  char *key;
  rd_session **sessions; /* oldest first */
  size_t count, cap;
};

typedef struct room_wait room_wait;

struct rd_server {
  rd_object obj;
  room_wait *room_waits; /* dials waiting for room on their session */
  rd_server_config cfg;
  uv_tcp_t listener;
  rd_metrics *metrics;
  rd_map clients;
  httpconn *httpconns;
  rd_forward *forwards;
  size_t sessions; /* live sessions */
  int refs; /* listener + sessions + httpconns + forwards */
  int closing;
  rd_cmd *close_waiter;
};

struct httpconn {
  httpconn *prev, *next;
  rd_server *srv;
  rd_io *io;
  uv_timer_t timer;
  char *buf;
  size_t len;
  int handles_open;
  int done;         /* answered or handed over: ignore further input */
  rd_request *auth; /* in flight */
  size_t head_len;
};

struct rd_forward {
  rd_object obj;
  rd_forward *prev, *next;
  rd_server *srv;
  uv_tcp_t listener;
  char *key, *proto, *address;
  rd_cmd *close_waiter;
  int closed;
};

void rd_server_config_default(rd_server_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  snprintf(cfg->path, sizeof cfg->path, "/connect");
  cfg->auth_mode = RD_AUTH_HEADER;
  snprintf(cfg->auth_header, sizeof cfg->auth_header, "X-Tunnel-ID");
  cfg->proxy_route = 1;
  cfg->metrics_route = 1;
  cfg->handshake_timeout_ms = 5000;
  cfg->max_head = 16384;
  cfg->max_headers = 64;
  cfg->max_sessions = 65536;
  cfg->max_sessions_per_key = 64;
  rd_session_config_default(&cfg->session);
}

uint64_t rd_server_handle(const rd_server *srv) { return srv->obj.handle; }
rd_metrics *rd_server_metrics(rd_server *srv) { return srv->metrics; }

static void server_unref(rd_server *srv) {
  if (--srv->refs > 0)
    return;
  if (srv->cfg.tls != NULL)
    rd_tls_ctx_unref(srv->cfg.tls);
  if (srv->cfg.proxy_tls != NULL)
    rd_tls_ctx_unref(srv->cfg.proxy_tls);
  rd_tokens_free(srv->cfg.tokens);
  rd_metrics_free(srv->metrics);
  rd_map_dispose(&srv->clients);
  rd_cmd *waiter = srv->close_waiter;
  rd_free(srv);
  if (waiter != NULL)
    rd_cmd_finish(waiter, RD_OK, NULL);
}

/* ---- the client table ---- */

static client_entry *client_find(rd_server *srv, const char *key) {
  size_t len = strlen(key);
  for (rd_map_node *n = rd_map_find(&srv->clients, rd_hash_str(key, len)); n != NULL;
       n = rd_map_next_same(n)) {
    client_entry *e = (client_entry *)n;
    if (strcmp(e->key, key) == 0)
      return e;
  }
  return NULL;
}

static int client_add(rd_server *srv, const char *key, rd_session *s) {
  client_entry *e = client_find(srv, key);
  if (e == NULL) {
    e = rd_calloc(1, sizeof *e);
    if (e == NULL || (e->key = rd_strndup(key, strlen(key))) == NULL) {
      rd_free(e);
      return RD_ENOMEM;
    }
    if (rd_map_insert(&srv->clients, &e->node, rd_hash_str(key, strlen(key))) != RD_OK) {
      rd_free(e->key);
      rd_free(e);
      return RD_ENOMEM;
    }
  }
  if (e->count == e->cap) {
    size_t cap = e->cap ? e->cap * 2 : 2;
    rd_session **a = rd_realloc(e->sessions, cap * sizeof *a);
    if (a == NULL) {
      if (e->count == 0) {
        rd_map_remove(&srv->clients, &e->node);
        rd_free(e->key);
        rd_free(e);
      }
      return RD_ENOMEM;
    }
    e->sessions = a;
    e->cap = cap;
  }
  e->sessions[e->count++] = s;
  srv->sessions++;
  return RD_OK;
}

static void client_remove(rd_server *srv, rd_session *s) {
  client_entry *e = client_find(srv, rd_session_client_key(s));
  if (e == NULL)
    return;
  for (size_t i = 0; i < e->count; i++) {
    if (e->sessions[i] == s) {
      memmove(&e->sessions[i], &e->sessions[i + 1], (e->count - i - 1) * sizeof *e->sessions);
      e->count--;
      srv->sessions--;
      break;
    }
  }
  if (e->count == 0) {
    rd_map_remove(&srv->clients, &e->node);
    rd_free(e->sessions);
    rd_free(e->key);
    rd_free(e);
  }
}

static rd_session *session_for(rd_server *srv, const char *key) {
  client_entry *e = client_find(srv, key);
  return e != NULL && e->count > 0 ? e->sessions[0] : NULL;
}

static void room_waits_wake(rd_server *srv, rd_session *s, int ended);
static void session_on_room(rd_session *s, void *owner);

static void session_on_end(rd_session *s, void *owner, const char *reason) {
  (void)reason;
  client_remove(owner, s);
  room_waits_wake(owner, s, 1);
}

static void session_on_freed(void *owner) { server_unref(owner); }

/* Agents' CONNECTs are refused (on_connect unset): a server dials, it is not
 * dialed. */
static const rd_session_owner server_session_ops = {
    .on_end = session_on_end, .on_freed = session_on_freed, .on_room = session_on_room};

/* ---- HTTP connections before the upgrade ---- */

static void tcp_free_cb(uv_handle_t *h) { rd_free(h); }

/* A stream io on one end of a socket pair (plain when tls is NULL). Takes fd
 * and tls in every case: on failure both are released, and the code and err
 * say why. */
static int io_on_fd(int fd, rd_tls *tls, rd_io **out, char *err, size_t errlen) {
  uv_pipe_t *pipe = rd_malloc(sizeof(uv_tcp_t) > sizeof(uv_pipe_t) ? sizeof(uv_tcp_t) : sizeof(uv_pipe_t));
  if (pipe == NULL) {
    close(fd);
    rd_tls_free(tls);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  uv_pipe_init(rd_loop(), pipe, 0);
  int rc = uv_pipe_open(pipe, fd);
  if (rc != 0) {
    close(fd);
    rd_tls_free(tls);
    uv_close((uv_handle_t *)pipe, tcp_free_cb);
    snprintf(err, errlen, "pipe: %s", rd_strerror(rc));
    return rc;
  }
  if ((*out = rd_io_new((uv_stream_t *)pipe, tls)) == NULL) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  return RD_OK;
}

static void httpconn_free_if_closed(httpconn *hc) {
  if (--hc->handles_open > 0)
    return;
  rd_server *srv = hc->srv;
  rd_free(hc->buf);
  rd_free(hc);
  server_unref(srv);
}

static void httpconn_unlink(httpconn *hc) {
  if (hc->prev != NULL)
    hc->prev->next = hc->next;
  else if (hc->srv->httpconns == hc)
    hc->srv->httpconns = hc->next;
  if (hc->next != NULL)
    hc->next->prev = hc->prev;
  hc->prev = hc->next = NULL;
}

static void httpconn_timer_closed_cb(uv_handle_t *h) { httpconn_free_if_closed(h->data); }
static void httpconn_io_closed_cb(rd_io *io) { httpconn_free_if_closed(rd_io_data(io)); }

/* Closes the HTTP connection, first writing plain_answer around TLS when
 * given. If the stream was handed over (io NULL) only the timer remains to
 * close. */
static void httpconn_close_answering(httpconn *hc, const char *plain_answer) {
  if (hc->done == 2)
    return;
  hc->done = 2;
  httpconn_unlink(hc);
  if (hc->auth != NULL) {
    hc->auth->target = NULL;
    hc->auth = NULL;
  }
  uv_close((uv_handle_t *)&hc->timer, httpconn_timer_closed_cb);
  if (hc->io == NULL)
    return;
  if (plain_answer != NULL)
    rd_io_reject_plain(hc->io, plain_answer, strlen(plain_answer), httpconn_io_closed_cb);
  else
    rd_io_close(hc->io, httpconn_io_closed_cb);
}

static void httpconn_close(httpconn *hc) { httpconn_close_answering(hc, NULL); }

static void response_shutdown_cb(rd_io *io, int status) {
  (void)status;
  httpconn_close(rd_io_data(io));
}

typedef struct {
  uv_write_t req;
  char data[];
} owned_write;

static void owned_write_cb(uv_write_t *req, int status) {
  (void)status;
  rd_free(req);
}

/* Writes bytes whose buffer the write itself owns, so the stream can change
 * owners (upgrade) while it is in flight. */
static int write_owned(rd_io *io, const char *data, size_t len) {
  owned_write *w = rd_malloc(sizeof *w + len);
  if (w == NULL)
    return RD_ENOMEM;
  memcpy(w->data, data, len);
  uv_buf_t buf = uv_buf_init(w->data, (unsigned)len);
  int rc = rd_io_write(io, &w->req, &buf, 1, owned_write_cb);
  if (rc != 0)
    rd_free(w);
  return rc;
}

/* Answers a plain HTTP response and closes after it is written. */
static void http_respond(httpconn *hc, int status, const char *reason, const char *ctype,
                         const char *body, size_t body_len) {
  if (hc->done)
    return;
  hc->done = 1;
  rd_io_read_stop(hc->io);
  char head[256];
  int n = snprintf(head, sizeof head,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                   "Connection: close\r\n\r\n",
                   status, reason, ctype, body_len);
  if (write_owned(hc->io, head, (size_t)n) != 0 ||
      (body_len > 0 && write_owned(hc->io, body, body_len) != 0) ||
      rd_io_shutdown(hc->io, response_shutdown_cb) != 0)
    httpconn_close(hc);
}

static void respond_text(httpconn *hc, int status, const char *reason, const char *text) {
  http_respond(hc, status, reason, "text/plain; charset=utf-8", text, strlen(text));
}

/* Hands the stream over (to a session or a tunneled connection). */
static rd_io *httpconn_take_stream(httpconn *hc) {
  rd_io *io = hc->io;
  rd_io_read_stop(io);
  hc->io = NULL;
  hc->handles_open--;
  hc->done = 1;
  httpconn_close(hc);
  return io;
}

static void upgrade_accept(httpconn *hc, const char *client_key) {
  rd_server *srv = hc->srv;
  if (srv->sessions >= srv->cfg.max_sessions) {
    respond_text(hc, 503, "Service Unavailable", "too many sessions");
    return;
  }
  client_entry *e = client_find(srv, client_key);
  if (e != NULL && e->count >= srv->cfg.max_sessions_per_key) {
    char msg[320];
    snprintf(msg, sizeof msg, "too many sessions for client %s", client_key);
    respond_text(hc, 429, "Too Many Requests", msg);
    return;
  }
  rd_http_request req;
  rd_http_parse_request(hc->buf, hc->head_len, srv->cfg.max_head, srv->cfg.max_headers, &req);
  const rd_http_header *key = rd_http_find_header(req.headers, req.num_headers, "Sec-WebSocket-Key");
  char accept[29];
  if (rd_ws_accept_key(key->value, key->value_len, accept) != RD_OK) {
    respond_text(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  char resp[160];
  int n = snprintf(resp, sizeof resp,
                   "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                   accept);
  if (write_owned(hc->io, resp, (size_t)n) != 0) {
    httpconn_close(hc);
    return;
  }
  size_t leftover = hc->len - hc->head_len;
  const uint8_t *rest = (const uint8_t *)hc->buf + hc->head_len;
  rd_io *io = httpconn_take_stream(hc); /* hc is closing; buf lives until its close cb */
  srv->refs++;
  rd_session *s = rd_session_new(io, RD_ROLE_SERVER, client_key, 0, srv->metrics,
                                 &srv->cfg.session, &server_session_ops, srv, rest, leftover);
  if (s == NULL) {
    server_unref(srv);
    return;
  }
  if (rd_session_is_ended(s))
    return; /* ended while reading the leftover bytes: never registered */
  if (client_add(srv, client_key, s) != RD_OK)
    rd_session_end(s, RD_WS_CLOSE_GOING_AWAY, "out of memory");
}

static void auth_answer_cb(rd_request *req, rd_verdict verdict, const char *value) {
  httpconn *hc = req->target;
  hc->auth = NULL;
  if (verdict == RD_VERDICT_ACCEPT && value != NULL && value[0] != '\0')
    upgrade_accept(hc, value);
  else if (verdict == RD_VERDICT_ERROR)
    respond_text(hc, 400, "Bad Request", value != NULL ? value : "authorizer failed");
  else if (verdict == RD_VERDICT_CLOSED)
    respond_text(hc, 503, "Service Unavailable", "server closing");
  else
    respond_text(hc, 401, "Unauthorized", "failed authentication");
}

static char *format_remote(uv_tcp_t *tcp, char *out, size_t outlen) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  out[0] = '\0';
  if (uv_tcp_getpeername(tcp, (struct sockaddr *)&ss, &len) != 0)
    return out;
  char ip[64] = "";
  int port;
  if (ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  } else {
    uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  }
  rd_addr_join(out, outlen, ip, strlen(ip), port);
  return out;
}

static void handle_upgrade(httpconn *hc, rd_http_request *req) {
  rd_server *srv = hc->srv;
  const rd_http_header *h;
  if (!(req->method_len == 3 && memcmp(req->method, "GET", 3) == 0)) {
    respond_text(hc, 405, "Method Not Allowed", "websocket: the client is not using the websocket protocol: request method is not GET");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Connection");
  if (h == NULL || !rd_http_has_token(h->value, h->value_len, "upgrade")) {
    respond_text(hc, 400, "Bad Request", "websocket: the client is not using the websocket protocol: 'upgrade' token not found in 'Connection' header");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Upgrade");
  if (h == NULL || !rd_http_has_token(h->value, h->value_len, "websocket")) {
    respond_text(hc, 400, "Bad Request", "websocket: the client is not using the websocket protocol: 'websocket' token not found in 'Upgrade' header");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Sec-WebSocket-Version");
  if (h == NULL || h->value_len != 2 || memcmp(h->value, "13", 2) != 0) {
    respond_text(hc, 400, "Bad Request", "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Sec-WebSocket-Key");
  if (h == NULL || h->value_len == 0) {
    respond_text(hc, 400, "Bad Request", "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header is missing or blank");
    return;
  }
  if (srv->cfg.auth_mode == RD_AUTH_TOKEN) {
    h = rd_http_find_header(req->headers, req->num_headers, "Authorization");
    const char *key = NULL;
    if (h != NULL && h->value_len > 7 && rd_http_ieq("Bearer ", h->value, 7))
      key = rd_tokens_lookup(srv->cfg.tokens, h->value + 7, h->value_len - 7);
    if (key == NULL)
      respond_text(hc, 401, "Unauthorized", "failed authentication");
    else
      upgrade_accept(hc, key);
    return;
  }
  if (srv->cfg.auth_mode == RD_AUTH_HEADER) {
    h = rd_http_find_header(req->headers, req->num_headers, srv->cfg.auth_header);
    if (h == NULL || h->value_len == 0) {
      respond_text(hc, 401, "Unauthorized", "failed authentication");
      return;
    }
    char key[256];
    if (h->value_len >= sizeof key) {
      respond_text(hc, 400, "Bad Request", "client key too long");
      return;
    }
    memcpy(key, h->value, h->value_len);
    key[h->value_len] = '\0';
    upgrade_accept(hc, key);
    return;
  }
  /* Ask Python. The request carries copies: Python reads them on its thread. */
  rd_request *r = rd_request_new(RD_REQ_AUTH);
  size_t hlen = 0;
  for (size_t i = 0; i < req->num_headers; i++)
    hlen += req->headers[i].name_len + req->headers[i].value_len + 2;
  char remote[80];
  format_remote((uv_tcp_t *)rd_io_stream(hc->io), remote, sizeof remote);
  if (r == NULL || (r->auth.method = rd_strndup(req->method, req->method_len)) == NULL ||
      (r->auth.path = rd_strndup(req->target, req->target_len)) == NULL ||
      (r->auth.remote = rd_strndup(remote, strlen(remote))) == NULL ||
      (r->auth.headers = rd_malloc(hlen + 1)) == NULL) {
    if (r != NULL)
      rd_request_free(r);
    respond_text(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  char *p = r->auth.headers;
  for (size_t i = 0; i < req->num_headers; i++) {
    memcpy(p, req->headers[i].name, req->headers[i].name_len);
    p += req->headers[i].name_len;
    *p++ = '\0';
    memcpy(p, req->headers[i].value, req->headers[i].value_len);
    p += req->headers[i].value_len;
    *p++ = '\0';
  }
  r->auth.headers_len = hlen;
  r->owner = srv->obj.handle;
  r->on_answer = auth_answer_cb;
  r->target = hc;
  hc->auth = r;
  rd_io_read_stop(hc->io);
  rd_request_post(r);
}

static void handle_metrics(httpconn *hc) {
  size_t len = 0;
  rd_stats_refresh_gauges(hc->srv->metrics);
  char *text = rd_metrics_render(hc->srv->metrics, &len);
  if (text == NULL) {
    respond_text(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  http_respond(hc, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", text, len);
  rd_free(text);
}

/* ---- /debug/connections ---- */

typedef struct {
  char *p;
  size_t len, cap;
  int failed;
} textbuf;

static void tb_put(textbuf *b, const char *s, size_t n) {
  if (b->failed)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *p = rd_realloc(b->p, cap);
    if (p == NULL) {
      b->failed = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

static void tb_printf(textbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(textbuf *b, const char *fmt, ...) {
  char tmp[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0)
    tb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void tb_json_str(textbuf *b, const char *s) {
  tb_put(b, "\"", 1);
  for (; *s != '\0'; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      tb_printf(b, "\\%c", ch);
    else if (ch < 0x20)
      tb_printf(b, "\\u%04x", ch);
    else
      tb_put(b, (const char *)&ch, 1);
  }
  tb_put(b, "\"", 1);
}

typedef struct {
  textbuf *b;
  int first;
} debug_walk;

static void debug_conn_cb(void *ctx, const rd_conn_info *c) {
  debug_walk *w = ctx;
  tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
  w->first = 0;
  tb_printf(w->b, "{\"id\": %lld, \"clientkey\": ", (long long)c->id);
  tb_json_str(w->b, c->client_key);
  tb_printf(w->b, ", \"proto\": ");
  tb_json_str(w->b, c->proto);
  tb_printf(w->b, ", \"address\": ");
  tb_json_str(w->b, c->address);
  tb_printf(w->b,
            ", \"age\": %.3f, \"idle\": %.3f, \"state\": \"%s\", \"tx_bytes\": %llu, "
            "\"rx_bytes\": %llu, \"paused\": %s, \"buffered\": %zu}",
            c->age, c->idle, c->state, (unsigned long long)c->tx_bytes,
            (unsigned long long)c->rx_bytes, c->paused ? "true" : "false", c->buffered);
}

static void debug_session_cb(rd_map_node *n, void *ctx) {
  debug_walk *w = ctx;
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count; i++) {
    tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
    w->first = 0;
    tb_printf(w->b, "{\"clientkey\": ");
    tb_json_str(w->b, e->key);
    tb_printf(w->b, ", \"session_key\": %lld, \"connections\": %zu}",
              (long long)rd_session_key(e->sessions[i]), rd_session_conn_count(e->sessions[i]));
  }
}

/* What is open, session by session and connection by connection: the
 * answer to "what is leaking" without a debugger. */
static void handle_debug(httpconn *hc) {
  textbuf b = {0};
  debug_walk w = {&b, 1};
  tb_printf(&b, "{\"sessions\": [");
  rd_map_foreach(&hc->srv->clients, debug_session_cb, &w);
  tb_printf(&b, "\n],\n\"connections\": [");
  w.first = 1;
  rd_server_foreach_conn(hc->srv, debug_conn_cb, &w);
  tb_printf(&b, "\n]}\n");
  if (b.failed)
    respond_text(hc, 500, "Internal Server Error", "out of memory");
  else
    http_respond(hc, 200, "OK", "application/json", b.p, b.len);
  rd_free(b.p);
}

static int is_hop_header(const rd_http_header *h) {
  static const char *const hop[] = {"Connection", "Keep-Alive", "Proxy-Connection",
                                    "Upgrade", "Host"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(hop); i++)
    if (h->name_len == strlen(hop[i]) && rd_http_ieq(hop[i], h->name, h->name_len))
      return 1;
  return 0;
}

static int dial_pair(rd_session *s, const char *proto, const char *address, int *fd_out,
                     rd_dial_status **st_out, rd_conn **c_out, char *err, size_t errlen);

/* The client context for https targets; the system store's is made at the
 * first such request. NULL with err on failure. */
static rd_tls_ctx *proxy_tls_ctx(rd_server *srv, char *err, size_t errlen) {
  if (srv->cfg.proxy_tls == NULL)
    srv->cfg.proxy_tls = rd_tls_ctx_new_client(NULL, 0, NULL, NULL, err, errlen);
  return srv->cfg.proxy_tls;
}

/* The https leg: a TLS client over a socket pair whose other end is the
 * tunneled connection; rd_relay joins it to the client's connection. */
static void proxy_https(httpconn *hc, rd_session *s, const char *name, const char *address,
                        const char *request, size_t len, uint64_t timeout_ms) {
  char err[256];
  rd_tls_ctx *ctx = proxy_tls_ctx(hc->srv, err, sizeof err);
  if (ctx == NULL) {
    respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  rd_tls *tls = rd_tls_new(ctx, name, err, sizeof err);
  if (tls == NULL) {
    respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  int fd;
  rd_dial_status *st;
  rd_conn *c;
  if (dial_pair(s, "tcp", address, &fd, &st, &c, err, sizeof err) != RD_OK) {
    rd_tls_free(tls);
    respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  rd_conn_set_deadline(c, timeout_ms);
  rd_io *backend;
  if (io_on_fd(fd, tls, &backend, err, sizeof err) != RD_OK) {
    rd_dial_status_unref(st); /* the connection sees its local end close */
    respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  rd_relay_start(httpconn_take_stream(hc), backend, st, request, len);
}

/* /client/{id}/{scheme}/{host}{path}: relays the request through client id's
 * tunnel to scheme://host/path and streams the response back. The request
 * is rewritten with "Connection: close", so the backend ends the exchange
 * and the tunneled connection with it. */
static void handle_proxy(httpconn *hc, rd_http_request *req) {
  rd_server *srv = hc->srv;
  const char *t = req->target + strlen("/client/");
  const char *end = req->target + req->target_len;
  const char *q = memchr(t, '?', (size_t)(end - t));
  const char *pend = q != NULL ? q : end;
  const char *seg[3];
  size_t seglen[3];
  const char *p = t;
  for (int i = 0; i < 3; i++) {
    const char *slash = memchr(p, '/', (size_t)(pend - p));
    const char *e = (i < 2 || slash != NULL) ? slash : pend;
    if (e == NULL || e == p) {
      respond_text(hc, 404, "Not Found", "404 page not found\n");
      return;
    }
    seg[i] = p;
    seglen[i] = (size_t)(e - p);
    p = e < pend ? e + 1 : pend;
  }
  const char *path = seg[2] + seglen[2]; /* "/rest" or "" */
  char key[256], scheme[16], host[272];
  if (seglen[0] >= sizeof key || seglen[1] >= sizeof scheme || seglen[2] >= sizeof host - 6) {
    respond_text(hc, 400, "Bad Request", "path segment too long");
    return;
  }
  memcpy(key, seg[0], seglen[0]);
  key[seglen[0]] = '\0';
  memcpy(scheme, seg[1], seglen[1]);
  scheme[seglen[1]] = '\0';
  memcpy(host, seg[2], seglen[2]);
  host[seglen[2]] = '\0';
  int https = strcmp(scheme, "https") == 0;
  if (!https && strcmp(scheme, "http") != 0) {
    respond_text(hc, 400, "Bad Request", "unsupported scheme (http or https)");
    return;
  }
  /* "h", "h:8080", "[::1]:8443", "[::1]" and a bare "::1" (the default
   * port then); the dial address is joined again from the parts, and the
   * name the certificate must match is the host alone. */
  rd_addr a;
  int arc = rd_addr_parse(host, seglen[2], https ? 443 : 80, RD_ADDR_BARE_IPV6, &a);
  if (arc < 0) {
    char msg[320];
    snprintf(msg, sizeof msg, "bad host %s: %s", host, rd_addr_strerror(arc));
    respond_text(hc, 400, "Bad Request", msg);
    return;
  }
  char address[RD_ADDR_JOINED_MAX], name[RD_ADDR_HOST_MAX + 1];
  rd_addr_join(address, sizeof address, a.host, a.host_len, a.port);
  memcpy(name, a.host, a.host_len);
  name[a.host_len] = '\0';
  /* ?timeout=N (seconds) bounds the exchange, as in the Go example. */
  uint64_t timeout_ms = 0;
  if (q != NULL) {
    const char *tp = q;
    while (tp != NULL && tp < end) {
      tp++;
      if ((size_t)(end - tp) > 8 && memcmp(tp, "timeout=", 8) == 0) {
        timeout_ms = (uint64_t)strtoull(tp + 8, NULL, 10) * 1000u;
        break;
      }
      tp = memchr(tp, '&', (size_t)(end - tp));
    }
  }
  rd_session *s = session_for(srv, key);
  if (s == NULL) {
    char msg[320];
    snprintf(msg, sizeof msg, "failed to find Session for client %s", key);
    respond_text(hc, 500, "Internal Server Error", msg);
    return;
  }
  /* Rewritten head: request line, Host, the end-to-end headers, close. */
  size_t cap = 64 + req->method_len + (size_t)(end - path) + strlen(host);
  for (size_t i = 0; i < req->num_headers; i++)
    cap += req->headers[i].name_len + req->headers[i].value_len + 4;
  size_t body = hc->len - hc->head_len;
  char *head = rd_malloc(cap + body);
  if (head == NULL) {
    respond_text(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  /* Host as the segment wrote it, brackets added to a bare IPv6 address. */
  int bare6 = !a.bracketed && memchr(a.host, ':', a.host_len) != NULL;
  int n = snprintf(head, cap, "%.*s %s%.*s HTTP/1.1\r\nHost: %s%s%s\r\n", (int)req->method_len,
                   req->method, path[0] == '/' ? "" : "/", (int)(end - path), path,
                   bare6 ? "[" : "", host, bare6 ? "]" : "");
  size_t len = (size_t)n;
  for (size_t i = 0; i < req->num_headers; i++) {
    const rd_http_header *h = &req->headers[i];
    if (is_hop_header(h))
      continue;
    len += (size_t)snprintf(head + len, cap - len, "%.*s: %.*s\r\n", (int)h->name_len, h->name,
                            (int)h->value_len, h->value);
  }
  len += (size_t)snprintf(head + len, cap - len, "Connection: close\r\n\r\n");
  memcpy(head + len, hc->buf + hc->head_len, body);
  len += body;
  if (https) {
    proxy_https(hc, s, name, address, head, len, timeout_ms);
    rd_free(head);
    return;
  }
  rd_io *io = httpconn_take_stream(hc);
  int err = 0;
  rd_conn *c = rd_session_dial(s, "tcp", address, io, (const uint8_t *)head,
                               len, NULL, &err);
  rd_free(head);
  if (c != NULL) {
    rd_conn_set_http_errors(c);
    rd_conn_set_deadline(c, timeout_ms);
  }
}

static void httpconn_route(httpconn *hc) {
  rd_server *srv = hc->srv;
  rd_http_request req;
  int n = rd_http_parse_request(hc->buf, hc->len, srv->cfg.max_head, srv->cfg.max_headers, &req);
  if (n == RD_EPARTIAL)
    return;
  if (n == RD_ETOOLARGE) {
    respond_text(hc, 431, "Request Header Fields Too Large", "request head too large\n");
    return;
  }
  if (n < 0) {
    respond_text(hc, 400, "Bad Request", "malformed request\n");
    return;
  }
  hc->head_len = (size_t)n;
  uv_timer_stop(&hc->timer);
  const char *q = memchr(req.target, '?', req.target_len);
  size_t plen = q != NULL ? (size_t)(q - req.target) : req.target_len;
  if (plen == strlen(srv->cfg.path) && memcmp(req.target, srv->cfg.path, plen) == 0)
    handle_upgrade(hc, &req);
  else if (srv->cfg.metrics_route && plen == 8 && memcmp(req.target, "/metrics", 8) == 0)
    handle_metrics(hc);
  else if (srv->cfg.debug_route && plen == 18 && memcmp(req.target, "/debug/connections", 18) == 0)
    handle_debug(hc);
  else if (srv->cfg.proxy_route && plen > 8 && memcmp(req.target, "/client/", 8) == 0)
    handle_proxy(hc, &req);
  else
    respond_text(hc, 404, "Not Found", "404 page not found\n");
}

static void httpconn_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  httpconn *hc = rd_io_data(io);
  /* One byte beyond the limit lets the parser see that it was exceeded. */
  size_t cap = hc->srv->cfg.max_head + 1;
  *buf = uv_buf_init(hc->buf + hc->len, (unsigned)(cap - hc->len));
}

static void httpconn_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  httpconn *hc = rd_io_data(io);
  if (hc->done || nread == 0)
    return;
  if (nread < 0) {
    httpconn_close(hc);
    return;
  }
  hc->len += (size_t)nread;
  httpconn_route(hc);
}

static void httpconn_timeout_cb(uv_timer_t *t) {
  httpconn *hc = t->data;
  if (hc->auth == NULL && !hc->done)
    respond_text(hc, 408, "Request Timeout", "request head timeout\n");
}

static void httpconn_tls_done_cb(rd_io *io, int status, const char *error) {
  httpconn *hc = rd_io_data(io);
  if (hc->done)
    return;
  if (status < 0 && error != NULL && strstr(error, "HTTP request to an HTTPS server") != NULL) {
    /* Tell a plain-HTTP client why, in plain text, as Go's net/http does. */
    httpconn_close_answering(hc, "HTTP/1.0 400 Bad Request\r\n\r\n"
                                 "Client sent an HTTP request to an HTTPS server.\n");
    return;
  }
  if (status < 0)
    httpconn_close(hc);
  else
    rd_io_read_start(io, httpconn_alloc_cb, httpconn_read_cb);
}

/* Accepts the pending connection into a new rd_malloc'ed handle with
 * TCP_NODELAY (the tunnel's small frames must not wait), or NULL. */
static uv_tcp_t *accept_tcp(uv_stream_t *listener) {
  uv_tcp_t *tcp = rd_malloc(sizeof *tcp);
  if (tcp == NULL)
    return NULL;
  uv_tcp_init(rd_loop(), tcp);
  if (uv_accept(listener, (uv_stream_t *)tcp) != 0) {
    uv_close((uv_handle_t *)tcp, tcp_free_cb);
    return NULL;
  }
  uv_tcp_nodelay(tcp, 1);
  return tcp;
}

static void on_accept(uv_stream_t *listener, int status) {
  rd_server *srv = listener->data;
  if (status < 0 || srv->closing)
    return;
  uv_tcp_t *tcp = accept_tcp(listener);
  if (tcp == NULL)
    return;
  httpconn *hc = rd_calloc(1, sizeof *hc);
  if (hc == NULL || (hc->buf = rd_malloc(srv->cfg.max_head + 1)) == NULL) {
    rd_free(hc);
    uv_close((uv_handle_t *)tcp, tcp_free_cb);
    return;
  }
  rd_tls *tls = NULL;
  if (srv->cfg.tls != NULL) {
    char err[160];
    tls = rd_tls_new(srv->cfg.tls, NULL, err, sizeof err);
    if (tls == NULL) {
      rd_free(hc->buf);
      rd_free(hc);
      uv_close((uv_handle_t *)tcp, tcp_free_cb);
      return;
    }
  }
  hc->io = rd_io_new((uv_stream_t *)tcp, tls);
  if (hc->io == NULL) {
    rd_free(hc->buf);
    rd_free(hc);
    return;
  }
  hc->srv = srv;
  rd_io_set_data(hc->io, hc);
  uv_timer_init(rd_loop(), &hc->timer);
  hc->timer.data = hc;
  hc->handles_open = 2;
  srv->refs++;
  hc->next = srv->httpconns;
  if (hc->next != NULL)
    hc->next->prev = hc;
  srv->httpconns = hc;
  /* One timer bounds the TLS handshake and the request head together. */
  uv_timer_start(&hc->timer, httpconn_timeout_cb, srv->cfg.handshake_timeout_ms, 0);
  if (tls != NULL)
    rd_io_handshake(hc->io, httpconn_tls_done_cb);
  else
    rd_io_read_start(hc->io, httpconn_alloc_cb, httpconn_read_cb);
}

/* ---- dialing ---- */

/* Dials proto/address through s with one end of a fresh socket pair as the
 * connection's local end: *fd_out is the other end, *st_out a referenced
 * status, *c_out the connection. 0 or a negative code with err. */
static int dial_pair(rd_session *s, const char *proto, const char *address, int *fd_out,
                     rd_dial_status **st_out, rd_conn **c_out, char *err, size_t errlen) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    int e = -errno;
    snprintf(err, errlen, "socketpair: %s", rd_strerror(e));
    return e;
  }
  rd_io *io;
  int rc = io_on_fd(fds[0], NULL, &io, err, errlen);
  if (rc != RD_OK) {
    close(fds[1]);
    return rc;
  }
  rd_dial_status *st = rd_dial_status_new();
  if (st == NULL) {
    rd_io_close(io, NULL);
    close(fds[1]);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  int e = 0;
  rd_conn *c = rd_session_dial(s, proto, address, io, NULL, 0, st, &e);
  if (c == NULL) {
    close(fds[1]);
    rd_dial_status_unref(st);
    snprintf(err, errlen, "dial through session failed: %s", rd_strerror(e));
    return e;
  }
  *fd_out = fds[1];
  *st_out = st;
  *c_out = c;
  return RD_OK;
}

static void dial_now(rd_session *s, rd_server_dial_req *req) {
  char err[256] = "";
  rd_conn *c;
  int rc = dial_pair(s, req->proto, req->address, &req->fd, &req->status, &c, err, sizeof err);
  if (rc == RD_OK) {
    if (req->idle_timeout_ms > 0)
      rd_conn_set_idle_timeout(c, req->idle_timeout_ms);
    req->conn_id = rd_conn_id(c);
  }
  rd_cmd_finish(req->cmd, rc, err);
}

static void dial_no_session(rd_server_dial_req *req) {
  rd_cmd_finishf(req->cmd, RD_ENOSESSION, "failed to find Session for client %s",
                 req->client_key);
}

/* ---- dials that wait for room ----
 * Go bounds a dial by a deadline on writing its CONNECT. Here a dial waits
 * while its session's queue toward the agent is over write_high (the agent
 * is not keeping up), and fails past the caller's timeout. */

struct room_wait {
  room_wait *prev, *next;
  rd_server *srv;
  rd_session *s;
  uv_timer_t timer;
  rd_server_dial_req *req; /* NULL once finished */
};

static void room_wait_closed_cb(uv_handle_t *h) {
  room_wait *w = h->data;
  rd_server *srv = w->srv;
  rd_free(w);
  server_unref(srv);
}

/* Unlinks w and frees it (once its timer has closed). */
static void room_wait_drop(room_wait *w) {
  if (w->prev != NULL)
    w->prev->next = w->next;
  else
    w->srv->room_waits = w->next;
  if (w->next != NULL)
    w->next->prev = w->prev;
  w->req = NULL;
  uv_close((uv_handle_t *)&w->timer, room_wait_closed_cb);
}

static void room_wait_timeout_cb(uv_timer_t *t) {
  room_wait *w = t->data;
  rd_cmd_finishf(w->req->cmd, RD_ETIMEDOUT,
                 "dial timeout: the session of client %s had no room for the connection",
                 w->req->client_key);
  room_wait_drop(w);
}

static void room_wait_start(rd_server *srv, rd_session *s, rd_server_dial_req *req) {
  room_wait *w = rd_calloc(1, sizeof *w);
  if (w == NULL) {
    rd_cmd_finish(req->cmd, RD_ENOMEM, NULL);
    return;
  }
  w->srv = srv;
  w->s = s;
  w->req = req;
  srv->refs++;
  uv_timer_init(rd_loop(), &w->timer);
  w->timer.data = w;
  uv_timer_start(&w->timer, room_wait_timeout_cb, req->timeout_ms, 0);
  w->next = srv->room_waits;
  if (w->next != NULL)
    w->next->prev = w;
  srv->room_waits = w;
}

/* Session s has room again (ended: no longer exists): its waiting dials go
 * on, oldest first, while the room lasts. */
static void room_waits_wake(rd_server *srv, rd_session *s, int ended) {
  room_wait *oldest = NULL;
  for (room_wait *w = srv->room_waits; w != NULL; w = w->next)
    if (w->s == s)
      oldest = w;
  for (room_wait *w = oldest, *prev; w != NULL; w = prev) {
    prev = w->prev;
    if (w->s != s)
      continue;
    if (!ended && !rd_session_has_room(s))
      return;
    rd_server_dial_req *req = w->req;
    room_wait_drop(w);
    if (ended)
      dial_no_session(req);
    else
      dial_now(s, req);
  }
}

static void session_on_room(rd_session *s, void *owner) { room_waits_wake(owner, s, 0); }

void rd_server_dial(rd_server *srv, rd_server_dial_req *req) {
  rd_session *s = session_for(srv, req->client_key);
  if (s == NULL)
    dial_no_session(req);
  else if (rd_session_has_room(s))
    dial_now(s, req);
  else if (req->timeout_ms == 0)
    rd_cmd_finishf(req->cmd, RD_ETIMEDOUT,
                   "dial timeout: the session of client %s had no room for the connection",
                   req->client_key);
  else
    room_wait_start(srv, s, req);
}

/* ---- forwards ---- */

static void forward_unlink(rd_forward *f) {
  if (f->prev != NULL)
    f->prev->next = f->next;
  else if (f->srv->forwards == f)
    f->srv->forwards = f->next;
  if (f->next != NULL)
    f->next->prev = f->prev;
  f->prev = f->next = NULL;
}

static void forward_closed_cb(uv_handle_t *h) {
  rd_forward *f = h->data;
  rd_server *srv = f->srv;
  rd_cmd *waiter = f->close_waiter;
  rd_free(f->key);
  rd_free(f);
  if (waiter != NULL)
    rd_cmd_finish(waiter, RD_OK, NULL);
  server_unref(srv);
}

static void forward_close(rd_object *obj, rd_cmd *waiter) {
  rd_forward *f = (rd_forward *)obj;
  if (f->closed) {
    if (waiter != NULL)
      rd_cmd_finish(waiter, RD_OK, NULL);
    return;
  }
  f->closed = 1;
  rd_object_unregister(&f->obj);
  forward_unlink(f);
  f->close_waiter = waiter;
  uv_close((uv_handle_t *)&f->listener, forward_closed_cb);
}

static void forward_accept_cb(uv_stream_t *listener, int status) {
  rd_forward *f = listener->data;
  if (status < 0 || f->closed)
    return;
  uv_tcp_t *tcp = accept_tcp(listener);
  if (tcp == NULL)
    return;
  rd_session *s = session_for(f->srv, f->key);
  if (s == NULL) {
    uv_close((uv_handle_t *)tcp, tcp_free_cb);
    return;
  }
  rd_io *io = rd_io_new((uv_stream_t *)tcp, NULL);
  int err = 0;
  if (io != NULL)
    rd_session_dial(s, f->proto, f->address, io, NULL, 0, NULL, &err);
}

static int bind_listener(uv_tcp_t *tcp, const char *host, int port, int *port_out, char *err,
                         size_t errlen) {
  struct sockaddr_storage ss;
  const char *h = host[0] != '\0' ? host : "0.0.0.0";
  int rc = strchr(h, ':') != NULL ? uv_ip6_addr(h, port, (struct sockaddr_in6 *)&ss)
                                  : uv_ip4_addr(h, port, (struct sockaddr_in *)&ss);
  if (rc == 0)
    rc = uv_tcp_bind(tcp, (struct sockaddr *)&ss, 0);
  if (rc == 0) { /* libuv defers bind errors (EADDRINUSE) to getsockname */
    int len = sizeof ss;
    rc = uv_tcp_getsockname(tcp, (struct sockaddr *)&ss, &len);
  }
  if (rc != 0) {
    char where[RD_ADDR_JOINED_MAX];
    rd_addr_join(where, sizeof where, h, strlen(h), port);
    snprintf(err, errlen, "listen tcp %s: %s", where, rd_strerror(rc));
    return rc;
  }
  *port_out = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
  return 0;
}

static void failed_listener_closed_cb(uv_handle_t *h) { rd_free(h->data); }

int rd_server_forward(rd_server *srv, const char *client_key, const char *proto,
                      const char *address, const char *host, int port, uint64_t *handle_out,
                      int *port_out, char *err, size_t errlen) {
  size_t kl = strlen(client_key), pl = strlen(proto), al = strlen(address);
  rd_forward *f = rd_calloc(1, sizeof *f);
  if (f == NULL || (f->key = rd_malloc(kl + pl + al + 3)) == NULL) {
    rd_free(f);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  memcpy(f->key, client_key, kl + 1);
  f->proto = f->key + kl + 1;
  memcpy(f->proto, proto, pl + 1);
  f->address = f->proto + pl + 1;
  memcpy(f->address, address, al + 1);
  f->srv = srv;
  uv_tcp_init(rd_loop(), &f->listener);
  f->listener.data = f;
  int rc = bind_listener(&f->listener, host, port, port_out, err, errlen);
  if (rc == 0) {
    rc = uv_listen((uv_stream_t *)&f->listener, 511, forward_accept_cb);
    if (rc == 0)
      rc = rd_object_register(&f->obj, RD_OBJ_FORWARD);
    if (rc != 0)
      snprintf(err, errlen, "listen: %s", rd_strerror(rc));
  }
  if (rc != 0) {
    rd_free(f->key);
    uv_close((uv_handle_t *)&f->listener, failed_listener_closed_cb);
    return rc;
  }
  f->obj.close = forward_close;
  srv->refs++;
  f->next = srv->forwards;
  if (f->next != NULL)
    f->next->prev = f;
  srv->forwards = f;
  *handle_out = f->obj.handle;
  return RD_OK;
}

/* ---- lifecycle ---- */

static void listener_closed_cb(uv_handle_t *h) { server_unref(h->data); }

static void end_client_sessions_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  client_entry *e = (client_entry *)n;
  /* Ending a session removes it from e (and may free e): end from the back. */
  while (1) {
    size_t count = e->count;
    rd_session *s = e->sessions[count - 1];
    rd_session_end(s, RD_WS_CLOSE_GOING_AWAY, "server closing");
    if (count == 1)
      break;
  }
}

static void server_close(rd_object *obj, rd_cmd *waiter) {
  rd_server *srv = (rd_server *)obj;
  if (srv->closing) {
    if (waiter != NULL)
      rd_cmd_finish(waiter, RD_OK, NULL);
    return;
  }
  srv->closing = 1;
  srv->close_waiter = waiter;
  rd_object_unregister(&srv->obj);
  while (srv->forwards != NULL) {
    rd_forward *f = srv->forwards;
    forward_close(&f->obj, NULL);
  }
  while (srv->httpconns != NULL)
    httpconn_close(srv->httpconns);
  rd_map_foreach(&srv->clients, end_client_sessions_cb, NULL);
  uv_close((uv_handle_t *)&srv->listener, listener_closed_cb);
}

int rd_server_start(const char *host, int port, const rd_server_config *cfg, rd_server **out,
                    int *port_out, char *err, size_t errlen) {
  rd_server *srv = rd_calloc(1, sizeof *srv);
  if (srv == NULL || (srv->metrics = rd_metrics_new()) == NULL) {
    rd_free(srv);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  srv->cfg = *cfg;
  if (srv->cfg.tls != NULL)
    rd_tls_ctx_ref(srv->cfg.tls);
  if (srv->cfg.proxy_tls != NULL)
    rd_tls_ctx_ref(srv->cfg.proxy_tls);
  rd_map_init(&srv->clients);
  uv_tcp_init(rd_loop(), &srv->listener);
  srv->listener.data = srv;
  srv->refs = 1;
  int rc = bind_listener(&srv->listener, host, port, port_out, err, errlen);
  if (rc == 0) {
    rc = uv_listen((uv_stream_t *)&srv->listener, 511, on_accept);
    if (rc == 0)
      rc = rd_object_register(&srv->obj, RD_OBJ_SERVER);
    if (rc != 0)
      snprintf(err, errlen, "listen: %s", rd_strerror(rc));
  }
  if (rc != 0) {
    srv->closing = 1;
    uv_close((uv_handle_t *)&srv->listener, listener_closed_cb);
    return rc;
  }
  srv->obj.close = server_close;
  *out = srv;
  return RD_OK;
}

/* ---- queries ---- */

typedef struct {
  void (*cb)(void *ctx, const char *key);
  void *ctx;
} key_walk;

static void key_cb(rd_map_node *n, void *ctx) {
  key_walk *w = ctx;
  w->cb(w->ctx, ((client_entry *)n)->key);
}

void rd_server_foreach_client(rd_server *srv, void (*cb)(void *ctx, const char *key), void *ctx) {
  key_walk w = {cb, ctx};
  rd_map_foreach(&srv->clients, key_cb, &w);
}

int rd_server_has_session(rd_server *srv, const char *client_key) {
  return session_for(srv, client_key) != NULL;
}

typedef struct {
  rd_conn_info_cb cb;
  void *ctx;
} conn_walk;

static void conn_walk_cb(rd_map_node *n, void *ctx) {
  conn_walk *w = ctx;
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count; i++)
    rd_session_foreach_conn(e->sessions[i], w->cb, w->ctx);
}

void rd_server_foreach_conn(rd_server *srv, rd_conn_info_cb cb, void *ctx) {
  conn_walk w = {cb, ctx};
  rd_map_foreach(&srv->clients, conn_walk_cb, &w);
}

int rd_server_reload_tls(rd_server *srv, const char *cert, const char *key,
                         const char *client_ca, char *err, size_t errlen) {
  if (srv->cfg.tls == NULL) {
    snprintf(err, errlen, "the server does not use TLS");
    return RD_EMALFORMED;
  }
  return rd_tls_ctx_reload_server(srv->cfg.tls, cert, key, client_ca, err, errlen);
}

int rd_server_set_tokens(rd_server *srv, rd_tokens *tokens) {
  if (srv->cfg.auth_mode != RD_AUTH_TOKEN) {
    rd_tokens_free(tokens);
    return RD_EMALFORMED;
  }
  rd_tokens_free(srv->cfg.tokens);
  srv->cfg.tokens = tokens;
  return RD_OK;
}
