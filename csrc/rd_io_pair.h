/* Two stream ends joined in memory, for a byte stream whose both ends live
 * in this process: the proxy route talks to a tunneled connection through
 * one, where a socket pair cost two syscalls per write and two epoll
 * wake-ups per message, each way.
 *
 * What one end writes, the other reads, in order, as a stream (writes may
 * be joined or split by the reader's buffers). There is no buffer in
 * between: a write stays queued, its bytes counted in the writer's queue
 * size, until the other end reads them, copied once from the writer's
 * buffers into the reader's; only then does its callback run. So a reader
 * that stops reading holds the writer's requests back and its queue grows,
 * as a full socket's would. Shutdown: the other end reads UV_EOF after the
 * bytes queued before it, and the shutdown callback runs once they are
 * read. Close: writes still unread complete with UV_ECANCELED; the other
 * end reads UV_EOF, and its own writes fail with UV_EPIPE.
 *
 * Like libuv, nothing calls back inside the call that started the work:
 * reads, write and shutdown completions and close callbacks all run from a
 * check handle, right after the loop's poll (so work queued by a socket's
 * callback runs before the loop polls again), with an idle handle beside it
 * so that work queued elsewhere (a timer) does not wait for the poll to
 * block and return; both are active only while work is pending. An end
 * reads at most 32 buffers per turn of the loop, as libuv reads a socket. No
 * memory is allocated per write once an end's queue has grown to its
 * steady size.
 *
 * rd_io wraps each end (rd_io_new_pair); this is its engine. Loop thread
 * only. */
#ifndef RD_IO_PAIR_H
#define RD_IO_PAIR_H

#include <uv.h>

#include "rd_common.h"

typedef struct rd_pair_end rd_pair_end;

/* ctx is the end's owner pointer given to rd_pair_new. */
typedef void (*rd_pair_alloc_cb)(void *ctx, size_t suggested, uv_buf_t *buf);
/* nread > 0: bytes; 0: nothing (release buf); UV_EOF: the other end shut
 * down or closed (reading stops; a new read start reads UV_EOF again);
 * UV_ENOBUFS: alloc gave no buffer. */
typedef void (*rd_pair_read_cb)(void *ctx, ssize_t nread, const uv_buf_t *buf);
typedef void (*rd_pair_shutdown_cb)(void *ctx, int status);
typedef void (*rd_pair_close_cb)(void *ctx);

/* Makes a pair on loop: *a and *b its ends, with owner pointers ctx_a and
 * ctx_b. 0 or RD_ENOMEM. Each end is the caller's until rd_pair_close; the
 * pair's memory goes once both ends have closed. */
int rd_pair_new(uv_loop_t *loop, void *ctx_a, void *ctx_b, rd_pair_end **a, rd_pair_end **b);

/* Reads: alloc_cb and read_cb run later, from the loop, while the other end
 * has bytes (or has ended). Calling it again while reading only changes the
 * callbacks. 0, or UV_EINVAL once the end is closing. */
int rd_pair_read_start(rd_pair_end *e, rd_pair_alloc_cb alloc_cb, rd_pair_read_cb read_cb);
void rd_pair_read_stop(rd_pair_end *e);

/* Queues bufs (the caller keeps them, and req, until cb); cb(req, 0) runs
 * once the other end has read every byte, cb(req, UV_ECANCELED) when this
 * end closes first, cb(req, UV_EPIPE) when the other end closes first.
 * Returns 0, UV_EPIPE (this end shut down or closing, or the other end
 * closed: cb is then never called) or RD_ENOMEM. */
int rd_pair_write(rd_pair_end *e, uv_write_t *req, const uv_buf_t bufs[], unsigned nbufs,
                  uv_write_cb cb);
/* Nothing is taken without a request (there is no buffer to take it into):
 * 0, or UV_EPIPE when a write would fail. */
ssize_t rd_pair_try_write(const rd_pair_end *e);
/* Bytes written on e and not yet read by the other end. */
size_t rd_pair_queue_size(const rd_pair_end *e);

/* The other end reads UV_EOF after what e queued; cb(ctx, status) runs once
 * that is read (0), or with UV_EPIPE when the other end closed first or
 * UV_ECANCELED when e closes first. 0, or UV_EINVAL when e is closing or
 * already shut down. */
int rd_pair_shutdown(rd_pair_end *e, rd_pair_shutdown_cb cb);

/* Whether the other end has stopped writing (shut down or closing), which
 * an end that is not reading cannot learn by reading. */
int rd_pair_peer_done(const rd_pair_end *e);

/* The loop the pair runs on. */
uv_loop_t *rd_pair_loop(const rd_pair_end *e);

/* Closes e: its unread writes complete with UV_ECANCELED, a pending
 * shutdown with UV_ECANCELED, then cb(ctx) runs, later, from the loop; e is
 * not used after it. Idempotent. */
void rd_pair_close(rd_pair_end *e, rd_pair_close_cb cb);

#endif
