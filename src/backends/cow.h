/* vdbus — backend "cow": a copy-on-write overlay over another plugged disk.
 * What the bus needs beyond the ops table (snapshot and commit). */
#ifndef VDB_BACKENDS_COW_H
#define VDB_BACKENDS_COW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bus/bus.h"

extern const struct vdb_backend_ops vdb_backend_cow;

/* The base disk of an overlay instance (borrowed reference). */
struct vdb_disk *vdb_cow_base(void *handle);

/* The path of a file store into buf, or "" for a RAM store. */
void vdb_cow_store_path(void *handle, char *buf, size_t len);

/* Commit, in three steps (the bus pauses the overlay around 1 and 3):
 * 1. begin: mark every chunk the store holds as being committed;
 * 2. run: copy those chunks into the base (writes to a chunk being copied
 *    wait for it; chunks rewritten meanwhile stay in the overlay), then
 *    flush the base; *bytes = bytes copied.  Blocks; not on a worker loop.
 * 3. finish: free the store space of the copied chunks (if punch: only
 *    safe while the overlay is paused, as reads may be in flight) and
 *    persist the chunk map.
 * On an error from run, finish still has to be called (it puts chunks not
 * copied back as overlay data). */
void vdb_cow_commit_begin(void *handle);
int vdb_cow_commit_run(void *handle, uint64_t *bytes);
void vdb_cow_commit_finish(void *handle, bool punch);

#endif
