/* CONNECT through an HTTP proxy: URL, request and answer, without I/O. */
#include "rd_proxy_connect.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

#include "rd_http.h"

/* Go's validUserinfo set (net/url): unreserved, sub-delims, ':', '%', '@'. */
static int userinfo_char(unsigned char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
    return 1;
  return c != '\0' && strchr("-._:~!$&'()*+,;=%@", c) != NULL;
}

static int hex_value(unsigned char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Percent-decodes s[0..len) into out (room for len bytes). Returns the
 * decoded length or RD_EMALFORMED for a broken escape. */
static int percent_decode(const char *s, size_t len, char *out) {
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] != '%') {
      out[n++] = s[i];
      continue;
    }
    int hi = i + 2 < len ? hex_value((unsigned char)s[i + 1]) : -1;
    int lo = i + 2 < len ? hex_value((unsigned char)s[i + 2]) : -1;
    if (hi < 0 || lo < 0)
      return RD_EMALFORMED;
    out[n++] = (char)(hi * 16 + lo);
    i += 2;
  }
  return (int)n;
}

int rd_proxy_parse_url(const char *url, size_t len, rd_proxy_url *out) {
  static const char scheme[] = "http://";
  memset(out, 0, sizeof *out);
  if (len < sizeof scheme - 1 || memcmp(url, scheme, sizeof scheme - 1) != 0)
    return RD_ADDR_EBAD_SCHEME;
  const char *auth = url + sizeof scheme - 1;
  const char *end = url + len;
  size_t auth_len = 0;
  while (auth + auth_len < end && strchr("/?#", auth[auth_len]) == NULL)
    auth_len++;
  const char *rest = auth + auth_len;
  if (!(rest == end || (rest[0] == '/' && rest + 1 == end)))
    return RD_EMALFORMED;
  /* The userinfo runs to the last '@', as Go's url.Parse reads it. */
  const char *at = NULL;
  for (size_t i = 0; i < auth_len; i++)
    if (auth[i] == '@')
      at = auth + i;
  if (at != NULL) {
    size_t ulen = (size_t)(at - auth);
    if (ulen > RD_PROXY_USERINFO_MAX)
      return RD_EMALFORMED;
    char scratch[RD_PROXY_USERINFO_MAX];
    for (size_t i = 0; i < ulen; i++)
      if (!userinfo_char((unsigned char)auth[i]))
        return RD_EMALFORMED;
    if (percent_decode(auth, ulen, scratch) < 0)
      return RD_EMALFORMED;
    out->userinfo = auth;
    out->userinfo_len = ulen;
    out->has_password = memchr(auth, ':', ulen) != NULL;
    auth_len -= ulen + 1;
    auth = at + 1;
  }
  return rd_addr_parse(auth, auth_len, 80, 0, &out->addr);
}

int rd_proxy_connect_request(char *out, size_t cap, const char *target,
                             const rd_proxy_url *proxy) {
  char auth[4 * RD_PROXY_USERINFO_MAX / 3 + 64] = "";
  if (proxy->userinfo != NULL && proxy->has_password) {
    unsigned char plain[RD_PROXY_USERINFO_MAX];
    int n = proxy->userinfo_len <= sizeof plain
                ? percent_decode(proxy->userinfo, proxy->userinfo_len, (char *)plain)
                : RD_EMALFORMED;
    if (n < 0) {
      if (cap > 0)
        out[0] = '\0';
      return RD_ADDR_ENOSPACE; /* rd_proxy_parse_url never lets this through */
    }
    static const char prefix[] = "Proxy-Authorization: Basic ";
    memcpy(auth, prefix, sizeof prefix - 1);
    int b = EVP_EncodeBlock((unsigned char *)auth + sizeof prefix - 1, plain, n);
    memcpy(auth + sizeof prefix - 1 + b, "\r\n", 3);
  }
  int n = snprintf(out, cap, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n", target, target, auth);
  if (n < 0 || (size_t)n >= cap) {
    if (cap > 0)
      out[0] = '\0';
    return RD_ADDR_ENOSPACE;
  }
  return n;
}

int rd_proxy_connect_response(const char *buf, size_t len, size_t max_head, int *status,
                              char *status_line, size_t cap) {
  rd_http_response resp;
  int n = rd_http_parse_response(buf, len, max_head, RD_HTTP_MAX_HEADERS, &resp);
  if (n < 0)
    return n;
  *status = resp.status;
  int w = snprintf(status_line, cap, "HTTP/1.%d %d ", resp.minor_version, resp.status);
  size_t at = w > 0 && (size_t)w < cap ? (size_t)w : cap - 1;
  for (size_t i = 0; i < resp.reason_len && at + 1 < cap; i++) {
    unsigned char c = (unsigned char)resp.reason[i];
    status_line[at++] = c < 0x20 || c == 0x7f ? '?' : (char)c;
  }
  /* No reason phrase: drop the trailing space. */
  if (resp.reason_len == 0 && at > 0 && status_line[at - 1] == ' ')
    at--;
  status_line[at] = '\0';
  return n;
}
