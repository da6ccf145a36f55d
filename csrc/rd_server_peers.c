/* HA peering (PROTOCOL.md section 6). Two kinds of object:
 *
 *   rd_peer       a configured peer and our link to it: an rd_client with
 *                 peer headers whose session announces our client keys
 *                 (ADD_CLIENT / REMOVE_CLIENT) and takes the peer's dials
 *                 ("key::proto"), each spliced to a connection on the local
 *                 session of key. The server's peers list owns it until it
 *                 is removed; it is freed in link_freed, once its client is.
 *   peer_session  a session a peer opened to us, and the keys it announced.
 *                 The server's peer_sessions list owns it from the upgrade
 *                 to the session's end; it is freed in peer_session_freed.
 *
 * Each holds a reference on the server. A dial for a key with no local
 * session goes through the oldest peer session that announced it. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_msg.h"
#include "rd_server_int.h"
#include "rd_ws.h"

/* A configured peer and our link to it. */
struct rd_peer {
  rd_peer *next;
  rd_server *srv;
  char *id, *url, *token;
  rd_client *link;
  int state; /* RD_CLIENT_* */
  int removed; /* off the server's list: the link is closing */
  double since;
  uint64_t attempts;
  char last_error[160];
};

/* ---- the keys a peer session announced ---- */

/* One announced pair; a key with several sessions on the peer has several. */
typedef struct remote_key {
  rd_map_node node;
  int64_t session_key;
  char key[];
} remote_key;

struct peer_session {
  peer_session *prev, *next;
  rd_server *srv;
  rd_session *s;
  int told; /* its "connect" news went out: its "disconnect" follows */
  rd_map keys; /* remote_key nodes, by hash of the key */
};

static remote_key *key_find(peer_session *ps, const char *key, int any, int64_t session_key) {
  for (rd_map_node *n = rd_map_find(&ps->keys, rd_hash_str(key, strlen(key))); n != NULL;
       n = rd_map_next_same(n)) {
    remote_key *k = (remote_key *)n;
    if (strcmp(k->key, key) == 0 && (any || k->session_key == session_key))
      return k;
  }
  return NULL;
}

static void key_free_cb(rd_map_node *n, void *ctx) {
  rd_map_remove(ctx, n);
  rd_free(n);
}

static void keys_clear(peer_session *ps) {
  rd_map_foreach(&ps->keys, key_free_cb, &ps->keys);
  rd_map_dispose(&ps->keys);
}

/* Splits "clientKey/sessionKey" as Go's parseAddress does. The session key
 * is what strconv.Atoi takes: an optional sign, then decimal digits, in
 * range. strtoll alone would also take leading spaces (" 5") and saturate
 * an overflow, both of which end the session in Go. */
static int parse_client(const char *text, char *key, size_t keylen, int64_t *session_key) {
  const char *slash = strchr(text, '/');
  if (slash == NULL || (size_t)(slash - text) >= keylen)
    return RD_EMALFORMED;
  const char *digits = slash + 1 + (slash[1] == '+' || slash[1] == '-');
  if (*digits < '0' || *digits > '9')
    return RD_EMALFORMED;
  char *end;
  errno = 0;
  long long v = strtoll(slash + 1, &end, 10);
  if (*end != '\0' || errno == ERANGE)
    return RD_EMALFORMED;
  memcpy(key, text, (size_t)(slash - text));
  key[slash - text] = '\0';
  *session_key = v;
  return RD_OK;
}

static void peer_on_client_change(rd_session *s, void *owner, const char *text, int add) {
  peer_session *ps = owner;
  char key[RD_MSG_CLIENT_LIMIT + 1];
  int64_t sk;
  if (parse_client(text, key, sizeof key, &sk) != RD_OK) {
    char why[RD_MSG_CLIENT_LIMIT + 40];
    snprintf(why, sizeof why, "invalid remote Session %s", text);
    rd_session_end(s, RD_WS_CLOSE_PROTOCOL, why);
    return;
  }
  remote_key *k = key_find(ps, key, 0, sk);
  if (!add) {
    if (k != NULL) {
      rd_map_remove(&ps->keys, &k->node);
      rd_free(k);
    }
    return;
  }
  if (k != NULL)
    return;
  size_t len = strlen(key);
  k = rd_malloc(sizeof *k + len + 1);
  if (k == NULL || rd_map_insert(&ps->keys, &k->node, rd_hash_str(key, len)) != RD_OK) {
    rd_free(k);
    rd_session_end(s, RD_WS_CLOSE_GOING_AWAY, "out of memory");
    return;
  }
  k->session_key = sk;
  memcpy(k->key, key, len + 1);
}

static void peer_on_add_client(rd_session *s, void *owner, const char *text) {
  peer_on_client_change(s, owner, text, 1);
}

static void peer_on_remove_client(rd_session *s, void *owner, const char *text) {
  peer_on_client_change(s, owner, text, 0);
}

/* ---- sessions peers open to us ---- */

static void peer_on_disconnect_client(rd_session *s, void *owner, const char *key) {
  (void)s;
  rd_srv_end_client_sessions(((peer_session *)owner)->srv, key, "disconnected by peer");
}

static void peer_on_end(rd_session *s, void *owner, const char *reason) {
  peer_session *ps = owner;
  rd_server *srv = ps->srv;
  if (ps->prev != NULL)
    ps->prev->next = ps->next;
  else
    srv->peer_sessions = ps->next;
  if (ps->next != NULL)
    ps->next->prev = ps->prev;
  srv->sessions--;
  keys_clear(ps); /* the peer's routes go at once */
  rd_srv_room_waits_wake(srv, s, 1);
  if (ps->told)
    rd_srv_session_news(srv, s, "disconnect", reason);
}

static void peer_session_freed(void *owner) {
  peer_session *ps = owner;
  rd_server *srv = ps->srv;
  rd_free(ps);
  rd_srv_unref(srv);
}

static void peer_on_room(rd_session *s, void *owner) {
  rd_srv_room_waits_wake(((peer_session *)owner)->srv, s, 0);
}

static void peer_on_conn_failed(rd_session *s, void *owner, rd_conn *c, const char *err,
                                int far) {
  rd_srv_conn_news(((peer_session *)owner)->srv, s, c, err, far);
}

/* A peer's session never carries CONNECTs toward us (on_connect unset):
 * we dial through it, the peer does not dial us on it. */
static const rd_session_owner peer_session_ops = {.on_end = peer_on_end,
                                                  .on_freed = peer_session_freed,
                                                  .on_room = peer_on_room,
                                                  .on_add_client = peer_on_add_client,
                                                  .on_remove_client = peer_on_remove_client,
                                                  .on_disconnect_client =
                                                      peer_on_disconnect_client,
                                                  .on_conn_failed = peer_on_conn_failed};

static rd_peer *peer_find(rd_server *srv, const char *id) {
  for (rd_peer *p = srv->peers; p != NULL; p = p->next)
    if (strcmp(p->id, id) == 0)
      return p;
  return NULL;
}

const char *rd_srv_peer_auth(rd_server *srv, const rd_http_request *req) {
  if (srv->cfg.peer_id[0] == '\0' || srv->cfg.peer_token[0] == '\0')
    return NULL;
  const rd_http_header *id = rd_http_find_header(req->headers, req->num_headers, RD_PEER_ID_HEADER);
  const rd_http_header *token =
      rd_http_find_header(req->headers, req->num_headers, RD_PEER_TOKEN_HEADER);
  if (id == NULL || token == NULL || id->value_len == 0 || token->value_len == 0)
    return NULL;
  for (rd_peer *p = srv->peers; p != NULL; p = p->next)
    if (strlen(p->id) == id->value_len && memcmp(p->id, id->value, id->value_len) == 0)
      return strlen(p->token) == token->value_len &&
                     memcmp(p->token, token->value, token->value_len) == 0
                 ? p->id
                 : NULL;
  return NULL;
}

void rd_srv_peer_accept(rd_server *srv, rd_io *io, const char *id, const char *remote,
                        const uint8_t *rest, size_t rest_len) {
  peer_session *ps = rd_calloc(1, sizeof *ps);
  if (ps == NULL) {
    rd_io_close(io, NULL);
    return;
  }
  ps->srv = srv;
  rd_map_init(&ps->keys);
  srv->refs++;
  srv->sessions++;
  ps->next = srv->peer_sessions; /* linked before it reads: what it sent may announce keys */
  if (ps->next != NULL)
    ps->next->prev = ps;
  srv->peer_sessions = ps;
  ps->s = rd_session_new(io, RD_ROLE_SERVER, id, remote, RD_SESSION_PEER, srv->metrics,
                         &srv->cfg.session, &peer_session_ops, ps, rest, rest_len);
  if (ps->s == NULL) {
    peer_on_end(NULL, ps, "out of memory");
    peer_session_freed(ps);
    return;
  }
  if (rd_session_is_ended(ps->s))
    return; /* ended while reading what came with the upgrade */
  ps->told = 1;
  rd_srv_session_news(srv, ps->s, "connect", NULL);
  /* A peer keeps one link to us: a new session from it means the older ones
   * are dead (a peer that restarted, or a path that broke without a reset,
   * which the read deadline would notice only later). They go now, with
   * their routes, so no dial waits on a session nobody answers. Ids must be
   * unique in a group. */
  for (peer_session *old = ps->next, *next; old != NULL; old = next) {
    next = old->next; /* ending one unlinks it alone */
    if (strcmp(rd_session_client_key(old->s), id) == 0)
      rd_session_end(old->s, RD_WS_CLOSE_GOING_AWAY, "replaced by a newer session of the peer");
  }
}

/* ---- routing ---- */

rd_session *rd_srv_peer_route(rd_server *srv, const char *key) {
  rd_session *found = NULL;
  /* The list is newest first; the oldest session that has the key wins. */
  for (peer_session *ps = srv->peer_sessions; ps != NULL; ps = ps->next)
    if (!rd_session_is_ended(ps->s) && key_find(ps, key, 1, 0) != NULL)
      found = ps->s;
  return found;
}

/* ---- our links to peers ---- */

static void peer_free(rd_peer *p) {
  rd_free(p->id);
  rd_free(p->url);
  rd_free(p->token);
  rd_free(p);
}

/* Sends ADD_CLIENT or REMOVE_CLIENT "key/sessionKey" on one link session.
 * A pair longer than the reader's limit (100 bytes) would arrive cut, naming
 * another key: it is not announced. */
static void announce_one(rd_session *link, int type, const char *key, int64_t session_key) {
  char text[RD_MSG_CLIENT_LIMIT + 2];
  int n = snprintf(text, sizeof text, "%s/%lld", key, (long long)session_key);
  if (n > 0 && n <= RD_MSG_CLIENT_LIMIT && strchr(key, '/') == NULL)
    rd_session_send_text(link, type, text);
}

void rd_srv_peers_announce(rd_server *srv, const char *key, int64_t session_key, int add) {
  for (rd_peer *p = srv->peers; p != NULL; p = p->next) {
    rd_session *link = p->link != NULL ? rd_client_session(p->link) : NULL;
    if (link != NULL)
      announce_one(link, add ? RD_MSG_ADD_CLIENT : RD_MSG_REMOVE_CLIENT, key, session_key);
  }
}

static void announce_entry_cb(rd_map_node *n, void *ctx) {
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count; i++)
    announce_one(ctx, RD_MSG_ADD_CLIENT, e->key, rd_session_key(e->sessions[i]));
}

static double wall_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void link_state(void *ctx, rd_client *cli, int state, const char *why) {
  rd_peer *p = ctx;
  if (p->removed)
    return;
  rd_server *srv = p->srv;
  const char *labels[1] = {p->id};
  if (state == RD_CLIENT_DIALING) {
    p->attempts++;
    rd_metrics_add(srv->metrics, RD_M_PEER_WS_ATTEMPT, labels, 1);
  } else if (state == RD_CLIENT_CONNECTED) {
    rd_metrics_add(srv->metrics, RD_M_PEER_WS_CONNECTED, labels, 1);
    p->last_error[0] = '\0';
    rd_map_foreach(&srv->clients, announce_entry_cb, rd_client_session(cli));
  } else {
    if (p->state == RD_CLIENT_CONNECTED)
      rd_metrics_add(srv->metrics, RD_M_PEER_WS_DISCONNECTED, labels, 1);
    snprintf(p->last_error, sizeof p->last_error, "%s", why != NULL ? why : "");
  }
  if (state != p->state)
    p->since = wall_seconds();
  p->state = state;
}

/* A peer dials one of our clients: "key::proto" to address. It goes to the
 * local session of key only (never on to another peer: no loops). */
static void link_connect(void *ctx, rd_session *s, rd_conn *c) {
  (void)s;
  rd_peer *p = ctx;
  const char *proto = rd_conn_proto(c);
  const char *sep = strstr(proto, "::");
  char msg[RD_MSG_ERROR_LIMIT + 1];
  if (sep == NULL || sep == proto) {
    snprintf(msg, sizeof msg, "invalid clientKey/proto: %.75s", proto);
    rd_conn_refuse(c, msg);
    return;
  }
  char key[RD_MSG_CONNECT_LIMIT + 1];
  memcpy(key, proto, (size_t)(sep - proto));
  key[sep - proto] = '\0';
  rd_session *local = rd_srv_session_for(p->srv, key);
  if (local == NULL) {
    snprintf(msg, sizeof msg, "failed to find Session for client %.66s", key); /* ERROR's limit */
    rd_conn_refuse(c, msg);
    return;
  }
  int err = 0;
  rd_conn *out = rd_session_open(local, sep + 2, rd_conn_address(c), NULL, &err);
  if (out == NULL) {
    snprintf(msg, sizeof msg, "dial through session failed: %s", rd_strerror(err));
    rd_conn_refuse(c, msg);
    return;
  }
  rd_conn_splice(c, out);
}

static void link_disconnect_client(void *ctx, const char *key) {
  rd_peer *p = ctx;
  if (!p->removed)
    rd_srv_end_client_sessions(p->srv, key, "disconnected by peer");
}

static void link_freed(void *ctx) {
  rd_peer *p = ctx;
  rd_server *srv = p->srv;
  peer_free(p);
  rd_srv_unref(srv);
}

static const rd_client_hooks link_hooks = {.on_state = link_state,
                                           .on_connect = link_connect,
                                           .on_disconnect_client = link_disconnect_client,
                                           .on_freed = link_freed};

/* Takes p off the list and closes its link (p goes with it). */
static void peer_drop(rd_server *srv, rd_peer *p) {
  for (rd_peer **pp = &srv->peers; *pp != NULL; pp = &(*pp)->next) {
    if (*pp == p) {
      *pp = p->next;
      break;
    }
  }
  p->removed = 1;
  rd_client_close(p->link);
}

/* Ends the sessions peer id opened to us (it is no longer one). */
static void end_peer_sessions(rd_server *srv, const char *id) {
  /* Ending one unlinks it (peer_on_end) and nothing else. */
  for (peer_session *ps = srv->peer_sessions, *next; ps != NULL; ps = next) {
    next = ps->next;
    if (id == NULL || strcmp(rd_session_client_key(ps->s), id) == 0)
      rd_session_end(ps->s, RD_WS_CLOSE_GOING_AWAY, id == NULL ? "server closing" : "peer removed");
  }
}

static int header_safe(const char *v) { return v[0] != '\0' && strpbrk(v, "\r\n") == NULL; }

int rd_server_add_peer(rd_server *srv, const char *url, const char *id, const char *token,
                       char *err, size_t errlen) {
  if (srv->cfg.peer_id[0] == '\0' || srv->cfg.peer_token[0] == '\0') {
    snprintf(err, errlen, "add_peer needs the server's own peer_id and peer_token");
    return RD_EINVAL;
  }
  if (!header_safe(id) || !header_safe(token) || strlen(id) > RD_MSG_CLIENT_LIMIT) {
    snprintf(err, errlen, "peer id and token must be non-empty single-line text");
    return RD_EMALFORMED;
  }
  if (srv->closing) {
    snprintf(err, errlen, "server closing");
    return RD_ECLOSED;
  }
  /* Checked before anything changes: a URL rd_client_start would refuse
   * must not cost the peer already configured under this id. */
  rd_addr_url u;
  int urc = rd_addr_parse_url(url, strlen(url), &u);
  if (urc < 0) {
    snprintf(err, errlen, "invalid peer URL (%s): %s",
             urc == RD_ADDR_EBAD_SCHEME ? "want ws:// or wss://" : rd_addr_strerror(urc), url);
    return RD_EMALFORMED;
  }
  rd_peer *old = peer_find(srv, id);
  if (old != NULL && strcmp(old->url, url) == 0 && strcmp(old->token, token) == 0)
    return RD_OK; /* the same peer: nothing to do */
  rd_peer *p = rd_calloc(1, sizeof *p);
  if (p == NULL || (p->id = rd_strndup(id, strlen(id))) == NULL ||
      (p->url = rd_strndup(url, strlen(url))) == NULL ||
      (p->token = rd_strndup(token, strlen(token))) == NULL) {
    if (p != NULL)
      peer_free(p);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  p->srv = srv;
  p->since = wall_seconds();
  if (strncmp(url, "wss://", 6) == 0 && srv->cfg.peer_tls == NULL) {
    /* As Go's peers do, without a CA of our own the peer's certificate is
     * not verified: the shared token authenticates the group. */
    srv->cfg.peer_tls = rd_tls_ctx_new_client(NULL, 1, NULL, NULL, err, errlen);
    if (srv->cfg.peer_tls == NULL) {
      peer_free(p);
      return RD_ETLS;
    }
  }
  rd_client_config cfg;
  rd_client_config_default(&cfg);
  cfg.session = srv->cfg.session;
  cfg.tls = srv->cfg.peer_tls;
  cfg.hooks = &link_hooks;
  cfg.hooks_ctx = p;
  cfg.metrics = srv->metrics;
  char headers[2 * 300];
  snprintf(headers, sizeof headers, "%s: %s\r\n%s: %s\r\n", RD_PEER_ID_HEADER, srv->cfg.peer_id,
           RD_PEER_TOKEN_HEADER, srv->cfg.peer_token);
  if (old != NULL) {
    end_peer_sessions(srv, id); /* a new token: what it opened under the old one goes */
    peer_drop(srv, old);
  }
  /* Listed before it starts: its first state change names it. */
  p->next = srv->peers;
  srv->peers = p;
  srv->refs++;
  const char *urls[1] = {url};
  rd_client *cli;
  int rc = rd_client_start(urls, 1, headers, &cfg, &cli, err, errlen);
  if (rc != RD_OK) {
    srv->peers = p->next;
    peer_free(p);
    rd_srv_unref(srv);
    return rc;
  }
  p->link = cli;
  return RD_OK;
}

int rd_server_remove_peer(rd_server *srv, const char *id) {
  rd_peer *p = peer_find(srv, id);
  if (p == NULL)
    return 0;
  peer_drop(srv, p);
  end_peer_sessions(srv, id);
  return 1;
}

void rd_srv_peers_close(rd_server *srv) {
  while (srv->peers != NULL)
    peer_drop(srv, srv->peers);
  end_peer_sessions(srv, NULL);
}

/* ---- disconnect ---- */

size_t rd_server_disconnect(rd_server *srv, const char *client_key) {
  size_t ended = rd_srv_end_client_sessions(srv, client_key, "disconnected");
  /* Once to each peer: over our link, or while it is down over the session
   * the peer opened to us (twice could end an agent that came back in
   * between). Receivers end local sessions only, so nothing loops. */
  for (rd_peer *p = srv->peers; p != NULL; p = p->next) {
    rd_session *via = p->link != NULL ? rd_client_session(p->link) : NULL;
    for (peer_session *ps = srv->peer_sessions; via == NULL && ps != NULL; ps = ps->next)
      if (strcmp(rd_session_client_key(ps->s), p->id) == 0)
        via = ps->s;
    if (via != NULL)
      rd_session_send_text(via, RD_MSG_DISCONNECT_CLIENT, client_key);
  }
  return ended;
}

/* ---- queries ---- */

static const char *state_name(int state) {
  return state == RD_CLIENT_CONNECTED ? "connected"
         : state == RD_CLIENT_WAITING ? "waiting"
                                      : "connecting";
}

void rd_server_foreach_peer(rd_server *srv, void (*cb)(void *ctx, const rd_peer_info *info),
                            void *ctx) {
  for (rd_peer *p = srv->peers; p != NULL; p = p->next) {
    rd_peer_info info = {.id = p->id,
                         .url = p->url,
                         .state = state_name(p->state),
                         .since = p->since,
                         .attempts = p->attempts,
                         .last_error = p->last_error};
    for (peer_session *ps = srv->peer_sessions; ps != NULL; ps = ps->next) {
      if (strcmp(rd_session_client_key(ps->s), p->id) == 0) {
        info.inbound++;
        info.keys += ps->keys.count;
      }
    }
    cb(ctx, &info);
  }
}

void rd_srv_peers_foreach_session(rd_server *srv, void (*cb)(void *ctx, rd_session *s),
                                  void *ctx) {
  for (peer_session *ps = srv->peer_sessions; ps != NULL; ps = ps->next)
    cb(ctx, ps->s);
  for (rd_peer *p = srv->peers; p != NULL; p = p->next) {
    rd_session *link = p->link != NULL ? rd_client_session(p->link) : NULL;
    if (link != NULL)
      cb(ctx, link);
  }
}

void rd_srv_peers_foreach_conn(rd_server *srv, rd_conn_info_cb cb, void *ctx) {
  for (peer_session *ps = srv->peer_sessions; ps != NULL; ps = ps->next)
    rd_session_foreach_conn(ps->s, cb, ctx);
  for (rd_peer *p = srv->peers; p != NULL; p = p->next) {
    rd_session *link = p->link != NULL ? rd_client_session(p->link) : NULL;
    if (link != NULL)
      rd_session_foreach_conn(link, cb, ctx);
  }
}

const char *rd_server_route(rd_server *srv, const char *client_key) {
  if (rd_srv_session_for(srv, client_key) != NULL)
    return "";
  rd_session *s = rd_srv_peer_route(srv, client_key);
  return s != NULL ? rd_session_client_key(s) : NULL;
}
