/* vdbus — the bus: the registry of plugged disks, request validation,
 * capabilities, counters and disk lifetime.
 *
 * Threads and locks: plug/unplug run on the control thread.  Lookups
 * (vdb_bus_get) and request submission run on any thread.  The registry is
 * protected by bus_lock (bus.c); each disk has its own lock protecting its
 * user list.  Lock order: bus_lock, then disk->lock. */
#ifndef VDB_BUS_H
#define VDB_BUS_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <vdbus/backend.h>
#include "common/params.h"

#define VDB_NAME_MAX 64
#define VDB_DEVICE_MAX 64

struct vdb_frontend_ops;

/* What the user asked for when plugging a disk (and what bus.json keeps). */
struct vdb_disk_config {
  char name[VDB_NAME_MAX];       /* empty = pick vdN */
  char backend[32];              /* "ram", "file", … */
  struct vdb_params params;      /* backend parameters */
  uint32_t block_size;           /* 512 or 4096 */
  bool readonly;
  bool export;                   /* visible as an NBD export */
  char attach[16];               /* "auto", "ublk", "nbd-kernel", "loop", "none" */
  bool snapshot;                 /* a point-in-time snapshot: read-only, never changes */
  /* Set by the frontend at attach (e.g. a ublk device id) and persisted, so
   * that the frontend can take its device back after a daemon restart.
   * Empty when there is nothing to recover. */
  char fe_state[128];
};

struct vdb_disk_stats {
  _Atomic uint64_t reads, writes, flushes, trims, zeroes, caches, block_status;
  _Atomic uint64_t bytes_read, bytes_written;
  _Atomic uint64_t errors;
  _Atomic uint64_t inflight;
};

/* Someone holding the disk open (an NBD connection, …).  kick() is called,
 * from the control thread with no bus lock held, when the disk is being
 * unplugged: the user must finish its in-flight requests, stop submitting,
 * and then call vdb_disk_remove_user() (from any thread). */
struct vdb_disk_user {
  void (*kick)(struct vdb_disk_user *u);
  void *arg;
  struct vdb_disk_user *next, *prev;
};

struct vdb_disk {
  char name[VDB_NAME_MAX];
  struct vdb_disk_config cfg;          /* as plugged, for persistence */
  const struct vdb_backend_ops *ops;
  void *handle;                         /* backend instance */
  struct vdb_backend_info info;

  uint64_t size;                        /* bytes */
  uint32_t block_size;                  /* 512 or 4096: logical block for attach */
  bool readonly;
  bool export;

  /* Capabilities, derived once at plug time. */
  bool can_write, can_flush, can_fua, can_trim, can_zero, can_fast_zero,
       can_cache, can_extents, can_multi_conn;

  /* Local attachment (NULL fe when not attached). */
  const struct vdb_frontend_ops *fe;
  void *fe_priv;
  char device[VDB_DEVICE_MAX];          /* "/dev/loop3" or "" */
  pthread_mutex_t fe_lock;              /* serializes detach with fe->resize */

  struct vdb_disk_stats stats;

  /* Layering.  While overlays (cow disks) use this disk as their base it is
   * read-only to everyone else: writes fail with EPERM. */
  _Atomic int dependents;

  /* Pausing (snapshot, commit): while paused, submitted requests wait in
   * paused_reqs (under lock) and are resubmitted at resume. */
  _Atomic bool paused;
  struct vdb_req *paused_head, **paused_tail;

  /* Lifetime. */
  _Atomic int refs;                     /* registry holds one */
  _Atomic bool closing;                 /* being unplugged: no new users */
  pthread_mutex_t lock;                 /* protects users, nusers */
  pthread_cond_t cond;                  /* signalled when users leave / inflight drops */
  struct vdb_disk_user *users;
  int nusers;
  struct vdb_disk *next;                /* registry list, under bus_lock */
};

/* Global settings (set by vdbusd before plugging anything). */
struct vdb_bus_settings {
  char run_dir[256];
  char state_dir[256];
  unsigned queues;    /* ublk queues / kernel NBD connections per device;
                         0 = one per CPU, at most VDB_QUEUES_DEFAULT_MAX */
};
#define VDB_QUEUES_DEFAULT_MAX 4
#define VDB_QUEUES_MAX 16
extern struct vdb_bus_settings vdb_bus_settings;

/* Plug a disk: open the backend, derive capabilities, attach locally as
 * cfg->attach says, register.  Control thread.  Returns 0 and a new
 * reference in *out (may be NULL), or -errno with vdb_set_error(). */
int vdb_bus_plug(const struct vdb_disk_config *cfg, struct vdb_disk **out);
/* Unplug: refuse with -EBUSY if the attached device is in use and !force;
 * kick users and wait for them, flush, detach, close.  Control thread. */
int vdb_bus_unplug(const char *name, bool force);
/* Unplug everything (shutdown).  Control thread. */
void vdb_bus_unplug_all(void);

/* The name PREFIX<N> with the smallest N >= first that no plugged disk has
 * (as plug picks vdN).  Any thread. */
void vdb_bus_free_name(const char *prefix, unsigned first, char *name, size_t len);

/* Look a disk up by name and take a reference.  -ENOENT if there is no such
 * disk (or it is being unplugged).  Any thread. */
int vdb_bus_get(const char *name, struct vdb_disk **out);
void vdb_disk_get(struct vdb_disk *d);
void vdb_disk_put(struct vdb_disk *d);

/* All plugged disks, each with a reference, in plug order.  Caller frees
 * with vdb_bus_list_free().  Returns the count or -ENOMEM. */
int vdb_bus_list(struct vdb_disk ***out);
void vdb_bus_list_free(struct vdb_disk **v, int n);

/* Register as a user (0), or -ESHUTDOWN if the disk is being unplugged. */
int vdb_disk_add_user(struct vdb_disk *d, struct vdb_disk_user *u);
void vdb_disk_remove_user(struct vdb_disk *d, struct vdb_disk_user *u);

/* Submit a request.  Validates it (range: -EINVAL, or -ENOSPC for writes
 * past the end; read-only: -EPERM; capability: -EOPNOTSUPP) and hands it to
 * the backend.  req->done is always called exactly once, possibly before
 * this returns.  Any thread. */
void vdb_disk_submit(struct vdb_disk *d, struct vdb_req *req);

/* Submit flags. */
#define VDB_SUBMIT_INTERNAL (1u << 0) /* from the bus or a layer above: passes a
                                         pause and writes a base with overlays */
void vdb_disk_submit_flags(struct vdb_disk *d, struct vdb_req *req, unsigned flags);

/* Write data at hand straight into the disk's storage (backend op
 * write_direct): fill(dst, len, arg) puts at most len bytes at dst and
 * returns how many.  Checks like a WRITE's (-EPERM, -ENOSPC); -EOPNOTSUPP
 * when the backend has no write_direct; -EAGAIN while the disk is paused
 * (the caller then writes through a normal request).  Counted as in flight
 * while it runs, so a pause waits for it.  first: the first part of a client
 * write (for the write counter).  Returns bytes stored or -errno.  Any
 * thread; never blocks. */
ssize_t vdb_disk_write_direct(struct vdb_disk *d, uint64_t offset, uint64_t len, bool first,
                              ssize_t (*fill)(void *dst, size_t len, void *arg), void *arg);

/* Run one request synchronously (control path, or any thread that is not a
 * worker loop waiting on itself): 0 or -errno.  With VDB_SUBMIT_INTERNAL
 * semantics. */
int vdb_disk_io_sync(struct vdb_disk *d, struct vdb_req *req);
/* Flush synchronously (control path): 0 or -errno. */
int vdb_disk_flush_sync(struct vdb_disk *d);

/* Is the disk writable right now (not read-only, no overlays on it)? */
static inline bool vdb_disk_is_writable(struct vdb_disk *d)
{
  return !d->readonly && atomic_load_explicit(&d->dependents, memory_order_relaxed) == 0;
}

/* Hold new requests and wait (up to timeout_ms) until none is in flight:
 * 0, or -ETIMEDOUT (then the disk is resumed).  Control thread. */
int vdb_disk_pause(struct vdb_disk *d, int timeout_ms);
/* Let held requests go (resubmitted from a worker loop). */
void vdb_disk_resume(struct vdb_disk *d);

/* Overlays: a layer using d as its base takes a reference and one of these. */
void vdb_disk_add_dependent(struct vdb_disk *d);
void vdb_disk_remove_dependent(struct vdb_disk *d);

/* Snapshot: d's current storage becomes a new read-only disk named snap
 * (attached and exported as snap_cfg says) and d carries on, without a
 * restart of its frontends, as an overlay (backend cow) over it, with its
 * changes in store ("ram" or "file:PATH").  Writes to d wait at most for
 * the drain and a flush.  Control thread.  0 and a reference in *out, or
 * -errno with vdb_set_error(). */
int vdb_bus_snapshot(const char *name, const struct vdb_disk_config *snap_cfg,
                     const char *store, struct vdb_disk **out);
/* Commit: write an overlay's changes into its base; the overlay stays,
 * empty.  Control thread; blocks while copying.  *bytes = bytes copied. */
int vdb_bus_commit(const char *name, uint64_t *bytes);
/* Drop the snapshot name that exactly one overlay layers over: the
 * overlay's changes are merged into the snapshot's storage, the overlay's
 * disk carries on with that storage, and the snapshot is unplugged.
 * Control thread; blocks while copying.  *bytes = bytes merged. */
int vdb_bus_merge_snapshot(const char *name, uint64_t *bytes);

/* Called by the bus whenever the set of disks changes (state persistence). */
extern void (*vdb_bus_on_change)(void);

#endif
