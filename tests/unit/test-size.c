/* Unit test: size parsing and formatting. */
#include <errno.h>
#include <string.h>

#include "common/size.h"
#include "tap.h"

static int parse(const char *s, uint64_t *v) { return vdb_size_parse(s, v); }

int main(void)
{
  uint64_t v = 0;
  char buf[32];

  CHECK(parse("0", &v) == 0 && v == 0);
  CHECK(parse("4096", &v) == 0 && v == 4096);
  CHECK(parse("4K", &v) == 0 && v == 4096);
  CHECK(parse("4k", &v) == 0 && v == 4096);
  CHECK(parse("16M", &v) == 0 && v == 16ull << 20);
  CHECK(parse("16MiB", &v) == 0 && v == 16ull << 20);
  CHECK(parse("16MB", &v) == 0 && v == 16ull << 20);
  CHECK(parse("4G", &v) == 0 && v == 4ull << 30);
  CHECK(parse("2T", &v) == 0 && v == 2ull << 40);
  CHECK(parse("512B", &v) == 0 && v == 512);
  CHECK(parse("", &v) == -EINVAL);
  CHECK(parse("G", &v) == -EINVAL);
  CHECK(parse("-1", &v) == -EINVAL);
  CHECK(parse("1.5G", &v) == -EINVAL);
  CHECK(parse("12X", &v) == -EINVAL);
  CHECK(parse("12 M", &v) == -EINVAL);
  CHECK(parse("4Gx", &v) == -EINVAL);
  CHECK(parse("99999999999999999999", &v) == -ERANGE);
  CHECK(parse("9000000P", &v) == -ERANGE);
  CHECK(parse(NULL, &v) == -EINVAL);

  CHECK(strcmp(vdb_size_format(512, buf, sizeof buf), "512") == 0);
  CHECK(strcmp(vdb_size_format(4096, buf, sizeof buf), "4K") == 0);
  CHECK(strcmp(vdb_size_format(3ull << 29, buf, sizeof buf), "1.5G") == 0);
  CHECK(strcmp(vdb_size_format(4ull << 30, buf, sizeof buf), "4G") == 0);
  return tap_done("size");
}
