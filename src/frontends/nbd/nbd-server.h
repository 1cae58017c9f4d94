/* vdbus — the NBD export: the server side of the NBD protocol
 * (doc/proto.md of NetworkBlockDevice/nbd), serving every exported disk of
 * the bus on every listener. */
#ifndef VDB_NBD_SERVER_H
#define VDB_NBD_SERVER_H

#include <stddef.h>
#include "bus/bus.h"
#include "common/loop.h"

struct vdb_nbd_settings {
  unsigned handshake_timeout_ms;   /* default 10000 */
  unsigned max_connections;        /* default 256 */
};
extern struct vdb_nbd_settings vdb_nbd_settings;

/* Start listening on spec ("unix:PATH" or "tcp:HOST:PORT"); accepts run on
 * loop, connections are spread over the worker loops.  Control thread.
 * 0 or -errno with vdb_set_error(). */
int vdb_nbd_listen(struct vdb_loop *loop, const char *spec);
/* Close all listeners (no new connections).  Control thread. */
void vdb_nbd_stop_listening(void);
/* Disconnect every client after its in-flight requests finish; returns
 * when all connections are gone (or after timeout_ms).  Control thread. */
void vdb_nbd_shutdown(unsigned timeout_ms);
/* The URI of disk d on the first listener ("nbd+unix:///vd0?socket=…" or
 * "nbd://127.0.0.1:10809/vd0"); returns 0, or -ENOENT when not exported. */
int vdb_nbd_uri(const struct vdb_disk *d, char *buf, size_t len);

#endif
