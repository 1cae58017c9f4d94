/* vdbus — the event loop: epoll for file descriptors, a timer list, and a
 * cross-thread call queue (eventfd).  One loop per thread; the daemon runs a
 * control loop on the main thread and one worker loop per core.
 *
 * Every function here except vdb_loop_post() and vdb_loop_stop() must be
 * called on the loop's own thread (or before it runs). */
#ifndef VDB_LOOP_H
#define VDB_LOOP_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/epoll.h>

struct vdb_loop;

/* A file descriptor watched by a loop.  Owned by the caller; it must stay
 * valid until vdb_loop_unwatch(). */
struct vdb_watch {
  int fd;
  uint32_t events; /* EPOLLIN | EPOLLOUT … (level-triggered) */
  void (*cb)(struct vdb_watch *w, uint32_t revents);
  void *arg;
  void *priv;      /* the loop's: set by vdb_loop_watch */
};

/* A one-shot timer.  Owned by the caller. */
struct vdb_timer {
  uint64_t deadline_ns; /* CLOCK_MONOTONIC */
  void (*cb)(struct vdb_timer *t);
  void *arg;
  struct vdb_timer *next;
  bool armed;
};

int vdb_loop_create(struct vdb_loop **out);
void vdb_loop_destroy(struct vdb_loop *loop);

int vdb_loop_watch(struct vdb_loop *loop, struct vdb_watch *w);
int vdb_loop_modify(struct vdb_loop *loop, struct vdb_watch *w, uint32_t events);
void vdb_loop_unwatch(struct vdb_loop *loop, struct vdb_watch *w);

/* Arm t to fire after ms milliseconds (re-arms if already armed). */
void vdb_timer_start(struct vdb_loop *loop, struct vdb_timer *t, uint64_t ms);
void vdb_timer_stop(struct vdb_loop *loop, struct vdb_timer *t);

/* Run fn(arg) on loop's thread, soon.  Any thread.  Returns 0 or -ENOMEM.
 * Calls posted before vdb_loop_stop() are all run before vdb_loop_run returns. */
int vdb_loop_post(struct vdb_loop *loop, void (*fn)(void *arg), void *arg);

/* Coalescing: ask loop to pause for us microseconds once this round of
 * events is handled, before it waits for the next, so that what a busy peer
 * sends meanwhile is handled in one wake-up (the longest request of the
 * round wins).  A pause delays every watch of the loop by at most us. */
void vdb_loop_nap(struct vdb_loop *loop, unsigned us);

/* Polling: ask loop to look for new events without sleeping for up to us
 * microseconds once this round is handled (and its pause taken), before it
 * sleeps in epoll_wait: for a peer whose next request comes sooner than a
 * sleeping thread (and its idle CPU) wakes up.  Burns the CPU for that
 * long at most; the longest request of the round wins.  Timers fire at the
 * end of the round in which they fall due, so by at most us late. */
void vdb_loop_poll(struct vdb_loop *loop, unsigned us);

/* Waiting on io_uring instead of epoll ("ring mode"): worker loops wait in
 * io_uring_enter, each watch is a one-shot IORING_OP_POLL_ADD re-armed after
 * its callback (so level-triggered, as with epoll), and a pause is a timed
 * wait that also submits what the round queued: one system call where epoll
 * needs an epoll_wait, a clock_nanosleep and a sendmsg.  Asked for before
 * vdb_loop_run, which falls back to epoll if the kernel lacks what ring mode
 * needs (IORING_SETUP_DEFER_TASKRUN, 6.1) or VDBUS_LOOP=epoll is set.  In
 * ring mode, watch/modify/unwatch must be called on the loop's thread once
 * it runs. */
void vdb_loop_want_uring(struct vdb_loop *loop);
/* The loop waits on its io_uring (and is not stopping): an SQE queued now
 * goes out with the loop's next wait or pause, without a system call of its
 * own. */
bool vdb_loop_is_uring(const struct vdb_loop *loop);

/* Run until vdb_loop_stop().  Returns 0 or -errno. */
int vdb_loop_run(struct vdb_loop *loop);
void vdb_loop_stop(struct vdb_loop *loop); /* any thread */

/* An io_uring operation: the loop calls cb with the CQE's result when it
 * completes.  Set sqe user_data with vdb_uring_set_op().  Owned by the
 * submitter. */
struct vdb_uring_op {
  void (*cb)(struct vdb_uring_op *op, int res);
};
struct io_uring;
struct io_uring_sqe;
/* The io_uring of the loop running on this thread (created on first use;
 * its completions are reaped by the loop), or NULL when not on a loop thread
 * or io_uring is unavailable.  SQEs are submitted in a batch before the loop
 * next waits. */
struct io_uring *vdb_loop_uring(void);
/* A free SQE of the current loop's ring (submitting queued ones if the ring
 * is full), or NULL. */
struct io_uring_sqe *vdb_loop_get_sqe(void);
void vdb_uring_set_op(struct io_uring_sqe *sqe, struct vdb_uring_op *op);
/* Ring mode: an SQE for an operation that usually completes as soon as it
 * is submitted (a send into a socket with room), so that the loop's next
 * wait does not end for that completion alone: it waits for one more, or
 * at most 1 ms more in case this one did not complete at once.  NULL when
 * the current loop is not in ring mode, or no SQE is free. */
struct io_uring_sqe *vdb_loop_get_sqe_quick(void);

/* The loop running on this thread, or NULL. */
struct vdb_loop *vdb_loop_current(void);
uint64_t vdb_now_ns(void);
/* Sleep for ms milliseconds (blocking: control thread, never a loop). */
void vdb_sleep_ms(unsigned ms);

/* Worker loops: n threads each running a loop. */
int vdb_workers_start(int n);
void vdb_workers_stop(void);              /* stop and join */
int vdb_workers_count(void);
struct vdb_loop *vdb_worker_pick(void);   /* round-robin */
struct vdb_loop *vdb_worker_get(int i);

#endif
