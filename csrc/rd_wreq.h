/* Write requests for session frames and local writes, from a free list: one
 * per write that the socket did not take at once. Loop thread only. */
#ifndef RD_WREQ_H
#define RD_WREQ_H

#include <uv.h>

#include "rd_block.h"

typedef struct rd_wreq {
  uv_write_t req;
  struct rd_wreq *next_free;
  rd_block *block; /* the bytes being written; the request holds a reference */
  void *owner;     /* the session or connection that wrote */
  size_t len;      /* bytes queued by this request */
  size_t charge;   /* memory it counts against its owner's limits */
} rd_wreq;

/* A request (uninitialised fields) or NULL when out of memory. */
rd_wreq *rd_wreq_get(void);
/* Returns a request to the free list (its block is the caller's to drop). */
void rd_wreq_put(rd_wreq *w);
/* Frees the idle requests kept for reuse. */
void rd_wreq_trim(void);

#endif
