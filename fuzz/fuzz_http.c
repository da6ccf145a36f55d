/* libFuzzer target for the HTTP head parser. The first byte picks the head
 * and header-count limits; the rest is parsed as a request and as a
 * response. Results must lie inside the input, respect the limits, and be
 * reproducible from exactly the head that was reported. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rd_http.h"
#include "fuzz.h"

static const size_t head_limits[8] = {0, 1, 16, 64, 256, 1024, 8192, 65536};
static const size_t header_limits[4] = {0, 3, 64, 1000};

static void check_span(const char *buf, size_t len, const char *p, size_t n) {
  FUZZ_ASSERT(n == 0 || (p >= buf && p + n <= buf + len));
}

static void check_headers(const char *buf, size_t head, const rd_http_header *h, size_t n,
                          size_t max_headers) {
  FUZZ_ASSERT(n <= RD_HTTP_MAX_HEADERS && n <= max_headers);
  for (size_t i = 0; i < n; i++) {
    FUZZ_ASSERT(h[i].name_len > 0);
    check_span(buf, head, h[i].name, h[i].name_len);
    check_span(buf, head, h[i].value, h[i].value_len);
    FUZZ_ASSERT(memchr(h[i].value, '\n', h[i].value_len) == NULL);
    if (h[i].value_len > 0) {
      FUZZ_ASSERT(h[i].value[0] != ' ' && h[i].value[0] != '\t');
      FUZZ_ASSERT(h[i].value[h[i].value_len - 1] != ' ' &&
                  h[i].value[h[i].value_len - 1] != '\t');
    }
    (void)rd_http_has_token(h[i].value, h[i].value_len, "upgrade");
  }
  (void)rd_http_find_header(h, n, "Sec-WebSocket-Key");
}

static void check_verdict(int r, size_t len, size_t max_head) {
  FUZZ_ASSERT(r > 0 || r == RD_EPARTIAL || r == RD_EMALFORMED || r == RD_ETOOLARGE);
  if (r > 0)
    FUZZ_ASSERT((size_t)r <= len && (size_t)r <= max_head);
  if (r == RD_EPARTIAL)
    FUZZ_ASSERT(len <= max_head);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  size_t max_head = head_limits[data[0] & 7];
  size_t max_headers = header_limits[(data[0] >> 3) & 3];
  const char *buf = (const char *)data + 1;
  size_t len = size - 1;

  static rd_http_request req, req2;
  int r = rd_http_parse_request(buf, len, max_head, max_headers, &req);
  check_verdict(r, len, max_head);
  if (r > 0) {
    check_span(buf, (size_t)r, req.method, req.method_len);
    check_span(buf, (size_t)r, req.target, req.target_len);
    FUZZ_ASSERT(req.method_len > 0 && req.target_len > 0);
    FUZZ_ASSERT(req.minor_version == 0 || req.minor_version == 1);
    check_headers(buf, (size_t)r, req.headers, req.num_headers, max_headers);
    /* The head alone parses the same; one byte less is incomplete. */
    FUZZ_ASSERT(rd_http_parse_request(buf, (size_t)r, max_head, max_headers, &req2) == r);
    FUZZ_ASSERT(req2.num_headers == req.num_headers);
    FUZZ_ASSERT(rd_http_parse_request(buf, (size_t)r - 1, max_head, max_headers, &req2) ==
                RD_EPARTIAL);
  }

  static rd_http_response resp, resp2;
  r = rd_http_parse_response(buf, len, max_head, max_headers, &resp);
  check_verdict(r, len, max_head);
  if (r > 0) {
    FUZZ_ASSERT(resp.status >= 100 && resp.status <= 999);
    FUZZ_ASSERT(resp.minor_version == 0 || resp.minor_version == 1);
    check_span(buf, (size_t)r, resp.reason, resp.reason_len);
    check_headers(buf, (size_t)r, resp.headers, resp.num_headers, max_headers);
    FUZZ_ASSERT(rd_http_parse_response(buf, (size_t)r, max_head, max_headers, &resp2) == r);
    FUZZ_ASSERT(rd_http_parse_response(buf, (size_t)r - 1, max_head, max_headers, &resp2) ==
                RD_EPARTIAL);
  }
  return 0;
}
