/* TLS with OpenSSL over a custom BIO (see rd_tls.h).
 *
 * The BIO reads ciphertext from the connection's input block and appends
 * OpenSSL's records to a queue of output blocks, so the only copies are the
 * ones OpenSSL's record layer makes itself. Every SSL call is bracketed by
 * ERR_clear_error so one connection's failure never shows up as another's
 * error text (the queue is per thread, shared by every connection). */
#include "rd_tls.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "rd_alloc.h"

/* Least free space offered for a socket read. */
#define IN_MIN_SPACE 4096
/* Output chunks up to this size are copied into exact-size blocks on take. */
#define OUT_SMALL 2048

struct rd_tls_ctx {
  _Atomic int refs;
  int server;
  SSL_CTX *ssl_ctx; /* replaced by a reload; each SSL holds its own ref */
};

typedef struct out_chunk {
  rd_block *b;
  size_t len;
} out_chunk;

struct rd_tls {
  SSL *ssl;
  int server;
  int failed; /* sticky error code, 0 while healthy */
  unsigned hs_done : 1, peer_closed : 1, shut_sent : 1, oom : 1;
  unsigned cert_asked : 1; /* client: the server asked for a certificate we lack */
  char *server_name; /* client: the name to verify, for error texts */
  /* Ciphertext in: in->payload[in_start..in_end) not yet read by OpenSSL. */
  rd_block *in;
  size_t in_start, in_end;
  /* Ciphertext out: out[out_head..out_n), the last one still filling. */
  out_chunk *out;
  size_t out_head, out_n, out_cap;
  size_t out_bytes;
  char verr[200]; /* the first certificate check that failed, as text */
  char err[256];
};

static void fmt(char *buf, size_t len, const char *f, ...) __attribute__((format(printf, 3, 4)));
static void fmt(char *buf, size_t len, const char *f, ...) {
  if (buf == NULL || len == 0)
    return;
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, len, f, ap);
  va_end(ap);
}

/* The root cause on OpenSSL's error queue (its first entry: later entries
 * are the callers reporting that a callee failed, "PEM lib" and the like). */
static const char *ssl_reason(char *buf, size_t len) {
  unsigned long e = ERR_peek_error();
  if (e == 0)
    return "unknown error";
  if (ERR_SYSTEM_ERROR(e)) {
    fmt(buf, len, "%s", strerror(ERR_GET_REASON(e)));
    return buf;
  }
  const char *r = ERR_reason_error_string(e);
  if (r != NULL)
    return r;
  ERR_error_string_n(e, buf, len);
  return buf;
}

/* ---- the BIO ---- */

static void in_release(rd_tls *t) {
  if (t->in != NULL) {
    rd_block_unref(t->in);
    t->in = NULL;
  }
  t->in_start = t->in_end = 0;
}

static int bio_read(BIO *bio, char *buf, int len) {
  rd_tls *t = BIO_get_data(bio);
  BIO_clear_retry_flags(bio);
  size_t have = t->in_end - t->in_start;
  if (have == 0 || len <= 0) {
    /* Not the end of the stream, just no more bytes yet. */
    BIO_set_retry_read(bio);
    return -1;
  }
  size_t n = have < (size_t)len ? have : (size_t)len;
  memcpy(buf, rd_block_payload(t->in) + t->in_start, n);
  t->in_start += n;
  return (int)n;
}

/* Appends to the output queue, filling the last block before taking a new
 * one from the pool. An allocation failure fails the write without a retry
 * flag, which OpenSSL treats as fatal; t->oom tells the caller why. */
static int bio_write(BIO *bio, const char *data, int len) {
  rd_tls *t = BIO_get_data(bio);
  BIO_clear_retry_flags(bio);
  if (len <= 0)
    return 0;
  size_t left = (size_t)len;
  while (left > 0) {
    out_chunk *last = t->out_n > t->out_head ? &t->out[t->out_n - 1] : NULL;
    size_t room = last != NULL ? rd_block_payload_cap(last->b) - last->len : 0;
    if (room == 0) {
      if (t->out_n == t->out_cap) {
        if (t->out_head > 0) {
          memmove(t->out, t->out + t->out_head, (t->out_n - t->out_head) * sizeof *t->out);
          t->out_n -= t->out_head;
          t->out_head = 0;
        } else {
          size_t cap = t->out_cap ? t->out_cap * 2 : 4;
          out_chunk *o = rd_realloc(t->out, cap * sizeof *o);
          if (o == NULL) {
            t->oom = 1;
            return -1;
          }
          t->out = o;
          t->out_cap = cap;
        }
      }
      rd_block *b = rd_block_get(left);
      if (b == NULL) {
        t->oom = 1;
        return -1;
      }
      last = &t->out[t->out_n++];
      last->b = b;
      last->len = 0;
      room = rd_block_payload_cap(b);
    }
    size_t n = left < room ? left : room;
    memcpy(rd_block_payload(last->b) + last->len, data, n);
    last->len += n;
    data += n;
    left -= n;
  }
  t->out_bytes += (size_t)len;
  return len;
}

static long bio_ctrl(BIO *bio, int cmd, long num, void *ptr) {
  (void)num;
  (void)ptr;
  rd_tls *t = BIO_get_data(bio);
  switch (cmd) {
  case BIO_CTRL_FLUSH:
    return 1;
  case BIO_CTRL_PENDING:
    return t != NULL ? (long)(t->in_end - t->in_start) : 0;
  default:
    return 0; /* no kTLS, no EOF (the caller reports a closed stream), ... */
  }
}

static int bio_create(BIO *bio) {
  BIO_set_init(bio, 1);
  return 1;
}

static int bio_destroy(BIO *bio) {
  BIO_set_data(bio, NULL);
  BIO_set_init(bio, 0);
  return 1;
}

/* Made once per process; kept for its life (OpenSSL has no way to share a
 * method safely with a cleanup). */
static BIO_METHOD *bio_method;
static pthread_once_t bio_once = PTHREAD_ONCE_INIT;

static void bio_method_init(void) {
  BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "rd_tls");
  if (m == NULL)
    return;
  if (!BIO_meth_set_write(m, bio_write) || !BIO_meth_set_read(m, bio_read) ||
      !BIO_meth_set_ctrl(m, bio_ctrl) || !BIO_meth_set_create(m, bio_create) ||
      !BIO_meth_set_destroy(m, bio_destroy)) {
    BIO_meth_free(m);
    return;
  }
  bio_method = m;
}

/* ---- certificate checks, in Go's words ---- */

/* "a, b, 1.2.3.4" from the certificate's DNS and IP SANs; "" when none. */
static void san_list(X509 *cert, char *buf, size_t len) {
  buf[0] = '\0';
  GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
  if (names == NULL)
    return;
  size_t used = 0;
  for (int i = 0; i < sk_GENERAL_NAME_num(names) && used + 1 < len; i++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
    char one[INET6_ADDRSTRLEN + 1];
    const char *s = NULL;
    int slen = 0;
    if (gn->type == GEN_DNS) {
      s = (const char *)ASN1_STRING_get0_data(gn->d.dNSName);
      slen = ASN1_STRING_length(gn->d.dNSName);
    } else if (gn->type == GEN_IPADD) {
      int ilen = ASN1_STRING_length(gn->d.iPAddress);
      const unsigned char *ip = ASN1_STRING_get0_data(gn->d.iPAddress);
      if ((ilen == 4 && inet_ntop(AF_INET, ip, one, sizeof one) != NULL) ||
          (ilen == 16 && inet_ntop(AF_INET6, ip, one, sizeof one) != NULL)) {
        s = one;
        slen = (int)strlen(one);
      }
    }
    if (s == NULL)
      continue;
    int n = snprintf(buf + used, len - used, "%s%.*s", used ? ", " : "", slen, s);
    if (n < 0 || (size_t)n >= len - used) {
      buf[used] = '\0';
      break;
    }
    used += (size_t)n;
  }
  GENERAL_NAMES_free(names);
}

static void time_text(const ASN1_TIME *tm, char *buf, size_t len) {
  buf[0] = '\0';
  if (tm == NULL) /* no certificate at hand: say nothing rather than crash */
    return;
  BIO *mem = BIO_new(BIO_s_mem());
  if (mem == NULL)
    return;
  if (ASN1_TIME_print(mem, tm)) {
    int n = BIO_read(mem, buf, (int)len - 1);
    buf[n > 0 ? n : 0] = '\0';
  }
  BIO_free(mem);
}

static void x509_text(rd_tls *t, int code, X509 *cert, char *buf, size_t len) {
  char names[120], when[40];
  switch (code) {
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
  case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
  case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
  case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    fmt(buf, len, "x509: certificate signed by unknown authority");
    return;
  case X509_V_ERR_CERT_HAS_EXPIRED:
    time_text(cert != NULL ? X509_get0_notAfter(cert) : NULL, when, sizeof when);
    fmt(buf, len, "x509: certificate has expired or is not yet valid: current time is after %s",
        when);
    return;
  case X509_V_ERR_CERT_NOT_YET_VALID:
    time_text(cert != NULL ? X509_get0_notBefore(cert) : NULL, when, sizeof when);
    fmt(buf, len,
        "x509: certificate has expired or is not yet valid: current time is before %s", when);
    return;
  case X509_V_ERR_HOSTNAME_MISMATCH:
  case X509_V_ERR_IP_ADDRESS_MISMATCH:
    names[0] = '\0';
    if (cert != NULL)
      san_list(cert, names, sizeof names);
    if (names[0] != '\0')
      fmt(buf, len, "x509: certificate is valid for %s, not %s", names,
          t->server_name ? t->server_name : "");
    else
      fmt(buf, len, "x509: certificate is not valid for any names, but wanted to match %s",
          t->server_name ? t->server_name : "");
    return;
  default:
    fmt(buf, len, "x509: %s", X509_verify_cert_error_string(code));
  }
}

/* Records the first failed check with the certificate it concerns (the
 * chain is gone by the time the handshake reports failure). Never changes
 * the verdict. */
static int verify_cb(int ok, X509_STORE_CTX *sc) {
  if (ok)
    return ok;
  SSL *ssl = X509_STORE_CTX_get_ex_data(sc, SSL_get_ex_data_X509_STORE_CTX_idx());
  rd_tls *t = ssl != NULL ? SSL_get_app_data(ssl) : NULL;
  if (t == NULL || t->verr[0] != '\0')
    return ok;
  int code = X509_STORE_CTX_get_error(sc);
  /* Name mismatches are reported on the leaf; the rest on the cert at fault. */
  X509 *cert = (code == X509_V_ERR_HOSTNAME_MISMATCH || code == X509_V_ERR_IP_ADDRESS_MISMATCH)
                   ? X509_STORE_CTX_get0_cert(sc)
                   : X509_STORE_CTX_get_current_cert(sc);
  x509_text(t, code, cert, t->verr, sizeof t->verr);
  return ok;
}

/* Called only when the server asks for a certificate and none is
 * configured: remembered so the alert that follows can be explained. */
static int client_cert_cb(SSL *ssl, X509 **cert, EVP_PKEY **key) {
  (void)cert;
  (void)key;
  rd_tls *t = SSL_get_app_data(ssl);
  if (t != NULL)
    t->cert_asked = 1;
  return 0;
}

/* ---- contexts ---- */

/* Keys are never decrypted: without this OpenSSL would prompt on the tty. */
static int no_password_cb(char *buf, int size, int rwflag, void *u) {
  (void)buf;
  (void)size;
  (void)rwflag;
  if (u != NULL)
    *(int *)u = 1; /* so the error can say the key is encrypted */
  return -1;
}

static SSL_CTX *ctx_base(int server, char *err, size_t errlen) {
  char r[160];
  SSL_CTX *c = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (c == NULL) {
    fmt(err, errlen, "tls: cannot create context: %s", ssl_reason(r, sizeof r));
    return NULL;
  }
  SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
  if (SSL_CTX_get_security_level(c) < 2)
    SSL_CTX_set_security_level(c, 2);
  SSL_CTX_set_options(c, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  /* Idle tunnels are the common case: let OpenSSL drop its record buffers
   * between records. */
  SSL_CTX_set_mode(c, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_default_passwd_cb(c, no_password_cb);
  if (server) {
    /* No resumption: agents reconnect rarely, and tickets cost every
     * handshake a flight the client ignores. */
    SSL_CTX_set_options(c, SSL_OP_NO_TICKET | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_num_tickets(c, 0);
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
  } else {
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
  }
  return c;
}

/* Loads a certificate chain and its key into c. */
static int load_identity(SSL_CTX *c, const char *cert, const char *key, char *err,
                         size_t errlen) {
  char r[160];
  ERR_clear_error();
  if (SSL_CTX_use_certificate_chain_file(c, cert) != 1) {
    fmt(err, errlen, "tls: cannot load certificate chain from %s: %s", cert,
        ssl_reason(r, sizeof r));
    return RD_ETLS;
  }
  int asked = 0;
  SSL_CTX_set_default_passwd_cb_userdata(c, &asked);
  int ok = SSL_CTX_use_PrivateKey_file(c, key, SSL_FILETYPE_PEM);
  SSL_CTX_set_default_passwd_cb_userdata(c, NULL);
  if (ok != 1) {
    unsigned long e = ERR_peek_error();
    if (asked)
      fmt(err, errlen, "tls: cannot load private key from %s: it is encrypted (passphrases "
          "are not supported)", key);
    else if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH)
      fmt(err, errlen, "tls: private key %s does not match the certificate in %s", key, cert);
    else
      fmt(err, errlen, "tls: cannot load private key from %s: %s", key, ssl_reason(r, sizeof r));
    return RD_ETLS;
  }
  /* Loading the key checks it against the leaf already; this catches a
   * key file that held no key for it at all. */
  if (SSL_CTX_check_private_key(c) != 1) {
    fmt(err, errlen, "tls: private key %s does not match the certificate in %s", key, cert);
    return RD_ETLS;
  }
  return 0;
}

/* Selects http/1.1 when the client offers it; no ALPN otherwise (never a
 * reason to fail the handshake). */
static int alpn_select_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg) {
  (void)ssl;
  (void)arg;
  for (unsigned int i = 0; i < inlen;) {
    unsigned int n = in[i];
    if (i + 1 + n > inlen)
      break;
    if (n == 8 && memcmp(in + i + 1, "http/1.1", 8) == 0) {
      *out = in + i + 1;
      *outlen = (unsigned char)n;
      return SSL_TLSEXT_ERR_OK;
    }
    i += 1 + n;
  }
  return SSL_TLSEXT_ERR_NOACK;
}

static SSL_CTX *server_ssl_ctx(const char *cert, const char *key, const char *client_ca,
                               char *err, size_t errlen) {
  char r[160];
  if (cert == NULL || key == NULL || !*cert || !*key) {
    fmt(err, errlen, "tls: a server needs both a certificate and a key file");
    return NULL;
  }
  ERR_clear_error();
  SSL_CTX *c = ctx_base(1, err, errlen);
  if (c == NULL)
    goto fail;
  if (load_identity(c, cert, key, err, errlen) != 0)
    goto fail;
  if (client_ca != NULL) {
    ERR_clear_error();
    if (SSL_CTX_load_verify_locations(c, client_ca, NULL) != 1) {
      fmt(err, errlen, "tls: cannot load client CA from %s: %s", client_ca,
          ssl_reason(r, sizeof r));
      goto fail;
    }
    /* The CA names sent in CertificateRequest, so clients pick the right cert. */
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(client_ca);
    if (names == NULL) {
      fmt(err, errlen, "tls: no CA certificate in %s", client_ca);
      goto fail;
    }
    SSL_CTX_set_client_CA_list(c, names);
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verify_cb);
  }
  SSL_CTX_set_alpn_select_cb(c, alpn_select_cb, NULL);
  ERR_clear_error();
  return c;
fail:
  SSL_CTX_free(c);
  ERR_clear_error();
  return NULL;
}

static rd_tls_ctx *ctx_wrap(SSL_CTX *c, int server, char *err, size_t errlen) {
  rd_tls_ctx *ctx = rd_malloc(sizeof *ctx);
  if (ctx == NULL) {
    SSL_CTX_free(c);
    fmt(err, errlen, "tls: out of memory");
    return NULL;
  }
  atomic_init(&ctx->refs, 1);
  ctx->server = server;
  ctx->ssl_ctx = c;
  return ctx;
}

rd_tls_ctx *rd_tls_ctx_new_server(const char *cert_pem_path, const char *key_pem_path,
                                  const char *client_ca_path, char *err, size_t errlen) {
  fmt(err, errlen, "%s", "");
  SSL_CTX *c = server_ssl_ctx(cert_pem_path, key_pem_path, client_ca_path, err, errlen);
  return c != NULL ? ctx_wrap(c, 1, err, errlen) : NULL;
}

rd_tls_ctx *rd_tls_ctx_new_client(const char *ca_file, int insecure, const char *client_cert,
                                  const char *client_key, char *err, size_t errlen) {
  char r[160];
  fmt(err, errlen, "%s", "");
  if ((client_cert == NULL) != (client_key == NULL)) {
    fmt(err, errlen, "tls: a client certificate needs both a certificate and a key file");
    return NULL;
  }
  ERR_clear_error();
  SSL_CTX *c = ctx_base(0, err, errlen);
  if (c == NULL)
    goto fail;
  if (insecure) {
    SSL_CTX_set_verify(c, SSL_VERIFY_NONE, NULL);
  } else {
    int ok = ca_file != NULL ? SSL_CTX_load_verify_locations(c, ca_file, NULL)
                             : SSL_CTX_set_default_verify_paths(c);
    if (ok != 1) {
      if (ca_file != NULL)
        fmt(err, errlen, "tls: cannot load CA file %s: %s", ca_file, ssl_reason(r, sizeof r));
      else
        fmt(err, errlen, "tls: cannot load the system trust store: %s", ssl_reason(r, sizeof r));
      goto fail;
    }
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER, verify_cb);
  }
  if (client_cert != NULL && load_identity(c, client_cert, client_key, err, errlen) != 0)
    goto fail;
  if (client_cert == NULL)
    SSL_CTX_set_client_cert_cb(c, client_cert_cb);
  /* Returns 0 on success, unlike its neighbours. */
  if (SSL_CTX_set_alpn_protos(c, (const unsigned char *)"\x08http/1.1", 9) != 0) {
    fmt(err, errlen, "tls: out of memory");
    goto fail;
  }
  ERR_clear_error();
  return ctx_wrap(c, 0, err, errlen);
fail:
  SSL_CTX_free(c);
  ERR_clear_error();
  return NULL;
}

int rd_tls_ctx_reload_server(rd_tls_ctx *ctx, const char *cert_pem_path, const char *key_pem_path,
                             const char *client_ca_path, char *err, size_t errlen) {
  fmt(err, errlen, "%s", "");
  if (!ctx->server) {
    fmt(err, errlen, "tls: only a server context can be reloaded");
    return RD_ETLS;
  }
  SSL_CTX *c = server_ssl_ctx(cert_pem_path, key_pem_path, client_ca_path, err, errlen);
  if (c == NULL)
    return RD_ETLS;
  SSL_CTX_free(ctx->ssl_ctx);
  ctx->ssl_ctx = c;
  return 0;
}

void rd_tls_ctx_ref(rd_tls_ctx *ctx) { atomic_fetch_add(&ctx->refs, 1); }

void rd_tls_ctx_unref(rd_tls_ctx *ctx) {
  if (ctx == NULL || atomic_fetch_sub(&ctx->refs, 1) != 1)
    return;
  SSL_CTX_free(ctx->ssl_ctx);
  rd_free(ctx);
}

/* ---- connections ---- */

/* Parses an IP literal ("[::1]" allowed) into buf; returns 1 when it is one. */
static int ip_literal(const char *name, char *buf, size_t len) {
  size_t n = strlen(name);
  if (n >= 2 && name[0] == '[' && name[n - 1] == ']') {
    name++;
    n -= 2;
  }
  if (n == 0 || n >= len)
    return 0;
  memcpy(buf, name, n);
  buf[n] = '\0';
  unsigned char addr[16];
  return inet_pton(AF_INET, buf, addr) == 1 || inet_pton(AF_INET6, buf, addr) == 1;
}

rd_tls *rd_tls_new(rd_tls_ctx *ctx, const char *server_name, char *err, size_t errlen) {
  fmt(err, errlen, "%s", "");
  pthread_once(&bio_once, bio_method_init);
  int verifying = SSL_CTX_get_verify_mode(ctx->ssl_ctx) != SSL_VERIFY_NONE;
  if (!ctx->server && verifying && (server_name == NULL || *server_name == '\0')) {
    fmt(err, errlen, "tls: a server name is needed to verify the server's certificate");
    return NULL;
  }
  rd_tls *t = rd_calloc(1, sizeof *t);
  if (t == NULL)
    goto oom;
  t->server = ctx->server;
  if (!ctx->server && server_name != NULL &&
      (t->server_name = rd_strndup(server_name, strlen(server_name))) == NULL)
    goto oom;
  if (bio_method == NULL)
    goto oom;
  ERR_clear_error();
  t->ssl = SSL_new(ctx->ssl_ctx);
  if (t->ssl == NULL)
    goto oom;
  BIO *bio = BIO_new(bio_method);
  if (bio == NULL)
    goto oom;
  BIO_set_data(bio, t);
  SSL_set_bio(t->ssl, bio, bio); /* one reference, owned by the SSL */
  SSL_set_app_data(t->ssl, t);
  if (ctx->server) {
    SSL_set_accept_state(t->ssl);
  } else {
    SSL_set_connect_state(t->ssl);
    char ip[64];
    if (t->server_name != NULL && ip_literal(t->server_name, ip, sizeof ip)) {
      /* RFC 6066: SNI carries host names only. */
      if (verifying && X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), ip) != 1)
        goto oom;
    } else if (t->server_name != NULL) {
      if (SSL_set_tlsext_host_name(t->ssl, t->server_name) != 1) {
        fmt(err, errlen, "tls: invalid server name %s", t->server_name);
        goto fail;
      }
      if (verifying) {
        /* Like Go: SANs only, never the subject's CN. */
        SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS |
                                      X509_CHECK_FLAG_NEVER_CHECK_SUBJECT);
        if (SSL_set1_host(t->ssl, t->server_name) != 1)
          goto oom;
      }
    }
  }
  ERR_clear_error();
  return t;
oom:
  fmt(err, errlen, "tls: out of memory");
fail:
  if (t != NULL) {
    SSL_free(t->ssl);
    rd_free(t->server_name);
    rd_free(t);
  }
  ERR_clear_error();
  return NULL;
}

void rd_tls_free(rd_tls *t) {
  if (t == NULL)
    return;
  SSL_free(t->ssl); /* and the BIO */
  in_release(t);
  for (size_t i = t->out_head; i < t->out_n; i++)
    rd_block_unref(t->out[i].b);
  rd_free(t->out);
  rd_free(t->server_name);
  rd_free(t);
}

/* -- ciphertext in -- */

int rd_tls_in_buf(rd_tls *t, uint8_t **buf, size_t *len) {
  size_t have = t->in_end - t->in_start;
  if (t->in == NULL) {
    if ((t->in = rd_block_get(RD_BLOCK_SIZE)) == NULL)
      return RD_ENOMEM;
    t->in_start = t->in_end = 0;
  } else if (rd_block_payload_cap(t->in) - t->in_end < IN_MIN_SPACE) {
    size_t cap = rd_block_payload_cap(t->in);
    if (cap - have >= IN_MIN_SPACE) {
      memmove(rd_block_payload(t->in), rd_block_payload(t->in) + t->in_start, have);
    } else {
      /* The caller has stopped draining; keep taking bytes rather than
       * handing libuv an empty buffer. */
      rd_block *nb = rd_block_get(cap * 2);
      if (nb == NULL)
        return RD_ENOMEM;
      memcpy(rd_block_payload(nb), rd_block_payload(t->in) + t->in_start, have);
      rd_block_unref(t->in);
      t->in = nb;
    }
    t->in_start = 0;
    t->in_end = have;
  }
  *buf = rd_block_payload(t->in) + t->in_end;
  *len = rd_block_payload_cap(t->in) - t->in_end;
  return 0;
}

void rd_tls_in_commit(rd_tls *t, size_t n) {
  if (t->in != NULL && n <= rd_block_payload_cap(t->in) - t->in_end)
    t->in_end += n;
}

int rd_tls_feed(rd_tls *t, const uint8_t *data, size_t len) {
  while (len > 0) {
    uint8_t *buf;
    size_t room;
    if (rd_tls_in_buf(t, &buf, &room) != 0)
      return RD_ENOMEM;
    size_t n = len < room ? len : room;
    memcpy(buf, data, n);
    rd_tls_in_commit(t, n);
    data += n;
    len -= n;
  }
  return 0;
}

/* Hands the input block back to the pool once OpenSSL has read it all, so an
 * idle connection holds no buffer. */
static void in_trim(rd_tls *t) {
  if (t->in != NULL && t->in_start == t->in_end)
    in_release(t);
}

/* -- progress -- */

/* A TLS alert's name as Go prints it (OpenSSL 3.0 does not know the TLS 1.3
 * ones), so both ends of a mixed tunnel report the same words. */
static const char *alert_name(int alert) {
  switch (alert) {
  case 0: return "close notify";
  case 10: return "unexpected message";
  case 20: return "bad record MAC";
  case 21: return "decryption failed";
  case 22: return "record overflow";
  case 30: return "decompression failure";
  case 40: return "handshake failure";
  case 42: return "bad certificate";
  case 43: return "unsupported certificate";
  case 44: return "revoked certificate";
  case 45: return "expired certificate";
  case 46: return "unknown certificate";
  case 47: return "illegal parameter";
  case 48: return "unknown certificate authority";
  case 49: return "access denied";
  case 50: return "error decoding message";
  case 51: return "error decrypting message";
  case 70: return "protocol version not supported";
  case 71: return "insufficient security level";
  case 80: return "internal error";
  case 86: return "inappropriate fallback";
  case 90: return "user canceled";
  case 100: return "no renegotiation";
  case 109: return "missing extension";
  case 110: return "unsupported extension";
  case 112: return "unrecognized name";
  case 113: return "bad certificate status response";
  case 115: return "unknown PSK identity";
  case 116: return "certificate required";
  case 120: return "no application protocol";
  default: return NULL;
  }
}

/* Turns a failed SSL call into a code, recording the text for real
 * failures. Must run before anything else touches the error queue. */
static int tls_fail(rd_tls *t, int rc, const char *what) {
  int e = SSL_get_error(t->ssl, rc);
  if (e == SSL_ERROR_WANT_READ && !t->oom) {
    ERR_clear_error();
    return RD_EPARTIAL;
  }
  if (e == SSL_ERROR_ZERO_RETURN) {
    t->peer_closed = 1;
    fmt(t->err, sizeof t->err, "tls: connection closed by peer (close_notify)");
    ERR_clear_error();
    return RD_ECLOSED;
  }
  if (t->oom) {
    fmt(t->err, sizeof t->err, "tls: out of memory");
    t->failed = RD_ENOMEM;
    ERR_clear_error();
    return RD_ENOMEM;
  }
  t->failed = RD_ETLS;
  unsigned long err = ERR_peek_error();
  int reason = ERR_GET_REASON(err);
  const char *side =
      t->server ? "tls: failed to verify client certificate: " : "tls: failed to verify certificate: ";
  char r[160];
  if (e != SSL_ERROR_SSL || err == 0) {
    fmt(t->err, sizeof t->err, "tls: %s failed (internal error %d)", what, e);
  } else if (t->verr[0] != '\0' &&
             (reason == SSL_R_CERTIFICATE_VERIFY_FAILED ||
              SSL_get_verify_result(t->ssl) != X509_V_OK)) {
    fmt(t->err, sizeof t->err, "%s%s", side, t->verr);
  } else if (reason == SSL_R_CERTIFICATE_VERIFY_FAILED) {
    char x[200];
    x509_text(t, (int)SSL_get_verify_result(t->ssl), NULL, x, sizeof x);
    fmt(t->err, sizeof t->err, "%s%s", side, x);
  } else if (reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
    fmt(t->err, sizeof t->err, "tls: client certificate required");
  } else if (reason == SSL_R_HTTP_REQUEST || reason == SSL_R_HTTPS_PROXY_REQUEST) {
    fmt(t->err, sizeof t->err, "tls: client sent an HTTP request to an HTTPS server");
  } else if (ERR_GET_LIB(err) == ERR_LIB_SSL && reason >= SSL_AD_REASON_OFFSET &&
             reason < SSL_AD_REASON_OFFSET + 256) {
    /* A fatal alert from the peer: its reason is offset by the alert code. */
    int alert = reason - SSL_AD_REASON_OFFSET;
    char num[24];
    const char *name = alert_name(alert);
    if (name == NULL) {
      fmt(num, sizeof num, "alert(%d)", alert);
      name = num;
    }
    /* TLS 1.3 says "certificate required"; TLS 1.2 servers send a bare
     * handshake failure, explained by the request we could not answer. */
    if (alert == SSL_AD_CERTIFICATE_REQUIRED ||
        (t->cert_asked && (alert == SSL_AD_HANDSHAKE_FAILURE || alert == SSL_AD_BAD_CERTIFICATE)))
      fmt(t->err, sizeof t->err,
          "remote error: tls: %s (the server requires a client certificate)", name);
    else
      fmt(t->err, sizeof t->err, "remote error: tls: %s", name);
  } else {
    fmt(t->err, sizeof t->err, "tls: %s failure: %s", what, ssl_reason(r, sizeof r));
  }
  ERR_clear_error();
  return RD_ETLS;
}

static int sticky(const rd_tls *t) { return t->failed; }

int rd_tls_handshake(rd_tls *t) {
  if (sticky(t))
    return t->failed;
  if (t->hs_done)
    return 0;
  if (t->peer_closed)
    return RD_ECLOSED;
  ERR_clear_error();
  int rc = SSL_do_handshake(t->ssl);
  int code = 0;
  if (rc == 1)
    t->hs_done = 1;
  else
    code = tls_fail(t, rc, "handshake");
  in_trim(t);
  return code;
}

int rd_tls_handshake_done(const rd_tls *t) { return t->hs_done; }

int64_t rd_tls_read(rd_tls *t, uint8_t *out, size_t cap) {
  if (sticky(t))
    return t->failed;
  if (t->peer_closed)
    return RD_ECLOSED;
  size_t total = 0;
  int code = 0;
  while (total < cap) {
    size_t n = 0;
    ERR_clear_error();
    if (SSL_read_ex(t->ssl, out + total, cap - total, &n) == 1) {
      total += n;
      continue;
    }
    code = tls_fail(t, 0, t->hs_done ? "read" : "handshake");
    break;
  }
  if (!t->hs_done && SSL_is_init_finished(t->ssl))
    t->hs_done = 1;
  in_trim(t);
  /* A close or failure after some bytes is reported on the next call: the
   * state that says so is sticky. */
  return total > 0 ? (int64_t)total : code;
}

int rd_tls_write(rd_tls *t, const void *data, size_t len) {
  if (sticky(t))
    return t->failed;
  if (t->shut_sent)
    return RD_ECLOSED;
  if (!t->hs_done) {
    int rc = rd_tls_handshake(t);
    if (rc != 0)
      return rc;
  }
  const uint8_t *p = data;
  while (len > 0) {
    size_t n = 0;
    ERR_clear_error();
    if (SSL_write_ex(t->ssl, p, len, &n) != 1) {
      /* The BIO never asks to retry and renegotiation is off, so "want
       * read" here would mean a broken peer: fatal like the rest. */
      int code = tls_fail(t, 0, "write");
      if (code == RD_EPARTIAL || code == RD_ECLOSED) {
        t->failed = RD_ETLS;
        fmt(t->err, sizeof t->err, "tls: write failed");
        code = RD_ETLS;
      }
      return code;
    }
    p += n;
    len -= n;
  }
  return 0;
}

int rd_tls_shutdown(rd_tls *t) {
  if (sticky(t))
    return t->failed;
  if (t->shut_sent)
    return 0;
  t->shut_sent = 1;
  if (!t->hs_done)
    return 0;
  ERR_clear_error();
  int rc = SSL_shutdown(t->ssl);
  if (rc < 0) {
    int code = tls_fail(t, rc, "shutdown");
    if (code != RD_EPARTIAL && code != RD_ECLOSED)
      return code;
  }
  ERR_clear_error();
  return 0;
}

/* -- ciphertext out -- */

size_t rd_tls_output_pending(const rd_tls *t) { return t->out_bytes; }

rd_block *rd_tls_take_output(rd_tls *t, size_t *len) {
  *len = 0;
  if (t->out_head == t->out_n)
    return NULL;
  out_chunk *c = &t->out[t->out_head];
  rd_block *b = c->b;
  if (c->len <= OUT_SMALL && rd_block_payload_cap(b) > OUT_SMALL) {
    rd_block *small = rd_block_get_small(c->len);
    if (small == NULL)
      return NULL;
    memcpy(rd_block_payload(small), rd_block_payload(b), c->len);
    rd_block_unref(b);
    b = small;
  }
  *len = c->len;
  t->out_bytes -= c->len;
  if (++t->out_head == t->out_n)
    t->out_head = t->out_n = 0;
  return b;
}

/* -- state -- */

const char *rd_tls_error(const rd_tls *t) { return t->err; }

const char *rd_tls_version(const rd_tls *t) {
  return t->hs_done ? SSL_get_version(t->ssl) : "";
}

const char *rd_tls_cipher(const rd_tls *t) {
  const char *c = t->hs_done ? SSL_get_cipher_name(t->ssl) : NULL;
  return c != NULL ? c : "";
}

/* A memory BIO's contents as an rd_malloc'ed string. */
static char *bio_string(BIO *b) {
  char *data = NULL;
  long n = BIO_get_mem_data(b, &data);
  return n >= 0 ? rd_strndup(data != NULL ? data : "", (size_t)n) : NULL;
}

/* One SAN as "KIND:value\n" into b. */
static void san_print(BIO *b, const GENERAL_NAME *g) {
  if (g->type == GEN_DNS || g->type == GEN_URI || g->type == GEN_EMAIL) {
    const char *kind = g->type == GEN_DNS ? "DNS" : g->type == GEN_URI ? "URI" : "email";
    const ASN1_IA5STRING *v = g->d.ia5;
    BIO_printf(b, "%s:%.*s\n", kind, v->length, (const char *)v->data);
  } else if (g->type == GEN_IPADD) {
    const ASN1_OCTET_STRING *ip = g->d.iPAddress;
    char text[64] = "";
    if (ip->length == 4 || ip->length == 16)
      inet_ntop(ip->length == 4 ? AF_INET : AF_INET6, ip->data, text, sizeof text);
    BIO_printf(b, "IP:%s\n", text);
  }
}

int rd_tls_peer_cert(const rd_tls *t, char **subject, char **sans, char **sha256_hex) {
  *subject = *sans = *sha256_hex = NULL;
  X509 *cert = t->hs_done ? SSL_get1_peer_certificate(t->ssl) : NULL;
  if (cert == NULL)
    return 0;
  BIO *sb = BIO_new(BIO_s_mem()), *nb = BIO_new(BIO_s_mem());
  int rc = RD_ENOMEM;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  if (sb != NULL && nb != NULL && X509_digest(cert, EVP_sha256(), md, &mdlen) == 1) {
    X509_NAME_print_ex(sb, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; names != NULL && i < sk_GENERAL_NAME_num(names); i++)
      san_print(nb, sk_GENERAL_NAME_value(names, i));
    GENERAL_NAMES_free(names);
    *subject = bio_string(sb);
    *sans = bio_string(nb);
    *sha256_hex = rd_malloc(2 * mdlen + 1);
    if (*sha256_hex != NULL)
      for (unsigned int i = 0; i < mdlen; i++)
        snprintf(*sha256_hex + 2 * i, 3, "%02x", md[i]);
    if (*subject != NULL && *sans != NULL && *sha256_hex != NULL) {
      rc = 1;
    } else {
      rd_free(*subject);
      rd_free(*sans);
      rd_free(*sha256_hex);
      *subject = *sans = *sha256_hex = NULL;
    }
  }
  BIO_free(sb);
  BIO_free(nb);
  X509_free(cert);
  return rc;
}
