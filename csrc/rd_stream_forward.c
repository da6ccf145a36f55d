/* The remote forward. It owns its listener and its links (one per accepted
 * connection) and holds a reference for each; it is freed in sf_unref once
 * the listener and every link are gone, and its close command finishes
 * then. A link owns its local stream, its dial, its server stream and its
 * timer until the 101; then an rd_join owns both streams and the link
 * waits for the join's end. */
#include "rd_stream_forward.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_dialer.h"
#include "rd_http.h"
#include "rd_io.h"
#include "rd_join.h"
#include "rd_nofile.h"
#include "rd_proxy_connect.h"
#include "rd_stream.h"

/* The answer head and, for a refusal, the start of its text. */
#define SF_RESP_MAX 16384

typedef struct sf_link sf_link;

struct rd_sforward {
  rd_object obj;
  uv_tcp_t listener;
  rd_tls_ctx *tls;
  char *server;      /* "host:port" to dial */
  char *server_name; /* https: the name the certificate must match */
  char *request;     /* the whole request head */
  size_t request_len;
  uint64_t timeout_ms;
  sf_link *links;
  int refs; /* listener + links */
  int closing;
  rd_cmd *close_waiter;
  rd_sforward_stats stats;
};

struct sf_link {
  sf_link *prev, *next;
  rd_sforward *f;
  rd_io *local;
  rd_dial *dial;
  rd_io *remote;
  rd_join *join;
  uv_timer_t timer;
  int pending; /* local, dial, remote, timer, join: those not yet gone */
  int failed;  /* given up (or closing): nothing but the ends to wait for */
  size_t head_len;
  int status; /* a refusal's status, once its head is read */
  char resp[SF_RESP_MAX];
  size_t resp_len;
};

static void sf_unref(rd_sforward *f) {
  if (--f->refs > 0)
    return;
  if (f->tls != NULL)
    rd_tls_ctx_unref(f->tls);
  rd_free(f->server);
  rd_free(f->server_name);
  rd_free(f->request);
  rd_cmd *waiter = f->close_waiter;
  rd_free(f);
  if (waiter != NULL)
    rd_cmd_finish(waiter, RD_OK, NULL);
}

void rd_sforward_get_stats(const rd_sforward *f, rd_sforward_stats *out) { *out = f->stats; }

/* ---- links ---- */

static void link_release(sf_link *l) {
  if (--l->pending > 0)
    return;
  rd_sforward *f = l->f;
  if (l->prev != NULL)
    l->prev->next = l->next;
  else
    f->links = l->next;
  if (l->next != NULL)
    l->next->prev = l->prev;
  f->stats.open--;
  rd_free(l);
  sf_unref(f);
}

static void link_io_closed_cb(rd_io *io) { link_release(rd_io_data(io)); }
static void link_timer_closed_cb(uv_handle_t *h) { link_release(h->data); }

/* Gives the link up: why (NULL when the forward is closing) becomes the
 * forward's last error; everything the link still owns closes. */
static void link_fail(sf_link *l, const char *why) {
  if (l->failed)
    return;
  l->failed = 1;
  if (why != NULL) {
    l->f->stats.failed++;
    snprintf(l->f->stats.last_error, sizeof l->f->stats.last_error, "%s", why);
  }
  uv_close((uv_handle_t *)&l->timer, link_timer_closed_cb);
  if (l->dial != NULL)
    rd_dial_cancel(l->dial); /* its callback releases it */
  if (l->remote != NULL)
    rd_io_close(l->remote, link_io_closed_cb);
  rd_io_close(l->local, link_io_closed_cb);
}

static void join_end_cb(void *ctx, const char *err) {
  (void)err; /* a stream that ends badly is the far side's business */
  sf_link *l = ctx;
  l->join = NULL;
  link_release(l);
}

/* The 101 arrived: bytes after its head go to the local side first. */
static void link_join(sf_link *l) {
  rd_sforward *f = l->f;
  rd_io_read_stop(l->remote);
  uv_close((uv_handle_t *)&l->timer, link_timer_closed_cb);
  rd_io *local = l->local, *remote = l->remote;
  l->local = l->remote = NULL;
  l->pending--; /* the two streams become the join's one */
  l->failed = 1; /* nothing left to give up */
  f->stats.joined++;
  l->join = rd_join_start(local, remote, l->resp + l->head_len, l->resp_len - l->head_len,
                          join_end_cb, l);
  if (l->join == NULL)
    link_release(l);
}

/* A refusal is complete (its text read, or the stream ended): report
 * "HTTP/1.1 500 Internal Server Error: text". */
static void link_refused(sf_link *l) {
  char line[160], why[sizeof l->f->stats.last_error];
  int status = 0;
  rd_proxy_connect_response(l->resp, l->resp_len, SF_RESP_MAX, &status, line, sizeof line);
  size_t n = (size_t)snprintf(why, sizeof why, "%s", line);
  size_t body = l->resp_len - l->head_len;
  if (body > 0 && n + 3 < sizeof why) {
    why[n++] = ':';
    why[n++] = ' ';
    for (size_t i = 0; i < body && n + 1 < sizeof why; i++) {
      unsigned char c = (unsigned char)l->resp[l->head_len + i];
      why[n++] = c == '\n' || c == '\r' ? ' ' : c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    while (n > 0 && why[n - 1] == ' ')
      n--;
    why[n] = '\0';
  }
  link_fail(l, why);
}

static void link_check(sf_link *l) {
  if (l->status != 0) {
    size_t want = SF_RESP_MAX;
    rd_http_response resp;
    if (rd_http_parse_response(l->resp, l->resp_len, SF_RESP_MAX, RD_HTTP_MAX_HEADERS, &resp) > 0) {
      const rd_http_header *cl =
          rd_http_find_header(resp.headers, resp.num_headers, "Content-Length");
      if (cl != NULL)
        want = l->head_len + (size_t)strtoull(cl->value, NULL, 10);
    }
    if (l->resp_len >= want || l->resp_len == sizeof l->resp)
      link_refused(l);
    return;
  }
  char line[160];
  int status = 0;
  int n = rd_proxy_connect_response(l->resp, l->resp_len, SF_RESP_MAX - 1, &status, line,
                                    sizeof line);
  if (n == RD_EPARTIAL)
    return;
  if (n < 0) {
    link_fail(l, n == RD_ETOOLARGE ? "answer head too large" : "malformed answer from the server");
    return;
  }
  l->head_len = (size_t)n;
  if (status == 101) {
    link_join(l);
    return;
  }
  l->status = status;
  link_check(l);
}

static void hs_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  sf_link *l = rd_io_data(io);
  *buf = uv_buf_init(l->resp + l->resp_len, (unsigned)(sizeof l->resp - l->resp_len));
}

static void hs_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  sf_link *l = rd_io_data(io);
  if (nread == 0 || l->failed)
    return;
  if (nread < 0 && l->status != 0) {
    link_refused(l); /* the text ran to the end of the stream */
    return;
  }
  if (nread < 0) {
    char why[200];
    snprintf(why, sizeof why, "%s: %s",
             l->resp_len == 0 ? "no answer from the server" : "answer cut short",
             nread == UV_EOF    ? "connection closed"
             : nread == RD_ETLS ? rd_io_error(io)
                                : rd_strerror((int)nread));
    link_fail(l, why);
    return;
  }
  l->resp_len += (size_t)nread;
  link_check(l);
}

typedef struct {
  uv_write_t req;
  sf_link *l;
} hs_write;

static void hs_write_cb(uv_write_t *req, int status) {
  (void)status; /* a failed write shows up as a read error */
  rd_free(req);
}

static void send_request(sf_link *l) {
  hs_write *w = rd_malloc(sizeof *w);
  uv_buf_t buf = uv_buf_init(l->f->request, (unsigned)l->f->request_len);
  if (w == NULL || rd_io_write(l->remote, &w->req, &buf, 1, hs_write_cb) != 0) {
    rd_free(w);
    link_fail(l, "write to the server failed");
    return;
  }
  rd_io_read_start(l->remote, hs_alloc_cb, hs_read_cb);
}

static void tls_done_cb(rd_io *io, int status, const char *error) {
  sf_link *l = rd_io_data(io);
  if (l->failed)
    return;
  if (status < 0) {
    char why[300];
    snprintf(why, sizeof why, "tls: %s", error != NULL && error[0] ? error : rd_strerror(status));
    link_fail(l, why);
    return;
  }
  send_request(l);
}

static void stream_free_cb(uv_handle_t *h) { rd_free(h); }

static void dial_cb(void *ctx, int status, uv_stream_t *stream, int fd, const char *error) {
  (void)fd; /* a tcp dial */
  sf_link *l = ctx;
  l->dial = NULL;
  if (l->failed) {
    if (stream != NULL)
      uv_close((uv_handle_t *)stream, stream_free_cb);
    link_release(l);
    return;
  }
  if (status < 0) {
    link_release(l); /* the dial's part is done */
    link_fail(l, error);
    return;
  }
  rd_tls *tls = NULL;
  char err[200];
  if (l->f->tls != NULL && (tls = rd_tls_new(l->f->tls, l->f->server_name, err, sizeof err)) == NULL) {
    uv_close((uv_handle_t *)stream, stream_free_cb);
    link_release(l);
    link_fail(l, err);
    return;
  }
  /* The dial's part becomes the server stream's. */
  l->remote = rd_io_new(stream, tls);
  if (l->remote == NULL) {
    link_release(l);
    link_fail(l, "out of memory");
    return;
  }
  rd_io_set_data(l->remote, l);
  if (tls != NULL) {
    if (rd_io_handshake(l->remote, tls_done_cb) != 0)
      link_fail(l, "tls: handshake could not start");
  } else {
    send_request(l);
  }
}

static void link_timeout_cb(uv_timer_t *t) {
  sf_link *l = t->data;
  link_fail(l, l->remote == NULL ? "dial the server: i/o timeout" : "no answer from the server in time");
}

static void accept_cb(uv_stream_t *listener, int status) {
  rd_sforward *f = listener->data;
  if (status < 0)
    rd_nofile_error(status); /* counted; the listener goes on */
  if (status < 0 || f->closing)
    return;
  uv_tcp_t *tcp = rd_malloc(sizeof *tcp);
  if (tcp == NULL)
    return;
  uv_tcp_init(rd_loop(), tcp);
  if (uv_accept(listener, (uv_stream_t *)tcp) != 0) {
    uv_close((uv_handle_t *)tcp, stream_free_cb);
    return;
  }
  uv_tcp_nodelay(tcp, 1);
  sf_link *l = rd_calloc(1, sizeof *l);
  if (l == NULL) {
    uv_close((uv_handle_t *)tcp, stream_free_cb);
    return;
  }
  l->local = rd_io_new((uv_stream_t *)tcp, NULL);
  if (l->local == NULL) {
    rd_free(l);
    return;
  }
  l->f = f;
  f->refs++;
  f->stats.accepted++;
  f->stats.open++;
  l->next = f->links;
  if (l->next != NULL)
    l->next->prev = l;
  f->links = l;
  rd_io_set_data(l->local, l);
  uv_timer_init(rd_loop(), &l->timer);
  l->timer.data = l;
  l->pending = 3; /* local, timer, dial (then the server stream) */
  if (f->timeout_ms > 0)
    uv_timer_start(&l->timer, link_timeout_cb, f->timeout_ms, 0);
  int st = 0;
  char err[200];
  l->dial = rd_dial_start(rd_loop(), "tcp", f->server, f->timeout_ms, dial_cb, l, &st, err,
                          sizeof err);
  if (l->dial == NULL) {
    link_release(l);
    link_fail(l, err);
  }
}

/* ---- the forward ---- */

static void listener_closed_cb(uv_handle_t *h) { sf_unref(h->data); }

static void sf_close(rd_object *obj, rd_cmd *waiter) {
  rd_sforward *f = (rd_sforward *)obj;
  if (f->closing) {
    if (waiter != NULL)
      rd_cmd_finish(waiter, RD_OK, NULL);
    return;
  }
  f->closing = 1;
  f->close_waiter = waiter;
  rd_object_unregister(&f->obj);
  for (sf_link *l = f->links; l != NULL; l = l->next) {
    if (l->join != NULL)
      rd_join_close(l->join);
    else
      link_fail(l, NULL);
  }
  uv_close((uv_handle_t *)&f->listener, listener_closed_cb);
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
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)tcp, 511, accept_cb);
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

/* The request head for cfg, rd_malloc'ed into f; 0 or a code with err. */
static int build_request(rd_sforward *f, const rd_sforward_config *cfg, char *err, size_t errlen) {
  const char *url = cfg->server_url;
  size_t ulen = strlen(url);
  /* Read as its ws:// twin: the same authority, port and path rules. */
  char ws[2048];
  int https = strncmp(url, "https://", 8) == 0;
  if (!https && strncmp(url, "http://", 7) != 0) {
    snprintf(err, errlen, "unsupported URL scheme (want http:// or https://): %s", url);
    return RD_EMALFORMED;
  }
  if (ulen + 1 > sizeof ws) {
    snprintf(err, errlen, "server URL too long");
    return RD_EMALFORMED;
  }
  snprintf(ws, sizeof ws, "ws%s", url + 4);
  rd_addr_url u;
  int rc = rd_addr_parse_url(ws, strlen(ws), &u);
  if (rc < 0) {
    snprintf(err, errlen, "missing or bad host in URL (%s): %s", rd_addr_strerror(rc), url);
    return RD_EMALFORMED;
  }
  if (memchr(u.path, '?', u.path_len) != NULL || memchr(u.path, '#', u.path_len) != NULL) {
    snprintf(err, errlen, "the server URL must not have a query: %s", url);
    return RD_EMALFORMED;
  }
  if (https && cfg->tls == NULL) {
    snprintf(err, errlen, "an https:// server URL needs a TLS context");
    return RD_EINVAL;
  }
  char dest[256];
  if (rd_stream_check_dest(cfg->proto, cfg->address, dest, sizeof dest) != 0) {
    snprintf(err, errlen, "%s", dest);
    return RD_EMALFORMED;
  }
  size_t plen = u.path_len;
  while (plen > 0 && u.path[plen - 1] == '/')
    plen--; /* "https://h/tunnel/" and "https://h/tunnel" name one prefix */
  char key[3 * RD_STREAM_KEY_MAX + 1], proto[3 * RD_STREAM_PROTO_MAX + 1],
      address[3 * RD_STREAM_ADDRESS_MAX + 1];
  if (cfg->key[0] == '\0' || rd_stream_encode(key, sizeof key, cfg->key) < 0 ||
      rd_stream_encode(proto, sizeof proto, cfg->proto) < 0 ||
      rd_stream_encode(address, sizeof address, cfg->address) < 0 ||
      strlen(cfg->key) > RD_STREAM_KEY_MAX || strlen(cfg->address) > RD_STREAM_ADDRESS_MAX) {
    snprintf(err, errlen, "empty or too long client key or address");
    return RD_EMALFORMED;
  }
  char hp[RD_ADDR_JOINED_MAX];
  rd_addr_join(hp, sizeof hp, u.addr.host, u.addr.host_len, u.addr.port);
  size_t cap = plen + u.authority_len + strlen(key) + strlen(proto) + strlen(address) +
               strlen(cfg->headers) + 160;
  f->request = rd_malloc(cap);
  f->server = rd_strndup(hp, strlen(hp));
  f->server_name = rd_strndup(u.addr.host, u.addr.host_len);
  if (f->request == NULL || f->server == NULL || f->server_name == NULL) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  int n = snprintf(f->request, cap,
                   "GET %.*s/stream/%s/%s/%s HTTP/1.1\r\nHost: %.*s\r\nConnection: Upgrade\r\n"
                   "Upgrade: tcp\r\n%s\r\n",
                   (int)plen, u.path, key, proto, address, (int)u.authority_len, u.authority,
                   cfg->headers);
  f->request_len = (size_t)n;
  if (https) {
    f->tls = cfg->tls;
    rd_tls_ctx_ref(f->tls);
  }
  return RD_OK;
}

static void failed_listener_closed_cb(uv_handle_t *h) {
  rd_sforward *f = h->data;
  f->refs = 1;
  sf_unref(f);
}

int rd_sforward_start(const rd_sforward_config *cfg, uint64_t *handle, int *port_out, char *err,
                      size_t errlen) {
  rd_sforward *f = rd_calloc(1, sizeof *f);
  if (f == NULL) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  f->timeout_ms = cfg->timeout_ms;
  int rc = build_request(f, cfg, err, errlen);
  if (rc != RD_OK) {
    f->refs = 1;
    sf_unref(f);
    return rc;
  }
  uv_tcp_init(rd_loop(), &f->listener);
  f->listener.data = f;
  rc = bind_listener(&f->listener, cfg->host, cfg->port, port_out, err, errlen);
  if (rc == 0 && (rc = rd_object_register(&f->obj, RD_OBJ_STREAM_FORWARD)) != 0)
    snprintf(err, errlen, "out of memory");
  if (rc != 0) {
    uv_close((uv_handle_t *)&f->listener, failed_listener_closed_cb);
    return rc;
  }
  f->obj.close = sf_close;
  f->refs = 1;
  *handle = f->obj.handle;
  return RD_OK;
}
