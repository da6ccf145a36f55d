/* A datagram socket as a connection's local end: a connected UDP socket
 * (the agent's dial) or a unix SOCK_SEQPACKET socket (a server-side socket
 * pair). One read is one record, one write is one record; nothing is ever
 * joined or split.
 *
 * Why not a libuv stream: uv_pipe_open/uv_tcp_open accept such descriptors,
 * but libuv's stream reader takes a short read for "the socket is drained"
 * and, when the peer has hung up, reports EOF at once (POLLHUP after a
 * partial read); on SEQPACKET every record is a short read, so records still
 * queued behind the first would be lost. It also reads a zero-length record
 * as EOF. uv_udp_t fits UDP only. A uv_poll_t with our own recv/sendmsg is
 * right for both kinds.
 *
 * The calls mirror rd_io's (which wraps this for datagram descriptors) and,
 * like libuv, never call back inside the call that started the work.
 * Loop thread only. */
#ifndef RD_DGRAM_H
#define RD_DGRAM_H

#include <uv.h>

#include "rd_common.h"

typedef struct rd_dgram rd_dgram;

/* The largest record read whole; a longer one ends reading with
 * UV_EMSGSIZE (a UDP payload is at most 65527 bytes). */
#define RD_DGRAM_MAX 65535

typedef void (*rd_dgram_alloc_cb)(void *ctx, uv_buf_t *buf);
/* nread > 0: a record; 0: nothing (release buf); < 0: UV_EOF (SEQPACKET
 * only) or an error (UDP: an ICMP error such as UV_ECONNREFUSED). */
typedef void (*rd_dgram_read_cb)(void *ctx, ssize_t nread, const uv_buf_t *buf);
typedef void (*rd_dgram_drain_cb)(void *ctx, int status);
typedef void (*rd_dgram_close_cb)(void *ctx);

/* Takes a connected datagram or seqpacket socket (made non-blocking here).
 * NULL on allocation failure (fd then still the caller's). */
rd_dgram *rd_dgram_new(uv_loop_t *loop, int fd, void *ctx);
int rd_dgram_fd(const rd_dgram *d);

int rd_dgram_read_start(rd_dgram *d, rd_dgram_alloc_cb alloc_cb, rd_dgram_read_cb read_cb);
void rd_dgram_read_stop(rd_dgram *d);

/* Queues one record made of bufs (kept by the caller until cb). */
int rd_dgram_write(rd_dgram *d, uv_write_t *req, const uv_buf_t bufs[], unsigned nbufs,
                   uv_write_cb cb);
/* Sends one record now if the socket takes it and nothing is queued: its
 * length, 0 (not sent) or a negative code. Never a part. */
ssize_t rd_dgram_try_write(rd_dgram *d, const uv_buf_t bufs[], unsigned nbufs);
size_t rd_dgram_queue_size(const rd_dgram *d);

/* cb runs once every queued record is sent (or failed). UV_EALREADY when
 * nothing is queued (cb is then never called). There is no half-close. */
int rd_dgram_drain(rd_dgram *d, rd_dgram_drain_cb cb);

/* Closes: queued writes complete with UV_ECANCELED, then cb, then the
 * memory goes. Idempotent. */
void rd_dgram_close(rd_dgram *d, rd_dgram_close_cb cb);

#endif
