/* vdbus — the "nbd-kernel" frontend: each attached disk is a kernel NBD
 * device (/dev/nbdN) whose connections are Unix socket pairs; the daemon's
 * ends are served by the NBD server's transmission code
 * (vdb_nbd_serve_socket), the kernel's ends are handed to the nbd driver
 * with the generic netlink family "nbd" (NBD_CMD_CONNECT).
 *
 * Restart without losing the disk: the device is connected with a
 * dead-connection timeout, so after a crash of vdbusd the kernel keeps it
 * (and its mounts) and holds new requests back.  d->cfg.fe_state records
 * "nbd:<index>:<connections>"; the next daemon gives the device fresh
 * sockets with NBD_CMD_RECONFIGURE.  Devices are tagged with the backend
 * identifier "vdbus:<run_dir>:<disk>" (/sys/block/nbdN/backend), so that
 * cleanup_unclaimed can disconnect those no restored disk took back.
 *
 * Healing: when the kernel gives up on a connection while the disk stays
 * attached (a request outlived the request timeout: the kernel shuts that
 * socket down and holds requests back for a reconnect), a heal thread hands
 * it a fresh socket pair with NBD_CMD_RECONFIGURE.
 *
 * Threads: probe/attach/busy/detach/cleanup run on the control thread and
 * may block.  The connections live on worker loops; their end is reported
 * through nk_conn_closed (any worker thread), which may start a detached
 * heal thread.
 *
 * Locks: nk->lock protects live, healing, attached and detaching; it is a
 * leaf lock.  nk_list is only touched on the control thread. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <netlink/genl/ctrl.h>
#include <netlink/genl/genl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bus/bus.h"
#include "common/error.h"
#include "common/log.h"
#include "frontends/blkdev.h"
#include "frontends/frontend.h"
#include "frontends/nbd/nbd-server.h"

#define NK_MAX_CONNS VDB_QUEUES_MAX /* connections (kernel queues) per device */
#define NK_TIMEOUT_S 30             /* request timeout: then requeue on another socket */
#define NK_DEAD_CONN_TIMEOUT_S 120  /* how long the kernel waits for a reconnect */
#define NK_SIZE_WAIT_MS 5000        /* for /sys/block/nbdN/size and /dev/nbdN */
#define NK_CLOSE_WAIT_MS 10000      /* for our connections to end at detach */
#define NK_REMOVE_WAIT_MS 2000      /* for the kernel to remove the device */
#define NK_RECONF_TRIES 20          /* RECONFIGURE while the kernel has not seen the old sockets die */
#define NK_ID_PREFIX "vdbus:"
#define NK_TIMEOUT_ENV "VDBUS_NBD_KERNEL_TIMEOUT" /* tests: request timeout in s */

/* One attached disk.  Freed when detach is done and the last connection
 * has reported its end (refs). */
struct nk_dev {
  struct vdb_disk *d;
  int index;                 /* nbdN; -1 until connected */
  unsigned nconns;           /* connections given to the kernel */
  bool recovered;            /* taken back after a daemon restart */
  char dev[32];              /* "/dev/nbdN" */
  dev_t rdev;
  _Atomic int refs;          /* the frontend's, plus one per live connection */
  pthread_mutex_t lock;      /* live */
  pthread_cond_t cond;
  unsigned live;             /* our connections not yet closed */
  unsigned healing;          /* heal threads running */
  bool attached;             /* attach is done: lost connections are healed */
  bool detaching;            /* detach has begun: no more healing */
  unsigned timeout_s;        /* request timeout given to the kernel */
  struct nk_dev *next;       /* nk_list */
};

static struct nk_dev *nk_list;   /* attached devices; control thread */

/* ---- helpers ---- */

/* "vdbus:<run_dir>:<disk>": what /sys/block/nbdN/backend says for ours. */
static void nk_identifier(const char *disk, char *buf, size_t len)
{
  snprintf(buf, len, NK_ID_PREFIX "%s:%s", vdb_bus_settings.run_dir, disk);
}

static int nk_sysfs(int index, const char *attr, char *buf, size_t len)
{
  char path[96];

  snprintf(path, sizeof path, "/sys/block/nbd%d/%s", index, attr);
  return vdb_sysfs_read(path, buf, len);
}

/* The device's size in bytes (0 when disconnected), or -errno. */
static long long nk_sysfs_size(int index)
{
  char buf[32];
  int r = nk_sysfs(index, "size", buf, sizeof buf);

  return r < 0 ? r : strtoll(buf, NULL, 10) * 512;
}

static void nk_put(struct nk_dev *nk)
{
  if (atomic_fetch_sub(&nk->refs, 1) != 1)
    return;
  pthread_mutex_destroy(&nk->lock);
  pthread_cond_destroy(&nk->cond);
  free(nk);
}

/* Re-read the partition table (best effort: EBUSY while a partition is
 * mounted).  Opening the device alone also drops partitions of a device
 * that lost its size. */
static void nk_reread_partitions(const char *dev)
{
  int fd = open(dev, O_RDONLY | O_CLOEXEC | O_NONBLOCK);

  if (fd < 0)
    return;
  if (ioctl(fd, BLKRRPART) < 0)
    vdb_dbg(VDB_DBG_BUS, "%s: BLKRRPART: %s", dev, strerror(errno));
  close(fd);
}

/* ---- generic netlink ---- */

struct nk_nl {
  struct nl_sock *sk;
  int family;
};

/* What the kernel answered to one command. */
struct nk_answer {
  int err;                   /* 0 or -errno */
  bool done;
  int index;                 /* NBD_ATTR_INDEX of a CONNECT reply, or -1 */
};

/* Connect to the "nbd" family.  0, -ENODEV (no nbd driver) or -errno. */
static int nk_nl_open(struct nk_nl *nl)
{
  nl->sk = nl_socket_alloc();
  if (!nl->sk)
    return -ENOMEM;
  if (genl_connect(nl->sk) < 0) {
    nl_socket_free(nl->sk);
    nl->sk = NULL;
    return -EIO;
  }
  nl->family = genl_ctrl_resolve(nl->sk, NBD_GENL_FAMILY_NAME);
  if (nl->family < 0) {
    nl_socket_free(nl->sk);
    nl->sk = NULL;
    return -ENODEV;
  }
  return 0;
}

static void nk_nl_close(struct nk_nl *nl)
{
  if (nl->sk)
    nl_socket_free(nl->sk);
  nl->sk = NULL;
}

static int nk_on_valid(struct nl_msg *msg, void *arg)
{
  struct nk_answer *a = arg;
  struct nlattr *tb[NBD_ATTR_MAX + 1];

  if (genlmsg_parse(nlmsg_hdr(msg), 0, tb, NBD_ATTR_MAX, NULL) == 0 && tb[NBD_ATTR_INDEX])
    a->index = (int)nla_get_u32(tb[NBD_ATTR_INDEX]);
  return NL_OK;
}

static int nk_on_ack(struct nl_msg *msg, void *arg)
{
  struct nk_answer *a = arg;

  a->done = true;
  return NL_STOP;
}

static int nk_on_error(struct sockaddr_nl *who, struct nlmsgerr *e, void *arg)
{
  struct nk_answer *a = arg;

  a->err = e->error < 0 ? e->error : -EPROTO;
  a->done = true;
  return NL_STOP;
}

/* A message for cmd, or NULL (out of memory). */
static struct nl_msg *nk_msg(struct nk_nl *nl, uint8_t cmd)
{
  struct nl_msg *msg = nlmsg_alloc();

  if (msg && !genlmsg_put(msg, NL_AUTO_PORT, NL_AUTO_SEQ, nl->family, 0, 0, cmd,
                          NBD_GENL_VERSION)) {
    nlmsg_free(msg);
    msg = NULL;
  }
  return msg;
}

/* Send msg (consumed) and wait for the kernel's acknowledgement.  0 or
 * -errno (the kernel's); *index gets a reply's NBD_ATTR_INDEX (or -1). */
static int nk_nl_call(struct nk_nl *nl, struct nl_msg *msg, int *index)
{
  struct nk_answer a = { .index = -1 };
  struct nl_cb *cb = nl_cb_alloc(NL_CB_DEFAULT);
  int r;

  if (!cb) {
    nlmsg_free(msg);
    return -ENOMEM;
  }
  nl_cb_set(cb, NL_CB_VALID, NL_CB_CUSTOM, nk_on_valid, &a);
  nl_cb_set(cb, NL_CB_ACK, NL_CB_CUSTOM, nk_on_ack, &a);
  nl_cb_err(cb, NL_CB_CUSTOM, nk_on_error, &a);
  r = nl_send_auto(nl->sk, msg);
  nlmsg_free(msg);
  if (r < 0)
    a.err = -EIO;
  else
    while (!a.done) {
      r = nl_recvmsgs(nl->sk, cb);
      if (r < 0 && !a.done) {
        a.err = -EPROTO;
        break;
      }
    }
  nl_cb_put(cb);
  if (index)
    *index = a.index;
  return a.err;
}

/* NBD_ATTR_SOCKETS with one NBD_SOCK_ITEM per descriptor.  0 or -EMSGSIZE. */
static int nk_put_sockets(struct nl_msg *msg, const int *fds, unsigned n)
{
  struct nlattr *socks = nla_nest_start(msg, NBD_ATTR_SOCKETS);

  if (!socks)
    return -EMSGSIZE;
  for (unsigned i = 0; i < n; i++) {
    struct nlattr *item = nla_nest_start(msg, NBD_SOCK_ITEM);

    if (!item || nla_put_u32(msg, NBD_SOCK_FD, (uint32_t)fds[i]) < 0)
      return -EMSGSIZE;
    nla_nest_end(msg, item);
  }
  nla_nest_end(msg, socks);
  return 0;
}

/* NBD_CMD_DISCONNECT of nbd<index>.  0 or -errno. */
static int nk_nl_disconnect(struct nk_nl *nl, int index)
{
  struct nl_msg *msg = nk_msg(nl, NBD_CMD_DISCONNECT);

  if (!msg)
    return -ENOMEM;
  if (nla_put_u32(msg, NBD_ATTR_INDEX, (uint32_t)index) < 0) {
    nlmsg_free(msg);
    return -EMSGSIZE;
  }
  return nk_nl_call(nl, msg, NULL);
}

/* ---- our ends of the connections ---- */

static void nk_heal_start(struct nk_dev *nk);

/* A connection served for nk ended (worker thread).  If the disk is still
 * attached, the kernel dropped it: start healing. */
static void nk_conn_closed(void *arg)
{
  struct nk_dev *nk = arg;
  bool heal;

  pthread_mutex_lock(&nk->lock);
  nk->live--;
  heal = nk->attached && !nk->detaching;
  if (heal)
    nk->healing++;
  pthread_cond_broadcast(&nk->cond);
  pthread_mutex_unlock(&nk->lock);
  if (heal)
    nk_heal_start(nk);
  nk_put(nk);
}

static void nk_close_fds(int *fds, unsigned n)
{
  for (unsigned i = 0; i < n; i++)
    if (fds[i] >= 0) {
      close(fds[i]);
      fds[i] = -1;
    }
}

/* Make n socket pairs, serve one end of each, return the other ends in
 * kfd (the caller closes them once the kernel has them).  0 or -errno with
 * an error message. */
static int nk_make_sockets(struct nk_dev *nk, int *kfd, unsigned n)
{
  for (unsigned i = 0; i < n; i++)
    kfd[i] = -1;
  for (unsigned i = 0; i < n; i++) {
    int sv[2], r;
    char label[VDB_NAME_MAX + 32];

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
      r = -errno;
      vdb_set_error("socketpair: %s", strerror(-r));
      nk_close_fds(kfd, i);
      return r;
    }
    /* Default socket buffers: larger ones (SO_SNDBUFFORCE 4 MiB) measured
     * slower in the guest, TCP loopback pairs slower still for 4k I/O. */
    kfd[i] = sv[0];
    snprintf(label, sizeof label, "nbd-kernel:%s/%u", nk->d->name, i);
    pthread_mutex_lock(&nk->lock);
    nk->live++;
    pthread_mutex_unlock(&nk->lock);
    atomic_fetch_add(&nk->refs, 1);
    r = vdb_nbd_serve_socket(nk->d, sv[1], label, nk_conn_closed, nk);
    if (r < 0) {
      pthread_mutex_lock(&nk->lock);
      nk->live--;
      pthread_mutex_unlock(&nk->lock);
      atomic_fetch_sub(&nk->refs, 1);
      vdb_set_error("cannot serve the kernel's NBD connection: %s", strerror(-r));
      nk_close_fds(kfd, i + 1);
      return r;
    }
  }
  return 0;
}

/* Wait (bounded) until none of our connections is left.  true if so. */
static bool nk_wait_closed(struct nk_dev *nk, unsigned ms)
{
  struct timespec deadline;
  bool idle;

  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += ms / 1000;
  deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&nk->lock);
  while (nk->live > 0)
    if (pthread_cond_timedwait(&nk->cond, &nk->lock, &deadline) == ETIMEDOUT)
      break;
  idle = nk->live == 0;
  pthread_mutex_unlock(&nk->lock);
  return idle;
}

/* ---- connect / recover / heal ---- */

static int nk_reconfigure(struct nk_dev *nk, struct nk_nl *nl, int index, unsigned nconns);

static void nk_heal_done(struct nk_dev *nk)
{
  pthread_mutex_lock(&nk->lock);
  nk->healing--;
  pthread_cond_broadcast(&nk->cond);
  pthread_mutex_unlock(&nk->lock);
  nk_put(nk);
}

/* Heal thread: give the kernel one fresh connection in place of the one
 * it dropped.  Holds a reference to nk and counts in nk->healing. */
static void *nk_heal_thread(void *arg)
{
  struct nk_dev *nk = arg;
  struct nk_nl nl = { 0 };
  int r = nk_nl_open(&nl);

  if (r == 0)
    r = nk_reconfigure(nk, &nl, nk->index, 1);
  nk_nl_close(&nl);
  if (r < 0)
    vdb_warn("%s: /dev/nbd%d lost a connection and cannot get a new one: %s", nk->d->name,
             nk->index, strerror(-r));
  else
    vdb_info("%s: /dev/nbd%d lost a connection (request timeout?): reconnected", nk->d->name,
             nk->index);
  nk_heal_done(nk);
  return NULL;
}

/* Start a heal thread (nk->healing already counts it). */
static void nk_heal_start(struct nk_dev *nk)
{
  pthread_attr_t attr;
  pthread_t t;
  int r;

  atomic_fetch_add(&nk->refs, 1);
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  r = pthread_create(&t, &attr, nk_heal_thread, nk);
  pthread_attr_destroy(&attr);
  if (r != 0) {
    vdb_warn("%s: cannot start a thread to reconnect /dev/nbd%d: %s", nk->d->name, nk->index,
             strerror(r));
    nk_heal_done(nk);
  }
}

static unsigned nk_conn_count(const struct vdb_disk *d)
{
  if (!(vdb_nbd_tflags(d) & NBD_FLAG_CAN_MULTI_CONN))
    return 1;
  return vdb_frontend_queues();
}

/* NBD_CMD_CONNECT a new device for nk->d.  0 (nk->index set) or -errno
 * with an error message. */
static int nk_connect(struct nk_dev *nk, struct nk_nl *nl)
{
  struct vdb_disk *d = nk->d;
  int kfd[NK_MAX_CONNS], index = -1, r;
  char id[sizeof vdb_bus_settings.run_dir + VDB_NAME_MAX + 16];
  struct nl_msg *msg;

  nk->nconns = nk_conn_count(d);
  nk_identifier(d->name, id, sizeof id);
  msg = nk_msg(nl, NBD_CMD_CONNECT);
  if (!msg) {
    vdb_set_error("out of memory");
    return -ENOMEM;
  }
  if (nla_put_u64(msg, NBD_ATTR_SIZE_BYTES, d->size) < 0 ||
      nla_put_u64(msg, NBD_ATTR_BLOCK_SIZE_BYTES, d->block_size) < 0 ||
      nla_put_u64(msg, NBD_ATTR_SERVER_FLAGS, vdb_nbd_tflags(d)) < 0 ||
      nla_put_u64(msg, NBD_ATTR_TIMEOUT, nk->timeout_s) < 0 ||
      nla_put_u64(msg, NBD_ATTR_DEAD_CONN_TIMEOUT, NK_DEAD_CONN_TIMEOUT_S) < 0 ||
      nla_put_u64(msg, NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT) < 0 ||
      nla_put_string(msg, NBD_ATTR_BACKEND_IDENTIFIER, id) < 0) {
    nlmsg_free(msg);
    vdb_set_error("netlink message too large");
    return -EMSGSIZE;
  }
  r = nk_make_sockets(nk, kfd, nk->nconns);
  if (r < 0) {
    nlmsg_free(msg);
    return r;
  }
  r = nk_put_sockets(msg, kfd, nk->nconns);
  if (r < 0)
    nlmsg_free(msg);
  else
    r = nk_nl_call(nl, msg, &index);
  nk_close_fds(kfd, nk->nconns); /* the kernel holds its own references */
  if (r < 0) {
    vdb_set_error("NBD_CMD_CONNECT: %s", strerror(-r));
    return r;
  }
  if (index < 0) {
    vdb_set_error("NBD_CMD_CONNECT: the kernel did not say which device it used");
    return -EPROTO;
  }
  nk->index = index;
  return 0;
}

/* Parse "nbd:<index>:<connections>".  true if fe_state is one of ours. */
static bool nk_parse_state(const char *s, int *index, unsigned *nconns)
{
  int i, n, end = 0;

  if (sscanf(s, "nbd:%d:%d%n", &i, &n, &end) != 2 || s[end] || i < 0 || n < 1 ||
      n > NK_MAX_CONNS)
    return false;
  *index = i;
  *nconns = (unsigned)n;
  return true;
}

/* Is nbd<index> the device an earlier daemon connected for d, with d's
 * size?  A RAM disk comes back empty after a restart: its old device must
 * not be handed the new, empty contents (cleanup_unclaimed removes it). */
static bool nk_can_recover(const struct vdb_disk *d, int index)
{
  char id[sizeof vdb_bus_settings.run_dir + VDB_NAME_MAX + 16];
  char cur[sizeof id];

  if (strcmp(d->cfg.backend, "ram") == 0)
    return false;
  nk_identifier(d->name, id, sizeof id);
  if (nk_sysfs(index, "backend", cur, sizeof cur) < 0 || strcmp(cur, id) != 0)
    return false;
  return nk_sysfs_size(index) == (long long)d->size;
}

/* Give nbd<index> nconns fresh connections (NBD_CMD_RECONFIGURE).  The
 * kernel takes them only in place of sockets it has seen die, so retry for
 * a short while.  0 or -errno.  Any thread. */
static int nk_reconfigure(struct nk_dev *nk, struct nk_nl *nl, int index, unsigned nconns)
{
  char id[sizeof vdb_bus_settings.run_dir + VDB_NAME_MAX + 16];
  int kfd[NK_MAX_CONNS], r = -ENOSPC;

  nk_identifier(nk->d->name, id, sizeof id);
  for (int tries = 0; tries < NK_RECONF_TRIES && r == -ENOSPC; tries++) {
    struct nl_msg *msg = nk_msg(nl, NBD_CMD_RECONFIGURE);

    if (tries > 0)
      vdb_sleep_ms(100);
    if (!msg)
      return -ENOMEM;
    if (nla_put_u32(msg, NBD_ATTR_INDEX, (uint32_t)index) < 0 ||
        nla_put_u64(msg, NBD_ATTR_TIMEOUT, nk->timeout_s) < 0 ||
        nla_put_u64(msg, NBD_ATTR_DEAD_CONN_TIMEOUT, NK_DEAD_CONN_TIMEOUT_S) < 0 ||
        nla_put_string(msg, NBD_ATTR_BACKEND_IDENTIFIER, id) < 0) {
      nlmsg_free(msg);
      return -EMSGSIZE;
    }
    r = nk_make_sockets(nk, kfd, nconns);
    if (r < 0) {
      nlmsg_free(msg);
      return r;
    }
    r = nk_put_sockets(msg, kfd, nconns);
    if (r < 0)
      nlmsg_free(msg);
    else
      r = nk_nl_call(nl, msg, NULL);
    nk_close_fds(kfd, nconns);
  }
  return r;
}

/* Wait until /dev/nbdN exists and has d's size; fill dev and rdev.  0 or
 * -errno with an error message. */
static int nk_wait_device(struct nk_dev *nk)
{
  struct stat st;
  long long size = 0;

  snprintf(nk->dev, sizeof nk->dev, "/dev/nbd%d", nk->index);
  for (unsigned ms = 0; ms <= NK_SIZE_WAIT_MS; ms += 10) {
    size = nk_sysfs_size(nk->index);
    if (size == (long long)nk->d->size && stat(nk->dev, &st) == 0 && S_ISBLK(st.st_mode)) {
      nk->rdev = st.st_rdev;
      return 0;
    }
    vdb_sleep_ms(10);
  }
  vdb_set_error("%s did not come up with size %llu (size %lld)", nk->dev,
                (unsigned long long)nk->d->size, size);
  return -ETIMEDOUT;
}

/* ---- frontend operations ---- */

static int nk_probe(void)
{
  struct nk_nl nl;
  int r;

  if (geteuid() != 0) {
    vdb_set_error("the nbd-kernel frontend needs root (to configure NBD devices)");
    return -EPERM;
  }
  r = nk_nl_open(&nl);
  if (r < 0) {
    vdb_set_error("the kernel has no nbd driver (modprobe nbd)");
    return -ENODEV;
  }
  nk_nl_close(&nl);
  return 0;
}

static void nk_detach(struct vdb_disk *d, void *priv);

/* Attach d: recover the device named by d->cfg.fe_state if an earlier
 * daemon left it, else connect a new one.  Control thread; returns when
 * /dev/nbdN has d's size. */
static int nk_attach(struct vdb_disk *d, void **priv, char *device, size_t devlen)
{
  struct nk_dev *nk = calloc(1, sizeof *nk);
  struct nk_nl nl = { 0 };
  unsigned old_n = 0;
  int old = -1, r;

  if (!nk) {
    vdb_set_error("out of memory");
    return -ENOMEM;
  }
  nk->d = d;
  nk->index = -1;
  nk->refs = 1;
  nk->timeout_s = NK_TIMEOUT_S;
  if (getenv(NK_TIMEOUT_ENV) && atoi(getenv(NK_TIMEOUT_ENV)) > 0)
    nk->timeout_s = (unsigned)atoi(getenv(NK_TIMEOUT_ENV));
  pthread_mutex_init(&nk->lock, NULL);
  pthread_cond_init(&nk->cond, NULL);
  r = nk_nl_open(&nl);
  if (r < 0) {
    vdb_set_error("the kernel has no nbd driver (modprobe nbd)");
    goto fail;
  }
  if (nk_parse_state(d->cfg.fe_state, &old, &old_n) && nk_can_recover(d, old)) {
    r = nk_reconfigure(nk, &nl, old, old_n);
    if (r == 0) {
      nk->index = old;
      nk->nconns = old_n;
      nk->recovered = true;
    } else
      vdb_warn("%s: cannot take back /dev/nbd%d: %s; connecting a new device", d->name, old,
               strerror(-r));
  }
  if (!nk->recovered && (r = nk_connect(nk, &nl)) < 0)
    goto fail;
  if ((r = nk_wait_device(nk)) < 0)
    goto fail;
  nk_nl_close(&nl);
  nk_reread_partitions(nk->dev);
  snprintf(d->cfg.fe_state, sizeof d->cfg.fe_state, "nbd:%d:%u", nk->index, nk->nconns);
  snprintf(device, devlen, "%s", nk->dev);
  nk->next = nk_list;
  nk_list = nk;
  pthread_mutex_lock(&nk->lock);
  nk->attached = true;
  pthread_mutex_unlock(&nk->lock);
  vdb_info("%s: %s %s (%u connection%s)", d->name, nk->recovered ? "took back" : "attached as",
           nk->dev, nk->nconns, nk->nconns == 1 ? "" : "s");
  *priv = nk;
  return 0;

fail: {
    char msg[512];

    snprintf(msg, sizeof msg, "%s", vdb_get_error());
    nk_nl_close(&nl);
    nk_detach(d, nk);
    vdb_set_error("%s", msg);
    return r;
  }
}

/* 1 if /dev/nbdN is mounted, claimed or held open by another process. */
static int nk_busy(struct vdb_disk *d, void *priv)
{
  struct nk_dev *nk = priv;

  if (!nk || nk->index < 0 || !nk->dev[0])
    return 0;
  return vdb_blkdev_busy(nk->dev, nk->rdev);
}

/* After a disconnect: the kernel removes the device at its last close
 * (NBD_CFLAG_DESTROY_ON_DISCONNECT).  Wait for that (bounded, not for a
 * device still held by a mount); if it stays, drop stale partitions. */
static void nk_wait_removed(struct nk_dev *nk)
{
  char path[64];
  int r;

  snprintf(path, sizeof path, "/sys/block/nbd%d", nk->index);
  r = vdb_blkdev_wait_gone(path, NK_REMOVE_WAIT_MS, 100, nk->dev, nk->rdev);
  if (r == 0)
    return;
  if (r == 1) {
    vdb_warn("%s: %s is still in use; the kernel removes it at its last close",
             nk->d->name, nk->dev);
    return;
  }
  nk_reread_partitions(nk->dev);
}

static void nk_list_remove(struct nk_dev *nk)
{
  for (struct nk_dev **pp = &nk_list; *pp; pp = &(*pp)->next)
    if (*pp == nk) {
      *pp = nk->next;
      return;
    }
}

/* Detach: NBD_CMD_DISCONNECT (the kernel sends NBD_CMD_DISC and shuts its
 * sockets down), wait for our connections to end and for the device to go.
 * Control thread; copes with a half-attached nk; drops the frontend's
 * reference (the connections may hold it a little longer). */
static void nk_detach(struct vdb_disk *d, void *priv)
{
  struct nk_dev *nk = priv;

  if (!nk)
    return;
  nk_list_remove(nk);
  pthread_mutex_lock(&nk->lock);
  nk->detaching = true;
  while (nk->healing > 0)
    pthread_cond_wait(&nk->cond, &nk->lock);
  pthread_mutex_unlock(&nk->lock);
  if (nk->index >= 0) {
    struct nk_nl nl = { 0 };
    int r = nk_nl_open(&nl);

    if (r == 0)
      r = nk_nl_disconnect(&nl, nk->index);
    nk_nl_close(&nl);
    if (r < 0)
      vdb_warn("%s: NBD_CMD_DISCONNECT /dev/nbd%d: %s", d->name, nk->index, strerror(-r));
  }
  if (!nk_wait_closed(nk, NK_CLOSE_WAIT_MS))
    vdb_warn("%s: the kernel did not close its NBD connections in %u ms", d->name,
             NK_CLOSE_WAIT_MS);
  if (nk->index >= 0) {
    if (nk->dev[0])
      nk_wait_removed(nk);
    vdb_info("%s: detached /dev/nbd%d", d->name, nk->index);
  }
  d->cfg.fe_state[0] = '\0';
  nk_put(nk);
}

static void nk_describe(struct vdb_disk *d, void *priv, char *buf, size_t len)
{
  struct nk_dev *nk = priv;

  if (!nk) {
    snprintf(buf, len, "nbd not attached");
    return;
  }
  snprintf(buf, len, "nbd index %d, %u connection%s, timeout %d s%s", nk->index, nk->nconns,
           nk->nconns == 1 ? "" : "s", nk->timeout_s, nk->recovered ? ", recovered" : "");
}

static bool nk_claimed(int index)
{
  for (struct nk_dev *nk = nk_list; nk; nk = nk->next)
    if (nk->index == index)
      return true;
  return false;
}

/* After the saved disks were plugged back: disconnect NBD devices that a
 * daemon with our run directory connected and no restored disk took back.
 * Control thread. */
static void nk_cleanup_unclaimed(void)
{
  char prefix[sizeof vdb_bus_settings.run_dir + 16];
  struct nk_nl nl = { 0 };
  DIR *dir;
  struct dirent *e;

  if (geteuid() != 0 || !(dir = opendir("/sys/block")))
    return;
  snprintf(prefix, sizeof prefix, NK_ID_PREFIX "%s:", vdb_bus_settings.run_dir);
  while ((e = readdir(dir))) {
    char id[PATH_MAX];
    int index, end = 0;

    if (sscanf(e->d_name, "nbd%d%n", &index, &end) != 1 || e->d_name[end] ||
        nk_sysfs(index, "backend", id, sizeof id) < 0 ||
        strncmp(id, prefix, strlen(prefix)) != 0 || nk_claimed(index))
      continue;
    if (!nl.sk && nk_nl_open(&nl) < 0)
      break;
    if (nk_nl_disconnect(&nl, index) < 0)
      vdb_warn("stale /dev/nbd%d (%s): NBD_CMD_DISCONNECT failed", index, id);
    else
      vdb_info("disconnected stale /dev/nbd%d (%s)", index, id);
  }
  nk_nl_close(&nl);
  closedir(dir);
}

const struct vdb_frontend_ops vdb_frontend_nbd_kernel = {
  .name = "nbd-kernel",
  .probe = nk_probe,
  .attach = nk_attach,
  .busy = nk_busy,
  .detach = nk_detach,
  .cleanup_unclaimed = nk_cleanup_unclaimed,
  .describe = nk_describe,
};
