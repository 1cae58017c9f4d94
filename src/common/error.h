/* vdbus — a per-thread error message that travels with a -errno
 * (vdb_set_error() is declared in <vdbus/backend.h>). */
#ifndef VDB_ERROR_H
#define VDB_ERROR_H

#include <vdbus/backend.h>

/* The message last set on this thread, or "" if none. */
const char *vdb_get_error(void);
void vdb_clear_error(void);

#endif
