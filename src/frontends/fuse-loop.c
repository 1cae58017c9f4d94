/* vdbus — the "loop" frontend: each attached disk is a single regular file,
 * <run_dir>/disks/<name>, served by a libfuse low-level session, with a loop
 * device (/dev/loopN) on top of it.
 *
 * The FUSE descriptor is non-blocking and watched by one worker loop: each
 * readable event receives and dispatches requests until -EAGAIN; read,
 * write, fsync and fallocate become vdb_reqs submitted to the bus and are
 * answered from req->done (fuse_reply_* may be called from any thread).
 * Request contexts and their data buffers come from a per-disk pool and are
 * reused, never freed on the data path.
 *
 * Threads: attach/busy/detach/cleanup_stale run on the control thread and
 * may block; the FUSE session is served on the worker loop, so the control
 * thread can do blocking I/O on the FUSE file (open, LOOP_CONFIGURE, loop
 * teardown) while requests are answered.  Watch/unwatch happen on the
 * worker's thread (lf_call_on_loop).
 *
 * Locks: lf->lock protects the free list, the in-flight count and the
 * rendezvous of lf_call_on_loop.  It is a leaf lock. */
#define FUSE_USE_VERSION 34

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <limits.h>
#include <malloc.h>
#include <linux/falloc.h>
#include <linux/loop.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
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

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

#define LF_MAX_IO (1u << 20)          /* max_read / max_write */
#define LF_BUF_ALIGN 4096u
#define LF_BUF_GRANULE (64u << 10)    /* buffers grow in steps of this */
#define LF_RECV_BATCH 64              /* requests per readable event */
#define LF_SWAP_MIN (64u << 10)       /* writes this large swap buffers instead of copying */
#define LF_ATTR_TIMEOUT 86400.0       /* the size changes only by lf_resize (invalidates) */
#define LF_CONFIGURE_TRIES 16
#define LF_RELEASE_WAIT_MS 3000       /* wait for the loop to let go of the file */
#define LF_NAME_PREFIX "vdbus:"

struct loop_fe;

/* One request in flight: a bus request and its FUSE request.  Pooled. */
struct lf_ctx {
  struct vdb_req req;
  struct loop_fe *lf;
  fuse_req_t freq;
  void *buf;                 /* data buffer (a former receive buffer is only malloc-aligned) */
  size_t cap;                /* its size; only grows */
  struct lf_ctx *next;       /* free list */
};

/* One attached disk. */
struct loop_fe {
  struct vdb_disk *d;
  char path[PATH_MAX];       /* the FUSE mount point (a regular file) */
  bool file_created;
  struct timespec born;      /* the file's timestamps */

  struct fuse_session *se;
  bool mounted;
  struct fuse_buf fbuf;      /* receive buffer; worker thread only */
  size_t fbuf_cap;           /* its size (0: not known yet) */
  struct vdb_loop *loop;     /* the worker loop serving se */
  struct vdb_watch w;
  bool watched;              /* w is in loop; changed on loop's thread */
  int watch_err;             /* result of vdb_loop_watch */

  int loop_nr;               /* -1 until configured */
  int loop_fd;
  dev_t rdev;                /* of /dev/loopN */
  char dev[32];              /* "/dev/loopN" */

  pthread_mutex_t lock;      /* free, inflight, call_done */
  pthread_cond_t cond;
  struct lf_ctx *free;       /* idle contexts; all of them when inflight == 0 */
  unsigned inflight;         /* contexts handed out */
  bool call_done;
};

/* ---- helpers ---- */

static bool lf_has_prefix(const char *s, const char *prefix)
{
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* The one mapping of bus -errno to the errno a FUSE reply carries. */
static int lf_errno(int err)
{
  if (err == -EPERM)
    return EROFS;
  return err < 0 ? -err : EIO;
}

/* ---- the request pool ---- */

static void lf_ctx_put(struct lf_ctx *c);

/* A context with a buffer of at least len bytes, counted in flight, or NULL
 * (out of memory).  Any thread. */
static struct lf_ctx *lf_ctx_get(struct loop_fe *lf, size_t len)
{
  struct lf_ctx *c;

  pthread_mutex_lock(&lf->lock);
  c = lf->free;
  if (c)
    lf->free = c->next;
  lf->inflight++;
  pthread_mutex_unlock(&lf->lock);
  if (!c) {
    c = calloc(1, sizeof *c);
    if (!c)
      goto fail;
    c->lf = lf;
  }
  if (len > c->cap) {
    size_t cap = (len + LF_BUF_GRANULE - 1) / LF_BUF_GRANULE * LF_BUF_GRANULE;
    void *buf;

    if (posix_memalign(&buf, LF_BUF_ALIGN, cap) != 0) {
      lf_ctx_put(c);
      return NULL;
    }
    free(c->buf);
    c->buf = buf;
    c->cap = cap;
  }
  c->next = NULL;
  memset(&c->req, 0, sizeof c->req);
  return c;

fail:
  pthread_mutex_lock(&lf->lock);
  if (--lf->inflight == 0)
    pthread_cond_broadcast(&lf->cond);
  pthread_mutex_unlock(&lf->lock);
  return NULL;
}

/* Return c to the pool; wakes detach when the last request finishes. */
static void lf_ctx_put(struct lf_ctx *c)
{
  struct loop_fe *lf = c->lf;

  c->freq = NULL;
  pthread_mutex_lock(&lf->lock);
  c->next = lf->free;
  lf->free = c;
  if (--lf->inflight == 0)
    pthread_cond_broadcast(&lf->cond);
  pthread_mutex_unlock(&lf->lock);
}

static void lf_pool_free(struct loop_fe *lf)
{
  struct lf_ctx *c = lf->free, *next;

  for (; c; c = next) {
    next = c->next;
    free(c->buf);
    free(c);
  }
  lf->free = NULL;
}

/* ---- FUSE operations (worker thread; completions on any thread) ---- */

/* req->done: answer the FUSE request and recycle the context. */
static void lf_req_done(struct vdb_req *req, int err)
{
  struct lf_ctx *c = req->opaque;

  if (err < 0)
    fuse_reply_err(c->freq, lf_errno(err));
  else if (req->type == VDB_REQ_READ)
    fuse_reply_buf(c->freq, req->buf, req->len);  /* c->buf, or the backend's (VDB_REQ_MAP) */
  else if (req->type == VDB_REQ_WRITE)
    fuse_reply_write(c->freq, req->len);
  else
    fuse_reply_err(c->freq, 0);
  lf_ctx_put(c);
}

/* Fill c->req and hand it to the bus. */
static void lf_submit_data(struct lf_ctx *c, fuse_req_t freq, enum vdb_req_type type,
                           uint64_t off, uint64_t len, uint32_t flags, void *data)
{
  c->freq = freq;
  c->req.type = type;
  c->req.flags = flags;
  c->req.offset = off;
  c->req.len = len;
  c->req.buf = data;
  c->req.done = lf_req_done;
  c->req.opaque = c;
  vdb_dbg(VDB_DBG_FUSE, "%s: fuse req type %d off %llu len %llu", c->lf->d->name,
          (int)type, (unsigned long long)off, (unsigned long long)len);
  vdb_disk_submit(c->lf->d, &c->req);
}

static void lf_submit(struct lf_ctx *c, fuse_req_t freq, enum vdb_req_type type,
                      uint64_t off, uint64_t len, uint32_t flags)
{
  lf_submit_data(c, freq, type, off, len, flags,
                 (type == VDB_REQ_READ || type == VDB_REQ_WRITE) ? c->buf : NULL);
}

static void lf_fill_stat(const struct loop_fe *lf, struct stat *st)
{
  const struct vdb_disk *d = lf->d;

  memset(st, 0, sizeof *st);
  st->st_ino = FUSE_ROOT_ID;
  st->st_mode = S_IFREG | (d->readonly ? 0400 : 0600);
  st->st_nlink = 1;
  st->st_size = (off_t)d->size;
  st->st_blksize = d->block_size;
  st->st_blocks = (blkcnt_t)((d->size + 511) / 512);
  st->st_atim = st->st_mtim = st->st_ctim = lf->born;
}

static void lf_op_init(void *userdata, struct fuse_conn_info *conn)
{
  conn->max_write = LF_MAX_IO;
  conn->max_read = LF_MAX_IO; /* must equal the max_read mount option */
  if (conn->capable & FUSE_CAP_ASYNC_READ)
    conn->want |= FUSE_CAP_ASYNC_READ;
  if (conn->capable & FUSE_CAP_ASYNC_DIO)
    conn->want |= FUSE_CAP_ASYNC_DIO;
  /* Data stays in memory buffers (no splice), and the kernel keeps no page
   * cache of its own that could go stale behind the NBD export's back. */
  conn->want &= ~(unsigned)(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                            FUSE_CAP_SPLICE_MOVE | FUSE_CAP_WRITEBACK_CACHE);
  conn->max_background = 128;
  conn->congestion_threshold = 96;
}

static void lf_op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
  fuse_reply_err(req, ENOENT);
}

static void lf_op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct loop_fe *lf = fuse_req_userdata(req);
  struct stat st;

  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  lf_fill_stat(lf, &st);
  fuse_reply_attr(req, &st, LF_ATTR_TIMEOUT);
}

/* Only no-op attribute changes are accepted: the size is the disk's. */
static void lf_op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                          struct fuse_file_info *fi)
{
  struct loop_fe *lf = fuse_req_userdata(req);
  struct stat st;

  lf_fill_stat(lf, &st);
  if ((to_set & FUSE_SET_ATTR_SIZE) && attr->st_size != st.st_size) {
    fuse_reply_err(req, EPERM);
    return;
  }
  fuse_reply_attr(req, &st, LF_ATTR_TIMEOUT);
}

static void lf_op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct loop_fe *lf = fuse_req_userdata(req);

  if ((fi->flags & O_ACCMODE) != O_RDONLY && lf->d->readonly) {
    fuse_reply_err(req, EROFS);
    return;
  }
  fi->direct_io = 1;
  fi->keep_cache = 0;
  fi->nonseekable = 0;
  fuse_reply_open(req, fi);
}

static void lf_op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
  struct loop_fe *lf = fuse_req_userdata(req);
  uint64_t disk_size = lf->d->size;
  struct lf_ctx *c;

  if (off < 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  if ((uint64_t)off >= disk_size || size == 0) {
    fuse_reply_buf(req, NULL, 0);
    return;
  }
  if (size > disk_size - (uint64_t)off)
    size = disk_size - (uint64_t)off;
  if (size > LF_MAX_IO)
    size = LF_MAX_IO;
  c = lf_ctx_get(lf, size);
  if (!c) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  /* The reply (a writev to /dev/fuse) may copy straight from the backend's
   * memory: the disk outlives every request of its frontend. */
  lf_submit(c, req, VDB_REQ_READ, (uint64_t)off, size, VDB_REQ_MAP);
}

/* A large write whose data sits in the receive buffer: that buffer becomes
 * the request's and the context's pool buffer (as large) receives next, so
 * the data is not copied on the way to the backend.  Returns the context
 * that now owns the receive buffer, or NULL (copy the data instead). */
static struct lf_ctx *lf_take_receive_buf(struct loop_fe *lf, const struct fuse_bufvec *bufv,
                                          size_t len)
{
  const uint8_t *data = bufv->buf[0].mem, *rb = lf->fbuf.mem;
  struct lf_ctx *c;
  void *buf;
  size_t cap;

  if (len < LF_SWAP_MIN || bufv->count != 1 || (bufv->buf[0].flags & FUSE_BUF_IS_FD) || !rb)
    return NULL;
  if (!lf->fbuf_cap)
    lf->fbuf_cap = malloc_usable_size(lf->fbuf.mem);   /* libfuse's own allocation */
  if (data < rb || data + len > rb + lf->fbuf_cap || !(c = lf_ctx_get(lf, lf->fbuf_cap)))
    return NULL;
  buf = c->buf;
  cap = c->cap;
  c->buf = lf->fbuf.mem;
  c->cap = lf->fbuf_cap;
  lf->fbuf.mem = buf;
  lf->fbuf_cap = cap;
  return c;
}

static void lf_op_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv,
                            off_t off, struct fuse_file_info *fi)
{
  struct loop_fe *lf = fuse_req_userdata(req);
  size_t len = fuse_buf_size(bufv);
  struct fuse_bufvec dst = FUSE_BUFVEC_INIT(len);
  uint32_t flags = (fi && (fi->flags & (O_SYNC | O_DSYNC))) ? VDB_REQ_FUA : 0;
  struct lf_ctx *c;
  ssize_t n;

  if (off < 0 || len > LF_MAX_IO) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  if ((c = lf_take_receive_buf(lf, bufv, len))) {
    lf_submit_data(c, req, VDB_REQ_WRITE, (uint64_t)off, len, flags, bufv->buf[0].mem);
    return;
  }
  c = lf_ctx_get(lf, len);
  if (!c) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  dst.buf[0].mem = c->buf;
  n = fuse_buf_copy(&dst, bufv, 0);
  if (n < 0 || (size_t)n != len) {
    fuse_reply_err(req, n < 0 ? (int)-n : EIO);
    lf_ctx_put(c);
    return;
  }
  lf_submit(c, req, VDB_REQ_WRITE, (uint64_t)off, len, flags);
}

static void lf_op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                        struct fuse_file_info *fi)
{
  struct loop_fe *lf = fuse_req_userdata(req);
  struct lf_ctx *c = lf_ctx_get(lf, 0);

  if (!c) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  lf_submit(c, req, VDB_REQ_FLUSH, 0, 0, 0);
}

/* PUNCH_HOLE is a discard (TRIM), ZERO_RANGE a write-zeroes that keeps the
 * blocks allocated; plain allocation has nothing to do. */
static void lf_op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
                            off_t len, struct fuse_file_info *fi)
{
  struct loop_fe *lf = fuse_req_userdata(req);
  int what = mode & ~FALLOC_FL_KEEP_SIZE;
  enum vdb_req_type type;
  uint32_t flags = 0;
  struct lf_ctx *c;

  if (off < 0 || len <= 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  if (what == FALLOC_FL_PUNCH_HOLE && (mode & FALLOC_FL_KEEP_SIZE)) {
    type = VDB_REQ_TRIM;
  } else if (what == FALLOC_FL_ZERO_RANGE) {
    type = VDB_REQ_WRITE_ZEROES;
    flags = VDB_REQ_NO_HOLE;
  } else if (what == 0) {
    uint64_t end = (uint64_t)off + (uint64_t)len;
    fuse_reply_err(req, end <= lf->d->size ? 0 : (lf->d->readonly ? EROFS : ENOSPC));
    return;
  } else {
    fuse_reply_err(req, EOPNOTSUPP);
    return;
  }
  c = lf_ctx_get(lf, 0);
  if (!c) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  lf_submit(c, req, type, (uint64_t)off, (uint64_t)len, flags);
}

static const struct fuse_lowlevel_ops lf_ops = {
  .init = lf_op_init,
  .lookup = lf_op_lookup,
  .getattr = lf_op_getattr,
  .setattr = lf_op_setattr,
  .open = lf_op_open,
  .read = lf_op_read,
  .write_buf = lf_op_write_buf,
  .fsync = lf_op_fsync,
  .fallocate = lf_op_fallocate,
};

/* ---- serving the session on a worker loop ---- */

/* The FUSE descriptor is readable: receive and dispatch a batch of
 * requests.  On the worker's thread.  When the connection ends (unmounted
 * or aborted), stop watching so the level-triggered error does not spin. */
static void lf_on_readable(struct vdb_watch *w, uint32_t revents)
{
  struct loop_fe *lf = w->arg;

  for (int i = 0; i < LF_RECV_BATCH; i++) {
    int r = fuse_session_receive_buf(lf->se, &lf->fbuf);

    if (r == -EAGAIN)
      return;
    if (r == -EINTR)
      continue;
    if (r <= 0) {
      vdb_dbg(VDB_DBG_FUSE, "%s: FUSE connection ended (%d)", lf->d->name, r);
      vdb_loop_unwatch(lf->loop, &lf->w);
      lf->watched = false;
      return;
    }
    fuse_session_process_buf(lf->se, &lf->fbuf);
  }
}

static void lf_watch_on_loop(struct loop_fe *lf)
{
  /* This thread now writes back pages for a block device: keep it out of
   * reclaim recursion (needs CAP_SYS_RESOURCE; best effort). */
  prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
  lf->w.fd = fuse_session_fd(lf->se);
  lf->w.events = EPOLLIN;
  lf->w.cb = lf_on_readable;
  lf->w.arg = lf;
  lf->watch_err = vdb_loop_watch(lf->loop, &lf->w);
  lf->watched = lf->watch_err == 0;
}

static void lf_unwatch_on_loop(struct loop_fe *lf)
{
  if (lf->watched)
    vdb_loop_unwatch(lf->loop, &lf->w);
  lf->watched = false;
}

struct lf_call {
  struct loop_fe *lf;
  void (*fn)(struct loop_fe *lf);
};

static void lf_call_signal(void *arg)
{
  struct loop_fe *lf = arg;

  pthread_mutex_lock(&lf->lock);
  lf->call_done = true;
  pthread_cond_broadcast(&lf->cond);
  pthread_mutex_unlock(&lf->lock);
}

/* Runs fn, then signals the caller from a second posted call: the loop may
 * still hold an epoll event for the watch fn removed in its current batch,
 * and the caller must not free the watch before that batch is over.  A
 * call posted now runs at the next wake-up, after the batch. */
static void lf_call_trampoline(void *arg)
{
  struct lf_call *call = arg;
  struct loop_fe *lf = call->lf;

  call->fn(lf);
  if (vdb_loop_post(lf->loop, lf_call_signal, lf) < 0)
    lf_call_signal(lf);
}

/* Run fn(lf) on lf->loop's thread and wait for it (and for the loop's
 * current batch of events to be over).  Control thread.  0 or -ENOMEM. */
static int lf_call_on_loop(struct loop_fe *lf, void (*fn)(struct loop_fe *lf))
{
  struct lf_call call = { lf, fn };
  int r;

  lf->call_done = false;
  r = vdb_loop_post(lf->loop, lf_call_trampoline, &call);
  if (r < 0)
    return r;
  pthread_mutex_lock(&lf->lock);
  while (!lf->call_done)
    pthread_cond_wait(&lf->cond, &lf->lock);
  pthread_mutex_unlock(&lf->lock);
  return 0;
}

/* ---- attach ---- */

/* Create <run_dir>/disks/<name> (an empty regular file), removing a stale
 * one first.  0 or -errno with an error message. */
static int lf_make_mountpoint(struct loop_fe *lf)
{
  char dir[PATH_MAX];
  int fd;

  snprintf(dir, sizeof dir, "%s/disks", vdb_bus_settings.run_dir);
  if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
    int e = errno;
    vdb_set_error("cannot create %s: %s", dir, strerror(e));
    return -e;
  }
  if ((size_t)snprintf(lf->path, sizeof lf->path, "%s/%s", dir, lf->d->name) >= sizeof lf->path) {
    vdb_set_error("mount point path for disk '%s' is too long", lf->d->name);
    return -ENAMETOOLONG;
  }
  umount2(lf->path, MNT_DETACH | UMOUNT_NOFOLLOW); /* a stale mount, if any */
  unlink(lf->path);
  fd = open(lf->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    int e = errno;
    vdb_set_error("cannot create mount point %s: %s", lf->path, strerror(e));
    return -e;
  }
  close(fd);
  lf->file_created = true;
  return 0;
}

/* Create the FUSE session, mount it on lf->path and start serving it on a
 * worker loop.  0 or -errno with an error message. */
static int lf_session_start(struct loop_fe *lf)
{
  char opts[256];
  char *argv[] = { (char *)"vdbusd", (char *)"-o", opts, NULL };
  struct fuse_args args = FUSE_ARGS_INIT(3, argv);
  int fd, fl, r;

  snprintf(opts, sizeof opts, "fsname=" LF_NAME_PREFIX "%s,subtype=vdbus,max_read=%u",
           lf->d->name, LF_MAX_IO);
  lf->se = fuse_session_new(&args, &lf_ops, sizeof lf_ops, lf);
  fuse_opt_free_args(&args);
  if (!lf->se) {
    vdb_set_error("cannot create a FUSE session for disk '%s'", lf->d->name);
    return -ENOMEM;
  }
  if (fuse_session_mount(lf->se, lf->path) != 0) {
    vdb_set_error("cannot mount FUSE on %s (see the daemon's log)", lf->path);
    return -EIO;
  }
  lf->mounted = true;
  fd = fuse_session_fd(lf->se);
  fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    r = -errno;
    vdb_set_error("FUSE descriptor: %s", strerror(-r));
    return r;
  }
  lf->loop = vdb_worker_pick();
  if (!lf->loop) {
    vdb_set_error("no worker loop to serve FUSE for disk '%s'", lf->d->name);
    return -ENODEV;
  }
  r = lf_call_on_loop(lf, lf_watch_on_loop);
  if (r == 0)
    r = lf->watch_err;
  if (r < 0) {
    vdb_set_error("cannot watch the FUSE descriptor of disk '%s': %s", lf->d->name,
                  strerror(-r));
    return r;
  }
  return 0;
}

/* Check the file through the mount: the session answers and the size is
 * right (this also loads the size the loop driver will read). */
static int lf_check_file(struct loop_fe *lf)
{
  struct stat st;

  if (stat(lf->path, &st) < 0) {
    int e = errno;
    vdb_set_error("stat %s: %s", lf->path, strerror(e));
    return -e;
  }
  if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != lf->d->size) {
    vdb_set_error("%s: unexpected FUSE file (mode %o, size %lld)", lf->path,
                  (unsigned)st.st_mode, (long long)st.st_size);
    return -EIO;
  }
  return 0;
}

/* Open the FUSE file for the loop driver, O_DIRECT if possible. */
static int lf_open_backing(struct loop_fe *lf)
{
  int acc = lf->d->readonly ? O_RDONLY : O_RDWR;
  int fd = open(lf->path, acc | O_DIRECT | O_CLOEXEC);

  if (fd < 0 && errno == EINVAL)
    fd = open(lf->path, acc | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    vdb_set_error("open %s: %s", lf->path, strerror(e));
    return -e;
  }
  return fd;
}

/* LOOP_CONFIGURE loop_fd on file_fd, with direct I/O if the kernel takes
 * it.  0 or -errno. */
static int lf_loop_configure(struct loop_fe *lf, int file_fd)
{
  struct loop_config cfg;
  int r;

  memset(&cfg, 0, sizeof cfg);
  cfg.fd = (uint32_t)file_fd;
  cfg.block_size = lf->d->block_size;
  cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
  if (lf->d->readonly)
    cfg.info.lo_flags |= LO_FLAGS_READ_ONLY;
  /* "vdbus:<name>", the name truncated to fit the field (64 bytes). */
  snprintf((char *)cfg.info.lo_file_name, sizeof cfg.info.lo_file_name,
           LF_NAME_PREFIX "%.*s", (int)(LO_NAME_SIZE - sizeof LF_NAME_PREFIX), lf->d->name);
  r = ioctl(lf->loop_fd, LOOP_CONFIGURE, &cfg);
  if (r < 0 && errno == EINVAL) {
    vdb_dbg(VDB_DBG_FUSE, "%s: LOOP_CONFIGURE with direct I/O failed, retrying without",
            lf->d->name);
    cfg.info.lo_flags &= ~(uint32_t)LO_FLAGS_DIRECT_IO;
    r = ioctl(lf->loop_fd, LOOP_CONFIGURE, &cfg);
  }
  return r < 0 ? -errno : 0;
}

/* Find a free loop device and bind it to the FUSE file.  Retries when
 * another process takes the same device first.  0 or -errno with an error
 * message. */
static int lf_loop_attach(struct loop_fe *lf)
{
  int ctl, file_fd, r = -EBUSY;

  ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) {
    r = -errno;
    vdb_set_error("cannot open /dev/loop-control: %s", strerror(-r));
    return r;
  }
  file_fd = lf_open_backing(lf);
  if (file_fd < 0) {
    close(ctl);
    return file_fd;
  }
  for (int tries = 0; tries < LF_CONFIGURE_TRIES && r == -EBUSY; tries++) {
    int nr = ioctl(ctl, LOOP_CTL_GET_FREE);

    if (nr < 0) {
      r = -errno;
      vdb_set_error("no free loop device: %s", strerror(-r));
      break;
    }
    snprintf(lf->dev, sizeof lf->dev, "/dev/loop%d", nr);
    lf->loop_fd = open(lf->dev, (lf->d->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    for (int i = 0; lf->loop_fd < 0 && errno == ENOENT && i < 100; i++) {
      vdb_sleep_ms(10); /* the device node may lag behind LOOP_CTL_GET_FREE */
      lf->loop_fd = open(lf->dev, (lf->d->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    }
    if (lf->loop_fd < 0) {
      r = -errno;
      vdb_set_error("open %s: %s", lf->dev, strerror(-r));
      break;
    }
    r = lf_loop_configure(lf, file_fd);
    if (r == 0) {
      struct stat st;
      lf->loop_nr = nr;
      lf->rdev = fstat(lf->loop_fd, &st) == 0 ? st.st_rdev : makedev(7, (unsigned)nr);
      break;
    }
    close(lf->loop_fd);
    lf->loop_fd = -1;
    if (r != -EBUSY)
      vdb_set_error("cannot bind %s to %s: %s", lf->dev, lf->path, strerror(-r));
    else
      vdb_set_error("no free loop device (%s kept being taken)", lf->dev);
  }
  close(file_fd); /* the loop device holds its own reference */
  close(ctl);
  if (r < 0)
    lf->dev[0] = '\0';
  return r;
}

static void lf_detach(struct vdb_disk *d, void *priv);

/* Attach d: mount the FUSE file, serve it, bind a loop device to it.
 * Control thread; blocks until /dev/loopN exists. */
static int lf_attach(struct vdb_disk *d, void **priv, char *device, size_t devlen)
{
  struct loop_fe *lf = calloc(1, sizeof *lf);
  int r;

  if (!lf) {
    vdb_set_error("out of memory");
    return -ENOMEM;
  }
  lf->d = d;
  lf->loop_fd = -1;
  lf->loop_nr = -1;
  clock_gettime(CLOCK_REALTIME, &lf->born);
  pthread_mutex_init(&lf->lock, NULL);
  pthread_cond_init(&lf->cond, NULL);

  if ((r = lf_make_mountpoint(lf)) < 0 || (r = lf_session_start(lf)) < 0 ||
      (r = lf_check_file(lf)) < 0 || (r = lf_loop_attach(lf)) < 0) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", vdb_get_error());
    lf_detach(d, lf);
    vdb_set_error("%s", msg);
    return r;
  }
  snprintf(device, devlen, "%s", lf->dev);
  vdb_info("%s: attached as %s (FUSE file %s)", d->name, lf->dev, lf->path);
  *priv = lf;
  return 0;
}

/* ---- busy ---- */

/* 1 if /dev/loopN is mounted, claimed or held open by another process. */
static int lf_busy(struct vdb_disk *d, void *priv)
{
  struct loop_fe *lf = priv;

  if (!lf || lf->loop_nr < 0)
    return 0;
  return vdb_blkdev_busy(lf->dev, lf->rdev);
}

/* ---- detach ---- */

/* After the last close, wait (bounded) until the loop driver has dropped
 * the FUSE file, so the session can go away cleanly.  A device still held
 * (a forced unplug of a mounted disk) is not waited for. */
static void lf_wait_released(struct loop_fe *lf)
{
  char path[96];

  snprintf(path, sizeof path, "/sys/block/loop%d/loop/backing_file", lf->loop_nr);
  if (vdb_blkdev_wait_gone(path, LF_RELEASE_WAIT_MS, 200, lf->dev, lf->rdev) == 0)
    return;
  vdb_warn("%s: %s is still in use; its FUSE file is detached lazily", lf->d->name,
           lf->dev);
}

/* Detach: release the loop device, stop serving, unmount and remove the
 * FUSE file.  Control thread.  Copes with any partial state left by
 * lf_attach; frees priv. */
static void lf_detach(struct vdb_disk *d, void *priv)
{
  struct loop_fe *lf = priv;

  if (!lf)
    return;
  if (lf->loop_fd >= 0) {
    /* With AUTOCLEAR the device goes away at its last close. */
    if (ioctl(lf->loop_fd, LOOP_CLR_FD, 0) < 0 && errno != ENXIO)
      vdb_warn("%s: LOOP_CLR_FD %s: %s", d->name, lf->dev, strerror(errno));
    close(lf->loop_fd);
    lf->loop_fd = -1;
    if (lf->loop_nr >= 0)
      lf_wait_released(lf);
  }
  if (lf->watched && lf_call_on_loop(lf, lf_unwatch_on_loop) < 0)
    vdb_err("%s: cannot stop serving FUSE on its worker loop", d->name);
  pthread_mutex_lock(&lf->lock);
  while (lf->inflight > 0)
    pthread_cond_wait(&lf->cond, &lf->lock);
  pthread_mutex_unlock(&lf->lock);
  if (lf->se) {
    if (lf->mounted) {
      /* Lazily: a forced unplug may leave the file referenced by a loop
       * device that a mounted filesystem still holds.  libfuse unmounts
       * with MNT_DETACH as root; make sure of it (EINVAL: already gone). */
      fuse_session_unmount(lf->se);
      if (umount2(lf->path, MNT_DETACH | UMOUNT_NOFOLLOW) < 0 && errno != EINVAL &&
          errno != ENOENT)
        vdb_warn("%s: unmount %s: %s", d->name, lf->path, strerror(errno));
      lf->mounted = false;
    }
    fuse_session_destroy(lf->se);
    lf->se = NULL;
  }
  if (lf->file_created && unlink(lf->path) < 0 && errno != ENOENT)
    vdb_warn("%s: remove %s: %s", d->name, lf->path, strerror(errno));
  free(lf->fbuf.mem);
  lf_pool_free(lf);
  pthread_mutex_destroy(&lf->lock);
  pthread_cond_destroy(&lf->cond);
  if (lf->loop_nr >= 0)
    vdb_info("%s: detached %s", d->name, lf->dev);
  free(lf);
}

/* The disk's size changed: drop the kernel's cached attributes of the FUSE
 * file, stat it (a fresh getattr, served by the worker loop, updates the
 * inode's size) and have the loop device re-read its capacity.  Not on
 * the worker loop serving lf->se. */
static void lf_resize(struct vdb_disk *d, void *priv)
{
  struct loop_fe *lf = priv;
  struct stat st;
  int r;

  if (!lf || !lf->se || lf->loop_fd < 0)
    return;
  r = fuse_lowlevel_notify_inval_inode(lf->se, FUSE_ROOT_ID, -1, 0);
  if (r < 0 && r != -ENOENT)
    vdb_warn("%s: invalidate the FUSE file's attributes: %s", d->name, strerror(-r));
  if (stat(lf->path, &st) < 0) {
    vdb_warn("%s: stat %s: %s", d->name, lf->path, strerror(errno));
    return;
  }
  if (ioctl(lf->loop_fd, LOOP_SET_CAPACITY, 0) < 0)
    vdb_warn("%s: LOOP_SET_CAPACITY on %s: %s", d->name, lf->dev, strerror(errno));
  else
    vdb_info("%s: %s now has %lld bytes", d->name, lf->dev, (long long)st.st_size);
}

/* ---- probe ---- */

static int lf_probe(void)
{
  int fd;

  if (geteuid() != 0) {
    vdb_set_error("the loop frontend needs root (to mount FUSE and configure loop devices)");
    return -EPERM;
  }
  fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    vdb_set_error("cannot open /dev/fuse: %s (is the fuse module loaded?)", strerror(e));
    return e == EACCES || e == EPERM ? -EPERM : -ENODEV;
  }
  close(fd);
  if (access("/dev/loop-control", F_OK) < 0) {
    vdb_set_error("/dev/loop-control is missing (is the loop module loaded?)");
    return -ENODEV;
  }
  return 0;
}

/* ---- cleanup after a crash ---- */

/* Release loop devices bound to a file under disks_dir ("…/disks/"). */
static void lf_cleanup_loops(const char *disks_dir)
{
  DIR *dir = opendir("/sys/block");
  struct dirent *e;

  if (!dir)
    return;
  while ((e = readdir(dir))) {
    char path[PATH_MAX], backing[PATH_MAX], dev[sizeof e->d_name + 8];
    struct loop_info64 info;
    int fd;

    if (!lf_has_prefix(e->d_name, "loop"))
      continue;
    snprintf(path, sizeof path, "/sys/block/%s/loop/backing_file", e->d_name);
    if (vdb_sysfs_read(path, backing, sizeof backing) < 0 ||
        !lf_has_prefix(backing, disks_dir))
      continue;
    snprintf(dev, sizeof dev, "/dev/%s", e->d_name);
    fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      vdb_warn("stale %s (%s): open: %s", dev, backing, strerror(errno));
      continue;
    }
    /* Only devices we made: their lo_file_name carries our prefix. */
    if (ioctl(fd, LOOP_GET_STATUS64, &info) == 0 &&
        !lf_has_prefix((const char *)info.lo_file_name, LF_NAME_PREFIX)) {
      close(fd);
      continue;
    }
    if (ioctl(fd, LOOP_CLR_FD, 0) < 0 && errno != ENXIO)
      vdb_warn("stale %s (%s): LOOP_CLR_FD: %s", dev, backing, strerror(errno));
    else
      vdb_info("released stale loop device %s (%s); it goes away at its last close",
               dev, backing);
    close(fd);
  }
  closedir(dir);
}

static void lf_cleanup_files(const char *disks_dir)
{
  DIR *dir = opendir(disks_dir);
  struct dirent *e;

  if (!dir)
    return;
  while ((e = readdir(dir))) {
    if (e->d_name[0] == '.')
      continue;
    if (unlinkat(dirfd(dir), e->d_name, 0) == 0)
      vdb_info("removed stale mount point %s%s", disks_dir, e->d_name);
  }
  closedir(dir);
}

/* At daemon start: remove loop devices, FUSE mounts and mount-point files
 * left under <run_dir>/disks/ by a daemon that died.  Control thread. */
static void lf_cleanup_stale(const char *run_dir)
{
  char disks_dir[PATH_MAX];

  if (geteuid() != 0)
    return;
  snprintf(disks_dir, sizeof disks_dir, "%s/disks/", run_dir);
  lf_cleanup_loops(disks_dir);
  for (int i = 0; i < 8 && vdb_unmount_under(disks_dir) > 0; i++)
    ;
  lf_cleanup_files(disks_dir);
}

const struct vdb_frontend_ops vdb_frontend_loop = {
  .name = "loop",
  .probe = lf_probe,
  .attach = lf_attach,
  .busy = lf_busy,
  .detach = lf_detach,
  .cleanup_stale = lf_cleanup_stale,
  .resize = lf_resize,
};
