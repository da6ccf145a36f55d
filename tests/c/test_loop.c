/* Tests of the loop thread's own contracts (rd_loop.h): posting without
 * waiting and completion on an eventfd. The engine is a process-wide singleton,
 * so every test runs in a child process of its own (as libuv runs its
 * tests) and ends with the engine shut down and every allocation returned.
 * Synchronisation is on real events: eventfds, poll, waitpid. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_api.h"
#include "rd_loop.h"
#include "rd_test.h"

#define WAIT_MS 5000 /* the bound of every wait */

/* 1 when fd is readable within WAIT_MS. */
static int readable(int fd) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  int n;
  while ((n = poll(&p, 1, WAIT_MS)) < 0 && errno == EINTR) {
  }
  return n == 1 && (p.revents & POLLIN);
}

static uint64_t read_count(int fd) {
  uint64_t n = 0;
  if (read(fd, &n, sizeof n) != (ssize_t)sizeof n)
    return 0;
  return n;
}

/* Shuts the engine down and checks that nothing it allocated is left. */
static void check_engine_freed(void) {
  rd_engine_shutdown();
  CHECK_EQ_INT(rd_alloc_bytes(), 0);
  CHECK_EQ_INT(rd_alloc_objects(), 0);
}

/* Runs body in a child process and checks that it exited 0 in time. */
static void run_in_child(int (*body)(void), const char *what) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid < 0)
    return;
  if (pid == 0) {
    alarm(4 * WAIT_MS / 1000); /* a hang fails the test, never the run */
    exit(body() == 0 ? 0 : 1); /* LeakSanitizer runs at exit */
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

/* ---- posting ---- */

/* A command that completes only when told to, from a later command: what a
 * close that waits for handles does. */
typedef struct {
  rd_cmd cmd;
  int ran;
} held_cmd;
static held_cmd *g_held;

static void held_run(rd_cmd *c) {
  held_cmd *h = (held_cmd *)c;
  h->ran = 1;
  g_held = h; /* loop thread only */
}

static void release_run(rd_cmd *c) {
  rd_cmd_finishf(&g_held->cmd, -7, "released by %s", "the next command");
  g_held = NULL;
  rd_cmd_finish(c, RD_OK, NULL);
}

static int post_child(void) {
  int before = rd_test_failed_checks;
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  CHECK(efd >= 0);
  held_cmd held;
  memset(&held, 0, sizeof held);
  held.cmd.run = held_run;
  /* The post returns before the command has completed (it cannot: only the
   * next command completes it). */
  CHECK_EQ_INT(rd_engine_post(&held.cmd, efd), RD_OK);
  CHECK(!rd_cmd_done(&held.cmd));
  rd_cmd release;
  memset(&release, 0, sizeof release);
  release.run = release_run;
  /* Both share one eventfd, as an event loop's reader would. */
  CHECK_EQ_INT(rd_engine_post(&release, efd), RD_OK);
  uint64_t seen = 0;
  while (seen < 2 && readable(efd))
    seen += read_count(efd);
  CHECK_EQ_INT(seen, 2);
  CHECK(rd_cmd_done(&held.cmd) && rd_cmd_done(&release));
  CHECK(held.ran);
  CHECK_EQ_INT(held.cmd.status, -7);
  CHECK(strcmp(held.cmd.error, "released by the next command") == 0);
  CHECK_EQ_INT(release.status, RD_OK);
  /* The blocking call is the same path with a private eventfd. */
  held_cmd again;
  memset(&again, 0, sizeof again);
  again.cmd.run = held_run;
  CHECK_EQ_INT(rd_engine_post(&again.cmd, -1), RD_OK);
  CHECK_EQ_INT(rd_engine_call(&release), RD_OK);
  CHECK(rd_cmd_done(&again.cmd)); /* finished before release completed */
  check_engine_freed();
  /* After shutdown nothing is queued and nothing signalled. */
  CHECK_EQ_INT(rd_engine_post(&release, efd), RD_ECLOSED);
  CHECK_EQ_INT(rd_engine_call(&release), RD_ECLOSED);
  CHECK(strcmp(release.error, rd_strerror(RD_ECLOSED)) == 0);
  struct pollfd p = {.fd = efd, .events = POLLIN};
  CHECK_EQ_INT(poll(&p, 1, 0), 0);
  close(efd);
  return rd_test_failed_checks - before;
}

TEST(test_post_signals_eventfd) { run_in_child(post_child, "post"); }

RD_TEST_MAIN(T(test_post_signals_eventfd))
