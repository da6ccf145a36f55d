/* Local dials for the agent side of a tunneled connection: TCP or UDP with
 * name resolution (uv_getaddrinfo, every address tried in order) or a unix socket,
 * under a time limit. Errors come back as text in the Go agent's shape:
 *   "dial tcp 127.0.0.1:1: connect: connection refused"
 *   "dial tcp: lookup nosuchhost: no such host"
 *   "dial tcp 10.0.0.1:80: i/o timeout"
 *   "dial unix /tmp/x.sock: connect: no such file or directory"
 *   "dial udp: lookup nosuchhost: no such host"
 * Loop thread only. */
#ifndef RD_DIALER_H
#define RD_DIALER_H

#include <uv.h>

#include "rd_common.h"

typedef struct rd_dial rd_dial;

/* Called exactly once per successful rd_dial_start, on the loop thread.
 * On success status == 0 and either stream is a connected, initialized
 * uv_tcp_t or uv_pipe_t (cast to uv_stream_t) that the callee now owns (it
 * must uv_close it and free it with rd_free in its close callback; the stream
 * was allocated with rd_malloc, with room for a uv_tcp_t, so callers may
 * simply rd_free it), or (udp) stream is NULL and fd is a connected,
 * non-blocking UDP socket the callee now owns.
 * On failure stream is NULL, fd -1, status < 0 and error is the Go-shaped
 * text (valid during the call). After the callback the rd_dial is gone. */
typedef void (*rd_dial_cb)(void *ctx, int status, uv_stream_t *stream, int fd,
                           const char *error);

/* Starts dialing proto ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6",
 * "unix") address ("host:port",
 * "[v6]:port", or a path for unix) with a timeout in milliseconds (0 = none).
 * Returns the dial handle (for rd_dial_cancel) or NULL when it could not even
 * start; then *status_out < 0 and error_out (errlen bytes) holds the text, and
 * cb is never called. */
rd_dial *rd_dial_start(uv_loop_t *loop, const char *proto, const char *address,
                       uint64_t timeout_ms, rd_dial_cb cb, void *ctx, int *status_out,
                       char *error_out, size_t errlen);

/* Abandons a dial in progress: cb is called soon (from the loop, never inside
 * this call) with status UV_ECANCELED and error "operation was canceled";
 * a socket that connected meanwhile is closed. */
void rd_dial_cancel(rd_dial *d);

/* Whether proto is udp, udp4 or udp6 (also as a peer's "key::udp"). */
int rd_proto_is_udp(const char *proto);

/* Go's text for a failed read or write on a connected inet socket:
 * "read udp 127.0.0.1:5->127.0.0.1:6: read: connection refused". Returns 0
 * (out untouched) when fd is not an inet socket. */
int rd_dial_op_error(char *out, size_t len, const char *op, const char *net, int fd,
                     int status);

#endif
