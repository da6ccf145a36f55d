/* The data trace's ring: one writer (the loop thread), one reader.
 *
 * Lock-free between the two: the writer fills the slot at `tail` and then
 * publishes it, the reader copies slots up to `tail` and then frees them by
 * moving `head`. The lock and condition only put a reader with nothing to
 * read to sleep; the writer takes the lock only to wake a sleeping reader,
 * which holds it for no more than a check. The ring is static: a trace that
 * is never turned on costs no memory, and one that is costs this much. */
#include "rd_trace.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <uv.h>

#include "rd_msg.h"

static rd_trace_rec ring[RD_TRACE_CAPACITY];
static atomic_size_t head, tail; /* next to read, next to write */
static atomic_uint_fast64_t dropped;
static atomic_int sleeping;
static uv_once_t once = UV_ONCE_INIT;
static uv_mutex_t lock;
static uv_cond_t cond;

static void locks_init(void) {
  uv_mutex_init(&lock);
  uv_cond_init(&cond);
}

/* A child forked while the reader slept holds no reader: start afresh. */
static void fork_child(void) {
  locks_init();
  atomic_store(&head, 0);
  atomic_store(&tail, 0);
  atomic_store(&dropped, 0);
  atomic_store(&sleeping, 0);
}

static void init_once(void) {
  locks_init();
  pthread_atfork(NULL, NULL, fork_child);
}

void rd_trace_msg(int dir, int role, const char *key, int64_t session, int64_t msg_id,
                  int64_t conn_id, int64_t type, const uint8_t *payload, size_t len) {
  uv_once(&once, init_once);
  size_t t = atomic_load_explicit(&tail, memory_order_relaxed);
  if (t - atomic_load_explicit(&head, memory_order_acquire) >= RD_TRACE_CAPACITY) {
    atomic_fetch_add_explicit(&dropped, 1, memory_order_relaxed);
    return;
  }
  rd_trace_rec *r = &ring[t % RD_TRACE_CAPACITY];
  r->session = session;
  r->msg_id = msg_id;
  r->conn_id = conn_id;
  r->type = type;
  r->len = len;
  r->dir = (uint8_t)dir;
  r->role = (uint8_t)role;
  size_t keep = type == RD_MSG_DATA ? RD_TRACE_DATA_HEAD : RD_TRACE_HEAD;
  if (type == RD_MSG_SYNC)
    keep = 0; /* binary ids: the length says how many */
  r->head_len = (uint16_t)(len < keep ? len : keep);
  if (r->head_len > 0)
    memcpy(r->head, payload, r->head_len);
  size_t klen = strnlen(key, RD_TRACE_KEY - 1);
  memcpy(r->key, key, klen);
  r->key[klen] = '\0';
  atomic_store(&tail, t + 1); /* publishes the slot (seq_cst: see below) */
  /* Ordered after the store above, as the reader orders its flag before
   * its check of tail: one of the two sees the other. */
  if (atomic_load(&sleeping)) {
    uv_mutex_lock(&lock);
    uv_cond_signal(&cond);
    uv_mutex_unlock(&lock);
  }
}

size_t rd_trace_take(rd_trace_rec *out, size_t max, int64_t timeout_ms, uint64_t *lost) {
  uv_once(&once, init_once);
  size_t h = atomic_load_explicit(&head, memory_order_relaxed);
  if (atomic_load(&tail) == h && timeout_ms > 0) {
    uint64_t deadline = uv_hrtime() + (uint64_t)timeout_ms * 1000000u;
    uv_mutex_lock(&lock);
    atomic_store(&sleeping, 1);
    while (atomic_load(&tail) == h) {
      uint64_t now = uv_hrtime();
      if (now >= deadline || uv_cond_timedwait(&cond, &lock, deadline - now) != 0)
        break;
    }
    atomic_store(&sleeping, 0);
    uv_mutex_unlock(&lock);
  }
  size_t t = atomic_load_explicit(&tail, memory_order_acquire);
  size_t n = t - h < max ? t - h : max;
  for (size_t i = 0; i < n; i++)
    out[i] = ring[(h + i) % RD_TRACE_CAPACITY];
  atomic_store_explicit(&head, h + n, memory_order_release); /* the slots are free again */
  *lost = atomic_exchange_explicit(&dropped, 0, memory_order_relaxed);
  return n;
}
