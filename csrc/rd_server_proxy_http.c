/* One plain-http exchange of the proxy route, kept alive on both sides: the
 * client's request (head, then its body as its framing says) goes to a
 * backend (a tunneled connection, pooled or fresh; rd_server_pool.c), and the
 * response comes back by its own framing. When both are complete the
 * client's stream goes back to an HTTP connection for its next request
 * (rd_srv_httpconn_adopt, with any pipelined bytes already read) and the
 * backend back to the pool, each only when its framing allows.
 *
 * The exchange owns the client's stream and the backend while it runs and
 * holds a server reference; it is freed in exchange_maybe_free once it is
 * over and its last write has called back (writes to a stream that has moved
 * on still report here). A backend that fails before any response byte
 * answers the client 500 with the tunnel's reason, as the route always did;
 * a reused one is first retried once on a fresh connection when the method
 * is idempotent and the whole request is still at hand. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_http_framing.h"
#include "rd_server_int.h"

/* Past this many bytes queued toward one side, the other is not read. */
#define EXCHANGE_WRITE_HIGH (1u << 20)

enum { PH_HEAD, PH_BODY, PH_DONE };

typedef struct exchange {
  rd_server *srv;
  rd_io *user;     /* the client's stream */
  rd_backend *be;  /* NULL once handed back */
  rd_proxy_target t;
  uint8_t *req;    /* the request as sent, while a retry may resend it */
  size_t req_len;
  rd_http_body req_body;  /* the part of the request body still to come */
  uint8_t *rest;          /* client bytes after this request (pipelined) */
  size_t rest_len;
  char *rbuf;             /* the response head as it arrives */
  size_t rlen;
  rd_block *head;         /* the rewritten response head, held back to go out */
  size_t head_len;        /* in one write with the body bytes read with it */
  rd_http_body resp_body;
  char method[16];
  int writes;             /* in flight, on either stream */
  uint64_t timeout_ms;
  unsigned phase : 2, over : 1, raw : 1, responded : 1, retried : 1, idempotent : 1;
  unsigned client_keep : 1, backend_keep : 1, client_wants_keep : 1, client_http10 : 1;
} exchange;

typedef struct {
  uv_write_t req;
  rd_block *block[2]; /* what the write's buffers lie in (the second may be NULL) */
  exchange *x;
} exchange_write;

/* Bytes inside a block, for write_parts. */
typedef struct {
  rd_block *block;
  const uint8_t *data;
  size_t len;
} part;

static void exchange_abort(exchange *x);
static void backend_failed(exchange *x, ssize_t code);
static void update_reading(exchange *x);

static void exchange_maybe_free(exchange *x) {
  if (!x->over || x->writes > 0)
    return;
  rd_server *srv = x->srv;
  rd_free(x->req);
  rd_free(x->rest);
  rd_free(x->rbuf);
  rd_block_unref(x->head);
  rd_free(x);
  rd_srv_unref(srv);
}

static void write_cb(uv_write_t *req, int status) {
  exchange_write *w = (exchange_write *)req;
  exchange *x = w->x;
  rd_io *dst = req->data;
  rd_block_unref(w->block[0]);
  rd_block_unref(w->block[1]);
  rd_free(w);
  x->writes--;
  if (x->over) {
    exchange_maybe_free(x);
    return;
  }
  if (status < 0) {
    if (dst == x->user)
      exchange_abort(x); /* the client went away */
    else
      backend_failed(x, status);
    return;
  }
  update_reading(x);
}

/* Sends n (1 or 2) parts to dst in one write, each part's block reference
 * taken. 0, or a negative code after which the caller ends the exchange. */
static int write_parts(exchange *x, rd_io *dst, const part *p, unsigned n) {
  uv_buf_t bufs[2] = {uv_buf_init(NULL, 0), uv_buf_init(NULL, 0)};
  size_t total = 0;
  for (unsigned i = 0; i < n; i++) {
    bufs[i] = uv_buf_init((char *)p[i].data, (unsigned)p[i].len);
    total += p[i].len;
  }
  ssize_t sent = rd_io_try_write(dst, bufs, n);
  exchange_write *w = NULL;
  if (sent >= 0 && (size_t)sent < total && (w = rd_malloc(sizeof *w)) != NULL) {
    unsigned first = 0;
    size_t skip = (size_t)sent;
    while (first + 1 < n && skip >= bufs[first].len) /* parts the socket took whole */
      skip -= bufs[first++].len;
    bufs[first].base += skip;
    bufs[first].len -= skip;
    w->block[0] = p[0].block;
    w->block[1] = n > 1 ? p[1].block : NULL;
    w->x = x;
    w->req.data = dst;
    if (rd_io_write(dst, &w->req, bufs + first, n - first, write_cb) == 0) {
      x->writes++;
      return 0;
    }
    rd_free(w);
  }
  for (unsigned i = 0; i < n; i++)
    rd_block_unref(p[i].block);
  if (sent >= 0 && (size_t)sent == total)
    return 0;
  return sent < 0 ? (int)sent : UV_EPIPE;
}

/* Sends len bytes at data (inside b, whose reference this takes) to dst. */
static int write_to(exchange *x, rd_io *dst, rd_block *b, const uint8_t *data, size_t len) {
  part p = {b, data, len};
  return write_parts(x, dst, &p, 1);
}

/* A copy of data[0..len) to dst. */
static int write_copy(exchange *x, rd_io *dst, const void *data, size_t len) {
  if (len == 0)
    return 0;
  rd_block *b = rd_block_get_small(len);
  if (b == NULL)
    return RD_ENOMEM;
  memcpy(rd_block_payload(b), data, len);
  return write_to(x, dst, b, rd_block_payload(b), len);
}

static void user_shutdown_cb(rd_io *io, int status) {
  (void)status;
  rd_io_close(io, NULL);
}

/* Ends the exchange: the backend pooled when backend_keep, else closed; the
 * client kept (its next request) when client_keep, else shut down after what
 * is queued for it (at once when it broke: flush 0). */
static void exchange_end(exchange *x, int flush) {
  if (x->over)
    return;
  x->over = 1;
  /* A stream that goes on keeps reading: its next owner sets its callbacks
   * (no stop and start again, each a poller change). */
  if (!x->client_keep)
    rd_io_read_stop(x->user);
  if (x->be != NULL) {
    if (!x->backend_keep)
      rd_io_read_stop(x->be->io);
    x->be->owner = NULL;
    if (x->backend_keep)
      rd_srv_pool_put(x->be);
    else
      rd_srv_backend_close(x->be);
    x->be = NULL;
  }
  if (x->client_keep)
    rd_srv_httpconn_adopt(x->srv, x->user, x->rest, x->rest_len);
  else if (!flush || rd_io_shutdown(x->user, user_shutdown_cb) != 0)
    rd_io_close(x->user, NULL);
  x->user = NULL;
  exchange_maybe_free(x);
}

/* Something broke mid-exchange: neither side is kept, nothing more is sent. */
static void exchange_abort(exchange *x) {
  x->client_keep = x->backend_keep = 0;
  exchange_end(x, 0);
}

/* The answer when the backend fails before any response byte: Go's 500 with
 * the reason as its body, then the client's connection closes. */
static void answer_error(exchange *x, const char *why) {
  char head[160];
  size_t elen = strlen(why);
  size_t hlen = rd_http_error_head(head, sizeof head, elen);
  x->client_keep = x->backend_keep = 0;
  if (write_copy(x, x->user, head, hlen) != 0 || write_copy(x, x->user, why, elen) != 0) {
    exchange_end(x, 0);
    return;
  }
  exchange_end(x, 1);
}

/* A response in `text` of its own (400, 502): the client's connection closes
 * after it. */
static void answer_text(exchange *x, int status, const char *reason, const char *text) {
  char head[256];
  int n = snprintf(head, sizeof head,
                   "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                   status, reason, strlen(text));
  x->client_keep = x->backend_keep = 0;
  if (x->responded || write_copy(x, x->user, head, (size_t)n) != 0 ||
      write_copy(x, x->user, text, strlen(text)) != 0) {
    exchange_end(x, 0);
    return;
  }
  exchange_end(x, 1);
}

static void alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)io;
  (void)suggested;
  rd_block *b = rd_block_get(RD_BLOCK_SIZE);
  *buf = b != NULL ? uv_buf_init((char *)rd_block_payload(b), RD_BLOCK_SIZE) : uv_buf_init(NULL, 0);
}

static void user_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf);
static void backend_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf);

static int request_done(const exchange *x) { return x->raw || rd_http_body_done(&x->req_body); }

/* Each side is read while the exchange needs its bytes and what waits for
 * the other side stays under the mark. The client is read after its request
 * too, so that its going away is seen; what it sends then (a pipelined
 * request) is kept up to a head's worth. */
static void update_reading(exchange *x) {
  if (x->over)
    return;
  int to_backend_ok = rd_io_write_queue_size(x->be->io) <= EXCHANGE_WRITE_HIGH;
  int to_user_ok = rd_io_write_queue_size(x->user) <= EXCHANGE_WRITE_HIGH;
  if ((x->raw || !request_done(x) || x->rest_len <= x->srv->cfg.max_head) && to_backend_ok)
    rd_io_read_start(x->user, alloc_cb, user_read_cb);
  else
    rd_io_read_stop(x->user);
  if ((x->raw || x->phase != PH_DONE) && to_user_ok)
    rd_io_read_start(x->be->io, alloc_cb, backend_read_cb);
  else
    rd_io_read_stop(x->be->io);
}

/* Both messages complete: each side goes on as its framing allows. */
static void maybe_complete(exchange *x) {
  if (x->phase != PH_DONE || !request_done(x))
    return;
  exchange_end(x, 1);
}

/* Keeps bytes after the request for the client's next one. */
static int keep_rest(exchange *x, const uint8_t *data, size_t len) {
  if (len == 0)
    return 0;
  uint8_t *r = rd_realloc(x->rest, x->rest_len + len);
  if (r == NULL)
    return RD_ENOMEM;
  memcpy(r + x->rest_len, data, len);
  x->rest = r;
  x->rest_len += len;
  return 0;
}

static void user_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  exchange *x = rd_io_data(io);
  rd_block *b = buf->base != NULL ? rd_block_of_payload(buf->base) : NULL;
  if (nread <= 0 || x->over) {
    rd_block_unref(b);
    if (nread < 0 && !x->over)
      exchange_abort(x); /* the client went away mid-exchange */
    return;
  }
  const uint8_t *data = rd_block_payload(b);
  size_t len = (size_t)nread;
  size_t body = len;
  if (!x->raw) {
    ssize_t n = rd_http_body_feed(&x->req_body, data, len);
    if (n < 0) {
      rd_block_unref(b);
      answer_text(x, 400, "Bad Request", "malformed chunked request body\n");
      return;
    }
    body = (size_t)n;
    if (keep_rest(x, data + body, len - body) != 0) {
      rd_block_unref(b);
      exchange_abort(x);
      return;
    }
  }
  if (body == 0) {
    rd_block_unref(b);
  } else {
    rd_free(x->req); /* the body moved on: no retry can resend it */
    x->req = NULL;
    if (write_to(x, x->be->io, b, data, body) != 0) {
      backend_failed(x, UV_EPIPE);
      return;
    }
  }
  update_reading(x);
  maybe_complete(x);
}

/* The tunnel's reason for ending the backend, else the stream's. */
static const char *backend_error(const exchange *x, ssize_t code) {
  rd_dial_status *st = x->be->st;
  if (atomic_load(&st->ended) && st->error[0] != '\0')
    return st->error;
  return code == UV_EOF ? "EOF" : rd_strerror((int)code);
}

static int send_request(exchange *x);

/* The backend ended or failed. */
static void backend_failed(exchange *x, ssize_t code) {
  if (x->over)
    return;
  if (!x->raw && x->phase == PH_BODY && x->resp_body.kind == RD_BODY_CLOSE && code == UV_EOF) {
    x->phase = PH_DONE; /* a close-delimited body ends here */
    x->backend_keep = x->client_keep = 0;
    exchange_end(x, 1);
    return;
  }
  /* A reused connection the target closed while it sat idle fails before
   * any response byte: an idempotent request goes once more, on a fresh
   * connection. */
  if (x->be->reused && !x->responded && x->rlen == 0 && x->phase == PH_HEAD && x->idempotent &&
      !x->retried && x->req != NULL) {
    x->retried = 1;
    rd_io_read_stop(x->be->io);
    x->be->owner = NULL;
    rd_srv_backend_close(x->be);
    x->be = NULL;
    if (send_request(x) == RD_ENOSESSION)
      answer_text(x, 500, "Internal Server Error", "failed to find Session for client\n");
    return; /* x may be gone */
  }
  if (!x->responded && x->phase == PH_HEAD) {
    char why[160];
    snprintf(why, sizeof why, "%s", backend_error(x, code));
    answer_error(x, why);
    return;
  }
  exchange_abort(x); /* mid-response: the client sees the connection drop */
}

/* True for the response head's hop-by-hop headers, which this hop rewrites. */
static int is_hop(const rd_http_header *h) {
  static const char *const hop[] = {"Connection", "Keep-Alive", "Proxy-Connection"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(hop); i++)
    if (h->name_len == strlen(hop[i]) && rd_http_ieq(hop[i], h->name, h->name_len))
      return 1;
  return 0;
}

/* Builds the final response head for the client with this hop's Connection
 * header in place of the backend's, and holds it back: response_body sends
 * it with the body bytes read with it, in one write. */
static int build_head(exchange *x, const rd_http_response *resp, const char *head,
                      size_t head_len) {
  /* Each header may grow by two bytes (": " and CRLF where the backend sent
   * ":" and a bare LF); then this hop's Connection line and the blank line. */
  size_t cap = head_len + 2 * resp->num_headers + 64;
  rd_block *b = rd_block_get_small(cap);
  if (b == NULL)
    return RD_ENOMEM;
  char *out = (char *)rd_block_payload(b);
  const char *line_end = memchr(head, '\n', head_len);
  size_t n = (size_t)(line_end - head) + 1;
  memcpy(out, head, n);
  for (size_t i = 0; i < resp->num_headers; i++) {
    const rd_http_header *h = &resp->headers[i];
    if (is_hop(h))
      continue;
    memcpy(out + n, h->name, h->name_len);
    n += h->name_len;
    memcpy(out + n, ": ", 2);
    n += 2;
    memcpy(out + n, h->value, h->value_len);
    n += h->value_len;
    memcpy(out + n, "\r\n", 2);
    n += 2;
  }
  if (!x->client_keep)
    n += (size_t)snprintf(out + n, cap - n, "Connection: close\r\n");
  else if (x->client_http10)
    n += (size_t)snprintf(out + n, cap - n, "Connection: keep-alive\r\n");
  n += (size_t)snprintf(out + n, cap - n, "\r\n");
  x->responded = 1;
  x->head = b;
  x->head_len = n;
  return 0;
}

/* Response body bytes: those of the body go to the client; any after its
 * end mean the backend cannot be trusted with another request. */
static void response_body(exchange *x, rd_block *b, const uint8_t *data, size_t len) {
  ssize_t n = rd_http_body_feed(&x->resp_body, data, len);
  if (n < 0) {
    rd_block_unref(b);
    exchange_abort(x);
    return;
  }
  if ((size_t)n < len)
    x->backend_keep = 0;
  part parts[2];
  unsigned nparts = 0;
  if (x->head != NULL) {
    parts[nparts++] = (part){x->head, rd_block_payload(x->head), x->head_len};
    x->head = NULL;
  }
  if (n > 0)
    parts[nparts++] = (part){b, data, (size_t)n};
  else
    rd_block_unref(b);
  if (nparts > 0 && write_parts(x, x->user, parts, nparts) != 0) {
    exchange_abort(x);
    return;
  }
  if (rd_http_body_done(&x->resp_body)) {
    x->phase = PH_DONE;
    if (!request_done(x)) /* answered before the request ended: neither side goes on */
      x->client_keep = x->backend_keep = 0;
    exchange_end(x, 1);
    return;
  }
  update_reading(x);
}

enum { HEADS_PARTIAL, HEADS_DONE, HEADS_RAW, HEADS_ENDED };

/* Reads response heads from buf[0..len): 1xx heads go to the client as they
 * are; the final head decides the framing and goes out rewritten. *used is
 * what the heads took. HEADS_RAW: a 101 starts at *used (bytes flow as they
 * are from there); HEADS_ENDED: the exchange was ended (x may be gone). */
static int response_heads(exchange *x, const char *buf, size_t len, size_t *used) {
  const rd_server_config *cfg = &x->srv->cfg;
  size_t pos = 0;
  for (;;) {
    *used = pos;
    rd_http_response resp;
    int r = rd_http_parse_response(buf + pos, len - pos, cfg->max_head, cfg->max_headers, &resp);
    if (r == RD_EPARTIAL)
      return HEADS_PARTIAL;
    if (r < 0) {
      answer_text(x, 502, "Bad Gateway", r == RD_ETOOLARGE ? "response head too large\n"
                                                            : "malformed response from the target\n");
      return HEADS_ENDED;
    }
    if (resp.status == 101)
      return HEADS_RAW;
    if (resp.status < 200) { /* 100 Continue and the like */
      x->responded = 1;
      if (write_copy(x, x->user, buf + pos, (size_t)r) != 0) {
        exchange_abort(x);
        return HEADS_ENDED;
      }
      pos += (size_t)r;
      continue;
    }
    rd_http_framing f;
    if (rd_http_response_framing(&resp, x->method, strlen(x->method), &f) != RD_OK) {
      answer_text(x, 502, "Bad Gateway", "ambiguous response framing from the target\n");
      return HEADS_ENDED;
    }
    x->client_keep = x->client_wants_keep && f.kind != RD_BODY_CLOSE;
    x->backend_keep = f.keep_alive && f.kind != RD_BODY_CLOSE && x->timeout_ms == 0;
    if (build_head(x, &resp, buf + pos, (size_t)r) != 0) {
      exchange_abort(x);
      return HEADS_ENDED;
    }
    rd_http_body_init(&x->resp_body, &f);
    x->phase = PH_BODY;
    *used = pos + (size_t)r;
    return HEADS_DONE;
  }
}

/* A 101: from here bytes flow both ways as they are, until either side
 * ends. b holds the bytes from the 101 head on. */
static void go_raw(exchange *x, rd_block *b, const uint8_t *data, size_t len) {
  x->raw = 1;
  x->client_keep = x->backend_keep = 0;
  x->responded = 1;
  if (write_to(x, x->user, b, data, len) != 0 ||
      write_copy(x, x->be->io, x->rest, x->rest_len) != 0) {
    exchange_abort(x);
    return;
  }
  x->rest_len = 0;
  update_reading(x);
}

/* Response head bytes. The usual case reads the whole head at once and
 * parses it where it lies; a head split across reads gathers in rbuf. */
static void response_head(exchange *x, rd_block *b, const uint8_t *data, size_t len) {
  size_t cap = x->srv->cfg.max_head + 1;
  const uint8_t *rest = data;
  size_t rest_len = len;
  size_t used;
  int r;
  if (x->rlen == 0) {
    r = response_heads(x, (const char *)data, len, &used);
    rest = data + used;
    rest_len = len - used;
  } else {
    size_t take = len < cap - x->rlen ? len : cap - x->rlen;
    memcpy(x->rbuf + x->rlen, data, take);
    x->rlen += take;
    r = response_heads(x, x->rbuf, x->rlen, &used);
    if (r == HEADS_DONE || r == HEADS_RAW) { /* what follows the head, in one block */
      size_t extra = x->rlen - used;
      rd_block *nb = rd_block_get_small(extra + len - take + 1);
      if (nb == NULL) {
        rd_block_unref(b);
        exchange_abort(x);
        return;
      }
      memcpy(rd_block_payload(nb), x->rbuf + used, extra);
      memcpy(rd_block_payload(nb) + extra, data + take, len - take);
      rd_block_unref(b);
      b = nb;
      rest = rd_block_payload(nb);
      rest_len = extra + len - take;
      x->rlen = 0;
    } else if (r == HEADS_PARTIAL) {
      memmove(x->rbuf, x->rbuf + used, x->rlen - used);
      x->rlen -= used;
      rest_len = 0;
    }
  }
  if (r == HEADS_ENDED) {
    rd_block_unref(b);
    return;
  }
  if (r == HEADS_RAW) {
    go_raw(x, b, rest, rest_len);
    return;
  }
  if (r == HEADS_DONE) {
    response_body(x, b, rest, rest_len);
    return;
  }
  /* Partial: keep what is not in rbuf yet. */
  if (rest_len > 0) {
    if (x->rbuf == NULL && (x->rbuf = rd_malloc(cap)) == NULL) {
      rd_block_unref(b);
      exchange_abort(x);
      return;
    }
    if (rest_len > cap - x->rlen) {
      rd_block_unref(b);
      answer_text(x, 502, "Bad Gateway", "response head too large\n");
      return;
    }
    memcpy(x->rbuf + x->rlen, rest, rest_len);
    x->rlen += rest_len;
  } else if (x->rlen >= cap) {
    rd_block_unref(b);
    answer_text(x, 502, "Bad Gateway", "response head too large\n");
    return;
  }
  rd_block_unref(b);
  update_reading(x);
}

static void backend_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  rd_backend *be = rd_io_data(io);
  exchange *x = be->owner;
  rd_block *b = buf->base != NULL ? rd_block_of_payload(buf->base) : NULL;
  if (x == NULL || x->over || nread <= 0) {
    rd_block_unref(b);
    if (x != NULL && !x->over && nread < 0)
      backend_failed(x, nread);
    return;
  }
  const uint8_t *data = rd_block_payload(b);
  if (x->raw) {
    if (write_to(x, x->user, b, data, (size_t)nread) != 0)
      exchange_abort(x);
    else
      update_reading(x);
  } else if (x->phase == PH_HEAD) {
    response_head(x, b, data, (size_t)nread);
  } else if (x->phase == PH_BODY) {
    response_body(x, b, data, (size_t)nread);
  } else {
    rd_block_unref(b);
  }
}

/* Takes an idle backend for the target or dials one, and sends the request
 * (as much of it as is at hand) on it. 0, or a negative code with x->be
 * NULL when no session is left, or after answering the client. */
static int send_request(exchange *x) {
  char err[256];
  rd_backend *be = x->retried ? NULL : rd_srv_pool_take(x->srv, x->t.pool_key);
  if (be == NULL) {
    rd_session *s = rd_srv_route(x->srv, x->t.key);
    if (s == NULL)
      return RD_ENOSESSION;
    be = rd_srv_backend_dial(x->srv, s, x->t.proto, x->t.address, x->t.pool_key, err, sizeof err);
    if (be == NULL) {
      answer_text(x, 500, "Internal Server Error", err);
      return RD_ECLOSED;
    }
  }
  be->owner = x;
  x->be = be;
  if (x->timeout_ms > 0 && rd_srv_backend_alive(be))
    rd_conn_set_deadline(be->c, x->timeout_ms);
  if (write_copy(x, be->io, x->req, x->req_len) != 0) {
    backend_failed(x, UV_EPIPE);
    return RD_ECLOSED;
  }
  update_reading(x);
  return 0;
}

void rd_srv_proxy_http(httpconn *hc, const rd_http_request *req, const rd_proxy_target *t,
                       const char *head, size_t head_len, uint64_t timeout_ms) {
  rd_http_framing f;
  if (rd_http_request_framing(req, &f) != RD_OK) {
    rd_srv_respond_text(hc, 400, "Bad Request", "ambiguous request framing\n");
    return;
  }
  if (req->method_len >= sizeof(((exchange *)0)->method)) {
    rd_srv_respond_text(hc, 400, "Bad Request", "method too long\n");
    return;
  }
  exchange *x = rd_calloc(1, sizeof *x);
  /* The body bytes already read: those of this request, then the next's. */
  const uint8_t *body = (const uint8_t *)hc->buf + hc->head_len;
  size_t have = hc->len - hc->head_len;
  if (x != NULL)
    rd_http_body_init(&x->req_body, &f);
  ssize_t n = x != NULL ? rd_http_body_feed(&x->req_body, body, have) : 0;
  if (x == NULL || n < 0 || (x->req = rd_malloc(head_len + (size_t)n + 1)) == NULL ||
      keep_rest(x, body + n, have - (size_t)n) != 0) {
    if (x != NULL)
      rd_free(x->req);
    rd_free(x);
    if (n < 0)
      rd_srv_respond_text(hc, 400, "Bad Request", "malformed chunked request body\n");
    else
      rd_srv_respond_text(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  memcpy(x->req, head, head_len);
  memcpy(x->req + head_len, body, (size_t)n);
  x->req_len = head_len + (size_t)n;
  x->srv = hc->srv;
  x->t = *t;
  x->timeout_ms = timeout_ms;
  memcpy(x->method, req->method, req->method_len);
  static const char *const idempotent[] = {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(idempotent); i++)
    x->idempotent |= strcmp(x->method, idempotent[i]) == 0;
  x->client_wants_keep = f.keep_alive;
  x->client_http10 = req->minor_version == 0;
  x->srv->refs++;
  /* Still reading: send_request sets this exchange's callbacks or stops
   * reading before the loop runs again. */
  x->user = rd_srv_httpconn_take_stream_reading(hc);
  rd_io_set_data(x->user, x);
  if (send_request(x) == RD_ENOSESSION) {
    char msg[320];
    snprintf(msg, sizeof msg, "failed to find Session for client %s", x->t.key);
    answer_text(x, 500, "Internal Server Error", msg);
  }
}
