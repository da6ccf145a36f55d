/* A tiny harness for the C unit tests: each test_<concern>.c is one program
 * that runs its TESTs and prints "N passed, N failed". */
#ifndef RD_TEST_H
#define RD_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rd_test_failed_checks;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);        \
      rd_test_failed_checks++;                                                        \
    }                                                                                 \
  } while (0)

#define CHECK_EQ_INT(a, b)                                                            \
  do {                                                                                \
    long long _a = (long long)(a), _b = (long long)(b);                               \
    if (_a != _b) {                                                                   \
      fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__,   \
              #a, #b, _a, _b);                                                        \
      rd_test_failed_checks++;                                                        \
    }                                                                                 \
  } while (0)

#define CHECK_STR(a, b)                                                               \
  do {                                                                                \
    const char *_a = (a), *_b = (b);                                                  \
    if (_a == NULL || strcmp(_a, _b) != 0) {                                          \
      fprintf(stderr, "%s:%d: %s == %s failed:\n  got  \"%s\"\n  want \"%s\"\n",        \
              __FILE__, __LINE__, #a, #b, _a ? _a : "(null)", _b);                    \
      rd_test_failed_checks++;                                                        \
    }                                                                                 \
  } while (0)

#define CHECK_PREFIX(a, b)                                                            \
  do {                                                                                \
    const char *_a = (a), *_b = (b);                                                  \
    if (_a == NULL || strncmp(_a, _b, strlen(_b)) != 0) {                             \
      fprintf(stderr, "%s:%d: %s starts with %s failed:\n  got  \"%s\"\n", __FILE__, \
              __LINE__, #a, #b, _a ? _a : "(null)");                                  \
      rd_test_failed_checks++;                                                        \
    }                                                                                 \
  } while (0)

typedef void (*rd_test_fn)(void);
typedef struct {
  const char *name;
  rd_test_fn fn;
} rd_test_case;

#define TEST(name) static void name(void)

/* Runs the tests in order; a test fails when any of its CHECKs fails. */
static inline int rd_test_run(const rd_test_case *cases, size_t n) {
  int passed = 0, failed = 0;
  for (size_t i = 0; i < n; i++) {
    int before = rd_test_failed_checks;
    cases[i].fn();
    if (rd_test_failed_checks == before) {
      passed++;
    } else {
      failed++;
      fprintf(stderr, "FAILED %s\n", cases[i].name);
    }
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

#define RD_TEST_MAIN(...)                                                             \
  int main(void) {                                                                    \
    static const rd_test_case cases[] = {__VA_ARGS__};                                \
    return rd_test_run(cases, sizeof cases / sizeof cases[0]);                        \
  }
#define T(fn) {#fn, fn}

#endif
