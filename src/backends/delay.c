/* vdbus — backend "delay": a RAM disk whose requests complete late, for
 * testing out-of-order replies, timeouts and unplug with requests in flight.
 *
 * On an event-loop thread the delay is a loop timer (the loop keeps
 * serving other requests meanwhile); on any other thread the request
 * sleeps. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <vdbus/backend.h>
#include "backends/registry.h"
#include "common/loop.h"

struct delaydisk {
  void *ram;
  unsigned read_ms, write_ms, other_ms;
};

struct delayed {
  struct vdb_timer timer;
  struct delaydisk *dd;
  struct vdb_req *req;
};

static int delay_parse_ms(const struct vdb_params *params, const char *key, unsigned *out)
{
  const char *v = vdb_params_get(params, key);
  char *end;
  unsigned long ms;

  *out = 0;
  if (!v)
    return 0;
  ms = strtoul(v, &end, 10);
  if (end == v || (*end && strcmp(end, "ms") != 0) || ms > 600000) {
    vdb_set_error("delay backend: %s must be milliseconds (0 to 600000), not '%s'", key, v);
    return -EINVAL;
  }
  *out = (unsigned)ms;
  return 0;
}

static int delay_open(const struct vdb_params *params, void **handle, struct vdb_backend_info *info)
{
  struct delaydisk *dd = calloc(1, sizeof *dd);
  int r;

  if (!dd)
    return -ENOMEM;
  r = delay_parse_ms(params, "delay-read", &dd->read_ms);
  if (r == 0)
    r = delay_parse_ms(params, "delay-write", &dd->write_ms);
  if (r == 0)
    r = delay_parse_ms(params, "delay-other", &dd->other_ms);
  if (r == 0)
    r = vdb_backend_ram.open(params, &dd->ram, info);
  if (r < 0) {
    free(dd);
    return r;
  }
  snprintf(info->description, sizeof info->description,
           "RAM disk with delays: read %ums, write %ums, other %ums",
           dd->read_ms, dd->write_ms, dd->other_ms);
  *handle = dd;
  return 0;
}

static void delay_close(void *handle)
{
  struct delaydisk *dd = handle;

  vdb_backend_ram.close(dd->ram);
  free(dd);
}

static void delay_forward(struct delaydisk *dd, struct vdb_req *req)
{
  const struct vdb_backend_ops *ram = &vdb_backend_ram;

  switch (req->type) {
  case VDB_REQ_READ: ram->read(dd->ram, req); break;
  case VDB_REQ_WRITE: ram->write(dd->ram, req); break;
  case VDB_REQ_TRIM: ram->trim(dd->ram, req); break;
  case VDB_REQ_WRITE_ZEROES: ram->write_zeroes(dd->ram, req); break;
  case VDB_REQ_BLOCK_STATUS: ram->block_status(dd->ram, req); break;
  default: vdb_req_complete(req, 0); break;
  }
}

static void delay_fire(struct vdb_timer *t)
{
  struct delayed *dl = t->arg;

  delay_forward(dl->dd, dl->req);
  free(dl);
}

static void delay_submit(void *handle, struct vdb_req *req)
{
  struct delaydisk *dd = handle;
  unsigned ms = req->type == VDB_REQ_READ ? dd->read_ms :
                req->type == VDB_REQ_WRITE ? dd->write_ms : dd->other_ms;
  struct vdb_loop *loop = vdb_loop_current();
  struct delayed *dl;

  if (ms == 0) {
    delay_forward(dd, req);
    return;
  }
  if (!loop) {
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
      ;
    delay_forward(dd, req);
    return;
  }
  dl = calloc(1, sizeof *dl);
  if (!dl) {
    vdb_req_complete(req, -ENOMEM);
    return;
  }
  dl->dd = dd;
  dl->req = req;
  dl->timer.cb = delay_fire;
  dl->timer.arg = dl;
  vdb_timer_start(loop, &dl->timer, ms);
}

const struct vdb_backend_ops vdb_backend_delay = {
  .api_version = VDB_BACKEND_API_VERSION,
  .struct_size = sizeof(struct vdb_backend_ops),
  .flags = VDB_BACKEND_VOLATILE,
  .name = "delay",
  .summary = "a RAM disk whose requests complete late (for tests)",
  .usage = "size=SIZE          disk size, required\n"
           "delay-read=MS      delay of each read in milliseconds\n"
           "delay-write=MS     delay of each write\n"
           "delay-other=MS     delay of flush, trim, zero, cache and block status\n",
  .open = delay_open,
  .close = delay_close,
  .read = delay_submit,
  .write = delay_submit,
  .flush = delay_submit,
  .trim = delay_submit,
  .write_zeroes = delay_submit,
  .cache = delay_submit,
  .block_status = delay_submit,
};
