/* vdbus — the table of in-tree backends. */
#ifndef VDB_BACKENDS_REGISTRY_H
#define VDB_BACKENDS_REGISTRY_H

#include <vdbus/backend.h>

extern const struct vdb_backend_ops vdb_backend_ram;
extern const struct vdb_backend_ops vdb_backend_file;
extern const struct vdb_backend_ops vdb_backend_nbd;
extern const struct vdb_backend_ops vdb_backend_error;
extern const struct vdb_backend_ops vdb_backend_delay;
extern const struct vdb_backend_ops vdb_backend_trace;

/* NULL if unknown. */
const struct vdb_backend_ops *vdb_backend_find(const char *name);
/* NULL-terminated table. */
extern const struct vdb_backend_ops *const vdb_backends[];

#endif
