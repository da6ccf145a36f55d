/* End-to-end tests of the two ways the server carries a local client's
 * bytes into an agent's network through the engine's API (rd_api.h): the
 * /client/KEY/SCHEME/HOST/PATH proxy route on the server's own port, and a
 * port forward. Each case runs in a process of its own with a fresh engine
 * (rd_test_engine.h). */
#define _GNU_SOURCE
#include "rd_test_engine.h"

/* ---- the /client/... proxy route ---- */

TEST(test_proxy_route) {
  start_http();
  CHECK(start_server_and_agent());
  char req[512], resp[4096] = "";
  snprintf(req, sizeof req,
           "GET /client/agent-1/http/127.0.0.1:%d/hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
           "User-Agent: test-engine\r\nConnection: close\r\n\r\n",
           g_http.port, g_port);
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) == 0);
  CHECK_STR(http_body(resp), "hello from /hello?x=1");
  pthread_mutex_lock(&g_http.lock);
  char head[TS_HEAD];
  snprintf(head, sizeof head, "%s", g_http.last_head);
  pthread_mutex_unlock(&g_http.lock);
  CHECK(strncmp(head, "GET /hello?x=1 HTTP/1.1\r\n", 25) == 0);
  CHECK(strstr(head, "\r\nUser-Agent: test-engine") != NULL);
  /* The route keeps its tunneled connections: the client's "Connection:
   * close" is this hop's, not sent on. */
  CHECK(strstr(head, "\r\nConnection:") == NULL);

  /* A body, part of it sent after the head. */
  int fd = tcp_connect(g_port);
  CHECK(fd >= 0);
  if (fd >= 0) {
    snprintf(req, sizeof req,
             "POST /client/agent-1/http/127.0.0.1:%d/submit HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 11\r\nConnection: close\r\n\r\nhello",
             g_http.port);
    CHECK_EQ_INT(write_all(fd, req, strlen(req), WAIT_MS), 0);
    CHECK_EQ_INT(write_all(fd, " world", 6, WAIT_MS), 0);
    int e = 0;
    CHECK(read_to_eof(fd, resp, sizeof resp, WAIT_MS, &e) > 0);
    CHECK_EQ_INT(e, 0);
    CHECK(strncmp(resp, "HTTP/1.1 200 OK\r\n", 17) == 0);
    CHECK_STR(http_body(resp), "hello from /submit body=hello world");
    close(fd);
  }

  /* No path after the host: the backend is asked for "/". */
  snprintf(req, sizeof req, "GET /client/agent-1/http/127.0.0.1:%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
           g_http.port);
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK_STR(http_body(resp), "hello from /");
  /* Too few segments. */
  CHECK(http_exchange("GET /client/agent-1/http HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", resp,
                      sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 404 ", 13) == 0);

  snprintf(req, sizeof req, "GET /client/agent-1/http/127.0.0.1:1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 500 ", 13) == 0);
  CHECK_STR(http_body(resp), "dial tcp 127.0.0.1:1: connect: connection refused");

  snprintf(req, sizeof req, "GET /client/nope/http/127.0.0.1:1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  CHECK(http_exchange(req, resp, sizeof resp) > 0);
  CHECK(strncmp(resp, "HTTP/1.1 500 ", 13) == 0);
  CHECK_STR(http_body(resp), "failed to find Session for client nope");

  check_settled();
  /* The refused dial above counts as a connection added to the agent's key
   * (the unknown key's request never reaches a session). */
  CHECK_EQ_INT(conns_added(g_srv, "agent-1", "127.0.0.1:1"), 1);
}

/* ---- port forward ---- */

/* Connects to port and checks that the connection ends with no data;
 * returns the errno of the ending read (0 for a clean EOF). */
static int connect_expect_no_data(int port) {
  int fd = tcp_connect(port);
  CHECK(fd >= 0);
  if (fd < 0)
    return 0;
  char buf[64];
  int e = 0;
  CHECK_EQ_INT(read_to_eof(fd, buf, sizeof buf, WAIT_MS, &e), 0);
  close(fd);
  return e;
}

TEST(test_forward) {
  start_echo();
  CHECK(start_server_and_agent());
  uint64_t fwd = 0;
  int fport = 0;
  char err[256] = "";
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "agent-1", "tcp", g_echo_addr, "127.0.0.1", 0, &fwd,
                                     &fport, err, sizeof err),
               RD_OK);
  CHECK(fport > 0);
  for (int round = 0; round < 2; round++) {
    int fd = tcp_connect(fport);
    CHECK(fd >= 0);
    if (fd < 0)
      break;
    CHECK(echo_once(fd, "through the forward"));
    CHECK(echo_once(fd, "twice"));
    close(fd);
  }
  check_settled();
  CHECK_EQ_INT(rd_api_close(fwd), RD_OK);
  /* The forward's port is closed with it. */
  int fd = tcp_connect(fport);
  CHECK(fd < 0);
  if (fd >= 0)
    close(fd);
  /* A forward whose target refuses: each accepted connection just ends. */
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "agent-1", "tcp", "127.0.0.1:1", "127.0.0.1", 0, &fwd,
                                     &fport, err, sizeof err),
               RD_OK);
  int e = connect_expect_no_data(fport);
  CHECK(e == 0 || e == ECONNRESET);
  /* A forward for an agent that is not there: the same. */
  uint64_t fwd2 = 0;
  int fport2 = 0;
  CHECK_EQ_INT(rd_api_server_forward(g_srv, "nope", "tcp", g_echo_addr, "127.0.0.1", 0, &fwd2,
                                     &fport2, err, sizeof err),
               RD_OK);
  connect_expect_no_data(fport2);
  check_settled();
  CHECK_EQ_INT(rd_api_close(fwd), RD_OK);
  CHECK_EQ_INT(rd_api_close(fwd2), RD_OK);
}

RD_ENGINE_TEST_MAIN(T(test_proxy_route), T(test_forward))
