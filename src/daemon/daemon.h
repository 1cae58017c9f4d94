/* vdbus — vdbusd internals shared by main.c, control.c and state.c. */
#ifndef VDB_DAEMON_H
#define VDB_DAEMON_H

#include <jansson.h>
#include "bus/bus.h"
#include "common/loop.h"

#define VDB_CONTROL_PROTOCOL 1

/* control.c */
/* Handle one control request object; returns a new reply object
 * ({"result": …} or {"errno": N, "error": "…"}).  Control thread. */
json_t *vdb_control_handle(json_t *req);
/* The JSON description of a disk (stats too when with_stats). */
json_t *vdb_control_disk_json(struct vdb_disk *d, bool with_stats);
/* Build a disk config from a plug request's args; 0 or -errno + message. */
int vdb_control_parse_plug(json_t *args, struct vdb_disk_config *cfg);
int vdb_control_listen(struct vdb_loop *loop, const char *path);
void vdb_control_close(void);

/* state.c */
/* Load <state_dir>/bus.json and plug its disks back.  -errno (with
 * vdb_set_error) if the file exists but cannot be read or parsed. */
int vdb_state_load(void);
/* Write the bus state (persistent disks) atomically.  0 or -errno. */
int vdb_state_save(void);

#endif
