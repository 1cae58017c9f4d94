/* vdbus — string key/value parameters (struct vdb_params of <vdbus/backend.h>). */
#ifndef VDB_PARAMS_H
#define VDB_PARAMS_H

#include <vdbus/backend.h>

#define VDB_PARAMS_MAX 32

struct vdb_params {
  int n;
  char *key[VDB_PARAMS_MAX];
  char *val[VDB_PARAMS_MAX];
};

void vdb_params_init(struct vdb_params *p);
/* Set (or replace) key; copies both.  -E2BIG when full, -ENOMEM. */
int vdb_params_set(struct vdb_params *p, const char *key, const char *val);
void vdb_params_clear(struct vdb_params *p);
int vdb_params_copy(struct vdb_params *dst, const struct vdb_params *src);

#endif
