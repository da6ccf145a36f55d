#include "rd_textbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"

void rd_tb_put(textbuf *b, const char *s, size_t n) {
  if (b->failed)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *p = rd_realloc(b->p, cap);
    if (p == NULL) {
      b->failed = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

void rd_tb_printf(textbuf *b, const char *fmt, ...) {
  char tmp[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0)
    rd_tb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

void rd_tb_json_str(textbuf *b, const char *s) {
  rd_tb_put(b, "\"", 1);
  for (; *s != '\0'; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      rd_tb_printf(b, "\\%c", ch);
    else if (ch < 0x20)
      rd_tb_printf(b, "\\u%04x", ch);
    else
      rd_tb_put(b, (const char *)&ch, 1);
  }
  rd_tb_put(b, "\"", 1);
}
