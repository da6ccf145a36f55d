/* The remote forward: a local TCP listener whose every accepted connection
 * reaches proto/address behind an agent through a running server's stream
 * route (rd_server_stream.c), as kubectl port-forward does. Per connection:
 * dial the server (rd_dialer), TLS for https (rd_io), send
 * "GET {prefix}/stream/{key}/{proto}/{address}" with "Upgrade: tcp" and the
 * caller's headers, read the answer head (rd_http); on 101 the local
 * connection and the server's are joined (rd_join), else the local
 * connection is closed and the answer's status line and text are kept as
 * the forward's last error. Loop thread only; Python holds it by handle
 * (rd_api_stream_forward). */
#ifndef RD_STREAM_FORWARD_H
#define RD_STREAM_FORWARD_H

#include "rd_loop.h"
#include "rd_tls.h"

typedef struct rd_sforward rd_sforward;

typedef struct rd_sforward_config {
  const char *server_url; /* http://host[:port][/prefix] or https://... */
  const char *key, *proto, *address;
  const char *headers;   /* "Name: value\r\n" lines, or "" */
  rd_tls_ctx *tls;       /* https: required (the forward takes a reference) */
  const char *host;      /* where to listen ("" = 0.0.0.0) */
  int port;
  uint64_t timeout_ms;   /* dial, TLS and the answer head, per connection */
} rd_sforward_config;

/* What a forward has done, for stats(). */
typedef struct rd_sforward_stats {
  uint64_t accepted;  /* local connections taken */
  uint64_t joined;    /* that got their 101 */
  uint64_t failed;    /* that did not (last_error says why) */
  uint64_t open;      /* local connections not yet closed */
  char last_error[512];
} rd_sforward_stats;

/* Checks the config, builds the request and starts listening. RD_OK with
 * the registered forward's handle and bound port, or a negative code and
 * err. */
int rd_sforward_start(const rd_sforward_config *cfg, uint64_t *handle, int *port_out, char *err,
                      size_t errlen);
void rd_sforward_get_stats(const rd_sforward *f, rd_sforward_stats *out);

#endif
