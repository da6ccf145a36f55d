/* End-to-end tests of HA peering through the engine's API: two or three
 * servers in one process, linked to each other, with agent-1 on the first.
 * A dial via a peer reaches the agent and is counted as Go counts it on both
 * servers; a wrong token gets no peer rights; a lost peer drops its keys at
 * once; remove_peer, a new token, disconnect across the group, and an agent
 * that fails over between server URLs. Each case runs in a process of its
 * own with a fresh engine (rd_test_engine.h), which checks that nothing is
 * left allocated. */
#define _GNU_SOURCE
#include "rd_test_engine.h"

typedef struct {
  uint64_t h;
  char url[64];
} peer_server;

static int peer_start(peer_server *p, const char *id, const char *token) {
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  snprintf(cfg.peer_id, sizeof cfg.peer_id, "%s", id);
  snprintf(cfg.peer_token, sizeof cfg.peer_token, "%s", token);
  return start_own_server(&cfg, &p->h, p->url, sizeof p->url);
}

static int add_peer(peer_server *p, const peer_server *other, const char *id, const char *token) {
  char err[256] = "";
  int rc = rd_api_server_add_peer(p->h, other->url, id, token, err, sizeof err);
  if (rc != RD_OK)
    fprintf(stderr, "  add_peer %s: %d %s\n", id, rc, err);
  return rc;
}

/* Polls until a dial for key on h would go via `want` ("" local, a peer id,
 * NULL nowhere). */
static int wait_route(uint64_t h, const char *key, const char *want) {
  uint64_t deadline = now_ms() + WAIT_MS;
  char via[RD_API_ROUTE_MAX] = "";
  int found = 0;
  for (;;) {
    CHECK_EQ_INT(rd_api_server_route(h, key, &found, via, sizeof via), RD_OK);
    if (want == NULL ? !found : found && strcmp(via, want) == 0)
      return 1;
    if (now_ms() >= deadline)
      break;
    nap();
  }
  fprintf(stderr, "  route of %s: %s \"%s\", want %s\n", key, found ? "via" : "none", via,
          want != NULL ? want : "none");
  return 0;
}

/* The first peer's state of h, copied into state and err. */
static void peer_state(uint64_t h, char *state, size_t slen, char *err, size_t elen,
                       uint64_t *attempts) {
  rd_peer_list l;
  state[0] = err[0] = '\0';
  CHECK_EQ_INT(rd_api_server_peers(h, &l), RD_OK);
  if (l.count > 0) {
    snprintf(state, slen, "%s", l.items[0].state);
    snprintf(err, elen, "%s", l.items[0].last_error);
    *attempts = l.items[0].attempts;
  }
  rd_peer_list_free(&l);
}

/* A and B, each a peer of the other (A presenting a_token, where B expects
 * "tok"); agent-1 on A. */
static peer_server g_a, g_b;

static void start_pair_with(const char *a_token) {
  CHECK_EQ_INT(peer_start(&g_a, "A", a_token), RD_OK);
  CHECK_EQ_INT(peer_start(&g_b, "B", "tok"), RD_OK);
  CHECK_EQ_INT(add_peer(&g_a, &g_b, "B", "tok"), RD_OK);
  CHECK_EQ_INT(add_peer(&g_b, &g_a, "A", "tok"), RD_OK);
  rd_client_config cfg;
  client_config(&cfg);
  CHECK_EQ_INT(start_client_at(g_a.url, "agent-1", &cfg, &g_cli), RD_OK);
  CHECK(wait_connected(g_cli));
  CHECK(wait_route(g_a.h, "agent-1", ""));
}

static void start_pair(void) {
  start_pair_with("tok");
  CHECK(wait_route(g_b.h, "agent-1", "A"));
}

TEST(test_dial_via_peer) {
  start_echo();
  start_pair();
  echo_through(g_b.h, "agent-1", "through the peer");
  echo_through(g_a.h, "agent-1", "local");
  CHECK(wait_balanced(g_a.h, "A"));
  CHECK(wait_balanced(g_b.h, "B"));
  /* As Go counts: B's dial on its session from A under A's id, with the
   * key in the proto; A's link side under "client", its agent side under
   * the key. */
  CHECK_EQ_INT(sample_value(g_b.h, "session_server_total_add_connections", "A", "agent-1::tcp",
                            g_echo_addr), 1);
  CHECK_EQ_INT(sample_value(g_a.h, "session_server_total_add_connections", "client",
                            "agent-1::tcp", g_echo_addr), 1);
  CHECK_EQ_INT(conns_added(g_a.h, "agent-1", g_echo_addr), 2);
  CHECK_EQ_INT(sample_value(g_b.h, "session_server_total_add_websocket_session", "A", "true",
                            NULL), 1);
  CHECK_EQ_INT(sample_value(g_a.h, "session_server_total_peer_ws_connected", "B", NULL, NULL), 1);
  CHECK(sample_value(g_a.h, "session_server_total_peer_ws_attempt", "B", NULL, NULL) >= 1);
  /* A link is not a websocket session of the server's. */
  CHECK_EQ_INT(sample_value(g_a.h, "session_server_total_add_websocket_session", "client",
                            "false", NULL), 0);
}

TEST(test_unknown_key_via_peer) {
  start_pair();
  tconn c;
  CHECK_EQ_INT(dial(g_b.h, "nobody", "127.0.0.1:1", &c), RD_ENOSESSION);
}

TEST(test_wrong_token) {
  /* A presents the wrong token to B: no peer rights there (the header
   * authorizer finds no X-Tunnel-ID and answers 401), so A's agents are
   * never announced to B; A keeps retrying. */
  start_pair_with("wrong");
  char state[32], err[160];
  uint64_t attempts = 0, deadline = now_ms() + WAIT_MS;
  do {
    nap();
    peer_state(g_a.h, state, sizeof state, err, sizeof err, &attempts);
  } while (attempts < 2 && now_ms() < deadline);
  CHECK(attempts >= 2);
  CHECK(strstr(err, "HTTP 401") != NULL);
  CHECK(wait_route(g_b.h, "agent-1", NULL));
  CHECK_EQ_INT(sample_value(g_b.h, "session_server_total_add_websocket_session", "A", "true",
                            NULL), 0);
  /* B's own link to A is fine: A accepted it as a peer. */
  CHECK_EQ_INT(sample_value(g_a.h, "session_server_total_add_websocket_session", "B", "true",
                            NULL), 1);
}

TEST(test_lost_peer_drops_keys) {
  start_echo();
  start_pair();
  tconn c;
  CHECK_EQ_INT(dial(g_b.h, "agent-1", g_echo_addr, &c), RD_OK);
  CHECK(echo_once(c.fd, "open while A goes"));
  CHECK_EQ_INT(rd_api_close(g_a.h), RD_OK);
  /* The connection through A ends on B's side too, and B forgets the key. */
  CHECK(wait_status_ended(c.st));
  CHECK(reads_eof(c.fd));
  tconn_close(&c);
  CHECK(wait_route(g_b.h, "agent-1", NULL));
  CHECK_EQ_INT(dial(g_b.h, "agent-1", g_echo_addr, &c), RD_ENOSESSION);
  CHECK(wait_balanced(g_b.h, "B"));
  char state[32], err[160];
  uint64_t attempts = 0;
  peer_state(g_b.h, state, sizeof state, err, sizeof err, &attempts);
  CHECK(strcmp(state, "connected") != 0);
  CHECK_EQ_INT(sample_value(g_b.h, "session_server_total_peer_ws_disconnected", "A", NULL, NULL),
               1);
}

TEST(test_remove_and_readd_peer) {
  start_echo();
  start_pair();
  int removed = 0;
  CHECK_EQ_INT(rd_api_server_remove_peer(g_b.h, "A", &removed), RD_OK);
  CHECK_EQ_INT(removed, 1);
  CHECK_EQ_INT(rd_api_server_remove_peer(g_b.h, "A", &removed), RD_OK);
  CHECK_EQ_INT(removed, 0);
  /* A's session to B ended with it: B no longer reaches agent-1. */
  CHECK(wait_route(g_b.h, "agent-1", NULL));
  rd_peer_list l;
  CHECK_EQ_INT(rd_api_server_peers(g_b.h, &l), RD_OK);
  CHECK_EQ_INT(l.count, 0);
  rd_peer_list_free(&l);
  CHECK_EQ_INT(add_peer(&g_b, &g_a, "A", "tok"), RD_OK);
  CHECK(wait_route(g_b.h, "agent-1", "A"));
  echo_through(g_b.h, "agent-1", "after re-adding");
  /* The same peer again changes nothing; a new token restarts it. */
  char state[32], err[160];
  uint64_t before = 0, after = 0;
  peer_state(g_a.h, state, sizeof state, err, sizeof err, &before);
  CHECK_EQ_INT(add_peer(&g_a, &g_b, "B", "tok"), RD_OK);
  peer_state(g_a.h, state, sizeof state, err, sizeof err, &after);
  CHECK_EQ_INT(after, before);
  CHECK_STR(state, "connected");
  CHECK_EQ_INT(add_peer(&g_a, &g_b, "B", "tok2"), RD_OK);
  peer_state(g_a.h, state, sizeof state, err, sizeof err, &after);
  CHECK(after <= 1);
}

TEST(test_add_peer_errors) {
  uint64_t h;
  char url[64], err[256] = "";
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  CHECK_EQ_INT(start_own_server(&cfg, &h, url, sizeof url), RD_OK);
  CHECK_EQ_INT(rd_api_server_add_peer(h, "ws://127.0.0.1:1/connect", "B", "tok", err, sizeof err),
               RD_EINVAL);
  CHECK(strstr(err, "peer_id") != NULL);
  CHECK_EQ_INT(peer_start(&g_a, "A", "tok"), RD_OK);
  CHECK_EQ_INT(rd_api_server_add_peer(g_a.h, "ws://127.0.0.1:1/connect", "B", "to\r\nk", err,
                                      sizeof err), RD_EMALFORMED);
  CHECK_EQ_INT(rd_api_server_add_peer(g_a.h, "http://127.0.0.1:1/", "B", "tok", err, sizeof err),
               RD_EMALFORMED);
  CHECK(strstr(err, "want ws:// or wss://") != NULL);
  rd_peer_list l;
  CHECK_EQ_INT(rd_api_server_peers(g_a.h, &l), RD_OK);
  CHECK_EQ_INT(l.count, 0);
  rd_peer_list_free(&l);
}

TEST(test_disconnect_across_peers) {
  start_pair();
  size_t ended = 9;
  CHECK_EQ_INT(rd_api_server_disconnect(g_b.h, "agent-1", &ended), RD_OK);
  CHECK_EQ_INT(ended, 0);
  /* A ends agent-1's session on B's word; the agent comes back. */
  uint64_t deadline = now_ms() + WAIT_MS;
  while (sessions_removed(g_a.h, "agent-1") < 1 && now_ms() < deadline)
    nap();
  CHECK_EQ_INT(sessions_removed(g_a.h, "agent-1"), 1);
  CHECK(wait_route(g_a.h, "agent-1", ""));
  CHECK_EQ_INT(rd_api_server_disconnect(g_a.h, "agent-1", &ended), RD_OK);
  CHECK_EQ_INT(ended, 1);
}

TEST(test_agent_fails_over) {
  CHECK_EQ_INT(peer_start(&g_a, "A", "tok"), RD_OK);
  /* The first URL has no server: the agent moves on to the second. */
  int hole_port = 0;
  int hole = listen_loopback(0, 1, &hole_port);
  CHECK(hole >= 0);
  close(hole); /* the port now refuses */
  char dead[64];
  snprintf(dead, sizeof dead, "ws://127.0.0.1:%d/connect", hole_port);
  const char *urls[2] = {dead, g_a.url};
  rd_client_config cfg;
  client_config(&cfg);
  char err[256] = "";
  CHECK_EQ_INT(rd_api_client_new_urls(urls, 2, "X-Tunnel-ID: agent-1\r\n", &cfg, &g_cli, err,
                                      sizeof err), RD_OK);
  CHECK(wait_connected(g_cli));
  int connected = 0;
  char last[160], url[512];
  CHECK_EQ_INT(rd_api_client_state_url(g_cli, &connected, last, sizeof last, url, sizeof url),
               RD_OK);
  CHECK_STR(url, g_a.url);
  CHECK_EQ_INT(rd_api_client_new_urls(urls, 0, "", &cfg, &g_cli, err, sizeof err), RD_EMALFORMED);
}

TEST(test_shutdown_with_peers) {
  start_echo();
  start_pair();
  tconn c;
  CHECK_EQ_INT(dial(g_b.h, "agent-1", g_echo_addr, &c), RD_OK);
  CHECK(echo_once(c.fd, "left open"));
  /* end_case shuts the engine down with everything open: nothing leaks. */
  tconn_close(&c);
}

/* ---- news of sessions (rd_event_post / rd_event_next) ---- */

static int take_news(const char *what, const char *key, int peer) {
  rd_request *r = rd_event_next(WAIT_MS);
  if (r == NULL) {
    fprintf(stderr, "  no news, want %s %s\n", what, key);
    return 0;
  }
  int ok = r->kind == RD_REQ_EVENT && strcmp(r->event.what, what) == 0 &&
           strcmp(r->event.key, key) == 0 && r->event.peer == peer;
  if (!ok)
    fprintf(stderr, "  news %s %s peer=%d, want %s %s peer=%d\n", r->event.what, r->event.key,
            r->event.peer, what, key, peer);
  rd_request_release(r);
  return ok;
}

TEST(test_session_news) {
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  cfg.events = 1;
  snprintf(cfg.peer_id, sizeof cfg.peer_id, "A");
  snprintf(cfg.peer_token, sizeof cfg.peer_token, "tok");
  CHECK_EQ_INT(start_own_server(&cfg, &g_a.h, g_a.url, sizeof g_a.url), RD_OK);
  CHECK_EQ_INT(peer_start(&g_b, "B", "tok"), RD_OK);
  rd_client_config ccfg;
  client_config(&ccfg);
  CHECK_EQ_INT(start_client_at(g_a.url, "agent-1", &ccfg, &g_cli), RD_OK);
  CHECK(wait_connected(g_cli));
  CHECK(take_news("connect", "agent-1", 0));
  CHECK_EQ_INT(add_peer(&g_a, &g_b, "B", "tok"), RD_OK);
  CHECK_EQ_INT(add_peer(&g_b, &g_a, "A", "tok"), RD_OK);
  CHECK(take_news("connect", "B", 1));
  CHECK_EQ_INT(rd_api_close(g_cli), RD_OK);
  CHECK(take_news("disconnect", "agent-1", 0));
  CHECK_EQ_INT(rd_api_close(g_b.h), RD_OK);
  CHECK(take_news("disconnect", "B", 1));
  /* News nobody takes is freed at shutdown (end_case checks the heap). */
  CHECK_EQ_INT(start_client_at(g_a.url, "agent-2", &ccfg, &g_cli), RD_OK);
  CHECK(wait_connected(g_cli));
}

RD_ENGINE_TEST_MAIN(T(test_dial_via_peer), T(test_unknown_key_via_peer), T(test_wrong_token),
                    T(test_lost_peer_drops_keys), T(test_remove_and_readd_peer),
                    T(test_add_peer_errors), T(test_disconnect_across_peers),
                    T(test_agent_fails_over), T(test_shutdown_with_peers),
                    T(test_session_news))
