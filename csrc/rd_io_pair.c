/* The pair's two ends share one block with the loop handles that run their
 * work. Each end keeps its own writes as a ring of segments (one per
 * buffer, the request on a write's last), oldest first: the first `done`
 * have been read by the other end and wait for their callback, the rest
 * wait for the other end to read them, `off` bytes into the first. A read
 * copies from the ring straight into the reader's buffer. */
#include "rd_io_pair.h"

#include <assert.h>
#include <string.h>

#include "rd_alloc.h"

/* Buffers one end reads per run, as libuv reads a socket at most 32 times
 * per wake-up, and rounds of work per run: two ends that keep answering
 * each other cannot starve the loop (what is left runs on its next turn). */
#define READS_PER_RUN 32
#define STEPS_PER_RUN 16
/* What a read asks of the reader's alloc callback, as libuv does. */
#define READ_SUGGESTED 65536
/* A ring grown past this many segments is freed once empty, so a burst
 * does not keep its memory for the life of the pair. */
#define RING_KEEP 64

typedef struct seg {
  char *base;
  size_t len;
  uv_write_t *req; /* on a write's last segment, else NULL */
  uv_write_cb cb;
} seg;

typedef struct rd_pair rd_pair;

struct rd_pair_end {
  rd_pair *pair;
  rd_pair_end *peer;
  void *ctx;
  rd_pair_alloc_cb alloc_cb;
  rd_pair_read_cb read_cb;
  rd_pair_shutdown_cb shutdown_cb;
  rd_pair_close_cb close_cb;
  seg *ring;      /* this end's writes; cap is 0 or a power of two */
  unsigned cap, head, count;
  unsigned done;  /* segments at the head read by the other end */
  size_t off;     /* bytes of the first unread segment already read */
  size_t queued;  /* bytes written and not read */
  int write_error; /* unread writes fail with it: UV_ECANCELED, UV_EPIPE */
  unsigned reading : 1, shut : 1, shutdown_pending : 1, closing : 1, closed : 1;
};

struct rd_pair {
  rd_pair_end end[2];
  uv_check_t check; /* runs the work, right after the loop's poll */
  uv_idle_t idle;   /* while work waits: that poll does not block */
  int handles;      /* open handles; the pair is freed when none is left */
  unsigned active : 1, freeing : 1;
};

static seg *seg_at(const rd_pair_end *e, unsigned i) {
  return &e->ring[(e->head + i) & (e->cap - 1)];
}

/* ---- when to run ---- */

static int end_has_work(const rd_pair_end *e) {
  if (e->closed)
    return 0;
  if (e->closing || e->done > 0 || (e->write_error != 0 && e->count > 0) ||
      (e->shutdown_pending && e->count == 0))
    return 1;
  const rd_pair_end *w = e->peer;
  return e->reading && (w->queued > 0 || w->shut || w->closing);
}

static int pair_has_work(const rd_pair *p) {
  return end_has_work(&p->end[0]) || end_has_work(&p->end[1]);
}

static void pair_run(rd_pair *p);

static void check_cb(uv_check_t *h) { pair_run(h->data); }
/* Its being active is what counts: the loop's poll does not block. */
static void idle_cb(uv_idle_t *h) { (void)h; }

/* Starts the handles when there is work. Never while they close: then the
 * loop is going away with the pair's owners (rd_loop closes stragglers). */
static void pair_schedule(rd_pair *p) {
  if (p->active || p->freeing || uv_is_closing((uv_handle_t *)&p->check) ||
      !pair_has_work(p))
    return;
  p->active = 1;
  uv_check_start(&p->check, check_cb);
  uv_idle_start(&p->idle, idle_cb);
}

static void handle_closed_cb(uv_handle_t *h) {
  rd_pair *p = h->data;
  if (--p->handles == 0)
    rd_free(p);
}

/* After a run: the handles stop when nothing is left to do, and close when
 * both ends have closed (the pair is freed with the last). */
static void pair_settle(rd_pair *p) {
  if (p->end[0].closed && p->end[1].closed) {
    if (!p->freeing) {
      p->freeing = 1;
      if (!uv_is_closing((uv_handle_t *)&p->check)) {
        uv_close((uv_handle_t *)&p->check, handle_closed_cb);
        uv_close((uv_handle_t *)&p->idle, handle_closed_cb);
      }
    }
    return;
  }
  if (p->active && !pair_has_work(p)) {
    p->active = 0;
    uv_check_stop(&p->check);
    uv_idle_stop(&p->idle);
  }
}

/* ---- the work ---- */

/* Zero-length writes next in line count as read. */
static void pass_empty(rd_pair_end *w) {
  while (w->done < w->count && seg_at(w, w->done)->len == 0)
    w->done++;
}

/* Copies up to cap unread bytes of w's writes into dst; returns how many. */
static size_t copy_out(rd_pair_end *w, char *dst, size_t cap) {
  size_t n = 0;
  while (n < cap && w->done < w->count) {
    const seg *s = seg_at(w, w->done);
    size_t take = s->len - w->off;
    if (take > cap - n)
      take = cap - n;
    if (take > 0) /* a zero-length write has no base */
      memcpy(dst + n, s->base + w->off, take);
    n += take;
    w->off += take;
    if (w->off == s->len) {
      w->off = 0;
      w->done++;
    }
  }
  assert(n <= w->queued);
  w->queued -= n;
  pass_empty(w);
  return n;
}

/* Hands e what its peer wrote, or its EOF, while *budget lasts. */
static int deliver_reads(rd_pair_end *e, int *budget) {
  rd_pair_end *w = e->peer;
  int moved = 0;
  for (; *budget > 0 && e->reading && !e->closing; --*budget) {
    if (w->queued == 0) {
      if (!w->shut && !w->closing)
        break;
      e->reading = 0; /* as libuv: reading stops at EOF */
      --*budget;
      uv_buf_t none = uv_buf_init(NULL, 0);
      e->read_cb(e->ctx, UV_EOF, &none);
      return 1;
    }
    uv_buf_t buf = uv_buf_init(NULL, 0);
    e->alloc_cb(e->ctx, READ_SUGGESTED, &buf);
    if (buf.base == NULL || buf.len == 0) {
      --*budget;
      e->read_cb(e->ctx, UV_ENOBUFS, &buf);
      return 1;
    }
    size_t n = copy_out(w, buf.base, buf.len);
    e->read_cb(e->ctx, (ssize_t)n, &buf);
    moved = 1;
  }
  return moved;
}

/* Calls back e's writes that were read (0) or failed (write_error). */
static int complete_writes(rd_pair_end *e) {
  int moved = 0;
  while (e->count > 0 && (e->done > 0 || e->write_error != 0)) {
    seg s = *seg_at(e, 0);
    int status = 0;
    if (e->done > 0)
      e->done--;
    else
      status = e->write_error;
    e->head = (e->head + 1) & (e->cap - 1);
    e->count--;
    if (s.req != NULL) {
      s.cb(s.req, status); /* may write again, or close either end */
      moved = 1;
    }
  }
  if (e->count == 0 && e->cap > RING_KEEP) {
    rd_free(e->ring);
    e->ring = NULL;
    e->cap = e->head = 0;
  }
  return moved;
}

static int finish_shutdown(rd_pair_end *e) {
  if (!e->shutdown_pending || e->count > 0)
    return 0;
  e->shutdown_pending = 0;
  rd_pair_shutdown_cb cb = e->shutdown_cb;
  e->shutdown_cb = NULL;
  if (cb != NULL)
    cb(e->ctx, e->closing ? UV_ECANCELED : e->write_error);
  return 1;
}

static int finish_close(rd_pair_end *e) {
  if (!e->closing || e->closed || e->count > 0 || e->shutdown_pending)
    return 0;
  assert(e->done == 0 && e->queued == 0 && !e->reading);
  e->closed = 1;
  rd_free(e->ring);
  e->ring = NULL;
  e->cap = e->head = 0;
  rd_pair_close_cb cb = e->close_cb;
  e->close_cb = NULL;
  if (cb != NULL)
    cb(e->ctx);
  return 1;
}

/* One end's due work, reads first: an end whose peer closed reads the EOF
 * before its own writes fail. */
static int end_step(rd_pair_end *e, int *budget) {
  if (e->closed)
    return 0;
  int moved = deliver_reads(e, budget);
  moved |= complete_writes(e);
  moved |= finish_shutdown(e);
  moved |= finish_close(e);
  return moved;
}

static void pair_run(rd_pair *p) {
  int budget[2] = {READS_PER_RUN, READS_PER_RUN};
  for (int i = 0; i < STEPS_PER_RUN; i++) {
    int moved = end_step(&p->end[0], &budget[0]);
    moved |= end_step(&p->end[1], &budget[1]);
    if (!moved)
      break;
  }
  pair_settle(p);
}

/* ---- the calls ---- */

int rd_pair_new(uv_loop_t *loop, void *ctx_a, void *ctx_b, rd_pair_end **a, rd_pair_end **b) {
  rd_pair *p = rd_calloc(1, sizeof *p);
  if (p == NULL)
    return RD_ENOMEM;
  for (int i = 0; i < 2; i++) {
    p->end[i].pair = p;
    p->end[i].peer = &p->end[!i];
  }
  p->end[0].ctx = ctx_a;
  p->end[1].ctx = ctx_b;
  uv_check_init(loop, &p->check);
  uv_idle_init(loop, &p->idle);
  p->check.data = p->idle.data = p;
  p->handles = 2;
  *a = &p->end[0];
  *b = &p->end[1];
  return RD_OK;
}

int rd_pair_read_start(rd_pair_end *e, rd_pair_alloc_cb alloc_cb, rd_pair_read_cb read_cb) {
  if (e->closing)
    return UV_EINVAL;
  e->alloc_cb = alloc_cb;
  e->read_cb = read_cb;
  e->reading = 1;
  pair_schedule(e->pair);
  return 0;
}

void rd_pair_read_stop(rd_pair_end *e) { e->reading = 0; }

/* Room for n more segments (the ring doubles, oldest first again). */
static int ring_reserve(rd_pair_end *e, unsigned n) {
  if (e->count + n <= e->cap)
    return 0;
  unsigned cap = e->cap != 0 ? e->cap : 8;
  while (cap < e->count + n)
    cap *= 2;
  seg *ring = rd_malloc(cap * sizeof *ring);
  if (ring == NULL)
    return RD_ENOMEM;
  for (unsigned i = 0; i < e->count; i++)
    ring[i] = *seg_at(e, i);
  rd_free(e->ring);
  e->ring = ring;
  e->cap = cap;
  e->head = 0;
  return 0;
}

int rd_pair_write(rd_pair_end *e, uv_write_t *req, const uv_buf_t bufs[], unsigned nbufs,
                  uv_write_cb cb) {
  assert(!e->closed);
  if (e->closing || e->shut)
    return UV_EPIPE;
  if (e->write_error != 0)
    return e->write_error;
  unsigned n = 0;
  for (unsigned i = 0; i < nbufs; i++)
    n += bufs[i].len > 0;
  if (ring_reserve(e, n > 0 ? n : 1) != 0)
    return RD_ENOMEM;
  seg *last = NULL;
  for (unsigned i = 0; i < nbufs; i++) {
    if (bufs[i].len == 0)
      continue;
    last = seg_at(e, e->count++);
    *last = (seg){.base = bufs[i].base, .len = bufs[i].len};
    e->queued += bufs[i].len;
  }
  if (last == NULL) { /* nothing to read: done once the writes before it are */
    last = seg_at(e, e->count++);
    *last = (seg){.base = NULL, .len = 0};
  }
  last->req = req;
  last->cb = cb;
  pass_empty(e);
  pair_schedule(e->pair);
  return 0;
}

ssize_t rd_pair_try_write(const rd_pair_end *e) {
  return e->closing || e->shut || e->write_error != 0 ? UV_EPIPE : 0;
}

size_t rd_pair_queue_size(const rd_pair_end *e) { return e->queued; }

int rd_pair_shutdown(rd_pair_end *e, rd_pair_shutdown_cb cb) {
  if (e->closing || e->shut)
    return UV_EINVAL;
  e->shut = 1;
  e->shutdown_pending = 1;
  e->shutdown_cb = cb;
  pair_schedule(e->pair);
  return 0;
}

int rd_pair_peer_done(const rd_pair_end *e) { return e->peer->shut || e->peer->closing; }

uv_loop_t *rd_pair_loop(const rd_pair_end *e) { return e->pair->check.loop; }

/* Unread writes of e fail with code from now on. */
static void fail_unread(rd_pair_end *e, int code) {
  if (e->write_error == 0)
    e->write_error = code;
  e->queued = 0;
  e->off = 0;
}

void rd_pair_close(rd_pair_end *e, rd_pair_close_cb cb) {
  if (e->closing)
    return;
  e->closing = 1;
  e->reading = 0;
  e->close_cb = cb;
  fail_unread(e, UV_ECANCELED);
  if (!e->peer->closing)
    fail_unread(e->peer, UV_EPIPE);
  pair_schedule(e->pair);
}
