/* vdbus — the "ublk" frontend: each attached disk is a ublk device
 * (/dev/ublkbN), served by this daemon through /dev/ublkcN.
 *
 * Control path (Documentation/block/ublk.rst): commands go to
 * /dev/ublk-control as IORING_OP_URING_CMD on a small io_uring with 128-byte
 * SQEs, ioctl-encoded (UBLK_U_CMD_*): GET_FEATURES, ADD_DEV, SET_PARAMS,
 * START_DEV; STOP_DEV and DEL_DEV at detach; GET_DEV_INFO,
 * START_USER_RECOVERY and END_USER_RECOVERY to take a device back after the
 * daemon died (UBLK_F_USER_RECOVERY keeps it, with its I/O queued).
 *
 * Data path (ublk-queue.c): one thread per hardware queue, each running its own vdb_loop
 * (so that backends submitting from it use the loop's io_uring) and a
 * second io_uring for the queue's uring commands.  Every tag has one
 * command outstanding: FETCH_REQ at start, then COMMIT_AND_FETCH_REQ with
 * the result of the request just served.  The request's descriptor is read
 * from the mmap'd descriptor array, the data lives in a buffer per tag whose
 * address is given to the driver in each command.  Requests become vdb_reqs
 * submitted to the bus; their completion (any thread) comes back to the
 * queue thread directly when it runs there, else through a lock-free list
 * and an eventfd watched by the queue loop.
 *
 * The driver accepts the commands of a queue only from the task that
 * fetched first, so all of a queue's uring commands are submitted by its
 * thread.
 *
 * Threads: probe/attach/busy/detach/describe/cleanup_unclaimed run on the
 * control thread and may block.  Locks: ctrl_lock protects the control
 * ring and the claimed list (leaf); q->lock is the start rendezvous. */
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

static pthread_mutex_t ctrl_lock = PTHREAD_MUTEX_INITIALIZER;
static struct io_uring ctrl_ring;
static int ctrl_fd = -1;
static int claimed[UB_MAX_CLAIMED];  /* dev ids attached by this daemon */
static int nr_claimed;

/* ---- helpers ---- */

/* Wait (bounded) until path exists: 0 or -ETIMEDOUT. */
static int ub_wait_node(const char *path, unsigned ms)
{
  for (unsigned t = 0; t <= ms; t += 10) {
    if (access(path, F_OK) == 0)
      return 0;
    vdb_sleep_ms(10);
  }
  return -ETIMEDOUT;
}

/* Our mark in ublksrv_flags: magic and a hash of the state directory, so
 * that a daemon with another state directory leaves our devices alone. */
static uint64_t ub_owner_mark(void)
{
  uint32_t h = 2166136261u;

  for (const char *s = vdb_bus_settings.state_dir; *s; s++)
    h = (h ^ (uint8_t)*s) * 16777619u;
  return (UB_MAGIC << 32) | h;
}

/* Is the process that served a device still there (not a zombie)? */
static bool ub_pid_alive(pid_t pid)
{
  char path[64], buf[256], *p;
  FILE *f;
  bool alive;

  if (pid <= 0 || kill(pid, 0) < 0)
    return false;
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  if (!(f = fopen(path, "re")))
    return true;
  alive = fgets(buf, sizeof buf, f) && (p = strrchr(buf, ')')) && p[1] && p[2] != 'Z' &&
          p[2] != 'X';
  fclose(f);
  return alive;
}

static void ub_claim(int id, bool on)
{
  pthread_mutex_lock(&ctrl_lock);
  if (on && nr_claimed < UB_MAX_CLAIMED) {
    claimed[nr_claimed++] = id;
  } else if (!on) {
    for (int i = 0; i < nr_claimed; i++)
      if (claimed[i] == id) {
        claimed[i] = claimed[--nr_claimed];
        break;
      }
  }
  pthread_mutex_unlock(&ctrl_lock);
}

static bool ub_is_claimed(int id)
{
  bool r = false;

  pthread_mutex_lock(&ctrl_lock);
  for (int i = 0; i < nr_claimed; i++)
    r |= claimed[i] == id;
  pthread_mutex_unlock(&ctrl_lock);
  return r;
}

/* ---- the control ring ---- */

/* Open /dev/ublk-control and its ring, once.  ctrl_lock held.  0 or -errno. */
static int ub_ctrl_open_locked(void)
{
  int r;

  if (ctrl_fd >= 0)
    return 0;
  ctrl_fd = open(UB_CONTROL, O_RDWR | O_CLOEXEC);
  if (ctrl_fd < 0)
    return -errno;
  r = io_uring_queue_init(4, &ctrl_ring, IORING_SETUP_SQE128);
  if (r < 0) {
    close(ctrl_fd);
    ctrl_fd = -1;
  }
  return r;
}

/* Send one control command and wait for its answer.  dev_id is the device
 * (UINT32_MAX for none), buf/len the command's buffer, data0 its inline
 * argument.  Returns the command's result (>= 0) or -errno.  Control
 * thread; blocks as long as the driver takes (START_DEV scans partitions). */
static int ub_ctrl(uint32_t op, uint32_t dev_id, void *buf, uint16_t len, uint64_t data0)
{
  struct io_uring_sqe *sqe;
  struct io_uring_cqe *cqe;
  struct ublksrv_ctrl_cmd *cmd;
  int r;

  pthread_mutex_lock(&ctrl_lock);
  r = ub_ctrl_open_locked();
  if (r < 0)
    goto out;
  sqe = io_uring_get_sqe(&ctrl_ring);
  if (!sqe) {
    r = -EBUSY;
    goto out;
  }
  memset(sqe, 0, 128);
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = ctrl_fd;
  sqe->cmd_op = op;
  cmd = (struct ublksrv_ctrl_cmd *)sqe->cmd;
  cmd->dev_id = dev_id;
  cmd->queue_id = (uint16_t)-1;
  cmd->addr = (uint64_t)(uintptr_t)buf;
  cmd->len = len;
  cmd->data[0] = data0;
  r = io_uring_submit(&ctrl_ring);
  if (r < 0)
    goto out;
  do
    r = io_uring_wait_cqe(&ctrl_ring, &cqe);
  while (r == -EINTR);
  if (r < 0)
    goto out;
  r = cqe->res;
  io_uring_cqe_seen(&ctrl_ring, cqe);
out:
  pthread_mutex_unlock(&ctrl_lock);
  return r;
}

static int ub_get_features(uint64_t *features)
{
  *features = 0;
  return ub_ctrl(UBLK_U_CMD_GET_FEATURES, UINT32_MAX, features, UBLK_FEATURES_LEN, 0);
}

static int ub_get_info(int id, struct ublksrv_ctrl_dev_info *info)
{
  memset(info, 0, sizeof *info);
  return ub_ctrl(UBLK_U_CMD_GET_DEV_INFO, (uint32_t)id, info, sizeof *info, 0);
}

/* Delete device id without waiting for its last user: a filesystem still
 * mounted after a forced unplug holds the disk, and DEL_DEV would wait for
 * its unmount.  Falls back to DEL_DEV on kernels without the async form.
 * 0 or -errno. */
static int ub_del(int id)
{
  int r = ub_ctrl(UBLK_U_CMD_DEL_DEV_ASYNC, (uint32_t)id, NULL, 0, 0);

  if (r == -EINVAL || r == -EOPNOTSUPP)
    r = ub_ctrl(UBLK_U_CMD_DEL_DEV, (uint32_t)id, NULL, 0, 0);
  return r;
}

/* STOP_DEV (unless never started) then delete.  Logs failures. */
static void ub_delete(int id, bool stop, const char *who)
{
  int r;

  if (stop && (r = ub_ctrl(UBLK_U_CMD_STOP_DEV, (uint32_t)id, NULL, 0, 0)) < 0)
    vdb_warn("%s: ublk STOP_DEV %d: %s", who, id, strerror(-r));
  if ((r = ub_del(id)) < 0)
    vdb_warn("%s: ublk DEL_DEV %d: %s", who, id, strerror(-r));
}

/* ---- attach ---- */

static int ub_alloc_queues(struct ublk_fe *u)
{
  u->queues = calloc(u->nr_queues, sizeof *u->queues);
  if (!u->queues) {
    vdb_set_error("out of memory");
    return -ENOMEM;
  }
  for (unsigned i = 0; i < u->nr_queues; i++) {
    struct ub_queue *q = &u->queues[i];
    q->u = u;
    q->qid = (uint16_t)i;
    q->ring_w.fd = q->done_w.fd = -1;
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->cond, NULL);
  }
  return 0;
}

/* Open /dev/ublkcN (waiting for udev/devtmpfs to make it). */
static int ub_open_cdev(struct ublk_fe *u)
{
  char path[32];

  snprintf(path, sizeof path, "/dev/ublkc%d", u->dev_id);
  if (ub_wait_node(path, UB_NODE_WAIT_MS) < 0) {
    vdb_set_error("%s did not appear", path);
    return -ETIMEDOUT;
  }
  u->cdev_fd = open(path, O_RDWR | O_CLOEXEC);
  if (u->cdev_fd < 0) {
    int e = errno;
    vdb_set_error("open %s: %s", path, strerror(e));
    return -e;
  }
  return 0;
}

static int ub_start_queues(struct ublk_fe *u)
{
  int r = ub_alloc_queues(u);

  for (unsigned i = 0; r == 0 && i < u->nr_queues; i++) {
    r = ub_queue_start(u, &u->queues[i]);
    u->nr_started = (int)i + 1;
  }
  return r;
}

/* Wait for /dev/ublkbN and note its device number. */
static int ub_wait_disk(struct ublk_fe *u)
{
  struct stat st;

  snprintf(u->dev, sizeof u->dev, "/dev/ublkb%d", u->dev_id);
  if (ub_wait_node(u->dev, UB_NODE_WAIT_MS) < 0 || stat(u->dev, &st) < 0) {
    vdb_set_error("%s did not appear", u->dev);
    return -ETIMEDOUT;
  }
  u->rdev = st.st_rdev;
  return 0;
}

/* Open /dev/ublkcN, start every queue (each fetches all its tags), then
 * tell the driver with op (START_DEV, END_USER_RECOVERY) that this daemon
 * serves the device.  0 or -errno with vdb_set_error(). */
static int ub_go_live(struct ublk_fe *u, uint32_t op, const char *what)
{
  int r;

  if ((r = ub_open_cdev(u)) < 0 || (r = ub_start_queues(u)) < 0)
    return r;
  r = ub_ctrl(op, (uint32_t)u->dev_id, NULL, 0, (uint64_t)getpid());
  if (r < 0) {
    vdb_set_error("ublk %s on device %d: %s", what, u->dev_id, strerror(-r));
    return r;
  }
  u->started = true;
  return 0;
}

static unsigned ub_shift(uint32_t v)
{
  unsigned s = 0;

  while ((1u << (s + 1)) <= v)
    s++;
  return s;
}

/* The device's parameters, from the disk's size and capabilities. */
static void ub_fill_params(const struct ublk_fe *u, struct ublk_params *p)
{
  const struct vdb_disk *d = u->d;
  struct ublk_param_basic *b = &p->basic;

  memset(p, 0, sizeof *p);
  p->len = sizeof *p;
  p->types = UBLK_PARAM_TYPE_BASIC;
  b->logical_bs_shift = (uint8_t)ub_shift(d->block_size);
  b->physical_bs_shift = 12;
  b->io_min_shift = 12;
  b->io_opt_shift = 12;
  b->max_sectors = u->max_io >> 9;
  b->dev_sectors = (d->size / d->block_size * d->block_size) >> 9;
  if (d->readonly)
    b->attrs |= UBLK_ATTR_READ_ONLY;
  if (d->can_flush)
    b->attrs |= UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
  if (!d->readonly && (d->can_trim || d->can_zero)) {
    p->types |= UBLK_PARAM_TYPE_DISCARD;
    p->discard.discard_granularity = 4096;
    p->discard.max_discard_segments = 1;
    if (d->can_trim)
      p->discard.max_discard_sectors = UB_MAX_DISCARD >> 9;
    if (d->can_zero)
      p->discard.max_write_zeroes_sectors = UB_MAX_ZEROES >> 9;
  }
}

/* Create a new device: ADD_DEV, SET_PARAMS, queues, START_DEV. */
static int ub_create(struct ublk_fe *u)
{
  struct ublksrv_ctrl_dev_info info;
  struct ublk_params params;
  int r;

  memset(&info, 0, sizeof info);
  info.nr_hw_queues = (uint16_t)vdb_frontend_queues();
  info.queue_depth = UB_QUEUE_DEPTH;
  info.max_io_buf_bytes = UB_MAX_IO;
  info.dev_id = UINT32_MAX;
  info.ublksrv_pid = getpid();
  info.flags = u->features & UB_WANT_FLAGS;
  info.ublksrv_flags = ub_owner_mark();
  r = ub_ctrl(UBLK_U_CMD_ADD_DEV, UINT32_MAX, &info, sizeof info, 0);
  if (r < 0) {
    vdb_set_error("ublk ADD_DEV: %s", strerror(-r));
    return r;
  }
  u->added = true;
  u->dev_id = (int)info.dev_id;
  u->flags = info.flags;
  u->nr_queues = info.nr_hw_queues;
  u->depth = info.queue_depth;
  u->max_io = info.max_io_buf_bytes;
  ub_fill_params(u, &params);
  r = ub_ctrl(UBLK_U_CMD_SET_PARAMS, (uint32_t)u->dev_id, &params, sizeof params, 0);
  if (r < 0) {
    vdb_set_error("ublk SET_PARAMS on device %d: %s", u->dev_id, strerror(-r));
    return r;
  }
  if ((r = ub_go_live(u, UBLK_U_CMD_START_DEV, "START_DEV")) < 0)
    return r;
  return ub_wait_disk(u);
}

/* Is this saved device ours and recoverable?  1 yes (info filled), 0 no
 * (gone, or another's), -EAGAIN when it is ours but cannot be recovered
 * (the caller deletes it).  Waits (bounded) for a device whose daemon just
 * died to become QUIESCED. */
static int ub_check_saved(struct ublk_fe *u, int id, struct ublksrv_ctrl_dev_info *info)
{
  char path[32];
  struct ublk_params params;
  int r;

  snprintf(path, sizeof path, "/dev/ublkc%d", id);
  if (access(path, F_OK) < 0 || ub_get_info(id, info) < 0)
    return 0;
  if (info->ublksrv_flags != ub_owner_mark()) {
    vdb_info("%s: ublk device %d is not ours; making a new one", u->d->name, id);
    return 0;
  }
  for (unsigned ms = 0; info->state == UBLK_S_DEV_LIVE && ms < UB_QUIESCE_WAIT_MS; ms += 20) {
    if (info->ublksrv_pid != getpid() && ub_pid_alive(info->ublksrv_pid)) {
      vdb_warn("%s: ublk device %d is served by live process %d", u->d->name, id,
               info->ublksrv_pid);
      return 0;
    }
    vdb_sleep_ms(20);
    if ((r = ub_get_info(id, info)) < 0)
      return 0;
  }
  if (info->state != UBLK_S_DEV_QUIESCED || !(info->flags & UBLK_F_USER_RECOVERY))
    return -EAGAIN;
  memset(&params, 0, sizeof params);
  params.len = sizeof params;
  r = ub_ctrl(UBLK_U_CMD_GET_PARAMS, (uint32_t)id, &params, sizeof params, 0);
  if (r < 0 || params.basic.dev_sectors != (u->d->size / u->d->block_size * u->d->block_size) >> 9 ||
      params.basic.logical_bs_shift != ub_shift(u->d->block_size))
    return -EAGAIN;
  return 1;
}

/* Take a quiesced device back: START_USER_RECOVERY, fetch on every tag of
 * every queue, END_USER_RECOVERY with our pid. */
static int ub_recover(struct ublk_fe *u, const struct ublksrv_ctrl_dev_info *info)
{
  int r;

  u->dev_id = (int)info->dev_id;
  u->flags = info->flags;
  u->nr_queues = info->nr_hw_queues;
  u->depth = info->queue_depth;
  u->max_io = info->max_io_buf_bytes;
  r = ub_ctrl(UBLK_U_CMD_START_USER_RECOVERY, (uint32_t)u->dev_id, NULL, 0, 0);
  if (r < 0) {
    vdb_set_error("ublk START_USER_RECOVERY on device %d: %s", u->dev_id, strerror(-r));
    return r;
  }
  u->added = true;
  if ((r = ub_go_live(u, UBLK_U_CMD_END_USER_RECOVERY, "END_USER_RECOVERY")) < 0)
    return r;
  u->recovered = true;
  return ub_wait_disk(u);
}

/* The device id saved in fe_state ("ublk:N"), or -1. */
static int ub_saved_id(const char *fe_state)
{
  int id;
  char end;

  if (sscanf(fe_state, "ublk:%d%c", &id, &end) != 1 || id < 0)
    return -1;
  return id;
}

static struct ublk_fe *ub_new(struct vdb_disk *d)
{
  struct ublk_fe *u = calloc(1, sizeof *u);

  if (!u)
    return NULL;
  u->d = d;
  u->dev_id = -1;
  u->cdev_fd = -1;
  return u;
}

static void ub_detach(struct vdb_disk *d, void *priv);

/* Try to take back the device saved in d->cfg.fe_state into u.  0 when
 * recovered; 1 when there was nothing to take back (a saved device of
 * ours that cannot be recovered is deleted); -errno when recovery failed
 * half-way (u holds what to tear down). */
static int ub_try_recover(struct ublk_fe *u)
{
  struct ublksrv_ctrl_dev_info info;
  int id = ub_saved_id(u->d->cfg.fe_state), r;

  if (id < 0 || ub_is_claimed(id))
    return 1;
  r = ub_check_saved(u, id, &info);
  if (r == 0)
    return 1;
  if (r < 0) {
    vdb_warn("%s: ublk device %d (state %u) cannot be recovered; deleting it", u->d->name,
             id, (unsigned)info.state);
    ub_delete(id, info.state != UBLK_S_DEV_DEAD, u->d->name);
    return 1;
  }
  vdb_info("%s: recovering ublk device %d", u->d->name, id);
  return ub_recover(u, &info);
}

/* Attach d: take its saved device back, or create one.  Control thread;
 * returns when /dev/ublkbN exists. */
static int ub_attach(struct vdb_disk *d, void **priv, char *device, size_t devlen)
{
  struct ublk_fe *u = ub_new(d);
  int r;

  if (!u) {
    vdb_set_error("out of memory");
    return -ENOMEM;
  }
  r = ub_get_features(&u->features);
  if (r < 0) {
    vdb_set_error("ublk GET_FEATURES: %s", strerror(-r));
    goto err;
  }
  r = ub_try_recover(u);
  if (r < 0) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", vdb_get_error());
    vdb_warn("%s: %s; making a new device", d->name, msg);
    ub_detach(d, u);
    if (!(u = ub_new(d))) {
      vdb_set_error("out of memory");
      return -ENOMEM;
    }
    r = ub_get_features(&u->features);
    r = r < 0 ? r : 1;
  }
  if (r > 0)
    r = ub_create(u);
  if (r < 0)
    goto err;
  snprintf(device, devlen, "%s", u->dev);
  snprintf(d->cfg.fe_state, sizeof d->cfg.fe_state, "ublk:%d", u->dev_id);
  ub_claim(u->dev_id, true);
  vdb_info("%s: %s as %s (ublk dev %d, %u queues x %u, flags 0x%llx)", d->name,
           u->recovered ? "recovered" : "attached", u->dev, u->dev_id, u->nr_queues, u->depth,
           (unsigned long long)u->flags);
  *priv = u;
  return 0;

err: {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", vdb_get_error());
    ub_detach(d, u);
    vdb_set_error("%s", msg);
  }
  return r;
}

/* ---- busy, detach, describe ---- */

static int ub_busy(struct vdb_disk *d, void *priv)
{
  struct ublk_fe *u = priv;

  if (!u || !u->started)
    return 0;
  return vdb_blkdev_busy(u->dev, u->rdev);
}

/* Detach: STOP_DEV (the driver drains I/O through the running queues and
 * gives back every command), stop and join the queues, DEL_DEV.  Control
 * thread.  Copes with every partial state of ub_attach; frees priv. */
static void ub_detach(struct vdb_disk *d, void *priv)
{
  struct ublk_fe *u = priv;
  int r;

  if (!u)
    return;
  if (u->started && (r = ub_ctrl(UBLK_U_CMD_STOP_DEV, (uint32_t)u->dev_id, NULL, 0, 0)) < 0)
    vdb_warn("%s: ublk STOP_DEV %d: %s", d->name, u->dev_id, strerror(-r));
  for (int i = 0; i < u->nr_started; i++)
    ub_queue_stop(&u->queues[i]);
  for (int i = 0; u->queues && i < u->nr_queues; i++) {
    pthread_mutex_destroy(&u->queues[i].lock);
    pthread_cond_destroy(&u->queues[i].cond);
  }
  free(u->queues);
  if (u->cdev_fd >= 0)
    close(u->cdev_fd);
  if (u->added) {
    if ((r = ub_del(u->dev_id)) < 0)
      vdb_warn("%s: ublk DEL_DEV %d: %s", d->name, u->dev_id, strerror(-r));
    ub_claim(u->dev_id, false);
  }
  if (u->started)
    vdb_info("%s: detached %s", d->name, u->dev);
  free(u);
}

static void ub_describe(struct vdb_disk *d, void *priv, char *buf, size_t len)
{
  struct ublk_fe *u = priv;

  if (!u) {
    snprintf(buf, len, "ublk (not attached)");
    return;
  }
  snprintf(buf, len, "ublk dev %d, %u queues x depth %u, features 0x%llx, flags 0x%llx%s",
           u->dev_id, u->nr_queues, u->depth, (unsigned long long)u->features,
           (unsigned long long)u->flags, u->recovered ? ", recovered" : "");
}

/* ---- probe, cleanup ---- */

static int ub_probe(void)
{
  int fd;

  if (geteuid() != 0) {
    vdb_set_error("the ublk frontend needs root");
    return -EPERM;
  }
  fd = open(UB_CONTROL, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    if (e == ENOENT || e == ENODEV || e == ENXIO) {
      vdb_set_error("ublk_drv is not loaded (modprobe ublk_drv)");
      return -ENODEV;
    }
    vdb_set_error("cannot open %s: %s", UB_CONTROL, strerror(e));
    return e == EACCES || e == EPERM ? -EPERM : -ENODEV;
  }
  close(fd);
  return 0;
}

/* After the saved disks were plugged back: delete the ublk devices of
 * ours (our mark, no live server) that no disk took back — a volatile
 * disk's device after a kill -9, or one whose disk failed to plug. */
static void ub_cleanup_unclaimed(void)
{
  DIR *dir;
  struct dirent *e;

  if (geteuid() != 0 || access(UB_CONTROL, F_OK) < 0 || !(dir = opendir("/dev")))
    return;
  while ((e = readdir(dir))) {
    struct ublksrv_ctrl_dev_info info;
    int id;
    char end;

    if (sscanf(e->d_name, "ublkc%d%c", &id, &end) != 1 || ub_is_claimed(id))
      continue;
    if (ub_get_info(id, &info) < 0 || info.ublksrv_flags != ub_owner_mark())
      continue;
    if (info.state == UBLK_S_DEV_LIVE && ub_pid_alive(info.ublksrv_pid))
      continue;
    vdb_info("deleting unclaimed ublk device %d (state %u)", id, (unsigned)info.state);
    ub_delete(id, info.state != UBLK_S_DEV_DEAD, "cleanup");
  }
  closedir(dir);
}

const struct vdb_frontend_ops vdb_frontend_ublk = {
  .name = "ublk",
  .probe = ub_probe,
  .attach = ub_attach,
  .busy = ub_busy,
  .detach = ub_detach,
  .cleanup_unclaimed = ub_cleanup_unclaimed,
  .describe = ub_describe,
};
