/* vdbus — backend "ram": a sparse disk in anonymous memory.
 *
 * The whole disk is one MAP_NORESERVE anonymous mapping: pages never written
 * cost nothing and read as zeroes (the kernel maps its zero page), so the
 * data path never allocates.  Trim and write_zeroes give whole pages back
 * with MADV_DONTNEED.  A bitmap of written pages (atomic words) answers
 * block status.  Transparent huge pages are turned off for the mapping so
 * that a trimmed 4 KiB page really is freed and resident memory tracks the
 * data written.
 *
 * Concurrency: requests from any thread run in parallel without locks;
 * overlapping concurrent requests have no defined order (as on real disks). */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <stdio.h>
#include <unistd.h>

#include <vdbus/backend.h>

#include "common/copy.h"

#define RAM_PAGE 4096u
#define RAM_MAX_SIZE (1ull << 46) /* 64 TiB of address space */

struct ram {
  uint8_t *base;
  uint64_t size;      /* bytes, as plugged */
  uint64_t map_size;  /* rounded up to pages */
  _Atomic uint64_t *bitmap; /* bit set = page written */
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
  r->base = mmap(NULL, r->map_size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r->base == MAP_FAILED) {
    e = -errno;
    vdb_set_error("ram backend: cannot reserve %llu bytes of address space: %s",
                  (unsigned long long)r->map_size, strerror(errno));
    free(r);
    return e;
  }
  madvise(r->base, r->map_size, MADV_NOHUGEPAGE);
  r->bitmap = calloc((r->map_size / RAM_PAGE + 63) / 64, sizeof(uint64_t));
  if (!r->bitmap) {
    munmap(r->base, r->map_size);
    free(r);
    return -ENOMEM;
  }
  info->size = size;
  info->volatile_cache = false;
  snprintf(info->description, sizeof info->description, "RAM disk (volatile)");
  *handle = r;
  return 0;
}

static void ram_close(void *handle)
{
  struct ram *r = handle;

  munmap(r->base, r->map_size);
  free(r->bitmap);
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
  madvise(r->base + a, b - a, MADV_DONTNEED);
  for (uint64_t pg = a / RAM_PAGE; pg < b / RAM_PAGE; pg++)
    bit_clear(r, pg);
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
