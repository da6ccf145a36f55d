/* The engine's options: one table that the binding parses by, Python
 * validates by and the README documents from. Pure: no Python, no libuv; it
 * knows the config structs' layout only (rd_server_config, rd_client_config).
 *
 * Adding an option: one row in rd_options.c, the field in the config struct
 * (with its default in *_config_default), then regenerate the README tables
 * (`remotedialer-py options --readme README.md`). */
#ifndef RD_OPTIONS_H
#define RD_OPTIONS_H

#include "rd_common.h"

/* How a value is given and stored. Seconds are stored as uint64_t ms. */
typedef enum rd_option_kind {
  RD_OPT_SECONDS = 1, /* positive seconds, clamped to RD_OPT_MAX_SECONDS */
  RD_OPT_SECONDS_OFF, /* the same, or 0 for off */
  RD_OPT_SIZE,        /* bytes, 1..max */
  RD_OPT_COUNT,       /* a count, 1..max */
  RD_OPT_BOOL,        /* stored as int 0/1 */
  RD_OPT_HEADER,      /* an HTTP header name (RFC 7230 token), stored as char[] */
  RD_OPT_HOST,        /* a host name or address, stored as char[] */
  RD_OPT_PATH         /* a file path: loaded by the binding (TLS), never stored */
} rd_option_kind;

/* Which objects take an option (a bit set). */
enum { RD_OPT_SERVER = 1, RD_OPT_CLIENT = 2 };

/* No field: the binding parses the option by hand. */
#define RD_OPT_UNSTORED ((size_t)-1)
/* No tunnel deadline needs more (~31 years); ms stay far from overflow. */
#define RD_OPT_MAX_SECONDS 1e9
/* Sizes past this cannot be meant and would overflow size arithmetic. */
#define RD_OPT_MAX_SIZE ((uint64_t)1 << 62)

typedef struct rd_option {
  const char *name;
  rd_option_kind kind;
  unsigned objects;   /* RD_OPT_SERVER | RD_OPT_CLIENT */
  size_t server_off;  /* offset in rd_server_config, or RD_OPT_UNSTORED */
  size_t client_off;  /* offset in rd_client_config, or RD_OPT_UNSTORED */
  size_t field_size;  /* sizeof the field (text: its capacity with the NUL) */
  uint64_t max;       /* SIZE, COUNT: the largest value; text: longest length */
  uint64_t def;       /* default in the stored unit (ms, bytes, count, 0/1) */
  const char *def_text; /* the default in words when no number says it, or NULL */
  const char *meaning;  /* one line for the documentation */
  const char *limit;    /* what a peer past this limit gets, or NULL */
} rd_option;

extern const rd_option rd_options[];
extern const size_t rd_options_count;

/* The row for name that object takes, or NULL. */
const rd_option *rd_option_find(const char *name, unsigned object);

/* Where the option lives in object's config, or RD_OPT_UNSTORED. */
size_t rd_option_offset(const rd_option *o, unsigned object);

/* A given value; only the member for the option's kind is read. */
typedef struct rd_option_value {
  double seconds;   /* SECONDS, SECONDS_OFF */
  int64_t number;   /* SIZE, COUNT */
  int flag;         /* BOOL */
  const char *text; /* HEADER, HOST, PATH */
} rd_option_value;

/* Checks v against o's kind and range and writes it into cfg, an
 * rd_server_config (object RD_OPT_SERVER) or rd_client_config. Returns 0;
 * RD_EMALFORMED with a message naming the option in err when the value is out
 * of range or badly formed (cfg unchanged); RD_EINVAL when object does not
 * take o or o is hand-parsed. */
int rd_option_store(const rd_option *o, unsigned object, void *cfg, const rd_option_value *v,
                    char *err, size_t errlen);

/* Rules across options, applied once all are stored: hard_cap below
 * max_buffer becomes twice max_buffer; backoff_max below backoff_min
 * becomes backoff_min. */
void rd_options_settle(unsigned object, void *cfg);

/* "seconds", "size", ...: the kind's name as Python and the docs see it. */
const char *rd_option_kind_name(rd_option_kind kind);

/* What a value of the kind must be, for type errors: "a number of seconds". */
const char *rd_option_kind_expects(rd_option_kind kind);

#endif
