/* bench/filewrite.c — how fast 1 MiB writes can go from a socket into a file
 * on this machine's filesystem with no protocol at all: the ceiling under the
 * "file disk, 1M write" rows of bench/run.  A sender thread streams 1 MiB
 * messages into a Unix socketpair; the receiver puts them into FILE front to
 * back (wrapping at its size), through the page cache, for SECONDS:
 *
 *   copy       one thread: recv() into a 1 MiB buffer, pwrite() it (two
 *              copies, one after the other: what nbdkit file does per request)
 *   splice     one thread: splice() the socket into a 1 MiB pipe, splice()
 *              the pipe into the file (the socket's pages are referenced, so
 *              one copy: the page cache's)
 *   pipelined  a receiver thread recv()s into 8 buffers, a writer thread
 *              pwrite()s them (two copies on two threads, as vdbus's loop
 *              thread and its file disk's writer thread do)
 *   splice-pipelined  the same with 8 pipes: the receiver splice()s the
 *              socket into them, the writer splice()s them into the file (one
 *              copy, on the writer: the design for receiving file writes into
 *              the page cache)
 *   MODE-32k   any of these with the file written in 32 KiB pieces (the
 *              writer putting each 1 MiB in 32 pieces), as vdbus's file backend
 *              does (FILE_WRITE_CHUNK) to keep the page cache's folios small
 *              for random writes; run on an image written in 32 KiB pieces
 *              (a new file), so that its folios are that size
 *
 * Prints MiB/s and the CPU time per MiB of the receiving side (and of the
 * writer thread, pipelined).  Not run by bench/all (it needs an image on the
 * filesystem under test); by hand, as root or not:
 *
 *   cc -std=gnu17 -O2 -Wall -Wextra -pthread -o /tmp/filewrite bench/filewrite.c
 *   truncate -s 4G /var/tmp/fw.img && dd if=/dev/zero of=/var/tmp/fw.img bs=1M \
 *     count=4096 conv=notrunc && sync
 *   for m in copy splice pipelined splice-pipelined; do
 *     /tmp/filewrite $m /var/tmp/fw.img 5; done
 *   rm /var/tmp/fw.img && dd if=/dev/zero of=/var/tmp/fw.img bs=32k \
 *     count=131072 && sync
 *   for m in pipelined-32k splice-pipelined-32k; do
 *     /tmp/filewrite $m /var/tmp/fw.img 5; done
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* pipelined: a ring of NBUF buffers between the receiver and the writer */
static char *bufs[NBUF];
static int pipes[NBUF][2];    /* splice-pipelined: instead of bufs */
static bool use_pipes;
static size_t piece = MiB;    /* what the writer puts into the file per call */
static uint64_t head, tail;   /* under mu */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static double writer_cpu;

static void *sender(void *arg)
{
  char *b = malloc(MiB);

  if (!b)
    die("malloc");
  memset(b, 0x5a, MiB);
  while (!atomic_load(&stop)) {
    for (size_t o = 0; o < MiB;) {
      ssize_t n = send(sv[0], b + o, MiB - o, MSG_NOSIGNAL);
      if (n <= 0) {
        free(b);
        return arg;   /* the receiver shut the socket down */
      }
      o += (size_t)n;
    }
  }
  free(b);
  return arg;
}

static void recv_all(char *b)
{
  for (size_t got = 0; got < MiB;) {
    ssize_t n = recv(sv[1], b + got, MiB - got, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      die("recv");
    got += (size_t)n;
  }
}

static void write_all(const char *b, uint64_t off)
{
  for (size_t o = 0; o < MiB; o += piece)
    if (pwrite(fd, b + o, piece, (off_t)(off + o)) != (ssize_t)piece)
      die("pwrite");
}

static void one_copy(char *buf, uint64_t off)
{
  recv_all(buf);
  write_all(buf, off);
}

static void splice_in(int p[2])
{
  for (size_t got = 0; got < MiB;) {
    ssize_t n = splice(sv[1], NULL, p[1], NULL, MiB - got, SPLICE_F_MOVE);
    if (n <= 0)
      die("splice from the socket");
    got += (size_t)n;
  }
}

static void splice_out(int p[2], uint64_t off)
{
  loff_t o = (loff_t)off;

  for (size_t left = MiB; left > 0;) {
    ssize_t n = splice(p[0], NULL, fd, &o, left < piece ? left : piece, SPLICE_F_MOVE);
    if (n <= 0)
      die("splice into the file");
    left -= (size_t)n;
  }
}

static void one_splice(int p[2], uint64_t off)
{
  splice_in(p);
  splice_out(p, off);
}

static void *writer(void *arg)
{
  double c0 = thread_cpu();
  uint64_t off = 0;

  for (;;) {
    unsigned i;

    pthread_mutex_lock(&mu);
    while (tail == head && !atomic_load(&stop))
      pthread_cond_wait(&cv, &mu);
    if (tail == head) {
      pthread_mutex_unlock(&mu);
      break;
    }
    i = tail % NBUF;
    pthread_mutex_unlock(&mu);
    if (use_pipes)
      splice_out(pipes[i], off);
    else
      write_all(bufs[i], off);
    off = (off + MiB) % fsize;
    pthread_mutex_lock(&mu);
    tail++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
  }
  writer_cpu = thread_cpu() - c0;
  return arg;
}

static void one_pipelined(void)
{
  unsigned i;

  pthread_mutex_lock(&mu);
  while (head - tail == NBUF)
    pthread_cond_wait(&cv, &mu);
  i = head % NBUF;
  pthread_mutex_unlock(&mu);
  if (use_pipes)
    splice_in(pipes[i]);
  else
    recv_all(bufs[i]);
  pthread_mutex_lock(&mu);
  head++;
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
}

int main(int argc, char **argv)
{
  enum { COPY, SPLICE, PIPELINED } mode;
  pthread_t st, wt;
  struct stat sb;
  char *buf = NULL;
  int p[2] = { -1, -1 };
  uint64_t off = 0, mib = 0;
  double secs, t0, c0, el, cpu;
  const char *sfx = "";
  size_t n;

  if (argc != 4 || (secs = atof(argv[3])) <= 0) {
    fprintf(stderr, "usage: %s copy|splice|pipelined|splice-pipelined[-32k] FILE SECONDS\n",
            argv[0]);
    return 2;
  }
  if ((n = strlen(argv[1])) > 4 && strcmp(argv[1] + n - 4, "-32k") == 0) {
    piece = 32u << 10;
    sfx = "-32k";
    argv[1][n - 4] = '\0';
  }
  if (strcmp(argv[1], "copy") == 0)
    mode = COPY;
  else if (strcmp(argv[1], "splice") == 0)
    mode = SPLICE;
  else if (strcmp(argv[1], "pipelined") == 0)
    mode = PIPELINED;
  else if (strcmp(argv[1], "splice-pipelined") == 0)
    mode = PIPELINED, use_pipes = true;
  else {
    fprintf(stderr, "%s: unknown mode '%s%s' (copy, splice, pipelined or splice-pipelined, "
            "each optionally with -32k)\n", argv[0], argv[1], sfx);
    return 2;
  }
  if ((fd = open(argv[2], O_WRONLY)) < 0 || fstat(fd, &sb) < 0)
    die(argv[2]);
  fsize = (uint64_t)sb.st_size / MiB * MiB;
  if (fsize == 0) {
    fprintf(stderr, "%s: %s is smaller than 1 MiB\n", argv[0], argv[2]);
    return 2;
  }
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
    die("socketpair");
  if (mode == COPY && !(buf = malloc(MiB)))
    die("malloc");
  if (mode == SPLICE && (pipe(p) < 0 || fcntl(p[0], F_SETPIPE_SZ, MiB) < 0))
    die("a 1 MiB pipe");
  if (mode == PIPELINED) {
    for (int i = 0; i < NBUF; i++) {
      if (use_pipes && (pipe(pipes[i]) < 0 || fcntl(pipes[i][0], F_SETPIPE_SZ, MiB) < 0))
        die("a 1 MiB pipe");
      if (!use_pipes && !(bufs[i] = calloc(1, MiB)))
        die("calloc");
    }
    if (pthread_create(&wt, NULL, writer, NULL) != 0)
      die("pthread_create");
  }
  if (pthread_create(&st, NULL, sender, NULL) != 0)
    die("pthread_create");
  t0 = now();
  c0 = thread_cpu();
  while (now() - t0 < secs) {
    if (mode == COPY)
      one_copy(buf, off);
    else if (mode == SPLICE)
      one_splice(p, off);
    else
      one_pipelined();
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
  shutdown(sv[1], SHUT_RDWR);
  pthread_join(st, NULL);
  if (mode == PIPELINED)
    printf("%s%s: %.0f MiB/s, receiver %.1f + writer %.1f us CPU per MiB\n", argv[1], sfx,
           (double)mib / el, cpu / (double)mib * 1e6, writer_cpu / (double)mib * 1e6);
  else
    printf("%s%s: %.0f MiB/s, receiver %.1f us CPU per MiB\n", argv[1], sfx, (double)mib / el,
           cpu / (double)mib * 1e6);
  return 0;
}
