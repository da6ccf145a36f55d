/* The data trace's ring: records in order with their fields, what is kept
 * of a payload, drops counted once full, and a writer thread racing the
 * reader (nothing lost that was not counted, nothing seen twice). */
#include <stdint.h>
#include <string.h>
#include <uv.h>

#include "rd_msg.h"
#include "rd_test.h"
#include "rd_trace.h"

static rd_trace_rec out[RD_TRACE_CAPACITY];

/* Empties the ring; returns the drops it had counted. */
static uint64_t drain(void) {
  uint64_t dropped, total = 0;
  while (rd_trace_take(out, RD_TRACE_CAPACITY, 0, &dropped) > 0 || dropped > 0)
    total += dropped;
  return total;
}

TEST(fields_and_payload_kept) {
  drain();
  uint8_t big[300];
  for (size_t i = 0; i < sizeof big; i++)
    big[i] = (uint8_t)i;
  rd_trace_msg(RD_TRACE_SEND, 1, "agent-key", 77, 10, 2, RD_MSG_DATA, big, sizeof big);
  rd_trace_msg(RD_TRACE_RECV, 2, "client", 78, 11, 2, RD_MSG_CONNECT,
               (const uint8_t *)"tcp/127.0.0.1:80", 16);
  rd_trace_msg(RD_TRACE_RECV, 2, "client", 78, 12, 0, RD_MSG_SYNC, big, 16);
  rd_trace_msg(RD_TRACE_SEND, 2, "client", 78, 13, 3, RD_MSG_ERROR, big, sizeof big);
  uint64_t dropped;
  CHECK_EQ_INT(rd_trace_take(out, 10, 0, &dropped), 4);
  CHECK_EQ_INT(dropped, 0);
  CHECK_EQ_INT(out[0].dir, RD_TRACE_SEND);
  CHECK_EQ_INT(out[0].role, 1);
  CHECK_STR(out[0].key, "agent-key");
  CHECK_EQ_INT(out[0].session, 77);
  CHECK_EQ_INT(out[0].msg_id, 10);
  CHECK_EQ_INT(out[0].conn_id, 2);
  CHECK_EQ_INT(out[0].len, 300);
  CHECK_EQ_INT(out[0].head_len, RD_TRACE_DATA_HEAD);
  CHECK(memcmp(out[0].head, big, RD_TRACE_DATA_HEAD) == 0);
  CHECK_EQ_INT(out[1].head_len, 16);
  CHECK(memcmp(out[1].head, "tcp/127.0.0.1:80", 16) == 0);
  CHECK_EQ_INT(out[2].head_len, 0); /* SYNC: binary ids */
  CHECK_EQ_INT(out[3].head_len, RD_TRACE_HEAD);
}

TEST(long_key_cut) {
  drain();
  char key[200];
  memset(key, 'k', sizeof key - 1);
  key[sizeof key - 1] = '\0';
  rd_trace_msg(RD_TRACE_SEND, 1, key, 1, 1, 1, RD_MSG_PAUSE, NULL, 0);
  uint64_t dropped;
  CHECK_EQ_INT(rd_trace_take(out, 1, 0, &dropped), 1);
  CHECK_EQ_INT(strlen(out[0].key), RD_TRACE_KEY - 1);
}

TEST(full_ring_drops_and_counts) {
  drain();
  for (int64_t i = 0; i < RD_TRACE_CAPACITY + 100; i++)
    rd_trace_msg(RD_TRACE_SEND, 1, "k", 1, i, 1, RD_MSG_DATA, NULL, 0);
  uint64_t dropped;
  CHECK_EQ_INT(rd_trace_take(out, 10, 0, &dropped), 10);
  CHECK_EQ_INT(dropped, 100);
  CHECK_EQ_INT(out[0].msg_id, 0); /* the oldest kept, in order */
  CHECK_EQ_INT(out[9].msg_id, 9);
  /* Room again: a new record goes after the kept ones. */
  rd_trace_msg(RD_TRACE_SEND, 1, "k", 1, 99999, 1, RD_MSG_DATA, NULL, 0);
  size_t n = rd_trace_take(out, RD_TRACE_CAPACITY, 0, &dropped);
  CHECK_EQ_INT(n, RD_TRACE_CAPACITY - 10 + 1);
  CHECK_EQ_INT(dropped, 0);
  CHECK_EQ_INT(out[0].msg_id, 10);
  CHECK_EQ_INT(out[n - 1].msg_id, 99999);
}

TEST(empty_take_waits_then_returns) {
  drain();
  uint64_t dropped = 7;
  uint64_t t0 = uv_hrtime();
  CHECK_EQ_INT(rd_trace_take(out, 1, 30, &dropped), 0);
  CHECK(uv_hrtime() - t0 >= 25 * 1000000u);
  CHECK_EQ_INT(dropped, 0);
}

#define RACE 200000

static void writer(void *arg) {
  (void)arg;
  for (int64_t i = 0; i < RACE; i++)
    rd_trace_msg(RD_TRACE_SEND, 1, "race", 1, i, 1, RD_MSG_DATA, (const uint8_t *)&i, sizeof i);
}

TEST(writer_races_reader) {
  drain();
  uv_thread_t t;
  CHECK_EQ_INT(uv_thread_create(&t, writer, NULL), 0);
  int64_t seen = 0, next = 0, bad = 0;
  uint64_t lost = 0, dropped;
  uint64_t give_up = uv_hrtime() + 60 * 1000000000ull; /* fail, never hang */
  while (seen + (int64_t)lost < RACE && uv_hrtime() < give_up) {
    size_t n = rd_trace_take(out, 512, 100, &dropped);
    lost += dropped;
    for (size_t i = 0; i < n; i++) {
      int64_t payload;
      memcpy(&payload, out[i].head, sizeof payload);
      if (out[i].msg_id < next || payload != out[i].msg_id) /* out of order or torn */
        bad++;
      next = out[i].msg_id + 1;
    }
    seen += (int64_t)n;
  }
  uv_thread_join(&t);
  lost += drain();
  CHECK_EQ_INT(bad, 0);
  CHECK_EQ_INT(seen + (int64_t)lost, RACE);
}

RD_TEST_MAIN(T(fields_and_payload_kept), T(long_key_cut), T(full_ring_drops_and_counts),
             T(empty_take_waits_then_returns), T(writer_races_reader))
