/* Local dials for tunneled connections, shaped after Go's net.Dialer.
 *
 * A dial owns up to three things at once: a getaddrinfo request, a timer
 * (the deadline, and the deferral of results that must not be delivered
 * inside rd_dial_start or rd_dial_cancel) and the socket of the current
 * attempt. Each is released by its own callback; the dial itself is freed
 * only when the result has been delivered and all three are gone, so no
 * callback ever finds freed memory. Addresses are tried one at a time, in
 * resolver order, each given Go's share of the time left. */
#include "rd_dialer.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "rd_addr.h"
#include "rd_alloc.h"
#include "rd_nofile.h"

#define RD_DIAL_ERRLEN 512
#define RD_DIAL_ADDRLEN 128
/* Go gives each address at least this much of the time left (saneMinimum). */
#define RD_DIAL_MIN_SHARE_MS 2000

typedef union {
  uv_handle_t handle;
  uv_stream_t stream;
  uv_tcp_t tcp;
  uv_pipe_t pipe;
} rd_dial_stream;

typedef union {
  struct sockaddr sa;
  struct sockaddr_in in;
  struct sockaddr_in6 in6;
} rd_dial_addr;

struct rd_dial {
  uv_loop_t *loop;
  rd_dial_cb cb;
  void *ctx;
  char net[8];       /* "tcp", "tcp4", "udp6", "unix"...: for error texts */
  int family;        /* AF_UNSPEC, or the only family tcp4/tcp6 accept */
  int is_unix;
  int is_udp;
  int udp_fd;        /* udp: the connected socket until delivered, or -1 */
  char *host;        /* tcp: the host (may be ""); unix: the path */
  const char *zone;  /* numeric IPv6 host: its "%zone" suffix, or "" */
  unsigned port;
  int port_named;    /* port is a service name left to getaddrinfo */
  char *port_text;   /* as given, for the "unknown port" text */
  rd_dial_addr one;  /* storage when there is a single address */
  rd_dial_addr *addrs;
  size_t naddrs, next;
  uint64_t deadline; /* loop time in ms; 0 = none */

  uv_getaddrinfo_t gai;
  uv_timer_t timer;
  uv_connect_t connect_req;
  rd_dial_stream *stream; /* the attempt in flight, or one still closing */
  char cur_addr[RD_DIAL_ADDRLEN]; /* the attempt's address, as Go prints it */

  unsigned resolving : 1;      /* gai is in flight */
  unsigned stream_closing : 1; /* stream is being closed (abandoned) */
  unsigned done : 1;           /* the result is decided */
  unsigned delivered : 1;      /* cb has been called */
  unsigned timer_closed : 1;
  unsigned in_api : 1; /* inside rd_dial_start/rd_dial_cancel: defer cb */

  int status; /* the first error (Go reports the first address's), or 0 */
  char error[RD_DIAL_ERRLEN];
};

/* Go's texts for the errno values a dial meets (syscall.Errno.Error() on
 * Linux), which differ from libuv's in places ("no route to host"). */
static const char *errno_text(int status) {
  switch (status) {
  case UV_ECONNREFUSED: return "connection refused";
  case UV_ENOENT: return "no such file or directory";
  case UV_ENETUNREACH: return "network is unreachable";
  case UV_EHOSTUNREACH: return "no route to host";
  case UV_ETIMEDOUT: return "connection timed out";
  case UV_EACCES: return "permission denied";
  case UV_EPERM: return "operation not permitted";
  case UV_ECONNRESET: return "connection reset by peer";
  case UV_ECONNABORTED: return "software caused connection abort";
  case UV_EADDRNOTAVAIL: return "cannot assign requested address";
  case UV_EADDRINUSE: return "address already in use";
  case UV_EAFNOSUPPORT: return "address family not supported by protocol";
  case UV_EAGAIN: return "resource temporarily unavailable";
  case UV_EINVAL: return "invalid argument";
  case UV_EMFILE:
  case UV_ENFILE: return rd_nofile_error(status);
  case UV_ENOBUFS: return "no buffer space available";
  case UV_ENOMEM: return "cannot allocate memory";
  case UV_ENOTDIR: return "not a directory";
  case UV_ENOTSOCK: return "socket operation on non-socket";
  case UV_EPROTOTYPE: return "protocol wrong type for socket";
  case UV_ENAMETOOLONG: return "file name too long";
  case UV_ELOOP: return "too many levels of symbolic links";
  case UV_ENETDOWN: return "network is down";
  case UV_EHOSTDOWN: return "host is down";
  case UV_ECANCELED: return "operation was canceled";
  case RD_ENOMEM: return "cannot allocate memory";
  default: return rd_strerror(status);
  }
}

/* Go's resolver texts: a name that does not exist is "no such host". */
static const char *lookup_text(int status) {
  switch (status) {
  case UV_EAI_NONAME:
  case UV_EAI_NODATA:
  case UV_EAI_ADDRFAMILY:
    return "no such host";
  default:
    return rd_strerror(status);
  }
}

static void vformat(char *out, size_t len, const char *fmt, va_list ap) {
  if (out == NULL || len == 0)
    return;
  vsnprintf(out, len, fmt, ap);
}

static void set_error_v(rd_dial *d, int status, const char *fmt, va_list ap) {
  vformat(d->error, sizeof d->error, fmt, ap);
  d->status = status;
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static void set_error(rd_dial *d, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  set_error_v(d, status, fmt, ap);
  va_end(ap);
}

/* Keeps the first failure: with several addresses Go reports the first. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static void record_error(rd_dial *d, int status, const char *fmt, ...) {
  if (d->status < 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  set_error_v(d, status, fmt, ap);
  va_end(ap);
}

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static void *start_error(int *status_out, char *error_out, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vformat(error_out, errlen, fmt, ap);
  va_end(ap);
  if (status_out != NULL)
    *status_out = UV_EINVAL;
  return NULL;
}

static void format_addr(char *out, size_t len, const rd_dial_addr *a, const char *zone) {
  char ip[64] = "";
  unsigned port;
  if (a->sa.sa_family == AF_INET6) {
    uv_ip6_name(&a->in6, ip, sizeof ip);
    port = ntohs(a->in6.sin6_port);
  } else {
    uv_ip4_name(&a->in, ip, sizeof ip);
    port = ntohs(a->in.sin_port);
    zone = "";
  }
  char host[96];
  int n = snprintf(host, sizeof host, "%s%s", ip, zone);
  rd_addr_join(out, len, host, n > 0 ? (size_t)n : 0, (int)port);
}

/* ---- Lifetime ---- */

static void dial_maybe_free(rd_dial *d) {
  if (!d->delivered || !d->timer_closed || d->resolving || d->stream != NULL)
    return;
  if (d->addrs != &d->one)
    rd_free(d->addrs);
  rd_free(d->host);
  rd_free(d);
}

static void timer_close_cb(uv_handle_t *h) {
  rd_dial *d = h->data;
  d->timer_closed = 1;
  dial_maybe_free(d);
}

static void deliver(rd_dial *d, uv_stream_t *stream) {
  d->delivered = 1;
  uv_close((uv_handle_t *)&d->timer, timer_close_cb);
  int fd = d->udp_fd;
  d->udp_fd = -1;
  if (stream != NULL || fd >= 0)
    d->cb(d->ctx, 0, stream, fd, NULL);
  else
    d->cb(d->ctx, d->status, NULL, -1, d->error);
}

static void next_attempt(rd_dial *d);

static void stream_close_cb(uv_handle_t *h) {
  rd_dial *d = h->data;
  rd_free(d->stream);
  d->stream = NULL;
  d->stream_closing = 0;
  if (d->done)
    dial_maybe_free(d);
  else
    next_attempt(d);
}

static void abandon_stream(rd_dial *d) {
  d->stream_closing = 1;
  uv_close(&d->stream->handle, stream_close_cb);
}

static void timer_cb(uv_timer_t *t);

/* Decides the result: success when stream is given, else d->status and
 * d->error. Releases what the dial holds; the callback runs now, or from the
 * timer when we are inside an API call. */
static void dial_finish(rd_dial *d, uv_stream_t *stream) {
  d->done = 1;
  uv_timer_stop(&d->timer);
  if (d->resolving)
    uv_cancel((uv_req_t *)&d->gai); /* may fail if running; its cb frees */
  if (d->stream != NULL && !d->stream_closing)
    abandon_stream(d);
  if (d->in_api) {
    uv_timer_start(&d->timer, timer_cb, 0, 0);
    return;
  }
  deliver(d, stream);
}

/* ---- The dial's steps ---- */

static void timer_cb(uv_timer_t *t) {
  rd_dial *d = t->data;
  if (d->done) { /* a deferred result */
    deliver(d, NULL);
    return;
  }
  if (d->resolving) {
    set_error(d, UV_ETIMEDOUT, "dial %s: lookup %s: i/o timeout", d->net, d->host);
    dial_finish(d, NULL);
    return;
  }
  if (d->stream != NULL && !d->stream_closing) {
    /* This address's share of the time is up; the close callback moves on to
     * the next address, or ends the dial when the deadline itself passed. */
    if (d->is_unix)
      record_error(d, UV_ETIMEDOUT, "dial unix %s: i/o timeout", d->host);
    else
      record_error(d, UV_ETIMEDOUT, "dial %s %s: i/o timeout", d->net, d->cur_addr);
    abandon_stream(d);
  }
}

static void connect_cb(uv_connect_t *req, int status) {
  rd_dial *d = req->data;
  if (d->stream_closing)
    return; /* abandoned: the close callback carries on */
  if (status == 0) {
    rd_dial_stream *s = d->stream;
    d->stream = NULL;
    if (!d->is_unix)
      uv_tcp_nodelay(&s->tcp, 1); /* tunneled bytes are already batched */
    d->status = 0;
    dial_finish(d, &s->stream);
    return;
  }
  if (d->is_unix)
    record_error(d, status, "dial unix %s: connect: %s", d->host, errno_text(status));
  else
    record_error(d, status, "dial %s %s: connect: %s", d->net, d->cur_addr,
                 errno_text(status));
  abandon_stream(d);
}

/* UDP "connects" at once (it only fixes the peer address), so an attempt
 * either gives the socket or moves on to the next address now. */
static void udp_attempt(rd_dial *d, const rd_dial_addr *a) {
  int fd = socket(a->sa.sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    int e = -errno;
    record_error(d, e, "dial %s %s: socket: %s", d->net, d->cur_addr, errno_text(e));
    next_attempt(d);
    return;
  }
  socklen_t len = a->sa.sa_family == AF_INET6 ? sizeof a->in6 : sizeof a->in;
  if (connect(fd, &a->sa, len) != 0) {
    int e = -errno;
    close(fd);
    record_error(d, e, "dial %s %s: connect: %s", d->net, d->cur_addr, errno_text(e));
    next_attempt(d);
    return;
  }
  d->udp_fd = fd;
  d->status = 0;
  dial_finish(d, NULL);
}

/* Starts the next address, or ends the dial when none is left or the
 * deadline passed. Failures to even start an attempt are recorded like a
 * failed connect and surface through the close callback. */
static void next_attempt(rd_dial *d) {
  if (d->next >= d->naddrs) {
    dial_finish(d, NULL);
    return;
  }
  rd_dial_addr *a = d->is_unix ? NULL : &d->addrs[d->next];
  if (a != NULL && d->host[0] == '\0') /* Go prints the empty host as is */
    snprintf(d->cur_addr, sizeof d->cur_addr, ":%u",
             (unsigned)ntohs(a->sa.sa_family == AF_INET6 ? a->in6.sin6_port : a->in.sin_port));
  else if (a != NULL)
    format_addr(d->cur_addr, sizeof d->cur_addr, a, d->zone);
  size_t remaining_addrs = d->naddrs - d->next;
  d->next++;

  uint64_t share = 0;
  if (d->deadline != 0) {
    uint64_t now = uv_now(d->loop);
    if (now >= d->deadline) {
      if (d->is_unix)
        record_error(d, UV_ETIMEDOUT, "dial unix %s: i/o timeout", d->host);
      else
        record_error(d, UV_ETIMEDOUT, "dial %s %s: i/o timeout", d->net, d->cur_addr);
      dial_finish(d, NULL);
      return;
    }
    uint64_t left = d->deadline - now;
    share = left / remaining_addrs;
    if (share < RD_DIAL_MIN_SHARE_MS)
      share = left < RD_DIAL_MIN_SHARE_MS ? left : RD_DIAL_MIN_SHARE_MS;
  }
  if (d->is_udp) {
    udp_attempt(d, a);
    return;
  }

  rd_dial_stream *s = rd_malloc(sizeof *s);
  if (s == NULL) {
    set_error(d, RD_ENOMEM, "dial %s %s: socket: cannot allocate memory", d->net,
              d->is_unix ? d->host : d->cur_addr);
    dial_finish(d, NULL);
    return;
  }
  d->connect_req.data = d;
  if (d->is_unix) {
    uv_pipe_init(d->loop, &s->pipe, 0);
    s->handle.data = d;
    d->stream = s;
    uv_pipe_connect(&d->connect_req, &s->pipe, d->host, connect_cb);
  } else {
    uv_tcp_init(d->loop, &s->tcp);
    s->handle.data = d;
    d->stream = s;
    int r = uv_tcp_connect(&d->connect_req, &s->tcp, &a->sa, connect_cb);
    if (r < 0) {
      /* libuv creates the socket here too; Go names that step "socket". */
      int sock = r == UV_EMFILE || r == UV_ENFILE || r == UV_ENOBUFS || r == UV_ENOMEM ||
                 r == UV_EAFNOSUPPORT || r == UV_EPROTONOSUPPORT;
      record_error(d, r, "dial %s %s: %s: %s", d->net, d->cur_addr, sock ? "socket" : "connect",
                   errno_text(r));
      abandon_stream(d);
      return;
    }
  }
  if (share != 0)
    uv_timer_start(&d->timer, timer_cb, share, 0);
}

static int family_ok(const rd_dial *d, int family) {
  if (family != AF_INET && family != AF_INET6)
    return 0;
  return d->family == AF_UNSPEC || d->family == family;
}

static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  rd_dial *d = req->data;
  d->resolving = 0;
  if (d->done) {
    uv_freeaddrinfo(res);
    dial_maybe_free(d);
    return;
  }
  if (status < 0) {
    if (status == UV_EAI_SERVICE)
      set_error(d, status, "dial %s: lookup %s/%s: unknown port", d->net,
                d->is_udp ? "udp" : "tcp", d->port_text);
    else
      set_error(d, status, "dial %s: lookup %s: %s", d->net, d->host, lookup_text(status));
    dial_finish(d, NULL);
    return;
  }
  size_t n = 0;
  for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next)
    n += family_ok(d, ai->ai_family);
  if (n == 0) {
    uv_freeaddrinfo(res);
    set_error(d, UV_EAI_ADDRFAMILY, "dial %s: address %s: no suitable address found", d->net,
              d->host);
    dial_finish(d, NULL);
    return;
  }
  d->addrs = rd_malloc(n * sizeof *d->addrs);
  if (d->addrs == NULL) {
    d->addrs = &d->one;
    uv_freeaddrinfo(res);
    set_error(d, RD_ENOMEM, "dial %s: lookup %s: cannot allocate memory", d->net, d->host);
    dial_finish(d, NULL);
    return;
  }
  n = 0;
  for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
    if (!family_ok(d, ai->ai_family))
      continue;
    rd_dial_addr *a = &d->addrs[n++];
    memset(a, 0, sizeof *a);
    if (ai->ai_family == AF_INET6) {
      memcpy(&a->in6, ai->ai_addr, sizeof a->in6);
      if (!d->port_named)
        a->in6.sin6_port = htons((uint16_t)d->port);
    } else {
      memcpy(&a->in, ai->ai_addr, sizeof a->in);
      if (!d->port_named)
        a->in.sin_port = htons((uint16_t)d->port);
    }
  }
  uv_freeaddrinfo(res);
  d->naddrs = n;
  d->next = 0;
  next_attempt(d);
}

/* ---- API ---- */

rd_dial *rd_dial_start(uv_loop_t *loop, const char *proto, const char *address,
                       uint64_t timeout_ms, rd_dial_cb cb, void *ctx, int *status_out,
                       char *error_out, size_t errlen) {
  if (error_out != NULL && errlen > 0)
    error_out[0] = '\0';
  if (status_out != NULL)
    *status_out = 0;
  if (loop == NULL || proto == NULL || address == NULL || cb == NULL)
    return start_error(status_out, error_out, errlen, "dial: invalid argument");

  int family = AF_UNSPEC, is_unix = 0, is_udp = 0;
  if (strcmp(proto, "tcp") == 0)
    family = AF_UNSPEC;
  else if (strcmp(proto, "tcp4") == 0)
    family = AF_INET;
  else if (strcmp(proto, "tcp6") == 0)
    family = AF_INET6;
  else if (strcmp(proto, "udp") == 0)
    is_udp = 1;
  else if (strcmp(proto, "udp4") == 0)
    family = AF_INET, is_udp = 1;
  else if (strcmp(proto, "udp6") == 0)
    family = AF_INET6, is_udp = 1;
  else if (strcmp(proto, "unix") == 0)
    is_unix = 1;
  else
    return start_error(status_out, error_out, errlen, "dial %s: unknown network %s", proto,
                       proto);

  const char *host = address, *port = "";
  size_t hostlen = strlen(address), portlen = 0;
  long portnum = 0;
  int named = 0;
  if (is_unix) {
    if (hostlen == 0)
      return start_error(status_out, error_out, errlen, "dial unix : missing address");
    /* libuv would silently truncate a path longer than sun_path; Go's
     * syscall layer refuses it with EINVAL. */
    if (hostlen >= sizeof(((struct sockaddr_un *)0)->sun_path))
      return start_error(status_out, error_out, errlen,
                         "dial unix %s: connect: invalid argument", address);
  } else {
    rd_addr a;
    int why = rd_addr_split(address, hostlen, &a);
    if (why < 0) {
      if (address[0] == '\0')
        return start_error(status_out, error_out, errlen, "dial %s: %s", proto,
                           rd_addr_strerror(why));
      return start_error(status_out, error_out, errlen, "dial %s: address %s: %s", proto,
                         address, rd_addr_strerror(why));
    }
    host = a.host;
    hostlen = a.host_len;
    port = a.port_text;
    portlen = a.port_len;
    named = !rd_addr_go_port(port, portlen, &portnum);
    if (!named && (portnum < 0 || portnum > 65535))
      return start_error(status_out, error_out, errlen, "dial %s: address %s: invalid port",
                         proto, port);
  }

  rd_dial *d = rd_calloc(1, sizeof *d);
  /* A unix path is dialed cleaned ("/a/./b/../c" is "/a/c"), the form the
   * agent's allow patterns were matched against; it never grows, except ""
   * to ".", which was refused above. */
  char *strings = rd_malloc(hostlen + 1 + portlen + 1);
  if (d == NULL || strings == NULL) {
    rd_free(d);
    rd_free(strings);
    if (status_out != NULL)
      *status_out = RD_ENOMEM;
    if (error_out != NULL && errlen > 0)
      snprintf(error_out, errlen, "dial %s: cannot allocate memory", proto);
    return NULL;
  }
  if (is_unix) {
    rd_addr_clean_path(host, hostlen, strings, hostlen + 1);
  } else {
    memcpy(strings, host, hostlen);
    strings[hostlen] = '\0';
  }
  memcpy(strings + hostlen + 1, port, portlen);
  strings[hostlen + 1 + portlen] = '\0';
  d->host = strings;
  d->port_text = strings + hostlen + 1;
  d->zone = "";
  d->loop = loop;
  d->cb = cb;
  d->ctx = ctx;
  snprintf(d->net, sizeof d->net, "%s", proto);
  d->family = family;
  d->is_unix = is_unix;
  d->is_udp = is_udp;
  d->udp_fd = -1;
  d->port = (unsigned)portnum;
  d->port_named = named;
  d->addrs = &d->one;
  uv_timer_init(loop, &d->timer);
  d->timer.data = d;
  if (timeout_ms != 0) {
    uint64_t now = uv_now(loop);
    d->deadline = timeout_ms > UINT64_MAX - now ? UINT64_MAX : now + timeout_ms;
  }
  d->in_api = 1;

  int numeric = 0;
  if (!is_unix && !named) {
    /* Go dials the local system for an empty host. */
    const char *h = d->host;
    if (h[0] == '\0')
      h = family == AF_INET6 ? "::1" : "127.0.0.1";
    if (uv_ip4_addr(h, (int)portnum, &d->one.in) == 0) {
      numeric = 1;
    } else if (uv_ip6_addr(h, (int)portnum, &d->one.in6) == 0) {
      numeric = 1;
      const char *pct = strchr(d->host, '%');
      if (pct != NULL)
        d->zone = pct;
    }
    if (numeric && !family_ok(d, d->one.sa.sa_family)) {
      set_error(d, UV_EAI_ADDRFAMILY, "dial %s: address %s: no suitable address found",
                d->net, d->host);
      dial_finish(d, NULL);
      d->in_api = 0;
      return d;
    }
  }

  if (is_unix || numeric) {
    d->naddrs = 1;
    next_attempt(d);
  } else {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = is_udp ? SOCK_DGRAM : SOCK_STREAM;
    hints.ai_protocol = is_udp ? IPPROTO_UDP : IPPROTO_TCP;
    d->gai.data = d;
    const char *node = d->host;
    if (node[0] == '\0')
      node = family == AF_INET6 ? "::1" : "127.0.0.1";
    int r = uv_getaddrinfo(loop, &d->gai, gai_cb, node, named ? d->port_text : NULL, &hints);
    if (r < 0) {
      set_error(d, r, "dial %s: lookup %s: %s", d->net, d->host, lookup_text(r));
      dial_finish(d, NULL);
    } else {
      d->resolving = 1;
      if (d->deadline != 0)
        uv_timer_start(&d->timer, timer_cb, timeout_ms, 0);
    }
  }
  d->in_api = 0;
  return d;
}

void rd_dial_cancel(rd_dial *d) {
  if (d == NULL || d->delivered)
    return;
  if (d->done) {
    /* A result waiting for its deferred delivery: report the cancel (a UDP
     * socket made meanwhile is dropped). */
    if (d->udp_fd >= 0) {
      close(d->udp_fd);
      d->udp_fd = -1;
      d->status = -1;
    }
    if (d->status != 0)
      set_error(d, UV_ECANCELED, "operation was canceled");
    return;
  }
  d->in_api = 1;
  set_error(d, UV_ECANCELED, "operation was canceled");
  dial_finish(d, NULL);
  d->in_api = 0;
}

int rd_proto_is_udp(const char *proto) {
  const char *p = proto, *sep;
  while ((sep = strstr(p, "::")) != NULL)
    p = sep + 2;
  return strcmp(p, "udp") == 0 || strcmp(p, "udp4") == 0 || strcmp(p, "udp6") == 0;
}

int rd_dial_op_error(char *out, size_t len, const char *op, const char *net, int fd,
                     int status) {
  rd_dial_addr local, peer;
  socklen_t ll = sizeof local, pl = sizeof peer;
  memset(&local, 0, sizeof local);
  memset(&peer, 0, sizeof peer);
  if (fd < 0 || getsockname(fd, &local.sa, &ll) != 0 ||
      (local.sa.sa_family != AF_INET && local.sa.sa_family != AF_INET6))
    return 0;
  char l[RD_DIAL_ADDRLEN], r[RD_DIAL_ADDRLEN] = "";
  format_addr(l, sizeof l, &local, "");
  if (getpeername(fd, &peer.sa, &pl) == 0)
    format_addr(r, sizeof r, &peer, "");
  snprintf(out, len, "%s %s %s->%s: %s: %s", op, net, l, r, op, errno_text(status));
  return 1;
}
