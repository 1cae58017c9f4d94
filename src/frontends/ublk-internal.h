/* vdbus — ublk frontend internals shared by ublk.c (control path: add,
 * parameters, start, recovery, delete) and ublk-queue.c (the data path: one
 * thread per hardware queue). */
#ifndef VDB_UBLK_INTERNAL_H
#define VDB_UBLK_INTERNAL_H

#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "bus/bus.h"
#include "common/loop.h"
#include "frontends/ublk-uapi.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

#define UB_CONTROL "/dev/ublk-control"
#define UB_QUEUE_DEPTH 128
#define UB_MAX_IO (512u << 10)        /* max_io_buf_bytes */
#define UB_MAX_DISCARD (1u << 30)     /* bytes per discard */
#define UB_MAX_ZEROES (32u << 20)     /* bytes per write-zeroes */
#define UB_NODE_WAIT_MS 5000          /* for /dev/ublkcN and /dev/ublkbN */
#define UB_QUIESCE_WAIT_MS 5000       /* for a dead daemon's device to quiesce */
#define UB_BUSY_ROUNDS 16             /* reap/submit rounds per wake-up */
#define UB_MAGIC 0x76646275ull        /* "vdbu", in ublksrv_flags' high half */
#define UB_MAX_CLAIMED 256
/* The flags we use when the kernel offers them. */
#define UB_WANT_FLAGS \
  (UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_CMD_IOCTL_ENCODE)

struct ublk_fe;
struct ub_queue;

/* One tag of a queue: its buffer and the bus request serving it. */
struct ub_io {
  struct vdb_req req;
  struct ub_queue *q;
  void *buf;                    /* UB_MAX_IO bytes, given to the driver */
  uint16_t tag;
  int32_t result;               /* for COMMIT_AND_FETCH_REQ */
  bool owned;                   /* a request is being served (queue thread) */
  bool dead;                    /* aborted by the driver: never re-fetch */
  struct ub_io *next;           /* remote completion list */
};

/* One hardware queue: a thread running a vdb_loop and a uring. */
struct ub_queue {
  struct ublk_fe *u;
  uint16_t qid;
  struct vdb_loop *loop;
  pthread_t thread;
  bool thread_started;

  struct io_uring ring;         /* the queue's uring commands */
  bool ring_ok;
  struct vdb_watch ring_w;      /* eventfd registered with ring */
  struct vdb_watch done_w;      /* eventfd: completions from other threads */
  bool watching;

  const struct ublksrv_io_desc *iods; /* mmap'd from /dev/ublkcN */
  size_t iods_len;
  void *bufs;                   /* depth * UB_MAX_IO */
  size_t bufs_len;
  struct ub_io *ios;            /* depth of them */

  _Atomic(struct ub_io *) remote; /* completed on other threads */
  unsigned owned;               /* tags being served; queue thread only */
  bool stopping;                /* queue thread only */
  bool stopped;                 /* ring gone, loop told to stop */
  bool in_cb;                   /* in ub_on_ring/ub_on_done: they submit */

  pthread_mutex_t lock;         /* start rendezvous */
  pthread_cond_t cond;
  bool call_done;
  int start_err;
};

/* One attached disk. */
struct ublk_fe {
  struct vdb_disk *d;
  int dev_id;                   /* -1 until added */
  int cdev_fd;                  /* /dev/ublkcN */
  uint64_t features;            /* GET_FEATURES */
  uint64_t flags;               /* what the device runs with */
  uint16_t nr_queues, depth;
  uint32_t max_io;
  bool added, started, recovered;
  struct ub_queue *queues;      /* nr_queues of them */
  int nr_started;               /* queues whose thread runs */
  char dev[32];                 /* "/dev/ublkbN" */
  dev_t rdev;
};

/* ublk-queue.c: start a queue's thread (it fetches every tag) and wait for
 * it; stop it (aborted tags are not re-fetched) and join.  Control thread. */
int ub_queue_start(struct ublk_fe *u, struct ub_queue *q);
void ub_queue_stop(struct ub_queue *q);

#endif
