/* vdbus — block-device helpers shared by the frontends: is a device in use,
 * sysfs reads, lazy unmounts of stale mounts.  Control thread; may block. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "common/log.h"
#include "common/loop.h"
#include "frontends/blkdev.h"

static bool has_prefix(const char *s, const char *prefix)
{
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Read a small sysfs file into buf without the trailing newline.
 * 0 or -errno. */
int vdb_sysfs_read(const char *path, char *buf, size_t len)
{
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  ssize_t n;

  if (fd < 0)
    return -errno;
  n = read(fd, buf, len - 1);
  if (n < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  close(fd);
  while (n > 0 && buf[n - 1] == '\n')
    n--;
  buf[n] = '\0';
  return 0;
}

/* Does another process hold an fd on the block device rdev (or path)? */
static bool proc_holds(const char *devpath, dev_t rdev)
{
  DIR *proc = opendir("/proc");
  struct dirent *pe;
  pid_t self = getpid();
  bool found = false;

  if (!proc)
    return false;
  while (!found && (pe = readdir(proc))) {
    char fddir[64];
    DIR *fds;
    struct dirent *fe;
    char *end;
    long pid = strtol(pe->d_name, &end, 10);

    if (*end || pid <= 0 || pid == self)
      continue;
    snprintf(fddir, sizeof fddir, "/proc/%ld/fd", pid);
    fds = opendir(fddir);
    if (!fds)
      continue;
    while (!found && (fe = readdir(fds))) {
      char link[PATH_MAX], target[PATH_MAX];
      struct stat st;
      ssize_t n;

      if (fe->d_name[0] == '.')
        continue;
      snprintf(link, sizeof link, "%s/%s", fddir, fe->d_name);
      n = readlink(link, target, sizeof target - 1);
      if (n <= 0)
        continue;
      target[n] = '\0';
      if (strcmp(target, devpath) == 0)
        found = true;
      else if (has_prefix(target, "/dev/") && stat(link, &st) == 0 &&
               S_ISBLK(st.st_mode) && st.st_rdev == rdev)
        found = true;
    }
    closedir(fds);
  }
  closedir(proc);
  return found;
}

/* Has /sys/dev/block/MAJ:MIN/holders any entry (device-mapper, md, …)? */
static bool has_holders(dev_t rdev)
{
  char path[64];
  DIR *dir;
  struct dirent *e;
  bool any = false;

  snprintf(path, sizeof path, "/sys/dev/block/%u:%u/holders", major(rdev), minor(rdev));
  dir = opendir(path);
  if (!dir)
    return false;
  while (!any && (e = readdir(dir)))
    if (e->d_name[0] != '.')
      any = true;
  closedir(dir);
  return any;
}

int vdb_blkdev_wait_gone(const char *path, unsigned max_ms, unsigned busy_after_ms,
                         const char *devpath, dev_t rdev)
{
  for (unsigned ms = 0; ms < max_ms; ms += 10) {
    if (access(path, F_OK) < 0)
      return 0;
    if (ms == busy_after_ms && vdb_blkdev_busy(devpath, rdev) == 1)
      return 1;
    vdb_sleep_ms(10);
  }
  return -ETIMEDOUT;
}

int vdb_blkdev_busy(const char *devpath, dev_t rdev)
{
  int fd = open(devpath, O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK);

  if (fd < 0)
    return errno == EBUSY ? 1 : -errno;
  close(fd);
  if (has_holders(rdev))
    return 1;
  return proc_holds(devpath, rdev) ? 1 : 0;
}

/* Undo mountinfo's octal escapes (\040 …) in place. */
static void unescape(char *s)
{
  char *o = s;

  for (; *s; s++) {
    if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
        s[3] >= '0' && s[3] <= '7') {
      *o++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
      s += 3;
    } else {
      *o++ = *s;
    }
  }
  *o = '\0';
}

/* Lazily unmount every mount under disks_dir.  Returns how many. */
int vdb_unmount_under(const char *disks_dir)
{
  FILE *f = fopen("/proc/self/mountinfo", "re");
  char line[4096];
  int n = 0;

  if (!f)
    return 0;
  while (fgets(line, sizeof line, f)) {
    char mnt[PATH_MAX];

    /* id parent major:minor root mount-point … */
    if (sscanf(line, "%*s %*s %*s %*s %4095s", mnt) != 1)
      continue;
    unescape(mnt);
    if (!has_prefix(mnt, disks_dir))
      continue;
    if (umount2(mnt, MNT_DETACH | UMOUNT_NOFOLLOW) == 0) {
      vdb_info("unmounted stale FUSE file %s", mnt);
      n++;
    } else {
      vdb_warn("unmount stale %s: %s", mnt, strerror(errno));
    }
  }
  fclose(f);
  return n;
}

