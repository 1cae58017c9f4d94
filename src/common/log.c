/* vdbus — logging. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <time.h>

#include "common/log.h"

unsigned vdb_debug_mask;
int vdb_log_verbosity = VDB_LOG_INFO;
static bool use_syslog;

void vdb_log_use_syslog(const char *ident)
{
  openlog(ident, LOG_PID, LOG_DAEMON);
  use_syslog = true;
}

static const struct { const char *name; unsigned bit; } categories[] = {
  { "nbd", VDB_DBG_NBD }, { "io", VDB_DBG_IO }, { "control", VDB_DBG_CONTROL },
  { "fuse", VDB_DBG_FUSE }, { "bus", VDB_DBG_BUS }, { "all", VDB_DBG_ALL },
};

int vdb_debug_parse(const char *spec, unsigned *mask)
{
  unsigned m = 0;
  const char *p = spec;

  while (*p) {
    size_t n = strcspn(p, ",");
    size_t i;
    for (i = 0; i < sizeof categories / sizeof categories[0]; i++)
      if (strlen(categories[i].name) == n && strncmp(p, categories[i].name, n) == 0)
        break;
    if (i == sizeof categories / sizeof categories[0])
      return -EINVAL;
    m |= categories[i].bit;
    p += n;
    if (*p == ',')
      p++;
  }
  *mask = m;
  return 0;
}

void vdb_log(int level, const char *fmt, ...)
{
  static const char *const names[] = { "error", "warning", "info", "debug" };
  static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
  int saved = errno;
  char msg[1024];
  va_list ap;

  if (level > vdb_log_verbosity && level != VDB_LOG_DEBUG)
    return;
  va_start(ap, fmt);
  errno = saved;          /* for %m */
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (use_syslog) {
    syslog(prio[level], "%s", msg);
  } else {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    fprintf(stderr, "vdbusd[%ld.%03ld] %s: %s\n", (long)ts.tv_sec,
            ts.tv_nsec / 1000000, names[level], msg);
  }
  errno = saved;
}
