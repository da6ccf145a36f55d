/* The server's proxy route, /client/{id}/{scheme}/{host}{path}: the request
 * is rewritten and sent through the client's tunnel, the response streamed
 * back. For http an exchange (rd_server_proxy_http.c) relays it by its
 * framing, keeping the client's connection and the tunneled one; for https a
 * TLS client runs over an in-memory pair whose other end is the tunneled
 * connection, and rd_relay owns both streams. The client TLS context for
 * https targets belongs to the server's config (released with the server). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_http.h"
#include "rd_io.h"
#include "rd_relay.h"
#include "rd_server_int.h"

static int is_hop_header(const rd_http_header *h) {
  static const char *const hop[] = {"Connection", "Keep-Alive", "Proxy-Connection",
                                    "Upgrade", "Host"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(hop); i++)
    if (h->name_len == strlen(hop[i]) && rd_http_ieq(hop[i], h->name, h->name_len))
      return 1;
  return 0;
}

/* The client context for https targets; the system store's is made at the
 * first such request. NULL with err on failure. */
static rd_tls_ctx *proxy_tls_ctx(rd_server *srv, char *err, size_t errlen) {
  if (srv->cfg.proxy_tls == NULL)
    srv->cfg.proxy_tls = rd_tls_ctx_new_client(NULL, 0, NULL, NULL, err, errlen);
  return srv->cfg.proxy_tls;
}

/* The https leg: a TLS client over an in-memory pair whose other end is
 * the tunneled connection; rd_relay joins it to the client's connection. */
static void proxy_https(httpconn *hc, rd_session *s, const char *proto, const char *name,
                        const char *address, const char *request, size_t len,
                        uint64_t timeout_ms) {
  char err[256];
  rd_tls_ctx *ctx = proxy_tls_ctx(hc->srv, err, sizeof err);
  if (ctx == NULL) {
    rd_srv_respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  rd_tls *tls = rd_tls_new(ctx, name, err, sizeof err);
  if (tls == NULL) {
    rd_srv_respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  rd_io *backend;
  rd_dial_status *st;
  rd_conn *c;
  if (rd_srv_dial_io(s, proto, address, &backend, &st, &c, err, sizeof err) != RD_OK) {
    rd_tls_free(tls);
    rd_srv_respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  rd_conn_set_deadline(c, timeout_ms);
  if (rd_io_start_tls(backend, tls) != 0) { /* a fresh plain end: cannot fail */
    rd_io_close(backend, NULL); /* the connection reads EOF and ends */
    rd_dial_status_unref(st);
    rd_srv_respond_text(hc, 500, "Internal Server Error", "tls: could not start");
    return;
  }
  rd_relay_start(rd_srv_httpconn_take_stream(hc), backend, st, request, len);
}

/* /client/{id}/{scheme}/{host}{path}: relays the request through client id's
 * tunnel to scheme://host/path and streams the response back. http targets
 * keep both connections alive (rd_server_proxy_http.c); for https the
 * request is rewritten with "Connection: close", so the backend ends the
 * exchange and the tunneled connection with it. */
void rd_srv_handle_proxy(httpconn *hc, rd_http_request *req) {
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
      rd_srv_respond_text(hc, 404, "Not Found", "404 page not found\n");
      return;
    }
    seg[i] = p;
    seglen[i] = (size_t)(e - p);
    p = e < pend ? e + 1 : pend;
  }
  const char *path = seg[2] + seglen[2]; /* "/rest" or "" */
  char key[256], scheme[16], host[272];
  if (seglen[0] >= sizeof key || seglen[1] >= sizeof scheme || seglen[2] >= sizeof host - 6) {
    rd_srv_respond_text(hc, 400, "Bad Request", "path segment too long");
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
    rd_srv_respond_text(hc, 400, "Bad Request", "unsupported scheme (http or https)");
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
    rd_srv_respond_text(hc, 400, "Bad Request", msg);
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
  rd_session *s = rd_srv_route(srv, key);
  if (s == NULL) {
    char msg[320];
    snprintf(msg, sizeof msg, "failed to find Session for client %s", key);
    rd_srv_respond_text(hc, 500, "Internal Server Error", msg);
    return;
  }
  char wire[RD_MSG_CONNECT_LIMIT + 1];
  const char *proto = rd_srv_wire_proto(s, key, "tcp", wire, sizeof wire);
  if (proto == NULL) {
    rd_srv_respond_text(hc, 400, "Bad Request", "client key too long to dial through a peer");
    return;
  }
  /* Rewritten head: request line, Host, the end-to-end headers, close. */
  size_t cap = 64 + req->method_len + (size_t)(end - path) + strlen(host);
  for (size_t i = 0; i < req->num_headers; i++)
    cap += req->headers[i].name_len + req->headers[i].value_len + 4;
  size_t body = hc->len - hc->head_len;
  char *head = rd_malloc(cap + body);
  if (head == NULL) {
    rd_srv_respond_text(hc, 500, "Internal Server Error", "out of memory");
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
  if (!https) { /* kept alive: the body follows by its framing */
    len += (size_t)snprintf(head + len, cap - len, "\r\n");
    rd_proxy_target t;
    snprintf(t.key, sizeof t.key, "%s", key);
    snprintf(t.proto, sizeof t.proto, "%s", proto);
    snprintf(t.address, sizeof t.address, "%s", address);
    snprintf(t.pool_key, sizeof t.pool_key, "%s %s %s", key, proto, address);
    rd_srv_proxy_http(hc, req, &t, head, len, timeout_ms);
    rd_free(head);
    return;
  }
  len += (size_t)snprintf(head + len, cap - len, "Connection: close\r\n\r\n");
  memcpy(head + len, hc->buf + hc->head_len, body);
  len += body;
  proxy_https(hc, s, proto, name, address, head, len, timeout_ms);
  rd_free(head);
}
