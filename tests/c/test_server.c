/* End-to-end tests of the server through the engine's API (rd_api.h):
 * agents connecting, the server's HTTP answers and argument errors, one key
 * shared by two sessions, connection limits, the read deadline, a server
 * that closes and comes back on the same port, and the engine's end: a
 * shutdown with everything still open must free everything too, as must
 * one after everything was closed, and a process that keeps SIGPIPE's
 * default must not be killed by the engine's writes; calls posted without
 * waiting (rd_api_op) complete on an eventfd. Each case runs in a
 * process of its own with a fresh engine (rd_test_engine.h). */
#define _GNU_SOURCE
#include "rd_test_engine.h"

#include <sys/eventfd.h>

/* ---- connect ---- */

TEST(test_connect) {
  CHECK(start_server_and_agent());
  char keys[256];
  server_clients(g_srv, keys, sizeof keys);
  CHECK_STR(keys, "agent-1");
  int has = 0;
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "agent-1", &has), RD_OK);
  CHECK_EQ_INT(has, 1);
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "nope", &has), RD_OK);
  CHECK_EQ_INT(has, 0);
  char last[160] = "x";
  int connected = 0;
  CHECK_EQ_INT(rd_api_client_state(g_cli, &connected, last, sizeof last), RD_OK);
  CHECK_EQ_INT(connected, 1);
  CHECK_STR(last, "");
  CHECK_EQ_INT(sessions_added(g_srv, "agent-1"), 1);
  CHECK_EQ_INT(sessions_added(g_cli, "client"), 1);
  CHECK_EQ_INT(rd_engine_counts_get().open_sessions, 2);
}

/* ---- the server's other answers, and errors the API reports ---- */

#define WS_HEADERS                                                                          \
  "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"             \
  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"

TEST(test_http_routes) {
  CHECK(start_server_and_agent());
  static char resp[65536];
  CHECK(http_exchange("GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 404 ", 13) == 0);
  CHECK_STR(http_body(resp), "404 page not found\n");
  /* An upgrade without the tunnel id: the Go example server's answer. */
  CHECK(http_exchange("GET /connect HTTP/1.1\r\nHost: x\r\n" WS_HEADERS "\r\n", resp,
                      sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 401 ", 13) == 0);
  CHECK_STR(http_body(resp), "failed authentication");
  CHECK(http_exchange("GET /connect HTTP/1.1\r\nHost: x\r\nX-Tunnel-ID: a\r\n\r\n", resp,
                      sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 400 ", 13) == 0);
  CHECK(http_exchange("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 200 ", 13) == 0);
  CHECK(strstr(resp, "\nsession_server_total_add_websocket_session{clientkey=\"agent-1\","
                     "peer=\"false\"} 1\n") != NULL);
  CHECK(http_exchange("\x16\x03\x01 not http\r\n\r\n", resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 400 ", 13) == 0);
  /* A head past the 16 KiB limit. */
  static char big[20000];
  int n = snprintf(big, sizeof big, "GET /metrics HTTP/1.1\r\nX-Pad: ");
  memset(big + n, 'a', sizeof big - (size_t)n - 5);
  memcpy(big + sizeof big - 5, "\r\n\r\n", 5);
  CHECK(http_exchange(big, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 431 ", 13) == 0);
  /* A client that leaves mid-head: the server lets go of it. */
  int64_t handles = loop_handles();
  int fd = tcp_connect(g_port);
  CHECK(fd >= 0);
  if (fd >= 0) {
    CHECK_EQ_INT(write_all(fd, "GET /conn", 9, WAIT_MS), 0);
    CHECK(wait_loop_handles(handles + 2)); /* its socket and head timer */
    close(fd);
  }
  CHECK(wait_loop_handles(handles));
  /* None of these became a session. */
  char keys[256];
  server_clients(g_srv, keys, sizeof keys);
  CHECK_STR(keys, "agent-1");
}

TEST(test_bad_arguments) {
  start_echo();
  CHECK(start_server_and_agent());
  int64_t heap = heap_in_use();
  char err[256] = "", want[256];
  rd_client_config ccfg;
  client_config(&ccfg);
  uint64_t h = 7;
  CHECK_EQ_INT(rd_api_client_new("http://127.0.0.1:1/connect", "", &ccfg, &h, err, sizeof err),
               RD_EMALFORMED);
  CHECK(strncmp(err, "unsupported URL scheme", 22) == 0 &&
        strstr(err, ": http://127.0.0.1:1/connect") != NULL);
  /* The server's port is taken. */
  rd_server_config scfg;
  rd_server_config_default(&scfg);
  int port = 0;
  int rc = rd_api_server_new("127.0.0.1", g_port, &scfg, &h, &port, err, sizeof err);
  CHECK_EQ_INT(rc, UV_EADDRINUSE);
  snprintf(want, sizeof want, "listen tcp 127.0.0.1:%d: ", g_port);
  CHECK(strncmp(err, want, strlen(want)) == 0 && strstr(err, "address already in use") != NULL);
  rc = rd_api_server_forward(g_srv, "agent-1", "tcp", g_echo_addr, "127.0.0.1", g_port, &h, &port,
                             err, sizeof err);
  CHECK_EQ_INT(rc, UV_EADDRINUSE);
  CHECK(strncmp(err, want, strlen(want)) == 0);
  /* Handles that name nothing, or an object of another kind. */
  tconn x;
  CHECK_EQ_INT(rd_api_server_dial(999999, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 0, &x.fd, &x.id, &x.st,
                                  err, sizeof err),
               RD_ECLOSED);
  rd_sample_list l;
  CHECK_EQ_INT(rd_api_metrics(999999, &l), RD_ECLOSED);
  int connected = 1;
  CHECK_EQ_INT(rd_api_client_wait_connected(g_srv, 10, &connected), RD_ECLOSED);
  CHECK_EQ_INT(rd_api_close(999999), RD_OK);
  /* The failed starts gave back what they took. */
  CHECK(wait_heap(heap));
}

/* ---- two sessions for one key ---- */

TEST(test_shared_key) {
  start_echo();
  CHECK(start_server_and_agent());
  uint64_t cli3 = 0;
  CHECK_EQ_INT(start_client("agent-1", &cli3), RD_OK);
  CHECK(wait_connected(cli3));
  /* The key is listed once; dials use the oldest session. */
  CHECK(wait_clients(g_srv, "agent-1"));
  double before = conns_added(g_cli, "client", g_echo_addr);
  echo_through(g_srv, "agent-1", "oldest session");
  CHECK_EQ_INT(conns_added(g_cli, "client", g_echo_addr), before + 1);
  CHECK_EQ_INT(conns_added(cli3, "client", g_echo_addr), 0);
  CHECK_EQ_INT(rd_api_close(cli3), RD_OK);
  /* The first session still serves the key. */
  uint64_t deadline = now_ms() + WAIT_MS;
  while (sessions_removed(g_srv, "agent-1") != 1 && now_ms() < deadline)
    nap();
  CHECK_EQ_INT(sessions_removed(g_srv, "agent-1"), 1);
  int has = 0;
  CHECK_EQ_INT(rd_api_server_has_session(g_srv, "agent-1", &has), RD_OK);
  CHECK_EQ_INT(has, 1);
  echo_through(g_srv, "agent-1", "still served");
  check_settled();
}

/* ---- connection limits on either side ---- */

TEST(test_connection_limits) {
  start_echo();
  start_http();
  rd_server_config scfg;
  rd_server_config_default(&scfg);
  scfg.session.max_connections = 2;
  /* A cap below the PAUSE mark: a reader that stops hits the cap first. */
  scfg.session.max_buffer = 1 << 20;
  scfg.session.hard_cap = 256 << 10;
  uint64_t srv2 = 0, cli4 = 0, cli5 = 0;
  char err[256] = "", url[64];
  CHECK_EQ_INT(start_own_server(&scfg, &srv2, url, sizeof url), RD_OK);
  rd_client_config ccfg;
  client_config(&ccfg);
  CHECK_EQ_INT(start_client_at(url, "agent-4", &ccfg, &cli4), RD_OK);
  ccfg.session.max_connections = 1;
  CHECK_EQ_INT(start_client_at(url, "agent-5", &ccfg, &cli5), RD_OK);
  CHECK(wait_connected(cli4));
  CHECK(wait_connected(cli5));
  /* The server's limit: the third dial fails at once. */
  tconn c[3];
  for (int i = 0; i < 2; i++) {
    CHECK_EQ_INT(dial(srv2, "agent-4", g_echo_addr, &c[i]), RD_OK);
    if (c[i].fd >= 0)
      CHECK(echo_once(c[i].fd, "within the limit"));
  }
  int rc = rd_api_server_dial(srv2, "agent-4", "tcp", g_echo_addr, DIAL_WAIT_MS, 0, &c[2].fd, &c[2].id, &c[2].st,
                              err, sizeof err);
  CHECK_EQ_INT(rc, RD_ETOOMANY);
  CHECK_STR(err, "dial through session failed: too many connections");
  CHECK_EQ_INT(c[2].fd, -1);
  CHECK(c[2].st == NULL);
  /* Room again once one has ended. */
  tconn_close(&c[0]);
  uint64_t deadline = now_ms() + WAIT_MS;
  while (sample_value(srv2, "remotedialer_open_connections", "agent-4", NULL, NULL) != 1 &&
         now_ms() < deadline)
    nap();
  if (dial(srv2, "agent-4", g_echo_addr, &c[0]) == RD_OK)
    CHECK(echo_once(c[0].fd, "room again"));
  tconn_close(&c[0]);
  tconn_close(&c[1]);
  /* The agent's limit: its second CONNECT is answered with an error. */
  if (dial(srv2, "agent-5", g_echo_addr, &c[0]) == RD_OK)
    CHECK(echo_once(c[0].fd, "agent-5"));
  if (dial(srv2, "agent-5", g_echo_addr, &c[1]) == RD_OK) {
    check_conn_ends(&c[1], "too many connections");
  }
  tconn_close(&c[0]);
  tconn_close(&c[1]);
  /* The buffer cap: a 4 MiB answer we do not read ends the connection. */
  char req[128];
  if (dial(srv2, "agent-4", g_http_addr, &c[0]) == RD_OK) {
    snprintf(req, sizeof req, "GET /big/%u HTTP/1.1\r\n\r\n", 4u << 20);
    CHECK_EQ_INT(write_all(c[0].fd, req, strlen(req), WAIT_MS), 0);
    CHECK(wait_status_ended(c[0].st));
    CHECK_STR(c[0].st->error, "buffer limit exceeded");
    static char sink[8 << 20];
    int e = 0;
    CHECK(read_to_eof(c[0].fd, sink, sizeof sink, WAIT_MS, &e) >= 0);
    tconn_close(&c[0]);
  }
  CHECK(wait_balanced(srv2, "limited server"));
  CHECK(wait_balanced(cli4, "agent-4"));
  CHECK(wait_balanced(cli5, "agent-5"));
  CHECK(wait_no_open_conns());
  CHECK_EQ_INT(rd_api_close(cli4), RD_OK);
  CHECK_EQ_INT(rd_api_close(cli5), RD_OK);
  CHECK_EQ_INT(rd_api_close(srv2), RD_OK);
}

/* ---- the server's read deadline ---- */

TEST(test_read_deadline) {
  start_echo();
  rd_server_config scfg;
  rd_server_config_default(&scfg);
  /* The chatty client pings every 50 ms from the same loop thread: a loaded
   * machine that keeps the loop off the CPU must not pass for its silence. */
  scfg.session.read_timeout_ms = 1000;
  uint64_t srv3 = 0, chatty = 0, silent = 0;
  char url[64];
  CHECK_EQ_INT(start_own_server(&scfg, &srv3, url, sizeof url), RD_OK);
  rd_client_config ccfg;
  client_config(&ccfg);
  CHECK_EQ_INT(start_client_at(url, "chatty", &ccfg, &chatty), RD_OK);
  /* No pings or syncs: nothing reaches the server between dials. */
  ccfg.session.ping_interval_ms = 0;
  ccfg.session.sync_interval_ms = 0;
  CHECK_EQ_INT(start_client_at(url, "silent", &ccfg, &silent), RD_OK);
  CHECK(wait_connected(chatty));
  CHECK(wait_connected(silent));
  tconn c;
  CHECK_EQ_INT(dial(srv3, "silent", g_echo_addr, &c), RD_OK);
  if (c.fd >= 0) {
    CHECK(echo_once(c.fd, "soon cut off"));
    /* Silence past the deadline ends the session and its connection. */
    check_conn_ends(&c, "tunnel disconnect");
  }
  CHECK_EQ_INT(sessions_removed(srv3, "silent") >= 1, 1);
  /* Pings kept the other one alive all along. */
  CHECK_EQ_INT(sessions_removed(srv3, "chatty"), 0);
  CHECK(wait_balanced(srv3, "deadline server"));
  CHECK(wait_balanced(silent, "silent client"));
  CHECK_EQ_INT(rd_api_close(silent), RD_OK);
  CHECK_EQ_INT(rd_api_close(chatty), RD_OK);
  CHECK_EQ_INT(rd_api_close(srv3), RD_OK);
  CHECK(wait_no_open_conns());
}

/* ---- the server closes; the agent finds a new one on the same port ---- */

TEST(test_server_restart) {
  start_echo();
  start_hole();
  CHECK(start_server_and_agent());
  open_set o;
  open_set_dial(&o, g_srv, "agent-1");
  CHECK(wait_open_conns(10));
  /* A request head still arriving when the server closes. */
  int half = tcp_connect(g_port);
  CHECK(half >= 0);
  CHECK_EQ_INT(write_all(half, "GET /conn", 9, WAIT_MS), 0);
  CHECK_EQ_INT(rd_api_close(g_srv), RD_OK);
  uint64_t old = g_srv;
  g_srv = 0;
  open_set_check_ended(&o);
  if (half >= 0) {
    char buf[256];
    int e = 0;
    CHECK(read_to_eof(half, buf, sizeof buf, WAIT_MS, &e) >= 0);
    close(half);
  }
  /* The closed server's handle is dead; closing again is harmless. */
  tconn x;
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_dial(old, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 0, &x.fd, &x.id, &x.st,
                                  err, sizeof err),
               RD_ECLOSED);
  CHECK_EQ_INT(rd_api_close(old), RD_OK);
  /* The agent notices, ends its side of the connections, and retries. */
  int connected = 1;
  char last[160] = "";
  uint64_t deadline = now_ms() + WAIT_MS;
  while (rd_api_client_state(g_cli, &connected, last, sizeof last) == RD_OK && connected &&
         now_ms() < deadline)
    nap();
  CHECK_EQ_INT(connected, 0);
  CHECK(last[0] != '\0');
  CHECK(wait_no_open_conns());
  CHECK(wait_balanced(g_cli, "client"));
  /* Nobody listens: a short wait times out. */
  CHECK_EQ_INT(rd_api_client_wait_connected(g_cli, 100, &connected), RD_OK);
  CHECK_EQ_INT(connected, 0);
  int port = 0;
  CHECK_EQ_INT(start_server_timeout(g_port, &g_srv, &port, 300), RD_OK);
  CHECK_EQ_INT(port, g_port);
  CHECK(wait_connected(g_cli));
  CHECK(wait_clients(g_srv, "agent-1"));
  CHECK_EQ_INT(sessions_added(g_cli, "client"), 2);
  CHECK_EQ_INT(sessions_removed(g_cli, "client"), 1);
  echo_through(g_srv, "agent-1", "after restart");
  /* This server gives a request head 300 ms. */
  half = tcp_connect(g_port);
  CHECK(half >= 0);
  if (half >= 0) {
    char buf[256];
    int e = 0;
    CHECK_EQ_INT(write_all(half, "GET /conn", 9, WAIT_MS), 0);
    CHECK(read_to_eof(half, buf, sizeof buf, WAIT_MS, &e) > 0);
    CHECK(strncmp(buf, "HTTP/1.1 408 ", 13) == 0);
    CHECK_STR(http_body(buf), "request head timeout\n");
    close(half);
  }
  CHECK(wait_balanced(g_srv, "new server"));
  CHECK(wait_balanced(g_cli, "client"));
  CHECK(wait_no_open_conns());
}

/* ---- shutdown with everything open ---- */

/* A server, an agent, a forward, a connection with bytes in flight, a
 * local dial in progress, a client that cannot connect and a thread waiting
 * for it, all left for rd_engine_shutdown to end; LeakSanitizer runs when
 * the case's process exits. */
TEST(test_shutdown_with_open_objects) {
  tserver echo;
  CHECK_EQ_INT(ts_start(&echo, TS_ECHO), 0);
  char addr[32];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", echo.port);
  CHECK(start_server_and_agent());
  uint64_t fwd = 0;
  int fport = 0;
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "agent-1", "tcp", addr, "127.0.0.1", 0, &fwd,
                                     &fport, err, sizeof err),
               RD_OK);
  tconn c = {-1, 0, NULL};
  if (dial(g_srv, "agent-1", addr, &c) == RD_OK) {
    CHECK(echo_once(c.fd, "before shutdown"));
    /* Bytes still travelling when the engine stops. */
    static char big[256 * 1024];
    CHECK_EQ_INT(write_all(c.fd, big, sizeof big, WAIT_MS), 0);
  }
  /* A local dial the agent cannot finish. */
  black_hole hole;
  CHECK_EQ_INT(black_hole_open(&hole), 0);
  char hole_addr[32];
  snprintf(hole_addr, sizeof hole_addr, "127.0.0.1:%d", hole.port);
  tconn p = {-1, 0, NULL};
  CHECK_EQ_INT(dial(g_srv, "agent-1", hole_addr, &p), RD_OK);
  /* A client that never connects: its retry timer is pending. */
  uint64_t lost = 0;
  rd_client_config cfg;
  client_config(&cfg);
  CHECK_EQ_INT(rd_api_client_new("ws://127.0.0.1:1/connect", "X-Tunnel-ID: lost\r\n", &cfg, &lost,
                                 err, sizeof err),
               RD_OK);
  /* Someone waits for it to connect: the shutdown must release them. Give
   * the waiter's timer time to appear on the loop (if it does not, the
   * waiter meets a stopped engine instead, which must release it too). */
  int64_t handles0 = loop_handles();
  waiter_job wj;
  waiter_start(&wj, lost);
  uint64_t deadline = now_ms() + 500;
  while (loop_handles() <= handles0 && now_ms() < deadline)
    nap();
  rd_engine_shutdown();
  waiter_check_released(&wj);
  check_engine_empty();
  if (c.fd >= 0) {
    char buf[4096];
    int e;
    /* The engine's end is gone: the read ends (EOF or reset), never hangs. */
    CHECK(read_to_eof(c.fd, buf, sizeof buf, WAIT_MS, &e) >= 0);
  }
  /* The status outlives the engine: it is the caller's reference. */
  if (c.st != NULL)
    CHECK(atomic_load(&c.st->ended));
  tconn_close(&c);
  tconn_close(&p);
  black_hole_close(&hole);
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  CHECK_EQ_INT(rd_alloc_objects(), 0);
  ts_stop(&echo);
}

/* ---- SIGPIPE left at its default ---- */

/* An application that restores SIGPIPE's default (a common idiom for
 * command-line tools) must survive a peer that goes away while the engine
 * still has bytes for it: the loop thread's write must fail with EPIPE and
 * end that connection, not kill the process. The engine notices a closed
 * local end by reading it, first, unless it has stopped reading: so stop it
 * (a target that takes nothing makes the agent PAUSE us), leave bytes queued
 * toward us (the target's answer, unread), then close. */
TEST(test_sigpipe_default) {
  signal(SIGPIPE, SIG_DFL); /* this case's process only */
  tserver http;
  CHECK_EQ_INT(ts_start(&http, TS_HTTP), 0);
  char addr[32], req[128];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", http.port);
  tconn c;
  if (start_server_and_agent() && dial(g_srv, "agent-1", addr, &c) == RD_OK) {
    /* The target answers 16 MiB and reads nothing after the head. */
    snprintf(req, sizeof req, "GET /big/%u HTTP/1.1\r\n\r\n", 16u << 20);
    CHECK_EQ_INT(write_all(c.fd, req, strlen(req), WAIT_MS), 0);
    /* Push until the engine stops taking our bytes for 300 ms. */
    static char junk[64 * 1024];
    uint64_t deadline = now_ms() + 2 * WAIT_MS, changed = now_ms();
    size_t pushed = 0;
    int stalled = 0;
    while (!stalled && now_ms() < deadline && pushed < (256u << 20)) {
      if (wait_fd(c.fd, POLLOUT, now_ms() + 50)) {
        ssize_t n = send(c.fd, junk, sizeof junk, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
          pushed += (size_t)n;
          changed = now_ms();
        }
      }
      stalled = now_ms() - changed >= 300;
    }
    CHECK(stalled);
    close(c.fd);
    c.fd = -1;
    CHECK(wait_status_ended(c.st));
    tconn_close(&c);
    CHECK(wait_balanced(g_srv, "server"));
    CHECK(wait_balanced(g_cli, "client"));
  }
  rd_engine_shutdown();
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  ts_stop(&http);
}

/* ---- calls posted without waiting ---- */

/* Waits until efd has counted n completions in all. */
static int wait_signals(int efd, uint64_t n) {
  uint64_t seen = 0, deadline = now_ms() + WAIT_MS, v;
  while (seen < n && now_ms() < deadline) {
    struct pollfd p = {efd, POLLIN, 0};
    if (poll(&p, 1, 50) == 1 && read(efd, &v, sizeof v) == (ssize_t)sizeof v)
      seen += v;
  }
  return seen == n;
}

TEST(test_posted_ops) {
  start_echo();
  CHECK(start_server_and_agent());
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  CHECK(efd >= 0);
  rd_api_op *ops[6] = {
      rd_api_op_dial(g_srv, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 0),
      rd_api_op_dial(g_srv, "nobody", "tcp", g_echo_addr, DIAL_WAIT_MS, 0),
      rd_api_op_dial(999999, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 0),
      rd_api_op_wait_connected(g_cli, WAIT_MS),
      rd_api_op_dial(g_srv, "agent-1", "tcp", g_echo_addr, DIAL_WAIT_MS, 0), /* never taken */
      rd_api_op_close(999999),
  };
  for (int i = 0; i < 6; i++) {
    CHECK(ops[i] != NULL);
    CHECK_EQ_INT(rd_api_op_post(ops[i], efd), 1);
  }
  CHECK(wait_signals(efd, 6));
  char err[256];
  for (int i = 0; i < 6; i++)
    CHECK(rd_api_op_done(ops[i]));
  CHECK_EQ_INT(rd_api_op_status(ops[0], err, sizeof err), RD_OK);
  int fd = -1;
  int64_t id = 0;
  rd_dial_status *st = NULL;
  rd_api_op_take_dial(ops[0], &fd, &id, &st);
  CHECK(fd >= 0 && id > 0 && st != NULL);
  char buf[4] = "";
  CHECK_EQ_INT(write_all(fd, "ping", 4, WAIT_MS), 0);
  CHECK(read_n(fd, buf, 4, WAIT_MS) == 4 && memcmp(buf, "ping", 4) == 0);
  close(fd);
  rd_dial_status_unref(st);
  CHECK_EQ_INT(rd_api_op_status(ops[1], err, sizeof err), RD_ENOSESSION);
  CHECK_STR(err, "failed to find Session for client nobody");
  CHECK_EQ_INT(rd_api_op_status(ops[2], err, sizeof err), RD_ECLOSED);
  CHECK_EQ_INT(rd_api_op_status(ops[3], err, sizeof err), RD_OK);
  CHECK(rd_api_op_connected(ops[3]));
  CHECK_EQ_INT(rd_api_op_status(ops[4], err, sizeof err), RD_OK);
  CHECK_EQ_INT(rd_api_op_status(ops[5], err, sizeof err), RD_OK);
  for (int i = 0; i < 6; i++)
    rd_api_op_free(ops[i]); /* closes the untaken socket: its connection ends */
  CHECK(wait_balanced(g_srv, "server"));
  CHECK(wait_balanced(g_cli, "client"));
  /* After shutdown a post completes at once, unqueued. */
  rd_api_op *late = rd_api_op_close(g_srv);
  rd_engine_shutdown();
  CHECK_EQ_INT(rd_api_op_post(late, efd), 0);
  CHECK(rd_api_op_done(late));
  CHECK_EQ_INT(rd_api_op_status(late, err, sizeof err), RD_ECLOSED);
  rd_api_op_free(late);
  close(efd);
}

/* ---- close everything, shut down, nothing left ---- */

TEST(test_shutdown_frees_everything) {
  start_echo();
  CHECK(start_server_and_agent());
  echo_through(g_srv, "agent-1", "before closing");
  check_settled();
  CHECK_EQ_INT(rd_api_close(g_cli), RD_OK);
  CHECK_EQ_INT(rd_api_close(g_srv), RD_OK);
  g_cli = g_srv = 0;
  /* Everything closed: only the engine's own handles are left, its wake-up
   * and the idle handle that runs deferred work. */
  rd_stats st;
  memset(&st, 0, sizeof st);
  uint64_t deadline = now_ms() + WAIT_MS;
  while (rd_api_stats(&st) == RD_OK && st.loop_handles != 2 && now_ms() < deadline)
    nap();
  CHECK_EQ_INT(st.loop_handles, 2);
  rd_engine_shutdown();
  check_engine_empty();
  /* The engine stays down. */
  uint64_t h = 0;
  int port = 0;
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_new("127.0.0.1", 0, &cfg, &h, &port, err, sizeof err), RD_ECLOSED);
  rd_engine_shutdown();
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
}

RD_ENGINE_TEST_MAIN(T(test_connect), T(test_http_routes), T(test_bad_arguments),
                    T(test_shared_key), T(test_connection_limits), T(test_read_deadline),
                    T(test_server_restart), T(test_shutdown_with_open_objects),
                    T(test_sigpipe_default), T(test_posted_ops),
                    T(test_shutdown_frees_everything))
