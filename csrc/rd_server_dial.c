/* Dialing through the server's sessions: a connection whose local end is one
 * end of a socket pair (rd_srv_dial_pair; the caller gets the other end, a
 * descriptor Python can use) or of an in-memory pair (rd_srv_dial_io, for
 * the engine's own routes), rd_server_dial for the engine's API, and the
 * dials that wait for room on a full session. A waiting dial is owned by the server's room_waits list and
 * holds a reference on the server; it is freed in room_wait_closed_cb after
 * its timer closes, and its dial request (the caller's) is finished exactly
 * once before that. */
#include <errno.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_nofile.h"
#include "rd_dialer.h"
#include "rd_io.h"
#include "rd_server_int.h"

/* ---- dialing ---- */

/* A plain stream io on one end of a socket pair. Takes fd in every case: on
 * failure it is closed, and the code and err say why. */
static int io_on_fd(int fd, rd_io **out, char *err, size_t errlen) {
  uv_pipe_t *pipe = rd_malloc(sizeof(uv_tcp_t) > sizeof(uv_pipe_t) ? sizeof(uv_tcp_t) : sizeof(uv_pipe_t));
  if (pipe == NULL) {
    close(fd);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  uv_pipe_init(rd_loop(), pipe, 0);
  int rc = uv_pipe_open(pipe, fd);
  if (rc != 0) {
    close(fd);
    uv_close((uv_handle_t *)pipe, rd_srv_tcp_free_cb);
    snprintf(err, errlen, "pipe: %s", rd_strerror(rc));
    return rc;
  }
  if ((*out = rd_io_new((uv_stream_t *)pipe, NULL)) == NULL) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  return RD_OK;
}

/* Dials proto/address through s with io as the connection's local end (io
 * is taken in every case): *st_out a referenced status, *c_out the
 * connection. 0 or a negative code with err. */
static int dial_with_io(rd_session *s, const char *proto, const char *address, rd_io *io,
                        rd_dial_status **st_out, rd_conn **c_out, char *err, size_t errlen) {
  rd_dial_status *st = rd_dial_status_new();
  if (st == NULL) {
    rd_io_close(io, NULL);
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  int e = 0;
  rd_conn *c = rd_session_dial(s, proto, address, io, NULL, 0, st, &e);
  if (c == NULL) {
    rd_dial_status_unref(st);
    snprintf(err, errlen, "dial through session failed: %s", rd_strerror(e));
    return e;
  }
  *st_out = st;
  *c_out = c;
  return RD_OK;
}

/* Dials proto/address through s with one end of a fresh socket pair as the
 * connection's local end: *fd_out is the other end, *st_out a referenced
 * status, *c_out the connection. 0 or a negative code with err. For udp the
 * pair is SOCK_SEQPACKET: each send() on the caller's end is one datagram
 * and each recv() one, and closing still reads as EOF. */
int rd_srv_dial_pair(rd_session *s, const char *proto, const char *address, int *fd_out,
                     rd_dial_status **st_out, rd_conn **c_out, char *err, size_t errlen) {
  int fds[2];
  int udp = rd_proto_is_udp(proto);
  if (socketpair(AF_UNIX, (udp ? SOCK_SEQPACKET : SOCK_STREAM) | SOCK_CLOEXEC, 0, fds) != 0) {
    int e = -errno;
    const char *text = rd_nofile_error(e);
    snprintf(err, errlen, "socketpair: %s", text != NULL ? text : rd_strerror(e));
    return e;
  }
  rd_io *io;
  int rc;
  if (udp) {
    io = rd_io_new_dgram(rd_loop(), fds[0]);
    rc = io != NULL ? RD_OK : RD_ENOMEM;
    if (io == NULL)
      snprintf(err, errlen, "out of memory");
  } else {
    rc = io_on_fd(fds[0], &io, err, errlen);
  }
  if (rc == RD_OK)
    rc = dial_with_io(s, proto, address, io, st_out, c_out, err, errlen);
  if (rc != RD_OK) {
    close(fds[1]);
    return rc;
  }
  *fd_out = fds[1];
  return RD_OK;
}

int rd_srv_dial_io(rd_session *s, const char *proto, const char *address, rd_io **io_out,
                   rd_dial_status **st_out, rd_conn **c_out, char *err, size_t errlen) {
  rd_io *local, *ours;
  if (rd_io_new_pair(rd_loop(), &local, &ours) != RD_OK) {
    snprintf(err, errlen, "out of memory");
    return RD_ENOMEM;
  }
  int rc = dial_with_io(s, proto, address, local, st_out, c_out, err, errlen);
  if (rc != RD_OK) {
    rd_io_close(ours, NULL);
    return rc;
  }
  *io_out = ours;
  return RD_OK;
}

static void dial_now(rd_session *s, rd_server_dial_req *req) {
  char err[256] = "";
  char wire[RD_MSG_CONNECT_LIMIT + 1];
  const char *proto = rd_srv_wire_proto(s, req->client_key, req->proto, wire, sizeof wire);
  if (proto == NULL) {
    rd_cmd_finish(req->cmd, RD_EMALFORMED, "client key and proto too long to dial through a peer");
    return;
  }
  rd_conn *c;
  int rc = rd_srv_dial_pair(s, proto, req->address, &req->fd, &req->status, &c, err, sizeof err);
  if (rc == RD_OK) {
    if (req->idle_timeout_ms > 0)
      rd_conn_set_idle_timeout(c, req->idle_timeout_ms);
    req->conn_id = rd_conn_id(c);
  }
  rd_cmd_finish(req->cmd, rc, err);
}

static void dial_no_session(rd_server_dial_req *req) {
  rd_cmd_finishf(req->cmd, RD_ENOSESSION, "failed to find Session for client %s",
                 req->client_key);
}

/* ---- dials that wait for room ----
 * Go bounds a dial by a deadline on writing its CONNECT. Here a dial waits
 * while its session's queue toward the agent is over write_high (the agent
 * is not keeping up), and fails past the caller's timeout. */

struct room_wait {
  room_wait *prev, *next;
  rd_server *srv;
  rd_session *s;
  uv_timer_t timer;
  rd_server_dial_req *req;
};

static void room_wait_closed_cb(uv_handle_t *h) {
  room_wait *w = h->data;
  rd_server *srv = w->srv;
  rd_free(w);
  rd_srv_unref(srv);
}

/* Unlinks w and frees it (once its timer has closed). */
static void room_wait_drop(room_wait *w) {
  if (w->prev != NULL)
    w->prev->next = w->next;
  else
    w->srv->room_waits = w->next;
  if (w->next != NULL)
    w->next->prev = w->prev;
  uv_close((uv_handle_t *)&w->timer, room_wait_closed_cb);
}

static void dial_timed_out(rd_server_dial_req *req) {
  rd_cmd_finishf(req->cmd, RD_ETIMEDOUT,
                 "dial timeout: the session of client %s had no room for the connection",
                 req->client_key);
}

static void room_wait_timeout_cb(uv_timer_t *t) {
  room_wait *w = t->data;
  dial_timed_out(w->req);
  room_wait_drop(w);
}

static void room_wait_start(rd_server *srv, rd_session *s, rd_server_dial_req *req) {
  room_wait *w = rd_calloc(1, sizeof *w);
  if (w == NULL) {
    rd_cmd_finish(req->cmd, RD_ENOMEM, NULL);
    return;
  }
  w->srv = srv;
  w->s = s;
  w->req = req;
  srv->refs++;
  uv_timer_init(rd_loop(), &w->timer);
  w->timer.data = w;
  uv_timer_start(&w->timer, room_wait_timeout_cb, req->timeout_ms, 0);
  w->next = srv->room_waits;
  if (w->next != NULL)
    w->next->prev = w;
  srv->room_waits = w;
}

/* Session s has room again (ended: no longer exists): its waiting dials go
 * on, oldest first, while the room lasts. */
void rd_srv_room_waits_wake(rd_server *srv, rd_session *s, int ended) {
  room_wait *oldest = NULL;
  for (room_wait *w = srv->room_waits; w != NULL; w = w->next)
    if (w->s == s)
      oldest = w;
  for (room_wait *w = oldest, *prev; w != NULL; w = prev) {
    prev = w->prev;
    if (w->s != s)
      continue;
    if (!ended && !rd_session_has_room(s))
      return;
    rd_server_dial_req *req = w->req;
    room_wait_drop(w);
    if (ended)
      dial_no_session(req);
    else
      dial_now(s, req);
  }
}

void rd_server_dial(rd_server *srv, rd_server_dial_req *req) {
  rd_session *s = rd_srv_route(srv, req->client_key);
  if (s == NULL)
    dial_no_session(req);
  else if (rd_session_has_room(s))
    dial_now(s, req);
  else if (req->timeout_ms == 0)
    dial_timed_out(req);
  else
    room_wait_start(srv, s, req);
}
