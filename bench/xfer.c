/* bench/xfer.c — one stream of 1 MiB messages over a Unix socket or TCP
 * loopback with no protocol at all, in C: the transport under bench/run's
 * 1M rows.  A sender thread moves 1 MiB at a time from its region into the
 * socket, front to back and wrapping; a receiver thread recv()s into its
 * region the same way.  bench/run runs it next to every 1M row:
 *
 *   1M read   sender = the server, from a 1 GiB region (the disk's pages),
 *             receiver = the client, into 8 MiB (fio's QD8 buffers)
 *   1M write  sender = the client, from 8 MiB; receiver = the server, into
 *             1 GiB (the disk's pages)
 *
 * Usage:  xfer [--mode send|zerocopy|splice] [--sndbuf BYTES] [--rcvlowat]
 *                unix|tcp SRC DST SECONDS
 *
 * SRC and DST are a size in MiB (anonymous memory, pre-faulted) or @FILE
 * (the whole file mapped shared and pre-faulted, e.g. one in /dev/shm, so
 * that a 1 GiB region costs no page faults per run).  --mode is how the
 * sender moves data: send() (a copy), send(MSG_ZEROCOPY) (pages pinned; on
 * loopback the kernel copies on delivery), or vmsplice() into a pipe and
 * splice() into the socket (pages referenced).  --sndbuf sets SO_SNDBUF on
 * the sender's socket; absent, the kernel's default (autotuned on TCP).
 * --rcvlowat sets SO_RCVLOWAT to 1 MiB on the receiver's socket, so that
 * its blocking recv() of a message's rest returns once that rest is there,
 * not at every segment (what vdbusd asks of a TCP socket while a large
 * WRITE's payload comes in).
 *
 * After 0.5 s to settle, measures SECONDS and prints one line:
 *
 *   MiB/s  sender-CPU-µs-per-MiB  receiver-CPU-µs-per-MiB  recv()-calls-per-MiB
 *
 * CPU is each thread's own (its CPU-time clock); on TCP loopback the
 * sender's includes the receive path, which the kernel runs in the sending
 * context.  Build: cc -std=gnu17 -O2 -Wall -Wextra -pthread -o xfer bench/xfer.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "instrument.h"

#define MiB ((size_t)1 << 20)

enum mode { MODE_SEND, MODE_ZEROCOPY, MODE_SPLICE };

static int sfd, rfd;             /* sender's and receiver's socket */
static char *src, *dst;
static size_t src_len, dst_len;  /* multiples of 1 MiB */
static enum mode mode = MODE_SEND;
static atomic_bool stop;
static _Atomic uint64_t rx_bytes, rx_calls;

static void usage(void)
{
  fprintf(stderr, "usage: xfer [--mode send|zerocopy|splice] [--sndbuf BYTES] [--rcvlowat] "
                  "unix|tcp SRC DST SECONDS\n"
                  "  SRC, DST: MiB of anonymous memory, or @FILE to map\n");
  exit(2);
}

static double clock_s(clockid_t c)
{
  struct timespec ts;
  clock_gettime(c, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A region: N MiB of anonymous memory, or @FILE mapped shared; pre-faulted
 * and written once, with 4 KiB pages as the RAM disk's mapping. */
static char *region(const char *spec, size_t *len)
{
  char *p;
  if (spec[0] == '@') {
    int fd = open(spec + 1, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
      die(spec + 1);
    *len = (size_t)st.st_size / MiB * MiB;
    if (*len == 0) {
      fprintf(stderr, "xfer: %s: smaller than 1 MiB\n", spec + 1);
      exit(2);
    }
    p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
  } else {
    char *end;
    unsigned long long n = strtoull(spec, &end, 10);
    if (*end || n == 0 || n > (1ull << 20))
      usage();
    *len = n * MiB;
    p = mmap(NULL, *len, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  }
  if (p == MAP_FAILED)
    die("mmap");
  madvise(p, *len, MADV_NOHUGEPAGE);
  memset(p, 0x5a, *len);
  return p;
}

/* MSG_ZEROCOPY: the region never changes, so completions are only drained
 * (an undrained error queue ends in ENOBUFS). */
static void drain_completions(void)
{
  char cbuf[256];
  struct msghdr m = { .msg_control = cbuf, .msg_controllen = sizeof cbuf };
  while (recvmsg(sfd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) >= 0)
    m.msg_controllen = sizeof cbuf;
}

/* Moves LEN bytes at P into the socket; false once the receiver is gone. */
static bool send_all(const char *p, size_t len, int pipefd[2])
{
  while (len > 0) {
    ssize_t r;
    if (mode == MODE_SPLICE) {
      struct iovec v = { (void *)p, len };
      r = vmsplice(pipefd[1], &v, 1, 0);
      for (ssize_t left = r; left > 0;) {
        ssize_t s = splice(pipefd[0], NULL, sfd, NULL, left, SPLICE_F_MOVE);
        if (s < 0 && errno == EINTR)
          continue;
        if (s <= 0)
          return false;
        left -= s;
      }
    } else {
      r = send(sfd, p, len, MSG_NOSIGNAL | (mode == MODE_ZEROCOPY ? MSG_ZEROCOPY : 0));
    }
    if (r < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EPIPE || errno == ECONNRESET)
        return false;
      die(mode == MODE_SPLICE ? "vmsplice" : "send");
    }
    p += r;
    len -= r;
  }
  return true;
}

static void *sender(void *arg)
{
  (void)arg;
  int pipefd[2] = { -1, -1 };
  if (mode == MODE_SPLICE &&
      (pipe(pipefd) < 0 || fcntl(pipefd[1], F_SETPIPE_SZ, (int)MiB) < 0))
    die("pipe");
  size_t off = 0;
  for (uint64_t n = 1; !atomic_load_explicit(&stop, memory_order_relaxed); n++) {
    if (mode == MODE_ZEROCOPY && n % 16 == 0)
      drain_completions();
    if (!send_all(src + off, MiB, pipefd))
      break;
    off = (off + MiB) % src_len;
  }
  shutdown(sfd, SHUT_WR);
  return NULL;
}

static void *receiver(void *arg)
{
  (void)arg;
  size_t off = 0, got = 0;
  for (;;) {
    ssize_t r = recv(rfd, dst + off + got, MiB - got, 0);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      die("recv");
    }
    if (r == 0)
      return NULL;
    atomic_fetch_add_explicit(&rx_calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&rx_bytes, r, memory_order_relaxed);
    got += r;
    if (got == MiB) {
      got = 0;
      off = (off + MiB) % dst_len;
    }
  }
}

static void connect_pair(bool tcp)
{
  if (!tcp) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
      die("socketpair");
    sfd = sv[0];
    rfd = sv[1];
    return;
  }
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  socklen_t al = sizeof a;
  int one = 1;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0 ||
      getsockname(l, (struct sockaddr *)&a, &al) < 0)
    die("listen");
  sfd = socket(AF_INET, SOCK_STREAM, 0);
  if (sfd < 0 || connect(sfd, (struct sockaddr *)&a, sizeof a) < 0)
    die("connect");
  rfd = accept(l, NULL, NULL);
  if (rfd < 0)
    die("accept");
  close(l);
  setsockopt(sfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(rfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int main(int argc, char **argv)
{
  static const struct option opts[] = {
    { "mode", required_argument, NULL, 'm' },
    { "sndbuf", required_argument, NULL, 's' },
    { "rcvlowat", no_argument, NULL, 'l' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  int sndbuf = 0, rcvlowat = 0, c;
  while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'm':
      if (strcmp(optarg, "send") == 0)
        mode = MODE_SEND;
      else if (strcmp(optarg, "zerocopy") == 0)
        mode = MODE_ZEROCOPY;
      else if (strcmp(optarg, "splice") == 0)
        mode = MODE_SPLICE;
      else
        usage();
      break;
    case 'l':
      rcvlowat = (int)MiB;
      break;
    case 's':
      sndbuf = atoi(optarg);
      if (sndbuf <= 0)
        usage();
      break;
    default:
      usage();
    }
  }
  if (argc - optind != 4)
    usage();
  bool tcp = strcmp(argv[optind], "tcp") == 0;
  if (!tcp && strcmp(argv[optind], "unix") != 0)
    usage();
  double secs = strtod(argv[optind + 3], NULL);
  if (!(secs > 0 && secs < 3600))
    usage();
  src = region(argv[optind + 1], &src_len);
  dst = region(argv[optind + 2], &dst_len);

  connect_pair(tcp);
  int one = 1;
  if (sndbuf > 0 && setsockopt(sfd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf) < 0)
    die("SO_SNDBUF");
  if (rcvlowat > 0 && setsockopt(rfd, SOL_SOCKET, SO_RCVLOWAT, &rcvlowat, sizeof rcvlowat) < 0)
    die("SO_RCVLOWAT");
  if (mode == MODE_ZEROCOPY && setsockopt(sfd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0)
    die("SO_ZEROCOPY");

  pthread_t t, r;
  clockid_t tc, rc;
  if (pthread_create(&r, NULL, receiver, NULL) || pthread_create(&t, NULL, sender, NULL) ||
      pthread_getcpuclockid(t, &tc) || pthread_getcpuclockid(r, &rc)) {
    fprintf(stderr, "xfer: cannot start threads\n");
    return 1;
  }
  /* bytes, calls and both threads' CPU read at the same two moments */
  struct timespec settle = { 0, 500000000 };
  nanosleep(&settle, NULL);
  uint64_t b0 = atomic_load(&rx_bytes), n0 = atomic_load(&rx_calls);
  double w0 = clock_s(CLOCK_MONOTONIC), tx0 = clock_s(tc), rx0 = clock_s(rc);
  struct timespec ts = { (time_t)secs, (long)((secs - (time_t)secs) * 1e9) };
  nanosleep(&ts, NULL);
  uint64_t b1 = atomic_load(&rx_bytes), n1 = atomic_load(&rx_calls);
  double w1 = clock_s(CLOCK_MONOTONIC), tx1 = clock_s(tc), rx1 = clock_s(rc);
  atomic_store(&stop, true);
  pthread_join(t, NULL);
  pthread_join(r, NULL);
  double mib = (b1 - b0) / (double)MiB;
  if (mib <= 0) {
    fprintf(stderr, "xfer: nothing moved in %.1f s\n", secs);
    return 1;
  }
  printf("%.0f %.1f %.1f %.2f\n", mib / (w1 - w0), (tx1 - tx0) * 1e6 / mib,
         (rx1 - rx0) * 1e6 / mib, (n1 - n0) / mib);
  return 0;
}
