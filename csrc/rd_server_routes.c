/* The server's read-only routes: /metrics (Prometheus text),
 * /debug/connections and /debug/peers (JSON). Each renders into a buffer it frees after
 * handing a copy to the response (rd_srv_http_respond copies what it
 * writes); nothing here outlives the call. */
#include <string.h>

#include "rd_alloc.h"
#include "rd_server_int.h"
#include "rd_stats.h"
#include "rd_textbuf.h"

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
  rd_tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
  w->first = 0;
  rd_tb_printf(w->b, "{\"id\": %lld, \"clientkey\": ", (long long)c->id);
  rd_tb_json_str(w->b, c->client_key);
  rd_tb_printf(w->b, ", \"proto\": ");
  rd_tb_json_str(w->b, c->proto);
  rd_tb_printf(w->b, ", \"address\": ");
  rd_tb_json_str(w->b, c->address);
  rd_tb_printf(w->b,
            ", \"age\": %.3f, \"idle\": %.3f, \"state\": \"%s\", \"tx_bytes\": %llu, "
            "\"rx_bytes\": %llu, \"paused\": %s, \"buffered\": %zu}",
            c->age, c->idle, c->state, (unsigned long long)c->tx_bytes,
            (unsigned long long)c->rx_bytes, c->paused ? "true" : "false", c->buffered);
}

static void debug_session_cb(rd_map_node *n, void *ctx) {
  debug_walk *w = ctx;
  client_entry *e = (client_entry *)n;
  for (size_t i = 0; i < e->count; i++) {
    rd_tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
    w->first = 0;
    rd_tb_printf(w->b, "{\"clientkey\": ");
    rd_tb_json_str(w->b, e->key);
    rd_tb_printf(w->b, ", \"session_key\": %lld, \"connections\": %zu}",
              (long long)rd_session_key(e->sessions[i]), rd_session_conn_count(e->sessions[i]));
  }
}

/* What is open, session by session and connection by connection: the
 * answer to "what is leaking" without a debugger. */
void rd_srv_handle_debug(httpconn *hc) {
  textbuf b = {0};
  debug_walk w = {&b, 1};
  rd_tb_printf(&b, "{\"sessions\": [");
  rd_map_foreach(&hc->srv->clients, debug_session_cb, &w);
  rd_tb_printf(&b, "\n],\n\"connections\": [");
  w.first = 1;
  rd_server_foreach_conn(hc->srv, debug_conn_cb, &w);
  rd_tb_printf(&b, "\n]}\n");
  respond_json(hc, &b);
}

/* ---- /debug/peers ---- */

static void debug_peer_cb(void *ctx, const rd_peer_info *p) {
  debug_walk *w = ctx;
  rd_tb_put(w->b, w->first ? "\n  " : ",\n  ", w->first ? 3 : 4);
  w->first = 0;
  rd_tb_printf(w->b, "{\"id\": ");
  rd_tb_json_str(w->b, p->id);
  rd_tb_printf(w->b, ", \"url\": ");
  rd_tb_json_str(w->b, p->url);
  rd_tb_printf(w->b, ", \"state\": \"%s\", \"since\": %.3f, \"attempts\": %llu, \"last_error\": ",
            p->state, p->since, (unsigned long long)p->attempts);
  rd_tb_json_str(w->b, p->last_error);
  rd_tb_printf(w->b, ", \"inbound\": %zu, \"keys\": %zu}", p->inbound, p->keys);
}

/* Each configured peer: our link's state and what the peer announced. */
void rd_srv_handle_debug_peers(httpconn *hc) {
  textbuf b = {0};
  debug_walk w = {&b, 1};
  rd_tb_printf(&b, "{\"peer_id\": ");
  rd_tb_json_str(&b, hc->srv->cfg.peer_id);
  rd_tb_printf(&b, ", \"peers\": [");
  rd_server_foreach_peer(hc->srv, debug_peer_cb, &w);
  rd_tb_printf(&b, "\n]}\n");
  respond_json(hc, &b);
}
