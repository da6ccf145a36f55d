#include "rd_map.h"

#include "rd_alloc.h"

#define MIN_BUCKETS 16

void rd_map_init(rd_map *m) {
  m->buckets = NULL;
  m->nbuckets = 0;
  m->count = 0;
  m->walking = 0;
}

void rd_map_dispose(rd_map *m) {
  rd_free(m->buckets);
  rd_map_init(m);
}

/* Rehashes into n buckets (a power of two). RD_OK or RD_ENOMEM (unchanged). */
static int resize(rd_map *m, size_t n) {
  rd_map_node **b = rd_calloc(n, sizeof *b);
  if (b == NULL)
    return RD_ENOMEM;
  for (size_t i = 0; i < m->nbuckets; i++) {
    rd_map_node *node = m->buckets[i];
    while (node != NULL) {
      rd_map_node *next = node->next;
      size_t j = node->hash & (n - 1);
      node->next = b[j];
      b[j] = node;
      node = next;
    }
  }
  rd_free(m->buckets);
  m->buckets = b;
  m->nbuckets = n;
  return RD_OK;
}

static int grow(rd_map *m) { return resize(m, m->nbuckets ? m->nbuckets * 2 : MIN_BUCKETS); }

/* After a spike the table gives its memory back: below load 1/8 it shrinks
 * by fours to a load between 1/8 and 1/2, so the next inserts do not grow it
 * again at once. Not while a foreach walks it; a failed shrink leaves the
 * table as it was. */
static void maybe_shrink(rd_map *m) {
  if (m->walking > 0)
    return;
  size_t n = m->nbuckets;
  while (n > MIN_BUCKETS && m->count < n / 8)
    n /= 4;
  if (n < m->nbuckets)
    (void)resize(m, n < MIN_BUCKETS ? MIN_BUCKETS : n);
}

int rd_map_insert(rd_map *m, rd_map_node *node, uint64_t hash) {
  /* Grow at load factor 1; a failed grow is fatal only for an empty table. */
  if (m->count >= m->nbuckets && grow(m) != RD_OK && m->nbuckets == 0)
    return RD_ENOMEM;
  size_t i = hash & (m->nbuckets - 1);
  node->hash = hash;
  node->next = m->buckets[i];
  m->buckets[i] = node;
  m->count++;
  return RD_OK;
}

void rd_map_remove(rd_map *m, rd_map_node *node) {
  rd_map_node **p = &m->buckets[node->hash & (m->nbuckets - 1)];
  while (*p != NULL && *p != node)
    p = &(*p)->next;
  if (*p == node) {
    *p = node->next;
    node->next = NULL;
    m->count--;
    maybe_shrink(m);
  }
}

rd_map_node *rd_map_find(const rd_map *m, uint64_t hash) {
  if (m->nbuckets == 0)
    return NULL;
  rd_map_node *node = m->buckets[hash & (m->nbuckets - 1)];
  while (node != NULL && node->hash != hash)
    node = node->next;
  return node;
}

rd_map_node *rd_map_next_same(const rd_map_node *node) {
  rd_map_node *n = node->next;
  while (n != NULL && n->hash != node->hash)
    n = n->next;
  return n;
}

void rd_map_foreach(rd_map *m, void (*fn)(rd_map_node *node, void *ctx), void *ctx) {
  m->walking++;
  for (size_t i = 0; i < m->nbuckets; i++) {
    rd_map_node *node = m->buckets[i];
    while (node != NULL) {
      rd_map_node *next = node->next;
      fn(node, ctx);
      node = next;
    }
  }
  m->walking--;
  maybe_shrink(m);
}

uint64_t rd_hash_u64(uint64_t x) {
  /* splitmix64 finalizer: ids are sequential, so mix them. */
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

uint64_t rd_hash_str(const char *s, size_t len) {
  uint64_t h = 1469598103934665603ULL; /* FNV-1a */
  for (size_t i = 0; i < len; i++) {
    h ^= (unsigned char)s[i];
    h *= 1099511628211ULL;
  }
  return rd_hash_u64(h);
}
