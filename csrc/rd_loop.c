/* The loop thread. Commands arrive on a mutex-protected list; the async
 * handle is signalled only when the list goes from empty to non-empty, and
 * each command's completion on the eventfd its poster gave.
 *
 * Fork: the child has no loop thread, only a copy of its memory and of its
 * descriptors, which it shares with the parent's live sessions. Before a
 * fork the loop thread is parked at a command boundary, so the copy is
 * consistent; the child then closes the loop's descriptors (close(2) only,
 * nothing is written or shut down) and forgets every object, and the next
 * call starts a fresh loop thread. */
#include "rd_loop.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "rd_alloc.h"
#include "rd_block.h"
#include "rd_nofile.h"
#include "rd_session.h"

enum { ENGINE_NEW, ENGINE_RUNNING, ENGINE_STOPPED };

static struct {
  uv_once_t once;
  uv_mutex_t lock; /* guards state, the command list */
  int state;
  uv_loop_t loop;
  uv_thread_t thread;
  uv_async_t wake;
  uv_idle_t defer_idle; /* runs the deferred list; active while it is not empty */
  rd_defer deferred;    /* the head of that list (loop thread) */
  rd_cmd *head, *tail;
  int stopping; /* loop thread: shutdown command seen */
  int shutting_down, joined; /* under lock: rd_engine_shutdown's progress */
  uv_cond_t joined_cond;
  rd_cmd *shutdown_waiter;
  /* objects, loop thread only */
  rd_map objects;
  uint64_t next_handle;
  /* requests */
  uv_mutex_t req_lock;
  uv_cond_t req_cond;
  rd_request *req_head, *req_tail; /* posted, not yet taken */
  uv_cond_t ev_cond;
  rd_request *ev_head, *ev_tail; /* news (RD_REQ_EVENT), one taker keeps its order */
  rd_map req_pending;             /* loop thread: posted, not yet answered */
  uint64_t next_req;
  int req_closed;
  /* fork */
  uv_mutex_t fork_lock; /* held from prepare to the parent's or child's handler */
  uv_mutex_t park_lock;
  uv_cond_t park_cond;
  int parked, resume; /* under park_lock: the loop thread's stay in park_run */
  int fork_parks;     /* under fork_lock: this fork parked the loop thread */
  rd_cmd park_cmd;
  _Atomic uint64_t stale_below; /* handles below this are a parent's */
} eng = {.once = UV_ONCE_INIT};

static _Atomic int64_t count_sessions, count_connections, count_buffered, count_tunnel_queued;

uv_loop_t *rd_loop(void) { return &eng.loop; }
uint64_t rd_now(void) { return uv_now(&eng.loop); }

void rd_engine_counts_add(int sessions, int connections, int64_t buffered) {
  if (sessions)
    atomic_fetch_add(&count_sessions, sessions);
  if (connections)
    atomic_fetch_add(&count_connections, connections);
  if (buffered)
    atomic_fetch_add(&count_buffered, buffered);
}

void rd_engine_tunnel_queued_add(int64_t bytes) { atomic_fetch_add(&count_tunnel_queued, bytes); }

rd_engine_counts rd_engine_counts_get(void) {
  rd_engine_counts c = {atomic_load(&count_sessions), atomic_load(&count_connections),
                        atomic_load(&count_buffered), atomic_load(&count_tunnel_queued)};
  return c;
}

/* ---- work deferred to the next turn ---- */

static int defer_queued(const rd_defer *d) { return d->next != d; }

static void defer_unlink(rd_defer *d) {
  d->prev->next = d->next;
  d->next->prev = d->prev;
  d->prev = d->next = d;
}

/* Runs what was queued before this turn. A callback may cancel another
 * entry of the batch (ending an object that had work queued): entries are
 * unlinked one at a time, from whichever list holds them. */
static void defer_idle_cb(uv_idle_t *h) {
  rd_defer batch;
  rd_defer_init(&batch, NULL);
  if (defer_queued(&eng.deferred)) {
    batch.next = eng.deferred.next;
    batch.prev = eng.deferred.prev;
    batch.next->prev = batch.prev->next = &batch;
    eng.deferred.prev = eng.deferred.next = &eng.deferred;
  }
  uv_idle_stop(h); /* started again by what the callbacks queue */
  while (defer_queued(&batch)) {
    rd_defer *d = batch.next;
    defer_unlink(d);
    d->cb(d);
  }
}

void rd_defer_init(rd_defer *d, void (*cb)(rd_defer *d)) {
  d->prev = d->next = d;
  d->cb = cb;
}

void rd_defer_start(rd_defer *d) {
  if (defer_queued(d))
    return;
  rd_defer *head = &eng.deferred;
  d->prev = head->prev;
  d->next = head;
  head->prev->next = d;
  head->prev = d;
  uv_idle_start(&eng.defer_idle, defer_idle_cb);
}

void rd_defer_cancel(rd_defer *d) {
  if (defer_queued(d))
    defer_unlink(d);
}

/* Signals completion. The fd is read before _done is set: from then on the
 * poster may free cmd (or, for a private eventfd, close the fd only after
 * reading it, so the write below never lands on a reused descriptor). */
static void cmd_signal(rd_cmd *cmd) {
  int fd = cmd->_notify_fd;
  atomic_store_explicit(&cmd->_done, 1, memory_order_release);
  if (fd >= 0) {
    uint64_t one = 1;
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }
}

void rd_cmd_finish(rd_cmd *cmd, int status, const char *error) {
  cmd->status = status;
  if (error != NULL)
    snprintf(cmd->error, sizeof cmd->error, "%s", error);
  cmd_signal(cmd);
}

void rd_cmd_finishf(rd_cmd *cmd, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(cmd->error, sizeof cmd->error, fmt, ap);
  va_end(ap);
  cmd->status = status;
  cmd_signal(cmd);
}

int rd_cmd_done(rd_cmd *cmd) { return atomic_load_explicit(&cmd->_done, memory_order_acquire); }

/* ---- objects ---- */

int rd_object_register(rd_object *obj, int kind) {
  obj->kind = kind;
  obj->handle = ++eng.next_handle;
  return rd_map_insert(&eng.objects, &obj->node, rd_hash_u64(obj->handle));
}

void rd_object_unregister(rd_object *obj) {
  if (obj->handle != 0)
    rd_map_remove(&eng.objects, &obj->node);
  obj->handle = 0;
}

int rd_handle_is_stale(uint64_t handle) { return handle != 0 && handle < atomic_load(&eng.stale_below); }

rd_object *rd_object_find(uint64_t handle, int kind) {
  for (rd_map_node *n = rd_map_find(&eng.objects, rd_hash_u64(handle)); n != NULL;
       n = rd_map_next_same(n)) {
    rd_object *obj = (rd_object *)n;
    if (obj->handle == handle && (kind == 0 || obj->kind == kind))
      return obj;
  }
  return NULL;
}

/* ---- shutdown ---- */

static void close_object_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  rd_object *obj = (rd_object *)n;
  rd_object_unregister(obj);
  obj->close(obj, NULL);
}

static void close_any_handle_cb(uv_handle_t *h, void *arg) {
  (void)arg;
  /* Objects close their own handles; this catches stragglers (and the wake
   * handle), so uv_run can return. Their owners are gone with the process. */
  if (!uv_is_closing(h))
    uv_close(h, NULL);
}

static rd_request *request_of(rd_map_node *n) {
  return (rd_request *)((char *)n - offsetof(rd_request, node));
}

static void request_unref(rd_request *req) {
  int before = atomic_fetch_sub(&req->_refs, 1);
  assert(before > 0);
  if (before == 1)
    rd_request_free(req);
}

/* Ends the engine's part in a pending request: the asker hears the verdict,
 * the pending set's reference goes. The queue or the Python-side thread may
 * still hold theirs; the request is freed with the last. */
static void request_settle(rd_request *req, rd_verdict verdict, const char *value) {
  rd_map_remove(&eng.req_pending, &req->node);
  if (req->target != NULL && req->on_answer != NULL)
    req->on_answer(req, verdict, value);
  request_unref(req);
}

static void drop_pending_request_cb(rd_map_node *n, void *ctx) {
  (void)ctx;
  request_settle(request_of(n), RD_VERDICT_CLOSED, NULL);
}

static void begin_shutdown(void) {
  eng.stopping = 1;
  rd_map_foreach(&eng.objects, close_object_cb, NULL);
  uv_mutex_lock(&eng.req_lock);
  eng.req_closed = 1;
  rd_request *queued = eng.req_head, *news = eng.ev_head;
  eng.req_head = eng.req_tail = NULL;
  eng.ev_head = eng.ev_tail = NULL;
  uv_cond_broadcast(&eng.req_cond);
  uv_cond_broadcast(&eng.ev_cond);
  uv_mutex_unlock(&eng.req_lock);
  for (int i = 0; i < 2; i++, queued = news) {
    while (queued != NULL) { /* the queues' references */
      rd_request *next = queued->next;
      request_unref(queued);
      queued = next;
    }
  }
  rd_map_foreach(&eng.req_pending, drop_pending_request_cb, NULL);
  uv_close((uv_handle_t *)&eng.wake, NULL);
}

/* ---- the thread ---- */

static void wake_cb(uv_async_t *h) {
  (void)h;
  uv_mutex_lock(&eng.lock);
  rd_cmd *c = eng.head;
  eng.head = eng.tail = NULL;
  uv_mutex_unlock(&eng.lock);
  while (c != NULL) {
    rd_cmd *next = c->next; /* c may be freed once run completes it */
    if (c->run == NULL) {   /* the shutdown command */
      eng.shutdown_waiter = c;
      if (!eng.stopping)
        begin_shutdown();
    } else {
      c->run(c);
    }
    c = next;
  }
}

static void loop_main(void *arg) {
  (void)arg;
  /* A write to a peer that went away must fail with EPIPE, never kill the
   * process, whatever the application did with SIGPIPE. Blocking it in this
   * thread alone leaves the process-wide disposition alone. */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  uv_run(&eng.loop, UV_RUN_DEFAULT);
  /* The loop ran dry, so nothing is deferred (the idle handle is active
   * while anything is). */
  uv_close((uv_handle_t *)&eng.defer_idle, NULL);
  /* Objects closing after the wake handle went still need their callbacks. */
  uv_walk(&eng.loop, close_any_handle_cb, NULL);
  uv_run(&eng.loop, UV_RUN_DEFAULT);
  rd_map_dispose(&eng.objects);
  rd_map_dispose(&eng.req_pending);
  rd_block_pool_trim();
  rd_session_trim_pools();
  if (eng.shutdown_waiter != NULL)
    rd_cmd_finish(eng.shutdown_waiter, RD_OK, NULL);
}

static void fork_prepare(void);
static void fork_parent(void);
static void fork_child(void);

static void engine_locks_init(void) {
  uv_mutex_init(&eng.lock);
  uv_mutex_init(&eng.req_lock);
  uv_mutex_init(&eng.fork_lock);
  uv_mutex_init(&eng.park_lock);
  uv_cond_init(&eng.req_cond);
  uv_cond_init(&eng.ev_cond);
  uv_cond_init(&eng.joined_cond);
  uv_cond_init(&eng.park_cond);
}

static void engine_init_once(void) {
  engine_locks_init();
  rd_map_init(&eng.objects);
  rd_map_init(&eng.req_pending);
  eng.state = ENGINE_NEW;
  pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* Starts the thread on first use; returns the state after. Holds eng.lock. */
static int ensure_started_locked(void) {
  if (eng.state != ENGINE_NEW)
    return eng.state;
  rd_nofile_raise();
  if (uv_loop_init(&eng.loop) != 0 || uv_async_init(&eng.loop, &eng.wake, wake_cb) != 0)
    return ENGINE_NEW;
  uv_idle_init(&eng.loop, &eng.defer_idle);
  rd_defer_init(&eng.deferred, NULL); /* a forked child forgets its parent's list */
  if (uv_thread_create(&eng.thread, loop_main, NULL) != 0) {
    uv_close((uv_handle_t *)&eng.wake, NULL);
    uv_close((uv_handle_t *)&eng.defer_idle, NULL);
    uv_run(&eng.loop, UV_RUN_DEFAULT);
    uv_loop_close(&eng.loop);
    return ENGINE_NEW;
  }
  eng.state = ENGINE_RUNNING;
  return eng.state;
}

/* Appends cmd to the list (eng.lock held, engine running); returns 1 when
 * the list was empty, i.e. the loop thread needs a wake-up. */
static int enqueue_locked(rd_cmd *cmd) {
  int was_empty = eng.head == NULL;
  cmd->next = NULL;
  if (eng.tail != NULL)
    eng.tail->next = cmd;
  else
    eng.head = cmd;
  eng.tail = cmd;
  if (cmd->run == NULL)
    eng.state = ENGINE_STOPPED; /* no command after the shutdown */
  return was_empty;
}

static int post(rd_cmd *cmd, int notify_fd) {
  cmd->status = RD_OK;
  cmd->error[0] = '\0';
  cmd->_notify_fd = notify_fd;
  atomic_store(&cmd->_done, 0);
  uv_once(&eng.once, engine_init_once);
  uv_mutex_lock(&eng.lock);
  int state = ensure_started_locked();
  if (state != ENGINE_RUNNING) {
    uv_mutex_unlock(&eng.lock);
    cmd->status = state == ENGINE_NEW ? RD_ENOMEM : RD_ECLOSED;
    snprintf(cmd->error, sizeof cmd->error, "%s", rd_strerror(cmd->status));
    return cmd->status;
  }
  int was_empty = enqueue_locked(cmd);
  uv_mutex_unlock(&eng.lock);
  if (was_empty)
    uv_async_send(&eng.wake);
  return RD_OK;
}

int rd_engine_post(rd_cmd *cmd, int notify_fd) {
  assert(cmd->run != NULL); /* run NULL is the engine's own shutdown */
  return post(cmd, notify_fd);
}

/* Blocks until the loop thread has signalled fd. Reading the count, not
 * rd_cmd_done, is what ends the wait: the fd is closed afterwards, and the
 * loop thread's write must have happened by then. */
static void wait_signalled(int fd) {
  uint64_t n;
  while (read(fd, &n, sizeof n) != (ssize_t)sizeof n) {
    /* EINTR: an eventfd read fails for nothing else */
  }
}

static int engine_call(rd_cmd *cmd) {
  int fd = eventfd(0, EFD_CLOEXEC);
  if (fd < 0) {
    cmd->status = -errno; /* libuv's codes are negated errnos */
    const char *text = rd_nofile_error(cmd->status);
    snprintf(cmd->error, sizeof cmd->error, "%s", text != NULL ? text : rd_strerror(cmd->status));
    return cmd->status;
  }
  int rc = post(cmd, fd);
  if (rc == RD_OK)
    wait_signalled(fd);
  close(fd);
  return cmd->status;
}

int rd_engine_call(rd_cmd *cmd) {
  assert(cmd->run != NULL);
  return engine_call(cmd);
}

void rd_engine_shutdown(void) {
  uv_once(&eng.once, engine_init_once);
  uv_mutex_lock(&eng.lock);
  if (eng.state == ENGINE_NEW) {
    uv_mutex_unlock(&eng.lock);
    return;
  }
  if (eng.shutting_down) { /* another thread is stopping it: wait for that */
    while (!eng.joined)
      uv_cond_wait(&eng.joined_cond, &eng.lock);
    uv_mutex_unlock(&eng.lock);
    return;
  }
  eng.shutting_down = 1;
  uv_mutex_unlock(&eng.lock);
  rd_cmd cmd;
  memset(&cmd, 0, sizeof cmd);
  cmd.run = NULL;
  if (engine_call(&cmd) == RD_OK) {
    uv_thread_join(&eng.thread);
    uv_loop_close(&eng.loop);
  }
  uv_mutex_lock(&eng.lock);
  eng.joined = 1;
  uv_cond_broadcast(&eng.joined_cond);
  uv_mutex_unlock(&eng.lock);
}

/* ---- fork ---- */

/* Loop thread: stays at this command boundary until the fork is done, so
 * that the child's copy of the loop, the objects and the pools is whole. */
static void park_run(rd_cmd *c) {
  (void)c;
  uv_mutex_lock(&eng.park_lock);
  eng.parked = 1;
  uv_cond_signal(&eng.park_cond);
  while (!eng.resume)
    uv_cond_wait(&eng.park_cond, &eng.park_lock);
  eng.parked = eng.resume = 0;
  uv_mutex_unlock(&eng.park_lock);
}

static void fork_prepare(void) {
  uv_mutex_lock(&eng.fork_lock);
  uv_mutex_lock(&eng.lock);
  /* A child must not inherit a loop half torn down: let a shutdown end. */
  while (eng.shutting_down && !eng.joined)
    uv_cond_wait(&eng.joined_cond, &eng.lock);
  uv_thread_t self = uv_thread_self();
  eng.fork_parks = eng.state == ENGINE_RUNNING && !uv_thread_equal(&self, &eng.thread);
  int wake = 0;
  if (eng.fork_parks) {
    memset(&eng.park_cmd, 0, sizeof eng.park_cmd);
    eng.park_cmd.run = park_run;
    eng.park_cmd._notify_fd = -1;
    wake = enqueue_locked(&eng.park_cmd);
  }
  uv_mutex_unlock(&eng.lock);
  if (wake)
    uv_async_send(&eng.wake);
  if (eng.fork_parks) {
    uv_mutex_lock(&eng.park_lock);
    while (!eng.parked)
      uv_cond_wait(&eng.park_cond, &eng.park_lock);
    uv_mutex_unlock(&eng.park_lock);
  }
  /* Held across the fork so that the child's lists are not mid-update. */
  uv_mutex_lock(&eng.lock);
  uv_mutex_lock(&eng.req_lock);
}

static void fork_parent(void) {
  uv_mutex_unlock(&eng.req_lock);
  uv_mutex_unlock(&eng.lock);
  if (eng.fork_parks) {
    uv_mutex_lock(&eng.park_lock);
    eng.resume = 1;
    uv_cond_signal(&eng.park_cond);
    uv_mutex_unlock(&eng.park_lock);
  }
  uv_mutex_unlock(&eng.fork_lock);
}

static void close_handle_fd_cb(uv_handle_t *h, void *arg) {
  (void)arg;
  uv_os_fd_t fd;
  if (uv_fileno(h, &fd) == 0)
    close(fd);
}

static void close_fd(int fd) {
  if (fd >= 0)
    close(fd);
}

/* Child: closes the inherited loop's descriptors, its handles' and libuv's
 * own (the epoll instance, the async eventfd, the signal pipe, the spare
 * kept for EMFILE), without a libuv call that would act on them. The parent
 * keeps its copies open. */
static void forget_loop_fds(uv_loop_t *loop) {
  uv_walk(loop, close_handle_fd_cb, NULL);
  close_fd(uv_backend_fd(loop));
  close_fd(loop->async_io_watcher.fd);
  if (loop->async_wfd != loop->async_io_watcher.fd)
    close_fd(loop->async_wfd);
  close_fd(loop->signal_pipefd[0]);
  close_fd(loop->signal_pipefd[1]);
  close_fd(loop->emfile_fd);
#ifdef __linux__
  close_fd(loop->inotify_fd);
#endif
}

/* Child: only this thread exists. The locks may have been held by threads
 * that are gone, so they are made anew. A running engine is forgotten, not
 * freed: its memory belongs to objects the parent still runs. Handles keep
 * counting up, so the parent's never name a child's object. */
static void fork_child(void) {
  /* A loop exists unless the engine never started or was shut down and
   * joined; a shutdown the parent began is the parent's own. */
  int had_loop = eng.state != ENGINE_NEW && !eng.joined;
  engine_locks_init();
  eng.parked = eng.resume = eng.fork_parks = 0;
  if (!had_loop)
    return;
  forget_loop_fds(&eng.loop);
  memset(&eng.loop, 0, sizeof eng.loop);
  eng.state = ENGINE_NEW;
  eng.shutting_down = eng.joined = 0;
  eng.head = eng.tail = NULL;
  eng.stopping = 0;
  eng.shutdown_waiter = NULL;
  rd_map_init(&eng.objects);
  rd_map_init(&eng.req_pending);
  eng.req_head = eng.req_tail = NULL;
  eng.ev_head = eng.ev_tail = NULL;
  eng.req_closed = 0;
  atomic_store(&eng.stale_below, eng.next_handle + 1);
  atomic_store(&count_sessions, 0);
  atomic_store(&count_connections, 0);
  atomic_store(&count_buffered, 0);
  atomic_store(&count_tunnel_queued, 0);
}

/* ---- requests ---- */

rd_request *rd_request_new(rd_request_kind kind) {
  rd_request *req = rd_calloc(1, sizeof *req);
  if (req != NULL)
    req->kind = kind;
  if (req != NULL && kind == RD_REQ_DIAL)
    req->dial.fd = -1;
  return req;
}

void rd_request_free(rd_request *req) {
  if (req->kind == RD_REQ_AUTH) {
    rd_free(req->auth.method);
    rd_free(req->auth.path);
    rd_free(req->auth.remote);
    rd_free(req->auth.headers);
    rd_free(req->auth.cert_subject);
    rd_free(req->auth.cert_sans);
    rd_free(req->auth.cert_sha256);
  } else if (req->kind == RD_REQ_CONNECT) {
    rd_free(req->connect.proto);
    rd_free(req->connect.address);
  } else if (req->kind == RD_REQ_DIAL) {
    rd_free(req->dial.proto);
    rd_free(req->dial.address);
    if (req->dial.fd >= 0) /* answered, but its taker never came */
      close(req->dial.fd);
  } else if (req->kind == RD_REQ_EVENT) {
    rd_free(req->event.key);
    rd_free(req->event.remote);
    rd_free(req->event.url);
    rd_free(req->event.reason);
    rd_free(req->event.proto);
    rd_free(req->event.address);
  }
  rd_free(req);
}

static char *dup_or_empty(const char *s) { return rd_strndup(s != NULL ? s : "", s != NULL ? strlen(s) : 0); }

/* Appends req to a queue (requests, or news) and wakes a taker. */
static void request_enqueue(rd_request **head, rd_request **tail, uv_cond_t *cond,
                            rd_request *req) {
  uv_mutex_lock(&eng.req_lock);
  if (*tail != NULL)
    (*tail)->next = req;
  else
    *head = req;
  *tail = req;
  uv_cond_signal(cond);
  uv_mutex_unlock(&eng.req_lock);
}

/* Queues news with copies of the strings (NULL: ""); dropped when out of
 * memory or shutting down. */
static void event_post(uint64_t owner, const char *what, const char *key, const char *remote,
                       const char *url, const char *reason, const char *proto,
                       const char *address, int peer, unsigned attempt, uint32_t retry_ms) {
  if (eng.stopping)
    return;
  rd_request *req = rd_request_new(RD_REQ_EVENT);
  if (req == NULL)
    return;
  req->owner = owner;
  req->event.what = what;
  req->event.peer = peer;
  req->event.attempt = attempt;
  req->event.retry_ms = retry_ms;
  if ((req->event.key = dup_or_empty(key)) == NULL ||
      (req->event.remote = dup_or_empty(remote)) == NULL ||
      (req->event.url = dup_or_empty(url)) == NULL ||
      (req->event.reason = dup_or_empty(reason)) == NULL ||
      (req->event.proto = dup_or_empty(proto)) == NULL ||
      (req->event.address = dup_or_empty(address)) == NULL) {
    rd_request_free(req);
    return;
  }
  req->id = ++eng.next_req;
  req->next = NULL;
  atomic_store(&req->_refs, 1); /* the queue's, then the taker's */
  request_enqueue(&eng.ev_head, &eng.ev_tail, &eng.ev_cond, req);
}

void rd_event_post(uint64_t owner, const char *what, const char *key, const char *remote,
                   const char *url, const char *reason, int peer, unsigned attempt,
                   uint32_t retry_ms) {
  event_post(owner, what, key, remote, url, reason, NULL, NULL, peer, attempt, retry_ms);
}

void rd_event_post_dial(uint64_t owner, const char *key, const char *url, const char *proto,
                        const char *address, const char *reason) {
  event_post(owner, "dial_failed", key, NULL, url, reason, proto, address, 0, 0, 0);
}

int rd_verdict_fits(rd_request_kind kind, int verdict) {
  if (kind == RD_REQ_AUTH)
    return verdict == RD_VERDICT_ACCEPT || verdict == RD_VERDICT_UNAUTHORIZED ||
           verdict == RD_VERDICT_ERROR;
  if (kind == RD_REQ_DIAL) /* a socket comes only through rd_request_answer_fd */
    return verdict == RD_VERDICT_DIAL_ERROR;
  return verdict == RD_VERDICT_ALLOW || verdict == RD_VERDICT_REFUSE;
}

void rd_request_post(rd_request *req) {
  assert(req->kind == RD_REQ_AUTH || req->kind == RD_REQ_CONNECT || req->kind == RD_REQ_DIAL);
  req->id = ++eng.next_req;
  req->next = NULL;
  if (eng.stopping || rd_map_insert(&eng.req_pending, &req->node, rd_hash_u64(req->id)) != RD_OK) {
    if (req->on_answer != NULL)
      req->on_answer(req, RD_VERDICT_CLOSED, NULL);
    rd_request_free(req);
    return;
  }
  atomic_store(&req->_refs, 2); /* pending and queued */
  request_enqueue(&eng.req_head, &eng.req_tail, &eng.req_cond, req);
}

/* Takes the first of a queue, waiting up to timeout_ms. */
static rd_request *request_take(rd_request **head, rd_request **tail, uv_cond_t *cond,
                                int64_t timeout_ms) {
  uv_once(&eng.once, engine_init_once);
  uv_mutex_lock(&eng.req_lock);
  uint64_t deadline = uv_hrtime() + (uint64_t)timeout_ms * 1000000u;
  while (*head == NULL && !eng.req_closed) {
    uint64_t now = uv_hrtime();
    if (now >= deadline || uv_cond_timedwait(cond, &eng.req_lock, deadline - now) != 0)
      break;
  }
  rd_request *req = *head; /* the queue's reference passes to the caller */
  if (req != NULL) {
    *head = req->next;
    if (*head == NULL)
      *tail = NULL;
    req->next = NULL;
  }
  uv_mutex_unlock(&eng.req_lock);
  return req;
}

rd_request *rd_request_next(int64_t timeout_ms) {
  return request_take(&eng.req_head, &eng.req_tail, &eng.req_cond, timeout_ms);
}

rd_request *rd_event_next(int64_t timeout_ms) {
  return request_take(&eng.ev_head, &eng.ev_tail, &eng.ev_cond, timeout_ms);
}

void rd_request_release(rd_request *req) { request_unref(req); }

typedef struct {
  rd_cmd cmd;
  uint64_t id;
  int verdict;
  const char *value;
  int fd; /* rd_request_answer_fd: the socket, -1 once taken or closed */
} answer_cmd;

static rd_request *pending_find(uint64_t id) {
  for (rd_map_node *n = rd_map_find(&eng.req_pending, rd_hash_u64(id)); n != NULL;
       n = rd_map_next_same(n))
    if (request_of(n)->id == id)
      return request_of(n);
  return NULL;
}

/* Settles req with an answer that is not one to its question: the safe one. */
static void settle_refused(rd_request *req) {
  if (req->kind == RD_REQ_AUTH)
    request_settle(req, RD_VERDICT_UNAUTHORIZED, "");
  else if (req->kind == RD_REQ_DIAL)
    request_settle(req, RD_VERDICT_DIAL_ERROR, "dialer gave no socket");
  else
    request_settle(req, RD_VERDICT_REFUSE, "");
}

static void answer_run(rd_cmd *c) {
  answer_cmd *a = (answer_cmd *)c;
  rd_request *req = pending_find(a->id);
  if (req != NULL && rd_verdict_fits(req->kind, a->verdict))
    request_settle(req, (rd_verdict)a->verdict, a->value != NULL ? a->value : "");
  else if (req != NULL)
    settle_refused(req);
  rd_cmd_finish(c, RD_OK, NULL);
}

int rd_request_answer(uint64_t req_id, int verdict, const char *value) {
  answer_cmd a = {.id = req_id, .verdict = verdict, .value = value, .fd = -1};
  a.cmd.run = answer_run;
  return rd_engine_call(&a.cmd);
}

static void answer_fd_run(rd_cmd *c) {
  answer_cmd *a = (answer_cmd *)c;
  rd_request *req = pending_find(a->id);
  if (req != NULL && req->kind != RD_REQ_DIAL) {
    settle_refused(req);
  } else if (req != NULL && req->target != NULL && a->fd >= 0) {
    req->dial.fd = a->fd; /* on_answer takes it */
    a->fd = -1;
    request_settle(req, RD_VERDICT_DIALED, "");
  } else if (req != NULL) { /* an error, or nobody waits any more */
    request_settle(req, RD_VERDICT_DIAL_ERROR,
                   a->value != NULL && a->value[0] != '\0' ? a->value : "dial failed");
  }
  if (a->fd >= 0) { /* unknown, abandoned or of another kind: ours to close */
    close(a->fd);
    a->fd = -1;
  }
  rd_cmd_finish(c, RD_OK, NULL);
}

int rd_request_answer_fd(uint64_t req_id, int fd, const char *error) {
  answer_cmd a = {.id = req_id, .value = error, .fd = fd};
  a.cmd.run = answer_fd_run;
  int rc = rd_engine_call(&a.cmd);
  if (a.fd >= 0) /* never ran: the engine has stopped */
    close(a.fd);
  return rc;
}
