/* Bearer tokens mapped to client keys: the built-in authorizer for real
 * deployments. Pure: parses a text, looks tokens up in constant time. */
#ifndef RD_TOKENS_H
#define RD_TOKENS_H

#include "rd_common.h"

typedef struct rd_tokens rd_tokens;

/* Parses lines "TOKEN CLIENT_KEY" (blank lines and lines starting with '#'
 * skipped; fields separated by spaces or tabs; tokens at least 16 bytes).
 * Returns the table (rd_tokens_free it) or NULL with a message naming the
 * line in err. */
rd_tokens *rd_tokens_parse(const char *text, size_t len, char *err, size_t errlen);
void rd_tokens_free(rd_tokens *t);
size_t rd_tokens_count(const rd_tokens *t);

/* The client key for token[0..len), or NULL. Every entry is compared in
 * constant time, whatever matches, so timing does not reveal tokens. */
const char *rd_tokens_lookup(const rd_tokens *t, const char *token, size_t len);

#endif
