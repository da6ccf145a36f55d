#include "rd_block.h"

#include <stdatomic.h>

#include "rd_alloc.h"

/* Two pooled sizes: local reads (one DATA message each) and session reads
 * (several WebSocket frames each, so a full DATA frame always fits and the
 * partial frame at a block's end is the only copy). Idle blocks kept per
 * class; beyond that, released blocks are freed so a burst does not keep
 * its peak memory. */
static const size_t class_size[2] = {RD_BLOCK_SIZE, RD_BLOCK_BIG};
static const int class_keep[2] = {8, 4};

static rd_block *pool_head[2];
static int pool_count[2];
static _Atomic int64_t pool_bytes;
static int64_t in_use;

static int class_of(size_t payload) {
  return payload <= RD_BLOCK_SIZE ? 0 : payload <= RD_BLOCK_BIG ? 1 : -1;
}

rd_block *rd_block_get(size_t payload) {
  int k = class_of(payload);
  rd_block *b;
  if (k >= 0 && pool_head[k] != NULL) {
    b = pool_head[k];
    pool_head[k] = b->next_free;
    pool_count[k]--;
    atomic_fetch_sub(&pool_bytes, (int64_t)(sizeof *b + b->cap));
  } else {
    size_t cap = RD_BLOCK_HEADROOM + (k >= 0 ? class_size[k] : payload);
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
  if (b == NULL || --b->refs > 0)
    return;
  in_use--;
  for (int k = 0; k < 2; k++) {
    if (b->cap == RD_BLOCK_HEADROOM + class_size[k] && pool_count[k] < class_keep[k]) {
      b->next_free = pool_head[k];
      pool_head[k] = b;
      pool_count[k]++;
      atomic_fetch_add(&pool_bytes, (int64_t)(sizeof *b + b->cap));
      return;
    }
  }
  rd_free(b);
}

void rd_block_pool_trim(void) {
  for (int k = 0; k < 2; k++) {
    while (pool_head[k] != NULL) {
      rd_block *b = pool_head[k];
      pool_head[k] = b->next_free;
      rd_free(b);
    }
    pool_count[k] = 0;
  }
  atomic_store(&pool_bytes, 0);
}

int64_t rd_block_pool_bytes(void) { return atomic_load(&pool_bytes); }

int64_t rd_block_in_use(void) { return in_use; }
