/* libFuzzer target for the address module (rd_addr). The first byte picks
 * the flags (bits 0-1) and the default port (bits 2-3: none, 0, 80, 443);
 * the rest is read, from a buffer of its exact length, as an endpoint, a
 * ws:// URL, a Go host:port and a path. What the endpoint parser accepts is
 * joined and parsed again and must give the same host and port (an address
 * written back is read the same); what the Go split accepts must hold
 * pointers into the input that put it back together; a cleaned path must
 * be clean already (cleaning it again changes nothing) and hold no "//",
 * "/./" or a ".." after a name. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rd_addr.h"
#include "fuzz.h"

static const int default_ports[4] = {-1, 0, 80, 443};

static void check_parts(const rd_addr *a, const char *s, size_t len) {
  FUZZ_ASSERT(a->host >= s && a->host + a->host_len <= s + len);
  FUZZ_ASSERT(a->port_text >= s && a->port_text + a->port_len <= s + len);
}

/* Join, parse again: the same host and port. */
static void round_trip(const rd_addr *a) {
  char out[RD_ADDR_JOINED_MAX];
  FUZZ_ASSERT(a->host_len <= RD_ADDR_HOST_MAX);
  FUZZ_ASSERT(a->port >= 0 && a->port <= 65535);
  int n = rd_addr_join(out, sizeof out, a->host, a->host_len, a->port);
  FUZZ_ASSERT(n > 0 && (size_t)n < sizeof out && out[n] == '\0');
  rd_addr b;
  int rc = rd_addr_parse(out, (size_t)n, -1, RD_ADDR_EMPTY_HOST, &b);
  FUZZ_ASSERT(rc == 0);
  FUZZ_ASSERT(b.host_len == a->host_len && memcmp(b.host, a->host, a->host_len) == 0);
  FUZZ_ASSERT(b.port == a->port);
  /* A short buffer is refused whole, never cut. */
  char small[8];
  int m = rd_addr_join(small, sizeof small, a->host, a->host_len, a->port);
  FUZZ_ASSERT(m == n ? n < (int)sizeof small : m == RD_ADDR_ENOSPACE && small[0] == '\0');
}

static int contains(const char *s, size_t len, const char *needle) {
  size_t k = strlen(needle);
  for (size_t i = 0; i + k <= len; i++)
    if (memcmp(s + i, needle, k) == 0)
      return 1;
  return 0;
}

static void check_clean(const char *p, size_t len) {
  size_t cap = len + 2;
  char *out = malloc(cap), *again = malloc(cap);
  FUZZ_ASSERT(out != NULL && again != NULL);
  int n = rd_addr_clean_path(p, len, out, cap);
  FUZZ_ASSERT(n > 0 && (size_t)n <= (len ? len : 1) && out[n] == '\0');
  FUZZ_ASSERT(rd_addr_clean_path(out, (size_t)n, again, cap) == n);
  FUZZ_ASSERT(memcmp(out, again, (size_t)n + 1) == 0);
  FUZZ_ASSERT(!contains(out, (size_t)n, "//") && !contains(out, (size_t)n, "/./"));
  FUZZ_ASSERT(n == 1 || out[n - 1] != '/');
  FUZZ_ASSERT((len > 0 && p[0] == '/') == (out[0] == '/'));
  /* A rooted path never climbs above its root. */
  if (out[0] == '/')
    FUZZ_ASSERT(!contains(out, (size_t)n, "/../") && !(n >= 3 && memcmp(out + n - 3, "/..", 3) == 0));
  /* One byte short is refused, and leaves "". */
  if (n > 0) {
    FUZZ_ASSERT(rd_addr_clean_path(p, len, again, (size_t)n) == RD_ADDR_ENOSPACE);
    FUZZ_ASSERT(again[0] == '\0');
  }
  free(out);
  free(again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  unsigned flags = data[0] & 3;
  int default_port = default_ports[(data[0] >> 2) & 3];
  size_t len = size - 1;
  char *s = malloc(len ? len : 1);
  FUZZ_ASSERT(s != NULL);
  memcpy(s, data + 1, len);

  rd_addr a;
  int rc = rd_addr_parse(s, len, default_port, flags, &a);
  FUZZ_ASSERT(rc <= 0);
  if (rc == 0) {
    check_parts(&a, s, len);
    round_trip(&a);
    if (default_port < 0)
      FUZZ_ASSERT(a.port_len > 0);
  } else {
    FUZZ_ASSERT(strcmp(rd_addr_strerror(rc), "invalid address") != 0);
  }

  rd_addr_url u;
  rc = rd_addr_parse_url(s, len, &u);
  FUZZ_ASSERT(rc <= 0);
  if (rc == 0) {
    check_parts(&u.addr, s, len);
    round_trip(&u.addr);
    FUZZ_ASSERT(u.authority + u.authority_len == u.path && u.path + u.path_len == s + len);
    FUZZ_ASSERT(u.path_len == 0 || u.path[0] == '/');
  }

  rc = rd_addr_split(s, len, &a);
  FUZZ_ASSERT(rc <= 0);
  if (rc == 0) {
    check_parts(&a, s, len);
    /* host, ':' and port are the input again (brackets around the host). */
    FUZZ_ASSERT(a.port_text + a.port_len == s + len && a.port_text[-1] == ':');
    FUZZ_ASSERT(a.host + a.host_len + (a.bracketed ? 1 : 0) + 1 == a.port_text);
    FUZZ_ASSERT(a.host == s + (a.bracketed ? 1 : 0));
    long port;
    (void)rd_addr_go_port(a.port_text, a.port_len, &port);
  }

  check_clean(s, len);
  free(s);
  return 0;
}
