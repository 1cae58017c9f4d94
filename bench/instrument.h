/* bench/instrument.h — what the bench's C instruments (fileread.c,
 * filewrite.c, minsrv.c, syscost.c, xfer.c) share: dying on an error, the
 * clock, and the calling thread's CPU time.  Each is built alone with cc,
 * so these are static inline. */
#ifndef VDBUS_BENCH_INSTRUMENT_H
#define VDBUS_BENCH_INSTRUMENT_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline void die(const char *what)
{
  perror(what);
  exit(1);
}

/* Seconds on the monotonic clock. */
static inline double now(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The calling thread's CPU time, in seconds. */
static inline double thread_cpu(void)
{
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

#endif
