/* A byte stream that is plain or TLS: the one stream type that sessions,
 * tunneled connections and HTTP connections use, so none of them knows
 * whether its bytes are encrypted. A tunneled connection's local end may
 * also be a datagram socket (rd_io_new_dgram, on rd_dgram): the same calls,
 * one record each; or one end of an in-memory pair (rd_io_new_pair, on
 * rd_io_pair), for a stream whose both ends are the engine's. It mirrors
 * libuv's stream calls (read
 * start/stop with alloc and read callbacks, write with a uv_write_t the
 * caller owns, shutdown, close) and, like libuv, never calls back inside the
 * call that started the work. For TLS the socket's ciphertext goes through
 * rd_tls; a write completes once the ciphertext that carries it is written.
 * Loop thread only. */
#ifndef RD_IO_H
#define RD_IO_H

#include <uv.h>

#include "rd_common.h"
#include "rd_tls.h"

typedef struct rd_io rd_io;

typedef void (*rd_io_alloc_cb)(rd_io *io, size_t suggested, uv_buf_t *buf);
/* nread > 0: bytes; 0: nothing (release buf); < 0: UV_EOF, a libuv error,
 * or RD_ETLS (rd_io_error says what). */
typedef void (*rd_io_read_cb)(rd_io *io, ssize_t nread, const uv_buf_t *buf);
typedef void (*rd_io_handshake_cb)(rd_io *io, int status, const char *error);
typedef void (*rd_io_shutdown_cb)(rd_io *io, int status);
typedef void (*rd_io_close_cb)(rd_io *io);

/* Wraps a connected stream (rd_malloc'ed uv_tcp_t or uv_pipe_t; ownership
 * passes to the io, also on failure) and a TLS connection (NULL = plain;
 * ownership passes too). Returns NULL on allocation failure (the stream is
 * then closed and freed, the TLS connection freed). */
rd_io *rd_io_new(uv_stream_t *stream, rd_tls *tls);
/* Wraps a connected datagram socket (UDP or unix SOCK_SEQPACKET, as
 * rd_dgram): every read is one record, every write one record; shutdown
 * only waits for queued records (UV_EALREADY when none). Takes fd, also on
 * failure (NULL: closed). */
rd_io *rd_io_new_dgram(uv_loop_t *loop, int fd);
/* Whether fd is a datagram socket (SOCK_DGRAM or SOCK_SEQPACKET). */
int rd_fd_is_dgram(int fd);
/* Two plain stream ios joined in memory (rd_io_pair.h says how they
 * behave): what *a writes *b reads and the other way round, with no socket
 * and no system call. Each is the caller's, closed with rd_io_close. 0 or
 * RD_ENOMEM (nothing made). Both are plain; rd_io_start_tls may make an
 * end TLS, as for a stream. A pair end has no stream (rd_io_stream NULL)
 * and no descriptor (rd_io_fileno -1). */
int rd_io_new_pair(uv_loop_t *loop, rd_io **a, rd_io **b);

/* The owner's pointer. */
void rd_io_set_data(rd_io *io, void *data);
void *rd_io_data(const rd_io *io);
/* The stream (NULL for a datagram io or a pair end). */
uv_stream_t *rd_io_stream(const rd_io *io);
int rd_io_is_dgram(const rd_io *io);
/* The descriptor, or -1 (a pair end has none). */
int rd_io_fileno(const rd_io *io);
/* Whether the other side has stopped sending (closed, or shut down its
 * writing side), learnt without reading, for a reader that stopped: poll's
 * RDHUP on a socket, the other end's state for a pair end. 0 when it
 * cannot tell. */
int rd_io_peer_done(const rd_io *io);
int rd_io_is_tls(const rd_io *io);
/* The stream's TLS state, or NULL for a plain stream. */
rd_tls *rd_io_tls(const rd_io *io);
/* Text for the last RD_ETLS (or "" when none). */
const char *rd_io_error(const rd_io *io);

/* Plain only, reading stopped: the stream carries TLS from now on (the
 * CONNECT exchange with an HTTP proxy is plain, the tunnel after it may
 * not be). Ownership of tls passes, also on failure. Returns 0 or
 * UV_EINVAL (the io is TLS already, a datagram io, reading or closing). */
int rd_io_start_tls(rd_io *io, rd_tls *tls);

/* TLS only: runs the handshake; cb gets 0 or a negative code and text.
 * Reading for the owner starts only with rd_io_read_start. */
int rd_io_handshake(rd_io *io, rd_io_handshake_cb cb);

int rd_io_read_start(rd_io *io, rd_io_alloc_cb alloc_cb, rd_io_read_cb read_cb);
void rd_io_read_stop(rd_io *io);

/* Queues bufs; cb(req, status) runs once they are on the wire (TLS: their
 * ciphertext; a pair end: once the other end has read them). req is the
 * caller's; its data field is the caller's too. Returns 0 or a negative
 * code (then cb is never called). */
int rd_io_write(rd_io *io, uv_write_t *req, const uv_buf_t bufs[], unsigned nbufs,
                uv_write_cb cb);
/* Plain streams with nothing queued: writes what the socket takes now,
 * without a request. Returns the bytes written (0 when the io is TLS, has
 * writes queued, or the socket is full; always for a pair end, which takes
 * bytes only through a request) or a negative code. */
ssize_t rd_io_try_write(rd_io *io, const uv_buf_t bufs[], unsigned nbufs);
/* Bytes queued and not yet written to the socket (a pair end: not yet read
 * by the other end). */
size_t rd_io_write_queue_size(const rd_io *io);

/* Flushes what is queued, sends close_notify (TLS), then shuts the write
 * side down; cb runs once (status < 0 when that failed). */
int rd_io_shutdown(rd_io *io, rd_io_shutdown_cb cb);

/* Writes bytes around TLS, straight to the socket, then closes (cb as for
 * rd_io_close): the plain-text answer to a client that spoke HTTP to a TLS
 * port. */
void rd_io_reject_plain(rd_io *io, const char *data, size_t len, rd_io_close_cb cb);

/* Closes: queued writes complete with UV_ECANCELED, then cb runs and the io
 * is freed (with its stream and TLS connection). Idempotent. */
void rd_io_close(rd_io *io, rd_io_close_cb cb);
int rd_io_is_closing(const rd_io *io);

#endif
