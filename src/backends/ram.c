/* vdbus — backend "ram": a sparse disk in anonymous memory.
 *
 * The whole disk is one MAP_NORESERVE anonymous mapping: pages never written
 * cost nothing and read as zeroes (the kernel maps its zero page), so the
 * data path never allocates.  Trim and write_zeroes give whole pages back
 * with MADV_DONTNEED.  A bitmap of written pages (atomic words) answers
 * block status.  Pages are 4 KiB when written, so that resident memory
 * tracks the data written and a trimmed 4 KiB page really is freed; once
 * every page of an aligned 2 MiB region is written, a thread of the disk
 * asks the kernel to map the region with one huge page (MADV_COLLAPSE,
 * Linux 6.1), which is what random I/O into a full disk wants: one TLB
 * entry and page-table entry per 2 MiB (on this project's test hosts, whose
 * TLB misses are dear, 4 KiB writes into a full disk cost a third less CPU).
 * Full regions wait in a bitmap, so however fast a disk is filled none is
 * dropped (a bounded queue dropped those it had no room for, and they were
 * collapsed only when next written: by the first I/O after the fill).
 * A trim inside such a region splits it again.  Not with THP "always", where
 * the mapping must refuse huge pages outright (MADV_NOHUGEPAGE), nor under
 * VDBUS_RAM_COLLAPSE=0.
 *
 * Concurrency: requests from any thread run in parallel without locks;
 * overlapping concurrent requests have no defined order (as on real disks). */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <stdio.h>
#include <unistd.h>

#include <vdbus/backend.h>

#include "common/copy.h"
#include "common/thp.h"

#define RAM_PAGE 4096u
#define RAM_HUGE (2u << 20)        /* a region one huge page maps */
#define RAM_HUGE_WORDS (RAM_HUGE / RAM_PAGE / 64)
#define RAM_MAX_SIZE (1ull << 46) /* 64 TiB of address space */
#define RAM_RETRIES 100            /* passes over regions the kernel found busy */

struct ram {
  uint8_t *base;      /* RAM_HUGE-aligned */
  uint64_t size;      /* bytes, as plugged */
  uint64_t map_size;  /* rounded up to pages */
  _Atomic uint64_t *bitmap; /* bit set = page written */
  /* Huge pages for full regions (see the top).  huge: bit set = the region
   * was full and went to the collapser (cleared by a trim in it); pending:
   * bit set = the collapser has yet to collapse the region. */
  _Atomic uint64_t *huge;
  _Atomic uint64_t *pending;
  uint64_t huge_words;        /* words of huge and pending */
  _Atomic bool collapse;      /* try it (off after EINVAL: an older kernel) */
  bool collapser_on;
  pthread_t collapser;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool work;                  /* under lock: pending bits were set */
  _Atomic bool stop;
};

static inline void bit_set(struct ram *r, uint64_t pg)
{
  uint64_t m = 1ull << (pg & 63);
  if (!(atomic_load_explicit(&r->bitmap[pg >> 6], memory_order_relaxed) & m))
    atomic_fetch_or_explicit(&r->bitmap[pg >> 6], m, memory_order_relaxed);
}

static inline void bit_clear(struct ram *r, uint64_t pg)
{
  atomic_fetch_and_explicit(&r->bitmap[pg >> 6], ~(1ull << (pg & 63)), memory_order_relaxed);
}

static inline bool bit_test(struct ram *r, uint64_t pg)
{
  return atomic_load_explicit(&r->bitmap[pg >> 6], memory_order_relaxed) >> (pg & 63) & 1;
}

/* Reserve the disk's address space, aligned to RAM_HUGE so that its
 * regions can be huge pages.  Returns 0 or -errno. */
static int ram_map(struct ram *r)
{
  const char *env = getenv("VDBUS_RAM_COLLAPSE");
  size_t len = r->map_size + RAM_HUGE;
  uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  uintptr_t a;

  if (p == MAP_FAILED)
    return -errno;
  a = ((uintptr_t)p + RAM_HUGE - 1) & ~(uintptr_t)(RAM_HUGE - 1);
  if (a > (uintptr_t)p)
    munmap(p, a - (uintptr_t)p);
  if ((uintptr_t)p + len > a + r->map_size)
    munmap((uint8_t *)a + r->map_size, (uintptr_t)p + len - (a + r->map_size));
  r->base = (uint8_t *)a;
  /* THP "always" would give a sparse disk a huge page per first write. */
  r->collapse = !(env && strcmp(env, "0") == 0) && !vdb_thp_always();
  if (!r->collapse)
    madvise(r->base, r->map_size, MADV_NOHUGEPAGE);
  return 0;
}

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

static bool region_full(struct ram *r, uint64_t region)
{
  for (unsigned i = 0; i < RAM_HUGE_WORDS; i++)
    if (atomic_load_explicit(&r->bitmap[region * RAM_HUGE_WORDS + i], memory_order_relaxed) !=
        ~0ull)
      return false;
  return true;
}

/* Collapse the regions pending in one pass over the bitmap.  Returns true
 * if one is pending again: the kernel found it busy (EAGAIN) and retry. */
static bool ram_collapse_pass(struct ram *r, bool retry)
{
  bool again = false;

  for (uint64_t w = 0; w < r->huge_words && !atomic_load(&r->stop); w++) {
    uint64_t bits = atomic_exchange_explicit(&r->pending[w], 0, memory_order_relaxed);

    while (bits && atomic_load_explicit(&r->collapse, memory_order_relaxed)) {
      uint64_t g = w * 64 + (uint64_t)__builtin_ctzll(bits);
      uint64_t m = 1ull << (g & 63);

      bits &= bits - 1;
      /* Trimmed since it was full: the collapse would fill its holes. */
      if (!(atomic_load_explicit(&r->huge[w], memory_order_relaxed) & m) || !region_full(r, g))
        continue;
      /* The kernel copies the region into a huge page under its own locks;
       * writes and trims meanwhile are safe (they wait or split it again). */
      if (madvise(r->base + g * RAM_HUGE, RAM_HUGE, MADV_COLLAPSE) == 0)
        continue;
      if (errno == EINVAL) {
        r->collapse = false;   /* not this kernel */
      } else if (errno == EAGAIN && retry) {
        atomic_fetch_or_explicit(&r->pending[w], m, memory_order_relaxed);
        again = true;
      }
      /* ENOMEM and the rest: no huge page to be had; the region stays in
       * small pages (a trim and rewrite tries again). */
    }
  }
  return again;
}

static void *ram_collapser(void *arg)
{
  struct ram *r = arg;
  unsigned retries = 0;

  pthread_mutex_lock(&r->lock);
  for (;;) {
    bool again;

    while (!r->stop && !r->work)
      pthread_cond_wait(&r->cond, &r->lock);
    if (r->stop)
      break;
    r->work = false;
    pthread_mutex_unlock(&r->lock);
    /* Busy regions: try again a little later, for up to about a second
     * (then they stay in small pages, as after ENOMEM). */
    again = ram_collapse_pass(r, retries < RAM_RETRIES);
    retries = again ? retries + 1 : 0;
    if (again)
      usleep(10000);
    pthread_mutex_lock(&r->lock);
    if (again)
      r->work = true;
  }
  pthread_mutex_unlock(&r->lock);
  return NULL;
}

static void ram_collapser_start(struct ram *r)
{
  pthread_mutex_init(&r->lock, NULL);
  pthread_cond_init(&r->cond, NULL);
  if (r->collapse)
    r->collapser_on = pthread_create(&r->collapser, NULL, ram_collapser, r) == 0;
  if (!r->collapser_on)
    r->collapse = false;
}

/* Hand the regions of [off, off+len) that are now full to the collapser. */
static void ram_collapse_full(struct ram *r, uint64_t off, uint64_t len)
{
  for (uint64_t g = off / RAM_HUGE; g <= (off + len - 1) / RAM_HUGE; g++) {
    uint64_t m = 1ull << (g & 63);

    if ((g + 1) * RAM_HUGE > r->map_size ||
        (atomic_load_explicit(&r->huge[g >> 6], memory_order_relaxed) & m) || !region_full(r, g) ||
        (atomic_fetch_or_explicit(&r->huge[g >> 6], m, memory_order_relaxed) & m))
      continue;
    atomic_fetch_or_explicit(&r->pending[g >> 6], m, memory_order_relaxed);
    pthread_mutex_lock(&r->lock);
    if (!r->work) {
      r->work = true;
      pthread_cond_signal(&r->cond);
    }
    pthread_mutex_unlock(&r->lock);
  }
}

static int ram_open(const struct vdb_params *params, void **handle, struct vdb_backend_info *info)
{
  struct ram *r;
  uint64_t size;
  int e = vdb_params_get_size(params, "size", &size);

  if (e == -ENOENT) {
    vdb_set_error("ram backend: --size is required");
    return -EINVAL;
  }
  if (e < 0 || size == 0 || size > RAM_MAX_SIZE) {
    vdb_set_error("ram backend: bad size '%s' (1 byte to 64T)", vdb_params_get(params, "size"));
    return -EINVAL;
  }
  r = calloc(1, sizeof *r);
  if (!r)
    return -ENOMEM;
  r->size = size;
  r->map_size = (size + RAM_PAGE - 1) / RAM_PAGE * RAM_PAGE;
  if ((e = ram_map(r)) < 0) {
    vdb_set_error("ram backend: cannot reserve %llu bytes of address space: %s",
                  (unsigned long long)r->map_size, strerror(-e));
    free(r);
    return e;
  }
  r->bitmap = calloc((r->map_size / RAM_PAGE + 63) / 64, sizeof(uint64_t));
  r->huge_words = (r->map_size / RAM_HUGE + 63) / 64 + 1;
  r->huge = calloc(r->huge_words, sizeof(uint64_t));
  r->pending = calloc(r->huge_words, sizeof(uint64_t));
  if (!r->bitmap || !r->huge || !r->pending) {
    munmap(r->base, r->map_size);
    free(r->bitmap);
    free(r->huge);
    free(r->pending);
    free(r);
    return -ENOMEM;
  }
  ram_collapser_start(r);
  info->size = size;
  info->volatile_cache = false;
  snprintf(info->description, sizeof info->description, "RAM disk (volatile)");
  *handle = r;
  return 0;
}

static void ram_close(void *handle)
{
  struct ram *r = handle;

  if (r->collapser_on) {
    pthread_mutex_lock(&r->lock);
    r->stop = true;
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->lock);
    pthread_join(r->collapser, NULL);
  }
  pthread_mutex_destroy(&r->lock);
  pthread_cond_destroy(&r->cond);
  munmap(r->base, r->map_size);
  free(r->bitmap);
  free(r->huge);
  free(r->pending);
  free(r);
}

static void ram_read(void *handle, struct vdb_req *req)
{
  struct ram *r = handle;

  if (req->flags & VDB_REQ_MAP)
    req->buf = r->base + req->offset;   /* sent straight from the disk's pages */
  else
    memcpy(req->buf, r->base + req->offset, req->len);
  vdb_req_complete(req, 0);
}

static void ram_mark(struct ram *r, uint64_t off, uint64_t len)
{
  for (uint64_t pg = off / RAM_PAGE; pg <= (off + len - 1) / RAM_PAGE; pg++)
    bit_set(r, pg);
  if (atomic_load_explicit(&r->collapse, memory_order_relaxed))
    ram_collapse_full(r, off, len);
}

/* Writes land on pages that are not in the cache: streaming stores.  An NBD
 * WRITE usually comes through ram_write_direct, from the connection's
 * input buffer or the socket; this is everyone else (loop, ublk, layers). */
static void ram_write(void *handle, struct vdb_req *req)
{
  struct ram *r = handle;

  vdb_copy_stream(r->base + req->offset, req->buf, req->len);
  ram_mark(r, req->offset, req->len);
  vdb_req_complete(req, 0);
}

static ssize_t ram_write_direct(void *handle, uint64_t off, uint64_t len,
                                ssize_t (*fill)(void *dst, size_t len, void *arg), void *arg)
{
  struct ram *r = handle;
  ssize_t n = fill(r->base + off, (size_t)len, arg);

  if (n > 0)
    ram_mark(r, off, (uint64_t)n);
  return n;
}

/* Zero [off, off+len): whole pages are given back to the kernel, the
 * partial pages at either end are cleared in place. */
static void ram_punch(struct ram *r, uint64_t off, uint64_t len)
{
  uint64_t end = off + len;
  uint64_t a = (off + RAM_PAGE - 1) / RAM_PAGE * RAM_PAGE;
  uint64_t b = end / RAM_PAGE * RAM_PAGE;

  if (a >= b) {
    memset(r->base + off, 0, len);
    return;
  }
  if (off < a)
    memset(r->base + off, 0, a - off);
  if (b < end)
    memset(r->base + b, 0, end - b);
  /* The marks first, the pages after: the collapser then leaves a region
   * it has yet to collapse (collapsing it would fill the hole again), and
   * a write racing the trim can leave a page marked written that reads as
   * zeroes, never one marked a hole that holds data. */
  for (uint64_t g = a / RAM_HUGE; g <= (b - 1) / RAM_HUGE; g++)
    atomic_fetch_and_explicit(&r->huge[g >> 6], ~(1ull << (g & 63)), memory_order_relaxed);
  for (uint64_t pg = a / RAM_PAGE; pg < b / RAM_PAGE; pg++)
    bit_clear(r, pg);
  madvise(r->base + a, b - a, MADV_DONTNEED);   /* splits a huge page it cuts into */
}

static void ram_trim(void *handle, struct vdb_req *req)
{
  ram_punch(handle, req->offset, req->len);
  vdb_req_complete(req, 0);
}

static void ram_write_zeroes(void *handle, struct vdb_req *req)
{
  struct ram *r = handle;

  if (req->flags & VDB_REQ_NO_HOLE) {
    memset(r->base + req->offset, 0, req->len);
    ram_mark(r, req->offset, req->len);
  } else {
    ram_punch(r, req->offset, req->len);
  }
  vdb_req_complete(req, 0);
}

static void ram_block_status(void *handle, struct vdb_req *req)
{
  struct ram *r = handle;
  uint64_t off = req->offset, end = req->offset + req->len;

  while (off < end && req->nr_extents < req->max_extents) {
    uint64_t pg = off / RAM_PAGE;
    bool data = bit_test(r, pg);
    uint64_t next = (pg + 1) * RAM_PAGE;

    while (next < end && bit_test(r, next / RAM_PAGE) == data)
      next += RAM_PAGE;
    if (next > end)
      next = end;
    req->extents[req->nr_extents].length = next - off;
    req->extents[req->nr_extents].flags = data ? 0 : VDB_EXTENT_HOLE | VDB_EXTENT_ZERO;
    req->nr_extents++;
    off = next;
    if (req->flags & VDB_REQ_ONE)
      break;
  }
  vdb_req_complete(req, 0);
}

const struct vdb_backend_ops vdb_backend_ram = {
  .api_version = VDB_BACKEND_API_VERSION,
  .struct_size = sizeof(struct vdb_backend_ops),
  .flags = VDB_BACKEND_VOLATILE,
  .name = "ram",
  .summary = "a sparse disk in memory (volatile: its data is lost at unplug or restart)",
  .usage = "size=SIZE      disk size (K/M/G/T suffixes), required\n",
  .open = ram_open,
  .close = ram_close,
  .read = ram_read,
  .write = ram_write,
  .trim = ram_trim,
  .write_zeroes = ram_write_zeroes,
  .block_status = ram_block_status,
  .write_direct = ram_write_direct,
};
