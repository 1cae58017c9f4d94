/* bench/fileread.c — how fast 1 MiB reads can go from a cached file into a
 * socket on this machine with no protocol at all: the ceiling under the
 * "file disk, 1M read" rows of bench/run, as bench/filewrite.c is under its
 * 1M write rows.  A sender (the server's side) streams FILE front to back
 * (wrapping at its size) into a socket in 1 MiB messages for SECONDS; a
 * receiver thread (the client's side) recv()s them into 8 MiB of buffers,
 * 1 MiB at a time, as fio's nbd engine at QD8 does.  The socket is a Unix
 * socketpair or a TCP connection over loopback (the two transports of the
 * rows).  The sender's ways:
 *
 *   copy       one thread: pread() into a 1 MiB buffer, send() it (two
 *              copies one after the other: nbdkit file per request, and
 *              vdbus's file disk for reads it copies)
 *   pipelined  a reader thread pread()s into 8 buffers, the sender send()s
 *              them (the two copies on two threads)
 *   sendfile   one thread: sendfile() from the file (the socket references
 *              the page cache's pages, so one copy: the receiver's)
 *   mmap       one thread: send() straight from a shared mapping of the
 *              file (one copy, from the mapping's pages)
 *
 * Prints MiB/s and the CPU time per MiB of the server's side (the sender,
 * and pipelined the reader thread too) and of the receiver.  bench/stream runs it on a cached
 * 4 GiB image written in 32 KiB pieces, as bench/run's image is (through
 * vdbus's file backend); by hand:
 *
 *   cc -std=gnu17 -O2 -Wall -Wextra -pthread -o /tmp/fileread bench/fileread.c
 *   dd if=/dev/zero of=/var/tmp/fr.img bs=32k count=131072 && cat /var/tmp/fr.img >/dev/null
 *   for m in copy pipelined sendfile mmap; do
 *     /tmp/fileread $m unix /var/tmp/fr.img 5; /tmp/fileread $m tcp /var/tmp/fr.img 5; done
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "instrument.h"

#define MiB (1u << 20)
#define NBUF 8

static int sv[2];       /* [0] sender, [1] receiver */
static int fd;          /* the file */
static uint64_t fsize;  /* its size, a multiple of 1 MiB */
static atomic_bool stop;
static double receiver_cpu, reader_cpu;

/* pipelined: a ring of NBUF buffers between the reader and the sender */
static char *bufs[NBUF];
static uint64_t head, tail;   /* under mu */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

/* The client: 1 MiB at a time into 8 MiB of buffers, until the sender
 * shuts the socket down. */
static void *receiver(void *arg)
{
  char *b = malloc(NBUF * (size_t)MiB);
  double c0 = thread_cpu();
  unsigned i = 0;

  if (!b)
    die("malloc");
  memset(b, 0, NBUF * (size_t)MiB);
  for (;;) {
    char *dst = b + (size_t)(i++ % NBUF) * MiB;
    for (size_t got = 0; got < MiB;) {
      ssize_t n = recv(sv[1], dst + got, MiB - got, 0);
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        goto out;
      got += (size_t)n;
    }
  }
out:
  receiver_cpu = thread_cpu() - c0;
  free(b);
  return arg;
}

static void send_all(const char *b)
{
  for (size_t o = 0; o < MiB;) {
    ssize_t n = send(sv[0], b + o, MiB - o, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      die("send");
    o += (size_t)n;
  }
}

static void read_all(char *b, uint64_t off)
{
  for (size_t o = 0; o < MiB;) {
    ssize_t n = pread(fd, b + o, MiB - o, (off_t)(off + o));
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      die("pread");
    o += (size_t)n;
  }
}

static void sendfile_all(uint64_t off)
{
  off_t o = (off_t)off;

  for (size_t left = MiB; left > 0;) {
    ssize_t n = sendfile(sv[0], fd, &o, left);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      die("sendfile");
    left -= (size_t)n;
  }
}

static void *reader(void *arg)
{
  double c0 = thread_cpu();
  uint64_t off = 0;

  for (;;) {
    unsigned i;

    pthread_mutex_lock(&mu);
    while (head - tail == NBUF && !atomic_load(&stop))
      pthread_cond_wait(&cv, &mu);
    if (atomic_load(&stop)) {
      pthread_mutex_unlock(&mu);
      break;
    }
    i = head % NBUF;
    pthread_mutex_unlock(&mu);
    read_all(bufs[i], off);
    off = (off + MiB) % fsize;
    pthread_mutex_lock(&mu);
    head++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
  }
  reader_cpu = thread_cpu() - c0;
  return arg;
}

static void one_pipelined(void)
{
  unsigned i;

  pthread_mutex_lock(&mu);
  while (head == tail)
    pthread_cond_wait(&cv, &mu);
  i = tail % NBUF;
  pthread_mutex_unlock(&mu);
  send_all(bufs[i]);
  pthread_mutex_lock(&mu);
  tail++;
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
}

/* A TCP connection over loopback: sv[0] the accepted end (the server's). */
static void tcp_pair(void)
{
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  socklen_t al = sizeof a;
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;

  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0 ||
      getsockname(l, (struct sockaddr *)&a, &al) < 0)
    die("a loopback TCP listener");
  if ((sv[1] = socket(AF_INET, SOCK_STREAM, 0)) < 0 ||
      connect(sv[1], (struct sockaddr *)&a, sizeof a) < 0 || (sv[0] = accept(l, NULL, NULL)) < 0)
    die("a loopback TCP connection");
  setsockopt(sv[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(sv[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  close(l);
}

int main(int argc, char **argv)
{
  enum { COPY, PIPELINED, SENDFILE, MMAP } mode;
  pthread_t rt, wt;
  struct stat sb;
  char *buf = NULL, *map = NULL;
  uint64_t off = 0, mib = 0;
  double secs, t0, c0, el, cpu;

  if (argc != 5 || (secs = atof(argv[4])) <= 0 ||
      (strcmp(argv[2], "unix") != 0 && strcmp(argv[2], "tcp") != 0)) {
    fprintf(stderr, "usage: %s copy|pipelined|sendfile|mmap unix|tcp FILE SECONDS\n", argv[0]);
    return 2;
  }
  if (strcmp(argv[1], "copy") == 0)
    mode = COPY;
  else if (strcmp(argv[1], "pipelined") == 0)
    mode = PIPELINED;
  else if (strcmp(argv[1], "sendfile") == 0)
    mode = SENDFILE;
  else if (strcmp(argv[1], "mmap") == 0)
    mode = MMAP;
  else {
    fprintf(stderr, "%s: unknown mode '%s' (copy, pipelined, sendfile or mmap)\n", argv[0],
            argv[1]);
    return 2;
  }
  if ((fd = open(argv[3], O_RDONLY)) < 0 || fstat(fd, &sb) < 0)
    die(argv[3]);
  fsize = (uint64_t)sb.st_size / MiB * MiB;
  if (fsize == 0) {
    fprintf(stderr, "%s: %s is smaller than 1 MiB\n", argv[0], argv[3]);
    return 2;
  }
  if (strcmp(argv[2], "tcp") == 0)
    tcp_pair();
  else if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
    die("socketpair");
  if (mode == COPY && !(buf = malloc(MiB)))
    die("malloc");
  if (mode == MMAP && (map = mmap(NULL, fsize, PROT_READ, MAP_SHARED, fd, 0)) == MAP_FAILED)
    die("mmap");
  if (mode == PIPELINED) {
    for (int i = 0; i < NBUF; i++)
      if (!(bufs[i] = calloc(1, MiB)))
        die("calloc");
    if (pthread_create(&wt, NULL, reader, NULL) != 0)
      die("pthread_create");
  }
  if (pthread_create(&rt, NULL, receiver, NULL) != 0)
    die("pthread_create");
  t0 = now();
  c0 = thread_cpu();
  while (now() - t0 < secs) {
    if (mode == COPY) {
      read_all(buf, off);
      send_all(buf);
    } else if (mode == PIPELINED) {
      one_pipelined();
    } else if (mode == SENDFILE) {
      sendfile_all(off);
    } else {
      send_all(map + off);
    }
    off = (off + MiB) % fsize;
    mib++;
  }
  el = now() - t0;
  cpu = thread_cpu() - c0;
  atomic_store(&stop, true);
  if (mode == PIPELINED) {
    pthread_mutex_lock(&mu);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    pthread_join(wt, NULL);
  }
  shutdown(sv[0], SHUT_RDWR);
  pthread_join(rt, NULL);
  if (mode == PIPELINED)
    printf("%s %s: %.0f MiB/s, server %.1f (sender %.1f + reader %.1f), receiver %.1f us CPU per MiB\n",
           argv[1], argv[2], (double)mib / el, (cpu + reader_cpu) / (double)mib * 1e6,
           cpu / (double)mib * 1e6, reader_cpu / (double)mib * 1e6,
           receiver_cpu / (double)mib * 1e6);
  else
    printf("%s %s: %.0f MiB/s, server %.1f, receiver %.1f us CPU per MiB\n", argv[1], argv[2],
           (double)mib / el, cpu / (double)mib * 1e6, receiver_cpu / (double)mib * 1e6);
  return 0;
}
