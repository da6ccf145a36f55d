/* The data trace: a record of each tunnel message a traced session sends
 * or receives (data_trace), for Python to log. The loop thread writes into a
 * fixed ring and never waits for the reader: when the ring is full the
 * record is dropped and counted, so a reader that cannot keep up costs
 * records, never the loop's time or unbounded memory. One reader takes
 * them in batches (rd_trace_take). */
#ifndef RD_TRACE_H
#define RD_TRACE_H

#include "rd_common.h"

enum { RD_TRACE_RECV = 0, RD_TRACE_SEND = 1 };

/* Records the ring holds; past them records are dropped. */
#define RD_TRACE_CAPACITY 4096
/* Payload bytes kept: DATA's first RD_TRACE_DATA_HEAD, other types' text
 * (CONNECT's address, ERROR's text) up to RD_TRACE_HEAD. */
#define RD_TRACE_HEAD 128
#define RD_TRACE_DATA_HEAD 64
#define RD_TRACE_KEY 64

typedef struct rd_trace_rec {
  int64_t session; /* the session's key (rd_session_key) */
  int64_t msg_id;
  int64_t conn_id;
  int64_t type;   /* RD_MSG_* (any value a peer sent) */
  uint64_t len;   /* the whole payload's length */
  uint8_t dir;    /* RD_TRACE_RECV or RD_TRACE_SEND */
  uint8_t role;   /* the session's RD_ROLE_* */
  uint16_t head_len;
  char key[RD_TRACE_KEY]; /* the session's client key, cut to fit */
  uint8_t head[RD_TRACE_HEAD];
} rd_trace_rec;

/* Loop thread: records one message (payload[0..len) unmasked). */
void rd_trace_msg(int dir, int role, const char *key, int64_t session, int64_t msg_id,
                  int64_t conn_id, int64_t type, const uint8_t *payload, size_t len);

/* The one reader (any thread but the loop's): waits up to timeout_ms for
 * records and copies up to max of them into out, oldest first. Returns how
 * many; *dropped gets the records dropped since the last call. */
size_t rd_trace_take(rd_trace_rec *out, size_t max, int64_t timeout_ms, uint64_t *dropped);

#endif
