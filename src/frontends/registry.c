/* vdbus — the table of local attach frontends.  "auto" picks the first
 * whose probe() succeeds, in table order (so the preferred frontends —
 * ublk, kernel NBD — go first once they exist). */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/log.h"
#include "frontends/frontend.h"

static const struct vdb_frontend_ops *const frontends[] = {
  &vdb_frontend_ublk,
  &vdb_frontend_nbd_kernel,
  &vdb_frontend_loop,
};

#define NR_FRONTENDS (sizeof frontends / sizeof frontends[0])

/* Find a frontend by name.  "none" and an "auto" with nothing available
 * give *out = NULL and 0; an unknown name gives -ENOENT with an error
 * message.  Control thread. */
int vdb_frontend_find(const char *name, const struct vdb_frontend_ops **out)
{
  *out = NULL;
  if (!name || !name[0] || strcmp(name, "none") == 0)
    return 0;
  if (strcmp(name, "auto") == 0) {
    for (size_t i = 0; i < NR_FRONTENDS; i++) {
      if (frontends[i]->probe() == 0) {
        *out = frontends[i];
        return 0;
      }
      vdb_dbg(VDB_DBG_BUS, "frontend %s unavailable: %s", frontends[i]->name,
              vdb_get_error());
    }
    vdb_clear_error();
    return 0;
  }
  for (size_t i = 0; i < NR_FRONTENDS; i++)
    if (strcmp(name, frontends[i]->name) == 0) {
      *out = frontends[i];
      return 0;
    }
  vdb_set_error("unknown attach frontend '%s' (known: auto, ublk, nbd-kernel, loop, none)", name);
  return -ENOENT;
}

/* At daemon start, before anything is plugged: let each frontend remove
 * devices and mounts left behind by a previous daemon.  Control thread. */
void vdb_frontends_cleanup_stale(const char *run_dir)
{
  for (size_t i = 0; i < NR_FRONTENDS; i++)
    if (frontends[i]->cleanup_stale)
      frontends[i]->cleanup_stale(run_dir);
}

/* After the saved bus state was restored: let each frontend remove what no
 * restored disk took back.  Control thread. */
void vdb_frontends_cleanup_unclaimed(void)
{
  for (size_t i = 0; i < NR_FRONTENDS; i++)
    if (frontends[i]->cleanup_unclaimed)
      frontends[i]->cleanup_unclaimed();
}

unsigned vdb_frontend_queues(void)
{
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

  if (vdb_bus_settings.queues)
    return vdb_bus_settings.queues;
  if (ncpu < 1)
    return 1;
  return ncpu > VDB_QUEUES_DEFAULT_MAX ? VDB_QUEUES_DEFAULT_MAX : (unsigned)ncpu;
}
