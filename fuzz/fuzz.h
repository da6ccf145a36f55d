/* Shared by the fuzz targets: a failed check names itself, then aborts, which
 * libFuzzer reports as a crash with the input that caused it. */
#ifndef RD_FUZZ_H
#define RD_FUZZ_H

#include <stdio.h>
#include <stdlib.h>

#define FUZZ_ASSERT(c)                                                                \
  do {                                                                                \
    if (!(c)) {                                                                       \
      fprintf(stderr, "%s:%d: FUZZ_ASSERT(%s) failed\n", __FILE__, __LINE__, #c);   \
      abort();                                                                        \
    }                                                                                 \
  } while (0)

#endif
