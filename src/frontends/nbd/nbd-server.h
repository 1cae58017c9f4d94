/* vdbus — the NBD export: the server side of the NBD protocol
 * (doc/proto.md of NetworkBlockDevice/nbd), serving every exported disk of
 * the bus on every listener. */
#ifndef VDB_NBD_SERVER_H
#define VDB_NBD_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include "bus/bus.h"
#include "common/loop.h"

struct vdb_nbd_settings {
  unsigned handshake_timeout_ms;   /* default 10000 */
  unsigned max_connections;        /* default 256 */
  unsigned coalesce_us;            /* pause for a busy client, 0 = never (default NBD_COALESCE_US) */
  unsigned poll_us;                /* poll for a quick client, 0 = never (default NBD_POLL_US) */
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
/* Serve disk d on fd, one end of a connected stream socket whose peer is
 * already in the transmission phase (the kernel's nbd driver): no handshake,
 * simple replies, transmission flags nbd_tflags(d, false).  The connection
 * takes fd (also on failure) and a reference to d; it is not counted
 * against max_connections and vdb_nbd_shutdown leaves it alone: it ends
 * when the peer disconnects or d is unplugged.  on_closed(arg), if not NULL,
 * runs on a worker thread once the connection is gone.  label names the
 * peer in logs.  Control thread.  0, or -errno (on_closed is not called). */
/* The transmission flags d is served with to a simple-reply client such as
 * the kernel's (NBD_FLAG_HAS_FLAGS, READ_ONLY, SEND_FLUSH, …). */
uint16_t vdb_nbd_tflags(const struct vdb_disk *d);
int vdb_nbd_serve_socket(struct vdb_disk *d, int fd, const char *label,
                         void (*on_closed)(void *arg), void *arg);

#endif
