/* The options table and the one function that stores a checked value. */
#include "rd_options.h"

#include <stdio.h>
#include <string.h>

#include "rd_client.h"
#include "rd_http.h"
#include "rd_server.h"

#define NONE RD_OPT_UNSTORED
#define SRV(f) offsetof(rd_server_config, f)
#define CLI(f) offsetof(rd_client_config, f)
#define SES(f) SRV(session.f), CLI(session.f)
#define SFIELD(f) sizeof(((rd_server_config *)0)->f)
#define CFIELD(f) sizeof(((rd_client_config *)0)->f)
#define BOTH (RD_OPT_SERVER | RD_OPT_CLIENT)
#define MIB ((uint64_t)1 << 20)

/* Rows in documentation order: both objects, then the server's, then the
 * client's. A name both take at different places with different defaults
 * (handshake_timeout) has one row per object. Columns as in rd_option: name,
 * kind, objects, server and client offsets, field size, max, default,
 * default in words, meaning, what the offender gets. */
const rd_option rd_options[] = {
    {"read_timeout", RD_OPT_SECONDS, BOTH, SES(read_timeout_ms), SFIELD(session.read_timeout_ms), 0,
     60000, NULL, "a session that receives nothing this long ends",
     "a session silent that long: close 1001"},
    {"idle_timeout", RD_OPT_SECONDS_OFF, BOTH, SES(idle_timeout_ms),
     SFIELD(session.idle_timeout_ms), 0, 0, NULL, "end connections idle this long (0: never)",
     "ERROR `idle timeout`, that connection ends"},
    {"udp_idle_timeout", RD_OPT_SECONDS_OFF, BOTH, SES(udp_idle_timeout_ms),
     SFIELD(session.udp_idle_timeout_ms), 0, 60000, NULL,
     "end udp connections idle this long (0: never)",
     "ERROR `idle timeout`, that connection ends"},
    {"max_connections", RD_OPT_COUNT, BOTH, SES(max_connections), SFIELD(session.max_connections),
     0, 65536, NULL, "open connections per session",
     "server: `srv.dial` raises `TunnelError` `too many connections`; agent: ERROR `too many "
     "connections` for that CONNECT"},
    {"max_message", RD_OPT_SIZE, BOTH, SES(max_message), SFIELD(session.max_message), 0, 16 * MIB,
     NULL, "largest WebSocket message accepted", "WebSocket close 1009; the session ends"},
    {"max_buffer", RD_OPT_SIZE, BOTH, SES(max_buffer), SFIELD(session.max_buffer), 0, 2 * MIB, NULL,
     "bytes held for one connection above which the peer gets PAUSE",
     "PAUSE for that connection"},
    {"hard_cap", RD_OPT_SIZE, BOTH, SES(hard_cap), SFIELD(session.hard_cap), 0, 64 * MIB, NULL,
     "bytes held for one connection past which it ends",
     "a peer that ignores PAUSE: ERROR `buffer limit exceeded`, that connection ends"},
    {"data_trace", RD_OPT_BOOL, BOTH, SES(trace), SFIELD(session.trace), 0, 0,
     "False (True with `CATTLE_TUNNEL_DATA_DEBUG=true`)",
     "log each tunnel message sent and received on `remotedialer_py.conn` (DEBUG)", NULL},

    {"handshake_timeout", RD_OPT_SECONDS, RD_OPT_SERVER, SRV(handshake_timeout_ms), NONE,
     SFIELD(handshake_timeout_ms), 0, 5000, NULL, "TLS handshake and HTTP upgrade request together",
     "slow or idle before the upgrade: `408 Request Timeout`, `request head timeout`; still in "
     "the TLS handshake: the connection closed"},
    {"sync_grace", RD_OPT_SECONDS, RD_OPT_SERVER, SRV(session.sync_grace_ms), NONE,
     SFIELD(session.sync_grace_ms), 0, 60000, NULL,
     "connections younger than this survive a SYNC_CONNECTIONS that omits them", NULL},
    {"auth_header", RD_OPT_HEADER, RD_OPT_SERVER, SRV(auth_header), NONE, SFIELD(auth_header),
     SFIELD(auth_header) - 1, 0, "X-Tunnel-ID", "the header naming the client key when "
     "`authorizer` is None", NULL},
    {"proxy_route", RD_OPT_BOOL, RD_OPT_SERVER, SRV(proxy_route), NONE, SFIELD(proxy_route), 0, 1,
     "True with `authorizer=None`, else False", "serve `/client/{id}/{scheme}/{host}/{path}` "
     "and `/stream/{id}/{proto}/{address}` (remote forwards)",
     NULL},
    {"proxy_pool_per_target", RD_OPT_COUNT, RD_OPT_SERVER, SRV(proxy_pool_per_target), NONE,
     SFIELD(proxy_pool_per_target), 65536, 16, NULL,
     "the route's idle tunneled connections kept per client key and target", NULL},
    {"proxy_pool_max", RD_OPT_COUNT, RD_OPT_SERVER, SRV(proxy_pool_max), NONE,
     SFIELD(proxy_pool_max), 1048576, 256, NULL,
     "the route's idle tunneled connections kept in all (past it the oldest closes)", NULL},
    {"proxy_pool_idle_timeout", RD_OPT_SECONDS_OFF, RD_OPT_SERVER,
     SRV(proxy_pool_idle_timeout_ms), NONE, SFIELD(proxy_pool_idle_timeout_ms), 0, 90000, NULL,
     "close the route's idle pooled connections, and idle kept-alive clients, after this "
     "(0: no pool)", NULL},
    {"proxy_ca_file", RD_OPT_PATH, RD_OPT_SERVER, NONE, NONE, 0, 0, 0, "the system store",
     "https targets of the route: trust these PEM CAs", NULL},
    {"proxy_insecure", RD_OPT_BOOL, RD_OPT_SERVER, NONE, NONE, 0, 0, 0, NULL,
     "https targets of the route: skip certificate verification", NULL},
    {"metrics_route", RD_OPT_BOOL, RD_OPT_SERVER, SRV(metrics_route), NONE, SFIELD(metrics_route),
     0, 1, NULL, "serve `GET /metrics`", NULL},
    {"debug_route", RD_OPT_BOOL, RD_OPT_SERVER, SRV(debug_route), NONE, SFIELD(debug_route), 0, 0,
     NULL, "serve `GET /debug/connections`, `GET /debug/peers` and `GET /debug/state` (JSON)",
     NULL},
    {"dashboard", RD_OPT_BOOL, RD_OPT_SERVER, SRV(dashboard), NONE, SFIELD(dashboard), 0, 0, NULL,
     "serve the dashboard at `/ui/`, `GET /debug/state` and its actions (see Dashboard)", NULL},
    {"tls_cert", RD_OPT_PATH, RD_OPT_SERVER, NONE, NONE, 0, 0, 0, "none (plain `ws://`)",
     "PEM certificate, leaf first, then intermediates: serve `wss://`", NULL},
    {"tls_key", RD_OPT_PATH, RD_OPT_SERVER, NONE, NONE, 0, 0, 0, "none",
     "unencrypted PEM private key for `tls_cert`", NULL},
    {"tls_client_ca", RD_OPT_PATH, RD_OPT_SERVER, NONE, NONE, 0, 0, 0, "none",
     "require client certificates signed by these PEM CAs", NULL},
    {"max_sessions", RD_OPT_COUNT, RD_OPT_SERVER, SRV(max_sessions), NONE, SFIELD(max_sessions), 0,
     65536, NULL, "sessions in all", "`503 Service Unavailable`, `too many sessions`"},
    {"max_sessions_per_key", RD_OPT_COUNT, RD_OPT_SERVER, SRV(max_sessions_per_key), NONE,
     SFIELD(max_sessions_per_key), 0, 64, NULL, "sessions per client key",
     "`429 Too Many Requests`, `too many sessions for client KEY`"},
    {"max_head", RD_OPT_SIZE, RD_OPT_SERVER, SRV(max_head), NONE, SFIELD(max_head), 16 * MIB, 16384,
     NULL, "bytes in an upgrade request's head",
     "`431 Request Header Fields Too Large`, `request head too large`"},
    {"max_headers", RD_OPT_COUNT, RD_OPT_SERVER, SRV(max_headers), NONE, SFIELD(max_headers),
     RD_HTTP_MAX_HEADERS, 64, NULL, "header lines in an upgrade request's head",
     "`431 Request Header Fields Too Large`, `request head too large`"},

    {"handshake_timeout", RD_OPT_SECONDS, RD_OPT_CLIENT, NONE, CLI(handshake_timeout_ms),
     CFIELD(handshake_timeout_ms), 0, 10000, NULL, "TLS handshake and HTTP upgrade together, per "
     "attempt", "the attempt is dropped and retried with backoff"},
    {"ping_interval", RD_OPT_SECONDS, RD_OPT_CLIENT, NONE, CLI(session.ping_interval_ms),
     CFIELD(session.ping_interval_ms), 0, 5000, NULL, "WebSocket Ping period", NULL},
    {"sync_interval", RD_OPT_SECONDS, RD_OPT_CLIENT, NONE, CLI(session.sync_interval_ms),
     CFIELD(session.sync_interval_ms), 0, 60000, NULL, "SYNC_CONNECTIONS period", NULL},
    {"backoff_min", RD_OPT_SECONDS, RD_OPT_CLIENT, NONE, CLI(backoff_min_ms),
     CFIELD(backoff_min_ms), 0, 500, NULL, "first wait before reconnecting", NULL},
    {"backoff_max", RD_OPT_SECONDS, RD_OPT_CLIENT, NONE, CLI(backoff_max_ms),
     CFIELD(backoff_max_ms), 0, 5000, NULL, "longest wait between reconnects", NULL},
    {"dial_timeout", RD_OPT_SECONDS, RD_OPT_CLIENT, NONE, CLI(session.dial_timeout_ms),
     CFIELD(session.dial_timeout_ms), 0, 60000, NULL, "local dials behind the agent",
     "ERROR `dial tcp ADDRESS: i/o timeout`"},
    {"max_pending_dials", RD_OPT_COUNT, RD_OPT_CLIENT, NONE, CLI(session.max_pending_dials),
     CFIELD(session.max_pending_dials), 0, 1024, NULL, "local dials in flight per session",
     "ERROR `too many dials in flight` for that CONNECT"},
    {"ca_file", RD_OPT_PATH, RD_OPT_CLIENT, NONE, NONE, 0, 0, 0, "the system store",
     "wss: trust these PEM CAs", NULL},
    {"insecure", RD_OPT_BOOL, RD_OPT_CLIENT, NONE, NONE, 0, 0, 0, NULL,
     "wss: skip certificate verification", NULL},
    {"client_cert", RD_OPT_PATH, RD_OPT_CLIENT, NONE, NONE, 0, 0, 0, "none",
     "wss: present this PEM certificate", NULL},
    {"client_key", RD_OPT_PATH, RD_OPT_CLIENT, NONE, NONE, 0, 0, 0, "none",
     "wss: private key for `client_cert`", NULL},
    {"server_name", RD_OPT_HOST, RD_OPT_CLIENT, NONE, CLI(server_name), CFIELD(server_name),
     CFIELD(server_name) - 1, 0, "the URL's host", "wss: the name to verify and send as SNI", NULL},
};

const size_t rd_options_count = sizeof rd_options / sizeof rd_options[0];

const rd_option *rd_option_find(const char *name, unsigned object) {
  for (size_t i = 0; i < rd_options_count; i++)
    if ((rd_options[i].objects & object) && strcmp(rd_options[i].name, name) == 0)
      return &rd_options[i];
  return NULL;
}

size_t rd_option_offset(const rd_option *o, unsigned object) {
  if (!(o->objects & object))
    return RD_OPT_UNSTORED;
  return object == RD_OPT_SERVER ? o->server_off : o->client_off;
}

/* Integer fields are uint64_t, size_t or int; the width says which. */
static void put_uint(void *dst, size_t width, uint64_t v) {
  if (width == sizeof(uint64_t)) {
    memcpy(dst, &v, sizeof v);
  } else {
    uint32_t n = (uint32_t)v;
    memcpy(dst, &n, sizeof n);
  }
}

/* RFC 7230 tchar: what a header name may contain. */
static int is_token(const char *s) {
  if (*s == '\0')
    return 0;
  for (; *s != '\0'; s++)
    if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
          strchr("!#$%&'*+-.^_`|~", *s) != NULL))
      return 0;
  return 1;
}

static int is_host(const char *s) {
  if (*s == '\0')
    return 0;
  for (; *s != '\0'; s++)
    if ((unsigned char)*s <= 0x20 || *s == 0x7f)
      return 0;
  return 1;
}

int rd_option_store(const rd_option *o, unsigned object, void *cfg, const rd_option_value *v,
                    char *err, size_t errlen) {
  size_t off = rd_option_offset(o, object);
  if (off == RD_OPT_UNSTORED) {
    snprintf(err, errlen, "%s is not an option stored for this object", o->name);
    return RD_EINVAL;
  }
  char *dst = (char *)cfg + off;
  uint64_t max = o->max != 0 ? o->max : RD_OPT_MAX_SIZE;
  switch (o->kind) {
  case RD_OPT_SECONDS:
  case RD_OPT_SECONDS_OFF: {
    double s = v->seconds;
    if (o->kind == RD_OPT_SECONDS_OFF && s == 0) {
      put_uint(dst, o->field_size, 0);
      return RD_OK;
    }
    if (!(s > 0)) { /* also NaN */
      snprintf(err, errlen, "%s must be a positive number of seconds, got %g", o->name, s);
      return RD_EMALFORMED;
    }
    double capped = s < RD_OPT_MAX_SECONDS ? s : RD_OPT_MAX_SECONDS;
    uint64_t ms = (uint64_t)(capped * 1000.0 + 0.5);
    put_uint(dst, o->field_size, ms > 0 ? ms : 1); /* positive stays on */
    return RD_OK;
  }
  case RD_OPT_SIZE:
  case RD_OPT_COUNT:
    if (v->number < 1 || (uint64_t)v->number > max) {
      snprintf(err, errlen, "%s must be between 1 and %llu%s, got %lld", o->name,
               (unsigned long long)max, o->kind == RD_OPT_SIZE ? " bytes" : "",
               (long long)v->number);
      return RD_EMALFORMED;
    }
    put_uint(dst, o->field_size, (uint64_t)v->number);
    return RD_OK;
  case RD_OPT_BOOL:
    put_uint(dst, o->field_size, v->flag != 0);
    return RD_OK;
  case RD_OPT_HEADER:
  case RD_OPT_HOST: {
    const char *t = v->text != NULL ? v->text : "";
    if (o->kind == RD_OPT_HEADER ? !is_token(t) : !is_host(t)) {
      snprintf(err, errlen, "%s must be %s, got '%s'", o->name, rd_option_kind_expects(o->kind),
               t);
      return RD_EMALFORMED;
    }
    size_t len = strlen(t);
    if (len > max || len >= o->field_size) {
      snprintf(err, errlen, "%s must be at most %llu bytes, got %zu", o->name,
               (unsigned long long)max, len);
      return RD_EMALFORMED;
    }
    memcpy(dst, t, len + 1);
    return RD_OK;
  }
  case RD_OPT_PATH:
    break;
  }
  snprintf(err, errlen, "%s is not an option stored for this object", o->name);
  return RD_EINVAL;
}

void rd_options_settle(unsigned object, void *cfg) {
  rd_session_config *s;
  if (object == RD_OPT_CLIENT) {
    rd_client_config *c = cfg;
    if (c->backoff_max_ms < c->backoff_min_ms)
      c->backoff_max_ms = c->backoff_min_ms;
    s = &c->session;
  } else {
    s = &((rd_server_config *)cfg)->session;
  }
  if (s->hard_cap < s->max_buffer)
    s->hard_cap = s->max_buffer * 2;
}

const char *rd_option_kind_name(rd_option_kind kind) {
  switch (kind) {
  case RD_OPT_SECONDS:
    return "seconds";
  case RD_OPT_SECONDS_OFF:
    return "seconds_or_off";
  case RD_OPT_SIZE:
    return "size";
  case RD_OPT_COUNT:
    return "count";
  case RD_OPT_BOOL:
    return "bool";
  case RD_OPT_HEADER:
    return "header";
  case RD_OPT_HOST:
    return "host";
  case RD_OPT_PATH:
    return "path";
  }
  return "?";
}

const char *rd_option_kind_expects(rd_option_kind kind) {
  switch (kind) {
  case RD_OPT_SECONDS:
  case RD_OPT_SECONDS_OFF:
    return "a number of seconds";
  case RD_OPT_SIZE:
    return "an int (bytes)";
  case RD_OPT_COUNT:
    return "an int";
  case RD_OPT_BOOL:
    return "True or False";
  case RD_OPT_HEADER:
    return "an HTTP header name";
  case RD_OPT_HOST:
    return "a host name or address";
  case RD_OPT_PATH:
    return "a file path";
  }
  return "?";
}
