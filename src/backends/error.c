/* vdbus — backend "error": a RAM disk that fails chosen requests, for
 * testing every frontend's failure paths.
 *
 * error-rate=R (0 to 1, default 1) is the probability that a request of one
 * of the error-ops kinds fails with error-errno. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <vdbus/backend.h>
#include "backends/registry.h"

struct errdisk {
  void *ram;
  double rate;
  unsigned ops;  /* bit per enum vdb_req_type */
  int err;       /* negative errno */
};

static const char *const op_names[VDB_REQ_NR_TYPES] = {
  "read", "write", "flush", "trim", "zero", "cache", "status",
};

static const struct { const char *name; int err; } errnos[] = {
  { "EIO", EIO }, { "EPERM", EPERM }, { "ENOMEM", ENOMEM }, { "EINVAL", EINVAL },
  { "ENOSPC", ENOSPC }, { "ESHUTDOWN", ESHUTDOWN }, { "EOVERFLOW", EOVERFLOW },
};

static int error_parse_ops(const char *s, unsigned *out)
{
  unsigned ops = 0;

  while (s && *s) {
    size_t n = strcspn(s, ",");
    int i;
    if (n == 3 && strncmp(s, "all", 3) == 0) {
      ops = ~0u;
    } else {
      for (i = 0; i < VDB_REQ_NR_TYPES; i++)
        if (strlen(op_names[i]) == n && strncmp(s, op_names[i], n) == 0)
          break;
      if (i == VDB_REQ_NR_TYPES) {
        vdb_set_error("error backend: unknown operation '%.*s' in error-ops "
                      "(read,write,flush,trim,zero,cache,status,all)", (int)n, s);
        return -EINVAL;
      }
      ops |= 1u << i;
    }
    s += n + (s[n] == ',');
  }
  *out = ops;
  return 0;
}

static int error_parse(const struct vdb_params *params, struct errdisk *e)
{
  const char *rate = vdb_params_get(params, "error-rate");
  const char *err = vdb_params_get(params, "error-errno");
  char *end;

  e->rate = 1.0;
  if (rate) {
    e->rate = strtod(rate, &end);
    if (*end || end == rate || !(e->rate >= 0 && e->rate <= 1)) {
      vdb_set_error("error backend: error-rate must be a number from 0 to 1, not '%s'", rate);
      return -EINVAL;
    }
  }
  e->err = -EIO;
  if (err) {
    size_t i;
    for (i = 0; i < sizeof errnos / sizeof errnos[0]; i++)
      if (strcasecmp(err, errnos[i].name) == 0)
        break;
    if (i == sizeof errnos / sizeof errnos[0]) {
      vdb_set_error("error backend: unknown error-errno '%s'", err);
      return -EINVAL;
    }
    e->err = -errnos[i].err;
  }
  e->ops = ~0u;
  return vdb_params_get(params, "error-ops") ?
         error_parse_ops(vdb_params_get(params, "error-ops"), &e->ops) : 0;
}

static int error_open(const struct vdb_params *params, void **handle, struct vdb_backend_info *info)
{
  struct errdisk *e = calloc(1, sizeof *e);
  int r;

  if (!e)
    return -ENOMEM;
  r = error_parse(params, e);
  if (r == 0)
    r = vdb_backend_ram.open(params, &e->ram, info);
  if (r < 0) {
    free(e);
    return r;
  }
  snprintf(info->description, sizeof info->description,
           "RAM disk failing %.0f%% of requests", e->rate * 100);
  *handle = e;
  return 0;
}

static void error_close(void *handle)
{
  struct errdisk *e = handle;

  vdb_backend_ram.close(e->ram);
  free(e);
}

static bool error_hit(struct errdisk *e, struct vdb_req *req)
{
  static _Thread_local unsigned seed;

  if (!(e->ops & (1u << req->type)))
    return false;
  if (e->rate >= 1)
    return true;
  if (!seed)
    seed = (unsigned)(uintptr_t)&seed ^ 0x9e3779b9u;
  return (double)rand_r(&seed) / RAND_MAX < e->rate;
}

#define ERROR_OP(op)                                              \
  static void error_##op(void *handle, struct vdb_req *req)       \
  {                                                               \
    struct errdisk *e = handle;                                   \
    if (error_hit(e, req))                                        \
      vdb_req_complete(req, e->err);                              \
    else if (vdb_backend_ram.op)                                  \
      vdb_backend_ram.op(e->ram, req);                            \
    else                                                          \
      vdb_req_complete(req, 0);                                   \
  }
ERROR_OP(read)
ERROR_OP(write)
ERROR_OP(flush)
ERROR_OP(trim)
ERROR_OP(write_zeroes)
ERROR_OP(cache)
ERROR_OP(block_status)

const struct vdb_backend_ops vdb_backend_error = {
  .api_version = VDB_BACKEND_API_VERSION,
  .struct_size = sizeof(struct vdb_backend_ops),
  .flags = VDB_BACKEND_VOLATILE,
  .name = "error",
  .summary = "a RAM disk that fails requests on purpose (for tests)",
  .usage = "size=SIZE          disk size, required\n"
           "error-rate=R       probability of failing, 0 to 1 (default 1)\n"
           "error-ops=LIST     read,write,flush,trim,zero,cache,status or all (default all)\n"
           "error-errno=E      EIO (default), EPERM, ENOMEM, EINVAL, ENOSPC, ESHUTDOWN, EOVERFLOW\n",
  .open = error_open,
  .close = error_close,
  .read = error_read,
  .write = error_write,
  .flush = error_flush,
  .trim = error_trim,
  .write_zeroes = error_write_zeroes,
  .cache = error_cache,
  .block_status = error_block_status,
};
