/* vdbus — the NBD server: listeners, connection lifetime and socket I/O.
 * Option negotiation is in handshake.c, requests and replies in
 * transmission.c.
 *
 * Each connection is owned by one worker loop.  Input is read into a 64 KiB
 * buffer and parsed in batches; replies are queued and sent with one
 * sendmsg() per batch.  A connection is closed in two steps: close (stop
 * reading, let in-flight requests finish and their replies go out) and
 * destroy (on its loop, once nothing is in flight). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "common/log.h"
#include "frontends/nbd/nbd-internal.h"
#include "frontends/nbd/nbd-proto.h"
#include "frontends/nbd/nbd-server.h"

struct vdb_nbd_settings vdb_nbd_settings = {
  .handshake_timeout_ms = 10000,
  .max_connections = 256,
  .coalesce_us = NBD_COALESCE_US,
  .poll_us = NBD_POLL_US,
};

#define NBD_MAX_LISTENERS 16

struct nbd_listener {
  int fd;
  struct vdb_watch watch;
  struct vdb_timer retry;      /* re-enable after EMFILE */
  bool is_unix;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  char host[64];
  char port[16];
};

static struct nbd_listener *listeners[NBD_MAX_LISTENERS];
static int nlisteners;
static struct vdb_loop *listen_loop;

/* All connections (for shutdown and the connection limit). */
static pthread_mutex_t nbd_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t nbd_cond = PTHREAD_COND_INITIALIZER;
static struct nbd_conn *conns;
static unsigned nconns;
static uint64_t refused_log_ns;

static void conn_on_event(struct vdb_watch *w, uint32_t revents);
static void conn_destroy(struct nbd_conn *c);

/* ---- connection reference counting ---- */

void nbd_conn_ref(struct nbd_conn *c)
{
  atomic_fetch_add(&c->refs, 1);
}

void nbd_conn_unref(struct nbd_conn *c)
{
  if (atomic_fetch_sub(&c->refs, 1) != 1)
    return;
  for (struct nbd_req *r = c->free_reqs, *n; r; r = n) {
    n = r->next;
    nbd_tx_req_free(r);
  }
  free(c->rbuf);
  free(c);
}

/* ---- events and output ---- */

static void conn_update_events(struct nbd_conn *c)
{
  uint32_t ev = 0;

  if (c->state == NBD_CONN_DEAD)
    return;
  if ((c->state == NBD_CONN_HANDSHAKE || c->state == NBD_CONN_TRANSMISSION) && !c->throttled &&
      !c->rx_pending)
    ev |= EPOLLIN;
  if (!c->write_failed && (c->hsout.off < c->hsout.len || (c->outq && !c->tx_pending)))
    ev |= EPOLLOUT;
  if (ev != c->events) {
    c->events = ev;
    vdb_loop_modify(c->loop, &c->watch, ev);
  }
}

/* Drop every queued reply (the peer is gone). */
static void pipe_close(struct nbd_conn *c);
static void conn_drop_output(struct nbd_conn *c)
{
  while (c->outq) {
    struct nbd_req *r = c->outq;
    c->outq = r->next;
    nbd_tx_release(c, r);
  }
  c->outq_tail = &c->outq;
  c->out_off = 0;
  c->hsout.off = c->hsout.len;
  if (c->pipe_len)
    pipe_close(c);   /* what it holds belonged to a dropped reply */
  c->primed = false;
}

static int send_hsout(struct nbd_conn *c)
{
  while (c->hsout.off < c->hsout.len) {
    ssize_t n = send(c->fd, c->hsout.p + c->hsout.off, c->hsout.len - c->hsout.off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return errno == EAGAIN ? 0 : -errno;
    }
    c->hsout.off += (size_t)n;
  }
  c->hsout.off = c->hsout.len = 0;
  return 0;
}

/* Advance the output queue past n sent bytes, releasing finished replies. */
static void outq_consume(struct nbd_conn *c, size_t n)
{
  while (n > 0 && c->outq) {
    struct nbd_req *r = c->outq;
    size_t rem = r->outlen - c->out_off;
    if (n < rem) {
      c->out_off += n;
      return;
    }
    n -= rem;
    c->out_off = 0;
    c->primed = false;
    c->outq = r->next;
    if (!c->outq)
      c->outq_tail = &c->outq;
    nbd_tx_release(c, r);
  }
}

static void pipe_close(struct nbd_conn *c)
{
  if (c->pipe[0] >= 0) {
    close(c->pipe[0]);
    close(c->pipe[1]);
  }
  c->pipe[0] = c->pipe[1] = -1;
  c->pipe_len = 0;
  c->primed = false;
}

static int pipe_open(struct nbd_conn *c)
{
  if (c->pipe[0] >= 0)
    return 0;
  if (pipe2(c->pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
    c->pipe[0] = c->pipe[1] = -1;
    return -errno;
  }
  fcntl(c->pipe[1], F_SETPIPE_SZ, (int)NBD_PIPE_SIZE);   /* a hint: the default 64K works */
  return 0;
}

/* vmsplice the next part of the head's payload (from out_off + pipe_len). */
static ssize_t pipe_fill(struct nbd_conn *c)
{
  struct nbd_req *r = c->outq;
  size_t hl = r->iov[0].iov_len;
  size_t done = (c->out_off > hl ? c->out_off - hl : 0) + c->pipe_len;
  struct iovec v = {
    .iov_base = (uint8_t *)r->iov[1].iov_base + done,
    .iov_len = r->iov[1].iov_len - done,
  };

  return vmsplice(c->pipe[1], &v, 1, SPLICE_F_NONBLOCK);
}

/* The head of outq is a spliced reply not yet started: put the first part
 * of its payload into the pipe before its header goes out, so that memory
 * that cannot be read (a file truncated under its mapping) still gets an
 * error reply.  Returns 1 (go on) or 0 (EAGAIN). */
static int splice_prime(struct nbd_conn *c)
{
  struct nbd_req *r = c->outq;
  ssize_t n;

  if (pipe_open(c) < 0)
    goto fallback;
  n = pipe_fill(c);
  if (n < 0 && (errno == EAGAIN || errno == EINTR))
    return 0;
  if (n < 0 && errno == EFAULT) {
    vdb_warn("NBD %s: read of %llu bytes at %llu: the backend's memory is unreadable: EIO",
             c->peer, (unsigned long long)r->len, (unsigned long long)r->offset);
    nbd_tx_rebuild_error(c, r, -EIO);
    return 1;
  }
  if (n < 0)
    goto fallback;
  c->pipe_len = (size_t)n;
  c->primed = true;
  return 1;

fallback:
  /* No pipe (EMFILE) or no vmsplice: the memory is stable, send it. */
  vdb_dbg(VDB_DBG_NBD, "%s: cannot splice (%m): sending replies by copy", c->peer);
  c->no_splice = true;
  for (struct nbd_req *q = c->outq; q; q = q->next)
    q->splice = false;
  return 1;
}

/* The head of outq is a spliced reply whose header is out: move its
 * payload through the pipe into the socket.  Returns 1 when progress was
 * made, 0 on EAGAIN, -errno on error. */
static int splice_head(struct nbd_conn *c)
{
  ssize_t n;

  if (c->pipe_len == 0) {
    n = pipe_fill(c);
    if (n < 0)
      return errno == EAGAIN || errno == EINTR ? 0 : -errno;
    c->pipe_len = (size_t)n;
  }
  n = splice(c->pipe[0], NULL, c->fd, NULL, c->pipe_len, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
  if (n < 0)
    return errno == EAGAIN || errno == EINTR ? 0 : -errno;
  c->pipe_len -= (size_t)n;
  outq_consume(c, (size_t)n);
  return 1;
}

static void nbd_conn_flush_sent(struct vdb_uring_op *op, int res);

/* Ask the ring to cancel op; true if asked. */
static bool ring_cancel(struct vdb_uring_op *op)
{
  struct io_uring_sqe *sqe = vdb_loop_get_sqe();

  if (!sqe)
    return false;
  io_uring_prep_cancel(sqe, op, 0);
  vdb_uring_set_op(sqe, NULL);
  return true;
}

/* Ring mode: the replies in iov go out with the loop's next wait or pause
 * (one system call for both) instead of by a sendmsg now.  False if not. */
static bool send_async(struct nbd_conn *c, const struct iovec *iov, int n, bool all)
{
  struct io_uring_sqe *sqe;

  if (!(sqe = vdb_loop_get_sqe_quick()))   /* NULL unless in ring mode */
    return false;
  memcpy(c->tx_iov, iov, (size_t)n * sizeof *iov);
  c->tx_msg = (struct msghdr){ .msg_iov = c->tx_iov, .msg_iovlen = (size_t)n };
  c->tx_op.cb = nbd_conn_flush_sent;
  io_uring_prep_sendmsg(sqe, c->fd, &c->tx_msg, MSG_NOSIGNAL);
  vdb_uring_set_op(sqe, &c->tx_op);
  c->tx_pending = true;
  c->tx_all = all;
  c->ring_sends++;
  nbd_conn_ref(c);
  return true;
}

static int send_outq(struct nbd_conn *c)
{
  enum { MAXIOV = NBD_TX_IOV };
  struct iovec iov[MAXIOV];

  while (c->outq && !c->tx_pending) {
    int n = 0;
    size_t skip = c->out_off;

    if (c->outq->splice && !c->primed) {
      if (splice_prime(c) == 0)
        return 0;
      continue;
    }
    if (c->outq->splice && c->out_off >= c->outq->iov[0].iov_len) {
      int e = splice_head(c);
      if (e <= 0)
        return e;
      continue;
    }
    /* Everything up to the next spliced payload (the head's header
     * included once its payload is primed), in one sendmsg. */
    struct nbd_req *r;
    for (r = c->outq; r && n + 2 <= MAXIOV; r = r->next) {
      if (r->splice && r != c->outq)
        break;
      for (int i = 0; i < (r->splice ? 1 : r->niov); i++) {   /* a spliced payload: the pipe */
        if (skip >= r->iov[i].iov_len) {
          skip -= r->iov[i].iov_len;
          continue;
        }
        iov[n].iov_base = (uint8_t *)r->iov[i].iov_base + skip;
        iov[n].iov_len = r->iov[i].iov_len - skip;
        skip = 0;
        n++;
      }
      if (r->splice)
        break;
    }
    if (send_async(c, iov, n, !r))
      return 0;
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)n };
    ssize_t sent = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EFAULT)  /* a mapped file truncated between check and send */
        vdb_warn("NBD %s: a read's memory became unreadable while it was sent: closing",
                 c->peer);
      return errno == EAGAIN ? 0 : -errno;
    }
    outq_consume(c, (size_t)sent);
  }
  return 0;
}

static void conn_process(struct nbd_conn *c);
static void conn_mark_closing(struct nbd_conn *c);

/* Send what is queued; resume reading when backpressure eased; destroy a
 * closing connection once it is drained.  Not inside the read handler. */
void nbd_conn_flush(struct nbd_conn *c)
{
  int r;

  if (c->rx_pending && c->state != NBD_CONN_TRANSMISSION && !c->rx_cancelled)
    c->rx_cancelled = ring_cancel(&c->rx_op);
  if (c->tx_pending) {   /* its completion flushes again */
    if (c->write_failed && !c->tx_cancelled)   /* a client that stopped reading must not hold it */
      c->tx_cancelled = ring_cancel(&c->tx_op);
    conn_update_events(c);
    return;
  }
  if (c->rx_pending && c->state != NBD_CONN_TRANSMISSION) {
    conn_update_events(c);   /* the RECV's completion flushes again */
    return;
  }
  for (int round = 0;; round++) {
    if (c->state == NBD_CONN_DEAD)
      return;
    if (c->write_failed) {
      conn_drop_output(c);
    } else if ((r = send_hsout(c)) < 0 || (c->hsout.len == 0 && (r = send_outq(c)) < 0)) {
      vdb_dbg(VDB_DBG_NBD, "%s: send: %s", c->peer, strerror(-r));
      c->write_failed = true;
      conn_drop_output(c);
      conn_mark_closing(c);
      continue;
    }
    if (c->throttled && c->nreqs < NBD_MAX_INFLIGHT / 2 && c->inbytes < NBD_MAX_INBYTES / 2 &&
        round < 4) {
      c->throttled = false;
      c->in_handler = true;
      conn_process(c);      /* requests already buffered */
      c->in_handler = false;
      continue;
    }
    break;
  }
  if (c->state == NBD_CONN_CLOSING && c->inflight == 0 &&
      (c->write_failed || (!c->outq && c->hsout.len == 0))) {
    conn_destroy(c);
    return;
  }
  conn_update_events(c);
}

/* The ring's SENDMSG of replies (send_async) completed. */
static void nbd_conn_flush_sent(struct vdb_uring_op *op, int res)
{
  struct nbd_conn *c = (struct nbd_conn *)((char *)op - offsetof(struct nbd_conn, tx_op));

  c->tx_pending = false;
  c->tx_cancelled = false;
  if (c->state != NBD_CONN_DEAD) {
    if (res > 0) {
      outq_consume(c, (size_t)res);
    } else if (res < 0 && res != -EAGAIN && res != -EINTR && !c->write_failed) {
      if (res == -EFAULT)
        vdb_warn("NBD %s: a read's memory became unreadable while it was sent: closing",
                 c->peer);
      vdb_dbg(VDB_DBG_NBD, "%s: send: %s", c->peer, strerror(-res));
      c->write_failed = true;
      conn_drop_output(c);
      conn_mark_closing(c);
    }
    nbd_conn_flush(c);
  }
  nbd_conn_unref(c);
}

/* ---- closing ---- */

static void drain_timeout(struct vdb_timer *t)
{
  struct nbd_conn *c = t->arg;

  vdb_info("NBD client %s did not take its last replies in %u ms: dropped", c->peer,
           NBD_DRAIN_MS);
  atomic_fetch_add(&c->refs, 1);
  nbd_conn_kill(c);
  nbd_conn_unref(c);
}

/* Stop reading; the connection is destroyed once drained (see flush). */
static void conn_mark_closing(struct nbd_conn *c)
{
  if (c->state == NBD_CONN_CLOSING || c->state == NBD_CONN_DEAD)
    return;
  c->state = NBD_CONN_CLOSING;
  vdb_timer_stop(c->loop, &c->deadline);
  /* A client that stops reading must not keep the connection (and its
   * disk: unplug waits for it) forever: it gets NBD_DRAIN_MS to take the
   * replies that are left. */
  c->deadline.cb = drain_timeout;
  vdb_timer_start(c->loop, &c->deadline, NBD_DRAIN_MS);
  if (c->payload_req) {
    nbd_tx_release(c, c->payload_req);
    c->payload_req = NULL;
  }
  if (c->discard_req) {
    nbd_tx_release(c, c->discard_req);
    c->discard_req = NULL;
  }
  shutdown(c->fd, SHUT_RD);
}

/* The caller must hold a reference if it touches c afterwards. */
void nbd_conn_close(struct nbd_conn *c)
{
  conn_mark_closing(c);
  if (!c->in_handler)
    nbd_conn_flush(c);
}

void nbd_conn_kill(struct nbd_conn *c)
{
  c->write_failed = true;
  nbd_conn_close(c);
}

/* The last step of a connection's life: take it off the global list (or
 * tell a local connection's owner) and drop the loop's reference. */
static void conn_forget(struct nbd_conn *c)
{
  if (c->local) {
    if (c->on_closed)
      c->on_closed(c->closed_arg);
  } else {
    pthread_mutex_lock(&nbd_lock);
    if (c->prev)
      c->prev->next = c->next;
    else
      conns = c->next;
    if (c->next)
      c->next->prev = c->prev;
    nconns--;
    pthread_cond_broadcast(&nbd_cond);
    pthread_mutex_unlock(&nbd_lock);
  }
  nbd_conn_unref(c);
}

/* Remove everything; called on c's loop with nothing in flight. */
static void conn_destroy(struct nbd_conn *c)
{
  if (c->state == NBD_CONN_DEAD)
    return;
  c->state = NBD_CONN_DEAD;
  vdb_timer_stop(c->loop, &c->deadline);
  vdb_loop_unwatch(c->loop, &c->watch);
  conn_drop_output(c);
  pipe_close(c);
  close(c->fd);
  c->fd = -1;
  if (c->user_added)
    vdb_disk_remove_user(c->disk, &c->user);
  c->user_added = false;
  if (c->disk)
    vdb_disk_put(c->disk);
  c->disk = NULL;
  nbd_hs_release(&c->hs);
  nbd_obuf_free(&c->hsout);
  vdb_dbg(VDB_DBG_NBD, "%s: closed (sent %llu times and received %llu through the ring; "
          "%llu bytes of large payloads in %llu receives)",
          c->peer, (unsigned long long)c->ring_sends, (unsigned long long)c->ring_recvs,
          (unsigned long long)c->payload_bytes, (unsigned long long)c->payload_recvs);
  conn_forget(c);
}

/* Unplug or shutdown: finish what is in flight, then disconnect.  Requests
 * that arrive meanwhile are answered with ESHUTDOWN (transmission.c). */
static void conn_kick_on_loop(void *arg)
{
  struct nbd_conn *c = arg;

  if (c->state == NBD_CONN_HANDSHAKE) {
    c->hs.shutting_down = true;
    nbd_conn_close(c);
  } else if (c->state == NBD_CONN_TRANSMISSION) {
    c->kicked = true;
    nbd_tx_maybe_finish(c);
  }
  nbd_conn_unref(c);
}

void nbd_conn_post(struct nbd_conn *c, void (*fn)(void *arg), void *arg)
{
  while (vdb_loop_post(c->loop, fn, arg) < 0)  /* -ENOMEM: retry shortly */
    vdb_sleep_ms(1);
}

static void conn_post_kick(struct nbd_conn *c)
{
  atomic_fetch_add(&c->refs, 1);
  nbd_conn_post(c, conn_kick_on_loop, c);
}

static void conn_user_kick(struct vdb_disk_user *u)
{
  conn_post_kick(u->arg);
}

/* ---- input ---- */

static void hs_timeout(struct vdb_timer *t)
{
  struct nbd_conn *c = t->arg;

  vdb_info("NBD client %s did not finish the handshake in %u ms: dropped", c->peer,
           vdb_nbd_settings.handshake_timeout_ms);
  atomic_fetch_add(&c->refs, 1);
  nbd_conn_kill(c);
  nbd_conn_unref(c);
}

void nbd_conn_enter_transmission(struct nbd_conn *c)
{
  int r;

  c->disk = c->hs.disk;
  c->hs.disk = NULL;
  c->user.kick = conn_user_kick;
  c->user.arg = c;
  r = vdb_disk_add_user(c->disk, &c->user);
  if (r < 0) {
    vdb_info("%s: export %s is being unplugged", c->peer, c->disk->name);
    nbd_conn_kill(c);
    return;
  }
  c->user_added = true;
  vdb_timer_stop(c->loop, &c->deadline);
  c->state = NBD_CONN_TRANSMISSION;
  vdb_dbg(VDB_DBG_NBD, "%s: export %s, %s replies", c->peer, c->disk->name,
          c->hs.extended ? "extended" : c->hs.structured ? "structured" : "simple");
}

/* Drop up to c->discard bytes of buffered input (data of an option or
 * request we refused).  True when all of it is gone. */
bool nbd_conn_skip_input(struct nbd_conn *c)
{
  size_t avail = c->rend - c->rstart;
  size_t n = avail < c->discard ? avail : (size_t)c->discard;

  c->rstart += n;
  c->discard -= n;
  return c->discard == 0;
}

/* Parse the handshake bytes in rbuf. */
static void hs_process(struct nbd_conn *c)
{
  while (c->state == NBD_CONN_HANDSHAKE) {
    size_t avail = c->rend - c->rstart;
    const uint8_t *p = c->rbuf + c->rstart;
    uint64_t magic;
    uint32_t opt, len;
    int r;

    if (c->discard) {
      if (!nbd_conn_skip_input(c))
        return;
      r = nbd_hs_option_too_big(&c->hs, c->discard_opt, &c->hsout);
      if (r == NBD_HS_CLOSE)
        nbd_conn_close(c);
      continue;
    }
    if (!c->got_cflags) {
      if (avail < 4)
        return;
      memcpy(&opt, p, 4);
      c->rstart += 4;
      c->got_cflags = true;
      if (nbd_hs_client_flags(&c->hs, be32toh(opt)) < 0) {
        vdb_dbg(VDB_DBG_NBD, "%s: unknown client flags %#x", c->peer, be32toh(opt));
        nbd_conn_kill(c);
      }
      continue;
    }
    if (avail < 16)
      return;
    memcpy(&magic, p, 8);
    memcpy(&opt, p + 8, 4);
    memcpy(&len, p + 12, 4);
    opt = be32toh(opt);
    len = be32toh(len);
    if (be64toh(magic) != NBD_IHAVEOPT) {
      vdb_dbg(VDB_DBG_NBD, "%s: bad option magic", c->peer);
      nbd_conn_kill(c);
      return;
    }
    if (len > NBD_OPT_MAX) {
      c->rstart += 16;
      c->discard = len;
      c->discard_opt = opt;
      continue;
    }
    if (avail < 16 + (size_t)len)
      return;
    r = nbd_hs_option(&c->hs, opt, p + 16, len, &c->hsout);
    c->rstart += 16 + (size_t)len;
    if (c->hsout.oom)
      nbd_conn_kill(c);
    else if (r == NBD_HS_CLOSE)
      nbd_conn_close(c);
    else if (r == NBD_HS_TRANSMISSION)
      nbd_conn_enter_transmission(c);
  }
}

static void conn_process(struct nbd_conn *c)
{
  if (c->state == NBD_CONN_HANDSHAKE)
    hs_process(c);
  if (c->state == NBD_CONN_TRANSMISSION)
    nbd_tx_process(c);
}

/* Make room at the end of rbuf. */
static void rbuf_compact(struct nbd_conn *c)
{
  if (c->rstart == c->rend) {
    c->rstart = c->rend = 0;
  } else if (c->rend == NBD_RBUF_SIZE || c->rstart > NBD_RBUF_SIZE / 2) {
    memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
    c->rend -= c->rstart;
    c->rstart = 0;
  }
}

/* How much to read into rbuf, at most, of the room it has.  After a large
 * WRITE, the next one is likely large too: what rbuf takes of its payload
 * is copied again (from rbuf into the disk or the request's buffer) where
 * the rest goes in place, so then only a header's worth and a little is
 * read into rbuf (NBD_PEEK_SIZE), once.  A small request read short costs
 * a second recv at worst. */
static size_t rx_cap(struct nbd_conn *c, size_t room)
{
  if (!c->rx_peek || room <= NBD_PEEK_SIZE)
    return room;
  c->rx_peek = false;
  return NBD_PEEK_SIZE;
}

/* The client closed its end: a message cut short is an error. */
static void conn_input_end(struct nbd_conn *c)
{
  vdb_dbg(VDB_DBG_NBD, "%s: end of input", c->peer);
  if (c->payload_req || c->rend > c->rstart)
    nbd_conn_kill(c);   /* truncated message */
  else
    nbd_conn_close(c);
}

/* Read what the socket has (bounded, to stay fair to other connections). */
static void conn_read(struct nbd_conn *c)
{
  if (c->rx_pending)   /* rbuf is the ring's until its RECV completes */
    return;
  c->rx_drained = false;
  for (int i = 0; i < 16; i++) {
    ssize_t n;
    size_t want, tail = 0;

    if ((c->state != NBD_CONN_HANDSHAKE && c->state != NBD_CONN_TRANSMISSION) || c->throttled)
      break;
    if (c->payload_req) {
      struct nbd_req *r = c->payload_req;

      if (c->rx_await)
        break;   /* not before the mark is set for its rest (conn_lowat) */
      /* With the payload's rest, the next request's header, if it is
       * there: one recvmsg instead of two, and the next payload goes
       * wholly in place too.  (rbuf is empty while a payload is pending.) */
      rbuf_compact(c);
      tail = nbd_tx_hlen(c);
      if (tail > NBD_RBUF_SIZE - c->rend)
        tail = NBD_RBUF_SIZE - c->rend;
      want = r->len - c->payload_got;
      n = nbd_tx_recv_payload(c, want, c->rbuf + c->rend, tail);
    } else {
      rbuf_compact(c);
      want = rx_cap(c, NBD_RBUF_SIZE - c->rend);
      n = recv(c->fd, c->rbuf + c->rend, want, 0);
    }
    if (n < 0) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN) {
        vdb_dbg(VDB_DBG_NBD, "%s: recv: %m", c->peer);
        nbd_conn_kill(c);
      }
      break;
    }
    if (n == 0) {
      conn_input_end(c);
      break;
    }
    if (c->payload_req) {
      size_t p = (size_t)n < want ? (size_t)n : want;
      c->payload_got += p;
      c->payload_bytes += p;
      c->payload_recvs++;
      c->rend += (size_t)n - p;
      want += tail;
    } else
      c->rend += (size_t)n;
    conn_process(c);
    /* A short read drained the socket: the next recv would only say EAGAIN
     * (epoll is level-triggered, so data arriving meanwhile wakes us). */
    if ((size_t)n < want) {
      c->rx_drained = true;
      break;
    }
  }
}

/* Coalescing and polling: what the worker thread does after a wake-up
 * for this client, decided by measuring it.
 *
 * Pausing.  A client that keeps many requests in flight and is itself the
 * bottleneck (fio's one thread at QD32) sends a request or two per wake-up
 * of ours, and every wake-up costs us an epoll_wait, a recv and a sendmsg
 * however few requests it carries.  Such a client is not waiting for any
 * one reply, so pausing a little (coalesce_us) before we wait again costs
 * it nothing and lets several of its requests arrive together.  A pause is
 * taken only after a wake-up that emptied the socket with requests in it,
 * and never while replies wait for the socket to drain.
 *
 * Polling.  A client at low queue depth sends its next request a few
 * microseconds after our reply reaches it, sooner than a thread that went
 * to sleep is woken again: on a virtual machine whose idle CPUs halt, that
 * wake-up costs tens of microseconds and sets the client's rate (QD1 16k
 * against 40k requests/s measured here).  Such a client is served faster
 * if the thread polls for its next request for a while (poll_us) before it
 * sleeps: that burns CPU, so it is kept only where it buys throughput.
 *
 * Pausing would only slow the second kind of client, polling only burn CPU
 * for the first, and both do nothing for a client we cannot keep up with.
 * How long a pause should be depends on the client: one fio thread at
 * QD32 over TCP went from 7.9k to 10.3k requests per 40 ms with 10 us
 * pauses and fell to 6.7k with 40 us ones, while over a Unix socket 40 us
 * suited it better.  So there are two pause lengths, coalesce_us and a
 * quarter of it.
 *
 * Which kind this one is, is measured rather than guessed: a trial serves
 * it in slots of NBD_NAP_SLOT_NS, the modes (plain, pausing, pausing
 * briefly, polling; those not switched off) taking turns NBD_NAP_ROUNDS
 * times, and then keeps, for the next run:
 *  - polling, if the client's request rate with it is at least
 *    NBD_POLL_GAIN % of its rate in plain slots and of its rates with
 *    either pause;
 *  - else the pause that lowers the thread's CPU time per request without
 *    costing throughput (a rate at least 95% of the plain one); of two that
 *    qualify, the one with a rate NBD_PAUSE_FASTER % of the other's, or if
 *    neither is that much faster, the one that cost less per request;
 *  - else plain.
 * The run between trials (NBD_NAP_RUN_NS) doubles, up to 64 times, while
 * plain wins or trials keep deciding alike, so a client neither suits pays
 * for a trial only once in a long while, and one that suits a mode loses
 * that mode's advantage in the other slots less and less often. */
static uint64_t thread_cpu_ns(void)
{
  struct timespec ts;

  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) < 0)
    return 0;
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The modes a trial compares, plain first; their number. */
static unsigned trial_modes(uint8_t modes[NBD_NMODES])
{
  unsigned n = 0;

  modes[n++] = NBD_MODE_PLAIN;
  if (vdb_nbd_settings.coalesce_us) {
    modes[n++] = NBD_MODE_PAUSE;
    modes[n++] = NBD_MODE_PAUSE_SHORT;
  }
  if (vdb_nbd_settings.poll_us)
    modes[n++] = NBD_MODE_POLL;
  return n;
}

/* The pause after a wake-up in mode (a pausing one), in microseconds. */
static unsigned pause_us(uint8_t mode)
{
  unsigned us = vdb_nbd_settings.coalesce_us;

  if (mode == NBD_MODE_PAUSE_SHORT)
    us /= NBD_SHORT_PAUSE_DIV;
  return us ? us : 1;
}

/* Is a_n per a_ns at least pct % of b_n per b_ns?  Cross-multiplied; a
 * side with no time measured counts as no rate. */
static bool per_ns_at_least(uint64_t a_n, uint64_t a_ns, uint64_t b_n, uint64_t b_ns,
                            unsigned pct)
{
  if (a_ns == 0)
    return false;
  return (double)a_n * (double)b_ns * 100 >= (double)b_n * (double)a_ns * pct;
}

/* Is a's request rate at least pct % of b's? */
static bool rate_at_least(const struct nbd_nap_side *a, const struct nbd_nap_side *b,
                          unsigned pct)
{
  return per_ns_at_least(a->reqs, a->ns, b->reqs, b->ns, pct);
}

/* A trial has decided (changed: not as the one before); the run until the
 * next trial, in ns.  A trial costs the kept mode's advantage for its other slots, so the run
 * doubles (up to 64 times NBD_NAP_RUN_NS) while trials keep deciding the
 * same.  A change starts over: at 1 s for a mode that has an advantage to
 * keep, at 2 s for one that has none (idle: plain, or splicing). */
static uint64_t trial_run_ns(uint8_t *backoff, bool changed, bool idle)
{
  if (changed)
    *backoff = idle;
  else if (*backoff < 6)
    (*backoff)++;
  return NBD_NAP_RUN_NS << *backoff;
}

/* Did side a do its requests at less CPU per request than side b? */
static bool cheaper(const struct nbd_nap_side *a, const struct nbd_nap_side *b)
{
  return (double)a->cpu_ns * (double)b->reqs < (double)b->cpu_ns * (double)a->reqs;
}

/* Did a pausing side do its requests at less CPU per request than plain,
 * at a rate of at least 95% of plain's? */
static bool pause_pays(const struct nbd_nap_side *pause, const struct nbd_nap_side *plain)
{
  return rate_at_least(pause, plain, 95) && cheaper(pause, plain);
}

static const char *mode_name(uint8_t mode)
{
  switch (mode) {
  case NBD_MODE_POLL: return "polling";
  case NBD_MODE_PAUSE: return "pausing";
  case NBD_MODE_PAUSE_SHORT: return "pausing briefly";
  default: return "plain";
  }
}

/* The trial is over: the mode for the next run. */
static uint8_t trial_decide(const struct nbd_conn *c)
{
  const struct nbd_nap_side *plain = &c->nap_side[NBD_MODE_PLAIN];
  const struct nbd_nap_side *pause = &c->nap_side[NBD_MODE_PAUSE];
  const struct nbd_nap_side *brief = &c->nap_side[NBD_MODE_PAUSE_SHORT];
  const struct nbd_nap_side *poll = &c->nap_side[NBD_MODE_POLL];
  uint8_t mode = NBD_MODE_PLAIN;

  if (vdb_nbd_settings.coalesce_us && plain->reqs >= NBD_NAP_MIN_REQS) {
    bool long_ok = pause_pays(pause, plain), brief_ok = pause_pays(brief, plain);

    /* both pay: the one the client went clearly faster with, else the
     * one that cost less per request */
    if (long_ok && brief_ok)
      mode = rate_at_least(brief, pause, NBD_PAUSE_FASTER) ? NBD_MODE_PAUSE_SHORT
             : rate_at_least(pause, brief, NBD_PAUSE_FASTER) || cheaper(pause, brief)
                 ? NBD_MODE_PAUSE
                 : NBD_MODE_PAUSE_SHORT;
    else if (long_ok)
      mode = NBD_MODE_PAUSE;
    else if (brief_ok)
      mode = NBD_MODE_PAUSE_SHORT;
  }
  if (vdb_nbd_settings.poll_us && plain->reqs >= NBD_POLL_MIN_REQS &&
      rate_at_least(poll, plain, NBD_POLL_GAIN) &&
      (!vdb_nbd_settings.coalesce_us || (rate_at_least(poll, pause, NBD_POLL_GAIN) &&
                                         rate_at_least(poll, brief, NBD_POLL_GAIN))))
    mode = NBD_MODE_POLL;
  vdb_dbg(VDB_DBG_NBD, "%s: trial: plain %llu requests in %llu us (%llu us CPU), "
          "with pauses %llu in %llu us (%llu us CPU), "
          "with short pauses %llu in %llu us (%llu us CPU), "
          "polling %llu in %llu us (%llu us CPU): %s",
          c->peer, (unsigned long long)plain->reqs, (unsigned long long)(plain->ns / 1000),
          (unsigned long long)(plain->cpu_ns / 1000), (unsigned long long)pause->reqs,
          (unsigned long long)(pause->ns / 1000), (unsigned long long)(pause->cpu_ns / 1000),
          (unsigned long long)brief->reqs, (unsigned long long)(brief->ns / 1000),
          (unsigned long long)(brief->cpu_ns / 1000),
          (unsigned long long)poll->reqs, (unsigned long long)(poll->ns / 1000),
          (unsigned long long)(poll->cpu_ns / 1000), mode_name(mode));
  return mode;
}

/* The slot (or run) that began at c->nap_t0 is over: account it, go on. */
static void nap_next(struct nbd_conn *c, uint64_t now)
{
  uint64_t cpu = thread_cpu_ns();
  struct nbd_nap_side *side = &c->nap_side[c->nap_mode];
  uint8_t modes[NBD_NMODES];
  unsigned nmodes = trial_modes(modes);

  if (c->nap_slot > 0) {   /* a trial slot */
    side->reqs += c->nap_reqs;
    side->ns += now - c->nap_t0;
    side->cpu_ns += cpu - c->nap_cpu0;
  }
  if (c->nap_slot == nmodes * NBD_NAP_ROUNDS) {   /* the trial is over: decide */
    c->nap_mode = trial_decide(c);
    c->nap_len_ns = trial_run_ns(&c->nap_backoff, c->nap_mode != c->nap_kept,
                                 c->nap_mode == NBD_MODE_PLAIN);
    c->nap_kept = c->nap_mode;
    c->nap_slot = 0;
  } else {   /* the next slot: plain, pausing, pausing briefly, polling, plain, … */
    if (c->nap_slot == 0)
      memset(c->nap_side, 0, sizeof c->nap_side);
    c->nap_mode = modes[c->nap_slot % nmodes];
    c->nap_slot++;
    c->nap_len_ns = NBD_NAP_SLOT_NS;
  }
  c->nap_reqs = 0;
  c->nap_t0 = now;
  c->nap_cpu0 = cpu;
  c->sp_spoilt = true;   /* the client's rate changed pace: not a fair splice slot */
}

static void conn_coalesce(struct nbd_conn *c)
{
  unsigned got = c->rx_reqs;
  uint64_t now;

  c->rx_reqs = 0;
  if ((vdb_nbd_settings.coalesce_us == 0 && vdb_nbd_settings.poll_us == 0) ||
      c->state != NBD_CONN_TRANSMISSION || got == 0)
    return;
  now = vdb_now_ns();
  if (c->nap_len_ns == 0) {   /* the first requests: a short run, then the first trial */
    c->nap_len_ns = NBD_NAP_SLOT_NS;
    c->nap_t0 = now;
  }
  c->nap_reqs += got;
  if (now - c->nap_t0 >= c->nap_len_ns)
    nap_next(c, now);
  if ((c->nap_mode == NBD_MODE_PAUSE || c->nap_mode == NBD_MODE_PAUSE_SHORT) &&
      c->rx_drained && (!c->outq || (c->tx_pending && c->tx_all)) && c->hsout.len == 0)
    vdb_loop_nap(c->loop, pause_us(c->nap_mode));
  else if (c->nap_mode == NBD_MODE_POLL)
    vdb_loop_poll(c->loop, vdb_nbd_settings.poll_us);
}

/* Splicing or copying large reads, decided by measuring too.
 *
 * A large READ from memory that stays put (a RAM disk, a mapped file) is
 * spliced into a Unix socket: the kernel takes references to the pages
 * instead of copying them, and our CPU per MiB falls to a third.  But then
 * the client copies straight out of the disk's pages, which nobody has
 * touched lately, where a copying server hands it bytes just written into
 * the socket's buffer, still in the cache.  Which costs the client more
 * depends on the machine: on one host here fio took 1 MiB reads at 262 us
 * per MiB spliced against 214 copied, on another at 700 against 300, and
 * fio's one thread at 100% of a core set the rate (1,450 against
 * 2,900 MiB/s).  So a connection that reads large blocks gets a trial too:
 * NBD_SPLICE_ROUNDS slots of NBD_SPLICE_SLOT_NS of each, taking turns, and
 * it keeps copying only if that raised the client's read rate to at least
 * NBD_COPY_GAIN % (copying triples our CPU per MiB, so it must buy much);
 * else splicing.  Slots in which a coalescing trial ran, or the client
 * paused its large reads, are measured again: they say nothing about this.
 * The run between trials doubles (to 64 times NBD_NAP_RUN_NS) while trials
 * decide alike, as for coalescing. */
static void splice_next(struct nbd_conn *c, uint64_t now)
{
  if (c->sp_slot > 0) {
    struct nbd_sp_side *side = &c->sp_side[c->sp_copy];
    side->bytes += c->sp_bytes;
    side->ns += now - c->sp_t0;
  } else if (c->nap_slot > 0) {
    return;   /* a coalescing trial is on: begin after it */
  }
  if (c->sp_slot == 2 * NBD_SPLICE_ROUNDS) {   /* the trial is over: decide */
    const struct nbd_sp_side *sp = &c->sp_side[0], *cp = &c->sp_side[1];
    bool copy = sp->bytes >= NBD_SPLICE_MIN_BYTES && cp->bytes >= NBD_SPLICE_MIN_BYTES &&
                per_ns_at_least(cp->bytes, cp->ns, sp->bytes, sp->ns, NBD_COPY_GAIN);

    vdb_dbg(VDB_DBG_NBD, "%s: splice trial: spliced %llu bytes in %llu us, "
            "copied %llu in %llu us: %s", c->peer, (unsigned long long)sp->bytes,
            (unsigned long long)(sp->ns / 1000), (unsigned long long)cp->bytes,
            (unsigned long long)(cp->ns / 1000), copy ? "copying" : "splicing");
    c->sp_len_ns = trial_run_ns(&c->sp_backoff, copy != c->sp_kept_copy, !copy);
    c->sp_kept_copy = c->sp_copy = copy;
    c->sp_slot = 0;
  } else {   /* the next slot: spliced, copied, spliced, … */
    if (c->sp_slot == 0)
      memset(c->sp_side, 0, sizeof c->sp_side);
    c->sp_copy = c->sp_slot % 2;
    c->sp_slot++;
    c->sp_len_ns = NBD_SPLICE_SLOT_NS;
  }
  c->sp_bytes = 0;
  c->sp_t0 = now;
  c->sp_spoilt = false;
}

bool nbd_splice_choose(struct nbd_conn *c, size_t len)
{
  uint64_t now = vdb_now_ns();

  if (c->sp_len_ns == 0) {   /* the first large read: splice a while, then the first trial */
    c->sp_len_ns = NBD_SPLICE_SLOT_NS;
    c->sp_t0 = now;
  } else if (c->sp_slot > 0 && (c->sp_spoilt || c->nap_slot > 0 ||
                                now - c->sp_last > 4 * NBD_SPLICE_SLOT_NS)) {
    c->sp_bytes = 0;         /* measure this slot again */
    c->sp_t0 = now;
    c->sp_spoilt = false;
  } else if (now - c->sp_t0 >= c->sp_len_ns) {
    splice_next(c, now);
  }
  c->sp_bytes += len;
  c->sp_last = now;
  return !c->sp_copy;
}

static void conn_received(struct vdb_uring_op *op, int res);

/* Ring mode, after a wake-up that emptied the socket: the next input is
 * received by the ring into rbuf (see rx_op). */
static void conn_recv_async(struct nbd_conn *c)
{
  struct io_uring_sqe *sqe;

  if (!vdb_loop_is_uring(c->loop) || c->rx_pending || !c->rx_drained ||
      c->state != NBD_CONN_TRANSMISSION || c->throttled || c->payload_req)
    return;
  rbuf_compact(c);
  if (c->rend == NBD_RBUF_SIZE || !(sqe = vdb_loop_get_sqe()))
    return;
  c->rx_want = rx_cap(c, NBD_RBUF_SIZE - c->rend);
  c->rx_op.cb = conn_received;
  io_uring_prep_recv(sqe, c->fd, c->rbuf + c->rend, c->rx_want, 0);
  vdb_uring_set_op(sqe, &c->rx_op);
  c->rx_pending = true;
  c->ring_recvs++;
  nbd_conn_ref(c);
  conn_update_events(c);   /* the watch is off meanwhile */
}

/* TCP: while a large WRITE's payload is coming in, the socket is to say
 * it is readable only once the rest of it is there (up to NBD_LOWAT_MAX),
 * not at every segment; the mark is back at 1 before we wait for anything
 * else (a header must wake us).  Called after every input event, so a
 * payload that completed anywhere in it resets the mark.  The kernel wakes
 * us early anyway if its receive buffer cannot hold the mark, and at the
 * end of input.  Loopback TCP delivers a 1 MiB payload in 64 KiB segments:
 * fio 1M write QD8 to a RAM disk went from 5.3 to 1.7 receives per MiB, the
 * server from 162 to 124 us per MiB and the rate from 4,021 to 5,539 MiB/s.
 * A large payload that has just begun is not received before the mark is
 * set for it (rx_await): received right after its header, the part there
 * by then was one receive more per payload, and a wake-up more for the
 * rest (1.9 receives per MiB, against 1.0 now).  Together with the next
 * header taken with the rest (conn_read): 97 against 108 us per MiB, the
 * medians of 9 alternating runs.  (A Unix socket's poll does not look at
 * SO_RCVLOWAT.)  Plain sockets only: under TLS, bytes a library had
 * already taken from the socket would not wake us. */
static void conn_lowat(struct nbd_conn *c)
{
  int want = 1;

  if (!c->tcp || c->state != NBD_CONN_TRANSMISSION)
    return;   /* closing: no more input is read */
  if (c->payload_req) {
    size_t rest = c->payload_req->len - c->payload_got;   /* >= 1 while it is pending */
    want = rest > NBD_LOWAT_MAX ? (int)NBD_LOWAT_MAX : (int)rest;
  }
  c->rx_await = false;
  if (want == c->lowat)
    return;
  if (setsockopt(c->fd, SOL_SOCKET, SO_RCVLOWAT, &want, sizeof want) == 0)
    c->lowat = want;
  else
    c->tcp = false;   /* not to be had: leave it */
}

/* After input: send, decide the pause, maybe receive through the ring. */
static void conn_after_input(struct nbd_conn *c)
{
  c->in_handler = false;
  conn_lowat(c);
  nbd_conn_flush(c);
  conn_coalesce(c);
  if (c->state == NBD_CONN_TRANSMISSION)
    conn_recv_async(c);
}

/* The ring's RECV (conn_recv_async) completed. */
static void conn_received(struct vdb_uring_op *op, int res)
{
  struct nbd_conn *c = (struct nbd_conn *)((char *)op - offsetof(struct nbd_conn, rx_op));

  c->rx_pending = false;
  c->rx_cancelled = false;
  if (c->state == NBD_CONN_DEAD) {
    nbd_conn_unref(c);
    return;
  }
  c->in_handler = true;
  if (c->state != NBD_CONN_TRANSMISSION || res == -ECANCELED) {
    /* closing: what came is not read */
  } else if (res > 0) {
    c->rend += (size_t)res;
    c->rx_drained = false;
    conn_process(c);
    if ((size_t)res < c->rx_want && !c->payload_req)
      c->rx_drained = true;
    else
      conn_read(c);   /* more is there, or a payload goes in place */
  } else if (res == 0) {
    conn_input_end(c);
  } else if (res != -EAGAIN && res != -EINTR) {
    vdb_dbg(VDB_DBG_NBD, "%s: recv: %s", c->peer, strerror(-res));
    nbd_conn_kill(c);
  }
  conn_after_input(c);
  nbd_conn_unref(c);
}

static void conn_on_event(struct vdb_watch *w, uint32_t revents)
{
  struct nbd_conn *c = w->arg;

  atomic_fetch_add(&c->refs, 1);
  c->in_handler = true;
  if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR))
    conn_read(c);
  if (c->state == NBD_CONN_CLOSING && (revents & (EPOLLHUP | EPOLLERR)) && !c->outq)
    c->write_failed = true;
  conn_after_input(c);
  nbd_conn_unref(c);
}

/* ---- accepting ---- */

/* Watch c on its loop (which runs this).  On failure the connection is
 * gone and -1 is returned. */
static int conn_watch(struct nbd_conn *c)
{
  c->watch.fd = c->fd;
  c->watch.events = EPOLLIN;
  c->events = EPOLLIN;
  c->watch.cb = conn_on_event;
  c->watch.arg = c;
  c->deadline.cb = hs_timeout;
  c->deadline.arg = c;
  if (vdb_loop_watch(c->loop, &c->watch) == 0)
    return 0;
  vdb_warn("%s: cannot watch connection", c->peer);
  close(c->fd);
  c->state = NBD_CONN_DEAD;
  nbd_hs_release(&c->hs);
  conn_forget(c);
  return -1;
}

/* A network client: greeting, handshake deadline. */
static void conn_start(void *arg)
{
  struct nbd_conn *c = arg;

  nbd_hs_greeting(&c->hsout);
  if (conn_watch(c) < 0)
    return;
  if (vdb_nbd_settings.handshake_timeout_ms)
    vdb_timer_start(c->loop, &c->deadline, vdb_nbd_settings.handshake_timeout_ms);
  nbd_conn_flush(c);
}

/* vdb_nbd_serve_socket: straight into transmission. */
static void conn_start_local(void *arg)
{
  struct nbd_conn *c = arg;

  if (conn_watch(c) < 0)
    return;
  nbd_conn_enter_transmission(c);
  nbd_conn_flush(c);
}

/* A new connection object for fd, on a worker loop; NULL if out of memory. */
static struct nbd_conn *conn_new(int fd)
{
  struct nbd_conn *c = calloc(1, sizeof *c);

  if (c && !(c->rbuf = malloc(NBD_RBUF_SIZE))) {
    free(c);
    c = NULL;
  }
  if (!c)
    return NULL;
  c->fd = fd;
  c->pipe[0] = c->pipe[1] = -1;
  c->loop = vdb_workers_count() > 0 ? vdb_worker_pick() : listen_loop;
  c->refs = 1;
  c->outq_tail = &c->outq;
  return c;
}

static void peer_name(int fd, bool is_unix, char *buf, size_t len);

/* A Unix socket's send buffer bounds the data in flight to the client
 * (208 KiB by default): a 1 MiB read reply would take five wake-ups of
 * each side.  Ask for NBD_SNDBUF (capped by net.core.wmem_max; TCP keeps
 * its autotuning). */
static void set_sndbuf(int fd)
{
  int sz = NBD_SNDBUF;

  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
}

static void accept_one(struct nbd_listener *l, int fd)
{
  struct nbd_conn *c;
  int one = 1;

  pthread_mutex_lock(&nbd_lock);
  if (nconns >= vdb_nbd_settings.max_connections) {
    uint64_t now = vdb_now_ns();
    pthread_mutex_unlock(&nbd_lock);
    if (now - refused_log_ns > 1000000000ull) {
      vdb_warn("NBD: connection limit (%u) reached: refusing new clients",
               vdb_nbd_settings.max_connections);
      refused_log_ns = now;
    }
    close(fd);
    return;
  }
  if (!(c = conn_new(fd))) {
    pthread_mutex_unlock(&nbd_lock);
    close(fd);
    vdb_warn("NBD: out of memory accepting a client");
    return;
  }
  c->next = conns;
  if (conns)
    conns->prev = c;
  conns = c;
  nconns++;
  pthread_mutex_unlock(&nbd_lock);

  if (!l->is_unix) {
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Measured on loopback: a TCP receiver copies spliced page fragments
     * slower than the sender copies them (1.5-1.7 vs 2.3-2.5 GB/s for 1 MiB
     * reads), so TCP replies are sent by copy, with autotuned buffers. */
    c->no_splice = true;
    c->tcp = true;
    c->lowat = 1;
  } else
    set_sndbuf(fd);
  peer_name(fd, l->is_unix, c->peer, sizeof c->peer);
  vdb_dbg(VDB_DBG_NBD, "%s: connected", c->peer);
  nbd_conn_post(c, conn_start, c);
}

uint16_t vdb_nbd_tflags(const struct vdb_disk *d)
{
  return nbd_tflags(d, false);
}

int vdb_nbd_serve_socket(struct vdb_disk *d, int fd, const char *label,
                         void (*on_closed)(void *arg), void *arg)
{
  struct nbd_conn *c;
  int fl = fcntl(fd, F_GETFL);

  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
      fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  if (vdb_workers_count() == 0 && !listen_loop) {
    close(fd);
    return -ENODEV;
  }
  if (!(c = conn_new(fd))) {
    close(fd);
    return -ENOMEM;
  }
  set_sndbuf(fd);
  c->local = true;
  c->on_closed = on_closed;
  c->closed_arg = arg;
  c->got_cflags = true;
  c->hs.structured = false;
  c->hs.tflags = nbd_tflags(d, false);
  vdb_disk_get(d);
  c->hs.disk = d;
  snprintf(c->peer, sizeof c->peer, "%s", label);
  vdb_dbg(VDB_DBG_NBD, "%s: local connection to %s", c->peer, d->name);
  nbd_conn_post(c, conn_start_local, c);
  return 0;
}

static void peer_name(int fd, bool is_unix, char *buf, size_t len)
{
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  char host[INET6_ADDRSTRLEN] = "?", port[16] = "?";

  if (is_unix) {
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0)
      snprintf(buf, len, "unix:pid=%d", (int)cred.pid);
    else
      snprintf(buf, len, "unix");
    return;
  }
  if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0)
    getnameinfo((struct sockaddr *)&ss, sl, host, sizeof host, port, sizeof port,
                NI_NUMERICHOST | NI_NUMERICSERV);
  snprintf(buf, len, "%s:%s", host, port);
}

static void listener_retry(struct vdb_timer *t)
{
  struct nbd_listener *l = t->arg;

  vdb_loop_modify(listen_loop, &l->watch, EPOLLIN);
}

static void listener_on_event(struct vdb_watch *w, uint32_t revents)
{
  struct nbd_listener *l = w->arg;

  for (int i = 0; i < 64; i++) {
    int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED)
        continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        vdb_warn("NBD: accept: %m: pausing for 100 ms");
        vdb_loop_modify(listen_loop, &l->watch, 0);
        vdb_timer_start(listen_loop, &l->retry, 100);
      }
      return;
    }
    accept_one(l, fd);
  }
}

/* ---- listeners ---- */

static int listen_unix(struct nbd_listener *l, const char *path)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd;

  if (strlen(path) >= sizeof sa.sun_path) {
    vdb_set_error("socket path too long: %s", path);
    return -ENAMETOOLONG;
  }
  strcpy(sa.sun_path, path);
  snprintf(l->path, sizeof l->path, "%s", path);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    goto fail;
  unlink(path); /* a stale socket: vdbusd already made sure no daemon runs */
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || chmod(path, 0600) < 0 ||
      listen(fd, 128) < 0)
    goto fail;
  l->is_unix = true;
  l->fd = fd;
  return 0;
fail: {
    int e = errno;
    if (fd >= 0)
      close(fd);
    vdb_set_error("cannot listen on %s: %s", path, strerror(e));
    return -e;
  }
}

/* "HOST:PORT", "[V6]:PORT" or ":PORT" (all addresses). */
static int split_hostport(const char *s, char *host, size_t hl, char *port, size_t pl)
{
  const char *colon;

  if (s[0] == '[') {
    const char *end = strchr(s, ']');
    if (!end || end[1] != ':')
      return -EINVAL;
    snprintf(host, hl, "%.*s", (int)(end - s - 1), s + 1);
    colon = end + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon)
      return -EINVAL;
    snprintf(host, hl, "%.*s", (int)(colon - s), s);
  }
  snprintf(port, pl, "%s", colon + 1);
  return port[0] ? 0 : -EINVAL;
}

static int listen_tcp(struct nbd_listener *l, const char *hostport)
{
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
  struct addrinfo *res;
  int fd = -1, e, one = 1;

  if (split_hostport(hostport, l->host, sizeof l->host, l->port, sizeof l->port) < 0) {
    vdb_set_error("bad TCP address '%s' (want HOST:PORT)", hostport);
    return -EINVAL;
  }
  e = getaddrinfo(l->host[0] ? l->host : NULL, l->port, &hints, &res);
  if (e) {
    vdb_set_error("cannot resolve '%s': %s", hostport, gai_strerror(e));
    return -EINVAL;
  }
  e = 0;
  for (struct addrinfo *a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      e = errno;
      continue;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 128) == 0)
      break;
    e = errno;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) {
    vdb_set_error("cannot listen on %s: %s", hostport, strerror(e));
    return -e;
  }
  l->fd = fd;
  return 0;
}

int vdb_nbd_listen(struct vdb_loop *loop, const char *spec)
{
  struct nbd_listener *l;
  int r;

  if (nlisteners == NBD_MAX_LISTENERS) {
    vdb_set_error("too many NBD listeners (at most %d)", NBD_MAX_LISTENERS);
    return -E2BIG;
  }
  l = calloc(1, sizeof *l);
  if (!l)
    return -ENOMEM;
  l->fd = -1;
  if (strncmp(spec, "unix:", 5) == 0 && spec[5])
    r = listen_unix(l, spec + 5);
  else if (strncmp(spec, "tcp:", 4) == 0)
    r = listen_tcp(l, spec + 4);
  else {
    vdb_set_error("bad listen address '%s' (want unix:PATH or tcp:HOST:PORT)", spec);
    r = -EINVAL;
  }
  if (r < 0)
    goto err;
  listen_loop = loop;
  l->watch.fd = l->fd;
  l->watch.events = EPOLLIN;
  l->watch.cb = listener_on_event;
  l->watch.arg = l;
  l->retry.cb = listener_retry;
  l->retry.arg = l;
  if ((r = vdb_loop_watch(loop, &l->watch)) < 0) {
    vdb_set_error("cannot watch NBD listener: %s", strerror(-r));
    goto err;
  }
  listeners[nlisteners++] = l;
  vdb_info("NBD: listening on %s", spec);
  return 0;

err:
  if (l->fd >= 0)
    close(l->fd);
  free(l);
  return r;
}

void vdb_nbd_stop_listening(void)
{
  for (int i = 0; i < nlisteners; i++) {
    struct nbd_listener *l = listeners[i];
    vdb_timer_stop(listen_loop, &l->retry);
    vdb_loop_unwatch(listen_loop, &l->watch);
    close(l->fd);
    if (l->is_unix)
      unlink(l->path);
    free(l);
    listeners[i] = NULL;
  }
  nlisteners = 0;
}

void vdb_nbd_shutdown(unsigned timeout_ms)
{
  struct timespec deadline;

  pthread_mutex_lock(&nbd_lock);
  for (struct nbd_conn *c = conns; c; c = c->next) {
    conn_post_kick(c);
  }
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += timeout_ms / 1000;
  deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
  if (deadline.tv_nsec >= 1000000000) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000;
  }
  while (nconns > 0)
    if (pthread_cond_timedwait(&nbd_cond, &nbd_lock, &deadline) == ETIMEDOUT) {
      vdb_warn("NBD: %u connection(s) still open after %u ms", nconns, timeout_ms);
      break;
    }
  pthread_mutex_unlock(&nbd_lock);
}

int vdb_nbd_uri(const struct vdb_disk *d, char *buf, size_t len)
{
  const struct nbd_listener *l = nlisteners > 0 ? listeners[0] : NULL;

  if (!l || !d->export)
    return -ENOENT;
  if (l->is_unix)
    snprintf(buf, len, "nbd+unix:///%s?socket=%s", d->name, l->path);
  else if (strchr(l->host, ':'))
    snprintf(buf, len, "nbd://[%s]:%s/%s", l->host, l->port, d->name);
  else
    snprintf(buf, len, "nbd://%s:%s/%s", l->host[0] ? l->host : "localhost", l->port, d->name);
  return 0;
}
