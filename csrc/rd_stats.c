#include "rd_stats.h"

#include <dirent.h>
#include <stdio.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_loop.h"
#include "rd_nofile.h"

static void count_handle_cb(uv_handle_t *h, void *arg) {
  (void)h;
  (*(int64_t *)arg)++;
}

static int64_t process_rss(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long long size, resident;
  int ok = f != NULL && fscanf(f, "%lld %lld", &size, &resident) == 2;
  if (f != NULL)
    fclose(f);
  return ok ? (int64_t)resident * sysconf(_SC_PAGESIZE) : -1;
}

static int64_t process_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  if (d == NULL)
    return -1;
  int64_t n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return n - 1; /* the directory stream's own descriptor */
}

void rd_stats_collect(rd_stats *s) {
  rd_engine_counts c = rd_engine_counts_get();
  s->open_sessions = c.open_sessions;
  s->open_connections = c.open_connections;
  s->buffered_to_local = c.buffered_bytes;
  s->buffered_to_tunnel = c.tunnel_queued_bytes;
  s->heap_bytes = rd_alloc_bytes();
  s->heap_objects = rd_alloc_objects();
  s->pool_bytes = rd_block_pool_bytes();
  s->loop_handles = 0;
  uv_walk(rd_loop(), count_handle_cb, &s->loop_handles);
  s->rss_bytes = process_rss();
  s->open_fds = process_fds();
  rd_nofile_limits(&s->nofile_soft, &s->nofile_hard);
  s->fd_exhausted = rd_nofile_exhausted();
}

void rd_stats_refresh_gauges(rd_metrics *m) {
  rd_stats s;
  rd_stats_collect(&s);
  const char *to_local[1] = {"to_local"}, *to_tunnel[1] = {"to_tunnel"};
  rd_metrics_set(m, RD_M_BUFFERED_BYTES, to_local, (double)s.buffered_to_local);
  rd_metrics_set(m, RD_M_BUFFERED_BYTES, to_tunnel, (double)s.buffered_to_tunnel);
  rd_metrics_set(m, RD_M_HEAP_BYTES, NULL, (double)s.heap_bytes);
  rd_metrics_set(m, RD_M_HEAP_OBJECTS, NULL, (double)s.heap_objects);
  rd_metrics_set(m, RD_M_POOL_BYTES, NULL, (double)s.pool_bytes);
  rd_metrics_set(m, RD_M_LOOP_HANDLES, NULL, (double)s.loop_handles);
  if (s.rss_bytes >= 0)
    rd_metrics_set(m, RD_M_PROCESS_RSS, NULL, (double)s.rss_bytes);
  if (s.open_fds >= 0)
    rd_metrics_set(m, RD_M_PROCESS_FDS, NULL, (double)s.open_fds);
}
