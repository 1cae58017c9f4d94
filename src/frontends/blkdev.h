/* vdbus — block-device helpers shared by the frontends.  Control thread. */
#ifndef VDB_BLKDEV_H
#define VDB_BLKDEV_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* Read a small sysfs file into buf without the trailing newline: 0 or -errno. */
int vdb_sysfs_read(const char *path, char *buf, size_t len);
/* 1 if the block device (path, rdev) is mounted, claimed (O_EXCL fails),
 * has holders, or is held open by another process; 0 if not; -errno if the
 * device cannot be checked. */
int vdb_blkdev_busy(const char *devpath, dev_t rdev);
/* Wait, up to max_ms, until path (a sysfs node of the device) is gone.
 * After busy_after_ms, give up early if the device (devpath, rdev) is in
 * use (vdb_blkdev_busy).  0: gone; 1: still in use; -ETIMEDOUT. */
int vdb_blkdev_wait_gone(const char *path, unsigned max_ms, unsigned busy_after_ms,
                         const char *devpath, dev_t rdev);
/* Lazily unmount every mount point under dir (a prefix ending in '/').
 * Returns how many were unmounted. */
int vdb_unmount_under(const char *dir);

#endif
