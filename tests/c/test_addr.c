/* Addresses: the endpoint table shared with the Python mirror
 * (tests/addr_table.txt), Go's SplitHostPort and parsePort, joining, URL
 * parts, path cleaning; every valid input is also read from a buffer of its
 * exact length, so a read past the end shows under ASan. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_addr.h"
#include "rd_test.h"

/* Copies s[0..len) into a heap block of exactly len bytes (no NUL after). */
static char *exact(const char *s, size_t len) {
  char *p = malloc(len ? len : 1);
  if (len > 0)
    memcpy(p, s, len);
  return p;
}

/* ---- The shared table -------------------------------------------------- */

static const struct {
  const char *name;
  int code;
} kinds[] = {
    {"missing_port", RD_ADDR_EMISSING_PORT},     {"missing_bracket", RD_ADDR_EMISSING_BRACKET},
    {"too_many_colons", RD_ADDR_ETOO_MANY_COLONS}, {"unexpected_open", RD_ADDR_EUNEXPECTED_OPEN},
    {"unexpected_close", RD_ADDR_EUNEXPECTED_CLOSE}, {"empty", RD_ADDR_EEMPTY},
    {"missing_host", RD_ADDR_EMISSING_HOST},     {"bad_host", RD_ADDR_EBAD_HOST},
    {"bad_ipv6", RD_ADDR_EBAD_IPV6},             {"host_too_long", RD_ADDR_EHOST_TOO_LONG},
    {"bad_port", RD_ADDR_EBAD_PORT},             {"port_range", RD_ADDR_EPORT_RANGE},
    {"bad_scheme", RD_ADDR_EBAD_SCHEME},
};

static int kind_code(const char *name) {
  for (size_t i = 0; i < RD_ARRAY_SIZE(kinds); i++)
    if (strcmp(kinds[i].name, name) == 0)
      return kinds[i].code;
  fprintf(stderr, "unknown kind %s\n", name);
  return 1;
}

/* Decodes \xHH escapes in place; returns the length. */
static size_t unescape(char *s) {
  size_t w = 0;
  for (size_t r = 0; s[r] != '\0'; r++) {
    unsigned v;
    if (s[r] == '\\' && s[r + 1] == 'x' && sscanf(s + r + 2, "%2x", &v) == 1) {
      s[w++] = (char)v;
      r += 3;
    } else {
      s[w++] = s[r];
    }
  }
  return w;
}

/* Parses input in the table's mode from a buffer of its exact length. */
static int parse_mode(const char *mode, const char *in, size_t len, rd_addr *a) {
  char *buf = exact(in, len);
  int rc;
  if (strcmp(mode, "listen") == 0) {
    rc = rd_addr_parse(buf, len, -1, RD_ADDR_EMPTY_HOST, a);
  } else if (strcmp(mode, "proxy") == 0) {
    rc = rd_addr_parse(buf, len, 80, RD_ADDR_BARE_IPV6, a);
  } else {
    rd_addr_url u;
    rc = rd_addr_parse_url(buf, len, &u);
    *a = u.addr;
  }
  /* The parts point into buf: copy the host out before it goes. */
  static char host[512];
  if (rc == 0) {
    CHECK(a->host >= buf && a->host + a->host_len <= buf + len);
    memcpy(host, a->host, a->host_len);
    host[a->host_len] = '\0';
    a->host = host;
  }
  free(buf);
  return rc;
}

TEST(shared_table) {
  FILE *f = fopen("tests/addr_table.txt", "r");
  if (f == NULL) {
    /* Run from elsewhere than the top of the tree: find it beside us. */
    char path[1024];
    snprintf(path, sizeof path, "%.*s/../addr_table.txt",
             (int)(strrchr(__FILE__, '/') - __FILE__), __FILE__);
    f = fopen(path, "r");
  }
  CHECK(f != NULL);
  if (f == NULL)
    return;
  char line[1024];
  int n = 0;
  while (fgets(line, sizeof line, f) != NULL) {
    line[strcspn(line, "\n")] = '\0';
    if (line[0] == '\0' || line[0] == '#')
      continue;
    char *in = strstr(line, " | ");
    char *res = in != NULL ? strstr(in + 3, " | ") : NULL;
    CHECK(res != NULL);
    if (res == NULL)
      continue;
    *in = '\0';
    in += 3;
    *res = '\0';
    res += 3;
    const char *mode = line;
    char shown[512];
    snprintf(shown, sizeof shown, "%s", in);
    size_t len = unescape(in);
    rd_addr a;
    int rc = parse_mode(mode, in, len, &a);
    n++;
    if (res[0] == '!') {
      int want = kind_code(res + 2);
      if (rc != want)
        fprintf(stderr, "%s '%s': got %d (%s), want %s\n", mode, shown, rc, rd_addr_strerror(rc),
                res + 2);
      CHECK_EQ_INT(rc, want);
      continue;
    }
    char want_host[300];
    int want_port;
    CHECK(sscanf(res, "%299s %d", want_host, &want_port) == 2);
    if (strcmp(want_host, "\"\"") == 0)
      want_host[0] = '\0';
    if (rc != 0 || strcmp(a.host, want_host) != 0 || a.port != want_port)
      fprintf(stderr, "%s '%s': got %d (%s) host '%s' port %d, want %s\n", mode, shown, rc,
              rd_addr_strerror(rc), rc == 0 ? a.host : "", rc == 0 ? a.port : -1, res);
    CHECK_EQ_INT(rc, 0);
    if (rc == 0) {
      CHECK(strcmp(a.host, want_host) == 0);
      CHECK_EQ_INT(a.port, want_port);
    }
  }
  fclose(f);
  CHECK(n > 50);
}

/* ---- rd_addr_parse details ---------------------------------------------- */

TEST(parse_parts) {
  rd_addr a;
  const char *s = "[fe80::1%eth0]:8080";
  CHECK_EQ_INT(rd_addr_parse(s, strlen(s), -1, 0, &a), 0);
  CHECK(a.bracketed && a.host == s + 1 && a.host_len == 12);
  CHECK(a.port_text == s + 15 && a.port_len == 4 && a.port == 8080);
  CHECK_EQ_INT(rd_addr_parse("h", 1, 0, 0, &a), 0);
  CHECK(!a.bracketed && a.port == 0 && a.port_len == 0);
  /* A bare IPv6 address needs a default port to stand for. */
  CHECK_EQ_INT(rd_addr_parse("::1", 3, -1, RD_ADDR_BARE_IPV6, &a), RD_ADDR_ETOO_MANY_COLONS);
  /* Only the given length is read: "h:80" inside "h:8080". */
  CHECK_EQ_INT(rd_addr_parse("h:8080", 4, -1, 0, &a), 0);
  CHECK_EQ_INT(a.port, 80);
}

TEST(parse_host_length) {
  char buf[300];
  memset(buf, 'a', sizeof buf);
  rd_addr a;
  CHECK_EQ_INT(rd_addr_parse(buf, RD_ADDR_HOST_MAX, 1, 0, &a), 0);
  CHECK_EQ_INT(a.host_len, RD_ADDR_HOST_MAX);
  CHECK_EQ_INT(rd_addr_parse(buf, RD_ADDR_HOST_MAX + 1, 1, 0, &a), RD_ADDR_EHOST_TOO_LONG);
  /* Whatever was accepted joins into RD_ADDR_JOINED_MAX. */
  char out[RD_ADDR_JOINED_MAX];
  CHECK_EQ_INT(rd_addr_join(out, sizeof out, buf, RD_ADDR_HOST_MAX, 65535),
               RD_ADDR_HOST_MAX + 6);
}

/* Every prefix of a valid input parses or fails cleanly (ASan sees any read
 * past the prefix). */
TEST(parse_every_prefix) {
  const char *inputs[] = {"[fe80::1%eth0]:65535", "example.com:8443", "ws://[::1]:9/x",
                          "2001:db8::1"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(inputs); i++) {
    size_t n = strlen(inputs[i]);
    for (size_t k = 0; k <= n; k++) {
      char *buf = exact(inputs[i], k);
      rd_addr a;
      rd_addr_url u;
      int rc = rd_addr_parse(buf, k, 80, RD_ADDR_BARE_IPV6 | RD_ADDR_EMPTY_HOST, &a);
      CHECK(rc <= 0);
      rc = rd_addr_parse_url(buf, k, &u);
      CHECK(rc <= 0);
      free(buf);
    }
  }
}

/* ---- Go's SplitHostPort and parsePort ------------------------------------ */

TEST(split_go_cases) {
  static const struct {
    const char *in, *host, *port;
    int rc;
  } cases[] = {
      {"localhost:80", "localhost", "80", 0},
      {"[::1]:80", "::1", "80", 0},
      {"[fe80::1%lo]:http", "fe80::1%lo", "http", 0},
      {":80", "", "80", 0},
      {"h:", "h", "", 0},
      {"[]:1", "", "1", 0},
      {"a b:c d", "a b", "c d", 0},
      {"", NULL, NULL, RD_ADDR_EMISSING_PORT},
      {"h", NULL, NULL, RD_ADDR_EMISSING_PORT},
      {"[::1]", NULL, NULL, RD_ADDR_EMISSING_PORT},
      {"[::1]x:80", NULL, NULL, RD_ADDR_EMISSING_PORT},
      {"[::1]:80:80", NULL, NULL, RD_ADDR_ETOO_MANY_COLONS},
      {"::1:80", NULL, NULL, RD_ADDR_ETOO_MANY_COLONS},
      {"[::1:80", NULL, NULL, RD_ADDR_EMISSING_BRACKET},
      {"a[b:80", NULL, NULL, RD_ADDR_EUNEXPECTED_OPEN},
      {"[[::1]:80", NULL, NULL, RD_ADDR_EUNEXPECTED_OPEN},
      {"a]b:80", NULL, NULL, RD_ADDR_EUNEXPECTED_CLOSE},
      {"h:8]", NULL, NULL, RD_ADDR_EUNEXPECTED_CLOSE},
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(cases); i++) {
    size_t n = strlen(cases[i].in);
    char *buf = exact(cases[i].in, n);
    rd_addr a;
    int rc = rd_addr_split(buf, n, &a);
    if (rc != cases[i].rc)
      fprintf(stderr, "split '%s': %d, want %d\n", cases[i].in, rc, cases[i].rc);
    CHECK_EQ_INT(rc, cases[i].rc);
    if (rc == 0 && cases[i].rc == 0) {
      CHECK(a.host_len == strlen(cases[i].host) &&
            memcmp(a.host, cases[i].host, a.host_len) == 0);
      CHECK(a.port_len == strlen(cases[i].port) &&
            memcmp(a.port_text, cases[i].port, a.port_len) == 0);
    }
    free(buf);
  }
  CHECK(strcmp(rd_addr_strerror(RD_ADDR_ETOO_MANY_COLONS), "too many colons in address") == 0);
  CHECK(strcmp(rd_addr_strerror(-1), "invalid address") == 0);
}

TEST(go_port) {
  long p = 7;
  CHECK(rd_addr_go_port("80", 2, &p) == 1 && p == 80);
  CHECK(rd_addr_go_port("+80", 3, &p) == 1 && p == 80);
  CHECK(rd_addr_go_port("-1", 2, &p) == 1 && p == -1);
  CHECK(rd_addr_go_port("", 0, &p) == 1 && p == 0);
  CHECK(rd_addr_go_port("99999999999999999999", 20, &p) == 1 && p == 1L << 30);
  p = 7;
  CHECK(rd_addr_go_port("http", 4, &p) == 0 && p == 7);
  CHECK(rd_addr_go_port("8o", 2, &p) == 0 && p == 7);
  CHECK(rd_addr_go_port("80", 1, &p) == 1 && p == 8);
}

/* ---- Joining ------------------------------------------------------------ */

TEST(join) {
  char out[64];
  CHECK_EQ_INT(rd_addr_join(out, sizeof out, "127.0.0.1", 9, 80), 12);
  CHECK(strcmp(out, "127.0.0.1:80") == 0);
  CHECK_EQ_INT(rd_addr_join(out, sizeof out, "::1", 3, 443), 9);
  CHECK(strcmp(out, "[::1]:443") == 0);
  CHECK_EQ_INT(rd_addr_join(out, sizeof out, "fe80::1%eth0xyz", 12, 1), 16);
  CHECK(strcmp(out, "[fe80::1%eth0]:1") == 0);
  CHECK_EQ_INT(rd_addr_join(out, sizeof out, "", 0, 0), 2);
  CHECK(strcmp(out, ":0") == 0);
  /* Too small: an error and an empty string, never a cut address. */
  CHECK_EQ_INT(rd_addr_join(out, 9, "::1", 3, 443), RD_ADDR_ENOSPACE);
  CHECK(out[0] == '\0');
  CHECK_EQ_INT(rd_addr_join(out, 10, "::1", 3, 443), 9);
}

/* Joining what was parsed and parsing it again gives the same parts. */
TEST(join_round_trip) {
  const char *inputs[] = {"h:1", "[::1]:2", "::1", "[fe80::a%x]", "a.b-c_d", "10.1.2.3:65535"};
  for (size_t i = 0; i < RD_ARRAY_SIZE(inputs); i++) {
    rd_addr a, b;
    CHECK_EQ_INT(rd_addr_parse(inputs[i], strlen(inputs[i]), 7, RD_ADDR_BARE_IPV6, &a), 0);
    char out[RD_ADDR_JOINED_MAX];
    int n = rd_addr_join(out, sizeof out, a.host, a.host_len, a.port);
    CHECK(n > 0);
    CHECK_EQ_INT(rd_addr_parse(out, (size_t)n, -1, 0, &b), 0);
    CHECK(a.host_len == b.host_len && memcmp(a.host, b.host, a.host_len) == 0);
    CHECK_EQ_INT(a.port, b.port);
  }
}

/* ---- URLs --------------------------------------------------------------- */

TEST(url_parts) {
  rd_addr_url u;
  const char *s = "wss://[::1]:8443/connect?x=1";
  CHECK_EQ_INT(rd_addr_parse_url(s, strlen(s), &u), 0);
  CHECK(u.tls == 1);
  CHECK(u.authority_len == 10 && memcmp(u.authority, "[::1]:8443", 10) == 0);
  CHECK(u.addr.host_len == 3 && memcmp(u.addr.host, "::1", 3) == 0 && u.addr.port == 8443);
  CHECK(u.path_len == 12 && memcmp(u.path, "/connect?x=1", 12) == 0);
  s = "ws://h";
  CHECK_EQ_INT(rd_addr_parse_url(s, strlen(s), &u), 0);
  CHECK(u.tls == 0 && u.addr.port == 80 && u.path_len == 0 && u.authority_len == 1);
}

/* ---- Path cleaning (Go's path.Clean tests) ------------------------------- */

TEST(clean_path) {
  static const char *const cases[][2] = {
      /* Already clean. */
      {"", "."}, {"abc", "abc"}, {"abc/def", "abc/def"}, {"a/b/c", "a/b/c"}, {".", "."},
      {"..", ".."}, {"../..", "../.."}, {"../../abc", "../../abc"}, {"/abc", "/abc"},
      {"/", "/"},
      /* Trailing slash. */
      {"abc/", "abc"}, {"abc/def/", "abc/def"}, {"a/b/c/", "a/b/c"}, {"./", "."},
      {"../", ".."}, {"../../", "../.."}, {"/abc/", "/abc"},
      /* Double slashes. */
      {"abc//def//ghi", "abc/def/ghi"}, {"//abc", "/abc"}, {"///abc", "/abc"},
      {"//abc//", "/abc"}, {"abc//", "abc"},
      /* "." elements. */
      {"abc/./def", "abc/def"}, {"/./abc/def", "/abc/def"}, {"abc/.", "abc"},
      /* ".." elements. */
      {"abc/def/ghi/../jkl", "abc/def/jkl"}, {"abc/def/../ghi/../jkl", "abc/jkl"},
      {"abc/def/..", "abc"}, {"abc/def/../..", "."}, {"/abc/def/../..", "/"},
      {"abc/def/../../..", ".."}, {"/abc/def/../../..", "/"},
      {"abc/def/../../../ghi/jkl/../../../mno", "../../mno"},
      /* Combinations. */
      {"abc/./../def", "def"}, {"abc//./../def", "def"}, {"abc/../../././../def", "../../def"},
      /* The unix socket cases the agent's allow patterns meet. */
      {"/run/ok/../secret.sock", "/run/secret.sock"}, {"/run/ok/./x.sock", "/run/ok/x.sock"},
      {"/run//ok/x.sock", "/run/ok/x.sock"}, {"/run/ok/x.sock/..", "/run/ok"},
      {"/../../etc/x", "/etc/x"}, {"/run/ok/...", "/run/ok/..."}, {"/run/ok/..x", "/run/ok/..x"},
  };
  for (size_t i = 0; i < RD_ARRAY_SIZE(cases); i++) {
    size_t n = strlen(cases[i][0]);
    char *in = exact(cases[i][0], n);
    char out[128];
    int rc = rd_addr_clean_path(in, n, out, n + 2);
    if (rc < 0 || strcmp(out, cases[i][1]) != 0)
      fprintf(stderr, "clean '%s': %d '%s', want '%s'\n", cases[i][0], rc, out, cases[i][1]);
    CHECK_EQ_INT(rc, (int)strlen(cases[i][1]));
    CHECK(strcmp(out, cases[i][1]) == 0);
    /* Cleaning is idempotent. */
    char again[128];
    CHECK_EQ_INT(rd_addr_clean_path(out, (size_t)rc, again, sizeof again), rc);
    CHECK(strcmp(again, out) == 0);
    free(in);
  }
}

TEST(clean_path_space) {
  char out[8];
  CHECK_EQ_INT(rd_addr_clean_path("/a/b", 4, out, 5), 4);
  CHECK_EQ_INT(rd_addr_clean_path("/a/b", 4, out, 4), RD_ADDR_ENOSPACE);
  CHECK(out[0] == '\0');
  CHECK_EQ_INT(rd_addr_clean_path("", 0, out, 1), RD_ADDR_ENOSPACE);
  CHECK_EQ_INT(rd_addr_clean_path("", 0, out, 2), 1);
  CHECK_EQ_INT(rd_addr_clean_path("x", 1, out, 0), RD_ADDR_ENOSPACE);
  /* Shorter output fits a buffer too small for the input. */
  CHECK_EQ_INT(rd_addr_clean_path("/a/../b/", 8, out, 3), 2);
  CHECK(strcmp(out, "/b") == 0);
}

RD_TEST_MAIN(T(shared_table), T(parse_parts), T(parse_host_length), T(parse_every_prefix),
             T(split_go_cases), T(go_port), T(join), T(join_round_trip), T(url_parts),
             T(clean_path), T(clean_path_space))
