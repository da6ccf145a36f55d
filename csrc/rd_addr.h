/* Addresses: host:port parsing and formatting, ws:// and wss:// URLs, and
 * unix socket paths. Every function is pure: no I/O, no allocation; results
 * point into the caller's input or are written into the caller's buffer.
 *
 * Two readings of "host:port" exist because the engine meets two kinds of
 * input. What a peer asks the agent to dial is read as Go's
 * net.SplitHostPort reads it (rd_addr_split: any host text, a port that may
 * be a service name, Go's error texts), so that the agent answers as a Go
 * agent would. What a user or an HTTP request names as an endpoint (a URL's
 * authority, the proxy route's host segment, a listen address) is read
 * strictly (rd_addr_parse: a host name or an IP address, a decimal port in
 * 0-65535, a default port when none is written). */
#ifndef RD_ADDR_H
#define RD_ADDR_H

#include "rd_common.h"

/* Address errors, a block of their own; rd_addr_strerror names them (the
 * first five with Go's net.SplitHostPort texts). */
enum {
  RD_ADDR_EMISSING_PORT = -20040,     /* "missing port in address" */
  RD_ADDR_EMISSING_BRACKET = -20041,  /* "missing ']' in address" */
  RD_ADDR_ETOO_MANY_COLONS = -20042,  /* "too many colons in address" */
  RD_ADDR_EUNEXPECTED_OPEN = -20043,  /* "unexpected '[' in address" */
  RD_ADDR_EUNEXPECTED_CLOSE = -20044, /* "unexpected ']' in address" */
  RD_ADDR_EEMPTY = -20045,            /* the whole address is empty */
  RD_ADDR_EMISSING_HOST = -20046,     /* ":80" where a host is required */
  RD_ADDR_EBAD_HOST = -20047,         /* a character not allowed in a host name */
  RD_ADDR_EBAD_IPV6 = -20048,         /* "[...]" (or a bare v6) that is no IPv6 address */
  RD_ADDR_EHOST_TOO_LONG = -20049,    /* host longer than RD_ADDR_HOST_MAX */
  RD_ADDR_EBAD_PORT = -20050,         /* port empty or not decimal digits */
  RD_ADDR_EPORT_RANGE = -20051,       /* port above 65535 */
  RD_ADDR_EBAD_SCHEME = -20052,       /* URL neither ws:// nor wss:// */
  RD_ADDR_ENOSPACE = -20053           /* the output buffer is too small */
};

/* The longest host rd_addr_parse accepts (a DNS name is at most 253). */
#define RD_ADDR_HOST_MAX 255
/* Room for any host rd_addr_parse accepts, joined with any port: brackets,
 * ':', five digits and the NUL. */
#define RD_ADDR_JOINED_MAX (RD_ADDR_HOST_MAX + 9)

typedef struct rd_addr {
  const char *host; /* into the input, without brackets; may be empty */
  size_t host_len;
  const char *port_text; /* into the input: the port as written ("" when none) */
  size_t port_len;
  int port;      /* rd_addr_parse: the number, or the default when none written */
  int bracketed; /* the host was written in brackets */
} rd_addr;

/* Flags for rd_addr_parse. */
enum {
  /* An address with more than one ':' and no brackets is an IPv6 address
   * with no port ("::1" takes the default port); else it is an error. */
  RD_ADDR_BARE_IPV6 = 1,
  /* An empty host (":8123") is accepted; else RD_ADDR_EMISSING_HOST. */
  RD_ADDR_EMPTY_HOST = 2
};

/* Returns a static text for an RD_ADDR_E* code ("invalid address" for any
 * other); never NULL. */
const char *rd_addr_strerror(int code);

/* Splits s[0..len) as Go's net.SplitHostPort does: "host:port",
 * "[host]:port" (host may then hold ':'), the port any text (even empty).
 * Fills out (port is -1: the text is not read) and returns 0, or returns
 * RD_ADDR_EMISSING_PORT, _EMISSING_BRACKET, _ETOO_MANY_COLONS,
 * _EUNEXPECTED_OPEN or _EUNEXPECTED_CLOSE. */
int rd_addr_split(const char *s, size_t len, rd_addr *out);

/* Reads a port as Go's dialer does (parsePort): an optional sign and
 * decimal digits give 1 and the number in *port (clamped to +-2^30, so it
 * may be out of range; "" is 0); anything else is a service name for the
 * resolver: 0 and *port untouched. */
int rd_addr_go_port(const char *s, size_t len, long *port);

/* Parses s[0..len) as an endpoint: "host:port", "[v6]:port", "host" or
 * "[v6]" (default_port >= 0 only; out->port is then default_port) and, with
 * RD_ADDR_BARE_IPV6, a bare "v6" (default port). A host is an IPv6 address
 * (with an optional "%zone" of [A-Za-z0-9._-]) when bracketed, else a run of
 * [A-Za-z0-9._-] of at most RD_ADDR_HOST_MAX bytes. The port is one or
 * more ASCII digits (leading zeros allowed) with a value in 0-65535.
 * default_port < 0 makes the port required. Returns 0 with out filled, or
 * a negative RD_ADDR_E* code (out is then unspecified). */
int rd_addr_parse(const char *s, size_t len, int default_port, unsigned flags, rd_addr *out);

/* Writes "host:port", or "[host]:port" when host contains ':' (Go's
 * net.JoinHostPort), NUL-terminated into out[0..outlen). Returns its length,
 * or RD_ADDR_ENOSPACE when it does not fit (out then holds ""). */
int rd_addr_join(char *out, size_t outlen, const char *host, size_t host_len, int port);

/* A ws:// or wss:// URL split into its parts, all pointing into the URL. */
typedef struct rd_addr_url {
  int tls;               /* wss:// */
  const char *authority; /* as written ("h", "h:1", "[::1]:1"): the Host header */
  size_t authority_len;
  rd_addr addr; /* the authority parsed; port 80 or 443 when none is written */
  const char *path; /* from the first '/' after the authority; "" when none */
  size_t path_len;
} rd_addr_url;

/* Parses url[0..len): "ws://" or "wss://" (lower case), an authority read
 * by rd_addr_parse with the scheme's default port (80, 443), then the path
 * (with any query). Returns 0, RD_ADDR_EBAD_SCHEME, or rd_addr_parse's code
 * for the authority (RD_ADDR_EEMPTY when it is missing). */
int rd_addr_parse_url(const char *url, size_t len, rd_addr_url *out);

/* Cleans a slash-separated path lexically, as Go's path.Clean: "//"
 * collapses, "." elements go, ".." removes the element before it ("/.." is
 * "/"), a trailing '/' goes; the empty path is ".". Writes the result,
 * NUL-terminated, into out[0..outlen) (outlen > len + 1 always suffices; out
 * must not overlap p). Returns its length, or RD_ADDR_ENOSPACE (out then
 * holds ""). */
int rd_addr_clean_path(const char *p, size_t len, char *out, size_t outlen);

#endif
