/* libFuzzer target for the stream route's target (rd_stream): what parses
 * has three NUL-terminated segments within their limits and free of control
 * characters, survives the destination check, and encodes back into a
 * target that parses to the same segments. The input is read from a buffer
 * of its exact length. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "rd_stream.h"

static void clean(const char *s, size_t max) {
  size_t n = strlen(s);
  FUZZ_ASSERT(n > 0 && n <= max);
  for (size_t i = 0; i < n; i++)
    FUZZ_ASSERT((unsigned char)s[i] >= 0x20 && s[i] != 0x7f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = malloc(size ? size : 1);
  if (s == NULL)
    return 0;
  memcpy(s, data, size);
  rd_stream_dest d;
  const char *why = NULL;
  int rc = rd_stream_parse_target(s, size, &d, &why);
  free(s);
  if (rc != 0) {
    FUZZ_ASSERT(rc == RD_EMALFORMED && why != NULL);
    return 0;
  }
  clean(d.key, RD_STREAM_KEY_MAX);
  clean(d.proto, RD_STREAM_PROTO_MAX);
  clean(d.address, RD_STREAM_ADDRESS_MAX);
  char err[RD_STREAM_ADDRESS_MAX + 80];
  rc = rd_stream_check_dest(d.proto, d.address, err, sizeof err);
  FUZZ_ASSERT(rc == 0 || (rc == RD_EMALFORMED && err[0] != '\0'));
  char k[3 * RD_STREAM_KEY_MAX + 1], p[3 * RD_STREAM_PROTO_MAX + 1],
      a[3 * RD_STREAM_ADDRESS_MAX + 1], t[sizeof k + sizeof p + sizeof a + 2];
  FUZZ_ASSERT(rd_stream_encode(k, sizeof k, d.key) > 0);
  FUZZ_ASSERT(rd_stream_encode(p, sizeof p, d.proto) > 0);
  FUZZ_ASSERT(rd_stream_encode(a, sizeof a, d.address) > 0);
  size_t n = (size_t)snprintf(t, sizeof t, "%s/%s/%s", k, p, a);
  rd_stream_dest again;
  FUZZ_ASSERT(rd_stream_parse_target(t, n, &again, &why) == 0);
  FUZZ_ASSERT(strcmp(again.key, d.key) == 0 && strcmp(again.proto, d.proto) == 0 &&
              strcmp(again.address, d.address) == 0);
  return 0;
}
