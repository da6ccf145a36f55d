/* The server's port forwards: a TCP listener whose every accepted connection
 * is dialed through a client's session. A forward is a registered object on
 * the server's forwards list and holds a reference on the server; it is
 * freed in forward_closed_cb once its listener has closed (its close command
 * finishes there). An accepted connection's stream passes to the tunneled
 * connection. */
#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_dialer.h"
#include "rd_io.h"
#include "rd_server_int.h"

struct rd_forward {
  rd_object obj;
  rd_forward *prev, *next;
  rd_server *srv;
  uv_tcp_t listener;
  char *key, *proto, *address;
  rd_cmd *close_waiter;
  int closed;
};

/* ---- forwards ---- */

static void forward_unlink(rd_forward *f) {
  if (f->prev != NULL)
    f->prev->next = f->next;
  else if (f->srv->forwards == f)
    f->srv->forwards = f->next;
  if (f->next != NULL)
    f->next->prev = f->prev;
  f->prev = f->next = NULL;
}

static void forward_closed_cb(uv_handle_t *h) {
  rd_forward *f = h->data;
  rd_server *srv = f->srv;
  rd_cmd *waiter = f->close_waiter;
  rd_free(f->key);
  rd_free(f);
  if (waiter != NULL)
    rd_cmd_finish(waiter, RD_OK, NULL);
  rd_srv_unref(srv);
}

static void forward_close(rd_object *obj, rd_cmd *waiter) {
  rd_forward *f = (rd_forward *)obj;
  if (f->closed) {
    if (waiter != NULL)
      rd_cmd_finish(waiter, RD_OK, NULL);
    return;
  }
  f->closed = 1;
  rd_object_unregister(&f->obj);
  forward_unlink(f);
  f->close_waiter = waiter;
  uv_close((uv_handle_t *)&f->listener, forward_closed_cb);
}

static void forward_accept_cb(uv_stream_t *listener, int status) {
  rd_forward *f = listener->data;
  if (status < 0 && !f->closed)
    rd_srv_accept_failed(f->srv, status);
  if (status < 0 || f->closed)
    return;
  uv_tcp_t *tcp = rd_srv_accept_tcp(listener);
  if (tcp == NULL)
    return;
  rd_session *s = rd_srv_route(f->srv, f->key);
  char wire[RD_MSG_CONNECT_LIMIT + 1];
  const char *proto = s != NULL ? rd_srv_wire_proto(s, f->key, f->proto, wire, sizeof wire) : NULL;
  if (proto == NULL) {
    uv_close((uv_handle_t *)tcp, rd_srv_tcp_free_cb);
    return;
  }
  rd_io *io = rd_io_new((uv_stream_t *)tcp, NULL);
  int err = 0;
  if (io != NULL)
    rd_session_dial(s, proto, f->address, io, NULL, 0, NULL, &err);
}

static void failed_listener_closed_cb(uv_handle_t *h) { rd_free(h->data); }

int rd_server_forward(rd_server *srv, const char *client_key, const char *proto,
                      const char *address, const char *host, int port, uint64_t *handle_out,
                      int *port_out, char *err, size_t errlen) {
  if (rd_proto_is_udp(proto)) { /* a TCP listener's streams have no datagrams to give */
    snprintf(err, errlen, "forward carries streams only: %s is a datagram protocol", proto);
    return RD_EINVAL;
  }
  size_t kl = strlen(client_key), pl = strlen(proto), al = strlen(address);
  rd_forward *f = rd_calloc(1, sizeof *f);
  if (f == NULL || (f->key = rd_malloc(kl + pl + al + 3)) == NULL) {
    rd_free(f);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  memcpy(f->key, client_key, kl + 1);
  f->proto = f->key + kl + 1;
  memcpy(f->proto, proto, pl + 1);
  f->address = f->proto + pl + 1;
  memcpy(f->address, address, al + 1);
  f->srv = srv;
  uv_tcp_init(rd_loop(), &f->listener);
  f->listener.data = f;
  int rc = rd_srv_bind_listener(&f->listener, host, port, port_out, err, errlen);
  if (rc == 0) {
    rc = uv_listen((uv_stream_t *)&f->listener, 511, forward_accept_cb);
    if (rc == 0)
      rc = rd_object_register(&f->obj, RD_OBJ_FORWARD);
    if (rc != 0)
      snprintf(err, errlen, "listen: %s", rd_strerror(rc));
  }
  if (rc != 0) {
    rd_free(f->key);
    uv_close((uv_handle_t *)&f->listener, failed_listener_closed_cb);
    return rc;
  }
  f->obj.close = forward_close;
  srv->refs++;
  f->next = srv->forwards;
  if (f->next != NULL)
    f->next->prev = f;
  srv->forwards = f;
  *handle_out = f->obj.handle;
  return RD_OK;
}

/* Closes every forward (the server is closing). */
void rd_srv_forwards_close(rd_server *srv) {
  while (srv->forwards != NULL) {
    rd_forward *f = srv->forwards;
    forward_close(&f->obj, NULL);
  }
}
