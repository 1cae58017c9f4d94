/* vdbus — backend "nbd": what its two files share (nbd.c: open, close and
 * the data-path entry; nbd-conn.c: the connection threads). */
#ifndef VDB_BACKENDS_NBD_H
#define VDB_BACKENDS_NBD_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include <libnbd.h>

#include <vdbus/backend.h>

#define NBDB_MAX_CONNS      16
#define NBDB_DEFAULT_CONNS  4          /* when the server offers multi-conn */
#define NBDB_SLOTS          64         /* commands in flight per connection */
#define NBDB_DATA_CHUNK     (32u << 20) /* largest read/write command */
#define NBDB_OTHER_CHUNK    (1u << 30) /* largest trim/zero/cache/block status */
#define NBDB_BACKOFF_MIN_MS 100
#define NBDB_BACKOFF_MAX_MS 5000
#define NBDB_SHORT_LIVED_NS 1000000000u /* a connection that died within this: back off */
#define NBDB_UNPLUG_GRACE_NS 3000000000u /* unplugging: wait this long for answers */
#define NBDB_TICK_MS        100        /* expiry checks while disconnected */
#define NBDB_DEFAULT_TIMEOUT 30
#define NBDB_MAX_TIMEOUT    3600

/* What the export offers; must be the same on every reconnection. */
struct nbdb_export {
  uint64_t size;
  bool readonly, can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_cache,
       can_extents, can_multi_conn;
  uint32_t min_block, pref_block, max_block; /* 0: not advertised */
};

/* One command in flight (or one request between its chunks). */
struct nbdb_slot {
  struct vdb_req *req;   /* NULL when free */
  uint64_t len;          /* bytes the command in flight covers */
  bool done;             /* its completion callback ran (or submission failed) */
  int err;               /* positive errno of the result, 0 on success */
};

struct nbdb;

struct nbdb_conn {
  struct nbdb *nb;
  int idx;
  pthread_t thread;
  bool started;
  int efd;                       /* eventfd: wakes the thread */
  pthread_mutex_t lock;          /* protects head and tail */
  struct vdb_req *head, *tail;   /* waiting to be issued */
  atomic_int load;               /* queued + in flight */
  atomic_bool live;              /* connected; touched only by the thread */
  /* Connection-thread only: */
  struct nbd_handle *h;
  bool broken;                   /* reconnect (server said ESHUTDOWN, poll failed) */
  char lost[160];                /* why the connection failed, for the log */
  bool ever_live;
  uint64_t cancel_seen;           /* when a command of an unplugging disk was seen waiting */
  uint64_t up_since;             /* when the connection came up (ns) */
  unsigned backoff_ms;           /* next pause when a new connection dies at once */
  struct nbdb_slot slots[NBDB_SLOTS];
  unsigned free_idx[NBDB_SLOTS]; /* stack of free slot indices */
  unsigned nfree;
};

struct nbdb {
  char *uri;
  uint64_t timeout_ns;
  int nconns;
  struct nbdb_export exp;
  uint64_t data_chunk;           /* read/write command size limit */
  atomic_bool closing;
  struct nbdb_conn conns[];
};

/* Per-request state, in req->backend_priv. */
struct nbdb_rs {
  struct vdb_req *next;  /* queue link */
  uint64_t deadline;     /* CLOCK_MONOTONIC ns: latest time to reach a live connection */
  uint64_t done;         /* bytes acknowledged so far */
  bool fua_flush;        /* data acknowledged; the flush of an emulated FUA is next */
};
_Static_assert(sizeof(struct nbdb_rs) <= sizeof(((struct vdb_req *)0)->backend_priv),
               "nbdb_rs must fit in backend_priv");

static inline struct nbdb_rs *nbdb_rs_of(struct vdb_req *req)
{
  return (struct nbdb_rs *)req->backend_priv;
}

static inline uint64_t nbdb_now_ns(void)
{
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* nbd-conn.c */

/* Connect a new handle to uri, waiting at most timeout_ms; while waiting,
 * c (if not NULL) keeps expiring its queue.  Returns the handle, or NULL
 * with *err (positive errno) and msg (libnbd's message) set. */
struct nbd_handle *nbdb_connect(struct nbdb *nb, const char *uri, struct nbdb_conn *c,
                                uint64_t timeout_ms, int *err, char *msg, size_t msglen);
/* Read what the export offers from a connected handle; 0 or -1 (libnbd error). */
int nbdb_export_probe(struct nbd_handle *h, struct nbdb_export *e);
/* A positive errno for libnbd's last error on this thread, or dflt. */
int nbdb_errno_or(int dflt);
/* The least-loaded live connection other than avoid, else (none live) the
 * least-loaded one of all.  Any thread. */
struct nbdb_conn *nbdb_pick(struct nbdb *nb, const struct nbdb_conn *avoid);
/* Append req to c's queue and wake c's thread.  Any thread. */
void nbdb_conn_push(struct nbdb_conn *c, struct vdb_req *req);
/* Take up to max requests off c's queue, in order, as a list.  Any thread. */
struct vdb_req *nbdb_conn_pop(struct nbdb_conn *c, unsigned max);
void nbdb_conn_wake(struct nbdb_conn *c);
/* The connection thread: arg is the struct nbdb_conn. */
void *nbdb_conn_thread(void *arg);

#endif
