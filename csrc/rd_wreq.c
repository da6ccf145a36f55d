#include "rd_wreq.h"

#include "rd_alloc.h"

/* Enough idle requests for a busy loop's turn; past it they are freed. */
enum { WREQ_KEEP = 1024 };

static rd_wreq *free_list;
static int free_count;

rd_wreq *rd_wreq_get(void) {
  rd_wreq *w = free_list;
  if (w == NULL)
    return rd_malloc(sizeof *w);
  free_list = w->next_free;
  free_count--;
  return w;
}

void rd_wreq_put(rd_wreq *w) {
  if (free_count >= WREQ_KEEP) {
    rd_free(w);
    return;
  }
  w->next_free = free_list;
  free_list = w;
  free_count++;
}

void rd_wreq_trim(void) {
  while (free_list != NULL) {
    rd_wreq *w = free_list;
    free_list = w->next_free;
    rd_free(w);
  }
  free_count = 0;
}
