/* TLS over the loop's own buffers: OpenSSL driven through a custom BIO, with
 * no sockets and no libuv. The owner of a stream feeds the ciphertext it read
 * in, takes plaintext out into its own buffers, hands plaintext to encrypt,
 * and sends the ciphertext that comes out. A session layered on top never
 * learns whether its stream is encrypted.
 *
 * Copies: ciphertext is read by the socket straight into this layer's input
 * buffer (rd_tls_in_buf), and OpenSSL's records are written straight into
 * pooled rd_blocks whose ownership passes to the caller for its write
 * (rd_tls_take_output), so there is no memory-BIO copy on either side.
 *
 * Errors are texts that say which check failed, in the words Go's crypto/tls
 * uses ("x509: certificate signed by unknown authority", ...), so operators
 * see the same message from either end of a tunnel. Loop thread only, except
 * for rd_tls_ctx_ref/unref. */
#ifndef RD_TLS_H
#define RD_TLS_H

#include "rd_block.h"
#include "rd_common.h"

/* Failures come back as RD_ETLS (rd_common.h); rd_tls_error() says which:
 * handshake, certificate check, alert from the peer or a bad record. */

typedef struct rd_tls_ctx rd_tls_ctx;
typedef struct rd_tls rd_tls;

/* ---- contexts: settings shared by many connections ---- */

/* A server context: the certificate chain (leaf first, then intermediates)
 * from cert_pem_path, its private key from key_pem_path (checked against the
 * leaf; encrypted keys are refused, never prompted for), and, when
 * client_ca_path is not NULL, mandatory client certificates verified against
 * the CAs in that PEM file. TLS 1.2 minimum, OpenSSL's default ciphers at
 * security level 2 or above, no compression, no renegotiation, no session
 * resumption. Returns a context with one reference, or NULL with the reason
 * in err (always NUL-terminated when errlen > 0). */
rd_tls_ctx *rd_tls_ctx_new_server(const char *cert_pem_path, const char *key_pem_path,
                                  const char *client_ca_path, char *err, size_t errlen);

/* A client context. Verifies the server against ca_file (PEM) or, when
 * ca_file is NULL, the system trust store; insecure = 1 skips verification
 * entirely (chain and name). client_cert and client_key (both or neither)
 * give a certificate chain to present when the server asks. Offers ALPN
 * "http/1.1". Returns a context with one reference, or NULL with err. */
rd_tls_ctx *rd_tls_ctx_new_client(const char *ca_file, int insecure, const char *client_cert,
                                  const char *client_key, char *err, size_t errlen);

/* Replaces a server context's certificate, key and client CA (same meaning
 * as rd_tls_ctx_new_server). Connections made afterwards use the new ones;
 * existing connections keep theirs until they end. On failure nothing
 * changes. Same thread as rd_tls_new. Returns 0, or RD_ETLS (a client
 * context, or the files did not load) with err. */
int rd_tls_ctx_reload_server(rd_tls_ctx *ctx, const char *cert_pem_path, const char *key_pem_path,
                             const char *client_ca_path, char *err, size_t errlen);

/* References (atomic: any thread). The last unref frees the context;
 * connections made from it stay valid (they hold OpenSSL's own reference). */
void rd_tls_ctx_ref(rd_tls_ctx *ctx);
void rd_tls_ctx_unref(rd_tls_ctx *ctx);

/* ---- connections ---- */

/* A connection in the context's role. server_name (client only; NULL on a
 * server) is the name the certificate must match: a DNS name, which is also
 * sent as SNI, or an IP address (v4, or v6 with or without brackets), which
 * is checked against the certificate's IP SANs and never sent as SNI. A
 * verifying client requires one. The client's first flight is produced by
 * the first rd_tls_handshake call. Returns NULL with err on allocation
 * failure or a missing server_name. */
rd_tls *rd_tls_new(rd_tls_ctx *ctx, const char *server_name, char *err, size_t errlen);

/* Frees the connection, its buffers and any ciphertext not yet taken. Sends
 * nothing: call rd_tls_shutdown and flush first for a clean close. */
void rd_tls_free(rd_tls *t);

/* -- ciphertext in -- */

/* Space for the next socket read (a libuv alloc callback): *buf, *len (at
 * least 4096 bytes). The space stays valid until the next call on t other
 * than rd_tls_in_commit. Returns 0 or RD_ENOMEM. */
int rd_tls_in_buf(rd_tls *t, uint8_t **buf, size_t *len);
/* Records that n bytes were read into the space from rd_tls_in_buf. */
void rd_tls_in_commit(rd_tls *t, size_t n);
/* Copies len bytes of ciphertext in (for bytes that are already in some
 * other buffer). Returns 0, or RD_ENOMEM (then only a prefix may have been
 * taken: drop the connection). */
int rd_tls_feed(rd_tls *t, const uint8_t *data, size_t len);

/* -- progress; after every call below, send what rd_tls_take_output gives,
 *    even after an error (it may hold the alert that tells the peer why) -- */

/* Advances the handshake with the ciphertext fed so far. Returns 0 once it
 * is complete, RD_EPARTIAL when more ciphertext is needed, RD_ECLOSED if
 * the peer closed, RD_ETLS or RD_ENOMEM on failure (sticky: every later
 * call returns the same code). */
int rd_tls_handshake(rd_tls *t);
/* 1 once the handshake has completed (rd_tls_read may complete it too). */
int rd_tls_handshake_done(const rd_tls *t);

/* Decrypts into out[0..cap), driving the handshake first if needed. Returns
 * the plaintext byte count (> 0; it reads as many records as fit), or
 * RD_EPARTIAL (no complete record: feed more), RD_ECLOSED (the peer sent
 * close_notify; sticky), RD_ETLS or RD_ENOMEM (sticky). When bytes were
 * read before a close or failure, they are returned and the code comes on
 * the next call. cap 0 returns 0. Call it until it returns RD_EPARTIAL:
 * records already fed in are not announced by any later socket read. */
int64_t rd_tls_read(rd_tls *t, uint8_t *out, size_t cap);

/* Encrypts all len bytes into pending ciphertext (the caller's buffer is not
 * kept). Returns 0, RD_EPARTIAL if the handshake is not complete yet (nothing
 * written; the handshake was advanced), RD_ECLOSED after rd_tls_shutdown,
 * RD_ETLS or RD_ENOMEM (sticky). */
int rd_tls_write(rd_tls *t, const void *data, size_t len);

/* Queues close_notify; later writes return RD_ECLOSED. Before the handshake
 * completes it only marks the connection closed. Idempotent. Returns 0 or
 * the sticky failure code. */
int rd_tls_shutdown(rd_tls *t);

/* -- ciphertext out -- */

/* Bytes of ciphertext waiting to be taken. */
size_t rd_tls_output_pending(const rd_tls *t);
/* Takes the oldest chunk of pending ciphertext: the bytes are at
 * rd_block_payload(b)[0..*len) and the caller owns the block's reference
 * (rd_block_unref it once the write completes). Chunks are at most
 * RD_BLOCK_SIZE bytes except when one record is larger; chunks of 2 KiB or
 * less come in exact-size blocks so queued small writes do not pin 64 KiB
 * each. Returns NULL when nothing is pending or on allocation failure (then
 * the chunk stays queued and rd_tls_output_pending() is still > 0). */
rd_block *rd_tls_take_output(rd_tls *t, size_t *len);

/* -- state -- */

/* Text of the failure that made a call return RD_ETLS, RD_ENOMEM or
 * RD_ECLOSED; "" before any. Valid until t is freed. */
const char *rd_tls_error(const rd_tls *t);
/* Negotiated protocol ("TLSv1.3") and cipher names; static strings, or
 * "" before the handshake completes. */
const char *rd_tls_version(const rd_tls *t);
/* The verified certificate the peer presented, after the handshake: its
 * subject (RFC 2253 one line), its subject alternative names ("DNS:name",
 * "IP:addr", "URI:...", "email:...", each line ended by '\n') and the
 * SHA-256 of its DER as lowercase hex. Each is an rd_malloc'ed string the
 * caller frees. Returns 1, 0 when there is none, RD_ENOMEM. */
int rd_tls_peer_cert(const rd_tls *t, char **subject, char **sans, char **sha256_hex);
const char *rd_tls_cipher(const rd_tls *t);

#endif
