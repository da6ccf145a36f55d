/* Tunnel message codec (one message per WebSocket binary message).
 * Pure functions over byte buffers: no allocation, no I/O. */
#ifndef RD_MSG_H
#define RD_MSG_H

#include "rd_common.h"

enum rd_msg_type {
  RD_MSG_DATA = 1,
  RD_MSG_CONNECT = 2,
  RD_MSG_ERROR = 3,
  RD_MSG_ADD_CLIENT = 4,
  RD_MSG_REMOVE_CLIENT = 5,
  RD_MSG_PAUSE = 6,
  RD_MSG_RESUME = 7,
  RD_MSG_SYNC = 8,
  /* Ours, between our peers: end the named client key's sessions. A Go
   * receiver ignores it, as it ignores every type it does not know. */
  RD_MSG_DISCONNECT_CLIENT = 100
};

/* The legacy deadline written into DATA and CONNECT headers. */
#define RD_MSG_LEGACY_DEADLINE 15000
/* Longest header rd_msg_encode_header can produce: four 10-byte varints. */
#define RD_MSG_HEADER_MAX 40
/* Readers' limits on payloads, as the Go receiver applies them. */
#define RD_MSG_CONNECT_LIMIT 266
#define RD_MSG_ERROR_LIMIT 100
#define RD_MSG_CLIENT_LIMIT 100

/* A decoded message. payload points into the decoded buffer. For CONNECT,
 * ERROR, ADD_CLIENT and REMOVE_CLIENT payload_len is already cut to the
 * reader's limit above. For CONNECT, proto/address split the payload at the
 * first '/'. */
typedef struct rd_msg {
  int64_t id;
  int64_t conn_id;
  int64_t type;
  const uint8_t *payload;
  size_t payload_len;
  const uint8_t *proto; /* CONNECT only */
  size_t proto_len;
  const uint8_t *address; /* CONNECT only */
  size_t address_len;
} rd_msg;

/* Writes Go's zig-zag signed varint of v into out (at least 10 bytes).
 * Returns the number of bytes written (1..10). */
size_t rd_varint_put(uint8_t *out, int64_t v);

/* Reads a signed varint from buf[0..len). Returns bytes consumed (1..10),
 * RD_EPARTIAL if it runs past len, RD_EMALFORMED if it overflows 64 bits. */
int rd_varint_get(const uint8_t *buf, size_t len, int64_t *out);

/* Writes the header of a message (id, connID, type, and for DATA/CONNECT the
 * legacy deadline) into out (at least RD_MSG_HEADER_MAX bytes). The payload
 * follows it on the wire. Returns the header length. */
size_t rd_msg_encode_header(uint8_t *out, int64_t id, int64_t conn_id, int type);

/* Decodes a whole message buf[0..len). Returns RD_OK or RD_EMALFORMED
 * (truncated/over-long varint, DATA/CONNECT without deadline, CONNECT with no
 * '/', SYNC payload not a multiple of 8). Unknown types decode fine. */
int rd_msg_decode(const uint8_t *buf, size_t len, rd_msg *out);

/* Number of ids in a SYNC payload, and the i-th one (little-endian int64). */
size_t rd_msg_sync_count(const rd_msg *m);
int64_t rd_msg_sync_id(const rd_msg *m, size_t i);

#endif
