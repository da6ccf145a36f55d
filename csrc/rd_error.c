/* Error texts: our own block, and libuv's for transport codes. */
#include <string.h>

#include <uv.h>

#include "rd_common.h"

const char *rd_strerror(int code) {
  switch (code) {
  case RD_OK:
    return "success";
  case RD_EPARTIAL:
    return "incomplete input";
  case RD_EMALFORMED:
    return "malformed input";
  case RD_ETOOLARGE:
    return "size limit exceeded";
  case RD_EPROTO:
    return "tunnel protocol violation";
  case RD_ENOSESSION:
    return "no session for client key";
  case RD_ECLOSED:
    return "already closed";
  case RD_ENOMEM:
    return "out of memory";
  case RD_ETIMEDOUT:
    return "deadline exceeded";
  case RD_EREFUSED:
    return "connect not allowed";
  case RD_EUNAUTHORIZED:
    return "unauthorized";
  case RD_ETOOMANY:
    return "too many connections";
  case RD_EINVAL:
    return "not allowed in this state";
  case RD_ETLS:
    return "TLS failure";
  }
  /* uv_strerror leaks a heap string for codes it does not know, so ask the
   * reentrant variant first and only hand out libuv's static texts. */
  char probe[32];
  uv_strerror_r(code, probe, sizeof probe);
  if (strncmp(probe, "Unknown system error", 20) == 0)
    return "unknown error";
  return uv_strerror(code);
}
