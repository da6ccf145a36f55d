/* The tunnel server: an HTTP listener that upgrades the connect path to
 * WebSocket sessions, serves /metrics and the /client/... proxy route, and
 * dials through its agents. Loop thread only; rd_api.h wraps it for other
 * threads. */
#ifndef RD_SERVER_H
#define RD_SERVER_H

#include "rd_loop.h"
#include "rd_metrics.h"
#include "rd_session.h"
#include "rd_tls.h"
#include "rd_tokens.h"

enum { RD_AUTH_HEADER = 0, RD_AUTH_CALLBACK = 1, RD_AUTH_TOKEN = 2 };

typedef struct rd_server_config {
  char path[256];       /* the connect path, "/connect" */
  int auth_mode;        /* RD_AUTH_HEADER or RD_AUTH_CALLBACK */
  char auth_header[64]; /* header naming the client key in RD_AUTH_HEADER mode */
  int proxy_route;      /* serve /client/{id}/{scheme}/{host}/{path} */
  int metrics_route;    /* serve /metrics */
  int debug_route;      /* serve /debug/connections (JSON) */
  /* The dashboard (rd_server_dashboard.c): /ui/, /debug/state and its
   * actions. HTTP Basic credentials ("" user: none); the page's bytes are
   * copied at start (the server owns its copy). */
  int dashboard;
  char dashboard_user[128];
  char dashboard_password[256];
  const char *dashboard_html;
  size_t dashboard_html_len;
  uint64_t handshake_timeout_ms; /* time to send a complete request head */
  size_t max_head;
  size_t max_headers;
  /* The proxy route's pool of idle tunneled connections (0 idle timeout:
   * no pool). */
  size_t proxy_pool_per_target;
  size_t proxy_pool_max;
  uint64_t proxy_pool_idle_timeout_ms;
  rd_tls_ctx *tls;      /* wss: the server takes its own reference; NULL = plain */
  /* Client context for https targets of the proxy route (the server takes
   * its own reference); NULL: verify against the system store, made at the
   * first such request. */
  rd_tls_ctx *proxy_tls;
  rd_tokens *tokens;    /* RD_AUTH_TOKEN: ownership passes to the server at start */
  size_t max_sessions;  /* all sessions; past it upgrades get 503 */
  size_t max_sessions_per_key; /* past it upgrades for that key get 429 */
  /* HA peering: this server's id and the token it presents to its peers
   * (both needed to add peers). */
  char peer_id[128];
  char peer_token[256];
  /* Client context for wss:// peer URLs (the server takes its own
   * reference); NULL: made at the first such peer, without verification,
   * as Go's peers do. */
  rd_tls_ctx *peer_tls;
  /* Post news of sessions that come and go for Python (rd_event_post). */
  int events;
  /* Post "dial_failed" news (rd_event_post_dial) for each connection an
   * agent (or a peer) ended with an error before any data. */
  int conn_events;
  rd_session_config session;
} rd_server_config;

void rd_server_config_default(rd_server_config *cfg);

typedef struct rd_server rd_server;

/* Binds host:port and starts serving. On success *out is registered as an
 * object (its handle in (*out)->obj.handle... use rd_server_handle) and
 * *port_out holds the bound port. On failure returns a negative code and
 * writes a message into err. */
int rd_server_start(const char *host, int port, const rd_server_config *cfg, rd_server **out,
                    int *port_out, char *err, size_t errlen);
uint64_t rd_server_handle(const rd_server *srv);
rd_metrics *rd_server_metrics(rd_server *srv);

/* A dial through the oldest live session of a client key. The strings stay
 * valid until cmd is finished. */
typedef struct rd_server_dial_req {
  rd_cmd *cmd; /* finished with the outcome */
  const char *client_key, *proto, *address;
  uint64_t idle_timeout_ms;
  /* How long the dial may wait for room on a session whose queue toward the
   * agent is full (Go's deadline on writing CONNECT); 0: not at all. */
  uint64_t timeout_ms;
  /* Results: the caller's end of a socket pair (the engine keeps the other),
   * the connection id and a referenced status. */
  int fd;
  int64_t conn_id;
  rd_dial_status *status;
} rd_server_dial_req;

/* Finishes req->cmd with RD_OK and the results, or an error: RD_ENOSESSION
 * ("failed to find Session for client KEY", also when the session ends while
 * the dial waits), RD_ETIMEDOUT (no room within timeout_ms), RD_ECLOSED. */
void rd_server_dial(rd_server *srv, rd_server_dial_req *req);

/* Starts a port forward: each TCP connection accepted on host:port is dialed
 * through client_key's session to proto/address. */
int rd_server_forward(rd_server *srv, const char *client_key, const char *proto,
                      const char *address, const char *host, int port, uint64_t *handle_out,
                      int *port_out, char *err, size_t errlen);

/* Loads a new certificate/key (and client CA) for connections accepted from
 * now on. Returns 0, or RD_EMALFORMED when the server has no TLS, or RD_ETLS
 * with a message (the old certificate stays). */
int rd_server_reload_tls(rd_server *srv, const char *cert, const char *key,
                         const char *client_ca, char *err, size_t errlen);

/* Replaces the token table (ownership passes; the old one is freed).
 * Returns RD_EMALFORMED when the server does not use token auth. */
int rd_server_set_tokens(rd_server *srv, rd_tokens *tokens);

/* Calls cb for each client key with a live session (unsorted, may repeat). */
void rd_server_foreach_client(rd_server *srv, void (*cb)(void *ctx, const char *key), void *ctx);
int rd_server_has_session(rd_server *srv, const char *client_key);
/* Connections of every session: agents', peers' and our links'. */
void rd_server_foreach_conn(rd_server *srv, rd_conn_info_cb cb, void *ctx);

/* ---- HA peering (rd_server_peers.c) ---- */

/* Adds a peer: our link connects to url presenting our peer_id and
 * peer_token, and we accept that peer's sessions when it presents id and
 * token. The same peer again is a no-op; a new url or token restarts it.
 * RD_EINVAL without our own peer_id and peer_token; RD_EMALFORMED for a bad
 * id, token or url, with err. */
int rd_server_add_peer(rd_server *srv, const char *url, const char *id, const char *token,
                       char *err, size_t errlen);
/* Removes a peer: closes our link and ends the sessions it opened to us.
 * Returns 1, or 0 for an unknown id. */
int rd_server_remove_peer(rd_server *srv, const char *id);

typedef struct rd_peer_info {
  const char *id, *url;
  const char *state; /* "connecting", "connected", "waiting" (to retry) */
  double since;      /* wall-clock seconds of the last state change */
  uint64_t attempts; /* connection attempts of our link */
  const char *last_error;
  size_t inbound;    /* sessions the peer has open to us */
  size_t keys;       /* client keys (and sessions) they announced */
} rd_peer_info;
void rd_server_foreach_peer(rd_server *srv, void (*cb)(void *ctx, const rd_peer_info *info),
                            void *ctx);

/* Ends client_key's local sessions and asks every peer to end its own.
 * Returns how many sessions ended here. */
size_t rd_server_disconnect(rd_server *srv, const char *client_key);
/* Closes the proxy route's idle pooled connections; returns how many. */
size_t rd_server_close_idle(rd_server *srv);

/* Where a dial for client_key goes: "" for a local session, a peer's id, or
 * NULL when nothing reaches it. */
const char *rd_server_route(rd_server *srv, const char *client_key);

#endif
