/* Prometheus metrics: the Go library's ten counter families (exact names,
 * labels and HELP texts) plus our own gauges under the remotedialer_ prefix.
 * One registry per Server or Client; used only from the loop thread, so no
 * locking. No I/O; memory through rd_alloc. */
#ifndef RD_METRICS_H
#define RD_METRICS_H

#include "rd_common.h"

enum rd_metric_family {
  RD_M_ADD_WS_SESSION,     /* session_server_total_add_websocket_session{clientkey,peer} */
  RD_M_REMOVE_WS_SESSION,  /* session_server_total_remove_websocket_session{clientkey,peer} */
  RD_M_ADD_CONNECTIONS,    /* session_server_total_add_connections{clientkey,proto,addr} */
  RD_M_REMOVE_CONNECTIONS, /* session_server_total_remove_connections{clientkey,proto,addr} */
  RD_M_TRANSMIT_BYTES,     /* session_server_total_transmit_bytes{clientkey} */
  RD_M_TRANSMIT_ERR_BYTES, /* session_server_total_transmit_error_bytes{clientkey} */
  RD_M_RECEIVE_BYTES,      /* session_server_total_receive_bytes{clientkey} */
  RD_M_PEER_WS_ATTEMPT,    /* session_server_total_peer_ws_attempt{peer} */
  RD_M_PEER_WS_CONNECTED,  /* session_server_total_peer_ws_connected{peer} */
  RD_M_PEER_WS_DISCONNECTED, /* session_server_total_peer_ws_disconnected{peer} */
  /* Our gauges. */
  RD_M_OPEN_SESSIONS,      /* remotedialer_open_sessions{peer} */
  RD_M_OPEN_CONNECTIONS,   /* remotedialer_open_connections{clientkey} */
  RD_M_AGENT_ATTEMPTS,     /* remotedialer_agent_connect_attempts_total{url} */
  RD_M_AGENT_FAILURES,     /* remotedialer_agent_connect_failures_total{url} */
  /* Engine-wide gauges, refreshed when read (rd_stats). */
  RD_M_BUFFERED_BYTES,     /* remotedialer_buffered_bytes{direction} */
  RD_M_HEAP_BYTES,         /* remotedialer_engine_heap_bytes */
  RD_M_HEAP_OBJECTS,       /* remotedialer_engine_heap_objects */
  RD_M_POOL_BYTES,         /* remotedialer_engine_pool_bytes */
  RD_M_LOOP_HANDLES,       /* remotedialer_loop_handles */
  RD_M_PROCESS_RSS,        /* process_resident_memory_bytes */
  RD_M_PROCESS_FDS,        /* process_open_fds */
  RD_M__COUNT
};

typedef struct rd_metric_family_info {
  const char *name;
  const char *help;
  int is_gauge;
  size_t num_labels;
  const char *labels[3]; /* label names in the order callers pass values */
} rd_metric_family_info;

/* Static description of a family (names, help, label names). */
const rd_metric_family_info *rd_metrics_family(int family);

typedef struct rd_metrics rd_metrics;

/* A new empty registry, or NULL on allocation failure. */
rd_metrics *rd_metrics_new(void);
/* Frees the registry and every sample. NULL is a no-op. */
void rd_metrics_free(rd_metrics *m);

/* Adds delta to the sample of `family` with label values `values` (as many as
 * the family has labels, in its label order; copied). A sample is created on
 * first use (gauges too, so a gauge back at 0 still shows). Returns RD_OK or
 * RD_ENOMEM (the sample is then not counted). */
int rd_metrics_add(rd_metrics *m, int family, const char *const *values, double delta);

/* Sets a gauge sample to v (creating it). Returns as rd_metrics_add. */
int rd_metrics_set(rd_metrics *m, int family, const char *const *values, double v);

/* The current value of a sample, 0 when it does not exist. */
double rd_metrics_get(const rd_metrics *m, int family, const char *const *values);

/* Calls cb for every sample: families in name order, samples in label-value
 * order. label_names/label_values have family_info->num_labels entries. */
typedef void (*rd_metrics_sample_cb)(void *ctx, const rd_metric_family_info *family,
                                     const char *const *label_values, double value);
void rd_metrics_foreach(const rd_metrics *m, rd_metrics_sample_cb cb, void *ctx);

/* Renders the Prometheus text exposition of the Go client library's format:
 * families sorted by name, a family with no samples left out, "# HELP" and
 * "# TYPE" lines, labels sorted by name with escaped values (\\, \", \n),
 * numbers as Go's strconv.FormatFloat(v, 'g', -1, 64) (1e+06, 123456).
 * Returns a NUL-terminated rd_malloc'ed string (caller rd_frees) and its
 * length in *len, or NULL on allocation failure. */
char *rd_metrics_render(const rd_metrics *m, size_t *len);

/* Go's FormatFloat(v, 'g', -1, 64) into out (at least 32 bytes); returns length. */
size_t rd_metrics_format_float(char *out, double v);

#endif
