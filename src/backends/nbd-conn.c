/* vdbus — backend "nbd": the connection threads.
 *
 * Each connection is a thread running its own libnbd handle in a poll loop
 * (nbd_aio_get_fd / get_direction / notify_*) plus an eventfd for
 * wake-ups.  Requests arrive on any thread onto a connection's queue and
 * are issued from the connection thread into a fixed array of slots (no
 * allocation per request), in chunks when larger than the server's maximum
 * block size.
 *
 * A dead connection is closed and reopened with exponential backoff; its
 * commands in flight are reissued on the next live connection.  A request
 * waits for a live connection at most `timeout` seconds from its
 * submission.  libnbd callbacks only record results in the slot; the thread
 * acts on them after the libnbd call returns.  c->lock protects c's queue
 * only; the handle and the slots belong to the connection thread. */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/nbd.h"
#include "common/log.h"

void nbdb_conn_wake(struct nbdb_conn *c)
{
  uint64_t one = 1;

  while (write(c->efd, &one, sizeof one) < 0 && errno == EINTR)
    ;
}

static void nbdb_conn_drain(struct nbdb_conn *c)
{
  uint64_t v;

  while (read(c->efd, &v, sizeof v) < 0 && errno == EINTR)
    ;
}

/* ---- queues ---- */

/* Append req to c's queue and wake c's thread if the queue was empty. */
void nbdb_conn_push(struct nbdb_conn *c, struct vdb_req *req)
{
  bool was_empty;

  nbdb_rs_of(req)->next = NULL;
  atomic_fetch_add(&c->load, 1);
  pthread_mutex_lock(&c->lock);
  was_empty = !c->head;
  if (c->tail)
    nbdb_rs_of(c->tail)->next = req;
  else
    c->head = req;
  c->tail = req;
  pthread_mutex_unlock(&c->lock);
  if (was_empty)
    nbdb_conn_wake(c);
}

/* The least-loaded live connection other than avoid, else (none live) the
 * least-loaded one of all. */
struct nbdb_conn *nbdb_pick(struct nbdb *nb, const struct nbdb_conn *avoid)
{
  struct nbdb_conn *best = NULL, *any = NULL;

  for (int i = 0; i < nb->nconns; i++) {
    struct nbdb_conn *c = &nb->conns[i];
    int l = atomic_load(&c->load);
    if (!any || l < atomic_load(&any->load))
      any = c;
    if (c != avoid && atomic_load(&c->live) && (!best || l < atomic_load(&best->load)))
      best = c;
  }
  return best ? best : any;
}

/* Take up to max requests off c's queue (in order) into a local list. */
struct vdb_req *nbdb_conn_pop(struct nbdb_conn *c, unsigned max)
{
  struct vdb_req *first, *last = NULL;
  unsigned n = 0;

  pthread_mutex_lock(&c->lock);
  first = c->head;
  for (struct vdb_req *r = first; r && n < max; r = nbdb_rs_of(r)->next, n++)
    last = r;
  if (last) {
    c->head = nbdb_rs_of(last)->next;
    if (!c->head)
      c->tail = NULL;
    nbdb_rs_of(last)->next = NULL;
  } else {
    first = NULL;
  }
  pthread_mutex_unlock(&c->lock);
  return first;
}

/* Complete a request that c was carrying. */
static void conn_complete(struct nbdb_conn *c, struct vdb_req *req, int err)
{
  atomic_fetch_sub(&c->load, 1);
  vdb_req_complete(req, err);
}

/* Move req from c to the best connection (c's load drops, the other's
 * rises); a request of a disk being unplugged fails with -ESHUTDOWN instead. */
static void conn_requeue(struct nbdb_conn *c, struct vdb_req *req)
{
  struct nbdb_conn *to;

  if (vdb_req_cancelled(req)) {
    conn_complete(c, req, -ESHUTDOWN);
    return;
  }
  to = nbdb_pick(c->nb, c);
  atomic_fetch_sub(&c->load, 1);
  nbdb_conn_push(to, req);
}

/* ---- connecting ---- */

/* Read what the export offers from a connected handle; 0 or -1 (libnbd error). */
int nbdb_export_probe(struct nbd_handle *h, struct nbdb_export *e)
{
  int64_t size = nbd_get_size(h), v[3];
  int f[9];

  memset(e, 0, sizeof *e);
  f[0] = nbd_is_read_only(h);
  f[1] = nbd_can_flush(h);
  f[2] = nbd_can_fua(h);
  f[3] = nbd_can_trim(h);
  f[4] = nbd_can_zero(h);
  f[5] = nbd_can_fast_zero(h);
  f[6] = nbd_can_cache(h);
  f[7] = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  f[8] = nbd_can_multi_conn(h);
  for (int i = 0; i < 3; i++)
    v[i] = nbd_get_block_size(h, i);
  if (size < 0 || v[0] < 0 || v[1] < 0 || v[2] < 0)
    return -1;
  for (int i = 0; i < 9; i++)
    if (f[i] < 0)
      return -1;
  e->size = (uint64_t)size;
  e->readonly = f[0], e->can_flush = f[1], e->can_fua = f[2], e->can_trim = f[3];
  e->can_zero = f[4], e->can_fast_zero = f[5], e->can_cache = f[6];
  e->can_extents = f[7], e->can_multi_conn = f[8];
  e->min_block = (uint32_t)v[LIBNBD_SIZE_MINIMUM];
  e->pref_block = (uint32_t)v[LIBNBD_SIZE_PREFERRED];
  e->max_block = (uint32_t)v[LIBNBD_SIZE_MAXIMUM];
  return 0;
}

/* A positive errno for libnbd's last error on this thread. */
int nbdb_errno_or(int dflt)
{
  int e = nbd_get_errno();

  return e > 0 ? e : dflt;
}

static void conn_expire(struct nbdb_conn *c);

/* Connect a new handle to uri, waiting at most timeout_ms; while waiting,
 * c (if not NULL) keeps expiring its queue.  Returns the handle, or NULL
 * with *err (positive errno) and msg (libnbd's message) set. */
struct nbd_handle *nbdb_connect(struct nbdb *nb, const char *uri, struct nbdb_conn *c,
                                uint64_t timeout_ms, int *err, char *msg, size_t msglen)
{
  uint64_t deadline = nbdb_now_ns() + timeout_ms * 1000000u;
  struct nbd_handle *h = nbd_create();

  if (!h)
    goto fail;
  if (nbd_set_uri_allow_local_file(h, true) < 0 ||
      nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
      nbd_set_pread_initialize(h, false) < 0 || nbd_aio_connect_uri(h, uri) < 0)
    goto fail;
  while (nbd_aio_is_ready(h) != 1) {
    struct pollfd p[2] = { { -1, 0, 0 }, { c ? c->efd : -1, POLLIN, 0 } };
    uint64_t t = nbdb_now_ns();
    unsigned dir;
    int r;

    if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1 || (p[0].fd = nbd_aio_get_fd(h)) < 0)
      goto fail;
    dir = nbd_aio_get_direction(h);
    if ((nb && atomic_load(&nb->closing)) || t >= deadline) {
      *err = t >= deadline ? ETIMEDOUT : ESHUTDOWN;
      snprintf(msg, msglen, "%s", t >= deadline ? "timed out connecting" : "closing");
      nbd_close(h);
      return NULL;
    }
    p[0].events = (short)(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                          ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
    r = poll(p, 2, NBDB_TICK_MS);
    if (r < 0 && errno != EINTR) {
      *err = errno;
      snprintf(msg, msglen, "poll: %s", strerror(errno));
      nbd_close(h);
      return NULL;
    }
    if (p[1].revents & POLLIN)
      nbdb_conn_drain(c);
    if (c)
      conn_expire(c);
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR))
      nbd_aio_notify_read(h);
    else if (p[0].revents & POLLOUT)
      nbd_aio_notify_write(h);
  }
  return h;

fail:
  *err = nbdb_errno_or(EIO);
  snprintf(msg, msglen, "%s", nbd_get_error() ? nbd_get_error() : strerror(*err));
  nbd_close(h);
  return NULL;
}

/* Fail c's queued requests whose time is up (-EIO) or whose disk is going
 * away (-ESHUTDOWN); move the others to a live connection if there is one.
 * Connection thread, while c is not connected. */
static void conn_expire(struct nbdb_conn *c)
{
  struct nbdb *nb = c->nb;
  struct vdb_req *list = nbdb_conn_pop(c, ~0u), *keep = NULL, *keep_tail = NULL;
  uint64_t t = nbdb_now_ns();
  unsigned expired = 0;

  while (list) {
    struct vdb_req *req = list;
    struct nbdb_conn *to;
    list = nbdb_rs_of(req)->next;
    nbdb_rs_of(req)->next = NULL;
    if (vdb_req_cancelled(req) || atomic_load(&nb->closing)) {
      conn_complete(c, req, -ESHUTDOWN);
    } else if (t >= nbdb_rs_of(req)->deadline) {
      expired++;
      conn_complete(c, req, -EIO);
    } else if ((to = nbdb_pick(nb, c)) != c && atomic_load(&to->live)) {
      conn_requeue(c, req);
    } else {
      if (keep_tail)
        nbdb_rs_of(keep_tail)->next = req;
      else
        keep = req;
      keep_tail = req;
    }
  }
  if (expired)
    vdb_warn("nbd backend: %s: %u request(s) failed with EIO: no connection for %" PRIu64 " s",
             nb->uri, expired, nb->timeout_ns / 1000000000u);
  if (!keep)
    return;
  /* Put the rest back in front of anything queued meanwhile. */
  pthread_mutex_lock(&c->lock);
  nbdb_rs_of(keep_tail)->next = c->head;
  if (!c->head)
    c->tail = keep_tail;
  c->head = keep;
  pthread_mutex_unlock(&c->lock);
}

/* Sleep ms on c's eventfd, expiring the queue every tick.  Returns early
 * when closing. */
static void conn_backoff(struct nbdb_conn *c, unsigned ms)
{
  uint64_t end = nbdb_now_ns() + (uint64_t)ms * 1000000u;

  while (!atomic_load(&c->nb->closing)) {
    struct pollfd p = { c->efd, POLLIN, 0 };
    uint64_t t = nbdb_now_ns();
    if (t >= end)
      break;
    if (poll(&p, 1, NBDB_TICK_MS) > 0)
      nbdb_conn_drain(c);
    conn_expire(c);
  }
}

/* What differs between the export at plug time and now, or NULL. */
static const char *export_diff(const struct nbdb_export *a, const struct nbdb_export *b)
{
  if (a->size != b->size)
    return "the export size changed";
  if (a->readonly != b->readonly)
    return "the export's read-only flag changed";
  if (a->min_block != b->min_block || a->max_block != b->max_block)
    return "the export's block size constraints changed";
  if (a->can_flush != b->can_flush || a->can_fua != b->can_fua || a->can_trim != b->can_trim ||
      a->can_zero != b->can_zero || a->can_fast_zero != b->can_fast_zero ||
      a->can_cache != b->can_cache || a->can_extents != b->can_extents ||
      a->can_multi_conn != b->can_multi_conn)
    return "the export's capabilities changed";
  return NULL;
}

/* The longest pause between attempts: 5 s, or a quarter of the request
 * timeout if that is shorter (so that a short outage fits in it). */
static unsigned nbdb_backoff_max(const struct nbdb *nb)
{
  uint64_t q = nb->timeout_ns / 4000000u;

  return q < NBDB_BACKOFF_MIN_MS ? NBDB_BACKOFF_MIN_MS :
         q > NBDB_BACKOFF_MAX_MS ? NBDB_BACKOFF_MAX_MS : (unsigned)q;
}

/* Connect c again, with backoff, until it works or the backend closes.
 * The first attempt is at once, unless the last connection died within a
 * second of coming up (a server that accepts and then drops us, or answers
 * NBD_ESHUTDOWN): then the backoff goes on growing.  Connection thread. */
static void conn_reconnect(struct nbdb_conn *c)
{
  struct nbdb *nb = c->nb;
  unsigned backoff = NBDB_BACKOFF_MIN_MS, fails = 0, max = nbdb_backoff_max(nb);
  char last[256] = "";
  bool short_lived = c->ever_live && nbdb_now_ns() - c->up_since < NBDB_SHORT_LIVED_NS;

  if (short_lived) {
    backoff = c->backoff_ms ? c->backoff_ms : NBDB_BACKOFF_MIN_MS;
    conn_backoff(c, backoff);
    backoff = backoff * 2 > max ? max : backoff * 2;
  }
  while (!atomic_load(&nb->closing)) {
    struct nbdb_export e;
    char msg[256];
    const char *why = NULL;
    int err;
    struct nbd_handle *h = nbdb_connect(nb, nb->uri, c, nb->timeout_ns / 1000000u, &err,
                                        msg, sizeof msg);
    if (h && nbdb_export_probe(h, &e) < 0) {
      snprintf(msg, sizeof msg, "%s", nbd_get_error() ? nbd_get_error() : "probe failed");
      why = msg;
    } else if (h) {
      why = export_diff(&nb->exp, &e);
    } else if (!atomic_load(&nb->closing)) {
      why = msg;
    }
    if (h && !why) {
      c->h = h;
      c->broken = false;
      atomic_store(&c->live, true);
      if (fails || (c->ever_live && !short_lived))
        vdb_info("nbd backend: %s: connection %d up again", nb->uri, c->idx);
      c->ever_live = true;
      c->up_since = nbdb_now_ns();
      c->backoff_ms = backoff;
      nbdb_conn_wake(c);
      return;
    }
    if (h)
      nbd_close(h);
    /* Log a new reason at once, the same one again about once a minute. */
    if (why && (strcmp(why, last) != 0 || fails % 12 == 0)) {
      vdb_warn("nbd backend: %s: connection %d: cannot reconnect: %s (retrying)", nb->uri,
               c->idx, why);
      snprintf(last, sizeof last, "%s", why);
    }
    fails++;
    conn_backoff(c, backoff);
    backoff = backoff * 2 > max ? max : backoff * 2;
  }
}

/* ---- issuing commands (connection thread) ---- */

static int nbdb_cmd_done(void *user_data, int *error)
{
  struct nbdb_slot *s = user_data;

  s->done = true;
  s->err = *error;
  return 1;
}

/* Copy the base:allocation extents of a reply into the request. */
static int nbdb_extents(void *user_data, const char *metacontext, uint64_t offset,
                        uint32_t *entries, size_t nr_entries, int *error)
{
  struct nbdb_slot *s = user_data;
  struct vdb_req *req = s->req;
  uint64_t total = 0;

  if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (uint32_t i = 0; i < req->nr_extents; i++)
    total += req->extents[i].length;
  for (size_t i = 0; i + 1 < nr_entries && total < s->len; i += 2) {
    uint64_t len = entries[i];
    uint32_t flags = entries[i + 1] & (VDB_EXTENT_HOLE | VDB_EXTENT_ZERO);
    struct vdb_extent *e = &req->extents[req->nr_extents];
    if (len == 0)
      continue;
    if (len > s->len - total)
      len = s->len - total;
    total += len;
    if (req->nr_extents > 0 && e[-1].flags == flags) {
      e[-1].length += len;
      continue;
    }
    if (req->nr_extents >= req->max_extents)
      break;
    e->length = len;
    e->flags = flags;
    req->nr_extents++;
    if (req->flags & VDB_REQ_ONE)
      break;
  }
  return 0;
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/* Issue the next command of s->req on c.  On a failed submission the slot
 * is marked done with libnbd's errno. */
static void slot_issue(struct nbdb_conn *c, struct nbdb_slot *s)
{
  struct nbdb *nb = c->nb;
  struct vdb_req *req = s->req;
  struct nbdb_rs *rs = nbdb_rs_of(req);
  nbd_completion_callback cb = { .callback = nbdb_cmd_done, .user_data = s };
  uint64_t off = req->offset + rs->done, left = req->len - rs->done;
  uint32_t fua = (req->flags & VDB_REQ_FUA) && nb->exp.can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  int64_t r;

  s->done = false;
  s->err = 0;
  s->len = min_u64(left, req->type == VDB_REQ_READ || req->type == VDB_REQ_WRITE ?
                   nb->data_chunk : NBDB_OTHER_CHUNK);
  if (rs->fua_flush) {
    s->len = 0;
    r = nbd_aio_flush(c->h, cb, 0);
  } else switch (req->type) {
  case VDB_REQ_READ:
    r = nbd_aio_pread(c->h, (uint8_t *)req->buf + rs->done, s->len, off, cb, 0);
    break;
  case VDB_REQ_WRITE:
    r = nbd_aio_pwrite(c->h, (uint8_t *)req->buf + rs->done, s->len, off, cb, fua);
    break;
  case VDB_REQ_FLUSH:
    r = nbd_aio_flush(c->h, cb, 0);
    break;
  case VDB_REQ_TRIM:
    r = nbd_aio_trim(c->h, s->len, off, cb, fua);
    break;
  case VDB_REQ_WRITE_ZEROES:
    r = nbd_aio_zero(c->h, s->len, off, cb, fua |
                     ((req->flags & VDB_REQ_NO_HOLE) ? LIBNBD_CMD_FLAG_NO_HOLE : 0) |
                     ((req->flags & VDB_REQ_FAST_ZERO) ? LIBNBD_CMD_FLAG_FAST_ZERO : 0));
    break;
  case VDB_REQ_CACHE:
    r = nbd_aio_cache(c->h, s->len, off, cb, 0);
    break;
  case VDB_REQ_BLOCK_STATUS:
    req->nr_extents = 0;
    r = nbd_aio_block_status(c->h, s->len, off,
                             (nbd_extent_callback){ .callback = nbdb_extents, .user_data = s },
                             cb, (req->flags & VDB_REQ_ONE) ? LIBNBD_CMD_FLAG_REQ_ONE : 0);
    break;
  default:
    r = -1;
    break;
  }
  if (r < 0) {
    s->done = true;
    s->err = req->type < VDB_REQ_NR_TYPES ? nbdb_errno_or(EIO) : EINVAL;
  }
}

/* Does this request need a flush after its data (FUA the server lacks)? */
static bool needs_fua_flush(const struct nbdb *nb, const struct vdb_req *req)
{
  return (req->flags & VDB_REQ_FUA) && !nb->exp.can_fua && nb->exp.can_flush &&
         (req->type == VDB_REQ_WRITE || req->type == VDB_REQ_TRIM ||
          req->type == VDB_REQ_WRITE_ZEROES);
}

static void slot_free(struct nbdb_conn *c, struct nbdb_slot *s)
{
  s->req = NULL;
  c->free_idx[c->nfree++] = (unsigned)(s - c->slots);
}

/* The command in s finished successfully: issue the next part of its
 * request, or complete it. */
static void slot_advance(struct nbdb_conn *c, struct nbdb_slot *s)
{
  struct vdb_req *req = s->req;
  struct nbdb_rs *rs = nbdb_rs_of(req);
  int err = 0;

  if (!rs->fua_flush && req->type != VDB_REQ_FLUSH && req->type != VDB_REQ_BLOCK_STATUS) {
    rs->done += s->len;
    if (rs->done < req->len) {
      slot_issue(c, s);
      return;
    }
    if (needs_fua_flush(c->nb, req)) {
      rs->fua_flush = true;
      slot_issue(c, s);
      return;
    }
  }
  if (req->type == VDB_REQ_BLOCK_STATUS && req->nr_extents == 0)
    err = -EIO; /* the server described nothing */
  slot_free(c, s);
  conn_complete(c, req, err);
}

/* Remember why c's connection failed (the first reason), for the log. */
static void conn_note_loss(struct nbdb_conn *c, const char *why)
{
  if (!c->lost[0])
    snprintf(c->lost, sizeof c->lost, "%s", why ? why : "unknown error");
}

/* Act on the slots whose command finished.  Returns true if one was issued
 * again (its completion may already be pending). */
static bool conn_reap(struct nbdb_conn *c)
{
  bool again = false;

  for (unsigned i = 0; i < NBDB_SLOTS; i++) {
    struct nbdb_slot *s = &c->slots[i];
    struct vdb_req *req = s->req;
    if (!req || !s->done)
      continue;
    if (s->err == 0) {
      slot_advance(c, s);
      again |= s->req != NULL && s->done;
    } else if (s->err == ENOTCONN || s->err == ESHUTDOWN || nbd_aio_is_dead(c->h) == 1 ||
               nbd_aio_is_closed(c->h) == 1) {
      /* The connection, not the server's answer: do it again elsewhere. */
      conn_note_loss(c, s->err == ESHUTDOWN ? "the server is shutting down" : strerror(s->err));
      c->broken = true;
      slot_free(c, s);
      conn_requeue(c, req);
    } else {
      slot_free(c, s);
      conn_complete(c, req, -s->err);
    }
  }
  return again;
}

/* Move queued requests into free slots and issue them.  Returns true if
 * it took any. */
static bool conn_take(struct nbdb_conn *c)
{
  struct vdb_req *list;

  if (c->nfree == 0 || c->broken)
    return false;
  list = nbdb_conn_pop(c, c->nfree);
  if (!list)
    return false;
  while (list) {
    struct nbdb_slot *s = &c->slots[c->free_idx[--c->nfree]];
    s->req = list;
    list = nbdb_rs_of(list)->next;
    slot_issue(c, s);
  }
  return true;
}

/* Act on every finished command and fill the slots freed, until neither
 * changes anything. */
static void conn_pump(struct nbdb_conn *c)
{
  do {
    while (conn_reap(c))
      ;
  } while (conn_take(c));
}

static bool conn_dead(struct nbdb_conn *c)
{
  return c->broken || nbd_aio_is_dead(c->h) == 1 || nbd_aio_is_closed(c->h) == 1;
}

/* A disk being unplugged must not wait long for a server that stopped
 * answering: once commands of such a disk have waited NBDB_UNPLUG_GRACE_NS
 * since the unplug began (as seen here), give up on the connection (its
 * requests then fail with -ESHUTDOWN).  Connection thread, about once a
 * second while commands are in flight. */
static void conn_check_stuck(struct nbdb_conn *c)
{
  uint64_t t = nbdb_now_ns();

  for (unsigned i = 0; i < NBDB_SLOTS; i++) {
    struct vdb_req *req = c->slots[i].req;
    if (!req || !vdb_req_cancelled(req))
      continue;
    if (!c->cancel_seen)
      c->cancel_seen = t;
    else if (t - c->cancel_seen >= NBDB_UNPLUG_GRACE_NS) {
      vdb_warn("nbd backend: %s: server not answering while unplugging: dropping connection %d",
               c->nb->uri, c->idx);
      c->broken = true;
    }
    return;
  }
  c->cancel_seen = 0;
}

/* Serve c's live connection until it dies or the backend closes. */
static void conn_serve(struct nbdb_conn *c)
{
  while (!atomic_load(&c->nb->closing)) {
    struct pollfd p[2] = { { nbd_aio_get_fd(c->h), 0, 0 }, { c->efd, POLLIN, 0 } };
    unsigned dir;

    conn_pump(c);
    if (conn_dead(c) || p[0].fd < 0)
      return;
    dir = nbd_aio_get_direction(c->h);
    p[0].events = (short)(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                          ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
    if (poll(p, 2, c->nfree < NBDB_SLOTS ? 1000 : -1) < 0) {
      if (errno == EINTR)
        continue;
      conn_note_loss(c, strerror(errno));
      c->broken = true;
      continue;
    }
    if (p[1].revents & POLLIN)
      nbdb_conn_drain(c);
    if (p[0].revents & POLLNVAL) {
      conn_note_loss(c, "poll: invalid descriptor");
      c->broken = true;
    }
    else if ((p[0].revents & (POLLIN | POLLHUP | POLLERR)) && nbd_aio_notify_read(c->h) < 0)
      conn_note_loss(c, nbd_get_error());
    else if ((p[0].revents & POLLOUT) && nbd_aio_notify_write(c->h) < 0)
      conn_note_loss(c, nbd_get_error());
    if (c->nfree < NBDB_SLOTS)
      conn_check_stuck(c);
  }
}

/* Close c's dead handle; every command it had in flight goes back to a
 * queue (a result already recorded is acted on first). */
static void conn_drop(struct nbdb_conn *c)
{
  unsigned n = 0;

  while (conn_reap(c))
    ;
  atomic_store(&c->live, false);
  /* A connection that keeps dying at once is logged once per backoff step. */
  if (!atomic_load(&c->nb->closing) &&
      (nbdb_now_ns() - c->up_since >= NBDB_SHORT_LIVED_NS || c->backoff_ms >= 1000))
    vdb_warn("nbd backend: %s: connection %d lost: %s", c->nb->uri, c->idx,
             c->lost[0] ? c->lost : "the server closed the connection");
  c->lost[0] = '\0';
  nbd_close(c->h);
  c->h = NULL;
  for (unsigned i = 0; i < NBDB_SLOTS; i++) {
    struct nbdb_slot *s = &c->slots[i];
    struct vdb_req *req = s->req;
    if (!req)
      continue;
    slot_free(c, s);
    conn_requeue(c, req);
    n++;
  }
  if (n)
    vdb_dbg(VDB_DBG_IO, "nbd backend: %s: %u request(s) to reissue", c->nb->uri, n);
}

void *nbdb_conn_thread(void *arg)
{
  struct nbdb_conn *c = arg;

  while (!atomic_load(&c->nb->closing)) {
    if (!c->h) {
      conn_reconnect(c);
      continue;
    }
    conn_serve(c);
    if (!atomic_load(&c->nb->closing))
      conn_drop(c);
  }
  return NULL;
}
