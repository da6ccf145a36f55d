/* The intrusive hash table: lookups with colliding hashes, removal during a
 * walk, and memory given back after a spike. */
#include <stdint.h>
#include <stdlib.h>

#include "rd_alloc.h"
#include "rd_map.h"
#include "rd_test.h"

typedef struct {
  rd_map_node node;
  uint64_t key;
} item;

#define SPIKE 10000

static item items[SPIKE];

static void fill(rd_map *m, size_t from, size_t to) {
  for (size_t i = from; i < to; i++) {
    items[i].key = i;
    CHECK_EQ_INT(rd_map_insert(m, &items[i].node, rd_hash_u64(i)), RD_OK);
  }
}

static item *find(rd_map *m, uint64_t key) {
  for (rd_map_node *n = rd_map_find(m, rd_hash_u64(key)); n != NULL; n = rd_map_next_same(n))
    if (((item *)n)->key == key)
      return (item *)n;
  return NULL;
}

TEST(insert_find_remove) {
  rd_map m;
  rd_map_init(&m);
  fill(&m, 0, 100);
  CHECK_EQ_INT(m.count, 100);
  for (uint64_t k = 0; k < 100; k++)
    CHECK(find(&m, k) == &items[k]);
  CHECK(find(&m, 100) == NULL);
  rd_map_remove(&m, &items[42].node);
  CHECK(find(&m, 42) == NULL);
  CHECK(find(&m, 43) == &items[43]);
  rd_map_dispose(&m);
}

TEST(colliding_hashes) {
  rd_map m;
  rd_map_init(&m);
  item a = {.key = 1}, b = {.key = 2};
  CHECK_EQ_INT(rd_map_insert(&m, &a.node, 7), RD_OK);
  CHECK_EQ_INT(rd_map_insert(&m, &b.node, 7), RD_OK);
  int seen = 0;
  for (rd_map_node *n = rd_map_find(&m, 7); n != NULL; n = rd_map_next_same(n))
    seen++;
  CHECK_EQ_INT(seen, 2);
  rd_map_dispose(&m);
}

TEST(shrinks_after_a_spike) {
  int64_t heap0 = rd_alloc_bytes();
  rd_map m;
  rd_map_init(&m);
  fill(&m, 0, 16);
  size_t small = m.nbuckets;
  int64_t heap_small = rd_alloc_bytes();
  fill(&m, 16, SPIKE);
  CHECK(m.nbuckets >= SPIKE);
  for (size_t i = 16; i < SPIKE; i++)
    rd_map_remove(&m, &items[i].node);
  CHECK_EQ_INT(m.count, 16);
  CHECK(m.nbuckets <= 4 * small);
  CHECK(rd_alloc_bytes() - heap_small <= (int64_t)(3 * small * sizeof(void *)));
  for (uint64_t k = 0; k < 16; k++)
    CHECK(find(&m, k) == &items[k]);
  rd_map_dispose(&m);
  CHECK_EQ_INT(rd_alloc_bytes(), heap0);
}

static void remove_cb(rd_map_node *n, void *ctx) {
  rd_map_remove(ctx, n);
  (*(int *)((char *)ctx + sizeof(rd_map)))++;
}

TEST(remove_every_node_during_a_walk) {
  struct {
    rd_map m;
    int visited;
  } w = {.visited = 0};
  rd_map_init(&w.m);
  fill(&w.m, 0, SPIKE);
  rd_map_foreach(&w.m, remove_cb, &w);
  CHECK_EQ_INT(w.visited, SPIKE);
  CHECK_EQ_INT(w.m.count, 0);
  CHECK(w.m.nbuckets <= 16); /* shrunk once the walk was over */
  rd_map_dispose(&w.m);
}

RD_TEST_MAIN(T(insert_find_remove), T(colliding_hashes), T(shrinks_after_a_spike),
             T(remove_every_node_during_a_walk))
