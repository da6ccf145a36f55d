/* The options table: every row lands in its own field, ranges and kinds are
 * checked with the messages Python gives, and the documented defaults are the
 * ones the config structs start with. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rd_client.h"
#include "rd_options.h"
#include "rd_server.h"
#include "rd_test.h"

static const unsigned objects[2] = {RD_OPT_SERVER, RD_OPT_CLIENT};

/* A defaulted config of object's type, in storage big enough for either. */
typedef union {
  rd_server_config server;
  rd_client_config client;
} any_config;

static void defaults(unsigned object, any_config *c) {
  memset(c, 0, sizeof *c);
  if (object == RD_OPT_SERVER)
    rd_server_config_default(&c->server);
  else
    rd_client_config_default(&c->client);
}

static uint64_t get_uint(const void *p, size_t width) {
  if (width == sizeof(uint64_t)) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
  }
  uint32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

static int store(const char *name, unsigned object, any_config *c, rd_option_value v, char *err) {
  const rd_option *o = rd_option_find(name, object);
  CHECK(o != NULL);
  return o != NULL ? rd_option_store(o, object, c, &v, err, 200) : -1;
}

TEST(rows_are_well_formed) {
  for (size_t i = 0; i < rd_options_count; i++) {
    const rd_option *o = &rd_options[i];
    CHECK(o->name[0] != '\0' && o->meaning != NULL && o->objects != 0);
    CHECK((o->objects & ~(unsigned)(RD_OPT_SERVER | RD_OPT_CLIENT)) == 0);
    /* One row per name and object. */
    for (int k = 0; k < 2; k++)
      if (o->objects & objects[k])
        CHECK(rd_option_find(o->name, objects[k]) == o);
    for (int k = 0; k < 2; k++) {
      size_t off = rd_option_offset(o, objects[k]);
      if (off == RD_OPT_UNSTORED)
        continue;
      CHECK(o->kind != RD_OPT_PATH && o->field_size > 0);
      CHECK(off + o->field_size <= (objects[k] == RD_OPT_SERVER ? sizeof(rd_server_config)
                                                                 : sizeof(rd_client_config)));
    }
  }
}

TEST(documented_defaults_are_the_configs) {
  for (size_t i = 0; i < rd_options_count; i++) {
    const rd_option *o = &rd_options[i];
    for (int k = 0; k < 2; k++) {
      size_t off = rd_option_offset(o, objects[k]);
      if (off == RD_OPT_UNSTORED)
        continue;
      any_config c;
      defaults(objects[k], &c);
      const char *field = (const char *)&c + off;
      if (o->kind == RD_OPT_HEADER || o->kind == RD_OPT_HOST) {
        /* An empty default is described in words (server_name: the URL's host). */
        if (field[0] != '\0' && strcmp(field, o->def_text) != 0) {
          fprintf(stderr, "%s: default %s, documented %s\n", o->name, field, o->def_text);
          CHECK(0);
        }
      } else if (get_uint(field, o->field_size) != o->def) {
        fprintf(stderr, "%s: default %llu, documented %llu\n", o->name,
                (unsigned long long)get_uint(field, o->field_size), (unsigned long long)o->def);
        CHECK(0);
      }
    }
  }
}

/* Storing any row changes its own bytes and nothing else. */
TEST(each_row_lands_in_its_field) {
  for (size_t i = 0; i < rd_options_count; i++) {
    const rd_option *o = &rd_options[i];
    for (int k = 0; k < 2; k++) {
      size_t off = rd_option_offset(o, objects[k]);
      if (off == RD_OPT_UNSTORED)
        continue;
      any_config before, after;
      defaults(objects[k], &before);
      after = before;
      rd_option_value v = {.seconds = 1234.5, .number = 7, .flag = !o->def, .text = "X-Other"};
      char err[200];
      CHECK_EQ_INT(rd_option_store(o, objects[k], &after, &v, err, sizeof err), RD_OK);
      CHECK(memcmp(&before, &after, off) == 0);
      CHECK(memcmp((char *)&before + off + o->field_size, (char *)&after + off + o->field_size,
                   sizeof before - off - o->field_size) == 0);
      CHECK(memcmp((char *)&before + off, (char *)&after + off, o->field_size) != 0);
    }
  }
}

TEST(named_fields) {
  any_config s, c;
  char err[200];
  defaults(RD_OPT_SERVER, &s);
  defaults(RD_OPT_CLIENT, &c);
  CHECK_EQ_INT(store("read_timeout", RD_OPT_SERVER, &s, (rd_option_value){.seconds = 1.5}, err), 0);
  CHECK_EQ_INT(s.server.session.read_timeout_ms, 1500);
  CHECK_EQ_INT(store("read_timeout", RD_OPT_CLIENT, &c, (rd_option_value){.seconds = 2}, err), 0);
  CHECK_EQ_INT(c.client.session.read_timeout_ms, 2000);
  /* One name, two rows, two places. */
  CHECK(rd_option_find("handshake_timeout", RD_OPT_SERVER) !=
        rd_option_find("handshake_timeout", RD_OPT_CLIENT));
  CHECK_EQ_INT(store("handshake_timeout", RD_OPT_SERVER, &s, (rd_option_value){.seconds = 3}, err),
               0);
  CHECK_EQ_INT(s.server.handshake_timeout_ms, 3000);
  CHECK_EQ_INT(store("handshake_timeout", RD_OPT_CLIENT, &c, (rd_option_value){.seconds = 4}, err),
               0);
  CHECK_EQ_INT(c.client.handshake_timeout_ms, 4000);
  CHECK_EQ_INT(store("max_message", RD_OPT_CLIENT, &c, (rd_option_value){.number = 1 << 20}, err),
               0);
  CHECK_EQ_INT(c.client.session.max_message, 1 << 20);
  CHECK_EQ_INT(store("max_pending_dials", RD_OPT_CLIENT, &c, (rd_option_value){.number = 9}, err),
               0);
  CHECK_EQ_INT(c.client.session.max_pending_dials, 9);
  CHECK_EQ_INT(store("backoff_max", RD_OPT_CLIENT, &c, (rd_option_value){.seconds = 0.25}, err), 0);
  CHECK_EQ_INT(c.client.backoff_max_ms, 250);
  CHECK_EQ_INT(store("debug_route", RD_OPT_SERVER, &s, (rd_option_value){.flag = 5}, err), 0);
  CHECK_EQ_INT(s.server.debug_route, 1);
  CHECK_EQ_INT(store("proxy_route", RD_OPT_SERVER, &s, (rd_option_value){.flag = 0}, err), 0);
  CHECK_EQ_INT(s.server.proxy_route, 0);
  CHECK_EQ_INT(store("auth_header", RD_OPT_SERVER, &s, (rd_option_value){.text = "X-Agent"}, err),
               0);
  CHECK(strcmp(s.server.auth_header, "X-Agent") == 0);
  CHECK_EQ_INT(
      store("server_name", RD_OPT_CLIENT, &c, (rd_option_value){.text = "tunnel.example"}, err), 0);
  CHECK(strcmp(c.client.server_name, "tunnel.example") == 0);
}

/* A refused value leaves the config as it was and names the option. */
static void refused(const char *name, unsigned object, rd_option_value v, const char *message) {
  any_config c, before;
  char err[200] = "";
  defaults(object, &c);
  before = c;
  CHECK_EQ_INT(store(name, object, &c, v, err), RD_EMALFORMED);
  CHECK(memcmp(&c, &before, sizeof c) == 0);
  if (strcmp(err, message) != 0) {
    fprintf(stderr, "%s: got \"%s\", want \"%s\"\n", name, err, message);
    CHECK(0);
  }
}

TEST(seconds) {
  refused("read_timeout", RD_OPT_SERVER, (rd_option_value){.seconds = 0},
          "read_timeout must be a positive number of seconds, got 0");
  refused("ping_interval", RD_OPT_CLIENT, (rd_option_value){.seconds = -1},
          "ping_interval must be a positive number of seconds, got -1");
  refused("read_timeout", RD_OPT_CLIENT, (rd_option_value){.seconds = NAN},
          "read_timeout must be a positive number of seconds, got nan");
  refused("idle_timeout", RD_OPT_SERVER, (rd_option_value){.seconds = -0.5},
          "idle_timeout must be a positive number of seconds, got -0.5");
  any_config c;
  char err[200];
  defaults(RD_OPT_SERVER, &c);
  /* Off is 0 where the kind allows it. */
  c.server.session.idle_timeout_ms = 7;
  CHECK_EQ_INT(store("idle_timeout", RD_OPT_SERVER, &c, (rd_option_value){.seconds = 0}, err), 0);
  CHECK_EQ_INT(c.server.session.idle_timeout_ms, 0);
  /* Clamped above, never rounded down to off below. */
  rd_option_value huge = {.seconds = INFINITY}, tiny = {.seconds = 1e-6};
  CHECK_EQ_INT(store("read_timeout", RD_OPT_SERVER, &c, huge, err), 0);
  CHECK_EQ_INT(c.server.session.read_timeout_ms, (uint64_t)(RD_OPT_MAX_SECONDS * 1000));
  CHECK_EQ_INT(store("read_timeout", RD_OPT_SERVER, &c, tiny, err), 0);
  CHECK_EQ_INT(c.server.session.read_timeout_ms, 1);
  CHECK_EQ_INT(store("idle_timeout", RD_OPT_SERVER, &c, tiny, err), 0);
  CHECK_EQ_INT(c.server.session.idle_timeout_ms, 1);
}

TEST(sizes_and_counts) {
  refused("max_message", RD_OPT_SERVER, (rd_option_value){.number = 0},
          "max_message must be between 1 and 4611686018427387904 bytes, got 0");
  refused("max_buffer", RD_OPT_CLIENT, (rd_option_value){.number = -5},
          "max_buffer must be between 1 and 4611686018427387904 bytes, got -5");
  refused("max_message", RD_OPT_SERVER, (rd_option_value){.number = INT64_MAX},
          "max_message must be between 1 and 4611686018427387904 bytes, got 9223372036854775807");
  refused("max_head", RD_OPT_SERVER, (rd_option_value){.number = (1 << 24) + 1},
          "max_head must be between 1 and 16777216 bytes, got 16777217");
  refused("max_headers", RD_OPT_SERVER, (rd_option_value){.number = 65},
          "max_headers must be between 1 and 64, got 65");
  refused("max_connections", RD_OPT_CLIENT, (rd_option_value){.number = 0},
          "max_connections must be between 1 and 4611686018427387904, got 0");
  any_config c;
  char err[200];
  defaults(RD_OPT_SERVER, &c);
  CHECK_EQ_INT(store("max_head", RD_OPT_SERVER, &c, (rd_option_value){.number = 1 << 24}, err), 0);
  CHECK_EQ_INT(c.server.max_head, 1 << 24);
  CHECK_EQ_INT(store("max_headers", RD_OPT_SERVER, &c, (rd_option_value){.number = 1}, err), 0);
  CHECK_EQ_INT(c.server.max_headers, 1);
  CHECK_EQ_INT(
      store("hard_cap", RD_OPT_SERVER, &c, (rd_option_value){.number = (int64_t)RD_OPT_MAX_SIZE},
            err),
      0);
  CHECK_EQ_INT(c.server.session.hard_cap, RD_OPT_MAX_SIZE);
}

TEST(text_kinds) {
  refused("auth_header", RD_OPT_SERVER, (rd_option_value){.text = "X Bad"},
          "auth_header must be an HTTP header name, got 'X Bad'");
  refused("auth_header", RD_OPT_SERVER, (rd_option_value){.text = ""},
          "auth_header must be an HTTP header name, got ''");
  refused("auth_header", RD_OPT_SERVER, (rd_option_value){.text = "X:Y"},
          "auth_header must be an HTTP header name, got 'X:Y'");
  refused("server_name", RD_OPT_CLIENT, (rd_option_value){.text = "a b"},
          "server_name must be a host name or address, got 'a b'");
  char longest[300];
  memset(longest, 'a', sizeof longest);
  longest[63] = '\0';
  any_config c;
  char err[200];
  defaults(RD_OPT_SERVER, &c);
  CHECK_EQ_INT(store("auth_header", RD_OPT_SERVER, &c, (rd_option_value){.text = longest}, err), 0);
  CHECK_EQ_INT(strlen(c.server.auth_header), 63);
  longest[63] = 'a';
  longest[64] = '\0';
  refused("auth_header", RD_OPT_SERVER, (rd_option_value){.text = longest},
          "auth_header must be at most 63 bytes, got 64");
  longest[64] = 'a';
  longest[255] = '\0';
  defaults(RD_OPT_CLIENT, &c);
  CHECK_EQ_INT(store("server_name", RD_OPT_CLIENT, &c, (rd_option_value){.text = longest}, err), 0);
  CHECK_EQ_INT(strlen(c.client.server_name), 255);
  longest[255] = 'a';
  longest[256] = '\0';
  refused("server_name", RD_OPT_CLIENT, (rd_option_value){.text = longest},
          "server_name must be at most 255 bytes, got 256");
}

TEST(objects_and_hand_parsed_rows) {
  CHECK(rd_option_find("ping_interval", RD_OPT_SERVER) == NULL);
  CHECK(rd_option_find("sync_grace", RD_OPT_CLIENT) == NULL);
  CHECK(rd_option_find("bogus", RD_OPT_SERVER | RD_OPT_CLIENT) == NULL);
  const rd_option *ping = rd_option_find("ping_interval", RD_OPT_CLIENT);
  const rd_option *cert = rd_option_find("tls_cert", RD_OPT_SERVER);
  CHECK(ping != NULL && cert != NULL);
  if (ping == NULL || cert == NULL)
    return;
  any_config c, before;
  defaults(RD_OPT_SERVER, &c);
  before = c;
  rd_option_value v = {.seconds = 1, .text = "x.pem"};
  char err[200];
  /* A row the object does not take, and a row parsed by hand, store nothing. */
  CHECK_EQ_INT(rd_option_store(ping, RD_OPT_SERVER, &c, &v, err, sizeof err), RD_EINVAL);
  CHECK_EQ_INT(rd_option_store(cert, RD_OPT_SERVER, &c, &v, err, sizeof err), RD_EINVAL);
  CHECK(memcmp(&c, &before, sizeof c) == 0);
  CHECK(strcmp(rd_option_kind_name(ping->kind), "seconds") == 0);
  CHECK(strcmp(rd_option_kind_expects(cert->kind), "a file path") == 0);
}

TEST(settle) {
  any_config c;
  defaults(RD_OPT_SERVER, &c);
  c.server.session.max_buffer = 100;
  c.server.session.hard_cap = 99;
  rd_options_settle(RD_OPT_SERVER, &c);
  CHECK_EQ_INT(c.server.session.hard_cap, 200);
  rd_options_settle(RD_OPT_SERVER, &c); /* already settled: unchanged */
  CHECK_EQ_INT(c.server.session.hard_cap, 200);
  defaults(RD_OPT_CLIENT, &c);
  c.client.backoff_min_ms = 3000;
  c.client.backoff_max_ms = 1000;
  rd_options_settle(RD_OPT_CLIENT, &c);
  CHECK_EQ_INT(c.client.backoff_max_ms, 3000);
  CHECK_EQ_INT(c.client.session.hard_cap, 1 << 26);
}

RD_TEST_MAIN(T(rows_are_well_formed), T(documented_defaults_are_the_configs),
             T(each_row_lands_in_its_field), T(named_fields), T(seconds), T(sizes_and_counts),
             T(text_kinds), T(objects_and_hand_parsed_rows), T(settle))
