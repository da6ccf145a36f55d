/* Each API call is a small context struct plus a function that runs on the
 * loop thread; api_call carries it across. */
#include "rd_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_stats.h"

typedef struct api_cmd {
  rd_cmd cmd;
  void (*fn)(struct api_cmd *a, void *ctx);
  void *ctx;
} api_cmd;

static void api_run(rd_cmd *c) {
  api_cmd *a = (api_cmd *)c;
  a->fn(a, a->ctx);
}

/* Runs fn(ctx) on the loop thread; fn must call rd_cmd_finish(&a->cmd, ...)
 * now or later. Copies the command's error text into err. */
static int api_call(void (*fn)(api_cmd *, void *), void *ctx, char *err, size_t errlen) {
  api_cmd a;
  memset(&a, 0, sizeof a);
  a.cmd.run = api_run;
  a.fn = fn;
  a.ctx = ctx;
  int rc = rd_engine_call(&a.cmd);
  if (err != NULL && errlen > 0)
    snprintf(err, errlen, "%s", a.cmd.error);
  return rc;
}

static void finish_closed(api_cmd *a) { rd_cmd_finish(&a->cmd, RD_ECLOSED, "object is closed"); }

/* ---- server ---- */

typedef struct {
  const char *host;
  int port;
  const rd_server_config *cfg;
  uint64_t handle;
  int port_out;
} server_new_ctx;

static void server_new_fn(api_cmd *a, void *p) {
  server_new_ctx *c = p;
  rd_server *srv;
  char err[256] = "";
  int rc = rd_server_start(c->host, c->port, c->cfg, &srv, &c->port_out, err, sizeof err);
  if (rc == RD_OK)
    c->handle = rd_server_handle(srv);
  rd_cmd_finish(&a->cmd, rc, err);
}

int rd_api_server_new(const char *host, int port, const rd_server_config *cfg,
                      uint64_t *handle, int *port_out, char *err, size_t errlen) {
  server_new_ctx c = {host, port, cfg, 0, 0};
  int rc = api_call(server_new_fn, &c, err, errlen);
  *handle = c.handle;
  *port_out = c.port_out;
  return rc;
}

static void close_fn(api_cmd *a, void *p) {
  rd_object *obj = rd_object_find(*(uint64_t *)p, 0);
  if (obj == NULL)
    rd_cmd_finish(&a->cmd, RD_OK, NULL);
  else
    obj->close(obj, &a->cmd);
}

int rd_api_close(uint64_t handle) {
  if (rd_handle_is_stale(handle))
    return RD_OK; /* the parent's object: the parent closes it */
  return api_call(close_fn, &handle, NULL, 0);
}

typedef struct {
  uint64_t handle;
  rd_server_dial_req req;
} dial_ctx;

static void dial_fn(api_cmd *a, void *p) {
  dial_ctx *c = p;
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL) {
    finish_closed(a);
    return;
  }
  c->req.cmd = &a->cmd;
  rd_server_dial(srv, &c->req);
}

int rd_api_server_dial(uint64_t handle, const char *client_key, const char *proto,
                       const char *address, uint64_t timeout_ms, uint64_t idle_timeout_ms,
                       int *fd, int64_t *conn_id, rd_dial_status **status, char *err,
                       size_t errlen) {
  dial_ctx c = {handle, {.client_key = client_key, .proto = proto, .address = address,
                         .idle_timeout_ms = idle_timeout_ms, .timeout_ms = timeout_ms, .fd = -1}};
  int rc = api_call(dial_fn, &c, err, errlen);
  *fd = c.req.fd;
  *conn_id = c.req.conn_id;
  *status = c.req.status;
  return rc;
}

typedef struct {
  uint64_t handle;
  const char *key, *proto, *address, *host;
  int port;
  uint64_t fhandle;
  int port_out;
} forward_ctx;

static void forward_fn(api_cmd *a, void *p) {
  forward_ctx *c = p;
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL) {
    finish_closed(a);
    return;
  }
  char err[256] = "";
  int rc = rd_server_forward(srv, c->key, c->proto, c->address, c->host, c->port, &c->fhandle,
                             &c->port_out, err, sizeof err);
  rd_cmd_finish(&a->cmd, rc, err);
}

int rd_api_server_forward(uint64_t handle, const char *client_key, const char *proto,
                          const char *address, const char *host, int port, uint64_t *fhandle,
                          int *port_out, char *err, size_t errlen) {
  forward_ctx c = {handle, client_key, proto, address, host, port, 0, 0};
  int rc = api_call(forward_fn, &c, err, errlen);
  *fhandle = c.fhandle;
  *port_out = c.port_out;
  return rc;
}

typedef struct {
  const rd_sforward_config *cfg;
  uint64_t fhandle;
  int port_out;
} sforward_ctx;

static void sforward_fn(api_cmd *a, void *p) {
  sforward_ctx *c = p;
  char err[256] = "";
  int rc = rd_sforward_start(c->cfg, &c->fhandle, &c->port_out, err, sizeof err);
  rd_cmd_finish(&a->cmd, rc, err);
}

int rd_api_stream_forward(const rd_sforward_config *cfg, uint64_t *fhandle, int *port_out,
                          char *err, size_t errlen) {
  sforward_ctx c = {cfg, 0, 0};
  int rc = api_call(sforward_fn, &c, err, errlen);
  *fhandle = c.fhandle;
  *port_out = c.port_out;
  return rc;
}

typedef struct {
  uint64_t handle;
  rd_sforward_stats *out;
} sforward_stats_ctx;

static void sforward_stats_fn(api_cmd *a, void *p) {
  sforward_stats_ctx *c = p;
  rd_sforward *f = (rd_sforward *)rd_object_find(c->handle, RD_OBJ_STREAM_FORWARD);
  if (f == NULL) {
    finish_closed(a);
    return;
  }
  rd_sforward_get_stats(f, c->out);
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_stream_forward_stats(uint64_t handle, rd_sforward_stats *out) {
  sforward_stats_ctx c = {handle, out};
  return api_call(sforward_stats_fn, &c, NULL, 0);
}

typedef struct {
  uint64_t handle;
  const char *cert, *key, *ca;
} reload_ctx;

static void reload_fn(api_cmd *a, void *p) {
  reload_ctx *c = p;
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL) {
    finish_closed(a);
    return;
  }
  char err[256] = "";
  int rc = rd_server_reload_tls(srv, c->cert, c->key, c->ca, err, sizeof err);
  rd_cmd_finish(&a->cmd, rc, err);
}

int rd_api_server_reload_tls(uint64_t handle, const char *cert, const char *key,
                             const char *client_ca, char *err, size_t errlen) {
  reload_ctx c = {handle, cert, key, client_ca};
  return api_call(reload_fn, &c, err, errlen);
}

typedef struct {
  uint64_t handle;
  rd_tokens *tokens;
} tokens_ctx;

static void tokens_fn(api_cmd *a, void *p) {
  tokens_ctx *c = p;
  rd_tokens *tokens = c->tokens;
  c->tokens = NULL; /* consumed here, whatever happens */
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL) {
    rd_tokens_free(tokens);
    finish_closed(a);
    return;
  }
  rd_cmd_finish(&a->cmd, rd_server_set_tokens(srv, tokens), NULL);
}

int rd_api_server_set_tokens(uint64_t handle, rd_tokens *tokens) {
  tokens_ctx c = {handle, tokens};
  int rc = api_call(tokens_fn, &c, NULL, 0);
  rd_tokens_free(c.tokens); /* still ours when the command never ran */
  return rc;
}

/* ---- lists ---- */

/* Makes room for one more element in a growing array; 0 or RD_ENOMEM. */
static int reserve_one(void *items_ptr, size_t count, size_t *cap, size_t elem) {
  void **items = items_ptr;
  if (count < *cap)
    return RD_OK;
  size_t ncap = *cap ? *cap * 2 : 16;
  void *p = rd_realloc(*items, ncap * elem);
  if (p == NULL)
    return RD_ENOMEM;
  *items = p;
  *cap = ncap;
  return RD_OK;
}

typedef struct {
  rd_string_list *l;
  size_t cap;
  int failed;
} strings_ctx;

static void add_key_cb(void *ctx, const char *key) {
  strings_ctx *c = ctx;
  if (c->failed)
    return;
  if (reserve_one(&c->l->items, c->l->count, &c->cap, sizeof *c->l->items) != RD_OK) {
    c->failed = 1;
    return;
  }
  char *copy = rd_strndup(key, strlen(key));
  if (copy == NULL) {
    c->failed = 1;
    return;
  }
  c->l->items[c->l->count++] = copy;
}

typedef struct {
  uint64_t handle;
  rd_string_list *out;
} clients_ctx;

static void clients_fn(api_cmd *a, void *p) {
  clients_ctx *c = p;
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL) {
    finish_closed(a);
    return;
  }
  strings_ctx s = {c->out, 0, 0};
  rd_server_foreach_client(srv, add_key_cb, &s);
  rd_cmd_finish(&a->cmd, s.failed ? RD_ENOMEM : RD_OK, NULL);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

int rd_api_server_clients(uint64_t handle, rd_string_list *out) {
  out->items = NULL;
  out->count = 0;
  clients_ctx c = {handle, out};
  int rc = api_call(clients_fn, &c, NULL, 0);
  if (rc != RD_OK) {
    rd_string_list_free(out);
    return rc;
  }
  if (out->count > 1) /* qsort(NULL, 0, ...) is undefined */
    qsort(out->items, out->count, sizeof *out->items, cmp_str);
  return RD_OK;
}

void rd_string_list_free(rd_string_list *l) {
  for (size_t i = 0; i < l->count; i++)
    rd_free(l->items[i]);
  rd_free(l->items);
  l->items = NULL;
  l->count = 0;
}

typedef struct {
  uint64_t handle;
  const char *key;
  int result;
} has_ctx;

static void has_fn(api_cmd *a, void *p) {
  has_ctx *c = p;
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL) {
    finish_closed(a);
    return;
  }
  c->result = rd_server_has_session(srv, c->key);
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_server_has_session(uint64_t handle, const char *client_key, int *out) {
  has_ctx c = {handle, client_key, 0};
  int rc = api_call(has_fn, &c, NULL, 0);
  *out = c.result;
  return rc;
}

typedef struct {
  uint64_t handle;
  rd_conn_list *out;
  size_t cap;
  int failed;
} conns_ctx;

static void add_conn_cb(void *ctx, const rd_conn_info *info) {
  conns_ctx *c = ctx;
  if (c->failed)
    return;
  if (reserve_one(&c->out->items, c->out->count, &c->cap, sizeof *c->out->items) != RD_OK) {
    c->failed = 1;
    return;
  }
  rd_conn_info *d = &c->out->items[c->out->count];
  *d = *info;
  /* The strings must outlive the loop's structures: copy them together. */
  size_t kl = strlen(info->client_key), pl = strlen(info->proto), al = strlen(info->address);
  char *s = rd_malloc(kl + pl + al + 3);
  if (s == NULL) {
    c->failed = 1;
    return;
  }
  memcpy(s, info->client_key, kl + 1);
  memcpy(s + kl + 1, info->proto, pl + 1);
  memcpy(s + kl + pl + 2, info->address, al + 1);
  d->client_key = s;
  d->proto = s + kl + 1;
  d->address = s + kl + pl + 2;
  c->out->count++;
}

static void conns_fn(api_cmd *a, void *p) {
  conns_ctx *c = p;
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL) {
    finish_closed(a);
    return;
  }
  rd_server_foreach_conn(srv, add_conn_cb, c);
  rd_cmd_finish(&a->cmd, c->failed ? RD_ENOMEM : RD_OK, NULL);
}

int rd_api_server_connections(uint64_t handle, rd_conn_list *out) {
  out->items = NULL;
  out->count = 0;
  conns_ctx c = {handle, out, 0, 0};
  int rc = api_call(conns_fn, &c, NULL, 0);
  if (rc != RD_OK)
    rd_conn_list_free(out);
  return rc;
}

void rd_conn_list_free(rd_conn_list *l) {
  for (size_t i = 0; i < l->count; i++)
    rd_free((char *)l->items[i].client_key);
  rd_free(l->items);
  l->items = NULL;
  l->count = 0;
}

/* ---- peering ---- */

typedef struct {
  uint64_t handle;
  const char *url, *id, *token, *key;
  int result;
  size_t count;
  rd_peer_list *out;
  size_t cap;
  int failed;
  char route[RD_API_ROUTE_MAX];
} peer_ctx;

static rd_server *peer_server(api_cmd *a, peer_ctx *c) {
  rd_server *srv = (rd_server *)rd_object_find(c->handle, RD_OBJ_SERVER);
  if (srv == NULL)
    finish_closed(a);
  return srv;
}

static void add_peer_fn(api_cmd *a, void *p) {
  peer_ctx *c = p;
  rd_server *srv = peer_server(a, c);
  if (srv == NULL)
    return;
  char err[256] = "";
  int rc = rd_server_add_peer(srv, c->url, c->id, c->token, err, sizeof err);
  rd_cmd_finish(&a->cmd, rc, err);
}

int rd_api_server_add_peer(uint64_t handle, const char *url, const char *id, const char *token,
                           char *err, size_t errlen) {
  peer_ctx c = {.handle = handle, .url = url, .id = id, .token = token};
  return api_call(add_peer_fn, &c, err, errlen);
}

static void remove_peer_fn(api_cmd *a, void *p) {
  peer_ctx *c = p;
  rd_server *srv = peer_server(a, c);
  if (srv == NULL)
    return;
  c->result = rd_server_remove_peer(srv, c->id);
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_server_remove_peer(uint64_t handle, const char *id, int *removed) {
  peer_ctx c = {.handle = handle, .id = id};
  int rc = api_call(remove_peer_fn, &c, NULL, 0);
  *removed = c.result;
  return rc;
}

static void add_peer_info_cb(void *ctx, const rd_peer_info *info) {
  peer_ctx *c = ctx;
  if (c->failed)
    return;
  if (reserve_one(&c->out->items, c->out->count, &c->cap, sizeof *c->out->items) != RD_OK) {
    c->failed = 1;
    return;
  }
  rd_peer_info *d = &c->out->items[c->out->count];
  *d = *info;
  /* One allocation for the strings, which must outlive the loop's peer. */
  size_t il = strlen(info->id), ul = strlen(info->url), el = strlen(info->last_error);
  char *s = rd_malloc(il + ul + el + 3);
  if (s == NULL) {
    c->failed = 1;
    return;
  }
  memcpy(s, info->id, il + 1);
  memcpy(s + il + 1, info->url, ul + 1);
  memcpy(s + il + ul + 2, info->last_error, el + 1);
  d->id = s;
  d->url = s + il + 1;
  d->last_error = s + il + ul + 2;
  c->out->count++;
}

static void peers_fn(api_cmd *a, void *p) {
  peer_ctx *c = p;
  rd_server *srv = peer_server(a, c);
  if (srv == NULL)
    return;
  rd_server_foreach_peer(srv, add_peer_info_cb, c);
  rd_cmd_finish(&a->cmd, c->failed ? RD_ENOMEM : RD_OK, NULL);
}

int rd_api_server_peers(uint64_t handle, rd_peer_list *out) {
  out->items = NULL;
  out->count = 0;
  peer_ctx c = {.handle = handle, .out = out};
  int rc = api_call(peers_fn, &c, NULL, 0);
  if (rc != RD_OK)
    rd_peer_list_free(out);
  return rc;
}

void rd_peer_list_free(rd_peer_list *l) {
  for (size_t i = 0; i < l->count; i++)
    rd_free((char *)l->items[i].id);
  rd_free(l->items);
  l->items = NULL;
  l->count = 0;
}

static void disconnect_fn(api_cmd *a, void *p) {
  peer_ctx *c = p;
  rd_server *srv = peer_server(a, c);
  if (srv == NULL)
    return;
  c->count = rd_server_disconnect(srv, c->key);
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_server_disconnect(uint64_t handle, const char *client_key, size_t *ended) {
  peer_ctx c = {.handle = handle, .key = client_key};
  int rc = api_call(disconnect_fn, &c, NULL, 0);
  *ended = c.count;
  return rc;
}

static void close_idle_fn(api_cmd *a, void *p) {
  peer_ctx *c = p;
  rd_server *srv = peer_server(a, c);
  if (srv == NULL)
    return;
  c->count = rd_server_close_idle(srv);
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_server_close_idle(uint64_t handle, size_t *closed) {
  peer_ctx c = {.handle = handle};
  int rc = api_call(close_idle_fn, &c, NULL, 0);
  *closed = c.count;
  return rc;
}

static void route_fn(api_cmd *a, void *p) {
  peer_ctx *c = p;
  rd_server *srv = peer_server(a, c);
  if (srv == NULL)
    return;
  const char *via = rd_server_route(srv, c->key);
  c->result = via != NULL;
  snprintf(c->route, sizeof c->route, "%s", via != NULL ? via : "");
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_server_route(uint64_t handle, const char *client_key, int *found, char *via,
                        size_t vialen) {
  peer_ctx c = {.handle = handle, .key = client_key};
  int rc = api_call(route_fn, &c, NULL, 0);
  *found = c.result;
  snprintf(via, vialen, "%s", c.route);
  return rc;
}

/* ---- client ---- */

typedef struct {
  const char *const *urls;
  size_t nurls;
  const char *headers;
  const rd_client_config *cfg;
  uint64_t handle;
} client_new_ctx;

static void client_new_fn(api_cmd *a, void *p) {
  client_new_ctx *c = p;
  rd_client *cli;
  char err[256] = "";
  int rc = rd_client_start(c->urls, c->nurls, c->headers, c->cfg, &cli, err, sizeof err);
  if (rc == RD_OK)
    c->handle = rd_client_handle(cli);
  rd_cmd_finish(&a->cmd, rc, err);
}

int rd_api_client_new_urls(const char *const *urls, size_t nurls, const char *headers,
                           const rd_client_config *cfg, uint64_t *handle, char *err,
                           size_t errlen) {
  client_new_ctx c = {urls, nurls, headers, cfg, 0};
  int rc = api_call(client_new_fn, &c, err, errlen);
  *handle = c.handle;
  return rc;
}

int rd_api_client_new(const char *url, const char *headers, const rd_client_config *cfg,
                      uint64_t *handle, char *err, size_t errlen) {
  return rd_api_client_new_urls(&url, 1, headers, cfg, handle, err, errlen);
}

typedef struct {
  uint64_t handle;
  uint64_t timeout_ms;
} wait_ctx;

static void wait_fn(api_cmd *a, void *p) {
  wait_ctx *c = p;
  rd_client *cli = (rd_client *)rd_object_find(c->handle, RD_OBJ_CLIENT);
  if (cli == NULL) {
    finish_closed(a);
    return;
  }
  rd_client_wait_connected(cli, &a->cmd, c->timeout_ms);
}

int rd_api_client_wait_connected(uint64_t handle, uint64_t timeout_ms, int *connected) {
  wait_ctx c = {handle, timeout_ms};
  int rc = api_call(wait_fn, &c, NULL, 0);
  *connected = rc == 1;
  return rc < 0 ? rc : RD_OK;
}

typedef struct {
  uint64_t handle;
  int connected;
  char error[256];
  char url[512];
} state_ctx;

static void state_fn(api_cmd *a, void *p) {
  state_ctx *c = p;
  rd_client *cli = (rd_client *)rd_object_find(c->handle, RD_OBJ_CLIENT);
  if (cli == NULL) {
    finish_closed(a);
    return;
  }
  c->connected = rd_client_is_connected(cli);
  snprintf(c->error, sizeof c->error, "%s", rd_client_last_error(cli));
  snprintf(c->url, sizeof c->url, "%s", rd_client_url(cli));
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_client_state_url(uint64_t handle, int *connected, char *last_error, size_t errlen,
                            char *url, size_t urllen) {
  state_ctx c = {handle, 0, "", ""};
  int rc = api_call(state_fn, &c, NULL, 0);
  *connected = c.connected;
  if (last_error != NULL)
    snprintf(last_error, errlen, "%s", c.error);
  if (url != NULL)
    snprintf(url, urllen, "%s", c.url);
  return rc;
}

int rd_api_client_state(uint64_t handle, int *connected, char *last_error, size_t errlen) {
  return rd_api_client_state_url(handle, connected, last_error, errlen, NULL, 0);
}

/* ---- metrics ---- */

static rd_metrics *metrics_of(uint64_t handle) {
  rd_object *obj = rd_object_find(handle, 0);
  if (obj == NULL)
    return NULL;
  if (obj->kind == RD_OBJ_SERVER)
    return rd_server_metrics((rd_server *)obj);
  if (obj->kind == RD_OBJ_CLIENT)
    return rd_client_metrics((rd_client *)obj);
  return NULL;
}

typedef struct {
  uint64_t handle;
  rd_sample_list *out;
  size_t cap;
  int failed;
} samples_ctx;

static void add_sample_cb(void *ctx, const rd_metric_family_info *family,
                          const char *const *values, double value) {
  samples_ctx *c = ctx;
  if (c->failed)
    return;
  if (reserve_one(&c->out->items, c->out->count, &c->cap, sizeof *c->out->items) != RD_OK) {
    c->failed = 1;
    return;
  }
  rd_sample *s = &c->out->items[c->out->count];
  memset(s, 0, sizeof *s);
  s->family = family;
  s->value = value;
  for (size_t i = 0; i < family->num_labels; i++) {
    s->values[i] = rd_strndup(values[i], strlen(values[i]));
    if (s->values[i] == NULL)
      c->failed = 1;
  }
  c->out->count++;
}

static void samples_fn(api_cmd *a, void *p) {
  samples_ctx *c = p;
  rd_metrics *m = metrics_of(c->handle);
  if (m == NULL) {
    finish_closed(a);
    return;
  }
  rd_stats_refresh_gauges(m);
  rd_metrics_foreach(m, add_sample_cb, c);
  rd_cmd_finish(&a->cmd, c->failed ? RD_ENOMEM : RD_OK, NULL);
}

int rd_api_metrics(uint64_t handle, rd_sample_list *out) {
  out->items = NULL;
  out->count = 0;
  samples_ctx c = {handle, out, 0, 0};
  int rc = api_call(samples_fn, &c, NULL, 0);
  if (rc != RD_OK)
    rd_sample_list_free(out);
  return rc;
}

void rd_sample_list_free(rd_sample_list *l) {
  for (size_t i = 0; i < l->count; i++)
    for (size_t j = 0; j < 3; j++)
      rd_free(l->items[i].values[j]);
  rd_free(l->items);
  l->items = NULL;
  l->count = 0;
}

typedef struct {
  uint64_t handle;
  char *text;
  size_t len;
} prom_ctx;

static void prom_fn(api_cmd *a, void *p) {
  prom_ctx *c = p;
  rd_metrics *m = metrics_of(c->handle);
  if (m == NULL) {
    finish_closed(a);
    return;
  }
  rd_stats_refresh_gauges(m);
  c->text = rd_metrics_render(m, &c->len);
  rd_cmd_finish(&a->cmd, c->text != NULL ? RD_OK : RD_ENOMEM, NULL);
}

int rd_api_prometheus(uint64_t handle, char **text, size_t *len) {
  prom_ctx c = {handle, NULL, 0};
  int rc = api_call(prom_fn, &c, NULL, 0);
  *text = c.text;
  *len = c.len;
  return rc;
}

static void stats_fn(api_cmd *a, void *p) {
  rd_stats_collect(p);
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_stats(rd_stats *out) { return api_call(stats_fn, out, NULL, 0); }

static void trim_fn(api_cmd *a, void *p) {
  (void)p;
  rd_block_pool_trim();
  rd_session_trim_pools();
  rd_cmd_finish(&a->cmd, RD_OK, NULL);
}

int rd_api_trim(void) { return api_call(trim_fn, NULL, NULL, 0); }

/* ---- calls posted without waiting ---- */

typedef enum { OP_DIAL, OP_CLOSE, OP_WAIT } op_kind;

struct rd_api_op {
  api_cmd a; /* first: the loop thread finishes &a.cmd */
  op_kind kind;
  int early; /* completed in rd_api_op_post, never queued */
  union {
    dial_ctx dial;
    uint64_t handle; /* close */
    wait_ctx wait;
  };
  int connected;
  char strings[]; /* a dial's key, proto and address */
};

static rd_api_op *op_new(op_kind kind, void (*fn)(api_cmd *, void *), size_t extra) {
  rd_api_op *op = rd_calloc(1, sizeof *op + extra);
  if (op == NULL)
    return NULL;
  op->kind = kind;
  op->a.cmd.run = api_run;
  op->a.fn = fn;
  op->a.ctx = &op->dial; /* the union's address, whichever member */
  return op;
}

rd_api_op *rd_api_op_dial(uint64_t handle, const char *client_key, const char *proto,
                          const char *address, uint64_t timeout_ms, uint64_t idle_timeout_ms) {
  size_t kl = strlen(client_key), pl = strlen(proto), al = strlen(address);
  rd_api_op *op = op_new(OP_DIAL, dial_fn, kl + pl + al + 3);
  if (op == NULL)
    return NULL;
  char *s = op->strings;
  memcpy(s, client_key, kl + 1);
  memcpy(s + kl + 1, proto, pl + 1);
  memcpy(s + kl + pl + 2, address, al + 1);
  op->dial = (dial_ctx){handle,
                        {.client_key = s, .proto = s + kl + 1, .address = s + kl + pl + 2,
                         .idle_timeout_ms = idle_timeout_ms, .timeout_ms = timeout_ms, .fd = -1}};
  return op;
}

rd_api_op *rd_api_op_close(uint64_t handle) {
  rd_api_op *op = op_new(OP_CLOSE, close_fn, 0);
  if (op != NULL)
    op->handle = handle;
  return op;
}

rd_api_op *rd_api_op_wait_connected(uint64_t handle, uint64_t timeout_ms) {
  rd_api_op *op = op_new(OP_WAIT, wait_fn, 0);
  if (op != NULL)
    op->wait = (wait_ctx){handle, timeout_ms};
  return op;
}

int rd_api_op_post(rd_api_op *op, int notify_fd) {
  if (op->kind == OP_CLOSE && rd_handle_is_stale(op->handle)) {
    op->early = 1; /* the parent's object: the parent closes it */
    op->a.cmd.status = RD_OK;
    return 0;
  }
  if (rd_engine_post(&op->a.cmd, notify_fd) != RD_OK) {
    op->early = 1; /* status and error say why */
    return 0;
  }
  return 1;
}

int rd_api_op_done(rd_api_op *op) { return op->early || rd_cmd_done(&op->a.cmd); }

int rd_api_op_status(const rd_api_op *op, char *err, size_t errlen) {
  int rc = op->a.cmd.status;
  if (err != NULL && errlen > 0)
    snprintf(err, errlen, "%s", op->a.cmd.error);
  /* wait_connected finishes with 1 when connected (rd_api_client_wait_connected) */
  return op->kind == OP_WAIT && rc > 0 ? RD_OK : rc;
}

int rd_api_op_connected(const rd_api_op *op) { return op->kind == OP_WAIT && op->a.cmd.status == 1; }

void rd_api_op_take_dial(rd_api_op *op, int *fd, int64_t *conn_id, rd_dial_status **status) {
  if (op->kind != OP_DIAL) {
    *fd = -1;
    *conn_id = 0;
    *status = NULL;
    return;
  }
  *fd = op->dial.req.fd;
  *conn_id = op->dial.req.conn_id;
  *status = op->dial.req.status;
  op->dial.req.fd = -1;
  op->dial.req.status = NULL;
}

void rd_api_op_free(rd_api_op *op) {
  if (op == NULL)
    return;
  if (op->kind == OP_DIAL) {
    if (op->dial.req.fd >= 0)
      close(op->dial.req.fd); /* ends the connection on the engine's side */
    if (op->dial.req.status != NULL)
      rd_dial_status_unref(op->dial.req.status);
  }
  rd_free(op);
}
