/* Unit test: the file backend, synchronously (as FUSE threads call it) and
 * asynchronously through an event loop's io_uring (as NBD connections do). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bus/bus.h"
#include "common/loop.h"
#include "tap.h"

#define SZ (8u << 20)

static struct vdb_disk *disk;

struct waiter {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int pending;
  int errors;
  int last_err;   /* the last request that failed: its error */
};
static struct waiter w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0 };

static void done_cb(struct vdb_req *req, int err)
{
  pthread_mutex_lock(&w.lock);
  if (err) {
    w.errors++;
    w.last_err = err;
  }
  w.pending--;
  pthread_cond_broadcast(&w.cond);
  pthread_mutex_unlock(&w.lock);
}

static void wait_all(void)
{
  pthread_mutex_lock(&w.lock);
  while (w.pending > 0)
    pthread_cond_wait(&w.cond, &w.lock);
  pthread_mutex_unlock(&w.lock);
}

static struct vdb_req reqs[64];
static uint8_t *bufs[64];

/* Runs on the loop thread: 64 writes (or reads) of 64 KiB in flight at once. */
static void submit_batch(void *arg)
{
  enum vdb_req_type type = (enum vdb_req_type)(uintptr_t)arg;

  for (int i = 0; i < 64; i++) {
    reqs[i] = (struct vdb_req){ .type = type, .offset = (uint64_t)i * 65536, .len = 65536,
                                .buf = bufs[i], .done = done_cb,
                                .flags = (i % 8 == 0 && type == VDB_REQ_WRITE) ? VDB_REQ_FUA : 0 };
    vdb_disk_submit(disk, &reqs[i]);
  }
}

/* Runs on the loop thread: big writes that the backend puts into the page
 * cache in pieces (FILE_WRITE_CHUNK), at offsets and lengths that are not
 * multiples of a piece; one of them FUA (one piece, one sync). */
static struct vdb_req big[3];
static uint8_t *bigbuf;
#define BIG_OFF(i) ((uint64_t)(i) * (1100u << 10) + 512u * (unsigned)(i) + 100u)
#define BIG_LEN(i) ((1u << 20) + 4096u * (unsigned)(i) + 7u)

static void submit_big(void *arg)
{
  (void)arg;
  for (int i = 0; i < 3; i++) {
    big[i] = (struct vdb_req){ .type = VDB_REQ_WRITE, .offset = BIG_OFF(i), .len = BIG_LEN(i),
                               .buf = bigbuf + BIG_OFF(i), .done = done_cb,
                               .flags = i == 2 ? VDB_REQ_FUA : 0 };
    vdb_disk_submit(disk, &big[i]);
  }
}

static void submit_flush(void *arg)
{
  static struct vdb_req r;
  r = (struct vdb_req){ .type = VDB_REQ_FLUSH, .done = done_cb };
  vdb_disk_submit(disk, &r);
}

static void run_on_loop(void (*fn)(void *), void *arg, int n)
{
  w.pending = n;
  vdb_loop_post(vdb_worker_get(0), fn, arg);
  wait_all();
}

static int sync_io(enum vdb_req_type type, uint32_t flags, uint64_t off, uint64_t len, void *buf,
                   struct vdb_extent *e, uint32_t max, uint32_t *n)
{
  struct vdb_req r = { .type = type, .flags = flags, .offset = off, .len = len, .buf = buf,
                       .extents = e, .max_extents = max, .done = done_cb };
  int before = w.errors;

  w.pending = 1;
  vdb_disk_submit(disk, &r);
  wait_all();
  if (n)
    *n = r.nr_extents;
  return w.errors - before;
}

static bool in(uint32_t k, uint64_t off, uint64_t len)
{
  return k >= off && k < off + len;
}

/* Big writes in pieces, from a loop (to the writer thread, or through the
 * ring) and then synchronously: what is read back is what was written, and
 * the bytes around them are untouched. */
static void check_big_writes(unsigned seed)
{
  const uint32_t R = 4u << 20, soff = 100, slen = (3u << 20) + 12345;
  uint8_t *back = malloc(R), *prev = malloc(R);
  bool same = true;
  int errors = w.errors;

  bigbuf = malloc(R);
  CHECK(bigbuf && back && prev);
  CHECK(sync_io(VDB_REQ_READ, 0, 0, R, prev, NULL, 0, NULL) == 0);
  memcpy(bigbuf, prev, R);
  for (int i = 0; i < 3; i++) {
    CHECK(BIG_OFF(i) + BIG_LEN(i) <= (i < 2 ? BIG_OFF(i + 1) : R));   /* disjoint */
    for (uint32_t k = 0; k < BIG_LEN(i); k++)
      bigbuf[BIG_OFF(i) + k] = (uint8_t)(k * 31 + (k >> 12) + 7 * i + seed);
  }
  run_on_loop(submit_big, NULL, 3);
  CHECK(w.errors == errors);
  CHECK(sync_io(VDB_REQ_READ, 0, 0, R, back, NULL, 0, NULL) == 0);
  CHECK(memcmp(back, bigbuf, R) == 0);
  memcpy(prev, bigbuf, R);
  for (uint32_t k = soff; k < soff + slen; k++)
    bigbuf[k] ^= 0x5a;
  CHECK(sync_io(VDB_REQ_WRITE, 0, soff, slen, bigbuf + soff, NULL, 0, NULL) == 0);
  CHECK(sync_io(VDB_REQ_READ, 0, 0, R, back, NULL, 0, NULL) == 0);
  for (uint32_t k = 0; k < R; k++)
    same = same && back[k] == (in(k, soff, slen) ? bigbuf[k] : prev[k]);
  CHECK(same);
  free(prev);
  free(back);
  free(bigbuf);
}

/* Runs on the loop thread: one write across LIMIT and one below it. */
#define LIMIT (6u << 20)
#define CROSS_OFF (LIMIT - (100u << 10) - 300u)
#define CROSS_LEN ((1u << 20) + 7u)
#define BELOW_OFF ((1u << 20) + 512u)
#define BELOW_LEN ((64u << 10) + 1u)
static struct vdb_req ereq[2];

static void submit_err(void *arg)
{
  uint8_t *buf = arg;

  ereq[0] = (struct vdb_req){ .type = VDB_REQ_WRITE, .offset = CROSS_OFF, .len = CROSS_LEN,
                              .buf = buf + CROSS_OFF, .done = done_cb };
  ereq[1] = (struct vdb_req){ .type = VDB_REQ_WRITE, .offset = BELOW_OFF, .len = BELOW_LEN,
                              .buf = buf + BELOW_OFF, .done = done_cb };
  vdb_disk_submit(disk, &ereq[0]);
  vdb_disk_submit(disk, &ereq[1]);
}

/* A write that the filesystem refuses part-way (the file size limit here,
 * as a full filesystem refuses with ENOSPC) fails with the filesystem's
 * error, from a loop (writer thread or ring) and synchronously; a write
 * beside it in the same batch succeeds, the bytes outside the failed range
 * are as they were, and the same write succeeds once the limit is lifted. */
static void check_write_errors(void)
{
  struct rlimit old, lim;
  uint8_t *want = malloc(SZ), *back = malloc(SZ);
  bool same = true;
  int errors = w.errors;

  CHECK(want && back);
  CHECK(sync_io(VDB_REQ_READ, 0, 0, SZ, want, NULL, 0, NULL) == 0);
  for (uint32_t k = 0; k < SZ; k++)
    if (in(k, CROSS_OFF, CROSS_LEN) || in(k, BELOW_OFF, BELOW_LEN))
      want[k] = (uint8_t)(k * 13 + (k >> 9) + 1);
  CHECK(getrlimit(RLIMIT_FSIZE, &old) == 0);
  signal(SIGXFSZ, SIG_IGN);
  lim = old;
  lim.rlim_cur = LIMIT;
  CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
  w.last_err = 0;
  run_on_loop(submit_err, want, 2);
  CHECK(w.errors == errors + 1 && w.last_err == -EFBIG);
  w.last_err = 0;
  CHECK(sync_io(VDB_REQ_WRITE, 0, CROSS_OFF, CROSS_LEN, want + CROSS_OFF, NULL, 0, NULL) == 1 &&
        w.last_err == -EFBIG);
  CHECK(setrlimit(RLIMIT_FSIZE, &old) == 0);
  CHECK(sync_io(VDB_REQ_READ, 0, 0, SZ, back, NULL, 0, NULL) == 0);
  for (uint32_t k = 0; k < SZ; k++)
    same = same && (back[k] == want[k] || in(k, CROSS_OFF, CROSS_LEN));
  CHECK(same);
  errors = w.errors;
  run_on_loop(submit_err, want, 2);
  CHECK(w.errors == errors);
  CHECK(sync_io(VDB_REQ_READ, 0, 0, SZ, back, NULL, 0, NULL) == 0 && memcmp(back, want, SZ) == 0);
  free(back);
  free(want);
}

static struct vdb_disk_config file_cfg(const char *path, const char *size, bool create)
{
  struct vdb_disk_config cfg = { .name = "f", .backend = "file", .block_size = 512, .attach = "none" };

  vdb_params_init(&cfg.params);
  vdb_params_set(&cfg.params, "path", path);
  if (size)
    vdb_params_set(&cfg.params, "size", size);
  if (create)
    vdb_params_set(&cfg.params, "create", "1");
  return cfg;
}

int main(void)
{
  char path[] = "/var/tmp/vdbus-test-file-XXXXXX";
  int fd = mkstemp(path);
  struct vdb_disk_config cfg;
  struct vdb_disk *other;
  struct vdb_extent e[8];
  uint32_t n;
  uint8_t small[4096];
  bool ok = true;

  CHECK(fd >= 0);
  close(fd);
  unlink(path);
  CHECK(vdb_workers_start(1) == 0);

  /* --create without --size, then a real create. */
  cfg = file_cfg(path, NULL, true);
  CHECK(vdb_bus_plug(&cfg, &disk) == -EINVAL);
  vdb_params_clear(&cfg.params);
  cfg = file_cfg(path, "8M", true);
  CHECK(vdb_bus_plug(&cfg, &disk) == 0 && disk->size == SZ && disk->can_flush);
  /* A second read-write disk on the same file is refused (lock); --create
   * never overwrites. */
  cfg.name[0] = 'g';
  CHECK(vdb_bus_plug(&cfg, &other) == -EEXIST);
  vdb_params_clear(&cfg.params);
  cfg = file_cfg(path, NULL, false);
  cfg.name[0] = 'g';
  CHECK(vdb_bus_plug(&cfg, &other) == -EBUSY);
  vdb_params_clear(&cfg.params);

  /* Asynchronous writes and reads through the loop's io_uring. */
  for (int i = 0; i < 64; i++) {
    bufs[i] = malloc(65536);
    memset(bufs[i], i + 1, 65536);
  }
  run_on_loop(submit_batch, (void *)(uintptr_t)VDB_REQ_WRITE, 64);
  run_on_loop(submit_flush, NULL, 1);
  for (int i = 0; i < 64; i++)
    memset(bufs[i], 0, 65536);
  run_on_loop(submit_batch, (void *)(uintptr_t)VDB_REQ_READ, 64);
  for (int i = 0; i < 64; i++)
    ok = ok && bufs[i][0] == i + 1 && bufs[i][65535] == i + 1;
  CHECK(ok && w.errors == 0);

  /* Synchronous path (not a loop thread). */
  CHECK(sync_io(VDB_REQ_READ, 0, 65536, 4096, small, NULL, 0, NULL) == 0 && small[0] == 2);
  /* Block status: 4 MiB of data, then a hole. */
  CHECK(sync_io(VDB_REQ_BLOCK_STATUS, 0, 0, SZ, NULL, e, 8, &n) == 0);
  CHECK(n == 2 && e[0].length == 4u << 20 && e[0].flags == 0 &&
        e[1].flags == (VDB_EXTENT_HOLE | VDB_EXTENT_ZERO));
  /* Trim punches a hole that reads back as zeroes. */
  CHECK(sync_io(VDB_REQ_TRIM, 0, 0, 65536, NULL, NULL, 0, NULL) == 0);
  CHECK(sync_io(VDB_REQ_READ, 0, 0, 4096, small, NULL, 0, NULL) == 0 && small[0] == 0);
  CHECK(sync_io(VDB_REQ_BLOCK_STATUS, VDB_REQ_ONE, 0, SZ, NULL, e, 8, &n) == 0 && n == 1 &&
        e[0].flags == (VDB_EXTENT_HOLE | VDB_EXTENT_ZERO) && e[0].length == 65536);
  /* write_zeroes with NO_HOLE keeps the range allocated. */
  CHECK(sync_io(VDB_REQ_WRITE_ZEROES, VDB_REQ_NO_HOLE, 65536, 65536, NULL, NULL, 0, NULL) == 0);
  CHECK(sync_io(VDB_REQ_READ, 0, 65536, 4096, small, NULL, 0, NULL) == 0 && small[0] == 0);
  CHECK(sync_io(VDB_REQ_WRITE_ZEROES, VDB_REQ_FAST_ZERO, 0, 4096, NULL, NULL, 0, NULL) == 0);
  CHECK(sync_io(VDB_REQ_WRITE, VDB_REQ_FUA, SZ - 1, 1, small, NULL, 0, NULL) == 0);
  CHECK(sync_io(VDB_REQ_WRITE, 0, SZ - 1, 2, small, NULL, 0, NULL) == 1);
  CHECK(sync_io(VDB_REQ_CACHE, 0, 0, SZ, NULL, NULL, 0, NULL) == 0);
  check_big_writes(1);
  check_write_errors();
  vdb_disk_put(disk);
  CHECK(vdb_bus_unplug("f", false) == 0);

  /* Read-only: plugged read-only, writes refused; --size larger than the
   * file refused; a smaller --size is a prefix. */
  cfg = file_cfg(path, NULL, false);
  vdb_params_set(&cfg.params, "readonly", "1");
  cfg.readonly = true;
  CHECK(vdb_bus_plug(&cfg, &disk) == 0 && disk->readonly);
  CHECK(sync_io(VDB_REQ_WRITE, 0, 0, 1, small, NULL, 0, NULL) == 1);
  cfg.name[0] = 'g';   /* two read-only disks may share a file */
  CHECK(vdb_bus_plug(&cfg, &other) == 0);
  vdb_disk_put(other);
  CHECK(vdb_bus_unplug("g", false) == 0);
  vdb_disk_put(disk);
  CHECK(vdb_bus_unplug("f", false) == 0);
  vdb_params_clear(&cfg.params);
  cfg = file_cfg(path, "16M", false);
  CHECK(vdb_bus_plug(&cfg, &disk) == -EINVAL);
  vdb_params_set(&cfg.params, "size", "1M");
  CHECK(vdb_bus_plug(&cfg, &disk) == 0 && disk->size == 1u << 20);
  vdb_disk_put(disk);
  CHECK(vdb_bus_unplug("f", false) == 0);
  vdb_params_clear(&cfg.params);

  /* The same big writes with no writer thread: through the loop's ring,
   * piece after piece. */
  setenv("VDBUS_FILE_WRITER", "0", 1);
  cfg = file_cfg(path, NULL, false);
  CHECK(vdb_bus_plug(&cfg, &disk) == 0);
  check_big_writes(2);
  check_write_errors();
  vdb_disk_put(disk);
  CHECK(vdb_bus_unplug("f", false) == 0);
  vdb_params_clear(&cfg.params);
  unsetenv("VDBUS_FILE_WRITER");

  /* Not a regular file or block device. */
  cfg = file_cfg("/var/tmp", NULL, false);
  CHECK(vdb_bus_plug(&cfg, &disk) == -EISDIR || vdb_bus_plug(&cfg, &disk) == -EINVAL);
  vdb_params_clear(&cfg.params);

  vdb_workers_stop();
  for (int i = 0; i < 64; i++)
    free(bufs[i]);
  unlink(path);
  return tap_done("file");
}
