/* vdbus — sizes with K/M/G/T suffixes (powers of 1024). */
#ifndef VDB_SIZE_H
#define VDB_SIZE_H

#include <stddef.h>
#include <stdint.h>

/* Parse "4096", "4K", "1.5G" is rejected (integers only), "16MiB"/"16M"/"16m".
 * Returns 0 and *out, or -EINVAL (malformed) / -ERANGE (overflows 63 bits). */
int vdb_size_parse(const char *s, uint64_t *out);
/* Format bytes for humans: "4.0G", "512", "1.5M".  Returns buf. */
char *vdb_size_format(uint64_t bytes, char *buf, size_t len);

#endif
