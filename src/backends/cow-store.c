/* vdbus — the store of a copy-on-write overlay (see cow-store.h). */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <vdbus/backend.h>
#include "backends/cow-store.h"

#define COW_MAGIC "VDBUSCOW"
#define COW_VERSION 1u
#define COW_HEADER_LEN 4096u
#define COW_ALIGN (1u << 20)

struct cow_header {
  char magic[8];
  uint32_t version;
  uint32_t chunk;
  uint64_t size;
  uint64_t map_off, map_len, data_off;
  char base[64];
};

static uint64_t round_up(uint64_t x, uint64_t a)
{
  return (x + a - 1) / a * a;
}

static void store_geometry(struct cow_store *st, uint64_t size, uint64_t chunk)
{
  st->size = size;
  st->chunk = chunk;
  st->shift = (unsigned)__builtin_ctzll(chunk);
  st->nchunks = (size + chunk - 1) >> st->shift;
  st->map_len = round_up(st->nchunks ? st->nchunks : 1, 4096);
}

static int store_open_ram(struct cow_store *st)
{
  st->ram_len = round_up(st->size, 4096);
  st->ram = mmap(NULL, st->ram_len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (st->ram == MAP_FAILED) {
    st->ram = NULL;
    vdb_set_error("cow backend: cannot reserve %llu bytes for a RAM store: %s",
                  (unsigned long long)st->ram_len, strerror(errno));
    return -ENOMEM;
  }
  madvise(st->ram, st->ram_len, MADV_NOHUGEPAGE);
  st->map_mem = calloc(1, st->map_len);
  if (!st->map_mem) {
    munmap(st->ram, st->ram_len);
    st->ram = NULL;
    return -ENOMEM;
  }
  st->map = st->map_mem;
  return 0;
}

static int store_fsync_dir(const char *path)
{
  char tmp[PATH_MAX];
  int fd;

  snprintf(tmp, sizeof tmp, "%s", path);
  fd = open(dirname(tmp), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return -errno;
  fsync(fd);
  close(fd);
  return 0;
}

static int store_create_file(struct cow_store *st, const char *base_name)
{
  struct cow_header h = { .version = COW_VERSION };
  char page[COW_HEADER_LEN] = { 0 };

  memcpy(h.magic, COW_MAGIC, 8);
  h.chunk = (uint32_t)st->chunk;
  h.size = st->size;
  h.map_off = COW_HEADER_LEN;
  h.map_len = st->map_len;
  h.data_off = round_up(COW_HEADER_LEN + st->map_len, st->chunk > COW_ALIGN ? st->chunk : COW_ALIGN);
  snprintf(h.base, sizeof h.base, "%s", base_name);
  memcpy(page, &h, sizeof h);
  if (pwrite(st->fd, page, sizeof page, 0) != (ssize_t)sizeof page ||
      ftruncate(st->fd, (off_t)(h.data_off + st->size)) < 0 || fsync(st->fd) < 0) {
    int e = errno ? errno : EIO;
    vdb_set_error("cow backend: cannot create the store %s: %s", st->path, strerror(e));
    return -e;
  }
  st->data_off = h.data_off;
  store_fsync_dir(st->path); /* best effort: the header is synced */
  return 0;
}

static int store_check_header(struct cow_store *st, const char *base_name)
{
  struct cow_header h;
  struct stat sb;

  if (pread(st->fd, &h, sizeof h, 0) != (ssize_t)sizeof h || memcmp(h.magic, COW_MAGIC, 8) != 0) {
    vdb_set_error("cow backend: %s is not a vdbus overlay store", st->path);
    return -EINVAL;
  }
  if (h.version != COW_VERSION) {
    vdb_set_error("cow backend: %s is a version %u store (this vdbus reads version %u)", st->path,
                  h.version, COW_VERSION);
    return -EINVAL;
  }
  h.base[sizeof h.base - 1] = '\0';
  if (strcmp(h.base, base_name) != 0) {
    vdb_set_error("cow backend: the store %s belongs to an overlay of '%s', not of '%s'", st->path,
                  h.base, base_name);
    return -EINVAL;
  }
  if (h.size != st->size) {
    vdb_set_error("cow backend: the store %s is for a %llu-byte disk, the base has %llu bytes",
                  st->path, (unsigned long long)h.size, (unsigned long long)st->size);
    return -EINVAL;
  }
  if (h.chunk < COW_CHUNK_MIN || h.chunk > COW_CHUNK_MAX || (h.chunk & (h.chunk - 1))) {
    vdb_set_error("cow backend: the store %s has a bad chunk size %u", st->path, h.chunk);
    return -EINVAL;
  }
  store_geometry(st, h.size, h.chunk);
  if (h.map_off != COW_HEADER_LEN || h.map_len != st->map_len || h.data_off < h.map_off + h.map_len ||
      fstat(st->fd, &sb) < 0 || (uint64_t)sb.st_size < h.data_off) {
    vdb_set_error("cow backend: the store %s is damaged (bad map or data offsets)", st->path);
    return -EINVAL;
  }
  st->data_off = h.data_off;
  if ((uint64_t)sb.st_size < h.data_off + h.size && !st->readonly &&
      ftruncate(st->fd, (off_t)(h.data_off + h.size)) < 0)
    return -errno;
  return 0;
}

static int store_open_file(struct cow_store *st, const char *path, const char *base_name)
{
  bool created = false;
  int r;

  if (strlen(path) >= sizeof st->path || path[0] != '/') {
    vdb_set_error("cow backend: store file:PATH needs an absolute path, not '%s'", path);
    return -EINVAL;
  }
  snprintf(st->path, sizeof st->path, "%s", path);
  st->fd = open(path, (st->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (st->fd < 0 && errno == ENOENT && !st->readonly) {
    st->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    created = st->fd >= 0;
  }
  if (st->fd < 0) {
    r = -errno;
    if (r == -ENOENT && st->readonly)
      vdb_set_error("cow backend: a read-only overlay needs an existing store; %s does not exist",
                    path);
    else
      vdb_set_error("cow backend: cannot open the store %s: %s", path, strerror(errno));
    return r;
  }
  if (flock(st->fd, (st->readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0) {
    vdb_set_error("cow backend: the store %s is in use by another disk or program", path);
    r = -EBUSY;
    goto err;
  }
  r = created ? store_create_file(st, base_name) : store_check_header(st, base_name);
  if (r < 0)
    goto err;
  st->map_mem = mmap(NULL, st->map_len, st->readonly ? PROT_READ : PROT_READ | PROT_WRITE,
                     MAP_SHARED, st->fd, COW_HEADER_LEN);
  if (st->map_mem == MAP_FAILED) {
    st->map_mem = NULL;
    r = -errno;
    vdb_set_error("cow backend: cannot map the chunk map of %s: %s", path, strerror(errno));
    goto err;
  }
  st->map = st->map_mem;
  return 0;

err:
  close(st->fd);
  st->fd = -1;
  if (created)
    unlink(path);
  return r;
}

int cow_store_open(struct cow_store *st, const char *spec, const char *base_name, uint64_t size,
                   uint64_t chunk, bool readonly)
{
  memset(st, 0, sizeof *st);
  st->fd = -1;
  st->readonly = readonly;
  store_geometry(st, size, chunk);
  if (strcmp(spec, "ram") == 0)
    return store_open_ram(st);
  if (strncmp(spec, "file:", 5) == 0) {
    st->is_file = true;
    return store_open_file(st, spec + 5, base_name);
  }
  vdb_set_error("cow backend: store must be 'ram' or 'file:PATH', not '%s'", spec);
  return -EINVAL;
}

void cow_store_close(struct cow_store *st)
{
  if (st->is_file) {
    if (st->map_mem) {
      if (!st->readonly)
        msync(st->map_mem, st->map_len, MS_SYNC);
      munmap(st->map_mem, st->map_len);
    }
    if (st->fd >= 0) {
      if (!st->readonly)
        fdatasync(st->fd);
      close(st->fd);
    }
  } else {
    if (st->ram)
      munmap(st->ram, st->ram_len);
    free(st->map_mem);
  }
  st->map_mem = NULL;
  st->ram = NULL;
  st->fd = -1;
}

/* pread/pwrite the whole range (short transfers retried). */
static int store_pio(struct cow_store *st, bool wr, void *buf, uint64_t off, uint64_t len, int fl)
{
  uint8_t *p = buf;

  while (len > 0) {
    struct iovec iov = { p, len > (1u << 30) ? (1u << 30) : len };
    ssize_t n = wr ? pwritev2(st->fd, &iov, 1, (off_t)(st->data_off + off), fl)
                   : pread(st->fd, p, iov.iov_len, (off_t)(st->data_off + off));
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return -errno;
    if (n == 0) {
      if (wr)
        return -EIO;
      memset(p, 0, len); /* past the end of a short file: a hole */
      return 0;
    }
    p += n;
    off += (uint64_t)n;
    len -= (uint64_t)n;
  }
  return 0;
}

int cow_store_read(struct cow_store *st, void *buf, uint64_t off, uint64_t len)
{
  if (!st->is_file) {
    memcpy(buf, st->ram + off, len);
    return 0;
  }
  return store_pio(st, false, buf, off, len, 0);
}

int cow_store_write(struct cow_store *st, const void *buf, uint64_t off, uint64_t len, bool fua)
{
  if (!st->is_file) {
    memcpy(st->ram + off, buf, len);
    return 0;
  }
  return store_pio(st, true, (void *)buf, off, len, fua ? RWF_DSYNC : 0);
}

int cow_store_zero(struct cow_store *st, uint64_t off, uint64_t len, bool fua)
{
  if (!st->is_file) {
    memset(st->ram + off, 0, len);
    return 0;
  }
  if (fallocate(st->fd, FALLOC_FL_ZERO_RANGE, (off_t)(st->data_off + off), (off_t)len) < 0) {
    static const uint8_t zeroes[65536];
    while (len > 0) {
      uint64_t n = len < sizeof zeroes ? len : sizeof zeroes;
      int r = store_pio(st, true, (void *)zeroes, off, n, 0);
      if (r < 0)
        return r;
      off += n;
      len -= n;
    }
  }
  return fua && fdatasync(st->fd) < 0 ? -errno : 0;
}

int cow_store_punch(struct cow_store *st, uint64_t off, uint64_t len)
{
  if (!st->is_file) {
    uint64_t a = round_up(off, 4096), b = (off + len) / 4096 * 4096;
    if (a < b) {
      memset(st->ram + off, 0, a - off);
      madvise(st->ram + a, b - a, MADV_DONTNEED);
      memset(st->ram + b, 0, off + len - b);
    } else {
      memset(st->ram + off, 0, len);
    }
    return 0;
  }
  if (fallocate(st->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(st->data_off + off),
                (off_t)len) < 0)
    return cow_store_zero(st, off, len, false);
  return 0;
}

int cow_store_sync(struct cow_store *st)
{
  if (!st->is_file || st->readonly)
    return 0;
  if (fdatasync(st->fd) < 0)
    return -errno;
  if (msync(st->map_mem, st->map_len, MS_SYNC) < 0)
    return -errno;
  return 0;
}
