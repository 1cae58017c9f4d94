/* vdbus — backend "rbd": a Ceph RBD image through librbd/librados.
 *
 * Reads, writes, flushes, trims and write-zeroes are librbd aio calls whose
 * completion callbacks (on librbd's threads) complete the vdb_req directly:
 * no thread per request.  A FUA write is the write followed by an aio
 * flush, started from the write's completion.  librbd's client cache is off
 * unless cache=1 (so an acknowledged write is on the OSDs; with the cache a
 * flush makes it so).
 *
 * One thread per disk (rbd_worker) does what may block: block status
 * (rbd_diff_iterate2, whole objects when the fast-diff object map is on)
 * and noticing size changes made elsewhere (rbd_update_watch wakes it; it
 * also polls every few seconds) which it reports to the bus with
 * vdb_backend_set_size().
 *
 * Failure: rados_osd_op_timeout, rados_mon_op_timeout and
 * client_mount_timeout are set from timeout=SECONDS (default 30; 0 = wait
 * for ever), so an unreachable cluster fails requests with EIO after that
 * long, and a plug fails after it.
 *
 * Snapshots: the snapshot op creates an RBD snapshot (cluster-side, cheap)
 * and returns the parameters that plug it read-only (pool/image@snap). */
#include <errno.h>
#include <stdatomic.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <vdbus/backend.h>
#include "common/log.h"

#define RBD_DEFAULT_TIMEOUT 30
#define RBD_POLL_SECONDS 3
#define RBD_NAME_MAX 256

struct rbd_disk {
  rados_t cluster;
  rados_ioctx_t io;
  rbd_image_t image;
  bool connected;            /* rados_connect succeeded */
  bool readonly;
  bool whole_object;         /* fast-diff object map: diff by whole objects */
  bool cache;                /* librbd client cache on */
  uint64_t size;             /* last size reported (worker thread only) */
  uint64_t watch;            /* rbd_update_watch handle */
  bool watching;
  _Atomic bool failing;      /* the last request failed (log the first of a run) */

  /* What plugs it again (for snapshots); copies of the parameters. */
  char pool[RBD_NAME_MAX], name[RBD_NAME_MAX], snap[RBD_NAME_MAX];
  char *conf, *id, *keyring, *timeout;

  /* The worker: block-status requests and size checks.  Under lock. */
  pthread_t thread;
  bool thread_started;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct vdb_req *jobs_head, **jobs_tail;
  bool size_dirty;           /* the image header changed */
  bool stop;
};

/* In req->backend_priv while librbd has the request. */
struct rbd_aio {
  struct rbd_disk *r;
  struct vdb_req *next;      /* worker queue link (block status) */
  bool fua_pending;          /* a flush follows the write */
};
_Static_assert(sizeof(struct rbd_aio) <= sizeof(((struct vdb_req *)0)->backend_priv),
               "rbd_aio must fit in backend_priv");

static struct rbd_aio *rbd_aio_of(struct vdb_req *req)
{
  return (struct rbd_aio *)req->backend_priv;
}

/* librbd/librados errors as block-device errors: an unreachable cluster
 * (timeouts, a blocklisted client, …) is a media error. */
static int rbd_errno(long r)
{
  switch (r) {
  case -ENOSPC: case -EDQUOT:
    return -ENOSPC;
  case -EROFS: case -EPERM: case -EACCES:
    return -EPERM;
  case -EINVAL: case -ENOMEM: case -EOPNOTSUPP:
    return (int)r;
  default:
    return -EIO;
  }
}

/* ---- parameters ---- */

/* Split "[rbd:]pool/image[@snap]" into r->pool, r->name, r->snap. */
static int rbd_parse_spec(struct rbd_disk *r, const char *spec)
{
  const char *s = spec, *slash, *at;

  if (strncmp(s, "rbd:", 4) == 0)
    s += 4;
  slash = strchr(s, '/');
  at = strchr(s, '@');
  if (!slash || slash == s || slash[1] == '\0' || slash[1] == '@' || strchr(slash + 1, '/') ||
      (at && (at < slash || at[1] == '\0' || strchr(at + 1, '@')))) {
    vdb_set_error("rbd backend: bad image '%s': use POOL/IMAGE or POOL/IMAGE@SNAP "
                  "(optionally prefixed rbd:)", spec);
    return -EINVAL;
  }
  if ((size_t)(slash - s) >= RBD_NAME_MAX || strlen(slash + 1) >= RBD_NAME_MAX) {
    vdb_set_error("rbd backend: image spec '%s' is too long", spec);
    return -EINVAL;
  }
  snprintf(r->pool, sizeof r->pool, "%.*s", (int)(slash - s), s);
  if (at) {
    snprintf(r->name, sizeof r->name, "%.*s", (int)(at - slash - 1), slash + 1);
    snprintf(r->snap, sizeof r->snap, "%s", at + 1);
  } else {
    snprintf(r->name, sizeof r->name, "%s", slash + 1);
  }
  return 0;
}

/* Whole seconds, 0 to a day. */
static bool rbd_timeout_ok(const char *s)
{
  char *end;
  unsigned long v;

  if (*s < '0' || *s > '9')
    return false;
  errno = 0;
  v = strtoul(s, &end, 10);
  return !*end && errno == 0 && v <= 86400;
}

static int rbd_parse_params(struct rbd_disk *r, const struct vdb_params *params)
{
  const char *image = vdb_params_get(params, "image");
  const char *snap = vdb_params_get(params, "snap");
  const char *timeout = vdb_params_get(params, "timeout");
  const char *conf = vdb_params_get(params, "conf"), *id = vdb_params_get(params, "id");
  const char *keyring = vdb_params_get(params, "keyring");
  int rc;

  if (!image || !*image) {
    vdb_set_error("rbd backend: an image is required (POOL/IMAGE[@SNAP])");
    return -EINVAL;
  }
  if ((rc = rbd_parse_spec(r, image)) < 0)
    return rc;
  if (snap && *snap) {
    if (r->snap[0] && strcmp(r->snap, snap) != 0) {
      vdb_set_error("rbd backend: two snapshots given ('%s' in the image, '%s' with --snap)",
                    r->snap, snap);
      return -EINVAL;
    }
    if (strlen(snap) >= sizeof r->snap || strchr(snap, '@') || strchr(snap, '/')) {
      vdb_set_error("rbd backend: bad snapshot name '%s'", snap);
      return -EINVAL;
    }
    snprintf(r->snap, sizeof r->snap, "%s", snap);
  }
  if (timeout && !rbd_timeout_ok(timeout)) {
    vdb_set_error("rbd backend: bad timeout '%s': whole seconds, 0 to 86400 (0 = none)", timeout);
    return -EINVAL;
  }
  if ((conf && !(r->conf = strdup(conf))) || (id && !(r->id = strdup(id))) ||
      (keyring && !(r->keyring = strdup(keyring))) || (timeout && !(r->timeout = strdup(timeout))))
    return -ENOMEM;
  r->cache = vdb_params_get_bool(params, "cache");
  return 0;
}

/* ---- connecting ---- */

static int rbd_conf_set(struct rbd_disk *r, const char *key, const char *val)
{
  int rc = rados_conf_set(r->cluster, key, val);

  if (rc < 0)
    vdb_set_error("rbd backend: cannot set %s=%s: %s", key, val, strerror(-rc));
  return rc;
}

static int rbd_configure(struct rbd_disk *r)
{
  char t[32];
  int rc;

  rc = rados_conf_read_file(r->cluster, r->conf); /* NULL: CEPH_CONF, /etc/ceph/ceph.conf, … */
  if (rc < 0) {
    if (r->conf)
      vdb_set_error("rbd backend: cannot read Ceph config %s: %s", r->conf, strerror(-rc));
    else
      vdb_set_error("rbd backend: no Ceph config found (/etc/ceph/ceph.conf or $CEPH_CONF): "
                    "give --conf FILE");
    return rc;
  }
  if (r->keyring && (rc = rbd_conf_set(r, "keyring", r->keyring)) < 0)
    return rc;
  snprintf(t, sizeof t, "%lu", r->timeout ? strtoul(r->timeout, NULL, 10)
                                         : (unsigned long)RBD_DEFAULT_TIMEOUT);
  if ((rc = rbd_conf_set(r, "rados_osd_op_timeout", t)) < 0 ||
      (rc = rbd_conf_set(r, "rados_mon_op_timeout", t)) < 0 ||
      (rc = rbd_conf_set(r, "client_mount_timeout", strcmp(t, "0") ? t : "300")) < 0 ||
      (rc = rbd_conf_set(r, "rbd_cache", r->cache ? "true" : "false")) < 0 ||
      (r->cache && (rc = rbd_conf_set(r, "rbd_cache_policy", "writeback")) < 0))
    return rc;
  return 0;
}

static int rbd_connect(struct rbd_disk *r)
{
  int rc = rados_create(&r->cluster, r->id); /* NULL id: client.admin */

  if (rc < 0) {
    r->cluster = NULL;
    vdb_set_error("rbd backend: cannot create a RADOS handle for client '%s': %s",
                  r->id ? r->id : "admin", strerror(-rc));
    return rc;
  }
  if ((rc = rbd_configure(r)) < 0)
    return rc;
  rc = rados_connect(r->cluster);
  if (rc < 0) {
    vdb_set_error("rbd backend: cannot connect to the Ceph cluster as client.%s%s%s: %s%s",
                  r->id ? r->id : "admin", r->conf ? " with " : "", r->conf ? r->conf : "",
                  strerror(-rc), rc == -ETIMEDOUT || rc == -EINTR ? " (cluster unreachable?)" :
                  rc == -EACCES || rc == -EPERM || rc == -ENOENT ? " (check --id and --keyring)" : "");
    return rc;
  }
  r->connected = true;
  rc = rados_ioctx_create(r->cluster, r->pool, &r->io);
  if (rc < 0) {
    r->io = NULL;
    vdb_set_error("rbd backend: %s pool '%s': %s", rc == -ENOENT ? "no" : "cannot open",
                  r->pool, rc == -ENOENT ? "it does not exist" : strerror(-rc));
    return rc;
  }
  return 0;
}

/* Create r->name: format 2, layering, exclusive-lock, object-map, fast-diff. */
static int rbd_create_image(struct rbd_disk *r, const struct vdb_params *params)
{
  uint64_t size, features = RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK |
                            RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF;
  rbd_image_options_t opts;
  int rc = vdb_params_get_size(params, "size", &size);

  if (r->snap[0]) {
    vdb_set_error("rbd backend: --create makes an image, not a snapshot (drop @%s/--snap)", r->snap);
    return -EINVAL;
  }
  if (rc < 0 || size == 0) {
    vdb_set_error(rc == -EINVAL ? "rbd backend: bad size '%s'" : "rbd backend: --create needs --size",
                  vdb_params_get(params, "size"));
    return -EINVAL;
  }
  rbd_image_options_create(&opts);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FORMAT, 2);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES, features);
  rc = rbd_create4(r->io, r->name, size, opts);
  rbd_image_options_destroy(opts);
  if (rc == -EEXIST)
    vdb_set_error("rbd backend: image %s/%s already exists (--create never overwrites; "
                  "drop --create to use it)", r->pool, r->name);
  else if (rc < 0)
    vdb_set_error("rbd backend: cannot create image %s/%s: %s", r->pool, r->name, strerror(-rc));
  return rc;
}

static int rbd_open_image(struct rbd_disk *r)
{
  int rc;

  if (r->readonly)
    rc = rbd_open_read_only(r->io, r->name, &r->image, r->snap[0] ? r->snap : NULL);
  else
    rc = rbd_open(r->io, r->name, &r->image, NULL);
  if (rc < 0) {
    r->image = NULL;
    if (rc == -ENOENT && r->snap[0])
      vdb_set_error("rbd backend: no image %s/%s with a snapshot '%s'", r->pool, r->name, r->snap);
    else if (rc == -ENOENT)
      vdb_set_error("rbd backend: no image '%s' in pool '%s' (--create --size SIZE makes one)",
                    r->name, r->pool);
    else
      vdb_set_error("rbd backend: cannot open image %s/%s: %s", r->pool, r->name, strerror(-rc));
  }
  return rc;
}

/* ---- the worker thread: block status, size changes ---- */

static void rbd_block_status_run(struct rbd_disk *r, struct vdb_req *req);

static void rbd_check_size(struct rbd_disk *r)
{
  uint64_t size;

  if (rbd_get_size(r->image, &size) == 0 && size != r->size && vdb_backend_set_size(r, size) == 0)
    r->size = size; /* else not registered yet: the next poll tries again */
}

static void *rbd_worker(void *arg)
{
  struct rbd_disk *r = arg;

  pthread_mutex_lock(&r->lock);
  while (!r->stop) {
    struct vdb_req *req = r->jobs_head;
    if (req) {
      r->jobs_head = rbd_aio_of(req)->next;
      if (!r->jobs_head)
        r->jobs_tail = &r->jobs_head;
      pthread_mutex_unlock(&r->lock);
      rbd_block_status_run(r, req);
      pthread_mutex_lock(&r->lock);
      continue;
    }
    if (r->size_dirty) {
      r->size_dirty = false;
      pthread_mutex_unlock(&r->lock);
      rbd_check_size(r);
      pthread_mutex_lock(&r->lock);
      continue;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += RBD_POLL_SECONDS;
    if (pthread_cond_timedwait(&r->cond, &r->lock, &ts) == ETIMEDOUT)
      r->size_dirty = true;
  }
  pthread_mutex_unlock(&r->lock);
  return NULL;
}

/* librbd's thread: the image header changed (resize, snapshot, …). */
static void rbd_update_cb(void *arg)
{
  struct rbd_disk *r = arg;

  pthread_mutex_lock(&r->lock);
  r->size_dirty = true;
  pthread_cond_signal(&r->cond);
  pthread_mutex_unlock(&r->lock);
}

static int rbd_start_worker(struct rbd_disk *r)
{
  int rc = pthread_create(&r->thread, NULL, rbd_worker, r);

  if (rc) {
    vdb_set_error("rbd backend: cannot start a thread: %s", strerror(rc));
    return -rc;
  }
  r->thread_started = true;
  if (!r->snap[0] && rbd_update_watch(r->image, &r->watch, rbd_update_cb, r) == 0)
    r->watching = true; /* else the worker's polling notices resizes */
  return 0;
}

static void rbd_free(struct rbd_disk *r)
{
  if (r->thread_started) {
    pthread_mutex_lock(&r->lock);
    r->stop = true;
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->lock);
    pthread_join(r->thread, NULL);
  }
  if (r->watching)
    rbd_update_unwatch(r->image, r->watch);
  if (r->image)
    rbd_close(r->image);
  if (r->io)
    rados_ioctx_destroy(r->io);
  if (r->cluster)
    rados_shutdown(r->cluster);
  pthread_mutex_destroy(&r->lock);
  pthread_cond_destroy(&r->cond);
  free(r->conf);
  free(r->id);
  free(r->keyring);
  free(r->timeout);
  free(r);
}

static void rbd_fill_info(struct rbd_disk *r, struct vdb_backend_info *info)
{
  uint64_t features = 0, flags = 0;

  info->size = r->size;
  info->readonly = r->readonly;
  info->volatile_cache = r->cache;
  rbd_get_features(r->image, &features);
  rbd_get_flags(r->image, &flags);
  r->whole_object = (features & RBD_FEATURE_FAST_DIFF) && !(flags & RBD_FLAG_FAST_DIFF_INVALID);
  snprintf(info->description, sizeof info->description, "rbd %.40s/%.60s%s%.20s", r->pool,
           r->name, r->snap[0] ? "@" : "", r->snap);
}

static int rbd_open_disk(const struct vdb_params *params, void **handle,
                         struct vdb_backend_info *info)
{
  struct rbd_disk *r = calloc(1, sizeof *r);
  int rc;

  if (!r)
    return -ENOMEM;
  pthread_mutex_init(&r->lock, NULL);
  pthread_cond_init(&r->cond, NULL);
  r->jobs_tail = &r->jobs_head;
  rc = rbd_parse_params(r, params);
  if (rc < 0)
    goto err;
  r->readonly = r->snap[0] || vdb_params_get_bool(params, "readonly");
  if ((rc = rbd_connect(r)) < 0)
    goto err;
  if (vdb_params_get_bool(params, "create") && (rc = rbd_create_image(r, params)) < 0)
    goto err;
  if ((rc = rbd_open_image(r)) < 0)
    goto err;
  if ((rc = rbd_get_size(r->image, &r->size)) < 0) {
    vdb_set_error("rbd backend: cannot get the size of %s/%s: %s", r->pool, r->name, strerror(-rc));
    goto err;
  }
  rbd_fill_info(r, info);
  if ((rc = rbd_start_worker(r)) < 0)
    goto err;
  *handle = r;
  return 0;

err:
  rbd_free(r);
  return rc;
}

static void rbd_close_disk(void *handle)
{
  struct rbd_disk *r = handle;

  if (!r->readonly && !r->cache)
    rbd_flush(r->image);
  rbd_free(r);
}

/* ---- the data path ---- */

static void rbd_aio_done(rbd_completion_t c, void *arg);

/* Start an aio operation of req's type (flush for the FUA tail). */
static int rbd_aio_start(struct rbd_disk *r, struct vdb_req *req, bool flush)
{
  rbd_completion_t c;
  int rc = rbd_aio_create_completion(req, rbd_aio_done, &c);

  if (rc < 0)
    return rc;
  if (flush) {
    rc = rbd_aio_flush(r->image, c);
  } else {
    switch (req->type) {
    case VDB_REQ_READ:
      rc = rbd_aio_read(r->image, req->offset, req->len, req->buf, c);
      break;
    case VDB_REQ_WRITE:
      rc = rbd_aio_write(r->image, req->offset, req->len, req->buf, c);
      break;
    case VDB_REQ_TRIM:
      rc = rbd_aio_discard(r->image, req->offset, req->len, c);
      break;
    case VDB_REQ_WRITE_ZEROES:
      rc = rbd_aio_write_zeroes(r->image, req->offset, req->len, c,
                                (req->flags & VDB_REQ_NO_HOLE) ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0,
                                0);
      break;
    default:
      rc = rbd_aio_flush(r->image, c);
      break;
    }
  }
  if (rc < 0)
    rbd_aio_release(c);
  return rc;
}

/* Log the first failure of a run and the recovery after it, with librbd's
 * own error (requests fail with EIO, which says less). */
static void rbd_note_result(struct rbd_disk *r, const struct vdb_req *req, int err)
{
  if (err < 0 && !atomic_exchange(&r->failing, true))
    vdb_warn("rbd %s/%s: request type %d at %llu failed: %s (more may follow)", r->pool,
             r->name, (int)req->type, (unsigned long long)req->offset, strerror(-err));
  else if (err == 0 && atomic_load_explicit(&r->failing, memory_order_relaxed) &&
           atomic_exchange(&r->failing, false))
    vdb_info("rbd %s/%s: requests succeed again", r->pool, r->name);
}

/* librbd's completion thread. */
static void rbd_aio_done(rbd_completion_t c, void *arg)
{
  struct vdb_req *req = arg;
  struct rbd_aio *a = rbd_aio_of(req);
  ssize_t ret = rbd_aio_get_return_value(c);
  int rc;

  rbd_aio_release(c);
  if (ret < 0) {
    rbd_note_result(a->r, req, (int)ret);
    vdb_req_complete(req, rbd_errno((long)ret));
    return;
  }
  rbd_note_result(a->r, req, 0);
  if (req->type == VDB_REQ_READ && (uint64_t)ret < req->len) /* shrunk under us */
    memset((uint8_t *)req->buf + ret, 0, req->len - (uint64_t)ret);
  if (a->fua_pending) {
    a->fua_pending = false;
    rc = rbd_aio_start(a->r, req, true);
    if (rc < 0)
      vdb_req_complete(req, rbd_errno(rc));
    return;
  }
  vdb_req_complete(req, 0);
}

/* The callback of every aio request type. */
static void rbd_submit(void *handle, struct vdb_req *req)
{
  struct rbd_disk *r = handle;
  struct rbd_aio *a = rbd_aio_of(req);
  int rc;

  a->r = r;
  a->next = NULL;
  a->fua_pending = (req->flags & VDB_REQ_FUA) && req->type != VDB_REQ_FLUSH && r->cache;
  rc = rbd_aio_start(r, req, false);
  if (rc < 0)
    vdb_req_complete(req, rbd_errno(rc));
}

/* ---- block status (worker thread) ---- */

struct rbd_bs {
  struct vdb_req *req;
  uint64_t pos, end;         /* described up to pos */
  bool full;
};

static void rbd_bs_add(struct rbd_bs *b, uint64_t len, uint32_t flags)
{
  struct vdb_req *req = b->req;
  struct vdb_extent *e = &req->extents[req->nr_extents];

  if (len == 0 || b->full)
    return;
  if (req->nr_extents > 0 && e[-1].flags == flags) {
    e[-1].length += len;
  } else if (req->nr_extents == req->max_extents ||
             (req->nr_extents == 1 && (req->flags & VDB_REQ_ONE))) {
    b->full = true;
    return;
  } else {
    e->length = len;
    e->flags = flags;
    req->nr_extents++;
  }
  b->pos += len;
}

/* rbd_diff_iterate2's callback: [off, off + len) is allocated (exists) or
 * known to be zero (!exists); what lies between is unallocated. */
static int rbd_bs_cb(uint64_t off, size_t len, int exists, void *arg)
{
  struct rbd_bs *b = arg;
  uint64_t end = off + len;

  if (end <= b->pos)
    return 0;
  if (off < b->pos)
    off = b->pos;
  if (off >= b->end)
    return -ECANCELED;
  if (end > b->end)
    end = b->end;
  rbd_bs_add(b, off - b->pos, VDB_EXTENT_HOLE | VDB_EXTENT_ZERO);
  rbd_bs_add(b, end - off, exists ? 0 : VDB_EXTENT_HOLE | VDB_EXTENT_ZERO);
  return b->full ? -ECANCELED : 0;
}

static void rbd_block_status_run(struct rbd_disk *r, struct vdb_req *req)
{
  struct rbd_bs b = { req, req->offset, req->offset + req->len, false };
  int rc;

  /* Writes acknowledged from the client cache must count as data: write
   * them out first (librbd's diff does too; do not depend on it). */
  if (r->cache && (rc = rbd_flush(r->image)) < 0) {
    vdb_req_complete(req, rbd_errno(rc));
    return;
  }
  rc = rbd_diff_iterate2(r->image, NULL, req->offset, req->len, 1, r->whole_object, rbd_bs_cb, &b);
  if (rc < 0 && rc != -ECANCELED) {
    /* Unknown is data: describe what is left as data rather than fail,
     * unless the cluster is unreachable (then reads fail too). */
    if (rc == -ETIMEDOUT || rc == -ESHUTDOWN) {
      vdb_req_complete(req, -EIO);
      return;
    }
    req->nr_extents = 0;
    b.pos = req->offset;
    b.full = false;
    rbd_bs_add(&b, req->len, 0);
  } else if (!b.full) {
    rbd_bs_add(&b, b.end - b.pos, VDB_EXTENT_HOLE | VDB_EXTENT_ZERO);
  }
  vdb_req_complete(req, 0);
}

static void rbd_block_status(void *handle, struct vdb_req *req)
{
  struct rbd_disk *r = handle;

  rbd_aio_of(req)->next = NULL;
  pthread_mutex_lock(&r->lock);
  *r->jobs_tail = req;
  r->jobs_tail = &rbd_aio_of(req)->next;
  pthread_cond_signal(&r->cond);
  pthread_mutex_unlock(&r->lock);
}

/* ---- snapshots ---- */

/* Control thread, the disk paused and flushed: create the RBD snapshot
 * snap_name and fill *p with what plugs it read-only. */
static int rbd_snapshot(void *handle, const char *snap_name, struct vdb_params *p)
{
  struct rbd_disk *r = handle;
  char spec[3 * RBD_NAME_MAX];
  int rc;

  if (r->readonly || r->snap[0]) {
    vdb_set_error("rbd backend: %s/%s is opened read-only: no snapshot", r->pool, r->name);
    return -EPERM;
  }
  if (strlen(snap_name) >= RBD_NAME_MAX) {
    vdb_set_error("rbd backend: snapshot name '%s' is too long", snap_name);
    return -EINVAL;
  }
  rc = rbd_snap_create(r->image, snap_name);
  if (rc < 0) {
    vdb_set_error("rbd backend: cannot create snapshot %s/%s@%s: %s", r->pool, r->name, snap_name,
                  rc == -EEXIST ? "an RBD snapshot of that name exists" : strerror(-rc));
    return rc;
  }
  snprintf(spec, sizeof spec, "%s/%s@%s", r->pool, r->name, snap_name);
  if (vdb_params_set(p, "image", spec) < 0 ||
      (r->conf && vdb_params_set(p, "conf", r->conf) < 0) ||
      (r->id && vdb_params_set(p, "id", r->id) < 0) ||
      (r->keyring && vdb_params_set(p, "keyring", r->keyring) < 0) ||
      (r->timeout && vdb_params_set(p, "timeout", r->timeout) < 0) ||
      (r->cache && vdb_params_set(p, "cache", "1") < 0))
    return -ENOMEM;
  return 0;
}

const struct vdb_backend_ops vdb_backend_rbd = {
  VDB_BACKEND_OPS_INIT,
  .name = "rbd",
  .summary = "a Ceph RBD image (librbd)",
  .usage = "image=[rbd:]POOL/IMAGE[@SNAP]  the image, required (positional); @SNAP: read-only\n"
           "snap=SNAP      plug snapshot SNAP of the image, read-only (--snap)\n"
           "create=1       create the image (format 2; never overwrites), needs size\n"
           "size=SIZE      the size of a new image (else the image's own size)\n"
           "conf=FILE      Ceph config file (--conf; default $CEPH_CONF, /etc/ceph/ceph.conf)\n"
           "id=CLIENT      the cephx user, without 'client.' (--id; default admin)\n"
           "keyring=FILE   the keyring (--keyring; default from the config)\n"
           "timeout=SECS   fail I/O and plug with EIO after SECS when the cluster is\n"
           "               unreachable (--timeout; default 30, 0 = wait for ever)\n"
           "cache=1        librbd's client cache (writeback; flush makes data durable)\n"
           "readonly=1     open the image read-only\n",
  .positional = "image",
  .open = rbd_open_disk,
  .close = rbd_close_disk,
  .read = rbd_submit,
  .write = rbd_submit,
  .flush = rbd_submit,
  .trim = rbd_submit,
  .write_zeroes = rbd_submit,
  .block_status = rbd_block_status,
  .snapshot = rbd_snapshot,
};
