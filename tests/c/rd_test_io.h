/* Helpers for the C tests that play a peer over real descriptors: a
 * monotonic clock, reads and writes bounded by a deadline (the tests wait on
 * events, never on bare sleeps), and a test body run in a child process. */
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

/* Runs body in a child process and checks that it exits 0 within
 * timeout_s (an alarm kills a hang: it fails the test, never the run). The
 * child's exit runs LeakSanitizer. */
static inline void run_in_child(int (*body)(void), const char *what, unsigned timeout_s) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid < 0)
    return;
  if (pid == 0) {
    alarm(timeout_s);
    exit(body() == 0 ? 0 : 1);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status))
    fprintf(stderr, "  %s: child killed by signal %d (%s)\n", what, WTERMSIG(status),
            strsignal(WTERMSIG(status)));
  CHECK(WIFEXITED(status));
  CHECK_EQ_INT(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);
}

#endif
