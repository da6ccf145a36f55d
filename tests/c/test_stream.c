/* The stream route's target: the encoder the remote forward uses, the
 * parser and destination check the server applies. Inputs sit at the end of
 * exact-size heap blocks, so ASan reports any read past them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_stream.h"
#include "rd_test.h"

static int parse(const char *t, rd_stream_dest *d, const char **why) {
  size_t n = strlen(t);
  char *b = malloc(n ? n : 1);
  memcpy(b, t, n);
  *why = NULL;
  int rc = rd_stream_parse_target(b, n, d, why);
  free(b);
  return rc;
}

TEST(encode) {
  char out[64];
  CHECK_EQ_INT(rd_stream_encode(out, sizeof out, "127.0.0.1:8080"), 14);
  CHECK_STR(out, "127.0.0.1:8080");
  CHECK(rd_stream_encode(out, sizeof out, "/run/a b.sock") > 0);
  CHECK_STR(out, "%2Frun%2Fa%20b.sock");
  CHECK(rd_stream_encode(out, sizeof out, "[::1]:22") > 0);
  CHECK_STR(out, "%5B::1%5D:22");
  CHECK(rd_stream_encode(out, sizeof out, "k?#%\xc3\xa9") > 0);
  CHECK_STR(out, "k%3F%23%25%C3%A9");
  /* Exactly full (the NUL needs room too) and one short. */
  CHECK_EQ_INT(rd_stream_encode(out, 4, "abc"), 3);
  CHECK_EQ_INT(rd_stream_encode(out, 3, "abc"), RD_ADDR_ENOSPACE);
  CHECK_STR(out, "");
  CHECK_EQ_INT(rd_stream_encode(out, 3, "a/"), RD_ADDR_ENOSPACE);
  CHECK_EQ_INT(rd_stream_encode(out, 1, ""), 0);
}

TEST(parse_good) {
  rd_stream_dest d;
  const char *why;
  CHECK_EQ_INT(parse("agent-1/tcp/127.0.0.1:80", &d, &why), 0);
  CHECK_STR(d.key, "agent-1");
  CHECK_STR(d.proto, "tcp");
  CHECK_STR(d.address, "127.0.0.1:80");
  CHECK_EQ_INT(parse("k%2F1/unix/%2frun%2Fx%20y.sock?ignored=1/2", &d, &why), 0);
  CHECK_STR(d.key, "k/1");
  CHECK_STR(d.address, "/run/x y.sock");
  CHECK_EQ_INT(parse("k/tcp6/%5B::1%5D:22", &d, &why), 0);
  CHECK_STR(d.address, "[::1]:22");
  /* Round trip through the encoder. */
  char enc[3 * RD_STREAM_ADDRESS_MAX + 1], target[4 * RD_STREAM_ADDRESS_MAX];
  const char *addr = "/tmp/a b/%c?d#e";
  CHECK(rd_stream_encode(enc, sizeof enc, addr) > 0);
  snprintf(target, sizeof target, "key/unix/%s", enc);
  CHECK_EQ_INT(parse(target, &d, &why), 0);
  CHECK_STR(d.address, addr);
}

TEST(parse_bad) {
  rd_stream_dest d;
  const char *why;
  const char *shape[] = {"", "k", "k/tcp", "k/tcp/", "/tcp/h:1", "k//h:1", "k/tcp/h:1/x",
                         "k/tcp/a/b", "?k/tcp/h:1"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(shape); i++) {
    CHECK_EQ_INT(parse(shape[i], &d, &why), RD_EMALFORMED);
    CHECK(why != NULL && strstr(why, "/stream/{key}/{proto}/{address}") != NULL);
  }
  CHECK_EQ_INT(parse("k/tcp/h%3:1", &d, &why), RD_EMALFORMED);
  CHECK_STR(why, "bad percent escape in the path");
  CHECK_EQ_INT(parse("k/tcp/h:1%", &d, &why), RD_EMALFORMED);
  CHECK_EQ_INT(parse("k/tcp/h:1%4", &d, &why), RD_EMALFORMED);
  CHECK_EQ_INT(parse("k/tcp/h%0a:1", &d, &why), RD_EMALFORMED);
  CHECK_STR(why, "control character in the path");
  CHECK_EQ_INT(parse("k%00/tcp/h:1", &d, &why), RD_EMALFORMED);
  CHECK_EQ_INT(parse("k/tcp/h\x7f:1", &d, &why), RD_EMALFORMED);
  /* Limits apply after decoding. */
  char t[2048];
  snprintf(t, sizeof t, "k/tcp/%0*d", RD_STREAM_ADDRESS_MAX, 0);
  CHECK_EQ_INT(parse(t, &d, &why), 0);
  snprintf(t, sizeof t, "k/tcp/%0*d", RD_STREAM_ADDRESS_MAX + 1, 0);
  CHECK_EQ_INT(parse(t, &d, &why), RD_EMALFORMED);
  CHECK_STR(why, "address too long");
  snprintf(t, sizeof t, "k/%0*d/h:1", RD_STREAM_PROTO_MAX + 1, 0);
  CHECK_EQ_INT(parse(t, &d, &why), RD_EMALFORMED);
  CHECK_STR(why, "proto too long");
  snprintf(t, sizeof t, "%0*d/tcp/h:1", RD_STREAM_KEY_MAX + 1, 0);
  CHECK_EQ_INT(parse(t, &d, &why), RD_EMALFORMED);
  CHECK_STR(why, "client key too long");
}

TEST(check_dest) {
  char err[128];
  CHECK_EQ_INT(rd_stream_check_dest("tcp", "127.0.0.1:80", err, sizeof err), 0);
  CHECK_EQ_INT(rd_stream_check_dest("tcp6", "[::1]:80", err, sizeof err), 0);
  CHECK_EQ_INT(rd_stream_check_dest("tcp4", "localhost:http", err, sizeof err), 0);
  CHECK_EQ_INT(rd_stream_check_dest("unix", "/run/x.sock", err, sizeof err), 0);
  CHECK_EQ_INT(rd_stream_check_dest("udp", "h:1", err, sizeof err), RD_EMALFORMED);
  CHECK_STR(err, "unsupported proto udp (tcp, tcp4, tcp6 or unix)");
  CHECK_EQ_INT(rd_stream_check_dest("tcp", "nohost", err, sizeof err), RD_EMALFORMED);
  CHECK_PREFIX(err, "bad address nohost: ");
  CHECK_EQ_INT(rd_stream_check_dest("tcp", "h:", err, sizeof err), RD_EMALFORMED);
  CHECK_STR(err, "bad address h:: missing port");
  CHECK_EQ_INT(rd_stream_check_dest("tcp", "::1:80", err, sizeof err), RD_EMALFORMED);
  CHECK_EQ_INT(rd_stream_check_dest("unix", "", err, sizeof err), RD_EMALFORMED);
  CHECK_STR(err, "empty address");
}

RD_TEST_MAIN(T(encode), T(parse_good), T(parse_bad), T(check_dest))
