/* HTTP/1.1 head parser (RFC 9112), strict and bounded. It reads at most
 * max_head bytes, never allocates, and reports malformed input as soon as a
 * byte proves it, even before the head is complete. */
#include "rd_http.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

/* tchar (RFC 9110 section 5.6.2): the characters of methods and header
 * names. */
static int rd_http_is_tchar(unsigned char c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
    return 1;
  switch (c) {
  case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
  case '-': case '.': case '^': case '_': case '`': case '|': case '~':
    return 1;
  default:
    return 0;
  }
}

/* Header values and reason phrases: HTAB, SP, VCHAR and obs-text. */
static int rd_http_is_text(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

/* A request target: visible ASCII only. Non-ASCII must be percent-encoded. */
static int rd_http_is_target_char(unsigned char c) { return c > 0x20 && c < 0x7f; }

static unsigned char rd_http_lower(unsigned char c) {
  return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + ('a' - 'A')) : c;
}

/* The bytes under parse: buf[0..len) where len is already cut to max_head. */
typedef struct rd_http_cursor {
  const unsigned char *buf;
  size_t len;
  size_t pos;
} rd_http_cursor;

/* Consumes a line end at the cursor: CRLF, or a bare LF (tolerated as RFC
 * 9112 section 2.2 allows). A CR not followed by LF is malformed. */
static int rd_http_line_end(rd_http_cursor *c) {
  if (c->pos >= c->len)
    return RD_EPARTIAL;
  if (c->buf[c->pos] == '\n') {
    c->pos++;
    return RD_OK;
  }
  if (c->buf[c->pos] != '\r')
    return RD_EMALFORMED;
  if (c->pos + 1 >= c->len)
    return RD_EPARTIAL;
  if (c->buf[c->pos + 1] != '\n')
    return RD_EMALFORMED;
  c->pos += 2;
  return RD_OK;
}

/* Matches a literal prefix byte by byte, so a wrong byte is reported even
 * when the rest has not arrived. */
static int rd_http_expect(rd_http_cursor *c, const char *lit) {
  for (; *lit != '\0'; lit++) {
    if (c->pos >= c->len)
      return RD_EPARTIAL;
    if (c->buf[c->pos] != (unsigned char)*lit)
      return RD_EMALFORMED;
    c->pos++;
  }
  return RD_OK;
}

/* "HTTP/1.0" or "HTTP/1.1"; stores the minor digit. */
static int rd_http_version(rd_http_cursor *c, int *minor) {
  int r = rd_http_expect(c, "HTTP/1.");
  if (r != RD_OK)
    return r;
  if (c->pos >= c->len)
    return RD_EPARTIAL;
  unsigned char d = c->buf[c->pos];
  if (d != '0' && d != '1')
    return RD_EMALFORMED;
  *minor = d - '0';
  c->pos++;
  return RD_OK;
}

/* Header lines up to and including the empty line that ends the head. */
static int rd_http_headers(rd_http_cursor *c, rd_http_header *headers, size_t max_headers,
                           size_t *num_headers) {
  *num_headers = 0;
  for (;;) {
    if (c->pos >= c->len)
      return RD_EPARTIAL;
    unsigned char ch = c->buf[c->pos];
    if (ch == '\r' || ch == '\n')
      return rd_http_line_end(c);
    /* A line starting with whitespace is obsolete line folding (RFC 9112
     * section 5.2), a smuggling vector; refuse it. */
    if (ch == ' ' || ch == '\t')
      return RD_EMALFORMED;
    if (*num_headers >= max_headers)
      return RD_ETOOLARGE;

    rd_http_header *h = &headers[*num_headers];
    size_t start = c->pos;
    while (c->pos < c->len && rd_http_is_tchar(c->buf[c->pos]))
      c->pos++;
    if (c->pos >= c->len)
      return RD_EPARTIAL;
    /* No whitespace is allowed before the colon (RFC 9112 section 5.1). */
    if (c->buf[c->pos] != ':' || c->pos == start)
      return RD_EMALFORMED;
    h->name = (const char *)c->buf + start;
    h->name_len = c->pos - start;
    c->pos++;

    while (c->pos < c->len && (c->buf[c->pos] == ' ' || c->buf[c->pos] == '\t'))
      c->pos++;
    start = c->pos;
    while (c->pos < c->len && rd_http_is_text(c->buf[c->pos]))
      c->pos++;
    if (c->pos >= c->len)
      return RD_EPARTIAL;
    size_t end = c->pos;
    while (end > start && (c->buf[end - 1] == ' ' || c->buf[end - 1] == '\t'))
      end--;
    h->value = (const char *)c->buf + start;
    h->value_len = end - start;
    /* The value stopped at a byte that is not text: only a line end is
     * acceptable there. */
    int r = rd_http_line_end(c);
    if (r != RD_OK)
      return r;
    (*num_headers)++;
  }
}

/* Runs a head parser over at most max_head bytes and maps "ran out" to
 * RD_ETOOLARGE when the input already went past the limit. The result must
 * fit in an int, so max_head is also capped at INT_MAX. */
static size_t rd_http_limit(size_t len, size_t max_head) {
  if (max_head > INT_MAX)
    max_head = INT_MAX;
  return len < max_head ? len : max_head;
}

static int rd_http_finish(int r, const rd_http_cursor *c, size_t len) {
  if (r == RD_OK)
    return (int)c->pos;
  if (r == RD_EPARTIAL && len > c->len)
    return RD_ETOOLARGE;
  return r;
}

static int rd_http_target_ok(const unsigned char *t, size_t n) {
  if (t[0] == '/')
    return 1;
  /* absolute-form: scheme "://" ... (RFC 3986 section 3.1 scheme). */
  size_t i = 0;
  if (!((t[0] >= 'a' && t[0] <= 'z') || (t[0] >= 'A' && t[0] <= 'Z')))
    return 0;
  while (i < n && ((t[i] >= 'a' && t[i] <= 'z') || (t[i] >= 'A' && t[i] <= 'Z') ||
                   (t[i] >= '0' && t[i] <= '9') || t[i] == '+' || t[i] == '-' || t[i] == '.'))
    i++;
  return n - i > 3 && memcmp(t + i, "://", 3) == 0;
}

static int rd_http_request_line(rd_http_cursor *c, rd_http_request *req) {
  size_t start = c->pos;
  while (c->pos < c->len && rd_http_is_tchar(c->buf[c->pos]))
    c->pos++;
  if (c->pos >= c->len)
    return RD_EPARTIAL;
  if (c->buf[c->pos] != ' ' || c->pos == start)
    return RD_EMALFORMED;
  req->method = (const char *)c->buf + start;
  req->method_len = c->pos - start;
  c->pos++;

  start = c->pos;
  while (c->pos < c->len && rd_http_is_target_char(c->buf[c->pos]))
    c->pos++;
  if (c->pos >= c->len)
    return RD_EPARTIAL;
  if (c->buf[c->pos] != ' ' || c->pos == start ||
      !rd_http_target_ok(c->buf + start, c->pos - start))
    return RD_EMALFORMED;
  req->target = (const char *)c->buf + start;
  req->target_len = c->pos - start;
  c->pos++;

  int r = rd_http_version(c, &req->minor_version);
  if (r != RD_OK)
    return r;
  return rd_http_line_end(c);
}

int rd_http_parse_request(const char *buf, size_t len, size_t max_head, size_t max_headers,
                          rd_http_request *req) {
  rd_http_cursor c = {(const unsigned char *)buf, rd_http_limit(len, max_head), 0};
  if (max_headers > RD_HTTP_MAX_HEADERS)
    max_headers = RD_HTTP_MAX_HEADERS;
  req->num_headers = 0;
  int r = rd_http_request_line(&c, req);
  if (r == RD_OK)
    r = rd_http_headers(&c, req->headers, max_headers, &req->num_headers);
  return rd_http_finish(r, &c, len);
}

static int rd_http_status_line(rd_http_cursor *c, rd_http_response *resp) {
  int r = rd_http_version(c, &resp->minor_version);
  if (r != RD_OK)
    return r;
  r = rd_http_expect(c, " ");
  if (r != RD_OK)
    return r;
  int status = 0;
  for (int i = 0; i < 3; i++) {
    if (c->pos >= c->len)
      return RD_EPARTIAL;
    unsigned char d = c->buf[c->pos];
    if (d < '0' || d > '9' || (i == 0 && d == '0'))
      return RD_EMALFORMED;
    status = status * 10 + (d - '0');
    c->pos++;
  }
  resp->status = status;
  if (c->pos >= c->len)
    return RD_EPARTIAL;
  /* The reason phrase may be empty, and some servers drop the SP before
   * it too; both are accepted. */
  resp->reason = (const char *)c->buf + c->pos;
  resp->reason_len = 0;
  if (c->buf[c->pos] == ' ') {
    c->pos++;
    size_t start = c->pos;
    while (c->pos < c->len && rd_http_is_text(c->buf[c->pos]))
      c->pos++;
    resp->reason = (const char *)c->buf + start;
    resp->reason_len = c->pos - start;
  }
  return rd_http_line_end(c);
}

int rd_http_parse_response(const char *buf, size_t len, size_t max_head, size_t max_headers,
                           rd_http_response *resp) {
  rd_http_cursor c = {(const unsigned char *)buf, rd_http_limit(len, max_head), 0};
  if (max_headers > RD_HTTP_MAX_HEADERS)
    max_headers = RD_HTTP_MAX_HEADERS;
  resp->num_headers = 0;
  int r = rd_http_status_line(&c, resp);
  if (r == RD_OK)
    r = rd_http_headers(&c, resp->headers, max_headers, &resp->num_headers);
  return rd_http_finish(r, &c, len);
}

int rd_http_ieq(const char *a, const char *b, size_t len) {
  for (size_t i = 0; i < len; i++) {
    if (a[i] == '\0' || rd_http_lower((unsigned char)a[i]) != rd_http_lower((unsigned char)b[i]))
      return 0;
  }
  return a[len] == '\0';
}

const rd_http_header *rd_http_find_header(const rd_http_header *h, size_t n, const char *name) {
  for (size_t i = 0; i < n; i++) {
    if (rd_http_ieq(name, h[i].name, h[i].name_len))
      return &h[i];
  }
  return NULL;
}

int rd_http_has_token(const char *value, size_t value_len, const char *token) {
  size_t i = 0;
  while (i <= value_len) {
    /* One comma-separated element, without its surrounding whitespace. */
    size_t start = i;
    while (i < value_len && value[i] != ',')
      i++;
    size_t end = i;
    while (start < end && (value[start] == ' ' || value[start] == '\t'))
      start++;
    while (end > start && (value[end - 1] == ' ' || value[end - 1] == '\t'))
      end--;
    if (end > start && rd_http_ieq(token, value + start, end - start))
      return 1;
    i++; /* past the comma, or past the end to stop */
  }
  return 0;
}

size_t rd_http_error_head(char *out, size_t cap, size_t body_len) {
  int n = snprintf(out, cap,
                   "HTTP/1.1 500 Internal Server Error\r\n"
                   "Content-Type: text/plain; charset=utf-8\r\n"
                   "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                   body_len);
  return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}
