/* vdbus — backend "nbd": a disk whose data lives on a remote NBD server.
 *
 * The NBD client is libnbd (nbd_aio_connect_uri: every URI form libnbd
 * knows, TLS included).  This file: parameters, open (the first connection
 * learns what the export offers), close, and the data-path entry, which
 * queues each request on the least-loaded live connection.  The connection
 * threads are in nbd-conn.c.
 *
 * Failure: a dead connection (EOF, reset, protocol error, NBD_ESHUTDOWN)
 * is reopened with exponential backoff (100 ms doubling to 5 s); its
 * commands in flight are reissued.  A request waits for a live connection
 * at most `timeout` seconds from its submission, then fails with -EIO; a
 * slow but live server is not a failure.  A server's error reply completes
 * the request with that errno.  A reconnection that finds a different
 * export (size or capabilities changed) is refused and retried. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "backends/nbd.h"
#include "backends/registry.h"
#include "common/log.h"

/* ---- the data path (any thread) ---- */

/* Every data-path callback: queue req on the least-loaded live connection
 * (its thread issues it).  The bus has checked range, read-only and
 * capabilities; FAST_ZERO is ours to refuse.  Any thread. */
static void nbdb_submit(void *handle, struct vdb_req *req)
{
  struct nbdb *nb = handle;
  struct nbdb_rs *rs = nbdb_rs_of(req);

  if (req->type == VDB_REQ_WRITE_ZEROES && (req->flags & VDB_REQ_FAST_ZERO) &&
      !nb->exp.can_fast_zero) {
    vdb_req_complete(req, -ENOTSUP);
    return;
  }
  rs->deadline = nbdb_now_ns() + nb->timeout_ns;
  rs->done = 0;
  rs->fua_flush = false;
  nbdb_conn_push(nbdb_pick(nb, NULL), req);
}

/* ---- open and close ---- */

/* Parameter key as a whole number in [lo, hi]; *out = dflt when absent.
 * 0, or -EINVAL after vdb_set_error(). */
static int parse_uint(const struct vdb_params *params, const char *key, unsigned lo,
                      unsigned hi, unsigned dflt, unsigned *out, const char *what)
{
  const char *v = vdb_params_get(params, key);
  char *end;
  unsigned long n;

  *out = dflt;
  if (!v)
    return 0;
  errno = 0;
  n = strtoul(v, &end, 10);
  if (!*v || *end || errno || v[0] == '-' || n < lo || n > hi) {
    vdb_set_error("nbd backend: %s must be %s from %u to %u, not '%s'", key, what, lo, hi, v);
    return -EINVAL;
  }
  *out = (unsigned)n;
  return 0;
}

/* Set up connection i (not its thread); 0 or -errno. */
static int conn_init(struct nbdb *nb, int i)
{
  struct nbdb_conn *c = &nb->conns[i];

  c->nb = nb;
  c->idx = i;
  c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (c->efd < 0)
    return -errno;
  pthread_mutex_init(&c->lock, NULL);
  for (unsigned k = 0; k < NBDB_SLOTS; k++)
    c->free_idx[k] = NBDB_SLOTS - 1 - k;
  c->nfree = NBDB_SLOTS;
  return 0;
}

/* Stop the connection threads, disconnect politely from a live server and
 * free everything.  The bus guarantees no request is in flight; anything
 * still queued (a half-opened instance) fails with -ESHUTDOWN.  Control
 * path; also undoes a failed open. */
static void nbdb_close(void *handle)
{
  struct nbdb *nb = handle;

  atomic_store(&nb->closing, true);
  for (int i = 0; i < nb->nconns; i++)
    if (nb->conns[i].efd >= 0)
      nbdb_conn_wake(&nb->conns[i]);
  for (int i = 0; i < nb->nconns; i++) {
    struct nbdb_conn *c = &nb->conns[i];
    struct vdb_req *list;
    if (c->started)
      pthread_join(c->thread, NULL);
    if (c->h && nbd_aio_is_ready(c->h) == 1)
      nbd_aio_disconnect(c->h, 0); /* NBD_CMD_DISC, sent at once if the socket takes it */
    if (c->h)
      nbd_close(c->h);
    for (unsigned k = 0; k < NBDB_SLOTS; k++)
      if (c->slots[k].req)
        vdb_req_complete(c->slots[k].req, -ESHUTDOWN);
    list = c->efd >= 0 ? nbdb_conn_pop(c, ~0u) : NULL;
    while (list) {
      struct vdb_req *req = list;
      list = nbdb_rs_of(req)->next;
      vdb_req_complete(req, -ESHUTDOWN);
    }
    if (c->efd >= 0) {
      close(c->efd);
      pthread_mutex_destroy(&c->lock);
    }
  }
  free(nb->uri);
  free(nb);
}

/* Fill *info from the export. */
static void nbdb_fill_info(const struct nbdb *nb, struct vdb_backend_info *info)
{
  const struct nbdb_export *e = &nb->exp;

  info->size = e->size;
  info->readonly = e->readonly;
  info->can_multi_conn = e->can_multi_conn || nb->nconns == 1;
  info->volatile_cache = e->can_flush;
  if (e->min_block)
    info->min_block = e->min_block;
  if (e->pref_block)
    info->pref_block = e->pref_block > info->min_block ? e->pref_block : info->min_block;
  info->max_block = (uint32_t)nb->data_chunk;
  if (info->pref_block > info->max_block)
    info->pref_block = info->max_block;
  info->caps_off = (e->can_trim ? 0 : VDB_CAP_TRIM) | (e->can_zero ? 0 : VDB_CAP_ZERO) |
                   (e->can_fast_zero ? 0 : VDB_CAP_FAST_ZERO) |
                   (e->can_extents ? 0 : VDB_CAP_EXTENTS) | (e->can_cache ? 0 : VDB_CAP_CACHE) |
                   (e->can_flush ? 0 : VDB_CAP_FLUSH) |
                   (e->can_flush || e->can_fua ? 0 : VDB_CAP_FUA);
  snprintf(info->description, sizeof info->description, "NBD %s, %d connection%s%s", nb->uri,
           nb->nconns, nb->nconns == 1 ? "" : "s", e->can_multi_conn ? " (multi-conn)" : "");
}

/* Connect once at plug time and learn what the export offers. */
static int nbdb_first_connect(const char *uri, unsigned timeout, struct nbd_handle **hp,
                              struct nbdb_export *e)
{
  char msg[512];
  int err;
  struct nbd_handle *h = nbdb_connect(NULL, uri, NULL, (uint64_t)timeout * 1000u, &err, msg,
                                      sizeof msg);

  if (!h) {
    vdb_set_error("nbd backend: cannot connect to %s: %s", uri, msg);
    return -err;
  }
  if (nbdb_export_probe(h, e) < 0) {
    err = nbdb_errno_or(EIO);
    vdb_set_error("nbd backend: %s: %s", uri, nbd_get_error() ? nbd_get_error() : "probe failed");
    nbd_close(h);
    return -err;
  }
  if (e->size == 0) {
    vdb_set_error("nbd backend: %s: the export is empty (size 0)", uri);
    nbd_close(h);
    return -EINVAL;
  }
  *hp = h;
  return 0;
}

/* How many connections: *n from the parameter (0 if none), or 4 with
 * multi-conn, else 1. */
static void nbdb_nconns(const struct nbdb_export *e, const char *uri, unsigned *n)
{
  if (*n == 0)
    *n = e->can_multi_conn ? NBDB_DEFAULT_CONNS : 1;
  else if (*n > 1 && !e->can_multi_conn) {
    vdb_warn("nbd backend: %s does not offer multi-conn: using 1 connection, not %u", uri, *n);
    *n = 1;
  }
}

static int nbdb_start(struct nbdb *nb)
{
  for (int i = 0; i < nb->nconns; i++) {
    int r = conn_init(nb, i);
    if (r < 0) {
      vdb_set_error("nbd backend: eventfd: %s", strerror(-r));
      return r;
    }
  }
  for (int i = 0; i < nb->nconns; i++) {
    int r = pthread_create(&nb->conns[i].thread, NULL, nbdb_conn_thread, &nb->conns[i]);
    if (r) {
      vdb_set_error("nbd backend: cannot start a thread: %s", strerror(r));
      return -r;
    }
    nb->conns[i].started = true;
  }
  return 0;
}

static int nbdb_open(const struct vdb_params *params, void **handle, struct vdb_backend_info *info)
{
  const char *uri = vdb_params_get(params, "uri");
  struct nbd_handle *h = NULL;
  struct nbdb_export e;
  unsigned timeout, n;
  struct nbdb *nb;
  int r;

  if (!uri || !*uri) {
    vdb_set_error("nbd backend: a URI is required (nbd://HOST[:PORT]/EXPORT, "
                  "nbd+unix:///EXPORT?socket=PATH, nbds://…)");
    return -EINVAL;
  }
  r = parse_uint(params, "timeout", 1, NBDB_MAX_TIMEOUT, NBDB_DEFAULT_TIMEOUT, &timeout,
                 "whole seconds");
  if (r == 0)
    r = parse_uint(params, "connections", 1, NBDB_MAX_CONNS, 0, &n, "a number");
  if (r == 0)
    r = nbdb_first_connect(uri, timeout, &h, &e);
  if (r < 0)
    goto err;
  nbdb_nconns(&e, uri, &n);
  nb = calloc(1, sizeof *nb + n * sizeof nb->conns[0]);
  if (!nb || !(nb->uri = strdup(uri))) {
    free(nb);
    r = -ENOMEM;
    goto err;
  }
  for (unsigned i = 0; i < n; i++)
    nb->conns[i].efd = -1;
  nb->nconns = (int)n;
  nb->timeout_ns = (uint64_t)timeout * 1000000000u;
  nb->exp = e;
  nb->data_chunk = e.max_block && e.max_block < NBDB_DATA_CHUNK ? e.max_block : NBDB_DATA_CHUNK;
  nb->conns[0].h = h;
  nb->conns[0].ever_live = true;
  nb->conns[0].up_since = nbdb_now_ns();
  atomic_store(&nb->conns[0].live, true);
  r = nbdb_start(nb);
  if (r < 0) {
    nbdb_close(nb);
    return r;
  }
  nbdb_fill_info(nb, info);
  vdb_info("nbd backend: %s", info->description);
  *handle = nb;
  return 0;

err:
  if (h)
    nbd_close(h);
  return r;
}

const struct vdb_backend_ops vdb_backend_nbd = {
  .api_version = VDB_BACKEND_API_VERSION,
  .struct_size = sizeof(struct vdb_backend_ops),
  .name = "nbd",
  .summary = "a remote NBD server (libnbd; reconnects when the server goes away)",
  .usage = "uri=URI          nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH,\n"
           "                 nbds://… (TLS; tls-psk-file=, tls-certificates=) (positional)\n"
           "connections=N    connections to the server, 1 to 16 (default: 4 if the\n"
           "                 server offers multi-conn, else 1)\n"
           "timeout=SECONDS  how long a request may wait for a (re)connection before\n"
           "                 failing with EIO, 1 to 3600 (default 30)\n",
  .positional = "uri",
  .open = nbdb_open,
  .close = nbdb_close,
  .read = nbdb_submit,
  .write = nbdb_submit,
  .flush = nbdb_submit,
  .trim = nbdb_submit,
  .write_zeroes = nbdb_submit,
  .cache = nbdb_submit,
  .block_status = nbdb_submit,
};
