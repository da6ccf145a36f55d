/* The server's lifecycle, its queries and its HTTP front: the listener, the
 * accept, and each HTTP connection before the upgrade (the TLS handshake,
 * reading the head, routing it, answering it). The server owns its listener,
 * the HTTP connections not yet upgraded, its sessions (through the client
 * table, rd_server_sessions.c), its waiting dials (rd_server_dial.c) and its
 * forwards (rd_server_forward.c); each holds a reference, and the server is
 * freed in rd_srv_unref when the last of them is gone, and only then does its
 * close command finish. An HTTP connection is freed in
 * httpconn_free_if_closed once its stream and timer have closed; a route that
 * takes its stream (rd_srv_httpconn_take_stream) owns the stream from then. */
#include "rd_server.h"

#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_http.h"
#include "rd_io.h"
#include "rd_nofile.h"
#include "rd_server_int.h"
#include "rd_ws.h"

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
  cfg->proxy_pool_per_target = 16;
  cfg->proxy_pool_max = 256;
  cfg->proxy_pool_idle_timeout_ms = 90000;
  cfg->max_sessions = 65536;
  cfg->max_sessions_per_key = 64;
  rd_session_config_default(&cfg->session);
}

uint64_t rd_server_handle(const rd_server *srv) { return srv->obj.handle; }
rd_metrics *rd_server_metrics(rd_server *srv) { return srv->metrics; }

void rd_srv_unref(rd_server *srv) {
  if (--srv->refs > 0)
    return;
  if (srv->cfg.tls != NULL)
    rd_tls_ctx_unref(srv->cfg.tls);
  if (srv->cfg.proxy_tls != NULL)
    rd_tls_ctx_unref(srv->cfg.proxy_tls);
  if (srv->cfg.peer_tls != NULL)
    rd_tls_ctx_unref(srv->cfg.peer_tls);
  rd_tokens_free(srv->cfg.tokens);
  rd_free((char *)srv->cfg.dashboard_html);
  rd_metrics_free(srv->metrics);
  rd_map_dispose(&srv->clients);
  rd_cmd *waiter = srv->close_waiter;
  rd_free(srv);
  if (waiter != NULL)
    rd_cmd_finish(waiter, RD_OK, NULL);
}

/* ---- HTTP connections before the upgrade ---- */

void rd_srv_tcp_free_cb(uv_handle_t *h) { rd_free(h); }

static void httpconn_free_if_closed(httpconn *hc) {
  if (--hc->handles_open > 0)
    return;
  rd_server *srv = hc->srv;
  rd_free(hc->buf);
  rd_free(hc);
  rd_srv_unref(srv);
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

void rd_srv_httpconn_close(httpconn *hc) { httpconn_close_answering(hc, NULL); }

static void response_shutdown_cb(rd_io *io, int status) {
  (void)status;
  rd_srv_httpconn_close(rd_io_data(io));
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
int rd_srv_write_owned(rd_io *io, const char *data, size_t len) {
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
void rd_srv_http_respond(httpconn *hc, int status, const char *reason, const char *ctype,
                         const char *body, size_t body_len) {
  rd_srv_http_respond_with(hc, status, reason, ctype, "", body, body_len);
}

void rd_srv_http_respond_with(httpconn *hc, int status, const char *reason, const char *ctype,
                              const char *extra, const char *body, size_t body_len) {
  if (hc->done)
    return;
  hc->done = 1;
  rd_io_read_stop(hc->io);
  char head[768];
  int n = snprintf(head, sizeof head,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                   "%sConnection: close\r\n\r\n",
                   status, reason, ctype, body_len, extra);
  if (n < 0 || (size_t)n >= sizeof head) {
    rd_srv_httpconn_close(hc);
    return;
  }
  if (rd_srv_write_owned(hc->io, head, (size_t)n) != 0 ||
      (body_len > 0 && rd_srv_write_owned(hc->io, body, body_len) != 0) ||
      rd_io_shutdown(hc->io, response_shutdown_cb) != 0)
    rd_srv_httpconn_close(hc);
}

void rd_srv_respond_text(httpconn *hc, int status, const char *reason, const char *text) {
  rd_srv_http_respond(hc, status, reason, "text/plain; charset=utf-8", text, strlen(text));
}

/* Hands the stream over (to a session or a tunneled connection). */
rd_io *rd_srv_httpconn_take_stream(httpconn *hc) {
  rd_io_read_stop(hc->io);
  return rd_srv_httpconn_take_stream_reading(hc);
}

rd_io *rd_srv_httpconn_take_stream_reading(httpconn *hc) {
  rd_io *io = hc->io;
  hc->io = NULL;
  hc->handles_open--;
  hc->done = 1;
  rd_srv_httpconn_close(hc);
  return io;
}

static void httpconn_route(httpconn *hc) {
  rd_server *srv = hc->srv;
  rd_http_request req;
  int n = rd_http_parse_request(hc->buf, hc->len, srv->cfg.max_head, srv->cfg.max_headers, &req);
  if (n == RD_EPARTIAL)
    return;
  if (n == RD_ETOOLARGE) {
    rd_srv_respond_text(hc, 431, "Request Header Fields Too Large", "request head too large\n");
    return;
  }
  if (n < 0) {
    rd_srv_respond_text(hc, 400, "Bad Request", "malformed request\n");
    return;
  }
  hc->head_len = (size_t)n;
  uv_timer_stop(&hc->timer);
  const char *q = memchr(req.target, '?', req.target_len);
  size_t plen = q != NULL ? (size_t)(q - req.target) : req.target_len;
  if (plen == strlen(srv->cfg.path) && memcmp(req.target, srv->cfg.path, plen) == 0)
    rd_srv_handle_upgrade(hc, &req);
  else if (srv->cfg.metrics_route && plen == 8 && memcmp(req.target, "/metrics", 8) == 0)
    rd_srv_handle_metrics(hc);
  else if (srv->cfg.debug_route && plen == 18 && memcmp(req.target, "/debug/connections", 18) == 0)
    rd_srv_handle_debug(hc);
  else if (srv->cfg.debug_route && plen == 12 && memcmp(req.target, "/debug/peers", 12) == 0)
    rd_srv_handle_debug_peers(hc);
  else if (rd_srv_dashboard_route(hc, &req, plen))
    ; /* answered */
  else if (srv->cfg.proxy_route && plen > 8 && memcmp(req.target, "/client/", 8) == 0)
    rd_srv_handle_proxy(hc, &req);
  else if (srv->cfg.proxy_route && plen > 8 && memcmp(req.target, "/stream/", 8) == 0)
    rd_srv_handle_stream(hc, &req);
  else
    rd_srv_respond_text(hc, 404, "Not Found", "404 page not found\n");
}

static void httpconn_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  httpconn *hc = rd_io_data(io);
  /* One byte beyond the limit lets the parser see that it was exceeded. */
  size_t cap = hc->srv->cfg.max_head + 1;
  *buf = uv_buf_init(hc->buf + hc->len, (unsigned)(cap - hc->len));
}

static void httpconn_timeout_cb(uv_timer_t *t) {
  httpconn *hc = t->data;
  if (hc->kept && hc->len == 0) /* an idle kept-alive client: closed without a word */
    rd_srv_httpconn_close(hc);
  else if (hc->auth == NULL && !hc->done)
    rd_srv_respond_text(hc, 408, "Request Timeout", "request head timeout\n");
}

static void httpconn_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  httpconn *hc = rd_io_data(io);
  if (hc->done || nread == 0)
    return;
  if (nread < 0) {
    rd_srv_httpconn_close(hc);
    return;
  }
  if (hc->kept && hc->len == 0) /* the next request began: its head has the usual time */
    uv_timer_start(&hc->timer, httpconn_timeout_cb, hc->srv->cfg.handshake_timeout_ms, 0);
  hc->len += (size_t)nread;
  httpconn_route(hc);
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
    rd_srv_httpconn_close(hc);
  else
    rd_io_read_start(io, httpconn_alloc_cb, httpconn_read_cb);
}

/* Accepts the pending connection into a new rd_malloc'ed handle with
 * TCP_NODELAY (the tunnel's small frames must not wait), or NULL. */
uv_tcp_t *rd_srv_accept_tcp(uv_stream_t *listener) {
  uv_tcp_t *tcp = rd_malloc(sizeof *tcp);
  if (tcp == NULL)
    return NULL;
  uv_tcp_init(rd_loop(), tcp);
  if (uv_accept(listener, (uv_stream_t *)tcp) != 0) {
    uv_close((uv_handle_t *)tcp, rd_srv_tcp_free_cb);
    return NULL;
  }
  uv_tcp_nodelay(tcp, 1);
  return tcp;
}

void rd_srv_accept_failed(rd_server *srv, int status) {
  /* Out of descriptors, libuv accepts and closes the waiting connections
   * with its reserve descriptor and the listener goes on; new connections
   * are served again as soon as descriptors are free. */
  const char *text = rd_nofile_error(status);
  uint64_t now = uv_now(rd_loop());
  if (!srv->cfg.events || (srv->accept_news_ms != 0 && now - srv->accept_news_ms < 1000))
    return;
  srv->accept_news_ms = now;
  char reason[128];
  snprintf(reason, sizeof reason, "accept: %s", text != NULL ? text : rd_strerror(status));
  rd_event_post(srv->obj.handle, "accept_failed", NULL, NULL, NULL, reason, 0, 0, 0);
}

/* A new HTTP connection on io (taken in every case), or NULL. */
static httpconn *httpconn_new(rd_server *srv, rd_io *io) {
  httpconn *hc = rd_calloc(1, sizeof *hc);
  if (hc == NULL || (hc->buf = rd_malloc(srv->cfg.max_head + 1)) == NULL) {
    rd_free(hc);
    rd_io_close(io, NULL);
    return NULL;
  }
  hc->io = io;
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
  return hc;
}

static void on_accept(uv_stream_t *listener, int status) {
  rd_server *srv = listener->data;
  if (status < 0 && !srv->closing)
    rd_srv_accept_failed(srv, status);
  if (status < 0 || srv->closing)
    return;
  uv_tcp_t *tcp = rd_srv_accept_tcp(listener);
  if (tcp == NULL)
    return;
  rd_tls *tls = NULL;
  if (srv->cfg.tls != NULL) {
    char err[160];
    tls = rd_tls_new(srv->cfg.tls, NULL, err, sizeof err);
    if (tls == NULL) {
      uv_close((uv_handle_t *)tcp, rd_srv_tcp_free_cb);
      return;
    }
  }
  rd_io *io = rd_io_new((uv_stream_t *)tcp, tls);
  httpconn *hc = io != NULL ? httpconn_new(srv, io) : NULL;
  if (hc == NULL)
    return;
  /* One timer bounds the TLS handshake and the request head together. */
  uv_timer_start(&hc->timer, httpconn_timeout_cb, srv->cfg.handshake_timeout_ms, 0);
  if (tls != NULL)
    rd_io_handshake(hc->io, httpconn_tls_done_cb);
  else
    rd_io_read_start(hc->io, httpconn_alloc_cb, httpconn_read_cb);
}

void rd_srv_httpconn_adopt(rd_server *srv, rd_io *io, const uint8_t *rest, size_t len) {
  if (srv->closing) {
    rd_io_close(io, NULL);
    return;
  }
  httpconn *hc = httpconn_new(srv, io);
  if (hc == NULL)
    return;
  hc->kept = 1;
  /* A pipelined head past max_head is cut there; the route answers 431. */
  hc->len = len < srv->cfg.max_head + 1 ? len : srv->cfg.max_head + 1;
  if (hc->len > 0)
    memcpy(hc->buf, rest, hc->len);
  uint64_t idle = srv->cfg.proxy_pool_idle_timeout_ms;
  uv_timer_start(&hc->timer, httpconn_timeout_cb,
                 hc->len > 0 || idle == 0 ? srv->cfg.handshake_timeout_ms : idle, 0);
  rd_io_read_start(hc->io, httpconn_alloc_cb, httpconn_read_cb);
  if (hc->len > 0)
    httpconn_route(hc);
}

/* ---- listeners ---- */

int rd_srv_bind_listener(uv_tcp_t *tcp, const char *host, int port, int *port_out, char *err,
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

/* ---- lifecycle ---- */

static void listener_closed_cb(uv_handle_t *h) { rd_srv_unref(h->data); }

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
  rd_srv_forwards_close(srv);
  while (srv->httpconns != NULL)
    rd_srv_httpconn_close(srv->httpconns);
  rd_map_foreach(&srv->clients, end_client_sessions_cb, NULL);
  rd_srv_peers_close(srv);
  rd_srv_pool_close(srv);
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
  srv->cfg.dashboard_html = NULL; /* the server's own copy, or none */
  if (cfg->dashboard_html != NULL && cfg->dashboard_html_len > 0) {
    char *html = rd_malloc(cfg->dashboard_html_len);
    if (html == NULL) {
      rd_metrics_free(srv->metrics);
      rd_free(srv);
      snprintf(err, errlen, "out of memory");
      return RD_ENOMEM;
    }
    memcpy(html, cfg->dashboard_html, cfg->dashboard_html_len);
    srv->cfg.dashboard_html = html;
  }
  if (srv->cfg.tls != NULL)
    rd_tls_ctx_ref(srv->cfg.tls);
  if (srv->cfg.proxy_tls != NULL)
    rd_tls_ctx_ref(srv->cfg.proxy_tls);
  if (srv->cfg.peer_tls != NULL)
    rd_tls_ctx_ref(srv->cfg.peer_tls);
  rd_map_init(&srv->clients);
  uv_tcp_init(rd_loop(), &srv->listener);
  srv->listener.data = srv;
  srv->refs = 1;
  int rc = rd_srv_bind_listener(&srv->listener, host, port, port_out, err, errlen);
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
  return rd_srv_session_for(srv, client_key) != NULL;
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
  rd_srv_peers_foreach_conn(srv, cb, ctx);
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
