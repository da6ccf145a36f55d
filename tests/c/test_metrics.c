/* Metrics registry and exposition: names, ordering, escaping and numbers must
 * match what the Go client library prints. */
#include <float.h>
#include <math.h>

#include "rd_alloc.h"
#include "rd_metrics.h"
#include "rd_test.h"

/* What a Go server printed after one good request and one refused dial
 * through agent foo (PROTOCOL.md section 7). */
static const char go_example[] =
    "# HELP session_server_total_add_connections Total count of added connections\n"
    "# TYPE session_server_total_add_connections counter\n"
    "session_server_total_add_connections{addr=\"127.0.0.1:1\",clientkey=\"foo\",proto=\"tcp\"} 1\n"
    "session_server_total_add_connections{addr=\"127.0.0.1:8125\",clientkey=\"foo\",proto=\"tcp\"} "
    "1\n"
    "# HELP session_server_total_remove_connections Total count of removed connections\n"
    "# TYPE session_server_total_remove_connections counter\n"
    "session_server_total_remove_connections{addr=\"127.0.0.1:1\",clientkey=\"foo\",proto=\"tcp\"} "
    "1\n";

static int add_example(rd_metrics *m) {
  /* The good request is counted first, so insertion order differs from the
   * printed order. */
  const char *good[] = {"foo", "tcp", "127.0.0.1:8125"};
  const char *bad[] = {"foo", "tcp", "127.0.0.1:1"};
  int r = 0;
  r |= rd_metrics_add(m, RD_M_ADD_CONNECTIONS, good, 1);
  r |= rd_metrics_add(m, RD_M_ADD_CONNECTIONS, bad, 1);
  r |= rd_metrics_add(m, RD_M_REMOVE_CONNECTIONS, bad, 1);
  return r;
}

TEST(go_example_exposition) {
  int64_t start = rd_alloc_bytes();
  rd_metrics *m = rd_metrics_new();
  CHECK(m != NULL);
  CHECK_EQ_INT(add_example(m), RD_OK);
  size_t len = 0;
  char *text = rd_metrics_render(m, &len);
  CHECK_STR(text, go_example);
  CHECK_EQ_INT(len, strlen(go_example));
  rd_free(text);
  rd_metrics_free(m);
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

TEST(family_table) {
  static const struct {
    int f;
    const char *name, *help;
    int gauge;
    size_t n;
    const char *labels[3];
  } want[] = {
      {RD_M_ADD_WS_SESSION, "session_server_total_add_websocket_session",
       "Total count of added websocket sessions", 0, 2, {"clientkey", "peer"}},
      {RD_M_REMOVE_WS_SESSION, "session_server_total_remove_websocket_session",
       "Total count of removed websocket sessions", 0, 2, {"clientkey", "peer"}},
      {RD_M_ADD_CONNECTIONS, "session_server_total_add_connections",
       "Total count of added connections", 0, 3, {"clientkey", "proto", "addr"}},
      {RD_M_REMOVE_CONNECTIONS, "session_server_total_remove_connections",
       "Total count of removed connections", 0, 3, {"clientkey", "proto", "addr"}},
      {RD_M_TRANSMIT_BYTES, "session_server_total_transmit_bytes", "Total bytes transmitted", 0,
       1, {"clientkey"}},
      {RD_M_TRANSMIT_ERR_BYTES, "session_server_total_transmit_error_bytes",
       "Total error bytes transmitted", 0, 1, {"clientkey"}},
      {RD_M_RECEIVE_BYTES, "session_server_total_receive_bytes", "Total bytes received", 0, 1,
       {"clientkey"}},
      {RD_M_PEER_WS_ATTEMPT, "session_server_total_peer_ws_attempt",
       "Total count of attempts to establish websocket session to other rancher-server", 0, 1,
       {"peer"}},
      {RD_M_PEER_WS_CONNECTED, "session_server_total_peer_ws_connected",
       "Total count of connected websocket sessions to other rancher-server", 0, 1, {"peer"}},
      {RD_M_PEER_WS_DISCONNECTED, "session_server_total_peer_ws_disconnected",
       "Total count of disconnected websocket sessions from other rancher-server", 0, 1,
       {"peer"}},
      {RD_M_OPEN_SESSIONS, "remotedialer_open_sessions", "Open tunnel sessions", 1, 1, {"peer"}},
      {RD_M_OPEN_CONNECTIONS, "remotedialer_open_connections", "Open tunneled connections", 1, 1,
       {"clientkey"}},
      {RD_M_AGENT_ATTEMPTS, "remotedialer_agent_connect_attempts_total",
       "Connection attempts of the agent, by server URL", 0, 1, {"url"}},
      {RD_M_AGENT_FAILURES, "remotedialer_agent_connect_failures_total",
       "Failed connection attempts of the agent, by server URL", 0, 1, {"url"}},
      {RD_M_BUFFERED_BYTES, "remotedialer_buffered_bytes",
       "Bytes queued in the engine, toward local sockets or the tunnel", 1, 1, {"direction"}},
      {RD_M_HEAP_BYTES, "remotedialer_engine_heap_bytes", "Bytes allocated by the engine", 1, 0,
       {NULL}},
      {RD_M_HEAP_OBJECTS, "remotedialer_engine_heap_objects", "Objects allocated by the engine", 1,
       0, {NULL}},
      {RD_M_POOL_BYTES, "remotedialer_engine_pool_bytes",
       "Bytes of the engine heap held idle in buffer pools", 1, 0, {NULL}},
      {RD_M_LOOP_HANDLES, "remotedialer_loop_handles", "Handles alive on the engine's loop", 1, 0,
       {NULL}},
      {RD_M_PROCESS_RSS, "process_resident_memory_bytes", "Resident memory size in bytes.", 1, 0,
       {NULL}},
      {RD_M_PROCESS_FDS, "process_open_fds", "Number of open file descriptors.", 1, 0, {NULL}},
  };
  CHECK_EQ_INT(RD_ARRAY_SIZE(want), RD_M__COUNT);
  for (size_t i = 0; i < RD_ARRAY_SIZE(want); i++) {
    const rd_metric_family_info *fi = rd_metrics_family(want[i].f);
    CHECK(fi != NULL);
    if (fi == NULL)
      continue;
    CHECK_STR(fi->name, want[i].name);
    CHECK_STR(fi->help, want[i].help);
    CHECK_EQ_INT(fi->is_gauge, want[i].gauge);
    CHECK_EQ_INT(fi->num_labels, want[i].n);
    for (size_t j = 0; j < want[i].n; j++)
      CHECK_STR(fi->labels[j], want[i].labels[j]);
  }
  CHECK(rd_metrics_family(-1) == NULL);
  CHECK(rd_metrics_family(RD_M__COUNT) == NULL);
}

TEST(float_format) {
  static const struct {
    double v;
    const char *want;
  } cases[] = {
      {0.0, "0"},
      {-0.0, "-0"},
      {1, "1"},
      {-1, "-1"},
      {123456, "123456"},
      {1e6, "1e+06"},
      {999999, "999999"},
      {1.5, "1.5"},
      {-2.5, "-2.5"},
      {1e-05, "1e-05"},
      {0.0001, "0.0001"},
      {0.00012, "0.00012"},
      {1234567, "1.234567e+06"},
      {123456.7, "123456.7"},
      {9007199254740992.0, "9.007199254740992e+15"}, /* 2^53 */
      {0.1 + 0.2, "0.30000000000000004"},
      {100, "100"},
      {1e21, "1e+21"},
      {1e23, "1e+23"},
      {1e100, "1e+100"},
      {5e-324, "5e-324"},
      {DBL_MAX, "1.7976931348623157e+308"},
      {DBL_MIN, "2.2250738585072014e-308"},
      {562949953421312.25, "5.629499534213122e+14"}, /* a tie: to even */
      {INFINITY, "+Inf"},
      {-INFINITY, "-Inf"},
      {NAN, "NaN"},
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(cases); i++) {
    char out[32];
    size_t n = rd_metrics_format_float(out, cases[i].v);
    CHECK_STR(out, cases[i].want);
    CHECK_EQ_INT(n, strlen(cases[i].want));
  }
  /* Powers of two have a lopsided rounding interval; for these the shortest
   * form is not the nearest one at that length. */
  char out[32];
  rd_metrics_format_float(out, ldexp(1, 89));
  CHECK_STR(out, "6.189700196426902e+26");
  rd_metrics_format_float(out, ldexp(1, -1017));
  CHECK_STR(out, "7.120236347223045e-307");
}

TEST(escaping) {
  int64_t start = rd_alloc_bytes();
  rd_metrics *m = rd_metrics_new();
  const char *v[] = {"a\\b\"c\nd"};
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_TRANSMIT_BYTES, v, 42), RD_OK);
  char *text = rd_metrics_render(m, NULL);
  CHECK_STR(text, "# HELP session_server_total_transmit_bytes Total bytes transmitted\n"
                  "# TYPE session_server_total_transmit_bytes counter\n"
                  "session_server_total_transmit_bytes{clientkey=\"a\\\\b\\\"c\\nd\"} 42\n");
  rd_free(text);
  rd_metrics_free(m);
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

TEST(get_and_values) {
  int64_t start = rd_alloc_bytes();
  rd_metrics *m = rd_metrics_new();
  const char *k[] = {"client"};
  const char *other[] = {"clien"};
  CHECK(rd_metrics_get(m, RD_M_RECEIVE_BYTES, k) == 0);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_RECEIVE_BYTES, k, 1024), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_RECEIVE_BYTES, k, 0.5), RD_OK);
  CHECK(rd_metrics_get(m, RD_M_RECEIVE_BYTES, k) == 1024.5);
  CHECK(rd_metrics_get(m, RD_M_RECEIVE_BYTES, other) == 0);
  CHECK(rd_metrics_get(m, RD_M_TRANSMIT_BYTES, k) == 0);
  /* ("ab","c") and ("a","bc") are different samples. */
  const char *s1[] = {"ab", "c"}, *s2[] = {"a", "bc"};
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_ADD_WS_SESSION, s1, 1), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_ADD_WS_SESSION, s2, 2), RD_OK);
  CHECK(rd_metrics_get(m, RD_M_ADD_WS_SESSION, s1) == 1);
  CHECK(rd_metrics_get(m, RD_M_ADD_WS_SESSION, s2) == 2);
  /* Bad arguments are refused, never crash. */
  CHECK_EQ_INT(rd_metrics_add(m, RD_M__COUNT, k, 1), RD_EMALFORMED);
  CHECK_EQ_INT(rd_metrics_add(m, -1, k, 1), RD_EMALFORMED);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_RECEIVE_BYTES, NULL, 1), RD_EMALFORMED);
  const char *half[] = {"x", NULL};
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_ADD_WS_SESSION, half, 1), RD_EMALFORMED);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_RECEIVE_BYTES, k, -1), RD_EMALFORMED);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_RECEIVE_BYTES, k, NAN), RD_EMALFORMED);
  CHECK_EQ_INT(rd_metrics_add(NULL, RD_M_RECEIVE_BYTES, k, 1), RD_EMALFORMED);
  CHECK(rd_metrics_get(m, RD_M_RECEIVE_BYTES, k) == 1024.5);
  CHECK(rd_metrics_get(m, 99, k) == 0);
  CHECK(rd_metrics_get(NULL, RD_M_RECEIVE_BYTES, k) == 0);
  rd_metrics_free(m);
  rd_metrics_free(NULL);
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

TEST(gauges) {
  int64_t start = rd_alloc_bytes();
  rd_metrics *m = rd_metrics_new();
  const char *peer[] = {"false"};
  const char *key[] = {"foo"};
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_OPEN_SESSIONS, peer, 1), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_OPEN_CONNECTIONS, key, 3), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_OPEN_CONNECTIONS, key, -1), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_OPEN_SESSIONS, peer, -1), RD_OK);
  CHECK(rd_metrics_get(m, RD_M_OPEN_CONNECTIONS, key) == 2);
  char *text = rd_metrics_render(m, NULL);
  /* A gauge back at zero still shows. */
  CHECK_STR(text, "# HELP remotedialer_open_connections Open tunneled connections\n"
                  "# TYPE remotedialer_open_connections gauge\n"
                  "remotedialer_open_connections{clientkey=\"foo\"} 2\n"
                  "# HELP remotedialer_open_sessions Open tunnel sessions\n"
                  "# TYPE remotedialer_open_sessions gauge\n"
                  "remotedialer_open_sessions{peer=\"false\"} 0\n");
  rd_free(text);
  /* -0 prints as 0, as expfmt does. */
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_OPEN_SESSIONS, peer, -0.0), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_OPEN_CONNECTIONS, key, -2), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_OPEN_CONNECTIONS, key, -0.5), RD_OK);
  text = rd_metrics_render(m, NULL);
  CHECK(text != NULL && strstr(text, "remotedialer_open_sessions{peer=\"false\"} 0\n") != NULL);
  CHECK(text != NULL &&
        strstr(text, "remotedialer_open_connections{clientkey=\"foo\"} -0.5\n") != NULL);
  rd_free(text);
  rd_metrics_free(m);
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

TEST(empty_registry) {
  int64_t start = rd_alloc_bytes();
  rd_metrics *m = rd_metrics_new();
  size_t len = 99;
  char *text = rd_metrics_render(m, &len);
  CHECK_STR(text, "");
  CHECK_EQ_INT(len, 0);
  rd_free(text);
  rd_metrics_free(m);
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

typedef struct {
  char buf[4096];
  size_t len;
} collect_ctx;

static void collect_cb(void *ctx, const rd_metric_family_info *family,
                       const char *const *label_values, double value) {
  collect_ctx *c = ctx;
  int n = snprintf(c->buf + c->len, sizeof c->buf - c->len, "%s", family->name);
  c->len += (size_t)n;
  for (size_t i = 0; i < family->num_labels; i++) {
    n = snprintf(c->buf + c->len, sizeof c->buf - c->len, " %s=%s", family->labels[i],
                 label_values[i]);
    c->len += (size_t)n;
  }
  n = snprintf(c->buf + c->len, sizeof c->buf - c->len, " %g\n", value);
  c->len += (size_t)n;
}

TEST(foreach_order) {
  int64_t start = rd_alloc_bytes();
  rd_metrics *m = rd_metrics_new();
  const char *c1[] = {"b", "tcp", "a:1"};
  const char *c2[] = {"a", "tcp", "b:1"};
  const char *c3[] = {"a", "tcp", "a:1"};
  const char *c4[] = {"a", "udp", "a:1"};
  const char *p1[] = {"true"}, *p2[] = {"false"};
  const char *ws1[] = {"z", "false"}, *ws2[] = {"a", "true"}, *ws3[] = {"a", "false"};
  rd_metrics_add(m, RD_M_ADD_CONNECTIONS, c1, 1);
  rd_metrics_add(m, RD_M_ADD_CONNECTIONS, c2, 2);
  rd_metrics_add(m, RD_M_ADD_CONNECTIONS, c3, 3);
  rd_metrics_add(m, RD_M_ADD_CONNECTIONS, c4, 4);
  rd_metrics_add(m, RD_M_PEER_WS_ATTEMPT, p1, 1);
  rd_metrics_add(m, RD_M_PEER_WS_ATTEMPT, p2, 1);
  rd_metrics_add(m, RD_M_OPEN_SESSIONS, p1, 1);
  rd_metrics_add(m, RD_M_ADD_WS_SESSION, ws1, 1);
  rd_metrics_add(m, RD_M_ADD_WS_SESSION, ws2, 1);
  rd_metrics_add(m, RD_M_ADD_WS_SESSION, ws3, 1);
  collect_ctx c = {{0}, 0};
  rd_metrics_foreach(m, collect_cb, &c);
  /* Families by name; samples by values taken in label-name order (addr
   * before clientkey before proto); values reported in the family's order. */
  CHECK_STR(c.buf, "remotedialer_open_sessions peer=true 1\n"
                   "session_server_total_add_connections clientkey=a proto=tcp addr=a:1 3\n"
                   "session_server_total_add_connections clientkey=a proto=udp addr=a:1 4\n"
                   "session_server_total_add_connections clientkey=b proto=tcp addr=a:1 1\n"
                   "session_server_total_add_connections clientkey=a proto=tcp addr=b:1 2\n"
                   "session_server_total_add_websocket_session clientkey=a peer=false 1\n"
                   "session_server_total_add_websocket_session clientkey=a peer=true 1\n"
                   "session_server_total_add_websocket_session clientkey=z peer=false 1\n"
                   "session_server_total_peer_ws_attempt peer=false 1\n"
                   "session_server_total_peer_ws_attempt peer=true 1\n");
  rd_metrics_foreach(m, NULL, NULL);
  rd_metrics_foreach(NULL, collect_cb, &c);
  rd_metrics_free(m);
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

/* Enough samples to grow the hash table several times; bytewise ordering
 * (Go compares strings as bytes, so 0xff sorts after ASCII). */
TEST(many_samples) {
  int64_t start = rd_alloc_bytes();
  rd_metrics *m = rd_metrics_new();
  char key[32];
  for (int i = 999; i >= 0; i--) {
    snprintf(key, sizeof key, "k%04d", i);
    const char *v[] = {key};
    CHECK_EQ_INT(rd_metrics_add(m, RD_M_TRANSMIT_BYTES, v, i), RD_OK);
  }
  const char *hi[] = {"k\xff"};
  const char *empty[] = {""};
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_TRANSMIT_BYTES, hi, 1), RD_OK);
  CHECK_EQ_INT(rd_metrics_add(m, RD_M_TRANSMIT_BYTES, empty, 1), RD_OK);
  for (int i = 0; i < 1000; i++) {
    snprintf(key, sizeof key, "k%04d", i);
    const char *v[] = {key};
    CHECK(rd_metrics_get(m, RD_M_TRANSMIT_BYTES, v) == i);
  }
  char *text = rd_metrics_render(m, NULL);
  CHECK(text != NULL);
  if (text != NULL) {
    const char *e = strstr(text, "{clientkey=\"\"} 1\n");
    const char *a = strstr(text, "{clientkey=\"k0000\"} 0\n");
    const char *b = strstr(text, "{clientkey=\"k0001\"} 1\n");
    const char *z = strstr(text, "{clientkey=\"k0999\"} 999\n");
    const char *f = strstr(text, "{clientkey=\"k\xff\"} 1\n");
    CHECK(e && a && b && z && f && e < a && a < b && b < z && z < f);
  }
  rd_free(text);
  rd_metrics_free(m);
  CHECK_EQ_INT(rd_alloc_bytes(), start);
}

/* Fails the i-th allocation for every i: every failure is reported, leaves
 * the registry consistent (a failed add counts nothing) and leaks nothing. */
TEST(failing_allocations) {
  /* Build the expected text with allocation working. */
  char keys[40][16];
  for (int i = 0; i < 40; i++)
    snprintf(keys[i], sizeof keys[i], "key%02d", (i * 17) % 40);
  rd_metrics *ref = rd_metrics_new();
  CHECK(add_example(ref) == RD_OK);
  for (int i = 0; i < 40; i++) {
    const char *v[] = {keys[i]};
    rd_metrics_add(ref, RD_M_RECEIVE_BYTES, v, i + 0.5);
  }
  char *want = rd_metrics_render(ref, NULL);
  rd_metrics_free(ref);
  CHECK(want != NULL);
  if (want == NULL)
    return;

  int64_t start = rd_alloc_bytes() - (int64_t)(strlen(want) + 1);
  /* A clean run makes about 55 allocations; going well past that proves the
   * tail is covered too. */
  int failures_seen = 0, last_failed = 1;
  for (int64_t nth = 0; nth < 200; nth++) {
    int failed = 0;
    rd_alloc_fail_nth(nth);
    rd_metrics *m = rd_metrics_new();
    if (m == NULL) {
      failed = 1;
      rd_alloc_fail_nth(-1);
      m = rd_metrics_new();
    }
    CHECK(m != NULL);
    if (m == NULL)
      break;
    const char *good[] = {"foo", "tcp", "127.0.0.1:8125"};
    const char *bad[] = {"foo", "tcp", "127.0.0.1:1"};
    struct {
      int f;
      const char *const *v;
      double d;
    } ops[43] = {{RD_M_ADD_CONNECTIONS, good, 1},
                 {RD_M_ADD_CONNECTIONS, bad, 1},
                 {RD_M_REMOVE_CONNECTIONS, bad, 1}};
    const char *vals[40][1];
    for (int i = 0; i < 40; i++) {
      vals[i][0] = keys[i];
      ops[3 + i].f = RD_M_RECEIVE_BYTES;
      ops[3 + i].v = vals[i];
      ops[3 + i].d = i + 0.5;
    }
    for (size_t i = 0; i < RD_ARRAY_SIZE(ops); i++) {
      double before = rd_metrics_get(m, ops[i].f, ops[i].v);
      int r = rd_metrics_add(m, ops[i].f, ops[i].v, ops[i].d);
      if (r == RD_ENOMEM) {
        failed = 1;
        CHECK(rd_metrics_get(m, ops[i].f, ops[i].v) == before);
        r = rd_metrics_add(m, ops[i].f, ops[i].v, ops[i].d);
      }
      CHECK_EQ_INT(r, RD_OK);
    }
    char *text = rd_metrics_render(m, NULL);
    if (text == NULL) {
      failed = 1;
      text = rd_metrics_render(m, NULL);
    }
    CHECK_STR(text, want);
    rd_free(text);
    rd_metrics_free(m);
    rd_alloc_fail_nth(-1);
    CHECK_EQ_INT(rd_alloc_bytes() - (int64_t)(strlen(want) + 1), start);
    failures_seen += failed;
    last_failed = failed;
  }
  CHECK(failures_seen > 40);
  CHECK(!last_failed);
  rd_free(want);
}

RD_TEST_MAIN(T(go_example_exposition), T(family_table), T(float_format), T(escaping),
             T(get_and_values), T(gauges), T(empty_registry), T(foreach_order),
             T(many_samples), T(failing_allocations))
