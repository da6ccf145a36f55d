/* The server's sessions: the client table (client key -> its live sessions,
 * oldest first), the session owner callbacks, the WebSocket upgrade of the
 * connect path and its authentication (a header, a token table, or a request
 * to the Python authorizer). Each session holds a reference on the server
 * from the upgrade until its on_freed; the session frees itself
 * (rd_session.h). A client entry is created by the first session of its key
 * and freed in client_remove (or client_add's failure) when its last session
 * leaves. An authorizer request in flight is owned by the loop's request queue;
 * its target (the HTTP connection) is cleared when the connection closes
 * first. */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_http.h"
#include "rd_io.h"
#include "rd_msg.h"
#include "rd_server_int.h"
#include "rd_ws.h"

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
    size_t len = strlen(key);
    e = rd_calloc(1, sizeof *e + len + 1);
    if (e == NULL)
      return RD_ENOMEM;
    memcpy(e->key, key, len + 1);
    e->sessions = &e->first;
    e->cap = 1;
    if (rd_map_insert(&srv->clients, &e->node, rd_hash_str(key, len)) != RD_OK) {
      rd_free(e);
      return RD_ENOMEM;
    }
  }
  if (e->count == e->cap) { /* a second session: the array leaves the entry */
    size_t cap = e->cap * 2;
    rd_session **a = e->sessions == &e->first ? rd_malloc(cap * sizeof *a)
                                              : rd_realloc(e->sessions, cap * sizeof *a);
    if (a == NULL)
      return RD_ENOMEM; /* e->count > 0: the entry stays for the others */
    if (e->sessions == &e->first)
      a[0] = e->first;
    e->sessions = a;
    e->cap = cap;
  }
  e->sessions[e->count++] = s;
  srv->sessions++;
  rd_srv_peers_announce(srv, key, rd_session_key(s), 1);
  return RD_OK;
}

/* Takes s out of its key's entry; 0 when it was never in one. */
static int client_remove(rd_server *srv, rd_session *s) {
  client_entry *e = client_find(srv, rd_session_client_key(s));
  if (e == NULL)
    return 0;
  int found = 0;
  for (size_t i = 0; i < e->count; i++) {
    if (e->sessions[i] == s) {
      rd_session_stats st;
      rd_session_get_stats(s, &st);
      e->past_added += st.conns_added;
      e->past_removed += st.conns_removed;
      memmove(&e->sessions[i], &e->sessions[i + 1], (e->count - i - 1) * sizeof *e->sessions);
      e->count--;
      srv->sessions--;
      rd_srv_peers_announce(srv, e->key, rd_session_key(s), 0);
      found = 1;
      break;
    }
  }
  if (e->count == 0) {
    rd_map_remove(&srv->clients, &e->node);
    if (e->sessions != &e->first)
      rd_free(e->sessions);
    rd_free(e);
  }
  return found;
}

rd_session *rd_srv_session_for(rd_server *srv, const char *key) {
  client_entry *e = client_find(srv, key);
  return e != NULL && e->count > 0 ? e->sessions[0] : NULL;
}

rd_session *rd_srv_route(rd_server *srv, const char *key) {
  rd_session *s = rd_srv_session_for(srv, key);
  return s != NULL ? s : rd_srv_peer_route(srv, key);
}

const char *rd_srv_wire_proto(rd_session *s, const char *key, const char *proto, char *out,
                              size_t outlen) {
  if (rd_session_kind(s) != RD_SESSION_PEER)
    return proto;
  int n = snprintf(out, outlen, "%s::%s", key, proto);
  return n > 0 && (size_t)n < outlen ? out : NULL;
}

size_t rd_srv_end_client_sessions(rd_server *srv, const char *key, const char *reason) {
  size_t ended = 0;
  /* Each end removes the session from its entry (the last frees it). */
  for (rd_session *s; (s = rd_srv_session_for(srv, key)) != NULL; ended++)
    rd_session_end(s, RD_WS_CLOSE_GOING_AWAY, reason);
  return ended;
}

void rd_srv_session_news(rd_server *srv, rd_session *s, const char *what, const char *reason) {
  if (srv->cfg.events)
    rd_event_post(srv->obj.handle, what, rd_session_client_key(s), rd_session_remote(s), NULL,
                  reason, rd_session_kind(s) == RD_SESSION_PEER, 0, 0);
}

void rd_srv_conn_news(rd_server *srv, rd_session *s, rd_conn *c, const char *err, int far) {
  if (!far || !srv->cfg.conn_events)
    return;
  const char *key = rd_session_client_key(s), *proto = rd_conn_proto(c);
  char buf[RD_MSG_CONNECT_LIMIT + 1];
  const char *sep = rd_session_kind(s) != RD_SESSION_AGENT ? strstr(proto, "::") : NULL;
  if (sep != NULL && (size_t)(sep - proto) < sizeof buf) { /* a peer's "key::proto" */
    memcpy(buf, proto, (size_t)(sep - proto));
    buf[sep - proto] = '\0';
    key = buf;
    proto = sep + 2;
  }
  rd_event_post_dial(srv->obj.handle, key, NULL, proto, rd_conn_address(c), err);
}

static void session_on_conn_failed(rd_session *s, void *owner, rd_conn *c, const char *err,
                                   int far) {
  rd_srv_conn_news(owner, s, c, err, far);
}

static void session_on_end(rd_session *s, void *owner, const char *reason) {
  int registered = client_remove(owner, s);
  rd_srv_room_waits_wake(owner, s, 1);
  if (registered) /* its "connect" was told */
    rd_srv_session_news(owner, s, "disconnect", reason);
}

static void session_on_freed(void *owner) { rd_srv_unref(owner); }

static void session_on_room(rd_session *s, void *owner) { rd_srv_room_waits_wake(owner, s, 0); }

/* Agents' CONNECTs are refused (on_connect unset): a server dials, it is not
 * dialed. */
static const rd_session_owner server_session_ops = {.on_end = session_on_end,
                                                    .on_freed = session_on_freed,
                                                    .on_room = session_on_room,
                                                    .on_conn_failed = session_on_conn_failed};

/* ---- the upgrade and its authentication ---- */

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

/* Answers an upgrade with an error, and tells Python (news "refused", with
 * the far address and the status): the operator's view of who was turned
 * away and why. */
static void refuse(httpconn *hc, int code, const char *phrase, const char *text) {
  rd_server *srv = hc->srv;
  if (srv->cfg.events) {
    char remote[80], reason[400];
    format_remote((uv_tcp_t *)rd_io_stream(hc->io), remote, sizeof remote);
    snprintf(reason, sizeof reason, "HTTP %d: %s", code, text);
    rd_event_post(srv->obj.handle, "refused", NULL, remote, NULL, reason, 0, 0, 0);
  }
  rd_srv_respond_text(hc, code, phrase, text);
}

/* Answers the upgrade and serves the stream as client_key's session, or as
 * the session peer client_key opened to us (peer 1). */
static void upgrade_accept(httpconn *hc, const char *client_key, int peer) {
  rd_server *srv = hc->srv;
  if (srv->sessions >= srv->cfg.max_sessions) {
    refuse(hc, 503, "Service Unavailable", "too many sessions");
    return;
  }
  client_entry *e = peer ? NULL : client_find(srv, client_key);
  if (e != NULL && e->count >= srv->cfg.max_sessions_per_key) {
    char msg[320];
    snprintf(msg, sizeof msg, "too many sessions for client %s", client_key);
    refuse(hc, 429, "Too Many Requests", msg);
    return;
  }
  rd_http_request req;
  rd_http_parse_request(hc->buf, hc->head_len, srv->cfg.max_head, srv->cfg.max_headers, &req);
  const rd_http_header *key = rd_http_find_header(req.headers, req.num_headers, "Sec-WebSocket-Key");
  char accept[29];
  if (rd_ws_accept_key(key->value, key->value_len, accept) != RD_OK) {
    refuse(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  char resp[160];
  int n = snprintf(resp, sizeof resp,
                   "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                   accept);
  if (rd_srv_write_owned(hc->io, resp, (size_t)n) != 0) {
    rd_srv_httpconn_close(hc);
    return;
  }
  size_t leftover = hc->len - hc->head_len;
  const uint8_t *rest = (const uint8_t *)hc->buf + hc->head_len;
  char remote[80];
  format_remote((uv_tcp_t *)rd_io_stream(hc->io), remote, sizeof remote);
  rd_io *io = rd_srv_httpconn_take_stream(hc); /* hc is closing; buf lives until its close cb */
  if (peer) {
    rd_srv_peer_accept(srv, io, client_key, remote, rest, leftover);
    return;
  }
  srv->refs++;
  rd_session *s = rd_session_new(io, RD_ROLE_SERVER, client_key, remote, RD_SESSION_AGENT,
                                 srv->metrics, &srv->cfg.session, &server_session_ops, srv, rest,
                                 leftover);
  if (s == NULL) {
    rd_srv_unref(srv);
    return;
  }
  if (rd_session_is_ended(s))
    return; /* ended while reading the leftover bytes: never registered */
  if (client_add(srv, client_key, s) != RD_OK) {
    rd_session_end(s, RD_WS_CLOSE_GOING_AWAY, "out of memory");
    return;
  }
  rd_srv_session_news(srv, s, "connect", NULL);
}

static void auth_answer_cb(rd_request *req, rd_verdict verdict, const char *value) {
  httpconn *hc = req->target;
  hc->auth = NULL;
  if (verdict == RD_VERDICT_ACCEPT && value != NULL && value[0] != '\0')
    upgrade_accept(hc, value, 0);
  else if (verdict == RD_VERDICT_ERROR)
    refuse(hc, 400, "Bad Request", value != NULL ? value : "authorizer failed");
  else if (verdict == RD_VERDICT_CLOSED)
    refuse(hc, 503, "Service Unavailable", "server closing");
  else
    refuse(hc, 401, "Unauthorized", "failed authentication");
}


void rd_srv_handle_upgrade(httpconn *hc, rd_http_request *req) {
  rd_server *srv = hc->srv;
  const rd_http_header *h;
  if (!(req->method_len == 3 && memcmp(req->method, "GET", 3) == 0)) {
    refuse(hc, 405, "Method Not Allowed", "websocket: the client is not using the websocket protocol: request method is not GET");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Connection");
  if (h == NULL || !rd_http_has_token(h->value, h->value_len, "upgrade")) {
    refuse(hc, 400, "Bad Request", "websocket: the client is not using the websocket protocol: 'upgrade' token not found in 'Connection' header");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Upgrade");
  if (h == NULL || !rd_http_has_token(h->value, h->value_len, "websocket")) {
    refuse(hc, 400, "Bad Request", "websocket: the client is not using the websocket protocol: 'websocket' token not found in 'Upgrade' header");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Sec-WebSocket-Version");
  if (h == NULL || h->value_len != 2 || memcmp(h->value, "13", 2) != 0) {
    refuse(hc, 400, "Bad Request", "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header");
    return;
  }
  h = rd_http_find_header(req->headers, req->num_headers, "Sec-WebSocket-Key");
  if (h == NULL || h->value_len == 0) {
    refuse(hc, 400, "Bad Request", "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header is missing or blank");
    return;
  }
  /* Peers first, as Go checks them: a wrong pair falls through. */
  const char *peer = rd_srv_peer_auth(srv, req);
  if (peer != NULL) {
    upgrade_accept(hc, peer, 1);
    return;
  }
  if (srv->cfg.auth_mode == RD_AUTH_TOKEN) {
    h = rd_http_find_header(req->headers, req->num_headers, "Authorization");
    const char *key = NULL;
    if (h != NULL && h->value_len > 7 && rd_http_ieq("Bearer ", h->value, 7))
      key = rd_tokens_lookup(srv->cfg.tokens, h->value + 7, h->value_len - 7);
    if (key == NULL)
      refuse(hc, 401, "Unauthorized", "failed authentication");
    else
      upgrade_accept(hc, key, 0);
    return;
  }
  if (srv->cfg.auth_mode == RD_AUTH_HEADER) {
    h = rd_http_find_header(req->headers, req->num_headers, srv->cfg.auth_header);
    if (h == NULL || h->value_len == 0) {
      refuse(hc, 401, "Unauthorized", "failed authentication");
      return;
    }
    char key[256];
    if (h->value_len >= sizeof key) {
      refuse(hc, 400, "Bad Request", "client key too long");
      return;
    }
    memcpy(key, h->value, h->value_len);
    key[h->value_len] = '\0';
    upgrade_accept(hc, key, 0);
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
    refuse(hc, 500, "Internal Server Error", "out of memory");
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
  rd_tls *tls = rd_io_tls(hc->io);
  if (tls != NULL && rd_tls_peer_cert(tls, &r->auth.cert_subject, &r->auth.cert_sans,
                                      &r->auth.cert_sha256) < 0) {
    rd_request_free(r);
    refuse(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  r->owner = srv->obj.handle;
  r->on_answer = auth_answer_cb;
  r->target = hc;
  hc->auth = r;
  rd_io_read_stop(hc->io);
  rd_request_post(r);
}
