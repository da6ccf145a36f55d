/* HTTP/1.x message framing (RFC 9112 section 6): where a request's or a
 * response's body ends and whether the connection may carry another message
 * after it. Pure functions over parsed heads and byte buffers; no I/O. A
 * proxy that reuses connections must agree with both ends on every message
 * boundary, so ambiguous framing (Content-Length with Transfer-Encoding,
 * conflicting lengths) is refused as request smuggling defences do. */
#ifndef RD_HTTP_FRAMING_H
#define RD_HTTP_FRAMING_H

#include <sys/types.h>

#include "rd_http.h"

typedef enum rd_body_kind {
  RD_BODY_NONE,    /* no body */
  RD_BODY_LENGTH,  /* exactly `length` bytes */
  RD_BODY_CHUNKED, /* chunked transfer coding, ended by the last chunk and trailers */
  RD_BODY_CLOSE    /* until the sender closes (responses only) */
} rd_body_kind;

typedef struct rd_http_framing {
  rd_body_kind kind;
  uint64_t length;
  int keep_alive; /* the sender allows another message on this connection */
} rd_http_framing;

/* A request's framing: Transfer-Encoding ending in chunked, else
 * Content-Length, else no body. RD_EMALFORMED (answer 400) for both headers,
 * differing or invalid lengths, or a Transfer-Encoding that is not chunked
 * last (or any on HTTP/1.0). keep_alive: HTTP/1.1 unless "Connection: close",
 * HTTP/1.0 only with "Connection: keep-alive". */
int rd_http_request_framing(const rd_http_request *req, rd_http_framing *out);

/* A response's framing given the request's method: none for HEAD, 1xx, 204
 * and 304 (and a 2xx answer to CONNECT); chunked; Content-Length; else
 * close-delimited (keep_alive 0). RD_EMALFORMED for both headers or bad
 * lengths. */
int rd_http_response_framing(const rd_http_response *resp, const char *method, size_t method_len,
                             rd_http_framing *out);

/* Finds the end of a body in the bytes that follow its head, however they
 * are split. */
typedef struct rd_http_body {
  rd_body_kind kind;
  uint64_t remaining; /* LENGTH: bytes left; CHUNKED: of the current chunk's data */
  int state;
  size_t line; /* bytes of the current size, extension or trailer line */
  size_t trailers; /* bytes of trailers so far */
  int digits;
} rd_http_body;

/* Limits on a chunk line (size and extensions) and on all trailers. */
#define RD_HTTP_CHUNK_LINE_MAX 4096
#define RD_HTTP_TRAILERS_MAX 16384

void rd_http_body_init(rd_http_body *b, const rd_http_framing *f);
/* Consumes body bytes from data[0..len): returns how many belong to the body
 * (the rest starts the next message), RD_EMALFORMED for a bad chunk line or
 * RD_ETOOLARGE past a limit. rd_http_body_done tells when the body ended
 * (a close-delimited body never ends here). */
ssize_t rd_http_body_feed(rd_http_body *b, const uint8_t *data, size_t len);
int rd_http_body_done(const rd_http_body *b);

#endif
