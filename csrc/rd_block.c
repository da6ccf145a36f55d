#include "rd_block.h"

#include <stdatomic.h>

#include "rd_alloc.h"

/* Idle blocks kept for reuse; beyond this, released blocks are freed so a
 * burst does not keep its peak memory. */
#define RD_POOL_KEEP 64

static rd_block *pool_head;
static int pool_count;
static _Atomic int64_t pool_bytes;
static int64_t in_use;

rd_block *rd_block_get(size_t payload) {
  rd_block *b;
  if (payload <= RD_BLOCK_SIZE && pool_head != NULL) {
    b = pool_head;
    pool_head = b->next_free;
    pool_count--;
    atomic_fetch_sub(&pool_bytes, (int64_t)(sizeof *b + b->cap));
  } else {
    size_t cap = RD_BLOCK_HEADROOM + (payload <= RD_BLOCK_SIZE ? RD_BLOCK_SIZE : payload);
    b = rd_malloc(sizeof *b + cap);
    if (b == NULL)
      return NULL;
    b->cap = cap;
  }
  b->next_free = NULL;
  b->refs = 1;
  in_use++;
  return b;
}

rd_block *rd_block_get_small(size_t payload) {
  rd_block *b = rd_malloc(sizeof *b + RD_BLOCK_HEADROOM + payload);
  if (b == NULL)
    return NULL;
  b->cap = RD_BLOCK_HEADROOM + payload;
  b->next_free = NULL;
  b->refs = 1;
  in_use++;
  return b;
}

void rd_block_ref(rd_block *b) { b->refs++; }

void rd_block_unref(rd_block *b) {
  if (--b->refs > 0)
    return;
  in_use--;
  if (b->cap == RD_BLOCK_HEADROOM + RD_BLOCK_SIZE && pool_count < RD_POOL_KEEP) {
    b->next_free = pool_head;
    pool_head = b;
    pool_count++;
    atomic_fetch_add(&pool_bytes, (int64_t)(sizeof *b + b->cap));
    return;
  }
  rd_free(b);
}

void rd_block_pool_trim(void) {
  while (pool_head != NULL) {
    rd_block *b = pool_head;
    pool_head = b->next_free;
    rd_free(b);
  }
  pool_count = 0;
  atomic_store(&pool_bytes, 0);
}

int64_t rd_block_pool_bytes(void) { return atomic_load(&pool_bytes); }

int64_t rd_block_in_use(void) { return in_use; }
