/* vdbus — backend "cow": a copy-on-write overlay over another plugged disk
 * (the base).  Changed data lives in a store (RAM or a sparse file, see
 * cow-store.h) in chunks (default 64 KiB); every chunk is in one state:
 * BASE (read from the base), DATA (in the store), ZERO (reads as zeroes)
 * or COMMIT (in the store, being written into the base).
 *
 * Data path.
 * - Reads: runs of chunks by state; store runs are copied, zero runs
 *   cleared, base runs read from the base disk (asynchronous sub-requests).
 * - Writes to chunks already in the store go straight to the store, with no
 *   lock.  A write touching any other chunk takes the overlay's lock and
 *   marks those chunks busy (in ascending order; a write finding a chunk
 *   busy waits on it and resumes from there).  A partly written busy chunk
 *   is first read from the base ("copy-up"), merged and written whole; then
 *   the chunks become DATA and are released, and writers that waited on
 *   them run again.
 * - Trim and write_zeroes (without NO_HOLE) make whole chunks ZERO and free
 *   their store space; a partial chunk gets zeroes written into it.  So a
 *   trimmed range reads as zeroes and never shows the base's data again.
 *   write_zeroes with NO_HOLE writes real zeroes into the store.
 * - Block status reports store data as data, ZERO chunks as holes that
 *   read as zeroes, and asks the base about BASE chunks.
 * - Flush: the store's data, then its map, durable (file stores).
 *
 * The base is held (a reference and a dependent count) for the overlay's
 * lifetime: the bus refuses writes to it and its unplug. */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vdbus/backend.h>
#include "backends/cow-store.h"
#include "backends/cow.h"
#include "bus/bus.h"
#include "common/log.h"
#include "common/loop.h"
#include "common/size.h"

#define COW_BUSY_BUCKETS 256
#define COW_COMMIT_RUN (1u << 20)

struct cow_op;

struct cow_busy {
  uint64_t chunk;
  struct cow_op *waiters;
  struct cow_busy *next;
};

struct cow {
  struct vdb_disk *base;
  struct cow_store st;
  uint64_t size;
  bool readonly;
  pthread_mutex_t lock;                       /* protects busy */
  struct cow_busy *busy[COW_BUSY_BUCKETS];
};

enum cow_kind { COW_WRITE, COW_ZEROW, COW_PUNCH };

/* A partly covered chunk that is not in the store: its old contents. */
struct cow_edge {
  uint64_t chunk;
  uint8_t *buf;
  struct vdb_req sub;
  struct cow_op *op;
};

/* A modifying request on the slow path. */
struct cow_op {
  struct cow *c;
  struct vdb_req *req;
  enum cow_kind kind;
  uint64_t next_chunk;          /* where chunk acquisition resumes */
  uint64_t *locked;             /* chunks this op marked busy, ascending */
  uint32_t nlocked, cap;
  struct cow_edge edge[2];
  int nedge;
  _Atomic int pending;
  _Atomic int err;
  struct cow_op *wait_next;
};

static inline uint64_t chunk_of(struct cow *c, uint64_t off)
{
  return off >> c->st.shift;
}

static inline uint64_t chunk_start(struct cow *c, uint64_t ch)
{
  return ch << c->st.shift;
}

static inline uint64_t chunk_len(struct cow *c, uint64_t ch)
{
  uint64_t s = chunk_start(c, ch);
  return c->size - s < c->st.chunk ? c->size - s : c->st.chunk;
}

static inline uint8_t state(struct cow *c, uint64_t ch)
{
  return cow_store_state(&c->st, ch);
}

/* ---- busy chunks (under c->lock) ---- */

static struct cow_busy **busy_slot(struct cow *c, uint64_t ch)
{
  struct cow_busy **pp = &c->busy[(ch * 0x9E3779B97F4A7C15ull) >> 56];

  while (*pp && (*pp)->chunk != ch)
    pp = &(*pp)->next;
  return pp;
}

static int busy_add(struct cow *c, uint64_t ch)
{
  struct cow_busy **pp = busy_slot(c, ch), *b;

  assert(!*pp);
  b = calloc(1, sizeof *b);
  if (!b)
    return -ENOMEM;
  b->chunk = ch;
  *pp = b;
  return 0;
}

/* Unmark ch; its waiters are appended to *woken. */
static void busy_remove(struct cow *c, uint64_t ch, struct cow_op **woken)
{
  struct cow_busy **pp = busy_slot(c, ch), *b = *pp;

  assert(b);
  *pp = b->next;
  while (b->waiters) {
    struct cow_op *w = b->waiters;
    b->waiters = w->wait_next;
    w->wait_next = *woken;
    *woken = w;
  }
  free(b);
}

/* ---- open, close ---- */

static int cow_parse_chunk(const struct vdb_params *params, uint64_t *chunk)
{
  int r = vdb_params_get_size(params, "chunk-size", chunk);

  if (r == -ENOENT) {
    *chunk = COW_CHUNK_DEFAULT;
    return 0;
  }
  if (r < 0 || *chunk < COW_CHUNK_MIN || *chunk > COW_CHUNK_MAX || (*chunk & (*chunk - 1))) {
    vdb_set_error("cow backend: bad chunk-size '%s' (a power of two from 4K to 4M)",
                  vdb_params_get(params, "chunk-size"));
    return -EINVAL;
  }
  return 0;
}

static void cow_describe(struct cow *c, struct vdb_backend_info *info)
{
  char chunk[32];

  vdb_size_format(c->st.chunk, chunk, sizeof chunk);
  const char *store = c->st.is_file ? c->st.path : "ram";
  size_t n;

  /* A long store path is cut short here: it is in the parameters too. */
  snprintf(info->description, sizeof info->description, "overlay of %s, %s chunks, store ",
           c->base->name, chunk);
  n = strlen(info->description);
  if (n + 1 < sizeof info->description) {
    size_t k = strlen(store) < sizeof info->description - n - 1 ? strlen(store)
                                                                : sizeof info->description - n - 1;
    memcpy(info->description + n, store, k);
    info->description[n + k] = '\0';
  }
}

static int cow_open(const struct vdb_params *params, void **handle, struct vdb_backend_info *info)
{
  const char *base = vdb_params_get(params, "base");
  const char *store = vdb_params_get(params, "store");
  struct cow *c;
  uint64_t chunk;
  int r;

  if (!base || !*base) {
    vdb_set_error("cow backend: --base NAME (the disk to layer over) is required");
    return -EINVAL;
  }
  r = cow_parse_chunk(params, &chunk);
  if (r < 0)
    return r;
  c = calloc(1, sizeof *c);
  if (!c)
    return -ENOMEM;
  if (vdb_bus_get(base, &c->base) < 0) {
    vdb_set_error("cow backend: no disk named '%s' to be the base", base);
    free(c);
    return -ENOENT;
  }
  c->size = c->base->size;
  c->readonly = vdb_params_get_bool(params, "readonly");
  r = cow_store_open(&c->st, store && *store ? store : "ram", base, c->size, chunk, c->readonly);
  if (r < 0) {
    vdb_disk_put(c->base);
    free(c);
    return r;
  }
  pthread_mutex_init(&c->lock, NULL);
  vdb_disk_add_dependent(c->base);
  info->size = c->size;
  info->readonly = c->readonly;
  info->volatile_cache = c->st.is_file;
  info->volatile_data = !c->st.is_file || (c->base->ops->flags & VDB_BACKEND_VOLATILE) ||
                        c->base->info.volatile_data;
  info->can_multi_conn = true;
  cow_describe(c, info);
  *handle = c;
  return 0;
}

static void cow_close(void *handle)
{
  struct cow *c = handle;

  cow_store_close(&c->st);
  for (int i = 0; i < COW_BUSY_BUCKETS; i++)
    assert(!c->busy[i]);
  pthread_mutex_destroy(&c->lock);
  vdb_disk_remove_dependent(c->base);
  vdb_disk_put(c->base);
  free(c);
}

void vdb_cow_store_path(void *handle, char *buf, size_t len)
{
  struct cow *c = handle;

  snprintf(buf, len, "%s", c->st.is_file ? c->st.path : "");
}

struct vdb_disk *vdb_cow_base(void *handle)
{
  return ((struct cow *)handle)->base;
}

/* ---- reads ---- */

struct cow_read {
  struct vdb_req *req;
  _Atomic int pending;
  _Atomic int err;
};

struct cow_read_sub {
  struct vdb_req sub;
  struct cow_read *rd;
};

static void cow_read_put(struct cow_read *rd)
{
  if (atomic_fetch_sub(&rd->pending, 1) == 1) {
    struct vdb_req *req = rd->req;
    int err = atomic_load(&rd->err);
    free(rd);
    vdb_req_complete(req, err);
  }
}

static void cow_read_sub_done(struct vdb_req *sub, int err)
{
  struct cow_read_sub *rs = (struct cow_read_sub *)sub;
  struct cow_read *rd = rs->rd;

  free(rs);
  if (err < 0)
    atomic_store(&rd->err, err);
  cow_read_put(rd);
}

/* Where a chunk reads from: COW_CHUNK_BASE, _DATA (the store) or _ZERO. */
static inline int read_class(uint8_t s)
{
  return s == COW_CHUNK_COMMIT ? COW_CHUNK_DATA : s == COW_CHUNK_ZCOMMIT ? COW_CHUNK_ZERO : s;
}

/* The run of chunks of one read class starting at off, up to end: its
 * length, and the class in *cls. */
static uint64_t cow_run(struct cow *c, uint64_t off, uint64_t end, int *cls)
{
  uint64_t e = chunk_start(c, chunk_of(c, off) + 1);

  *cls = read_class(state(c, chunk_of(c, off)));
  while (e < end && read_class(state(c, chunk_of(c, e))) == *cls)
    e += c->st.chunk;
  return (e < end ? e : end) - off;
}

/* A run of the store or of zeroes: 0 or -errno. */
static int cow_read_local(struct cow *c, int cls, uint8_t *p, uint64_t off, uint64_t len)
{
  if (cls == COW_CHUNK_ZERO) {
    memset(p, 0, len);
    return 0;
  }
  return cow_store_read(&c->st, p, off, len);
}

static void cow_read(void *handle, struct vdb_req *req)
{
  struct cow *c = handle;
  uint64_t end = req->offset + req->len;
  bool any_base = false;
  struct cow_read *rd;
  uint8_t *buf = req->buf;
  int err = 0;

  for (uint64_t off = req->offset, len; off < end; off += len) {
    int cls;
    len = cow_run(c, off, end, &cls);
    any_base |= cls == COW_CHUNK_BASE;
  }
  if (!any_base) {
    for (uint64_t off = req->offset, len; off < end; off += len) {
      int cls;
      len = cow_run(c, off, end, &cls);
      if (err == 0)
        err = cow_read_local(c, cls, buf + (off - req->offset), off, len);
    }
    vdb_req_complete(req, err);
    return;
  }
  rd = calloc(1, sizeof *rd);
  if (!rd) {
    vdb_req_complete(req, -ENOMEM);
    return;
  }
  rd->req = req;
  rd->pending = 1;
  /* States may have changed since the first walk (a copy-up or a commit
   * finishing): every run is read where it is now. */
  for (uint64_t off = req->offset, len; off < end; off += len) {
    uint8_t *p = buf + (off - req->offset);
    struct cow_read_sub *rs;
    int cls, r = 0;

    len = cow_run(c, off, end, &cls);
    if (cls != COW_CHUNK_BASE) {
      r = cow_read_local(c, cls, p, off, len);
    } else if (!(rs = malloc(sizeof *rs))) {
      r = -ENOMEM;
    } else {
      rs->rd = rd;
      rs->sub = (struct vdb_req){ .type = VDB_REQ_READ, .offset = off, .len = len, .buf = p,
                                  .done = cow_read_sub_done };
      atomic_fetch_add(&rd->pending, 1);
      vdb_disk_submit(c->base, &rs->sub);
    }
    if (r < 0)
      atomic_store(&rd->err, r);
  }
  cow_read_put(rd);
}

/* ---- writes, zeroes, trims ---- */

static void cow_op_acquire(struct cow_op *op);

static void cow_op_free(struct cow_op *op)
{
  for (int i = 0; i < op->nedge; i++)
    free(op->edge[i].buf);
  free(op->locked);
  free(op);
}

static int cow_op_lock_chunk(struct cow_op *op, uint64_t ch)
{
  if (op->nlocked == op->cap) {
    uint32_t cap = op->cap ? op->cap * 2 : 8;
    uint64_t *v = realloc(op->locked, cap * sizeof *v);
    if (!v)
      return -ENOMEM;
    op->locked = v;
    op->cap = cap;
  }
  if (busy_add(op->c, ch) < 0)
    return -ENOMEM;
  op->locked[op->nlocked++] = ch;
  return 0;
}

static bool cow_op_is_locked(struct cow_op *op, uint64_t ch)
{
  for (uint32_t i = 0; i < op->nlocked; i++)
    if (op->locked[i] == ch)
      return true;
  return false;
}

/* Release the op's chunks and run the writers that waited on them. */
static void cow_op_release(struct cow_op *op)
{
  struct cow *c = op->c;
  struct cow_op *woken = NULL;

  pthread_mutex_lock(&c->lock);
  for (uint32_t i = 0; i < op->nlocked; i++)
    busy_remove(c, op->locked[i], &woken);
  op->nlocked = 0;
  pthread_mutex_unlock(&c->lock);
  while (woken) {
    struct cow_op *w = woken;
    woken = w->wait_next;
    cow_op_acquire(w);
  }
}

static void cow_op_end(struct cow_op *op, int err)
{
  struct vdb_req *req = op->req;

  cow_op_release(op);
  cow_op_free(op);
  vdb_req_complete(req, err);
}

static bool chunk_covered(struct cow *c, struct vdb_req *req, uint64_t ch)
{
  uint64_t s = chunk_start(c, ch);
  return req->offset <= s && req->offset + req->len >= s + chunk_len(c, ch);
}

/* Apply the op to the part [off, off+len) of one chunk whose whole old
 * contents are in buf (a locked edge), then store the whole chunk. */
static int cow_edge_apply(struct cow_op *op, struct cow_edge *e, uint64_t off, uint64_t len)
{
  struct cow *c = op->c;
  uint64_t s = chunk_start(c, e->chunk);

  if (op->kind == COW_WRITE)
    memcpy(e->buf + (off - s), (uint8_t *)op->req->buf + (off - op->req->offset), len);
  else
    memset(e->buf + (off - s), 0, len);
  return cow_store_write(&c->st, e->buf, s, chunk_len(c, e->chunk), false);
}

static struct cow_edge *cow_op_edge(struct cow_op *op, uint64_t ch)
{
  for (int i = 0; i < op->nedge; i++)
    if (op->edge[i].chunk == ch)
      return &op->edge[i];
  return NULL;
}

/* One chunk's part [off, off+len) of the op, data first; the new state is
 * returned in *ns (0xff: unchanged). */
static int cow_op_chunk(struct cow_op *op, uint64_t ch, uint64_t off, uint64_t len, uint8_t *ns)
{
  struct cow *c = op->c;
  struct vdb_req *req = op->req;
  struct cow_edge *e = cow_op_edge(op, ch);
  bool full = chunk_covered(c, req, ch);
  uint8_t s = state(c, ch);

  *ns = 0xff;
  if (e) {
    *ns = COW_CHUNK_DATA;
    return cow_edge_apply(op, e, off, len);
  }
  if (op->kind == COW_PUNCH && (full || s == COW_CHUNK_ZERO)) {
    if (s == COW_CHUNK_ZERO) /* also whole BASE chunks zeroed at acquire */
      return 0;
    *ns = COW_CHUNK_ZERO;
    return cow_store_punch(&c->st, chunk_start(c, ch), chunk_len(c, ch));
  }
  /* In the store already, or wholly rewritten. */
  if (s != COW_CHUNK_DATA)
    *ns = COW_CHUNK_DATA;
  if (op->kind == COW_WRITE)
    return cow_store_write(&c->st, (uint8_t *)req->buf + (off - req->offset), off, len, false);
  return cow_store_zero(&c->st, off, len, false);
}

/* All old contents are in: write, switch states, sync for FUA, release. */
static void cow_op_finish(struct cow_op *op)
{
  struct cow *c = op->c;
  struct vdb_req *req = op->req;
  uint64_t end = req->offset + req->len;
  uint64_t c0 = chunk_of(c, req->offset), c1 = chunk_of(c, end - 1);
  bool changed = false;
  int err = atomic_load(&op->err);

  for (uint64_t ch = c0; ch <= c1 && err == 0; ch++) {
    uint64_t s = chunk_start(c, ch), e = s + chunk_len(c, ch);
    uint64_t off = s > req->offset ? s : req->offset, stop = e < end ? e : end;
    uint8_t ns;
    err = cow_op_chunk(op, ch, off, stop - off, &ns);
    if (err == 0 && ns != 0xff) {
      assert(cow_op_is_locked(op, ch) || state(c, ch) == COW_CHUNK_DATA);
      cow_store_set_state(&c->st, ch, ns);
      changed = true;
    }
  }
  if (err == 0 && (req->flags & VDB_REQ_FUA))
    err = cow_store_sync(&c->st);
  (void)changed;
  cow_op_end(op, err);
}

static void cow_op_put(struct cow_op *op)
{
  if (atomic_fetch_sub(&op->pending, 1) == 1)
    cow_op_finish(op);
}

static void cow_edge_done(struct vdb_req *sub, int err)
{
  struct cow_edge *e = sub->opaque;

  if (err < 0)
    atomic_store(&e->op->err, err);
  cow_op_put(e->op);
}

/* Read the old contents of the partly covered locked chunks. */
static void cow_op_prepare(struct cow_op *op)
{
  struct cow *c = op->c;
  struct vdb_req *req = op->req;
  uint64_t ends[2] = { chunk_of(c, req->offset), chunk_of(c, req->offset + req->len - 1) };

  op->pending = 1;
  for (int i = 0; i < 2; i++) {
    uint64_t ch = ends[i];
    struct cow_edge *e;
    uint8_t s;

    if ((i == 1 && ends[1] == ends[0]) || chunk_covered(c, req, ch) || !cow_op_is_locked(op, ch))
      continue;
    s = state(c, ch);
    if (op->kind == COW_PUNCH && s == COW_CHUNK_ZERO)
      continue;
    e = &op->edge[op->nedge];
    e->chunk = ch;
    e->op = op;
    e->buf = calloc(1, chunk_len(c, ch));
    if (!e->buf) {
      atomic_store(&op->err, -ENOMEM);
      break;
    }
    op->nedge++;
    if (s == COW_CHUNK_BASE) {
      e->sub = (struct vdb_req){ .type = VDB_REQ_READ, .offset = chunk_start(c, ch),
                                 .len = chunk_len(c, ch), .buf = e->buf,
                                 .done = cow_edge_done, .opaque = e };
      atomic_fetch_add(&op->pending, 1);
      vdb_disk_submit(c->base, &e->sub);
    }
  }
  cow_op_put(op);
}

/* Mark the op's chunks that are not in the store busy, ascending; wait on
 * a chunk another op holds. */
static void cow_op_acquire(struct cow_op *op)
{
  struct cow *c = op->c;
  uint64_t c1 = chunk_of(c, op->req->offset + op->req->len - 1);

  pthread_mutex_lock(&c->lock);
  for (uint64_t ch = op->next_chunk; ch <= c1; ch++) {
    uint8_t s = state(c, ch);
    struct cow_busy *b;

    if (s == COW_CHUNK_DATA)
      continue;
    b = *busy_slot(c, ch);
    if (b) {
      op->next_chunk = ch;
      op->wait_next = b->waiters;
      b->waiters = op;
      pthread_mutex_unlock(&c->lock);
      return;
    }
    if (s == COW_CHUNK_COMMIT || s == COW_CHUNK_ZCOMMIT) {
      /* Not being copied: the chunk stays in the overlay after all. */
      s = s == COW_CHUNK_COMMIT ? COW_CHUNK_DATA : COW_CHUNK_ZERO;
      cow_store_set_state(&c->st, ch, s);
      if (s == COW_CHUNK_DATA)
        continue;
    }
    if (op->kind == COW_PUNCH && chunk_covered(c, op->req, ch)) {
      /* Nothing stored, nothing to read: zero it right away. */
      cow_store_set_state(&c->st, ch, COW_CHUNK_ZERO);
      continue;
    }
    if (cow_op_lock_chunk(op, ch) < 0) {
      pthread_mutex_unlock(&c->lock);
      cow_op_end(op, -ENOMEM);
      return;
    }
  }
  pthread_mutex_unlock(&c->lock);
  cow_op_prepare(op);
}

static bool cow_all_data(struct cow *c, uint64_t off, uint64_t len)
{
  for (uint64_t ch = chunk_of(c, off); ch <= chunk_of(c, off + len - 1); ch++)
    if (state(c, ch) != COW_CHUNK_DATA)
      return false;
  return true;
}

static void cow_modify(struct cow *c, struct vdb_req *req, enum cow_kind kind)
{
  struct cow_op *op;

  if (kind != COW_PUNCH && cow_all_data(c, req->offset, req->len)) {
    bool fua = req->flags & VDB_REQ_FUA;
    int r = kind == COW_WRITE ? cow_store_write(&c->st, req->buf, req->offset, req->len, fua)
                              : cow_store_zero(&c->st, req->offset, req->len, fua);
    vdb_req_complete(req, r);
    return;
  }
  op = calloc(1, sizeof *op);
  if (!op) {
    vdb_req_complete(req, -ENOMEM);
    return;
  }
  op->c = c;
  op->req = req;
  op->kind = kind;
  op->next_chunk = chunk_of(c, req->offset);
  cow_op_acquire(op);
}

static void cow_write(void *handle, struct vdb_req *req)
{
  cow_modify(handle, req, COW_WRITE);
}

static void cow_trim(void *handle, struct vdb_req *req)
{
  cow_modify(handle, req, COW_PUNCH);
}

static void cow_write_zeroes(void *handle, struct vdb_req *req)
{
  cow_modify(handle, req, req->flags & VDB_REQ_NO_HOLE ? COW_ZEROW : COW_PUNCH);
}

static void cow_flush(void *handle, struct vdb_req *req)
{
  vdb_req_complete(req, cow_store_sync(&((struct cow *)handle)->st));
}

/* ---- block status ---- */

static void cow_status_base_done(struct vdb_req *sub, int err)
{
  struct vdb_req *req = sub->opaque;

  req->nr_extents = sub->nr_extents;
  free(sub);
  vdb_req_complete(req, err);
}

static void cow_block_status(void *handle, struct vdb_req *req)
{
  struct cow *c = handle;
  uint64_t end = req->offset + req->len;

  if (read_class(state(c, chunk_of(c, req->offset))) == COW_CHUNK_BASE) {
    /* Ask the base about the leading run of unchanged chunks. */
    struct vdb_req *sub = calloc(1, sizeof *sub);
    uint64_t e = chunk_start(c, chunk_of(c, req->offset) + 1);
    if (!sub) {
      vdb_req_complete(req, -ENOMEM);
      return;
    }
    while (e < end && read_class(state(c, chunk_of(c, e))) == COW_CHUNK_BASE)
      e += c->st.chunk;
    *sub = (struct vdb_req){ .type = VDB_REQ_BLOCK_STATUS, .flags = req->flags & VDB_REQ_ONE,
                             .offset = req->offset, .len = (e < end ? e : end) - req->offset,
                             .extents = req->extents, .max_extents = req->max_extents,
                             .done = cow_status_base_done, .opaque = req };
    vdb_disk_submit(c->base, sub);
    return;
  }
  for (uint64_t off = req->offset, len; off < end; off += len) {
    int cls;
    uint32_t fl;

    len = cow_run(c, off, end, &cls);
    fl = cls == COW_CHUNK_ZERO ? VDB_EXTENT_HOLE | VDB_EXTENT_ZERO : 0;
    if (cls == COW_CHUNK_BASE || req->nr_extents == req->max_extents)
      break;
    req->extents[req->nr_extents].length = len;
    req->extents[req->nr_extents].flags = fl;
    req->nr_extents++;
    if (req->flags & VDB_REQ_ONE)
      break;
  }
  vdb_req_complete(req, 0);
}

/* ---- commit ---- */

void vdb_cow_commit_begin(void *handle)
{
  struct cow *c = handle;

  for (uint64_t ch = 0; ch < c->st.nchunks; ch++) {
    uint8_t s = state(c, ch);
    if (s == COW_CHUNK_DATA)
      cow_store_set_state(&c->st, ch, COW_CHUNK_COMMIT);
    else if (s == COW_CHUNK_ZERO)
      cow_store_set_state(&c->st, ch, COW_CHUNK_ZCOMMIT);
  }
}

static inline bool committing(uint8_t s)
{
  return s == COW_CHUNK_COMMIT || s == COW_CHUNK_ZCOMMIT;
}

static void cow_resume_on_worker(void *arg)
{
  cow_op_acquire(arg);
}

/* Take the next run of chunks being committed, all in one state, from *ch
 * (marked busy, under the lock).  Returns the count; *s = their state. */
static uint64_t commit_take_run(struct cow *c, uint64_t *ch, uint8_t *s)
{
  uint64_t n = 0;

  pthread_mutex_lock(&c->lock);
  while (*ch < c->st.nchunks && !(committing(state(c, *ch)) && !*busy_slot(c, *ch)))
    (*ch)++;
  if (*ch < c->st.nchunks)
    *s = state(c, *ch);
  while (*ch + n < c->st.nchunks && (*s == COW_CHUNK_ZCOMMIT || n * c->st.chunk < COW_COMMIT_RUN) &&
         state(c, *ch + n) == *s && !*busy_slot(c, *ch + n) && busy_add(c, *ch + n) == 0)
    n++;
  pthread_mutex_unlock(&c->lock);
  return n;
}

/* Write zeroes into the base, with write_zeroes where it has it. */
static int commit_zero_base(struct cow *c, uint64_t off, uint64_t len, uint8_t *zbuf)
{
  struct vdb_req z = { .type = VDB_REQ_WRITE_ZEROES, .offset = off, .len = len };
  int r = c->base->can_zero ? vdb_disk_io_sync(c->base, &z) : -EOPNOTSUPP;

  memset(zbuf, 0, COW_COMMIT_RUN);
  while (r == -EOPNOTSUPP || (r == 0 && !c->base->can_zero && len > 0)) {
    uint64_t n = len < COW_COMMIT_RUN ? len : COW_COMMIT_RUN;
    struct vdb_req w = { .type = VDB_REQ_WRITE, .offset = off, .len = n, .buf = zbuf };
    r = vdb_disk_io_sync(c->base, &w);
    off += n;
    len -= n;
    if (r == 0 && len == 0)
      break;
  }
  return r;
}

/* Copy chunks [ch, ch+n) (all in state s) into the base; then they are
 * BASE again. */
static int commit_copy_run(struct cow *c, uint64_t ch, uint64_t n, uint8_t s, uint8_t *buf,
                           uint64_t *bytes)
{
  uint64_t off = chunk_start(c, ch), len = 0;
  struct cow_op *woken = NULL;
  int r;

  for (uint64_t i = 0; i < n; i++)
    len += chunk_len(c, ch + i);
  if (s == COW_CHUNK_ZCOMMIT) {
    r = commit_zero_base(c, off, len, buf);
  } else {
    r = cow_store_read(&c->st, buf, off, len);
    if (r == 0) {
      struct vdb_req w = { .type = VDB_REQ_WRITE, .offset = off, .len = len, .buf = buf };
      r = vdb_disk_io_sync(c->base, &w);
    }
  }
  pthread_mutex_lock(&c->lock);
  for (uint64_t i = 0; i < n; i++) {
    if (r == 0)
      cow_store_set_state(&c->st, ch + i, COW_CHUNK_BASE);
    busy_remove(c, ch + i, &woken);
  }
  pthread_mutex_unlock(&c->lock);
  while (woken) {
    struct cow_op *w = woken;
    woken = w->wait_next;
    if (vdb_workers_count() == 0 || vdb_loop_post(vdb_worker_pick(), cow_resume_on_worker, w) < 0)
      cow_op_acquire(w);
  }
  if (r == 0)
    *bytes += len;
  return r;
}

int vdb_cow_commit_run(void *handle, uint64_t *bytes)
{
  struct cow *c = handle;
  uint8_t *buf = malloc(COW_COMMIT_RUN > c->st.chunk ? COW_COMMIT_RUN : c->st.chunk);
  uint64_t ch = 0, n;
  uint8_t s = 0;
  int r = 0;

  *bytes = 0;
  if (!buf)
    return -ENOMEM;
  while (r == 0 && (n = commit_take_run(c, &ch, &s)) > 0) {
    r = commit_copy_run(c, ch, n, s, buf, bytes);
    ch += n;
  }
  free(buf);
  if (r == 0)
    r = vdb_disk_flush_sync(c->base);
  if (r < 0)
    vdb_set_error("commit into '%s': %s", c->base->name, strerror(-r));
  return r;
}

void vdb_cow_commit_finish(void *handle, bool punch)
{
  struct cow *c = handle;

  for (uint64_t ch = 0; ch < c->st.nchunks;) {
    uint64_t n = 1;
    uint8_t s = state(c, ch);
    if (committing(s)) {
      cow_store_set_state(&c->st, ch, s == COW_CHUNK_COMMIT ? COW_CHUNK_DATA : COW_CHUNK_ZERO);
    } else if (s == COW_CHUNK_BASE && punch) {
      while (ch + n < c->st.nchunks && state(c, ch + n) == COW_CHUNK_BASE)
        n++;
      cow_store_punch(&c->st, chunk_start(c, ch), chunk_start(c, ch + n - 1) - chunk_start(c, ch) +
                                                   chunk_len(c, ch + n - 1));
    }
    ch += n;
  }
  cow_store_sync(&c->st);
}

const struct vdb_backend_ops vdb_backend_cow = {
  .api_version = VDB_BACKEND_API_VERSION,
  .struct_size = sizeof(struct vdb_backend_ops),
  .name = "cow",
  .summary = "a copy-on-write overlay over another plugged disk (the base turns read-only)",
  .usage = "base=NAME          the disk to layer over, required\n"
           "store=ram|file:PATH where the changed chunks live (default ram; a file\n"
           "                   store is created if missing and survives restarts)\n"
           "chunk-size=SIZE    copy-on-write granularity, 4K to 4M (default 64K)\n",
  .open = cow_open,
  .close = cow_close,
  .read = cow_read,
  .write = cow_write,
  .flush = cow_flush,
  .trim = cow_trim,
  .write_zeroes = cow_write_zeroes,
  .block_status = cow_block_status,
};
