/* vdbus — request validation and completion: the one place where range,
 * read-only and capability checks happen, so backends can trust their input. */
#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "bus/bus.h"
#include "common/log.h"
#include "common/loop.h"

/* One request fewer in flight; wakes an unplug or a pause waiting for the
 * disk to drain. */
static void req_inflight_dec(struct vdb_disk *d)
{
  if (atomic_fetch_sub(&d->stats.inflight, 1) == 1 &&
      (atomic_load(&d->closing) || atomic_load(&d->paused))) {
    pthread_mutex_lock(&d->lock);
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
  }
}

void vdb_req_complete(struct vdb_req *req, int err)
{
  struct vdb_disk *d = req->disk;

  assert(err <= 0);
  if (err < 0) {
    atomic_fetch_add_explicit(&d->stats.errors, 1, memory_order_relaxed);
    vdb_dbg(VDB_DBG_IO, "%s: request type %d off %llu len %llu failed: %d", d->name,
            (int)req->type, (unsigned long long)req->offset,
            (unsigned long long)req->len, err);
  }
  /* done() may free req (and drop its disk reference): touch neither after. */
  req_inflight_dec(d);
  req->done(req, err);
}

bool vdb_req_cancelled(const struct vdb_req *req)
{
  return atomic_load_explicit(&req->disk->closing, memory_order_acquire);
}

/* Returns 0 when the request may go to the backend, 1 when the bus has
 * already answered it (success with nothing to do), or -errno. */
static int req_validate(struct vdb_disk *d, struct vdb_req *req, unsigned flags)
{
  bool is_write = req->type == VDB_REQ_WRITE || req->type == VDB_REQ_TRIM ||
                  req->type == VDB_REQ_WRITE_ZEROES;

  if ((unsigned)req->type >= VDB_REQ_NR_TYPES)
    return -EINVAL;
  if (is_write && d->readonly)
    return -EPERM;
  if (is_write && !(flags & VDB_SUBMIT_INTERNAL) &&
      atomic_load_explicit(&d->dependents, memory_order_acquire) > 0)
    return -EPERM; /* the base of overlays is shared and read-only */
  if (req->type == VDB_REQ_FLUSH)
    return d->ops->flush && !(d->info.caps_off & VDB_CAP_FLUSH) ? 0 : 1;
  if (req->offset > d->size || req->len > d->size - req->offset)
    return req->type == VDB_REQ_WRITE || req->type == VDB_REQ_WRITE_ZEROES ? -ENOSPC : -EINVAL;
  if (req->len == 0)
    return 1;
  if (!d->can_fua)
    req->flags &= ~VDB_REQ_FUA;
  switch (req->type) {
  case VDB_REQ_TRIM:
    return d->can_trim ? 0 : -EOPNOTSUPP;
  case VDB_REQ_WRITE_ZEROES:
    if (!d->can_zero)
      return -EOPNOTSUPP;
    return 0;
  case VDB_REQ_CACHE:
    return d->ops->cache && d->can_cache ? 0 : 1;
  case VDB_REQ_BLOCK_STATUS:
    if (!d->can_extents) {
      req->extents[0].length = req->len;
      req->extents[0].flags = 0;
      req->nr_extents = 1;
      return 1;
    }
    return req->max_extents >= 1 ? 0 : -EINVAL;
  default:
    return 0;
  }
}

static void req_count(struct vdb_disk *d, const struct vdb_req *req)
{
  struct vdb_disk_stats *s = &d->stats;

  switch (req->type) {
  case VDB_REQ_READ:
    atomic_fetch_add_explicit(&s->reads, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->bytes_read, req->len, memory_order_relaxed);
    break;
  case VDB_REQ_WRITE:
    atomic_fetch_add_explicit(&s->writes, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->bytes_written, req->len, memory_order_relaxed);
    break;
  case VDB_REQ_FLUSH: atomic_fetch_add_explicit(&s->flushes, 1, memory_order_relaxed); break;
  case VDB_REQ_TRIM: atomic_fetch_add_explicit(&s->trims, 1, memory_order_relaxed); break;
  case VDB_REQ_WRITE_ZEROES: atomic_fetch_add_explicit(&s->zeroes, 1, memory_order_relaxed); break;
  case VDB_REQ_CACHE: atomic_fetch_add_explicit(&s->caches, 1, memory_order_relaxed); break;
  case VDB_REQ_BLOCK_STATUS: atomic_fetch_add_explicit(&s->block_status, 1, memory_order_relaxed); break;
  default: break;
  }
}

/* Park a request submitted while the disk is paused.  Returns false when
 * the pause ended meanwhile (submit it now). */
static bool req_park(struct vdb_disk *d, struct vdb_req *req)
{
  bool parked = false;

  pthread_mutex_lock(&d->lock);
  if (atomic_load(&d->paused)) {
    req->backend_priv[0] = 0;
    *d->paused_tail = req;
    d->paused_tail = (struct vdb_req **)&req->backend_priv[0];
    parked = true;
  }
  pthread_mutex_unlock(&d->lock);
  return parked;
}

void vdb_disk_submit_flags(struct vdb_disk *d, struct vdb_req *req, unsigned flags)
{
  const struct vdb_backend_ops *ops;
  int r;

  req->disk = d;
  req->nr_extents = 0;
  /* Counted in flight before the pause flag is read, and vdb_disk_pause()
   * sets the flag before it reads the count (both sequentially
   * consistent): either the pause waits for this request or this request
   * sees the pause. */
  atomic_fetch_add(&d->stats.inflight, 1);
  if (!(flags & VDB_SUBMIT_INTERNAL) && atomic_load(&d->paused)) {
    req_inflight_dec(d);
    if (req_park(d, req))
      return;
    atomic_fetch_add(&d->stats.inflight, 1);
  }
  ops = d->ops;
  r = req_validate(d, req, flags);
  if (r != 0) {
    vdb_req_complete(req, r < 0 ? r : 0);
    return;
  }
  req_count(d, req);
  switch (req->type) {
  case VDB_REQ_READ: ops->read(d->handle, req); break;
  case VDB_REQ_WRITE: ops->write(d->handle, req); break;
  case VDB_REQ_FLUSH: ops->flush(d->handle, req); break;
  case VDB_REQ_TRIM: ops->trim(d->handle, req); break;
  case VDB_REQ_WRITE_ZEROES: ops->write_zeroes(d->handle, req); break;
  case VDB_REQ_CACHE: ops->cache(d->handle, req); break;
  case VDB_REQ_BLOCK_STATUS: ops->block_status(d->handle, req); break;
  default: vdb_req_complete(req, -EINVAL); break;
  }
}

ssize_t vdb_disk_write_direct(struct vdb_disk *d, uint64_t offset, uint64_t len, bool first,
                              ssize_t (*fill)(void *dst, size_t len, void *arg), void *arg)
{
  const struct vdb_backend_ops *ops;
  ssize_t n;

  atomic_fetch_add(&d->stats.inflight, 1);   /* as in submit: vs vdb_disk_pause */
  if (atomic_load(&d->paused)) {
    n = -EAGAIN;
  } else if (!(ops = d->ops)->write_direct) {   /* after the pause check, as in submit */
    n = -EOPNOTSUPP;
  } else if (d->readonly || atomic_load_explicit(&d->dependents, memory_order_acquire) > 0) {
    n = -EPERM;
  } else if (offset > d->size || len > d->size - offset) {
    n = -ENOSPC;
  } else if (len == 0) {
    n = 0;
  } else {
    n = ops->write_direct(d->handle, offset, len, fill, arg);
    if (n > 0) {
      if (first)
        atomic_fetch_add_explicit(&d->stats.writes, 1, memory_order_relaxed);
      atomic_fetch_add_explicit(&d->stats.bytes_written, (uint64_t)n, memory_order_relaxed);
    }
  }
  req_inflight_dec(d);
  return n;
}

void vdb_disk_submit(struct vdb_disk *d, struct vdb_req *req)
{
  vdb_disk_submit_flags(d, req, 0);
}

struct sync_wait {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool done;
  int err;
};

static void sync_done(struct vdb_req *req, int err)
{
  struct sync_wait *w = req->opaque;

  pthread_mutex_lock(&w->lock);
  w->done = true;
  w->err = err;
  pthread_cond_signal(&w->cond);
  pthread_mutex_unlock(&w->lock);
}

struct sync_submit {
  struct vdb_disk *d;
  struct vdb_req *req;
};

static void sync_submit_on_worker(void *arg)
{
  struct sync_submit *s = arg;

  vdb_disk_submit_flags(s->d, s->req, VDB_SUBMIT_INTERNAL);
}

/* Blocks the calling thread.  A backend may complete a request submitted on
 * an event-loop thread through that loop (io_uring), which would never run
 * while we wait: so from a loop thread other than a worker, the request is
 * submitted on a worker loop instead. */
int vdb_disk_io_sync(struct vdb_disk *d, struct vdb_req *req)
{
  struct sync_wait w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, 0 };
  struct sync_submit s = { d, req };
  struct vdb_loop *cur = vdb_loop_current();
  bool on_worker = false, posted = false;

  req->done = sync_done;
  req->opaque = &w;
  for (int i = 0; cur && i < vdb_workers_count(); i++)
    on_worker |= vdb_worker_get(i) == cur;
  if (cur && !on_worker && vdb_workers_count() > 0)
    posted = vdb_loop_post(vdb_worker_pick(), sync_submit_on_worker, &s) == 0;
  if (!posted)
    vdb_disk_submit_flags(d, req, VDB_SUBMIT_INTERNAL);
  pthread_mutex_lock(&w.lock);
  while (!w.done)
    pthread_cond_wait(&w.cond, &w.lock);
  pthread_mutex_unlock(&w.lock);
  return w.err;
}

int vdb_disk_flush_sync(struct vdb_disk *d)
{
  struct vdb_req req = { .type = VDB_REQ_FLUSH };

  if (d->readonly)
    return 0;
  return vdb_disk_io_sync(d, &req);
}

/* ---- pause and resume ---- */

int vdb_disk_pause(struct vdb_disk *d, int timeout_ms)
{
  struct timespec ts;
  int r = 0;

  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += timeout_ms / 1000;
  ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000L) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&d->lock);
  assert(!d->paused);
  d->paused_head = NULL;
  d->paused_tail = &d->paused_head;
  atomic_store(&d->paused, true);
  while (atomic_load(&d->stats.inflight) > 0 && r == 0)
    r = pthread_cond_timedwait(&d->cond, &d->lock, &ts);
  pthread_mutex_unlock(&d->lock);
  if (r != 0 && atomic_load(&d->stats.inflight) > 0) {
    vdb_disk_resume(d);
    return -ETIMEDOUT;
  }
  return 0;
}

struct resume_batch {
  struct vdb_disk *d;
  struct vdb_req *head;
};

static void resume_resubmit(void *arg)
{
  struct resume_batch *b = arg;
  struct vdb_req *req = b->head;

  while (req) {
    struct vdb_req *next = (struct vdb_req *)(uintptr_t)req->backend_priv[0];
    vdb_disk_submit(b->d, req);
    req = next;
  }
  vdb_disk_put(b->d);
  free(b);
}

void vdb_disk_resume(struct vdb_disk *d)
{
  struct resume_batch *b;
  struct vdb_req *head;

  pthread_mutex_lock(&d->lock);
  atomic_store(&d->paused, false);
  head = d->paused_head;
  d->paused_head = NULL;
  d->paused_tail = &d->paused_head;
  pthread_mutex_unlock(&d->lock);
  if (!head)
    return;
  /* From a worker: the backend may complete through the submitting loop. */
  b = malloc(sizeof *b);
  if (b) {
    vdb_disk_get(d);
    b->d = d;
    b->head = head;
    if (vdb_workers_count() > 0 && vdb_loop_post(vdb_worker_pick(), resume_resubmit, b) == 0)
      return;
    resume_resubmit(b);
    return;
  }
  while (head) {
    struct vdb_req *next = (struct vdb_req *)(uintptr_t)head->backend_priv[0];
    vdb_disk_submit(d, head);
    head = next;
  }
}
