/* Helpers for the C tests that play a peer over real descriptors: a
 * monotonic clock, reads and writes bounded by a deadline (the tests wait on
 * events, never on bare sleeps), a test body run in a child process, and a
 * runner that gives every case a process of its own. */
#ifndef RD_TEST_IO_H
#define RD_TEST_IO_H

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rd_test.h"

static inline uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Waits for events on fd until deadline (ms on now_ms's clock); 1 if ready. */
static inline int wait_fd(int fd, short events, uint64_t deadline) {
  for (;;) {
    uint64_t now = now_ms();
    if (now >= deadline)
      return 0;
    struct pollfd p = {fd, events, 0};
    int n = poll(&p, 1, (int)(deadline - now));
    if (n > 0)
      return 1;
    if (n < 0 && errno != EINTR)
      return 0;
  }
}

/* Reads exactly n bytes; returns how many arrived before EOF, error or timeout. */
static inline size_t read_n(int fd, void *buf, size_t n, uint64_t timeout_ms) {
  uint64_t deadline = now_ms() + timeout_ms;
  size_t got = 0;
  while (got < n && wait_fd(fd, POLLIN, deadline)) {
    ssize_t r = recv(fd, (char *)buf + got, n - got, MSG_DONTWAIT);
    if (r > 0)
      got += (size_t)r;
    else if (r == 0 || (errno != EINTR && errno != EAGAIN))
      break;
  }
  return got;
}

/* Writes all n bytes within timeout_ms: 0, or -1 on error or timeout. */
static inline int write_all(int fd, const void *buf, size_t n, uint64_t timeout_ms) {
  uint64_t deadline = now_ms() + timeout_ms;
  size_t done = 0;
  while (done < n) {
    if (!wait_fd(fd, POLLOUT, deadline))
      return -1;
    ssize_t w = send(fd, (const char *)buf + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0)
      done += (size_t)w;
    else if (w < 0 && errno != EINTR && errno != EAGAIN)
      return -1;
  }
  return 0;
}

/* Forks, runs body in the child and waits for it: 1 when the child exited 0
 * within timeout_s. An alarm kills a child that hangs (SIGALRM, reported as
 * a timeout); a child killed by a signal is reported. The child leaves
 * through exit(), so LeakSanitizer checks it (a leak makes it exit non-zero). */
static inline int rd_test_child_passes(int (*body)(void), const char *what, unsigned timeout_s,
                                       int *status_out) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "  %s: fork: %s\n", what, strerror(errno));
    *status_out = -1;
    return 0;
  }
  if (pid == 0) {
    alarm(timeout_s);
    exit(body() == 0 ? 0 : 1);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  *status_out = status;
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
    fprintf(stderr, "  %s: timed out after %u s\n", what, timeout_s);
  else if (WIFSIGNALED(status))
    fprintf(stderr, "  %s: child killed by signal %d (%s)\n", what, WTERMSIG(status),
            strsignal(WTERMSIG(status)));
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* Runs body in a child process and checks that it exits 0 within
 * timeout_s (an alarm kills a hang: it fails the test, never the run). The
 * child's exit runs LeakSanitizer. */
static inline void run_in_child(int (*body)(void), const char *what, unsigned timeout_s) {
  int status = 0;
  if (rd_test_child_passes(body, what, timeout_s, &status))
    return;
  CHECK(status != -1);
  CHECK(WIFEXITED(status));
  CHECK_EQ_INT(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);
}

/* ---- one process per case ---- */

/* A program whose cases each need a process of their own (the engine is a
 * process-wide singleton that cannot restart after rd_engine_shutdown, and a
 * forked child starts a fresh one) runs them with RD_TEST_MAIN_ISOLATED:
 * each case is forked from a parent that never starts the engine nor any
 * thread, runs under an alarm of timeout_s, then runs after_each (e.g. shut
 * the engine down and check that it returned everything) and exits; the case
 * fails when the child fails a CHECK, dies of a signal or times out, or when
 * LeakSanitizer finds a leak at its exit. No case can see what another left.
 * Arguments, if any, pick the cases to run: those whose name contains one. */
static const rd_test_case *rd_test_isolated_case;
static void (*rd_test_isolated_after)(void);

static inline int rd_test_isolated_body(void) {
  rd_test_isolated_case->fn();
  if (rd_test_isolated_after != NULL)
    rd_test_isolated_after();
  return rd_test_failed_checks;
}

static inline int rd_test_picked(const char *name, int argc, char **argv) {
  for (int i = 1; i < argc; i++)
    if (strstr(name, argv[i]) != NULL)
      return 1;
  return argc <= 1;
}

static inline int rd_test_run_isolated(const rd_test_case *cases, size_t n, unsigned timeout_s,
                                       void (*after_each)(void), int argc, char **argv) {
  int passed = 0, failed = 0;
  rd_test_isolated_after = after_each;
  for (size_t i = 0; i < n; i++) {
    if (!rd_test_picked(cases[i].name, argc, argv))
      continue;
    rd_test_isolated_case = &cases[i];
    int status = 0;
    if (rd_test_child_passes(rd_test_isolated_body, cases[i].name, timeout_s, &status)) {
      passed++;
    } else {
      failed++;
      if (status != -1 && WIFEXITED(status) && WEXITSTATUS(status) != 1)
        fprintf(stderr, "  %s: child exited %d\n", cases[i].name, WEXITSTATUS(status));
      fprintf(stderr, "FAILED %s\n", cases[i].name);
    }
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

#define RD_TEST_MAIN_ISOLATED(timeout_s, after_each, ...)                             \
  int main(int argc, char **argv) {                                                   \
    static const rd_test_case cases[] = {__VA_ARGS__};                                \
    return rd_test_run_isolated(cases, sizeof cases / sizeof cases[0], (timeout_s),   \
                                (after_each), argc, argv);                            \
  }

#endif
