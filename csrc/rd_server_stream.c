/* The server's stream route, GET /stream/{key}/{proto}/{address} with
 * "Connection: Upgrade" and "Upgrade: tcp" (Docker's attach convention):
 * after "101 Switching Protocols" the HTTP connection is a raw byte stream
 * to the destination, dialed through the key's session (local, else a peer
 * that announced it). The HTTP connection's stream becomes the tunneled
 * connection's local end (the session's connection owns it). Served with
 * the proxy route: both reach through agents. Ours, not the Go library's. */
#include <stdio.h>
#include <string.h>

#include "rd_http.h"
#include "rd_server_int.h"
#include "rd_stream.h"

static const char switching[] =
    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n";

static int has_upgrade(const rd_http_request *req) {
  const rd_http_header *conn = rd_http_find_header(req->headers, req->num_headers, "Connection");
  const rd_http_header *up = rd_http_find_header(req->headers, req->num_headers, "Upgrade");
  return conn != NULL && up != NULL && rd_http_has_token(conn->value, conn->value_len, "upgrade") &&
         rd_http_has_token(up->value, up->value_len, "tcp");
}

void rd_srv_handle_stream(httpconn *hc, rd_http_request *req) {
  if (req->method_len != 3 || memcmp(req->method, "GET", 3) != 0) {
    rd_srv_respond_text(hc, 405, "Method Not Allowed", "the stream route takes GET\n");
    return;
  }
  if (!has_upgrade(req)) {
    rd_srv_respond_text(hc, 400, "Bad Request",
                        "the stream route needs \"Connection: Upgrade\" and \"Upgrade: tcp\"\n");
    return;
  }
  rd_stream_dest d;
  const char *why = NULL;
  size_t skip = strlen("/stream/");
  if (rd_stream_parse_target(req->target + skip, req->target_len - skip, &d, &why) != 0) {
    rd_srv_respond_text(hc, 400, "Bad Request", why);
    return;
  }
  char err[RD_STREAM_ADDRESS_MAX + 80];
  if (rd_stream_check_dest(d.proto, d.address, err, sizeof err) != 0) {
    rd_srv_respond_text(hc, 400, "Bad Request", err);
    return;
  }
  rd_session *s = rd_srv_route(hc->srv, d.key);
  if (s == NULL) {
    snprintf(err, sizeof err, "failed to find Session for client %s", d.key);
    rd_srv_respond_text(hc, 500, "Internal Server Error", err);
    return;
  }
  char wire[RD_MSG_CONNECT_LIMIT + 1];
  const char *proto = rd_srv_wire_proto(s, d.key, d.proto, wire, sizeof wire);
  if (proto == NULL || strlen(proto) + 1 + strlen(d.address) > RD_MSG_CONNECT_LIMIT) {
    rd_srv_respond_text(hc, 400, "Bad Request", "destination too long for a CONNECT message");
    return;
  }
  /* Opened first, so that a session that cannot take the connection is
   * still answered in HTTP. */
  int rc = 0;
  rd_conn *c = rd_session_open(s, proto, d.address, NULL, &rc);
  if (c == NULL) {
    snprintf(err, sizeof err, "dial through session failed: %s", rd_strerror(rc));
    if (rc == RD_ENOMEM)
      rd_srv_respond_text(hc, 500, "Internal Server Error", err);
    else
      rd_srv_respond_text(hc, 503, "Service Unavailable", err);
    return;
  }
  /* Bytes the client sent after the head go first; the 101 is on its way
   * before the connection can write anything the far side sends. */
  if (hc->len > hc->head_len)
    rd_conn_send(c, (const uint8_t *)hc->buf + hc->head_len, hc->len - hc->head_len);
  rd_io *io = rd_srv_httpconn_take_stream(hc);
  if (rd_srv_write_owned(io, switching, sizeof switching - 1) != 0) {
    rd_io_close(io, NULL);
    rd_conn_close(c, "out of memory");
    return;
  }
  rd_conn_attach_io(c, io);
}
