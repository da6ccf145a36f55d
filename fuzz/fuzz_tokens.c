/* libFuzzer target for the bearer-token table (rd_tokens): any text is
 * parsed, and the result compared with a reference reading of the format
 * written here from the header's description alone. The error (which line,
 * which complaint) or the table must agree; then every token the reference
 * found, near misses of each (one byte shorter, longer, changed) and slices
 * of the input must look up the same client key in both. With an injected
 * allocation failure the parse either fails with "out of memory" or agrees,
 * and nothing it allocated stays allocated.
 *
 * Input: byte 0 bit 0 arms an allocation failure, byte 1 says which
 * allocation (0-255); the rest is the token file.
 *
 * Format (rd_tokens.h): lines "TOKEN CLIENT_KEY", fields separated by
 * spaces, tabs (and CRs, so CRLF files read the same), blank lines and
 * lines starting with '#' (after leading blanks) skipped, tokens of 16
 * bytes or more; a control character (NUL included) in a field is an error. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rd_alloc.h"
#include "rd_tokens.h"
#include "fuzz.h"

#define MAX_ENTRIES 4096

typedef struct ref_entry {
  const char *token, *key;
  size_t token_len, key_len;
} ref_entry;

typedef struct ref_table {
  ref_entry e[MAX_ENTRIES];
  size_t count;
  char err[128]; /* "" when the text is valid */
} ref_table;

static int blank(char c) { return c == ' ' || c == '\t' || c == '\r'; }

/* The reference reading; returns 0, or -1 when the table would not fit. */
static int ref_parse(const char *text, size_t len, ref_table *t) {
  t->count = 0;
  t->err[0] = '\0';
  size_t lineno = 0;
  const char *p = text, *end = text + len;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (eol == NULL)
      eol = end;
    lineno++;
    const char *fields[3];
    size_t lens[3], n = 0;
    for (const char *q = p; q < eol;) {
      while (q < eol && blank(*q))
        q++;
      if (q == eol)
        break;
      const char *f = q;
      while (q < eol && !blank(*q))
        q++;
      if (n < 3) {
        fields[n] = f;
        lens[n] = (size_t)(q - f);
      }
      n++;
    }
    p = eol < end ? eol + 1 : end;
    if (n == 0 || fields[0][0] == '#')
      continue;
    if (n != 2) {
      snprintf(t->err, sizeof t->err, "line %zu: expected \"TOKEN CLIENT_KEY\"", lineno);
      return 0;
    }
    for (int k = 0; k < 2; k++)
      for (size_t i = 0; i < lens[k]; i++) {
        unsigned char ch = (unsigned char)fields[k][i];
        if (ch < 0x20 || ch == 0x7f) {
          snprintf(t->err, sizeof t->err, "line %zu: control character in token or client key",
                   lineno);
          return 0;
        }
      }
    if (lens[0] < 16) {
      snprintf(t->err, sizeof t->err, "line %zu: token shorter than 16 characters", lineno);
      return 0;
    }
    if (t->count == MAX_ENTRIES)
      return -1;
    t->e[t->count++] = (ref_entry){fields[0], fields[1], lens[0], lens[1]};
  }
  return 0;
}

/* The first entry for the token wins, as in a file read top to bottom. */
static const ref_entry *ref_lookup(const ref_table *t, const char *token, size_t len) {
  for (size_t i = 0; i < t->count; i++)
    if (t->e[i].token_len == len && memcmp(t->e[i].token, token, len) == 0)
      return &t->e[i];
  return NULL;
}

static void check_lookup(const rd_tokens *tokens, const ref_table *ref, const char *token,
                         size_t len) {
  const char *got = rd_tokens_lookup(tokens, token, len);
  const ref_entry *want = ref_lookup(ref, token, len);
  if (want == NULL) {
    FUZZ_ASSERT(got == NULL);
    return;
  }
  FUZZ_ASSERT(got != NULL);
  const char *nul = memchr(want->key, '\0', want->key_len);
  size_t key_len = nul != NULL ? (size_t)(nul - want->key) : want->key_len;
  FUZZ_ASSERT(strlen(got) == key_len && memcmp(got, want->key, key_len) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static ref_table ref;
  static char near[1 << 16];
  if (size < 2)
    return 0;
  int inject = data[0] & 1;
  int64_t fail_at = data[1];
  const char *text = (const char *)data + 2;
  size_t len = size - 2;
  if (ref_parse(text, len, &ref) != 0)
    return 0; /* more entries than the reference keeps: not interesting */

  int64_t bytes = rd_alloc_bytes(), objects = rd_alloc_objects();
  char err[128];
  memset(err, 0x55, sizeof err); /* the message must be written, NUL-terminated */
  if (inject)
    rd_alloc_fail_nth(fail_at);
  rd_tokens *tokens = rd_tokens_parse(text, len, err, sizeof err);
  rd_alloc_fail_nth(-1);

  if (tokens == NULL) {
    FUZZ_ASSERT(memchr(err, '\0', sizeof err) != NULL);
    if (inject && strcmp(err, "out of memory") == 0)
      goto done;
    FUZZ_ASSERT(ref.err[0] != '\0');
    FUZZ_ASSERT(strcmp(err, ref.err) == 0);
    goto done;
  }
  FUZZ_ASSERT(ref.err[0] == '\0');
  FUZZ_ASSERT(rd_tokens_count(tokens) == ref.count);
  for (size_t i = 0; i < ref.count; i++) {
    const ref_entry *e = &ref.e[i];
    check_lookup(tokens, &ref, e->token, e->token_len);
    /* Near misses: a prefix, one byte changed, one byte more. */
    check_lookup(tokens, &ref, e->token, e->token_len - 1);
    if (e->token_len < sizeof near) {
      memcpy(near, e->token, e->token_len);
      near[e->token_len - 1] ^= 1;
      check_lookup(tokens, &ref, near, e->token_len);
      near[e->token_len - 1] ^= 1;
      if (e->token_len + 1 < sizeof near) {
        near[e->token_len] = 'x';
        check_lookup(tokens, &ref, near, e->token_len + 1);
      }
    }
  }
  /* Slices of the input, the whole of it and nothing at all. */
  check_lookup(tokens, &ref, text, len);
  check_lookup(tokens, &ref, "", 0);
  for (size_t off = 0; off + 16 <= len && off < 256; off += 7) {
    size_t n = 16 + off % 23;
    check_lookup(tokens, &ref, text + off, off + n <= len ? n : len - off);
  }
  rd_tokens_free(tokens);

done:
  FUZZ_ASSERT(rd_alloc_bytes() == bytes && rd_alloc_objects() == objects);
  return 0;
}
