/* Shared definitions for every layer: error codes and small helpers.
 * Codecs include only this header (no uv.h, no Python.h). */
#ifndef RD_COMMON_H
#define RD_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Our own error block, below libuv's codes (libuv's are > -4096). Transport
 * errors reuse libuv's negative codes unchanged. */
enum {
  RD_OK = 0,
  RD_EPARTIAL = -20001,     /* parser: need more bytes */
  RD_EMALFORMED = -20002,   /* parser: input violates the format */
  RD_ETOOLARGE = -20003,    /* parser: a size or count limit was exceeded */
  RD_EPROTO = -20004,       /* a peer broke the tunnel protocol */
  RD_ENOSESSION = -20005,   /* no session for the client key */
  RD_ECLOSED = -20006,      /* object already closed */
  RD_ENOMEM = -20007,       /* allocation failed */
  RD_ETIMEDOUT = -20008,    /* an engine-level deadline passed */
  RD_EREFUSED = -20009,     /* the connect authorizer refused */
  RD_EUNAUTHORIZED = -20010, /* the server authorizer refused */
  RD_ETOOMANY = -20011,      /* a configured limit was reached */
  RD_EINVAL = -20012,        /* a call that does not fit the object's state */
  RD_ETLS = -20030           /* TLS failed: handshake, verification or record */
};

#define RD_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* The struct of type type whose member member is at ptr. */
#define rd_container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Returns a static description of an rd_ code, or of a libuv code when the
 * engine is linked (rd_error.c); never NULL. */
const char *rd_strerror(int code);

#endif
