/* Two connected streams joined: what one reads, the other writes. Reading a
 * side stops while the other side's write queue is over a mark
 * (backpressure). An EOF read on one side shuts the other's write side down
 * once what is queued for it is written; the join ends when both directions
 * have ended that way, or at once on any error (both streams closed). Used
 * by the remote forward (rd_stream_forward.c). Loop thread only. */
#ifndef RD_JOIN_H
#define RD_JOIN_H

#include "rd_io.h"

typedef struct rd_join rd_join;

/* Called once, after both streams have closed and before the join is freed;
 * err is NULL for a clean end (EOF both ways), else what failed. */
typedef void (*rd_join_end_cb)(void *ctx, const char *err);

/* Takes ownership of a and b (connected, not reading; their data pointers
 * become the join's) and writes to_a[0..len) (copied) to a before anything
 * else. Returns the join, or NULL when out of memory (both streams are then
 * closed and cb is never called). */
rd_join *rd_join_start(rd_io *a, rd_io *b, const void *to_a, size_t len, rd_join_end_cb cb,
                       void *ctx);

/* Ends the join now: both streams close (queued writes are dropped); cb
 * still runs once they have. Idempotent. */
void rd_join_close(rd_join *j);

#endif
