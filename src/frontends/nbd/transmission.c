/* vdbus — the NBD transmission phase: parse requests, check them against
 * the spec's rules, hand them to the bus, and build replies (simple,
 * structured or extended, as negotiated).  Replies go out in completion
 * order, not request order.
 *
 * Everything here runs on the connection's loop; a request completed on
 * another thread is posted back to it. */
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/copy.h"
#include "common/log.h"
#include "frontends/nbd/nbd-internal.h"
#include "frontends/nbd/nbd-proto.h"

#define NBD_KEEP_BUF (4u << 20)   /* larger buffers are not kept for reuse */

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

/* ---- request slots ---- */

void nbd_tx_req_free(struct nbd_req *r)
{
  free(r->buf);
  free(r->ext);
  free(r->bs);
  free(r);
}

static struct nbd_req *req_get(struct nbd_conn *c)
{
  struct nbd_req *r = c->free_reqs;

  if (r) {
    c->free_reqs = r->next;
    c->cached -= r->cap;
  } else if (!(r = calloc(1, sizeof *r))) {
    return NULL;
  }
  r->conn = c;
  r->next = NULL;
  c->nreqs++;
  return r;
}

void nbd_tx_release(struct nbd_conn *c, struct nbd_req *r)
{
  c->nreqs--;
  if (r->cap > NBD_KEEP_BUF || c->cached + r->cap > NBD_MAX_CACHED) {
    free(r->buf);
    r->buf = NULL;
    r->cap = 0;
  }
  c->cached += r->cap;
  r->next = c->free_reqs;
  c->free_reqs = r;
}

/* Make r->buf hold len bytes (buffers only grow while kept). */
static int req_buf(struct nbd_req *r, uint64_t len)
{
  if (r->cap >= len)
    return 0;
  free(r->buf);
  r->cap = 0;
  r->buf = malloc(len < 4096 ? 4096 : len);
  if (!r->buf)
    return -ENOMEM;
  r->cap = len < 4096 ? 4096 : len;
  return 0;
}

/* ---- replies ---- */

/* A structured (or extended) chunk header in r->hdr; returns its size. */
static size_t chunk_header(struct nbd_req *r, uint16_t flags, uint16_t type, uint64_t len)
{
  uint8_t *h = r->hdr;

  if (r->conn->hs.extended) {
    put32(h, NBD_EXTENDED_REPLY_MAGIC);
    put16(h + 4, flags);
    put16(h + 6, type);
    put64(h + 8, r->cookie);
    put64(h + 16, r->offset);
    put64(h + 24, len);
    return 32;
  }
  put32(h, NBD_STRUCTURED_REPLY_MAGIC);
  put16(h + 4, flags);
  put16(h + 6, type);
  put64(h + 8, r->cookie);
  put32(h + 16, (uint32_t)len);
  return 20;
}

static size_t simple_header(struct nbd_req *r, uint32_t err)
{
  put32(r->hdr, NBD_SIMPLE_REPLY_MAGIC);
  put32(r->hdr + 4, err);
  put64(r->hdr + 8, r->cookie);
  return 16;
}

static size_t error_chunk(struct nbd_req *r, uint32_t werr, int err)
{
  char msg[80];
  size_t n = (size_t)snprintf(msg, sizeof msg, "%s", strerror(-err));
  size_t hl;

  if (n >= sizeof msg)
    n = sizeof msg - 1;
  hl = chunk_header(r, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + n);
  put32(r->hdr + hl, werr);
  put16(r->hdr + hl + 4, (uint16_t)n);
  memcpy(r->hdr + hl + 6, msg, n);
  return hl + 6 + n;
}

/* The base:allocation payload from the backend's extents, clipped to the
 * request.  Returns the payload length, or 0 if there was no extent. */
static size_t block_status_payload(struct nbd_req *r)
{
  bool ext = r->conn->hs.extended;
  uint8_t *p = r->bs + (ext ? 8 : 4);
  uint64_t total = 0;
  uint32_t n = 0;

  for (uint32_t i = 0; i < r->vreq.nr_extents && total < r->len; i++) {
    uint64_t l = r->vreq.extents[i].length;
    uint32_t f = r->vreq.extents[i].flags & (NBD_STATE_HOLE | NBD_STATE_ZERO);
    bool cut = false;
    if (l == 0)
      continue;
    if (l > r->len - total)
      l = r->len - total;
    if (!ext && l > 0xfffff000u) {
      l = 0xfffff000u;
      cut = true;
    }
    if (ext) {
      put64(p, l);
      put64(p + 8, f);
      p += 16;
    } else {
      put32(p, (uint32_t)l);
      put32(p + 4, f);
      p += 8;
    }
    total += l;
    n++;
    if (cut || (r->cflags & NBD_CMD_FLAG_REQ_ONE))
      break;
  }
  if (n == 0)
    return 0;
  put32(r->bs, NBD_META_ALLOC_ID);
  if (ext)
    put32(r->bs + 4, n);
  return (size_t)(p - r->bs);
}

/* Build r's reply for result err (0 or -errno) in r->hdr and r->iov. */
static void tx_build(struct nbd_conn *c, struct nbd_req *r, int err)
{
  uint32_t werr = nbd_errno_to_wire(err);
  size_t hl, pl = 0;
  void *payload = NULL;

  if (!werr && r->cmd == NBD_CMD_BLOCK_STATUS) {
    pl = block_status_payload(r);
    payload = r->bs;
    if (pl == 0)
      werr = nbd_errno_to_wire(err = -EIO);
  }
  if (!c->hs.structured) {
    hl = simple_header(r, werr);
    if (!werr && r->cmd == NBD_CMD_READ) {
      payload = r->vreq.buf;   /* r->buf, or the backend's memory (VDB_REQ_MAP) */
      pl = r->len;
    }
  } else if (werr) {
    hl = error_chunk(r, werr, err);
    pl = 0;
  } else if (r->cmd == NBD_CMD_READ && r->len > 0) {
    hl = chunk_header(r, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + r->len);
    put64(r->hdr + hl, r->offset);
    hl += 8;
    payload = r->vreq.buf;
    pl = r->len;
  } else if (r->cmd == NBD_CMD_BLOCK_STATUS) {
    hl = chunk_header(r, NBD_REPLY_FLAG_DONE,
                      c->hs.extended ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT : NBD_REPLY_TYPE_BLOCK_STATUS, pl);
  } else if (c->hs.extended || r->cmd == NBD_CMD_READ) {
    hl = chunk_header(r, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
  } else {
    hl = simple_header(r, 0);
  }
  r->iov[0].iov_base = r->hdr;
  r->iov[0].iov_len = hl;
  r->niov = 1;
  if (pl) {
    r->iov[1].iov_base = payload;
    r->iov[1].iov_len = pl;
    r->niov = 2;
  }
  r->outlen = hl + pl;
  /* Backend memory (VDB_REQ_MAP) stays put until the disk closes, and the
   * connection holds the disk: large payloads are spliced from it, so the
   * kernel references the pages instead of copying them.  Never r->buf,
   * which the next request reuses while the socket may still hold it.
   * Whether splicing is what this client is served best by is measured
   * (nbd_splice_choose). */
  r->splice = pl >= NBD_SPLICE_MIN && r->cmd == NBD_CMD_READ && payload != r->buf &&
              !c->no_splice && nbd_splice_choose(c, pl);
}

static void tx_reply(struct nbd_conn *c, struct nbd_req *r, int err)
{
  tx_build(c, r, err);
  r->next = NULL;
  *c->outq_tail = r;
  c->outq_tail = &r->next;
}

void nbd_tx_rebuild_error(struct nbd_conn *c, struct nbd_req *r, int err)
{
  tx_build(c, r, err);
}

/* ---- completion ---- */

void nbd_tx_maybe_finish(struct nbd_conn *c)
{
  if (c->kicked && c->inflight == 0 && c->state == NBD_CONN_TRANSMISSION) {
    vdb_dbg(VDB_DBG_NBD, "%s: export %s unplugged: disconnecting", c->peer, c->disk->name);
    nbd_conn_close(c);
  }
}

static void tx_finish(struct nbd_req *r, int err)
{
  struct nbd_conn *c = r->conn;

  nbd_conn_ref(c);
  c->inflight--;
  if (r->cmd == NBD_CMD_READ || r->cmd == NBD_CMD_WRITE)
    c->inbytes -= r->len;
  if (c->state == NBD_CONN_DEAD || c->write_failed)
    nbd_tx_release(c, r);
  else
    tx_reply(c, r, err);
  nbd_tx_maybe_finish(c);
  if (!c->in_handler)
    nbd_conn_flush(c);
  nbd_conn_unref(c);
}

static void tx_finish_posted(void *arg)
{
  struct nbd_req *r = arg;

  tx_finish(r, r->err);
}

static void tx_done(struct vdb_req *v, int err)
{
  struct nbd_req *r = v->opaque;
  struct nbd_conn *c = r->conn;

  if (vdb_loop_current() == c->loop) {
    tx_finish(r, err);
    return;
  }
  r->err = err;
  nbd_conn_post(c, tx_finish_posted, r);
}

/* ---- requests ---- */

static enum vdb_req_type cmd_to_req(uint16_t cmd)
{
  switch (cmd) {
  case NBD_CMD_READ: return VDB_REQ_READ;
  case NBD_CMD_WRITE: return VDB_REQ_WRITE;
  case NBD_CMD_FLUSH: return VDB_REQ_FLUSH;
  case NBD_CMD_TRIM: return VDB_REQ_TRIM;
  case NBD_CMD_CACHE: return VDB_REQ_CACHE;
  case NBD_CMD_WRITE_ZEROES: return VDB_REQ_WRITE_ZEROES;
  default: return VDB_REQ_BLOCK_STATUS;
  }
}

static void tx_submit(struct nbd_conn *c, struct nbd_req *r)
{
  struct vdb_req *v = &r->vreq;

  memset(v, 0, sizeof *v);
  v->type = cmd_to_req(r->cmd);
  v->offset = r->offset;
  v->len = r->len;
  v->buf = r->buf;
  if (r->cmd == NBD_CMD_WRITE && r->direct_len) {
    /* The first direct_len bytes are on the disk already: the rest, or for
     * a payload all stored that way a (FUA: flush, else empty) request that
     * orders the reply after the bus's checks. */
    v->offset += r->direct_len;
    v->len -= r->direct_len;
    v->buf = r->buf + r->direct_len;
    if (v->len == 0 && (r->cflags & NBD_CMD_FLAG_FUA))
      v->type = VDB_REQ_FLUSH;
  }
  v->done = tx_done;
  v->opaque = r;
  /* Replies are sent (spliced, or copied by sendmsg) from the backend's
   * memory, which stays put while we hold the disk: one copy fewer. */
  if (r->cmd == NBD_CMD_READ) {
    v->flags |= VDB_REQ_MAP;
    if (v->len >= NBD_SPLICE_MIN && !c->no_splice)
      v->flags |= VDB_REQ_MAP_SPLICE;
  }
  if (r->cflags & NBD_CMD_FLAG_FUA)
    v->flags |= VDB_REQ_FUA;
  if (r->cflags & NBD_CMD_FLAG_NO_HOLE)
    v->flags |= VDB_REQ_NO_HOLE;
  if (r->cflags & NBD_CMD_FLAG_FAST_ZERO)
    v->flags |= VDB_REQ_FAST_ZERO;
  if (r->cflags & NBD_CMD_FLAG_REQ_ONE)
    v->flags |= VDB_REQ_ONE;
  if (r->cmd == NBD_CMD_BLOCK_STATUS) {
    v->extents = r->ext;
    v->max_extents = (r->cflags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
  }
  c->inflight++;
  vdb_disk_submit(c->disk, v);
}

/* Flags each command accepts (FUA is harmless everywhere). */
static uint16_t cmd_flags_allowed(const struct nbd_conn *c, uint16_t cmd)
{
  uint16_t f = NBD_CMD_FLAG_FUA;

  switch (cmd) {
  case NBD_CMD_READ:
    return f | (c->hs.structured ? NBD_CMD_FLAG_DF : 0);
  case NBD_CMD_WRITE:
    return f | (c->hs.extended ? NBD_CMD_FLAG_PAYLOAD_LEN : 0);
  case NBD_CMD_WRITE_ZEROES:
    return f | NBD_CMD_FLAG_NO_HOLE | (c->disk->can_fast_zero ? NBD_CMD_FLAG_FAST_ZERO : 0);
  case NBD_CMD_BLOCK_STATUS:
    return f | NBD_CMD_FLAG_REQ_ONE;
  default:
    return f;
  }
}

/* Checks the bus cannot make (protocol state); 0 or -errno. */
static int tx_check(struct nbd_conn *c, struct nbd_req *r)
{
  const struct vdb_disk *d = c->disk;
  bool is_write = r->cmd == NBD_CMD_WRITE || r->cmd == NBD_CMD_TRIM ||
                  r->cmd == NBD_CMD_WRITE_ZEROES;

  if (c->kicked)
    return -ESHUTDOWN;
  if (r->cmd > NBD_CMD_BLOCK_STATUS || r->cmd == NBD_CMD_DISC)
    return -EINVAL;
  if (r->cflags & ~cmd_flags_allowed(c, r->cmd))
    return -EINVAL;
  if (is_write && d->readonly)
    return -EPERM;
  if ((r->cmd == NBD_CMD_TRIM && !d->can_trim) || (r->cmd == NBD_CMD_WRITE_ZEROES && !d->can_zero))
    return -EINVAL;
  if ((r->cmd == NBD_CMD_READ || r->cmd == NBD_CMD_WRITE) && r->len > NBD_MAX_PAYLOAD)
    return -EOVERFLOW;
  if (r->cmd == NBD_CMD_BLOCK_STATUS) {
    if (!c->hs.meta_alloc || r->len == 0)
      return -EINVAL;
    if (!r->ext && (!(r->ext = malloc(NBD_MAX_EXTENTS * sizeof *r->ext)) ||
                    !(r->bs = malloc(8 + NBD_MAX_EXTENTS * 16))))
      return -ENOMEM;
  }
  return 0;
}

/* Prepare a request whose data (if any) is read next. */
static void tx_request(struct nbd_conn *c, uint16_t flags, uint16_t cmd, uint64_t cookie,
                       uint64_t offset, uint64_t len)
{
  bool payload = cmd == NBD_CMD_WRITE || (c->hs.extended && (flags & NBD_CMD_FLAG_PAYLOAD_LEN));
  struct nbd_req *r;
  int err;

  if (cmd == NBD_CMD_DISC) {
    vdb_dbg(VDB_DBG_NBD, "%s: NBD_CMD_DISC", c->peer);
    nbd_conn_close(c);
    return;
  }
  if (!(r = req_get(c))) {
    nbd_conn_kill(c);
    return;
  }
  c->rx_reqs++;
  r->cmd = cmd;
  r->cflags = flags;
  r->direct = cmd == NBD_CMD_WRITE;   /* tried where the backend offers it */
  r->direct_len = 0;
  r->cookie = cookie;
  r->offset = offset;
  r->len = len;
  err = tx_check(c, r);
  if (!err && (cmd == NBD_CMD_READ || cmd == NBD_CMD_WRITE) && req_buf(r, len) < 0)
    err = -ENOMEM;
  if (payload && (err || cmd != NBD_CMD_WRITE) && !err)
    err = -EINVAL;
  if (err)
    vdb_dbg(VDB_DBG_NBD, "%s: command %u flags %#x off %llu len %llu: %s", c->peer, cmd, flags,
            (unsigned long long)offset, (unsigned long long)len, strerror(-err));
  if (err && payload && len > 0) {
    /* Skip the data we will not use, and answer after it: a client may not
     * take a reply to a command it is still sending (libnbd cannot). */
    c->discard = len;
    c->discard_req = r;
    c->discard_err = err;
    return;
  }
  if (err) {
    tx_reply(c, r, err);
    return;
  }
  if (cmd == NBD_CMD_READ || cmd == NBD_CMD_WRITE)
    c->inbytes += len;
  if (cmd == NBD_CMD_WRITE) {
    c->payload_req = r;
    c->payload_got = 0;
    c->rx_peek = len >= NBD_SPLICE_MIN;
    c->rx_await = c->tcp && len >= NBD_SPLICE_MIN;
    return;
  }
  tx_submit(c, r);
}

/* write_direct fillers: from the input buffer (arg), and from the socket.
 * The disk's pages a write lands on are not in the cache: streaming stores. */
static ssize_t fill_mem(void *dst, size_t len, void *arg)
{
  vdb_copy_stream(dst, arg, len);
  return (ssize_t)len;
}

/* One recvmsg of up to len bytes into dst and, after them, up to tail_len
 * into tail: a payload's rest and the next request's header in one call. */
static ssize_t recv_with_tail(int fd, void *dst, size_t len, void *tail, size_t tail_len)
{
  struct iovec iov[2] = { { dst, len }, { tail, tail_len } };
  struct msghdr m = { .msg_iov = iov, .msg_iovlen = tail_len ? 2 : 1 };

  return recvmsg(fd, &m, 0);
}

struct fill_recv {
  int fd;
  void *tail;        /* up to tail_len bytes after the payload go here */
  size_t tail_len;
  bool called;
  ssize_t res;       /* recvmsg's result: payload and tail */
  int err;
};

static ssize_t fill_recv(void *dst, size_t len, void *arg)
{
  struct fill_recv *f = arg;

  f->called = true;
  f->res = recv_with_tail(f->fd, dst, len, f->tail, f->tail_len);
  f->err = errno;
  if (f->res < 0)
    return 0;
  return f->res < (ssize_t)len ? f->res : (ssize_t)len;
}

ssize_t nbd_tx_recv_payload(struct nbd_conn *c, size_t want, void *tail, size_t tail_len)
{
  struct nbd_req *r = c->payload_req;
  struct fill_recv f = { .fd = c->fd, .tail = tail, .tail_len = tail_len };

  if (r->direct) {
    vdb_disk_write_direct(c->disk, r->offset + c->payload_got, want, c->payload_got == 0,
                          fill_recv, &f);
    if (f.called) {
      if (f.res > 0)
        r->direct_len += (uint64_t)f.res < want ? (uint64_t)f.res : want;
      errno = f.err;
      return f.res;
    }
    r->direct = false;   /* paused, refused, not offered: through r->buf */
  }
  return recv_with_tail(c->fd, r->buf + c->payload_got, want, tail, tail_len);
}

size_t nbd_tx_hlen(const struct nbd_conn *c)
{
  return c->hs.extended ? 32 : 28;
}

/* Copy what rbuf holds of the pending WRITE's data; submit it when whole.
 * A backend with write_direct (the RAM disk) takes it straight from rbuf:
 * a large payload piece by piece as it arrives, a small one only when it
 * is all there (otherwise its rest would be a recv of its own into the
 * disk).  Either way one copy, not two through r->buf.  Returns true when
 * the caller can go on parsing. */
static bool tx_payload(struct nbd_conn *c)
{
  struct nbd_req *r = c->payload_req;
  size_t avail = c->rend - c->rstart;
  uint64_t need = r->len - c->payload_got;
  size_t n = avail < need ? avail : (size_t)need;

  if (r->direct && r->len < NBD_SPLICE_MIN && n < r->len)
    r->direct = false;
  if (r->direct && n > 0) {
    ssize_t k = vdb_disk_write_direct(c->disk, r->offset + c->payload_got, n, c->payload_got == 0,
                                      fill_mem, c->rbuf + c->rstart);
    if (k == (ssize_t)n)
      r->direct_len += n;
    else
      r->direct = false;   /* from here on through r->buf */
  }
  if (!r->direct)
    memcpy(r->buf + c->payload_got, c->rbuf + c->rstart, n);
  c->rstart += n;
  c->payload_got += n;
  if (c->payload_got < r->len)
    return false;
  c->payload_req = NULL;
  tx_submit(c, r);
  return true;
}

void nbd_tx_process(struct nbd_conn *c)
{
  size_t hlen = nbd_tx_hlen(c);

  while (c->state == NBD_CONN_TRANSMISSION) {
    size_t avail = c->rend - c->rstart;
    const uint8_t *p = c->rbuf + c->rstart;
    uint32_t magic;
    uint64_t len;

    if (c->payload_req) {
      if (!tx_payload(c))
        return;
      continue;
    }
    if (c->discard) {
      if (!nbd_conn_skip_input(c))
        return;
      if (c->discard_req) {
        struct nbd_req *r = c->discard_req;
        c->discard_req = NULL;
        tx_reply(c, r, c->discard_err);
      }
      continue;
    }
    if (c->nreqs >= NBD_MAX_INFLIGHT || c->inbytes >= NBD_MAX_INBYTES) {
      c->throttled = true;
      return;
    }
    if (avail < hlen)
      return;
    magic = get32(p);
    if (magic != (c->hs.extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC)) {
      vdb_info("NBD client %s sent a bad request magic %#x: disconnecting", c->peer, magic);
      nbd_conn_kill(c);
      return;
    }
    len = c->hs.extended ? get64(p + 24) : get32(p + 24);
    /* A small write is taken once it is all in rbuf, as a partial header
     * is: its payload is then stored from there, and the recv that brings
     * its rest brings what follows too, instead of a recv of its own. */
    if (get16(p + 6) == NBD_CMD_WRITE && len <= NBD_RBUF_SIZE / 2 && avail < hlen + len)
      return;
    c->rstart += hlen;
    tx_request(c, get16(p + 4), get16(p + 6), get64(p + 8), get64(p + 16), len);
  }
}
