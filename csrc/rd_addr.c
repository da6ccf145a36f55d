/* Addresses: host:port, ws:// URLs and unix socket paths (see rd_addr.h).
 * Every reader works on (pointer, length) and never reads past it, so the
 * callers may hand it slices of a request or a message. */
#include "rd_addr.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

const char *rd_addr_strerror(int code) {
  switch (code) {
  case RD_ADDR_EMISSING_PORT: return "missing port in address";
  case RD_ADDR_EMISSING_BRACKET: return "missing ']' in address";
  case RD_ADDR_ETOO_MANY_COLONS: return "too many colons in address";
  case RD_ADDR_EUNEXPECTED_OPEN: return "unexpected '[' in address";
  case RD_ADDR_EUNEXPECTED_CLOSE: return "unexpected ']' in address";
  case RD_ADDR_EEMPTY: return "empty address";
  case RD_ADDR_EMISSING_HOST: return "missing host in address";
  case RD_ADDR_EBAD_HOST: return "invalid character in host";
  case RD_ADDR_EBAD_IPV6: return "invalid IPv6 address";
  case RD_ADDR_EHOST_TOO_LONG: return "host name too long";
  case RD_ADDR_EBAD_PORT: return "invalid port";
  case RD_ADDR_EPORT_RANGE: return "port out of range";
  case RD_ADDR_EBAD_SCHEME: return "unsupported URL scheme (want ws:// or wss://)";
  case RD_ADDR_ENOSPACE: return "address too long";
  default: return "invalid address";
  }
}

static const char *find(const char *s, size_t len, char c) { return memchr(s, c, len); }

static const char *find_last(const char *s, size_t len, char c) {
  while (len > 0)
    if (s[--len] == c)
      return s + len;
  return NULL;
}

/* Follows net.SplitHostPort line by line, its checks in its order, so that
 * the first complaint is the one Go makes. */
int rd_addr_split(const char *s, size_t len, rd_addr *out) {
  const char *colon = find_last(s, len, ':');
  if (colon == NULL)
    return RD_ADDR_EMISSING_PORT;
  size_t i = (size_t)(colon - s), j = 0, k = 0;
  if (s[0] == '[') {
    const char *close = find(s, len, ']');
    if (close == NULL)
      return RD_ADDR_EMISSING_BRACKET;
    size_t end = (size_t)(close - s);
    if (end + 1 == len)
      return RD_ADDR_EMISSING_PORT;
    if (end + 1 != i)
      return s[end + 1] == ':' ? RD_ADDR_ETOO_MANY_COLONS : RD_ADDR_EMISSING_PORT;
    out->host = s + 1;
    out->host_len = end - 1;
    out->bracketed = 1;
    j = 1;
    k = end + 1;
  } else {
    out->host = s;
    out->host_len = i;
    out->bracketed = 0;
    if (find(s, i, ':') != NULL)
      return RD_ADDR_ETOO_MANY_COLONS;
  }
  if (find(s + j, len - j, '[') != NULL)
    return RD_ADDR_EUNEXPECTED_OPEN;
  if (find(s + k, len - k, ']') != NULL)
    return RD_ADDR_EUNEXPECTED_CLOSE;
  out->port_text = colon + 1;
  out->port_len = len - i - 1;
  out->port = -1;
  return 0;
}

int rd_addr_go_port(const char *s, size_t len, long *port) {
  size_t i = 0;
  int neg = 0;
  if (len > 0 && (s[0] == '+' || s[0] == '-')) {
    neg = s[0] == '-';
    i = 1;
  }
  long n = 0;
  for (; i < len; i++) {
    if (s[i] < '0' || s[i] > '9')
      return 0;
    if (n < (1L << 30))
      n = n * 10 + (s[i] - '0');
  }
  if (n > (1L << 30))
    n = 1L << 30;
  *port = neg ? -n : n;
  return 1;
}

static int name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '.' || c == '-' || c == '_';
}

/* An IPv6 address with an optional "%zone". */
static int is_ipv6(const char *s, size_t len) {
  const char *pct = find(s, len, '%');
  size_t alen = pct != NULL ? (size_t)(pct - s) : len;
  if (pct != NULL) {
    size_t zlen = len - alen - 1;
    if (zlen == 0)
      return 0;
    for (size_t i = 0; i < zlen; i++)
      if (!name_char(pct[1 + i]))
        return 0;
  }
  char buf[64]; /* the longest form is 45 bytes */
  unsigned char bin[16];
  if (alen == 0 || alen >= sizeof buf)
    return 0;
  /* inet_pton reads a C string: nothing it would stop at (a NUL) or skip
   * may pass unseen. */
  for (size_t i = 0; i < alen; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') ||
          (s[i] >= 'A' && s[i] <= 'F') || s[i] == ':' || s[i] == '.'))
      return 0;
  memcpy(buf, s, alen);
  buf[alen] = '\0';
  return inet_pton(AF_INET6, buf, bin) == 1;
}

static int parse_port(const char *s, size_t len, int *port) {
  if (len == 0)
    return RD_ADDR_EBAD_PORT;
  long n = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] < '0' || s[i] > '9')
      return RD_ADDR_EBAD_PORT;
    if (n <= 65535)
      n = n * 10 + (s[i] - '0');
  }
  if (n > 65535)
    return RD_ADDR_EPORT_RANGE;
  *port = (int)n;
  return 0;
}

int rd_addr_parse(const char *s, size_t len, int default_port, unsigned flags, rd_addr *out) {
  memset(out, 0, sizeof *out);
  out->host = out->port_text = s;
  if (len == 0)
    return RD_ADDR_EEMPTY;
  const char *port = NULL; /* the text after the port's ':' */
  if (s[0] == '[') {
    const char *close = find(s, len, ']');
    if (close == NULL)
      return RD_ADDR_EMISSING_BRACKET;
    out->host = s + 1;
    out->host_len = (size_t)(close - s) - 1;
    out->bracketed = 1;
    size_t after = (size_t)(close - s) + 1;
    if (after < len) {
      if (s[after] != ':')
        return RD_ADDR_EMISSING_PORT;
      port = s + after + 1;
    }
    if (out->host_len > RD_ADDR_HOST_MAX)
      return RD_ADDR_EHOST_TOO_LONG;
    if (!is_ipv6(out->host, out->host_len))
      return RD_ADDR_EBAD_IPV6;
  } else {
    const char *colon = find(s, len, ':');
    if (colon != NULL && find(colon + 1, len - (size_t)(colon - s) - 1, ':') != NULL) {
      /* Two or more colons: only a bare IPv6 address, if allowed. */
      if (!(flags & RD_ADDR_BARE_IPV6) || default_port < 0)
        return RD_ADDR_ETOO_MANY_COLONS;
      if (len > RD_ADDR_HOST_MAX)
        return RD_ADDR_EHOST_TOO_LONG;
      if (!is_ipv6(s, len))
        return RD_ADDR_EBAD_IPV6;
      out->host_len = len;
    } else {
      out->host_len = colon != NULL ? (size_t)(colon - s) : len;
      if (colon != NULL)
        port = colon + 1;
      if (out->host_len > RD_ADDR_HOST_MAX)
        return RD_ADDR_EHOST_TOO_LONG;
      for (size_t i = 0; i < out->host_len; i++)
        if (!name_char(s[i]))
          return RD_ADDR_EBAD_HOST;
    }
  }
  if (out->host_len == 0 && !out->bracketed && !(flags & RD_ADDR_EMPTY_HOST))
    return RD_ADDR_EMISSING_HOST;
  if (port == NULL) {
    if (default_port < 0)
      return RD_ADDR_EMISSING_PORT;
    out->port_text = s + len;
    out->port_len = 0;
    out->port = default_port;
    return 0;
  }
  out->port_text = port;
  out->port_len = len - (size_t)(port - s);
  return parse_port(out->port_text, out->port_len, &out->port);
}

int rd_addr_join(char *out, size_t outlen, const char *host, size_t host_len, int port) {
  int n;
  if (host_len > 0x7fffffff)
    n = -1;
  else if (find(host, host_len, ':') != NULL)
    n = snprintf(out, outlen, "[%.*s]:%d", (int)host_len, host, port);
  else
    n = snprintf(out, outlen, "%.*s:%d", (int)host_len, host, port);
  if (n < 0 || (size_t)n >= outlen) {
    if (outlen > 0)
      out[0] = '\0';
    return RD_ADDR_ENOSPACE;
  }
  return n;
}

int rd_addr_parse_url(const char *url, size_t len, rd_addr_url *out) {
  memset(out, 0, sizeof *out);
  size_t skip;
  if (len >= 5 && memcmp(url, "ws://", 5) == 0) {
    skip = 5;
  } else if (len >= 6 && memcmp(url, "wss://", 6) == 0) {
    skip = 6;
    out->tls = 1;
  } else {
    return RD_ADDR_EBAD_SCHEME;
  }
  const char *a = url + skip;
  size_t rest = len - skip;
  const char *slash = find(a, rest, '/');
  out->authority = a;
  out->authority_len = slash != NULL ? (size_t)(slash - a) : rest;
  out->path = a + out->authority_len;
  out->path_len = rest - out->authority_len;
  return rd_addr_parse(a, out->authority_len, out->tls ? 443 : 80, 0, &out->addr);
}

/* Go's path.Clean, with the output in a buffer of its own: w is the write
 * position, dotdot where a ".." may no longer back up. */
int rd_addr_clean_path(const char *p, size_t len, char *out, size_t outlen) {
  if (outlen == 0)
    return RD_ADDR_ENOSPACE;
  size_t w = 0, r = 0, dotdot = 0;
  int rooted = len > 0 && p[0] == '/';
#define PUT(c)                                                                        \
  do {                                                                                \
    if (w + 1 >= outlen)                                                              \
      goto nospace;                                                                   \
    out[w++] = (c);                                                                   \
  } while (0)
  if (rooted) {
    PUT('/');
    r = dotdot = 1;
  }
  while (r < len) {
    if (p[r] == '/') {
      r++;
    } else if (p[r] == '.' && (r + 1 == len || p[r + 1] == '/')) {
      r++;
    } else if (p[r] == '.' && r + 1 < len && p[r + 1] == '.' && (r + 2 == len || p[r + 2] == '/')) {
      r += 2;
      if (w > dotdot) {
        w--;
        while (w > dotdot && out[w] != '/')
          w--;
      } else if (!rooted) {
        if (w > 0)
          PUT('/');
        PUT('.');
        PUT('.');
        dotdot = w;
      }
    } else {
      if ((rooted && w != 1) || (!rooted && w != 0))
        PUT('/');
      for (; r < len && p[r] != '/'; r++)
        PUT(p[r]);
    }
  }
  if (w == 0)
    PUT('.');
#undef PUT
  out[w] = '\0';
  return (int)w;
nospace:
  out[0] = '\0';
  return RD_ADDR_ENOSPACE;
}
