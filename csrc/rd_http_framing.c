/* HTTP/1.x body framing: the rules of RFC 9112 section 6.3 and an
 * incremental chunked-coding scanner. Bytes are never copied or changed;
 * the scanner only finds where the body ends. */
#include "rd_http_framing.h"

#include <string.h>

/* Parses a Content-Length value: a comma-separated list of decimal lengths
 * that must all agree (RFC 9110 section 8.6). */
static int parse_length(const char *v, size_t n, uint64_t *out, int *seen) {
  size_t i = 0;
  for (;;) {
    while (i < n && (v[i] == ' ' || v[i] == '\t'))
      i++;
    if (i == n || v[i] < '0' || v[i] > '9')
      return RD_EMALFORMED;
    uint64_t x = 0;
    for (; i < n && v[i] >= '0' && v[i] <= '9'; i++) {
      if (x > (UINT64_MAX - 9) / 10)
        return RD_EMALFORMED;
      x = x * 10 + (uint64_t)(v[i] - '0');
    }
    if (*seen && x != *out)
      return RD_EMALFORMED;
    *out = x;
    *seen = 1;
    while (i < n && (v[i] == ' ' || v[i] == '\t'))
      i++;
    if (i == n)
      return RD_OK;
    if (v[i] != ',')
      return RD_EMALFORMED;
    i++;
  }
}

/* Whether the last coding of a Transfer-Encoding value is "chunked", and
 * whether chunked appears anywhere else (which is invalid). */
static void last_coding(const char *v, size_t n, int *last_chunked, int *chunked_before) {
  size_t i = 0;
  while (i < n) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
      i++;
    size_t s = i;
    while (i < n && v[i] != ',' && v[i] != ';')
      i++;
    size_t e = i;
    while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
      e--;
    while (i < n && v[i] != ',')
      i++; /* parameters */
    if (e == s)
      continue;
    if (*last_chunked)
      *chunked_before = 1;
    *last_chunked = e - s == 7 && rd_http_ieq("chunked", v + s, 7);
  }
}

/* The framing headers of a head: RD_OK with *te (a Transfer-Encoding was
 * present), *chunked (its last coding is chunked), *has_len and *len. */
static int scan_headers(const rd_http_header *h, size_t n, int *te, int *chunked, int *has_len,
                        uint64_t *len) {
  int chunked_before = 0;
  *te = *chunked = *has_len = 0;
  *len = 0;
  for (size_t i = 0; i < n; i++) {
    if (h[i].name_len == 17 && rd_http_ieq("Transfer-Encoding", h[i].name, 17)) {
      *te = 1;
      last_coding(h[i].value, h[i].value_len, chunked, &chunked_before);
    } else if (h[i].name_len == 14 && rd_http_ieq("Content-Length", h[i].name, 14)) {
      if (parse_length(h[i].value, h[i].value_len, len, has_len) != RD_OK)
        return RD_EMALFORMED;
    }
  }
  if (chunked_before || (*te && *has_len))
    return RD_EMALFORMED;
  return RD_OK;
}

/* Connection tokens and the version decide whether another message may follow. */
static int keep_alive_of(const rd_http_header *h, size_t n, int minor) {
  int close = 0, keep = 0;
  for (size_t i = 0; i < n; i++) {
    if (h[i].name_len == 10 && rd_http_ieq("Connection", h[i].name, 10)) {
      close |= rd_http_has_token(h[i].value, h[i].value_len, "close");
      keep |= rd_http_has_token(h[i].value, h[i].value_len, "keep-alive");
    }
  }
  if (close)
    return 0;
  return minor >= 1 || keep;
}

int rd_http_request_framing(const rd_http_request *req, rd_http_framing *out) {
  int te, chunked, has_len;
  uint64_t len;
  memset(out, 0, sizeof *out);
  if (scan_headers(req->headers, req->num_headers, &te, &chunked, &has_len, &len) != RD_OK)
    return RD_EMALFORMED;
  /* A request body must have a known end: chunked last, or a length. */
  if (te && (!chunked || req->minor_version == 0))
    return RD_EMALFORMED;
  out->keep_alive = keep_alive_of(req->headers, req->num_headers, req->minor_version);
  if (chunked) {
    out->kind = RD_BODY_CHUNKED;
  } else if (has_len && len > 0) {
    out->kind = RD_BODY_LENGTH;
    out->length = len;
  }
  return RD_OK;
}

int rd_http_response_framing(const rd_http_response *resp, const char *method, size_t method_len,
                             rd_http_framing *out) {
  int te, chunked, has_len;
  uint64_t len;
  memset(out, 0, sizeof *out);
  if (scan_headers(resp->headers, resp->num_headers, &te, &chunked, &has_len, &len) != RD_OK)
    return RD_EMALFORMED;
  out->keep_alive = keep_alive_of(resp->headers, resp->num_headers, resp->minor_version);
  int head = method_len == 4 && memcmp(method, "HEAD", 4) == 0;
  int connect = method_len == 7 && memcmp(method, "CONNECT", 7) == 0;
  int st = resp->status;
  if (head || (st >= 100 && st < 200) || st == 204 || st == 304 ||
      (connect && st >= 200 && st < 300))
    return RD_OK;
  if (te && chunked) {
    out->kind = RD_BODY_CHUNKED;
  } else if (te) {
    out->kind = RD_BODY_CLOSE; /* another coding last: read until close */
    out->keep_alive = 0;
  } else if (has_len) {
    out->kind = len > 0 ? RD_BODY_LENGTH : RD_BODY_NONE;
    out->length = len;
  } else {
    out->kind = RD_BODY_CLOSE;
    out->keep_alive = 0;
  }
  return RD_OK;
}

/* ---- the chunked scanner ---- */

enum {
  CH_SIZE,       /* hex digits of a chunk size */
  CH_EXT,        /* after ';': extensions up to CR */
  CH_SIZE_LF,    /* CR seen, LF expected */
  CH_DATA,       /* chunk data */
  CH_DATA_CR,    /* CRLF after the data */
  CH_DATA_LF,
  CH_TRAILER,    /* start of a trailer line (or the final CRLF) */
  CH_TRAILER_LINE,
  CH_TRAILER_LF, /* CR ending a trailer line seen */
  CH_END_LF,     /* CR of the final empty line seen */
  CH_DONE
};

void rd_http_body_init(rd_http_body *b, const rd_http_framing *f) {
  memset(b, 0, sizeof *b);
  b->kind = f->kind;
  b->remaining = f->kind == RD_BODY_LENGTH ? f->length : 0;
  b->state = f->kind == RD_BODY_CHUNKED ? CH_SIZE : CH_DONE;
}

int rd_http_body_done(const rd_http_body *b) {
  switch (b->kind) {
  case RD_BODY_NONE:
    return 1;
  case RD_BODY_LENGTH:
    return b->remaining == 0;
  case RD_BODY_CHUNKED:
    return b->state == CH_DONE;
  default:
    return 0;
  }
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

/* Scans chunked coding; returns bytes consumed or a negative code. */
static ssize_t chunked_feed(rd_http_body *b, const uint8_t *d, size_t len) {
  size_t i = 0;
  while (i < len && b->state != CH_DONE) {
    unsigned char c = d[i];
    switch (b->state) {
    case CH_SIZE: {
      int v = hex_value(c);
      if (v >= 0) {
        if (b->digits >= 15) /* 2^60 bytes is more than any chunk */
          return RD_EMALFORMED;
        b->remaining = b->remaining * 16 + (uint64_t)v;
        b->digits++;
      } else if (b->digits > 0 && c == ';') {
        b->state = CH_EXT;
      } else if (b->digits > 0 && c == '\r') {
        b->state = CH_SIZE_LF;
      } else {
        return RD_EMALFORMED;
      }
      i++;
      break;
    }
    case CH_EXT:
      if (c == '\r')
        b->state = CH_SIZE_LF;
      else if (c == '\n' || (c < 0x20 && c != '\t') || c == 0x7f)
        return RD_EMALFORMED;
      else if (++b->line > RD_HTTP_CHUNK_LINE_MAX)
        return RD_ETOOLARGE;
      i++;
      break;
    case CH_SIZE_LF:
      if (c != '\n')
        return RD_EMALFORMED;
      i++;
      b->line = 0;
      b->digits = 0;
      b->state = b->remaining > 0 ? CH_DATA : CH_TRAILER;
      break;
    case CH_DATA: {
      size_t n = len - i;
      if ((uint64_t)n > b->remaining)
        n = (size_t)b->remaining;
      b->remaining -= n;
      i += n;
      if (b->remaining == 0)
        b->state = CH_DATA_CR;
      break;
    }
    case CH_DATA_CR:
      if (c != '\r')
        return RD_EMALFORMED;
      b->state = CH_DATA_LF;
      i++;
      break;
    case CH_DATA_LF:
      if (c != '\n')
        return RD_EMALFORMED;
      b->state = CH_SIZE;
      i++;
      break;
    case CH_TRAILER:
      b->state = c == '\r' ? CH_END_LF : CH_TRAILER_LINE;
      if (c == '\n')
        return RD_EMALFORMED;
      if (c != '\r' && ++b->trailers > RD_HTTP_TRAILERS_MAX)
        return RD_ETOOLARGE;
      i++;
      break;
    case CH_TRAILER_LINE:
      if (c == '\r')
        b->state = CH_TRAILER_LF;
      else if (c == '\n' || (c < 0x20 && c != '\t') || c == 0x7f)
        return RD_EMALFORMED;
      else if (++b->trailers > RD_HTTP_TRAILERS_MAX)
        return RD_ETOOLARGE;
      i++;
      break;
    case CH_TRAILER_LF:
      if (c != '\n')
        return RD_EMALFORMED;
      b->state = CH_TRAILER;
      i++;
      break;
    case CH_END_LF:
      if (c != '\n')
        return RD_EMALFORMED;
      b->state = CH_DONE;
      i++;
      break;
    }
  }
  return (ssize_t)i;
}

ssize_t rd_http_body_feed(rd_http_body *b, const uint8_t *data, size_t len) {
  switch (b->kind) {
  case RD_BODY_NONE:
    return 0;
  case RD_BODY_LENGTH: {
    size_t n = (uint64_t)len < b->remaining ? len : (size_t)b->remaining;
    b->remaining -= n;
    return (ssize_t)n;
  }
  case RD_BODY_CHUNKED:
    return chunked_feed(b, data, len);
  default:
    return (ssize_t)len;
  }
}
