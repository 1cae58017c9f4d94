/* vdbus — a tiny test helper for unit tests: CHECK() records failures,
 * the test exits 1 if any failed. */
#ifndef VDB_TEST_TAP_H
#define VDB_TEST_TAP_H

#include <stdio.h>
#include <stdlib.h>

static int tap_failures, tap_checks;

#define CHECK(cond)                                                        \
  do {                                                                     \
    tap_checks++;                                                          \
    if (!(cond)) {                                                         \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      tap_failures++;                                                      \
    }                                                                      \
  } while (0)

static inline int tap_done(const char *name)
{
  printf("%s: %d checks, %d failed\n", name, tap_checks, tap_failures);
  return tap_failures ? 1 : 0;
}

#endif
