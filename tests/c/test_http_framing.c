/* HTTP/1.x framing: the body-length rules for requests and responses, the
 * smuggling refusals, and the chunked scanner fed whole and byte by byte. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_http_framing.h"
#include "rd_test.h"

static int req_framing(const char *head, rd_http_framing *f) {
  rd_http_request req;
  int n = rd_http_parse_request(head, strlen(head), 8192, RD_HTTP_MAX_HEADERS, &req);
  if (n <= 0)
    return -1000;
  return rd_http_request_framing(&req, f);
}

static int resp_framing(const char *head, const char *method, rd_http_framing *f) {
  rd_http_response resp;
  int n = rd_http_parse_response(head, strlen(head), 8192, RD_HTTP_MAX_HEADERS, &resp);
  if (n <= 0)
    return -1000;
  return rd_http_response_framing(&resp, method, strlen(method), f);
}

TEST(request_framing) {
  rd_http_framing f;
  CHECK_EQ_INT(req_framing("GET / HTTP/1.1\r\nHost: a\r\n\r\n", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_NONE);
  CHECK(f.keep_alive);
  CHECK_EQ_INT(req_framing("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_LENGTH);
  CHECK_EQ_INT(f.length, 12);
  CHECK_EQ_INT(req_framing("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_NONE);
  CHECK_EQ_INT(req_framing("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n", &f),
               RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_CHUNKED);
  /* Repeated equal lengths are one length. */
  CHECK_EQ_INT(req_framing("PUT / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
                           &f), RD_OK);
  CHECK_EQ_INT(f.length, 5);
  CHECK_EQ_INT(req_framing("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", &f), RD_OK);
  CHECK(!f.keep_alive);
  CHECK_EQ_INT(req_framing("GET / HTTP/1.0\r\n\r\n", &f), RD_OK);
  CHECK(!f.keep_alive);
  CHECK_EQ_INT(req_framing("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", &f), RD_OK);
  CHECK(f.keep_alive);
}

TEST(request_smuggling_refused) {
  rd_http_framing f;
  static const char *const bad[] = {
      "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
      "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
      "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
      "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
      "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
      "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
      "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(bad); i++) {
    int r = req_framing(bad[i], &f);
    if (r != RD_EMALFORMED)
      fprintf(stderr, "accepted: %s\n", bad[i]);
    CHECK_EQ_INT(r, RD_EMALFORMED);
  }
}

TEST(response_framing) {
  rd_http_framing f;
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "GET", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_LENGTH);
  CHECK(f.keep_alive);
  /* HEAD, 1xx, 204, 304: no body whatever the headers say. */
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_NONE);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 100 Continue\r\n\r\n", "POST", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_NONE);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 204 No Content\r\n\r\n", "GET", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_NONE);
  CHECK(f.keep_alive);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET", &f),
               RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_NONE);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", &f),
               RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_CHUNKED);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\n\r\n", "GET", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_CLOSE);
  CHECK(!f.keep_alive);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "GET", &f),
               RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_CLOSE);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            "GET", &f), RD_OK);
  CHECK_EQ_INT(f.kind, RD_BODY_NONE);
  CHECK(!f.keep_alive);
  CHECK_EQ_INT(resp_framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", "GET", &f), RD_OK);
  CHECK(!f.keep_alive);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked"
                            "\r\n\r\n", "GET", &f), RD_EMALFORMED);
  CHECK_EQ_INT(resp_framing("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                            "GET", &f), RD_EMALFORMED);
}

/* Feeds s whole and then byte by byte; both must agree on the body's end. */
static ssize_t chunked_end(const char *s, int *done) {
  rd_http_framing f = {RD_BODY_CHUNKED, 0, 1};
  rd_http_body b;
  rd_http_body_init(&b, &f);
  size_t len = strlen(s);
  uint8_t *copy = malloc(len ? len : 1);
  memcpy(copy, s, len);
  ssize_t whole = rd_http_body_feed(&b, copy, len);
  int whole_done = rd_http_body_done(&b);
  rd_http_body_init(&b, &f);
  ssize_t used = 0;
  for (size_t i = 0; i < len && !rd_http_body_done(&b); i++) {
    ssize_t r = rd_http_body_feed(&b, copy + i, 1);
    if (r < 0) {
      used = r;
      break;
    }
    used += r;
  }
  free(copy);
  CHECK_EQ_INT(used, whole);
  CHECK_EQ_INT(rd_http_body_done(&b), whole_done);
  *done = whole_done;
  return whole;
}

TEST(chunked_scanner) {
  int done;
  static const char body[] = "5\r\nhello\r\n0\r\n\r\nGET /next";
  CHECK_EQ_INT(chunked_end(body, &done), (ssize_t)strlen(body) - 9);
  CHECK(done);
  /* Extensions, upper-case hex, trailers. */
  static const char ext[] = "A;name=\"v\"\r\n0123456789\r\n0;x\r\nX-Sum: 1\r\nY: 2\r\n\r\nrest";
  CHECK_EQ_INT(chunked_end(ext, &done), (ssize_t)strlen(ext) - 4);
  CHECK(done);
  /* Incomplete: everything consumed, not done. */
  CHECK_EQ_INT(chunked_end("5\r\nhel", &done), 6);
  CHECK(!done);
  CHECK_EQ_INT(chunked_end("0\r\nTrailer: x\r\n", &done), 15);
  CHECK(!done);
  static const char *const bad[] = {
      "x\r\n", "\r\n", "5\nhello\r\n", "5\r\nhelloX\r\n", "5 \r\nhello\r\n",
      "-1\r\n", "1000000000000000\r\n", "0\r\nBad\nx\r\n\r\n", "0\r\n\n", "5\r\nhello\r\r",
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(bad); i++) {
    ssize_t r = chunked_end(bad[i], &done);
    if (r >= 0)
      fprintf(stderr, "accepted: %s\n", bad[i]);
    CHECK(r == RD_EMALFORMED);
  }
  /* A runaway extension or trailer is too large. */
  enum { n = RD_HTTP_TRAILERS_MAX + 16 };
  static char big[n + 8];
  memcpy(big, "0\r\nX: ", 6);
  memset(big + 6, 'a', n);
  big[n + 6] = '\0';
  CHECK(chunked_end(big, &done) == RD_ETOOLARGE);
  memcpy(big, "1;", 2);
  memset(big + 2, 'a', n + 4);
  CHECK(chunked_end(big, &done) == RD_ETOOLARGE);
}

TEST(length_and_close_bodies) {
  rd_http_framing f = {RD_BODY_LENGTH, 5, 1};
  rd_http_body b;
  rd_http_body_init(&b, &f);
  CHECK(!rd_http_body_done(&b));
  CHECK_EQ_INT(rd_http_body_feed(&b, (const uint8_t *)"abc", 3), 3);
  CHECK_EQ_INT(rd_http_body_feed(&b, (const uint8_t *)"deXYZ", 5), 2);
  CHECK(rd_http_body_done(&b));
  f.kind = RD_BODY_CLOSE;
  rd_http_body_init(&b, &f);
  CHECK_EQ_INT(rd_http_body_feed(&b, (const uint8_t *)"abc", 3), 3);
  CHECK(!rd_http_body_done(&b));
  f.kind = RD_BODY_NONE;
  rd_http_body_init(&b, &f);
  CHECK(rd_http_body_done(&b));
  CHECK_EQ_INT(rd_http_body_feed(&b, (const uint8_t *)"abc", 3), 0);
}

RD_TEST_MAIN(T(request_framing), T(request_smuggling_refused), T(response_framing),
             T(chunked_scanner), T(length_and_close_bodies))
