/* What the server's modules share: the server, its HTTP connections and its
 * client entries, and the calls each module makes of the others. Only the
 * rd_server*.c files include this; everyone else goes through rd_server.h.
 *
 *   rd_server.c           lifecycle, queries, the listener and the HTTP
 *                         connection before the upgrade (head, routing,
 *                         responses)
 *   rd_server_sessions.c  the client table, session owner callbacks, the
 *                         upgrade and its authentication
 *   rd_server_proxy.c     the /client/... proxy route and its https leg
 *   rd_server_proxy_http.c  its http leg: one kept-alive exchange
 *   rd_server_pool.c      the route's pool of idle tunneled connections
 *   rd_server_stream.c    the /stream/... route (a raw stream after 101)
 *   rd_server_dial.c      dials through a session, and dials waiting for room
 *   rd_server_forward.c   port forwards
 *   rd_server_routes.c    /metrics, /debug/connections and /debug/peers
 *   rd_server_dashboard.c /healthz, /readyz, /debug/state, its actions, /ui/
 *   rd_server_peers.c     HA peering: links to peers, sessions peers open
 *                         to us and the keys they announce
 *
 * The server is freed in one place, rd_srv_unref, when its last reference
 * goes; every object that holds one (below) drops it there. */
#ifndef RD_SERVER_INT_H
#define RD_SERVER_INT_H

#include <uv.h>

#include "rd_http.h"
#include "rd_io.h"
#include "rd_client.h"
#include "rd_map.h"
#include "rd_msg.h"
#include "rd_server.h"

typedef struct httpconn httpconn;
typedef struct client_entry client_entry;
typedef struct rd_forward rd_forward; /* rd_server_forward.c */
typedef struct room_wait room_wait;   /* rd_server_dial.c */
typedef struct rd_peer rd_peer;       /* rd_server_peers.c */
typedef struct peer_session peer_session; /* rd_server_peers.c */
typedef struct rd_backend rd_backend;       /* rd_server_pool.c */
typedef struct rd_proxy_pool rd_proxy_pool; /* rd_server_pool.c */

/* The peer headers, as Go names them. */
#define RD_PEER_ID_HEADER "X-API-Tunnel-ID"
#define RD_PEER_TOKEN_HEADER "X-API-Tunnel-Token"

/* A client key and its live sessions (rd_server_sessions.c owns it). */
struct client_entry {
  rd_map_node node;
  rd_session **sessions; /* oldest first: &first while one fits, else rd_malloc'ed */
  size_t count, cap;
  /* Connections of the key's sessions that ended, for the dashboard. */
  uint64_t past_added, past_removed;
  rd_session *first; /* most keys have one session: it needs no array */
  char key[];        /* NUL-terminated, in the entry's own allocation */
};

struct rd_server {
  rd_object obj;
  room_wait *room_waits; /* dials waiting for room on their session */
  rd_server_config cfg;
  uv_tcp_t listener;
  rd_metrics *metrics;
  rd_map clients;
  httpconn *httpconns;
  rd_forward *forwards;
  rd_peer *peers;               /* configured peers and our links to them */
  peer_session *peer_sessions;  /* sessions peers opened to us, newest first */
  rd_proxy_pool *pool;          /* the proxy route's idle connections, or NULL */
  size_t sessions; /* live sessions, agents' and peers' */
  int refs; /* listener + sessions + httpconns + forwards + room waits + peers */
  int closing;
  uint64_t accept_news_ms; /* when the last failed accept was told (uv_now) */
  rd_cmd *close_waiter;
};

/* An accepted connection before the upgrade (rd_server.c owns it). */
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
  int kept; /* a kept-alive connection between requests: idle until bytes come */
};

/* ---- rd_server.c: lifecycle, listeners, HTTP connections ---- */

/* Drops a reference; the last one frees the server and finishes its close. */
void rd_srv_unref(rd_server *srv);
/* Close callback that frees an rd_malloc'ed handle. */
void rd_srv_tcp_free_cb(uv_handle_t *h);
/* Accepts the pending connection into a new rd_malloc'ed handle with
 * TCP_NODELAY, or NULL. */
uv_tcp_t *rd_srv_accept_tcp(uv_stream_t *listener);
/* A listener's accept failed with status (the listener keeps serving):
 * counted, and told as news at most once a second. */
void rd_srv_accept_failed(rd_server *srv, int status);
/* Binds tcp to host:port ("" = 0.0.0.0); *port_out is the bound port. 0 or a
 * negative code with err ("listen tcp HOST:PORT: ..."). */
int rd_srv_bind_listener(uv_tcp_t *tcp, const char *host, int port, int *port_out, char *err,
                         size_t errlen);
/* Closes the HTTP connection (idempotent); it is freed once its handles close. */
void rd_srv_httpconn_close(httpconn *hc);
/* Writes a copy of data (the write owns it, so the stream may change owners
 * while it is in flight). 0 or a negative code. */
int rd_srv_write_owned(rd_io *io, const char *data, size_t len);
/* Answers a plain HTTP response (body copied) and closes after it is written. */
void rd_srv_http_respond(httpconn *hc, int status, const char *reason, const char *ctype,
                         const char *body, size_t body_len);
/* The same with a text/plain body. */
void rd_srv_respond_text(httpconn *hc, int status, const char *reason, const char *text);
/* Hands the stream over (the caller owns it from here) and closes hc; hc->buf
 * stays readable until hc's close callback, on a later loop turn. */
rd_io *rd_srv_httpconn_take_stream(httpconn *hc);
/* The same for an owner that sets its own read callbacks, or stops reading,
 * before it returns to the loop: reading is not stopped in between, which
 * would cost two changes of the poller's registration per request. */
rd_io *rd_srv_httpconn_take_stream_reading(httpconn *hc);
/* Takes a stream back after a kept-alive exchange: a new HTTP connection
 * that routes its next request, starting with rest[0..len) (bytes already
 * read: a pipelined request). Closes io when the server is closing. */
void rd_srv_httpconn_adopt(rd_server *srv, rd_io *io, const uint8_t *rest, size_t len);

/* ---- rd_server_sessions.c: the client table, the upgrade ---- */

/* The oldest live local session of key, or NULL. */
rd_session *rd_srv_session_for(rd_server *srv, const char *key);
/* Where a dial for key goes: its local session, else a peer session that
 * announced it, else NULL. */
rd_session *rd_srv_route(rd_server *srv, const char *key);
/* proto as a dial through s carries it: "key::proto" when s is a peer's
 * session (the peer dials its own client), else proto. out holds at least
 * RD_MSG_CONNECT_LIMIT + 1 bytes. NULL when it does not fit. */
const char *rd_srv_wire_proto(rd_session *s, const char *key, const char *proto, char *out,
                              size_t outlen);
/* Ends every local session of key with reason; returns how many. */
size_t rd_srv_end_client_sessions(rd_server *srv, const char *key, const char *reason);
/* The connect path: checks the WebSocket handshake, authenticates, and
 * upgrades to a session or answers an error. */
void rd_srv_handle_upgrade(httpconn *hc, rd_http_request *req);

/* ---- rd_server_proxy.c ---- */

/* /client/{id}/{scheme}/{host}{path}: relays the request through id's tunnel. */
void rd_srv_handle_proxy(httpconn *hc, rd_http_request *req);

/* ---- rd_server_proxy_http.c ---- */

/* Where a plain-http exchange goes: the client key, the dial's wire proto and
 * address, and the pool key made of them. */
typedef struct rd_proxy_target {
  char key[256];
  char proto[RD_MSG_CONNECT_LIMIT + 1];
  char address[300];
  char pool_key[256 + RD_MSG_CONNECT_LIMIT + 1 + 300 + 2]; /* key, proto, address */
} rd_proxy_target;

/* Runs one request through the tunnel on a kept-alive basis: head (the
 * rewritten request head) goes out on an idle pooled connection to the
 * target or a fresh one, then body bytes as the request's framing says; the
 * response is relayed by its framing, after which the client connection
 * serves its next request and the tunneled one goes back to the pool. Takes
 * hc's stream. timeout_ms > 0 bounds the exchange (that connection is not
 * pooled). Answers 400 itself for a request whose framing is ambiguous. */
void rd_srv_proxy_http(httpconn *hc, const rd_http_request *req, const rd_proxy_target *t,
                       const char *head, size_t head_len, uint64_t timeout_ms);

/* ---- rd_server_pool.c ---- */

/* One tunneled connection seen through an in-memory pair (see rd_server_pool.c). */
struct rd_backend {
  rd_backend *prev, *next; /* in the pool, while idle */
  rd_server *srv;
  rd_io *io;           /* our end of the pair; its data is the backend */
  rd_conn *c;          /* valid while rd_srv_backend_alive */
  rd_dial_status *st;  /* the far side's end and its error */
  char *target;        /* the pool key */
  uint64_t idle_since;
  void *owner;         /* the exchange using it */
  int reused;          /* served a request before this one */
};

/* Dials a fresh backend for target through s; NULL with err. */
rd_backend *rd_srv_backend_dial(rd_server *srv, rd_session *s, const char *proto,
                                const char *address, const char *target, char *err,
                                size_t errlen);
/* Whether the tunneled connection is still open. */
int rd_srv_backend_alive(const rd_backend *be);
/* Closes the backend (the tunneled connection ends with EOF) and frees it. */
void rd_srv_backend_close(rd_backend *be);
/* An idle backend for target (the newest), or NULL. */
rd_backend *rd_srv_pool_take(rd_server *srv, const char *target);
/* Returns a backend after a complete exchange: pooled, or closed when the
 * pool is off, full for its target, or the server closing. */
void rd_srv_pool_put(rd_backend *be);
/* Closes every idle backend; returns how many. */
size_t rd_srv_pool_close_idle(rd_server *srv);
/* The server is closing: closes the idle backends and the pool's timer. */
void rd_srv_pool_close(rd_server *srv);

/* ---- rd_server_stream.c ---- */

/* /stream/{key}/{proto}/{address} with Upgrade: tcp: the connection becomes
 * a raw stream through key's tunnel. */
void rd_srv_handle_stream(httpconn *hc, rd_http_request *req);

/* ---- rd_server_dial.c ---- */

/* Dials proto/address through s with one end of a fresh socket pair as the
 * local end: *fd_out is the other end, *st_out a referenced status, *c_out
 * the connection. 0 or a negative code with err. */
int rd_srv_dial_pair(rd_session *s, const char *proto, const char *address, int *fd_out,
                     rd_dial_status **st_out, rd_conn **c_out, char *err, size_t errlen);
/* The same for a stream (not udp) whose other end is the engine's own: the
 * local end is one end of an in-memory pair (rd_io_new_pair), *io_out the
 * other, plain, the caller's to close (the connection then reads EOF and
 * ends). No descriptor, no system call per write. 0 or a negative code with
 * err. */
int rd_srv_dial_io(rd_session *s, const char *proto, const char *address, rd_io **io_out,
                   rd_dial_status **st_out, rd_conn **c_out, char *err, size_t errlen);
/* Session s has room again, or ended (ended 1): its waiting dials go on or fail. */
void rd_srv_room_waits_wake(rd_server *srv, rd_session *s, int ended);

/* ---- rd_server_forward.c ---- */

/* Closes every forward (the server is closing). */
void rd_srv_forwards_close(rd_server *srv);

/* ---- rd_server_peers.c ---- */

/* The configured peer whose id and token the request presents, or NULL (no
 * peer headers, an unknown id or a wrong token: the normal authorizer
 * decides). */
const char *rd_srv_peer_auth(rd_server *srv, const rd_http_request *req);
/* Serves an upgraded stream as the session peer id opened to us. */
void rd_srv_peer_accept(rd_server *srv, rd_io *io, const char *id, const char *remote,
                        const uint8_t *rest, size_t rest_len);
/* News of a session for Python, when the server posts events: what is
 * "connect" or "disconnect". */
void rd_srv_session_news(rd_server *srv, rd_session *s, const char *what, const char *reason);
/* A session's on_conn_failed (owner: the server): the far side's error
 * before any data, as news for Python when the server posts conn_events. */
void rd_srv_conn_news(rd_server *srv, rd_session *s, rd_conn *c, const char *err, int far);
/* The oldest peer session that announced key, or NULL. */
rd_session *rd_srv_peer_route(rd_server *srv, const char *key);
/* A local session of key came (add 1) or went: tell every connected link. */
void rd_srv_peers_announce(rd_server *srv, const char *key, int64_t session_key, int add);
/* Closes every link and ends every peer session (the server is closing). */
void rd_srv_peers_close(rd_server *srv);
/* Walks the connections of peer sessions and links. */
void rd_srv_peers_foreach_conn(rd_server *srv, rd_conn_info_cb cb, void *ctx);

/* ---- rd_server_routes.c ---- */

/* /metrics: the Prometheus text. */
void rd_srv_handle_metrics(httpconn *hc);
/* /debug/connections: sessions and connections as JSON. */
void rd_srv_handle_debug(httpconn *hc);
/* /debug/peers: the configured peers as JSON. */
void rd_srv_handle_debug_peers(httpconn *hc);

/* ---- rd_server_dashboard.c ---- */

/* /healthz, /readyz, and (as configured) /ui/, /debug/state and the
 * dashboard's actions. Returns 1 when it answered the request. */
int rd_srv_dashboard_route(httpconn *hc, rd_http_request *req, size_t plen);
/* rd_srv_http_respond with extra header lines (each ending "\r\n"). */
void rd_srv_http_respond_with(httpconn *hc, int status, const char *reason, const char *ctype,
                              const char *extra, const char *body, size_t body_len);
/* Calls cb for each session of a peer: those peers opened to us, and our
 * links to them. */
void rd_srv_peers_foreach_session(rd_server *srv, void (*cb)(void *ctx, rd_session *s),
                                  void *ctx);

#endif
