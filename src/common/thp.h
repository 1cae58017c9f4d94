/* vdbus — what the kernel's transparent huge pages are set to. */
#ifndef VDB_THP_H
#define VDB_THP_H

#include <stdbool.h>

/* True if /sys/kernel/mm/transparent_hugepage/enabled says "[always]":
 * then every anonymous mapping not marked MADV_NOHUGEPAGE gets huge pages
 * at first touch (the RAM backend's mapping must refuse them). */
bool vdb_thp_always(void);

#endif
