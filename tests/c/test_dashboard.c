/* The dashboard's routes through the engine (rd_server_dashboard.c), under
 * the sanitizers: the probes, /debug/state's query (decoding, bad values),
 * HTTP Basic, the page and its redirect, and the close action ending one
 * dialed connection. Each case runs in a process of its own with a fresh
 * engine (rd_test_engine.h). */
#define _GNU_SOURCE
#include "rd_test_engine.h"

#define PAGE "<!DOCTYPE html><title>test page</title>"
/* admin:pw in base64 */
#define AUTH "Authorization: Basic YWRtaW46cHc=\r\n"

static ssize_t request(const char *method, const char *target, const char *headers, char *resp,
                       size_t cap) {
  char req[1024];
  snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: x\r\n%s\r\n", method, target, headers);
  return http_exchange(req, resp, cap);
}

static int status_is(const char *resp, int status) {
  char want[16];
  snprintf(want, sizeof want, "HTTP/1.1 %d ", status);
  int ok = strncmp(resp, want, strlen(want)) == 0;
  if (!ok)
    fprintf(stderr, "  wanted %d, got: %.200s\n", status, resp);
  return ok;
}

static int start_dashboard(void) {
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  cfg.dashboard = 1;
  snprintf(cfg.dashboard_user, sizeof cfg.dashboard_user, "admin");
  snprintf(cfg.dashboard_password, sizeof cfg.dashboard_password, "pw");
  cfg.dashboard_html = PAGE;
  cfg.dashboard_html_len = strlen(PAGE);
  CHECK_EQ_INT(start_own_server(&cfg, &g_srv, g_url, sizeof g_url), RD_OK);
  sscanf(g_url, "ws://127.0.0.1:%d/", &g_port);
  CHECK_EQ_INT(start_client("agent-1", &g_cli), RD_OK);
  return wait_connected(g_cli);
}

TEST(test_routes_and_auth) {
  CHECK(start_dashboard());
  static char resp[65536];
  CHECK(request("GET", "/healthz", "", resp, sizeof resp) > 0);
  CHECK(status_is(resp, 200));
  CHECK_STR(http_body(resp), "ok\n");
  CHECK(request("GET", "/readyz", "", resp, sizeof resp) > 0);
  CHECK(status_is(resp, 200));
  CHECK(request("GET", "/debug/state", "", resp, sizeof resp) > 0);
  CHECK(status_is(resp, 401));
  CHECK(strstr(resp, "\r\nWWW-Authenticate: Basic realm=\"remotedialer\"\r\n") != NULL);
  CHECK(request("GET", "/ui/", "Authorization: Basic YWRtaW46cHg=\r\n", resp, sizeof resp) > 0);
  CHECK(status_is(resp, 401));
  CHECK(request("GET", "/ui/", AUTH, resp, sizeof resp) > 0);
  CHECK(status_is(resp, 200));
  CHECK_STR(http_body(resp), PAGE);
  CHECK(request("GET", "/ui", "", resp, sizeof resp) > 0);
  CHECK(status_is(resp, 301));
  CHECK(strstr(resp, "\r\nLocation: /ui/\r\n") != NULL);
  /* The query: decoded, checked. */
  CHECK(request("GET", "/debug/state?filter=agent%2D1&limit=1", AUTH, resp, sizeof resp) > 0);
  CHECK(status_is(resp, 200));
  CHECK(strstr(resp, "\"filter\": \"agent-1\"") != NULL);
  CHECK(strstr(resp, "\"limit\": 1,") != NULL);
  const char *bad[] = {"?filter=%zz", "?filter=%4", "?filter=%00", "?limit=x", "?limit=-1",
                       "?offset=1e3", "?sort=name", "?order=sideways"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    char target[64];
    snprintf(target, sizeof target, "/debug/state%s", bad[i]);
    CHECK(request("GET", target, AUTH, resp, sizeof resp) > 0);
    CHECK(status_is(resp, 400));
    CHECK(strstr(http_body(resp), "{\"error\": ") == http_body(resp));
  }
  CHECK(request("GET", "/debug/state?limit=99999&offset=0&sort=bytes&order=asc", AUTH, resp,
                sizeof resp) > 0);
  CHECK(strstr(resp, "\"limit\": 1000,") != NULL);
  /* Actions: the credential, then POST. */
  CHECK(request("POST", "/debug/disconnect?key=agent-1", "", resp, sizeof resp) > 0);
  CHECK(status_is(resp, 401));
  CHECK(request("GET", "/debug/disconnect?key=agent-1", AUTH, resp, sizeof resp) > 0);
  CHECK(status_is(resp, 405));
  CHECK(request("POST", "/debug/disconnect?key=nobody", AUTH, resp, sizeof resp) > 0);
  CHECK(status_is(resp, 404));
}

TEST(test_close_one_connection) {
  start_echo();
  CHECK(start_dashboard());
  tconn a, b;
  CHECK_EQ_INT(dial(g_srv, "agent-1", g_echo_addr, &a), RD_OK);
  CHECK_EQ_INT(dial(g_srv, "agent-1", g_echo_addr, &b), RD_OK);
  CHECK(echo_once(a.fd, "a"));
  CHECK(echo_once(b.fd, "b"));
  static char resp[65536];
  CHECK(request("GET", "/debug/state?sort=key", AUTH, resp, sizeof resp) > 0);
  CHECK(strstr(resp, "\"connections\": 2,") != NULL);
  const char *sk = strstr(resp, "\"session_key\": \"");
  CHECK(sk != NULL);
  if (sk == NULL)
    return;
  long long session = strtoll(sk + 16, NULL, 10);
  char target[128];
  snprintf(target, sizeof target, "/debug/close?session=%lld&id=%lld", session, (long long)a.id);
  CHECK(request("POST", target, AUTH, resp, sizeof resp) > 0);
  CHECK(status_is(resp, 200));
  CHECK(reads_eof(a.fd));
  CHECK(echo_once(b.fd, "still open"));
  CHECK(request("POST", target, AUTH, resp, sizeof resp) > 0);
  CHECK(status_is(resp, 404));
  snprintf(target, sizeof target, "/debug/close?session=%lld&id=x", session);
  CHECK(request("POST", target, AUTH, resp, sizeof resp) > 0);
  CHECK(status_is(resp, 400));
  tconn_close(&a);
  tconn_close(&b);
}

RD_ENGINE_TEST_MAIN(T(test_routes_and_auth), T(test_close_one_connection))
