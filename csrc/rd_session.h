/* A tunnel session: one WebSocket carrying many connections (PROTOCOL.md
 * sections 3-5), and the connections themselves. The session neither knows
 * nor cares whether its stream is plain TCP or (later) TLS, nor whether it
 * serves a server, a client or a peer; its owner tells it through a small
 * table of callbacks. Loop thread only. */
#ifndef RD_SESSION_H
#define RD_SESSION_H

#include <uv.h>

#include "rd_common.h"
#include "rd_io.h"
#include "rd_metrics.h"

typedef struct rd_session rd_session;
typedef struct rd_conn rd_conn;

enum { RD_ROLE_SERVER = 1, RD_ROLE_CLIENT = 2 };

typedef struct rd_session_config {
  uint64_t read_timeout_ms;  /* silence after which the session is dead */
  uint64_t ping_interval_ms; /* client: WebSocket Ping period (0 = none) */
  uint64_t sync_interval_ms; /* client: SYNC_CONNECTIONS period (0 = none) */
  uint64_t sync_grace_ms;    /* server: age under which SYNC never closes */
  uint64_t max_message;      /* WebSocket message limit */
  size_t max_buffer;         /* PAUSE above, RESUME below max_buffer / 8 */
  size_t hard_cap;           /* a connection's buffer past this ends it */
  size_t write_high;         /* session write queue: stop reading locals above */
  uint64_t dial_timeout_ms;  /* client: local dial limit */
  uint64_t idle_timeout_ms;  /* end connections idle this long (0 = never) */
  size_t max_connections;    /* per session; past it dials and CONNECTs fail */
  size_t max_pending_dials;  /* client: local dials in flight per session */
} rd_session_config;

/* Fills the protocol's defaults. */
void rd_session_config_default(rd_session_config *cfg);

typedef struct rd_session_owner {
  /* The session ended (already counted removed, every connection ended).
   * The owner unlinks it; the session frees itself later. */
  void (*on_end)(rd_session *s, void *owner, const char *reason);
  /* The session's memory is gone (the owner may drop its reference). */
  void (*on_freed)(void *owner);
  /* Client role: a CONNECT arrived for conn (registered, counted added). The
   * owner decides and then calls rd_conn_dial_local or rd_conn_refuse. */
  void (*on_connect)(rd_session *s, void *owner, rd_conn *c);
} rd_session_owner;

/* Starts a session over an open stream (ownership of io passes to the
 * session, also on failure; TLS, if any, is past its handshake). leftover
 * holds bytes already read past the handshake. client_key labels metrics.
 * Counts the session added. Returns NULL on allocation failure (tcp closed). */
rd_session *rd_session_new(rd_io *io, int role, const char *client_key, int peer,
                           rd_metrics *metrics, const rd_session_config *cfg,
                           const rd_session_owner *ops, void *owner, const uint8_t *leftover,
                           size_t leftover_len);

/* Ends the session: every connection ends with "tunnel disconnect", a Close
 * frame is sent with code, the stream closes. Idempotent. */
void rd_session_end(rd_session *s, int close_code, const char *reason);

const char *rd_session_client_key(const rd_session *s);
int64_t rd_session_key(const rd_session *s);
int rd_session_is_ended(const rd_session *s);
size_t rd_session_conn_count(const rd_session *s);

/* Shared between a dialed connection and the Python socket that stands for
 * it: whether it is open and the far side's error text. */
typedef struct rd_dial_status {
  _Atomic int refs;
  _Atomic int ended;
  char error[128]; /* written before `ended` is set */
} rd_dial_status;
rd_dial_status *rd_dial_status_new(void);
void rd_dial_status_unref(rd_dial_status *st);

/* Server role: opens a connection through the session to proto/address and
 * sends CONNECT. local is the connected stream whose bytes go through the
 * tunnel (ownership passes to the connection, also on failure). preface (may be NULL) is sent as DATA right after CONNECT.
 * status (may be NULL) gets a reference. Returns the connection or NULL
 * (then *err says why). */
rd_conn *rd_session_dial(rd_session *s, const char *proto, const char *address,
                         rd_io *local, const uint8_t *preface, size_t preface_len,
                         rd_dial_status *status, int *err);

/* Client role, from on_connect: dial the connection's address locally. */
void rd_conn_dial_local(rd_conn *c);
/* Client role, from on_connect: refuse with ERROR `reason`. */
void rd_conn_refuse(rd_conn *c, const char *reason);
/* The connection's proto and address. */
const char *rd_conn_proto(const rd_conn *c);
const char *rd_conn_address(const rd_conn *c);
int64_t rd_conn_id(const rd_conn *c);
/* Opaque slot for the owner (a pending request, say). */
void **rd_conn_owner_slot(rd_conn *c);

/* Server-side proxy route: when the far side fails before sending any byte,
 * answer the local HTTP client with a 500 and the error text. */
void rd_conn_set_http_errors(rd_conn *c);
/* Ends the connection after timeout_ms (0 = never). */
int rd_conn_set_deadline(rd_conn *c, uint64_t timeout_ms);
/* Ends the connection once no byte moved either way for timeout_ms
 * (0 = the session's idle_timeout_ms). */
void rd_conn_set_idle_timeout(rd_conn *c, uint64_t timeout_ms);

/* Frees the idle write requests kept for reuse (loop thread). */
void rd_session_trim_pools(void);

/* One open connection, as connections() reports it. */
typedef struct rd_conn_info {
  int64_t id;
  const char *client_key;
  const char *proto;
  const char *address;
  double age;
  double idle; /* seconds since a byte last moved */
  const char *state;
  uint64_t tx_bytes, rx_bytes;
  int paused;
  size_t buffered;
} rd_conn_info;
typedef void (*rd_conn_info_cb)(void *ctx, const rd_conn_info *info);
void rd_session_foreach_conn(rd_session *s, rd_conn_info_cb cb, void *ctx);

#endif
