/* libFuzzer target for the TLS layer (rd_tls): untrusted ciphertext fed to a
 * server connection (with and without mandatory client certificates) and to
 * a client connection (verifying a host name or an IP address, or not
 * verifying at all), in chunks the way a socket delivers it, with an
 * optional allocation failure.
 *
 * Checks: every call returns a code its header documents; a failure is
 * sticky and has a text; ciphertext output is handed out whole; and once the
 * connection is freed, every block and byte it took from the engine's
 * allocator is back (OpenSSL's own memory is LeakSanitizer's to check).
 *
 * Input: byte 0 picks the context (bits 0-1: server, server requiring client
 * certificates, verifying client, insecure client), the chunk size (bits
 * 2-3: all, 1, 13 or 517 bytes), the feeding path (bit 4: rd_tls_in_buf +
 * rd_tls_in_commit, else rd_tls_feed), the driving call (bit 5: rd_tls_read,
 * else rd_tls_handshake), an allocation failure (bit 6: byte 1 bits 0-6 say
 * which allocation) and the client's server name (bit 7: 127.0.0.1, else
 * localhost). Byte 1 bit 7 writes plaintext before the handshake is done.
 * The rest is what the peer sends.
 *
 * The identities below exist for this target only (P-256 keys, valid
 * 2000-2100): a CA, a server certificate for localhost and 127.0.0.1 and a
 * client certificate, both signed by it. The seeds in fuzz/corpus/tls are
 * flights recorded with Python's ssl module (ssl.MemoryBIO) from peers using
 * these identities, plus certificates for another name and an expired one
 * signed by the same CA, HTTP in place of TLS, and bare alerts. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_tls.h"
#include "fuzz.h"

/* The CA: signs both certificates below. */
static const char CA_PEM[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBXjCCAQOgAwIBAgIBATAKBggqhkjOPQQDAjAVMRMwEQYDVQQDDApyZC1mdXp6\n"
    "LWNhMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAVMRMwEQYDVQQD\n"
    "DApyZC1mdXp6LWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE0iRoahnxLgIg\n"
    "vlZTDHtdDIuv5ehacOXHvV+b2Ey7e6RPL20H0CTx/Gd53oMyP3IM3vHJi9fie+zr\n"
    "oFR7tbMf2aNCMEAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwHQYD\n"
    "VR0OBBYEFAyEdyauLwB7lGRTF21MowxozquOMAoGCCqGSM49BAMCA0kAMEYCIQCt\n"
    "TTB2vwiH7s6kJBxFr4mrq07ZCcYE/8e0kG+tWAJeCgIhAMfT8+PErkAykb/4gOC7\n"
    "QS2abN/wABmf8CGjAq2f+8z1\n"
    "-----END CERTIFICATE-----\n";

/* Server: localhost, 127.0.0.1. */
static const char SERVER_CERT_PEM[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBnjCCAUSgAwIBAgIBAjAKBggqhkjOPQQDAjAVMRMwEQYDVQQDDApyZC1mdXp6\n"
    "LWNhMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAWMRQwEgYDVQQD\n"
    "DAtyZC1mdXp6LXNydjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABBP/UGJxTWOp\n"
    "XG9nY8toszQhEtg8SdxQOsyIyklVkcrpTTC/r8YP8P8as5gQnE3Bw+G6g5Wm4n+P\n"
    "+FAyc/KaMHGjgYEwfzAMBgNVHRMBAf8EAjAAMBoGA1UdEQQTMBGCCWxvY2FsaG9z\n"
    "dIcEfwAAATATBgNVHSUEDDAKBggrBgEFBQcDATAfBgNVHSMEGDAWgBQMhHcmri8A\n"
    "e5RkUxdtTKMMaM6rjjAdBgNVHQ4EFgQUo4MtXILwWWu0BIYxlfOr0UbC7DYwCgYI\n"
    "KoZIzj0EAwIDSAAwRQIgZcAJDDWtY5qL6cw0arFt6hlFmCOd3pS8v4thUUCNW5cC\n"
    "IQDuSAghOXJa04Be7WmwjsAnIF0Dn8sE6kuv8l+7sQlXfA==\n"
    "-----END CERTIFICATE-----\n";

static const char SERVER_KEY_PEM[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg5yhAJq8Wueer8oFb\n"
    "XNslcQyXoUgFatOEdMc5vclzSkehRANCAAQT/1BicU1jqVxvZ2PLaLM0IRLYPEnc\n"
    "UDrMiMpJVZHK6U0wv6/GD/D/GrOYEJxNwcPhuoOVpuJ/j/hQMnPymjBx\n"
    "-----END PRIVATE KEY-----\n";

/* Client certificate. */
static const char CLIENT_CERT_PEM[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBgDCCASegAwIBAgIBAzAKBggqhkjOPQQDAjAVMRMwEQYDVQQDDApyZC1mdXp6\n"
    "LWNhMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAWMRQwEgYDVQQD\n"
    "DAtyZC1mdXp6LWNsaTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABFpPRSPLqQC8\n"
    "4MYOUqBCkuV6SLWI+kFdnDi6OF5a5eRefyF+l8dSkHSOGEGgQD36lHgLq5f9PtJD\n"
    "Owl0mgzFbXWjZTBjMAwGA1UdEwEB/wQCMAAwEwYDVR0lBAwwCgYIKwYBBQUHAwIw\n"
    "HwYDVR0jBBgwFoAUDIR3Jq4vAHuUZFMXbUyjDGjOq44wHQYDVR0OBBYEFLpnW6uF\n"
    "xqZJOcOISxNmdPbv12TpMAoGCCqGSM49BAMCA0cAMEQCICT2BuQ5zP+aYnYcHMsS\n"
    "SjT8u7Zy4IkGlpxovyQ+g16UAiAa917JZLVvTnyqgVKXXNB0ZFL9kJffIUJEDj0w\n"
    "Vm5ijw==\n"
    "-----END CERTIFICATE-----\n";

static const char CLIENT_KEY_PEM[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgwva4Fa4nU0i/5Qyt\n"
    "AGNxfp1IG18Pop30VaCH6RBPGsChRANCAARaT0Ujy6kAvODGDlKgQpLleki1iPpB\n"
    "XZw4ujheWuXkXn8hfpfHUpB0jhhBoEA9+pR4C6uX/T7SQzsJdJoMxW11\n"
    "-----END PRIVATE KEY-----\n";

/* RD_FUZZ_VERBOSE=1: print each input's outcome (to see what seeds reach). */
static int verbose;

enum { CTX_SERVER, CTX_SERVER_MTLS, CTX_CLIENT_VERIFY, CTX_CLIENT_INSECURE, CTX_COUNT };
static rd_tls_ctx *contexts[CTX_COUNT];

/* Contexts load files, so the identities go to a private directory that is
 * removed again once they are loaded. */
static void write_file(const char *dir, const char *name, const char *text, char *path,
                       size_t len) {
  snprintf(path, len, "%s/%s", dir, name);
  FILE *f = fopen(path, "w");
  FUZZ_ASSERT(f != NULL);
  FUZZ_ASSERT(fputs(text, f) >= 0);
  FUZZ_ASSERT(fclose(f) == 0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  verbose = getenv("RD_FUZZ_VERBOSE") != NULL && *getenv("RD_FUZZ_VERBOSE") == '1';
  const char *tmp = getenv("TMPDIR");
  char dir[512];
  snprintf(dir, sizeof dir, "%s/rd-fuzz-tls-XXXXXX", tmp != NULL && *tmp ? tmp : "/tmp");
  FUZZ_ASSERT(mkdtemp(dir) != NULL);
  char ca[600], cert[600], key[600], ccert[600], ckey[600], err[256];
  write_file(dir, "ca.pem", CA_PEM, ca, sizeof ca);
  write_file(dir, "server.pem", SERVER_CERT_PEM, cert, sizeof cert);
  write_file(dir, "server.key", SERVER_KEY_PEM, key, sizeof key);
  write_file(dir, "client.pem", CLIENT_CERT_PEM, ccert, sizeof ccert);
  write_file(dir, "client.key", CLIENT_KEY_PEM, ckey, sizeof ckey);
  contexts[CTX_SERVER] = rd_tls_ctx_new_server(cert, key, NULL, err, sizeof err);
  contexts[CTX_SERVER_MTLS] = rd_tls_ctx_new_server(cert, key, ca, err, sizeof err);
  /* The verifying client has a certificate to present; the insecure one
   * does not, so a CertificateRequest takes the "none to send" path. */
  contexts[CTX_CLIENT_VERIFY] = rd_tls_ctx_new_client(ca, 0, ccert, ckey, err, sizeof err);
  contexts[CTX_CLIENT_INSECURE] = rd_tls_ctx_new_client(NULL, 1, NULL, NULL, err, sizeof err);
  for (int i = 0; i < CTX_COUNT; i++) {
    if (contexts[i] == NULL) {
      fprintf(stderr, "fuzz_tls: context %d: %s\n", i, err);
      abort();
    }
  }
  unlink(ca);
  unlink(cert);
  unlink(key);
  unlink(ccert);
  unlink(ckey);
  rmdir(dir);
  return 0;
}

static int is_code(int64_t r) {
  return r == RD_EPARTIAL || r == RD_ECLOSED || r == RD_ETLS || r == RD_ENOMEM;
}

/* Hands out every pending byte of ciphertext, as a connection's writes
 * would; an injected allocation failure may leave it queued for later. */
static void drain(rd_tls *t) {
  for (int failures = 0; rd_tls_output_pending(t) > 0;) {
    size_t pending = rd_tls_output_pending(t), len = 0;
    rd_block *b = rd_tls_take_output(t, &len);
    if (b == NULL) {
      FUZZ_ASSERT(rd_tls_output_pending(t) == pending);
      FUZZ_ASSERT(++failures < 3); /* only one allocation is made to fail */
      continue;
    }
    FUZZ_ASSERT(len > 0 && len <= pending);
    FUZZ_ASSERT(rd_tls_output_pending(t) == pending - len);
    rd_block_unref(b);
  }
}

static int feed(rd_tls *t, const uint8_t *p, size_t n, int use_in_buf) {
  if (!use_in_buf)
    return rd_tls_feed(t, p, n);
  while (n > 0) {
    uint8_t *buf;
    size_t room;
    if (rd_tls_in_buf(t, &buf, &room) != 0)
      return RD_ENOMEM;
    FUZZ_ASSERT(buf != NULL && room >= 4096);
    size_t k = n < room ? n : room;
    memcpy(buf, p, k);
    rd_tls_in_commit(t, k);
    p += k;
    n -= k;
  }
  return 0;
}

/* Advances the connection with what was fed; 0 while it can go on, else the
 * code that ends it. */
static int drive(rd_tls *t, int use_read) {
  if (!use_read) {
    int r = rd_tls_handshake(t);
    FUZZ_ASSERT(r == 0 || is_code(r));
    FUZZ_ASSERT((r == 0) == (rd_tls_handshake_done(t) != 0));
    if (r != 0)
      return r == RD_EPARTIAL ? 0 : r;
  }
  uint8_t buf[4096];
  for (int i = 0; i < 64; i++) {
    int64_t n = rd_tls_read(t, buf, sizeof buf);
    FUZZ_ASSERT((n > 0 && n <= (int64_t)sizeof buf) || is_code(n));
    if (n <= 0)
      return n == RD_EPARTIAL ? 0 : (int)n;
  }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const size_t chunks[4] = {SIZE_MAX, 1, 13, 517};
  if (size < 2)
    return 0;
  uint8_t mode = data[0], extra = data[1];
  data += 2;
  size -= 2;
  int which = mode & 3, use_in_buf = (mode >> 4) & 1, use_read = (mode >> 5) & 1;
  int inject = (mode >> 6) & 1, early_write = extra >> 7;
  size_t chunk = chunks[(mode >> 2) & 3];
  if (chunk == 1 && size > 2048)
    chunk = 64; /* one byte at a time, but not for ages */
  const char *name = NULL;
  if (which == CTX_CLIENT_VERIFY || which == CTX_CLIENT_INSECURE)
    name = mode & 0x80 ? "127.0.0.1" : "localhost";

  int64_t heap = rd_alloc_bytes() - rd_block_pool_bytes();
  if (inject)
    rd_alloc_fail_nth(extra & 0x7f);
  char err[256];
  rd_tls *t = rd_tls_new(contexts[which], name, err, sizeof err);
  if (t == NULL) {
    FUZZ_ASSERT(inject && strcmp(err, "tls: out of memory") == 0);
    goto done;
  }

  int code = 0;
  if (name != NULL) {
    /* A client speaks first: its ClientHello goes out before any input. */
    code = rd_tls_handshake(t);
    FUZZ_ASSERT(code == RD_EPARTIAL || (inject && code == RD_ENOMEM));
    code = code == RD_EPARTIAL ? 0 : code;
    drain(t);
  }
  if (code == 0 && early_write) {
    int r = rd_tls_write(t, "early", 5);
    FUZZ_ASSERT(r == RD_EPARTIAL || r == RD_ENOMEM || r == RD_ETLS);
    code = r == RD_EPARTIAL ? 0 : r;
    drain(t);
  }
  for (size_t off = 0; code == 0 && off < size;) {
    size_t n = size - off < chunk ? size - off : chunk;
    if (feed(t, data + off, n, use_in_buf) != 0) {
      FUZZ_ASSERT(inject);
      code = RD_ENOMEM; /* the owner drops the connection */
      break;
    }
    off += n;
    code = drive(t, use_read);
    drain(t);
  }

  if (code == RD_ETLS || code == RD_ENOMEM) {
    /* Sticky, with a reason. */
    uint8_t buf[16];
    FUZZ_ASSERT(rd_tls_handshake(t) == code);
    FUZZ_ASSERT(rd_tls_read(t, buf, sizeof buf) == code);
    FUZZ_ASSERT(rd_tls_write(t, "x", 1) == code);
    FUZZ_ASSERT(rd_tls_shutdown(t) == code);
    FUZZ_ASSERT(rd_tls_error(t)[0] != '\0');
    FUZZ_ASSERT(code != RD_ENOMEM || inject);
  } else if (code == RD_ECLOSED) {
    uint8_t buf[16];
    FUZZ_ASSERT(rd_tls_read(t, buf, sizeof buf) == RD_ECLOSED);
  } else if (rd_tls_handshake_done(t)) {
    int r = rd_tls_write(t, "after", 5);
    FUZZ_ASSERT(r == 0 || r == RD_ENOMEM || r == RD_ETLS);
    FUZZ_ASSERT(rd_tls_version(t)[0] != '\0' && rd_tls_cipher(t)[0] != '\0');
  }
  if (code != RD_ETLS && code != RD_ENOMEM) {
    int r = rd_tls_shutdown(t);
    FUZZ_ASSERT(r == 0 || r == RD_ETLS || r == RD_ENOMEM);
    FUZZ_ASSERT(rd_tls_write(t, "x", 1) != 0);
  }
  drain(t);
  FUZZ_ASSERT(strlen(rd_tls_error(t)) < 256);
  if (verbose)
    fprintf(stderr, "fuzz_tls: context %d, code %d, handshake %s, error \"%s\"\n", which, code,
            rd_tls_handshake_done(t) ? "done" : "not done", rd_tls_error(t));
  FUZZ_ASSERT(rd_tls_version(t) != NULL && rd_tls_cipher(t) != NULL);
  rd_tls_free(t);

done:
  rd_alloc_fail_nth(-1);
  FUZZ_ASSERT(rd_block_in_use() == 0);
  FUZZ_ASSERT(rd_alloc_bytes() - rd_block_pool_bytes() == heap);
  return 0;
}
