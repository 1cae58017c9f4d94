/* vdbus — the ublk data path: one thread per hardware queue, running its
 * own vdb_loop and an io_uring for the queue's uring commands (FETCH_REQ,
 * COMMIT_AND_FETCH_REQ).  See ublk.c for the whole picture. */
#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "bus/bus.h"
#include "common/error.h"
#include "common/log.h"
#include "common/loop.h"
#include "frontends/blkdev.h"
#include "frontends/frontend.h"
#include "frontends/ublk-internal.h"
#include "frontends/ublk-uapi.h"


/* ---- the data path (queue thread) ---- */

/* The one mapping of a finished bus request to a ublk result: bytes done
 * for reads and writes, 0 for the rest, or -errno (the driver turns it
 * into a block status). */
static int32_t ub_result(const struct vdb_req *req, int err)
{
  if (err < 0)
    return err == -EPERM ? -EROFS : err;
  if (req->type == VDB_REQ_READ || req->type == VDB_REQ_WRITE)
    return (int32_t)req->len;
  return 0;
}

static struct io_uring_sqe *ub_get_sqe(struct ub_queue *q)
{
  struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

  if (!sqe) {
    io_uring_submit(&q->ring);
    sqe = io_uring_get_sqe(&q->ring);
  }
  return sqe;
}

/* Queue a FETCH_REQ or COMMIT_AND_FETCH_REQ for io.  Queue thread. */
static void ub_queue_cmd(struct ub_queue *q, struct ub_io *io, uint32_t op)
{
  struct io_uring_sqe *sqe = ub_get_sqe(q);
  struct ublksrv_io_cmd *cmd;

  assert(sqe); /* one command per tag, and the ring has depth entries */
  memset(sqe, 0, sizeof *sqe);
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = q->u->cdev_fd;
  sqe->cmd_op = op;
  cmd = (struct ublksrv_io_cmd *)sqe->cmd;
  cmd->q_id = q->qid;
  cmd->tag = io->tag;
  cmd->result = io->result;
  cmd->addr = (uint64_t)(uintptr_t)io->buf;
  sqe->user_data = io->tag;
}

/* io's request is done: commit its result and fetch the next one. */
static void ub_io_commit(struct ub_queue *q, struct ub_io *io)
{
  assert(io->owned);
  io->owned = false;
  q->owned--;
  ub_queue_cmd(q, io, UBLK_U_IO_COMMIT_AND_FETCH_REQ);
}

static void ub_queue_submit(struct ub_queue *q);
static void ub_queue_maybe_exit(struct ub_queue *q);

/* req->done: any thread.  On the queue thread the commit is queued at
 * once (and submitted at once unless one of our callbacks, which submit on
 * return, is running: a backend completing from the loop's own ring);
 * elsewhere io goes on the remote list and the first to add to an empty
 * list wakes the queue. */
static void ub_req_done(struct vdb_req *req, int err)
{
  struct ub_io *io = req->opaque;
  struct ub_queue *q = io->q;
  struct ub_io *head;

  io->result = ub_result(req, err);
  if (vdb_loop_current() == q->loop) {
    ub_io_commit(q, io);
    if (!q->in_cb) {
      ub_queue_submit(q);
      ub_queue_maybe_exit(q);
    }
    return;
  }
  head = atomic_load_explicit(&q->remote, memory_order_relaxed);
  do
    io->next = head;
  while (!atomic_compare_exchange_weak_explicit(&q->remote, &head, io, memory_order_release,
                                                memory_order_relaxed));
  if (!head) {
    uint64_t one = 1;
    ssize_t n = write(q->done_w.fd, &one, sizeof one);
    (void)n;
  }
}

/* Turn the descriptor of io's tag into a bus request and submit it. */
static void ub_io_serve(struct ub_queue *q, struct ub_io *io)
{
  const struct ublksrv_io_desc *iod = &q->iods[io->tag];
  uint32_t op_flags = iod->op_flags;
  struct vdb_req *req = &io->req;

  memset(req, 0, sizeof *req);
  req->offset = iod->start_sector << 9;
  req->len = (uint64_t)iod->nr_sectors << 9;
  req->done = ub_req_done;
  req->opaque = io;
  io->owned = true;
  q->owned++;
  switch (op_flags & 0xff) {
  case UBLK_IO_OP_READ:
    req->type = VDB_REQ_READ;
    req->buf = io->buf;
    break;
  case UBLK_IO_OP_WRITE:
    req->type = VDB_REQ_WRITE;
    req->buf = io->buf;
    if (op_flags & UBLK_IO_F_FUA)
      req->flags |= VDB_REQ_FUA;
    break;
  case UBLK_IO_OP_FLUSH:
    req->type = VDB_REQ_FLUSH;
    req->offset = req->len = 0;
    break;
  case UBLK_IO_OP_DISCARD:
    req->type = VDB_REQ_TRIM;
    break;
  case UBLK_IO_OP_WRITE_ZEROES:
    req->type = VDB_REQ_WRITE_ZEROES;
    if (op_flags & UBLK_IO_F_NOUNMAP)
      req->flags |= VDB_REQ_NO_HOLE;
    break;
  default:
    io->result = -EOPNOTSUPP;
    ub_io_commit(q, io);
    return;
  }
  if (req->buf && req->len > q->u->max_io) {
    io->result = -EIO;
    ub_io_commit(q, io);
    return;
  }
  vdb_dbg(VDB_DBG_IO, "%s: ublk q%u tag %u op %u off %llu len %llu", q->u->d->name, q->qid,
          io->tag, op_flags & 0xff, (unsigned long long)req->offset,
          (unsigned long long)req->len);
  vdb_disk_submit(q->u->d, req);
}

/* Tear the queue down once it is stopping and nothing is being served:
 * the ring goes (the kernel cancels what it still holds), and the loop is
 * told to return.  Queue thread. */
static void ub_queue_maybe_exit(struct ub_queue *q)
{
  if (!q->stopping || q->owned > 0 || q->stopped)
    return;
  if (q->watching) {
    vdb_loop_unwatch(q->loop, &q->ring_w);
    vdb_loop_unwatch(q->loop, &q->done_w);
    q->watching = false;
  }
  if (q->ring_ok) {
    io_uring_queue_exit(&q->ring);
    q->ring_ok = false;
  }
  q->stopped = true;
  vdb_loop_stop(q->loop);
}

/* Commit what other threads completed. */
static void ub_queue_take_remote(struct ub_queue *q)
{
  struct ub_io *io = atomic_exchange_explicit(&q->remote, NULL, memory_order_acquire);

  while (io) {
    struct ub_io *next = io->next;
    ub_io_commit(q, io);
    io = next;
  }
}

/* Reap the queue's uring: each CQE is a tag with a new request (0), or a
 * command the driver gave back (UBLK_IO_RES_ABORT: the device is going
 * away).  Returns how many CQEs there were. */
static unsigned ub_queue_reap(struct ub_queue *q)
{
  struct io_uring_cqe *cqe;
  unsigned n = 0;

  while (q->ring_ok && io_uring_peek_cqe(&q->ring, &cqe) == 0) {
    uint64_t tag = cqe->user_data;
    int res = cqe->res;

    io_uring_cqe_seen(&q->ring, cqe);
    n++;
    if (tag >= q->u->depth)
      continue;
    if (res == UBLK_IO_RES_OK) {
      ub_io_serve(q, &q->ios[tag]);
      continue;
    }
    if (res != UBLK_IO_RES_ABORT && !q->stopping)
      vdb_err("%s: ublk q%u tag %u: command failed: %s", q->u->d->name, q->qid,
              (unsigned)tag, strerror(res < 0 ? -res : EIO));
    q->ios[tag].dead = true;
  }
  return n;
}

static void ub_queue_submit(struct ub_queue *q)
{
  if (q->ring_ok && io_uring_sq_ready(&q->ring) > 0) {
    int r = io_uring_submit(&q->ring);
    if (r < 0 && !q->stopping)
      vdb_err("%s: ublk q%u: submit: %s", q->u->d->name, q->qid, strerror(-r));
  }
}

static void ub_on_ring(struct vdb_watch *w, uint32_t revents)
{
  struct ub_queue *q = w->arg;
  uint64_t v;
  ssize_t n = read(w->fd, &v, sizeof v);

  (void)n;
  q->in_cb = true;
  /* While requests keep coming, submit the commits and collect the next
   * requests in one system call instead of going back to epoll. */
  for (unsigned round = 0; round < UB_BUSY_ROUNDS; round++) {
    unsigned got = ub_queue_reap(q);
    ub_queue_take_remote(q);
    if (!q->ring_ok || (got == 0 && round > 0))
      break;
    io_uring_submit_and_get_events(&q->ring);
  }
  q->in_cb = false;
  ub_queue_submit(q);
  ub_queue_maybe_exit(q);
}

static void ub_on_done(struct vdb_watch *w, uint32_t revents)
{
  struct ub_queue *q = w->arg;
  uint64_t v;
  ssize_t n = read(w->fd, &v, sizeof v);

  (void)n;
  q->in_cb = true;
  ub_queue_take_remote(q);
  q->in_cb = false;
  ub_queue_submit(q);
  ub_queue_maybe_exit(q);
}

/* ---- queue start and stop ---- */

static void ub_queue_signal(struct ub_queue *q, int err)
{
  pthread_mutex_lock(&q->lock);
  q->start_err = err;
  q->call_done = true;
  pthread_cond_broadcast(&q->cond);
  pthread_mutex_unlock(&q->lock);
}

/* On the queue thread: set up the ring, watch it, fetch on every tag. */
static void ub_queue_start_on_loop(void *arg)
{
  struct ub_queue *q = arg;
  struct io_uring_cqe *cqe;
  int r;

  prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
  r = io_uring_queue_init(q->u->depth, &q->ring, 0);
  if (r < 0)
    goto out;
  q->ring_ok = true;
  r = io_uring_register_eventfd(&q->ring, q->ring_w.fd);
  if (r < 0)
    goto out;
  if ((r = vdb_loop_watch(q->loop, &q->ring_w)) < 0)
    goto out;
  if ((r = vdb_loop_watch(q->loop, &q->done_w)) < 0) {
    vdb_loop_unwatch(q->loop, &q->ring_w);
    goto out;
  }
  q->watching = true;
  for (unsigned t = 0; t < q->u->depth; t++)
    ub_queue_cmd(q, &q->ios[t], UBLK_U_IO_FETCH_REQ);
  r = io_uring_submit(&q->ring);
  if (r >= 0 && r != q->u->depth)
    r = -EIO;
  /* A refused FETCH_REQ completes at once. */
  if (r >= 0 && io_uring_peek_cqe(&q->ring, &cqe) == 0 && cqe->res < 0)
    r = cqe->res;
  if (r > 0)
    r = 0;
out:
  if (r < 0) {
    q->stopping = true;
    ub_queue_maybe_exit(q);
  }
  ub_queue_signal(q, r);
}

static void ub_queue_stop_on_loop(void *arg)
{
  struct ub_queue *q = arg;

  q->stopping = true;
  ub_queue_maybe_exit(q);
}

static void *ub_queue_main(void *arg)
{
  struct ub_queue *q = arg;
  int r = vdb_loop_run(q->loop);

  if (r < 0)
    vdb_err("%s: ublk q%u loop: %s", q->u->d->name, q->qid, strerror(-r));
  return NULL;
}

/* Map the descriptors, make the buffers, start the thread and fetch on
 * every tag.  Control thread.  0 or -errno with an error message. */
int ub_queue_start(struct ublk_fe *u, struct ub_queue *q)
{
  long page = sysconf(_SC_PAGESIZE);
  off_t off = UBLKSRV_CMD_BUF_OFFSET + (off_t)q->qid * (off_t)VDB_UBLK_CMD_BUF_STRIDE(page);
  char name[16];
  void *p;
  int r;

  q->iods_len = (u->depth * sizeof(struct ublksrv_io_desc) + page - 1) / page * page;
  p = mmap(NULL, q->iods_len, PROT_READ, MAP_SHARED | MAP_POPULATE, u->cdev_fd, off);
  if (p == MAP_FAILED) {
    r = -errno;
    vdb_set_error("mmap of ublk queue %u descriptors: %s", q->qid, strerror(-r));
    return r;
  }
  q->iods = p;
  q->bufs_len = (size_t)u->depth * u->max_io;
  p = mmap(NULL, q->bufs_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
           -1, 0);
  if (p == MAP_FAILED) {
    q->bufs = NULL;
    vdb_set_error("out of memory for ublk queue buffers");
    return -ENOMEM;
  }
  q->bufs = p;
  q->ios = calloc(u->depth, sizeof *q->ios);
  if (!q->ios) {
    vdb_set_error("out of memory");
    return -ENOMEM;
  }
  for (unsigned t = 0; t < u->depth; t++) {
    q->ios[t].q = q;
    q->ios[t].tag = (uint16_t)t;
    q->ios[t].buf = (uint8_t *)q->bufs + (size_t)t * u->max_io;
  }
  q->ring_w = (struct vdb_watch){ .fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                                  .events = EPOLLIN, .cb = ub_on_ring, .arg = q };
  q->done_w = (struct vdb_watch){ .fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                                  .events = EPOLLIN, .cb = ub_on_done, .arg = q };
  if (q->ring_w.fd < 0 || q->done_w.fd < 0) {
    r = -errno;
    vdb_set_error("eventfd: %s", strerror(-r));
    return r;
  }
  if ((r = vdb_loop_create(&q->loop)) < 0) {
    vdb_set_error("cannot create the loop of ublk queue %u: %s", q->qid, strerror(-r));
    return r;
  }
  r = pthread_create(&q->thread, NULL, ub_queue_main, q);
  if (r != 0) {
    vdb_set_error("cannot start the thread of ublk queue %u: %s", q->qid, strerror(r));
    return -r;
  }
  q->thread_started = true;
  snprintf(name, sizeof name, "ublk%d-q%u", u->dev_id, q->qid);
  pthread_setname_np(q->thread, name);
  r = vdb_loop_post(q->loop, ub_queue_start_on_loop, q);
  if (r < 0) {
    vdb_set_error("cannot start ublk queue %u: %s", q->qid, strerror(-r));
    return r;
  }
  pthread_mutex_lock(&q->lock);
  while (!q->call_done)
    pthread_cond_wait(&q->cond, &q->lock);
  r = q->start_err;
  pthread_mutex_unlock(&q->lock);
  if (r < 0)
    vdb_set_error("ublk queue %u: FETCH_REQ: %s", q->qid, strerror(-r));
  return r;
}

/* Stop serving (after STOP_DEV, or on a failed attach), join, free.
 * Control thread.  Waits for the requests being served to finish. */
void ub_queue_stop(struct ub_queue *q)
{
  if (q->thread_started) {
    if (vdb_loop_post(q->loop, ub_queue_stop_on_loop, q) < 0)
      vdb_err("ublk q%u: cannot post stop", q->qid);
    pthread_join(q->thread, NULL);
    q->thread_started = false;
  }
  if (q->loop)
    vdb_loop_destroy(q->loop);
  q->loop = NULL;
  if (q->ring_w.fd > 0)
    close(q->ring_w.fd);
  if (q->done_w.fd > 0)
    close(q->done_w.fd);
  q->ring_w.fd = q->done_w.fd = -1;
  if (q->iods)
    munmap((void *)q->iods, q->iods_len);
  q->iods = NULL;
  if (q->bufs)
    munmap(q->bufs, q->bufs_len);
  q->bufs = NULL;
  free(q->ios);
  q->ios = NULL;
}
