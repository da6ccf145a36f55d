/* An intrusive chained hash table keyed by a 64-bit hash. Nodes live inside
 * their owners; the table only links them. Callers resolve hash collisions
 * (string keys) by walking rd_map_find/rd_map_next_same. No locking. */
#ifndef RD_MAP_H
#define RD_MAP_H

#include "rd_common.h"

typedef struct rd_map_node {
  struct rd_map_node *next;
  uint64_t hash;
} rd_map_node;

typedef struct rd_map {
  rd_map_node **buckets;
  size_t nbuckets; /* a power of two, or 0 before the first insert */
  size_t count;
  int walking; /* foreach calls in progress: no shrinking under them */
} rd_map;

void rd_map_init(rd_map *m);
/* Frees the bucket array; the nodes belong to their owners. */
void rd_map_dispose(rd_map *m);
/* Links node under hash. Returns RD_OK or RD_ENOMEM (node not linked). */
int rd_map_insert(rd_map *m, rd_map_node *node, uint64_t hash);
/* Unlinks node (which must be linked); a mostly empty table shrinks. */
void rd_map_remove(rd_map *m, rd_map_node *node);
/* First node with this hash, or NULL; rd_map_next_same continues the walk. */
rd_map_node *rd_map_find(const rd_map *m, uint64_t hash);
rd_map_node *rd_map_next_same(const rd_map_node *node);
/* Calls fn for every node; fn may remove the node it is given. */
void rd_map_foreach(rd_map *m, void (*fn)(rd_map_node *node, void *ctx), void *ctx);

/* Hashes for keys. */
uint64_t rd_hash_u64(uint64_t x);
uint64_t rd_hash_str(const char *s, size_t len);

#endif
