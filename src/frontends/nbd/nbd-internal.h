/* vdbus — NBD server internals shared by server.c (listeners, connections,
 * socket I/O), handshake.c (option negotiation) and transmission.c
 * (requests and replies).
 *
 * Threads: listeners accept on the control loop; each connection lives on
 * one worker loop and every field of struct nbd_conn is touched only there,
 * except refs (atomic) and the global list links (under nbd_lock). */
#ifndef VDB_NBD_INTERNAL_H
#define VDB_NBD_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "bus/bus.h"
#include "common/loop.h"

#define NBD_NAME_MAX      4096            /* spec: strings are at most 4096 bytes */
#define NBD_OPT_MAX       (16u * 1024)    /* option payload we buffer; more is skipped */
#define NBD_RBUF_SIZE     (64u * 1024)    /* input buffer (>= 16 + NBD_OPT_MAX) */
#define NBD_MAX_PAYLOAD   (32u << 20)     /* largest READ/WRITE */
#define NBD_MAX_INFLIGHT  256             /* requests per connection before we stop reading */
#define NBD_MAX_EXTENTS   512             /* extents per block-status reply */
#define NBD_META_ALLOC_ID 1               /* our id for base:allocation */

/* A growable output byte buffer (handshake replies; canned-byte tests). */
struct nbd_obuf {
  uint8_t *p;
  size_t len;   /* bytes in p */
  size_t off;   /* bytes already sent */
  size_t cap;
  bool oom;     /* an append failed: the connection must be dropped */
};
void nbd_obuf_put(struct nbd_obuf *b, const void *data, size_t len);
void nbd_obuf_be16(struct nbd_obuf *b, uint16_t v);
void nbd_obuf_be32(struct nbd_obuf *b, uint32_t v);
void nbd_obuf_be64(struct nbd_obuf *b, uint64_t v);
void nbd_obuf_free(struct nbd_obuf *b);

/* Option negotiation state: pure protocol, no sockets, so it can be driven
 * from canned bytes (tests/unit/test-nbd-options.c). */
struct nbd_hs {
  bool fixed;            /* client set NBD_FLAG_C_FIXED_NEWSTYLE */
  bool no_zeroes;        /* client set NBD_FLAG_C_NO_ZEROES */
  bool structured;       /* structured replies negotiated */
  bool extended;         /* extended headers negotiated (implies structured) */
  bool meta_alloc;       /* base:allocation selected … */
  char meta_export[VDB_NAME_MAX]; /* … for this export */
  bool shutting_down;    /* answer options with NBD_REP_ERR_SHUTDOWN */
  struct vdb_disk *disk; /* the export chosen by GO/EXPORT_NAME (a reference) */
  uint16_t tflags;       /* its transmission flags */
};

enum nbd_hs_result {
  NBD_HS_CONTINUE = 0,   /* reply queued; wait for the next option */
  NBD_HS_TRANSMISSION,   /* reply queued; enter transmission with hs->disk */
  NBD_HS_CLOSE,          /* flush what is queued, then close */
};

/* The server's greeting (NBDMAGIC, IHAVEOPT, handshake flags). */
void nbd_hs_greeting(struct nbd_obuf *out);
/* The client's 32-bit flags: 0, or -EPROTO when the connection must close. */
int nbd_hs_client_flags(struct nbd_hs *hs, uint32_t flags);
/* Handle one option whose len bytes of data are in data; append replies to
 * out.  Returns an enum nbd_hs_result. */
int nbd_hs_option(struct nbd_hs *hs, uint32_t opt, const uint8_t *data, uint32_t len,
                  struct nbd_obuf *out);
/* An option whose data was too long to buffer (already skipped). */
int nbd_hs_option_too_big(struct nbd_hs *hs, uint32_t opt, struct nbd_obuf *out);
/* Drop hs->disk. */
void nbd_hs_release(struct nbd_hs *hs);
/* Transmission flags for d. */
uint16_t nbd_tflags(const struct vdb_disk *d, bool structured);
/* The one mapping from -errno to NBD wire errors. */
uint32_t nbd_errno_to_wire(int err);
/* Look up an exported disk by NBD export name ("" = the first export). */
int nbd_export_find(const char *name, struct vdb_disk **out);

/* One request of a connection, reused through the connection's free list. */
struct nbd_req {
  struct vdb_req vreq;          /* what the bus sees */
  struct nbd_conn *conn;
  uint64_t cookie, offset, len;
  uint16_t cmd, cflags;
  int err;                      /* completion result, for posted completions */
  uint8_t *buf;                 /* READ/WRITE data (kept between uses) */
  size_t cap;
  struct vdb_extent *ext;       /* BLOCK_STATUS extents (kept) */
  uint8_t *bs;                  /* BLOCK_STATUS reply payload (kept) */
  uint8_t hdr[128];             /* reply header (+ small payload) */
  struct iovec iov[2];
  int niov;
  bool splice;                  /* iov[1] is the backend's memory: vmsplice it */
  bool direct;                  /* WRITE: payload goes straight into the disk */
  uint64_t direct_len;          /* WRITE: bytes of the payload stored that way (a prefix) */
  size_t outlen;                /* bytes in iov */
  struct nbd_req *next;         /* free list or output queue */
};

#define NBD_TX_IOV 128   /* iovecs in one sendmsg of replies */

enum nbd_conn_state { NBD_CONN_HANDSHAKE, NBD_CONN_TRANSMISSION, NBD_CONN_CLOSING, NBD_CONN_DEAD };

/* What a connection's worker thread does after a wake-up of it
 * (conn_coalesce): nothing, pause coalesce_us, pause a quarter of that
 * (NBD_SHORT_PAUSE_DIV), or poll. */
enum { NBD_MODE_PLAIN, NBD_MODE_PAUSE, NBD_MODE_PAUSE_SHORT, NBD_MODE_POLL, NBD_NMODES };

struct nbd_conn {
  int fd;
  struct vdb_loop *loop;
  struct vdb_watch watch;
  uint32_t events;              /* currently watched */
  struct vdb_timer deadline;    /* handshake deadline, then the closing drain deadline */
  _Atomic int refs;             /* the loop's, plus one per posted call */
  enum nbd_conn_state state;
  char peer[80];

  struct nbd_hs hs;
  struct vdb_disk *disk;        /* in transmission */
  struct vdb_disk_user user;
  bool user_added;

  /* Input. */
  uint8_t *rbuf;
  size_t rstart, rend;
  bool got_cflags;
  uint64_t discard;             /* input bytes still to skip */
  uint32_t discard_opt;         /* handshake: option being skipped */
  bool discard_is_opt;
  struct nbd_req *payload_req;  /* WRITE whose payload is being received */
  struct nbd_req *discard_req;  /* refused command whose payload is being skipped */
  int discard_err;              /* its error, replied once the payload is gone */
  uint64_t payload_got;

  /* Output. */
  struct nbd_obuf hsout;        /* handshake replies */
  struct nbd_req *outq, **outq_tail;
  size_t out_off;               /* bytes of outq's head already sent */
  int pipe[2];                  /* for splicing large mapped reads (-1: none yet) */
  size_t pipe_len;              /* bytes of outq's head in the pipe, after out_off */
  bool primed;                  /* outq's head (spliced) has its first part in the pipe */
  bool no_splice;               /* pipe unavailable: plain sendmsg */
  /* Ring mode (vdb_loop_is_uring): replies go out as an IORING_OP_SENDMSG
   * submitted with the loop's next wait or pause, not a sendmsg of their
   * own; outq's head stays put until it completes. */
  struct vdb_uring_op tx_op;
  struct msghdr tx_msg;
  struct iovec tx_iov[NBD_TX_IOV];
  bool tx_pending;              /* the SENDMSG is in the ring (holds a reference) */
  bool tx_all;                  /* and holds all of outq */
  bool tx_cancelled;            /* and asked to stop: the peer is gone */
  /* Likewise the next input once the socket is empty: an IORING_OP_RECV
   * into rbuf goes into the ring with the wait or pause, which then ends
   * with the requests in rbuf, no recv of our own (the watch is off
   * meanwhile).  So a wake-up costs one system call, io_uring_enter. */
  struct vdb_uring_op rx_op;
  size_t rx_want;
  bool rx_pending;              /* the RECV is in the ring (holds a reference) */
  bool rx_cancelled;
  uint64_t ring_sends, ring_recvs;   /* how many went through the ring (-D nbd, at close) */
  uint64_t payload_bytes, payload_recvs;   /* large payloads received in place (ditto) */

  bool rx_peek;                 /* the last WRITE was large: read the next header short (rx_cap) */
  bool tcp;                     /* a TCP connection: SO_RCVLOWAT for payloads */
  int lowat;                    /* SO_RCVLOWAT now (conn_lowat) */
  bool rx_await;                /* a large payload began: receive it once its mark is set */

  struct nbd_req *free_reqs;
  unsigned nreqs;               /* allocated and not on the free list */
  unsigned inflight;            /* submitted to the bus */
  bool in_handler;              /* inside the read handler: flush at its end */
  bool kicked;                  /* unplug/shutdown: drain and close */
  bool write_failed;            /* peer gone: drop replies */
  bool throttled;               /* stopped reading for backpressure */
  uint64_t inbytes;             /* READ/WRITE bytes being processed */
  uint64_t cached;              /* bytes of buffers kept on the free list */

  /* Coalescing (conn_coalesce). */
  unsigned rx_reqs;             /* requests parsed in this wake-up */
  bool rx_drained;              /* this wake-up emptied the socket */
  uint8_t nap_mode;             /* NBD_MODE_*: what follows each wake-up now */
  uint8_t nap_slot;             /* trial slot 1..modes × NBD_NAP_ROUNDS, 0 = a run */
  uint8_t nap_kept;             /* the mode the last trial decided */
  uint8_t nap_backoff;          /* trials in a row that decided alike (0-6) */
  unsigned nap_reqs;            /* requests so far in this slot or run */
  uint64_t nap_t0;              /* when it began (ns) */
  uint64_t nap_cpu0;            /* this thread's CPU time then (ns) */
  uint64_t nap_len_ns;          /* how long it lasts */
  struct nbd_nap_side {         /* the trial's slots of each mode */
    uint64_t reqs, ns, cpu_ns;
  } nap_side[NBD_NMODES];

  /* Splicing or copying large mapped reads (nbd_splice_choose). */
  bool sp_copy;                 /* send them by copy now */
  bool sp_kept_copy;            /* what the last splice trial decided */
  bool sp_spoilt;               /* a nap slot ended during this splice slot */
  uint8_t sp_slot;              /* trial slot 1..2 × NBD_SPLICE_ROUNDS, 0 = a run */
  uint8_t sp_backoff;           /* splice trials in a row that decided alike (0-6) */
  uint64_t sp_bytes;            /* large read bytes so far in this slot */
  uint64_t sp_t0, sp_last;      /* when the slot or run began; the last large read */
  uint64_t sp_len_ns;           /* how long it lasts */
  struct nbd_sp_side {          /* the splice trial's slots, [0] spliced, [1] copied */
    uint64_t bytes, ns;
  } sp_side[2];

  struct nbd_conn *next, *prev; /* global list, under nbd_lock */

  /* A connection made by vdb_nbd_serve_socket (a local kernel client): not
   * on the global list, not counted against max_connections, not kicked by
   * vdb_nbd_shutdown; on_closed(closed_arg) runs when it is destroyed. */
  bool local;
  void (*on_closed)(void *arg);
  void *closed_arg;
};

#define NBD_SPLICE_MIN    (64u << 10)     /* mapped READ payloads this large are spliced */
#define NBD_COALESCE_US   40              /* default pause for a busy client (conn_coalesce) */
#define NBD_POLL_US       50              /* default polling for a quick client (conn_coalesce) */
#define NBD_SHORT_PAUSE_DIV 4             /* a short pause is coalesce_us / this (at least 1 us) */
#define NBD_NAP_SLOT_NS   10000000ull     /* a trial slot, in one mode */
#define NBD_NAP_ROUNDS    4               /* slots per mode in a trial, the modes taking turns */
#define NBD_NAP_RUN_NS    1000000000ull   /* between trials (×2 per trial deciding alike, to 64×) */
#define NBD_NAP_MIN_REQS  400             /* fewer without pauses: they cannot matter */
#define NBD_POLL_MIN_REQS 40              /* fewer in plain slots: too few to judge polling */
#define NBD_POLL_GAIN     110             /* polling must raise the rate to this % */
#define NBD_PAUSE_FASTER  105             /* of two pauses that pay, one this % faster wins */
#define NBD_SPLICE_SLOT_NS 25000000ull    /* a splice trial slot */
#define NBD_SPLICE_ROUNDS  4              /* slots each of splicing and copying in a trial */
#define NBD_SPLICE_MIN_BYTES (8u << 20)   /* fewer large read bytes on a side: keep splicing */
#define NBD_COPY_GAIN      125            /* copying must raise the read rate to this % */
#define NBD_LOWAT_MAX      (1u << 20)     /* most SO_RCVLOWAT asked for a payload's rest */
#define NBD_PEEK_SIZE      4096           /* rbuf read after a large WRITE (rx_cap) */
#define NBD_DRAIN_MS      5000            /* a closing connection's time to take its replies */
#define NBD_SNDBUF        (4u << 20)      /* Unix socket send buffer asked for */
#define NBD_PIPE_SIZE     (1u << 20)      /* pipe capacity asked for */
#define NBD_MAX_INBYTES   (64u << 20)     /* data in flight before we stop reading */
#define NBD_MAX_CACHED    (64u << 20)     /* buffer bytes kept for reuse */

/* server.c */
void nbd_conn_ref(struct nbd_conn *c);
void nbd_conn_unref(struct nbd_conn *c);
void nbd_conn_close(struct nbd_conn *c);   /* stop reading, drain, then destroy */
void nbd_conn_kill(struct nbd_conn *c);    /* drop replies too */
bool nbd_splice_choose(struct nbd_conn *c, size_t len);   /* splice (or copy) this read? */
void nbd_conn_flush(struct nbd_conn *c);   /* send queued output, update events */
void nbd_conn_enter_transmission(struct nbd_conn *c);
/* Run fn(arg) on c's loop (retrying while the post queue is out of memory). */
void nbd_conn_post(struct nbd_conn *c, void (*fn)(void *arg), void *arg);
/* Drop up to c->discard bytes of buffered input; true when none is left. */
bool nbd_conn_skip_input(struct nbd_conn *c);

/* transmission.c */
/* Receive what the socket has of the pending WRITE's payload (want bytes
 * at most) straight into the disk (write_direct: a RAM disk takes it in
 * place), or into the request's buffer if the disk will not take it that
 * way, and in the same recvmsg up to tail_len bytes after it into tail
 * (the next request's header).  Returns recvmsg's result (bytes of both,
 * 0 at end of input, -1 with errno). */
ssize_t nbd_tx_recv_payload(struct nbd_conn *c, size_t want, void *tail, size_t tail_len);
/* The size of a request header on c (28, or 32 with extended headers). */
size_t nbd_tx_hlen(const struct nbd_conn *c);
/* Parse complete requests in c->rbuf (and continue a pending payload).
 * Called on c's loop. */
void nbd_tx_process(struct nbd_conn *c);
void nbd_tx_req_free(struct nbd_req *r);
/* After an unplug kick: close once nothing is in flight. */
void nbd_tx_maybe_finish(struct nbd_conn *c);
/* Turn the queued, not yet started reply r into an error reply for err. */
void nbd_tx_rebuild_error(struct nbd_conn *c, struct nbd_req *r, int err);
/* Put a request back on the connection's free list. */
void nbd_tx_release(struct nbd_conn *c, struct nbd_req *r);

#endif
