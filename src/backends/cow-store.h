/* vdbus — the store of a copy-on-write overlay: the changed chunks and the
 * state of every chunk, in RAM or in one sparse file.
 *
 * File layout (all integers little-endian):
 *   0      header (struct cow_header), padded to 4 KiB
 *   4 KiB  the chunk map: one state byte per chunk, padded to 4 KiB
 *   data_off (chunk- and 1 MiB-aligned)  the data, at the overlay's own
 *          offsets: byte X of the disk is at data_off + X (sparse).
 * The map is mapped shared, so it survives a kill of the daemon with the
 * page cache; a flush makes data, then map, durable. */
#ifndef VDB_BACKENDS_COW_STORE_H
#define VDB_BACKENDS_COW_STORE_H

#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* Chunk states, one byte per chunk in the map. */
enum {
  COW_CHUNK_BASE = 0,   /* unchanged: read from the base */
  COW_CHUNK_DATA = 1,   /* in the store */
  COW_CHUNK_ZERO = 2,   /* reads as zeroes, nothing stored */
  COW_CHUNK_COMMIT = 3, /* in the store, being committed into the base */
  COW_CHUNK_ZCOMMIT = 4,/* zeroes, being committed into the base */
};

#define COW_CHUNK_MIN 4096u
#define COW_CHUNK_MAX (4u << 20)
#define COW_CHUNK_DEFAULT (64u << 10)

struct cow_store {
  bool is_file, readonly;
  int fd;                   /* file store, else -1 */
  char path[PATH_MAX];
  uint8_t *ram;             /* RAM store: the data (sparse mapping) */
  uint64_t ram_len;
  uint64_t size, chunk, nchunks;
  unsigned shift;           /* log2(chunk) */
  _Atomic uint8_t *map;     /* nchunks state bytes */
  void *map_mem;            /* what to unmap / free */
  size_t map_len;
  uint64_t data_off;        /* file store: where the data starts */
};

/* Open spec "ram" or "file:PATH" (created if missing; an existing file must
 * be the store of an overlay of base_name with this size).  chunk is a
 * power of two in [COW_CHUNK_MIN, COW_CHUNK_MAX]; an existing file keeps
 * its own.  0 or -errno with vdb_set_error(). */
int cow_store_open(struct cow_store *st, const char *spec, const char *base_name, uint64_t size,
                   uint64_t chunk, bool readonly);
void cow_store_close(struct cow_store *st);

/* Synchronous data access at disk offsets; 0 or -errno. */
int cow_store_read(struct cow_store *st, void *buf, uint64_t off, uint64_t len);
int cow_store_write(struct cow_store *st, const void *buf, uint64_t off, uint64_t len, bool fua);
int cow_store_zero(struct cow_store *st, uint64_t off, uint64_t len, bool fua);
/* Give the space of [off, off+len) back (contents become zeroes). */
int cow_store_punch(struct cow_store *st, uint64_t off, uint64_t len);
/* Data, then the map, durable. */
int cow_store_sync(struct cow_store *st);

static inline uint8_t cow_store_state(struct cow_store *st, uint64_t ch)
{
  return atomic_load_explicit(&st->map[ch], memory_order_acquire);
}

static inline void cow_store_set_state(struct cow_store *st, uint64_t ch, uint8_t s)
{
  atomic_store_explicit(&st->map[ch], s, memory_order_release);
}

#endif
