#include "rd_tokens.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <string.h>

#include "rd_alloc.h"

/* Tokens are kept as SHA-256 digests: lookups compare fixed-size digests,
 * so neither a token's length nor its bytes show in the timing. */
typedef struct entry {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  char *key;
} entry;

struct rd_tokens {
  entry *entries;
  size_t count;
};

void rd_tokens_free(rd_tokens *t) {
  if (t == NULL)
    return;
  for (size_t i = 0; i < t->count; i++)
    rd_free(t->entries[i].key);
  rd_free(t->entries);
  rd_free(t);
}

size_t rd_tokens_count(const rd_tokens *t) { return t->count; }

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r'; }

rd_tokens *rd_tokens_parse(const char *text, size_t len, char *err, size_t errlen) {
  rd_tokens *t = rd_calloc(1, sizeof *t);
  if (t == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  size_t cap = 0, lineno = 0;
  const char *p = text, *end = text + len;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (eol == NULL)
      eol = end;
    lineno++;
    const char *q = p;
    p = eol < end ? eol + 1 : end;
    while (q < eol && is_space(*q))
      q++;
    if (q == eol || *q == '#')
      continue;
    const char *tok = q;
    while (q < eol && !is_space(*q))
      q++;
    size_t tlen = (size_t)(q - tok);
    while (q < eol && is_space(*q))
      q++;
    const char *key = q;
    while (q < eol && !is_space(*q))
      q++;
    size_t klen = (size_t)(q - key);
    while (q < eol && is_space(*q))
      q++;
    if (klen == 0 || q != eol) {
      snprintf(err, errlen, "line %zu: expected \"TOKEN CLIENT_KEY\"", lineno);
      goto fail;
    }
    for (size_t i = 0; i < tlen + klen; i++) {
      unsigned char ch = (unsigned char)(i < tlen ? tok[i] : key[i - tlen]);
      if (ch < 0x20 || ch == 0x7f) {
        snprintf(err, errlen, "line %zu: control character in token or client key", lineno);
        goto fail;
      }
    }
    if (tlen < 16) {
      snprintf(err, errlen, "line %zu: token shorter than 16 characters", lineno);
      goto fail;
    }
    if (t->count == cap) {
      size_t ncap = cap ? cap * 2 : 8;
      entry *e = rd_realloc(t->entries, ncap * sizeof *e);
      if (e == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail;
      }
      t->entries = e;
      cap = ncap;
    }
    entry *e = &t->entries[t->count];
    SHA256((const unsigned char *)tok, tlen, e->digest);
    e->key = rd_strndup(key, klen);
    if (e->key == NULL) {
      snprintf(err, errlen, "out of memory");
      goto fail;
    }
    t->count++;
  }
  return t;
fail:
  rd_tokens_free(t);
  return NULL;
}

const char *rd_tokens_lookup(const rd_tokens *t, const char *token, size_t len) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256((const unsigned char *)token, len, digest);
  const char *found = NULL;
  for (size_t i = 0; i < t->count; i++) {
    /* No early exit: every entry costs the same. */
    int same = CRYPTO_memcmp(digest, t->entries[i].digest, sizeof digest) == 0;
    if (same && found == NULL)
      found = t->entries[i].key;
  }
  return found;
}
