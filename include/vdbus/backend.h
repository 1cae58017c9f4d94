/* vdbus — the backend API: where a virtual disk's data lives.
 *
 * A backend is a `const struct vdb_backend_ops` table.  The bus opens a
 * backend instance once per plugged disk, validates every request (range,
 * alignment, read-only, capability) before it reaches the backend, and
 * derives the disk's capabilities from which callbacks are non-NULL.
 *
 * Threads: data-path callbacks may be called concurrently from several
 * threads (event-loop threads, FUSE threads).  A backend must be
 * thread-safe.  Every data-path callback completes its request exactly once
 * by calling vdb_req_complete(), either before returning (inline) or later
 * from any thread.
 *
 * Versioning: fields are only ever appended.  A backend sets api_version and
 * struct_size so that the bus knows which fields it has.
 */
#ifndef VDBUS_BACKEND_H
#define VDBUS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VDB_BACKEND_API_VERSION 1

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

/* Extent flags: the same bits as NBD's base:allocation context. */
#define VDB_EXTENT_HOLE (1u << 0) /* unallocated */
#define VDB_EXTENT_ZERO (1u << 1) /* reads as zeroes */

struct vdb_extent {
  uint64_t length;
  uint32_t flags;
};

struct vdb_disk;

/* One I/O request.  Owned by the submitter (a frontend) from submission
 * until its done callback returns. */
struct vdb_req {
  /* Set by the submitter. */
  enum vdb_req_type type;
  uint32_t flags;                /* VDB_REQ_* */
  uint64_t offset;
  uint64_t len;
  void *buf;                     /* READ: filled; WRITE: read.  len bytes */
  struct vdb_extent *extents;    /* BLOCK_STATUS: array the backend fills */
  uint32_t max_extents;          /* BLOCK_STATUS: capacity of extents, >= 1 */
  uint32_t nr_extents;           /* BLOCK_STATUS: set by the backend */
  /* Called exactly once, on whichever thread completed the request.
   * err is 0 or a negative errno. */
  void (*done)(struct vdb_req *req, int err);
  void *opaque;                  /* for the submitter */

  /* Private to the bus. */
  struct vdb_disk *disk;

  /* Scratch space for the backend while it owns the request (so that an
   * asynchronous backend needs no allocation per request). */
  uint64_t backend_priv[8];
};

/* Complete a request: updates the disk's counters and calls req->done.
 * Any thread. */
void vdb_req_complete(struct vdb_req *req, int err);

/* True once the request's disk is being unplugged.  A backend holding a
 * request back until an outside resource returns (a remote server) may then
 * fail it with -ESHUTDOWN instead of waiting longer.  Any thread. */
bool vdb_req_cancelled(const struct vdb_req *req);

/* Key/value parameters a backend is opened with ("size" = "4G", "path" = …).
 * Values are strings; see vdb_params_get_size() etc. */
struct vdb_params;
const char *vdb_params_get(const struct vdb_params *p, const char *key);
/* Parse a size parameter (K/M/G/T suffixes).  Returns 0 and *out, -ENOENT if
 * absent (and *out untouched), -EINVAL if malformed. */
int vdb_params_get_size(const struct vdb_params *p, const char *key, uint64_t *out);
/* A boolean parameter: absent = false; "1", "true", "yes", "on" = true. */
bool vdb_params_get_bool(const struct vdb_params *p, const char *key);

/* Set a human-readable error message for the current thread, to be returned
 * to the user along with the -errno an open() callback fails with. */
void vdb_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* What open() reports about the storage. */
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
  const char *name;       /* Required: "ram", "file", … */
  const char *summary;    /* Required: one line */
  const char *usage;      /* Required: the parameters, one per line */
  const char *positional; /* Optional: parameter name of the CLI's positional argument */

  /* Required.  Control path, may block.  Open the storage described by
   * params; fill *info.  Returns 0 and sets *handle, or -errno (after
   * vdb_set_error() with the reason). */
  int (*open)(const struct vdb_params *params, void **handle,
              struct vdb_backend_info *info);
  /* Required.  Control path.  No request is in flight. */
  void (*close)(void *handle);

  /* Data path.  NULL means "not supported" (the bus answers for it). */
  void (*read)(void *handle, struct vdb_req *req);         /* Required */
  void (*write)(void *handle, struct vdb_req *req);        /* Optional: NULL = read-only */
  void (*flush)(void *handle, struct vdb_req *req);        /* Optional: NULL = nothing to flush */
  void (*trim)(void *handle, struct vdb_req *req);         /* Optional */
  void (*write_zeroes)(void *handle, struct vdb_req *req); /* Optional: NULL = bus writes zeroes */
  void (*cache)(void *handle, struct vdb_req *req);        /* Optional: NULL = no-op */
  void (*block_status)(void *handle, struct vdb_req *req); /* Optional: NULL = all data */

  uint32_t flags;         /* Optional: VDB_BACKEND_* */
};

/* The data does not outlive the daemon (RAM): such disks are not restored
 * from the saved bus state at restart. */
#define VDB_BACKEND_VOLATILE (1u << 0)

#ifdef __cplusplus
}
#endif
#endif /* VDBUS_BACKEND_H */
