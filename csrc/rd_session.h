/* A tunnel session: one WebSocket carrying many connections (PROTOCOL.md
 * sections 3-5). It reads and frames, keeps the session alive and in sync,
 * and hands every message to the connection it names (rd_conn.h) or to its
 * owner: CONNECT, ADD_CLIENT and REMOVE_CLIENT are the owner's to decide, so
 * the same session serves a server, an agent or a peer. Its role only says
 * which side of the WebSocket it is (who masks, who pings, who prunes on
 * SYNC). The stream may be plain TCP or TLS. Loop thread only. */
#ifndef RD_SESSION_H
#define RD_SESSION_H

#include <uv.h>

#include "rd_common.h"
#include "rd_conn.h"
#include "rd_io.h"
#include "rd_metrics.h"

enum { RD_ROLE_SERVER = 1, RD_ROLE_CLIENT = 2 };

/* What a session is to its owner, for the session counters: an agent's
 * (counted peer="false"), a peer's accepted by this server (peer="true"), or
 * this server's own link to a peer (not counted as a websocket session: the
 * peer_ws counters count it, as Go does). */
enum { RD_SESSION_AGENT = 0, RD_SESSION_PEER = 1, RD_SESSION_LINK = 2 };

typedef struct rd_session_config {
  uint64_t read_timeout_ms;  /* silence after which the session is dead */
  uint64_t ping_interval_ms; /* client: WebSocket Ping period (0 = none) */
  uint64_t sync_interval_ms; /* client: SYNC_CONNECTIONS period (0 = none) */
  uint64_t sync_grace_ms;    /* server: age under which SYNC never closes */
  uint64_t max_message;      /* WebSocket message limit */
  size_t max_buffer;         /* PAUSE above, RESUME below max_buffer / 8 */
  size_t hard_cap;           /* a connection's buffer past this ends it */
  size_t write_high;         /* queue toward the peer: stop reading locals above,
                                and the peer itself above twice this */
  uint64_t dial_timeout_ms;  /* client: local dial limit */
  uint64_t idle_timeout_ms;  /* end connections idle this long (0 = never) */
  uint64_t udp_idle_timeout_ms; /* the same for udp connections */
  size_t max_connections;    /* per session; past it dials and CONNECTs fail */
  size_t max_pending_dials;  /* client: local dials in flight per session */
  int trace;                 /* record each message sent and received (rd_trace.h) */
} rd_session_config;

/* Fills the protocol's defaults. */
void rd_session_config_default(rd_session_config *cfg);

typedef struct rd_session_owner {
  /* The session ended (already counted removed, every connection ended).
   * The owner unlinks it; the session frees itself later. */
  void (*on_end)(rd_session *s, void *owner, const char *reason);
  /* The session's memory is gone (the owner may drop its reference). */
  void (*on_freed)(void *owner);
  /* A CONNECT arrived for conn (registered, counted added). The owner
   * decides, now or later: rd_conn_dial_local, an rd_conn_attach_*, or
   * rd_conn_refuse. NULL: every CONNECT is refused. */
  void (*on_connect)(rd_session *s, void *owner, rd_conn *c);
  /* The queue toward the peer went back under write_high (NULL: not told). */
  void (*on_room)(rd_session *s, void *owner);
  /* ADD_CLIENT / REMOVE_CLIENT from a peer (NULL: ignored). */
  void (*on_add_client)(rd_session *s, void *owner, const char *client_key);
  void (*on_remove_client)(rd_session *s, void *owner, const char *client_key);
  /* DISCONNECT_CLIENT from one of our peers (NULL: ignored). */
  void (*on_disconnect_client)(rd_session *s, void *owner, const char *client_key);
  /* A connection failed before carrying data, with err: here (far 0: a
   * refused CONNECT, a failed local dial) or on the far side (far 1: its
   * ERROR before any DATA). Told before it ends (NULL: not told). */
  void (*on_conn_failed)(rd_session *s, void *owner, rd_conn *c, const char *err, int far);
} rd_session_owner;

/* Starts a session over an open stream (ownership of io passes to the
 * session, also on failure; TLS, if any, is past its handshake). leftover
 * holds bytes already read past the handshake. client_key labels metrics;
 * remote is the far address, for news of the session (NULL: unknown); both
 * are copied. kind is an RD_SESSION_* value. cfg and ops are kept by
 * pointer, not copied: they must not change, and must stay valid until
 * ops->on_freed (the owner's own configuration and a static table).
 * Counts the session added. Returns NULL on allocation failure (tcp
 * closed). */
rd_session *rd_session_new(rd_io *io, int role, const char *client_key, const char *remote,
                           int kind, rd_metrics *metrics, const rd_session_config *cfg,
                           const rd_session_owner *ops, void *owner, const uint8_t *leftover,
                           size_t leftover_len);

/* Ends the session: every connection ends with "tunnel disconnect", a Close
 * frame is sent with code, the stream closes. Idempotent. Never called from
 * inside a send: a send that fails only marks the session, and it ends here
 * on the next loop turn. */
void rd_session_end(rd_session *s, int close_code, const char *reason);

const char *rd_session_client_key(const rd_session *s);
int64_t rd_session_key(const rd_session *s);
int rd_session_is_ended(const rd_session *s);
int rd_session_kind(const rd_session *s); /* RD_SESSION_* */
/* The far address given to rd_session_new, or "". */
const char *rd_session_remote(const rd_session *s);
size_t rd_session_conn_count(const rd_session *s);
/* Whether the queue toward the peer has room (under write_high) and the
 * session is not ending: a new connection's bytes would move now. */
int rd_session_has_room(const rd_session *s);

/* Opens a connection through the session to proto/address: sends CONNECT
 * and returns it connecting (what the far side sends is held until a local
 * end is attached with rd_conn_attach_*). status (may be NULL) gets a
 * reference. NULL with *err = RD_ECLOSED, RD_ETOOMANY or RD_ENOMEM. */
rd_conn *rd_session_open(rd_session *s, const char *proto, const char *address,
                         rd_dial_status *status, int *err);

/* rd_session_open, then local attached (ownership passes to the connection,
 * also on failure) and preface (may be NULL) sent as DATA. */
rd_conn *rd_session_dial(rd_session *s, const char *proto, const char *address,
                         rd_io *local, const uint8_t *preface, size_t preface_len,
                         rd_dial_status *status, int *err);

/* Sends a session-level message with a text payload: ADD_CLIENT,
 * REMOVE_CLIENT or DISCONNECT_CLIENT. Dropped once the session is ending. */
void rd_session_send_text(rd_session *s, int type, const char *text);

/* Frees the idle write requests kept for reuse (loop thread). */
void rd_session_trim_pools(void);

/* What the session carried so far, for the dashboard. */
typedef struct rd_session_stats {
  double since; /* wall-clock seconds of its start */
  uint64_t conns_added, conns_removed;
  uint64_t tx_bytes, rx_bytes; /* DATA payload sent and received */
} rd_session_stats;
void rd_session_get_stats(const rd_session *s, rd_session_stats *out);
/* The session's connection id, or NULL. */
rd_conn *rd_session_conn(rd_session *s, int64_t id);

/* Calls cb for every connection of the session. */
void rd_session_foreach_conn(rd_session *s, rd_conn_info_cb cb, void *ctx);

#endif
