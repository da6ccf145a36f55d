/* What a session and its connections share: the session's fields and the
 * calls each makes of the other. Only rd_session.c and rd_conn.c include
 * this; everyone else goes through rd_session.h and rd_conn.h.
 *
 * The one rule of sending: a send never ends anything. A session whose
 * stream fails is marked doomed (later sends are dropped) and a connection
 * whose local end fails is queued; both end in session_reap on the next
 * loop turn. So no caller re-checks state after a send. */
#ifndef RD_SESSION_INT_H
#define RD_SESSION_INT_H

#include "rd_block.h"
#include "rd_loop.h"
#include "rd_map.h"
#include "rd_metrics.h"
#include "rd_msg.h"
#include "rd_session.h"
#include "rd_ws.h"

struct rd_session {
  rd_io *io;
  uv_timer_t tick;
  rd_defer reap; /* queued after a failure marked something */
  const rd_session_config *cfg; /* the owner's, kept until on_freed */
  const rd_session_owner *ops;  /* the same */
  void *owner;
  rd_metrics *metrics;
  int64_t session_key;
  rd_ws_reader reader;
  rd_block *rblock;
  size_t rstart, rend;
  rd_map conns;
  int64_t next_conn_id;
  int64_t next_msg_id;
  uint64_t last_rx, last_ping, last_sync;
  uint64_t tick_ms;   /* current tick period */
  const char *doom_reason;
  size_t connecting;  /* connections not yet attached to a local end */
  size_t paused;      /* connections the far side has paused */
  size_t idle_watched; /* connections with an idle timeout */
  rd_conn *reap_head; /* connections whose local end failed */
  rd_session_stats stats; /* for the dashboard (rd_session_get_stats) */
  unsigned handles_open : 2; /* the stream and the tick */
  unsigned role : 2;
  unsigned kind : 2;          /* RD_SESSION_* */
  unsigned ended : 1;
  unsigned ending : 1;        /* inside rd_session_end */
  unsigned doomed : 1;        /* a send failed: ends at the next reap */
  unsigned write_blocked : 1; /* queue toward the peer over write_high: locals wait */
  unsigned peer_blocked : 1;  /* queue over twice that: the peer waits too */
  /* The client key, NUL-terminated, then the far address (for news of the
   * session; "" when unknown), in the session's own allocation. */
  char client_key[];
};

/* ---- the session, for its connections ---- */

/* Sends a tunnel message whose payload is at rd_block_payload(b); takes b's
 * reference. Dropped once the session is ending. */
void rd_session_send_block(rd_session *s, int type, int64_t conn_id, rd_block *b, size_t len);
/* The same with a copy of payload. */
void rd_session_send_msg(rd_session *s, int type, int64_t conn_id, const void *payload,
                         size_t len);
/* Whether sends still go out (not ended, not doomed). */
int rd_session_can_send(const rd_session *s);
/* Shortens the tick so an idle timeout of idle_ms is enforced in time. */
void rd_session_retune_tick(rd_session *s, uint64_t idle_ms);
/* Queues c (which holds a reference for it) to end at the next reap. */
void rd_session_reap_later(rd_session *s, rd_conn *c);

/* ---- connections, for their session ---- */

/* Registers a new connection (counted added). NULL when the session is at
 * max_connections or out of memory. */
rd_conn *rd_conn_new(rd_session *s, int64_t id, const char *proto, size_t proto_len,
                     const char *address, size_t address_len);
rd_conn *rd_conn_find(rd_session *s, int64_t id);
/* DATA from the far side; the bytes are copied if they must wait. */
void rd_conn_on_data(rd_conn *c, const uint8_t *data, size_t len);
/* ERROR from the far side (text "EOF" is a clean end). */
void rd_conn_on_error(rd_conn *c, const char *text, size_t len);
/* PAUSE (1) or RESUME (0) from the far side. */
void rd_conn_on_pause(rd_conn *c, int paused);
/* Starts or stops reading the local end as the session's queue allows. */
void rd_conn_update_reading(rd_conn *c);
/* The one place a connection ends (see rd_conn.c). Idempotent. */
void rd_conn_end(rd_conn *c, const char *err, int send_error);
/* The session's tick: idle timeout and a paused local end's hang-up. */
void rd_conn_tick(rd_conn *c, uint64_t now);
/* Ends a connection queued by rd_session_reap_later, dropping its reference. */
void rd_conn_reap(rd_conn *c);
/* The next queued connection after c (reap list link). */
rd_conn **rd_conn_reap_link(rd_conn *c);
/* Publishes the connection's end to status (the reference passes). */
void rd_conn_set_status(rd_conn *c, rd_dial_status *status);
/* Milliseconds since the connection was created. */
uint64_t rd_conn_age_ms(const rd_conn *c);
void rd_conn_fill_info(const rd_conn *c, rd_conn_info *info);

#endif
