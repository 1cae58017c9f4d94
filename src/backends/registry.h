/* vdbus — the registry of backends: the in-tree table and the backends
 * loaded from plugins (shared objects in the plugin directories).
 *
 * Threads: the registry is filled on the main thread at start-up, before
 * any control request is served or any disk is plugged, and is read-only
 * from then until vdb_backend_plugins_unload() at exit; lookups take no
 * lock. */
#ifndef VDB_BACKENDS_REGISTRY_H
#define VDB_BACKENDS_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>

#include <vdbus/backend.h>

extern const struct vdb_backend_ops vdb_backend_ram;
extern const struct vdb_backend_ops vdb_backend_file;
extern const struct vdb_backend_ops vdb_backend_nbd;
extern const struct vdb_backend_ops vdb_backend_error;
extern const struct vdb_backend_ops vdb_backend_delay;
extern const struct vdb_backend_ops vdb_backend_trace;
#ifdef VDB_HAVE_RBD
extern const struct vdb_backend_ops vdb_backend_rbd;
#endif

/* The origin of an in-tree backend (a plugin's origin is its path). */
#define VDB_BACKEND_ORIGIN_BUILTIN "built-in"

/* The backend called name, NULL if unknown.  Every ops the registry returns
 * is a whole current-size struct: the copy of a plugin's ops built against
 * an older header is widened with zeroes, so that fields it did not have
 * read as absent (NULL, 0). */
const struct vdb_backend_ops *vdb_backend_find(const char *name);
/* The i-th backend (the in-tree ones first, then plugins in load order), or
 * NULL past the end.  *origin (if origin is not NULL): "built-in" or the
 * plugin's path; valid as long as the backend is registered. */
const struct vdb_backend_ops *vdb_backend_at(size_t i, const char **origin);

/* Check an ops table against the rules of <vdbus/backend.h> (api_version,
 * struct_size, name, required fields).  Reads only the first struct_size
 * bytes of ops.  Returns 0, or -EINVAL with the reason in why. */
int vdb_backend_ops_check(const struct vdb_backend_ops *ops, char *why, size_t len);
/* Register a backend from a plugin: check ops, refuse a name that is taken
 * (-EEXIST), and keep a copy widened to the current struct_size.  origin
 * (copied) is the plugin's path; dl (may be NULL) is dlclose'd at unload.
 * Returns 0 or -errno with the reason in why.  Main thread, start-up. */
int vdb_backend_register(const struct vdb_backend_ops *ops, const char *origin, void *dl,
                         char *why, size_t len);

/* Load every "*.so" in dir (plugin.c), in name order.  A plugin that cannot
 * be loaded or is refused is skipped with a warning naming its path and the
 * reason.  A missing dir is an error (-ENOENT, vdb_set_error) if required,
 * else silently nothing.  Returns the number of backends loaded or -errno.
 * Main thread, at start-up. */
int vdb_backend_plugins_load(const char *dir, bool required);
/* Forget every plugin backend and dlclose its object.  No disk may use one
 * any more (at exit, after vdb_bus_unplug_all). */
void vdb_backend_plugins_unload(void);

#endif
