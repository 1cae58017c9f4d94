/* vdbus — logging.  Levels err/warn/info plus debug categories as a bitmask,
 * checked before the arguments are evaluated.  stderr in the foreground,
 * syslog when daemonised. */
#ifndef VDB_LOG_H
#define VDB_LOG_H

#include <stdbool.h>

enum vdb_log_level { VDB_LOG_ERR = 0, VDB_LOG_WARN, VDB_LOG_INFO, VDB_LOG_DEBUG };

/* Debug categories (-D nbd,io,…). */
#define VDB_DBG_NBD     (1u << 0)
#define VDB_DBG_IO      (1u << 1)
#define VDB_DBG_CONTROL (1u << 2)
#define VDB_DBG_FUSE    (1u << 3)
#define VDB_DBG_BUS     (1u << 4)
#define VDB_DBG_ALL     0xffffffffu

extern unsigned vdb_debug_mask;
extern int vdb_log_verbosity; /* highest level printed; default VDB_LOG_INFO */

void vdb_log_use_syslog(const char *ident);
/* Parse "nbd,io" or "all" into a mask; returns -EINVAL on an unknown name. */
int vdb_debug_parse(const char *spec, unsigned *mask);
void vdb_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define vdb_err(...)  vdb_log(VDB_LOG_ERR, __VA_ARGS__)
#define vdb_warn(...) vdb_log(VDB_LOG_WARN, __VA_ARGS__)
#define vdb_info(...) do { if (vdb_log_verbosity >= VDB_LOG_INFO) vdb_log(VDB_LOG_INFO, __VA_ARGS__); } while (0)
#define vdb_dbg(cat, ...) \
  do { if (__builtin_expect(vdb_debug_mask & (cat), 0)) vdb_log(VDB_LOG_DEBUG, __VA_ARGS__); } while (0)

#endif
