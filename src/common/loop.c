/* vdbus — the event loop (epoll + timer list + eventfd call queue) and the
 * worker-loop threads. */
#include <assert.h>
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/loop.h"

struct vdb_call {
  void (*fn)(void *arg);
  void *arg;
  struct vdb_call *next;
};

/* A watch's one-shot poll in ring mode.  Lives from vdb_loop_watch until the
 * watch is gone (w == NULL) and no poll of it is left in the ring. */
struct loop_poll {
  struct vdb_watch *w;             /* NULL once unwatched */
  struct loop_poll *prev, *next;   /* loop->polls: every one of them */
  struct loop_poll *arm_next;      /* loop->to_arm */
  bool armed;                      /* a POLL_ADD of it is in the ring */
  bool queued;                     /* on loop->to_arm */
  bool in_cb;                      /* its callback is running */
  bool failed;                     /* the poll itself failed: not re-armed */
};

struct vdb_loop {
  int epfd;
  struct vdb_watch wake;           /* eventfd: posted calls and stop */
  pthread_mutex_t lock;            /* protects calls_head/tail */
  struct vdb_call *calls_head, *calls_tail;
  struct vdb_timer *timers;        /* sorted by deadline */
  _Atomic bool stop;
  struct io_uring *ring;           /* created on first use */
  struct vdb_watch ring_w;         /* eventfd signalled by ring completions */
  bool ring_failed;                /* io_uring unavailable: do not retry */
  unsigned ring_inflight;          /* SQEs handed out and not yet reaped */
  struct epoll_event *batch;       /* events being dispatched (vdb_loop_run) */
  int batch_n;
  unsigned nap_us;                 /* pause asked for this round (vdb_loop_nap) */
  unsigned poll_us;                /* polling asked for this round (vdb_loop_poll) */
  bool want_uring;                 /* ring mode asked for (vdb_loop_want_uring) */
  bool uring;                      /* ring mode on: the loop waits in io_uring_enter */
  struct loop_poll *polls;         /* want_uring: the watches' polls */
  struct loop_poll *to_arm;        /* ring mode: polls to (re)arm before the next wait */
  unsigned quick;                  /* ring mode: quick SQEs queued since the last wait */
};

#define LOOP_RING_ENTRIES 256
#define LOOP_POLL_TAG 1ull   /* user_data of a poll: its loop_poll | 1 (ops are aligned) */
#define LOOP_UD_OWN   2ull   /* user_data of the loop's other SQEs (removes, updates, cancels) */
#define LOOP_QUICK_NS 1000000   /* a wait past quick SQEs' completions (vdb_loop_get_sqe_quick) */

static _Thread_local struct vdb_loop *current_loop;

static void loop_ring_exit(struct vdb_loop *loop);
static void poll_free(struct vdb_loop *loop, struct loop_poll *p);

uint64_t vdb_now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vdb_sleep_ms(unsigned ms)
{
  struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
  nanosleep(&ts, NULL);
}

struct vdb_loop *vdb_loop_current(void) { return current_loop; }

static void loop_run_calls(struct vdb_loop *loop)
{
  struct vdb_call *c;

  pthread_mutex_lock(&loop->lock);
  c = loop->calls_head;
  loop->calls_head = loop->calls_tail = NULL;
  pthread_mutex_unlock(&loop->lock);
  while (c) {
    struct vdb_call *next = c->next;
    c->fn(c->arg);
    free(c);
    c = next;
  }
}

static void loop_wake_cb(struct vdb_watch *w, uint32_t revents)
{
  uint64_t v;
  ssize_t r = read(w->fd, &v, sizeof v);
  (void)r;
  loop_run_calls(w->arg);
}

int vdb_loop_create(struct vdb_loop **out)
{
  struct vdb_loop *loop = calloc(1, sizeof *loop);
  int r;

  if (!loop)
    return -ENOMEM;
  pthread_mutex_init(&loop->lock, NULL);
  loop->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (loop->epfd < 0) {
    r = -errno;
    goto err_free;
  }
  loop->wake.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (loop->wake.fd < 0) {
    r = -errno;
    goto err_ep;
  }
  loop->wake.events = EPOLLIN;
  loop->wake.cb = loop_wake_cb;
  loop->wake.arg = loop;
  r = vdb_loop_watch(loop, &loop->wake);
  if (r < 0)
    goto err_ev;
  *out = loop;
  return 0;

err_ev:
  close(loop->wake.fd);
err_ep:
  close(loop->epfd);
err_free:
  free(loop);
  return r;
}

void vdb_loop_destroy(struct vdb_loop *loop)
{
  if (!loop)
    return;
  loop_run_calls(loop);
  loop_ring_exit(loop);
  while (loop->polls)   /* ring mode asked for and never started */
    poll_free(loop, loop->polls);
  close(loop->wake.fd);
  close(loop->epfd);
  pthread_mutex_destroy(&loop->lock);
  free(loop);
}

/* ---- ring mode: watches as one-shot polls ---- */

static struct loop_poll *poll_new(struct vdb_loop *loop, struct vdb_watch *w)
{
  struct loop_poll *p = calloc(1, sizeof *p);

  if (!p)
    return NULL;
  p->w = w;
  w->priv = p;
  p->next = loop->polls;
  if (p->next)
    p->next->prev = p;
  loop->polls = p;
  return p;
}

static void poll_free(struct vdb_loop *loop, struct loop_poll *p)
{
  if (p->prev)
    p->prev->next = p->next;
  else
    loop->polls = p->next;
  if (p->next)
    p->next->prev = p->prev;
  if (p->w)
    p->w->priv = NULL;
  free(p);
}

static uint64_t poll_ud(const struct loop_poll *p)
{
  return (uint64_t)(uintptr_t)p | LOOP_POLL_TAG;
}

/* A free SQE, submitting what is queued if the ring is full; or NULL. */
static struct io_uring_sqe *ring_sqe(struct vdb_loop *loop)
{
  struct io_uring_sqe *sqe = io_uring_get_sqe(loop->ring);

  if (!sqe) {
    io_uring_submit(loop->ring);
    sqe = io_uring_get_sqe(loop->ring);
  }
  return sqe;
}

static void poll_queue_arm(struct vdb_loop *loop, struct loop_poll *p)
{
  if (p->queued || p->armed)
    return;
  p->queued = true;
  p->arm_next = loop->to_arm;
  loop->to_arm = p;
}

/* Put a POLL_ADD in the ring for every watch that needs one. */
static void ring_arm_pending(struct vdb_loop *loop)
{
  struct loop_poll *p;

  while ((p = loop->to_arm)) {
    struct io_uring_sqe *sqe;

    if (p->w && !p->armed && !p->failed && p->w->events) {
      if (!(sqe = ring_sqe(loop)))
        return;   /* the ring is full even after a submit: next round */
      io_uring_prep_poll_add(sqe, p->w->fd, p->w->events);
      io_uring_sqe_set_data64(sqe, poll_ud(p));
      p->armed = true;
    }
    loop->to_arm = p->arm_next;
    p->queued = false;
    if (!p->w && !p->armed && !p->in_cb)
      poll_free(loop, p);
  }
}

/* A poll of p completed with res (its events, or -errno). */
static void ring_poll_done(struct vdb_loop *loop, struct loop_poll *p, int res)
{
  struct vdb_watch *w = p->w;

  p->armed = false;
  if (!w) {
    if (!p->queued)
      poll_free(loop, p);
    return;
  }
  if (res == -ECANCELED) {   /* removed by vdb_loop_modify(…, 0) */
    poll_queue_arm(loop, p);
    return;
  }
  p->in_cb = true;
  if (res < 0) {
    vdb_warn("event loop: poll of fd %d failed: %s", w->fd, strerror(-res));
    p->failed = true;
    w->cb(w, EPOLLERR);
  } else {
    uint32_t rev = (uint32_t)res & (w->events | EPOLLERR | EPOLLHUP);
    if (rev)
      w->cb(w, rev);   /* may unwatch w and free it */
  }
  p->in_cb = false;
  if (!p->w) {
    if (!p->queued)
      poll_free(loop, p);
  } else {
    poll_queue_arm(loop, p);
  }
}

static bool on_loop_thread(const struct vdb_loop *loop)
{
  if (current_loop == loop)
    return true;
  vdb_err("event loop: a watch changed off its loop's thread in ring mode");
  return false;
}

int vdb_loop_watch(struct vdb_loop *loop, struct vdb_watch *w)
{
  struct epoll_event ev = { .events = w->events, .data.ptr = w };
  struct loop_poll *p = NULL;

  w->priv = NULL;
  if (loop->want_uring) {
    if (loop->uring && !on_loop_thread(loop))
      return -EINVAL;
    if (!(p = poll_new(loop, w)))
      return -ENOMEM;
    if (loop->uring) {
      poll_queue_arm(loop, p);
      return 0;
    }
  }
  /* Not running yet: epoll too (vdb_loop_run moves it into the ring). */
  if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, w->fd, &ev) < 0) {
    int r = -errno;
    if (p)
      poll_free(loop, p);
    return r;
  }
  return 0;
}

static int ring_modify(struct vdb_loop *loop, struct vdb_watch *w, uint32_t events)
{
  struct loop_poll *p = w->priv;
  struct io_uring_sqe *sqe;

  if (!p || !on_loop_thread(loop))
    return -EINVAL;
  w->events = events;
  if (!p->armed) {
    poll_queue_arm(loop, p);   /* with the new events, if any */
    return 0;
  }
  if (!(sqe = ring_sqe(loop)))
    return -EBUSY;
  if (events)
    io_uring_prep_poll_update(sqe, poll_ud(p), poll_ud(p), events, IORING_POLL_UPDATE_EVENTS);
  else
    io_uring_prep_poll_remove(sqe, poll_ud(p));
  io_uring_sqe_set_data64(sqe, LOOP_UD_OWN);   /* its completion says nothing we need */
  return 0;
}

int vdb_loop_modify(struct vdb_loop *loop, struct vdb_watch *w, uint32_t events)
{
  struct epoll_event ev = { .events = events, .data.ptr = w };

  if (w->events == events)
    return 0;
  if (loop->uring)
    return ring_modify(loop, w, events);
  w->events = events;
  return epoll_ctl(loop->epfd, EPOLL_CTL_MOD, w->fd, &ev) < 0 ? -errno : 0;
}

/* Also forgets w's pending event in the batch being dispatched, so that its
 * owner may free it as soon as this returns. */
void vdb_loop_unwatch(struct vdb_loop *loop, struct vdb_watch *w)
{
  struct loop_poll *p = w->priv;

  if (loop->uring) {
    if (!p || !on_loop_thread(loop))
      return;
    p->w = NULL;
    w->priv = NULL;
    if (p->armed) {   /* its completion (-ECANCELED) frees p */
      struct io_uring_sqe *sqe = ring_sqe(loop);
      if (sqe) {
        io_uring_prep_poll_remove(sqe, poll_ud(p));
        io_uring_sqe_set_data64(sqe, LOOP_UD_OWN);
      }
    } else if (!p->queued && !p->in_cb) {
      poll_free(loop, p);
    }
    return;
  }
  if (p)
    poll_free(loop, p);
  epoll_ctl(loop->epfd, EPOLL_CTL_DEL, w->fd, NULL);
  for (int i = 0; i < loop->batch_n; i++)
    if (loop->batch[i].data.ptr == w)
      loop->batch[i].data.ptr = NULL;
}

void vdb_timer_stop(struct vdb_loop *loop, struct vdb_timer *t)
{
  struct vdb_timer **pp;

  if (!t->armed)
    return;
  for (pp = &loop->timers; *pp; pp = &(*pp)->next)
    if (*pp == t) {
      *pp = t->next;
      break;
    }
  t->armed = false;
}

void vdb_timer_start(struct vdb_loop *loop, struct vdb_timer *t, uint64_t ms)
{
  struct vdb_timer **pp;

  vdb_timer_stop(loop, t);
  t->deadline_ns = vdb_now_ns() + ms * 1000000ull;
  for (pp = &loop->timers; *pp && (*pp)->deadline_ns <= t->deadline_ns; pp = &(*pp)->next)
    ;
  t->next = *pp;
  *pp = t;
  t->armed = true;
}

int vdb_loop_post(struct vdb_loop *loop, void (*fn)(void *arg), void *arg)
{
  struct vdb_call *c = malloc(sizeof *c);
  uint64_t one = 1;
  ssize_t r;

  if (!c)
    return -ENOMEM;
  c->fn = fn;
  c->arg = arg;
  c->next = NULL;
  pthread_mutex_lock(&loop->lock);
  if (loop->calls_tail)
    loop->calls_tail->next = c;
  else
    loop->calls_head = c;
  loop->calls_tail = c;
  pthread_mutex_unlock(&loop->lock);
  r = write(loop->wake.fd, &one, sizeof one);
  (void)r;
  return 0;
}

void vdb_loop_stop(struct vdb_loop *loop)
{
  uint64_t one = 1;
  ssize_t r;

  loop->stop = true;
  r = write(loop->wake.fd, &one, sizeof one);
  (void)r;
}

/* Until the next timer is due, or -1 for no timer. */
static int64_t loop_timeout_ns(struct vdb_loop *loop)
{
  uint64_t now;

  if (!loop->timers)
    return -1;
  now = vdb_now_ns();
  return loop->timers->deadline_ns <= now ? 0 : (int64_t)(loop->timers->deadline_ns - now);
}

static int loop_timeout_ms(struct vdb_loop *loop)
{
  int64_t ns = loop_timeout_ns(loop);

  return ns < 0 ? -1 : (int)((ns + 999999) / 1000000);
}

static void loop_fire_timers(struct vdb_loop *loop)
{
  uint64_t now = vdb_now_ns();

  while (loop->timers && loop->timers->deadline_ns <= now) {
    struct vdb_timer *t = loop->timers;
    loop->timers = t->next;
    t->armed = false;
    t->cb(t);
  }
}

/* ---- io_uring ---- */

static void loop_ring_reap(struct vdb_loop *loop)
{
  struct io_uring_cqe *cqe;

  while (io_uring_peek_cqe(loop->ring, &cqe) == 0) {
    struct vdb_uring_op *op = io_uring_cqe_get_data(cqe);
    int res = cqe->res;
    io_uring_cqe_seen(loop->ring, cqe);
    loop->ring_inflight--;
    if (op)
      op->cb(op, res);
  }
}

static void loop_ring_cb(struct vdb_watch *w, uint32_t revents)
{
  uint64_t v;
  ssize_t r = read(w->fd, &v, sizeof v);
  (void)r;
  loop_ring_reap(w->arg);
}

static int loop_ring_setup(struct vdb_loop *loop)
{
  struct io_uring *ring = calloc(1, sizeof *ring);
  int r;

  if (!ring)
    return -ENOMEM;
  r = io_uring_queue_init(LOOP_RING_ENTRIES, ring, 0);
  if (r < 0)
    goto err_free;
  loop->ring_w.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (loop->ring_w.fd < 0) {
    r = -errno;
    goto err_ring;
  }
  r = io_uring_register_eventfd(ring, loop->ring_w.fd);
  if (r < 0)
    goto err_fd;
  loop->ring_w.events = EPOLLIN;
  loop->ring_w.cb = loop_ring_cb;
  loop->ring_w.arg = loop;
  r = vdb_loop_watch(loop, &loop->ring_w);
  if (r < 0)
    goto err_fd;
  loop->ring = ring;
  return 0;

err_fd:
  close(loop->ring_w.fd);
err_ring:
  io_uring_queue_exit(ring);
err_free:
  free(ring);
  return r;
}

struct io_uring *vdb_loop_uring(void)
{
  struct vdb_loop *loop = current_loop;

  if (!loop || loop->ring_failed)
    return NULL;
  if (!loop->ring && loop_ring_setup(loop) < 0) {
    vdb_warn("io_uring unavailable; falling back to synchronous I/O");
    loop->ring_failed = true;
    return NULL;
  }
  return loop->ring;
}

struct io_uring_sqe *vdb_loop_get_sqe(void)
{
  struct io_uring *ring = vdb_loop_uring();
  struct io_uring_sqe *sqe;

  if (!ring)
    return NULL;
  sqe = io_uring_get_sqe(ring);
  if (!sqe) {
    io_uring_submit(ring);
    sqe = io_uring_get_sqe(ring);
  }
  if (sqe)
    current_loop->ring_inflight++;
  return sqe;
}

struct io_uring_sqe *vdb_loop_get_sqe_quick(void)
{
  struct vdb_loop *loop = current_loop;
  struct io_uring_sqe *sqe;

  if (!loop || !vdb_loop_is_uring(loop) || !(sqe = vdb_loop_get_sqe()))
    return NULL;
  loop->quick++;
  return sqe;
}

void vdb_uring_set_op(struct io_uring_sqe *sqe, struct vdb_uring_op *op)
{
  io_uring_sqe_set_data(sqe, op);
}

static void loop_ring_exit(struct vdb_loop *loop)
{
  if (!loop->ring)
    return;
  /* Wait for what is still in flight, so no buffer is written after its
   * owner is gone. */
  while (loop->ring_inflight > 0 && io_uring_submit_and_wait(loop->ring, 1) >= 0)
    loop_ring_reap(loop);
  vdb_loop_unwatch(loop, &loop->ring_w);
  io_uring_queue_exit(loop->ring);
  close(loop->ring_w.fd);
  free(loop->ring);
  loop->ring = NULL;
}

void vdb_loop_nap(struct vdb_loop *loop, unsigned us)
{
  if (us > loop->nap_us)
    loop->nap_us = us;
}

/* Take the pause asked for this round, if any. */
static void loop_nap(struct vdb_loop *loop)
{
  struct timespec ts;

  if (loop->nap_us == 0)
    return;
  ts.tv_sec = loop->nap_us / 1000000;
  ts.tv_nsec = (long)(loop->nap_us % 1000000) * 1000;
  loop->nap_us = 0;
  while (!loop->stop && clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts) == EINTR)
    ;
}

void vdb_loop_poll(struct vdb_loop *loop, unsigned us)
{
  if (us > loop->poll_us)
    loop->poll_us = us;
}

/* Poll for events for up to us microseconds: their number, or 0.  Between
 * looks the CPU is offered to any other thread that is ready to run on it
 * (a client on the same CPU, whose request we are waiting for). */
static int loop_poll(struct vdb_loop *loop, struct epoll_event *evs, int max, unsigned us)
{
  uint64_t end = vdb_now_ns() + (uint64_t)us * 1000;
  int n;

  while ((n = epoll_wait(loop->epfd, evs, max, 0)) == 0 && !loop->stop && vdb_now_ns() < end)
    sched_yield();
  return n;
}

/* ---- ring mode: the loop ---- */

void vdb_loop_want_uring(struct vdb_loop *loop)
{
  const char *env = getenv("VDBUS_LOOP");

  if (loop->want_uring || (env && strcmp(env, "epoll") == 0))
    return;
  /* vdb_loop_create's own watch has no poll yet; later ones get theirs in
   * vdb_loop_watch. */
  if (poll_new(loop, &loop->wake))
    loop->want_uring = true;
}

bool vdb_loop_is_uring(const struct vdb_loop *loop) { return loop->uring && !loop->stop; }

/* Make the ring the loop waits on, on the loop's thread (SINGLE_ISSUER),
 * and move every watch from epoll into it.  Returns false (epoll it is) if
 * this kernel cannot. */
static bool ring_start(struct vdb_loop *loop)
{
  struct io_uring_params prm = { .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN };
  struct io_uring *ring;
  int r;

  if (loop->ring)   /* made in epoll mode already (not expected) */
    return false;
  if (!(ring = calloc(1, sizeof *ring)))
    return false;
  r = io_uring_queue_init_params(LOOP_RING_ENTRIES, ring, &prm);
  if (r < 0 || !(prm.features & IORING_FEAT_EXT_ARG)) {
    vdb_dbg(VDB_DBG_IO, "event loop: ring mode unavailable (%s): epoll",
            r < 0 ? strerror(-r) : "no IORING_FEAT_EXT_ARG");
    if (r == 0)
      io_uring_queue_exit(ring);
    free(ring);
    return false;
  }
  loop->ring = ring;
  loop->uring = true;
  vdb_dbg(VDB_DBG_IO, "event loop: waiting on io_uring (ring mode)");
  for (struct loop_poll *p = loop->polls; p; p = p->next) {
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, p->w->fd, NULL);
    poll_queue_arm(loop, p);
  }
  return true;
}

/* Submit what is queued and wait for wait_nr completions or timeout_ns
 * (< 0: no timeout).  Returns 0, or -errno other than ETIME and EINTR. */
static int ring_wait(struct vdb_loop *loop, int64_t timeout_ns, unsigned wait_nr)
{
  struct io_uring_cqe *cqe;
  int r;

  ring_arm_pending(loop);
  if (loop->quick && wait_nr == 1) {   /* not for their completions alone */
    wait_nr += loop->quick;
    if (timeout_ns < 0 || timeout_ns > LOOP_QUICK_NS)
      timeout_ns = LOOP_QUICK_NS;
  }
  loop->quick = 0;
  if (timeout_ns < 0) {
    r = io_uring_submit_and_wait(loop->ring, wait_nr);
  } else {
    struct __kernel_timespec ts = { .tv_sec = timeout_ns / 1000000000,
                                    .tv_nsec = timeout_ns % 1000000000 };
    r = io_uring_submit_and_wait_timeout(loop->ring, &cqe, wait_nr, &ts, NULL);
  }
  return r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY ? r : 0;
}

/* Poll for completions for up to us microseconds (see loop_poll). */
static void ring_poll(struct vdb_loop *loop, unsigned us)
{
  uint64_t end = vdb_now_ns() + (uint64_t)us * 1000;
  unsigned quick = loop->quick;   /* completions that are not what we poll for */

  ring_arm_pending(loop);
  loop->quick = 0;
  io_uring_submit_and_get_events(loop->ring);
  while (io_uring_cq_ready(loop->ring) <= quick && !loop->stop && vdb_now_ns() < end) {
    sched_yield();
    io_uring_get_events(loop->ring);
  }
}

/* Handle up to 64 completions; while stopping, polls are only marked done
 * (their callbacks are not run). */
static void ring_dispatch(struct vdb_loop *loop, bool stopping)
{
  struct { uint64_t ud; int res; } got[64];
  struct io_uring_cqe *cqe;
  unsigned head, n = 0;

  io_uring_for_each_cqe(loop->ring, head, cqe) {
    got[n].ud = cqe->user_data;
    got[n].res = cqe->res;
    if (++n == 64)
      break;
  }
  io_uring_cq_advance(loop->ring, n);
  for (unsigned i = 0; i < n; i++) {
    if (got[i].ud == LOOP_UD_OWN)
      continue;
    if ((got[i].ud & LOOP_POLL_TAG) && stopping) {
      ((struct loop_poll *)(uintptr_t)(got[i].ud & ~LOOP_POLL_TAG))->armed = false;
    } else if (got[i].ud & LOOP_POLL_TAG) {
      ring_poll_done(loop, (struct loop_poll *)(uintptr_t)(got[i].ud & ~LOOP_POLL_TAG), got[i].res);
    } else {
      struct vdb_uring_op *op = (struct vdb_uring_op *)(uintptr_t)got[i].ud;
      loop->ring_inflight--;
      if (op)
        op->cb(op, got[i].res);
    }
  }
}

/* Leave ring mode, on the loop's thread: cancel what is in the ring, wait
 * for the operations (their buffers belong to others), free the polls. */
static void ring_stop(struct vdb_loop *loop)
{
  struct io_uring_sqe *sqe = ring_sqe(loop);

  if (sqe) {
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, LOOP_UD_OWN);
  }
  loop->to_arm = NULL;   /* nothing is armed any more */
  while (loop->ring_inflight > 0 && io_uring_submit_and_wait(loop->ring, 1) >= 0)
    ring_dispatch(loop, true);
  io_uring_queue_exit(loop->ring);
  free(loop->ring);
  loop->ring = NULL;
  loop->uring = false;
  loop->want_uring = false;
  while (loop->polls)
    poll_free(loop, loop->polls);
}

static int ring_run(struct vdb_loop *loop)
{
  unsigned poll_us = 0;
  int r = 0;

  while (!loop->stop) {
    if (io_uring_cq_ready(loop->ring) == 0) {
      if (poll_us)
        ring_poll(loop, poll_us);
      if (io_uring_cq_ready(loop->ring) == 0 && (r = ring_wait(loop, loop_timeout_ns(loop), 1)) < 0)
        break;
    }
    ring_dispatch(loop, false);
    loop_fire_timers(loop);
    if (loop->nap_us) {   /* submit what the round queued, then pause */
      int64_t ns = (int64_t)loop->nap_us * 1000;
      loop->nap_us = 0;
      if (!loop->stop && (r = ring_wait(loop, ns, 2 * LOOP_RING_ENTRIES)) < 0)
        break;
    }
    poll_us = loop->poll_us;
    loop->poll_us = 0;
  }
  loop_run_calls(loop);
  ring_stop(loop);
  return r;
}

int vdb_loop_run(struct vdb_loop *loop)
{
  struct epoll_event evs[64];
  unsigned poll_us = 0;

  current_loop = loop;
  /* The pauses of vdb_loop_nap are tens of microseconds: the default timer
   * slack (50 us) would stretch each one to several times its length. */
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  if (loop->want_uring && ring_start(loop)) {
    int r = ring_run(loop);
    loop->stop = false;
    current_loop = NULL;
    return r;
  }
  while (!loop->stop) {
    int n;

    if (loop->ring && io_uring_sq_ready(loop->ring) > 0)
      io_uring_submit(loop->ring);
    n = poll_us ? loop_poll(loop, evs, 64, poll_us) : 0;
    if (n == 0)
      n = epoll_wait(loop->epfd, evs, 64, loop_timeout_ms(loop));
    if (n < 0) {
      if (errno == EINTR)
        continue;
      current_loop = NULL;
      return -errno;
    }
    loop->batch = evs;
    loop->batch_n = n;
    for (int i = 0; i < n; i++) {
      struct vdb_watch *w = evs[i].data.ptr;
      if (w)
        w->cb(w, evs[i].events);
    }
    loop->batch_n = 0;
    loop_fire_timers(loop);
    loop_nap(loop);
    poll_us = loop->poll_us;
    loop->poll_us = 0;
  }
  loop_run_calls(loop);
  loop->stop = false;
  current_loop = NULL;
  return 0;
}

/* ---- Worker loops ---- */

struct worker {
  pthread_t thread;
  struct vdb_loop *loop;
};

static struct worker *workers;
static int nworkers;
static _Atomic unsigned next_worker;

static void *worker_main(void *arg)
{
  struct worker *w = arg;
  int r = vdb_loop_run(w->loop);

  if (r < 0)
    vdb_err("worker loop failed: %s", strerror(-r));
  return NULL;
}

int vdb_workers_start(int n)
{
  int r;

  assert(n > 0 && !workers);
  workers = calloc((size_t)n, sizeof *workers);
  if (!workers)
    return -ENOMEM;
  for (nworkers = 0; nworkers < n; nworkers++) {
    struct worker *w = &workers[nworkers];
    r = vdb_loop_create(&w->loop);
    if (r < 0)
      goto err;
    vdb_loop_want_uring(w->loop);
    r = -pthread_create(&w->thread, NULL, worker_main, w);
    if (r < 0) {
      vdb_loop_destroy(w->loop);
      goto err;
    }
  }
  return 0;
err:
  vdb_workers_stop();
  return r;
}

void vdb_workers_stop(void)
{
  for (int i = 0; i < nworkers; i++) {
    vdb_loop_stop(workers[i].loop);
    pthread_join(workers[i].thread, NULL);
    vdb_loop_destroy(workers[i].loop);
  }
  free(workers);
  workers = NULL;
  nworkers = 0;
}

int vdb_workers_count(void) { return nworkers; }

struct vdb_loop *vdb_worker_pick(void)
{
  return workers[next_worker++ % (unsigned)nworkers].loop;
}

struct vdb_loop *vdb_worker_get(int i) { return workers[i].loop; }
