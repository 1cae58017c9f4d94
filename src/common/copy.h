/* vdbus — copying a payload into memory that is not in the cache. */
#ifndef VDB_COPY_H
#define VDB_COPY_H

#include <stddef.h>

/* Copy len bytes to dst, which is almost certainly not in the cache (a
 * RAM disk's page that a write lands on: a client keeps its own cache of
 * what it wrote).  From VDB_COPY_STREAM_MIN bytes up the copy uses
 * non-temporal stores, so no cache line of dst is read for ownership
 * before it is overwritten and the caller's hot data stays in the cache.
 * Measured on random 4 KiB writes over 4 GiB: 650 -> 400 ns per copy
 * (docs/performance.md).  Below that size, and off x86-64, it is memcpy. */
#define VDB_COPY_STREAM_MIN 4096u
void vdb_copy_stream(void *dst, const void *src, size_t len);

#endif
