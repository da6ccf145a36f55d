/* CONNECT through an HTTP proxy: the URL parser, the request builder and
 * the answer reader. Inputs sit at the end of exact-size heap blocks, so
 * ASan reports any read past them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_proxy_connect.h"
#include "rd_test.h"

static char *exact(const char *s, size_t n) {
  char *p = malloc(n ? n : 1);
  if (n > 0)
    memcpy(p, s, n);
  return p;
}

static int parse(const char *url, rd_proxy_url *out) {
  size_t n = strlen(url);
  char *b = exact(url, n);
  int rc = rd_proxy_parse_url(b, n, out);
  /* Results point into the input: copy what the checks need first. */
  static char host[300], user[600];
  if (rc == 0) {
    snprintf(host, sizeof host, "%.*s", (int)out->addr.host_len, out->addr.host);
    snprintf(user, sizeof user, "%.*s", (int)out->userinfo_len,
             out->userinfo != NULL ? out->userinfo : "");
    out->addr.host = host;
    out->userinfo = out->userinfo != NULL ? user : NULL;
  }
  free(b);
  return rc;
}

TEST(good_urls) {
  rd_proxy_url u;
  CHECK_EQ_INT(parse("http://proxy.corp:3128", &u), 0);
  CHECK_STR(u.addr.host, "proxy.corp");
  CHECK_EQ_INT(u.addr.port, 3128);
  CHECK(u.userinfo == NULL);
  CHECK_EQ_INT(parse("http://proxy/", &u), 0);
  CHECK_EQ_INT(u.addr.port, 80);
  CHECK_EQ_INT(parse("http://[::1]:8080", &u), 0);
  CHECK_STR(u.addr.host, "::1");
  CHECK_EQ_INT(parse("http://us%40er:p%3Ass@10.0.0.1:3128", &u), 0);
  CHECK_STR(u.userinfo, "us%40er:p%3Ass");
  CHECK(u.has_password);
  CHECK_STR(u.addr.host, "10.0.0.1");
  /* The userinfo runs to the last '@'. */
  CHECK_EQ_INT(parse("http://a@b:c@h:1", &u), 0);
  CHECK_STR(u.userinfo, "a@b:c");
  CHECK_STR(u.addr.host, "h");
  CHECK_EQ_INT(parse("http://user@h", &u), 0);
  CHECK(!u.has_password);
}

TEST(bad_urls) {
  rd_proxy_url u;
  CHECK_EQ_INT(parse("https://h:1", &u), RD_ADDR_EBAD_SCHEME);
  CHECK_EQ_INT(parse("socks5://h:1", &u), RD_ADDR_EBAD_SCHEME);
  CHECK_EQ_INT(parse("HTTP://h:1", &u), RD_ADDR_EBAD_SCHEME);
  CHECK_EQ_INT(parse("http:/", &u), RD_ADDR_EBAD_SCHEME);
  CHECK_EQ_INT(parse("", &u), RD_ADDR_EBAD_SCHEME);
  CHECK_EQ_INT(parse("http://", &u), RD_ADDR_EEMPTY);
  CHECK_EQ_INT(parse("http://h:99999", &u), RD_ADDR_EPORT_RANGE);
  CHECK_EQ_INT(parse("http://h:x", &u), RD_ADDR_EBAD_PORT);
  CHECK_EQ_INT(parse("http://:1", &u), RD_ADDR_EMISSING_HOST);
  CHECK_EQ_INT(parse("http://h:1/path", &u), RD_EMALFORMED);
  CHECK_EQ_INT(parse("http://h:1?q", &u), RD_EMALFORMED);
  CHECK_EQ_INT(parse("http://u:p%4@h", &u), RD_EMALFORMED);
  CHECK_EQ_INT(parse("http://u:p%@h", &u), RD_EMALFORMED);
  CHECK_EQ_INT(parse("http://u:p%zz@h", &u), RD_EMALFORMED);
  CHECK_EQ_INT(parse("http://u p@h", &u), RD_EMALFORMED);
  CHECK_EQ_INT(parse("http://u\"p@h", &u), RD_EMALFORMED);
  char long_user[RD_PROXY_USERINFO_MAX + 32];
  memset(long_user, 'u', sizeof long_user);
  memcpy(long_user, "http://", 7);
  snprintf(long_user + 7 + RD_PROXY_USERINFO_MAX + 1, 20, "@h:1");
  CHECK_EQ_INT(parse(long_user, &u), RD_EMALFORMED);
  long_user[7 + RD_PROXY_USERINFO_MAX] = '\0';
  /* Without its '@' it is all host, and too long for one. */
  CHECK_EQ_INT(parse(long_user, &u), RD_ADDR_EHOST_TOO_LONG);
}

TEST(requests) {
  rd_proxy_url u;
  char out[RD_PROXY_REQUEST_MAX];
  CHECK_EQ_INT(parse("http://proxy:3128", &u), 0);
  int n = rd_proxy_connect_request(out, sizeof out, "tunnel.example:443", &u);
  CHECK_STR(out, "CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n");
  CHECK_EQ_INT(n, (int)strlen(out));
  /* Decoded: "us@er:p:ss". */
  CHECK_EQ_INT(parse("http://us%40er:p%3Ass@proxy:3128", &u), 0);
  rd_proxy_connect_request(out, sizeof out, "[::1]:8123", &u);
  CHECK_STR(out, "CONNECT [::1]:8123 HTTP/1.1\r\nHost: [::1]:8123\r\n"
                 "Proxy-Authorization: Basic dXNAZXI6cDpzcw==\r\n\r\n");
  /* A user alone sends no credentials (Go's rule); an empty password does. */
  CHECK_EQ_INT(parse("http://user@proxy", &u), 0);
  rd_proxy_connect_request(out, sizeof out, "h:1", &u);
  CHECK_STR(out, "CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\n\r\n");
  CHECK_EQ_INT(parse("http://user:@proxy", &u), 0);
  rd_proxy_connect_request(out, sizeof out, "h:1", &u);
  CHECK_STR(out, "CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\nProxy-Authorization: Basic dXNlcjo=\r\n\r\n");
  /* Too small a buffer: an error and "". */
  CHECK_EQ_INT(rd_proxy_connect_request(out, 10, "h:1", &u), RD_ADDR_ENOSPACE);
  CHECK_STR(out, "");
  /* The longest credentials and target fit RD_PROXY_REQUEST_MAX. */
  static char url[RD_PROXY_USERINFO_MAX + 64];
  memcpy(url, "http://", 7);
  memset(url + 7, 'u', RD_PROXY_USERINFO_MAX);
  url[7 + RD_PROXY_USERINFO_MAX / 2] = ':';
  snprintf(url + 7 + RD_PROXY_USERINFO_MAX, 20, "@h:1");
  CHECK_EQ_INT(parse(url, &u), 0);
  char target[RD_ADDR_JOINED_MAX];
  memset(target, 'h', sizeof target - 1);
  target[sizeof target - 1] = '\0';
  CHECK(rd_proxy_connect_request(out, sizeof out, target, &u) > 0);
}

static int answer(const char *s, size_t max_head, int *status, char *line, size_t cap) {
  size_t n = strlen(s);
  char *b = exact(s, n);
  int rc = rd_proxy_connect_response(b, n, max_head, status, line, cap);
  free(b);
  return rc;
}

TEST(answers) {
  int status = 0;
  char line[64];
  static const char ok[] = "HTTP/1.0 200 Connection established\r\nProxy-agent: x\r\n\r\n";
  CHECK_EQ_INT(answer(ok, 4096, &status, line, sizeof line), (int)strlen(ok));
  CHECK_EQ_INT(status, 200);
  CHECK_STR(line, "HTTP/1.0 200 Connection established");
  /* Bytes after the head are the tunnel's: the head length says where. */
  CHECK_EQ_INT(answer("HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01", 4096, &status, line, sizeof line),
               19);
  CHECK_EQ_INT(answer("HTTP/1.1 407 Proxy Authentication Required\r\n"
                      "Proxy-Authenticate: Basic realm=\"p\"\r\n\r\n",
                      4096, &status, line, sizeof line) > 0,
               1);
  CHECK_EQ_INT(status, 407);
  CHECK_STR(line, "HTTP/1.1 407 Proxy Authentication Required");
  CHECK(answer("HTTP/1.1 502\r\n\r\n", 4096, &status, line, sizeof line) > 0);
  CHECK_STR(line, "HTTP/1.1 502");
  /* A long reason is cut to the caller's buffer. */
  CHECK(answer("HTTP/1.1 403 Forbidden by the proxy's policy for this port\r\n\r\n", 4096,
               &status, line, 20) > 0);
  CHECK_STR(line, "HTTP/1.1 403 Forbid");
  /* Every proper prefix is partial. */
  for (size_t i = 0; i < strlen(ok); i++) {
    char *b = exact(ok, i);
    CHECK_EQ_INT(rd_proxy_connect_response(b, i, 4096, &status, line, sizeof line), RD_EPARTIAL);
    free(b);
  }
  CHECK_EQ_INT(answer("SSH-2.0-OpenSSH\r\n\r\n", 4096, &status, line, sizeof line), RD_EMALFORMED);
  CHECK_EQ_INT(answer(ok, 20, &status, line, sizeof line), RD_ETOOLARGE);
}

RD_TEST_MAIN(T(good_urls), T(bad_urls), T(requests), T(answers))
