/* vdbus — the backend API: where a virtual disk's data lives.
 *
 * This header is all a backend needs (plus libc); the manual page is
 * vdbus-backend(3), an example is examples/pattern/ in the source tree.
 *
 * A backend is a `const struct vdb_backend_ops` table, built into vdbusd or
 * loaded from a plugin (a shared object exporting vdb_backend_plugin_init(),
 * see the end of this file).  The in-tree backends use this same API.
 *
 * Instances.  vdbusd calls open() once per plugged disk with that disk's
 * parameters; the handle it sets is passed to every other callback, and
 * close() ends it.  A backend may be opened many times at once.
 *
 * What the bus guarantees (validated once, before any callback runs):
 *   - offset + len <= the size open() reported and len > 0 (zero-length
 *     requests are answered by the bus); FLUSH has no range (ignore offset
 *     and len);
 *   - no WRITE, TRIM or WRITE_ZEROES on a read-only disk (the plug asked
 *     for it, open() set info->readonly, or write is NULL);
 *   - no request for a callback that is NULL: a NULL callback means "not
 *     supported", and the bus derives the disk's capabilities (what NBD
 *     advertises, what ublk offers) from which callbacks are set, once, at
 *     open;
 *   - VDB_REQ_FUA only when flush is set;
 *   - for BLOCK_STATUS, max_extents >= 1;
 *   - no data-path callback before open() returned 0 or after close() was
 *     called; close() is called only when no request is in flight.
 * So a backend may assert() these instead of checking them.
 *
 * Threads.  open() and close() run on the control thread and may block.
 * Data-path callbacks (read, write, …) are called concurrently from several
 * threads (event-loop worker threads, FUSE threads, ublk queue threads), on
 * the same handle: the backend must be thread-safe.  They must not block for
 * long (they run on event loops shared by many disks): a slow backend
 * hands the request to its own thread and completes it from there.
 * Overlapping concurrent requests have no defined order (as on a disk).
 *
 * Completion.  Every data-path callback completes its request exactly once
 * with vdb_req_complete(req, 0 or -errno), either before returning (inline)
 * or later from any thread.  After vdb_req_complete() the request belongs
 * to its submitter again: do not touch it (it may already be freed).
 *
 * Errors.  Return (open) or complete with (data path) a negative errno:
 * -EIO for a media error, -ENOSPC, -EPERM, -ENOMEM, -EOPNOTSUPP (e.g.
 * FAST_ZERO that would be slow), -EINVAL.  Frontends map it to their wire
 * format (NBD error, ublk result).  open() should call vdb_set_error() with
 * a sentence for the user before failing: `vdbus plug` prints it.
 *
 * Versioning.  VDB_BACKEND_API_VERSION counts versions of this header.
 * Fields are only ever appended, to every struct, and never change
 * meaning.  A backend sets api_version = VDB_BACKEND_API_VERSION and
 * struct_size = sizeof(struct vdb_backend_ops) (VDB_BACKEND_OPS_INIT does
 * both).  vdbusd accepts a backend when
 *   1 <= api_version <= the vdbusd's VDB_BACKEND_API_VERSION,
 *   struct_size >= the size of the ops struct of that api_version (up to the
 *   end of its last field), and
 *   every byte past the end of the struct vdbusd knows is zero (a table
 *   built against a newer header is accepted by an older vdbusd only if it
 *   sets no field that vdbusd does not know);
 * it then keeps a copy of the first struct_size bytes, zero-filled up to its
 * own size, so that fields a backend built against an older header does not
 * have read as absent (NULL callbacks, 0 flags).  A backend built against a
 * newer header that wants to run on an older vdbusd sets api_version to the
 * older version, leaves the newer fields zero and does not use newer fields
 * of vdb_backend_info or vdb_req (the entry point is told the bus's
 * version).
 */
#ifndef VDBUS_BACKEND_H
#define VDBUS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VDB_BACKEND_API_VERSION 3

enum vdb_req_type {
  VDB_REQ_READ = 0,
  VDB_REQ_WRITE,
  VDB_REQ_FLUSH,
  VDB_REQ_TRIM,
  VDB_REQ_WRITE_ZEROES,
  VDB_REQ_CACHE,
  VDB_REQ_BLOCK_STATUS,
  VDB_REQ_NR_TYPES,
};

/* Request flags. */
#define VDB_REQ_FUA       (1u << 0) /* data is durable before completion */
#define VDB_REQ_NO_HOLE   (1u << 1) /* write_zeroes: allocate, do not punch */
#define VDB_REQ_FAST_ZERO (1u << 2) /* write_zeroes: fail -ENOTSUP if slow */
#define VDB_REQ_ONE       (1u << 3) /* block_status: one extent suffices */
/* READ, since API version 2 (a backend that ignores it is correct): the
 * submitter also accepts the data in the backend's own memory.  Instead of
 * filling buf, the backend may set buf to point at memory holding the data
 * that stays mapped until the backend is closed and changes only through
 * later writes, trims and zeroings of the disk (a RAM disk's pages, a
 * file's page cache through a shared mapping).  The submitter holds a
 * reference to the disk for as long as it uses that memory, and only hands
 * it to the kernel (vmsplice, sendmsg, a FUSE reply), never touches it
 * itself: a file truncated behind the backend's back makes it unreadable
 * (EFAULT), not a crash.  Concurrent writes to the range may then show in
 * the data, as they may for any read that overlaps them.  The NBD server
 * and the loop frontend ask for it on every read. */
#define VDB_REQ_MAP       (1u << 4)
/* READ with VDB_REQ_MAP: the submitter will pass the memory on by
 * reference (vmsplice into a socket), not copy it.  A backend whose memory
 * is dearer to copy from than its own copy would be (a file's page cache
 * through a mapping: page faults, and a TLB miss per 4 KiB page) answers
 * from it only when this is set.  The NBD server sets it on reads of 64 KiB
 * and more over a Unix socket. */
#define VDB_REQ_MAP_SPLICE (1u << 5)

/* Extent flags: the same bits as NBD's base:allocation context. */
#define VDB_EXTENT_HOLE (1u << 0) /* unallocated */
#define VDB_EXTENT_ZERO (1u << 1) /* reads as zeroes */

struct vdb_extent {
  uint64_t length;
  uint32_t flags;
};

struct vdb_disk;

/* One I/O request.  It belongs to the submitter (a frontend); the backend
 * owns it from the data-path call until it calls vdb_req_complete(), and
 * may read type, flags, offset, len, buf, extents and max_extents, write
 * *buf (READ), buf itself (READ with VDB_REQ_MAP), extents[] and
 * nr_extents (BLOCK_STATUS) and backend_priv,
 * and must leave every other field alone.  buf and extents stay valid
 * until completion, on any thread.
 *
 *   READ          fill buf[0, len) with the data at offset.
 *   WRITE         store buf[0, len) at offset; durable before completion
 *                 if VDB_REQ_FUA.
 *   FLUSH         make every completed write durable (no range).
 *   TRIM          the range may be discarded (reads after it: any data, or
 *                 zeroes); a hint, success may do nothing.
 *   WRITE_ZEROES  the range reads as zeroes after it; NO_HOLE: keep it
 *                 allocated; FAST_ZERO: fail with -EOPNOTSUPP rather than
 *                 be slower than writing zeroes.
 *   CACHE         prefetch the range (a hint).
 *   BLOCK_STATUS  describe [offset, offset + len) from offset onwards: fill
 *                 extents[0..nr_extents) with consecutive extents (the first
 *                 starts at offset), 1 <= nr_extents <= max_extents, each of
 *                 length > 0, together at most len (fewer is fine: the
 *                 client asks again for the rest); with VDB_REQ_ONE one
 *                 extent is enough.  flags: VDB_EXTENT_HOLE (not allocated)
 *                 and/or VDB_EXTENT_ZERO (reads as zeroes); 0 = data. */
struct vdb_req {
  /* Set by the submitter. */
  enum vdb_req_type type;
  uint32_t flags;                /* VDB_REQ_* */
  uint64_t offset;               /* bytes */
  uint64_t len;                  /* bytes */
  void *buf;                     /* READ: filled; WRITE: read.  len bytes */
  struct vdb_extent *extents;    /* BLOCK_STATUS: array the backend fills */
  uint32_t max_extents;          /* BLOCK_STATUS: capacity of extents, >= 1 */
  uint32_t nr_extents;           /* BLOCK_STATUS: set by the backend (0 on entry) */
  /* Called exactly once, on whichever thread completed the request.
   * err is 0 or a negative errno.  (The submitter's; a backend calls
   * vdb_req_complete(), never this.) */
  void (*done)(struct vdb_req *req, int err);
  void *opaque;                  /* for the submitter */

  /* Private to the bus. */
  struct vdb_disk *disk;

  /* Scratch space for the backend while it owns the request (so that an
   * asynchronous backend needs no allocation per request). */
  uint64_t backend_priv[8];
};

/* Complete a request: updates the disk's counters and calls req->done.
 * Exactly once per request, from any thread, err 0 or -errno.  The request
 * must not be touched afterwards. */
void vdb_req_complete(struct vdb_req *req, int err);

/* True once the request's disk is being unplugged.  A backend holding a
 * request back until an outside resource returns (a remote server) may then
 * fail it with -ESHUTDOWN instead of waiting longer.  Any thread. */
bool vdb_req_cancelled(const struct vdb_req *req);

/* Key/value parameters a backend is opened with ("size" = "4G", "path" = …),
 * from `vdbus plug NAME --param KEY=VALUE` (and the CLI's own options such as
 * --size).  Values are strings; the bus keeps them, so the pointers stay
 * valid during open() (copy what is needed later).  Unknown keys are the
 * backend's to refuse or ignore.  Control thread (open) only. */
struct vdb_params;
const char *vdb_params_get(const struct vdb_params *p, const char *key);
/* Parse a size parameter (K/M/G/T suffixes).  Returns 0 and *out, -ENOENT if
 * absent (and *out untouched), -EINVAL if malformed. */
int vdb_params_get_size(const struct vdb_params *p, const char *key, uint64_t *out);
/* A boolean parameter: absent = false; "1", "true", "yes", "on" = true. */
bool vdb_params_get_bool(const struct vdb_params *p, const char *key);
/* Appended in API version 2.  Set (or replace) key to val in p, copying
 * both: for the parameters a snapshot op fills.  Returns 0, -E2BIG when p
 * is full, -ENOMEM. */
int vdb_params_set(struct vdb_params *p, const char *key, const char *val);

/* Appended in API version 2.  The storage behind the open instance handle
 * changed size outside the bus (an image resized elsewhere): the disk's size
 * becomes size.  The bus only changes its size field (new requests are
 * checked against it; new NBD connections see it; `vdbus info` shows it);
 * requests in flight are not affected, and a disk that is the base of
 * overlays keeps its size (logged); a loop device follows (LOOP_SET_CAPACITY).
 * From a thread of the backend's own, not from a data-path callback (it may
 * wait for an event loop), after open() returned and before close()
 * returns; not while the caller holds a lock that close() takes.  Returns 0, or -ENOENT when no plugged disk has
 * that handle (yet: the plug is still under way; try again later). */
int vdb_backend_set_size(void *handle, uint64_t size);

/* Set a human-readable error message for the current thread, to be returned
 * to the user along with the -errno an open() callback fails with ("pattern
 * backend: --size is required").  Also the reason a plugin entry point
 * gives when it returns NULL. */
void vdb_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* What open() reports about the storage.  The bus zeroes it and sets the
 * defaults noted below before open(); open() sets size and changes what
 * differs. */
struct vdb_backend_info {
  uint64_t size;          /* bytes; need not be a multiple of the block size */
  bool readonly;          /* storage can only be read (e.g. file opened O_RDONLY) */
  bool can_multi_conn;    /* every connection sees the same data (default true) */
  bool volatile_cache;    /* writes need a flush to be durable */
  uint32_t min_block;     /* smallest useful I/O size, 1 if any (default 1) */
  uint32_t pref_block;    /* preferred I/O size (default 4096) */
  uint32_t max_block;     /* largest request (default 32 MiB) */
  char description[128];  /* shown by `vdbus info` */
  /* Appended in API version 1 (the bus zeroes the whole struct before open):
   * this instance's data does not outlive the daemon (as
   * VDB_BACKEND_VOLATILE, but decided at open, e.g. a RAM-backed overlay). */
  bool volatile_data;
  /* Appended in API version 1: VDB_CAP_* bits this instance does not have
   * although the backend has the callback (a remote server without trim,
   * say).  The bus then answers as if the callback were NULL. */
  uint32_t caps_off;
};

/* Bits of vdb_backend_info.caps_off. */
#define VDB_CAP_TRIM      (1u << 0) /* trim */
#define VDB_CAP_ZERO      (1u << 1) /* write_zeroes */
#define VDB_CAP_FLUSH     (1u << 2) /* flush (and FUA, which needs it) */
#define VDB_CAP_FUA       (1u << 3) /* FUA writes */
#define VDB_CAP_FAST_ZERO (1u << 4) /* VDB_REQ_FAST_ZERO */
#define VDB_CAP_EXTENTS   (1u << 5) /* block_status */
#define VDB_CAP_CACHE     (1u << 6) /* cache */

struct vdb_backend_ops {
  uint32_t api_version;   /* Required: VDB_BACKEND_API_VERSION */
  uint32_t struct_size;   /* Required: sizeof(struct vdb_backend_ops) */
  /* Required: 1-31 characters of [a-z0-9_-], not starting with '-', unique
   * on the bus ("ram", "file", …): `vdbus plug NAME`. */
  const char *name;
  const char *summary;    /* Required: one line of UTF-8, for `vdbus backends` */
  /* Required: the parameters, one per line ("size=SIZE   disk size"), for
   * `vdbus help backend NAME`. */
  const char *usage;
  /* Optional: the parameter that the CLI's positional argument sets
   * (`vdbus plug file PATH` sets "path"; one called "path" is made
   * absolute by the CLI); NULL = none. */
  const char *positional;

  /* Required.  Control path, may block.  Open the storage described by
   * params; fill *info.  Returns 0 and sets *handle, or -errno (after
   * vdb_set_error() with the reason). */
  int (*open)(const struct vdb_params *params, void **handle,
              struct vdb_backend_info *info);
  /* Required.  Control path, may block.  No request is in flight and none
   * will come; free the instance. */
  void (*close)(void *handle);

  /* Data path: complete req with vdb_req_complete().  NULL means "not
   * supported": the disk does not offer it and the bus answers for it. */
  void (*read)(void *handle, struct vdb_req *req);         /* Required */
  void (*write)(void *handle, struct vdb_req *req);        /* Optional: NULL = read-only */
  void (*flush)(void *handle, struct vdb_req *req);        /* Optional: NULL = nothing to flush
                                                              (flushes succeed, no FUA) */
  void (*trim)(void *handle, struct vdb_req *req);         /* Optional: NULL = no trim/discard */
  void (*write_zeroes)(void *handle, struct vdb_req *req); /* Optional: NULL = not offered
                                                              (clients write zeroes themselves) */
  void (*cache)(void *handle, struct vdb_req *req);        /* Optional: NULL = no-op */
  void (*block_status)(void *handle, struct vdb_req *req); /* Optional: NULL = all data */

  uint32_t flags;         /* Optional: VDB_BACKEND_* (unknown bits are refused) */

  /* Appended in API version 2. */
  /* Optional: create a backend-native snapshot called snap_name (e.g. an
   * RBD snapshot) of the instance's current data, and fill snap_params
   * (empty on entry; the bus frees it) with the parameters that open that
   * snapshot, read-only, with this same backend.  Control thread, may
   * block; the bus has paused the disk (nothing in flight) and flushed it.
   * Returns 0 or -errno after vdb_set_error().  NULL: `vdbus snapshot`
   * uses a copy-on-write overlay instead. */
  int (*snapshot)(void *handle, const char *snap_name, struct vdb_params *snap_params);

  /* Appended in API version 3. */
  /* Optional: take a write's data straight into the disk's storage.  Call
   * fill(dst, len, arg) once, where dst is where bytes [offset, offset+len)
   * of the disk live; fill stores at most len bytes from dst on and returns
   * how many (>= 0) or -errno.  Record the bytes it stored as written and
   * return fill's result.  Synchronous, any thread, must not block (fill
   * does not: it copies data already at hand, e.g. a non-blocking recv).
   * The bus has checked the range and that the disk is writable and not
   * paused.  Only for storage in memory (a RAM disk); NULL = not offered. */
  ssize_t (*write_direct)(void *handle, uint64_t offset, uint64_t len,
                          ssize_t (*fill)(void *dst, size_t len, void *arg), void *arg);
  /* Fields appended in later API versions go here. */
};

/* The data does not outlive the daemon (RAM): such disks are not restored
 * from the saved bus state at restart. */
#define VDB_BACKEND_VOLATILE (1u << 0)

/* The two version fields, for a designated initialiser:
 *   static const struct vdb_backend_ops my_ops = {
 *     VDB_BACKEND_OPS_INIT, .name = "my", … }; */
#define VDB_BACKEND_OPS_INIT \
  .api_version = VDB_BACKEND_API_VERSION, .struct_size = sizeof(struct vdb_backend_ops)

/* ---- Plugins.
 *
 * A plugin is a shared object (cc -shared -fPIC) in one of vdbusd's plugin
 * directories (--plugin-dir DIR; by default <libdir>/vdbus/plugins).  At
 * start-up vdbusd dlopen()s every "*.so" there (RTLD_NOW | RTLD_LOCAL), in
 * name order, and calls its entry point, once, on the main thread:
 *
 *   const struct vdb_backend_ops *vdb_backend_plugin_init(uint32_t bus_api_version);
 *
 * bus_api_version is the vdbusd's VDB_BACKEND_API_VERSION.  It returns the
 * backend's ops table, which must stay valid while the plugin is loaded
 * (a static const table), or NULL (after vdb_set_error() with the reason)
 * to decline.  One backend per plugin.  vdbusd then checks the table
 * (versioning rules above; name valid, unique and not a built-in's; name,
 * summary, usage, open, close and read set; summary and usage UTF-8 text;
 * no unknown flags); a plugin that cannot be loaded, lacks
 * the entry point, declines or is refused is skipped with a log line giving
 * its path and the reason, and vdbusd carries on without it.
 *
 * The functions declared here (vdb_req_complete, vdb_params_*,
 * vdb_set_error) are resolved from vdbusd itself when the plugin is loaded:
 * do not link the plugin against anything vdbus.  Plugins are never
 * unloaded while vdbusd runs.  Code a plugin runs at load time (ELF
 * constructors, the entry point) runs inside vdbusd: keep it trivial.
 *
 * VDB_BACKEND_PLUGIN(my_ops) defines the entry point for a plugin with one
 * static table and no check of bus_api_version. */
/* The entry point's symbol name, for dlsym(). */
#define VDB_BACKEND_PLUGIN_INIT_NAME "vdb_backend_plugin_init"

#ifdef __cplusplus
#define VDB_BACKEND_PLUGIN_LINKAGE_ extern "C"
#else
#define VDB_BACKEND_PLUGIN_LINKAGE_
#endif

const struct vdb_backend_ops *vdb_backend_plugin_init(uint32_t bus_api_version);

#define VDB_BACKEND_PLUGIN(ops)                                                  \
  VDB_BACKEND_PLUGIN_LINKAGE_ __attribute__((visibility("default")))          \
  const struct vdb_backend_ops *vdb_backend_plugin_init(uint32_t bus_api_version) \
  {                                                                            \
    (void)bus_api_version;                                                     \
    return &(ops);                                                             \
  }

#ifdef __cplusplus
}
#endif
#endif /* VDBUS_BACKEND_H */
