/* The /stream/{key}/{proto}/{address} route's request target and the
 * destination it names: built by the remote forward (rd_stream_forward.c),
 * read by the server (rd_server_stream.c). Each segment is percent-encoded,
 * so unix paths ('/') and IPv6 addresses fit. Pure functions, no I/O and no
 * allocation, fuzzable over (buf, len). */
#ifndef RD_STREAM_H
#define RD_STREAM_H

#include "rd_addr.h"
#include "rd_common.h"

#define RD_STREAM_KEY_MAX 255
#define RD_STREAM_PROTO_MAX 15
#define RD_STREAM_ADDRESS_MAX 265

/* The route's decoded segments, NUL-terminated. */
typedef struct rd_stream_dest {
  char key[RD_STREAM_KEY_MAX + 1];
  char proto[RD_STREAM_PROTO_MAX + 1];
  char address[RD_STREAM_ADDRESS_MAX + 1];
} rd_stream_dest;

/* Percent-encodes s into out[0..cap): unreserved characters and ':' stay,
 * everything else becomes %XX. Returns the length (out NUL-terminated), or
 * RD_ADDR_ENOSPACE when it does not fit (out then holds ""). */
int rd_stream_encode(char *out, size_t cap, const char *s);

/* Reads what follows "/stream/" in a request target (up to any '?'): three
 * non-empty segments, each percent-decoded, none holding a control
 * character after decoding. Returns 0 with out filled, or RD_EMALFORMED
 * with a static reason in *why. */
int rd_stream_parse_target(const char *t, size_t len, rd_stream_dest *out, const char **why);

/* Checks the destination the way the agent will dial it: proto is tcp,
 * tcp4, tcp6 or unix; a tcp address is "host:port" (rd_addr_split), a unix
 * one a non-empty path. Returns 0, or RD_EMALFORMED with a reason in err. */
int rd_stream_check_dest(const char *proto, const char *address, char *err, size_t errlen);

#endif
