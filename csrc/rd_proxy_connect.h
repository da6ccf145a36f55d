/* The agent's way through an HTTP proxy: a CONNECT request for the server's
 * host:port, then the proxy's answer head; on 200 the connection is a plain
 * byte tunnel to the server. Pure functions, no I/O and no allocation
 * (rd_client.c does the reading and writing): the proxy URL parser, the
 * request builder and the answer reader, all fuzzable over (buf, len). */
#ifndef RD_PROXY_CONNECT_H
#define RD_PROXY_CONNECT_H

#include "rd_addr.h"
#include "rd_common.h"

/* The longest userinfo ("user:password", percent-encoded) accepted. */
#define RD_PROXY_USERINFO_MAX 512
/* Room for any request rd_proxy_connect_request writes: the request line
 * and Host with two joined addresses, and the credentials in base64. */
#define RD_PROXY_REQUEST_MAX (2 * RD_ADDR_JOINED_MAX + 4 * RD_PROXY_USERINFO_MAX / 3 + 128)

typedef struct rd_proxy_url {
  rd_addr addr;         /* host (no brackets) and port; 80 when none is written */
  const char *userinfo; /* into the URL, still percent-encoded; NULL when none */
  size_t userinfo_len;
  int has_password; /* the userinfo holds a ':' */
} rd_proxy_url;

/* Parses "http://[user[:password]@]host[:port][/]" (the scheme in lower
 * case; Python adds it to a bare "host:port" first, as Go does). The host
 * and port are read by rd_addr_parse (default port 80); the userinfo is at
 * most RD_PROXY_USERINFO_MAX bytes of printable ASCII with valid %XX
 * escapes. Returns 0 with out filled (pointing into url), RD_ADDR_EBAD_SCHEME
 * for another scheme, an RD_ADDR_E* code for the host and port, or
 * RD_EMALFORMED for bad userinfo or anything after the authority but "/". */
int rd_proxy_parse_url(const char *url, size_t len, rd_proxy_url *out);

/* Writes "CONNECT target HTTP/1.1", "Host: target" and, when the URL's
 * userinfo has a password (Go's rule: a user alone sends none),
 * "Proxy-Authorization: Basic base64(user:password)" of the decoded
 * userinfo, then the empty line, NUL-terminated into out[0..cap). target is
 * the server's "host:port" as joined by rd_addr_join. Returns the length,
 * or RD_ADDR_ENOSPACE when it does not fit (out then holds ""). */
int rd_proxy_connect_request(char *out, size_t cap, const char *target,
                             const rd_proxy_url *proxy);

/* Reads the proxy's answer head in buf[0..len) (at most max_head bytes).
 * Returns the head length (> 0; bytes after it already belong to the
 * tunnel) with *status set and status_line (cap > 0 bytes, NUL-terminated)
 * holding "HTTP/1.x CODE REASON" with control characters replaced; or
 * RD_EPARTIAL (need more, still within max_head), RD_ETOOLARGE or
 * RD_EMALFORMED. */
int rd_proxy_connect_response(const char *buf, size_t len, size_t max_head, int *status,
                              char *status_line, size_t cap);

#endif
