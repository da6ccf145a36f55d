/* The engine's thread-safe C API: each call posts a command to the loop
 * thread and blocks until it is done. The CPython binding calls these with
 * the GIL released; C tests call them directly. Every function returns 0 or
 * a negative code and, where it takes err, a message there. Strings and
 * arrays handed out are rd_malloc'ed; free them with the matching _free. */
#ifndef RD_API_H
#define RD_API_H

#include "rd_client.h"
#include "rd_metrics.h"
#include "rd_server.h"
#include "rd_session.h"
#include "rd_stats.h"
#include "rd_stream_forward.h"

int rd_api_server_new(const char *host, int port, const rd_server_config *cfg,
                      uint64_t *handle, int *port_out, char *err, size_t errlen);
/* Closes any object by handle and waits until it is fully closed.
 * Unknown handles succeed (close is idempotent), and so do handles inherited
 * across fork, at once and without starting a loop (rd_handle_is_stale). */
int rd_api_close(uint64_t handle);

/* Dials through client_key's session (rd_server_dial): waits up to
 * timeout_ms for room on a session whose queue toward the agent is full. */
int rd_api_server_dial(uint64_t handle, const char *client_key, const char *proto,
                       const char *address, uint64_t timeout_ms, uint64_t idle_timeout_ms,
                       int *fd, int64_t *conn_id, rd_dial_status **status, char *err,
                       size_t errlen);
int rd_api_server_forward(uint64_t handle, const char *client_key, const char *proto,
                          const char *address, const char *host, int port, uint64_t *fhandle,
                          int *port_out, char *err, size_t errlen);

/* A remote forward (rd_stream_forward.h): listens on cfg->host:port and
 * reaches the destination through a running server's stream route. */
int rd_api_stream_forward(const rd_sforward_config *cfg, uint64_t *fhandle, int *port_out,
                          char *err, size_t errlen);
int rd_api_stream_forward_stats(uint64_t handle, rd_sforward_stats *out);

int rd_api_server_reload_tls(uint64_t handle, const char *cert, const char *key,
                             const char *client_ca, char *err, size_t errlen);

/* Replaces the token table (ownership of tokens passes, also on failure). */
int rd_api_server_set_tokens(uint64_t handle, rd_tokens *tokens);

typedef struct rd_string_list {
  char **items;
  size_t count;
} rd_string_list;
/* Sorted, unique client keys with a live session. */
int rd_api_server_clients(uint64_t handle, rd_string_list *out);
void rd_string_list_free(rd_string_list *l);
int rd_api_server_has_session(uint64_t handle, const char *client_key, int *out);

typedef struct rd_conn_list {
  rd_conn_info *items; /* strings owned by the list */
  size_t count;
} rd_conn_list;
int rd_api_server_connections(uint64_t handle, rd_conn_list *out);
void rd_conn_list_free(rd_conn_list *l);

/* Peering (rd_server_peers.c, rd_server.h). */
int rd_api_server_add_peer(uint64_t handle, const char *url, const char *id, const char *token,
                           char *err, size_t errlen);
/* *removed: 1, or 0 for an unknown id. */
int rd_api_server_remove_peer(uint64_t handle, const char *id, int *removed);
typedef struct rd_peer_list {
  rd_peer_info *items; /* strings owned by the list */
  size_t count;
} rd_peer_list;
int rd_api_server_peers(uint64_t handle, rd_peer_list *out);
void rd_peer_list_free(rd_peer_list *l);
/* *ended: the sessions ended on this server (peers end theirs). */
int rd_api_server_disconnect(uint64_t handle, const char *client_key, size_t *ended);
/* Closes the proxy route's idle pooled connections; *closed: how many. */
int rd_api_server_close_idle(uint64_t handle, size_t *closed);
/* Where a dial for client_key goes: *found 0 (nowhere) or 1 with via "" (a
 * local session) or the id of the peer that announced it. */
#define RD_API_ROUTE_MAX 160
int rd_api_server_route(uint64_t handle, const char *client_key, int *found, char *via,
                        size_t vialen);

int rd_api_client_new(const char *url, const char *headers, const rd_client_config *cfg,
                      uint64_t *handle, char *err, size_t errlen);
/* An agent that tries several server URLs in turn (nurls >= 1). */
int rd_api_client_new_urls(const char *const *urls, size_t nurls, const char *headers,
                           const rd_client_config *cfg, uint64_t *handle, char *err,
                           size_t errlen);
/* *connected is 1 once connected, 0 at timeout (or when closed). */
int rd_api_client_wait_connected(uint64_t handle, uint64_t timeout_ms, int *connected);
int rd_api_client_state(uint64_t handle, int *connected, char *last_error, size_t errlen);
/* The same, and the URL of the current (or last) attempt. */
int rd_api_client_state_url(uint64_t handle, int *connected, char *last_error, size_t errlen,
                            char *url, size_t urllen);

typedef struct rd_sample {
  const rd_metric_family_info *family;
  char *values[3];
  double value;
} rd_sample;
typedef struct rd_sample_list {
  rd_sample *items;
  size_t count;
} rd_sample_list;
/* Samples of a server's or client's registry, in exposition order. */
int rd_api_metrics(uint64_t handle, rd_sample_list *out);
void rd_sample_list_free(rd_sample_list *l);
/* The exposition text (rd_free it). */
int rd_api_prometheus(uint64_t handle, char **text, size_t *len);

/* Calls posted without waiting, for a caller that waits on an event loop
 * (rd_engine_post): dial, close and wait_connected, as above. rd_api_op_post
 * returns 1 when queued (the loop thread then adds 1 to notify_fd once the
 * op is done), or 0 when the op completed at once (its status is readable,
 * nothing is signalled). A queued op must not be freed before
 * rd_api_op_done; rd_api_op_free then releases it with any result not
 * taken (a dialed descriptor is closed, a status unreferenced). */
typedef struct rd_api_op rd_api_op;
/* NULL when out of memory. The strings are copied. */
rd_api_op *rd_api_op_dial(uint64_t handle, const char *client_key, const char *proto,
                          const char *address, uint64_t timeout_ms, uint64_t idle_timeout_ms);
rd_api_op *rd_api_op_close(uint64_t handle);
rd_api_op *rd_api_op_wait_connected(uint64_t handle, uint64_t timeout_ms);
int rd_api_op_post(rd_api_op *op, int notify_fd);
int rd_api_op_done(rd_api_op *op);
/* Once done: 0 or the error code, with its text in err. */
int rd_api_op_status(const rd_api_op *op, char *err, size_t errlen);
/* Once done with 0: a dial's results, ownership passing to the caller
 * (fd -1 for another kind of op). */
void rd_api_op_take_dial(rd_api_op *op, int *fd, int64_t *conn_id, rd_dial_status **status);
/* Once done with 0: whether wait_connected saw a session. */
int rd_api_op_connected(const rd_api_op *op);
void rd_api_op_free(rd_api_op *op);

/* Returns the engine's idle pools (I/O blocks, write requests) to the
 * allocator, so heap figures show only memory in use. */
int rd_api_trim(void);

/* Engine-wide and process figures. */
int rd_api_stats(rd_stats *out);

#endif
