/* Tests of the loop thread's own contracts (rd_loop.h): posting without
 * waiting and completion on an eventfd, work deferred to the next turn, the
 * lifetime of a request Python holds across shutdown, the descriptor a dial
 * request's answer carries, and fork. The engine is a process-wide singleton,
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
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_api.h"
#include "rd_loop.h"
#include "rd_test.h"
#include "rd_test_io.h"

#define CHILD_SECONDS (4 * WAIT_MS / 1000) /* a test body in a child process */
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

TEST(test_post_signals_eventfd) { run_in_child(post_child, "post", CHILD_SECONDS); }

/* ---- work deferred to the next turn ---- */

/* The script: a command queues a, b and c, queues a twice and takes b off
 * again; nothing runs inside the command. The next turn runs a, whose
 * callback takes c off (queued in the same batch: it never runs) and queues
 * a and b, which run on the turn after; b's callback completes the command. */
typedef struct {
  rd_cmd cmd;
  rd_defer a, b, c;
  char ran[8]; /* the callbacks in the order they ran */
  size_t nran;
  int ran_inside; /* callbacks run before the command returned */
} defer_script;

static void defer_record(defer_script *d, char name) {
  if (d->nran < sizeof d->ran - 1)
    d->ran[d->nran++] = name;
}

static void defer_a_cb(rd_defer *x) {
  defer_script *d = rd_container_of(x, defer_script, a);
  defer_record(d, 'a');
  if (d->nran == 1) {
    rd_defer_cancel(&d->c);
    rd_defer_start(&d->a);
    rd_defer_start(&d->b);
    rd_defer_start(&d->a); /* queued already: still runs once */
  }
}

static void defer_b_cb(rd_defer *x) {
  defer_script *d = rd_container_of(x, defer_script, b);
  defer_record(d, 'b');
  rd_cmd_finish(&d->cmd, RD_OK, NULL);
}

static void defer_c_cb(rd_defer *x) { defer_record(rd_container_of(x, defer_script, c), 'c'); }

static void defer_run(rd_cmd *c) {
  defer_script *d = (defer_script *)c;
  rd_defer_init(&d->a, defer_a_cb);
  rd_defer_init(&d->b, defer_b_cb);
  rd_defer_init(&d->c, defer_c_cb);
  rd_defer_cancel(&d->c); /* not queued: nothing to do */
  rd_defer_start(&d->a);
  rd_defer_start(&d->b);
  rd_defer_start(&d->c);
  rd_defer_start(&d->a);
  rd_defer_cancel(&d->b);
  d->ran_inside = (int)d->nran;
}

static int defer_child(void) {
  int before = rd_test_failed_checks;
  defer_script d;
  memset(&d, 0, sizeof d);
  d.cmd.run = defer_run;
  CHECK_EQ_INT(rd_engine_call(&d.cmd), RD_OK);
  CHECK_EQ_INT(d.ran_inside, 0);
  CHECK(strcmp(d.ran, "aab") == 0);
  check_engine_freed();
  return rd_test_failed_checks - before;
}

TEST(test_defer_next_turn) { run_in_child(defer_child, "defer", CHILD_SECONDS); }

/* ---- requests ---- */

typedef struct {
  rd_cmd cmd;
  rd_request_kind kind;
  int answers;
  rd_verdict verdict;
  char value[64];
  int fd; /* a DIAL answer's socket */
} ask_cmd;

static void ask_answer_cb(rd_request *req, rd_verdict verdict, const char *value) {
  ask_cmd *a = req->target;
  a->answers++;
  a->verdict = verdict;
  if (verdict == RD_VERDICT_DIALED) {
    a->fd = req->dial.fd;
    req->dial.fd = -1;
  }
  snprintf(a->value, sizeof a->value, "%s", value != NULL ? value : "(null)");
}

/* Loop thread: posts one request of a->kind whose answer lands in a. */
static void ask_run(rd_cmd *c) {
  ask_cmd *a = (ask_cmd *)c;
  rd_request *r = rd_request_new(a->kind);
  if (r == NULL) {
    rd_cmd_finish(c, RD_ENOMEM, NULL);
    return;
  }
  if (a->kind == RD_REQ_CONNECT) {
    r->connect.proto = rd_strndup("tcp", 3);
    r->connect.address = rd_strndup("10.0.0.1:80", 11);
  } else if (a->kind == RD_REQ_DIAL) {
    r->dial.proto = rd_strndup("tcp", 3);
    r->dial.address = rd_strndup("10.0.0.1:80", 11);
  } else {
    r->auth.method = rd_strndup("GET", 3);
    r->auth.path = rd_strndup("/connect", 8);
    r->auth.remote = rd_strndup("127.0.0.1:1", 11);
    r->auth.headers = rd_malloc(4);
    memcpy(r->auth.headers, "a\0b\0", 4);
    r->auth.headers_len = 4;
  }
  r->owner = 42;
  r->on_answer = ask_answer_cb;
  r->target = a;
  rd_request_post(r);
  rd_cmd_finish(c, RD_OK, NULL);
}

static void ask(ask_cmd *a, rd_request_kind kind) {
  memset(a, 0, sizeof *a);
  a->cmd.run = ask_run;
  a->kind = kind;
  a->fd = -1;
  CHECK_EQ_INT(rd_engine_call(&a->cmd), RD_OK);
}

/* Loop thread reads what ask_answer_cb wrote: a command orders it. */
static void nop_run(rd_cmd *c) { rd_cmd_finish(c, RD_OK, NULL); }
static void sync_loop(void) {
  rd_cmd c;
  memset(&c, 0, sizeof c);
  c.run = nop_run;
  CHECK_EQ_INT(rd_engine_call(&c), RD_OK);
}

static int request_child(void) {
  int before = rd_test_failed_checks;
  ask_cmd a;
  ask(&a, RD_REQ_AUTH);
  rd_request *r = rd_request_next(WAIT_MS);
  CHECK(r != NULL);
  if (r == NULL)
    return 1;
  CHECK_EQ_INT(r->kind, RD_REQ_AUTH);
  CHECK_EQ_INT(r->owner, 42);
  CHECK(strcmp(r->auth.method, "GET") == 0 && strcmp(r->auth.path, "/connect") == 0);
  uint64_t id = r->id;
  rd_request_release(r);
  /* Released before the answer: the engine's reference keeps it. */
  CHECK_EQ_INT(rd_request_answer(id, RD_VERDICT_ACCEPT, "tenant"), RD_OK);
  sync_loop();
  CHECK_EQ_INT(a.answers, 1);
  CHECK_EQ_INT(a.verdict, RD_VERDICT_ACCEPT);
  CHECK(strcmp(a.value, "tenant") == 0);
  /* A second answer to the same id finds nothing. */
  CHECK_EQ_INT(rd_request_answer(id, RD_VERDICT_ERROR, "late"), RD_OK);
  sync_loop();
  CHECK_EQ_INT(a.answers, 1);
  /* Another kind's verdict is a refusal; answered before the release. */
  ask(&a, RD_REQ_CONNECT);
  r = rd_request_next(WAIT_MS);
  CHECK(r != NULL && r->kind == RD_REQ_CONNECT);
  if (r != NULL) {
    CHECK_EQ_INT(rd_request_answer(r->id, RD_VERDICT_ACCEPT, ""), RD_OK);
    CHECK(strcmp(r->connect.address, "10.0.0.1:80") == 0); /* still ours */
    rd_request_release(r);
  }
  sync_loop();
  CHECK_EQ_INT(a.verdict, RD_VERDICT_REFUSE);
  /* An answer that comes while the request is still queued: the queue's
   * reference keeps it for the taker, whose own answer is then dropped. */
  ask(&a, RD_REQ_CONNECT);
  uint64_t next_id = id + 2;
  CHECK_EQ_INT(rd_request_answer(next_id, RD_VERDICT_ALLOW, ""), RD_OK);
  sync_loop();
  CHECK_EQ_INT(a.verdict, RD_VERDICT_ALLOW);
  r = rd_request_next(WAIT_MS);
  CHECK(r != NULL && r->id == next_id && strcmp(r->connect.proto, "tcp") == 0);
  if (r != NULL) {
    CHECK_EQ_INT(rd_request_answer(r->id, RD_VERDICT_REFUSE, ""), RD_OK);
    rd_request_release(r);
  }
  sync_loop();
  CHECK_EQ_INT(a.answers, 1);
  CHECK_EQ_INT(a.verdict, RD_VERDICT_ALLOW);
  check_engine_freed();
  return rd_test_failed_checks - before;
}

TEST(test_request_answers) { run_in_child(request_child, "request answers", CHILD_SECONDS); }

/* A socket pair: the answer carries s[0]; s[1] shows whether it was closed. */
static int pair(int s[2]) { return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s); }

/* 1 when the other end of peer's pair is closed (peer reads EOF). */
static int closed_far(int peer) {
  char c;
  return readable(peer) && read(peer, &c, 1) == 0;
}

typedef struct {
  rd_cmd cmd;
  rd_request *req;
} abandon_cmd;

/* What a connection that ends does to the request it waits on. */
static void abandon_run(rd_cmd *c) {
  ((abandon_cmd *)c)->req->target = NULL;
  rd_cmd_finish(c, RD_OK, NULL);
}

/* Takes the next request, checks it is a DIAL, returns its id (0: none). */
static uint64_t take_dial(rd_request **keep) {
  rd_request *r = rd_request_next(WAIT_MS);
  CHECK(r != NULL && r->kind == RD_REQ_DIAL);
  if (r == NULL)
    return 0;
  CHECK(strcmp(r->dial.proto, "tcp") == 0 && strcmp(r->dial.address, "10.0.0.1:80") == 0);
  uint64_t id = r->id;
  if (keep != NULL)
    *keep = r;
  else
    rd_request_release(r);
  return id;
}

/* An fd given in answer to a DIAL goes to the asker, or is closed: never
 * leaked, whatever became of the request. */
static int dial_answer_child(void) {
  int before = rd_test_failed_checks;
  int s[2];
  ask_cmd a;
  /* Answered: the asker takes the socket. */
  ask(&a, RD_REQ_DIAL);
  uint64_t id = take_dial(NULL);
  CHECK_EQ_INT(pair(s), 0);
  CHECK_EQ_INT(rd_request_answer_fd(id, s[0], ""), RD_OK);
  sync_loop();
  CHECK_EQ_INT(a.answers, 1);
  CHECK_EQ_INT(a.verdict, RD_VERDICT_DIALED);
  CHECK_EQ_INT(a.fd, s[0]);
  close(a.fd);
  close(s[1]);
  /* A second answer to that id: unknown now, its fd is closed. */
  CHECK_EQ_INT(pair(s), 0);
  CHECK_EQ_INT(rd_request_answer_fd(id, s[0], ""), RD_OK);
  CHECK(closed_far(s[1]));
  close(s[1]);
  CHECK_EQ_INT(a.answers, 1);
  /* An error text. */
  ask(&a, RD_REQ_DIAL);
  id = take_dial(NULL);
  CHECK_EQ_INT(rd_request_answer_fd(id, -1, "no route via bastion"), RD_OK);
  sync_loop();
  CHECK_EQ_INT(a.verdict, RD_VERDICT_DIAL_ERROR);
  CHECK(strcmp(a.value, "no route via bastion") == 0);
  /* Another kind's verdict through rd_request_answer: an error, no socket. */
  ask(&a, RD_REQ_DIAL);
  id = take_dial(NULL);
  CHECK_EQ_INT(rd_request_answer(id, RD_VERDICT_ALLOW, ""), RD_OK);
  sync_loop();
  CHECK_EQ_INT(a.verdict, RD_VERDICT_DIAL_ERROR);
  CHECK(strcmp(a.value, "dialer gave no socket") == 0);
  /* Abandoned: the asker went away first; the late fd is closed. */
  ask(&a, RD_REQ_DIAL);
  rd_request *r = NULL;
  id = take_dial(&r);
  abandon_cmd ab = {.req = r};
  ab.cmd.run = abandon_run;
  CHECK_EQ_INT(rd_engine_call(&ab.cmd), RD_OK);
  CHECK_EQ_INT(pair(s), 0);
  CHECK_EQ_INT(rd_request_answer_fd(id, s[0], ""), RD_OK);
  CHECK(closed_far(s[1]));
  close(s[1]);
  CHECK_EQ_INT(a.answers, 0);
  if (r != NULL)
    rd_request_release(r);
  /* An fd in answer to an authorizer's question: refused, fd closed. */
  ask(&a, RD_REQ_AUTH);
  r = rd_request_next(WAIT_MS);
  CHECK(r != NULL && r->kind == RD_REQ_AUTH);
  CHECK_EQ_INT(pair(s), 0);
  if (r != NULL) {
    CHECK_EQ_INT(rd_request_answer_fd(r->id, s[0], ""), RD_OK);
    rd_request_release(r);
  }
  CHECK(closed_far(s[1]));
  close(s[1]);
  sync_loop();
  CHECK_EQ_INT(a.verdict, RD_VERDICT_UNAUTHORIZED);
  /* The engine has stopped: the asker heard CLOSED, the fd is closed. */
  ask(&a, RD_REQ_DIAL);
  id = take_dial(NULL);
  rd_engine_shutdown();
  CHECK_EQ_INT(a.verdict, RD_VERDICT_CLOSED);
  CHECK_EQ_INT(pair(s), 0);
  CHECK_EQ_INT(rd_request_answer_fd(id, s[0], ""), RD_ECLOSED);
  CHECK(closed_far(s[1]));
  close(s[1]);
  check_engine_freed();
  return rd_test_failed_checks - before;
}

TEST(test_dial_answer_fd) { run_in_child(dial_answer_child, "dial answers", CHILD_SECONDS); }

/* The Python-side thread takes a request, then the engine shuts down (at
 * exit, or close from another thread) before it has read the fields. The
 * request must stay readable until released; the asker hears CLOSED once.
 * Before requests were counted, shutdown freed it here (ASan: use after
 * free on the reads below). */
typedef struct {
  rd_request *req;
  int taken_fd, shutdown_fd; /* eventfds: the taker's progress */
  char address[64];
  int answer_rc;
} taker;

static void *taker_main(void *arg) {
  taker *t = arg;
  uint64_t one = 1;
  t->req = rd_request_next(WAIT_MS);
  (void)!write(t->taken_fd, &one, sizeof one);
  if (t->req == NULL || !readable(t->shutdown_fd))
    return NULL;
  snprintf(t->address, sizeof t->address, "%s/%s", t->req->connect.proto, t->req->connect.address);
  t->answer_rc = rd_request_answer(t->req->id, RD_VERDICT_ALLOW, "");
  rd_request_release(t->req);
  return NULL;
}

static int held_across_shutdown_child(void) {
  int before = rd_test_failed_checks;
  ask_cmd a, queued;
  ask(&a, RD_REQ_CONNECT);
  taker t = {NULL, eventfd(0, EFD_CLOEXEC), eventfd(0, EFD_CLOEXEC), "", 0};
  pthread_t th;
  CHECK_EQ_INT(pthread_create(&th, NULL, taker_main, &t), 0);
  CHECK(readable(t.taken_fd));
  CHECK(t.req != NULL);
  ask(&queued, RD_REQ_AUTH); /* one never taken: the queue drops it */
  rd_engine_shutdown();
  CHECK_EQ_INT(a.answers, 1); /* the loop thread has been joined */
  CHECK_EQ_INT(a.verdict, RD_VERDICT_CLOSED);
  CHECK_EQ_INT(queued.answers, 1);
  CHECK_EQ_INT(queued.verdict, RD_VERDICT_CLOSED);
  CHECK(rd_alloc_objects() > 0); /* the taken request, not yet released */
  uint64_t one = 1;
  (void)!write(t.shutdown_fd, &one, sizeof one);
  pthread_join(th, NULL);
  CHECK(strcmp(t.address, "tcp/10.0.0.1:80") == 0);
  CHECK_EQ_INT(t.answer_rc, RD_ECLOSED);
  CHECK_EQ_INT(a.answers, 1);
  CHECK(rd_request_next(0) == NULL);
  close(t.taken_fd);
  close(t.shutdown_fd);
  check_engine_freed();
  return rd_test_failed_checks - before;
}

TEST(test_request_held_across_shutdown) {
  run_in_child(held_across_shutdown_child, "request held across shutdown", CHILD_SECONDS);
}

/* ---- fork ---- */

static int wait_connected(uint64_t cli) {
  int connected = 0;
  CHECK_EQ_INT(rd_api_client_wait_connected(cli, WAIT_MS, &connected), RD_OK);
  return connected;
}

/* A server and an agent connected to it; 1 on success. */
static int start_pair(uint64_t *srv, uint64_t *cli, int *port) {
  rd_server_config scfg;
  rd_server_config_default(&scfg);
  char err[256] = "";
  if (rd_api_server_new("127.0.0.1", 0, &scfg, srv, port, err, sizeof err) != RD_OK) {
    fprintf(stderr, "server: %s\n", err);
    return 0;
  }
  rd_client_config ccfg;
  rd_client_config_default(&ccfg);
  char url[64];
  snprintf(url, sizeof url, "ws://127.0.0.1:%d/connect", *port);
  if (rd_api_client_new(url, "X-Tunnel-ID: agent\r\n", &ccfg, cli, err, sizeof err) != RD_OK) {
    fprintf(stderr, "client: %s\n", err);
    return 0;
  }
  return wait_connected(*cli);
}

static int has_agent(uint64_t srv) {
  int has = 0;
  return rd_api_server_has_session(srv, "agent", &has) == RD_OK && has;
}

static uint64_t g_srv, g_cli;

/* The grandchild: the parent's objects are stale and closing them is a
 * no-op; a pair of its own works on a fresh loop thread, and gives back all
 * it took. It leaves with _exit: the copy of the parent's objects it forgot
 * is not its to free, so LeakSanitizer has nothing to say about it. */
static int forked_body(void) {
  int before = rd_test_failed_checks;
  int64_t heap0 = rd_alloc_bytes();
  CHECK(rd_handle_is_stale(g_srv) && rd_handle_is_stale(g_cli));
  CHECK_EQ_INT(rd_engine_counts_get().open_sessions, 0);
  CHECK_EQ_INT(rd_api_close(g_cli), RD_OK);
  CHECK_EQ_INT(rd_api_close(g_srv), RD_OK);
  uint64_t srv = 0, cli = 0;
  int port = 0;
  CHECK(start_pair(&srv, &cli, &port));
  CHECK(!rd_handle_is_stale(srv) && srv > g_cli);
  CHECK(has_agent(srv));
  CHECK(!has_agent(g_srv)); /* not the parent's server: unknown here */
  CHECK_EQ_INT(rd_api_close(cli), RD_OK);
  CHECK_EQ_INT(rd_api_close(srv), RD_OK);
  rd_engine_shutdown();
  CHECK(rd_alloc_bytes() <= heap0); /* shutdown may trim inherited idle pools too */
  fflush(stderr);
  _exit(rd_test_failed_checks == before ? 0 : 1);
}

static int fork_child_body(void) {
  int before = rd_test_failed_checks;
  int port = 0;
  CHECK(start_pair(&g_srv, &g_cli, &port));
  int64_t sessions = rd_engine_counts_get().open_sessions;
  CHECK_EQ_INT(sessions, 2); /* both ends in this process */
  for (int i = 0; i < 3; i++) /* again: the loop resumes after each fork */
    run_in_child(forked_body, "forked from a running engine", CHILD_SECONDS);
  /* The parent's pair is untouched: same session, same counts. */
  CHECK(has_agent(g_srv));
  CHECK_EQ_INT(rd_engine_counts_get().open_sessions, sessions);
  int connected = 0;
  char last[160];
  CHECK_EQ_INT(rd_api_client_state(g_cli, &connected, last, sizeof last), RD_OK);
  CHECK(connected);
  CHECK_EQ_INT(rd_api_close(g_cli), RD_OK);
  CHECK_EQ_INT(rd_api_close(g_srv), RD_OK);
  check_engine_freed();
  return rd_test_failed_checks - before;
}

TEST(test_fork_with_running_engine) { run_in_child(fork_child_body, "fork", CHILD_SECONDS); }

RD_TEST_MAIN(T(test_post_signals_eventfd), T(test_defer_next_turn), T(test_request_answers),
             T(test_dial_answer_fd), T(test_request_held_across_shutdown),
             T(test_fork_with_running_engine))
