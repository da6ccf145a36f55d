/* The stream route's target and destination, without I/O. */
#include "rd_stream.h"

#include <stdio.h>
#include <string.h>

static int unreserved(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '.' || c == '_' || c == '~' || c == ':';
}

int rd_stream_encode(char *out, size_t cap, const char *s) {
  static const char hex[] = "0123456789ABCDEF";
  size_t n = 0;
  for (; *s != '\0'; s++) {
    unsigned char c = (unsigned char)*s;
    size_t need = unreserved(c) ? 1 : 3;
    if (n + need >= cap) {
      if (cap > 0)
        out[0] = '\0';
      return RD_ADDR_ENOSPACE;
    }
    if (need == 1) {
      out[n++] = (char)c;
    } else {
      out[n++] = '%';
      out[n++] = hex[c >> 4];
      out[n++] = hex[c & 15];
    }
  }
  if (cap == 0)
    return RD_ADDR_ENOSPACE;
  out[n] = '\0';
  return (int)n;
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

/* Decodes s[0..len) into out[0..cap). 0, or RD_EMALFORMED with why. */
static int decode(const char *s, size_t len, char *out, size_t cap, const char *name,
                  const char **why) {
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    int c = (unsigned char)s[i];
    if (c == '%') {
      int hi = i + 2 < len ? hex_value((unsigned char)s[i + 1]) : -1;
      int lo = i + 2 < len ? hex_value((unsigned char)s[i + 2]) : -1;
      if (hi < 0 || lo < 0) {
        *why = "bad percent escape in the path";
        return RD_EMALFORMED;
      }
      c = hi * 16 + lo;
      i += 2;
    }
    if (c < 0x20 || c == 0x7f) {
      *why = "control character in the path";
      return RD_EMALFORMED;
    }
    if (n + 1 >= cap) {
      *why = name;
      return RD_EMALFORMED;
    }
    out[n++] = (char)c;
  }
  out[n] = '\0';
  return 0;
}

int rd_stream_parse_target(const char *t, size_t len, rd_stream_dest *out, const char **why) {
  const char *q = memchr(t, '?', len);
  const char *end = q != NULL ? q : t + len;
  const char *seg[3];
  size_t seglen[3];
  const char *p = t;
  for (int i = 0; i < 3; i++) {
    const char *slash = memchr(p, '/', (size_t)(end - p));
    const char *e = i < 2 ? slash : end;
    if (e == NULL || e == p || (i == 2 && slash != NULL)) {
      *why = "want /stream/{key}/{proto}/{address}, each segment percent-encoded";
      return RD_EMALFORMED;
    }
    seg[i] = p;
    seglen[i] = (size_t)(e - p);
    p = e + 1;
  }
  if (decode(seg[0], seglen[0], out->key, sizeof out->key, "client key too long", why) < 0 ||
      decode(seg[1], seglen[1], out->proto, sizeof out->proto, "proto too long", why) < 0 ||
      decode(seg[2], seglen[2], out->address, sizeof out->address, "address too long", why) < 0)
    return RD_EMALFORMED;
  return 0;
}

int rd_stream_check_dest(const char *proto, const char *address, char *err, size_t errlen) {
  int tcp = strcmp(proto, "tcp") == 0 || strcmp(proto, "tcp4") == 0 || strcmp(proto, "tcp6") == 0;
  if (!tcp && strcmp(proto, "unix") != 0) {
    snprintf(err, errlen, "unsupported proto %s (tcp, tcp4, tcp6 or unix)", proto);
    return RD_EMALFORMED;
  }
  if (address[0] == '\0') {
    snprintf(err, errlen, "empty address");
    return RD_EMALFORMED;
  }
  rd_addr a;
  int rc = tcp ? rd_addr_split(address, strlen(address), &a) : 0;
  if (rc < 0 || (tcp && a.port_len == 0)) {
    snprintf(err, errlen, "bad address %s: %s", address,
             rc < 0 ? rd_addr_strerror(rc) : "missing port");
    return RD_EMALFORMED;
  }
  return 0;
}
