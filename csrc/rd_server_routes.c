/* The server's read-only routes: /metrics (Prometheus text),
 * /debug/connections and /debug/peers (JSON). Each renders into a buffer it frees after
 * handing a copy to the response (rd_srv_http_respond copies what it
 * writes); nothing here outlives the call. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_server_int.h"
#include "rd_stats.h"

/* ---- /metrics ---- */

void rd_srv_handle_metrics(httpconn *hc) {
  size_t len = 0;
  rd_stats_refresh_gauges(hc->srv->metrics);
  char *text = rd_metrics_render(hc->srv->metrics, &len);
  if (text == NULL) {
    rd_srv_respond_text(hc, 500, "Internal Server Error", "out of memory");
    return;
  }
  rd_srv_http_respond(hc, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", text, len);
  rd_free(text);
}

/* ---- /debug/connections ---- */

typedef struct {
  char *p;
  size_t len, cap;
  int failed;
} textbuf;

static void tb_put(textbuf *b, const char *s, size_t n) {
  if (b->failed)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *p = rd_realloc(b->p, cap);
    if (p == NULL) {
      b->failed = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

static void tb_printf(textbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(textbuf *b, const char *fmt, ...) {
  char tmp[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0)
    tb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void tb_json_str(textbuf *b, const char *s) {
  tb_put(b, "\"", 1);
  for (; *s != '\0'; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      tb_printf(b, "\\%c", ch);
    else if (ch < 0x20)
      tb_printf(b, "\\u%04x", ch);
    else
      tb_put(b, (const char *)&ch, 1);
  }
  tb_put(b, "\"", 1);
}

/* Answers with the JSON in b (a 500 when it ran out of memory) and frees it. */
static void respond_json(httpconn *hc, textbuf *b) {
  if (b->failed)
    rd_srv_respond_text(hc, 500, "Internal Server Error", "out of memory");
  else
    rd_srv_http_respond(hc, 200, "OK", "application/json", b->p, b->len);
  rd_free(b->p);
}

typedef struct {
  textbuf *b;
  int first;
} debug_walk;

static void debug_conn_cb(void *ctx, const rd_conn_info *c) {
  debug_walk *w = ctx;
  tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
  w->first = 0;
  tb_printf(w->b, "{\"id\": %lld, \"clientkey\": ", (long long)c->id);
  tb_json_str(w->b, c->client_key);
  tb_printf(w->b, ", \"proto\": ");
  tb_json_str(w->b, c->proto);
  tb_printf(w->b, ", \"address\": ");
  tb_json_str(w->b, c->address);
  tb_printf(w->b,
            ", \"age\": %.3f, \"idle\": %.3f, \"state\": \"%s\", \"tx_bytes\": %llu, "
            "\"rx_bytes\": %llu, \"paused\": %s, \"buffered\": %zu}",
            c->age, c->idle, c->state, (unsigned long long)c->tx_bytes,
            (unsigned long long)c->rx_bytes, c->paused ? "true" : "false", c->buffered);
}

static void debug_session_cb(rd_map_node *n, void *ctx) {
  debug_walk *w = ctx;
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count; i++) {
    tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
    w->first = 0;
    tb_printf(w->b, "{\"clientkey\": ");
    tb_json_str(w->b, e->key);
    tb_printf(w->b, ", \"session_key\": %lld, \"connections\": %zu}",
              (long long)rd_session_key(e->sessions[i]), rd_session_conn_count(e->sessions[i]));
  }
}

/* What is open, session by session and connection by connection: the
 * answer to "what is leaking" without a debugger. */
void rd_srv_handle_debug(httpconn *hc) {
  textbuf b = {0};
  debug_walk w = {&b, 1};
  tb_printf(&b, "{\"sessions\": [");
  rd_map_foreach(&hc->srv->clients, debug_session_cb, &w);
  tb_printf(&b, "\n],\n\"connections\": [");
  w.first = 1;
  rd_server_foreach_conn(hc->srv, debug_conn_cb, &w);
  tb_printf(&b, "\n]}\n");
  respond_json(hc, &b);
}

/* ---- /debug/peers ---- */

static void debug_peer_cb(void *ctx, const rd_peer_info *p) {
  debug_walk *w = ctx;
  tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
  w->first = 0;
  tb_printf(w->b, "{\"id\": ");
  tb_json_str(w->b, p->id);
  tb_printf(w->b, ", \"url\": ");
  tb_json_str(w->b, p->url);
  tb_printf(w->b, ", \"state\": \"%s\", \"since\": %.3f, \"attempts\": %llu, \"last_error\": ",
            p->state, p->since, (unsigned long long)p->attempts);
  tb_json_str(w->b, p->last_error);
  tb_printf(w->b, ", \"inbound\": %zu, \"keys\": %zu}", p->inbound, p->keys);
}

/* Each configured peer: our link's state and what the peer announced. */
void rd_srv_handle_debug_peers(httpconn *hc) {
  textbuf b = {0};
  debug_walk w = {&b, 1};
  tb_printf(&b, "{\"peer_id\": ");
  tb_json_str(&b, hc->srv->cfg.peer_id);
  tb_printf(&b, ", \"peers\": [");
  rd_server_foreach_peer(hc->srv, debug_peer_cb, &w);
  tb_printf(&b, "\n]}\n");
  respond_json(hc, &b);
}
