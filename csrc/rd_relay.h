/* The https leg of the /client/ route: the HTTP client's connection joined to
 * a TLS client whose ciphertext travels through a tunneled connection (over a
 * socket pair whose other end is that connection's local end). Once the
 * handshake is done the rewritten request goes out, then bytes flow both ways
 * until the backend ends. A failure before the first response byte answers
 * 500 with the reason (the tunnel's error when it has one, else the TLS
 * error), as the plain http leg does. Loop thread only. */
#ifndef RD_RELAY_H
#define RD_RELAY_H

#include "rd_io.h"
#include "rd_session.h"

/* Takes ownership of user (the client's connection, not reading), backend (a
 * TLS client io whose handshake has not started) and one reference to status
 * (may be NULL); copies request[0..len). Frees everything itself once both
 * ends are closed; on allocation failure it closes them at once. */
void rd_relay_start(rd_io *user, rd_io *backend, rd_dial_status *status, const void *request,
                    size_t len);

#endif
