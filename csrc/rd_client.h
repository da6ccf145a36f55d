/* The agent: connects out to a server's WebSocket URL with its headers,
 * serves the session, pipes each CONNECT the authorizer allows to the local
 * address, and reconnects with capped exponential backoff and jitter. Loop
 * thread only. */
#ifndef RD_CLIENT_H
#define RD_CLIENT_H

#include "rd_loop.h"
#include "rd_metrics.h"
#include "rd_session.h"
#include "rd_tls.h"

enum { RD_ALLOW_ALL = 0, RD_ALLOW_PATTERNS = 1, RD_ALLOW_CALLBACK = 2 };

typedef struct rd_client_config {
  int allow_mode;
  char **patterns; /* RD_ALLOW_PATTERNS: fnmatch patterns over "proto/address" */
  size_t npatterns;
  uint64_t handshake_timeout_ms;
  uint64_t backoff_min_ms;
  uint64_t backoff_max_ms;
  rd_tls_ctx *tls;        /* required for wss:// (the client takes a reference) */
  char server_name[256];  /* wss: name to verify and send as SNI; "" = the URL's host */
  rd_session_config session;
} rd_client_config;

void rd_client_config_default(rd_client_config *cfg);

typedef struct rd_client rd_client;

/* Parses url (ws:// or wss://host[:port][/path]), copies headers ("Name: value\r\n"
 * lines) and the patterns, and starts connecting. Returns RD_OK and the
 * registered client, or a negative code and a message in err. */
int rd_client_start(const char *url, const char *headers, const rd_client_config *cfg,
                    rd_client **out, char *err, size_t errlen);
uint64_t rd_client_handle(const rd_client *cli);
rd_metrics *rd_client_metrics(rd_client *cli);
int rd_client_is_connected(const rd_client *cli);
/* Finishes cmd with status 1 once connected, 0 after timeout_ms. */
void rd_client_wait_connected(rd_client *cli, rd_cmd *cmd, uint64_t timeout_ms);
/* The last connection error (empty when none). */
const char *rd_client_last_error(const rd_client *cli);

#endif
