/* Unit test: the backend registry's rules (vdb_backend_ops_check) for the
 * in-tree backends and for bad tables; registering, widening a smaller
 * struct, name clashes, lookups; a plugin plugged through the bus. */
#include <errno.h>
#include <string.h>

#include "backends/registry.h"
#include "bus/bus.h"
#include "tap.h"

static int t_open(const struct vdb_params *p, void **h, struct vdb_backend_info *info)
{
  info->size = 4096;
  *h = info;
  return 0;
}
static void t_close(void *h) {}
static void t_read(void *h, struct vdb_req *r)
{
  memset(r->buf, 0x5a, r->len);
  vdb_req_complete(r, 0);
}

static const struct vdb_backend_ops good = {
  VDB_BACKEND_OPS_INIT, .name = "good", .summary = "s \xc3\xa9\xe2\x82\xac\xf0\x9f\x92\xbe",
  .usage = "u=U\tthe u\n",
  .open = t_open, .close = t_close, .read = t_read,
};

/* good with one change, checked; returns the check's result and the reason. */
static int check_variant(void (*change)(struct vdb_backend_ops *), char *why, size_t len)
{
  struct vdb_backend_ops o = good;

  change(&o);
  return vdb_backend_ops_check(&o, why, len);
}

static void v_api0(struct vdb_backend_ops *o) { o->api_version = 0; }
static void v_api_new(struct vdb_backend_ops *o) { o->api_version = VDB_BACKEND_API_VERSION + 1; }
/* A version 2 table must reach past the version 2 field (snapshot). */
static void v_small2(struct vdb_backend_ops *o)
{
  o->api_version = 2;
  o->struct_size = offsetof(struct vdb_backend_ops, flags) + sizeof(uint32_t);
}
/* A version 3 table must reach past write_direct. */
static void v_small3(struct vdb_backend_ops *o)
{
  o->api_version = 3;
  o->struct_size = offsetof(struct vdb_backend_ops, write_direct);
}
static void v_small(struct vdb_backend_ops *o) { o->struct_size = offsetof(struct vdb_backend_ops, flags); }
static void v_huge(struct vdb_backend_ops *o) { o->struct_size = 1u << 20; }
static void v_noname(struct vdb_backend_ops *o) { o->name = NULL; }
static void v_empty(struct vdb_backend_ops *o) { o->name = ""; }
static void v_upper(struct vdb_backend_ops *o) { o->name = "Good"; }
static void v_dash(struct vdb_backend_ops *o) { o->name = "-good"; }
static void v_long(struct vdb_backend_ops *o) { o->name = "a23456789012345678901234567890123"; }
static void v_nousage(struct vdb_backend_ops *o) { o->usage = NULL; }
static void v_nosummary(struct vdb_backend_ops *o) { o->summary = NULL; }
static void v_badpos(struct vdb_backend_ops *o) { o->positional = "a b"; }
static void v_noopen(struct vdb_backend_ops *o) { o->open = NULL; }
static void v_noclose(struct vdb_backend_ops *o) { o->close = NULL; }
static void v_noread(struct vdb_backend_ops *o) { o->read = NULL; }
static void v_flags(struct vdb_backend_ops *o) { o->flags = 1u << 7; }
static void v_latin1(struct vdb_backend_ops *o) { o->summary = "caf\xe9"; }
static void v_ctrl(struct vdb_backend_ops *o) { o->usage = "a\033[2Jb\n"; }

static void test_rules(void)
{
  static const struct { void (*change)(struct vdb_backend_ops *); const char *why; } bad[] = {
    { v_api0, "API version 0" }, { v_api_new, "API version 4" }, { v_small, "is smaller than" },
    { v_small2, "smaller than the API version 2 ops struct" },
    { v_small3, "smaller than the API version 3 ops struct" },
    { v_huge, "implausible" }, { v_noname, "no name" }, { v_empty, "is empty" },
    { v_upper, "characters other than" }, { v_dash, "starts with '-'" },
    { v_long, "longer than 31" }, { v_nousage, "has no usage" },
    { v_nosummary, "has no summary" }, { v_badpos, "positional parameter name" },
    { v_noopen, "no open callback" }, { v_noclose, "no close callback" },
    { v_noread, "no read callback" }, { v_flags, "unknown flags 0x80" },
    { v_latin1, "its summary is not UTF-8" }, { v_ctrl, "its usage is not UTF-8" },
  };
  const struct vdb_backend_ops *b;
  char why[256];

  for (size_t i = 0; (b = vdb_backend_at(i, NULL)); i++) {
    why[0] = '\0';
    CHECK(vdb_backend_ops_check(b, why, sizeof why) == 0);
    if (why[0])
      fprintf(stderr, "built-in %s: %s\n", b->name, why);
  }
  CHECK(vdb_backend_ops_check(&good, why, sizeof why) == 0);
  CHECK(vdb_backend_ops_check(NULL, why, sizeof why) == -EINVAL);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    why[0] = '\0';
    CHECK(check_variant(bad[i].change, why, sizeof why) == -EINVAL);
    CHECK(strstr(why, bad[i].why) != NULL);
    if (!strstr(why, bad[i].why))
      fprintf(stderr, "variant %zu: want '%s' in '%s'\n", i, bad[i].why, why);
  }
}

/* A table from a newer header: an unknown tail is refused unless zero. */
static void test_newer(void)
{
  struct { struct vdb_backend_ops ops; uint64_t future; } big = { good, 0 };
  char why[256];

  big.ops.struct_size = sizeof big;
  CHECK(vdb_backend_ops_check(&big.ops, why, sizeof why) == 0);
  big.future = 1;
  CHECK(vdb_backend_ops_check(&big.ops, why, sizeof why) == -EINVAL);
  CHECK(strstr(why, "unknown to this vdbusd") != NULL);
}

/* Registering: clashes, lookups, and a short struct widened with zeroes. */
static void test_register(void)
{
  /* A v1 table (a plugin built against the version 1 header) followed by
   * garbage that must not be read. */
  struct { struct vdb_backend_ops ops; } raw;
  const struct vdb_backend_ops *f;
  const char *origin;
  char why[256];
  size_t n0 = 0, n = 0;

  while (vdb_backend_at(n0, NULL))
    n0++;
  memset(&raw, 0xff, sizeof raw);
  memcpy(&raw.ops, &good, offsetof(struct vdb_backend_ops, flags) + sizeof(uint32_t));
  raw.ops.name = "short";
  raw.ops.api_version = 1;
  raw.ops.struct_size = offsetof(struct vdb_backend_ops, flags) + sizeof(uint32_t);
  CHECK(vdb_backend_register(&raw.ops, "/x/short.so", NULL, why, sizeof why) == 0);
  f = vdb_backend_find("short");
  CHECK(f && f != &raw.ops && f->read == t_read && f->flags == 0 && f->snapshot == NULL &&
        f->write_direct == NULL);
  /* the tail padding (0xff in raw) reads as zero in the copy */
  CHECK(f && ((const uint8_t *)f)[sizeof *f - 1] == 0);

  CHECK(vdb_backend_register(&good, "/x/good.so", NULL, why, sizeof why) == 0);
  CHECK(vdb_backend_register(&good, "/y/good.so", NULL, why, sizeof why) == -EEXIST);
  CHECK(strstr(why, "taken by the plugin /x/good.so") != NULL);
  raw.ops.name = "ram";
  CHECK(vdb_backend_register(&raw.ops, "/x/ram.so", NULL, why, sizeof why) == -EEXIST);
  CHECK(strstr(why, "taken by the built-in backend") != NULL);
  CHECK(vdb_backend_find("ram") == &vdb_backend_ram);
  CHECK(vdb_backend_find("nope") == NULL);
  while (vdb_backend_at(n, &origin))
    n++;
  CHECK(n == n0 + 2 && strcmp(origin, "/x/good.so") == 0);
  CHECK(vdb_backend_at(0, &origin) == &vdb_backend_ram && strcmp(origin, "built-in") == 0);
}

/* A registered backend plugs and serves a read through the bus. */
static void rd_done(struct vdb_req *req, int err) { *(int *)req->opaque = err + 1; }

static void test_plug(void)
{
  struct vdb_disk_config cfg = { .name = "g", .backend = "good", .block_size = 512,
                                 .attach = "none" };
  struct vdb_disk *d = NULL;
  uint8_t buf[512] = { 0 };
  int got = 0;
  struct vdb_req req = { .type = VDB_REQ_READ, .offset = 512, .len = sizeof buf, .buf = buf,
                         .done = rd_done, .opaque = &got };

  vdb_params_init(&cfg.params);
  CHECK(vdb_bus_plug(&cfg, &d) == 0);
  if (!d)
    return;
  CHECK(d->size == 4096 && d->readonly && !d->can_trim && !d->can_extents);
  vdb_disk_submit(d, &req);
  CHECK(got == 1 && buf[0] == 0x5a && buf[511] == 0x5a);
  vdb_disk_put(d);
  CHECK(vdb_bus_unplug("g", false) == 0);
}

int main(void)
{
  test_rules();
  test_newer();
  test_register();
  test_plug();
  vdb_backend_plugins_unload();
  CHECK(vdb_backend_find("good") == NULL && vdb_backend_find("ram") != NULL);
  return tap_done("registry");
}
