/* A growing text buffer for rendering HTTP bodies (JSON, mostly): appends
 * never fail loudly, a failed allocation is remembered and the caller
 * checks `failed` once at the end. Memory through rd_alloc; the caller
 * rd_frees p. */
#ifndef RD_TEXTBUF_H
#define RD_TEXTBUF_H

#include <stddef.h>

typedef struct textbuf {
  char *p;
  size_t len, cap;
  int failed;
} textbuf;

void rd_tb_put(textbuf *b, const char *s, size_t n);
void rd_tb_printf(textbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* s as a JSON string, quoted and escaped. */
void rd_tb_json_str(textbuf *b, const char *s);

#endif
