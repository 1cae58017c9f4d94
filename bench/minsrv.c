/* bench/minsrv.c — the least an NBD server can do per request, as a
 * measuring instrument for bench/run: the floor under vdbus's RAM-disk rows.
 * NOT a server to use: it checks nothing, keeps nothing safe, and its disk
 * is a region of memory that offsets wrap around.
 *
 *   minsrv unix:PATH|tcp:PORT SIZE_MIB @REGION_FILE | REGION_MIB
 *
 * Exports SIZE_MIB MiB (offsets taken modulo the region's size: what is
 * measured is the cost of moving the data, not of keeping it).  Per
 * connection one thread, blocking I/O, no event loop: recv() as much as the
 * socket has into a 256 KiB buffer, carry out every whole request in it
 * (WRITE: the payload copied into the region, 4 KiB and more with streaming
 * stores as vdbus's RAM disk; a payload of 64 KiB or more that has not
 * arrived yet is received straight into the region; READ: the reply's
 * header and the region's memory queued), then one sendmsg() of all the
 * replies.  Fixed newstyle handshake: NBD_OPT_GO/INFO/EXPORT_NAME answered
 * with the size, NBD_OPT_STRUCTURED_REPLY accepted (as vdbus accepts it, so
 * that READ replies carry the same chunk header), every other option
 * NBD_REP_ERR_UNSUP.  READ, WRITE, FLUSH and DISC; anything else ends the
 * connection.
 * Prints each connection's CPU time per request on stderr when it closes.
 *
 *   cc -std=gnu17 -O2 -Wall -Wextra -pthread -I src/frontends/nbd \
 *      -o minsrv bench/minsrv.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "instrument.h"
#include "nbd-proto.h"

#define MiB ((size_t)1 << 20)
#define BUF (256 * 1024)
#define DIRECT_MIN (64 * 1024)
#define MAX_IOV 512   /* replies per sendmsg (two iovecs each) */

static char *region;
static size_t region_len;   /* a power of two */
static uint64_t export_size;
static __thread bool structured;   /* this connection's NBD_OPT_STRUCTURED_REPLY */

/* All LEN bytes in (recv) or out (send); false on EOF or error. */
static bool full_io(int fd, void *p, size_t len, bool out)
{
  for (size_t done = 0; done < len;) {
    ssize_t r = out ? send(fd, (char *)p + done, len - done, MSG_NOSIGNAL)
                    : recv(fd, (char *)p + done, len - done, MSG_WAITALL);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    done += r;
  }
  return true;
}

#define full_recv(fd, p, len) full_io(fd, p, len, false)
#define full_send(fd, p, len) full_io(fd, (void *)(p), len, true)

static bool opt_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
  struct __attribute__((packed)) {
    uint64_t magic;
    uint32_t opt, type, len;
  } h = { htobe64(NBD_REP_MAGIC), htobe32(opt), htobe32(type), htobe32(len) };
  return full_send(fd, &h, sizeof h) && full_send(fd, data, len);
}

/* Fixed newstyle negotiation; true when transmission starts. */
static bool handshake(int fd)
{
  struct __attribute__((packed)) {
    uint64_t magic, opt_magic;
    uint16_t flags;
  } g = { htobe64(NBD_MAGIC), htobe64(NBD_IHAVEOPT),
          htobe16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES) };
  uint32_t cflags;
  if (!full_send(fd, &g, sizeof g) || !full_recv(fd, &cflags, sizeof cflags))
    return false;
  bool no_zeroes = be32toh(cflags) & NBD_FLAG_C_NO_ZEROES;
  uint16_t tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;
  for (;;) {
    struct __attribute__((packed)) {
      uint64_t magic;
      uint32_t opt, len;
    } o;
    if (!full_recv(fd, &o, sizeof o) || be64toh(o.magic) != NBD_IHAVEOPT)
      return false;
    uint32_t opt = be32toh(o.opt), len = be32toh(o.len);
    if (len > 65536)
      return false;
    char data[65536];
    if (!full_recv(fd, data, len))
      return false;
    if (opt == NBD_OPT_EXPORT_NAME) {
      struct __attribute__((packed)) {
        uint64_t size;
        uint16_t flags;
        char zeroes[124];
      } e = { htobe64(export_size), htobe16(tflags), { 0 } };
      return full_send(fd, &e, no_zeroes ? 10 : sizeof e);
    }
    if (opt == NBD_OPT_GO || opt == NBD_OPT_INFO) {
      struct __attribute__((packed)) {
        uint16_t type;
        uint64_t size;
        uint16_t flags;
      } i = { htobe16(NBD_INFO_EXPORT), htobe64(export_size), htobe16(tflags) };
      if (!opt_reply(fd, opt, NBD_REP_INFO, &i, sizeof i) || !opt_reply(fd, opt, NBD_REP_ACK, NULL, 0))
        return false;
      if (opt == NBD_OPT_GO)
        return true;
    } else if (opt == NBD_OPT_STRUCTURED_REPLY && len == 0) {
      if (!opt_reply(fd, opt, NBD_REP_ACK, NULL, 0))
        return false;
      structured = true;
    } else if (opt == NBD_OPT_ABORT) {
      opt_reply(fd, opt, NBD_REP_ACK, NULL, 0);
      return false;
    } else if (!opt_reply(fd, opt, NBD_REP_ERR_UNSUP, NULL, 0)) {
      return false;
    }
  }
}

/* Copies a WRITE payload into the region, as vdbus's RAM disk does. */
static void store(char *dst, const char *src, size_t len)
{
#if defined(__x86_64__)
  if (len >= 4096 && ((uintptr_t)dst & 15) == 0 && (len & 15) == 0) {
    for (size_t i = 0; i < len; i += 16)
      _mm_stream_si128((__m128i *)(dst + i), _mm_loadu_si128((const __m128i *)(src + i)));
    _mm_sfence();
    return;
  }
#endif
  memcpy(dst, src, len);
}

/* A simple reply (16 bytes), or with structured replies a READ's
 * NBD_REPLY_TYPE_OFFSET_DATA chunk header (20 bytes + the offset). */
struct __attribute__((packed)) reply {
  uint32_t magic;
  union {
    uint32_t error;
    struct __attribute__((packed)) {
      uint16_t flags, type;
    };
  };
  uint64_t cookie;
  uint32_t length;
  uint64_t offset;
};

static void *serve(void *arg)
{
  int fd = (int)(intptr_t)arg;
  char *buf = malloc(BUF);
  struct reply *rep = calloc(MAX_IOV / 2, sizeof *rep);
  struct iovec *iov = calloc(MAX_IOV, sizeof *iov);
  struct timespec c0, c1;
  uint64_t nreq = 0;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
  if (!buf || !rep || !iov || !handshake(fd))
    goto out;
  size_t have = 0;
  bool more = false;   /* whole requests left in buf after MAX_IOV/2 replies */
  for (;;) {
    if (!more) {
      ssize_t r = recv(fd, buf + have, BUF - have, 0);
      if (r < 0 && errno == EINTR)
        continue;
      if (r <= 0)
        goto out;
      have += r;
    }
    size_t pos = 0, nio = 0, nrep = 0;
    while (have - pos >= 28 && nrep < MAX_IOV / 2) {
      const char *h = buf + pos;
      uint32_t magic, len;
      uint16_t type;
      uint64_t cookie, off;
      memcpy(&magic, h, 4);
      memcpy(&type, h + 6, 2);
      memcpy(&cookie, h + 8, 8);
      memcpy(&off, h + 16, 8);
      memcpy(&len, h + 24, 4);
      type = be16toh(type);
      off = be64toh(off);
      len = be32toh(len);
      if (be32toh(magic) != NBD_REQUEST_MAGIC || type > NBD_CMD_FLUSH ||
          len > region_len || (len & (len - 1)) != 0 || (len && off % len))
        goto out;   /* fio's requests are aligned powers of two */
      if (type == NBD_CMD_DISC)
        goto out;
      char *at = region + (off & (region_len - 1));
      if (type == NBD_CMD_WRITE) {
        size_t got = have - pos - 28;
        if (got < len && len < DIRECT_MIN && len <= BUF)
          break;   /* the rest comes with the next recv */
        if (got >= len) {
          store(at, h + 28, len);
          pos += 28 + len;
        } else {
          memcpy(at, h + 28, got);
          if (!full_recv(fd, at + got, len - got))
            goto out;
          pos = have;
        }
      } else {
        pos += 28;
      }
      struct reply *y = &rep[nrep++];
      if (structured && type == NBD_CMD_READ) {
        *y = (struct reply){ .magic = htobe32(NBD_STRUCTURED_REPLY_MAGIC),
                             .flags = htobe16(NBD_REPLY_FLAG_DONE),
                             .type = htobe16(NBD_REPLY_TYPE_OFFSET_DATA), .cookie = cookie,
                             .length = htobe32(8 + len), .offset = htobe64(off) };
        iov[nio++] = (struct iovec){ y, sizeof *y };
      } else {
        *y = (struct reply){ .magic = htobe32(NBD_SIMPLE_REPLY_MAGIC), .cookie = cookie };
        iov[nio++] = (struct iovec){ y, 16 };
      }
      if (type == NBD_CMD_READ)
        iov[nio++] = (struct iovec){ at, len };
      nreq++;
    }
    more = nrep == MAX_IOV / 2;
    memmove(buf, buf + pos, have - pos);
    have -= pos;
    for (size_t i = 0; i < nio;) {
      struct msghdr m = { .msg_iov = iov + i, .msg_iovlen = nio - i };
      ssize_t s = sendmsg(fd, &m, MSG_NOSIGNAL);
      if (s < 0 && errno == EINTR)
        continue;
      if (s <= 0)
        goto out;
      while (i < nio && (size_t)s >= iov[i].iov_len)
        s -= iov[i++].iov_len;
      if (i < nio) {
        iov[i].iov_base = (char *)iov[i].iov_base + s;
        iov[i].iov_len -= s;
      }
    }
  }
 out:
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
  if (nreq)
    fprintf(stderr, "minsrv: connection closed: %llu requests, %.2f µs of CPU each\n",
            (unsigned long long)nreq,
            ((c1.tv_sec - c0.tv_sec) * 1e6 + (c1.tv_nsec - c0.tv_nsec) / 1e3) / nreq);
  close(fd);
  free(buf);
  free(rep);
  free(iov);
  return NULL;
}

static int listen_on(const char *where)
{
  int l, one = 1;
  if (strncmp(where, "unix:", 5) == 0) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(where + 5) >= sizeof a.sun_path) {
      fprintf(stderr, "minsrv: socket path too long\n");
      exit(2);
    }
    strcpy(a.sun_path, where + 5);
    unlink(a.sun_path);
    l = socket(AF_UNIX, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0)
      die(where);
  } else if (strncmp(where, "tcp:", 4) == 0) {
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(where + 4)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(l, (struct sockaddr *)&a, sizeof a) < 0)
      die(where);
  } else {
    fprintf(stderr, "minsrv: listen on unix:PATH or tcp:PORT\n");
    exit(2);
  }
  if (listen(l, 64) < 0)
    die("listen");
  return l;
}

int main(int argc, char **argv)
{
  if (argc != 4) {
    fprintf(stderr, "usage: minsrv unix:PATH|tcp:PORT SIZE_MIB @REGION_FILE|REGION_MIB\n");
    return 2;
  }
  int l = listen_on(argv[1]);
  export_size = strtoull(argv[2], NULL, 10) * MiB;
  if (argv[3][0] == '@') {
    int fd = open(argv[3] + 1, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
      die(argv[3] + 1);
    region_len = st.st_size;
    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
  } else {
    region_len = strtoull(argv[3], NULL, 10) * MiB;
    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  }
  if (export_size == 0 || region_len < MiB || (region_len & (region_len - 1))) {
    fprintf(stderr, "minsrv: the size must be positive and the region a power of two of at least 1 MiB\n");
    return 2;
  }
  if (region == MAP_FAILED)
    die("mmap");
  /* The region's pages as they come: the bench puts it on a huge=always
   * tmpfs, as the RAM disk keeps its fully written regions in huge pages. */
  signal(SIGPIPE, SIG_IGN);
  for (;;) {
    int fd = accept(l, NULL, NULL);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED)
        continue;
      die("accept");
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    pthread_t t;
    if (pthread_create(&t, NULL, serve, (void *)(intptr_t)fd) != 0)
      close(fd);
    else
      pthread_detach(t);
  }
}
