/* End-to-end tests of the agent (the client) through the engine's API
 * (rd_api.h): the ways it fails to connect and what it reports, the
 * patterns that limit what it dials, and closing it while connections are
 * open. Each case runs in a process of its own with a fresh engine
 * (rd_test_engine.h). */
#define _GNU_SOURCE
#include "rd_test_engine.h"

/* ---- failing to connect ---- */

/* Waits until the client's last error reads `want` (a prefix). */
static int wait_last_error(uint64_t cli, const char *want) {
  char last[160] = "";
  int connected = 0;
  uint64_t deadline = now_ms() + WAIT_MS;
  for (;;) {
    if (rd_api_client_state(cli, &connected, last, sizeof last) == RD_OK &&
        strncmp(last, want, strlen(want)) == 0)
      return 1;
    if (now_ms() >= deadline)
      break;
    nap();
  }
  fprintf(stderr, "  last error \"%s\", want \"%s...\"\n", last, want);
  return 0;
}

TEST(test_client_failures) {
  start_hole();
  CHECK(start_server_and_agent());
  int64_t heap = heap_in_use();
  rd_client_config cfg;
  client_config(&cfg);
  cfg.handshake_timeout_ms = 200;
  char err[256] = "";
  /* No tunnel id: the server answers 401 and the client keeps retrying. */
  uint64_t rejected = 0;
  CHECK_EQ_INT(rd_api_client_new(g_url, "", &cfg, &rejected, err, sizeof err), RD_OK);
  CHECK(wait_last_error(rejected, "websocket: bad handshake (HTTP 401: failed authentication)"));
  int connected = 1;
  CHECK_EQ_INT(rd_api_client_wait_connected(rejected, 50, &connected), RD_OK);
  CHECK_EQ_INT(connected, 0);
  /* A listener that never answers the handshake. */
  int mute_port = 0;
  int lfd = listen_loopback(0, 64, &mute_port);
  CHECK(lfd >= 0);
  char url[64];
  snprintf(url, sizeof url, "ws://127.0.0.1:%d/connect", mute_port);
  uint64_t mute = 0;
  CHECK_EQ_INT(rd_api_client_new(url, "X-Tunnel-ID: mute\r\n", &cfg, &mute, err, sizeof err),
               RD_OK);
  CHECK(wait_last_error(mute, "websocket: handshake timeout"));
  /* A listener whose queue is full: the dial itself times out. */
  snprintf(url, sizeof url, "ws://%s/connect", g_hole_addr);
  uint64_t lost = 0;
  CHECK_EQ_INT(rd_api_client_new(url, "X-Tunnel-ID: lost\r\n", &cfg, &lost, err, sizeof err),
               RD_OK);
  char want[96];
  snprintf(want, sizeof want, "dial tcp %s: i/o timeout", g_hole_addr);
  CHECK(wait_last_error(lost, want));
  /* Closing releases whoever waits for it to connect. */
  waiter_job wj;
  waiter_start(&wj, lost);
  /* Closed in whatever state they are in: dialing, handshaking or waiting. */
  CHECK_EQ_INT(rd_api_close(rejected), RD_OK);
  CHECK_EQ_INT(rd_api_close(mute), RD_OK);
  CHECK_EQ_INT(rd_api_close(lost), RD_OK);
  waiter_check_released(&wj);
  close(lfd);
  char keys[256];
  server_clients(g_srv, keys, sizeof keys);
  CHECK_STR(keys, "agent-1");
  CHECK(wait_heap(heap));
}

/* ---- the agent's connect patterns ---- */

TEST(test_connect_patterns) {
  start_echo();
  start_hole();
  CHECK(start_server_and_agent());
  rd_client_config cfg;
  client_config(&cfg);
  char pattern[64];
  snprintf(pattern, sizeof pattern, "tcp/%s", g_echo_addr);
  char *patterns[1] = {pattern};
  cfg.allow_mode = RD_ALLOW_PATTERNS;
  cfg.patterns = patterns;
  cfg.npatterns = 1;
  uint64_t cli3 = 0;
  CHECK_EQ_INT(start_client_cfg("agent-3", &cfg, &cli3), RD_OK);
  CHECK(wait_connected(cli3));
  tconn c;
  echo_through(g_srv, "agent-3", "allowed");
  /* Refused: that connection alone ends, the session stays. */
  if (dial(g_srv, "agent-3", g_hole_addr, &c) == RD_OK) {
    check_conn_ends(&c, "connect not allowed");
  }
  echo_through(g_srv, "agent-3", "allowed again");
  CHECK(wait_balanced(g_srv, "server"));
  CHECK(wait_balanced(cli3, "patterned client"));
  CHECK(wait_no_open_conns());
  CHECK_EQ_INT(rd_api_close(cli3), RD_OK);
  CHECK(wait_clients(g_srv, "agent-1"));
}

/* ---- the agent closes while connections are open ---- */

TEST(test_client_close_with_open_conns) {
  start_echo();
  start_hole();
  CHECK(start_server_and_agent());
  uint64_t cli2 = 0;
  CHECK_EQ_INT(start_client("agent-2", &cli2), RD_OK);
  CHECK(wait_connected(cli2));
  CHECK(wait_clients(g_srv, "agent-1,agent-2"));
  open_set o;
  open_set_dial(&o, g_srv, "agent-2");
  /* Five on each side: the agent has taken every CONNECT. */
  CHECK(wait_open_conns(10));
  CHECK_EQ_INT(rd_api_close(cli2), RD_OK);
  open_set_check_ended(&o);
  CHECK(wait_clients(g_srv, "agent-1"));
  int has = 1;
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "agent-2", &has), RD_OK);
  CHECK_EQ_INT(has, 0);
  CHECK(wait_balanced(g_srv, "server"));
  CHECK(wait_no_open_conns());
  CHECK_EQ_INT(conns_added(g_srv, "agent-2", g_echo_addr), 4);
  CHECK_EQ_INT(sessions_removed(g_srv, "agent-2"), 1);
  /* The closed client is gone: its handle no longer answers. */
  rd_sample_list l;
  CHECK_EQ_INT(rd_api_metrics(cli2, &l), RD_ECLOSED);
  CHECK_EQ_INT(rd_api_close(cli2), RD_OK); /* idempotent */
  /* The other agent was not disturbed. */
  echo_through(g_srv, "agent-1", "agent-1 still here");
  check_settled();
}

RD_ENGINE_TEST_MAIN(T(test_client_failures), T(test_connect_patterns),
                    T(test_client_close_with_open_conns))
