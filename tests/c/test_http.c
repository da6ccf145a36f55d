/* HTTP head parser: good heads, every prefix, limits and malformed input.
 * Every input sits at the very end of an exact-size heap block, so ASan
 * reports any read past it. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_http.h"
#include "rd_test.h"

#define MAX_HEAD 8192

static const char GOOD_REQUEST[] = "GET /connect?x=1 HTTP/1.1\r\n"
                                   "Host: 127.0.0.1:8123\r\n"
                                   "Upgrade: websocket\r\n"
                                   "Connection: keep-alive, Upgrade\r\n"
                                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                   "Sec-WebSocket-Version: 13\r\n"
                                   "X-Tunnel-ID:   foo  \t\r\n"
                                   "X-Empty:\r\n"
                                   "\r\n";

static const char GOOD_RESPONSE[] = "HTTP/1.1 101 Switching Protocols\r\n"
                                    "Upgrade: websocket\r\n"
                                    "Connection: Upgrade\r\n"
                                    "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                                    "\r\n";

/* An exact-size copy: no NUL terminator, nothing after the last byte. */
static char *exact(const char *s, size_t n) {
  char *p = calloc(n ? n : 1, 1);
  if (n > 0)
    memcpy(p, s, n);
  return n ? p : p + 1;
}

static void exact_free(char *p, size_t n) { free(n ? p : p - 1); }

static int parse_req(const char *s, size_t n, size_t max_head, size_t max_headers,
                     rd_http_request *req) {
  char *b = exact(s, n);
  int r = rd_http_parse_request(b, n, max_head, max_headers, req);
  exact_free(b, n);
  return r;
}

static int parse_resp(const char *s, size_t n, size_t max_head, rd_http_response *resp) {
  char *b = exact(s, n);
  int r = rd_http_parse_response(b, n, max_head, RD_HTTP_MAX_HEADERS, resp);
  exact_free(b, n);
  return r;
}

/* Request parse of a NUL-terminated literal with default limits. */
static int req_str(const char *s) {
  rd_http_request req;
  return parse_req(s, strlen(s), MAX_HEAD, RD_HTTP_MAX_HEADERS, &req);
}

static int resp_str(const char *s) {
  rd_http_response resp;
  return parse_resp(s, strlen(s), MAX_HEAD, &resp);
}

static int span_eq(const char *p, size_t n, const char *lit) {
  return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

TEST(good_request) {
  size_t n = strlen(GOOD_REQUEST);
  char *b = exact(GOOD_REQUEST, n);
  rd_http_request req;
  CHECK_EQ_INT(rd_http_parse_request(b, n, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), (int)n);
  CHECK(span_eq(req.method, req.method_len, "GET"));
  CHECK(span_eq(req.target, req.target_len, "/connect?x=1"));
  CHECK_EQ_INT(req.minor_version, 1);
  CHECK_EQ_INT(req.num_headers, 7);
  CHECK(span_eq(req.headers[0].name, req.headers[0].name_len, "Host"));
  CHECK(span_eq(req.headers[0].value, req.headers[0].value_len, "127.0.0.1:8123"));
  /* Values lose surrounding spaces and tabs. */
  CHECK(span_eq(req.headers[5].value, req.headers[5].value_len, "foo"));
  CHECK_EQ_INT(req.headers[6].value_len, 0);
  /* Results point into the caller's buffer. */
  CHECK(req.method == b);
  CHECK(req.headers[0].name > b && req.headers[0].name < b + n);

  const rd_http_header *h = rd_http_find_header(req.headers, req.num_headers, "upgrade");
  CHECK(h != NULL && span_eq(h->value, h->value_len, "websocket"));
  h = rd_http_find_header(req.headers, req.num_headers, "SEC-WEBSOCKET-KEY");
  CHECK(h != NULL && span_eq(h->value, h->value_len, "dGhlIHNhbXBsZSBub25jZQ=="));
  h = rd_http_find_header(req.headers, req.num_headers, "connection");
  CHECK(h != NULL && rd_http_has_token(h->value, h->value_len, "upgrade"));
  CHECK(h != NULL && rd_http_has_token(h->value, h->value_len, "KEEP-ALIVE"));
  CHECK(h != NULL && !rd_http_has_token(h->value, h->value_len, "close"));
  CHECK(rd_http_find_header(req.headers, req.num_headers, "Sec-WebSocket") == NULL);
  CHECK(rd_http_find_header(req.headers, req.num_headers, "Sec-WebSocket-Keys") == NULL);
  exact_free(b, n);
}

TEST(body_follows_head) {
  /* The return value is where the body (or WebSocket frames) start. */
  static const char s[] = "GET / HTTP/1.1\r\nHost: a\r\n\r\n\x82\x00more";
  size_t head = strlen("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
  rd_http_request req;
  CHECK_EQ_INT(parse_req(s, sizeof s - 1, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), (int)head);
}

TEST(every_prefix_partial) {
  rd_http_request req;
  size_t n = strlen(GOOD_REQUEST);
  for (size_t k = 0; k < n; k++)
    CHECK_EQ_INT(parse_req(GOOD_REQUEST, k, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), RD_EPARTIAL);
  CHECK_EQ_INT(parse_req(GOOD_REQUEST, n, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), (int)n);
  rd_http_response resp;
  n = strlen(GOOD_RESPONSE);
  for (size_t k = 0; k < n; k++)
    CHECK_EQ_INT(parse_resp(GOOD_RESPONSE, k, MAX_HEAD, &resp), RD_EPARTIAL);
  CHECK_EQ_INT(parse_resp(GOOD_RESPONSE, n, MAX_HEAD, &resp), (int)n);
}

TEST(bare_lf) {
  static const char s[] = "GET /connect HTTP/1.1\nHost: x\nUpgrade: websocket\r\n\n";
  rd_http_request req;
  size_t n = strlen(s);
  char *b = exact(s, n);
  CHECK_EQ_INT(rd_http_parse_request(b, n, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), (int)n);
  CHECK_EQ_INT(req.num_headers, 2);
  CHECK(span_eq(req.headers[0].value, req.headers[0].value_len, "x"));
  exact_free(b, n);
  for (size_t k = 0; k < n; k++)
    CHECK_EQ_INT(parse_req(s, k, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), RD_EPARTIAL);
  CHECK_EQ_INT(req_str("GET / HTTP/1.0\n\n"), 16);
  /* A bare CR is not a line end. */
  CHECK_EQ_INT(req_str("GET / HTTP/1.1\rHost: x\r\n\r\n"), RD_EMALFORMED);
  CHECK_EQ_INT(req_str("GET / HTTP/1.1\r\nHost: x\r\r\n\r\n"), RD_EMALFORMED);
  CHECK_EQ_INT(req_str("GET / HTTP/1.1\r\nHost: x\r\n\rX"), RD_EMALFORMED);
}

TEST(head_too_large) {
  rd_http_request req;
  size_t n = strlen(GOOD_REQUEST);
  /* Exactly the limit is fine; one less is too large. */
  CHECK_EQ_INT(parse_req(GOOD_REQUEST, n, n, RD_HTTP_MAX_HEADERS, &req), (int)n);
  CHECK_EQ_INT(parse_req(GOOD_REQUEST, n, n - 1, RD_HTTP_MAX_HEADERS, &req), RD_ETOOLARGE);
  /* Incomplete but already past the limit: too large, not partial. */
  CHECK_EQ_INT(parse_req(GOOD_REQUEST, 40, 30, RD_HTTP_MAX_HEADERS, &req), RD_ETOOLARGE);
  CHECK_EQ_INT(parse_req(GOOD_REQUEST, 30, 30, RD_HTTP_MAX_HEADERS, &req), RD_EPARTIAL);
  CHECK_EQ_INT(parse_req(GOOD_REQUEST, 31, 30, RD_HTTP_MAX_HEADERS, &req), RD_ETOOLARGE);
  /* An endless header line. */
  size_t big = 20000;
  char *s = malloc(big);
  memcpy(s, "GET / HTTP/1.1\r\nX: ", 19);
  memset(s + 19, 'a', big - 19);
  CHECK_EQ_INT(parse_req(s, big, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), RD_ETOOLARGE);
  CHECK_EQ_INT(parse_req(s, MAX_HEAD, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), RD_EPARTIAL);
  free(s);
  /* Malformed bytes inside the limit still read as malformed. */
  CHECK_EQ_INT(parse_req("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 31, 20, 64, &req),
               RD_EMALFORMED);
  /* Responses have the same bound. */
  rd_http_response resp;
  n = strlen(GOOD_RESPONSE);
  CHECK_EQ_INT(parse_resp(GOOD_RESPONSE, n, n - 1, &resp), RD_ETOOLARGE);
}

TEST(too_many_headers) {
  char s[4096];
  size_t n = (size_t)snprintf(s, sizeof s, "GET / HTTP/1.1\r\n");
  for (int i = 0; i < RD_HTTP_MAX_HEADERS; i++)
    n += (size_t)snprintf(s + n, sizeof s - n, "H%d: v\r\n", i);
  n += (size_t)snprintf(s + n, sizeof s - n, "\r\n");
  rd_http_request req;
  CHECK_EQ_INT(parse_req(s, n, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req), (int)n);
  CHECK_EQ_INT(req.num_headers, RD_HTTP_MAX_HEADERS);
  /* A caller's lower bound. */
  CHECK_EQ_INT(parse_req(s, n, MAX_HEAD, 10, &req), RD_ETOOLARGE);
  CHECK_EQ_INT(parse_req(s, n, MAX_HEAD, 0, &req), RD_ETOOLARGE);
  /* A bound above the array's size is capped to it. */
  CHECK_EQ_INT(parse_req(s, n, MAX_HEAD, 1000, &req), (int)n);
  /* One more than the array holds. */
  n -= 2;
  n += (size_t)snprintf(s + n, sizeof s - n, "Extra: v\r\n\r\n");
  CHECK_EQ_INT(parse_req(s, n, MAX_HEAD, 1000, &req), RD_ETOOLARGE);
  /* Known as soon as the extra header begins, even incomplete. */
  size_t cut = (size_t)(strstr(s, "Extra") - s) + 1;
  CHECK_EQ_INT(parse_req(s, cut, MAX_HEAD, 1000, &req), RD_ETOOLARGE);
}

TEST(malformed_request_lines) {
  static const char *bad[] = {
      "G(T / HTTP/1.1\r\n\r\n",         /* method not a token */
      "GET\t/ HTTP/1.1\r\n\r\n",        /* tab separator */
      " GET / HTTP/1.1\r\n\r\n",        /* leading space */
      "\r\nGET / HTTP/1.1\r\n\r\n",     /* leading empty line */
      "GET  / HTTP/1.1\r\n\r\n",        /* two spaces */
      "GET / HTTP/1.1 \r\n\r\n",        /* trailing space */
      "GET /\r\n\r\n",                  /* HTTP/0.9 */
      "GET / HTTP/2.0\r\n\r\n",         /* version */
      "GET / HTTP/1.2\r\n\r\n",
      "GET / http/1.1\r\n\r\n",
      "GET / HTTP/1.10\r\n\r\n",
      "GET / HTTP/1.\r\n\r\n",
      "GET x HTTP/1.1\r\n\r\n",         /* target form */
      "GET * HTTP/1.1\r\n\r\n",
      "GET http:/x HTTP/1.1\r\n\r\n",
      "GET http:// HTTP/1.1\r\n\r\n",
      "GET 1http://x/ HTTP/1.1\r\n\r\n",
      "GET /a\x01 HTTP/1.1\r\n\r\n",    /* control character in target */
      "GET /\x7f HTTP/1.1\r\n\r\n",
      "GET /\xc3\xa9 HTTP/1.1\r\n\r\n", /* raw non-ASCII target */
      "GET / HTTP/1.1\x00\r\n\r\n",
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(bad); i++) {
    /* The literals with an embedded NUL are measured by hand. */
    size_t n = strlen(bad[i]);
    if (i == RD_ARRAY_SIZE(bad) - 1)
      n = 19;
    rd_http_request req;
    int r = parse_req(bad[i], n, MAX_HEAD, RD_HTTP_MAX_HEADERS, &req);
    if (r != RD_EMALFORMED) {
      fprintf(stderr, "accepted bad request line %zu (%d)\n", i, r);
      CHECK(0);
    }
  }
  /* Early detection: the bad byte alone decides, before the head ends. */
  CHECK_EQ_INT(req_str("G(T"), RD_EMALFORMED);
  CHECK_EQ_INT(req_str("GET / HTTP/2"), RD_EMALFORMED);
  /* Accepted shapes. */
  CHECK(req_str("POST /v3/connect HTTP/1.0\r\n\r\n") > 0);
  CHECK(req_str("GET http://example.com:80/connect HTTP/1.1\r\n\r\n") > 0);
  CHECK(req_str("M-SEARCH /%C3%A9?q=a&b=c#x HTTP/1.1\r\n\r\n") > 0);
}

TEST(malformed_headers) {
  static const char *bad[] = {
      "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
      "GET / HTTP/1.1\r\nName : v\r\n\r\n",   /* space before colon */
      "GET / HTTP/1.1\r\n: v\r\n\r\n",        /* empty name */
      "GET / HTTP/1.1\r\nNa(me: v\r\n\r\n",   /* name not a token */
      "GET / HTTP/1.1\r\nA: b\x01\r\n\r\n",   /* control characters in value */
      "GET / HTTP/1.1\r\nA: b\x7f\r\n\r\n",
      "GET / HTTP/1.1\r\nA: b\x1b[0m\r\n\r\n",
      "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", /* obsolete line folding */
      "GET / HTTP/1.1\r\nA: b\r\n\tc\r\n\r\n",
      "GET / HTTP/1.1\r\n X: b\r\n\r\n",      /* whitespace before first header */
      "GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",    /* CR inside a value */
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(bad); i++) {
    int r = req_str(bad[i]);
    if (r != RD_EMALFORMED) {
      fprintf(stderr, "accepted bad header %zu (%d)\n", i, r);
      CHECK(0);
    }
  }
  /* NUL inside a value. */
  static const char nul[] = "GET / HTTP/1.1\r\nA: b\0c\r\n\r\n";
  rd_http_request req;
  CHECK_EQ_INT(parse_req(nul, sizeof nul - 1, MAX_HEAD, 64, &req), RD_EMALFORMED);
  /* Obsolete text (bytes >= 0x80) and tabs are allowed in values. */
  CHECK(req_str("GET / HTTP/1.1\r\nA: caf\xc3\xa9\tb\r\n\r\n") > 0);
}

TEST(good_response) {
  size_t n = strlen(GOOD_RESPONSE);
  char *b = exact(GOOD_RESPONSE, n);
  rd_http_response resp;
  CHECK_EQ_INT(rd_http_parse_response(b, n, MAX_HEAD, RD_HTTP_MAX_HEADERS, &resp), (int)n);
  CHECK_EQ_INT(resp.minor_version, 1);
  CHECK_EQ_INT(resp.status, 101);
  CHECK(span_eq(resp.reason, resp.reason_len, "Switching Protocols"));
  CHECK_EQ_INT(resp.num_headers, 3);
  const rd_http_header *h = rd_http_find_header(resp.headers, resp.num_headers,
                                                "sec-websocket-accept");
  CHECK(h != NULL && span_eq(h->value, h->value_len, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
  exact_free(b, n);

  /* Other statuses and reason shapes. */
  rd_http_response r2;
  static const char s401[] = "HTTP/1.0 401 Unauthorized\r\nContent-Length: 21\r\n\r\n";
  CHECK_EQ_INT(parse_resp(s401, strlen(s401), MAX_HEAD, &r2), (int)strlen(s401));
  CHECK_EQ_INT(r2.status, 401);
  CHECK_EQ_INT(r2.minor_version, 0);
  static const char empty_reason[] = "HTTP/1.1 200 \r\n\r\n";
  CHECK_EQ_INT(parse_resp(empty_reason, strlen(empty_reason), MAX_HEAD, &r2),
               (int)strlen(empty_reason));
  CHECK_EQ_INT(r2.reason_len, 0);
  static const char no_reason[] = "HTTP/1.1 200\r\n\r\n";
  CHECK_EQ_INT(parse_resp(no_reason, strlen(no_reason), MAX_HEAD, &r2), (int)strlen(no_reason));
  CHECK_EQ_INT(r2.status, 200);
  CHECK_EQ_INT(r2.reason_len, 0);
}

TEST(malformed_responses) {
  static const char *bad[] = {
      "HTTP/1.1 10 Short\r\n\r\n",     "HTTP/1.1 1010 Long\r\n\r\n",
      "HTTP/1.1 abc Bad\r\n\r\n",      "HTTP/1.1 099 Low\r\n\r\n",
      "HTTP/2 101 X\r\n\r\n",          "HTTP/1.1  101 X\r\n\r\n",
      "HTTP/1.1 101 X\x01\r\n\r\n",    "ICY 200 OK\r\n\r\n",
      "HTTP/1.1 101 X\r\nA b\r\n\r\n", "HTTP/1.1 101 X\r\n fold\r\n\r\n",
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(bad); i++) {
    int r = resp_str(bad[i]);
    if (r != RD_EMALFORMED) {
      fprintf(stderr, "accepted bad response %zu (%d)\n", i, r);
      CHECK(0);
    }
  }
}

TEST(find_header_and_tokens) {
  rd_http_header h[3] = {{"Upgrade", 7, "WebSocket", 9},
                         {"connection", 10, "Upgrade", 7},
                         {"UPGRADE", 7, "second", 6}};
  const rd_http_header *f = rd_http_find_header(h, 3, "UPGRADE");
  CHECK(f == &h[0]); /* the first of several */
  CHECK(rd_http_find_header(h, 3, "Connection") == &h[1]);
  CHECK(rd_http_find_header(h, 3, "Connectio") == NULL);
  CHECK(rd_http_find_header(h, 3, "Connections") == NULL);
  CHECK(rd_http_find_header(h, 0, "Upgrade") == NULL);

  static const char v[] = "keep-alive,  Upgrade ,\tfoo";
  CHECK(rd_http_has_token(v, strlen(v), "upgrade"));
  CHECK(rd_http_has_token(v, strlen(v), "KEEP-ALIVE"));
  CHECK(rd_http_has_token(v, strlen(v), "foo"));
  CHECK(!rd_http_has_token(v, strlen(v), "up"));
  CHECK(!rd_http_has_token(v, strlen(v), "upgrade ,"));
  CHECK(!rd_http_has_token(v, strlen(v), ""));
  CHECK(!rd_http_has_token("", 0, "upgrade"));
  CHECK(!rd_http_has_token(",,", 2, "upgrade"));
  CHECK(rd_http_has_token("websocket", 9, "WebSocket"));
  /* value_len bounds the scan: "websocketX" cut to 9 matches. */
  char *b = exact("websocketX", 9);
  CHECK(rd_http_has_token(b, 9, "websocket"));
  exact_free(b, 9);

  CHECK(rd_http_ieq("Host", "hOST", 4));
  CHECK(!rd_http_ieq("Host", "Hos", 3));
  CHECK(!rd_http_ieq("Hos", "Host", 4));
  CHECK(rd_http_ieq("", "x", 0));
  /* Only ASCII letters fold: '@' (0x40) and '`' (0x60) differ. */
  CHECK(!rd_http_ieq("@", "`", 1));
}

RD_TEST_MAIN(T(good_request), T(body_follows_head), T(every_prefix_partial), T(bare_lf),
             T(head_too_large), T(too_many_headers), T(malformed_request_lines),
             T(malformed_headers), T(good_response), T(malformed_responses),
             T(find_header_and_tokens))
