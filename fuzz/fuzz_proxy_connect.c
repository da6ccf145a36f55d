/* libFuzzer target for the proxy CONNECT codec (rd_proxy_connect). The
 * first byte picks the mode: even, the rest is a proxy URL: what parses
 * must point into the input, give a host and port rd_addr accepts, and
 * build a request that fits RD_PROXY_REQUEST_MAX and starts with the
 * CONNECT line; odd, the rest is a proxy's answer: a head length within the
 * input and the limit, and a status line with no control characters. Each
 * input is read from a buffer of its exact length. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "rd_proxy_connect.h"

static void url_case(const char *s, size_t len) {
  rd_proxy_url u;
  if (rd_proxy_parse_url(s, len, &u) != 0)
    return;
  FUZZ_ASSERT(u.addr.host >= s && u.addr.host + u.addr.host_len <= s + len);
  FUZZ_ASSERT(u.addr.port >= 0 && u.addr.port <= 65535);
  if (u.userinfo != NULL)
    FUZZ_ASSERT(u.userinfo >= s && u.userinfo + u.userinfo_len <= s + len &&
                u.userinfo_len <= RD_PROXY_USERINFO_MAX);
  char target[RD_ADDR_JOINED_MAX];
  int t = rd_addr_join(target, sizeof target, u.addr.host, u.addr.host_len, u.addr.port);
  FUZZ_ASSERT(t > 0);
  char out[RD_PROXY_REQUEST_MAX];
  int n = rd_proxy_connect_request(out, sizeof out, target, &u);
  FUZZ_ASSERT(n > 0 && (size_t)n < sizeof out && out[n] == '\0');
  FUZZ_ASSERT(strncmp(out, "CONNECT ", 8) == 0);
  FUZZ_ASSERT(n >= 4 && memcmp(out + n - 4, "\r\n\r\n", 4) == 0);
}

static void answer_case(const char *s, size_t len) {
  int status = 0;
  char line[64];
  int n = rd_proxy_connect_response(s, len, 1024, &status, line, sizeof line);
  if (n < 0) {
    FUZZ_ASSERT(n == RD_EPARTIAL || n == RD_EMALFORMED || n == RD_ETOOLARGE);
    return;
  }
  FUZZ_ASSERT((size_t)n <= len && n <= 1024);
  FUZZ_ASSERT(status >= 100 && status <= 999);
  FUZZ_ASSERT(strlen(line) < sizeof line);
  for (const char *p = line; *p != '\0'; p++)
    FUZZ_ASSERT((unsigned char)*p >= 0x20 && *p != 0x7f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  char *s = malloc(size - 1 ? size - 1 : 1);
  if (s == NULL)
    return 0;
  memcpy(s, data + 1, size - 1);
  if (data[0] & 1)
    answer_case(s, size - 1);
  else
    url_case(s, size - 1);
  free(s);
  return 0;
}
