/* vdbus — the bus: registry of plugged disks, plug/unplug, lifetime.
 * Lock order: bus_lock, then disk->lock. */
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <limits.h>
#include <unistd.h>

#include "backends/cow.h"
#include "backends/registry.h"
#include "bus/bus.h"
#include "common/error.h"
#include "common/log.h"
#include "frontends/frontend.h"

struct vdb_bus_settings vdb_bus_settings = { "/run/vdbus", "/var/lib/vdbus", 0 };
void (*vdb_bus_on_change)(void);

static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;
static struct vdb_disk *disks;   /* plug order; under bus_lock */

static struct vdb_disk *bus_find_locked(const char *name)
{
  for (struct vdb_disk *d = disks; d; d = d->next)
    if (strcmp(d->name, name) == 0)
      return d;
  return NULL;
}

static void bus_changed(void)
{
  if (vdb_bus_on_change)
    vdb_bus_on_change();
}

void vdb_disk_get(struct vdb_disk *d)
{
  atomic_fetch_add_explicit(&d->refs, 1, memory_order_relaxed);
}

static void disk_free(struct vdb_disk *d)
{
  if (d->handle)
    d->ops->close(d->handle);
  vdb_params_clear(&d->cfg.params);
  pthread_mutex_destroy(&d->lock);
  pthread_mutex_destroy(&d->fe_lock);
  pthread_cond_destroy(&d->cond);
  free(d);
}

void vdb_disk_put(struct vdb_disk *d)
{
  if (atomic_fetch_sub_explicit(&d->refs, 1, memory_order_acq_rel) == 1) {
    assert(d->nusers == 0 && d->stats.inflight == 0);
    disk_free(d);
  }
}

int vdb_bus_get(const char *name, struct vdb_disk **out)
{
  struct vdb_disk *d;

  pthread_mutex_lock(&bus_lock);
  d = bus_find_locked(name);
  if (d && !d->closing)
    vdb_disk_get(d);
  else
    d = NULL;
  pthread_mutex_unlock(&bus_lock);
  if (!d)
    return -ENOENT;
  *out = d;
  return 0;
}

int vdb_bus_list(struct vdb_disk ***out)
{
  struct vdb_disk **v;
  int n = 0, i = 0;

  pthread_mutex_lock(&bus_lock);
  for (struct vdb_disk *d = disks; d; d = d->next)
    n++;
  v = calloc((size_t)n + 1, sizeof *v);
  if (!v) {
    pthread_mutex_unlock(&bus_lock);
    return -ENOMEM;
  }
  for (struct vdb_disk *d = disks; d; d = d->next)
    if (!d->closing) {
      vdb_disk_get(d);
      v[i++] = d;
    }
  pthread_mutex_unlock(&bus_lock);
  *out = v;
  return i;
}

void vdb_bus_list_free(struct vdb_disk **v, int n)
{
  for (int i = 0; i < n; i++)
    vdb_disk_put(v[i]);
  free(v);
}

void vdb_disk_add_dependent(struct vdb_disk *d)
{
  atomic_fetch_add(&d->dependents, 1);
}

void vdb_disk_remove_dependent(struct vdb_disk *d)
{
  atomic_fetch_sub(&d->dependents, 1);
}

/* The names of the overlays of d, comma-separated, into buf.  Under no lock. */
static void bus_dependent_names(struct vdb_disk *d, char *buf, size_t len)
{
  size_t n = 0;

  buf[0] = '\0';
  pthread_mutex_lock(&bus_lock);
  for (struct vdb_disk *o = disks; o; o = o->next)
    if (o->ops == &vdb_backend_cow && o->handle && vdb_cow_base(o->handle) == d && n < len) {
      int k = snprintf(buf + n, len - n, "%s%s", n ? ", " : "", o->name);
      if (k > 0)
        n += (size_t)k;
    }
  pthread_mutex_unlock(&bus_lock);
}

int vdb_disk_add_user(struct vdb_disk *d, struct vdb_disk_user *u)
{
  int r = 0;

  pthread_mutex_lock(&d->lock);
  if (d->closing) {
    r = -ESHUTDOWN;
  } else {
    u->prev = NULL;
    u->next = d->users;
    if (d->users)
      d->users->prev = u;
    d->users = u;
    d->nusers++;
  }
  pthread_mutex_unlock(&d->lock);
  return r;
}

void vdb_disk_remove_user(struct vdb_disk *d, struct vdb_disk_user *u)
{
  pthread_mutex_lock(&d->lock);
  if (u->prev)
    u->prev->next = u->next;
  else
    d->users = u->next;
  if (u->next)
    u->next->prev = u->prev;
  u->next = u->prev = NULL;
  d->nusers--;
  pthread_cond_broadcast(&d->cond);
  pthread_mutex_unlock(&d->lock);
}

/* ---- plug ---- */

static int bus_check_name(const char *name)
{
  size_t n = strlen(name);

  if (n == 0 || n >= VDB_NAME_MAX) {
    vdb_set_error("disk name must be 1 to %d characters", VDB_NAME_MAX - 1);
    return -EINVAL;
  }
  if (name[0] == '.' || name[0] == '-') {
    vdb_set_error("disk name '%s' must not start with '.' or '-'", name);
    return -EINVAL;
  }
  for (size_t i = 0; i < n; i++)
    if (!isalnum((unsigned char)name[i]) && !strchr("._-+", name[i])) {
      vdb_set_error("disk name '%s': only letters, digits and . _ - + are allowed", name);
      return -EINVAL;
    }
  return 0;
}

/* Pick the name PREFIX<N> with the smallest free N >= first.  Under bus_lock. */
static void bus_pick_name(const char *prefix, unsigned first, char *name, size_t len)
{
  for (unsigned i = first;; i++) {
    snprintf(name, len, "%s%u", prefix, i);
    if (!bus_find_locked(name))
      return;
  }
}

void vdb_bus_free_name(const char *prefix, unsigned first, char *name, size_t len)
{
  pthread_mutex_lock(&bus_lock);
  bus_pick_name(prefix, first, name, len);
  pthread_mutex_unlock(&bus_lock);
}

static void disk_derive_caps(struct vdb_disk *d)
{
  const struct vdb_backend_ops *ops = d->ops;
  uint32_t off = d->info.caps_off;

  d->readonly = d->cfg.readonly || d->cfg.snapshot || d->info.readonly || !ops->write;
  d->can_write = !d->readonly;
  d->can_flush = ops->flush != NULL && d->can_write && !(off & VDB_CAP_FLUSH);
  d->can_fua = d->can_flush && !(off & VDB_CAP_FUA);
  d->can_trim = ops->trim != NULL && d->can_write && !(off & VDB_CAP_TRIM);
  d->can_zero = ops->write_zeroes != NULL && d->can_write && !(off & VDB_CAP_ZERO);
  d->can_fast_zero = d->can_zero && !(off & VDB_CAP_FAST_ZERO);
  d->can_cache = !(off & VDB_CAP_CACHE);
  d->can_extents = ops->block_status != NULL && !(off & VDB_CAP_EXTENTS);
  d->can_multi_conn = d->info.can_multi_conn;
}

/* Open a backend instance with the bus's defaults in *info. */
static int backend_open(const struct vdb_backend_ops *ops, const struct vdb_params *params,
                        void **handle, struct vdb_backend_info *info)
{
  int r;

  memset(info, 0, sizeof *info);
  info->can_multi_conn = true;
  info->min_block = 1;
  info->pref_block = 4096;
  info->max_block = 32u << 20;
  vdb_clear_error();
  r = ops->open(params, handle, info);
  if (r < 0) {
    *handle = NULL;
    if (!vdb_get_error()[0])
      vdb_set_error("%s backend: %s", ops->name, strerror(-r));
  }
  return r;
}

static int disk_open_backend(struct vdb_disk *d)
{
  int r;

  d->ops = vdb_backend_find(d->cfg.backend);
  if (!d->ops) {
    vdb_set_error("unknown backend '%s'", d->cfg.backend);
    return -ENOENT;
  }
  r = backend_open(d->ops, &d->cfg.params, &d->handle, &d->info);
  if (r < 0)
    return r;
  d->info.description[sizeof d->info.description - 1] = '\0'; /* a backend may fill it all */
  d->size = d->info.size;
  return 0;
}

static int disk_attach(struct vdb_disk *d)
{
  const struct vdb_frontend_ops *fe;
  int r = vdb_frontend_find(d->cfg.attach, &fe);

  if (r < 0)
    return r;
  if (!fe)
    return 0;
  if (strcmp(d->cfg.attach, "auto") != 0) {
    r = fe->probe();
    if (r < 0)
      return r;
  }
  r = fe->attach(d, &d->fe_priv, d->device, sizeof d->device);
  if (r < 0) {
    d->device[0] = '\0';
    return r;
  }
  d->fe = fe;
  return 0;
}

static int disk_create(const struct vdb_disk_config *cfg, struct vdb_disk **out)
{
  struct vdb_disk *d = calloc(1, sizeof *d);
  int r;

  if (!d)
    return -ENOMEM;
  d->cfg = *cfg;
  r = vdb_params_copy(&d->cfg.params, &cfg->params);
  if (r < 0) {
    free(d);
    return r;
  }
  pthread_mutex_init(&d->lock, NULL);
  pthread_mutex_init(&d->fe_lock, NULL);
  pthread_cond_init(&d->cond, NULL);
  d->paused_tail = &d->paused_head;
  d->refs = 1;
  *out = d;
  return 0;
}

static int plug_check_config(const struct vdb_disk_config *cfg)
{
  if (cfg->block_size != 512 && cfg->block_size != 4096) {
    vdb_set_error("block size must be 512 or 4096, not %u", cfg->block_size);
    return -EINVAL;
  }
  if (cfg->name[0])
    return bus_check_name(cfg->name);
  return 0;
}

/* Append d to the registry unless its name is taken (-EEXIST). */
static int bus_register(struct vdb_disk *d)
{
  struct vdb_disk **pp = &disks;

  pthread_mutex_lock(&bus_lock);
  if (bus_find_locked(d->name)) {
    pthread_mutex_unlock(&bus_lock);
    vdb_set_error("a disk named '%s' is already plugged", d->name);
    return -EEXIST;
  }
  while (*pp)
    pp = &(*pp)->next;
  *pp = d;
  pthread_mutex_unlock(&bus_lock);
  return 0;
}

int vdb_bus_plug(const struct vdb_disk_config *cfg, struct vdb_disk **out)
{
  struct vdb_disk *d;
  int r = plug_check_config(cfg);

  if (r < 0)
    return r;
  r = disk_create(cfg, &d);
  if (r < 0)
    return r;
  pthread_mutex_lock(&bus_lock);
  if (!cfg->name[0])
    bus_pick_name("vd", 0, d->cfg.name, sizeof d->cfg.name);
  else if (bus_find_locked(cfg->name)) {
    pthread_mutex_unlock(&bus_lock);
    vdb_set_error("a disk named '%s' is already plugged", cfg->name);
    r = -EEXIST;
    goto err;
  }
  pthread_mutex_unlock(&bus_lock);
  snprintf(d->name, sizeof d->name, "%s", d->cfg.name);
  d->block_size = cfg->block_size;
  d->export = cfg->export;

  r = disk_open_backend(d);
  if (r < 0)
    goto err;
  disk_derive_caps(d);
  r = disk_attach(d);
  if (r < 0)
    goto err;

  r = bus_register(d);
  if (r < 0)
    goto err;
  vdb_info("plugged %s: backend %s, %llu bytes%s%s%s", d->name, d->cfg.backend,
           (unsigned long long)d->size, d->readonly ? ", read-only" : "",
           d->device[0] ? ", device " : "", d->device);
  bus_changed();
  if (out) {
    vdb_disk_get(d);
    *out = d;
  }
  return 0;

err:
  vdb_disk_put(d);
  return r;
}

/* ---- unplug ---- */

static void disk_kick_users(struct vdb_disk *d)
{
  pthread_mutex_lock(&d->lock);
  for (struct vdb_disk_user *u = d->users; u; u = u->next)
    u->kick(u);
  pthread_mutex_unlock(&d->lock);
}

static void disk_wait_idle(struct vdb_disk *d)
{
  pthread_mutex_lock(&d->lock);
  while (d->nusers > 0 || atomic_load(&d->stats.inflight) > 0) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    if (pthread_cond_timedwait(&d->cond, &d->lock, &ts) == ETIMEDOUT)
      vdb_warn("unplug %s: still waiting for %d users and %llu requests", d->name,
               d->nusers, (unsigned long long)atomic_load(&d->stats.inflight));
  }
  pthread_mutex_unlock(&d->lock);
}

static int disk_check_busy(struct vdb_disk *d)
{
  int r;

  if (!d->fe)
    return 0;
  r = d->fe->busy(d, d->fe_priv);
  if (r > 0) {
    vdb_set_error("disk '%s': %s is in use (mounted or held open); use --force to unplug anyway",
                  d->name, d->device);
    return -EBUSY;
  }
  return 0;
}

static void disk_unlink(struct vdb_disk *d)
{
  pthread_mutex_lock(&bus_lock);
  for (struct vdb_disk **pp = &disks; *pp; pp = &(*pp)->next)
    if (*pp == d) {
      *pp = d->next;
      break;
    }
  pthread_mutex_unlock(&bus_lock);
}

static void disk_unplug(struct vdb_disk *d)
{
  int r;

  pthread_mutex_lock(&d->lock);
  d->closing = true;
  pthread_mutex_unlock(&d->lock);
  pthread_mutex_lock(&d->fe_lock);
  if (d->fe) {
    d->fe->detach(d, d->fe_priv);
    d->fe = NULL;
    d->device[0] = '\0';
  }
  pthread_mutex_unlock(&d->fe_lock);
  disk_kick_users(d);
  disk_wait_idle(d);
  r = vdb_disk_flush_sync(d);
  if (r < 0)
    vdb_err("unplug %s: flush failed: %s", d->name, strerror(-r));
  disk_unlink(d);
  vdb_info("unplugged %s", d->name);
  vdb_disk_put(d);
}

int vdb_bus_unplug(const char *name, bool force)
{
  struct vdb_disk *d;
  int r;

  pthread_mutex_lock(&bus_lock);
  d = bus_find_locked(name);
  if (!d || d->closing) {
    pthread_mutex_unlock(&bus_lock);
    vdb_set_error("no disk named '%s'", name);
    return -ENOENT;
  }
  pthread_mutex_unlock(&bus_lock);
  if (atomic_load(&d->dependents) > 0) {
    char names[256];
    bus_dependent_names(d, names, sizeof names);
    vdb_set_error("disk '%s' is the base of %s; unplug %s first%s", name,
                  names[0] ? names : "an overlay", names[0] ? "them" : "it",
                  d->cfg.snapshot && atomic_load(&d->dependents) == 1 ?
                  " (or unplug --merge: fold its changes into the snapshot's storage)" : "");
    return -EBUSY;
  }
  if (!force) {
    r = disk_check_busy(d);
    if (r < 0)
      return r;
  }
  disk_unplug(d);
  bus_changed();
  return 0;
}

void vdb_bus_unplug_all(void)
{
  struct vdb_disk *d;

  for (;;) {
    /* Overlays before their bases. */
    pthread_mutex_lock(&bus_lock);
    for (d = disks; d && atomic_load(&d->dependents) > 0; d = d->next)
      ;
    if (!d)
      d = disks;
    pthread_mutex_unlock(&bus_lock);
    if (!d)
      break;
    disk_unplug(d);
  }
}

/* ---- size changes made outside the bus ---- */

/* d stays valid: the backend calls this before its close() returns, and
 * close() comes before d is freed. */
int vdb_backend_set_size(void *handle, uint64_t size)
{
  struct vdb_disk *d;
  bool changed = false;

  pthread_mutex_lock(&bus_lock);
  for (d = disks; d; d = d->next)
    if (d->handle == handle && !d->closing)
      break;
  if (d && d->size != size) {
    if (atomic_load(&d->dependents) > 0) {
      vdb_warn("%s: the storage is now %llu bytes; the disk keeps %llu (overlays use it)",
               d->name, (unsigned long long)size, (unsigned long long)d->size);
    } else {
      vdb_info("%s: size changed from %llu to %llu bytes", d->name,
               (unsigned long long)d->size, (unsigned long long)size);
      /* Readers (request checks, NBD handshakes) read it unlocked. */
      __atomic_store_n(&d->size, size, __ATOMIC_RELEASE);
      d->info.size = size;
      changed = true;
    }
  }
  pthread_mutex_unlock(&bus_lock);
  if (!d)
    return -ENOENT;
  /* Not under bus_lock: a frontend may need its worker loop (FUSE), which
   * may be waiting for bus_lock. */
  pthread_mutex_lock(&d->fe_lock);
  if (changed && !atomic_load(&d->closing) && d->fe && d->fe->resize)
    d->fe->resize(d, d->fe_priv);
  pthread_mutex_unlock(&d->fe_lock);
  return 0;
}

/* ---- snapshot and commit ---- */

#define BUS_PAUSE_MS 30000

static int snapshot_check(struct vdb_disk *d, const struct vdb_disk_config *snap_cfg)
{
  struct vdb_disk *other;
  int r;

  if (d->cfg.snapshot) {
    vdb_set_error("disk '%s' is a snapshot already (it never changes); clone it instead", d->name);
    return -EINVAL;
  }
  if (atomic_load(&d->dependents) > 0) {
    char names[256];
    bus_dependent_names(d, names, sizeof names);
    vdb_set_error("disk '%s' is the base of %s and cannot change: snapshot %s instead", d->name,
                  names, names);
    return -EBUSY;
  }
  r = bus_check_name(snap_cfg->name);
  if (r < 0)
    return r;
  if (vdb_bus_get(snap_cfg->name, &other) == 0) {
    vdb_disk_put(other);
    vdb_set_error("a disk named '%s' is already plugged", snap_cfg->name);
    return -EEXIST;
  }
  if (strcmp(snap_cfg->attach, "auto") != 0) {
    const struct vdb_frontend_ops *fe;
    r = vdb_frontend_find(snap_cfg->attach, &fe);
    if (r == 0 && fe)
      r = fe->probe();
    if (r < 0)
      return r;
  }
  return 0;
}

/* The snapshot disk: d's configuration, read-only, under its own name. */
static int snapshot_create(struct vdb_disk *d, const struct vdb_disk_config *snap_cfg,
                           struct vdb_disk **out)
{
  struct vdb_disk_config cfg = d->cfg;
  struct vdb_disk *s;
  int r;

  snprintf(cfg.name, sizeof cfg.name, "%s", snap_cfg->name);
  snprintf(cfg.attach, sizeof cfg.attach, "%s", snap_cfg->attach);
  cfg.export = snap_cfg->export;
  /* Read-only by being a snapshot: its storage stays open for writing, so
   * that unplug --merge can fold its overlay's changes back into it. */
  cfg.snapshot = true;
  cfg.fe_state[0] = '\0';
  r = disk_create(&cfg, &s);
  if (r < 0)
    return r;
  snprintf(s->name, sizeof s->name, "%s", cfg.name);
  s->block_size = d->block_size;
  s->export = cfg.export;
  *out = s;
  return 0;
}

/* The overlay that d becomes: cow over the snapshot. */
static int snapshot_overlay_params(struct vdb_disk *d, struct vdb_disk *s, const char *store,
                                   struct vdb_params *p)
{
  vdb_params_init(p);
  if (vdb_params_set(p, "base", s->name) < 0 || vdb_params_set(p, "store", store) < 0 ||
      (d->cfg.readonly && vdb_params_set(p, "readonly", "1") < 0)) {
    vdb_params_clear(p);
    return -ENOMEM;
  }
  return 0;
}

/* With d paused: move its storage to s, register s, open the overlay and
 * make it d's storage. */
static int snapshot_swap(struct vdb_disk *d, struct vdb_disk *s, const char *store)
{
  struct vdb_backend_info ci;
  struct vdb_params p;
  void *cowh;
  int r = vdb_disk_flush_sync(d);

  if (r < 0) {
    vdb_set_error("snapshot of '%s': flush failed: %s", d->name, strerror(-r));
    return r;
  }
  s->ops = d->ops;
  s->handle = d->handle;
  s->info = d->info;
  s->size = d->size;
  disk_derive_caps(s);
  r = bus_register(s);
  if (r < 0)
    goto err_s;
  r = snapshot_overlay_params(d, s, store, &p);
  if (r < 0)
    goto err_unlink;
  r = backend_open(&vdb_backend_cow, &p, &cowh, &ci);
  if (r < 0) {
    vdb_params_clear(&p);
    goto err_unlink;
  }
  if (ci.size != d->size) {
    vdb_backend_cow.close(cowh);
    vdb_params_clear(&p);
    vdb_set_error("snapshot of '%s': the overlay's size differs from the disk's", d->name);
    r = -EIO;
    goto err_unlink;
  }
  d->ops = &vdb_backend_cow;
  d->handle = cowh;
  d->info = ci;
  snprintf(d->cfg.backend, sizeof d->cfg.backend, "%s", vdb_backend_cow.name);
  vdb_params_clear(&d->cfg.params);
  d->cfg.params = p;
  disk_derive_caps(d);
  return 0;

err_unlink:
  disk_unlink(s);
err_s:
  s->handle = NULL; /* still d's */
  return r;
}

/* A backend-native snapshot (ops->snapshot): with d paused and flushed the
 * backend makes it and says how to open it; it is plugged as a read-only
 * snapshot disk with those parameters, and d stays as it is. */
static int snapshot_native(struct vdb_disk *d, const struct vdb_disk_config *snap_cfg,
                           struct vdb_disk **out)
{
  struct vdb_disk_config cfg;
  int r = vdb_disk_pause(d, BUS_PAUSE_MS);

  if (r < 0) {
    vdb_set_error("snapshot of '%s': requests still in flight after %d s", d->name,
                  BUS_PAUSE_MS / 1000);
    return r;
  }
  memset(&cfg, 0, sizeof cfg);
  vdb_params_init(&cfg.params);
  r = vdb_disk_flush_sync(d);
  if (r < 0)
    vdb_set_error("snapshot of '%s': flush failed: %s", d->name, strerror(-r));
  else
    r = d->ops->snapshot(d->handle, snap_cfg->name, &cfg.params);
  vdb_disk_resume(d);
  if (r < 0)
    goto out;
  snprintf(cfg.name, sizeof cfg.name, "%s", snap_cfg->name);
  snprintf(cfg.backend, sizeof cfg.backend, "%s", d->cfg.backend);
  snprintf(cfg.attach, sizeof cfg.attach, "%s", snap_cfg->attach);
  cfg.block_size = d->block_size;
  cfg.export = snap_cfg->export;
  cfg.readonly = cfg.snapshot = true;
  r = vdb_bus_plug(&cfg, out);
  if (r < 0) {
    char why[512];
    snprintf(why, sizeof why, "%s", vdb_get_error());
    vdb_set_error("snapshot of '%s' taken by its backend, but plugging it failed: %s", d->name,
                  why);
  } else
    vdb_info("snapshot %s of %s taken by backend %s", snap_cfg->name, d->name, d->cfg.backend);
out:
  vdb_params_clear(&cfg.params);
  return r;
}

int vdb_bus_snapshot(const char *name, const struct vdb_disk_config *snap_cfg,
                     const char *store, struct vdb_disk **out)
{
  struct vdb_disk *d, *s;
  int r;

  if (vdb_bus_get(name, &d) < 0) {
    vdb_set_error("no disk named '%s'", name);
    return -ENOENT;
  }
  r = snapshot_check(d, snap_cfg);
  if (r == 0 && d->ops->snapshot) {
    r = snapshot_native(d, snap_cfg, out);
    goto out;
  }
  if (r == 0)
    r = snapshot_create(d, snap_cfg, &s);
  if (r < 0)
    goto out;
  r = vdb_disk_pause(d, BUS_PAUSE_MS);
  if (r < 0) {
    vdb_set_error("snapshot of '%s': requests still in flight after %d s", name, BUS_PAUSE_MS / 1000);
    vdb_disk_put(s);
    goto out;
  }
  r = snapshot_swap(d, s, store);
  vdb_disk_resume(d);
  if (r < 0) {
    vdb_disk_put(s);
    goto out;
  }
  vdb_info("snapshot %s of %s taken; %s is now an overlay (store %s)", s->name, name, name, store);
  if (disk_attach(s) < 0)
    vdb_warn("snapshot %s: attach %s failed: %s (the snapshot is there, unattached)", s->name,
             s->cfg.attach, vdb_get_error());
  vdb_clear_error();
  bus_changed();
  if (out) {
    vdb_disk_get(s);
    *out = s;
  }
out:
  vdb_disk_put(d);
  return r;
}

static int commit_check(struct vdb_disk *d)
{
  struct vdb_disk *base;

  if (d->ops != &vdb_backend_cow) {
    vdb_set_error("disk '%s' is not an overlay (backend %s): nothing to commit", d->name,
                  d->cfg.backend);
    return -EINVAL;
  }
  base = vdb_cow_base(d->handle);
  if (base->cfg.snapshot) {
    vdb_set_error("the base of '%s' is the snapshot '%s', which never changes: "
                  "nothing can be committed into it", d->name, base->name);
    return -EPERM;
  }
  if (base->readonly || d->readonly) {
    vdb_set_error("cannot commit '%s' into '%s': %s is read-only", d->name, base->name,
                  d->readonly ? d->name : base->name);
    return -EPERM;
  }
  if (atomic_load(&base->dependents) > 1) {
    char names[256];
    bus_dependent_names(base, names, sizeof names);
    vdb_set_error("cannot commit '%s' into '%s': it is also the base of other overlays (%s)",
                  d->name, base->name, names);
    return -EBUSY;
  }
  return 0;
}

int vdb_bus_commit(const char *name, uint64_t *bytes)
{
  struct vdb_disk *d;
  int r;

  *bytes = 0;
  if (vdb_bus_get(name, &d) < 0) {
    vdb_set_error("no disk named '%s'", name);
    return -ENOENT;
  }
  r = commit_check(d);
  if (r < 0)
    goto out;
  r = vdb_disk_pause(d, BUS_PAUSE_MS);
  if (r < 0) {
    vdb_set_error("commit of '%s': requests still in flight after %d s", name, BUS_PAUSE_MS / 1000);
    goto out;
  }
  vdb_cow_commit_begin(d->handle);
  vdb_disk_resume(d);
  r = vdb_cow_commit_run(d->handle, bytes);
  {
    bool paused = vdb_disk_pause(d, BUS_PAUSE_MS) == 0;
    vdb_cow_commit_finish(d->handle, paused);
    if (paused)
      vdb_disk_resume(d);
  }
  if (r == 0)
    vdb_info("committed %llu bytes of %s into %s", (unsigned long long)*bytes, name,
             vdb_cow_base(d->handle)->name);
out:
  vdb_disk_put(d);
  return r;
}

/* ---- dropping a snapshot: its one overlay's changes merged into it ---- */

/* The only overlay of s, with a reference; NULL if there are 0 or several. */
static struct vdb_disk *bus_sole_overlay(struct vdb_disk *s)
{
  struct vdb_disk *o = NULL;
  int n = 0;

  pthread_mutex_lock(&bus_lock);
  for (struct vdb_disk *x = disks; x; x = x->next)
    if (x->ops == &vdb_backend_cow && x->handle && vdb_cow_base(x->handle) == s) {
      o = x;
      n++;
    }
  if (n == 1)
    vdb_disk_get(o);
  else
    o = NULL;
  pthread_mutex_unlock(&bus_lock);
  return o;
}

static int merge_check(struct vdb_disk *s, struct vdb_disk *o)
{
  if (!s->cfg.snapshot) {
    vdb_set_error("disk '%s' is not a snapshot: only a snapshot's storage takes its overlay's "
                  "changes (use 'vdbus commit' for other bases)", s->name);
    return -EINVAL;
  }
  if (!o) {
    vdb_set_error("snapshot '%s' has %d overlays: --merge needs exactly one", s->name,
                  atomic_load(&s->dependents));
    return -EBUSY;
  }
  if (s->nusers > 0) {
    vdb_set_error("snapshot '%s' has NBD clients; disconnect them first", s->name);
    return -EBUSY;
  }
  if (s->fe && s->fe->busy(s, s->fe_priv) > 0) {
    vdb_set_error("snapshot '%s': %s is in use (mounted or held open)", s->name, s->device);
    return -EBUSY;
  }
  if (s->info.readonly || o->readonly || s->cfg.readonly) {
    vdb_set_error("cannot merge '%s' into '%s': %s is read-only", o->name, s->name,
                  o->readonly ? o->name : s->name);
    return -EPERM;
  }
  return 0;
}

/* With o paused: o takes s's storage (its own changes are in it now). */
static void merge_pivot(struct vdb_disk *o, struct vdb_disk *s)
{
  struct vdb_params p;

  vdb_params_init(&p);
  for (int i = 0; i < s->cfg.params.n; i++)
    if (strcmp(s->cfg.params.key[i], "readonly") != 0)
      vdb_params_set(&p, s->cfg.params.key[i], s->cfg.params.val[i]);
  o->ops = s->ops;
  o->handle = s->handle;
  o->info = s->info;
  s->handle = NULL;
  snprintf(o->cfg.backend, sizeof o->cfg.backend, "%s", s->cfg.backend);
  vdb_params_clear(&o->cfg.params);
  o->cfg.params = p;
  disk_derive_caps(o);
}

/* Copy o's changes into s (writable for the bus meanwhile), o paused at the
 * end.  0 or -errno; on an error o runs on as it was. */
static int merge_commit(struct vdb_disk *o, struct vdb_disk *s, uint64_t *bytes)
{
  int r = vdb_disk_pause(o, BUS_PAUSE_MS);

  if (r < 0) {
    vdb_set_error("merge of '%s': requests still in flight after %d s", o->name, BUS_PAUSE_MS / 1000);
    return r;
  }
  vdb_cow_commit_begin(o->handle);
  vdb_disk_resume(o);
  s->readonly = false;
  r = vdb_cow_commit_run(o->handle, bytes);
  if (vdb_disk_pause(o, BUS_PAUSE_MS) < 0) {
    vdb_cow_commit_finish(o->handle, false);
    s->readonly = true;
    vdb_set_error("merge of '%s': requests still in flight after %d s", o->name, BUS_PAUSE_MS / 1000);
    return -ETIMEDOUT;
  }
  vdb_cow_commit_finish(o->handle, true);
  s->readonly = true;
  if (r < 0)
    vdb_disk_resume(o);
  return r;
}

int vdb_bus_merge_snapshot(const char *name, uint64_t *bytes)
{
  struct vdb_disk *s, *o;
  void *cowh;
  char store[PATH_MAX];
  int r;

  *bytes = 0;
  if (vdb_bus_get(name, &s) < 0) {
    vdb_set_error("no disk named '%s'", name);
    return -ENOENT;
  }
  o = bus_sole_overlay(s);
  r = merge_check(s, o);
  if (r < 0)
    goto out;
  if (s->fe) {
    s->fe->detach(s, s->fe_priv);
    s->fe = NULL;
    s->device[0] = '\0';
  }
  r = merge_commit(o, s, bytes);
  if (r < 0)
    goto out;
  cowh = o->handle;
  vdb_cow_store_path(cowh, store, sizeof store);
  merge_pivot(o, s);
  vdb_disk_resume(o);
  vdb_backend_cow.close(cowh); /* drops the overlay's hold on s */
  pthread_mutex_lock(&s->lock);
  s->closing = true;
  pthread_mutex_unlock(&s->lock);
  disk_unlink(s);
  vdb_disk_put(s); /* the registry's */
  if (store[0] && strncmp(store, vdb_bus_settings.state_dir, strlen(vdb_bus_settings.state_dir)) == 0 &&
      unlink(store) == 0)
    vdb_info("removed the merged overlay store %s", store);
  vdb_info("snapshot %s dropped: %llu bytes of %s merged into its storage, which %s now uses",
           name, (unsigned long long)*bytes, o->name, o->name);
  bus_changed();
out:
  if (o)
    vdb_disk_put(o);
  vdb_disk_put(s);
  return r;
}
