/* Counting allocator: a 16-byte header before each block records its size. */
#include "rd_alloc.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define RD_ALLOC_HEADER 16 /* keeps max_align_t alignment for the payload */

static _Atomic int64_t alloc_bytes;
static _Atomic int64_t alloc_objects;
static _Atomic int64_t fail_countdown = -1;

static int should_fail(void) {
  int64_t c = atomic_load(&fail_countdown);
  while (c >= 0) {
    if (atomic_compare_exchange_weak(&fail_countdown, &c, c - 1))
      return c == 0;
  }
  return 0;
}

void *rd_malloc(size_t n) {
  if (n > SIZE_MAX - RD_ALLOC_HEADER || should_fail())
    return NULL;
  unsigned char *p = malloc(n + RD_ALLOC_HEADER);
  if (p == NULL)
    return NULL;
  memcpy(p, &n, sizeof n);
  atomic_fetch_add(&alloc_bytes, (int64_t)n);
  atomic_fetch_add(&alloc_objects, 1);
  return p + RD_ALLOC_HEADER;
}

void *rd_calloc(size_t count, size_t n) {
  if (n != 0 && count > SIZE_MAX / n)
    return NULL;
  void *p = rd_malloc(count * n);
  if (p != NULL)
    memset(p, 0, count * n);
  return p;
}

void *rd_realloc(void *p, size_t n) {
  if (p == NULL)
    return rd_malloc(n);
  if (n > SIZE_MAX - RD_ALLOC_HEADER || should_fail())
    return NULL;
  unsigned char *base = (unsigned char *)p - RD_ALLOC_HEADER;
  size_t old;
  memcpy(&old, base, sizeof old);
  unsigned char *nb = realloc(base, n + RD_ALLOC_HEADER);
  if (nb == NULL)
    return NULL;
  memcpy(nb, &n, sizeof n);
  atomic_fetch_add(&alloc_bytes, (int64_t)n - (int64_t)old);
  return nb + RD_ALLOC_HEADER;
}

void rd_free(void *p) {
  if (p == NULL)
    return;
  unsigned char *base = (unsigned char *)p - RD_ALLOC_HEADER;
  size_t n;
  memcpy(&n, base, sizeof n);
  atomic_fetch_sub(&alloc_bytes, (int64_t)n);
  atomic_fetch_sub(&alloc_objects, 1);
  free(base);
}

char *rd_strndup(const char *s, size_t len) {
  char *d = rd_malloc(len + 1);
  if (d != NULL) {
    memcpy(d, s, len);
    d[len] = '\0';
  }
  return d;
}

int64_t rd_alloc_bytes(void) { return atomic_load(&alloc_bytes); }
int64_t rd_alloc_objects(void) { return atomic_load(&alloc_objects); }
void rd_alloc_fail_nth(int64_t n) { atomic_store(&fail_countdown, n); }
