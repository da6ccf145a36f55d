/* The open-file limit: raised at engine start as Go's runtime does, and
 * named in the error of every accept or dial it stops. */
#ifndef RD_NOFILE_H
#define RD_NOFILE_H

#include <stdint.h>

/* Raises RLIMIT_NOFILE's soft limit to the hard limit (once, at start). */
void rd_nofile_raise(void);

/* The current soft and hard limits (-1 when unknown or unlimited). */
void rd_nofile_limits(int64_t *soft, int64_t *hard);

/* Counts a descriptor-exhaustion failure (UV_EMFILE/UV_ENFILE or the
 * negated errno) and returns its text, "too many open files (limit N)";
 * NULL for any other code. The text lives until the calling thread's next
 * call. */
const char *rd_nofile_error(int code);

/* Failures rd_nofile_error has counted, process-wide. */
int64_t rd_nofile_exhausted(void);

#endif
