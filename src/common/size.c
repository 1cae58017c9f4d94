/* vdbus — size parsing and formatting. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "common/size.h"

int vdb_size_parse(const char *s, uint64_t *out)
{
  uint64_t v = 0, mult = 1;
  const char *p = s;

  if (!s || !isdigit((unsigned char)*p))
    return -EINVAL;
  for (; isdigit((unsigned char)*p); p++) {
    if (v > (UINT64_MAX - 9) / 10)
      return -ERANGE;
    v = v * 10 + (uint64_t)(*p - '0');
  }
  switch (toupper((unsigned char)*p)) {
  case '\0': break;
  case 'B': if (p[1]) return -EINVAL; p++; break;
  case 'K': mult = 1ull << 10; p++; break;
  case 'M': mult = 1ull << 20; p++; break;
  case 'G': mult = 1ull << 30; p++; break;
  case 'T': mult = 1ull << 40; p++; break;
  case 'P': mult = 1ull << 50; p++; break;
  default: return -EINVAL;
  }
  if (mult > 1 && *p) {
    /* Accept "K", "KB", "KiB" (any case). */
    if (strcasecmp(p, "b") != 0 && strcasecmp(p, "ib") != 0)
      return -EINVAL;
  }
  if (v != 0 && mult > (uint64_t)INT64_MAX / v)
    return -ERANGE;
  *out = v * mult;
  return 0;
}

char *vdb_size_format(uint64_t bytes, char *buf, size_t len)
{
  static const char units[] = "KMGTP";
  double v = (double)bytes;
  int u = -1;

  while (v >= 1024 && u < 4) {
    v /= 1024;
    u++;
  }
  if (u < 0)
    snprintf(buf, len, "%llu", (unsigned long long)bytes);
  else if (v == (double)(uint64_t)v)
    snprintf(buf, len, "%llu%c", (unsigned long long)v, units[u]);
  else
    snprintf(buf, len, "%.1f%c", v, units[u]);
  return buf;
}
