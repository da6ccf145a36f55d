#include "rd_nofile.h"

#include <stdatomic.h>
#include <stdio.h>
#include <sys/resource.h>

#include <uv.h>

static atomic_llong exhausted;

void rd_nofile_raise(void) {
  /* A server holds a descriptor per session and per connection: the soft
   * limit's usual 1024 would cap it far below what the hard limit allows. */
  struct rlimit r;
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}

static int64_t limit_value(rlim_t v) {
  return v == RLIM_INFINITY ? -1 : (int64_t)v;
}

void rd_nofile_limits(int64_t *soft, int64_t *hard) {
  struct rlimit r;
  if (getrlimit(RLIMIT_NOFILE, &r) != 0) {
    *soft = *hard = -1;
    return;
  }
  *soft = limit_value(r.rlim_cur);
  *hard = limit_value(r.rlim_max);
}

const char *rd_nofile_error(int code) {
  static _Thread_local char text[80];
  if (code != UV_EMFILE && code != UV_ENFILE)
    return NULL;
  atomic_fetch_add(&exhausted, 1);
  if (code == UV_ENFILE)
    return "too many open files in system";
  int64_t soft, hard;
  rd_nofile_limits(&soft, &hard);
  snprintf(text, sizeof text, "too many open files (limit %lld)", (long long)soft);
  return text;
}

int64_t rd_nofile_exhausted(void) {
  return atomic_load(&exhausted);
}
