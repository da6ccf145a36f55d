/* Engine-wide and process figures: the counterpart of Go's memstats and
 * process collectors, read when metrics are exposed. Loop thread only. */
#ifndef RD_STATS_H
#define RD_STATS_H

#include "rd_metrics.h"

typedef struct rd_stats {
  int64_t open_sessions;
  int64_t open_connections;
  int64_t buffered_to_local;  /* received from tunnels, not yet written locally */
  int64_t buffered_to_tunnel; /* queued on sessions' WebSocket streams */
  int64_t heap_bytes;
  int64_t heap_objects;
  int64_t pool_bytes;
  int64_t loop_handles;
  int64_t rss_bytes; /* -1 when unknown */
  int64_t open_fds;  /* -1 when unknown */
  int64_t nofile_soft, nofile_hard; /* RLIMIT_NOFILE, -1 when unlimited */
  int64_t fd_exhausted; /* accepts and dials failed for want of a descriptor */
} rd_stats;

/* Fills s (loop thread: counts the loop's handles). */
void rd_stats_collect(rd_stats *s);

/* Sets the engine and process gauges of a registry to the current figures. */
void rd_stats_refresh_gauges(rd_metrics *m);

#endif
