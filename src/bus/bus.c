/* vdbus — the bus: registry of plugged disks, plug/unplug, lifetime.
 * Lock order: bus_lock, then disk->lock. */
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* Pick the name vdN with the smallest free N.  Under bus_lock. */
static void bus_pick_name(char *name, size_t len)
{
  for (unsigned i = 0;; i++) {
    snprintf(name, len, "vd%u", i);
    if (!bus_find_locked(name))
      return;
  }
}

static void disk_derive_caps(struct vdb_disk *d)
{
  const struct vdb_backend_ops *ops = d->ops;
  uint32_t off = d->info.caps_off;

  d->readonly = d->cfg.readonly || d->info.readonly || !ops->write;
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

static int disk_open_backend(struct vdb_disk *d)
{
  struct vdb_backend_info *info = &d->info;
  int r;

  d->ops = vdb_backend_find(d->cfg.backend);
  if (!d->ops) {
    vdb_set_error("unknown backend '%s'", d->cfg.backend);
    return -ENOENT;
  }
  info->can_multi_conn = true;
  info->min_block = 1;
  info->pref_block = 4096;
  info->max_block = 32u << 20;
  vdb_clear_error();
  r = d->ops->open(&d->cfg.params, &d->handle, info);
  if (r < 0) {
    d->handle = NULL;
    if (!vdb_get_error()[0])
      vdb_set_error("%s backend: %s", d->cfg.backend, strerror(-r));
    return r;
  }
  d->size = info->size;
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
  pthread_cond_init(&d->cond, NULL);
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
    bus_pick_name(d->cfg.name, sizeof d->cfg.name);
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

  pthread_mutex_lock(&bus_lock);
  {
    struct vdb_disk **pp = &disks;
    while (*pp)
      pp = &(*pp)->next;
    *pp = d;
  }
  pthread_mutex_unlock(&bus_lock);
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
  if (d->fe) {
    d->fe->detach(d, d->fe_priv);
    d->fe = NULL;
    d->device[0] = '\0';
  }
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
    pthread_mutex_lock(&bus_lock);
    d = disks;
    pthread_mutex_unlock(&bus_lock);
    if (!d)
      break;
    disk_unplug(d);
  }
}
