/* Reference-counted I/O blocks from a free list. A block is one read's worth
 * of bytes with headroom in front, so a DATA message's WebSocket and tunnel
 * headers can be written in place before the payload and the whole frame
 * leaves in one write: no copy on the local -> tunnel path. On the tunnel ->
 * local path, a payload is written from the session's read block; what the
 * local socket does not take at once is copied into a block of its own, so
 * no waiting byte pins a read block. Loop thread only. */
#ifndef RD_BLOCK_H
#define RD_BLOCK_H

#include <stddef.h>

#include "rd_common.h"

/* Room before the payload: WebSocket header (14) + tunnel header (40). */
#define RD_BLOCK_HEADROOM 64
/* Payload capacity of a pooled block for one local read (one DATA message).
 * Large reads mean fewer syscalls and frames: bulk transfers are bound by the
 * kernel's per-write work. */
#define RD_BLOCK_SIZE (256 * 1024)
/* Payload capacity of a pooled session read block: room for several full
 * DATA frames. A session holds one only while its socket has bytes or a
 * partial frame waits for the rest; an idle session holds none. */
#define RD_BLOCK_BIG (1024 * 1024)

typedef struct rd_block {
  struct rd_block *next_free;
  uint32_t refs;
  size_t cap;      /* bytes at data[] */
  uint8_t data[];  /* RD_BLOCK_HEADROOM + payload */
} rd_block;

/* A block with room for at least `payload` bytes after the headroom, with one
 * reference. Pooled (sized RD_BLOCK_SIZE or RD_BLOCK_BIG) when payload fits
 * one of those, else allocated exactly.
 * Returns NULL on allocation failure. */
rd_block *rd_block_get(size_t payload);
/* A block sized exactly for `payload` bytes (small control messages), never
 * pooled. Returns NULL on allocation failure. */
rd_block *rd_block_get_small(size_t payload);
void rd_block_ref(rd_block *b);
/* Drops a reference (NULL: nothing); the last one returns the block to the
 * pool or frees it. */
void rd_block_unref(rd_block *b);
/* Payload start (after headroom) and capacity. */
static inline uint8_t *rd_block_payload(rd_block *b) { return b->data + RD_BLOCK_HEADROOM; }
static inline size_t rd_block_payload_cap(const rd_block *b) { return b->cap - RD_BLOCK_HEADROOM; }
/* The block whose payload starts at base (a buffer handed out for a read). */
static inline rd_block *rd_block_of_payload(const char *base) {
  return (rd_block *)(base - RD_BLOCK_HEADROOM - offsetof(rd_block, data));
}
/* Frees every pooled block (at engine shutdown, and to return memory). */
void rd_block_pool_trim(void);
/* Blocks in use (handed out and not yet released). */
int64_t rd_block_in_use(void);
/* Bytes held idle in the pool (read from any thread; approximate). */
int64_t rd_block_pool_bytes(void);

#endif
