/* HTTP/1.1 head parser for requests and responses, in the manner of
 * picohttpparser: a pure function over (buf, len) that never allocates;
 * results point into the caller's buffer. */
#ifndef RD_HTTP_H
#define RD_HTTP_H

#include "rd_common.h"

#define RD_HTTP_MAX_HEADERS 64

typedef struct rd_http_header {
  const char *name;
  size_t name_len;
  const char *value; /* leading and trailing spaces/tabs stripped */
  size_t value_len;
} rd_http_header;

typedef struct rd_http_request {
  const char *method;
  size_t method_len;
  const char *target; /* request target as sent, e.g. "/connect?x=1" */
  size_t target_len;
  int minor_version; /* HTTP/1.x */
  rd_http_header headers[RD_HTTP_MAX_HEADERS];
  size_t num_headers;
} rd_http_request;

typedef struct rd_http_response {
  int minor_version;
  int status;
  const char *reason;
  size_t reason_len;
  rd_http_header headers[RD_HTTP_MAX_HEADERS];
  size_t num_headers;
} rd_http_response;

/* Parses a request head (request line, headers, empty line; CRLF, and bare
 * LF tolerated). max_head bounds the head length and max_headers (at most
 * RD_HTTP_MAX_HEADERS) the header count.
 * Returns the head length (> 0; the body starts there), RD_EPARTIAL if the
 * head is incomplete and still within max_head, RD_ETOOLARGE if it exceeds
 * max_head or max_headers (answer 431), RD_EMALFORMED otherwise (answer 400):
 * bad method token, bad target (must start with '/' or be absolute-form),
 * version not HTTP/1.0 or 1.1, header name not a token, control characters,
 * obsolete line folding. */
int rd_http_parse_request(const char *buf, size_t len, size_t max_head, size_t max_headers,
                          rd_http_request *req);

/* Same for a response head ("HTTP/1.1 101 Switching Protocols"). */
int rd_http_parse_response(const char *buf, size_t len, size_t max_head, size_t max_headers,
                           rd_http_response *resp);

/* First header named `name` (ASCII case-insensitive), or NULL. */
const rd_http_header *rd_http_find_header(const rd_http_header *h, size_t n, const char *name);

/* Nonzero when a comma-separated header value contains token (ASCII
 * case-insensitive), e.g. "keep-alive, Upgrade" has "upgrade". */
int rd_http_has_token(const char *value, size_t value_len, const char *token);

/* The head of the 500 answer that carries a tunnel error as its text/plain
 * body of body_len bytes (what the Go example server sends), into out.
 * Returns its length (< cap; out always NUL-terminated). */
size_t rd_http_error_head(char *out, size_t cap, size_t body_len);

/* Nonzero when a == b[0..len) ignoring ASCII case. */
int rd_http_ieq(const char *a, const char *b, size_t len);

#endif
