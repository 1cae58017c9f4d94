/* vdbus — frontends: how a disk is seen by the local OS (loop over FUSE,
 * later ublk and kernel NBD).  The NBD *export* is not a frontend in this
 * sense: it is always on (see frontends/nbd/nbd-server.h). */
#ifndef VDB_FRONTEND_H
#define VDB_FRONTEND_H

#include <stddef.h>
#include "bus/bus.h"

struct vdb_frontend_ops {
  const char *name; /* Required: "loop" */

  /* Required.  Can this frontend work here (kernel feature, privileges)?
   * 0, or -ENODEV/-EPERM… with vdb_set_error() saying why. */
  int (*probe)(void);
  /* Required.  Attach d; fill device ("/dev/loop3").  Returns only when the
   * device exists.  0 and *priv, or -errno with vdb_set_error().
   * d->cfg.fe_state holds what this frontend saved at an earlier attach (a
   * daemon restart): recover that device if it still exists.  Set
   * d->cfg.fe_state to what a later start needs to recover (persisted). */
  int (*attach)(struct vdb_disk *d, void **priv, char *device, size_t devlen);
  /* Required.  1 if the device is mounted or held open by someone, 0 if
   * not, -errno if unknown. */
  int (*busy)(struct vdb_disk *d, void *priv);
  /* Required.  Detach; idempotent; copes with a half-attached state.
   * Requests in flight complete before it returns. */
  void (*detach)(struct vdb_disk *d, void *priv);
  /* Optional.  At daemon start: remove stale devices and mounts of our own
   * (after a kill -9), found under run_dir. */
  void (*cleanup_stale)(const char *run_dir);
  /* Optional.  At daemon start, after the saved disks were plugged back:
   * remove devices of ours that no restored disk recovered. */
  void (*cleanup_unclaimed)(void);
  /* Optional.  One line for `vdbus info` (queues, features…). */
  void (*describe)(struct vdb_disk *d, void *priv, char *buf, size_t len);
  /* Optional.  d->size changed (storage resized elsewhere): make the
   * device follow if it can.  Any thread but a worker loop's, under
   * d->fe_lock (never concurrently with detach); may block briefly. */
  void (*resize)(struct vdb_disk *d, void *priv);
};

extern const struct vdb_frontend_ops vdb_frontend_loop;
extern const struct vdb_frontend_ops vdb_frontend_ublk;
extern const struct vdb_frontend_ops vdb_frontend_nbd_kernel;

/* Find a frontend by name, or for "auto" the first whose probe succeeds
 * (NULL, 0 = none available).  -ENOENT for an unknown name. */
int vdb_frontend_find(const char *name, const struct vdb_frontend_ops **out);
void vdb_frontends_cleanup_stale(const char *run_dir);
void vdb_frontends_cleanup_unclaimed(void);
/* Queues (ublk) or connections (kernel NBD) per device: --queues, or one
 * per CPU up to VDB_QUEUES_DEFAULT_MAX. */
unsigned vdb_frontend_queues(void);

#endif
