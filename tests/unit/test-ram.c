/* Unit test: the RAM backend, through the bus's validation, from several
 * threads at once. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "backends/registry.h"
#include "bus/bus.h"
#include "common/thp.h"
#include "tap.h"

static struct vdb_disk *disk;

static void done_cb(struct vdb_req *req, int err) { *(int *)req->opaque = err; }

static int io(enum vdb_req_type type, uint32_t flags, uint64_t off, uint64_t len, void *buf)
{
  int err = 1;
  struct vdb_req req = { .type = type, .flags = flags, .offset = off, .len = len, .buf = buf,
                         .done = done_cb, .opaque = &err };
  vdb_disk_submit(disk, &req);
  return err; /* the RAM backend completes inline */
}

static int status(uint64_t off, uint64_t len, struct vdb_extent *e, uint32_t max, uint32_t *n)
{
  int err = 1;
  struct vdb_req req = { .type = VDB_REQ_BLOCK_STATUS, .offset = off, .len = len,
                         .extents = e, .max_extents = max, .done = done_cb, .opaque = &err };
  vdb_disk_submit(disk, &req);
  *n = req.nr_extents;
  return err;
}

static bool all_zero(const uint8_t *b, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (b[i])
      return false;
  return true;
}

static void *writer(void *arg)
{
  uint8_t buf[4096];
  uintptr_t id = (uintptr_t)arg;

  for (int i = 0; i < 2000; i++) {
    uint64_t off = (id * 2000 + (uint64_t)i) * 4096 % (64u << 20);
    memset(buf, (int)(id + 1), sizeof buf);
    if (io(VDB_REQ_WRITE, 0, off, sizeof buf, buf) != 0)
      return (void *)1;
    if (io(VDB_REQ_READ, 0, off, sizeof buf, buf) != 0 || buf[0] != id + 1 || buf[4095] != id + 1)
      return (void *)1;
  }
  return NULL;
}

/* kB of this process's anonymous memory in huge pages. */
static long anon_huge_kb(void)
{
  char line[256];
  long kb = -1;
  FILE *f = fopen("/proc/self/smaps_rollup", "r");

  if (!f)
    return -1;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
      break;
  fclose(f);
  return kb;
}

/* Linux 6.1 or later: MADV_COLLAPSE. */
static bool collapse_kernel(void)
{
  struct utsname u;
  int major = 0, minor = 0;

  return uname(&u) == 0 && sscanf(u.release, "%d.%d", &major, &minor) == 2 &&
         (major > 6 || (major == 6 && minor >= 1));
}

/* A 2 MiB region written completely becomes one huge page (the disk's
 * collapser thread, MADV_COLLAPSE); its data stays; a 4 KiB trim inside it
 * reads as zeroes and splits it again; a region written only in part stays
 * in 4 KiB pages. */
static void test_collapse(void)
{
  static uint8_t buf[65536], rbuf[65536];
  const uint64_t region = 8u << 20;   /* the disk's 5th 2 MiB region */
  long before = anon_huge_kb(), kb = before;

  if (before < 0 || vdb_thp_always()) {
    printf("test-ram: huge pages not checked (no smaps_rollup, or THP always)\n");
    return;
  }
  for (uint64_t off = 0; off < (2u << 20) - 4096; off += sizeof buf) {   /* all but 4 KiB */
    uint64_t len = off + sizeof buf > (2u << 20) - 4096 ? (2u << 20) - 4096 - off : sizeof buf;
    memset(buf, (int)(off >> 16) + 1, sizeof buf);
    CHECK(io(VDB_REQ_WRITE, 0, region + off, len, buf) == 0);
  }
  usleep(200000);
  CHECK(anon_huge_kb() == before);   /* not full: no huge page */
  memset(buf, 0x5a, 4096);
  CHECK(io(VDB_REQ_WRITE, 0, region + (2u << 20) - 4096, 4096, buf) == 0);
  for (int i = 0; i < 100 && (kb = anon_huge_kb()) < before + 2048; i++)
    usleep(20000);
  if (kb < before + 2048 && (!collapse_kernel() || getenv("VDBUS_RAM_COLLAPSE"))) {
    printf("test-ram: no huge page after 2 s (VDBUS_RAM_COLLAPSE set, or Linux < 6.1)\n");
    return;
  }
  CHECK(kb == before + 2048);
  for (uint64_t off = 0; off < (2u << 20) - 4096; off += sizeof rbuf) {
    uint64_t len = off + sizeof rbuf > (2u << 20) - 4096 ? (2u << 20) - 4096 - off : sizeof rbuf;
    CHECK(io(VDB_REQ_READ, 0, region + off, len, rbuf) == 0 && rbuf[0] == (off >> 16) + 1 &&
          rbuf[len - 1] == (off >> 16) + 1);
  }
  CHECK(io(VDB_REQ_READ, 0, region + (2u << 20) - 4096, 4096, rbuf) == 0 && rbuf[0] == 0x5a &&
        rbuf[4095] == 0x5a);
  CHECK(io(VDB_REQ_TRIM, 0, region + 65536, 4096, NULL) == 0);
  CHECK(io(VDB_REQ_READ, 0, region + 61440, 3 * 4096, rbuf) == 0 && rbuf[4095] == 1 &&
        all_zero(rbuf + 4096, 4096) && rbuf[8192] == 2);
  CHECK(anon_huge_kb() == before);   /* split by the trim */
}

/* A region trimmed after it was full but before the collapser got to it
 * stays in small pages (collapsing it would fill the hole again and keep
 * the trimmed page's memory); the regions before it become huge pages. */
static void test_trim_pending(void)
{
  static uint8_t buf[65536], rbuf[4096];
  const uint64_t first = 16u << 20, busy = 4, last = first + busy * (2u << 20);
  long before = anon_huge_kb(), kb = before, prev = -1;

  if (before < 0 || vdb_thp_always() || !collapse_kernel() || getenv("VDBUS_RAM_COLLAPSE")) {
    printf("test-ram: trim of a pending region not checked (THP always, Linux < 6.1, or off)\n");
    return;
  }
  memset(buf, 0x3c, sizeof buf);
  /* All but the first page of each region, then those pages in a row: the
   * collapser has the busy regions to do when the last one becomes full
   * and is trimmed at once. */
  for (uint64_t off = first; off < last + (2u << 20); off += sizeof buf)
    CHECK(io(VDB_REQ_WRITE, 0, off + (off % (2u << 20) ? 0 : 4096),
             sizeof buf - (off % (2u << 20) ? 0 : 4096), buf) == 0);
  for (uint64_t off = first; off <= last; off += 2u << 20)
    CHECK(io(VDB_REQ_WRITE, 0, off, 4096, buf) == 0);
  CHECK(io(VDB_REQ_TRIM, 0, last + 65536, 4096, NULL) == 0);
  for (int i = 0; i < 150 && (kb < before + (long)busy * 2048 || kb != prev); i++) {
    prev = kb;
    usleep(20000);
    kb = anon_huge_kb();
  }
  usleep(100000);
  CHECK(anon_huge_kb() == before + (long)busy * 2048);
  CHECK(io(VDB_REQ_READ, 0, last + 65536, 4096, rbuf) == 0 && all_zero(rbuf, 4096));
  CHECK(io(VDB_REQ_READ, 0, last + 61440, 4096, rbuf) == 0 && rbuf[0] == 0x3c && rbuf[4095] == 0x3c);
  CHECK(io(VDB_REQ_TRIM, 0, first, busy * (2u << 20), NULL) == 0);
  CHECK(anon_huge_kb() == before);
}

static void test_threads(void)
{
  pthread_t t[4];
  void *res;

  for (uintptr_t i = 0; i < 4; i++)
    pthread_create(&t[i], NULL, writer, (void *)i);
  for (int i = 0; i < 4; i++) {
    pthread_join(t[i], &res);
    CHECK(res == NULL);
  }
}

int main(void)
{
  struct vdb_disk_config cfg = { .name = "t", .backend = "ram", .block_size = 512, .attach = "none" };
  static uint8_t buf[65536], rbuf[65536];
  struct vdb_extent e[16];
  uint32_t n;

  vdb_params_init(&cfg.params);
  vdb_params_set(&cfg.params, "size", "0");
  CHECK(vdb_bus_plug(&cfg, &disk) == -EINVAL);
  vdb_params_set(&cfg.params, "size", "64M");
  vdb_params_set(&cfg.params, "size", "67108865"); /* 64M + 1: not a multiple of 512 */
  CHECK(vdb_bus_plug(&cfg, &disk) == 0);
  CHECK(disk->size == (64u << 20) + 1);
  CHECK(disk->can_trim && disk->can_zero && disk->can_extents && !disk->can_flush);

  /* Fresh disk reads as zeroes and is one hole. */
  memset(rbuf, 0xff, sizeof rbuf);
  CHECK(io(VDB_REQ_READ, 0, 0, sizeof rbuf, rbuf) == 0 && all_zero(rbuf, sizeof rbuf));
  CHECK(status(0, disk->size, e, 16, &n) == 0 && n == 1 &&
        e[0].length == disk->size && e[0].flags == (VDB_EXTENT_HOLE | VDB_EXTENT_ZERO));

  /* Write, read back, block status shows data. */
  memset(buf, 0xab, sizeof buf);
  CHECK(io(VDB_REQ_WRITE, 0, 8192, 8192, buf) == 0);
  CHECK(io(VDB_REQ_READ, 0, 8192, 8192, rbuf) == 0 && memcmp(buf, rbuf, 8192) == 0);
  CHECK(status(0, 65536, e, 16, &n) == 0 && n == 3 && e[0].length == 8192 &&
        e[1].length == 8192 && e[1].flags == 0 && e[2].flags == (VDB_EXTENT_HOLE | VDB_EXTENT_ZERO));
  CHECK(status(0, 65536, e, 1, &n) == 0 && n == 1);

  /* Trim frees and zeroes whole pages; partial pages are zeroed in place. */
  CHECK(io(VDB_REQ_TRIM, 0, 8192 + 100, 4096, NULL) == 0);
  CHECK(io(VDB_REQ_READ, 0, 8192, 8192, rbuf) == 0);
  CHECK(rbuf[99] == 0xab && all_zero(rbuf + 100, 4096) && rbuf[4196] == 0xab);
  CHECK(io(VDB_REQ_TRIM, 0, 8192, 8192, NULL) == 0);
  CHECK(status(0, 65536, e, 16, &n) == 0 && n == 1);

  /* write_zeroes with NO_HOLE allocates. */
  CHECK(io(VDB_REQ_WRITE_ZEROES, VDB_REQ_NO_HOLE, 0, 4096, NULL) == 0);
  CHECK(status(0, 8192, e, 16, &n) == 0 && n == 2 && e[0].flags == 0);
  CHECK(io(VDB_REQ_WRITE_ZEROES, 0, 0, 4096, NULL) == 0);
  CHECK(status(0, 8192, e, 16, &n) == 0 && n == 1);

  /* Writes of 4 KiB and more take the streaming copy: every alignment of
   * the disk offset and of the source, odd lengths, neighbours untouched. */
  for (unsigned i = 0; i < sizeof buf; i++)
    buf[i] = (uint8_t)(i * 7 + i / 251);
  for (uint64_t doff = 0; doff < 20; doff += 3) {
    for (unsigned soff = 0; soff < 20; soff += 5) {
      uint64_t len = 4096 + doff * 13 + soff;
      uint64_t at = (1u << 20) + doff;
      CHECK(io(VDB_REQ_WRITE_ZEROES, VDB_REQ_NO_HOLE, 1u << 20, 16384, NULL) == 0);
      CHECK(io(VDB_REQ_WRITE, 0, at, len, buf + soff) == 0);
      CHECK(io(VDB_REQ_READ, 0, 1u << 20, 16384, rbuf) == 0);
      CHECK(all_zero(rbuf, doff) && memcmp(rbuf + doff, buf + soff, len) == 0 &&
            all_zero(rbuf + doff + len, 16384 - doff - len));
    }
  }
  CHECK(io(VDB_REQ_WRITE, 0, 1u << 20, 60000, buf) == 0);
  CHECK(io(VDB_REQ_READ, 0, 1u << 20, 60000, rbuf) == 0 && memcmp(rbuf, buf, 60000) == 0);
  memset(buf, 0xab, sizeof buf);
  test_collapse();
  test_trim_pending();

  /* The last, partial byte of the disk. */
  CHECK(io(VDB_REQ_WRITE, 0, disk->size - 1, 1, buf) == 0);
  CHECK(io(VDB_REQ_READ, 0, disk->size - 1, 1, rbuf) == 0 && rbuf[0] == 0xab);

  /* Validation in the bus. */
  CHECK(io(VDB_REQ_READ, 0, disk->size, 1, rbuf) == -EINVAL);
  CHECK(io(VDB_REQ_WRITE, 0, disk->size - 1, 2, buf) == -ENOSPC);
  CHECK(io(VDB_REQ_READ, 0, UINT64_MAX, 2, rbuf) == -EINVAL);
  CHECK(io(VDB_REQ_READ, 0, 0, 0, rbuf) == 0);
  CHECK(io(VDB_REQ_FLUSH, 0, 0, 0, NULL) == 0);
  CHECK(io(VDB_REQ_NR_TYPES, 0, 0, 1, NULL) == -EINVAL);
  CHECK(disk->stats.errors == 4);

  test_threads();
  CHECK(disk->stats.inflight == 0);
  vdb_disk_put(disk);
  CHECK(vdb_bus_unplug("t", false) == 0);
  CHECK(vdb_bus_unplug("t", false) == -ENOENT);

  /* Read-only disk refuses writes with EPERM. */
  vdb_params_set(&cfg.params, "size", "1M");
  cfg.readonly = true;
  CHECK(vdb_bus_plug(&cfg, &disk) == 0 && disk->readonly);
  CHECK(io(VDB_REQ_WRITE, 0, 0, 512, buf) == -EPERM);
  CHECK(io(VDB_REQ_TRIM, 0, 0, 512, NULL) == -EPERM);
  CHECK(io(VDB_REQ_READ, 0, 0, 512, rbuf) == 0);
  vdb_disk_put(disk);
  CHECK(vdb_bus_unplug("t", false) == 0);
  vdb_params_clear(&cfg.params);
  return tap_done("ram");
}
