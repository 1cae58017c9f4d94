/* vdbus — backend "trace": a RAM disk that records every call the bus makes
 * to it, one line per call, in a file: the layering test's witness that each
 * frontend operation becomes the expected backend call with the expected
 * flags.
 *
 * Line format:  OP OFFSET LENGTH FLAGS   e.g.  "write 4096 512 fua"
 * FLAGS is a comma list of fua, no_hole, fast_zero, req_one, or "-". */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vdbus/backend.h>
#include "backends/registry.h"

struct tracedisk {
  void *ram;
  FILE *log;
  pthread_mutex_t lock;
};

static const char *const trace_names[VDB_REQ_NR_TYPES] = {
  "read", "write", "flush", "trim", "zero", "cache", "status",
};

static int trace_open(const struct vdb_params *params, void **handle, struct vdb_backend_info *info)
{
  const char *path = vdb_params_get(params, "trace-file");
  struct tracedisk *t;
  int r;

  if (!path || !*path) {
    vdb_set_error("trace backend: trace-file=PATH is required");
    return -EINVAL;
  }
  t = calloc(1, sizeof *t);
  if (!t)
    return -ENOMEM;
  t->log = fopen(path, "a");
  if (!t->log) {
    r = -errno;
    vdb_set_error("trace backend: cannot open %s: %s", path, strerror(errno));
    free(t);
    return r;
  }
  setvbuf(t->log, NULL, _IOLBF, 0);
  r = vdb_backend_ram.open(params, &t->ram, info);
  if (r < 0) {
    fclose(t->log);
    free(t);
    return r;
  }
  pthread_mutex_init(&t->lock, NULL);
  snprintf(info->description, sizeof info->description, "RAM disk tracing calls to %s", path);
  *handle = t;
  return 0;
}

static void trace_close(void *handle)
{
  struct tracedisk *t = handle;

  vdb_backend_ram.close(t->ram);
  fclose(t->log);
  pthread_mutex_destroy(&t->lock);
  free(t);
}

static void trace_record(struct tracedisk *t, const struct vdb_req *req)
{
  char flags[64] = "";

  if (req->flags & VDB_REQ_FUA)
    strcat(flags, ",fua");
  if (req->flags & VDB_REQ_NO_HOLE)
    strcat(flags, ",no_hole");
  if (req->flags & VDB_REQ_FAST_ZERO)
    strcat(flags, ",fast_zero");
  if (req->flags & VDB_REQ_ONE)
    strcat(flags, ",req_one");
  pthread_mutex_lock(&t->lock);
  fprintf(t->log, "%s %llu %llu %s\n", trace_names[req->type], (unsigned long long)req->offset,
          (unsigned long long)req->len, flags[0] ? flags + 1 : "-");
  pthread_mutex_unlock(&t->lock);
}

#define TRACE_OP(op)                                              \
  static void trace_##op(void *handle, struct vdb_req *req)       \
  {                                                               \
    struct tracedisk *t = handle;                                 \
    trace_record(t, req);                                         \
    if (vdb_backend_ram.op)                                       \
      vdb_backend_ram.op(t->ram, req);                            \
    else                                                          \
      vdb_req_complete(req, 0);                                   \
  }
TRACE_OP(read)
TRACE_OP(write)
TRACE_OP(flush)
TRACE_OP(trim)
TRACE_OP(write_zeroes)
TRACE_OP(cache)
TRACE_OP(block_status)

const struct vdb_backend_ops vdb_backend_trace = {
  .api_version = VDB_BACKEND_API_VERSION,
  .struct_size = sizeof(struct vdb_backend_ops),
  .flags = VDB_BACKEND_VOLATILE,
  .name = "trace",
  .summary = "a RAM disk recording every backend call in a file (for tests)",
  .usage = "size=SIZE          disk size, required\n"
           "trace-file=PATH    append one line per call: OP OFFSET LENGTH FLAGS\n",
  .open = trace_open,
  .close = trace_close,
  .read = trace_read,
  .write = trace_write,
  .flush = trace_flush,
  .trim = trace_trim,
  .write_zeroes = trace_write_zeroes,
  .cache = trace_cache,
  .block_status = trace_block_status,
};
