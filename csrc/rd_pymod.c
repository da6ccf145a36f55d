/* remotedialer_py._engine: the CPython binding. Every call that waits on the
 * loop thread releases the GIL; nothing here runs on the loop thread. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_api.h"
#include "rd_block.h"
#include "rd_options.h"
#include "rd_tls.h"
#include "rd_tokens.h"
#include "rd_trace.h"

typedef struct {
  PyObject *TunnelError;
  PyObject *ClientNotFoundError;
  PyObject *ClosedError;
  PyObject *TunnelTimeoutError;
} module_state;

static module_state *get_state(PyObject *module) { return PyModule_GetState(module); }

/* Raises the exception that matches code, with message (or the code's text). */
static PyObject *raise_rc(PyObject *module, int rc, const char *message) {
  module_state *st = get_state(module);
  PyObject *type = st->TunnelError;
  if (rc == RD_ENOSESSION)
    type = st->ClientNotFoundError;
  else if (rc == RD_ECLOSED)
    type = st->ClosedError;
  else if (rc == RD_ETIMEDOUT)
    type = st->TunnelTimeoutError;
  PyErr_SetString(type, message != NULL && message[0] != '\0' ? message : rd_strerror(rc));
  return NULL;
}

/* ---- option dicts ---- */

/* Reads opts[o->name] as o's kind into *v: 1 when given, 0 when absent or
 * None, -1 with an exception. Text points into opts, which outlives v. */
static int option_value(PyObject *opts, const rd_option *o, rd_option_value *v) {
  PyObject *x = PyDict_GetItemString(opts, o->name);
  if (x == NULL || x == Py_None)
    return 0;
  memset(v, 0, sizeof *v);
  int ok, overflow = 0;
  switch (o->kind) {
  case RD_OPT_SECONDS:
  case RD_OPT_SECONDS_OFF:
    ok = !PyBool_Check(x) && (PyLong_Check(x) || PyFloat_Check(x));
    if (ok && (v->seconds = PyFloat_AsDouble(x)) == -1.0 && PyErr_Occurred())
      return -1;
    break;
  case RD_OPT_SIZE:
  case RD_OPT_COUNT:
    ok = !PyBool_Check(x) && PyLong_Check(x);
    if (ok && (v->number = PyLong_AsLongLongAndOverflow(x, &overflow)) == -1 && PyErr_Occurred())
      return -1;
    if (overflow != 0) /* out of any range: the store reports it */
      v->number = overflow > 0 ? INT64_MAX : INT64_MIN;
    break;
  case RD_OPT_BOOL:
    ok = PyBool_Check(x);
    v->flag = x == Py_True;
    break;
  default:
    ok = PyUnicode_Check(x);
    if (ok && (v->text = PyUnicode_AsUTF8(x)) == NULL)
      return -1;
  }
  if (!ok) {
    PyErr_Format(PyExc_ValueError, "%s must be %s, not %s", o->name,
                 rd_option_kind_expects(o->kind), Py_TYPE(x)->tp_name);
    return -1;
  }
  return 1;
}

/* Stores every table option that object keeps in cfg and opts gives, with
 * the table's checks; the rest are parsed by hand below. */
static int table_options(PyObject *opts, unsigned object, void *cfg) {
  for (size_t i = 0; i < rd_options_count; i++) {
    const rd_option *o = &rd_options[i];
    if (rd_option_offset(o, object) == RD_OPT_UNSTORED)
      continue;
    rd_option_value v;
    int given = option_value(opts, o, &v);
    if (given < 0)
      return -1;
    char err[200];
    if (given && rd_option_store(o, object, cfg, &v, err, sizeof err) != RD_OK) {
      PyErr_SetString(PyExc_ValueError, err);
      return -1;
    }
  }
  rd_options_settle(object, cfg);
  return 0;
}

static int opt_bool(PyObject *opts, const char *key, int *out) {
  PyObject *v = opts != NULL ? PyDict_GetItemString(opts, key) : NULL;
  if (v == NULL || v == Py_None)
    return 0;
  int b = PyObject_IsTrue(v);
  if (b < 0)
    return -1;
  *out = b;
  return 0;
}

static int opt_str(PyObject *opts, const char *key, char *out, size_t outlen) {
  PyObject *v = opts != NULL ? PyDict_GetItemString(opts, key) : NULL;
  if (v == NULL || v == Py_None)
    return 0;
  const char *s = PyUnicode_AsUTF8(v);
  if (s == NULL)
    return -1;
  if (strlen(s) >= outlen) {
    PyErr_Format(PyExc_ValueError, "%s is too long", key);
    return -1;
  }
  memcpy(out, s, strlen(s) + 1);
  return 0;
}

/* An optional string option: NULL when absent or None. The pointer lives as
 * long as opts does. */
static int opt_cstr(PyObject *opts, const char *key, const char **out) {
  PyObject *v = opts != NULL ? PyDict_GetItemString(opts, key) : NULL;
  *out = NULL;
  if (v == NULL || v == Py_None)
    return 0;
  if (PyBytes_Check(v) || PyByteArray_Check(v)) {
    PyErr_Format(PyExc_TypeError, "%s must be a str path", key);
    return -1;
  }
  PyObject *path = PyOS_FSPath(v);
  if (path == NULL)
    return -1;
  *out = PyUnicode_AsUTF8(path);
  Py_DECREF(path); /* still referenced by opts when it was a str */
  if (*out == NULL)
    return -1;
  if (!PyUnicode_Check(v)) {
    PyErr_Format(PyExc_TypeError, "%s must be a str path", key);
    return -1;
  }
  return 0;
}

/* Appends item (a new reference, or NULL after a failure) to list, giving
 * the reference up; any failure drops the list. Returns list, or NULL. */
static PyObject *list_take(PyObject *list, PyObject *item) {
  if (list == NULL || item == NULL || PyList_Append(list, item) < 0)
    Py_CLEAR(list);
  Py_XDECREF(item);
  return list;
}

/* ---- server ---- */

static PyObject *py_server_new(PyObject *module, PyObject *args) {
  const char *host;
  int port;
  PyObject *opts;
  if (!PyArg_ParseTuple(args, "siO!:server_new", &host, &port, &PyDict_Type, &opts))
    return NULL;
  rd_server_config cfg;
  rd_server_config_default(&cfg);
  char auth[16] = "header";
  /* path and auth come from the Server's own parameters. */
  if (opt_bool(opts, "events", &cfg.events) < 0 ||
      opt_bool(opts, "conn_events", &cfg.conn_events) < 0 ||
      opt_str(opts, "path", cfg.path, sizeof cfg.path) < 0 ||
      opt_str(opts, "auth", auth, sizeof auth) < 0 ||
      opt_str(opts, "peer_id", cfg.peer_id, sizeof cfg.peer_id) < 0 ||
      opt_str(opts, "peer_token", cfg.peer_token, sizeof cfg.peer_token) < 0 ||
      opt_str(opts, "dashboard_user", cfg.dashboard_user, sizeof cfg.dashboard_user) < 0 ||
      opt_str(opts, "dashboard_password", cfg.dashboard_password,
              sizeof cfg.dashboard_password) < 0 ||
      table_options(opts, RD_OPT_SERVER, &cfg) < 0)
    return NULL;
  /* The page's bytes: read by Python from the package, copied at start. */
  PyObject *html = PyDict_GetItemString(opts, "dashboard_html");
  if (html != NULL && html != Py_None) {
    if (!PyBytes_Check(html)) {
      PyErr_SetString(PyExc_TypeError, "dashboard_html must be bytes");
      return NULL;
    }
    cfg.dashboard_html = PyBytes_AS_STRING(html);
    cfg.dashboard_html_len = (size_t)PyBytes_GET_SIZE(html);
  }
  if (strcmp(auth, "callback") == 0) {
    cfg.auth_mode = RD_AUTH_CALLBACK;
  } else if (strcmp(auth, "token") == 0) {
    cfg.auth_mode = RD_AUTH_TOKEN;
    const char *text = NULL;
    if (opt_cstr(opts, "tokens", &text) < 0)
      return NULL;
    char terr[160];
    cfg.tokens = rd_tokens_parse(text != NULL ? text : "", text != NULL ? strlen(text) : 0, terr,
                                 sizeof terr);
    if (cfg.tokens == NULL) {
      PyErr_Format(PyExc_ValueError, "tokens: %s", terr);
      return NULL;
    }
  } else if (strcmp(auth, "header") != 0) {
    PyErr_Format(PyExc_ValueError, "auth must be 'header', 'callback' or 'token', not %R",
                 PyDict_GetItemString(opts, "auth"));
    return NULL;
  }
  if (cfg.path[0] != '/') {
    PyErr_SetString(PyExc_ValueError, "path must start with '/'");
    return NULL;
  }
  const char *cert, *key, *client_ca;
  if (opt_cstr(opts, "tls_cert", &cert) < 0 || opt_cstr(opts, "tls_key", &key) < 0 ||
      opt_cstr(opts, "tls_client_ca", &client_ca) < 0) {
    rd_tokens_free(cfg.tokens);
    return NULL;
  }
  uint64_t handle = 0;
  int bound = 0, rc;
  char err[256];
  if (cert != NULL || key != NULL) {
    if (cert == NULL || key == NULL) {
      rd_tokens_free(cfg.tokens);
      PyErr_SetString(PyExc_ValueError, "tls_cert and tls_key go together");
      return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    cfg.tls = rd_tls_ctx_new_server(cert, key, client_ca, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (cfg.tls == NULL) {
      rd_tokens_free(cfg.tokens);
      return raise_rc(module, RD_ETLS, err);
    }
  } else if (client_ca != NULL) {
    rd_tokens_free(cfg.tokens);
    PyErr_SetString(PyExc_ValueError, "tls_client_ca needs tls_cert and tls_key");
    return NULL;
  }
  const char *proxy_ca;
  int proxy_insecure = 0;
  if (opt_cstr(opts, "proxy_ca_file", &proxy_ca) < 0 ||
      opt_bool(opts, "proxy_insecure", &proxy_insecure) < 0) {
    rd_tokens_free(cfg.tokens);
    if (cfg.tls != NULL)
      rd_tls_ctx_unref(cfg.tls);
    return NULL;
  }
  if (proxy_ca != NULL || proxy_insecure) {
    Py_BEGIN_ALLOW_THREADS
    cfg.proxy_tls = rd_tls_ctx_new_client(proxy_ca, proxy_insecure, NULL, NULL, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (cfg.proxy_tls == NULL) {
      rd_tokens_free(cfg.tokens);
      if (cfg.tls != NULL)
        rd_tls_ctx_unref(cfg.tls);
      return raise_rc(module, RD_ETLS, err);
    }
  }
  const char *peer_ca;
  rc = opt_cstr(opts, "peer_ca_file", &peer_ca);
  if (rc == 0 && peer_ca != NULL) {
    Py_BEGIN_ALLOW_THREADS
    cfg.peer_tls = rd_tls_ctx_new_client(peer_ca, 0, NULL, NULL, err, sizeof err);
    Py_END_ALLOW_THREADS
  }
  if (rc < 0 || (peer_ca != NULL && cfg.peer_tls == NULL)) {
    rd_tokens_free(cfg.tokens);
    if (cfg.tls != NULL)
      rd_tls_ctx_unref(cfg.tls);
    if (cfg.proxy_tls != NULL)
      rd_tls_ctx_unref(cfg.proxy_tls);
    return rc < 0 ? NULL : raise_rc(module, RD_ETLS, err);
  }
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_new(host, port, &cfg, &handle, &bound, err, sizeof err);
  Py_END_ALLOW_THREADS
  if (cfg.tls != NULL)
    rd_tls_ctx_unref(cfg.tls); /* the server holds its own reference */
  if (cfg.proxy_tls != NULL)
    rd_tls_ctx_unref(cfg.proxy_tls);
  if (cfg.peer_tls != NULL)
    rd_tls_ctx_unref(cfg.peer_tls);
  if (rc != RD_OK)
    return raise_rc(module, rc, err);
  return Py_BuildValue("(Ki)", (unsigned long long)handle, bound);
}

static PyObject *py_server_reload_tls(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *cert, *key, *client_ca = NULL;
  if (!PyArg_ParseTuple(args, "Kss|z:server_reload_tls", &handle, &cert, &key, &client_ca))
    return NULL;
  int rc;
  char err[256];
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_reload_tls(handle, cert, key, client_ca, err, sizeof err);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, err);
  Py_RETURN_NONE;
}

static PyObject *py_server_set_tokens(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *text;
  Py_ssize_t len;
  if (!PyArg_ParseTuple(args, "Ks#:server_set_tokens", &handle, &text, &len))
    return NULL;
  char err[160];
  rd_tokens *t = rd_tokens_parse(text, (size_t)len, err, sizeof err);
  if (t == NULL) {
    PyErr_Format(PyExc_ValueError, "tokens: %s", err);
    return NULL;
  }
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_set_tokens(handle, t);
  Py_END_ALLOW_THREADS
  if (rc == RD_EMALFORMED) {
    PyErr_SetString(PyExc_ValueError, "the server does not use token authorization");
    return NULL;
  }
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  Py_RETURN_NONE;
}

static void status_capsule_free(PyObject *cap) {
  rd_dial_status_unref(PyCapsule_GetPointer(cap, "remotedialer_py.dial_status"));
}

static PyObject *py_server_dial(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *key, *proto, *address;
  double timeout = 0, idle = 0;
  if (!PyArg_ParseTuple(args, "Ksss|dd:server_dial", &handle, &key, &proto, &address, &timeout,
                        &idle))
    return NULL;
  if (idle < 0 || timeout < 0) {
    PyErr_SetString(PyExc_ValueError, idle < 0 ? "idle_timeout must not be negative"
                                               : "timeout must not be negative");
    return NULL;
  }
  int fd = -1, rc;
  int64_t conn_id = 0;
  rd_dial_status *st = NULL;
  char err[256];
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_dial(handle, key, proto, address, (uint64_t)(timeout * 1000.0),
                          (uint64_t)(idle * 1000.0), &fd, &conn_id, &st, err, sizeof err);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, err);
  PyObject *cap = PyCapsule_New(st, "remotedialer_py.dial_status", status_capsule_free);
  if (cap == NULL) {
    rd_dial_status_unref(st);
    close(fd);
    return NULL;
  }
  return Py_BuildValue("(iLN)", fd, (long long)conn_id, cap);
}

static PyObject *py_dial_status(PyObject *module, PyObject *cap) {
  (void)module;
  rd_dial_status *st = PyCapsule_GetPointer(cap, "remotedialer_py.dial_status");
  if (st == NULL)
    return NULL;
  int ended = atomic_load(&st->ended);
  if (!ended || st->error[0] == '\0')
    return Py_BuildValue("(OO)", ended ? Py_False : Py_True, Py_None);
  return Py_BuildValue("(Os)", Py_False, st->error);
}

static PyObject *py_server_forward(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *key, *proto, *address, *host;
  int port;
  if (!PyArg_ParseTuple(args, "Kssssi:server_forward", &handle, &key, &proto, &address, &host,
                        &port))
    return NULL;
  uint64_t fh = 0;
  int bound = 0, rc;
  char err[256];
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_forward(handle, key, proto, address, host, port, &fh, &bound, err, sizeof err);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, err);
  return Py_BuildValue("(Ki)", (unsigned long long)fh, bound);
}

/* stream_forward(url, key, proto, address, host, port, headers, ca_file,
 * timeout_ms) -> (handle, port): a remote forward through url's stream route. */
static PyObject *py_stream_forward(PyObject *module, PyObject *args) {
  rd_sforward_config cfg = {0};
  const char *ca_file;
  unsigned long long timeout_ms;
  if (!PyArg_ParseTuple(args, "sssssiszK:stream_forward", &cfg.server_url, &cfg.key, &cfg.proto,
                        &cfg.address, &cfg.host, &cfg.port, &cfg.headers, &ca_file, &timeout_ms))
    return NULL;
  cfg.timeout_ms = timeout_ms;
  char err[256];
  uint64_t fh = 0;
  int bound = 0, rc = RD_OK;
  Py_BEGIN_ALLOW_THREADS
  if (strncmp(cfg.server_url, "https://", 8) == 0 &&
      (cfg.tls = rd_tls_ctx_new_client(ca_file, 0, NULL, NULL, err, sizeof err)) == NULL)
    rc = RD_ETLS;
  if (rc == RD_OK)
    rc = rd_api_stream_forward(&cfg, &fh, &bound, err, sizeof err);
  if (cfg.tls != NULL)
    rd_tls_ctx_unref(cfg.tls);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, err);
  return Py_BuildValue("(Ki)", (unsigned long long)fh, bound);
}

static PyObject *py_stream_forward_stats(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:stream_forward_stats", &handle))
    return NULL;
  rd_sforward_stats st;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_stream_forward_stats(handle, &st);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, "object is closed");
  return Py_BuildValue("{sKsKsKsKss}", "accepted", (unsigned long long)st.accepted, "joined",
                       (unsigned long long)st.joined, "failed", (unsigned long long)st.failed,
                       "open", (unsigned long long)st.open, "last_error", st.last_error);
}

static PyObject *py_server_clients(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:server_clients", &handle))
    return NULL;
  rd_string_list l;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_clients(handle, &l);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  PyObject *list = PyList_New(0);
  for (size_t i = 0; list != NULL && i < l.count; i++) {
    if (i > 0 && strcmp(l.items[i], l.items[i - 1]) == 0)
      continue;
    PyObject *s = PyUnicode_FromString(l.items[i]);
    list = list_take(list, s);
  }
  rd_string_list_free(&l);
  return list;
}

static PyObject *py_server_has_session(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *key;
  if (!PyArg_ParseTuple(args, "Ks:server_has_session", &handle, &key))
    return NULL;
  int has = 0, rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_has_session(handle, key, &has);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  return PyBool_FromLong(has);
}

/* ---- peering ---- */

static PyObject *py_server_add_peer(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *url, *id, *token;
  if (!PyArg_ParseTuple(args, "Ksss:server_add_peer", &handle, &url, &id, &token))
    return NULL;
  int rc;
  char err[256];
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_add_peer(handle, url, id, token, err, sizeof err);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, err);
  Py_RETURN_NONE;
}

static PyObject *py_server_remove_peer(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *id;
  if (!PyArg_ParseTuple(args, "Ks:server_remove_peer", &handle, &id))
    return NULL;
  int rc, removed = 0;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_remove_peer(handle, id, &removed);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  return PyBool_FromLong(removed);
}

static PyObject *py_server_peers(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:server_peers", &handle))
    return NULL;
  rd_peer_list l;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_peers(handle, &l);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  PyObject *list = PyList_New(0);
  for (size_t i = 0; list != NULL && i < l.count; i++) {
    rd_peer_info *p = &l.items[i];
    PyObject *d = Py_BuildValue("{s:s,s:s,s:s,s:d,s:K,s:s,s:n,s:n}", "id", p->id, "url", p->url,
                                "state", p->state, "since", p->since, "attempts",
                                (unsigned long long)p->attempts, "last_error", p->last_error,
                                "inbound", (Py_ssize_t)p->inbound, "keys", (Py_ssize_t)p->keys);
    list = list_take(list, d);
  }
  rd_peer_list_free(&l);
  return list;
}

static PyObject *py_server_disconnect(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *key;
  if (!PyArg_ParseTuple(args, "Ks:server_disconnect", &handle, &key))
    return NULL;
  int rc;
  size_t ended = 0;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_disconnect(handle, key, &ended);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  return PyLong_FromSize_t(ended);
}

static PyObject *py_server_close_idle(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:server_close_idle", &handle))
    return NULL;
  int rc;
  size_t closed = 0;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_close_idle(handle, &closed);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  return PyLong_FromSize_t(closed);
}

static PyObject *py_server_route(PyObject *module, PyObject *args) {
  unsigned long long handle;
  const char *key;
  if (!PyArg_ParseTuple(args, "Ks:server_route", &handle, &key))
    return NULL;
  int rc, found = 0;
  char via[RD_API_ROUTE_MAX];
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_route(handle, key, &found, via, sizeof via);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  if (!found)
    Py_RETURN_NONE;
  return PyUnicode_FromString(via);
}

static PyObject *py_server_connections(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:server_connections", &handle))
    return NULL;
  rd_conn_list l;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_server_connections(handle, &l);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  PyObject *list = PyList_New(0);
  for (size_t i = 0; list != NULL && i < l.count; i++) {
    rd_conn_info *c = &l.items[i];
    PyObject *d = Py_BuildValue(
        "{s:L,s:s,s:s,s:s,s:d,s:d,s:s,s:K,s:K,s:O,s:n}", "id", (long long)c->id, "clientkey",
        c->client_key, "proto", c->proto, "address", c->address, "age", c->age, "idle", c->idle,
        "state",
        c->state, "tx_bytes", (unsigned long long)c->tx_bytes, "rx_bytes",
        (unsigned long long)c->rx_bytes, "paused", c->paused ? Py_True : Py_False, "buffered",
        (Py_ssize_t)c->buffered);
    list = list_take(list, d);
  }
  rd_conn_list_free(&l);
  return list;
}

/* ---- client ---- */

/* Server URLs one agent may try. */
#define RD_PY_MAX_URLS 64

static PyObject *client_new_impl(PyObject *module, const char *const *urls, size_t nurls,
                                 const char *const *proxies, int any_wss, PyObject *headers,
                                 PyObject *opts) {
  rd_client_config cfg;
  rd_client_config_default(&cfg);
  cfg.proxies = proxies;
  char allow[16] = "all";
  if (opt_bool(opts, "events", &cfg.events) < 0 || opt_bool(opts, "dialer", &cfg.dialer) < 0 ||
      opt_bool(opts, "conn_events", &cfg.conn_events) < 0 ||
      opt_str(opts, "allow", allow, sizeof allow) < 0 ||
      table_options(opts, RD_OPT_CLIENT, &cfg) < 0)
    return NULL;
  if (strcmp(allow, "all") == 0) {
    cfg.allow_mode = RD_ALLOW_ALL;
  } else if (strcmp(allow, "patterns") == 0) {
    cfg.allow_mode = RD_ALLOW_PATTERNS;
  } else if (strcmp(allow, "callback") == 0) {
    cfg.allow_mode = RD_ALLOW_CALLBACK;
  } else {
    PyErr_SetString(PyExc_ValueError, "allow must be 'all', 'patterns' or 'callback'");
    return NULL;
  }
  /* Headers: a list of (name, value) pairs, rendered as request lines. */
  PyObject *seq = PySequence_Fast(headers, "headers must be a sequence of (name, value) pairs");
  if (seq == NULL)
    return NULL;
  PyObject *lines = PyUnicode_FromString("");
  for (Py_ssize_t i = 0; lines != NULL && i < PySequence_Fast_GET_SIZE(seq); i++) {
    const char *name, *value;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ss", &name, &value)) {
      Py_CLEAR(lines);
      break;
    }
    if (strpbrk(name, "\r\n:") != NULL || strpbrk(value, "\r\n") != NULL || name[0] == '\0') {
      PyErr_Format(PyExc_ValueError, "invalid header %R", PySequence_Fast_GET_ITEM(seq, i));
      Py_CLEAR(lines);
      break;
    }
    PyObject *line = PyUnicode_FromFormat("%s: %s\r\n", name, value);
    PyObject *joined = line != NULL ? PyUnicode_Concat(lines, line) : NULL;
    Py_XDECREF(line);
    Py_SETREF(lines, joined);
  }
  Py_DECREF(seq);
  if (lines == NULL)
    return NULL;
  /* Patterns. */
  PyObject *pats = PyDict_GetItemString(opts, "patterns");
  PyObject *pseq = NULL;
  char **patterns = NULL;
  if (cfg.allow_mode == RD_ALLOW_PATTERNS && pats != NULL) {
    pseq = PySequence_Fast(pats, "patterns must be a sequence of strings");
    if (pseq == NULL) {
      Py_DECREF(lines);
      return NULL;
    }
    cfg.npatterns = (size_t)PySequence_Fast_GET_SIZE(pseq);
    patterns = PyMem_Calloc(cfg.npatterns + 1, sizeof *patterns);
    for (size_t i = 0; patterns != NULL && i < cfg.npatterns; i++) {
      patterns[i] = (char *)PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(pseq, (Py_ssize_t)i));
      if (patterns[i] == NULL) {
        PyMem_Free(patterns);
        Py_DECREF(pseq);
        Py_DECREF(lines);
        return NULL;
      }
    }
    cfg.patterns = patterns;
  }
  const char *hdrs = PyUnicode_AsUTF8(lines);
  uint64_t handle = 0;
  int rc = RD_ENOMEM;
  char err[256] = "out of memory";
  const char *ca_file, *client_cert, *client_key;
  int insecure = 0;
  if (opt_cstr(opts, "ca_file", &ca_file) < 0 || opt_cstr(opts, "client_cert", &client_cert) < 0 ||
      opt_cstr(opts, "client_key", &client_key) < 0 || opt_bool(opts, "insecure", &insecure) < 0)
    hdrs = NULL;
  else if (any_wss) {
    Py_BEGIN_ALLOW_THREADS
    cfg.tls = rd_tls_ctx_new_client(ca_file, insecure, client_cert, client_key, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (cfg.tls == NULL) {
      PyMem_Free(patterns);
      Py_XDECREF(pseq);
      Py_DECREF(lines);
      return raise_rc(module, RD_ETLS, err);
    }
  }
  if (hdrs != NULL && (cfg.npatterns == 0 || patterns != NULL)) {
    Py_BEGIN_ALLOW_THREADS
    rc = rd_api_client_new_urls(urls, nurls, hdrs, &cfg, &handle, err, sizeof err);
    Py_END_ALLOW_THREADS
  } else if (PyErr_Occurred()) {
    rc = 0;
  }
  if (cfg.tls != NULL)
    rd_tls_ctx_unref(cfg.tls);
  PyMem_Free(patterns);
  Py_XDECREF(pseq);
  Py_DECREF(lines);
  if (PyErr_Occurred())
    return NULL;
  if (rc != RD_OK)
    return raise_rc(module, rc, err);
  return PyLong_FromUnsignedLongLong(handle);
}

/* client_new(url, headers, options): url is one URL or a list tried in turn. */
static PyObject *py_client_new(PyObject *module, PyObject *args) {
  PyObject *url_arg, *headers, *opts;
  if (!PyArg_ParseTuple(args, "OOO!:client_new", &url_arg, &headers, &PyDict_Type, &opts))
    return NULL;
  PyObject *useq = PyUnicode_Check(url_arg)
                       ? PyTuple_Pack(1, url_arg)
                       : PySequence_Fast(url_arg, "url must be a str or a list of str");
  if (useq == NULL)
    return NULL;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(useq);
  if (n < 1 || n > RD_PY_MAX_URLS) {
    Py_DECREF(useq);
    PyErr_Format(PyExc_ValueError, "between 1 and %d server URLs", RD_PY_MAX_URLS);
    return NULL;
  }
  const char *urls[RD_PY_MAX_URLS];
  int any_wss = 0;
  for (Py_ssize_t i = 0; i < n; i++) {
    if ((urls[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(useq, i))) == NULL) {
      Py_DECREF(useq);
      return NULL;
    }
    any_wss |= strncmp(urls[i], "wss://", 6) == 0;
  }
  /* "proxies": one per URL, "" for a direct connection (client.py resolves
   * the proxy= argument and the environment into this list). */
  const char *proxies[RD_PY_MAX_URLS];
  PyObject *pseq = NULL, *prox = PyDict_GetItemString(opts, "proxies");
  if (prox != NULL) {
    pseq = PySequence_Fast(prox, "proxies must be a list of str");
    if (pseq != NULL && PySequence_Fast_GET_SIZE(pseq) != n) {
      PyErr_SetString(PyExc_ValueError, "proxies must have one item per server URL");
      Py_CLEAR(pseq);
    }
    for (Py_ssize_t i = 0; pseq != NULL && i < n; i++)
      if ((proxies[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(pseq, i))) == NULL)
        Py_CLEAR(pseq);
    if (pseq == NULL) {
      Py_DECREF(useq);
      return NULL;
    }
  }
  PyObject *r = client_new_impl(module, urls, (size_t)n, pseq != NULL ? proxies : NULL, any_wss,
                                headers, opts);
  Py_XDECREF(pseq); /* it kept the proxy strings alive */
  Py_DECREF(useq);  /* and this the URL strings */
  return r;
}

static PyObject *py_client_wait_connected(PyObject *module, PyObject *args) {
  unsigned long long handle;
  double timeout;
  if (!PyArg_ParseTuple(args, "Kd:client_wait_connected", &handle, &timeout))
    return NULL;
  if (timeout < 0)
    timeout = 0;
  int connected = 0, rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_client_wait_connected(handle, (uint64_t)(timeout * 1000.0), &connected);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  return PyBool_FromLong(connected);
}

static PyObject *py_client_state(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:client_state", &handle))
    return NULL;
  int connected = 0, rc;
  char err[256], url[512];
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_client_state_url(handle, &connected, err, sizeof err, url, sizeof url);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  return Py_BuildValue("(Oss)", connected ? Py_True : Py_False, err, url);
}

static PyObject *py_client_connected(PyObject *module, PyObject *args) {
  PyObject *st = py_client_state(module, args);
  if (st == NULL)
    return NULL;
  PyObject *r = PyTuple_GET_ITEM(st, 0);
  Py_INCREF(r);
  Py_DECREF(st);
  return r;
}

static PyObject *py_close(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:close", &handle))
    return NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_close(handle);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK && rc != RD_ECLOSED)
    return raise_rc(module, rc, NULL);
  Py_RETURN_NONE;
}

/* ---- metrics ---- */

static PyObject *py_metrics(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:metrics", &handle))
    return NULL;
  rd_sample_list l;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_metrics(handle, &l);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  PyObject *list = PyList_New(0);
  for (size_t i = 0; list != NULL && i < l.count; i++) {
    const rd_metric_family_info *f = l.items[i].family;
    /* Labels sorted by name, as the exposition prints them. */
    size_t order[3] = {0, 1, 2};
    for (size_t a = 0; a < f->num_labels; a++)
      for (size_t b = a + 1; b < f->num_labels; b++)
        if (strcmp(f->labels[order[b]], f->labels[order[a]]) < 0) {
          size_t t = order[a];
          order[a] = order[b];
          order[b] = t;
        }
    PyObject *labels = PyTuple_New((Py_ssize_t)f->num_labels);
    for (size_t j = 0; labels != NULL && j < f->num_labels; j++) {
      PyObject *pair = Py_BuildValue("(ss)", f->labels[order[j]], l.items[i].values[order[j]]);
      if (pair == NULL) {
        Py_CLEAR(labels);
        break;
      }
      PyTuple_SET_ITEM(labels, (Py_ssize_t)j, pair);
    }
    PyObject *t = labels != NULL ? Py_BuildValue("(sNd)", f->name, labels, l.items[i].value) : NULL;
    list = list_take(list, t);
  }
  rd_sample_list_free(&l);
  return list;
}

static PyObject *py_prometheus(PyObject *module, PyObject *args) {
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "K:prometheus", &handle))
    return NULL;
  char *text = NULL;
  size_t len = 0;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_prometheus(handle, &text, &len);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  PyObject *s = PyUnicode_DecodeUTF8(text, (Py_ssize_t)len, "replace");
  rd_free(text);
  return s;
}


/* ---- calls posted without waiting (asyncio) ----
 * A Completer owns an eventfd an event loop watches and the Pending calls
 * posted with it. The loop thread adds 1 to the eventfd as each call
 * completes; collect() then returns the completed ones. A Pending owns its
 * rd_api_op: the completer keeps it referenced until the loop thread is done
 * with it, whatever Python drops meanwhile, and a result never taken (a
 * cancelled dial's descriptor) is released with it. */

typedef struct PendingObject {
  PyObject_HEAD
  rd_api_op *op;
  PyObject *module;
  PyObject *tag; /* the caller's, e.g. its Future */
  int taken;
  struct PendingObject *prev, *next; /* on the completer's list while queued */
} PendingObject;

typedef struct {
  PyObject_HEAD
  int fd;
  /* Calls queued, signals read from fd, queued calls collected. The fd stays
   * open until every queued call has signalled: the loop thread writes to it
   * just after marking the call done. */
  uint64_t queued, signalled, collected;
  PendingObject *head, *tail; /* queued, not collected, oldest first */
  PyObject *module;
} CompleterObject;

static PyTypeObject PendingType, CompleterType;
/* The module whose exceptions Pending.result raises (set by engine_exec). */
static PyObject *completer_module;

static void pending_dealloc(PendingObject *p) {
  /* Never queued, or done: the loop thread no longer touches the op (the
   * completer holds a queued one until it is done). */
  if (p->op != NULL && rd_api_op_done(p->op))
    rd_api_op_free(p->op);
  Py_XDECREF(p->tag);
  Py_XDECREF(p->module);
  Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pending_done(PendingObject *p, void *closure) {
  (void)closure;
  return PyBool_FromLong(p->op != NULL && rd_api_op_done(p->op));
}

static PyObject *pending_tag(PendingObject *p, void *closure) {
  (void)closure;
  return Py_NewRef(p->tag);
}

/* The blocking call's return value: (fd, conn_id, status) for a dial, None
 * for a close, a bool for wait_connected; or its exception. */
static PyObject *pending_result(PendingObject *p, PyObject *noargs) {
  (void)noargs;
  if (p->op == NULL || !rd_api_op_done(p->op)) {
    PyErr_SetString(PyExc_RuntimeError, "the call has not completed");
    return NULL;
  }
  if (p->taken) {
    PyErr_SetString(PyExc_RuntimeError, "the result was already taken");
    return NULL;
  }
  char err[256];
  int rc = rd_api_op_status(p->op, err, sizeof err);
  PyObject *connected = PyBool_FromLong(rd_api_op_connected(p->op));
  int fd = -1;
  int64_t conn_id = 0;
  rd_dial_status *st = NULL;
  if (rc == RD_OK)
    rd_api_op_take_dial(p->op, &fd, &conn_id, &st);
  p->taken = 1;
  if (fd < 0) {
    if (rc == RD_OK)
      return connected;
    Py_DECREF(connected);
    return raise_rc(p->module, rc, err);
  }
  Py_DECREF(connected);
  PyObject *cap = PyCapsule_New(st, "remotedialer_py.dial_status", status_capsule_free);
  if (cap == NULL) {
    rd_dial_status_unref(st);
    close(fd);
    return NULL;
  }
  return Py_BuildValue("(iLN)", fd, (long long)conn_id, cap);
}

/* Releases a completed call's result now (a cancelled dial's socket). */
static PyObject *pending_discard(PendingObject *p, PyObject *noargs) {
  (void)noargs;
  if (p->op != NULL && rd_api_op_done(p->op)) {
    rd_api_op_free(p->op);
    p->op = NULL;
  }
  Py_RETURN_NONE;
}

static PyMethodDef pending_methods[] = {
    {"result", (PyCFunction)pending_result, METH_NOARGS,
     "result(): what the blocking call returns, or its exception (once done)"},
    {"discard", (PyCFunction)pending_discard, METH_NOARGS,
     "discard(): release a completed call's result untaken (closes a dialed socket)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pending_getset[] = {
    {"done", (getter)pending_done, NULL, "True once the engine completed the call", NULL},
    {"tag", (getter)pending_tag, NULL, "the object given when posting", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PendingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "remotedialer_py._engine.Pending",
    .tp_basicsize = sizeof(PendingObject),
    .tp_dealloc = (destructor)pending_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A call posted to the engine's loop thread (Completer).",
    .tp_methods = pending_methods,
    .tp_getset = pending_getset,
};

static PyObject *completer_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
  if (PyTuple_GET_SIZE(args) != 0 || (kw != NULL && PyDict_GET_SIZE(kw) != 0)) {
    PyErr_SetString(PyExc_TypeError, "Completer() takes no arguments");
    return NULL;
  }
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0)
    return PyErr_SetFromErrno(PyExc_OSError);
  CompleterObject *c = (CompleterObject *)type->tp_alloc(type, 0);
  if (c == NULL) {
    close(fd);
    return NULL;
  }
  c->fd = fd;
  c->module = Py_XNewRef(completer_module);
  return (PyObject *)c;
}

static void completer_unlink(CompleterObject *c, PendingObject *p) {
  if (p->prev != NULL)
    p->prev->next = p->next;
  else
    c->head = p->next;
  if (p->next != NULL)
    p->next->prev = p->prev;
  else
    c->tail = p->prev;
  p->prev = p->next = NULL;
}

/* Adds the signals waiting on the eventfd; 1 when there were any. */
static int completer_read(CompleterObject *c) {
  uint64_t n;
  if (c->fd < 0 || read(c->fd, &n, sizeof n) != (ssize_t)sizeof n)
    return 0; /* EAGAIN: none yet */
  c->signalled += n;
  return 1;
}

/* Moves completed calls to list (a new reference each, taken from ours).
 * Each completed call signals once, so the scan can stop once it has found
 * as many as were signalled; calls complete roughly in the order posted. */
static int completer_take(CompleterObject *c, PyObject *list, int all) {
  PendingObject *p = c->head;
  while (p != NULL && (all || c->collected < c->signalled)) {
    PendingObject *next = p->next;
    if (rd_api_op_done(p->op)) {
      completer_unlink(c, p);
      c->collected++;
      int rc = PyList_Append(list, (PyObject *)p);
      Py_DECREF(p); /* the list's reference now, or gone on error */
      if (rc < 0)
        return -1;
    }
    p = next;
  }
  return 0;
}

static PyObject *completer_collect(CompleterObject *c, PyObject *noargs) {
  (void)noargs;
  completer_read(c);
  PyObject *list = PyList_New(0);
  if (list != NULL && completer_take(c, list, 0) < 0)
    Py_CLEAR(list);
  return list;
}

/* Waits, without the GIL, until every queued call has signalled. */
static void completer_drain(CompleterObject *c) {
  while (c->fd >= 0 && c->signalled < c->queued) {
    if (completer_read(c))
      continue;
    struct pollfd pfd = {c->fd, POLLIN, 0};
    Py_BEGIN_ALLOW_THREADS
    poll(&pfd, 1, -1);
    Py_END_ALLOW_THREADS
  }
}

static PyObject *completer_shutdown(CompleterObject *c, PyObject *noargs) {
  (void)noargs;
  completer_drain(c);
  PyObject *list = PyList_New(0);
  if (list == NULL || completer_take(c, list, 1) < 0) {
    Py_XDECREF(list);
    return NULL;
  }
  if (c->fd >= 0) {
    close(c->fd);
    c->fd = -1;
  }
  return list;
}

static void completer_dealloc(CompleterObject *c) {
  /* Queued calls are still the loop thread's: wait for them (callers close
   * their engine object first, which ends its calls promptly). */
  completer_drain(c);
  while (c->head != NULL) {
    PendingObject *p = c->head;
    completer_unlink(c, p);
    Py_DECREF(p);
  }
  if (c->fd >= 0)
    close(c->fd);
  Py_XDECREF(c->module);
  Py_TYPE(c)->tp_free((PyObject *)c);
}

/* Posts op (ownership passes) as a Pending tagged with tag. */
static PyObject *completer_post(CompleterObject *c, rd_api_op *op, PyObject *tag) {
  if (op == NULL)
    return PyErr_NoMemory();
  if (c->fd < 0) {
    rd_api_op_free(op);
    PyErr_SetString(PyExc_RuntimeError, "the completer is shut down");
    return NULL;
  }
  PendingObject *p = PyObject_New(PendingObject, &PendingType);
  if (p == NULL) {
    rd_api_op_free(op);
    return NULL;
  }
  p->op = op;
  p->module = Py_XNewRef(c->module);
  p->tag = Py_NewRef(tag);
  p->taken = 0;
  p->prev = p->next = NULL;
  if (rd_api_op_post(op, c->fd)) {
    Py_INCREF(p); /* the list's, until collected */
    p->prev = c->tail;
    if (c->tail != NULL)
      c->tail->next = p;
    else
      c->head = p;
    c->tail = p;
    c->queued++;
  }
  return (PyObject *)p;
}

static PyObject *completer_dial(CompleterObject *c, PyObject *args) {
  unsigned long long handle;
  const char *key, *proto, *address;
  double timeout, idle;
  PyObject *tag;
  if (!PyArg_ParseTuple(args, "KsssddO:dial", &handle, &key, &proto, &address, &timeout, &idle,
                        &tag))
    return NULL;
  if (idle < 0 || timeout < 0) {
    PyErr_SetString(PyExc_ValueError, idle < 0 ? "idle_timeout must not be negative"
                                               : "timeout must not be negative");
    return NULL;
  }
  return completer_post(c,
                        rd_api_op_dial(handle, key, proto, address, (uint64_t)(timeout * 1000.0),
                                       (uint64_t)(idle * 1000.0)),
                        tag);
}

static PyObject *completer_close_handle(CompleterObject *c, PyObject *args) {
  unsigned long long handle;
  PyObject *tag;
  if (!PyArg_ParseTuple(args, "KO:close", &handle, &tag))
    return NULL;
  return completer_post(c, rd_api_op_close(handle), tag);
}

static PyObject *completer_wait_connected(CompleterObject *c, PyObject *args) {
  unsigned long long handle;
  double timeout;
  PyObject *tag;
  if (!PyArg_ParseTuple(args, "KdO:wait_connected", &handle, &timeout, &tag))
    return NULL;
  if (timeout < 0)
    timeout = 0;
  return completer_post(c, rd_api_op_wait_connected(handle, (uint64_t)(timeout * 1000.0)), tag);
}

static PyObject *completer_fileno(CompleterObject *c, PyObject *noargs) {
  (void)noargs;
  return PyLong_FromLong(c->fd);
}

static PyObject *completer_in_flight(CompleterObject *c, void *closure) {
  (void)closure;
  return PyLong_FromUnsignedLongLong(c->queued - c->collected);
}

static PyMethodDef completer_methods[] = {
    {"fileno", (PyCFunction)completer_fileno, METH_NOARGS,
     "fileno(): the eventfd, readable when calls have completed (-1 once shut down)"},
    {"dial", (PyCFunction)completer_dial, METH_VARARGS,
     "dial(handle, key, proto, address, timeout, idle_timeout, tag) -> Pending"},
    {"close", (PyCFunction)completer_close_handle, METH_VARARGS,
     "close(handle, tag) -> Pending: close any object"},
    {"wait_connected", (PyCFunction)completer_wait_connected, METH_VARARGS,
     "wait_connected(handle, timeout, tag) -> Pending"},
    {"collect", (PyCFunction)completer_collect, METH_NOARGS,
     "collect() -> [Pending]: the calls completed since the last collect"},
    {"shutdown", (PyCFunction)completer_shutdown, METH_NOARGS,
     "shutdown() -> [Pending]: waits for every queued call, returns those not collected, "
     "closes the eventfd"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef completer_getset[] = {
    {"in_flight", (getter)completer_in_flight, NULL, "calls queued and not yet collected", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CompleterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "remotedialer_py._engine.Completer",
    .tp_basicsize = sizeof(CompleterObject),
    .tp_dealloc = (destructor)completer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Completer(): posts engine calls without waiting; an eventfd signals completions.",
    .tp_methods = completer_methods,
    .tp_getset = completer_getset,
    .tp_new = completer_new,
};

/* ---- requests for Python decisions ---- */

/* The request's fields as Python values; NULL with an exception set. */
static PyObject *request_payload(const rd_request *r) {
  if (r->kind == RD_REQ_EVENT) {
    const rd_event *e = &r->event;
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:O,s:I,s:d}", "what", e->what, "key",
                         e->key, "remote", e->remote, "url", e->url, "reason", e->reason,
                         "proto", e->proto, "address", e->address, "peer",
                         e->peer ? Py_True : Py_False, "attempt", e->attempt, "retry",
                         e->retry_ms / 1000.0);
  }
  if (r->kind == RD_REQ_CONNECT)
    return Py_BuildValue("(ss)", r->connect.proto, r->connect.address);
  if (r->kind == RD_REQ_DIAL)
    return Py_BuildValue("(ss)", r->dial.proto, r->dial.address);
  const rd_auth_request *a = &r->auth;
  PyObject *headers = PyList_New(0);
  for (const char *p = a->headers; headers != NULL && p < a->headers + a->headers_len;) {
    const char *name = p;
    const char *value = name + strlen(name) + 1;
    p = value + strlen(value) + 1;
    PyObject *pair = Py_BuildValue("(ss)", name, value);
    if (pair == NULL || PyList_Append(headers, pair) < 0)
      Py_CLEAR(headers);
    Py_XDECREF(pair);
  }
  if (headers == NULL)
    return NULL;
  PyObject *cert = Py_None;
  Py_INCREF(cert);
  if (a->cert_sha256 != NULL) {
    Py_DECREF(cert);
    cert = Py_BuildValue("{s:s,s:s,s:s}", "subject", a->cert_subject, "sans", a->cert_sans,
                         "sha256", a->cert_sha256);
    if (cert == NULL) {
      Py_DECREF(headers);
      return NULL;
    }
  }
  return Py_BuildValue("{s:s,s:s,s:N,s:s,s:N}", "method", a->method, "path", a->path, "headers",
                       headers, "remote", a->remote, "client_cert", cert);
}

static PyObject *py_next_request(PyObject *module, PyObject *args) {
  (void)module;
  double timeout;
  if (!PyArg_ParseTuple(args, "d:next_request", &timeout))
    return NULL;
  rd_request *r;
  Py_BEGIN_ALLOW_THREADS
  r = rd_request_next((int64_t)(timeout * 1000.0));
  Py_END_ALLOW_THREADS
  if (r == NULL)
    Py_RETURN_NONE;
  /* Our reference keeps r readable even if the engine shuts down meanwhile;
   * everything Python needs is copied before it is dropped. */
  uint64_t id = r->id, owner = r->owner;
  const char *kind = r->kind == RD_REQ_AUTH ? "auth" : r->kind == RD_REQ_DIAL ? "dial" : "connect";
  rd_verdict refusal = r->kind == RD_REQ_AUTH   ? RD_VERDICT_UNAUTHORIZED
                       : r->kind == RD_REQ_DIAL ? RD_VERDICT_DIAL_ERROR
                                                : RD_VERDICT_REFUSE;
  PyObject *payload = request_payload(r);
  rd_request_release(r);
  if (payload == NULL) {
    /* Never leave the engine waiting: refuse what we could not present. */
    Py_BEGIN_ALLOW_THREADS
    rd_request_answer(id, refusal, "out of memory");
    Py_END_ALLOW_THREADS
    return NULL;
  }
  return Py_BuildValue("(KKsN)", (unsigned long long)id, (unsigned long long)owner, kind, payload);
}

static PyObject *py_next_event(PyObject *module, PyObject *args) {
  (void)module;
  double timeout;
  if (!PyArg_ParseTuple(args, "d:next_event", &timeout))
    return NULL;
  rd_request *r;
  Py_BEGIN_ALLOW_THREADS
  r = rd_event_next((int64_t)(timeout * 1000.0));
  Py_END_ALLOW_THREADS
  if (r == NULL)
    Py_RETURN_NONE;
  uint64_t owner = r->owner;
  PyObject *payload = request_payload(r);
  rd_request_release(r);
  return payload == NULL ? NULL : Py_BuildValue("(KN)", (unsigned long long)owner, payload);
}

/* Records one next_trace call copies out at most. */
#define RD_PY_TRACE_BATCH 256

/* The data trace's records as (role, key, session, dir, type, msg_id,
 * conn_id, len, head) tuples, with the count dropped since the last call;
 * None when none came within timeout. One thread takes them. */
static PyObject *py_next_trace(PyObject *module, PyObject *args) {
  (void)module;
  double timeout;
  if (!PyArg_ParseTuple(args, "d:next_trace", &timeout))
    return NULL;
  rd_trace_rec *recs = PyMem_Malloc(RD_PY_TRACE_BATCH * sizeof *recs);
  if (recs == NULL)
    return PyErr_NoMemory();
  size_t n;
  uint64_t dropped;
  Py_BEGIN_ALLOW_THREADS
  n = rd_trace_take(recs, RD_PY_TRACE_BATCH, (int64_t)(timeout * 1000.0), &dropped);
  Py_END_ALLOW_THREADS
  PyObject *out;
  if (n > 0 || dropped > 0) {
    PyObject *list = PyList_New(0);
    for (size_t i = 0; list != NULL && i < n; i++) {
      const rd_trace_rec *r = &recs[i];
      list = list_take(list, Py_BuildValue("(ssLiLLLKy#)",
                                           r->role == RD_ROLE_SERVER ? "server" : "client",
                                           r->key, (long long)r->session, (int)r->dir,
                                           (long long)r->type, (long long)r->msg_id,
                                           (long long)r->conn_id, (unsigned long long)r->len,
                                           (const char *)r->head, (Py_ssize_t)r->head_len));
    }
    out = list != NULL ? Py_BuildValue("(NK)", list, (unsigned long long)dropped) : NULL;
  } else {
    out = Py_None;
    Py_INCREF(out);
  }
  PyMem_Free(recs);
  return out;
}

static PyObject *py_answer(PyObject *module, PyObject *args) {
  (void)module;
  unsigned long long id;
  int verdict;
  const char *value;
  if (!PyArg_ParseTuple(args, "Kis:answer", &id, &verdict, &value))
    return NULL;
  if (verdict < RD_VERDICT_ACCEPT || verdict > RD_VERDICT_REFUSE) {
    PyErr_Format(PyExc_ValueError, "unknown verdict %d", verdict);
    return NULL;
  }
  /* value is used by the loop thread before the call returns. An engine
   * that has stopped answered the request itself. */
  Py_BEGIN_ALLOW_THREADS
  rd_request_answer(id, verdict, value);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject *py_answer_fd(PyObject *module, PyObject *args) {
  (void)module;
  unsigned long long id;
  int fd;
  const char *error;
  if (!PyArg_ParseTuple(args, "Kis:answer_fd", &id, &fd, &error))
    return NULL;
  if (fd < -1) {
    PyErr_Format(PyExc_ValueError, "invalid descriptor %d", fd);
    return NULL;
  }
  /* From here the engine owns fd: it attaches or closes it. */
  Py_BEGIN_ALLOW_THREADS
  rd_request_answer_fd(id, fd, error);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

/* ---- engine ---- */

/* One row as Python sees it: the default in the option's unit (seconds,
 * bytes, a count, a bool; None for text and paths), and max for the kinds
 * that have one. */
static PyObject *option_row(const rd_option *o) {
  PyObject *def = Py_None, *max = Py_None;
  Py_INCREF(def);
  Py_INCREF(max);
  switch (o->kind) {
  case RD_OPT_SECONDS:
  case RD_OPT_SECONDS_OFF:
    Py_SETREF(def, PyFloat_FromDouble((double)o->def / 1000.0));
    break;
  case RD_OPT_SIZE:
  case RD_OPT_COUNT:
    Py_SETREF(def, PyLong_FromUnsignedLongLong(o->def));
    Py_SETREF(max, PyLong_FromUnsignedLongLong(o->max != 0 ? o->max : RD_OPT_MAX_SIZE));
    break;
  case RD_OPT_BOOL:
    Py_SETREF(def, PyBool_FromLong(o->def != 0));
    break;
  case RD_OPT_HEADER:
  case RD_OPT_HOST:
    Py_SETREF(max, PyLong_FromUnsignedLongLong(o->max));
    break;
  case RD_OPT_PATH:
    break;
  }
  if (def == NULL || max == NULL) {
    Py_XDECREF(def);
    Py_XDECREF(max);
    return NULL;
  }
  return Py_BuildValue("{s:s,s:s,s:O,s:O,s:N,s:z,s:N,s:s,s:z}", "name", o->name, "kind",
                       rd_option_kind_name(o->kind), "server",
                       (o->objects & RD_OPT_SERVER) ? Py_True : Py_False, "client",
                       (o->objects & RD_OPT_CLIENT) ? Py_True : Py_False, "default", def,
                       "default_text", o->def_text, "max", max, "meaning", o->meaning, "limit",
                       o->limit);
}

static PyObject *py_options(PyObject *module, PyObject *noargs) {
  (void)module;
  (void)noargs;
  PyObject *rows = PyTuple_New((Py_ssize_t)rd_options_count);
  for (size_t i = 0; rows != NULL && i < rd_options_count; i++) {
    PyObject *row = option_row(&rd_options[i]);
    if (row == NULL)
      Py_CLEAR(rows);
    else
      PyTuple_SET_ITEM(rows, (Py_ssize_t)i, row);
  }
  return rows;
}

static PyObject *py_engine_stats(PyObject *module, PyObject *noargs) {
  (void)noargs;
  rd_stats s;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = rd_api_stats(&s);
  Py_END_ALLOW_THREADS
  if (rc != RD_OK)
    return raise_rc(module, rc, NULL);
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "open_sessions",
                       (long long)s.open_sessions, "open_connections",
                       (long long)s.open_connections, "buffered_bytes",
                       (long long)(s.buffered_to_local + s.buffered_to_tunnel),
                       "buffered_to_local", (long long)s.buffered_to_local, "buffered_to_tunnel",
                       (long long)s.buffered_to_tunnel, "heap_bytes", (long long)s.heap_bytes,
                       "heap_objects", (long long)s.heap_objects, "pool_bytes",
                       (long long)s.pool_bytes, "loop_handles", (long long)s.loop_handles,
                       "rss_bytes", (long long)s.rss_bytes, "open_fds", (long long)s.open_fds,
                       "nofile_soft", (long long)s.nofile_soft, "nofile_hard",
                       (long long)s.nofile_hard, "fd_exhausted", (long long)s.fd_exhausted);
}

static PyObject *py_heap(PyObject *module, PyObject *noargs) {
  (void)module;
  (void)noargs;
  /* Readable at any time, also after shutdown: the leak check at exit. */
  return Py_BuildValue("(LL)", (long long)rd_alloc_bytes(), (long long)rd_alloc_objects());
}

static PyObject *py_trim(PyObject *module, PyObject *noargs) {
  (void)module;
  (void)noargs;
  Py_BEGIN_ALLOW_THREADS
  rd_api_trim();
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject *py_shutdown(PyObject *module, PyObject *noargs) {
  (void)module;
  (void)noargs;
  Py_BEGIN_ALLOW_THREADS
  rd_engine_shutdown();
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef engine_methods[] = {
    {"server_new", py_server_new, METH_VARARGS, "server_new(host, port, options) -> (handle, port)"},
    {"server_dial", py_server_dial, METH_VARARGS,
     "server_dial(handle, key, proto, address[, timeout[, idle_timeout]]) -> (fd, conn_id, status)"},
    {"dial_status", py_dial_status, METH_O, "dial_status(status) -> (open, error)"},
    {"server_forward", py_server_forward, METH_VARARGS,
     "server_forward(handle, key, proto, address, host, port) -> (handle, port)"},
    {"stream_forward", py_stream_forward, METH_VARARGS,
     "stream_forward(url, key, proto, address, host, port, headers, ca_file, timeout_ms) "
     "-> (handle, port)"},
    {"stream_forward_stats", py_stream_forward_stats, METH_VARARGS,
     "stream_forward_stats(handle) -> dict"},
    {"server_reload_tls", py_server_reload_tls, METH_VARARGS,
     "server_reload_tls(handle, cert, key[, client_ca]): new certificate for new connections"},
    {"server_set_tokens", py_server_set_tokens, METH_VARARGS,
     "server_set_tokens(handle, text): replace the bearer token table"},
    {"server_clients", py_server_clients, METH_VARARGS, "server_clients(handle) -> [key]"},
    {"server_has_session", py_server_has_session, METH_VARARGS,
     "server_has_session(handle, key) -> bool"},
    {"server_add_peer", py_server_add_peer, METH_VARARGS,
     "server_add_peer(handle, url, id, token)"},
    {"server_remove_peer", py_server_remove_peer, METH_VARARGS,
     "server_remove_peer(handle, id) -> bool (False: unknown id)"},
    {"server_peers", py_server_peers, METH_VARARGS, "server_peers(handle) -> [dict]"},
    {"server_disconnect", py_server_disconnect, METH_VARARGS,
     "server_disconnect(handle, key) -> sessions ended here"},
    {"server_close_idle", py_server_close_idle, METH_VARARGS,
     "server_close_idle(handle) -> idle pooled connections closed"},
    {"server_route", py_server_route, METH_VARARGS,
     "server_route(handle, key) -> None, '' (local) or the peer id that reaches it"},
    {"server_connections", py_server_connections, METH_VARARGS,
     "server_connections(handle) -> [dict]"},
    {"client_new", py_client_new, METH_VARARGS, "client_new(url, headers, options) -> handle"},
    {"client_wait_connected", py_client_wait_connected, METH_VARARGS,
     "client_wait_connected(handle, timeout) -> bool"},
    {"client_connected", py_client_connected, METH_VARARGS, "client_connected(handle) -> bool"},
    {"client_state", py_client_state, METH_VARARGS,
     "client_state(handle) -> (connected, last_error)"},
    {"close", py_close, METH_VARARGS, "close(handle): close any object and wait for it"},
    {"metrics", py_metrics, METH_VARARGS, "metrics(handle) -> [(name, labels, value)]"},
    {"prometheus", py_prometheus, METH_VARARGS, "prometheus(handle) -> str"},
    {"next_request", py_next_request, METH_VARARGS,
     "next_request(timeout) -> None | (id, owner, kind, payload)"},
    {"next_event", py_next_event, METH_VARARGS,
     "next_event(timeout) -> (owner, news) or None: sessions that came and went"},
    {"next_trace", py_next_trace, METH_VARARGS,
     "next_trace(timeout) -> ([(role, key, session, dir, type, msg_id, conn_id, len, head)], "
     "dropped) or None: the data trace"},
    {"answer", py_answer, METH_VARARGS, "answer(id, verdict, value): verdict is a VERDICT_* constant"},
    {"answer_fd", py_answer_fd, METH_VARARGS,
     "answer_fd(id, fd, error): a dial request's socket (the engine owns fd from here, and "
     "closes it if nobody waits), or -1 and the error text"},
    {"options", py_options, METH_NOARGS,
     "options() -> (dict, ...): the engine's options table, in documentation order"},
    {"engine_stats", py_engine_stats, METH_NOARGS, "engine_stats() -> dict"},
    {"heap", py_heap, METH_NOARGS, "heap() -> (bytes, objects) the engine holds (any time)"},
    {"trim", py_trim, METH_NOARGS, "trim(): return idle engine pools to the allocator"},
    {"shutdown", py_shutdown, METH_NOARGS, "shutdown(): stop the loop thread"},
    {NULL, NULL, 0, NULL},
};

static int engine_exec(PyObject *module) {
  module_state *st = get_state(module);
  st->TunnelError = PyErr_NewExceptionWithDoc(
      "remotedialer_py._engine.TunnelError", "A tunnel operation failed.", PyExc_OSError, NULL);
  if (st->TunnelError == NULL || PyModule_AddObjectRef(module, "TunnelError", st->TunnelError) < 0)
    return -1;
  st->ClientNotFoundError = PyErr_NewExceptionWithDoc(
      "remotedialer_py._engine.ClientNotFoundError", "No session for the client key.",
      st->TunnelError, NULL);
  if (st->ClientNotFoundError == NULL ||
      PyModule_AddObjectRef(module, "ClientNotFoundError", st->ClientNotFoundError) < 0)
    return -1;
  st->ClosedError = PyErr_NewExceptionWithDoc("remotedialer_py._engine.ClosedError",
                                              "The object is closed.", st->TunnelError, NULL);
  if (st->ClosedError == NULL || PyModule_AddObjectRef(module, "ClosedError", st->ClosedError) < 0)
    return -1;
  /* Both a TunnelError and the built-in TimeoutError, so either catches it. */
  PyObject *bases = PyTuple_Pack(2, st->TunnelError, PyExc_TimeoutError);
  if (bases == NULL)
    return -1;
  st->TunnelTimeoutError = PyErr_NewExceptionWithDoc(
      "remotedialer_py._engine.TunnelTimeoutError", "A tunnel operation ran out of time.", bases,
      NULL);
  Py_DECREF(bases);
  if (st->TunnelTimeoutError == NULL ||
      PyModule_AddObjectRef(module, "TunnelTimeoutError", st->TunnelTimeoutError) < 0)
    return -1;
  if (PyType_Ready(&PendingType) < 0 || PyType_Ready(&CompleterType) < 0 ||
      PyModule_AddObjectRef(module, "Completer", (PyObject *)&CompleterType) < 0 ||
      PyModule_AddObjectRef(module, "Pending", (PyObject *)&PendingType) < 0)
    return -1;
  Py_XSETREF(completer_module, Py_NewRef(module));
  /* Verdict names for answer(); _callbacks.Verdict mirrors them. */
  if (PyModule_AddIntConstant(module, "VERDICT_ACCEPT", RD_VERDICT_ACCEPT) < 0 ||
      PyModule_AddIntConstant(module, "VERDICT_UNAUTHORIZED", RD_VERDICT_UNAUTHORIZED) < 0 ||
      PyModule_AddIntConstant(module, "VERDICT_ERROR", RD_VERDICT_ERROR) < 0 ||
      PyModule_AddIntConstant(module, "VERDICT_ALLOW", RD_VERDICT_ALLOW) < 0 ||
      PyModule_AddIntConstant(module, "VERDICT_REFUSE", RD_VERDICT_REFUSE) < 0)
    return -1;
  return 0;
}

static int engine_traverse(PyObject *module, visitproc visit, void *arg) {
  module_state *st = get_state(module);
  Py_VISIT(st->TunnelError);
  Py_VISIT(st->ClientNotFoundError);
  Py_VISIT(st->ClosedError);
  Py_VISIT(st->TunnelTimeoutError);
  return 0;
}

static int engine_clear(PyObject *module) {
  module_state *st = get_state(module);
  Py_CLEAR(st->TunnelError);
  Py_CLEAR(st->ClientNotFoundError);
  Py_CLEAR(st->ClosedError);
  Py_CLEAR(st->TunnelTimeoutError);
  return 0;
}

static PyModuleDef_Slot engine_slots[] = {
    {Py_mod_exec, engine_exec},
    {0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "remotedialer_py._engine",
    .m_doc = "The remotedialer-py tunnel engine (libuv loop thread).",
    .m_size = sizeof(module_state),
    .m_methods = engine_methods,
    .m_slots = engine_slots,
    .m_traverse = engine_traverse,
    .m_clear = engine_clear,
};

PyMODINIT_FUNC PyInit__engine(void) { return PyModuleDef_Init(&engine_module); }
