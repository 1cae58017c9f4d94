/* Unit test: backend parameters. */
#include <errno.h>
#include <string.h>

#include "common/params.h"
#include "tap.h"

int main(void)
{
  struct vdb_params p, q;
  uint64_t v = 7;
  char key[16];

  vdb_params_init(&p);
  CHECK(vdb_params_get(&p, "size") == NULL);
  CHECK(vdb_params_get_size(&p, "size", &v) == -ENOENT && v == 7);
  CHECK(vdb_params_set(&p, "size", "1M") == 0);
  CHECK(vdb_params_get_size(&p, "size", &v) == 0 && v == 1 << 20);
  CHECK(vdb_params_set(&p, "size", "2M") == 0 && p.n == 1);
  CHECK(vdb_params_get_size(&p, "size", &v) == 0 && v == 2 << 20);
  CHECK(vdb_params_set(&p, "bad", "2Q") == 0);
  CHECK(vdb_params_get_size(&p, "bad", &v) == -EINVAL);
  CHECK(!vdb_params_get_bool(&p, "create"));
  vdb_params_set(&p, "create", "yes");
  CHECK(vdb_params_get_bool(&p, "create"));
  vdb_params_set(&p, "create", "0");
  CHECK(!vdb_params_get_bool(&p, "create"));
  CHECK(vdb_params_copy(&q, &p) == 0 && q.n == p.n);
  CHECK(strcmp(vdb_params_get(&q, "size"), "2M") == 0);
  vdb_params_clear(&q);
  for (int i = p.n; i < VDB_PARAMS_MAX; i++) {
    snprintf(key, sizeof key, "k%d", i);
    CHECK(vdb_params_set(&p, key, "v") == 0);
  }
  CHECK(vdb_params_set(&p, "overflow", "v") == -E2BIG);
  vdb_params_clear(&p);
  CHECK(p.n == 0);
  return tap_done("params");
}
