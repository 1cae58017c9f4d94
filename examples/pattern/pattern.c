/* vdbus example plugin — backend "pattern": a disk whose every 8-byte word
 * reads, until it is written, as its own offset (a 64-bit big-endian
 * number: the words at 0, 8, 16 hold 0, 8, 16), the same data as nbdkit's
 * pattern plugin.  Writes go to a sparse overlay in memory, so the disk is
 * writable, and volatile.  Useful to test clients end to end: any byte read
 * can be checked against its offset alone.
 *
 * It is an out-of-tree backend: it includes only <vdbus/backend.h> and libc,
 * and builds with
 *     cc -shared -fPIC -O2 -Wall $(pkg-config --cflags vdbus-backend) \
 *        pattern.c -o pattern.so
 * (see the Makefile next to it); put pattern.so in vdbusd's plugin directory
 * and `vdbus plug pattern 1G`.
 *
 * The overlay is a three-level table of 4 KiB chunks (1 GiB per top entry,
 * 2 MiB per leaf), filled on first write.  A chunk is absent (reads as the
 * pattern), a buffer, or ZEROED (written with zeroes, reads as zeroes,
 * needs no memory).  One reader-writer lock: reads and block status share
 * it, writes, trims and zeroing take it exclusively.  Every request is
 * completed inline. */
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vdbus/backend.h>

#define CHUNK 4096u
#define LEAF_CHUNKS 512u                       /* chunks per leaf: 2 MiB */
#define MID_LEAVES 512u                        /* leaves per mid: 1 GiB */
#define MID_BYTES ((uint64_t)CHUNK * LEAF_CHUNKS * MID_LEAVES)
#define LEAF_BYTES ((uint64_t)CHUNK * LEAF_CHUNKS)
#define PATTERN_MAX_SIZE (64ull << 40)         /* 64 TiB: 64 Ki top entries */

static const uint8_t zero_chunk[CHUNK];
#define ZEROED ((uint8_t *)zero_chunk)         /* never written through */

struct leaf {
  uint8_t *chunk[LEAF_CHUNKS];   /* NULL = pattern, ZEROED, or CHUNK bytes */
};

struct mid {
  struct leaf *leaf[MID_LEAVES];
};

struct pattern {
  uint64_t size;
  size_t ntop;
  struct mid **top;              /* ntop entries, NULL = all pattern */
  pthread_rwlock_t lock;         /* protects the table and the chunks */
};

/* Fill buf with the pattern of [off, off + len). */
static void pattern_fill(uint8_t *buf, uint64_t off, uint64_t len)
{
  while (len > 0 && (off & 7)) {
    uint64_t word = off & ~7ull;
    *buf++ = (uint8_t)(word >> (8 * (7 - (off & 7))));
    off++;
    len--;
  }
  for (; len >= 8; buf += 8, off += 8, len -= 8) {
    uint64_t be = htobe64(off);
    memcpy(buf, &be, 8);
  }
  for (uint64_t i = 0; i < len; i++)
    buf[i] = (uint8_t)(off >> (8 * (7 - i)));
}

/* The slot of chunk number c; NULL if its table levels do not exist (and
 * create is false, or memory ran out).  Caller holds the lock (exclusively
 * if create). */
static uint8_t **chunk_slot(struct pattern *p, uint64_t c, bool create)
{
  uint64_t t = c / ((uint64_t)LEAF_CHUNKS * MID_LEAVES);
  uint64_t l = c / LEAF_CHUNKS % MID_LEAVES;
  struct mid **mp = &p->top[t];
  struct leaf **lp;

  if (!*mp && (!create || !(*mp = calloc(1, sizeof **mp))))
    return NULL;
  lp = &(*mp)->leaf[l];
  if (!*lp && (!create || !(*lp = calloc(1, sizeof **lp))))
    return NULL;
  return &(*lp)->chunk[c % LEAF_CHUNKS];
}

static void chunk_free(uint8_t *chunk)
{
  if (chunk != ZEROED)
    free(chunk);
}

/* Make the chunk in *slot a buffer of its own (copying what it reads as),
 * so that part of it can be overwritten.  Returns 0 or -ENOMEM. */
static int chunk_materialize(uint8_t **slot, uint64_t chunk_off)
{
  uint8_t *b;

  if (*slot && *slot != ZEROED)
    return 0;
  if (!(b = malloc(CHUNK)))
    return -ENOMEM;
  if (*slot == ZEROED)
    memset(b, 0, CHUNK);
  else
    pattern_fill(b, chunk_off, CHUNK);
  *slot = b;
  return 0;
}

static int pattern_open(const struct vdb_params *params, void **handle,
                        struct vdb_backend_info *info)
{
  struct pattern *p;
  uint64_t size;
  int r = vdb_params_get_size(params, "size", &size);

  if (r == -ENOENT) {
    vdb_set_error("pattern backend: a size is required (vdbus plug pattern SIZE)");
    return -EINVAL;
  }
  if (r < 0 || size == 0 || size > PATTERN_MAX_SIZE) {
    vdb_set_error("pattern backend: bad size '%s': from 1 byte to 64T",
                  vdb_params_get(params, "size"));
    return -EINVAL;
  }
  if (!(p = calloc(1, sizeof *p)))
    return -ENOMEM;
  p->size = size;
  p->ntop = (size_t)((size + MID_BYTES - 1) / MID_BYTES);
  if (!(p->top = calloc(p->ntop, sizeof *p->top))) {
    free(p);
    return -ENOMEM;
  }
  pthread_rwlock_init(&p->lock, NULL);
  info->size = size;
  snprintf(info->description, sizeof info->description,
           "offset pattern, writes kept in memory");
  *handle = p;
  return 0;
}

static void pattern_close(void *handle)
{
  struct pattern *p = handle;

  for (size_t t = 0; t < p->ntop; t++) {
    if (!p->top[t])
      continue;
    for (unsigned l = 0; l < MID_LEAVES; l++) {
      struct leaf *lf = p->top[t]->leaf[l];
      if (!lf)
        continue;
      for (unsigned c = 0; c < LEAF_CHUNKS; c++)
        chunk_free(lf->chunk[c]);
      free(lf);
    }
    free(p->top[t]);
  }
  free(p->top);
  pthread_rwlock_destroy(&p->lock);
  free(p);
}

/* The piece of [off, end) that lies in off's chunk: its length. */
static uint64_t piece_len(uint64_t off, uint64_t end)
{
  uint64_t next = (off / CHUNK + 1) * CHUNK;

  return (next < end ? next : end) - off;
}

static void pattern_read(void *handle, struct vdb_req *req)
{
  struct pattern *p = handle;
  uint8_t *buf = req->buf;
  uint64_t off = req->offset, end = req->offset + req->len;

  pthread_rwlock_rdlock(&p->lock);
  while (off < end) {
    uint64_t n = piece_len(off, end);
    uint8_t **slot = chunk_slot(p, off / CHUNK, false);
    if (slot && *slot)
      memcpy(buf, *slot + off % CHUNK, n);
    else
      pattern_fill(buf, off, n);
    buf += n;
    off += n;
  }
  pthread_rwlock_unlock(&p->lock);
  vdb_req_complete(req, 0);
}

static void pattern_write(void *handle, struct vdb_req *req)
{
  struct pattern *p = handle;
  const uint8_t *buf = req->buf;
  uint64_t off = req->offset, end = req->offset + req->len;
  int r = 0;

  pthread_rwlock_wrlock(&p->lock);
  while (off < end && r == 0) {
    uint64_t n = piece_len(off, end);
    uint8_t **slot = chunk_slot(p, off / CHUNK, true);
    if (!slot || (r = chunk_materialize(slot, off - off % CHUNK)) < 0) {
      r = -ENOMEM;
      break;
    }
    memcpy(*slot + off % CHUNK, buf, n);
    buf += n;
    off += n;
  }
  pthread_rwlock_unlock(&p->lock);
  vdb_req_complete(req, r);
}

/* Whole chunks become ZEROED (no memory), partial ones are cleared. */
static void pattern_write_zeroes(void *handle, struct vdb_req *req)
{
  struct pattern *p = handle;
  uint64_t off = req->offset, end = req->offset + req->len;
  int r = 0;

  pthread_rwlock_wrlock(&p->lock);
  while (off < end) {
    uint64_t n = piece_len(off, end);
    uint8_t **slot = chunk_slot(p, off / CHUNK, true);
    if (!slot) {
      r = -ENOMEM;
      break;
    }
    if (n == CHUNK) {
      chunk_free(*slot);
      *slot = ZEROED;
    } else if (*slot != ZEROED) {
      if ((r = chunk_materialize(slot, off - off % CHUNK)) < 0)
        break;
      memset(*slot + off % CHUNK, 0, n);
    }
    off += n;
  }
  pthread_rwlock_unlock(&p->lock);
  vdb_req_complete(req, r);
}

/* Trim is a hint: whole chunks are forgotten and read as the pattern again
 * (the request's contract allows any data after a trim). */
static void pattern_trim(void *handle, struct vdb_req *req)
{
  struct pattern *p = handle;
  uint64_t off = req->offset, end = req->offset + req->len;

  pthread_rwlock_wrlock(&p->lock);
  while (off < end) {
    uint64_t n = piece_len(off, end);
    uint8_t **slot = chunk_slot(p, off / CHUNK, false);
    if (n == CHUNK && slot && *slot) {
      chunk_free(*slot);
      *slot = NULL;
    }
    off += n;
  }
  pthread_rwlock_unlock(&p->lock);
  vdb_req_complete(req, 0);
}

/* The state of the disk at off (VDB_EXTENT_ZERO or 0 = data) and how far
 * it lasts at least, up to end, jumping over missing table levels. */
static uint32_t state_at(struct pattern *p, uint64_t off, uint64_t end, uint64_t *next)
{
  struct mid *m = p->top[off / MID_BYTES];
  struct leaf *lf = m ? m->leaf[off / LEAF_BYTES % MID_LEAVES] : NULL;
  uint64_t step = !m ? MID_BYTES : !lf ? LEAF_BYTES : CHUNK;
  uint32_t flags = lf && lf->chunk[off / CHUNK % LEAF_CHUNKS] == ZEROED ? VDB_EXTENT_ZERO : 0;

  *next = (off / step + 1) * step;
  if (*next > end)
    *next = end;
  return flags;
}

static void pattern_block_status(void *handle, struct vdb_req *req)
{
  struct pattern *p = handle;
  uint64_t off = req->offset, end = req->offset + req->len, next, after;

  pthread_rwlock_rdlock(&p->lock);
  while (off < end && req->nr_extents < req->max_extents) {
    uint32_t flags = state_at(p, off, end, &next);
    while (next < end && state_at(p, next, end, &after) == flags)
      next = after;
    req->extents[req->nr_extents].length = next - off;
    req->extents[req->nr_extents].flags = flags;
    req->nr_extents++;
    off = next;
    if (req->flags & VDB_REQ_ONE)
      break;
  }
  pthread_rwlock_unlock(&p->lock);
  vdb_req_complete(req, 0);
}

static const struct vdb_backend_ops pattern_ops = {
  VDB_BACKEND_OPS_INIT,
  .name = "pattern",
  .summary = "every 8-byte word reads as its offset until written (example plugin; volatile)",
  .usage = "size=SIZE      disk size (K/M/G/T suffixes, at most 64T), required (positional)\n",
  .positional = "size",
  .flags = VDB_BACKEND_VOLATILE,
  .open = pattern_open,
  .close = pattern_close,
  .read = pattern_read,
  .write = pattern_write,
  .trim = pattern_trim,
  .write_zeroes = pattern_write_zeroes,
  .block_status = pattern_block_status,
};

VDB_BACKEND_PLUGIN(pattern_ops)
