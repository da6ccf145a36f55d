/* libFuzzer target for HTTP framing. The input is parsed as a request head
 * and as a response head; where one parses, its framing is decided and the
 * bytes after the head are scanned as its body, whole and then in pieces
 * whose sizes the first byte picks. Both scans must agree, stay inside the
 * input, and a refused framing must never come with a body. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rd_http_framing.h"
#include "fuzz.h"

/* Scans body[0..len) whole, then in steps of `step`; returns what was used. */
static void scan(const rd_http_framing *f, const uint8_t *body, size_t len, size_t step) {
  rd_http_body b;
  rd_http_body_init(&b, f);
  ssize_t whole = rd_http_body_feed(&b, body, len);
  FUZZ_ASSERT(whole == RD_EMALFORMED || whole == RD_ETOOLARGE ||
              (whole >= 0 && (size_t)whole <= len));
  int whole_done = whole >= 0 && rd_http_body_done(&b);
  if (whole >= 0 && (size_t)whole < len)
    FUZZ_ASSERT(rd_http_body_done(&b)); /* bytes are left only after the end */
  if (f->kind == RD_BODY_CLOSE)
    FUZZ_ASSERT(!whole_done && (size_t)whole == len);
  rd_http_body_init(&b, f);
  ssize_t used = 0;
  for (size_t i = 0; i < len && !rd_http_body_done(&b); i += step) {
    size_t n = len - i < step ? len - i : step;
    ssize_t r = rd_http_body_feed(&b, body + i, n);
    if (r < 0) {
      used = r;
      break;
    }
    FUZZ_ASSERT((size_t)r <= n);
    used += r;
    if ((size_t)r < n)
      break;
  }
  FUZZ_ASSERT(used == whole);
  if (used >= 0)
    FUZZ_ASSERT(rd_http_body_done(&b) == whole_done);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  size_t step = (size_t)(data[0] % 17) + 1;
  const char *buf = (const char *)data + 1;
  size_t len = size - 1;
  static rd_http_request req;
  static rd_http_response resp;
  rd_http_framing f;
  int n = rd_http_parse_request(buf, len, 65536, RD_HTTP_MAX_HEADERS, &req);
  if (n > 0 && rd_http_request_framing(&req, &f) == RD_OK) {
    FUZZ_ASSERT(f.kind != RD_BODY_CLOSE);
    scan(&f, (const uint8_t *)buf + n, len - (size_t)n, step);
  }
  n = rd_http_parse_response(buf, len, 65536, RD_HTTP_MAX_HEADERS, &resp);
  if (n > 0) {
    static const char *const methods[] = {"GET", "HEAD", "CONNECT"};
    const char *m = methods[data[0] % 3];
    if (rd_http_response_framing(&resp, m, strlen(m), &f) == RD_OK) {
      FUZZ_ASSERT(f.kind != RD_BODY_CLOSE || !f.keep_alive);
      scan(&f, (const uint8_t *)buf + n, len - (size_t)n, step);
    }
  }
  return 0;
}
