/* A tunneled connection: one id on one session, and the local end its bytes
 * go to and come from. Its state machine (connecting, open, ended) lives in
 * rd_conn.c; the session that carries it only parses and frames. The local
 * end is any of: a libuv stream (plain or TLS, as rd_io), a raw descriptor,
 * or another connection on another session (a splice: what one far side
 * sends, the other's far side receives). Loop thread only. */
#ifndef RD_CONN_H
#define RD_CONN_H

#include <stdatomic.h>

#include "rd_common.h"
#include "rd_io.h"

typedef struct rd_session rd_session;
typedef struct rd_conn rd_conn;

/* Shared between a dialed connection and the Python socket that stands for
 * it: whether it is open and the far side's error text. */
typedef struct rd_dial_status {
  _Atomic int refs;
  _Atomic int ended;
  char error[128]; /* written before `ended` is set */
} rd_dial_status;
rd_dial_status *rd_dial_status_new(void);
void rd_dial_status_unref(rd_dial_status *st);

/* Local ends. Each takes a connection that has none yet (a fresh one from
 * rd_session_open, or one an owner's on_connect accepted) and returns RD_OK;
 * RD_EINVAL when a connection already has a local end (or, for a splice,
 * both are on one session), leaving the connections as they were; or
 * another error code after which the connection has ended with it
 * (RD_ECLOSED: it had ended already). */
/* A connected stream; ownership passes to the connection, also on failure. */
int rd_conn_attach_io(rd_conn *c, rd_io *io);
/* A connected socket descriptor (TCP or unix stream; or a datagram socket,
 * UDP or unix SOCK_SEQPACKET, carried one record per DATA message); the
 * connection owns it from here, also on failure (then it is closed). */
int rd_conn_attach_fd(rd_conn *c, int fd);
/* Joins two connections on different sessions: each one's far side talks to
 * the other's. Backpressure crosses over (a PAUSE on one pauses the other's
 * far side) and so does the end (with its error text). */
int rd_conn_splice(rd_conn *a, rd_conn *b);

/* From an owner's on_connect: dial the connection's address locally. */
void rd_conn_dial_local(rd_conn *c);
/* From an owner's on_connect: refuse with ERROR `reason`. */
void rd_conn_refuse(rd_conn *c, const char *reason);
/* Ends the connection now, telling the far side (err NULL: a clean EOF). */
void rd_conn_close(rd_conn *c, const char *err);
/* Sends bytes to the far side as DATA, as if read from the local end. */
void rd_conn_send(rd_conn *c, const uint8_t *data, size_t len);

const char *rd_conn_proto(const rd_conn *c);
const char *rd_conn_address(const rd_conn *c);
int64_t rd_conn_id(const rd_conn *c);
/* Opaque slot for the owner (a pending request, say). */
void **rd_conn_owner_slot(rd_conn *c);

/* Server-side proxy route: when the far side fails before sending any byte,
 * answer the local HTTP client with a 500 and the error text. */
void rd_conn_set_http_errors(rd_conn *c);
/* The proxy route's pool holds the connection idle: connections() says
 * "idle" instead of "open". */
void rd_conn_set_pooled(rd_conn *c, int pooled);
/* Ends the connection after timeout_ms (0 = never). */
int rd_conn_set_deadline(rd_conn *c, uint64_t timeout_ms);
/* Ends a connection still without a local end after timeout_ms (0 = never)
 * with Go's dial timeout text, "dial tcp ADDRESS: i/o timeout": for a local
 * end that comes from elsewhere (an owner's own dialer). */
int rd_conn_set_dial_deadline(rd_conn *c, uint64_t timeout_ms);
/* Ends the connection once no byte moved either way for timeout_ms
 * (0 = the session's idle_timeout_ms, or udp_idle_timeout_ms for udp). */
void rd_conn_set_idle_timeout(rd_conn *c, uint64_t timeout_ms);

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
  size_t buffered; /* memory held toward the local end */
} rd_conn_info;
typedef void (*rd_conn_info_cb)(void *ctx, const rd_conn_info *info);

#endif
