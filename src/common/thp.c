/* vdbus — what the kernel's transparent huge pages are set to. */
#include <stdio.h>
#include <string.h>

#include "common/thp.h"

bool vdb_thp_always(void)
{
  char buf[128] = "";
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");

  if (f) {
    if (!fgets(buf, sizeof buf, f))
      buf[0] = 0;
    fclose(f);
  }
  return strstr(buf, "[always]") != NULL;
}
