/* The agent: connects out to a server's WebSocket URL with its headers,
 * serves the session, pipes each CONNECT the authorizer allows to the local
 * address, and reconnects with capped exponential backoff and jitter. Given
 * several URLs it tries them in turn. A server's link to a peer is the same
 * connector with hooks in place of the agent's behaviour. Loop thread only. */
#ifndef RD_CLIENT_H
#define RD_CLIENT_H

#include "rd_loop.h"
#include "rd_metrics.h"
#include "rd_session.h"
#include "rd_tls.h"

enum { RD_ALLOW_ALL = 0, RD_ALLOW_PATTERNS = 1, RD_ALLOW_CALLBACK = 2 };

typedef struct rd_client rd_client;

/* Where the connector stands, as hooks see it. */
enum { RD_CLIENT_DIALING = 1, RD_CLIENT_CONNECTED = 2, RD_CLIENT_WAITING = 3 };

/* A peer link's behaviour (rd_server_peers.c): every hook gets ctx. */
typedef struct rd_client_hooks {
  /* An attempt starts (DIALING), the session is up (CONNECTED, see
   * rd_client_session) or an attempt failed or the session ended (WAITING,
   * why says what happened). */
  void (*on_state)(void *ctx, rd_client *cli, int state, const char *why);
  /* A CONNECT arrived (replaces the authorizer and the local dial). */
  void (*on_connect)(void *ctx, rd_session *s, rd_conn *c);
  /* A DISCONNECT_CLIENT arrived for client_key. */
  void (*on_disconnect_client)(void *ctx, const char *client_key);
  /* The client's memory is gone. */
  void (*on_freed)(void *ctx);
} rd_client_hooks;

typedef struct rd_client_config {
  int allow_mode;
  char **patterns; /* RD_ALLOW_PATTERNS: fnmatch patterns over "proto/address" */
  size_t npatterns;
  uint64_t handshake_timeout_ms;
  uint64_t backoff_min_ms;
  uint64_t backoff_max_ms;
  rd_tls_ctx *tls;        /* required for wss:// (the client takes a reference) */
  char server_name[256];  /* wss: name to verify and send as SNI; "" = the URL's host */
  /* One HTTP proxy URL per server URL ("http://[user:pass@]host[:port]";
   * NULL or "" for a direct connection), or NULL for no proxy at all. The
   * strings are read during rd_client_start only. */
  const char *const *proxies;
  rd_session_config session;
  /* A peer link: hooks (with hooks_ctx) replace the agent's behaviour, the
   * session counts into metrics (a registry the caller keeps) as a link,
   * and the client is not registered as an object: its owner closes it
   * with rd_client_close. NULL for an agent. */
  const rd_client_hooks *hooks;
  void *hooks_ctx;
  rd_metrics *metrics;
  /* An agent: post news for Python (rd_event_post) when its session comes
   * up ("connect") or ends ("disconnect"), and when an attempt fails. */
  int events;
  /* An agent: allowed targets are dialed by Python's own dialer (an
   * RD_REQ_DIAL answered with a socket), not locally; session.dial_timeout_ms
   * bounds the wait for it. */
  int dialer;
  /* An agent: post "dial_failed" news (rd_event_post_dial) for each
   * CONNECT it refused or whose local dial failed. */
  int conn_events;
} rd_client_config;

void rd_client_config_default(rd_client_config *cfg);

/* Parses the urls (ws:// or wss://host[:port][/path]; nurls >= 1) and
 * their proxies (cfg->proxies: an attempt through a proxy dials it, sends
 * CONNECT for the server's host:port and goes on, TLS and upgrade, through
 * the tunnel once it answers 200, all within handshake_timeout), copies
 * headers ("Name: value\r\n" lines) and the patterns, and starts connecting
 * to the first URL. A failed attempt moves on to the next URL at once; the
 * backoff grows once a whole round has failed. A session that ends is
 * retried on its own URL first. Returns RD_OK and the client (registered,
 * unless it is a link), or a negative code and a message in err. */
int rd_client_start(const char *const *urls, size_t nurls, const char *headers,
                    const rd_client_config *cfg, rd_client **out, char *err, size_t errlen);
/* Begins closing (idempotent); a link's owner calls it, agents are closed as
 * objects. The client frees itself once its handles are closed. */
void rd_client_close(rd_client *cli);
/* The live session, or NULL. */
rd_session *rd_client_session(const rd_client *cli);
/* The URL of the current (or last) attempt. */
const char *rd_client_url(const rd_client *cli);
uint64_t rd_client_handle(const rd_client *cli);
rd_metrics *rd_client_metrics(rd_client *cli);
int rd_client_is_connected(const rd_client *cli);
/* Finishes cmd with status 1 once connected, 0 after timeout_ms. */
void rd_client_wait_connected(rd_client *cli, rd_cmd *cmd, uint64_t timeout_ms);
/* The last connection error (empty when none). */
const char *rd_client_last_error(const rd_client *cli);

#endif
