/* vdbus — the table of in-tree backends (explicit, no constructor tricks). */
#include <string.h>

#include "backends/registry.h"

const struct vdb_backend_ops *const vdb_backends[] = {
  &vdb_backend_ram,
  &vdb_backend_file,
  &vdb_backend_nbd,
  &vdb_backend_error,
  &vdb_backend_delay,
  &vdb_backend_trace,
  NULL,
};

const struct vdb_backend_ops *vdb_backend_find(const char *name)
{
  for (int i = 0; vdb_backends[i]; i++)
    if (strcmp(vdb_backends[i]->name, name) == 0)
      return vdb_backends[i];
  return NULL;
}
