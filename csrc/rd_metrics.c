/* Prometheus metrics registry and its text exposition.
 *
 * Samples live in a chained hash table keyed by (family, label values) so the
 * hot path (a counter bump per DATA message) is one hash and one compare.
 * Each family also keeps its samples in an array sorted the way the Go client
 * library prints them, maintained on the rare insert, so iterating and
 * rendering need no scratch allocation and no sort. */
#include "rd_metrics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_alloc.h"

#define RD_METRICS_MAX_LABELS 3
#define RD_METRICS_MIN_BUCKETS 16

static const rd_metric_family_info families[RD_M__COUNT] = {
    [RD_M_ADD_WS_SESSION] = {"session_server_total_add_websocket_session",
                             "Total count of added websocket sessions", 0, 2,
                             {"clientkey", "peer", NULL}},
    [RD_M_REMOVE_WS_SESSION] = {"session_server_total_remove_websocket_session",
                                "Total count of removed websocket sessions", 0, 2,
                                {"clientkey", "peer", NULL}},
    [RD_M_ADD_CONNECTIONS] = {"session_server_total_add_connections",
                              "Total count of added connections", 0, 3,
                              {"clientkey", "proto", "addr"}},
    [RD_M_REMOVE_CONNECTIONS] = {"session_server_total_remove_connections",
                                 "Total count of removed connections", 0, 3,
                                 {"clientkey", "proto", "addr"}},
    [RD_M_TRANSMIT_BYTES] = {"session_server_total_transmit_bytes", "Total bytes transmitted",
                             0, 1, {"clientkey", NULL, NULL}},
    [RD_M_TRANSMIT_ERR_BYTES] = {"session_server_total_transmit_error_bytes",
                                 "Total error bytes transmitted", 0, 1,
                                 {"clientkey", NULL, NULL}},
    [RD_M_RECEIVE_BYTES] = {"session_server_total_receive_bytes", "Total bytes received", 0, 1,
                            {"clientkey", NULL, NULL}},
    [RD_M_PEER_WS_ATTEMPT] = {"session_server_total_peer_ws_attempt",
                              "Total count of attempts to establish websocket session to "
                              "other rancher-server",
                              0, 1, {"peer", NULL, NULL}},
    [RD_M_PEER_WS_CONNECTED] = {"session_server_total_peer_ws_connected",
                                "Total count of connected websocket sessions to other "
                                "rancher-server",
                                0, 1, {"peer", NULL, NULL}},
    [RD_M_PEER_WS_DISCONNECTED] = {"session_server_total_peer_ws_disconnected",
                                   "Total count of disconnected websocket sessions from other "
                                   "rancher-server",
                                   0, 1, {"peer", NULL, NULL}},
    [RD_M_OPEN_SESSIONS] = {"remotedialer_open_sessions", "Open tunnel sessions", 1, 1,
                            {"peer", NULL, NULL}},
    [RD_M_OPEN_CONNECTIONS] = {"remotedialer_open_connections", "Open tunneled connections", 1,
                               1, {"clientkey", NULL, NULL}},
    [RD_M_AGENT_ATTEMPTS] = {"remotedialer_agent_connect_attempts_total",
                             "Connection attempts of the agent, by server URL", 0, 1,
                             {"url", NULL, NULL}},
    [RD_M_AGENT_FAILURES] = {"remotedialer_agent_connect_failures_total",
                             "Failed connection attempts of the agent, by server URL", 0, 1,
                             {"url", NULL, NULL}},
    [RD_M_BUFFERED_BYTES] = {"remotedialer_buffered_bytes",
                             "Bytes queued in the engine, toward local sockets or the tunnel", 1,
                             1, {"direction", NULL, NULL}},
    [RD_M_HEAP_BYTES] = {"remotedialer_engine_heap_bytes", "Bytes allocated by the engine", 1, 0,
                         {NULL, NULL, NULL}},
    [RD_M_HEAP_OBJECTS] = {"remotedialer_engine_heap_objects", "Objects allocated by the engine",
                           1, 0, {NULL, NULL, NULL}},
    [RD_M_POOL_BYTES] = {"remotedialer_engine_pool_bytes",
                         "Bytes of the engine heap held idle in buffer pools", 1, 0,
                         {NULL, NULL, NULL}},
    [RD_M_LOOP_HANDLES] = {"remotedialer_loop_handles", "Handles alive on the engine's loop", 1,
                           0, {NULL, NULL, NULL}},
    [RD_M_PROCESS_RSS] = {"process_resident_memory_bytes", "Resident memory size in bytes.", 1,
                          0, {NULL, NULL, NULL}},
    [RD_M_PROCESS_FDS] = {"process_open_fds", "Number of open file descriptors.", 1, 0,
                          {NULL, NULL, NULL}},
};

/* One series. A server keeps several for every client key it ever saw, as
 * Go does: one allocation each, holding nothing that can be computed. */
typedef struct rd_metric_sample {
  struct rd_metric_sample *next; /* hash chain */
  uint64_t hash;
  double value;
  int family;
  uint32_t lens[RD_METRICS_MAX_LABELS];
  /* Label values in the family's caller order, each NUL-terminated, one
   * after the other (sample_values finds them). */
  char values[];
} rd_metric_sample;

typedef struct {
  rd_metric_sample **items; /* sorted as the exposition prints them */
  size_t len, cap;
} rd_metric_list;

struct rd_metrics {
  rd_metric_sample **buckets;
  size_t nbuckets; /* a power of two */
  size_t count;
  rd_metric_list lists[RD_M__COUNT];
};

const rd_metric_family_info *rd_metrics_family(int family) {
  if (family < 0 || family >= RD_M__COUNT)
    return NULL;
  return &families[family];
}

/* Points values[i] at the sample's i-th label value. */
static void sample_values(const rd_metric_sample *s, const char *values[RD_METRICS_MAX_LABELS]) {
  const char *p = s->values;
  for (size_t i = 0; i < families[s->family].num_labels; i++) {
    values[i] = p;
    p += s->lens[i] + 1;
  }
}

/* For each family, the positions of its labels sorted by label name: Go's
 * client library sorts a sample's label pairs by name, then orders samples by
 * those values pair by pair. Tiny, so computed on demand rather than cached in
 * mutable static state. */
static size_t sorted_label_order(int family, size_t order[RD_METRICS_MAX_LABELS]) {
  const rd_metric_family_info *f = &families[family];
  for (size_t i = 0; i < f->num_labels; i++) {
    size_t j = i;
    while (j > 0 && strcmp(f->labels[order[j - 1]], f->labels[i]) > 0) {
      order[j] = order[j - 1];
      j--;
    }
    order[j] = i;
  }
  return f->num_labels;
}

/* Families in name order (the Go registry's Gather sorts them by name). */
static void sorted_families(int out[RD_M__COUNT]) {
  for (int i = 0; i < RD_M__COUNT; i++) {
    int j = i;
    while (j > 0 && strcmp(families[out[j - 1]].name, families[i].name) > 0) {
      out[j] = out[j - 1];
      j--;
    }
    out[j] = i;
  }
}

/* Go compares strings bytewise; so does memcmp. Values may hold any byte but
 * NUL, so comparing the common prefix then the length is exact. */
static int cmp_bytes(const char *a, size_t alen, const char *b, size_t blen) {
  int c = memcmp(a, b, alen < blen ? alen : blen);
  if (c != 0)
    return c;
  return (alen > blen) - (alen < blen);
}

static int cmp_sample_values(int family, const rd_metric_sample *s, const char *const *values,
                             const size_t *lens) {
  size_t order[RD_METRICS_MAX_LABELS];
  size_t n = sorted_label_order(family, order);
  const char *have[RD_METRICS_MAX_LABELS];
  sample_values(s, have);
  for (size_t i = 0; i < n; i++) {
    size_t k = order[i];
    int c = cmp_bytes(have[k], s->lens[k], values[k], lens[k]);
    if (c != 0)
      return c;
  }
  return 0;
}

/* FNV-1a over the family and each value with its terminating NUL, so that
 * ("ab", "c") and ("a", "bc") hash apart. */
static uint64_t hash_key(int family, const char *const *values, const size_t *lens, size_t n) {
  uint64_t h = 1469598103934665603ULL;
  h = (h ^ (uint64_t)(unsigned)family) * 1099511628211ULL;
  for (size_t i = 0; i < n; i++) {
    const unsigned char *p = (const unsigned char *)values[i];
    for (size_t j = 0; j <= lens[i]; j++)
      h = (h ^ (j < lens[i] ? p[j] : 0u)) * 1099511628211ULL;
  }
  return h;
}

static int valid_key(int family, const char *const *values) {
  if (family < 0 || family >= RD_M__COUNT)
    return 0;
  size_t n = families[family].num_labels;
  if (n > 0 && values == NULL)
    return 0;
  for (size_t i = 0; i < n; i++)
    if (values[i] == NULL)
      return 0;
  return 1;
}

static rd_metric_sample *lookup(const rd_metrics *m, int family, const char *const *values,
                                const size_t *lens, uint64_t hash) {
  size_t n = families[family].num_labels;
  for (rd_metric_sample *s = m->buckets[hash & (m->nbuckets - 1)]; s != NULL; s = s->next) {
    if (s->hash != hash || s->family != family)
      continue;
    const char *p = s->values;
    size_t i = 0;
    while (i < n && s->lens[i] == lens[i] && memcmp(p, values[i], lens[i]) == 0)
      p += lens[i++] + 1;
    if (i == n)
      return s;
  }
  return NULL;
}

rd_metrics *rd_metrics_new(void) {
  rd_metrics *m = rd_calloc(1, sizeof *m);
  if (m == NULL)
    return NULL;
  m->buckets = rd_calloc(RD_METRICS_MIN_BUCKETS, sizeof *m->buckets);
  if (m->buckets == NULL) {
    rd_free(m);
    return NULL;
  }
  m->nbuckets = RD_METRICS_MIN_BUCKETS;
  return m;
}

void rd_metrics_free(rd_metrics *m) {
  if (m == NULL)
    return;
  for (size_t b = 0; b < m->nbuckets; b++) {
    rd_metric_sample *s = m->buckets[b];
    while (s != NULL) {
      rd_metric_sample *next = s->next;
      rd_free(s);
      s = next;
    }
  }
  for (int f = 0; f < RD_M__COUNT; f++)
    rd_free(m->lists[f].items);
  rd_free(m->buckets);
  rd_free(m);
}

/* Doubles the bucket array. A failed allocation is harmless: the table keeps
 * working with longer chains, so adding a sample never fails because of it. */
static void maybe_grow(rd_metrics *m) {
  if (m->count < m->nbuckets - m->nbuckets / 4 || m->nbuckets > SIZE_MAX / 2 / sizeof(void *))
    return;
  size_t nb = m->nbuckets * 2;
  rd_metric_sample **buckets = rd_calloc(nb, sizeof *buckets);
  if (buckets == NULL)
    return;
  for (size_t b = 0; b < m->nbuckets; b++) {
    rd_metric_sample *s = m->buckets[b];
    while (s != NULL) {
      rd_metric_sample *next = s->next;
      s->next = buckets[s->hash & (nb - 1)];
      buckets[s->hash & (nb - 1)] = s;
      s = next;
    }
  }
  rd_free(m->buckets);
  m->buckets = buckets;
  m->nbuckets = nb;
}

/* Position where a sample with these values belongs in its family's list. */
static size_t list_position(const rd_metric_list *l, int family, const char *const *values,
                            const size_t *lens) {
  size_t lo = 0, hi = l->len;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (cmp_sample_values(family, l->items[mid], values, lens) < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

static rd_metric_sample *insert(rd_metrics *m, int family, const char *const *values,
                                const size_t *lens, uint64_t hash) {
  size_t n = families[family].num_labels;
  rd_metric_list *l = &m->lists[family];
  if (l->len == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 8;
    if (cap > SIZE_MAX / sizeof *l->items)
      return NULL;
    rd_metric_sample **items = rd_realloc(l->items, cap * sizeof *items);
    if (items == NULL)
      return NULL;
    l->items = items;
    l->cap = cap;
  }

  size_t size = sizeof(rd_metric_sample);
  for (size_t i = 0; i < n; i++) {
    if (lens[i] > UINT32_MAX || lens[i] > SIZE_MAX - size - 1)
      return NULL;
    size += lens[i] + 1;
  }
  rd_metric_sample *s = rd_malloc(size);
  if (s == NULL)
    return NULL;
  memset(s, 0, sizeof *s);
  s->hash = hash;
  s->family = family;
  char *p = s->values;
  for (size_t i = 0; i < n; i++) {
    memcpy(p, values[i], lens[i]);
    p[lens[i]] = '\0';
    s->lens[i] = (uint32_t)lens[i];
    p += lens[i] + 1;
  }

  size_t pos = list_position(l, family, values, lens);
  memmove(&l->items[pos + 1], &l->items[pos], (l->len - pos) * sizeof *l->items);
  l->items[pos] = s;
  l->len++;

  size_t b = hash & (m->nbuckets - 1);
  s->next = m->buckets[b];
  m->buckets[b] = s;
  m->count++;
  maybe_grow(m);
  return s;
}

int rd_metrics_add(rd_metrics *m, int family, const char *const *values, double delta) {
  if (m == NULL || !valid_key(family, values))
    return RD_EMALFORMED;
  /* The Go library panics on a counter that would go down; refuse it. */
  if (!families[family].is_gauge && !(delta >= 0))
    return RD_EMALFORMED;
  size_t n = families[family].num_labels;
  size_t lens[RD_METRICS_MAX_LABELS] = {0};
  for (size_t i = 0; i < n; i++)
    lens[i] = strlen(values[i]);
  uint64_t hash = hash_key(family, values, lens, n);
  rd_metric_sample *s = lookup(m, family, values, lens, hash);
  if (s == NULL) {
    s = insert(m, family, values, lens, hash);
    if (s == NULL)
      return RD_ENOMEM;
  }
  s->value += delta;
  return RD_OK;
}

int rd_metrics_set(rd_metrics *m, int family, const char *const *values, double v) {
  return rd_metrics_add(m, family, values, v - rd_metrics_get(m, family, values));
}

double rd_metrics_get(const rd_metrics *m, int family, const char *const *values) {
  if (m == NULL || !valid_key(family, values))
    return 0;
  size_t n = families[family].num_labels;
  size_t lens[RD_METRICS_MAX_LABELS] = {0};
  for (size_t i = 0; i < n; i++)
    lens[i] = strlen(values[i]);
  const rd_metric_sample *s = lookup(m, family, values, lens, hash_key(family, values, lens, n));
  return s ? s->value : 0;
}

void rd_metrics_foreach(const rd_metrics *m, rd_metrics_sample_cb cb, void *ctx) {
  if (m == NULL || cb == NULL)
    return;
  int order[RD_M__COUNT];
  sorted_families(order);
  for (int i = 0; i < RD_M__COUNT; i++) {
    int f = order[i];
    const rd_metric_list *l = &m->lists[f];
    for (size_t j = 0; j < l->len; j++) {
      const char *values[RD_METRICS_MAX_LABELS];
      sample_values(l->items[j], values);
      cb(ctx, &families[f], values, l->items[j]->value);
    }
  }
}

/* ---- Number formatting: Go's strconv.FormatFloat(v, 'g', -1, 64). ---- */

/* Parses "d.ddde±x" from snprintf into bare digits and Go's decimal point
 * position (value = 0.digits * 10^dp). Skips whatever the locale uses as the
 * radix character. Returns the number of digits. */
static int parse_sci(const char *s, char *digits, int *dp) {
  int nd = 0;
  const char *p = s;
  for (; *p != '\0' && *p != 'e'; p++)
    if (*p >= '0' && *p <= '9')
      digits[nd++] = *p;
  *dp = (*p == 'e' ? atoi(p + 1) : 0) + 1;
  return nd;
}

/* Reads digits (as 0.digits * 10^dp) back as a double. The string has no
 * radix character, so strtod's locale dependence cannot matter. */
static double read_back(const char *digits, int nd, int dp) {
  char buf[48];
  snprintf(buf, sizeof buf, "%.*se%d", nd, digits, dp - nd);
  return strtod(buf, NULL);
}

/* The shortest digit string that reads back as v (finite, > 0), and among
 * those the closest to v: what Go's Ryu-based formatter produces. For each
 * length n, the only n-digit candidates that can lie in v's rounding interval
 * are v's two n-digit neighbours. snprintf gives the nearer one (ties to even,
 * as Go); near a power of two the interval is lopsided, so when the nearer
 * one misses, the farther one may still hit and is tried too. */
static int shortest_digits(double v, char digits[24], int *dp) {
  char buf[48];
  for (int n = 1; n <= 17; n++) {
    snprintf(buf, sizeof buf, "%.*e", n - 1, v);
    int nd = parse_sci(buf, digits, dp);
    double r = read_back(digits, nd, *dp);
    if (r == v)
      return nd;
    int i = nd - 1;
    if (r < v) { /* the nearer neighbour is below: try one unit up */
      while (i >= 0 && digits[i] == '9')
        digits[i--] = '0';
      if (i >= 0) {
        digits[i]++;
      } else {
        digits[0] = '1';
        (*dp)++;
      }
    } else { /* above: try one unit down */
      while (i >= 0 && digits[i] == '0')
        digits[i--] = '9';
      digits[i]--; /* i >= 0: %e never prints a leading 0 for v > 0 */
      if (digits[0] == '0') {
        memmove(digits, digits + 1, (size_t)nd - 1);
        digits[nd - 1] = '9';
        (*dp)--;
      }
    }
    if (read_back(digits, nd, *dp) == v)
      return nd;
  }
  /* Not reached: 17 significant digits always read back exactly. */
  snprintf(buf, sizeof buf, "%.16e", v);
  return parse_sci(buf, digits, dp);
}

size_t rd_metrics_format_float(char *out, double v) {
  char *p = out;
  if (isnan(v) || isinf(v)) {
    const char *s = isnan(v) ? "NaN" : v > 0 ? "+Inf" : "-Inf";
    size_t n = strlen(s);
    memcpy(out, s, n + 1);
    return n;
  }
  if (signbit(v)) {
    *p++ = '-';
    v = -v;
  }
  if (v == 0) {
    *p++ = '0';
    *p = '\0';
    return (size_t)(p - out);
  }

  char d[24];
  int dp;
  int nd = shortest_digits(v, d, &dp);
  while (nd > 1 && d[nd - 1] == '0')
    nd--;

  /* Go's 'g' with shortest precision: %e when the exponent is < -4 or >= 6
   * (not >= the digit count), with at least two exponent digits. */
  int exp = dp - 1;
  if (exp < -4 || exp >= 6) {
    *p++ = d[0];
    if (nd > 1) {
      *p++ = '.';
      memcpy(p, d + 1, (size_t)nd - 1);
      p += nd - 1;
    }
    *p++ = 'e';
    *p++ = exp < 0 ? '-' : '+';
    if (exp < 0)
      exp = -exp;
    if (exp >= 100)
      *p++ = (char)('0' + exp / 100);
    *p++ = (char)('0' + exp / 10 % 10);
    *p++ = (char)('0' + exp % 10);
  } else {
    if (dp > 0) {
      for (int i = 0; i < dp; i++)
        *p++ = i < nd ? d[i] : '0';
    } else {
      *p++ = '0';
    }
    int frac = nd > dp ? nd - dp : 0;
    if (frac > 0) {
      *p++ = '.';
      for (int i = 0; i < frac; i++) {
        int j = dp + i;
        *p++ = j >= 0 && j < nd ? d[j] : '0';
      }
    }
  }
  *p = '\0';
  return (size_t)(p - out);
}

/* ---- Exposition ---- */

/* Appends to a buffer, or only counts when buf is NULL, so rendering is two
 * passes over the same code and one exact allocation. */
typedef struct {
  char *buf;
  size_t len;
} rd_out;

static void out_bytes(rd_out *o, const char *s, size_t n) {
  if (o->buf != NULL)
    memcpy(o->buf + o->len, s, n);
  o->len += n;
}

static void out_str(rd_out *o, const char *s) { out_bytes(o, s, strlen(s)); }

/* Go's expfmt escapes backslash and newline in HELP, and also the double
 * quote in label values. */
static void out_escaped(rd_out *o, const char *s, size_t n, int quote) {
  size_t start = 0;
  for (size_t i = 0; i < n; i++) {
    const char *rep = NULL;
    if (s[i] == '\\')
      rep = "\\\\";
    else if (s[i] == '\n')
      rep = "\\n";
    else if (quote && s[i] == '"')
      rep = "\\\"";
    if (rep != NULL) {
      out_bytes(o, s + start, i - start);
      out_bytes(o, rep, 2);
      start = i + 1;
    }
  }
  out_bytes(o, s + start, n - start);
}

static void render_into(const rd_metrics *m, rd_out *o) {
  int order[RD_M__COUNT];
  sorted_families(order);
  for (int i = 0; i < RD_M__COUNT; i++) {
    int f = order[i];
    const rd_metric_family_info *fi = &families[f];
    const rd_metric_list *l = &m->lists[f];
    if (l->len == 0)
      continue;
    out_str(o, "# HELP ");
    out_str(o, fi->name);
    out_str(o, " ");
    out_escaped(o, fi->help, strlen(fi->help), 0);
    out_str(o, "\n# TYPE ");
    out_str(o, fi->name);
    out_str(o, fi->is_gauge ? " gauge\n" : " counter\n");

    size_t lorder[RD_METRICS_MAX_LABELS];
    size_t n = sorted_label_order(f, lorder);
    for (size_t j = 0; j < l->len; j++) {
      const rd_metric_sample *s = l->items[j];
      const char *values[RD_METRICS_MAX_LABELS];
      sample_values(s, values);
      out_str(o, fi->name);
      for (size_t k = 0; k < n; k++) {
        size_t li = lorder[k];
        out_str(o, k == 0 ? "{" : ",");
        out_str(o, fi->labels[li]);
        out_str(o, "=\"");
        out_escaped(o, values[li], s->lens[li], 1);
        out_str(o, "\"");
      }
      if (n > 0)
        out_str(o, "}");
      out_str(o, " ");
      /* expfmt writes -0 as 0 (it tests f == 0 before formatting). */
      char num[32];
      if (s->value == 0)
        out_str(o, "0");
      else
        out_bytes(o, num, rd_metrics_format_float(num, s->value));
      out_str(o, "\n");
    }
  }
}

char *rd_metrics_render(const rd_metrics *m, size_t *len) {
  rd_out o = {NULL, 0};
  if (m != NULL)
    render_into(m, &o);
  char *buf = rd_malloc(o.len + 1);
  if (buf == NULL)
    return NULL;
  o.buf = buf;
  o.len = 0;
  if (m != NULL)
    render_into(m, &o);
  buf[o.len] = '\0';
  if (len != NULL)
    *len = o.len;
  return buf;
}
