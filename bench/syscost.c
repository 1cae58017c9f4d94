/* bench/syscost.c — what one wake-up of a request/reply server costs the
 * server's CPU on this machine, no protocol: the floor under "server CPU per
 * request" when a client offers few requests per wake-up.  Built and run by
 * bench/stream; prints "name<TAB>nanoseconds" lines.
 *
 *   syscall        a bare system call (getppid)
 *   epoll-ready    epoll_wait() that returns at once (an fd is ready)
 *   recv-28        recv() of one 28-byte NBD request header
 *   send-4k        send() of a 4 KiB read reply (16-byte header + 4096), the
 *                  receiver not waiting
 *   send-4k-wake-Nus  the same send() to a receiver on the other CPU that
 *                  drains the socket and sleeps in epoll_wait, the sender
 *                  busy for N µs between sends (5: about a client's turn-
 *                  around, the receiver may not be asleep yet; 50: it is):
 *                  the sending thread's CPU per send
 *   wake-Nus       send-4k-wake-Nus - send-4k: what waking the peer cost
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "instrument.h"

static int sv[2];
static char rxbuf[1 << 20];
static atomic_bool stop;

static void pin(int cpu)
{
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

static int sleeper_cpu;

/* Drains sv[1], sleeping in epoll_wait whenever it is empty. */
static void *sleeper(void *arg)
{
  struct epoll_event ev = { .events = EPOLLIN };
  int ep = epoll_create1(0);

  (void)arg;
  pin(sleeper_cpu);
  epoll_ctl(ep, EPOLL_CTL_ADD, sv[1], &ev);
  while (!atomic_load(&stop)) {
    struct epoll_event e;
    if (epoll_wait(ep, &e, 1, 100) > 0)
      while (recv(sv[1], rxbuf, sizeof rxbuf, MSG_DONTWAIT) > 0)
        ;
  }
  close(ep);
  return NULL;
}

/* Busy work for about us microseconds (calibrated once). */
static void spin_us(int us)
{
  static double per_us;
  if (!per_us) {
    double c0 = thread_cpu();
    for (volatile int k = 0; k < 10000000; k++)
      ;
    per_us = 10000000 / ((thread_cpu() - c0) * 1e6);
  }
  for (volatile long k = 0; k < (long)(per_us * us); k++)
    ;
}

int main(int argc, char **argv)
{
  int n = argc > 1 ? atoi(argv[1]) : 200000;
  static char reply[16 + 4096], hdr[28];
  struct epoll_event ev = { .events = EPOLLIN }, e[8];
  pthread_t t;
  double c0, c1, base, wake, plain;
  int ep;

  if (n < 1000 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
    fprintf(stderr, "syscost: usage: syscost [N >= 1000]\n");
    return 1;
  }
  pin(0);

  c0 = thread_cpu();
  for (int i = 0; i < n; i++)
    syscall(SYS_getppid);
  printf("syscall\t%.0f\n", (thread_cpu() - c0) / n * 1e9);

  ep = epoll_create1(0);
  epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &ev);
  if (send(sv[1], "x", 1, 0) != 1)
    return 1;
  c0 = thread_cpu();
  for (int i = 0; i < n; i++)
    epoll_wait(ep, e, 8, 0);
  printf("epoll-ready\t%.0f\n", (thread_cpu() - c0) / n * 1e9);
  recv(sv[0], rxbuf, sizeof rxbuf, 0);

  /* recv: 100 headers queued (each its own skb: within the send buffer),
   * then 100 recv()s; timed in bulk. */
  double tr = 0;
  for (int i = 0; i < n / 100; i++) {
    for (int j = 0; j < 100; j++)
      if (send(sv[1], hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr)
        return 1;
    c0 = thread_cpu();
    for (int j = 0; j < 100; j++)
      recv(sv[0], hdr, sizeof hdr, 0);
    tr += thread_cpu() - c0;
  }
  printf("recv-28\t%.0f\n", tr / (n / 100 * 100) * 1e9);

  /* send: 16 replies (65 KiB, within the default send buffer), timed in
   * bulk, then drained. */
  double ts = 0;
  for (int i = 0; i < n / 16; i++) {
    c0 = thread_cpu();
    for (int j = 0; j < 16; j++)
      if (send(sv[0], reply, sizeof reply, 0) != (ssize_t)sizeof reply)
        return 1;
    ts += thread_cpu() - c0;
    while (recv(sv[1], rxbuf, sizeof rxbuf, MSG_DONTWAIT) > 0)
      ;
  }
  plain = ts / (n / 16 * 16) * 1e9;
  printf("send-4k\t%.0f\n", plain);

  /* The same sends, each waking a receiver asleep on the other CPU; the
   * sender pauses (busy) between sends, as a client turning a request
   * around would: short (the peer may still be awake) and long. */
  sleeper_cpu = sysconf(_SC_NPROCESSORS_ONLN) > 1 ? 1 : 0;
  pthread_create(&t, NULL, sleeper, NULL);
  usleep(100000);
  int spins[2] = { 5, 50 };
  for (int k = 0; k < 2; k++) {
    int m = n / 4 / (k ? 5 : 1);
    c0 = thread_cpu();
    for (int i = 0; i < m; i++)
      spin_us(spins[k]);
    base = thread_cpu() - c0;
    c0 = thread_cpu();
    for (int i = 0; i < m; i++) {
      if (send(sv[0], reply, sizeof reply, 0) != (ssize_t)sizeof reply)
        return 1;
      spin_us(spins[k]);
    }
    c1 = thread_cpu();
    wake = ((c1 - c0) - base) / m * 1e9;
    printf("send-4k-wake-%dus\t%.0f\n", spins[k], wake);
    printf("wake-%dus\t%.0f\n", spins[k], wake - plain);
  }
  atomic_store(&stop, true);
  pthread_join(t, NULL);
  return 0;
}
