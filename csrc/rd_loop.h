/* The engine's one loop thread, its command queue, the registry of objects
 * that Python holds by handle, and the queue of decisions the engine asks of
 * Python (authorizers). Only the loop thread calls libuv. */
#ifndef RD_LOOP_H
#define RD_LOOP_H

#include <stdatomic.h>
#include <uv.h>

#include "rd_common.h"
#include "rd_map.h"

/* A command posted from any thread to run on the loop thread. The caller
 * embeds it in a struct of its own (arguments and results) and posts it; the
 * loop thread completes it with rd_cmd_finish, inside run or later (a close
 * that waits for handles). Posting never waits: completion is signalled on
 * an eventfd, so a caller can block on it (rd_engine_call) or poll it beside
 * other work (an event loop's reader) without a thread per call. */
typedef struct rd_cmd rd_cmd;
struct rd_cmd {
  rd_cmd *next;
  void (*run)(rd_cmd *cmd);
  int _notify_fd;   /* eventfd signalled at completion, or -1 */
  atomic_int _done; /* set (release) before _notify_fd is signalled */
  int status;
  char error[256];
};

/* Queues cmd for the loop thread, starting the thread on first use, and
 * returns at once. Returns RD_OK when queued: the loop thread then completes
 * cmd exactly once, setting status and error, then rd_cmd_done, then adding
 * 1 to notify_fd (an eventfd the caller owns and keeps open until then; -1
 * for none; commands may share one, a reader checks rd_cmd_done on each).
 * cmd must stay valid until rd_cmd_done. Returns RD_ECLOSED after shutdown
 * or RD_ENOMEM when the thread cannot start: nothing is queued or signalled.
 * Commands still queued in a process forked from this one never complete
 * there. */
int rd_engine_post(rd_cmd *cmd, int notify_fd);
/* 1 once cmd is complete (its status and error are then readable). */
int rd_cmd_done(rd_cmd *cmd);
/* Posts cmd with a private eventfd and blocks until it completes. Returns
 * cmd->status, or the code that kept it from being posted (also in status
 * and error). Must not be called from the loop thread. */
int rd_engine_call(rd_cmd *cmd);
/* Completes a command (loop thread). error may be NULL. cmd must not be
 * touched afterwards: its owner may free it as soon as it is done. */
void rd_cmd_finish(rd_cmd *cmd, int status, const char *error);
void rd_cmd_finishf(rd_cmd *cmd, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Stops the loop: closes every object and handle, runs the loop until all
 * close callbacks ran, joins the thread. Idempotent; later calls to
 * rd_engine_call return RD_ECLOSED. */
void rd_engine_shutdown(void);

/* The loop (loop thread only). */
uv_loop_t *rd_loop(void);
/* Milliseconds on the loop's clock (loop thread only). */
uint64_t rd_now(void);

/* Work put off to the next loop turn, for an object that must not act inside
 * the call that found the need (a send that fails ends its session later).
 * One idle handle of the loop serves every object, so none keeps a handle
 * of its own. Embedded in its owner; loop thread only. */
typedef struct rd_defer rd_defer;
struct rd_defer {
  rd_defer *prev, *next; /* on the loop's list while queued, else itself */
  void (*cb)(rd_defer *d);
};
/* Prepares d, not queued, to call cb when it runs. */
void rd_defer_init(rd_defer *d, void (*cb)(rd_defer *d));
/* Queues d: its cb runs once on the next loop turn (what a cb queues runs on
 * the turn after). A no-op while d is queued. */
void rd_defer_start(rd_defer *d);
/* Takes d off the queue, so its cb does not run; a no-op when not queued.
 * The owner calls it before d's memory goes. */
void rd_defer_cancel(rd_defer *d);

/* Engine-wide figures, readable from any thread. */
typedef struct rd_engine_counts {
  int64_t open_sessions;
  int64_t open_connections;
  int64_t buffered_bytes;      /* toward local sockets */
  int64_t tunnel_queued_bytes; /* on sessions' WebSocket write queues */
} rd_engine_counts;
void rd_engine_counts_add(int sessions, int connections, int64_t buffered);
void rd_engine_tunnel_queued_add(int64_t bytes);
rd_engine_counts rd_engine_counts_get(void);

/* Objects Python holds by handle (servers, clients, forwards). */
enum { RD_OBJ_SERVER = 1, RD_OBJ_CLIENT = 2, RD_OBJ_FORWARD = 3, RD_OBJ_STREAM_FORWARD = 4 };
typedef struct rd_object rd_object;
struct rd_object {
  rd_map_node node;
  uint64_t handle;
  int kind;
  /* Begins closing; finishes `waiter` (may be NULL) when fully closed. Called
   * at most once; the object unregisters itself. */
  void (*close)(rd_object *obj, rd_cmd *waiter);
};
/* Assigns a fresh handle and registers obj (loop thread). */
int rd_object_register(rd_object *obj, int kind);
void rd_object_unregister(rd_object *obj);
/* The object with this handle and kind (kind 0 = any), or NULL. */
rd_object *rd_object_find(uint64_t handle, int kind);
/* 1 for a handle made in a process this one was forked from (any thread).
 * Such objects belong to the parent's loop, which the child forgot: closing
 * one is a no-op, so the child never touches the parent's sessions. */
int rd_handle_is_stale(uint64_t handle);

/* A decision asked of Python: an authorizer call. Created on the loop thread
 * and reference counted, because two threads hold it: the engine until it is
 * answered (or shut down) and the Python-side thread from rd_request_next
 * until rd_request_release. Its kind's fields are immutable once posted. */
typedef enum rd_request_kind {
  RD_REQ_AUTH = 1,
  RD_REQ_CONNECT = 2,
  RD_REQ_EVENT = 3, /* news for Python, never answered (rd_event_post) */
  RD_REQ_DIAL = 4   /* the agent's own dialer: answered with rd_request_answer_fd */
} rd_request_kind;

/* Python's answers, named so that neither side guesses at integers. Each
 * kind has its own; one of another kind counts as a refusal. */
typedef enum rd_verdict {
  RD_VERDICT_CLOSED = -1,      /* engine only: shut down before an answer */
  RD_VERDICT_ACCEPT = 0,       /* AUTH: upgrade; value is the client key */
  RD_VERDICT_UNAUTHORIZED = 1, /* AUTH: 401 */
  RD_VERDICT_ERROR = 2,        /* AUTH: 400 with value as its text */
  RD_VERDICT_ALLOW = 3,        /* CONNECT: dial the address */
  RD_VERDICT_REFUSE = 4,       /* CONNECT: refuse the connection */
  RD_VERDICT_DIALED = 5,       /* DIAL, engine only: dial.fd holds the socket */
  RD_VERDICT_DIAL_ERROR = 6,   /* DIAL: failed; value is the text for the far side */
} rd_verdict;

/* An upgrade request for the server's authorizer. */
typedef struct rd_auth_request {
  char *method, *path, *remote;
  char *headers; /* "name\0value\0" pairs, headers_len bytes in all */
  size_t headers_len;
  /* The client certificate of an mTLS session (all NULL without one):
   * rd_tls_peer_cert's subject, SANs and SHA-256. */
  char *cert_subject, *cert_sans, *cert_sha256;
} rd_auth_request;

/* A connect request for the client's authorizer. */
typedef struct rd_connect_request {
  char *proto, *address;
} rd_connect_request;

/* A dial for the agent's own dialer (an allowed target). fd is -1 until an
 * answer brings a socket; on_answer takes it from there. */
typedef struct rd_dial_request {
  char *proto, *address;
  int fd;
} rd_dial_request;

/* News of a session: "connect" or "disconnect" (a server's agent or peer
 * session), "refused" (an upgrade the server answered with an error), or an
 * agent's "connect", "disconnect" and "fail" (an attempt that failed); or of
 * a connection: "dial_failed" (rd_event_post_dial).
 * Strings not given are "". */
typedef struct rd_event {
  const char *what;  /* static */
  char *key;         /* server: the client key or peer id */
  char *remote;      /* server: the far address */
  char *url;         /* agent: the server URL */
  char *reason;      /* why it ended or failed */
  char *proto;       /* dial_failed: the connection's protocol */
  char *address;     /* dial_failed: and its address */
  uint32_t retry_ms; /* agent: the wait before its next attempt */
  int peer;          /* server: a peer's session */
  unsigned attempt;  /* agent: failed attempts in a row */
} rd_event;

typedef struct rd_request rd_request;
struct rd_request {
  rd_request *next; /* on the queue for Python */
  rd_map_node node; /* among the engine's pending requests */
  uint64_t id;
  uint64_t owner; /* handle of the server or client */
  rd_request_kind kind;
  union { /* by kind; strings rd_malloc'ed, freed with the request */
    rd_auth_request auth;
    rd_connect_request connect;
    rd_dial_request dial;
    rd_event event;
  };
  /* Loop thread: called once with the verdict. The asker sets target NULL
   * when it goes away first; the answer is then dropped. */
  void (*on_answer)(rd_request *req, rd_verdict verdict, const char *value);
  void *target;
  atomic_int _refs; /* the pending set, the queue, the taker */
};
/* A zeroed request of this kind (NULL when out of memory). Loop thread. */
rd_request *rd_request_new(rd_request_kind kind);
/* Queues req for Python (loop thread); takes ownership. After shutdown the
 * request is answered RD_VERDICT_CLOSED at once. */
void rd_request_post(rd_request *req);
/* Frees a request that was never posted (loop thread). */
void rd_request_free(rd_request *req);
/* Queues news for Python (loop thread): an RD_REQ_EVENT for owner, with
 * copies of the strings (NULL: ""). Nothing waits for it; dropped when out
 * of memory or shutting down. */
void rd_event_post(uint64_t owner, const char *what, const char *key, const char *remote,
                   const char *url, const char *reason, int peer, unsigned attempt,
                   uint32_t retry_ms);
/* The same for a connection that failed before carrying data: "dial_failed"
 * with the client key (server), the server URL (agent), proto, address and
 * the error text. */
void rd_event_post_dial(uint64_t owner, const char *key, const char *url, const char *proto,
                        const char *address, const char *reason);
/* 1 when verdict is one of kind's answers. */
int rd_verdict_fits(rd_request_kind kind, int verdict);
/* Python-side thread: waits up to timeout_ms for a request; NULL on timeout
 * or shutdown. The caller holds a reference: the request stays readable,
 * even across shutdown, until rd_request_release. */
rd_request *rd_request_next(int64_t timeout_ms);
/* The same for news (RD_REQ_EVENT), in their own queue: one taker sees
 * them in the order they happened. */
rd_request *rd_event_next(int64_t timeout_ms);
/* Drops the reference rd_request_next gave; the last holder frees. */
void rd_request_release(rd_request *req);
/* Any thread but the loop thread: answers by id (value is copied or used
 * before the call returns). The engine calls on_answer on the loop thread.
 * Returns RD_OK, or RD_ECLOSED when the engine has stopped (the request was
 * answered RD_VERDICT_CLOSED then). An unknown id is ignored. */
int rd_request_answer(uint64_t req_id, int verdict, const char *value);
/* Answers an RD_REQ_DIAL (any thread but the loop thread): fd, a connected
 * socket the engine then owns, or -1 and error, the text for the far side.
 * The fd is never leaked: when the request is unknown, was abandoned (its
 * connection ended meanwhile), is of another kind, or the engine has
 * stopped, the engine closes it. Returns like rd_request_answer. */
int rd_request_answer_fd(uint64_t req_id, int fd, const char *error);

#endif
