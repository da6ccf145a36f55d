/* The agent. It owns its retry timer, the dial or handshake in progress, its
 * session and the timers of wait_connected callers; it is freed when all of
 * them are gone, and its close command (or a link's on_freed) finishes then. */
#include "rd_client.h"

#include <fnmatch.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_dialer.h"
#include "rd_http.h"
#include "rd_io.h"
#include "rd_proxy_connect.h"
#include "rd_ws.h"

enum { CLI_WAITING, CLI_DIALING, CLI_HANDSHAKE, CLI_CONNECTED, CLI_CLOSED };

typedef struct waiter {
  struct waiter *next;
  rd_client *cli;
  rd_cmd *cmd;
  uv_timer_t timer;
} waiter;

/* One server URL, ready to dial. */
typedef struct client_target {
  char *url;
  char *host;        /* for the dial: "host:port" */
  char *server_name; /* wss: the name the certificate must match */
  char *request;     /* the handshake request head, ending in the key line */
  char *proxy_addr;  /* through an HTTP proxy: its "host:port" to dial; else NULL */
  char *proxy_request; /* and the CONNECT request for host */
  int tls;
} client_target;

struct rd_client {
  rd_object obj;
  rd_client_config cfg;
  client_target *targets;
  size_t ntargets;
  size_t current;     /* the target of this attempt */
  size_t round_start; /* where this round of failed attempts began */
  rd_metrics *metrics; /* own, or a link's owner's */
  int state;
  uv_timer_t timer; /* retry backoff, handshake deadline */
  rd_dial *dial;
  rd_io *io; /* during the handshake */
  char key[25];
  char resp[4096];
  size_t resp_len;
  int proxy_stage;        /* waiting for the proxy's answer to CONNECT */
  int refused_status;     /* a non-101 answer whose body is being read */
  size_t refused_head;    /* its head length */
  size_t refused_body;    /* its Content-Length (SIZE_MAX: until EOF) */
  rd_session *session;
  unsigned attempt;
  waiter *waiters;
  int refs;
  rd_cmd *close_waiter;
  char last_error[256];
  int was_up; /* the session that is up, or just ended, was told */
  unsigned failures; /* failed attempts since the last session, for news */
  uint32_t retry_ms;  /* the wait before the next attempt, for news */
};

void rd_client_config_default(rd_client_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->allow_mode = RD_ALLOW_ALL;
  cfg->handshake_timeout_ms = 10000;
  cfg->backoff_min_ms = 500;
  cfg->backoff_max_ms = 5000;
  rd_session_config_default(&cfg->session);
}

uint64_t rd_client_handle(const rd_client *cli) { return cli->obj.handle; }
rd_metrics *rd_client_metrics(rd_client *cli) { return cli->metrics; }
int rd_client_is_connected(const rd_client *cli) { return cli->state == CLI_CONNECTED; }
const char *rd_client_last_error(const rd_client *cli) { return cli->last_error; }
rd_session *rd_client_session(const rd_client *cli) { return cli->session; }
const char *rd_client_url(const rd_client *cli) { return cli->targets[cli->current].url; }

static void targets_free(client_target *t, size_t n) {
  for (size_t i = 0; t != NULL && i < n; i++) {
    rd_free(t[i].url);
    rd_free(t[i].host);
    rd_free(t[i].server_name);
    rd_free(t[i].request);
    rd_free(t[i].proxy_addr);
    rd_free(t[i].proxy_request);
  }
  rd_free(t);
}

static void client_unref(rd_client *cli) {
  if (--cli->refs > 0)
    return;
  for (size_t i = 0; i < cli->cfg.npatterns; i++)
    rd_free(cli->cfg.patterns[i]);
  rd_free(cli->cfg.patterns);
  targets_free(cli->targets, cli->ntargets);
  if (cli->cfg.tls != NULL)
    rd_tls_ctx_unref(cli->cfg.tls);
  if (cli->cfg.hooks == NULL)
    rd_metrics_free(cli->metrics);
  rd_cmd *w = cli->close_waiter;
  const rd_client_hooks *hooks = cli->cfg.hooks;
  void *ctx = cli->cfg.hooks_ctx;
  rd_free(cli);
  if (w != NULL)
    rd_cmd_finish(w, RD_OK, NULL);
  if (hooks != NULL && hooks->on_freed != NULL)
    hooks->on_freed(ctx);
}

/* Tells a link's owner where the client stands, or an agent's Python side
 * what happened. */
static void client_tell(rd_client *cli, int state, const char *why) {
  if (cli->cfg.hooks != NULL) { /* a link: the peer_ws counters count it */
    if (cli->cfg.hooks->on_state != NULL)
      cli->cfg.hooks->on_state(cli->cfg.hooks_ctx, cli, state, why);
    return;
  }
  const char *labels[1] = {cli->targets[cli->current].url};
  if (state == RD_CLIENT_DIALING) {
    rd_metrics_add(cli->metrics, RD_M_AGENT_ATTEMPTS, labels, 1);
    return;
  }
  const char *what = state == RD_CLIENT_CONNECTED ? "connect" : cli->was_up ? "disconnect" : "fail";
  if (what[0] == 'f')
    rd_metrics_add(cli->metrics, RD_M_AGENT_FAILURES, labels, 1);
  cli->failures = what[0] == 'f' ? cli->failures + 1 : 0;
  cli->was_up = state == RD_CLIENT_CONNECTED;
  if (cli->cfg.events)
    rd_event_post(cli->obj.handle, what, NULL, NULL, labels[0], why, 0, cli->failures,
                  state == RD_CLIENT_CONNECTED ? 0 : cli->retry_ms);
}

/* ---- wait_connected ---- */

static void waiter_closed_cb(uv_handle_t *h) {
  waiter *w = h->data;
  rd_client *cli = w->cli;
  rd_free(w);
  client_unref(cli);
}

static void waiters_finish(rd_client *cli, int connected) {
  while (cli->waiters != NULL) {
    waiter *w = cli->waiters;
    cli->waiters = w->next;
    rd_cmd_finish(w->cmd, connected, NULL);
    uv_close((uv_handle_t *)&w->timer, waiter_closed_cb);
  }
}

static void waiter_timeout_cb(uv_timer_t *t) {
  waiter *w = t->data;
  rd_client *cli = w->cli;
  for (waiter **p = &cli->waiters; *p != NULL; p = &(*p)->next) {
    if (*p == w) {
      *p = w->next;
      break;
    }
  }
  rd_cmd_finish(w->cmd, 0, NULL);
  uv_close((uv_handle_t *)&w->timer, waiter_closed_cb);
}

void rd_client_wait_connected(rd_client *cli, rd_cmd *cmd, uint64_t timeout_ms) {
  if (cli->state == CLI_CONNECTED || cli->state == CLI_CLOSED || timeout_ms == 0) {
    rd_cmd_finish(cmd, cli->state == CLI_CONNECTED, NULL);
    return;
  }
  waiter *w = rd_calloc(1, sizeof *w);
  if (w == NULL) {
    rd_cmd_finish(cmd, RD_ENOMEM, "out of memory");
    return;
  }
  w->cli = cli;
  w->cmd = cmd;
  cli->refs++;
  uv_timer_init(rd_loop(), &w->timer);
  w->timer.data = w;
  uv_timer_start(&w->timer, waiter_timeout_cb, timeout_ms, 0);
  w->next = cli->waiters;
  cli->waiters = w;
}

/* ---- connecting ---- */

static void start_attempt(rd_client *cli);

static void retry_cb(uv_timer_t *t) { start_attempt(t->data); }

/* Waits before the next attempt. A failed attempt (failed 1) moves on to the
 * next URL, at once while the round of URLs lasts; a session that ended is
 * retried on its own URL. */
/* backoff_min doubled per attempt up to backoff_max, with jitter in
 * [0.8, 1.2) to spread a fleet reconnecting after a server restart. */
static uint64_t backoff_delay(const rd_client *cli) {
  uint64_t delay = cli->cfg.backoff_min_ms;
  for (unsigned i = 0; i < cli->attempt && delay < cli->cfg.backoff_max_ms; i++)
    delay *= 2;
  if (delay > cli->cfg.backoff_max_ms)
    delay = cli->cfg.backoff_max_ms;
  uint32_t r = 0;
  uv_random(NULL, NULL, &r, sizeof r, 0, NULL);
  return delay * (800 + r % 400) / 1000;
}

static void schedule_retry(rd_client *cli, const char *why, int failed) {
  if (cli->state == CLI_CLOSED)
    return;
  if (why != NULL)
    snprintf(cli->last_error, sizeof cli->last_error, "%s", why);
  cli->state = CLI_WAITING;
  /* A failed attempt with URLs left in this round tries the next at once;
   * otherwise the backoff. Decided before the news, which names the wait
   * (and the URL that failed, so `current` moves only after it). */
  size_t next = (cli->current + 1) % cli->ntargets;
  int next_now = failed && cli->ntargets > 1 && next != cli->round_start;
  uint64_t delay = next_now ? 0 : backoff_delay(cli);
  cli->retry_ms = delay > UINT32_MAX ? UINT32_MAX : (uint32_t)delay;
  client_tell(cli, RD_CLIENT_WAITING, cli->last_error);
  if (cli->state == CLI_CLOSED)
    return; /* the hook closed it */
  if (!failed)
    cli->round_start = cli->current;
  else
    cli->current = next;
  if (!next_now && cli->attempt < 32)
    cli->attempt++;
  uv_timer_start(&cli->timer, retry_cb, delay, 0);
}

static void session_on_end(rd_session *s, void *owner, const char *reason) {
  (void)s;
  rd_client *cli = owner;
  cli->session = NULL;
  if (cli->state != CLI_CLOSED)
    schedule_retry(cli, reason, 0);
}

static void session_on_freed(void *owner) { client_unref(owner); }

/* The address an allow decision is made on: a unix path cleaned, as the
 * dialer will dial it, so that "/run/ok/../secret.sock" is judged as the
 * "/run/secret.sock" it names; others as given. Returns out, or NULL when a
 * path does not fit (the dialer would refuse it too). */
static const char *decision_address(rd_conn *c, char *out, size_t outlen) {
  const char *address = rd_conn_address(c);
  if (strcmp(rd_conn_proto(c), "unix") != 0)
    return address;
  return rd_addr_clean_path(address, strlen(address), out, outlen) < 0 ? NULL : out;
}

static int allowed_by_pattern(rd_client *cli, rd_conn *c) {
  char target[400], clean[300];
  const char *address = decision_address(c, clean, sizeof clean);
  if (address == NULL)
    return 0;
  int n = snprintf(target, sizeof target, "%s/%s", rd_conn_proto(c), address);
  if (n < 0 || (size_t)n >= sizeof target)
    return 0; /* never judge a truncated target */
  for (size_t i = 0; i < cli->cfg.npatterns; i++)
    if (fnmatch(cli->cfg.patterns[i], target, 0) == 0)
      return 1;
  return 0;
}

static void dial_answer_cb(rd_request *req, rd_verdict verdict, const char *value) {
  rd_conn *c = req->target;
  *rd_conn_owner_slot(c) = NULL;
  if (verdict == RD_VERDICT_DIALED) {
    int fd = req->dial.fd;
    req->dial.fd = -1;
    rd_conn_attach_fd(c, fd);
  } else {
    rd_conn_refuse(c, verdict != RD_VERDICT_DIAL_ERROR ? "agent closed"
                      : value != NULL && value[0] != '\0' ? value
                                                          : "dial failed");
  }
}

/* Asks Python about connection c (an allow decision or a dial) with its
 * proto and address; the answer comes to on_answer. The request is c's
 * owner slot until then. */
static void ask_python(rd_client *cli, rd_conn *c, rd_request_kind kind, const char *address,
                       void (*on_answer)(rd_request *, rd_verdict, const char *)) {
  rd_request *r = rd_request_new(kind);
  char **proto_slot = NULL, **address_slot = NULL;
  if (r != NULL) {
    proto_slot = kind == RD_REQ_DIAL ? &r->dial.proto : &r->connect.proto;
    address_slot = kind == RD_REQ_DIAL ? &r->dial.address : &r->connect.address;
  }
  if (r == NULL ||
      (*proto_slot = rd_strndup(rd_conn_proto(c), strlen(rd_conn_proto(c)))) == NULL ||
      (*address_slot = rd_strndup(address, strlen(address))) == NULL) {
    if (r != NULL)
      rd_request_free(r);
    rd_conn_refuse(c, "out of memory");
    return;
  }
  r->owner = cli->obj.handle;
  r->on_answer = on_answer;
  r->target = c;
  *rd_conn_owner_slot(c) = r;
  rd_request_post(r);
}

/* Hands an allowed target to Python's dialer: the connection waits for its
 * socket, up to the dial timeout. */
static void dial_by_python(rd_client *cli, rd_conn *c) {
  char clean[300];
  const char *address = decision_address(c, clean, sizeof clean);
  if (address == NULL) {
    rd_conn_refuse(c, "connect not allowed");
    return;
  }
  if (rd_conn_set_dial_deadline(c, cli->cfg.session.dial_timeout_ms) != RD_OK)
    rd_conn_refuse(c, "out of memory");
  else
    ask_python(cli, c, RD_REQ_DIAL, address, dial_answer_cb);
}

/* An allowed target: dialed here, or by Python's dialer. */
static void dial_allowed(rd_client *cli, rd_conn *c) {
  if (cli->cfg.dialer)
    dial_by_python(cli, c);
  else
    rd_conn_dial_local(c);
}

static void connect_answer_cb(rd_request *req, rd_verdict verdict, const char *value) {
  (void)value;
  rd_conn *c = req->target;
  *rd_conn_owner_slot(c) = NULL;
  rd_client *cli = (rd_client *)rd_object_find(req->owner, RD_OBJ_CLIENT);
  if (verdict == RD_VERDICT_ALLOW && cli != NULL)
    dial_allowed(cli, c);
  else
    rd_conn_refuse(c, "connect not allowed");
}

static void session_on_connect(rd_session *s, void *owner, rd_conn *c) {
  rd_client *cli = owner;
  if (cli->cfg.hooks != NULL) {
    cli->cfg.hooks->on_connect(cli->cfg.hooks_ctx, s, c);
  } else if (cli->cfg.allow_mode == RD_ALLOW_ALL) {
    dial_allowed(cli, c);
  } else if (cli->cfg.allow_mode == RD_ALLOW_PATTERNS) {
    if (allowed_by_pattern(cli, c))
      dial_allowed(cli, c);
    else
      rd_conn_refuse(c, "connect not allowed");
  } else {
    char clean[300];
    const char *address = decision_address(c, clean, sizeof clean);
    if (address == NULL) {
      rd_conn_refuse(c, "connect not allowed");
      return;
    }
    ask_python(cli, c, RD_REQ_CONNECT, address, connect_answer_cb);
  }
}

static void session_on_disconnect_client(rd_session *s, void *owner, const char *client_key) {
  (void)s;
  rd_client *cli = owner;
  if (cli->cfg.hooks != NULL && cli->cfg.hooks->on_disconnect_client != NULL)
    cli->cfg.hooks->on_disconnect_client(cli->cfg.hooks_ctx, client_key);
}

/* An agent's refusals and failed local dials, as news for Python. */
static void session_on_conn_failed(rd_session *s, void *owner, rd_conn *c, const char *err,
                                   int far) {
  (void)s;
  rd_client *cli = owner;
  if (!far && cli->cfg.conn_events && cli->cfg.hooks == NULL)
    rd_event_post_dial(cli->obj.handle, NULL, rd_client_url(cli), rd_conn_proto(c),
                       rd_conn_address(c), err);
}

static const rd_session_owner client_session_ops = {.on_end = session_on_end,
                                                    .on_freed = session_on_freed,
                                                    .on_connect = session_on_connect,
                                                    .on_disconnect_client =
                                                        session_on_disconnect_client,
                                                    .on_conn_failed = session_on_conn_failed};

static void stream_free_cb(uv_handle_t *h) { rd_free(h); }

static void handshake_io_closed_cb(rd_io *io) { client_unref(rd_io_data(io)); }

static void handshake_fail(rd_client *cli, const char *why) {
  uv_timer_stop(&cli->timer);
  if (cli->io != NULL) {
    rd_io *io = cli->io;
    cli->io = NULL;
    rd_io_close(io, handshake_io_closed_cb);
  }
  schedule_retry(cli, why, 1);
}

static void handshake_done(rd_client *cli, size_t head_len) {
  uv_timer_stop(&cli->timer);
  rd_io *io = cli->io;
  cli->io = NULL;
  rd_io_read_stop(io);
  /* The handshake's reference on cli passes to the session. */
  cli->state = CLI_CONNECTED;
  cli->attempt = 0;
  cli->last_error[0] = '\0';
  rd_session *s = rd_session_new(io, RD_ROLE_CLIENT, "client", NULL,
                                 cli->cfg.hooks != NULL ? RD_SESSION_LINK : RD_SESSION_AGENT,
                                 cli->metrics, &cli->cfg.session, &client_session_ops, cli,
                                 (const uint8_t *)cli->resp + head_len, cli->resp_len - head_len);
  if (s == NULL) {
    client_unref(cli);
    schedule_retry(cli, "out of memory", 1);
    return;
  }
  /* Ended while reading the bytes that came with the upgrade: its on_end has
   * run (and scheduled the retry); keeping it would leave a dangling pointer. */
  if (rd_session_is_ended(s))
    return;
  cli->session = s;
  client_tell(cli, RD_CLIENT_CONNECTED, NULL);
  if (cli->state == CLI_CONNECTED)
    waiters_finish(cli, 1);
}

/* Ends a refused upgrade with the server's own reason: the first line of
 * the response body (Go's client logs the body too), e.g. "websocket: bad
 * handshake (HTTP 401: failed authentication)". */
static void refused_finish(rd_client *cli) {
  char reason[128];
  size_t n = 0;
  size_t have = cli->resp_len > cli->refused_head ? cli->resp_len - cli->refused_head : 0;
  const char *body = cli->resp + cli->refused_head;
  for (size_t i = 0; i < have && n < sizeof reason - 1; i++) {
    unsigned char ch = (unsigned char)body[i];
    if (ch == '\r' || ch == '\n')
      break;
    reason[n++] = ch < 0x20 || ch == 0x7f ? '?' : (char)ch;
  }
  reason[n] = '\0';
  char why[200];
  if (n > 0)
    snprintf(why, sizeof why, "websocket: bad handshake (HTTP %d: %s)", cli->refused_status,
             reason);
  else
    snprintf(why, sizeof why, "websocket: bad handshake (HTTP %d)", cli->refused_status);
  cli->refused_status = 0;
  handshake_fail(cli, why);
}

static void handshake_check(rd_client *cli) {
  if (cli->refused_status != 0) {
    if (cli->refused_body != SIZE_MAX && cli->resp_len >= cli->refused_head + cli->refused_body)
      refused_finish(cli);
    else if (cli->resp_len == sizeof cli->resp)
      refused_finish(cli);
    return;
  }
  rd_http_response resp;
  int n = rd_http_parse_response(cli->resp, cli->resp_len, sizeof cli->resp, RD_HTTP_MAX_HEADERS,
                                 &resp);
  if (n == RD_EPARTIAL)
    return;
  if (n < 0) {
    handshake_fail(cli, "websocket: bad handshake (malformed response)");
    return;
  }
  if (resp.status != 101) {
    /* Read the body (bounded by our buffer) for the server's reason. */
    const rd_http_header *cl = rd_http_find_header(resp.headers, resp.num_headers,
                                                   "Content-Length");
    cli->refused_status = resp.status;
    cli->refused_head = (size_t)n;
    cli->refused_body = SIZE_MAX;
    if (cl != NULL) {
      char num[24];
      size_t len = cl->value_len < sizeof num - 1 ? cl->value_len : sizeof num - 1;
      memcpy(num, cl->value, len);
      num[len] = '\0';
      cli->refused_body = (size_t)strtoull(num, NULL, 10);
    }
    handshake_check(cli);
    return;
  }
  char expect[29];
  const rd_http_header *h = rd_http_find_header(resp.headers, resp.num_headers, "Sec-WebSocket-Accept");
  if (rd_ws_accept_key(cli->key, strlen(cli->key), expect) != RD_OK || h == NULL ||
      h->value_len != 28 || memcmp(h->value, expect, 28) != 0) {
    handshake_fail(cli, "websocket: bad handshake (Sec-WebSocket-Accept mismatch)");
    return;
  }
  handshake_done(cli, (size_t)n);
}

static void hs_alloc_cb(rd_io *io, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  rd_client *cli = rd_io_data(io);
  *buf = uv_buf_init(cli->resp + cli->resp_len, (unsigned)(sizeof cli->resp - cli->resp_len));
}

static void hs_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  rd_client *cli = rd_io_data(io);
  if (nread == 0 || cli->io != io)
    return;
  if (nread < 0 && cli->refused_status != 0) {
    refused_finish(cli); /* the body ran to the end of the stream */
    return;
  }
  if (nread < 0) {
    handshake_fail(cli, nread == UV_EOF    ? "websocket: bad handshake (connection closed)"
                        : nread == RD_ETLS ? rd_io_error(io)
                                           : rd_strerror((int)nread));
    return;
  }
  cli->resp_len += (size_t)nread;
  handshake_check(cli);
}

static void hs_timeout_cb(uv_timer_t *t) {
  rd_client *cli = t->data;
  if (cli->state != CLI_HANDSHAKE)
    return;
  if (cli->proxy_stage) {
    char why[RD_ADDR_JOINED_MAX + 96];
    snprintf(why, sizeof why, "proxyconnect tcp: proxy %s did not answer CONNECT in time",
             cli->targets[cli->current].proxy_addr);
    handshake_fail(cli, why);
    return;
  }
  handshake_fail(cli, cli->io != NULL && rd_io_is_tls(cli->io) && rd_io_error(cli->io)[0] == '\0'
                          ? "websocket: handshake timeout (TLS or HTTP)"
                          : "websocket: handshake timeout");
}

typedef struct {
  uv_write_t req;
  char data[];
} hs_write;

static void hs_write_cb(uv_write_t *req, int status) {
  (void)status; /* a failed write shows up as a read error */
  rd_free(req);
}

/* Sends the upgrade request and reads the answer (after TLS, if any). */
static void send_upgrade(rd_client *cli) {
  rd_io *io = cli->io;
  cli->refused_status = 0;
  const char *request = cli->targets[cli->current].request;
  size_t rlen = strlen(request);
  hs_write *w = rd_malloc(sizeof *w + rlen + 64);
  if (w == NULL || rd_ws_make_key(cli->key) != RD_OK) {
    rd_free(w);
    handshake_fail(cli, "out of memory");
    return;
  }
  int n = snprintf(w->data, rlen + 64, "%sSec-WebSocket-Key: %s\r\n\r\n", request, cli->key);
  uv_buf_t buf = uv_buf_init(w->data, (unsigned)n);
  if (rd_io_write(io, &w->req, &buf, 1, hs_write_cb) != 0) {
    rd_free(w);
    handshake_fail(cli, "websocket: handshake write failed");
    return;
  }
  rd_io_read_start(io, hs_alloc_cb, hs_read_cb);
  if (cli->resp_len > 0)
    handshake_check(cli); /* bytes that came with the proxy's answer */
}

static void tls_done_cb(rd_io *io, int status, const char *error) {
  rd_client *cli = rd_io_data(io);
  if (cli->io != io)
    return;
  if (status < 0) {
    handshake_fail(cli, error != NULL && error[0] != '\0' ? error : rd_strerror(status));
  } else {
    cli->resp_len = 0;
    send_upgrade(cli);
  }
}

/* The connection reaches the server (directly, or through the proxy's
 * tunnel with extra[0..len) already read from it): TLS if wss, then the
 * upgrade. */
static void tunnel_ready(rd_client *cli, const char *extra, size_t len) {
  const client_target *t = &cli->targets[cli->current];
  if (!t->tls) {
    if (len > 0)
      memmove(cli->resp, extra, len);
    cli->resp_len = len;
    send_upgrade(cli);
    return;
  }
  char err[160];
  rd_tls *tls = rd_tls_new(cli->cfg.tls, t->server_name, err, sizeof err);
  if (tls == NULL) {
    handshake_fail(cli, err);
    return;
  }
  if (rd_io_start_tls(cli->io, tls) != 0 ||
      (len > 0 && rd_tls_feed(tls, (const uint8_t *)extra, len) != 0) ||
      rd_io_handshake(cli->io, tls_done_cb) != 0)
    handshake_fail(cli, "tls: handshake could not start");
}

/* ---- through an HTTP proxy ---- */

static void proxy_read_cb(rd_io *io, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  rd_client *cli = rd_io_data(io);
  if (nread == 0 || cli->io != io)
    return;
  const client_target *t = &cli->targets[cli->current];
  char why[2 * RD_ADDR_JOINED_MAX + 160];
  if (nread < 0 && nread != UV_ENOBUFS) {
    snprintf(why, sizeof why, "proxyconnect tcp: proxy %s: %s before answering CONNECT",
             t->proxy_addr, nread == UV_EOF ? "connection closed" : rd_strerror((int)nread));
    handshake_fail(cli, why);
    return;
  }
  if (nread > 0)
    cli->resp_len += (size_t)nread;
  int status = 0;
  char line[96];
  int n = rd_proxy_connect_response(cli->resp, cli->resp_len, sizeof cli->resp, &status, line,
                                    sizeof line);
  if (n == RD_EPARTIAL && cli->resp_len < sizeof cli->resp)
    return;
  if (n == RD_EPARTIAL)
    n = RD_ETOOLARGE; /* a full buffer and still no end of the head */
  if (n < 0 || status != 200) {
    if (n < 0)
      snprintf(why, sizeof why, "proxyconnect tcp: proxy %s: %s answer to CONNECT",
               t->proxy_addr, n == RD_ETOOLARGE ? "oversized" : "malformed");
    else
      snprintf(why, sizeof why, "proxyconnect tcp: proxy %s refused CONNECT %s: %s",
               t->proxy_addr, t->host, line);
    handshake_fail(cli, why);
    return;
  }
  cli->proxy_stage = 0;
  rd_io_read_stop(io);
  tunnel_ready(cli, cli->resp + n, cli->resp_len - (size_t)n);
}

/* Asks the proxy for a tunnel to the server; its answer is read into resp. */
static void proxy_connect(rd_client *cli) {
  const char *request = cli->targets[cli->current].proxy_request;
  size_t len = strlen(request);
  hs_write *w = rd_malloc(sizeof *w + len);
  if (w == NULL) {
    handshake_fail(cli, "out of memory");
    return;
  }
  memcpy(w->data, request, len);
  uv_buf_t buf = uv_buf_init(w->data, (unsigned)len);
  if (rd_io_write(cli->io, &w->req, &buf, 1, hs_write_cb) != 0) {
    rd_free(w);
    handshake_fail(cli, "proxyconnect tcp: write failed");
    return;
  }
  cli->resp_len = 0;
  cli->proxy_stage = 1;
  rd_io_read_start(cli->io, hs_alloc_cb, proxy_read_cb);
}

static void dial_cb(void *ctx, int status, uv_stream_t *stream, int fd, const char *error) {
  (void)fd; /* a tcp dial */
  rd_client *cli = ctx;
  cli->dial = NULL;
  if (cli->state == CLI_CLOSED) {
    if (stream != NULL)
      uv_close((uv_handle_t *)stream, stream_free_cb);
    client_unref(cli);
    return;
  }
  const client_target *t = &cli->targets[cli->current];
  if (status < 0) {
    client_unref(cli);
    if (t->proxy_addr != NULL) {
      /* Go's net/http words a failed dial to the proxy so. */
      char why[256];
      snprintf(why, sizeof why, "proxyconnect tcp: %s", error);
      schedule_retry(cli, why, 1);
    } else {
      schedule_retry(cli, error, 1);
    }
    return;
  }
  /* The dial's reference becomes the handshake's. The stream starts plain:
   * TLS, if any, begins once the proxy (if any) has opened its tunnel. */
  cli->state = CLI_HANDSHAKE;
  cli->proxy_stage = 0;
  cli->io = rd_io_new(stream, NULL);
  if (cli->io == NULL) {
    client_unref(cli);
    schedule_retry(cli, "out of memory", 1);
    return;
  }
  rd_io_set_data(cli->io, cli);
  /* One timer bounds the proxy's CONNECT, the TLS handshake and the HTTP
   * upgrade together. */
  uv_timer_start(&cli->timer, hs_timeout_cb, cli->cfg.handshake_timeout_ms, 0);
  if (t->proxy_request != NULL)
    proxy_connect(cli);
  else
    tunnel_ready(cli, NULL, 0);
}

static void start_attempt(rd_client *cli) {
  if (cli->state == CLI_CLOSED)
    return;
  cli->state = CLI_DIALING;
  client_tell(cli, RD_CLIENT_DIALING, NULL);
  if (cli->state == CLI_CLOSED)
    return; /* the hook closed it */
  int status = 0;
  char err[160];
  cli->refs++;
  const client_target *t = &cli->targets[cli->current];
  cli->dial = rd_dial_start(rd_loop(), "tcp", t->proxy_addr != NULL ? t->proxy_addr : t->host,
                            cli->cfg.handshake_timeout_ms, dial_cb, cli, &status, err, sizeof err);
  if (cli->dial == NULL) {
    client_unref(cli);
    schedule_retry(cli, err, 1);
  }
}

/* ---- lifecycle ---- */

static void timer_closed_cb(uv_handle_t *h) { client_unref(h->data); }

static void client_close(rd_object *obj, rd_cmd *waiter) {
  rd_client *cli = (rd_client *)obj;
  if (cli->state == CLI_CLOSED) {
    if (waiter != NULL)
      rd_cmd_finish(waiter, RD_OK, NULL);
    return;
  }
  cli->state = CLI_CLOSED;
  cli->close_waiter = waiter;
  if (cli->cfg.hooks == NULL)
    rd_object_unregister(&cli->obj);
  waiters_finish(cli, 0);
  if (cli->dial != NULL)
    rd_dial_cancel(cli->dial);
  if (cli->io != NULL) {
    rd_io *io = cli->io;
    cli->io = NULL;
    rd_io_close(io, handshake_io_closed_cb);
  }
  if (cli->session != NULL)
    rd_session_end(cli->session, RD_WS_CLOSE_NORMAL, "client closing");
  uv_close((uv_handle_t *)&cli->timer, timer_closed_cb);
}

void rd_client_close(rd_client *cli) { client_close(&cli->obj, NULL); }

/* Makes a target of ws[s]://host[:port][/path]: "host:port" to dial (the
 * default port filled in), the name TLS verifies (server_name, else the
 * bare host) and the request head with its Host header and path. */
static int target_init(client_target *t, const char *url, const char *headers,
                       const char *server_name, const char *proxy, char *err, size_t errlen) {
  rd_addr_url u;
  int rc = rd_addr_parse_url(url, strlen(url), &u);
  if (rc == RD_ADDR_EBAD_SCHEME) {
    snprintf(err, errlen, "unsupported URL scheme (want ws:// or wss://): %s", url);
    return RD_EMALFORMED;
  }
  if (rc < 0) {
    snprintf(err, errlen, "missing or bad host in URL (%s): %s", rd_addr_strerror(rc), url);
    return RD_EMALFORMED;
  }
  t->tls = u.tls;
  char hp[RD_ADDR_JOINED_MAX];
  rd_addr_join(hp, sizeof hp, u.addr.host, u.addr.host_len, u.addr.port);
  t->url = rd_strndup(url, strlen(url));
  t->host = rd_strndup(hp, strlen(hp));
  t->server_name = server_name[0] != '\0' ? rd_strndup(server_name, strlen(server_name))
                                          : rd_strndup(u.addr.host, u.addr.host_len);
  size_t path_len = u.path_len > 0 ? u.path_len : 1;
  size_t cap = path_len + u.authority_len + strlen(headers) + 160;
  t->request = rd_malloc(cap);
  if (t->url == NULL || t->host == NULL || t->server_name == NULL || t->request == NULL) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  snprintf(t->request, cap,
           "GET %.*s HTTP/1.1\r\nHost: %.*s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Version: 13\r\n%s",
           (int)path_len, u.path_len > 0 ? u.path : "/", (int)u.authority_len, u.authority,
           headers);
  if (proxy == NULL || proxy[0] == '\0')
    return RD_OK;
  /* The URL may hold a password: errors name the server URL instead. */
  rd_proxy_url pu;
  rc = rd_proxy_parse_url(proxy, strlen(proxy), &pu);
  if (rc < 0) {
    snprintf(err, errlen, "invalid proxy URL for %s (want http://[user:pass@]host[:port]): %s",
             url, rc == RD_EMALFORMED ? "bad credentials or path" : rd_addr_strerror(rc));
    return RD_EMALFORMED;
  }
  char paddr[RD_ADDR_JOINED_MAX], req[RD_PROXY_REQUEST_MAX];
  rd_addr_join(paddr, sizeof paddr, pu.addr.host, pu.addr.host_len, pu.addr.port);
  int n = rd_proxy_connect_request(req, sizeof req, t->host, &pu);
  t->proxy_addr = rd_strndup(paddr, strlen(paddr));
  t->proxy_request = n > 0 ? rd_strndup(req, (size_t)n) : NULL;
  if (t->proxy_addr == NULL || t->proxy_request == NULL) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  return RD_OK;
}

int rd_client_start(const char *const *urls, size_t nurls, const char *headers,
                    const rd_client_config *cfg, rd_client **out, char *err, size_t errlen) {
  if (nurls == 0) {
    snprintf(err, errlen, "no server URL");
    return RD_EMALFORMED;
  }
  client_target *targets = rd_calloc(nurls, sizeof *targets);
  if (targets == NULL) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  int tls = 0;
  for (size_t i = 0; i < nurls; i++) {
    int rc = target_init(&targets[i], urls[i], headers, cfg->server_name,
                         cfg->proxies != NULL ? cfg->proxies[i] : NULL, err, errlen);
    if (rc != RD_OK) {
      targets_free(targets, nurls);
      return rc;
    }
    tls |= targets[i].tls;
  }
  if (tls && cfg->tls == NULL) {
    snprintf(err, errlen, "wss:// needs a TLS configuration");
    targets_free(targets, nurls);
    return RD_EMALFORMED;
  }
  rd_client *cli = rd_calloc(1, sizeof *cli);
  if (cli != NULL)
    cli->cfg = *cfg;
  if (cli == NULL ||
      (cli->metrics = cfg->hooks != NULL ? cfg->metrics : rd_metrics_new()) == NULL ||
      (cli->cfg.patterns = rd_calloc(cfg->npatterns + 1, sizeof(char *))) == NULL) {
    if (cli != NULL && cfg->hooks == NULL)
      rd_metrics_free(cli->metrics);
    rd_free(cli);
    targets_free(targets, nurls);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  cli->refs = 1; /* the timer */
  cli->cfg.proxies = NULL; /* read above; the caller's strings are not kept */
  cli->targets = targets;
  cli->ntargets = nurls;
  if (!tls)
    cli->cfg.tls = NULL; /* ws:// URLs never use TLS, whatever was configured */
  if (cli->cfg.tls != NULL)
    rd_tls_ctx_ref(cli->cfg.tls);
  uv_timer_init(rd_loop(), &cli->timer);
  cli->timer.data = cli;
  int rc = RD_OK;
  for (size_t i = 0; i < cfg->npatterns && rc == RD_OK; i++) {
    cli->cfg.patterns[i] = rd_strndup(cfg->patterns[i], strlen(cfg->patterns[i]));
    if (cli->cfg.patterns[i] == NULL) {
      cli->cfg.npatterns = i;
      rc = RD_ENOMEM;
    }
  }
  if (rc == RD_OK && cfg->hooks == NULL)
    rc = rd_object_register(&cli->obj, RD_OBJ_CLIENT);
  if (rc != RD_OK) {
    cli->state = CLI_CLOSED;
    uv_close((uv_handle_t *)&cli->timer, timer_closed_cb);
    snprintf(err, errlen, "out of memory");
    return rc;
  }
  cli->obj.close = client_close;
  *out = cli;
  start_attempt(cli);
  return RD_OK;
}
