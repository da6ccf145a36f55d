/* The one allocator every engine allocation goes through. It counts bytes and
 * objects in use (the engine's heap gauge) and can be told to fail, so tests
 * can walk every allocation failure path. Thread-safe (atomic counters). */
#ifndef RD_ALLOC_H
#define RD_ALLOC_H

#include <stddef.h>
#include <stdint.h>

/* malloc/calloc/realloc/free with accounting. Sizes are the caller's request;
 * rd_free(NULL) is a no-op. Return NULL on failure (real or injected). */
void *rd_malloc(size_t n);
void *rd_calloc(size_t count, size_t n);
void *rd_realloc(void *p, size_t n);
void rd_free(void *p);
/* Copies s (len bytes) into a new NUL-terminated rd_malloc block. */
char *rd_strndup(const char *s, size_t len);

/* Bytes and objects currently allocated through rd_malloc and friends. */
int64_t rd_alloc_bytes(void);
int64_t rd_alloc_objects(void);

/* Test hook: the n-th allocation from now (0 = the next one) fails, and every
 * one after it succeeds again. Pass -1 to disarm. */
void rd_alloc_fail_nth(int64_t n);

#endif
