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
/* Lazily unmount every mount point under dir (a prefix ending in '/').
 * Returns how many were unmounted. */
int vdb_unmount_under(const char *dir);

#endif
